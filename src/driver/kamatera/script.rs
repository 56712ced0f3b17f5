//! The init script Kamatera runs on a new server's first boot (the create call's
//! `script-file`): a minijinja template rendered per machine, or the in-tree provider's
//! `script-base64` sent as it is.
//!
//! The template sees what the OpenStack driver's user-data templates see: `join_url`,
//! `join_token`, and what every boot-script template sees ([`shared`]: `name`, `group`,
//! `cluster`, every key of `template_data`, both at the top level and under `data`; the filter
//! `shell_quote`). Reading, checking and rendering the template is [`shared`]'s;
//! `script_base64` is this module's.

use serde_json::{Map, Value};

pub use crate::driver::script::{Error, Target};
use crate::{
    config::{Problems, Secret},
    driver::script::{self as shared, Context, Keys},
};

/// Variables this driver adds to [`shared::COMMON`]; `template_data` may not redefine them.
pub const RESERVED: &[&str] = &["join_url", "join_token"];

/// Where a template is configured (`script_base64`, the alternative, is not a template).
pub const KEYS: Keys = Keys { what: "init script", inline: "script", file: Some("script_file") };

/// A script template and what it is rendered with.
#[derive(Clone, Debug)]
pub struct Template {
    pub source: shared::Template,
    pub data: Map<String, Value>,
    pub join_url: Option<String>,
    pub join_token: Option<Secret>,
}

impl Template {
    fn context(&self, target: Target<'_>) -> Context {
        Context::new(target, &self.data)
            .with("join_url", self.join_url.clone())
            .with("join_token", self.join_token.as_ref().map(Secret::expose))
    }

    pub fn render(&self, target: Target<'_>) -> Result<String, Error> {
        self.source.render(&self.context(target))
    }

    /// The configuration check: one trial render for `target`; the script, or a problem at the
    /// template's key.
    pub fn check(&self, target: Target<'_>, p: &mut Problems) -> Option<String> {
        self.source.check(&self.context(target), p)
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
            source: shared::Template {
                what: KEYS.what,
                text: text.into(),
                origin: "script".into(),
                key_path: "script".into(),
            },
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
