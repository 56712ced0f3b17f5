//! The behaviour cluster-autoscaler depends on, tested over real gRPC on loopback against the
//! simulated cloud. One test per contract clause; names say the clause.

mod support;

use std::{sync::Arc, time::Duration};

use flotilla::{
    driver::{SharedDriver, simulated},
    proto::externalgrpc::{self as pb, instance_status::InstanceState},
};
use prost::Message;
use support::{Client, delete, eventually, increase, nodes, refresh, target_size};
use tonic::Code;

const LONG: Duration = Duration::from_secs(10);

/// Two groups on one simulated cloud; `extra` is appended to the cloud table.
fn config_text(cloud_extra: &str) -> String {
    format!(
        r#"
cluster_name = "t"
[state]
refresh_timeout = "2s"
max_staleness = "5s"
[clouds.sim]
driver = "simulated"
{cloud_extra}
[groups.small]
cloud = "sim"
min_size = 0
max_size = 5
price_per_hour = 0.4
[groups.small.template]
cpu = "4"
memory = "16Gi"
gpus = 1
gpu_type = "nvidia-t4"
instance_type = "sim.small"
zone = "zone-a"
labels = {{ pool = "small" }}
taints = [{{ key = "dedicated", value = "ci", effect = "NoSchedule" }}]
reserved = {{ cpu = "100m", memory = "256Mi" }}
[groups.small.options]
scale_down_unneeded_time = "30s"
[groups.guarded]
cloud = "sim"
min_size = 1
max_size = 3
[gpu]
label = "example.com/gpu-type"
"#
    )
}

async fn start(cloud_extra: &str) -> (flotilla::Running, Client) {
    support::start(&config_text(cloud_extra)).await
}

/// Starts a server whose simulated driver the test keeps, to inject faults.
async fn start_with_handle(cloud_extra: &str) -> (flotilla::Running, Client, Arc<simulated::Simulated>) {
    let config = support::config(&config_text(cloud_extra));
    let mut p = flotilla::config::Problems::default();
    let table = config.raw["clouds"]["sim"].as_table().unwrap().clone();
    let mut section = flotilla::config::Section::new("clouds.sim", &table).skipping(flotilla::config::CLOUD_KEYS);
    let settings = simulated::Settings::parse(&mut section, &mut p);
    assert!(p.is_empty(), "{p}");
    let sim = Arc::new(simulated::Simulated::new("t", settings).unwrap());
    let (server, client) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
    (server, client, sim)
}

/// Starts a server over a simulated cloud the test already holds (faults set before start).
async fn start_over(cloud_extra: &str, sim: &Arc<simulated::Simulated>) -> (flotilla::Running, Client) {
    support::start_with(support::config(&config_text(cloud_extra)), vec![Arc::clone(sim) as SharedDriver]).await
}

fn code<T: std::fmt::Debug>(r: Result<T, tonic::Status>) -> (Code, String) {
    let s = r.expect_err("expected an error status");
    (s.code(), s.message().to_owned())
}

// === NodeGroups / NodeGroupForNode ===

#[tokio::test]
async fn node_groups_lists_every_group_with_min_max_and_debug() {
    let (server, mut c) = start("").await;
    let groups = c.node_groups(pb::NodeGroupsRequest {}).await.unwrap().into_inner().node_groups;
    let summary: Vec<_> = groups.iter().map(|g| (g.id.as_str(), g.min_size, g.max_size)).collect();
    assert_eq!(summary, [("small", 0, 5), ("guarded", 1, 3)]);
    assert!(groups.iter().all(|g| g.debug.contains("cloud=sim")));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn node_group_for_node_finds_managed_nodes_and_ignores_others() {
    let (server, mut c) = start("").await;
    increase(&mut c, "small", 1).await.unwrap();
    let ids = support::wait_running(&c, "small", 1, LONG).await;
    let ask = |provider_id: &str, name: &str| pb::NodeGroupForNodeRequest {
        node: Some(pb::ExternalGrpcNode { provider_id: provider_id.into(), name: name.into(), ..Default::default() }),
    };
    // A real node.
    let g = c.node_group_for_node(ask(&ids[0], "some-node")).await.unwrap().into_inner().node_group.unwrap();
    assert_eq!((g.id.as_str(), g.min_size, g.max_size), ("small", 0, 5));
    // A fake node CA builds for an unregistered instance: name = providerID = instance id.
    let g = c.node_group_for_node(ask(&ids[0], &ids[0])).await.unwrap().into_inner().node_group.unwrap();
    assert_eq!(g.id, "small");
    // The control plane, or a node of another provider: OK with an empty group.
    for (pid, name) in [("", "control-plane"), ("aws:///i-123", "ip-10-0-0-1"), ("simulated://other/x", "x")] {
        let g = c.node_group_for_node(ask(pid, name)).await.unwrap().into_inner().node_group.unwrap();
        assert_eq!(g.id, "", "{pid}");
    }
    server.stop().await.unwrap();
}

// === IncreaseSize ===

#[tokio::test]
async fn increase_size_rejects_bad_deltas_unknown_groups_and_overflow() {
    let (server, mut c) = start("").await;
    assert_eq!(code(increase(&mut c, "small", 0).await).0, Code::InvalidArgument);
    assert_eq!(code(increase(&mut c, "small", -2).await).0, Code::InvalidArgument);
    assert_eq!(code(increase(&mut c, "nope", 1).await).0, Code::NotFound);
    increase(&mut c, "small", 2).await.unwrap();
    let (status, message) = code(increase(&mut c, "small", 4).await);
    assert_eq!(status, Code::InvalidArgument);
    assert!(
        message.contains("current size 2") && message.contains("by 4") && message.contains("max size 5"),
        "{message}"
    );
    assert_eq!(code(increase(&mut c, "small", i32::MAX).await).0, Code::InvalidArgument);
    assert_eq!(target_size(&mut c, "small").await, 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn increase_size_returns_at_once_and_target_counts_machines_being_created() {
    // Creates take an hour: the RPC must not wait for them.
    let (server, mut c) = start("create_latency = \"1h\"").await;
    tokio::time::timeout(Duration::from_secs(4), increase(&mut c, "small", 3)).await.expect("returns at once").unwrap();
    assert_eq!(target_size(&mut c, "small").await, 3);
    let all = nodes(&mut c, "small").await;
    assert_eq!(all.len(), 3);
    assert!(all.iter().all(|(_, s, e)| *s == InstanceState::InstanceCreating && e.is_none()));
    server.shutdown_token().cancel();
}

#[tokio::test]
async fn concurrent_increases_never_pass_max_size() {
    let (server, c) = start("create_latency = \"50ms\"").await;
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..20 {
        let mut c = c.clone();
        set.spawn(async move { increase(&mut c, "small", 1).await.is_ok() });
    }
    let accepted = set.join_all().await.into_iter().filter(|ok| *ok).count();
    assert_eq!(accepted, 5);
    let mut c = c.clone();
    assert_eq!(target_size(&mut c, "small").await, 5);
    support::wait_running(&c, "small", 5, LONG).await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn create_concurrency_bounds_creates_in_flight() {
    let (server, mut c, sim) = start_with_handle("create_concurrency = 2\ncreate_latency = \"200ms\"").await;
    increase(&mut c, "small", 5).await.unwrap();
    support::wait_running(&c, "small", 5, LONG).await;
    assert_eq!(sim.peak_concurrent_creates(), 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn after_a_restart_increase_size_waits_for_the_first_listing() {
    let dir = tempfile::tempdir().unwrap();
    let state = format!("state_file = {:?}", dir.path().join("sim.json").display().to_string());
    let (server, mut c) = start(&state).await;
    increase(&mut c, "small", 4).await.unwrap();
    support::wait_running(&c, "small", 4, LONG).await;
    server.stop().await.unwrap();

    // Restarted, with a cloud whose listings take a second: the first IncreaseSize arrives
    // before any listing finished, and must be checked against the 4 machines, not 0.
    let (server, mut c) = start(&format!("{state}\nlist_latency = \"1s\"")).await;
    let (status, message) = code(increase(&mut c, "small", 4).await);
    assert_eq!(status, Code::InvalidArgument, "{message}");
    assert!(message.contains("current size 4"), "{message}");
    assert_eq!(target_size(&mut c, "small").await, 4);
    increase(&mut c, "small", 1).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 5);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn sizing_calls_answer_unavailable_until_the_cloud_could_be_listed_once() {
    let sim = Arc::new(simulated::Simulated::new("t", simulated::Settings::default()).unwrap());
    sim.set_outage(true);
    let (server, mut c) = start_over("", &sim).await;
    let (status, message) = code(increase(&mut c, "small", 1).await);
    assert_eq!(status, Code::Unavailable);
    assert!(message.contains("not been listed"), "{message}");
    let (status, _) = code(c.node_group_target_size(pb::NodeGroupTargetSizeRequest { id: "small".into() }).await);
    assert_eq!(status, Code::Unavailable);
    let ask = pb::NodeGroupForNodeRequest {
        node: Some(pb::ExternalGrpcNode { provider_id: "simulated://t/x".into(), ..Default::default() }),
    };
    assert_eq!(code(c.node_group_for_node(ask.clone()).await).0, Code::Unavailable);
    assert_eq!(code(delete(&mut c, "small", &["simulated://t/x"]).await).0, Code::Unavailable);
    sim.set_outage(false);
    increase(&mut c, "small", 1).await.unwrap();
    assert_eq!(c.node_group_for_node(ask).await.unwrap().into_inner().node_group.unwrap().id, "");
    server.stop().await.unwrap();
}

// === failed creates ===

#[tokio::test]
async fn a_failed_create_is_reported_as_creating_with_error_info_and_class() {
    let (server, mut c, sim) = start_with_handle("").await;
    sim.fail_next_creates_with_quota(1);
    increase(&mut c, "small", 1).await.unwrap();
    let failed = eventually(LONG, "a failed instance", || {
        let mut c = c.clone();
        async move { nodes(&mut c, "small").await.into_iter().find(|(_, _, e)| e.is_some()) }
    })
    .await;
    assert_eq!(failed.1, InstanceState::InstanceCreating);
    let info = failed.2.unwrap();
    assert_eq!(info.instance_error_class, 1, "quota is OutOfResources");
    assert_eq!(info.error_code, "OUT_OF_RESOURCES");
    // CA then deletes it, which lowers the target at once; the next listing shows the cloud
    // kept nothing of it, and it is gone.
    assert_eq!(target_size(&mut c, "small").await, 1);
    delete(&mut c, "small", &[&failed.0]).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 0);
    assert!(nodes(&mut c, "small").await.iter().all(|(_, s, e)| *s == InstanceState::InstanceDeleting && e.is_none()));
    refresh(&mut c).await.unwrap();
    assert!(nodes(&mut c, "small").await.is_empty());
    delete(&mut c, "small", &[&failed.0]).await.expect("a repeated delete is a no-op");
    server.stop().await.unwrap();
}

#[tokio::test]
async fn other_create_errors_are_class_other() {
    let (server, mut c) = start("fail_every = 1").await;
    increase(&mut c, "small", 2).await.unwrap();
    let infos = eventually(LONG, "two failed instances", || {
        let mut c = c.clone();
        async move {
            let failed: Vec<_> = nodes(&mut c, "small").await.into_iter().filter_map(|(_, _, e)| e).collect();
            (failed.len() == 2).then_some(failed)
        }
    })
    .await;
    assert!(infos.iter().all(|i| i.instance_error_class == 99));
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_quota_in_the_simulated_cloud_fails_creates_past_it() {
    let (server, mut c) = start("quota = 2").await;
    increase(&mut c, "small", 3).await.unwrap();
    let states = eventually(LONG, "two running and one failed", || {
        let mut c = c.clone();
        async move {
            let _ = refresh(&mut c).await;
            let all = nodes(&mut c, "small").await;
            let running = all.iter().filter(|(_, s, e)| *s == InstanceState::InstanceRunning && e.is_none()).count();
            let failed: Vec<_> = all.iter().filter_map(|(_, _, e)| e.clone()).collect();
            (running == 2 && failed.len() == 1).then_some(failed)
        }
    })
    .await;
    assert_eq!(states[0].instance_error_class, 1);
    server.stop().await.unwrap();
}

// === DeleteNodes ===

#[tokio::test]
async fn delete_nodes_deletes_nothing_unless_every_node_belongs_to_the_group() {
    let (server, mut c) = start("").await;
    increase(&mut c, "small", 2).await.unwrap();
    increase(&mut c, "guarded", 2).await.unwrap();
    let small = support::wait_running(&c, "small", 2, LONG).await;
    let guarded = support::wait_running(&c, "guarded", 2, LONG).await;
    for bad in [vec![small[0].as_str(), "simulated://t/not-ours"], vec![small[0].as_str(), guarded[0].as_str()]] {
        let (status, message) = code(delete(&mut c, "small", &bad).await);
        assert_eq!(status, Code::InvalidArgument);
        assert!(message.contains(bad[1]), "{message}");
    }
    assert_eq!(target_size(&mut c, "small").await, 2);
    assert_eq!(nodes(&mut c, "small").await.len(), 2);
    assert_eq!(code(delete(&mut c, "nope", &[&small[0]]).await).0, Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn delete_nodes_lowers_the_target_and_is_idempotent() {
    let (server, mut c) = start("delete_latency = \"100ms\"").await;
    increase(&mut c, "small", 3).await.unwrap();
    let ids = support::wait_running(&c, "small", 3, LONG).await;
    delete(&mut c, "small", &[&ids[0], &ids[1]]).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 1);
    // Repeated while the delete runs, and again after it finished: no further change.
    delete(&mut c, "small", &[&ids[0]]).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 1);
    support::wait_running(&c, "small", 1, LONG).await;
    delete(&mut c, "small", &[&ids[0], &ids[1]]).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn delete_nodes_never_goes_below_min_size() {
    let (server, mut c) = start("").await;
    increase(&mut c, "guarded", 2).await.unwrap();
    let ids = support::wait_running(&c, "guarded", 2, LONG).await;
    let (status, message) = code(delete(&mut c, "guarded", &[&ids[0], &ids[1]]).await);
    assert_eq!(status, Code::FailedPrecondition);
    assert!(message.contains("min size 1"), "{message}");
    assert_eq!(target_size(&mut c, "guarded").await, 2);
    delete(&mut c, "guarded", &[&ids[0]]).await.unwrap();
    assert_eq!(target_size(&mut c, "guarded").await, 1);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn deleting_a_machine_still_being_created_leaks_nothing() {
    let (server, mut c, sim) = start_with_handle("create_latency = \"300ms\"").await;
    increase(&mut c, "small", 1).await.unwrap();
    let (id, _, _) = nodes(&mut c, "small").await.remove(0);
    delete(&mut c, "small", &[&id]).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 0);
    // The create finishes in the cloud, then Flotilla removes it.
    eventually(LONG, "the machine to be created and removed", || {
        let sim = Arc::clone(&sim);
        let server = &server;
        async move {
            (server.metrics.driver_calls("sim", "simulated", "create") == 1 && sim.machine_names().is_empty())
                .then_some(())
        }
    })
    .await;
    server.stop().await.unwrap();
}

// === DecreaseTargetSize ===

#[tokio::test]
async fn decrease_target_size_only_cancels_capacity_not_yet_created() {
    let (server, mut c, sim) = start_with_handle("create_concurrency = 1\ncreate_latency = \"1h\"").await;
    let decrease = |delta| pb::NodeGroupDecreaseTargetSizeRequest { id: "small".into(), delta };
    assert_eq!(code(c.node_group_decrease_target_size(decrease(0)).await).0, Code::InvalidArgument);
    assert_eq!(code(c.node_group_decrease_target_size(decrease(1)).await).0, Code::InvalidArgument);
    increase(&mut c, "small", 3).await.unwrap();
    c.node_group_decrease_target_size(decrease(-2)).await.unwrap();
    assert_eq!(target_size(&mut c, "small").await, 1);
    // The two cancelled never reached the cloud; the one create in flight did.
    assert_eq!(sim.machine_names().len(), 1);
    server.shutdown_token().cancel();

    // Existing machines are never removed by DecreaseTargetSize.
    let (server, mut c) = start("").await;
    increase(&mut c, "small", 2).await.unwrap();
    support::wait_running(&c, "small", 2, LONG).await;
    let (status, message) = code(c.node_group_decrease_target_size(decrease(-1)).await);
    assert_eq!(status, Code::InvalidArgument);
    assert!(message.contains("only 0"), "{message}");
    assert_eq!(target_size(&mut c, "small").await, 2);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn decrease_target_size_never_goes_below_min_size() {
    let (server, mut c) = start("create_latency = \"1h\"\ncreate_concurrency = 1").await;
    let decrease = |delta| pb::NodeGroupDecreaseTargetSizeRequest { id: "guarded".into(), delta };
    increase(&mut c, "guarded", 2).await.unwrap();
    let (status, message) = code(c.node_group_decrease_target_size(decrease(-2)).await);
    assert_eq!(status, Code::FailedPrecondition, "{message}");
    assert!(message.contains("min size 1"), "{message}");
    assert_eq!(target_size(&mut c, "guarded").await, 2);
    c.node_group_decrease_target_size(decrease(-1)).await.unwrap();
    assert_eq!(target_size(&mut c, "guarded").await, 1);
    server.shutdown_token().cancel();
}

// === caller input ===

#[tokio::test]
async fn caller_text_comes_back_escaped_and_bounded() {
    let (server, mut c) = start("").await;
    let forged = "simulated://t/x\nINFO flotilla: forged line";
    let huge = "y".repeat(1 << 20);
    let many: Vec<String> = (0..1000).map(|i| format!("simulated://t/n{i}")).collect();
    let mut ids = vec![forged, huge.as_str()];
    ids.extend(many.iter().map(String::as_str));
    let (status, message) = code(delete(&mut c, "small", &ids).await);
    assert_eq!(status, Code::InvalidArgument);
    assert!(!message.contains('\n') && message.contains("x\\nINFO"), "{message}");
    assert!(message.len() < 2048, "{} bytes", message.len());
    assert!(message.contains("and 997 more"), "{message}");
    let (status, message) = code(increase(&mut c, &format!("no\ngroup{huge}"), 1).await);
    assert_eq!(status, Code::NotFound);
    assert!(!message.contains('\n') && message.len() < 512, "{message}");
    server.stop().await.unwrap();
}

// === NodeGroupNodes / Refresh ===

#[tokio::test]
async fn nodes_report_creating_then_running_then_deleting() {
    let (server, mut c) = start("boot_time = \"300ms\"\ndelete_latency = \"300ms\"").await;
    increase(&mut c, "small", 1).await.unwrap();
    assert_eq!(nodes(&mut c, "small").await[0].1, InstanceState::InstanceCreating);
    let ids = support::wait_running(&c, "small", 1, LONG).await;
    delete(&mut c, "small", &[&ids[0]]).await.unwrap();
    assert_eq!(nodes(&mut c, "small").await[0].1, InstanceState::InstanceDeleting);
    eventually(LONG, "the instance to go", || {
        let mut c = c.clone();
        async move { nodes(&mut c, "small").await.is_empty().then_some(()) }
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test]
async fn refresh_lists_each_cloud_once_and_survives_a_short_outage() {
    let (server, mut c, sim) = start_with_handle("").await;
    increase(&mut c, "small", 4).await.unwrap();
    support::wait_running(&c, "small", 4, LONG).await;
    let before = server.metrics.driver_calls("sim", "simulated", "list");
    refresh(&mut c).await.unwrap();
    assert_eq!(server.metrics.driver_calls("sim", "simulated", "list") - before, 1, "one listing per Refresh");

    // The cloud goes down: Refresh keeps answering OK from fresh state...
    sim.set_outage(true);
    refresh(&mut c).await.expect("state younger than max_staleness is still good");
    assert_eq!(target_size(&mut c, "small").await, 4);
    // ...until the state is older than max_staleness (5 s here).
    let status = eventually(Duration::from_secs(20), "Refresh to report stale state", || {
        let mut c = c.clone();
        async move { refresh(&mut c).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable);
    assert!(
        status.message().contains("stale") && status.message().contains("simulated outage"),
        "{}",
        status.message()
    );
    sim.set_outage(false);
    refresh(&mut c).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
async fn machines_outlive_a_restart_and_foreign_machines_are_never_touched() {
    let dir = tempfile::tempdir().unwrap();
    let state = dir.path().join("sim.json");
    let extra = format!("state_file = {:?}", state.display().to_string());
    let (server, mut c, sim) = start_with_handle(&extra).await;
    sim.insert_foreign("other-cluster", "small", "stranger");
    increase(&mut c, "small", 2).await.unwrap();
    let before = support::wait_running(&c, "small", 2, LONG).await;
    server.stop().await.unwrap();

    let (server, c) = start(&extra).await;
    let after = support::wait_running(&c, "small", 2, LONG).await;
    assert_eq!(before, after);
    assert_eq!(server.metrics.driver_calls("sim", "simulated", "create"), 0);
    let mut c = c.clone();
    assert_eq!(code(delete(&mut c, "small", &["simulated://other-cluster/stranger"]).await).0, Code::InvalidArgument);
    server.stop().await.unwrap();
    assert!(std::fs::read_to_string(&state).unwrap().contains("stranger"));
}

// === Template, options, GPU, pricing ===

#[tokio::test]
async fn template_node_info_carries_capacity_labels_taints_and_ready_in_both_fields() {
    let (server, mut c) = start("").await;
    let r = c
        .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id: "small".into() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_info, r.node_bytes, "both protocol generations get the same node");
    // Decoded with independently generated Kubernetes types, as CA's Go code would.
    let node = k8s_pb::api::core::v1::Node::decode(r.node_bytes.as_slice()).unwrap();
    let status = node.status.unwrap();
    let q = |m: &std::collections::BTreeMap<String, k8s_pb::apimachinery::pkg::api::resource::Quantity>, k: &str| {
        m.get(k).and_then(|q| q.string.clone()).unwrap_or_default()
    };
    assert_eq!(q(&status.capacity, "cpu"), "4");
    assert_eq!(q(&status.capacity, "memory"), "16Gi");
    assert_eq!(q(&status.capacity, "pods"), "110");
    assert_eq!(q(&status.capacity, "nvidia.com/gpu"), "1");
    assert_eq!(q(&status.capacity, "ephemeral-storage"), "20Gi");
    assert_eq!(q(&status.allocatable, "cpu"), "3900m");
    assert_eq!(q(&status.allocatable, "memory"), "16128Mi");
    let ready = status.conditions.iter().find(|c| c.r#type.as_deref() == Some("Ready")).unwrap();
    assert_eq!(ready.status.as_deref(), Some("True"));
    let labels = node.metadata.unwrap().labels;
    for (k, v) in [
        ("kubernetes.io/os", "linux"),
        ("kubernetes.io/arch", "amd64"),
        ("node.kubernetes.io/instance-type", "sim.small"),
        ("topology.kubernetes.io/zone", "zone-a"),
        ("pool", "small"),
        ("example.com/gpu-type", "nvidia-t4"),
    ] {
        assert_eq!(labels.get(k).map(String::as_str), Some(v), "{k}");
    }
    let taint = &node.spec.unwrap().taints[0];
    assert_eq!(
        (taint.key.as_deref(), taint.value.as_deref(), taint.effect.as_deref()),
        (Some("dedicated"), Some("ci"), Some("NoSchedule"))
    );
    server.stop().await.unwrap();
}

#[tokio::test]
async fn get_options_overrides_only_what_is_configured_and_is_unimplemented_otherwise() {
    let (server, mut c) = start("").await;
    let defaults = pb::NodeGroupAutoscalingOptions {
        scale_down_utilization_threshold: 0.7,
        scale_down_gpu_utilization_threshold: 0.8,
        max_node_provision_duration: Some(prost_types::Duration { seconds: 900, nanos: 0 }),
        scale_down_unneeded_duration: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
        scale_down_unready_duration: Some(prost_types::Duration { seconds: 1200, nanos: 0 }),
        ..Default::default()
    };
    let ask = |id: &str| pb::NodeGroupAutoscalingOptionsRequest { id: id.into(), defaults: Some(defaults) };
    let o = c.node_group_get_options(ask("small")).await.unwrap().into_inner().node_group_autoscaling_options.unwrap();
    assert_eq!(o.scale_down_utilization_threshold, 0.7);
    assert_eq!(o.scale_down_unneeded_duration.unwrap().seconds, 30);
    assert_eq!(o.scale_down_unneeded_time.unwrap().duration, 30_000_000_000);
    assert_eq!(o.max_node_provision_duration.unwrap().seconds, 900);
    assert_eq!(o.max_node_provision_time.unwrap().duration, 900_000_000_000);
    assert_eq!(o.scale_down_unready_time.unwrap().duration, 1_200_000_000_000);
    assert_eq!(code(c.node_group_get_options(ask("guarded")).await).0, Code::Unimplemented);
    assert_eq!(code(c.node_group_get_options(ask("nope")).await).0, Code::NotFound);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn gpu_rpcs_always_answer() {
    let (server, mut c) = start("").await;
    assert_eq!(c.gpu_label(pb::GpuLabelRequest {}).await.unwrap().into_inner().label, "example.com/gpu-type");
    let types = c.get_available_gpu_types(pb::GetAvailableGpuTypesRequest {}).await.unwrap().into_inner().gpu_types;
    assert_eq!(types.keys().collect::<Vec<_>>(), ["nvidia-t4"]);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn pricing_uses_group_prices_and_is_unimplemented_without_any() {
    let (server, mut c) = start("").await;
    increase(&mut c, "small", 1).await.unwrap();
    let ids = support::wait_running(&c, "small", 1, LONG).await;
    let two_hours = (
        Some(prost_types::Timestamp { seconds: 0, nanos: 0 }),
        Some(prost_types::Timestamp { seconds: 7200, nanos: 0 }),
    );
    let node_price = |provider_id: &str, name: &str| pb::PricingNodePriceRequest {
        node: Some(pb::ExternalGrpcNode { provider_id: provider_id.into(), name: name.into(), ..Default::default() }),
        start_timestamp: two_hours.0,
        end_timestamp: two_hours.1,
        ..Default::default()
    };
    let price = c.pricing_node_price(node_price(&ids[0], "n")).await.unwrap().into_inner().price;
    assert!((price - 0.8).abs() < 1e-9, "{price}");
    // A template node as CA names it after sanitising.
    let price = c.pricing_node_price(node_price("", "template-node-for-small-1234")).await.unwrap().into_inner().price;
    assert!((price - 0.8).abs() < 1e-9, "{price}");
    assert_eq!(code(c.pricing_node_price(node_price("", "control-plane")).await).0, Code::NotFound);
    // Old CAs send the period in fields 2/3.
    let old = pb::PricingNodePriceRequest {
        node: node_price(&ids[0], "n").node,
        start_time: two_hours.0,
        end_time: two_hours.1,
        ..Default::default()
    };
    assert!((c.pricing_node_price(old).await.unwrap().into_inner().price - 0.8).abs() < 1e-9);
    server.stop().await.unwrap();

    let (server, mut c) = support::start(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 1\n",
    )
    .await;
    assert_eq!(code(c.pricing_node_price(node_price("", "x")).await).0, Code::Unimplemented);
    let pod = pb::PricingPodPriceRequest::default();
    assert_eq!(code(c.pricing_pod_price(pod).await).0, Code::Unimplemented);
    server.stop().await.unwrap();
}

// === Cleanup ===

#[tokio::test]
async fn cleanup_does_not_abandon_creates_in_flight() {
    let (server, mut c) = start("create_latency = \"200ms\"").await;
    increase(&mut c, "small", 2).await.unwrap();
    c.cleanup(pb::CleanupRequest {}).await.unwrap();
    support::wait_running(&c, "small", 2, LONG).await;
    server.stop().await.unwrap();
}

// === shutdown, several clouds ===

#[tokio::test]
async fn shutdown_waits_for_creates_in_flight() {
    let (server, mut c, sim) = start_with_handle("create_latency = \"300ms\"").await;
    increase(&mut c, "small", 3).await.unwrap();
    server.stop().await.unwrap();
    assert_eq!(sim.machine_names().len(), 3, "every accepted create finished before the server stopped");
}

#[tokio::test]
async fn one_server_serves_groups_on_several_clouds_with_one_listing_each() {
    let (server, mut c) = support::start(
        r#"
cluster_name = "t"
[clouds.onprem]
driver = "simulated"
quota = 1
[clouds.burst]
driver = "simulated"
[groups.base]
cloud = "onprem"
max_size = 3
[groups.overflow]
cloud = "burst"
max_size = 3
provider_id = "burst://{region}/{name}"
"#,
    )
    .await;
    increase(&mut c, "base", 1).await.unwrap();
    increase(&mut c, "overflow", 2).await.unwrap();
    support::wait_running(&c, "base", 1, LONG).await;
    let ids = support::wait_running(&c, "overflow", 2, LONG).await;
    assert!(ids.iter().all(|id| id.starts_with("burst://burst/t-overflow-")), "{ids:?}");
    let before = [
        server.metrics.driver_calls("onprem", "simulated", "list"),
        server.metrics.driver_calls("burst", "simulated", "list"),
    ];
    refresh(&mut c).await.unwrap();
    let after = [
        server.metrics.driver_calls("onprem", "simulated", "list"),
        server.metrics.driver_calls("burst", "simulated", "list"),
    ];
    assert_eq!([after[0] - before[0], after[1] - before[1]], [1, 1]);
    server.stop().await.unwrap();
}
