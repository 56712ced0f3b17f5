//! The Slicer driver's configuration keys, read and checked completely (every problem at once).
//!
//! `[clouds.NAME]`: `url`, `allow_plain_http`, `token` (secret), `ca_file`, `request_timeout`,
//! `k3s_url`, `k3s_token` (secret), `token_secret`, `capacity_errors`.
//!
//! `[groups.G.machine]`: `host_group`, `cpus`, `ram`, `gpu_count`, `persistent` (required by a
//! warm pool), `ssh_keys`,
//! `import_user`, `tags`, `userdata` (inline template) or `userdata_template` (file),
//! `template_data`, `k3s_version`, `k3s_args`.

use std::time::Duration;

use super::userdata::{self, UserData};
use super::{TAG_CLUSTER, TAG_GROUP, TAG_NAME};
use crate::config::{GroupConfig, Problems, Secret, Section};
use crate::driver::http;
use crate::driver::script::{self, Template};

/// Long enough for a create on a host whose storage copies a whole disk image.
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Lower-case phrases of the daemon's create errors that mean the host has no room left. The
/// daemon's wording is not published (it is closed source; its OpenAPI documents only "400
/// Invalid input or limits exceeded"), so these are the usual ways of saying so, and
/// `capacity_errors` adds more.
pub const CAPACITY_PHRASES: &[&str] = &[
    "no free",
    "no available",
    "exhausted",
    "insufficient",
    "capacity",
    "out of memory",
    "not enough",
    "no space left",
    "maximum number of",
];

/// Settings of one `[clouds.NAME]` table.
#[derive(Clone, Debug)]
pub struct CloudSettings {
    /// The API's base URL, without a trailing slash.
    pub url: String,
    /// `http://` to a host that is not loopback, opted in by the user.
    pub allow_plain_http: bool,
    /// Bearer token; `None` for a daemon with API auth disabled.
    pub token: Option<Secret>,
    /// Whom to trust for `https://`: the public roots, or the `ca_file` bundle.
    pub trust: http::Trust,
    pub request_timeout: Duration,
    pub k3s_url: String,
    pub k3s_token: Secret,
    /// The Slicer secret the join token is stored as.
    pub token_secret: String,
    /// Lower-case phrases meaning "out of capacity": [`CAPACITY_PHRASES`] plus the configured ones.
    pub capacity_errors: Vec<String>,
}

/// Names the daemon stores as files under its secrets folder.
fn is_secret_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

/// A host group name that makes hostnames (`<host group>-N`) valid Kubernetes node names.
fn is_host_group(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 50
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

impl CloudSettings {
    pub fn parse(cluster: &str, s: &mut Section<'_>, p: &mut Problems) -> Option<CloudSettings> {
        let before = p.items.len();
        let url = s.required_string("url", p).map(|u| u.trim_end_matches('/').to_owned());
        let allow_plain_http = s.boolean("allow_plain_http", p).unwrap_or(false);
        if let Some(u) = &url
            && let Err(e) = http::check_url(u, allow_plain_http)
        {
            let hint =
                if matches!(e, http::UrlError::PlainHttp { .. }) { " (allow_plain_http = true opts in)" } else { "" };
            p.push(s.key_path("url"), format!("{e}{hint}"));
        }
        let token = s.secret("token", p);
        let trust = match s.string("ca_file", p) {
            None => http::Trust::PublicRoots,
            Some(file) => match std::fs::read(p.resolve(&file)) {
                Ok(pem) => http::Trust::CaPem(pem),
                Err(e) => {
                    p.push(s.key_path("ca_file"), format!("cannot read {file}: {e}"));
                    http::Trust::PublicRoots
                }
            },
        };
        let request_timeout = s.duration("request_timeout", p).unwrap_or(DEFAULT_REQUEST_TIMEOUT);
        if request_timeout.is_zero() {
            p.push(s.key_path("request_timeout"), "must be longer than zero");
        }
        let k3s_url = s.required_string("k3s_url", p);
        if let Some(u) = &k3s_url
            && !u.starts_with("https://")
        {
            // k3s's install script refuses anything else.
            p.push(s.key_path("k3s_url"), format!("{u:?} must be an https:// URL of the k3s server"));
        }
        let k3s_token = s.secret("k3s_token", p);
        if !s.contains("k3s_token") {
            p.push(s.key_path("k3s_token"), "is required (the k3s join token, as { file = ... } or { env = ... })");
        }
        if k3s_token.as_ref().is_some_and(|t| t.expose().trim().is_empty()) {
            p.push(s.key_path("k3s_token"), "is empty");
        }
        let token_secret = s.string("token_secret", p).unwrap_or_else(|| format!("flotilla-{cluster}-k3s-token"));
        if !is_secret_name(&token_secret) {
            p.push(
                s.key_path("token_secret"),
                format!(
                    "{token_secret:?} is not a secret name (letters, digits, '-', '_', '.'; not starting with '.')"
                ),
            );
        }
        let mut capacity_errors: Vec<String> = CAPACITY_PHRASES.iter().map(|c| (*c).to_owned()).collect();
        for phrase in s.string_list("capacity_errors", p) {
            if phrase.trim().is_empty() {
                p.push(s.key_path("capacity_errors"), "contains an empty phrase, which would match every error");
            } else {
                capacity_errors.push(phrase.to_lowercase());
            }
        }
        if p.items.len() > before {
            return None;
        }
        Some(CloudSettings {
            url: url?,
            allow_plain_http,
            token,
            trust,
            request_timeout,
            k3s_url: k3s_url?,
            k3s_token: k3s_token?,
            token_secret,
            capacity_errors,
        })
    }
}

/// Settings of one group's `machine` table.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    pub host_group: String,
    /// Smaller than the host group's, or `None` for its default.
    pub cpus: Option<u32>,
    pub ram_bytes: Option<u64>,
    pub gpu_count: Option<u32>,
    pub persistent: bool,
    /// The group keeps a warm pool: its `Stopped` VMs are pool machines.
    pub warm_pool: bool,
    pub ssh_keys: Vec<String>,
    pub import_user: Option<String>,
    /// Extra tags, besides Flotilla's own.
    pub tags: Vec<String>,
    pub userdata: UserData,
}

impl GroupSettings {
    /// Reads a group's `machine` table; `group` is the group's core configuration (its template
    /// labels and taints are what the agent registers with). `None` if anything is wrong.
    pub fn parse(
        cluster: &str,
        region: &str,
        group: &GroupConfig,
        s: &mut Section<'_>,
        p: &mut Problems,
    ) -> Option<GroupSettings> {
        let before = p.items.len();
        let host_group = s.string("host_group", p).unwrap_or_else(|| group.name.clone());
        if !is_host_group(&host_group) {
            p.push(
                s.key_path("host_group"),
                format!(
                    "{host_group:?} cannot name nodes: Slicer names VMs <host group>-N and the node takes that name, \
                     so it must be lower-case letters, digits and '-'"
                ),
            );
        }
        let cpus = s.integer::<u32>("cpus", p);
        if cpus == Some(0) {
            p.push(s.key_path("cpus"), "must be at least 1");
        }
        let ram_bytes = s.bytes("ram", p);
        if ram_bytes == Some(0) {
            p.push(s.key_path("ram"), "must be more than zero");
        }
        let gpu_count = s.integer::<u32>("gpu_count", p);
        let persistent = s.boolean("persistent", p).unwrap_or(false);
        if group.warm_pool > 0 && !persistent {
            p.push(
                s.key_path("persistent"),
                format!(
                    "must be true for groups.{}.warm_pool: Slicer relaunches only a persistent VM (an ephemeral \
                     one is gone once it stops)",
                    group.name
                ),
            );
        }
        let ssh_keys = s.string_list("ssh_keys", p);
        let import_user = s.string("import_user", p);
        let tags = s.string_list("tags", p);
        for t in &tags {
            if [TAG_CLUSTER, TAG_GROUP, TAG_NAME].iter().any(|own| t.starts_with(&format!("{own}="))) {
                p.push(s.key_path("tags"), format!("{t:?}: tags starting with \"flotilla-\" are set by Flotilla"));
            } else if t.starts_with("name=") {
                // The daemon treats `name=` as a unique, immutable friendly name.
                p.push(s.key_path("tags"), format!("{t:?}: a name= tag would be shared by every VM of the group"));
            }
        }
        // The default script unless the group brings its own.
        let default_script = !userdata::KEYS.given(s);
        let template = Template::read(s, &userdata::KEYS, p);
        let template_data = script::template_data(s, userdata::RESERVED, p);
        let k3s_version = s.string("k3s_version", p);
        let k3s_args = s.string_list("k3s_args", p);
        for arg in &k3s_args {
            if arg.starts_with("--with-node-id") || arg.starts_with("--node-name") {
                p.push(
                    s.key_path("k3s_args"),
                    format!("{arg:?} would change the node name, and the node would no longer match its provider id"),
                );
            }
        }
        // The agent registers with the template's labels and taints, so the node matches the
        // template cluster-autoscaler plans with.
        let t = &group.template;
        let mut labels = t.labels.clone();
        // Unless configured, the instance type is the host group (the driver's shape says the
        // same), which keeps k3s's cloud controller from labelling the node plain "k3s".
        let instance_type = Some(t.instance_type.clone().unwrap_or_else(|| host_group.clone()));
        let well_known = [
            ("node.kubernetes.io/instance-type", &instance_type),
            ("topology.kubernetes.io/zone", &t.zone),
            ("topology.kubernetes.io/region", &t.region),
        ];
        for (k, v) in well_known {
            if let Some(v) = v {
                labels.entry(k.to_owned()).or_insert_with(|| v.clone());
            }
        }
        let template_path = format!("groups.{}.template.labels", group.name);
        // The default script hands them to the kubelet; a template of the user's own may not.
        for k in labels.keys() {
            if default_script && !userdata::kubelet_may_set(k) {
                p.push(
                    format!("{template_path}.{k}"),
                    "the kubelet may not set this label on its own node (NodeRestriction), so k3s would not \
                     start; use a label outside kubernetes.io and k8s.io, or node.kubernetes.io/...",
                );
            }
        }
        let node_labels = labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let node_taints = t.taints.iter().map(|x| format!("{}={}:{}", x.key, x.value, x.effect)).collect();
        let template = template.or_else(|| default_script.then(|| userdata::default_template(s.path())));
        let userdata = template.map(|template| UserData {
            template,
            data: template_data,
            k3s_version,
            k3s_args,
            node_labels,
            node_taints,
            provider_id: group.provider_id.clone(),
        });
        if let Some(userdata) = &userdata {
            // A trial render catches syntax errors and misspelt variables before any VM boots
            // with a broken script.
            let name = format!("{}-check", group.name_prefix);
            let trial = userdata::Target {
                cluster,
                group: &group.name,
                region,
                host_group: &host_group,
                name: &name,
                k3s_url: "https://k3s.invalid:6443",
                token_secret: "check",
            };
            userdata.check(trial, p);
        }
        if p.items.len() > before {
            return None;
        }
        Some(GroupSettings {
            host_group,
            cpus,
            ram_bytes,
            gpu_count,
            persistent,
            warm_pool: group.warm_pool > 0,
            ssh_keys,
            import_user,
            tags,
            userdata: userdata?,
        })
    }
}
