//! Where the Kubernetes API is and how to prove who we are: a kubeconfig file, or the pod's
//! service account (in-cluster).
//!
//! In-cluster credentials follow client-go's `rest.InClusterConfig`: the server is
//! `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`, the CA is
//! `/var/run/secrets/kubernetes.io/serviceaccount/ca.crt`, and the bearer token is the file
//! `token` beside it. The kubelet rotates that token (bound service-account tokens live about an
//! hour), so the file is read again once the copy in memory is a minute old, as client-go's
//! cached token source does, and at once after the API answers 401.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use base64::Engine as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde::Deserialize;

use super::{Error, Result};
use crate::config::Secret;

/// The service account directory every pod gets.
pub const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// How long a token read from a file is used before the file is read again.
pub const TOKEN_REREAD: Duration = Duration::from_secs(60);

/// Everything needed to open connections to one API server.
pub struct Credentials {
    /// `https://host:port` or `http://host:port`, no trailing slash.
    pub server: String,
    /// `None` for a plain `http://` server.
    pub tls: Option<rustls::ClientConfig>,
    pub token: Option<Arc<TokenSource>>,
    /// The namespace a pod runs in (in-cluster), or the kubeconfig context's namespace.
    pub namespace: Option<String>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("server", &self.server)
            .field("tls", &self.tls.is_some())
            .field("token", &self.token.is_some())
            .field("namespace", &self.namespace)
            .finish()
    }
}

/// A bearer token: fixed (from a kubeconfig's `token`) or read from a file that may change.
pub struct TokenSource {
    kind: TokenKind,
}

enum TokenKind {
    Fixed(Secret),
    File { path: PathBuf, cached: Mutex<Option<(Secret, Instant)>> },
}

impl std::fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.kind {
            TokenKind::Fixed(_) => f.write_str("TokenSource::Fixed(<redacted>)"),
            TokenKind::File { path, .. } => write!(f, "TokenSource::File({})", path.display()),
        }
    }
}

impl TokenSource {
    pub fn fixed(token: Secret) -> TokenSource {
        TokenSource { kind: TokenKind::Fixed(token) }
    }

    /// A token read from `path`, again whenever the copy is older than [`TOKEN_REREAD`].
    pub fn file(path: PathBuf) -> TokenSource {
        TokenSource { kind: TokenKind::File { path, cached: Mutex::new(None) } }
    }

    /// The current token.
    pub fn token(&self) -> Result<Secret> {
        match &self.kind {
            TokenKind::Fixed(t) => Ok(t.clone()),
            TokenKind::File { path, cached } => {
                let mut cached = cached.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((token, read_at)) = cached.as_ref()
                    && read_at.elapsed() < TOKEN_REREAD
                {
                    return Ok(token.clone());
                }
                let text = read(path)?;
                let token = Secret::new(String::from_utf8_lossy(&text).trim().to_owned());
                if token.expose().is_empty() {
                    return Err(Error::Credentials(format!("the token file {} is empty", path.display())));
                }
                *cached = Some((token.clone(), Instant::now()));
                Ok(token)
            }
        }
    }

    /// Forgets the cached copy, so the next request reads the file again (after a 401: the
    /// kubelet may have rotated the token early).
    pub fn invalidate(&self) {
        if let TokenKind::File { cached, .. } = &self.kind {
            *cached.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read { path: path.display().to_string(), source })
}

/// The parts of a kubeconfig this client uses.
#[derive(Debug, Deserialize)]
struct KubeconfigFile {
    #[serde(rename = "current-context", default)]
    current_context: String,
    #[serde(default)]
    clusters: Vec<Named<ClusterEntry>>,
    #[serde(default)]
    users: Vec<Named<UserEntry>>,
    #[serde(default)]
    contexts: Vec<Named<ContextEntry>>,
}

#[derive(Debug, Deserialize)]
struct Named<T> {
    name: String,
    #[serde(alias = "cluster", alias = "user", alias = "context")]
    value: T,
}

#[derive(Debug, Deserialize)]
struct ClusterEntry {
    server: String,
    #[serde(rename = "certificate-authority")]
    certificate_authority: Option<String>,
    #[serde(rename = "certificate-authority-data")]
    certificate_authority_data: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
struct UserEntry {
    #[serde(rename = "client-certificate")]
    client_certificate: Option<String>,
    #[serde(rename = "client-certificate-data")]
    client_certificate_data: Option<String>,
    #[serde(rename = "client-key")]
    client_key: Option<String>,
    #[serde(rename = "client-key-data")]
    client_key_data: Option<String>,
    token: Option<String>,
    #[serde(rename = "tokenFile")]
    token_file: Option<String>,
    /// Only detected, to say plainly that exec plugins are not supported.
    exec: Option<serde_yaml::Value>,
    #[serde(rename = "auth-provider")]
    auth_provider: Option<serde_yaml::Value>,
}

#[derive(Debug, Deserialize)]
struct ContextEntry {
    cluster: String,
    #[serde(default)]
    user: String,
    namespace: Option<String>,
}

/// Reads `file` (relative to the kubeconfig's directory) or decodes `data` (base64).
fn material(file: &Option<String>, data: &Option<String>, base: &Path, what: &str) -> Result<Option<Vec<u8>>> {
    if let Some(data) = data {
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(data.trim())
            .map_err(|e| Error::Tls(format!("{what} data is not base64: {e}")))?;
        return Ok(Some(bytes));
    }
    match file {
        Some(f) => Ok(Some(read(&base.join(f))?)),
        None => Ok(None),
    }
}

impl Credentials {
    /// The current context of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Credentials> {
        let shown = path.display().to_string();
        let invalid = |message: String| Error::Kubeconfig { path: shown.clone(), message };
        let text = read(path)?;
        let file: KubeconfigFile = serde_yaml::from_slice(&text).map_err(|e| invalid(e.to_string()))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let context = match file.contexts.iter().find(|c| c.name == file.current_context) {
            Some(c) => &c.value,
            None if file.contexts.len() == 1 => &file.contexts[0].value,
            None => return Err(invalid(format!("no context named {:?}", file.current_context))),
        };
        let cluster = file
            .clusters
            .iter()
            .find(|c| c.name == context.cluster)
            .map(|c| &c.value)
            .ok_or_else(|| invalid(format!("no cluster named {:?}", context.cluster)))?;
        let user = file.users.iter().find(|u| u.name == context.user).map(|u| &u.value);
        let default_user = UserEntry::default();
        let user = user.unwrap_or(&default_user);
        if user.exec.is_some() || user.auth_provider.is_some() {
            return Err(invalid(format!(
                "user {:?} authenticates through an exec or auth-provider plugin, which Flotilla does not run; \
                 use a client certificate, a token or a tokenFile",
                context.user
            )));
        }

        let uri: hyper::Uri =
            cluster.server.parse().map_err(|e| invalid(format!("server {:?}: {e}", cluster.server)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid(format!("server {:?} must start with https:// or http://", cluster.server))),
        };
        let host = uri.host().ok_or_else(|| invalid(format!("server {:?} has no host", cluster.server)))?;
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let server = format!("{}://{host}:{port}", if https { "https" } else { "http" });

        let token = match (&user.token, &user.token_file) {
            (Some(t), _) => Some(Arc::new(TokenSource::fixed(Secret::new(t.clone())))),
            (None, Some(f)) => Some(Arc::new(TokenSource::file(base.join(f)))),
            (None, None) => None,
        };
        let tls = if https {
            let ca = material(&cluster.certificate_authority, &cluster.certificate_authority_data, base, "ca")?
                .ok_or_else(|| {
                    invalid("the cluster needs certificate-authority or certificate-authority-data".into())
                })?;
            let cert = material(&user.client_certificate, &user.client_certificate_data, base, "client certificate")?;
            let key = material(&user.client_key, &user.client_key_data, base, "client key")?;
            Some(tls_config(&ca, cert.zip(key))?)
        } else {
            None
        };
        Ok(Credentials { server, tls, token, namespace: context.namespace.clone() })
    }

    /// The pod's service account, as client-go's `InClusterConfig` reads it.
    pub fn in_cluster() -> Result<Credentials> {
        let host = std::env::var("KUBERNETES_SERVICE_HOST").ok();
        let port = std::env::var("KUBERNETES_SERVICE_PORT").ok();
        Credentials::in_cluster_from(Path::new(SERVICE_ACCOUNT_DIR), host.as_deref(), port.as_deref())
    }

    /// In-cluster credentials from an explicit directory and environment (for tests).
    pub fn in_cluster_from(dir: &Path, host: Option<&str>, port: Option<&str>) -> Result<Credentials> {
        let (Some(host), Some(port)) = (host.filter(|h| !h.is_empty()), port.filter(|p| !p.is_empty())) else {
            return Err(Error::NoCluster);
        };
        // An IPv6 service address needs brackets in a URL.
        let host = if host.contains(':') && !host.starts_with('[') { format!("[{host}]") } else { host.to_owned() };
        let port: u16 =
            port.parse().map_err(|_| Error::Credentials(format!("KUBERNETES_SERVICE_PORT {port:?} is not a port")))?;
        let ca = read(&dir.join("ca.crt"))?;
        let token_path = dir.join("token");
        // Read once now, so a missing token is reported at start rather than at first use.
        let token = TokenSource::file(token_path);
        token.token()?;
        let namespace = std::fs::read_to_string(dir.join("namespace")).ok().map(|n| n.trim().to_owned());
        Ok(Credentials {
            server: format!("https://{host}:{port}"),
            tls: Some(tls_config(&ca, None)?),
            token: Some(Arc::new(token)),
            namespace: namespace.filter(|n| !n.is_empty()),
        })
    }
}

/// A rustls client configuration trusting `ca_pem` only, optionally presenting a client
/// certificate.
pub fn tls_config(ca_pem: &[u8], client: Option<(Vec<u8>, Vec<u8>)>) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(ca_pem) {
        let cert = cert.map_err(|e| Error::Tls(format!("certificate authority: {e}")))?;
        roots.add(cert).map_err(|e| Error::Tls(format!("certificate authority: {e}")))?;
    }
    if roots.is_empty() {
        return Err(Error::Tls("the certificate authority holds no certificate".into()));
    }
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Tls(e.to_string()))?
        .with_root_certificates(roots);
    let config = match client {
        Some((cert_pem, key_pem)) => {
            let chain = CertificateDer::pem_slice_iter(&cert_pem)
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| Error::Tls(format!("client certificate: {e}")))?;
            let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| Error::Tls(format!("client key: {e}")))?;
            builder.with_client_auth_cert(chain, key).map_err(|e| Error::Tls(format!("client certificate: {e}")))?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn a_plain_http_kubeconfig_with_a_token_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "kubeconfig",
            r#"
apiVersion: v1
kind: Config
current-context: test
clusters:
- name: c
  cluster:
    server: http://127.0.0.1:8080
contexts:
- name: test
  context: { cluster: c, user: u, namespace: flotilla }
users:
- name: u
  user: { token: abc }
"#,
        );
        let c = Credentials::from_kubeconfig(&path).unwrap();
        assert_eq!(c.server, "http://127.0.0.1:8080");
        assert_eq!(c.token.unwrap().token().unwrap().expose(), "abc");
        assert!(c.tls.is_none());
        assert_eq!(c.namespace.as_deref(), Some("flotilla"));
    }

    #[test]
    fn an_https_kubeconfig_without_a_certificate_authority_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "kubeconfig",
            "current-context: t\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n\
             contexts: [{name: t, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n",
        );
        let err = Credentials::from_kubeconfig(&path).unwrap_err().to_string();
        assert!(err.contains("certificate-authority"), "{err}");
    }

    #[test]
    fn an_exec_plugin_user_is_refused_with_a_plain_message() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(
            dir.path(),
            "kubeconfig",
            "current-context: t\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n\
             contexts: [{name: t, context: {cluster: c, user: u}}]\n\
             users: [{name: u, user: {exec: {command: aws, apiVersion: client.authentication.k8s.io/v1}}}]\n",
        );
        let err = Credentials::from_kubeconfig(&path).unwrap_err().to_string();
        assert!(err.contains("exec or auth-provider plugin"), "{err}");
    }

    #[test]
    fn in_cluster_credentials_need_the_service_environment() {
        let dir = tempfile::tempdir().unwrap();
        let err = Credentials::in_cluster_from(dir.path(), None, Some("443")).unwrap_err();
        assert!(matches!(err, Error::NoCluster), "{err}");
    }

    #[test]
    fn an_ipv6_service_host_is_bracketed_and_the_namespace_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes".into()]).unwrap();
        write(dir.path(), "ca.crt", &ca.cert.pem());
        write(dir.path(), "token", "t1\n");
        write(dir.path(), "namespace", "autoscaling\n");
        let c = Credentials::in_cluster_from(dir.path(), Some("fd00::1"), Some("443")).unwrap();
        assert_eq!(c.server, "https://[fd00::1]:443");
        assert_eq!(c.namespace.as_deref(), Some("autoscaling"));
        assert_eq!(c.token.unwrap().token().unwrap().expose(), "t1");
    }

    #[test]
    fn a_rotated_token_file_is_read_again_after_invalidation() {
        let dir = tempfile::tempdir().unwrap();
        let path = write(dir.path(), "token", "first");
        let source = TokenSource::file(path.clone());
        assert_eq!(source.token().unwrap().expose(), "first");
        std::fs::write(&path, "second").unwrap();
        // Within a minute the cached copy is used, as client-go does...
        assert_eq!(source.token().unwrap().expose(), "first");
        // ...unless the API refused it.
        source.invalidate();
        assert_eq!(source.token().unwrap().expose(), "second");
    }

    #[test]
    fn a_missing_in_cluster_token_is_reported_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ca = rcgen::generate_simple_self_signed(vec!["kubernetes".into()]).unwrap();
        write(dir.path(), "ca.crt", &ca.cert.pem());
        let err = Credentials::in_cluster_from(dir.path(), Some("10.0.0.1"), Some("443")).unwrap_err().to_string();
        assert!(err.contains("token"), "{err}");
    }
}
