//! Burst priorities: cluster-autoscaler's `priority` expander, configured from the groups'
//! `priority` instead of a hand-written ConfigMap.
//!
//! CA's priority expander reads the ConfigMap `cluster-autoscaler-priority-expander` in its own
//! namespace, key `priorities`: a YAML map from priority (higher wins) to regexes matched
//! against node group ids. Flotilla writes it from its own configuration (server-side apply,
//! field manager `flotilla`), on start and whenever this replica becomes the leader.
//!
//! # Why Flotilla writes it, not the chart
//! * One source of truth: the groups, their names and their priorities live in Flotilla's
//!   configuration; the ConfigMap is derived from it and cannot drift from it (a group renamed
//!   in one place and not the other silently falls out of CA's choice: the expander ignores a
//!   group no regex matches whenever any other group matches).
//! * It works the same with or without Helm (the Docker, kwok and bare-metal set-ups have no
//!   chart), and `flotilla priority-configmap --config FILE` prints the same object for GitOps
//!   users who would rather commit it.
//! * The chart needs only two RBAC rules in CA's namespace: `patch` on that one ConfigMap, and
//!   `create` on ConfigMaps (a server-side apply that creates the object is authorised as a
//!   create too, and `create` cannot be limited to a name).
//!
//! A group without `priority` gets priority 0 (still usable, after every prioritised group),
//! because CA would otherwise never pick it once any group matches.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::{
    config::{Config, GroupConfig},
    kube,
    state::Fleet,
};

/// The ConfigMap's name, fixed by cluster-autoscaler.
pub const CONFIG_MAP_NAME: &str = "cluster-autoscaler-priority-expander";
/// The data key CA reads.
pub const CONFIG_MAP_KEY: &str = "priorities";

/// The `priorities` value: priorities from highest to lowest, each with the exact-match
/// regexes of its groups.
pub fn priorities_yaml(groups: &[GroupConfig]) -> String {
    let mut by_priority: BTreeMap<u32, Vec<&str>> = BTreeMap::new();
    for g in groups {
        by_priority.entry(g.priority.unwrap_or(0)).or_default().push(&g.name);
    }
    let mut out = String::new();
    for (priority, names) in by_priority.iter().rev() {
        out.push_str(&format!("{priority}:\n"));
        for name in names {
            // Group ids are DNS labels: no regex metacharacter to escape. Anchored, so `web`
            // does not also match `web-gpu`.
            out.push_str(&format!("  - ^{name}$\n"));
        }
    }
    out
}

/// The labels Flotilla puts on the ConfigMap.
pub fn labels(cluster: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/managed-by".to_owned(), "flotilla".to_owned()),
        ("flotilla.dev/cluster".to_owned(), cluster.to_owned()),
    ])
}

/// The whole ConfigMap as YAML, for `flotilla priority-configmap`.
pub fn config_map_yaml(config: &Config, namespace: &str) -> String {
    let mut out = format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {CONFIG_MAP_NAME}\n  namespace: {namespace}\n  labels:\n"
    );
    for (k, v) in labels(&config.cluster_name) {
        out.push_str(&format!("    {k}: {v}\n"));
    }
    out.push_str(&format!("data:\n  {CONFIG_MAP_KEY}: |\n"));
    for line in priorities_yaml(&config.groups).lines() {
        out.push_str(&format!("    {line}\n"));
    }
    out
}

/// Applies the ConfigMap once per term (and again after a failure, every `retry`) until
/// `shutdown`. Only a leader writes.
pub async fn run(
    api: kube::Client,
    fleet: Arc<Fleet>,
    namespace: String,
    cluster: String,
    groups: Vec<GroupConfig>,
    retry: Duration,
    shutdown: CancellationToken,
) {
    let data = BTreeMap::from([(CONFIG_MAP_KEY.to_owned(), priorities_yaml(&groups))]);
    let labels = labels(&cluster);
    let mut applied = false;
    loop {
        if !fleet.leading() {
            applied = false;
        } else if !applied {
            match api.apply_config_map(&namespace, CONFIG_MAP_NAME, &labels, &data).await {
                Ok(outcome) => {
                    info!(%namespace, name = CONFIG_MAP_NAME, ?outcome, "applied cluster-autoscaler's priority expander configuration");
                    applied = true;
                }
                Err(e) => {
                    warn!(%namespace, name = CONFIG_MAP_NAME, error = %e, "cannot apply the priority expander configmap; will retry")
                }
            }
        }
        // Leadership is polled: a term change is noticed within a second.
        let wait = if applied || !fleet.leading() { Duration::from_secs(1) } else { retry };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(text: &str) -> Config {
        Config::parse(text, "test.toml", std::path::Path::new(".")).unwrap()
    }

    const HYBRID: &str = r#"
        cluster_name = "c"
        [priority_expander]
        [clouds.pve]
        driver = "simulated"
        [clouds.os]
        driver = "simulated"
        [groups.onprem]
        cloud = "pve"
        max_size = 3
        priority = 50
        [groups.onprem-big]
        cloud = "pve"
        max_size = 3
        priority = 50
        [groups.cloud]
        cloud = "os"
        max_size = 10
        priority = 10
        [groups.spare]
        cloud = "os"
        max_size = 1
    "#;

    #[test]
    fn groups_become_anchored_regexes_under_their_priority_highest_first() {
        let yaml = priorities_yaml(&config(HYBRID).groups);
        assert_eq!(yaml, "50:\n  - ^onprem$\n  - ^onprem-big$\n10:\n  - ^cloud$\n0:\n  - ^spare$\n");
        // What CA parses: map[int][]string.
        let parsed: BTreeMap<i64, Vec<String>> = serde_yaml::from_str(&yaml).unwrap();
        assert_eq!(parsed[&50], ["^onprem$", "^onprem-big$"]);
        assert_eq!(parsed[&0], ["^spare$"]);
    }

    #[test]
    fn the_printed_config_map_is_what_is_applied() {
        let c = config(HYBRID);
        let text = config_map_yaml(&c, "kube-system");
        let parsed: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        assert_eq!(parsed["metadata"]["name"].as_str(), Some(CONFIG_MAP_NAME));
        assert_eq!(parsed["metadata"]["namespace"].as_str(), Some("kube-system"));
        assert_eq!(parsed["data"][CONFIG_MAP_KEY].as_str(), Some(priorities_yaml(&c.groups).as_str()));
    }

    #[test]
    fn a_priority_expander_without_any_group_priority_is_a_mistake() {
        let text = HYBRID.replace("priority = 50", "").replace("priority = 10", "");
        let problems = Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap_err();
        assert!(problems.to_string().contains("priority_expander: no group declares a priority"), "{problems}");
        let text = HYBRID.replace("priority = 10", "priority = -1");
        let problems = Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap_err();
        assert!(problems.to_string().contains("groups.cloud.priority"), "{problems}");
    }
}
