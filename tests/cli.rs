//! The binary: check-config lists every problem and exits 1; ctl calls RPCs by hand.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_flotilla");

#[test]
fn check_config_accepts_the_examples() {
    let mut checked = 0;
    for entry in std::fs::read_dir("examples").unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
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
