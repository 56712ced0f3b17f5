//! The init script Kamatera runs on a new server's first boot (the create call's
//! `script-file`): a minijinja template rendered per machine, or the in-tree provider's
//! `script-base64` sent as it is.
//!
//! The template sees what the OpenStack driver's user-data templates see: `name`, `group`,
//! `cluster`, `join_url`, `join_token`, and every key of `template_data`, both at the top level
//! and under `data`.

use minijinja::{Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use crate::config::Secret;

/// Keys the template context fills itself; `template_data` may not redefine them.
pub const RESERVED: &[&str] = &["name", "group", "cluster", "join_url", "join_token", "data"];

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot render the init script template: {source}{}",
    if unknown.is_empty() { String::new() } else { format!("; unknown variables: {}", unknown.join(", ")) }
)]
pub struct Error {
    /// Variables the template uses that its context does not have.
    unknown: Vec<String>,
    #[source]
    source: minijinja::Error,
}

/// Which machine a script is for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub group: &'a str,
    pub name: &'a str,
}

/// A script template and what it is rendered with.
#[derive(Clone, Debug)]
pub struct Template {
    pub text: String,
    /// Where the text came from, for messages.
    pub origin: String,
    pub data: Map<String, Value>,
    pub join_url: Option<String>,
    pub join_token: Option<Secret>,
}

impl Template {
    pub fn render(&self, target: Target<'_>) -> Result<String, Error> {
        let mut env = Environment::new();
        // A misspelt variable is an error, not an empty string in a node's boot script.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.set_keep_trailing_newline(true);
        let mut ctx = self.data.clone();
        ctx.insert("data".into(), Value::Object(self.data.clone()));
        ctx.insert("name".into(), target.name.into());
        ctx.insert("group".into(), target.group.into());
        ctx.insert("cluster".into(), target.cluster.into());
        ctx.insert("join_url".into(), self.join_url.clone().map(Value::from).unwrap_or(Value::Null));
        ctx.insert(
            "join_token".into(),
            self.join_token.as_ref().map(|s| Value::from(s.expose())).unwrap_or(Value::Null),
        );
        let template = env
            .template_from_named_str(&self.origin, &self.text)
            .map_err(|source| Error { unknown: Vec::new(), source })?;
        template.render(Value::Object(ctx.clone())).map_err(|source| {
            let mut unknown: Vec<String> =
                template.undeclared_variables(false).into_iter().filter(|v| !ctx.contains_key(v)).collect();
            unknown.sort();
            Error { unknown, source }
        })
    }
}

/// A group's init script.
#[derive(Clone, Debug)]
pub enum Script {
    Template(Template),
    /// `script_base64`, decoded: the same script for every machine.
    Fixed(String),
}

impl Script {
    /// The script for one machine.
    pub fn for_machine(&self, target: Target<'_>) -> Result<String, Error> {
        match self {
            Script::Template(t) => t.render(target),
            Script::Fixed(text) => Ok(text.clone()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(text: &str) -> Template {
        let mut data = Map::new();
        data.insert("version".into(), "v1.31".into());
        Template {
            text: text.into(),
            origin: "script".into(),
            data,
            join_url: Some("https://10.0.0.1:6443".into()),
            join_token: Some(Secret::new("K10::server:abc".into())),
        }
    }

    const TARGET: Target<'static> = Target { cluster: "prod", group: "workers", name: "prod-workers-x7k2p" };

    #[test]
    fn a_template_sees_the_machine_the_join_values_and_its_data() {
        let t = template(
            "{{ name }} {{ group }} {{ cluster }} {{ join_url }} {{ join_token }} {{ version }} {{ data.version }}\n",
        );
        assert_eq!(
            t.render(TARGET).unwrap(),
            "prod-workers-x7k2p workers prod https://10.0.0.1:6443 K10::server:abc v1.31 v1.31\n"
        );
    }

    #[test]
    fn a_misspelt_variable_is_named_in_the_error() {
        let e = template("{{ nmae }}").render(TARGET).unwrap_err().to_string();
        assert!(e.contains("unknown variables: nmae"), "{e}");
    }

    #[test]
    fn a_fixed_script_is_the_same_for_every_machine() {
        let s = Script::Fixed("#!/bin/sh\necho {{ name }}\n".into());
        assert_eq!(s.for_machine(TARGET).unwrap(), "#!/bin/sh\necho {{ name }}\n");
    }
}
