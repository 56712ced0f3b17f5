//! The driver contract: the one seam between Flotilla's core and a cloud.
//!
//! A driver knows how to list, create and delete machines on one cloud account, and nothing
//! else: no target sizes, no gRPC, no metrics (those wrap it from outside, see [`metered`]).
//!
//! # Contract
//! * **Ownership.** `create` marks each machine with the cluster and group it belongs to, in
//!   the same cloud call that creates it (tags, labels, metadata). `list` returns exactly the
//!   machines carrying this cluster's marks and never anything else, so Flotilla can restart
//!   with no local state and never touches a machine it did not create.
//! * **Listing.** `list` is one listing of the cloud (paginated if it must be), never one call
//!   per machine: `Refresh` calls it once per cloud per cluster-autoscaler loop.
//! * **Create** returns once the cloud holds the machine (it may still be booting, reported as
//!   [`MachineState::Creating`]). On error the driver removes whatever it half-created, as far
//!   as it can; anything it could not remove still carries the marks and shows up in `list`.
//! * **Delete** of a machine that is already gone returns [`Error::NotFound`]; the caller treats
//!   that as done, so a delete can be repeated safely. The core deletes again every machine
//!   `list` reports as [`MachineState::Deleting`] that it has no delete running for (that is how
//!   an accepted delete survives a restart, see [`Driver::mark_deleting`]), so a delete of a
//!   machine the cloud is already deleting must succeed or be `NotFound`.
//! * Errors are classified ([`Error`]) the same way for every cloud; the core maps them to gRPC
//!   statuses and cluster-autoscaler error classes in one place.

use std::{fmt, sync::Arc, time::Duration};

use async_trait::async_trait;

use crate::config::{CLOUD_KEYS, Config, Problems, Section};

pub mod docker;
pub mod metered;
pub mod openstack;
pub mod proxmox;
pub mod simulated;

/// One machine as the cloud reports it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// The node group, read back from the ownership mark set at creation.
    pub group: String,
    /// The name Flotilla gave the machine (also the Kubernetes node name where the cloud lets
    /// the machine pick its hostname).
    pub name: String,
    /// The cloud's own identifier (server UUID, VMID, container id). Equal to `name` on clouds
    /// that key machines by name.
    pub id: String,
    pub state: MachineState,
}

/// The lifecycle state of a machine, as far as the cloud can tell.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MachineState {
    /// Accepted by the cloud, not yet running.
    Creating,
    Running,
    /// Being deleted by the cloud.
    Deleting,
    /// The cloud gave up on it (e.g. Nova ERROR); cluster-autoscaler will delete it.
    Failed(CreateFailure),
}

/// Why a machine could not be created, in cluster-autoscaler's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateFailure {
    pub class: ErrorClass,
    /// A short machine-readable code, e.g. `QUOTA_EXCEEDED`.
    pub code: String,
    pub message: String,
}

/// cluster-autoscaler's instance error classes (`cloudprovider.InstanceErrorClass`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorClass {
    /// Quota or capacity: CA backs off this group and tries another.
    OutOfResources,
    Other,
}

impl ErrorClass {
    /// The value of `InstanceErrorInfo.instanceErrorClass` on the wire.
    pub fn wire_value(self) -> i32 {
        match self {
            ErrorClass::OutOfResources => 1,
            ErrorClass::Other => 99,
        }
    }
}

/// What a template node should advertise, as far as the cloud knows it (flavor, template VM,
/// container limits). Configuration overrides each field.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Shape {
    pub cpu_millis: Option<u64>,
    pub memory_bytes: Option<u64>,
    pub ephemeral_storage_bytes: Option<u64>,
    pub gpus: Option<u64>,
    pub instance_type: Option<String>,
}

/// A machine the core asks a driver to delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineRef {
    pub group: String,
    pub name: String,
    pub id: String,
}

impl From<&Machine> for MachineRef {
    fn from(m: &Machine) -> Self {
        MachineRef { group: m.group.clone(), name: m.name.clone(), id: m.id.clone() }
    }
}

/// Errors every driver reports in the same terms.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The machine (or another named object) does not exist. For `delete` this means done.
    #[error("not found: {0}")]
    NotFound(String),
    /// Quota exhausted or no capacity left: cluster-autoscaler should try another group.
    #[error("out of resources: {0}")]
    OutOfResources(String),
    /// The cloud rejected the credentials.
    #[error("cloud rejected the credentials: {0}")]
    Unauthorized(String),
    /// The cloud rejected the request as invalid (bad flavor, missing image, ...).
    #[error("cloud rejected the request: {0}")]
    InvalidRequest(String),
    /// The cloud could not be reached or answered with a server error; worth retrying.
    #[error("cloud unavailable: {0}")]
    Unavailable(String),
    /// The cloud asked us to slow down.
    #[error("rate limited by the cloud{}: {message}", retry_after.map(|d| format!(" (retry after {d:?})")).unwrap_or_default())]
    RateLimited { message: String, retry_after: Option<Duration> },
    /// The call did not finish in time.
    #[error("timed out: {0}")]
    Timeout(String),
    /// Anything else, with the cloud's own words.
    #[error("{0}")]
    Other(String),
}

/// The driver-level result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A short label for metrics and error codes.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::OutOfResources(_) => "out_of_resources",
            Error::Unauthorized(_) => "unauthorized",
            Error::InvalidRequest(_) => "invalid_request",
            Error::Unavailable(_) => "unavailable",
            Error::RateLimited { .. } => "rate_limited",
            Error::Timeout(_) => "timeout",
            Error::Other(_) => "other",
        }
    }

    /// How cluster-autoscaler should see a failed create with this error.
    pub fn to_create_failure(&self) -> CreateFailure {
        let class = match self {
            Error::OutOfResources(_) => ErrorClass::OutOfResources,
            _ => ErrorClass::Other,
        };
        CreateFailure { class, code: self.kind().to_ascii_uppercase(), message: self.to_string() }
    }
}

/// One cloud account, as seen by the core.
#[async_trait]
pub trait Driver: Send + Sync + fmt::Debug {
    /// The driver's name (`simulated`, `docker`, ...), for logs and metrics.
    fn kind(&self) -> &'static str;

    /// Every machine on this cloud that carries this cluster's ownership marks, for all groups.
    async fn list(&self) -> Result<Vec<Machine>>;

    /// Creates one machine named `name` in `group`.
    async fn create(&self, group: &str, name: &str) -> Result<Machine>;

    /// Deletes one machine; [`Error::NotFound`] if it is already gone.
    async fn delete(&self, machine: &MachineRef) -> Result<()>;

    /// Marks `machine`, in the cloud, as one Flotilla is deleting, so the intent outlives this
    /// process: from then on `list` reports it as [`MachineState::Deleting`], and a restarted
    /// Flotilla deletes it again. The core calls it before `delete`, while `NodeGroupDeleteNodes`
    /// waits, so it must be one quick call (a tag, label or metadata update).
    /// [`Error::NotFound`] means the machine is gone, which is as good as deleted.
    ///
    /// The default marks nothing: on a cloud that cannot mark a machine, an accepted delete lives
    /// in memory until its delete call reaches the cloud.
    async fn mark_deleting(&self, machine: &MachineRef) -> Result<()> {
        let _ = machine;
        Ok(())
    }

    /// What a machine of `group` looks like, for the template node. `None` when the cloud does
    /// not know (configuration must then say).
    async fn shape(&self, group: &str) -> Result<Option<Shape>> {
        let _ = group;
        Ok(None)
    }

    /// Probes reachability and credentials without changing anything.
    async fn check(&self) -> Result<()>;
}

/// A driver shared between the state layer and its background tasks.
pub type SharedDriver = Arc<dyn Driver>;

/// Drivers Flotilla knows, for messages.
pub const KINDS: &[&str] = &["simulated", "docker", "openstack", "proxmox"];

/// The provider-id format a driver's machines get unless a group says otherwise: what the
/// node's kubelet or cloud controller sets.
pub fn default_provider_id(driver: &str) -> &'static str {
    match driver {
        "simulated" => "simulated://{cluster}/{name}",
        // What the OpenStack cloud controller manager sets.
        "openstack" => "openstack:///{id}",
        "proxmox" => "proxmox://{region}/{id}",
        // What a k3s agent registers: its node name is the container's hostname.
        "docker" => "k3s://{name}",
        _ => "{name}",
    }
}

/// Builds one driver per cloud (in configuration order), reading each driver's own keys from
/// its `[clouds.NAME]` table and its groups' `machine` tables. Every problem goes into `p`.
pub fn build(config: &Config, p: &mut Problems) -> Vec<SharedDriver> {
    let empty = toml::Table::new();
    let clouds_table = config.raw.get("clouds").and_then(|v| v.as_table()).unwrap_or(&empty);
    let groups_table = config.raw.get("groups").and_then(|v| v.as_table()).unwrap_or(&empty);
    let mut drivers: Vec<SharedDriver> = Vec::new();
    for cloud in &config.clouds {
        let table = clouds_table.get(&cloud.name).and_then(|v| v.as_table()).unwrap_or(&empty);
        let mut section = Section::new(format!("clouds.{}", cloud.name), table).skipping(CLOUD_KEYS);
        // Each group's `machine` table, for the driver to read.
        let mut machines: Vec<(&str, Section<'_>)> = Vec::new();
        for g in config.groups.iter().filter(|g| g.cloud == cloud.name) {
            let machine = groups_table
                .get(&g.name)
                .and_then(|v| v.as_table())
                .and_then(|t| t.get("machine"))
                .and_then(|v| v.as_table())
                .unwrap_or(&empty);
            machines.push((g.name.as_str(), Section::new(format!("groups.{}.machine", g.name), machine)));
        }
        let driver: Option<SharedDriver> = match cloud.driver.as_str() {
            "simulated" => {
                let settings = simulated::Settings::parse(&mut section, p);
                let mut registering = Vec::new();
                for (group, mut m) in machines.drain(..) {
                    if m.boolean("register_node", p).unwrap_or(true) {
                        registering.push(group);
                    }
                    m.finish(p);
                }
                let registrar = settings.kubeconfig.clone().map(|path| {
                    simulated::nodes::Registrar::new(
                        path,
                        &config.cluster_name,
                        node_shapes(config, &cloud.region, &registering),
                    )
                });
                match simulated::Simulated::new(&config.cluster_name, settings) {
                    Ok(d) => Some(Arc::new(match registrar {
                        Some(r) => d.with_registrar(r),
                        None => d,
                    })),
                    Err(e) => {
                        p.push(section.key_path("state_file"), format!("cannot load: {e}"));
                        None
                    }
                }
            }
            "openstack" => {
                let settings = openstack::CloudSettings::parse(&mut section, p);
                let mut groups = Vec::new();
                let wanted = machines.len();
                for (name, mut m) in machines.drain(..) {
                    if let Some(g) = openstack::GroupSettings::parse(&config.cluster_name, name, &mut m, p) {
                        groups.push((name.to_owned(), g));
                    }
                    m.finish(p);
                }
                match settings {
                    Some(settings) if groups.len() == wanted => {
                        match openstack::OpenStack::new(&config.cluster_name, settings, groups) {
                            Ok(d) => Some(Arc::new(d)),
                            Err(e) => {
                                p.push(section.path(), e.to_string());
                                None
                            }
                        }
                    }
                    _ => None,
                }
            }
            "proxmox" => {
                let cloud_settings = proxmox::CloudSettings::parse(&mut section, p);
                let mut groups = std::collections::HashMap::new();
                let mut prefixes = Vec::new();
                for (group, mut m) in machines.drain(..) {
                    if let Some(g) = proxmox::GroupSettings::parse(group, &mut m, p) {
                        groups.insert(group.to_owned(), g);
                    }
                    m.finish(p);
                    if let Some(gc) = config.groups.iter().find(|g| g.name == group) {
                        prefixes.push((group.to_owned(), gc.name_prefix.clone()));
                    }
                }
                match cloud_settings {
                    Some(settings) => match proxmox::Proxmox::new(&config.cluster_name, settings, groups, prefixes) {
                        Ok(d) => Some(Arc::new(d)),
                        Err(e) => {
                            p.push(section.key_path("ca_file"), format!("cannot set up TLS: {e}"));
                            None
                        }
                    },
                    None => None,
                }
            }
            "docker" => {
                let settings = docker::CloudSettings::parse(&mut section, p);
                let mut groups = std::collections::BTreeMap::new();
                for (group, mut m) in machines.drain(..) {
                    if let Some(g) = docker::GroupSettings::parse(&mut m, p) {
                        groups.insert(group.to_owned(), g);
                    }
                    m.finish(p);
                }
                settings.map(|s| Arc::new(docker::DockerDriver::new(&config.cluster_name, s, groups)) as SharedDriver)
            }
            other => {
                // Its keys mean nothing without the driver: report only the driver name.
                p.push(section.key_path("driver"), format!("unknown driver {other:?} (known: {})", KINDS.join(", ")));
                continue;
            }
        };
        section.finish(p);
        if let Some(d) = driver {
            drivers.push(d);
        }
    }
    drivers
}

/// How the Nodes of each named group look, for drivers that register Nodes themselves: the
/// core's template node and provider-id format, so a Node matches what the core reports.
fn node_shapes(
    config: &Config,
    region: &str,
    groups: &[&str],
) -> std::collections::BTreeMap<String, simulated::nodes::GroupNodes> {
    config
        .groups
        .iter()
        .filter(|g| groups.contains(&g.name.as_str()))
        .map(|g| {
            let nodes = simulated::nodes::GroupNodes {
                template: crate::template::Template::build(g, Shape::default(), &config.gpu.label),
                provider_id: g.provider_id.clone(),
                region: region.to_owned(),
            };
            (g.name.clone(), nodes)
        })
        .collect()
}
