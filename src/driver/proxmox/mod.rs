//! Proxmox VE: machines are QEMU VMs cloned from a template VM, configured with cloud-init,
//! started, and (optionally) joined to the cluster through the QEMU guest agent.
//!
//! # Ownership
//! A VM is Flotilla's when it carries the tags `flotilla-c-<cluster>` and `flotilla-g-<group>`
//! (set in the first config call after the clone, together with `ipconfig0`). The clone call
//! itself cannot set tags, so it sets the VM's name (the machine name) and a description
//! marker `flotilla cluster=<c> group=<g>`; a VM whose create was interrupted between the
//! clone and the config call is recognised by its name prefix and that marker.
//!
//! # Listing (one Refresh)
//! One `GET /cluster/resources?type=vm`, plus one `GET .../config` for each *untagged* VM whose
//! name starts with a group's name prefix, not being created by this process, and not read
//! before (answers are cached by VMID and name): normally zero calls.
//!
//! # Deletes that outlive a restart
//! `mark_deleting` adds the tag `flotilla-deleting` (one `/cluster/resources` read, one
//! `PUT .../config`) before the delete stops and destroys the VM; `list` reports a VM so tagged
//! as Deleting, and a restarted Flotilla destroys it. PVE refuses config changes to a locked VM
//! (a clone in progress): such a VM is deleted unmarked.
//!
//! # States reported
//! * tagged `flotilla-deleting` → Deleting.
//! * tagged and `running` → Running (the core keeps it Creating while `create` runs).
//! * tagged or marked, not running, not being created by this process → Failed: a create that
//!   was interrupted (Flotilla crashed or restarted mid-create) or a VM someone stopped.
//!   cluster-autoscaler then deletes it, which cleans it up.
//!
//! # Create
//! Node: the configured node with the most free memory (`/cluster/resources`), counting memory
//! of creates in flight. VMID: the lowest free one in `vmid_range`, or `/cluster/nextid`; a
//! clone that loses a race for it ("already exists") is retried with another. Then clone (full
//! or linked), config (name, cores, memory, tags, cloud-init, optional user-data snippet),
//! start, each task awaited; then, with `join_command`, wait for `systemctl
//! is-system-running` = `running` through the guest agent and run the join command. On any
//! error the half-created VM is destroyed.
//!
//! # IP pool
//! Addresses in use are read back from the `ipconfig0` of this cluster's VMs (one config read
//! per VM not seen before; cached by VMID and name), plus in-process reservations of creates
//! in flight, which are kept until a read-back started after the create finished. The pool
//! must be dedicated to Flotilla: VMs outside this cluster are not read.

use std::{
    collections::{HashMap, HashSet},
    net::Ipv4Addr,
    path::PathBuf,
    sync::Mutex,
    time::Duration,
};

use async_trait::async_trait;
use serde_json::Value;
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::script::{self, Context, Keys, Template};
use super::{CreateFailure, Driver, Error, ErrorClass, Machine, MachineRef, MachineState, Result, Shape, http};
use crate::config::{Problems, Section};

pub mod api;
pub mod ippool;

use api::{Api, Auth};
use ippool::IpPool;

const TAG_CLUSTER: &str = "flotilla-c-";
const TAG_GROUP: &str = "flotilla-g-";
/// Set on a VM Flotilla is deleting, so the delete outlives a restart (see the module docs).
const TAG_DELETING: &str = "flotilla-deleting";
/// Set on a VM stopped into a warm pool (after the stop; removed before a start), so a VM
/// stopped by a crash or by hand is never mistaken for a pool machine.
const TAG_STOPPED: &str = "flotilla-stopped";
/// Attempts at a VMID before giving up (each loses only to a concurrent create).
const VMID_ATTEMPTS: usize = 5;
/// Where a group's templates are configured (rendered by [`script`], with [`template_context`]).
const USER_DATA: Keys = Keys { what: "user data", inline: "user_data", file: None };
const JOIN_COMMAND: Keys = Keys { what: "join command", inline: "join_command", file: None };

/// Keys of `[clouds.NAME]`.
#[derive(Clone, Debug)]
pub struct CloudSettings {
    /// `https://pve.example:8006` (the `/api2/json` suffix is added).
    pub url: String,
    pub auth: Auth,
    pub trust: http::Trust,
    /// `http://` to a host that is not loopback: an explicit opt-in.
    pub allow_plain_http: bool,
    /// Nodes VMs may be placed on; empty: every online node.
    pub nodes: Vec<String>,
    pub vmid_range: Option<(u32, u32)>,
    pub task_timeout: Duration,
    pub poll_interval: Duration,
    /// With it, delete shuts the guest down (forcing it off after this long); without, stops it.
    pub shutdown_timeout: Option<Duration>,
}

/// Keys of `[groups.G.machine]`.
#[derive(Clone, Debug, Default)]
pub struct GroupSettings {
    pub template: u32,
    pub full_clone: bool,
    pub storage: Option<String>,
    pub pool: Option<String>,
    pub nodes: Vec<String>,
    pub cores: Option<u32>,
    pub memory_mib: Option<u64>,
    pub ci_user: Option<String>,
    pub ssh_keys: Vec<String>,
    /// `None`: DHCP.
    pub ip_pool: Option<IpPool>,
    pub nameservers: Vec<String>,
    pub search_domain: Option<String>,
    /// Template of the cloud-init user-data, written to `snippets_dir` and referenced as
    /// `<snippets_storage>:snippets/<file>` (PVE's API cannot upload snippets).
    pub user_data: Option<Template>,
    pub snippets_dir: Option<PathBuf>,
    pub snippets_storage: Option<String>,
    /// Template of the shell command that joins the node, run through the agent.
    pub join_command: Option<Template>,
    pub agent_timeout: Duration,
}

fn is_tag_safe(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.'))
}

impl CloudSettings {
    pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> Option<CloudSettings> {
        let url = s.required_string("url", p);
        let allow_plain_http = s.boolean("allow_plain_http", p).unwrap_or(false);
        if let Some(u) = &url
            && let Err(e) = http::check_url(u, allow_plain_http)
        {
            let hint =
                if matches!(e, http::UrlError::PlainHttp { .. }) { " (allow_plain_http = true opts in)" } else { "" };
            p.push(s.key_path("url"), format!("{e}{hint}"));
        }
        let token_mode = s.contains("token_id") || s.contains("token_secret");
        let password_mode = s.contains("username") || s.contains("password");
        let auth = if token_mode == password_mode {
            p.push(s.path().to_owned(), "set either token_id and token_secret, or username and password");
            for key in ["token_id", "token_secret", "username", "password"] {
                s.ignore(key);
            }
            None
        } else if token_mode {
            let id = s.required_string("token_id", p);
            if id.as_ref().is_some_and(|id| !id.contains('@') || !id.contains('!')) {
                p.push(s.key_path("token_id"), "must look like USER@REALM!TOKENID");
            }
            let secret = if s.contains("token_secret") {
                s.secret("token_secret", p)
            } else {
                p.push(s.key_path("token_secret"), "is required with token_id");
                None
            };
            id.zip(secret).map(|(id, secret)| Auth::Token { id, secret })
        } else {
            let user = s.required_string("username", p);
            if user.as_ref().is_some_and(|u| !u.contains('@')) {
                p.push(s.key_path("username"), "must look like USER@REALM");
            }
            let password = if s.contains("password") {
                s.secret("password", p)
            } else {
                p.push(s.key_path("password"), "is required with username");
                None
            };
            user.zip(password).map(|(user, password)| Auth::Password { user, password })
        };
        let ca_file = s.string("ca_file", p);
        let fingerprint = s.string("tls_fingerprint", p);
        let trust = match (ca_file, fingerprint) {
            (Some(_), Some(_)) => {
                p.push(s.key_path("tls_fingerprint"), "set at most one of ca_file and tls_fingerprint");
                None
            }
            (Some(file), None) => match std::fs::read(p.resolve(&file)) {
                Ok(pem) => Some(http::Trust::CaPem(pem)),
                Err(e) => {
                    p.push(s.key_path("ca_file"), format!("cannot read {file}: {e}"));
                    None
                }
            },
            (None, Some(fp)) => match http::tls::parse_fingerprint(&fp) {
                Some(pin) => Some(http::Trust::Fingerprint(pin)),
                None => {
                    p.push(s.key_path("tls_fingerprint"), "must be a SHA-256 fingerprint (64 hex digits, ':' allowed)");
                    None
                }
            },
            (None, None) => Some(http::Trust::PublicRoots),
        };
        let nodes = s.string_list("nodes", p);
        let vmid_min: Option<u32> = s.integer("vmid_min", p);
        let vmid_max: Option<u32> = s.integer("vmid_max", p);
        let vmid_range = match (vmid_min, vmid_max) {
            (Some(a), Some(b)) if a >= 100 && a <= b => Some((a, b)),
            (None, None) => None,
            _ => {
                p.push(s.key_path("vmid_min"), "vmid_min and vmid_max go together, with 100 <= vmid_min <= vmid_max");
                None
            }
        };
        let task_timeout = s.duration("task_timeout", p).unwrap_or(Duration::from_secs(600));
        let poll_interval = s.duration("poll_interval", p).unwrap_or(Duration::from_secs(1));
        let shutdown_timeout = s.duration("shutdown_timeout", p);
        Some(CloudSettings {
            url: url?,
            auth: auth?,
            trust: trust?,
            allow_plain_http,
            nodes,
            vmid_range,
            task_timeout,
            poll_interval,
            shutdown_timeout,
        })
    }
}

impl GroupSettings {
    pub fn parse(cluster: &str, group: &str, s: &mut Section<'_>, p: &mut Problems) -> Option<GroupSettings> {
        if !is_tag_safe(group) {
            p.push(s.path().to_owned(), "the proxmox driver needs group names of lower-case letters, digits, '-', '_', '.' (they become VM tags)");
        }
        let template: Option<u32> = s.integer("template", p);
        if template.is_none() && !s.contains("template") {
            p.push(s.key_path("template"), "is required (the VMID of the template VM)");
        }
        let full_clone = s.boolean("full_clone", p).unwrap_or(true);
        let storage = s.string("storage", p);
        if storage.is_some() && !full_clone {
            p.push(s.key_path("storage"), "only applies to full clones (full_clone = true)");
        }
        let pool = s.string("pool", p);
        let nodes = s.string_list("nodes", p);
        let cores = s.integer("cores", p);
        let memory_mib = s.bytes("memory", p).map(|b| b / (1 << 20));
        let ci_user = s.string("ci_user", p);
        let ssh_keys = s.string_list("ssh_keys", p);
        let ip_range = s.string("ip_pool", p);
        let prefix_len: Option<u8> = s.integer("prefix_len", p);
        let gateway = s.string("gateway", p);
        let gateway = gateway.and_then(|g| match g.parse::<Ipv4Addr>() {
            Ok(ip) => Some(ip),
            Err(_) => {
                p.push(s.key_path("gateway"), format!("{g:?} is not an IPv4 address"));
                None
            }
        });
        let ip_pool = match ip_range {
            None => {
                if prefix_len.is_some() || gateway.is_some() {
                    p.push(
                        s.key_path("ip_pool"),
                        "prefix_len and gateway need an ip_pool (without it the VM uses DHCP)",
                    );
                }
                None
            }
            Some(range) => match ippool::parse_range(&range) {
                Ok((first, last)) => match prefix_len {
                    Some(len @ 1..=32) => Some(IpPool { first, last, prefix_len: len, gateway }),
                    _ => {
                        p.push(s.key_path("prefix_len"), "is required with ip_pool, between 1 and 32");
                        None
                    }
                },
                Err(e) => {
                    p.push(s.key_path("ip_pool"), e);
                    None
                }
            },
        };
        let nameservers = s.string_list("nameservers", p);
        let search_domain = s.string("search_domain", p);
        let user_data = Template::read(s, &USER_DATA, p);
        let snippets_dir = s.string("snippets_dir", p).map(|d| p.resolve(&d));
        let snippets_storage = s.string("snippets_storage", p);
        if user_data.is_some() != (snippets_dir.is_some() && snippets_storage.is_some()) {
            p.push(s.key_path("user_data"), "user_data, snippets_dir and snippets_storage go together");
        }
        let join_command = Template::read(s, &JOIN_COMMAND, p);
        // A trial render catches syntax errors and misspelt variables before any VM is made
        // with a broken snippet or join command.
        let name = format!("{cluster}-{group}-check");
        let trial = template_context(
            script::Target { cluster, group, name: &name },
            100,
            nodes.first().map_or("pve", String::as_str),
            ip_pool.as_ref().map(|pool| pool.first),
        );
        for template in [&user_data, &join_command].into_iter().flatten() {
            template.check(&trial, p);
        }
        let agent_timeout = s.duration("agent_timeout", p).unwrap_or(Duration::from_secs(600));
        Some(GroupSettings {
            template: template?,
            full_clone,
            storage,
            pool,
            nodes,
            cores,
            memory_mib,
            ci_user,
            ssh_keys,
            ip_pool,
            nameservers,
            search_domain,
            user_data,
            snippets_dir,
            snippets_storage,
            join_command,
            agent_timeout,
        })
    }
}

/// The variables of `user_data` and `join_command`: `vmid`, `node`, `ip` (empty with DHCP), and
/// what every template sees ([`script::Context`]; Proxmox groups have no `template_data`).
fn template_context(target: script::Target<'_>, vmid: u32, node: &str, ip: Option<Ipv4Addr>) -> Context {
    Context::new(target, &serde_json::Map::new())
        .with("vmid", vmid.to_string())
        .with("node", node)
        .with("ip", ip.map(|i| i.to_string()).unwrap_or_default())
}

/// One VM of `/cluster/resources`.
#[derive(Clone, Debug)]
struct Vm {
    vmid: u32,
    node: String,
    name: String,
    status: String,
    template: bool,
    tags: Vec<String>,
    maxcpu: Option<u64>,
    maxmem: Option<u64>,
}

impl Vm {
    fn from_json(v: &Value) -> Option<Vm> {
        if v.get("type")?.as_str()? != "qemu" {
            return None;
        }
        Some(Vm {
            vmid: u32::try_from(v.get("vmid")?.as_u64()?).ok()?,
            node: v.get("node")?.as_str()?.to_owned(),
            name: v.get("name").and_then(Value::as_str).unwrap_or("").to_owned(),
            status: v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_owned(),
            template: v.get("template").and_then(Value::as_u64) == Some(1),
            tags: v
                .get("tags")
                .and_then(Value::as_str)
                .unwrap_or("")
                .split([';', ',', ' '])
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
            maxcpu: v.get("maxcpu").and_then(Value::as_u64),
            maxmem: v.get("maxmem").and_then(Value::as_u64),
        })
    }
}

/// In-process bookkeeping of creates in flight. Written by `create` (reserve, release) and by
/// the IP read-back (prune); read by `create` and `list`.
#[derive(Debug, Default)]
struct Reservations {
    /// Machine names being created by this process.
    names: HashSet<String>,
    vmids: HashSet<u32>,
    /// address -> when the create holding it finished (`None`: still running).
    ips: HashMap<Ipv4Addr, Option<Instant>>,
    /// node -> memory (bytes) of creates in flight placed there.
    node_memory: HashMap<String, u64>,
}

#[derive(Debug, Default)]
struct Caches {
    /// (vmid, name) -> static address in the VM's `ipconfig0`.
    ips: HashMap<(u32, String), Option<Ipv4Addr>>,
    /// (vmid, name) -> group named by the description marker of an untagged VM, if any.
    markers: HashMap<(u32, String), Option<String>>,
    /// (template vmid, node) -> the storages of the template's volumes (`None`: a device path).
    template_volumes: HashMap<(u32, String), Vec<Option<String>>>,
}

/// What `/cluster/resources` says about storages: `shared`, content, and the nodes each one is
/// enabled on (one entry per node). Empty when the token may not see storages
/// (`Datastore.Audit`).
#[derive(Debug, Default)]
struct Storages {
    /// storage -> (shared, holds VM images)
    kinds: HashMap<String, (bool, bool)>,
    /// (node, storage) pairs present.
    on: HashSet<(String, String)>,
}

impl Storages {
    fn from_resources(resources: &[Value]) -> Storages {
        let mut out = Storages::default();
        for r in resources.iter().filter(|v| v.get("type").and_then(Value::as_str) == Some("storage")) {
            let (Some(id), Some(node)) =
                (r.get("storage").and_then(Value::as_str), r.get("node").and_then(Value::as_str))
            else {
                continue;
            };
            let shared = r.get("shared").and_then(Value::as_u64) == Some(1);
            let images = r.get("content").and_then(Value::as_str).unwrap_or("").split(',').any(|c| c == "images");
            out.kinds.insert(id.to_owned(), (shared, images));
            out.on.insert((node.to_owned(), id.to_owned()));
        }
        out
    }

    fn shared(&self, id: &str) -> bool {
        self.kinds.get(id).is_some_and(|(shared, _)| *shared)
    }
}

/// Where clones of one template may go, as PVE's `clone_vm` decides it: another node than the
/// template's only when every volume of the template is on shared storage and the target
/// storage (if any) is shared and enabled there.
#[derive(Debug)]
struct Placement {
    template: u32,
    template_node: String,
    /// Why clones must stay on the template's node; `None`: any node with the storage.
    local_only: Option<String>,
    /// The target storage, which must be enabled on the chosen node.
    storage: Option<String>,
}

impl Placement {
    fn allows(&self, node: &str, storages: &Storages) -> bool {
        node == self.template_node
            || (self.local_only.is_none()
                && self.storage.as_ref().is_none_or(|st| storages.on.contains(&(node.to_owned(), st.clone()))))
    }

    /// Why no node in `nodes` can take a clone.
    fn refusal(&self, nodes: &[&str]) -> String {
        format!(
            "template {} is on {} and {}, so clones can only go to {}, which is not among the allowed nodes ({})",
            self.template,
            self.template_node,
            self.local_only.as_deref().unwrap_or("the target storage is not on the other nodes"),
            self.template_node,
            nodes.join(", ")
        )
    }
}

/// The storages of a VM's volumes, from its config (`scsi0: ceph:base-9000-disk-0,size=8G`);
/// `None` for a device path. Empty drives (`none`, `cdrom`) are skipped, as PVE does.
fn volume_storages(config: &Value) -> Vec<Option<String>> {
    let Some(map) = config.as_object() else { return Vec::new() };
    let is_volume = |key: &str| {
        let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
        (bus.len() < key.len() && ["ide", "sata", "scsi", "virtio"].contains(&bus))
            || key == "efidisk0"
            || key == "tpmstate0"
    };
    map.iter()
        .filter(|(k, _)| is_volume(k))
        .filter_map(|(_, v)| {
            let file = v.as_str()?.split(',').next()?;
            let file = file.strip_prefix("file=").unwrap_or(file);
            match file {
                "" | "none" | "cdrom" => None,
                f if f.starts_with('/') => Some(None),
                f => Some(f.split_once(':').map(|(st, _)| st.to_owned())),
            }
        })
        .collect()
}

#[derive(Debug)]
pub struct Proxmox {
    cluster: String,
    api: Api,
    cloud: CloudSettings,
    groups: HashMap<String, GroupSettings>,
    /// Group -> machine name prefix (`<prefix>-`), to spot VMs left before tagging.
    name_prefixes: Vec<(String, String)>,
    reservations: Mutex<Reservations>,
    caches: Mutex<Caches>,
    /// Groups with a warm pool: their VMs tagged `flotilla-stopped` and stopped are listed as
    /// Stopped.
    pool_groups: std::collections::HashSet<String>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Releases a create's reservations however it ends.
struct CreateGuard<'a> {
    driver: &'a Proxmox,
    name: String,
    vmid: Option<u32>,
    ip: Option<Ipv4Addr>,
    node_memory: Option<(String, u64)>,
    succeeded: bool,
}

impl Drop for CreateGuard<'_> {
    fn drop(&mut self) {
        let mut r = lock(&self.driver.reservations);
        r.names.remove(&self.name);
        if let Some(vmid) = self.vmid {
            r.vmids.remove(&vmid);
        }
        if let Some((node, mem)) = &self.node_memory
            && let Some(m) = r.node_memory.get_mut(node)
        {
            *m = m.saturating_sub(*mem);
        }
        if let Some(ip) = self.ip {
            if self.succeeded {
                // The VM's ipconfig0 holds it now; keep the reservation until a read-back
                // that started after this moment has seen it.
                r.ips.insert(ip, Some(Instant::now()));
            } else {
                r.ips.remove(&ip);
            }
        }
    }
}

/// The Proxmox driver's [`Constructor`](super::Constructor).
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<super::SharedDriver> {
    let cloud = CloudSettings::parse(&mut setup.section, p);
    let mut groups = HashMap::new();
    let mut prefixes = Vec::new();
    for g in &mut setup.groups {
        if let Some(s) = GroupSettings::parse(setup.cluster, &g.config.name, &mut g.machine, p) {
            groups.insert(g.config.name.clone(), s);
        }
        prefixes.push((g.config.name.clone(), g.config.name_prefix.clone()));
    }
    match Proxmox::new(setup.cluster, cloud?, groups, prefixes) {
        Ok(mut d) => {
            d.pool_groups =
                setup.groups.iter().filter(|g| g.config.warm_pool > 0).map(|g| g.config.name.clone()).collect();
            Some(std::sync::Arc::new(d))
        }
        Err(e) => {
            p.push(setup.section.key_path("ca_file"), format!("cannot set up TLS: {e}"));
            None
        }
    }
}

impl Proxmox {
    pub fn new(
        cluster: &str,
        cloud: CloudSettings,
        groups: HashMap<String, GroupSettings>,
        name_prefixes: Vec<(String, String)>,
    ) -> Result<Proxmox, http::BuildError> {
        let settings = http::Settings::new(cloud.trust.clone())
            .timeout(Duration::from_secs(60))
            .connect_timeout(Duration::from_secs(10))
            .allow_plain_http(cloud.allow_plain_http)
            .classify(api::classify)
            .error_message(api::error_message);
        let http = http::Client::new(settings)?;
        let base = format!("{}/api2/json", cloud.url.trim_end_matches('/'));
        let api = Api::new(http, base, cloud.auth.clone(), cloud.poll_interval);
        Ok(Proxmox {
            cluster: cluster.to_owned(),
            api,
            cloud,
            groups,
            name_prefixes,
            reservations: Mutex::new(Reservations::default()),
            caches: Mutex::new(Caches::default()),
            pool_groups: Default::default(),
        })
    }

    fn cluster_tag(&self) -> String {
        format!("{TAG_CLUSTER}{}", self.cluster)
    }

    fn marker(&self, group: &str) -> String {
        format!("flotilla cluster={} group={group}", self.cluster)
    }

    fn group(&self, group: &str) -> Result<&GroupSettings> {
        self.groups.get(group).ok_or_else(|| Error::InvalidRequest(format!("group {group} is not on this cloud")))
    }

    /// The group a VM's tags mark it for, if it carries this cluster's tag.
    fn tagged_group(&self, vm: &Vm) -> Option<String> {
        let cluster = self.cluster_tag();
        if !vm.tags.contains(&cluster) {
            return None;
        }
        vm.tags.iter().find_map(|t| t.strip_prefix(TAG_GROUP)).map(str::to_owned)
    }

    async fn resources(&self, kind: Option<&str>) -> Result<Vec<Value>> {
        let query: Vec<(&str, String)> = kind.map(|k| vec![("type", k.to_owned())]).unwrap_or_default();
        let data = self.api.get("/cluster/resources", &query).await?;
        Ok(data.as_array().cloned().unwrap_or_default())
    }

    async fn config(&self, vm: &Vm) -> Result<Value> {
        Ok(self.api.get(&format!("/nodes/{}/qemu/{}/config", vm.node, vm.vmid), &[]).await?)
    }

    /// The group named by the description marker of an untagged VM that looks like one of ours.
    async fn marked_group(&self, vm: &Vm) -> Result<Option<String>> {
        let key = (vm.vmid, vm.name.clone());
        if let Some(known) = lock(&self.caches).markers.get(&key) {
            return Ok(known.clone());
        }
        let config = self.config(vm).await?;
        let description = config.get("description").and_then(Value::as_str).unwrap_or("");
        let prefix = format!("flotilla cluster={} group=", self.cluster);
        let group = description.lines().find_map(|l| l.trim().strip_prefix(&prefix)).map(|g| g.trim().to_owned());
        lock(&self.caches).markers.insert(key, group.clone());
        Ok(group)
    }

    /// The VM `machine` names, if it is still that machine: the VMID may have been reused since,
    /// so the name and the marks must match. `what` names the refused action.
    async fn own_vm(&self, machine: &MachineRef, what: &str) -> Result<Vm> {
        let vmid: u32 = machine.id.parse().map_err(|_| Error::NotFound(format!("{} is not a VMID", machine.id)))?;
        let vms: Vec<Vm> = self.resources(Some("vm")).await?.iter().filter_map(Vm::from_json).collect();
        let Some(vm) = vms.into_iter().find(|v| v.vmid == vmid) else {
            return Err(Error::NotFound(format!("proxmox VM {vmid}")));
        };
        let group = match self.tagged_group(&vm) {
            Some(g) => Some(g),
            None if self.looks_like_ours(&vm) => self.marked_group(&vm).await?,
            None => None,
        };
        if vm.template || vm.name != machine.name || group.as_deref() != Some(machine.group.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "proxmox VM {vmid} ({}) is not {} of group {}; refusing to {what} it",
                vm.name, machine.name, machine.group
            )));
        }
        Ok(vm)
    }

    fn looks_like_ours(&self, vm: &Vm) -> bool {
        self.name_prefixes.iter().any(|(_, prefix)| vm.name.starts_with(&format!("{prefix}-")))
    }

    /// Machines in one listing, with the group each belongs to.
    async fn owned(&self, vms: &[Vm]) -> Result<Vec<(Vm, String)>> {
        let in_flight = lock(&self.reservations).names.clone();
        let mut out = Vec::new();
        for vm in vms.iter().filter(|v| !v.template) {
            if let Some(group) = self.tagged_group(vm) {
                out.push((vm.clone(), group));
            } else if self.looks_like_ours(vm)
                && !in_flight.contains(&vm.name)
                && let Some(group) = self.marked_group(vm).await?
            {
                out.push((vm.clone(), group));
            }
        }
        Ok(out)
    }

    /// Addresses in use: read back from this cluster's VMs, plus reservations.
    async fn used_addresses(&self, vms: &[Vm], started: Instant) -> Result<HashSet<Ipv4Addr>> {
        let cluster = self.cluster_tag();
        let ours: Vec<&Vm> = vms.iter().filter(|v| v.tags.contains(&cluster)).collect();
        let mut used = HashSet::new();
        for vm in &ours {
            let key = (vm.vmid, vm.name.clone());
            let cached = lock(&self.caches).ips.get(&key).copied();
            let ip = match cached {
                Some(ip) => ip,
                None => {
                    let config = match self.config(vm).await {
                        Ok(c) => c,
                        // Deleted between the listing and now: its address is free.
                        Err(Error::NotFound(_)) => continue,
                        Err(e) => return Err(e),
                    };
                    let ip = config.get("ipconfig0").and_then(Value::as_str).and_then(ippool::ipconfig_address);
                    lock(&self.caches).ips.insert(key, ip);
                    ip
                }
            };
            used.extend(ip);
        }
        let present: HashSet<(u32, String)> = ours.iter().map(|v| (v.vmid, v.name.clone())).collect();
        lock(&self.caches).ips.retain(|k, _| present.contains(k));
        let mut r = lock(&self.reservations);
        // A finished create's VM was in PVE before this read-back started: it is covered.
        r.ips.retain(|_, done| done.is_none_or(|at| at >= started));
        used.extend(r.ips.keys().copied());
        Ok(used)
    }

    /// The storages of the template's volumes (read once per template and node).
    async fn template_volumes(&self, template: &Vm) -> Result<Vec<Option<String>>> {
        let key = (template.vmid, template.node.clone());
        if let Some(known) = lock(&self.caches).template_volumes.get(&key) {
            return Ok(known.clone());
        }
        let volumes = volume_storages(&self.config(template).await?);
        lock(&self.caches).template_volumes.insert(key, volumes.clone());
        Ok(volumes)
    }

    /// Where clones of `template` may go. Reads the template's config only when a node other
    /// than the template's could be chosen.
    async fn placement(
        &self,
        settings: &GroupSettings,
        template: &Vm,
        storages: &Storages,
        candidates: &[&str],
    ) -> Result<Placement> {
        let storage = settings.storage.clone();
        let visible = !storages.kinds.is_empty();
        if let Some(st) = &storage
            && visible
        {
            // PVE checks the target storage on the template's node first, whatever the target.
            if !storages.on.contains(&(template.node.clone(), st.clone())) {
                return Err(Error::InvalidRequest(format!(
                    "storage '{st}' is not available on node '{}', where template {} is",
                    template.node, template.vmid
                )));
            }
            if storages.kinds.get(st).is_some_and(|(_, images)| !images) {
                return Err(Error::InvalidRequest(format!("storage '{st}' does not hold VM images")));
            }
        }
        let mut placement =
            Placement { template: template.vmid, template_node: template.node.clone(), local_only: None, storage };
        if candidates.iter().all(|n| *n == template.node) {
            return Ok(placement);
        }
        if !visible {
            placement.local_only = Some(
                "the storage configuration is not visible to these credentials (Datastore.Audit on /storage)".into(),
            );
            return Ok(placement);
        }
        if let Some(st) = placement.storage.as_ref().filter(|st| !storages.shared(st)) {
            // Settled without reading the template.
            placement.local_only = Some(format!("the target storage '{st}' is not shared"));
            return Ok(placement);
        }
        let volumes = self.template_volumes(template).await?;
        placement.local_only = match volumes.iter().find(|v| v.as_deref().is_none_or(|st| !storages.shared(st))) {
            Some(Some(st)) => Some(format!("its volumes are on local storage '{st}'")),
            Some(None) => Some("it has a volume on a device path".to_owned()),
            None => None,
        };
        Ok(placement)
    }

    /// The allowed, online node with the most free memory that a clone can go to.
    async fn choose_node(
        &self,
        settings: &GroupSettings,
        template: &Vm,
        resources: &[Value],
        memory: u64,
    ) -> Result<String> {
        let allowed = if settings.nodes.is_empty() { &self.cloud.nodes } else { &settings.nodes };
        let nodes: Vec<&Value> =
            resources.iter().filter(|v| v.get("type").and_then(Value::as_str) == Some("node")).collect();
        let name = |n: &Value| n.get("node").and_then(Value::as_str).map(str::to_owned);
        let candidates: Vec<String> = nodes
            .iter()
            .filter(|n| n.get("status").and_then(Value::as_str) == Some("online"))
            .filter_map(|n| name(n))
            .filter(|n| allowed.is_empty() || allowed.contains(n))
            .collect();
        if candidates.is_empty() {
            return Err(Error::Unavailable(format!(
                "no online proxmox node among {}",
                if allowed.is_empty() { "the cluster".to_owned() } else { allowed.join(", ") }
            )));
        }
        let storages = Storages::from_resources(resources);
        let names: Vec<&str> = candidates.iter().map(String::as_str).collect();
        let placement = self.placement(settings, template, &storages, &names).await?;
        let eligible: Vec<&str> = names.iter().copied().filter(|n| placement.allows(n, &storages)).collect();
        if eligible.is_empty() {
            let permitted = allowed.is_empty() || allowed.contains(&placement.template_node);
            return Err(if permitted {
                Error::Unavailable(format!(
                    "node {} is offline, and clones of template {} can only go there: {}",
                    placement.template_node,
                    placement.template,
                    placement.local_only.as_deref().unwrap_or("the target storage is only there")
                ))
            } else {
                Error::InvalidRequest(placement.refusal(&names))
            });
        }
        let pending = lock(&self.reservations).node_memory.clone();
        let mut best: Option<(u64, String)> = None;
        for n in nodes.iter().filter(|n| name(n).is_some_and(|x| eligible.contains(&x.as_str()))) {
            let node = name(n).unwrap_or_default();
            let max = n.get("maxmem").and_then(Value::as_u64).unwrap_or(0);
            let used = n.get("mem").and_then(Value::as_u64).unwrap_or(0) + pending.get(&node).copied().unwrap_or(0);
            let free = max.saturating_sub(used);
            if free >= memory && best.as_ref().is_none_or(|(f, _)| free > *f) {
                best = Some((free, node));
            }
        }
        best.map(|(_, node)| node).ok_or_else(|| {
            Error::OutOfResources(format!(
                "no proxmox node that can take a clone of template {} ({}) has {} MiB of memory free",
                template.vmid,
                eligible.join(", "),
                memory >> 20
            ))
        })
    }

    /// Whether each group's template and placement settings can work on this cluster.
    async fn check_groups(&self) -> Result<()> {
        let resources = self.resources(None).await?;
        let vms: Vec<Vm> = resources.iter().filter_map(Vm::from_json).collect();
        let storages = Storages::from_resources(&resources);
        let cluster_nodes: Vec<String> = resources
            .iter()
            .filter(|v| v.get("type").and_then(Value::as_str) == Some("node"))
            .filter_map(|n| n.get("node").and_then(Value::as_str).map(str::to_owned))
            .collect();
        let mut problems = Vec::new();
        let mut groups: Vec<(&String, &GroupSettings)> = self.groups.iter().collect();
        groups.sort_by_key(|(g, _)| *g);
        for (group, settings) in groups {
            let allowed = if settings.nodes.is_empty() { &self.cloud.nodes } else { &settings.nodes };
            let unknown: Vec<&String> = allowed.iter().filter(|n| !cluster_nodes.contains(n)).collect();
            if !unknown.is_empty() {
                problems.push(format!("group {group}: no such node {unknown:?}"));
            }
            let Some(template) = vms.iter().find(|v| v.vmid == settings.template) else {
                problems.push(format!("group {group}: template VM {} not found", settings.template));
                continue;
            };
            if !template.template {
                problems.push(format!("group {group}: VM {} is not a template", settings.template));
            }
            let names: Vec<&str> = if allowed.is_empty() {
                cluster_nodes.iter().map(String::as_str).collect()
            } else {
                allowed.iter().map(String::as_str).collect()
            };
            match self.placement(settings, template, &storages, &names).await {
                Ok(p) if !names.iter().any(|n| p.allows(n, &storages)) => {
                    problems.push(format!("group {group}: {}", p.refusal(&names)))
                }
                Ok(_) => {}
                Err(e) => problems.push(format!("group {group}: {e}")),
            }
        }
        if problems.is_empty() { Ok(()) } else { Err(Error::InvalidRequest(problems.join("; "))) }
    }

    /// A VMID for the next clone attempt, reserved in-process.
    async fn allocate_vmid(&self, vms: &[Vm], taken: &HashSet<u32>) -> Result<u32> {
        let in_cloud: HashSet<u32> = vms.iter().map(|v| v.vmid).collect();
        let free =
            |r: &Reservations, id: u32| !in_cloud.contains(&id) && !taken.contains(&id) && !r.vmids.contains(&id);
        let from_api = match self.cloud.vmid_range {
            Some(_) => None,
            None => {
                let data = self.api.get("/cluster/nextid", &[]).await?;
                let id = data
                    .as_str()
                    .and_then(|s| s.parse().ok())
                    .or_else(|| data.as_u64().and_then(|n| u32::try_from(n).ok()));
                Some(id.ok_or_else(|| Error::Other(format!("/cluster/nextid answered {data}")))?)
            }
        };
        let mut r = lock(&self.reservations);
        let (low, high) = match (self.cloud.vmid_range, from_api) {
            (Some(range), _) => range,
            (None, Some(id)) => (id, 999_999_999),
            (None, None) => unreachable!("one of range and nextid is set"),
        };
        let id = (low..=high)
            .find(|&id| free(&r, id))
            .ok_or_else(|| Error::OutOfResources(format!("no free VMID in {low}..={high}")))?;
        r.vmids.insert(id);
        Ok(id)
    }

    fn snippet_file(name: &str) -> String {
        format!("flotilla-{name}.yaml")
    }

    /// Destroys a half-created VM; logs what it cannot undo (the VM keeps its marks and shows
    /// up in `list` as Failed).
    async fn cleanup(&self, node: &str, vmid: u32, name: &str, settings: &GroupSettings) {
        if let Err(e) = self.destroy(node, vmid, true).await
            && !matches!(e, Error::NotFound(_))
        {
            warn!(vmid, %name, error = %e, "cannot remove half-created proxmox VM; it stays marked and listed as failed");
        }
        if let Some(dir) = &settings.snippets_dir {
            let _ = std::fs::remove_file(dir.join(Self::snippet_file(name)));
        }
    }

    /// Shuts a VM down (with `shutdown_timeout`, then hard) or stops it hard, and waits.
    async fn power_off(&self, node: &str, vmid: u32) -> Result<()> {
        let base = format!("/nodes/{node}/qemu/{vmid}");
        let answer = match self.cloud.shutdown_timeout {
            Some(t) => {
                let form = [("forceStop", "1".to_owned()), ("timeout", t.as_secs().to_string())];
                self.api.post(&format!("{base}/status/shutdown"), &form).await
            }
            None => self.api.post(&format!("{base}/status/stop"), &[]).await,
        };
        match answer {
            Ok(upid) => self.api.wait_answer(&upid, self.cloud.task_timeout).await?,
            // Not running (any more): nothing to stop.
            Err(e) if e.message().contains("not running") => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Sets a VM's tags to its current ones plus `add`, minus `remove`.
    async fn retag(&self, vm: &Vm, add: Option<&str>, remove: Option<&str>) -> Result<()> {
        let mut tags: Vec<&str> = vm.tags.iter().map(String::as_str).filter(|t| Some(*t) != remove).collect();
        if let Some(a) = add.filter(|a| !tags.contains(a)) {
            tags.push(a);
        }
        self.api.put(&format!("/nodes/{}/qemu/{}/config", vm.node, vm.vmid), &[("tags", tags.join(";"))]).await?;
        Ok(())
    }

    /// Stops (or shuts down) and destroys a VM with purge.
    async fn destroy(&self, node: &str, vmid: u32, running: bool) -> Result<()> {
        let base = format!("/nodes/{node}/qemu/{vmid}");
        if running {
            self.power_off(node, vmid).await?;
        }
        let query = [("purge", "1".to_owned()), ("destroy-unreferenced-disks", "1".to_owned())];
        let upid = self.api.delete(&base, &query).await?;
        self.api.wait_answer(&upid, self.cloud.task_timeout).await?;
        Ok(())
    }

    /// Runs a command through the guest agent and waits for it: (exit code, stdout, stderr).
    async fn agent_exec(
        &self,
        node: &str,
        vmid: u32,
        command: &[&str],
        limit: Duration,
    ) -> Result<(i64, String, String)> {
        let base = format!("/nodes/{node}/qemu/{vmid}/agent");
        let form: Vec<(&str, String)> = command.iter().map(|c| ("command", (*c).to_owned())).collect();
        let answer = self.api.post(&format!("{base}/exec"), &form).await?;
        let pid = answer
            .get("pid")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::Other(format!("agent exec answered without a pid: {answer}")))?;
        let deadline = Instant::now() + limit;
        loop {
            let status = self.api.get(&format!("{base}/exec-status"), &[("pid", pid.to_string())]).await?;
            let exited = match status.get("exited") {
                Some(Value::Bool(b)) => *b,
                Some(v) => v.as_u64() == Some(1),
                None => false,
            };
            if exited {
                let text = |k: &str| status.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
                let code = status.get("exitcode").and_then(Value::as_i64).unwrap_or(-1);
                return Ok((code, text("out-data"), text("err-data")));
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!("agent command {command:?} still running after {limit:?}")));
            }
            tokio::time::sleep(self.api.poll_interval).await;
        }
    }

    /// Waits for the guest to report `running`, then runs the join command.
    async fn join(&self, node: &str, vmid: u32, settings: &GroupSettings, command: &str) -> Result<()> {
        let deadline = Instant::now() + settings.agent_timeout;
        let mut last;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.agent_exec(node, vmid, &["systemctl", "is-system-running"], left).await {
                Ok((_, out, _)) if out.trim() == "running" => break,
                Ok((_, out, _)) => last = format!("system is {}", out.trim()),
                // The agent is not up until the guest has booted: PVE answers 500.
                Err(Error::Other(m) | Error::Unavailable(m)) => last = m,
                Err(e) => return Err(e),
            }
            if Instant::now() >= deadline {
                return Err(Error::Timeout(format!(
                    "guest did not reach 'running' within {:?} ({last})",
                    settings.agent_timeout
                )));
            }
            tokio::time::sleep(self.api.poll_interval).await;
        }
        let left = deadline.saturating_duration_since(Instant::now()).max(self.api.poll_interval);
        let (code, _, err) = self.agent_exec(node, vmid, &["/bin/sh", "-c", command], left).await?;
        if code != 0 {
            return Err(Error::Other(format!("join command exited with {code}: {}", err.trim())));
        }
        Ok(())
    }

    async fn create_inner(
        &self,
        guard: &mut CreateGuard<'_>,
        group: &str,
        settings: &GroupSettings,
    ) -> Result<Machine> {
        let name = guard.name.clone();
        let resources = self.resources(None).await?;
        let vms: Vec<Vm> = resources.iter().filter_map(Vm::from_json).collect();
        let template = vms
            .iter()
            .find(|v| v.vmid == settings.template && v.template)
            .ok_or_else(|| Error::InvalidRequest(format!("template VM {} not found", settings.template)))?
            .clone();
        let memory = settings.memory_mib.map(|m| m << 20).or(template.maxmem).unwrap_or(0);
        let node = self.choose_node(settings, &template, &resources, memory).await?;
        *lock(&self.reservations).node_memory.entry(node.clone()).or_default() += memory;
        guard.node_memory = Some((node.clone(), memory));

        let ip = match &settings.ip_pool {
            Some(pool) => {
                let used = self.used_addresses(&vms, Instant::now()).await?;
                let mut r = lock(&self.reservations);
                let all: HashSet<Ipv4Addr> = used.union(&r.ips.keys().copied().collect()).copied().collect();
                let ip = pool.pick(&all).ok_or_else(|| {
                    Error::OutOfResources(format!(
                        "ip pool {}-{} is exhausted ({} addresses in use)",
                        pool.first,
                        pool.last,
                        pool.size()
                    ))
                })?;
                r.ips.insert(ip, None);
                guard.ip = Some(ip);
                Some(ip)
            }
            None => None,
        };

        // Clone, retrying when another create wins the VMID.
        let mut taken = HashSet::new();
        let mut attempt = 0;
        let (vmid, upid) = loop {
            attempt += 1;
            let vmid = self.allocate_vmid(&vms, &taken).await?;
            guard.vmid = Some(vmid);
            let mut form = vec![
                ("newid", vmid.to_string()),
                ("name", name.clone()),
                ("target", node.clone()),
                ("full", if settings.full_clone { "1" } else { "0" }.to_owned()),
                ("description", self.marker(group)),
            ];
            if let Some(storage) = &settings.storage {
                form.push(("storage", storage.clone()));
            }
            if let Some(pool) = &settings.pool {
                form.push(("pool", pool.clone()));
            }
            match self.api.post(&format!("/nodes/{}/qemu/{}/clone", template.node, template.vmid), &form).await {
                Ok(upid) => break (vmid, upid),
                Err(e) if e.is_vmid_taken() && attempt < VMID_ATTEMPTS => {
                    debug!(vmid, %name, "vmid taken by a concurrent create, retrying");
                    lock(&self.reservations).vmids.remove(&vmid);
                    guard.vmid = None;
                    taken.insert(vmid);
                }
                Err(e) => return Err(e.into()),
            }
        };
        if let Err(e) = self.api.wait_answer(&upid, self.cloud.task_timeout).await {
            self.cleanup(&node, vmid, &name, settings).await;
            return Err(e.into());
        }
        match self.configure_and_start(group, &name, &node, vmid, ip, settings).await {
            Ok(()) => {
                info!(%name, vmid, %node, ip = ?ip, "proxmox VM created");
                Ok(Machine { group: group.to_owned(), name, id: vmid.to_string(), state: MachineState::Running })
            }
            Err(e) => {
                self.cleanup(&node, vmid, &name, settings).await;
                Err(e)
            }
        }
    }

    async fn configure_and_start(
        &self,
        group: &str,
        name: &str,
        node: &str,
        vmid: u32,
        ip: Option<Ipv4Addr>,
        settings: &GroupSettings,
    ) -> Result<()> {
        let base = format!("/nodes/{node}/qemu/{vmid}");
        let vars = template_context(script::Target { cluster: &self.cluster, group, name }, vmid, node, ip);
        let render = |t: &Template| t.render(&vars).map_err(|e| Error::InvalidRequest(e.to_string()));

        let mut form: Vec<(&str, String)> = vec![
            ("tags", format!("{};{TAG_GROUP}{group}", self.cluster_tag())),
            ("agent", "1".to_owned()),
            (
                "ipconfig0",
                match (ip, &settings.ip_pool) {
                    (Some(ip), Some(pool)) => pool.ipconfig(ip),
                    _ => "ip=dhcp".to_owned(),
                },
            ),
        ];
        if let Some(cores) = settings.cores {
            form.push(("cores", cores.to_string()));
        }
        if let Some(mib) = settings.memory_mib {
            form.push(("memory", mib.to_string()));
        }
        if let Some(user) = &settings.ci_user {
            form.push(("ciuser", user.clone()));
        }
        if !settings.ssh_keys.is_empty() {
            // PVE wants the keys URL-encoded inside the (form-encoded) parameter, spaces as %20.
            let keys = settings.ssh_keys.join("\n");
            let encoded: String =
                form_urlencoded::byte_serialize(keys.as_bytes()).collect::<String>().replace('+', "%20");
            form.push(("sshkeys", encoded));
        }
        if !settings.nameservers.is_empty() {
            form.push(("nameserver", settings.nameservers.join(" ")));
        }
        if let Some(domain) = &settings.search_domain {
            form.push(("searchdomain", domain.clone()));
        }
        if let (Some(template), Some(dir), Some(storage)) =
            (&settings.user_data, &settings.snippets_dir, &settings.snippets_storage)
        {
            let text = render(template)?;
            let file = Self::snippet_file(name);
            tokio::fs::write(dir.join(&file), text).await.map_err(|e| {
                Error::Other(format!("cannot write user-data snippet {}: {e}", dir.join(&file).display()))
            })?;
            form.push(("cicustom", format!("user={storage}:snippets/{file}")));
        }
        self.api.put(&format!("{base}/config"), &form).await?;
        let upid = self.api.post(&format!("{base}/status/start"), &[]).await?;
        self.api.wait_answer(&upid, self.cloud.task_timeout).await?;
        if let Some(command) = &settings.join_command {
            let command = render(command)?;
            self.join(node, vmid, settings, &command).await?;
        }
        Ok(())
    }
}

#[async_trait]
impl Driver for Proxmox {
    fn kind(&self) -> &'static str {
        "proxmox"
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let data = self.api.list("/cluster/resources", &[("type", "vm".to_owned())]).await?;
        let vms: Vec<Vm> = data.as_array().into_iter().flatten().filter_map(Vm::from_json).collect();
        let in_flight = lock(&self.reservations).names.clone();
        let owned = self.owned(&vms).await?;
        Ok(owned
            .into_iter()
            .map(|(vm, group)| {
                let state = if in_flight.contains(&vm.name) {
                    MachineState::Creating
                } else if vm.tags.iter().any(|t| t == TAG_DELETING) {
                    MachineState::Deleting
                } else if vm.status == "running" && self.tagged_group(&vm).is_some() {
                    MachineState::Running
                } else if vm.status == "stopped"
                    && vm.tags.iter().any(|t| t == TAG_STOPPED)
                    && self.pool_groups.contains(&group)
                {
                    MachineState::Stopped
                } else {
                    MachineState::Failed(CreateFailure {
                        class: ErrorClass::Other,
                        code: "INTERRUPTED".into(),
                        message: format!(
                            "proxmox VM {} is {} and no create is running for it (interrupted create or stopped by hand)",
                            vm.vmid, vm.status
                        ),
                    })
                };
                Machine { group, name: vm.name, id: vm.vmid.to_string(), state }
            })
            .collect())
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        let settings = self.group(group)?.clone();
        if !lock(&self.reservations).names.insert(name.to_owned()) {
            return Err(Error::InvalidRequest(format!("a create for {name} is already running")));
        }
        let mut guard = CreateGuard {
            driver: self,
            name: name.to_owned(),
            vmid: None,
            ip: None,
            node_memory: None,
            succeeded: false,
        };
        let result = self.create_inner(&mut guard, group, &settings).await;
        guard.succeeded = result.is_ok();
        result
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        let vm = self.own_vm(machine, "mark").await?;
        if vm.tags.iter().any(|t| t == TAG_DELETING) {
            return Ok(());
        }
        let tags: Vec<&str> = vm.tags.iter().map(String::as_str).chain([TAG_DELETING]).collect();
        self.api.put(&format!("/nodes/{}/qemu/{}/config", vm.node, vm.vmid), &[("tags", tags.join(";"))]).await?;
        Ok(())
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let vm = self.own_vm(machine, "delete").await?;
        let vmid = vm.vmid;
        match self.destroy(&vm.node, vmid, vm.status != "stopped").await {
            Ok(()) => {}
            Err(Error::NotFound(m)) => return Err(Error::NotFound(m)),
            Err(e) => return Err(e),
        }
        if let Some(dir) = self.groups.get(&machine.group).and_then(|g| g.snippets_dir.as_ref()) {
            let _ = std::fs::remove_file(dir.join(Self::snippet_file(&machine.name)));
        }
        info!(vmid, name = %machine.name, "proxmox VM destroyed");
        Ok(())
    }

    fn can_stop(&self) -> bool {
        true
    }

    /// Shuts the VM down as a delete would, then tags it `flotilla-stopped`: only a VM stopped
    /// this way is a pool machine.
    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        let vm = self.own_vm(machine, "stop").await?;
        if vm.status != "stopped" {
            self.power_off(&vm.node, vm.vmid).await?;
        }
        if !vm.tags.iter().any(|t| t == TAG_STOPPED) {
            self.retag(&vm, Some(TAG_STOPPED), None).await?;
        }
        info!(vmid = vm.vmid, name = %machine.name, "proxmox VM stopped into the warm pool");
        Ok(())
    }

    /// Removes the `flotilla-stopped` tag, then starts the VM and waits for the start task. The
    /// guest boots and its kubelet rejoins on its own (it joined when it was created).
    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        let vm = self.own_vm(machine, "start").await?;
        if vm.tags.iter().any(|t| t == TAG_STOPPED) {
            self.retag(&vm, None, Some(TAG_STOPPED)).await?;
        }
        if vm.status != "running" {
            let upid = self.api.post(&format!("/nodes/{}/qemu/{}/status/start", vm.node, vm.vmid), &[]).await?;
            self.api.wait_answer(&upid, self.cloud.task_timeout).await?;
        }
        info!(vmid = vm.vmid, name = %machine.name, "proxmox VM started from the warm pool");
        Ok(Machine {
            group: machine.group.clone(),
            name: vm.name,
            id: vm.vmid.to_string(),
            state: MachineState::Creating,
        })
    }

    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let settings = self.group(group)?;
        let (mut cpu, mut memory) = (settings.cores.map(u64::from), settings.memory_mib.map(|m| m << 20));
        if cpu.is_none() || memory.is_none() {
            let vms: Vec<Vm> = self.resources(Some("vm")).await?.iter().filter_map(Vm::from_json).collect();
            let template = vms
                .iter()
                .find(|v| v.vmid == settings.template)
                .ok_or_else(|| Error::InvalidRequest(format!("template VM {} not found", settings.template)))?;
            cpu = cpu.or(template.maxcpu);
            memory = memory.or(template.maxmem);
        }
        Ok(Some(Shape { cpu_millis: cpu.map(|c| c * 1000), memory_bytes: memory, ..Shape::default() }))
    }

    /// Credentials, then whether each group's template exists and its clones have somewhere
    /// to go (storage and `nodes`).
    async fn check(&self) -> Result<()> {
        self.api.get("/version", &[]).await?;
        self.check_groups().await
    }
}
