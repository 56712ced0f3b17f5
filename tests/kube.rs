//! The Kubernetes API client against the fake API server: every call Flotilla makes, its
//! error handling, and both ways of authenticating (kubeconfig, in-cluster service account
//! with a rotating token).

#[path = "fakes/kube/mod.rs"]
mod fake;

use std::{collections::BTreeMap, time::Duration};

use axum::http::Method;
use fake::Fake;
use flotilla::kube::{self, ApplyOutcome, DeleteOutcome, Lease, LeaseSpec, credentials::Credentials};

const TOKEN: &str = "sa-token-1";

fn client_for(fake: &Fake, dir: &std::path::Path) -> kube::Client {
    let path = fake.kubeconfig(dir, TOKEN);
    kube::Client::new(kube::Settings { kubeconfig: Some(path), timeout: Some(Duration::from_secs(2)) })
}

#[tokio::test]
async fn nodes_are_listed_in_pages_with_an_encoded_label_selector() {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let api = client_for(&fake, dir.path());
    for n in 0..1203 {
        let labels: &[(&str, &str)] = if n % 2 == 0 { &[("flotilla.dev/cluster", "c1")] } else { &[] };
        fake.add_node(&format!("n{n:04}"), &format!("simulated://c1/n{n:04}"), labels);
    }
    let all = api.list_nodes(None).await.unwrap();
    assert_eq!(all.len(), 1203);
    assert_eq!(all[1202].spec.provider_id, "simulated://c1/n1202");
    let lists: Vec<_> = fake.requests().into_iter().filter(|r| r.path() == "/api/v1/nodes").collect();
    assert_eq!(lists.len(), 3, "500 + 500 + 203");
    assert!(lists.iter().all(|r| r.query("limit").as_deref() == Some("500")));
    assert!(lists.iter().all(|r| r.bearer.as_deref() == Some(TOKEN)));

    let mine = api.list_nodes(Some("flotilla.dev/cluster=c1")).await.unwrap();
    assert_eq!(mine.len(), 602);
    let last = fake.requests().pop().unwrap();
    assert!(last.uri.contains("labelSelector=flotilla.dev%2Fcluster%3Dc1"), "{}", last.uri);
    fake.assert_clean();
}

#[tokio::test]
async fn a_node_is_deleted_only_while_it_is_the_object_that_was_read() {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let api = client_for(&fake, dir.path());
    let old_uid = fake.add_node("web-1", "openstack:///aaa", &[]);
    // The Node is deleted and re-registered under the same name by another machine.
    fake.add_node("web-1", "openstack:///bbb", &[]);
    assert_eq!(api.delete_node("web-1", Some(&old_uid)).await.unwrap(), DeleteOutcome::Replaced);
    assert_eq!(fake.node_names(), ["web-1"], "the new Node is left alone");
    let node = api.get_node("web-1").await.unwrap().unwrap();
    assert_eq!(node.spec.provider_id, "openstack:///bbb");
    let uid = node.metadata.uid.unwrap();
    assert_eq!(api.delete_node("web-1", Some(&uid)).await.unwrap(), DeleteOutcome::Deleted);
    assert_eq!(api.delete_node("web-1", Some(&uid)).await.unwrap(), DeleteOutcome::NotFound);
    assert!(api.get_node("web-1").await.unwrap().is_none());
    let delete = fake.requests().into_iter().find(|r| r.method == Method::DELETE).unwrap();
    assert_eq!(delete.body["kind"], "DeleteOptions");
    assert_eq!(delete.body["preconditions"]["uid"], old_uid.as_str());
    fake.assert_clean();
}

#[tokio::test]
async fn a_lease_is_created_once_and_updated_only_at_the_version_read() {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let api = client_for(&fake, dir.path());
    assert!(api.get_lease("kube-system", "flotilla-c1").await.unwrap().is_none());
    let spec = LeaseSpec {
        holder_identity: Some("a".into()),
        lease_duration_seconds: Some(15),
        renew_time: Some("2026-08-01T00:00:00.000000Z".into()),
        ..Default::default()
    };
    let created = api.create_lease(&Lease::new("kube-system", "flotilla-c1", spec.clone())).await.unwrap();
    let again = api.create_lease(&Lease::new("kube-system", "flotilla-c1", spec)).await.unwrap_err();
    assert_eq!(again.reason(), Some("AlreadyExists"), "{again}");

    let mut mine = created.clone();
    mine.spec.renew_time = Some("2026-08-01T00:00:02.000000Z".into());
    let renewed = api.update_lease(&mine).await.unwrap();
    assert_ne!(renewed.metadata.resource_version, created.metadata.resource_version);
    // A second writer that read the old version loses.
    let mut stale = created;
    stale.spec.holder_identity = Some("b".into());
    let err = api.update_lease(&stale).await.unwrap_err();
    assert!(err.is_conflict() && err.reason() == Some("Conflict"), "{err}");
    assert!(err.to_string().contains("the object has been modified"), "{err}");
    let stored = fake.lease("kube-system", "flotilla-c1").unwrap();
    assert_eq!(stored["spec"]["holderIdentity"], "a");
    fake.assert_clean();
}

#[tokio::test]
async fn a_config_map_is_applied_server_side_taking_over_hand_written_data() {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let api = client_for(&fake, dir.path());
    let labels = BTreeMap::from([("app.kubernetes.io/managed-by".to_owned(), "flotilla".to_owned())]);
    let data = BTreeMap::from([("priorities".to_owned(), "10:\n- ^a$\n".to_owned())]);
    let outcome = api.apply_config_map("kube-system", "cluster-autoscaler-priority-expander", &labels, &data).await;
    assert_eq!(outcome.unwrap(), ApplyOutcome::Created);
    // Someone edits it by hand; the next apply (Flotilla's configuration is the source of truth)
    // takes the field back.
    fake.put_config_map("kube-system", "hand-written", &[("priorities", "1:\n- .*\n")]);
    let outcome = api.apply_config_map("kube-system", "hand-written", &labels, &data).await.unwrap();
    assert_eq!(outcome, ApplyOutcome::Updated);
    assert_eq!(fake.config_map("kube-system", "hand-written").unwrap()["data"]["priorities"], "10:\n- ^a$\n");
    let patch = fake.requests().pop().unwrap();
    assert_eq!(patch.content_type.as_deref(), Some("application/apply-patch+yaml"));
    assert_eq!(patch.query("fieldManager").as_deref(), Some("flotilla"));
    assert_eq!(patch.query("force").as_deref(), Some("true"));
    fake.assert_clean();
}

#[tokio::test]
async fn api_errors_keep_the_reason_and_message_and_never_the_token() {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let api = client_for(&fake, dir.path());
    fake.grant("system:serviceaccount:kube-system:flotilla", &[("list", "nodes")]);
    let err = api.delete_node("n1", None).await.unwrap_err();
    assert_eq!(err.code(), Some(403));
    let text = err.to_string();
    assert!(text.contains("cannot delete resource \"nodes\""), "{text}");
    assert!(!text.contains(TOKEN));
    fake.set_outage(true);
    let err = api.list_nodes(None).await.unwrap_err();
    assert_eq!(err.reason(), Some("ServiceUnavailable"), "{err}");
    fake.set_outage(false);
    // A wrong token is a 401 with nothing to retry (the kubeconfig's token is fixed).
    fake.revoke_token(TOKEN);
    let err = api.list_nodes(None).await.unwrap_err();
    assert_eq!(err.code(), Some(401), "{err}");
}

#[tokio::test]
async fn a_hung_answer_is_cut_off_by_the_request_timeout() {
    let fake = Fake::start(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    let api = client_for(&fake, dir.path());
    fake.lose_next_answer(Method::GET, "/api/v1/nodes", Duration::from_secs(30));
    let started = std::time::Instant::now();
    let err = api.list_nodes(None).await.unwrap_err();
    assert!(matches!(err, kube::Error::Transport { .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(20), "the 2 s timeout cut the request off");
}

#[tokio::test]
async fn in_cluster_credentials_follow_a_rotated_service_account_token() {
    let fake = Fake::start_tls("token-one").await;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("ca.crt"), fake.ca_pem.as_ref().unwrap()).unwrap();
    std::fs::write(dir.path().join("token"), "token-one\n").unwrap();
    std::fs::write(dir.path().join("namespace"), "autoscaling").unwrap();
    let port = fake.base.rsplit(':').next().unwrap().to_owned();
    let credentials = Credentials::in_cluster_from(dir.path(), Some("127.0.0.1"), Some(&port)).unwrap();
    let api = kube::Client::from_credentials(credentials, Some(Duration::from_secs(5))).unwrap();
    assert_eq!(api.own_namespace().as_deref(), Some("autoscaling"));
    api.list_nodes(None).await.unwrap();

    // The kubelet rotates the token; the old one stops working before Flotilla re-reads it.
    std::fs::write(dir.path().join("token"), "token-two\n").unwrap();
    fake.add_token("token-two", "system:serviceaccount:autoscaling:flotilla");
    fake.revoke_token("token-one");
    api.list_nodes(None).await.expect("the 401 makes the client read the new token and retry");
    let bearers: Vec<_> = fake.requests().into_iter().map(|r| r.bearer.unwrap_or_default()).collect();
    assert_eq!(bearers, ["token-one", "token-one", "token-two"]);
    fake.assert_clean();
}

#[tokio::test]
async fn an_https_server_whose_certificate_the_ca_did_not_sign_is_refused() {
    let fake = Fake::start_tls(TOKEN).await;
    let other = Fake::start_tls(TOKEN).await;
    let dir = tempfile::tempdir().unwrap();
    // A kubeconfig for `fake` that trusts `other`'s CA.
    let path = fake.kubeconfig(dir.path(), TOKEN);
    std::fs::write(dir.path().join("ca.crt"), other.ca_pem.as_ref().unwrap()).unwrap();
    let api = kube::Client::new(kube::Settings { kubeconfig: Some(path), timeout: None });
    let err = api.list_nodes(None).await.unwrap_err();
    assert!(matches!(err, kube::Error::Transport { .. }), "{err}");
    assert!(fake.requests().is_empty(), "no request reached a server that could not be verified");
}
