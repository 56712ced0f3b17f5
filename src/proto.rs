//! Generated protocol types (never edited by hand; see `build.rs`).

/// The externalgrpc CloudProvider protocol.
#[allow(clippy::all, clippy::pedantic, missing_docs, reason = "generated code")]
pub mod externalgrpc {
    tonic::include_proto!("clusterautoscaler.cloudprovider.v1.externalgrpc");
}

/// The subset of Kubernetes core/v1 used for template nodes and pod pricing.
#[allow(clippy::all, clippy::pedantic, missing_docs, reason = "generated code")]
pub mod k8s {
    tonic::include_proto!("k8s.io.api.core.v1");
}
