//! The TOML document an import writes: tables and keys in the order the importer adds them,
//! each key with an optional comment saying where it came from.
//!
//! Hand-written because the `toml` crate's serializer cannot attach comments, and a generated
//! configuration that says which seed key each line came from is what a reviewer needs.
//! Secrets are a value kind of their own, so the one place that renders them decides whether
//! they become `{ env = "VAR" }` (the output) or a placeholder file (the self-check).

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

/// A value in the output.
#[derive(Clone, Debug, PartialEq)]
pub enum Value {
    String(String),
    Integer(i64),
    Float(f64),
    Bool(bool),
    Array(Vec<Value>),
    /// An inline table (`{ a = "b" }`), keys in insertion order.
    Table(Vec<(String, Value)>),
    /// A secret, written `{ env = "VAR" }`; its value is never known to the document.
    SecretEnv(String),
}

impl From<&str> for Value {
    fn from(s: &str) -> Self {
        Value::String(s.to_owned())
    }
}
impl From<String> for Value {
    fn from(s: String) -> Self {
        Value::String(s)
    }
}
impl From<i64> for Value {
    fn from(i: i64) -> Self {
        Value::Integer(i)
    }
}
impl From<bool> for Value {
    fn from(b: bool) -> Self {
        Value::Bool(b)
    }
}
impl From<f64> for Value {
    fn from(f: f64) -> Self {
        Value::Float(f)
    }
}
impl From<Vec<String>> for Value {
    fn from(v: Vec<String>) -> Self {
        Value::Array(v.into_iter().map(Value::String).collect())
    }
}
impl From<BTreeMap<String, String>> for Value {
    fn from(m: BTreeMap<String, String>) -> Self {
        Value::Table(m.into_iter().map(|(k, v)| (k, Value::String(v))).collect())
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Item {
    Value(Value),
    Table(Table),
}

#[derive(Clone, Debug, PartialEq)]
struct Entry {
    key: String,
    item: Item,
    comment: Option<String>,
}

/// One table: plain keys, then sub-tables, each in insertion order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    entries: Vec<Entry>,
    /// Comment lines written above the table's header.
    header_comment: Vec<String>,
}

impl Table {
    /// Sets `key` (replacing an earlier value) with a comment saying where it came from.
    pub fn set(&mut self, key: &str, value: impl Into<Value>, comment: Option<&str>) -> &mut Self {
        let item = Item::Value(value.into());
        let comment = comment.map(str::to_owned);
        match self.entries.iter_mut().find(|e| e.key == key) {
            Some(e) => {
                e.item = item;
                e.comment = comment;
            }
            None => self.entries.push(Entry { key: key.to_owned(), item, comment }),
        }
        self
    }

    /// The sub-table at a dotted path (`groups.workers.machine`), created empty if missing.
    pub fn table(&mut self, path: &str) -> &mut Table {
        let mut t = self;
        for part in path.split('.') {
            let idx = match t.entries.iter().position(|e| e.key == part && matches!(e.item, Item::Table(_))) {
                Some(i) => i,
                None => {
                    t.entries.push(Entry { key: part.to_owned(), item: Item::Table(Table::default()), comment: None });
                    t.entries.len() - 1
                }
            };
            t = match &mut t.entries[idx].item {
                Item::Table(inner) => inner,
                Item::Value(_) => unreachable!("position() matched a table"),
            };
        }
        t
    }

    /// Comment lines printed above this table's `[header]`.
    pub fn comment(&mut self, line: impl Into<String>) -> &mut Self {
        self.header_comment.push(line.into());
        self
    }

    /// The value at a dotted path, for tests and cross-checks.
    pub fn get(&self, path: &str) -> Option<&Value> {
        let (head, rest) = match path.split_once('.') {
            Some((h, r)) => (h, Some(r)),
            None => (path, None),
        };
        self.entries.iter().find(|e| e.key == head).and_then(|e| match (&e.item, rest) {
            (Item::Value(v), None) => Some(v),
            (Item::Table(t), Some(rest)) => t.get(rest),
            _ => None,
        })
    }

    fn render(&self, path: &str, secret: &dyn Fn(&str) -> String, out: &mut String) {
        let values: Vec<_> = self.entries.iter().filter(|e| matches!(e.item, Item::Value(_))).collect();
        if !path.is_empty() && (!values.is_empty() || !self.header_comment.is_empty()) {
            if !out.is_empty() {
                out.push('\n');
            }
            for line in &self.header_comment {
                comment_lines(line, out);
            }
            let _ = writeln!(out, "[{path}]");
        } else if path.is_empty() {
            for line in &self.header_comment {
                comment_lines(line, out);
            }
        }
        for e in values {
            let Item::Value(v) = &e.item else { continue };
            if let Some(c) = &e.comment {
                comment_lines(c, out);
            }
            let _ = writeln!(out, "{} = {}", key(&e.key), render_value(v, secret, true));
        }
        for e in &self.entries {
            if let Item::Table(t) = &e.item {
                let sub = if path.is_empty() { key(&e.key) } else { format!("{path}.{}", key(&e.key)) };
                t.render(&sub, secret, out);
            }
        }
    }
}

/// A whole output file.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Document {
    pub root: Table,
}

impl Document {
    /// The file as written: secrets as `{ env = "VAR" }`.
    pub fn render(&self) -> String {
        self.render_with(&|var| format!("{{ env = {} }}", basic_string(var)))
    }

    /// The file with each secret rendered by `secret(VAR)` (the self-check points them at
    /// placeholder files).
    pub fn render_with(&self, secret: &dyn Fn(&str) -> String) -> String {
        let mut out = String::new();
        self.root.render("", secret, &mut out);
        out
    }

    /// Every environment variable the document names for a secret, in order of appearance.
    pub fn secret_vars(&self) -> Vec<String> {
        fn walk(t: &Table, out: &mut Vec<String>) {
            for e in &t.entries {
                match &e.item {
                    Item::Value(v) => collect(v, out),
                    Item::Table(t) => walk(t, out),
                }
            }
        }
        fn collect(v: &Value, out: &mut Vec<String>) {
            match v {
                Value::SecretEnv(var) if !out.contains(var) => out.push(var.clone()),
                Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
                Value::Table(items) => items.iter().for_each(|(_, i)| collect(i, out)),
                _ => {}
            }
        }
        let mut out = Vec::new();
        walk(&self.root, &mut out);
        out
    }

    /// Every file the document names, as `(key path, path as written)`, in order of
    /// appearance: the string values of keys ending in `_file` (`credentials_file`, `ca_file`,
    /// `script_file`, ...), which is how Flotilla's configuration names every file it reads.
    pub fn file_paths(&self) -> Vec<(String, String)> {
        self.strings(&|key| key.ends_with("_file"))
    }

    /// Whether any table (outside inline tables) sets `key = true`.
    pub fn any_true(&self, key: &str) -> bool {
        fn walk(t: &Table, key: &str) -> bool {
            t.entries.iter().any(|e| match &e.item {
                Item::Value(Value::Bool(true)) => e.key == key,
                Item::Value(_) => false,
                Item::Table(t) => walk(t, key),
            })
        }
        walk(&self.root, key)
    }

    /// Every string value (outside inline tables) whose key `keep` accepts, as `(key path,
    /// value)`, in order of appearance.
    pub fn strings(&self, keep: &dyn Fn(&str) -> bool) -> Vec<(String, String)> {
        fn walk(t: &Table, path: &str, keep: &dyn Fn(&str) -> bool, out: &mut Vec<(String, String)>) {
            for e in &t.entries {
                let here = if path.is_empty() { e.key.clone() } else { format!("{path}.{}", e.key) };
                match &e.item {
                    Item::Value(Value::String(s)) if keep(&e.key) => out.push((here, s.clone())),
                    Item::Value(_) => {}
                    Item::Table(t) => walk(t, &here, keep, out),
                }
            }
        }
        let mut out = Vec::new();
        walk(&self.root, "", keep, &mut out);
        out
    }
}

/// Writes `text` as `# ` lines, wrapping prose at 100 columns (a line that is an example
/// `key = value` stays whole, so it can be uncommented).
pub(crate) fn comment_lines(text: &str, out: &mut String) {
    for line in text.lines() {
        if line.is_empty() {
            out.push_str("#\n");
            continue;
        }
        let is_example = line.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '));
        if is_example || line.len() <= 98 {
            let _ = writeln!(out, "# {line}");
            continue;
        }
        let mut current = String::new();
        for word in line.split(' ') {
            if !current.is_empty() && current.len() + 1 + word.len() > 98 {
                let _ = writeln!(out, "# {current}");
                current.clear();
            }
            if !current.is_empty() {
                current.push(' ');
            }
            current.push_str(word);
        }
        if !current.is_empty() {
            let _ = writeln!(out, "# {current}");
        }
    }
}

fn key(k: &str) -> String {
    if !k.is_empty() && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        k.to_owned()
    } else {
        basic_string(k)
    }
}

/// A TOML basic string: `"..."` with the escapes TOML requires.
pub fn basic_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\t' => out.push_str("\\t"),
            '\r' => out.push_str("\\r"),
            c if (c as u32) < 0x20 || c == '\u{7f}' => {
                let _ = write!(out, "\\u{:04X}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Multi-line text as a TOML literal string (`'''...'''`) when it can be one, so templates stay
/// readable; otherwise a basic string with escapes.
fn multiline(s: &str) -> String {
    let literal_ok =
        !s.contains("'''") && !s.ends_with('\'') && s.chars().all(|c| c == '\n' || c == '\t' || !c.is_control());
    if literal_ok {
        // A newline right after the opening delimiter is trimmed by TOML.
        format!("'''\n{s}'''")
    } else {
        basic_string(s)
    }
}

fn render_value(v: &Value, secret: &dyn Fn(&str) -> String, top: bool) -> String {
    match v {
        Value::String(s) if top && s.contains('\n') => multiline(s),
        Value::String(s) => basic_string(s),
        Value::Integer(i) => i.to_string(),
        Value::Float(f) => {
            let s = f.to_string();
            if s.contains('.') || s.contains('e') || s.contains("inf") || s.contains("NaN") {
                s
            } else {
                format!("{s}.0")
            }
        }
        Value::Bool(b) => b.to_string(),
        Value::Array(items) => {
            let parts: Vec<_> = items.iter().map(|i| render_value(i, secret, false)).collect();
            format!("[{}]", parts.join(", "))
        }
        Value::Table(items) if items.is_empty() => "{}".to_owned(),
        Value::Table(items) => {
            let parts: Vec<_> =
                items.iter().map(|(k, v)| format!("{} = {}", key(k), render_value(v, secret, false))).collect();
            format!("{{ {} }}", parts.join(", "))
        }
        Value::SecretEnv(var) => secret(var),
    }
}

/// `path` as written in a file that lives in `base` (relative when it can be, absolute when the
/// two share no prefix).
pub fn relative_path(path: &Path, base: &Path) -> String {
    let abs = |p: &Path| {
        let p = if p.is_absolute() { p.to_owned() } else { std::env::current_dir().unwrap_or_default().join(p) };
        normalize(&p)
    };
    let (path, base) = (abs(path), abs(base));
    let (p, b): (Vec<_>, Vec<_>) = (path.components().collect(), base.components().collect());
    let common = p.iter().zip(&b).take_while(|(x, y)| x == y).count();
    if common <= 1 {
        return path.display().to_string();
    }
    let mut out = std::path::PathBuf::new();
    for _ in common..b.len() {
        out.push("..");
    }
    for c in &p[common..] {
        out.push(c);
    }
    out.display().to_string()
}

/// Removes `.` and resolves `..` lexically (the files may not exist yet).
pub(crate) fn normalize(p: &Path) -> std::path::PathBuf {
    let mut out = std::path::PathBuf::new();
    for c in p.components() {
        match c {
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                out.pop();
            }
            other => out.push(other),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_document_renders_as_toml_that_parses_back_to_the_same_values() {
        let mut d = Document::default();
        d.root.comment("imported");
        d.root.set("cluster_name", "dev", Some("from clusterName"));
        let g = d.root.table("groups.workers");
        g.set("cloud", "pouta", None).set("max_size", 3, None);
        d.root.table("groups.workers.machine").set("user_data", "line one\nline 'two'\n", None).set(
            "labels",
            Value::Table(vec![("a.b/c".into(), "x\"y".into())]),
            None,
        );
        d.root.table("groups.workers.machine").set("join_token", Value::SecretEnv("TOKEN".into()), Some("secret"));
        d.root.table("groups.workers.options").set("scale_down_utilization_threshold", 0.5, None);
        let text = d.render();
        let parsed: toml::Table = text.parse().unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(parsed["cluster_name"].as_str(), Some("dev"));
        let m = &parsed["groups"]["workers"]["machine"];
        assert_eq!(m["user_data"].as_str(), Some("line one\nline 'two'\n"));
        assert_eq!(m["labels"]["a.b/c"].as_str(), Some("x\"y"));
        assert_eq!(m["join_token"]["env"].as_str(), Some("TOKEN"));
        assert_eq!(parsed["groups"]["workers"]["options"]["scale_down_utilization_threshold"].as_float(), Some(0.5));
        assert!(text.starts_with("# imported\n# from clusterName\ncluster_name = \"dev\"\n"), "{text}");
        assert_eq!(d.secret_vars(), ["TOKEN"]);
    }

    #[test]
    fn the_files_a_document_names_are_the_values_of_its_file_keys() {
        let mut d = Document::default();
        d.root.table("clouds.os").set("credentials_file", "creds.yaml", None).set("cloud", "x_file", None);
        d.root.table("groups.g.machine").set("script_file", "init.sh", None).set("profile", "p", None);
        d.root.table("groups.g.template").set("labels", Value::Table(vec![("ca_file".into(), "v".into())]), None);
        assert_eq!(
            d.file_paths(),
            [
                ("clouds.os.credentials_file".to_owned(), "creds.yaml".to_owned()),
                ("groups.g.machine.script_file".to_owned(), "init.sh".to_owned())
            ]
        );
    }

    #[test]
    fn relative_paths_are_relative_to_the_output_directory() {
        assert_eq!(relative_path(Path::new("/a/b/c.yaml"), Path::new("/a/b")), "c.yaml");
        assert_eq!(relative_path(Path::new("/a/x/c.yaml"), Path::new("/a/b")), "../x/c.yaml");
        assert_eq!(relative_path(Path::new("/x/c.yaml"), Path::new("/a/b")), "/x/c.yaml");
    }
}
