//! The fault suite's referee: plays cluster-autoscaler until the fleet settles, then compares
//! what the cloud holds with what Flotilla reports over gRPC and fails on any difference.

use std::{collections::BTreeMap, time::Duration};

use flotilla::proto::externalgrpc::instance_status::InstanceState;

use super::{Client, delete, eventually, increase, nodes, refresh, target_size};

/// What the cloud really holds, read past Flotilla: provider id -> (group, state), for every
/// machine of the cluster under test.
pub type CloudView = BTreeMap<String, (String, String)>;

/// How a settled fleet looks, per group.
#[derive(Debug, Default)]
pub struct Settled {
    /// Failed instances cluster-autoscaler deleted on the way (each with its error code).
    pub failed_deleted: Vec<String>,
    /// Provider ids per group once settled.
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Settled {
    pub fn count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, Vec::len)
    }
}

/// Plays cluster-autoscaler's loop (Refresh, then DeleteNodes for every instance reported with
/// errorInfo) until, for every group, Flotilla reports exactly the machines the cloud holds,
/// all running, with the target size equal to their number. Panics with the difference after
/// `limit`.
pub async fn settle<F>(c: &Client, groups: &[&str], cloud: F, limit: Duration) -> Settled
where
    F: Fn() -> CloudView,
{
    let mut failed_deleted = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut c = c.clone();
        let _ = refresh(&mut c).await;
        let mut reported = BTreeMap::new();
        let mut all_settled = true;
        for &g in groups {
            let instances = nodes(&mut c, g).await;
            let failed: Vec<String> = instances
                .iter()
                .filter_map(|(id, _, e)| e.as_ref().filter(|e| !e.error_code.is_empty()).map(|e| (id, e)))
                .map(|(id, e)| {
                    failed_deleted.push(e.error_code.clone());
                    id.clone()
                })
                .collect();
            if !failed.is_empty() {
                let ids: Vec<&str> = failed.iter().map(String::as_str).collect();
                delete(&mut c, g, &ids).await.unwrap_or_else(|s| panic!("CA's delete of failed instances: {s:?}"));
                all_settled = false;
            }
            let target = target_size(&mut c, g).await;
            let running: Vec<String> = instances
                .iter()
                .filter(|(_, s, e)| *s == InstanceState::InstanceRunning && e.is_none())
                .map(|(id, _, _)| id.clone())
                .collect();
            all_settled &= running.len() == instances.len() && target as usize == running.len();
            reported.insert(g.to_owned(), (running, instances, target));
        }
        let view = cloud();
        let mut by_group: BTreeMap<&str, Vec<String>> = groups.iter().map(|g| (*g, Vec::new())).collect();
        let mut strangers = Vec::new();
        for (id, (group, state)) in &view {
            match by_group.get_mut(group.as_str()) {
                Some(ids) if state == "running" => ids.push(id.clone()),
                Some(_) => all_settled = false,
                None => strangers.push(id.clone()),
            }
        }
        assert!(strangers.is_empty(), "machines of no configured group in the cloud: {strangers:?}");
        for (g, ids) in &by_group {
            all_settled &= reported[*g].0 == *ids;
        }
        if all_settled {
            let groups = reported.into_iter().map(|(g, (running, _, _))| (g, running)).collect();
            return Settled { failed_deleted, groups };
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the fleet did not settle within {limit:?} into what the cloud holds:\ncloud holds {view:#?}\n\
                 Flotilla reports (running, all, target) {reported:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` holds for the cloud (e.g. "two machines accepted").
pub async fn cloud_reaches<F>(what: &str, limit: Duration, cloud: F, check: impl Fn(&CloudView) -> bool) -> CloudView
where
    F: Fn() -> CloudView,
{
    eventually(limit, what, || {
        let view = cloud();
        let ok = check(&view);
        async move { ok.then_some(view) }
    })
    .await
}

/// A cloud under test, seen past Flotilla: what it holds, and its fault hooks in the suite's
/// terms (the simulated cloud's [`Fault`] and [`Op`]).
pub trait Cloud: Sync {
    /// What the cloud holds now.
    fn view(&self) -> CloudView;
    /// Arms `fault` for the next call of `op`; deletes and marks name their machine's
    /// provider id in `target`. False when this cloud's fake cannot inject it.
    fn arm(&self, op: Op, fault: Fault, target: Option<&str>) -> bool;
    /// True when this cloud's driver finds the machine of a create whose answer was lost after
    /// the cloud acted and adopts it (it is then never a failed create).
    fn adopts_lost_creates(&self) -> bool {
        false
    }
}

pub use flotilla::driver::simulated::faults::{Fault, Op};

/// The faults every cloud's calls must survive: a 5xx, a hang, an answer lost after the cloud
/// acted, a hang after the cloud acted, and (as a control) none.
pub const CALL_FAULTS: [Fault; 5] = [Fault::Unavailable, Fault::Hang, Fault::LostResponse, Fault::HangAfter, Fault::Ok];

/// Scales `group` up by 4 and settles, then deletes two machines and settles, with `fault`
/// armed for two calls of `op` in each phase. The cloud and Flotilla must agree after each
/// phase, and the counts add up: every machine asked for runs, or was reported failed and
/// deleted by cluster-autoscaler. `groups` lists every group to watch. Skips (returns false)
/// faults the cloud cannot inject.
pub async fn scenario(c: &Client, cloud: &dyn Cloud, groups: &[&str], group: &str, op: Op, fault: Fault) -> bool {
    let case = format!("{fault:?} on {op:?}");
    let mut c = c.clone();
    let view = || cloud.view();
    // The first listing lands before faults start.
    target_size(&mut c, group).await;
    if op == Op::Create || op == Op::List {
        for _ in 0..2 {
            if !cloud.arm(op, fault, None) {
                return false;
            }
        }
    }
    super::increase(&mut c, group, 4).await.unwrap_or_else(|s| panic!("{case}: {s:?}"));
    let up = settle(&c, groups, view, SETTLE).await;
    assert_eq!(up.count(group) + up.failed_deleted.len(), 4, "{case}: machines forgotten or duplicated: {up:?}");
    let adopted = cloud.adopts_lost_creates() && matches!(fault, Fault::LostResponse | Fault::HangAfter);
    if op == Op::Create && adopted {
        assert!(up.failed_deleted.is_empty(), "{case}: the machines made were adopted: {up:?}");
    } else if op == Op::Create && fault != Fault::Ok {
        assert!(!up.failed_deleted.is_empty(), "{case}: the fault never reached cluster-autoscaler as a failed create");
    }

    let victims: Vec<String> = up.groups[group].iter().take(2).cloned().collect();
    match op {
        Op::Delete | Op::Mark => {
            for v in &victims {
                if !cloud.arm(op, fault, Some(v)) {
                    return false;
                }
            }
        }
        _ => {
            for _ in 0..2 {
                cloud.arm(op, fault, None);
            }
        }
    }
    let ids: Vec<&str> = victims.iter().map(String::as_str).collect();
    delete(&mut c, group, &ids).await.unwrap_or_else(|s| panic!("{case}: {s:?}"));
    // Repeated at once, as CA does when its cache is stale: a no-op.
    delete(&mut c, group, &ids).await.unwrap_or_else(|s| panic!("{case}: repeated delete: {s:?}"));
    let down = settle(&c, groups, view, SETTLE).await;
    assert_eq!(down.count(group) + down.failed_deleted.len(), up.count(group) - victims.len(), "{case}: {down:?}");
    for v in &victims {
        assert!(!down.groups[group].contains(v), "{case}: {v} came back");
    }
    delete(&mut c, group, &ids).await.unwrap_or_else(|s| panic!("{case}: delete after the end: {s:?}"));
    true
}

/// How long the suite lets a fleet take to settle.
pub const SETTLE: Duration = Duration::from_secs(45);

/// A `flotilla serve` process, for `kill -9`.
pub struct Serve {
    child: std::process::Child,
    log: std::path::PathBuf,
}

impl Serve {
    /// Runs the binary on configuration `text` (without `[server]`: this adds one with a free
    /// loopback port) and waits until it answers.
    pub async fn start(dir: &std::path::Path, text: &str) -> (Serve, Client) {
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let config = dir.join("flotilla.toml");
        std::fs::write(
            &config,
            format!(
                "{text}\n[server]\ngrpc_listen = \"{addr}\"\nhttp_listen = \"off\"\n[log]\nlevel = \"flotilla=debug,info\"\n"
            ),
        )
        .unwrap();
        let log = dir.join(format!("serve-{port}.log"));
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_flotilla"))
            .args(["serve", "--config"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        let mut serve = Serve { child, log };
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(client) = super::CloudProviderClient::connect(format!("http://{addr}")).await {
                return (serve, client);
            }
            if let Some(status) = serve.child.try_wait().unwrap() {
                panic!("flotilla serve exited with {status}:\n{}", serve.log());
            }
            assert!(std::time::Instant::now() < deadline, "flotilla serve does not answer:\n{}", serve.log());
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL: no shutdown, no grace, nothing written on the way out.
    pub fn kill_9(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `calls` concurrent `NodeGroupIncreaseSize(group, 1)`, as many cluster-autoscaler loops at
/// once; returns how many were accepted.
pub async fn increase_concurrently(c: &Client, group: &str, calls: usize) -> usize {
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..calls {
        let mut c = c.clone();
        let group = group.to_owned();
        set.spawn(async move { increase(&mut c, &group, 1).await.is_ok() });
    }
    set.join_all().await.into_iter().filter(|ok| *ok).count()
}
