//! The fault suite's referee: plays cluster-autoscaler until the fleet settles, then compares
//! what the cloud holds with what Flotilla reports over gRPC and fails on any difference.

use std::{collections::BTreeMap, time::Duration};

use flotilla::proto::externalgrpc::instance_status::InstanceState;

use super::{Client, delete, eventually, nodes, refresh, target_size};

/// What the cloud really holds, read past Flotilla: provider id -> (group, state), for every
/// machine of the cluster under test.
pub type CloudView = BTreeMap<String, (String, String)>;

/// How a settled fleet looks, per group.
#[derive(Debug, Default)]
pub struct Settled {
    /// Failed instances cluster-autoscaler deleted on the way (each with its error code).
    pub failed_deleted: Vec<String>,
    /// Provider ids per group once settled.
    pub groups: BTreeMap<String, Vec<String>>,
}

impl Settled {
    pub fn count(&self, group: &str) -> usize {
        self.groups.get(group).map_or(0, Vec::len)
    }
}

/// Plays cluster-autoscaler's loop (Refresh, then DeleteNodes for every instance reported with
/// errorInfo) until, for every group, Flotilla reports exactly the machines the cloud holds,
/// all running, with the target size equal to their number. Panics with the difference after
/// `limit`.
pub async fn settle<F>(c: &Client, groups: &[&str], cloud: F, limit: Duration) -> Settled
where
    F: Fn() -> CloudView,
{
    let mut failed_deleted = Vec::new();
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let mut c = c.clone();
        let _ = refresh(&mut c).await;
        let mut reported = BTreeMap::new();
        let mut all_settled = true;
        for &g in groups {
            let instances = nodes(&mut c, g).await;
            let failed: Vec<String> = instances
                .iter()
                .filter_map(|(id, _, e)| e.as_ref().filter(|e| !e.error_code.is_empty()).map(|e| (id, e)))
                .map(|(id, e)| {
                    failed_deleted.push(e.error_code.clone());
                    id.clone()
                })
                .collect();
            if !failed.is_empty() {
                let ids: Vec<&str> = failed.iter().map(String::as_str).collect();
                delete(&mut c, g, &ids).await.unwrap_or_else(|s| panic!("CA's delete of failed instances: {s:?}"));
                all_settled = false;
            }
            let target = target_size(&mut c, g).await;
            let running: Vec<String> = instances
                .iter()
                .filter(|(_, s, e)| *s == InstanceState::InstanceRunning && e.is_none())
                .map(|(id, _, _)| id.clone())
                .collect();
            all_settled &= running.len() == instances.len() && target as usize == running.len();
            reported.insert(g.to_owned(), (running, instances, target));
        }
        let view = cloud();
        let mut by_group: BTreeMap<&str, Vec<String>> = groups.iter().map(|g| (*g, Vec::new())).collect();
        let mut strangers = Vec::new();
        for (id, (group, state)) in &view {
            match by_group.get_mut(group.as_str()) {
                Some(ids) if state == "running" => ids.push(id.clone()),
                Some(_) => all_settled = false,
                None => strangers.push(id.clone()),
            }
        }
        assert!(strangers.is_empty(), "machines of no configured group in the cloud: {strangers:?}");
        for (g, ids) in &by_group {
            all_settled &= reported[*g].0 == *ids;
        }
        if all_settled {
            let groups = reported.into_iter().map(|(g, (running, _, _))| (g, running)).collect();
            return Settled { failed_deleted, groups };
        }
        if tokio::time::Instant::now() > deadline {
            panic!(
                "the fleet did not settle within {limit:?} into what the cloud holds:\ncloud holds {view:#?}\n\
                 Flotilla reports (running, all, target) {reported:#?}"
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `check` holds for the cloud (e.g. "two machines accepted").
pub async fn cloud_reaches<F>(what: &str, limit: Duration, cloud: F, check: impl Fn(&CloudView) -> bool) -> CloudView
where
    F: Fn() -> CloudView,
{
    eventually(limit, what, || {
        let view = cloud();
        let ok = check(&view);
        async move { ok.then_some(view) }
    })
    .await
}
