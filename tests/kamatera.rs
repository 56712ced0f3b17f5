//! The Kamatera driver against a fake of the API behind cloudcli.cloudwm.com that asserts every
//! request (auth headers, keys the API reads, values it accepts): directly through the driver,
//! and end to end over gRPC as cluster-autoscaler calls it.

#[path = "fakes/kamatera/mod.rs"]
mod fake;
mod support;

use std::time::Duration;

use fake::{Fake, Kind, Lose};
use flotilla::driver::{Error, ErrorClass, Machine, MachineRef, MachineState, SharedDriver, kamatera::Kamatera};
use flotilla::proto::externalgrpc as pb;
use serde_json::json;

const LIMIT: Duration = Duration::from_secs(10);
const OURS: &[&str] = &["k8sca-prod", "k8scang-workers"];

/// A configuration for the fake: cloud `kam`, shared `defaults`, and group `workers` whose
/// `machine` table is `machine`.
fn config_text(fake: &Fake, cloud_extra: &str, machine: &str) -> String {
    format!(
        r##"cluster_name = "prod"
[state]
reconcile_interval = "1h"
refresh_timeout = "10s"
[clouds.kam]
driver = "kamatera"
api_url = "{url}"
api_client_id = "{id}"
api_secret = "{secret}"
poll_interval = "40ms"
lost_create_grace = "1s"
request_timeout = "2s"
{cloud_extra}
[clouds.kam.defaults]
datacenter = "EU"
image = "ubuntu_server_24.04_64-bit"
cpu = "2A"
ram = 4096
disks = ["size=50"]
networks = ["name=wan,ip=auto"]
ssh_key = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly ops@example"
script = "#!/bin/sh\necho {{{{ name }}}} joins {{{{ cluster }}}}/{{{{ group }}}}\n"

[groups.workers]
cloud = "kam"
max_size = 5
name_prefix = "prod-workers"

[groups.workers.template]
labels = {{ "flotilla.dev/group" = "workers" }}

[groups.workers.machine]
{machine}
"##,
        url = fake.url(),
        id = fake::CLIENT_ID,
        secret = fake::SECRET,
    )
}

fn driver_of(text: &str) -> SharedDriver {
    let config = support::config(text);
    let mut drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("drivers: {p}"));
    drivers.remove(0)
}

fn kamatera_of(text: &str) -> Kamatera {
    Kamatera::open(&support::config(text), "kam").unwrap_or_else(|p| panic!("driver: {p}"))
}

fn by_name(machines: &[Machine], name: &str) -> MachineState {
    machines.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("{name} not in {machines:?}")).state.clone()
}

fn names(machines: &[Machine]) -> Vec<String> {
    let mut n: Vec<String> = machines.iter().map(|m| format!("{}/{}", m.group, m.name)).collect();
    n.sort();
    n
}

/// Lists until `name` is in `state`, or panics.
async fn wait_state(driver: &SharedDriver, name: &str, want: fn(&MachineState) -> bool) -> MachineState {
    support::eventually(LIMIT, &format!("{name} to reach the expected state"), || {
        let driver = driver.clone();
        let name = name.to_owned();
        async move {
            let m = driver.list().await.ok()?;
            let s = m.iter().find(|m| m.name == name)?.state.clone();
            want(&s).then_some(s)
        }
    })
    .await
}

// === listing ===

#[tokio::test]
async fn one_listing_returns_only_servers_with_both_tags_and_tags_are_fetched_once() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.add_server("prod-workers-aaaaa", "on", OURS);
        s.add_server("prod-gpu-bbbbb", "on", &["k8sca-prod", "k8scang-gpu"]);
        s.add_server("cluster-tag-only", "on", &["k8sca-prod"]);
        s.add_server("group-tag-only", "on", &["k8scang-workers"]);
        s.add_server("other-cluster", "on", &["k8sca-staging", "k8scang-workers"]);
        s.add_server("hand-made", "on", &[]);
        s.add_server("prod-workers-ccccc", "on", &["k8scang-workers", "billing", "k8sca-prod"]);
    }
    let text = config_text(&fake, "", "")
        + "[groups.gpu]\ncloud = \"kam\"\nmax_size = 2\nname_prefix = \"prod-gpu\"\n[groups.gpu.machine]\ncpu = \"8D\"\n";
    let driver = driver_of(&text);
    let machines = driver.list().await.unwrap();
    assert_eq!(names(&machines), ["gpu/prod-gpu-bbbbb", "workers/prod-workers-aaaaa", "workers/prod-workers-ccccc"]);
    assert!(machines.iter().all(|m| m.state == MachineState::Running && m.id == m.name), "{machines:?}");

    {
        let s = fake.state();
        assert_eq!(s.calls("GET", "/service/servers").len(), 1);
        let lookups = s.calls("POST", "/server/tags");
        assert_eq!(lookups.len(), 7, "one tag lookup per server");
        for l in &lookups {
            let body = l.body.as_ref().unwrap().as_object().unwrap();
            assert_eq!(body.keys().collect::<Vec<_>>(), ["id"], "servers are named by id, never by a regex name");
        }
    }

    // The next Refresh: one listing, no tag lookups (foreign servers are remembered too).
    driver.list().await.unwrap();
    {
        let s = fake.state();
        assert_eq!(s.calls("GET", "/service/servers").len(), 2);
        assert_eq!(s.calls("POST", "/server/tags").len(), 7);
        assert!(s.requests.iter().all(|r| r.authorized));
    }
    fake.assert_clean();
}

#[tokio::test]
async fn filter_name_prefix_skips_other_servers_without_a_tag_lookup() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.add_server("prod-workers-aaaaa", "on", OURS);
        for i in 0..5 {
            s.add_server(&format!("web-{i}"), "on", &[]);
        }
        // Even tagged, a server outside the prefix is not looked at (as the in-tree option does).
        s.add_server("elsewhere-1", "on", OURS);
    }
    let driver = driver_of(&config_text(&fake, "filter_name_prefix = \"prod-\"", ""));
    let machines = driver.list().await.unwrap();
    assert_eq!(names(&machines), ["workers/prod-workers-aaaaa"]);
    assert_eq!(fake.state().calls("POST", "/server/tags").len(), 1);
    fake.assert_clean();
}

// === create ===

#[tokio::test]
async fn a_create_sends_every_server_setting_under_the_key_the_api_reads() {
    let fake = Fake::start().await;
    let machine = r#"
tag_group_name = "workers"
datacenter = "US-NY2"
image = "US-NY2:6000C2987c9f7b9e5b1d6b5e2a1f0002"
cpu = "4B"
ram = "8Gi"
disks = ["size=100", "id=1,size=200"]
networks = ["name=wan,ip=auto", "name=lan-12345-k8s,ip=auto"]
daily_backup = true
managed = true
billing_cycle = "monthly"
monthly_package = "t5000"
password = "Sup3rSecret!x"
tags = ["batch-nodes"]
join_url = "https://10.0.0.10:6443"
join_token = "K10::server:abc"
template_data = { k3s_version = "v1.31.4+k3s1" }
script = "curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION={{ k3s_version }} K3S_URL={{ join_url }} K3S_TOKEN={{ join_token }} sh -s - agent --node-name {{ name }}\n"
"#;
    let driver = driver_of(&config_text(&fake, "", machine));
    let m = driver.create("workers", "prod-workers-x7k2p").await.unwrap();
    assert_eq!(m.state, MachineState::Creating);
    assert_eq!((m.name.as_str(), m.id.as_str()), ("prod-workers-x7k2p", "prod-workers-x7k2p"));

    {
        let s = fake.state();
        let creates = s.calls("POST", "/service/server");
        assert_eq!(creates.len(), 1);
        assert_eq!(
            creates[0].body.as_ref().unwrap(),
            &json!({
                "name": "prod-workers-x7k2p",
                "password": "Sup3rSecret!x",
                "ssh-key": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly ops@example",
                "datacenter": "US-NY2",
                "image": "US-NY2:6000C2987c9f7b9e5b1d6b5e2a1f0002",
                "cpu": "4B",
                "ram": "8192",
                "disk": "size=100 id=1,size=200",
                "dailybackup": "yes",
                "managed": "yes",
                "network": "name=wan,ip=auto name=lan-12345-k8s,ip=auto",
                "quantity": 1,
                // The key the API reads: the in-tree provider sends `billingCycle`, which the API
                // ignores (every server hourly). The fake fails on keys the API does not read.
                "billingcycle": "monthly",
                "monthlypackage": "t5000",
                "poweronaftercreate": "yes",
                "script-file": "curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION=v1.31.4+k3s1 K3S_URL=https://10.0.0.10:6443 K3S_TOKEN=K10::server:abc sh -s - agent --node-name prod-workers-x7k2p\n",
                "userdata-file": "",
                "tag": "k8sca-prod k8scang-workers batch-nodes",
            })
        );
    }
    fake.assert_clean();
}

#[tokio::test]
async fn without_a_password_kamatera_generates_one_that_is_never_kept() {
    let fake = Fake::start().await;
    // No ssh_key either: the API is asked to generate one and answers with it.
    let text = config_text(&fake, "", "")
        .replace("ssh_key = \"ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIExampleKeyOnly ops@example\"\n", "");
    let driver = driver_of(&text);
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    let body = fake.state().calls("POST", "/service/server")[0].body.clone().unwrap();
    assert_eq!(body["password"], "__generate__");
    assert_eq!(body["ssh-key"], "");
    // The answer was {"commandIds": [...], "password": ...}: the command is followed all the same.
    assert_eq!(wait_state(&driver, "prod-workers-aaaaa", |s| *s == MachineState::Running).await, MachineState::Running);

    // With an SSH key and no password, an empty one: Kamatera makes one up and discards it.
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-bbbbb").await.unwrap();
    let body = fake.state().calls("POST", "/service/server")[1].body.clone().unwrap();
    assert_eq!(body["password"], "");
    fake.assert_clean();
}

#[tokio::test]
async fn a_new_server_is_creating_until_its_command_completes_then_running() {
    let fake = Fake::start().await;
    {
        // Commands move only when the test says so.
        let mut s = fake.state();
        s.faults.pending_time = Duration::from_secs(3600);
        s.faults.run_time = Duration::from_secs(3600);
    }
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    // Pending: not in Kamatera's listing yet, still reported (the create was accepted).
    let m = driver.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-aaaaa"), MachineState::Creating);
    assert!(fake.settled().server("prod-workers-aaaaa").is_none());
    // Running: listed, powered off, without a tag lookup (the create's own tags are known).
    fake.start_commands();
    assert_eq!(fake.settled().server("prod-workers-aaaaa").unwrap().power, "off");
    let m = driver.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-aaaaa"), MachineState::Creating);
    fake.finish_commands();
    let m = driver.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-aaaaa"), MachineState::Running);
    {
        let s = fake.state();
        assert_eq!(s.calls("POST", "/server/tags").len(), 0);
        let cmd = s.command_for(Kind::Create, "prod-workers-aaaaa").unwrap().id.to_string();
        let polls = s.calls("GET", "/service/queue");
        assert_eq!(polls.len(), 3, "one poll per listing while the create runs");
        assert!(polls.iter().all(|r| r.query == [("id".to_owned(), cmd.clone())]), "{polls:?}");
    }
    // Complete: no more polling.
    driver.list().await.unwrap();
    assert_eq!(fake.state().calls("GET", "/service/queue").len(), 3);
    fake.assert_clean();
}

#[tokio::test]
async fn a_command_that_fails_late_is_a_failed_machine_with_the_queues_log() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        // Left behind powered off, and removed by Kamatera.
        s.faults.fail_creates.push(("Error: not enough capacity in datacenter EU for 2A".into(), false));
        s.faults.fail_creates.push(("Error: disk image is corrupted".into(), true));
    }
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    driver.create("workers", "prod-workers-bbbbb").await.unwrap();
    let a = wait_state(&driver, "prod-workers-aaaaa", |s| matches!(s, MachineState::Failed(_))).await;
    let b = wait_state(&driver, "prod-workers-bbbbb", |s| matches!(s, MachineState::Failed(_))).await;
    let (MachineState::Failed(fa), MachineState::Failed(fb)) = (a, b) else { unreachable!() };
    assert_eq!((fa.class, fa.code.as_str()), (ErrorClass::OutOfResources, "OUT_OF_RESOURCES"));
    assert!(fa.message.contains("not enough capacity in datacenter EU"), "{}", fa.message);
    assert_eq!(fb.class, ErrorClass::Other);
    assert!(fb.message.contains("disk image is corrupted"), "{}", fb.message);
    // The second server is gone, its failure is still reported until CA deletes it.
    assert!(fake.settled().server("prod-workers-bbbbb").is_none());
    let m = driver.list().await.unwrap();
    assert!(matches!(by_name(&m, "prod-workers-bbbbb"), MachineState::Failed(_)));

    // CA deletes both: the leftover is terminated, the other one is already done.
    let r = |n: &str| MachineRef { group: "workers".into(), name: n.into(), id: n.into() };
    driver.delete(&r("prod-workers-aaaaa")).await.unwrap();
    assert!(matches!(driver.delete(&r("prod-workers-bbbbb")).await, Err(Error::NotFound(_))));
    assert!(driver.list().await.unwrap().is_empty());
    assert!(fake.settled().servers.is_empty());
    fake.assert_clean();
}

#[tokio::test]
async fn a_refused_create_fails_at_once_with_its_class_and_nothing_is_looked_for() {
    let fake = Fake::start().await;
    fake.state().faults.quota = Some(1);
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    let e = driver.create("workers", "prod-workers-bbbbb").await.unwrap_err();
    assert!(matches!(&e, Error::OutOfResources(m) if m.contains("quota of 1 servers exceeded")), "{e:?}");
    assert_eq!(e.to_create_failure().class, ErrorClass::OutOfResources);

    fake.state().faults.quota = None;
    fake.state().faults.reject_create = Some((400, "Invalid datacenter for the selected image".into()));
    let e = driver.create("workers", "prod-workers-ccccc").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("Invalid datacenter")), "{e:?}");
    assert_eq!(e.to_create_failure().class, ErrorClass::Other);

    {
        let s = fake.state();
        assert_eq!(s.calls("POST", "/service/server").len(), 3, "each create is sent once");
        assert!(s.calls("GET", "/svc/queue").is_empty(), "a refusal made nothing: nothing is looked for");
    }
    let m = driver.list().await.unwrap();
    assert_eq!(names(&m), ["workers/prod-workers-aaaaa"], "refused creates leave nothing behind");
    fake.assert_clean();
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_is_never_sent_again_and_its_server_is_adopted() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "create_request_timeout = \"300ms\"", ""));
    // The API acts, but its answer comes after the client stopped waiting.
    fake.state().faults.lose_create = Some(Lose::Late(Duration::from_secs(2)));
    let m = driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    assert_eq!(m.state, MachineState::Creating);
    // A load balancer's 502 after the API acted: the same.
    fake.state().faults.lose_create = Some(Lose::BadGateway);
    driver.create("workers", "prod-workers-bbbbb").await.unwrap();

    for name in ["prod-workers-aaaaa", "prod-workers-bbbbb"] {
        wait_state(&driver, name, |s| *s == MachineState::Running).await;
    }
    {
        let s = fake.settled();
        assert_eq!(s.calls("POST", "/service/server").len(), 2, "never sent twice");
        assert_eq!(s.servers.len(), 2, "one server per create");
        assert!(!s.calls("GET", "/svc/queue").is_empty(), "the command was found in the recent queue");
    }
    fake.assert_clean();
}

#[tokio::test]
async fn a_create_whose_answer_is_lost_and_that_made_nothing_fails_after_the_grace() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", ""));
    // A gateway timeout before the request reached the API.
    fake.state().faults.inject.push((
        "POST".into(),
        "/service/server".into(),
        504,
        "<html><body>504 Gateway Time-out</body></html>".into(),
    ));
    let e = driver.create("workers", "prod-workers-aaaaa").await.unwrap_err();
    assert!(matches!(&e, Error::Unavailable(m) if m.contains("nothing was created") && m.contains("504")), "{e:?}");
    {
        let s = fake.state();
        assert_eq!(s.calls("POST", "/service/server").len(), 1);
        assert!(s.servers.is_empty());
    }
    assert!(driver.list().await.unwrap().is_empty());
    fake.assert_clean();
}

#[tokio::test]
async fn flotilla_restarted_mid_create_follows_the_running_command_again() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.faults.pending_time = Duration::ZERO;
        // Commands end only when the test says so.
        s.faults.run_time = Duration::from_secs(3600);
        s.faults.fail_creates.push(("Error: server setup failed".into(), false));
        // A tagged server powered off with no create anywhere (stopped by hand, or the
        // in-tree provider's warm pool).
        s.add_server("prod-workers-stopd", "off", OURS);
    }
    let text = config_text(&fake, "", "");
    // The first process: one create will fail while it is down, one is running at restart.
    let first = driver_of(&text);
    first.create("workers", "prod-workers-faild").await.unwrap();
    first.create("workers", "prod-workers-runng").await.unwrap();
    drop(first);
    assert_eq!(fake.settled().servers.len(), 3);

    let second = driver_of(&text);
    let m = second.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-runng"), MachineState::Creating, "a create found running is creating");
    assert_eq!(by_name(&m, "prod-workers-faild"), MachineState::Creating);
    let MachineState::Failed(f) = by_name(&m, "prod-workers-stopd") else { panic!("{m:?}") };
    assert_eq!(f.code, "POWERED_OFF");
    assert_eq!(fake.state().calls("GET", "/svc/queue").len(), 1, "one queue read covers every powered-off server");

    fake.finish_commands();
    let m = second.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-runng"), MachineState::Running);
    let MachineState::Failed(f) = by_name(&m, "prod-workers-faild") else { panic!("{m:?}") };
    assert!(f.message.contains("server setup failed"), "{}", f.message);
    assert_eq!(fake.state().calls("POST", "/service/server").len(), 2, "nothing is created again");
    // Checked once: further listings do not read the queue again.
    second.list().await.unwrap();
    assert_eq!(fake.state().calls("GET", "/svc/queue").len(), 1);
    fake.assert_clean();
}

#[tokio::test]
async fn a_restart_sees_servers_whose_tags_come_only_when_their_create_completes() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.faults.tags_at_completion = true;
        s.faults.pending_time = Duration::ZERO;
        s.faults.run_time = Duration::from_secs(3600);
    }
    let text = config_text(&fake, "", "");
    let first = driver_of(&text);
    first.create("workers", "prod-workers-aaaaa").await.unwrap();
    drop(first);
    assert!(fake.settled().server("prod-workers-aaaaa").is_some_and(|s| s.tags.is_empty()));
    let second = driver_of(&text);
    // Untagged for now: not ours yet, but not written off as foreign either.
    assert!(second.list().await.unwrap().is_empty());
    assert!(second.list().await.unwrap().is_empty());
    assert_eq!(fake.state().calls("POST", "/server/tags").len(), 2, "asked again while it may still become ours");
    fake.finish_commands();
    let m = second.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-aaaaa"), MachineState::Running);
    fake.assert_clean();
}

#[tokio::test]
async fn a_queue_that_answers_nothing_is_settled_by_the_listing() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    let cmd = fake.state().command_for(Kind::Create, "prod-workers-aaaaa").unwrap().id;
    fake.state().faults.empty_queue_for.push(cmd);
    wait_state(&driver, "prod-workers-aaaaa", |s| *s == MachineState::Running).await;
    fake.assert_clean();
}

#[tokio::test]
async fn a_listing_that_lands_while_a_create_is_in_flight_still_reports_it() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", ""));
    let release = fake.hold_next_listing();
    let listing = tokio::spawn({
        let driver = driver.clone();
        async move { driver.list().await }
    });
    support::eventually(LIMIT, "the listing to arrive", || async {
        (!fake.state().calls("GET", "/service/servers").is_empty()).then_some(())
    })
    .await;
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    release.send(()).unwrap();
    let m = listing.await.unwrap().unwrap();
    assert_eq!(by_name(&m, "prod-workers-aaaaa"), MachineState::Creating);
    fake.assert_clean();
}

#[tokio::test]
async fn a_listing_while_a_create_call_is_out_does_not_report_a_machine_kamatera_may_refuse() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.faults.create_answer_delay = Duration::from_secs(2);
        s.faults.reject_create = Some((400, "Invalid image for datacenter".into()));
    }
    let driver = driver_of(&config_text(&fake, "", ""));
    let create = tokio::spawn({
        let driver = driver.clone();
        async move { driver.create("workers", "prod-workers-aaaaa").await }
    });
    support::eventually(LIMIT, "the create call to be out", || async {
        (!fake.state().calls("POST", "/service/server").is_empty()).then_some(())
    })
    .await;
    // Reported now, the core would count it as held by the cloud and drop it (and its failure)
    // when the next listing lacks it.
    assert!(driver.list().await.unwrap().is_empty());
    assert!(matches!(create.await.unwrap(), Err(Error::InvalidRequest(_))));
    assert!(driver.list().await.unwrap().is_empty());
    fake.assert_clean();
}

// === delete ===

#[tokio::test]
async fn delete_terminates_only_our_tagged_servers_with_force_and_repeats_safely() {
    let fake = Fake::start().await;
    let (ours, foreign, other_group) = {
        let mut s = fake.state();
        (
            s.add_server("prod-workers-aaaaa", "on", OURS),
            s.add_server("prod-workers-zzzzz", "on", &[]),
            s.add_server("prod-workers-yyyyy", "on", &["k8sca-prod", "k8scang-gpu"]),
        )
    };
    let driver = driver_of(&config_text(&fake, "", ""));
    let r = |n: &str| MachineRef { group: "workers".into(), name: n.into(), id: n.into() };
    driver.delete(&r("prod-workers-aaaaa")).await.unwrap();
    {
        let s = fake.settled();
        let terminates = s.calls("POST", "/service/server/terminate");
        assert_eq!(terminates.len(), 1);
        assert_eq!(terminates[0].body.as_ref().unwrap(), &json!({ "id": ours, "force": true }));
        assert!(s.server("prod-workers-aaaaa").is_none(), "delete returns once the terminate completed");
    }
    assert!(matches!(driver.delete(&r("prod-workers-aaaaa")).await, Err(Error::NotFound(_))), "gone is done");

    for name in ["prod-workers-zzzzz", "prod-workers-yyyyy"] {
        let e = driver.delete(&r(name)).await.unwrap_err();
        assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("refusing")), "{e:?}");
    }
    {
        let s = fake.settled();
        assert_eq!(s.calls("POST", "/service/server/terminate").len(), 1, "foreign servers are never terminated");
        assert!(s.servers.iter().any(|v| v.id == foreign) && s.servers.iter().any(|v| v.id == other_group));
    }
    fake.assert_clean();
}

#[tokio::test]
async fn delete_waits_for_a_create_still_running_before_it_terminates() {
    let fake = Fake::start().await;
    fake.state().faults.run_time = Duration::from_millis(300);
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    driver
        .delete(&MachineRef { group: "workers".into(), name: "prod-workers-aaaaa".into(), id: "x".into() })
        .await
        .unwrap();
    {
        let s = fake.settled();
        let created = s.command_for(Kind::Create, "prod-workers-aaaaa").unwrap().done_at();
        let terminate = &s.calls("POST", "/service/server/terminate")[0];
        assert!(terminate.at >= created, "terminate was sent while the create was running");
        assert!(s.servers.is_empty());
    }
    fake.assert_clean();
}

// === marks: an accepted delete outlives the process ===

const DELETING: &str = flotilla::driver::kamatera::TAG_DELETING;

fn workers(name: &str) -> MachineRef {
    MachineRef { group: "workers".into(), name: name.into(), id: name.into() }
}

#[tokio::test]
async fn a_marked_server_is_tagged_by_id_listed_deleting_and_deleted_by_a_restarted_flotilla() {
    let fake = Fake::start().await;
    let id = fake.state().add_server("prod-workers-aaaaa", "on", OURS);
    let text = config_text(&fake, "", "");
    let first = driver_of(&text);
    assert_eq!(by_name(&first.list().await.unwrap(), "prod-workers-aaaaa"), MachineState::Running);
    first.mark_deleting(&workers("prod-workers-aaaaa")).await.unwrap();
    {
        let s = fake.state();
        let adds: Vec<_> = s.calls("POST", "/server/tags").into_iter().filter(|r| r.key("add").is_some()).collect();
        assert_eq!(adds.len(), 1);
        assert_eq!(adds[0].body.as_ref().unwrap(), &json!({ "id": id, "add": DELETING }));
        assert_eq!(s.server("prod-workers-aaaaa").unwrap().tags, ["k8sca-prod", "k8scang-workers", DELETING]);
    }
    assert_eq!(by_name(&first.list().await.unwrap(), "prod-workers-aaaaa"), MachineState::Deleting);
    first.mark_deleting(&workers("prod-workers-aaaaa")).await.unwrap();
    let adds = fake.state().calls("POST", "/server/tags").into_iter().filter(|r| r.key("add").is_some()).count();
    assert_eq!(adds, 1, "marking again asks nothing");
    drop(first);

    // A new process reads the mark from Kamatera.
    let second = driver_of(&text);
    assert_eq!(by_name(&second.list().await.unwrap(), "prod-workers-aaaaa"), MachineState::Deleting);
    second.delete(&workers("prod-workers-aaaaa")).await.unwrap();
    assert!(fake.settled().servers.is_empty());
    assert!(matches!(second.mark_deleting(&workers("prod-workers-aaaaa")).await, Err(Error::NotFound(_))));
    fake.assert_clean();
}

#[tokio::test]
async fn a_mark_whose_answer_is_lost_is_read_back_and_one_refused_is_an_error() {
    let fake = Fake::start().await;
    fake.state().add_server("prod-workers-aaaaa", "on", OURS);
    fake.state().add_server("prod-workers-bbbbb", "on", OURS);
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.list().await.unwrap();
    fake.fault_next("POST", "/server/tags", Some("add"), Some("prod-workers-aaaaa"), fake::CallFault::LoseAnswer);
    driver.mark_deleting(&workers("prod-workers-aaaaa")).await.expect("the tag landed; its answer did not");
    let refused = json!({ "message": json!({ "errors": [{ "code": 5, "info": "temporary failure" }] }).to_string() });
    fake.fault_next(
        "POST",
        "/server/tags",
        Some("add"),
        Some("prod-workers-bbbbb"),
        fake::CallFault::Fail(500, refused.to_string()),
    );
    let e = driver.mark_deleting(&workers("prod-workers-bbbbb")).await.unwrap_err();
    assert!(!matches!(e, Error::NotFound(_)), "a refused mark is no proof the server is gone: {e:?}");
    let m = driver.list().await.unwrap();
    assert_eq!(by_name(&m, "prod-workers-aaaaa"), MachineState::Deleting);
    assert_eq!(by_name(&m, "prod-workers-bbbbb"), MachineState::Running);
    let adds = fake.state().calls("POST", "/server/tags").into_iter().filter(|r| r.key("add").is_some()).count();
    assert_eq!(adds, 2, "a tag change is sent once");
    fake.assert_clean();
}

#[tokio::test]
async fn a_server_still_being_created_is_tagged_by_its_delete_once_the_create_is_done() {
    let fake = Fake::start().await;
    fake.state().faults.run_time = Duration::from_millis(300);
    let driver = driver_of(&config_text(&fake, "", ""));
    driver.create("workers", "prod-workers-aaaaa").await.unwrap();
    let e = driver.mark_deleting(&workers("prod-workers-aaaaa")).await.unwrap_err();
    assert!(matches!(&e, Error::Unavailable(m) if m.contains("still being created")), "{e:?}");
    fake.state().faults.run_time = Duration::from_secs(3600);
    let delete = tokio::spawn({
        let driver = driver.clone();
        async move { driver.delete(&workers("prod-workers-aaaaa")).await }
    });
    // Terminating: the server carries the mark, and a restarted Flotilla would see it.
    let tags = support::eventually(LIMIT, "the terminate to start", || {
        let s = fake.settled();
        let t = s.command_for(Kind::Terminate, "prod-workers-aaaaa").and_then(|_| s.server("prod-workers-aaaaa"));
        let tags = t.map(|v| v.tags.clone());
        async move { tags }
    })
    .await;
    assert!(tags.iter().any(|t| t == DELETING), "{tags:?}");
    let restarted = driver_of(&config_text(&fake, "", ""));
    assert_eq!(by_name(&restarted.list().await.unwrap(), "prod-workers-aaaaa"), MachineState::Deleting);
    fake.finish_commands();
    delete.await.unwrap().unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn a_terminate_queued_behind_one_that_removed_the_server_counts_as_done() {
    let fake = Fake::start().await;
    fake.state().add_server("prod-workers-aaaaa", "on", &["k8sca-prod", "k8scang-workers", DELETING]);
    fake.state().faults.run_time = Duration::from_millis(400);
    let text = config_text(&fake, "", "");
    // A process that died mid-terminate left its command running; the next one deletes again.
    let first = driver_of(&text);
    let dying = tokio::spawn(async move { first.delete(&workers("prod-workers-aaaaa")).await });
    support::eventually(LIMIT, "the first terminate", || {
        let sent = fake.state().command_for(Kind::Terminate, "prod-workers-aaaaa").is_some();
        async move { sent.then_some(()) }
    })
    .await;
    dying.abort();
    let second = driver_of(&text);
    second.delete(&workers("prod-workers-aaaaa")).await.expect("the server is gone, whichever terminate did it");
    {
        let s = fake.settled();
        assert!(s.servers.is_empty());
        let terminates: Vec<_> = s.commands.values().filter(|c| c.kind == Kind::Terminate).collect();
        assert_eq!(terminates.len(), 2);
        assert_eq!(terminates[1].status(std::time::Instant::now()), "error", "Kamatera ran the second on nothing");
    }
    fake.assert_clean();
}

// === errors ===

#[tokio::test]
async fn bad_credentials_are_unauthorized_never_retried_and_never_shown() {
    let fake = Fake::start().await;
    let text = config_text(&fake, "", "").replace(fake::SECRET, "wrong-secret-value");
    let driver = driver_of(&text);
    // The listing relays the backend's refusal with status 200.
    let e = driver.list().await.unwrap_err();
    assert!(matches!(&e, Error::Unauthorized(m) if m.contains(fake::AUTH_FAILED)), "{e:?}");
    assert!(matches!(driver.check().await, Err(Error::Unauthorized(_))));
    let e = driver.create("workers", "prod-workers-aaaaa").await.unwrap_err();
    assert!(matches!(&e, Error::Unauthorized(_)), "{e:?}");
    let e = driver.delete(&MachineRef { group: "workers".into(), name: "x".into(), id: "x".into() }).await.unwrap_err();
    assert!(matches!(&e, Error::Unauthorized(_)), "{e:?}");
    {
        let s = fake.state();
        // The create named its image, which the API looks up with the caller's credentials: that
        // fails inside the API (500) and the create is looked for, which is refused too.
        let count = |m: &str, p: &str| s.calls(m, p).len();
        assert_eq!(count("GET", "/service/servers"), 3, "list, check and delete: one request each, not retried");
        assert_eq!(count("POST", "/service/server"), 1);
        assert_eq!(count("GET", "/svc/queue"), 1, "the lookup of a lost create stops at a refusal");
        assert_eq!(s.rejected as usize, s.requests.len());
        for r in &s.requests {
            assert!(!r.body.as_ref().is_some_and(|b| b.to_string().contains("wrong-secret-value")));
        }
    }
    assert!(!format!("{e} {e:?}").contains("wrong-secret-value"));
    fake.assert_clean();
}

#[tokio::test]
async fn reads_are_retried_creates_terminates_and_listings_are_sent_once() {
    let fake = Fake::start().await;
    fake.state().add_server("prod-workers-aaaaa", "on", OURS);
    let driver = driver_of(&config_text(&fake, "", ""));
    let inject = |method: &str, path: &str, status: u16| {
        fake.state().faults.inject.push((
            method.into(),
            path.into(),
            status,
            r#"{"message":"Failed to run command method (get)"}"#.into(),
        ));
    };
    // A tag lookup that fails once is asked again.
    inject("POST", "/server/tags", 500);
    let m = driver.list().await.unwrap();
    assert_eq!(names(&m), ["workers/prod-workers-aaaaa"]);
    assert_eq!(fake.state().calls("POST", "/server/tags").len(), 2);
    // The listing of a Refresh is not (the next Refresh lists again).
    inject("GET", "/service/servers", 503);
    assert!(matches!(driver.list().await, Err(Error::Unavailable(_))));
    assert_eq!(fake.state().calls("GET", "/service/servers").len(), 2);
    // A terminate that fails is not repeated: the delete fails and the core tries it later.
    inject("POST", "/service/server/terminate", 500);
    let r = MachineRef { group: "workers".into(), name: "prod-workers-aaaaa".into(), id: "x".into() };
    assert!(driver.delete(&r).await.is_err());
    assert_eq!(fake.state().calls("POST", "/service/server/terminate").len(), 1);
    driver.delete(&r).await.unwrap();
    fake.assert_clean();
}

// === shape, power ===

#[tokio::test]
async fn the_template_shape_comes_from_cpu_ram_and_the_first_disk() {
    let fake = Fake::start().await;
    let driver =
        driver_of(&config_text(&fake, "", "cpu = \"6D\"\nram = \"12Gi\"\ndisks = [\"size=120\", \"size=500\"]\n"));
    let s = driver.shape("workers").await.unwrap().unwrap();
    assert_eq!(s.cpu_millis, Some(6000));
    assert_eq!(s.memory_bytes, Some(12 << 30));
    assert_eq!(s.ephemeral_storage_bytes, Some(120 << 30));
    assert!(fake.state().requests.is_empty(), "the shape needs no API call");
}

#[tokio::test]
async fn power_off_and_on_wait_for_their_command_and_refuse_foreign_servers() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.add_server("prod-workers-aaaaa", "on", OURS);
        s.add_server("prod-workers-zzzzz", "on", &[]);
    }
    let driver = kamatera_of(&config_text(&fake, "", ""));
    let r = |n: &str| MachineRef { group: "workers".into(), name: n.into(), id: n.into() };
    driver.power(&r("prod-workers-aaaaa"), false).await.unwrap();
    assert_eq!(fake.settled().server("prod-workers-aaaaa").unwrap().power, "off");
    driver.power(&r("prod-workers-aaaaa"), true).await.unwrap();
    assert_eq!(fake.settled().server("prod-workers-aaaaa").unwrap().power, "on");
    // Already on: nothing sent.
    driver.power(&r("prod-workers-aaaaa"), true).await.unwrap();
    let e = driver.power(&r("prod-workers-zzzzz"), false).await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("refusing")), "{e:?}");
    assert!(matches!(driver.power(&r("prod-workers-gone0"), true).await, Err(Error::NotFound(_))));
    {
        let s = fake.state();
        assert_eq!(s.calls("POST", "/service/server/poweroff").len(), 1);
        assert_eq!(s.calls("POST", "/service/server/poweron").len(), 1);
        let id = s.server("prod-workers-aaaaa").unwrap().id.clone();
        assert_eq!(s.calls("POST", "/service/server/poweron")[0].body.as_ref().unwrap(), &json!({ "id": id }));
    }
    fake.assert_clean();
}

// === configuration ===

fn problems(text: &str) -> Vec<(String, String)> {
    let config = support::config(text);
    match flotilla::build_drivers(&config) {
        Ok(_) => Vec::new(),
        Err(p) => p.items.into_iter().map(|i| (i.path, i.message)).collect(),
    }
}

#[tokio::test]
async fn names_too_long_or_with_spaces_are_refused_before_any_create() {
    let fake = Fake::start().await;
    let long = config_text(&fake, "", "").replace("cluster_name = \"prod\"", "cluster_name = \"production-cluster\"");
    let p = problems(&long);
    assert!(
        p.iter().any(|(path, m)| path == "clouds.kam.tag_cluster_name"
            && m.contains("18 characters")
            && m.contains("at most 15")),
        "{p:?}"
    );
    let spaced = config_text(&fake, "tag_cluster_name = \"my prod\"", "tag_group_name = \"web nodes\"");
    let p = problems(&spaced);
    assert!(p.iter().any(|(path, m)| path == "clouds.kam.tag_cluster_name" && m.contains("space")), "{p:?}");
    assert!(p.iter().any(|(path, m)| path == "groups.workers.machine.tag_group_name" && m.contains("space")), "{p:?}");
    let ok = config_text(&fake, "tag_cluster_name = \"Prod_EU\"", "tag_group_name = \"Workers.1\"");
    assert!(problems(&ok).is_empty());
    assert!(fake.state().requests.is_empty());
}

#[tokio::test]
async fn a_name_prefix_outside_the_filter_shared_group_tags_and_a_short_create_timeout_are_refused() {
    let fake = Fake::start().await;
    let text = config_text(&fake, "filter_name_prefix = \"k8s-\"\ncreate_timeout = \"1m\"", "")
        + "[groups.more]\ncloud = \"kam\"\nmax_size = 1\nname_prefix = \"k8s-more\"\n[groups.more.machine]\ntag_group_name = \"workers\"\n";
    let p = problems(&text);
    assert!(p.iter().any(|(path, m)| path == "groups.workers.name_prefix" && m.contains("never be listed")), "{p:?}");
    assert!(
        p.iter().any(|(path, m)| path == "groups.more.machine.tag_group_name" && m.contains("already uses")),
        "{p:?}"
    );
}

#[test]
fn the_example_configuration_is_valid() {
    let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/examples/kamatera.toml")).unwrap();
    // Secrets from the environment, inlined for the check.
    let text = text
        .replace("{ env = \"KAMATERA_API_CLIENT_ID\" }", "\"id\"")
        .replace("{ env = \"KAMATERA_API_SECRET\" }", "\"secret\"")
        .replace("{ env = \"K3S_TOKEN\" }", "\"token\"");
    let config = flotilla::config::Config::parse(&text, "examples/kamatera.toml", std::path::Path::new("examples"))
        .unwrap_or_else(|p| panic!("{p}"));
    flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}"));
}

// === over gRPC, as cluster-autoscaler calls ===

fn grpc_text(fake: &Fake, cloud_extra: &str) -> String {
    config_text(fake, cloud_extra, "")
}

#[tokio::test]
async fn cluster_autoscaler_scales_up_and_down_over_grpc() {
    let fake = Fake::start().await;
    let (running, mut c) = support::start(&grpc_text(&fake, "")).await;
    let groups = c.node_groups(pb::NodeGroupsRequest {}).await.unwrap().into_inner().node_groups;
    assert_eq!(groups.iter().map(|g| g.id.as_str()).collect::<Vec<_>>(), ["workers"]);

    // The template node, for scale-from-zero: cpu, memory and disk from the machine settings.
    let t = c
        .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id: "workers".into() })
        .await
        .unwrap()
        .into_inner();
    let node = <k8s_pb::api::core::v1::Node as prost::Message>::decode(t.node_bytes.as_slice()).unwrap();
    let capacity = node.status.unwrap().capacity;
    let q = |k: &str| capacity.get(k).and_then(|q| q.string.clone()).unwrap();
    assert_eq!((q("cpu"), q("memory"), q("pods")), ("2".into(), "4Gi".into(), "110".into()));
    assert_eq!(q("ephemeral-storage"), "50Gi");
    assert_eq!(node.metadata.unwrap().labels.get("flotilla.dev/group").map(String::as_str), Some("workers"));

    support::increase(&mut c, "workers", 2).await.unwrap();
    assert_eq!(support::target_size(&mut c, "workers").await, 2);
    let ids = support::wait_running(&c, "workers", 2, LIMIT).await;
    assert!(ids.iter().all(|id| id.starts_with("kamatera://prod-workers-")), "{ids:?}");
    // Nodes registered with the same provider id map back to the group.
    let node =
        pb::ExternalGrpcNode { provider_id: ids[0].clone(), name: ids[0][11..].to_owned(), ..Default::default() };
    let g = c.node_group_for_node(pb::NodeGroupForNodeRequest { node: Some(node) }).await.unwrap().into_inner();
    assert_eq!(g.node_group.unwrap().id, "workers");

    support::delete(&mut c, "workers", &[ids[0].as_str()]).await.unwrap();
    assert_eq!(support::target_size(&mut c, "workers").await, 1);
    support::wait_running(&c, "workers", 1, LIMIT).await;
    support::eventually(LIMIT, "the terminate to complete", || async {
        (fake.settled().servers.len() == 1).then_some(())
    })
    .await;
    {
        let s = fake.state();
        assert_eq!(s.calls("POST", "/service/server").len(), 2);
        assert_eq!(s.calls("POST", "/service/server/terminate").len(), 1);
    }
    running.stop().await.unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn failed_creates_reach_cluster_autoscaler_with_their_class_over_grpc() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        s.faults.quota = Some(1);
        s.faults.fail_creates.push(("Insufficient capacity for CPU type A in EU".into(), true));
    }
    let (running, mut c) = support::start(&grpc_text(&fake, "")).await;
    support::increase(&mut c, "workers", 2).await.unwrap();
    // One create refused at once (quota), one accepted whose command fails later (capacity):
    // both reported with errorInfo and class OutOfResources, so CA backs off this group.
    let failed = support::eventually(LIMIT, "two failed instances", || {
        let mut c = c.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            let n = support::nodes(&mut c, "workers").await;
            let failed: Vec<_> = n.iter().filter_map(|(_, _, e)| e.clone()).collect();
            (failed.len() == 2).then_some(failed)
        }
    })
    .await;
    for e in &failed {
        assert_eq!(e.instance_error_class, ErrorClass::OutOfResources.wire_value(), "{e:?}");
    }
    let ids: Vec<String> = support::nodes(&mut c, "workers").await.into_iter().map(|(id, _, _)| id).collect();
    let ids: Vec<&str> = ids.iter().map(String::as_str).collect();
    support::delete(&mut c, "workers", &ids).await.unwrap();
    support::eventually(LIMIT, "the failed instances to go", || {
        let mut c = c.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            support::nodes(&mut c, "workers").await.is_empty().then_some(())
        }
    })
    .await;
    assert_eq!(support::target_size(&mut c, "workers").await, 0);
    running.stop().await.unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn servers_of_the_in_tree_provider_are_adopted_unchanged_over_grpc() {
    let fake = Fake::start().await;
    {
        let mut s = fake.state();
        // Named as the in-tree provider names them (<name-prefix>-<11 hex>), tagged with an
        // in-tree cluster and group name that are not DNS labels.
        s.add_server("Workers-3f2a9c1b7d0", "on", &["k8sca-Prod_EU", "k8scang-Workers_1"]);
        s.add_server("Workers-88e1d0c4a2f", "on", &["k8sca-Prod_EU", "k8scang-Workers_1"]);
        s.add_server("Workers-0000000000a", "on", &["k8sca-Other", "k8scang-Workers_1"]);
    }
    let text = config_text(&fake, "tag_cluster_name = \"Prod_EU\"", "tag_group_name = \"Workers_1\"")
        .replace("max_size = 5", "max_size = 5\nmin_size = 2");
    let (running, mut c) = support::start(&text).await;
    let ids = support::wait_running(&c, "workers", 2, LIMIT).await;
    assert_eq!(ids, ["kamatera://Workers-3f2a9c1b7d0", "kamatera://Workers-88e1d0c4a2f"]);
    assert_eq!(support::target_size(&mut c, "workers").await, 2);
    // Their Nodes (providerID patched to kamatera://<name> by the in-tree provider) match.
    let node = pb::ExternalGrpcNode {
        provider_id: "kamatera://Workers-3f2a9c1b7d0".into(),
        name: "Workers-3f2a9c1b7d0".into(),
        ..Default::default()
    };
    let g = c.node_group_for_node(pb::NodeGroupForNodeRequest { node: Some(node) }).await.unwrap().into_inner();
    assert_eq!(g.node_group.unwrap().id, "workers");
    assert!(fake.state().calls("POST", "/service/server").is_empty(), "nothing is recreated");
    running.stop().await.unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn a_listing_older_than_a_finished_delete_does_not_bring_the_server_back_over_grpc() {
    let fake = Fake::start().await;
    fake.state().add_server("prod-workers-aaaaa", "on", OURS);
    let (running, mut c) = support::start(&grpc_text(&fake, "")).await;
    let ids = support::wait_running(&c, "workers", 1, LIMIT).await;
    // A Refresh whose listing is taken now but answered only after the delete finished.
    let listings = fake.state().calls("GET", "/service/servers").len();
    let release = fake.hold_next_listing();
    let refresh = tokio::spawn({
        let mut c = c.clone();
        async move { support::refresh(&mut c).await }
    });
    support::eventually(LIMIT, "the held listing to arrive", || async {
        (fake.state().calls("GET", "/service/servers").len() > listings).then_some(())
    })
    .await;
    support::delete(&mut c, "workers", &[ids[0].as_str()]).await.unwrap();
    support::eventually(LIMIT, "the terminate to complete", || async {
        fake.settled().servers.is_empty().then_some(())
    })
    .await;
    support::eventually(LIMIT, "the delete to be recorded", || {
        let mut c = c.clone();
        async move { support::nodes(&mut c, "workers").await.is_empty().then_some(()) }
    })
    .await;
    release.send(()).unwrap();
    // The stale listing (it still has the server) is applied before the Refresh answers.
    refresh.await.unwrap().unwrap();
    assert!(support::nodes(&mut c, "workers").await.is_empty());
    assert_eq!(support::target_size(&mut c, "workers").await, 0);
    running.stop().await.unwrap();
    fake.assert_clean();
}

// === warm pool ===

#[path = "fakes/kube/mod.rs"]
mod kube_fake;

#[tokio::test]
async fn a_warm_pool_powers_servers_off_on_scale_down_and_on_for_the_next_scale_up() {
    let fake = Fake::start().await;
    let kube = kube_fake::Fake::start("t").await;
    let dir = tempfile::tempdir().unwrap();
    // The in-tree provider's poweroff-on-scale-down left a server powered off: it is the pool's.
    fake.state().add_server("prod-workers-ooooo", "off", OURS);
    let text = config_text(&fake, "node_cleanup = true\n", "")
        .replace("name_prefix = \"prod-workers\"\n", "name_prefix = \"prod-workers\"\nwarm_pool = 2\n")
        + &format!("[kubernetes]\nkubeconfig = \"{}\"\n", kube.kubeconfig(dir.path(), "t").display());
    let (server, mut c) = support::start(&text).await;
    support::refresh(&mut c).await.unwrap();
    assert_eq!(support::target_size(&mut c, "workers").await, 0, "a pool server is not counted");
    assert!(support::nodes(&mut c, "workers").await.is_empty(), "nor reported");

    // Scale-up of 2: the pool server is powered on, one server is created.
    support::increase(&mut c, "workers", 2).await.unwrap();
    let ids = support::wait_running(&c, "workers", 2, LIMIT).await;
    assert!(ids.contains(&"kamatera://prod-workers-ooooo".to_owned()), "{ids:?}");
    {
        let s = fake.state();
        assert_eq!(s.calls("POST", "/service/server/poweron").len(), 1);
        assert_eq!(s.calls("POST", "/service/server").len(), 1, "one create");
    }
    // Scale-down of both: both powered off and kept (the pool holds 2).
    support::delete(&mut c, "workers", &[ids[0].as_str(), ids[1].as_str()]).await.unwrap();
    support::wait_running(&c, "workers", 0, LIMIT).await;
    {
        let s = fake.settled();
        assert_eq!(s.calls("POST", "/service/server/poweroff").len(), 2);
        assert_eq!(s.calls("POST", "/service/server/terminate").len(), 0, "nothing terminated");
        assert_eq!(s.server("prod-workers-ooooo").unwrap().power, "off");
    }
    assert_eq!(support::target_size(&mut c, "workers").await, 0);
    server.stop().await.unwrap();
    fake.assert_clean();
}
