//! Provider ids: the `spec.providerID` a machine's Node carries, which cluster-autoscaler
//! matches against `Instance.id` exactly.
//!
//! The format is a template per group with placeholders `{name}` (the machine name Flotilla
//! chose), `{id}` (the cloud's id), `{cluster}`, `{group}` and `{region}`, so it can match
//! whatever the node's kubelet or cloud controller sets: `k3s://{name}` for k3s,
//! `openstack:///{id}` for the OpenStack cloud controller, `proxmox://{region}/{id}` for the
//! Proxmox one.

use std::fmt;

/// The values a provider id is built from.
#[derive(Clone, Copy, Debug)]
pub struct Parts<'a> {
    pub cluster: &'a str,
    pub group: &'a str,
    pub region: &'a str,
    pub name: &'a str,
    pub id: &'a str,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Piece {
    Literal(String),
    Cluster,
    Group,
    Region,
    Name,
    Id,
}

/// A parsed provider-id template.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderIdFormat {
    text: String,
    pieces: Vec<Piece>,
}

impl ProviderIdFormat {
    /// Parses a template; it must contain `{name}` or `{id}` so every machine's id is unique.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut rest = text;
        while let Some(open) = rest.find('{') {
            if open > 0 {
                pieces.push(Piece::Literal(rest[..open].to_owned()));
            }
            let close = rest[open..].find('}').ok_or_else(|| format!("unclosed '{{' in {text:?}"))? + open;
            pieces.push(match &rest[open + 1..close] {
                "cluster" => Piece::Cluster,
                "group" => Piece::Group,
                "region" => Piece::Region,
                "name" => Piece::Name,
                "id" => Piece::Id,
                other => {
                    return Err(format!(
                        "unknown placeholder {{{other}}} in {text:?}; use {{name}}, {{id}}, {{cluster}}, {{group}} or {{region}}"
                    ));
                }
            });
            rest = &rest[close + 1..];
        }
        if !rest.is_empty() {
            pieces.push(Piece::Literal(rest.to_owned()));
        }
        if !pieces.iter().any(|p| matches!(p, Piece::Name | Piece::Id)) {
            return Err(format!("{text:?} must contain {{name}} or {{id}} so that every machine's id is unique"));
        }
        Ok(ProviderIdFormat { text: text.to_owned(), pieces })
    }

    /// True when the id needs the cloud's own id, which is unknown until the create returns.
    pub fn needs_cloud_id(&self) -> bool {
        self.pieces.contains(&Piece::Id)
    }

    /// Renders the provider id of one machine.
    pub fn render(&self, parts: Parts<'_>) -> String {
        let mut out = String::with_capacity(self.text.len() + parts.name.len() + parts.id.len());
        for piece in &self.pieces {
            out.push_str(match piece {
                Piece::Literal(s) => s,
                Piece::Cluster => parts.cluster,
                Piece::Group => parts.group,
                Piece::Region => parts.region,
                Piece::Name => parts.name,
                Piece::Id => parts.id,
            });
        }
        out
    }

    /// The id reported for a machine whose create has not returned yet when the real id needs
    /// the cloud's id. It is distinct from every real id (the `flotilla-pending://` scheme), so
    /// cluster-autoscaler can count and delete it but never mistakes it for a node.
    pub fn pending(parts: Parts<'_>) -> String {
        format!("flotilla-pending://{}/{}/{}", parts.cluster, parts.group, parts.name)
    }
}

impl fmt::Display for ProviderIdFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts<'a>(name: &'a str, id: &'a str) -> Parts<'a> {
        Parts { cluster: "prod", group: "workers", region: "pve1", name, id }
    }

    #[test]
    fn renders_the_formats_cloud_controllers_set() {
        let cases = [
            ("k3s://{name}", "k3s://prod-workers-ab12c"),
            ("openstack:///{id}", "openstack:///6f1c-uuid"),
            ("proxmox://{region}/{id}", "proxmox://pve1/6f1c-uuid"),
            ("simulated://{cluster}/{name}", "simulated://prod/prod-workers-ab12c"),
        ];
        for (format, expected) in cases {
            let f = ProviderIdFormat::parse(format).unwrap();
            assert_eq!(f.render(parts("prod-workers-ab12c", "6f1c-uuid")), expected);
            assert_eq!(f.to_string(), format);
        }
    }

    #[test]
    fn knows_when_the_cloud_id_is_needed() {
        assert!(ProviderIdFormat::parse("openstack:///{id}").unwrap().needs_cloud_id());
        assert!(!ProviderIdFormat::parse("k3s://{name}").unwrap().needs_cloud_id());
    }

    #[test]
    fn rejects_templates_that_cannot_be_unique_or_are_malformed() {
        assert!(ProviderIdFormat::parse("static://{cluster}").is_err());
        assert!(ProviderIdFormat::parse("k3s://{nam}").is_err());
        assert!(ProviderIdFormat::parse("k3s://{name").is_err());
    }
}
