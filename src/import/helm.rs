//! The Helm values that run an imported configuration with the chart (`charts/flotilla`), and
//! the commands that go with them.
//!
//! The configuration goes to the chart whole, as `flotilla.configToml` (`helm --set-file`): the
//! file the import wrote, comments included, so the pod runs the text `check-config` checked.
//! Around it the values carry what the chart cannot know:
//! - each secret the configuration names as `{ env = "VAR" }` comes from the Secret
//!   [`SECRETS`] (key `VAR`) through `flotilla.secretEnv`;
//! - each file it names (the `*_file` keys: an OpenStack credentials file, a CA bundle, a
//!   Kamatera init script holding a join token) comes from the Secret [`FILES`], mounted with
//!   `subPath` exactly where the configuration looks for it; relative paths resolve against
//!   [`CONFIG_DIR`], where the chart mounts `flotilla.toml`;
//! - the seed's settings that became cluster-autoscaler flags go to `autoscaler.extraArgs`,
//!   as strings (Helm reads numbers as floats and would print `1e+06`), except the flags the
//!   chart owns or that make no sense in its pod ([`CHART_FLAGS`]), which are left out with a
//!   comment saying why.
//!
//! What cannot work in a pod as imported (a Docker engine's Unix socket) is said in a comment
//! at the top of the values. The chart writes cluster-autoscaler's cloud-config and Flotilla's
//! `[server]` table itself.
//! The YAML is written by hand, in the flow style of the chart's own examples; every string
//! that could be read as anything else is JSON-quoted (a valid YAML double-quoted scalar).
//! `tests/chart/run` renders the printed values with `helm template`, the chart's schema and
//! `check-config`.

use std::{
    fmt::Write as _,
    path::{Path, PathBuf},
};

use super::{
    Import,
    out::{comment_lines, normalize},
};

/// Where the chart mounts `flotilla.toml` (`charts/flotilla/templates/_helpers.tpl`), which
/// relative paths in the configuration resolve against.
pub const CONFIG_DIR: &str = "/etc/flotilla";
/// The Secret that holds the configuration's `{ env = ... }` secrets, one key per variable.
pub const SECRETS: &str = "flotilla-secrets";
/// The Secret that holds the files the configuration names.
pub const FILES: &str = "flotilla-files";
/// The release and namespace of the printed commands (the README's).
const RELEASE: &str = "autoscaler";
/// The values file the printed commands name.
pub const VALUES_FILE: &str = "flotilla-values.yaml";
/// cluster-autoscaler flags an import may print that do not go into the chart's `extraArgs`,
/// and why.
const CHART_FLAGS: &[(&str, &str)] = &[
    ("kubeconfig", "in the chart, cluster-autoscaler reaches the API with its service account"),
    ("cloud-provider", "the chart sets it"),
    ("cloud-config", "the chart sets it"),
    ("namespace", "the chart sets it (the release namespace)"),
];

/// A file the configuration names, as the pod gets it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MountedFile {
    /// The path as the configuration writes it.
    pub path: String,
    /// Its key in the Secret [`FILES`].
    pub key: String,
    /// Where the pod mounts it: the path the configuration resolves it to in the pod.
    pub mount_path: String,
}

/// What the chart needs beside the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Values {
    /// Environment variables filled from [`SECRETS`].
    pub secret_vars: Vec<String>,
    pub files: Vec<MountedFile>,
    /// cluster-autoscaler flags (name, value) for `autoscaler.extraArgs`.
    pub flags: Vec<(String, String)>,
    /// Comment lines at the top of the values: flags left out, settings that need a change to
    /// work in a pod.
    pub comments: Vec<String>,
    /// A cloud has `node_cleanup = true` (warm pools need it): the chart must grant Flotilla
    /// delete on Nodes (`flotilla.nodeCleanup.enabled`), or refuses the configuration.
    pub node_cleanup: bool,
}

impl Values {
    pub fn new(import: &Import) -> Self {
        let mut files: Vec<MountedFile> = Vec::new();
        for (_, path) in import.document.file_paths() {
            if files.iter().any(|f| f.path == path) {
                continue;
            }
            let in_pod = if Path::new(&path).is_absolute() {
                normalize(Path::new(&path))
            } else {
                normalize(&Path::new(CONFIG_DIR).join(&path))
            };
            let mount_path = in_pod.display().to_string();
            if files.iter().any(|f| f.mount_path == mount_path) {
                continue;
            }
            let key = secret_key(&path, &files);
            files.push(MountedFile { path, key, mount_path });
        }
        let mut comments = Vec::new();
        for (key, host) in import.document.strings(&|key| key == "host") {
            if host.starts_with("unix://") {
                comments.push(format!(
                    "{key} is a Unix socket of the Docker host, which a pod does not have: give the engine's \
                     tcp:// address with TLS (examples/helm/docker.yaml), or mount the socket (extraVolumes, \
                     hostPath) and run the pod on that host as a user the socket admits."
                ));
            }
        }
        let mut flags = Vec::new();
        for f in &import.report.flags {
            match CHART_FLAGS.iter().find(|(name, _)| *name == f.name) {
                Some((_, why)) => comments.push(format!("--{}={} is left out: {why}.", f.name, f.value)),
                None => flags.push((f.name.clone(), f.value.clone())),
            }
        }
        Values {
            secret_vars: import.document.secret_vars(),
            files,
            flags,
            comments,
            node_cleanup: import.document.any_true("node_cleanup"),
        }
    }

    /// The values file, as YAML.
    pub fn yaml(&self) -> String {
        let mut s = String::new();
        for c in &self.comments {
            comment_lines(c, &mut s);
        }
        s.push_str("flotilla:\n");
        s.push_str("  image:\n    repository: flotilla   # the image you pushed (README, \"Container image\")\n");
        if self.node_cleanup {
            s.push_str("  # node_cleanup = true in the configuration: Flotilla may delete Nodes.\n");
            s.push_str("  nodeCleanup: {enabled: true}\n");
        }
        if !self.secret_vars.is_empty() {
            s.push_str("  secretEnv:\n");
            for var in &self.secret_vars {
                let _ = writeln!(s, "    {}: {{name: {SECRETS}, key: {}}}", scalar(var), scalar(var));
            }
        }
        if !self.files.is_empty() {
            let _ = writeln!(s, "  extraVolumes:\n    - name: {FILES}\n      secret: {{secretName: {FILES}}}");
            s.push_str("  extraVolumeMounts:\n");
            for f in &self.files {
                let _ = writeln!(
                    s,
                    "    - {{name: {FILES}, mountPath: {}, subPath: {}, readOnly: true}}",
                    quoted(&f.mount_path),
                    quoted(&f.key)
                );
            }
        }
        if !self.flags.is_empty() {
            s.push_str("autoscaler:\n  extraArgs:\n");
            for (name, value) in &self.flags {
                let _ = writeln!(s, "    {}: {}", scalar(name), quoted(value));
            }
        }
        s
    }

    /// The commands that create the Secrets and install the chart, with the configuration at
    /// `config` (as the user's shell sees it).
    pub fn commands(&self, config: &Path) -> Vec<String> {
        let dir = config.parent().unwrap_or(Path::new(""));
        let mut out = vec![format!("kubectl create namespace {RELEASE}")];
        if !self.secret_vars.is_empty() {
            let mut c = format!("kubectl -n {RELEASE} create secret generic {SECRETS}");
            for var in &self.secret_vars {
                let _ = write!(c, " --from-literal={var}=\"${var}\"");
            }
            out.push(c);
        }
        if !self.files.is_empty() {
            let mut c = format!("kubectl -n {RELEASE} create secret generic {FILES}");
            for f in &self.files {
                let local: PathBuf =
                    if Path::new(&f.path).is_absolute() { f.path.clone().into() } else { dir.join(&f.path) };
                let _ = write!(c, " {}", shell_word(&format!("--from-file={}={}", f.key, local.display())));
            }
            out.push(c);
        }
        out.push(format!(
            "helm upgrade --install {RELEASE} charts/flotilla -n {RELEASE} -f {VALUES_FILE} --set-file {}",
            shell_word(&format!("flotilla.configToml={}", config.display()))
        ));
        out
    }
}

/// A Secret key for `path` (its file name, in the characters Secret keys allow), not yet taken.
fn secret_key(path: &str, taken: &[MountedFile]) -> String {
    let name = Path::new(path).file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut base: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || "-._".contains(c) { c } else { '-' }).collect();
    if base.is_empty() || base == "." || base == ".." {
        base = "file".into();
    }
    let mut key = base.clone();
    let mut n = 2;
    while taken.iter().any(|f| f.key == key) {
        key = format!("{n}-{base}");
        n += 1;
    }
    key
}

/// A YAML plain scalar when `s` reads back as that string in YAML 1.1 and 1.2 (Helm reads
/// values with YAML 1.1 rules, where `on` and `y` are booleans), else a quoted one.
fn scalar(s: &str) -> String {
    const RESERVED: &[&str] = &["y", "n", "yes", "no", "true", "false", "on", "off", "null"];
    let plain = s.starts_with(|c: char| c.is_ascii_alphabetic())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || "_-".contains(c))
        && !RESERVED.contains(&s.to_ascii_lowercase().as_str());
    if plain { s.to_owned() } else { quoted(s) }
}

/// A YAML double-quoted scalar (JSON's escapes are a subset of YAML's).
fn quoted(s: &str) -> String {
    serde_json::Value::String(s.to_owned()).to_string()
}

/// `s` as one word for a POSIX shell.
fn shell_word(s: &str) -> String {
    if !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c)) {
        s.to_owned()
    } else {
        format!("'{}'", s.replace('\'', r"'\''"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::import::{Document, Report, out::Value};

    fn import_with(files: &[(&str, &str)], secrets: &[&str], flags: &[(&str, &str)]) -> Import {
        let mut document = Document::default();
        document.root.set("cluster_name", "c", None);
        for (key, path) in files {
            document.root.table("clouds.x").set(key, *path, None);
        }
        for (i, var) in secrets.iter().enumerate() {
            document.root.table("clouds.x").set(&format!("secret{i}"), Value::SecretEnv((*var).into()), None);
        }
        let mut report = Report::new("test");
        for (name, value) in flags {
            report.flag("seed-key", name, value);
        }
        Import { document, report, files: vec![] }
    }

    #[test]
    fn relative_files_are_mounted_where_the_configuration_resolves_them_in_the_pod() {
        let i = import_with(
            &[("credentials_file", "creds.yaml"), ("ca_file", "../pki/ca.pem"), ("script_file", "/opt/init.sh")],
            &[],
            &[],
        );
        let v = Values::new(&i);
        let mounts: Vec<_> = v.files.iter().map(|f| (f.key.as_str(), f.mount_path.as_str())).collect();
        assert_eq!(
            mounts,
            [("creds.yaml", "/etc/flotilla/creds.yaml"), ("ca.pem", "/etc/pki/ca.pem"), ("init.sh", "/opt/init.sh")]
        );
        let cmds = v.commands(Path::new("out/flotilla.toml"));
        assert!(
            cmds.contains(
                &"kubectl -n autoscaler create secret generic flotilla-files --from-file=creds.yaml=out/creds.yaml \
                 --from-file=ca.pem=out/../pki/ca.pem --from-file=init.sh=/opt/init.sh"
                    .to_owned()
            ),
            "{cmds:#?}"
        );
    }

    #[test]
    fn two_files_with_one_name_get_two_keys() {
        let i = import_with(&[("ca_file", "a/ca.pem"), ("clouds_file", "b/ca.pem")], &[], &[]);
        let keys: Vec<_> = Values::new(&i).files.into_iter().map(|f| f.key).collect();
        assert_eq!(keys, ["ca.pem", "2-ca.pem"]);
    }

    #[test]
    fn values_read_back_as_the_strings_written() {
        let i = import_with(
            &[("script_file", "my init.sh")],
            &["ON", "K3S_TOKEN"],
            &[("scan-interval", "15s"), ("max-total-unready-percentage", "45"), ("new-pod-scale-up-delay", "1e6")],
        );
        let v = Values::new(&i);
        let yaml: serde_yaml::Value = serde_yaml::from_str(&v.yaml()).unwrap_or_else(|e| panic!("{e}\n{}", v.yaml()));
        // Quoted: Helm reads values as YAML 1.1, where a plain ON is true.
        assert!(v.yaml().contains(r#"    "ON": {name: flotilla-secrets, key: "ON"}"#), "{}", v.yaml());
        let env = &yaml["flotilla"]["secretEnv"];
        assert_eq!(env["ON"]["key"].as_str(), Some("ON"), "{}", v.yaml());
        assert_eq!(env["K3S_TOKEN"]["name"].as_str(), Some(SECRETS));
        let args = &yaml["autoscaler"]["extraArgs"];
        assert_eq!(args["max-total-unready-percentage"].as_str(), Some("45"));
        assert_eq!(args["new-pod-scale-up-delay"].as_str(), Some("1e6"));
        let mount = &yaml["flotilla"]["extraVolumeMounts"][0];
        assert_eq!(mount["mountPath"].as_str(), Some("/etc/flotilla/my init.sh"));
        assert_eq!(mount["subPath"].as_str(), Some("my-init.sh"));
        let cmds = v.commands(Path::new("flotilla.toml"));
        assert!(cmds.iter().any(|c| c.ends_with(" '--from-file=my-init.sh=my init.sh'")), "{cmds:#?}");
        assert!(cmds.iter().any(|c| c.ends_with(r#" --from-literal=ON="$ON" --from-literal=K3S_TOKEN="$K3S_TOKEN""#)));
    }

    #[test]
    fn flags_the_chart_owns_or_a_pod_cannot_use_are_left_out_with_the_reason() {
        let mut i = import_with(&[], &[], &[("kubeconfig", "/app/kubeconfig.yaml"), ("scan-interval", "30s")]);
        i.document.root.table("clouds.local").set("driver", "docker", None).set(
            "host",
            "unix:///var/run/docker.sock",
            None,
        );
        let v = Values::new(&i);
        assert_eq!(v.flags, [("scan-interval".to_owned(), "30s".to_owned())]);
        let yaml = v.yaml();
        assert!(yaml.starts_with("# clouds.local.host is a Unix socket"), "{yaml}");
        assert!(yaml.contains("# --kubeconfig=/app/kubeconfig.yaml is left out: in the chart"), "{yaml}");
        assert!(!yaml.contains("    kubeconfig:"), "{yaml}");
    }

    #[test]
    fn without_secrets_files_or_flags_only_the_image_is_set() {
        let v = Values::new(&import_with(&[], &[], &[]));
        assert_eq!(v.yaml().lines().filter(|l| !l.trim_start().starts_with('#')).count(), 3, "{}", v.yaml());
        assert_eq!(
            v.commands(Path::new("flotilla.toml")),
            [
                "kubectl create namespace autoscaler",
                "helm upgrade --install autoscaler charts/flotilla -n autoscaler -f flotilla-values.yaml \
                 --set-file flotilla.configToml=flotilla.toml"
            ]
        );
    }
}
