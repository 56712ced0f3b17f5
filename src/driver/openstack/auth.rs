//! Keystone v3: where credentials come from, how a token is issued, cached and renewed, and how
//! service endpoints are picked from the token's catalog.
//!
//! Credentials come from one of three sources, all reduced to the same `OS_*` variables the
//! OpenStack CLI reads: the environment, a `clouds.yaml` entry (its `auth` keys upper-cased
//! with an `OS_` prefix), or the YAML credentials file of the K3s-on-OpenStack autoscaler
//! (`OS_AUTH_URL: ...`). Password and application-credential authentication are supported.

use std::{
    collections::BTreeMap,
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use serde::Deserialize;
use serde_json::json;
use tokio::{sync::Mutex, time::Instant};

use crate::{config::Secret, driver::http};

/// Problems with authentication.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Keystone could not be reached or answered with an error status.
    #[error(transparent)]
    Keystone(#[from] http::Error),
    #[error("keystone's token response is malformed: {0}")]
    Malformed(String),
    #[error("the service catalog has no {service} endpoint for interface {interface}{}", region.as_ref().map(|r| format!(" in region {r}")).unwrap_or_default())]
    NoEndpoint { service: String, interface: String, region: Option<String> },
}

/// Who a user or project is: by id, or by name within a domain.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Named {
    pub id: Option<String>,
    pub name: Option<String>,
    pub domain_id: Option<String>,
    pub domain_name: Option<String>,
}

impl Named {
    fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::Map::new();
        if let Some(id) = &self.id {
            v.insert("id".into(), json!(id));
        } else if let Some(name) = &self.name {
            v.insert("name".into(), json!(name));
            if let Some(d) = &self.domain_id {
                v.insert("domain".into(), json!({ "id": d }));
            } else if let Some(d) = &self.domain_name {
                v.insert("domain".into(), json!({ "name": d }));
            }
        }
        serde_json::Value::Object(v)
    }
}

/// How to prove who we are.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Method {
    Password {
        user: Named,
        password: Secret,
        project: Option<Named>,
    },
    /// Application credentials carry their own project scope.
    ApplicationCredential {
        id: Option<String>,
        name: Option<String>,
        user: Named,
        secret: Secret,
    },
}

/// Everything needed to get a token and pick endpoints.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    /// Keystone's v3 URL, e.g. `https://keystone.example:5000/v3`.
    pub auth_url: String,
    pub method: Method,
    pub region: Option<String>,
    /// `public` unless said otherwise.
    pub interface: Option<String>,
    /// A CA bundle named by the source (`OS_CACERT`, `cacert`).
    pub ca_file: Option<String>,
    /// `verify: false` in `clouds.yaml` / `OS_INSECURE=true`.
    pub insecure: bool,
}

impl Credentials {
    /// Reads `OS_*` variables through `get` (the environment, a credentials file, a mapped
    /// `clouds.yaml` entry). Legacy names (`OS_TENANT_*`, `OS_REGION`, `OS_ENDPOINT_TYPE`) are
    /// accepted as the autoscaler's file uses them.
    pub fn from_vars(get: impl Fn(&str) -> Option<String>) -> Result<Credentials, String> {
        let var = |names: &[&str]| names.iter().find_map(|n| get(n).filter(|v| !v.trim().is_empty()));
        let auth_url = var(&["OS_AUTH_URL"]).ok_or("OS_AUTH_URL is not set")?;
        if let Some(version) = var(&["OS_IDENTITY_API_VERSION"])
            && version.trim() != "3"
        {
            return Err(format!("identity API version {version} is not supported; only Keystone v3 is"));
        }
        let user = Named {
            id: var(&["OS_USER_ID"]),
            name: var(&["OS_USERNAME"]),
            domain_id: var(&["OS_USER_DOMAIN_ID"]),
            domain_name: var(&["OS_USER_DOMAIN_NAME"]).or_else(|| var(&["OS_DEFAULT_DOMAIN_NAME"])),
        };
        let auth_type = var(&["OS_AUTH_TYPE"]).unwrap_or_default().to_ascii_lowercase();
        let app_secret = var(&["OS_APPLICATION_CREDENTIAL_SECRET"]);
        let method = if auth_type.contains("applicationcredential") || app_secret.is_some() {
            let secret = app_secret.ok_or("OS_APPLICATION_CREDENTIAL_SECRET is not set")?;
            let id = var(&["OS_APPLICATION_CREDENTIAL_ID"]);
            let name = var(&["OS_APPLICATION_CREDENTIAL_NAME"]);
            if id.is_none() && (name.is_none() || (user.id.is_none() && user.name.is_none())) {
                return Err(
                    "an application credential needs OS_APPLICATION_CREDENTIAL_ID, or its name and the user".into()
                );
            }
            Method::ApplicationCredential { id, name, user, secret: Secret::new(secret) }
        } else {
            if user.id.is_none() && user.name.is_none() {
                return Err("OS_USERNAME (or OS_USER_ID) is not set".into());
            }
            if user.id.is_none() && user.domain_id.is_none() && user.domain_name.is_none() {
                return Err("OS_USER_DOMAIN_NAME (or OS_USER_DOMAIN_ID) is not set".into());
            }
            let password = var(&["OS_PASSWORD"]).ok_or("OS_PASSWORD is not set")?;
            let project_id = var(&["OS_PROJECT_ID", "OS_TENANT_ID"]);
            let project_name = var(&["OS_PROJECT_NAME", "OS_TENANT_NAME"]);
            let project = (project_id.is_some() || project_name.is_some()).then(|| Named {
                id: project_id,
                name: project_name,
                domain_id: var(&["OS_PROJECT_DOMAIN_ID"]),
                // Like the CLI: a project named without a domain is in the user's domain.
                domain_name: var(&["OS_PROJECT_DOMAIN_NAME"]).or_else(|| user.domain_name.clone()),
            });
            Method::Password { user, password: Secret::new(password), project }
        };
        let insecure =
            var(&["OS_INSECURE"]).is_some_and(|v| matches!(v.to_ascii_lowercase().as_str(), "true" | "1" | "yes"));
        Ok(Credentials {
            auth_url: auth_url.trim_end_matches('/').to_owned(),
            method,
            region: var(&["OS_REGION_NAME", "OS_REGION"]),
            interface: var(&["OS_INTERFACE", "OS_ENDPOINT_TYPE"]).map(|i| i.trim_end_matches("URL").to_owned()),
            ca_file: var(&["OS_CACERT"]),
            insecure,
        })
    }

    /// Reads the process environment.
    pub fn from_env() -> Result<Credentials, String> {
        Credentials::from_vars(|k| std::env::var(k).ok())
    }

    /// Reads a YAML file of `OS_*` keys (the K3s-on-OpenStack autoscaler's credentials file).
    pub fn from_credentials_file(text: &str) -> Result<Credentials, String> {
        let map: BTreeMap<String, serde_yaml::Value> =
            serde_yaml::from_str(text).map_err(|e| format!("not a YAML map of OS_* keys: {e}"))?;
        let vars: BTreeMap<String, String> = map.into_iter().filter_map(|(k, v)| scalar(&v).map(|v| (k, v))).collect();
        Credentials::from_vars(|k| vars.get(k).cloned())
    }

    /// Reads the entry `cloud` of a `clouds.yaml` file.
    pub fn from_clouds_yaml(text: &str, cloud: &str) -> Result<Credentials, String> {
        #[derive(Deserialize)]
        struct File {
            clouds: BTreeMap<String, serde_yaml::Value>,
        }
        let file: File = serde_yaml::from_str(text).map_err(|e| format!("not a clouds.yaml file: {e}"))?;
        let entry = file.clouds.get(cloud).ok_or_else(|| {
            format!("has no cloud {cloud:?} (it has: {})", file.clouds.keys().cloned().collect::<Vec<_>>().join(", "))
        })?;
        let mut vars = BTreeMap::new();
        let mapping = entry.as_mapping().ok_or_else(|| format!("cloud {cloud:?} is not a map"))?;
        for (k, v) in mapping {
            let Some(k) = k.as_str() else { continue };
            match k {
                "auth" => {
                    for (ak, av) in av_pairs(v) {
                        if let Some(av) = scalar(av) {
                            vars.insert(format!("OS_{}", ak.to_ascii_uppercase()), av);
                        }
                    }
                }
                "verify" if v.as_bool() == Some(false) => {
                    vars.insert("OS_INSECURE".into(), "true".into());
                }
                "region_name" | "interface" | "auth_type" | "identity_api_version" | "cacert" => {
                    if let Some(v) = scalar(v) {
                        vars.insert(format!("OS_{}", k.to_ascii_uppercase()), v);
                    }
                }
                _ => {}
            }
        }
        Credentials::from_vars(|k| vars.get(k).cloned())
    }

    /// The body of `POST /v3/auth/tokens`.
    fn token_request(&self) -> serde_json::Value {
        match &self.method {
            Method::Password { user, password, project } => {
                let mut user = user.to_json();
                user["password"] = json!(password.expose());
                let mut auth = json!({ "identity": { "methods": ["password"], "password": { "user": user } } });
                if let Some(project) = project {
                    auth["scope"] = json!({ "project": project.to_json() });
                }
                json!({ "auth": auth })
            }
            Method::ApplicationCredential { id, name, user, secret } => {
                let mut cred = serde_json::Map::new();
                if let Some(id) = id {
                    cred.insert("id".into(), json!(id));
                } else {
                    cred.insert("name".into(), json!(name));
                    cred.insert("user".into(), user.to_json());
                }
                cred.insert("secret".into(), json!(secret.expose()));
                json!({ "auth": { "identity": { "methods": ["application_credential"], "application_credential": cred } } })
            }
        }
    }
}

fn av_pairs(v: &serde_yaml::Value) -> Vec<(&str, &serde_yaml::Value)> {
    v.as_mapping().map(|m| m.iter().filter_map(|(k, v)| k.as_str().map(|k| (k, v))).collect()).unwrap_or_default()
}

fn scalar(v: &serde_yaml::Value) -> Option<String> {
    match v {
        serde_yaml::Value::String(s) => Some(s.clone()),
        serde_yaml::Value::Number(n) => Some(n.to_string()),
        serde_yaml::Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// Finds a `clouds.yaml` where the OpenStack CLI looks for one.
pub fn find_clouds_yaml() -> Option<std::path::PathBuf> {
    let mut candidates = Vec::new();
    if let Ok(p) = std::env::var("OS_CLIENT_CONFIG_FILE") {
        candidates.push(std::path::PathBuf::from(p));
    }
    candidates.push("clouds.yaml".into());
    if let Ok(home) = std::env::var("HOME") {
        candidates.push(Path::new(&home).join(".config/openstack/clouds.yaml"));
    }
    candidates.push("/etc/openstack/clouds.yaml".into());
    candidates.into_iter().find(|p| p.is_file())
}

#[derive(Debug, Deserialize)]
struct CatalogService {
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    endpoints: Vec<CatalogEndpoint>,
}

#[derive(Debug, Deserialize)]
struct CatalogEndpoint {
    interface: String,
    #[serde(default)]
    region: Option<String>,
    #[serde(default)]
    region_id: Option<String>,
    url: String,
}

/// An issued token and what it says about the cloud.
#[derive(Debug)]
pub struct Token {
    value: Secret,
    /// When to fetch a new one: a margin before Keystone's `expires_at`.
    renew_at: Instant,
    catalog: Vec<CatalogService>,
}

impl Token {
    pub fn value(&self) -> &str {
        self.value.expose()
    }

    /// The URL of `service` (a catalog type: `compute`, `image`, `network`), without a
    /// trailing slash.
    pub fn endpoint(&self, service: &str, interface: &str, region: Option<&str>) -> Result<String, Error> {
        self.catalog
            .iter()
            .filter(|s| s.kind == service)
            .flat_map(|s| &s.endpoints)
            .find(|e| {
                e.interface == interface
                    && region.is_none_or(|r| e.region_id.as_deref() == Some(r) || e.region.as_deref() == Some(r))
            })
            .map(|e| e.url.trim_end_matches('/').to_owned())
            .ok_or_else(|| Error::NoEndpoint {
                service: service.into(),
                interface: interface.into(),
                region: region.map(str::to_owned),
            })
    }
}

/// Renew a token this long before it expires, at most: long enough that no request started
/// with it runs into its expiry.
const MAX_RENEW_MARGIN: Duration = Duration::from_secs(300);

/// One Keystone session: the cached token and how to get a new one.
///
/// `token()` is the only writer of the cache (under its lock, so concurrent callers share one
/// issue); `invalidate()` clears it when a service answered 401.
#[derive(Debug)]
pub struct Session {
    http: http::Client,
    credentials: Credentials,
    cached: Mutex<Option<Arc<Token>>>,
}

#[derive(Deserialize)]
struct TokenBody {
    token: TokenFields,
}

#[derive(Deserialize)]
struct TokenFields {
    expires_at: String,
    #[serde(default)]
    issued_at: Option<String>,
    #[serde(default)]
    catalog: Vec<CatalogService>,
}

impl Session {
    pub fn new(http: http::Client, credentials: Credentials) -> Session {
        Session { http, credentials, cached: Mutex::new(None) }
    }

    pub fn credentials(&self) -> &Credentials {
        &self.credentials
    }

    /// A valid token: the cached one, or a new one once the cached one is due for renewal.
    pub async fn token(&self) -> Result<Arc<Token>, Error> {
        let mut cached = self.cached.lock().await;
        if let Some(t) = cached.as_ref()
            && Instant::now() < t.renew_at
        {
            return Ok(Arc::clone(t));
        }
        let token = Arc::new(self.issue().await?);
        *cached = Some(Arc::clone(&token));
        Ok(token)
    }

    /// Forgets `token` (a service rejected it), unless a newer one replaced it already.
    pub async fn invalidate(&self, token: &Token) {
        let mut cached = self.cached.lock().await;
        if cached.as_ref().is_some_and(|t| t.value() == token.value()) {
            *cached = None;
        }
    }

    async fn issue(&self) -> Result<Token, Error> {
        let url = format!("{}/auth/tokens", self.credentials.auth_url);
        // Issuing a token changes nothing a repeat could double: safe to retry.
        let response = self
            .http
            .post(&url)
            .label(format!("keystone at {url}"))
            .json(&self.credentials.token_request())
            .idempotent()
            .send()
            .await?;
        let value = response
            .header("X-Subject-Token")
            .map(str::to_owned)
            .ok_or_else(|| Error::Malformed("no X-Subject-Token header".into()))?;
        let body: TokenBody =
            response.json().map_err(|e| Error::Malformed(format!("cannot decode the token body: {e}")))?;
        let expires = parse_time(&body.token.expires_at)?;
        let issued = match &body.token.issued_at {
            Some(t) => parse_time(t)?,
            None => SystemTime::now(),
        };
        // Keystone's clock is compared only with itself; the lifetime is then counted on ours.
        let lifetime = expires.duration_since(issued).unwrap_or_default();
        let margin = MAX_RENEW_MARGIN.min(lifetime / 2);
        tracing::debug!(?lifetime, "keystone issued a token");
        Ok(Token {
            value: Secret::new(value),
            renew_at: Instant::now() + (lifetime - margin),
            catalog: body.token.catalog,
        })
    }
}

fn parse_time(text: &str) -> Result<SystemTime, Error> {
    humantime::parse_rfc3339_weak(text).map_err(|e| Error::Malformed(format!("bad timestamp {text:?}: {e}")))
}
