//! What an import did with every key of the input: carried over into the configuration, turned
//! into a cluster-autoscaler flag, turned into a secret reference, or left behind with the
//! reason. Printed after the import so nothing is dropped silently.

use std::fmt::{self, Write as _};

/// What became of one input key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fate {
    /// Written to the configuration at this key path.
    Mapped(String),
    /// Became this cluster-autoscaler flag (`--name=value`).
    Flag(String),
    /// A secret: the configuration names the environment variable, never the value.
    Secret { var: String, to: String },
    /// Not carried over, and why.
    Dropped(String),
}

/// One input key and its fate.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    /// The key as the seed spells it, with its section where it has one.
    pub key: String,
    /// The value as read, for dropped keys; never set for secrets.
    pub value: Option<String>,
    pub fate: Fate,
}

/// A cluster-autoscaler flag that replaces part of the seed's own scaling logic.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CaFlag {
    pub name: String,
    pub value: String,
    /// The seed key it came from.
    pub from: String,
}

/// The account of one import.
#[derive(Clone, Debug, Default)]
pub struct Report {
    /// The seed system, for the heading.
    pub system: String,
    pub inputs: Vec<String>,
    pub lines: Vec<Line>,
    pub flags: Vec<CaFlag>,
    /// (variable, what it holds and where its value is in the input).
    pub secrets: Vec<(String, String)>,
    pub notes: Vec<String>,
}

impl Report {
    pub fn new(system: &str) -> Self {
        Report { system: system.to_owned(), ..Default::default() }
    }

    /// `key` was written to the configuration at `to`.
    pub fn mapped(&mut self, key: &str, to: &str) {
        self.push(key, None, Fate::Mapped(to.to_owned()));
    }

    /// `key` became the cluster-autoscaler flag `--name=value` (a later one replaces it).
    pub fn flag(&mut self, key: &str, name: &str, value: &str) {
        self.push(key, None, Fate::Flag(format!("--{name}={value}")));
        self.flags.retain(|f| f.name != name);
        self.flags.push(CaFlag { name: name.to_owned(), value: value.to_owned(), from: key.to_owned() });
    }

    /// `key` holds a secret; the configuration names `var` at `to`. `whence` says where the
    /// user finds the value to put in `var`.
    pub fn secret(&mut self, key: &str, var: &str, to: &str, whence: &str) {
        self.push(key, None, Fate::Secret { var: var.to_owned(), to: to.to_owned() });
        if !self.secrets.iter().any(|(v, _)| v == var) {
            self.secrets.push((var.to_owned(), whence.to_owned()));
        }
    }

    /// `key` (with `value` as read, when it is not a secret) is not carried over, because `why`.
    pub fn dropped(&mut self, key: &str, value: Option<&str>, why: &str) {
        self.push(key, value.map(str::to_owned), Fate::Dropped(why.to_owned()));
    }

    pub fn note(&mut self, text: impl Into<String>) {
        self.notes.push(text.into());
    }

    /// A line already there (a [global] key several groups use the same way) is not repeated.
    fn push(&mut self, key: &str, value: Option<String>, fate: Fate) {
        let line = Line { key: key.to_owned(), value, fate };
        if !self.lines.contains(&line) {
            self.lines.push(line);
        }
    }

    /// True when `key` has a line (every input key must).
    pub fn accounts_for(&self, key: &str) -> bool {
        self.lines.iter().any(|l| l.key == key)
    }

    /// The flags as `--name=value`, in the order they were added.
    pub fn flag_args(&self) -> Vec<String> {
        self.flags.iter().map(|f| format!("--{}={}", f.name, f.value)).collect()
    }
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let width = self.lines.iter().map(|l| l.key.len()).max().unwrap_or(0).min(44);
        let section = |f: &mut fmt::Formatter<'_>, title: &str, lines: Vec<String>| -> fmt::Result {
            if lines.is_empty() {
                return Ok(());
            }
            writeln!(f, "\n{title}")?;
            for l in lines {
                writeln!(f, "  {l}")?;
            }
            Ok(())
        };
        writeln!(f, "Imported {} configuration from {}.", self.system, self.inputs.join(", "))?;

        let mapped = self
            .lines
            .iter()
            .filter_map(|l| match &l.fate {
                Fate::Mapped(to) => Some(format!("{:width$} -> {to}", l.key)),
                Fate::Secret { var, to } => Some(format!("{:width$} -> {to} = {{ env = \"{var}\" }}", l.key)),
                _ => None,
            })
            .collect();
        section(f, "Carried over:", mapped)?;

        let flags = self.flags.iter().map(|fl| format!("--{}={}  ({})", fl.name, fl.value, fl.from)).collect();
        section(f, "cluster-autoscaler flags that replace the seed's own settings:", flags)?;

        let secrets = self.secrets.iter().map(|(var, whence)| format!("{var}: {whence}")).collect();
        section(
            f,
            "Secrets are not written to the configuration. Set these environment variables for `flotilla serve` and `flotilla check-config`:",
            secrets,
        )?;

        let dropped = self
            .lines
            .iter()
            .filter_map(|l| match &l.fate {
                Fate::Dropped(why) => {
                    let mut s = l.key.clone();
                    if let Some(v) = &l.value {
                        let _ = write!(s, " = {v}");
                    }
                    Some(format!("{s}: {why}"))
                }
                _ => None,
            })
            .collect();
        section(f, "Not carried over:", dropped)?;

        section(f, "Notes:", self.notes.iter().map(|n| format!("- {n}")).collect())?;
        Ok(())
    }
}
