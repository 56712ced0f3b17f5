//! Hot-RPC latency at scale: 10,000 instances in 100 groups on the simulated cloud.
//!
//! Prints p50/p99 of the server-side handling time (the service called in process, no network)
//! and of the full loopback gRPC round trip, for NodeGroupForNode, NodeGroupNodes and
//! NodeGroupTargetSize; the cloud calls one Refresh makes; and the process RSS.
//!
//! Run: `cargo bench --bench rpc_latency` (figures vary with the machine; compare ratios).

use std::{
    fmt::Write as _,
    time::{Duration, Instant},
};

use flotilla::proto::externalgrpc::{self as pb, cloud_provider_server::CloudProvider};
use tonic::Request;

const GROUPS: usize = 100;
const PER_GROUP: usize = 100;
const SAMPLES: usize = 20_000;

fn config() -> String {
    let mut text = String::from(
        "cluster_name = \"bench\"\n[server]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"off\"\n\
         [clouds.sim]\ndriver = \"simulated\"\ncreate_concurrency = 64\n",
    );
    for g in 0..GROUPS {
        writeln!(text, "[groups.g{g:03}]\ncloud = \"sim\"\nmax_size = {}", PER_GROUP * 2).unwrap();
    }
    text
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0.0);
    kib / 1024.0
}

fn percentiles(mut samples: Vec<Duration>) -> (Duration, Duration) {
    samples.sort();
    let at = |q: f64| samples[((samples.len() as f64 - 1.0) * q) as usize];
    (at(0.50), at(0.99))
}

fn report(name: &str, server: Vec<Duration>, wire: Vec<Duration>) {
    let (s50, s99) = percentiles(server);
    let (w50, w99) = percentiles(wire);
    println!("{name:<22} server p50 {s50:>9.1?} p99 {s99:>9.1?}   loopback gRPC p50 {w50:>9.1?} p99 {w99:>9.1?}");
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let config = flotilla::config::Config::parse(&config(), "bench", std::path::Path::new(".")).unwrap();
    let drivers = flotilla::build_drivers(&config).unwrap();
    let gpu = config.gpu.clone();
    let running = flotilla::start(config, drivers).await.unwrap();
    let fleet = running.fleet.clone();
    let mut client =
        pb::cloud_provider_client::CloudProviderClient::connect(format!("http://{}", running.grpc_addr)).await.unwrap();

    let started = Instant::now();
    for g in 0..GROUPS {
        client
            .node_group_increase_size(pb::NodeGroupIncreaseSizeRequest {
                id: format!("g{g:03}"),
                delta: PER_GROUP as i32,
            })
            .await
            .unwrap();
    }
    loop {
        client.refresh(pb::RefreshRequest {}).await.unwrap();
        let running_now: usize = fleet.phase_counts().iter().map(|c| c.running).sum();
        if running_now == GROUPS * PER_GROUP {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("scale-up of {} instances in {GROUPS} groups: {:.2?}", GROUPS * PER_GROUP, started.elapsed());

    // Provider ids to look up: every instance, plus unmanaged nodes (CA asks for those every loop).
    let mut ids = Vec::new();
    for g in 0..GROUPS {
        fleet.for_each_instance(g, |id, _| ids.push(id.to_owned()));
    }
    let service = flotilla::service::Service::new(fleet.clone(), running.metrics.clone(), gpu);
    let node = |i: usize| {
        let provider_id = if i % 10 == 9 { format!("aws:///i-{i}") } else { ids[i % ids.len()].clone() };
        pb::NodeGroupForNodeRequest {
            node: Some(pb::ExternalGrpcNode { name: provider_id.clone(), provider_id, ..Default::default() }),
        }
    };

    let mut server = Vec::with_capacity(SAMPLES);
    let mut wire = Vec::with_capacity(SAMPLES);
    for i in 0..SAMPLES {
        let req = node(i * 7919);
        let t = Instant::now();
        service.node_group_for_node(Request::new(req.clone())).await.unwrap();
        server.push(t.elapsed());
        let t = Instant::now();
        client.node_group_for_node(req).await.unwrap();
        wire.push(t.elapsed());
    }
    report("NodeGroupForNode", server, wire);

    let (mut server, mut wire) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES / 4 {
        let req = pb::NodeGroupNodesRequest { id: format!("g{:03}", i % GROUPS) };
        let t = Instant::now();
        let r = service.node_group_nodes(Request::new(req.clone())).await.unwrap();
        server.push(t.elapsed());
        assert_eq!(r.get_ref().instances.len(), PER_GROUP);
        let t = Instant::now();
        client.node_group_nodes(req).await.unwrap();
        wire.push(t.elapsed());
    }
    report("NodeGroupNodes (100)", server, wire);

    let (mut server, mut wire) = (Vec::new(), Vec::new());
    for i in 0..SAMPLES {
        let req = pb::NodeGroupTargetSizeRequest { id: format!("g{:03}", i % GROUPS) };
        let t = Instant::now();
        service.node_group_target_size(Request::new(req.clone())).await.unwrap();
        server.push(t.elapsed());
        let t = Instant::now();
        client.node_group_target_size(req).await.unwrap();
        wire.push(t.elapsed());
    }
    report("NodeGroupTargetSize", server, wire);

    let refreshes = 20;
    let before = running.metrics.driver_calls("sim", "simulated", "list");
    let mut times = Vec::new();
    for _ in 0..refreshes {
        let t = Instant::now();
        client.refresh(pb::RefreshRequest {}).await.unwrap();
        times.push(t.elapsed());
    }
    let calls = running.metrics.driver_calls("sim", "simulated", "list") - before;
    let (r50, r99) = percentiles(times);
    println!(
        "Refresh                cloud list calls per Refresh: {:.2} (1 cloud, {} instances); p50 {r50:.1?} p99 {r99:.1?}",
        calls as f64 / refreshes as f64,
        GROUPS * PER_GROUP
    );
    println!("RSS: {:.1} MiB", rss_mib());
    running.stop().await.unwrap();
}
