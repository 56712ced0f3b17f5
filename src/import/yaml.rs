//! A YAML document as a list of leaf keys (`autoscaler.limits.max_nodes`), so an importer can
//! take the keys it knows and account for every key it does not.

use serde_yaml::Value;

/// The leaves of a YAML mapping, in file order, each taken at most once.
#[derive(Debug)]
pub struct Leaves {
    entries: Vec<(String, Value, bool)>,
}

impl Leaves {
    /// Flattens `value`; mappings under any of `opaque` (dotted paths) stay whole leaves.
    pub fn new(value: &Value, opaque: &[&str]) -> Leaves {
        let mut entries = Vec::new();
        flatten("", value, opaque, &mut entries);
        Leaves { entries: entries.into_iter().map(|(k, v)| (k, v, false)).collect() }
    }

    /// The value at `path`, marked as used.
    pub fn take(&mut self, path: &str) -> Option<Value> {
        self.entries.iter_mut().find(|(k, _, _)| k == path).map(|(_, v, used)| {
            *used = true;
            v.clone()
        })
    }

    /// True when the document has `path` (used or not).
    pub fn has(&self, path: &str) -> bool {
        self.entries.iter().any(|(k, _, _)| k == path)
    }

    /// Leaves nobody took, in file order.
    pub fn rest(&self) -> Vec<(String, Value)> {
        self.entries.iter().filter(|(_, _, used)| !used).map(|(k, v, _)| (k.clone(), v.clone())).collect()
    }
}

fn flatten(prefix: &str, value: &Value, opaque: &[&str], out: &mut Vec<(String, Value)>) {
    match value {
        Value::Mapping(m) if !opaque.contains(&prefix) && !m.is_empty() => {
            for (k, v) in m {
                let key = scalar(k).unwrap_or_else(|| "?".into());
                let path = if prefix.is_empty() { key } else { format!("{prefix}.{key}") };
                flatten(&path, v, opaque, out);
            }
        }
        Value::Tagged(t) => flatten(prefix, &t.value, opaque, out),
        other => out.push((prefix.to_owned(), other.clone())),
    }
}

/// A scalar as text (`9 GiB`, `72`, `true`); `None` for sequences, mappings and null.
pub fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Tagged(t) => scalar(&t.value),
        _ => None,
    }
}

/// A value as the report shows it.
pub fn show(v: &Value) -> String {
    match scalar(v) {
        Some(s) => s,
        None => serde_yaml::to_string(v).map(|s| s.trim_end().replace('\n', " ")).unwrap_or_default(),
    }
}

/// A number of seconds (YAML integers and floats, and numeric strings).
pub fn seconds(v: &Value) -> Option<u64> {
    match v {
        Value::Number(n) => n.as_u64().or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f.round() as u64)),
        Value::String(s) => s.trim().parse::<f64>().ok().filter(|f| *f >= 0.0).map(|f| f.round() as u64),
        _ => None,
    }
}

/// A number (percentages, thresholds).
pub fn number(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => s.trim().trim_end_matches('%').trim().parse().ok(),
        _ => None,
    }
}

/// A boolean as YAML 1.1 and Python's `yaml.safe_load` read it (`yes`/`no`/`on`/`off` too).
pub fn boolean(v: &Value) -> Option<bool> {
    match v {
        Value::Bool(b) => Some(*b),
        Value::String(s) => match s.to_ascii_lowercase().as_str() {
            "true" | "yes" | "on" | "y" => Some(true),
            "false" | "no" | "off" | "n" => Some(false),
            _ => None,
        },
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_are_every_scalar_path_and_unused_ones_are_listed() {
        let v: Value = serde_yaml::from_str("a:\n  b: 1\n  c: [x, y]\nd:\n  e: {f: 2}\ng: null\n").unwrap();
        let mut l = Leaves::new(&v, &["d.e"]);
        assert_eq!(l.take("a.b").and_then(|v| seconds(&v)), Some(1));
        let rest: Vec<_> = l.rest().into_iter().map(|(k, _)| k).collect();
        assert_eq!(rest, ["a.c", "d.e", "g"]);
    }
}
