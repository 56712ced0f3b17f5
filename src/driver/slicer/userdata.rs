//! The userdata of a Slicer VM: a script rendered per machine from a minijinja template (as the
//! OpenStack driver's user data is), by default one that installs and starts a k3s agent.
//!
//! # Why the node name and provider id agree with what Flotilla reports
//! Slicer picks a VM's hostname (`<host group>-N`) only when the create call runs, after the
//! userdata is rendered, so the script reads it at boot (`NODE_NAME="$(hostname)"`) and starts
//! the agent with `--node-name "$NODE_NAME"` (never `--with-node-id`, whose random suffix is what
//! broke the upstream provider's matching) and `--kubelet-arg=provider-id=...`. The provider id is
//! the group's format rendered as a shell word in which `{id}` is `"${NODE_NAME}"`: exactly the id
//! Flotilla reports once the create returns the hostname. k3s's embedded cloud controller keeps
//! a provider id the kubelet set (it only fills in `k3s://<node name>` when none is), so the id
//! holds with or without that controller.
//!
//! # The join token
//! The template never sees the token. It sees `token_file`, the path where the Slicer agent in
//! the VM syncs the secret Flotilla stored (`/run/slicer/secrets/<name>`), and hands that path to
//! k3s as `K3S_TOKEN_FILE`, so the token is neither in the userdata nor in the k3s service's
//! environment file.
//!
//! # Template variables
//! `name` (the machine name Flotilla chose, also tagged on the VM), `group`, `cluster`,
//! `host_group`, `k3s_url`, `token_file`, `provider_id` (a shell word; needs `NODE_NAME` set to
//! the hostname), `node_labels` (`key=value` strings), `node_taints` (`key=value:Effect`),
//! `k3s_version` (or none), `k3s_args`, and the group's `template_data` keys, at the top level
//! and under `data`. The filter `shell_quote` quotes a string as one shell word. Reading,
//! checking and rendering the template is [`script`]'s; the variables and the default script
//! are this module's.

use serde_json::{Map, Value};

use crate::{
    config::Problems,
    driver::script::{self, Context, Keys, Template, shell_quote},
    provider_id::{Parts, ProviderIdFormat},
};

/// Where the Slicer agent puts the secrets a VM was given.
pub const SECRETS_DIR: &str = "/run/slicer/secrets";

/// The shell variable the default template stores the hostname in, which `provider_id` expands.
pub const NODE_NAME_VAR: &str = "NODE_NAME";

/// Variables this driver adds to [`script::COMMON`]; `template_data` may not redefine them.
pub const RESERVED: &[&str] =
    &["host_group", "k3s_url", "token_file", "provider_id", "node_labels", "node_taints", "k3s_version", "k3s_args"];

/// Where a group's own template is configured.
pub const KEYS: Keys = Keys { what: "userdata", inline: "userdata", file: Some("userdata_template") };

/// The script every VM runs at first boot unless the group brings its own template.
pub const DEFAULT_TEMPLATE: &str = r#"#!/bin/bash
# Userdata of {{ name }}: a k3s agent of cluster {{ cluster }}, group {{ group }}, written by Flotilla.
# The node is named after this VM's hostname (picked by Slicer) and registers with the provider id
# Flotilla reports for it. The join token stays in the Slicer secret file; it is not in this script.
set -euo pipefail

NODE_NAME="$(hostname)"
TOKEN_FILE={{ token_file | shell_quote }}

# The Slicer agent syncs secrets shortly after boot; k3s reads the token from the file.
for attempt in $(seq 1 60); do
  [ -s "$TOKEN_FILE" ] && break
  sleep 2
done

INSTALLER="$(mktemp)"
for attempt in $(seq 1 30); do
  curl -sfL https://get.k3s.io -o "$INSTALLER" && break
  if [ "$attempt" = 30 ]; then echo "cannot download the k3s install script" >&2; exit 1; fi
  sleep 5
done

{% if k3s_version %}INSTALL_K3S_VERSION={{ k3s_version | shell_quote }} \
{% endif %}K3S_URL={{ k3s_url | shell_quote }} \
K3S_TOKEN_FILE="$TOKEN_FILE" \
sh "$INSTALLER" agent \
  --node-name "$NODE_NAME" \
  --kubelet-arg=provider-id={{ provider_id }}{% for label in node_labels %} \
  --node-label {{ label | shell_quote }}{% endfor %}{% for taint in node_taints %} \
  --node-taint {{ taint | shell_quote }}{% endfor %}{% for arg in k3s_args %} \
  {{ arg | shell_quote }}{% endfor %}
rm -f "$INSTALLER"
"#;

/// [`DEFAULT_TEMPLATE`], whose problems are reported at `key_path` (the group's `machine`
/// table).
pub fn default_template(key_path: &str) -> Template {
    Template {
        what: KEYS.what,
        text: DEFAULT_TEMPLATE.to_owned(),
        origin: "default userdata".to_owned(),
        key_path: key_path.to_owned(),
    }
}

/// One group's userdata recipe.
#[derive(Clone, Debug)]
pub struct UserData {
    pub template: Template,
    /// `template_data`, as JSON.
    pub data: Map<String, Value>,
    pub k3s_version: Option<String>,
    pub k3s_args: Vec<String>,
    /// `key=value`, registered by the agent (the group's template labels).
    pub node_labels: Vec<String>,
    /// `key=value:Effect` (the group's template taints).
    pub node_taints: Vec<String>,
    pub provider_id: ProviderIdFormat,
}

/// Which machine the userdata is for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub group: &'a str,
    /// Substituted for `{region}` in the provider id.
    pub region: &'a str,
    pub host_group: &'a str,
    pub name: &'a str,
    pub k3s_url: &'a str,
    /// The Slicer secret holding the join token.
    pub token_secret: &'a str,
}

/// The provider id of `target` as a shell word whose `{id}` parts expand `$NODE_NAME`.
pub fn provider_id_word(format: &ProviderIdFormat, target: Target<'_>) -> String {
    // A marker no configured text can contain (configuration strings cannot hold NUL).
    const MARK: &str = "\u{0}id\u{0}";
    let text = format.render(Parts {
        cluster: target.cluster,
        group: target.group,
        region: target.region,
        name: target.name,
        id: MARK,
    });
    let mut word = String::new();
    for (i, literal) in text.split(MARK).enumerate() {
        if i > 0 {
            word.push_str(&format!("\"${{{NODE_NAME_VAR}}}\""));
        }
        if !literal.is_empty() {
            word.push_str(&shell_quote(literal));
        }
    }
    word
}

impl UserData {
    fn context(&self, target: Target<'_>) -> Context {
        let machine = script::Target { cluster: target.cluster, group: target.group, name: target.name };
        Context::new(machine, &self.data)
            .with("host_group", target.host_group)
            .with("k3s_url", target.k3s_url)
            .with("token_file", format!("{SECRETS_DIR}/{}", target.token_secret))
            .with("provider_id", provider_id_word(&self.provider_id, target))
            .with("node_labels", self.node_labels.clone())
            .with("node_taints", self.node_taints.clone())
            .with("k3s_version", self.k3s_version.clone())
            .with("k3s_args", self.k3s_args.clone())
    }

    /// The userdata of one machine.
    pub fn render(&self, target: Target<'_>) -> Result<String, script::Error> {
        self.template.render(&self.context(target))
    }

    /// The configuration check: one trial render for `target`, a problem at the template's key
    /// if it fails.
    pub fn check(&self, target: Target<'_>, p: &mut Problems) {
        self.template.check(&self.context(target), p);
    }
}

/// Whether the kubelet may set label `key` on its own Node (`--node-labels`): labels in the
/// `kubernetes.io` and `k8s.io` namespaces only if NodeRestriction allows them, otherwise the
/// kubelet refuses to start.
pub fn kubelet_may_set(key: &str) -> bool {
    const ALLOWED: &[&str] = &[
        "kubernetes.io/hostname",
        "kubernetes.io/arch",
        "kubernetes.io/os",
        "beta.kubernetes.io/arch",
        "beta.kubernetes.io/os",
        "beta.kubernetes.io/instance-type",
        "node.kubernetes.io/instance-type",
        "node.kubernetes.io/windows-build",
        "topology.kubernetes.io/region",
        "topology.kubernetes.io/zone",
        "failure-domain.beta.kubernetes.io/region",
        "failure-domain.beta.kubernetes.io/zone",
    ];
    if ALLOWED.contains(&key) {
        return true;
    }
    let Some((namespace, _)) = key.split_once('/') else { return true };
    let under = |domain: &str| namespace == domain || namespace.ends_with(&format!(".{domain}"));
    if !(under("kubernetes.io") || under("k8s.io")) {
        return true;
    }
    under("kubelet.kubernetes.io") || under("node.kubernetes.io")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn recipe(format: &str) -> UserData {
        UserData {
            template: default_template("groups.agents.machine"),
            data: Map::new(),
            k3s_version: Some("v1.33.4+k3s1".into()),
            k3s_args: vec!["--snapshotter=native".into()],
            node_labels: vec!["slicer/hostgroup=agents".into(), "team=it's".into()],
            node_taints: vec!["dedicated=ci:NoSchedule".into()],
            provider_id: ProviderIdFormat::parse(format).unwrap(),
        }
    }

    fn target() -> Target<'static> {
        Target {
            cluster: "prod",
            group: "agents",
            region: "slicer-1",
            host_group: "agents",
            name: "prod-agents-x1y2z",
            k3s_url: "https://10.0.0.1:6443",
            token_secret: "flotilla-prod-k3s-token",
        }
    }

    #[test]
    fn the_provider_id_is_a_shell_word_that_expands_the_hostname() {
        let word = |f: &str| provider_id_word(&ProviderIdFormat::parse(f).unwrap(), target());
        assert_eq!(word("k3s://{id}"), r#"'k3s://'"${NODE_NAME}""#);
        assert_eq!(word("slicer://{region}/{id}"), r#"'slicer://slicer-1/'"${NODE_NAME}""#);
        assert_eq!(word("k3s://{name}"), "'k3s://prod-agents-x1y2z'");
        assert_eq!(word("{id}"), r#""${NODE_NAME}""#);
    }

    #[test]
    fn the_default_script_passes_everything_as_quoted_words_and_never_the_token() {
        let text = recipe("k3s://{id}").render(target()).unwrap();
        assert!(text.starts_with("#!/bin/bash\n"));
        assert!(text.contains("TOKEN_FILE='/run/slicer/secrets/flotilla-prod-k3s-token'\n"), "{text}");
        assert!(text.contains("INSTALL_K3S_VERSION='v1.33.4+k3s1' \\\nK3S_URL='https://10.0.0.1:6443' \\\n"));
        assert!(text.contains(r#"--kubelet-arg=provider-id='k3s://'"${NODE_NAME}""#));
        assert!(text.contains(r"--node-label 'team=it'\''s'"));
        assert!(text.contains("--node-taint 'dedicated=ci:NoSchedule'"));
        assert!(text.contains("  '--snapshotter=native'\n"));
        assert!(!text.contains("--with-node-id"));
    }

    #[test]
    fn an_unknown_variable_is_named_in_the_error() {
        let mut r = recipe("k3s://{id}");
        r.template.text = "{{ k3s_url }} {{ k3s_tokn }}".into();
        let e = r.render(target()).unwrap_err().to_string();
        assert!(e.contains("unknown variables: k3s_tokn"), "{e}");
    }

    #[test]
    fn kubelet_label_rules_follow_node_restriction() {
        for ok in
            ["team", "slicer/hostgroup", "node.kubernetes.io/pool", "x.kubelet.kubernetes.io/a", "kubernetes.io/arch"]
        {
            assert!(kubelet_may_set(ok), "{ok}");
        }
        for refused in ["node-role.kubernetes.io/worker", "kubernetes.io/role", "example.k8s.io/x"] {
            assert!(!kubelet_may_set(refused), "{refused}");
        }
    }
}
