//! The Docker driver: each machine is a container on one Docker engine, typically a k3s agent
//! (`rancher/k3s agent`) joining a k3s server, so a single Docker host runs a whole autoscaled
//! cluster.
//!
//! * **Ownership.** Every container carries the labels [`CLUSTER_LABEL`] and [`GROUP_LABEL`],
//!   set in the create call. `list` is one `GET /containers/json?all=true` filtered by the
//!   cluster label; a container without both labels is never listed, stopped or removed.
//! * **Names.** The container name and hostname are the machine name, and `K3S_NODE_NAME` is set
//!   to it too, so the node registers as `k3s://<name>`: the default provider id.
//! * **Create** is create + start. A start failure removes the container again. Images are never
//!   pulled: a missing image fails the create (class Other) and says so.
//! * **Delete** checks the labels, stops with the group's `stop_timeout` (SIGTERM, then SIGKILL)
//!   and removes the container with its anonymous volumes. A container already gone is
//!   `NotFound`, i.e. done.
//! * **Dry run** (`dry_run = true`): listings read the engine as usual; creates and deletes only
//!   log what they would do and fail with `InvalidRequest("dry run: ...")`, so nothing counts
//!   as a machine and cluster-autoscaler backs off the group instead of waiting for capacity
//!   that will never come.
//!
//! Keys are documented in [`settings`]; the engine connection and error table in [`engine`].

use std::collections::{BTreeMap, HashMap};

use async_trait::async_trait;
use bollard::{
    Docker,
    models::{
        ContainerCreateBody, ContainerStateStatusEnum, ContainerSummaryStateEnum, HostConfig, RestartPolicy,
        RestartPolicyNameEnum,
    },
    query_parameters::{
        CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
        RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
    },
};
use tracing::{info, warn};

use super::{CreateFailure, Driver, Error, ErrorClass, Machine, MachineRef, MachineState, Result, Shape};

pub mod engine;
pub mod settings;

use engine::Engine;
pub use settings::{CloudSettings, GroupSettings, Host, Restart};

/// The label naming the cluster a container belongs to.
pub const CLUSTER_LABEL: &str = "dev.flotilla.cluster";
/// The label naming the node group a container belongs to.
pub const GROUP_LABEL: &str = "dev.flotilla.group";

/// One Docker engine serving the groups configured on it.
#[derive(Debug)]
pub struct DockerDriver {
    cluster: String,
    dry_run: bool,
    groups: BTreeMap<String, GroupSettings>,
    engine: Engine,
    /// Names whose create runs in this process. Written by `create`, read by `list`: a
    /// container still `created` that no create is working on was left by an interrupted one.
    creating: std::sync::Mutex<std::collections::HashSet<String>>,
    /// Groups with a warm pool: their exited containers are listed as Stopped (see `stop`).
    pool_groups: std::collections::HashSet<String>,
}

/// Takes a name out of [`DockerDriver::creating`] when its create ends, however it ends.
struct Creating<'a>(&'a DockerDriver, String);

impl Drop for Creating<'_> {
    fn drop(&mut self) {
        self.0.creating.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.1);
    }
}

impl DockerDriver {
    /// A driver for `cluster`'s groups on one engine. Does not contact the engine: that
    /// happens on the first call, so Flotilla starts (unready) while the engine is down.
    pub fn new(cluster: &str, cloud: CloudSettings, groups: BTreeMap<String, GroupSettings>) -> DockerDriver {
        DockerDriver {
            cluster: cluster.to_owned(),
            dry_run: cloud.dry_run,
            groups,
            engine: Engine::new(cloud.host, cloud.timeout),
            creating: Default::default(),
            pool_groups: Default::default(),
        }
    }

    /// Groups whose exited containers are warm-pool machines.
    pub fn with_pool_groups(mut self, groups: impl IntoIterator<Item = String>) -> DockerDriver {
        self.pool_groups = groups.into_iter().collect();
        self
    }

    /// The container `machine` names, refusing one without this cluster's and group's labels.
    async fn own_container(
        &self,
        docker: &Docker,
        machine: &MachineRef,
        what: &str,
    ) -> Result<bollard::models::ContainerInspectResponse> {
        let MachineRef { group, name, id } = machine;
        let target = if id.is_empty() { name } else { id };
        let found = match docker.inspect_container(target, None::<InspectContainerOptions>).await {
            Ok(found) => found,
            Err(e) if engine::status(&e) == Some(404) => return Err(Error::NotFound(format!("container {name}"))),
            Err(e) => return Err(self.engine.error(&format!("inspect container {name}"), e)),
        };
        let labels = found.config.as_ref().and_then(|c| c.labels.as_ref());
        if self.owner(labels) != Some(group.as_str()) {
            return Err(Error::InvalidRequest(format!(
                "container {name} ({target}) does not carry the labels of cluster {:?} group {group:?}; not {what} it",
                self.cluster
            )));
        }
        Ok(found)
    }

    fn refuse_in_dry_run(&self, what: &str, name: &str) -> Result<()> {
        if self.dry_run {
            info!(%name, engine = %self.engine.host(), "dry run: would {what} container");
            return Err(Error::InvalidRequest(format!(
                "dry run: would {what} container {name} on docker engine {}; nothing was done",
                self.engine.host()
            )));
        }
        Ok(())
    }

    /// The create itself: make the container, start it (see [`Driver::create`]).
    async fn create_container(&self, group: &str, name: &str) -> Result<Machine> {
        let g = self.group(group)?;
        if self.dry_run {
            info!(%group, %name, image = %g.image, engine = %self.engine.host(), "dry run: would create container");
            return Err(Error::InvalidRequest(format!(
                "dry run: would create container {name} from image {} on docker engine {}; nothing was created",
                g.image,
                self.engine.host()
            )));
        }
        let docker = self.engine.client().await?;
        let options = CreateContainerOptionsBuilder::new().name(name).build();
        let created = match docker.create_container(Some(options), self.container_body(group, name, g)).await {
            Ok(created) => created,
            Err(e) => {
                return match engine::status(&e) {
                    Some(409) => self.adopt(docker, group, name).await,
                    Some(404) => Err(Error::InvalidRequest(format!(
                        "docker engine {}: cannot create container {name}: {} (Flotilla never pulls images: pull {} \
                         on the engine first)",
                        self.engine.host(),
                        engine::message(&e),
                        g.image
                    ))),
                    _ => Err(self.engine.error(&format!("create container {name}"), e)),
                };
            }
        };
        for w in &created.warnings {
            warn!(%group, %name, warning = %w, "docker engine warning");
        }
        self.start(docker, name, &created.id).await?;
        Ok(Machine { group: group.to_owned(), name: name.to_owned(), id: created.id, state: MachineState::Running })
    }

    fn group(&self, group: &str) -> Result<&GroupSettings> {
        self.groups
            .get(group)
            .ok_or_else(|| Error::InvalidRequest(format!("group {group:?} has no docker machine settings")))
    }

    /// The group a container belongs to, if it carries this cluster's marks.
    fn owner<'a>(&self, labels: Option<&'a HashMap<String, String>>) -> Option<&'a str> {
        let labels = labels?;
        if labels.get(CLUSTER_LABEL)? != &self.cluster {
            return None;
        }
        labels.get(GROUP_LABEL).map(String::as_str).filter(|g| !g.is_empty())
    }

    /// The create request for one container. It holds the k3s token: never log it.
    fn container_body(&self, group: &str, name: &str, g: &GroupSettings) -> ContainerCreateBody {
        let mut env: Vec<String> = g.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // k3s names the node after the hostname already; saying so keeps the provider id right
        // even if a user's command passes --with-node-id or the image changes its default.
        if !g.env.contains_key("K3S_NODE_NAME") {
            env.push(format!("K3S_NODE_NAME={name}"));
        }
        if let Some(url) = &g.k3s_url {
            env.push(format!("K3S_URL={url}"));
        }
        if let Some(token) = &g.k3s_token {
            env.push(format!("K3S_TOKEN={}", token.expose()));
        }
        let mut labels: HashMap<String, String> = g.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        labels.insert(CLUSTER_LABEL.to_owned(), self.cluster.clone());
        labels.insert(GROUP_LABEL.to_owned(), group.to_owned());
        let restart_policy = match g.restart {
            Restart::No => RestartPolicy { name: Some(RestartPolicyNameEnum::NO), maximum_retry_count: None },
            Restart::Always => RestartPolicy { name: Some(RestartPolicyNameEnum::ALWAYS), maximum_retry_count: None },
            Restart::UnlessStopped => {
                RestartPolicy { name: Some(RestartPolicyNameEnum::UNLESS_STOPPED), maximum_retry_count: None }
            }
            Restart::OnFailure(n) => {
                RestartPolicy { name: Some(RestartPolicyNameEnum::ON_FAILURE), maximum_retry_count: n.map(i64::from) }
            }
        };
        let host_config = HostConfig {
            privileged: Some(g.privileged),
            network_mode: g.network.clone(),
            binds: (!g.volumes.is_empty()).then(|| g.volumes.clone()),
            tmpfs: (!g.tmpfs.is_empty()).then(|| g.tmpfs.iter().map(|(k, v)| (k.clone(), v.clone())).collect()),
            nano_cpus: g.cpu_millis.map(|m| i64::try_from(m.saturating_mul(1_000_000)).unwrap_or(i64::MAX)),
            memory: g.memory_bytes.map(|m| i64::try_from(m).unwrap_or(i64::MAX)),
            restart_policy: Some(restart_policy),
            ..Default::default()
        };
        ContainerCreateBody {
            hostname: Some(name.to_owned()),
            image: Some(g.image.clone()),
            entrypoint: g.entrypoint.clone(),
            cmd: g.command.clone(),
            env: Some(env),
            labels: Some(labels),
            stop_timeout: Some(stop_seconds(g)),
            host_config: Some(host_config),
            ..Default::default()
        }
    }

    /// A name conflict on create: the container may be ours from an earlier attempt that timed
    /// out on our side; then it is adopted (and started if needed). Anyone else's is left alone.
    async fn adopt(&self, docker: &Docker, group: &str, name: &str) -> Result<Machine> {
        let found = docker
            .inspect_container(name, None::<InspectContainerOptions>)
            .await
            .map_err(|e| self.engine.error(&format!("inspect container {name} after a name conflict"), e))?;
        let labels = found.config.as_ref().and_then(|c| c.labels.as_ref());
        if self.owner(labels) != Some(group) {
            return Err(Error::InvalidRequest(format!(
                "a container named {name} already exists on docker engine {} and does not belong to cluster {:?} \
                 group {group:?}; leaving it alone",
                self.engine.host(),
                self.cluster
            )));
        }
        let id = found.id.clone().unwrap_or_else(|| name.to_owned());
        let status = found.state.as_ref().and_then(|s| s.status);
        if matches!(status, Some(ContainerStateStatusEnum::CREATED)) {
            self.start(docker, name, &id).await?;
            return Ok(Machine { group: group.to_owned(), name: name.to_owned(), id, state: MachineState::Running });
        }
        info!(%group, %name, "adopted a container left by an earlier create");
        let state = inspect_state(found.state.as_ref());
        Ok(Machine { group: group.to_owned(), name: name.to_owned(), id, state })
    }

    /// Starts a created container; on failure removes it, so a failed create leaves nothing.
    async fn start(&self, docker: &Docker, name: &str, id: &str) -> Result<()> {
        let Err(e) = docker.start_container(id, None).await else { return Ok(()) };
        let error = self.engine.error(&format!("start container {name}"), e);
        let remove = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match docker.remove_container(id, Some(remove)).await {
            Ok(()) => Err(error),
            Err(cleanup) => {
                // It keeps its labels, so a later listing shows it and CA deletes it.
                warn!(%name, error = %engine::message(&cleanup), "cannot remove a container that failed to start");
                Err(error)
            }
        }
    }
}

/// The stop grace period in whole seconds, as the engine takes it.
/// The Docker driver's [`Constructor`](super::Constructor).
pub fn build(setup: &mut super::CloudSetup<'_>, p: &mut crate::config::Problems) -> Option<super::SharedDriver> {
    let settings = CloudSettings::parse(&mut setup.section, p);
    let mut groups = BTreeMap::new();
    for g in &mut setup.groups {
        if let Some(s) = GroupSettings::parse(&mut g.machine, p) {
            groups.insert(g.config.name.clone(), s);
        }
    }
    let pool_groups: Vec<String> =
        setup.groups.iter().filter(|g| g.config.warm_pool > 0).map(|g| g.config.name.clone()).collect();
    settings.map(|s| {
        std::sync::Arc::new(DockerDriver::new(setup.cluster, s, groups).with_pool_groups(pool_groups))
            as super::SharedDriver
    })
}

fn stop_seconds(g: &GroupSettings) -> i64 {
    let d = g.stop_timeout;
    i64::try_from(d.as_secs() + u64::from(d.subsec_nanos() > 0)).unwrap_or(i64::MAX)
}

/// A container's state from a listing. `status` is the engine's human text ("Exited (1) 3
/// seconds ago"), which is where a listing carries the exit code.
fn summary_state(state: Option<ContainerSummaryStateEnum>, status: Option<&str>) -> MachineState {
    use ContainerSummaryStateEnum as S;
    let status = status.unwrap_or_default();
    match state {
        Some(S::RUNNING | S::PAUSED) => MachineState::Running,
        Some(S::REMOVING | S::STOPPING) => MachineState::Deleting,
        Some(S::EXITED) => failed("CONTAINER_EXITED", format!("container stopped: {status}")),
        Some(S::DEAD) => failed("CONTAINER_DEAD", format!("container is dead: {status}")),
        Some(S::CREATED | S::RESTARTING | S::EMPTY) | None => MachineState::Creating,
    }
}

/// A container's state in a listing, given whether this process is creating it: a container
/// still `created` that no create works on was left by a create that was interrupted (Flotilla
/// killed between creating and starting it), and will never start on its own.
fn listed_state(state: Option<ContainerSummaryStateEnum>, status: Option<&str>, in_flight: bool) -> MachineState {
    if state == Some(ContainerSummaryStateEnum::CREATED) && !in_flight {
        return failed(
            "INTERRUPTED",
            "container was created but never started: the create that made it was interrupted".to_owned(),
        );
    }
    summary_state(state, status)
}

/// A container's state from an inspection (which has the exit code and error as fields).
fn inspect_state(state: Option<&bollard::models::ContainerState>) -> MachineState {
    use ContainerStateStatusEnum as S;
    let Some(state) = state else { return MachineState::Creating };
    let detail = || {
        let mut d = format!("exit code {}", state.exit_code.unwrap_or_default());
        if let Some(e) = state.error.as_deref().filter(|e| !e.is_empty()) {
            d.push_str(&format!(", {e}"));
        }
        if state.oom_killed == Some(true) {
            d.push_str(", killed for lack of memory");
        }
        d
    };
    match state.status {
        Some(S::RUNNING | S::PAUSED) => MachineState::Running,
        Some(S::REMOVING | S::STOPPING) => MachineState::Deleting,
        Some(S::EXITED) => failed("CONTAINER_EXITED", format!("container stopped: {}", detail())),
        Some(S::DEAD) => failed("CONTAINER_DEAD", format!("container is dead: {}", detail())),
        Some(S::CREATED | S::RESTARTING | S::EMPTY) | None => MachineState::Creating,
    }
}

fn failed(code: &str, message: String) -> MachineState {
    MachineState::Failed(CreateFailure { class: ErrorClass::Other, code: code.to_owned(), message })
}

#[async_trait]
impl Driver for DockerDriver {
    fn kind(&self) -> &'static str {
        "docker"
    }

    async fn list(&self) -> Result<Vec<Machine>> {
        let docker = self.engine.client().await?;
        let filters = HashMap::from([("label", vec![format!("{CLUSTER_LABEL}={}", self.cluster)])]);
        let options = ListContainersOptionsBuilder::new().all(true).filters(&filters).build();
        let containers =
            docker.list_containers(Some(options)).await.map_err(|e| self.engine.error("list containers", e))?;
        let mut machines = Vec::with_capacity(containers.len());
        for c in containers {
            // The filter already chose the cluster; the labels are checked again all the same,
            // and a container without a group mark is not ours to manage.
            let Some(group) = self.owner(c.labels.as_ref()) else { continue };
            let Some(name) = c.names.as_ref().and_then(|n| n.first()).map(|n| n.trim_start_matches('/').to_owned())
            else {
                continue;
            };
            let Some(id) = c.id.clone() else { continue };
            let in_flight = self.creating.lock().unwrap_or_else(|e| e.into_inner()).contains(&name);
            let state = if c.state == Some(ContainerSummaryStateEnum::EXITED) && self.pool_groups.contains(group) {
                // A container cannot be marked after it is made, so in a group with a warm pool
                // every exited container is a pool machine: one that stopped on its own is
                // started again by the next scale-up, or deleted and replaced if it will not.
                MachineState::Stopped
            } else {
                listed_state(c.state, c.status.as_deref(), in_flight)
            };
            machines.push(Machine { group: group.to_owned(), name, id, state });
        }
        Ok(machines)
    }

    async fn create(&self, group: &str, name: &str) -> Result<Machine> {
        self.creating.lock().unwrap_or_else(|e| e.into_inner()).insert(name.to_owned());
        let _creating = Creating(self, name.to_owned());
        self.create_container(group, name).await
    }

    async fn delete(&self, machine: &MachineRef) -> Result<()> {
        let MachineRef { group, name, id } = machine;
        if self.dry_run {
            info!(%group, %name, engine = %self.engine.host(), "dry run: would delete container");
            return Err(Error::InvalidRequest(format!(
                "dry run: would delete container {name} on docker engine {}; nothing was deleted",
                self.engine.host()
            )));
        }
        let docker = self.engine.client().await?;
        let target = if id.is_empty() { name } else { id };
        self.own_container(docker, machine, "deleting").await?;
        let grace = self.group(group).map(stop_seconds).unwrap_or(30);
        // The stop call blocks for up to the grace period: give it that on top of the timeout.
        let patient = docker.clone().with_timeout(docker.timeout() + std::time::Duration::from_secs(grace as u64));
        let stop = StopContainerOptionsBuilder::new().t(i32::try_from(grace).unwrap_or(i32::MAX)).build();
        match patient.stop_container(target, Some(stop)).await {
            Ok(()) => {}
            Err(e) if engine::status(&e) == Some(404) => return Err(Error::NotFound(format!("container {name}"))),
            Err(e) => return Err(self.engine.error(&format!("stop container {name}"), e)),
        }
        let remove = RemoveContainerOptionsBuilder::new().force(true).v(true).build();
        match docker.remove_container(target, Some(remove)).await {
            Ok(()) => {
                info!(%group, %name, "container removed");
                Ok(())
            }
            Err(e) if engine::status(&e) == Some(404) => Err(Error::NotFound(format!("container {name}"))),
            // "removal of container ... is already in progress": the engine is finishing it.
            Err(e) if engine::status(&e) == Some(409) && engine::message(&e).contains("in progress") => Ok(()),
            Err(e) => Err(self.engine.error(&format!("remove container {name}"), e)),
        }
    }

    fn can_stop(&self) -> bool {
        true
    }

    /// `docker stop` with the group's grace period; the container is kept.
    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        self.refuse_in_dry_run("stop", &machine.name)?;
        let docker = self.engine.client().await?;
        let found = self.own_container(docker, machine, "stopping").await?;
        let id = found.id.clone().unwrap_or_else(|| machine.name.clone());
        let grace = self.group(&machine.group).map(stop_seconds).unwrap_or(30);
        let patient = docker.clone().with_timeout(docker.timeout() + std::time::Duration::from_secs(grace as u64));
        let stop = StopContainerOptionsBuilder::new().t(i32::try_from(grace).unwrap_or(i32::MAX)).build();
        match patient.stop_container(&id, Some(stop)).await {
            Ok(()) => {}
            // 304: already stopped.
            Err(e) if engine::status(&e) == Some(304) => {}
            Err(e) if engine::status(&e) == Some(404) => {
                return Err(Error::NotFound(format!("container {}", machine.name)));
            }
            Err(e) => return Err(self.engine.error(&format!("stop container {}", machine.name), e)),
        }
        info!(group = %machine.group, name = %machine.name, "container stopped into the warm pool");
        Ok(())
    }

    /// `docker start` of a stopped container; its k3s agent starts again and rejoins.
    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        self.refuse_in_dry_run("start", &machine.name)?;
        let docker = self.engine.client().await?;
        let found = self.own_container(docker, machine, "starting").await?;
        let id = found.id.clone().unwrap_or_else(|| machine.name.clone());
        match docker.start_container(&id, None).await {
            Ok(()) => {}
            // 304: already running.
            Err(e) if engine::status(&e) == Some(304) => {}
            Err(e) if engine::status(&e) == Some(404) => {
                return Err(Error::NotFound(format!("container {}", machine.name)));
            }
            Err(e) => return Err(self.engine.error(&format!("start container {}", machine.name), e)),
        }
        info!(group = %machine.group, name = %machine.name, "container started from the warm pool");
        Ok(Machine { group: machine.group.clone(), name: machine.name.clone(), id, state: MachineState::Running })
    }

    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let g = self.group(group)?;
        let (mut cpu_millis, mut memory_bytes) = (g.cpu_millis, g.memory_bytes);
        if cpu_millis.is_none() || memory_bytes.is_none() {
            // Without limits a container (and the kubelet in it) sees the whole host.
            let docker = self.engine.client().await?;
            let info = docker.info().await.map_err(|e| self.engine.error("read engine info", e))?;
            cpu_millis = cpu_millis.or(info.ncpu.and_then(|n| u64::try_from(n).ok()).map(|n| n * 1000));
            memory_bytes = memory_bytes.or(info.mem_total.and_then(|m| u64::try_from(m).ok()));
        }
        Ok(Some(Shape { cpu_millis, memory_bytes, ..Shape::default() }))
    }

    async fn check(&self) -> Result<()> {
        let docker = self.engine.client().await?;
        docker.ping().await.map(drop).map_err(|e| self.engine.error("ping", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_states_map_to_machine_states() {
        use ContainerSummaryStateEnum as S;
        assert_eq!(summary_state(Some(S::RUNNING), Some("Up 3 seconds")), MachineState::Running);
        assert_eq!(summary_state(Some(S::CREATED), None), MachineState::Creating);
        assert_eq!(summary_state(Some(S::RESTARTING), None), MachineState::Creating);
        assert_eq!(summary_state(Some(S::REMOVING), None), MachineState::Deleting);
        match summary_state(Some(S::EXITED), Some("Exited (1) 2 seconds ago")) {
            MachineState::Failed(f) => {
                assert_eq!(f.class, ErrorClass::Other);
                assert_eq!(f.code, "CONTAINER_EXITED");
                assert!(f.message.contains("Exited (1)"), "{}", f.message);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(matches!(summary_state(Some(S::DEAD), None), MachineState::Failed(f) if f.code == "CONTAINER_DEAD"));
        // A container still `created` is being created only while a create of this process
        // works on it; otherwise an interrupted create left it, and it will never start.
        assert_eq!(listed_state(Some(S::CREATED), None, true), MachineState::Creating);
        assert!(
            matches!(listed_state(Some(S::CREATED), None, false), MachineState::Failed(f) if f.code == "INTERRUPTED")
        );
        assert_eq!(listed_state(Some(S::RUNNING), None, false), MachineState::Running);
    }

    fn driver_for(text: &str) -> DockerDriver {
        let t: toml::Table = text.parse().unwrap();
        let mut p = crate::config::Problems::new("test.toml", ".");
        let mut s = crate::config::Section::new("groups.g.machine", &t);
        let g = GroupSettings::parse(&mut s, &mut p).unwrap();
        s.finish(&mut p);
        assert!(p.is_empty(), "{p}");
        let cloud = CloudSettings {
            host: Host::Unix("/nonexistent.sock".into()),
            timeout: std::time::Duration::from_secs(5),
            dry_run: false,
        };
        DockerDriver::new("c1", cloud, BTreeMap::from([("g".to_owned(), g)]))
    }

    #[test]
    fn a_container_is_marked_named_and_limited_as_configured() {
        let d = driver_for(
            r#"image = "rancher/k3s:v1.31.4-k3s1"
            k3s_url = "https://server:6443"
            k3s_token = "t0ken"
            cpus = "1500m"
            memory = "1Gi"
            network = "k3s"
            restart = "unless-stopped"
            stop_timeout = "1500ms"
            tmpfs = { "/run" = "" }
            labels = { team = "infra" }"#,
        );
        let body = d.container_body("g", "c1-g-abcde", &d.groups["g"]);
        assert_eq!(body.hostname.as_deref(), Some("c1-g-abcde"));
        assert_eq!(body.cmd, Some(vec!["agent".to_owned()]));
        let labels = body.labels.unwrap();
        assert_eq!(labels[CLUSTER_LABEL], "c1");
        assert_eq!(labels[GROUP_LABEL], "g");
        assert_eq!(labels["team"], "infra");
        let env = body.env.unwrap();
        for expected in ["K3S_URL=https://server:6443", "K3S_TOKEN=t0ken", "K3S_NODE_NAME=c1-g-abcde"] {
            assert!(env.iter().any(|e| e == expected), "missing {expected}");
        }
        assert_eq!(body.stop_timeout, Some(2));
        let hc = body.host_config.unwrap();
        assert_eq!(hc.nano_cpus, Some(1_500_000_000));
        assert_eq!(hc.memory, Some(1 << 30));
        assert_eq!(hc.network_mode.as_deref(), Some("k3s"));
        assert_eq!(hc.restart_policy.unwrap().name, Some(RestartPolicyNameEnum::UNLESS_STOPPED));
        assert_eq!(hc.privileged, Some(false));
    }

    #[test]
    fn only_containers_with_both_marks_of_this_cluster_are_owned() {
        let d = driver_for("image = \"i\"");
        let labels = |pairs: &[(&str, &str)]| -> HashMap<String, String> {
            pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
        };
        assert_eq!(d.owner(Some(&labels(&[(CLUSTER_LABEL, "c1"), (GROUP_LABEL, "g")]))), Some("g"));
        assert_eq!(d.owner(Some(&labels(&[(CLUSTER_LABEL, "c2"), (GROUP_LABEL, "g")]))), None);
        assert_eq!(d.owner(Some(&labels(&[(CLUSTER_LABEL, "c1")]))), None);
        assert_eq!(d.owner(Some(&labels(&[(GROUP_LABEL, "g")]))), None);
        assert_eq!(d.owner(None), None);
    }

    #[tokio::test]
    async fn shape_comes_from_the_limits_without_asking_the_engine() {
        let d = driver_for("image = \"i\"\ncpus = \"2\"\nmemory = \"4Gi\"");
        // The engine address leads nowhere: any engine call would fail.
        let shape = d.shape("g").await.unwrap().unwrap();
        assert_eq!(shape.cpu_millis, Some(2000));
        assert_eq!(shape.memory_bytes, Some(4 << 30));
    }
}
