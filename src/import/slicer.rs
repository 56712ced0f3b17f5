//! The Slicer provider for cluster-autoscaler (kubernetes/autoscaler PR #8867, never released):
//! its INI cloud-config (the file, or the Kubernetes Secret that mounts it), read with gcfg's
//! rules and the PR's own (`slicer_config.go`).
//!
//! `[global]`: `k3s-url`, `k3s-token` (both required), `ca-bundle`, `default-min-size` (the
//! code's default is 0, its README says 1), `default-max-size` (8). `[nodegroup "<host
//! group>"]`: `slicer-url`, `slicer-token`, `min-size`, `max-size`, `arch`. The PR does not
//! check `slicer-url` (an empty one fails every call) nor a negative `min-size`, and reads
//! `arch` without using it; the import requires the URL, refuses the negative size and carries
//! `arch` over as the template's. Host groups behind the same Slicer API (same URL and token)
//! become one Flotilla cloud.

use std::collections::BTreeMap;

use super::{
    Error, Import, Problems, Request, Source,
    gcfg::{self, Section},
    out::{self, Document, Value as Out},
    report::Report,
};

const GLOBAL_KEYS: &[&str] = &["k3s-url", "k3s-token", "ca-bundle", "default-min-size", "default-max-size"];
const GROUP_KEYS: &[&str] = &["slicer-url", "slicer-token", "min-size", "max-size", "arch"];

/// The last value of each key (gcfg: a repeated single-valued key keeps its last value).
fn values(
    section: &Section,
    known: &[&str],
    where_: &str,
    file: &str,
    p: &mut Problems,
    r: &mut Report,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for var in &section.vars {
        let key = format!("{where_} {}", var.name);
        if !known.contains(&var.name.as_str()) {
            let hint = super::closest(&var.name, known).map(|k| format!("; did you mean {k}?")).unwrap_or_default();
            let shown = (!super::looks_secret(&var.name)).then(|| var.value.clone().unwrap_or_default());
            r.dropped(
                &key,
                shown.as_deref(),
                &format!("not a key of the Slicer provider, which refuses the whole file for it (gcfg: can't store data){hint}"),
            );
            continue;
        }
        let Some(value) = &var.value else {
            p.push(file, &key, format!("line {}: has no value (gcfg: blank value not supported for type)", var.line));
            continue;
        };
        if var.cut_by_comment {
            r.note(format!(
                "{file}:{}: {key} is cut short by a ';' or '#' right after it (gcfg reads the rest as a comment); \
                 the import keeps what the provider read.",
                var.line
            ));
        }
        if out.insert(var.name.clone(), value.clone()).is_some() {
            r.note(format!(
                "{key} is given more than once; like the provider, the import keeps the last (line {}).",
                var.line
            ));
        }
    }
    out
}

fn atoi(s: &str) -> Option<i64> {
    let digits = s.strip_prefix(['+', '-']).unwrap_or(s);
    (!digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())).then(|| s.parse().ok()).flatten()
}

/// A host group name Slicer can name nodes after (`<host group>-N` becomes the node name).
fn is_host_group(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 50
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

pub fn import(req: &Request, sources: &[Source]) -> Result<Import, Error> {
    let [source] = sources else {
        return Err(Error::Usage(
            "the slicer import reads one file: the cloud-config (or the Secret holding it)".into(),
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
    let mut r = Report::new("Slicer provider for cluster-autoscaler");
    let mut doc = Document::default();
    for (k, _) in &req.overrides {
        if k != "ca-bundle" {
            p.push("--set", k, "only ca-bundle can be given on the command line for a Slicer import");
        }
    }

    let empty = Section { name: "global".into(), sub: None, line: 0, vars: Vec::new() };
    let global = sections.iter().find(|s| s.name == "global" && s.sub.is_none()).unwrap_or(&empty);
    for s in &sections {
        if !matches!((s.name.as_str(), &s.sub), ("global", None) | ("nodegroup", Some(_))) {
            p.push(
                &file,
                &format!("[{}]", s.name),
                "not a section of the Slicer provider (it has [global] and [nodegroup \"NAME\"])",
            );
        }
    }
    let g = values(global, GLOBAL_KEYS, "[global]", &file, &mut p, &mut r);

    let cluster = req.cluster_name.clone().unwrap_or_else(|| "k3s-slicer".into());
    doc.root.comment(format!("Imported by `flotilla import slicer` from {file}."));
    doc.root.set(
        "cluster_name",
        super::dns_label(&cluster).as_str(),
        Some("The provider has no cluster name; it tags every VM Flotilla creates (`--cluster-name` to change)."),
    );

    let k3s_url = g.get("k3s-url").filter(|u| !u.is_empty()).cloned();
    match &k3s_url {
        None => p.push(
            &file,
            "[global] k3s-url",
            "is required (the provider: \"K3S URL not configured\"): the k3s server agents join",
        ),
        Some(u) if !u.starts_with("https://") => p.push(
            &file,
            "[global] k3s-url",
            format!("{u:?} must be an https:// URL (k3s's install script refuses anything else)"),
        ),
        Some(_) => {}
    }
    if g.get("k3s-token").is_none_or(String::is_empty) {
        p.push(
            &file,
            "[global] k3s-token",
            "is required (the provider: \"K3S token not configured\"): the k3s join token",
        );
    }
    let ca_bundle = req
        .overrides
        .iter()
        .rev()
        .find(|(k, _)| k == "ca-bundle")
        .map(|(_, v)| v.clone())
        .or_else(|| g.get("ca-bundle").filter(|c| !c.is_empty()).cloned());
    let ca_file = ca_bundle.as_ref().map(|c| {
        let path = std::path::Path::new(c);
        if !path.is_file() {
            p.push(
                &file,
                "[global] ca-bundle",
                format!("{c} is not readable here; copy it next to the configuration and run again with --set ca-bundle=PATH"),
            );
        }
        out::relative_path(path, &req.output_dir)
    });
    let default_min = g.get("default-min-size").map(|s| (s.clone(), atoi(s)));
    let default_max = g.get("default-max-size").map(|s| (s.clone(), atoi(s)));
    for (key, v) in [("default-min-size", &default_min), ("default-max-size", &default_max)] {
        if let Some((s, None)) = v {
            p.push(&file, &format!("[global] {key}"), format!("{s:?} is not a whole number"));
        }
    }
    let default_min = default_min.and_then(|(_, n)| n).unwrap_or(0);
    let default_max = default_max.and_then(|(_, n)| n).unwrap_or(8);

    // Clouds: one per Slicer API (URL and token).
    let mut clouds: Vec<(String, Option<String>, String)> = Vec::new(); // (url, token, cloud name)
    let groups: Vec<&Section> = sections.iter().filter(|s| s.name == "nodegroup" && s.sub.is_some()).collect();
    if groups.is_empty() {
        p.push(&file, "[nodegroup \"HOST GROUP\"]", "at least one node group (a Slicer host group) is required");
    }
    let mut group_tables = Vec::new();
    for section in &groups {
        let hg = section.sub.clone().unwrap_or_default();
        let where_ = format!("[nodegroup \"{hg}\"]");
        let v = values(section, GROUP_KEYS, &where_, &file, &mut p, &mut r);
        if !is_host_group(&hg) {
            p.push(
                &file,
                &where_,
                "the host group's name makes node names (<host group>-N), so it must be lower-case letters, digits \
                 and '-': rename the host group in the Slicer host's config",
            );
            continue;
        }
        let Some(url) = v.get("slicer-url").filter(|u| !u.is_empty()).cloned() else {
            p.push(
                &file,
                &format!("{where_} slicer-url"),
                "is required: the Slicer API of this host group (the provider did not check it, and every call failed)",
            );
            continue;
        };
        let token = v.get("slicer-token").filter(|t| !t.is_empty()).cloned();
        let cloud = match clouds.iter().find(|(u, t, _)| *u == url && *t == token) {
            Some((_, _, name)) => name.clone(),
            None => {
                let name = format!("slicer-{}", clouds.len() + 1);
                clouds.push((url.clone(), token.clone(), name.clone()));
                name
            }
        };
        r.mapped(&format!("{where_} slicer-url"), &format!("clouds.{cloud}.url"));
        if token.is_some() {
            let n = clouds.iter().position(|(_, _, c)| *c == cloud).unwrap_or(0) + 1;
            r.secret(
                &format!("{where_} slicer-token"),
                &format!("SLICER_TOKEN_{n}"),
                &format!("clouds.{cloud}.token"),
                &format!("the Slicer API token of {url}: {where_} slicer-token in {file} (on the host: /var/lib/slicer/auth/token)"),
            );
        } else if v.contains_key("slicer-token") {
            r.dropped(&format!("{where_} slicer-token"), Some(""), "empty: the daemon's API runs without auth");
        }
        let size = |key: &str, default: i64, p: &mut Problems| match v.get(key) {
            None => default,
            Some(s) => atoi(s).unwrap_or_else(|| {
                p.push(&file, &format!("{where_} {key}"), format!("{s:?} is not a whole number"));
                default
            }),
        };
        let (min, max) = (size("min-size", default_min, &mut p), size("max-size", default_max, &mut p));
        if min < 0 {
            p.push(
                &file,
                &format!("{where_} min-size"),
                format!("{min} is negative (the provider let it through; a group cannot be smaller than empty)"),
            );
        } else if min > max {
            p.push(
                &file,
                &format!("{where_} max-size"),
                format!("{max} is below min-size {min} (the provider refuses it too)"),
            );
        }
        for key in ["min-size", "max-size"] {
            if v.contains_key(key) {
                r.mapped(
                    &format!("{where_} {key}"),
                    &format!("groups.{}.{}", super::dns_label(&hg), key.replace('-', "_")),
                );
            }
        }
        group_tables.push((hg, cloud, min, max, v.get("arch").cloned()));
    }
    if g.contains_key("default-min-size") {
        r.mapped("[global] default-min-size", "groups.*.min_size");
    }
    if g.contains_key("default-max-size") {
        r.mapped("[global] default-max-size", "groups.*.max_size");
    }
    if !g.contains_key("default-min-size") && !groups.is_empty() {
        r.note("default-min-size is not set: the provider's code used 0 (its README says 1); so does the import.");
    }

    for (url, token, name) in &clouds {
        let path = format!("clouds.{name}");
        let c = doc.root.table(&path);
        c.comment(format!("The Slicer API at {url}."));
        c.set("driver", "slicer", None);
        c.set("url", url.as_str(), Some("[nodegroup] slicer-url"));
        let loopback = ["http://127.", "http://localhost", "http://[::1]"].iter().any(|l| url.starts_with(l));
        if url.starts_with("http://") && !loopback {
            c.set(
                "allow_plain_http",
                true,
                Some("The provider called this API in plain http, as here; the token crosses the network in clear. Better: TLS in front of it (https:// and ca_file)."),
            );
        }
        if token.is_some() {
            let n = clouds.iter().position(|(_, _, c)| c == name).unwrap_or(0) + 1;
            c.set("token", Out::SecretEnv(format!("SLICER_TOKEN_{n}")), Some("[nodegroup] slicer-token"));
        }
        if let Some(ca) = &ca_file {
            c.set("ca_file", ca.as_str(), Some("[global] ca-bundle"));
        }
        if let Some(u) = &k3s_url {
            c.set("k3s_url", u.as_str(), Some("[global] k3s-url"));
        }
        c.set(
            "k3s_token",
            Out::SecretEnv("K3S_TOKEN".into()),
            Some("[global] k3s-token (stored once as a Slicer secret, never put in userdata)"),
        );
    }
    if k3s_url.is_some() {
        r.mapped("[global] k3s-url", "clouds.*.k3s_url");
    }
    if g.get("k3s-token").is_some_and(|t| !t.is_empty()) {
        r.secret(
            "[global] k3s-token",
            "K3S_TOKEN",
            "clouds.*.k3s_token",
            &format!("the k3s join token: [global] k3s-token in {file}"),
        );
    }
    if ca_bundle.is_some() {
        r.mapped("[global] ca-bundle", "clouds.*.ca_file");
    }

    for (hg, cloud, min, max, arch) in group_tables {
        let name = super::dns_label(&hg);
        let path = format!("groups.{name}");
        let t = doc.root.table(&path);
        t.comment(format!("[nodegroup \"{hg}\"]: the Slicer host group {hg}."));
        t.set("cloud", cloud.as_str(), None);
        t.set("min_size", min, None);
        t.set("max_size", max, None);
        if name != hg {
            doc.root.table(&format!("{path}.machine")).set(
                "host_group",
                hg.as_str(),
                Some("The Slicer host group (longer than a group name may be)."),
            );
        }
        let tmpl = doc.root.table(&format!("{path}.template"));
        tmpl.set(
            "labels",
            Out::Table(vec![
                ("slicer/hostgroup".into(), hg.as_str().into()),
                ("k3sup.dev/node-type".into(), "agent".into()),
            ]),
            Some("The labels the provider's agents registered with (workloads may select them)."),
        );
        if let Some(arch) = arch {
            tmpl.set("arch", arch.as_str(), Some("[nodegroup] arch (the provider read it but never used it)"));
            r.mapped(&format!("[nodegroup \"{hg}\"] arch"), &format!("{path}.template.arch"));
        }
    }
    r.note(
        "The provider reported node names as instance ids, which never matched k3s's provider ids \
         (k3s://<node name>), and named nodes <hostname>-<random> (--with-node-id). Flotilla names each node after \
         its VM's hostname and reports k3s://<hostname>, so cluster-autoscaler matches VMs to nodes. VMs the provider \
         created carry no Flotilla tags and are left alone: drain and delete them (and their Nodes) once Flotilla \
         runs.",
    );
    r.note(
        "The provider deleted Node objects itself; Flotilla does not (cluster-autoscaler needs no node-delete \
         permission for it). Without a cloud controller, a deleted VM's Node stays NotReady until removed.",
    );
    r.note(
        "cluster-autoscaler flags from the seed's Helm values (extraArgs: scale-down-unneeded-time, \
         scale-down-delay-after-add, expendable-pods-priority-cutoff, ...) are not in the INI file: keep them, and \
         replace cloud-provider=slicer with externalgrpc.",
    );
    p.into_result()?;
    Ok(Import { document: doc, report: r, files: Vec::new() })
}
