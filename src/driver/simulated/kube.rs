//! The narrow Kubernetes API client the simulated cloud registers Nodes with: a kubeconfig
//! reader and the three calls it needs (list, create and delete Nodes), over HTTP/1.1 with
//! rustls. It is deliberately small (no watch, no retries: the registrar is list-driven and
//! simply tries again on the next listing).

use std::{path::Path, sync::Arc};

use base64::Engine as _;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, pem::PemObject};
use serde::Deserialize;

/// What can go wrong talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubeconfig {path} is not valid: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("bad tls material in kubeconfig: {0}")]
    Tls(String),
    #[error("cannot connect to the kubernetes api at {server}: {source}")]
    Connect {
        server: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http exchange with the kubernetes api failed: {0}")]
    Http(#[from] hyper::Error),
    #[error("the kubernetes api answered {status} to {method} {path}: {body}")]
    Status { method: Method, path: String, status: StatusCode, body: String },
    #[error("cannot decode the kubernetes api's answer to {path}: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

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
}

#[derive(Debug, Deserialize)]
struct ContextEntry {
    cluster: String,
    #[serde(default)]
    user: String,
}

/// A connection recipe for one API server.
#[derive(Clone)]
pub struct Client {
    authority: String,
    host: String,
    port: u16,
    /// `None` for a plain `http://` server.
    tls: Option<Arc<rustls::ClientConfig>>,
    token: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("server", &self.authority).field("tls", &self.tls.is_some()).finish()
    }
}

/// A Node as listed: only what the registrar needs.
#[derive(Debug, Deserialize)]
pub struct ListedNode {
    pub metadata: ListedMeta,
}

#[derive(Debug, Deserialize)]
pub struct ListedMeta {
    pub name: String,
    #[serde(default)]
    pub labels: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Deserialize)]
struct NodeList {
    #[serde(default)]
    items: Vec<ListedNode>,
}

fn read(path: &Path) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| Error::Read { path: path.display().to_string(), source })
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

impl Client {
    /// Builds a client from the current context of a kubeconfig file.
    pub fn from_kubeconfig(path: &Path) -> Result<Client> {
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

        let uri: Uri = cluster.server.parse().map_err(|e| invalid(format!("server {:?}: {e}", cluster.server)))?;
        let https = match uri.scheme_str() {
            Some("https") => true,
            Some("http") => false,
            _ => return Err(invalid(format!("server {:?} must start with https:// or http://", cluster.server))),
        };
        let host = uri.host().ok_or_else(|| invalid(format!("server {:?} has no host", cluster.server)))?;
        let host = host.trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = uri.port_u16().unwrap_or(if https { 443 } else { 80 });
        let authority = format!("{}:{port}", uri.host().unwrap_or_default());

        let token = match (&user.token, &user.token_file) {
            (Some(t), _) => Some(t.clone()),
            (None, Some(f)) => Some(String::from_utf8_lossy(&read(&base.join(f))?).trim().to_owned()),
            (None, None) => None,
        };
        let tls = if https {
            let ca = material(&cluster.certificate_authority, &cluster.certificate_authority_data, base, "ca")?
                .ok_or_else(|| {
                    invalid("the cluster needs certificate-authority or certificate-authority-data".into())
                })?;
            let cert = material(&user.client_certificate, &user.client_certificate_data, base, "client certificate")?;
            let key = material(&user.client_key, &user.client_key_data, base, "client key")?;
            Some(Arc::new(tls_config(&ca, cert.zip(key))?))
        } else {
            None
        };
        Ok(Client { authority, host, port, tls, token })
    }

    /// Lists Nodes matching a label selector (e.g. `a=b,c=d`).
    pub async fn list_nodes(&self, label_selector: &str) -> Result<Vec<ListedNode>> {
        let path = format!("/api/v1/nodes?labelSelector={}", encode_query(label_selector));
        let (status, body) = self.send(Method::GET, &path, None).await?;
        if status != StatusCode::OK {
            return Err(Error::Status { method: Method::GET, path, status, body: lossy(&body) });
        }
        let list: NodeList = serde_json::from_slice(&body).map_err(|source| Error::Decode { path, source })?;
        Ok(list.items)
    }

    /// Creates a Node; `Ok(false)` when one of that name already exists.
    pub async fn create_node(&self, node: &serde_json::Value) -> Result<bool> {
        let path = "/api/v1/nodes".to_owned();
        let body = serde_json::to_vec(node).expect("json values serialize");
        let (status, answer) = self.send(Method::POST, &path, Some(body)).await?;
        match status {
            StatusCode::CREATED | StatusCode::OK | StatusCode::ACCEPTED => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            _ => Err(Error::Status { method: Method::POST, path, status, body: lossy(&answer) }),
        }
    }

    /// Deletes a Node; `Ok(false)` when it was already gone.
    pub async fn delete_node(&self, name: &str) -> Result<bool> {
        let path = format!("/api/v1/nodes/{name}");
        let (status, answer) = self.send(Method::DELETE, &path, None).await?;
        match status {
            StatusCode::OK | StatusCode::ACCEPTED => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            _ => Err(Error::Status { method: Method::DELETE, path, status, body: lossy(&answer) }),
        }
    }

    /// One request on a fresh connection (the registrar makes a handful per listing, on a
    /// loopback or LAN API server, so pooling is not worth its code).
    async fn send(&self, method: Method, path: &str, body: Option<Vec<u8>>) -> Result<(StatusCode, Bytes)> {
        let connect_error = |source| Error::Connect { server: self.authority.clone(), source };
        let tcp = tokio::net::TcpStream::connect((self.host.as_str(), self.port)).await.map_err(connect_error)?;
        let mut request = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, &self.authority)
            .header(hyper::header::ACCEPT, "application/json")
            .header(hyper::header::USER_AGENT, concat!("flotilla/", env!("CARGO_PKG_VERSION")));
        if let Some(token) = &self.token {
            request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if body.is_some() {
            request = request.header(hyper::header::CONTENT_TYPE, "application/json");
        }
        let request = request
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| Error::Tls(format!("cannot build request: {e}")))?;
        match &self.tls {
            Some(config) => {
                let name = ServerName::try_from(self.host.clone())
                    .map_err(|e| Error::Tls(format!("server name {:?}: {e}", self.host)))?;
                let stream = tokio_rustls::TlsConnector::from(Arc::clone(config))
                    .connect(name, tcp)
                    .await
                    .map_err(connect_error)?;
                exchange(TokioIo::new(stream), request).await
            }
            None => exchange(TokioIo::new(tcp), request).await,
        }
    }
}

async fn exchange<S>(io: S, request: Request<Full<Bytes>>) -> Result<(StatusCode, Bytes)>
where
    S: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    // The connection task ends when `sender` is dropped after this one exchange.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::debug!(error = %e, "kubernetes api connection ended with an error");
        }
    });
    let response = sender.send_request(request).await?;
    let status = response.status();
    let body = response.into_body().collect().await?.to_bytes();
    Ok((status, body))
}

fn tls_config(ca_pem: &[u8], client: Option<(Vec<u8>, Vec<u8>)>) -> Result<rustls::ClientConfig> {
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

fn lossy(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    text.chars().take(500).collect()
}

/// Percent-encodes a query value (label selectors use `=`, `,`, `/`, `!`).
fn encode_query(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_are_percent_encoded() {
        assert_eq!(encode_query("flotilla.dev/cluster=e2e,a!=b"), "flotilla.dev%2Fcluster%3De2e%2Ca%21%3Db");
    }

    #[test]
    fn a_plain_http_kubeconfig_with_a_token_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
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
  context: { cluster: c, user: u }
users:
- name: u
  user: { token: abc }
"#,
        )
        .unwrap();
        let client = Client::from_kubeconfig(&path).unwrap();
        assert_eq!(client.authority, "127.0.0.1:8080");
        assert_eq!(client.token.as_deref(), Some("abc"));
        assert!(client.tls.is_none());
    }

    #[test]
    fn an_https_kubeconfig_without_a_certificate_authority_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kubeconfig");
        std::fs::write(
            &path,
            "current-context: t\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n\
             contexts: [{name: t, context: {cluster: c, user: u}}]\nusers: [{name: u, user: {}}]\n",
        )
        .unwrap();
        let err = Client::from_kubeconfig(&path).unwrap_err().to_string();
        assert!(err.contains("certificate-authority"), "{err}");
    }
}
