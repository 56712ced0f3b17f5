//! The typed calls: Nodes (list, get, create, delete with a uid precondition), Leases (get,
//! create, update with `resourceVersion`) and ConfigMaps (server-side apply).
//!
//! Objects keep the fields Flotilla does not know (`extra`), so a read-modify-write `PUT`
//! never drops what a newer API server or another writer put there.

use std::collections::BTreeMap;

use reqwest::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::{Client, Result, encode_query};

/// The field manager Flotilla's server-side applies are recorded under.
pub const FIELD_MANAGER: &str = "flotilla";

/// Page size for Node listings: big clusters are listed in chunks, as kubectl does.
const LIST_PAGE: usize = 500;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_version: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A Node, as far as Flotilla reads one.
#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct Node {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NodeSpec,
}

#[derive(Clone, Debug, Default, PartialEq, Deserialize)]
pub struct NodeSpec {
    #[serde(rename = "providerID", default)]
    pub provider_id: String,
}

#[derive(Debug, Deserialize)]
struct List<T> {
    #[serde(default)]
    metadata: ListMeta,
    #[serde(default = "Vec::new")]
    items: Vec<T>,
}

#[derive(Debug, Default, Deserialize)]
struct ListMeta {
    #[serde(rename = "continue", default)]
    continue_token: Option<String>,
}

/// A `coordination.k8s.io/v1` Lease.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Lease {
    #[serde(default = "lease_api_version")]
    pub api_version: String,
    #[serde(default = "lease_kind")]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: LeaseSpec,
}

fn lease_api_version() -> String {
    "coordination.k8s.io/v1".into()
}

fn lease_kind() -> String {
    "Lease".into()
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaseSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub holder_identity: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_duration_seconds: Option<i32>,
    /// `MicroTime`: RFC 3339 with microseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub acquire_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renew_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lease_transitions: Option<i32>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Lease {
    pub fn new(namespace: &str, name: &str, spec: LeaseSpec) -> Lease {
        Lease {
            api_version: lease_api_version(),
            kind: lease_kind(),
            metadata: ObjectMeta { name: name.into(), namespace: Some(namespace.into()), ..Default::default() },
            spec,
        }
    }
}

/// How a Node deletion ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteOutcome {
    Deleted,
    /// Nothing of that name exists (any more).
    NotFound,
    /// The name now belongs to another object (its uid differs from the precondition's): left alone.
    Replaced,
}

/// How a server-side apply ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ApplyOutcome {
    Created,
    Updated,
}

fn json_body(value: &impl Serialize) -> Option<(Vec<u8>, &'static str)> {
    Some((serde_json::to_vec(value).expect("plain data serializes"), "application/json"))
}

fn segment(name: &str) -> String {
    // Object names are DNS subdomains; encode anyway so a bad name cannot change the path.
    encode_query(name)
}

impl Client {
    /// Every Node, or those matching a label selector (`a=b,c`), in pages.
    pub async fn list_nodes(&self, label_selector: Option<&str>) -> Result<Vec<Node>> {
        let mut nodes = Vec::new();
        let mut continue_token: Option<String> = None;
        loop {
            let mut path = format!("/api/v1/nodes?limit={LIST_PAGE}");
            if let Some(selector) = label_selector {
                path.push_str(&format!("&labelSelector={}", encode_query(selector)));
            }
            if let Some(token) = &continue_token {
                path.push_str(&format!("&continue={}", encode_query(token)));
            }
            let (status, body) = self.send(Method::GET, &path, None).await?;
            if status != StatusCode::OK {
                return Err(Client::api_error(Method::GET, &path, status, &body));
            }
            let page: List<Node> = Client::decode(&path, &body)?;
            nodes.extend(page.items);
            match page.metadata.continue_token.filter(|t| !t.is_empty()) {
                Some(token) => continue_token = Some(token),
                None => return Ok(nodes),
            }
        }
    }

    /// One Node by name; `None` if there is none.
    pub async fn get_node(&self, name: &str) -> Result<Option<Node>> {
        let path = format!("/api/v1/nodes/{}", segment(name));
        let (status, body) = self.send(Method::GET, &path, None).await?;
        match status {
            StatusCode::OK => Ok(Some(Client::decode(&path, &body)?)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Client::api_error(Method::GET, &path, status, &body)),
        }
    }

    /// Creates a Node; `Ok(false)` when one of that name already exists.
    pub async fn create_node(&self, node: &Value) -> Result<bool> {
        let path = "/api/v1/nodes";
        let (status, body) = self.send(Method::POST, path, json_body(node)).await?;
        match status {
            StatusCode::CREATED | StatusCode::OK | StatusCode::ACCEPTED => Ok(true),
            StatusCode::CONFLICT => Ok(false),
            _ => Err(Client::api_error(Method::POST, path, status, &body)),
        }
    }

    /// Deletes a Node. With `uid`, only the object with that uid: if the name now belongs to
    /// another Node the API refuses (409) and the answer is [`DeleteOutcome::Replaced`].
    pub async fn delete_node(&self, name: &str, uid: Option<&str>) -> Result<DeleteOutcome> {
        let path = format!("/api/v1/nodes/{}", segment(name));
        let body = uid.and_then(|uid| {
            json_body(&serde_json::json!({
                "apiVersion": "v1",
                "kind": "DeleteOptions",
                "preconditions": { "uid": uid },
            }))
        });
        let (status, answer) = self.send(Method::DELETE, &path, body).await?;
        match status {
            StatusCode::OK | StatusCode::ACCEPTED => Ok(DeleteOutcome::Deleted),
            StatusCode::NOT_FOUND => Ok(DeleteOutcome::NotFound),
            StatusCode::CONFLICT if uid.is_some() => Ok(DeleteOutcome::Replaced),
            _ => Err(Client::api_error(Method::DELETE, &path, status, &answer)),
        }
    }

    fn lease_path(namespace: &str, name: Option<&str>) -> String {
        let base = format!("/apis/coordination.k8s.io/v1/namespaces/{}/leases", segment(namespace));
        match name {
            Some(name) => format!("{base}/{}", segment(name)),
            None => base,
        }
    }

    /// A Lease; `None` if it does not exist.
    pub async fn get_lease(&self, namespace: &str, name: &str) -> Result<Option<Lease>> {
        let path = Client::lease_path(namespace, Some(name));
        let (status, body) = self.send(Method::GET, &path, None).await?;
        match status {
            StatusCode::OK => Ok(Some(Client::decode(&path, &body)?)),
            StatusCode::NOT_FOUND => Ok(None),
            _ => Err(Client::api_error(Method::GET, &path, status, &body)),
        }
    }

    /// Creates a Lease; a Lease of that name already existing is an `AlreadyExists` error.
    pub async fn create_lease(&self, lease: &Lease) -> Result<Lease> {
        let namespace = lease.metadata.namespace.as_deref().unwrap_or("default");
        let path = Client::lease_path(namespace, None);
        let (status, body) = self.send(Method::POST, &path, json_body(lease)).await?;
        match status {
            StatusCode::CREATED | StatusCode::OK => Client::decode(&path, &body),
            _ => Err(Client::api_error(Method::POST, &path, status, &body)),
        }
    }

    /// Replaces a Lease. Its `metadata.resourceVersion` must be the one read: if anyone wrote
    /// it since, the API answers 409 Conflict and nothing changes.
    pub async fn update_lease(&self, lease: &Lease) -> Result<Lease> {
        let namespace = lease.metadata.namespace.as_deref().unwrap_or("default");
        let path = Client::lease_path(namespace, Some(&lease.metadata.name));
        debug_assert!(
            lease.metadata.resource_version.is_some(),
            "a lease update needs the resourceVersion it was read at"
        );
        let (status, body) = self.send(Method::PUT, &path, json_body(lease)).await?;
        match status {
            StatusCode::OK => Client::decode(&path, &body),
            _ => Err(Client::api_error(Method::PUT, &path, status, &body)),
        }
    }

    /// Server-side applies a ConfigMap with exactly these labels and data, as field manager
    /// `flotilla`, taking over fields another manager set (`force=true`: the ConfigMap is
    /// generated from Flotilla's configuration, which is its source of truth).
    pub async fn apply_config_map(
        &self,
        namespace: &str,
        name: &str,
        labels: &BTreeMap<String, String>,
        data: &BTreeMap<String, String>,
    ) -> Result<ApplyOutcome> {
        let path = format!(
            "/api/v1/namespaces/{}/configmaps/{}?fieldManager={FIELD_MANAGER}&force=true",
            segment(namespace),
            segment(name)
        );
        let object = serde_json::json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": { "name": name, "namespace": namespace, "labels": labels },
            "data": data,
        });
        // JSON is YAML: the apply content type takes either.
        let body = Some((serde_json::to_vec(&object).expect("plain data serializes"), "application/apply-patch+yaml"));
        let (status, answer) = self.send(Method::PATCH, &path, body).await?;
        match status {
            StatusCode::CREATED => Ok(ApplyOutcome::Created),
            StatusCode::OK => Ok(ApplyOutcome::Updated),
            _ => Err(Client::api_error(Method::PATCH, &path, status, &answer)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lease_round_trips_fields_flotilla_does_not_know() {
        let text = r#"{"apiVersion":"coordination.k8s.io/v1","kind":"Lease","metadata":{"name":"l","namespace":"n","resourceVersion":"7","uid":"u","managedFields":[{"manager":"x"}]},"spec":{"holderIdentity":"a","leaseDurationSeconds":15,"renewTime":"2026-01-01T00:00:00.000000Z","strategy":"OldestEmulationVersion"}}"#;
        let lease: Lease = serde_json::from_str(text).unwrap();
        assert_eq!(lease.spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(lease.metadata.resource_version.as_deref(), Some("7"));
        let back = serde_json::to_value(&lease).unwrap();
        assert_eq!(back["spec"]["strategy"], "OldestEmulationVersion");
        assert_eq!(back["metadata"]["managedFields"][0]["manager"], "x");
        assert!(back["spec"].get("acquireTime").is_none(), "unset fields are omitted, not null");
    }
}
