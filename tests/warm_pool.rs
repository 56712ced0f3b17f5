//! Warm pools on the simulated cloud, over gRPC as cluster-autoscaler calls: machines deleted
//! by CA are stopped into the pool (up to `warm_pool`), are no longer reported nor counted,
//! lose their Node, and are started first on the next scale-up; a pool machine that fails to
//! start is deleted and replaced by a create; a restart finds the pool in the cloud.

#[path = "fakes/kube/mod.rs"]
mod kube_fake;
mod support;

use std::{sync::Arc, time::Duration};

use flotilla::{
    driver::{
        SharedDriver,
        simulated::{
            Settings, Simulated,
            faults::{Fault, Op},
        },
    },
    proto::externalgrpc::{self as pb, instance_status::InstanceState},
};

const LIMIT: Duration = Duration::from_secs(20);

fn config(kubeconfig: &std::path::Path, state_file: &std::path::Path, warm_pool: u32) -> String {
    format!(
        "cluster_name = \"c\"\n[state]\nreconcile_interval = \"1h\"\n\
         [kubernetes]\nkubeconfig = \"{}\"\n\
         [clouds.sim]\ndriver = \"simulated\"\nnode_cleanup = true\nstate_file = \"{}\"\n\
         [groups.g]\ncloud = \"sim\"\nmax_size = 6\nwarm_pool = {warm_pool}\n",
        kubeconfig.display(),
        state_file.display(),
    )
}

struct Setup {
    kube: kube_fake::Fake,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        Setup { kube: kube_fake::Fake::start("t").await, dir: tempfile::tempdir().unwrap() }
    }

    fn config(&self, warm_pool: u32) -> String {
        config(&self.kube.kubeconfig(self.dir.path(), "t"), &self.dir.path().join("cloud.json"), warm_pool)
    }

    /// A server whose driver the test keeps a handle on.
    async fn start(&self, warm_pool: u32) -> (flotilla::Running, support::Client, Arc<Simulated>) {
        let config = support::config(&self.config(warm_pool));
        // What the simulated constructor reads from this configuration.
        let settings = Settings {
            state_file: Some(self.dir.path().join("cloud.json")),
            pool_groups: ["g".to_owned()].into(),
            ..Settings::default()
        };
        let sim = Arc::new(Simulated::new("c", settings).unwrap());
        let (server, client) = support::start_with(config, vec![Arc::clone(&sim) as SharedDriver]).await;
        (server, client, sim)
    }
}

/// Machine names and whether each is listed Stopped, from the cloud itself.
fn cloud(sim: &Simulated) -> Vec<(String, bool)> {
    sim.machines().into_iter().map(|m| (m.name, m.state == flotilla::driver::MachineState::Stopped)).collect()
}

fn stopped(sim: &Simulated) -> usize {
    cloud(sim).iter().filter(|(_, s)| *s).count()
}

async fn metric(server: &flotilla::Running, needle: &str) -> bool {
    server.metrics.render(&server.fleet).lines().any(|l| l == needle)
}

#[tokio::test]
async fn deleted_machines_are_stopped_into_the_pool_up_to_its_size_and_no_longer_reported() {
    let s = Setup::new().await;
    let (server, mut c, sim) = s.start(2).await;
    support::increase(&mut c, "g", 4).await.unwrap();
    let ids = support::wait_running(&c, "g", 4, LIMIT).await;
    let victims: Vec<&str> = ids.iter().take(3).map(String::as_str).collect();
    support::delete(&mut c, "g", &victims).await.unwrap();
    assert_eq!(support::target_size(&mut c, "g").await, 1, "stopping machines are not counted");
    // Two are kept stopped; the third is deleted: the pool holds at most warm_pool.
    support::eventually(LIMIT, "two stopped machines and one deleted", || async {
        (stopped(&sim) == 2 && sim.machines().len() == 3).then_some(())
    })
    .await;
    let nodes = support::wait_running(&c, "g", 1, LIMIT).await;
    assert_eq!(nodes, [ids[3].clone()], "stopped machines are never reported to cluster-autoscaler");
    assert_eq!(support::target_size(&mut c, "g").await, 1);
    // NodeGroupForNode does not claim a pool machine's Node.
    let r = c
        .node_group_for_node(pb::NodeGroupForNodeRequest {
            node: Some(pb::ExternalGrpcNode { provider_id: ids[0].clone(), name: "n".into(), ..Default::default() }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.node_group.unwrap_or_default().id, "", "a stopped machine belongs to no group CA sees");
    assert!(metric(&server, "flotilla_warm_pool_machines{group=\"g\",state=\"stopped\"} 2").await);
    assert!(metric(&server, "flotilla_warm_pool_capacity{group=\"g\"} 2").await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_scale_up_starts_pool_machines_before_creating_any() {
    let s = Setup::new().await;
    let (server, mut c, sim) = s.start(2).await;
    support::increase(&mut c, "g", 2).await.unwrap();
    let ids = support::wait_running(&c, "g", 2, LIMIT).await;
    let both: Vec<&str> = ids.iter().map(String::as_str).collect();
    support::delete(&mut c, "g", &both).await.unwrap();
    support::eventually(LIMIT, "both stopped", || async { (stopped(&sim) == 2).then_some(()) }).await;
    support::wait_running(&c, "g", 0, LIMIT).await;

    support::increase(&mut c, "g", 3).await.unwrap();
    assert_eq!(support::target_size(&mut c, "g").await, 3);
    let running = support::wait_running(&c, "g", 3, LIMIT).await;
    for id in &ids {
        assert!(running.contains(id), "pool machine {id} was started again");
    }
    assert_eq!(sim.machines().len(), 3, "two started, one created");
    assert_eq!(server.metrics.driver_calls("sim", "simulated", "start"), 2);
    assert_eq!(server.metrics.driver_calls("sim", "simulated", "create"), 3, "two at first, one now");
    assert!(metric(&server, "flotilla_warm_pool_starts_total{group=\"g\",result=\"ok\"} 2").await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_pool_machine_that_fails_to_start_is_deleted_and_replaced_by_a_create() {
    let s = Setup::new().await;
    let (server, mut c, sim) = s.start(1).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let id = support::wait_running(&c, "g", 1, LIMIT).await.remove(0);
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::eventually(LIMIT, "stopped", || async { (stopped(&sim) == 1).then_some(()) }).await;

    sim.faults().push(Op::Start, Fault::Unavailable);
    support::increase(&mut c, "g", 1).await.unwrap();
    let running = support::wait_running(&c, "g", 1, LIMIT).await;
    assert_ne!(running[0], id, "a new machine replaced the one that would not start");
    support::eventually(LIMIT, "the broken pool machine to be deleted", || async {
        (sim.machines().len() == 1).then_some(())
    })
    .await;
    assert_eq!(support::target_size(&mut c, "g").await, 1);
    assert!(metric(&server, "flotilla_warm_pool_starts_total{group=\"g\",result=\"failed\"} 1").await);
    server.stop().await.unwrap();
}

#[tokio::test]
async fn a_stopped_machine_loses_its_node_once_listed_stopped() {
    let s = Setup::new().await;
    let (server, mut c, sim) = s.start(1).await;
    support::increase(&mut c, "g", 1).await.unwrap();
    let id = support::wait_running(&c, "g", 1, LIMIT).await.remove(0);
    let name = id.rsplit('/').next().unwrap().to_owned();
    s.kube.add_node(&name, &id, &[]);
    support::delete(&mut c, "g", &[&id]).await.unwrap();
    support::eventually(LIMIT, "the stopped machine's Node to go", || {
        let mut c = c.clone();
        let (kube, sim, name) = (s.kube.clone(), Arc::clone(&sim), name.clone());
        async move {
            let _ = support::refresh(&mut c).await;
            if kube.node(&name).is_some() {
                return None;
            }
            assert_eq!(stopped(&sim), 1, "the Node went before the machine was stopped");
            Some(())
        }
    })
    .await;
    assert_eq!(sim.machines().len(), 1, "the machine itself stays, stopped");
    server.stop().await.unwrap();
    s.kube.assert_clean();
}

#[tokio::test]
async fn a_restarted_flotilla_finds_its_pool_in_the_cloud_and_trims_it_to_size() {
    let s = Setup::new().await;
    let (server, mut c, sim) = s.start(3).await;
    support::increase(&mut c, "g", 3).await.unwrap();
    let ids = support::wait_running(&c, "g", 3, LIMIT).await;
    let all: Vec<&str> = ids.iter().map(String::as_str).collect();
    support::delete(&mut c, "g", &all).await.unwrap();
    support::eventually(LIMIT, "three stopped", || async { (stopped(&sim) == 3).then_some(()) }).await;
    server.stop().await.unwrap();

    // Restarted with a smaller pool: the stopped machines are adopted, not reported, and the
    // one too many is deleted.
    let (server, mut c, sim) = s.start(2).await;
    support::wait_running(&c, "g", 0, LIMIT).await;
    assert_eq!(support::target_size(&mut c, "g").await, 0);
    support::eventually(LIMIT, "the pool trimmed to two", || {
        let mut c = c.clone();
        let sim = Arc::clone(&sim);
        async move {
            let _ = support::refresh(&mut c).await;
            (sim.machines().len() == 2 && stopped(&sim) == 2).then_some(())
        }
    })
    .await;
    support::increase(&mut c, "g", 2).await.unwrap();
    let running = support::wait_running(&c, "g", 2, LIMIT).await;
    assert!(running.iter().all(|id| ids.contains(id)), "the adopted pool machines were started");
    assert_eq!(server.metrics.driver_calls("sim", "simulated", "create"), 0);
    let nodes = support::nodes(&mut c, "g").await;
    assert!(nodes.iter().all(|(_, st, e)| *st == InstanceState::InstanceRunning && e.is_none()));
    server.stop().await.unwrap();
}

#[test]
fn a_warm_pool_needs_node_cleanup_and_a_driver_that_can_stop_and_start_it() {
    let text = "cluster_name = \"c\"\n[clouds.sim]\ndriver = \"simulated\"\n\
                [groups.g]\ncloud = \"sim\"\nmax_size = 3\nwarm_pool = 2\n";
    let problems = flotilla::config::Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap_err();
    assert!(problems.to_string().contains("groups.g.warm_pool: needs node_cleanup = true"), "{problems}");

    let text = "cluster_name = \"c\"\n[kubernetes]\nkubeconfig = \"/nonexistent\"\n\
                [clouds.s]\ndriver = \"slicer\"\nnode_cleanup = true\nurl = \"http://127.0.0.1:1\"\n\
                token = \"t\"\nk3s_url = \"https://127.0.0.1:6443\"\nk3s_token = \"j\"\n\
                [groups.g]\ncloud = \"s\"\nmax_size = 3\nwarm_pool = 2\n";
    let config = flotilla::config::Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
    let problems = flotilla::build_drivers(&config).unwrap_err();
    assert!(
        problems.to_string().contains("groups.g.machine.persistent: must be true for groups.g.warm_pool"),
        "Slicer relaunches only persistent VMs: {problems}"
    );
    let text = text.to_owned() + "[groups.g.machine]\npersistent = true\n";
    let config = flotilla::config::Config::parse(&text, "t.toml", std::path::Path::new(".")).unwrap();
    flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}"));
}

// === OpenStack: os-stop / os-start against the Nova fake ===

#[path = "fakes/openstack/mod.rs"]
mod os_fake;

fn openstack_config(os: &os_fake::Fake, kubeconfig: &std::path::Path) -> String {
    format!(
        r#"cluster_name = "dev"
[state]
reconcile_interval = "1h"
[kubernetes]
kubeconfig = "{kubeconfig}"
[clouds.os]
driver = "openstack"
node_cleanup = true
region_name = "RegionOne"
request_timeout = "2s"
{auth}[groups.workers]
cloud = "os"
max_size = 5
warm_pool = 1
[groups.workers.machine]
flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
networks = ["k3s-net"]
"#,
        kubeconfig = kubeconfig.display(),
        auth = os.auth_table("os"),
    )
}

#[tokio::test]
async fn openstack_stops_a_deleted_server_into_the_pool_and_starts_it_for_the_next_scale_up() {
    let kube = kube_fake::Fake::start("t").await;
    let os = os_fake::Fake::start().await;
    os.set_build_time(Duration::ZERO);
    os.set_power_time(Duration::from_millis(300));
    let dir = tempfile::tempdir().unwrap();
    let (server, mut c) = support::start(&openstack_config(&os, &kube.kubeconfig(dir.path(), "t"))).await;
    support::increase(&mut c, "workers", 1).await.unwrap();
    let id = support::wait_running(&c, "workers", 1, LIMIT).await.remove(0);
    let server_id = id.trim_start_matches("openstack:///").to_owned();

    support::delete(&mut c, "workers", &[&id]).await.unwrap();
    // Nova stops it asynchronously; refreshes see it powering off, then SHUTOFF: in the pool.
    support::wait_running(&c, "workers", 0, LIMIT).await;
    let status = |os: &os_fake::Fake| {
        os.requests()
            .iter()
            .filter(|r| {
                r.method == axum::http::Method::POST && r.path.ends_with(&format!("/servers/{server_id}/action"))
            })
            .map(|r| r.body.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(status(&os), [serde_json::json!({ "os-stop": null })]);
    assert_eq!(os.servers().len(), 1, "the server is kept");
    assert_eq!(support::target_size(&mut c, "workers").await, 0);

    support::increase(&mut c, "workers", 1).await.unwrap();
    let running = support::wait_running(&c, "workers", 1, LIMIT).await;
    assert_eq!(running, std::slice::from_ref(&id), "the stopped server was started, none created");
    assert_eq!(status(&os), [serde_json::json!({ "os-stop": null }), serde_json::json!({ "os-start": null })]);
    assert_eq!(os.count(axum::http::Method::POST, "/servers"), 1, "one create in all");
    server.stop().await.unwrap();
    os.assert_clean();
}

#[tokio::test]
async fn openstack_a_repeated_stop_is_done_and_a_start_waits_for_the_server_to_power_off() {
    let kube = kube_fake::Fake::start("t").await;
    let os = os_fake::Fake::start().await;
    os.set_build_time(Duration::ZERO);
    os.set_power_time(Duration::from_millis(800));
    let dir = tempfile::tempdir().unwrap();
    let config = support::config(&openstack_config(&os, &kube.kubeconfig(dir.path(), "t")));
    let driver = flotilla::build_drivers(&config).unwrap().remove(0);
    assert!(driver.can_stop());
    let m = driver.create("workers", "dev-workers-aaaaa").await.unwrap();
    let machine = flotilla::driver::MachineRef::from(&m);
    driver.stop(&machine).await.unwrap();
    driver.stop(&machine).await.expect("stopping a server that is powering off is done");
    assert_eq!(os.count(axum::http::Method::POST, "/action"), 1, "the second stop sent nothing");
    let listed = driver.list().await.unwrap();
    assert_eq!(listed[0].state, flotilla::driver::MachineState::Stopped, "powering off in a pool group");
    let started = driver.start(&machine).await.unwrap();
    assert_eq!(started.state, flotilla::driver::MachineState::Creating);
    let actions: Vec<u16> = os.requests().iter().filter(|r| r.path.ends_with("/action")).map(|r| r.status).collect();
    assert_eq!(actions, [202, 202], "os-start was sent only once the server was SHUTOFF, and accepted");
    // A server that is not ours is never stopped.
    let stranger = os.add_server("hand-made", &[]);
    let err = driver
        .stop(&flotilla::driver::MachineRef { group: "workers".into(), name: "hand-made".into(), id: stranger })
        .await
        .unwrap_err();
    assert!(err.to_string().contains("refusing to touch it"), "{err}");
    os.assert_clean();
}

// === Proxmox VE: shutdown + tag / untag + start against the PVE fake ===

#[path = "fakes/proxmox/mod.rs"]
mod pve_fake;

#[tokio::test]
async fn proxmox_stops_a_vm_into_the_pool_tagged_and_starts_it_untagged() {
    let pve = pve_fake::Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), format!("{}\n", pve_fake::TOKEN_SECRET)).unwrap();
    let text = format!(
        "cluster_name = \"prod\"\n[kubernetes]\nkubeconfig = \"/nonexistent\"\n\
         [clouds.pve]\ndriver = \"proxmox\"\nnode_cleanup = true\nregion = \"dc1\"\nurl = \"{}\"\npoll_interval = \"10ms\"\n\
         token_id = \"{}\"\ntoken_secret = {{ file = \"{}\" }}\n\
         [groups.workers]\ncloud = \"pve\"\nmax_size = 10\nwarm_pool = 2\n\
         [groups.workers.machine]\ntemplate = 9000\n\
         [groups.plain]\ncloud = \"pve\"\nmax_size = 10\n\
         [groups.plain.machine]\ntemplate = 9000\n",
        pve.url(),
        pve_fake::TOKEN_ID,
        dir.path().join("token").display(),
    );
    let config = support::config(&text);
    let d = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0);
    let m = d.create("workers", "prod-workers-abcde").await.unwrap();
    let machine = flotilla::driver::MachineRef::from(&m);
    let plain = d.create("plain", "prod-plain-fghij").await.unwrap();

    d.stop(&machine).await.unwrap();
    {
        let s = pve.state();
        let vm = &s.vms[&m.id.parse::<u32>().unwrap()];
        assert_eq!(vm.status, "stopped");
        assert_eq!(vm.config["tags"], "flotilla-c-prod;flotilla-g-workers;flotilla-stopped");
    }
    // A VM of a group without a pool that is stopped (by hand, or a crash) is what it always
    // was: an interrupted machine CA deletes; and an untagged stopped VM in a pool group too.
    {
        let mut s = pve.state();
        s.vms.get_mut(&plain.id.parse::<u32>().unwrap()).unwrap().status = "stopped".into();
    }
    let listed: std::collections::BTreeMap<String, flotilla::driver::MachineState> =
        d.list().await.unwrap().into_iter().map(|m| (m.name, m.state)).collect();
    assert_eq!(listed["prod-workers-abcde"], flotilla::driver::MachineState::Stopped);
    assert!(
        matches!(&listed["prod-plain-fghij"], flotilla::driver::MachineState::Failed(f) if f.code == "INTERRUPTED")
    );

    let started = d.start(&machine).await.unwrap();
    assert_eq!(started.state, flotilla::driver::MachineState::Creating);
    {
        let s = pve.state();
        let vm = &s.vms[&m.id.parse::<u32>().unwrap()];
        assert_eq!(vm.status, "running");
        assert_eq!(vm.config["tags"], "flotilla-c-prod;flotilla-g-workers", "untagged before the start");
        let starts = s.calls("POST", &format!("qemu/{}/status/start", m.id));
        assert_eq!(starts.len(), 2, "one at create, one from the pool");
    }
    let listed = d.list().await.unwrap();
    assert!(
        listed.iter().any(|x| x.name == "prod-workers-abcde" && x.state == flotilla::driver::MachineState::Running)
    );
    pve.assert_clean();
}
