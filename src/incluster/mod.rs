//! Running beside a cluster: what Flotilla does through the Kubernetes API ([`crate::kube`]).
//!
//! * [`leader`]: leader election on a Lease, so `replicas: 2` is safe.
//! * [`node_cleanup`]: the Node of a machine Flotilla deleted goes once the cloud confirms it.
//! * [`priorities`]: cluster-autoscaler's priority-expander ConfigMap from the groups' `priority`.

pub mod leader;
pub mod node_cleanup;
pub mod priorities;
