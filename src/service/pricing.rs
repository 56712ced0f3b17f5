//! Pricing for cluster-autoscaler's `price` expander, from per-group hourly prices.
//!
//! * A node costs its group's hourly price for the requested period.
//! * A pod costs the share of the cheapest priced machine it would fill (the larger of its CPU
//!   and memory shares), so the expander prefers groups that waste less money.

use prost::Message;

use crate::{
    proto::{externalgrpc as pb, k8s},
    quantity,
    state::Fleet,
};

/// How cluster-autoscaler names sanitized template nodes: `template-node-for-<group>-<random>`.
const TEMPLATE_NODE_PREFIX: &str = "template-node-for-";

/// Hours between two timestamps (zero if reversed or missing).
pub fn hours(start: Option<&prost_types::Timestamp>, end: Option<&prost_types::Timestamp>) -> f64 {
    let secs = |t: &prost_types::Timestamp| t.seconds as f64 + f64::from(t.nanos) / 1e9;
    match (start, end) {
        (Some(s), Some(e)) => ((secs(e) - secs(s)) / 3600.0).max(0.0),
        _ => 0.0,
    }
}

/// The group a node belongs to: by provider id, or by the name CA gives template nodes, or by
/// the name Flotilla gives them.
pub fn group_of_node(fleet: &Fleet, node: &pb::ExternalGrpcNode) -> Option<usize> {
    if let Some(g) = fleet.group_of(&node.provider_id) {
        return Some(g);
    }
    // A Kubernetes node name has at most 253 characters: anything longer is no node of ours,
    // and is not worth scanning.
    if node.name.len() > 253 {
        return None;
    }
    let by_name = |name: &str| fleet.groups.iter().position(|g| g.config.name == name);
    if let Some(rest) = node.name.strip_prefix(TEMPLATE_NODE_PREFIX) {
        // `<group>-<random>`; group names may contain '-', so try the longest match first.
        let mut end = rest.len();
        while let Some(i) = rest[..end].rfind('-') {
            if let Some(g) = by_name(&rest[..i]) {
                return Some(g);
            }
            end = i;
        }
    }
    node.name.strip_suffix("-template").and_then(by_name)
}

/// CPU (millicores) and memory (bytes) a pod requests: the larger of its containers' sum and
/// its largest init container, as the scheduler counts them.
pub fn pod_requests(bytes: &[u8]) -> Result<(u64, u64), prost::DecodeError> {
    let pod = k8s::Pod::decode(bytes)?;
    let spec = pod.spec.unwrap_or_default();
    let request = |c: &k8s::Container, resource: &str, parse: fn(&str) -> Option<u64>| {
        c.resources.as_ref().and_then(|r| r.requests.get(resource)).and_then(|q| parse(&q.string)).unwrap_or(0)
    };
    let sum = |resource, parse| spec.containers.iter().map(|c| request(c, resource, parse)).sum::<u64>();
    let init_max =
        |resource, parse| spec.init_containers.iter().map(|c| request(c, resource, parse)).max().unwrap_or(0);
    let cpu = sum("cpu", quantity::parse_cpu_millis).max(init_max("cpu", quantity::parse_cpu_millis));
    let memory = sum("memory", quantity::parse_bytes).max(init_max("memory", quantity::parse_bytes));
    Ok((cpu, memory))
}

/// The hourly price of a pod on the cheapest priced group, given each priced group's
/// (hourly price, cpu millis, memory bytes).
pub fn pod_hourly_price(requests: (u64, u64), groups: &[(f64, u64, u64)]) -> Option<f64> {
    groups
        .iter()
        .filter(|(_, cpu, mem)| *cpu > 0 && *mem > 0)
        .map(|(price, cpu, mem)| {
            let share = (requests.0 as f64 / *cpu as f64).max(requests.1 as f64 / *mem as f64);
            price * share
        })
        .min_by(f64::total_cmp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pod_costs_its_larger_share_of_the_cheapest_machine() {
        // 1 CPU / 1 GiB on a 4 CPU / 16 GiB machine at $0.40: CPU share 1/4 wins -> $0.10.
        let groups = [(0.40, 4_000, 16 << 30), (1.00, 4_000, 16 << 30)];
        let price = pod_hourly_price((1_000, 1 << 30), &groups).unwrap();
        assert!((price - 0.10).abs() < 1e-9, "{price}");
        assert_eq!(pod_hourly_price((1, 1), &[]), None);
    }

    #[test]
    fn requests_count_containers_and_init_containers_like_the_scheduler() {
        let container = |cpu: &str, mem: &str| k8s::Container {
            name: "c".into(),
            resources: Some(k8s::ResourceRequirements {
                limits: Default::default(),
                requests: [("cpu", cpu), ("memory", mem)]
                    .into_iter()
                    .map(|(k, v)| (k.to_owned(), k8s::Quantity { string: v.to_owned() }))
                    .collect(),
            }),
        };
        let pod = k8s::Pod {
            metadata: None,
            spec: Some(k8s::PodSpec {
                containers: vec![container("250m", "64Mi"), container("250m", "64Mi")],
                init_containers: vec![container("2", "32Mi")],
                ..Default::default()
            }),
        };
        assert_eq!(pod_requests(&pod.encode_to_vec()).unwrap(), (2_000, 128 << 20));
    }
}
