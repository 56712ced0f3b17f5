//! `flotilla import <kind> FILE...`: turns the configuration of a system users migrate from
//! (the seeds: the in-tree Kamatera provider, the Slicer provider, the K3s-on-OpenStack,
//! Proxmox and Docker autoscalers) into a Flotilla configuration, plus the cluster-autoscaler
//! flags that replace the seed's own scaling logic and the values that run it all with the
//! chart ([`helm`]).
//!
//! Every key of the input ends up in the [`Report`]: carried over, turned into a CA flag or a
//! per-group option, turned into a secret reference (`{ env = "VAR" }`: a secret's value is
//! never written), or listed as not carried over with the reason. [`verify`] then checks the
//! result exactly as `flotilla check-config` would, with the real drivers, using placeholder
//! files for the secrets the user has not set yet.
//!
//! One module per seed; [`gcfg`] reads the INI dialect of the two cluster-autoscaler providers
//! (Go's gcfg), [`pysettings`] the Proxmox autoscaler's `settings.py`.

use std::{
    fmt,
    path::{Path, PathBuf},
};

pub mod docker;
pub mod gcfg;
pub mod helm;
pub mod kamatera;
pub mod openstack;
pub mod out;
pub mod proxmox;
pub mod pysettings;
pub mod report;
pub mod slicer;
mod yaml;

pub use out::Document;
pub use report::Report;

/// The systems Flotilla imports from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// cluster-autoscaler's in-tree Kamatera provider (INI cloud-config).
    Kamatera,
    /// The Slicer provider for cluster-autoscaler (INI cloud-config).
    Slicer,
    /// The K3s autoscaler on OpenStack (YAML config, credentials file, Butane template).
    Openstack,
    /// The Proxmox autoscaler (`settings.py`, or the same keys as YAML or env).
    Proxmox,
    /// The K3s Docker autoscaler (`config.yaml`).
    Docker,
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Kamatera => "kamatera",
            Kind::Slicer => "slicer",
            Kind::Openstack => "openstack",
            Kind::Proxmox => "proxmox",
            Kind::Docker => "docker",
        })
    }
}

/// What to import, and from where.
#[derive(Clone, Debug)]
pub struct Request {
    pub kind: Kind,
    pub files: Vec<PathBuf>,
    /// The directory the configuration will live in: paths it names are written relative to it.
    pub output_dir: PathBuf,
    /// For seeds that have no cluster name of their own.
    pub cluster_name: Option<String>,
    /// `KEY=VALUE` pairs that replace (or supply) seed keys, e.g. a template VM's VMID.
    pub overrides: Vec<(String, String)>,
}

/// One input file, read.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: PathBuf,
    pub text: String,
}

impl Source {
    /// The file's name as the report shows it.
    pub fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// The result: the configuration to write and the account of every input key.
#[derive(Clone, Debug)]
pub struct Import {
    pub document: Document,
    pub report: Report,
    /// Files the configuration names, written beside it (mode 0600: e.g. an init script that
    /// holds a join token, which must not be inlined in the configuration).
    pub files: Vec<ExtraFile>,
}

/// A file written beside the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraFile {
    /// Relative to the configuration's directory.
    pub name: String,
    pub content: String,
}

/// Writes the import's extra files into `dir` (owner-only), returning their paths.
pub fn write_files(import: &Import, dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut written = Vec::new();
    for f in &import.files {
        let path = dir.join(&f.name);
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        std::io::Write::write_all(&mut options.open(&path)?, f.content.as_bytes())?;
        written.push(path);
    }
    Ok(written)
}

/// The cloud-config text of an input: the file itself, or the `cloud-config` entry of a
/// Kubernetes Secret or ConfigMap manifest (how cluster-autoscaler's providers mount it).
pub fn cloud_config_text(source: &Source) -> Result<(String, String), Problem> {
    let problem = |m: String| Problem { file: source.name(), key: String::new(), message: m };
    let Ok(doc) = serde_yaml::from_str::<serde_yaml::Value>(&source.text) else {
        return Ok((source.text.clone(), source.name()));
    };
    let kind = doc.get("kind").and_then(serde_yaml::Value::as_str);
    if !matches!(kind, Some("Secret") | Some("ConfigMap")) {
        return Ok((source.text.clone(), source.name()));
    }
    use base64::Engine as _;
    for (field, encoded) in [("stringData", false), ("data", kind == Some("Secret"))] {
        let Some(map) = doc.get(field).and_then(serde_yaml::Value::as_mapping) else { continue };
        let entry = map
            .get("cloud-config")
            .or_else(|| (map.len() == 1).then(|| map.values().next()).flatten())
            .and_then(serde_yaml::Value::as_str);
        if let Some(text) = entry {
            let text = if encoded {
                let bytes = base64::engine::general_purpose::STANDARD
                    .decode(text.trim())
                    .map_err(|e| problem(format!("{field}.cloud-config is not base64: {e}")))?;
                String::from_utf8(bytes).map_err(|_| problem(format!("{field}.cloud-config is not UTF-8 text")))?
            } else {
                text.to_owned()
            };
            return Ok((text, format!("{} ({field}.cloud-config)", source.name())));
        }
    }
    Err(problem(format!("this {} has no cloud-config entry", kind.unwrap_or_default())))
}

/// One thing wrong with the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// The input file.
    pub file: String,
    /// The seed's key (with its section), or empty for the file as a whole.
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.key.is_empty() {
            true => write!(f, "{}: {}", self.file, self.message),
            false => write!(f, "{}: {}: {}", self.file, self.key, self.message),
        }
    }
}

/// Why an import failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The files given do not make a complete input for this kind.
    #[error("{0}")]
    Usage(String),
    /// Everything wrong with the input, all at once.
    #[error("{}", list(.0))]
    Input(Vec<Problem>),
}

fn list(items: &[Problem]) -> String {
    let n = items.len();
    let mut s = format!("{n} problem{} in the input:", if n == 1 { "" } else { "s" });
    for p in items {
        s.push_str("\n  ");
        s.push_str(&p.to_string());
    }
    s
}

/// Collects problems while an importer reads its input, so all of them are reported at once.
#[derive(Debug, Default)]
pub struct Problems(pub Vec<Problem>);

impl Problems {
    pub fn push(&mut self, file: &str, key: &str, message: impl Into<String>) {
        self.0.push(Problem { file: file.to_owned(), key: key.to_owned(), message: message.into() });
    }

    /// `Err(Error::Input)` when anything was pushed.
    pub fn into_result(self) -> Result<(), Error> {
        if self.0.is_empty() { Ok(()) } else { Err(Error::Input(self.0)) }
    }
}

/// Reads the request's files and runs the kind's importer.
pub fn import(req: &Request) -> Result<Import, Error> {
    if req.files.is_empty() {
        return Err(Error::Usage(format!("give at least one {} configuration file", req.kind)));
    }
    let sources = req
        .files
        .iter()
        .map(|path| {
            let text = std::fs::read_to_string(path).map_err(|source| Error::Read { path: path.clone(), source })?;
            // Go and Python readers skip a UTF-8 byte-order mark; so do we.
            let text = text.strip_prefix('\u{feff}').map(str::to_owned).unwrap_or(text);
            Ok(Source { path: path.clone(), text })
        })
        .collect::<Result<Vec<_>, Error>>()?;
    let mut import = match req.kind {
        Kind::Openstack => openstack::import(req, &sources)?,
        Kind::Proxmox => proxmox::import(req, &sources)?,
        Kind::Docker => docker::import(req, &sources)?,
        Kind::Kamatera => kamatera::import(req, &sources)?,
        Kind::Slicer => slicer::import(req, &sources)?,
    };
    import.report.inputs = sources.iter().map(Source::name).collect();
    Ok(import)
}

/// Checks the imported configuration as `flotilla check-config` would, with every driver, as
/// if it were written to `output_dir`. Secrets are pointed at placeholder files, since the
/// user sets their variables only later.
pub fn verify(import: &Import, output_dir: &Path) -> Result<(), crate::config::Problems> {
    let scratch = std::env::temp_dir().join(format!(
        "flotilla-import-{}-{}",
        std::process::id(),
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
    ));
    let placeholder = |var: &str| scratch.join(var);
    // Stand-ins shaped to pass every driver's checks of a secret (Kamatera passwords need
    // 10-20 characters with a capital, a small letter and a digit).
    let prepared = std::fs::create_dir_all(&scratch).and_then(|()| {
        import.document.secret_vars().iter().try_for_each(|var| std::fs::write(placeholder(var), "Placeholder123"))
    });
    let result = match prepared {
        Err(e) => {
            let mut p = crate::config::Problems::new("<imported configuration>", output_dir);
            p.push("", format!("cannot prepare the check in {}: {e}", scratch.display()));
            Err(p)
        }
        Ok(()) => {
            let text = import.document.render_with(&|var| {
                format!("{{ file = {} }}", out::basic_string(&placeholder(var).display().to_string()))
            });
            let (config, mut problems) =
                crate::config::Config::parse_partial(&text, "<imported configuration>", output_dir);
            if let Some(config) = config {
                let _ = crate::driver::build(&config, &mut problems);
            }
            if problems.is_empty() { Ok(()) } else { Err(problems) }
        }
    };
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

/// `flotilla import`'s flags.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The system to import from.
    pub kind: Kind,
    /// Its configuration files. kamatera, slicer: the INI cloud-config, or the Secret manifest
    /// holding it. openstack: the config YAML and the credentials file (or a clouds.yaml); the
    /// Butane template is found next to the config or given too. proxmox: settings.py, the
    /// manifest that mounts it, or the same keys as YAML or an env file. docker: config.yaml.
    /// Every key and where it goes: docs/migrating.md.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// Write the configuration here instead of to standard output (the report then goes to
    /// standard output instead of standard error).
    #[arg(long, short)]
    pub output: Option<PathBuf>,
    /// Cluster name, for seeds that have none of their own (Docker, Proxmox, Slicer).
    #[arg(long)]
    pub cluster_name: Option<String>,
    /// Replace or supply a seed key: `--set pxe_autoscaled_node_template_vm=9000`.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_override)]
    pub overrides: Vec<(String, String)>,
    /// Write the configuration even if Flotilla's own check finds problems in it.
    #[arg(long)]
    pub force: bool,
}

fn parse_override(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.trim().to_owned(), v.to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

/// Runs `flotilla import`: imports, checks the result with the real drivers, writes it, and
/// prints the report. Returns false (exit 1) when nothing usable was written.
pub fn run(args: Args) -> bool {
    let output_dir = match &args.output {
        Some(path) => {
            path.parent().filter(|p| !p.as_os_str().is_empty()).map(Path::to_path_buf).unwrap_or_else(|| ".".into())
        }
        None => PathBuf::from("."),
    };
    let req = Request {
        kind: args.kind,
        files: args.files,
        output_dir: output_dir.clone(),
        cluster_name: args.cluster_name,
        overrides: args.overrides,
    };
    let import = match import(&req) {
        Ok(i) => i,
        Err(e) => {
            eprintln!("flotilla import {}: {e}", req.kind);
            return false;
        }
    };
    let extra = match write_files(&import, &output_dir) {
        Ok(paths) => paths,
        Err(e) => {
            eprintln!("flotilla import {}: cannot write into {}: {e}", req.kind, output_dir.display());
            return false;
        }
    };
    let check = verify(&import, &output_dir);
    if let Err(problems) = &check {
        eprintln!(
            "flotilla import {}: the imported configuration does not pass Flotilla's check:\n{problems}",
            req.kind
        );
        if !args.force {
            for path in &extra {
                let _ = std::fs::remove_file(path);
            }
            eprintln!("Nothing was written. Fix the input (or write it anyway with --force).");
            return false;
        }
    }
    let text = import.document.render();
    let instructions = instructions(&import, args.output.as_deref());
    match &args.output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &text) {
                eprintln!("flotilla import {}: cannot write {}: {e}", req.kind, path.display());
                return false;
            }
            println!("{instructions}");
            for p in &extra {
                println!("Wrote {} (mode 0600).", p.display());
            }
            println!("Wrote {}.", path.display());
        }
        None => {
            print!("{text}");
            eprintln!("{instructions}");
            for p in &extra {
                eprintln!("Wrote {} (mode 0600).", p.display());
            }
        }
    }
    check.is_ok()
}

/// The text after the configuration: the report, the cluster-autoscaler flags and its
/// cloud-config, and what to do next, by hand or with the chart.
pub fn instructions(import: &Import, config_path: Option<&Path>) -> String {
    let mut s = import.report.to_string();
    let shown = config_path.map(|p| p.display().to_string()).unwrap_or_else(|| "flotilla.toml".into());
    s.push_str("\nRun cluster-autoscaler against Flotilla with:\n");
    s.push_str("  --cloud-provider=externalgrpc\n");
    s.push_str("  --cloud-config=/etc/cluster-autoscaler/cloud-config.yaml   # address: 127.0.0.1:8086 (Flotilla's grpc_listen)\n");
    for f in import.report.flag_args() {
        s.push_str(&format!("  {f}\n"));
    }
    s.push_str(
        "Keep your other cluster-autoscaler flags; --nodes and --node-group-auto-discovery are ignored with \
         externalgrpc (every group comes from Flotilla).\n",
    );
    s.push_str(&format!("Then: flotilla check-config --config {shown} && flotilla serve --config {shown}\n"));

    let helm = helm::Values::new(import);
    s.push_str(&format!(
        "\nOr with Helm: charts/flotilla runs cluster-autoscaler and Flotilla in one pod and writes the \
         cloud-config and the [server] table itself. Values ({}):\n",
        helm::VALUES_FILE
    ));
    for line in helm.yaml().lines() {
        s.push_str(&format!("  {line}\n"));
    }
    let secrets = match (helm.secret_vars.is_empty(), helm.files.is_empty()) {
        (true, true) => "Install".to_owned(),
        (false, true) => format!("Create the Secret {} from the variables above, and install", helm::SECRETS),
        (true, false) => {
            format!("Create the Secret {} with the files the configuration names, and install", helm::FILES)
        }
        (false, false) => format!(
            "Create the Secrets {} from the variables above and {} with the files the configuration names, and install",
            helm::SECRETS,
            helm::FILES
        ),
    };
    s.push_str(&format!("{secrets} with {shown} as flotilla.configToml (again after every change to it):\n"));
    let config = config_path.map(Path::to_path_buf).unwrap_or_else(|| "flotilla.toml".into());
    for c in helm.commands(&config) {
        s.push_str(&format!("  {c}\n"));
    }
    s
}

/// The known name `key` most likely misspells or abbreviates, if any ("did you mean" hints).
pub fn closest<'a>(key: &str, names: &[&'a str]) -> Option<&'a str> {
    let distance = |a: &str, b: &str| {
        let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
        let mut prev: Vec<usize> = (0..=b.len()).collect();
        for (i, ca) in a.iter().enumerate() {
            let mut cur = vec![i + 1];
            for (j, cb) in b.iter().enumerate() {
                cur.push((prev[j] + usize::from(ca != cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
            }
            prev = cur;
        }
        prev[b.len()]
    };
    names
        .iter()
        .map(|n| (distance(&key.to_ascii_lowercase(), n), *n))
        .filter(|(d, n)| *d <= 2.max(n.len() / 4) || (key.len() >= 4 && n.starts_with(&key.to_ascii_lowercase())))
        .min_by_key(|(d, _)| *d)
        .map(|(_, n)| n)
}

/// True for key names that usually hold a secret (password, token, secret, private key).
pub fn looks_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    ["password", "passwd", "token", "secret", "private", "credential"].iter().any(|w| k.contains(w))
}

/// A seconds count as a cluster-autoscaler duration flag value (`600` -> `10m`).
pub fn go_duration(seconds: u64) -> String {
    match seconds {
        0 => "0s".into(),
        s if s % 3600 == 0 => format!("{}h", s / 3600),
        s if s % 60 == 0 => format!("{}m", s / 60),
        s => format!("{s}s"),
    }
}

/// A name made into a DNS label as Flotilla's cluster and group names must be: lower case,
/// runs of other characters become one `-`, at most 40 characters.
pub fn dns_label(name: &str) -> String {
    let mut out = String::new();
    for c in name.chars() {
        if c.is_ascii_alphanumeric() {
            out.push(c.to_ascii_lowercase());
        } else if !out.ends_with('-') {
            out.push('-');
        }
    }
    let out = out.trim_matches('-');
    let mut out: String = out.chars().take(40).collect();
    while out.ends_with('-') {
        out.pop();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_become_dns_labels() {
        assert_eq!(dns_label("autoscaler.node"), "autoscaler-node");
        assert_eq!(dns_label("My_Group 1"), "my-group-1");
        assert_eq!(dns_label("--x--"), "x");
    }

    #[test]
    fn durations_are_written_as_cluster_autoscaler_reads_them() {
        assert_eq!(go_duration(600), "10m");
        assert_eq!(go_duration(15), "15s");
        assert_eq!(go_duration(7200), "2h");
        assert_eq!(go_duration(90), "90s");
    }

    #[test]
    fn near_misses_of_known_keys_are_suggested() {
        assert_eq!(closest("default-script", &["default-script-base64", "default-cpu"]), Some("default-script-base64"));
        assert_eq!(closest("image", &["default-script-base64", "default-cpu"]), None);
        assert_eq!(closest("defualt-cpu", &["default-script-base64", "default-cpu"]), Some("default-cpu"));
    }
}
