//! Template nodes: what a new machine of a group will look like once it joins, so
//! cluster-autoscaler can simulate scheduling onto a group that has no node yet.

use std::collections::BTreeMap;

use prost::Message;

use crate::{
    config::GroupConfig,
    driver::Shape,
    proto::k8s,
    quantity::{format_bytes, format_cpu_millis},
};

/// Defaults when neither configuration nor the cloud says.
const DEFAULT_CPU_MILLIS: u64 = 1_000;
const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
const DEFAULT_EPHEMERAL_BYTES: u64 = 20 << 30;
/// The kubelet's default `maxPods`.
const DEFAULT_PODS: u64 = 110;

/// A group's template node, serialized once.
#[derive(Clone, Debug)]
pub struct Template {
    pub node: k8s::Node,
    /// `node` as protobuf bytes, what `NodeGroupTemplateNodeInfo` sends.
    pub bytes: Vec<u8>,
}

fn quantity(s: String) -> k8s::Quantity {
    k8s::Quantity { string: s }
}

impl Template {
    /// Builds the template from configuration, falling back to the cloud's shape, then defaults.
    pub fn build(group: &GroupConfig, shape: Shape, gpu_label: &str) -> Template {
        let t = &group.template;
        let cpu = t.cpu_millis.or(shape.cpu_millis).unwrap_or(DEFAULT_CPU_MILLIS);
        let memory = t.memory_bytes.or(shape.memory_bytes).unwrap_or(DEFAULT_MEMORY_BYTES);
        let storage = t.ephemeral_storage_bytes.or(shape.ephemeral_storage_bytes).unwrap_or(DEFAULT_EPHEMERAL_BYTES);
        let pods = t.pods.unwrap_or(DEFAULT_PODS);
        let gpus = t.gpus.or(shape.gpus).unwrap_or(0);
        let instance_type = t.instance_type.clone().or(shape.instance_type);
        let arch = t.arch.clone().or(shape.arch).unwrap_or_else(|| "amd64".to_owned());
        let name = format!("{}-template", group.name);

        let mut capacity = BTreeMap::new();
        capacity.insert("cpu".to_owned(), cpu);
        capacity.insert("memory".to_owned(), memory);
        capacity.insert("ephemeral-storage".to_owned(), storage);
        capacity.insert("pods".to_owned(), pods);
        if gpus > 0 {
            capacity.insert(t.gpu_resource.clone(), gpus);
        }
        let render = |resource: &str, v: u64| match resource {
            "cpu" => format_cpu_millis(v),
            "memory" | "ephemeral-storage" => format_bytes(v),
            _ => v.to_string(),
        };
        let mut capacity_q = std::collections::HashMap::new();
        let mut allocatable_q = std::collections::HashMap::new();
        for (resource, v) in &capacity {
            let reserved = match resource.as_str() {
                "cpu" => t.reserved_cpu_millis,
                "memory" => t.reserved_memory_bytes,
                _ => 0,
            };
            capacity_q.insert(resource.clone(), quantity(render(resource, *v)));
            allocatable_q.insert(resource.clone(), quantity(render(resource, v.saturating_sub(reserved))));
        }

        // Well-known labels first, so the group's own labels can override any of them.
        let mut labels = std::collections::HashMap::new();
        let mut put = |k: &str, v: &str| {
            labels.insert(k.to_owned(), v.to_owned());
        };
        put("kubernetes.io/os", &t.os);
        put("beta.kubernetes.io/os", &t.os);
        put("kubernetes.io/arch", &arch);
        put("beta.kubernetes.io/arch", &arch);
        put("kubernetes.io/hostname", &name);
        if let Some(it) = &instance_type {
            put("node.kubernetes.io/instance-type", it);
            put("beta.kubernetes.io/instance-type", it);
        }
        if let Some(zone) = &t.zone {
            put("topology.kubernetes.io/zone", zone);
        }
        if let Some(region) = &t.region {
            put("topology.kubernetes.io/region", region);
        }
        if let (true, false, Some(gpu_type)) = (gpus > 0, gpu_label.is_empty(), &t.gpu_type) {
            put(gpu_label, gpu_type);
        }
        for (k, v) in &t.labels {
            put(k, v);
        }

        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        let time = k8s::Time { seconds: now.as_secs() as i64, nanos: 0 };
        let condition = |kind: &str, status: &str, reason: &str| k8s::NodeCondition {
            r#type: kind.to_owned(),
            status: status.to_owned(),
            last_heartbeat_time: Some(time),
            last_transition_time: Some(time),
            reason: reason.to_owned(),
            message: String::new(),
        };
        let node = k8s::Node {
            metadata: Some(k8s::ObjectMeta {
                name: name.clone(),
                labels,
                creation_timestamp: Some(time),
                ..Default::default()
            }),
            spec: Some(k8s::NodeSpec {
                taints: t
                    .taints
                    .iter()
                    .map(|x| k8s::Taint { key: x.key.clone(), value: x.value.clone(), effect: x.effect.clone() })
                    .collect(),
                ..Default::default()
            }),
            status: Some(k8s::NodeStatus {
                capacity: capacity_q,
                allocatable: allocatable_q,
                phase: "Running".to_owned(),
                conditions: vec![
                    condition("Ready", "True", "KubeletReady"),
                    condition("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                    condition("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                    condition("PIDPressure", "False", "KubeletHasSufficientPID"),
                    condition("NetworkUnavailable", "False", "RouteCreated"),
                ],
                node_info: Some(k8s::NodeSystemInfo {
                    operating_system: t.os.clone(),
                    architecture: arch,
                    ..Default::default()
                }),
            }),
        };
        let bytes = node.encode_to_vec();
        Template { node, bytes }
    }

    /// Capacity of one resource in the template, as text.
    pub fn capacity(&self, resource: &str) -> Option<&str> {
        self.node.status.as_ref()?.capacity.get(resource).map(|q| q.string.as_str())
    }
}

/// The node as the JSON Kubernetes would show (for `flotilla ctl template`).
pub fn to_json(node: &k8s::Node) -> serde_json::Value {
    use serde_json::{Map, Value, json};
    let sorted = |m: &std::collections::HashMap<String, String>| -> Map<String, Value> {
        let b: BTreeMap<_, _> = m.iter().collect();
        b.into_iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect()
    };
    let quantities = |m: &std::collections::HashMap<String, k8s::Quantity>| -> Map<String, Value> {
        let b: BTreeMap<_, _> = m.iter().collect();
        b.into_iter().map(|(k, v)| (k.clone(), Value::String(v.string.clone()))).collect()
    };
    let meta = node.metadata.clone().unwrap_or_default();
    let spec = node.spec.clone().unwrap_or_default();
    let status = node.status.clone().unwrap_or_default();
    let info = status.node_info.clone().unwrap_or_default();
    json!({
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": { "name": meta.name, "labels": sorted(&meta.labels) },
        "spec": {
            "taints": spec.taints.iter().map(|t| json!({"key": t.key, "value": t.value, "effect": t.effect})).collect::<Vec<_>>(),
        },
        "status": {
            "capacity": quantities(&status.capacity),
            "allocatable": quantities(&status.allocatable),
            "conditions": status.conditions.iter().map(|c| json!({"type": c.r#type, "status": c.status, "reason": c.reason})).collect::<Vec<_>>(),
            "nodeInfo": { "operatingSystem": info.operating_system, "architecture": info.architecture },
        },
    })
}
