//! The one Kubernetes API client in Flotilla: Node registration of the simulated cloud, Node
//! cleanup, leader election on a Lease and the priority expander's ConfigMap all use it, with
//! one set-up (`[kubernetes]` in the configuration: a kubeconfig, or the pod's service account).
//!
//! # Why hand-written and not the `kube` crate
//! Flotilla makes about ten kinds of call on three kinds of object (Nodes, Leases, ConfigMaps).
//! The `kube` crate would bring `k8s-openapi` (generated types for every API group, the largest
//! compile in the tree by far, on machines that build Flotilla on two cores) and a second HTTP
//! stack beside the `reqwest` the drivers already use. What Flotilla needs from a client is
//! small and specific: in-cluster credentials with token rotation, optimistic concurrency
//! (`resourceVersion`), delete preconditions, server-side apply, and `Status` error bodies
//! turned into typed errors. That is this module: credentials in [`credentials`], typed calls
//! in [`api`], transport here. Every request it makes is asserted by the fake API server in
//! `tests/fakes/kube/`.
//!
//! # Transport
//! `reqwest` over rustls (the TLS configuration is built here, so client certificates and the
//! cluster's CA work exactly as in a kubeconfig), keep-alive connections, a timeout on every
//! request (a leader must not block renewing its Lease on a hung connection). The connection
//! set-up is lazy: the kubeconfig or service account is read at the first call and again after
//! a failure, so Flotilla starts before the cluster exists and `check-config` needs no cluster.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use reqwest::{Method, StatusCode};
use serde::Deserialize;

pub mod api;
pub mod credentials;

pub use api::{ApplyOutcome, DeleteOutcome, Lease, LeaseSpec, Node, ObjectMeta};
use credentials::{Credentials, TokenSource};

/// What can go wrong talking to the Kubernetes API.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(
        "no kubernetes api configured: set [kubernetes] kubeconfig, or run in a pod (KUBERNETES_SERVICE_HOST is unset)"
    )]
    NoCluster,
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("kubeconfig {path} is not valid: {message}")]
    Kubeconfig { path: String, message: String },
    #[error("bad kubernetes credentials: {0}")]
    Credentials(String),
    #[error("bad tls material for the kubernetes api: {0}")]
    Tls(String),
    #[error("request {method} {path} to the kubernetes api at {server} failed: {source}")]
    Transport {
        method: Method,
        path: String,
        server: String,
        #[source]
        source: reqwest::Error,
    },
    /// The API answered with an error status; `reason` is the `Status` object's (`NotFound`,
    /// `Conflict`, `AlreadyExists`, `Forbidden`, ...).
    #[error("the kubernetes api answered {code} {reason} to {method} {path}: {message}")]
    Api { method: Method, path: String, code: u16, reason: String, message: String },
    #[error("cannot decode the kubernetes api's answer to {path}: {source}")]
    Decode {
        path: String,
        #[source]
        source: serde_json::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The API's `reason` (`Conflict`, `NotFound`, ...), if it answered with an error status.
    pub fn reason(&self) -> Option<&str> {
        match self {
            Error::Api { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// The HTTP status the API answered with, if it answered.
    pub fn code(&self) -> Option<u16> {
        match self {
            Error::Api { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// True for 409 Conflict: a stale `resourceVersion` or a failed precondition.
    pub fn is_conflict(&self) -> bool {
        self.code() == Some(409)
    }
}

/// `[kubernetes]`: how Flotilla reaches the cluster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// A kubeconfig file; `None` means the pod's service account.
    pub kubeconfig: Option<PathBuf>,
    /// Bound on each request.
    pub timeout: Option<Duration>,
}

/// The default bound on one API request.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// A lazily connected Kubernetes API client. Cheap to clone; clones share one connection
/// pool and one token cache.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    settings: Settings,
    /// Built at the first call and again after a set-up failure. Written by [`Client::connection`].
    connection: Mutex<Option<Arc<Connection>>>,
}

struct Connection {
    server: String,
    http: reqwest::Client,
    token: Option<Arc<TokenSource>>,
    namespace: Option<String>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("kube::Client").field("settings", &self.inner.settings).finish()
    }
}

/// The `Status` object the API answers errors with.
#[derive(Debug, Default, Deserialize)]
struct StatusBody {
    #[serde(default)]
    reason: String,
    #[serde(default)]
    message: String,
}

impl Client {
    pub fn new(settings: Settings) -> Client {
        Client { inner: Arc::new(Inner { settings, connection: Mutex::new(None) }) }
    }

    /// A client for credentials read already (tests, and callers that read them their own way).
    pub fn from_credentials(credentials: Credentials, timeout: Option<Duration>) -> Result<Client> {
        let settings = Settings { kubeconfig: None, timeout };
        let connection = Client::connect(credentials, &settings)?;
        Ok(Client { inner: Arc::new(Inner { settings, connection: Mutex::new(Some(connection)) }) })
    }

    /// Fails at once when there is no way to reach any cluster (no kubeconfig, not in a pod):
    /// for start-up, so a feature that needs the API does not wait for its first call to say so.
    pub fn check_configured(&self) -> Result<()> {
        if self.inner.settings.kubeconfig.is_none() && std::env::var_os("KUBERNETES_SERVICE_HOST").is_none() {
            return Err(Error::NoCluster);
        }
        Ok(())
    }

    /// The namespace Flotilla runs in: the pod's (in-cluster) or the kubeconfig context's.
    pub fn own_namespace(&self) -> Option<String> {
        self.connection().ok().and_then(|c| c.namespace.clone())
    }

    fn connection(&self) -> Result<Arc<Connection>> {
        let mut slot = self.inner.connection.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            return Ok(Arc::clone(c));
        }
        let credentials = match &self.inner.settings.kubeconfig {
            Some(path) => Credentials::from_kubeconfig(path)?,
            None => Credentials::in_cluster()?,
        };
        let connection = Client::connect(credentials, &self.inner.settings)?;
        *slot = Some(Arc::clone(&connection));
        Ok(connection)
    }

    fn connect(credentials: Credentials, settings: &Settings) -> Result<Arc<Connection>> {
        let mut builder = reqwest::Client::builder()
            .timeout(settings.timeout.unwrap_or(DEFAULT_TIMEOUT))
            .connect_timeout(Duration::from_secs(5))
            .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
            // Never follow a redirect with our bearer token.
            .redirect(reqwest::redirect::Policy::none());
        if let Some(tls) = credentials.tls {
            builder = builder.use_preconfigured_tls(tls);
        }
        let http = builder.build().map_err(|e| Error::Tls(format!("cannot build the http client: {e}")))?;
        Ok(Arc::new(Connection {
            server: credentials.server,
            http,
            token: credentials.token,
            namespace: credentials.namespace,
        }))
    }

    /// One request. `path` includes the query; `body` is sent with its content type. Returns
    /// the status and body of any answer; only transport failures are errors. A 401 with a
    /// token read from a file reads the file again and, if the token changed (the kubelet
    /// rotated it), sends the request once more.
    async fn send(
        &self,
        method: Method,
        path: &str,
        body: Option<(Vec<u8>, &'static str)>,
    ) -> Result<(StatusCode, bytes::Bytes)> {
        let connection = self.connection()?;
        let mut token = connection.token.as_ref().map(|t| t.token()).transpose()?;
        let mut retried = false;
        loop {
            let mut request = connection
                .http
                .request(method.clone(), format!("{}{path}", connection.server))
                .header(reqwest::header::ACCEPT, "application/json");
            if let Some(token) = &token {
                request = request.bearer_auth(token.expose());
            }
            if let Some((body, content_type)) = &body {
                request = request.header(reqwest::header::CONTENT_TYPE, *content_type).body(body.clone());
            }
            let transport = |source| Error::Transport {
                method: method.clone(),
                path: path.to_owned(),
                server: connection.server.clone(),
                source,
            };
            let response = request.send().await.map_err(transport)?;
            let status = response.status();
            let bytes = response.bytes().await.map_err(transport)?;
            if status == StatusCode::UNAUTHORIZED
                && !retried
                && let Some(source) = &connection.token
            {
                source.invalidate();
                let fresh = source.token()?;
                if token.as_ref().is_some_and(|old| old.expose() != fresh.expose()) {
                    tracing::info!(server = %connection.server, "kubernetes api token was rotated; retrying with the new one");
                    token = Some(fresh);
                    retried = true;
                    continue;
                }
            }
            return Ok((status, bytes));
        }
    }

    /// An error for a non-success answer, from its `Status` body when it has one.
    fn api_error(method: Method, path: &str, status: StatusCode, body: &[u8]) -> Error {
        let parsed: StatusBody = serde_json::from_slice(body).unwrap_or_default();
        let message = if parsed.message.is_empty() {
            String::from_utf8_lossy(body).chars().take(300).collect()
        } else {
            parsed.message
        };
        let reason = if parsed.reason.is_empty() {
            status.canonical_reason().unwrap_or("Unknown").replace(' ', "")
        } else {
            parsed.reason
        };
        Error::Api { method, path: path.to_owned(), code: status.as_u16(), reason, message }
    }

    fn decode<T: serde::de::DeserializeOwned>(path: &str, body: &[u8]) -> Result<T> {
        serde_json::from_slice(body).map_err(|source| Error::Decode { path: path.to_owned(), source })
    }
}

/// Percent-encodes a query value (label selectors use `=`, `,`, `/`, `!`).
pub fn encode_query(value: &str) -> String {
    form_urlencoded::byte_serialize(value.as_bytes()).collect::<String>().replace('+', "%20")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_selectors_are_percent_encoded() {
        assert_eq!(encode_query("flotilla.dev/cluster=e2e,a!=b"), "flotilla.dev%2Fcluster%3De2e%2Ca%21%3Db");
    }

    #[test]
    fn an_error_status_body_becomes_a_typed_error() {
        let body = br#"{"kind":"Status","apiVersion":"v1","metadata":{},"status":"Failure","message":"leases.coordination.k8s.io \"l\" already exists","reason":"AlreadyExists","details":{"name":"l","group":"coordination.k8s.io","kind":"leases"},"code":409}"#;
        let e = Client::api_error(Method::POST, "/x", StatusCode::CONFLICT, body);
        assert_eq!(e.reason(), Some("AlreadyExists"));
        assert!(e.is_conflict());
        assert!(e.to_string().contains("already exists"), "{e}");
        let e = Client::api_error(Method::GET, "/x", StatusCode::BAD_GATEWAY, b"upstream down");
        assert_eq!(e.reason(), Some("BadGateway"));
        assert!(e.to_string().contains("upstream down"), "{e}");
    }
}
