//! The driver's keys — `[clouds.NAME]`, `[clouds.NAME.defaults]` and `[groups.G.machine]` —
//! checked the way the API will check them, so a mistake is a `check-config` problem instead of
//! a create that fails on every scale-up.
//!
//! The rules come from the in-tree provider (tag names at most 15 characters, tags matching
//! `^[a-zA-Z0-9\-_\s\.]{3,24}$`), from cloudcli-server's parsing of the create request (disk
//! and network items, ids 0..3, `billingcycle`), and from cloudcli's own flag checks (server
//! names `[a-zA-Z0-9()_-]{4,}`, passwords). Where the in-tree provider let a value through that
//! then failed every create (a space in a tag or a disk item: the API takes these lists as one
//! space-separated string) this module rejects it up front.

use std::{collections::BTreeMap, time::Duration};

use base64::Engine;
use serde_json::{Map, Value};

use super::script::{self, Script, Template};
use crate::driver::script as shared;
use crate::{
    config::{GroupConfig, Problems, Secret, Section},
    quantity,
};

/// The API the in-tree provider uses (`kamatera-api-url`'s default).
pub const DEFAULT_API_URL: &str = "https://cloudcli.cloudwm.com";
/// Ownership tags: `k8sca-<cluster>` and `k8scang-<group>`, exactly as the in-tree provider.
pub const CLUSTER_TAG_PREFIX: &str = "k8sca-";
pub const GROUP_TAG_PREFIX: &str = "k8scang-";
/// The in-tree provider's limit on cluster and node group names (Kamatera tags are 24
/// characters at most).
pub const MAX_TAG_NAME: usize = 15;
/// cloudcli-server takes at most four disks and four networks (item ids 0..3).
const MAX_ITEMS: usize = 4;

const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// What the in-tree provider allows every call (its HTTP client's timeout).
const DEFAULT_CREATE_REQUEST_TIMEOUT: Duration = Duration::from_secs(300);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_secs(5);
const DEFAULT_LOST_CREATE_GRACE: Duration = Duration::from_secs(120);

/// Settings of one `[clouds.NAME]` table.
#[derive(Clone, Debug)]
pub struct CloudSettings {
    pub api_url: String,
    pub client_id: Secret,
    pub secret: Secret,
    /// The full cluster tag, `k8sca-<name>`.
    pub cluster_tag: String,
    pub filter_name_prefix: Option<String>,
    pub request_timeout: Duration,
    pub create_request_timeout: Duration,
    /// How often a terminate command is polled and a lost create looked for.
    pub poll_interval: Duration,
    /// How long a create whose answer was lost looks for its server or command.
    pub lost_create_grace: Duration,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BillingCycle {
    Hourly,
    Monthly,
}

impl BillingCycle {
    pub fn as_str(self) -> &'static str {
        match self {
            BillingCycle::Hourly => "hourly",
            BillingCycle::Monthly => "monthly",
        }
    }
}

/// Settings of one group's `machine` table (over the cloud's `defaults`).
#[derive(Clone, Debug)]
pub struct GroupSettings {
    /// The full group tag, `k8scang-<name>`.
    pub group_tag: String,
    pub datacenter: String,
    pub image: String,
    /// Cores and type letter, e.g. `2A`.
    pub cpu: String,
    pub cpu_cores: u64,
    pub ram_mb: u64,
    /// cloudcli `--disk` items, e.g. `size=100`.
    pub disks: Vec<String>,
    /// Size of the first disk, GB: the node's ephemeral storage.
    pub first_disk_gb: u64,
    /// cloudcli `--network` items, e.g. `name=wan,ip=auto`.
    pub networks: Vec<String>,
    pub daily_backup: bool,
    pub managed: bool,
    pub billing_cycle: BillingCycle,
    pub monthly_package: Option<String>,
    pub password: Option<Secret>,
    pub ssh_key: Option<String>,
    pub script: Script,
    /// Extra tags besides the two ownership tags.
    pub tags: Vec<String>,
}

impl CloudSettings {
    /// Reads the driver's keys of `[clouds.NAME]` (not `defaults`, see [`Draft`]).
    pub fn parse(cluster_name: &str, s: &mut Section<'_>, p: &mut Problems) -> Option<CloudSettings> {
        let before = p.items.len();
        let api_url = s.string("api_url", p).unwrap_or_else(|| DEFAULT_API_URL.to_owned());
        if !(api_url.starts_with("https://") || api_url.starts_with("http://")) {
            p.push(s.key_path("api_url"), format!("{api_url:?} is not an http:// or https:// URL"));
        }
        let client_id = required_secret(s, "api_client_id", p);
        let secret = required_secret(s, "api_secret", p);
        let tag_cluster_name = s.string("tag_cluster_name", p);
        let cluster = tag_cluster_name.clone().unwrap_or_else(|| cluster_name.to_owned());
        if let Err(e) = check_tag_name(&cluster) {
            let (path, whose) = match tag_cluster_name {
                Some(_) => (s.key_path("tag_cluster_name"), String::new()),
                None => (
                    s.key_path("tag_cluster_name"),
                    format!(" (cluster_name {cluster:?} is used when tag_cluster_name is not set)"),
                ),
            };
            p.push(path, format!("{e}{whose}"));
        }
        let filter_name_prefix = s.string("filter_name_prefix", p);
        if filter_name_prefix.as_deref().is_some_and(str::is_empty) {
            p.push(s.key_path("filter_name_prefix"), "must not be empty (leave it out to look at every server)");
        }
        let mut positive = |key: &'static str, default: Duration, p: &mut Problems| {
            let d = s.duration(key, p).unwrap_or(default);
            if d.is_zero() {
                p.push(s.key_path(key), "must be longer than zero");
            }
            d
        };
        let request_timeout = positive("request_timeout", DEFAULT_REQUEST_TIMEOUT, p);
        let create_request_timeout = positive("create_request_timeout", DEFAULT_CREATE_REQUEST_TIMEOUT, p);
        let poll_interval = positive("poll_interval", DEFAULT_POLL_INTERVAL, p);
        let lost_create_grace = s.duration("lost_create_grace", p).unwrap_or(DEFAULT_LOST_CREATE_GRACE);
        if p.items.len() > before {
            return None;
        }
        Some(CloudSettings {
            api_url: api_url.trim_end_matches('/').to_owned(),
            client_id: client_id?,
            secret: secret?,
            cluster_tag: format!("{CLUSTER_TAG_PREFIX}{cluster}"),
            filter_name_prefix,
            request_timeout,
            create_request_timeout,
            poll_interval,
            lost_create_grace,
        })
    }
}

fn required_secret(s: &mut Section<'_>, key: &'static str, p: &mut Problems) -> Option<Secret> {
    if !s.contains(key) {
        p.push(s.key_path(key), "is required (a secret: { env = \"VAR\" } or { file = \"path\" })");
        s.ignore(key);
        return None;
    }
    let secret = s.secret(key, p)?;
    if secret.expose().trim().is_empty() {
        p.push(s.key_path(key), "must not be empty");
        return None;
    }
    Some(secret)
}

/// Checks a cluster or group name used in a tag, as the in-tree provider does, and rejects the
/// spaces it let through.
pub fn check_tag_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("must not be empty".into());
    }
    if name.contains(char::is_whitespace) {
        return Err(format!(
            "{name:?} contains a space: Kamatera takes a server's tags as one space-separated list, so every create would fail"
        ));
    }
    if name.chars().count() > MAX_TAG_NAME {
        return Err(format!(
            "{name:?} is {} characters; at most {MAX_TAG_NAME} fit in a Kamatera tag (24 characters with its prefix)",
            name.chars().count()
        ));
    }
    if let Some(c) = name.chars().find(|c| !is_tag_char(*c)) {
        return Err(format!("{name:?} contains {c:?}; Kamatera tags allow only A-Z a-z 0-9 . _ -"));
    }
    Ok(())
}

fn is_tag_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

/// An extra tag: Kamatera's tag rule, without spaces, not one of the ownership prefixes.
fn check_extra_tag(tag: &str) -> Result<(), String> {
    if tag.contains(char::is_whitespace) {
        return Err(format!("{tag:?} contains a space (the API takes tags as one space-separated list)"));
    }
    let n = tag.chars().count();
    if !(3..=24).contains(&n) {
        return Err(format!("{tag:?} is {n} characters; Kamatera tags are 3 to 24"));
    }
    if let Some(c) = tag.chars().find(|c| !is_tag_char(*c)) {
        return Err(format!("{tag:?} contains {c:?}; Kamatera tags allow only A-Z a-z 0-9 . _ -"));
    }
    if tag.starts_with(CLUSTER_TAG_PREFIX) || tag.starts_with(GROUP_TAG_PREFIX) {
        return Err(format!("{tag:?}: tags starting with k8sca- or k8scang- mark ownership and are set by Flotilla"));
    }
    Ok(())
}

/// A value and the key path it was read from.
type Field<T> = Option<(T, String)>;

/// The init script as written in one table.
#[derive(Clone, Debug)]
enum ScriptSource {
    /// `script` (inline) or `script_file`.
    Template(shared::Template),
    /// `script_base64`, decoded.
    Fixed(String),
}

/// One `machine` or `defaults` table, every key optional: a group's settings are its own table
/// over the cloud's `defaults`.
#[derive(Clone, Debug, Default)]
pub struct Draft {
    tag_group_name: Field<String>,
    datacenter: Field<String>,
    image: Field<String>,
    cpu: Field<(String, u64)>,
    ram_mb: Field<u64>,
    disks: Field<(Vec<String>, u64)>,
    networks: Field<Vec<String>>,
    daily_backup: Field<bool>,
    managed: Field<bool>,
    billing_cycle: Field<BillingCycle>,
    monthly_package: Field<String>,
    password: Field<Secret>,
    ssh_key: Field<String>,
    script: Field<ScriptSource>,
    template_data: Map<String, Value>,
    join_url: Field<String>,
    join_token: Field<Secret>,
    tags: Field<Vec<String>>,
    /// Keys given with a value that was wrong (already reported; not "missing" as well).
    bad: Vec<&'static str>,
}

impl Draft {
    /// Reads one table; every problem with a value goes into `p`. `group` is false for the
    /// cloud's `defaults` (where `tag_group_name` makes no sense).
    pub fn parse(s: &mut Section<'_>, group: bool, p: &mut Problems) -> Draft {
        let mut d = Draft::default();
        let at = |s: &Section<'_>, key: &str| s.key_path(key);
        if group && let Some(v) = s.string("tag_group_name", p) {
            match check_tag_name(&v) {
                Ok(()) => d.tag_group_name = Some((v, at(s, "tag_group_name"))),
                Err(e) => p.push(at(s, "tag_group_name"), e),
            }
        }
        for (key, slot) in [("datacenter", &mut d.datacenter), ("image", &mut d.image)] {
            if let Some(v) = s.string(key, p) {
                if v.trim().is_empty() || v.contains(char::is_whitespace) {
                    p.push(at(s, key), "must be a non-empty value without spaces");
                } else {
                    *slot = Some((v, at(s, key)));
                }
            }
        }
        if let Some(v) = s.string("cpu", p) {
            match parse_cpu(&v) {
                Ok(cores) => d.cpu = Some(((v, cores), at(s, "cpu"))),
                Err(e) => p.push(at(s, "cpu"), e),
            }
        }
        match s.raw("ram") {
            None => {}
            Some(v) => match parse_ram(v) {
                Ok(mb) => d.ram_mb = Some((mb, at(s, "ram"))),
                Err(e) => p.push(at(s, "ram"), e),
            },
        }
        if s.contains("disks") {
            let items = s.string_list("disks", p);
            match check_items(&items, "size", &["id", "size"]) {
                Ok(parsed) => {
                    let first = parsed[0].get("size").and_then(|v| v.parse().ok()).unwrap_or(0);
                    let sizes_ok = parsed.iter().all(|i| i.get("size").is_some_and(|v| is_positive_int(v)));
                    if sizes_ok {
                        d.disks = Some(((items, first), at(s, "disks")));
                    } else {
                        p.push(
                            at(s, "disks"),
                            "every disk needs size=<GB> with a whole number of GB, e.g. \"size=100\"",
                        );
                    }
                }
                Err(e) => p.push(at(s, "disks"), e),
            }
        }
        if s.contains("networks") {
            let items = s.string_list("networks", p);
            match check_items(&items, "name", &["id", "name", "ip"]) {
                Ok(parsed) => {
                    if parsed.iter().all(|i| i.get("name").is_some_and(|n| !n.is_empty())) {
                        d.networks = Some((items, at(s, "networks")));
                    } else {
                        p.push(
                            at(s, "networks"),
                            "every network needs name=<wan or a VLAN name>, e.g. \"name=wan,ip=auto\"",
                        );
                    }
                }
                Err(e) => p.push(at(s, "networks"), e),
            }
        }
        d.daily_backup = s.boolean("daily_backup", p).map(|v| (v, at(s, "daily_backup")));
        d.managed = s.boolean("managed", p).map(|v| (v, at(s, "managed")));
        if let Some(v) = s.string("billing_cycle", p) {
            match v.as_str() {
                "hourly" => d.billing_cycle = Some((BillingCycle::Hourly, at(s, "billing_cycle"))),
                "monthly" => d.billing_cycle = Some((BillingCycle::Monthly, at(s, "billing_cycle"))),
                _ => p.push(at(s, "billing_cycle"), format!("{v:?} is not \"hourly\" or \"monthly\"")),
            }
        }
        if let Some(v) = s.string("monthly_package", p) {
            if v.is_empty() || v.contains(char::is_whitespace) {
                p.push(at(s, "monthly_package"), "must be a package name such as \"t5000\"");
            } else {
                d.monthly_package = Some((v, at(s, "monthly_package")));
            }
        }
        if let Some(secret) = s.secret("password", p) {
            match check_password(secret.expose()) {
                Ok(()) => d.password = Some((secret, at(s, "password"))),
                Err(e) => p.push(at(s, "password"), e),
            }
        }
        if let Some(v) = s.string("ssh_key", p) {
            if v.trim().is_empty() {
                p.push(at(s, "ssh_key"), "must not be empty (leave it out for none)");
            } else {
                d.ssh_key = Some((v.trim().to_owned(), at(s, "ssh_key")));
            }
        }
        let b64 = s.string("script_base64", p);
        if b64.is_some() && script::KEYS.given(s) {
            p.push(s.path(), "give only one of `script`, `script_file` and `script_base64`");
            s.ignore("script");
            s.ignore("script_file");
        } else if let Some(b64) = b64 {
            match decode_base64(&b64) {
                Ok(text) => d.script = Some((ScriptSource::Fixed(text), at(s, "script_base64"))),
                Err(e) => p.push(at(s, "script_base64"), e),
            }
        } else if let Some(t) = shared::Template::read(s, &script::KEYS, p) {
            let path = t.key_path.clone();
            d.script = Some((ScriptSource::Template(t), path));
        }
        d.template_data = shared::template_data(s, script::RESERVED, p);
        d.join_url = s.string("join_url", p).map(|v| (v, at(s, "join_url")));
        d.join_token = s.secret("join_token", p).map(|v| (v, at(s, "join_token")));
        if s.contains("tags") {
            let tags = s.string_list("tags", p);
            let mut ok = true;
            for (i, t) in tags.iter().enumerate() {
                if let Err(e) = check_extra_tag(t) {
                    p.push(format!("{}[{i}]", at(s, "tags")), e);
                    ok = false;
                }
            }
            if ok {
                d.tags = Some((tags, at(s, "tags")));
            }
        }
        for (key, parsed) in [
            ("datacenter", d.datacenter.is_some()),
            ("image", d.image.is_some()),
            ("cpu", d.cpu.is_some()),
            ("ram", d.ram_mb.is_some()),
            ("disks", d.disks.is_some()),
            ("networks", d.networks.is_some()),
            ("script", d.script.is_some()),
        ] {
            let given = if key == "script" {
                ["script", "script_file", "script_base64"].iter().any(|k| s.contains(k))
            } else {
                s.contains(key)
            };
            if given && !parsed {
                d.bad.push(key);
            }
        }
        d
    }

    /// This table over `defaults`: every key this table sets wins.
    fn over(self, defaults: &Draft) -> Draft {
        fn pick<T: Clone>(mine: Field<T>, theirs: &Field<T>) -> Field<T> {
            mine.or_else(|| theirs.clone())
        }
        let mut template_data = defaults.template_data.clone();
        template_data.extend(self.template_data);
        let mut bad = defaults.bad.clone();
        bad.extend(self.bad);
        Draft {
            tag_group_name: self.tag_group_name,
            datacenter: pick(self.datacenter, &defaults.datacenter),
            image: pick(self.image, &defaults.image),
            cpu: pick(self.cpu, &defaults.cpu),
            ram_mb: pick(self.ram_mb, &defaults.ram_mb),
            disks: pick(self.disks, &defaults.disks),
            networks: pick(self.networks, &defaults.networks),
            daily_backup: pick(self.daily_backup, &defaults.daily_backup),
            managed: pick(self.managed, &defaults.managed),
            billing_cycle: pick(self.billing_cycle, &defaults.billing_cycle),
            monthly_package: pick(self.monthly_package, &defaults.monthly_package),
            password: pick(self.password, &defaults.password),
            ssh_key: pick(self.ssh_key, &defaults.ssh_key),
            script: pick(self.script, &defaults.script),
            template_data,
            join_url: pick(self.join_url, &defaults.join_url),
            join_token: pick(self.join_token, &defaults.join_token),
            tags: pick(self.tags, &defaults.tags),
            bad,
        }
    }
}

impl GroupSettings {
    /// A group's settings: its `machine` table over the cloud's `defaults` (`defaults_path` is
    /// that table's path, for messages). `None` when anything required is missing or wrong.
    pub fn build(
        cluster: &str,
        group: &GroupConfig,
        machine: &mut Section<'_>,
        defaults: &Draft,
        defaults_path: &str,
        p: &mut Problems,
    ) -> Option<GroupSettings> {
        let before = p.items.len();
        let d = Draft::parse(machine, true, p).over(defaults);
        let missing = |key: &str, p: &mut Problems| {
            p.push(machine.key_path(key), format!("is required (here or in {defaults_path})"));
        };
        let tag_name = d.tag_group_name.as_ref().map(|(v, _)| v.clone()).unwrap_or_else(|| group.name.clone());
        if d.tag_group_name.is_none()
            && let Err(e) = check_tag_name(&tag_name)
        {
            p.push(
                machine.key_path("tag_group_name"),
                format!("{e} (the group's name is used when tag_group_name is not set)"),
            );
        }
        for (key, present) in [
            ("datacenter", d.datacenter.is_some()),
            ("image", d.image.is_some()),
            ("cpu", d.cpu.is_some()),
            ("ram", d.ram_mb.is_some()),
            ("disks", d.disks.is_some()),
            ("networks", d.networks.is_some()),
        ] {
            if !present && !d.bad.contains(&key) {
                missing(key, p);
            }
        }
        let billing_cycle = d.billing_cycle.as_ref().map(|(v, _)| *v).unwrap_or(BillingCycle::Hourly);
        if let Some((_, path)) = &d.monthly_package
            && billing_cycle != BillingCycle::Monthly
        {
            p.push(path.clone(), "is only used with billing_cycle = \"monthly\"");
        }
        let script = match &d.script {
            None if d.bad.contains(&"script") => None,
            None => {
                p.push(
                    machine.key_path("script"),
                    format!(
                        "an init script is required (`script`, `script_file` or `script_base64`, here or in {defaults_path}): without one a server never joins the cluster"
                    ),
                );
                None
            }
            Some((ScriptSource::Fixed(text), path)) => {
                if !d.template_data.is_empty() || d.join_url.is_some() || d.join_token.is_some() {
                    p.push(
                        path.clone(),
                        "`template_data`, `join_url` and `join_token` need a template (`script` or `script_file`); script_base64 is sent as it is",
                    );
                }
                Some(Script::Fixed(text.clone()))
            }
            Some((ScriptSource::Template(source), path)) => {
                let t = Template {
                    source: source.clone(),
                    data: d.template_data.clone(),
                    join_url: d.join_url.as_ref().map(|(v, _)| v.clone()),
                    join_token: d.join_token.as_ref().map(|(v, _)| v.clone()),
                };
                // A trial render catches syntax errors and misspelt variables before any server
                // boots with a broken script.
                let name = format!("{}-check", group.name_prefix);
                match t.check(script::Target { cluster, group: &group.name, name: &name }, p) {
                    Some(out) if out.trim().is_empty() => {
                        p.push(path.clone(), "renders to an empty script");
                        None
                    }
                    Some(_) => Some(Script::Template(t)),
                    None => None,
                }
            }
        };
        if p.items.len() > before {
            return None;
        }
        let (cpu, cpu_cores) = d.cpu?.0;
        let (disks, first_disk_gb) = d.disks?.0;
        Some(GroupSettings {
            group_tag: format!("{GROUP_TAG_PREFIX}{tag_name}"),
            datacenter: d.datacenter?.0,
            image: d.image?.0,
            cpu,
            cpu_cores,
            ram_mb: d.ram_mb?.0,
            disks,
            first_disk_gb,
            networks: d.networks?.0,
            daily_backup: d.daily_backup.map(|(v, _)| v).unwrap_or(false),
            managed: d.managed.map(|(v, _)| v).unwrap_or(false),
            billing_cycle,
            monthly_package: d.monthly_package.map(|(v, _)| v),
            password: d.password.map(|(v, _)| v),
            ssh_key: d.ssh_key.map(|(v, _)| v),
            script: script?,
            tags: d.tags.map(|(v, _)| v).unwrap_or_default(),
        })
    }
}

/// `2A`: cores, then the CPU type letter (A, B, D, T at the time of writing).
fn parse_cpu(v: &str) -> Result<u64, String> {
    let hint = "write cores and the CPU type letter, e.g. \"2A\" or \"4B\"";
    let Some(letter) = v.chars().last() else { return Err(format!("must not be empty; {hint}")) };
    let digits = &v[..v.len() - letter.len_utf8()];
    if !letter.is_ascii_alphabetic() || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("{v:?} is not a Kamatera CPU; {hint}"));
    }
    if !letter.is_ascii_uppercase() {
        return Err(format!("{v:?}: the CPU type letter is upper-case (\"{}\")", v.to_ascii_uppercase()));
    }
    match digits.parse::<u64>() {
        Ok(n) if n > 0 => Ok(n),
        _ => Err(format!("{v:?} has no cores; {hint}")),
    }
}

/// RAM in MB: an integer (`4096`, as Kamatera and the in-tree provider write it), digits as a
/// string, or a quantity that is a whole number of MiB (`"4Gi"`).
fn parse_ram(v: &toml::Value) -> Result<u64, String> {
    let mb = match v {
        toml::Value::Integer(i) if *i > 0 => *i as u64,
        toml::Value::String(s) if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) => {
            s.parse().map_err(|_| format!("{s:?} is out of range"))?
        }
        toml::Value::String(s) => {
            let bytes = quantity::parse_bytes(s)
                .ok_or_else(|| format!("{s:?} is neither MB (4096) nor a quantity such as \"4Gi\""))?;
            if bytes == 0 || bytes % (1 << 20) != 0 {
                return Err(format!("{s:?} is not a whole number of MB"));
            }
            bytes >> 20
        }
        _ => return Err("expected MB as an integer (4096) or a quantity string (\"4Gi\")".into()),
    };
    if mb == 0 {
        return Err("must be more than zero".into());
    }
    Ok(mb)
}

fn is_positive_int(v: &str) -> bool {
    v.parse::<u64>().is_ok_and(|n| n > 0)
}

/// Checks cloudcli array items (`size=100`, `id=1,name=wan,ip=auto`) as cloudcli-server parses
/// them: no spaces, `key=value` pairs, known keys, ids 0..3 unique, at most four items, `need`
/// present in each. Returns each item's pairs.
fn check_items(items: &[String], need: &str, keys: &[&str]) -> Result<Vec<BTreeMap<String, String>>, String> {
    if items.is_empty() {
        return Err("needs at least one item".into());
    }
    if items.len() > MAX_ITEMS {
        return Err(format!("has {} items; Kamatera allows at most {MAX_ITEMS}", items.len()));
    }
    let mut ids = Vec::new();
    let mut out = Vec::new();
    for item in items {
        if item.contains(char::is_whitespace) {
            return Err(format!("{item:?} contains a space (the API takes the items as one space-separated list)"));
        }
        let mut pairs = BTreeMap::new();
        for kv in item.split(',') {
            let Some((k, v)) = kv.split_once('=').filter(|(_, v)| !v.contains('=')) else {
                return Err(format!("{item:?}: {kv:?} is not key=value"));
            };
            if !keys.contains(&k) {
                return Err(format!("{item:?}: unknown key {k:?} (known: {})", keys.join(", ")));
            }
            if pairs.insert(k.to_owned(), v.to_owned()).is_some() {
                return Err(format!("{item:?}: {k} is given twice"));
            }
        }
        if !pairs.contains_key(need) {
            return Err(format!("{item:?} has no {need}="));
        }
        if let Some(id) = pairs.get("id") {
            match id.parse::<u8>() {
                Ok(n) if n < MAX_ITEMS as u8 && !ids.contains(&n) => ids.push(n),
                Ok(n) if n < MAX_ITEMS as u8 => return Err(format!("id {n} is given twice")),
                _ => return Err(format!("{item:?}: id must be 0 to 3")),
            }
        }
        out.push(pairs);
    }
    Ok(out)
}

/// cloudcli's rule for passwords: 10-20 of `a-z A-Z 0-9 !@#$^&*()~`, with a capital, a small
/// letter and a digit. The password itself never appears in the message.
fn check_password(v: &str) -> Result<(), String> {
    let n = v.chars().count();
    if !(10..=20).contains(&n) {
        return Err(format!("is {n} characters; Kamatera passwords are 10 to 20"));
    }
    if v.chars().any(|c| !(c.is_ascii_alphanumeric() || "!@#$^&*()~".contains(c))) {
        return Err("may only contain a-z A-Z 0-9 and !@#$^&*()~".into());
    }
    if !(v.chars().any(|c| c.is_ascii_uppercase())
        && v.chars().any(|c| c.is_ascii_lowercase())
        && v.chars().any(|c| c.is_ascii_digit()))
    {
        return Err("needs at least one capital letter, one small letter and one digit".into());
    }
    Ok(())
}

fn decode_base64(text: &str) -> Result<String, String> {
    let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(compact.as_bytes())
        .map_err(|e| format!("is not base64: {e}"))?;
    let script = String::from_utf8(bytes).map_err(|_| "does not decode to text".to_owned())?;
    if script.trim().is_empty() {
        return Err("decodes to an empty script".into());
    }
    Ok(script)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_names_follow_the_in_tree_limits_and_reject_spaces() {
        assert!(check_tag_name("prod").is_ok());
        assert!(check_tag_name("Prod_EU.1-a").is_ok());
        assert!(check_tag_name("fifteen-chars-x").is_ok());
        assert!(check_tag_name("sixteen-chars-xy").unwrap_err().contains("16 characters"));
        assert!(check_tag_name("my cluster").unwrap_err().contains("space"));
        assert!(check_tag_name("a/b").unwrap_err().contains("'/'"));
        assert!(check_tag_name("").is_err());
    }

    #[test]
    fn cpu_codes_are_cores_and_a_type_letter() {
        assert_eq!(parse_cpu("2A"), Ok(2));
        assert_eq!(parse_cpu("16D"), Ok(16));
        assert!(parse_cpu("2a").unwrap_err().contains("\"2A\""));
        assert!(parse_cpu("A").is_err());
        assert!(parse_cpu("0B").is_err());
        assert!(parse_cpu("2").is_err());
        assert!(parse_cpu("2 B").is_err());
    }

    #[test]
    fn ram_is_mb_or_a_whole_mib_quantity() {
        assert_eq!(parse_ram(&toml::Value::Integer(4096)), Ok(4096));
        assert_eq!(parse_ram(&toml::Value::String("2048".into())), Ok(2048));
        assert_eq!(parse_ram(&toml::Value::String("4Gi".into())), Ok(4096));
        assert!(parse_ram(&toml::Value::String("1.5G".into())).is_err());
        assert!(parse_ram(&toml::Value::Integer(0)).is_err());
        assert!(parse_ram(&toml::Value::Boolean(true)).is_err());
    }

    #[test]
    fn disk_and_network_items_are_checked_as_cloudcli_server_parses_them() {
        let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<_>>();
        assert!(check_items(&s(&["size=100", "id=1,size=200"]), "size", &["id", "size"]).is_ok());
        assert!(check_items(&s(&[]), "size", &["id", "size"]).is_err());
        assert!(check_items(&s(&["size=1", "size=2", "size=3", "size=4", "size=5"]), "size", &["id", "size"]).is_err());
        assert!(check_items(&s(&["size=100 size=200"]), "size", &["id", "size"]).unwrap_err().contains("space"));
        assert!(check_items(&s(&["size"]), "size", &["id", "size"]).unwrap_err().contains("key=value"));
        assert!(check_items(&s(&["id=4,size=1"]), "size", &["id", "size"]).unwrap_err().contains("0 to 3"));
        assert!(check_items(&s(&["id=1,size=1", "id=1,size=2"]), "size", &["id", "size"]).is_err());
        assert!(check_items(&s(&["type=ssd,size=1"]), "size", &["id", "size"]).unwrap_err().contains("unknown key"));
        assert!(check_items(&s(&["ip=auto"]), "name", &["id", "name", "ip"]).unwrap_err().contains("no name="));
    }

    #[test]
    fn passwords_follow_cloudclis_rule_and_are_never_echoed() {
        assert!(check_password("Abcdefgh12").is_ok());
        assert!(check_password("Ab1!@#$^&*()~").is_ok());
        for bad in ["Short1a", "abcdefghij1", "ABCDEFGHIJ1", "Abcdefghijk", "Abcdefgh1 2", "Abcdefghijklmnopqrst1"] {
            let e = check_password(bad).unwrap_err();
            assert!(!e.contains(bad), "{e}");
        }
    }

    #[test]
    fn extra_tags_may_not_claim_ownership() {
        assert!(check_extra_tag("gpu-nodes").is_ok());
        assert!(check_extra_tag("k8sca-other").is_err());
        assert!(check_extra_tag("k8scang-other").is_err());
        assert!(check_extra_tag("ab").is_err());
        assert!(check_extra_tag("a b c").is_err());
    }
}
