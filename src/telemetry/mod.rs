//! Metrics, health and readiness, and the HTTP endpoint that serves them.

pub mod http;
pub mod metrics;
pub mod process;
