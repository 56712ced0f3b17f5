//! The one HTTP layer of the cloud drivers (OpenStack, Proxmox VE, and every HTTP driver after
//! them), on reqwest over rustls.
//!
//! What every cloud API call needs and no driver should write again:
//! * **Client construction** from [`Settings`]: request and connect timeouts, TLS trust
//!   ([`Trust`]: public roots, a CA bundle, a pinned certificate, or an explicit opt-out), the
//!   user agent.
//! * **Plain HTTP only to loopback** ([`check_url`]): a request to `http://` anything but a
//!   loopback address (parsed, not matched as a prefix) is refused before it is sent, unless the
//!   driver's user opted in ([`Settings::allow_plain_http`]). Checked on every request, so a
//!   service catalog that lists an `http://` endpoint cannot leak a token either.
//! * **Error text kept**: the JSON error body's message (a per-API [`ErrorMessage`] reads it)
//!   *and* the HTTP reason phrase when a server puts its error there (PVE before
//!   libpve-http-server-perl 5.2 answers `HTTP/1.1 500 unable to create VM 100: config file
//!   already exists` with the body `{"data":null}`). hyper keeps a non-canonical reason phrase
//!   in the response's extensions ([`hyper::ext::ReasonPhrase`]); reqwest passes them on.
//! * **Retries** with exponential backoff and full jitter, *only* for calls the caller declares
//!   idempotent ([`Request::idempotent`]), only for transient failures (timeouts, connection
//!   failures, 5xx, 429, as the driver's [`Classify`] sees them), never for 401/403, honouring
//!   `Retry-After` (seconds or an HTTP date) up to [`Retry::max_retry_after`].
//! * **Status → [`driver::Error`]**: [`classify`] is the common table (401/403 Unauthorized,
//!   404 NotFound, 400/409/422 InvalidRequest, 429 RateLimited, 5xx and connection failures
//!   Unavailable, timeouts Timeout); a driver installs its own [`Classify`] that re-maps what its
//!   API means differently (a 500 saying "quota" is OutOfResources) and falls back to
//!   [`classify`]. The same function decides retries, so a re-mapped error is never retried by
//!   mistake.
//! * **No secrets in errors**: messages name the call by a label (`GET /servers/detail` by
//!   default: method and path, never the query, host credentials or headers), never a request
//!   body, and reqwest's own errors are stripped of their URL. URLs carrying credentials
//!   (`https://user:pass@host`) are refused outright.
//!
//! # Use
//! ```no_run
//! # async fn f() -> Result<(), flotilla::driver::http::Error> {
//! use flotilla::driver::http::{Client, Settings, Trust};
//! let client = Client::new(Settings::new(Trust::PublicRoots)).expect("a client");
//! let servers: serde_json::Value = client
//!     .get("https://cloud.example/api/servers")
//!     .header("X-Auth-Token", "secret")
//!     .idempotent()
//!     .send()
//!     .await?
//!     .json()?;
//! # Ok(()) }
//! ```

pub mod tls;

use std::{
    fmt,
    net::IpAddr,
    time::{Duration, SystemTime},
};

use bytes::Bytes;
use reqwest::{
    Method, StatusCode, Url,
    header::{HeaderMap, HeaderName, HeaderValue},
};
use serde::de::DeserializeOwned;
use serde_json::Value;

pub use tls::Trust;

use crate::driver;

/// How long the longest error message taken from a body may be (bodies of proxies' HTML error
/// pages are long and say little).
const MAX_MESSAGE_CHARS: usize = 300;

/// Why a client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Tls(#[from] tls::Error),
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
}

/// What is wrong with a URL before anything is sent.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("is not a URL ({0})")]
    Invalid(String),
    #[error("must be http:// or https://, not {0}://")]
    Scheme(String),
    #[error("must not carry a user name or password (give credentials in their own keys)")]
    Credentials,
    #[error(
        "plain http:// to {host} would send credentials in clear: use https://, or opt in to plain http explicitly (without the opt-in only loopback addresses may use http://)"
    )]
    PlainHttp { host: String },
}

/// Failures of one call, after any retries.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The URL was refused before anything was sent.
    #[error("{what}: the URL {source}")]
    Url {
        what: String,
        #[source]
        source: UrlError,
    },
    /// A request header could not be encoded (e.g. a token with a line break).
    #[error("{what}: header {name} holds characters HTTP does not allow")]
    Header { what: String, name: String },
    /// The server answered with a status outside 2xx.
    #[error("{what} answered {status}: {message}")]
    Status {
        what: String,
        status: u16,
        /// The error body's message, the reason phrase when it says more than the status, or both.
        message: String,
        /// `Retry-After`, when the server sent one.
        retry_after: Option<Duration>,
        /// The raw error body, for drivers that read more of it.
        body: Bytes,
    },
    #[error("{what} timed out after {limit:?}")]
    Timeout { what: String, limit: Duration },
    /// No answer: connection refused or reset, TLS failure, DNS.
    #[error("{what} failed: {detail}")]
    Transport {
        what: String,
        detail: String,
        /// True when the connection was never made, so the server cannot have acted.
        connect: bool,
    },
    #[error("{what}: cannot decode the answer: {source}")]
    Decode {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The HTTP status, for an answered call.
    pub fn status(&self) -> Option<u16> {
        match self {
            Error::Status { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// The server's words (body message and/or reason phrase) of an answered call; empty
    /// otherwise.
    pub fn message(&self) -> &str {
        match self {
            Error::Status { message, .. } => message,
            _ => "",
        }
    }

    /// True when the server may have carried out the request although no success came back:
    /// a timeout, a connection lost after sending, or a 5xx (a proxy timing out). A create
    /// that fails like this must look for what it may have made.
    pub fn may_have_acted(&self) -> bool {
        match self {
            Error::Timeout { .. } => true,
            Error::Transport { connect, .. } => !connect,
            Error::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }
}

/// Turns a failed call into the driver error class; also decides retries (only
/// [`driver::Error::Unavailable`], [`driver::Error::Timeout`] and
/// [`driver::Error::RateLimited`] are retried).
pub type Classify = fn(&Error) -> driver::Error;

/// Reads the error message out of an error body; `None` when it holds none.
pub type ErrorMessage = fn(&[u8]) -> Option<String>;

/// The common status table. Drivers re-map what their API means differently, then call this.
pub fn classify(e: &Error) -> driver::Error {
    let text = e.to_string();
    match e {
        Error::Url { .. } | Error::Header { .. } => driver::Error::InvalidRequest(text),
        Error::Timeout { .. } => driver::Error::Timeout(text),
        Error::Transport { .. } => driver::Error::Unavailable(text),
        Error::Decode { .. } => driver::Error::Other(text),
        Error::Status { status, retry_after, .. } => match *status {
            401 | 403 => driver::Error::Unauthorized(text),
            404 => driver::Error::NotFound(text),
            400 | 409 | 422 => driver::Error::InvalidRequest(text),
            429 => driver::Error::RateLimited { message: text, retry_after: *retry_after },
            s if s >= 500 => driver::Error::Unavailable(text),
            _ => driver::Error::Other(text),
        },
    }
}

impl From<Error> for driver::Error {
    /// The common table; drivers with their own [`Classify`] call it instead.
    fn from(e: Error) -> driver::Error {
        classify(&e)
    }
}

/// The message of a JSON error body as most cloud APIs write it: a top-level `message`
/// (PVE, Kamatera), a string `error` or `detail`, or one level down
/// (`{"badRequest": {"message": ...}}`, Nova; `{"error": {"message": ...}}`, Keystone). A body
/// that is not JSON is taken as text.
pub fn json_error_message(body: &[u8]) -> Option<String> {
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(map)) => {
            for key in ["message", "error", "detail", "title"] {
                if let Some(m) = map.get(key).and_then(Value::as_str).filter(|m| !m.trim().is_empty()) {
                    return Some(m.trim().to_owned());
                }
            }
            map.values()
                .filter_map(|v| v.get("message").and_then(Value::as_str))
                .find(|m| !m.trim().is_empty())
                .map(|m| m.trim().to_owned())
        }
        Ok(Value::String(s)) if !s.trim().is_empty() => Some(s.trim().to_owned()),
        Ok(_) => None,
        Err(_) => {
            let text = String::from_utf8_lossy(body);
            let text = text.trim();
            (!text.is_empty()).then(|| text.to_owned())
        }
    }
}

/// The message of an error answer: the body's, the reason phrase when it says more than the
/// status (`500 unable to create VM 100: ...`), both when they differ.
fn status_message(status: StatusCode, body_message: Option<String>, reason: Option<&str>) -> String {
    let reason = reason.map(str::trim).filter(|r| !r.is_empty() && Some(*r) != status.canonical_reason());
    let message = match (body_message, reason) {
        (Some(m), Some(r)) if !m.contains(r) => format!("{m} ({r})"),
        (Some(m), _) => m,
        (None, Some(r)) => r.to_owned(),
        (None, None) => status.canonical_reason().unwrap_or("no message").to_owned(),
    };
    truncate(&message)
}

fn truncate(text: &str) -> String {
    if text.chars().count() <= MAX_MESSAGE_CHARS {
        text.to_owned()
    } else {
        let mut t: String = text.chars().take(MAX_MESSAGE_CHARS).collect();
        t.push_str("...");
        t
    }
}

/// Whether `url` is to a loopback address: `127.0.0.0/8`, `::1` (also IPv4-mapped), or the
/// name `localhost` itself (not `localhost.example.com`).
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(a)) => a.is_loopback(),
        Some(url::Host::Ipv6(a)) => a.is_loopback() || a.to_ipv4_mapped().is_some_and(|v4| v4.is_loopback()),
        Some(url::Host::Domain(d)) => {
            let d = d.trim_end_matches('.');
            d.eq_ignore_ascii_case("localhost") || d.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        }
        None => false,
    }
}

/// Parses a cloud API URL and checks it may be used: `https://`, or `http://` only to a
/// loopback address unless `allow_plain_http`; never with credentials in it.
pub fn check_url(text: &str, allow_plain_http: bool) -> Result<Url, UrlError> {
    let url = Url::parse(text.trim()).map_err(|e| UrlError::Invalid(e.to_string()))?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err(UrlError::Credentials);
    }
    match url.scheme() {
        "https" => Ok(url),
        "http" if allow_plain_http || is_loopback(&url) => Ok(url),
        "http" => Err(UrlError::PlainHttp { host: url.host_str().unwrap_or_default().to_owned() }),
        other => Err(UrlError::Scheme(other.to_owned())),
    }
}

/// How idempotent calls are retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Tries in all, the first included (1: no retry).
    pub attempts: u32,
    /// The first backoff; each next one doubles, up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// The longest `Retry-After` waited for; a server asking for longer gets its error passed
    /// on at once (with `retry_after`, for the caller to decide).
    pub max_retry_after: Duration,
}

impl Retry {
    /// No retries at all.
    pub const NONE: Retry =
        Retry { attempts: 1, base_delay: Duration::ZERO, max_delay: Duration::ZERO, max_retry_after: Duration::ZERO };

    /// The backoff before try number `attempt + 1` (`attempt` counts from 1): exponential,
    /// with full jitter in its upper half so that clients that failed together do not retry
    /// together.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << attempt.saturating_sub(1).min(16));
        let d = exp.min(self.max_delay);
        let half = d / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

impl Default for Retry {
    /// Three tries, 250 ms then 500 ms (jittered), `Retry-After` honoured up to 20 s.
    fn default() -> Retry {
        Retry {
            attempts: 3,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(20),
        }
    }
}

/// How to build a [`Client`]. [`Settings::new`] gives the defaults; setters change one thing.
#[derive(Clone, Debug)]
pub struct Settings {
    pub trust: Trust,
    /// Whole request, body included.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Lets `http://` reach hosts that are not loopback: an explicit opt-in of the user.
    pub allow_plain_http: bool,
    pub retry: Retry,
    pub classify: Classify,
    pub error_message: ErrorMessage,
}

impl Settings {
    /// 30 s per request, 10 s to connect, default retries, the common status table.
    pub fn new(trust: Trust) -> Settings {
        Settings {
            trust,
            timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(10),
            allow_plain_http: false,
            retry: Retry::default(),
            classify,
            error_message: json_error_message,
        }
    }

    #[must_use]
    pub fn timeout(mut self, timeout: Duration) -> Settings {
        self.timeout = timeout;
        self
    }

    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> Settings {
        self.connect_timeout = timeout;
        self
    }

    #[must_use]
    pub fn allow_plain_http(mut self, allow: bool) -> Settings {
        self.allow_plain_http = allow;
        self
    }

    #[must_use]
    pub fn retry(mut self, retry: Retry) -> Settings {
        self.retry = retry;
        self
    }

    /// The driver's status table (see [`Classify`]).
    #[must_use]
    pub fn classify(mut self, classify: Classify) -> Settings {
        self.classify = classify;
        self
    }

    /// How the API writes its error bodies (see [`ErrorMessage`]).
    #[must_use]
    pub fn error_message(mut self, error_message: ErrorMessage) -> Settings {
        self.error_message = error_message;
        self
    }
}

/// A client of one cloud API. Cheap to clone (the connection pool is shared).
#[derive(Clone)]
pub struct Client {
    inner: reqwest::Client,
    settings: Settings,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("timeout", &self.settings.timeout)
            .field("allow_plain_http", &self.settings.allow_plain_http)
            .field("retry", &self.settings.retry)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(settings: Settings) -> Result<Client, BuildError> {
        let tls = tls::client_config(&settings.trust)?;
        let inner = reqwest::Client::builder()
            .use_preconfigured_tls(tls)
            .timeout(settings.timeout)
            .connect_timeout(settings.connect_timeout)
            .user_agent(concat!("flotilla/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| BuildError::Client(error_chain(&e)))?;
        Ok(Client { inner, settings })
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// The driver's class of a failed call (the same one retries were decided by).
    pub fn classify(&self, e: &Error) -> driver::Error {
        (self.settings.classify)(e)
    }

    /// Checks `url` against this client's plain-http rule.
    pub fn check_url(&self, url: &str) -> Result<Url, UrlError> {
        check_url(url, self.settings.allow_plain_http)
    }

    pub fn request(&self, method: Method, url: impl Into<String>) -> Request<'_> {
        Request {
            client: self,
            method,
            url: url.into(),
            label: None,
            headers: HeaderMap::new(),
            broken_header: None,
            query: Vec::new(),
            body: None,
            idempotent: false,
            retry: None,
            timeout: None,
        }
    }

    pub fn get(&self, url: impl Into<String>) -> Request<'_> {
        self.request(Method::GET, url)
    }

    pub fn post(&self, url: impl Into<String>) -> Request<'_> {
        self.request(Method::POST, url)
    }

    pub fn put(&self, url: impl Into<String>) -> Request<'_> {
        self.request(Method::PUT, url)
    }

    pub fn delete(&self, url: impl Into<String>) -> Request<'_> {
        self.request(Method::DELETE, url)
    }
}

#[derive(Clone)]
enum Body {
    Json(Vec<u8>),
    Form(String),
}

/// One call being built; [`Request::send`] sends it (again, for an idempotent call that
/// failed transiently).
#[must_use = "a request does nothing until sent"]
pub struct Request<'c> {
    client: &'c Client,
    method: Method,
    url: String,
    label: Option<String>,
    headers: HeaderMap,
    broken_header: Option<String>,
    query: Vec<(String, String)>,
    body: Option<Body>,
    idempotent: bool,
    retry: Option<Retry>,
    timeout: Option<Duration>,
}

impl Request<'_> {
    /// Names the call in messages (default: method and URL path).
    pub fn label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// Adds a header. Its value never appears in messages or debug output.
    pub fn header(mut self, name: &'static str, value: impl AsRef<str>) -> Self {
        match (HeaderName::from_bytes(name.as_bytes()), HeaderValue::from_str(value.as_ref())) {
            (Ok(n), Ok(mut v)) => {
                v.set_sensitive(true);
                self.headers.append(n, v);
            }
            _ => self.broken_header = Some(name.to_owned()),
        }
        self
    }

    /// Adds query parameters (a key may repeat).
    pub fn query<K: AsRef<str>, V: AsRef<str>>(mut self, pairs: &[(K, V)]) -> Self {
        self.query.extend(pairs.iter().map(|(k, v)| (k.as_ref().to_owned(), v.as_ref().to_owned())));
        self
    }

    /// A JSON body (`Content-Type: application/json`).
    pub fn json(mut self, body: &Value) -> Self {
        self.body = Some(Body::Json(serde_json::to_vec(body).unwrap_or_default()));
        self
    }

    /// A form body (`application/x-www-form-urlencoded`), keys in order, repeats kept.
    pub fn form<K: AsRef<str>, V: AsRef<str>>(mut self, pairs: &[(K, V)]) -> Self {
        let mut s = form_urlencoded::Serializer::new(String::new());
        for (k, v) in pairs {
            s.append_pair(k.as_ref(), v.as_ref());
        }
        self.body = Some(Body::Form(s.finish()));
        self
    }

    /// Declares the call safe to repeat (a read, a PUT of the same state, a delete whose
    /// repeat is harmless): transient failures are then retried. Never for a create.
    pub fn idempotent(mut self) -> Self {
        self.idempotent = true;
        self
    }

    /// Overrides the client's retry policy for this call ([`Retry::NONE`] to fail fast).
    pub fn retry(mut self, retry: Retry) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Overrides the client's request timeout for this call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Sends the call, retrying an idempotent one on transient failures; any answer outside
    /// 2xx is an [`Error::Status`].
    pub async fn send(self) -> Result<Response, Error> {
        let settings = &self.client.settings;
        let url = Url::parse(self.url.trim());
        let what = match (&self.label, &url) {
            (Some(l), _) => l.clone(),
            (None, Ok(u)) => format!("{} {}", self.method, u.path()),
            (None, Err(_)) => self.method.to_string(),
        };
        let url = self.client.check_url(&self.url).map_err(|source| Error::Url { what: what.clone(), source })?;
        if let Some(name) = &self.broken_header {
            return Err(Error::Header { what, name: name.clone() });
        }
        let policy = self.retry.unwrap_or(settings.retry);
        let attempts = if self.idempotent { policy.attempts.max(1) } else { 1 };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let err = match self.once(&url, &what).await {
                Ok(response) => return Ok(response),
                Err(e) => e,
            };
            if attempt >= attempts {
                return Err(err);
            }
            let asked = match &err {
                Error::Status { retry_after, .. } => *retry_after,
                _ => None,
            };
            let delay = match (settings.classify)(&err) {
                driver::Error::Unavailable(_) | driver::Error::Timeout(_) | driver::Error::RateLimited { .. } => {
                    match asked {
                        Some(d) if d > policy.max_retry_after => return Err(err),
                        Some(d) => d,
                        None => policy.backoff(attempt),
                    }
                }
                _ => return Err(err),
            };
            tracing::debug!(call = %what, attempt, ?delay, error = %err, "retrying an idempotent call");
            tokio::time::sleep(delay).await;
        }
    }

    async fn once(&self, url: &Url, what: &str) -> Result<Response, Error> {
        let settings = &self.client.settings;
        let mut request = self.client.inner.request(self.method.clone(), url.clone()).headers(self.headers.clone());
        if !self.query.is_empty() {
            request = request.query(&self.query);
        }
        match &self.body {
            Some(Body::Json(bytes)) => {
                request = request.header("Content-Type", "application/json").body(bytes.clone());
            }
            Some(Body::Form(text)) => {
                request = request.header("Content-Type", "application/x-www-form-urlencoded").body(text.clone());
            }
            None => {}
        }
        let limit = self.timeout.unwrap_or(settings.timeout);
        if let Some(t) = self.timeout {
            request = request.timeout(t);
        }
        let fail = |e: reqwest::Error| {
            if e.is_timeout() {
                Error::Timeout { what: what.to_owned(), limit }
            } else {
                Error::Transport { what: what.to_owned(), connect: e.is_connect(), detail: error_chain(&e) }
            }
        };
        let response = request.send().await.map_err(fail)?;
        let status = response.status();
        let reason = response
            .extensions()
            .get::<hyper::ext::ReasonPhrase>()
            .map(|r| String::from_utf8_lossy(r.as_bytes()).into_owned());
        let headers = response.headers().clone();
        let body = response.bytes().await.map_err(fail)?;
        if !status.is_success() {
            let message = status_message(status, (settings.error_message)(&body), reason.as_deref());
            return Err(Error::Status {
                what: what.to_owned(),
                status: status.as_u16(),
                message,
                retry_after: retry_after(&headers),
                body,
            });
        }
        Ok(Response { status, headers, body, what: what.to_owned() })
    }
}

/// A successful answer, read whole.
#[derive(Debug)]
pub struct Response {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    what: String,
}

impl Response {
    /// The body as JSON.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, Error> {
        serde_json::from_slice(&self.body).map_err(|source| Error::Decode { what: self.what.clone(), source })
    }

    /// A response header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// `Retry-After` in seconds or as an HTTP date.
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let text = headers.get("Retry-After")?.to_str().ok()?.trim();
    if let Ok(secs) = text.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO))
}

/// An error and its causes, `: `-joined, without the URL reqwest puts in its own message.
fn error_chain(e: &reqwest::Error) -> String {
    let mut text = e.to_string();
    if let Some(url) = e.url() {
        // reqwest writes "... for url (URL)": the URL may hold a token in its query.
        text = text.replace(&format!(" for url ({url})"), "").replace(url.as_str(), "<url>");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests;
