//! The Docker driver's configuration keys, read with [`Section`] so every mistake is reported
//! with its key path.
//!
//! `[clouds.NAME]`: `host` (`unix:///path` or `tcp://host:port`, default
//! `unix:///var/run/docker.sock`), `tls = { ca_file, cert_file, key_file }` (client certificate
//! for a `tcp://` engine), `timeout` (per API request, default 60s), `dry_run`.
//!
//! `[groups.G.machine]`: `image` (required), `entrypoint`, `command` (default `["agent"]`, the
//! k3s image's agent), `env`, `k3s_url`, `k3s_token` (a secret), `privileged`, `network`,
//! `volumes`, `tmpfs`, `cpus`, `memory`, `restart`, `stop_timeout`, `labels`.

use std::{collections::BTreeMap, path::PathBuf, time::Duration};

use crate::config::{Problems, Secret, Section};

/// Where the engine listens when `host` is not set: the local daemon's socket.
pub const DEFAULT_HOST: &str = "unix:///var/run/docker.sock";

/// Label prefix Flotilla reserves for its ownership marks.
pub const RESERVED_LABEL_PREFIX: &str = "dev.flotilla.";

/// How to reach one Docker engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Host {
    /// A local unix socket.
    Unix(PathBuf),
    /// A remote engine over TCP; with `tls`, the engine checks our client certificate and we
    /// check its certificate against `ca_file`. Without it, plain HTTP (the engine's own
    /// `-H tcp://` without `--tlsverify`), which anyone on the network can drive.
    Tcp { addr: String, tls: Option<TlsFiles> },
}

impl std::fmt::Display for Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Host::Unix(path) => write!(f, "unix://{}", path.display()),
            Host::Tcp { addr, tls: Some(_) } => write!(f, "tcp://{addr} (tls)"),
            Host::Tcp { addr, tls: None } => write!(f, "tcp://{addr}"),
        }
    }
}

/// A client certificate and the CA that signed the engine's certificate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca_file: PathBuf,
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
}

/// Keys of a `[clouds.NAME]` table with `driver = "docker"`.
#[derive(Clone, Debug)]
pub struct CloudSettings {
    pub host: Host,
    /// Bound on each engine API request (a stop also gets its group's `stop_timeout`).
    pub timeout: Duration,
    /// Log what would be created or deleted and change nothing.
    pub dry_run: bool,
}

impl CloudSettings {
    pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> Option<CloudSettings> {
        let host_text = s.string("host", p).unwrap_or_else(|| DEFAULT_HOST.to_owned());
        let tls = s.section("tls", p).map(|mut t| {
            let mut file = |key: &'static str, p: &mut Problems| {
                let path = t.required_string(key, p)?;
                let resolved = p.resolve(&path);
                if !resolved.is_file() {
                    p.push(t.key_path(key), format!("{} does not exist", resolved.display()));
                    return None;
                }
                Some(resolved)
            };
            let files = (file("ca_file", p), file("cert_file", p), file("key_file", p));
            t.finish(p);
            match files {
                (Some(ca_file), Some(cert_file), Some(key_file)) => Some(TlsFiles { ca_file, cert_file, key_file }),
                _ => None,
            }
        });
        let timeout = s.duration("timeout", p).unwrap_or(Duration::from_secs(60));
        if timeout < Duration::from_secs(1) {
            p.push(s.key_path("timeout"), "must be at least 1s");
        }
        let dry_run = s.boolean("dry_run", p).unwrap_or(false);

        let host = if let Some(path) = host_text.strip_prefix("unix://") {
            if !path.starts_with('/') {
                p.push(s.key_path("host"), format!("{host_text:?}: a unix socket path must be absolute"));
                None
            } else if tls.is_some() {
                p.push(s.key_path("tls"), "applies only to a tcp:// host");
                None
            } else {
                Some(Host::Unix(PathBuf::from(path)))
            }
        } else if let Some(addr) = host_text.strip_prefix("tcp://") {
            let addr = addr.trim_end_matches('/');
            let valid = addr.rsplit_once(':').is_some_and(|(h, port)| !h.is_empty() && port.parse::<u16>().is_ok());
            if !valid {
                p.push(s.key_path("host"), format!("{host_text:?} is not tcp://HOST:PORT"));
                None
            } else {
                match tls {
                    // The table was there but a file was missing: already reported.
                    Some(None) => None,
                    Some(Some(files)) => Some(Host::Tcp { addr: addr.to_owned(), tls: Some(files) }),
                    None => Some(Host::Tcp { addr: addr.to_owned(), tls: None }),
                }
            }
        } else {
            p.push(
                s.key_path("host"),
                format!("{host_text:?} is not a Docker host: write unix:///path/to/docker.sock or tcp://HOST:PORT"),
            );
            None
        };
        Some(CloudSettings { host: host?, timeout, dry_run })
    }
}

/// A container restart policy (`docker run --restart`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Restart {
    No,
    Always,
    UnlessStopped,
    OnFailure(Option<u32>),
}

impl Restart {
    fn parse(text: &str) -> Option<Restart> {
        match text {
            "no" => Some(Restart::No),
            "always" => Some(Restart::Always),
            "unless-stopped" => Some(Restart::UnlessStopped),
            "on-failure" => Some(Restart::OnFailure(None)),
            other => other.strip_prefix("on-failure:")?.parse().ok().map(|n| Restart::OnFailure(Some(n))),
        }
    }
}

/// Keys of a `[groups.G.machine]` table: how each container of the group is made.
#[derive(Clone, Debug)]
pub struct GroupSettings {
    pub image: String,
    /// Replaces the image's entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    /// The container's command (arguments to the entrypoint); `None` keeps the image's.
    pub command: Option<Vec<String>>,
    pub env: BTreeMap<String, String>,
    /// Sent as `K3S_URL`.
    pub k3s_url: Option<String>,
    /// Sent as `K3S_TOKEN`; never logged.
    pub k3s_token: Option<Secret>,
    pub privileged: bool,
    /// Network mode or network name (`bridge`, `host`, `none`, `k3s-net`); `None` keeps the
    /// engine's default.
    pub network: Option<String>,
    /// Bind mounts and named volumes, as `docker run -v` writes them (`src:dst[:opts]`).
    pub volumes: Vec<String>,
    /// Container path -> tmpfs mount options.
    pub tmpfs: BTreeMap<String, String>,
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub restart: Restart,
    /// How long a delete waits after SIGTERM before the engine kills the container.
    pub stop_timeout: Duration,
    /// Extra container labels (never `dev.flotilla.*`, which mark ownership).
    pub labels: BTreeMap<String, String>,
}

/// The engine refuses smaller memory limits.
const MIN_MEMORY: u64 = 6 * 1024 * 1024;

impl GroupSettings {
    pub fn parse(s: &mut Section<'_>, p: &mut Problems) -> Option<GroupSettings> {
        let image = s.required_string("image", p);
        let entrypoint = s.contains("entrypoint").then(|| s.string_list("entrypoint", p));
        let command = if s.contains("command") {
            let c = s.string_list("command", p);
            // An empty list keeps the image's own command.
            (!c.is_empty()).then_some(c)
        } else {
            Some(vec!["agent".to_owned()])
        };
        let env = s.string_map("env", p);
        for key in env.keys() {
            if key.is_empty() || key.contains('=') {
                p.push(format!("{}.{key}", s.key_path("env")), "is not a valid environment variable name");
            }
        }
        let k3s_url = s.string("k3s_url", p);
        let k3s_token = s.secret("k3s_token", p);
        for (key, var, set) in
            [("k3s_url", "K3S_URL", k3s_url.is_some()), ("k3s_token", "K3S_TOKEN", k3s_token.is_some())]
        {
            if set && env.contains_key(var) {
                p.push(format!("{}.{var}", s.key_path("env")), format!("conflicts with {}", s.key_path(key)));
            }
        }
        if let Some(url) = &k3s_url
            && !url.starts_with("https://")
        {
            p.push(s.key_path("k3s_url"), format!("{url:?} is not an https:// URL of the k3s server"));
        }
        let privileged = s.boolean("privileged", p).unwrap_or(false);
        let network = s.string("network", p);
        if network.as_deref().is_some_and(|n| n.trim().is_empty()) {
            p.push(s.key_path("network"), "must not be empty");
        }
        let volumes = s.string_list("volumes", p);
        for (i, v) in volumes.iter().enumerate() {
            let valid = v.split_once(':').is_some_and(|(src, rest)| {
                let dst = rest.split(':').next().unwrap_or_default();
                !src.is_empty() && dst.starts_with('/')
            });
            if !valid {
                p.push(
                    format!("{}[{i}]", s.key_path("volumes")),
                    format!("{v:?} is not SOURCE:/container/path[:options]"),
                );
            }
        }
        let tmpfs = s.string_map("tmpfs", p);
        for path in tmpfs.keys() {
            if !path.starts_with('/') {
                p.push(format!("{}.{path}", s.key_path("tmpfs")), "must be an absolute container path");
            }
        }
        let cpu_millis = s.cpu("cpus", p);
        if cpu_millis == Some(0) {
            p.push(s.key_path("cpus"), "must be more than zero");
        }
        let memory_bytes = s.bytes("memory", p);
        if memory_bytes.is_some_and(|m| m < MIN_MEMORY) {
            p.push(s.key_path("memory"), "must be at least 6Mi (the engine refuses less)");
        }
        let restart = match s.string("restart", p) {
            None => Some(Restart::No),
            Some(text) => {
                let r = Restart::parse(&text);
                if r.is_none() {
                    p.push(
                        s.key_path("restart"),
                        format!("{text:?} is not one of \"no\", \"always\", \"unless-stopped\", \"on-failure[:N]\""),
                    );
                }
                r
            }
        };
        let stop_timeout = s.duration("stop_timeout", p).unwrap_or(Duration::from_secs(30));
        let labels = s.string_map("labels", p);
        for key in labels.keys() {
            if key.starts_with(RESERVED_LABEL_PREFIX) {
                p.push(
                    format!("{}.{key}", s.key_path("labels")),
                    format!("labels starting with {RESERVED_LABEL_PREFIX} are Flotilla's ownership marks"),
                );
            }
        }
        Some(GroupSettings {
            image: image?,
            entrypoint,
            command,
            env,
            k3s_url,
            k3s_token,
            privileged,
            network,
            volumes,
            tmpfs,
            cpu_millis,
            memory_bytes,
            restart: restart?,
            stop_timeout,
            labels,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse_cloud(text: &str, dir: &std::path::Path) -> (Option<CloudSettings>, Problems) {
        let t: toml::Table = text.parse().unwrap();
        let mut p = Problems::new("test.toml", dir);
        let mut s = Section::new("clouds.d", &t);
        let c = CloudSettings::parse(&mut s, &mut p);
        s.finish(&mut p);
        (c, p)
    }

    fn parse_group(text: &str, dir: &std::path::Path) -> (Option<GroupSettings>, Problems) {
        let t: toml::Table = text.parse().unwrap();
        let mut p = Problems::new("test.toml", dir);
        let mut s = Section::new("groups.g.machine", &t);
        let g = GroupSettings::parse(&mut s, &mut p);
        s.finish(&mut p);
        (g, p)
    }

    fn paths(p: &Problems) -> Vec<&str> {
        p.items.iter().map(|i| i.path.as_str()).collect()
    }

    #[test]
    fn the_local_socket_is_the_default_host() {
        let (c, p) = parse_cloud("", Path::new("."));
        assert!(p.is_empty(), "{p}");
        let c = c.unwrap();
        assert_eq!(c.host, Host::Unix("/var/run/docker.sock".into()));
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert!(!c.dry_run);
    }

    #[test]
    fn a_tcp_host_takes_client_certificates_resolved_against_the_file() {
        let dir = tempfile::tempdir().unwrap();
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.path().join(f), "x").unwrap();
        }
        let (c, p) = parse_cloud(
            "host = \"tcp://docker.example:2376\"\ntls = { ca_file = \"ca.pem\", cert_file = \"cert.pem\", key_file = \"key.pem\" }\ndry_run = true",
            dir.path(),
        );
        assert!(p.is_empty(), "{p}");
        let c = c.unwrap();
        assert!(c.dry_run);
        match c.host {
            Host::Tcp { addr, tls: Some(tls) } => {
                assert_eq!(addr, "docker.example:2376");
                assert_eq!(tls.key_file, dir.path().join("key.pem"));
            }
            other => panic!("unexpected host {other:?}"),
        }
    }

    #[test]
    fn bad_cloud_keys_are_reported_with_their_paths() {
        let (c, p) = parse_cloud(
            "host = \"ssh://somewhere\"\ntimeout = \"0s\"\ndry_run = \"yes\"\nhots = \"typo\"\ntls = { ca_file = \"absent.pem\", extra = 1 }",
            Path::new("/nonexistent"),
        );
        assert!(c.is_none());
        let found = paths(&p);
        for expected in [
            "clouds.d.host",
            "clouds.d.timeout",
            "clouds.d.dry_run",
            "clouds.d.hots",
            "clouds.d.tls.ca_file",
            "clouds.d.tls.cert_file",
            "clouds.d.tls.key_file",
            "clouds.d.tls.extra",
        ] {
            assert!(found.contains(&expected), "missing {expected} in {found:?}");
        }
        let (_, p) = parse_cloud("host = \"unix:///run/docker.sock\"\ntls = {}", Path::new("."));
        assert!(paths(&p).contains(&"clouds.d.tls"), "{p}");
        let (_, p) = parse_cloud("host = \"tcp://nohost\"", Path::new("."));
        assert_eq!(paths(&p), ["clouds.d.host"]);
        let (_, p) = parse_cloud("host = \"unix://relative.sock\"", Path::new("."));
        assert_eq!(paths(&p), ["clouds.d.host"]);
    }

    #[test]
    fn a_group_needs_only_an_image_and_runs_the_k3s_agent_by_default() {
        let (g, p) = parse_group("image = \"rancher/k3s:v1.31.4-k3s1\"", Path::new("."));
        assert!(p.is_empty(), "{p}");
        let g = g.unwrap();
        assert_eq!(g.command, Some(vec!["agent".to_owned()]));
        assert_eq!(g.entrypoint, None);
        assert_eq!(g.restart, Restart::No);
        assert_eq!(g.stop_timeout, Duration::from_secs(30));
        assert!(!g.privileged);
    }

    #[test]
    fn every_group_key_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "K10abc::server:secret\n").unwrap();
        let (g, p) = parse_group(
            r#"
            image = "rancher/k3s:v1.31.4-k3s1"
            entrypoint = ["/bin/k3s"]
            command = ["agent", "--node-label", "pool=docker"]
            env = { TZ = "UTC" }
            k3s_url = "https://k3s-server:6443"
            k3s_token = { file = "token" }
            privileged = true
            network = "k3s-net"
            volumes = ["/lib/modules:/lib/modules:ro", "k3s-cache:/var/lib/rancher"]
            tmpfs = { "/run" = "", "/var/run" = "size=64m" }
            cpus = "1500m"
            memory = "2Gi"
            restart = "on-failure:3"
            stop_timeout = "45s"
            labels = { team = "infra" }
            "#,
            dir.path(),
        );
        assert!(p.is_empty(), "{p}");
        let g = g.unwrap();
        assert_eq!(g.k3s_token.as_ref().unwrap().expose(), "K10abc::server:secret");
        assert_eq!(g.cpu_millis, Some(1500));
        assert_eq!(g.memory_bytes, Some(2 << 30));
        assert_eq!(g.restart, Restart::OnFailure(Some(3)));
        assert_eq!(g.stop_timeout, Duration::from_secs(45));
        assert_eq!(g.tmpfs.len(), 2);
        assert_eq!(g.command.as_deref().unwrap().len(), 3);
        assert!(!format!("{g:?}").contains("secret"), "the token must not appear in debug output");
    }

    #[test]
    fn bad_group_keys_are_reported_with_their_paths() {
        let (g, p) = parse_group(
            r#"
            command = "agent"
            env = { "A=B" = "x", K3S_TOKEN = "inline" }
            k3s_url = "http://plain:6443"
            k3s_token = { env = "FLOTILLA_TEST_SURELY_UNSET" }
            privileged = "yes"
            volumes = ["/no-destination", "src:relative"]
            tmpfs = { "run" = "" }
            cpus = "lots"
            memory = "1Mi"
            restart = "sometimes"
            stop_timeout = "soon"
            labels = { "dev.flotilla.cluster" = "other" }
            imgae = "typo"
            "#,
            Path::new("."),
        );
        assert!(g.is_none());
        let found = paths(&p);
        for expected in [
            "groups.g.machine.image",
            "groups.g.machine.command",
            "groups.g.machine.env.A=B",
            "groups.g.machine.k3s_url",
            "groups.g.machine.k3s_token",
            "groups.g.machine.privileged",
            "groups.g.machine.volumes[0]",
            "groups.g.machine.volumes[1]",
            "groups.g.machine.tmpfs.run",
            "groups.g.machine.cpus",
            "groups.g.machine.memory",
            "groups.g.machine.restart",
            "groups.g.machine.stop_timeout",
            "groups.g.machine.labels.dev.flotilla.cluster",
            "groups.g.machine.imgae",
        ] {
            assert!(found.contains(&expected), "missing {expected} in {found:?}");
        }
        // The inline K3S_TOKEN does not conflict: k3s_token failed to load. Nothing echoes it.
        assert!(!p.to_string().contains("inline"));
    }

    #[test]
    fn env_may_not_set_what_a_dedicated_key_sets() {
        let (_, p) = parse_group(
            "image = \"i\"\nk3s_url = \"https://s:6443\"\nenv = { K3S_URL = \"https://t:6443\" }",
            Path::new("."),
        );
        assert_eq!(paths(&p), ["groups.g.machine.env.K3S_URL"]);
    }
}
