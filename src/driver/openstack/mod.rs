//! OpenStack: Nova servers as nodes, authenticated with Keystone v3, booted with user data
//! rendered per machine from a template (cloud-init as is, or Butane turned into Ignition for
//! Fedora CoreOS).
//!
//! # Why not the `openstack` crate
//! `openstack` 0.6 is async and covers servers, flavors, images and networks, but it has no
//! server `fault` (so an ERROR server could not say why, nor NoValidHost be told from other
//! failures), no scheduler hints (server-group anti-affinity), hides Nova's error bodies
//! behind its own error kinds (quota errors could not be classed as out of resources), and
//! pulls in native TLS by default. The driver needs a dozen calls, so it makes them itself
//! with `reqwest` over rustls ([`api`]); Keystone is in [`auth`].
//!
//! # Ownership
//! Every server is created with the metadata `flotilla-cluster = <cluster>` and
//! `flotilla-group = <group>` in the same `POST /servers`. `list` is one paginated
//! `GET /servers/detail` keeping only servers with this cluster's mark; `delete` reads the
//! server first and refuses one whose marks are not this cluster's and group's.
//!
//! # Deletes that outlive a restart
//! `mark_deleting` sets the metadata item `flotilla-deleting = true`
//! (`PUT /servers/{id}/metadata/flotilla-deleting`, one call) before the delete; `list` reports
//! a server so marked as Deleting, and the core deletes it again after a restart. Nova refuses
//! metadata changes while a server is building or in ERROR (409): such a server is deleted
//! unmarked, and a restart finds it as what it is (Creating, Failed) for cluster-autoscaler to
//! decide again.
//!
//! # Keys
//! `[clouds.NAME]`: one credentials source — `cloud` (+ optional `clouds_file`),
//! `credentials_file` (YAML of `OS_*` keys), an inline `auth` table, or (none of these) the
//! `OS_*` environment — and `region_name`, `interface`, `ca_file`, `insecure`,
//! `allow_plain_http` (`http://` to a host that is not loopback; refused without it),
//! `request_timeout`, `page_size`.
//!
//! `[groups.G.machine]`: `flavor`, `image` (name or id), `networks` (names or ids; none means
//! Nova's `auto`), `ports` (`[[...ports]]` with `network`, `security_groups`,
//! `allowed_address_pairs`, `port_security`: one Neutron port per server, deleted with it),
//! `security_groups`, `key_name`, `availability_zone`, `server_group` (name or
//! id, sent as a scheduler hint), `boot_volume_size` (GiB; boots from a new volume),
//! `config_drive`, `metadata`, `user_data_template` (file) or `user_data` (inline template),
//! `template_data`, `join_url`, `join_token` (secret), `butane`, `butane_binary`.

use std::{
    collections::{BTreeMap, HashMap},
    path::PathBuf,
    time::Duration,
};

use async_trait::async_trait;
use base64::Engine;
use serde_json::{Value, json};
use tokio::sync::OnceCell;

use super::script::{self, Template};
use super::{CreateFailure, Driver, Error, ErrorClass, Machine, MachineRef, MachineState, Result, Shape, http};
use crate::config::{Problems, Section};

pub mod api;
pub mod auth;
pub mod userdata;

use api::Api;
use auth::Credentials;
use userdata::UserData;

/// Metadata key naming the cluster a server belongs to.
pub const META_CLUSTER: &str = "flotilla-cluster";
/// Metadata key naming the node group a server belongs to.
pub const META_GROUP: &str = "flotilla-group";
/// Metadata key set on a server Flotilla is deleting (see the module docs).
pub const META_DELETING: &str = "flotilla-deleting";

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_PAGE_SIZE: u32 = 200;

/// Settings of one `[clouds.NAME]` table.
#[derive(Clone, Debug)]
pub struct CloudSettings {
    pub credentials: Credentials,
    pub interface: String,
    pub region: Option<String>,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
    /// `http://` to a host that is not loopback: an explicit opt-in.
    pub allow_plain_http: bool,
    pub request_timeout: Duration,
    pub page_size: u32,
}

/// Keys of the inline `auth` table, and the `OS_*` variable each stands for.
const AUTH_KEYS: &[(&str, &str)] = &[
    ("auth_url", "OS_AUTH_URL"),
    ("username", "OS_USERNAME"),
    ("user_id", "OS_USER_ID"),
    ("user_domain_name", "OS_USER_DOMAIN_NAME"),
    ("user_domain_id", "OS_USER_DOMAIN_ID"),
    ("project_name", "OS_PROJECT_NAME"),
    ("project_id", "OS_PROJECT_ID"),
    ("project_domain_name", "OS_PROJECT_DOMAIN_NAME"),
    ("project_domain_id", "OS_PROJECT_DOMAIN_ID"),
    ("application_credential_id", "OS_APPLICATION_CREDENTIAL_ID"),
    ("application_credential_name", "OS_APPLICATION_CREDENTIAL_NAME"),
];

impl CloudSettings {
    /// Reads the driver's keys of a `[clouds.NAME]` table, credentials included.
    pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> Option<CloudSettings> {
        let cloud = s.string("cloud", p);
        let clouds_file = s.string("clouds_file", p);
        let credentials_file = s.string("credentials_file", p);
        let auth = s.section("auth", p);
        let region_name = s.string("region_name", p);
        let interface = s.string("interface", p);
        let ca_file = s.string("ca_file", p).map(|f| p.resolve(&f));
        let insecure = s.boolean("insecure", p);
        let allow_plain_http = s.boolean("allow_plain_http", p).unwrap_or(false);
        let request_timeout = s.duration("request_timeout", p).unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        let page_size = s.integer::<u32>("page_size", p).unwrap_or(DEFAULT_PAGE_SIZE);
        if page_size == 0 {
            p.push(s.key_path("page_size"), "must be at least 1");
        }
        if let Some(i) = &interface
            && !["public", "internal", "admin"].contains(&i.as_str())
        {
            p.push(s.key_path("interface"), format!("{i:?} is not one of public, internal, admin"));
        }
        let sources = [cloud.is_some(), credentials_file.is_some(), auth.is_some()].iter().filter(|b| **b).count();
        if sources > 1 {
            p.push(s.path(), "give only one of `cloud`, `credentials_file` and `auth`");
            return None;
        }
        if clouds_file.is_some() && cloud.is_none() {
            p.push(s.key_path("clouds_file"), "needs `cloud` to name the entry to use");
        }
        let (key, credentials) = if let Some(name) = cloud {
            let path = match clouds_file.map(|f| p.resolve(&f)).or_else(auth::find_clouds_yaml) {
                Some(path) => path,
                None => {
                    p.push(s.key_path("cloud"), "no clouds.yaml found (set `clouds_file` or OS_CLIENT_CONFIG_FILE)");
                    return None;
                }
            };
            let read = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()));
            (
                "cloud",
                read.and_then(|t| {
                    Credentials::from_clouds_yaml(&t, &name).map_err(|e| format!("{}: {e}", path.display()))
                }),
            )
        } else if let Some(file) = credentials_file {
            let path = p.resolve(&file);
            let read = std::fs::read_to_string(&path).map_err(|e| format!("cannot read {}: {e}", path.display()));
            (
                "credentials_file",
                read.and_then(|t| {
                    Credentials::from_credentials_file(&t).map_err(|e| format!("{}: {e}", path.display()))
                }),
            )
        } else if let Some(mut a) = auth {
            let mut vars = BTreeMap::new();
            for (k, var) in AUTH_KEYS {
                if let Some(v) = a.string(k, p) {
                    vars.insert(*var, v);
                }
            }
            if let Some(secret) = a.secret("password", p) {
                vars.insert("OS_PASSWORD", secret.expose().to_owned());
            }
            if let Some(secret) = a.secret("application_credential_secret", p) {
                vars.insert("OS_APPLICATION_CREDENTIAL_SECRET", secret.expose().to_owned());
            }
            a.finish(p);
            ("auth", Credentials::from_vars(|k| vars.get(k).cloned()))
        } else {
            (
                "driver",
                Credentials::from_env().map_err(|e| format!("no credentials given, and in the environment: {e}")),
            )
        };
        let credentials = match credentials {
            Ok(c) => c,
            Err(e) => {
                p.push(s.key_path(key), e);
                return None;
            }
        };
        // The password or secret goes to auth_url: never in clear to another host unless the
        // user says so.
        if let Err(e) = http::check_url(&credentials.auth_url, allow_plain_http) {
            let path = match key {
                "auth" => format!("{}.auth_url", s.key_path("auth")),
                "driver" => s.path().to_owned(),
                other => s.key_path(other),
            };
            let hint =
                if matches!(e, http::UrlError::PlainHttp { .. }) { " (allow_plain_http = true opts in)" } else { "" };
            p.push(path, format!("auth_url {e}{hint}"));
            return None;
        }
        Some(CloudSettings {
            interface: interface.or_else(|| credentials.interface.clone()).unwrap_or_else(|| "public".into()),
            region: region_name.or_else(|| credentials.region.clone()),
            ca_file: ca_file.or_else(|| credentials.ca_file.as_ref().map(|f| p.resolve(f))),
            insecure: insecure.unwrap_or(credentials.insecure),
            allow_plain_http,
            request_timeout,
            page_size: page_size.max(1),
            credentials,
        })
    }
}

/// One Neutron port made for each server of a group: for what a plain network attachment
/// cannot say, e.g. allowed address pairs for pod CIDRs routed without encapsulation.
#[derive(Clone, Debug, Default)]
pub struct PortSpec {
    /// Name or id.
    pub network: String,
    /// Neutron security groups by name or id (none: the project's default).
    pub security_groups: Vec<String>,
    /// CIDRs or addresses the port may also send from.
    pub allowed_address_pairs: Vec<String>,
    pub port_security: Option<bool>,
}

/// Settings of one group's `machine` table.
#[derive(Clone, Debug, Default)]
pub struct GroupSettings {
    pub flavor: String,
    pub image: String,
    pub networks: Vec<String>,
    /// Ports created for each server (after `networks`), deleted with it.
    pub ports: Vec<PortSpec>,
    pub security_groups: Vec<String>,
    pub key_name: Option<String>,
    pub availability_zone: Option<String>,
    pub server_group: Option<String>,
    /// GiB; set means boot from a new volume of this size, deleted with the server.
    pub boot_volume_size: Option<u32>,
    pub config_drive: Option<bool>,
    pub metadata: BTreeMap<String, String>,
    pub user_data: Option<UserData>,
}

impl GroupSettings {
    /// Reads a group's `machine` table; `None` if anything required is missing or wrong.
    pub fn parse(cluster: &str, group: &str, s: &mut Section<'_>, p: &mut Problems) -> Option<GroupSettings> {
        let before = p.items.len();
        let flavor = s.required_string("flavor", p);
        let image = s.required_string("image", p);
        let networks = s.string_list("networks", p);
        let mut ports = Vec::new();
        for mut ps in s.array_of_sections("ports", p) {
            let spec = PortSpec {
                network: ps.required_string("network", p).unwrap_or_default(),
                security_groups: ps.string_list("security_groups", p),
                allowed_address_pairs: ps.string_list("allowed_address_pairs", p),
                port_security: ps.boolean("port_security", p),
            };
            if spec.port_security == Some(false) && !spec.security_groups.is_empty() {
                p.push(ps.key_path("security_groups"), "cannot be used with `port_security = false`");
            }
            ps.finish(p);
            ports.push(spec);
        }
        let security_groups = s.string_list("security_groups", p);
        let key_name = s.string("key_name", p);
        let availability_zone = s.string("availability_zone", p);
        let server_group = s.string("server_group", p);
        let boot_volume_size = s.integer::<u32>("boot_volume_size", p);
        if boot_volume_size == Some(0) {
            p.push(s.key_path("boot_volume_size"), "must be at least 1 (GiB)");
        }
        let config_drive = s.boolean("config_drive", p);
        let metadata = s.string_map("metadata", p);
        for key in [META_CLUSTER, META_GROUP, META_DELETING] {
            if metadata.contains_key(key) {
                p.push(format!("{}.{key}", s.key_path("metadata")), "is set by Flotilla to mark ownership");
            }
        }
        let template = Template::read(s, &userdata::KEYS, p);
        let template_data = script::template_data(s, userdata::RESERVED, p);
        let join_url = s.string("join_url", p);
        let join_token = s.secret("join_token", p);
        let butane = s.boolean("butane", p).unwrap_or(false);
        let butane_binary = s.string("butane_binary", p);
        if template.is_none() && (butane || !template_data.is_empty() || join_url.is_some() || join_token.is_some()) {
            p.push(
                s.path(),
                "`butane`, `template_data`, `join_url` and `join_token` need `user_data_template` or `user_data`",
            );
        }
        if butane_binary.is_some() && !butane {
            p.push(s.key_path("butane_binary"), "is only used with `butane = true`");
        }
        let user_data = template.map(|template| UserData {
            template,
            data: template_data,
            join_url,
            join_token,
            butane: butane.then(|| PathBuf::from(butane_binary.unwrap_or_else(|| "butane".into()))),
        });
        if let Some(ud) = &user_data {
            // A trial render catches syntax errors and misspelt variables before any machine
            // boots with a broken config.
            let name = format!("{cluster}-{group}-check");
            ud.check(userdata::Target { cluster, group, name: &name }, p);
        }
        if p.items.len() > before {
            return None;
        }
        Some(GroupSettings {
            flavor: flavor?,
            image: image?,
            networks,
            ports,
            security_groups,
            key_name,
            availability_zone,
            server_group,
            boot_volume_size,
            config_drive,
            metadata,
            user_data,
        })
    }
}

/// What a group's names resolved to, looked up once.
#[derive(Clone, Debug)]
struct Resolved {
    flavor: api::Flavor,
    gpus: u64,
    image_id: String,
    network_ids: Vec<String>,
    ports: Vec<ResolvedPort>,
    server_group_id: Option<String>,
}

#[derive(Clone, Debug)]
struct ResolvedPort {
    network_id: String,
    security_group_ids: Vec<String>,
}

/// How often a start waits for a server still powering off (the core bounds the whole start
/// with `create_timeout`).
const POWER_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// The OpenStack driver of one cloud account.
#[derive(Debug)]
pub struct OpenStack {
    cluster: String,
    api: Api,
    groups: HashMap<String, GroupSettings>,
    /// Flavor, image, network and server-group ids per group; written once by the first
    /// create or shape of the group, read by every later one. Failed lookups are not kept.
    resolved: HashMap<String, OnceCell<Resolved>>,
    /// Groups with a warm pool: their SHUTOFF servers are listed as Stopped.
    pool_groups: std::collections::BTreeSet<String>,
}

/// Why the driver could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("cannot read CA bundle {path}: {source}")]
    CaFile {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("CA bundle {path} holds no usable certificate: {source}")]
    CaCert {
        path: PathBuf,
        #[source]
        source: http::tls::Error,
    },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

fn is_uuid(s: &str) -> bool {
    let b = s.as_bytes();
    // Nova flavors and some ids are plain hex without dashes; only dashed UUIDs skip lookup.
    b.len() == 36
        && b.iter()
            .enumerate()
            .all(|(i, c)| if [8, 13, 18, 23].contains(&i) { *c == b'-' } else { c.is_ascii_hexdigit() })
}

/// Counts GPUs a flavor asks for: `resources:VGPU=N`, `resources:PGPU=N`, or PCI passthrough
/// aliases `pci_passthrough:alias=a100:2[,other:1]`.
pub fn gpus_of(extra_specs: &BTreeMap<String, String>) -> u64 {
    let mut n = 0;
    for key in ["resources:VGPU", "resources:PGPU"] {
        n += extra_specs.get(key).and_then(|v| v.trim().parse::<u64>().ok()).unwrap_or(0);
    }
    if let Some(aliases) = extra_specs.get("pci_passthrough:alias") {
        for alias in aliases.split(',') {
            n += alias.split_once(':').and_then(|(_, c)| c.trim().parse::<u64>().ok()).unwrap_or(1);
        }
    }
    n
}

/// The OpenStack driver's [`Constructor`](super::Constructor).
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut Problems) -> Option<super::SharedDriver> {
    let settings = CloudSettings::parse(&mut setup.section, p);
    let mut groups = Vec::new();
    for g in &mut setup.groups {
        if let Some(s) = GroupSettings::parse(setup.cluster, &g.config.name, &mut g.machine, p) {
            groups.push((g.config.name.clone(), s));
        }
    }
    if groups.len() != setup.groups.len() {
        return None;
    }
    match OpenStack::new(setup.cluster, settings?, groups) {
        Ok(mut d) => {
            d.pool_groups =
                setup.groups.iter().filter(|g| g.config.warm_pool > 0).map(|g| g.config.name.clone()).collect();
            Some(std::sync::Arc::new(d))
        }
        Err(e) => {
            p.push(setup.section.path(), e.to_string());
            None
        }
    }
}

impl OpenStack {
    pub fn new(
        cluster: &str,
        settings: CloudSettings,
        groups: Vec<(String, GroupSettings)>,
    ) -> Result<OpenStack, BuildError> {
        let trust = if settings.insecure {
            tracing::warn!("TLS certificate verification is off for this OpenStack cloud (insecure = true)");
            http::Trust::Insecure
        } else if let Some(path) = &settings.ca_file {
            let pem = std::fs::read(path).map_err(|source| BuildError::CaFile { path: path.clone(), source })?;
            http::Trust::CaPem(pem)
        } else {
            http::Trust::PublicRoots
        };
        let client_settings = http::Settings::new(trust)
            .timeout(settings.request_timeout)
            .connect_timeout(settings.request_timeout.min(Duration::from_secs(10)))
            .allow_plain_http(settings.allow_plain_http)
            .classify(api::classify);
        let http = http::Client::new(client_settings).map_err(|e| match (e, &settings.ca_file) {
            (http::BuildError::Tls(source), Some(path)) => BuildError::CaCert { path: path.clone(), source },
            (e, _) => BuildError::Client(e.to_string()),
        })?;
        let session = auth::Session::new(http.clone(), settings.credentials);
        let api = Api::new(http, session, settings.interface, settings.region, settings.page_size);
        let resolved = groups.iter().map(|(g, _)| (g.clone(), OnceCell::new())).collect();
        Ok(OpenStack {
            cluster: cluster.to_owned(),
            api,
            groups: groups.into_iter().collect(),
            resolved,
            pool_groups: Default::default(),
        })
    }

    fn group(&self, group: &str) -> Result<&GroupSettings> {
        self.groups.get(group).ok_or_else(|| Error::InvalidRequest(format!("group {group:?} is not on this cloud")))
    }

    async fn resolved(&self, group: &str) -> Result<&Resolved> {
        let settings = self.group(group)?;
        let cell = self.resolved.get(group).expect("one cell per group");
        cell.get_or_try_init(|| self.resolve(settings)).await
    }

    async fn resolve(&self, g: &GroupSettings) -> Result<Resolved> {
        let flavors = self.api.flavors().await?;
        let flavor = match flavors.iter().find(|f| f.id == g.flavor) {
            Some(f) => f.clone(),
            None => one_of(flavors.iter().filter(|f| f.name == g.flavor).cloned().collect(), "flavor", &g.flavor)?,
        };
        let gpus = gpus_of(&self.api.flavor_extra_specs(&flavor.id).await?);
        let image_id = if is_uuid(&g.image) {
            g.image.clone()
        } else {
            one_of(self.api.images_named(&g.image).await?, "image", &g.image)?
        };
        let mut network_ids = Vec::with_capacity(g.networks.len());
        for n in &g.networks {
            network_ids.push(if is_uuid(n) {
                n.clone()
            } else {
                one_of(self.api.networks_named(n).await?, "network", n)?
            });
        }
        let server_group_id = match &g.server_group {
            None => None,
            Some(sg) if is_uuid(sg) => Some(sg.clone()),
            Some(sg) => Some(one_of(self.api.server_groups_named(sg).await?, "server group", sg)?),
        };
        let mut ports = Vec::with_capacity(g.ports.len());
        for spec in &g.ports {
            let network_id = if is_uuid(&spec.network) {
                spec.network.clone()
            } else {
                one_of(self.api.networks_named(&spec.network).await?, "network", &spec.network)?
            };
            let mut security_group_ids = Vec::with_capacity(spec.security_groups.len());
            for sg in &spec.security_groups {
                security_group_ids.push(if is_uuid(sg) {
                    sg.clone()
                } else {
                    one_of(self.api.security_groups_named(sg).await?, "security group", sg)?
                });
            }
            ports.push(ResolvedPort { network_id, security_group_ids });
        }
        Ok(Resolved { flavor, gpus, image_id, network_ids, ports, server_group_id })
    }

    fn create_body(
        &self,
        group: &str,
        name: &str,
        g: &GroupSettings,
        r: &Resolved,
        port_ids: &[String],
        user_data: Option<String>,
    ) -> Value {
        let mut metadata: serde_json::Map<String, Value> =
            g.metadata.iter().map(|(k, v)| (k.clone(), Value::from(v.as_str()))).collect();
        metadata.insert(META_CLUSTER.into(), self.cluster.as_str().into());
        metadata.insert(META_GROUP.into(), group.into());
        let networks = if r.network_ids.is_empty() && port_ids.is_empty() {
            json!("auto")
        } else {
            let nets = r.network_ids.iter().map(|id| json!({ "uuid": id }));
            Value::Array(nets.chain(port_ids.iter().map(|id| json!({ "port": id }))).collect())
        };
        let mut server = json!({
            "name": name,
            "flavorRef": r.flavor.id,
            "networks": networks,
            "metadata": metadata,
        });
        match g.boot_volume_size {
            Some(size) => {
                server["block_device_mapping_v2"] = json!([{
                    "boot_index": 0,
                    "uuid": r.image_id,
                    "source_type": "image",
                    "destination_type": "volume",
                    "volume_size": size,
                    "delete_on_termination": true,
                }]);
            }
            None => server["imageRef"] = json!(r.image_id),
        }
        if !g.security_groups.is_empty() {
            server["security_groups"] = Value::Array(g.security_groups.iter().map(|n| json!({ "name": n })).collect());
        }
        if let Some(k) = &g.key_name {
            server["key_name"] = json!(k);
        }
        if let Some(az) = &g.availability_zone {
            server["availability_zone"] = json!(az);
        }
        if let Some(cd) = g.config_drive {
            server["config_drive"] = json!(cd);
        }
        if let Some(ud) = user_data {
            server["user_data"] = json!(base64::engine::general_purpose::STANDARD.encode(ud));
        }
        let mut body = json!({ "server": server });
        if let Some(sg) = &r.server_group_id {
            body["os:scheduler_hints"] = json!({ "group": sg });
        }
        body
    }

    /// The body of `POST /v2.0/ports` for port `index` of machine `name`.
    fn port_body(&self, group: &str, name: &str, index: usize, r: &ResolvedPort, spec: &PortSpec) -> Value {
        let mut port = json!({
            "network_id": r.network_id,
            // The name ties the port to its server for the delete; the description says whose.
            "name": format!("{name}-port{index}"),
            "description": format!("flotilla {}/{group}", self.cluster),
        });
        if !r.security_group_ids.is_empty() {
            port["security_groups"] = json!(r.security_group_ids);
        }
        if !spec.allowed_address_pairs.is_empty() {
            port["allowed_address_pairs"] =
                Value::Array(spec.allowed_address_pairs.iter().map(|a| json!({ "ip_address": a })).collect());
        }
        if let Some(ps) = spec.port_security {
            port["port_security_enabled"] = json!(ps);
        }
        json!({ "port": port })
    }

    /// Deletes ports made for machine `name`; one that cannot be deleted is left and logged.
    async fn delete_ports(&self, name: &str, ids: &[String]) {
        for id in ids {
            match self.api.delete_port(id).await {
                Ok(()) => {}
                Err(e) if e.status() == Some(404) => {}
                Err(e) => {
                    tracing::warn!(%name, port = %id, error = %e, "cannot delete a port made for this machine; it is left behind")
                }
            }
        }
    }

    /// Whether `metadata` marks a server as this cluster's (and, if given, this group's).
    fn owns(&self, metadata: &BTreeMap<String, String>, group: Option<&str>) -> bool {
        metadata.get(META_CLUSTER).is_some_and(|c| *c == self.cluster)
            && group.is_none_or(|g| metadata.get(META_GROUP).is_some_and(|m| m == g))
    }

    fn machine_of(&self, s: api::Server) -> Option<Machine> {
        if !self.owns(&s.metadata, None) {
            return None;
        }
        let group = s.metadata.get(META_GROUP)?.clone();
        let deleting = s.task_state.as_deref() == Some("deleting") || s.metadata.contains_key(META_DELETING);
        let pool = self.pool_groups.contains(&group);
        let state = match s.status.as_str() {
            _ if deleting => MachineState::Deleting,
            "DELETED" | "SOFT_DELETED" => MachineState::Deleting,
            "BUILD" => MachineState::Creating,
            "ERROR" => MachineState::Failed(failure_of(s.fault.as_ref())),
            // Warm pool: a stopped server, one Flotilla is stopping (only pool machines are
            // stopped), and one being started again (it boots).
            "SHUTOFF" if pool && s.task_state.as_deref() == Some("powering-on") => MachineState::Creating,
            "SHUTOFF" if pool => MachineState::Stopped,
            "ACTIVE" if pool && s.task_state.as_deref() == Some("powering-off") => MachineState::Stopped,
            // ACTIVE, and states a running machine passes through (REBOOT, SHUTOFF, ...):
            // the node's readiness tells cluster-autoscaler the rest.
            _ => MachineState::Running,
        };
        Some(Machine { group, name: s.name, id: s.id, state })
    }

    /// The server of `machine`, refusing one that does not carry this cluster's and group's marks.
    async fn owned_server(&self, machine: &MachineRef) -> Result<api::Server> {
        let server = self.api.get_server(&machine.id).await?;
        if !self.owns(&server.metadata, Some(&machine.group)) {
            return Err(Error::InvalidRequest(format!(
                "server {} is not marked as belonging to cluster {:?} group {:?}; refusing to touch it",
                machine.id, self.cluster, machine.group
            )));
        }
        Ok(server)
    }

    /// After a create whose answer was lost, removes any server Nova made of it anyway.
    async fn clean_up_lost_create(&self, group: &str, name: &str) {
        match self.api.servers_named(name).await {
            Ok(servers) => {
                for s in servers.into_iter().filter(|s| self.owns(&s.metadata, Some(group))) {
                    tracing::info!(%name, id = %s.id, "deleting the server of a create whose answer was lost");
                    if let Err(e) = self.api.delete_server(&s.id).await {
                        tracing::warn!(%name, id = %s.id, error = %e, "cannot delete it; it stays marked and shows up in listings");
                    }
                }
            }
            Err(e) => tracing::warn!(%name, error = %e, "cannot look for the server of a create whose answer was lost"),
        }
    }
}

/// The one item a name matched; none or several is an error.
fn one_of<T>(mut ids: Vec<T>, what: &str, name: &str) -> Result<T> {
    match ids.len() {
        0 => Err(Error::InvalidRequest(format!("no {what} named {name:?}"))),
        1 => Ok(ids.remove(0)),
        n => Err(Error::InvalidRequest(format!("{n} {what}s are named {name:?}; give its id instead"))),
    }
}

/// How cluster-autoscaler should see a server in ERROR.
///
/// Error codes: a failed create call gets the code of its error class (`OUT_OF_RESOURCES` for a
/// quota or capacity refusal, `INVALID_REQUEST`, `UNAVAILABLE`, ...: see
/// [`driver::Error::to_create_failure`](super::Error::to_create_failure)). A server Nova put in
/// ERROR gets the same code for the same cause (a quota or capacity fault is
/// `OUT_OF_RESOURCES`), and two codes for what only Nova's scheduler reports: `NO_VALID_HOST`
/// and `SERVER_ERROR` (any other fault).
fn failure_of(fault: Option<&api::Fault>) -> CreateFailure {
    let message = fault.map(|f| f.message.clone()).filter(|m| !m.is_empty());
    let text = message.as_deref().unwrap_or_default();
    let (class, code) = if text.to_ascii_lowercase().contains("no valid host") {
        (ErrorClass::OutOfResources, "NO_VALID_HOST")
    } else if api::mentions_quota(text) || api::mentions_no_capacity(text) {
        (ErrorClass::OutOfResources, "OUT_OF_RESOURCES")
    } else {
        (ErrorClass::Other, "SERVER_ERROR")
    };
    CreateFailure {
        class,
        code: code.into(),
        message: message.unwrap_or_else(|| "server is in ERROR state and Nova recorded no fault".into()),
    }
}

#[async_trait]
impl Driver for OpenStack {
    fn kind(&self) -> &'static str {
        "openstack"
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let servers = self.api.list_servers().await?;
        Ok(servers.into_iter().filter_map(|s| self.machine_of(s)).collect())
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        let settings = self.group(group)?;
        let resolved = self.resolved(group).await?;
        let user_data = match &settings.user_data {
            Some(ud) => Some(
                ud.render(userdata::Target { cluster: &self.cluster, group, name })
                    .await
                    .map_err(|e| Error::InvalidRequest(e.to_string()))?,
            ),
            None => None,
        };
        let mut port_ids = Vec::with_capacity(resolved.ports.len());
        for (i, port) in resolved.ports.iter().enumerate() {
            match self.api.create_port(&self.port_body(group, name, i, port, &settings.ports[i])).await {
                Ok(id) => port_ids.push(id),
                Err(e) => {
                    self.delete_ports(name, &port_ids).await;
                    return Err(e.into());
                }
            }
        }
        let body = self.create_body(group, name, settings, resolved, &port_ids, user_data);
        match self.api.create_server(&body).await {
            Ok(id) => Ok(Machine { group: group.to_owned(), name: name.to_owned(), id, state: MachineState::Creating }),
            Err(e) => {
                // Nova may have made the server although its answer never came back.
                if matches!(&e, api::Error::Http(h) if h.may_have_acted()) {
                    self.clean_up_lost_create(group, name).await;
                }
                self.delete_ports(name, &port_ids).await;
                Err(e.into())
            }
        }
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let server = self.owned_server(machine).await?;
        if server.task_state.as_deref() == Some("deleting") {
            // An earlier delete is under way; asking again changes nothing.
            return Ok(());
        }
        // Nova deletes only the ports it made itself; the ones made for this server go after it.
        let ports = if self.groups.get(&machine.group).is_some_and(|g| !g.ports.is_empty()) {
            let prefix = format!("{}-port", server.name);
            self.api
                .ports_of(&machine.id)
                .await?
                .into_iter()
                .filter(|(_, n)| n.starts_with(&prefix))
                .map(|(id, _)| id)
                .collect()
        } else {
            Vec::new()
        };
        self.api.delete_server(&machine.id).await?;
        self.delete_ports(&server.name, &ports).await;
        Ok(())
    }

    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        Ok(self.api.set_server_metadata_item(&machine.id, META_DELETING, "true").await?)
    }

    fn can_stop(&self) -> bool {
        true
    }

    /// `os-stop`. A 409 from a server already stopped or stopping (a repeated stop) is done.
    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        let server = self.owned_server(machine).await?;
        if server.status == "SHUTOFF" || server.task_state.as_deref() == Some("powering-off") {
            return Ok(());
        }
        match self.api.server_action(&machine.id, "os-stop").await {
            Ok(()) => Ok(()),
            Err(e) if e.status() == Some(409) => {
                let now = self.api.get_server(&machine.id).await?;
                if now.status == "SHUTOFF" || now.task_state.as_deref() == Some("powering-off") {
                    Ok(())
                } else {
                    Err(e.into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// `os-start`; the server boots and is listed Creating, then Running once ACTIVE. A server
    /// still powering off (its stop was accepted moments ago) is waited for: Nova refuses to
    /// start it until it is SHUTOFF.
    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        let mut server = self.owned_server(machine).await?;
        while server.task_state.as_deref() == Some("powering-off") {
            tokio::time::sleep(POWER_POLL).await;
            server = self.owned_server(machine).await?;
        }
        let starting = Machine {
            group: machine.group.clone(),
            name: server.name.clone(),
            id: server.id.clone(),
            state: MachineState::Creating,
        };
        if server.status == "ACTIVE" || server.task_state.as_deref() == Some("powering-on") {
            return Ok(starting);
        }
        if server.status != "SHUTOFF" {
            return Err(Error::InvalidRequest(format!(
                "server {} is {} and cannot be started",
                machine.id, server.status
            )));
        }
        match self.api.server_action(&machine.id, "os-start").await {
            Ok(()) => Ok(starting),
            Err(e) if e.status() == Some(409) => {
                let now = self.api.get_server(&machine.id).await?;
                if now.status == "ACTIVE" || now.task_state.as_deref() == Some("powering-on") {
                    Ok(starting)
                } else {
                    Err(e.into())
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let settings = self.group(group)?;
        let r = self.resolved(group).await?;
        let disk_gib = settings.boot_volume_size.map(u64::from).unwrap_or(r.flavor.disk);
        Ok(Some(Shape {
            cpu_millis: Some(r.flavor.vcpus * 1000),
            memory_bytes: Some(r.flavor.ram << 20),
            ephemeral_storage_bytes: (disk_gib > 0).then_some(disk_gib << 30),
            gpus: (r.gpus > 0).then_some(r.gpus),
            instance_type: Some(r.flavor.name.clone()),
            arch: None,
        }))
    }

    async fn check(&self) -> Result<()> {
        self.api.authenticate().await?;
        Ok(())
    }
}
