//! The fault suite (see `tests/faults.rs`) against the OpenStack fake: every Nova call failing
//! before Nova acted, hanging, or losing its answer after Nova acted; a boot that fails late;
//! a hundred concurrent IncreaseSize; `kill -9` of a real `flotilla serve` during creates and
//! during deletes, then a restart. After each, what Nova holds and what Flotilla reports over
//! gRPC must agree.

#[path = "fakes/openstack/mod.rs"]
mod fake;
mod support;

use std::time::Duration;

use axum::http::Method;
use fake::Fake;
use flotilla::driver::openstack::{META_CLUSTER, META_DELETING, META_GROUP};
use serde_json::json;
use support::faults::{
    CALL_FAULTS, Cloud, CloudView, Fault, Op, SETTLE, Serve, cloud_reaches, increase_concurrently, scenario, settle,
};

const CLUSTER: &str = "dev-cluster";

/// Flotilla on the fake, group `workers` (max 5); timeouts short enough that a hang ends in a
/// second or two.
fn config_text(fake: &Fake, cloud_extra: &str) -> String {
    format!(
        r#"cluster_name = "{CLUSTER}"
[state]
refresh_timeout = "1s"
max_staleness = "5s"
reconcile_interval = "200ms"
[clouds.os]
driver = "openstack"
region_name = "RegionOne"
request_timeout = "1s"
create_timeout = "20s"
delete_timeout = "10s"
{cloud_extra}
{auth}[groups.workers]
cloud = "os"
max_size = 5
[groups.workers.machine]
flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
networks = ["k3s-net"]
"#,
        auth = fake.auth_table("os"),
    )
}

/// Nova as the referee sees it, and its fault hooks.
struct Nova(Fake);

const SERVERS: &str = "/compute/v2.1/servers";

fn server_id(provider_id: &str) -> &str {
    provider_id.strip_prefix("openstack:///").expect("an openstack provider id")
}

impl Cloud for Nova {
    fn view(&self) -> CloudView {
        self.0
            .statuses()
            .into_iter()
            .filter(|(s, _, _)| s.metadata.get(META_CLUSTER).map(String::as_str) == Some(CLUSTER))
            .map(|(s, status, task)| {
                let state = match (status, task) {
                    (_, Some("deleting")) => "deleting",
                    _ if s.metadata.contains_key(META_DELETING) => "deleting",
                    ("BUILD", _) => "creating",
                    ("ERROR", _) => "failed",
                    _ => "running",
                };
                (format!("openstack:///{}", s.id), (s.metadata[META_GROUP].clone(), state.to_owned()))
            })
            .collect()
    }

    fn arm(&self, op: Op, fault: Fault, target: Option<&str>) -> bool {
        let (method, path) = match (op, target) {
            (Op::Create, _) => (Method::POST, SERVERS.to_owned()),
            (Op::List, _) => (Method::GET, format!("{SERVERS}/detail")),
            (Op::Delete, Some(t)) => (Method::DELETE, format!("{SERVERS}/{}", server_id(t))),
            (Op::Mark, Some(t)) => (Method::PUT, format!("{SERVERS}/{}/metadata/{META_DELETING}", server_id(t))),
            _ => return false,
        };
        let unavailable = json!({ "computeFault": { "code": 503, "message": "Service Unavailable" } });
        let gateway = json!({ "message": "504 Gateway Time-out" });
        match fault {
            Fault::Ok => {}
            Fault::Unavailable => self.0.inject(method, &path, 503, unavailable),
            Fault::Hang => self.0.hang_next(method, &path, false),
            Fault::LostResponse => self.0.lose_next_answer(method, &path, 504, gateway),
            Fault::HangAfter => self.0.hang_next(method, &path, true),
            // The server goes to ERROR while the create waits for ACTIVE.
            Fault::FailLate if op == Op::Create => {
                self.0.fail_next_boot("Build of instance aborted: Failure prepping block device.")
            }
            _ => return false,
        }
        true
    }
}

async fn start(cloud_extra: &str) -> (flotilla::Running, support::Client, Nova) {
    let fake = Fake::start().await;
    fake.set_build_time(Duration::from_millis(200));
    fake.set_delete_time(Duration::from_millis(100));
    let (server, c) = support::start(&config_text(&fake, cloud_extra)).await;
    (server, c, Nova(fake))
}

async fn faults_on(op: Op, faults: &[Fault]) {
    for &fault in faults {
        let (server, c, nova) = start("").await;
        assert!(scenario(&c, &nova, &["workers"], "workers", op, fault).await, "{fault:?} on {op:?} not injected");
        server.stop().await.unwrap();
        nova.0.assert_clean();
    }
}

#[tokio::test]
async fn nova_creates_that_fail_hang_lose_their_answer_or_fail_late_leak_nothing() {
    faults_on(Op::Create, &[CALL_FAULTS.as_slice(), &[Fault::FailLate]].concat()).await;
}

#[tokio::test]
async fn nova_deletes_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Delete, &CALL_FAULTS).await;
}

#[tokio::test]
async fn nova_metadata_marks_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Mark, &CALL_FAULTS).await;
}

#[tokio::test]
async fn nova_listings_that_fail_hang_or_lose_their_answer_change_nothing() {
    faults_on(Op::List, &CALL_FAULTS).await;
}

#[tokio::test]
async fn a_hundred_concurrent_increases_never_pass_max_size_on_nova() {
    let (server, c, nova) = start("").await;
    let accepted = increase_concurrently(&c, "workers", 100).await;
    assert_eq!(accepted, 5);
    let settled = settle(&c, &["workers"], || nova.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), 5);
    server.stop().await.unwrap();
    nova.0.assert_clean();
}

// === kill -9 of a real server ===

#[tokio::test]
async fn kill_9_during_nova_creates_then_restart_leaks_duplicates_and_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    fake.set_build_time(Duration::from_secs(2));
    let nova = Nova(fake);
    let text = config_text(&nova.0, "create_concurrency = 2");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    // Every Nova call takes 400 ms: Flotilla dies with creates in flight and queued, and
    // servers Nova accepted still building.
    nova.0.set_latency(Duration::from_millis(400));
    support::increase(&mut c, "workers", 4).await.unwrap();
    cloud_reaches("two servers accepted", Duration::from_secs(10), || nova.view(), |v| v.len() >= 2).await;
    serve.kill_9();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let accepted = nova.view();
    assert!(accepted.values().any(|(_, s)| s == "creating"), "killed while Nova was building: {accepted:?}");
    nova.0.set_latency(Duration::ZERO);

    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    let n = accepted.len();
    assert_eq!(support::target_size(&mut c, "workers").await as usize, n, "what Nova accepted is found");
    let settled = settle(&c, &["workers"], || nova.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), n, "{}", serve.log());
    assert!(settled.failed_deleted.is_empty(), "{settled:?}");
    serve.kill_9();
    nova.0.assert_clean();
}

#[tokio::test]
async fn kill_9_during_nova_deletes_then_restart_finishes_every_accepted_delete() {
    let dir = tempfile::tempdir().unwrap();
    let fake = Fake::start().await;
    fake.set_build_time(Duration::ZERO);
    fake.set_delete_time(Duration::from_millis(100));
    let nova = Nova(fake);
    // One delete at a time, each Nova call 300 ms: the second delete is still queued inside
    // Flotilla when it dies.
    let text = config_text(&nova.0, "delete_concurrency = 1");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 3).await.unwrap();
    let up = settle(&c, &["workers"], || nova.view(), SETTLE).await;
    let victims: Vec<&str> = up.groups["workers"][..2].iter().map(String::as_str).collect();
    nova.0.set_latency(Duration::from_millis(300));
    support::delete(&mut c, "workers", &victims).await.unwrap();
    serve.kill_9();
    let marked = nova.view().values().filter(|(_, s)| s == "deleting").count();
    assert_eq!(marked, 2, "both deletes recorded in Nova before DeleteNodes answered: {:?}", nova.view());

    nova.0.set_latency(Duration::ZERO);
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    assert_eq!(support::target_size(&mut c, "workers").await, 1, "the accepted deletes are not forgotten");
    let settled = settle(&c, &["workers"], || nova.view(), SETTLE).await;
    assert_eq!(settled.groups["workers"], [up.groups["workers"][2].clone()], "{}", serve.log());
    support::delete(&mut c, "workers", &victims).await.expect("repeating an accepted delete is a no-op");
    serve.kill_9();
    nova.0.assert_clean();
}

#[tokio::test]
async fn a_building_server_nova_will_not_mark_is_deleted_all_the_same() {
    let (server, mut c, nova) = start("").await;
    nova.0.set_build_time(Duration::from_secs(3600));
    support::increase(&mut c, "workers", 1).await.unwrap();
    let building = cloud_reaches("a server building", Duration::from_secs(10), || nova.view(), |v| v.len() == 1).await;
    let id = building.keys().next().unwrap().clone();
    support::eventually(Duration::from_secs(10), "Flotilla to know its id", || {
        let mut c = c.clone();
        let id = id.clone();
        async move { support::nodes(&mut c, "workers").await.iter().any(|(i, _, _)| *i == id).then_some(()) }
    })
    .await;
    support::delete(&mut c, "workers", &[&id]).await.unwrap();
    let settled = settle(&c, &["workers"], || nova.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), 0);
    let refused: Vec<u16> = nova.0.requests().iter().filter(|r| r.method == Method::PUT).map(|r| r.status).collect();
    assert_eq!(refused, [409], "Nova refuses metadata on a building server");
    server.stop().await.unwrap();
    nova.0.assert_clean();
}
