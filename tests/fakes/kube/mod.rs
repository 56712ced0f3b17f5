//! A fake Kubernetes API server for the calls Flotilla makes: Nodes (list with label selectors
//! and `limit`/`continue` paging, get, create, delete with `preconditions.uid`), Leases
//! (`coordination.k8s.io/v1`: get, create, update with optimistic concurrency) and ConfigMaps
//! (server-side apply with field managers).
//!
//! It follows kube-apiserver's behaviour for what Flotilla depends on: `Status` error bodies
//! with the real reasons and messages (`NotFound`, `AlreadyExists`, `Conflict` for a stale
//! `resourceVersion` or a failed uid precondition, `Invalid` for a Lease update without a
//! `resourceVersion`: Leases do not allow unconditional updates), a `resourceVersion` that
//! changes on every write, uids, and RBAC: every request is authenticated by bearer token (or
//! accepted as the client certificate's user over TLS) and, when the test grants permissions,
//! authorised by verb and resource, answering 403 Forbidden as the API does.
//!
//! Every request is recorded. Anything the real API would refuse as malformed (a wrong
//! content type, a body that does not match the URL, an apply without `fieldManager`) is a
//! *problem*: answered with the API's error and listed by [`Fake::assert_clean`], which every
//! test calls at its end. Faults can be injected: an outage (503 for everything), a status for
//! the next matching request, and a lost response (the API acts, then the answer never comes).
#![allow(dead_code, reason = "not every test uses every knob")]

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, Method, StatusCode, Uri},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};

/// One request as the fake saw it.
#[derive(Clone, Debug)]
pub struct Request {
    pub method: Method,
    /// Path and query, as sent.
    pub uri: String,
    pub content_type: Option<String>,
    pub bearer: Option<String>,
    pub body: Value,
}

impl Request {
    pub fn path(&self) -> &str {
        self.uri.split('?').next().unwrap_or_default()
    }

    pub fn query(&self, key: &str) -> Option<String> {
        let query = self.uri.split_once('?')?.1;
        form_urlencoded::parse(query.as_bytes()).find(|(k, _)| k == key).map(|(_, v)| v.into_owned())
    }
}

/// A fault for the next request matching `method` and a path starting with `path`.
#[derive(Clone, Debug)]
struct Injected {
    method: Method,
    path: String,
    fault: Fault,
}

#[derive(Clone, Debug)]
enum Fault {
    /// Answer this status with a Status body of this reason, without acting.
    Status(u16, &'static str),
    /// Act, then hold the answer this long (the client's timeout fires: the response is lost).
    LoseAnswer(Duration),
}

/// An object with the field managers of its data keys (server-side apply).
#[derive(Clone, Debug)]
struct Stored {
    object: Value,
    /// data key -> field manager that owns it (ConfigMaps only).
    owners: BTreeMap<String, String>,
}

struct Inner {
    base: String,
    /// Accepted bearer tokens -> user name. Empty means any request without a token is
    /// anonymous and refused.
    tokens: BTreeMap<String, String>,
    /// Over TLS, a client certificate authenticates as this user.
    tls_user: Option<String>,
    /// user -> (verb, resource) pairs granted; a user absent here may do anything.
    grants: BTreeMap<String, BTreeSet<(String, String)>>,
    outage: bool,
    resource_version: u64,
    uid_seq: u64,
    nodes: BTreeMap<String, Stored>,
    /// (namespace, name)
    leases: BTreeMap<(String, String), Stored>,
    config_maps: BTreeMap<(String, String), Stored>,
    injected: Vec<Injected>,
    requests: Vec<Request>,
    problems: Vec<String>,
}

/// A running fake API server.
#[derive(Clone)]
pub struct Fake {
    pub base: String,
    /// PEM of the CA that signed the server's certificate (TLS fakes only).
    pub ca_pem: Option<String>,
    inner: Arc<Mutex<Inner>>,
}

fn status(code: u16, reason: &str, message: impl Into<String>, details: Option<Value>) -> Response {
    let mut body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message.into(), "reason": reason, "code": code,
    });
    if let Some(d) = details {
        body["details"] = d;
    }
    (StatusCode::from_u16(code).unwrap(), [("content-type", "application/json")], body.to_string()).into_response()
}

fn ok(code: StatusCode, object: &Value) -> Response {
    (code, [("content-type", "application/json")], object.to_string()).into_response()
}

/// What a resource is called in messages and RBAC.
#[derive(Clone, Copy)]
struct Kind {
    /// RBAC resource and message prefix (`nodes`, `leases.coordination.k8s.io`).
    resource: &'static str,
    qualified: &'static str,
    group: &'static str,
}

const NODES: Kind = Kind { resource: "nodes", qualified: "nodes", group: "" };
const LEASES: Kind = Kind { resource: "leases", qualified: "leases.coordination.k8s.io", group: "coordination.k8s.io" };
const CONFIG_MAPS: Kind = Kind { resource: "configmaps", qualified: "configmaps", group: "" };

fn details(kind: Kind, name: &str) -> Value {
    let mut d = json!({ "name": name, "kind": kind.resource });
    if !kind.group.is_empty() {
        d["group"] = json!(kind.group);
    }
    d
}

fn not_found(kind: Kind, name: &str) -> Response {
    status(404, "NotFound", format!("{} \"{name}\" not found", kind.qualified), Some(details(kind, name)))
}

fn conflict(kind: Kind, name: &str, why: &str) -> Response {
    status(
        409,
        "Conflict",
        format!("Operation cannot be fulfilled on {} \"{name}\": {why}", kind.qualified),
        Some(details(kind, name)),
    )
}

fn is_dns_subdomain(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// Does a label selector (`a=b,c!=d,e,!f`) match these labels?
fn selector_matches(selector: &str, labels: &serde_json::Map<String, Value>) -> Result<bool, String> {
    for term in selector.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let get = |k: &str| labels.get(k).and_then(Value::as_str);
        let matched = if let Some((k, v)) = term.split_once("!=") {
            get(k.trim()) != Some(v.trim())
        } else if let Some((k, v)) = term.split_once("==").or_else(|| term.split_once('=')) {
            get(k.trim()) == Some(v.trim())
        } else if let Some(k) = term.strip_prefix('!') {
            get(k.trim()).is_none()
        } else if term.contains(' ') || term.contains('(') {
            return Err(format!("set-based selector {term:?} is not modelled"));
        } else {
            get(term).is_some()
        };
        if !matched {
            return Ok(false);
        }
    }
    Ok(true)
}

impl Fake {
    /// A fake over plain HTTP that accepts the bearer token `token`.
    pub async fn start(token: &str) -> Fake {
        Fake::start_with(Some(token), false).await
    }

    /// A fake over HTTPS (a certificate for 127.0.0.1 signed by a fresh CA, in `ca_pem`) that
    /// accepts the bearer token `token`.
    pub async fn start_tls(token: &str) -> Fake {
        Fake::start_with(Some(token), true).await
    }

    async fn start_with(token: Option<&str>, tls: bool) -> Fake {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let scheme = if tls { "https" } else { "http" };
        let base = format!("{scheme}://{}", listener.local_addr().unwrap());
        let inner = Arc::new(Mutex::new(Inner {
            base: base.clone(),
            tokens: token
                .map(|t| (t.to_owned(), "system:serviceaccount:kube-system:flotilla".to_owned()))
                .into_iter()
                .collect(),
            tls_user: None,
            grants: BTreeMap::new(),
            outage: false,
            resource_version: 100,
            uid_seq: 0,
            nodes: BTreeMap::new(),
            leases: BTreeMap::new(),
            config_maps: BTreeMap::new(),
            injected: Vec::new(),
            requests: Vec::new(),
            problems: Vec::new(),
        }));
        let app = Router::new().fallback(handle).with_state(Arc::clone(&inner));
        let mut ca_pem = None;
        if tls {
            let (acceptor, ca) = tls_acceptor();
            ca_pem = Some(ca);
            let listener = TlsListener { tcp: listener, acceptor };
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        } else {
            tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        }
        Fake { base, ca_pem, inner }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Writes a kubeconfig for this fake with `token` (plain HTTP fakes).
    pub fn kubeconfig(&self, dir: &std::path::Path, token: &str) -> std::path::PathBuf {
        let path = dir.join("kubeconfig");
        let mut cluster = format!("server: {}", self.base);
        if let Some(ca) = &self.ca_pem {
            std::fs::write(dir.join("ca.crt"), ca).unwrap();
            cluster.push_str(&format!(", certificate-authority: {}", dir.join("ca.crt").display()));
        }
        std::fs::write(
            &path,
            format!(
                "apiVersion: v1\nkind: Config\ncurrent-context: t\nclusters: [{{name: c, cluster: {{{cluster}}}}}]\n\
                 contexts: [{{name: t, context: {{cluster: c, user: u, namespace: flotilla}}}}]\n\
                 users: [{{name: u, user: {{token: {token}}}}}]\n"
            ),
        )
        .unwrap();
        path
    }

    /// Accepts `token` from now on, as user `user`; other tokens stay valid.
    pub fn add_token(&self, token: &str, user: &str) {
        self.lock().tokens.insert(token.to_owned(), user.to_owned());
    }

    /// Stops accepting `token` (it expired or was rotated away).
    pub fn revoke_token(&self, token: &str) {
        self.lock().tokens.remove(token);
    }

    /// Turns RBAC on for `user`: only these `(verb, resource)` pairs are allowed.
    pub fn grant(&self, user: &str, rules: &[(&str, &str)]) {
        let rules = rules.iter().map(|(v, r)| ((*v).to_owned(), (*r).to_owned())).collect();
        self.lock().grants.insert(user.to_owned(), rules);
    }

    /// While set, every request answers 503 (the API server is unreachable or overloaded).
    pub fn set_outage(&self, down: bool) {
        self.lock().outage = down;
    }

    /// The next `method` request to a path starting with `path` answers `code` with `reason`.
    pub fn fail_next(&self, method: Method, path: &str, code: u16, reason: &'static str) {
        self.lock().injected.push(Injected { method, path: path.to_owned(), fault: Fault::Status(code, reason) });
    }

    /// The next `method` request to a path starting with `path` is carried out, but its answer
    /// is held back for `hold` (longer than the client's timeout: the answer is lost).
    pub fn lose_next_answer(&self, method: Method, path: &str, hold: Duration) {
        self.lock().injected.push(Injected { method, path: path.to_owned(), fault: Fault::LoseAnswer(hold) });
    }

    /// Adds a Node as a kubelet (or anyone) would; returns its uid.
    pub fn add_node(&self, name: &str, provider_id: &str, labels: &[(&str, &str)]) -> String {
        let mut i = self.lock();
        let labels: serde_json::Map<String, Value> =
            labels.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect();
        let mut node = json!({
            "apiVersion": "v1", "kind": "Node",
            "metadata": { "name": name, "labels": labels },
            "spec": {},
        });
        if !provider_id.is_empty() {
            node["spec"]["providerID"] = json!(provider_id);
        }
        i.stamp_new(&mut node);
        let uid = node["metadata"]["uid"].as_str().unwrap().to_owned();
        i.nodes.insert(name.to_owned(), Stored { object: node, owners: BTreeMap::new() });
        uid
    }

    /// Node names, sorted.
    pub fn node_names(&self) -> Vec<String> {
        self.lock().nodes.keys().cloned().collect()
    }

    pub fn node(&self, name: &str) -> Option<Value> {
        self.lock().nodes.get(name).map(|s| s.object.clone())
    }

    pub fn lease(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock().leases.get(&(namespace.to_owned(), name.to_owned())).map(|s| s.object.clone())
    }

    /// Writes a Lease as another client would (e.g. a replica on another host).
    pub fn put_lease(&self, namespace: &str, name: &str, spec: Value) {
        let mut i = self.lock();
        let mut lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": { "name": name, "namespace": namespace }, "spec": spec,
        });
        match i.leases.get(&(namespace.to_owned(), name.to_owned())) {
            Some(old) => {
                lease["metadata"]["uid"] = old.object["metadata"]["uid"].clone();
                i.resource_version += 1;
                lease["metadata"]["resourceVersion"] = json!(i.resource_version.to_string());
            }
            None => i.stamp_new(&mut lease),
        }
        i.leases.insert((namespace.to_owned(), name.to_owned()), Stored { object: lease, owners: BTreeMap::new() });
    }

    pub fn config_map(&self, namespace: &str, name: &str) -> Option<Value> {
        self.lock().config_maps.get(&(namespace.to_owned(), name.to_owned())).map(|s| s.object.clone())
    }

    /// Writes a ConfigMap as `kubectl create` would (field manager `kubectl-create`).
    pub fn put_config_map(&self, namespace: &str, name: &str, data: &[(&str, &str)]) {
        let mut i = self.lock();
        let data: serde_json::Map<String, Value> =
            data.iter().map(|(k, v)| ((*k).to_owned(), Value::String((*v).to_owned()))).collect();
        let owners = data.keys().map(|k| (k.clone(), "kubectl-create".to_owned())).collect();
        let mut cm = json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": { "name": name, "namespace": namespace }, "data": data,
        });
        i.stamp_new(&mut cm);
        i.config_maps.insert((namespace.to_owned(), name.to_owned()), Stored { object: cm, owners });
    }

    pub fn requests(&self) -> Vec<Request> {
        self.lock().requests.clone()
    }

    /// `METHOD path` of every request, in order (query left off).
    pub fn calls(&self) -> Vec<String> {
        self.lock().requests.iter().map(|r| format!("{} {}", r.method, r.path())).collect()
    }

    pub fn forget_requests(&self) {
        self.lock().requests.clear();
    }

    /// Panics listing every request the fake found wrong.
    pub fn assert_clean(&self) {
        let i = self.lock();
        assert!(
            i.problems.is_empty(),
            "the fake Kubernetes API saw {} bad requests:\n{}",
            i.problems.len(),
            i.problems.join("\n")
        );
    }
}

impl Inner {
    fn stamp_new(&mut self, object: &mut Value) {
        self.uid_seq += 1;
        self.resource_version += 1;
        let meta = &mut object["metadata"];
        meta["uid"] = json!(format!("{:08x}-0000-4000-8000-{:012x}", self.uid_seq, self.uid_seq * 7919));
        meta["resourceVersion"] = json!(self.resource_version.to_string());
        meta["creationTimestamp"] = json!("2026-08-01T00:00:00Z");
    }

    fn bump(&mut self, object: &mut Value) {
        self.resource_version += 1;
        object["metadata"]["resourceVersion"] = json!(self.resource_version.to_string());
    }

    fn problem(&mut self, text: String) {
        self.problems.push(text);
    }
}

/// The verb RBAC sees for a request.
fn verb(method: &Method, named: bool) -> &'static str {
    match *method {
        Method::GET if named => "get",
        Method::GET => "list",
        Method::POST => "create",
        Method::PUT => "update",
        Method::PATCH => "patch",
        Method::DELETE => "delete",
        _ => "unknown",
    }
}

async fn handle(
    State(inner): State<Arc<Mutex<Inner>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (response, hold) = {
        let mut i = inner.lock().unwrap_or_else(|e| e.into_inner());
        respond(&mut i, &method, &uri, &headers, &body)
    };
    if let Some(hold) = hold {
        tokio::time::sleep(hold).await;
    }
    response
}

fn respond(
    i: &mut Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> (Response, Option<Duration>) {
    let content_type = headers.get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let bearer = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::to_owned);
    let parsed: Value = if body.is_empty() { Value::Null } else { serde_json::from_slice(body).unwrap_or(Value::Null) };
    let uri_text = uri.path_and_query().map(|p| p.as_str().to_owned()).unwrap_or_default();
    let request = Request {
        method: method.clone(),
        uri: uri_text.clone(),
        content_type: content_type.clone(),
        bearer: bearer.clone(),
        body: parsed.clone(),
    };
    i.requests.push(request.clone());
    if i.outage {
        return (status(503, "ServiceUnavailable", "the server is currently unable to handle the request", None), None);
    }

    // Authentication.
    let user = match &bearer {
        Some(t) => match i.tokens.get(t) {
            Some(u) => u.clone(),
            None => return (status(401, "Unauthorized", "Unauthorized", None), None),
        },
        None => match &i.tls_user {
            Some(u) => u.clone(),
            None => return (status(401, "Unauthorized", "Unauthorized", None), None),
        },
    };
    if headers.get("accept").and_then(|v| v.to_str().ok()).is_none_or(|a| !a.contains("application/json")) {
        i.problem(format!("{method} {uri_text}: no Accept: application/json"));
    }

    // Routing.
    let path = uri.path().to_owned();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (kind, namespace, name): (Kind, Option<String>, Option<String>) = match segments.as_slice() {
        ["api", "v1", "nodes"] => (NODES, None, None),
        ["api", "v1", "nodes", n] => (NODES, None, Some((*n).to_owned())),
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases"] => (LEASES, Some((*ns).to_owned()), None),
        ["apis", "coordination.k8s.io", "v1", "namespaces", ns, "leases", n] => {
            (LEASES, Some((*ns).to_owned()), Some((*n).to_owned()))
        }
        ["api", "v1", "namespaces", ns, "configmaps", n] => {
            (CONFIG_MAPS, Some((*ns).to_owned()), Some((*n).to_owned()))
        }
        _ => {
            i.problem(format!("{method} {uri_text}: a path Flotilla has no business calling"));
            return (status(404, "NotFound", "the server could not find the requested resource", None), None);
        }
    };

    // Authorisation.
    let v = verb(method, name.is_some());
    if let Some(rules) = i.grants.get(&user)
        && !rules.contains(&(v.to_owned(), kind.resource.to_owned()))
    {
        let scope = match &namespace {
            Some(ns) => format!("in the namespace \"{ns}\""),
            None => "at the cluster scope".to_owned(),
        };
        let what = match &name {
            Some(n) => format!("{} \"{n}\"", kind.qualified),
            None => kind.qualified.to_owned(),
        };
        i.problem(format!("{method} {uri_text}: {user} may not {v} {}", kind.resource));
        return (
            status(
                403,
                "Forbidden",
                format!(
                    "{what} is forbidden: User \"{user}\" cannot {v} resource \"{}\" in API group \"{}\" {scope}",
                    kind.resource, kind.group
                ),
                Some(details(kind, name.as_deref().unwrap_or_default())),
            ),
            None,
        );
    }

    // A server-side apply that creates the object is also authorised as a create (as
    // kube-apiserver does), and `create` cannot be limited to a name.
    if *method == Method::PATCH
        && kind.resource == "configmaps"
        && let (Some(ns), Some(n)) = (&namespace, &name)
        && !i.config_maps.contains_key(&(ns.clone(), n.clone()))
        && let Some(rules) = i.grants.get(&user)
        && !rules.contains(&("create".to_owned(), "configmaps".to_owned()))
    {
        i.problem(format!("{method} {uri_text}: {user} may not create configmaps (an apply that creates)"));
        return (
            status(
                403,
                "Forbidden",
                format!(
                    "configmaps \"{n}\" is forbidden: User \"{user}\" cannot create resource \"configmaps\" in API group \"\" in the namespace \"{ns}\""
                ),
                Some(details(CONFIG_MAPS, n)),
            ),
            None,
        );
    }

    // Injected faults.
    let mut hold = None;
    if let Some(pos) = i.injected.iter().position(|f| f.method == *method && path.starts_with(&f.path)) {
        match i.injected.remove(pos).fault {
            Fault::Status(code, reason) => {
                return (status(code, reason, format!("injected {code} {reason}"), None), None);
            }
            Fault::LoseAnswer(d) => hold = Some(d),
        }
    }

    let needs_json = matches!(*method, Method::POST | Method::PUT) || (*method == Method::DELETE && !body.is_empty());
    if needs_json && content_type.as_deref() != Some("application/json") {
        i.problem(format!("{method} {uri_text}: content type {content_type:?}, expected application/json"));
        return (status(415, "UnsupportedMediaType", "unsupported media type", None), hold);
    }
    if !body.is_empty() && parsed.is_null() {
        i.problem(format!("{method} {uri_text}: the body is not JSON"));
        return (status(400, "BadRequest", "the body is not JSON", None), hold);
    }

    let response = match (kind.resource, method.clone(), name) {
        ("nodes", Method::GET, None) => list_nodes(i, &request),
        ("nodes", Method::GET, Some(n)) => match i.nodes.get(&n) {
            Some(s) => ok(StatusCode::OK, &s.object),
            None => not_found(NODES, &n),
        },
        ("nodes", Method::POST, None) => create_node(i, parsed),
        ("nodes", Method::DELETE, Some(n)) => delete_node(i, &n, &parsed, &uri_text),
        ("leases", Method::GET, Some(n)) => match i.leases.get(&(namespace.clone().unwrap_or_default(), n.clone())) {
            Some(s) => ok(StatusCode::OK, &s.object),
            None => not_found(LEASES, &n),
        },
        ("leases", Method::POST, None) => create_lease(i, namespace.unwrap_or_default(), parsed, &uri_text),
        ("leases", Method::PUT, Some(n)) => update_lease(i, namespace.unwrap_or_default(), n, parsed, &uri_text),
        ("configmaps", Method::PATCH, Some(n)) => apply_config_map(i, namespace.unwrap_or_default(), n, &request, body),
        _ => {
            i.problem(format!("{method} {uri_text}: a verb Flotilla has no business using here"));
            status(405, "MethodNotAllowed", "the server does not allow this method on the requested resource", None)
        }
    };
    (response, hold)
}

fn list_nodes(i: &mut Inner, request: &Request) -> Response {
    let selector = request.query("labelSelector").unwrap_or_default();
    let limit: usize = request.query("limit").and_then(|l| l.parse().ok()).unwrap_or(usize::MAX);
    let after = request.query("continue");
    let mut items = Vec::new();
    let mut next = None;
    for (name, stored) in &i.nodes {
        if after.as_deref().is_some_and(|a| name.as_str() <= a) {
            continue;
        }
        let labels = stored.object["metadata"]["labels"].as_object().cloned().unwrap_or_default();
        match selector_matches(&selector, &labels) {
            Ok(true) => {}
            Ok(false) => continue,
            Err(e) => {
                let text = format!("GET {}: {e}", request.uri);
                i.problems.push(text);
                return status(400, "BadRequest", e, None);
            }
        }
        if items.len() == limit {
            next = items.last().map(|n: &Value| n["metadata"]["name"].as_str().unwrap_or_default().to_owned());
            break;
        }
        items.push(stored.object.clone());
    }
    let mut list = json!({
        "kind": "NodeList", "apiVersion": "v1",
        "metadata": { "resourceVersion": i.resource_version.to_string() },
        "items": items,
    });
    if let Some(token) = next {
        list["metadata"]["continue"] = json!(token);
    }
    ok(StatusCode::OK, &list)
}

fn create_node(i: &mut Inner, mut node: Value) -> Response {
    let name = node["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    if node["kind"] != "Node" || node["apiVersion"] != "v1" || !is_dns_subdomain(&name) {
        i.problem(format!("POST /api/v1/nodes: not a valid v1 Node: {node}"));
        return status(422, "Invalid", format!("Node \"{name}\" is invalid"), Some(details(NODES, &name)));
    }
    if i.nodes.contains_key(&name) {
        return status(409, "AlreadyExists", format!("nodes \"{name}\" already exists"), Some(details(NODES, &name)));
    }
    i.stamp_new(&mut node);
    i.nodes.insert(name, Stored { object: node.clone(), owners: BTreeMap::new() });
    ok(StatusCode::CREATED, &node)
}

fn delete_node(i: &mut Inner, name: &str, options: &Value, uri: &str) -> Response {
    if !options.is_null() && (options["kind"] != "DeleteOptions" || options["apiVersion"] != "v1") {
        i.problem(format!("DELETE {uri}: the body is not v1 DeleteOptions: {options}"));
        return status(400, "BadRequest", "the body is not DeleteOptions", None);
    }
    let Some(stored) = i.nodes.get(name) else { return not_found(NODES, name) };
    if let Some(want) = options["preconditions"]["uid"].as_str() {
        let have = stored.object["metadata"]["uid"].as_str().unwrap_or_default();
        if want != have {
            return conflict(
                NODES,
                name,
                &format!("Precondition failed: UID in precondition: {want}, UID in object meta: {have}"),
            );
        }
    }
    let removed = i.nodes.remove(name).expect("checked above");
    ok(StatusCode::OK, &removed.object)
}

fn check_lease_body(i: &mut Inner, lease: &Value, namespace: &str, name: Option<&str>, uri: &str) -> Option<Response> {
    let body_name = lease["metadata"]["name"].as_str().unwrap_or_default();
    let body_ns = lease["metadata"]["namespace"].as_str();
    if lease["kind"] != "Lease" || lease["apiVersion"] != "coordination.k8s.io/v1" {
        i.problem(format!("{uri}: not a coordination.k8s.io/v1 Lease: {lease}"));
        return Some(status(400, "BadRequest", "the body is not a coordination.k8s.io/v1 Lease", None));
    }
    if let Some(name) = name
        && body_name != name
    {
        i.problem(format!("{uri}: body names {body_name:?}"));
        return Some(status(
            400,
            "BadRequest",
            format!("the name of the object ({body_name}) does not match the name on the URL ({name})"),
            None,
        ));
    }
    if body_ns.is_some_and(|ns| ns != namespace) {
        i.problem(format!("{uri}: body namespace {body_ns:?}"));
        return Some(status(
            400,
            "BadRequest",
            "the namespace of the provided object does not match the namespace sent on the request",
            None,
        ));
    }
    let spec = &lease["spec"];
    let bad_duration = spec["leaseDurationSeconds"].as_i64().is_some_and(|d| d <= 0);
    let bad_transitions = spec["leaseTransitions"].as_i64().is_some_and(|t| t < 0);
    let bad_time = ["acquireTime", "renewTime"]
        .iter()
        .any(|k| spec[*k].as_str().is_some_and(|t| humantime::parse_rfc3339(t).is_err() || !t.contains('.')));
    if bad_duration || bad_transitions || bad_time || !is_dns_subdomain(body_name) {
        i.problem(format!("{uri}: invalid Lease {lease}"));
        return Some(status(422, "Invalid", format!("Lease.coordination.k8s.io \"{body_name}\" is invalid"), None));
    }
    None
}

fn create_lease(i: &mut Inner, namespace: String, mut lease: Value, uri: &str) -> Response {
    if let Some(bad) = check_lease_body(i, &lease, &namespace, None, uri) {
        return bad;
    }
    let name = lease["metadata"]["name"].as_str().unwrap_or_default().to_owned();
    if lease["metadata"].get("resourceVersion").is_some_and(|v| !v.is_null()) {
        i.problem(format!("POST {uri}: a create carries a resourceVersion"));
        return status(400, "BadRequest", "resourceVersion should not be set on objects to be created", None);
    }
    if i.leases.contains_key(&(namespace.clone(), name.clone())) {
        return status(
            409,
            "AlreadyExists",
            format!("leases.coordination.k8s.io \"{name}\" already exists"),
            Some(details(LEASES, &name)),
        );
    }
    lease["metadata"]["namespace"] = json!(namespace);
    i.stamp_new(&mut lease);
    i.leases.insert((namespace, name), Stored { object: lease.clone(), owners: BTreeMap::new() });
    ok(StatusCode::CREATED, &lease)
}

fn update_lease(i: &mut Inner, namespace: String, name: String, mut lease: Value, uri: &str) -> Response {
    if let Some(bad) = check_lease_body(i, &lease, &namespace, Some(&name), uri) {
        return bad;
    }
    let key = (namespace.clone(), name.clone());
    let Some(current) = i.leases.get(&key) else { return not_found(LEASES, &name) };
    let Some(sent) = lease["metadata"]["resourceVersion"].as_str() else {
        i.problem(format!("PUT {uri}: an update without resourceVersion"));
        return status(
            422,
            "Invalid",
            format!(
                "Lease.coordination.k8s.io \"{name}\" is invalid: metadata.resourceVersion: Invalid value: 0x0: must be specified for an update"
            ),
            None,
        );
    };
    if current.object["metadata"]["resourceVersion"].as_str() != Some(sent) {
        return conflict(
            LEASES,
            &name,
            "the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    lease["metadata"]["uid"] = current.object["metadata"]["uid"].clone();
    lease["metadata"]["namespace"] = json!(namespace);
    i.bump(&mut lease);
    i.leases.insert(key, Stored { object: lease.clone(), owners: BTreeMap::new() });
    ok(StatusCode::OK, &lease)
}

/// Server-side apply of a ConfigMap: the applier owns the data keys it sends; keys it owned
/// before and no longer sends are removed; keys another manager owns conflict unless `force`.
fn apply_config_map(i: &mut Inner, namespace: String, name: String, request: &Request, raw: &[u8]) -> Response {
    let uri = &request.uri;
    if request.content_type.as_deref() != Some("application/apply-patch+yaml") {
        i.problem(format!("PATCH {uri}: content type {:?} is not a server-side apply", request.content_type));
        return status(415, "UnsupportedMediaType", "the body of the request was in an unknown format", None);
    }
    let Some(manager) = request.query("fieldManager").filter(|m| !m.is_empty()) else {
        i.problem(format!("PATCH {uri}: an apply without fieldManager"));
        return status(400, "BadRequest", "PATCH, fieldManager: Required value: is required for apply patch", None);
    };
    let force = request.query("force").as_deref() == Some("true");
    let applied: Value = serde_yaml::from_slice(raw).unwrap_or(Value::Null);
    if applied["kind"] != "ConfigMap"
        || applied["apiVersion"] != "v1"
        || applied["metadata"]["name"] != json!(name)
        || applied["metadata"]["namespace"].as_str().is_some_and(|ns| ns != namespace)
    {
        i.problem(format!("PATCH {uri}: not this v1 ConfigMap: {applied}"));
        return status(400, "BadRequest", "the applied object does not match the URL", None);
    }
    let data = applied["data"].as_object().cloned().unwrap_or_default();
    if data.values().any(|v| !v.is_string()) {
        i.problem(format!("PATCH {uri}: data values must be strings"));
        return status(422, "Invalid", "data values must be strings", None);
    }
    let key = (namespace.clone(), name.clone());
    let existing = i.config_maps.get(&key).cloned();
    let (mut object, mut owners, created) = match existing {
        Some(s) => (s.object, s.owners, false),
        None => (
            json!({ "apiVersion": "v1", "kind": "ConfigMap", "metadata": { "name": name, "namespace": namespace }, "data": {} }),
            BTreeMap::new(),
            true,
        ),
    };
    let conflicts: Vec<String> = data
        .iter()
        .filter(|(k, v)| owners.get(*k).is_some_and(|m| *m != manager) && object["data"][k.as_str()] != **v)
        .map(|(k, _)| format!(".data.{k} (owned by {})", owners[k]))
        .collect();
    if !conflicts.is_empty() && !force {
        return status(
            409,
            "Conflict",
            format!("Apply failed with {} conflict: conflicts with {}", conflicts.len(), conflicts.join(", ")),
            None,
        );
    }
    let mut current = object["data"].as_object().cloned().unwrap_or_default();
    current.retain(|k, _| owners.get(k).is_none_or(|m| *m != manager) || data.contains_key(k));
    owners.retain(|k, m| *m != manager || data.contains_key(k));
    for (k, v) in data {
        owners.insert(k.clone(), manager.clone());
        current.insert(k, v);
    }
    object["data"] = Value::Object(current);
    if let Some(labels) = applied["metadata"]["labels"].as_object() {
        let mut merged = object["metadata"]["labels"].as_object().cloned().unwrap_or_default();
        merged.extend(labels.clone());
        object["metadata"]["labels"] = Value::Object(merged);
    }
    if created {
        i.stamp_new(&mut object);
    } else {
        i.bump(&mut object);
    }
    i.config_maps.insert(key, Stored { object: object.clone(), owners });
    ok(if created { StatusCode::CREATED } else { StatusCode::OK }, &object)
}

fn tls_acceptor() -> (tokio_rustls::TlsAcceptor, String) {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    use tokio_rustls::rustls::{
        self,
        pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject},
    };
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "fake kubernetes ca");
    let ca = CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = CertificateParams::new(vec!["127.0.0.1".to_owned(), "kubernetes.default.svc".to_owned()])
        .unwrap()
        .signed_by(&key, &ca)
        .unwrap();
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_slice_iter(cert.pem().as_bytes()).collect::<Result<_, _>>().unwrap();
    let key = PrivateKeyDer::from_pem_slice(key.serialize_pem().as_bytes()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .unwrap();
    (tokio_rustls::TlsAcceptor::from(Arc::new(config)), ca.pem())
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
