//! A fake Slicer REST API (the daemon behind `slicer up`) on loopback, written from the daemon's
//! OpenAPI (slicervm/docs.slicervm.com `docs/openapi.yaml`, API 0.1.x), its API and lifecycle
//! pages, and the Go SDK (slicervm/sdk v0.0.19 and later):
//!
//! * bearer auth on every route but `/healthz` (401 `{"error": ...}` otherwise);
//! * `GET /hostgroup`: `[{name, count, ram_bytes, cpus, gpu_count, arch}]`;
//! * `GET /hostgroup/{hg}/nodes[?tag=|?tag_prefix=]`: the group's VMs (`hostname`, `hostgroup`,
//!   `ip`, `ram_bytes`, `cpus`, `created_at`, `arch`, `tags`, `status`); an old daemon (SDK
//!   v0.0.19's era) ignores the filters and leaves out `hostgroup` and `status`;
//! * `POST /hostgroup/{hg}/nodes`: Slicer picks the hostname `<hg>-N` (N never reused), 400 for
//!   more CPUs/RAM/GPUs than the host group's, 404 for an unknown host group, and an error when
//!   the host group's address pool is full (the daemon's wording is not published: status and
//!   message are knobs); the VM is listed as soon as the daemon accepts it, before it answers;
//! * `DELETE /hostgroup/{hg}/nodes/{hostname}`: 200 `{"message":"Node deleted","disk_removed":
//!   "true"}`, 404 for an unknown VM, 403 for the host group's own start-up (`count: N`) VMs,
//!   which are protected; the VM stays listed until the delete finishes;
//! * `GET/POST /secrets`, `PATCH /secrets/{name}`: base64 data, 409 when the name exists;
//! * `GET /vm/{hostname}/tags`, `PATCH /vm/{hostname}/tags` with one of `add`/`remove` (arrays,
//!   together) or `replace` (slicervm/sdk v0.0.66's `SlicerVMTagUpdate`): 200 `{hostname, tags}`,
//!   404 for a VM that is not there, 400 for `replace` with `add` or `remove`. Not in the
//!   OpenAPI yet, and not on daemons older than that SDK ([`Faults::tag_updates`]): those answer
//!   as Go's router does for a route it does not have, `404 page not found` in plain text;
//! * `POST /vm/{hostname}/shutdown?action=reboot|shutdown` (the SDK's `Shutdown`, whose default
//!   is `reboot`): on Firecracker a guest reboot ends the VMM, so a persistent VM is then listed
//!   `Stopped` (after [`Faults::stop_delay`]) and an ephemeral one is gone; `shutdown` halts the
//!   guest but leaves the VMM, so the VM stays `Running`. `POST /vm/{hostname}/relaunch` (SDK
//!   v0.0.35 on, [`Faults::relaunch`]): a `Stopped` VM runs again under its hostname and tags
//!   (200 with the create's answer), 409 for one that is not stopped, 404 for none. What the
//!   daemon answers a stop with is not published; the SDK reads only the status.
//!
//! Every request is recorded and checked (auth, method, path, query, content type, body keys and
//! types); anything unexpected becomes a problem that [`Fake::assert_clean`] fails on. Faults: a
//! create whose answer is lost (the VM exists, a proxy answers 504), a create or delete that
//! fails with a chosen status, latency, slow creates and deletes so listings land mid-flight,
//! and, for any route, a call refused, hung, or answered 504 after the daemon acted
//! ([`Fake::fault_next`]).
#![allow(dead_code, reason = "each test uses a different subset of the fake's knobs")]

#[path = "../serve.rs"]
#[allow(clippy::duplicate_mod, reason = "each fake is also used alone, so each declares the shared helper")]
mod loopback;
use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use axum::{
    body::{Body, to_bytes},
    http::{Request, Response, StatusCode},
};
use base64::Engine;
use serde_json::{Value, json};

pub const TOKEN: &str = "9f3c0e2ad1b84c55a0e6c1d2b3a4f5e6";

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub body: Option<Value>,
    pub user_agent: Option<String>,
    /// The bearer token was the right one.
    pub authorized: bool,
}

impl Recorded {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct HostGroup {
    pub name: String,
    pub cpus: u32,
    pub ram_bytes: u64,
    pub arch: String,
    pub gpu_count: u32,
    /// VMs the daemon starts itself (`count:` in its YAML); protected from deletion.
    pub count: u32,
    /// How many VMs the host group's address pool holds, start-up VMs included.
    pub capacity: usize,
    /// The last number used in a hostname.
    last: u32,
    subnet: u8,
}

#[derive(Clone, Debug)]
pub struct Vm {
    pub hostname: String,
    pub host_group: String,
    pub ip: String,
    pub cpus: u32,
    pub ram_bytes: u64,
    pub gpu_count: u32,
    pub arch: String,
    pub created_at: String,
    pub tags: Vec<String>,
    pub persistent: bool,
    /// Start-up VMs of the host group.
    pub protected: bool,
    pub userdata: String,
    pub secrets: Vec<String>,
    /// The create body, as sent.
    pub body: Value,
    /// A DELETE for it is in flight.
    pub deleting: bool,
    /// `Running` or `Stopped` (a persistent VM after `shutdown`).
    pub status: String,
}

#[derive(Clone, Debug)]
pub struct StoredSecret {
    pub name: String,
    pub data: Vec<u8>,
    pub permissions: String,
    pub uid: u32,
    pub gid: u32,
}

/// What happens to a call a test picked out.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallFault {
    /// Refused before the daemon does anything: this status and message.
    Fail(u16, String),
    /// No answer, before the daemon does anything: the caller's timeout ends it.
    Hang,
    /// The daemon acts, then a proxy in front answers 504: the answer is lost.
    LoseAnswer,
    /// The daemon acts, then no answer comes.
    HangAfter,
}

/// Faults and delays a test sets.
#[derive(Debug)]
pub struct Faults {
    /// Added before every answer.
    pub latency: Duration,
    /// A create is listed at once and answered after this.
    pub create_delay: Duration,
    /// A delete keeps the VM listed this long, then removes it and answers.
    pub delete_delay: Duration,
    /// The next create makes its VM, but a proxy in front answers 504 instead of the daemon.
    pub lose_next_create: bool,
    /// The next create fails with this status and message, making nothing.
    pub fail_next_create: Option<(u16, String)>,
    /// This many deletes fail with 500 and `delete_error`, deleting nothing.
    pub fail_deletes: u32,
    pub delete_error: String,
    /// The answer to a create on a full host group.
    pub full_status: u16,
    pub full_message: String,
    /// 200 or 201: the OpenAPI allows both, the SDK accepts both.
    pub create_status: u16,
    /// An old daemon: no `?tag=` filters, no `hostgroup`/`status` in listings, no tag changes.
    pub old_daemon: bool,
    /// The daemon can change a VM's tags (`/vm/{hostname}/tags`, slicervm/sdk v0.0.66 on).
    pub tag_updates: bool,
    /// The daemon can relaunch a stopped VM (`/vm/{hostname}/relaunch`, slicervm/sdk v0.0.35 on).
    pub relaunch: bool,
    /// A `shutdown` answers at once; the VM is listed `Stopped` this much later.
    pub stop_delay: Duration,
    /// Faults for the next calls of (method, path), in order (see [`Fake::fault_next`]).
    pub armed: Vec<(String, String, CallFault)>,
    /// Requests with a wrong or missing token are part of the test (otherwise they are problems).
    pub expect_unauthorized: bool,
}

impl Default for Faults {
    fn default() -> Self {
        Faults {
            latency: Duration::ZERO,
            create_delay: Duration::ZERO,
            delete_delay: Duration::ZERO,
            lose_next_create: false,
            fail_next_create: None,
            fail_deletes: 0,
            delete_error: "failed to stop VM: firecracker API socket not responding".into(),
            full_status: 500,
            full_message: "unable to allocate an IP address: no free addresses left in the host group's range".into(),
            create_status: 200,
            old_daemon: false,
            tag_updates: true,
            relaunch: true,
            stop_delay: Duration::ZERO,
            armed: Vec::new(),
            expect_unauthorized: false,
        }
    }
}

#[derive(Debug, Default)]
pub struct State {
    pub host_groups: Vec<HostGroup>,
    pub vms: BTreeMap<String, Vm>,
    pub secrets: BTreeMap<String, StoredSecret>,
    pub requests: Vec<Recorded>,
    /// Anything the fake did not expect: a test fails on it.
    pub problems: Vec<String>,
    /// Requests refused for a wrong or missing token.
    pub rejected: u32,
    pub faults: Faults,
    clock: u64,
    /// The after-the-fact fault of the request being answered.
    after: Option<CallFault>,
}

impl State {
    /// Requests matching a method and an exact path.
    pub fn calls(&self, method: &str, path: &str) -> Vec<Recorded> {
        self.requests.iter().filter(|r| r.method == method && r.path == path).cloned().collect()
    }

    /// `METHOD path?query` of every request, in order.
    pub fn call_lines(&self) -> Vec<String> {
        self.requests
            .iter()
            .map(|r| {
                let q: Vec<String> = r.query.iter().map(|(k, v)| format!("{k}={v}")).collect();
                if q.is_empty() {
                    format!("{} {}", r.method, r.path)
                } else {
                    format!("{} {}?{}", r.method, r.path, q.join("&"))
                }
            })
            .collect()
    }

    pub fn host_group(&self, name: &str) -> Option<&HostGroup> {
        self.host_groups.iter().find(|h| h.name == name)
    }

    /// A host group; `count` start-up VMs are launched at once, untagged and protected.
    pub fn add_host_group(&mut self, name: &str, cpus: u32, ram_gib: u64, arch: &str, count: u32, capacity: usize) {
        let subnet = 138 + self.host_groups.len() as u8;
        self.host_groups.push(HostGroup {
            name: name.into(),
            cpus,
            ram_bytes: ram_gib << 30,
            arch: arch.into(),
            gpu_count: 0,
            count,
            capacity,
            last: 0,
            subnet,
        });
        for _ in 0..count {
            let vm = self.launch(name, cpus, ram_gib << 30, 0, Vec::new(), Value::Null).expect("room for start-up VMs");
            self.vms.get_mut(&vm).unwrap().protected = true;
        }
    }

    /// A VM someone else launched through the API, with these tags.
    pub fn add_foreign_vm(&mut self, host_group: &str, tags: &[&str]) -> String {
        let hg = self.host_group(host_group).unwrap().clone();
        self.launch(host_group, hg.cpus, hg.ram_bytes, 0, tags.iter().map(|t| (*t).into()).collect(), Value::Null)
            .unwrap()
    }

    fn launch(
        &mut self,
        host_group: &str,
        cpus: u32,
        ram_bytes: u64,
        gpu_count: u32,
        tags: Vec<String>,
        body: Value,
    ) -> Option<String> {
        let in_group = self.vms.values().filter(|v| v.host_group == host_group).count();
        self.clock += 1;
        let created_at = format!("2026-01-07T10:{:02}:{:02}.000000000Z", (self.clock / 60) % 60, self.clock % 60);
        let hg = self.host_groups.iter_mut().find(|h| h.name == host_group)?;
        if in_group >= hg.capacity {
            return None;
        }
        hg.last += 1;
        let hostname = format!("{}-{}", hg.name, hg.last);
        let arch = hg.arch.clone();
        let ip = format!("192.168.{}.{}/24", hg.subnet, hg.last + 1);
        let userdata = body.get("userdata").and_then(Value::as_str).unwrap_or_default().to_owned();
        let secrets = body
            .get("secrets")
            .and_then(Value::as_array)
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let persistent = body.get("persistent").and_then(Value::as_bool).unwrap_or(false);
        self.vms.insert(
            hostname.clone(),
            Vm {
                hostname: hostname.clone(),
                host_group: host_group.into(),
                ip,
                cpus,
                ram_bytes,
                gpu_count,
                arch,
                created_at,
                tags,
                persistent,
                protected: false,
                userdata,
                secrets,
                body,
                deleting: false,
                status: "Running".into(),
            },
        );
        Some(hostname)
    }

    fn node_json(&self, v: &Vm) -> Value {
        let mut node = json!({
            "hostname": v.hostname,
            "ip": v.ip,
            "ram_bytes": v.ram_bytes,
            "cpus": v.cpus,
            "created_at": v.created_at,
            "arch": v.arch,
        });
        if !v.tags.is_empty() {
            node["tags"] = json!(v.tags);
        }
        if !self.faults.old_daemon {
            node["hostgroup"] = json!(v.host_group);
            node["status"] = json!(v.status);
            if v.persistent {
                node["persistent"] = json!(true);
            }
        }
        node
    }

    /// The VMs of a host group carrying all of `tags`.
    pub fn tagged(&self, host_group: &str, tags: &[&str]) -> Vec<Vm> {
        self.vms
            .values()
            .filter(|v| v.host_group == host_group && tags.iter().all(|t| v.tags.iter().any(|x| x == t)))
            .cloned()
            .collect()
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

fn reply(status: u16, body: Value) -> Response<Body> {
    Response::builder()
        .status(StatusCode::from_u16(status).unwrap())
        .header("Content-Type", "application/json")
        .body(Body::from(body.to_string()))
        .unwrap()
}

/// The daemon's error shape: `{"error": "message"}`.
fn error(status: u16, message: &str) -> Response<Body> {
    reply(status, json!({ "error": message }))
}

fn empty(status: u16) -> Response<Body> {
    Response::builder().status(StatusCode::from_u16(status).unwrap()).body(Body::empty()).unwrap()
}

impl Fake {
    /// A daemon with host group `agents` (2 vCPU, 4 GiB, x86_64, room for 5 VMs) holding one
    /// protected start-up VM, and host group `arm` (4 vCPU, 8 GiB, aarch64, room for 3).
    pub async fn start() -> Fake {
        let mut state = State::default();
        state.add_host_group("agents", 2, 4, "x86_64", 1, 5);
        state.add_host_group("arm", 4, 8, "aarch64", 0, 3);
        let state = Arc::new(Mutex::new(state));
        let (addr, server) = loopback::serve(&state, handle).await;
        Fake { addr, state, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Fails the test if the fake saw anything it did not expect.
    pub fn assert_clean(&self) {
        let s = self.state();
        assert!(s.problems.is_empty(), "the fake Slicer API saw unexpected requests:\n{}", s.problems.join("\n"));
    }

    /// Arms `fault` for the next `method path` call.
    pub fn fault_next(&self, method: &str, path: &str, fault: CallFault) {
        self.state().faults.armed.push((method.into(), path.into(), fault));
    }
}

/// Keys of `SlicerCreateNodeRequest` (SDK and OpenAPI).
const CREATE_KEYS: &[&str] = &[
    "hostname",
    "ip",
    "ram_bytes",
    "cpus",
    "gpu_count",
    "persistent",
    "disk_image",
    "import_user",
    "ssh_keys",
    "protected",
    "userdata",
    "tags",
    "secrets",
    "pci_devices",
    "network",
];

/// Checks `body` is an object with only `keys`, each of the JSON type the daemon decodes.
fn check_keys(body: &Value, keys: &[&str]) -> Result<(), String> {
    let Some(map) = body.as_object() else { return Err("body is not a JSON object".into()) };
    for (k, v) in map {
        if !keys.contains(&k.as_str()) {
            return Err(format!("unknown field {k:?}"));
        }
        let ok = match k.as_str() {
            "ram_bytes" | "cpus" | "gpu_count" | "uid" | "gid" => v.as_u64().is_some(),
            "persistent" | "protected" => v.is_boolean(),
            "ssh_keys" | "tags" | "secrets" | "pci_devices" | "add" | "remove" | "replace" => {
                v.as_array().is_some_and(|a| a.iter().all(Value::is_string))
            }
            "network" => v.is_object(),
            _ => v.is_string(),
        };
        if !ok {
            return Err(format!("field {k:?} has the wrong type: {v}"));
        }
    }
    Ok(())
}

/// What the handler does after the state is updated: answer, or wait first.
enum Step {
    Reply(Response<Body>),
    /// A create the daemon accepted: answer after `delay` (or, if `lost`, a proxy's 504).
    Created {
        delay: Duration,
        lost: bool,
        status: u16,
        answer: Value,
    },
    /// A persistent VM stopping: listed `Stopped` after `delay`, answered at once.
    Stopping {
        delay: Duration,
        hostname: String,
    },
    /// A delete under way: the VM goes after `delay`, then the answer.
    Deleting {
        delay: Duration,
        hostname: String,
    },
    /// No answer ever.
    Hang,
}

async fn handle(state: Arc<Mutex<State>>, req: Request<Body>) -> Response<Body> {
    let latency = state.lock().unwrap().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let (step, after) = {
        let mut s = state.lock().unwrap();
        let step = route(&mut s, &parts, &bytes);
        (step, s.after.take())
    };
    let answer = answer(state, step).await;
    match after {
        Some(CallFault::LoseAnswer) => Response::builder()
            .status(StatusCode::GATEWAY_TIMEOUT)
            .header("Content-Type", "text/plain; charset=utf-8")
            .body(Body::from("Gateway Timeout"))
            .unwrap(),
        Some(CallFault::HangAfter) => std::future::pending().await,
        _ => answer,
    }
}

/// Carries out what `route` decided.
async fn answer(state: Arc<Mutex<State>>, step: Step) -> Response<Body> {
    match step {
        Step::Reply(r) => r,
        Step::Hang => std::future::pending().await,
        Step::Created { delay, lost, status, answer } => {
            if !delay.is_zero() {
                tokio::time::sleep(delay).await;
            }
            if lost {
                return Response::builder()
                    .status(StatusCode::GATEWAY_TIMEOUT)
                    .header("Content-Type", "text/plain; charset=utf-8")
                    .body(Body::from("Gateway Timeout"))
                    .unwrap();
            }
            reply(status, answer)
        }
        Step::Stopping { delay, hostname } => {
            // The VMM ends on its own time; the daemon answers at once.
            tokio::spawn(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                if let Some(vm) = state.lock().unwrap().vms.get_mut(&hostname) {
                    vm.status = "Stopped".into();
                }
            });
            reply(200, json!({ "message": "shutdown requested" }))
        }
        Step::Deleting { delay, hostname } => {
            // The daemon finishes a delete it started even if the caller goes away.
            let finish = tokio::spawn(async move {
                if !delay.is_zero() {
                    tokio::time::sleep(delay).await;
                }
                state.lock().unwrap().vms.remove(&hostname);
            });
            let _ = finish.await;
            reply(200, json!({ "message": "Node deleted", "disk_removed": "true" }))
        }
    }
}

/// Checks and records one request, updates the state, and answers it (or says what to wait for).
fn route(s: &mut State, parts: &axum::http::request::Parts, bytes: &[u8]) -> Step {
    let error = |status: u16, message: &str| Step::Reply(error(status, message));
    let reply = |status: u16, body: Value| Step::Reply(reply(status, body));
    let method = parts.method.as_str().to_owned();
    let path = parts.uri.path().to_owned();
    let query = loopback::query(parts);
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let json_body = match loopback::json_body(parts, bytes, &mut s.problems) {
        Ok(body) => body,
        Err(e) => return error(400, &format!("invalid request body: {e}")),
    };
    if path == "/healthz" {
        return reply(200, json!({ "status": "ok" }));
    }
    let authorized = header("authorization").as_deref() == Some(&format!("Bearer {TOKEN}"));
    s.requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        body: json_body.clone(),
        user_agent: header("user-agent"),
        authorized,
    });
    if !authorized {
        s.rejected += 1;
        if !s.faults.expect_unauthorized {
            s.problems.push(format!("{method} {path}: missing or wrong bearer token"));
        }
        return error(401, "unauthorized");
    }
    if path.len() > 1 && path.ends_with('/') {
        // The API reference: "/nodes/ may return an error".
        s.problems.push(format!("{method} {path}: trailing slash"));
        return error(404, "not found");
    }
    if matches!(method.as_str(), "GET" | "DELETE") && json_body.is_some() {
        s.problems.push(format!("{method} {path}: unexpected body"));
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let allowed_query: &[&str] = match (method.as_str(), segments.as_slice()) {
        ("GET", ["hostgroup", _, "nodes"]) | ("GET", ["nodes"]) => &["tag", "tag_prefix"],
        ("POST", ["hostgroup", _, "nodes"]) => &["wait", "timeout"],
        ("POST", ["vm", _, "shutdown"]) => &["action"],
        _ => &[],
    };
    if let Some((k, _)) = query.iter().find(|(k, _)| !allowed_query.contains(&k.as_str())) {
        s.problems.push(format!("{method} {path}: unexpected query parameter {k:?}"));
    }
    if let Some(i) = s.faults.armed.iter().position(|(m, p, _)| *m == method && *p == path) {
        match s.faults.armed.remove(i).2 {
            CallFault::Fail(status, message) => return error(status, &message),
            CallFault::Hang => return Step::Hang,
            after => s.after = Some(after),
        }
    }

    match (method.as_str(), segments.as_slice()) {
        ("GET", ["hostgroup"]) => {
            let groups: Vec<Value> = s
                .host_groups
                .iter()
                .map(|h| {
                    json!({
                        "name": h.name, "count": h.count, "ram_bytes": h.ram_bytes, "cpus": h.cpus,
                        "gpu_count": h.gpu_count, "arch": h.arch,
                    })
                })
                .collect();
            reply(200, Value::Array(groups))
        }
        ("GET", ["hostgroup", hg, "nodes"]) => {
            if s.host_group(hg).is_none() {
                return error(404, &format!("host group {hg} not found"));
            }
            let tag = query.iter().find(|(k, _)| k == "tag").map(|(_, v)| v.clone());
            let prefix = query.iter().find(|(k, _)| k == "tag_prefix").map(|(_, v)| v.clone());
            if tag.is_some() && prefix.is_some() && !s.faults.old_daemon {
                return error(400, "only one of tag and tag_prefix may be set");
            }
            let old = s.faults.old_daemon;
            let nodes: Vec<Value> = s
                .vms
                .values()
                .filter(|v| v.host_group == *hg)
                .filter(|v| old || tag.as_ref().is_none_or(|t| v.tags.contains(t)))
                .filter(|v| old || prefix.as_ref().is_none_or(|p| v.tags.iter().any(|x| x.starts_with(p.as_str()))))
                .map(|v| s.node_json(v))
                .collect();
            reply(200, Value::Array(nodes))
        }
        ("POST", ["hostgroup", hg, "nodes"]) => {
            let hg = (*hg).to_owned();
            let body = json_body.unwrap_or(json!({}));
            if let Err(e) = check_keys(&body, CREATE_KEYS) {
                s.problems.push(format!("POST {path}: {e}"));
                return error(400, &format!("invalid request: {e}"));
            }
            let Some(group) = s.host_group(&hg).cloned() else {
                return error(404, &format!("host group {hg} not found"));
            };
            if let Some((status, message)) = s.faults.fail_next_create.take() {
                return error(status, &message);
            }
            let cpus = body.get("cpus").and_then(Value::as_u64).map(|c| c as u32).unwrap_or(group.cpus);
            let ram = body.get("ram_bytes").and_then(Value::as_u64).unwrap_or(group.ram_bytes);
            let gpus = body.get("gpu_count").and_then(Value::as_u64).map(|c| c as u32).unwrap_or(group.gpu_count);
            if cpus > group.cpus {
                return error(400, &format!("requested cpus ({cpus}) exceeds the host group limit of {}", group.cpus));
            }
            if ram > group.ram_bytes {
                return error(
                    400,
                    &format!("requested ram_bytes ({ram}) exceeds the host group limit of {}", group.ram_bytes),
                );
            }
            if gpus > group.gpu_count {
                return error(
                    400,
                    &format!("requested gpu_count ({gpus}) exceeds the host group limit of {}", group.gpu_count),
                );
            }
            let secrets: Vec<String> = body
                .get("secrets")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            for name in &secrets {
                if !s.secrets.contains_key(name) {
                    s.problems.push(format!("POST {path}: VM given secret {name:?}, which does not exist"));
                    return error(400, &format!("secret {name} not found"));
                }
            }
            let tags: Vec<String> = body
                .get("tags")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                .unwrap_or_default();
            let Some(hostname) = s.launch(&hg, cpus, ram, gpus, tags, body) else {
                let (status, message) = (s.faults.full_status, s.faults.full_message.clone());
                return error(status, &message);
            };
            let vm = &s.vms[&hostname];
            let answer = json!({
                "hostname": vm.hostname, "hostgroup": vm.host_group, "ip": vm.ip,
                "created_at": vm.created_at, "arch": vm.arch,
            });
            Step::Created {
                delay: s.faults.create_delay,
                lost: std::mem::take(&mut s.faults.lose_next_create),
                status: s.faults.create_status,
                answer,
            }
        }
        ("DELETE", ["hostgroup", hg, "nodes", hostname]) => {
            let Some(vm) = s.vms.get(*hostname).filter(|v| v.host_group == *hg).cloned() else {
                return error(404, &format!("node {hostname} not found in host group {hg}"));
            };
            if vm.protected {
                return error(403, &format!("node {hostname} is protected and cannot be deleted"));
            }
            if s.faults.fail_deletes > 0 {
                s.faults.fail_deletes -= 1;
                let message = s.faults.delete_error.clone();
                return error(500, &message);
            }
            s.vms.get_mut(*hostname).unwrap().deleting = true;
            Step::Deleting { delay: s.faults.delete_delay, hostname: (*hostname).to_owned() }
        }
        ("GET", ["secrets"]) => {
            let list: Vec<Value> = s
                .secrets
                .values()
                .map(|x| {
                    json!({
                        "name": x.name, "size": x.data.len(), "permissions": x.permissions,
                        "uid": x.uid, "gid": x.gid, "mod_time": "2026-01-07T10:00:00Z",
                    })
                })
                .collect();
            reply(200, Value::Array(list))
        }
        ("POST", ["secrets"]) => {
            let body = json_body.unwrap_or(Value::Null);
            if let Err(e) = check_keys(&body, &["name", "data", "permissions", "uid", "gid"]) {
                s.problems.push(format!("POST {path}: {e}"));
                return error(400, &e);
            }
            let (Some(name), Some(data)) =
                (body.get("name").and_then(Value::as_str), body.get("data").and_then(Value::as_str))
            else {
                s.problems.push(format!("POST {path}: name and data are required"));
                return error(400, "name and data are required");
            };
            let Ok(data) = base64::engine::general_purpose::STANDARD.decode(data) else {
                s.problems.push(format!("POST {path}: data is not base64"));
                return error(400, "data must be base64-encoded");
            };
            if s.secrets.contains_key(name) {
                return error(409, &format!("secret {name} already exists"));
            }
            let secret = StoredSecret {
                name: name.into(),
                data,
                permissions: body.get("permissions").and_then(Value::as_str).unwrap_or("0600").into(),
                uid: body.get("uid").and_then(Value::as_u64).unwrap_or(0) as u32,
                gid: body.get("gid").and_then(Value::as_u64).unwrap_or(0) as u32,
            };
            s.secrets.insert(name.into(), secret);
            Step::Reply(empty(201))
        }
        ("PATCH", ["secrets", name]) => {
            let body = json_body.unwrap_or(Value::Null);
            if let Err(e) = check_keys(&body, &["data", "permissions", "uid", "gid"]) {
                s.problems.push(format!("PATCH {path}: {e}"));
                return error(400, &e);
            }
            let data = match body.get("data").and_then(Value::as_str) {
                Some(d) => match base64::engine::general_purpose::STANDARD.decode(d) {
                    Ok(d) => Some(d),
                    Err(_) => {
                        s.problems.push(format!("PATCH {path}: data is not base64"));
                        return error(400, "data must be base64-encoded");
                    }
                },
                None => None,
            };
            let Some(secret) = s.secrets.get_mut(*name) else {
                return error(404, &format!("secret {name} not found"));
            };
            if let Some(d) = data {
                secret.data = d;
            }
            if let Some(p) = body.get("permissions").and_then(Value::as_str) {
                secret.permissions = p.into();
            }
            Step::Reply(empty(200))
        }
        ("GET" | "PATCH", ["vm", hostname, "tags"]) if s.faults.tag_updates && !s.faults.old_daemon => {
            let hostname = (*hostname).to_owned();
            if method == "PATCH" {
                let body = json_body.unwrap_or(Value::Null);
                if let Err(e) = check_keys(&body, &["add", "remove", "replace"]) {
                    s.problems.push(format!("PATCH {path}: {e}"));
                    return error(400, &format!("invalid request: {e}"));
                }
                let list = |k: &str| -> Option<Vec<String>> {
                    body.get(k)?.as_array().map(|a| a.iter().filter_map(|x| x.as_str().map(str::to_owned)).collect())
                };
                let (add, remove, replace) = (list("add"), list("remove"), list("replace"));
                if replace.is_some() && (add.is_some() || remove.is_some()) {
                    s.problems.push(format!("PATCH {path}: replace with add or remove"));
                    return error(400, "replace cannot be combined with add or remove");
                }
                let Some(vm) = s.vms.get_mut(&hostname) else {
                    return error(404, &format!("VM {hostname} not found"));
                };
                if let Some(r) = replace {
                    vm.tags = r;
                }
                for t in remove.unwrap_or_default() {
                    vm.tags.retain(|x| *x != t);
                }
                for t in add.unwrap_or_default() {
                    if !vm.tags.contains(&t) {
                        vm.tags.push(t);
                    }
                }
            }
            let Some(vm) = s.vms.get(&hostname) else {
                return error(404, &format!("VM {hostname} not found"));
            };
            reply(200, json!({ "hostname": vm.hostname, "tags": vm.tags }))
        }
        ("POST", ["vm", hostname, "shutdown"]) => {
            let action = query.iter().find(|(k, _)| k == "action").map(|(_, v)| v.clone());
            let Some(vm) = s.vms.get(*hostname).cloned() else {
                return error(404, &format!("VM {hostname} not found"));
            };
            match action.as_deref() {
                // Firecracker: a guest reboot ends the VMM, the graceful stop.
                Some("reboot") => {}
                // A guest power-off leaves Firecracker's VMM running: the VM stays Running.
                Some("shutdown") => return reply(200, json!({ "message": "shutdown requested" })),
                other => {
                    s.problems.push(format!("POST {path}: action {other:?} (the SDK always sends one)"));
                    return error(400, "action must be shutdown or reboot");
                }
            }
            if vm.status == "Stopped" {
                return reply(200, json!({ "message": "VM is already stopped" }));
            }
            let hostname = (*hostname).to_owned();
            if vm.persistent {
                Step::Stopping { delay: s.faults.stop_delay, hostname }
            } else {
                // An ephemeral VM is gone once its VMM ends.
                s.vms.remove(&hostname);
                reply(200, json!({ "message": "shutdown requested" }))
            }
        }
        ("POST", ["vm", hostname, "relaunch"]) if s.faults.relaunch && !s.faults.old_daemon => {
            let Some(vm) = s.vms.get_mut(*hostname) else {
                return error(404, &format!("VM {hostname} not found"));
            };
            if vm.status != "Stopped" {
                return error(409, &format!("VM {hostname} is not stopped"));
            }
            vm.status = "Running".into();
            let vm = vm.clone();
            reply(
                200,
                json!({
                    "hostname": vm.hostname, "hostgroup": vm.host_group, "ip": vm.ip,
                    "created_at": vm.created_at, "arch": vm.arch,
                }),
            )
        }
        ("POST", ["vm", _, "relaunch"]) | ("GET" | "PATCH", ["vm", _, "tags"]) => {
            // A daemon from before the route: Go's router has no such route.
            Step::Reply(
                Response::builder()
                    .status(StatusCode::NOT_FOUND)
                    .header("Content-Type", "text/plain; charset=utf-8")
                    .body(Body::from("404 page not found\n"))
                    .unwrap(),
            )
        }
        _ => {
            s.problems.push(format!("{method} {path}: no such endpoint"));
            error(404, "not found")
        }
    }
}
