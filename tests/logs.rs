//! What reaches the logs, captured at TRACE through the same layer `flotilla serve` logs with:
//! never a secret, at any level, while a driver sends its secrets to a cloud; never a line a
//! caller forged.

mod support;

use std::{
    io::Write,
    sync::{Arc, Mutex, Once},
};

use axum::{
    Router,
    body::Bytes,
    http::{Method, StatusCode, Uri},
    response::IntoResponse,
};
use flotilla::{config::LogFormat, driver::SharedDriver};
use tracing_subscriber::{EnvFilter, layer::SubscriberExt};

const K3S_TOKEN: &str = "K10-secret-token-4d1f7c::server:a5b0e9";

/// Everything logged, as text.
#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Captured {
    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }
}

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;

    fn make_writer(&'a self) -> Captured {
        self.clone()
    }
}

/// Sends the records of libraries that log through `log` (bollard) to the current thread's
/// subscriber, as `flotilla serve` does.
fn bridge_log_records() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| tracing_log::LogTracer::init().expect("no other logger in this test binary"));
}

/// Just enough of the Docker engine API for one create: version negotiation, create, start.
async fn docker_engine() -> std::net::SocketAddr {
    async fn answer(method: Method, uri: Uri, _body: Bytes) -> axum::response::Response {
        let path = uri.path();
        if path.ends_with("/version") {
            let v = serde_json::json!({"Version": "27.3.1", "ApiVersion": "1.47", "MinAPIVersion": "1.24"});
            return axum::Json(v).into_response();
        }
        if method == Method::POST && path.ends_with("/containers/create") {
            let created = serde_json::json!({"Id": "c0ffee", "Warnings": []});
            return (StatusCode::CREATED, axum::Json(created)).into_response();
        }
        if method == Method::POST && path.ends_with("/containers/c0ffee/start") {
            return StatusCode::NO_CONTENT.into_response();
        }
        (StatusCode::NOT_FOUND, axum::Json(serde_json::json!({"message": format!("no route {path}")}))).into_response()
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, Router::new().fallback(answer)).await });
    addr
}

async fn docker_driver() -> SharedDriver {
    let engine = docker_engine().await;
    let config = support::config(&format!(
        r#"cluster_name = "c1"
[clouds.box]
driver = "docker"
host = "tcp://{engine}"
[groups.g]
cloud = "box"
max_size = 2
[groups.g.machine]
image = "rancher/k3s:v1.31.4-k3s1"
k3s_url = "https://server:6443"
k3s_token = "{K3S_TOKEN}"
"#
    ));
    flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0)
}

/// Creates one container, logging to `subscriber`, and returns what was logged.
async fn create_logging_to(subscriber: impl tracing::Subscriber + Send + Sync + 'static, logs: &Captured) -> String {
    bridge_log_records();
    let driver = docker_driver().await;
    let _current = tracing::subscriber::set_default(subscriber);
    let machine = driver.create("g", "c1-g-abcde").await.expect("the engine stand-in creates it");
    assert_eq!(machine.id, "c0ffee");
    logs.text()
}

#[tokio::test(flavor = "current_thread")]
async fn the_docker_k3s_token_never_reaches_a_log_even_at_trace() {
    for format in [LogFormat::Text, LogFormat::Json] {
        let logs = Captured::default();
        let layer = flotilla::logging::layer(format, EnvFilter::new("trace"), logs.clone());
        let text = create_logging_to(tracing_subscriber::registry().with(layer), &logs).await;
        assert!(text.lines().count() > 5 && text.contains("TRACE"), "the capture works at trace:\n{text}");
        assert!(!text.contains(K3S_TOKEN), "{format:?}: the k3s token was logged:\n{text}");
    }
}

/// The control: what the engine client logs without Flotilla's cap. If this ever stops
/// finding the token, the test above proves nothing any more and needs another probe.
#[tokio::test(flavor = "current_thread")]
async fn without_the_cap_the_engine_client_logs_the_token() {
    let logs = Captured::default();
    let plain = tracing_subscriber::fmt().with_max_level(tracing::Level::TRACE).with_writer(logs.clone()).finish();
    let text = create_logging_to(plain, &logs).await;
    assert!(text.contains(K3S_TOKEN), "bollard no longer logs bodies:\n{text}");
}

#[tokio::test(flavor = "current_thread")]
async fn a_caller_cannot_forge_a_log_line() {
    let logs = Captured::default();
    let layer = flotilla::logging::layer(LogFormat::Text, EnvFilter::new("trace"), logs.clone());
    let _current = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    let (server, mut c) = support::start(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 3\n",
    )
    .await;
    let forged = "simulated://t/x\n2026-01-01T00:00:00Z  INFO flotilla: FORGED";
    support::delete(&mut c, "g", &[forged]).await.unwrap_err();
    support::increase(&mut c, "g\nFORGED", 1).await.unwrap_err();
    server.stop().await.unwrap();
    let text = logs.text();
    assert!(text.contains("rpc failed"), "the failures were logged:\n{text}");
    assert!(text.lines().all(|l| !l.contains("FORGED") || l.contains("rpc failed")), "{text}");
}

// === the other drivers' HTTP clients ===

#[path = "fakes/openstack/mod.rs"]
mod openstack_fake;
#[path = "fakes/proxmox/mod.rs"]
mod proxmox_fake;

/// Runs `work` with the real log layer at TRACE and returns what was logged.
async fn logged_at_trace<F: std::future::Future<Output = ()>>(work: F) -> String {
    bridge_log_records();
    let logs = Captured::default();
    let layer = flotilla::logging::layer(LogFormat::Text, EnvFilter::new("trace"), logs.clone());
    let _current = tracing::subscriber::set_default(tracing_subscriber::registry().with(layer));
    work.await;
    let text = logs.text();
    assert!(text.lines().count() > 5 && text.contains("TRACE"), "the capture works at trace:\n{text}");
    text
}

#[tokio::test(flavor = "current_thread")]
async fn openstack_passwords_and_tokens_never_reach_a_log_even_at_trace() {
    let fake = openstack_fake::Fake::start().await;
    let config = support::config(&format!(
        r##"cluster_name = "c1"
[clouds.os]
driver = "openstack"
region_name = "RegionOne"
[clouds.os.auth]
auth_url = "{}"
username = "{}"
password = "{}"
user_domain_name = "{}"
project_name = "{}"
[groups.w]
cloud = "os"
max_size = 2
[groups.w.machine]
flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
networks = ["k3s-net"]
join_token = "K10-openstack-join-token-9b1e"
user_data = "#cloud-config\nwrite_files: [{{ path: /etc/k3s-token, content: '{{{{ join_token }}}}' }}]\n"
"##,
        fake.auth_url(),
        openstack_fake::USERNAME,
        openstack_fake::PASSWORD,
        openstack_fake::USER_DOMAIN,
        openstack_fake::PROJECT
    ));
    let driver = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0);
    let text = logged_at_trace(async {
        let m = driver.create("w", "c1-w-abcde").await.unwrap();
        driver.list().await.unwrap();
        driver.mark_deleting(&(&m).into()).await.ok();
        driver.delete(&(&m).into()).await.unwrap();
    })
    .await;
    let tokens: Vec<String> = fake.requests().into_iter().filter_map(|r| r.token).collect();
    assert!(!tokens.is_empty());
    for secret in
        [openstack_fake::PASSWORD, "K10-openstack-join-token-9b1e"].into_iter().chain(tokens.iter().map(String::as_str))
    {
        assert!(!text.contains(secret), "{secret:?} was logged:\n{text}");
    }
}

#[tokio::test(flavor = "current_thread")]
async fn proxmox_token_secrets_passwords_and_tickets_never_reach_a_log_even_at_trace() {
    let fake = proxmox_fake::Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), proxmox_fake::TOKEN_SECRET).unwrap();
    std::fs::write(dir.path().join("password"), proxmox_fake::PASSWORD).unwrap();
    let text = |auth: String| {
        format!(
            "cluster_name = \"prod\"\n[clouds.pve]\ndriver = \"proxmox\"\nurl = \"{}\"\npoll_interval = \"10ms\"\n{auth}\n\
             [groups.w]\ncloud = \"pve\"\nmax_size = 2\n[groups.w.machine]\ntemplate = 9000\n",
            fake.url()
        )
    };
    let token_auth = format!(
        "token_id = \"{}\"\ntoken_secret = {{ file = \"{}\" }}",
        proxmox_fake::TOKEN_ID,
        dir.path().join("token").display()
    );
    let password_auth = format!(
        "username = \"{}\"\npassword = {{ file = \"{}\" }}",
        proxmox_fake::USER,
        dir.path().join("password").display()
    );
    for (i, auth) in [token_auth, password_auth].into_iter().enumerate() {
        let config = support::config(&text(auth));
        let driver = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0);
        let logs = logged_at_trace(async {
            let m = driver.create("w", &format!("prod-w-abcd{i}")).await.unwrap();
            driver.list().await.unwrap();
            driver.mark_deleting(&(&m).into()).await.unwrap();
            driver.delete(&(&m).into()).await.unwrap();
        })
        .await;
        let tickets = fake.state().tickets.clone();
        for secret in
            [proxmox_fake::TOKEN_SECRET, proxmox_fake::PASSWORD].into_iter().chain(tickets.iter().map(String::as_str))
        {
            assert!(!logs.contains(secret), "{secret:?} was logged:\n{logs}");
        }
    }
}
