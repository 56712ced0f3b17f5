//! Node registration for the simulated cloud: what a real machine's kubelet does when it
//! joins, done through the Kubernetes API so the simulated cloud can drive a real cluster
//! whose nodes are played by [kwok](https://kwok.sigs.k8s.io/). With it, the stock
//! cluster-autoscaler scales a cluster without any cloud, which is how to try its settings
//! (and Flotilla's) cheaply, and how the e2e suite runs.
//!
//! Registration is list-driven and idempotent. Every listing of the simulated cloud queues a
//! sync that makes the Nodes carrying this cluster's ownership labels match the machines that
//! have booted (Running) in groups that register nodes: missing Nodes are created (an
//! `AlreadyExists` answer is fine), and, with `remove_nodes` (the default, what a cloud
//! controller manager does), Nodes without a machine are deleted (`NotFound` is fine).
//! A restart therefore re-ensures every Node, and a failed call is simply retried on the next
//! listing. With `remove_nodes`, deleting a machine also deletes its Node at once; without it,
//! the Nodes of deleted machines stay, as they do on a cluster without a cloud controller
//! manager, and only Flotilla's Node cleanup (`node_cleanup`) removes them.
//!
//! The Kubernetes client is the core's (`[kubernetes]`): one set-up for everything.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use serde_json::{Map, Value, json};

use crate::{kube, provider_id::ProviderIdFormat, template::Template};

/// The label holding the cluster a registered Node belongs to.
pub const CLUSTER_LABEL: &str = "flotilla.dev/cluster";
/// The label holding the node group of a registered Node.
pub const GROUP_LABEL: &str = "flotilla.dev/group";
/// The annotation that makes kwok manage a Node (play its kubelet).
pub const KWOK_ANNOTATION: &str = "kwok.x-k8s.io/node";

/// How the Nodes of one group look.
#[derive(Clone, Debug)]
pub struct GroupNodes {
    /// The group's template node (labels, taints, capacity), shared with the core.
    pub template: Template,
    /// The group's provider-id format, rendered the way the core renders `Instance.id`.
    pub provider_id: ProviderIdFormat,
    /// The cloud's region, for `{region}`.
    pub region: String,
}

/// A booted machine that should have a Node.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Wanted {
    pub group: String,
    pub name: String,
}

/// Builds the Node object a machine registers, from its group's template.
pub fn node_object(cluster: &str, group: &str, name: &str, nodes: &GroupNodes) -> Value {
    let provider_id =
        nodes.provider_id.render(crate::provider_id::Parts { cluster, group, region: &nodes.region, name, id: name });
    let template = &nodes.template.node;
    let meta = template.metadata.clone().unwrap_or_default();
    let spec = template.spec.clone().unwrap_or_default();
    let status = template.status.clone().unwrap_or_default();
    let mut labels: BTreeMap<String, String> = meta.labels.into_iter().collect();
    labels.insert("kubernetes.io/hostname".into(), name.into());
    labels.insert(CLUSTER_LABEL.into(), cluster.into());
    labels.insert(GROUP_LABEL.into(), group.into());
    let quantities = |m: std::collections::HashMap<String, crate::proto::k8s::Quantity>| -> Map<String, Value> {
        let sorted: BTreeMap<_, _> = m.into_iter().collect();
        sorted.into_iter().map(|(k, v)| (k, Value::String(v.string))).collect()
    };
    let info = status.node_info.unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": labels,
            "annotations": { KWOK_ANNOTATION: "fake" },
        },
        "spec": {
            "providerID": provider_id,
            "taints": spec.taints.iter().map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect})).collect::<Vec<_>>(),
        },
        "status": {
            "capacity": quantities(status.capacity),
            "allocatable": quantities(status.allocatable),
            "nodeInfo": { "operatingSystem": info.operating_system, "architecture": info.architecture },
        },
    })
}

/// Registers and removes Nodes for one simulated cloud.
#[derive(Debug)]
pub struct Registrar {
    /// Connects at its first call, so Flotilla can start before the cluster exists and
    /// `check-config` needs no live kubeconfig.
    api: kube::Client,
    cluster: String,
    /// Delete Nodes whose machine is gone (what a cloud controller manager does).
    remove_nodes: bool,
    /// Groups that register Nodes, by name (groups with `register_node = false` are absent).
    groups: BTreeMap<String, GroupNodes>,
    /// Held by a sync and by a Node deletion, so a sync never re-creates a Node that a
    /// concurrent machine deletion just removed.
    busy: tokio::sync::Mutex<()>,
    /// Set by a listing that queued a sync, cleared when that sync starts: listings that come
    /// while one sync waits do not queue more.
    queued: AtomicBool,
}

impl Registrar {
    pub fn new(
        api: kube::Client,
        cluster: &str,
        groups: BTreeMap<String, GroupNodes>,
        remove_nodes: bool,
    ) -> Registrar {
        Registrar {
            api,
            cluster: cluster.to_owned(),
            remove_nodes,
            groups,
            busy: tokio::sync::Mutex::new(()),
            queued: AtomicBool::new(false),
        }
    }

    /// True when machines of `group` become Nodes.
    pub fn registers(&self, group: &str) -> bool {
        self.groups.contains_key(group)
    }

    /// Queues one sync unless one is already waiting; `wanted` is called when the sync
    /// starts, so it sees the machines as they are then, not as they were when queued.
    pub fn queue_sync<F>(self: &Arc<Self>, wanted: F)
    where
        F: FnOnce() -> BTreeSet<Wanted> + Send + 'static,
    {
        if self.queued.swap(true, Ordering::AcqRel) {
            return;
        }
        let this = Arc::clone(self);
        tokio::spawn(async move {
            let _guard = this.busy.lock().await;
            this.queued.store(false, Ordering::Release);
            let wanted = wanted();
            if let Err(e) = this.sync(&wanted).await {
                tracing::warn!(error = %e, "node registration sync failed, will retry on the next listing");
            }
        });
    }

    /// Makes this cluster's Nodes match `wanted`. Called with `busy` held.
    async fn sync(&self, wanted: &BTreeSet<Wanted>) -> kube::Result<()> {
        let selector = format!("{CLUSTER_LABEL}={}", self.cluster);
        let api = &self.api;
        let existing = api.list_nodes(Some(&selector)).await?;
        let present: BTreeSet<Wanted> = existing
            .iter()
            .filter_map(|n| {
                let group = n.metadata.labels.get(GROUP_LABEL)?;
                // Nodes of groups on other clouds are theirs to manage.
                self.groups.contains_key(group).then(|| Wanted { group: group.clone(), name: n.metadata.name.clone() })
            })
            .collect();
        let mut first_error = None;
        for w in wanted.difference(&present) {
            let Some(nodes) = self.groups.get(&w.group) else { continue };
            match api.create_node(&node_object(&self.cluster, &w.group, &w.name, nodes)).await {
                Ok(true) => tracing::info!(group = %w.group, node = %w.name, "registered node"),
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(group = %w.group, node = %w.name, error = %e, "cannot register node");
                    first_error.get_or_insert(e);
                }
            }
        }
        let stale = if self.remove_nodes { present.difference(wanted).collect() } else { Vec::new() };
        for gone in stale {
            match api.delete_node(&gone.name, None).await {
                Ok(kube::DeleteOutcome::Deleted) => {
                    tracing::info!(group = %gone.group, node = %gone.name, "removed node of a deleted machine")
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(group = %gone.group, node = %gone.name, error = %e, "cannot remove node");
                    first_error.get_or_insert(e);
                }
            }
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Removes the Node of a deleted machine (with `remove_nodes`); a Node already gone is fine.
    pub async fn remove(&self, group: &str, name: &str) -> kube::Result<()> {
        if !self.registers(group) || !self.remove_nodes {
            return Ok(());
        }
        let _guard = self.busy.lock().await;
        if self.api.delete_node(name, None).await? == kube::DeleteOutcome::Deleted {
            tracing::info!(%group, node = %name, "removed node");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::config::Config;

    fn group_nodes(config_text: &str) -> GroupNodes {
        let config = Config::parse(config_text, "test.toml", Path::new(".")).unwrap();
        let group = &config.groups[0];
        GroupNodes {
            template: Template::build(group, Default::default(), ""),
            provider_id: group.provider_id.clone(),
            region: config.clouds[0].region.clone(),
        }
    }

    const CONFIG: &str = r#"
        cluster_name = "e2e"
        [clouds.sim]
        driver = "simulated"
        [groups.small]
        cloud = "sim"
        max_size = 3
        [groups.small.template]
        cpu = "2"
        memory = "4Gi"
        pods = 20
        labels = { "flotilla.dev/pool" = "small" }
        taints = [{ key = "dedicated", value = "batch", effect = "NoSchedule" }]
        [groups.small.template.reserved]
        cpu = "100m"
    "#;

    #[test]
    fn a_node_carries_the_provider_id_the_core_reports() {
        let node = node_object("e2e", "small", "e2e-small-abc12", &group_nodes(CONFIG));
        assert_eq!(node["spec"]["providerID"], "simulated://e2e/e2e-small-abc12");
        assert_eq!(node["metadata"]["name"], "e2e-small-abc12");
    }

    #[test]
    fn a_custom_provider_id_format_is_rendered_the_same_way() {
        let text = CONFIG.replace("max_size = 3", "max_size = 3\nprovider_id = \"kwok://{region}/{group}/{name}\"");
        let node = node_object("e2e", "small", "m1", &group_nodes(&text));
        assert_eq!(node["spec"]["providerID"], "kwok://sim/small/m1");
    }

    #[test]
    fn a_node_has_the_template_labels_taints_and_capacity() {
        let node = node_object("e2e", "small", "m1", &group_nodes(CONFIG));
        let labels = &node["metadata"]["labels"];
        assert_eq!(labels["flotilla.dev/pool"], "small");
        assert_eq!(labels["kubernetes.io/hostname"], "m1", "the template's hostname is replaced");
        assert_eq!(labels[CLUSTER_LABEL], "e2e");
        assert_eq!(labels[GROUP_LABEL], "small");
        assert_eq!(node["metadata"]["annotations"][KWOK_ANNOTATION], "fake");
        assert_eq!(node["spec"]["taints"], json!([{"key": "dedicated", "value": "batch", "effect": "NoSchedule"}]));
        assert_eq!(node["status"]["capacity"]["cpu"], "2");
        assert_eq!(node["status"]["capacity"]["pods"], "20");
        assert_eq!(node["status"]["allocatable"]["cpu"], "1900m");
        assert_eq!(node["status"]["capacity"]["memory"], "4Gi");
    }

    #[test]
    fn the_kwok_example_builds_without_a_live_cluster() {
        let text = include_str!("../../../examples/simulated-kwok.toml");
        let dir = tempfile::tempdir().unwrap();
        let config = Config::parse(text, "simulated-kwok.toml", dir.path()).unwrap();
        let drivers = crate::build_drivers(&config).unwrap_or_else(|p| panic!("{p}"));
        assert_eq!(drivers.len(), 1);
    }

    #[tokio::test]
    async fn a_missing_kubeconfig_fails_the_sync_not_the_start() {
        let groups = BTreeMap::from([("small".to_owned(), group_nodes(CONFIG))]);
        let api = kube::Client::new(kube::Settings {
            kubeconfig: Some(PathBuf::from("/nonexistent/kubeconfig")),
            timeout: None,
        });
        let registrar = Registrar::new(api, "e2e", groups, true);
        let err = registrar.sync(&BTreeSet::new()).await.unwrap_err().to_string();
        assert!(err.contains("cannot read /nonexistent/kubeconfig"), "{err}");
        assert!(registrar.remove("small", "m1").await.is_err());
        // Groups that do not register Nodes never need the API.
        registrar.remove("other", "m1").await.unwrap();
    }

    #[test]
    fn unknown_registration_and_machine_keys_are_reported() {
        let text = CONFIG.replace("driver = \"simulated\"", "driver = \"simulated\"\nregister_node = true\n")
            + "\n[groups.small.machine]\nregister_nodes = true\n";
        let config = Config::parse(&text, "test.toml", Path::new(".")).unwrap();
        let problems = crate::build_drivers(&config).unwrap_err();
        let paths: Vec<_> = problems.items.iter().map(|i| i.path.as_str()).collect();
        for expected in ["clouds.sim.register_node", "groups.small.machine.register_nodes"] {
            assert!(paths.contains(&expected), "missing {expected} in {problems}");
        }
    }
}
