//! `flotilla import`: realistic inputs written from the seeds' own tables and examples (with
//! the mistakes their readers accept), golden outputs under `tests/import/<kind>/`, the output
//! checked by the real `check-config`, and a round trip: the imported configuration served over
//! gRPC shows cluster-autoscaler the seed's groups with the seed's bounds and timers.
//!
//! Regenerate the golden files with `FLOTILLA_UPDATE_GOLDEN=1 cargo test --test import`.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use flotilla::{
    config::Config,
    import::{self, Error, Import, Kind, Request},
    proto::externalgrpc as pb,
};

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

fn dir(kind: Kind) -> PathBuf {
    Path::new("tests/import").join(kind.to_string())
}

fn request(kind: Kind, files: &[&str], overrides: &[(&str, &str)]) -> Request {
    Request {
        kind,
        files: files.iter().map(|f| dir(kind).join(f)).collect(),
        output_dir: dir(kind),
        cluster_name: None,
        overrides: overrides.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
    }
}

fn run(kind: Kind, files: &[&str], overrides: &[(&str, &str)]) -> Import {
    import::import(&request(kind, files, overrides)).unwrap_or_else(|e| panic!("import {kind} {files:?}: {e}"))
}

fn problems(kind: Kind, files: &[&str], overrides: &[(&str, &str)]) -> Vec<import::Problem> {
    match import::import(&request(kind, files, overrides)) {
        Err(Error::Input(p)) => p,
        other => panic!("expected problems in the input, got {:?}", other.map(|i| i.document.render())),
    }
}

/// Compares with (or, with FLOTILLA_UPDATE_GOLDEN set, writes) a golden file.
fn golden(path: &Path, actual: &str) {
    if std::env::var_os("FLOTILLA_UPDATE_GOLDEN").is_some() {
        std::fs::write(path, actual).unwrap();
        return;
    }
    let expected = std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e} (FLOTILLA_UPDATE_GOLDEN=1 writes it)", path.display()));
    if expected != actual {
        let first = expected.lines().zip(actual.lines()).position(|(a, b)| a != b).unwrap_or(0);
        panic!(
            "{} differs from the import, first at line {}:\n  golden: {:?}\n  actual: {:?}\n(FLOTILLA_UPDATE_GOLDEN=1 rewrites it)",
            path.display(),
            first + 1,
            expected.lines().nth(first),
            actual.lines().nth(first)
        );
    }
}

/// Checks the configuration and the report against `<name>.toml` and `<name>.report.txt`, and
/// the configuration with the real `flotilla check-config` (secrets set in its environment).
fn check_golden(kind: Kind, import: &Import, name: &str) {
    let toml_path = dir(kind).join(format!("{name}.toml"));
    golden(&toml_path, &import.document.render());
    golden(
        &dir(kind).join(format!("{name}.report.txt")),
        &import::instructions(import, Some(Path::new("flotilla.toml"))),
    );
    let mut cmd = Command::new(BIN);
    cmd.args(["check-config", "--config"]).arg(&toml_path);
    for var in import.document.secret_vars() {
        cmd.env(var, "stand-in-for-the-real-secret");
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "check-config {}: {}{}",
        toml_path.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

fn assert_no_secret(import: &Import, secrets: &[&str]) {
    let text = import.document.render();
    let report = import::instructions(import, None);
    for s in secrets {
        assert!(!text.contains(s), "secret {s:?} in the configuration:\n{text}");
        assert!(!report.contains(s), "secret {s:?} in the report:\n{report}");
    }
}

/// What cluster-autoscaler sees: (id, min, max) of every group, and the options of one.
async fn served(
    kind: Kind,
    import: &Import,
    group: &str,
) -> (Vec<(String, i32, i32)>, Option<pb::NodeGroupAutoscalingOptions>) {
    let scratch = tempfile::tempdir().unwrap();
    for var in import.document.secret_vars() {
        std::fs::write(scratch.path().join(&var), "stand-in").unwrap();
    }
    let text = import.document.render_with(&|var| format!("{{ file = \"{}\" }}", scratch.path().join(var).display()));
    // No traffic leaves the machine: every cloud endpoint points at a closed loopback port.
    let mut table: toml::Table = text.parse().unwrap();
    for (_, cloud) in table["clouds"].as_table_mut().unwrap().iter_mut() {
        let cloud = cloud.as_table_mut().unwrap();
        match cloud["driver"].as_str().unwrap() {
            "docker" => {
                cloud.insert("host".into(), format!("unix://{}/absent.sock", scratch.path().display()).into());
            }
            "proxmox" => {
                cloud.insert("url".into(), "https://127.0.0.1:1".into());
            }
            "slicer" => {
                cloud.insert("url".into(), "http://127.0.0.1:1".into());
            }
            "openstack" => {
                let creds = scratch.path().join("credentials.yaml");
                std::fs::write(&creds, "OS_AUTH_URL: http://127.0.0.1:1/v3\nOS_USERNAME: u\nOS_PASSWORD: p\nOS_USER_DOMAIN_NAME: d\nOS_PROJECT_NAME: p\n")
                    .unwrap();
                cloud.insert("credentials_file".into(), creds.display().to_string().into());
            }
            other => panic!("no loopback stand-in for driver {other}"),
        }
    }
    table.insert(
        "server".into(),
        toml::toml! { grpc_listen = "127.0.0.1:0"
        http_listen = "off"
        shutdown_grace = "1s" }
        .into(),
    );
    let config = Config::parse(&toml::to_string(&table).unwrap(), "imported.toml", &dir(kind))
        .unwrap_or_else(|p| panic!("imported configuration: {p}"));
    let drivers = flotilla::build_drivers(&config).unwrap_or_else(|p| panic!("drivers: {p}"));
    let (server, mut c) = support::start_with(config, drivers).await;
    let groups = c.node_groups(pb::NodeGroupsRequest {}).await.unwrap().into_inner().node_groups;
    let groups = groups.into_iter().map(|g| (g.id, g.min_size, g.max_size)).collect();
    let defaults = pb::NodeGroupAutoscalingOptions {
        scale_down_utilization_threshold: 0.5,
        max_node_provision_duration: Some(prost_types::Duration { seconds: 900, nanos: 0 }),
        scale_down_unneeded_duration: Some(prost_types::Duration { seconds: 600, nanos: 0 }),
        scale_down_unready_duration: Some(prost_types::Duration { seconds: 1200, nanos: 0 }),
        ..Default::default()
    };
    let options = c
        .node_group_get_options(pb::NodeGroupAutoscalingOptionsRequest { id: group.into(), defaults: Some(defaults) })
        .await
        .ok()
        .and_then(|r| r.into_inner().node_group_autoscaling_options);
    server.stop().await.unwrap();
    (groups, options)
}

fn seconds(d: &Option<prost_types::Duration>) -> i64 {
    d.as_ref().map(|d| d.seconds).unwrap_or(-1)
}

// ---------------------------------------------------------------- Docker

#[tokio::test]
async fn docker_config_yaml_becomes_a_docker_cloud_whose_group_has_the_seeds_limits() {
    let i = run(Kind::Docker, &["config.yaml"], &[]);
    check_golden(Kind::Docker, &i, "config.expected");
    assert_eq!(
        i.report.flag_args(),
        ["--scan-interval=30s", "--scale-down-delay-after-delete=3m", "--kubeconfig=/app/kubeconfig/kubeconfig.yaml"]
    );
    let (groups, options) = served(Kind::Docker, &i, "workers").await;
    assert_eq!(groups, [("workers".to_owned(), 2, 6)]);
    let o = options.expect("the group answers GetOptions");
    assert_eq!(o.scale_down_utilization_threshold, 0.3);
    assert_eq!(seconds(&o.max_node_provision_duration), 900, "CA's own default is kept");
}

#[test]
fn every_key_of_the_docker_config_is_accounted_for() {
    let i = run(Kind::Docker, &["config.yaml"], &[]);
    let text = std::fs::read_to_string(dir(Kind::Docker).join("config.yaml")).unwrap();
    let v: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
    fn leaves(prefix: &str, v: &serde_yaml::Value, out: &mut Vec<String>) {
        match v.as_mapping() {
            Some(m) => m.iter().for_each(|(k, v)| {
                let k = k.as_str().unwrap();
                leaves(&if prefix.is_empty() { k.to_owned() } else { format!("{prefix}.{k}") }, v, out)
            }),
            None => out.push(prefix.to_owned()),
        }
    }
    let mut keys = Vec::new();
    leaves("", &v, &mut keys);
    assert!(keys.len() >= 15);
    for k in keys {
        assert!(i.report.accounts_for(&k), "{k} is not in the report");
    }
}

#[test]
fn docker_mistakes_the_seed_accepts_are_read_as_it_read_them() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    // YAML 1.1 booleans (PyYAML reads `yes`), strings for numbers, a key of a later version,
    // and a database section Flotilla does not need.
    std::fs::write(
        &path,
        "autoscaler:\n  dry_run: yes\n  check_interval: \"20\"\n  limits: {min_nodes: 0, max_nodes: '3'}\n  \
         docker: {image: 'rancher/k3s:v1.30.1-k3s1', network: k3s}\n  logging: {level: WARNING}\n  \
         database: {redis: {password: hunter2}}\n  tresholds: {cpu_threshold: 80}\n",
    )
    .unwrap();
    let req = Request {
        kind: Kind::Docker,
        files: vec![path],
        output_dir: dir.path().into(),
        cluster_name: Some("lab".into()),
        overrides: vec![],
    };
    let i = import::import(&req).unwrap();
    let d = &i.document.root;
    assert_eq!(d.get("clouds.local.dry_run"), Some(&import::out::Value::Bool(true)));
    assert_eq!(d.get("cluster_name"), Some(&import::out::Value::String("lab".into())));
    assert_eq!(d.get("groups.workers.max_size"), Some(&import::out::Value::Integer(3)));
    assert_eq!(d.get("log.level"), Some(&import::out::Value::String("warn".into())));
    assert_eq!(i.report.flag_args(), ["--scan-interval=20s"]);
    assert!(i.report.accounts_for("autoscaler.tresholds.cpu_threshold"));
    assert_no_secret(&i, &["hunter2"]);
    import::verify(&i, dir.path()).unwrap();
}

#[test]
fn a_docker_config_without_an_image_or_a_maximum_names_both_keys() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.yaml");
    std::fs::write(&path, "autoscaler:\n  limits: {min_nodes: 1}\n  docker: {network: k3s}\n").unwrap();
    let req = Request {
        kind: Kind::Docker,
        files: vec![path],
        output_dir: dir.path().into(),
        cluster_name: None,
        overrides: vec![],
    };
    let Err(Error::Input(p)) = import::import(&req) else { panic!("expected problems") };
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["autoscaler.limits.max_nodes", "autoscaler.docker.image"]);
    assert!(p[1].message.contains("required"), "{}", p[1]);
}

// ---------------------------------------------------------------- OpenStack

#[tokio::test]
async fn openstack_config_credentials_and_butane_template_become_one_group_on_one_cloud() {
    let i = run(Kind::Openstack, &["config.yaml", "credentials.yaml"], &[]);
    check_golden(Kind::Openstack, &i, "config.expected");
    assert_no_secret(&i, &["fairlys3cretpassw0rd", "Kxxxxx::server:1234567890"]);
    let d = &i.document.root;
    assert_eq!(d.get("clouds.pouta.credentials_file"), Some(&import::out::Value::String("credentials.yaml".into())));
    assert_eq!(
        d.get("groups.workers.machine.join_token"),
        Some(&import::out::Value::SecretEnv("K3S_NODE_TOKEN".into()))
    );
    let (groups, options) = served(Kind::Openstack, &i, "workers").await;
    assert_eq!(groups, [("workers".to_owned(), 0, 4)]);
    assert_eq!(seconds(&options.unwrap().max_node_provision_duration), 600, "the seed's 10-minute join limit");
}

#[test]
fn every_key_of_the_openstack_inputs_is_accounted_for() {
    let i = run(Kind::Openstack, &["config.yaml", "credentials.yaml"], &[]);
    for k in [
        "clusterName",
        "flavor",
        "image",
        "freeMemoryTarget",
        "minimumFreeNodeMemory",
        "maximumNumberOfNodes",
        "oldNodeAgeLimitHours",
        "imagePullerIgnorelist",
        "butaneBinary",
        "butaneConfigTemplate",
        "butaneConfigData.master_vm_ip",
        "butaneConfigData.k3s_version",
        "butaneConfigData.k3s_node_token",
    ] {
        assert!(i.report.accounts_for(k), "{k}");
    }
    let creds = std::fs::read_to_string(dir(Kind::Openstack).join("credentials.yaml")).unwrap();
    for line in creds.lines() {
        let key = line.split(':').next().unwrap();
        assert!(i.report.accounts_for(&format!("tests/import/openstack/credentials.yaml {key}")), "{key}");
    }
}

#[test]
fn the_butane_template_renders_with_the_names_the_seed_gave_it_and_no_startup_taint() {
    let i = run(Kind::Openstack, &["config.yaml", "credentials.yaml"], &[]);
    let import::out::Value::String(template) = i.document.root.get("groups.workers.machine.user_data").unwrap() else {
        panic!()
    };
    let mut env = minijinja::Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let ctx = minijinja::context! { name => "dev-cluster-node-abcde", join_token => "T", master_vm_ip => "192.168.1.1", k3s_version => "v1" };
    let out = env.render_str(template, ctx).unwrap();
    assert!(out.contains("inline: dev-cluster-node-abcde"), "{out}");
    assert!(out.contains("K3S_TOKEN=T "), "{out}");
    assert!(out.contains("--node-taint role=user:NoSchedule \n"), "the startup taint is gone:\n{out}");
    assert!(out.starts_with("variant: fcos"), "{out}");
}

#[test]
fn an_openstack_config_without_flavor_or_maximum_names_the_missing_keys() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.yaml"), "clusterName: c1\nimage: fcos\nbutaneConfigTemplate: t.j2\n")
        .unwrap();
    std::fs::write(dir.path().join("t.j2"), "variant: fcos\n").unwrap();
    std::fs::copy(self::dir(Kind::Openstack).join("credentials.yaml"), dir.path().join("credentials.yaml")).unwrap();
    let req = Request {
        kind: Kind::Openstack,
        files: vec![dir.path().join("config.yaml"), dir.path().join("credentials.yaml")],
        output_dir: dir.path().into(),
        cluster_name: None,
        overrides: vec![],
    };
    let Err(Error::Input(p)) = import::import(&req) else { panic!("expected problems") };
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["maximumNumberOfNodes", "flavor"]);
}

// ---------------------------------------------------------------- Proxmox

#[tokio::test]
async fn proxmox_settings_py_becomes_a_proxmox_cloud_with_the_seeds_timers() {
    let i = run(Kind::Proxmox, &["settings.py"], &[("pxe_autoscaled_node_template_vm", "9000")]);
    check_golden(Kind::Proxmox, &i, "settings.expected");
    assert_no_secret(&i, &["t3mplat3"]);
    assert_eq!(
        i.report.flag_args(),
        [
            "--scan-interval=15s",
            "--scale-down-delay-after-delete=10m",
            "--scale-down-delay-after-add=10m",
            "--scale-down-delay-after-failure=10m",
            "--max-total-unready-percentage=45",
            "--ok-total-unready-count=3"
        ]
    );
    let (groups, options) = served(Kind::Proxmox, &i, "workers").await;
    assert_eq!(groups, [("workers".to_owned(), 0, 5)]);
    let o = options.unwrap();
    assert_eq!(seconds(&o.max_node_provision_duration), 900);
    assert_eq!(seconds(&o.scale_down_unneeded_duration), 600);
    assert_eq!(o.scale_down_utilization_threshold, 0.5);
    for (name, _) in
        flotilla::import::pysettings::parse(&std::fs::read_to_string(dir(Kind::Proxmox).join("settings.py")).unwrap())
            .into_iter()
            .map(|s| (s.name, ()))
    {
        assert!(i.report.accounts_for(&name), "{name}");
    }
}

#[tokio::test]
async fn the_proxmox_manifest_with_its_configmaps_is_read_as_the_pod_saw_it() {
    let i = run(Kind::Proxmox, &["proxmox-autoscaler-example.yaml"], &[]);
    check_golden(Kind::Proxmox, &i, "manifest.expected");
    assert_no_secret(&i, &["t3mplat3"]);
    let d = &i.document.root;
    // The ConfigMap's PXE_HOST wins over the module's fallback, as os.environ did in the pod.
    assert_eq!(d.get("clouds.pve.url"), Some(&import::out::Value::String("https://pve1.lab.example:8006".into())));
    assert_eq!(d.get("groups.workers.machine.ip_pool"), None, "dhcp mode");
    // The seed's percent threshold written as a fraction is kept as the seed ran it, and said so.
    assert_eq!(
        d.get("groups.workers.options.scale_down_utilization_threshold"),
        Some(&import::out::Value::Float(0.005))
    );
    assert!(i.report.notes.iter().any(|n| n.contains("reads it as a percentage")));
    let (groups, _) = served(Kind::Proxmox, &i, "workers").await;
    assert_eq!(groups, [("workers".to_owned(), 1, 3)]);
}

#[test]
fn a_template_vm_given_by_name_is_refused_with_how_to_give_its_vmid() {
    let p = problems(Kind::Proxmox, &["settings.py"], &[]);
    assert_eq!(p.len(), 1);
    assert_eq!(p[0].key, "pxe_autoscaled_node_template_vm");
    assert!(p[0].message.contains("--set pxe_autoscaled_node_template_vm=<VMID>"), "{}", p[0]);
}

#[test]
fn proxmox_settings_as_an_env_file_need_the_host_user_and_template() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("settings.env");
    std::fs::write(&path, "export PXE_PASSWORD='s3cr3t'\nmax_size=4\npxe_autoscaled_node_ip_mask=24\n").unwrap();
    let req = Request {
        kind: Kind::Proxmox,
        files: vec![path.clone()],
        output_dir: dir.path().into(),
        cluster_name: None,
        overrides: vec![],
    };
    let Err(Error::Input(p)) = import::import(&req) else { panic!("expected problems") };
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["pxe_host", "pxe_user", "pxe_autoscaled_node_template_vm", "pxe_autoscaled_node_ip_pool"]);

    std::fs::write(
        &path,
        "PXE_HOST=pve.example:8443\nPXE_USER=ops@pve\nexport PXE_PASSWORD='s3cr3t'\npxe_autoscaled_node_template_vm=9001\n\
         pxe_autoscaled_node_network_mode=dhcp\nmax_size=4\n",
    )
    .unwrap();
    let i = import::import(&req).unwrap();
    assert_eq!(
        i.document.root.get("clouds.pve.url"),
        Some(&import::out::Value::String("https://pve.example:8443".into()))
    );
    assert_no_secret(&i, &["s3cr3t"]);
    import::verify(&i, dir.path()).unwrap();
}

// ---------------------------------------------------------------- the command

#[test]
fn the_import_command_writes_the_file_prints_the_report_and_the_file_passes_check_config() {
    let tmp = tempfile::tempdir().unwrap();
    let out_path = tmp.path().join("flotilla.toml");
    let out = Command::new(BIN)
        .args([
            "import",
            "openstack",
            "tests/import/openstack/config.yaml",
            "tests/import/openstack/credentials.yaml",
            "-o",
        ])
        .arg(&out_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("K3S_NODE_TOKEN: the k3s join token"), "{stdout}");
    assert!(stdout.contains("--cloud-provider=externalgrpc"), "{stdout}");
    let check = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&out_path)
        .env("K3S_NODE_TOKEN", "x")
        .output()
        .unwrap();
    assert!(check.status.success(), "{}", String::from_utf8_lossy(&check.stderr));
}

#[test]
fn the_import_command_exits_1_and_names_the_key_when_the_input_is_incomplete() {
    let out = Command::new(BIN).args(["import", "proxmox", "tests/import/proxmox/settings.py"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("pxe_autoscaled_node_template_vm"), "{stderr}");
    assert!(out.stdout.is_empty(), "nothing is written on failure");
}

// ---------------------------------------------------------------- Helm

/// The values block `instructions` prints after "Values (flotilla-values.yaml):", as printed.
fn printed_helm_values(text: &str) -> String {
    let mut lines = text.lines().skip_while(|l| !l.ends_with("Values (flotilla-values.yaml):"));
    assert!(lines.next().is_some(), "no Helm values in:\n{text}");
    lines.take_while(|l| l.starts_with("  ")).map(|l| format!("{l}\n")).collect()
}

/// `printed` against the part of values.schema.json it uses: known properties (or the
/// schema's additionalProperties), and each value of the type the schema gives.
fn declared(printed: &serde_yaml::Value, schema: &serde_json::Value, path: &str) {
    use serde_yaml::Value as Y;
    let kind = match printed {
        Y::Mapping(_) => "object",
        Y::Sequence(_) => "array",
        Y::String(_) => "string",
        Y::Number(_) => "number",
        Y::Bool(_) => "boolean",
        _ => "null",
    };
    let types: Vec<&str> = match &schema["type"] {
        serde_json::Value::String(t) => vec![t.as_str()],
        serde_json::Value::Array(ts) => ts.iter().filter_map(|t| t.as_str()).collect(),
        _ => vec![kind],
    };
    assert!(types.contains(&kind), "{path}: the import prints {kind}, values.schema.json wants {types:?}");
    if let Y::Mapping(m) = printed {
        for (k, v) in m {
            let k = k.as_str().unwrap();
            let at = format!("{path}.{k}");
            match (&schema["properties"][k], &schema["additionalProperties"]) {
                (serde_json::Value::Object(_), _) => declared(v, &schema["properties"][k], &at),
                (_, extra @ serde_json::Value::Object(_)) => declared(v, extra, &at),
                (_, serde_json::Value::Bool(false)) => panic!("{at} is not a value of charts/flotilla"),
                _ => {}
            }
        }
    }
}

/// tests/chart/run renders these values with helm and the chart's schema and runs check-config
/// on the pod's view; this checks, without helm, that they fit the chart's schema and carry
/// every secret, file and flag of the import.
#[test]
fn the_printed_helm_values_fit_the_charts_schema_and_carry_every_secret_file_and_flag() {
    let schema: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string("charts/flotilla/values.schema.json").unwrap()).unwrap();
    type Case<'a> = (Kind, &'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 5] = [
        (Kind::Docker, &["config.yaml"], &[]),
        (Kind::Kamatera, &["cloud-config.ini"], &[]),
        (Kind::Openstack, &["config.yaml", "credentials.yaml"], &[]),
        (Kind::Proxmox, &["settings.py"], &[("pxe_autoscaled_node_template_vm", "9000")]),
        (Kind::Slicer, &["cloud-config.ini"], &[]),
    ];
    for (kind, files, overrides) in cases {
        let i = run(kind, files, overrides);
        let text = import::instructions(&i, Some(Path::new("flotilla.toml")));
        let block = printed_helm_values(&text);
        let values: serde_yaml::Value = serde_yaml::from_str(&block).unwrap_or_else(|e| panic!("{kind}: {e}\n{block}"));
        declared(&values, &schema, "");
        let env: Vec<_> = values["flotilla"]["secretEnv"]
            .as_mapping()
            .map(|m| m.keys().map(|k| k.as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        assert_eq!(env, i.document.secret_vars(), "{kind}: secretEnv");
        for f in &i.report.flags {
            let printed = values["autoscaler"]["extraArgs"][f.name.as_str()].as_str();
            match printed {
                Some(v) => assert_eq!(v, f.value, "{kind}: --{}", f.name),
                None => assert!(
                    block.contains(&format!("# --{}={} is left out: ", f.name, f.value)),
                    "{kind}: --{}",
                    f.name
                ),
            }
        }
        let mounts: Vec<_> = values["flotilla"]["extraVolumeMounts"]
            .as_sequence()
            .map(|m| m.iter().map(|m| m["mountPath"].as_str().unwrap().to_owned()).collect())
            .unwrap_or_default();
        let files: Vec<_> = i.document.file_paths().into_iter().map(|(_, p)| format!("/etc/flotilla/{p}")).collect();
        assert_eq!(mounts, files, "{kind}: every file the configuration names is mounted where it looks");
        assert!(
            text.contains(
                "helm upgrade --install autoscaler charts/flotilla -n autoscaler -f flotilla-values.yaml \
                 --set-file flotilla.configToml=flotilla.toml"
            ),
            "{kind}: {text}"
        );
    }
}

// ---------------------------------------------------------------- Slicer

#[tokio::test]
async fn slicer_cloud_config_becomes_one_cloud_per_slicer_api_and_one_group_per_host_group() {
    let i = run(Kind::Slicer, &["cloud-config.ini"], &[]);
    check_golden(Kind::Slicer, &i, "cloud-config.expected");
    assert_no_secret(&i, &["K10a1b2c3d4e5f60718", "9a8b7c6d5e4f3a2b1c0d9e8f", "1f2e3d4c5b6a79800a1b2c3d"]);
    assert_eq!(i.document.secret_vars(), ["SLICER_TOKEN_1", "K3S_TOKEN", "SLICER_TOKEN_2"]);
    // Mixed case names, a repeated max-size (the last wins), defaults from [global].
    let (mut groups, _) = served(Kind::Slicer, &i, "k3s-agents-1").await;
    groups.sort();
    assert_eq!(
        groups,
        [("k3s-agents-1".to_owned(), 0, 6), ("k3s-agents-2".to_owned(), 0, 3), ("k3s-agents-gpu".to_owned(), 0, 2),]
    );
    for key in ["slicer-url", "slicer-token", "max-size"] {
        assert!(i.report.accounts_for(&format!("[nodegroup \"k3s-agents-1\"] {key}")), "{key}");
    }
    for key in ["k3s-url", "k3s-token", "default-max-size"] {
        assert!(i.report.accounts_for(&format!("[global] {key}")), "{key}");
    }
    assert!(i.report.accounts_for("[nodegroup \"k3s-agents-2\"] arch"));
}

#[test]
fn the_slicer_cloud_config_is_read_from_the_secret_that_mounts_it() {
    let i = run(Kind::Slicer, &["cloud-config-secret.yaml"], &[]);
    assert_eq!(i.document.root.get("groups.k3s-agents.max_size"), Some(&import::out::Value::Integer(5)));
    assert_no_secret(&i, &["K10a1b2c3d4e5f60718", "9a8b7c6d5e4f3a2b1c0d9e8f"]);
    import::verify(&i, &dir(Kind::Slicer)).unwrap();
}

fn slicer_problems(text: &str) -> Vec<import::Problem> {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cloud-config.ini");
    std::fs::write(&path, text).unwrap();
    let req = Request {
        kind: Kind::Slicer,
        files: vec![path],
        output_dir: dir.path().into(),
        cluster_name: None,
        overrides: vec![],
    };
    match import::import(&req) {
        Err(Error::Input(p)) => p,
        other => panic!("expected problems, got {:?}", other.map(|i| i.document.render())),
    }
}

#[test]
fn a_slicer_config_missing_what_the_provider_needs_names_each_key() {
    let p = slicer_problems(
        "[global]\nk3s-url=https://10.0.0.2:6443\n[nodegroup \"agents\"]\nslicer-token=x\nmin-size=-1\n",
    );
    let keys: Vec<_> = p.iter().map(|p| p.key.as_str()).collect();
    assert_eq!(keys, ["[global] k3s-token", "[nodegroup \"agents\"] slicer-url"]);
    let p = slicer_problems(
        "[global]\nk3s-url=https://10.0.0.2:6443\nk3s-token=t\n[nodegroup \"agents\"]\nslicer-url=http://10.0.0.3:8081\nmin-size=-1\n",
    );
    assert_eq!(
        p[0].key, "[nodegroup \"agents\"] min-size",
        "the provider let a negative min through; Flotilla does not"
    );
    let p = slicer_problems(
        "[global]\nk3s-url=https://10.0.0.2:6443\nk3s-token=t\n[nodegroup \"agents_1\"]\nslicer-url=http://10.0.0.3:8081\n",
    );
    assert!(p[0].message.contains("lower-case letters, digits and '-'"), "{}", p[0]);
}

#[test]
fn what_gcfg_refuses_is_refused_with_its_line_and_unknown_keys_are_listed_with_a_guess() {
    let p = slicer_problems("[global]\nk3s_url=https://10.0.0.2:6443\n");
    assert!(p[0].message.contains("line 2") && p[0].message.contains("'_'"), "{}", p[0]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.ini");
    std::fs::write(
        &path,
        "[global]\nk3s-url=https://10.0.0.2:6443\nk3s-token=t\n[nodegroup \"agents\"]\nslicer-url=http://10.0.0.3:8081\nmax-sise=3\n",
    )
    .unwrap();
    let req = Request {
        kind: Kind::Slicer,
        files: vec![path],
        output_dir: dir.path().into(),
        cluster_name: None,
        overrides: vec![],
    };
    let i = import::import(&req).unwrap();
    let line = i.report.lines.iter().find(|l| l.key == "[nodegroup \"agents\"] max-sise").unwrap();
    assert!(
        matches!(&line.fate, import::report::Fate::Dropped(why) if why.contains("did you mean max-size?")),
        "{line:?}"
    );
}
