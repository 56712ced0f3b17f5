//! `flotilla import kamatera`: the in-tree provider's INI cloud-config (written from its tables
//! and its example Secret, with the mistakes gcfg accepts) becomes a configuration that passes
//! `check-config` with the real Kamatera driver and adopts the provider's servers: served
//! against the faithful fake Kamatera API, the servers the provider made (its names, its tags)
//! are the groups' instances, under the provider ids their Nodes carry, and nothing is created.
//!
//! Regenerate the golden files with `FLOTILLA_UPDATE_GOLDEN=1 cargo test --test import_kamatera`.

#[path = "fakes/kamatera/mod.rs"]
mod fake;
mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use flotilla::{
    config::Config,
    import::{self, Error, Kind, Request, out::Value},
    proto::externalgrpc as pb,
};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn dir() -> PathBuf {
    PathBuf::from("tests/import/kamatera")
}

fn request_for(path: PathBuf, output_dir: &Path) -> Request {
    Request {
        kind: Kind::Kamatera,
        files: vec![path],
        output_dir: output_dir.into(),
        cluster_name: None,
        overrides: vec![],
    }
}

fn golden(path: &Path, actual: &str) {
    if std::env::var_os("FLOTILLA_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} differs from the import at line {}:\n  golden: {:?}\n  actual: {:?}",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

fn problems(text: &str) -> Vec<import::Problem> {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cloud-config.ini");
    std::fs::write(&path, text).unwrap();
    match import::import(&request_for(path, tmp.path())) {
        Err(Error::Input(p)) => p,
        other => panic!("expected problems, got {:?}", other.map(|i| i.document.render())),
    }
}

const MINIMAL: &str = "kamatera-api-client-id = id\nkamatera-api-secret = s\ndefault-datacenter = EU\n\
    default-image = ubuntu_server_24.04_64-bit\ndefault-cpu = 2A\ndefault-ram = 4096\ndefault-disk = size=50\n\
    default-network = name=wan,ip=auto\ndefault-script-base64 = IyEvYmluL3NoCmVjaG8gaGkK\n";

#[tokio::test]
async fn the_in_tree_cloud_config_becomes_groups_that_adopt_the_providers_servers() {
    let i = import::import(&request_for(dir().join("cloud-config.ini"), &dir())).unwrap();
    // Golden configuration, report and init script; the real check-config accepts them.
    if std::env::var_os("FLOTILLA_UPDATE_GOLDEN").is_some() {
        import::write_files(&i, &dir()).unwrap();
    }
    golden(&dir().join("cloud-config.expected.toml"), &i.document.render());
    golden(
        &dir().join("cloud-config.expected.report.txt"),
        &import::instructions(&i, Some(Path::new("flotilla.toml"))),
    );
    for f in &i.files {
        golden(&dir().join(&f.name), &f.content);
    }
    let mut check = Command::new(BIN);
    check.args(["check-config", "--config"]).arg(dir().join("cloud-config.expected.toml"));
    for var in i.document.secret_vars() {
        check.env(var, "Placeholder123");
    }
    let out = check.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // No secret in the configuration or the report; the join token is only in the 0600 file.
    let text = i.document.render();
    let report = import::instructions(&i, None);
    for secret in
        ["9ii88h7g6f55555ee4444444dd33eee2", "1a222bbb3ccc44d5555e6ff77g88hh9i", "Aa123456789!", "K10c8a6bd2d1d9e1b4a"]
    {
        assert!(!text.contains(secret) && !report.contains(secret), "{secret} leaked");
    }
    assert!(i.files[0].content.contains("K10c8a6bd2d1d9e1b4a::server"));
    assert!(i.files[0].content.starts_with("{% raw %}#!/bin/bash"), "`${{#NICS[@]}}` is kept raw");

    // Every key of the file is accounted for.
    for section in import::gcfg::parse(&std::fs::read_to_string(dir().join("cloud-config.ini")).unwrap()).unwrap() {
        let head = match &section.sub {
            Some(s) => format!("[nodegroup \"{s}\"]"),
            None => "[global]".into(),
        };
        for v in section.vars {
            assert!(i.report.accounts_for(&format!("{head} {}", v.name)), "{head} {}", v.name);
        }
    }

    // The round trip, against the fake Kamatera API holding the provider's servers.
    let fake = fake::Fake::start().await;
    {
        let mut s = fake.state();
        s.add_server("prod-0a1b2c3d4e5", "on", &["k8sca-Prod_EU", "k8scang-workers"]);
        s.add_server("prod-hc-9f8e7d6c5b4", "on", &["k8sca-Prod_EU", "k8scang-high_cpu"]);
        s.add_server("prod-hc-1122334455a", "on", &["k8sca-Prod_EU", "k8scang-high_cpu"]);
        s.add_server("prod-other-cluster", "on", &["k8sca-Staging", "k8scang-workers"]);
        s.add_server("prod-hand-made", "on", &[]);
    }
    let scratch = tempfile::tempdir().unwrap();
    let mut secrets = std::collections::BTreeMap::from([
        ("KAMATERA_API_CLIENT_ID", fake::CLIENT_ID.to_owned()),
        ("KAMATERA_API_SECRET", fake::SECRET.to_owned()),
    ]);
    secrets.insert("KAMATERA_ROOT_PASSWORD", "Placeholder123".into());
    for (var, value) in &secrets {
        std::fs::write(scratch.path().join(var), value).unwrap();
    }
    let mut table: toml::Table = i
        .document
        .render_with(&|var| format!("{{ file = \"{}\" }}", scratch.path().join(var).display()))
        .parse()
        .unwrap();
    table["clouds"]["kamatera"].as_table_mut().unwrap().insert("api_url".into(), fake.url().into());
    // The burst group's warm pool needs Node cleanup, so a Kubernetes API; warm pools on
    // Kamatera are tested in tests/warm_pool.rs, adoption here.
    table["clouds"]["kamatera"].as_table_mut().unwrap().remove("node_cleanup").expect("the import set node_cleanup");
    table["groups"]["burst"].as_table_mut().unwrap().remove("warm_pool").expect("the import set a warm pool");
    table.insert(
        "server".into(),
        toml::toml! { grpc_listen = "127.0.0.1:0"
        http_listen = "off"
        shutdown_grace = "1s" }
        .into(),
    );
    let config =
        Config::parse(&toml::to_string(&table).unwrap(), "imported.toml", &dir()).unwrap_or_else(|p| panic!("{p}"));
    let drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("{p}"));
    let (running, mut c) = support::start_with(config, drivers).await;
    let mut groups: Vec<_> = c
        .node_groups(pb::NodeGroupsRequest {})
        .await
        .unwrap()
        .into_inner()
        .node_groups
        .into_iter()
        .map(|g| (g.id, g.min_size, g.max_size))
        .collect();
    groups.sort();
    assert_eq!(
        groups,
        [
            ("burst".to_owned(), 0, 6),
            ("gpu-pool".to_owned(), 0, 2),
            ("high-cpu".to_owned(), 0, 4),
            ("workers".to_owned(), 1, 8)
        ]
    );
    let ids = support::wait_running(&c, "high-cpu", 2, std::time::Duration::from_secs(20)).await;
    assert_eq!(ids, ["kamatera://prod-hc-1122334455a", "kamatera://prod-hc-9f8e7d6c5b4"]);
    let ids = support::wait_running(&c, "workers", 1, std::time::Duration::from_secs(20)).await;
    assert_eq!(ids, ["kamatera://prod-0a1b2c3d4e5"]);
    let node = pb::ExternalGrpcNode {
        provider_id: "kamatera://prod-hc-9f8e7d6c5b4".into(),
        name: "prod-hc-9f8e7d6c5b4".into(),
        ..Default::default()
    };
    let g = c.node_group_for_node(pb::NodeGroupForNodeRequest { node: Some(node) }).await.unwrap().into_inner();
    assert_eq!(g.node_group.unwrap().id, "high-cpu", "the provider's Node still matches its group");
    assert!(fake.state().calls("POST", "/service/server").is_empty(), "nothing is recreated");
    running.stop().await.unwrap();
    fake.assert_clean();
}

#[test]
fn the_secret_manifest_of_the_in_tree_example_is_read_and_its_bad_key_named() {
    let i = import::import(&request_for(dir().join("secret.yaml"), &dir())).unwrap();
    let d = &i.document.root;
    assert_eq!(d.get("cluster_name"), Some(&Value::String("aaabbb".into())));
    assert_eq!(d.get("groups.highcpu.machine.cpu"), Some(&Value::String("2D".into())));
    assert_eq!(d.get("groups.highram.machine.ram"), Some(&Value::Integer(4096)));
    assert_eq!(d.get("groups.default.min_size"), Some(&Value::Integer(1)));
    assert_eq!(d.get("groups.default.max_size"), Some(&Value::Integer(10)));
    assert_eq!(d.get("clouds.kamatera.defaults.daily_backup"), Some(&Value::Bool(false)));
    // The upstream example's own mistake: `default-script` is not a key (the provider refuses the
    // file); the import lists it with the key it meant.
    let line = i.report.lines.iter().find(|l| l.key == "[global] default-script").unwrap();
    assert!(
        matches!(&line.fate, import::report::Fate::Dropped(why) if why.contains("did you mean default-script-base64?"))
    );
    let tmp = tempfile::tempdir().unwrap();
    let check = import::verify(&i, tmp.path()).unwrap_err().to_string();
    assert!(check.contains("init script is required"), "without a script the driver refuses it:\n{check}");
}

#[test]
fn names_longer_than_the_providers_15_characters_are_refused() {
    let p = problems(&format!("[global]\ncluster-name = production-cluster\n{MINIMAL}[nodegroup \"ng\"]\n"));
    assert_eq!(p[0].key, "[global] cluster-name");
    assert!(p[0].message.contains("at most 15"), "{}", p[0]);
    let p = problems(&format!("[global]\ncluster-name = prod\n{MINIMAL}[nodegroup \"a-very-long-group\"]\n"));
    assert_eq!(p[0].key, "[nodegroup \"a-very-long-group\"]");
    assert!(p[0].message.contains("17 characters"), "{}", p[0]);
}

#[test]
fn a_cloud_config_without_credentials_or_cluster_name_names_each_missing_key() {
    let p = problems("[global]\ndefault-cpu = 2A\n[nodegroup \"ng\"]\n");
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["[global] cluster-name", "[global] kamatera-api-client-id", "[global] kamatera-api-secret"]);
    let p = problems("[global]\ncluster-name = prod\nkamatera-api-client-id = i\nkamatera-api-secret = s\n");
    assert_eq!(p[0].key, "[nodegroup \"NAME\"]");
}

#[test]
fn the_mistakes_gcfg_accepts_are_imported_as_the_provider_ran_them() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cloud-config.ini");
    std::fs::write(
        &path,
        format!(
            "[GLOBAL]\nCluster-Name = prod\n{MINIMAL}default-dailybackup\ndefault-password = Ab1#comment\n\
             [nodegroup \"ng\"]\ndisk = size=10\ndisk\ndisk = size=20\ncpu = 2a\nmanaged = ON\n\
             poweroff-on-scale-down = T\n"
        ),
    )
    .unwrap();
    let i = import::import(&request_for(path, tmp.path())).unwrap();
    let d = &i.document.root;
    // A bare boolean is true; a bare multi-valued key empties the list; the type letter is
    // upper-cased; gcfg booleans ignore case; Go's ParseBool reads "T".
    assert_eq!(d.get("clouds.kamatera.defaults.daily_backup"), Some(&Value::Bool(true)));
    assert_eq!(d.get("groups.ng.machine.disks"), Some(&Value::Array(vec!["size=20".into()])));
    assert_eq!(d.get("groups.ng.machine.cpu"), Some(&Value::String("2A".into())));
    assert_eq!(d.get("groups.ng.machine.managed"), Some(&Value::Bool(true)));
    assert!(i.report.accounts_for("[nodegroup \"ng\"] poweroff-on-scale-down"));
    // The password was cut at '#' by gcfg: the report says so, without the value.
    assert!(i.report.notes.iter().any(|n| n.contains("default-password is cut short")), "{:?}", i.report.notes);
    assert!(!import::instructions(&i, None).contains("Ab1"));
}

#[test]
fn power_off_on_scale_down_becomes_a_warm_pool_with_node_cleanup() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cloud-config.ini");
    std::fs::write(
        &path,
        format!(
            "[global]\ncluster-name = prod\n{MINIMAL}poweroff-on-scale-down = yes\npoweron-on-scale-up = yes\n\
             [nodegroup \"unlimited\"]\nmax-size = 5\n\
             [nodegroup \"capped\"]\nmax-size = 5\npoweroff-on-scale-down-max-servers = 2\n\
             [nodegroup \"above\"]\nmax-size = 2\npoweroff-on-scale-down-max-servers = 9\n\
             [nodegroup \"off\"]\npoweroff-on-scale-down = false\npoweroff-on-scale-down-max-servers = 2\n"
        ),
    )
    .unwrap();
    let i = import::import(&request_for(path, tmp.path())).unwrap();
    let d = &i.document.root;
    // max-servers 0 (the provider's "no limit") is max_size; a limit above max_size is max_size.
    assert_eq!(d.get("groups.unlimited.warm_pool"), Some(&Value::Integer(5)));
    assert_eq!(d.get("groups.capped.warm_pool"), Some(&Value::Integer(2)));
    assert_eq!(d.get("groups.above.warm_pool"), Some(&Value::Integer(2)));
    assert_eq!(d.get("groups.off.warm_pool"), None);
    assert_eq!(d.get("clouds.kamatera.node_cleanup"), Some(&Value::Bool(true)));
    for key in [
        "[global] poweroff-on-scale-down",
        "[global] poweron-on-scale-up",
        "[nodegroup \"capped\"] poweroff-on-scale-down-max-servers",
        "[nodegroup \"off\"] poweroff-on-scale-down",
        "[nodegroup \"off\"] poweroff-on-scale-down-max-servers",
    ] {
        assert!(i.report.accounts_for(key), "{key} not in the report");
    }
    let text = import::instructions(&i, None);
    assert!(text.contains("nodeCleanup: {enabled: true}"), "{text}");
    // The result is a configuration Flotilla accepts (warm_pool needs node_cleanup).
    let toml = i.document.render();
    Config::parse(&toml, "imported.toml", tmp.path()).unwrap_or_else(|p| panic!("{p}\n{toml}"));
}

#[test]
fn power_on_without_power_off_keeps_no_pool() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("cloud-config.ini");
    std::fs::write(
        &path,
        format!("[global]\ncluster-name = prod\n{MINIMAL}[nodegroup \"ng\"]\npoweron-on-scale-up = 1\n"),
    )
    .unwrap();
    let i = import::import(&request_for(path, tmp.path())).unwrap();
    assert_eq!(i.document.root.get("groups.ng.warm_pool"), None);
    assert_eq!(i.document.root.get("clouds.kamatera.node_cleanup"), None);
    let line = i.report.lines.iter().find(|l| l.key == "[nodegroup \"ng\"] poweron-on-scale-up").unwrap();
    assert!(format!("{:?}", line.fate).contains("POWERED_OFF"), "{line:?}");
}
