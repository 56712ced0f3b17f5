//! Keystone v3: where credentials come from, how a token is issued, cached and renewed, and how
//! service endpoints are picked from the token's catalog.
//!
//! Credentials come from one of three sources, all reduced to the same `OS_*` variables the
//! OpenStack CLI reads: the environment, a `clouds.yaml` entry (its `auth` keys upper-cased
//! with an `OS_` prefix), or the YAML credentials file of the K3s-on-OpenStack autoscaler
//! (`OS_AUTH_URL: ...`). Password and application-credential authentication are supported.
//! YAML values are read as the text they are written as (`1.10` stays `1.10`, `0x1F` stays
//! `0x1F`): a password or project name that looks like a number is still that text.
//!
//! # Version discovery
//! An `auth_url` ending in `/v3` is used as is. Any other (`https://keystone:5000`,
//! DevStack's `http://host/identity`) is discovered as keystoneauth does: `GET auth_url`
//! answers the version document (`300 Multiple Choices` with `{"versions": {"values": [...]}}`,
//! or `200` with `versions` or `version`), and the `rel: self` link of its v3 entry is the
//! endpoint. The answer is kept for the life of the session.

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
    /// The version document did not lead to a v3 endpoint.
    #[error("keystone version discovery: {0}")]
    Discovery(String),
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
        let map: BTreeMap<String, Option<Text>> =
            serde_yaml::from_str(text).map_err(|e| format!("not a YAML map of OS_* keys: {e}"))?;
        let vars: BTreeMap<String, String> = map.into_iter().filter_map(|(k, v)| v.map(|v| (k, v.0))).collect();
        Credentials::from_vars(|k| vars.get(k).cloned())
    }

    /// Reads the entry `cloud` of a `clouds.yaml` file.
    pub fn from_clouds_yaml(text: &str, cloud: &str) -> Result<Credentials, String> {
        use serde::de::DeserializeSeed;
        let de = serde_yaml::Deserializer::from_str(text);
        let (entry, names) = CloudsFile(cloud).deserialize(de).map_err(|e| format!("not a clouds.yaml file: {e}"))?;
        let entry = entry.ok_or_else(|| format!("has no cloud {cloud:?} (it has: {})", names.join(", ")))?;
        let mut vars = BTreeMap::new();
        for (k, v) in entry.auth.unwrap_or_default() {
            if let Some(v) = v {
                vars.insert(format!("OS_{}", k.to_ascii_uppercase()), v.0);
            }
        }
        let plain = [
            ("OS_REGION_NAME", entry.region_name),
            ("OS_INTERFACE", entry.interface),
            ("OS_AUTH_TYPE", entry.auth_type),
            ("OS_IDENTITY_API_VERSION", entry.identity_api_version),
            ("OS_CACERT", entry.cacert),
        ];
        for (k, v) in plain {
            if let Some(v) = v {
                vars.insert(k.to_owned(), v.0);
            }
        }
        if entry.verify.is_some_and(|v| matches!(v.0.to_ascii_lowercase().as_str(), "false" | "no" | "off")) {
            vars.insert("OS_INSECURE".into(), "true".into());
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

/// A YAML scalar as the text it is written as. serde_yaml hands a plain scalar to
/// `deserialize_str` as its source text, before any number or boolean resolution; a
/// `serde_yaml::Value` would already have turned `1.10` into `1.1`.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a scalar")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text, E> {
                Ok(Text(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// The keys of a `clouds.yaml` entry Flotilla reads; the others are skipped.
#[derive(Debug, Default, Deserialize)]
struct CloudEntry {
    auth: Option<BTreeMap<String, Option<Text>>>,
    region_name: Option<Text>,
    interface: Option<Text>,
    auth_type: Option<Text>,
    identity_api_version: Option<Text>,
    cacert: Option<Text>,
    verify: Option<Text>,
}

/// Reads one entry of a `clouds.yaml` (skipping the others unread, so a shape Flotilla does not
/// know in another cloud's entry does not matter), and the names of all.
struct CloudsFile<'a>(&'a str);

impl<'de> serde::de::DeserializeSeed<'de> for CloudsFile<'_> {
    type Value = (Option<CloudEntry>, Vec<String>);

    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        struct Top<'a>(&'a str);
        impl<'de> serde::de::Visitor<'de> for Top<'_> {
            type Value = (Option<CloudEntry>, Vec<String>);
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map with `clouds`")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = None;
                while let Some(key) = map.next_key::<String>()? {
                    if key == "clouds" {
                        out = Some(map.next_value_seed(Clouds(self.0))?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                }
                out.ok_or_else(|| serde::de::Error::missing_field("clouds"))
            }
        }
        struct Clouds<'a>(&'a str);
        impl<'de> serde::de::DeserializeSeed<'de> for Clouds<'_> {
            type Value = (Option<CloudEntry>, Vec<String>);
            fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
                d.deserialize_map(self)
            }
        }
        impl<'de> serde::de::Visitor<'de> for Clouds<'_> {
            type Value = (Option<CloudEntry>, Vec<String>);
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map of clouds")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let (mut entry, mut names) = (None, Vec::new());
                while let Some(key) = map.next_key::<String>()? {
                    if key == self.0 {
                        entry = Some(map.next_value::<CloudEntry>()?);
                    } else {
                        map.next_value::<serde::de::IgnoredAny>()?;
                    }
                    names.push(key);
                }
                Ok((entry, names))
            }
        }
        d.deserialize_map(Top(self.0))
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
    /// Keystone's v3 endpoint: `auth_url`, or what discovery found there (written once).
    v3: tokio::sync::OnceCell<String>,
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
        Session { http, credentials, v3: tokio::sync::OnceCell::new(), cached: Mutex::new(None) }
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

    /// Keystone's v3 endpoint, discovered on first use unless `auth_url` names it.
    pub async fn identity_v3(&self) -> Result<&str, Error> {
        let url = &self.credentials.auth_url;
        let v3 = self
            .v3
            .get_or_try_init(|| async {
                if is_v3_url(url) { Ok(url.clone()) } else { discover_v3(&self.http, url).await }
            })
            .await?;
        Ok(v3.as_str())
    }

    async fn issue(&self) -> Result<Token, Error> {
        let url = format!("{}/auth/tokens", self.identity_v3().await?);
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

/// True for an `auth_url` that names Keystone's v3 API itself (`.../v3`).
fn is_v3_url(url: &str) -> bool {
    let path = reqwest::Url::parse(url).map(|u| u.path().trim_end_matches('/').to_owned()).unwrap_or_default();
    path == "/v3" || path.ends_with("/v3")
}

/// Finds the v3 endpoint in the version document at `url`, as keystoneauth's discovery does.
async fn discover_v3(http: &http::Client, url: &str) -> Result<String, Error> {
    let body = match http
        .get(url)
        .label(format!("keystone version discovery at {url}"))
        .header("Accept", "application/json")
        .idempotent()
        .send()
        .await
    {
        Ok(r) => r.body,
        // Keystone's unversioned endpoint answers "300 Multiple Choices" with the document.
        Err(http::Error::Status { status: 300, body, .. }) => body,
        Err(e) => return Err(e.into()),
    };
    let doc: serde_json::Value = serde_json::from_slice(&body)
        .map_err(|e| Error::Discovery(format!("{url} answered no version document ({e})")))?;
    let entries: Vec<&serde_json::Value> = match (doc.get("versions"), doc.get("version")) {
        (Some(serde_json::Value::Object(v)), _) => {
            v.get("values").and_then(|a| a.as_array()).into_iter().flatten().collect()
        }
        (Some(serde_json::Value::Array(a)), _) => a.iter().collect(),
        (_, Some(v)) if v.is_object() => vec![v],
        _ => Vec::new(),
    };
    let id = |e: &serde_json::Value| e.get("id").and_then(|i| i.as_str()).unwrap_or("").to_owned();
    let status = |e: &serde_json::Value| e.get("status").and_then(|i| i.as_str()).unwrap_or("").to_ascii_lowercase();
    // v3 entries, the stable ones first (keystoneauth skips experimental ones unless asked).
    let mut v3: Vec<&serde_json::Value> =
        entries.iter().copied().filter(|e| id(e) == "v3" || id(e).starts_with("v3.")).collect();
    v3.sort_by_key(|e| !matches!(status(e).as_str(), "stable" | "current" | "supported"));
    let href = v3
        .iter()
        .filter(|e| status(e) != "experimental")
        .find_map(|e| {
            e.get("links")?
                .as_array()?
                .iter()
                .find(|l| l.get("rel").and_then(|r| r.as_str()) == Some("self"))?
                .get("href")?
                .as_str()
        })
        .ok_or_else(|| {
            let offered: Vec<String> = entries.iter().map(|e| id(e)).filter(|i| !i.is_empty()).collect();
            Error::Discovery(format!(
                "{url} offers no identity v3 API (it offers: {}); point auth_url at the v3 endpoint",
                if offered.is_empty() { "nothing".to_owned() } else { offered.join(", ") }
            ))
        })?;
    // A relative link is relative to the document's URL.
    let base = reqwest::Url::parse(url).map_err(|e| Error::Discovery(format!("{url}: {e}")))?;
    let v3 = base.join(href).map_err(|e| Error::Discovery(format!("bad v3 link {href:?}: {e}")))?;
    tracing::debug!(auth_url = %url, v3 = %v3, "discovered keystone's v3 endpoint");
    Ok(v3.as_str().trim_end_matches('/').to_owned())
}

fn parse_time(text: &str) -> Result<SystemTime, Error> {
    humantime::parse_rfc3339_weak(text).map_err(|e| Error::Malformed(format!("bad timestamp {text:?}: {e}")))
}
