//! Running beside a cluster: leader election, Node cleanup and the priority expander's ConfigMap.
