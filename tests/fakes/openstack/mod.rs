//! A fake OpenStack: Keystone v3 (password and application-credential tokens, a service
//! catalog, token expiry), Nova (servers with BUILD -> ACTIVE, ERROR faults, quota errors,
//! pagination by `limit` + `marker`, flavors and extra specs, server groups), and the two
//! lookups the driver makes in Glance and Neutron. It follows the OpenStack API reference for
//! paths, status codes and error bodies.
//!
//! Keystone sits under `/identity` as on DevStack, with its version discovery as keystone's
//! `api/discovery.py` serves it: `GET /identity` answers `300 Multiple Choices` with
//! `{"versions": {"values": [...]}}` (or, behind some proxies, `200`; see [`Discovery`]), and
//! `GET /identity/v3` answers `200` with `{"version": {...}}`; each entry links `rel: self` to
//! `<base>/identity/v3/`.
//!
//! Every request is recorded and checked: a missing or unknown token, a Nova request without
//! the compute microversion header, a malformed create body or a path the fake does not serve
//! is a *problem*, answered as OpenStack would (401, 400, 404) and listed by
//! [`Fake::assert_clean`], which every test calls at its end. Latency and faults (any status
//! and body for the next matching requests) can be injected.
#![allow(dead_code, reason = "not every test uses every knob")]

use std::{
    collections::{BTreeMap, HashMap, HashSet, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use base64::Engine;
use serde_json::{Value, json};

pub const USERNAME: &str = "k3s-autoscaler";
pub const PASSWORD: &str = "fairly-s3cret";
pub const USER_DOMAIN: &str = "Default";
pub const PROJECT: &str = "k3s-project";
pub const APP_CRED_ID: &str = "5c4a8a0e1f9b4b1e8a2d3c4b5a6f7e8d";
pub const APP_CRED_SECRET: &str = "app-cred-secret";
pub const MICROVERSION: &str = "2.37";

pub const FLAVOR_ID: &str = "7e1c0a55-0c63-4a8a-9c6e-0b4f1f2e3d4c";
pub const GPU_FLAVOR_ID: &str = "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d";
pub const IMAGE_ID: &str = "c0ffee00-1111-4222-8333-444455556666";
pub const NETWORK_ID: &str = "0e7b5d2a-3c4f-4a5b-9c8d-7e6f5a4b3c2d";
pub const SERVER_GROUP_ID: &str = "a1b2c3d4-e5f6-4a7b-8c9d-0e1f2a3b4c5d";
pub const SG_DEFAULT_ID: &str = "d0d0d0d0-1111-4111-8111-000000000001";
pub const SG_NODES_ID: &str = "d0d0d0d0-1111-4111-8111-000000000002";

/// A Neutron port.
#[derive(Clone, Debug)]
pub struct Port {
    pub id: String,
    pub name: String,
    pub network_id: String,
    /// The server it is bound to.
    pub device_id: Option<String>,
    /// The create body as sent.
    pub body: Value,
}

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub query: BTreeMap<String, String>,
    pub token: Option<String>,
    pub body: Option<Value>,
    /// What the fake answered.
    pub status: u16,
}

#[derive(Clone, Debug)]
pub struct Server {
    pub id: String,
    pub name: String,
    pub metadata: BTreeMap<String, String>,
    pub created: Instant,
    pub fault: Option<String>,
    /// Set by DELETE; the server is gone once `delete_time` has passed.
    pub deleted: Option<Instant>,
    /// `os-stop` accepted at: powering-off for `power_time`, then SHUTOFF.
    pub stopped: Option<Instant>,
    /// `os-start` accepted at (after a stop): powering-on for `power_time`, then ACTIVE.
    pub started: Option<Instant>,
    /// The create body as sent.
    pub body: Value,
}

/// How `GET /identity` (the unversioned Keystone endpoint) answers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Discovery {
    /// Keystone itself: `300 Multiple Choices`, `{"versions": {"values": [v3]}}`.
    #[default]
    MultipleChoices,
    /// A proxy that turns it into `200`, same body.
    Ok,
    /// `200` with `{"versions": [...]}` (the shape of Nova's and Cinder's documents).
    OkList,
    /// Only a v2.0 entry, as a Keystone of before Queens with v3 turned off.
    OnlyV2,
}

/// An answer queued for the next request matching `method` and `path`: the fault hook. New
/// kinds of fault are new fields here and a branch in `handle`.
struct Injected {
    method: Method,
    path: String,
    status: u16,
    body: Value,
    headers: Vec<(&'static str, String)>,
    /// Act on the request first (the cloud did it), then answer this: a lost response.
    act_first: bool,
    /// Never answer (the client times out), after acting if `act_first`.
    hang: bool,
}

struct Inner {
    base: String,
    discovery: Discovery,
    latency: Duration,
    token_lifetime: Duration,
    tokens: HashMap<String, SystemTime>,
    /// (issued, expires) of every token, in issue order.
    token_times: Vec<(SystemTime, SystemTime)>,
    issued: u32,
    build_time: Duration,
    delete_time: Duration,
    /// How long `os-stop` and `os-start` take (Nova works asynchronously).
    power_time: Duration,
    /// Servers in creation order.
    servers: Vec<Server>,
    next_boot_faults: VecDeque<String>,
    quota: Option<usize>,
    /// The next create makes its server but answers 504, as a proxy that timed out would.
    lose_next_create_answer: bool,
    /// 403 (today's Nova) or 413 (older releases) for quota errors.
    quota_status: u16,
    max_limit: usize,
    injected: Vec<Injected>,
    requests: Vec<Request>,
    ports: Vec<Port>,
    /// Ports ever created, for unique ids.
    port_seq: u64,
    problems: Vec<String>,
    key_pairs: HashSet<String>,
    security_groups: HashSet<String>,
    zones: HashSet<String>,
}

/// A running fake; dropped with the test.
#[derive(Clone)]
pub struct Fake {
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    inner: Arc<Mutex<Inner>>,
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_micros(t).to_string()
}

fn error(status: StatusCode, key: &str, message: &str) -> Response {
    (status, axum::Json(json!({ key: { "code": status.as_u16(), "message": message } }))).into_response()
}

fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        axum::Json(json!({ "error": {
            "code": 401, "title": "Unauthorized",
            "message": "The request you have made requires authentication."
        }})),
    )
        .into_response()
}

impl Fake {
    /// A fake over plain HTTP.
    pub async fn start() -> Fake {
        Fake::start_with(false).await
    }

    /// A fake over HTTPS, with a certificate for 127.0.0.1 signed by the test CA in
    /// `tls/ca.pem` (as a private cloud's would be).
    pub async fn start_tls() -> Fake {
        Fake::start_with(true).await
    }

    async fn start_with(tls: bool) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            base: base.clone(),
            discovery: Discovery::default(),
            latency: Duration::ZERO,
            token_lifetime: Duration::from_secs(3600),
            tokens: HashMap::new(),
            token_times: Vec::new(),
            issued: 0,
            build_time: Duration::from_millis(200),
            delete_time: Duration::ZERO,
            power_time: Duration::from_millis(200),
            servers: Vec::new(),
            next_boot_faults: VecDeque::new(),
            quota: None,
            lose_next_create_answer: false,
            quota_status: 403,
            max_limit: 1000,
            injected: Vec::new(),
            requests: Vec::new(),
            ports: Vec::new(),
            port_seq: 0,
            problems: Vec::new(),
            key_pairs: ["k3s-admin".to_owned(), "admin".to_owned()].into(),
            security_groups: ["default".to_owned(), "k3s-nodes".to_owned()].into(),
            zones: ["nova".to_owned(), "az-2".to_owned()].into(),
        }));
        let app = Router::new().fallback(handle).with_state(Arc::clone(&inner));
        if tls {
            let listener = TlsListener { tcp: listener, acceptor: tls_acceptor() };
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        } else {
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        }
        Fake { base, inner }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Keystone's v3 URL, for credentials.
    pub fn auth_url(&self) -> String {
        format!("{}/identity/v3", self.base)
    }

    /// `[clouds.<cloud>.auth]` with this fake's user and project: the password credentials
    /// every test configuration logs in with.
    pub fn auth_table(&self, cloud: &str) -> String {
        format!(
            "[clouds.{cloud}.auth]\nauth_url = \"{}\"\nusername = \"{USERNAME}\"\npassword = \"{PASSWORD}\"\n\
             user_domain_name = \"{USER_DOMAIN}\"\nproject_name = \"{PROJECT}\"\n",
            self.auth_url()
        )
    }

    /// Keystone's unversioned URL, as DevStack's `openrc` and many `clouds.yaml` files give it.
    pub fn unversioned_auth_url(&self) -> String {
        format!("{}/identity", self.base)
    }

    pub fn set_discovery(&self, d: Discovery) {
        self.lock().discovery = d;
    }

    pub fn set_latency(&self, d: Duration) {
        self.lock().latency = d;
    }

    pub fn set_build_time(&self, d: Duration) {
        self.lock().build_time = d;
    }

    pub fn set_power_time(&self, d: Duration) {
        self.lock().power_time = d;
    }

    pub fn set_delete_time(&self, d: Duration) {
        self.lock().delete_time = d;
    }

    pub fn set_token_lifetime(&self, d: Duration) {
        self.lock().token_lifetime = d;
    }

    pub fn set_quota(&self, instances: Option<usize>, status: u16) {
        let mut i = self.lock();
        i.quota = instances;
        i.quota_status = status;
    }

    /// The next create makes its server but answers 504 Gateway Timeout.
    pub fn lose_next_create_answer(&self) {
        self.lock().lose_next_create_answer = true;
    }

    /// The next server created goes to ERROR with this fault message.
    pub fn fail_next_boot(&self, fault: &str) {
        self.lock().next_boot_faults.push_back(fault.to_owned());
    }

    /// Answers the next request `method path` (path without query) with `status` and `body`.
    pub fn inject(&self, method: Method, path: &str, status: u16, body: Value) {
        self.inject_with_headers(method, path, status, body, Vec::new());
    }

    pub fn inject_with_headers(
        &self,
        method: Method,
        path: &str,
        status: u16,
        body: Value,
        headers: Vec<(&'static str, String)>,
    ) {
        self.lock().injected.push(Injected {
            method,
            path: path.to_owned(),
            status,
            body,
            headers,
            act_first: false,
            hang: false,
        });
    }

    /// Carries out the next request `method path`, then answers `status` and `body` instead of
    /// its result, as a proxy that timed out after Nova acted would.
    pub fn lose_next_answer(&self, method: Method, path: &str, status: u16, body: Value) {
        self.lock().injected.push(Injected {
            method,
            path: path.to_owned(),
            status,
            body,
            headers: Vec::new(),
            act_first: true,
            hang: false,
        });
    }

    /// The next request `method path` is never answered, as behind a proxy or load balancer
    /// that lost it; with `act_first`, Nova carries it out first.
    pub fn hang_next(&self, method: Method, path: &str, act_first: bool) {
        self.lock().injected.push(Injected {
            method,
            path: path.to_owned(),
            status: 504,
            body: Value::Null,
            headers: Vec::new(),
            act_first,
            hang: true,
        });
    }

    /// Keystone forgets every token it issued (as after a revocation).
    pub fn revoke_tokens(&self) {
        self.lock().tokens.clear();
    }

    /// (issued, expires) of every token issued, in order.
    pub fn token_times(&self) -> Vec<(SystemTime, SystemTime)> {
        self.lock().token_times.clone()
    }

    pub fn tokens_issued(&self) -> u32 {
        self.lock().issued
    }

    /// Adds a server someone else made (another cluster, or by hand).
    pub fn add_server(&self, name: &str, metadata: &[(&str, &str)]) -> String {
        let mut i = self.lock();
        let id = new_uuid(i.servers.len() as u64 + 9000);
        let metadata = metadata.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        i.servers.push(Server {
            id: id.clone(),
            name: name.to_owned(),
            metadata,
            created: Instant::now(),
            fault: None,
            deleted: None,
            stopped: None,
            started: None,
            body: Value::Null,
        });
        id
    }

    /// Servers that still exist (deleted ones linger for `delete_time`).
    pub fn servers(&self) -> Vec<Server> {
        let i = self.lock();
        i.servers.iter().filter(|s| !i.is_gone(s)).cloned().collect()
    }

    /// Every server with the `status` and `OS-EXT-STS:task_state` a listing would show now.
    pub fn statuses(&self) -> Vec<(Server, &'static str, Option<&'static str>)> {
        let i = self.lock();
        i.servers
            .iter()
            .filter(|s| !i.is_gone(s))
            .map(|s| {
                let (status, task) = i.status_of(s);
                (s.clone(), status, task)
            })
            .collect()
    }

    pub fn ports(&self) -> Vec<Port> {
        self.lock().ports.clone()
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// Requests with this method whose path ends with `suffix`.
    pub fn count(&self, method: Method, suffix: &str) -> usize {
        self.lock().requests.iter().filter(|r| r.method == method && r.path.ends_with(suffix)).count()
    }

    /// Panics listing every request the fake found wrong.
    pub fn assert_clean(&self) {
        let i = self.lock();
        assert!(
            i.problems.is_empty(),
            "the fake OpenStack saw {} bad requests:\n{}",
            i.problems.len(),
            i.problems.join("\n")
        );
    }
}

/// A deterministic UUID-shaped id.
fn new_uuid(n: u64) -> String {
    format!("{:08x}-0000-4000-8000-{:012x}", n, n.wrapping_mul(2_654_435_761))
}

impl Inner {
    fn is_gone(&self, s: &Server) -> bool {
        s.deleted.is_some_and(|d| d.elapsed() >= self.delete_time)
    }

    fn status_of(&self, s: &Server) -> (&'static str, Option<&'static str>) {
        if s.deleted.is_some() {
            return ("ACTIVE", Some("deleting"));
        }
        if s.fault.is_some() {
            return ("ERROR", None);
        }
        if s.created.elapsed() < self.build_time {
            return ("BUILD", Some("spawning"));
        }
        match (s.stopped, s.started) {
            (Some(_), Some(on)) if on.elapsed() < self.power_time => ("SHUTOFF", Some("powering-on")),
            (Some(_), Some(_)) => ("ACTIVE", None),
            (Some(off), None) if off.elapsed() < self.power_time => ("ACTIVE", Some("powering-off")),
            (Some(_), None) => ("SHUTOFF", None),
            (None, _) => ("ACTIVE", None),
        }
    }

    /// `POST /servers/{id}/action` with `os-stop` or `os-start`, as Nova checks them
    /// (`check_instance_state`): stop only an ACTIVE (or ERROR) server with no task under way,
    /// start only a SHUTOFF one; otherwise 409 `conflictingRequest`. 202 without a body.
    fn server_action(&mut self, id: &str, body: Option<&Value>) -> Response {
        let Some(i) = self.find_server(id) else {
            return error(StatusCode::NOT_FOUND, "itemNotFound", &format!("Instance {id} could not be found."));
        };
        let Some(action) = body.and_then(Value::as_object).filter(|o| o.len() == 1) else {
            self.problems.push(format!("POST /servers/{id}/action: the body must name exactly one action: {body:?}"));
            return error(StatusCode::BAD_REQUEST, "badRequest", "Malformed request body");
        };
        let (name, arg) = action.iter().next().expect("one entry");
        if !arg.is_null() {
            self.problems.push(format!("POST /servers/{id}/action: {name} takes null, got {arg}"));
            return error(StatusCode::BAD_REQUEST, "badRequest", &format!("Invalid input for field/attribute {name}."));
        }
        let (status, task) = self.status_of(&self.servers[i]);
        let conflict = |verb: &str| {
            let state = match task {
                Some(t) => format!("task_state {t}"),
                None if status == "SHUTOFF" => "vm_state stopped".to_owned(),
                None => format!("vm_state {}", status.to_ascii_lowercase()),
            };
            error(
                StatusCode::CONFLICT,
                "conflictingRequest",
                &format!("Cannot '{verb}' instance {id} while it is in {state}"),
            )
        };
        match name.as_str() {
            "os-stop" => {
                if task.is_some() || !matches!(status, "ACTIVE" | "ERROR") {
                    return conflict("stop");
                }
                self.servers[i].stopped = Some(Instant::now());
                self.servers[i].started = None;
            }
            "os-start" => {
                if task.is_some() || status != "SHUTOFF" {
                    return conflict("start");
                }
                self.servers[i].started = Some(Instant::now());
            }
            other => {
                self.problems
                    .push(format!("POST /servers/{id}/action: an action Flotilla has no business sending: {other}"));
                return error(StatusCode::BAD_REQUEST, "badRequest", &format!("There is no such action: {other}"));
            }
        }
        StatusCode::ACCEPTED.into_response()
    }

    fn server_json(&self, s: &Server) -> Value {
        let (status, task) = self.status_of(s);
        let mut v = json!({
            "id": s.id,
            "name": s.name,
            "status": status,
            "OS-EXT-STS:task_state": task,
            "OS-EXT-STS:vm_state": status.to_ascii_lowercase(),
            "metadata": s.metadata,
            "tenant_id": "p-1234",
            "flavor": { "id": s.body.pointer("/server/flavorRef").cloned().unwrap_or(Value::Null) },
            "links": [{ "rel": "self", "href": format!("{}/compute/v2.1/servers/{}", self.base, s.id) }],
        });
        if let Some(f) = &s.fault {
            v["fault"] = json!({ "code": 500, "message": f, "created": rfc3339(SystemTime::now()) });
        }
        v
    }

    fn catalog(&self) -> Value {
        let b = &self.base;
        let ep = |id: &str, interface: &str, region: &str, url: String| json!({ "id": id, "interface": interface, "region": region, "region_id": region, "url": url });
        json!([
            { "type": "compute", "name": "nova", "id": "svc-compute", "endpoints": [
                ep("c1", "public", "RegionOne", format!("{b}/compute/v2.1")),
                // The same Nova behind other interfaces and regions: the path tells which
                // catalog entry a driver picked.
                ep("c2", "internal", "RegionOne", format!("{b}/internal/compute/v2.1")),
                ep("c3", "public", "RegionTwo", format!("{b}/region-two/compute/v2.1")),
            ]},
            { "type": "image", "name": "glance", "id": "svc-image", "endpoints": [
                ep("i1", "public", "RegionOne", format!("{b}/image")),
            ]},
            { "type": "network", "name": "neutron", "id": "svc-network", "endpoints": [
                ep("n1", "public", "RegionOne", format!("{b}/network/")),
            ]},
            { "type": "identity", "name": "keystone", "id": "svc-identity", "endpoints": [
                ep("k1", "public", "RegionOne", format!("{b}/identity/v3")),
            ]},
        ])
    }

    /// One version entry of keystone's discovery documents.
    fn version_entry(&self, id: &str) -> Value {
        let (status, path) = if id == "v2.0" { ("deprecated", "v2.0") } else { ("stable", "v3") };
        json!({
            "id": id,
            "status": status,
            "updated": "2020-04-07T00:00:00Z",
            "links": [{ "rel": "self", "href": format!("{}/identity/{path}/", self.base) }],
            "media-types": [{ "base": "application/json", "type": format!("application/vnd.openstack.identity-{path}+json") }],
        })
    }

    /// `GET /identity` and `GET /identity/v3`, which need no token.
    fn discovery(&mut self, versioned: bool, accept: Option<&str>) -> Response {
        if accept.is_some_and(|a| a.contains("json-home")) {
            self.problems.push("discovery asked for JSON Home, which the driver cannot read".into());
        }
        if versioned {
            return (StatusCode::OK, axum::Json(json!({ "version": self.version_entry("v3.14") }))).into_response();
        }
        let values = match self.discovery {
            Discovery::OnlyV2 => vec![self.version_entry("v2.0")],
            _ => vec![self.version_entry("v3.14")],
        };
        match self.discovery {
            Discovery::MultipleChoices | Discovery::OnlyV2 => {
                (StatusCode::MULTIPLE_CHOICES, axum::Json(json!({ "versions": { "values": values } }))).into_response()
            }
            Discovery::Ok => (StatusCode::OK, axum::Json(json!({ "versions": { "values": values } }))).into_response(),
            Discovery::OkList => (StatusCode::OK, axum::Json(json!({ "versions": values }))).into_response(),
        }
    }

    fn issue_token(&mut self, body: Option<&Value>) -> Response {
        let Some(body) = body else {
            self.problems.push("POST /v3/auth/tokens without a JSON body".into());
            return error(StatusCode::BAD_REQUEST, "error", "Expecting to find auth in request body.");
        };
        let identity = &body["auth"]["identity"];
        let methods: Vec<&str> =
            identity["methods"].as_array().map(|m| m.iter().filter_map(Value::as_str).collect()).unwrap_or_default();
        let ok = match methods.as_slice() {
            ["password"] => {
                let user = &identity["password"]["user"];
                let scope = &body["auth"]["scope"]["project"];
                let good = user["name"] == USERNAME
                    && user["domain"]["name"] == USER_DOMAIN
                    && user["password"] == PASSWORD
                    && (scope["name"] == PROJECT || scope["id"] == "p-1234");
                if scope.is_null() {
                    self.problems.push("password token request without a project scope".into());
                }
                good
            }
            ["application_credential"] => {
                let cred = &identity["application_credential"];
                if !body["auth"]["scope"].is_null() {
                    // Keystone rejects a scope with application credentials.
                    self.problems.push("application credential token request with a scope".into());
                }
                cred["id"] == APP_CRED_ID && cred["secret"] == APP_CRED_SECRET
            }
            other => {
                self.problems.push(format!("token request with methods {other:?}"));
                false
            }
        };
        if !ok {
            return unauthorized();
        }
        self.issued += 1;
        let token = format!("gAAAAAB-fake-token-{}", self.issued);
        let now = SystemTime::now();
        let expires = now + self.token_lifetime;
        self.tokens.insert(token.clone(), expires);
        self.token_times.push((now, expires));
        let body = json!({ "token": {
            "methods": methods,
            "issued_at": rfc3339(now),
            "expires_at": rfc3339(expires),
            "user": { "id": "u-1", "name": USERNAME, "domain": { "id": "default", "name": USER_DOMAIN } },
            "project": { "id": "p-1234", "name": PROJECT, "domain": { "id": "default", "name": USER_DOMAIN } },
            "catalog": self.catalog(),
        }});
        let mut r = (StatusCode::CREATED, axum::Json(body)).into_response();
        r.headers_mut().insert("X-Subject-Token", HeaderValue::from_str(&token).unwrap());
        r
    }

    fn flavors(&self) -> Value {
        json!([
            { "id": FLAVOR_ID, "name": "io.70GB", "vcpus": 4, "ram": 16384, "disk": 70,
              "OS-FLV-EXT-DATA:ephemeral": 0, "swap": "", "os-flavor-access:is_public": true },
            { "id": GPU_FLAVOR_ID, "name": "gpu.a100", "vcpus": 16, "ram": 65536, "disk": 100,
              "OS-FLV-EXT-DATA:ephemeral": 0, "swap": "", "os-flavor-access:is_public": true },
        ])
    }

    /// Checks a `POST /servers` body as Nova's schema and lookups would; `Err` is a 400 message.
    fn check_create(&self, body: &Value) -> Result<(), String> {
        let s = body.get("server").ok_or("Invalid input for field/attribute server.")?;
        let name = s["name"].as_str().ok_or("'name' is a required property")?;
        if name.is_empty() || name.len() > 255 {
            return Err("Invalid input for field/attribute name.".into());
        }
        let flavor = s["flavorRef"].as_str().ok_or("'flavorRef' is a required property")?;
        if flavor != FLAVOR_ID && flavor != GPU_FLAVOR_ID {
            return Err(format!("Flavor {flavor} could not be found."));
        }
        let bdm = s.get("block_device_mapping_v2");
        match (s.get("imageRef").and_then(Value::as_str), bdm) {
            (Some(IMAGE_ID), None) => {}
            (Some(other), None) => return Err(format!("Image {other} could not be found.")),
            (None, Some(Value::Array(devices))) => {
                let d = devices.first().ok_or("Block Device Mapping is Invalid")?;
                if d["source_type"] != "image"
                    || d["destination_type"] != "volume"
                    || d["uuid"] != IMAGE_ID
                    || d["boot_index"] != 0
                {
                    return Err("Block Device Mapping is Invalid: boot device must be the image on a volume".into());
                }
                if d["volume_size"].as_u64().is_none_or(|n| n == 0) {
                    return Err("Block Device Mapping is Invalid: volume_size must be positive".into());
                }
            }
            _ => return Err("imageRef or a boot volume is required".into()),
        }
        match &s["networks"] {
            Value::String(a) if a == "auto" || a == "none" => {}
            Value::Array(nets) => {
                for n in nets {
                    if let Some(port) = n.get("port").and_then(Value::as_str) {
                        match self.ports.iter().find(|p| p.id == port) {
                            None => return Err(format!("Port id {port} not found.")),
                            Some(p) if p.device_id.is_some() => return Err(format!("Port {port} is still in use.")),
                            Some(_) => {}
                        }
                    } else if n["uuid"] != NETWORK_ID {
                        return Err(format!("Network {} could not be found.", n["uuid"]));
                    }
                }
            }
            _ => return Err("'networks' is a required property (microversion 2.37)".into()),
        }
        let metadata = s["metadata"].as_object().ok_or("metadata must be an object")?;
        for (k, v) in metadata {
            if k.len() > 255 || v.as_str().is_none_or(|v| v.len() > 255) {
                return Err(format!("Invalid input for field/attribute metadata: {k}"));
            }
        }
        if let Some(sgs) = s.get("security_groups") {
            for sg in sgs.as_array().ok_or("security_groups must be an array")? {
                let n = sg["name"].as_str().unwrap_or_default();
                if !self.security_groups.contains(n) {
                    return Err(format!("Security group {n} not found for project p-1234."));
                }
            }
        }
        if let Some(k) = s.get("key_name")
            && !k.as_str().is_some_and(|k| self.key_pairs.contains(k))
        {
            return Err(format!("Invalid key_name provided: {k}"));
        }
        if let Some(az) = s.get("availability_zone")
            && !az.as_str().is_some_and(|z| self.zones.contains(z))
        {
            return Err(format!("The requested availability zone is not available: {az}"));
        }
        if let Some(ud) = s.get("user_data") {
            let ud = ud.as_str().ok_or("user_data must be a string")?;
            if ud.len() > 65535 {
                return Err("User data too large.".into());
            }
            base64::engine::general_purpose::STANDARD.decode(ud).map_err(|_| "User data needs to be valid base 64.")?;
        }
        if let Some(hints) = body.get("os:scheduler_hints")
            && hints["group"] != SERVER_GROUP_ID
        {
            return Err(format!("Invalid server group {}", hints["group"]));
        }
        Ok(())
    }

    fn list_servers(&mut self, query: &BTreeMap<String, String>) -> Response {
        // Nova lists newest first.
        let mut all: Vec<&Server> = self.servers.iter().filter(|s| !self.is_gone(s)).rev().collect();
        if let Some(pattern) = query.get("name") {
            let exact = pattern.trim_start_matches('^').trim_end_matches('$').replace('\\', "");
            all.retain(|s| s.name == exact);
        }
        if let Some(marker) = query.get("marker") {
            match all.iter().position(|s| s.id == *marker) {
                Some(i) => all = all.split_off(i + 1),
                None => return error(StatusCode::BAD_REQUEST, "badRequest", &format!("marker [{marker}] not found")),
            }
        }
        let limit =
            query.get("limit").and_then(|l| l.parse::<usize>().ok()).unwrap_or(self.max_limit).min(self.max_limit);
        let more = all.len() > limit;
        all.truncate(limit);
        let mut body = json!({ "servers": all.iter().map(|s| self.server_json(s)).collect::<Vec<_>>() });
        // Nova adds the next link whenever a page is full.
        if (more || all.len() == limit)
            && let Some(last) = all.last()
        {
            body["servers_links"] = json!([{
                "rel": "next",
                "href": format!("{}/compute/v2.1/servers/detail?limit={limit}&marker={}", self.base, last.id),
            }]);
        }
        (StatusCode::OK, axum::Json(body)).into_response()
    }

    fn create_server(&mut self, body: Option<&Value>) -> Response {
        let Some(body) = body else {
            self.problems.push("POST /servers without a JSON body".into());
            return error(StatusCode::BAD_REQUEST, "badRequest", "Malformed request body");
        };
        if let Err(message) = self.check_create(body) {
            self.problems.push(format!("POST /servers rejected: {message}"));
            return error(StatusCode::BAD_REQUEST, "badRequest", &message);
        }
        let live = self.servers.iter().filter(|s| s.deleted.is_none()).count();
        if let Some(q) = self.quota
            && live >= q
        {
            let message =
                format!("Quota exceeded for instances: Requested 1, but already used {live} of {q} instances");
            return if self.quota_status == 413 {
                error(StatusCode::PAYLOAD_TOO_LARGE, "overLimit", &message)
            } else {
                error(StatusCode::FORBIDDEN, "forbidden", &message)
            };
        }
        let id = new_uuid(self.servers.len() as u64 + 1);
        let s = &body["server"];
        let metadata = s["metadata"]
            .as_object()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned())).collect())
            .unwrap_or_default();
        let fault = self.next_boot_faults.pop_front();
        for n in s["networks"].as_array().into_iter().flatten() {
            if let Some(port) = n.get("port").and_then(Value::as_str)
                && let Some(p) = self.ports.iter_mut().find(|p| p.id == port)
            {
                p.device_id = Some(id.clone());
            }
        }
        self.servers.push(Server {
            id: id.clone(),
            name: s["name"].as_str().unwrap_or_default().to_owned(),
            metadata,
            created: Instant::now(),
            fault,
            deleted: None,
            stopped: None,
            started: None,
            body: body.clone(),
        });
        if std::mem::take(&mut self.lose_next_create_answer) {
            return (StatusCode::GATEWAY_TIMEOUT, "<html><body><h1>504 Gateway Time-out</h1></body></html>")
                .into_response();
        }
        let location = format!("{}/compute/v2.1/servers/{id}", self.base);
        let mut r = (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "server": {
                "id": id,
                "links": [{ "rel": "self", "href": location }],
                "OS-DCF:diskConfig": "MANUAL",
                "security_groups": s.get("security_groups").cloned().unwrap_or(json!([{ "name": "default" }])),
                "adminPass": "kJTmMkszoB6A",
            }})),
        )
            .into_response();
        r.headers_mut().insert("Location", HeaderValue::from_str(&location).unwrap());
        r
    }

    fn create_port(&mut self, body: Option<&Value>) -> Response {
        let neutron_error = |status: StatusCode, kind: &str, message: String| {
            (status, axum::Json(json!({ "NeutronError": { "type": kind, "message": message, "detail": "" } })))
                .into_response()
        };
        let Some(port) = body.and_then(|b| b.get("port")) else {
            self.problems.push("POST /ports without a port".into());
            return neutron_error(StatusCode::BAD_REQUEST, "HTTPBadRequest", "Resource body required".into());
        };
        let network = port["network_id"].as_str().unwrap_or_default();
        if network != NETWORK_ID {
            self.problems.push(format!("POST /ports on unknown network {network:?}"));
            return neutron_error(
                StatusCode::NOT_FOUND,
                "NetworkNotFound",
                format!("Network {network} could not be found."),
            );
        }
        for sg in port.get("security_groups").and_then(Value::as_array).into_iter().flatten() {
            if sg != SG_DEFAULT_ID && sg != SG_NODES_ID {
                self.problems.push(format!("POST /ports with unknown security group {sg}"));
                return neutron_error(
                    StatusCode::NOT_FOUND,
                    "SecurityGroupNotFound",
                    format!("Security group {sg} does not exist"),
                );
            }
        }
        for pair in port.get("allowed_address_pairs").and_then(Value::as_array).into_iter().flatten() {
            if !pair["ip_address"].is_string() {
                self.problems.push(format!("POST /ports with a bad address pair {pair}"));
                return neutron_error(
                    StatusCode::BAD_REQUEST,
                    "HTTPBadRequest",
                    "Invalid input for allowed_address_pairs".into(),
                );
            }
        }
        self.port_seq += 1;
        let id = format!("{:08x}-5555-4555-8555-000000000000", self.port_seq);
        let name = port["name"].as_str().unwrap_or_default().to_owned();
        self.ports.push(Port {
            id: id.clone(),
            name: name.clone(),
            network_id: network.to_owned(),
            device_id: None,
            body: body.cloned().unwrap_or_default(),
        });
        (
            StatusCode::CREATED,
            axum::Json(json!({ "port": { "id": id, "name": name, "network_id": network, "status": "DOWN",
                                         "admin_state_up": true, "device_id": "" } })),
        )
            .into_response()
    }

    /// `PUT /servers/{id}/metadata/{key}` as Nova answers it: the body names exactly the key of
    /// the URI; the server must be in a stable state (Nova's `check_instance_state`: not while
    /// building, in ERROR or being deleted).
    fn set_metadata_item(&mut self, id: &str, key: &str, body: Option<&Value>) -> Response {
        let bad = |m: &str| error(StatusCode::BAD_REQUEST, "badRequest", m);
        let Some(i) = self.find_server(id) else {
            return error(StatusCode::NOT_FOUND, "itemNotFound", &format!("Instance {id} could not be found."));
        };
        let Some(meta) = body.and_then(|b| b.get("meta")).and_then(Value::as_object) else {
            return bad("Invalid input for field/attribute meta. Value: None. None is not of type 'object'");
        };
        if meta.len() > 1 {
            return bad("Request body contains too many items");
        }
        let Some(value) = meta.get(key) else { return bad("Request body and URI mismatch") };
        let Some(value) = value.as_str().filter(|v| v.chars().count() <= 255) else {
            return bad(&format!("Invalid input for field/attribute {key}. Value: {value}."));
        };
        let state = match self.status_of(&self.servers[i]) {
            (_, Some("deleting")) => Some("task_state deleting"),
            ("BUILD", _) => Some("vm_state building"),
            ("ERROR", _) => Some("vm_state error"),
            _ => None,
        };
        if let Some(state) = state {
            return error(
                StatusCode::CONFLICT,
                "conflictingRequest",
                &format!("Cannot 'update_metadata' instance {id} while it is in {state}"),
            );
        }
        self.servers[i].metadata.insert(key.to_owned(), value.to_owned());
        (StatusCode::OK, axum::Json(json!({ "meta": { key: value } }))).into_response()
    }

    fn find_server(&self, id: &str) -> Option<usize> {
        self.servers.iter().position(|s| s.id == id && !self.is_gone(s))
    }

    fn route(
        &mut self,
        method: &Method,
        path: &str,
        query: &BTreeMap<String, String>,
        body: Option<&Value>,
    ) -> Response {
        let not_found = |what: &str| error(StatusCode::NOT_FOUND, "itemNotFound", what);
        let ok = |v: Value| (StatusCode::OK, axum::Json(v)).into_response();
        let path = path.strip_prefix("/internal").or_else(|| path.strip_prefix("/region-two")).unwrap_or(path);
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        match (method.clone(), segments.as_slice()) {
            (Method::GET, ["compute", "v2.1", "servers", "detail"]) => self.list_servers(query),
            (Method::POST, ["compute", "v2.1", "servers"]) => self.create_server(body),
            (Method::GET, ["compute", "v2.1", "servers", id]) => match self.find_server(id) {
                Some(i) => ok(json!({ "server": self.server_json(&self.servers[i]) })),
                None => not_found(&format!("Instance {id} could not be found.")),
            },
            (Method::DELETE, ["compute", "v2.1", "servers", id]) => match self.find_server(id) {
                Some(i) => {
                    if self.servers[i].deleted.is_none() {
                        self.servers[i].deleted = Some(Instant::now());
                    }
                    // Nova unbinds the ports it did not create, and leaves them.
                    for p in self.ports.iter_mut().filter(|p| p.device_id.as_deref() == Some(*id)) {
                        p.device_id = None;
                    }
                    StatusCode::NO_CONTENT.into_response()
                }
                None => not_found(&format!("Instance {id} could not be found.")),
            },
            (Method::PUT, ["compute", "v2.1", "servers", id, "metadata", key]) => self.set_metadata_item(id, key, body),
            (Method::POST, ["compute", "v2.1", "servers", id, "action"]) => self.server_action(id, body),
            (Method::GET, ["compute", "v2.1", "flavors", "detail"]) => ok(json!({ "flavors": self.flavors() })),
            (Method::GET, ["compute", "v2.1", "flavors", id, "os-extra_specs"]) => match *id {
                FLAVOR_ID => ok(json!({ "extra_specs": { "hw:cpu_policy": "shared" } })),
                GPU_FLAVOR_ID => {
                    ok(json!({ "extra_specs": { "pci_passthrough:alias": "a100:2", "resources:VGPU": "0" } }))
                }
                _ => not_found(&format!("Flavor {id} could not be found.")),
            },
            (Method::GET, ["compute", "v2.1", "os-server-groups"]) => ok(json!({ "server_groups": [
                { "id": SERVER_GROUP_ID, "name": "k3s-workers", "policy": "anti-affinity", "members": [] },
                { "id": "b0b0b0b0-0000-4000-8000-000000000000", "name": "other", "policy": "affinity", "members": [] },
            ]})),
            (Method::GET, ["image", "v2", "images"]) => {
                let images = [(IMAGE_ID, "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2")];
                let name = query.get("name").cloned().unwrap_or_default();
                let found: Vec<Value> = images
                    .iter()
                    .filter(|(_, n)| name.is_empty() || *n == name)
                    .map(|(id, n)| json!({ "id": id, "name": n, "status": "active", "visibility": "public" }))
                    .collect();
                ok(json!({ "images": found, "schema": "/v2/schemas/images", "first": "/v2/images" }))
            }
            (Method::GET, ["network", "v2.0", "networks"]) => {
                let name = query.get("name").cloned().unwrap_or_default();
                let found: Vec<Value> = [(NETWORK_ID, "k3s-net")]
                    .iter()
                    .filter(|(_, n)| name.is_empty() || *n == name)
                    .map(|(id, n)| json!({ "id": id, "name": n, "status": "ACTIVE", "admin_state_up": true }))
                    .collect();
                ok(json!({ "networks": found }))
            }
            (Method::GET, ["network", "v2.0", "security-groups"]) => {
                let name = query.get("name").cloned().unwrap_or_default();
                let found: Vec<Value> = [(SG_DEFAULT_ID, "default"), (SG_NODES_ID, "k3s-nodes")]
                    .iter()
                    .filter(|(_, n)| name.is_empty() || *n == name)
                    .map(|(id, n)| json!({ "id": id, "name": n, "security_group_rules": [] }))
                    .collect();
                ok(json!({ "security_groups": found }))
            }
            (Method::POST, ["network", "v2.0", "ports"]) => self.create_port(body),
            (Method::GET, ["network", "v2.0", "ports"]) => {
                let device = query.get("device_id");
                let found: Vec<Value> = self
                    .ports
                    .iter()
                    .filter(|p| device.is_none_or(|d| p.device_id.as_ref() == Some(d)))
                    .map(|p| {
                        json!({ "id": p.id, "name": p.name, "network_id": p.network_id,
                                     "device_id": p.device_id.clone().unwrap_or_default() })
                    })
                    .collect();
                ok(json!({ "ports": found }))
            }
            (Method::DELETE, ["network", "v2.0", "ports", id]) => match self.ports.iter().position(|p| p.id == *id) {
                Some(i) => {
                    self.ports.remove(i);
                    StatusCode::NO_CONTENT.into_response()
                }
                None => (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({ "NeutronError": {
                        "type": "PortNotFound", "message": format!("Port {id} could not be found."), "detail": ""
                    }})),
                )
                    .into_response(),
            },
            _ => {
                self.problems.push(format!("unexpected request {method} {path}"));
                (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({ "error": { "code": 404, "message": format!("The resource could not be found: {path}") } })),
                )
                    .into_response()
            }
        }
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let latency = inner.lock().unwrap().latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let path = uri.path().to_owned();
    let query: BTreeMap<String, String> = uri
        .query()
        .map(|q| {
            q.split('&').filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.to_owned(), percent_decode(v))).collect()
        })
        .unwrap_or_default();
    let token = headers.get("X-Auth-Token").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let json_body: Option<Value> = if body.is_empty() { None } else { serde_json::from_slice(&body).ok() };
    let (response, hang) = answer(&inner, method, path, query, token, json_body, &headers, &body);
    if hang {
        std::future::pending::<()>().await;
    }
    response
}

/// The answer to one request, and whether to withhold it (see [`Fake::hang_next`]).
#[allow(clippy::too_many_arguments, reason = "the parts of one request, taken apart once in `handle`")]
fn answer(
    inner: &Mutex<Inner>,
    method: Method,
    path: String,
    query: BTreeMap<String, String>,
    token: Option<String>,
    json_body: Option<Value>,
    headers: &HeaderMap,
    body: &Bytes,
) -> (Response, bool) {
    let mut i = inner.lock().unwrap();
    let mut hang = false;
    if !body.is_empty() && json_body.is_none() {
        i.problems.push(format!("{method} {path}: body is not JSON"));
    }
    if (method == Method::GET || method == Method::DELETE) && !body.is_empty() {
        i.problems.push(format!("{method} {path} with a body"));
    }
    if (method == Method::POST || method == Method::PUT)
        && headers.get("Content-Type").and_then(|v| v.to_str().ok()) != Some("application/json")
    {
        i.problems.push(format!("{method} {path} without Content-Type: application/json"));
    }
    let discovery = match path.trim_end_matches('/') {
        "/identity" => Some(false),
        "/identity/v3" => Some(true),
        _ => None,
    };
    let response = if method == Method::POST && path == "/identity/v3/auth/tokens" {
        i.issue_token(json_body.as_ref())
    } else if let (true, Some(versioned)) = (method == Method::GET, discovery) {
        i.discovery(versioned, headers.get("Accept").and_then(|v| v.to_str().ok()))
    } else {
        let now = SystemTime::now();
        let valid = token.as_ref().and_then(|t| i.tokens.get(t)).is_some_and(|exp| *exp > now);
        if token.is_none() {
            i.problems.push(format!("{method} {path} without X-Auth-Token"));
        }
        if path.contains("/compute/") {
            let mv = headers.get("OpenStack-API-Version").and_then(|v| v.to_str().ok()).unwrap_or_default();
            if mv != format!("compute {MICROVERSION}") {
                i.problems.push(format!("{method} {path} asks for microversion {mv:?}"));
            }
        }
        if !valid {
            unauthorized()
        } else if let Some(pos) = i.injected.iter().position(|f| f.method == method && f.path == path) {
            let f = i.injected.remove(pos);
            if f.act_first {
                i.route(&method, &path, &query, json_body.as_ref());
            }
            hang = f.hang;
            let mut r = (StatusCode::from_u16(f.status).unwrap(), axum::Json(f.body)).into_response();
            for (k, v) in f.headers {
                r.headers_mut().insert(k, HeaderValue::from_str(&v).unwrap());
            }
            r
        } else {
            let mut r = i.route(&method, &path, &query, json_body.as_ref());
            if path.contains("/compute/") {
                r.headers_mut().insert("OpenStack-API-Version", HeaderValue::from_static("compute 2.37"));
            }
            r
        }
    };
    let status = response.status().as_u16();
    i.requests.push(Request { method, path, query, token, body: json_body, status });
    (response, hang)
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut k = 0;
    while k < bytes.len() {
        match bytes[k] {
            b'%' if k + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[k + 1..k + 3]).ok().and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        k += 3;
                    }
                    None => {
                        out.push(b'%');
                        k += 1;
                    }
                }
            }
            b'+' => {
                out.push(b' ');
                k += 1;
            }
            b => {
                out.push(b);
                k += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn tls_acceptor() -> tokio_rustls::TlsAcceptor {
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(include_bytes!("tls/server.pem")).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(include_bytes!("tls/server.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// Accepts TLS connections; a client that rejects the certificate is simply dropped.
struct TlsListener {
    tcp: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let Ok((tcp, addr)) = self.tcp.accept().await else { continue };
            if let Ok(tls) = self.acceptor.accept(tcp).await {
                return (tls, addr);
            }
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        self.tcp.local_addr()
    }
}
