//! The simulated cloud: machines that exist only as records, with configurable latency, boot
//! time, injected failures and a quota. It is the embedded default, the engine of the tests and
//! benchmarks, and a way to try cluster-autoscaler settings without a cloud.
//!
//! With `state_file` set, machines are kept in a JSON file and outlive the Flotilla process,
//! just as a real cloud's do, so a restart finds them again.
//!
//! Keys of `[clouds.NAME]` (besides the generic ones):
//! `create_latency`, `delete_latency`, `list_latency` (durations, default 0), `boot_time`
//! (how long a new machine reports Creating, default 0), `fail_rate` (0..1, share of creates that
//! fail), `fail_every` (every Nth create fails), `quota` (machines in the whole simulated cloud,
//! past which creates fail with OutOfResources), `state_file`.
//!
//! With `[clouds.NAME.kubernetes] kubeconfig = "path"`, booted machines also register a
//! kwok-managed Node through the Kubernetes API (see [`nodes`]); a group opts out with
//! `[groups.G.machine] register_node = false` (machines that never become Nodes).

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

pub mod kube;
pub mod nodes;

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
    /// `[kubernetes] kubeconfig`: register a Node for each booted machine.
    pub kubeconfig: Option<PathBuf>,
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
            kubeconfig: s.section("kubernetes", p).and_then(|mut k| {
                let path = k.required_string("kubeconfig", p).map(|f| p.resolve(&f));
                k.finish(p);
                path
            }),
        };
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
    /// Unix milliseconds.
    created_at_ms: u64,
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
}

/// The simulated driver's [`Constructor`](super::Constructor): `[clouds.NAME]` keys, and
/// `register_node` of each group's `machine` table.
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<super::SharedDriver> {
    let settings = Settings::parse(&mut setup.section, p);
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
    let registrar = settings.kubeconfig.clone().map(|path| nodes::Registrar::new(path, setup.cluster, registering));
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
    now_ms().saturating_sub(r.created_at_ms) >= boot_time.as_millis() as u64
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
            settings,
            store: Arc::new(Mutex::new(store)),
            registrar: None,
            creates: Mutex::new(0),
            concurrency: Mutex::new((0, 0)),
            faults: Mutex::new(Faults::default()),
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

    /// Adds a machine as if someone else created it (e.g. another cluster, or by hand).
    pub fn insert_foreign(&self, cluster: &str, group: &str, name: &str) {
        let mut store = lock(&self.store);
        store.machines.insert(
            name.to_owned(),
            Record {
                cluster: cluster.to_owned(),
                group: group.to_owned(),
                name: name.to_owned(),
                created_at_ms: now_ms(),
            },
        );
        self.persist(&store);
    }

    /// The most creates that were ever running at once.
    pub fn peak_concurrent_creates(&self) -> usize {
        lock(&self.concurrency).1
    }

    /// Names of every machine in the simulated cloud, any cluster.
    pub fn machine_names(&self) -> Vec<String> {
        lock(&self.store).machines.keys().cloned().collect()
    }

    fn persist(&self, store: &Store) {
        let Some(path) = &self.settings.state_file else { return };
        let text = serde_json::to_string_pretty(store).expect("plain data serializes");
        let tmp = path.with_extension("tmp");
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
        let booted = booted(r, self.settings.boot_time);
        Machine {
            group: r.group.clone(),
            name: r.name.clone(),
            id: r.name.clone(),
            state: if booted { MachineState::Running } else { MachineState::Creating },
        }
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
        tokio::time::sleep(self.settings.list_latency).await;
        self.check_outage()?;
        let machines = {
            let store = lock(&self.store);
            store.machines.values().filter(|r| r.cluster == self.cluster).map(|r| self.machine(r)).collect()
        };
        if let Some(registrar) = &self.registrar {
            let (store, cluster, boot_time) = (Arc::clone(&self.store), self.cluster.clone(), self.settings.boot_time);
            let reg = Arc::clone(registrar);
            registrar.queue_sync(move || {
                let store = lock(&store);
                store
                    .machines
                    .values()
                    .filter(|r| r.cluster == cluster && reg.registers(&r.group) && booted(r, boot_time))
                    .map(|r| nodes::Wanted { group: r.group.clone(), name: r.name.clone() })
                    .collect::<BTreeSet<_>>()
            });
        }
        Ok(machines)
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        {
            let mut c = lock(&self.concurrency);
            c.0 += 1;
            c.1 = c.1.max(c.0);
        }
        tokio::time::sleep(self.settings.create_latency).await;
        lock(&self.concurrency).0 -= 1;
        self.check_outage()?;
        if let Some(e) = self.injected_failure() {
            return Err(e);
        }
        let mut store = lock(&self.store);
        if let Some(quota) = self.settings.quota.filter(|q| store.machines.len() >= *q) {
            return Err(Error::OutOfResources(format!(
                "quota exceeded: {} of {quota} machines in use",
                store.machines.len()
            )));
        }
        if store.machines.contains_key(name) {
            return Err(Error::InvalidRequest(format!("a machine named {name} already exists")));
        }
        let record = Record {
            cluster: self.cluster.clone(),
            group: group.to_owned(),
            name: name.to_owned(),
            created_at_ms: now_ms(),
        };
        let machine = self.machine(&record);
        store.machines.insert(name.to_owned(), record);
        self.persist(&store);
        Ok(machine)
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        tokio::time::sleep(self.settings.delete_latency).await;
        self.check_outage()?;
        let removed = {
            let mut store = lock(&self.store);
            match store.machines.get(&machine.id) {
                Some(r) if r.cluster == self.cluster && r.group == machine.group => {
                    store.machines.remove(&machine.id);
                    self.persist(&store);
                    Ok(())
                }
                // Someone else's machine: refuse, never touch it.
                Some(_) => {
                    Err(Error::InvalidRequest(format!("machine {} is not owned by this cluster and group", machine.id)))
                }
                None => Err(Error::NotFound(format!("machine {}", machine.id))),
            }
        };
        removed?;
        if let Some(registrar) = &self.registrar {
            // The machine is gone whatever happens here: a Node left behind is removed by the
            // next listing's sync.
            if let Err(e) = registrar.remove(&machine.group, &machine.name).await {
                tracing::warn!(group = %machine.group, node = %machine.name, error = %e, "cannot remove node, will retry");
            }
        }
        Ok(())
    }

    async fn check(&self) -> Result<()> {
        self.check_outage()
    }
}
