//! The fault suite (see `tests/faults.rs`) against the Kamatera fake: creates, terminates, tag
//! marks and listings failing before Kamatera acted, hanging, or losing their answer after it
//! acted; a create command that fails late; a hundred concurrent IncreaseSize; `kill -9` of a
//! real `flotilla serve` during deletes, then a restart. After each, what Kamatera holds and
//! what Flotilla reports over gRPC must agree.

#[path = "fakes/kamatera/mod.rs"]
mod fake;
mod support;

use std::time::Duration;

use fake::{CallFault, Fake, Kind};
use flotilla::driver::kamatera::TAG_DELETING;
use support::faults::{
    CALL_FAULTS, Cloud, CloudView, Fault, Op, SETTLE, Serve, increase_concurrently, scenario, settle,
};

/// Flotilla on the fake, group `workers` (max 5); timeouts short enough that a hung call ends
/// in a second.
fn config_text(fake: &Fake, cloud_extra: &str) -> String {
    format!(
        r##"cluster_name = "prod"
[state]
refresh_timeout = "1s"
max_staleness = "5s"
reconcile_interval = "200ms"
[clouds.kam]
driver = "kamatera"
api_url = "{url}"
api_client_id = "{id}"
api_secret = "{secret}"
poll_interval = "20ms"
request_timeout = "1s"
create_request_timeout = "1s"
lost_create_grace = "1s"
create_timeout = "10s"
delete_timeout = "10s"
{cloud_extra}
[clouds.kam.defaults]
datacenter = "EU"
image = "ubuntu_server_24.04_64-bit"
cpu = "2A"
ram = 4096
disks = ["size=50"]
networks = ["name=wan,ip=auto"]
ssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly ops@example"
script = "#!/bin/sh\necho {{{{ name }}}}\n"
[groups.workers]
cloud = "kam"
max_size = 5
name_prefix = "prod-workers"
"##,
        url = fake.url(),
        id = fake::CLIENT_ID,
        secret = fake::SECRET,
    )
}

/// Kamatera as the referee sees it, and its fault hooks.
struct Kam(Fake);

fn server_name(provider_id: &str) -> &str {
    provider_id.strip_prefix("kamatera://").expect("a kamatera provider id")
}

impl Cloud for Kam {
    fn adopts_lost_creates(&self) -> bool {
        true
    }

    fn view(&self) -> CloudView {
        let s = self.0.settled();
        let now = std::time::Instant::now();
        s.servers
            .iter()
            .filter_map(|v| {
                // Tags come with the server, or (a fault) when its create completes: known by
                // the create request until then.
                let requested: Vec<String> = v
                    .create_body
                    .as_ref()
                    .and_then(|b| b.get("tag"))
                    .and_then(|t| t.as_str())
                    .map(|t| t.split(' ').map(str::to_owned).collect())
                    .unwrap_or_default();
                let tags: Vec<&String> = v.tags.iter().chain(&v.pending_tags).chain(&requested).collect();
                if !tags.iter().any(|t| *t == "k8sca-prod") {
                    return None;
                }
                let group = tags.iter().find_map(|t| t.strip_prefix("k8scang-"))?.to_owned();
                let busy = |kind| {
                    s.commands.values().any(|c| c.kind == kind && c.server_id == v.id && c.status(now) != "complete")
                };
                let state = if v.tags.iter().any(|t| t == TAG_DELETING) || busy(Kind::Terminate) {
                    "deleting"
                } else if busy(Kind::Create) {
                    "creating"
                } else if v.power == "on" {
                    "running"
                } else {
                    "stopped"
                };
                Some((format!("kamatera://{}", v.name), (group, state.to_owned())))
            })
            .collect()
    }

    fn arm(&self, op: Op, fault: Fault, target: Option<&str>) -> bool {
        let (method, path, key, server) = match (op, target) {
            (Op::Create, _) => ("POST", "/service/server", None, None),
            (Op::List, _) => ("GET", "/service/servers", None, None),
            (Op::Delete, Some(t)) => ("POST", "/service/server/terminate", None, Some(server_name(t))),
            (Op::Mark, Some(t)) => ("POST", "/server/tags", Some("add"), Some(server_name(t))),
            _ => return false,
        };
        let call_fault = match fault {
            Fault::Ok => return true,
            Fault::Unavailable => {
                CallFault::Fail(503, "<html><body><h1>503 Service Unavailable</h1></body></html>".into())
            }
            Fault::Hang => CallFault::Hang,
            Fault::LostResponse => CallFault::LoseAnswer,
            Fault::HangAfter => CallFault::HangAfter,
            // The create command runs, then ends in error; Kamatera removes the half-made server.
            Fault::FailLate if op == Op::Create => {
                self.0.state().faults.fail_creates.push(("Error: failed to configure server network".into(), true));
                return true;
            }
            _ => return false,
        };
        self.0.fault_next(method, path, key, server, call_fault);
        true
    }
}

async fn start() -> (flotilla::Running, support::Client, Kam) {
    let fake = Fake::start().await;
    let (server, c) = support::start(&config_text(&fake, "")).await;
    (server, c, Kam(fake))
}

async fn faults_on(op: Op, faults: &[Fault]) {
    for &fault in faults {
        let (server, c, kam) = start().await;
        assert!(scenario(&c, &kam, &["workers"], "workers", op, fault).await, "{fault:?} on {op:?} not injected");
        server.stop().await.unwrap();
        kam.0.assert_clean();
    }
}

#[tokio::test]
async fn kamatera_creates_that_fail_hang_lose_their_answer_or_fail_late_leak_nothing() {
    faults_on(Op::Create, &[CALL_FAULTS.as_slice(), &[Fault::FailLate]].concat()).await;
}

#[tokio::test]
async fn kamatera_terminates_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Delete, &CALL_FAULTS).await;
}

#[tokio::test]
async fn kamatera_tag_marks_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Mark, &CALL_FAULTS).await;
}

#[tokio::test]
async fn kamatera_listings_that_fail_hang_or_lose_their_answer_change_nothing() {
    faults_on(Op::List, &CALL_FAULTS).await;
}

#[tokio::test]
async fn a_hundred_concurrent_increases_never_pass_max_size_on_kamatera() {
    let (server, c, kam) = start().await;
    let accepted = increase_concurrently(&c, "workers", 100).await;
    assert_eq!(accepted, 5);
    let settled = settle(&c, &["workers"], || kam.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), 5);
    server.stop().await.unwrap();
    kam.0.assert_clean();
}

// === kill -9 of a real server ===

#[tokio::test]
async fn kill_9_during_kamatera_deletes_then_restart_finishes_every_accepted_delete() {
    let dir = tempfile::tempdir().unwrap();
    let kam = Kam(Fake::start().await);
    let text = config_text(&kam.0, "delete_concurrency = 1");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 3).await.unwrap();
    let up = settle(&c, &["workers"], || kam.view(), SETTLE).await;
    let victims: Vec<&str> = up.groups["workers"][..2].iter().map(String::as_str).collect();
    // Terminates take a minute, one delete at a time: Flotilla dies with one terminate running
    // and the other delete still queued inside it.
    kam.0.state().faults.run_time = Duration::from_secs(60);
    support::delete(&mut c, "workers", &victims).await.unwrap();
    // Kill only once the first terminate has reached Kamatera (DeleteNodes answers before its
    // background delete sends it; killing earlier would leave both deletes queued).
    let sent =
        |s: &fake::State| victims.iter().filter(|v| s.command_for(Kind::Terminate, server_name(v)).is_some()).count();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent(&kam.0.state()) == 0 {
        assert!(tokio::time::Instant::now() < deadline, "no terminate reached Kamatera within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    serve.kill_9();
    let marked = kam.0.state().servers.iter().filter(|v| v.tags.iter().any(|t| t == TAG_DELETING)).count();
    assert_eq!(marked, 2, "both deletes recorded in Kamatera before DeleteNodes answered: {:?}", kam.view());
    assert_eq!(kam.view().len(), 3, "killed before any terminate finished");
    // The terminate Kamatera had ends; the delete that never reached it is only the tag now.
    let queued: Vec<&str> = {
        let s = kam.0.state();
        victims.iter().copied().filter(|v| s.command_for(Kind::Terminate, server_name(v)).is_none()).collect()
    };
    assert_eq!(queued.len(), 1, "one terminate sent, one delete queued inside Flotilla");
    kam.0.state().faults.run_time = Duration::from_millis(60);
    kam.0.finish_commands();

    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    assert_eq!(support::target_size(&mut c, "workers").await, 1, "the accepted deletes are not forgotten");
    let settled = settle(&c, &["workers"], || kam.view(), SETTLE).await;
    assert_eq!(settled.groups["workers"], [up.groups["workers"][2].clone()], "{}", serve.log());
    support::delete(&mut c, "workers", &queued).await.expect("repeating an accepted delete is a no-op");
    serve.kill_9();
    kam.0.assert_clean();
}

#[tokio::test]
async fn kill_9_during_kamatera_creates_then_restart_leaks_duplicates_and_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let kam = Kam(Fake::start().await);
    // Create commands take a minute: Flotilla dies with servers half made.
    kam.0.state().faults.run_time = Duration::from_secs(60);
    let text = config_text(&kam.0, "create_concurrency = 2");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 4).await.unwrap();
    support::faults::cloud_reaches("creates accepted", Duration::from_secs(10), || kam.view(), |v| v.len() >= 2).await;
    serve.kill_9();
    let accepted = kam.0.state().commands.values().filter(|c| c.kind == Kind::Create).count();
    assert!(accepted >= 2, "killed with creates running");
    kam.0.finish_commands();

    // The creates Kamatera accepted complete and are found; nothing is created twice.
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    assert_eq!(support::target_size(&mut c, "workers").await as usize, accepted, "{}", serve.log());
    let settled = settle(&c, &["workers"], || kam.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), accepted, "{}", serve.log());
    assert!(settled.failed_deleted.is_empty(), "{settled:?}");
    let creates = kam.0.state().calls("POST", "/service/server").len();
    assert_eq!(creates, accepted, "no create is sent again");
    serve.kill_9();
    kam.0.assert_clean();
}
