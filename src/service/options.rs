//! `NodeGroupGetOptions`: CA replaces its defaults with the answer wholesale (no field-wise
//! merge), so the answer starts from the defaults CA sent, overrides only what the group
//! configures, and fills every field of both protocol generations.

use std::time::Duration;

use crate::{
    config::OptionsConfig,
    proto::externalgrpc::{LegacyDuration, NodeGroupAutoscalingOptions},
};

/// cluster-autoscaler's own flag defaults, used when a request carries no defaults.
const CA_UTILIZATION_THRESHOLD: f64 = 0.5;
const CA_GPU_UTILIZATION_THRESHOLD: f64 = 0.5;
const CA_UNNEEDED: Duration = Duration::from_secs(10 * 60);
const CA_UNREADY: Duration = Duration::from_secs(20 * 60);
const CA_MAX_NODE_PROVISION: Duration = Duration::from_secs(15 * 60);

/// Effective options as plain values.
#[derive(Clone, Debug, PartialEq)]
struct Effective {
    utilization: f64,
    gpu_utilization: f64,
    unneeded: Duration,
    unready: Duration,
    max_provision: Duration,
    zero_or_max: bool,
    ignore_daemonsets: bool,
}

fn from_google(d: &prost_types::Duration) -> Duration {
    if d.seconds < 0 || d.nanos < 0 {
        return Duration::ZERO;
    }
    Duration::new(d.seconds as u64, d.nanos as u32)
}

fn from_legacy(d: &LegacyDuration) -> Duration {
    Duration::from_nanos(d.duration.max(0) as u64)
}

fn to_google(d: Duration) -> prost_types::Duration {
    prost_types::Duration { seconds: d.as_secs() as i64, nanos: d.subsec_nanos() as i32 }
}

fn to_legacy(d: Duration) -> LegacyDuration {
    LegacyDuration { duration: i64::try_from(d.as_nanos()).unwrap_or(i64::MAX) }
}

/// Reads CA's defaults, preferring the new duration fields (CA >= 1.34.2 sends them) over the
/// legacy ones, and CA's documented flag defaults for anything missing or zero.
fn defaults(sent: Option<&NodeGroupAutoscalingOptions>) -> Effective {
    let Some(d) = sent else {
        return Effective {
            utilization: CA_UTILIZATION_THRESHOLD,
            gpu_utilization: CA_GPU_UTILIZATION_THRESHOLD,
            unneeded: CA_UNNEEDED,
            unready: CA_UNREADY,
            max_provision: CA_MAX_NODE_PROVISION,
            zero_or_max: false,
            ignore_daemonsets: false,
        };
    };
    let pick = |new: Option<&prost_types::Duration>, old: Option<&LegacyDuration>, fallback: Duration| {
        new.map(from_google)
            .filter(|d| !d.is_zero())
            .or_else(|| old.map(from_legacy).filter(|d| !d.is_zero()))
            .unwrap_or(fallback)
    };
    Effective {
        utilization: d.scale_down_utilization_threshold,
        gpu_utilization: d.scale_down_gpu_utilization_threshold,
        unneeded: pick(d.scale_down_unneeded_duration.as_ref(), d.scale_down_unneeded_time.as_ref(), CA_UNNEEDED),
        unready: pick(d.scale_down_unready_duration.as_ref(), d.scale_down_unready_time.as_ref(), CA_UNREADY),
        max_provision: pick(
            d.max_node_provision_duration.as_ref(),
            d.max_node_provision_time.as_ref(),
            CA_MAX_NODE_PROVISION,
        ),
        zero_or_max: d.zero_or_max_node_scaling,
        ignore_daemonsets: d.ignore_daemon_sets_utilization,
    }
}

/// The options to answer for a group with `overrides`, given the defaults CA sent.
pub fn answer(overrides: &OptionsConfig, sent: Option<&NodeGroupAutoscalingOptions>) -> NodeGroupAutoscalingOptions {
    let d = defaults(sent);
    let e = Effective {
        utilization: overrides.scale_down_utilization_threshold.unwrap_or(d.utilization),
        gpu_utilization: overrides.scale_down_gpu_utilization_threshold.unwrap_or(d.gpu_utilization),
        unneeded: overrides.scale_down_unneeded_time.unwrap_or(d.unneeded),
        unready: overrides.scale_down_unready_time.unwrap_or(d.unready),
        max_provision: overrides.max_node_provision_time.unwrap_or(d.max_provision),
        zero_or_max: overrides.zero_or_max_node_scaling.unwrap_or(d.zero_or_max),
        ignore_daemonsets: overrides.ignore_daemonsets_utilization.unwrap_or(d.ignore_daemonsets),
    };
    NodeGroupAutoscalingOptions {
        scale_down_utilization_threshold: e.utilization,
        scale_down_gpu_utilization_threshold: e.gpu_utilization,
        scale_down_unneeded_time: Some(to_legacy(e.unneeded)),
        scale_down_unready_time: Some(to_legacy(e.unready)),
        max_node_provision_time: Some(to_legacy(e.max_provision)),
        zero_or_max_node_scaling: e.zero_or_max,
        ignore_daemon_sets_utilization: e.ignore_daemonsets,
        scale_down_unneeded_duration: Some(to_google(e.unneeded)),
        scale_down_unready_duration: Some(to_google(e.unready)),
        max_node_provision_duration: Some(to_google(e.max_provision)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn old_ca_defaults() -> NodeGroupAutoscalingOptions {
        NodeGroupAutoscalingOptions {
            scale_down_utilization_threshold: 0.6,
            scale_down_gpu_utilization_threshold: 0.7,
            scale_down_unneeded_time: Some(to_legacy(Duration::from_secs(300))),
            scale_down_unready_time: Some(to_legacy(Duration::from_secs(900))),
            max_node_provision_time: Some(to_legacy(Duration::from_secs(600))),
            ..Default::default()
        }
    }

    #[test]
    fn copies_the_defaults_of_an_old_ca_and_overrides_only_what_is_configured() {
        let overrides = OptionsConfig { scale_down_unneeded_time: Some(Duration::from_secs(30)), ..Default::default() };
        let a = answer(&overrides, Some(&old_ca_defaults()));
        assert_eq!(a.scale_down_utilization_threshold, 0.6);
        assert_eq!(a.scale_down_gpu_utilization_threshold, 0.7);
        assert_eq!(a.scale_down_unneeded_time.unwrap().duration, 30_000_000_000);
        assert_eq!(a.scale_down_unneeded_duration.unwrap().seconds, 30);
        assert_eq!(a.max_node_provision_time.unwrap().duration, 600_000_000_000);
        assert_eq!(a.max_node_provision_duration.unwrap().seconds, 600);
        assert_eq!(a.scale_down_unready_duration.unwrap().seconds, 900);
    }

    #[test]
    fn never_answers_a_zero_max_provision_time() {
        // A CA that sends no defaults at all still gets a full answer.
        let a = answer(&OptionsConfig::default(), None);
        assert_eq!(a.max_node_provision_duration.unwrap().seconds, 15 * 60);
        assert_eq!(a.max_node_provision_time.unwrap().duration, 15 * 60 * 1_000_000_000);
        // A new CA with only fields 8/9/10 set.
        let sent = NodeGroupAutoscalingOptions {
            max_node_provision_duration: Some(to_google(Duration::from_secs(120))),
            ..Default::default()
        };
        let a = answer(&OptionsConfig::default(), Some(&sent));
        assert_eq!(a.max_node_provision_time.unwrap().duration, 120_000_000_000);
        assert_eq!(a.scale_down_unneeded_duration.unwrap().seconds, 600);
    }
}
