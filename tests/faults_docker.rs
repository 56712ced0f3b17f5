//! The fault suite (see `tests/faults.rs`) against a real Docker engine, through a proxy that
//! injects the faults an engine never shows on demand: a 500 before the engine acted, a request
//! never answered, an answer lost after the engine acted, a start that fails after the
//! container was made. Needs the private engine of `tests/docker/engine.sh` (like
//! `tests/docker.rs`): `cargo test --test faults_docker -- --include-ignored`.
//!
//! Docker cannot relabel a container, so a delete cannot be marked on the engine
//! (`mark_deleting` is the default no-op): there is no `kill -9` during deletes here.

mod support;

use std::{
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Duration,
};

use axum::{
    Router,
    body::{Body, to_bytes},
    http::{Request, Response, StatusCode, header},
};
use http_body_util::BodyExt;
use support::faults::{CALL_FAULTS, Cloud, CloudView, Fault, Op, SETTLE, Serve, cloud_reaches, scenario, settle};

const IMAGE: &str = "flotilla-test/busybox:latest";
const IDLE: &str = r#"["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]"#;

fn socket() -> PathBuf {
    let host = std::env::var("FLOTILLA_DOCKER_HOST").unwrap_or_else(|_| {
        panic!("FLOTILLA_DOCKER_HOST is not set: run `tests/docker/engine.sh start` and export the line it prints")
    });
    PathBuf::from(host.strip_prefix("unix://").expect("a unix:// engine"))
}

#[derive(Clone, Copy, Debug)]
enum Action {
    Fail,
    LoseAnswer,
    Hang,
    HangAfter,
}

/// One armed fault: the next request with this method whose path ends with `suffix`.
struct Armed {
    method: &'static str,
    suffix: String,
    action: Action,
}

/// A proxy on loopback TCP in front of the engine's socket, with armed faults and a latency.
#[derive(Clone)]
struct Proxy {
    addr: std::net::SocketAddr,
    armed: Arc<Mutex<Vec<Armed>>>,
    latency: Arc<Mutex<Duration>>,
}

async fn forward(socket: &std::path::Path, req: Request<Body>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let bytes = to_bytes(body, usize::MAX).await.unwrap_or_default();
    let stream = tokio::net::UnixStream::connect(socket).await.expect("the engine socket");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await.expect("HTTP to the engine");
    tokio::spawn(conn);
    let mut out = Request::from_parts(parts, http_body_util::Full::new(bytes));
    out.headers_mut().insert(header::HOST, "docker".parse().unwrap());
    let answer = sender.send_request(out).await.expect("the engine answers");
    let (mut parts, body) = answer.into_parts();
    // Hop-by-hop: the body goes on whole, framed anew.
    for h in [header::TRANSFER_ENCODING, header::CONNECTION, header::CONTENT_LENGTH] {
        parts.headers.remove(h);
    }
    let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
    Response::from_parts(parts, Body::from(bytes))
}

fn engine_error(status: StatusCode, message: &str) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(Body::from(serde_json::json!({ "message": message }).to_string()))
        .unwrap()
}

impl Proxy {
    async fn start() -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let proxy = Proxy {
            addr: listener.local_addr().unwrap(),
            armed: Arc::default(),
            latency: Arc::new(Mutex::new(Duration::ZERO)),
        };
        let socket = socket();
        let me = proxy.clone();
        let app = Router::new().fallback(move |req: Request<Body>| {
            let (me, socket) = (me.clone(), socket.clone());
            async move {
                let latency = *me.latency.lock().unwrap();
                tokio::time::sleep(latency).await;
                let action = {
                    let mut armed = me.armed.lock().unwrap();
                    let hit = armed
                        .iter()
                        .position(|a| req.method().as_str() == a.method && req.uri().path().ends_with(&a.suffix));
                    hit.map(|i| armed.remove(i).action)
                };
                match action {
                    None => forward(&socket, req).await,
                    Some(Action::Fail) => engine_error(StatusCode::INTERNAL_SERVER_ERROR, "injected: engine error"),
                    Some(Action::LoseAnswer) => {
                        forward(&socket, req).await;
                        engine_error(StatusCode::BAD_GATEWAY, "injected: the answer was lost")
                    }
                    Some(Action::Hang) => std::future::pending().await,
                    Some(Action::HangAfter) => {
                        forward(&socket, req).await;
                        std::future::pending().await
                    }
                }
            }
        });
        tokio::spawn(async move { axum::serve(listener, app).await });
        proxy
    }

    fn arm(&self, method: &'static str, suffix: String, action: Action) {
        self.armed.lock().unwrap().push(Armed { method, suffix, action });
    }
}

/// The engine as the referee sees it (straight from the socket), and the proxy's faults.
struct Engine {
    cluster: String,
    proxy: Proxy,
}

fn docker(args: &[&str]) -> String {
    let host = format!("unix://{}", socket().display());
    let out = std::process::Command::new("docker").args(["-H", &host]).args(args).output().expect("docker CLI");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Cloud for Engine {
    fn view(&self) -> CloudView {
        let filter = format!("label=dev.flotilla.cluster={}", self.cluster);
        let format = "{{.Names}}\t{{.State}}\t{{.Label \"dev.flotilla.group\"}}";
        docker(&["ps", "-a", "--filter", &filter, "--format", format])
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let (name, state, group) = (f.next()?, f.next()?, f.next()?);
                let state = match state {
                    "running" => "running",
                    "created" | "restarting" => "creating",
                    "removing" => "deleting",
                    _ => "failed",
                };
                Some((format!("k3s://{name}"), (group.to_owned(), state.to_owned())))
            })
            .collect()
    }

    fn arm(&self, op: Op, fault: Fault, target: Option<&str>) -> bool {
        let action = match fault {
            Fault::Ok => return true,
            Fault::Unavailable => Action::Fail,
            Fault::Hang => Action::Hang,
            Fault::LostResponse => Action::LoseAnswer,
            Fault::HangAfter => Action::HangAfter,
            // The container is made, then its start fails: the driver must remove it.
            Fault::FailLate if op == Op::Create => {
                self.proxy.arm("POST", "/start".into(), Action::Fail);
                return true;
            }
            _ => return false,
        };
        match (op, target) {
            (Op::Create, _) => self.proxy.arm("POST", "/containers/create".into(), action),
            (Op::List, _) => self.proxy.arm("GET", "/containers/json".into(), action),
            (Op::Delete, Some(t)) => {
                let name = t.strip_prefix("k3s://").expect("a k3s provider id");
                let id = docker(&["inspect", "-f", "{{.Id}}", name]).trim().to_owned();
                self.proxy.arm("DELETE", format!("/containers/{id}"), action);
            }
            _ => return false,
        }
        true
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        let ids = docker(&["ps", "-aq", "--filter", &format!("label=dev.flotilla.cluster={}", self.cluster)]);
        let ids: Vec<&str> = ids.split_whitespace().collect();
        if !ids.is_empty() {
            docker(&[&["rm", "-f", "-v"], ids.as_slice()].concat());
        }
    }
}

fn config_text(cluster: &str, proxy: &Proxy, cloud_extra: &str) -> String {
    format!(
        r#"cluster_name = "{cluster}"
[state]
refresh_timeout = "1s"
max_staleness = "4s"
reconcile_interval = "200ms"
[clouds.local]
driver = "docker"
host = "tcp://{addr}"
timeout = "2s"
create_timeout = "6s"
delete_timeout = "6s"
{cloud_extra}
[groups.g]
cloud = "local"
max_size = 5
[groups.g.machine]
image = "{IMAGE}"
network = "none"
command = {IDLE}
stop_timeout = "1s"
"#,
        addr = proxy.addr
    )
}

async fn engine(tag: &str) -> Engine {
    Engine { cluster: format!("fd{}-{tag}", std::process::id()), proxy: Proxy::start().await }
}

async fn faults_on(op: Op, faults: &[Fault]) {
    for &fault in faults {
        let e = engine(&format!("{op:?}-{fault:?}").to_ascii_lowercase()).await;
        let (server, c) = support::start(&config_text(&e.cluster, &e.proxy, "")).await;
        assert!(scenario(&c, &e, &["g"], "g", op, fault).await, "{fault:?} on {op:?} not injected");
        server.stop().await.unwrap();
    }
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then --include-ignored"]
async fn engine_creates_that_fail_hang_lose_their_answer_or_fail_to_start_leak_nothing() {
    faults_on(Op::Create, &[CALL_FAULTS.as_slice(), &[Fault::FailLate]].concat()).await;
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then --include-ignored"]
async fn engine_removes_that_fail_hang_or_lose_their_answer_still_delete() {
    faults_on(Op::Delete, &CALL_FAULTS).await;
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then --include-ignored"]
async fn engine_listings_that_fail_hang_or_lose_their_answer_change_nothing() {
    faults_on(Op::List, &CALL_FAULTS).await;
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then --include-ignored"]
async fn kill_9_during_engine_creates_then_restart_leaks_duplicates_and_forgets_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let e = engine("kill-create").await;
    let text = config_text(&e.cluster, &e.proxy, "create_concurrency = 2");
    let (serve, mut c) = Serve::start(dir.path(), &text).await;
    // Every engine call takes 400 ms: Flotilla dies between creating containers and starting them.
    *e.proxy.latency.lock().unwrap() = Duration::from_millis(400);
    support::increase(&mut c, "g", 4).await.unwrap();
    cloud_reaches("two containers made", Duration::from_secs(10), || e.view(), |v| v.len() >= 2).await;
    serve.kill_9();
    tokio::time::sleep(Duration::from_millis(600)).await;
    let made = e.view();
    *e.proxy.latency.lock().unwrap() = Duration::ZERO;

    let (serve, c) = Serve::start(dir.path(), &text).await;
    let settled = settle(&c, &["g"], || e.view(), SETTLE).await;
    assert_eq!(settled.count("g") + settled.failed_deleted.len(), made.len(), "{made:?} {settled:?}\n{}", serve.log());
    serve.kill_9();
}
