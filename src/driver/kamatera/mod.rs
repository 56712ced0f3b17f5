//! Kamatera: servers created through the API behind `cloudcli.cloudwm.com` (the one
//! cluster-autoscaler's in-tree Kamatera provider uses), so that a cluster can move from that
//! provider to Flotilla without recreating a server.
//!
//! # Ownership
//! Exactly as the in-tree provider: a server is this cluster's when it carries the tag
//! `k8sca-<cluster>`, and belongs to group G only if it also carries `k8scang-<G>` (both set by
//! the create call itself). A server without both is never listed, powered or terminated; delete
//! reads the tags again before it terminates anything.
//!
//! # Listing (one Refresh)
//! One `GET /service/servers`. Tags are fetched (`POST /server/tags`, by server id) only for
//! servers not seen before, and kept: ownership tags do not change, and the one tag Flotilla adds
//! later ([`TAG_DELETING`]) it records itself. Servers whose names lack
//! `filter_name_prefix` are skipped without a call (the in-tree provider's option). A server
//! that is not ours is remembered as foreign, except while it is powered off with a name one
//! of our groups would give it (it may be our create, interrupted before its tags were readable).
//!
//! # Create
//! `POST /service/server` with every server setting of the in-tree provider, sent **once**. The
//! create returns when Kamatera accepted it (its command id); the command is then polled
//! (`GET /service/queue?id=`) on every listing until `complete` (the server is Running once
//! powered on) or `error` (the machine is Failed with the queue's log: OutOfResources when it
//! speaks of quota or capacity, else Other). A create the API refuses fails at once with its
//! class. A create whose answer is lost (timeout, dropped connection, a 5xx that is not the
//! backend's refusal) is never sent again: the driver looks for a server or a `Create Server`
//! command of that name (`GET /svc/queue`) for up to `lost_create_grace`, and adopts what it
//! finds; a server that shows up later still carries the tags and is listed then.
//!
//! # Restarts
//! Nothing is kept on disk. After a restart, a tagged server that is powered off and unknown to
//! this process is looked up in the recent queue (one `GET /svc/queue` for all such servers):
//! a `Create Server` still running makes it Creating again (and its command is polled), one
//! that failed makes it Failed with its log, and none at all makes it Failed
//! (`POWERED_OFF`: an interrupted create, a server powered off by hand, or a warm-pool server of
//! the in-tree provider's `poweroff-on-scale-down`), so cluster-autoscaler deletes it.
//!
//! # Delete
//! Looks the server up by name in a fresh listing (gone: done, [`Error::NotFound`]), checks its
//! tags, waits for a create command still running on it, then `POST /service/server/terminate`
//! with `force` (by id), and polls the command until it completes. A terminate that fails on a
//! server that is gone meanwhile (another terminate, e.g. of a process that died, got there
//! first) is done.
//!
//! # Marks: an accepted delete outlives the process
//! Before deleting, the core asks for the tag [`TAG_DELETING`] (`POST /server/tags` with `add`,
//! by id; the proxy creates the account's tag, adds it and answers with the server's tags). A
//! listing reports a server carrying it as Deleting, so a restarted Flotilla deletes it again. A
//! server whose create is still running is not tagged then (it may not exist yet, and its create
//! sets its tags): its delete waits for the create and tags it before terminating.
//!
//! # Machine ids
//! The Machine id is the server name (the in-tree provider identifies servers by name, and its
//! provider id is `kamatera://<name>`); Kamatera's own server id is used only to address calls.
//!
//! # Warm pools
//! `stop` and `start` power a tagged server off and on ([`Kamatera::power`]) and wait for the
//! command, as the in-tree provider's `poweroff-on-scale-down` / `poweron-on-scale-up` do. In a
//! group with a warm pool, a powered-off server with no create running for it is listed as
//! Stopped (a pool machine) instead of Failed (`POWERED_OFF`): so the powered-off servers the
//! in-tree provider left behind become Flotilla's pool after a migration.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use serde_json::json;
use tokio::{task::JoinSet, time::Instant};
use tracing::{debug, info, warn};

use super::{CreateFailure, Driver, Error, ErrorClass, Machine, MachineRef, MachineState, Result, Shape, http};
use crate::config::{Config, Problems, Section};

pub mod api;
pub mod script;
pub mod settings;

use api::{Api, CommandState, ServerRow};
pub use settings::{CloudSettings, Draft, GroupSettings};

/// The queue's `commandInfo` of a create (as Kamatera's own tooling matches it).
const CREATE_COMMAND: &str = "Create Server";
/// The tag of a server Flotilla is deleting (see "Marks" above).
pub const TAG_DELETING: &str = "flotilla-deleting";
/// Tag lookups in flight at once when many servers are new (the first listing after a start).
const TAG_LOOKUPS: usize = 8;

/// How a command ended.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Outcome {
    Done,
    /// `error`, with the queue's log.
    Failed(String),
}

/// A create this process started, or found running after a restart.
#[derive(Clone, Debug)]
struct Creating {
    group: String,
    /// Unknown while the create call is out, or when its answer was lost and only the server
    /// was found.
    command: Option<String>,
    /// Kamatera took it (the call answered, or its server or command was found). Until then a
    /// listing must not report it: the core would take it for a machine the cloud holds.
    accepted: bool,
}

/// What the driver remembers between calls. Written by `list`, `create` and `delete`; every
/// piece can be rebuilt from the cloud (see "Restarts" above).
#[derive(Debug, Default)]
struct Memory {
    /// Tags by server key (id, or name when the listing has no id), fetched once.
    tags: HashMap<String, Vec<String>>,
    /// Creates not finished, by server name.
    creating: HashMap<String, Creating>,
    /// Creates that failed, by server name, with their group; kept until the machine is deleted
    /// (the server may be gone: the failure must stay visible to cluster-autoscaler).
    failed: HashMap<String, (String, CreateFailure)>,
    /// Powered-off servers already looked up in the queue without a running create.
    orphans_checked: HashSet<String>,
    /// Servers being terminated, by name.
    deleting: HashSet<String>,
}

/// The Kamatera driver of one account.
#[derive(Debug)]
pub struct Kamatera {
    cluster: String,
    api: Arc<Api>,
    cluster_tag: String,
    filter_name_prefix: Option<String>,
    groups: BTreeMap<String, GroupSettings>,
    /// Group tag -> group name.
    by_tag: HashMap<String, String>,
    /// `<name_prefix>-` of every group: powered-off servers named like this are re-checked.
    name_prefixes: Vec<String>,
    poll_interval: Duration,
    lost_create_grace: Duration,
    memory: Mutex<Memory>,
    /// Groups with a warm pool (`groups.G.warm_pool`).
    pool_groups: HashSet<String>,
}

fn key(s: &ServerRow) -> String {
    s.id.clone().unwrap_or_else(|| format!("name:{}", s.name))
}

/// The constructor of the registry.
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<super::SharedDriver> {
    from_setup(setup, p).map(|d| Arc::new(d) as super::SharedDriver)
}

/// Builds the driver from its sections (the registry's path, and [`Kamatera::open`]'s).
fn from_setup(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<Kamatera> {
    let before = p.items.len();
    let cloud = CloudSettings::parse(setup.cluster, &mut setup.section, p);
    let allow_plain_http = setup.section.boolean("allow_plain_http", p).unwrap_or(false);
    let ca_file = setup.section.string("ca_file", p).map(|f| p.resolve(&f));
    if let Some(c) = &cloud
        && let Err(e) = http::check_url(&c.api_url, allow_plain_http)
    {
        p.push(setup.section.key_path("api_url"), e.to_string());
    }
    if let Some(c) = &cloud {
        // A create may take the create call's timeout and then the look for a lost answer; the
        // core must not give up on it before (the server could appear unannounced).
        let needed = c.create_request_timeout + c.lost_create_grace;
        if setup.cloud.create_timeout <= needed {
            p.push(
                setup.section.key_path("create_timeout"),
                format!(
                    "{:?} is too short: a create may take create_request_timeout + lost_create_grace ({needed:?}); give it more than that",
                    setup.cloud.create_timeout
                ),
            );
        }
    }
    let defaults_path = setup.section.key_path("defaults");
    let defaults = match setup.section.section("defaults", p) {
        Some(mut d) => {
            let draft = Draft::parse(&mut d, false, p);
            d.finish(p);
            draft
        }
        None => Draft::default(),
    };
    let mut groups = BTreeMap::new();
    let mut tags: HashMap<String, String> = HashMap::new();
    for g in &mut setup.groups {
        if let Some(prefix) = cloud.as_ref().and_then(|c| c.filter_name_prefix.as_deref())
            && !g.config.name_prefix.starts_with(prefix)
        {
            p.push(
                format!("groups.{}.name_prefix", g.config.name),
                format!(
                    "{:?} does not start with {}'s filter_name_prefix {prefix:?}: this group's servers would never be listed",
                    g.config.name_prefix,
                    setup.section.path()
                ),
            );
        }
        let Some(s) = GroupSettings::build(setup.cluster, g.config, &mut g.machine, &defaults, &defaults_path, p)
        else {
            continue;
        };
        if let Some(other) = tags.insert(s.group_tag.clone(), g.config.name.clone()) {
            p.push(
                g.machine.key_path("tag_group_name"),
                format!("group {other:?} on this cloud already uses the tag {}", s.group_tag),
            );
        }
        groups.insert(g.config.name.clone(), s);
    }
    if p.items.len() > before {
        return None;
    }
    let cloud = cloud?;
    let trust = match &ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => http::Trust::CaPem(pem),
            Err(e) => {
                p.push(setup.section.key_path("ca_file"), format!("cannot read {}: {e}", path.display()));
                return None;
            }
        },
        None => http::Trust::PublicRoots,
    };
    let client = http::Settings::new(trust)
        .timeout(cloud.request_timeout)
        .connect_timeout(cloud.request_timeout.min(Duration::from_secs(10)))
        .allow_plain_http(allow_plain_http)
        .classify(api::classify);
    let client = match http::Client::new(client) {
        Ok(c) => c,
        Err(e) => {
            p.push(setup.section.key_path(if ca_file.is_some() { "ca_file" } else { "api_url" }), e.to_string());
            return None;
        }
    };
    let name_prefixes = setup.groups.iter().map(|g| format!("{}-", g.config.name_prefix)).collect();
    let mut driver = Kamatera::new(setup.cluster, cloud, client, groups, name_prefixes);
    driver.pool_groups =
        setup.groups.iter().filter(|g| g.config.warm_pool > 0).map(|g| g.config.name.clone()).collect();
    Some(driver)
}

impl Kamatera {
    fn new(
        cluster: &str,
        cloud: CloudSettings,
        client: http::Client,
        groups: BTreeMap<String, GroupSettings>,
        name_prefixes: Vec<String>,
    ) -> Kamatera {
        let api = Api::new(client, &cloud.api_url, cloud.client_id, cloud.secret, cloud.create_request_timeout);
        let by_tag = groups.iter().map(|(name, g)| (g.group_tag.clone(), name.clone())).collect();
        Kamatera {
            cluster: cluster.to_owned(),
            api: Arc::new(api),
            cluster_tag: cloud.cluster_tag,
            filter_name_prefix: cloud.filter_name_prefix,
            groups,
            by_tag,
            name_prefixes,
            poll_interval: cloud.poll_interval,
            lost_create_grace: cloud.lost_create_grace,
            memory: Mutex::new(Memory::default()),
            pool_groups: HashSet::new(),
        }
    }

    /// The concrete driver of cloud `cloud` of a checked configuration (for callers that need
    /// more than the [`Driver`] trait, e.g. [`Kamatera::power`]).
    pub fn open(config: &Config, cloud: &str) -> Result<Kamatera, Problems> {
        let mut p = Problems::new(config.source.clone(), config.base_dir.clone());
        let empty = toml::Table::new();
        let table_at = |root: &str, name: &str| {
            config.raw.get(root).and_then(|v| v.as_table()).and_then(|t| t.get(name)).and_then(|v| v.as_table())
        };
        let Some(c) = config.clouds.iter().find(|c| c.name == cloud) else {
            p.push(format!("clouds.{cloud}"), "no such cloud");
            return Err(p);
        };
        let section = Section::new(format!("clouds.{cloud}"), table_at("clouds", cloud).unwrap_or(&empty))
            .skipping(crate::config::CLOUD_KEYS);
        let groups = config
            .groups
            .iter()
            .filter(|g| g.cloud == cloud)
            .map(|g| {
                let machine = table_at("groups", &g.name)
                    .and_then(|t| t.get("machine"))
                    .and_then(|v| v.as_table())
                    .unwrap_or(&empty);
                super::GroupSetup { config: g, machine: Section::new(format!("groups.{}.machine", g.name), machine) }
            })
            .collect();
        let mut setup = super::CloudSetup {
            cluster: &config.cluster_name,
            cloud: c,
            section,
            groups,
            gpu_label: &config.gpu.label,
            kube: &config.kube,
        };
        match from_setup(&mut setup, &mut p) {
            Some(d) if p.is_empty() => Ok(d),
            _ => Err(p),
        }
    }

    fn memory(&self) -> MutexGuard<'_, Memory> {
        // Plain data: a panic elsewhere leaves it usable.
        self.memory.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn group(&self, group: &str) -> Result<&GroupSettings> {
        self.groups.get(group).ok_or_else(|| Error::InvalidRequest(format!("group {group:?} is not on this cloud")))
    }

    /// The configured group whose tags a server carries; `None` for anything not ours.
    fn owner(&self, tags: &[String]) -> Option<String> {
        if !tags.contains(&self.cluster_tag) {
            return None;
        }
        tags.iter().find_map(|t| self.by_tag.get(t)).cloned()
    }

    fn named_like_ours(&self, name: &str) -> bool {
        self.name_prefixes.iter().any(|p| name.starts_with(p.as_str()))
    }

    /// Tags of every listed server not seen before, fetched concurrently; kept per the rules in
    /// the module docs. A lookup that fails leaves its server out of this listing (it is tried
    /// again next time), unless the credentials were refused.
    async fn learn_tags(&self, servers: &[ServerRow]) -> Result<()> {
        let unknown: Vec<ServerRow> = {
            let mem = self.memory();
            servers.iter().filter(|s| !mem.tags.contains_key(&key(s))).cloned().collect()
        };
        let mut pending = unknown.into_iter();
        let mut set = JoinSet::new();
        let mut refused = None;
        loop {
            while set.len() < TAG_LOOKUPS {
                let Some(s) = pending.next() else { break };
                let api = Arc::clone(&self.api);
                set.spawn(async move {
                    let r = api.server_tags(&s).await;
                    (s, r)
                });
            }
            let Some(joined) = set.join_next().await else { break };
            let Ok((s, r)) = joined else { continue };
            match r {
                Ok(tags) => {
                    let ours = self.owner(&tags).is_some();
                    let maybe_ours_later = !s.power_on && self.named_like_ours(&s.name);
                    if ours || !maybe_ours_later {
                        self.memory().tags.insert(key(&s), tags);
                    }
                }
                Err(e) => match Error::from(e) {
                    Error::Unauthorized(m) => refused = Some(Error::Unauthorized(m)),
                    e => {
                        warn!(server = %s.name, error = %e, "cannot read the tags of a server; it is left out of this listing")
                    }
                },
            }
        }
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Polls the command of every create in flight; updates `creating` and `failed`.
    async fn poll_creates(&self, listed: &HashMap<String, ServerRow>) -> Result<()> {
        let polls: Vec<(String, String)> = self
            .memory()
            .creating
            .iter()
            .filter_map(|(name, c)| c.command.clone().map(|cmd| (name.clone(), cmd)))
            .collect();
        let mut set = JoinSet::new();
        for (name, cmd) in polls {
            let api = Arc::clone(&self.api);
            set.spawn(async move {
                let r = api.command(&cmd).await;
                (name, cmd, r)
            });
        }
        let mut refused = None;
        while let Some(joined) = set.join_next().await {
            let Ok((name, cmd, r)) = joined else { continue };
            match r {
                Ok(state) => self.settle_create(&name, &cmd, state, listed.get(&name)),
                Err(e) => match Error::from(e) {
                    Error::Unauthorized(m) => refused = Some(Error::Unauthorized(m)),
                    e => {
                        warn!(%name, command = %cmd, error = %e, "cannot read a create's command; asking again next time")
                    }
                },
            }
        }
        // A create whose answer was lost but whose server was found: done once it is on.
        let mut mem = self.memory();
        mem.creating
            .retain(|name, c| !c.accepted || c.command.is_some() || !listed.get(name).is_some_and(|s| s.power_on));
        match refused {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Applies what the queue said about create command `cmd` of server `name`.
    fn settle_create(&self, name: &str, cmd: &str, state: CommandState, server: Option<&ServerRow>) {
        let mut mem = self.memory();
        let Some(c) = mem.creating.get(name).cloned() else { return };
        match state {
            CommandState::Complete => {
                info!(%name, command = %cmd, "kamatera create completed");
                mem.creating.remove(name);
            }
            CommandState::Failed(log) => {
                warn!(%name, command = %cmd, log = %log, "kamatera create failed");
                mem.creating.remove(name);
                mem.failed.insert(name.to_owned(), (c.group, failure_of(cmd, &log)));
            }
            // The queue forgot the command (it answers `[]` at times): a server that is on has
            // finished its create.
            CommandState::Unknown if server.is_some_and(|s| s.power_on) => {
                mem.creating.remove(name);
            }
            CommandState::Unknown | CommandState::Running(_) => {}
        }
    }

    /// After a restart: powered-off tagged servers this process knows nothing about are looked
    /// up in the recent queue (one call for all of them).
    async fn recover(&self, orphans: Vec<(ServerRow, String)>) {
        if orphans.is_empty() {
            return;
        }
        let recent = match self.api.recent_commands().await {
            Ok(r) => r,
            Err(e) => {
                warn!(error = %e, "cannot read the recent queue; powered-off servers stay creating until next time");
                return;
            }
        };
        for (server, group) in orphans {
            let create = recent.iter().find(|c| c.info == CREATE_COMMAND && same_server(&c.server, &server.name));
            let Some(cmd) = create else {
                self.memory().orphans_checked.insert(server.name.clone());
                continue;
            };
            let state = match self.api.command(&cmd.id).await {
                Ok(s) => s,
                Err(e) => {
                    warn!(name = %server.name, error = %e, "cannot read a create command found after a restart");
                    continue;
                }
            };
            match state {
                CommandState::Running(_) | CommandState::Unknown => {
                    info!(name = %server.name, command = %cmd.id, "found a create still running; following it again");
                    self.memory()
                        .creating
                        .insert(server.name.clone(), Creating { group, command: Some(cmd.id.clone()), accepted: true });
                }
                CommandState::Failed(log) => {
                    self.memory().failed.insert(server.name.clone(), (group, failure_of(&cmd.id, &log)));
                }
                CommandState::Complete => {
                    self.memory().orphans_checked.insert(server.name.clone());
                }
            }
        }
    }

    /// Waits until command `cmd` on server `name` is done and says how it ended. When the queue
    /// has nothing to say, the listing decides (`done` tells whether a server row, or its
    /// absence, means the command finished).
    async fn wait_command(&self, cmd: &str, name: &str, done: fn(Option<&ServerRow>) -> bool) -> Result<Outcome> {
        loop {
            match self.api.command(cmd).await.map_err(Error::from)? {
                CommandState::Complete => return Ok(Outcome::Done),
                CommandState::Failed(log) => return Ok(Outcome::Failed(log)),
                CommandState::Unknown => {
                    let servers = self.api.list_servers_retried().await?;
                    if done(servers.iter().find(|s| s.name == name)) {
                        return Ok(Outcome::Done);
                    }
                }
                CommandState::Running(_) => {}
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// The create body, with exactly the keys the API reads (`billingcycle`, not the
    /// `billingCycle` the in-tree provider sends and the API ignores).
    fn create_body(&self, group: &str, name: &str, g: &GroupSettings) -> Result<serde_json::Value> {
        let script = g
            .script
            .for_machine(script::Target { cluster: &self.cluster, group, name })
            .map_err(|e| Error::InvalidRequest(e.to_string()))?;
        let mut tags = vec![self.cluster_tag.clone(), g.group_tag.clone()];
        tags.extend(g.tags.iter().cloned());
        let yes_no = |b: bool| if b { "yes" } else { "no" };
        // No password: with an SSH key, an empty one (Kamatera generates one and discards it);
        // without, `__generate__` (the answer then carries it; it is dropped unread).
        let password = match (&g.password, &g.ssh_key) {
            (Some(p), _) => p.expose().to_owned(),
            (None, Some(_)) => String::new(),
            (None, None) => "__generate__".to_owned(),
        };
        Ok(json!({
            "name": name,
            "password": password,
            "ssh-key": g.ssh_key.clone().unwrap_or_default(),
            "datacenter": g.datacenter,
            "image": g.image,
            "cpu": g.cpu,
            "ram": g.ram_mb.to_string(),
            "disk": g.disks.join(" "),
            "dailybackup": yes_no(g.daily_backup),
            "managed": yes_no(g.managed),
            "network": g.networks.join(" "),
            "quantity": 1,
            "billingcycle": g.billing_cycle.as_str(),
            "monthlypackage": g.monthly_package.clone().unwrap_or_default(),
            "poweronaftercreate": "yes",
            "script-file": script,
            "userdata-file": "",
            "tag": tags.join(" "),
        }))
    }

    /// After a create whose answer was lost: looks for its command, then for its server, until
    /// `grace` is over. `Some(command)` (the command itself maybe unknown) when something was
    /// found; refused credentials end the search at once.
    async fn find_lost_create(&self, name: &str, grace: Duration) -> Result<Option<Option<String>>> {
        let deadline = Instant::now() + grace;
        loop {
            match self.api.recent_commands().await.map_err(Error::from) {
                Ok(recent) => {
                    if let Some(c) = recent.iter().find(|c| c.info == CREATE_COMMAND && same_server(&c.server, name)) {
                        return Ok(Some(Some(c.id.clone())));
                    }
                }
                Err(Error::Unauthorized(m)) => return Err(Error::Unauthorized(m)),
                Err(e) => debug!(%name, error = %e, "cannot read the recent queue while looking for a lost create"),
            }
            match self.api.list_servers_retried().await.map_err(Error::from) {
                Ok(servers) if servers.iter().any(|s| s.name == name) => return Ok(Some(None)),
                Ok(_) => {}
                Err(Error::Unauthorized(m)) => return Err(Error::Unauthorized(m)),
                Err(e) => debug!(%name, error = %e, "cannot list servers while looking for a lost create"),
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            tokio::time::sleep(self.poll_interval.min(deadline.saturating_duration_since(Instant::now()))).await;
        }
    }

    /// The listed server `name` if it carries this cluster's and `group`'s tags; an error
    /// refusing anything else. `None`: no such server.
    async fn tagged_server(&self, name: &str, group: &str) -> Result<Option<ServerRow>> {
        let servers = self.api.list_servers_retried().await?;
        let Some(server) = servers.into_iter().find(|s| s.name == name) else { return Ok(None) };
        let cached = self.memory().tags.get(&key(&server)).cloned();
        let tags = match cached {
            Some(t) if self.owner(&t).is_some() => t,
            // Not known to be ours: read them now (they may have been set since).
            _ => self.api.server_tags(&server).await?,
        };
        if self.owner(&tags).as_deref() != Some(group) {
            return Err(Error::InvalidRequest(format!(
                "kamatera server {name} does not carry the tags {} and {}; refusing to touch it",
                self.cluster_tag,
                self.groups.get(group).map(|g| g.group_tag.as_str()).unwrap_or("k8scang-<group>")
            )));
        }
        self.memory().tags.insert(key(&server), tags);
        Ok(Some(server))
    }

    /// Tags `server` (one of ours) with [`TAG_DELETING`] unless it carries it already. An answer
    /// lost on the way is settled by reading the tags back.
    async fn mark(&self, server: &ServerRow) -> Result<()> {
        if marked(&self.memory().tags, server) {
            return Ok(());
        }
        let tags = match self.api.add_tag(server, TAG_DELETING).await {
            Ok(tags) => tags,
            Err(e) if e.may_have_created() => {
                let tags = self.api.server_tags(server).await?;
                if !tags.iter().any(|t| t == TAG_DELETING) {
                    return Err(e.into());
                }
                tags
            }
            Err(e) => return Err(e.into()),
        };
        if !tags.iter().any(|t| t == TAG_DELETING) {
            return Err(Error::Other(format!(
                "kamatera server {} does not carry the tag {TAG_DELETING} after adding it",
                server.name
            )));
        }
        info!(name = %server.name, "kamatera server tagged {TAG_DELETING}");
        self.memory().tags.insert(key(server), tags);
        Ok(())
    }

    /// Forgets a server that is gone.
    fn forget(&self, name: &str) {
        let mut mem = self.memory();
        mem.failed.remove(name);
        mem.creating.remove(name);
        mem.deleting.remove(name);
    }

    /// Powers a server of this cluster on or off and waits for the command (warm pools).
    /// [`Error::NotFound`] when the server is gone.
    pub async fn power(&self, machine: &MachineRef, on: bool) -> Result<()> {
        let Some(server) = self.tagged_server(&machine.name, &machine.group).await? else {
            return Err(Error::NotFound(format!("kamatera server {}", machine.name)));
        };
        if server.power_on == on {
            return Ok(());
        }
        let cmd = self.api.power(&server, on).await?;
        info!(name = %machine.name, on, command = %cmd, "kamatera power command started");
        let done = if on { power_is_on } else { power_is_off };
        match self.wait_command(&cmd, &machine.name, done).await? {
            Outcome::Done => Ok(()),
            Outcome::Failed(log) => {
                Err(Error::Other(format!("kamatera power command {cmd} on {} failed: {log}", machine.name)))
            }
        }
    }
}

fn power_is_on(s: Option<&ServerRow>) -> bool {
    s.is_some_and(|s| s.power_on)
}

fn power_is_off(s: Option<&ServerRow>) -> bool {
    s.is_some_and(|s| !s.power_on)
}

fn is_gone(s: Option<&ServerRow>) -> bool {
    s.is_none()
}

/// Whether the known tags of server `s` carry [`TAG_DELETING`].
fn marked(tags: &HashMap<String, Vec<String>>, s: &ServerRow) -> bool {
    tags.get(&key(s)).is_some_and(|t| t.iter().any(|t| t == TAG_DELETING))
}

/// Whether the queue's `serviceName` names server `name` (it may carry more after the name).
fn same_server(service: &str, name: &str) -> bool {
    service == name
        || service
            .strip_prefix(name)
            .is_some_and(|rest| rest.chars().next().is_some_and(|c| !(c.is_ascii_alphanumeric() || "()_-".contains(c))))
}

/// How cluster-autoscaler should see a create command that ended in `error`.
fn failure_of(cmd: &str, log: &str) -> CreateFailure {
    let lower = log.to_ascii_lowercase();
    let no_resources =
        ["quota", "capacity", "insufficient", "not enough", "out of stock", "limit exceeded", "limit reached"]
            .iter()
            .any(|w| lower.contains(w));
    let (class, code) = if no_resources {
        (ErrorClass::OutOfResources, "OUT_OF_RESOURCES")
    } else {
        (ErrorClass::Other, "COMMAND_FAILED")
    };
    let log = if log.is_empty() { "the queue gave no log" } else { log };
    CreateFailure { class, code: code.into(), message: format!("kamatera create command {cmd} failed: {log}") }
}

fn powered_off(name: &str) -> CreateFailure {
    CreateFailure {
        class: ErrorClass::Other,
        code: "POWERED_OFF".into(),
        message: format!(
            "kamatera server {name} is powered off and no create is running for it (an interrupted create, a server powered off by hand, or a warm-pool server of the in-tree provider)"
        ),
    }
}

#[async_trait]
impl Driver for Kamatera {
    fn kind(&self) -> &'static str {
        "kamatera"
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let mut servers = self.api.list_servers().await?;
        if let Some(prefix) = &self.filter_name_prefix {
            servers.retain(|s| s.name.starts_with(prefix.as_str()));
        }
        // Servers of creates in flight are ours without asking (their tags may not be readable
        // yet).
        {
            let mut mem = self.memory();
            for s in &servers {
                if let Some(c) = mem.creating.get(&s.name).cloned()
                    && !mem.tags.contains_key(&key(s))
                    && let Some(g) = self.groups.get(&c.group)
                {
                    mem.tags.insert(key(s), vec![self.cluster_tag.clone(), g.group_tag.clone()]);
                }
            }
        }
        self.learn_tags(&servers).await?;
        let listed: HashMap<String, ServerRow> = servers.iter().map(|s| (s.name.clone(), s.clone())).collect();
        self.poll_creates(&listed).await?;

        let owned: Vec<(ServerRow, String)> = {
            let mem = self.memory();
            servers
                .iter()
                .filter_map(|s| mem.tags.get(&key(s)).and_then(|t| self.owner(t)).map(|g| (s.clone(), g)))
                .collect()
        };
        let orphans: Vec<(ServerRow, String)> = {
            let mem = self.memory();
            owned
                .iter()
                .filter(|(s, _)| {
                    !s.power_on
                        && !marked(&mem.tags, s)
                        && !mem.creating.contains_key(&s.name)
                        && !mem.failed.contains_key(&s.name)
                        && !mem.deleting.contains(&s.name)
                        && !mem.orphans_checked.contains(&s.name)
                })
                .cloned()
                .collect()
        };
        self.recover(orphans).await;

        let mut mem = self.memory();
        let Memory { tags, creating, failed, orphans_checked, deleting } = &mut *mem;
        let keys: HashSet<String> = servers.iter().map(key).collect();
        tags.retain(|k, _| keys.contains(k));
        orphans_checked.retain(|n| listed.contains_key(n));
        // A delete the core gave up on (its future dropped) leaves its name; the server is gone.
        deleting.retain(|n| listed.contains_key(n));
        let mut machines = Vec::with_capacity(owned.len());
        let mut seen = HashSet::new();
        for (s, group) in owned {
            let state = if deleting.contains(&s.name) || marked(tags, &s) {
                MachineState::Deleting
            } else if let Some((_, f)) = failed.get(&s.name) {
                MachineState::Failed(f.clone())
            } else if creating.contains_key(&s.name) {
                MachineState::Creating
            } else if s.power_on {
                orphans_checked.remove(&s.name);
                MachineState::Running
            } else if orphans_checked.contains(&s.name) && self.pool_groups.contains(&group) {
                MachineState::Stopped
            } else if orphans_checked.contains(&s.name) {
                MachineState::Failed(powered_off(&s.name))
            } else {
                // The queue could not be read: assume a create, look again next time.
                MachineState::Creating
            };
            seen.insert(s.name.clone());
            machines.push(Machine { group, id: s.name.clone(), name: s.name, state });
        }
        // Creates accepted but not listed yet, and failed creates whose server is gone: both
        // must stay visible until cluster-autoscaler is done with them.
        for (name, c) in creating.iter() {
            if c.accepted && !seen.contains(name) {
                machines.push(Machine {
                    group: c.group.clone(),
                    name: name.clone(),
                    id: name.clone(),
                    state: MachineState::Creating,
                });
                seen.insert(name.clone());
            }
        }
        for (name, (group, f)) in failed.iter() {
            if !seen.contains(name) {
                machines.push(Machine {
                    group: group.clone(),
                    name: name.clone(),
                    id: name.clone(),
                    state: MachineState::Failed(f.clone()),
                });
            }
        }
        Ok(machines)
    }

    fn can_stop(&self) -> bool {
        true
    }

    /// Powers the server off and waits for the command; it is then known to have no create
    /// running (no queue lookup needed).
    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        self.power(machine, false).await?;
        self.memory().orphans_checked.insert(machine.name.clone());
        Ok(())
    }

    /// Powers the server on and waits for the command; it boots and its kubelet rejoins.
    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        self.power(machine, true).await?;
        self.memory().orphans_checked.remove(&machine.name);
        Ok(Machine {
            group: machine.group.clone(),
            name: machine.name.clone(),
            id: machine.name.clone(),
            state: MachineState::Running,
        })
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        let settings = self.group(group)?;
        let body = self.create_body(group, name, settings)?;
        {
            let mut mem = self.memory();
            if mem.creating.contains_key(name) {
                return Err(Error::InvalidRequest(format!("a create of {name} is already running")));
            }
            mem.creating.insert(name.to_owned(), Creating { group: group.to_owned(), command: None, accepted: false });
            mem.failed.remove(name);
        }
        let creating = Machine {
            group: group.to_owned(),
            name: name.to_owned(),
            id: name.to_owned(),
            state: MachineState::Creating,
        };
        match self.api.create_server(&body).await {
            Ok(cmd) => {
                info!(%name, %group, command = %cmd, "kamatera create started");
                if let Some(c) = self.memory().creating.get_mut(name) {
                    c.command = Some(cmd);
                    c.accepted = true;
                }
                Ok(creating)
            }
            Err(e) if e.may_have_created() => {
                // Never asked again: look for what it may have made.
                let grace = if e.unanswered() { self.lost_create_grace } else { self.poll_interval };
                warn!(%name, error = %e, ?grace, "the answer to a create was lost; looking for its server");
                let found = self.find_lost_create(name, grace).await;
                if found.is_err() {
                    self.memory().creating.remove(name);
                }
                match found? {
                    Some(cmd) => {
                        info!(%name, command = ?cmd, "found the server or command of a create whose answer was lost");
                        if let Some(c) = self.memory().creating.get_mut(name) {
                            c.command = cmd;
                            c.accepted = true;
                        }
                        Ok(creating)
                    }
                    None => {
                        self.memory().creating.remove(name);
                        let e = Error::from(e);
                        Err(Error::Unavailable(format!(
                            "{e}; no server or create command named {name} appeared within {grace:?}, so nothing was created (a server that appears later is adopted)"
                        )))
                    }
                }
            }
            Err(e) => {
                self.memory().creating.remove(name);
                Err(e.into())
            }
        }
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let name = machine.name.as_str();
        // A create still running on it is waited for: Kamatera runs one command at a time.
        let running = self.memory().creating.get(name).and_then(|c| c.command.clone());
        if let Some(cmd) = running {
            debug!(%name, command = %cmd, "waiting for the create before terminating");
            let outcome = self.wait_command(&cmd, name, power_is_on).await?;
            let mut mem = self.memory();
            if let (Some(c), Outcome::Failed(log)) = (mem.creating.remove(name), outcome) {
                mem.failed.insert(name.to_owned(), (c.group, failure_of(&cmd, &log)));
            }
        }
        let Some(server) = self.tagged_server(name, &machine.group).await? else {
            self.forget(name);
            return Err(Error::NotFound(format!("kamatera server {name}")));
        };
        if let Err(e) = self.mark(&server).await {
            // The terminate goes ahead; only a restart before it ends would not know.
            warn!(%name, error = %e, "cannot tag the server {TAG_DELETING}");
        }
        self.memory().deleting.insert(name.to_owned());
        let result = async {
            let cmd = match self.api.terminate(&server).await {
                Ok(cmd) => cmd,
                Err(e) => {
                    // It may have been carried out: a server already gone is deleted.
                    if e.may_have_created() {
                        let servers = self.api.list_servers_retried().await?;
                        if !servers.iter().any(|s| s.name == name) {
                            return Ok(());
                        }
                    }
                    return Err(e.into());
                }
            };
            info!(%name, command = %cmd, "kamatera terminate started");
            match self.wait_command(&cmd, name, is_gone).await? {
                Outcome::Done => Ok(()),
                Outcome::Failed(log) => {
                    let servers = self.api.list_servers_retried().await?;
                    if !servers.iter().any(|s| s.name == name) {
                        debug!(%name, command = %cmd, %log, "the terminate failed, but the server is gone");
                        return Ok(());
                    }
                    Err(Error::Other(format!("kamatera terminate command {cmd} on {name} failed: {log}")))
                }
            }
        }
        .await;
        let mut mem = self.memory();
        mem.deleting.remove(name);
        if result.is_ok() {
            mem.failed.remove(name);
            mem.creating.remove(name);
            mem.tags.remove(&key(&server));
            info!(%name, "kamatera server terminated");
        }
        result
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        let name = machine.name.as_str();
        if self.memory().creating.contains_key(name) {
            return Err(Error::Unavailable(format!(
                "kamatera server {name} is still being created; its delete waits for the create and tags it then"
            )));
        }
        let Some(server) = self.tagged_server(name, &machine.group).await? else {
            self.forget(name);
            return Err(Error::NotFound(format!("kamatera server {name}")));
        };
        self.mark(&server).await
    }

    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let g = self.group(group)?;
        Ok(Some(Shape {
            cpu_millis: Some(g.cpu_cores * 1000),
            memory_bytes: Some(g.ram_mb << 20),
            ephemeral_storage_bytes: (g.first_disk_gb > 0).then_some(g.first_disk_gb << 30),
            // Kamatera servers are x86_64; the core's default (`amd64`) says so.
            ..Shape::default()
        }))
    }

    async fn check(&self) -> Result<()> {
        self.api.list_servers().await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_service_names_match_whole_server_names() {
        assert!(same_server("prod-workers-abcde", "prod-workers-abcde"));
        assert!(same_server("prod-workers-abcde (EU)", "prod-workers-abcde"));
        assert!(!same_server("prod-workers-abcdef", "prod-workers-abcde"));
        assert!(!same_server("prod-workers-abcde-2", "prod-workers-abcde"));
        assert!(!same_server("prod-workers", "prod-workers-abcde"));
    }

    #[test]
    fn a_failed_command_is_out_of_resources_only_when_its_log_says_so() {
        let f = failure_of("7", "Error: not enough capacity in datacenter EU");
        assert_eq!((f.class, f.code.as_str()), (ErrorClass::OutOfResources, "OUT_OF_RESOURCES"));
        assert!(f.message.contains("not enough capacity"));
        let f = failure_of("7", "disk image not found");
        assert_eq!(f.class, ErrorClass::Other);
        assert!(failure_of("7", "").message.contains("no log"));
    }
}
