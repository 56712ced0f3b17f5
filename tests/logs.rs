//! What reaches the logs, captured at TRACE through the same layer `flotilla serve` logs with:
//! never a secret, at any level, while any driver sends its secrets to a cloud; never a line a
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

#[path = "fakes/kamatera/mod.rs"]
mod kamatera_fake;
#[path = "fakes/slicer/mod.rs"]
mod slicer_fake;

#[tokio::test(flavor = "current_thread")]
async fn kamatera_api_keys_root_passwords_and_the_init_scripts_join_token_never_reach_a_log_even_at_trace() {
    const ROOT_PASSWORD: &str = "RootPw7c1e9a44k!";
    const JOIN_TOKEN: &str = "K10-kamatera-join-token-3f9c2d";
    /// What the fake answers when Kamatera generates the password (`__generate__`).
    const GENERATED: &str = "Kx7fQ2mZp9!a";
    let fake = kamatera_fake::Fake::start().await;
    {
        let mut s = fake.state();
        s.faults.pending_time = std::time::Duration::ZERO;
        s.faults.run_time = std::time::Duration::from_millis(20);
    }
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("root-password"), ROOT_PASSWORD).unwrap();
    // One group with a root password, one where Kamatera generates it.
    let config = support::config(&format!(
        r##"cluster_name = "prod"
[clouds.kam]
driver = "kamatera"
api_url = "{url}"
api_client_id = "{id}"
api_secret = "{secret}"
poll_interval = "10ms"
[clouds.kam.defaults]
datacenter = "EU"
image = "ubuntu_server_24.04_64-bit"
cpu = "2A"
ram = 4096
disks = ["size=50"]
networks = ["name=wan,ip=auto"]
script = "#!/bin/sh\ncurl -sfL https://get.k3s.io | K3S_TOKEN={JOIN_TOKEN} sh -s - agent --node-name {{{{ name }}}}\n"
[groups.w]
cloud = "kam"
max_size = 2
name_prefix = "prod-w"
[groups.w.machine]
password = {{ file = "{password}" }}
[groups.g]
cloud = "kam"
max_size = 2
name_prefix = "prod-g"
"##,
        url = fake.url(),
        id = kamatera_fake::CLIENT_ID,
        secret = kamatera_fake::SECRET,
        password = dir.path().join("root-password").display(),
    ));
    let driver = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0);
    let text = logged_at_trace(async {
        for (group, name) in [("w", "prod-w-aaaaa"), ("g", "prod-g-bbbbb")] {
            let m = driver.create(group, name).await.unwrap();
            support::eventually(std::time::Duration::from_secs(10), "the server to run", || {
                let driver = driver.clone();
                async move {
                    let listed = driver.list().await.ok()?;
                    listed
                        .iter()
                        .any(|x| x.name == name && x.state == flotilla::driver::MachineState::Running)
                        .then_some(())
                }
            })
            .await;
            driver.mark_deleting(&(&m).into()).await.unwrap();
            driver.delete(&(&m).into()).await.unwrap();
        }
        // cloudcli-server before December 2019 refused a password it disliked by repeating it;
        // the error reaches the core's log and cluster-autoscaler.
        let echoed = format!(
            r#"{{"message":"must have at least one of: '0123456789' for field password (password={ROOT_PASSWORD})"}}"#
        );
        fake.state().faults.inject.push(("POST".into(), "/service/server".into(), 400, echoed));
        let e = driver.create("w", "prod-w-ccccc").await.expect_err("refused");
        assert!(e.to_string().contains("for field password (password=<redacted>)"), "{e}");
        tracing::warn!(error = %e, "create failed");
    })
    .await;
    {
        let s = fake.state();
        let sent =
            |k: &str| s.calls("POST", "/service/server").iter().filter_map(|r| r.key(k).cloned()).collect::<Vec<_>>();
        assert!(sent("password").contains(&serde_json::json!(ROOT_PASSWORD)), "the probe sends the password");
        assert!(sent("password").contains(&serde_json::json!("__generate__")), "and has one generated");
        assert!(sent("script-file").iter().all(|s| s.as_str().is_some_and(|s| s.contains(JOIN_TOKEN))));
    }
    for secret in [kamatera_fake::CLIENT_ID, kamatera_fake::SECRET, ROOT_PASSWORD, JOIN_TOKEN, GENERATED] {
        assert!(!text.contains(secret), "{secret:?} was logged:\n{text}");
    }
    fake.assert_clean();
}

#[tokio::test(flavor = "current_thread")]
async fn the_slicer_token_and_the_k3s_join_token_never_reach_a_log_even_at_trace() {
    use base64::Engine;
    const JOIN_TOKEN: &str = "K10-slicer-join-token-8e2b71::server:c0ffee";
    let fake = slicer_fake::Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), slicer_fake::TOKEN).unwrap();
    let config = support::config(&format!(
        "cluster_name = \"homelab\"\n[clouds.slicer]\ndriver = \"slicer\"\nurl = \"{}\"\n\
         token = {{ file = \"{}\" }}\nk3s_url = \"https://192.168.137.2:6443\"\nk3s_token = \"{JOIN_TOKEN}\"\n\
         [groups.agents]\ncloud = \"slicer\"\nmax_size = 2\n",
        fake.url(),
        dir.path().join("token").display()
    ));
    let driver = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0);
    let text = logged_at_trace(async {
        let m = driver.create("agents", "homelab-agents-aaaaa").await.unwrap();
        driver.list().await.unwrap();
        driver.mark_deleting(&(&m).into()).await.unwrap();
        driver.delete(&(&m).into()).await.unwrap();
    })
    .await;
    let encoded = base64::engine::general_purpose::STANDARD.encode(JOIN_TOKEN);
    assert_eq!(fake.state().secrets.values().next().map(|s| s.data.clone()), Some(JOIN_TOKEN.as_bytes().to_vec()));
    for secret in [slicer_fake::TOKEN, JOIN_TOKEN, encoded.as_str()] {
        assert!(!text.contains(secret), "{secret:?} was logged:\n{text}");
    }
    fake.assert_clean();
}
