//! A TOML table reader that records every problem with its key path instead of stopping at the
//! first one, so `check-config` can list them all at once. Drivers use it for their own keys.

use std::{
    collections::BTreeMap,
    fmt,
    path::{Path, PathBuf},
    time::Duration,
};

use toml::{Table, Value};

use super::Secret;
use crate::quantity;

/// The longest duration any key accepts: longer is surely a mistake, and would overflow timers.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 3600);

/// One thing wrong with the configuration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `groups.workers.max_size`.
    pub path: String,
    pub message: String,
}

/// Every problem found in one configuration file.
#[derive(Clone, Debug, Default)]
pub struct Problems {
    /// The file the problems are in (or `<embedded>`).
    pub source: String,
    /// Relative paths in the file (secret files, certificates) are resolved against this.
    pub base_dir: PathBuf,
    pub items: Vec<Problem>,
}

impl Problems {
    pub fn new(source: impl Into<String>, base_dir: impl Into<PathBuf>) -> Self {
        Problems { source: source.into(), base_dir: base_dir.into(), items: Vec::new() }
    }

    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.items.push(Problem { path: path.into(), message: message.into() });
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Resolves a path written in the file against the file's directory.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() { path.to_owned() } else { self.base_dir.join(path) }
    }
}

impl fmt::Display for Problems {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.items.len();
        writeln!(f, "{}: {n} problem{}", self.source, if n == 1 { "" } else { "s" })?;
        for p in &self.items {
            writeln!(f, "  {}: {}", p.path, p.message)?;
        }
        Ok(())
    }
}

impl std::error::Error for Problems {}

/// A view of one TOML table that remembers which keys were read.
#[derive(Debug)]
pub struct Section<'a> {
    path: String,
    table: &'a Table,
    seen: Vec<&'a str>,
}

fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a datetime",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

impl<'a> Section<'a> {
    /// A section at `path` (empty for the file's root).
    pub fn new(path: impl Into<String>, table: &'a Table) -> Self {
        Section { path: path.into(), table, seen: Vec::new() }
    }

    /// Marks keys as read by someone else (e.g. generic cloud keys, before a driver reads the
    /// rest of the same table).
    pub fn skipping(mut self, keys: &[&'a str]) -> Self {
        self.seen.extend_from_slice(keys);
        self
    }

    /// Marks one key as read by someone else (e.g. a group's `machine` table, which its driver
    /// reads).
    pub fn ignore(&mut self, key: &'a str) {
        self.seen.push(key);
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// The dotted path of `key` in this section.
    pub fn key_path(&self, key: &str) -> String {
        if self.path.is_empty() { key.to_owned() } else { format!("{}.{key}", self.path) }
    }

    pub fn contains(&self, key: &str) -> bool {
        self.table.contains_key(key)
    }

    fn take(&mut self, key: &'a str) -> Option<&'a Value> {
        self.seen.push(key);
        self.table.get(key)
    }

    fn wrong_type(&self, p: &mut Problems, key: &str, expected: &str, got: &Value) {
        p.push(self.key_path(key), format!("expected {expected}, found {}", type_name(got)));
    }

    /// An optional string.
    pub fn string(&mut self, key: &'a str, p: &mut Problems) -> Option<String> {
        match self.take(key)? {
            Value::String(s) => Some(s.clone()),
            other => {
                self.wrong_type(p, key, "a string", other);
                None
            }
        }
    }

    /// A string that must be present and non-empty.
    pub fn required_string(&mut self, key: &'a str, p: &mut Problems) -> Option<String> {
        if !self.contains(key) {
            p.push(self.key_path(key), "is required");
            self.seen.push(key);
            return None;
        }
        let s = self.string(key, p)?;
        if s.trim().is_empty() {
            p.push(self.key_path(key), "must not be empty");
            return None;
        }
        Some(s)
    }

    /// An optional integer that must fit `T` (and so be non-negative for unsigned `T`).
    pub fn integer<T: TryFrom<i64>>(&mut self, key: &'a str, p: &mut Problems) -> Option<T> {
        match self.take(key)? {
            Value::Integer(i) => match T::try_from(*i) {
                Ok(v) => Some(v),
                Err(_) => {
                    p.push(self.key_path(key), format!("{i} is out of range"));
                    None
                }
            },
            other => {
                self.wrong_type(p, key, "an integer", other);
                None
            }
        }
    }

    /// An optional number (integers are accepted as floats).
    pub fn float(&mut self, key: &'a str, p: &mut Problems) -> Option<f64> {
        match self.take(key)? {
            Value::Float(f) if f.is_finite() => Some(*f),
            #[allow(clippy::cast_precision_loss, reason = "config numbers are small")]
            Value::Integer(i) => Some(*i as f64),
            other => {
                self.wrong_type(p, key, "a finite number", other);
                None
            }
        }
    }

    pub fn boolean(&mut self, key: &'a str, p: &mut Problems) -> Option<bool> {
        match self.take(key)? {
            Value::Boolean(b) => Some(*b),
            other => {
                self.wrong_type(p, key, "a boolean", other);
                None
            }
        }
    }

    /// A duration written as text: `"30s"`, `"15m"`, `"1h 30m"`, `"250ms"`; at most
    /// [`MAX_DURATION`], so no timer can overflow.
    pub fn duration(&mut self, key: &'a str, p: &mut Problems) -> Option<Duration> {
        let text = self.string(key, p)?;
        match humantime::parse_duration(&text) {
            Ok(d) if d > MAX_DURATION => {
                p.push(self.key_path(key), format!("{text:?} is longer than the longest duration allowed, 365 days"));
                None
            }
            Ok(d) => Some(d),
            Err(e) => {
                p.push(self.key_path(key), format!("{text:?} is not a duration ({e}); write e.g. \"30s\" or \"5m\""));
                None
            }
        }
    }

    /// A CPU quantity (`"2"`, `"500m"`), as a string or an integer number of cores.
    pub fn cpu(&mut self, key: &'a str, p: &mut Problems) -> Option<u64> {
        self.quantity(key, p, quantity::parse_cpu_millis, "a CPU quantity such as \"2\" or \"500m\"")
    }

    /// A byte quantity (`"4Gi"`, `"20G"`), as a string or an integer number of bytes.
    pub fn bytes(&mut self, key: &'a str, p: &mut Problems) -> Option<u64> {
        self.quantity(key, p, quantity::parse_bytes, "a byte quantity such as \"4Gi\" or \"512Mi\"")
    }

    fn quantity(
        &mut self,
        key: &'a str,
        p: &mut Problems,
        parse: fn(&str) -> Option<u64>,
        expected: &str,
    ) -> Option<u64> {
        let text = match self.take(key)? {
            Value::String(s) => s.clone(),
            Value::Integer(i) if *i >= 0 => i.to_string(),
            other => {
                self.wrong_type(p, key, expected, other);
                return None;
            }
        };
        let parsed = parse(&text);
        if parsed.is_none() {
            p.push(self.key_path(key), format!("{text:?} is not {expected}"));
        }
        parsed
    }

    /// An optional table of string values (`labels = { a = "b" }`).
    pub fn string_map(&mut self, key: &'a str, p: &mut Problems) -> BTreeMap<String, String> {
        let mut out = BTreeMap::new();
        match self.take(key) {
            None => {}
            Some(Value::Table(t)) => {
                for (k, v) in t {
                    match v {
                        Value::String(s) => {
                            out.insert(k.clone(), s.clone());
                        }
                        other => p.push(
                            format!("{}.{k}", self.key_path(key)),
                            format!("expected a string, found {}", type_name(other)),
                        ),
                    }
                }
            }
            Some(other) => self.wrong_type(p, key, "a table of strings", other),
        }
        out
    }

    /// An optional array of strings.
    pub fn string_list(&mut self, key: &'a str, p: &mut Problems) -> Vec<String> {
        let mut out = Vec::new();
        match self.take(key) {
            None => {}
            Some(Value::Array(items)) => {
                for (i, v) in items.iter().enumerate() {
                    match v {
                        Value::String(s) => out.push(s.clone()),
                        other => p.push(
                            format!("{}[{i}]", self.key_path(key)),
                            format!("expected a string, found {}", type_name(other)),
                        ),
                    }
                }
            }
            Some(other) => self.wrong_type(p, key, "an array of strings", other),
        }
        out
    }

    /// A raw value of any type (free-form data such as a driver's template variables).
    pub fn raw(&mut self, key: &'a str) -> Option<&'a Value> {
        self.take(key)
    }

    /// An optional sub-table.
    pub fn section(&mut self, key: &'a str, p: &mut Problems) -> Option<Section<'a>> {
        let path = self.key_path(key);
        match self.take(key)? {
            Value::Table(t) => Some(Section::new(path, t)),
            other => {
                self.wrong_type(p, key, "a table", other);
                None
            }
        }
    }

    /// A table of named tables (`[groups.a]`, `[groups.b]`), in file order.
    pub fn named_sections(&mut self, key: &'a str, p: &mut Problems) -> Vec<(&'a str, Section<'a>)> {
        let path = self.key_path(key);
        let mut out = Vec::new();
        match self.take(key) {
            None => {}
            Some(Value::Table(t)) => {
                for (name, v) in t {
                    match v {
                        Value::Table(inner) => out.push((name.as_str(), Section::new(format!("{path}.{name}"), inner))),
                        other => {
                            p.push(format!("{path}.{name}"), format!("expected a table, found {}", type_name(other)))
                        }
                    }
                }
            }
            Some(other) => self.wrong_type(p, key, "a table of tables", other),
        }
        out
    }

    /// An optional array of tables (`[[taints]]` or `taints = [{...}]`).
    pub fn array_of_sections(&mut self, key: &'a str, p: &mut Problems) -> Vec<Section<'a>> {
        let path = self.key_path(key);
        let mut out = Vec::new();
        match self.take(key) {
            None => {}
            Some(Value::Array(items)) => {
                for (i, v) in items.iter().enumerate() {
                    match v {
                        Value::Table(t) => out.push(Section::new(format!("{path}[{i}]"), t)),
                        other => {
                            p.push(format!("{path}[{i}]"), format!("expected a table, found {}", type_name(other)))
                        }
                    }
                }
            }
            Some(other) => self.wrong_type(p, key, "an array of tables", other),
        }
        out
    }

    /// A secret: `{ env = "NAME" }`, `{ file = "path" }`, or (discouraged) an inline string.
    /// Read at load time; its value never appears in a problem message.
    pub fn secret(&mut self, key: &'a str, p: &mut Problems) -> Option<Secret> {
        let path = self.key_path(key);
        match self.take(key)? {
            Value::String(s) => Some(Secret::new(s.clone())),
            Value::Table(t) => {
                let mut s = Section::new(path.clone(), t);
                let env = s.string("env", p);
                let file = s.string("file", p);
                s.finish(p);
                match (env, file) {
                    (Some(var), None) => match std::env::var(&var) {
                        Ok(v) if !v.is_empty() => Some(Secret::new(v)),
                        _ => {
                            p.push(path, format!("environment variable {var} is not set"));
                            None
                        }
                    },
                    (None, Some(file)) => {
                        let resolved = p.resolve(&file);
                        match std::fs::read_to_string(&resolved) {
                            Ok(v) => Some(Secret::new(v.trim_end_matches(['\n', '\r']).to_owned())),
                            Err(e) => {
                                p.push(path, format!("cannot read secret file {}: {e}", resolved.display()));
                                None
                            }
                        }
                    }
                    _ => {
                        p.push(path, "a secret needs exactly one of `env` or `file`");
                        None
                    }
                }
            }
            other => {
                self.wrong_type(p, key, "a secret ({ env = \"VAR\" } or { file = \"path\" })", other);
                None
            }
        }
    }

    /// Reports every key that nobody read.
    pub fn finish(self, p: &mut Problems) {
        for key in self.table.keys() {
            if !self.seen.contains(&key.as_str()) {
                p.push(self.key_path(key), "unknown key");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(text: &str) -> Table {
        text.parse().unwrap()
    }

    #[test]
    fn every_problem_is_reported_with_its_path() {
        let t = table("a = 1\nb = \"x\"\nc = \"nope\"\nextra = true\n[sub]\nd = -1\n");
        let mut p = Problems::new("test.toml", ".");
        let mut s = Section::new("", &t);
        assert_eq!(s.string("a", &mut p), None);
        assert_eq!(s.integer::<u32>("b", &mut p), None);
        assert_eq!(s.duration("c", &mut p), None);
        let mut sub = s.section("sub", &mut p).unwrap();
        assert_eq!(sub.integer::<u32>("d", &mut p), None);
        sub.finish(&mut p);
        assert_eq!(s.required_string("missing", &mut p), None);
        s.finish(&mut p);
        let paths: Vec<_> = p.items.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["a", "b", "c", "sub.d", "missing", "extra"]);
    }

    #[test]
    fn secrets_come_from_env_or_file_and_stay_hidden() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("token"), "s3cret\n").unwrap();
        let t = table("a = { file = \"token\" }\nb = { file = \"absent\" }\nc = { env = \"FLOTILLA_TEST_UNSET_VAR\" }");
        let mut p = Problems::new("test.toml", dir.path());
        let mut s = Section::new("", &t);
        let a = s.secret("a", &mut p).unwrap();
        assert_eq!(a.expose(), "s3cret");
        assert_eq!(format!("{a:?}"), "Secret(<redacted>)");
        assert!(s.secret("b", &mut p).is_none());
        assert!(s.secret("c", &mut p).is_none());
        assert_eq!(p.items.len(), 2);
        assert!(!p.to_string().contains("s3cret"));
    }
}
