//! Configuration: one TOML file, read completely, every problem reported at once.
//!
//! The core reads the keys it owns (server, state, clouds' generic keys, groups); each driver
//! reads its own keys from the same tables with [`Section`] (see `driver::build`), so a typo in a
//! driver key is reported with its full path just like one in a core key.

use std::{collections::BTreeMap, fmt, net::SocketAddr, path::Path, time::Duration};

mod incluster;
mod reader;
mod tls;

pub use incluster::{LeaderElectionConfig, PriorityExpanderConfig};
pub use reader::{Problem, Problems, Section};

use crate::{kube, provider_id::ProviderIdFormat};

/// The configuration `flotilla serve` runs with when no file is given: the simulated cloud.
pub const EMBEDDED_DEFAULT: &str = include_str!("../../examples/simulated.toml");

/// A secret value (token, password). Never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: String) -> Self {
        Secret(value)
    }

    /// The secret itself, for the one place that sends it to a cloud.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The whole, checked configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Where it came from, for messages.
    pub source: String,
    pub cluster_name: String,
    pub server: ServerConfig,
    pub log: LogConfig,
    pub state: StateConfig,
    pub gpu: GpuConfig,
    pub clouds: Vec<CloudConfig>,
    pub groups: Vec<GroupConfig>,
    /// `[kubernetes]`: how the API is reached (kubeconfig or the pod's service account).
    pub kubernetes: kube::Settings,
    /// The one Kubernetes API client, built from `kubernetes` without any I/O (it connects at
    /// its first call). Drivers and the core share it: one set-up, one token cache.
    pub kube: kube::Client,
    pub leader_election: LeaderElectionConfig,
    /// `None` unless `[priority_expander]` is present.
    pub priority_expander: Option<PriorityExpanderConfig>,
    /// The parsed file, kept so drivers can read their own keys.
    pub raw: toml::Table,
    /// Directory relative paths are resolved against.
    pub base_dir: std::path::PathBuf,
}

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub grpc_listen: SocketAddr,
    /// `None` disables the HTTP endpoint (health, metrics).
    pub http_listen: Option<SocketAddr>,
    pub tls: Option<TlsConfig>,
    /// How long shutdown waits for in-flight creates and deletes.
    pub shutdown_grace: Duration,
}

/// Mutual TLS for the gRPC listener: cluster-autoscaler always presents a client certificate
/// when it is configured for TLS, so a client CA is required.
#[derive(Clone, Debug)]
pub struct TlsConfig {
    pub cert_file: std::path::PathBuf,
    pub key_file: std::path::PathBuf,
    pub client_ca_file: std::path::PathBuf,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Clone, Debug)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A `tracing` filter, e.g. `info` or `flotilla=debug,info`.
    pub level: String,
}

/// How fresh Flotilla keeps its picture of the clouds.
#[derive(Clone, Debug)]
pub struct StateConfig {
    /// How long `Refresh` waits for a cloud listing before answering from the last known state
    /// (cluster-autoscaler's own deadline is 5 s by default).
    pub refresh_timeout: Duration,
    /// The bound on stale state: while every cloud's last successful listing is younger than
    /// this, a failed or slow listing does not fail `Refresh`; past it, `Refresh` returns
    /// UNAVAILABLE so cluster-autoscaler stops acting on a picture it cannot trust.
    pub max_staleness: Duration,
    /// How often the background loop lists each cloud when cluster-autoscaler does not call
    /// `Refresh` (keeps metrics and readiness true on their own).
    pub reconcile_interval: Duration,
}

#[derive(Clone, Debug, Default)]
pub struct GpuConfig {
    /// The node label cluster-autoscaler reads GPU types from (`GPULabel`).
    pub label: String,
    /// Extra GPU types to advertise beside the ones group templates name.
    pub types: Vec<String>,
}

/// One cloud account and the driver that talks to it.
#[derive(Clone, Debug)]
pub struct CloudConfig {
    pub name: String,
    pub driver: String,
    /// How many creates may run at once on this cloud.
    pub create_concurrency: usize,
    pub delete_concurrency: usize,
    /// A create still running after this fails (class Other).
    pub create_timeout: Duration,
    pub delete_timeout: Duration,
    /// Substituted for `{region}` in provider ids.
    pub region: String,
    /// Delete the Node of each machine Flotilla deleted, once the cloud confirms it gone.
    pub node_cleanup: bool,
}

/// The largest `max_size` a group may have: far beyond any cluster Kubernetes supports, and
/// small enough that a caller's IncreaseSize can never make Flotilla reserve unbounded memory.
pub const MAX_GROUP_SIZE: i32 = 10_000;

/// The most creates (or deletes) that may run at once on one cloud.
pub const MAX_CONCURRENCY: i64 = 1024;

/// Keys of a `[clouds.NAME]` table that the core reads; the driver reads the rest.
pub const CLOUD_KEYS: &[&str] = &[
    "driver",
    "create_concurrency",
    "delete_concurrency",
    "create_timeout",
    "delete_timeout",
    "region",
    "node_cleanup",
];

/// One node group.
#[derive(Clone, Debug)]
pub struct GroupConfig {
    pub name: String,
    pub cloud: String,
    pub min_size: i32,
    pub max_size: i32,
    /// Machine names are `<name_prefix>-<random>`.
    pub name_prefix: String,
    pub provider_id: ProviderIdFormat,
    pub price_per_hour: Option<f64>,
    /// cluster-autoscaler priority-expander priority (higher is tried first).
    pub priority: Option<u32>,
    /// Keep up to this many machines stopped instead of deleting them, and start them first on
    /// scale-up (0: no warm pool).
    pub warm_pool: u32,
    pub template: TemplateConfig,
    pub options: OptionsConfig,
}

/// What the template node of a group advertises. Unset fields come from the driver's
/// [`Shape`](crate::driver::Shape), then from defaults.
#[derive(Clone, Debug, Default)]
pub struct TemplateConfig {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub ephemeral_storage_bytes: Option<u64>,
    pub pods: Option<u64>,
    pub gpus: Option<u64>,
    pub gpu_type: Option<String>,
    pub gpu_resource: String,
    pub instance_type: Option<String>,
    pub zone: Option<String>,
    pub region: Option<String>,
    /// `None`: the driver's shape says, else `amd64`.
    pub arch: Option<String>,
    pub os: String,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
    /// Subtracted from capacity to give allocatable (kube-reserved + system-reserved).
    pub reserved_cpu_millis: u64,
    pub reserved_memory_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Taint {
    pub key: String,
    pub value: String,
    pub effect: String,
}

/// Per-group overrides of cluster-autoscaler's options; `None` keeps CA's default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct OptionsConfig {
    pub scale_down_utilization_threshold: Option<f64>,
    pub scale_down_gpu_utilization_threshold: Option<f64>,
    pub scale_down_unneeded_time: Option<Duration>,
    pub scale_down_unready_time: Option<Duration>,
    pub max_node_provision_time: Option<Duration>,
    pub zero_or_max_node_scaling: Option<bool>,
    pub ignore_daemonsets_utilization: Option<bool>,
}

impl OptionsConfig {
    /// True when the group overrides nothing (GetOptions then answers UNIMPLEMENTED).
    pub fn is_empty(&self) -> bool {
        *self == OptionsConfig::default()
    }
}

impl Config {
    /// The embedded default (the simulated cloud).
    pub fn embedded() -> Config {
        Config::parse(EMBEDDED_DEFAULT, "<embedded simulated.toml>", Path::new("."))
            .expect("the embedded configuration is checked by a test")
    }

    /// Parses and checks configuration text; `source` names it in messages.
    pub fn parse(text: &str, source: &str, base_dir: &Path) -> Result<Config, Problems> {
        let (config, problems) = Config::parse_partial(text, source, base_dir);
        match config {
            Some(c) if problems.is_empty() => Ok(c),
            _ => Err(problems),
        }
    }

    /// Parses as much as it can: the configuration (with placeholders where values were bad)
    /// whenever the text is TOML at all, and every problem found. Lets drivers check their own
    /// keys even when core keys are wrong, so one run lists everything.
    pub fn parse_partial(text: &str, source: &str, base_dir: &Path) -> (Option<Config>, Problems) {
        let mut p = Problems::new(source, base_dir);
        let raw: toml::Table = match text.parse() {
            Ok(t) => t,
            Err(e) => {
                let at = e.span().map(|span| {
                    let (line, column) = line_and_column(text, span.start);
                    format!(" (line {line}, column {column})")
                });
                p.push("", format!("not valid TOML{}: {}", at.unwrap_or_default(), e.message().trim_end()));
                return (None, p);
            }
        };
        let mut config = parse_root(&raw, &mut p);
        config.source = source.to_owned();
        config.raw = raw;
        config.base_dir = base_dir.to_owned();
        (Some(config), p)
    }

    pub fn group(&self, name: &str) -> Option<&GroupConfig> {
        self.groups.iter().find(|g| g.name == name)
    }
}

fn parse_root(raw: &toml::Table, p: &mut Problems) -> Config {
    let mut root = Section::new("", raw);
    let cluster_name = root.required_string("cluster_name", p);
    if cluster_name.as_deref().is_some_and(|name| !is_dns_label(name)) {
        p.push("cluster_name", "must be a DNS label: lower-case letters, digits and '-', at most 40 characters");
    }

    let server = parse_server(root.section("server", p), p);
    let log = parse_log(root.section("log", p), p);
    let state = parse_state(root.section("state", p), p);
    let gpu = match root.section("gpu", p) {
        Some(mut s) => {
            let g = GpuConfig { label: s.string("label", p).unwrap_or_default(), types: s.string_list("types", p) };
            s.finish(p);
            g
        }
        None => GpuConfig::default(),
    };

    let mut clouds = Vec::new();
    for (name, mut s) in root.named_sections("clouds", p) {
        clouds.push(parse_cloud(name, &mut s, p));
        // The driver reads (and checks) the remaining keys.
    }
    if clouds.is_empty() {
        p.push("clouds", "at least one cloud is required, e.g. [clouds.sim] driver = \"simulated\"");
    }

    let cluster = cluster_name.clone().unwrap_or_default();
    let kubernetes = incluster::parse_kubernetes(root.section("kubernetes", p), p);
    let leader_election = incluster::parse_leader_election(root.section("leader_election", p), &cluster, p);
    let priority_expander = incluster::parse_priority_expander(root.section("priority_expander", p), p);
    let mut groups = Vec::new();
    for (name, mut s) in root.named_sections("groups", p) {
        if let Some(g) = parse_group(name, &mut s, &cluster, &clouds, p) {
            groups.push(g);
        }
        s.finish(p);
    }
    if groups.is_empty() && !root.contains("groups") {
        p.push("groups", "at least one node group is required, e.g. [groups.workers]");
    }
    if priority_expander.is_some() && !groups.is_empty() && groups.iter().all(|g| g.priority.is_none()) {
        p.push("priority_expander", "no group declares a priority (groups.NAME.priority)");
    }
    root.finish(p);

    Config {
        source: String::new(),
        cluster_name: cluster_name.unwrap_or_default(),
        server,
        log,
        state,
        gpu,
        clouds,
        groups,
        kube: kube::Client::new(kubernetes.clone()),
        kubernetes,
        leader_election,
        priority_expander,
        raw: toml::Table::new(),
        base_dir: Default::default(),
    }
}

/// 1-based line and column (in characters) of a byte offset in `text`.
fn line_and_column(text: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let before = &text[..end];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    (line, column)
}

/// Kubernetes DNS-1123 label, kept short so generated names stay under 63 characters.
fn is_dns_label(s: &str) -> bool {
    is_dns_label_of(s, 40)
}

/// A DNS-1123 label of at most `max` characters.
fn is_dns_label_of(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

fn parse_addr(s: &mut Section<'_>, key: &'static str, default: &str, p: &mut Problems) -> SocketAddr {
    let text = s.string(key, p).unwrap_or_else(|| default.to_owned());
    text.parse().unwrap_or_else(|_| {
        p.push(s.key_path(key), format!("{text:?} is not an address like 127.0.0.1:8086"));
        default.parse().expect("defaults are valid addresses")
    })
}

fn parse_server(section: Option<Section<'_>>, p: &mut Problems) -> ServerConfig {
    let empty = toml::Table::new();
    let mut s = section.unwrap_or_else(|| Section::new("server", &empty));
    let grpc_listen = parse_addr(&mut s, "grpc_listen", "127.0.0.1:8086", p);
    let http_listen = if s.contains("http_listen") {
        match s.string("http_listen", p).as_deref() {
            Some("") | Some("off") => None,
            Some(text) => match text.parse() {
                Ok(a) => Some(a),
                Err(_) => {
                    p.push(
                        "server.http_listen",
                        format!("{text:?} is not an address like 127.0.0.1:8087 (or \"off\")"),
                    );
                    None
                }
            },
            None => None,
        }
    } else {
        Some("127.0.0.1:8087".parse().expect("valid literal"))
    };
    let shutdown_grace = s.duration("shutdown_grace", p).unwrap_or(Duration::from_secs(30));
    let tls = s.section("tls", p).and_then(|mut t| {
        let mut file = |key: &'static str, p: &mut Problems| {
            let path = t.required_string(key, p)?;
            let resolved = p.resolve(&path);
            if !resolved.is_file() {
                p.push(t.key_path(key), format!("{} does not exist", resolved.display()));
                return None;
            }
            Some(resolved)
        };
        let cert_file = file("cert_file", p);
        let key_file = file("key_file", p);
        let client_ca_file = file("client_ca_file", p);
        let path = t.path().to_owned();
        t.finish(p);
        let tls = TlsConfig { cert_file: cert_file?, key_file: key_file?, client_ca_file: client_ca_file? };
        tls::check(&tls, &path, p);
        Some(tls)
    });
    s.finish(p);
    ServerConfig { grpc_listen, http_listen, tls, shutdown_grace }
}

fn parse_log(section: Option<Section<'_>>, p: &mut Problems) -> LogConfig {
    let empty = toml::Table::new();
    let mut s = section.unwrap_or_else(|| Section::new("log", &empty));
    let format = match s.string("format", p).as_deref() {
        None | Some("text") => LogFormat::Text,
        Some("json") => LogFormat::Json,
        Some(other) => {
            p.push("log.format", format!("{other:?} is not one of \"text\", \"json\""));
            LogFormat::Text
        }
    };
    let level = s.string("level", p).unwrap_or_else(|| "info".to_owned());
    s.finish(p);
    LogConfig { format, level }
}

fn parse_state(section: Option<Section<'_>>, p: &mut Problems) -> StateConfig {
    let empty = toml::Table::new();
    let mut s = section.unwrap_or_else(|| Section::new("state", &empty));
    let c = StateConfig {
        refresh_timeout: s.duration("refresh_timeout", p).unwrap_or(Duration::from_secs(3)),
        max_staleness: s.duration("max_staleness", p).unwrap_or(Duration::from_secs(60)),
        reconcile_interval: s.duration("reconcile_interval", p).unwrap_or(Duration::from_secs(30)),
    };
    for (key, value) in [("refresh_timeout", c.refresh_timeout), ("reconcile_interval", c.reconcile_interval)] {
        if value.is_zero() {
            p.push(format!("state.{key}"), "must be longer than zero");
        }
    }
    if c.max_staleness < c.refresh_timeout {
        p.push("state.max_staleness", "must be at least state.refresh_timeout");
    }
    s.finish(p);
    c
}

fn parse_cloud(name: &str, s: &mut Section<'_>, p: &mut Problems) -> CloudConfig {
    let driver = s.required_string("driver", p).unwrap_or_default();
    let concurrency = |s: &mut Section<'_>, key: &'static str, p: &mut Problems| match s.integer::<i64>(key, p) {
        Some(n @ 1..=MAX_CONCURRENCY) => n as usize,
        Some(n) => {
            p.push(s.key_path(key), format!("{n} is not between 1 and {MAX_CONCURRENCY}"));
            8
        }
        None => 8,
    };
    let create_concurrency = concurrency(s, "create_concurrency", p);
    let delete_concurrency = concurrency(s, "delete_concurrency", p);
    let mut timeout = |key: &'static str, default: Duration, p: &mut Problems| {
        let d = s.duration(key, p).unwrap_or(default);
        if d.is_zero() {
            p.push(s.key_path(key), "must be longer than zero (every call would time out at once)");
        }
        d
    };
    let create_timeout = timeout("create_timeout", Duration::from_secs(15 * 60), p);
    let delete_timeout = timeout("delete_timeout", Duration::from_secs(5 * 60), p);
    CloudConfig {
        name: name.to_owned(),
        driver,
        create_concurrency,
        delete_concurrency,
        create_timeout,
        delete_timeout,
        region: s.string("region", p).unwrap_or_else(|| name.to_owned()),
        node_cleanup: s.boolean("node_cleanup", p).unwrap_or(false),
    }
}

fn parse_group(
    name: &str,
    s: &mut Section<'_>,
    cluster: &str,
    clouds: &[CloudConfig],
    p: &mut Problems,
) -> Option<GroupConfig> {
    if !is_dns_label(name) {
        p.push(
            s.path().to_owned(),
            "a group name must be a DNS label: lower-case letters, digits and '-', at most 40 characters",
        );
    }
    let cloud = s.required_string("cloud", p);
    let cloud_config = cloud.as_ref().and_then(|c| clouds.iter().find(|x| &x.name == c));
    if let (Some(c), None) = (&cloud, cloud_config) {
        let known: Vec<_> = clouds.iter().map(|c| c.name.as_str()).collect();
        p.push(s.key_path("cloud"), format!("no cloud named {c:?} (configured: {})", known.join(", ")));
    }
    let min_size: i32 = s.integer("min_size", p).unwrap_or(0);
    let max_size: Option<i32> = s.integer("max_size", p);
    if !s.contains("max_size") {
        p.push(s.key_path("max_size"), "is required");
    }
    if min_size < 0 {
        p.push(s.key_path("min_size"), "must not be negative");
    }
    if min_size > MAX_GROUP_SIZE {
        p.push(s.key_path("min_size"), format!("{min_size} is more than the most a group may have, {MAX_GROUP_SIZE}"));
    }
    if let Some(max) = max_size.filter(|max| *max > MAX_GROUP_SIZE) {
        p.push(
            s.key_path("max_size"),
            format!("{max} is too large: a group may have at most {MAX_GROUP_SIZE} machines"),
        );
    }
    if let Some(max) = max_size.filter(|max| *max < min_size) {
        p.push(s.key_path("max_size"), format!("{max} is below min_size {min_size}"));
    }
    let name_prefix = s.string("name_prefix", p).unwrap_or_else(|| format!("{cluster}-{name}"));
    if !is_dns_label(&name_prefix) && p.items.iter().all(|i| i.path != "cluster_name") {
        p.push(s.key_path("name_prefix"), "must be a DNS label of at most 40 characters");
    }
    let default_format = cloud_config.map(|c| crate::driver::default_provider_id(&c.driver)).unwrap_or("{name}");
    let format_text = s.string("provider_id", p).unwrap_or_else(|| default_format.to_owned());
    let provider_id = match ProviderIdFormat::parse(&format_text) {
        Ok(f) => Some(f),
        Err(e) => {
            p.push(s.key_path("provider_id"), e);
            None
        }
    };
    let price_per_hour = s.float("price_per_hour", p);
    if price_per_hour.is_some_and(|v| v < 0.0) {
        p.push(s.key_path("price_per_hour"), "must not be negative");
    }
    let priority = s.integer("priority", p);
    let warm_pool: u32 = s.integer("warm_pool", p).unwrap_or(0);
    if warm_pool > 10_000 {
        p.push(s.key_path("warm_pool"), "must be at most 10000");
    }
    if warm_pool > 0 && cloud_config.is_some_and(|c| !c.node_cleanup) {
        p.push(
            s.key_path("warm_pool"),
            format!(
                "needs node_cleanup = true on cloud {:?}: the Node of a stopped machine would otherwise stay NotReady, \
                 and cluster-autoscaler counts unready Nodes against the cluster's health",
                cloud.as_deref().unwrap_or_default()
            ),
        );
    }
    let template = parse_template(s.section("template", p), s.path(), p);
    let options = parse_options(s.section("options", p), p);
    // The driver reads and checks `machine`.
    s.ignore("machine");

    Some(GroupConfig {
        name: name.to_owned(),
        cloud: cloud?,
        min_size,
        max_size: max_size?,
        name_prefix,
        provider_id: provider_id?,
        price_per_hour,
        priority,
        warm_pool,
        template,
        options,
    })
}

const TAINT_EFFECTS: &[&str] = &["NoSchedule", "PreferNoSchedule", "NoExecute"];

fn parse_template(section: Option<Section<'_>>, group_path: &str, p: &mut Problems) -> TemplateConfig {
    let Some(mut s) = section else {
        return TemplateConfig { gpu_resource: "nvidia.com/gpu".into(), os: "linux".into(), ..Default::default() };
    };
    let mut t = TemplateConfig {
        cpu_millis: s.cpu("cpu", p),
        memory_bytes: s.bytes("memory", p),
        ephemeral_storage_bytes: s.bytes("ephemeral_storage", p),
        pods: s.integer("pods", p),
        gpus: s.integer("gpus", p),
        gpu_type: s.string("gpu_type", p),
        gpu_resource: s.string("gpu_resource", p).unwrap_or_else(|| "nvidia.com/gpu".into()),
        instance_type: s.string("instance_type", p),
        zone: s.string("zone", p),
        region: s.string("region", p),
        arch: s.string("arch", p),
        os: s.string("os", p).unwrap_or_else(|| "linux".into()),
        labels: s.string_map("labels", p),
        taints: Vec::new(),
        reserved_cpu_millis: 0,
        reserved_memory_bytes: 0,
    };
    if t.pods == Some(0) {
        p.push(format!("{group_path}.template.pods"), "must be at least 1");
    }
    for mut taint in s.array_of_sections("taints", p) {
        let key = taint.required_string("key", p);
        let value = taint.string("value", p).unwrap_or_default();
        let effect = taint.string("effect", p).unwrap_or_else(|| "NoSchedule".into());
        if !TAINT_EFFECTS.contains(&effect.as_str()) {
            p.push(taint.key_path("effect"), format!("{effect:?} is not one of {}", TAINT_EFFECTS.join(", ")));
        }
        taint.finish(p);
        if let Some(key) = key {
            t.taints.push(Taint { key, value, effect });
        }
    }
    if let Some(mut r) = s.section("reserved", p) {
        t.reserved_cpu_millis = r.cpu("cpu", p).unwrap_or(0);
        t.reserved_memory_bytes = r.bytes("memory", p).unwrap_or(0);
        r.finish(p);
    }
    s.finish(p);
    t
}

fn parse_options(section: Option<Section<'_>>, p: &mut Problems) -> OptionsConfig {
    let Some(mut s) = section else { return OptionsConfig::default() };
    let mut threshold = |key: &'static str, p: &mut Problems| {
        let v = s.float(key, p);
        if v.is_some_and(|v| !(0.0..=1.0).contains(&v)) {
            p.push(s.key_path(key), "must be between 0 and 1");
        }
        v
    };
    let scale_down_utilization_threshold = threshold("scale_down_utilization_threshold", p);
    let scale_down_gpu_utilization_threshold = threshold("scale_down_gpu_utilization_threshold", p);
    let o = OptionsConfig {
        scale_down_utilization_threshold,
        scale_down_gpu_utilization_threshold,
        scale_down_unneeded_time: s.duration("scale_down_unneeded_time", p),
        scale_down_unready_time: s.duration("scale_down_unready_time", p),
        max_node_provision_time: s.duration("max_node_provision_time", p),
        zero_or_max_node_scaling: s.boolean("zero_or_max_node_scaling", p),
        ignore_daemonsets_utilization: s.boolean("ignore_daemonsets_utilization", p),
    };
    if o.max_node_provision_time.is_some_and(|d| d.is_zero()) {
        p.push(
            s.key_path("max_node_provision_time"),
            "must be longer than zero (zero makes CA delete new nodes at once)",
        );
    }
    s.finish(p);
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Problems> {
        Config::parse(text, "test.toml", Path::new("."))
    }

    #[test]
    fn the_embedded_default_is_valid() {
        let c = Config::embedded();
        assert_eq!(c.server.grpc_listen.to_string(), "127.0.0.1:8086");
        assert_eq!(c.server.http_listen.unwrap().to_string(), "127.0.0.1:8087");
        assert!(c.groups.iter().any(|g| g.max_size >= 4));
    }

    #[test]
    fn every_mistake_is_listed_with_its_key_path() {
        let err = parse(
            r#"
            cluster_name = "Bad_Name"
            [server]
            grpc_listen = "nowhere"
            [clouds.a]
            create_concurrency = 0
            [groups.g1]
            cloud = "missing"
            min_size = 5
            max_size = 2
            [groups.g1.template]
            memory = "lots"
            taints = [{ key = "k", effect = "Sometimes" }]
            [groups.g1.options]
            scale_down_unneeded_time = "soon"
            max_node_provision_time = "0s"
            typo = 1
            "#,
        )
        .unwrap_err();
        let paths: Vec<_> = err.items.iter().map(|i| i.path.as_str()).collect();
        for expected in [
            "cluster_name",
            "server.grpc_listen",
            "clouds.a.driver",
            "clouds.a.create_concurrency",
            "groups.g1.cloud",
            "groups.g1.max_size",
            "groups.g1.template.memory",
            "groups.g1.template.taints[0].effect",
            "groups.g1.options.scale_down_unneeded_time",
            "groups.g1.options.max_node_provision_time",
            "groups.g1.options.typo",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {paths:?}");
        }
        assert!(err.to_string().starts_with("test.toml: "));
    }

    const MINIMAL: &str = "cluster_name = \"t\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 3\n";

    #[test]
    fn values_that_cannot_work_are_refused_with_clear_bounds() {
        let err = parse(&format!(
            "{MINIMAL}[state]\nrefresh_timeout = \"0s\"\nreconcile_interval = \"100000years\"\n\
             [clouds.sim]\ndriver = \"simulated\"\ncreate_concurrency = 4611686018427387904\n\
             delete_concurrency = 100000\ncreate_timeout = \"0s\"\ndelete_timeout = \"0s\"\n\
             [groups.big]\ncloud = \"sim\"\nmin_size = 2147483647\nmax_size = 2147483647\n"
        ))
        .unwrap_err();
        let paths: Vec<_> = err.items.iter().map(|i| i.path.as_str()).collect();
        for expected in [
            "state.refresh_timeout",
            "state.reconcile_interval",
            "clouds.sim.create_concurrency",
            "clouds.sim.delete_concurrency",
            "clouds.sim.create_timeout",
            "clouds.sim.delete_timeout",
            "groups.big.max_size",
            "groups.big.min_size",
        ] {
            assert!(paths.contains(&expected), "missing {expected} in {err}");
        }
        let text = err.to_string();
        assert!(text.contains("between 1 and 1024"), "{text}");
        assert!(text.contains(&format!("at most {MAX_GROUP_SIZE} machines")), "{text}");
    }

    #[test]
    fn toml_syntax_errors_name_their_line_and_column() {
        let err = parse("cluster_name = \"t\"\n[groups.g]\nmax_size = = 3\n").unwrap_err();
        assert_eq!(err.items.len(), 1);
        let message = &err.items[0].message;
        assert!(message.contains("line 3, column 12"), "{message}");
    }

    #[test]
    fn tls_files_must_hold_pem_of_the_right_kind() {
        let dir = tempfile::tempdir().unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["flotilla".to_owned()]).unwrap().self_signed(&key).unwrap();
        let other_key = rcgen::KeyPair::generate().unwrap();
        for (name, text) in [
            ("cert.pem", cert.pem()),
            ("key.pem", key.serialize_pem()),
            ("other-key.pem", other_key.serialize_pem()),
            ("junk", "not a certificate\n".to_owned()),
        ] {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        let with_tls = |cert: &str, key: &str, ca: &str| {
            let text = format!(
                "{MINIMAL}[clouds.sim]\ndriver = \"simulated\"\n[server.tls]\ncert_file = \"{cert}\"\n\
                 key_file = \"{key}\"\nclient_ca_file = \"{ca}\"\n"
            );
            Config::parse(&text, "test.toml", dir.path())
        };
        with_tls("cert.pem", "key.pem", "cert.pem").expect("a matching pair and a CA");
        let err = with_tls("junk", "junk", "junk").unwrap_err();
        let paths: Vec<_> = err.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["server.tls.cert_file", "server.tls.key_file", "server.tls.client_ca_file"], "{err}");
        assert!(err.to_string().contains("PEM"), "{err}");
        let err = with_tls("cert.pem", "other-key.pem", "cert.pem").unwrap_err();
        assert_eq!(err.items[0].path, "server.tls.key_file", "{err}");
        assert!(err.items[0].message.contains("does not match"), "{err}");
        let err = with_tls("cert.pem", "cert.pem", "key.pem").unwrap_err();
        let paths: Vec<_> = err.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["server.tls.key_file", "server.tls.client_ca_file"], "{err}");
    }
}
