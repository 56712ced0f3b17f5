//! Keys for running beside a cluster: `[kubernetes]` (the one API client's set-up),
//! `[leader_election]` and `[priority_expander]`. The per-cloud `node_cleanup` and per-group
//! `priority` are read with the other cloud and group keys.

use std::time::Duration;

use super::{Problems, Section};
use crate::kube;

/// `[leader_election]`: several replicas, one of which acts (see `crate::incluster::leader`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LeaderElectionConfig {
    pub enabled: bool,
    /// Where the Lease lives; `None`: the pod's namespace (or the kubeconfig context's), else
    /// `default`.
    pub namespace: Option<String>,
    pub lease_name: String,
    /// This replica's name in the Lease; `None`: `$POD_NAME` or the host name, plus a random
    /// suffix so that a restarted process never mistakes its predecessor's term for its own.
    pub identity: Option<String>,
    /// How long a Lease not renewed stays valid; a follower takes over after this.
    pub lease_duration: Duration,
    /// A leader that has not renewed for this long stops acting (less than `lease_duration`,
    /// so it has stopped before anyone else may start).
    pub renew_deadline: Duration,
    /// How often the leader renews and a follower tries to acquire.
    pub retry_period: Duration,
}

impl LeaderElectionConfig {
    /// client-go's defaults: 15 s, 10 s, 2 s.
    pub fn disabled(cluster: &str) -> LeaderElectionConfig {
        LeaderElectionConfig {
            enabled: false,
            namespace: None,
            lease_name: format!("flotilla-{cluster}"),
            identity: None,
            lease_duration: Duration::from_secs(15),
            renew_deadline: Duration::from_secs(10),
            retry_period: Duration::from_secs(2),
        }
    }
}

/// `[priority_expander]`: write cluster-autoscaler's priority-expander ConfigMap from the
/// groups' `priority`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PriorityExpanderConfig {
    /// cluster-autoscaler's namespace (its `--namespace` flag).
    pub namespace: String,
}

pub(super) fn parse_kubernetes(section: Option<Section<'_>>, p: &mut Problems) -> kube::Settings {
    let Some(mut s) = section else { return kube::Settings::default() };
    let settings = kube::Settings {
        kubeconfig: s.string("kubeconfig", p).map(|f| p.resolve(&f)),
        timeout: s.duration("timeout", p),
    };
    if settings.timeout.is_some_and(|t| t.is_zero()) {
        p.push(s.key_path("timeout"), "must be longer than zero");
    }
    s.finish(p);
    settings
}

pub(super) fn parse_leader_election(
    section: Option<Section<'_>>,
    cluster: &str,
    p: &mut Problems,
) -> LeaderElectionConfig {
    let defaults = LeaderElectionConfig::disabled(cluster);
    let Some(mut s) = section else { return defaults };
    let c = LeaderElectionConfig {
        enabled: s.boolean("enabled", p).unwrap_or(false),
        namespace: s.string("namespace", p),
        lease_name: s.string("lease_name", p).unwrap_or(defaults.lease_name),
        identity: s.string("identity", p),
        lease_duration: s.duration("lease_duration", p).unwrap_or(defaults.lease_duration),
        renew_deadline: s.duration("renew_deadline", p).unwrap_or(defaults.renew_deadline),
        retry_period: s.duration("retry_period", p).unwrap_or(defaults.retry_period),
    };
    if c.retry_period.is_zero() {
        p.push(s.key_path("retry_period"), "must be longer than zero");
    }
    if c.renew_deadline <= c.retry_period {
        p.push(s.key_path("renew_deadline"), "must be longer than retry_period");
    }
    if c.lease_duration <= c.renew_deadline {
        p.push(
            s.key_path("lease_duration"),
            "must be longer than renew_deadline (a leader that cannot renew must stop before its lease runs out)",
        );
    }
    if c.lease_duration.as_secs() < 1 || c.lease_duration.subsec_nanos() != 0 {
        p.push(s.key_path("lease_duration"), "must be whole seconds, at least 1s (Lease.spec.leaseDurationSeconds)");
    }
    if c.lease_name.is_empty() || !is_dns_subdomain(&c.lease_name) {
        p.push(s.key_path("lease_name"), "must be a DNS subdomain: lower-case letters, digits, '-' and '.'");
    }
    if let Some(ns) = c.namespace.as_deref().filter(|ns| !super::is_dns_label_of(ns, 63)) {
        p.push(s.key_path("namespace"), format!("{ns:?} is not a namespace name"));
    }
    if c.identity.as_deref().is_some_and(str::is_empty) {
        p.push(s.key_path("identity"), "must not be empty");
    }
    s.finish(p);
    c
}

pub(super) fn parse_priority_expander(
    section: Option<Section<'_>>,
    p: &mut Problems,
) -> Option<PriorityExpanderConfig> {
    let mut s = section?;
    let namespace = s.string("namespace", p).unwrap_or_else(|| "kube-system".into());
    if !super::is_dns_label_of(&namespace, 63) {
        p.push(s.key_path("namespace"), format!("{namespace:?} is not a namespace name"));
    }
    s.finish(p);
    Some(PriorityExpanderConfig { namespace })
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(|label| super::is_dns_label_of(label, 63))
}
