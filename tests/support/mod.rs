//! Shared helpers for the black-box tests: start a real server on loopback from TOML text and
//! talk to it with the generated gRPC client.
#![allow(dead_code, reason = "each test binary uses a different subset of the helpers")]

use std::{future::Future, path::Path, time::Duration};

use flotilla::{Running, config::Config, driver::SharedDriver, proto::externalgrpc as pb};
use tonic::transport::Channel;

pub mod faults;

pub type Client = CloudProviderClient<Channel>;
pub use flotilla::proto::externalgrpc::cloud_provider_client::CloudProviderClient;

/// Parses configuration text; listeners default to ephemeral loopback ports unless the text
/// sets them.
pub fn config(text: &str) -> Config {
    let text = if text.contains("[server]") {
        text.to_owned()
    } else {
        format!(
            "{text}\n[server]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nshutdown_grace = \"5s\"\n"
        )
    };
    Config::parse(&text, "test.toml", Path::new(".")).unwrap_or_else(|p| panic!("test config is invalid:\n{p}"))
}

/// Starts a server with the drivers the configuration names.
pub async fn start(text: &str) -> (Running, Client) {
    let config = config(text);
    let drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("drivers: {p}"));
    start_with(config, drivers).await
}

/// Starts a server with drivers the test built itself (to keep a handle on them).
pub async fn start_with(config: Config, drivers: Vec<SharedDriver>) -> (Running, Client) {
    let running = flotilla::start(config, drivers).await.expect("server starts");
    let client = connect(running.grpc_addr).await;
    (running, client)
}

pub async fn connect(addr: std::net::SocketAddr) -> Client {
    CloudProviderClient::connect(format!("http://{addr}")).await.expect("client connects")
}

/// Polls `check` every 20 ms until it returns `Some`, or panics after `limit` with `what`.
pub async fn eventually<T, F, Fut>(limit: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        if tokio::time::Instant::now() > deadline {
            panic!("timed out after {limit:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub async fn target_size(c: &mut Client, group: &str) -> i32 {
    c.node_group_target_size(pb::NodeGroupTargetSizeRequest { id: group.into() })
        .await
        .unwrap()
        .into_inner()
        .target_size
}

pub async fn increase(c: &mut Client, group: &str, delta: i32) -> Result<(), tonic::Status> {
    c.node_group_increase_size(pb::NodeGroupIncreaseSizeRequest { id: group.into(), delta }).await.map(|_| ())
}

pub async fn refresh(c: &mut Client) -> Result<(), tonic::Status> {
    c.refresh(pb::RefreshRequest {}).await.map(|_| ())
}

/// (provider id, state, error info) of every instance in a group, sorted by id.
pub async fn nodes(
    c: &mut Client,
    group: &str,
) -> Vec<(String, pb::instance_status::InstanceState, Option<pb::InstanceErrorInfo>)> {
    let r = c.node_group_nodes(pb::NodeGroupNodesRequest { id: group.into() }).await.unwrap().into_inner();
    let mut out: Vec<_> = r
        .instances
        .into_iter()
        .map(|i| {
            let s = i.status.unwrap_or_default();
            (i.id, pb::instance_status::InstanceState::try_from(s.instance_state).unwrap(), s.error_info)
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Ids of instances in `state`.
pub async fn ids_in(c: &mut Client, group: &str, state: pb::instance_status::InstanceState) -> Vec<String> {
    nodes(c, group).await.into_iter().filter(|(_, s, e)| *s == state && e.is_none()).map(|(id, _, _)| id).collect()
}

/// Deletes nodes as CA does: providerID and name set.
pub async fn delete(c: &mut Client, group: &str, ids: &[&str]) -> Result<(), tonic::Status> {
    let nodes = ids
        .iter()
        .map(|id| pb::ExternalGrpcNode { provider_id: (*id).into(), name: (*id).into(), ..Default::default() })
        .collect();
    c.node_group_delete_nodes(pb::NodeGroupDeleteNodesRequest { id: group.into(), nodes }).await.map(|_| ())
}

/// Refreshes until `group` has `n` running instances and nothing else; returns their ids.
pub async fn wait_running(c: &Client, group: &str, n: usize, limit: Duration) -> Vec<String> {
    eventually(limit, &format!("{n} running instances in {group}"), || {
        let mut c = c.clone();
        async move {
            let _ = refresh(&mut c).await;
            let all = nodes(&mut c, group).await;
            let running: Vec<_> = all
                .iter()
                .filter(|(_, s, e)| *s == pb::instance_status::InstanceState::InstanceRunning && e.is_none())
                .map(|(id, _, _)| id.clone())
                .collect();
            (running.len() == n && all.len() == n).then_some(running)
        }
    })
    .await
}
