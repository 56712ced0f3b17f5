//! The Slicer driver against a fake Slicer REST API that checks every request: directly through
//! the driver trait, and end to end over loopback gRPC as cluster-autoscaler drives it.
#[path = "fakes/slicer/mod.rs"]
mod fake;
mod support;

use std::{path::Path, time::Duration};

use fake::Fake;
use flotilla::driver::{Error, ErrorClass, MachineRef, MachineState, SharedDriver};
use flotilla::proto::externalgrpc::instance_status::InstanceState;

const CLUSTER: &str = "homelab";
const K3S_TOKEN: &str = "K10c0ffee0123456789abcdef::server:5f4dcc3b5aa765d61d8327deb882cf99";
const LIMIT: Duration = Duration::from_secs(20);
const TAG_CLUSTER: &str = "flotilla-cluster=homelab";

struct Setup {
    fake: Fake,
    dir: tempfile::TempDir,
}

impl Setup {
    async fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("slicer-token"), format!("{}\n", fake::TOKEN)).unwrap();
        std::fs::write(dir.path().join("k3s-token"), format!("{K3S_TOKEN}\n")).unwrap();
        Setup { fake: Fake::start().await, dir }
    }

    fn path(&self, name: &str) -> String {
        self.dir.path().join(name).display().to_string()
    }

    /// Cloud `slicer` on the fake; group `agents` on host group `agents` and group `pi` on host
    /// group `arm`. `cloud`, `agents` and `pi` add keys to those tables.
    fn toml(&self, cloud: &str, agents: &str, pi: &str) -> String {
        format!(
            "cluster_name = \"{CLUSTER}\"\n\
             [clouds.slicer]\ndriver = \"slicer\"\nurl = \"{url}\"\ntoken = {{ file = \"{token}\" }}\n\
             request_timeout = \"2s\"\nk3s_url = \"https://192.168.137.2:6443\"\n\
             k3s_token = {{ file = \"{k3s}\" }}\n{cloud}\n\
             [groups.agents]\ncloud = \"slicer\"\nmax_size = 10\n\
             [groups.agents.template]\nlabels = {{ \"slicer/hostgroup\" = \"agents\" }}\n\
             [groups.agents.machine]\n{agents}\n\
             [groups.pi]\ncloud = \"slicer\"\nmax_size = 3\n\
             [groups.pi.machine]\nhost_group = \"arm\"\n{pi}\n",
            url = self.fake.url(),
            token = self.path("slicer-token"),
            k3s = self.path("k3s-token"),
        )
    }

    fn driver(&self, text: &str) -> SharedDriver {
        let config = support::config(text);
        flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0)
    }

    fn plain(&self) -> SharedDriver {
        self.driver(&self.toml("", "", ""))
    }
}

fn ours(group: &str, name: &str) -> Vec<String> {
    vec![TAG_CLUSTER.to_owned(), format!("flotilla-group={group}"), format!("flotilla-name={name}")]
}

fn tags(v: &[String]) -> Vec<&str> {
    v.iter().map(String::as_str).collect()
}

fn machine(group: &str, name: &str, id: &str) -> MachineRef {
    MachineRef { group: group.into(), name: name.into(), id: id.into() }
}

#[tokio::test]
async fn a_create_stores_the_token_once_and_launches_a_tagged_vm_whose_userdata_never_holds_it() {
    let t = Setup::new().await;
    let d = t.plain();
    let m = d.create("agents", "homelab-agents-aaaaa").await.unwrap();
    // agents-1 is the host group's own start-up VM: Slicer numbers ours from 2.
    assert_eq!(
        (m.id.as_str(), m.name.as_str(), &m.state),
        ("agents-2", "homelab-agents-aaaaa", &MachineState::Running)
    );
    // The OpenAPI allows 201 as well as 200 for a create.
    t.fake.state().faults.create_status = 201;
    let m2 = d.create("agents", "homelab-agents-bbbbb").await.unwrap();
    assert_eq!(m2.id, "agents-3");

    let s = t.fake.state();
    assert_eq!(
        s.call_lines(),
        ["POST /secrets", "POST /hostgroup/agents/nodes", "POST /hostgroup/agents/nodes"],
        "the secret is stored once, before the first VM"
    );
    let secret = &s.secrets["flotilla-homelab-k3s-token"];
    assert_eq!(secret.data, K3S_TOKEN.as_bytes());
    assert_eq!(secret.permissions, "0600");
    let vm = &s.vms["agents-2"];
    assert_eq!(tags(&vm.tags), tags(&ours("agents", "homelab-agents-aaaaa")));
    assert_eq!(vm.secrets, ["flotilla-homelab-k3s-token"]);
    assert!(vm.body.get("cpus").is_none() && vm.body.get("ram_bytes").is_none(), "the host group's size by default");
    assert!(vm.userdata.starts_with("#!/bin/bash\n"));
    assert!(!vm.userdata.contains(K3S_TOKEN) && !vm.userdata.contains("K10c0ffee"), "{}", vm.userdata);
    assert!(vm.userdata.contains("/run/slicer/secrets/flotilla-homelab-k3s-token"));
    assert!(s.requests.iter().all(|r| r.authorized), "bearer token on every call");
    assert!(s.requests.iter().all(|r| r.user_agent.as_deref().is_some_and(|u| u.starts_with("flotilla/"))));
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn the_machine_keys_reach_the_create_call() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml(
        "token_secret = \"k3s-join\"\n",
        "cpus = 1\nram = \"1536Mi\"\npersistent = true\nssh_keys = [\"ssh-ed25519 AAAAC3 ops@example\"]\n\
         import_user = \"ops\"\ntags = [\"team=infra\"]\nk3s_args = [\"--snapshotter=native\"]\n",
        "",
    ));
    d.create("agents", "homelab-agents-aaaaa").await.unwrap();
    let vm = t.fake.state().vms["agents-2"].clone();
    let b = &vm.body;
    assert_eq!((b["cpus"].as_u64(), b["ram_bytes"].as_u64()), (Some(1), Some(1536 << 20)));
    assert_eq!(b["persistent"].as_bool(), Some(true));
    assert_eq!(b["ssh_keys"][0], "ssh-ed25519 AAAAC3 ops@example");
    assert_eq!(b["import_user"], "ops");
    assert_eq!(b["secrets"][0], "k3s-join");
    let mut expected = ours("agents", "homelab-agents-aaaaa");
    expected.push("team=infra".into());
    assert_eq!(vm.tags, expected);
    assert!(vm.userdata.contains("TOKEN_FILE='/run/slicer/secrets/k3s-join'"));
    assert!(vm.userdata.contains("  '--snapshotter=native'"), "{}", vm.userdata);
    let (cpus, ram) = (vm.cpus, vm.ram_bytes);
    assert_eq!((cpus, ram), (1, 1536 << 20));
    t.fake.assert_clean();
}

#[tokio::test]
async fn an_existing_secret_is_kept_and_made_to_hold_the_configured_token() {
    let t = Setup::new().await;
    t.fake.state().secrets.insert(
        "flotilla-homelab-k3s-token".into(),
        fake::StoredSecret {
            name: "flotilla-homelab-k3s-token".into(),
            data: b"an-old-token".to_vec(),
            permissions: "0600".into(),
            uid: 0,
            gid: 0,
        },
    );
    t.plain().create("agents", "homelab-agents-aaaaa").await.unwrap();
    let s = t.fake.state();
    assert_eq!(
        s.call_lines(),
        ["POST /secrets", "PATCH /secrets/flotilla-homelab-k3s-token", "POST /hostgroup/agents/nodes"]
    );
    assert_eq!(s.secrets["flotilla-homelab-k3s-token"].data, K3S_TOKEN.as_bytes());
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn listing_is_one_call_per_host_group_and_returns_only_this_clusters_vms() {
    for old_daemon in [false, true] {
        let t = Setup::new().await;
        {
            let mut s = t.fake.state();
            s.faults.old_daemon = old_daemon;
            // agents-1: the host group's start-up VM, untagged.
            s.add_foreign_vm("agents", &tags(&ours("agents", "homelab-agents-mine1"))); // agents-2
            s.add_foreign_vm("agents", &["flotilla-cluster=other", "flotilla-group=agents", "flotilla-name=x"]); // agents-3
            s.add_foreign_vm("agents", &["user=alice"]); // agents-4
            // Ours, but for a group this configuration does not have.
            s.add_foreign_vm("agents", &[TAG_CLUSTER, "flotilla-group=gone", "flotilla-name=y"]); // agents-5
            s.add_foreign_vm("arm", &tags(&ours("pi", "homelab-pi-mine2"))); // arm-1
            // Tagged for group `pi`, but in a host group `pi` does not use.
            s.add_foreign_vm("arm", &tags(&ours("agents", "homelab-agents-wrong"))); // arm-2
        }
        let d = t.plain();
        let mut machines = d.list().await.unwrap();
        machines.sort_by(|a, b| a.id.cmp(&b.id));
        let summary: Vec<(&str, &str, &str)> =
            machines.iter().map(|m| (m.group.as_str(), m.name.as_str(), m.id.as_str())).collect();
        assert_eq!(summary, [("agents", "homelab-agents-mine1", "agents-2"), ("pi", "homelab-pi-mine2", "arm-1")]);
        assert!(machines.iter().all(|m| m.state == MachineState::Running));
        let s = t.fake.state();
        assert_eq!(
            s.call_lines(),
            [
                format!("GET /hostgroup/agents/nodes?tag={TAG_CLUSTER}"),
                format!("GET /hostgroup/arm/nodes?tag={TAG_CLUSTER}")
            ],
            "one call per host group (old daemon: {old_daemon})"
        );
        drop(s);
        t.fake.assert_clean();
    }
}

#[tokio::test]
async fn delete_is_idempotent_and_never_touches_a_vm_that_is_not_tagged_as_that_machine() {
    let t = Setup::new().await;
    let d = t.plain();
    let m = d.create("agents", "homelab-agents-aaaaa").await.unwrap();
    let foreign = t.fake.state().add_foreign_vm("agents", &["user=alice"]);
    let other = t.fake.state().add_foreign_vm("agents", &tags(&ours("agents", "homelab-agents-other")));

    d.delete(&MachineRef::from(&m)).await.unwrap();
    assert!(!t.fake.state().vms.contains_key("agents-2"));
    assert!(matches!(d.delete(&MachineRef::from(&m)).await, Err(Error::NotFound(_))), "already gone is done");
    // The start-up VM, a stranger's VM, and a hostname now used by another of our machines.
    for (id, name) in
        [("agents-1", "homelab-agents-ccccc"), (foreign.as_str(), "x"), (other.as_str(), "homelab-agents-zzzzz")]
    {
        let e = d.delete(&machine("agents", name, id)).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{id}: {e}");
    }
    let s = t.fake.state();
    let deletes: Vec<String> = s.call_lines().into_iter().filter(|l| l.starts_with("DELETE")).collect();
    assert_eq!(deletes, ["DELETE /hostgroup/agents/nodes/agents-2"], "only the tagged VM was ever deleted");
    assert!(s.vms.contains_key("agents-1") && s.vms.contains_key(&foreign) && s.vms.contains_key(&other));
    drop(s);
    t.fake.assert_clean();
}

// === marks: an accepted delete outlives the process ===

#[tokio::test]
async fn a_marked_vm_is_tagged_listed_deleting_and_deleted_by_a_restarted_flotilla() {
    let t = Setup::new().await;
    let d = t.plain();
    let m = d.create("agents", "homelab-agents-aaaaa").await.unwrap();
    d.mark_deleting(&MachineRef::from(&m)).await.unwrap();
    {
        let s = t.fake.state();
        let patches = s.calls("PATCH", &format!("/vm/{}/tags", m.id));
        assert_eq!(patches.len(), 1);
        assert_eq!(patches[0].body.as_ref().unwrap(), &serde_json::json!({ "add": ["flotilla-deleting=true"] }));
        assert!(s.vms[&m.id].tags.iter().any(|t| t == flotilla::driver::slicer::MARK_DELETING));
    }
    let state = |machines: Vec<flotilla::driver::Machine>| machines.into_iter().find(|x| x.id == m.id).unwrap().state;
    assert_eq!(state(d.list().await.unwrap()), MachineState::Deleting);
    d.mark_deleting(&MachineRef::from(&m)).await.unwrap();
    assert_eq!(t.fake.state().calls("PATCH", &format!("/vm/{}/tags", m.id)).len(), 1, "marking again asks nothing");

    // A new process reads the mark from the daemon.
    let restarted = t.plain();
    assert_eq!(state(restarted.list().await.unwrap()), MachineState::Deleting);
    restarted.delete(&MachineRef::from(&m)).await.unwrap();
    assert!(!t.fake.state().vms.contains_key(&m.id));
    assert!(matches!(restarted.mark_deleting(&MachineRef::from(&m)).await, Err(Error::NotFound(_))));
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_vm_that_is_not_that_machine_is_never_tagged() {
    let t = Setup::new().await;
    let d = t.plain();
    let foreign = t.fake.state().add_foreign_vm("agents", &["user=alice"]);
    let other = t.fake.state().add_foreign_vm("agents", &tags(&ours("agents", "homelab-agents-other")));
    // The start-up VM, a stranger's VM, and a hostname now used by another of our machines.
    for (id, name) in
        [("agents-1", "homelab-agents-ccccc"), (foreign.as_str(), "x"), (other.as_str(), "homelab-agents-zzzzz")]
    {
        let e = d.mark_deleting(&machine("agents", name, id)).await.unwrap_err();
        assert!(matches!(e, Error::NotFound(_)), "{id}: {e}");
    }
    let patches: Vec<String> = t.fake.state().call_lines().into_iter().filter(|l| l.starts_with("PATCH")).collect();
    assert!(patches.is_empty(), "{patches:?}");
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_daemon_that_cannot_change_tags_is_asked_once_and_deletes_go_on_unmarked() {
    let t = Setup::new().await;
    t.fake.state().faults.tag_updates = false;
    let d = t.plain();
    let a = d.create("agents", "homelab-agents-aaaaa").await.unwrap();
    let b = d.create("agents", "homelab-agents-bbbbb").await.unwrap();
    d.mark_deleting(&MachineRef::from(&a)).await.expect("nothing to record on this daemon: not an error");
    d.mark_deleting(&MachineRef::from(&b)).await.unwrap();
    let patches: Vec<String> = t.fake.state().call_lines().into_iter().filter(|l| l.starts_with("PATCH /vm")).collect();
    assert_eq!(patches, [format!("PATCH /vm/{}/tags", a.id)], "asked once per process");
    assert!(d.list().await.unwrap().iter().all(|m| m.state == MachineState::Running));
    d.delete(&MachineRef::from(&a)).await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_tag_change_whose_answer_is_lost_is_repeated_safely() {
    let t = Setup::new().await;
    let d = t.plain();
    let m = d.create("agents", "homelab-agents-aaaaa").await.unwrap();
    t.fake.fault_next("PATCH", &format!("/vm/{}/tags", m.id), fake::CallFault::LoseAnswer);
    d.mark_deleting(&MachineRef::from(&m)).await.expect("the add is atomic: asked again");
    let s = t.fake.state();
    assert_eq!(s.calls("PATCH", &format!("/vm/{}/tags", m.id)).len(), 2);
    let marks = s.vms[&m.id].tags.iter().filter(|t| *t == flotilla::driver::slicer::MARK_DELETING).count();
    assert_eq!(marks, 1);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_full_host_group_is_out_of_resources_and_other_errors_keep_the_apis_words() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml("capacity_errors = [\"Maximum VMs Reached\"]\n", "", ""));
    // Room for 5 VMs, one of them the start-up VM.
    for i in 0..4 {
        d.create("agents", &format!("homelab-agents-ok{i:03}")).await.unwrap();
    }
    let e = d.create("agents", "homelab-agents-full1").await.unwrap_err();
    assert!(matches!(e, Error::OutOfResources(ref m) if m.contains("no free addresses")), "{e}");
    assert_eq!(e.to_create_failure().class, ErrorClass::OutOfResources);

    // The daemon's 400 for asking more than the host group's size is a configuration error.
    let small = t.driver(&t.toml("", "", "cpus = 8\n"));
    let e = small.create("pi", "homelab-pi-big01").await.unwrap_err();
    assert!(matches!(e, Error::InvalidRequest(ref m) if m.contains("exceeds the host group limit of 4")), "{e}");
    assert_eq!(e.to_create_failure().class, ErrorClass::Other);

    // A phrase from `capacity_errors`, whatever the status; 507 always.
    t.fake.state().faults.fail_next_create = Some((403, "trial: maximum vms reached".into()));
    assert!(matches!(d.create("pi", "homelab-pi-trial").await, Err(Error::OutOfResources(_))));
    t.fake.state().faults.fail_next_create = Some((507, "disk".into()));
    assert!(matches!(d.create("pi", "homelab-pi-disk1").await, Err(Error::OutOfResources(_))));
    t.fake.state().faults.fail_next_create = Some((500, "containerd: snapshot failed".into()));
    let e = d.create("pi", "homelab-pi-other").await.unwrap_err();
    assert!(e.to_string().contains("containerd: snapshot failed"), "{e}");
    assert_eq!(e.to_create_failure().class, ErrorClass::Other);
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_finds_its_vm_by_tag_and_never_launches_a_second() {
    let t = Setup::new().await;
    let d = t.plain();
    t.fake.state().faults.lose_next_create = true;
    let m = d.create("agents", "homelab-agents-lost1").await.unwrap();
    assert_eq!((m.id.as_str(), m.name.as_str()), ("agents-2", "homelab-agents-lost1"));
    {
        let s = t.fake.state();
        assert_eq!(s.calls("POST", "/hostgroup/agents/nodes").len(), 1, "never a second launch");
        assert_eq!(s.vms.len(), 2);
        let lookup = s.calls("GET", "/hostgroup/agents/nodes");
        assert_eq!(lookup[0].query("tag"), Some("flotilla-name=homelab-agents-lost1"));
    }

    // An answer that times out: the daemon launched the VM all the same.
    t.fake.state().faults.create_delay = Duration::from_secs(5);
    let m = d.create("agents", "homelab-agents-slow1").await.unwrap();
    assert_eq!(m.id, "agents-3");
    t.fake.state().faults.create_delay = Duration::ZERO;

    // A proxy error with nothing made: the create fails, and still launches nothing more.
    t.fake.state().faults.fail_next_create = Some((502, "Bad Gateway".into()));
    let e = d.create("agents", "homelab-agents-none1").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e}");
    let s = t.fake.state();
    assert_eq!(s.calls("POST", "/hostgroup/agents/nodes").len(), 3);
    assert_eq!(s.vms.len(), 3);
    drop(s);
    t.fake.assert_clean();
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized_and_missing_host_groups_are_named() {
    let t = Setup::new().await;
    std::fs::write(t.path("slicer-token"), "not-the-token").unwrap();
    t.fake.state().faults.expect_unauthorized = true;
    let d = t.plain();
    assert!(matches!(d.list().await, Err(Error::Unauthorized(_))));
    assert!(matches!(d.check().await, Err(Error::Unauthorized(_))));
    assert_eq!(t.fake.state().rejected, 2, "a 401 is never retried");

    std::fs::write(t.path("slicer-token"), fake::TOKEN).unwrap();
    let d = t.driver(&t.toml("", "host_group = \"agent\"\n", ""));
    let e = d.check().await.unwrap_err().to_string();
    assert!(e.contains("no host group \"agent\"") && e.contains("it has: agents, arm"), "{e}");
    t.plain().check().await.unwrap();
}

#[test]
fn configuration_problems_are_reported_with_their_key_paths() {
    let dir = tempfile::tempdir().unwrap();
    let text = r#"cluster_name = "homelab"
[clouds.slicer]
driver = "slicer"
url = "http://192.168.138.1:8081"
k3s_url = "http://192.168.137.2:6443"
token_secret = ".hidden"
capacity_errors = [""]
[groups.agents]
cloud = "slicer"
max_size = 3
[groups.agents.template]
labels = { "node-role.kubernetes.io/worker" = "true" }
[groups.agents.machine]
host_group = "Agents_1"
tags = ["flotilla-name=x", "name=web"]
k3s_args = ["--with-node-id"]
userdata = "{{ k3s_tokn }}"
userdata_template = "x.j2"
template_data = { name = "clash" }
cpus = 0
"#;
    let config = flotilla::config::Config::parse(text, "test.toml", dir.path()).unwrap();
    let problems = flotilla::build_drivers(&config).unwrap_err();
    let shown = problems.to_string();
    let paths: Vec<&str> = problems.items.iter().map(|i| i.path.as_str()).collect();
    for expected in [
        "clouds.slicer.url",
        "clouds.slicer.k3s_url",
        "clouds.slicer.k3s_token",
        "clouds.slicer.token_secret",
        "clouds.slicer.capacity_errors",
        "groups.agents.machine.host_group",
        "groups.agents.machine.tags",
        "groups.agents.machine.k3s_args",
        "groups.agents.machine",
        "groups.agents.machine.template_data.name",
        "groups.agents.machine.cpus",
    ] {
        assert!(paths.contains(&expected), "{expected} missing from:\n{shown}");
    }
    assert!(shown.contains("allow_plain_http"), "{shown}");
    assert!(!shown.contains("NodeRestriction"), "a template of the user's own decides what to do with labels");

    // allow_plain_http opts in; a bad inline template is caught by the trial render.
    let text = text
        .replace("url = \"http://192.168.138.1:8081\"", "url = \"http://192.168.138.1:8081\"\nallow_plain_http = true")
        .replace("userdata_template = \"x.j2\"\n", "");
    let config = flotilla::config::Config::parse(&text, "test.toml", dir.path()).unwrap();
    let shown = flotilla::build_drivers(&config).unwrap_err().to_string();
    assert!(!shown.contains("clouds.slicer.url"), "{shown}");
    assert!(shown.contains("unknown variables: k3s_tokn"), "{shown}");

    // The default script gives the template's labels to the kubelet, which refuses this one.
    let text = text.replace("userdata = \"{{ k3s_tokn }}\"\n", "");
    let config = flotilla::config::Config::parse(&text, "test.toml", dir.path()).unwrap();
    let problems = flotilla::build_drivers(&config).unwrap_err();
    let label = problems
        .items
        .iter()
        .find(|i| i.path == "groups.agents.template.labels.node-role.kubernetes.io/worker")
        .unwrap_or_else(|| panic!("{problems}"));
    assert!(label.message.contains("NodeRestriction"), "{}", label.message);
}

/// Runs a rendered userdata script with stand-ins for `hostname`, `curl` (whose "install
/// script" records its arguments and environment) and `sleep`; returns (args, env lines).
fn run_userdata(script: &str, hostname: &str) -> (Vec<String>, Vec<String>) {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    let record = dir.path().join("record");
    std::fs::create_dir(&record).unwrap();
    let stub = |name: &str, body: &str| {
        let p = bin.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    };
    stub("hostname", &format!("echo {hostname}"));
    stub("sleep", "exit 0");
    let installer =
        r#"printf '%s\n' "$@" > "$RECORD/args"; env | grep -E '^(K3S|INSTALL_K3S)_' | sort > "$RECORD/env""#;
    stub(
        "curl",
        &format!(
            "out=''\nwhile [ $# -gt 0 ]; do [ \"$1\" = -o ] && out=\"$2\"; shift; done\n\
             cat > \"$out\" <<'EOF'\n{installer}\nEOF"
        ),
    );
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let out = std::process::Command::new("bash")
        .arg("-c")
        .arg(script)
        .env("PATH", path)
        .env("RECORD", &record)
        .output()
        .expect("bash runs");
    assert!(out.status.success(), "userdata failed: {}", String::from_utf8_lossy(&out.stderr));
    let read = |f: &str| std::fs::read_to_string(record.join(f)).unwrap().lines().map(str::to_owned).collect();
    (read("args"), read("env"))
}

/// The `spec.providerID` a k3s agent started with `args` ends up with: the kubelet's
/// `provider-id` if given, else what k3s's embedded cloud controller sets, `k3s://<node name>`.
fn k3s_provider_id(args: &[String], hostname: &str) -> String {
    assert!(!args.iter().any(|a| a.starts_with("--with-node-id")), "{args:?}");
    let node_name = args
        .iter()
        .position(|a| a == "--node-name")
        .map(|i| args[i + 1].clone())
        .unwrap_or_else(|| hostname.to_lowercase());
    args.iter()
        .find_map(|a| a.strip_prefix("--kubelet-arg=provider-id=").map(str::to_owned))
        .unwrap_or(format!("k3s://{node_name}"))
}

#[tokio::test]
async fn the_rendered_userdata_and_the_reported_provider_id_agree() {
    for format in [None, Some("slicer://{region}/{id}")] {
        let t = Setup::new().await;
        let mut text = t.toml("", "k3s_version = \"v1.33.4+k3s1\"\n", "");
        if let Some(f) = format {
            text = text.replace(
                "[groups.agents]\ncloud = \"slicer\"\n",
                &format!("[groups.agents]\ncloud = \"slicer\"\nprovider_id = \"{f}\"\n"),
            );
        }
        let (server, mut c) = support::start(&text).await;
        support::increase(&mut c, "agents", 1).await.unwrap();
        let ids = support::wait_running(&c, "agents", 1, LIMIT).await;
        let (hostname, script) = {
            let s = t.fake.state();
            let vm = s.tagged("agents", &[TAG_CLUSTER]).remove(0);
            (vm.hostname, vm.userdata)
        };
        let (args, env) = run_userdata(&script, &hostname);
        assert_eq!(args[0], "agent");
        assert_eq!(args[args.iter().position(|a| a == "--node-name").unwrap() + 1], hostname, "node name = hostname");
        assert_eq!(ids, [k3s_provider_id(&args, &hostname)], "the node will carry exactly the id Flotilla reports");
        let expected = match format {
            None => format!("k3s://{hostname}"),
            Some(_) => format!("slicer://slicer/{hostname}"),
        };
        assert_eq!(ids[0], expected);
        assert!(args.contains(&"slicer/hostgroup=agents".to_owned()), "the template's labels: {args:?}");
        assert!(args.contains(&"node.kubernetes.io/instance-type=agents".to_owned()), "{args:?}");
        assert_eq!(
            env,
            [
                "INSTALL_K3S_VERSION=v1.33.4+k3s1",
                "K3S_TOKEN_FILE=/run/slicer/secrets/flotilla-homelab-k3s-token",
                "K3S_URL=https://192.168.137.2:6443",
            ]
        );
        server.stop().await.unwrap();
        t.fake.assert_clean();
    }
}

#[tokio::test]
async fn the_template_node_comes_from_the_host_group_and_scales_up_from_zero() {
    use flotilla::proto::{externalgrpc as pb, k8s};
    use prost::Message;

    let t = Setup::new().await;
    t.fake.state().host_groups[1].gpu_count = 1;
    let (server, mut c) = support::start(&t.toml("", "cpus = 1\nram = \"1Gi\"\n", "")).await;
    let template = |id: &str| {
        let mut c = c.clone();
        let id = id.to_owned();
        async move {
            let r = c
                .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id })
                .await
                .unwrap()
                .into_inner();
            k8s::Node::decode(r.node_bytes.as_slice()).unwrap()
        }
    };
    let pi = template("pi").await;
    let status = pi.status.unwrap();
    let capacity = |k: &str| status.capacity.get(k).map(|q| q.string.clone());
    assert_eq!(capacity("cpu").as_deref(), Some("4"));
    assert_eq!(capacity("memory").as_deref(), Some("8Gi"));
    assert_eq!(capacity("nvidia.com/gpu").as_deref(), Some("1"));
    let labels = pi.metadata.unwrap().labels;
    assert_eq!(labels["kubernetes.io/arch"], "arm64", "aarch64 host group");
    assert_eq!(labels["node.kubernetes.io/instance-type"], "arm");
    assert_eq!(status.node_info.unwrap().architecture, "arm64");

    let agents = template("agents").await;
    let status = agents.status.unwrap();
    assert_eq!(status.capacity["cpu"].string, "1", "a smaller VM than the host group's default");
    assert_eq!(status.capacity["memory"].string, "1Gi");
    let labels = agents.metadata.unwrap().labels;
    assert_eq!(labels["kubernetes.io/arch"], "amd64");
    assert_eq!(labels["slicer/hostgroup"], "agents");

    // From zero: the group has no VM; CA asks for one.
    assert_eq!(support::target_size(&mut c, "pi").await, 0);
    support::increase(&mut c, "pi", 1).await.unwrap();
    let ids = support::wait_running(&c, "pi", 1, LIMIT).await;
    assert_eq!(ids, ["k3s://arm-1"]);
    assert_eq!(t.fake.state().calls("GET", "/hostgroup").len(), 2, "one host group read per template");
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn cluster_autoscaler_scales_a_group_up_and_down_through_grpc() {
    let t = Setup::new().await;
    t.fake.state().faults.delete_delay = Duration::from_millis(300);
    let (server, mut c) = support::start(&t.toml("", "", "")).await;

    support::increase(&mut c, "agents", 2).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 2);
    let ids = support::wait_running(&c, "agents", 2, LIMIT).await;
    assert_eq!(ids, ["k3s://agents-2", "k3s://agents-3"], "provider ids are k3s://<hostname>");
    assert_eq!(t.fake.state().tagged("agents", &[TAG_CLUSTER]).len(), 2);

    support::delete(&mut c, "agents", &["k3s://agents-2"]).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 1);
    // A listing while the delete runs still sees the VM: it stays Deleting, never Running again.
    support::eventually(LIMIT, "the delete to be under way", || {
        let fake_has = t.fake.state().vms.get("agents-2").is_some_and(|v| v.deleting);
        async move { fake_has.then_some(()) }
    })
    .await;
    support::refresh(&mut c).await.unwrap();
    let during = support::nodes(&mut c, "agents").await;
    assert!(during.contains(&("k3s://agents-2".into(), InstanceState::InstanceDeleting, None)), "{during:?}");
    assert_eq!(support::target_size(&mut c, "agents").await, 1);

    let left = support::wait_running(&c, "agents", 1, LIMIT).await;
    assert_eq!(left, ["k3s://agents-3"]);
    assert!(!t.fake.state().vms.contains_key("agents-2"));
    // Repeating the delete is a no-op.
    support::delete(&mut c, "agents", &["k3s://agents-2"]).await.unwrap();
    assert!(t.fake.state().vms.contains_key("agents-1"), "the host group's start-up VM is never touched");
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_listing_during_a_create_neither_duplicates_nor_drops_the_machine() {
    let t = Setup::new().await;
    t.fake.state().faults.create_delay = Duration::from_millis(800);
    let (server, mut c) = support::start(&t.toml("", "", "")).await;
    support::increase(&mut c, "agents", 1).await.unwrap();
    support::eventually(LIMIT, "the VM to exist", || {
        let n = t.fake.state().tagged("agents", &[TAG_CLUSTER]).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    support::refresh(&mut c).await.unwrap();
    let during = support::nodes(&mut c, "agents").await;
    assert_eq!(during.len(), 1, "{during:?}");
    assert_eq!(support::target_size(&mut c, "agents").await, 1);
    let ids = support::wait_running(&c, "agents", 1, LIMIT).await;
    assert_eq!(ids, ["k3s://agents-2"]);
    assert_eq!(t.fake.state().calls("POST", "/hostgroup/agents/nodes").len(), 1);
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_restart_mid_create_finds_the_vm_by_its_tags_and_neither_leaks_nor_duplicates_it() {
    let t = Setup::new().await;
    t.fake.state().faults.create_delay = Duration::from_secs(30);
    let text = t.toml("", "", "")
        + "[server]\ngrpc_listen = \"127.0.0.1:0\"\nhttp_listen = \"127.0.0.1:0\"\nshutdown_grace = \"0s\"\n";
    let (server, mut c) = support::start(&text).await;
    support::increase(&mut c, "agents", 1).await.unwrap();
    support::eventually(LIMIT, "the daemon to have launched the VM", || {
        let n = t.fake.state().tagged("agents", &[TAG_CLUSTER]).len();
        async move { (n == 1).then_some(()) }
    })
    .await;
    // Flotilla goes away before the daemon answers.
    server.stop().await.unwrap();
    t.fake.state().faults.create_delay = Duration::ZERO;

    let (server, mut c) = support::start(&text).await;
    support::refresh(&mut c).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 1);
    let ids = support::wait_running(&c, "agents", 1, LIMIT).await;
    assert_eq!(ids, ["k3s://agents-2"], "found again by its tags, under the name Flotilla chose");
    // It never joined (there is no cluster here): CA deletes it after its provision timeout.
    support::delete(&mut c, "agents", &["k3s://agents-2"]).await.unwrap();
    support::eventually(LIMIT, "the VM to be deleted", || {
        let n = t.fake.state().tagged("agents", &[TAG_CLUSTER]).len();
        async move { (n == 0).then_some(()) }
    })
    .await;
    assert_eq!(t.fake.state().calls("POST", "/hostgroup/agents/nodes").len(), 1, "never launched twice");
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn target_sizes_come_from_the_listing_not_a_counter() {
    let t = Setup::new().await;
    let (server, mut c) = support::start(&t.toml("", "", "")).await;
    support::refresh(&mut c).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 0, "the start-up VM is not ours");
    // Made by another Flotilla of this cluster, or before a restart.
    for n in ["homelab-agents-prev1", "homelab-agents-prev2"] {
        t.fake.state().add_foreign_vm("agents", &tags(&ours("agents", n)));
    }
    support::refresh(&mut c).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 2);
    // Someone deletes one behind Flotilla's back (`slicer vm delete`).
    t.fake.state().vms.remove("agents-2");
    support::refresh(&mut c).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 1);
    assert_eq!(support::ids_in(&mut c, "agents", InstanceState::InstanceRunning).await, ["k3s://agents-3"]);
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_failed_delete_keeps_the_instance_deleting_and_is_retried_until_the_vm_is_gone() {
    let t = Setup::new().await;
    let (server, mut c) = support::start(&t.toml("", "", "")).await;
    support::increase(&mut c, "agents", 1).await.unwrap();
    let ids = support::wait_running(&c, "agents", 1, LIMIT).await;
    // Fails for longer than the HTTP layer's own retries.
    t.fake.state().faults.fail_deletes = 3;
    support::delete(&mut c, "agents", &[ids[0].as_str()]).await.unwrap();
    support::eventually(LIMIT, "the delete to fail", || {
        let n = t.fake.state().calls("DELETE", "/hostgroup/agents/nodes/agents-2").len();
        async move { (n == 3).then_some(()) }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(t.fake.state().vms.contains_key("agents-2"), "the VM is still running");
    let nodes = support::nodes(&mut c, "agents").await;
    assert_eq!(nodes, [(ids[0].clone(), InstanceState::InstanceDeleting, None)], "still Deleting, not forgotten");
    // The next Refresh retries it.
    support::eventually(LIMIT, "the retried delete to finish", || {
        let mut c = c.clone();
        let t = &t;
        async move {
            let _ = support::refresh(&mut c).await;
            (!t.fake.state().vms.contains_key("agents-2") && support::nodes(&mut c, "agents").await.is_empty())
                .then_some(())
        }
    })
    .await;
    assert_eq!(support::target_size(&mut c, "agents").await, 0);
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn the_example_configuration_checks_and_launches_an_agent() {
    let t = Setup::new().await;
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/slicer.toml"))
        .unwrap()
        .replace("http://192.168.138.1:8081", &t.fake.url())
        .replace("http://192.168.139.1:8082", &t.fake.url())
        .replace("\"slicer-token-1.txt\"", &format!("\"{}\"", t.path("slicer-token")))
        .replace("\"slicer-token-2.txt\"", &format!("\"{}\"", t.path("slicer-token")))
        .replace("\"k3s-join-token.txt\"", &format!("\"{}\"", t.path("k3s-token")))
        .replace("[groups.k3s-agents-2.machine]\n", "[groups.k3s-agents-2.machine]\nhost_group = \"arm\"\n")
        .replace("[groups.k3s-agents-1.machine]\n", "[groups.k3s-agents-1.machine]\nhost_group = \"agents\"\n");
    let config = support::config(&text);
    let drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}"));
    assert_eq!(drivers.len(), 2);
    drivers[0].check().await.unwrap();
    let m = drivers[0].create("k3s-agents-1", "k3s-slicer-k3s-agents-1-abcde").await.unwrap();
    assert_eq!(m.id, "agents-2");
    let vm = t.fake.state().vms["agents-2"].clone();
    assert!(vm.userdata.contains("INSTALL_K3S_VERSION='v1.33.4+k3s1'"), "{}", vm.userdata);
    assert!(vm.userdata.contains("--node-label 'k3sup.dev/node-type=agent'"), "{}", vm.userdata);
    assert_eq!(vm.secrets, ["flotilla-k3s-slicer-k3s-token"]);
    t.fake.assert_clean();
}

#[test]
fn the_default_provider_id_is_k3s_of_the_hostname() {
    assert_eq!(flotilla::driver::default_provider_id("slicer"), "k3s://{id}");
    let format = flotilla::provider_id::ProviderIdFormat::parse("k3s://{id}").unwrap();
    assert!(format.needs_cloud_id(), "reported as pending until the daemon names the VM");
}

#[path = "fakes/kube/mod.rs"]
mod kube_fake;

/// A VM of group `agents` that a scale-down stopped earlier (or another Flotilla did).
fn add_stopped(t: &Setup, name: &str) -> String {
    let mut s = t.fake.state();
    let hostname = s.add_foreign_vm("agents", &tags(&ours("agents", name)));
    let vm = s.vms.get_mut(&hostname).unwrap();
    vm.persistent = true;
    vm.status = "Stopped".into();
    hostname
}

#[tokio::test]
async fn a_warm_pool_stops_persistent_vms_and_relaunches_them_for_the_next_scale_up() {
    let t = Setup::new().await;
    let kube = kube_fake::Fake::start("t").await;
    let pooled = add_stopped(&t, "agents-pool-a");
    let text = t.toml("node_cleanup = true\n", "persistent = true\n", "").replace(
        "[groups.agents]\ncloud = \"slicer\"\nmax_size = 10\n",
        "[groups.agents]\ncloud = \"slicer\"\nmax_size = 10\nwarm_pool = 2\n",
    ) + &format!("[kubernetes]\nkubeconfig = \"{}\"\n", kube.kubeconfig(t.dir.path(), "t").display());
    let (server, mut c) = support::start(&text).await;
    support::refresh(&mut c).await.unwrap();
    assert_eq!(support::target_size(&mut c, "agents").await, 0, "a stopped VM of a pool group is not counted");
    assert!(support::nodes(&mut c, "agents").await.is_empty(), "nor reported");

    // Scale-up of 2: the stopped VM is relaunched under its hostname, one VM is launched.
    support::increase(&mut c, "agents", 2).await.unwrap();
    let ids = support::wait_running(&c, "agents", 2, LIMIT).await;
    assert!(ids.contains(&format!("k3s://{pooled}")), "{ids:?}");
    {
        let s = t.fake.state();
        assert_eq!(s.calls("POST", &format!("/vm/{pooled}/relaunch")).len(), 1);
        assert_eq!(s.calls("POST", "/hostgroup/agents/nodes").len(), 1, "one launch");
        assert_eq!(s.vms[&pooled].status, "Running");
    }

    // Scale-down of both: each is stopped with the SDK's graceful stop and kept.
    t.fake.state().faults.stop_delay = Duration::from_millis(700);
    let victims: Vec<&str> = ids.iter().map(String::as_str).collect();
    support::delete(&mut c, "agents", &victims).await.unwrap();
    support::wait_running(&c, "agents", 0, LIMIT).await;
    {
        let s = t.fake.state();
        let stops: Vec<_> = s.requests.iter().filter(|r| r.path.ends_with("/shutdown")).collect();
        assert_eq!(stops.len(), 2, "{:?}", s.call_lines());
        assert!(stops.iter().all(|r| r.query("action") == Some("reboot")), "{:?}", s.call_lines());
        assert!(s.calls("DELETE", &format!("/hostgroup/agents/nodes/{pooled}")).is_empty(), "nothing deleted");
        let ours = s.tagged("agents", &[TAG_CLUSTER]);
        assert_eq!(ours.len(), 2);
        assert!(ours.iter().all(|v| v.status == "Stopped"), "{ours:?}");
    }
    assert_eq!(support::target_size(&mut c, "agents").await, 0);
    server.stop().await.unwrap();
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_relaunch_the_daemon_cannot_do_or_whose_answer_is_lost_is_handled() {
    let t = Setup::new().await;
    let text = t.toml("", "persistent = true\n", "");
    let d = t.driver(&text);
    assert!(d.can_stop());
    let hostname = add_stopped(&t, "p1");
    let m = machine("agents", "p1", &hostname);
    // A lost answer: the daemon relaunched it; the start reads the listing and is done.
    t.fake.fault_next("POST", &format!("/vm/{hostname}/relaunch"), fake::CallFault::LoseAnswer);
    let started = d.start(&m).await.unwrap();
    assert_eq!(started.state, MachineState::Running);
    assert_eq!(t.fake.state().vms[&hostname].status, "Running");
    // Starting a running VM sends nothing.
    d.start(&m).await.unwrap();
    assert_eq!(t.fake.state().calls("POST", &format!("/vm/{hostname}/relaunch")).len(), 1);

    // A daemon from before relaunch (slicervm/sdk v0.0.35): the start fails, saying why (the
    // core then deletes the VM and launches a new one).
    let old = add_stopped(&t, "p2");
    t.fake.state().faults.relaunch = false;
    let e = d.start(&machine("agents", "p2", &old)).await.unwrap_err();
    assert!(matches!(&e, Error::Other(m) if m.contains("cannot relaunch")), "{e:?}");
    assert_eq!(t.fake.state().vms[&old].status, "Stopped");
    // A VM that is gone is NotFound, for stop and start alike.
    let gone = machine("agents", "p3", "agents-99");
    assert!(matches!(d.stop(&gone).await, Err(Error::NotFound(_))));
    assert!(matches!(d.start(&gone).await, Err(Error::NotFound(_))));
    t.fake.assert_clean();
}

#[tokio::test]
async fn a_stop_of_an_ephemeral_vm_that_vanished_is_not_found_and_a_repeated_stop_is_done() {
    let t = Setup::new().await;
    let d = t.driver(&t.toml("", "persistent = true\n", ""));
    let hostname = add_stopped(&t, "p1");
    let m = machine("agents", "p1", &hostname);
    d.stop(&m).await.unwrap();
    assert!(t.fake.state().requests.iter().all(|r| !r.path.ends_with("/shutdown")), "already stopped: nothing sent");
    // An ephemeral VM (one launched before persistent was set) is gone once it stops.
    let eph = t.fake.state().add_foreign_vm("agents", &tags(&ours("agents", "e1")));
    assert!(matches!(d.stop(&machine("agents", "e1", &eph)).await, Err(Error::NotFound(_))));
    assert!(!t.fake.state().vms.contains_key(&eph));
    t.fake.assert_clean();
}

#[test]
fn a_warm_pool_needs_persistent_vms() {
    let dir = tempfile::tempdir().unwrap();
    let text = "cluster_name = \"homelab\"\n\
        [clouds.slicer]\ndriver = \"slicer\"\nurl = \"http://127.0.0.1:8081\"\nk3s_url = \"https://192.168.137.2:6443\"\n\
        k3s_token = \"K10x::server:y\"\nnode_cleanup = true\n\
        [groups.agents]\ncloud = \"slicer\"\nmax_size = 3\nwarm_pool = 1\n";
    let config = flotilla::config::Config::parse(text, "test.toml", dir.path()).unwrap();
    let problems = flotilla::build_drivers(&config).unwrap_err();
    let p = problems.items.iter().find(|i| i.path == "groups.agents.machine.persistent").expect("persistent named");
    assert!(p.message.contains("warm_pool"), "{}", p.message);
}
