//! Reads a Python settings module (`autoscaler/settings.py` of the Proxmox autoscaler) without
//! running it: top-level `name = value` assignments of literals, and values taken from the
//! environment (`os.environ["X"]`, `os.environ.get("X", default)`, `os.getenv(...)`, and the
//! seed's own `try: x = os.environ["X"] except KeyError: x = "default"` idiom).
//!
//! Hand-written because running user Python to import it would be neither safe nor possible
//! here, and no crate reads "Python as a config file" (a full Python parser would still not
//! evaluate it). Anything this reader cannot evaluate is returned as [`PyValue::Unknown`] with
//! its text, so the importer can say which line it could not carry over.

/// A value as the settings module would compute it.
#[derive(Clone, Debug, PartialEq)]
pub enum PyValue {
    Str(String),
    Int(i64),
    Float(f64),
    Bool(bool),
    None,
    List(Vec<PyValue>),
    /// Read from environment variable `var` at start-up, `default` when it is unset (none:
    /// the seed fails to start without it).
    Env {
        var: String,
        default: Option<Box<PyValue>>,
    },
    /// An expression this reader does not evaluate (its source text).
    Unknown(String),
}

impl PyValue {
    /// The value as the report shows it (never used for secrets).
    pub fn show(&self) -> String {
        match self {
            PyValue::Str(s) => format!("{s:?}"),
            PyValue::Int(i) => i.to_string(),
            PyValue::Float(f) => f.to_string(),
            PyValue::Bool(b) => if *b { "True" } else { "False" }.into(),
            PyValue::None => "None".into(),
            PyValue::List(items) => format!("[{}]", items.iter().map(PyValue::show).collect::<Vec<_>>().join(", ")),
            PyValue::Env { var, default: None } => format!("os.environ[{var:?}]"),
            PyValue::Env { var, default: Some(d) } => format!("os.environ[{var:?}] or {}", d.show()),
            PyValue::Unknown(text) => text.clone(),
        }
    }
}

/// One name the module defines, with the 1-based line of its (last) assignment.
#[derive(Clone, Debug, PartialEq)]
pub struct Setting {
    pub name: String,
    pub value: PyValue,
    pub line: usize,
}

#[derive(Clone, Copy, PartialEq)]
enum Block {
    Try(usize),
    Except(usize),
    Other(usize),
}

/// Every name the module assigns, in order of first assignment; a later assignment replaces an
/// earlier one, except that an `except` branch supplies the default of a `try` branch's
/// environment lookup.
pub fn parse(text: &str) -> Vec<Setting> {
    let mut out: Vec<Setting> = Vec::new();
    let mut blocks: Vec<Block> = Vec::new();
    for (i, raw) in text.lines().enumerate() {
        let line = strip_comment(raw);
        if line.trim().is_empty() {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        while blocks.last().is_some_and(|b| match b {
            Block::Try(n) | Block::Except(n) | Block::Other(n) => *n >= indent,
        }) {
            let ended = blocks.pop();
            // `except` closes its `try` at the same indent.
            if matches!(ended, Some(Block::Try(n)) if n == indent) && line.trim_start().starts_with("except") {
                break;
            }
        }
        let t = line.trim();
        if t == "try:" {
            blocks.push(Block::Try(indent));
            continue;
        }
        if t.starts_with("except") && t.ends_with(':') {
            blocks.push(Block::Except(indent));
            continue;
        }
        if t.ends_with(':') {
            blocks.push(Block::Other(indent));
            continue;
        }
        let Some((name, expr)) = assignment(t) else { continue };
        let value = eval(expr.trim());
        let in_except = blocks.iter().any(|b| matches!(b, Block::Except(_)));
        match out.iter_mut().find(|s| s.name == name) {
            Some(s) => {
                if in_except && let PyValue::Env { default: d @ None, .. } = &mut s.value {
                    *d = Some(Box::new(value));
                } else {
                    s.value = value;
                    s.line = i + 1;
                }
            }
            None => out.push(Setting { name: name.to_owned(), value, line: i + 1 }),
        }
    }
    out
}

/// `name = expr` (not `==`, not augmented, not attribute or subscript targets).
fn assignment(t: &str) -> Option<(&str, &str)> {
    let (lhs, rhs) = t.split_once('=')?;
    if rhs.starts_with('=') || lhs.ends_with(['!', '<', '>', '+', '-', '*', '/', '%', '|', '&', ':']) {
        return None;
    }
    let name = lhs.trim();
    let ok = name.chars().next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
    ok.then_some((name, rhs))
}

/// The line without a `#` comment (a `#` inside a string literal stays).
fn strip_comment(line: &str) -> &str {
    let mut quote: Option<char> = None;
    let mut escaped = false;
    for (i, c) in line.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None if c == '#' => return &line[..i],
            None if c == '\'' || c == '"' => quote = Some(c),
            None => {}
        }
    }
    line
}

fn eval(e: &str) -> PyValue {
    let e = e.trim();
    if let Some(s) = string_literal(e) {
        return PyValue::Str(s);
    }
    match e {
        "True" => return PyValue::Bool(true),
        "False" => return PyValue::Bool(false),
        "None" => return PyValue::None,
        _ => {}
    }
    let digits = e.replace('_', "");
    if let Ok(i) = digits.parse::<i64>() {
        return PyValue::Int(i);
    }
    if let Ok(f) = digits.parse::<f64>()
        && e.chars().next().is_some_and(|c| c.is_ascii_digit() || c == '-' || c == '.')
    {
        return PyValue::Float(f);
    }
    if let Some(inner) = e.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        let items: Vec<PyValue> = split_top(inner).into_iter().filter(|s| !s.trim().is_empty()).map(eval).collect();
        if items.iter().all(|i| !matches!(i, PyValue::Unknown(_))) {
            return PyValue::List(items);
        }
        return PyValue::Unknown(e.to_owned());
    }
    // int(...), str(...), float(...) around an environment lookup: the type follows the use.
    for conv in ["int(", "str(", "float("] {
        if let Some(inner) = e.strip_prefix(conv).and_then(|r| r.strip_suffix(')')) {
            return eval(inner);
        }
    }
    let env_subscript = ["os.environ[", "environ["].iter().find_map(|p| e.strip_prefix(p));
    if let Some(rest) = env_subscript.and_then(|r| r.strip_suffix(']'))
        && let Some(var) = string_literal(rest.trim())
    {
        return PyValue::Env { var, default: None };
    }
    let env_call = ["os.environ.get(", "environ.get(", "os.getenv(", "getenv("].iter().find_map(|p| e.strip_prefix(p));
    if let Some(args) = env_call.and_then(|r| r.strip_suffix(')')) {
        let parts = split_top(args);
        if let Some(var) = parts.first().and_then(|v| string_literal(v.trim())) {
            // Without a default, .get() gives None, which the seed then fails to use.
            let default = parts.get(1).map(|d| Box::new(eval(d)));
            return PyValue::Env { var, default };
        }
    }
    PyValue::Unknown(e.to_owned())
}

/// Splits on commas outside brackets and strings.
fn split_top(s: &str) -> Vec<&str> {
    let (mut out, mut depth, mut start, mut quote, mut escaped) = (Vec::new(), 0i32, 0, None::<char>, false);
    for (i, c) in s.char_indices() {
        match quote {
            Some(q) => {
                if escaped {
                    escaped = false;
                } else if c == '\\' {
                    escaped = true;
                } else if c == q {
                    quote = None;
                }
            }
            None => match c {
                '\'' | '"' => quote = Some(c),
                '[' | '(' | '{' => depth += 1,
                ']' | ')' | '}' => depth -= 1,
                ',' if depth == 0 => {
                    out.push(&s[start..i]);
                    start = i + 1;
                }
                _ => {}
            },
        }
    }
    out.push(&s[start..]);
    out
}

/// A Python string literal (`'x'`, `"x"`, with `r`/`u` prefixes and the common escapes).
fn string_literal(e: &str) -> Option<String> {
    let (raw, body) = match e.as_bytes().first()? {
        b'r' | b'R' => (true, &e[1..]),
        b'u' | b'U' => (false, &e[1..]),
        _ => (false, e),
    };
    let q = body.chars().next().filter(|c| *c == '\'' || *c == '"')?;
    let triple: String = [q; 3].iter().collect();
    if body.len() < 2 || !body.ends_with(q) || body.starts_with(&triple) {
        return None; // not a literal, or a triple-quoted one (not read)
    }
    let inner = &body[1..body.len() - 1];
    if raw {
        return Some(inner.to_owned());
    }
    let mut out = String::new();
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == q {
            return None; // two literals, or an unescaped quote: not a single literal
        }
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some(c @ ('\\' | '\'' | '"')) => out.push(c),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn value(settings: &[Setting], name: &str) -> PyValue {
        settings.iter().find(|s| s.name == name).map(|s| s.value.clone()).unwrap_or(PyValue::Unknown("missing".into()))
    }

    #[test]
    fn the_seeds_environment_idiom_gives_a_variable_with_a_default() {
        let s = parse(
            "import os\n\ntry:\n    pxe_host = os.environ[\"PXE_HOST\"]\n    pxe_password = os.environ['PXE_PASSWORD']\n\
             except KeyError:\n    pxe_host = \"10.10.10.10\"  # the lab\n    pxe_password = 't3mplat3'\n\
             pxe_autoscaled_node_ip_mask = '24'  # cidr\nmin_size = 0\nmax_size = 5\nscale = 0.5\nflag = True\n\
             dns = os.getenv('DNS', '1.1.1.1')\nnames = ['a', \"b#c\"]\nweird = compute(3)\nmax_size = 6\n",
        );
        assert_eq!(
            value(&s, "pxe_host"),
            PyValue::Env { var: "PXE_HOST".into(), default: Some(Box::new(PyValue::Str("10.10.10.10".into()))) }
        );
        assert!(
            matches!(value(&s, "pxe_password"), PyValue::Env { ref var, default: Some(_) } if var == "PXE_PASSWORD")
        );
        assert_eq!(value(&s, "pxe_autoscaled_node_ip_mask"), PyValue::Str("24".into()));
        assert_eq!(value(&s, "max_size"), PyValue::Int(6));
        assert_eq!(value(&s, "scale"), PyValue::Float(0.5));
        assert_eq!(value(&s, "flag"), PyValue::Bool(true));
        assert_eq!(
            value(&s, "dns"),
            PyValue::Env { var: "DNS".into(), default: Some(Box::new(PyValue::Str("1.1.1.1".into()))) }
        );
        assert_eq!(value(&s, "names"), PyValue::List(vec![PyValue::Str("a".into()), PyValue::Str("b#c".into())]));
        assert_eq!(value(&s, "weird"), PyValue::Unknown("compute(3)".into()));
        let names: Vec<_> = s.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names[..3], ["pxe_host", "pxe_password", "pxe_autoscaled_node_ip_mask"]);
    }
}
