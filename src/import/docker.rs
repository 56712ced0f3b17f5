//! The K3s Docker autoscaler (`autoscaler/config/config.yaml`): a Python loop that reads
//! Prometheus and adds or removes `rancher/k3s` agent containers.
//!
//! Its keys, as its code reads them (`config['autoscaler'][...]`): `check_interval`, `dry_run`,
//! `thresholds.{pending_pods, cpu_threshold, memory_threshold, cpu_scale_down,
//! memory_scale_down}`, `limits.{min_nodes, max_nodes, scale_up_cooldown,
//! scale_down_cooldown}`, `docker.{image, network, boot_time, worker_service}`,
//! `kubernetes.kubeconfig_path`, and in its later versions `logging.{level, file}` and
//! `database.*`. Containers are started privileged, restart `always`, with `K3S_URL =
//! https://k3s-master:6443` and `K3S_TOKEN` from the autoscaler's own environment: those are
//! in its code, not its file, and are carried over as such.

use serde_yaml::Value;

use super::{
    Error, Import, Problems, Request, Source,
    out::{Document, Value as Out},
    report::Report,
    yaml::{self, Leaves},
};

const CLOUD: &str = "local";
const GROUP: &str = "workers";

pub fn import(req: &Request, sources: &[Source]) -> Result<Import, Error> {
    let [source] = sources else {
        return Err(Error::Usage("the docker import reads one file: the autoscaler's config.yaml".into()));
    };
    let file = source.name();
    let mut problems = Problems::default();
    let root: Value = serde_yaml::from_str(&source.text).map_err(|e| {
        Error::Input(vec![super::Problem { file: file.clone(), key: String::new(), message: format!("not YAML: {e}") }])
    })?;
    if root.get("autoscaler").is_none_or(|a| !a.is_mapping()) {
        problems.push(&file, "autoscaler", "is required: the seed reads every setting from the `autoscaler:` mapping");
        return Err(Error::Input(problems.0));
    }
    let mut keys = Leaves::new(&root, &[]);
    let mut r = Report::new("K3s Docker autoscaler");
    let mut doc = Document::default();

    let cluster = req.cluster_name.clone().unwrap_or_else(|| "k3s-docker".into());
    doc.root.comment(format!("Imported by `flotilla import docker` from {file}."));
    doc.root.comment("The seed's thresholds and cooldowns are now cluster-autoscaler settings; see the report.");
    doc.root.set(
        "cluster_name",
        cluster.as_str(),
        Some("The seed has no cluster name; it marks every container Flotilla creates (`--cluster-name` to change)."),
    );

    // Log settings (later versions of the seed).
    if let Some(v) = keys.take("autoscaler.logging.level") {
        let level = yaml::show(&v).to_ascii_lowercase();
        let level = if level == "warning" { "warn".to_owned() } else { level };
        doc.root.table("log").set("level", level.as_str(), Some("autoscaler.logging.level"));
        r.mapped("autoscaler.logging.level", "log.level");
    }
    if let Some(v) = keys.take("autoscaler.logging.file") {
        r.dropped(
            "autoscaler.logging.file",
            Some(&yaml::show(&v)),
            "Flotilla logs to stderr (log.format = \"json\" for collectors); redirect it if you need a file",
        );
    }

    // The cloud: the engine the seed reached with docker.from_env().
    let cloud = doc.root.table(&format!("clouds.{CLOUD}"));
    cloud.set("driver", "docker", None);
    cloud.set(
        "host",
        "unix:///var/run/docker.sock",
        Some("The seed used the engine of its own environment (DOCKER_HOST or this socket)."),
    );
    if let Some(v) = keys.take("autoscaler.dry_run") {
        match yaml::boolean(&v) {
            Some(b) => {
                cloud.set("dry_run", b, Some("autoscaler.dry_run"));
                r.mapped("autoscaler.dry_run", &format!("clouds.{CLOUD}.dry_run"));
                if b {
                    r.note(
                        "dry_run is on: Flotilla reads the engine but its creates and deletes fail with \
                         \"dry run: would ...\", so cluster-autoscaler backs off instead of waiting for nodes.",
                    );
                }
            }
            None => problems.push(&file, "autoscaler.dry_run", format!("{:?} is not a boolean", yaml::show(&v))),
        }
    }

    // The group.
    let limits_min = keys.take("autoscaler.limits.min_nodes");
    let limits_max = keys.take("autoscaler.limits.max_nodes");
    let group = doc.root.table(&format!("groups.{GROUP}"));
    group.comment("The seed's worker containers (k3s-worker-N); Flotilla names them <cluster>-workers-<random>.");
    group.set("cloud", CLOUD, None);
    let min = match &limits_min {
        Some(v) => match yaml::seconds(v) {
            Some(n) => {
                r.mapped("autoscaler.limits.min_nodes", &format!("groups.{GROUP}.min_size"));
                n
            }
            None => {
                problems.push(&file, "autoscaler.limits.min_nodes", format!("{:?} is not a count", yaml::show(v)));
                0
            }
        },
        None => {
            r.note("autoscaler.limits.min_nodes is not set (the seed fails at its first scale-down check without it); min_size = 0.");
            0
        }
    };
    group.set("min_size", min as i64, Some("autoscaler.limits.min_nodes"));
    match &limits_max {
        Some(v) => match yaml::seconds(v) {
            Some(n) if n >= min => {
                group.set("max_size", n as i64, Some("autoscaler.limits.max_nodes"));
                r.mapped("autoscaler.limits.max_nodes", &format!("groups.{GROUP}.max_size"));
            }
            Some(n) => problems.push(&file, "autoscaler.limits.max_nodes", format!("{n} is below min_nodes {min}")),
            None => problems.push(&file, "autoscaler.limits.max_nodes", format!("{:?} is not a count", yaml::show(v))),
        },
        None => {
            problems.push(&file, "autoscaler.limits.max_nodes", "is required: the largest number of worker containers")
        }
    }
    if limits_min.is_some() || limits_max.is_some() {
        r.note(
            "The seed's min_nodes/max_nodes counted every Ready worker Node, including the workers docker-compose \
             starts (k3s-worker-1, k3s-worker-2). Flotilla's min_size/max_size count only the containers it \
             created: lower both by the number of workers compose starts.",
        );
    }

    let machine = doc.root.table(&format!("groups.{GROUP}.machine"));
    match keys.take("autoscaler.docker.image").as_ref().and_then(yaml::scalar) {
        Some(image) if !image.trim().is_empty() => {
            machine.set(
                "image",
                image.as_str(),
                Some("autoscaler.docker.image (pull it on the engine first: Flotilla never pulls)"),
            );
            r.mapped("autoscaler.docker.image", &format!("groups.{GROUP}.machine.image"));
        }
        _ => problems.push(&file, "autoscaler.docker.image", "is required: the k3s image the worker containers run"),
    }
    machine.set("command", vec!["agent".to_owned()], None);
    machine.set(
        "k3s_url",
        "https://k3s-master:6443",
        Some("The seed's code joined every worker to https://k3s-master:6443."),
    );
    machine.set(
        "k3s_token",
        Out::SecretEnv("K3S_TOKEN".into()),
        Some("The seed's code read K3S_TOKEN from its own environment."),
    );
    r.secret(
        "K3S_TOKEN (environment of the seed)",
        "K3S_TOKEN",
        &format!("groups.{GROUP}.machine.k3s_token"),
        "the k3s join token, as the seed's autoscaler container had it (docker-compose.yml); \
         the server's /var/lib/rancher/k3s/server/node-token",
    );
    machine.set("privileged", true, Some("The seed always ran its workers privileged."));
    machine.set("restart", "always", Some("The seed's restart policy."));
    if let Some(v) = keys.take("autoscaler.docker.network") {
        machine.set("network", yaml::show(&v).as_str(), Some("autoscaler.docker.network"));
        r.mapped("autoscaler.docker.network", &format!("groups.{GROUP}.machine.network"));
    }
    r.note(
        "The seed also set K3S_WITH_NODE_ID=true (a random suffix on the node name), published the kubelet port \
         and bind-mounted /tmp/k3s-<name>. Flotilla does none of these: the node name must equal the container \
         name for cluster-autoscaler to match nodes to containers (provider id k3s://<name>), nothing outside \
         the engine talks to the kubelet port, and the agent's state lives in the container's anonymous volumes, \
         removed with it.",
    );

    // Timers and thresholds: cluster-autoscaler's now.
    let mut group_options = Vec::new();
    if let Some(v) = keys.take("autoscaler.check_interval") {
        match yaml::seconds(&v) {
            Some(s) if s > 0 => r.flag("autoscaler.check_interval", "scan-interval", &super::go_duration(s)),
            _ => problems.push(
                &file,
                "autoscaler.check_interval",
                format!("{:?} is not a number of seconds", yaml::show(&v)),
            ),
        }
    }
    if let Some(v) = keys.take("autoscaler.limits.scale_down_cooldown") {
        match yaml::seconds(&v) {
            Some(s) => {
                r.flag("autoscaler.limits.scale_down_cooldown", "scale-down-delay-after-delete", &super::go_duration(s))
            }
            None => problems.push(
                &file,
                "autoscaler.limits.scale_down_cooldown",
                format!("{:?} is not a number of seconds", yaml::show(&v)),
            ),
        }
    }
    if let Some(v) = keys.take("autoscaler.limits.scale_up_cooldown") {
        r.dropped(
            "autoscaler.limits.scale_up_cooldown",
            Some(&yaml::show(&v)),
            "cluster-autoscaler has no scale-up cooldown: it counts containers still starting as upcoming nodes, \
             so it never adds a second container for pods the first one will take",
        );
    }
    // Scale-down: the seed removed a worker when average CPU *and* memory use were below
    // their thresholds; CA removes a node whose requested CPU and memory are both below one
    // threshold. The lower of the two keeps the seed's condition as the stricter one.
    let cpu_up = keys.take("autoscaler.thresholds.cpu_threshold");
    let mem_up = keys.take("autoscaler.thresholds.memory_threshold");
    let cpu_down = keys.take("autoscaler.thresholds.cpu_scale_down");
    let mem_down = keys.take("autoscaler.thresholds.memory_scale_down");
    let down = |explicit: &Option<Value>, up: &Option<Value>| {
        explicit.as_ref().and_then(yaml::number).or_else(|| up.as_ref().and_then(yaml::number).map(|u| u / 2.0))
    };
    match (down(&cpu_down, &cpu_up), down(&mem_down, &mem_up)) {
        (Some(c), Some(m)) => {
            let t = c.min(m) / 100.0;
            if (0.0..=1.0).contains(&t) {
                group_options.push(("scale_down_utilization_threshold", Out::Float((t * 1000.0).round() / 1000.0)));
                for (key, v) in [("cpu_scale_down", &cpu_down), ("memory_scale_down", &mem_down)] {
                    if v.is_some() {
                        r.mapped(
                            &format!("autoscaler.thresholds.{key}"),
                            &format!("groups.{GROUP}.options.scale_down_utilization_threshold"),
                        );
                    }
                }
                r.note(format!(
                    "scale_down_utilization_threshold = {t}: the lower of the seed's CPU ({c}%) and memory ({m}%) \
                     scale-down thresholds. The seed compared measured use across all workers; cluster-autoscaler \
                     compares each node's requested CPU and memory, so set requests on your workloads."
                ));
            } else {
                problems.push(
                    &file,
                    "autoscaler.thresholds",
                    "scale-down thresholds must be percentages between 0 and 100",
                );
            }
        }
        _ => {
            for (key, v) in [("cpu_scale_down", &cpu_down), ("memory_scale_down", &mem_down)] {
                if let Some(v) = v {
                    r.dropped(
                        &format!("autoscaler.thresholds.{key}"),
                        Some(&yaml::show(v)),
                        "needs both a CPU and a memory threshold to become scale_down_utilization_threshold",
                    );
                }
            }
        }
    }
    for (key, v) in [("cpu_threshold", &cpu_up), ("memory_threshold", &mem_up)] {
        if let Some(v) = v {
            r.dropped(
                &format!("autoscaler.thresholds.{key}"),
                Some(&yaml::show(v)),
                "cluster-autoscaler scales up for pods that cannot be scheduled, not for high utilization \
                 (run the Horizontal Pod Autoscaler for that: its new pods then trigger scale-ups)",
            );
        }
    }
    if let Some(v) = keys.take("autoscaler.thresholds.pending_pods") {
        r.dropped(
            "autoscaler.thresholds.pending_pods",
            Some(&yaml::show(&v)),
            "cluster-autoscaler scales up for the first pod that fits no node (--new-pod-scale-up-delay delays it \
             by pod age, not by count)",
        );
    }
    if let Some(v) = keys.take("autoscaler.docker.boot_time") {
        r.dropped(
            "autoscaler.docker.boot_time",
            Some(&yaml::show(&v)),
            "Flotilla does not wait for a container to boot; cluster-autoscaler waits up to \
             max_node_provision_time (15m by default) for its node to register",
        );
    }
    if let Some(v) = keys.take("autoscaler.docker.worker_service") {
        r.dropped(
            "autoscaler.docker.worker_service",
            Some(&yaml::show(&v)),
            "Flotilla finds its containers by its own labels (dev.flotilla.cluster, dev.flotilla.group); \
             containers docker-compose started are never touched",
        );
    }
    if let Some(v) = keys.take("autoscaler.kubernetes.kubeconfig_path") {
        r.flag("autoscaler.kubernetes.kubeconfig_path", "kubeconfig", &yaml::show(&v));
        r.note(
            "cluster-autoscaler needs the kubeconfig (--kubeconfig) to reach the k3s server; Flotilla itself \
             does not talk to Kubernetes.",
        );
    }
    if !group_options.is_empty() {
        let options = doc.root.table(&format!("groups.{GROUP}.options"));
        options.comment("From the seed's scale-down thresholds (the lower of cpu_scale_down and memory_scale_down).");
        for (k, v) in group_options {
            options.set(k, v, None);
        }
    }

    for (key, v) in keys.rest() {
        let why = if key.starts_with("autoscaler.database") {
            "Flotilla keeps no state of its own: its containers carry their group in labels, so a restart \
             rebuilds everything from the engine"
                .to_owned()
        } else if key.starts_with("autoscaler.prometheus") {
            "cluster-autoscaler decides from pod requests and the scheduler, not from Prometheus".to_owned()
        } else {
            "not a key the seed reads".to_owned()
        };
        // A key that looks like a secret is not echoed.
        let shown = (!super::looks_secret(&key)).then(|| yaml::show(&v));
        r.dropped(&key, shown.as_deref(), &why);
    }
    r.note(
        "Flotilla serves /healthz, /readyz and /metrics on 127.0.0.1:8087 (server.http_listen), not the seed's \
         :8080 and :9091; point Prometheus and the Grafana dashboard's queries at Flotilla's metrics \
         (flotilla_instances, flotilla_grpc_requests_total, ...).",
    );

    problems.into_result()?;
    Ok(Import { document: doc, report: r, files: Vec::new() })
}
