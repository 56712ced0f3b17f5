//! The simulated cloud: machines that exist only as records, with configurable latency, boot
//! time, injected failures and a quota. It is the embedded default, the engine of the tests and
//! benchmarks, and a way to try cluster-autoscaler settings without a cloud.
//!
//! With `state_file` set, machines are kept in a JSON file and outlive the Flotilla process,
//! just as a real cloud's do, so a restart finds them again.
//!
//! Keys of `[clouds.NAME]` (besides the generic ones):
//! `create_latency`, `delete_latency`, `list_latency` (durations, default 0), `boot_time`
//! (how long a new machine reports Creating once its create returned, default 0), `fail_rate`
//! (0..1, share of creates that fail), `fail_every` (every Nth create fails), `quota` (machines
//! in the whole simulated cloud, past which creates fail with OutOfResources), `state_file`, and
//! a `faults` table of injected faults (see [`faults`]).
//!
//! Like a real cloud, the simulated one holds a machine from the moment a create is accepted:
//! the machine is listed as Creating while the create call runs (`create_latency`) and boots on
//! its own even if the caller goes away. A delete first marks the machine
//! ([`Driver::mark_deleting`]: listed as Deleting from then on, also in `state_file`), then
//! removes it after `delete_latency`.
//!
//! With `register_nodes = true`, booted machines also register a kwok-managed Node through
//! the Kubernetes API that `[kubernetes]` names (see [`nodes`]); a group opts out with
//! `[groups.G.machine] register_node = false` (machines that never become Nodes).
//! `remove_nodes` (default true) makes the simulated cloud delete the Nodes of machines that
//! are gone, as a cloud controller manager does; set it to false to see a cluster without one
//! (and Flotilla's own `node_cleanup`).
//!
//! With `state_file`, the file is read again before every call, so several Flotilla processes
//! on one file see one cloud (as the replicas of a leader-elected Deployment see one real cloud).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use super::{Driver, Error, Machine, MachineRef, MachineState, Result};
use crate::config::{Problems, Section};

pub mod faults;
pub mod nodes;

use faults::{Fault, FaultPlan, Op};

/// Settings of one simulated cloud.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    pub create_latency: Duration,
    pub delete_latency: Duration,
    pub list_latency: Duration,
    pub boot_time: Duration,
    pub fail_rate: f64,
    pub fail_every: u64,
    pub quota: Option<usize>,
    pub state_file: Option<PathBuf>,
    /// Register a Node for each booted machine (through `[kubernetes]`).
    pub register_nodes: bool,
    /// Delete the Nodes of machines that are gone, as a cloud controller manager does.
    pub remove_nodes: bool,
    /// `[faults]`: faults to inject, per operation, in call order.
    pub faults: Vec<(Op, Fault)>,
    /// Warm pools: how long a stop and a start call take (a started machine then boots for
    /// `boot_time`).
    pub stop_latency: Duration,
    pub start_latency: Duration,
    /// Groups with a warm pool: their stopped machines are listed as Stopped (elsewhere as
    /// failed). Filled from the groups' `warm_pool`.
    pub pool_groups: BTreeSet<String>,
}

impl Settings {
    /// Reads the driver's keys of a `[clouds.NAME]` table.
    pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> Settings {
        let settings = Settings {
            create_latency: s.duration("create_latency", p).unwrap_or_default(),
            delete_latency: s.duration("delete_latency", p).unwrap_or_default(),
            list_latency: s.duration("list_latency", p).unwrap_or_default(),
            boot_time: s.duration("boot_time", p).unwrap_or_default(),
            fail_rate: s.float("fail_rate", p).unwrap_or(0.0),
            fail_every: s.integer("fail_every", p).unwrap_or(0),
            quota: s.integer("quota", p),
            state_file: s.string("state_file", p).map(|f| p.resolve(&f)),
            register_nodes: s.boolean("register_nodes", p).unwrap_or(false),
            stop_latency: s.duration("stop_latency", p).unwrap_or_default(),
            start_latency: s.duration("start_latency", p).unwrap_or_default(),
            pool_groups: BTreeSet::new(),
            remove_nodes: s.boolean("remove_nodes", p).unwrap_or(true),
            faults: s
                .section("faults", p)
                .map(|mut f| {
                    let plan = FaultPlan::parse(&mut f, p);
                    f.finish(p);
                    plan
                })
                .unwrap_or_default(),
        };
        if s.contains("kubernetes") {
            s.ignore("kubernetes");
            p.push(
                s.key_path("kubernetes"),
                "the Kubernetes API is now set once for everything in the top-level [kubernetes] table \
                 (kubeconfig = \"...\"); write register_nodes = true here",
            );
        }
        if !(0.0..=1.0).contains(&settings.fail_rate) {
            p.push(s.key_path("fail_rate"), "must be between 0 and 1");
        }
        settings
    }
}

/// One simulated machine, as stored.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
struct Record {
    cluster: String,
    group: String,
    name: String,
    /// Unix milliseconds: when the create was accepted.
    created_at_ms: u64,
    /// How long after `created_at_ms` the machine runs (create latency + boot time when it was
    /// created). Absent in files of older versions: the configured boot time then.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ready_after_ms: Option<u64>,
    /// Marked by `mark_deleting`: listed as Deleting.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    deleting: bool,
    /// Left behind by a create that failed late and could not clean up: listed as failed.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    failed: bool,
    /// Stopped (warm pool): listed as Stopped in groups with a warm pool.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    stopped: bool,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Store {
    machines: BTreeMap<String, Record>,
}

/// Failures a test can inject at run time.
#[derive(Debug, Default)]
struct Faults {
    /// While set, every call fails with `Unavailable` (the cloud is down).
    outage: bool,
    /// The next N creates fail with `OutOfResources`.
    quota_failures: u32,
}

#[derive(Debug)]
pub struct Simulated {
    cluster: String,
    settings: Settings,
    /// Shared with the node registrar's syncs, which read which machines have booted.
    store: Arc<Mutex<Store>>,
    registrar: Option<Arc<nodes::Registrar>>,
    /// Creates attempted so far (for `fail_every`).
    creates: Mutex<u64>,
    /// Creates running now, and the most ever seen at once.
    concurrency: Mutex<(usize, usize)>,
    faults: Mutex<Faults>,
    plan: FaultPlan,
}

/// The simulated driver's [`Constructor`](super::Constructor): `[clouds.NAME]` keys, and
/// `register_node` of each group's `machine` table.
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<super::SharedDriver> {
    let mut settings = Settings::parse(&mut setup.section, p);
    settings.pool_groups =
        setup.groups.iter().filter(|g| g.config.warm_pool > 0).map(|g| g.config.name.clone()).collect();
    let mut registering = BTreeMap::new();
    for g in &mut setup.groups {
        if g.machine.boolean("register_node", p).unwrap_or(true) {
            let shape = nodes::GroupNodes {
                template: crate::template::Template::build(g.config, super::Shape::default(), setup.gpu_label),
                provider_id: g.config.provider_id.clone(),
                region: setup.cloud.region.clone(),
            };
            registering.insert(g.config.name.clone(), shape);
        }
    }
    let registrar = settings
        .register_nodes
        .then(|| nodes::Registrar::new(setup.kube.clone(), setup.cluster, registering, settings.remove_nodes));
    match Simulated::new(setup.cluster, settings) {
        Ok(d) => Some(Arc::new(match registrar {
            Some(r) => d.with_registrar(r),
            None => d,
        })),
        Err(e) => {
            p.push(setup.section.key_path("state_file"), format!("cannot load: {e}"));
            None
        }
    }
}

fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

fn booted(r: &Record, boot_time: Duration) -> bool {
    let ready_after = r.ready_after_ms.unwrap_or(boot_time.as_millis() as u64);
    now_ms().saturating_sub(r.created_at_ms) >= ready_after
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Simulated {
    /// A simulated cloud for `cluster`; loads `state_file` if it exists.
    pub fn new(cluster: &str, settings: Settings) -> std::io::Result<Simulated> {
        let store = match &settings.state_file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path)?;
                serde_json::from_str(&text).map_err(|e| std::io::Error::other(format!("{}: {e}", path.display())))?
            }
            _ => Store::default(),
        };
        Ok(Simulated {
            cluster: cluster.to_owned(),
            store: Arc::new(Mutex::new(store)),
            registrar: None,
            creates: Mutex::new(0),
            concurrency: Mutex::new((0, 0)),
            faults: Mutex::new(Faults::default()),
            plan: {
                let plan = FaultPlan::default();
                for &(op, fault) in &settings.faults {
                    plan.push(op, fault);
                }
                plan
            },
            settings,
        })
    }

    /// Registers Nodes for booted machines through `registrar` (see [`nodes`]).
    pub fn with_registrar(mut self, registrar: nodes::Registrar) -> Simulated {
        self.registrar = Some(Arc::new(registrar));
        self
    }

    /// Starts or ends a simulated outage: every call fails with `Unavailable`.
    pub fn set_outage(&self, down: bool) {
        lock(&self.faults).outage = down;
    }

    /// Makes the next `n` creates fail with a quota error.
    pub fn fail_next_creates_with_quota(&self, n: u32) {
        lock(&self.faults).quota_failures = n;
    }

    /// The fault plan: faults to inject into coming calls.
    pub fn faults(&self) -> &FaultPlan {
        &self.plan
    }

    /// Adds a machine as if someone else created it (e.g. another cluster, or by hand).
    pub fn insert_foreign(&self, cluster: &str, group: &str, name: &str) {
        let mut store = self.current();
        store.machines.insert(
            name.to_owned(),
            Record {
                cluster: cluster.to_owned(),
                group: group.to_owned(),
                name: name.to_owned(),
                created_at_ms: now_ms(),
                ready_after_ms: Some(0),
                deleting: false,
                failed: false,
                stopped: false,
            },
        );
        self.persist(&store);
    }

    /// Removes a machine behind Flotilla's back (deleted by hand, or lost by the cloud).
    pub fn vanish(&self, name: &str) {
        let mut store = self.current();
        store.machines.remove(name);
        self.persist(&store);
    }

    /// Every machine of this cluster as a listing would return it now, without faults or
    /// latency: what the cloud really holds, for tests to compare with what Flotilla reports.
    pub fn machines(&self) -> Vec<Machine> {
        self.current().machines.values().filter(|r| r.cluster == self.cluster).map(|r| self.machine(r)).collect()
    }

    /// The most creates that were ever running at once.
    pub fn peak_concurrent_creates(&self) -> usize {
        lock(&self.concurrency).1
    }

    /// Names of every machine in the simulated cloud, any cluster.
    pub fn machine_names(&self) -> Vec<String> {
        self.current().machines.keys().cloned().collect()
    }

    /// The store, read again from `state_file` if there is one (another process may have
    /// changed it).
    fn current(&self) -> std::sync::MutexGuard<'_, Store> {
        let mut store = lock(&self.store);
        if let Some(path) = &self.settings.state_file {
            match std::fs::read_to_string(path) {
                Ok(text) => match serde_json::from_str(&text) {
                    Ok(fresh) => *store = fresh,
                    Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot parse simulated state file"),
                },
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot read simulated state file"),
            }
        }
        store
    }

    /// `machine`'s record in `store`, if it is this cluster's and group's: someone else's
    /// machine is refused, never touched.
    fn owned<'a>(&self, store: &'a mut Store, machine: &MachineRef) -> Result<&'a mut Record> {
        match store.machines.get_mut(&machine.id) {
            Some(r) if r.cluster == self.cluster && r.group == machine.group => Ok(r),
            Some(_) => {
                Err(Error::InvalidRequest(format!("machine {} is not owned by this cluster and group", machine.id)))
            }
            None => Err(Error::NotFound(format!("machine {}", machine.id))),
        }
    }

    fn persist(&self, store: &Store) {
        let Some(path) = &self.settings.state_file else { return };
        let text = serde_json::to_string_pretty(store).expect("plain data serializes");
        // Per process, so two processes writing at once never share a half-written file.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        // Written then renamed, so a crash never leaves half a file.
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::error!(path = %path.display(), error = %e, "cannot write simulated state file");
        }
    }

    fn check_outage(&self) -> Result<()> {
        if lock(&self.faults).outage {
            return Err(Error::Unavailable("simulated outage".into()));
        }
        Ok(())
    }

    fn machine(&self, r: &Record) -> Machine {
        let state = if r.failed {
            MachineState::Failed(super::CreateFailure {
                class: super::ErrorClass::Other,
                code: "SIMULATED_FAILURE".into(),
                message: "simulated machine failed to start".into(),
            })
        } else if r.deleting {
            MachineState::Deleting
        } else if r.stopped && self.settings.pool_groups.contains(&r.group) {
            MachineState::Stopped
        } else if r.stopped {
            MachineState::Failed(super::CreateFailure {
                class: super::ErrorClass::Other,
                code: "STOPPED".into(),
                message: "simulated machine is stopped".into(),
            })
        } else if booted(r, self.settings.boot_time) {
            MachineState::Running
        } else {
            MachineState::Creating
        };
        Machine { group: r.group.clone(), name: r.name.clone(), id: r.name.clone(), state }
    }

    /// Decides whether this create fails, from the injected faults and the settings.
    fn injected_failure(&self) -> Option<Error> {
        {
            let mut faults = lock(&self.faults);
            if faults.quota_failures > 0 {
                faults.quota_failures -= 1;
                return Some(Error::OutOfResources("simulated quota exceeded".into()));
            }
        }
        let attempt = {
            let mut n = lock(&self.creates);
            *n += 1;
            *n
        };
        if self.settings.fail_every > 0 && attempt % self.settings.fail_every == 0 {
            return Some(Error::Other(format!("simulated failure (every {}th create)", self.settings.fail_every)));
        }
        if self.settings.fail_rate > 0.0 && rand::random::<f64>() < self.settings.fail_rate {
            return Some(Error::Other("simulated failure (fail_rate)".into()));
        }
        None
    }
}

#[async_trait]
impl Driver for Simulated {
    fn kind(&self) -> &'static str {
        "simulated"
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let machines = match self.plan.next(Op::List) {
            Fault::Unavailable | Fault::LostResponse => {
                tokio::time::sleep(self.settings.list_latency).await;
                return Err(Error::Unavailable("simulated 503 on list".into()));
            }
            Fault::Hang | Fault::HangAfter => return faults::hang().await,
            Fault::Stale => {
                let then = self.machines();
                tokio::time::sleep(self.settings.list_latency).await;
                self.check_outage()?;
                then
            }
            _ => {
                tokio::time::sleep(self.settings.list_latency).await;
                self.check_outage()?;
                self.machines()
            }
        };
        if let Some(registrar) = &self.registrar {
            let (store, cluster, boot_time) = (Arc::clone(&self.store), self.cluster.clone(), self.settings.boot_time);
            let reg = Arc::clone(registrar);
            registrar.queue_sync(move || {
                let store = lock(&store);
                store
                    .machines
                    .values()
                    .filter(|r| {
                        r.cluster == cluster
                            && reg.registers(&r.group)
                            && !r.failed
                            && !r.stopped
                            && booted(r, boot_time)
                    })
                    .map(|r| nodes::Wanted { group: r.group.clone(), name: r.name.clone() })
                    .collect::<BTreeSet<_>>()
            });
        }
        Ok(machines)
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        let fault = self.plan.next(Op::Create);
        match fault {
            Fault::Unavailable => return Err(Error::Unavailable("simulated 503 on create".into())),
            Fault::Hang => return faults::hang().await,
            _ => {}
        }
        self.check_outage()?;
        if let Some(e) = self.injected_failure() {
            return Err(e);
        }
        {
            let mut store = self.current();
            if let Some(quota) = self.settings.quota.filter(|q| store.machines.len() >= *q) {
                return Err(Error::OutOfResources(format!(
                    "quota exceeded: {} of {quota} machines in use",
                    store.machines.len()
                )));
            }
            if store.machines.contains_key(name) {
                return Err(Error::InvalidRequest(format!("a machine named {name} already exists")));
            }
            // Accepted: from now on the cloud holds the machine, whatever happens to this call.
            let record = Record {
                cluster: self.cluster.clone(),
                group: group.to_owned(),
                name: name.to_owned(),
                created_at_ms: now_ms(),
                ready_after_ms: Some(
                    millis(self.settings.create_latency).saturating_add(millis(self.settings.boot_time)),
                ),
                deleting: false,
                failed: false,
                stopped: false,
            };
            store.machines.insert(name.to_owned(), record);
            self.persist(&store);
        }
        {
            let mut c = lock(&self.concurrency);
            c.0 += 1;
            c.1 = c.1.max(c.0);
        }
        tokio::time::sleep(self.settings.create_latency).await;
        lock(&self.concurrency).0 -= 1;
        let mut store = self.current();
        match fault {
            Fault::LostResponse => return Err(Error::Unavailable("simulated: the create's answer was lost".into())),
            Fault::HangAfter => {
                drop(store);
                return faults::hang().await;
            }
            Fault::FailLate => {
                store.machines.remove(name);
                self.persist(&store);
                return Err(Error::Other("simulated late failure: the machine did not start".into()));
            }
            Fault::FailLateLeaked => {
                if let Some(r) = store.machines.get_mut(name) {
                    r.failed = true;
                }
                self.persist(&store);
                return Err(Error::Other(
                    "simulated late failure: the machine did not start, nor could it be removed".into(),
                ));
            }
            _ => {}
        }
        match store.machines.get(name) {
            Some(r) => Ok(self.machine(r)),
            None => Err(Error::Other(format!("machine {name} vanished while being created"))),
        }
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        let fault = self.plan.next(Op::Mark);
        match fault {
            Fault::Unavailable => return Err(Error::Unavailable("simulated 503 on mark".into())),
            Fault::Hang => return faults::hang().await,
            _ => {}
        }
        self.check_outage()?;
        {
            let mut store = self.current();
            self.owned(&mut store, machine)?.deleting = true;
            self.persist(&store);
        }
        match fault {
            Fault::LostResponse => Err(Error::Unavailable("simulated: the mark's answer was lost".into())),
            Fault::HangAfter => faults::hang().await,
            _ => Ok(()),
        }
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let fault = self.plan.next(Op::Delete);
        match fault {
            Fault::Unavailable => {
                tokio::time::sleep(self.settings.delete_latency).await;
                return Err(Error::Unavailable("simulated 503 on delete".into()));
            }
            Fault::Hang => return faults::hang().await,
            _ => {}
        }
        tokio::time::sleep(self.settings.delete_latency).await;
        self.check_outage()?;
        {
            let mut store = self.current();
            self.owned(&mut store, machine)?;
            store.machines.remove(&machine.id);
            self.persist(&store);
        }
        if let Some(registrar) = &self.registrar {
            // The machine is gone whatever happens here: a Node left behind is removed by the
            // next listing's sync.
            if let Err(e) = registrar.remove(&machine.group, &machine.name).await {
                tracing::warn!(group = %machine.group, node = %machine.name, error = %e, "cannot remove node, will retry");
            }
        }
        match fault {
            Fault::LostResponse => Err(Error::Unavailable("simulated: the delete's answer was lost".into())),
            Fault::HangAfter => faults::hang().await,
            _ => Ok(()),
        }
    }

    fn can_stop(&self) -> bool {
        true
    }

    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        let fault = self.plan.next(Op::Stop);
        match fault {
            Fault::Unavailable => return Err(Error::Unavailable("simulated 503 on stop".into())),
            Fault::Hang => return faults::hang().await,
            _ => {}
        }
        tokio::time::sleep(self.settings.stop_latency).await;
        self.check_outage()?;
        {
            let mut store = self.current();
            self.owned(&mut store, machine)?.stopped = true;
            self.persist(&store);
        }
        match fault {
            Fault::LostResponse => Err(Error::Unavailable("simulated: the stop's answer was lost".into())),
            Fault::HangAfter => faults::hang().await,
            _ => Ok(()),
        }
    }

    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        let fault = self.plan.next(Op::Start);
        match fault {
            Fault::Unavailable => return Err(Error::Unavailable("simulated 503 on start".into())),
            Fault::Hang => return faults::hang().await,
            _ => {}
        }
        tokio::time::sleep(self.settings.start_latency).await;
        self.check_outage()?;
        let started = {
            let mut store = self.current();
            let record = self.owned(&mut store, machine)?;
            if record.failed {
                return Err(Error::Other(format!("machine {} is broken and cannot start", machine.id)));
            }
            if record.stopped {
                // It boots again, as a new machine would, but without being created.
                record.stopped = false;
                record.created_at_ms = now_ms();
                record.ready_after_ms = Some(millis(self.settings.boot_time));
            }
            let started = self.machine(record);
            self.persist(&store);
            started
        };
        match fault {
            Fault::LostResponse => Err(Error::Unavailable("simulated: the start's answer was lost".into())),
            Fault::HangAfter => faults::hang().await,
            _ => Ok(started),
        }
    }

    async fn check(&self) -> Result<()> {
        self.check_outage()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn two_processes_on_one_state_file_see_one_cloud() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { state_file: Some(dir.path().join("state.json")), ..Default::default() };
        let a = Simulated::new("c", settings.clone()).unwrap();
        let b = Simulated::new("c", settings).unwrap();
        a.create("g", "m1").await.unwrap();
        assert_eq!(b.list().await.unwrap().len(), 1, "b sees what a created");
        b.delete(&MachineRef { group: "g".into(), name: "m1".into(), id: "m1".into() }).await.unwrap();
        b.create("g", "m2").await.unwrap();
        let names: Vec<_> = a.list().await.unwrap().into_iter().map(|m| m.name).collect();
        assert_eq!(names, ["m2"], "a sees what b deleted and created");
    }

    fn machine(name: &str) -> MachineRef {
        MachineRef { group: "g".into(), name: name.into(), id: name.into() }
    }

    #[tokio::test]
    async fn a_mark_is_kept_in_the_state_file_and_listed_as_deleting_after_a_reload() {
        let dir = tempfile::tempdir().unwrap();
        let settings = Settings { state_file: Some(dir.path().join("cloud.json")), ..Settings::default() };
        let sim = Simulated::new("t", settings.clone()).unwrap();
        sim.create("g", "a").await.unwrap();
        sim.create("g", "b").await.unwrap();
        sim.mark_deleting(&machine("a")).await.unwrap();
        assert!(matches!(sim.mark_deleting(&machine("gone")).await, Err(Error::NotFound(_))));
        let reloaded = Simulated::new("t", settings).unwrap();
        let states: Vec<_> = reloaded.list().await.unwrap().into_iter().map(|m| (m.name, m.state)).collect();
        assert_eq!(states, [("a".into(), MachineState::Deleting), ("b".into(), MachineState::Running)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_create_holds_its_machine_from_the_start_even_if_the_caller_goes_away() {
        let settings = Settings { create_latency: Duration::from_secs(60), ..Settings::default() };
        let sim = Arc::new(Simulated::new("t", settings).unwrap());
        let create = tokio::spawn({
            let sim = Arc::clone(&sim);
            async move { sim.create("g", "a").await }
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(sim.machines()[0].state, MachineState::Creating);
        create.abort();
        assert_eq!(sim.machine_names(), ["a"], "the cloud keeps what it accepted");
    }

    #[tokio::test]
    async fn configured_faults_apply_to_calls_in_order() {
        let table: toml::Table =
            "[faults]\ncreate = [\"ok\", \"lost_response\", \"fail_late\", \"fail_late_leaked\"]\n\
                                  delete = [\"unavailable\", \"lost_response\"]\nlist = [\"unavailable\"]\n"
                .parse()
                .unwrap();
        let mut p = Problems::default();
        let settings = Settings::parse(&mut Section::new("clouds.sim", &table), &mut p);
        assert!(p.is_empty(), "{p}");
        let sim = Simulated::new("t", settings).unwrap();
        assert!(matches!(sim.list().await, Err(Error::Unavailable(_))));
        assert!(sim.create("g", "a").await.is_ok());
        assert!(matches!(sim.create("g", "b").await, Err(Error::Unavailable(_))), "answer lost");
        assert!(matches!(sim.create("g", "c").await, Err(Error::Other(_))), "late failure");
        assert!(matches!(sim.create("g", "d").await, Err(Error::Other(_))), "late failure, leaked");
        let states: Vec<_> = sim.list().await.unwrap().into_iter().map(|m| (m.name, m.state)).collect();
        assert_eq!(states.len(), 3, "{states:?}");
        assert_eq!(&states[0..2], [("a".into(), MachineState::Running), ("b".into(), MachineState::Running)]);
        assert!(matches!(states[2], (ref n, MachineState::Failed(_)) if n == "d"));
        assert!(matches!(sim.delete(&machine("a")).await, Err(Error::Unavailable(_))));
        assert_eq!(sim.machine_names().len(), 3, "a 503 deletes nothing");
        assert!(matches!(sim.delete(&machine("a")).await, Err(Error::Unavailable(_))));
        assert_eq!(sim.machine_names().len(), 2, "a lost answer still deleted it");
        assert!(matches!(sim.delete(&machine("a")).await, Err(Error::NotFound(_))));
    }

    #[test]
    fn unknown_or_misplaced_faults_are_reported_with_their_key_path() {
        let table: toml::Table = "[faults]\ncreate = [\"boom\"]\ndelete = [\"fail_late\"]\n".parse().unwrap();
        let mut p = Problems::default();
        Settings::parse(&mut Section::new("clouds.sim", &table), &mut p);
        let paths: Vec<_> = p.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["clouds.sim.faults.create[0]", "clouds.sim.faults.delete[0]"]);
    }
}
