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

use crate::config::{CLOUD_KEYS, CloudConfig, Config, GroupConfig, Problems, Section};

pub mod docker;
pub mod http;
pub mod kamatera;
pub mod metered;
pub mod openstack;
pub mod proxmox;
pub mod script;
pub mod simulated;
pub mod slicer;

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
    /// Stopped and kept, ready to be started again: a warm-pool machine. Reported only for
    /// groups with a warm pool (`GroupConfig::warm_pool > 0`) by drivers that can stop
    /// ([`Driver::can_stop`]); in any other group a stopped machine is reported as it always
    /// was (typically `Failed`, so cluster-autoscaler deletes it).
    Stopped,
}

/// Why a machine could not be created, in cluster-autoscaler's terms.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateFailure {
    pub class: ErrorClass,
    /// A short machine-readable code: the error class for a failed create call
    /// (`OUT_OF_RESOURCES`, `INVALID_REQUEST`, ...), the same code for the same cause when the
    /// cloud fails a machine later, or a cloud's own verdict with no create-call counterpart
    /// (`NO_VALID_HOST`, `INTERRUPTED`).
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
    /// `kubernetes.io/arch` of the machines (`amd64`, `arm64`), when the cloud knows it.
    pub arch: Option<String>,
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

    /// Warm pools (optional): whether this cloud can stop a machine and start it again. A driver
    /// that can implements [`Driver::stop`] and [`Driver::start`], and `list` reports a stopped
    /// machine of a group with a warm pool as [`MachineState::Stopped`]. The core refuses
    /// `warm_pool` on a cloud whose driver cannot.
    fn can_stop(&self) -> bool {
        false
    }

    /// Stops a running machine and keeps it, with its ownership marks, for a later `start`;
    /// returns once the cloud has accepted the stop. From then on `list` reports it
    /// [`MachineState::Stopped`] (once it is). [`Error::NotFound`] if it is gone.
    async fn stop(&self, machine: &MachineRef) -> Result<()> {
        let _ = machine;
        Err(Error::InvalidRequest(format!("the {} driver cannot stop machines", self.kind())))
    }

    /// Starts a stopped machine; returns it as the cloud reports it then (usually Creating while
    /// it boots). On error the core deletes the machine and creates a new one instead.
    async fn start(&self, machine: &MachineRef) -> Result<Machine> {
        let _ = machine;
        Err(Error::InvalidRequest(format!("the {} driver cannot start machines", self.kind())))
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

/// What a driver's constructor gets: its keys and the core's view of its cloud and groups.
///
/// The registry marks the core's keys of `[clouds.NAME]` as read before the constructor runs,
/// and checks for unknown keys in `section` and every group's `machine` after it returns, so a
/// constructor only reads the keys it knows.
#[derive(Debug)]
pub struct CloudSetup<'a> {
    /// `cluster_name` of the configuration.
    pub cluster: &'a str,
    /// The cloud's core settings (name, region, concurrency, timeouts).
    pub cloud: &'a CloudConfig,
    /// The driver's keys of `[clouds.NAME]`.
    pub section: Section<'a>,
    /// The groups on this cloud, in configuration order.
    pub groups: Vec<GroupSetup<'a>>,
    /// The node label cluster-autoscaler reads GPU types from.
    pub gpu_label: &'a str,
    /// The one Kubernetes API client (`[kubernetes]`), for drivers that talk to the cluster
    /// (the simulated cloud's kwok Nodes).
    pub kube: &'a crate::kube::Client,
}

/// One group of a [`CloudSetup`].
#[derive(Debug)]
pub struct GroupSetup<'a> {
    /// The group's core settings (name, name_prefix, provider_id, sizes, template).
    pub config: &'a GroupConfig,
    /// `[groups.NAME.machine]`, the driver's keys for this group.
    pub machine: Section<'a>,
}

impl GroupSetup<'_> {
    pub fn name(&self) -> &str {
        &self.config.name
    }
}

/// A driver's constructor: reads its keys, reports every problem into `p`, and returns the
/// driver, or `None` when the configuration cannot make one (the problems say why).
pub type Constructor = fn(setup: &mut CloudSetup<'_>, p: &mut Problems) -> Option<SharedDriver>;

/// One kind of driver: a row of [`KINDS`].
#[derive(Clone, Copy, Debug)]
pub struct Kind {
    /// The value of `driver = "..."`.
    pub name: &'static str,
    /// The provider-id format machines get unless a group says otherwise: what the node's
    /// kubelet or cloud controller sets.
    pub default_provider_id: &'static str,
    pub build: Constructor,
}

/// Every driver Flotilla knows. A new driver is a folder under `src/driver/` with a
/// [`Constructor`], and a row here.
pub const KINDS: &[Kind] = &[
    Kind { name: "simulated", default_provider_id: "simulated://{cluster}/{name}", build: simulated::build },
    // What a k3s agent registers: its node name is the container's hostname.
    Kind { name: "docker", default_provider_id: "k3s://{name}", build: docker::build },
    // What the OpenStack cloud controller manager sets.
    Kind { name: "openstack", default_provider_id: "openstack:///{id}", build: openstack::build },
    Kind { name: "proxmox", default_provider_id: "proxmox://{region}/{id}", build: proxmox::build },
    // What the in-tree Kamatera provider reports (and patches onto Nodes), so existing Nodes match.
    Kind { name: "kamatera", default_provider_id: "kamatera://{name}", build: kamatera::build },
    // What the agent registers (its kubelet gets it): the node is named after the VM's hostname.
    Kind { name: "slicer", default_provider_id: "k3s://{id}", build: slicer::build },
];

/// The row of driver `name`.
pub fn kind(name: &str) -> Option<&'static Kind> {
    KINDS.iter().find(|k| k.name == name)
}

/// The names of every driver, for messages.
pub fn kind_names() -> Vec<&'static str> {
    KINDS.iter().map(|k| k.name).collect()
}

/// The provider-id format a driver's machines get unless a group says otherwise.
pub fn default_provider_id(driver: &str) -> &'static str {
    kind(driver).map(|k| k.default_provider_id).unwrap_or("{name}")
}

/// Builds one driver per cloud (in configuration order), each by its [`Kind`]'s constructor
/// from its `[clouds.NAME]` table and its groups' `machine` tables. Every problem goes into `p`.
pub fn build(config: &Config, p: &mut Problems) -> Vec<SharedDriver> {
    static EMPTY: std::sync::LazyLock<toml::Table> = std::sync::LazyLock::new(toml::Table::new);
    let table_at = |root: &str, name: &str| -> &toml::Table {
        config
            .raw
            .get(root)
            .and_then(|v| v.as_table())
            .and_then(|t| t.get(name))
            .and_then(|v| v.as_table())
            .unwrap_or(&EMPTY)
    };
    let mut drivers: Vec<SharedDriver> = Vec::new();
    for cloud in &config.clouds {
        let section =
            Section::new(format!("clouds.{}", cloud.name), table_at("clouds", &cloud.name)).skipping(CLOUD_KEYS);
        let Some(kind) = kind(&cloud.driver) else {
            // Its keys mean nothing without the driver: report only the driver name.
            p.push(
                section.key_path("driver"),
                format!("unknown driver {:?} (known: {})", cloud.driver, kind_names().join(", ")),
            );
            continue;
        };
        let groups = config
            .groups
            .iter()
            .filter(|g| g.cloud == cloud.name)
            .map(|g| {
                let machine = table_at("groups", &g.name).get("machine").and_then(|v| v.as_table()).unwrap_or(&EMPTY);
                GroupSetup { config: g, machine: Section::new(format!("groups.{}.machine", g.name), machine) }
            })
            .collect();
        let mut setup = CloudSetup {
            cluster: &config.cluster_name,
            cloud,
            section,
            groups,
            gpu_label: &config.gpu.label,
            kube: &config.kube,
        };
        let driver = (kind.build)(&mut setup, p);
        for g in setup.groups {
            if g.config.warm_pool > 0 && driver.as_ref().is_some_and(|d| !d.can_stop()) {
                p.push(
                    format!("groups.{}.warm_pool", g.config.name),
                    format!("the {} driver cannot stop and start machines, so it cannot keep a warm pool", kind.name),
                );
            }
            g.machine.finish(p);
        }
        setup.section.finish(p);
        drivers.extend(driver);
    }
    drivers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_listed_once_with_a_provider_id_format() {
        let names = kind_names();
        let unique: std::collections::BTreeSet<_> = names.iter().collect();
        assert_eq!(unique.len(), names.len(), "{names:?}");
        for k in KINDS {
            assert!(crate::provider_id::ProviderIdFormat::parse(k.default_provider_id).is_ok(), "{}", k.name);
            assert_eq!(default_provider_id(k.name), k.default_provider_id);
        }
        assert_eq!(default_provider_id("no-such-driver"), "{name}");
    }

    #[test]
    fn an_unknown_driver_is_named_with_the_known_ones_and_its_keys_are_not_reported() {
        let text = "cluster_name = \"c\"\n[clouds.x]\ndriver = \"vmware\"\nvcenter = \"v\"\n\
                    [groups.g]\ncloud = \"x\"\nmax_size = 1\n[groups.g.machine]\nfoo = 1\n";
        let config = Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let mut p = Problems::new("t.toml", ".");
        assert!(build(&config, &mut p).is_empty());
        assert_eq!(p.items.len(), 1, "{p}");
        assert_eq!(p.items[0].path, "clouds.x.driver");
        assert!(p.items[0].message.contains("simulated, docker, openstack, proxmox"), "{p}");
    }

    #[test]
    fn keys_no_constructor_read_are_reported_by_the_registry() {
        let text = "cluster_name = \"c\"\n[clouds.sim]\ndriver = \"simulated\"\nboot_tiem = \"1s\"\n\
                    [groups.g]\ncloud = \"sim\"\nmax_size = 1\n[groups.g.machine]\nregister_nodes = false\n";
        let config = Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let mut p = Problems::new("t.toml", ".");
        build(&config, &mut p);
        let paths: Vec<&str> = p.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["groups.g.machine.register_nodes", "clouds.sim.boot_tiem"], "{p}");
    }
}
