//! The narrow HTTP client of the OpenStack driver: the handful of Nova, Glance and Neutron calls
//! it makes, the token on every request, one re-authentication on 401, and the one place where
//! OpenStack's answers become [`driver::Error`] classes ([`classify`]). Transport, TLS, error
//! bodies and retries are the shared [`http`] layer's.

use std::collections::BTreeMap;

use reqwest::Method;
use serde::{Deserialize, de::DeserializeOwned};
use serde_json::Value;

use super::auth::{self, Session};
use crate::driver::{self, http};

/// The compute API microversion every Nova request asks for. 2.37 (Newton) is the oldest that
/// lets a create say `"networks": "auto"`; nothing else the driver uses is newer.
pub const COMPUTE_MICROVERSION: &str = "2.37";

/// Failures of one API call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Keystone refused, or the token's catalog lacks the service.
    #[error(transparent)]
    Auth(#[from] auth::Error),
    /// The call failed or was answered with an error (after any retries).
    #[error(transparent)]
    Http(#[from] http::Error),
    #[error("nova's server listing does not advance past marker {0}")]
    Pagination(String),
}

impl Error {
    /// The HTTP status of an answered call.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Http(e) => e.status(),
            _ => None,
        }
    }
}

pub(crate) fn mentions_quota(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("quota exceeded") || m.contains("quotaexceeded") || m.contains("overquota")
}

pub(crate) fn mentions_no_capacity(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("no valid host") || m.contains("insufficient capacity")
}

/// OpenStack's status table: the common one, except that a quota or capacity message is
/// OutOfResources whatever the status (Nova says 403 today, 413 before Pike), and 413 without
/// one is Nova's old rate limit.
pub fn classify(e: &http::Error) -> driver::Error {
    if let http::Error::Status { status, message, retry_after, .. } = e {
        let text = e.to_string();
        if mentions_quota(message) || mentions_no_capacity(message) {
            return driver::Error::OutOfResources(text);
        }
        // Nova answered 413 with Retry-After for rate limits before it had 429.
        if *status == 413 {
            return driver::Error::RateLimited { message: text, retry_after: *retry_after };
        }
    }
    http::classify(e)
}

impl From<Error> for driver::Error {
    fn from(e: Error) -> driver::Error {
        let text = e.to_string();
        match e {
            Error::Auth(auth::Error::Keystone(h)) => match h.status() {
                Some(401 | 403) => driver::Error::Unauthorized(text),
                Some(s) if s >= 500 => driver::Error::Unavailable(text),
                // A wrong auth_url or a malformed request: nothing CA can retry its way out of.
                Some(_) => driver::Error::InvalidRequest(text),
                None => http::classify(&h),
            },
            Error::Auth(auth::Error::NoEndpoint { .. } | auth::Error::Discovery(_)) => {
                driver::Error::InvalidRequest(text)
            }
            Error::Auth(auth::Error::Malformed(_)) => driver::Error::Other(text),
            Error::Http(h) => classify(&h),
            Error::Pagination(_) => driver::Error::Other(text),
        }
    }
}

/// The services the driver calls, by catalog type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Service {
    Compute,
    Image,
    Network,
}

impl Service {
    fn catalog_type(self) -> &'static str {
        match self {
            Service::Compute => "compute",
            Service::Image => "image",
            Service::Network => "network",
        }
    }

    /// The version prefix paths of this service start with; catalogs list Glance and Neutron
    /// with or without it.
    fn version_prefix(self) -> &'static str {
        match self {
            Service::Compute => "",
            Service::Image => "/v2",
            Service::Network => "/v2.0",
        }
    }
}

/// A Nova server, as much of it as the driver reads.
#[derive(Clone, Debug, Deserialize)]
pub struct Server {
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub fault: Option<Fault>,
    #[serde(rename = "OS-EXT-STS:task_state", default)]
    pub task_state: Option<String>,
}

/// Why Nova put a server in ERROR.
#[derive(Clone, Debug, Deserialize)]
pub struct Fault {
    #[serde(default)]
    pub code: Option<u16>,
    #[serde(default)]
    pub message: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Flavor {
    pub id: String,
    pub name: String,
    pub vcpus: u64,
    /// MiB.
    pub ram: u64,
    /// Root disk, GiB.
    #[serde(default)]
    pub disk: u64,
}

#[derive(Deserialize)]
struct ServersPage {
    servers: Vec<Server>,
    #[serde(default)]
    servers_links: Vec<Link>,
}

#[derive(Deserialize)]
struct Link {
    href: String,
    rel: String,
}

#[derive(Deserialize)]
struct Named {
    id: String,
    #[serde(default)]
    name: String,
}

/// The client: one Keystone session and the endpoints its catalog names.
#[derive(Debug)]
pub struct Api {
    http: http::Client,
    session: Session,
    interface: String,
    region: Option<String>,
    page_size: u32,
}

/// Whether a call may be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    /// Not safe to repeat: a create.
    Never,
    /// Safe (a read, a delete): retried on transient failures.
    Safe,
    /// Safe but not retried: the listing of a Refresh. The core lists again at the next
    /// Refresh or reconcile tick and keeps the last picture up to `max_staleness`; retrying
    /// here would only hold cluster-autoscaler's Refresh past its deadline on a cloud that is
    /// down.
    Listing,
}

impl Api {
    pub fn new(http: http::Client, session: Session, interface: String, region: Option<String>, page_size: u32) -> Api {
        Api { http, session, interface, region, page_size }
    }

    /// Calls one API; on 401 forgets the token and tries once more with a new one.
    async fn call(
        &self,
        service: Service,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&Value>,
        repeat: Repeat,
    ) -> Result<http::Response, Error> {
        let mut retried = false;
        loop {
            let token = self.session.token().await?;
            let base = token.endpoint(service.catalog_type(), &self.interface, self.region.as_deref())?;
            let prefix = service.version_prefix();
            let base = base.strip_suffix(prefix).unwrap_or(&base);
            let mut request = self
                .http
                .request(method.clone(), format!("{base}{prefix}{path}"))
                .label(format!("{method} {path}"))
                .header("X-Auth-Token", token.value())
                .header("Accept", "application/json");
            if service == Service::Compute {
                request = request
                    .header("OpenStack-API-Version", format!("compute {COMPUTE_MICROVERSION}"))
                    .header("X-OpenStack-Nova-API-Version", COMPUTE_MICROVERSION);
            }
            if !query.is_empty() {
                request = request.query(query);
            }
            if let Some(body) = body {
                request = request.json(body);
            }
            request = match repeat {
                Repeat::Never => request,
                Repeat::Safe => request.idempotent(),
                Repeat::Listing => request.idempotent().retry(http::Retry::NONE),
            };
            match request.send().await {
                Err(e) if e.status() == Some(401) && !retried => {
                    // Revoked or expired early: one new token, one more try.
                    tracing::debug!(%method, path, "token rejected, authenticating again");
                    self.session.invalidate(&token).await;
                    retried = true;
                }
                other => return Ok(other?),
            }
        }
    }

    async fn get<T: DeserializeOwned>(
        &self,
        service: Service,
        path: &str,
        query: &[(&str, String)],
        repeat: Repeat,
    ) -> Result<T, Error> {
        Ok(self.call(service, Method::GET, path, query, None, repeat).await?.json()?)
    }

    /// Every server of the project, following Nova's pagination (`limit` + `marker`).
    pub async fn list_servers(&self) -> Result<Vec<Server>, Error> {
        let mut out = Vec::new();
        let mut marker: Option<String> = None;
        loop {
            let mut query = vec![("limit", self.page_size.to_string())];
            if let Some(m) = &marker {
                query.push(("marker", m.clone()));
            }
            let page: ServersPage = self.get(Service::Compute, "/servers/detail", &query, Repeat::Listing).await?;
            let next = page.servers_links.iter().find(|l| l.rel == "next").map(|l| l.href.clone());
            let last = page.servers.last().map(|s| s.id.clone());
            out.extend(page.servers);
            // The next link's host is whatever Nova thinks its public URL is, which behind a
            // proxy may not be reachable: only its marker is used, with our own endpoint.
            let next = match (next, last) {
                (Some(href), Some(last)) => query_param(&href, "marker").unwrap_or(last),
                _ => return Ok(out),
            };
            // A listing that never ends would hang every Refresh: a partial one must not pass
            // for complete either (missing machines would look deleted).
            if marker.as_ref() == Some(&next) {
                return Err(Error::Pagination(next));
            }
            marker = Some(next);
        }
    }

    pub async fn get_server(&self, id: &str) -> Result<Server, Error> {
        #[derive(Deserialize)]
        struct One {
            server: Server,
        }
        let one: One = self.get(Service::Compute, &format!("/servers/{id}"), &[], Repeat::Safe).await?;
        Ok(one.server)
    }

    /// `POST /servers`; returns the new server's id once Nova accepted it.
    pub async fn create_server(&self, body: &Value) -> Result<String, Error> {
        #[derive(Deserialize)]
        struct Created {
            server: CreatedServer,
        }
        #[derive(Deserialize)]
        struct CreatedServer {
            id: String,
        }
        let created: Created =
            self.call(Service::Compute, Method::POST, "/servers", &[], Some(body), Repeat::Never).await?.json()?;
        Ok(created.server.id)
    }

    pub async fn delete_server(&self, id: &str) -> Result<(), Error> {
        self.call(Service::Compute, Method::DELETE, &format!("/servers/{id}"), &[], None, Repeat::Safe)
            .await
            .map(|_| ())
    }

    /// `POST /servers/{id}/action` with `{"<action>": null}` (`os-stop`, `os-start`); Nova
    /// answers 202 and does the work asynchronously. Sent once: a repeat of a stop that went
    /// through answers 409, which the caller reads against the server's state.
    pub async fn server_action(&self, id: &str, action: &str) -> Result<(), Error> {
        let body = serde_json::json!({ action: null });
        let path = format!("/servers/{id}/action");
        self.call(Service::Compute, Method::POST, &path, &[], Some(&body), Repeat::Never).await.map(|_| ())
    }

    /// `PUT /servers/{id}/metadata/{key}`: sets one metadata item, leaving the others.
    pub async fn set_server_metadata_item(&self, id: &str, key: &str, value: &str) -> Result<(), Error> {
        let body = serde_json::json!({ "meta": { key: value } });
        let path = format!("/servers/{id}/metadata/{key}");
        self.call(Service::Compute, Method::PUT, &path, &[], Some(&body), Repeat::Safe).await.map(|_| ())
    }

    /// Servers whose name matches exactly (Nova's `name` filter is a regular expression).
    pub async fn servers_named(&self, name: &str) -> Result<Vec<Server>, Error> {
        let page: ServersPage = self
            .get(Service::Compute, "/servers/detail", &[("name", format!("^{}$", regex_escape(name)))], Repeat::Safe)
            .await?;
        Ok(page.servers.into_iter().filter(|s| s.name == name).collect())
    }

    pub async fn flavors(&self) -> Result<Vec<Flavor>, Error> {
        #[derive(Deserialize)]
        struct Flavors {
            flavors: Vec<Flavor>,
        }
        let f: Flavors = self.get(Service::Compute, "/flavors/detail", &[], Repeat::Safe).await?;
        Ok(f.flavors)
    }

    pub async fn flavor_extra_specs(&self, id: &str) -> Result<BTreeMap<String, String>, Error> {
        #[derive(Deserialize)]
        struct Specs {
            extra_specs: BTreeMap<String, String>,
        }
        let s: Specs = self.get(Service::Compute, &format!("/flavors/{id}/os-extra_specs"), &[], Repeat::Safe).await?;
        Ok(s.extra_specs)
    }

    /// Ids of Glance images with this exact name.
    pub async fn images_named(&self, name: &str) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Images {
            images: Vec<Named>,
        }
        let i: Images = self.get(Service::Image, "/images", &[("name", name.to_owned())], Repeat::Safe).await?;
        Ok(i.images.into_iter().map(|n| n.id).collect())
    }

    /// Ids of Neutron networks with this exact name.
    pub async fn networks_named(&self, name: &str) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Networks {
            networks: Vec<Named>,
        }
        let n: Networks = self.get(Service::Network, "/networks", &[("name", name.to_owned())], Repeat::Safe).await?;
        Ok(n.networks.into_iter().map(|n| n.id).collect())
    }

    /// Ids of Neutron security groups with this exact name.
    pub async fn security_groups_named(&self, name: &str) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Groups {
            security_groups: Vec<Named>,
        }
        let g: Groups =
            self.get(Service::Network, "/security-groups", &[("name", name.to_owned())], Repeat::Safe).await?;
        Ok(g.security_groups.into_iter().map(|n| n.id).collect())
    }

    /// `POST /v2.0/ports`; returns the new port's id.
    pub async fn create_port(&self, body: &Value) -> Result<String, Error> {
        #[derive(Deserialize)]
        struct Created {
            port: Named,
        }
        let created: Created =
            self.call(Service::Network, Method::POST, "/ports", &[], Some(body), Repeat::Never).await?.json()?;
        Ok(created.port.id)
    }

    /// Ports bound to a server, as (id, name).
    pub async fn ports_of(&self, server_id: &str) -> Result<Vec<(String, String)>, Error> {
        #[derive(Deserialize)]
        struct Ports {
            ports: Vec<Named>,
        }
        let p: Ports =
            self.get(Service::Network, "/ports", &[("device_id", server_id.to_owned())], Repeat::Safe).await?;
        Ok(p.ports.into_iter().map(|n| (n.id, n.name)).collect())
    }

    pub async fn delete_port(&self, id: &str) -> Result<(), Error> {
        self.call(Service::Network, Method::DELETE, &format!("/ports/{id}"), &[], None, Repeat::Safe).await.map(|_| ())
    }

    /// Ids of Nova server groups with this name.
    pub async fn server_groups_named(&self, name: &str) -> Result<Vec<String>, Error> {
        #[derive(Deserialize)]
        struct Groups {
            server_groups: Vec<Named>,
        }
        let g: Groups = self.get(Service::Compute, "/os-server-groups", &[], Repeat::Safe).await?;
        Ok(g.server_groups.into_iter().filter(|g| g.name == name).map(|g| g.id).collect())
    }

    /// Fetches a token (for `check`).
    pub async fn authenticate(&self) -> Result<(), Error> {
        let token = self.session.token().await?;
        token.endpoint("compute", &self.interface, self.region.as_deref())?;
        Ok(())
    }
}

/// One query parameter of a URL, percent-decoded.
fn query_param(href: &str, key: &str) -> Option<String> {
    let url = reqwest::Url::parse(href).ok()?;
    url.query_pairs().find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
}

fn regex_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if "\\.+*?()|[]{}^$".contains(c) {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
