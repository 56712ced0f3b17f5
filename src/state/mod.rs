//! The fleet: every group's machines as Flotilla last saw them, the creates and deletes in
//! flight, and the reconcile that brings both together.
//!
//! # Who writes what
//! * [`Fleet::reconcile_cloud`] replaces a cloud's machines with what one listing returned; the
//!   listing is the source of truth, so a restart loses nothing.
//! * RPC handlers ([`Fleet::increase`], [`Fleet::delete_nodes`], [`Fleet::decrease`]) record
//!   intent under the write lock and return at once; background tasks (bounded per cloud by a
//!   semaphore) do the cloud calls and write the outcome back.
//! * Hot RPCs (`NodeGroupForNode`, `NodeGroupTargetSize`, `NodeGroupNodes`) only take the read
//!   lock; they never call a cloud.
//!
//! The lock is a `std` lock held for short, synchronous sections only, never across an await.
//!
//! # Races a listing can lose
//! A listing started at `T` may be applied after a create returned (the machine is absent from
//! it) or after a delete finished (the machine is still in it). Entries therefore remember when
//! they were last confirmed, and finished deletes leave a tombstone; a listing never overrides
//! anything newer than its own start.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard},
    time::Duration,
};

use tokio::{
    sync::{Notify, OnceCell, Semaphore, mpsc},
    time::Instant,
};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{debug, info, warn};

use crate::{
    config::{CloudConfig, Config, GroupConfig, StateConfig},
    driver::{self, CreateFailure, Machine, MachineRef, MachineState, SharedDriver},
    provider_id::{Parts, ProviderIdFormat},
    telemetry::metrics::Metrics,
    template::Template,
};

/// How long a finished delete is remembered, so a repeated `DeleteNodes` for it is a no-op and a
/// listing that started before it finished cannot bring it back.
const TOMBSTONE_TTL: Duration = Duration::from_secs(15 * 60);

/// Errors of the fleet's operations; `service::status` maps them to gRPC codes.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node group {0:?} not found")]
    UnknownGroup(String),
    #[error("delta must be positive, got {delta}")]
    NonPositiveDelta { delta: i32 },
    #[error("cannot increase node group {group:?} by {delta}: current size {current} + {delta} exceeds max size {max}")]
    AboveMax { group: String, current: usize, delta: i32, max: i32 },
    #[error("delta must be negative, got {delta}")]
    NonNegativeDelta { delta: i32 },
    #[error(
        "cannot decrease node group {group:?} by {delta}: only {cancellable} requested machines are not created yet \
         (target {target}); existing machines are removed with DeleteNodes"
    )]
    WouldRemoveExisting { group: String, delta: i32, cancellable: usize, target: usize },
    #[error("nodes do not belong to node group {group:?}: {}", nodes.join(", "))]
    NotInGroup { group: String, nodes: Vec<String> },
    #[error(
        "cannot delete {deleting} nodes from node group {group:?}: target size {target} would fall below min size {min}"
    )]
    BelowMin { group: String, deleting: usize, target: usize, min: i32 },
    #[error(
        "cloud {cloud:?} state is stale: last successful listing {}, bound is {bound:?}{}",
        age.map(|a| format!("{a:.0?} ago")).unwrap_or_else(|| "never".into()),
        last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
    )]
    Stale { cloud: String, age: Option<Duration>, bound: Duration, last_error: Option<String> },
    #[error("cloud {cloud:?}: {source}")]
    Driver {
        cloud: String,
        #[source]
        source: driver::Error,
    },
    /// Leader election is on and this replica does not hold the Lease.
    #[error("this replica is not the leader{}", leader.as_ref().map(|l| format!(" (the leader is {l})")).unwrap_or_default())]
    NotLeader { leader: Option<String> },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What cluster-autoscaler is told about one instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InstancePhase<'a> {
    Creating,
    Running,
    Deleting,
    /// Reported as creating with error info, so CA backs off and deletes it.
    Failed(&'a CreateFailure),
}

/// The life of one entry, from the request to the cloud's word.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Waiting for a create slot; nothing exists in the cloud.
    Queued,
    Creating,
    Running,
    Deleting,
    Failed(CreateFailure),
}

/// One machine, requested or real.
#[derive(Debug)]
struct Entry {
    provider_id: String,
    /// The cloud's id, once known.
    cloud_id: Option<String>,
    phase: Phase,
    /// Seen in a listing or returned by a create: something exists in the cloud.
    in_cloud: bool,
    /// A create task for this name is running (queued or calling the cloud).
    create_in_flight: bool,
    /// cluster-autoscaler asked for it to go; the create task deletes it when it returns.
    delete_requested: bool,
    delete_in_flight: bool,
    /// When the cloud last vouched for this entry (listing start or create return).
    confirmed_at: Instant,
}

impl Entry {
    fn counts_toward_target(&self) -> bool {
        self.phase != Phase::Deleting
    }
}

#[derive(Debug, Default)]
struct GroupState {
    /// Keyed by machine name (unique per group: Flotilla chose it).
    entries: BTreeMap<String, Entry>,
    /// provider id -> when its delete finished.
    tombstones: HashMap<String, Instant>,
    /// Machines whose delete returned but that the cloud has not yet shown gone (clouds with
    /// `node_cleanup` only): machine name -> (provider id, when the delete returned). A listing
    /// started after that which no longer has the machine confirms it gone.
    awaiting_gone: HashMap<String, (String, Instant)>,
}

impl GroupState {
    fn target(&self) -> usize {
        self.entries.values().filter(|e| e.counts_toward_target()).count()
    }
}

#[derive(Debug, Default)]
struct Inner {
    groups: Vec<GroupState>,
    /// provider id -> (group index, machine name), for O(1) NodeGroupForNode and DeleteNodes.
    index: HashMap<String, (usize, String)>,
}

impl Inner {
    fn insert(&mut self, g: usize, name: String, entry: Entry) {
        self.index.insert(entry.provider_id.clone(), (g, name.clone()));
        if let Some(old) = self.groups[g].entries.insert(name, entry) {
            self.index.remove(&old.provider_id);
        }
    }

    fn remove(&mut self, g: usize, name: &str) -> Option<Entry> {
        let entry = self.groups[g].entries.remove(name)?;
        self.index.remove(&entry.provider_id);
        Some(entry)
    }

    fn set_provider_id(&mut self, g: usize, name: &str, provider_id: String) {
        let Some(entry) = self.groups[g].entries.get_mut(name) else { return };
        if entry.provider_id != provider_id {
            self.index.remove(&entry.provider_id);
            self.index.insert(provider_id.clone(), (g, name.to_owned()));
            entry.provider_id = provider_id;
        }
    }
}

/// A node group as configured, plus what is derived from it once.
#[derive(Debug)]
pub struct Group {
    pub config: GroupConfig,
    /// Index into [`Fleet::clouds`].
    pub cloud: usize,
    /// Text of `NodeGroup.debug`.
    pub debug: String,
    template: OnceCell<Arc<Template>>,
}

/// Health of one cloud's listings. Written by `refresh_cloud`, read by `Refresh` and readiness.
#[derive(Debug, Default)]
struct CloudHealth {
    /// Start time of the newest successful listing.
    last_ok: Option<Instant>,
    last_error: Option<String>,
    /// Whether the newest listing attempt succeeded.
    healthy: bool,
}

/// One cloud account and its driver.
#[derive(Debug)]
pub struct Cloud {
    pub config: CloudConfig,
    pub driver: SharedDriver,
    /// Indices of the groups on this cloud.
    pub groups: Vec<usize>,
    creates: Arc<Semaphore>,
    deletes: Arc<Semaphore>,
    /// Serialises listings of this cloud, so concurrent Refreshes share one.
    listing: tokio::sync::Mutex<()>,
    health: Mutex<CloudHealth>,
}

/// Counts of instances per group and phase, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseCounts {
    pub creating: usize,
    pub running: usize,
    pub deleting: usize,
    pub failed: usize,
}

/// A machine the cloud has confirmed gone, whose Node (if any) should go too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeGone {
    pub cloud: String,
    pub group: String,
    /// The machine's name (usually its Node's name, which is tried first).
    pub name: String,
    /// The Node to delete is the one whose `spec.providerID` is exactly this.
    pub provider_id: String,
}

/// All groups on all clouds.
#[derive(Debug)]
pub struct Fleet {
    pub cluster: String,
    pub state_config: StateConfig,
    /// The node label naming GPU types (`GPULabel`), put on GPU templates.
    pub gpu_label: String,
    pub groups: Vec<Group>,
    pub clouds: Vec<Cloud>,
    group_index: HashMap<String, usize>,
    inner: RwLock<Inner>,
    tasks: TaskTracker,
    /// The current term: cancelled while this replica may not act (leader election on and the
    /// Lease held by another). Written by [`Fleet::begin_term`] and [`Fleet::end_term`] (the
    /// elector); read by every operation that records intent, and captured by every background
    /// task, which stops at once when its term ends.
    term: Mutex<CancellationToken>,
    /// Who holds the Lease, when it is not us (for messages).
    leader: Mutex<Option<String>>,
    /// Wakes the reconciler when a term begins, so the new leader lists the clouds at once.
    wake: Notify,
    /// Where machines confirmed gone are announced, for Node cleanup (set once at start).
    node_cleanup: OnceLock<mpsc::UnboundedSender<NodeGone>>,
    /// Creates and deletes, and their failures, are counted here.
    metrics: Arc<Metrics>,
}

impl Fleet {
    /// Builds the fleet from checked configuration and one driver per cloud (same order).
    pub fn new(config: &Config, drivers: Vec<SharedDriver>) -> Arc<Fleet> {
        Fleet::with_metrics(config, drivers, Arc::new(Metrics::new()))
    }

    /// [`Fleet::new`], counting creates and deletes in `metrics`.
    pub fn with_metrics(config: &Config, drivers: Vec<SharedDriver>, metrics: Arc<Metrics>) -> Arc<Fleet> {
        assert_eq!(config.clouds.len(), drivers.len(), "one driver per cloud");
        let mut clouds: Vec<Cloud> = config
            .clouds
            .iter()
            .zip(drivers)
            .map(|(c, driver)| Cloud {
                config: c.clone(),
                driver,
                groups: Vec::new(),
                creates: Arc::new(Semaphore::new(c.create_concurrency)),
                deletes: Arc::new(Semaphore::new(c.delete_concurrency)),
                listing: tokio::sync::Mutex::new(()),
                health: Mutex::new(CloudHealth::default()),
            })
            .collect();
        let mut groups = Vec::new();
        for (i, g) in config.groups.iter().enumerate() {
            let cloud = clouds.iter().position(|c| c.config.name == g.cloud).expect("config checks group clouds");
            clouds[cloud].groups.push(i);
            let debug =
                format!("cloud={} driver={} provider_id={}", g.cloud, clouds[cloud].config.driver, g.provider_id);
            groups.push(Group { config: g.clone(), cloud, debug, template: OnceCell::new() });
        }
        let group_index = groups.iter().enumerate().map(|(i, g)| (g.config.name.clone(), i)).collect();
        let inner = Inner { groups: groups.iter().map(|_| GroupState::default()).collect(), index: HashMap::new() };
        let term = CancellationToken::new();
        if config.leader_election.enabled {
            // A follower until the elector wins the Lease.
            term.cancel();
        }
        Arc::new(Fleet {
            cluster: config.cluster_name.clone(),
            state_config: config.state.clone(),
            gpu_label: config.gpu.label.clone(),
            groups,
            clouds,
            group_index,
            inner: RwLock::new(inner),
            tasks: TaskTracker::new(),
            term: Mutex::new(term),
            leader: Mutex::new(None),
            wake: Notify::new(),
            node_cleanup: OnceLock::new(),
            metrics,
        })
    }

    // === leadership ===

    /// The current term's token (cancelled when this replica may not act).
    fn term(&self) -> CancellationToken {
        self.term.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// True while this replica may act: always with leader election off, else while it holds
    /// the Lease.
    pub fn leading(&self) -> bool {
        !self.term().is_cancelled()
    }

    /// The leader's identity as last seen, when it is not us.
    pub fn leader(&self) -> Option<String> {
        self.leader.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// An error for a call this replica must not serve, or `Ok` while it leads.
    pub fn check_leading(&self) -> Result<()> {
        if self.leading() { Ok(()) } else { Err(Error::NotLeader { leader: self.leader() }) }
    }

    /// Records who leads, while this replica follows.
    pub fn set_leader(&self, leader: Option<String>) {
        *self.leader.lock().unwrap_or_else(|e| e.into_inner()) = leader;
    }

    /// This replica now holds the Lease: start from nothing and list every cloud at once, so
    /// the state is rebuilt from the clouds (where it lives), not from a previous term.
    pub fn begin_term(&self) {
        {
            let mut term = self.term.lock().unwrap_or_else(|e| e.into_inner());
            if !term.is_cancelled() {
                return;
            }
            self.clear();
            *term = CancellationToken::new();
        }
        self.set_leader(None);
        info!("leading: rebuilding state from the clouds");
        self.wake.notify_one();
    }

    /// This replica lost the Lease (or is stopping): every task of the term stops at once and
    /// the state is dropped, so nothing acts on a picture another replica now owns.
    pub fn end_term(&self) {
        if self.cancel_term() {
            warn!("no longer leading: stopped every create, delete and listing in flight");
        }
    }

    /// The leader is stopping on purpose (its work in flight is done) and releases the Lease.
    pub fn finish_term(&self) {
        if self.cancel_term() {
            info!("stopped leading");
        }
    }

    fn cancel_term(&self) -> bool {
        let term = self.term();
        if term.is_cancelled() {
            return false;
        }
        // Cancelled before the state is cleared: a task that wakes after this sees its term
        // over under the lock and writes nothing.
        term.cancel();
        self.clear();
        true
    }

    fn clear(&self) {
        let mut inner = self.write();
        for g in &mut inner.groups {
            *g = GroupState::default();
        }
        inner.index.clear();
        drop(inner);
        for c in &self.clouds {
            *c.health.lock().unwrap_or_else(|e| e.into_inner()) = CloudHealth::default();
        }
    }

    /// Spawns a background task of the current term (`term`), which ends it when cancelled.
    fn spawn_in_term<F>(&self, term: &CancellationToken, work: F)
    where
        F: Future<Output = ()> + Send + 'static,
    {
        let term = term.clone();
        self.tasks.spawn(async move {
            term.run_until_cancelled(work).await;
        });
    }

    // === node cleanup ===

    /// Announces machines confirmed gone on clouds with `node_cleanup` to `sender`.
    pub fn set_node_cleanup(&self, sender: mpsc::UnboundedSender<NodeGone>) {
        let _ = self.node_cleanup.set(sender);
    }

    fn node_gone(&self, g: usize, name: &str, provider_id: String) {
        let group = &self.groups[g];
        let cloud = &self.clouds[group.cloud];
        if !cloud.config.node_cleanup {
            return;
        }
        if let Some(sender) = self.node_cleanup.get() {
            let _ = sender.send(NodeGone {
                cloud: cloud.config.name.clone(),
                group: group.config.name.clone(),
                name: name.to_owned(),
                provider_id,
            });
        }
    }

    fn read(&self) -> RwLockReadGuard<'_, Inner> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }

    /// The index of a group by id.
    pub fn group_index(&self, id: &str) -> Result<usize> {
        self.group_index.get(id).copied().ok_or_else(|| Error::UnknownGroup(id.to_owned()))
    }

    /// The group owning a provider id, if Flotilla manages it.
    pub fn group_of(&self, provider_id: &str) -> Option<usize> {
        self.read().index.get(provider_id).map(|(g, _)| *g)
    }

    pub fn target_size(&self, g: usize) -> usize {
        self.read().groups[g].target()
    }

    fn parts<'a>(&'a self, g: usize, name: &'a str, id: &'a str) -> Parts<'a> {
        let group = &self.groups[g];
        Parts {
            cluster: &self.cluster,
            group: &group.config.name,
            region: &self.clouds[group.cloud].config.region,
            name,
            id,
        }
    }

    fn provider_id(&self, g: usize, name: &str, id: Option<&str>) -> String {
        let format = &self.groups[g].config.provider_id;
        match id {
            Some(id) => format.render(self.parts(g, name, id)),
            None if format.needs_cloud_id() => ProviderIdFormat::pending(self.parts(g, name, "")),
            None => format.render(self.parts(g, name, "")),
        }
    }

    /// Calls `f` for every instance of group `g`, with its provider id and phase.
    pub fn for_each_instance(&self, g: usize, mut f: impl FnMut(&str, InstancePhase<'_>)) {
        let inner = self.read();
        for entry in inner.groups[g].entries.values() {
            let phase = match &entry.phase {
                Phase::Queued | Phase::Creating => InstancePhase::Creating,
                Phase::Running => InstancePhase::Running,
                Phase::Deleting => InstancePhase::Deleting,
                Phase::Failed(failure) => InstancePhase::Failed(failure),
            };
            f(&entry.provider_id, phase);
        }
    }

    /// Instance counts per group, in group order.
    pub fn phase_counts(&self) -> Vec<PhaseCounts> {
        let inner = self.read();
        inner
            .groups
            .iter()
            .map(|gs| {
                let mut c = PhaseCounts::default();
                for e in gs.entries.values() {
                    match e.phase {
                        Phase::Queued | Phase::Creating => c.creating += 1,
                        Phase::Running => c.running += 1,
                        Phase::Deleting => c.deleting += 1,
                        Phase::Failed(_) => c.failed += 1,
                    }
                }
                c
            })
            .collect()
    }

    fn unique_name(&self, g: usize, inner: &Inner) -> String {
        use rand::Rng;
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let prefix = &self.groups[g].config.name_prefix;
        let mut rng = rand::rng();
        loop {
            let suffix: String = (0..5).map(|_| char::from(ALPHABET[rng.random_range(0..ALPHABET.len())])).collect();
            let name = format!("{prefix}-{suffix}");
            if !inner.groups[g].entries.contains_key(&name) {
                return name;
            }
        }
    }

    // === scale up ===

    /// Records `delta` new machines and starts creating them in the background.
    pub fn increase(self: &Arc<Self>, g: usize, delta: i32) -> Result<()> {
        let group = &self.groups[g].config;
        if delta <= 0 {
            return Err(Error::NonPositiveDelta { delta });
        }
        let mut inner = self.write();
        let term = self.term();
        if term.is_cancelled() {
            return Err(Error::NotLeader { leader: self.leader() });
        }
        let current = inner.groups[g].target();
        // i64: current + delta can never overflow, whatever CA sends.
        if current as i64 + i64::from(delta) > i64::from(group.max_size) {
            return Err(Error::AboveMax { group: group.name.clone(), current, delta, max: group.max_size });
        }
        let now = Instant::now();
        let mut names = Vec::with_capacity(delta as usize);
        for _ in 0..delta {
            let name = self.unique_name(g, &inner);
            let entry = Entry {
                provider_id: self.provider_id(g, &name, None),
                cloud_id: None,
                phase: Phase::Queued,
                in_cloud: false,
                create_in_flight: true,
                delete_requested: false,
                delete_in_flight: false,
                confirmed_at: now,
            };
            inner.insert(g, name.clone(), entry);
            names.push(name);
        }
        drop(inner);
        info!(group = %group.name, delta, from = current, "scaling up");
        for name in names {
            let fleet = Arc::clone(self);
            let task_term = term.clone();
            self.spawn_in_term(&term, async move { fleet.create_one(g, name, task_term).await });
        }
        Ok(())
    }

    async fn create_one(self: Arc<Self>, g: usize, name: String, term: CancellationToken) {
        let group = &self.groups[g];
        let cloud = &self.clouds[group.cloud];
        let Ok(_permit) = Arc::clone(&cloud.creates).acquire_owned().await else { return };
        {
            let mut inner = self.write();
            if term.is_cancelled() {
                return;
            }
            let Some(entry) = inner.groups[g].entries.get_mut(&name) else { return };
            if entry.delete_requested {
                // Cancelled before it started: nothing to create.
                inner.remove(g, &name);
                return;
            }
            entry.phase = Phase::Creating;
        }
        debug!(group = %group.config.name, %name, "creating machine");
        self.metrics.observe_create(&group.config.name);
        let result =
            match tokio::time::timeout(cloud.config.create_timeout, cloud.driver.create(&group.config.name, &name))
                .await
            {
                Ok(r) => r,
                Err(_) => Err(driver::Error::Timeout(format!(
                    "create did not finish within {:?}",
                    cloud.config.create_timeout
                ))),
            };
        let mut inner = self.write();
        if term.is_cancelled() {
            // The term ended while the cloud worked: the next leader finds the machine by its marks.
            return;
        }
        let now = Instant::now();
        match result {
            Ok(machine) => {
                let provider_id = self.provider_id(g, &name, Some(&machine.id));
                let Some(entry) = inner.groups[g].entries.get_mut(&name) else {
                    // Nobody wants it any more (cannot normally happen: deletes of in-flight
                    // creates only mark them). Never leak it.
                    drop(inner);
                    self.spawn_delete(g, MachineRef::from(&machine), provider_id, &term);
                    return;
                };
                entry.cloud_id = Some(machine.id.clone());
                entry.in_cloud = true;
                entry.create_in_flight = false;
                entry.confirmed_at = now;
                entry.phase = match &machine.state {
                    MachineState::Failed(f) => {
                        self.metrics.observe_create_failure(&group.config.name, f.class);
                        Phase::Failed(f.clone())
                    }
                    MachineState::Running => Phase::Running,
                    MachineState::Creating => Phase::Creating,
                    MachineState::Deleting => Phase::Deleting,
                };
                let delete = entry.delete_requested;
                if delete {
                    entry.phase = Phase::Deleting;
                    entry.delete_in_flight = true;
                }
                inner.set_provider_id(g, &name, provider_id.clone());
                drop(inner);
                info!(group = %group.config.name, %name, %provider_id, "machine created");
                if delete {
                    self.spawn_delete(g, MachineRef::from(&machine), provider_id, &term);
                }
            }
            Err(e) => {
                warn!(group = %group.config.name, %name, error = %e, "create failed");
                self.metrics.observe_create_failure(&group.config.name, e.to_create_failure().class);
                let Some(entry) = inner.groups[g].entries.get_mut(&name) else { return };
                entry.create_in_flight = false;
                if entry.delete_requested && !entry.in_cloud {
                    inner.remove(g, &name);
                } else if !entry.delete_requested {
                    entry.phase = Phase::Failed(e.to_create_failure());
                }
            }
        }
    }

    // === scale down ===

    /// Deletes the named instances of group `g`: all of them, or (if any is not in the group)
    /// none. Returns at once; deletes run in the background.
    pub fn delete_nodes(self: &Arc<Self>, g: usize, provider_ids: &[&str]) -> Result<()> {
        let group = &self.groups[g].config;
        let mut inner = self.write();
        let term = self.term();
        if term.is_cancelled() {
            return Err(Error::NotLeader { leader: self.leader() });
        }
        let mut names: Vec<String> = Vec::with_capacity(provider_ids.len());
        let mut foreign = Vec::new();
        for &pid in provider_ids {
            match inner.index.get(pid) {
                Some((owner, name)) if *owner == g => {
                    if !names.contains(name) {
                        names.push(name.clone());
                    }
                }
                // Already deleted: a repeated request is a no-op.
                _ if inner.groups[g].tombstones.contains_key(pid) => {}
                _ => foreign.push(if pid.is_empty() { "<node without providerID>".to_owned() } else { pid.to_owned() }),
            }
        }
        if !foreign.is_empty() {
            return Err(Error::NotInGroup { group: group.name.clone(), nodes: foreign });
        }
        let state = &inner.groups[g];
        let target = state.target();
        let leaving: Vec<&Entry> =
            names.iter().filter_map(|n| state.entries.get(n)).filter(|e| e.counts_toward_target()).collect();
        // Failed creates never were capacity: removing them is always allowed.
        let real = leaving.iter().filter(|e| !matches!(e.phase, Phase::Failed(_))).count();
        if real > 0 && (target - leaving.len()) < group.min_size as usize {
            return Err(Error::BelowMin {
                group: group.name.clone(),
                deleting: leaving.len(),
                target,
                min: group.min_size,
            });
        }
        let mut to_delete = Vec::new();
        for name in names {
            let Some(entry) = inner.groups[g].entries.get_mut(&name) else { continue };
            if entry.phase == Phase::Deleting {
                continue;
            }
            if entry.in_cloud {
                entry.phase = Phase::Deleting;
                entry.delete_requested = true;
                entry.delete_in_flight = true;
                let id = entry.cloud_id.clone().unwrap_or_else(|| name.clone());
                to_delete.push((
                    MachineRef { group: group.name.clone(), name: name.clone(), id },
                    entry.provider_id.clone(),
                ));
            } else if entry.create_in_flight && entry.phase == Phase::Creating {
                // The create task deletes it when the cloud returns it.
                entry.phase = Phase::Deleting;
                entry.delete_requested = true;
            } else {
                // Queued (the task will find it gone) or a failed create with nothing in the cloud.
                inner.remove(g, &name);
            }
        }
        drop(inner);
        info!(group = %group.name, count = provider_ids.len(), "deleting nodes");
        for (machine, provider_id) in to_delete {
            self.spawn_delete(g, machine, provider_id, &term);
        }
        Ok(())
    }

    fn spawn_delete(self: &Arc<Self>, g: usize, machine: MachineRef, provider_id: String, term: &CancellationToken) {
        let fleet = Arc::clone(self);
        let task_term = term.clone();
        self.spawn_in_term(term, async move { fleet.delete_one(g, machine, provider_id, task_term).await });
    }

    async fn delete_one(self: Arc<Self>, g: usize, machine: MachineRef, provider_id: String, term: CancellationToken) {
        let cloud = &self.clouds[self.groups[g].cloud];
        let Ok(_permit) = Arc::clone(&cloud.deletes).acquire_owned().await else { return };
        let result = match tokio::time::timeout(cloud.config.delete_timeout, cloud.driver.delete(&machine)).await {
            Ok(r) => r,
            Err(_) => {
                Err(driver::Error::Timeout(format!("delete did not finish within {:?}", cloud.config.delete_timeout)))
            }
        };
        let failure = match &result {
            Ok(()) | Err(driver::Error::NotFound(_)) => None,
            Err(e) => Some(e.kind()),
        };
        self.metrics.observe_delete(&machine.group, failure);
        let mut inner = self.write();
        if term.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => {
                info!(group = %machine.group, name = %machine.name, %provider_id, "machine deleted");
                inner.remove(g, &machine.name);
                let now = Instant::now();
                if cloud.config.node_cleanup {
                    // Its Node goes once a listing confirms the machine gone.
                    inner.groups[g].awaiting_gone.insert(machine.name.clone(), (provider_id.clone(), now));
                }
                inner.groups[g].tombstones.insert(provider_id, now);
            }
            Err(driver::Error::NotFound(_)) => {
                info!(group = %machine.group, name = %machine.name, %provider_id, "machine already gone");
                inner.remove(g, &machine.name);
                inner.groups[g].tombstones.insert(provider_id.clone(), Instant::now());
                drop(inner);
                self.node_gone(g, &machine.name, provider_id);
            }
            Err(e) => {
                // Stays Deleting; the next reconcile retries.
                warn!(group = %machine.group, name = %machine.name, error = %e, "delete failed, will retry");
                if let Some(entry) = inner.groups[g].entries.get_mut(&machine.name) {
                    entry.delete_in_flight = false;
                }
            }
        }
    }

    /// Cancels up to `-delta` machines that are not created yet.
    pub fn decrease(&self, g: usize, delta: i32) -> Result<()> {
        let group = &self.groups[g].config;
        if delta >= 0 {
            return Err(Error::NonNegativeDelta { delta });
        }
        let mut inner = self.write();
        if self.term().is_cancelled() {
            return Err(Error::NotLeader { leader: self.leader() });
        }
        let state = &inner.groups[g];
        // Cheapest first: queued, then failed, then creates still waiting for the cloud.
        let rank = |e: &Entry| match e.phase {
            Phase::Queued => Some(0),
            Phase::Failed(_) if !e.in_cloud => Some(1),
            Phase::Creating if !e.in_cloud => Some(2),
            _ => None,
        };
        let mut cancellable: Vec<(u8, String)> =
            state.entries.iter().filter_map(|(n, e)| rank(e).map(|r| (r, n.clone()))).collect();
        let wanted = delta.unsigned_abs() as usize;
        if wanted > cancellable.len() {
            return Err(Error::WouldRemoveExisting {
                group: group.name.clone(),
                delta,
                cancellable: cancellable.len(),
                target: state.target(),
            });
        }
        cancellable.sort();
        for (_, name) in cancellable.into_iter().take(wanted) {
            let entry = inner.groups[g].entries.get_mut(&name).expect("listed above");
            if entry.phase == Phase::Creating {
                entry.phase = Phase::Deleting;
                entry.delete_requested = true;
            } else {
                inner.remove(g, &name);
            }
        }
        info!(group = %group.name, delta, "decreased target size");
        Ok(())
    }

    // === reconcile ===

    /// Lists every cloud (at most one listing per cloud at a time) and answers whether the state
    /// is fresh enough to act on. Waits at most `refresh_timeout`; slower listings finish in the
    /// background.
    pub async fn refresh(self: &Arc<Self>) -> Result<()> {
        self.check_leading()?;
        let requested_at = Instant::now();
        let mut handles = Vec::with_capacity(self.clouds.len());
        for c in 0..self.clouds.len() {
            let fleet = Arc::clone(self);
            handles.push(tokio::spawn(async move { fleet.refresh_cloud(c, requested_at).await }));
        }
        let _ = tokio::time::timeout(self.state_config.refresh_timeout, futures_join_all(handles)).await;
        self.check_fresh()
    }

    /// `Ok` while every cloud's newest successful listing is within `max_staleness`.
    pub fn check_fresh(&self) -> Result<()> {
        let bound = self.state_config.max_staleness;
        for cloud in &self.clouds {
            let health = cloud.health.lock().unwrap_or_else(|e| e.into_inner());
            let age = health.last_ok.map(|t| t.elapsed());
            if age.is_none_or(|a| a > bound) {
                return Err(Error::Stale {
                    cloud: cloud.config.name.clone(),
                    age,
                    bound,
                    last_error: health.last_error.clone(),
                });
            }
        }
        Ok(())
    }

    /// True once every cloud has been listed and its newest listing succeeded.
    pub fn ready(&self) -> bool {
        self.leading()
            && self.clouds.iter().all(|c| {
                let h = c.health.lock().unwrap_or_else(|e| e.into_inner());
                h.last_ok.is_some() && h.healthy
            })
    }

    /// Why the fleet is not ready, one line per cloud with a problem.
    pub fn readiness_problems(&self) -> Vec<String> {
        if !self.leading() {
            return vec![match self.leader() {
                Some(l) => format!("following: the leader is {l}"),
                None => "following: waiting for the leader lease".to_owned(),
            }];
        }
        self.clouds
            .iter()
            .filter_map(|c| {
                let h = c.health.lock().unwrap_or_else(|e| e.into_inner());
                match (&h.last_ok, h.healthy) {
                    (Some(_), true) => None,
                    (None, _) if h.last_error.is_none() => Some(format!("cloud {}: not listed yet", c.config.name)),
                    _ => Some(format!("cloud {}: {}", c.config.name, h.last_error.as_deref().unwrap_or("unhealthy"))),
                }
            })
            .collect()
    }

    /// Lists cloud `c` unless a listing started after `requested_at` already succeeded.
    pub async fn refresh_cloud(self: &Arc<Self>, c: usize, requested_at: Instant) {
        let cloud = &self.clouds[c];
        let term = self.term();
        if term.is_cancelled() {
            return;
        }
        let _listing = cloud.listing.lock().await;
        {
            let h = cloud.health.lock().unwrap_or_else(|e| e.into_inner());
            if h.last_ok.is_some_and(|t| t >= requested_at) {
                return;
            }
        }
        let started = Instant::now();
        let result = match tokio::time::timeout(self.state_config.max_staleness, cloud.driver.list()).await {
            Ok(r) => r,
            Err(_) => {
                Err(driver::Error::Timeout(format!("listing took longer than {:?}", self.state_config.max_staleness)))
            }
        };
        if term.is_cancelled() {
            // Taken for a term that is over; the state it would update was dropped.
            return;
        }
        match result {
            Ok(machines) => {
                self.reconcile_cloud(c, machines, started);
                let mut h = cloud.health.lock().unwrap_or_else(|e| e.into_inner());
                if h.last_error.is_some() {
                    info!(cloud = %cloud.config.name, "cloud listing recovered");
                }
                *h = CloudHealth { last_ok: Some(started), last_error: None, healthy: true };
            }
            Err(e) => {
                warn!(cloud = %cloud.config.name, error = %e, "cloud listing failed");
                let mut h = cloud.health.lock().unwrap_or_else(|e| e.into_inner());
                h.last_error = Some(e.to_string());
                h.healthy = false;
            }
        }
    }

    /// Applies one listing of cloud `c`, taken starting at `started`.
    pub fn reconcile_cloud(self: &Arc<Self>, c: usize, machines: Vec<Machine>, started: Instant) {
        let cloud = &self.clouds[c];
        let mut by_group: HashMap<usize, Vec<Machine>> = HashMap::new();
        for m in machines {
            match self.group_index.get(&m.group) {
                Some(&g) if self.groups[g].cloud == c => by_group.entry(g).or_default().push(m),
                // Marked for this cluster but for a group that is not (or no longer) configured
                // on this cloud: not ours to manage; leave it alone.
                _ => {
                    debug!(cloud = %cloud.config.name, group = %m.group, name = %m.name, "ignoring machine of an unconfigured group")
                }
            }
        }
        let mut retry_deletes = Vec::new();
        let mut gone = Vec::new();
        let term = self.term();
        let mut inner = self.write();
        let Inner { groups, index } = &mut *inner;
        for &g in &cloud.groups {
            let listed = by_group.remove(&g).unwrap_or_default();
            let state = &mut groups[g];
            state.tombstones.retain(|_, at| at.elapsed() < TOMBSTONE_TTL);
            if !state.awaiting_gone.is_empty() {
                let names: HashSet<&str> = listed.iter().map(|m| m.name.as_str()).collect();
                state.awaiting_gone.retain(|name, (provider_id, deleted_at)| {
                    if *deleted_at < started && !names.contains(name.as_str()) {
                        gone.push((g, name.clone(), provider_id.clone()));
                        false
                    } else if deleted_at.elapsed() > TOMBSTONE_TTL {
                        warn!(%name, %provider_id, "the cloud still lists a deleted machine; giving up on its node cleanup");
                        false
                    } else {
                        true
                    }
                });
            }
            let mut old = std::mem::take(&mut state.entries);
            for e in old.values() {
                index.remove(&e.provider_id);
            }
            let mut fresh = BTreeMap::new();
            for m in listed {
                let provider_id = self.provider_id(g, &m.name, Some(&m.id));
                if state.tombstones.get(&provider_id).is_some_and(|&at| at > started) {
                    continue; // deleted after this listing started
                }
                let previous = old.remove(&m.name);
                if let (Some(p), MachineState::Failed(f)) = (&previous, &m.state)
                    && !matches!(p.phase, Phase::Failed(_))
                {
                    // The cloud gave up on a machine after its create call had returned.
                    self.metrics.observe_create_failure(&m.group, f.class);
                }
                let mut phase = match m.state {
                    MachineState::Creating => Phase::Creating,
                    MachineState::Running => Phase::Running,
                    MachineState::Deleting => Phase::Deleting,
                    MachineState::Failed(f) => Phase::Failed(f),
                };
                let (create_in_flight, delete_requested, mut delete_in_flight) = previous
                    .as_ref()
                    .map(|p| (p.create_in_flight, p.delete_requested, p.delete_in_flight))
                    .unwrap_or_default();
                if delete_requested {
                    phase = Phase::Deleting;
                    if !delete_in_flight && !create_in_flight {
                        delete_in_flight = true;
                        retry_deletes.push((
                            MachineRef { group: m.group.clone(), name: m.name.clone(), id: m.id.clone() },
                            provider_id.clone(),
                        ));
                    }
                } else if create_in_flight && phase == Phase::Running {
                    // The driver is still working on it (e.g. joining the cluster).
                    phase = Phase::Creating;
                }
                let entry = Entry {
                    provider_id,
                    cloud_id: Some(m.id),
                    phase,
                    in_cloud: true,
                    create_in_flight,
                    delete_requested,
                    delete_in_flight,
                    confirmed_at: started,
                };
                fresh.insert(m.name, entry);
            }
            for (name, entry) in old {
                // Keep what the listing cannot know about yet; drop what the cloud no longer has.
                if !entry.in_cloud || entry.confirmed_at > started {
                    fresh.insert(name, entry);
                }
            }
            for (name, e) in &fresh {
                index.insert(e.provider_id.clone(), (g, name.clone()));
            }
            state.entries = fresh;
        }
        drop(inner);
        for (g, name, provider_id) in gone {
            self.node_gone(g, &name, provider_id);
        }
        if term.is_cancelled() {
            return;
        }
        for (machine, provider_id) in retry_deletes {
            let g = self.group_index[&machine.group];
            self.spawn_delete(g, machine, provider_id, &term);
        }
    }

    /// Runs the background reconcile loop until `shutdown` fires.
    pub async fn run_reconciler(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        let mut tick = tokio::time::interval(self.state_config.reconcile_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                // A new term lists at once (the tick below would skip a fresh listing anyway).
                () = self.wake.notified() => {
                    let requested_at = Instant::now();
                    let mut handles = Vec::new();
                    for c in 0..self.clouds.len() {
                        let fleet = Arc::clone(&self);
                        handles.push(tokio::spawn(async move { fleet.refresh_cloud(c, requested_at).await }));
                    }
                    futures_join_all(handles).await;
                }
                _ = tick.tick() => {
                    // A listing newer than one interval is fresh enough to skip.
                    let requested_at = Instant::now().checked_sub(self.state_config.reconcile_interval).unwrap_or_else(Instant::now);
                    let mut handles = Vec::new();
                    for c in 0..self.clouds.len() {
                        let fleet = Arc::clone(&self);
                        handles.push(tokio::spawn(async move { fleet.refresh_cloud(c, requested_at).await }));
                    }
                    futures_join_all(handles).await;
                }
            }
        }
    }

    /// The group's template node, built once (the driver may need a cloud call for it).
    pub async fn template(&self, g: usize) -> Result<Arc<Template>> {
        let group = &self.groups[g];
        group
            .template
            .get_or_try_init(|| async {
                let cloud = &self.clouds[group.cloud];
                let shape = cloud
                    .driver
                    .shape(&group.config.name)
                    .await
                    .map_err(|source| Error::Driver { cloud: cloud.config.name.clone(), source })?;
                Ok(Arc::new(Template::build(&group.config, shape.unwrap_or_default(), &self.gpu_label)))
            })
            .await
            .cloned()
    }

    /// Creates and deletes still running (for shutdown).
    pub fn tasks(&self) -> &TaskTracker {
        &self.tasks
    }
}

async fn futures_join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::driver::{
        Driver,
        simulated::{Settings, Simulated},
    };

    fn fleet() -> (Arc<Fleet>, Arc<Simulated>) {
        let text =
            "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 5\n";
        let config = Config::parse(text, "test", std::path::Path::new(".")).unwrap();
        let sim = Arc::new(Simulated::new("t", Settings::default()).unwrap());
        (Fleet::new(&config, vec![Arc::clone(&sim) as SharedDriver]), sim)
    }

    /// (provider id, phase name) of every instance of the only group.
    fn ids(f: &Fleet) -> Vec<(String, &'static str)> {
        let mut out = Vec::new();
        f.for_each_instance(0, |id, phase| {
            let name = match phase {
                InstancePhase::Creating => "creating",
                InstancePhase::Running => "running",
                InstancePhase::Deleting => "deleting",
                InstancePhase::Failed(_) => "failed",
            };
            out.push((id.to_owned(), name));
        });
        out
    }

    #[tokio::test]
    async fn a_listing_older_than_a_finished_create_does_not_drop_the_machine() {
        let (f, sim) = fleet();
        let stale_listing_started = Instant::now();
        let stale = sim.list().await.unwrap(); // empty: taken before the create
        f.increase(0, 1).unwrap();
        f.tasks().close();
        f.tasks().wait().await;
        f.reconcile_cloud(0, stale, stale_listing_started);
        assert_eq!(f.target_size(0), 1);
        assert_eq!(ids(&f)[0].1, "running");
        // A listing taken after the create sees it too.
        f.reconcile_cloud(0, sim.list().await.unwrap(), Instant::now());
        assert_eq!(f.target_size(0), 1);
    }

    #[tokio::test]
    async fn a_listing_older_than_a_finished_delete_does_not_bring_the_machine_back() {
        let (f, sim) = fleet();
        f.increase(0, 2).unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
        f.reconcile_cloud(0, sim.list().await.unwrap(), Instant::now());
        let victim = ids(&f)[0].0.clone();
        let stale_listing_started = Instant::now();
        let stale = sim.list().await.unwrap(); // still has the victim
        f.delete_nodes(0, &[&victim]).unwrap();
        f.tasks().close();
        f.tasks().wait().await;
        f.reconcile_cloud(0, stale, stale_listing_started);
        assert_eq!(f.target_size(0), 1);
        assert!(ids(&f).iter().all(|(id, _)| *id != victim));
        assert_eq!(f.group_of(&victim), None);
        // A machine that vanished from the cloud on its own is dropped by the next listing.
        let survivor = ids(&f)[0].0.clone();
        f.reconcile_cloud(0, Vec::new(), Instant::now());
        assert_eq!(f.target_size(0), 0);
        assert_eq!(f.group_of(&survivor), None);
    }
}
