//! The K3s autoscaler on OpenStack: `AUTOSCALER_CONFIG_FILE` (YAML: `clusterName`, `flavor`,
//! `image`, `freeMemoryTarget`, `minimumFreeNodeMemory`, `maximumNumberOfNodes`,
//! `oldNodeAgeLimitHours`, `imagePullerIgnorelist`, `butaneBinary`, `butaneConfigTemplate`,
//! `butaneConfigData`), `OPENSTACK_CREDENTIALS_FILE` (YAML of `OS_*` keys) or a
//! `clouds.yaml`, and the Jinja2 Butane template.
//!
//! Besides its keys, the seed's code fixes a few things that are carried over too: each server
//! gets the key pair `<clusterName>`, the network `<clusterName>-network`, the security groups
//! `<clusterName>-common` and `<clusterName>-node`, the server group
//! `<clusterName>-server_group_node`, the name `<clusterName>-node-<random>`, and the
//! template sees `server_name` and `extra_k3s_args` (a startup taint the seed removed itself once
//! the node was ready; cluster-autoscaler needs no such taint, so it becomes empty). A node that
//! had not joined after 10 minutes was deleted: that is `max_node_provision_time`.
//!
//! Files are told apart by their content: the config has `clusterName` or `flavor`, the
//! credentials file `OS_*` keys, a `clouds.yaml` a `clouds:` map; anything else is the template
//! (which is otherwise found next to the config, as `butaneConfigTemplate` names it).

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde_yaml::Value;

use super::{
    Error, Import, Problems, Request, Source,
    out::{self, Document, Value as Out},
    report::Report,
    yaml::{self, Leaves},
};

const GROUP: &str = "workers";

/// `OS_*` variables the openstack driver reads from a credentials file.
const DRIVER_READS: &[&str] = &[
    "OS_AUTH_URL",
    "OS_IDENTITY_API_VERSION",
    "OS_USER_ID",
    "OS_USERNAME",
    "OS_USER_DOMAIN_ID",
    "OS_USER_DOMAIN_NAME",
    "OS_DEFAULT_DOMAIN_NAME",
    "OS_AUTH_TYPE",
    "OS_APPLICATION_CREDENTIAL_SECRET",
    "OS_APPLICATION_CREDENTIAL_ID",
    "OS_APPLICATION_CREDENTIAL_NAME",
    "OS_PASSWORD",
    "OS_PROJECT_ID",
    "OS_TENANT_ID",
    "OS_PROJECT_NAME",
    "OS_TENANT_NAME",
    "OS_PROJECT_DOMAIN_ID",
    "OS_PROJECT_DOMAIN_NAME",
    "OS_INSECURE",
    "OS_REGION_NAME",
    "OS_REGION",
    "OS_INTERFACE",
    "OS_ENDPOINT_TYPE",
    "OS_CACERT",
];

enum Role<'a> {
    Config(&'a Source, Value),
    Credentials(&'a Source, Value),
    Clouds(&'a Source, Value),
    Template(&'a Source),
}

fn classify(s: &Source) -> Role<'_> {
    match serde_yaml::from_str::<Value>(&s.text) {
        Ok(v @ Value::Mapping(_)) => {
            let m = v.as_mapping().expect("matched a mapping");
            let has = |k: &str| m.contains_key(k);
            if has("clouds") {
                Role::Clouds(s, v)
            } else if m.keys().filter_map(Value::as_str).any(|k| k.starts_with("OS_")) {
                Role::Credentials(s, v)
            } else if has("clusterName") || has("flavor") || has("maximumNumberOfNodes") {
                Role::Config(s, v)
            } else {
                Role::Template(s)
            }
        }
        _ => Role::Template(s),
    }
}

pub fn import(req: &Request, sources: &[Source]) -> Result<Import, Error> {
    let (mut config, mut creds, mut clouds, mut templates) = (None, None, None, Vec::new());
    for s in sources {
        match classify(s) {
            Role::Config(s, v) if config.is_none() => config = Some((s, v)),
            Role::Credentials(s, v) if creds.is_none() => creds = Some((s, v)),
            Role::Clouds(s, v) if clouds.is_none() => clouds = Some((s, v)),
            Role::Template(s) => templates.push(s),
            _ => return Err(Error::Usage(format!("{}: a second file of the same kind", s.name()))),
        }
    }
    let Some((source, root)) = config else {
        return Err(Error::Usage(
            "give the autoscaler's main config (AUTOSCALER_CONFIG_FILE, with clusterName, flavor, image, ...)".into(),
        ));
    };
    if creds.is_some() && clouds.is_some() {
        return Err(Error::Usage("give either the credentials file or a clouds.yaml, not both".into()));
    }
    let file = source.name();
    let mut problems = Problems::default();
    let mut keys = Leaves::new(&root, &["butaneConfigData"]);
    let mut r = Report::new("K3s-on-OpenStack autoscaler");
    let mut doc = Document::default();
    doc.root.comment(format!("Imported by `flotilla import openstack` from {}.", names(sources)));

    // Cluster name: also the seed's prefix for the key pair, network, groups and names.
    let seed_cluster = keys.take("clusterName").as_ref().and_then(yaml::scalar);
    let cluster = match (&seed_cluster, &req.cluster_name) {
        (Some(c), Some(flag)) if c != flag => {
            return Err(Error::Usage(format!(
                "the config sets clusterName = {c:?}; --cluster-name {flag:?} would disagree with it"
            )));
        }
        (Some(c), _) => c.clone(),
        (None, _) => {
            problems.push(&file, "clusterName", "is required: it names the servers, key pair, network and groups");
            String::new()
        }
    };
    let label = super::dns_label(&cluster);
    doc.root.set("cluster_name", label.as_str(), Some("clusterName"));
    r.mapped("clusterName", "cluster_name (and the key pair, network, security groups and server group below)");
    if !cluster.is_empty() && label != cluster {
        r.note(format!(
            "clusterName {cluster:?} is not a DNS label; Flotilla's cluster_name is {label:?}. The OpenStack \
             resources keep the seed's names."
        ));
    }

    // The cloud and its credentials.
    let cloud_name = cloud_name(creds.as_ref().map(|(_, v)| v).or(clouds.as_ref().map(|(_, v)| v)));
    let cloud_path = format!("clouds.{cloud_name}");
    let cloud = doc.root.table(&cloud_path);
    cloud.set("driver", "openstack", None);
    match (&creds, &clouds) {
        (Some((s, v)), _) => {
            let rel = out::relative_path(&s.path, &req.output_dir);
            cloud.set(
                "credentials_file",
                rel.as_str(),
                Some("The seed's OPENSTACK_CREDENTIALS_FILE, read as it is (it keeps the password)."),
            );
            for (k, val) in v.as_mapping().into_iter().flatten() {
                let Some(k) = k.as_str() else { continue };
                let key = format!("{} {k}", s.name());
                if DRIVER_READS.contains(&k) {
                    r.mapped(&key, &format!("{cloud_path}.credentials_file"));
                } else {
                    let shown = (!super::looks_secret(k)).then(|| yaml::show(val));
                    r.dropped(&key, shown.as_deref(), "the openstack driver does not read it");
                }
            }
            r.note(format!(
                "{} holds the OpenStack password in plain text, as it did for the seed. To keep it out of files, \
                 replace credentials_file with [{cloud_path}.auth] (auth_url, username, user_domain_name, \
                 project_name) and password = {{ env = \"OS_PASSWORD\" }}.",
                s.name()
            ));
        }
        (None, Some((s, v))) => {
            let entries: Vec<String> = v
                .get("clouds")
                .and_then(Value::as_mapping)
                .map(|m| m.keys().filter_map(|k| k.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let wanted = req.overrides.iter().find(|(k, _)| k == "cloud").map(|(_, v)| v.clone());
            let entry = match (wanted, entries.as_slice()) {
                (Some(w), _) if entries.contains(&w) => w,
                (Some(w), _) => {
                    return Err(Error::Usage(format!(
                        "{} has no cloud {w:?} (it has: {})",
                        s.name(),
                        entries.join(", ")
                    )));
                }
                (None, [only]) => only.clone(),
                (None, _) => {
                    return Err(Error::Usage(format!(
                        "{} has several clouds ({}); pick one with --set cloud=NAME",
                        s.name(),
                        entries.join(", ")
                    )));
                }
            };
            cloud.set("cloud", entry.as_str(), Some("The entry of clouds.yaml to use."));
            cloud.set("clouds_file", out::relative_path(&s.path, &req.output_dir).as_str(), None);
            r.mapped(&format!("{} clouds.{entry}", s.name()), &format!("{cloud_path}.cloud"));
            for other in entries.iter().filter(|e| **e != entry) {
                r.dropped(&format!("{} clouds.{other}", s.name()), None, "another cloud than the one imported");
            }
        }
        (None, None) if std::env::var_os("OS_AUTH_URL").is_some() => {
            r.note("No credentials file was given: the openstack driver reads the OS_* variables of its environment, as now.");
        }
        (None, None) => {
            return Err(Error::Usage(
                "give the credentials file too (the seed's OPENSTACK_CREDENTIALS_FILE, YAML of OS_* keys) or a clouds.yaml"
                    .into(),
            ));
        }
    }

    // The group.
    let group_path = format!("groups.{GROUP}");
    let group = doc.root.table(&group_path);
    group.comment("The seed's one kind of node (label role=user).");
    group.set("cloud", cloud_name.as_str(), None);
    group.set("min_size", 0, Some("The seed had no minimum: it kept the nodes it had not created, and removed all of its own when they aged out."));
    match keys.take("maximumNumberOfNodes").as_ref().and_then(yaml::seconds) {
        Some(n) => {
            group.set("max_size", n as i64, Some("maximumNumberOfNodes"));
            r.mapped("maximumNumberOfNodes", &format!("{group_path}.max_size"));
        }
        None if keys.has("maximumNumberOfNodes") => {
            problems.push(&file, "maximumNumberOfNodes", "is not a whole number")
        }
        None => problems.push(&file, "maximumNumberOfNodes", "is required: the most nodes the autoscaler may create"),
    }
    if !cluster.is_empty() {
        group.set(
            "name_prefix",
            format!("{label}-node").as_str(),
            Some("Servers are <clusterName>-node-<random>, as the seed named them."),
        );
    }
    group.set(
        "provider_id",
        "k3s://{name}",
        Some("k3s (without the OpenStack cloud controller) sets k3s://<node name>; the node name is the server name."),
    );

    // The machine.
    let machine_path = format!("{group_path}.machine");
    let machine = doc.root.table(&machine_path);
    for key in ["flavor", "image"] {
        match keys.take(key).as_ref().and_then(yaml::scalar) {
            Some(v) if !v.is_empty() => {
                machine.set(key, v.as_str(), Some(key));
                r.mapped(key, &format!("{machine_path}.{key}"));
            }
            _ => problems.push(&file, key, "is required: the seed passes it to every server it creates"),
        }
    }
    if !cluster.is_empty() {
        machine.set("key_name", cluster.as_str(), Some("The seed's code: key pair <clusterName>."));
        machine.set(
            "networks",
            vec![format!("{cluster}-network")],
            Some("The seed's code: network <clusterName>-network."),
        );
        machine.set(
            "security_groups",
            vec![format!("{cluster}-common"), format!("{cluster}-node")],
            Some("The seed's code: <clusterName>-common and <clusterName>-node."),
        );
        machine.set(
            "server_group",
            format!("{cluster}-server_group_node").as_str(),
            Some("The seed's code: server group <clusterName>-server_group_node."),
        );
    }

    // User data: the Butane template, its data, the token.
    let template_name = keys.take("butaneConfigTemplate").as_ref().and_then(yaml::scalar);
    let data = keys.take("butaneConfigData");
    let binary = keys.take("butaneBinary").as_ref().and_then(yaml::scalar);
    let mut template_data: Vec<(String, Out)> = Vec::new();
    let mut token_key: Option<String> = None;
    if let Some(Value::Mapping(m)) = &data {
        for (k, v) in m {
            let Some(k) = k.as_str() else { continue };
            let key = format!("butaneConfigData.{k}");
            if super::looks_secret(k) && token_key.is_none() && yaml::scalar(v).is_some() {
                token_key = Some(k.to_owned());
                r.secret(
                    &key,
                    "K3S_NODE_TOKEN",
                    &format!("{machine_path}.join_token"),
                    &format!("the k3s join token: butaneConfigData.{k} in {file}"),
                );
            } else if super::looks_secret(k) {
                r.dropped(
                    &key,
                    None,
                    "a second secret: Flotilla's template has one secret slot (join_token); put this one in a file \
                     the node fetches, or in the image",
                );
            } else if let Some(v) = to_out(v) {
                template_data.push((k.to_owned(), v));
                r.mapped(&key, &format!("{machine_path}.template_data.{k}"));
            } else {
                r.dropped(&key, Some(&yaml::show(v)), "not a value a template can use");
            }
        }
    } else if let Some(v) = &data {
        problems.push(&file, "butaneConfigData", format!("is not a mapping: {}", yaml::show(v)));
    }

    match &template_name {
        None => problems.push(&file, "butaneConfigTemplate", "is required: the Butane template every node boots from"),
        Some(name) => match find_template(name, &source.path, &templates) {
            Err(msg) => problems.push(&file, "butaneConfigTemplate", msg),
            Ok((path, text)) => {
                let mut prelude = String::from(
                    "{#- Imported from the K3s-on-OpenStack autoscaler: the names its code gave the template. -#}\n\
                     {%- set server_name = name -%}\n\
                     {%- set extra_k3s_args = \"\" -%}\n",
                );
                if let Some(k) = &token_key {
                    prelude.push_str(&format!("{{%- set {k} = join_token -%}}\n"));
                }
                machine.set(
                    "user_data",
                    format!("{prelude}{text}"),
                    Some(&format!(
                        "{}, rendered per server, then `butane --strict`. server_name is the server's name; \
                         extra_k3s_args, the seed's startup taint, is empty.",
                        path.display()
                    )),
                );
                r.mapped("butaneConfigTemplate", &format!("{machine_path}.user_data"));
                r.note(
                    "The seed tainted new nodes autoscaler-initially-tainted=true:NoSchedule (extra_k3s_args) and \
                     removed the taint once they were ready. cluster-autoscaler needs no such guard: it does not \
                     delete a node that is still registering before max_node_provision_time, so the taint is \
                     dropped (a node would otherwise keep it forever).",
                );
                let (labels, taints) = scan_node_flags(&text);
                if !labels.is_empty() || !taints.is_empty() {
                    let t = doc.root.table(&format!("{group_path}.template"));
                    t.comment("What the template's k3s flags give every node, so scale-from-zero predictions match.");
                    if !labels.is_empty() {
                        t.set("labels", labels.clone(), Some("--node-label in the template"));
                    }
                    if !taints.is_empty() {
                        let items = taints
                            .iter()
                            .map(|(k, v, e)| {
                                Out::Table(vec![
                                    ("key".into(), k.as_str().into()),
                                    ("value".into(), v.as_str().into()),
                                    ("effect".into(), e.as_str().into()),
                                ])
                            })
                            .collect();
                        t.set("taints", Out::Array(items), Some("--node-taint in the template"));
                    }
                }
            }
        },
    }
    let machine = doc.root.table(&machine_path);
    if !template_data.is_empty() {
        machine.set("template_data", Out::Table(template_data), Some("butaneConfigData"));
    }
    if token_key.is_some() {
        machine.set(
            "join_token",
            Out::SecretEnv("K3S_NODE_TOKEN".into()),
            Some("butaneConfigData (the k3s node token)"),
        );
    }
    machine.set("butane", true, None);
    match binary {
        Some(b) => {
            machine.set("butane_binary", b.as_str(), Some("butaneBinary"));
            r.mapped("butaneBinary", &format!("{machine_path}.butane_binary"));
        }
        None => r.note("butaneBinary is not set; Flotilla runs `butane` from PATH."),
    }

    // The seed's own timers and thresholds.
    let options = doc.root.table(&format!("{group_path}.options"));
    options.comment("The seed deleted a server whose node had not become ready within 10 minutes.");
    options.set("max_node_provision_time", "10m", None);
    for key in ["freeMemoryTarget", "minimumFreeNodeMemory"] {
        if let Some(v) = keys.take(key) {
            r.dropped(
                key,
                Some(&yaml::show(&v)),
                "cluster-autoscaler keeps no free-memory headroom: it adds nodes for pods that do not fit. For \
                 spare room, run placeholder pods (pause containers requesting that much memory) with a \
                 negative PriorityClass; they are evicted for real work and their pending copies trigger the \
                 scale-up (see --expendable-pods-priority-cutoff)",
            );
        }
    }
    let age = keys.take("oldNodeAgeLimitHours");
    r.dropped(
        "oldNodeAgeLimitHours",
        Some(&age.as_ref().map(yaml::show).unwrap_or_else(|| "168 (the seed's default)".into())),
        "cluster-autoscaler never replaces nodes by age. Recycle old nodes yourself (kubectl drain + delete, on \
         a schedule); once drained and empty, cluster-autoscaler removes them after scale_down_unneeded_time",
    );
    if let Some(v) = keys.take("imagePullerIgnorelist") {
        r.dropped(
            "imagePullerIgnorelist",
            Some(&yaml::show(&v)),
            "Flotilla does not warm image caches; pre-pull images in the node image, or run a pre-puller DaemonSet",
        );
    }
    r.note(
        "The seed only removed nodes it had cordoned for age. cluster-autoscaler also removes nodes that stay \
         unneeded for scale_down_unneeded_time (10m by default): raise it in [groups.workers.options], or run \
         cluster-autoscaler with --scale-down-enabled=false to keep the seed's behaviour.",
    );
    r.note(
        "Servers the seed created carry no Flotilla metadata, so Flotilla does not manage them. Let them age out \
         (drain and delete them) once Flotilla runs; new servers are Flotilla's.",
    );
    r.note("KUBECONFIG_FILE becomes cluster-autoscaler's --kubeconfig (or its in-cluster service account).");

    for (key, v) in keys.rest() {
        let shown = (!super::looks_secret(&key)).then(|| yaml::show(&v));
        r.dropped(&key, shown.as_deref(), "not a key the seed reads");
    }
    problems.into_result()?;
    Ok(Import { document: doc, report: r, files: Vec::new() })
}

fn names(sources: &[Source]) -> String {
    sources.iter().map(Source::name).collect::<Vec<_>>().join(", ")
}

/// The cloud's name in the configuration: the first label of the auth URL's host
/// (`pouta.csc.fi` -> `pouta`), else `openstack`.
fn cloud_name(creds: Option<&Value>) -> String {
    let url = creds.and_then(|v| {
        v.get("OS_AUTH_URL").and_then(yaml::scalar).or_else(|| {
            v.get("clouds")?.as_mapping()?.values().next()?.get("auth")?.get("auth_url").and_then(yaml::scalar)
        })
    });
    let host = url.as_deref().and_then(|u| u.split("://").nth(1)).and_then(|rest| rest.split([':', '/', '.']).next());
    host.filter(|h| h.parse::<u8>().is_err())
        .map(super::dns_label)
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "openstack".into())
}

fn to_out(v: &Value) -> Option<Out> {
    Some(match v {
        Value::String(s) => Out::String(s.clone()),
        Value::Bool(b) => Out::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Out::Integer(i),
            None => Out::Float(n.as_f64()?),
        },
        Value::Sequence(items) => Out::Array(items.iter().map(to_out).collect::<Option<_>>()?),
        Value::Mapping(m) => {
            Out::Table(m.iter().map(|(k, v)| Some((yaml::scalar(k)?, to_out(v)?))).collect::<Option<Vec<_>>>()?)
        }
        Value::Tagged(t) => to_out(&t.value)?,
        Value::Null => return None,
    })
}

/// The template: a file given on the command line (one not recognised as anything else, or the
/// one with the template's file name), else the file next to the config.
fn find_template(name: &str, config: &Path, given: &[&Source]) -> Result<(PathBuf, String), String> {
    let wanted = Path::new(name).file_name();
    if let Some(s) = given.iter().find(|s| s.path.file_name() == wanted).or(given.first()) {
        return Ok((s.path.clone(), s.text.clone()));
    }
    let dir = config.parent().unwrap_or(Path::new("."));
    let path = if Path::new(name).is_absolute() { PathBuf::from(name) } else { dir.join(name) };
    std::fs::read_to_string(&path)
        .map(|t| (path.clone(), t))
        .map_err(|e| format!("cannot read {} ({e}); give the template on the command line", path.display()))
}

/// (key, value, effect).
type Taint = (String, String, String);

/// Node labels and taints that k3s flags in the template set (`--node-label k=v`,
/// `--node-taint k=v:Effect`, or `node-label:` / `node-taint:` lists in a k3s config file).
fn scan_node_flags(text: &str) -> (BTreeMap<String, String>, Vec<Taint>) {
    let mut labels = BTreeMap::new();
    let mut taints = Vec::new();
    let mut add = |kind: &str, value: &str| {
        let value = value.trim_matches(|c| c == '"' || c == '\'' || c == ',');
        if value.contains("{{") || value.contains("{%") {
            return;
        }
        let Some((k, v)) = value.split_once('=') else { return };
        if kind == "label" {
            labels.insert(k.to_owned(), v.to_owned());
        } else if let Some((v, effect)) = v.rsplit_once(':')
            && ["NoSchedule", "PreferNoSchedule", "NoExecute"].contains(&effect)
            && k != "autoscaler-initially-tainted"
        {
            taints.push((k.to_owned(), v.to_owned(), effect.to_owned()));
        }
    };
    let words: Vec<&str> = text.split_whitespace().collect();
    for (i, w) in words.iter().enumerate() {
        for kind in ["label", "taint"] {
            let flag = format!("--node-{kind}");
            if *w == flag {
                if let Some(next) = words.get(i + 1) {
                    add(kind, next);
                }
            } else if let Some(v) = w.strip_prefix(&format!("{flag}=")) {
                add(kind, v);
            }
        }
    }
    let mut list: Option<&str> = None;
    for line in text.lines() {
        let t = line.trim();
        if t == "node-label:" || t == "node-taint:" {
            list = Some(if t == "node-label:" { "label" } else { "taint" });
        } else if let (Some(kind), Some(item)) = (list, t.strip_prefix("- ")) {
            add(kind, item);
        } else if !t.is_empty() {
            list = None;
        }
    }
    taints.dedup();
    (labels, taints)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn k3s_flags_in_a_template_become_template_labels_and_taints() {
        let (labels, taints) = scan_node_flags(
            "sh -s - agent --node-label role=user --node-taint role=user:NoSchedule {{ extra_k3s_args }}\n\
             node-label:\n  - \"tier=batch\"\nother: x\n--node-taint=autoscaler-initially-tainted=true:NoSchedule",
        );
        assert_eq!(labels.get("role").map(String::as_str), Some("user"));
        assert_eq!(labels.get("tier").map(String::as_str), Some("batch"));
        assert_eq!(taints, [("role".into(), "user".into(), "NoSchedule".into())]);
    }

    #[test]
    fn the_cloud_is_named_after_the_auth_host() {
        let v: Value = serde_yaml::from_str("OS_AUTH_URL: https://pouta.csc.fi:5001/v3").unwrap();
        assert_eq!(cloud_name(Some(&v)), "pouta");
        let v: Value = serde_yaml::from_str("OS_AUTH_URL: https://10.0.0.1:5000/v3").unwrap();
        assert_eq!(cloud_name(Some(&v)), "openstack");
    }
}
