//! The Grafana dashboard shipped in the chart (`charts/flotilla/files/dashboard.json`) only
//! queries metrics a running server exports, so it cannot rot when a metric is renamed.

mod support;

use std::{collections::BTreeSet, sync::Arc, time::Duration};

use flotilla::driver::{SharedDriver, simulated::Simulated};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const DASHBOARD: &str = include_str!("../charts/flotilla/files/dashboard.json");

async fn scrape(addr: std::net::SocketAddr) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.unwrap();
    buf
}

/// Every PromQL expression in the dashboard: panel targets (rows included) and variables.
fn expressions(dashboard: &serde_json::Value) -> Vec<(String, String)> {
    fn panels(list: &serde_json::Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                out.push((title.clone(), t["expr"].as_str().expect("every target has an expr").to_owned()));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {}", v["name"]), q.to_owned()));
        }
    }
    out
}

/// Metric names in a PromQL expression: Flotilla's and the process metrics.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let starts_word = i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
        if starts_word && (expr[i..].starts_with("flotilla_") || expr[i..].starts_with("process_")) {
            let end = expr[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(expr.len(), |e| i + e);
            names.push(expr[i..end].to_owned());
            i = end;
        } else {
            i += 1;
        }
    }
    names
}

/// Names of the samples in a text exposition.
fn sample_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn metric_names_are_read_from_promql_without_functions_or_labels() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(flotilla_grpc_request_duration_seconds_bucket{instance=~\"$i\"}[5m]))) / process_max_fds"
        ),
        ["flotilla_grpc_request_duration_seconds_bucket", "process_max_fds"]
    );
    assert!(metric_names("label_values(up, instance)").is_empty());
}

#[tokio::test]
async fn every_metric_the_dashboard_queries_is_exported_by_a_running_server() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).expect("the dashboard is JSON");
    let exprs = expressions(&dashboard);
    assert!(exprs.len() >= 15, "the dashboard has {} queries", exprs.len());

    // A server whose metrics have all been touched once: served RPCs, creates (one failed),
    // deletes (one failed), driver calls and errors, instances, readiness.
    let config = support::config(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 5\n",
    );
    let sim = Arc::new(Simulated::new("t", Default::default()).unwrap());
    let (server, mut c) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
    support::increase(&mut c, "g", 2).await.unwrap();
    let ids = support::wait_running(&c, "g", 2, Duration::from_secs(10)).await;
    sim.fail_next_creates_with_quota(1);
    support::increase(&mut c, "g", 1).await.unwrap();
    support::eventually(Duration::from_secs(10), "the quota failure", || {
        let mut c = c.clone();
        async move { support::nodes(&mut c, "g").await.iter().any(|(_, _, e)| e.is_some()).then_some(()) }
    })
    .await;
    support::delete(&mut c, "g", &[&ids[0]]).await.unwrap();
    support::eventually(Duration::from_secs(10), "the first delete", || {
        let metrics = Arc::clone(&server.metrics);
        async move { (metrics.driver_calls("sim", "simulated", "delete") >= 1).then_some(()) }
    })
    .await;
    sim.set_outage(true);
    support::delete(&mut c, "g", &[&ids[1]]).await.unwrap();
    support::eventually(Duration::from_secs(10), "the failed delete", || {
        let metrics = Arc::clone(&server.metrics);
        async move { (metrics.driver_calls("sim", "simulated", "delete") >= 2).then_some(()) }
    })
    .await;
    sim.set_outage(false);

    let exported = sample_names(&scrape(server.http_addr.unwrap()).await);
    let mut missing = Vec::new();
    let mut queried = BTreeSet::new();
    for (panel, expr) in &exprs {
        for name in metric_names(expr) {
            if !exported.contains(&name) {
                missing.push(format!("{panel}: {name}"));
            }
            queried.insert(name);
        }
    }
    assert!(missing.is_empty(), "queried but not exported: {missing:#?}\nexported: {exported:#?}");
    // The panels the operator's guide promises.
    for name in [
        "flotilla_grpc_requests_total",
        "flotilla_grpc_request_duration_seconds_bucket",
        "flotilla_instances",
        "flotilla_creates_total",
        "flotilla_create_failures_total",
        "flotilla_deletes_total",
        "flotilla_delete_failures_total",
        "flotilla_driver_calls_total",
        "flotilla_driver_errors_total",
        "flotilla_driver_call_duration_seconds_bucket",
        "flotilla_ready",
        "flotilla_build_info",
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
    ] {
        assert!(queried.contains(name), "no panel queries {name}");
    }
    server.stop().await.unwrap();
}

#[tokio::test]
async fn failed_creates_and_deletes_are_counted_by_group_class_and_kind() {
    let config = support::config(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 5\n",
    );
    let sim = Arc::new(Simulated::new("t", Default::default()).unwrap());
    let (server, mut c) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let ids = support::wait_running(&c, "g", 1, Duration::from_secs(10)).await;
    sim.fail_next_creates_with_quota(1);
    support::increase(&mut c, "g", 1).await.unwrap();
    let http = server.http_addr.unwrap();
    support::eventually(Duration::from_secs(10), "the failed create to be counted", || async move {
        scrape(http)
            .await
            .contains("flotilla_create_failures_total{group=\"g\",class=\"out_of_resources\"} 1")
            .then_some(())
    })
    .await;
    sim.set_outage(true);
    support::delete(&mut c, "g", &[&ids[0]]).await.unwrap();
    support::eventually(Duration::from_secs(10), "the failed delete to be counted", || async move {
        scrape(http).await.contains("flotilla_delete_failures_total{group=\"g\",kind=\"unavailable\"} 1").then_some(())
    })
    .await;
    let text = scrape(http).await;
    for line in ["flotilla_creates_total{group=\"g\"} 2", "flotilla_deletes_total{group=\"g\"} 1"] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
    sim.set_outage(false);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn build_info_process_metrics_and_units_follow_the_prometheus_conventions() {
    let (server, mut c) = support::start(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 1\n",
    )
    .await;
    // One RPC and one listing, so their histograms have samples.
    support::refresh(&mut c).await.unwrap();
    let text = scrape(server.http_addr.unwrap()).await;
    let version = env!("CARGO_PKG_VERSION");
    for line in [
        format!("flotilla_build_info{{version=\"{version}\"}} 1"),
        "# TYPE process_cpu_seconds counter".to_owned(),
        "# UNIT process_resident_memory_bytes bytes".to_owned(),
        "# UNIT flotilla_grpc_request_duration_seconds seconds".to_owned(),
        "# UNIT flotilla_driver_call_duration_seconds seconds".to_owned(),
    ] {
        assert!(text.contains(&line), "missing {line:?} in\n{text}");
    }
    let names = sample_names(&text);
    for name in [
        "process_cpu_seconds_total",
        "process_start_time_seconds",
        "process_open_fds",
        "process_max_fds",
        "process_threads",
        "process_virtual_memory_bytes",
    ] {
        assert!(names.contains(name), "missing {name}");
    }
    // Counters end in _total; nothing else does.
    for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
        let mut parts = line.split(' ').skip(2);
        let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
        assert!(!name.ends_with("_total"), "{name}: the family name of a {kind} must not end in _total");
    }
    server.stop().await.unwrap();
}
