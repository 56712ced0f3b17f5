//! Health, readiness and metrics over HTTP, and the standard gRPC health service.

mod support;

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A minimal HTTP/1.1 GET (no client library needed for three endpoints).
async fn get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    let status = buf.split(' ').nth(1).unwrap().parse().unwrap();
    (status, buf)
}

const CONFIG: &str =
    "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 3\n";

#[tokio::test]
async fn healthz_readyz_and_metrics_tell_the_truth() {
    let (server, mut c) = support::start(CONFIG).await;
    let http = server.http_addr.unwrap();
    assert_eq!(get(http, "/healthz").await.0, 200);
    support::eventually(Duration::from_secs(10), "readiness after the first reconcile", || async {
        (get(http, "/readyz").await.0 == 200).then_some(())
    })
    .await;
    support::increase(&mut c, "g", 2).await.unwrap();
    support::wait_running(&c, "g", 2, Duration::from_secs(10)).await;
    support::increase(&mut c, "g", 5).await.unwrap_err();
    let (status, body) = get(http, "/metrics").await;
    assert_eq!(status, 200);
    for line in [
        "flotilla_instances{group=\"g\",state=\"running\"} 2",
        "flotilla_grpc_requests_total{method=\"NodeGroupIncreaseSize\",code=\"INVALID_ARGUMENT\"} 1",
        "flotilla_grpc_request_duration_seconds_count{method=\"NodeGroupIncreaseSize\",code=\"OK\"} 1",
        "flotilla_driver_calls_total{cloud=\"sim\",driver=\"simulated\",operation=\"create\"} 2",
        "flotilla_ready 1",
    ] {
        assert!(body.contains(line), "missing {line:?} in\n{body}");
    }
    assert!(get(http, "/nope").await.0 == 404);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn readiness_fails_while_the_cloud_cannot_be_listed() {
    let config = support::config(CONFIG);
    let mut drivers = flotilla::build_drivers(&config).unwrap();
    let sim = std::sync::Arc::new(flotilla::driver::simulated::Simulated::new("t", Default::default()).unwrap());
    sim.set_outage(true);
    drivers[0] = sim.clone();
    let (server, _c) = support::start_with(config, drivers).await;
    let http = server.http_addr.unwrap();
    let (status, body) = get(http, "/readyz").await;
    assert_eq!(status, 503);
    support::eventually(Duration::from_secs(10), "the outage to be named", || async {
        get(http, "/readyz").await.1.contains("simulated outage").then_some(())
    })
    .await;
    let _ = body;

    // The standard gRPC health service agrees.
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let health = tonic_health::pb::health_client::HealthClient::new(channel);
    let not_serving = tonic_health::pb::health_check_response::ServingStatus::NotServing as i32;
    support::eventually(Duration::from_secs(10), "gRPC health NOT_SERVING", || {
        let mut h = health.clone();
        async move {
            let r = h.check(tonic_health::pb::HealthCheckRequest { service: String::new() }).await;
            (r.ok().map(|r| r.into_inner().status) == Some(not_serving)).then_some(())
        }
    })
    .await;
    sim.set_outage(false);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn concurrent_scrapes_each_see_every_instance_series() {
    let groups: String = (0..20).map(|i| format!("[groups.g{i}]\ncloud = \"sim\"\nmax_size = 3\n")).collect();
    let (server, _c) =
        support::start(&format!("cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n{groups}")).await;
    // 20 groups x 4 states.
    let series = |text: &str| text.lines().filter(|l| l.starts_with("flotilla_instances{")).count();
    let scrapers: Vec<_> = (0..4)
        .map(|_| {
            let (metrics, fleet) = (server.metrics.clone(), server.fleet.clone());
            std::thread::spawn(move || (0..300).map(|_| series(&metrics.render(&fleet))).min().unwrap())
        })
        .collect();
    for s in scrapers {
        assert_eq!(s.join().unwrap(), 80, "a scrape missed instance series");
    }
    server.stop().await.unwrap();
}
