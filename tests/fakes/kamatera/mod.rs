//! A fake of the Kamatera API behind `cloudcli.cloudwm.com`, on loopback.
//!
//! Written from the code of that server (github.com/cloudwm/cloudcli-server: `routes/api.php`,
//! `app/Cloudcli/*.php`, `cli_schema/commands/**`), which is a Laravel proxy in front of
//! Kamatera's console API. What the fake reproduces, and where it comes from:
//!
//! * **Routes** (`cli_schema`): `GET /service/servers`, `POST /server/tags`,
//!   `POST /service/server` (create), `POST /service/server/terminate`,
//!   `POST /service/server/poweron|poweroff`, `GET /service/queue?id=`, `GET /svc/queue`.
//! * **Request keys** (`ProxyServerPost::getFieldValues`): only the keys a command's schema
//!   lists are read; anything else (e.g. `billingCycle`, which the in-tree provider sends) is
//!   silently ignored by the real server, and recorded here as a problem so a test fails on it.
//!   Defaults for empty values (`cpu` 1B, `billingcycle` hourly, `monthlypackage` t5000, ...)
//!   come from `create.json`.
//! * **Array fields** (`getPostMultipartArrayField`): `disk` and `network` are one string,
//!   items separated by spaces, each `key=value,key=value` with ids 0..3.
//! * **Errors and their status** (`BaseServerRequest::handleRequest`): a flag error is
//!   `400 {"message": "missing required flag (name)"}`; an exception inside a command (an
//!   invalid `billingcycle`, an unknown image name, ...) is `500 {"message": "Failed to run
//!   command method (createServer)"}` (production runs with `APP_DEBUG` off); a backend error
//!   on a create keeps the backend's status with `{"json_decode_error": null, "message": "<info>
//!   (<code>)"}`; on the server listing the backend's error body is passed through **with
//!   status 200**; a lookup by name that matches nothing is `500 {"message": "No servers found
//!   (name='...')"}`.
//! * **Command ids** (`returnProxyHttpPostJsonResponse`): `["<id>"]`, or `{"commandIds":
//!   ["<id>"], "password": "<generated>"}` when the password is `__generate__`.
//! * **The queue** (`queue/detail.json`): `[{"id", "status", "server", "description", "added",
//!   "executed", "completed", "log"}]`; `status` is `complete` or `error` when done. The values
//!   while a command runs are not published: the fake says `pending`, then `running`.
//!   `GET /svc/queue` (`queue/list.json`) lists recent commands with `commandInfo` (`Create
//!   Server` for creates, as Kamatera's own cloudcli-server-kubernetes matches it) and
//!   `serviceName` (the server name).
//! * **Tags** (`server/tags.json`, `ProxyServerHttpPostMethods`): `POST /server/tags` with `id`
//!   or `name` lists a server's tags as `[{"id", "tagName"}]`; with `add` (or `remove`) it first
//!   runs a pre-post action against the backend (`POST /svc/tags {objectType: ot.server,
//!   objectId, tagName}`, which creates the account's tag when it is new; `DELETE
//!   /svc/tags/ot.server/<id>/<tag>`) and then answers with the tags after it. A backend refusal
//!   there is `500 {"message": "<the backend's JSON>"}`. The backend's own tag rules are not
//!   published: the fake accepts 3 to 24 characters of `[A-Za-z0-9-_ .]` (what the in-tree
//!   provider's 15-character names under an 8-character prefix imply) and treats adding a tag a
//!   server has as a no-op.
//! * **One command at a time per server** (as Kamatera's queue runs them): a command on a
//!   server with one unfinished waits for it; a terminate or power command whose server is gone
//!   when it runs ends in `error` (the wording is not published).
//! * **Credentials**: the proxy forwards `AuthClientId`/`AuthSecret` to the backend (without them
//!   it would use its own account: recorded as a problem). The backend's answer to bad
//!   credentials is not published; the fake's backend answers `401 {"errors": [{"info":
//!   "Authentication failed"}]}`, and each route relays it as the proxy's code does.
//!
//! Faults: besides the knobs in [`Faults`], [`Fake::fault_next`] refuses, hangs, or loses the
//! answer of (after acting on) the next call matching a route, a body key and a server.
//!
//! Everything the fake does not expect is a problem that `assert_clean` fails on.
#![allow(dead_code, reason = "each test uses a different subset of the fake's knobs")]

#[path = "../serve.rs"]
#[allow(clippy::duplicate_mod, reason = "each fake is also used alone, so each declares the shared helper")]
mod loopback;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, to_bytes},
    http::{Request, Response},
};
use serde_json::{Map, Value, json};

pub const CLIENT_ID: &str = "0c0ffee0c0ffee0c0ffee0c0ffee0c0f";
pub const SECRET: &str = "9e1f3c2a5b7d4e6f8a0b1c2d3e4f5a6b";
/// What the fake's backend says to bad credentials (not published by Kamatera).
pub const AUTH_FAILED: &str = "Authentication failed";

/// Keys `POST /service/server` reads (`create.json`, `run.fields`).
const CREATE_KEYS: &[&str] = &[
    "name",
    "password",
    "datacenter",
    "image",
    "cpu",
    "ram",
    "disk",
    "dailybackup",
    "managed",
    "network",
    "quantity",
    "billingcycle",
    "monthlypackage",
    "poweronaftercreate",
    "ssh-key",
    "script-file",
    "userdata-file",
    "tag",
];

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Option<Value>,
    pub authorized: bool,
    /// When it arrived.
    pub at: Instant,
}

impl Recorded {
    pub fn key(&self, key: &str) -> Option<&Value> {
        self.body.as_ref().and_then(|b| b.get(key))
    }
}

#[derive(Clone, Debug)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub datacenter: String,
    /// `on` or `off`.
    pub power: String,
    pub tags: Vec<String>,
    /// Tags set when the create command finishes (see [`Faults::tags_at_completion`]).
    pub pending_tags: Vec<String>,
    /// The create request, for servers made through the API.
    pub create_body: Option<Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Create,
    Terminate,
    PowerOn,
    PowerOff,
}

impl Kind {
    fn info(self) -> &'static str {
        match self {
            Kind::Create => "Create Server",
            Kind::Terminate => "Terminate Server",
            Kind::PowerOn => "Power On Server",
            Kind::PowerOff => "Power Off Server",
        }
    }
}

#[derive(Clone, Debug)]
pub struct Command {
    pub id: u64,
    pub kind: Kind,
    pub server: String,
    pub server_id: String,
    added: Instant,
    starts_at: Instant,
    done_at: Instant,
    /// The log of a command that ends in `error`.
    failure: Option<String>,
    /// For a failed create: whether Kamatera removes the half-made server.
    remove_on_failure: bool,
    started: bool,
    finished: bool,
}

impl Command {
    /// When it finishes (or finished).
    pub fn done_at(&self) -> Instant {
        self.done_at
    }

    pub fn status(&self, now: Instant) -> &'static str {
        if now >= self.done_at {
            if self.failure.is_some() { "error" } else { "complete" }
        } else if now >= self.starts_at {
            "running"
        } else {
            "pending"
        }
    }
}

/// How a create's answer goes missing after the fake acted on it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lose {
    /// The answer comes after this long (longer than the client waits).
    Late(Duration),
    /// A load balancer's 502 with an HTML page.
    BadGateway,
}

/// Faults and timings a test sets.
#[derive(Debug)]
pub struct Faults {
    /// Added before every answer.
    pub latency: Duration,
    /// How long a command stays `pending` before it runs.
    pub pending_time: Duration,
    /// How long a command runs.
    pub run_time: Duration,
    /// A created server shows in the listing once its command runs (powered off), or only
    /// once it completed.
    pub visible_while_running: bool,
    /// Tags are attached when the create finishes instead of when the server appears.
    pub tags_at_completion: bool,
    /// The next creates' commands fail late with this log; `true` removes the server.
    pub fail_creates: Vec<(String, bool)>,
    /// The next create is refused by the backend: status and `info`.
    pub reject_create: Option<(u16, String)>,
    /// The next create is carried out but its answer is lost.
    pub lose_create: Option<Lose>,
    /// Every create's answer (success or error) comes this late: a create call in flight.
    pub create_answer_delay: Duration,
    /// Servers in the account the backend allows before creates fail with a quota error.
    pub quota: Option<usize>,
    /// Command ids whose queue lookup answers `[]`.
    pub empty_queue_for: Vec<u64>,
    /// The next answers to (method, path) are replaced: status and raw body.
    pub inject: Vec<(String, String, u16, String)>,
    /// The next server listing is taken when it arrives but answered only once this is
    /// released (a listing that lands while a create or delete is in flight).
    pub hold_listing: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Faults for the next calls that match, in order (see [`Fake::fault_next`]).
    pub armed: Vec<Armed>,
}

/// What happens to a call a test picked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallFault {
    /// Refused before the API does anything, with this status and raw body.
    Fail(u16, String),
    /// No answer, before the API does anything: the caller's timeout ends it.
    Hang,
    /// The API acts, then a load balancer answers 504: the answer is lost.
    LoseAnswer,
    /// The API acts, then no answer comes.
    HangAfter,
}

/// A fault waiting for its call.
#[derive(Clone, Debug)]
pub struct Armed {
    pub method: String,
    pub path: String,
    /// The body must have this key (e.g. `add` for tag changes).
    pub with_key: Option<String>,
    /// The call must name this server (by id or name).
    pub server: Option<String>,
    pub fault: CallFault,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency: Duration::ZERO,
            pending_time: Duration::from_millis(20),
            run_time: Duration::from_millis(60),
            visible_while_running: true,
            tags_at_completion: false,
            fail_creates: Vec::new(),
            reject_create: None,
            lose_create: None,
            create_answer_delay: Duration::ZERO,
            quota: None,
            empty_queue_for: Vec::new(),
            inject: Vec::new(),
            hold_listing: None,
            armed: Vec::new(),
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub servers: Vec<Server>,
    pub commands: BTreeMap<u64, Command>,
    /// Images per datacenter: (id, description).
    pub images: BTreeMap<String, Vec<(String, String)>>,
    pub requests: Vec<Recorded>,
    /// Anything the fake did not expect: a test fails on it.
    pub problems: Vec<String>,
    /// Requests refused for bad credentials.
    pub rejected: u32,
    pub faults: Faults,
    next_command: u64,
    next_server: u64,
    /// Creates whose servers have not appeared yet (a pending command): name -> body.
    waiting: BTreeMap<u64, (Server, Vec<String>)>,
}

impl State {
    /// Applies the effects of commands whose time has come.
    fn settle(&mut self) {
        let now = Instant::now();
        let ids: Vec<u64> = self.commands.keys().copied().collect();
        for id in ids {
            let c = self.commands[&id].clone();
            if !c.started && now >= c.starts_at {
                self.commands.get_mut(&id).unwrap().started = true;
                if c.kind == Kind::Create && self.faults.visible_while_running {
                    self.appear(id);
                }
                if c.kind != Kind::Create && !self.servers.iter().any(|s| s.id == c.server_id) {
                    // Its server went while it waited (e.g. a terminate queued behind another).
                    let c = self.commands.get_mut(&id).unwrap();
                    c.failure = Some(format!("Server {} not found", c.server));
                    c.done_at = c.starts_at;
                }
            }
            let c = self.commands[&id].clone();
            if !c.finished && now >= c.done_at {
                self.commands.get_mut(&id).unwrap().finished = true;
                match c.kind {
                    Kind::Create => {
                        self.appear(id);
                        if c.failure.is_some() {
                            if c.remove_on_failure {
                                self.servers.retain(|s| s.id != c.server_id);
                            }
                        } else if let Some(s) = self.servers.iter_mut().find(|s| s.id == c.server_id) {
                            s.power = "on".into();
                            let pending = std::mem::take(&mut s.pending_tags);
                            s.tags.extend(pending);
                        }
                    }
                    Kind::Terminate if c.failure.is_none() => self.servers.retain(|s| s.id != c.server_id),
                    Kind::PowerOn | Kind::PowerOff if c.failure.is_none() => {
                        if let Some(s) = self.servers.iter_mut().find(|s| s.id == c.server_id) {
                            s.power = if c.kind == Kind::PowerOn { "on" } else { "off" }.into();
                        }
                    }
                    _ => {}
                }
            }
        }
    }

    /// Puts the server of create command `id` into the listing (powered off).
    fn appear(&mut self, id: u64) {
        if let Some((server, tags)) = self.waiting.remove(&id) {
            let mut server = server;
            if self.faults.tags_at_completion {
                server.pending_tags = tags;
            } else {
                server.tags = tags;
            }
            self.servers.push(server);
        }
    }

    fn command(&mut self, kind: Kind, server: &Server) -> u64 {
        self.next_command += 1;
        let id = 4_500_000 + self.next_command;
        let now = Instant::now();
        // One command at a time per server: this one starts when the last unfinished one ends.
        let busy_until = self
            .commands
            .values()
            .filter(|c| c.server_id == server.id && !c.finished)
            .map(|c| c.done_at)
            .max()
            .unwrap_or(now);
        let starts_at = (now + self.faults.pending_time).max(busy_until);
        let (failure, remove_on_failure) = if kind == Kind::Create && !self.faults.fail_creates.is_empty() {
            let (log, remove) = self.faults.fail_creates.remove(0);
            (Some(log), remove)
        } else {
            (None, false)
        };
        self.commands.insert(
            id,
            Command {
                id,
                kind,
                server: server.name.clone(),
                server_id: server.id.clone(),
                added: now,
                starts_at,
                done_at: starts_at + self.faults.run_time,
                failure,
                remove_on_failure,
                started: false,
                finished: false,
            },
        );
        id
    }

    fn new_server_id(&mut self) -> String {
        self.next_server += 1;
        format!("6000C29{:025x}", 0xa11ce_u64 * 1000 + self.next_server)
    }

    /// Adds a server that already exists (made by hand, by the in-tree provider, ...).
    pub fn add_server(&mut self, name: &str, power: &str, tags: &[&str]) -> String {
        let id = self.new_server_id();
        self.servers.push(Server {
            id: id.clone(),
            name: name.into(),
            datacenter: "EU".into(),
            power: power.into(),
            tags: tags.iter().map(|t| (*t).to_owned()).collect(),
            pending_tags: Vec::new(),
            create_body: None,
        });
        id
    }

    pub fn server(&self, name: &str) -> Option<&Server> {
        self.servers.iter().find(|s| s.name == name)
    }

    /// The recorded requests with this method and path.
    pub fn calls(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests.iter().filter(|r| r.method == method && r.path == path).cloned().collect()
    }

    /// The command of this kind for server `name`, newest first.
    pub fn command_for(&self, kind: Kind, name: &str) -> Option<&Command> {
        self.commands.values().rev().find(|c| c.kind == kind && c.server == name)
    }
}

pub struct Fake {
    pub addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn reply(status: u16, body: &Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// `handleRequest`'s answer to an exception inside a command (production: no details).
fn exception(method: &str) -> Response<Body> {
    reply(500, &json!({ "message": format!("Failed to run command method ({method})") }))
}

/// `_getInvalidFlagError`: 400 with the flag named.
fn flag_error(message: &str, name: &str, value: &str) -> Response<Body> {
    let m = if value.is_empty() { format!("{message} ({name})") } else { format!("{message} ({name}={value})") };
    reply(400, &json!({ "message": m }))
}

/// A backend error relayed by a POST route: the backend's status, `{"json_decode_error":
/// null, "message": "<info>"}`.
fn relayed(status: u16, info: &str) -> Response<Body> {
    reply(status, &json!({ "json_decode_error": null, "message": info }))
}

impl Fake {
    /// A fake account with images `ubuntu_server_24.04_64-bit` in EU and US-NY2.
    pub async fn start() -> Fake {
        let mut state = State::default();
        for dc in ["EU", "US-NY2"] {
            state.images.insert(
                dc.into(),
                vec![
                    (format!("{dc}:6000C2987c9f7b9e5b1d6b5e2a1f0001"), "ubuntu_server_24.04_64-bit".into()),
                    (format!("{dc}:6000C2987c9f7b9e5b1d6b5e2a1f0002"), "debian_server_12_64-bit".into()),
                ],
            );
        }
        let state = Arc::new(Mutex::new(state));
        let (addr, server) = loopback::serve(&state, handle).await;
        Fake { addr, state, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// The state after applying every command that is due.
    pub fn settled(&self) -> MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap();
        s.settle();
        s
    }

    /// Fails the test if the fake saw anything it did not expect.
    pub fn assert_clean(&self) {
        let s = self.state();
        assert!(s.problems.is_empty(), "the fake Kamatera API saw unexpected requests:\n{}", s.problems.join("\n"));
    }

    /// Starts every pending command now (their run time unchanged).
    pub fn start_commands(&self) {
        let now = Instant::now();
        let mut s = self.state();
        for c in s.commands.values_mut().filter(|c| !c.started) {
            let run = c.done_at.saturating_duration_since(c.starts_at);
            c.starts_at = now;
            c.done_at = now + run;
        }
    }

    /// Finishes every command now (as it was going to end: complete, or its failure).
    pub fn finish_commands(&self) {
        let now = Instant::now();
        let mut s = self.state();
        for c in s.commands.values_mut().filter(|c| !c.finished) {
            c.starts_at = c.starts_at.min(now);
            c.done_at = now;
        }
    }

    /// Arms `fault` for the next `method path` call whose body has `with_key` and names `server`
    /// (by id or name), when given.
    pub fn fault_next(&self, method: &str, path: &str, with_key: Option<&str>, server: Option<&str>, fault: CallFault) {
        self.state().faults.armed.push(Armed {
            method: method.into(),
            path: path.into(),
            with_key: with_key.map(str::to_owned),
            server: server.map(str::to_owned),
            fault,
        });
    }

    /// Holds the next server listing (taken on arrival) until the returned sender fires.
    pub fn hold_next_listing(&self) -> tokio::sync::oneshot::Sender<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.state().faults.hold_listing = Some(rx);
        tx
    }
}

/// An answer, possibly held back (the fake's lock is released before any wait).
enum Answer {
    Now(Response<Body>),
    /// A listing taken at arrival, sent once the test releases it.
    Held(tokio::sync::oneshot::Receiver<()>, Response<Body>),
    /// Sent after this long.
    Late(Duration, Response<Body>),
    /// Never sent.
    Hang,
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Body>) -> Response<Body> {
    let latency = state.lock().unwrap().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let answer = answer(&mut state.lock().unwrap(), &parts, &bytes);
    match answer {
        Answer::Now(r) => r,
        Answer::Held(rx, r) => {
            let _ = rx.await;
            r
        }
        Answer::Late(d, r) => {
            tokio::time::sleep(d).await;
            r
        }
        Answer::Hang => std::future::pending().await,
    }
}

/// The armed fault this call triggers, taken off the list.
fn take_armed(s: &mut State, method: &str, path: &str, body: &Option<Value>) -> Option<CallFault> {
    let named = |server: &str| {
        let Some(b) = body else { return false };
        let text = |k: &str| b.get(k).and_then(Value::as_str).map(str::to_owned);
        let id = s.servers.iter().find(|v| v.name == server).map(|v| v.id.clone());
        text("name").as_deref() == Some(server) || (id.is_some() && text("id") == id)
    };
    let i = s.faults.armed.iter().position(|a| {
        a.method == method
            && a.path == path
            && a.with_key.as_ref().is_none_or(|k| body.as_ref().is_some_and(|b| b.get(k).is_some()))
            && a.server.as_ref().is_none_or(|n| named(n))
    })?;
    Some(s.faults.armed.remove(i).fault)
}

/// A load balancer's answer when the API behind it did not answer in time.
fn gateway_timeout() -> Response<Body> {
    Response::builder()
        .status(504)
        .header("Content-Type", "text/html")
        .body(Body::from("<html><body><h1>504 Gateway Time-out</h1></body></html>"))
        .unwrap()
}

fn answer(s: &mut State, parts: &axum::http::request::Parts, bytes: &[u8]) -> Answer {
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    let query = loopback::query(parts);
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    s.settle();
    // Laravel reads a body as JSON only with its content type.
    let Ok(body) = loopback::json_body(parts, bytes, &mut s.problems) else {
        return Answer::Now(exception("post"));
    };
    let (id_header, secret_header) = (header("authclientid"), header("authsecret"));
    if id_header.is_none() || secret_header.is_none() {
        s.problems.push(format!(
            "{method} {path}: no AuthClientId/AuthSecret headers (the real proxy would act on its own account)"
        ));
    }
    if header("accept").as_deref() != Some("application/json") {
        s.problems.push(format!("{method} {path}: no Accept: application/json"));
    }
    let authorized = id_header.as_deref() == Some(CLIENT_ID) && secret_header.as_deref() == Some(SECRET);
    s.requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: body.clone(),
        authorized,
        at: Instant::now(),
    });
    if let Some(i) = s.faults.inject.iter().position(|(m, p, _, _)| *m == method && *p == path) {
        let (_, _, status, raw) = s.faults.inject.remove(i);
        return Answer::Now(Response::builder().status(status).body(Body::from(raw)).unwrap());
    }
    let armed = take_armed(s, &method, &path, &body);
    match armed {
        Some(CallFault::Fail(status, raw)) => {
            return Answer::Now(Response::builder().status(status).body(Body::from(raw)).unwrap());
        }
        Some(CallFault::Hang) => return Answer::Hang,
        _ => {}
    }
    let answer = route(s, &method, &path, &query, body, authorized);
    match armed {
        Some(CallFault::LoseAnswer) => Answer::Now(gateway_timeout()),
        Some(CallFault::HangAfter) => Answer::Hang,
        _ => answer,
    }
}

/// Acts on one checked and recorded request and answers it.
fn route(
    s: &mut State,
    method: &str,
    path: &str,
    query: &[(String, String)],
    body: Option<Value>,
    authorized: bool,
) -> Answer {
    if !authorized {
        s.rejected += 1;
    }
    let body = body.unwrap_or(Value::Null);
    Answer::Now(match (method, path) {
        ("GET", "/service/servers") => {
            if !authorized {
                // ProxyServerGet passes the backend's error body on, with status 200.
                return Answer::Now(reply(200, &json!({ "errors": [{ "info": AUTH_FAILED }] })));
            }
            let listing: Vec<Value> = s
                .servers
                .iter()
                .map(|v| json!({ "id": v.id, "datacenter": v.datacenter, "name": v.name, "power": v.power }))
                .collect();
            let r = reply(200, &Value::Array(listing));
            return match s.faults.hold_listing.take() {
                Some(rx) => Answer::Held(rx, r),
                None => Answer::Now(r),
            };
        }
        ("POST", "/server/tags") => tags(s, &body, authorized),
        ("POST", "/service/server") => {
            let lose = s.faults.lose_create.take();
            let r = create(s, &body, authorized);
            return match (r.status().as_u16(), lose) {
                (200, Some(Lose::Late(d))) => Answer::Late(d, r),
                _ if !s.faults.create_answer_delay.is_zero() => Answer::Late(s.faults.create_answer_delay, r),
                (200, Some(Lose::BadGateway)) => Answer::Now(
                    Response::builder()
                        .status(502)
                        .header("Content-Type", "text/html")
                        .body(Body::from("<html><body><h1>502 Bad Gateway</h1></body></html>"))
                        .unwrap(),
                ),
                _ => Answer::Now(r),
            };
        }
        ("POST", "/service/server/terminate") => server_command(s, &body, authorized, Kind::Terminate),
        ("POST", "/service/server/poweron") => server_command(s, &body, authorized, Kind::PowerOn),
        ("POST", "/service/server/poweroff") => server_command(s, &body, authorized, Kind::PowerOff),
        ("GET", "/service/queue") => queue_detail(s, query, authorized),
        ("GET", "/svc/queue") => {
            if !authorized {
                return Answer::Now(reply(200, &json!({ "errors": [{ "info": AUTH_FAILED }] })));
            }
            let now = Instant::now();
            let rows: Vec<Value> = s
                .commands
                .values()
                .rev()
                .map(|c| {
                    let status = c.status(now);
                    let done = status == "complete" || status == "error";
                    json!({
                        "id": c.id,
                        "commandInfo": c.kind.info(),
                        "serviceName": c.server,
                        "dtCreate": "2026-11-22T10:00:00",
                        "dtExecute": if status == "pending" { Value::Null } else { json!("2026-11-22T10:00:05") },
                        "dtComplete": if done { json!("2026-11-22T10:03:00") } else { Value::Null },
                        "exitCode": if status == "error" { json!(1) } else if done { json!(0) } else { Value::Null },
                        "progress": if done { 100 } else { 10 },
                    })
                })
                .collect();
            reply(200, &Value::Array(rows))
        }
        _ => {
            s.problems.push(format!("{method} {path}: no such route"));
            // Laravel's own 404 page.
            Response::builder().status(404).body(Body::from("<!doctype html><title>Not Found</title>")).unwrap()
        }
    })
}

/// `id` or `name` of a server request, as `returnProxyHttpMultiServerPostResponse` reads them.
fn target(s: &mut State, body: &Value, path: &str, allowed: &[&str]) -> (Option<String>, Option<String>) {
    let Some(map) = body.as_object() else {
        s.problems.push(format!("{path}: body is not an object"));
        return (None, None);
    };
    for k in map.keys() {
        if !allowed.contains(&k.as_str()) {
            s.problems.push(format!("{path}: key {k:?} is not read by this command"));
        }
    }
    let text = |k: &str| map.get(k).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned);
    let (id, name) = (text("id"), text("name"));
    if let Some(n) = &name
        && n.chars().any(|c| "\\.+*?()|[]{}^$".contains(c))
    {
        // The proxy matches `name` as a regular expression (`preg_match("/^$name$/")`).
        s.problems.push(format!("{path}: name {n:?} would be read as a regular expression"));
    }
    (id, name)
}

/// The servers a request names: by id, or every server whose name matches.
fn matching(s: &State, id: &Option<String>, name: &Option<String>) -> Vec<Server> {
    match (id, name) {
        (Some(id), None) => s.servers.iter().filter(|v| &v.id == id).cloned().collect(),
        (None, Some(n)) => s.servers.iter().filter(|v| &v.name == n).cloned().collect(),
        _ => Vec::new(),
    }
}

fn tags(s: &mut State, body: &Value, authorized: bool) -> Response<Body> {
    let (id, name) = target(s, body, "/server/tags", &["id", "name", "add", "remove"]);
    if id.is_some() == name.is_some() {
        // ProxyServerGetServerIdsException, thrown.
        return exception("serverTags");
    }
    if !authorized {
        return if name.is_some() {
            // The internal listing yields the error body; reading "name" from it throws.
            exception("serverTags")
        } else {
            reply(500, &json!({ "message": AUTH_FAILED }))
        };
    }
    let found = matching(s, &id, &name);
    match found.len() {
        // By id: the backend's GET /service/server/<id> fails; by name: `$serversInfo[0]` of
        // an empty list throws.
        0 if id.is_some() => reply(500, &json!({ "message": "Server not found" })),
        0 => exception("serverTags"),
        1 => {
            let server_id = found[0].id.clone();
            let text = |k: &str| body.get(k).and_then(Value::as_str).filter(|v| !v.is_empty()).map(str::to_owned);
            if let Some(tag) = text("add") {
                // The pre-post action POST /svc/tags; a backend refusal comes back as its JSON.
                let valid = (3..=24).contains(&tag.len())
                    && tag.chars().all(|c| c.is_ascii_alphanumeric() || "-_ .".contains(c));
                if !valid {
                    let backend = json!({ "errors": [{ "code": 1, "info": format!("invalid tag name: {tag}") }] });
                    return reply(500, &json!({ "message": backend.to_string() }));
                }
                let v = s.servers.iter_mut().find(|v| v.id == server_id).unwrap();
                if !v.tags.contains(&tag) {
                    v.tags.push(tag);
                }
            }
            if let Some(tag) = text("remove") {
                s.servers.iter_mut().find(|v| v.id == server_id).unwrap().tags.retain(|t| *t != tag);
            }
            let v = s.servers.iter().find(|v| v.id == server_id).unwrap();
            let rows: Vec<Value> = v.tags.iter().map(|t| json!({ "id": v.id, "tagName": t })).collect();
            reply(200, &Value::Array(rows))
        }
        _ => reply(
            500,
            &json!({ "message": format!("Too many matching servers (name='{}')", name.unwrap_or_default()) }),
        ),
    }
}

fn server_command(s: &mut State, body: &Value, authorized: bool, kind: Kind) -> Response<Body> {
    let path = match kind {
        Kind::Terminate => "/service/server/terminate",
        Kind::PowerOn => "/service/server/poweron",
        _ => "/service/server/poweroff",
    };
    let allowed: &[&str] = if kind == Kind::Terminate { &["id", "name", "force"] } else { &["id", "name"] };
    let (id, name) = target(s, body, path, allowed);
    let method = match kind {
        Kind::Terminate => "terminateServer",
        Kind::PowerOn => "poweronServer",
        _ => "poweroffServer",
    };
    match (&id, &name) {
        (Some(_), Some(_)) | (None, None) => return exception(method),
        _ => {}
    }
    if !authorized {
        return if name.is_some() { exception(method) } else { reply(500, &json!({ "message": AUTH_FAILED })) };
    }
    let found = matching(s, &id, &name);
    if found.is_empty() {
        return match name {
            Some(n) => reply(500, &json!({ "message": format!("No servers found (name='{n}')") })),
            None => reply(500, &json!({ "message": "Server not found" })),
        };
    }
    let force = body.get("force").is_some_and(|f| f == &json!(true) || f == &json!("true"));
    let mut ids = Vec::new();
    for server in found {
        if kind == Kind::Terminate && server.power == "on" && !force {
            return reply(500, &json!({ "message": "Server is powered on, use force to terminate" }));
        }
        ids.push(s.command(kind, &server).to_string());
    }
    reply(200, &json!(ids))
}

fn queue_detail(s: &mut State, query: &[(String, String)], authorized: bool) -> Response<Body> {
    let ids: Vec<&str> = query.iter().filter(|(k, _)| k == "id").flat_map(|(_, v)| v.split(' ')).collect();
    if query.iter().any(|(k, _)| k != "id") {
        s.problems.push(format!("GET /service/queue: unexpected query {query:?}"));
    }
    if ids.is_empty() {
        return reply(400, &json!({ "message": "id is required" }));
    }
    if !authorized {
        return reply(401, &json!({ "json_decode_error": null }));
    }
    let now = Instant::now();
    let mut rows = Vec::new();
    for id in ids.iter().filter(|i| !i.is_empty()) {
        let Some(c) = id.parse::<u64>().ok().and_then(|n| s.commands.get(&n)) else {
            return reply(404, &json!({ "json_decode_error": null }));
        };
        if s.faults.empty_queue_for.contains(&c.id) {
            // An empty backend answer becomes `[]` (`if (!$valueRes) return $valueRes`).
            return reply(200, &json!([]));
        }
        let status = c.status(now);
        let log = match (status, &c.failure) {
            ("error", Some(l)) => l.clone(),
            ("complete", _) => format!("{} {}: done", c.kind.info(), c.server),
            _ => format!("{} {}: in progress", c.kind.info(), c.server),
        };
        rows.push(json!({
            "id": c.id,
            "status": status,
            "server": c.server,
            "description": c.kind.info(),
            "added": "2026-11-22 10:00:00",
            "executed": if status == "pending" { "" } else { "2026-11-22 10:00:05" },
            "completed": if status == "complete" || status == "error" { "2026-11-22 10:03:00" } else { "" },
            "log": log,
        }));
    }
    reply(200, &Value::Array(rows))
}

/// Splits a cloudcli array value (`"size=50 size=100"`) as `getPostMultipartArrayField` does.
#[allow(clippy::result_large_err, reason = "the error is the fake's own HTTP answer, returned at once")]
fn array_field(value: &str, name: &str) -> Result<Vec<Map<String, Value>>, Response<Body>> {
    let mut by_id: BTreeMap<u32, Map<String, Value>> = BTreeMap::new();
    let mut without_id = Vec::new();
    for item in value.split(' ') {
        let mut dict = Map::new();
        for kv in item.split(',') {
            let parts: Vec<&str> = kv.split('=').collect();
            if parts.len() != 2 {
                return Err(flag_error("invalid flag value", name, value));
            }
            dict.insert(parts[0].into(), parts[1].into());
        }
        match dict.get("id").and_then(Value::as_str).map(str::to_owned) {
            Some(id) => {
                let n: u32 = id.parse().unwrap_or(99);
                if n > 3 {
                    return Err(flag_error(&format!("invalid item id: {id}"), name, value));
                }
                if by_id.insert(n, dict).is_some() {
                    return Err(flag_error(&format!("duplicate item id: {id}"), name, value));
                }
            }
            None => without_id.push(dict),
        }
    }
    for slot in 0..4 {
        if !by_id.contains_key(&slot) && !without_id.is_empty() {
            let mut d = without_id.remove(0);
            d.insert("id".into(), slot.to_string().into());
            by_id.insert(slot, d);
        }
    }
    if !without_id.is_empty() {
        return Err(flag_error("invalid item ids", name, value));
    }
    Ok(by_id.into_values().collect())
}

fn create(s: &mut State, body: &Value, authorized: bool) -> Response<Body> {
    let Some(map) = body.as_object() else {
        s.problems.push("POST /service/server: body is not an object".into());
        return exception("createServer");
    };
    for k in map.keys() {
        if !CREATE_KEYS.contains(&k.as_str()) {
            s.problems.push(format!("POST /service/server: key {k:?} is not read by the API (it is ignored)"));
        }
    }
    for (k, v) in map {
        if !(v.is_string() || (k == "quantity" && v.is_number())) {
            s.problems.push(format!("POST /service/server: {k} is {v}, the API reads a string"));
        }
    }
    let get = |k: &str| {
        map.get(k).map(|v| v.as_str().map(str::to_owned).unwrap_or_else(|| v.to_string())).unwrap_or_default()
    };
    // `getPostMultipart`: required flags, then defaults for empty values.
    for required in ["name", "datacenter", "image"] {
        if get(required).is_empty() {
            return flag_error("missing required flag", required, "");
        }
    }
    if get("password").is_empty() && get("ssh-key").is_empty() {
        return flag_error("missing required flag", "password", "");
    }
    let or = |k: &str, d: &str| {
        let v = get(k);
        if v.is_empty() { d.to_owned() } else { v }
    };
    let (disk, network) = (or("disk", "id=0,size=20"), or("network", "id=0,name=wan,ip=auto"));
    let disks = match array_field(&disk, "disk") {
        Ok(d) => d,
        Err(r) => return r,
    };
    let networks = match array_field(&network, "network") {
        Ok(n) => n,
        Err(r) => return r,
    };
    // Post-processing: image, then the values the proxy turns into the backend request.
    let datacenter = get("datacenter");
    let image = get("image");
    if !image.chars().all(|c| c.is_ascii_alphanumeric()) {
        match image.split_once(':') {
            Some((dc, _)) if !image[dc.len() + 1..].contains(':') => {
                if dc != datacenter {
                    return exception("createServer");
                }
            }
            _ => {
                let known = s.images.get(&datacenter).is_some_and(|l| l.iter().any(|(_, d)| d.trim() == image.trim()));
                if !authorized || !known {
                    return exception("createServer");
                }
            }
        }
    }
    if networks.iter().any(|n| n.get("name").and_then(Value::as_str).is_none_or(|v| v.trim().is_empty())) {
        return exception("createServer");
    }
    let billing = or("billingcycle", "hourly").to_ascii_lowercase();
    if !["hourly", "monthly"].contains(&billing.trim()) {
        return exception("createServer");
    }
    for k in ["managed", "dailybackup", "poweronaftercreate"] {
        let v = or(k, "no").to_ascii_lowercase();
        if v != "yes" && v != "no" {
            return exception("createServer");
        }
    }
    if !or("poweronaftercreate", "yes").eq_ignore_ascii_case("yes") {
        s.problems.push("POST /service/server: poweronaftercreate is not yes".into());
    }
    if !authorized {
        return relayed(401, AUTH_FAILED);
    }
    // The backend's checks.
    let cpu = or("cpu", "1B");
    let valid_cpu = cpu.len() >= 2
        && cpu[..cpu.len() - 1].bytes().all(|b| b.is_ascii_digit())
        && "ABDT".contains(&cpu[cpu.len() - 1..]);
    if !valid_cpu {
        return relayed(400, &format!("Invalid cpu value: {cpu}"));
    }
    if or("ram", "1024").parse::<u32>().is_err() {
        return relayed(400, "Invalid ram value");
    }
    if disks.iter().any(|d| d.get("size").and_then(Value::as_str).is_none_or(|v| v.parse::<u32>().is_err())) {
        return relayed(400, "Invalid disk size");
    }
    if let Some((status, info)) = s.faults.reject_create.take() {
        return relayed(status, &info);
    }
    if let Some(q) = s.faults.quota {
        let used = s.servers.len() + s.waiting.len();
        if used >= q {
            return relayed(
                500,
                &format!("Insufficient resources: quota of {q} servers exceeded, contact support to raise it"),
            );
        }
    }
    let password = get("password");
    let generated = password == "__generate__" || (password.is_empty() && !get("ssh-key").is_empty());
    let tags: Vec<String> = get("tag").split(' ').filter(|t| !t.is_empty()).map(str::to_owned).collect();
    let server = Server {
        id: s.new_server_id(),
        name: get("name"),
        datacenter,
        power: "off".into(),
        tags: Vec::new(),
        pending_tags: Vec::new(),
        create_body: Some(body.clone()),
    };
    let id = s.command(Kind::Create, &server);
    s.waiting.insert(id, (server, tags));
    let ids = json!([id.to_string()]);
    if generated && password == "__generate__" {
        reply(200, &json!({ "commandIds": ids, "password": "Kx7fQ2mZp9!a" }))
    } else {
        reply(200, &ids)
    }
}
