//! The promises of README "How Flotilla behaves", under faults, on the simulated cloud: every
//! call failing, hanging or losing its answer after the cloud acted; listings racing every
//! create and delete outcome; a hundred concurrent IncreaseSize; repeated and conflicting
//! DeleteNodes; `kill -9` of a real `flotilla serve` during creates and during deletes; calls
//! whose waits would outlast cluster-autoscaler's deadline answer before it. Each
//! test plays cluster-autoscaler until the fleet settles and then compares what the cloud holds
//! with what Flotilla reports over gRPC (`support::faults::settle`), failing on any difference.

mod support;

use std::{sync::Arc, time::Duration};

use flotilla::{
    driver::{
        MachineState, SharedDriver,
        simulated::{
            self, Simulated,
            faults::{Fault, Op},
        },
    },
    proto::externalgrpc::instance_status::InstanceState,
};
use support::{
    Client, delete,
    faults::{CALL_FAULTS, Cloud, CloudView, SETTLE, Serve, cloud_reaches, settle},
    increase, nodes, target_size,
};
use tonic::Code;

/// Timeouts short enough that a hang ends within a second; the background reconcile lists
/// several times a second, racing every create and delete. Unless `cloud_extra` sets them, a
/// create takes 100 ms and a delete 50 ms, and either times out after 1 s.
fn config_text(cloud_extra: &str) -> String {
    let mut cloud_extra = cloud_extra.to_owned();
    let defaults =
        [("create_latency", "100ms"), ("delete_latency", "50ms"), ("create_timeout", "1s"), ("delete_timeout", "1s")];
    for (key, default) in defaults {
        if !cloud_extra.contains(key) {
            cloud_extra.push_str(&format!("\n{key} = \"{default}\""));
        }
    }
    format!(
        r#"cluster_name = "t"
[state]
refresh_timeout = "500ms"
max_staleness = "3s"
reconcile_interval = "150ms"
[clouds.sim]
driver = "simulated"
{cloud_extra}
[groups.g]
cloud = "sim"
max_size = 5
[groups.h]
cloud = "sim"
min_size = 1
max_size = 3
"#
    )
}

fn state_name(s: &MachineState) -> String {
    match s {
        MachineState::Creating => "creating",
        MachineState::Running => "running",
        MachineState::Deleting => "deleting",
        MachineState::Failed(_) => "failed",
        MachineState::Stopped => "stopped",
    }
    .to_owned()
}

/// What the simulated cloud holds, as provider ids.
fn view(sim: &Simulated) -> CloudView {
    sim.machines().into_iter().map(|m| (format!("simulated://t/{}", m.name), (m.group, state_name(&m.state)))).collect()
}

async fn start(cloud_extra: &str) -> (flotilla::Running, Client, Arc<Simulated>) {
    let config = support::config(&config_text(cloud_extra));
    let table = config.raw["clouds"]["sim"].as_table().unwrap().clone();
    let mut p = flotilla::config::Problems::default();
    let mut section = flotilla::config::Section::new("clouds.sim", &table).skipping(flotilla::config::CLOUD_KEYS);
    let settings = simulated::Settings::parse(&mut section, &mut p);
    assert!(p.is_empty(), "{p}");
    let sim = Arc::new(Simulated::new("t", settings).unwrap());
    let (server, client) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
    (server, client, sim)
}

/// The simulated cloud as the suite's referee sees it.
struct Sim(Arc<Simulated>);

impl Cloud for Sim {
    fn view(&self) -> CloudView {
        view(&self.0)
    }

    fn arm(&self, op: Op, fault: Fault, _target: Option<&str>) -> bool {
        self.0.faults().push(op, fault);
        true
    }
}

/// `support::faults::scenario` on group g of a fresh server, every listing stale when `stale`.
async fn scenario(op: Op, fault: Fault, stale: bool) {
    let (server, c, sim) = start(if stale { "list_latency = \"120ms\"" } else { "" }).await;
    if stale {
        sim.faults().always(Op::List, Some(Fault::Stale));
    }
    assert!(support::faults::scenario(&c, &Sim(sim), &["g", "h"], "g", op, fault).await);
    server.shutdown_token().cancel();
}

#[tokio::test]
async fn creates_that_fail_hang_or_lose_their_answer_leak_nothing() {
    for fault in CALL_FAULTS.into_iter().chain([Fault::FailLate, Fault::FailLateLeaked]) {
        scenario(Op::Create, fault, false).await;
    }
}

#[tokio::test]
async fn deletes_that_fail_hang_or_lose_their_answer_still_delete() {
    for fault in CALL_FAULTS {
        scenario(Op::Delete, fault, false).await;
    }
}

#[tokio::test]
async fn marks_that_fail_hang_or_lose_their_answer_still_delete() {
    for fault in CALL_FAULTS {
        scenario(Op::Mark, fault, false).await;
    }
}

#[tokio::test]
async fn listings_that_fail_hang_or_come_back_stale_change_nothing() {
    for fault in CALL_FAULTS.into_iter().chain([Fault::Stale]) {
        scenario(Op::List, fault, false).await;
    }
}

#[tokio::test]
async fn stale_listings_race_every_create_outcome() {
    for fault in CALL_FAULTS.into_iter().chain([Fault::FailLate, Fault::FailLateLeaked]) {
        scenario(Op::Create, fault, true).await;
    }
}

#[tokio::test]
async fn stale_listings_race_every_delete_outcome() {
    for fault in CALL_FAULTS {
        scenario(Op::Delete, fault, true).await;
    }
}

#[tokio::test]
async fn a_failed_create_is_reported_with_its_class_until_ca_deletes_it_whatever_listings_say() {
    // The late failure lands between listings that saw the machine and listings that do not.
    let (server, mut c, sim) = start("create_latency = \"400ms\"").await;
    target_size(&mut c, "g").await;
    sim.faults().push(Op::Create, Fault::FailLate);
    increase(&mut c, "g", 1).await.unwrap();
    let failed = support::eventually(SETTLE, "the failure to be reported", || {
        let mut c = c.clone();
        async move { nodes(&mut c, "g").await.into_iter().find(|(_, _, e)| e.is_some()) }
    })
    .await;
    assert_eq!(failed.1, InstanceState::InstanceCreating);
    assert_eq!(failed.2.as_ref().unwrap().error_code, "OTHER");
    assert!(view(&sim).is_empty(), "the driver removed it");
    // Listings come and go (reconcile every 150 ms, and Refreshes): it stays reported.
    for _ in 0..5 {
        support::refresh(&mut c).await.unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(nodes(&mut c, "g").await, std::slice::from_ref(&failed));
        assert_eq!(target_size(&mut c, "g").await, 1);
    }
    let settled = settle(&c, &["g", "h"], || view(&sim), SETTLE).await;
    assert_eq!(settled.failed_deleted, ["OTHER"]);
    assert_eq!(settled.count("g"), 0);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_hundred_concurrent_increases_never_pass_max_size() {
    let (server, c, sim) = start("create_latency = \"50ms\"").await;
    let mut set = tokio::task::JoinSet::new();
    for i in 0..100 {
        let mut c = c.clone();
        set.spawn(async move { increase(&mut c, "g", 1 + i % 3).await.map(|()| 1 + i % 3) });
    }
    let mut accepted = 0;
    for r in set.join_all().await {
        match r {
            Ok(delta) => accepted += delta,
            Err(s) => assert_eq!(s.code(), Code::InvalidArgument, "{s:?}"),
        }
    }
    assert!(accepted <= 5, "accepted {accepted} machines past max 5");
    let settled = settle(&c, &["g", "h"], || view(&sim), SETTLE).await;
    assert_eq!(settled.count("g") as i32, accepted);
    assert!(sim.machine_names().len() <= 5);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn repeated_and_conflicting_deletes_delete_each_machine_once_and_only_what_was_asked() {
    let (server, mut c, sim) = start("").await;
    increase(&mut c, "g", 4).await.unwrap();
    increase(&mut c, "h", 2).await.unwrap();
    let up = settle(&c, &["g", "h"], || view(&sim), SETTLE).await;
    let (g, h) = (&up.groups["g"], &up.groups["h"]);

    // All or nothing: one foreign or wrong-group node refuses the whole request.
    let (a, b, keep) = (g[0].as_str(), g[1].as_str(), g[2].as_str());
    let refused = delete(&mut c, "g", &[a, "simulated://t/stranger"]).await.unwrap_err();
    assert_eq!(refused.code(), Code::InvalidArgument);
    assert_eq!(delete(&mut c, "g", &[a, &h[0]]).await.unwrap_err().code(), Code::InvalidArgument);
    assert_eq!(target_size(&mut c, "g").await, 4, "nothing deleted by a refused request");

    // The same nodes in many concurrent requests, some overlapping.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..20 {
        let mut c = c.clone();
        let ids: Vec<String> = if i % 2 == 0 { vec![a.into()] } else { vec![a.into(), b.into()] };
        set.spawn(async move {
            let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
            delete(&mut c, "g", &ids).await
        });
    }
    for r in set.join_all().await {
        r.expect("every repeat is accepted");
    }
    assert_eq!(target_size(&mut c, "g").await, 2);
    // Group h has min_size 1: its last machine stays, whatever the order.
    let (first, second) = tokio::join!(
        {
            let mut c = c.clone();
            let id = h[0].clone();
            async move { delete(&mut c, "h", &[&id]).await }
        },
        {
            let mut c = c.clone();
            let id = h[1].clone();
            async move { delete(&mut c, "h", &[&id]).await }
        }
    );
    assert!(first.is_ok() != second.is_ok(), "exactly one of two deletes to min size passes: {first:?} {second:?}");
    let below_min = first.err().or(second.err()).unwrap();
    assert_eq!(below_min.code(), Code::FailedPrecondition);

    let settled = settle(&c, &["g", "h"], || view(&sim), SETTLE).await;
    assert_eq!(settled.count("g"), 2);
    assert!(settled.groups["g"].iter().any(|id| id == keep));
    assert_eq!(settled.count("h"), 1);
    assert_eq!(server.metrics.driver_calls("sim", "simulated", "delete"), 3, "each machine deleted once");
    server.stop().await.unwrap();
}

// === kill -9 of a real server ===

/// Configuration for `flotilla serve` over a simulated cloud kept in `dir/cloud.json`.
fn serve_config(dir: &std::path::Path, cloud_extra: &str) -> String {
    let state = dir.join("cloud.json");
    config_text(&format!("state_file = {:?}\n{cloud_extra}", state.display().to_string()))
}

/// The cloud as the state file holds it, read as a fresh process would.
fn file_view(dir: &std::path::Path) -> CloudView {
    let settings = simulated::Settings { state_file: Some(dir.join("cloud.json")), ..Default::default() };
    match Simulated::new("t", settings) {
        Ok(sim) => view(&sim),
        // Being replaced by the server at this very moment: read it again next time.
        Err(_) => CloudView::new(),
    }
}

#[tokio::test]
async fn kill_9_during_creates_then_restart_leaks_duplicates_and_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = || file_view(dir.path());
    let slow = "create_latency = \"3s\"\ncreate_timeout = \"1m\"\ncreate_concurrency = 2";
    let (serve, mut c) = Serve::start(dir.path(), &serve_config(dir.path(), slow)).await;
    increase(&mut c, "g", 4).await.unwrap();
    // Two creates accepted by the cloud and still running; two queued inside Flotilla.
    cloud_reaches("two creates accepted", Duration::from_secs(10), cloud, |v| v.len() == 2).await;
    let log = serve.log();
    serve.kill_9();
    assert!(cloud().values().all(|(_, s)| s == "creating"), "killed mid-create: {:?}\n{log}", cloud());

    let (serve, mut c) = Serve::start(dir.path(), &serve_config(dir.path(), slow)).await;
    // What the cloud accepted is found and completes; what never reached it is not invented.
    assert_eq!(target_size(&mut c, "g").await, 2);
    let settled = settle(&c, &["g", "h"], cloud, SETTLE).await;
    assert_eq!(settled.count("g"), 2, "{}", serve.log());
    assert!(settled.failed_deleted.is_empty());
    assert_eq!(cloud().len(), 2);
    serve.kill_9();
}

#[tokio::test]
async fn kill_9_during_deletes_then_restart_finishes_every_accepted_delete() {
    let dir = tempfile::tempdir().unwrap();
    let cloud = || file_view(dir.path());
    let slow = "delete_latency = \"3s\"\ndelete_timeout = \"1m\"";
    let (serve, mut c) = Serve::start(dir.path(), &serve_config(dir.path(), slow)).await;
    increase(&mut c, "g", 3).await.unwrap();
    let up = settle(&c, &["g", "h"], cloud, SETTLE).await;
    let victims: Vec<&str> = up.groups["g"][..2].iter().map(String::as_str).collect();
    delete(&mut c, "g", &victims).await.unwrap();
    // Accepted: the cloud holds the intent before DeleteNodes answered.
    let marked = cloud().values().filter(|(_, s)| s == "deleting").count();
    assert_eq!(marked, 2, "{:?}\n{}", cloud(), serve.log());
    serve.kill_9();
    assert_eq!(cloud().len(), 3, "killed before any delete finished");

    let (serve, mut c) = Serve::start(dir.path(), &serve_config(dir.path(), slow)).await;
    assert_eq!(target_size(&mut c, "g").await, 1, "the accepted deletes are not forgotten");
    let all = nodes(&mut c, "g").await;
    assert_eq!(all.iter().filter(|(_, s, _)| *s == InstanceState::InstanceRunning).count(), 1, "{all:?}");
    // Nobody asks again: the new process finishes the deletes on its own.
    let settled = settle(&c, &["g", "h"], cloud, SETTLE).await;
    assert_eq!(settled.count("g"), 1, "{}", serve.log());
    assert_eq!(settled.groups["g"], [up.groups["g"][2].clone()]);
    delete(&mut c, "g", &victims).await.expect("repeating an accepted delete is a no-op");
    serve.kill_9();
}

// === the caller's deadline ===

/// A server over a simulated cloud whose waits (`refresh_timeout`) are longer than the
/// caller's deadline, with `prepare` run on the cloud before the server starts.
async fn start_with_waits(
    refresh_timeout: &str,
    cloud_extra: &str,
    prepare: impl AsyncFnOnce(&Simulated),
) -> (flotilla::Running, Client, Arc<Simulated>) {
    let text = format!(
        "cluster_name = \"t\"\n[state]\nrefresh_timeout = \"{refresh_timeout}\"\nmax_staleness = \"1m\"\n\
         [clouds.sim]\ndriver = \"simulated\"\ndelete_timeout = \"2s\"\n{cloud_extra}\n\
         [groups.g]\ncloud = \"sim\"\nmax_size = 5\n"
    );
    let config = support::config(&text);
    let table = config.raw["clouds"]["sim"].as_table().unwrap().clone();
    let mut p = flotilla::config::Problems::default();
    let mut section = flotilla::config::Section::new("clouds.sim", &table).skipping(flotilla::config::CLOUD_KEYS);
    let sim = Arc::new(Simulated::new("t", simulated::Settings::parse(&mut section, &mut p)).unwrap());
    assert!(p.is_empty(), "{p}");
    prepare(&sim).await;
    let (server, client) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
    (server, client, sim)
}

/// A request carrying a deadline in `grpc-timeout`, as cluster-autoscaler sends every call.
fn with_deadline<T>(message: T, deadline: Duration) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.set_timeout(deadline);
    r
}

#[tokio::test]
async fn calls_right_after_a_start_answer_unavailable_before_the_callers_deadline_when_the_cloud_is_not_listed() {
    use flotilla::proto::externalgrpc as pb;
    // The first listing hangs; each call would wait 30 s for it, the caller gives it 1 s.
    let (server, mut c, _sim) =
        start_with_waits("30s", "", async |sim| sim.faults().always(Op::List, Some(Fault::Hang))).await;
    let deadline = Duration::from_secs(1);
    let id = || "g".to_owned();
    let node = pb::ExternalGrpcNode { provider_id: "simulated://t/t-g-zzzzz".into(), ..Default::default() };
    let answers: Vec<(&str, Result<(), tonic::Status>)> = vec![
        (
            "IncreaseSize",
            c.node_group_increase_size(with_deadline(
                pb::NodeGroupIncreaseSizeRequest { id: id(), delta: 1 },
                deadline,
            ))
            .await
            .map(drop),
        ),
        (
            "DeleteNodes",
            c.node_group_delete_nodes(with_deadline(
                pb::NodeGroupDeleteNodesRequest { id: id(), nodes: vec![node.clone()] },
                deadline,
            ))
            .await
            .map(drop),
        ),
        (
            "DecreaseTargetSize",
            c.node_group_decrease_target_size(with_deadline(
                pb::NodeGroupDecreaseTargetSizeRequest { id: id(), delta: -1 },
                deadline,
            ))
            .await
            .map(drop),
        ),
        (
            "TargetSize",
            c.node_group_target_size(with_deadline(pb::NodeGroupTargetSizeRequest { id: id() }, deadline))
                .await
                .map(drop),
        ),
        ("Nodes", c.node_group_nodes(with_deadline(pb::NodeGroupNodesRequest { id: id() }, deadline)).await.map(drop)),
        (
            "NodeGroupForNode",
            c.node_group_for_node(with_deadline(pb::NodeGroupForNodeRequest { node: Some(node) }, deadline))
                .await
                .map(drop),
        ),
        ("Refresh", c.refresh(with_deadline(pb::RefreshRequest {}, deadline)).await.map(drop)),
    ];
    for (call, answer) in answers {
        let status = answer.expect_err(call);
        // Not DEADLINE_EXCEEDED or CANCELLED: the caller hears why, and that nothing was done.
        assert_eq!(status.code(), Code::Unavailable, "{call}: {status:?}");
        assert!(
            status.message().contains("not been listed") || status.message().contains("stale"),
            "{call}: {status:?}"
        );
    }
    assert_eq!(server.fleet.target_size(0), 0, "nothing was recorded");
    server.shutdown_token().cancel();
}

#[tokio::test]
async fn delete_nodes_right_after_a_start_answers_within_the_callers_deadline_though_listing_and_marks_are_slow() {
    // The first listing takes 1 s and every mark hangs; refresh_timeout is 1.5 s. Waiting for
    // each in turn (1 s + 1.5 s) would pass cluster-autoscaler's deadline of 2 s.
    let (server, mut c, sim) = start_with_waits("1500ms", "list_latency = \"1s\"", async |sim| {
        flotilla::driver::Driver::create(sim, "g", "t-g-aaaaa").await.unwrap();
        sim.faults().always(Op::Mark, Some(Fault::Hang));
    })
    .await;
    let node = flotilla::proto::externalgrpc::ExternalGrpcNode {
        provider_id: "simulated://t/t-g-aaaaa".into(),
        ..Default::default()
    };
    let request = flotilla::proto::externalgrpc::NodeGroupDeleteNodesRequest { id: "g".into(), nodes: vec![node] };
    c.node_group_delete_nodes(with_deadline(request, Duration::from_secs(2)))
        .await
        .expect("accepted within the deadline, though the cloud has not recorded it yet");
    // The delete goes ahead once the mark gives up (delete_timeout, 2 s).
    cloud_reaches("the machine deleted", Duration::from_secs(20), || view(&sim), |v| v.is_empty()).await;
    server.shutdown_token().cancel();
}
