//! Serving a fake cloud API on loopback: one fallback handler that sees every request with the
//! fake's shared state (the fakes route by hand, so that anything unexpected is recorded).

use std::{
    future::Future,
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use axum::{
    body::Body,
    http::{Request, Response, request::Parts},
};
use serde_json::Value;

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

/// A request's query, decoded, in order.
pub fn query(parts: &Parts) -> Vec<(String, String)> {
    parts.uri.query().map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect()).unwrap_or_default()
}

/// A request's JSON body (`None` when empty). A body sent without `Content-Type:
/// application/json` is recorded in `problems`; one that is not JSON is the parse error.
pub fn json_body(parts: &Parts, bytes: &[u8], problems: &mut Vec<String>) -> Result<Option<Value>, String> {
    if bytes.is_empty() {
        return Ok(None);
    }
    let (method, path) = (parts.method.as_str(), parts.uri.path());
    if parts.headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json") {
        problems.push(format!("{method} {path}: a body without Content-Type: application/json"));
    }
    serde_json::from_slice(bytes).map(Some).map_err(|e| {
        problems.push(format!("{method} {path}: body is not JSON: {e}"));
        e.to_string()
    })
}
