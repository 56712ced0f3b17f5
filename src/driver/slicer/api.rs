//! The narrow client of the Slicer REST API, on the shared HTTP layer ([`http`]): the ten
//! calls the driver makes, the bearer token on every one, and what the daemon's answers mean.
//!
//! Paths, bodies and accepted statuses are those of the daemon's OpenAPI and of the Go SDK
//! (slicervm/sdk v0.0.19, which the upstream provider used, and later): `GET /hostgroup`,
//! `GET /hostgroup/{hg}/nodes?tag=`, `POST /hostgroup/{hg}/nodes` (200 or 201),
//! `DELETE /hostgroup/{hg}/nodes/{hostname}` (200 with `{message, disk_removed, error}`, or 204),
//! `POST /secrets` (201; 409 when the name exists), `PATCH /secrets/{name}` (200), and
//! `PATCH /vm/{hostname}/tags` (200 with `{hostname, tags}`; SDK v0.0.66, August 2026, and later:
//! older daemons have no such route, the OpenAPI does not list it yet), and for warm pools
//! `POST /vm/{hostname}/shutdown?action=reboot` (200; the SDK's default action: a Firecracker
//! VM's graceful stop, since a guest power-off does not end its VMM) and
//! `POST /vm/{hostname}/relaunch` (200 or 201 with the create's answer; a stopped persistent
//! VM, SDK v0.0.35, April 2026, and later). Errors are
//! `{"error": "..."}`. Reads, deletes and tag additions are retried on transient failures; a
//! create never is.

use serde::Deserialize;
use serde_json::{Value, json};

use crate::config::Secret;
use crate::driver::{self, http};

/// One host group (`GET /hostgroup`): the default, and largest, size of its VMs.
#[derive(Clone, Debug, Deserialize)]
pub struct HostGroup {
    pub name: String,
    #[serde(default)]
    pub count: u32,
    #[serde(default)]
    pub ram_bytes: u64,
    #[serde(default)]
    pub cpus: u32,
    #[serde(default)]
    pub arch: String,
    #[serde(default)]
    pub gpu_count: u32,
}

/// One VM of a host group listing. Daemons of SDK v0.0.19's time send no `hostgroup` and no
/// `status`.
#[derive(Clone, Debug, Deserialize)]
pub struct Node {
    pub hostname: String,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub status: Option<String>,
}

impl Node {
    /// The value of tag `key=value`, if the VM carries one.
    pub fn tag(&self, key: &str) -> Option<&str> {
        self.tags.iter().find_map(|t| t.split_once('=').filter(|(k, _)| *k == key).map(|(_, v)| v))
    }
}

/// The answer to a create.
#[derive(Clone, Debug, Deserialize)]
pub struct Created {
    pub hostname: String,
}

/// A VM's tags after a change (`SlicerVMTags`).
#[derive(Debug, Deserialize)]
struct VmTags {
    #[serde(default)]
    tags: Vec<String>,
}

/// The answer to a delete; a non-empty `error` means the daemon could not finish it.
#[derive(Debug, Default, Deserialize)]
struct Deleted {
    #[serde(default)]
    error: String,
}

/// The Slicer daemon's status table: 403 means a protected VM or trial limits, never bad
/// credentials (those are 401), and 408 is its own `?wait=` timeout.
pub fn classify(e: &http::Error) -> driver::Error {
    let text = e.to_string();
    match e.status() {
        Some(403) => driver::Error::InvalidRequest(text),
        Some(408) => driver::Error::Timeout(text),
        _ => http::classify(e),
    }
}

/// The client of one daemon.
#[derive(Clone, Debug)]
pub struct Api {
    http: http::Client,
    /// The API's base URL, without a trailing slash.
    base: String,
    token: Option<Secret>,
}

impl Api {
    pub fn new(http: http::Client, base: &str, token: Option<Secret>) -> Api {
        Api { http, base: base.trim_end_matches('/').to_owned(), token }
    }

    fn request(&self, method: reqwest::Method, path: &str) -> http::Request<'_> {
        let r = self.http.request(method, format!("{}{path}", self.base));
        match &self.token {
            Some(t) => r.header("Authorization", format!("Bearer {}", t.expose())),
            None => r,
        }
    }

    /// The driver's class of a failed call.
    pub fn classify(&self, e: &http::Error) -> driver::Error {
        self.http.classify(e)
    }

    pub async fn host_groups(&self) -> Result<Vec<HostGroup>, http::Error> {
        self.request(reqwest::Method::GET, "/hostgroup").idempotent().send().await?.json()
    }

    /// The VMs of host group `hg` carrying tag `tag` (the daemon filters; older ones ignore the
    /// filter, so callers check tags themselves). `retry: false` for the listing of a Refresh,
    /// which the core repeats on its next loop anyway.
    pub async fn nodes(&self, hg: &str, tag: &str, retry: bool) -> Result<Vec<Node>, http::Error> {
        let request =
            self.request(reqwest::Method::GET, &format!("/hostgroup/{hg}/nodes")).query(&[("tag", tag)]).idempotent();
        let request = if retry { request } else { request.retry(http::Retry::NONE) };
        request.send().await?.json()
    }

    /// Launches one VM. Never retried: a repeat would launch a second VM.
    pub async fn create_node(&self, hg: &str, body: &Value) -> Result<Created, http::Error> {
        self.request(reqwest::Method::POST, &format!("/hostgroup/{hg}/nodes")).json(body).send().await?.json()
    }

    /// Deletes one VM (and its disk). Repeating it is harmless: the repeat answers 404.
    pub async fn delete_node(&self, hg: &str, hostname: &str) -> Result<(), driver::Error> {
        let what = format!("DELETE /hostgroup/{hg}/nodes/{hostname}");
        let response = self
            .request(reqwest::Method::DELETE, &format!("/hostgroup/{hg}/nodes/{hostname}"))
            .idempotent()
            .send()
            .await
            .map_err(|e| self.classify(&e))?;
        let answer: Deleted = if response.body.iter().all(u8::is_ascii_whitespace) {
            Deleted::default()
        } else {
            response.json().map_err(|e| self.classify(&e))?
        };
        if answer.error.is_empty() {
            Ok(())
        } else {
            Err(driver::Error::Unavailable(format!("{what} did not finish: {}", answer.error)))
        }
    }

    /// Adds `tags` to VM `hostname` and returns its tags after: `PATCH /vm/{hostname}/tags` with
    /// `{"add": [...]}` (an atomic add, so repeating it is harmless). A daemon without the
    /// route answers 404, as it does for a VM that is gone: callers tell the two apart.
    pub async fn add_tags(&self, hostname: &str, tags: &[&str]) -> Result<Vec<String>, http::Error> {
        let body = json!({ "add": tags });
        let r = self.request(reqwest::Method::PATCH, &format!("/vm/{hostname}/tags")).json(&body).idempotent();
        Ok(r.send().await?.json::<VmTags>()?.tags)
    }

    /// Stops VM `hostname` (`POST /vm/{hostname}/shutdown?action=reboot`): a persistent VM is
    /// then listed `Stopped`. Retried: stopping a VM that is stopping or stopped is harmless.
    pub async fn shutdown(&self, hostname: &str) -> Result<(), http::Error> {
        self.request(reqwest::Method::POST, &format!("/vm/{hostname}/shutdown"))
            .query(&[("action", "reboot")])
            .idempotent()
            .send()
            .await?;
        Ok(())
    }

    /// Starts a stopped persistent VM again (`POST /vm/{hostname}/relaunch`), under its
    /// hostname, tags and disk. Never retried: the caller reads the listing instead.
    pub async fn relaunch(&self, hostname: &str) -> Result<(), http::Error> {
        self.request(reqwest::Method::POST, &format!("/vm/{hostname}/relaunch")).send().await?;
        Ok(())
    }

    /// Stores a secret; `false` when one of that name exists already (409).
    pub async fn create_secret(&self, name: &str, data_base64: &str) -> Result<bool, http::Error> {
        let body = json!({ "name": name, "data": data_base64, "permissions": "0600" });
        // Idempotent: a repeat of a create that went through answers 409, which is success here.
        match self.request(reqwest::Method::POST, "/secrets").json(&body).idempotent().send().await {
            Ok(_) => Ok(true),
            Err(e) if e.status() == Some(409) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Replaces a secret's content.
    pub async fn patch_secret(&self, name: &str, data_base64: &str) -> Result<(), http::Error> {
        let body = json!({ "data": data_base64, "permissions": "0600" });
        self.request(reqwest::Method::PATCH, &format!("/secrets/{name}")).json(&body).idempotent().send().await?;
        Ok(())
    }
}
