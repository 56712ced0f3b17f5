//! The Docker driver against a real Docker engine: `tests/docker/engine.sh start` runs one on
//! its own socket, then `FLOTILLA_DOCKER_HOST=unix:///tmp/flotilla-docker.sock cargo test --test
//! docker -- --include-ignored`. Each test uses its own cluster name and removes its containers,
//! even when it fails.
//!
//! The unreachable-engine test needs no engine and always runs.

mod support;

use std::{collections::HashMap, time::Duration};

use bollard::{
    API_DEFAULT_VERSION, Docker,
    models::{ContainerCreateBody, HostConfig},
    query_parameters::{CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder},
};
use flotilla::{
    driver::{self, MachineRef},
    proto::externalgrpc::instance_status::InstanceState,
};
use tonic::Code;

const IMAGE: &str = "flotilla-test/busybox:latest";
/// Sleeps until SIGTERM, then exits at once (PID 1 gets no default signal handlers).
const IDLE: &str = r#"["/bin/sh", "-c", "trap 'exit 0' TERM; while true; do sleep 1; done"]"#;
const LIMIT: Duration = Duration::from_secs(60);

fn engine_host() -> String {
    std::env::var("FLOTILLA_DOCKER_HOST").unwrap_or_else(|_| {
        panic!(
            "FLOTILLA_DOCKER_HOST is not set: run `tests/docker/engine.sh start` and export the line it prints \
             (e.g. FLOTILLA_DOCKER_HOST=unix:///tmp/flotilla-docker.sock)"
        )
    })
}

async fn engine() -> Docker {
    let host = engine_host();
    let docker = Docker::connect_with_unix(&host, 30, API_DEFAULT_VERSION).expect("engine socket exists");
    docker.negotiate_version().await.expect("the engine answers")
}

/// A cluster name unique to this test and process.
fn cluster(tag: &str) -> String {
    format!("dk{}-{tag}", std::process::id())
}

/// Removes every container of a cluster (and any named extra) when dropped, pass or fail.
struct Cleanup {
    cluster: String,
    extra: Vec<String>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let host = match std::env::var("FLOTILLA_DOCKER_HOST") {
            Ok(h) => h,
            Err(_) => return,
        };
        let ids = std::process::Command::new("docker")
            .args(["-H", &host, "ps", "-aq", "--filter", &format!("label=dev.flotilla.cluster={}", self.cluster)])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).split_whitespace().map(str::to_owned).collect::<Vec<_>>())
            .unwrap_or_default();
        let all: Vec<String> = ids.into_iter().chain(self.extra.iter().cloned()).collect();
        if !all.is_empty() {
            let _ = std::process::Command::new("docker")
                .args(["-H", &host, "rm", "-f", "-v"])
                .args(&all)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

fn config(cluster: &str, host: &str, machine: &str) -> String {
    format!(
        r#"
cluster_name = "{cluster}"
[state]
refresh_timeout = "3s"
max_staleness = "5s"
reconcile_interval = "1s"
[clouds.local]
driver = "docker"
host = "{host}"
[groups.g]
cloud = "local"
max_size = 5
[groups.g.machine]
{machine}
"#
    )
}

fn idle_machine() -> String {
    format!("image = \"{IMAGE}\"\nnetwork = \"none\"\ncommand = {IDLE}\nstop_timeout = \"5s\"\n")
}

/// (name, id, labels) of the engine's containers carrying `cluster`'s label, any state.
async fn containers_of(docker: &Docker, cluster: &str) -> Vec<(String, String, HashMap<String, String>)> {
    let filters = HashMap::from([("label", vec![format!("dev.flotilla.cluster={cluster}")])]);
    let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
    let mut out: Vec<_> = docker
        .list_containers(Some(options))
        .await
        .unwrap()
        .into_iter()
        .map(|c| {
            let name = c.names.unwrap_or_default().first().cloned().unwrap_or_default();
            (name.trim_start_matches('/').to_owned(), c.id.unwrap_or_default(), c.labels.unwrap_or_default())
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out
}

/// Creates and starts a container Flotilla did not make.
async fn foreign(docker: &Docker, name: &str, labels: &[(&str, &str)]) -> String {
    let body = ContainerCreateBody {
        image: Some(IMAGE.into()),
        cmd: Some(vec!["/bin/sleep".into(), "300".into()]),
        labels: Some(labels.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()),
        host_config: Some(HostConfig { network_mode: Some("none".into()), ..Default::default() }),
        ..Default::default()
    };
    let id =
        docker.create_container(Some(CreateContainerOptionsBuilder::new().name(name).build()), body).await.unwrap().id;
    docker.start_container(&id, None).await.unwrap();
    id
}

async fn exists(docker: &Docker, id: &str) -> bool {
    docker.inspect_container(id, None::<InspectContainerOptions>).await.is_ok()
}

/// The one instance of `group` once it reports an error; returns its message.
async fn creation_error(c: &support::Client, group: &str) -> (String, i32) {
    support::eventually(LIMIT, "a creation error", || {
        let mut c = c.clone();
        async move {
            let nodes = support::nodes(&mut c, group).await;
            match nodes.as_slice() {
                [(_, InstanceState::InstanceCreating, Some(e))] => {
                    Some((e.error_message.clone(), e.instance_error_class))
                }
                _ => None,
            }
        }
    })
    .await
}

/// `GET path` on the HTTP endpoint: (status code, body).
async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: flotilla\r\nConnection: close\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    s.read_to_string(&mut text).await.unwrap();
    let status = text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    let body = text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
    (status, body)
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn a_scale_up_runs_labelled_containers_that_a_restart_finds_again_and_a_delete_removes() {
    let docker = engine().await;
    let cluster = cluster("life");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let text = config(&cluster, &engine_host(), &idle_machine());

    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "g", 3).await.unwrap();
    let ids = support::wait_running(&c, "g", 3, LIMIT).await;
    let on_engine = containers_of(&docker, &cluster).await;
    assert_eq!(on_engine.len(), 3, "{on_engine:?}");
    for (name, id, labels) in &on_engine {
        assert_eq!(labels["dev.flotilla.group"], "g");
        assert!(ids.contains(&format!("k3s://{name}")), "{name} not in {ids:?}");
        let inspected = docker.inspect_container(id, None::<InspectContainerOptions>).await.unwrap();
        assert_eq!(inspected.config.unwrap().hostname.as_deref(), Some(name.as_str()));
        assert_eq!(inspected.state.unwrap().running, Some(true));
    }
    server.stop().await.unwrap();

    // A new process with no memory: the labels are the state.
    let (server, mut c) = support::start(&text).await;
    let again = support::wait_running(&c, "g", 3, LIMIT).await;
    assert_eq!(again, ids);
    assert_eq!(containers_of(&docker, &cluster).await, on_engine, "a restart must create nothing");

    support::delete(&mut c, "g", &[ids[0].as_str()]).await.unwrap();
    support::wait_running(&c, "g", 2, LIMIT).await;
    let left = containers_of(&docker, &cluster).await;
    assert_eq!(left.len(), 2);
    assert!(left.iter().all(|(name, _, _)| format!("k3s://{name}") != ids[0]));
    // Repeating a finished delete is a no-op.
    support::delete(&mut c, "g", &[ids[0].as_str()]).await.unwrap();
    server.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn containers_without_this_clusters_labels_are_never_listed_or_touched() {
    let docker = engine().await;
    let cluster = cluster("foreign");
    let names: Vec<String> = ["plain", "other", "nogroup"].iter().map(|n| format!("{cluster}-{n}")).collect();
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: names.clone() };
    let plain = foreign(&docker, &names[0], &[]).await;
    let other =
        foreign(&docker, &names[1], &[("dev.flotilla.cluster", "someone-else"), ("dev.flotilla.group", "g")]).await;
    let nogroup = foreign(&docker, &names[2], &[("dev.flotilla.cluster", &cluster)]).await;

    let text = config(&cluster, &engine_host(), &idle_machine());
    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let ids = support::wait_running(&c, "g", 1, LIMIT).await;
    assert!(!names.iter().any(|n| ids[0].ends_with(n.as_str())), "{ids:?}");
    let err = support::delete(&mut c, "g", &[&format!("k3s://{}", names[1])]).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");

    // The driver itself refuses, whatever it is asked.
    let config = support::config(&text);
    let drivers = flotilla::build_drivers(&config).unwrap();
    let listed = drivers[0].list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    for (id, name) in [(&plain, &names[0]), (&other, &names[1]), (&nogroup, &names[2])] {
        let machine = MachineRef { group: "g".into(), name: name.clone(), id: id.clone() };
        let e = drivers[0].delete(&machine).await.unwrap_err();
        assert!(matches!(e, driver::Error::InvalidRequest(_)), "{e:?}");
        assert!(exists(&docker, id).await, "{name} was removed");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn an_unreachable_engine_fails_refresh_as_unavailable_and_readiness() {
    let dir = tempfile::tempdir().unwrap();
    // A socket file nobody listens on, as a stopped dockerd leaves behind.
    let path = dir.path().join("docker.sock");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let host = format!("unix://{}", path.display());
    let text = config("unreachable", &host, &idle_machine());

    let config = support::config(&text);
    let drivers = flotilla::build_drivers(&config).unwrap();
    let e = drivers[0].check().await.unwrap_err();
    assert!(matches!(e, driver::Error::Unavailable(_)), "{e:?}");
    assert!(e.to_string().contains(&host), "{e}");

    let (server, mut c) = support::start(&text).await;
    let status = support::refresh(&mut c).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains(&host), "{}", status.message());
    let http = server.http_addr.unwrap();
    let (code, body) = support::eventually(LIMIT, "readiness to report the engine", || {
        let host = host.clone();
        async move {
            let (code, body) = http_get(http, "/readyz").await;
            body.contains(&host).then_some((code, body))
        }
    })
    .await;
    assert_eq!(code, 503, "{body}");
    // The engine was never listed, so the group's size is unknown: a scale-up is refused
    // (UNAVAILABLE) rather than checked against a size of 0.
    let status = support::increase(&mut c, "g", 1).await.unwrap_err();
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("not been listed"), "{}", status.message());
    server.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn a_missing_image_is_a_creation_error_and_leaves_nothing_behind() {
    let docker = engine().await;
    let cluster = cluster("noimage");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let machine = "image = \"flotilla-test/absent:latest\"\nnetwork = \"none\"";
    let (server, mut c) = support::start(&config(&cluster, &engine_host(), machine)).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let (message, class) = creation_error(&c, "g").await;
    assert_eq!(class, 99);
    assert!(message.contains("flotilla-test/absent:latest") && message.contains("pull"), "{message}");
    assert!(containers_of(&docker, &cluster).await.is_empty());
    // CA deletes the failed instance; the next listing shows nothing exists, and it goes.
    let id = support::nodes(&mut c, "g").await[0].0.clone();
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::refresh(&mut c).await.unwrap();
    assert!(support::nodes(&mut c, "g").await.is_empty());
    server.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn a_container_that_cannot_start_is_removed_and_reported() {
    let docker = engine().await;
    let cluster = cluster("nostart");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let machine = format!("image = \"{IMAGE}\"\nnetwork = \"none\"\ncommand = [\"/nonexistent\"]");
    let (server, mut c) = support::start(&config(&cluster, &engine_host(), &machine)).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let (message, class) = creation_error(&c, "g").await;
    assert_eq!(class, 99);
    assert!(message.contains("start container") && message.contains("/nonexistent"), "{message}");
    assert!(containers_of(&docker, &cluster).await.is_empty(), "the half-created container must be removed");
    server.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn a_container_that_exits_is_failed_with_its_exit_code_and_can_be_deleted() {
    let docker = engine().await;
    let cluster = cluster("exits");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let machine = format!("image = \"{IMAGE}\"\nnetwork = \"none\"\ncommand = [\"/bin/sh\", \"-c\", \"exit 3\"]");
    let (server, mut c) = support::start(&config(&cluster, &engine_host(), &machine)).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let (message, class) = support::eventually(LIMIT, "the exit to be reported", || {
        let mut c = c.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            match support::nodes(&mut c, "g").await.as_slice() {
                [(_, InstanceState::InstanceCreating, Some(e))] if e.error_message.contains("Exited") => {
                    Some((e.error_message.clone(), e.instance_error_class))
                }
                _ => None,
            }
        }
    })
    .await;
    assert_eq!(class, 99);
    assert!(message.contains("Exited (3)"), "{message}");
    let id = support::nodes(&mut c, "g").await[0].0.clone();
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::eventually(LIMIT, "the container to be removed", || {
        let docker = docker.clone();
        let cluster = cluster.clone();
        async move { containers_of(&docker, &cluster).await.is_empty().then_some(()) }
    })
    .await;
    server.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn dry_run_reads_the_engine_and_changes_nothing() {
    let docker = engine().await;
    let cluster = cluster("dry");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let text = config(&cluster, &engine_host(), &idle_machine())
        .replace("driver = \"docker\"", "driver = \"docker\"\ndry_run = true");
    let (server, mut c) = support::start(&text).await;
    support::refresh(&mut c).await.unwrap();
    support::increase(&mut c, "g", 1).await.unwrap();
    let (message, class) = creation_error(&c, "g").await;
    assert_eq!(class, 99);
    assert!(message.contains("dry run: would create container"), "{message}");
    assert!(containers_of(&docker, &cluster).await.is_empty());
    server.stop().await.unwrap();
}

#[test]
fn the_example_configuration_is_valid() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("docker.toml");
    std::fs::copy(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/docker.toml"), &path).unwrap();
    std::fs::write(dir.path().join("k3s-token"), "K10example::server:token\n").unwrap();
    let (config, _drivers) = flotilla::load(Some(&path)).unwrap_or_else(|p| panic!("{p}"));
    let parts = flotilla::provider_id::Parts {
        cluster: "k3s-docker",
        group: "workers",
        region: "local",
        name: "k3s-docker-workers-abcde",
        id: "0123abcd",
    };
    assert_eq!(config.groups[0].provider_id.render(parts), "k3s://k3s-docker-workers-abcde");
}

/// A unix-socket relay to the test engine that can be cut, as if the engine stopped.
struct Relay {
    path: std::path::PathBuf,
    /// Owns the listener and, through its `JoinSet`, every relayed connection: aborting it
    /// closes them all, pooled client connections included.
    task: tokio::task::JoinHandle<()>,
}

impl Relay {
    fn start(path: &std::path::Path) -> Relay {
        let upstream = engine_host().trim_start_matches("unix://").to_owned();
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let task = tokio::spawn(async move {
            let mut connections = tokio::task::JoinSet::new();
            while let Ok((mut client, _)) = listener.accept().await {
                let upstream = upstream.clone();
                connections.spawn(async move {
                    if let Ok(mut engine) = tokio::net::UnixStream::connect(&upstream).await {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
            }
        });
        Relay { path: path.to_owned(), task }
    }

    /// Closes every connection and removes the socket: the engine is gone.
    async fn cut(self) {
        self.task.abort();
        let _ = self.task.await;
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn an_engine_that_stops_turns_refresh_unavailable_after_max_staleness_and_back() {
    let cluster = cluster("outage");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("engine.sock");
    let relay = Relay::start(&socket);
    let host = format!("unix://{}", socket.display());
    // A generous bound, so the listing just before the outage is surely still fresh below.
    let text = config(&cluster, &host, &idle_machine()).replace("max_staleness = \"5s\"", "max_staleness = \"10s\"");
    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let ids = support::wait_running(&c, "g", 1, LIMIT).await;

    relay.cut().await;
    // Within max_staleness CA may still act on the last good picture.
    support::refresh(&mut c).await.expect("state younger than max_staleness is still served");
    let http = server.http_addr.unwrap();
    let body = support::eventually(LIMIT, "readiness to fail", || async move {
        let (code, body) = http_get(http, "/readyz").await;
        (code == 503).then_some(body)
    })
    .await;
    assert!(body.contains("unavailable") && body.contains(&host), "{body}");
    let status = support::eventually(LIMIT, "Refresh to fail as stale", || {
        let mut c = c.clone();
        async move { support::refresh(&mut c).await.err() }
    })
    .await;
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    assert!(status.message().contains("stale"), "{}", status.message());

    let _relay = Relay::start(&socket);
    support::eventually(LIMIT, "Refresh to recover", || {
        let mut c = c.clone();
        async move { support::refresh(&mut c).await.ok() }
    })
    .await;
    assert_eq!(http_get(http, "/readyz").await.0, 200);
    assert_eq!(support::wait_running(&c, "g", 1, LIMIT).await, ids);
    server.stop().await.unwrap();
}

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn a_name_conflict_adopts_our_own_container_and_refuses_anyone_elses() {
    let docker = engine().await;
    let cluster = cluster("conflict");
    let stranger = format!("{cluster}-stranger");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![stranger.clone()] };
    let config = support::config(&config(&cluster, &engine_host(), &idle_machine()));
    let drivers = flotilla::build_drivers(&config).unwrap();
    let name = format!("{cluster}-g-again");

    let first = drivers[0].create("g", &name).await.unwrap();
    // A retried create of the same name (say, after a timeout on our side) finds it again.
    let second = drivers[0].create("g", &name).await.unwrap();
    assert_eq!(second.id, first.id);
    assert_eq!(containers_of(&docker, &cluster).await.len(), 1);

    let id = foreign(&docker, &stranger, &[]).await;
    let e = drivers[0].create("g", &stranger).await.unwrap_err();
    assert!(matches!(&e, driver::Error::InvalidRequest(m) if m.contains("leaving it alone")), "{e:?}");
    assert!(exists(&docker, &id).await);

    let ours = MachineRef { group: "g".into(), name: name.clone(), id: first.id.clone() };
    drivers[0].delete(&ours).await.unwrap();
    assert!(matches!(drivers[0].delete(&ours).await, Err(driver::Error::NotFound(_))));
}

#[path = "fakes/kube/mod.rs"]
mod kube_fake;

#[tokio::test]
#[ignore = "needs a Docker engine: tests/docker/engine.sh start, then cargo test --test docker -- --ignored"]
async fn a_warm_pool_stops_deleted_containers_and_starts_them_for_the_next_scale_up() {
    let docker = engine().await;
    let cluster = cluster("pool");
    let _cleanup = Cleanup { cluster: cluster.clone(), extra: vec![] };
    let kube = kube_fake::Fake::start("t").await;
    let dir = tempfile::tempdir().unwrap();
    let text = config(&cluster, &engine_host(), &idle_machine())
        .replace("host = ", "node_cleanup = true\nhost = ")
        .replace("max_size = 5\n", "max_size = 5\nwarm_pool = 1\n")
        + &format!("[kubernetes]\nkubeconfig = \"{}\"\n", kube.kubeconfig(dir.path(), "t").display());
    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "g", 2).await.unwrap();
    let ids = support::wait_running(&c, "g", 2, LIMIT).await;

    // Both deleted: one is stopped into the pool (size 1), the other removed.
    support::delete(&mut c, "g", &[ids[0].as_str(), ids[1].as_str()]).await.unwrap();
    support::wait_running(&c, "g", 0, LIMIT).await;
    let left = support::eventually(LIMIT, "one container left, stopped", || async {
        let left = containers_of(&docker, &cluster).await;
        (left.len() == 1).then_some(left)
    })
    .await;
    let (name, id, _) = &left[0];
    let inspected = docker.inspect_container(id, None::<InspectContainerOptions>).await.unwrap();
    assert_eq!(inspected.state.unwrap().running, Some(false), "kept, stopped");
    assert_eq!(support::target_size(&mut c, "g").await, 0);

    // The next scale-up starts it instead of creating one.
    support::increase(&mut c, "g", 1).await.unwrap();
    let running = support::wait_running(&c, "g", 1, LIMIT).await;
    assert_eq!(running, [format!("k3s://{name}")]);
    assert_eq!(containers_of(&docker, &cluster).await.len(), 1, "nothing created");
    let inspected = docker.inspect_container(id, None::<InspectContainerOptions>).await.unwrap();
    assert_eq!(inspected.state.unwrap().running, Some(true));
    server.stop().await.unwrap();
}
