//! The HTTP endpoint: `/healthz` (the process is up), `/readyz` (configuration loaded and every
//! cloud listed successfully, newest listing included) and `/metrics` (Prometheus text).

use std::sync::Arc;

use axum::{Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};

use super::metrics::Metrics;
use crate::state::Fleet;

#[derive(Clone)]
struct AppState {
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
}

/// The router serving health, readiness and metrics.
pub fn router(fleet: Arc<Fleet>, metrics: Arc<Metrics>) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics_text))
        .with_state(AppState { fleet, metrics })
}

async fn readyz(State(s): State<AppState>) -> impl IntoResponse {
    if s.fleet.ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else {
        let mut body = String::from("not ready\n");
        for problem in s.fleet.readiness_problems() {
            body.push_str(&problem);
            body.push('\n');
        }
        (StatusCode::SERVICE_UNAVAILABLE, body)
    }
}

async fn metrics_text(State(s): State<AppState>) -> impl IntoResponse {
    (
        [(axum::http::header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")],
        s.metrics.render(&s.fleet),
    )
}
