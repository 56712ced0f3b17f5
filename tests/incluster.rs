//! Running beside a cluster, end to end over gRPC against the fake Kubernetes API: Node
//! cleanup (after the cloud confirms a machine gone, only the Node with its providerID), leader
//! election between two replicas (one serves, the other is not ready and answers UNAVAILABLE;
//! a leader cut off from the API stops and the other takes over from the clouds' state), and
//! the priority expander's ConfigMap written by the leader.

#[path = "fakes/kube/mod.rs"]
mod kube_fake;
#[path = "fakes/openstack/mod.rs"]
mod os_fake;
mod support;

use std::{sync::Arc, time::Duration};

use axum::http::Method;
use flotilla::{
    driver::{SharedDriver, simulated::Simulated},
    proto::externalgrpc::{self as pb, instance_status::InstanceState},
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const LIMIT: Duration = Duration::from_secs(20);
const SA: &str = "system:serviceaccount:kube-system:flotilla";

/// What the chart's RBAC grants Flotilla for Node cleanup.
const CLEANUP_RULES: &[(&str, &str)] = &[("get", "nodes"), ("list", "nodes"), ("delete", "nodes")];

async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    (buf.split(' ').nth(1).unwrap().parse().unwrap(), buf)
}

fn openstack_config(os: &os_fake::Fake, kubeconfig: &std::path::Path, node_cleanup: bool) -> String {
    format!(
        r#"cluster_name = "dev"
[state]
reconcile_interval = "1h"
[kubernetes]
kubeconfig = "{kubeconfig}"
[clouds.os]
driver = "openstack"
node_cleanup = {node_cleanup}
region_name = "RegionOne"
request_timeout = "2s"
{auth}[groups.workers]
cloud = "os"
max_size = 5
[groups.workers.machine]
flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
networks = ["k3s-net"]
"#,
        kubeconfig = kubeconfig.display(),
        auth = os.auth_table("os"),
    )
}

#[tokio::test]
async fn the_node_of_a_deleted_machine_goes_only_once_the_cloud_no_longer_lists_it() {
    let kube = kube_fake::Fake::start("t").await;
    kube.grant(SA, CLEANUP_RULES);
    let os = os_fake::Fake::start().await;
    os.set_build_time(Duration::ZERO);
    // Nova deletes asynchronously: the server stays listed (task_state deleting) for a while.
    os.set_delete_time(Duration::from_millis(1500));
    let dir = tempfile::tempdir().unwrap();
    let (server, mut c) = support::start(&openstack_config(&os, &kube.kubeconfig(dir.path(), "t"), true)).await;
    support::increase(&mut c, "workers", 1).await.unwrap();
    let id = support::wait_running(&c, "workers", 1, LIMIT).await.remove(0);
    let server_id = id.trim_start_matches("openstack:///").to_owned();
    let name = os.servers().into_iter().find(|s| s.id == server_id).unwrap().name;
    // The kubelet registered the machine's Node; the cluster also has Nodes Flotilla never made.
    kube.add_node(&name, &id, &[]);
    kube.add_node("static-1", "openstack:///not-ours", &[]);
    kube.add_node("bare-metal", "", &[]);

    support::delete(&mut c, "workers", &[&id]).await.unwrap();
    // Until the Node goes, refresh (as CA's loop does), and check at every step that the
    // Node never went while Nova still listed the server.
    support::eventually(LIMIT, "the node to be deleted", || {
        let mut c = c.clone();
        let (kube, os, name, server_id) = (kube.clone(), &os, name.clone(), server_id.clone());
        async move {
            let _ = support::refresh(&mut c).await;
            if kube.node(&name).is_some() {
                return None;
            }
            assert!(
                os.servers().iter().all(|s| s.id != server_id),
                "the node was deleted while the cloud still listed its server"
            );
            Some(())
        }
    })
    .await;
    assert_eq!(kube.node_names(), ["bare-metal", "static-1"], "only the deleted machine's Node went");
    let delete = kube.requests().into_iter().find(|r| r.method == Method::DELETE).unwrap();
    assert_eq!(delete.path(), format!("/api/v1/nodes/{name}"));
    assert!(delete.body["preconditions"]["uid"].is_string(), "deleted only if it is still the Node read");
    server.stop().await.unwrap();
    kube.assert_clean();
    os.assert_clean();
}

fn sim_config(kubeconfig: &std::path::Path, node_cleanup: bool, reconcile: &str) -> String {
    format!(
        "cluster_name = \"c\"\n[state]\nreconcile_interval = \"{reconcile}\"\n\
         [kubernetes]\nkubeconfig = \"{}\"\n\
         [clouds.sim]\ndriver = \"simulated\"\nnode_cleanup = {node_cleanup}\n\
         [groups.g]\ncloud = \"sim\"\nmax_size = 5\n",
        kubeconfig.display()
    )
}

async fn start_sim(text: &str) -> (flotilla::Running, support::Client, Arc<Simulated>) {
    let config = support::config(text);
    let sim = Arc::new(Simulated::new("c", Default::default()).unwrap());
    let (server, client) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
    (server, client, sim)
}

#[tokio::test]
async fn a_machine_already_gone_at_delete_has_its_node_found_by_provider_id_and_removed() {
    let kube = kube_fake::Fake::start("t").await;
    kube.grant(SA, CLEANUP_RULES);
    let dir = tempfile::tempdir().unwrap();
    let (server, mut c, sim) = start_sim(&sim_config(&kube.kubeconfig(dir.path(), "t"), true, "1h")).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let id = support::wait_running(&c, "g", 1, LIMIT).await.remove(0);
    let name = id.rsplit('/').next().unwrap().to_owned();
    // The Node has another name than the machine; a Node with the machine's name belongs to
    // someone else (its providerID says so).
    kube.add_node("renamed-by-kubelet", &id, &[]);
    kube.add_node(&name, "simulated://other-cluster/x", &[]);
    // Deleted outside Flotilla: the driver's delete answers NotFound, which is confirmation.
    sim.vanish(&name);
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::eventually(LIMIT, "the node to be deleted", || async {
        kube.node("renamed-by-kubelet").is_none().then_some(())
    })
    .await;
    assert_eq!(kube.node_names(), std::slice::from_ref(&name), "the Node named like the machine is not ours and stays");
    let calls = kube.calls();
    assert_eq!(
        calls,
        [
            format!("GET /api/v1/nodes/{name}"),
            "GET /api/v1/nodes".into(),
            "DELETE /api/v1/nodes/renamed-by-kubelet".into()
        ],
        "no listing was needed to confirm the machine gone, and one Node listing found its Node"
    );
    server.stop().await.unwrap();
    kube.assert_clean();
}

#[tokio::test]
async fn a_node_deletion_the_api_refuses_is_retried() {
    let kube = kube_fake::Fake::start("t").await;
    kube.grant(SA, CLEANUP_RULES);
    let dir = tempfile::tempdir().unwrap();
    let (server, mut c, sim) = start_sim(&sim_config(&kube.kubeconfig(dir.path(), "t"), true, "300ms")).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let id = support::wait_running(&c, "g", 1, LIMIT).await.remove(0);
    let name = id.rsplit('/').next().unwrap().to_owned();
    kube.add_node(&name, &id, &[]);
    kube.fail_next(Method::DELETE, "/api/v1/nodes/", 500, "InternalError");
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::eventually(LIMIT, "the node to be deleted", || async { kube.node(&name).is_none().then_some(()) }).await;
    let deletes = kube.requests().into_iter().filter(|r| r.method == Method::DELETE).count();
    assert_eq!(deletes, 2, "one refused, one retried");
    assert!(sim.machine_names().is_empty());
    server.stop().await.unwrap();
    kube.assert_clean();
}

#[tokio::test]
async fn without_node_cleanup_no_node_is_ever_touched() {
    let kube = kube_fake::Fake::start("t").await;
    let dir = tempfile::tempdir().unwrap();
    let (server, mut c, sim) = start_sim(&sim_config(&kube.kubeconfig(dir.path(), "t"), false, "200ms")).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let id = support::wait_running(&c, "g", 1, LIMIT).await.remove(0);
    kube.add_node("n", &id, &[]);
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::eventually(LIMIT, "the machine to go", || async { sim.machine_names().is_empty().then_some(()) }).await;
    // Several reconciles later, still nothing asked of the API.
    support::wait_running(&c, "g", 0, LIMIT).await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert!(kube.requests().is_empty(), "{:?}", kube.calls());
    assert_eq!(kube.node_names(), ["n"]);
    server.stop().await.unwrap();
}

// === leader election ===

/// What the chart's RBAC grants Flotilla for leader election and the priority expander.
const ELECTION_RULES: &[(&str, &str)] =
    &[("get", "leases"), ("create", "leases"), ("update", "leases"), ("create", "configmaps"), ("patch", "configmaps")];

fn replica_config(kubeconfig: &std::path::Path) -> String {
    format!(
        r#"cluster_name = "c"
[state]
reconcile_interval = "1h"
[kubernetes]
kubeconfig = "{}"
[leader_election]
enabled = true
namespace = "kube-system"
lease_duration = "2s"
renew_deadline = "1500ms"
retry_period = "250ms"
[priority_expander]
namespace = "kube-system"
[clouds.sim]
driver = "simulated"
[groups.onprem]
cloud = "sim"
max_size = 5
priority = 50
[groups.burst]
cloud = "sim"
max_size = 5
priority = 10
"#,
        kubeconfig.display()
    )
}

struct Replica {
    server: flotilla::Running,
    client: support::Client,
}

impl Replica {
    async fn ready(&self) -> bool {
        http_get(self.server.http_addr.unwrap(), "/readyz").await.0 == 200
    }

    async fn health(&self) -> i32 {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.server.grpc_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut health = tonic_health::pb::health_client::HealthClient::new(channel);
        health.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await.unwrap().into_inner().status
    }
}

/// Two replicas on one (shared) cloud, each with its own token for the fake API.
async fn two_replicas(kube: &kube_fake::Fake, dir: &std::path::Path) -> (Replica, Replica, Arc<Simulated>) {
    let sim = Arc::new(Simulated::new("c", Default::default()).unwrap());
    let mut replicas = Vec::new();
    for token in ["token-a", "token-b"] {
        let sub = dir.join(token);
        std::fs::create_dir_all(&sub).unwrap();
        kube.add_token(token, &format!("{SA}-{token}"));
        kube.grant(&format!("{SA}-{token}"), ELECTION_RULES);
        let config = support::config(&replica_config(&kube.kubeconfig(&sub, token)));
        let (server, client) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
        replicas.push(Replica { server, client });
    }
    let b = replicas.pop().unwrap();
    let a = replicas.pop().unwrap();
    (a, b, sim)
}

#[tokio::test]
async fn of_two_replicas_one_leads_and_the_other_is_not_ready_and_serves_nothing() {
    let kube = kube_fake::Fake::start("unused").await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, _sim) = two_replicas(&kube, dir.path()).await;
    let (leader, follower) = support::eventually(LIMIT, "one replica to lead and be ready", || async {
        match (a.ready().await, b.ready().await) {
            (true, false) => Some((&a, &b)),
            (false, true) => Some((&b, &a)),
            _ => None,
        }
    })
    .await;
    let mut lc = leader.client.clone();
    support::increase(&mut lc, "onprem", 2).await.unwrap();
    assert_eq!(support::target_size(&mut lc, "onprem").await, 2);

    // The follower: not ready, naming the leader (once it has read the Lease) ...
    let follower_http = follower.server.http_addr.unwrap();
    let body = support::eventually(LIMIT, "the follower to name the leader", || async {
        let (code, body) = http_get(follower_http, "/readyz").await;
        assert_eq!(code, 503);
        body.contains("following: the leader is ").then_some(body)
    })
    .await;
    assert!(body.contains("not ready"), "{body}");
    // ... and every CloudProvider call is UNAVAILABLE, naming the leader.
    let mut fc = follower.client.clone();
    let status = fc.node_groups(pb::NodeGroupsRequest {}).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.message().contains("not the leader (the leader is "), "{}", status.message());
    let status = support::increase(&mut fc, "onprem", 1).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    assert_eq!(follower.health().await, not_serving);
    let serving = tonic_health::pb::health_check_response::ServingStatus::Serving as i32;
    support::eventually(LIMIT, "the leader's gRPC health to be SERVING", || async {
        (leader.health().await == serving).then_some(())
    })
    .await;
    let metrics = http_get(follower.server.http_addr.unwrap(), "/metrics").await.1;
    assert!(metrics.contains("flotilla_leader 0"), "{metrics}");

    // The leader wrote cluster-autoscaler's priority expander configuration.
    let cm = support::eventually(LIMIT, "the priority expander configmap", || async {
        kube.config_map("kube-system", "cluster-autoscaler-priority-expander")
    })
    .await;
    assert_eq!(cm["data"]["priorities"], "50:\n  - ^onprem$\n10:\n  - ^burst$\n");
    let lease = kube.lease("kube-system", "flotilla-c").expect("the lease exists");
    assert!(lease["spec"]["holderIdentity"].as_str().unwrap().contains('_'));
    a.server.stop().await.unwrap();
    b.server.stop().await.unwrap();
    kube.assert_clean();
}

#[tokio::test]
async fn a_leader_cut_off_from_the_api_stops_and_the_other_takes_over_from_the_clouds_state() {
    let kube = kube_fake::Fake::start("unused").await;
    let dir = tempfile::tempdir().unwrap();
    let (a, b, sim) = two_replicas(&kube, dir.path()).await;
    let a_leads = support::eventually(LIMIT, "one replica to lead", || async {
        match (a.ready().await, b.ready().await) {
            (true, false) => Some(true),
            (false, true) => Some(false),
            _ => None,
        }
    })
    .await;
    let (leader, follower, leader_token) = if a_leads { (&a, &b, "token-a") } else { (&b, &a, "token-b") };
    let mut lc = leader.client.clone();
    support::increase(&mut lc, "onprem", 3).await.unwrap();
    support::wait_running(&lc, "onprem", 3, LIMIT).await;

    // The leader's credentials stop working (a partition, a revoked token): it cannot renew.
    kube.revoke_token(leader_token);
    support::eventually(LIMIT, "the old leader to stop", || async {
        let mut c = leader.client.clone();
        let r = c.node_groups(pb::NodeGroupsRequest {}).await;
        (r.err().map(|s| s.code()) == Some(tonic::Code::Unavailable)).then_some(())
    })
    .await;
    assert!(!leader.ready().await);
    // The other replica takes over and rebuilds the state from the cloud: same three machines.
    let mut fc = follower.client.clone();
    support::eventually(LIMIT, "the other replica to lead", || async { follower.ready().await.then_some(()) }).await;
    let ids = support::wait_running(&fc, "onprem", 3, LIMIT).await;
    assert_eq!(ids.len(), 3);
    assert_eq!(support::target_size(&mut fc, "onprem").await, 3);
    assert_eq!(sim.machine_names().len(), 3, "nothing leaked or duplicated");
    let nodes = support::nodes(&mut fc, "onprem").await;
    assert!(nodes.iter().all(|(_, s, e)| *s == InstanceState::InstanceRunning && e.is_none()));
    a.server.stop().await.unwrap();
    b.server.stop().await.unwrap();
}

#[tokio::test]
async fn the_priority_configmap_needs_create_as_well_as_patch_until_it_exists() {
    let kube = kube_fake::Fake::start("t").await;
    kube.grant(SA, &[("patch", "configmaps")]);
    let dir = tempfile::tempdir().unwrap();
    let api = flotilla::kube::Client::new(flotilla::kube::Settings {
        kubeconfig: Some(kube.kubeconfig(dir.path(), "t")),
        timeout: None,
    });
    let data = std::collections::BTreeMap::from([("priorities".to_owned(), "1:\n  - ^a$\n".to_owned())]);
    let labels = std::collections::BTreeMap::new();
    let err = api.apply_config_map("kube-system", "cluster-autoscaler-priority-expander", &labels, &data).await;
    assert_eq!(err.unwrap_err().code(), Some(403), "patch alone cannot create it");
    kube.put_config_map("kube-system", "cluster-autoscaler-priority-expander", &[("priorities", "0:\n  - .*\n")]);
    api.apply_config_map("kube-system", "cluster-autoscaler-priority-expander", &labels, &data)
        .await
        .expect("patch suffices once it exists");
}

#[tokio::test]
async fn a_delete_a_previous_process_accepted_still_ends_with_its_node_removed() {
    let kube = kube_fake::Fake::start("t").await;
    kube.grant(SA, CLEANUP_RULES);
    let dir = tempfile::tempdir().unwrap();
    let kubeconfig = kube.kubeconfig(dir.path(), "t");
    let state = dir.path().join("cloud.json");
    let text = |faults: &str| {
        sim_config(&kubeconfig, true, "1h").replace(
            "node_cleanup = true\n",
            &format!("node_cleanup = true\nstate_file = \"{}\"\n{faults}", state.display()),
        )
    };
    // The first process marks the machine for deletion, then its delete hangs and it dies.
    let first = support::config(&text("[clouds.sim.faults]\ndelete = [\"hang\"]\n"));
    let drivers = flotilla::build_drivers(&first).unwrap();
    let (server, mut c) = support::start_with(first, drivers).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let id = support::wait_running(&c, "g", 1, LIMIT).await.remove(0);
    let name = id.rsplit('/').next().unwrap().to_owned();
    kube.add_node(&name, &id, &[]);
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    drop(c);
    server.shutdown_token().cancel();
    drop(server);
    assert_eq!(kube.node_names(), std::slice::from_ref(&name), "nothing deleted it yet");

    // The next process finds the machine marked, finishes the delete, and its Node goes once a
    // listing shows the machine gone.
    let (server, c) = support::start(&text("")).await;
    support::eventually(LIMIT, "the node to be deleted", || {
        let mut c = c.clone();
        let kube = kube.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            kube.node_names().is_empty().then_some(())
        }
    })
    .await;
    server.stop().await.unwrap();
    kube.assert_clean();
}
