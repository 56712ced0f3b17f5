//! The binary: check-config lists every problem and exits 1; ctl calls RPCs by hand.

mod support;

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

#[test]
fn check_config_accepts_the_examples() {
    let mut checked = 0;
    for entry in std::fs::read_dir("examples").unwrap() {
        let path = entry.unwrap().path();
        // Driver examples name secrets the user provides; their own suites check them with
        // stand-ins. The simulated ones are self-contained.
        let self_contained = path.file_name().is_some_and(|n| n.to_string_lossy().starts_with("simulated"));
        if self_contained && path.extension().is_some_and(|e| e == "toml") {
            let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
            assert!(out.status.success(), "{}: {}", path.display(), String::from_utf8_lossy(&out.stderr));
            checked += 1;
        }
    }
    assert!(checked >= 1);
}

#[test]
fn check_config_reports_every_problem_with_its_key_path_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "cluster_name = \"ok\"\n[clouds.sim]\ndriver = \"simulated\"\nfail_rate = 2.0\nlatency = \"1s\"\n\
         [groups.g]\ncloud = \"sim\"\nmax_size = -1\n[groups.g.machine]\nflavor = \"x\"\n\
         [groups.h]\ncloud = \"sim\"\nmax_size = 2\ntoken = { env = \"FLOTILLA_SURELY_UNSET\" }\n",
    )
    .unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    for key in
        ["groups.g.max_size", "clouds.sim.fail_rate", "clouds.sim.latency", "groups.g.machine.flavor", "groups.h.token"]
    {
        assert!(stderr.contains(key), "missing {key} in:\n{stderr}");
    }
    assert!(stderr.contains(&path.display().to_string()));
}

#[test]
fn secrets_never_appear_in_problem_reports() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "cluster_name = \"ok\"\npassword = \"hunter2-secret\"\n[clouds.sim]\ndriver = \"nope\"\n")
        .unwrap();
    let out = Command::new(BIN).args(["check-config", "--config"]).arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("password") && !stderr.contains("hunter2"), "{stderr}");
}

/// Runs `flotilla ctl --address ADDR ARGS...` and returns (success, stdout, stderr).
async fn ctl(addr: std::net::SocketAddr, args: &[&str]) -> (bool, String, String) {
    let out = tokio::process::Command::new(BIN)
        .args(["ctl", "--address", &addr.to_string()])
        .args(args)
        .output()
        .await
        .unwrap();
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

#[tokio::test]
async fn ctl_calls_every_rpc_by_hand() {
    let (server, c) = support::start(
        "cluster_name = \"t\"\n[clouds.sim]\ndriver = \"simulated\"\n[groups.g]\ncloud = \"sim\"\nmax_size = 3\n\
         [groups.g.template]\ncpu = \"2\"\nmemory = \"4Gi\"\n[groups.g.options]\nmax_node_provision_time = \"5m\"\n",
    )
    .await;
    let addr = server.grpc_addr;
    assert!(ctl(addr, &["node-groups"]).await.1.starts_with("g\tmin=0\tmax=3"));
    assert!(ctl(addr, &["increase-size", "g", "2"]).await.0);
    assert_eq!(ctl(addr, &["target-size", "g"]).await.1, "2\n");
    let ids = support::wait_running(&c, "g", 2, std::time::Duration::from_secs(10)).await;
    assert!(ctl(addr, &["refresh"]).await.0);
    let nodes = ctl(addr, &["nodes", "g"]).await.1;
    assert_eq!(nodes.matches("instanceRunning").count(), 2, "{nodes}");
    assert!(ctl(addr, &["node-group-for-node", &ids[0]]).await.1.starts_with("g\t"));
    let template = ctl(addr, &["template", "g"]).await.1;
    assert!(template.contains("kind: Node") && template.contains("memory: 4Gi"), "{template}");
    assert!(ctl(addr, &["options", "g"]).await.1.contains("seconds: 300"));
    assert!(ctl(addr, &["delete-nodes", "g", &ids[0]]).await.0);
    assert!(ctl(addr, &["gpu"]).await.0);
    let (ok, _, err) = ctl(addr, &["increase-size", "g", "9"]).await;
    assert!(!ok && err.contains("InvalidArgument") && err.contains("max size 3"), "{err}");
    server.stop().await.unwrap();
}
