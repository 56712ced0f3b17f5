//! A fake Proxmox VE API on loopback: `/api2/json` with the `{"data": ...}` envelope, token and
//! ticket auth (CSRF on writes), `/cluster/resources` (nodes, VMs, storages), `/cluster/nextid`,
//! clone, config, start, stop, shutdown, destroy returning UPIDs that finish after a delay (or
//! fail), task status, and guest-agent exec. Every request is checked against the endpoint's
//! parameters and recorded; anything unexpected is a problem that `assert_clean` fails on.
//!
//! Modelled from the PVE sources:
//! * **Where errors go** ([`HttpServer`]): libpve-http-server-perl writes the first line of an
//!   error message as the HTTP reason phrase (`HTTP/1.1 500 unable to create VM 100: config
//!   file already exists`); before 5.2.0 the JSON body is only `{"data":null}` (plus `errors`
//!   for parameter errors), from 5.2.0 on it also carries `message`. Every error answer of the
//!   fake goes through [`finish_error`], so both shapes are produced from one handler.
//! * **Clone refusals** (qemu-server `PVE/API2/Qemu.pm`, `clone_vm`), in PVE's order: an unknown
//!   target node, a target storage that does not exist, is disabled or not on the node, holds
//!   no VM images, or (with another target node) is not shared ("can't clone to non-shared
//!   storage 'X'"); then the source's config on this node, `storage` with a linked clone, a
//!   source with any volume on non-shared storage going to another node ("can't clone VM to
//!   node 'X' (VM uses local storage)"), and a taken VMID.
//! * **Storage** as `/cluster/resources` reports it: one `storage` entry per node the storage
//!   is enabled on, with `shared`, `content` and `plugintype`.
//!
//! Faults: [`Faults`] (task failures, latency, VMID theft, agent readiness) and [`Fault`]s
//! queued with [`Fake::inject`]: answer an error instead of acting, or act and then answer an
//! error (a response lost after PVE acted). New kinds of fault go into [`FaultAction`].
#![allow(dead_code, reason = "each test uses a different subset of the fake's knobs")]

#[path = "../serve.rs"]
#[allow(clippy::duplicate_mod, reason = "each fake is also used alone, so each declares the shared helper")]
mod loopback;
use std::{
    collections::{BTreeMap, HashMap},
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use axum::{
    body::{Body, to_bytes},
    http::{Request, Response, StatusCode},
};
use serde_json::{Value, json};

pub const TOKEN_ID: &str = "flotilla@pve!ca";
pub const TOKEN_SECRET: &str = "5e1f3c2a-0000-4000-8000-000000000001";
pub const USER: &str = "flotilla@pve";
pub const PASSWORD: &str = "hunter2";

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: String,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub form: Vec<(String, String)>,
    /// `token`, `ticket` or `none`.
    pub auth: &'static str,
    pub csrf: bool,
}

impl Recorded {
    pub fn param(&self, key: &str) -> Option<&str> {
        self.form.iter().chain(&self.query).find(|(k, _)| k == key).map(|(_, v)| v.as_str())
    }
}

/// Which libpve-http-server-perl answers: where an error's message goes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum HttpServer {
    /// 5.2.0 and later (PVE 8.4+, 9): the reason phrase and the JSON body's `message`.
    #[default]
    Modern,
    /// Before 5.2.0 (most PVE 7 and 8 installations): the reason phrase only, body
    /// `{"data":null}`.
    Legacy,
}

/// A storage of `storage.cfg`.
#[derive(Clone, Debug)]
pub struct Storage {
    pub id: String,
    /// `dir`, `lvmthin`, `rbd`, `nfs`, ...
    pub plugin: String,
    pub shared: bool,
    /// `images,rootdir`, `iso,vztmpl,backup,snippets`, ...
    pub content: String,
    /// Nodes it is restricted to; `None`: every node.
    pub nodes: Option<Vec<String>>,
    pub disabled: bool,
}

impl Storage {
    fn new(id: &str, plugin: &str, shared: bool, content: &str) -> Storage {
        Storage { id: id.into(), plugin: plugin.into(), shared, content: content.into(), nodes: None, disabled: false }
    }

    fn enabled_on(&self, node: &str) -> bool {
        !self.disabled && self.nodes.as_ref().is_none_or(|n| n.iter().any(|x| x == node))
    }
}

/// What an injected fault does to the request it matches.
#[derive(Clone, Debug)]
pub enum FaultAction {
    /// Answer this error without acting (PVE's `die` before any effect).
    Fail { status: u16, message: String },
    /// Act as usual, then answer this error instead: the response is lost after PVE acted.
    LoseAnswer { status: u16, message: String },
    /// Never answer (a proxy or load balancer lost the request), after acting if `act_first`.
    Hang { act_first: bool },
}

/// A fault for the next `times` requests whose method is `method` and whose path (under
/// `/api2/json/`) ends with `path_suffix`.
#[derive(Clone, Debug)]
pub struct Fault {
    pub method: &'static str,
    pub path_suffix: String,
    pub times: u32,
    pub action: FaultAction,
}

#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub maxmem: u64,
    pub mem: u64,
    pub online: bool,
}

#[derive(Clone, Debug, Default)]
pub struct Vm {
    pub node: String,
    pub name: String,
    pub status: String,
    pub template: bool,
    /// Other config keys: cores, memory (MiB), tags, ipconfig0, description, ...
    pub config: BTreeMap<String, String>,
    /// The task holding the VM's lock (a clone in progress).
    pub lock: Option<String>,
    /// Commands the agent ran with `/bin/sh -c`.
    pub joined: Vec<String>,
    /// Agent exec calls seen so far (readiness is counted in them).
    pub agent_calls: u32,
}

#[derive(Debug)]
struct Task {
    kind: String,
    node: String,
    vmid: u32,
    done_at: Instant,
    failure: Option<String>,
    applied: bool,
}

#[derive(Debug)]
struct Exec {
    exitcode: i64,
    out: String,
    polled: bool,
}

/// Faults and delays a test sets.
#[derive(Debug, Default)]
pub struct Faults {
    /// How long each task runs.
    pub task_duration: Duration,
    /// Added before every answer.
    pub latency: Duration,
    /// Task type (`qmclone`, `qmstart`, ...) -> exit status of its next run.
    pub fail_next_task: HashMap<String, String>,
    /// The next `/cluster/nextid` answer is taken by someone else right after it is given.
    pub steal_next_id: u32,
    /// Agent exec calls per VM answered "agent is not running" before it is up.
    pub agent_down_calls: u32,
    /// `systemctl is-system-running` answers `starting` this many times per VM first.
    pub starting_answers: u32,
    /// Exit code of join commands.
    pub join_exit: i64,
    /// Injected faults, first match wins (see [`Fake::inject`]).
    pub injected: Vec<Fault>,
    /// `/cluster/resources` leaves storages out, as for a token without `Datastore.Audit`.
    pub storages_hidden: bool,
}

#[derive(Debug, Default)]
pub struct State {
    pub nodes: Vec<Node>,
    pub storages: Vec<Storage>,
    pub http_server: HttpServer,
    pub vms: BTreeMap<u32, Vm>,
    tasks: HashMap<String, Task>,
    execs: HashMap<u64, Exec>,
    next_pid: u64,
    pub tickets: Vec<String>,
    pub requests: Vec<Recorded>,
    /// Anything the fake did not expect: a test fails on it.
    pub problems: Vec<String>,
    /// Requests refused for bad credentials.
    pub rejected: u32,
    pub faults: Faults,
    counter: u64,
}

impl State {
    /// Applies the effects of tasks that have finished.
    fn settle(&mut self) {
        let now = Instant::now();
        let mut done: Vec<(String, String, u32, Option<String>)> = Vec::new();
        for (upid, t) in self.tasks.iter_mut() {
            if !t.applied && t.done_at <= now {
                t.applied = true;
                done.push((upid.clone(), t.kind.clone(), t.vmid, t.failure.clone()));
            }
        }
        for (upid, kind, vmid, failure) in done {
            let Some(vm) = self.vms.get_mut(&vmid) else { continue };
            match (kind.as_str(), failure) {
                // PVE removes the target of a failed clone itself.
                ("qmclone", Some(_)) => {
                    self.vms.remove(&vmid);
                }
                ("qmclone", None) if vm.lock.as_deref() == Some(upid.as_str()) => {
                    vm.lock = None;
                }
                ("qmstart", None) => vm.status = "running".into(),
                ("qmstop" | "qmshutdown", None) => vm.status = "stopped".into(),
                ("qmdestroy", None) => {
                    self.vms.remove(&vmid);
                }
                _ => {}
            }
        }
    }

    fn task(&mut self, kind: &str, node: &str, vmid: u32, effect_target: u32) -> String {
        self.counter += 1;
        let start = 0x6560_0000u64 + self.counter;
        let upid = format!(
            "UPID:{node}:{:08X}:{:08X}:{start:08X}:{kind}:{vmid}:{TOKEN_ID}:",
            4000 + self.counter,
            90000 + self.counter
        );
        let failure = self.faults.fail_next_task.remove(kind);
        self.tasks.insert(
            upid.clone(),
            Task {
                kind: kind.into(),
                node: node.into(),
                vmid: effect_target,
                done_at: Instant::now() + self.faults.task_duration,
                failure,
                applied: false,
            },
        );
        upid
    }

    /// The recorded requests matching method and a path suffix.
    pub fn calls(&self, method: &str, path_suffix: &str) -> Vec<Recorded> {
        self.requests.iter().filter(|r| r.method == method && r.path.ends_with(path_suffix)).cloned().collect()
    }

    /// A template VM with its boot disk and cloud-init drive on `ceph` (shared).
    pub fn add_template(&mut self, vmid: u32, node: &str, cores: u32, memory_mib: u64) {
        let mut config = BTreeMap::new();
        config.insert("cores".into(), cores.to_string());
        config.insert("memory".into(), memory_mib.to_string());
        config.insert("name".into(), "k8s-template".into());
        config.insert("scsi0".into(), format!("ceph:base-{vmid}-disk-0,size=8G"));
        config.insert("ide2".into(), format!("ceph:vm-{vmid}-cloudinit,media=cdrom"));
        config.insert("net0".into(), "virtio=BC:24:11:00:00:01,bridge=vmbr0".into());
        self.vms.insert(
            vmid,
            Vm {
                node: node.into(),
                name: "k8s-template".into(),
                status: "stopped".into(),
                template: true,
                config,
                ..Vm::default()
            },
        );
    }

    /// Moves every volume of VM `vmid` to `storage` (e.g. a template on `local-lvm`).
    pub fn move_volumes(&mut self, vmid: u32, storage: &str) {
        let vm = self.vms.get_mut(&vmid).unwrap();
        for (key, value) in vm.config.iter_mut() {
            if is_volume_key(key)
                && let Some((_, rest)) = value.split_once(':')
            {
                *value = format!("{storage}:{rest}");
            }
        }
    }

    pub fn storage_mut(&mut self, id: &str) -> &mut Storage {
        self.storages.iter_mut().find(|s| s.id == id).unwrap()
    }

    pub fn add_vm(&mut self, vmid: u32, node: &str, name: &str, status: &str, config: &[(&str, &str)]) {
        let mut map: BTreeMap<String, String> = config.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect();
        map.entry("cores".into()).or_insert_with(|| "2".into());
        map.entry("memory".into()).or_insert_with(|| "2048".into());
        map.insert("name".into(), name.into());
        self.vms.insert(vmid, Vm { node: node.into(), name: name.into(), status: status.into(), ..Vm::default() });
        self.vms.get_mut(&vmid).unwrap().config = map;
    }
}

/// Config keys holding a volume (`qemu-server`'s drive names).
fn is_volume_key(key: &str) -> bool {
    let bus = key.trim_end_matches(|c: char| c.is_ascii_digit());
    bus.len() < key.len() && ["ide", "sata", "scsi", "virtio"].contains(&bus) || key == "efidisk0" || key == "tpmstate0"
}

/// The storage of a volume id (`local-lvm:vm-100-disk-0`); `None` for `none`, `cdrom`, and
/// absolute paths (passed-through devices: never shared).
fn volume_storage(value: &str) -> Option<Option<String>> {
    let file = value.split(',').next().unwrap_or("");
    let file = file.strip_prefix("file=").unwrap_or(file);
    match file {
        "" | "none" | "cdrom" => None,
        f if f.starts_with('/') => Some(None),
        f => Some(f.split_once(':').map(|(s, _)| s.to_owned())),
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

/// Sets the reason phrase of an error answer to the first line of its message, and (for
/// [`HttpServer::Legacy`]) leaves the message out of the body, as libpve-http-server-perl does.
fn finish_error(response: Response<Body>, server: HttpServer, body: &Value) -> Response<Body> {
    let (mut parts, _) = response.into_parts();
    let message = body.get("message").and_then(Value::as_str).unwrap_or("").to_owned();
    let first = message.lines().next().unwrap_or("").trim().to_owned();
    let mut body = body.clone();
    if server == HttpServer::Legacy
        && let Some(map) = body.as_object_mut()
    {
        map.remove("message");
    }
    if !first.is_empty()
        && let Ok(reason) = hyper::ext::ReasonPhrase::try_from(first.into_bytes())
    {
        parts.extensions.insert(reason);
    }
    Response::from_parts(parts, Body::from(body.to_string()))
}

fn reply(status: StatusCode, body: Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header("Content-Type", "application/json;charset=UTF-8")
        .body(Body::from(body.to_string()))
        .unwrap()
}

fn ok(data: Value) -> Response<Body> {
    reply(StatusCode::OK, json!({ "data": data }))
}

/// PVE's answer to a `die`: status 500, the message in the body.
fn fail(message: String) -> Response<Body> {
    reply(StatusCode::INTERNAL_SERVER_ERROR, json!({ "data": null, "message": format!("{message}\n") }))
}

fn bad_params(errors: Vec<(String, String)>) -> Response<Body> {
    let errors: serde_json::Map<String, Value> = errors.into_iter().map(|(k, v)| (k, Value::String(v))).collect();
    reply(
        StatusCode::BAD_REQUEST,
        json!({ "data": null, "errors": errors, "message": "Parameter verification failed.\n" }),
    )
}

impl Fake {
    /// A fake cluster with nodes `pve1` (8 GiB free) and `pve2` (16 GiB free) and template 9000.
    /// Storages: `local` (dir, no images), `local-lvm` (lvmthin) and `ceph` (rbd, shared); the
    /// template's volumes are on `ceph`.
    pub async fn start() -> Fake {
        let mut state = State {
            nodes: vec![
                Node { name: "pve1".into(), maxmem: 32 << 30, mem: 24 << 30, online: true },
                Node { name: "pve2".into(), maxmem: 32 << 30, mem: 16 << 30, online: true },
            ],
            storages: vec![
                Storage::new("local", "dir", false, "iso,vztmpl,backup,snippets"),
                Storage::new("local-lvm", "lvmthin", false, "images,rootdir"),
                Storage::new("ceph", "rbd", true, "images,rootdir"),
            ],
            ..State::default()
        };
        state.add_template(9000, "pve1", 2, 4096);
        state.faults.task_duration = Duration::from_millis(30);
        let state = Arc::new(Mutex::new(state));
        let (addr, server) = loopback::serve(&state, serve).await;
        Fake { addr, state, server }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap()
    }

    /// Fails the test if the fake saw anything it did not expect.
    pub fn assert_clean(&self) {
        let s = self.state();
        assert!(s.problems.is_empty(), "the fake proxmox saw unexpected requests:\n{}", s.problems.join("\n"));
    }

    /// Forgets every ticket it issued (as if they expired).
    pub fn expire_tickets(&self) {
        self.state().tickets.clear();
    }

    /// Which libpve-http-server-perl answers from now on.
    pub fn set_http_server(&self, server: HttpServer) {
        self.state().http_server = server;
    }

    /// Queues a fault for the next `times` requests matching `method` and the path suffix.
    pub fn inject(&self, method: &'static str, path_suffix: &str, times: u32, action: FaultAction) {
        self.state().faults.injected.push(Fault { method, path_suffix: path_suffix.into(), times, action });
    }
}

/// Which parameters each endpoint accepts (PVE rejects others with 400).
fn allowed(method: &str, route: &str) -> Option<&'static [&'static str]> {
    Some(match (method, route) {
        ("POST", "access/ticket") => &["username", "password"],
        ("GET", "version") => &[],
        ("GET", "cluster/resources") => &["type"],
        ("GET", "cluster/nextid") => &["vmid"],
        ("POST", "clone") => &["newid", "name", "target", "full", "storage", "pool", "description"],
        ("GET", "config") => &[],
        ("PUT", "config") => &[
            "name",
            "cores",
            "memory",
            "tags",
            "ciuser",
            "sshkeys",
            "ipconfig0",
            "nameserver",
            "searchdomain",
            "cicustom",
            "agent",
            "description",
        ],
        ("POST", "status/start") => &[],
        ("POST", "status/stop") => &[],
        ("POST", "status/shutdown") => &["forceStop", "timeout"],
        ("DELETE", "vm") => &["purge", "destroy-unreferenced-disks"],
        ("GET", "task") => &[],
        ("POST", "agent/exec") => &["command"],
        ("GET", "agent/exec-status") => &["pid"],
        _ => return None,
    })
}

/// One request: injected faults, the handler, and PVE's way of writing errors.
async fn serve(state: Arc<Mutex<State>>, req: Request<Body>) -> Response<Body> {
    let method = req.method().as_str().to_owned();
    let path = req.uri().path().trim_start_matches("/api2/json/").to_owned();
    let fault = {
        let mut s = state.lock().unwrap();
        let found = s
            .faults
            .injected
            .iter_mut()
            .find(|f| f.times > 0 && f.method == method && path.ends_with(f.path_suffix.as_str()));
        found.map(|f| {
            f.times -= 1;
            f.action.clone()
        })
    };
    let response = match fault {
        Some(FaultAction::Fail { status, message }) => {
            // Still checked and recorded like any request.
            let checked = handle(Arc::clone(&state), req, true).await;
            if checked.status() == StatusCode::UNAUTHORIZED {
                checked
            } else {
                reply(StatusCode::from_u16(status).unwrap(), json!({"data": null, "message": format!("{message}\n")}))
            }
        }
        Some(FaultAction::LoseAnswer { status, message }) => {
            handle(Arc::clone(&state), req, false).await;
            reply(StatusCode::from_u16(status).unwrap(), json!({"data": null, "message": format!("{message}\n")}))
        }
        Some(FaultAction::Hang { act_first }) => {
            handle(Arc::clone(&state), req, !act_first).await;
            std::future::pending().await
        }
        None => handle(Arc::clone(&state), req, false).await,
    };
    if response.status().is_success() {
        return response;
    }
    let server = state.lock().unwrap().http_server;
    let (parts, body) = response.into_parts();
    let bytes = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let json: Value = serde_json::from_slice(&bytes).unwrap_or(json!({"data": null}));
    finish_error(Response::from_parts(parts, Body::empty()), server, &json)
}

#[allow(clippy::result_large_err, reason = "the error of `vm_here` is the fake's own HTTP answer, returned at once")]
async fn handle(state: Arc<Mutex<State>>, req: Request<Body>, check_only: bool) -> Response<Body> {
    let latency = state.lock().unwrap().faults.latency;
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }
    let (parts, body) = req.into_parts();
    let method = parts.method.as_str().to_owned();
    let full_path = parts.uri.path().to_owned();
    let query = loopback::query(&parts);
    let bytes = to_bytes(body, 1 << 20).await.unwrap_or_default();
    let form: Vec<(String, String)> = form_urlencoded::parse(&bytes).into_owned().collect();
    let header = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);

    let mut s = state.lock().unwrap();
    s.settle();
    let Some(path) = full_path.strip_prefix("/api2/json/") else {
        s.problems.push(format!("{method} {full_path}: not under /api2/json"));
        return reply(StatusCode::NOT_IMPLEMENTED, json!({"data": null}));
    };
    let path = path.to_owned();
    if !form.is_empty() && header("content-type").as_deref() != Some("application/x-www-form-urlencoded") {
        s.problems.push(format!("{method} {path}: form body without a form content type"));
    }

    // Authentication, as PVE does it: a token header, or the ticket cookie plus CSRF on writes.
    let token = header("authorization");
    let cookie = header("cookie").and_then(|c| c.strip_prefix("PVEAuthCookie=").map(str::to_owned));
    let csrf = header("csrfpreventiontoken");
    let auth = if path == "access/ticket" {
        "none"
    } else if let Some(t) = &token {
        if *t != format!("PVEAPIToken={TOKEN_ID}={TOKEN_SECRET}") {
            s.rejected += 1;
            return reply(StatusCode::UNAUTHORIZED, json!({"data": null, "message": "invalid token value!\n"}));
        }
        "token"
    } else if let Some(c) = &cookie {
        if !s.tickets.contains(c) {
            s.rejected += 1;
            return reply(StatusCode::UNAUTHORIZED, json!({"data": null, "message": "authentication failure\n"}));
        }
        if method != "GET" && csrf.as_deref() != Some(&format!("CSRF-{c}")) {
            s.problems.push(format!("{method} {path}: write with a ticket but without its CSRFPreventionToken"));
            return reply(
                StatusCode::UNAUTHORIZED,
                json!({"data": null, "message": "Permission denied - invalid csrf token\n"}),
            );
        }
        "ticket"
    } else {
        s.problems.push(format!("{method} {path}: no credentials"));
        return reply(StatusCode::UNAUTHORIZED, json!({"data": null}));
    };
    s.requests.push(Recorded {
        method: method.clone(),
        path: path.clone(),
        query: query.clone(),
        form: form.clone(),
        auth,
        csrf: csrf.is_some(),
    });

    let segments: Vec<&str> = path.split('/').collect();
    // Route: (kind, node, vmid).
    let (route, node, vmid): (String, Option<String>, Option<u32>) = match segments.as_slice() {
        ["access", "ticket"] => ("access/ticket".into(), None, None),
        ["version"] => ("version".into(), None, None),
        ["cluster", "resources"] => ("cluster/resources".into(), None, None),
        ["cluster", "nextid"] => ("cluster/nextid".into(), None, None),
        ["nodes", n, "tasks", _upid, "status"] => ("task".into(), Some((*n).into()), None),
        ["nodes", n, "qemu", id] => ("vm".into(), Some((*n).into()), id.parse().ok()),
        ["nodes", n, "qemu", id, rest @ ..] => (rest.join("/"), Some((*n).into()), id.parse().ok()),
        _ => (String::new(), None, None),
    };
    let Some(allowed) = allowed(&method, &route) else {
        s.problems.push(format!("{method} {path}: no such endpoint"));
        return reply(
            StatusCode::NOT_IMPLEMENTED,
            json!({"data": null, "message": format!("Method '{method} /{path}' not implemented")}),
        );
    };
    let unknown: Vec<(String, String)> = form
        .iter()
        .chain(&query)
        .filter(|(k, _)| !allowed.contains(&k.as_str()))
        .map(|(k, _)| {
            (k.clone(), "property is not defined in schema and the schema does not allow additional properties".into())
        })
        .collect();
    if !unknown.is_empty() {
        s.problems.push(format!("{method} {path}: unknown parameters {unknown:?}"));
        return bad_params(unknown);
    }
    if check_only {
        return ok(Value::Null);
    }
    let param = |k: &str| form.iter().chain(&query).find(|(key, _)| key == k).map(|(_, v)| v.clone());

    // A VM on a node must be on that node, as PVE reads `nodes/<node>/qemu-server/<vmid>.conf`.
    let vm_here = |s: &State| -> Result<u32, Response<Body>> {
        let (Some(n), Some(id)) = (&node, vmid) else { return Err(fail("bad path".into())) };
        match s.vms.get(&id) {
            Some(vm) if vm.node == *n => Ok(id),
            _ => Err(fail(format!("Configuration file 'nodes/{n}/qemu-server/{id}.conf' does not exist"))),
        }
    };

    match (method.as_str(), route.as_str()) {
        ("POST", "access/ticket") => {
            if param("username").as_deref() != Some(USER) || param("password").as_deref() != Some(PASSWORD) {
                s.rejected += 1;
                return reply(StatusCode::UNAUTHORIZED, json!({"data": null, "message": "authentication failure\n"}));
            }
            s.counter += 1;
            let ticket = format!("PVE:{USER}:6560{:04X}::signature", s.counter);
            s.tickets.push(ticket.clone());
            ok(json!({"username": USER, "ticket": ticket, "CSRFPreventionToken": format!("CSRF-{ticket}")}))
        }
        ("GET", "version") => ok(json!({"version": "8.2.4", "release": "8.2", "repoid": "faa83925c9641325"})),
        ("GET", "cluster/resources") => {
            let kind = param("type");
            let mut out = Vec::new();
            if kind.is_none() || kind.as_deref() == Some("node") {
                for n in &s.nodes {
                    out.push(json!({"id": format!("node/{}", n.name), "type": "node", "node": n.name, "status": if n.online { "online" } else { "offline" }, "maxmem": n.maxmem, "mem": n.mem, "maxcpu": 16, "level": ""}));
                }
            }
            if kind.is_none() || kind.as_deref() == Some("vm") {
                for (id, vm) in &s.vms {
                    let mem: u64 = vm.config.get("memory").and_then(|m| m.parse().ok()).unwrap_or(512);
                    let cores: u64 = vm.config.get("cores").and_then(|m| m.parse().ok()).unwrap_or(1);
                    let mut e = json!({"id": format!("qemu/{id}"), "type": "qemu", "vmid": id, "node": vm.node, "name": vm.name, "status": vm.status, "template": u8::from(vm.template), "maxmem": mem << 20, "maxcpu": cores});
                    if let Some(tags) = vm.config.get("tags") {
                        e["tags"] = json!(tags);
                    }
                    if let Some(lock) = &vm.lock {
                        let _ = lock;
                        e["lock"] = json!("clone");
                    }
                    out.push(e);
                }
            }
            if (kind.is_none() || kind.as_deref() == Some("storage")) && !s.faults.storages_hidden {
                for n in &s.nodes {
                    for st in s.storages.iter().filter(|st| st.enabled_on(&n.name)) {
                        out.push(json!({"id": format!("storage/{}/{}", n.name, st.id), "type": "storage", "storage": st.id, "node": n.name, "plugintype": st.plugin, "shared": u8::from(st.shared), "content": st.content, "status": if n.online { "available" } else { "unknown" }}));
                    }
                }
            }
            ok(Value::Array(out))
        }
        ("GET", "cluster/nextid") => {
            let id = (100..).find(|id| !s.vms.contains_key(id)).unwrap();
            if s.faults.steal_next_id > 0 {
                s.faults.steal_next_id -= 1;
                s.add_vm(id, "pve2", "someone-elses", "stopped", &[]);
            }
            ok(json!(id.to_string()))
        }
        ("POST", "clone") => {
            // qemu-server's clone_vm, checks in its order.
            let local = node.clone().unwrap();
            let target = param("target").filter(|t| *t != local && t != "localhost");
            if let Some(t) = &target
                && !s.nodes.iter().any(|n| n.name == *t)
            {
                return fail(format!("no such cluster node '{t}'"));
            }
            let storage = param("storage");
            if let Some(id) = &storage {
                let Some(st) = s.storages.iter().find(|st| st.id == *id) else {
                    return fail(format!("storage '{id}' does not exist"));
                };
                if st.disabled {
                    return fail(format!("storage '{id}' is disabled"));
                }
                if !st.enabled_on(&local) {
                    return fail(format!("storage '{id}' is not available on node '{local}'"));
                }
                if !st.content.split(',').any(|c| c == "images") {
                    return bad_params(vec![("storage".into(), format!("storage '{id}' does not support vm images"))]);
                }
                if let Some(t) = &target {
                    if !st.enabled_on(t) {
                        return fail(format!("storage '{id}' is not available on node '{t}'"));
                    }
                    if !st.shared {
                        return fail(format!("can't clone to non-shared storage '{id}'"));
                    }
                }
            }
            let source = match vm_here(&s) {
                Ok(id) => id,
                Err(r) => return r,
            };
            let Some(newid) = param("newid").and_then(|v| v.parse::<u32>().ok()) else {
                return bad_params(vec![("newid".into(), "property is missing and it is not optional".into())]);
            };
            let full = match param("full").as_deref() {
                Some(f) => f == "1",
                None => !s.vms[&source].template,
            };
            if storage.is_some() && !full {
                return fail("parameter 'storage' not allowed for linked clones".into());
            }
            let volumes: Vec<(String, Option<String>)> = s.vms[&source]
                .config
                .iter()
                .filter(|(k, _)| is_volume_key(k))
                .filter_map(|(k, v)| volume_storage(v).map(|st| (k.clone(), st)))
                .collect();
            let shared_vm = volumes
                .iter()
                .all(|(_, st)| st.as_ref().is_some_and(|id| s.storages.iter().any(|x| x.id == *id && x.shared)));
            if let Some(t) = &target
                && !shared_vm
            {
                return fail(format!("can't clone VM to node '{t}' (VM uses local storage)"));
            }
            if s.vms.contains_key(&newid) {
                return fail(format!("unable to create VM {newid}: config file already exists"));
            }
            if !full && !s.vms[&source].template {
                let (key, volid) = s.vms[&source]
                    .config
                    .iter()
                    .find(|(k, _)| is_volume_key(k))
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .unwrap_or_default();
                return fail(format!("Linked clone feature is not supported for '{volid}' ({key})"));
            }
            let target = target.unwrap_or(local.clone());
            let name = param("name").unwrap_or_else(|| format!("Copy-of-VM-{source}"));
            let mut config = s.vms[&source].config.clone();
            config.insert("name".into(), name.clone());
            if let Some(d) = param("description") {
                config.insert("description".into(), d);
            }
            // The clone's volumes: on the target storage for a full clone, else beside the base.
            let mut disks = 0;
            for (key, st) in &volumes {
                let value = config[key].clone();
                let options: String = value.split_once(',').map(|(_, o)| format!(",{o}")).unwrap_or_default();
                let on = storage.clone().or(st.clone()).unwrap_or_else(|| "local".into());
                let volume = if value.contains("cloudinit") {
                    format!("vm-{newid}-cloudinit")
                } else {
                    disks += 1;
                    format!("vm-{newid}-disk-{}", disks - 1)
                };
                config.insert(key.clone(), format!("{on}:{volume}{options}"));
            }
            let upid = s.task("qmclone", &local, source, newid);
            s.vms.insert(
                newid,
                Vm { node: target, name, status: "stopped".into(), config, lock: Some(upid.clone()), ..Vm::default() },
            );
            ok(json!(upid))
        }
        ("GET", "config") => {
            let id = match vm_here(&s) {
                Ok(id) => id,
                Err(r) => return r,
            };
            let mut out = serde_json::Map::new();
            for (k, v) in &s.vms[&id].config {
                out.insert(k.clone(), json!(v));
            }
            out.insert("digest".into(), json!("0123456789abcdef0123456789abcdef01234567"));
            ok(Value::Object(out))
        }
        ("PUT", "config") => {
            let id = match vm_here(&s) {
                Ok(id) => id,
                Err(r) => return r,
            };
            if s.vms[&id].lock.is_some() {
                return fail(format!("VM {id} is locked (clone)"));
            }
            let mut errors = Vec::new();
            for key in ["cores", "memory"] {
                if let Some(v) = param(key)
                    && v.parse::<u64>().map_or(true, |n| n == 0)
                {
                    errors.push((key.to_owned(), format!("value '{v}' does not look like a valid positive integer")));
                }
            }
            if let Some(keys) = param("sshkeys") {
                // PVE wants the keys URL-encoded (again) inside the parameter.
                if keys.contains(' ') || keys.contains('\n') {
                    errors.push(("sshkeys".into(), "invalid urlencoded string".into()));
                }
            }
            if let Some(tags) = param("tags")
                && !tags
                    .split(';')
                    .all(|t| !t.is_empty() && t.chars().all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c)))
            {
                errors.push(("tags".into(), format!("invalid format - invalid characters in tag '{tags}'")));
            }
            if !errors.is_empty() {
                s.problems.push(format!("PUT {path}: invalid parameters {errors:?}"));
                return bad_params(errors);
            }
            let vm = s.vms.get_mut(&id).unwrap();
            for (k, v) in &form {
                vm.config.insert(k.clone(), v.clone());
                if k == "name" {
                    vm.name = v.clone();
                }
            }
            ok(Value::Null)
        }
        ("POST", "status/start" | "status/stop" | "status/shutdown") => {
            let id = match vm_here(&s) {
                Ok(id) => id,
                Err(r) => return r,
            };
            let running = s.vms[&id].status == "running";
            let kind = match route.as_str() {
                "status/start" if running => return fail(format!("VM {id} already running")),
                "status/start" => "qmstart",
                _ if !running => return fail(format!("VM {id} not running")),
                "status/stop" => "qmstop",
                _ => "qmshutdown",
            };
            let n = node.clone().unwrap();
            let upid = s.task(kind, &n, id, id);
            ok(json!(upid))
        }
        ("DELETE", "vm") => {
            let id = match vm_here(&s) {
                Ok(id) => id,
                Err(r) => return r,
            };
            if s.vms[&id].status == "running" {
                return fail(format!("VM {id} is running - destroy failed"));
            }
            let n = node.clone().unwrap();
            let upid = s.task("qmdestroy", &n, id, id);
            ok(json!(upid))
        }
        ("GET", "task") => {
            let upid = segments[3].to_owned();
            let Some(task_node) = s.tasks.get(&upid).map(|t| t.node.clone()) else {
                return fail(format!("no such task '{upid}'"));
            };
            if node.as_deref() != Some(task_node.as_str()) {
                s.problems.push(format!("task {upid} polled on node {node:?}, runs on {task_node}"));
            }
            let t = &s.tasks[&upid];
            if t.applied {
                let exit = t.failure.clone().unwrap_or_else(|| "OK".into());
                ok(json!({"upid": upid, "node": t.node, "type": t.kind, "status": "stopped", "exitstatus": exit}))
            } else {
                ok(json!({"upid": upid, "node": t.node, "type": t.kind, "status": "running"}))
            }
        }
        ("POST", "agent/exec") => {
            let id = match vm_here(&s) {
                Ok(id) => id,
                Err(r) => return r,
            };
            let down = s.faults.agent_down_calls;
            let starting = s.faults.starting_answers;
            let join_exit = s.faults.join_exit;
            let command: Vec<String> = form.iter().filter(|(k, _)| k == "command").map(|(_, v)| v.clone()).collect();
            let vm = s.vms.get_mut(&id).unwrap();
            if vm.status != "running" {
                return fail(format!("VM {id} is not running"));
            }
            vm.agent_calls += 1;
            if vm.agent_calls <= down {
                return fail("QEMU guest agent is not running".into());
            }
            let (exitcode, out) = match command.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
                ["systemctl", "is-system-running"] => {
                    let state = if vm.agent_calls <= down + starting { "starting" } else { "running" };
                    (if state == "running" { 0 } else { 1 }, format!("{state}\n"))
                }
                ["/bin/sh", "-c", script] => {
                    vm.joined.push((*script).to_owned());
                    (join_exit, String::new())
                }
                other => (127, format!("unexpected command {other:?}")),
            };
            s.next_pid += 1;
            let pid = 1000 + s.next_pid;
            s.execs.insert(pid, Exec { exitcode, out, polled: false });
            ok(json!({"pid": pid}))
        }
        ("GET", "agent/exec-status") => {
            if let Err(r) = vm_here(&s) {
                return r;
            }
            let Some(pid) = param("pid").and_then(|p| p.parse::<u64>().ok()) else {
                return bad_params(vec![("pid".into(), "property is missing and it is not optional".into())]);
            };
            let Some(exec) = s.execs.get_mut(&pid) else {
                return fail("Agent error: Invalid parameter 'pid'".to_string());
            };
            // The first poll finds it still running, as a real guest usually does.
            if !exec.polled {
                exec.polled = true;
                return ok(json!({"exited": 0}));
            }
            ok(json!({"exited": 1, "exitcode": exec.exitcode, "out-data": exec.out}))
        }
        _ => {
            s.problems.push(format!("{method} {path}: routed but not handled"));
            reply(StatusCode::NOT_IMPLEMENTED, json!({"data": null}))
        }
    }
}
