//! cluster-autoscaler's in-tree Kamatera provider (1.36.1): its INI cloud-config (the file, or
//! the Kubernetes Secret that mounts it), read with gcfg's rules and the provider's own
//! (`kamatera_cloud_config.go`).
//!
//! The result adopts the servers the provider created: Flotilla's Kamatera driver finds
//! servers by the same tags (`k8sca-<cluster-name>`, `k8scang-<node group>`) and reports the
//! same provider ids (`<provider-id-prefix><server name>`, by default `kamatera://<name>`), so
//! existing servers and Nodes are taken over as they are. Names that are not DNS labels keep
//! their tags through `tag_cluster_name` / `tag_group_name`.
//!
//! The provider's rules, kept as it applied them: names and keys are case-insensitive; a
//! repeated key keeps its last value; `disk`, `network` and `template-label` repeat (a bare
//! `disk` empties the list, and a group without any inherits `default-disk`); a group's string
//! key only wins when it is not empty; a group's `dailybackup` / `managed` can turn the
//! default on but never off; `[global]` booleans take `true/yes/on/1` (any case), a group's
//! power keys only Go's `strconv.ParseBool` forms; min/max default to 1 and 254; the cluster
//! and group names are at most 15 characters. A key the provider does not know makes it refuse
//! the whole file; the import lists it instead, with the key it probably meant.

use std::collections::BTreeMap;

use base64::Engine as _;

use super::{
    Error, ExtraFile, Import, Problems, Request, Source,
    gcfg::{self, Section},
    out::{Document, Value as Out},
    report::Report,
};

const CLOUD: &str = "kamatera";
const MAX_NAME: usize = 15;

const GLOBAL_KEYS: &[&str] = &[
    "kamatera-api-client-id",
    "kamatera-api-secret",
    "kamatera-api-url",
    "cluster-name",
    "filter-name-prefix",
    "provider-id-prefix",
    "poweroff-on-scale-down",
    "poweron-on-scale-up",
    "default-min-size",
    "default-max-size",
    "default-name-prefix",
    "default-password",
    "default-ssh-key",
    "default-datacenter",
    "default-image",
    "default-cpu",
    "default-ram",
    "default-disk",
    "default-dailybackup",
    "default-managed",
    "default-network",
    "default-billingcycle",
    "default-monthlypackage",
    "default-script-base64",
];

const GROUP_KEYS: &[&str] = &[
    "min-size",
    "max-size",
    "poweroff-on-scale-down",
    "poweroff-on-scale-down-max-servers",
    "poweron-on-scale-up",
    "name-prefix",
    "password",
    "ssh-key",
    "datacenter",
    "image",
    "cpu",
    "ram",
    "disk",
    "dailybackup",
    "managed",
    "network",
    "billingcycle",
    "monthlypackage",
    "script-base64",
    "template-label",
];

const MULTI: &[&str] = &["disk", "network", "template-label", "default-disk", "default-network"];
const GCFG_BOOLS: &[&str] = &[
    "poweroff-on-scale-down",
    "poweron-on-scale-up",
    "default-dailybackup",
    "default-managed",
    "dailybackup",
    "managed",
];

/// One section's values after gcfg's rules: the last of a single-valued key, the list of a
/// multi-valued one.
#[derive(Default, Debug)]
struct Values {
    single: BTreeMap<String, (Option<String>, usize)>,
    multi: BTreeMap<String, Option<Vec<String>>>,
    /// Every key as written, in order, for the report.
    seen: Vec<String>,
}

fn collect(section: &Section, known: &[&str], where_: &str, file: &str, p: &mut Problems, r: &mut Report) -> Values {
    let mut v = Values::default();
    for var in &section.vars {
        let key = format!("{where_} {}", var.name);
        if !known.contains(&var.name.as_str()) {
            let hint = super::closest(&var.name, known).map(|k| format!("; did you mean {k}?")).unwrap_or_default();
            let shown = (!super::looks_secret(&var.name)).then(|| var.value.clone().unwrap_or_default());
            r.dropped(
                &key,
                shown.as_deref(),
                &format!(
                    "not a key of the Kamatera provider, which refuses the whole file for it (gcfg: can't store data at \
                     section \"{}\", variable \"{}\"){hint}",
                    section.name, var.raw_name
                ),
            );
            continue;
        }
        if var.cut_by_comment {
            r.note(format!(
                "{file}:{}: {} is cut short by a ';' or '#' right after it: gcfg reads everything from there as a \
                 comment. The import keeps the value the provider read; quote the value if you meant the rest.",
                var.line, key
            ));
        }
        if !v.seen.contains(&var.name) {
            v.seen.push(var.name.clone());
        }
        if MULTI.contains(&var.name.as_str()) {
            let list = v.multi.entry(var.name.clone()).or_insert(None);
            match &var.value {
                // gcfg: a multi-valued key without a value empties the list.
                None => *list = None,
                Some(value) => list.get_or_insert_with(Vec::new).push(value.clone()),
            }
        } else {
            if var.value.is_none() && !GCFG_BOOLS.contains(&var.name.as_str()) {
                p.push(
                    file,
                    &key,
                    format!("line {}: has no value (gcfg: blank value not supported for type)", var.line),
                );
            }
            if let Some((_, line)) = v.single.get(&var.name) {
                r.note(format!(
                    "{key} is given more than once (lines {line} and {}); like the provider, the import keeps the last.",
                    var.line
                ));
            }
            v.single.insert(var.name.clone(), (var.value.clone(), var.line));
        }
    }
    v
}

impl Values {
    fn string(&self, key: &str) -> Option<String> {
        self.single.get(key).and_then(|(v, _)| v.clone())
    }

    fn non_empty(&self, key: &str) -> Option<String> {
        self.string(key).filter(|s| !s.is_empty())
    }

    fn list(&self, key: &str) -> Option<Vec<String>> {
        self.multi.get(key).cloned().flatten()
    }

    /// A gcfg bool (blank = true).
    fn gcfg_bool(&self, key: &str, where_: &str, file: &str, p: &mut Problems) -> Option<bool> {
        let (value, _) = self.single.get(key)?;
        match value.as_deref().map(str::to_ascii_lowercase).as_deref() {
            None | Some("true" | "yes" | "on" | "1") => Some(true),
            Some("false" | "no" | "off" | "0") => Some(false),
            Some(other) => {
                p.push(
                    file,
                    &format!("{where_} {key}"),
                    format!("{other:?} is not a boolean (true/yes/on/1, false/no/off/0)"),
                );
                None
            }
        }
    }
}

/// Go's strconv.Atoi, as the provider parses sizes.
fn atoi(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

pub fn import(req: &Request, sources: &[Source]) -> Result<Import, Error> {
    let [source] = sources else {
        return Err(Error::Usage(
            "the kamatera import reads one file: the cloud-config (or the Secret holding it)".into(),
        ));
    };
    let (text, file) = super::cloud_config_text(source).map_err(|p| Error::Input(vec![p]))?;
    let sections = gcfg::parse(&text).map_err(|e| {
        Error::Input(vec![super::Problem {
            file: file.clone(),
            key: String::new(),
            message: format!("{e} (cluster-autoscaler's gcfg reader refuses this file too)"),
        }])
    })?;
    let mut p = Problems::default();
    let mut r = Report::new("cluster-autoscaler Kamatera provider");
    let mut doc = Document::default();
    let mut files = Vec::new();

    let empty = Section { name: "global".into(), sub: None, line: 0, vars: Vec::new() };
    let global_section = sections.iter().find(|s| s.name == "global" && s.sub.is_none()).unwrap_or(&empty);
    for s in &sections {
        match (s.name.as_str(), &s.sub) {
            ("global", None) | ("nodegroup", Some(_)) => {}
            ("nodegroup", None) => p.push(&file, "[nodegroup]", "a node group needs a name: [nodegroup \"NAME\"]"),
            (name, sub) => {
                let header = match sub {
                    Some(sub) => format!("[{name} \"{sub}\"]"),
                    None => format!("[{name}]"),
                };
                for v in &s.vars {
                    r.dropped(
                        &format!("{header} {}", v.name),
                        None,
                        "not a section of the Kamatera provider, which refuses the whole file for it",
                    );
                }
                if s.vars.is_empty() {
                    r.dropped(
                        &header,
                        None,
                        "not a section of the Kamatera provider, which refuses the whole file for it",
                    );
                }
            }
        }
    }
    let g = collect(global_section, GLOBAL_KEYS, "[global]", &file, &mut p, &mut r);
    doc.root.comment(format!("Imported by `flotilla import kamatera` from {file}."));
    doc.root.comment(
        "Flotilla adopts the servers the in-tree provider created: same tags (k8sca-<cluster>, k8scang-<group>), \
         same provider ids.",
    );

    // The cluster name: Flotilla's cluster_name is a DNS label; the tag keeps the provider's.
    let cluster = g.non_empty("cluster-name");
    let cluster_label = match &cluster {
        None => {
            p.push(
                &file,
                "[global] cluster-name",
                "is required (the provider: \"cluster name is not set\"); it is the k8sca-<name> tag",
            );
            String::new()
        }
        Some(c) if c.chars().count() > MAX_NAME => {
            p.push(
                &file,
                "[global] cluster-name",
                format!("{c:?} is {} characters; the provider allows at most {MAX_NAME} (Kamatera tags are 24 with the k8sca- prefix)", c.chars().count()),
            );
            String::new()
        }
        Some(c) => super::dns_label(c),
    };
    if let Some(flag) = &req.cluster_name {
        return Err(Error::Usage(format!(
            "--cluster-name {flag:?}: the cluster name of a Kamatera import is the provider's cluster-name (the k8sca- tag of its servers)"
        )));
    }
    doc.root.set("cluster_name", cluster_label.as_str(), Some("[global] cluster-name"));
    r.mapped("[global] cluster-name", "cluster_name");

    let cloud_path = format!("clouds.{CLOUD}");
    let cloud = doc.root.table(&cloud_path);
    cloud.set("driver", "kamatera", None);
    if let Some(c) = &cluster
        && !cluster_label.is_empty()
        && *c != cluster_label
    {
        cloud.set(
            "tag_cluster_name",
            c.as_str(),
            Some("The provider's cluster-name, kept for the k8sca- tag (Flotilla's cluster_name must be a DNS label)."),
        );
        r.mapped("[global] cluster-name", &format!("{cloud_path}.tag_cluster_name"));
    }
    if let Some(url) = g.non_empty("kamatera-api-url") {
        cloud.set("api_url", url.as_str(), Some("[global] kamatera-api-url"));
        r.mapped("[global] kamatera-api-url", &format!("{cloud_path}.api_url"));
    }
    for (key, out_key, var) in [
        ("kamatera-api-client-id", "api_client_id", "KAMATERA_API_CLIENT_ID"),
        ("kamatera-api-secret", "api_secret", "KAMATERA_API_SECRET"),
    ] {
        cloud.set(out_key, Out::SecretEnv(var.into()), Some(&format!("[global] {key}")));
        if g.non_empty(key).is_some() {
            r.secret(
                &format!("[global] {key}"),
                var,
                &format!("{cloud_path}.{out_key}"),
                &format!("[global] {key} in {file}"),
            );
        } else {
            p.push(&file, &format!("[global] {key}"), "is required (the provider: \"kamatera api ... is not set\")");
        }
    }
    if let Some(prefix) = g.non_empty("filter-name-prefix") {
        cloud.set("filter_name_prefix", prefix.as_str(), Some("[global] filter-name-prefix"));
        r.mapped("[global] filter-name-prefix", &format!("{cloud_path}.filter_name_prefix"));
    }
    let id_prefix = g.non_empty("provider-id-prefix");
    if id_prefix.is_some() {
        r.mapped("[global] provider-id-prefix", "groups.*.provider_id");
    }
    let provider_id = format!("{}{{name}}", id_prefix.as_deref().unwrap_or("kamatera://"));
    // The power keys: a group's value wins when it is set, else [global]'s; read per group below.
    let global_power: BTreeMap<&str, bool> = ["poweroff-on-scale-down", "poweron-on-scale-up"]
        .into_iter()
        .filter_map(|key| Some((key, g.gcfg_bool(key, "[global]", &file, &mut p)?)))
        .collect();
    let mut pools = 0;

    // Sizes.
    let size = |v: &Values, key: &str, default: i64, where_: &str, p: &mut Problems| -> i64 {
        match v.non_empty(key) {
            None => default,
            Some(s) => match atoi(&s) {
                Some(n) => n,
                None => {
                    p.push(
                        &file,
                        &format!("{where_} {key}"),
                        format!("{s:?} is not a whole number (the provider: could not parse)"),
                    );
                    default
                }
            },
        }
    };
    let default_min = size(&g, "default-min-size", 1, "[global]", &mut p);
    let default_max = size(&g, "default-max-size", 254, "[global]", &mut p);
    for key in ["default-min-size", "default-max-size"] {
        if g.single.contains_key(key) {
            r.mapped(
                &format!("[global] {key}"),
                &format!("groups.*.{}", if key.contains("min") { "min_size" } else { "max_size" }),
            );
        }
    }

    // Server defaults: [clouds.kamatera.defaults].
    let defaults_path = format!("{cloud_path}.defaults");
    let (default_script, default_password) = {
        let mut server = ServerKeys::from_values(&g, "default-");
        let d = doc.root.table(&defaults_path);
        d.comment("The provider's [global] default-* server keys; a group's machine table overrides any of them.");
        server.write(d, "[global] default-", &defaults_path, &file, &mut r, &mut p);
        (server.script.take(), server.password)
    };
    if let Some(b64) = &default_script {
        match decode_script(b64) {
            Ok(script) => {
                files.push(ExtraFile { name: "kamatera-init.sh".into(), content: raw_template(&script) });
                doc.root.table(&defaults_path).set(
                    "script_file",
                    "kamatera-init.sh",
                    Some("[global] default-script-base64, decoded into this file (mode 0600: an init script holds the join token)."),
                );
                r.mapped("[global] default-script-base64", &format!("{defaults_path}.script_file (kamatera-init.sh)"));
            }
            Err(e) => p.push(&file, "[global] default-script-base64", e),
        }
    }
    if default_password {
        doc.root.table(&defaults_path).set(
            "password",
            Out::SecretEnv("KAMATERA_ROOT_PASSWORD".into()),
            Some("[global] default-password"),
        );
        r.secret(
            "[global] default-password",
            "KAMATERA_ROOT_PASSWORD",
            &format!("{defaults_path}.password"),
            &format!("[global] default-password in {file}"),
        );
    }

    // Node groups.
    let groups: Vec<&Section> = sections.iter().filter(|s| s.name == "nodegroup" && s.sub.is_some()).collect();
    if groups.is_empty() {
        p.push(
            &file,
            "[nodegroup \"NAME\"]",
            "at least one node group is required (the provider only scales the groups its config names)",
        );
    }
    let mut used_labels: BTreeMap<String, String> = BTreeMap::new();
    for section in groups {
        let name = section.sub.clone().unwrap_or_default();
        let where_ = format!("[nodegroup \"{name}\"]");
        let v = collect(section, GROUP_KEYS, &where_, &file, &mut p, &mut r);
        if name.chars().count() > MAX_NAME {
            p.push(
                &file,
                &where_,
                format!(
                    "the name is {} characters; the provider allows at most {MAX_NAME} (the k8scang- tag)",
                    name.chars().count()
                ),
            );
            continue;
        }
        let label = super::dns_label(&name);
        if label.is_empty() {
            p.push(&file, &where_, "the name has no letters or digits to name a Flotilla group with");
            continue;
        }
        if let Some(other) = used_labels.insert(label.clone(), name.clone()) {
            p.push(&file, &where_, format!("becomes group {label:?} in Flotilla, as [nodegroup \"{other}\"] does"));
            continue;
        }
        let group_path = format!("groups.{label}");
        let group = doc.root.table(&group_path);
        group.comment(format!("{where_}: its servers carry k8scang-{name}."));
        group.set("cloud", CLOUD, None);
        let min = size(&v, "min-size", default_min, &where_, &mut p);
        let max = size(&v, "max-size", default_max, &where_, &mut p);
        if min < 0 {
            p.push(&file, &format!("{where_} min-size"), "must not be negative (the provider: cannot be < 0)");
        } else if min > max {
            p.push(
                &file,
                &format!("{where_} max-size"),
                format!("{max} is below min-size {min} (the provider refuses it too)"),
            );
        }
        let from = |key: &str, global: &str| {
            if v.non_empty(key).is_some() {
                format!("{where_} {key}")
            } else if g.non_empty(global).is_some() {
                format!("[global] {global}")
            } else {
                format!("the provider's default ({})", if key == "min-size" { default_min } else { default_max })
            }
        };
        group.set("min_size", min, Some(&from("min-size", "default-min-size")));
        group.set("max_size", max, Some(&from("max-size", "default-max-size")));
        for key in ["min-size", "max-size"] {
            if v.single.contains_key(key) {
                r.mapped(&format!("{where_} {key}"), &format!("{group_path}.{}", key.replace('-', "_")));
            }
        }
        let prefix = v.non_empty("name-prefix").or_else(|| g.non_empty("default-name-prefix"));
        match &prefix {
            Some(pfx) => {
                let dns = super::dns_label(pfx);
                if !dns.is_empty() {
                    group.set("name_prefix", dns.as_str(), Some("name-prefix: new servers are <prefix>-<random>"));
                    if dns != *pfx {
                        r.note(format!(
                            "{where_}: new servers are named {dns}-<random> (name-prefix {pfx:?} is not a DNS label). \
                             Existing servers keep their names; adoption goes by tags, not names."
                        ));
                    }
                }
                if v.single.contains_key("name-prefix") {
                    r.mapped(&format!("{where_} name-prefix"), &format!("{group_path}.name_prefix"));
                }
            }
            None => r.note(format!(
                "{where_}: the provider named servers with 11 random hex characters and no prefix; Flotilla names new \
                 ones {cluster_label}-{label}-<random>."
            )),
        }
        group.set(
            "provider_id",
            provider_id.as_str(),
            Some("What the provider reported: <provider-id-prefix><server name>."),
        );
        // Power keys -> a warm pool.
        let power = |key: &'static str, p: &mut Problems| -> (bool, String) {
            match v.non_empty(key) {
                Some(s) => match parse_go_bool(&s) {
                    Some(on) => (on, format!("{where_} {key}")),
                    None => {
                        p.push(
                            &file,
                            &format!("{where_} {key}"),
                            format!(
                                "{s:?} is not a boolean Go's strconv.ParseBool reads (1, t, true, 0, f, false, ...)"
                            ),
                        );
                        (false, format!("{where_} {key}"))
                    }
                },
                None => (global_power.get(key).copied().unwrap_or(false), format!("[global] {key}")),
            }
        };
        let (off, off_key) = power("poweroff-on-scale-down", &mut p);
        let (on, on_key) = power("poweron-on-scale-up", &mut p);
        let max_servers_key = format!("{where_} poweroff-on-scale-down-max-servers");
        let max_servers = match v.non_empty("poweroff-on-scale-down-max-servers") {
            None => 0,
            Some(s) => match atoi(&s).filter(|n| *n >= 0) {
                Some(n) => n,
                None => {
                    p.push(&file, &max_servers_key, format!("{s:?} is not a whole number of 0 or more"));
                    0
                }
            },
        };
        if off {
            // The provider keeps up to max-servers powered off (0: no limit); more than max_size
            // pool machines could never all be started, so "no limit" is max_size.
            let pool = if max_servers > 0 { max_servers.min(max) } else { max };
            group.set(
                "warm_pool",
                pool.max(0),
                Some(&format!(
                    "{off_key}{}: scaled-down servers are powered off into the pool and powered on first on \
                     scale-up.",
                    if max_servers > 0 { " (max-servers)" } else { " with no max-servers: up to max_size" }
                )),
            );
            pools += 1;
            r.mapped(&off_key, &format!("{group_path}.warm_pool"));
            if v.non_empty("poweroff-on-scale-down-max-servers").is_some() {
                r.mapped(&max_servers_key, &format!("{group_path}.warm_pool"));
            }
            if on {
                r.mapped(&on_key, &format!("{group_path}.warm_pool"));
            } else {
                r.note(format!(
                    "{where_}: poweron-on-scale-up was off, so the provider never powered its powered-off servers \
                     on again; Flotilla's warm pool starts them first on scale-up (that is what a pool is for)."
                ));
            }
            r.note(format!(
                "{where_}: the servers the provider powered off carry the group's tags and join Flotilla's warm pool \
                 (up to warm_pool = {pool}; any beyond it are terminated)."
            ));
        } else {
            if v.non_empty("poweroff-on-scale-down-max-servers").is_some() {
                r.dropped(&max_servers_key, None, "poweroff-on-scale-down is off, so the provider ignored it too");
            }
            for (key, on, at) in [("poweroff-on-scale-down", off, &off_key), ("poweron-on-scale-up", on, &on_key)] {
                if v.non_empty(key).is_some() || global_power.contains_key(key) {
                    power_key(&mut r, at, on);
                }
            }
        }

        let machine_path = format!("{group_path}.machine");
        let machine = doc.root.table(&machine_path);
        if label != name {
            machine.set(
                "tag_group_name",
                name.as_str(),
                Some("The provider's node group name, kept for the k8scang- tag."),
            );
        }
        let mut server = ServerKeys::from_values(&v, "");
        // gcfg + the provider: a group's dailybackup/managed only ever turn the default on.
        for key in ["dailybackup", "managed"] {
            let global =
                g.gcfg_bool(&format!("default-{key}"), "[global]", &file, &mut Problems::default()).unwrap_or(false);
            if let Some(mine) = v.gcfg_bool(key, &where_, &file, &mut p) {
                if !mine && global {
                    r.note(format!(
                        "{where_} {key} = false is ignored by the provider when [global] default-{key} is on; \
                         imported as it ran (on). Set {} = false in [{machine_path}] to turn it off.",
                        if key == "dailybackup" { "daily_backup" } else { "managed" }
                    ));
                }
                server.bools.insert(key, mine || global);
            }
        }
        server.write(machine, &format!("{where_} "), &machine_path, &file, &mut r, &mut p);
        if let Some(b64) = server.script.take() {
            match decode_script(&b64) {
                Ok(script) => {
                    let name_file = format!("kamatera-init-{label}.sh");
                    files.push(ExtraFile { name: name_file.clone(), content: raw_template(&script) });
                    doc.root.table(&machine_path).set(
                        "script_file",
                        name_file.as_str(),
                        Some(&format!("{where_} script-base64, decoded into this file (mode 0600).")),
                    );
                    r.mapped(&format!("{where_} script-base64"), &format!("{machine_path}.script_file ({name_file})"));
                }
                Err(e) => p.push(&file, &format!("{where_} script-base64"), e),
            }
        }
        if server.password {
            let var = format!("KAMATERA_ROOT_PASSWORD_{}", label.to_ascii_uppercase().replace('-', "_"));
            doc.root.table(&machine_path).set(
                "password",
                Out::SecretEnv(var.clone()),
                Some(&format!("{where_} password")),
            );
            r.secret(
                &format!("{where_} password"),
                &var,
                &format!("{machine_path}.password"),
                &format!("{where_} password in {file}"),
            );
        }
        let mut labels = BTreeMap::new();
        for l in v.list("template-label").unwrap_or_default() {
            match l.split_once('=') {
                Some((k, val)) => {
                    labels.insert(k.to_owned(), val.to_owned());
                }
                None => r.note(format!(
                    "{where_} template-label {l:?} has no '=': the provider ignored it, and so does the import."
                )),
            }
        }
        if v.seen.iter().any(|k| k == "template-label") {
            r.mapped(&format!("{where_} template-label"), &format!("{group_path}.template.labels"));
        }
        if !labels.is_empty() {
            doc.root.table(&format!("{group_path}.template")).set("labels", labels, Some("template-label"));
        }
        if default_script.is_none() && !v.single.contains_key("script-base64") {
            r.note(format!(
                "{where_} has no script-base64 (nor [global] default-script-base64): its servers would never join; \
                 set script or script_file in [{machine_path}]."
            ));
        }
    }
    if pools > 0 {
        doc.root.table(&cloud_path).set(
            "node_cleanup",
            true,
            Some("warm_pool needs it: a powered-off server's Node is removed, so cluster-autoscaler does not count it NotReady."),
        );
        r.note(
            "node_cleanup (for the warm pools) has Flotilla delete Nodes through the Kubernetes API: in a pod with its \
             service account, which needs delete on Nodes (the chart grants it with flotilla.nodeCleanup.enabled=true, \
             in the Helm values printed below); outside a cluster, set [kubernetes] kubeconfig.",
        );
    }
    for key in global_power.keys() {
        let key = format!("[global] {key}");
        if !r.accounts_for(&key) {
            r.dropped(&key, None, "every node group sets its own");
        }
    }
    // Keys given empty: the provider uses its default for them, and so does the import.
    for section in &sections {
        let where_ = match &section.sub {
            Some(sub) if section.name == "nodegroup" => format!("[nodegroup \"{sub}\"]"),
            _ if section.name == "global" => "[global]".to_owned(),
            _ => continue,
        };
        for var in &section.vars {
            let key = format!("{where_} {}", var.name);
            if !r.accounts_for(&key) {
                let shown = (!super::looks_secret(&var.name)).then(|| var.value.clone().unwrap_or_default());
                r.dropped(&key, shown.as_deref(), "empty: the provider used its default, and so does Flotilla");
            }
        }
    }
    r.note(
        "Existing servers are adopted, not recreated: Flotilla's Kamatera driver lists servers tagged \
         k8sca-<cluster> and k8scang-<group>, exactly as the in-tree provider tagged them, and reports them with the \
         same provider ids, so their Nodes keep matching. Stop the in-tree cluster-autoscaler before starting the new \
         one, so only one of them acts on the servers.",
    );
    p.into_result()?;
    Ok(Import { document: doc, report: r, files })
}

/// The server keys of one section (`default-X` in `[global]`, `X` in a group).
struct ServerKeys {
    strings: Vec<(&'static str, &'static str, String)>,
    lists: Vec<(&'static str, &'static str, Vec<String>)>,
    bools: BTreeMap<&'static str, bool>,
    ram: Option<String>,
    script: Option<String>,
    password: bool,
    seen: Vec<String>,
}

impl ServerKeys {
    fn from_values(v: &Values, prefix: &str) -> ServerKeys {
        let k = |key: &str| format!("{prefix}{key}");
        let mut s = ServerKeys {
            strings: Vec::new(),
            lists: Vec::new(),
            bools: BTreeMap::new(),
            ram: v.non_empty(&k("ram")),
            script: v.non_empty(&k("script-base64")),
            password: v.non_empty(&k("password")).is_some(),
            seen: v.seen.clone(),
        };
        for (key, out) in [
            ("datacenter", "datacenter"),
            ("image", "image"),
            ("cpu", "cpu"),
            ("billingcycle", "billing_cycle"),
            ("monthlypackage", "monthly_package"),
            ("ssh-key", "ssh_key"),
        ] {
            if let Some(val) = v.non_empty(&k(key)) {
                s.strings.push((key, out, val));
            }
        }
        for (key, out) in [("disk", "disks"), ("network", "networks")] {
            if let Some(list) = v.list(&k(key)) {
                s.lists.push((key, out, list));
            }
        }
        if prefix == "default-" {
            for key in ["dailybackup", "managed"] {
                if let Some((val, _)) = v.single.get(&k(key)) {
                    let on = matches!(
                        val.as_deref().map(str::to_ascii_lowercase).as_deref(),
                        None | Some("true" | "yes" | "on" | "1")
                    );
                    s.bools.insert(if key == "dailybackup" { "dailybackup" } else { "managed" }, on);
                }
            }
        }
        s
    }

    fn write(
        &self,
        t: &mut super::out::Table,
        from_prefix: &str,
        path: &str,
        file: &str,
        r: &mut Report,
        p: &mut Problems,
    ) {
        for (key, out, val) in &self.strings {
            let val = match *key {
                "cpu" if val.chars().last().is_some_and(|c| c.is_ascii_lowercase()) => {
                    let up = val.to_ascii_uppercase();
                    r.note(format!(
                        "{from_prefix}cpu {val:?}: Kamatera's CPU type letter is upper-case; imported as {up:?}."
                    ));
                    up
                }
                "billingcycle" => val.to_ascii_lowercase(),
                _ => val.clone(),
            };
            t.set(out, val.as_str(), Some(&format!("{from_prefix}{key}")));
            r.mapped(&format!("{from_prefix}{key}"), &format!("{path}.{out}"));
        }
        if let Some(ram) = &self.ram {
            match ram.trim().parse::<i64>() {
                Ok(mb) if mb > 0 => {
                    t.set("ram", mb, Some(&format!("{from_prefix}ram (MB)")));
                    r.mapped(&format!("{from_prefix}ram"), &format!("{path}.ram"));
                }
                _ => p.push(file, &format!("{from_prefix}ram"), format!("{ram:?} is not a size in MB")),
            }
        }
        for (key, out, list) in &self.lists {
            t.set(out, list.clone(), Some(&format!("{from_prefix}{key} (repeated)")));
            r.mapped(&format!("{from_prefix}{key}"), &format!("{path}.{out}"));
        }
        for (key, on) in &self.bools {
            let out = if *key == "dailybackup" { "daily_backup" } else { "managed" };
            t.set(out, *on, Some(&format!("{from_prefix}{key}")));
            r.mapped(&format!("{from_prefix}{key}"), &format!("{path}.{out}"));
        }
        let name_prefix_key =
            format!("{}name-prefix", if from_prefix.starts_with("[global]") { "default-" } else { "" });
        if self.seen.contains(&name_prefix_key) && from_prefix.starts_with("[global]") {
            r.mapped(&format!("[global] {name_prefix_key}"), "groups.*.name_prefix");
        }
    }
}

/// A power key of a group without `poweroff-on-scale-down`, so without a warm pool.
fn power_key(r: &mut Report, key: &str, on: bool) {
    let why = if on {
        "without poweroff-on-scale-down Flotilla keeps no warm pool, so scale-up creates new servers. A powered-off \
         server of the group is listed as failed (POWERED_OFF) and cluster-autoscaler deletes it: power such servers \
         on before switching, or set warm_pool and node_cleanup to keep them"
    } else if key.ends_with("poweron-on-scale-up") {
        "off, as Flotilla always is: scale-up creates new servers"
    } else {
        "off, as Flotilla always is: scale-down terminates the server"
    };
    r.dropped(key, Some(if on { "true" } else { "false" }), why);
}

/// Go's strconv.ParseBool, which the provider uses for a group's power keys.
fn parse_go_bool(s: &str) -> Option<bool> {
    match s {
        "1" | "t" | "T" | "TRUE" | "true" | "True" => Some(true),
        "0" | "f" | "F" | "FALSE" | "false" | "False" => Some(false),
        _ => None,
    }
}

fn decode_script(b64: &str) -> Result<String, String> {
    let cleaned: String = b64.chars().filter(|c| !c.is_whitespace()).collect();
    let bytes = base64::engine::general_purpose::STANDARD.decode(&cleaned).map_err(|e| {
        format!("is not base64 ({e}); the provider would send it as it is and Kamatera would run garbage")
    })?;
    String::from_utf8(bytes).map_err(|_| "does not decode to text".to_owned())
}

/// The script as a template that renders to itself: Flotilla renders init scripts with
/// minijinja, so text that looks like template syntax (`{#` in `${#array[@]}`) is kept raw.
fn raw_template(script: &str) -> String {
    if script.contains("{{") || script.contains("{%") || script.contains("{#") {
        format!("{{% raw %}}{script}{{% endraw %}}")
    } else {
        script.to_owned()
    }
}
