//! Prometheus metrics. The registry is built once; the service, the state layer, the driver
//! decorator and the `/metrics` handler hold the same [`Metrics`].
//!
//! Names follow the Prometheus conventions: a `flotilla_` prefix, base units in the name
//! (`_seconds`, with OpenMetrics `# UNIT` lines), `_total` on counters, `_info` on the build
//! info. Beside them the standard `process_*` metrics (see [`super::process`]).

use std::sync::Mutex;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram, info::Info},
    registry::{Registry, Unit},
};

use crate::state::Fleet;

/// Labels of one RPC outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RpcLabels {
    pub method: &'static str,
    pub code: &'static str,
}

/// Labels of one driver call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverLabels {
    pub cloud: String,
    pub driver: &'static str,
    pub operation: &'static str,
}

/// Labels of one failed driver call.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DriverErrorLabels {
    pub cloud: String,
    pub driver: &'static str,
    pub operation: &'static str,
    pub kind: &'static str,
}

/// Labels of creates and deletes of one node group.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GroupLabels {
    group: String,
}

/// Labels of one failed create: cluster-autoscaler's error class (`out_of_resources`, `other`).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CreateFailureLabels {
    group: String,
    class: &'static str,
}

/// Labels of one failed delete: the driver's error kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DeleteFailureLabels {
    group: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolLabels {
    group: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PoolStartLabels {
    group: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    version: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct InstanceLabels {
    group: String,
    state: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn rpc_histogram() -> Histogram {
    // 25 µs .. ~6.5 s: in-memory RPCs sit at the bottom, Refresh near the top.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(25e-6, 2.0, 19))
}

fn driver_histogram() -> Histogram {
    // 1 ms .. ~9 min: cloud calls range from a local socket to a VM clone.
    Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(1e-3, 2.0, 20))
}

/// Every metric Flotilla exports.
#[derive(Debug)]
pub struct Metrics {
    registry: Mutex<Registry>,
    rpc_requests: Family<RpcLabels, Counter>,
    rpc_duration: HistogramFamily<RpcLabels>,
    driver_duration: HistogramFamily<DriverLabels>,
    driver_calls: Family<DriverLabels, Counter>,
    driver_errors: Family<DriverErrorLabels, Counter>,
    instances: Family<InstanceLabels, Gauge>,
    ready: Gauge,
    leader: Gauge,
    creates: Family<GroupLabels, Counter>,
    create_failures: Family<CreateFailureLabels, Counter>,
    deletes: Family<GroupLabels, Counter>,
    delete_failures: Family<DeleteFailureLabels, Counter>,
    pool_machines: Family<PoolLabels, Gauge>,
    pool_capacity: Family<GroupLabels, Gauge>,
    pool_starts: Family<PoolStartLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut root = Registry::default();
        root.register_collector(Box::new(super::process::ProcessCollector));
        let registry = root.sub_registry_with_prefix("flotilla");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        let driver_duration =
            HistogramFamily::<DriverLabels>::new_with_constructor(driver_histogram as fn() -> Histogram);
        let driver_calls = Family::<DriverLabels, Counter>::default();
        let driver_errors = Family::<DriverErrorLabels, Counter>::default();
        let instances = Family::<InstanceLabels, Gauge>::default();
        let ready = Gauge::default();
        let leader = Gauge::default();
        let creates = Family::<GroupLabels, Counter>::default();
        let create_failures = Family::<CreateFailureLabels, Counter>::default();
        let deletes = Family::<GroupLabels, Counter>::default();
        let delete_failures = Family::<DeleteFailureLabels, Counter>::default();
        let pool_machines = Family::<PoolLabels, Gauge>::default();
        let pool_capacity = Family::<GroupLabels, Gauge>::default();
        let pool_starts = Family::<PoolStartLabels, Counter>::default();
        registry.register("grpc_requests", "gRPC requests served, by method and status code", rpc_requests.clone());
        registry.register_with_unit(
            "grpc_request_duration",
            "Server-side gRPC latency, by method and status code",
            Unit::Seconds,
            rpc_duration.clone(),
        );
        registry.register_with_unit(
            "driver_call_duration",
            "Latency of cloud driver calls, by cloud and operation",
            Unit::Seconds,
            driver_duration.clone(),
        );
        registry.register("driver_calls", "Cloud driver calls, by cloud and operation", driver_calls.clone());
        registry.register(
            "driver_errors",
            "Failed cloud driver calls, by cloud, operation and error kind",
            driver_errors.clone(),
        );
        registry.register("instances", "Instances by node group and state", instances.clone());
        registry.register(
            "ready",
            "1 when every cloud has been listed and its newest listing succeeded",
            ready.clone(),
        );
        registry.register(
            "leader",
            "1 while this replica may act: always with leader election off, else while it holds the Lease",
            leader.clone(),
        );
        registry.register("creates", "Machine creates started, by node group", creates.clone());
        registry.register(
            "create_failures",
            "Failed machine creates (the call failed, timed out, or the cloud reported the machine failed), by node group and cluster-autoscaler error class",
            create_failures.clone(),
        );
        registry.register("deletes", "Machine deletes started, by node group", deletes.clone());
        registry.register(
            "delete_failures",
            "Failed machine deletes (retried at the next reconcile), by node group and error kind",
            delete_failures.clone(),
        );
        registry.register(
            "warm_pool_machines",
            "Warm pool machines by node group and state: stopped (kept, not reported to cluster-autoscaler), stopping, starting",
            pool_machines.clone(),
        );
        registry.register(
            "warm_pool_capacity",
            "The most machines a node group's warm pool keeps stopped (groups.G.warm_pool)",
            pool_capacity.clone(),
        );
        registry.register(
            "warm_pool_starts",
            "Pool machines started for a scale-up, by node group and result (failed ones are deleted and replaced by creates)",
            pool_starts.clone(),
        );
        registry.register(
            "build",
            "Flotilla's version; the value is always 1",
            Info::new(BuildLabels { version: env!("CARGO_PKG_VERSION") }),
        );
        Metrics {
            registry: Mutex::new(root),
            rpc_requests,
            rpc_duration,
            driver_duration,
            driver_calls,
            driver_errors,
            instances,
            ready,
            leader,
            creates,
            create_failures,
            deletes,
            delete_failures,
            pool_machines,
            pool_capacity,
            pool_starts,
        }
    }

    /// Records a pool machine started for a scale-up.
    pub fn observe_pool_start(&self, group: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.pool_starts.get_or_create(&PoolStartLabels { group: group.to_owned(), result }).inc();
    }

    /// Records a create handed to the driver.
    pub fn observe_create(&self, group: &str) {
        self.creates.get_or_create(&GroupLabels { group: group.to_owned() }).inc();
    }

    /// Records a failed create (a failed or timed-out call, or a machine the cloud reports failed).
    pub fn observe_create_failure(&self, group: &str, class: crate::driver::ErrorClass) {
        let class = match class {
            crate::driver::ErrorClass::OutOfResources => "out_of_resources",
            crate::driver::ErrorClass::Other => "other",
        };
        self.create_failures.get_or_create(&CreateFailureLabels { group: group.to_owned(), class }).inc();
    }

    /// Records a delete handed to the driver and, if it failed, its error kind.
    pub fn observe_delete(&self, group: &str, error: Option<&'static str>) {
        self.deletes.get_or_create(&GroupLabels { group: group.to_owned() }).inc();
        if let Some(kind) = error {
            self.delete_failures.get_or_create(&DeleteFailureLabels { group: group.to_owned(), kind }).inc();
        }
    }

    /// Records one served RPC.
    pub fn observe_rpc(&self, method: &'static str, code: tonic::Code, seconds: f64) {
        let labels = RpcLabels { method, code: code_name(code) };
        self.rpc_duration.get_or_create(&labels).observe(seconds);
        self.rpc_requests.get_or_create(&labels).inc();
    }

    /// Records one driver call and, if it failed, its error kind.
    pub fn observe_driver(&self, labels: &DriverLabels, seconds: f64, error: Option<&'static str>) {
        self.driver_duration.get_or_create(labels).observe(seconds);
        self.driver_calls.get_or_create(labels).inc();
        if let Some(kind) = error {
            let l = DriverErrorLabels {
                cloud: labels.cloud.clone(),
                driver: labels.driver,
                operation: labels.operation,
                kind,
            };
            self.driver_errors.get_or_create(&l).inc();
        }
    }

    /// How many driver calls of one operation were made on one cloud (for tests and benches).
    pub fn driver_calls(&self, cloud: &str, driver: &'static str, operation: &'static str) -> u64 {
        let labels = DriverLabels { cloud: cloud.to_owned(), driver, operation };
        self.driver_calls.get(&labels).map(|c| c.get()).unwrap_or(0)
    }

    /// Renders the text exposition format, with instance gauges read from the fleet now.
    pub fn render(&self, fleet: &Fleet) -> String {
        // Held from the clear to the encode: a concurrent scrape must never see the instance
        // gauges half refilled.
        let registry = self.registry.lock().unwrap_or_else(|e| e.into_inner());
        self.instances.clear();
        for (group, counts) in fleet.groups.iter().zip(fleet.phase_counts()) {
            for (state, n) in [
                ("creating", counts.creating),
                ("running", counts.running),
                ("deleting", counts.deleting),
                ("failed", counts.failed),
            ] {
                self.instances.get_or_create(&InstanceLabels { group: group.config.name.clone(), state }).set(n as i64);
            }
            if group.config.warm_pool > 0 {
                let name = group.config.name.clone();
                for (state, n) in [
                    ("stopped", counts.pool_stopped),
                    ("stopping", counts.pool_stopping),
                    ("starting", counts.pool_starting),
                ] {
                    self.pool_machines.get_or_create(&PoolLabels { group: name.clone(), state }).set(n as i64);
                }
                self.pool_capacity.get_or_create(&GroupLabels { group: name }).set(i64::from(group.config.warm_pool));
            }
        }
        self.ready.set(i64::from(fleet.ready()));
        self.leader.set(i64::from(fleet.leading()));
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String cannot fail");
        out
    }
}

/// The canonical upper-snake name of a gRPC code, as Prometheus label value.
pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}
