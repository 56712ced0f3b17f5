//! The fault suite (see `tests/faults.rs`) against the Proxmox VE fake: clone, destroy, tag and
//! listing calls failing before PVE acted, hanging, or losing their answer after PVE acted; a
//! start task that fails late; a hundred concurrent IncreaseSize; `kill -9` of a real
//! `flotilla serve` during creates and during deletes, then a restart. After each, what PVE
//! holds and what Flotilla reports over gRPC must agree.

#[path = "fakes/proxmox/mod.rs"]
mod fake;
mod support;

use std::time::Duration;

use fake::{Fake, FaultAction};
use support::faults::{
    CALL_FAULTS, Cloud, CloudView, Fault, Op, SETTLE, Serve, cloud_reaches, increase_concurrently, scenario, settle,
};

/// Flotilla on the fake, group `workers` (max 5); core timeouts short enough that a hung PVE
/// call (the driver's own request timeout is a minute) ends in a few seconds.
fn config_text(fake: &Fake, dir: &std::path::Path, cloud_extra: &str) -> String {
    let token = dir.join("token");
    std::fs::write(&token, format!("{}\n", fake::TOKEN_SECRET)).unwrap();
    format!(
        r#"cluster_name = "prod"
[state]
refresh_timeout = "1s"
max_staleness = "4s"
reconcile_interval = "200ms"
[clouds.pve]
driver = "proxmox"
region = "dc1"
url = "{url}"
poll_interval = "10ms"
token_id = "{token_id}"
token_secret = {{ file = "{token}" }}
create_timeout = "4s"
delete_timeout = "4s"
{cloud_extra}
[groups.workers]
cloud = "pve"
max_size = 5
[groups.workers.machine]
template = 9000
"#,
        url = fake.url(),
        token_id = fake::TOKEN_ID,
        token = token.display(),
    )
}

/// PVE as the referee sees it, and its fault hooks.
struct Pve(Fake);

fn vmid(provider_id: &str) -> &str {
    provider_id.strip_prefix("proxmox://dc1/").expect("a proxmox provider id")
}

impl Cloud for Pve {
    fn view(&self) -> CloudView {
        let s = self.0.state();
        s.vms
            .iter()
            .filter(|(_, vm)| !vm.template)
            .filter_map(|(id, vm)| {
                let tags = vm.config.get("tags").cloned().unwrap_or_default();
                let tags: Vec<&str> = tags.split(';').collect();
                let description = vm.config.get("description").cloned().unwrap_or_default();
                let group = match tags.iter().find_map(|t| t.strip_prefix("flotilla-g-")) {
                    Some(g) if tags.contains(&"flotilla-c-prod") => g.to_owned(),
                    // Cloned, not configured yet: known by its description marker.
                    _ => description.strip_prefix("flotilla cluster=prod group=")?.to_owned(),
                };
                let state = if tags.contains(&"flotilla-deleting") {
                    "deleting"
                } else if vm.lock.is_some() {
                    "creating"
                } else if vm.status == "running" && tags.contains(&"flotilla-c-prod") {
                    "running"
                } else {
                    "stopped"
                };
                Some((format!("proxmox://dc1/{id}"), (group, state.to_owned())))
            })
            .collect()
    }

    fn arm(&self, op: Op, fault: Fault, target: Option<&str>) -> bool {
        let (method, suffix) = match (op, target) {
            (Op::Create, _) => ("POST", "qemu/9000/clone".to_owned()),
            (Op::List, _) => ("GET", "cluster/resources".to_owned()),
            (Op::Delete, Some(t)) => ("DELETE", format!("qemu/{}", vmid(t))),
            (Op::Mark, Some(t)) => ("PUT", format!("qemu/{}/config", vmid(t))),
            _ => return false,
        };
        let action = match fault {
            Fault::Ok => return true,
            Fault::Unavailable => {
                FaultAction::Fail { status: 500, message: "unable to connect to pve2 (500 Can't connect)".into() }
            }
            Fault::Hang => FaultAction::Hang { act_first: false },
            Fault::LostResponse => FaultAction::LoseAnswer { status: 596, message: "Connection timed out".into() },
            Fault::HangAfter => FaultAction::Hang { act_first: true },
            // The start task runs, then fails: the clone exists and must be cleaned up.
            Fault::FailLate if op == Op::Create => {
                self.0
                    .state()
                    .faults
                    .fail_next_task
                    .insert("qmstart".into(), "start failed: QEMU exited with code 1".into());
                return true;
            }
            _ => return false,
        };
        self.0.inject(method, &suffix, 1, action);
        true
    }
}

async fn start(dir: &std::path::Path) -> (flotilla::Running, support::Client, Pve) {
    let fake = Fake::start().await;
    let (server, c) = support::start(&config_text(&fake, dir, "")).await;
    (server, c, Pve(fake))
}

async fn faults_on(op: Op, faults: &[Fault]) {
    for &fault in faults {
        let dir = tempfile::tempdir().unwrap();
        let (server, c, pve) = start(dir.path()).await;
        assert!(scenario(&c, &pve, &["workers"], "workers", op, fault).await, "{fault:?} on {op:?} not injected");
        server.stop().await.unwrap();
        pve.0.assert_clean();
    }
}

#[tokio::test]
async fn pve_clones_that_fail_hang_lose_their_answer_or_start_late_leak_nothing() {
    faults_on(Op::Create, &[CALL_FAULTS.as_slice(), &[Fault::FailLate]].concat()).await;
}

#[tokio::test]
async fn pve_destroys_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Delete, &CALL_FAULTS).await;
}

#[tokio::test]
async fn pve_tag_marks_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Mark, &CALL_FAULTS).await;
}

#[tokio::test]
async fn pve_listings_that_fail_hang_or_lose_their_answer_change_nothing() {
    faults_on(Op::List, &CALL_FAULTS).await;
}

#[tokio::test]
async fn a_hundred_concurrent_increases_never_pass_max_size_on_pve() {
    let dir = tempfile::tempdir().unwrap();
    let (server, c, pve) = start(dir.path()).await;
    let accepted = increase_concurrently(&c, "workers", 100).await;
    assert_eq!(accepted, 5);
    let settled = settle(&c, &["workers"], || pve.view(), SETTLE).await;
    assert_eq!(settled.count("workers"), 5);
    server.stop().await.unwrap();
    pve.0.assert_clean();
}

// === kill -9 of a real server ===

#[tokio::test]
async fn kill_9_during_pve_creates_then_restart_leaks_duplicates_and_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pve = Pve(Fake::start().await);
    // Clone and start tasks take a second: Flotilla dies with VMs half made.
    pve.0.state().faults.task_duration = Duration::from_secs(1);
    let text = config_text(&pve.0, dir.path(), "create_concurrency = 2");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 4).await.unwrap();
    cloud_reaches("two clones under way", Duration::from_secs(10), || pve.view(), |v| v.len() >= 2).await;
    serve.kill_9();
    let half_made = pve.view();
    assert!(half_made.values().all(|(_, s)| s != "running"), "killed mid-create: {half_made:?}");
    pve.0.state().faults.task_duration = Duration::from_millis(30);

    // Interrupted creates are found and reported failed; CA deletes them; nothing is left.
    let (serve, c) = Serve::start(dir.path(), &text).await;
    let settled = settle(&c, &["workers"], || pve.view(), SETTLE).await;
    assert_eq!(settled.failed_deleted.len(), half_made.len(), "{settled:?}\n{}", serve.log());
    assert_eq!(settled.count("workers"), 0);
    serve.kill_9();
    pve.0.assert_clean();
}

#[tokio::test]
async fn kill_9_during_pve_deletes_then_restart_finishes_every_accepted_delete() {
    let dir = tempfile::tempdir().unwrap();
    let pve = Pve(Fake::start().await);
    let text = config_text(&pve.0, dir.path(), "delete_concurrency = 1");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    support::increase(&mut c, "workers", 3).await.unwrap();
    let up = settle(&c, &["workers"], || pve.view(), SETTLE).await;
    let victims: Vec<&str> = up.groups["workers"][..2].iter().map(String::as_str).collect();
    // Stop and destroy tasks take a second, one delete at a time: Flotilla dies mid-delete.
    pve.0.state().faults.task_duration = Duration::from_secs(1);
    support::delete(&mut c, "workers", &victims).await.unwrap();
    serve.kill_9();
    let marked = pve.view().values().filter(|(_, s)| s == "deleting").count();
    assert_eq!(marked, 2, "both deletes recorded in PVE before DeleteNodes answered: {:?}", pve.view());
    pve.0.state().faults.task_duration = Duration::from_millis(30);

    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    assert_eq!(support::target_size(&mut c, "workers").await, 1, "the accepted deletes are not forgotten");
    let settled = settle(&c, &["workers"], || pve.view(), SETTLE).await;
    assert_eq!(settled.groups["workers"], [up.groups["workers"][2].clone()], "{}", serve.log());
    support::delete(&mut c, "workers", &victims).await.expect("repeating an accepted delete is a no-op");
    serve.kill_9();
    pve.0.assert_clean();
}
