//! The externalgrpc `CloudProvider` service: proto in, fleet calls, proto out. It knows nothing
//! of any cloud; every error becomes a status in [`status`].

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tonic::{Code, Request, Response, Status, metadata::MetadataMap};
use tracing::debug;

use crate::{
    config::GpuConfig,
    proto::externalgrpc::{self as pb, cloud_provider_server::CloudProvider, instance_status::InstanceState},
    state::{Fleet, InstancePhase},
    telemetry::metrics::Metrics,
    untrusted,
};

pub mod options;
pub mod pricing;
pub mod status;

/// The gRPC service over a [`Fleet`].
#[derive(Debug)]
pub struct Service {
    fleet: Arc<Fleet>,
    metrics: Arc<Metrics>,
    gpu: GpuConfig,
    /// `NodeGroups` answer, built once (groups are fixed for the process's life).
    node_groups: Vec<pb::NodeGroup>,
}

impl Service {
    pub fn new(fleet: Arc<Fleet>, metrics: Arc<Metrics>, gpu: GpuConfig) -> Service {
        let node_groups = fleet
            .groups
            .iter()
            .map(|g| pb::NodeGroup {
                id: g.config.name.clone(),
                min_size: g.config.min_size,
                max_size: g.config.max_size,
                debug: g.debug.clone(),
            })
            .collect();
        Service { fleet, metrics, gpu, node_groups }
    }

    /// Runs one RPC body and records its latency and status code.
    async fn instrument<T>(
        &self,
        method: &'static str,
        body: impl Future<Output = Result<T, Status>>,
    ) -> Result<Response<T>, Status> {
        let started = Instant::now();
        // A follower (leader election on, Lease held elsewhere) serves nothing: its target sizes
        // and instances are not the truth; the leader's are.
        let result = match self.fleet.check_leading() {
            Ok(()) => body.await,
            Err(e) => Err(e.into()),
        };
        let code = match &result {
            Ok(_) => Code::Ok,
            Err(s) => s.code(),
        };
        self.metrics.observe_rpc(method, code, started.elapsed().as_secs_f64());
        if let Err(s) = &result {
            // Status messages quote caller text through `untrusted::quote`; `?` escapes the
            // rest, so nothing a caller sends can forge a log line.
            debug!(method, code = ?s.code(), error = ?s.message(), "rpc failed");
        }
        result.map(Response::new)
    }

    fn group(&self, id: &str) -> Result<usize, Status> {
        Ok(self.fleet.group_index(id)?)
    }

    /// When this call must stop waiting for the cloud ([`Fleet::wait_until`]): never past the
    /// caller's deadline.
    fn wait_until(&self, metadata: &MetadataMap) -> tokio::time::Instant {
        self.fleet.wait_until(caller_timeout(metadata))
    }

    /// A group whose sizes are known: its cloud has been listed since start (the first calls
    /// after a start wait for that listing until `until`; see [`Fleet::wait_listed_until`]).
    async fn listed_group(&self, id: &str, until: tokio::time::Instant) -> Result<usize, Status> {
        let g = self.group(id)?;
        self.fleet.wait_listed_until(g, until).await?;
        Ok(g)
    }

    fn priced_groups(&self) -> impl Iterator<Item = (usize, f64)> + '_ {
        self.fleet.groups.iter().enumerate().filter_map(|(i, g)| g.config.price_per_hour.map(|p| (i, p)))
    }
}

/// The caller's deadline, from the `grpc-timeout` request header (cluster-autoscaler sends its
/// `grpc_timeout`, 5 s by default). The format is gRPC over HTTP/2's: at most 8 digits and a unit
/// (`H`, `M`, `S`, `m`, `u`, `n`). `None` when absent or malformed (tonic ignores those too).
fn caller_timeout(metadata: &MetadataMap) -> Option<Duration> {
    let value = metadata.get("grpc-timeout")?.to_str().ok()?;
    let split = value.len().checked_sub(1)?;
    let (digits, unit) = value.split_at(split);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
}

fn instance(provider_id: &str, phase: InstancePhase<'_>) -> pb::Instance {
    let (state, error_info) = match phase {
        InstancePhase::Creating => (InstanceState::InstanceCreating, None),
        InstancePhase::Running => (InstanceState::InstanceRunning, None),
        InstancePhase::Deleting => (InstanceState::InstanceDeleting, None),
        InstancePhase::Failed(f) => (
            InstanceState::InstanceCreating,
            Some(pb::InstanceErrorInfo {
                error_code: f.code.clone(),
                error_message: f.message.clone(),
                instance_error_class: f.class.wire_value(),
            }),
        ),
    };
    pb::Instance {
        id: provider_id.to_owned(),
        status: Some(pb::InstanceStatus { instance_state: state as i32, error_info }),
    }
}

#[tonic::async_trait]
impl CloudProvider for Service {
    async fn node_groups(&self, _: Request<pb::NodeGroupsRequest>) -> Result<Response<pb::NodeGroupsResponse>, Status> {
        self.instrument("NodeGroups", async { Ok(pb::NodeGroupsResponse { node_groups: self.node_groups.clone() }) })
            .await
    }

    async fn node_group_for_node(
        &self,
        request: Request<pb::NodeGroupForNodeRequest>,
    ) -> Result<Response<pb::NodeGroupForNodeResponse>, Status> {
        self.instrument("NodeGroupForNode", async {
            let until = self.wait_until(request.metadata());
            let node = request.into_inner().node.unwrap_or_default();
            // Fake nodes for unregistered instances carry the instance id as both name and
            // providerID, so one index lookup serves both. Unknown nodes are not an error, once
            // every cloud has been listed and the node is known to be none of ours.
            let mut group = self.fleet.group_of(&node.provider_id);
            if group.is_none() {
                self.fleet.wait_all_listed_until(until).await?;
                group = self.fleet.group_of(&node.provider_id);
            }
            let node_group = group.map(|g| self.node_groups[g].clone()).unwrap_or_default();
            Ok(pb::NodeGroupForNodeResponse { node_group: Some(node_group) })
        })
        .await
    }

    async fn pricing_node_price(
        &self,
        request: Request<pb::PricingNodePriceRequest>,
    ) -> Result<Response<pb::PricingNodePriceResponse>, Status> {
        self.instrument("PricingNodePrice", async {
            if self.priced_groups().next().is_none() {
                return Err(Status::unimplemented("no node group has price_per_hour configured"));
            }
            let r = request.into_inner();
            let node = r.node.unwrap_or_default();
            let g = pricing::group_of_node(&self.fleet, &node).ok_or_else(|| {
                Status::not_found(format!(
                    "node {} ({}) belongs to no node group",
                    untrusted::quote(&node.name),
                    untrusted::quote(&node.provider_id)
                ))
            })?;
            let group = &self.fleet.groups[g].config;
            let hourly = group.price_per_hour.ok_or_else(|| {
                Status::failed_precondition(format!("node group {:?} has no price_per_hour", group.name))
            })?;
            let hours = pricing::hours(
                r.start_timestamp.as_ref().or(r.start_time.as_ref()),
                r.end_timestamp.as_ref().or(r.end_time.as_ref()),
            );
            Ok(pb::PricingNodePriceResponse { price: hourly * hours })
        })
        .await
    }

    async fn pricing_pod_price(
        &self,
        request: Request<pb::PricingPodPriceRequest>,
    ) -> Result<Response<pb::PricingPodPriceResponse>, Status> {
        self.instrument("PricingPodPrice", async {
            if self.priced_groups().next().is_none() {
                return Err(Status::unimplemented("no node group has price_per_hour configured"));
            }
            let until = self.wait_until(request.metadata());
            let r = request.into_inner();
            let pod = if r.pod_bytes.is_empty() { &r.pod } else { &r.pod_bytes };
            let requests = pricing::pod_requests(pod)
                .map_err(|e| Status::invalid_argument(format!("pod is not a serialized v1.Pod: {e}")))?;
            let mut shapes = Vec::new();
            for (g, price) in self.priced_groups() {
                let t = self.fleet.template_until(g, until).await?;
                let cpu = t.capacity("cpu").and_then(crate::quantity::parse_cpu_millis).unwrap_or(0);
                let mem = t.capacity("memory").and_then(crate::quantity::parse_bytes).unwrap_or(0);
                shapes.push((price, cpu, mem));
            }
            let hourly = pricing::pod_hourly_price(requests, &shapes).unwrap_or(0.0);
            let hours = pricing::hours(
                r.start_timestamp.as_ref().or(r.start_time.as_ref()),
                r.end_timestamp.as_ref().or(r.end_time.as_ref()),
            );
            Ok(pb::PricingPodPriceResponse { price: hourly * hours })
        })
        .await
    }

    async fn gpu_label(&self, _: Request<pb::GpuLabelRequest>) -> Result<Response<pb::GpuLabelResponse>, Status> {
        self.instrument("GPULabel", async { Ok(pb::GpuLabelResponse { label: self.gpu.label.clone() }) }).await
    }

    async fn get_available_gpu_types(
        &self,
        _: Request<pb::GetAvailableGpuTypesRequest>,
    ) -> Result<Response<pb::GetAvailableGpuTypesResponse>, Status> {
        self.instrument("GetAvailableGPUTypes", async {
            let mut gpu_types = HashMap::new();
            let from_groups = self.fleet.groups.iter().filter_map(|g| g.config.template.gpu_type.clone());
            for t in self.gpu.types.iter().cloned().chain(from_groups) {
                gpu_types.insert(t, prost_types::Any::default());
            }
            Ok(pb::GetAvailableGpuTypesResponse { gpu_types })
        })
        .await
    }

    async fn cleanup(&self, _: Request<pb::CleanupRequest>) -> Result<Response<pb::CleanupResponse>, Status> {
        // CA calls this on exit. Creates and deletes in flight are cloud work CA asked for and
        // still counts on; they run to completion.
        self.instrument("Cleanup", async { Ok(pb::CleanupResponse {}) }).await
    }

    async fn refresh(&self, request: Request<pb::RefreshRequest>) -> Result<Response<pb::RefreshResponse>, Status> {
        self.instrument("Refresh", async {
            self.fleet.refresh_until(self.wait_until(request.metadata())).await?;
            Ok(pb::RefreshResponse {})
        })
        .await
    }

    async fn node_group_target_size(
        &self,
        request: Request<pb::NodeGroupTargetSizeRequest>,
    ) -> Result<Response<pb::NodeGroupTargetSizeResponse>, Status> {
        self.instrument("NodeGroupTargetSize", async {
            let g = self.listed_group(&request.get_ref().id, self.wait_until(request.metadata())).await?;
            let target_size = i32::try_from(self.fleet.target_size(g)).unwrap_or(i32::MAX);
            Ok(pb::NodeGroupTargetSizeResponse { target_size })
        })
        .await
    }

    async fn node_group_increase_size(
        &self,
        request: Request<pb::NodeGroupIncreaseSizeRequest>,
    ) -> Result<Response<pb::NodeGroupIncreaseSizeResponse>, Status> {
        self.instrument("NodeGroupIncreaseSize", async {
            let r = request.get_ref();
            let g = self.listed_group(&r.id, self.wait_until(request.metadata())).await?;
            self.fleet.increase(g, r.delta)?;
            Ok(pb::NodeGroupIncreaseSizeResponse {})
        })
        .await
    }

    async fn node_group_delete_nodes(
        &self,
        request: Request<pb::NodeGroupDeleteNodesRequest>,
    ) -> Result<Response<pb::NodeGroupDeleteNodesResponse>, Status> {
        self.instrument("NodeGroupDeleteNodes", async {
            let r = request.get_ref();
            // One deadline for both waits (the first listing, then the cloud's delete records).
            let until = self.wait_until(request.metadata());
            let g = self.listed_group(&r.id, until).await?;
            // A node without providerID can only be a fake node named after its instance id.
            let ids: Vec<&str> = r
                .nodes
                .iter()
                .map(|n| if n.provider_id.is_empty() { n.name.as_str() } else { n.provider_id.as_str() })
                .collect();
            self.fleet.delete_nodes_until(g, &ids, until).await?;
            Ok(pb::NodeGroupDeleteNodesResponse {})
        })
        .await
    }

    async fn node_group_decrease_target_size(
        &self,
        request: Request<pb::NodeGroupDecreaseTargetSizeRequest>,
    ) -> Result<Response<pb::NodeGroupDecreaseTargetSizeResponse>, Status> {
        self.instrument("NodeGroupDecreaseTargetSize", async {
            let r = request.get_ref();
            let g = self.listed_group(&r.id, self.wait_until(request.metadata())).await?;
            self.fleet.decrease(g, r.delta)?;
            Ok(pb::NodeGroupDecreaseTargetSizeResponse {})
        })
        .await
    }

    async fn node_group_nodes(
        &self,
        request: Request<pb::NodeGroupNodesRequest>,
    ) -> Result<Response<pb::NodeGroupNodesResponse>, Status> {
        self.instrument("NodeGroupNodes", async {
            let g = self.listed_group(&request.get_ref().id, self.wait_until(request.metadata())).await?;
            let mut instances = Vec::with_capacity(self.fleet.target_size(g));
            self.fleet.for_each_instance(g, |id, phase| instances.push(instance(id, phase)));
            Ok(pb::NodeGroupNodesResponse { instances })
        })
        .await
    }

    async fn node_group_template_node_info(
        &self,
        request: Request<pb::NodeGroupTemplateNodeInfoRequest>,
    ) -> Result<Response<pb::NodeGroupTemplateNodeInfoResponse>, Status> {
        self.instrument("NodeGroupTemplateNodeInfo", async {
            let g = self.group(&request.get_ref().id)?;
            let template = self.fleet.template_until(g, self.wait_until(request.metadata())).await?;
            // Both generations: CA < 1.35 reads field 1, CA >= 1.35 field 2.
            Ok(pb::NodeGroupTemplateNodeInfoResponse {
                node_info: template.bytes.clone(),
                node_bytes: template.bytes.clone(),
            })
        })
        .await
    }

    async fn node_group_get_options(
        &self,
        request: Request<pb::NodeGroupAutoscalingOptionsRequest>,
    ) -> Result<Response<pb::NodeGroupAutoscalingOptionsResponse>, Status> {
        self.instrument("NodeGroupGetOptions", async {
            let r = request.get_ref();
            let g = self.group(&r.id)?;
            let overrides = &self.fleet.groups[g].config.options;
            if overrides.is_empty() {
                return Err(Status::unimplemented(format!("node group {:?} has no option overrides", r.id)));
            }
            Ok(pb::NodeGroupAutoscalingOptionsResponse {
                node_group_autoscaling_options: Some(options::answer(overrides, r.defaults.as_ref())),
            })
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn timeout_of(value: &str) -> Option<Duration> {
        let mut m = MetadataMap::new();
        m.insert("grpc-timeout", value.parse().unwrap());
        caller_timeout(&m)
    }

    #[test]
    fn the_callers_deadline_is_read_in_every_unit_of_the_grpc_timeout_header() {
        assert_eq!(caller_timeout(&MetadataMap::new()), None);
        // What grpc-go sends for cluster-autoscaler's default 5 s, and what tonic sends.
        assert_eq!(timeout_of("4999848u"), Some(Duration::from_micros(4_999_848)));
        assert_eq!(timeout_of("5S"), Some(Duration::from_secs(5)));
        assert_eq!(timeout_of("2H"), Some(Duration::from_secs(7200)));
        assert_eq!(timeout_of("3M"), Some(Duration::from_secs(180)));
        assert_eq!(timeout_of("250m"), Some(Duration::from_millis(250)));
        assert_eq!(timeout_of("99999999n"), Some(Duration::from_nanos(99_999_999)));
        for bad in ["", "S", "5", "5s", "123456789S", "-5S", "+5S", "5 S", "1.5S"] {
            assert_eq!(timeout_of(bad), None, "{bad:?}");
        }
    }
}
