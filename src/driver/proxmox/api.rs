//! A narrow client for the Proxmox VE API (`/api2/json`): the dozen calls the driver needs,
//! authentication (API token, or a login ticket renewed before it expires), the `{"data": ...}`
//! envelope, PVE's error answers ([`classify`], [`error_message`]), and waiting for tasks
//! (UPIDs). Transport, TLS, the reason phrase and retries are the shared [`http`] layer's.
//!
//! PVE reports most failures as `500` with its words as the message: in the JSON body
//! (`{"data": null, "message": "..."}`, libpve-http-server-perl 5.2 and later) or only in the
//! status line (`HTTP/1.1 500 unable to create VM 100: config file already exists`, before
//! 5.2, i.e. most PVE 7 and 8 installations). Both reach [`Error::message`].
//!
//! Why not the `proxmox-api` crate: it is async and generated from the full API schema, but
//! its bundled reqwest client turns certificate checking off (`danger_accept_invalid_certs`),
//! its errors drop the HTTP status and PVE message the driver classifies errors by, and
//! compiling the whole generated API for a dozen endpoints costs more than this file.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use tokio::{sync::Mutex, time::Instant};

use crate::{
    config::Secret,
    driver::{self, http},
};

/// PVE tickets live two hours; renew well before.
const TICKET_RENEW_AFTER: Duration = Duration::from_secs(90 * 60);

/// Errors of one API call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The call failed or PVE answered with an error (after any retries).
    #[error(transparent)]
    Http(#[from] http::Error),
    #[error("unexpected answer to {path}: {what}")]
    Unexpected { path: String, what: String },
    #[error("task {upid} failed: {exitstatus}")]
    TaskFailed { upid: String, exitstatus: String },
    #[error("task {upid} did not finish within {limit:?}")]
    TaskTimeout { upid: String, limit: Duration },
}

impl Error {
    /// The message PVE gave (body or status line), for matching known failures.
    pub fn message(&self) -> &str {
        match self {
            Error::Http(e) => e.message(),
            Error::TaskFailed { exitstatus, .. } => exitstatus,
            _ => "",
        }
    }

    /// True for a "does not exist" answer (PVE says so with status 500, not 404).
    pub fn is_not_found(&self) -> bool {
        match self {
            Error::Http(e) => is_not_found(e),
            _ => false,
        }
    }

    /// True when a VMID is taken (a clone raced another create).
    pub fn is_vmid_taken(&self) -> bool {
        self.message().contains("already exists")
    }
}

fn is_not_found(e: &http::Error) -> bool {
    match e.status() {
        Some(404) => true,
        Some(_) => {
            let m = e.message();
            m.contains("does not exist") || m.contains("no such VM")
        }
        None => false,
    }
}

/// Messages meaning the cluster has no room for the VM.
fn is_out_of_resources(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["not enough", "no space left", "out of space", "cannot allocate memory", "insufficient"]
        .iter()
        .any(|p| m.contains(p))
}

/// PVE's status table. `500` is PVE's `die`: its words say what happened ("does not exist",
/// "not enough memory"), and a plain one is Other, never retried; 595/596 (the proxy could not
/// reach the node) and 502..504 are Unavailable.
pub fn classify(e: &http::Error) -> driver::Error {
    let text = e.to_string();
    let http::Error::Status { status, message, retry_after, .. } = e else {
        return http::classify(e);
    };
    if is_out_of_resources(message) {
        return driver::Error::OutOfResources(text);
    }
    if is_not_found(e) {
        return driver::Error::NotFound(text);
    }
    match *status {
        401 | 403 => driver::Error::Unauthorized(text),
        429 => driver::Error::RateLimited { message: text, retry_after: *retry_after },
        400 | 501 => driver::Error::InvalidRequest(text),
        502..=504 | 595 | 596 => driver::Error::Unavailable(text),
        _ => driver::Error::Other(text),
    }
}

impl From<Error> for driver::Error {
    fn from(e: Error) -> Self {
        let text = e.to_string();
        match &e {
            Error::Http(h) => classify(h),
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
    http: http::Client,
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

/// Whether a call may be sent again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Repeat {
    /// A clone, start, stop, destroy, agent command: sent once.
    Never,
    /// A read or a PUT of config: retried on transient failures.
    Safe,
    /// The listing of a Refresh: safe, but not retried (the core lists again next loop and
    /// keeps the last picture up to `max_staleness`).
    Listing,
}

impl Api {
    pub fn new(http: http::Client, base: String, auth: Auth, poll_interval: Duration) -> Api {
        Api {
            http,
            base: base.trim_end_matches('/').to_owned(),
            auth,
            ticket: Mutex::new(None),
            ticket_renew_after: TICKET_RENEW_AFTER,
            poll_interval,
        }
    }

    /// `data` of a GET (retried on transient failures).
    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::GET, path, query, &[], Repeat::Safe).await
    }

    /// `data` of a GET that fails fast: for the listing of a Refresh.
    pub async fn list(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::GET, path, query, &[], Repeat::Listing).await
    }

    /// `data` of a POST with a form body; never repeated.
    pub async fn post(&self, path: &str, form: &[(&str, String)]) -> Result<Value> {
        self.call(Method::POST, path, &[], form, Repeat::Never).await
    }

    /// A PUT sets the same state however often it is sent: retried on transient failures.
    pub async fn put(&self, path: &str, form: &[(&str, String)]) -> Result<Value> {
        self.call(Method::PUT, path, &[], form, Repeat::Safe).await
    }

    pub async fn delete(&self, path: &str, query: &[(&str, String)]) -> Result<Value> {
        self.call(Method::DELETE, path, query, &[], Repeat::Never).await
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: &[(&str, String)],
        repeat: Repeat,
    ) -> Result<Value> {
        match self.call_once(&method, path, query, form, repeat).await {
            // An expired or revoked ticket: log in again once.
            Err(Error::Http(e)) if e.status() == Some(401) && matches!(self.auth, Auth::Password { .. }) => {
                *self.ticket.lock().await = None;
                self.call_once(&method, path, query, form, repeat).await
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
        repeat: Repeat,
    ) -> Result<Value> {
        let mut request =
            self.http.request(method.clone(), format!("{}{path}", self.base)).label(format!("proxmox {method} {path}"));
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
            request = request.form(form);
        }
        request = match repeat {
            Repeat::Never => request,
            Repeat::Safe => request.idempotent(),
            Repeat::Listing => request.idempotent().retry(http::Retry::NONE),
        };
        let body: Value = request.send().await?.json()?;
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
        let form = [("username", user.as_str()), ("password", password.expose())];
        // A login changes nothing a repeat could double: safe to retry.
        let answer: Value = self
            .http
            .post(format!("{}{path}", self.base))
            .label(format!("proxmox POST {path}"))
            .form(&form)
            .idempotent()
            .send()
            .await?
            .json()?;
        let data = answer.get("data").cloned().unwrap_or(Value::Null);
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

/// PVE's error text from a JSON body: `message`, plus per-parameter `errors` for a 400;
/// `None` when the body has neither (PVE before 5.2: the message is in the status line).
pub fn error_message(body: &[u8]) -> Option<String> {
    let body: Value = serde_json::from_slice(body).ok()?;
    let message = body.get("message").and_then(Value::as_str).map(|m| m.trim().to_owned()).filter(|m| !m.is_empty());
    let detail: Vec<String> = body
        .get("errors")
        .and_then(Value::as_object)
        .map(|errors| errors.iter().map(|(k, v)| format!("{k}: {}", v.as_str().unwrap_or("").trim())).collect())
        .unwrap_or_default();
    match (message, detail.is_empty()) {
        (Some(m), true) => Some(m),
        (Some(m), false) => Some(format!("{m} ({})", detail.join("; "))),
        (None, false) => Some(format!("Parameter verification failed. ({})", detail.join("; "))),
        (None, true) => None,
    }
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
        let status = |status, message: &str| {
            Error::Http(http::Error::Status {
                what: "proxmox POST /x".into(),
                status,
                message: message.into(),
                retry_after: None,
                body: bytes::Bytes::new(),
            })
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
        let client = http::Client::new(http::Settings::new(http::Trust::PublicRoots)).unwrap();
        Api::new(client, base, auth, Duration::from_millis(10))
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
        assert_eq!(
            error_message(body.to_string().as_bytes()).as_deref(),
            Some("Parameter verification failed. (cores: value must be >= 1)")
        );
    }
}
