//! Node cleanup: once the cloud confirms a machine Flotilla deleted is gone, delete the Node
//! whose `spec.providerID` is that machine's id.
//!
//! Without a cloud controller manager (k3s without one, Docker, Proxmox, Slicer), nothing
//! else removes the Node of a deleted machine: it stays `NotReady` and cluster-autoscaler keeps
//! seeing it. Opt in per cloud with `node_cleanup = true`.
//!
//! # What counts as confirmed gone
//! The fleet (`state`) announces a machine when its delete returned `NotFound`, or when a
//! listing that started after its delete returned no longer has it: a delete that returns is
//! not proof (OpenStack deletes asynchronously, for one), and a Node deleted while its machine
//! still runs would register again.
//!
//! # Which Node
//! Only the Node whose `spec.providerID` equals the machine's provider id, exactly; the
//! deletion carries a `uid` precondition, so a Node re-created under the same name in the
//! meantime (another machine) is left alone. The Node named like the machine is tried first
//! (one GET, the common case); otherwise one listing of all Nodes serves every pending machine
//! of the round. A Node with any other providerID is never touched.
//!
//! # Failures
//! An API error keeps the machine pending; it is tried again every `retry` (the reconcile
//! interval) for up to [`GIVE_UP_AFTER`]. Only a leader cleans up: a replica that loses its
//! Lease drops what it had pending. A delete still marked in the cloud is finished, and its Node
//! cleaned up, by the next leader; one whose machine was already gone when the replica died but
//! not yet confirmed by a listing is not (the pending set lives in memory: a known limit).

use std::{collections::HashMap, sync::Arc, time::Duration};

use tokio::{sync::mpsc, time::Instant};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::{
    kube::{self, DeleteOutcome},
    state::{Fleet, NodeGone},
};

/// How long a Node deletion is retried before Flotilla gives up and says so.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(15 * 60);

#[derive(Debug)]
struct Pending {
    gone: NodeGone,
    since: Instant,
}

/// Deletes the Nodes of machines confirmed gone. One per process.
#[derive(Debug)]
pub struct NodeCleaner {
    api: kube::Client,
    fleet: Arc<Fleet>,
    retry: Duration,
    /// Written and read only by [`NodeCleaner::run`]'s loop.
    pending: Vec<Pending>,
}

/// What one round did, for logs and tests.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Round {
    pub deleted: usize,
    /// Machines with no Node (never registered, or removed by someone else).
    pub no_node: usize,
    pub failed: usize,
}

impl NodeCleaner {
    pub fn new(api: kube::Client, fleet: Arc<Fleet>, retry: Duration) -> NodeCleaner {
        NodeCleaner { api, fleet, retry, pending: Vec::new() }
    }

    /// Runs until `shutdown`: takes announcements from `gone` and cleans up after each.
    pub async fn run(mut self, mut gone: mpsc::UnboundedReceiver<NodeGone>, shutdown: CancellationToken) {
        loop {
            let wait = if self.pending.is_empty() { Duration::from_secs(3600) } else { self.retry };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                received = gone.recv() => match received {
                    Some(g) => self.push(g),
                    None => return,
                },
                _ = tokio::time::sleep(wait) => {}
            }
            while let Ok(g) = gone.try_recv() {
                self.push(g);
            }
            if !self.fleet.leading() {
                if !self.pending.is_empty() {
                    debug!(pending = self.pending.len(), "not leading: dropping pending node cleanups");
                }
                self.pending.clear();
                continue;
            }
            self.round().await;
        }
    }

    fn push(&mut self, gone: NodeGone) {
        if gone.provider_id.is_empty() || self.pending.iter().any(|p| p.gone.provider_id == gone.provider_id) {
            return;
        }
        self.pending.push(Pending { gone, since: Instant::now() });
    }

    /// Tries every pending machine once.
    pub async fn round(&mut self) -> Round {
        let mut round = Round::default();
        let mut unresolved = Vec::new();
        let pending = std::mem::take(&mut self.pending);
        // First the cheap way: the Node named like the machine.
        let mut need_listing = Vec::new();
        for p in pending {
            match self.api.get_node(&p.gone.name).await {
                Ok(Some(node)) if node.spec.provider_id == p.gone.provider_id => {
                    if self.delete(&p.gone, &node.metadata.name, node.metadata.uid.as_deref()).await {
                        round.deleted += 1;
                    } else {
                        round.failed += 1;
                        unresolved.push(p);
                    }
                }
                Ok(_) => need_listing.push(p),
                Err(e) => {
                    warn!(node = %p.gone.name, provider_id = %p.gone.provider_id, error = %e, "cannot look up the node of a deleted machine; will retry");
                    round.failed += 1;
                    unresolved.push(p);
                }
            }
        }
        if !need_listing.is_empty() {
            match self.api.list_nodes(None).await {
                Ok(nodes) => {
                    let by_provider: HashMap<&str, &kube::Node> =
                        nodes.iter().map(|n| (n.spec.provider_id.as_str(), n)).collect();
                    for p in need_listing {
                        match by_provider.get(p.gone.provider_id.as_str()) {
                            Some(node) => {
                                if self.delete(&p.gone, &node.metadata.name, node.metadata.uid.as_deref()).await {
                                    round.deleted += 1;
                                } else {
                                    round.failed += 1;
                                    unresolved.push(p);
                                }
                            }
                            None => {
                                debug!(provider_id = %p.gone.provider_id, "no node for the deleted machine");
                                round.no_node += 1;
                            }
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, machines = need_listing.len(), "cannot list nodes for node cleanup; will retry");
                    round.failed += need_listing.len();
                    unresolved.extend(need_listing);
                }
            }
        }
        unresolved.retain(|p| {
            let keep = p.since.elapsed() < GIVE_UP_AFTER;
            if !keep {
                warn!(provider_id = %p.gone.provider_id, "giving up deleting the node of a deleted machine; delete it by hand");
            }
            keep
        });
        self.pending = unresolved;
        round
    }

    /// Deletes one Node (only the object with `uid`); false if it must be tried again.
    async fn delete(&self, gone: &NodeGone, node: &str, uid: Option<&str>) -> bool {
        match self.api.delete_node(node, uid).await {
            Ok(DeleteOutcome::Deleted) => {
                info!(cloud = %gone.cloud, group = %gone.group, %node, provider_id = %gone.provider_id, "deleted the node of a deleted machine");
                true
            }
            Ok(DeleteOutcome::NotFound) => true,
            Ok(DeleteOutcome::Replaced) => {
                info!(%node, provider_id = %gone.provider_id, "the node was replaced by another object of the same name; left alone");
                true
            }
            Err(e) => {
                warn!(%node, provider_id = %gone.provider_id, error = %e, "cannot delete the node of a deleted machine; will retry");
                false
            }
        }
    }
}
