//! The fleet: every group's machines as Flotilla last saw them, the creates and deletes in
//! flight, and the reconcile that brings both together.
//!
//! # Who writes what
//! * [`Fleet::reconcile_cloud`] applies one listing: it writes what the cloud says
//!   ([`Entry::cloud`], [`Entry::cloud_id`]), adopts machines it did not know (a restart loses
//!   nothing), drops what the cloud no longer has, and issues deletes the cloud still owes.
//! * RPC handlers ([`Fleet::increase`], [`Fleet::delete_nodes`], [`Fleet::decrease`]) write
//!   cluster-autoscaler's intent ([`Entry::create`] queued, [`Entry::delete`] wanted) under the
//!   write lock and return at once; `DeleteNodes` only waits (bounded) for the cloud to record
//!   its deletes, see [`Driver::mark_deleting`](crate::driver::Driver::mark_deleting).
//! * Background tasks, bounded per cloud by semaphores, make the cloud calls and write their
//!   outcome: the create task writes [`Entry::create`] (in flight, done, failed), the delete
//!   task removes the entry or sets [`Delete::Retry`].
//! * Hot RPCs (`NodeGroupForNode`, `NodeGroupTargetSize`, `NodeGroupNodes`) only take the read
//!   lock; they never call a cloud.
//!
//! What cluster-autoscaler is told about an entry ([`Entry::phase`]) is derived from those
//! fields, never stored, so no writer can leave it inconsistent.
//!
//! The lock is a `std` lock held for short, synchronous sections only, never across an await.
//!
//! # Races a listing can lose
//! A listing started at `T` may be applied after a create returned (the machine is absent from
//! it), after a create failed and the driver removed the machine, or after a delete finished
//! (the machine is still in it). So entries remember when this process last learnt something
//! about them ([`Entry::confirmed_at`]), finished deletes leave a tombstone, and a listing never
//! overrides anything newer than its own start. A failed create stays reported, with its error,
//! whatever listings say, until cluster-autoscaler deletes it or [`FAILED_CREATE_RETENTION`]
//! passes.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{
        Arc, Mutex, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use tokio::{
    sync::{Notify, OnceCell, Semaphore, mpsc, oneshot},
    task::JoinSet,
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
    untrusted,
};

/// How long a finished delete is remembered, so a repeated `DeleteNodes` for it is a no-op and a
/// listing that started before it finished cannot bring it back.
const TOMBSTONE_TTL: Duration = Duration::from_secs(15 * 60);

/// How long a failed create stays reported when cluster-autoscaler does not delete it (it
/// normally does within one loop); see README, "How Flotilla behaves".
pub const FAILED_CREATE_RETENTION: Duration = Duration::from_secs(30 * 60);

/// At most this many caller-supplied ids are quoted in one error message.
const MAX_QUOTED_IDS: usize = 5;

/// Errors of the fleet's operations; `service::status` maps them to gRPC codes. Text a caller
/// sent is quoted and bounded with [`untrusted::quote`] before it is stored here.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("node group {0} not found")]
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
    #[error("nodes do not belong to node group {group:?}: {nodes}")]
    NotInGroup { group: String, nodes: String },
    #[error(
        "cannot remove {removing} machines from node group {group:?}: target size {target} would fall below min size {min}"
    )]
    BelowMin { group: String, removing: usize, target: usize, min: i32 },
    #[error(
        "cloud {cloud:?} state is stale: last successful listing {}, bound is {bound:?}{}",
        age.map(|a| format!("{a:.0?} ago")).unwrap_or_else(|| "never".into()),
        last_error.as_ref().map(|e| format!("; last error: {e}")).unwrap_or_default()
    )]
    Stale { cloud: String, age: Option<Duration>, bound: Duration, last_error: Option<String> },
    #[error(
        "cloud {cloud:?} has not been listed since Flotilla started, so its machines are not known yet; try again shortly"
    )]
    NotListed { cloud: String },
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

/// Where an entry's create stands. Written by `increase` (queued) and the create task.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Create {
    /// Waiting for a create slot; nothing exists in the cloud.
    Queued,
    /// The driver's create call is running.
    InFlight,
    /// The create returned the machine, or a listing found it (created by an earlier process).
    Done,
    /// The create failed at `at`. Reported with its error, whatever listings say, until
    /// cluster-autoscaler deletes it or [`FAILED_CREATE_RETENTION`] passes.
    Failed { failure: CreateFailure, at: Instant },
}

/// Where an entry's delete stands. Written by `DeleteNodes`/`DecreaseTargetSize` (wanted, in
/// flight), the create task (wanted to in flight), listings (wanted or retry to in flight) and the
/// delete task (retry, or the entry is removed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Delete {
    No,
    /// Wanted, but nothing to call the cloud with yet: the create is still running, or it failed
    /// and only a listing can tell whether the cloud kept anything.
    Wanted,
    /// A delete task owns it (marking, waiting for a slot, or calling the cloud).
    InFlight,
    /// The last attempt failed; a listing that still finds the machine tries again, one that
    /// does not ends it.
    Retry,
}

/// Where a warm-pool transition stands. Written by `DeleteNodes` (stopping) and `increase`
/// (starting), cleared by the stop and start tasks. A stopped pool machine has none: it is
/// [`Entry::pooled`], derived from what the cloud says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Pool {
    No,
    /// cluster-autoscaler deleted it; it is being stopped for the pool (reported as deleting).
    Stopping,
    /// Taken from the pool for a scale-up; it is being started (reported as creating).
    Starting,
}

/// One machine, requested or real.
#[derive(Debug)]
struct Entry {
    provider_id: String,
    /// The cloud's id, once a create returned or a listing found it.
    cloud_id: Option<String>,
    /// The cloud's last word (listing or create answer); `None` until it has said anything.
    cloud: Option<MachineState>,
    create: Create,
    delete: Delete,
    pool: Pool,
    /// When this process last learnt something about the entry (created it, heard from its
    /// create, or a listing started): a listing started earlier cannot overrule it.
    confirmed_at: Instant,
}

impl Entry {
    fn new(provider_id: String, create: Create, now: Instant) -> Entry {
        Entry {
            provider_id,
            cloud_id: None,
            cloud: None,
            create,
            delete: Delete::No,
            pool: Pool::No,
            confirmed_at: now,
        }
    }

    /// A stopped machine kept in the warm pool: owned and listed, never reported to
    /// cluster-autoscaler, never counted in the target size.
    fn pooled(&self) -> bool {
        self.pool == Pool::No
            && self.delete == Delete::No
            && self.create == Create::Done
            && self.cloud == Some(MachineState::Stopped)
    }

    fn phase(&self) -> InstancePhase<'_> {
        if self.delete != Delete::No || self.pool == Pool::Stopping {
            return InstancePhase::Deleting;
        }
        if self.pool == Pool::Starting {
            return InstancePhase::Creating;
        }
        match &self.create {
            Create::Queued | Create::InFlight => InstancePhase::Creating,
            Create::Failed { failure, .. } => InstancePhase::Failed(failure),
            Create::Done => match &self.cloud {
                Some(MachineState::Running) => InstancePhase::Running,
                Some(MachineState::Creating) | None => InstancePhase::Creating,
                Some(MachineState::Deleting) => InstancePhase::Deleting,
                Some(MachineState::Failed(f)) => InstancePhase::Failed(f),
                // Pooled (never reported) or on its way there: not capacity.
                Some(MachineState::Stopped) => InstancePhase::Deleting,
            },
        }
    }

    fn counts_toward_target(&self) -> bool {
        self.phase() != InstancePhase::Deleting
    }

    fn create_running(&self) -> bool {
        matches!(self.create, Create::Queued | Create::InFlight)
    }

    fn machine(&self, group: &str, name: &str) -> MachineRef {
        MachineRef {
            group: group.to_owned(),
            name: name.to_owned(),
            id: self.cloud_id.clone().unwrap_or_else(|| name.to_owned()),
        }
    }
}

#[derive(Debug, Default)]
struct GroupState {
    /// Keyed by machine name (unique per group: Flotilla chose it).
    entries: BTreeMap<String, Entry>,
    /// provider id -> when its delete finished (or the cloud stopped listing it).
    tombstones: HashMap<String, Instant>,
    /// Machines whose delete (or stop) returned but that the cloud has not yet shown gone (or
    /// stopped), on clouds with `node_cleanup`: machine name -> (provider id, when the call
    /// returned, whether it was a stop). A listing started after that which no longer has the
    /// machine (or lists it stopped) confirms it, and its Node goes.
    awaiting_gone: HashMap<String, (String, Instant, bool)>,
}

impl GroupState {
    fn target(&self) -> usize {
        self.entries.values().filter(|e| e.counts_toward_target()).count()
    }

    /// Stopped pool machines plus those being stopped: what the pool holds or will.
    fn pool_size(&self) -> usize {
        self.entries.values().filter(|e| e.pooled() || e.pool == Pool::Stopping).count()
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

    /// Removes an entry for good: its provider id is tombstoned, so a repeated delete of it is
    /// a no-op.
    fn remove(&mut self, g: usize, name: &str) -> Option<Entry> {
        let entry = self.groups[g].entries.remove(name)?;
        self.index.remove(&entry.provider_id);
        self.groups[g].tombstones.insert(entry.provider_id.clone(), Instant::now());
        Some(entry)
    }

    fn set_provider_id(&mut self, g: usize, name: &str, provider_id: String) {
        let Some(entry) = self.groups[g].entries.get_mut(name) else { return };
        if entry.provider_id != provider_id {
            let old = std::mem::replace(&mut entry.provider_id, provider_id.clone());
            if entry.delete != Delete::No {
                // cluster-autoscaler may repeat the delete under the id it was told first.
                self.groups[g].tombstones.insert(old.clone(), Instant::now());
            }
            self.index.remove(&old);
            self.index.insert(provider_id, (g, name.to_owned()));
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
    /// Bounds `mark_deleting` calls apart from `deletes`, so marks never wait behind slow deletes.
    marks: Arc<Semaphore>,
    /// Serialises listings of this cloud, so concurrent Refreshes share one.
    listing: tokio::sync::Mutex<()>,
    health: Mutex<CloudHealth>,
    /// Set by the first listing applied: until then the cloud's machines, and so every size of
    /// its groups, are unknown. Written by `reconcile_cloud`, read by every sizing RPC.
    listed: AtomicBool,
    /// Wakes the callers of [`Fleet::wait_listed`] when `listed` is set.
    listed_notify: tokio::sync::Notify,
}

/// Counts of instances per group and phase, for metrics.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PhaseCounts {
    pub creating: usize,
    pub running: usize,
    pub deleting: usize,
    pub failed: usize,
    /// Warm pool: stopped machines (not reported to cluster-autoscaler), machines being stopped
    /// into it and being started out of it (also counted above as deleting and creating).
    pub pool_stopped: usize,
    pub pool_stopping: usize,
    pub pool_starting: usize,
}

/// A machine Flotilla deleted that the cloud has confirmed gone, whose Node (if any) should go
/// too.
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
    /// When this process built the fleet: a listing started before it does not exist.
    started: Instant,
    /// Creates and deletes, and their failures, are counted here.
    metrics: Arc<Metrics>,
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
                marks: Arc::new(Semaphore::new(c.delete_concurrency)),
                listing: tokio::sync::Mutex::new(()),
                health: Mutex::new(CloudHealth::default()),
                listed: AtomicBool::new(false),
                listed_notify: tokio::sync::Notify::new(),
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
            started: Instant::now(),
            metrics,
            term: Mutex::new(term),
            leader: Mutex::new(None),
            wake: Notify::new(),
            node_cleanup: OnceLock::new(),
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
    /// the state is rebuilt from the clouds (where it lives), not from a previous term. Sizes
    /// wait for that first listing, as after a start.
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

    /// This replica lost the Lease: every task of the term stops at once and the state is
    /// dropped, so nothing acts on a picture another replica now owns.
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
            c.listed.store(false, Ordering::Release);
        }
    }

    /// Spawns a background task of the term `term`, which ends it when cancelled.
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
        self.group_index.get(id).copied().ok_or_else(|| Error::UnknownGroup(untrusted::quote(id)))
    }

    /// The group owning a provider id, if Flotilla manages it.
    pub fn group_of(&self, provider_id: &str) -> Option<usize> {
        let inner = self.read();
        let (g, name) = inner.index.get(provider_id)?;
        // A stopped pool machine is not cluster-autoscaler's: its Node (if any left) is not ours.
        let pooled = inner.groups[*g].entries.get(name).is_some_and(Entry::pooled);
        (!pooled).then_some(*g)
    }

    pub fn target_size(&self, g: usize) -> usize {
        self.read().groups[g].target()
    }

    // === the first listing ===

    /// Whether group `g`'s cloud has been listed since start, so its sizes are known.
    pub fn is_listed(&self, g: usize) -> bool {
        self.clouds[self.groups[g].cloud].listed.load(Ordering::Acquire)
    }

    fn check_listed(&self, g: usize) -> Result<()> {
        if self.is_listed(g) {
            Ok(())
        } else {
            Err(Error::NotListed { cloud: self.clouds[self.groups[g].cloud].config.name.clone() })
        }
    }

    /// When an RPC must stop waiting for the cloud: `state.refresh_timeout` from now, or earlier
    /// when the caller's own deadline (`caller_timeout`, gRPC's `grpc-timeout`) leaves less.
    /// Every wait of one RPC shares it, and it keeps a tenth of the caller's time (at most 1 s)
    /// to answer in: the caller hears what happened (UNAVAILABLE "not listed yet", or deletes
    /// accepted but not yet recorded in the cloud) instead of its deadline passing while the
    /// work goes on unseen.
    pub fn wait_until(&self, caller_timeout: Option<Duration>) -> Instant {
        let mut wait = self.state_config.refresh_timeout;
        if let Some(t) = caller_timeout {
            wait = wait.min(t - (t / 10).min(Duration::from_secs(1)));
        }
        Instant::now() + wait
    }

    /// Returns once group `g`'s cloud has been listed since start, listing it if no listing is
    /// under way, or [`Error::NotListed`] after `state.refresh_timeout`. Immediate once the
    /// first listing landed; only the first calls after a start wait.
    pub async fn wait_listed(self: &Arc<Self>, g: usize) -> Result<()> {
        self.wait_listed_until(g, self.wait_until(None)).await
    }

    /// [`Fleet::wait_listed`], giving up at `until` (see [`Fleet::wait_until`]).
    pub async fn wait_listed_until(self: &Arc<Self>, g: usize, until: Instant) -> Result<()> {
        if self.is_listed(g) {
            return Ok(());
        }
        let c = self.groups[g].cloud;
        let cloud = &self.clouds[c];
        let listed = cloud.listed_notify.notified();
        tokio::pin!(listed);
        listed.as_mut().enable();
        if self.is_listed(g) {
            return Ok(());
        }
        if cloud.listing.try_lock().is_ok() {
            let fleet = Arc::clone(self);
            // Spawned, so a caller that gives up does not cancel the listing half way.
            tokio::spawn(async move { fleet.refresh_cloud(c, fleet.started).await });
        }
        let _ = tokio::time::timeout_at(until, listed).await;
        self.check_listed(g)
    }

    /// [`Fleet::wait_listed_until`] for every cloud, all by the same `until`.
    pub async fn wait_all_listed_until(self: &Arc<Self>, until: Instant) -> Result<()> {
        for cloud in &self.clouds {
            if let Some(&g) = cloud.groups.first() {
                self.wait_listed_until(g, until).await?;
            }
        }
        Ok(())
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
        for entry in inner.groups[g].entries.values().filter(|e| !e.pooled()) {
            f(&entry.provider_id, entry.phase());
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
                    match e.pool {
                        Pool::Stopping => c.pool_stopping += 1,
                        Pool::Starting => c.pool_starting += 1,
                        Pool::No if e.pooled() => {
                            c.pool_stopped += 1;
                            continue;
                        }
                        Pool::No => {}
                    }
                    match e.phase() {
                        InstancePhase::Creating => c.creating += 1,
                        InstancePhase::Running => c.running += 1,
                        InstancePhase::Deleting => c.deleting += 1,
                        InstancePhase::Failed(_) => c.failed += 1,
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

    /// Records `delta` new machines and starts creating them in the background. Refused until
    /// the group's cloud has been listed (see [`Fleet::wait_listed`]): before that, the current
    /// size is unknown and `max_size` cannot be checked.
    pub fn increase(self: &Arc<Self>, g: usize, delta: i32) -> Result<()> {
        let group = &self.groups[g].config;
        if delta <= 0 {
            return Err(Error::NonPositiveDelta { delta });
        }
        self.check_listed(g)?;
        let mut inner = self.write();
        let term = self.term();
        if term.is_cancelled() {
            return Err(Error::NotLeader { leader: self.leader() });
        }
        let current = inner.groups[g].target();
        // i64: current + delta can never overflow, whatever CA sends. The check comes before
        // anything is allocated, and config bounds max_size, so delta is bounded here too.
        if current as i64 + i64::from(delta) > i64::from(group.max_size) {
            return Err(Error::AboveMax { group: group.name.clone(), current, delta, max: group.max_size });
        }
        let now = Instant::now();
        // The warm pool first: starting a stopped machine takes seconds, creating one minutes.
        let mut starts = Vec::new();
        for (name, entry) in inner.groups[g].entries.iter_mut() {
            if starts.len() == delta as usize {
                break;
            }
            if entry.pooled() {
                entry.pool = Pool::Starting;
                entry.confirmed_at = now;
                starts.push(entry.machine(&group.name, name));
            }
        }
        let mut names = Vec::with_capacity(delta as usize - starts.len());
        for _ in starts.len()..delta as usize {
            let name = self.unique_name(g, &inner);
            inner.insert(g, name.clone(), Entry::new(self.provider_id(g, &name, None), Create::Queued, now));
            names.push(name);
        }
        drop(inner);
        info!(group = %group.name, delta, from = current, from_pool = starts.len(), "scaling up");
        for machine in starts {
            let fleet = Arc::clone(self);
            let task_term = term.clone();
            self.spawn_in_term(&term, async move { fleet.start_one(g, machine, task_term).await });
        }
        for name in names {
            self.spawn_create(g, name, &term);
        }
        Ok(())
    }

    fn spawn_create(self: &Arc<Self>, g: usize, name: String, term: &CancellationToken) {
        let fleet = Arc::clone(self);
        let task_term = term.clone();
        self.spawn_in_term(term, async move { fleet.create_one(g, name, task_term).await });
    }

    /// Starts one pool machine. One that fails to start is deleted and replaced by a create, so
    /// the scale-up cluster-autoscaler asked for still happens.
    async fn start_one(self: Arc<Self>, g: usize, machine: MachineRef, term: CancellationToken) {
        let group = &self.groups[g];
        let cloud = &self.clouds[group.cloud];
        let Ok(_permit) = Arc::clone(&cloud.creates).acquire_owned().await else { return };
        debug!(group = %group.config.name, name = %machine.name, "starting pool machine");
        let timeout = cloud.config.create_timeout;
        let result = match tokio::time::timeout(timeout, cloud.driver.start(&machine)).await {
            Ok(r) => r,
            Err(_) => Err(driver::Error::Timeout(format!("start did not finish within {timeout:?}"))),
        };
        self.metrics.observe_pool_start(&group.config.name, result.is_ok());
        let mut inner = self.write();
        if term.is_cancelled() {
            return;
        }
        let now = Instant::now();
        let Some(entry) = inner.groups[g].entries.get_mut(&machine.name) else { return };
        entry.pool = Pool::No;
        entry.confirmed_at = now;
        match result {
            Ok(started) => {
                entry.cloud = Some(started.state.clone());
                let delete = entry.delete == Delete::Wanted;
                if delete {
                    entry.delete = Delete::InFlight;
                }
                let provider_id = entry.provider_id.clone();
                drop(inner);
                info!(group = %group.config.name, name = %machine.name, "started pool machine");
                if delete {
                    self.spawn_delete(g, machine, provider_id, true, &term);
                }
            }
            Err(e) => {
                warn!(group = %group.config.name, name = %machine.name, error = %e, "pool machine did not start; deleting it and creating a new one");
                let replace = entry.delete == Delete::No;
                entry.delete = Delete::InFlight;
                let provider_id = entry.provider_id.clone();
                let replacement = replace.then(|| {
                    let name = self.unique_name(g, &inner);
                    inner.insert(g, name.clone(), Entry::new(self.provider_id(g, &name, None), Create::Queued, now));
                    name
                });
                drop(inner);
                self.spawn_delete(g, machine, provider_id, true, &term);
                if let Some(name) = replacement {
                    self.spawn_create(g, name, &term);
                }
            }
        }
    }

    /// Stops one machine into the pool. One that cannot be stopped is deleted, as
    /// cluster-autoscaler asked.
    async fn stop_one(self: Arc<Self>, g: usize, machine: MachineRef, provider_id: String, term: CancellationToken) {
        let cloud = &self.clouds[self.groups[g].cloud];
        let Ok(_permit) = Arc::clone(&cloud.deletes).acquire_owned().await else { return };
        let timeout = cloud.config.delete_timeout;
        let result = match tokio::time::timeout(timeout, cloud.driver.stop(&machine)).await {
            Ok(r) => r,
            Err(_) => Err(driver::Error::Timeout(format!("stop did not finish within {timeout:?}"))),
        };
        let mut inner = self.write();
        if term.is_cancelled() {
            return;
        }
        let now = Instant::now();
        match result {
            Ok(()) => {
                info!(group = %machine.group, name = %machine.name, "stopped machine into the warm pool");
                if let Some(entry) = inner.groups[g].entries.get_mut(&machine.name) {
                    entry.pool = Pool::No;
                    entry.cloud = Some(MachineState::Stopped);
                    entry.confirmed_at = now;
                }
                if cloud.config.node_cleanup {
                    // Its Node goes once a listing shows the machine stopped.
                    inner.groups[g].awaiting_gone.insert(machine.name.clone(), (provider_id, now, true));
                }
            }
            Err(driver::Error::NotFound(_)) => {
                info!(group = %machine.group, name = %machine.name, "machine to stop is already gone");
                inner.remove(g, &machine.name);
                drop(inner);
                self.node_gone(g, &machine.name, provider_id);
            }
            Err(e) => {
                warn!(group = %machine.group, name = %machine.name, error = %e, "cannot stop the machine for the warm pool; deleting it");
                let Some(entry) = inner.groups[g].entries.get_mut(&machine.name) else { return };
                entry.pool = Pool::No;
                entry.delete = Delete::InFlight;
                drop(inner);
                self.spawn_delete(g, machine, provider_id, true, &term);
            }
        }
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
            if entry.delete != Delete::No {
                // Cancelled before it started: nothing to create.
                inner.remove(g, &name);
                return;
            }
            entry.create = Create::InFlight;
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
                    self.spawn_delete(g, MachineRef::from(&machine), provider_id, true, &term);
                    return;
                };
                entry.cloud_id = Some(machine.id.clone());
                entry.cloud = Some(machine.state.clone());
                entry.create = Create::Done;
                entry.confirmed_at = now;
                if let MachineState::Failed(f) = &machine.state {
                    self.metrics.observe_create_failure(&group.config.name, f.class);
                }
                let delete = entry.delete == Delete::Wanted;
                if delete {
                    entry.delete = Delete::InFlight;
                }
                inner.set_provider_id(g, &name, provider_id.clone());
                drop(inner);
                info!(group = %group.config.name, %name, %provider_id, "machine created");
                if delete {
                    self.spawn_delete(g, MachineRef::from(&machine), provider_id, true, &term);
                }
            }
            Err(e) => {
                warn!(group = %group.config.name, %name, error = %e, "create failed");
                self.metrics.observe_create_failure(&group.config.name, e.to_create_failure().class);
                let Some(entry) = inner.groups[g].entries.get_mut(&name) else { return };
                entry.create = Create::Failed { failure: e.to_create_failure(), at: now };
                entry.confirmed_at = now;
                // A delete wanted meanwhile goes ahead if a listing saw the machine; otherwise
                // the next listing tells whether the cloud kept anything.
                if entry.delete == Delete::Wanted && entry.cloud_id.is_some() {
                    entry.delete = Delete::InFlight;
                    let (machine, provider_id) = (entry.machine(&group.config.name, &name), entry.provider_id.clone());
                    drop(inner);
                    self.spawn_delete(g, machine, provider_id, true, &term);
                }
            }
        }
    }

    // === scale down ===

    /// Deletes the named instances of group `g`: all of them, or (if any is not in the group)
    /// none. Records the deletes, then waits (at most `state.refresh_timeout`) until the cloud
    /// has recorded them too ([`Driver::mark_deleting`](crate::driver::Driver::mark_deleting)),
    /// so an accepted delete survives a restart; the deletes themselves run in the background.
    pub async fn delete_nodes(self: &Arc<Self>, g: usize, provider_ids: &[&str]) -> Result<()> {
        self.delete_nodes_until(g, provider_ids, self.wait_until(None)).await
    }

    /// [`Fleet::delete_nodes`], waiting for the cloud's records only until `until` (see
    /// [`Fleet::wait_until`]); the deletes are accepted either way.
    pub async fn delete_nodes_until(self: &Arc<Self>, g: usize, provider_ids: &[&str], until: Instant) -> Result<()> {
        let (to_delete, to_stop, term) = self.accept_deletes(g, provider_ids)?;
        for (machine, provider_id) in to_stop {
            let fleet = Arc::clone(self);
            let task_term = term.clone();
            self.spawn_in_term(&term, async move { fleet.stop_one(g, machine, provider_id, task_term).await });
        }
        if to_delete.is_empty() {
            return Ok(());
        }
        let mut marked = JoinSet::new();
        for (machine, provider_id) in to_delete {
            let (tx, rx) = oneshot::channel();
            let fleet = Arc::clone(self);
            let task_term = term.clone();
            self.spawn_in_term(
                &term,
                async move { fleet.delete_one(g, machine, provider_id, Some(tx), task_term).await },
            );
            marked.spawn(rx);
        }
        let all_marked = async { while marked.join_next().await.is_some() {} };
        if tokio::time::timeout_at(until, all_marked).await.is_err() {
            warn!(
                group = %self.groups[g].config.name,
                "the cloud has not recorded every delete yet; they go ahead, but a restart before they finish may forget them"
            );
        }
        Ok(())
    }

    /// The synchronous half of `DeleteNodes`: checks the request and records the intent.
    /// Returns the machines whose delete can start now, those to stop into the warm pool
    /// instead, and the term they belong to.
    #[allow(clippy::type_complexity, reason = "a private helper's three results")]
    fn accept_deletes(
        &self,
        g: usize,
        provider_ids: &[&str],
    ) -> Result<(Vec<(MachineRef, String)>, Vec<(MachineRef, String)>, CancellationToken)> {
        let group = &self.groups[g].config;
        self.check_listed(g)?;
        let mut inner = self.write();
        let term = self.term();
        if term.is_cancelled() {
            return Err(Error::NotLeader { leader: self.leader() });
        }
        let mut names: Vec<String> = Vec::new();
        let mut seen = HashSet::new();
        let mut foreign = Vec::new();
        for &pid in provider_ids {
            match inner.index.get(pid) {
                Some((owner, name)) if *owner == g => {
                    if seen.insert(name.clone()) {
                        names.push(name.clone());
                    }
                }
                // Already deleted: a repeated request is a no-op.
                _ if inner.groups[g].tombstones.contains_key(pid) => {}
                _ => foreign.push(if pid.is_empty() { "<node without providerID>" } else { pid }),
            }
        }
        if !foreign.is_empty() {
            return Err(Error::NotInGroup { group: group.name.clone(), nodes: quote_ids(&foreign) });
        }
        let state = &inner.groups[g];
        let target = state.target();
        let leaving: Vec<&Entry> =
            names.iter().filter_map(|n| state.entries.get(n)).filter(|e| e.counts_toward_target()).collect();
        // Failed creates never were capacity: removing them is always allowed.
        let real = leaving.iter().filter(|e| !matches!(e.phase(), InstancePhase::Failed(_))).count();
        if real > 0 && target - leaving.len() < group.min_size as usize {
            return Err(Error::BelowMin {
                group: group.name.clone(),
                removing: leaving.len(),
                target,
                min: group.min_size,
            });
        }
        let mut to_delete = Vec::new();
        let mut to_stop = Vec::new();
        let mut pool_room = (self.groups[g].config.warm_pool as usize).saturating_sub(inner.groups[g].pool_size());
        for name in names {
            let Some(entry) = inner.groups[g].entries.get_mut(&name) else { continue };
            if entry.delete != Delete::No || entry.pool == Pool::Stopping {
                continue; // already being deleted or stopped
            }
            if entry.pool == Pool::Starting {
                // The start task deletes it when the cloud answers.
                entry.delete = Delete::Wanted;
                continue;
            }
            if pool_room > 0 && entry.create == Create::Done && entry.cloud == Some(MachineState::Running) {
                // Kept stopped instead of deleted: the next scale-up starts it in seconds.
                pool_room -= 1;
                entry.pool = Pool::Stopping;
                to_stop.push((entry.machine(&group.name, &name), entry.provider_id.clone()));
                continue;
            }
            match entry.create {
                Create::Queued => {
                    // The create task will find it gone.
                    inner.remove(g, &name);
                }
                // The create task deletes it when the cloud returns it.
                Create::InFlight => entry.delete = Delete::Wanted,
                // A failed create no listing has seen: the next listing tells whether the cloud
                // kept anything to delete.
                Create::Failed { .. } if entry.cloud_id.is_none() => entry.delete = Delete::Wanted,
                Create::Failed { .. } | Create::Done => {
                    entry.delete = Delete::InFlight;
                    to_delete.push((entry.machine(&group.name, &name), entry.provider_id.clone()));
                }
            }
        }
        drop(inner);
        info!(group = %group.name, count = provider_ids.len(), to_pool = to_stop.len(), "deleting nodes");
        Ok((to_delete, to_stop, term))
    }

    /// Starts a background delete. `mark` first records the delete in the cloud (not needed when
    /// a listing already shows the machine being deleted).
    fn spawn_delete(
        self: &Arc<Self>,
        g: usize,
        machine: MachineRef,
        provider_id: String,
        mark: bool,
        term: &CancellationToken,
    ) {
        let fleet = Arc::clone(self);
        let task_term = term.clone();
        self.spawn_in_term(term, async move {
            if mark {
                let (tx, _) = oneshot::channel();
                fleet.delete_one(g, machine, provider_id, Some(tx), task_term).await
            } else {
                fleet.delete_one(g, machine, provider_id, None, task_term).await
            }
        });
    }

    /// Marks (when `marked` is given, which it then signals) and deletes one machine, and
    /// writes the outcome: the entry removed, or [`Delete::Retry`].
    async fn delete_one(
        self: Arc<Self>,
        g: usize,
        machine: MachineRef,
        provider_id: String,
        marked: Option<oneshot::Sender<()>>,
        term: CancellationToken,
    ) {
        let cloud = &self.clouds[self.groups[g].cloud];
        let timeout = cloud.config.delete_timeout;
        let mut result = None;
        if let Some(marked) = marked {
            let mark = async {
                let Ok(_permit) = Arc::clone(&cloud.marks).acquire_owned().await else { return Ok(()) };
                match tokio::time::timeout(timeout, cloud.driver.mark_deleting(&machine)).await {
                    Ok(r) => r,
                    Err(_) => Err(driver::Error::Timeout(format!("marking did not finish within {timeout:?}"))),
                }
            };
            match mark.await {
                Ok(()) => {}
                // Gone already: as good as deleted.
                Err(e @ driver::Error::NotFound(_)) => result = Some(Err(e)),
                Err(e) => warn!(
                    group = %machine.group, name = %machine.name, error = %e,
                    "cannot mark the machine as being deleted; deleting it anyway, but a restart before the delete \
                     finishes will not know it was wanted"
                ),
            }
            let _ = marked.send(());
        }
        let result = match result {
            Some(r) => r,
            None => {
                let Ok(_permit) = Arc::clone(&cloud.deletes).acquire_owned().await else { return };
                let result = match tokio::time::timeout(timeout, cloud.driver.delete(&machine)).await {
                    Ok(r) => r,
                    Err(_) => Err(driver::Error::Timeout(format!("delete did not finish within {timeout:?}"))),
                };
                let failure = match &result {
                    Ok(()) | Err(driver::Error::NotFound(_)) => None,
                    Err(e) => Some(e.kind()),
                };
                self.metrics.observe_delete(&machine.group, failure);
                result
            }
        };
        let mut inner = self.write();
        if term.is_cancelled() {
            return;
        }
        match result {
            Ok(()) => {
                info!(group = %machine.group, name = %machine.name, %provider_id, "machine deleted");
                if inner.remove(g, &machine.name).is_none() {
                    inner.groups[g].tombstones.insert(provider_id.clone(), Instant::now());
                }
                if cloud.config.node_cleanup {
                    // Its Node goes once a listing confirms the machine gone.
                    inner.groups[g].awaiting_gone.insert(machine.name.clone(), (provider_id, Instant::now(), false));
                }
            }
            Err(driver::Error::NotFound(_)) => {
                info!(group = %machine.group, name = %machine.name, %provider_id, "machine already gone");
                if inner.remove(g, &machine.name).is_none() {
                    inner.groups[g].tombstones.insert(provider_id.clone(), Instant::now());
                }
                drop(inner);
                self.node_gone(g, &machine.name, provider_id);
            }
            Err(e) => {
                // Stays Deleting; the next listing that still finds it tries again.
                warn!(group = %machine.group, name = %machine.name, error = %e, "delete failed, will retry");
                if let Some(entry) = inner.groups[g].entries.get_mut(&machine.name) {
                    entry.delete = Delete::Retry;
                }
            }
        }
    }

    /// Cancels up to `-delta` machines that are not created yet, never taking the target below
    /// `min_size`.
    pub fn decrease(&self, g: usize, delta: i32) -> Result<()> {
        let group = &self.groups[g].config;
        if delta >= 0 {
            return Err(Error::NonNegativeDelta { delta });
        }
        self.check_listed(g)?;
        let mut inner = self.write();
        if self.term().is_cancelled() {
            return Err(Error::NotLeader { leader: self.leader() });
        }
        let state = &inner.groups[g];
        // Cheapest first: queued, then failed, then creates still waiting for the cloud.
        let rank = |e: &Entry| match e.create {
            _ if e.delete != Delete::No || e.cloud.is_some() => None,
            Create::Queued => Some(0),
            Create::Failed { .. } => Some(1),
            Create::InFlight => Some(2),
            Create::Done => None,
        };
        let mut cancellable: Vec<(u8, String)> =
            state.entries.iter().filter_map(|(n, e)| rank(e).map(|r| (r, n.clone()))).collect();
        let wanted = delta.unsigned_abs() as usize;
        let target = state.target();
        if wanted > cancellable.len() {
            return Err(Error::WouldRemoveExisting {
                group: group.name.clone(),
                delta,
                cancellable: cancellable.len(),
                target,
            });
        }
        if (target - wanted) < group.min_size as usize {
            return Err(Error::BelowMin { group: group.name.clone(), removing: wanted, target, min: group.min_size });
        }
        cancellable.sort();
        for (_, name) in cancellable.into_iter().take(wanted) {
            let entry = inner.groups[g].entries.get_mut(&name).expect("listed above");
            if entry.create == Create::Queued {
                inner.remove(g, &name);
            } else {
                // In flight, or failed with nothing seen in the cloud: deleted once the create
                // returns or a listing finds it.
                entry.delete = Delete::Wanted;
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
        self.refresh_until(self.wait_until(None)).await
    }

    /// [`Fleet::refresh`], waiting for the listings only until `until` (see
    /// [`Fleet::wait_until`]).
    pub async fn refresh_until(self: &Arc<Self>, until: Instant) -> Result<()> {
        self.check_leading()?;
        let requested_at = Instant::now();
        let mut handles = Vec::with_capacity(self.clouds.len());
        for c in 0..self.clouds.len() {
            let fleet = Arc::clone(self);
            handles.push(tokio::spawn(async move { fleet.refresh_cloud(c, requested_at).await }));
        }
        let _ = tokio::time::timeout_at(until, futures_join_all(handles)).await;
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
        let now = Instant::now();
        // (group, machine, provider id, mark first)
        let mut deletes: Vec<(usize, MachineRef, String, bool)> = Vec::new();
        // (group, machine name, provider id) of machines Flotilla deleted that are now gone.
        let mut gone: Vec<(usize, String, String)> = Vec::new();
        let term = self.term();
        let mut inner = self.write();
        let Inner { groups, index } = &mut *inner;
        for &g in &cloud.groups {
            let group_name = &self.groups[g].config.name;
            let listed = by_group.remove(&g).unwrap_or_default();
            let state = &mut groups[g];
            state.tombstones.retain(|_, at| at.elapsed() < TOMBSTONE_TTL);
            if !state.awaiting_gone.is_empty() {
                let states: HashMap<&str, &MachineState> = listed.iter().map(|m| (m.name.as_str(), &m.state)).collect();
                state.awaiting_gone.retain(|name, (provider_id, at, stopped)| {
                    let listed_as = states.get(name.as_str());
                    let confirmed = *at < started
                        && match listed_as {
                            None => true,
                            Some(s) => *stopped && **s == MachineState::Stopped,
                        };
                    if confirmed {
                        gone.push((g, name.clone(), provider_id.clone()));
                        false
                    } else if *stopped && *at < started && listed_as.is_some() {
                        // Listed, but no longer stopped (started again meanwhile): nothing to clean.
                        false
                    } else if at.elapsed() > TOMBSTONE_TTL {
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
                let tombstone = state.tombstones.get(&provider_id).copied();
                if tombstone.is_some_and(|at| at > started) {
                    continue; // deleted after this listing started
                }
                if tombstone.is_some() && m.state == MachineState::Deleting && !old.contains_key(&m.name) {
                    continue; // its delete returned; the cloud is finishing it
                }
                let mut entry = match old.remove(&m.name) {
                    Some(mut e) => {
                        if let MachineState::Failed(f) = &m.state
                            && !matches!(e.phase(), InstancePhase::Failed(_))
                        {
                            // The cloud gave up on a machine after its create call had returned.
                            self.metrics.observe_create_failure(&m.group, f.class);
                        }
                        // A create that answered after this listing started knows better.
                        if e.cloud.is_none() || started >= e.confirmed_at {
                            e.cloud = Some(m.state.clone());
                            e.confirmed_at = e.confirmed_at.max(started);
                        }
                        if e.provider_id != provider_id && e.delete != Delete::No {
                            // cluster-autoscaler may repeat the delete under the id it was told first.
                            state.tombstones.insert(std::mem::replace(&mut e.provider_id, provider_id), now);
                        } else {
                            e.provider_id = provider_id;
                        }
                        e.cloud_id = Some(m.id.clone());
                        e
                    }
                    // Created by an earlier process (or by this one, deleted, and still there).
                    None => Entry {
                        cloud_id: Some(m.id.clone()),
                        cloud: Some(m.state.clone()),
                        // A machine whose delete already finished once is still wanted gone.
                        delete: if tombstone.is_some() { Delete::Wanted } else { Delete::No },
                        ..Entry::new(provider_id, Create::Done, started)
                    },
                };
                if let Create::Failed { at, .. } = entry.create
                    && entry.delete == Delete::No
                    && now.duration_since(at) >= FAILED_CREATE_RETENTION
                {
                    // Nobody deleted it in time: from now on it is what the cloud says it is.
                    entry.create = Create::Done;
                }
                let cloud_deleting = m.state == MachineState::Deleting;
                let start_delete = match entry.delete {
                    Delete::Wanted | Delete::Retry => !entry.create_running(),
                    // Marked by a process that died before its delete finished (or being
                    // deleted by the cloud anyway): finish the job. A failed create waits for
                    // cluster-autoscaler, which must hear of the failure.
                    Delete::No => cloud_deleting && entry.create == Create::Done,
                    Delete::InFlight => false,
                };
                if start_delete {
                    entry.delete = Delete::InFlight;
                    deletes.push((g, entry.machine(group_name, &m.name), entry.provider_id.clone(), !cloud_deleting));
                }
                fresh.insert(m.name, entry);
            }
            for (name, entry) in old {
                // Keep what the listing cannot know about yet; drop what the cloud no longer has.
                let keep = entry.create_running()
                    || entry.pool != Pool::No
                    || entry.confirmed_at > started
                    || entry.delete == Delete::InFlight
                    || match entry.create {
                        Create::Failed { at, .. } => match entry.delete {
                            Delete::No => now.duration_since(at) < FAILED_CREATE_RETENTION,
                            _ => false,
                        },
                        _ => false,
                    };
                if keep {
                    fresh.insert(name, entry);
                } else {
                    if entry.delete != Delete::No && entry.cloud_id.is_some() {
                        // Flotilla wanted it deleted (perhaps an earlier process) and the cloud
                        // no longer has it: gone.
                        gone.push((g, name.clone(), entry.provider_id.clone()));
                    }
                    // So a late or repeated delete of it is a no-op.
                    state.tombstones.insert(entry.provider_id, now);
                }
            }
            // A pool holding more than it may (its size was lowered, or machines stopped on their
            // own): delete the extras.
            let warm_pool = self.groups[g].config.warm_pool as usize;
            let mut pooled: Vec<&String> = fresh.iter().filter(|(_, e)| e.pooled()).map(|(n, _)| n).collect();
            if pooled.len() > warm_pool {
                pooled.sort();
                let extra: Vec<String> = pooled.into_iter().skip(warm_pool).cloned().collect();
                for name in extra {
                    let entry = fresh.get_mut(&name).expect("listed above");
                    entry.delete = Delete::InFlight;
                    deletes.push((g, entry.machine(group_name, &name), entry.provider_id.clone(), true));
                }
            }
            for (name, e) in &fresh {
                index.insert(e.provider_id.clone(), (g, name.clone()));
            }
            state.entries = fresh;
        }
        drop(inner);
        if !cloud.listed.swap(true, Ordering::AcqRel) {
            cloud.listed_notify.notify_waiters();
        }
        for (g, name, provider_id) in gone {
            self.node_gone(g, &name, provider_id);
        }
        for (g, machine, provider_id, mark) in deletes {
            self.spawn_delete(g, machine, provider_id, mark, &term);
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

    /// [`Fleet::template`], waiting only until `until` (see [`Fleet::wait_until`]): a cloud
    /// slower than that answers UNAVAILABLE, and the template is still built in the background
    /// for the next call.
    pub async fn template_until(self: &Arc<Self>, g: usize, until: Instant) -> Result<Arc<Template>> {
        let fleet = Arc::clone(self);
        // Spawned, so a caller that gives up does not cancel the cloud call half way.
        let build = tokio::spawn(async move { fleet.template(g).await });
        match tokio::time::timeout_at(until, build).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Ok(Err(_)) | Err(_) => {
                let cloud = &self.clouds[self.groups[g].cloud].config.name;
                Err(Error::Driver {
                    cloud: cloud.clone(),
                    source: driver::Error::Timeout(format!(
                        "the cloud has not described the machines of node group {:?} yet; try again shortly",
                        self.groups[g].config.name
                    )),
                })
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

/// Caller-supplied ids for an error message: each quoted and bounded, at most
/// [`MAX_QUOTED_IDS`] of them.
fn quote_ids(ids: &[&str]) -> String {
    let mut out: Vec<String> = ids.iter().take(MAX_QUOTED_IDS).map(|id| untrusted::quote(id)).collect();
    if ids.len() > MAX_QUOTED_IDS {
        out.push(format!("and {} more", ids.len() - MAX_QUOTED_IDS));
    }
    out.join(", ")
}

async fn futures_join_all(handles: Vec<tokio::task::JoinHandle<()>>) {
    for h in handles {
        let _ = h.await;
    }
}

#[cfg(test)]
mod tests;
