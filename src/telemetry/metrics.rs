//! Prometheus metrics. The registry is built once; the service, the driver decorator and the
//! `/metrics` handler hold the same [`Metrics`].

use std::sync::Mutex;

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
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
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::with_prefix("flotilla");
        let rpc_requests = Family::<RpcLabels, Counter>::default();
        let rpc_duration = HistogramFamily::<RpcLabels>::new_with_constructor(rpc_histogram as fn() -> Histogram);
        let driver_duration =
            HistogramFamily::<DriverLabels>::new_with_constructor(driver_histogram as fn() -> Histogram);
        let driver_calls = Family::<DriverLabels, Counter>::default();
        let driver_errors = Family::<DriverErrorLabels, Counter>::default();
        let instances = Family::<InstanceLabels, Gauge>::default();
        let ready = Gauge::default();
        registry.register("grpc_requests", "gRPC requests served, by method and status code", rpc_requests.clone());
        registry.register(
            "grpc_request_duration_seconds",
            "Server-side gRPC latency, by method and status code",
            rpc_duration.clone(),
        );
        registry.register(
            "driver_call_duration_seconds",
            "Latency of cloud driver calls, by cloud and operation",
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
        Metrics {
            registry: Mutex::new(registry),
            rpc_requests,
            rpc_duration,
            driver_duration,
            driver_calls,
            driver_errors,
            instances,
            ready,
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
        }
        self.ready.set(i64::from(fleet.ready()));
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
