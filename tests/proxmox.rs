//! The Proxmox VE driver against a fake PVE API that checks every request.
#[path = "fakes/proxmox/mod.rs"]
mod fake;
mod support;

use std::{collections::HashSet, time::Duration};

use fake::{Fake, FaultAction, HttpServer};
use flotilla::driver::{Error, MachineRef, MachineState, SharedDriver};
use flotilla::proto::externalgrpc::instance_status::InstanceState;

const LIMIT: Duration = Duration::from_secs(20);

struct Setup {
    fake: Fake,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), format!("{}\n", fake::TOKEN_SECRET)).unwrap();
        std::fs::write(dir.path().join("password"), fake::PASSWORD).unwrap();
        Setup { fake: Fake::start().await, dir }
    }

    fn secret(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Configuration with token auth; `cloud` and `machine` add keys to those tables.
    fn toml(&self, cloud: &str, machine: &str) -> String {
        format!(
            "cluster_name = \"prod\"\n\
             [clouds.pve]\ndriver = \"proxmox\"\nregion = \"dc1\"\nurl = \"{}\"\npoll_interval = \"10ms\"\n\
             token_id = \"{}\"\ntoken_secret = {{ file = \"{}\" }}\n{cloud}\n\
             [groups.workers]\ncloud = \"pve\"\nmax_size = 10\n\
             [groups.workers.machine]\ntemplate = 9000\n{machine}\n",
            self.fake.url(),
            fake::TOKEN_ID,
            self.secret("token"),
        )
    }

    fn driver(&self, text: &str) -> SharedDriver {
        let config = support::config(text);
        flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0)
    }
}

const POOL: &str = "ip_pool = \"10.0.0.10-10.0.0.15\"\nprefix_len = 24\ngateway = \"10.0.0.1\"\n";

#[tokio::test]
async fn a_create_clones_configures_starts_and_marks_the_vm() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml(
        "",
        &format!(
            "{POOL}cores = 4\nmemory = \"6Gi\"\nstorage = \"local-lvm\"\nci_user = \"ubuntu\"\n\
             ssh_keys = [\"ssh-ed25519 AAAAC3 ops@example\"]\nnameservers = [\"10.0.0.2\", \"10.0.0.3\"]\n\
             search_domain = \"k8s.local\"\n"
        ),
    ));
    let m = d.create("workers", "prod-workers-abcde").await.unwrap();
    assert_eq!(m.state, MachineState::Running);
    assert_eq!(m.id, "100");
    let s = t.fake.state();
    // pve2 has the most free memory, but the target storage local-lvm is not shared: PVE
    // clones to it only on the template's node.
    let vm = &s.vms[&100];
    assert_eq!(vm.node, "pve1");
    assert_eq!(vm.config["scsi0"], "local-lvm:vm-100-disk-0,size=8G");
    assert_eq!(vm.status, "running");
    assert_eq!(vm.config["tags"], "flotilla-c-prod;flotilla-g-workers");
    assert_eq!(vm.config["ipconfig0"], "ip=10.0.0.10/24,gw=10.0.0.1");
    assert_eq!(vm.config["cores"], "4");
    assert_eq!(vm.config["memory"], "6144");
    assert_eq!(vm.config["nameserver"], "10.0.0.2 10.0.0.3");
    assert_eq!(vm.config["searchdomain"], "k8s.local");
    assert_eq!(vm.config["ciuser"], "ubuntu");
    assert_eq!(vm.config["sshkeys"], "ssh-ed25519%20AAAAC3%20ops%40example");
    let clone = &s.calls("POST", "qemu/9000/clone")[0];
    assert_eq!(clone.path, "nodes/pve1/qemu/9000/clone");
    assert_eq!(clone.param("newid"), Some("100"));
    assert_eq!(clone.param("target"), Some("pve1"));
    assert_eq!(clone.param("full"), Some("1"));
    assert_eq!(clone.param("storage"), Some("local-lvm"));
    assert_eq!(clone.param("name"), Some("prod-workers-abcde"));
    assert_eq!(clone.param("description"), Some("flotilla cluster=prod group=workers"));
    // Each task was awaited on the node it runs on (the fake checks the node).
    let polled: HashSet<String> =
        s.calls("GET", "/status").into_iter().filter(|r| r.path.contains("/tasks/")).map(|r| r.path).collect();
    assert!(
        polled.iter().any(|p| p.contains(":qmclone:")) && polled.iter().any(|p| p.contains(":qmstart:")),
        "{polled:?}"
    );
    assert!(s.requests.iter().all(|r| r.auth == "token"));
    // Five calls per create, besides polling the tasks.
    let calls: Vec<String> =
        s.requests.iter().filter(|r| !r.path.contains("/tasks/")).map(|r| format!("{} {}", r.method, r.path)).collect();
    assert_eq!(
        calls,
        [
            "GET cluster/resources",
            "GET cluster/nextid",
            "POST nodes/pve1/qemu/9000/clone",
            "PUT nodes/pve1/qemu/100/config",
            "POST nodes/pve1/qemu/100/status/start"
        ]
    );
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn listing_returns_only_this_clusters_vms_and_reports_interrupted_ones_as_failed() {
    let t = Setup::new().await;
    {
        let mut s = t.fake.state();
        s.add_vm(200, "pve1", "prod-workers-run01", "running", &[("tags", "flotilla-c-prod;flotilla-g-workers")]);
        // Tagged but stopped, and no create running for it: interrupted.
        s.add_vm(201, "pve1", "prod-workers-stop1", "stopped", &[("tags", "flotilla-c-prod;flotilla-g-workers")]);
        // Interrupted between clone and config: untagged, known by name prefix and marker.
        s.add_vm(
            202,
            "pve2",
            "prod-workers-half1",
            "stopped",
            &[("description", "flotilla cluster=prod group=workers")],
        );
        // Someone else's: another cluster, an untagged VM with our prefix but no marker, a plain VM.
        s.add_vm(203, "pve1", "other-workers-x", "running", &[("tags", "flotilla-c-other;flotilla-g-workers")]);
        s.add_vm(204, "pve1", "prod-workers-byhand", "running", &[("description", "made by hand")]);
        s.add_vm(205, "pve2", "database", "running", &[]);
    }
    let d = t.driver(&t.toml("", ""));
    let mut machines = d.list().await.unwrap();
    machines.sort_by(|a, b| a.id.cmp(&b.id));
    let summary: Vec<(&str, &str, bool)> =
        machines.iter().map(|m| (m.id.as_str(), m.name.as_str(), m.state == MachineState::Running)).collect();
    assert_eq!(
        summary,
        [
            ("200", "prod-workers-run01", true),
            ("201", "prod-workers-stop1", false),
            ("202", "prod-workers-half1", false)
        ]
    );
    assert!(machines[1..].iter().all(|m| matches!(&m.state, MachineState::Failed(f) if f.code == "INTERRUPTED")));
    assert!(machines.iter().all(|m| m.group == "workers"));
    // One listing plus one config read per untagged prefix match; the second listing reads none.
    d.list().await.unwrap();
    let s = t.fake.state();
    assert_eq!(s.calls("GET", "cluster/resources").len(), 2);
    let configs: Vec<String> = s.calls("GET", "/config").into_iter().map(|r| r.path).collect();
    assert_eq!(configs, ["nodes/pve2/qemu/202/config", "nodes/pve1/qemu/204/config"]);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn concurrent_creates_from_one_pool_never_share_an_address() {
    let t = Setup::new().await;
    {
        let mut s = t.fake.state();
        // An existing node of this cluster already holds .12.
        s.add_vm(
            150,
            "pve1",
            "prod-workers-old01",
            "running",
            &[("tags", "flotilla-c-prod;flotilla-g-workers"), ("ipconfig0", "ip=10.0.0.12/24,gw=10.0.0.1")],
        );
        s.faults.latency = Duration::from_millis(5);
    }
    let d = t.driver(&t.toml("", POOL));
    let mut set = tokio::task::JoinSet::new();
    for i in 0..5 {
        let d = d.clone();
        set.spawn(async move { d.create("workers", &format!("prod-workers-c{i:04}")).await });
    }
    let mut created = 0;
    while let Some(r) = set.join_next().await {
        r.unwrap().unwrap();
        created += 1;
    }
    assert_eq!(created, 5);
    let ips: Vec<String> = t.fake.state().vms.values().filter_map(|v| v.config.get("ipconfig0").cloned()).collect();
    let distinct: HashSet<&String> = ips.iter().collect();
    assert_eq!(ips.len(), 6, "{ips:?}");
    assert_eq!(distinct.len(), 6, "an address was assigned twice: {ips:?}");
    // The pool (6 addresses) is now exhausted.
    let err = d.create("workers", "prod-workers-extra").await.unwrap_err();
    assert!(matches!(err, Error::OutOfResources(ref m) if m.contains("exhausted")), "{err}");
    // A deleted VM frees its address for the next create.
    d.delete(&MachineRef { group: "workers".into(), name: "prod-workers-old01".into(), id: "150".into() })
        .await
        .unwrap();
    let m = d.create("workers", "prod-workers-again").await.unwrap();
    let vmid: u32 = m.id.parse().unwrap();
    assert_eq!(t.fake.state().vms[&vmid].config["ipconfig0"], "ip=10.0.0.12/24,gw=10.0.0.1");
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_vm_being_created_is_listed_as_creating_until_create_returns() {
    let t = Setup::new().await;
    t.fake.state().faults.task_duration = Duration::from_millis(300);
    let d = t.driver(&t.toml("", ""));
    let creating = {
        let d = d.clone();
        tokio::spawn(async move { d.create("workers", "prod-workers-slow1").await })
    };
    let seen = support::eventually(LIMIT, "the cloning VM in a listing", || {
        let d = d.clone();
        async move { d.list().await.unwrap().into_iter().find(|m| m.name == "prod-workers-slow1") }
    })
    .await;
    assert_eq!(seen.state, MachineState::Creating);
    creating.await.unwrap().unwrap();
    let after = d.list().await.unwrap();
    assert_eq!(after.len(), 1);
    assert_eq!(after[0].state, MachineState::Running);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_vmid_race_is_retried_with_another_id() {
    let t = Setup::new().await;
    t.fake.state().faults.steal_next_id = 1;
    let d = t.driver(&t.toml("", ""));
    let m = d.create("workers", "prod-workers-race1").await.unwrap();
    assert_eq!(m.id, "101");
    let s = t.fake.state();
    let clones: Vec<Option<String>> =
        s.calls("POST", "/clone").iter().map(|r| r.param("newid").map(str::to_owned)).collect();
    assert_eq!(clones, [Some("100".to_owned()), Some("101".to_owned())]);
    assert_eq!(s.vms[&100].name, "someone-elses");
    assert_eq!(s.vms[&101].config["ipconfig0"], "ip=dhcp");
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_vmid_range_is_used_lowest_free_first() {
    let t = Setup::new().await;
    t.fake.state().add_vm(5000, "pve1", "database", "running", &[]);
    let d = t.driver(&t.toml("vmid_min = 5000\nvmid_max = 5001", ""));
    assert_eq!(d.create("workers", "prod-workers-r0001").await.unwrap().id, "5001");
    let err = d.create("workers", "prod-workers-r0002").await.unwrap_err();
    assert!(matches!(err, Error::OutOfResources(ref m) if m.contains("VMID")), "{err}");
    assert!(t.fake.state().calls("GET", "cluster/nextid").is_empty());
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_failed_clone_task_is_a_creation_error_and_leaves_nothing() {
    let t = Setup::new().await;
    t.fake.state().faults.fail_next_task.insert("qmclone".into(), "clone failed: storage 'local-lvm' is full".into());
    let d = t.driver(&t.toml("", POOL));
    let err = d.create("workers", "prod-workers-fail1").await.unwrap_err();
    assert!(err.to_string().contains("clone failed"), "{err}");
    assert_eq!(t.fake.state().vms.len(), 1, "only the template is left");
    // The address went back to the pool.
    d.create("workers", "prod-workers-ok001").await.unwrap();
    assert_eq!(t.fake.state().vms[&100].config["ipconfig0"], "ip=10.0.0.10/24,gw=10.0.0.1");
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_failed_start_destroys_the_half_created_vm() {
    let t = Setup::new().await;
    t.fake.state().faults.fail_next_task.insert("qmstart".into(), "start failed: not enough memory".into());
    let d = t.driver(&t.toml("", ""));
    let err = d.create("workers", "prod-workers-fail2").await.unwrap_err();
    assert!(matches!(err, Error::OutOfResources(_)), "{err}");
    let s = t.fake.state();
    assert_eq!(s.vms.len(), 1, "the clone was destroyed");
    let destroy = &s.calls("DELETE", "qemu/100")[0];
    assert_eq!(destroy.param("purge"), Some("1"));
    // Whether it got as far as running is unknown to the driver: it asks for a stop, which
    // PVE refuses as "not running", and destroys it anyway.
    assert_eq!(s.calls("POST", "qemu/100/status/stop").len(), 1);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_half_created_vm_that_cannot_be_removed_is_listed_as_failed() {
    let t = Setup::new().await;
    {
        let mut s = t.fake.state();
        s.faults.fail_next_task.insert("qmstart".into(), "start failed: kvm: cannot open /dev/kvm".into());
        s.faults.fail_next_task.insert("qmdestroy".into(), "storage 'local-lvm' is offline".into());
    }
    let d = t.driver(&t.toml("", POOL));
    let err = d.create("workers", "prod-workers-stuck").await.unwrap_err();
    assert!(err.to_string().contains("kvm"), "{err}");
    let listed = d.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].name, "prod-workers-stuck");
    assert!(matches!(&listed[0].state, MachineState::Failed(f) if f.code == "INTERRUPTED"));
    // Its address stays taken (read back from the VM) until it is really gone.
    let next = d.create("workers", "prod-workers-next1").await.unwrap();
    let vmid: u32 = next.id.parse().unwrap();
    assert_eq!(t.fake.state().vms[&vmid].config["ipconfig0"], "ip=10.0.0.11/24,gw=10.0.0.1");
    // cluster-autoscaler deletes it; this time the destroy works.
    d.delete(&MachineRef::from(&listed[0])).await.unwrap();
    assert!(!t.fake.state().vms.contains_key(&100));
    t.fake.assert_clean();
}

#[tokio::test]
async fn the_node_waits_for_a_running_system_then_runs_the_join_command() {
    let t = Setup::new().await;
    {
        let mut s = t.fake.state();
        s.faults.agent_down_calls = 2;
        s.faults.starting_answers = 2;
    }
    let d = t.driver(
        &t.toml("", &format!("{POOL}join_command = \"k3s-join --node-ip {{{{ ip }}}} --node-name {{{{ name }}}}\"\n")),
    );
    d.create("workers", "prod-workers-join1").await.unwrap();
    let s = t.fake.state();
    assert_eq!(s.vms[&100].joined, ["k3s-join --node-ip 10.0.0.10 --node-name prod-workers-join1"]);
    // 2 refused (agent down), 2 answered "starting", 1 "running", then the join.
    assert_eq!(s.vms[&100].agent_calls, 6);
    let exec = s.calls("POST", "agent/exec");
    let last: Vec<&str> = exec.last().unwrap().form.iter().map(|(_, v)| v.as_str()).collect();
    assert_eq!(last[..2], ["/bin/sh", "-c"]);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_failing_join_command_fails_the_create_and_cleans_up() {
    let t = Setup::new().await;
    t.fake.state().faults.join_exit = 1;
    let d = t.driver(&t.toml("", "join_command = \"kubeadm join 10.0.0.1:6443 --token abc\"\n"));
    let err = d.create("workers", "prod-workers-join2").await.unwrap_err();
    assert!(err.to_string().contains("join command exited with 1"), "{err}");
    let s = t.fake.state();
    assert_eq!(s.vms.len(), 1);
    // Running, so it was stopped before being destroyed.
    assert_eq!(s.calls("POST", "qemu/100/status/stop").len(), 1);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn delete_is_idempotent_and_refuses_vms_that_are_not_ours() {
    let t = Setup::new().await;
    {
        let mut s = t.fake.state();
        s.add_vm(300, "pve2", "prod-workers-del01", "running", &[("tags", "flotilla-c-prod;flotilla-g-workers")]);
        s.add_vm(301, "pve1", "database", "running", &[]);
        // The VMID of a deleted machine, reused by someone else.
        s.add_vm(302, "pve1", "prod-workers-reuse", "running", &[("tags", "other")]);
        // Left by a create interrupted before its config call: untagged, marked by description.
        s.add_vm(
            303,
            "pve2",
            "prod-workers-half2",
            "stopped",
            &[("description", "flotilla cluster=prod group=workers")],
        );
    }
    let d = t.driver(&t.toml("shutdown_timeout = \"30s\"", ""));
    let mine = MachineRef { group: "workers".into(), name: "prod-workers-del01".into(), id: "300".into() };
    d.delete(&mine).await.unwrap();
    assert!(!t.fake.state().vms.contains_key(&300));
    assert!(matches!(d.delete(&mine).await, Err(Error::NotFound(_))));
    for (id, name) in [("301", "database"), ("302", "prod-workers-reuse")] {
        let other = MachineRef { group: "workers".into(), name: name.into(), id: id.into() };
        assert!(matches!(d.delete(&other).await, Err(Error::InvalidRequest(_))));
    }
    let half = MachineRef { group: "workers".into(), name: "prod-workers-half2".into(), id: "303".into() };
    d.delete(&half).await.unwrap();
    let s = t.fake.state();
    assert_eq!(s.vms.keys().copied().collect::<Vec<_>>(), [301, 302, 9000]);
    let shutdown = &s.calls("POST", "qemu/300/status/shutdown")[0];
    assert_eq!((shutdown.param("forceStop"), shutdown.param("timeout")), (Some("1"), Some("30")));
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn ticket_auth_logs_in_sends_csrf_on_writes_and_logs_in_again_when_the_ticket_expires() {
    let t = Setup::new().await;
    let text = t.toml("", "").replace(
        &format!("token_id = \"{}\"\ntoken_secret = {{ file = \"{}\" }}", fake::TOKEN_ID, t.secret("token")),
        &format!("username = \"{}\"\npassword = {{ file = \"{}\" }}", fake::USER, t.secret("password")),
    );
    let d = t.driver(&text);
    d.create("workers", "prod-workers-tick1").await.unwrap();
    t.fake.expire_tickets();
    d.list().await.unwrap();
    let s = t.fake.state();
    assert_eq!(s.calls("POST", "access/ticket").len(), 2);
    assert_eq!(s.rejected, 1, "the expired ticket was refused once");
    assert!(s.requests.iter().filter(|r| r.path != "access/ticket").all(|r| r.auth == "ticket"));
    assert!(s.requests.iter().filter(|r| r.method != "GET" && r.auth == "ticket").all(|r| r.csrf));
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn bad_credentials_are_unauthorized() {
    let t = Setup::new().await;
    std::fs::write(t.dir.path().join("token"), "wrong").unwrap();
    let d = t.driver(&t.toml("", ""));
    assert!(matches!(d.check().await, Err(Error::Unauthorized(_))));
    assert!(matches!(d.list().await, Err(Error::Unauthorized(_))));
    t.fake.assert_clean();
}

#[tokio::test]
async fn no_node_with_enough_memory_is_out_of_resources() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml("nodes = [\"pve1\"]", "memory = \"12Gi\""));
    let err = d.create("workers", "prod-workers-big01").await.unwrap_err();
    assert!(matches!(err, Error::OutOfResources(_)), "{err}");
    assert!(t.fake.state().calls("POST", "/clone").is_empty());
    t.fake.assert_clean();
}

#[tokio::test]
async fn the_template_shape_comes_from_the_template_vm_or_overrides() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml("", ""));
    let shape = d.shape("workers").await.unwrap().unwrap();
    assert_eq!((shape.cpu_millis, shape.memory_bytes), (Some(2000), Some(4096 << 20)));
    let d = t.driver(&t.toml("", "cores = 8\nmemory = \"16Gi\""));
    let shape = d.shape("workers").await.unwrap().unwrap();
    assert_eq!((shape.cpu_millis, shape.memory_bytes), (Some(8000), Some(16 << 30)));
    t.fake.assert_clean();
}

#[tokio::test]
async fn user_data_is_rendered_into_a_snippet_and_referenced() {
    let t = Setup::new().await;
    let snippets = t.dir.path().join("snippets");
    std::fs::create_dir(&snippets).unwrap();
    let d = t.driver(&t.toml(
        "",
        &format!(
            "snippets_dir = \"{}\"\nsnippets_storage = \"shared\"\nuser_data = \"\"\"\n#cloud-config\nhostname: {{{{ name }}}}\nruncmd: [\\\"echo {{{{ cluster }}}}/{{{{ group }}}}\\\"]\n\"\"\"\n",
            snippets.display()
        ),
    ));
    d.create("workers", "prod-workers-ud001").await.unwrap();
    let file = snippets.join("flotilla-prod-workers-ud001.yaml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("hostname: prod-workers-ud001"), "{text}");
    assert!(text.contains("echo prod/workers"), "{text}");
    assert_eq!(t.fake.state().vms[&100].config["cicustom"], "user=shared:snippets/flotilla-prod-workers-ud001.yaml");
    d.delete(&MachineRef { group: "workers".into(), name: "prod-workers-ud001".into(), id: "100".into() })
        .await
        .unwrap();
    assert!(!file.exists());
    t.fake.assert_clean();
}

#[tokio::test]
async fn configuration_problems_are_all_reported() {
    let text = "cluster_name = \"prod\"\n[clouds.pve]\ndriver = \"proxmox\"\nurl = \"http://pve.example:8006\"\n\
                token_id = \"nobang\"\ntoken_secret = { env = \"FLOTILLA_TEST_UNSET_PVE_TOKEN\" }\ntls_fingerprint = \"zz\"\ntypo = 1\n\
                [groups.workers]\ncloud = \"pve\"\nmax_size = 1\n[groups.workers.machine]\nip_pool = \"10.0.0.9-10.0.0.1\"\nfull_clone = false\nstorage = \"x\"\n";
    let config = support::config(text);
    let problems = flotilla::build_drivers(&config).unwrap_err();
    let paths: Vec<&str> = problems.items.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "clouds.pve.url",
        "clouds.pve.token_id",
        "clouds.pve.tls_fingerprint",
        "clouds.pve.typo",
        "clouds.pve.token_secret",
        "groups.workers.machine.template",
        "groups.workers.machine.ip_pool",
        "groups.workers.machine.storage",
    ] {
        assert!(paths.contains(&expected), "{expected} missing from {paths:?}");
    }
    // A secret that cannot be read is one problem, not also a missing-credentials one.
    assert!(!paths.contains(&"clouds.pve"), "{paths:?}");
}

#[tokio::test]
async fn a_template_mistake_is_a_configuration_problem_at_its_key() {
    let t = Setup::new().await;
    let text = t.toml(
        "",
        "snippets_dir = \"/tmp\"\nsnippets_storage = \"shared\"\nuser_data = \"hostname: {{ nmae }}\"\n\
         join_command = \"k3s-join {% if %}\"\n",
    );
    let problems = flotilla::build_drivers(&support::config(&text)).unwrap_err();
    let at = |key: &str| {
        let path = format!("groups.workers.machine.{key}");
        problems.items.iter().find(|p| p.path == path).unwrap_or_else(|| panic!("no {path} in {problems}"))
    };
    let user_data = &at("user_data").message;
    assert!(user_data.contains("unknown variables: nmae"), "{user_data}");
    let join = &at("join_command").message;
    assert!(join.starts_with("cannot render the join command template: syntax error"), "{join}");
}

#[tokio::test]
async fn cluster_autoscaler_scales_a_group_up_and_down_over_grpc() {
    let t = Setup::new().await;
    let text = t.toml("", &format!("{POOL}join_command = \"k3s-agent-join {{{{ name }}}}\""));
    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "workers", 2).await.unwrap();
    let ids = support::wait_running(&c, "workers", 2, LIMIT).await;
    assert!(ids.iter().all(|id| id.starts_with("proxmox://dc1/1")), "{ids:?}");
    {
        let s = t.fake.state();
        let ours: Vec<_> = s.vms.values().filter(|v| !v.template).collect();
        assert_eq!(ours.len(), 2);
        assert!(ours.iter().all(|v| v.joined.len() == 1 && v.status == "running"));
    }
    support::delete(&mut c, "workers", &[ids[0].as_str()]).await.unwrap();
    support::eventually(LIMIT, "one VM left", || async { (t.fake.state().vms.len() == 2).then_some(()) }).await;
    let left = support::wait_running(&c, "workers", 1, LIMIT).await;
    assert_eq!(left, [ids[1].clone()]);
    assert_eq!(support::target_size(&mut c, "workers").await, 1);
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_restarted_flotilla_finds_an_interrupted_vm_and_cluster_autoscaler_removes_it() {
    let t = Setup::new().await;
    t.fake.state().add_vm(
        400,
        "pve1",
        "prod-workers-crash",
        "stopped",
        &[("tags", "flotilla-c-prod;flotilla-g-workers"), ("ipconfig0", "ip=10.0.0.10/24")],
    );
    let (server, mut c) = support::start(&t.toml("", POOL)).await;
    let failed = support::eventually(LIMIT, "the interrupted VM listed as failed", || {
        let mut c = c.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            let nodes = support::nodes(&mut c, "workers").await;
            nodes.into_iter().find(|(_, _, e)| e.is_some()).map(|(id, _, _)| id)
        }
    })
    .await;
    assert_eq!(failed, "proxmox://dc1/400");
    support::delete(&mut c, "workers", &[failed.as_str()]).await.unwrap();
    support::eventually(LIMIT, "the interrupted VM destroyed", || async {
        (!t.fake.state().vms.contains_key(&400)).then_some(())
    })
    .await;
    // Stopped already: destroyed without a stop.
    assert!(t.fake.state().calls("POST", "qemu/400/status/stop").is_empty());
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn the_example_configuration_is_valid() {
    let t = Setup::new().await;
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/proxmox.toml")).unwrap();
    assert!(text.contains("{ env = \"PVE_TOKEN\" }"));
    let text = text.replace("{ env = \"PVE_TOKEN\" }", &format!("{{ file = \"{}\" }}", t.secret("token")));
    let config = support::config(&text);
    let drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(drivers[0].kind(), "proxmox");
}

#[tokio::test]
async fn an_exhausted_pool_reaches_cluster_autoscaler_as_out_of_resources() {
    let t = Setup::new().await;
    let text = t.toml("", "ip_pool = \"10.0.0.10\"\nprefix_len = 24\n");
    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "workers", 2).await.unwrap();
    let failure = support::eventually(LIMIT, "one create failed, one running", || {
        let mut c = c.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            let nodes = support::nodes(&mut c, "workers").await;
            let running = nodes.iter().filter(|(_, s, e)| *s == InstanceState::InstanceRunning && e.is_none()).count();
            let failed: Vec<_> = nodes.into_iter().filter_map(|(_, _, e)| e).collect();
            (running == 1 && failed.len() == 1).then(|| failed[0].clone())
        }
    })
    .await;
    assert_eq!(failure.instance_error_class, 1, "{failure:?}");
    assert_eq!(failure.error_code, "OUT_OF_RESOURCES");
    assert!(failure.error_message.contains("exhausted"), "{failure:?}");
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

// Placement: PVE clones to another node only when the template's volumes and the target
// storage are shared (qemu-server `clone_vm`); the fake refuses exactly as PVE does.

#[tokio::test]
async fn with_a_shared_template_and_storage_clones_go_to_the_node_with_the_most_free_memory() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml("", "storage = \"ceph\"\n"));
    d.create("workers", "prod-workers-sh001").await.unwrap();
    d.create("workers", "prod-workers-sh002").await.unwrap();
    let s = t.fake.state();
    assert_eq!(s.vms[&100].node, "pve2");
    assert_eq!(s.vms[&100].config["scsi0"], "ceph:vm-100-disk-0,size=8G");
    // The template's volumes are read once, then known.
    assert_eq!(s.calls("GET", "qemu/9000/config").len(), 1);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_template_on_local_storage_is_cloned_only_on_its_own_node() {
    let t = Setup::new().await;
    t.fake.state().move_volumes(9000, "local-lvm");
    let d = t.driver(&t.toml("", ""));
    d.create("workers", "prod-workers-lo001").await.unwrap();
    d.create("workers", "prod-workers-lo002").await.unwrap();
    let s = t.fake.state();
    // pve2 has more memory free, but PVE would refuse it: "(VM uses local storage)".
    assert_eq!([s.vms[&100].node.as_str(), s.vms[&101].node.as_str()], ["pve1", "pve1"]);
    assert!(s.calls("POST", "/clone").iter().all(|c| c.param("target") == Some("pve1")));
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_group_whose_clones_cannot_reach_an_allowed_node_fails_clearly_and_the_check_says_why() {
    let t = Setup::new().await;
    t.fake.state().move_volumes(9000, "local-lvm");
    let d = t.driver(&t.toml("", "nodes = [\"pve2\"]\n"));
    let e = d.create("workers", "prod-workers-no001").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidRequest(m) if m.contains("local storage 'local-lvm'") && m.contains("pve1") && m.contains("pve2")),
        "{e}"
    );
    let e = d.check().await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("group workers") && m.contains("local-lvm")), "{e}");

    // A shared template, but a target storage that is not shared.
    t.fake.state().move_volumes(9000, "ceph");
    let d = t.driver(&t.toml("", "nodes = [\"pve2\"]\nstorage = \"local-lvm\"\n"));
    let e = d.create("workers", "prod-workers-no002").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("'local-lvm' is not shared")), "{e}");
    assert!(matches!(d.check().await, Err(Error::InvalidRequest(_))));

    // A target storage that is not on the template's node.
    t.fake.state().storage_mut("ceph").nodes = Some(vec!["pve2".into()]);
    let d = t.driver(&t.toml("", "storage = \"ceph\"\n"));
    let e = d.create("workers", "prod-workers-no003").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("not available on node 'pve1'")), "{e}");
    let e = d.check().await.unwrap_err();
    assert!(e.to_string().contains("not available on node 'pve1'"), "{e}");

    // A working configuration passes.
    t.fake.state().storage_mut("ceph").nodes = None;
    t.driver(&t.toml("", "storage = \"ceph\"\n")).check().await.unwrap();
    assert!(t.fake.state().calls("POST", "/clone").is_empty(), "nothing was cloned");
    t.fake.assert_clean();
}

#[tokio::test]
async fn clones_that_must_stay_on_an_offline_node_wait_for_it() {
    let t = Setup::new().await;
    {
        let mut s = t.fake.state();
        s.move_volumes(9000, "local-lvm");
        s.nodes[0].online = false;
    }
    let d = t.driver(&t.toml("", ""));
    let e = d.create("workers", "prod-workers-off01").await.unwrap_err();
    assert!(matches!(&e, Error::Unavailable(m) if m.contains("pve1 is offline")), "{e}");
    t.fake.assert_clean();
}

#[tokio::test]
async fn without_sight_of_the_storage_configuration_clones_stay_on_the_template_node() {
    let t = Setup::new().await;
    t.fake.state().faults.storages_hidden = true;
    let d = t.driver(&t.toml("", ""));
    d.create("workers", "prod-workers-hid01").await.unwrap();
    assert_eq!(t.fake.state().vms[&100].node, "pve1");
    t.fake.assert_clean();
}

#[tokio::test]
async fn the_fake_refuses_the_clones_pve_refuses() {
    let t = Setup::new().await;
    t.fake.state().move_volumes(9000, "local-lvm");
    let http = reqwest::Client::new();
    let clone = |form: Vec<(&'static str, &'static str)>| {
        http.post(format!("{}/api2/json/nodes/pve1/qemu/9000/clone", t.fake.url()))
            .header("Authorization", format!("PVEAPIToken={}={}", fake::TOKEN_ID, fake::TOKEN_SECRET))
            .form(&form)
            .send()
    };
    let reason = |r: &reqwest::Response| {
        r.extensions().get::<hyper::ext::ReasonPhrase>().map(|p| String::from_utf8_lossy(p.as_bytes()).into_owned())
    };
    let r = clone(vec![("newid", "100"), ("target", "pve2"), ("full", "1")]).await.unwrap();
    assert_eq!(r.status(), 500);
    assert_eq!(reason(&r).as_deref(), Some("can't clone VM to node 'pve2' (VM uses local storage)"));
    let r = clone(vec![("newid", "100"), ("target", "pve2"), ("storage", "local-lvm")]).await.unwrap();
    assert_eq!(reason(&r).as_deref(), Some("can't clone to non-shared storage 'local-lvm'"));
    let r = clone(vec![("newid", "100"), ("storage", "local")]).await.unwrap();
    assert_eq!(r.status(), 400);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_eq!(body["errors"]["storage"], "storage 'local' does not support vm images");
    // On its own node it works.
    let r = clone(vec![("newid", "100"), ("full", "1")]).await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(t.fake.state().vms[&100].node, "pve1");
    t.fake.assert_clean();
}

// PVE before libpve-http-server-perl 5.2 writes errors only in the HTTP status line.

#[tokio::test]
async fn errors_only_in_the_status_line_are_understood_as_well_as_errors_in_the_body() {
    for server in [HttpServer::Legacy, HttpServer::Modern] {
        let t = Setup::new().await;
        t.fake.set_http_server(server);
        let d = t.driver(&t.toml("", ""));
        // The VMID race: "unable to create VM 100: config file already exists".
        t.fake.state().faults.steal_next_id = 1;
        assert_eq!(d.create("workers", "prod-workers-race1").await.unwrap().id, "101", "{server:?}");
        // A failed start: the stop of the cleanup is answered "VM 102 not running", and the
        // VM is destroyed all the same.
        t.fake.state().faults.fail_next_task.insert("qmstart".into(), "start failed: not enough memory".into());
        let e = d.create("workers", "prod-workers-fail1").await.unwrap_err();
        assert!(matches!(e, Error::OutOfResources(_)), "{server:?}: {e}");
        assert!(!t.fake.state().vms.contains_key(&102), "{server:?}: the failed VM was destroyed");
        // A destroy answered "does not exist": the VM is gone, the delete is done.
        t.fake.inject(
            "DELETE",
            "qemu/101",
            1,
            FaultAction::Fail {
                status: 500,
                message: "Configuration file 'nodes/pve2/qemu-server/101.conf' does not exist".into(),
            },
        );
        let m = MachineRef { group: "workers".into(), name: "prod-workers-race1".into(), id: "101".into() };
        let e = d.delete(&m).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{server:?}: {e}");
        // Out of resources, said synchronously.
        t.fake.inject(
            "POST",
            "/clone",
            1,
            FaultAction::Fail { status: 500, message: "clone failed: not enough free space in storage 'ceph'".into() },
        );
        let e = d.create("workers", "prod-workers-oor01").await.unwrap_err();
        assert!(matches!(&e, Error::OutOfResources(m) if m.contains("not enough free space")), "{server:?}: {e}");
        t.fake.assert_clean();
    }
}

// The plain-http guard parses the URL (it was a prefix match).

#[test]
fn plain_http_is_refused_unless_the_host_really_is_loopback_or_the_user_opts_in() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("token"), fake::TOKEN_SECRET).unwrap();
    let problems = |url: &str, extra: &str| {
        let text = format!(
            "cluster_name = \"prod\"\n[clouds.pve]\ndriver = \"proxmox\"\nurl = \"{url}\"\n{extra}\n\
             token_id = \"{}\"\ntoken_secret = {{ file = \"{}\" }}\n\
             [groups.workers]\ncloud = \"pve\"\nmax_size = 1\n[groups.workers.machine]\ntemplate = 9000\n",
            fake::TOKEN_ID,
            dir.path().join("token").display()
        );
        match flotilla::build_drivers(&support::config(&text)) {
            Ok(_) => Vec::new(),
            Err(p) => p.items.into_iter().map(|i| format!("{}: {}", i.path, i.message)).collect::<Vec<_>>(),
        }
    };
    for url in ["http://127.0.0.1.example.com:8006", "http://localhost.example.com:8006", "http://pve.example:8006"] {
        let p = problems(url, "");
        assert!(p.len() == 1 && p[0].starts_with("clouds.pve.url: plain http://"), "{url}: {p:?}");
        assert!(p[0].contains("allow_plain_http = true"), "{p:?}");
    }
    for url in ["http://127.0.0.1:8006", "http://localhost:8006", "http://[::1]:8006", "https://pve.example:8006"] {
        assert_eq!(problems(url, ""), Vec::<String>::new(), "{url}");
    }
    assert_eq!(problems("http://pve.example:8006", "allow_plain_http = true"), Vec::<String>::new());
    let p = problems("https://root:secret@pve.example:8006", "");
    assert!(p.len() == 1 && !p[0].contains("secret"), "{p:?}");
}

#[tokio::test]
async fn check_config_probe_names_the_group_whose_clones_have_nowhere_to_go() {
    let t = Setup::new().await;
    t.fake.state().move_volumes(9000, "local-lvm");
    let config = support::config(&t.toml("", "nodes = [\"pve2\"]\n"));
    let drivers = flotilla::build_drivers(&config).unwrap();
    let problems = flotilla::probe(&config, &drivers).await;
    assert_eq!(problems.items.len(), 1, "{problems}");
    assert_eq!(problems.items[0].path, "clouds.pve");
    assert!(problems.items[0].message.contains("group workers: template 9000 is on pve1"), "{problems}");
    let config = support::config(&t.toml("", ""));
    let drivers = flotilla::build_drivers(&config).unwrap();
    assert!(flotilla::probe(&config, &drivers).await.is_empty());
    t.fake.assert_clean();
}
