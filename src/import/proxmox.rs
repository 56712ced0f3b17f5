//! The Proxmox autoscaler (a Python loop for kubeadm clusters): its settings are the `pxe_*`
//! keys and timers of `autoscaler/settings.py`, given as that file, as the Kubernetes manifest
//! that mounts it (ConfigMaps: `settings` holding the module, others holding `PXE_*` variables
//! the module reads with `os.environ`), as a YAML map of the same keys, or as an env file
//! (`PXE_HOST=...`).
//!
//! Values are resolved as the seed resolves them: `--set` first, then the module's assignment
//! (an `os.environ` lookup takes the variable from an env input, else its `except` default),
//! then an env input named like the key in upper case, then the seed's documented default.
//! Values the seed's code makes, not its settings, are carried over too: VMs join with the
//! output of `kubeadm token create --print-join-command` run through the guest agent, and get
//! the label `<node_group_label>=true` once they joined.

use std::collections::BTreeMap;

use base64::Engine as _;
use serde_yaml::Value;

use super::{
    Error, Import, Problems, Request, Source,
    out::{Document, Value as Out},
    pysettings::{self, PyValue},
    report::Report,
};

const CLOUD: &str = "pve";
const GROUP: &str = "workers";

/// The seed's settings and their documented defaults (README, "Settings").
const DEFAULTS: &[(&str, Option<&str>)] = &[
    ("pxe_host", None),
    ("pxe_user", None),
    ("pxe_password", None),
    ("pxe_autoscaled_node_template_vm", None),
    ("pxe_autoscaled_node_name", Some("autoscaler.node")),
    ("pxe_autoscaled_node_network_mode", Some("manual")),
    ("pxe_autoscaled_node_ip_pool", None),
    ("pxe_autoscaled_node_ip_mask", Some("24")),
    ("pxe_autoscaled_node_ip_gateway", None),
    ("pxe_autoscaled_node_dns_server", None),
    ("node_group_label", Some("pxe-autoscaler/autoscaler-managed-node")),
    ("min_size", Some("0")),
    ("max_size", Some("5")),
    ("scan_interval", Some("15")),
    ("max_node_provision_time", Some("900")),
    ("scale_down_unneeded_time", Some("600")),
    ("scale_down_delay", Some("600")),
    ("scale_up_delay_after_add", Some("300")),
    ("scale_down_delay_after_add", Some("600")),
    ("scale_down_delay_after_error", Some("600")),
    ("scale_down_utilization_threshold", Some("50")),
    ("max_total_unready_percentage", Some("45")),
    ("ok_total_unready_count", Some("3")),
];

/// A setting as read, and where it came from.
#[derive(Clone, Debug)]
struct Found {
    value: PyValue,
    origin: String,
}

/// Everything the inputs say.
#[derive(Default)]
struct Inputs {
    settings: Vec<(String, Found)>,
    /// Environment variables the inputs set (ConfigMaps, Secrets, env files).
    env: BTreeMap<String, Found>,
}

impl Inputs {
    fn add_setting(&mut self, name: &str, found: Found) {
        match self.settings.iter_mut().find(|(n, _)| n == name) {
            Some((_, f)) => *f = found,
            None => self.settings.push((name.to_owned(), found)),
        }
    }

    fn add_python(&mut self, text: &str, origin: &str) {
        for s in pysettings::parse(text) {
            if s.name == "os" {
                continue;
            }
            self.add_setting(&s.name, Found { value: s.value, origin: format!("{origin}:{}", s.line) });
        }
    }

    fn add_yaml(&mut self, text: &str, origin: &str, problems: &mut Problems) {
        let docs: Vec<Value> = match serde_yaml::Deserializer::from_str(text)
            .map(serde::Deserialize::deserialize)
            .collect::<Result<Vec<Value>, _>>()
        {
            Ok(d) => d,
            Err(e) => return problems.push(origin, "", format!("not YAML: {e}")),
        };
        for doc in docs {
            let kind = doc.get("kind").and_then(Value::as_str);
            let name = doc.get("metadata").and_then(|m| m.get("name")).and_then(Value::as_str).unwrap_or("?");
            match kind {
                Some("ConfigMap") | Some("Secret") => {
                    let where_ = format!("{origin} ({} {name})", kind.unwrap_or_default());
                    let mut entries: Vec<(String, String)> = Vec::new();
                    for field in ["data", "stringData"] {
                        let encoded = kind == Some("Secret") && field == "data";
                        for (k, v) in doc.get(field).and_then(Value::as_mapping).into_iter().flatten() {
                            let (Some(k), Some(v)) = (k.as_str(), super::yaml::scalar(v)) else { continue };
                            let v = if encoded {
                                match base64::engine::general_purpose::STANDARD.decode(v.trim()) {
                                    Ok(b) => String::from_utf8_lossy(&b).into_owned(),
                                    Err(_) => continue,
                                }
                            } else {
                                v
                            };
                            entries.push((k.to_owned(), v));
                        }
                    }
                    for (k, v) in entries {
                        if v.contains('\n') && v.contains('=') {
                            self.add_python(&v, &format!("{where_} {k}"));
                        } else {
                            self.env
                                .insert(k.clone(), Found { value: PyValue::Str(v), origin: format!("{where_} {k}") });
                        }
                    }
                }
                Some(_) => {}
                None => {
                    for (k, v) in doc.as_mapping().into_iter().flatten() {
                        let Some(k) = k.as_str() else { continue };
                        let value = match v {
                            Value::String(s) => PyValue::Str(s.clone()),
                            Value::Bool(b) => PyValue::Bool(*b),
                            Value::Number(n) => match n.as_i64() {
                                Some(i) => PyValue::Int(i),
                                None => PyValue::Float(n.as_f64().unwrap_or_default()),
                            },
                            other => PyValue::Unknown(super::yaml::show(other)),
                        };
                        self.add_setting(k, Found { value, origin: format!("{origin} {k}") });
                    }
                }
            }
        }
    }

    fn add_env_file(&mut self, text: &str, origin: &str) {
        for (i, line) in text.lines().enumerate() {
            let t = line.trim();
            let t = t.strip_prefix("export ").unwrap_or(t);
            if t.starts_with('#') {
                continue;
            }
            let Some((k, v)) = t.split_once('=') else { continue };
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            let found = Found { value: PyValue::Str(v.to_owned()), origin: format!("{origin}:{}", i + 1) };
            let k = k.trim();
            if k.chars().any(|c| c.is_ascii_lowercase()) {
                self.add_setting(k, found);
            } else {
                self.env.insert(k.to_owned(), found);
            }
        }
    }
}

/// One resolved setting.
#[derive(Clone, Debug)]
struct Resolved {
    value: PyValue,
    /// Where the value is: file and line, ConfigMap key, `--set`, or the seed's default.
    origin: String,
    /// The environment variable the seed read it from, if any.
    env_var: Option<String>,
}

impl Resolved {
    fn text(&self) -> Option<String> {
        match &self.value {
            PyValue::Str(s) => Some(s.clone()),
            PyValue::Int(i) => Some(i.to_string()),
            PyValue::Float(f) => Some(f.to_string()),
            PyValue::Bool(b) => Some(b.to_string()),
            _ => None,
        }
    }

    fn number(&self) -> Option<f64> {
        self.text().and_then(|t| t.trim().parse().ok())
    }
}

fn resolve(name: &str, inputs: &Inputs, overrides: &[(String, String)]) -> Option<Resolved> {
    if let Some((_, v)) = overrides.iter().rev().find(|(k, _)| k == name) {
        return Some(Resolved { value: PyValue::Str(v.clone()), origin: "--set".into(), env_var: None });
    }
    if let Some((_, f)) = inputs.settings.iter().find(|(n, _)| n == name) {
        return Some(match &f.value {
            PyValue::Env { var, default } => match (inputs.env.get(var), default) {
                (Some(e), _) => {
                    Resolved { value: e.value.clone(), origin: e.origin.clone(), env_var: Some(var.clone()) }
                }
                (None, Some(d)) => Resolved {
                    value: (**d).clone(),
                    origin: format!("{} (the default when {var} is unset)", f.origin),
                    env_var: Some(var.clone()),
                },
                (None, None) => Resolved {
                    value: PyValue::Unknown(format!("the environment variable {var}")),
                    origin: f.origin.clone(),
                    env_var: Some(var.clone()),
                },
            },
            other => Resolved { value: other.clone(), origin: f.origin.clone(), env_var: None },
        });
    }
    if let Some(e) = inputs.env.get(&name.to_ascii_uppercase()) {
        return Some(Resolved {
            value: e.value.clone(),
            origin: e.origin.clone(),
            env_var: Some(name.to_ascii_uppercase()),
        });
    }
    let default = DEFAULTS.iter().find(|(n, _)| *n == name).and_then(|(_, d)| *d)?;
    Some(Resolved { value: PyValue::Str(default.to_owned()), origin: "the seed's default".into(), env_var: None })
}

pub fn import(req: &Request, sources: &[Source]) -> Result<Import, Error> {
    let mut problems = Problems::default();
    let mut inputs = Inputs::default();
    for s in sources {
        let name = s.name();
        let ext = s.path.extension().and_then(|e| e.to_str()).unwrap_or_default();
        match ext {
            "py" => inputs.add_python(&s.text, &name),
            "yaml" | "yml" | "json" => inputs.add_yaml(&s.text, &name, &mut problems),
            "env" => inputs.add_env_file(&s.text, &name),
            _ if s.text.lines().any(|l| l.trim_start().starts_with("PXE_")) => inputs.add_env_file(&s.text, &name),
            _ => inputs.add_python(&s.text, &name),
        }
    }
    for (k, _) in &req.overrides {
        if !DEFAULTS.iter().any(|(n, _)| n == k) {
            problems.push("--set", k, "is not a setting of the Proxmox autoscaler");
        }
    }
    let get = |name: &str| resolve(name, &inputs, &req.overrides);
    let mut r = Report::new("Proxmox autoscaler");
    let mut doc = Document::default();
    let sources_list = sources.iter().map(Source::name).collect::<Vec<_>>().join(", ");
    doc.root.comment(format!("Imported by `flotilla import proxmox` from {sources_list}."));
    let cluster = req.cluster_name.clone().unwrap_or_else(|| "kubernetes".into());
    doc.root.set(
        "cluster_name",
        super::dns_label(&cluster).as_str(),
        Some("The seed has no cluster name (kubeadm's default is \"kubernetes\"); it marks every VM Flotilla creates."),
    );

    // The Proxmox cloud.
    let cloud_path = format!("clouds.{CLOUD}");
    let cloud = doc.root.table(&cloud_path);
    cloud.set("driver", "proxmox", None);
    match get("pxe_host").and_then(|h| h.text()) {
        Some(host) if !host.trim().is_empty() => {
            let host = host.trim();
            let url = if host.contains("://") {
                host.to_owned()
            } else if host.contains(':') && !host.starts_with('[') && host.matches(':').count() == 1 {
                format!("https://{host}")
            } else {
                format!("https://{host}:8006")
            };
            cloud.set("url", url.as_str(), Some("pxe_host, on the API port the seed's client used (8006)"));
            r.mapped("pxe_host", &format!("{cloud_path}.url"));
        }
        _ => problems.push(&sources_list, "pxe_host", "is required: the Proxmox VE host the VMs are created on"),
    }
    match get("pxe_user").and_then(|u| u.text()) {
        Some(user) if user.contains('@') => {
            cloud.set("username", user.as_str(), Some("pxe_user"));
            r.mapped("pxe_user", &format!("{cloud_path}.username"));
        }
        Some(user) => problems.push(&sources_list, "pxe_user", format!("{user:?} must be USER@REALM (e.g. root@pam)")),
        None => problems.push(&sources_list, "pxe_user", "is required: the Proxmox user, USER@REALM"),
    }
    let password = get("pxe_password");
    let var = password.as_ref().and_then(|p| p.env_var.clone()).unwrap_or_else(|| "PXE_PASSWORD".into());
    cloud.set("password", Out::SecretEnv(var.clone()), Some("pxe_password"));
    let whence = match &password {
        Some(p) if p.origin != "the seed's default" => format!("the Proxmox password: pxe_password, from {}", p.origin),
        _ => "the Proxmox password of pxe_user (not in the inputs)".to_owned(),
    };
    r.secret("pxe_password", &var, &format!("{cloud_path}.password"), &whence);
    r.note(
        "The seed connected with verify_ssl=False. Flotilla always verifies the API's certificate: add \
         tls_fingerprint = \"<SHA-256 of the node's certificate>\" (pvenode cert info) or ca_file = \
         \"/etc/pve/pve-root-ca.pem\" to [clouds.pve], unless the certificate is publicly trusted. An API token \
         (token_id, token_secret) is better than a password: it can be limited to the privileges Flotilla needs.",
    );
    r.note(
        "The seed always used the first node of the cluster; Flotilla places each VM on the online node with the \
         most free memory (set nodes = [...] in [clouds.pve] to restrict it).",
    );

    // The group.
    let group_path = format!("groups.{GROUP}");
    let group = doc.root.table(&group_path);
    group.comment("The seed's one node group.");
    group.set("cloud", CLOUD, None);
    let mut bounds = [0i64, 0i64];
    for (i, key) in ["min_size", "max_size"].into_iter().enumerate() {
        let v = get(key);
        match v.as_ref().and_then(Resolved::number) {
            Some(n) if n >= 0.0 && n.fract() == 0.0 => {
                bounds[i] = n as i64;
                group.set(key, n as i64, Some(&from(key, v.as_ref())));
                r.mapped(key, &format!("{group_path}.{key}"));
            }
            _ => problems.push(&sources_list, key, format!("{} is not a node count", show(v.as_ref()))),
        }
    }
    if bounds[1] < bounds[0] {
        problems.push(&sources_list, "max_size", format!("{} is below min_size {}", bounds[1], bounds[0]));
    }
    if let Some(name) = get("pxe_autoscaled_node_name").and_then(|n| n.text()) {
        let prefix = super::dns_label(&name);
        if prefix.is_empty() {
            problems.push(&sources_list, "pxe_autoscaled_node_name", "has no letters or digits to name VMs with");
        } else {
            group.set("name_prefix", prefix.as_str(), Some("pxe_autoscaled_node_name (as a DNS label)"));
            r.mapped("pxe_autoscaled_node_name", &format!("{group_path}.name_prefix"));
            if prefix != name {
                r.note(format!(
                    "VM names are now {prefix}-<random> (pxe_autoscaled_node_name {name:?} is not a DNS label). \
                     The seed found its VMs by that name; Flotilla finds its own by tags \
                     (flotilla-c-<cluster>, flotilla-g-<group>) and never touches the seed's VMs: drain and delete \
                     those once Flotilla runs."
                ));
            }
        }
    }
    group.set(
        "provider_id",
        "proxmox://pve/{id}",
        Some("Nodes must carry this spec.providerID: run the Proxmox cloud controller, or pass --provider-id to the kubelet (see join_command)."),
    );

    let machine_path = format!("{group_path}.machine");
    let machine = doc.root.table(&machine_path);
    let template = get("pxe_autoscaled_node_template_vm");
    match template.as_ref().and_then(Resolved::text) {
        Some(t) => match t.trim().parse::<i64>() {
            Ok(vmid) if vmid >= 100 => {
                machine.set("template", vmid, Some("pxe_autoscaled_node_template_vm (VMID)"));
                r.mapped("pxe_autoscaled_node_template_vm", &format!("{machine_path}.template"));
            }
            _ => problems.push(
                &sources_list,
                "pxe_autoscaled_node_template_vm",
                format!(
                    "{t:?} names the template VM; Flotilla clones by VMID: find it with `qm list` on the PVE host \
                     and run again with --set pxe_autoscaled_node_template_vm=<VMID>"
                ),
            ),
        },
        None => problems.push(
            &sources_list,
            "pxe_autoscaled_node_template_vm",
            "is required: the template VM (cloud-init, qemu-guest-agent) every node is cloned from",
        ),
    }
    machine.set("full_clone", true, Some("The seed made full clones."));

    // Network: a static address from the pool, or DHCP.
    let mode = get("pxe_autoscaled_node_network_mode").and_then(|m| m.text()).unwrap_or_default();
    let net_keys = [
        "pxe_autoscaled_node_ip_pool",
        "pxe_autoscaled_node_ip_mask",
        "pxe_autoscaled_node_ip_gateway",
        "pxe_autoscaled_node_dns_server",
    ];
    match mode.as_str() {
        "manual" => {
            r.mapped("pxe_autoscaled_node_network_mode", &format!("{machine_path}.ip_pool"));
            match get("pxe_autoscaled_node_ip_pool").and_then(|v| v.text()) {
                Some(pool) => {
                    machine.set("ip_pool", pool.as_str(), Some("pxe_autoscaled_node_ip_pool"));
                    r.mapped("pxe_autoscaled_node_ip_pool", &format!("{machine_path}.ip_pool"));
                }
                None => {
                    problems.push(&sources_list, "pxe_autoscaled_node_ip_pool", "is required in manual network mode")
                }
            }
            let mask = get("pxe_autoscaled_node_ip_mask");
            match mask.as_ref().and_then(Resolved::number) {
                Some(m) if (1.0..=32.0).contains(&m) && m.fract() == 0.0 => {
                    machine.set("prefix_len", m as i64, Some("pxe_autoscaled_node_ip_mask"));
                    r.mapped("pxe_autoscaled_node_ip_mask", &format!("{machine_path}.prefix_len"));
                    if matches!(mask.as_ref().map(|m| &m.value), Some(PyValue::Int(_))) {
                        r.note(
                            "pxe_autoscaled_node_ip_mask is an integer; the seed joins it to a string and fails at \
                             its first scale-up in manual mode. Flotilla reads it as the prefix length it meant.",
                        );
                    }
                }
                _ => problems.push(
                    &sources_list,
                    "pxe_autoscaled_node_ip_mask",
                    format!("{} is not a prefix length (1-32)", show(mask.as_ref())),
                ),
            }
            if let Some(g) = get("pxe_autoscaled_node_ip_gateway").and_then(|v| v.text()) {
                machine.set("gateway", g.as_str(), Some("pxe_autoscaled_node_ip_gateway"));
                r.mapped("pxe_autoscaled_node_ip_gateway", &format!("{machine_path}.gateway"));
            }
            if let Some(d) = get("pxe_autoscaled_node_dns_server").and_then(|v| v.text()) {
                machine.set("nameservers", vec![d], Some("pxe_autoscaled_node_dns_server"));
                r.mapped("pxe_autoscaled_node_dns_server", &format!("{machine_path}.nameservers"));
            }
            r.note(
                "Flotilla reads the addresses in use back from the ipconfig0 of its own VMs; the seed's VMs are not \
                 read, so keep their addresses out of the pool until they are gone.",
            );
        }
        "dhcp" => {
            r.mapped("pxe_autoscaled_node_network_mode", &format!("{machine_path} (no ip_pool: DHCP)"));
            for key in net_keys {
                if let Some(v) = get(key).filter(|v| v.origin != "the seed's default") {
                    r.dropped(key, Some(&v.value.show()), "unused in dhcp network mode, as in the seed");
                }
            }
        }
        other => problems.push(
            &sources_list,
            "pxe_autoscaled_node_network_mode",
            format!("{other:?} is not \"manual\" or \"dhcp\""),
        ),
    }

    // Joining: the seed ran kubeadm's join command through the guest agent, then labelled the node.
    let label = get("node_group_label").and_then(|v| v.text()).unwrap_or_default();
    let join_example = format!(
        "join_command = \"echo 'KUBELET_EXTRA_ARGS=--provider-id=proxmox://pve/{{{{ vmid }}}} \
         --node-labels={label}=true' > /etc/default/kubelet && kubeadm join <api-server>:6443 --token <token> \
         --discovery-token-ca-cert-hash sha256:<hash>\""
    );
    doc.root.table(&machine_path).comment(format!(
        "The seed ran `kubeadm token create --print-join-command` on the control plane for every VM and ran the \
         result through the guest agent. Flotilla runs a fixed join_command (a minijinja template with name, \
         group, cluster, vmid, node, ip) the same way. Create a token that does not expire \
         (`kubeadm token create --ttl 0 --print-join-command`) and set, for example:\n{join_example}"
    ));
    r.note(
        "join_command is not set (the seed generated one per VM on the control plane, which Flotilla cannot): \
         until you set it, new VMs boot but never join, and cluster-autoscaler removes them after \
         max_node_provision_time. The comment above [groups.workers.machine] shows one that also sets the \
         provider id and the node group label.",
    );
    if !label.is_empty() {
        let t = doc.root.table(&format!("{group_path}.template"));
        t.set(
            "labels",
            Out::Table(vec![(label.clone(), "true".into())]),
            Some("node_group_label: the seed labelled every node it added <label>=true"),
        );
        r.mapped("node_group_label", &format!("{group_path}.template.labels"));
    }
    r.note(
        "The seed sized new VMs like the nodes it had already made; Flotilla uses the template VM's cores and \
         memory unless [groups.workers.machine] sets cores and memory.",
    );

    // Timers and thresholds.
    let mut options: Vec<(&str, Out, String)> = Vec::new();
    let seconds = |key: &str, problems: &mut Problems| -> Option<(u64, Resolved)> {
        let v = get(key)?;
        match v.number() {
            Some(n) if n >= 0.0 => Some((n.round() as u64, v)),
            _ => {
                problems.push(&sources_list, key, format!("{} is not a number of seconds", v.value.show()));
                None
            }
        }
    };
    for (key, option) in [
        ("max_node_provision_time", "max_node_provision_time"),
        ("scale_down_unneeded_time", "scale_down_unneeded_time"),
    ] {
        if let Some((s, v)) = seconds(key, &mut problems) {
            options.push((option, Out::String(super::go_duration(s)), from(key, Some(&v))));
            r.mapped(key, &format!("{group_path}.options.{option}"));
        }
    }
    if let Some(v) = get("scale_down_utilization_threshold") {
        match v.number() {
            Some(pct) if (0.0..=100.0).contains(&pct) => {
                let t = (pct * 10.0).round() / 1000.0;
                options.push((
                    "scale_down_utilization_threshold",
                    Out::Float(t),
                    from("scale_down_utilization_threshold", Some(&v)),
                ));
                r.mapped(
                    "scale_down_utilization_threshold",
                    &format!("{group_path}.options.scale_down_utilization_threshold"),
                );
                if pct > 0.0 && pct <= 1.0 {
                    r.note(format!(
                        "scale_down_utilization_threshold = {pct}: the seed reads it as a percentage, so a node \
                         counted as unneeded only below {pct}% use (the threshold is {t} here, as the seed ran). If \
                         you meant {}%, set scale_down_utilization_threshold = {pct} in [groups.workers.options].",
                        pct * 100.0
                    ));
                }
            }
            _ => problems.push(
                &sources_list,
                "scale_down_utilization_threshold",
                format!("{} is not a percentage", v.value.show()),
            ),
        }
    }
    for (key, flag) in [
        ("scan_interval", "scan-interval"),
        ("scale_down_delay", "scale-down-delay-after-delete"),
        ("scale_down_delay_after_add", "scale-down-delay-after-add"),
        ("scale_down_delay_after_error", "scale-down-delay-after-failure"),
    ] {
        if let Some((s, v)) = seconds(key, &mut problems) {
            r.flag(&from_key(key, &v), flag, &super::go_duration(s));
        }
    }
    for (key, flag) in [
        ("max_total_unready_percentage", "max-total-unready-percentage"),
        ("ok_total_unready_count", "ok-total-unready-count"),
    ] {
        if let Some(v) = get(key) {
            match v.number() {
                Some(n) if n >= 0.0 => r.flag(&from_key(key, &v), flag, &n.to_string()),
                _ => problems.push(&sources_list, key, format!("{} is not a number", v.value.show())),
            }
        }
    }
    if let Some(v) = get("scale_up_delay_after_add") {
        r.dropped(
            "scale_up_delay_after_add",
            Some(&v.value.show()),
            "cluster-autoscaler has no scale-up cooldown: it counts VMs still booting as upcoming nodes, so it \
             never adds a second VM for pods the first one will take",
        );
    }
    if !options.is_empty() {
        let t = doc.root.table(&format!("{group_path}.options"));
        for (k, v, c) in options {
            t.set(k, v, Some(&c));
        }
    }

    // Anything else the inputs define.
    for (name, f) in &inputs.settings {
        if !DEFAULTS.iter().any(|(n, _)| n == name) && !r.accounts_for(name) {
            let shown = (!super::looks_secret(name)).then(|| f.value.show());
            r.dropped(name, shown.as_deref(), &format!("not a setting the seed reads ({})", f.origin));
        }
    }
    for (var, f) in &inputs.env {
        let used = inputs.settings.iter().any(|(_, s)| matches!(&s.value, PyValue::Env { var: v, .. } if v == var))
            || DEFAULTS.iter().any(|(n, _)| n.to_ascii_uppercase() == *var);
        if !used {
            let shown = (!super::looks_secret(var)).then(|| f.value.show());
            r.dropped(var, shown.as_deref(), &format!("no setting reads this variable ({})", f.origin));
        }
    }
    problems.into_result()?;
    Ok(Import { document: doc, report: r, files: Vec::new() })
}

fn show(v: Option<&Resolved>) -> String {
    v.map(|v| v.value.show()).unwrap_or_else(|| "(not set)".into())
}

/// The comment saying where a value came from.
fn from(key: &str, v: Option<&Resolved>) -> String {
    match v {
        Some(v) if v.origin == "the seed's default" => format!("{key} (not set; the seed's default)"),
        Some(v) => format!("{key} ({})", v.origin),
        None => key.to_owned(),
    }
}

/// The report's key for a flag: the setting, marked when it was the seed's default.
fn from_key(key: &str, v: &Resolved) -> String {
    if v.origin == "the seed's default" { format!("{key} (the seed's default)") } else { key.to_owned() }
}
