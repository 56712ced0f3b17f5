//! `flotilla ctl`: call any RPC by hand, as cluster-autoscaler would, for standalone testing.

use std::path::PathBuf;

use clap::Subcommand;
use prost::Message;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use crate::proto::{
    externalgrpc::{self as pb, cloud_provider_client::CloudProviderClient},
    k8s,
};

/// One RPC to call.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List node groups (NodeGroups).
    NodeGroups,
    /// Which group a node belongs to (NodeGroupForNode).
    NodeGroupForNode {
        provider_id: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// A group's target size (NodeGroupTargetSize).
    TargetSize { group: String },
    /// Add machines to a group (NodeGroupIncreaseSize).
    IncreaseSize { group: String, delta: i32 },
    /// Cancel machines not yet created (NodeGroupDecreaseTargetSize; delta is negative).
    DecreaseTargetSize {
        group: String,
        #[arg(allow_negative_numbers = true)]
        delta: i32,
    },
    /// Delete machines by provider id (NodeGroupDeleteNodes).
    DeleteNodes {
        group: String,
        #[arg(required = true)]
        provider_ids: Vec<String>,
    },
    /// A group's instances and their states (NodeGroupNodes).
    Nodes { group: String },
    /// A group's template node, as YAML (NodeGroupTemplateNodeInfo).
    Template { group: String },
    /// A group's autoscaling options (NodeGroupGetOptions).
    Options { group: String },
    /// Reconcile with the clouds (Refresh).
    Refresh,
    /// The GPU label and types (GPULabel, GetAvailableGPUTypes).
    Gpu,
    /// Tell the server CA is exiting (Cleanup).
    Cleanup,
}

/// Where and how to connect.
#[derive(Debug, clap::Args)]
pub struct Target {
    /// Server address, host:port.
    #[arg(long, default_value = "127.0.0.1:8086")]
    pub address: String,
    /// Client certificate (PEM) for mTLS; needs --key and --cacert too.
    #[arg(long, requires_all = ["key", "cacert"])]
    pub cert: Option<PathBuf>,
    #[arg(long)]
    pub key: Option<PathBuf>,
    #[arg(long)]
    pub cacert: Option<PathBuf>,
    /// Per-call deadline, as cluster-autoscaler's grpc_timeout.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

/// Connects to the server the way cluster-autoscaler does (plaintext, or mTLS with the host
/// part of the address as server name).
pub async fn connect(target: &Target) -> Result<CloudProviderClient<Channel>, Box<dyn std::error::Error>> {
    let scheme = if target.cert.is_some() { "https" } else { "http" };
    let mut endpoint = Endpoint::from_shared(format!("{scheme}://{}", target.address))?.timeout(target.timeout);
    if let (Some(cert), Some(key), Some(ca)) = (&target.cert, &target.key, &target.cacert) {
        let host = target.address.rsplit_once(':').map(|(h, _)| h).unwrap_or(&target.address);
        let tls = ClientTlsConfig::new()
            .domain_name(host.trim_matches(['[', ']']))
            .identity(Identity::from_pem(std::fs::read(cert)?, std::fs::read(key)?))
            .ca_certificate(Certificate::from_pem(std::fs::read(ca)?));
        endpoint = endpoint.tls_config(tls)?;
    }
    Ok(CloudProviderClient::new(endpoint.connect().await?))
}

/// Runs one command and returns what to print.
pub async fn run(target: &Target, command: Command) -> Result<String, Box<dyn std::error::Error>> {
    let mut c = connect(target).await?;
    let out = match command {
        Command::NodeGroups => {
            let r = c.node_groups(pb::NodeGroupsRequest {}).await?.into_inner();
            let mut s = String::new();
            for g in r.node_groups {
                s.push_str(&format!("{}\tmin={}\tmax={}\t{}\n", g.id, g.min_size, g.max_size, g.debug));
            }
            s
        }
        Command::NodeGroupForNode { provider_id, name } => {
            let node = pb::ExternalGrpcNode { provider_id, name, ..Default::default() };
            let r = c.node_group_for_node(pb::NodeGroupForNodeRequest { node: Some(node) }).await?.into_inner();
            match r.node_group {
                Some(g) if !g.id.is_empty() => format!("{}\tmin={}\tmax={}\n", g.id, g.min_size, g.max_size),
                _ => "(not managed by this provider)\n".to_owned(),
            }
        }
        Command::TargetSize { group } => {
            let r = c.node_group_target_size(pb::NodeGroupTargetSizeRequest { id: group }).await?.into_inner();
            format!("{}\n", r.target_size)
        }
        Command::IncreaseSize { group, delta } => {
            c.node_group_increase_size(pb::NodeGroupIncreaseSizeRequest { id: group, delta }).await?;
            "ok\n".to_owned()
        }
        Command::DecreaseTargetSize { group, delta } => {
            c.node_group_decrease_target_size(pb::NodeGroupDecreaseTargetSizeRequest { id: group, delta }).await?;
            "ok\n".to_owned()
        }
        Command::DeleteNodes { group, provider_ids } => {
            let nodes = provider_ids
                .into_iter()
                .map(|id| pb::ExternalGrpcNode { name: id.clone(), provider_id: id, ..Default::default() })
                .collect();
            c.node_group_delete_nodes(pb::NodeGroupDeleteNodesRequest { id: group, nodes }).await?;
            "ok\n".to_owned()
        }
        Command::Nodes { group } => {
            let r = c.node_group_nodes(pb::NodeGroupNodesRequest { id: group }).await?.into_inner();
            let mut s = String::new();
            for i in r.instances {
                let status = i.status.unwrap_or_default();
                let state = pb::instance_status::InstanceState::try_from(status.instance_state)
                    .map(|s| s.as_str_name())
                    .unwrap_or("?");
                s.push_str(&format!("{}\t{state}", i.id));
                if let Some(e) = status.error_info {
                    s.push_str(&format!(
                        "\terror={} class={} {}",
                        e.error_code, e.instance_error_class, e.error_message
                    ));
                }
                s.push('\n');
            }
            s
        }
        Command::Template { group } => {
            let r =
                c.node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id: group }).await?.into_inner();
            let bytes = if r.node_bytes.is_empty() { r.node_info } else { r.node_bytes };
            let node = k8s::Node::decode(bytes.as_slice())?;
            serde_yaml::to_string(&crate::template::to_json(&node))?
        }
        Command::Options { group } => {
            let r = c
                .node_group_get_options(pb::NodeGroupAutoscalingOptionsRequest { id: group, defaults: None })
                .await?
                .into_inner();
            format!("{:#?}\n", r.node_group_autoscaling_options.unwrap_or_default())
        }
        Command::Refresh => {
            c.refresh(pb::RefreshRequest {}).await?;
            "ok\n".to_owned()
        }
        Command::Gpu => {
            let label = c.gpu_label(pb::GpuLabelRequest {}).await?.into_inner().label;
            let mut types: Vec<_> = c
                .get_available_gpu_types(pb::GetAvailableGpuTypesRequest {})
                .await?
                .into_inner()
                .gpu_types
                .into_keys()
                .collect();
            types.sort();
            format!("label: {label:?}\ntypes: {types:?}\n")
        }
        Command::Cleanup => {
            c.cleanup(pb::CleanupRequest {}).await?;
            "ok\n".to_owned()
        }
    };
    Ok(out)
}
