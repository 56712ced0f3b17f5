//! Serving a fake cloud API on loopback: one fallback handler that sees every request with the
//! fake's shared state (the fakes route by hand, so that anything unexpected is recorded).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    http::{Request, Response},
};

/// Binds 127.0.0.1 on a free port and serves `handle(state, request)` in a background task.
pub async fn serve<S, F, Fut>(state: &Arc<Mutex<S>>, handle: F) -> (SocketAddr, tokio::task::JoinHandle<()>)
where
    S: Send + 'static,
    F: Fn(Arc<Mutex<S>>, Request<Body>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Body>> + Send + 'static,
{
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shared = Arc::clone(state);
    let app = axum::Router::new().fallback(move |req: Request<Body>| handle(Arc::clone(&shared), req));
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    (addr, server)
}
