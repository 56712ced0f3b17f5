//! A narrow client for the Proxmox VE API (`/api2/json`): the dozen calls the driver needs,
//! authentication (API token, or a login ticket renewed before it expires), the `{"data": ...}`
//! envelope, PVE's error bodies, and waiting for tasks (UPIDs).
//!
//! Why not the `proxmox-api` crate: it is async and generated from the full API schema, but
//! its bundled reqwest client turns certificate checking off (`danger_accept_invalid_certs`),
//! its errors drop the HTTP status and PVE message the driver classifies errors by, and
//! compiling the whole generated API for a dozen endpoints costs more than this file.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::{sync::Mutex, time::Instant};

use crate::{config::Secret, driver};

/// PVE tickets live two hours; renew well before.
const TICKET_RENEW_AFTER: Duration = Duration::from_secs(90 * 60);

/// Errors of one API call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot reach proxmox for {method} {path}: {source}")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("proxmox answered {method} {path} with {status}: {message}")]
    Status { method: Method, path: String, status: u16, message: String },
    #[error("cannot decode proxmox's answer to {method} {path}: {source}")]
    Decode {
        method: Method,
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("unexpected answer to {path}: {what}")]
    Unexpected { path: String, what: String },
    #[error("task {upid} failed: {exitstatus}")]
    TaskFailed { upid: String, exitstatus: String },
    #[error("task {upid} did not finish within {limit:?}")]
    TaskTimeout { upid: String, limit: Duration },
}

impl Error {
    /// The message PVE gave, for matching known failures.
    pub fn message(&self) -> &str {
        match self {
            Error::Status { message, .. } => message,
            Error::TaskFailed { exitstatus, .. } => exitstatus,
            _ => "",
        }
    }

    /// True for a "does not exist" answer (PVE says so with status 500, not 404).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Status { status: 404, .. } => true,
            Error::Status { message, .. } => message.contains("does not exist") || message.contains("no such VM"),
            _ => false,
        }
    }

    /// True when a VMID is taken (a clone raced another create).
    pub fn is_vmid_taken(&self) -> bool {
        self.message().contains("already exists")
    }
}

/// Messages meaning the cluster has no room for the VM.
fn is_out_of_resources(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["not enough", "no space left", "out of space", "cannot allocate memory", "insufficient"]
        .iter()
        .any(|p| m.contains(p))
}

impl From<Error> for driver::Error {
    fn from(e: Error) -> Self {
        let text = e.to_string();
        match &e {
            Error::Transport { source, .. } if source.is_timeout() => driver::Error::Timeout(text),
            Error::Transport { .. } => driver::Error::Unavailable(text),
            Error::Status { message, .. } if is_out_of_resources(message) => driver::Error::OutOfResources(text),
            _ if e.is_not_found() => driver::Error::NotFound(text),
            Error::Status { status: 401 | 403, .. } => driver::Error::Unauthorized(text),
            Error::Status { status: 429, .. } => driver::Error::RateLimited { message: text, retry_after: None },
            Error::Status { status: 400 | 501, .. } => driver::Error::InvalidRequest(text),
            // 595/596: the proxy could not reach the node; 502/503/504 likewise.
            Error::Status { status: 502..=504 | 595 | 596, .. } => driver::Error::Unavailable(text),
            Error::TaskFailed { exitstatus, .. } if is_out_of_resources(exitstatus) => {
                driver::Error::OutOfResources(text)
            }
            Error::TaskTimeout { .. } => driver::Error::Timeout(text),
            _ => driver::Error::Other(text),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// How the client proves who it is.
#[derive(Clone, Debug)]
pub enum Auth {
    /// `USER@REALM!TOKENID` and the token's secret.
    Token { id: String, secret: Secret },
    /// `USER@REALM` and password, exchanged for a ticket at `/access/ticket`.
    Password { user: String, password: Secret },
}

#[derive(Debug)]
struct Ticket {
    ticket: String,
    csrf: String,
    obtained: Instant,
}

/// The API client. The ticket is written by `login` and read by every call.
#[derive(Debug)]
pub struct Api {
    http: reqwest::Client,
    /// `https://host:8006/api2/json`
    base: String,
    auth: Auth,
    ticket: Mutex<Option<Ticket>>,
    /// Age at which a ticket is replaced before use ([`TICKET_RENEW_AFTER`]).
    ticket_renew_after: Duration,
    /// How often task and agent status is polled.
    pub poll_interval: Duration,
}

/// Parameters of a call, in order (a key may repeat, e.g. agent `command`).
pub type Params = Vec<(&'static str, String)>;

impl Api {
    pub fn new(http: reqwest::Client, base: String, auth: Auth, poll_interval: Duration) -> Api {
        Api {
            http,
            base: base.trim_end_matches('/').to_owned(),
            auth,
            ticket: Mutex::new(None),
            ticket_renew_after: TICKET_RENEW_AFTER,
            poll_interval,
        }
    }

    /// `data` of a GET.
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::GET, path, query, &[]).await
    }

    /// `data` of a POST with a form body.
    pub async fn post(&self, path: &str, form: &[(&str, String)]) -> Result<Value> {
        self.call(Method::POST, path, &[], form).await
    }

    pub async fn put(&self, path: &str, form: &[(&str, String)]) -> Result<Value> {
        self.call(Method::PUT, path, &[], form).await
    }

    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::DELETE, path, query, &[]).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
    ) -> Result<Value> {
        match self.call_once(&method, path, query, form).await {
            // An expired or revoked ticket: log in again once.
            Err(Error::Status { status: 401, .. }) if matches!(self.auth, Auth::Password { .. }) => {
                *self.ticket.lock().await = None;
                self.call_once(&method, path, query, form).await
            }
            other => other,
        }
    }

    async fn call_once(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
    ) -> Result<Value> {
        let mut request = self.http.request(method.clone(), format!("{}{path}", self.base));
        if !query.is_empty() {
            request = request.query(query);
        }
        match &self.auth {
            Auth::Token { id, secret } => {
                request = request.header("Authorization", format!("PVEAPIToken={id}={}", secret.expose()));
            }
            Auth::Password { .. } => {
                let (ticket, csrf) = self.ticket().await?;
                request = request.header("Cookie", format!("PVEAuthCookie={ticket}"));
                if *method != Method::GET {
                    request = request.header("CSRFPreventionToken", csrf);
                }
            }
        }
        if *method != Method::GET && *method != Method::DELETE {
            request = request
                .header("Content-Type", "application/x-www-form-urlencoded")
                .body(form_urlencoded::Serializer::new(String::new()).extend_pairs(form).finish());
        }
        self.send(method, path, request).await
    }

    async fn send(&self, method: &Method, path: &str, request: reqwest::RequestBuilder) -> Result<Value> {
        let transport = |source| Error::Transport { method: method.clone(), path: path.to_owned(), source };
        let response = request.send().await.map_err(transport)?;
        let status = response.status();
        let reason = status.canonical_reason().unwrap_or("").to_owned();
        let bytes = response.bytes().await.map_err(transport)?;
        let body: Value = match serde_json::from_slice(&bytes) {
            Ok(v) => v,
            Err(source) if status.is_success() => {
                return Err(Error::Decode { method: method.clone(), path: path.to_owned(), source });
            }
            Err(_) => Value::Null,
        };
        if !status.is_success() {
            return Err(Error::Status {
                method: method.clone(),
                path: path.to_owned(),
                status: status.as_u16(),
                message: error_message(&body, &reason),
            });
        }
        Ok(body.get("data").cloned().unwrap_or(Value::Null))
    }

    /// The current ticket and CSRF token, logging in when there is none or it is old.
    async fn ticket(&self) -> Result<(String, String)> {
        let Auth::Password { user, password } = &self.auth else {
            unreachable!("tickets are only used with password auth")
        };
        let mut guard = self.ticket.lock().await;
        if let Some(t) = guard.as_ref().filter(|t| t.obtained.elapsed() < self.ticket_renew_after) {
            return Ok((t.ticket.clone(), t.csrf.clone()));
        }
        let path = "/access/ticket";
        let form = [("username", user.clone()), ("password", password.expose().to_owned())];
        let request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("Content-Type", "application/x-www-form-urlencoded")
            .body(form_urlencoded::Serializer::new(String::new()).extend_pairs(&form).finish());
        let data = self.send(&Method::POST, path, request).await?;
        let field = |k: &str| {
            data.get(k)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| Error::Unexpected { path: path.into(), what: format!("no {k} in the answer") })
        };
        let ticket = Ticket { ticket: field("ticket")?, csrf: field("CSRFPreventionToken")?, obtained: Instant::now() };
        let out = (ticket.ticket.clone(), ticket.csrf.clone());
        *guard = Some(ticket);
        Ok(out)
    }

    /// Waits for a task to stop; a task that ends with anything but `OK` (or warnings) fails.
    pub async fn wait_task(&self, upid: &str, limit: Duration) -> Result<()> {
        let node = upid_node(upid)
            .ok_or_else(|| Error::Unexpected { path: "task".into(), what: format!("{upid:?} is not a UPID") })?;
        let path = format!("/nodes/{node}/tasks/{upid}/status");
        let deadline = Instant::now() + limit;
        loop {
            let status = self.get(&path, &[]).await?;
            if status.get("status").and_then(Value::as_str) == Some("stopped") {
                let exit = status.get("exitstatus").and_then(Value::as_str).unwrap_or("unknown").to_owned();
                return if exit == "OK" || exit.starts_with("WARNINGS") {
                    Ok(())
                } else {
                    Err(Error::TaskFailed { upid: upid.to_owned(), exitstatus: exit })
                };
            }
            if Instant::now() >= deadline {
                return Err(Error::TaskTimeout { upid: upid.to_owned(), limit });
            }
            tokio::time::sleep(self.poll_interval).await;
        }
    }

    /// Waits for the task a call returned, if it returned one (some calls run synchronously
    /// and answer `null`).
    pub async fn wait_answer(&self, answer: &Value, limit: Duration) -> Result<()> {
        match answer.as_str() {
            Some(upid) if upid.starts_with("UPID:") => self.wait_task(upid, limit).await,
            _ => Ok(()),
        }
    }
}

/// PVE's error text: `message`, plus per-parameter `errors` for a 400.
fn error_message(body: &Value, reason: &str) -> String {
    let mut message = body.get("message").and_then(Value::as_str).unwrap_or(reason).trim().to_owned();
    if let Some(errors) = body.get("errors").and_then(Value::as_object) {
        let detail: Vec<String> =
            errors.iter().map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("").trim())).collect();
        message = format!("{message} ({})", detail.join("; "));
    }
    if message.is_empty() { "no message".into() } else { message }
}

/// The node a task runs on: `UPID:<node>:<pid>:<pstart>:<starttime>:<type>:<id>:<user>:`.
pub fn upid_node(upid: &str) -> Option<&str> {
    let mut parts = upid.split(':');
    (parts.next()? == "UPID").then_some(())?;
    parts.next().filter(|n| !n.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_node_is_read_from_a_upid() {
        assert_eq!(upid_node("UPID:pve2:000A1B2C:0123ABCD:6560F00D:qmclone:100:root@pam!flotilla:"), Some("pve2"));
        assert_eq!(upid_node("not-a-upid"), None);
    }

    #[test]
    fn errors_are_classified_like_the_cloud_means_them() {
        let status = |status, message: &str| Error::Status {
            method: Method::POST,
            path: "/x".into(),
            status,
            message: message.into(),
        };
        let kind = |e: Error| driver::Error::from(e).kind();
        assert_eq!(kind(status(401, "authentication failure")), "unauthorized");
        assert_eq!(kind(status(403, "Permission check failed")), "unauthorized");
        assert_eq!(kind(status(400, "Parameter verification failed.")), "invalid_request");
        assert_eq!(kind(status(500, "Configuration file 'nodes/pve1/qemu-server/7.conf' does not exist")), "not_found");
        assert_eq!(kind(status(595, "No route to host")), "unavailable");
        assert_eq!(kind(status(500, "not enough memory")), "out_of_resources");
        let failed = Error::TaskFailed { upid: "UPID:a:".into(), exitstatus: "no space left on device".into() };
        assert_eq!(kind(failed), "out_of_resources");
        assert!(status(500, "unable to create VM 101: config file already exists").is_vmid_taken());
    }

    /// A PVE stand-in that counts logins and accepts only the newest ticket.
    async fn ticket_server() -> (String, std::sync::Arc<std::sync::atomic::AtomicU32>) {
        use axum::{
            http::{HeaderMap, StatusCode},
            routing::{get, post},
        };
        use std::sync::{
            Arc,
            atomic::{AtomicU32, Ordering},
        };
        let logins = Arc::new(AtomicU32::new(0));
        let counter = Arc::clone(&logins);
        let current = Arc::clone(&logins);
        let app = axum::Router::new()
            .route(
                "/api2/json/access/ticket",
                post(move || {
                    let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                    async move { format!(r#"{{"data":{{"ticket":"t{n}","CSRFPreventionToken":"c{n}"}}}}"#) }
                }),
            )
            .route(
                "/api2/json/version",
                get(move |headers: HeaderMap| {
                    let n = current.load(Ordering::SeqCst);
                    async move {
                        let cookie = headers.get("cookie").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
                        if cookie == format!("PVEAuthCookie=t{n}") {
                            (StatusCode::OK, r#"{"data":{"version":"8.2.4"}}"#.to_owned())
                        } else {
                            (StatusCode::UNAUTHORIZED, r#"{"data":null}"#.to_owned())
                        }
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        (format!("http://{addr}/api2/json"), logins)
    }

    fn password_api(base: String) -> Api {
        let auth = Auth::Password { user: "u@pve".into(), password: Secret::new("p".into()) };
        Api::new(reqwest::Client::new(), base, auth, Duration::from_millis(10))
    }

    #[tokio::test]
    async fn a_ticket_is_reused_while_young_and_replaced_once_old() {
        let (base, logins) = ticket_server().await;
        let api = password_api(base.clone());
        for _ in 0..3 {
            api.get("/version", &[]).await.unwrap();
        }
        assert_eq!(logins.load(std::sync::atomic::Ordering::SeqCst), 1);
        // Past the renewal age every call logs in first (here: at once).
        let mut old = password_api(base);
        old.ticket_renew_after = Duration::ZERO;
        old.get("/version", &[]).await.unwrap();
        old.get("/version", &[]).await.unwrap();
        assert_eq!(logins.load(std::sync::atomic::Ordering::SeqCst), 3);
        // The first client's ticket is stale now: refused once, then it logs in again.
        api.get("/version", &[]).await.unwrap();
        assert_eq!(logins.load(std::sync::atomic::Ordering::SeqCst), 4);
    }

    #[test]
    fn parameter_errors_are_spelled_out() {
        let body = serde_json::json!({"data": null, "errors": {"cores": "value must be >= 1\n"}, "message": "Parameter verification failed.\n"});
        assert_eq!(error_message(&body, "Bad Request"), "Parameter verification failed. (cores: value must be >= 1)");
    }
}
