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
//! # States reported
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

use super::{CreateFailure, Driver, Error, ErrorClass, Machine, MachineRef, MachineState, Result, Shape, http};
use crate::config::{Problems, Section};

pub mod api;
pub mod ippool;

use api::{Api, Auth};
use ippool::IpPool;

const TAG_CLUSTER: &str = "flotilla-c-";
const TAG_GROUP: &str = "flotilla-g-";
/// Attempts at a VMID before giving up (each loses only to a concurrent create).
const VMID_ATTEMPTS: usize = 5;

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
    /// minijinja template of the cloud-init user-data, written to `snippets_dir` and referenced
    /// as `<snippets_storage>:snippets/<file>` (PVE's API cannot upload snippets).
    pub user_data: Option<String>,
    pub snippets_dir: Option<PathBuf>,
    pub snippets_storage: Option<String>,
    /// minijinja template of the shell command that joins the node, run through the agent.
    pub join_command: Option<String>,
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
    pub fn parse(group: &str, s: &mut Section<'_>, p: &mut Problems) -> Option<GroupSettings> {
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
        let user_data = s.string("user_data", p);
        let snippets_dir = s.string("snippets_dir", p).map(|d| p.resolve(&d));
        let snippets_storage = s.string("snippets_storage", p);
        if user_data.is_some() != (snippets_dir.is_some() && snippets_storage.is_some()) {
            p.push(s.key_path("user_data"), "user_data, snippets_dir and snippets_storage go together");
        }
        if let Some(text) = &user_data
            && let Err(e) = minijinja::Environment::new().template_from_str(text)
        {
            p.push(s.key_path("user_data"), format!("is not a valid template: {e}"));
        }
        let join_command = s.string("join_command", p);
        if let Some(text) = &join_command
            && let Err(e) = minijinja::Environment::new().template_from_str(text)
        {
            p.push(s.key_path("join_command"), format!("is not a valid template: {e}"));
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
        if let Some(s) = GroupSettings::parse(&g.config.name, &mut g.machine, p) {
            groups.insert(g.config.name.clone(), s);
        }
        prefixes.push((g.config.name.clone(), g.config.name_prefix.clone()));
    }
    match Proxmox::new(setup.cluster, cloud?, groups, prefixes) {
        Ok(d) => Some(std::sync::Arc::new(d)),
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

    fn choose_node(&self, settings: &GroupSettings, resources: &[Value], memory: u64) -> Result<String> {
        let allowed = if settings.nodes.is_empty() { &self.cloud.nodes } else { &settings.nodes };
        let pending = lock(&self.reservations).node_memory.clone();
        let mut best: Option<(u64, String)> = None;
        let mut seen = 0;
        for n in resources.iter().filter(|v| v.get("type").and_then(Value::as_str) == Some("node")) {
            let Some(name) = n.get("node").and_then(Value::as_str) else { continue };
            if !allowed.is_empty() && !allowed.iter().any(|a| a == name) {
                continue;
            }
            if n.get("status").and_then(Value::as_str) != Some("online") {
                continue;
            }
            seen += 1;
            let max = n.get("maxmem").and_then(Value::as_u64).unwrap_or(0);
            let used = n.get("mem").and_then(Value::as_u64).unwrap_or(0) + pending.get(name).copied().unwrap_or(0);
            let free = max.saturating_sub(used);
            if free >= memory && best.as_ref().is_none_or(|(f, _)| free > *f) {
                best = Some((free, name.to_owned()));
            }
        }
        match best {
            Some((_, node)) => Ok(node),
            None if seen == 0 => Err(Error::Unavailable(format!(
                "no online proxmox node among {}",
                if allowed.is_empty() { "the cluster".to_owned() } else { allowed.join(", ") }
            ))),
            None => Err(Error::OutOfResources(format!("no proxmox node has {} MiB of memory free", memory >> 20))),
        }
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

    fn render(template: &str, vars: &HashMap<&str, String>) -> Result<String> {
        let env = minijinja::Environment::new();
        env.render_str(template, vars).map_err(|e| Error::InvalidRequest(format!("cannot render template: {e}")))
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

    /// Stops (or shuts down) and destroys a VM with purge.
    async fn destroy(&self, node: &str, vmid: u32, running: bool) -> Result<()> {
        let base = format!("/nodes/{node}/qemu/{vmid}");
        if running {
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
        let node = self.choose_node(settings, &resources, memory)?;
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
        let mut vars: HashMap<&str, String> = HashMap::new();
        vars.insert("name", name.to_owned());
        vars.insert("group", group.to_owned());
        vars.insert("cluster", self.cluster.clone());
        vars.insert("vmid", vmid.to_string());
        vars.insert("node", node.to_owned());
        vars.insert("ip", ip.map(|i| i.to_string()).unwrap_or_default());

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
            let text = Self::render(template, &vars)?;
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
            let command = Self::render(command, &vars)?;
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
                } else if vm.status == "running" && self.tagged_group(&vm).is_some() {
                    MachineState::Running
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

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let vmid: u32 = machine.id.parse().map_err(|_| Error::NotFound(format!("{} is not a VMID", machine.id)))?;
        let vms: Vec<Vm> = self.resources(Some("vm")).await?.iter().filter_map(Vm::from_json).collect();
        let Some(vm) = vms.into_iter().find(|v| v.vmid == vmid) else {
            return Err(Error::NotFound(format!("proxmox VM {vmid}")));
        };
        // The VMID may have been reused since: the name and the marks must match.
        let group = match self.tagged_group(&vm) {
            Some(g) => Some(g),
            None if self.looks_like_ours(&vm) => self.marked_group(&vm).await?,
            None => None,
        };
        if vm.template || vm.name != machine.name || group.as_deref() != Some(machine.group.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "proxmox VM {vmid} ({}) is not {} of group {}; refusing to delete it",
                vm.name, machine.name, machine.group
            )));
        }
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

    async fn check(&self) -> Result<()> {
        self.api.get("/version", &[]).await?;
        Ok(())
    }
}
