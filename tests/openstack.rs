//! The OpenStack driver against a fake Keystone + Nova (+ Glance and Neutron lookups) that
//! asserts every request: directly through the driver trait, and end to end over gRPC.

#[path = "fakes/openstack/mod.rs"]
mod fake;
mod support;

use std::time::Duration;

use axum::http::Method;
use base64::Engine;
use fake::Fake;
use flotilla::driver::{
    Error, ErrorClass, MachineRef, MachineState, SharedDriver,
    openstack::{META_CLUSTER, META_GROUP, auth::Credentials},
};
use flotilla::proto::externalgrpc::instance_status::InstanceState;
use serde_json::json;

const CLUSTER: &str = "dev-cluster";
const LIMIT: Duration = Duration::from_secs(10);

/// A configuration with inline password credentials for the fake and one group `workers`
/// whose `machine` table is `machine`.
fn config_text(fake: &Fake, cloud_extra: &str, machine: &str) -> String {
    format!(
        r#"cluster_name = "{CLUSTER}"
[clouds.os]
driver = "openstack"
region_name = "RegionOne"
page_size = 2
request_timeout = "2s"
{cloud_extra}
{auth}
[groups.workers]
cloud = "os"
max_size = 5

[groups.workers.machine]
{machine}
"#,
        auth = fake.auth_table("os"),
    )
}

const PLAIN_MACHINE: &str = r#"flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
networks = ["k3s-net"]
"#;

fn driver_of(text: &str) -> SharedDriver {
    let config = support::config(text);
    let mut drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("drivers: {p}"));
    drivers.remove(0)
}

fn ours(group: &str) -> Vec<(&'static str, String)> {
    vec![(META_CLUSTER, CLUSTER.to_owned()), (META_GROUP, group.to_owned())]
}

fn add(fake: &Fake, name: &str, meta: &[(&'static str, String)]) -> String {
    let meta: Vec<(&str, &str)> = meta.iter().map(|(k, v)| (*k, v.as_str())).collect();
    fake.add_server(name, &meta)
}

#[tokio::test]
async fn servers_are_listed_page_by_page_and_only_ours_are_returned() {
    let fake = Fake::start().await;
    fake.set_build_time(Duration::ZERO);
    let a = add(&fake, "dev-cluster-workers-aaaaa", &ours("workers"));
    add(&fake, "someone-elses", &[(META_CLUSTER, "prod".into()), (META_GROUP, "workers".into())]);
    let b = add(&fake, "dev-cluster-gpu-bbbbb", &ours("gpu"));
    add(&fake, "hand-made", &[]);
    let c = add(&fake, "dev-cluster-workers-ccccc", &ours("workers"));
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));

    let mut machines = driver.list().await.unwrap();
    machines.sort_by(|x, y| x.name.cmp(&y.name));
    let got: Vec<_> = machines.iter().map(|m| (m.group.as_str(), m.name.as_str(), m.id.as_str())).collect();
    assert_eq!(
        got,
        [
            ("gpu", "dev-cluster-gpu-bbbbb", b.as_str()),
            ("workers", "dev-cluster-workers-aaaaa", a.as_str()),
            ("workers", "dev-cluster-workers-ccccc", c.as_str()),
        ]
    );
    assert!(machines.iter().all(|m| m.state == MachineState::Running));

    // Five servers, pages of two: three calls, each continuing from the last id it saw.
    let pages: Vec<_> = fake.requests().into_iter().filter(|r| r.path.ends_with("/servers/detail")).collect();
    assert_eq!(pages.len(), 3);
    assert!(pages.iter().all(|r| r.query.get("limit").map(String::as_str) == Some("2")));
    assert_eq!(pages[0].query.get("marker"), None);
    // Newest first: c, hand-made | b, someone-elses | a.
    assert_eq!(pages[1].query.get("marker").map(String::as_str), Some(fake.servers()[3].id.as_str()));
    assert_eq!(pages[2].query.get("marker").map(String::as_str), Some(fake.servers()[1].id.as_str()));

    driver.list().await.unwrap();
    assert_eq!(fake.tokens_issued(), 1, "the token is cached between calls");
    fake.assert_clean();
}

#[tokio::test]
async fn a_create_sends_resolved_ids_ownership_marks_and_the_rendered_user_data() {
    let fake = Fake::start().await;
    let machine = r#"flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
networks = ["k3s-net"]
security_groups = ["k3s-nodes"]
key_name = "k3s-admin"
availability_zone = "az-2"
server_group = "k3s-workers"
boot_volume_size = 40
config_drive = true
metadata = { role = "worker" }
join_url = "https://192.168.1.1:6443"
join_token = "Kxxxxx::server:1234567890"
user_data = """
#cloud-config
hostname: {{ name }}
runcmd:
  - curl -sfL https://get.k3s.io | INSTALL_K3S_VERSION={{ k3s_version }} K3S_URL={{ join_url }} K3S_TOKEN={{ join_token }} sh -s - agent --node-label flotilla/group={{ group }} --node-label flotilla/cluster={{ cluster }} --node-label tier={{ data.tier }}
"""
template_data = { k3s_version = "v1.23.6+k3s1", tier = "batch" }
"#;
    let driver = driver_of(&config_text(&fake, "", machine));
    let name = "dev-cluster-workers-x7k2p";
    let m = driver.create("workers", name).await.unwrap();
    assert_eq!(m.state, MachineState::Creating);
    assert_eq!(m.name, name);

    let servers = fake.servers();
    assert_eq!(servers.len(), 1);
    assert_eq!(m.id, servers[0].id);
    let body = &servers[0].body;
    let s = &body["server"];
    assert_eq!(s["name"], name);
    assert_eq!(s["flavorRef"], fake::FLAVOR_ID);
    assert_eq!(s.get("imageRef"), None, "boot from volume names the image in the mapping");
    assert_eq!(
        s["block_device_mapping_v2"],
        json!([{ "boot_index": 0, "uuid": fake::IMAGE_ID, "source_type": "image", "destination_type": "volume",
                 "volume_size": 40, "delete_on_termination": true }])
    );
    assert_eq!(s["networks"], json!([{ "uuid": fake::NETWORK_ID }]));
    assert_eq!(s["security_groups"], json!([{ "name": "k3s-nodes" }]));
    assert_eq!(s["key_name"], "k3s-admin");
    assert_eq!(s["availability_zone"], "az-2");
    assert_eq!(s["config_drive"], true);
    assert_eq!(s["metadata"], json!({ META_CLUSTER: CLUSTER, META_GROUP: "workers", "role": "worker" }));
    assert_eq!(body["os:scheduler_hints"], json!({ "group": fake::SERVER_GROUP_ID }));
    let user_data = base64::engine::general_purpose::STANDARD.decode(s["user_data"].as_str().unwrap()).unwrap();
    assert_eq!(
        String::from_utf8(user_data).unwrap(),
        "#cloud-config\nhostname: dev-cluster-workers-x7k2p\nruncmd:\n  - curl -sfL https://get.k3s.io | \
         INSTALL_K3S_VERSION=v1.23.6+k3s1 K3S_URL=https://192.168.1.1:6443 K3S_TOKEN=Kxxxxx::server:1234567890 sh -s - \
         agent --node-label flotilla/group=workers --node-label flotilla/cluster=dev-cluster --node-label tier=batch\n"
    );

    // Names are resolved once per group.
    driver.create("workers", "dev-cluster-workers-second").await.unwrap();
    assert_eq!(fake.count(Method::GET, "/flavors/detail"), 1);
    assert_eq!(fake.count(Method::GET, "/image/v2/images"), 1);
    assert_eq!(fake.count(Method::GET, "/network/v2.0/networks"), 1);
    assert_eq!(fake.count(Method::GET, "/os-server-groups"), 1);
    assert_eq!(fake.count(Method::POST, "/compute/v2.1/servers"), 2);
    fake.assert_clean();
}

#[tokio::test]
async fn without_networks_nova_picks_them_and_ids_skip_the_lookups() {
    let fake = Fake::start().await;
    let machine = format!("flavor = \"{}\"\nimage = \"{}\"\n", fake::FLAVOR_ID, fake::IMAGE_ID);
    let driver = driver_of(&config_text(&fake, "", &machine));
    driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let s = &fake.servers()[0].body["server"];
    assert_eq!(s["networks"], "auto");
    assert_eq!(s["imageRef"], fake::IMAGE_ID);
    assert_eq!(s.get("user_data"), None);
    assert_eq!(fake.count(Method::GET, "/image/v2/images"), 0);
    fake.assert_clean();
}

#[tokio::test]
async fn a_new_server_is_creating_until_nova_reports_it_active() {
    let fake = Fake::start().await;
    fake.set_build_time(Duration::from_millis(400));
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    let m = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    assert_eq!(m.state, MachineState::Creating);
    let listed = driver.list().await.unwrap();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].id, m.id);
    support::eventually(LIMIT, "the server to be ACTIVE", || {
        let driver = driver.clone();
        async move {
            let listed = driver.list().await.unwrap();
            (listed.len() == 1 && listed[0].state == MachineState::Running).then_some(())
        }
    })
    .await;
    fake.assert_clean();
}

#[tokio::test]
async fn an_error_server_fails_with_its_fault_and_no_valid_host_is_out_of_resources() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    let no_host = "No valid host was found. There are not enough hosts available.";
    fake.fail_next_boot(no_host);
    fake.fail_next_boot("Build of instance aborted: Failure prepping block device.");
    let a = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let b = driver.create("workers", "dev-cluster-workers-bbbbb").await.unwrap();
    let listed = driver.list().await.unwrap();
    let state = |id: &str| listed.iter().find(|m| m.id == id).unwrap().state.clone();
    let MachineState::Failed(fa) = state(&a.id) else { panic!("{:?}", state(&a.id)) };
    assert_eq!(
        (fa.class, fa.code.as_str(), fa.message.as_str()),
        (ErrorClass::OutOfResources, "NO_VALID_HOST", no_host)
    );
    let MachineState::Failed(fb) = state(&b.id) else { panic!("{:?}", state(&b.id)) };
    assert_eq!(fb.class, ErrorClass::Other);
    assert_eq!(fb.message, "Build of instance aborted: Failure prepping block device.");
    fake.assert_clean();
}

#[tokio::test]
async fn quota_errors_are_out_of_resources_with_either_status() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    fake.set_quota(Some(1), 403);
    driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let e = driver.create("workers", "dev-cluster-workers-bbbbb").await.unwrap_err();
    assert!(matches!(&e, Error::OutOfResources(m) if m.contains("Quota exceeded for instances")), "{e:?}");
    // Older Nova answered 413 overLimit for the same thing.
    fake.set_quota(Some(1), 413);
    let e = driver.create("workers", "dev-cluster-workers-ccccc").await.unwrap_err();
    assert!(matches!(&e, Error::OutOfResources(m) if m.contains("Quota exceeded")), "{e:?}");
    assert_eq!(fake.servers().len(), 1);
    fake.assert_clean();
}

#[tokio::test]
async fn delete_is_idempotent_and_refuses_servers_not_marked_as_ours() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    let m = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let r = MachineRef::from(&m);
    fake.set_delete_time(Duration::from_secs(3600));
    driver.delete(&r).await.unwrap();
    driver.delete(&r).await.unwrap();
    assert_eq!(fake.count(Method::DELETE, &m.id), 1, "a server already being deleted is not deleted again");
    fake.set_delete_time(Duration::ZERO);
    assert!(fake.servers().is_empty());
    assert!(matches!(driver.delete(&r).await, Err(Error::NotFound(_))));

    let foreign =
        add(&fake, "dev-cluster-workers-zzzzz", &[(META_CLUSTER, "prod".into()), (META_GROUP, "workers".into())]);
    let other_group = add(&fake, "dev-cluster-gpu-yyyyy", &ours("gpu"));
    for id in [&foreign, &other_group] {
        let r = MachineRef { group: "workers".into(), name: "x".into(), id: id.clone() };
        let e = driver.delete(&r).await.unwrap_err();
        assert!(matches!(&e, Error::InvalidRequest(msg) if msg.contains("refusing")), "{e:?}");
    }
    assert_eq!(fake.servers().len(), 2, "servers not marked as ours are never deleted");
    assert_eq!(fake.count(Method::DELETE, &foreign), 0);
    assert_eq!(fake.count(Method::DELETE, &other_group), 0);
    fake.assert_clean();
}

#[tokio::test]
async fn a_revoked_token_is_replaced_once_and_the_call_retried() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    driver.list().await.unwrap();
    fake.revoke_tokens();
    driver.list().await.unwrap();
    assert_eq!(fake.tokens_issued(), 2);
    let rejected: Vec<_> = fake.requests().into_iter().filter(|r| r.status == 401).collect();
    assert_eq!(rejected.len(), 1);
    assert_eq!(rejected[0].token.as_deref(), Some("gAAAAAB-fake-token-1"));
    fake.assert_clean();
}

#[tokio::test]
async fn a_token_is_renewed_before_it_expires() {
    let fake = Fake::start().await;
    fake.set_token_lifetime(Duration::from_secs(2));
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    support::eventually(LIMIT, "a second token", || {
        let (driver, fake) = (driver.clone(), fake.clone());
        async move {
            driver.list().await.unwrap();
            (fake.tokens_issued() >= 2).then_some(())
        }
    })
    .await;
    let times = fake.token_times();
    assert!(times[1].0 < times[0].1, "the second token was issued before the first expired");
    assert!(fake.requests().iter().all(|r| r.status != 401), "no request ever went out with an expired token");
    fake.assert_clean();
}

#[tokio::test]
async fn wrong_credentials_are_unauthorized() {
    let fake = Fake::start().await;
    let text = config_text(&fake, "", PLAIN_MACHINE).replace(fake::PASSWORD, "wrong");
    let driver = driver_of(&text);
    let e = driver.list().await.unwrap_err();
    assert!(matches!(&e, Error::Unauthorized(m) if m.contains("401")), "{e:?}");
    assert!(matches!(driver.check().await, Err(Error::Unauthorized(_))));
    assert!(!format!("{e}").contains("wrong"), "the password never appears in errors");
    fake.assert_clean();
}

#[tokio::test]
async fn server_errors_rate_limits_and_timeouts_are_classified() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    driver.check().await.unwrap();
    let detail = "/compute/v2.1/servers/detail";
    fake.inject(Method::GET, detail, 503, json!({ "computeFault": { "code": 503, "message": "Service Unavailable" } }));
    assert!(matches!(driver.list().await, Err(Error::Unavailable(m)) if m.contains("Service Unavailable")));
    fake.inject_with_headers(
        Method::GET,
        detail,
        429,
        json!({ "overLimit": { "code": 429, "message": "Rate limit exceeded" } }),
        vec![("Retry-After", "7".into())],
    );
    let e = driver.list().await.unwrap_err();
    assert!(matches!(e, Error::RateLimited { retry_after: Some(d), .. } if d == Duration::from_secs(7)), "{e:?}");
    fake.inject(
        Method::POST,
        "/compute/v2.1/servers",
        400,
        json!({ "badRequest": { "code": 400, "message": "Invalid flavorRef" } }),
    );
    let e = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("Invalid flavorRef")), "{e:?}");

    fake.set_latency(Duration::from_secs(3));
    assert!(matches!(driver.list().await, Err(Error::Timeout(_))));
    fake.set_latency(Duration::ZERO);
    driver.list().await.unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn a_create_whose_answer_was_lost_removes_the_server_it_made() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    add(&fake, "dev-cluster-workers-aaaaa", &[(META_CLUSTER, "prod".into()), (META_GROUP, "workers".into())]);
    fake.lose_next_create_answer();
    let e = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let left = fake.servers();
    assert_eq!(left.len(), 1, "only the other cluster's server of the same name is left");
    assert_eq!(left[0].metadata[META_CLUSTER], "prod");
    let lookup = fake
        .requests()
        .into_iter()
        .find(|r| r.path.ends_with("/servers/detail") && r.query.contains_key("name"))
        .expect("a lookup by name");
    assert_eq!(lookup.query["name"], "^dev-cluster-workers-aaaaa$");
    fake.assert_clean();
}

#[tokio::test]
async fn the_template_node_shape_comes_from_the_flavor_and_is_cached() {
    let fake = Fake::start().await;
    let text = config_text(&fake, "", PLAIN_MACHINE)
        + "[groups.gpu]\ncloud = \"os\"\nmax_size = 2\n[groups.gpu.machine]\nflavor = \"gpu.a100\"\nimage = \"fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2\"\nboot_volume_size = 200\n";
    let driver = driver_of(&text);
    let s = driver.shape("workers").await.unwrap().unwrap();
    assert_eq!(s.cpu_millis, Some(4000));
    assert_eq!(s.memory_bytes, Some(16 << 30));
    assert_eq!(s.ephemeral_storage_bytes, Some(70 << 30));
    assert_eq!(s.gpus, None);
    assert_eq!(s.instance_type.as_deref(), Some("io.70GB"));
    let g = driver.shape("gpu").await.unwrap().unwrap();
    assert_eq!((g.cpu_millis, g.memory_bytes, g.gpus), (Some(16_000), Some(64 << 30), Some(2)));
    assert_eq!(g.ephemeral_storage_bytes, Some(200 << 30), "the boot volume is the node's disk");
    driver.shape("workers").await.unwrap();
    assert_eq!(fake.count(Method::GET, "/os-extra_specs"), 2, "one extra-specs lookup per group, then cached");
    fake.assert_clean();
}

#[tokio::test]
async fn butane_turns_the_rendered_template_into_ignition() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    // A stand-in for `butane --strict`: checks its flag, prints Ignition wrapping what it read.
    let butane = dir.path().join("butane");
    std::fs::write(
        &butane,
        "#!/bin/sh\n[ \"$1\" = \"--strict\" ] || { echo \"expected --strict\" >&2; exit 3; }\n\
         printf '{\"ignition\":{\"version\":\"3.3.0\"},\"from\":\"'\ntr -d '\\n'\nprintf '\"}'\n",
    )
    .unwrap();
    let failing = dir.path().join("butane-bad");
    std::fs::write(&failing, "#!/bin/sh\ncat >/dev/null\necho 'error at line 3: unknown field' >&2\nexit 1\n").unwrap();
    for f in [&butane, &failing] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(f, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let template = dir.path().join("k3s-node.butane.j2");
    std::fs::write(&template, "variant: fcos {{ name }} {{ master_vm_ip }}\n").unwrap();
    let machine = format!(
        "{PLAIN_MACHINE}user_data_template = \"{}\"\nbutane = true\nbutane_binary = \"{}\"\ntemplate_data = {{ master_vm_ip = \"192.168.1.1\" }}\n",
        template.display(),
        butane.display()
    );
    let driver = driver_of(&config_text(&fake, "", &machine));
    driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let ud = fake.servers()[0].body["server"]["user_data"].as_str().unwrap().to_owned();
    let ud = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(ud).unwrap()).unwrap();
    assert_eq!(ud, r#"{"ignition":{"version":"3.3.0"},"from":"variant: fcos dev-cluster-workers-aaaaa 192.168.1.1"}"#);

    let bad = driver_of(&config_text(
        &fake,
        "",
        &machine.replace(&butane.display().to_string(), &failing.display().to_string()),
    ));
    let e = bad.create("workers", "dev-cluster-workers-bbbbb").await.unwrap_err();
    assert!(
        matches!(&e, Error::InvalidRequest(m) if m.contains("butane failed") && m.contains("error at line 3")),
        "{e:?}"
    );
    assert_eq!(fake.count(Method::POST, "/compute/v2.1/servers"), 1, "nothing is created without user data");
    fake.assert_clean();
}

#[tokio::test]
async fn credentials_come_from_clouds_yaml_or_the_autoscalers_file() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let clouds = dir.path().join("clouds.yaml");
    std::fs::write(
        &clouds,
        format!(
            "clouds:\n  other:\n    auth:\n      auth_url: http://127.0.0.1:1/v3\n  pouta:\n    auth_type: v3applicationcredential\n    \
             auth:\n      auth_url: {}\n      application_credential_id: {}\n      application_credential_secret: {}\n    \
             region_name: RegionOne\n    interface: public\n",
            fake.auth_url(),
            fake::APP_CRED_ID,
            fake::APP_CRED_SECRET
        ),
    )
    .unwrap();
    let seed = dir.path().join("credentials.yaml");
    std::fs::write(
        &seed,
        format!(
            "OS_AUTH_URL: \"{}\"\nOS_IDENTITY_API_VERSION: 3\nOS_USERNAME: \"{}\"\nOS_PASSWORD: \"{}\"\n\
             OS_USER_DOMAIN_NAME: \"{}\"\nOS_TENANT_ID: \"p-1234\"\nOS_TENANT_NAME: \"{}\"\nOS_REGION: \"RegionOne\"\n",
            fake.auth_url(),
            fake::USERNAME,
            fake::PASSWORD,
            fake::USER_DOMAIN,
            fake::PROJECT
        ),
    )
    .unwrap();
    let base = |source: &str| {
        format!(
            "cluster_name = \"{CLUSTER}\"\n[clouds.os]\ndriver = \"openstack\"\n{source}\n\
             [groups.workers]\ncloud = \"os\"\nmax_size = 2\n[groups.workers.machine]\n{PLAIN_MACHINE}"
        )
    };
    let from_clouds = driver_of(&base(&format!("cloud = \"pouta\"\nclouds_file = \"{}\"", clouds.display())));
    from_clouds.list().await.unwrap();
    let from_seed = driver_of(&base(&format!("credentials_file = \"{}\"", seed.display())));
    from_seed.list().await.unwrap();
    let methods: Vec<_> = fake
        .requests()
        .into_iter()
        .filter(|r| r.path.ends_with("/auth/tokens"))
        .map(|r| r.body.unwrap()["auth"]["identity"]["methods"][0].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(methods, ["application_credential", "password"]);
    fake.assert_clean();
}

#[test]
fn os_variables_are_read_like_the_openstack_cli() {
    let vars = [
        ("OS_AUTH_URL", "https://keystone.example:5000/v3/"),
        ("OS_USERNAME", "user"),
        ("OS_PASSWORD", "pw"),
        ("OS_USER_DOMAIN_NAME", "default"),
        ("OS_PROJECT_NAME", "k3s"),
        ("OS_REGION_NAME", "nova"),
        ("OS_ENDPOINT_TYPE", "internalURL"),
        ("OS_CACERT", "/etc/ssl/private-cloud.pem"),
    ];
    let get = |k: &str| vars.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned());
    let c = Credentials::from_vars(get).unwrap();
    assert_eq!(c.auth_url, "https://keystone.example:5000/v3");
    assert_eq!(c.region.as_deref(), Some("nova"));
    assert_eq!(c.interface.as_deref(), Some("internal"));
    assert_eq!(c.ca_file.as_deref(), Some("/etc/ssl/private-cloud.pem"));
    let flotilla::driver::openstack::auth::Method::Password { project: Some(project), .. } = &c.method else {
        panic!("{:?}", c.method)
    };
    assert_eq!(project.name.as_deref(), Some("k3s"));
    assert_eq!(project.domain_name.as_deref(), Some("default"), "the project defaults to the user's domain");

    let missing = Credentials::from_vars(|k| (k == "OS_AUTH_URL").then(|| "https://k/v3".to_owned())).unwrap_err();
    assert!(missing.contains("OS_USERNAME"), "{missing}");
    let v2 = Credentials::from_vars(|k| match k {
        "OS_AUTH_URL" => Some("https://k/v2.0".into()),
        "OS_IDENTITY_API_VERSION" => Some("2".into()),
        _ => None,
    })
    .unwrap_err();
    assert!(v2.contains("only Keystone v3"), "{v2}");
}

#[test]
fn configuration_problems_are_reported_with_their_key_paths() {
    let text = r#"cluster_name = "dev-cluster"
[clouds.os]
driver = "openstack"
page_sise = 2
[clouds.os.auth]
auth_url = "http://127.0.0.1:1/v3"
username = "u"
user_domain_name = "Default"
[groups.workers]
cloud = "os"
max_size = 2
[groups.workers.machine]
flavour = "io.70GB"
user_data = "hostname: {{ nmae }}"
metadata = { flotilla-cluster = "x" }
"#;
    let config = flotilla::config::Config::parse(text, "test.toml", std::path::Path::new(".")).unwrap();
    let problems = flotilla::build_drivers(&config).unwrap_err();
    let shown = problems.to_string();
    let paths: Vec<&str> = problems.items.iter().map(|p| p.path.as_str()).collect();
    for expected in [
        "clouds.os.auth",
        "clouds.os.page_sise",
        "groups.workers.machine.flavor",
        "groups.workers.machine.image",
        "groups.workers.machine.flavour",
        "groups.workers.machine.user_data",
        "groups.workers.machine.metadata.flotilla-cluster",
    ] {
        assert!(paths.contains(&expected), "{expected} missing from:\n{shown}");
    }
    assert!(shown.contains("OS_PASSWORD is not set"), "{shown}");
    assert!(shown.contains("nmae"), "{shown}");
}

#[tokio::test]
async fn cluster_autoscaler_scales_a_group_up_and_down_through_grpc() {
    let fake = Fake::start().await;
    fake.set_build_time(Duration::from_millis(300));
    fake.set_delete_time(Duration::from_millis(200));
    let (server, mut c) = support::start(&config_text(&fake, "", PLAIN_MACHINE)).await;

    support::increase(&mut c, "workers", 2).await.unwrap();
    assert_eq!(support::target_size(&mut c, "workers").await, 2);
    let ids = support::wait_running(&c, "workers", 2, LIMIT).await;
    let mut cloud_ids: Vec<String> = fake.servers().iter().map(|s| format!("openstack:///{}", s.id)).collect();
    cloud_ids.sort();
    assert_eq!(ids, cloud_ids, "provider ids are what the OpenStack cloud controller sets");
    assert!(fake.servers().iter().all(|s| s.name.starts_with("dev-cluster-workers-")));

    support::delete(&mut c, "workers", &[ids[0].as_str()]).await.unwrap();
    support::eventually(LIMIT, "the server to be gone", || {
        let fake = fake.clone();
        async move { (fake.servers().len() == 1).then_some(()) }
    })
    .await;
    let left = support::wait_running(&c, "workers", 1, LIMIT).await;
    assert_eq!(left, [ids[1].clone()]);
    assert_eq!(support::target_size(&mut c, "workers").await, 1);
    let nodes = support::nodes(&mut c, "workers").await;
    assert!(nodes.iter().all(|(_, s, _)| *s == InstanceState::InstanceRunning));
    server.stop().await.unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn the_example_configuration_boots_a_fedora_coreos_k3s_agent() {
    let fake = Fake::start().await;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("k3s-token");
    std::fs::write(&token, "K10example::server:0123456789\n").unwrap();
    // Stands in for butane: checks its flag and passes the Butane text through.
    let butane = dir.path().join("butane");
    std::fs::write(&butane, "#!/bin/sh\n[ \"$1\" = \"--strict\" ] || exit 3\ncat\n").unwrap();
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&butane, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let auth = format!(
        "[clouds.pouta.auth]\nauth_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nuser_domain_name = \"{}\"\nproject_name = \"{}\"\n\n[groups.workers]\n",
        fake.auth_url(),
        fake::USERNAME,
        fake::PASSWORD,
        fake::USER_DOMAIN,
        fake::PROJECT
    );
    let text = std::fs::read_to_string("examples/openstack.toml")
        .unwrap()
        .replace("credentials_file = \"openstack-credentials.yaml\"\n", "")
        .replacen("[groups.workers]\n", &auth, 1)
        .replace("\"regionOne\"", "\"RegionOne\"")
        .replace("\"project-net\"", "\"k3s-net\"")
        .replace("{ env = \"K3S_NODE_TOKEN\" }", &format!("{{ file = \"{}\" }}", token.display()))
        .replace("\"/usr/bin/butane\"", &format!("\"{}\"", butane.display()));
    let config = support::config(&text);
    assert_eq!(
        config.groups[0].provider_id.render(flotilla::provider_id::Parts {
            cluster: CLUSTER,
            group: "workers",
            region: "",
            name: "n1",
            id: "u1"
        }),
        "k3s://n1"
    );
    let driver = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}")).remove(0);
    driver.create("workers", "dev-cluster-workers-abcde").await.unwrap();
    let s = &fake.servers()[0].body["server"];
    let ud = base64::engine::general_purpose::STANDARD.decode(s["user_data"].as_str().unwrap()).unwrap();
    let butane_yaml: serde_yaml::Value = serde_yaml::from_slice(&ud).expect("the rendered template is YAML");
    assert_eq!(butane_yaml["variant"].as_str(), Some("fcos"));
    let files = butane_yaml["storage"]["files"].as_sequence().unwrap();
    assert_eq!(files[0]["contents"]["inline"].as_str(), Some("dev-cluster-workers-abcde"));
    let k3s: serde_yaml::Value = serde_yaml::from_str(files[1]["contents"]["inline"].as_str().unwrap()).unwrap();
    assert_eq!(k3s["server"].as_str(), Some("https://192.168.1.1:6443"));
    assert_eq!(k3s["token"].as_str(), Some("K10example::server:0123456789"));
    assert_eq!(k3s["node-name"].as_str(), Some("dev-cluster-workers-abcde"));
    assert_eq!(s["key_name"], "admin");
    assert_eq!(fake.servers()[0].body["os:scheduler_hints"]["group"], fake::SERVER_GROUP_ID);
    fake.assert_clean();
}

#[tokio::test]
async fn a_large_project_is_listed_in_a_handful_of_calls() {
    let fake = Fake::start().await;
    fake.set_build_time(Duration::ZERO);
    for i in 0..1000 {
        let meta = if i % 2 == 0 { ours("workers") } else { vec![(META_CLUSTER, "prod".to_owned())] };
        add(&fake, &format!("server-{i}"), &meta);
    }
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE).replace("page_size = 2\n", ""));
    let started = std::time::Instant::now();
    let machines = driver.list().await.unwrap();
    let elapsed = started.elapsed();
    assert_eq!(machines.len(), 500);
    // Five full pages of 200, then the empty page that ends the listing.
    assert_eq!(fake.count(Method::GET, "/servers/detail"), 6);
    eprintln!("listed 1000 servers (500 ours) in {elapsed:?}");
    fake.assert_clean();
}

#[test]
fn an_unreadable_ca_bundle_is_a_configuration_problem() {
    let text = format!(
        "cluster_name = \"c\"\n[clouds.os]\ndriver = \"openstack\"\nca_file = \"/nonexistent/ca.pem\"\n\
         [clouds.os.auth]\nauth_url = \"https://keystone.example/v3\"\napplication_credential_id = \"x\"\n\
         application_credential_secret = \"y\"\n[groups.g]\ncloud = \"os\"\nmax_size = 1\n\
         [groups.g.machine]\n{PLAIN_MACHINE}"
    );
    let config = flotilla::config::Config::parse(&text, "test.toml", std::path::Path::new(".")).unwrap();
    let problems = flotilla::build_drivers(&config).unwrap_err().to_string();
    assert!(problems.contains("clouds.os: cannot read CA bundle /nonexistent/ca.pem"), "{problems}");
}

#[tokio::test]
async fn ports_are_made_for_each_server_and_removed_with_it_or_with_a_failed_create() {
    let fake = Fake::start().await;
    let machine = r#"flavor = "io.70GB"
image = "fedora-coreos-36.20220522.3.0-openstack.x86_64.qcow2"
[[groups.workers.machine.ports]]
network = "k3s-net"
security_groups = ["k3s-nodes"]
allowed_address_pairs = ["10.42.0.0/16"]
"#;
    let driver = driver_of(&config_text(&fake, "", machine));
    let m = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let ports = fake.ports();
    assert_eq!(ports.len(), 1);
    assert_eq!(ports[0].device_id.as_deref(), Some(m.id.as_str()));
    assert_eq!(
        ports[0].body,
        json!({ "port": {
            "network_id": fake::NETWORK_ID,
            "name": "dev-cluster-workers-aaaaa-port0",
            "description": "flotilla dev-cluster/workers",
            "security_groups": [fake::SG_NODES_ID],
            "allowed_address_pairs": [{ "ip_address": "10.42.0.0/16" }],
        }})
    );
    assert_eq!(fake.servers()[0].body["server"]["networks"], json!([{ "port": ports[0].id }]));

    driver.delete(&MachineRef::from(&m)).await.unwrap();
    assert!(fake.servers().is_empty());
    assert!(fake.ports().is_empty(), "the port goes with its server");

    fake.set_quota(Some(0), 403);
    let e = driver.create("workers", "dev-cluster-workers-bbbbb").await.unwrap_err();
    assert!(matches!(e, Error::OutOfResources(_)), "{e:?}");
    assert!(fake.ports().is_empty(), "a failed create leaves no port behind");
    assert_eq!(fake.count(Method::POST, "/network/v2.0/ports"), 2);
    fake.assert_clean();
}

#[tokio::test]
async fn cluster_autoscaler_sees_flavor_capacity_and_boots_that_found_no_host() {
    use flotilla::proto::{externalgrpc as pb, k8s};
    use prost::Message;

    let fake = Fake::start().await;
    let (server, mut c) = support::start(&config_text(&fake, "", PLAIN_MACHINE)).await;
    let r = c
        .node_group_template_node_info(pb::NodeGroupTemplateNodeInfoRequest { id: "workers".into() })
        .await
        .unwrap()
        .into_inner();
    let bytes = if r.node_bytes.is_empty() { r.node_info } else { r.node_bytes };
    let node = k8s::Node::decode(bytes.as_slice()).unwrap();
    let status = node.status.unwrap();
    let capacity = |k: &str| status.capacity.get(k).map(|q| q.string.clone());
    assert_eq!(capacity("cpu").as_deref(), Some("4"));
    assert_eq!(capacity("memory").as_deref(), Some("16Gi"));
    assert_eq!(capacity("ephemeral-storage").as_deref(), Some("70Gi"));
    let labels = node.metadata.unwrap().labels;
    assert_eq!(labels.get("node.kubernetes.io/instance-type").map(String::as_str), Some("io.70GB"));

    fake.fail_next_boot("No valid host was found. There are not enough hosts available.");
    support::increase(&mut c, "workers", 1).await.unwrap();
    let error = support::eventually(LIMIT, "the failed boot to be reported", || {
        let mut c = c.clone();
        async move {
            let _ = support::refresh(&mut c).await;
            support::nodes(&mut c, "workers").await.into_iter().find_map(|(_, _, e)| e)
        }
    })
    .await;
    assert_eq!(error.error_code, "NO_VALID_HOST");
    assert_eq!(error.instance_error_class, ErrorClass::OutOfResources.wire_value());
    server.stop().await.unwrap();
    fake.assert_clean();
}

#[tokio::test]
async fn a_private_clouds_ca_bundle_or_insecure_lets_the_driver_in() {
    let fake = Fake::start_tls().await;
    let ca = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fakes/openstack/tls/ca.pem");
    let trusted = driver_of(&config_text(&fake, &format!("ca_file = \"{ca}\""), PLAIN_MACHINE));
    trusted.list().await.unwrap();
    let untrusted = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    let e = untrusted.list().await.unwrap_err();
    assert!(matches!(e, Error::Unavailable(_)), "{e:?}");
    let insecure = driver_of(&config_text(&fake, "insecure = true", PLAIN_MACHINE));
    insecure.list().await.unwrap();
    assert_eq!(fake.tokens_issued(), 2, "only the trusting drivers got a token");
    fake.assert_clean();
}

#[tokio::test]
async fn endpoints_come_from_the_catalog_entry_of_the_configured_region_and_interface() {
    let fake = Fake::start().await;
    add(&fake, "dev-cluster-workers-aaaaa", &ours("workers"));
    let internal = driver_of(&config_text(&fake, "interface = \"internal\"", PLAIN_MACHINE));
    assert_eq!(internal.list().await.unwrap().len(), 1);
    let two = driver_of(&config_text(&fake, "", PLAIN_MACHINE).replace("\"RegionOne\"", "\"RegionTwo\""));
    assert_eq!(two.list().await.unwrap().len(), 1);
    // RegionTwo has Nova but no Glance in the catalog.
    let e = two.create("workers", "dev-cluster-workers-bbbbb").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("no image endpoint")), "{e:?}");
    let paths: Vec<String> =
        fake.requests().into_iter().filter(|r| r.path.ends_with("/servers/detail")).map(|r| r.path).collect();
    assert_eq!(paths, ["/internal/compute/v2.1/servers/detail", "/region-two/compute/v2.1/servers/detail"]);
    fake.assert_clean();
}

#[tokio::test]
async fn a_listing_that_does_not_advance_is_an_error_not_a_hang() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    let stuck = json!({
        "servers": [{ "id": "s-1", "name": "dev-cluster-workers-aaaaa", "status": "ACTIVE",
                      "metadata": { META_CLUSTER: CLUSTER, META_GROUP: "workers" } }],
        "servers_links": [{ "rel": "next", "href": format!("{}/compute/v2.1/servers/detail?limit=2&marker=s-1", fake.base) }],
    });
    fake.inject(Method::GET, "/compute/v2.1/servers/detail", 200, stuck.clone());
    fake.inject(Method::GET, "/compute/v2.1/servers/detail", 200, stuck);
    let e = driver.list().await.unwrap_err();
    assert!(matches!(&e, Error::Other(m) if m.contains("marker s-1")), "{e:?}");
    assert_eq!(fake.count(Method::GET, "/servers/detail"), 2);
    fake.assert_clean();
}

#[tokio::test]
async fn user_data_over_novas_limit_is_refused_before_any_call() {
    let fake = Fake::start().await;
    let machine = format!("{PLAIN_MACHINE}user_data = \"{{% for i in range(50000) %}}x{{% endfor %}}\"\n");
    let driver = driver_of(&config_text(&fake, "", &machine));
    let e = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("Nova accepts at most 65535")), "{e:?}");
    assert_eq!(fake.count(Method::POST, "/compute/v2.1/servers"), 0);
    fake.assert_clean();
}

// Keystone version discovery: an auth_url without /v3, as DevStack and many clouds.yaml files
// give it, is resolved the way keystoneauth (and so the OpenStack CLI) does.

#[tokio::test]
async fn an_auth_url_without_v3_is_discovered_from_the_version_document() {
    for (discovery, suffix) in [
        (fake::Discovery::MultipleChoices, ""),
        (fake::Discovery::MultipleChoices, "/"),
        (fake::Discovery::Ok, ""),
        (fake::Discovery::OkList, "/"),
    ] {
        let fake = Fake::start().await;
        fake.set_discovery(discovery);
        add(&fake, "dev-cluster-workers-aaaaa", &ours("workers"));
        let text = config_text(&fake, "", PLAIN_MACHINE)
            .replace(&fake.auth_url(), &format!("{}{suffix}", fake.unversioned_auth_url()));
        let driver = driver_of(&text);
        assert_eq!(driver.list().await.unwrap().len(), 1, "{discovery:?}");
        // A new token later needs no new discovery.
        fake.revoke_tokens();
        driver.list().await.unwrap();
        let identity: Vec<String> = fake
            .requests()
            .into_iter()
            .filter(|r| r.path.starts_with("/identity"))
            .map(|r| format!("{} {} {}", r.method, r.path, r.status))
            .collect();
        assert_eq!(
            identity,
            [
                // The trailing slash of an auth_url is dropped, as the CLI does.
                format!("GET /identity {}", if discovery == fake::Discovery::MultipleChoices { 300 } else { 200 }),
                "POST /identity/v3/auth/tokens 201".to_owned(),
                "POST /identity/v3/auth/tokens 201".to_owned(),
            ],
            "{discovery:?}"
        );
        fake.assert_clean();
    }
}

#[tokio::test]
async fn a_keystone_without_v3_is_a_clear_error() {
    let fake = Fake::start().await;
    fake.set_discovery(fake::Discovery::OnlyV2);
    let text = config_text(&fake, "", PLAIN_MACHINE).replace(&fake.auth_url(), &fake.unversioned_auth_url());
    let driver = driver_of(&text);
    let e = driver.check().await.unwrap_err();
    assert!(matches!(&e, Error::InvalidRequest(m) if m.contains("offers no identity v3 API (it offers: v2.0)")), "{e}");
    assert_eq!(fake.tokens_issued(), 0);
    fake.assert_clean();
}

// Plain http only to loopback, unless the user opts in.

#[test]
fn plain_http_to_a_remote_keystone_is_refused_unless_opted_in() {
    let text = |auth_url: &str, extra: &str| {
        format!(
            "cluster_name = \"c\"\n[clouds.os]\ndriver = \"openstack\"\n{extra}\n[clouds.os.auth]\n\
             auth_url = \"{auth_url}\"\napplication_credential_id = \"x\"\napplication_credential_secret = \"y\"\n\
             [groups.g]\ncloud = \"os\"\nmax_size = 1\n[groups.g.machine]\n{PLAIN_MACHINE}"
        )
    };
    let problems = |t: String| {
        let config = flotilla::config::Config::parse(&t, "test.toml", std::path::Path::new(".")).unwrap();
        flotilla::build_drivers(&config).err().map(|p| p.items).unwrap_or_default()
    };
    for url in
        ["http://keystone.example:5000/v3", "http://127.0.0.1.example.com/identity", "http://localhost.example.com/v3"]
    {
        let p = problems(text(url, ""));
        assert_eq!(p.len(), 1, "{url}: {p:?}");
        assert_eq!(p[0].path, "clouds.os.auth.auth_url");
        assert!(p[0].message.contains("plain http://") && p[0].message.contains("allow_plain_http = true"), "{p:?}");
    }
    assert!(problems(text("http://keystone.example:5000/v3", "allow_plain_http = true")).is_empty());
    assert!(problems(text("http://127.0.0.1:5000/v3", "")).is_empty());
    assert!(problems(text("https://keystone.example:5000/v3", "")).is_empty());

    // The same from a credentials file: the problem names the key that points at it.
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("openrc.yaml");
    std::fs::write(
        &file,
        "OS_AUTH_URL: http://keystone.example:5000/v3\nOS_USERNAME: u\nOS_PASSWORD: p\nOS_USER_DOMAIN_NAME: Default\n",
    )
    .unwrap();
    let t = format!(
        "cluster_name = \"c\"\n[clouds.os]\ndriver = \"openstack\"\ncredentials_file = \"{}\"\n\
         [groups.g]\ncloud = \"os\"\nmax_size = 1\n[groups.g.machine]\n{PLAIN_MACHINE}",
        file.display()
    );
    let p = problems(t);
    assert!(p.len() == 1 && p[0].path == "clouds.os.credentials_file", "{p:?}");
}

// YAML values are the text they are written as.

#[test]
fn numeric_looking_credentials_are_read_as_the_text_they_are() {
    let file = "OS_AUTH_URL: https://keystone.example/v3\nOS_USERNAME: 0010\nOS_PASSWORD: 1.10\n\
                OS_USER_DOMAIN_NAME: Default\nOS_PROJECT_NAME: 0x1F\nOS_REGION_NAME: 1e3\nOS_IDENTITY_API_VERSION: 3\n";
    let c = Credentials::from_credentials_file(file).unwrap();
    let flotilla::driver::openstack::auth::Method::Password { user, password, project: Some(project) } = &c.method
    else {
        panic!("{:?}", c.method)
    };
    assert_eq!(password.expose(), "1.10");
    assert_eq!(user.name.as_deref(), Some("0010"));
    assert_eq!(project.name.as_deref(), Some("0x1F"));
    assert_eq!(c.region.as_deref(), Some("1e3"));

    let clouds = "clouds:\n  odd:\n    - not: a map\n  mine:\n    region_name: 2.50\n    verify: false\n    \
                  identity_api_version: 3\n    auth:\n      auth_url: https://keystone.example/v3\n      \
                  username: admin\n      password: 0x1F\n      user_domain_name: Default\n      project_id: 1.10\n";
    let c = Credentials::from_clouds_yaml(clouds, "mine").unwrap();
    let flotilla::driver::openstack::auth::Method::Password { password, project: Some(project), .. } = &c.method else {
        panic!("{:?}", c.method)
    };
    assert_eq!(password.expose(), "0x1F");
    assert_eq!(project.id.as_deref(), Some("1.10"));
    assert_eq!(c.region.as_deref(), Some("2.50"));
    assert!(c.insecure);
    let missing = Credentials::from_clouds_yaml(clouds, "theirs").unwrap_err();
    assert!(missing.contains("odd, mine"), "{missing}");
}

// One error code per cause.

#[tokio::test]
async fn a_quota_error_has_one_code_whether_nova_refuses_the_create_or_fails_the_server() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    // Refused by the create call (what the core reports for a failed create).
    fake.set_quota(Some(0), 403);
    let refused = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap_err().to_create_failure();
    // Accepted, then failed by Nova.
    fake.set_quota(None, 403);
    fake.fail_next_boot("Quota exceeded for cores: Requested 4, but already used 20 of 20 cores");
    let m = driver.create("workers", "dev-cluster-workers-bbbbb").await.unwrap();
    let listed = driver.list().await.unwrap();
    let MachineState::Failed(failed) = &listed.iter().find(|l| l.id == m.id).unwrap().state else {
        panic!("{listed:?}")
    };
    assert_eq!((refused.class, refused.code.as_str()), (ErrorClass::OutOfResources, "OUT_OF_RESOURCES"));
    assert_eq!((failed.class, failed.code.as_str()), (refused.class, refused.code.as_str()));
    fake.assert_clean();
}

#[tokio::test]
async fn a_delete_whose_answer_was_lost_is_sent_again_and_counts_as_done() {
    let fake = Fake::start().await;
    let driver = driver_of(&config_text(&fake, "", PLAIN_MACHINE));
    let m = driver.create("workers", "dev-cluster-workers-aaaaa").await.unwrap();
    let path = format!("/compute/v2.1/servers/{}", m.id);
    fake.lose_next_answer(Method::DELETE, &path, 504, json!("504 Gateway Time-out"));
    let done = driver.delete(&MachineRef::from(&m)).await;
    // Nova deleted it the first time; the repeat finds it gone, which the core counts as done.
    assert!(matches!(done, Ok(()) | Err(Error::NotFound(_))), "{done:?}");
    assert!(fake.servers().is_empty());
    assert_eq!(fake.count(Method::DELETE, &m.id), 2);
    // A create is never sent twice, whatever its answer.
    fake.lose_next_answer(
        Method::POST,
        "/compute/v2.1/servers",
        503,
        json!({"computeFault": {"code": 503, "message": "Service Unavailable"}}),
    );
    driver.create("workers", "dev-cluster-workers-bbbbb").await.unwrap_err();
    assert_eq!(fake.count(Method::POST, "/compute/v2.1/servers"), 2, "one create each, no repeat");
    fake.assert_clean();
}
