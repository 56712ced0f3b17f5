//! Leader election on a `coordination.k8s.io/v1` Lease, so that several replicas (a standalone
//! Deployment with `replicas: 2`) are safe: only the leader serves cluster-autoscaler and runs
//! creates, deletes and listings; the others are not ready and answer UNAVAILABLE.
//!
//! The algorithm is client-go's (`tools/leaderelection`), with one change:
//! * A replica acquires the Lease when it does not exist, when it names no holder (released),
//!   or when its record has not changed for `leaseDurationSeconds` *as measured on this
//!   replica's own clock since it last saw the record change* (so clock skew between hosts does
//!   not matter). Every write carries the `resourceVersion` read, so of two replicas racing for
//!   it exactly one wins.
//! * The leader renews every `retry_period`. If it cannot renew for `renew_deadline` (less
//!   than the lease duration) it stops acting: every create, delete and listing in flight is
//!   abandoned ([`Fleet::end_term`]) before anyone else may acquire the Lease.
//! * Unlike client-go, a leader that *reads* the Lease held by someone else stops at once
//!   instead of retrying until its deadline: someone decided it is no longer the leader.
//! * On a graceful stop the leader releases the Lease (holder cleared, duration 1 s) after
//!   its work in flight is done, so the next replica takes over without waiting.
//!
//! A new term starts from nothing and lists every cloud ([`Fleet::begin_term`]): the state
//! lives in the clouds, so the new leader rebuilds it exactly as a restarted process does.

use std::{sync::Arc, time::Duration};

use async_trait::async_trait;
use rand::Rng;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    config::LeaderElectionConfig,
    kube::{self, Lease, LeaseSpec},
    state::Fleet,
};

/// Where the Lease is kept: the Kubernetes API, or memory in tests.
#[async_trait]
pub trait LeaseStore: Send + Sync + std::fmt::Debug {
    async fn get(&self, namespace: &str, name: &str) -> kube::Result<Option<Lease>>;
    async fn create(&self, lease: &Lease) -> kube::Result<Lease>;
    async fn update(&self, lease: &Lease) -> kube::Result<Lease>;
}

#[async_trait]
impl LeaseStore for kube::Client {
    async fn get(&self, namespace: &str, name: &str) -> kube::Result<Option<Lease>> {
        self.get_lease(namespace, name).await
    }

    async fn create(&self, lease: &Lease) -> kube::Result<Lease> {
        self.create_lease(lease).await
    }

    async fn update(&self, lease: &Lease) -> kube::Result<Lease> {
        self.update_lease(lease).await
    }
}

/// The outcome of one attempt to acquire or renew.
#[derive(Debug)]
enum Attempt {
    /// We hold the Lease now.
    Held,
    /// Someone else holds a valid Lease.
    HeldBy(String),
    /// The API could not be asked, or a write lost a race.
    Failed(String),
}

/// Runs the election for one replica.
#[derive(Debug)]
pub struct Elector {
    store: Arc<dyn LeaseStore>,
    fleet: Arc<Fleet>,
    namespace: String,
    name: String,
    identity: String,
    lease_duration: Duration,
    renew_deadline: Duration,
    retry_period: Duration,
    /// The Lease as last read or written, and when (our clock) its record last changed.
    /// Written and read only by the election loop.
    observed: Option<(Lease, Instant)>,
}

/// This replica's name in the Lease when configuration gives none: `$POD_NAME` (the Downward
/// API) or the host name, plus a random suffix so that a restarted process is a new holder.
pub fn default_identity() -> String {
    let base = std::env::var("POD_NAME")
        .ok()
        .filter(|n| !n.is_empty())
        .or_else(|| std::fs::read_to_string("/proc/sys/kernel/hostname").ok().map(|h| h.trim().to_owned()))
        .filter(|n| !n.is_empty())
        .unwrap_or_else(|| "flotilla".to_owned());
    let suffix: u32 = rand::rng().random();
    format!("{base}_{suffix:08x}")
}

fn micro_time(t: std::time::SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

impl Elector {
    pub fn new(
        store: Arc<dyn LeaseStore>,
        fleet: Arc<Fleet>,
        config: &LeaderElectionConfig,
        namespace: String,
        identity: String,
    ) -> Elector {
        Elector {
            store,
            fleet,
            namespace,
            name: config.lease_name.clone(),
            identity,
            lease_duration: config.lease_duration,
            renew_deadline: config.renew_deadline,
            retry_period: config.retry_period,
            observed: None,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    /// Campaigns, leads, and campaigns again after losing, until `stop`; then, if leading,
    /// releases the Lease. `stop` should fire only once work in flight is done (see `lib`).
    pub async fn run(mut self, stop: CancellationToken) {
        info!(identity = %self.identity, lease = %format!("{}/{}", self.namespace, self.name), "leader election: campaigning");
        loop {
            // Follow until the Lease is ours.
            loop {
                match self.try_acquire_or_renew().await {
                    Attempt::Held => break,
                    Attempt::HeldBy(holder) => {
                        if self.fleet.leader().as_deref() != Some(holder.as_str()) {
                            info!(leader = %holder, "following");
                        }
                        self.fleet.set_leader(Some(holder));
                    }
                    Attempt::Failed(why) => debug!(error = %why, "cannot acquire the lease yet"),
                }
                let jitter = self.retry_period.mul_f64(rand::rng().random_range(0.0..0.2));
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(self.retry_period + jitter) => {}
                }
            }
            info!(identity = %self.identity, "acquired the lease: leading");
            self.fleet.begin_term();
            let mut renewed = Instant::now();
            // Lead until the Lease is lost or we are told to stop.
            let lost = loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        self.fleet.finish_term();
                        self.release().await;
                        return;
                    }
                    _ = tokio::time::sleep(self.retry_period) => {}
                }
                let deadline = renewed + self.renew_deadline;
                let attempt = match tokio::time::timeout_at(deadline, self.try_acquire_or_renew()).await {
                    Ok(a) => a,
                    Err(_) => Attempt::Failed("the renewal did not answer before the renew deadline".into()),
                };
                match attempt {
                    Attempt::Held => renewed = Instant::now(),
                    Attempt::HeldBy(holder) => break format!("the lease is held by {holder}"),
                    Attempt::Failed(why) => {
                        if Instant::now() >= deadline {
                            break format!("not renewed for {:?}: {why}", self.renew_deadline);
                        }
                        warn!(error = %why, "cannot renew the lease; retrying until the renew deadline");
                    }
                }
            };
            warn!(reason = %lost, "lost the lease: stopping at once");
            self.fleet.end_term();
        }
    }

    /// One read of the Lease and, if it is ours to take or keep, one write.
    async fn try_acquire_or_renew(&mut self) -> Attempt {
        let now = std::time::SystemTime::now();
        let duration_seconds = i32::try_from(self.lease_duration.as_secs()).unwrap_or(i32::MAX);
        let current = match self.store.get(&self.namespace, &self.name).await {
            Ok(c) => c,
            Err(e) => return Attempt::Failed(e.to_string()),
        };
        let Some(current) = current else {
            let spec = LeaseSpec {
                holder_identity: Some(self.identity.clone()),
                lease_duration_seconds: Some(duration_seconds),
                acquire_time: Some(micro_time(now)),
                renew_time: Some(micro_time(now)),
                lease_transitions: Some(0),
                ..Default::default()
            };
            return match self.store.create(&Lease::new(&self.namespace, &self.name, spec)).await {
                Ok(created) => {
                    self.observed = Some((created, Instant::now()));
                    Attempt::Held
                }
                Err(e) => Attempt::Failed(e.to_string()),
            };
        };
        // Remember when the record last changed, by our own clock.
        let changed = self.observed.as_ref().is_none_or(|(seen, _)| seen.spec != current.spec);
        if changed {
            self.observed = Some((current.clone(), Instant::now()));
        }
        let observed_at = self.observed.as_ref().map(|(_, at)| *at).unwrap_or_else(Instant::now);
        let holder = current.spec.holder_identity.clone().unwrap_or_default();
        let ours = holder == self.identity;
        if !holder.is_empty() && !ours {
            let valid_for = Duration::from_secs(current.spec.lease_duration_seconds.unwrap_or(0).max(0) as u64);
            if observed_at + valid_for > Instant::now() {
                return Attempt::HeldBy(holder);
            }
            info!(previous = %holder, "the lease expired; taking it over");
        }
        let mut next = current.clone();
        next.spec.holder_identity = Some(self.identity.clone());
        next.spec.lease_duration_seconds = Some(duration_seconds);
        next.spec.renew_time = Some(micro_time(now));
        if !ours {
            next.spec.acquire_time = Some(micro_time(now));
            next.spec.lease_transitions = Some(current.spec.lease_transitions.unwrap_or(0) + 1);
        }
        match self.store.update(&next).await {
            Ok(written) => {
                self.observed = Some((written, Instant::now()));
                Attempt::Held
            }
            Err(e) if e.is_conflict() => Attempt::Failed(format!("another replica wrote the lease first: {e}")),
            Err(e) => Attempt::Failed(e.to_string()),
        }
    }

    /// Clears the holder (duration 1 s), so a follower takes over at once.
    async fn release(&mut self) {
        let Some((lease, _)) = self.observed.clone() else { return };
        if lease.spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return;
        }
        let now = micro_time(std::time::SystemTime::now());
        let mut released = lease;
        released.spec.holder_identity = None;
        released.spec.lease_duration_seconds = Some(1);
        released.spec.renew_time = Some(now.clone());
        released.spec.acquire_time = Some(now);
        match self.store.update(&released).await {
            Ok(_) => info!("released the lease"),
            Err(e) => warn!(error = %e, "cannot release the lease; followers take over once it expires"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;
    use crate::{
        config::Config,
        driver::{SharedDriver, simulated},
    };

    /// A Lease store in memory with the API's optimistic concurrency, and switchable failure.
    #[derive(Debug, Default)]
    struct Memory {
        lease: Mutex<Option<Lease>>,
        version: Mutex<u64>,
        down: Mutex<bool>,
    }

    fn api_error(code: u16, reason: &str) -> kube::Error {
        kube::Error::Api {
            method: reqwest::Method::PUT,
            path: "/lease".into(),
            code,
            reason: reason.into(),
            message: reason.into(),
        }
    }

    impl Memory {
        fn check(&self) -> kube::Result<()> {
            if *self.down.lock().unwrap() { Err(api_error(503, "ServiceUnavailable")) } else { Ok(()) }
        }

        fn stamp(&self, mut lease: Lease) -> Lease {
            let mut v = self.version.lock().unwrap();
            *v += 1;
            lease.metadata.resource_version = Some(v.to_string());
            lease
        }

        fn holder(&self) -> Option<String> {
            self.lease.lock().unwrap().as_ref().and_then(|l| l.spec.holder_identity.clone())
        }

        /// Another replica renews its own hold on the Lease.
        fn renew_as(&self, holder: &str) {
            let mut lease =
                self.lease.lock().unwrap().clone().unwrap_or_else(|| Lease::new("ns", "l", LeaseSpec::default()));
            lease.spec.holder_identity = Some(holder.into());
            lease.spec.lease_duration_seconds = Some(4);
            lease.spec.renew_time = Some(micro_time(std::time::SystemTime::now()));
            let lease = self.stamp(lease);
            *self.lease.lock().unwrap() = Some(lease);
        }
    }

    #[async_trait]
    impl LeaseStore for Memory {
        async fn get(&self, _: &str, _: &str) -> kube::Result<Option<Lease>> {
            self.check()?;
            Ok(self.lease.lock().unwrap().clone())
        }

        async fn create(&self, lease: &Lease) -> kube::Result<Lease> {
            self.check()?;
            if self.lease.lock().unwrap().is_some() {
                return Err(api_error(409, "AlreadyExists"));
            }
            let stored = self.stamp(lease.clone());
            *self.lease.lock().unwrap() = Some(stored.clone());
            Ok(stored)
        }

        async fn update(&self, lease: &Lease) -> kube::Result<Lease> {
            self.check()?;
            let current = self.lease.lock().unwrap().clone();
            if current.map(|c| c.metadata.resource_version) != Some(lease.metadata.resource_version.clone()) {
                return Err(api_error(409, "Conflict"));
            }
            let stored = self.stamp(lease.clone());
            *self.lease.lock().unwrap() = Some(stored.clone());
            Ok(stored)
        }
    }

    fn fleet() -> Arc<Fleet> {
        let text = "cluster_name = \"t\"\n[leader_election]\nenabled = true\nlease_duration = \"4s\"\n\
                    renew_deadline = \"3s\"\nretry_period = \"1s\"\n\
                    [clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 5\n";
        let config = Config::parse(text, "test", std::path::Path::new(".")).unwrap();
        let sim = Arc::new(simulated::Simulated::new("t", simulated::Settings::default()).unwrap());
        Fleet::new(&config, vec![sim as SharedDriver])
    }

    fn elector(store: &Arc<Memory>, fleet: &Arc<Fleet>, identity: &str) -> Elector {
        let config = LeaderElectionConfig {
            enabled: true,
            lease_duration: Duration::from_secs(4),
            renew_deadline: Duration::from_secs(3),
            retry_period: Duration::from_secs(1),
            ..LeaderElectionConfig::disabled("t")
        };
        Elector::new(Arc::clone(store) as Arc<dyn LeaseStore>, Arc::clone(fleet), &config, "ns".into(), identity.into())
    }

    /// Advances paused time in small steps, letting spawned tasks run.
    async fn advance(d: Duration) {
        let step = Duration::from_millis(100);
        let mut left = d;
        while !left.is_zero() {
            let s = step.min(left);
            tokio::time::sleep(s).await;
            left -= s;
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_replica_starts_as_a_follower_and_leads_once_it_creates_the_lease() {
        let store = Arc::new(Memory::default());
        let fleet = fleet();
        assert!(!fleet.leading(), "with election on, nothing is served before the lease is won");
        let stop = CancellationToken::new();
        tokio::spawn(elector(&store, &fleet, "a").run(stop.clone()));
        advance(Duration::from_millis(200)).await;
        assert!(fleet.leading());
        assert_eq!(store.holder().as_deref(), Some("a"));
        let lease = store.lease.lock().unwrap().clone().unwrap();
        assert_eq!(lease.spec.lease_duration_seconds, Some(4));
        assert_eq!(lease.spec.lease_transitions, Some(0));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_never_takes_a_lease_its_holder_keeps_renewing() {
        let store = Arc::new(Memory::default());
        store.renew_as("other");
        let fleet = fleet();
        let stop = CancellationToken::new();
        tokio::spawn(elector(&store, &fleet, "b").run(stop.clone()));
        for _ in 0..20 {
            advance(Duration::from_secs(1)).await;
            store.renew_as("other");
            assert!(!fleet.leading());
        }
        assert_eq!(fleet.leader().as_deref(), Some("other"));
        assert!(fleet.readiness_problems()[0].contains("the leader is other"));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_follower_takes_over_a_lease_left_unrenewed_for_its_duration() {
        let store = Arc::new(Memory::default());
        store.renew_as("dead");
        let fleet = fleet();
        let stop = CancellationToken::new();
        let started = Instant::now();
        tokio::spawn(elector(&store, &fleet, "b").run(stop.clone()));
        while !fleet.leading() {
            advance(Duration::from_millis(100)).await;
        }
        let waited = started.elapsed();
        // The holder's last renewal was seen at start; 4 s later (plus one retry period with
        // jitter) it is expired.
        assert!(waited >= Duration::from_secs(4), "took over after {waited:?}, before the lease expired");
        assert!(waited <= Duration::from_millis(5300), "took over after {waited:?}");
        let lease = store.lease.lock().unwrap().clone().unwrap();
        assert_eq!(lease.spec.holder_identity.as_deref(), Some("b"));
        assert_eq!(lease.spec.lease_transitions, Some(1));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_cannot_renew_stops_before_anyone_may_take_over() {
        let store = Arc::new(Memory::default());
        let fleet = fleet();
        let stop = CancellationToken::new();
        tokio::spawn(elector(&store, &fleet, "a").run(stop.clone()));
        advance(Duration::from_millis(200)).await;
        assert!(fleet.leading());
        *store.down.lock().unwrap() = true;
        let outage = Instant::now();
        while fleet.leading() {
            advance(Duration::from_millis(100)).await;
        }
        let led_on = outage.elapsed();
        // Last renewal at most one retry period before the outage; the deadline is 3 s after it;
        // a follower may take over 4 s after it.
        assert!(led_on <= Duration::from_millis(3100), "kept acting for {led_on:?} without the lease");
        assert!(led_on >= Duration::from_secs(2), "stopped after {led_on:?}, before the renew deadline");
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_leader_that_reads_another_holder_stops_at_once() {
        let store = Arc::new(Memory::default());
        let fleet = fleet();
        let stop = CancellationToken::new();
        tokio::spawn(elector(&store, &fleet, "a").run(stop.clone()));
        advance(Duration::from_millis(200)).await;
        assert!(fleet.leading());
        store.renew_as("usurper");
        advance(Duration::from_millis(1300)).await;
        assert!(!fleet.leading(), "the next renewal saw another holder");
        assert_eq!(fleet.leader().as_deref(), Some("usurper"));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn two_replicas_racing_for_the_lease_end_with_exactly_one_leader() {
        let store = Arc::new(Memory::default());
        let (fa, fb) = (fleet(), fleet());
        let stop = CancellationToken::new();
        tokio::spawn(elector(&store, &fa, "a").run(stop.clone()));
        tokio::spawn(elector(&store, &fb, "b").run(stop.clone()));
        for _ in 0..50 {
            advance(Duration::from_millis(200)).await;
            assert!(!(fa.leading() && fb.leading()), "two leaders at once");
        }
        assert!(fa.leading() ^ fb.leading());
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_stopping_leader_releases_the_lease_and_the_follower_takes_it_at_once() {
        let store = Arc::new(Memory::default());
        let (fa, fb) = (fleet(), fleet());
        let (stop_a, stop_b) = (CancellationToken::new(), CancellationToken::new());
        let a = tokio::spawn(elector(&store, &fa, "a").run(stop_a.clone()));
        advance(Duration::from_millis(200)).await;
        tokio::spawn(elector(&store, &fb, "b").run(stop_b.clone()));
        advance(Duration::from_secs(2)).await;
        assert!(fa.leading() && !fb.leading());
        stop_a.cancel();
        a.await.unwrap();
        assert!(!fa.leading());
        assert_eq!(store.holder(), None, "released");
        let released = Instant::now();
        while !fb.leading() {
            advance(Duration::from_millis(100)).await;
        }
        assert!(released.elapsed() <= Duration::from_millis(1300), "took {:?}", released.elapsed());
        stop_b.cancel();
    }
}
