//! The fault suite (see `tests/faults.rs`) against the Slicer fake: launches, deletes, tag marks
//! and listings failing before the daemon acted, hanging, or losing their answer after it acted;
//! a hundred concurrent IncreaseSize; `kill -9` of a real `flotilla serve` during creates and
//! during deletes, then a restart. After each, what the daemon holds and what Flotilla reports
//! over gRPC must agree.

#[path = "fakes/slicer/mod.rs"]
mod fake;
mod support;

use std::time::Duration;

use fake::{CallFault, Fake};
use flotilla::driver::slicer::MARK_DELETING;
use support::faults::{
    CALL_FAULTS, Cloud, CloudView, Fault, Op, SETTLE, Serve, cloud_reaches, increase_concurrently, scenario, settle,
};

/// Flotilla on the fake, group `workers` on host group `workers` (room for 8 VMs; max 5);
/// timeouts short enough that a hung call ends in a second.
fn config_text(fake: &Fake, dir: &std::path::Path, cloud_extra: &str) -> String {
    let token = dir.join("slicer-token");
    std::fs::write(&token, fake::TOKEN).unwrap();
    format!(
        r#"cluster_name = "homelab"
[state]
refresh_timeout = "1s"
max_staleness = "5s"
reconcile_interval = "200ms"
[clouds.slicer]
driver = "slicer"
url = "{url}"
token = {{ file = "{token}" }}
request_timeout = "1s"
k3s_url = "https://192.168.137.2:6443"
k3s_token = "K10c0ffee::server:5f4dcc3b"
create_timeout = "10s"
delete_timeout = "10s"
{cloud_extra}
[groups.workers]
cloud = "slicer"
max_size = 5
"#,
        url = fake.url(),
        token = token.display(),
    )
}

async fn fake_with_room() -> Fake {
    let fake = Fake::start().await;
    fake.state().add_host_group("workers", 2, 4, "x86_64", 0, 8);
    fake
}

/// The daemon as the referee sees it, and its fault hooks.
struct Daemon(Fake);

fn hostname(provider_id: &str) -> &str {
    provider_id.strip_prefix("k3s://").expect("a k3s provider id")
}

impl Cloud for Daemon {
    fn view(&self) -> CloudView {
        let s = self.0.state();
        s.vms
            .values()
            .filter(|v| v.tags.iter().any(|t| t == "flotilla-cluster=homelab"))
            .filter_map(|v| {
                let group = v.tags.iter().find_map(|t| t.strip_prefix("flotilla-group="))?.to_owned();
                let deleting = v.deleting || v.tags.iter().any(|t| t == MARK_DELETING);
                let state = if deleting { "deleting" } else { "running" };
                Some((format!("k3s://{}", v.hostname), (group, state.to_owned())))
            })
            .collect()
    }

    fn arm(&self, op: Op, fault: Fault, target: Option<&str>) -> bool {
        let (method, path) = match (op, target) {
            (Op::Create, _) => ("POST", "/hostgroup/workers/nodes".to_owned()),
            (Op::List, _) => ("GET", "/hostgroup/workers/nodes".to_owned()),
            (Op::Delete, Some(t)) => ("DELETE", format!("/hostgroup/workers/nodes/{}", hostname(t))),
            (Op::Mark, Some(t)) => ("PATCH", format!("/vm/{}/tags", hostname(t))),
            _ => return false,
        };
        let call_fault = match fault {
            Fault::Ok => return true,
            Fault::Unavailable => CallFault::Fail(503, "the daemon is restarting".into()),
            Fault::Hang => CallFault::Hang,
            Fault::LostResponse => CallFault::LoseAnswer,
            Fault::HangAfter => CallFault::HangAfter,
            // A Slicer VM has no late failure: it runs once the daemon answers.
            _ => return false,
        };
        self.0.fault_next(method, &path, call_fault);
        true
    }

    fn adopts_lost_creates(&self) -> bool {
        true
    }
}

async fn faults_on(op: Op, faults: &[Fault]) {
    for &fault in faults {
        let dir = tempfile::tempdir().unwrap();
        let daemon = Daemon(fake_with_room().await);
        let (server, c) = support::start(&config_text(&daemon.0, dir.path(), "")).await;
        assert!(scenario(&c, &daemon, &["workers"], "workers", op, fault).await, "{fault:?} on {op:?} not injected");
        server.stop().await.unwrap();
        daemon.0.assert_clean();
    }
}

#[tokio::test]
async fn slicer_launches_that_fail_hang_or_lose_their_answer_leak_nothing() {
    faults_on(Op::Create, &CALL_FAULTS).await;
}

#[tokio::test]
async fn slicer_deletes_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Delete, &CALL_FAULTS).await;
}

#[tokio::test]
async fn slicer_tag_marks_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Mark, &CALL_FAULTS).await;
}

#[tokio::test]
async fn slicer_listings_that_fail_hang_or_lose_their_answer_change_nothing() {
    faults_on(Op::List, &CALL_FAULTS).await;
}

#[tokio::test]
async fn a_hundred_concurrent_increases_never_pass_max_size_on_slicer() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon(fake_with_room().await);
    let (server, c) = support::start(&config_text(&daemon.0, dir.path(), "")).await;
    let accepted = increase_concurrently(&c, "workers", 100).await;
    assert_eq!(accepted, 5);
    let settled = settle(&c, &["workers"], || daemon.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), 5);
    server.stop().await.unwrap();
    daemon.0.assert_clean();
}

// === kill -9 of a real server ===

#[tokio::test]
async fn kill_9_during_slicer_creates_then_restart_leaks_duplicates_and_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon(fake_with_room().await);
    // The daemon lists a VM at once and answers its launch a minute later: Flotilla dies with
    // launches in flight.
    daemon.0.state().faults.create_delay = Duration::from_secs(60);
    let text = config_text(&daemon.0, dir.path(), "create_concurrency = 2");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 4).await.unwrap();
    cloud_reaches("two launches under way", Duration::from_secs(10), || daemon.view(), |v| v.len() == 2).await;
    serve.kill_9();
    daemon.0.state().faults.create_delay = Duration::ZERO;

    // The VMs the daemon launched are found by their tags; nothing is launched twice.
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    assert_eq!(support::target_size(&mut c, "workers").await, 2, "{}", serve.log());
    let settled = settle(&c, &["workers"], || daemon.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), 2, "{}", serve.log());
    assert_eq!(daemon.0.state().calls("POST", "/hostgroup/workers/nodes").len(), 2, "no launch is sent again");
    serve.kill_9();
    daemon.0.assert_clean();
}

#[tokio::test]
async fn kill_9_during_slicer_deletes_then_restart_finishes_every_accepted_delete() {
    let dir = tempfile::tempdir().unwrap();
    let daemon = Daemon(fake_with_room().await);
    let text = config_text(&daemon.0, dir.path(), "delete_concurrency = 1");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 3).await.unwrap();
    let up = settle(&c, &["workers"], || daemon.view(), SETTLE).await;
    let victims: Vec<&str> = up.groups["workers"][..2].iter().map(String::as_str).collect();
    // A delete takes a minute, one at a time: Flotilla dies with one DELETE in flight and the
    // other still queued inside it.
    daemon.0.state().faults.delete_delay = Duration::from_secs(60);
    support::delete(&mut c, "workers", &victims).await.unwrap();
    serve.kill_9();
    let marked = daemon.0.state().vms.values().filter(|v| v.tags.iter().any(|t| t == MARK_DELETING)).count();
    assert_eq!(marked, 2, "both deletes recorded on the daemon before DeleteNodes answered: {:?}", daemon.view());
    assert_eq!(daemon.view().len(), 3, "killed before any delete finished");
    daemon.0.state().faults.delete_delay = Duration::from_millis(50);

    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    assert_eq!(support::target_size(&mut c, "workers").await, 1, "the accepted deletes are not forgotten");
    let settled = settle(&c, &["workers"], || daemon.view(), SETTLE).await;
    assert_eq!(settled.groups["workers"], [up.groups["workers"][2].clone()], "{}", serve.log());
    support::delete(&mut c, "workers", &victims).await.expect("repeating an accepted delete is a no-op");
    serve.kill_9();
    daemon.0.assert_clean();
}
