//! The narrow client of the Kamatera API behind `cloudcli.cloudwm.com`: the eight calls the
//! driver makes, on the shared HTTP layer, the shapes of their answers, and the one place where
//! Kamatera's answers become [`driver::Error`] classes.
//!
//! Facts about the API come from its server's code (cloudwm/cloudcli-server): see the fake in
//! `tests/fakes/kamatera/` for the list. The ones this module depends on:
//! * Every call carries `AuthClientId` and `AuthSecret` (without them the proxy would act on its
//!   own account) and `Accept: application/json`.
//! * `name` is matched as a regular expression; servers are therefore named by `id` wherever the
//!   API takes one.
//! * Errors: `{"message": ...}` with 400 (a flag), 500 (an exception in the proxy, or a lookup
//!   that matched nothing), or the backend's own status with `{"json_decode_error": null,
//!   "message": ...}` (a backend answer relayed); the server listing relays backend errors
//!   (bad credentials among them) as **200** with `{"errors": [{"code", "info"}]}`.
//!
//! # Retries
//! Only reads are retried (tag lookups, queue polls, recent commands): a create, terminate,
//! power or tag-adding call is sent once, because repeating one is not safe (two servers, or a command run
//! twice); the driver resolves an unclear outcome by looking, never by asking again. The server
//! listing of a Refresh is not retried either: the core lists again on the next loop. Bad
//! credentials are never retried (the in-tree provider retries every failure five times over
//! 30 s, 401s and terminates included).

use std::time::Duration;

use serde_json::{Value, json};

use crate::{
    config::Secret,
    driver::{self, http},
};

/// Failures of one API call.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Http(#[from] http::Error),
    /// A 200 answer carrying the backend's error (how the server listing relays them).
    #[error("{what}: {message}")]
    Api { what: &'static str, message: String },
    /// An answer the driver cannot read. Never includes the body (a create's answer may hold a
    /// generated password).
    #[error("{what}: unexpected answer: {detail}")]
    Shape { what: &'static str, detail: String },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

fn mentions_auth(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["authentication", "unauthorized", "unauthorised", "invalid credentials", "auth failed"]
        .iter()
        .any(|w| m.contains(w))
}

/// Quota, capacity or money: cluster-autoscaler should back off this group and try another.
fn mentions_no_resources(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    ["quota", "capacity", "insufficient", "not enough", "out of stock", "limit exceeded", "limit reached"]
        .iter()
        .any(|w| m.contains(w))
}

/// Kamatera's re-mapping of the common status table (also what decides retries).
pub fn classify(e: &http::Error) -> driver::Error {
    if let http::Error::Status { message, .. } = e {
        let text = e.to_string();
        if mentions_auth(message) {
            return driver::Error::Unauthorized(text);
        }
        if mentions_no_resources(message) {
            return driver::Error::OutOfResources(text);
        }
        if message.starts_with("No servers found") {
            return driver::Error::NotFound(text);
        }
    }
    http::classify(e)
}

impl From<Error> for driver::Error {
    fn from(e: Error) -> driver::Error {
        match &e {
            Error::Http(h) => classify(h),
            Error::Api { message, .. } if mentions_auth(message) => driver::Error::Unauthorized(e.to_string()),
            Error::Api { message, .. } if mentions_no_resources(message) => {
                driver::Error::OutOfResources(e.to_string())
            }
            Error::Api { .. } | Error::Shape { .. } => driver::Error::Other(e.to_string()),
        }
    }
}

impl Error {
    /// True when a create that failed like this may still have made its server: no answer, a
    /// 5xx that is not the backend's own refusal, or an answer the driver could not read.
    pub fn may_have_created(&self) -> bool {
        match self {
            Error::Http(http::Error::Status { status, body, .. }) if *status >= 500 => !is_backend_refusal(body),
            Error::Http(h) => h.may_have_acted(),
            Error::Api { .. } => false,
            Error::Shape { .. } => true,
        }
    }

    /// True when no answer came back at all (as opposed to an error answer).
    pub fn unanswered(&self) -> bool {
        matches!(self, Error::Http(http::Error::Timeout { .. } | http::Error::Transport { .. }))
    }
}

/// A backend refusal relayed by the proxy carries the `json_decode_error` key its response
/// parser adds; the proxy's own failures (which may follow a request the backend did act on)
/// do not.
fn is_backend_refusal(body: &[u8]) -> bool {
    serde_json::from_slice::<Value>(body).is_ok_and(|v| v.get("json_decode_error").is_some())
}

/// One row of the server listing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerRow {
    /// Kamatera's server id (the listing has it; `None` if an answer ever lacks it).
    pub id: Option<String>,
    pub name: String,
    pub power_on: bool,
}

impl ServerRow {
    /// How requests name this server: by id when known (names are regular expressions to the
    /// API).
    fn target(&self) -> Value {
        match &self.id {
            Some(id) => json!({ "id": id }),
            None => json!({ "name": self.name }),
        }
    }
}

/// Where a queued command is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CommandState {
    /// Not finished; the API's word for where it is.
    Running(String),
    Complete,
    /// Ended in `error`, with the queue's log.
    Failed(String),
    /// The queue answered with nothing for this id (it does, sometimes): ask the listing.
    Unknown,
}

/// A command of the account's recent queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecentCommand {
    pub id: String,
    /// `Create Server`, ...
    pub info: String,
    /// The server it works on.
    pub server: String,
}

/// The client of one Kamatera account.
#[derive(Debug)]
pub struct Api {
    http: http::Client,
    base: String,
    client_id: Secret,
    secret: Secret,
    create_timeout: Duration,
}

impl Api {
    pub fn new(http: http::Client, base: &str, client_id: Secret, secret: Secret, create_timeout: Duration) -> Api {
        Api { http, base: base.trim_end_matches('/').to_owned(), client_id, secret, create_timeout }
    }

    fn call(&self, method: reqwest::Method, path: &str, label: &'static str) -> http::Request<'_> {
        self.http
            .request(method, format!("{}{path}", self.base))
            .label(label)
            .header("AuthClientId", self.client_id.expose())
            .header("AuthSecret", self.secret.expose())
            .header("Accept", "application/json")
    }

    /// Every server of the account: `GET /service/servers`. Not retried (see the module docs).
    pub async fn list_servers(&self) -> Result<Vec<ServerRow>> {
        self.servers(http::Retry::NONE).await
    }

    /// The listing with the client's retries, for calls outside a Refresh (delete, lookups).
    pub async fn list_servers_retried(&self) -> Result<Vec<ServerRow>> {
        self.servers(self.http.settings().retry).await
    }

    async fn servers(&self, retry: http::Retry) -> Result<Vec<ServerRow>> {
        const WHAT: &str = "GET /service/servers";
        let r = self.call(reqwest::Method::GET, "/service/servers", WHAT).idempotent().retry(retry).send().await?;
        let v: Value = r.json()?;
        let rows = array(v, WHAT)?;
        rows.into_iter()
            .map(|row| {
                let name =
                    row.get("name").and_then(Value::as_str).ok_or_else(|| shape(WHAT, "a server without a name"))?;
                let power = row.get("power").and_then(Value::as_str).unwrap_or_default();
                let id = row.get("id").and_then(Value::as_str).filter(|s| !s.is_empty()).map(str::to_owned);
                Ok(ServerRow { id, name: name.to_owned(), power_on: power == "on" })
            })
            .collect()
    }

    /// A server's tag names: `POST /server/tags`.
    pub async fn server_tags(&self, server: &ServerRow) -> Result<Vec<String>> {
        const WHAT: &str = "POST /server/tags";
        let r =
            self.call(reqwest::Method::POST, "/server/tags", WHAT).json(&server.target()).idempotent().send().await?;
        tag_names(r.json()?, WHAT)
    }

    /// Adds tag `tag` to a server (the proxy creates the account's tag if it is new) and returns
    /// the server's tags after it: `POST /server/tags` with `add`. Sent once; the driver reads
    /// the tags back when the answer is lost.
    pub async fn add_tag(&self, server: &ServerRow, tag: &str) -> Result<Vec<String>> {
        const WHAT: &str = "POST /server/tags (add)";
        let mut body = server.target();
        body["add"] = json!(tag);
        let r =
            self.call(reqwest::Method::POST, "/server/tags", WHAT).json(&body).retry(http::Retry::NONE).send().await?;
        tag_names(r.json()?, WHAT)
    }

    /// Starts a create: `POST /service/server`, sent once. Returns the command id; a generated
    /// password in the answer is dropped unread, and the root password is taken out of an error
    /// answer that repeats it (see [`redact`]).
    pub async fn create_server(&self, body: &Value) -> Result<String> {
        const WHAT: &str = "POST /service/server";
        let r = self
            .call(reqwest::Method::POST, "/service/server", WHAT)
            .json(body)
            .timeout(self.create_timeout)
            .retry(http::Retry::NONE)
            .send()
            .await
            .map_err(|e| redact(e, body.get("password").and_then(Value::as_str).unwrap_or_default()))?;
        let v: Value = r.json()?;
        // `{"commandIds": [...], "password": ...}` when the password was `__generate__`.
        let ids = match v {
            Value::Object(mut m) => {
                m.remove("commandIds").ok_or_else(|| shape(WHAT, "an object without commandIds"))?
            }
            other => other,
        };
        command_id(&ids).ok_or_else(|| shape(WHAT, "no command id"))
    }

    /// Starts a terminate (forced: powered on or not): `POST /service/server/terminate`.
    pub async fn terminate(&self, server: &ServerRow) -> Result<String> {
        const WHAT: &str = "POST /service/server/terminate";
        let mut body = server.target();
        body["force"] = json!(true);
        let r = self
            .call(reqwest::Method::POST, "/service/server/terminate", WHAT)
            .json(&body)
            .retry(http::Retry::NONE)
            .send()
            .await?;
        command_id(&r.json()?).ok_or_else(|| shape(WHAT, "no command id"))
    }

    /// Starts a power on or off: `POST /service/server/poweron|poweroff`.
    pub async fn power(&self, server: &ServerRow, on: bool) -> Result<String> {
        let (path, what) = if on {
            ("/service/server/poweron", "POST /service/server/poweron")
        } else {
            ("/service/server/poweroff", "POST /service/server/poweroff")
        };
        let r =
            self.call(reqwest::Method::POST, path, what).json(&server.target()).retry(http::Retry::NONE).send().await?;
        command_id(&r.json()?).ok_or_else(|| shape(what, "no command id"))
    }

    /// Where a command is: `GET /service/queue?id=`.
    pub async fn command(&self, id: &str) -> Result<CommandState> {
        const WHAT: &str = "GET /service/queue";
        let r =
            self.call(reqwest::Method::GET, "/service/queue", WHAT).query(&[("id", id)]).idempotent().send().await?;
        let rows = array(r.json()?, WHAT)?;
        let row = match rows.as_slice() {
            [] => return Ok(CommandState::Unknown),
            [row] => row,
            _ => return Err(shape(WHAT, "more than one command for one id")),
        };
        let status = row.get("status").and_then(Value::as_str).unwrap_or_default();
        Ok(match status {
            "complete" => CommandState::Complete,
            "error" => {
                CommandState::Failed(row.get("log").and_then(Value::as_str).unwrap_or_default().trim().to_owned())
            }
            other => CommandState::Running(other.to_owned()),
        })
    }

    /// The account's recent commands, newest first: `GET /svc/queue`.
    pub async fn recent_commands(&self) -> Result<Vec<RecentCommand>> {
        const WHAT: &str = "GET /svc/queue";
        let r = self.call(reqwest::Method::GET, "/svc/queue", WHAT).idempotent().send().await?;
        let rows = array(r.json()?, WHAT)?;
        Ok(rows
            .iter()
            .filter_map(|row| {
                let id = match row.get("id")? {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    _ => return None,
                };
                let text = |k: &str| row.get(k).and_then(Value::as_str).unwrap_or_default().to_owned();
                Some(RecentCommand { id, info: text("commandInfo"), server: text("serviceName") })
            })
            .collect())
    }
}

/// An error answer with `secret` taken out of its message and body. cloudcli-server before
/// December 2019 checked root passwords itself and refused one with "... for field password
/// (password=<the password>)"; the backend's words are not published. The message may be cut
/// (long bodies are), so a cut-off start of the secret at its end goes too.
fn redact(e: http::Error, secret: &str) -> http::Error {
    const REDACTED: &str = "<redacted>";
    if secret.is_empty() || secret == "__generate__" {
        return e;
    }
    let clean = |text: &str| {
        let mut text = text.replace(secret, REDACTED);
        // The longest start of the secret (4 characters or more) the text ends with.
        let cut =
            (4..secret.len()).rev().filter(|&n| secret.is_char_boundary(n)).find(|&n| text.ends_with(&secret[..n]));
        if let Some(n) = cut {
            text.truncate(text.len() - n);
            text.push_str(REDACTED);
        }
        text
    };
    match e {
        http::Error::Status { what, status, message, retry_after, body } => http::Error::Status {
            what,
            status,
            message: clean(&message),
            retry_after,
            body: clean(&String::from_utf8_lossy(&body)).into_bytes().into(),
        },
        other => other,
    }
}

/// The tag names of a `POST /server/tags` answer: `[{"id", "tagName"}]`.
fn tag_names(v: Value, what: &'static str) -> Result<Vec<String>> {
    array(v, what)?
        .iter()
        .map(|row| {
            row.get("tagName")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| shape(what, "a tag without tagName"))
        })
        .collect()
}

fn shape(what: &'static str, detail: &str) -> Error {
    Error::Shape { what, detail: detail.to_owned() }
}

/// The array an answer must be, or the backend error a 200 answer carries instead.
fn array(v: Value, what: &'static str) -> Result<Vec<Value>> {
    match v {
        Value::Array(rows) => Ok(rows),
        Value::Object(m) if m.contains_key("errors") || m.contains_key("message") => {
            Err(Error::Api { what, message: backend_message(&m) })
        }
        _ => Err(shape(what, "not a list")),
    }
}

/// `info (code)` of each of the backend's errors, as cloudcli-server joins them.
fn backend_message(m: &serde_json::Map<String, Value>) -> String {
    let mut parts = Vec::new();
    if let Some(msg) = m.get("message").and_then(Value::as_str).filter(|s| !s.is_empty()) {
        parts.push(msg.to_owned());
    }
    for e in m.get("errors").and_then(Value::as_array).into_iter().flatten() {
        let info = e.get("info").and_then(Value::as_str).unwrap_or_default();
        let code = match e.get("code") {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::new(),
        };
        parts.push(match (info.is_empty(), code.is_empty()) {
            (false, false) => format!("{info} ({code})"),
            (false, true) => info.to_owned(),
            (true, false) => format!("unidentified error ({code})"),
            (true, true) => continue,
        });
    }
    if parts.is_empty() { "the API answered with an error and no message".into() } else { parts.join(". ") }
}

/// A command id: `["123"]` (what the proxy answers), or a bare string or number.
fn command_id(v: &Value) -> Option<String> {
    match v {
        Value::Array(items) if items.len() == 1 => command_id(&items[0]),
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_ids_come_in_every_shape_the_api_uses() {
        assert_eq!(command_id(&json!(["4500001"])), Some("4500001".into()));
        assert_eq!(command_id(&json!("4500001")), Some("4500001".into()));
        assert_eq!(command_id(&json!(4500001)), Some("4500001".into()));
        assert_eq!(command_id(&json!([])), None);
        assert_eq!(command_id(&json!(["1", "2"])), None);
    }

    #[test]
    fn backend_errors_read_as_the_proxy_joins_them() {
        let m = json!({ "errors": [{ "code": 7, "info": "Authentication failed" }, { "info": "again" }] });
        assert_eq!(backend_message(m.as_object().unwrap()), "Authentication failed (7). again");
    }

    #[test]
    fn an_error_answer_never_repeats_the_root_password() {
        let status = |message: &str| http::Error::Status {
            what: "POST /service/server".into(),
            status: 400,
            message: message.into(),
            retry_after: None,
            body: format!(r#"{{"message":"{message}"}}"#).into_bytes().into(),
        };
        let said = "must have at least one of: '0123456789' for field password (password=Secret!pw-x)";
        let e = redact(status(said), "Secret!pw-x");
        let (text, body) = match &e {
            http::Error::Status { body, .. } => (e.to_string(), String::from_utf8_lossy(body).into_owned()),
            _ => unreachable!(),
        };
        assert!(text.ends_with("for field password (password=<redacted>)"), "{text}");
        assert!(!body.contains("Secret!pw-x") && body.contains("<redacted>"), "{body}");
        // A message cut off half way through the password.
        let e = redact(status("invalid flag value (password=Secre"), "Secret!pw-x");
        assert!(e.to_string().ends_with("(password=<redacted>"), "{e}");
        // Nothing to take out.
        assert_eq!(redact(status("quota exceeded"), "").to_string(), status("quota exceeded").to_string());
    }

    #[test]
    fn error_text_decides_the_class() {
        let status = |status: u16, message: &str, body: &str| http::Error::Status {
            what: "POST /service/server".into(),
            status,
            message: message.into(),
            retry_after: None,
            body: body.as_bytes().to_vec().into(),
        };
        assert!(matches!(classify(&status(500, "Authentication failed", "{}")), driver::Error::Unauthorized(_)));
        assert!(matches!(
            classify(&status(500, "Insufficient resources: quota exceeded", "{}")),
            driver::Error::OutOfResources(_)
        ));
        assert!(matches!(classify(&status(500, "No servers found (name='x')", "{}")), driver::Error::NotFound(_)));
        assert!(matches!(
            classify(&status(400, "missing required flag (name)", "{}")),
            driver::Error::InvalidRequest(_)
        ));
        assert!(matches!(classify(&status(502, "Bad Gateway", "<html>")), driver::Error::Unavailable(_)));
        let relayed = Error::Http(status(500, "boom", r#"{"json_decode_error":null,"message":"boom"}"#));
        assert!(!relayed.may_have_created(), "a relayed backend refusal made nothing");
        let proxy = Error::Http(status(500, "Failed to run command method (createServer)", r#"{"message":"x"}"#));
        assert!(proxy.may_have_created());
        assert!(!Error::Http(status(400, "x", "{}")).may_have_created());
    }
}
