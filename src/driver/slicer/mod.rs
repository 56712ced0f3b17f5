//! Slicer: k3s agents as Slicer microVMs, one Slicer REST API (one Slicer host) per cloud, one
//! Slicer host group per Flotilla group.
//!
//! # Ownership and names
//! Every VM is created with the tags `flotilla-cluster=<cluster>`, `flotilla-group=<group>` and
//! `flotilla-name=<machine name>` in the same `POST /hostgroup/{hg}/nodes`. The daemon picks the
//! hostname (`<host group>-N`), so a machine has two names: the one Flotilla chose (from the
//! tag; the core's key for it) and the hostname (its [`Machine::id`], the Kubernetes node name,
//! the `{id}` of the provider id `k3s://{id}`). A create whose answer is lost is found again by
//! its name tag; a restarted Flotilla finds every VM by its tags; a VM without this cluster's tag
//! (the host group's own start-up VMs, anyone else's) is never listed, and never deleted: a
//! delete first reads the VM and checks its tags.
//!
//! # Calls
//! `list` is one `GET /hostgroup/{hg}/nodes?tag=flotilla-cluster=<cluster>` per host group,
//! whatever the number of VMs. `create` stores the join token as a Slicer secret first (once per
//! process: `POST /secrets`, and on 409 a `PATCH` so the secret holds the configured token),
//! then launches the VM with that secret and the userdata ([`userdata`]). `delete` is one
//! listing and one `DELETE`; `mark_deleting` one listing and one `PATCH /vm/{hostname}/tags`.
//! `shape` and `check` read `GET /hostgroup`.
//!
//! # Warm pools
//! A group with `warm_pool` needs `persistent = true`: `stop` is `POST /vm/{hostname}/shutdown`
//! with the SDK's default action `reboot` (a Firecracker guest's graceful stop: a guest
//! power-off does not end the VMM) and waits for the listing to say `Stopped`; `start` is
//! `POST /vm/{hostname}/relaunch` (SDK v0.0.35 on; an older daemon's 404 fails the start, and
//! the core creates a new VM instead). In a pool group a `Stopped` VM is a pool machine; in any
//! other it is listed as it always was (Running, its Node NotReady until cluster-autoscaler
//! deletes it).
//!
//! # Marks: an accepted delete outlives the process
//! Before deleting, the core asks for the tag `flotilla-deleting=true` ([`MARK_DELETING`]),
//! added with `PATCH /vm/{hostname}/tags` after the listing confirmed the hostname is still
//! this machine's VM. A listed VM carrying it is Deleting, so a restarted Flotilla deletes it
//! again. Daemons older than the tag-changing route (slicervm/sdk v0.0.66, August 2026) answer
//! 404 for it, as they do for a VM that is gone: when the VM is still listed, the driver takes
//! it that the daemon cannot change tags, says so once in the log, and marks nothing for the
//! rest of the process (an accepted delete then lives in memory until its `DELETE` is sent,
//! which is at once unless `delete_concurrency` deletes are running).
//!
//! # What the upstream provider (kubernetes/autoscaler PR #8867) got wrong, and this does not
//! * It reported Kubernetes node names as instance ids while k3s sets `k3s://<node name>` as
//!   the provider id, with a random `--with-node-id` suffix on top: cluster-autoscaler never
//!   matched instances to nodes. Here the node is named after the hostname and started with the
//!   provider id Flotilla reports.
//! * It listed only VMs that had become nodes, so a VM that never joined was never reported and
//!   never deleted (a leak). Here every tagged VM is an instance from the moment it exists;
//!   cluster-autoscaler deletes one that does not register within its provision timeout.
//! * Its target size was a local counter. Here sizes come from the listing (the core's state).
//! * It deleted the Node even when the VM delete failed, orphaning a running VM. Here nothing
//!   touches the Node; a failed delete keeps the instance `Deleting` and is retried.
//! * A full host group was an ordinary error. Here it is OutOfResources, so cluster-autoscaler
//!   tries another group at once.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use base64::Engine;
use serde_json::{Value, json};

use super::{Driver, Error, Machine, MachineRef, MachineState, Result, Shape, http};
use crate::config::Problems;

pub mod api;
pub mod settings;
pub mod userdata;

pub use settings::{CloudSettings, GroupSettings};

/// Tag key naming the cluster a VM belongs to.
pub const TAG_CLUSTER: &str = "flotilla-cluster";
/// Tag key naming the node group.
pub const TAG_GROUP: &str = "flotilla-group";
/// Tag key holding the machine name Flotilla chose.
pub const TAG_NAME: &str = "flotilla-name";
/// Tag key of a VM Flotilla is deleting.
pub const TAG_DELETING: &str = "flotilla-deleting";
/// The tag [`Driver::mark_deleting`] adds.
pub const MARK_DELETING: &str = "flotilla-deleting=true";
/// How long a stop waits for the daemon to list the VM `Stopped`.
const STOP_WAIT: std::time::Duration = std::time::Duration::from_secs(120);
/// How often a stop reads the listing meanwhile.
const POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// One Slicer daemon.
#[derive(Debug)]
pub struct Slicer {
    cluster: String,
    /// Substituted for `{region}` in provider ids.
    region: String,
    api: api::Api,
    k3s_url: String,
    /// The join token, base64-encoded as the secrets API takes it.
    k3s_token_base64: String,
    token_secret: String,
    capacity_errors: Vec<String>,
    groups: BTreeMap<String, GroupSettings>,
    /// Set once the join token is stored on the daemon; the lock makes concurrent creates wait
    /// for one store instead of racing.
    secret_stored: tokio::sync::Mutex<bool>,
    /// Set once the daemon showed it has no route to change a VM's tags: deletes are then not
    /// marked (see "Marks" above).
    tags_fixed: std::sync::atomic::AtomicBool,
}

/// The Slicer driver's [`Constructor`](super::Constructor).
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<super::SharedDriver> {
    let cloud = CloudSettings::parse(setup.cluster, &mut setup.section, p);
    let mut groups = BTreeMap::new();
    let wanted = setup.groups.len();
    for g in &mut setup.groups {
        if let Some(s) = GroupSettings::parse(setup.cluster, &setup.cloud.region, g.config, &mut g.machine, p) {
            groups.insert(g.config.name.clone(), s);
        }
    }
    let cloud = cloud?;
    if groups.len() < wanted {
        return None;
    }
    match Slicer::new(setup.cluster, &setup.cloud.region, cloud, groups) {
        Ok(d) => Some(std::sync::Arc::new(d)),
        Err(e) => {
            p.push(setup.section.key_path("ca_file"), format!("cannot set up TLS: {e}"));
            None
        }
    }
}

impl Slicer {
    pub fn new(
        cluster: &str,
        region: &str,
        cloud: CloudSettings,
        groups: BTreeMap<String, GroupSettings>,
    ) -> Result<Slicer, http::BuildError> {
        let settings = http::Settings::new(cloud.trust.clone())
            .timeout(cloud.request_timeout)
            .allow_plain_http(cloud.allow_plain_http)
            .classify(api::classify);
        let client = http::Client::new(settings)?;
        Ok(Slicer {
            cluster: cluster.to_owned(),
            region: region.to_owned(),
            api: api::Api::new(client, &cloud.url, cloud.token),
            k3s_url: cloud.k3s_url,
            k3s_token_base64: base64::engine::general_purpose::STANDARD.encode(cloud.k3s_token.expose()),
            token_secret: cloud.token_secret,
            capacity_errors: cloud.capacity_errors,
            groups,
            secret_stored: tokio::sync::Mutex::new(false),
            tags_fixed: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn group(&self, group: &str) -> Result<&GroupSettings> {
        self.groups.get(group).ok_or_else(|| Error::InvalidRequest(format!("group {group:?} is not on this cloud")))
    }

    fn running(&self, machine: &MachineRef) -> Machine {
        Machine {
            group: machine.group.clone(),
            name: machine.name.clone(),
            id: machine.id.clone(),
            state: MachineState::Running,
        }
    }

    fn cluster_tag(&self) -> String {
        format!("{TAG_CLUSTER}={}", self.cluster)
    }

    /// The machine a listed VM is, if it carries this cluster's tags and a group configured on
    /// this cloud with host group `hg`.
    fn machine_of(&self, hg: &str, node: api::Node) -> Option<Machine> {
        if node.tag(TAG_CLUSTER) != Some(self.cluster.as_str()) {
            return None;
        }
        let group = node.tag(TAG_GROUP)?;
        if self.groups.get(group).is_none_or(|g| g.host_group != hg) {
            tracing::debug!(host_group = hg, hostname = %node.hostname, group, "ignoring a VM of a group not on this host group");
            return None;
        }
        // A VM tagged by hand without a name is still ours; its hostname names it.
        let name = node.tag(TAG_NAME).unwrap_or(&node.hostname).to_owned();
        let pool = self.groups.get(group).is_some_and(|g| g.warm_pool);
        let state = if node.tag(TAG_DELETING).is_some() {
            MachineState::Deleting
        } else if pool && is_stopped(&node) {
            MachineState::Stopped
        } else {
            MachineState::Running
        };
        Some(Machine { group: group.to_owned(), name, id: node.hostname, state })
    }

    /// The listed VM of `machine`, if it is still that machine's (hostnames are reused once a
    /// VM is gone) and tagged for its group: [`Error::NotFound`] when it is gone.
    async fn own_node(&self, machine: &MachineRef) -> Result<api::Node> {
        let g = self.group(&machine.group)?;
        let nodes =
            self.api.nodes(&g.host_group, &self.cluster_tag(), true).await.map_err(|e| self.api.classify(&e))?;
        let Some(node) = nodes.into_iter().find(|n| n.hostname == machine.id) else {
            return Err(Error::NotFound(format!("VM {} is not in host group {}", machine.id, g.host_group)));
        };
        let ours = node.tag(TAG_CLUSTER) == Some(self.cluster.as_str())
            && node.tag(TAG_NAME).unwrap_or(&node.hostname) == machine.name;
        if !ours {
            return Err(Error::NotFound(format!(
                "VM {} no longer carries the tags of machine {} (it is another VM now)",
                machine.id, machine.name
            )));
        }
        if node.tag(TAG_GROUP) != Some(machine.group.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "VM {} is not tagged for group {:?}; refusing to touch it",
                machine.id, machine.group
            )));
        }
        Ok(node)
    }

    /// Stores the join token as the Slicer secret VMs read it from, once per process.
    async fn ensure_secret(&self) -> Result<()> {
        let mut stored = self.secret_stored.lock().await;
        if *stored {
            return Ok(());
        }
        let name = &self.token_secret;
        let created = self.api.create_secret(name, &self.k3s_token_base64).await.map_err(|e| self.api.classify(&e))?;
        if !created {
            // It exists: make it hold the configured token (it may be an older one).
            self.api.patch_secret(name, &self.k3s_token_base64).await.map_err(|e| self.api.classify(&e))?;
        }
        tracing::info!(secret = %name, created, "the k3s join token is stored as a Slicer secret");
        *stored = true;
        Ok(())
    }

    fn create_body(&self, group: &str, name: &str, g: &GroupSettings, userdata: String) -> Value {
        let mut tags = vec![
            format!("{TAG_CLUSTER}={}", self.cluster),
            format!("{TAG_GROUP}={group}"),
            format!("{TAG_NAME}={name}"),
        ];
        tags.extend(g.tags.iter().cloned());
        let mut body = json!({
            "userdata": userdata,
            "secrets": [self.token_secret],
            "tags": tags,
        });
        if let Some(c) = g.cpus {
            body["cpus"] = json!(c);
        }
        if let Some(r) = g.ram_bytes {
            body["ram_bytes"] = json!(r);
        }
        if let Some(n) = g.gpu_count {
            body["gpu_count"] = json!(n);
        }
        if g.persistent {
            body["persistent"] = json!(true);
        }
        if !g.ssh_keys.is_empty() {
            body["ssh_keys"] = json!(g.ssh_keys);
        }
        if let Some(u) = &g.import_user {
            body["import_user"] = json!(u);
        }
        body
    }

    /// The VM a create made for machine `name`, if the daemon has one.
    async fn find_by_name(&self, g: &GroupSettings, group: &str, name: &str) -> Result<Option<Machine>> {
        let nodes = self
            .api
            .nodes(&g.host_group, &format!("{TAG_NAME}={name}"), true)
            .await
            .map_err(|e| self.api.classify(&e))?;
        Ok(nodes
            .into_iter()
            .filter_map(|n| self.machine_of(&g.host_group, n))
            .find(|m| m.group == group && m.name == name))
    }

    /// How cluster-autoscaler should see a failed create: out of resources when the daemon
    /// says the host is full, the API's own words otherwise.
    fn create_error(&self, e: &http::Error) -> Error {
        let message = e.message().to_lowercase();
        if e.status().is_some_and(|s| s == 507)
            || (!message.is_empty() && self.capacity_errors.iter().any(|c| message.contains(c.as_str())))
        {
            return Error::OutOfResources(e.to_string());
        }
        self.api.classify(e)
    }
}

#[async_trait]
impl Driver for Slicer {
    fn kind(&self) -> &'static str {
        "slicer"
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let host_groups: BTreeSet<&str> = self.groups.values().map(|g| g.host_group.as_str()).collect();
        let tag = self.cluster_tag();
        let mut machines = Vec::new();
        for hg in host_groups {
            let nodes = self.api.nodes(hg, &tag, false).await.map_err(|e| self.api.classify(&e))?;
            machines.extend(nodes.into_iter().filter_map(|n| self.machine_of(hg, n)));
        }
        Ok(machines)
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        let g = self.group(group)?;
        self.ensure_secret().await?;
        let target = userdata::Target {
            cluster: &self.cluster,
            group,
            region: &self.region,
            host_group: &g.host_group,
            name,
            k3s_url: &self.k3s_url,
            token_secret: &self.token_secret,
        };
        let script = g.userdata.render(target).map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let body = self.create_body(group, name, g, script);
        match self.api.create_node(&g.host_group, &body).await {
            Ok(created) => Ok(Machine {
                group: group.to_owned(),
                name: name.to_owned(),
                id: created.hostname,
                state: MachineState::Running,
            }),
            Err(e) if e.may_have_acted() => {
                // The daemon may have launched the VM although its answer never came: find it
                // by its name tag rather than leak it (and never launch a second one).
                match self.find_by_name(g, group, name).await {
                    Ok(Some(m)) => {
                        tracing::info!(%name, hostname = %m.id, error = %e, "the create's answer was lost; found its VM by tag");
                        Ok(m)
                    }
                    Ok(None) => Err(self.create_error(&e)),
                    Err(lookup) => {
                        tracing::warn!(%name, error = %lookup, "cannot look for the VM of a create whose answer was lost; a later listing will find it");
                        Err(self.create_error(&e))
                    }
                }
            }
            Err(e) => Err(self.create_error(&e)),
        }
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let g = self.group(&machine.group)?;
        self.own_node(machine).await?;
        self.api.delete_node(&g.host_group, &machine.id).await
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        use std::sync::atomic::Ordering;
        if self.tags_fixed.load(Ordering::Relaxed) {
            return Ok(());
        }
        let node = self.own_node(machine).await?;
        if node.tag(TAG_DELETING).is_some() {
            return Ok(());
        }
        match self.api.add_tags(&machine.id, &[MARK_DELETING]).await {
            Ok(tags) if tags.iter().any(|t| t == MARK_DELETING) => Ok(()),
            Ok(tags) => Err(Error::Other(format!(
                "the Slicer daemon did not keep the tag {MARK_DELETING} on VM {} (its tags: {})",
                machine.id,
                tags.join(", ")
            ))),
            Err(e) if e.status() == Some(404) => {
                // Gone since the listing, or a daemon without the route: look again.
                self.own_node(machine).await?;
                if !self.tags_fixed.swap(true, Ordering::Relaxed) {
                    tracing::info!(
                        "this Slicer daemon cannot change a VM's tags (PATCH /vm/{{hostname}}/tags answers 404; \
                         daemons of slicervm/sdk v0.0.66 and later can): deletes are not recorded on it, and one \
                         accepted but not yet sent when Flotilla stops is forgotten"
                    );
                }
                Ok(())
            }
            Err(e) => Err(self.api.classify(&e)),
        }
    }

    /// Warm pools: persistent VMs are stopped (`shutdown`) and relaunched.
    fn can_stop(&self) -> bool {
        true
    }

    /// Stops the VM and waits until the daemon lists it `Stopped` (so its Node can go). One that
    /// never gets there (a host group whose hypervisor reboots instead) is an error, and the
    /// core deletes it as cluster-autoscaler asked.
    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        let node = self.own_node(machine).await?;
        if is_stopped(&node) {
            return Ok(());
        }
        if let Err(e) = self.api.shutdown(&machine.id).await {
            if e.status() == Some(404) {
                // Gone since the listing (NotFound), or a daemon without the route.
                self.own_node(machine).await?;
                return Err(Error::Other(format!(
                    "this Slicer daemon cannot stop VM {} (POST /vm/{}/shutdown answers 404: {e})",
                    machine.id, machine.id
                )));
            }
            return Err(self.api.classify(&e));
        }
        let deadline = tokio::time::Instant::now() + STOP_WAIT;
        loop {
            tokio::time::sleep(POLL).await;
            let node = self.own_node(machine).await?;
            if is_stopped(&node) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(Error::Other(format!(
                    "VM {} is still {} {STOP_WAIT:?} after POST /vm/{}/shutdown?action=reboot",
                    machine.id,
                    node.status.as_deref().unwrap_or("listed without a status"),
                    machine.id
                )));
            }
        }
    }

    /// Relaunches a stopped VM: it boots from its disk under the same hostname and tags, and
    /// its kubelet registers the Node again.
    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        let node = self.own_node(machine).await?;
        if !is_stopped(&node) {
            return Ok(self.running(machine));
        }
        let Err(e) = self.api.relaunch(&machine.id).await else { return Ok(self.running(machine)) };
        if e.may_have_acted() {
            // The daemon may have relaunched it although its answer never came.
            if !is_stopped(&self.own_node(machine).await?) {
                return Ok(self.running(machine));
            }
        } else if e.status() == Some(404) {
            self.own_node(machine).await?;
            return Err(Error::Other(format!(
                "this Slicer daemon cannot relaunch VM {} (POST /vm/{}/relaunch answers 404; daemons of \
                 slicervm/sdk v0.0.35 and later can): {e}",
                machine.id, machine.id
            )));
        }
        Err(self.api.classify(&e))
    }

    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let g = self.group(group)?;
        let host_groups = self.api.host_groups().await.map_err(|e| self.api.classify(&e))?;
        let Some(hg) = host_groups.iter().find(|h| h.name == g.host_group) else {
            return Err(missing_host_group(&g.host_group, &host_groups));
        };
        let cpus = g.cpus.unwrap_or(hg.cpus);
        let ram = g.ram_bytes.unwrap_or(hg.ram_bytes);
        let gpus = g.gpu_count.unwrap_or(hg.gpu_count);
        Ok(Some(Shape {
            cpu_millis: (cpus > 0).then_some(u64::from(cpus) * 1000),
            memory_bytes: (ram > 0).then_some(ram),
            ephemeral_storage_bytes: None,
            gpus: (gpus > 0).then_some(u64::from(gpus)),
            instance_type: Some(g.host_group.clone()),
            arch: kube_arch(&hg.arch),
        }))
    }

    async fn check(&self) -> Result<()> {
        let host_groups = self.api.host_groups().await.map_err(|e| self.api.classify(&e))?;
        for g in self.groups.values() {
            if !host_groups.iter().any(|h| h.name == g.host_group) {
                return Err(missing_host_group(&g.host_group, &host_groups));
            }
        }
        Ok(())
    }
}

/// A VM the daemon lists as stopped (a persistent VM after `shutdown`; daemons of SDK v0.0.19's
/// time send no status and have no stopped VMs).
fn is_stopped(node: &api::Node) -> bool {
    node.status.as_deref().is_some_and(|s| s.eq_ignore_ascii_case("stopped"))
}

fn missing_host_group(name: &str, host_groups: &[api::HostGroup]) -> Error {
    let have: Vec<&str> = host_groups.iter().map(|h| h.name.as_str()).collect();
    Error::InvalidRequest(format!("the Slicer daemon has no host group {name:?} (it has: {})", have.join(", ")))
}

/// The Kubernetes architecture of a host group's (`uname -m` style) arch.
fn kube_arch(arch: &str) -> Option<String> {
    match arch {
        "" => None,
        "x86_64" | "amd64" => Some("amd64".into()),
        "aarch64" | "arm64" => Some("arm64".into()),
        other => Some(other.to_owned()),
    }
}
