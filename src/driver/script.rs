//! Boot-script templates: the part every driver that renders a per-machine script from a
//! [minijinja] template shares — OpenStack's user data, Slicer's userdata, Kamatera's init
//! script, Proxmox's user-data snippet and join command — so they read, check and render the
//! same way.
//!
//! # What this module owns
//! * **Reading** a template from a driver's table ([`Template::read`]): an inline key or a file
//!   key (a path relative to the configuration file), never both.
//! * **`template_data`** ([`template_data`]): a table of the user's own values; a key naming a
//!   variable Flotilla fills in is a problem at its key path.
//! * **The environment** every template renders in: an undefined variable is an error (a
//!   misspelt variable must not become an empty string in a node's boot script), the trailing
//!   newline is kept, nothing is escaped whatever the file's extension (a boot script is not
//!   HTML), and the filter `shell_quote` quotes a string as one shell word.
//! * **The variables every template sees** ([`Context`]): `name`, `group`, `cluster`, and each
//!   `template_data` key both at the top level and under `data`.
//! * **The trial render** at configuration time ([`Template::check`]), reported at the key the
//!   template came from, and the render [`Error`], which names the variables the context lacks.
//!
//! # What each driver keeps
//! Its own variables (the join values, Slicer's k3s ones, Proxmox's `vmid`, `node` and `ip`),
//! its default template, and what happens to the text once rendered: Butane and Nova's size
//! limit (OpenStack), `script_base64` sent as it is (Kamatera), the snippet file (Proxmox).
//!
//! [minijinja]: https://docs.rs/minijinja

use minijinja::{AutoEscape, Environment, UndefinedBehavior};
use serde_json::{Map, Value};

use crate::config::{Problems, Section};

/// Variables every template sees; `template_data` may not redefine them (nor a driver's own).
pub const COMMON: &[&str] = &["name", "group", "cluster", "data"];

#[derive(Debug, thiserror::Error)]
#[error(
    "cannot render the {what} template: {source}{}",
    if unknown.is_empty() { String::new() } else { format!("; unknown variables: {}", unknown.join(", ")) }
)]
pub struct Error {
    /// What the template makes ("user data", "init script").
    what: &'static str,
    /// Variables the template uses that its context does not have.
    unknown: Vec<String>,
    #[source]
    source: minijinja::Error,
}

/// The keys a driver reads one template from.
#[derive(Clone, Copy, Debug)]
pub struct Keys {
    /// What the template makes, for messages ("user data", "init script").
    pub what: &'static str,
    /// The key of an inline template.
    pub inline: &'static str,
    /// The key of a template file, if the driver takes one.
    pub file: Option<&'static str>,
}

impl Keys {
    /// Whether the table gives either key (whatever its value).
    pub fn given(&self, s: &Section<'_>) -> bool {
        s.contains(self.inline) || self.file.is_some_and(|f| s.contains(f))
    }
}

/// One template, and where it came from.
#[derive(Clone, Debug)]
pub struct Template {
    /// What the template makes, for messages ("user data", "init script").
    pub what: &'static str,
    pub text: String,
    /// The file or key path the text came from: names the template in render errors.
    pub origin: String,
    /// The key path problems with the template are reported at.
    pub key_path: String,
}

/// Which machine a template is rendered for.
#[derive(Clone, Copy, Debug)]
pub struct Target<'a> {
    pub cluster: &'a str,
    pub group: &'a str,
    pub name: &'a str,
}

/// The variables of one render: [`COMMON`] and `template_data`, then the driver's own
/// ([`Context::with`]).
#[derive(Clone, Debug)]
pub struct Context(Map<String, Value>);

impl Context {
    /// `name`, `group`, `cluster` of `target`, and each `data` key at the top level and under
    /// `data`. The machine's variables win over a `template_data` key of the same name.
    pub fn new(target: Target<'_>, data: &Map<String, Value>) -> Context {
        let mut vars = data.clone();
        vars.insert("data".into(), Value::Object(data.clone()));
        vars.insert("name".into(), target.name.into());
        vars.insert("group".into(), target.group.into());
        vars.insert("cluster".into(), target.cluster.into());
        Context(vars)
    }

    /// Adds (or replaces) a variable of the driver's own.
    pub fn with(mut self, key: &str, value: impl Into<Value>) -> Context {
        self.0.insert(key.to_owned(), value.into());
        self
    }
}

/// `s` as one shell word (single quotes; a `'` inside becomes `'\''`). Templates have it as the
/// filter `shell_quote`.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The environment every template renders in (see the module docs).
fn environment() -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_keep_trailing_newline(true);
    env.set_auto_escape_callback(|_| AutoEscape::None);
    env.add_filter("shell_quote", |s: String| shell_quote(&s));
    env
}

impl Template {
    /// Reads the template `keys` name from `s`. `None` when neither key is given (see
    /// [`Keys::given`]), or when both are or the file cannot be read (a problem, reported).
    pub fn read(s: &mut Section<'_>, keys: &Keys, p: &mut Problems) -> Option<Template> {
        let file = keys.file.and_then(|key| s.string(key, p).map(|file| (key, file)));
        let inline = s.string(keys.inline, p);
        match (file, inline) {
            (Some((key, _)), Some(_)) => {
                p.push(s.path(), format!("give only one of `{key}` and `{}`", keys.inline));
                None
            }
            (Some((key, file)), None) => {
                let path = p.resolve(&file);
                match std::fs::read_to_string(&path) {
                    Ok(text) => Some(Template {
                        what: keys.what,
                        text,
                        origin: path.display().to_string(),
                        key_path: s.key_path(key),
                    }),
                    Err(e) => {
                        p.push(s.key_path(key), format!("cannot read {}: {e}", path.display()));
                        None
                    }
                }
            }
            (None, Some(text)) => Some(Template {
                what: keys.what,
                text,
                origin: s.key_path(keys.inline),
                key_path: s.key_path(keys.inline),
            }),
            (None, None) => None,
        }
    }

    /// The text for one machine.
    pub fn render(&self, ctx: &Context) -> Result<String, Error> {
        let env = environment();
        let error = |unknown, source| Error { what: self.what, unknown, source };
        let template =
            env.template_from_named_str(&self.origin, &self.text).map_err(|source| error(Vec::new(), source))?;
        template.render(&ctx.0).map_err(|source| {
            let mut unknown: Vec<String> =
                template.undeclared_variables(false).into_iter().filter(|v| !ctx.0.contains_key(v)).collect();
            unknown.sort();
            error(unknown, source)
        })
    }

    /// Renders once with `trial` at configuration time, so a syntax error or a misspelt variable
    /// is a problem at the template's key rather than a failure of every create. The text, if
    /// it rendered.
    pub fn check(&self, trial: &Context, p: &mut Problems) -> Option<String> {
        self.render(trial).map_err(|e| p.push(self.key_path.clone(), e.to_string())).ok()
    }
}

/// Reads `template_data`, the user's values for the template. A key naming a variable Flotilla
/// fills in ([`COMMON`] or the driver's `own`) is a problem at its path (the value is kept, and
/// hidden by the variable when rendering).
pub fn template_data(s: &mut Section<'_>, own: &[&str], p: &mut Problems) -> Map<String, Value> {
    let data = match s.raw("template_data") {
        None => return Map::new(),
        Some(toml::Value::Table(t)) => match serde_json::to_value(t) {
            Ok(Value::Object(m)) => m,
            _ => {
                p.push(s.key_path("template_data"), "cannot be used as template data");
                return Map::new();
            }
        },
        Some(_) => {
            p.push(s.key_path("template_data"), "expected a table");
            return Map::new();
        }
    };
    for key in COMMON.iter().chain(own) {
        if data.contains_key(*key) {
            p.push(format!("{}.{key}", s.key_path("template_data")), "is filled in by Flotilla; choose another name");
        }
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    const TARGET: Target<'static> = Target { cluster: "prod", group: "workers", name: "prod-workers-x7k2p" };

    fn template(text: &str, origin: &str) -> Template {
        Template { what: "boot script", text: text.into(), origin: origin.into(), key_path: "k".into() }
    }

    fn section(text: &str) -> toml::Table {
        text.parse().unwrap()
    }

    #[test]
    fn a_template_sees_the_machine_and_its_data_at_the_top_and_under_data() {
        let data: Map<String, Value> = [("version".to_owned(), Value::from("v1.31"))].into_iter().collect();
        let ctx = Context::new(TARGET, &data).with("extra", 7);
        let t = template("{{ name }} {{ group }} {{ cluster }} {{ version }} {{ data.version }} {{ extra }}\n", "x");
        assert_eq!(t.render(&ctx).unwrap(), "prod-workers-x7k2p workers prod v1.31 v1.31 7\n");
    }

    #[test]
    fn an_undefined_variable_is_an_error_that_names_it() {
        let e = template("{{ nmae }} {{ name }} {{ clutser }}", "k").render(&Context::new(TARGET, &Map::new()));
        let e = e.unwrap_err().to_string();
        assert!(e.starts_with("cannot render the boot script template: "), "{e}");
        assert!(e.contains("unknown variables: clutser, nmae"), "{e}");
    }

    #[test]
    fn nothing_is_escaped_whatever_the_file_is_called_and_shell_quote_is_there() {
        let data: Map<String, Value> = [("v".to_owned(), Value::from("<a & 'b'>"))].into_iter().collect();
        let ctx = Context::new(TARGET, &data);
        for origin in ["user-data.html", "node.xml.j2", "node.bu.yaml", "k"] {
            let t = template("{{ v }} {{ v | shell_quote }}", origin);
            assert_eq!(t.render(&ctx).unwrap(), r"<a & 'b'> '<a & '\''b'\''>'", "{origin}");
        }
    }

    #[test]
    fn a_template_comes_from_one_key_or_a_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("boot.j2"), "#!/bin/sh\n").unwrap();
        let keys = Keys { what: "boot script", inline: "script", file: Some("script_file") };
        let read = |text: &str| {
            let table = section(text);
            let mut s = Section::new("m", &table);
            let mut p = Problems::new("test.toml", dir.path());
            (Template::read(&mut s, &keys, &mut p), p.items)
        };
        let (t, problems) = read("script_file = \"boot.j2\"");
        let t = t.unwrap();
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!((t.text.as_str(), t.key_path.as_str()), ("#!/bin/sh\n", "m.script_file"));
        assert!(t.origin.ends_with("boot.j2"), "{}", t.origin);
        let (t, _) = read("script = \"echo\"");
        assert_eq!(t.map(|t| (t.origin, t.key_path)), Some(("m.script".into(), "m.script".into())));
        let (t, problems) = read("script = \"echo\"\nscript_file = \"boot.j2\"");
        assert!(t.is_none());
        assert_eq!(problems[0].path, "m");
        assert_eq!(problems[0].message, "give only one of `script_file` and `script`");
        let (t, problems) = read("script_file = \"missing.j2\"");
        assert!(t.is_none());
        assert_eq!(problems[0].path, "m.script_file");
        assert!(problems[0].message.starts_with("cannot read "), "{}", problems[0].message);
        assert_eq!(read("").0.map(|t| t.text), None);
    }

    #[test]
    fn a_trial_render_reports_at_the_key_the_template_came_from() {
        let mut p = Problems::new("test.toml", ".");
        let t = Template { key_path: "groups.g.machine.script".into(), ..template("{% if %}", "x") };
        assert_eq!(t.check(&Context::new(TARGET, &Map::new()), &mut p), None);
        assert_eq!(p.items[0].path, "groups.g.machine.script");
        assert!(p.items[0].message.contains("syntax error"), "{}", p.items[0].message);
    }

    #[test]
    fn template_data_is_a_table_and_may_not_redefine_a_variable() {
        let read = |text: &str| {
            let table = section(text);
            let mut s = Section::new("m", &table);
            let mut p = Problems::new("test.toml", ".");
            (template_data(&mut s, &["join_url"], &mut p), p.items)
        };
        let (data, problems) = read("template_data = { tier = \"batch\", n = 3 }");
        assert!(problems.is_empty(), "{problems:?}");
        assert_eq!((data["tier"].as_str(), data["n"].as_i64()), (Some("batch"), Some(3)));
        let (_, problems) = read("template_data = { name = \"x\", join_url = \"y\", ok = 1 }");
        let paths: Vec<&str> = problems.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(paths, ["m.template_data.name", "m.template_data.join_url"]);
        assert!(problems.iter().all(|p| p.message == "is filled in by Flotilla; choose another name"));
        let (data, problems) = read("template_data = 5");
        assert!(data.is_empty());
        assert_eq!(problems[0].message, "expected a table");
    }
}
