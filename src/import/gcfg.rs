//! A reader for gcfg, the INI dialect of Go's `gopkg.in/gcfg.v1` (v1.2.3), which the
//! cluster-autoscaler's Kamatera and Slicer providers parse their cloud-config with. It keeps
//! every assignment in file order, so the importer can apply the providers' own rules
//! (last value wins, multi-valued keys append, a blank multi-valued key resets the list).
//!
//! Hand-written because generic INI crates read a different language: gcfg names are
//! case-insensitive and only letters, digits and `-` (an `_` is a syntax error, not a
//! synonym); `[section "sub"]` subsections are case-sensitive quoted strings; `;` and `#` start
//! a comment anywhere outside quotes, also in the middle of a value; quotes may cover part of a
//! value (`name=wan,ip="auto"`) and are removed; `\"`, `\\` and `\n` are the only escapes (and
//! `\t` in values); a `\` before a line end continues the value; a name without `=` is a
//! boolean `true`, and repeating a key is not an error. The rules below follow gcfg's scanner
//! (`scanner/scanner.go`) and reader (`read.go`, `set.go`).

use std::fmt;

/// One `name [= value]` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Var {
    /// Lower case (gcfg matches names case-insensitively).
    pub name: String,
    /// As written, for messages.
    pub raw_name: String,
    /// `None` for a name without `=` (gcfg's "blank" value).
    pub value: Option<String>,
    /// 1-based.
    pub line: usize,
    /// True when a `;` or `#` comment starts right after the value with no space before it:
    /// the value was likely cut short (`password = abc#123` reads as `abc`).
    pub cut_by_comment: bool,
}

/// One section header and the variables under it (repeated headers are merged, as gcfg does).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Section {
    /// Lower case.
    pub name: String,
    /// The subsection (`[nodegroup "ng1"]` -> `ng1`), case-sensitive.
    pub sub: Option<String>,
    pub line: usize,
    pub vars: Vec<Var>,
}

/// A syntax error, with gcfg's wording where it has one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SyntaxError {
    pub line: usize,
    pub message: String,
}

impl fmt::Display for SyntaxError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "line {}: {}", self.line, self.message)
    }
}

fn is_letter(c: char) -> bool {
    c.is_ascii_alphabetic() || (!c.is_ascii() && c.is_alphabetic())
}

fn is_ident_char(c: char) -> bool {
    is_letter(c) || c.is_ascii_digit() || (!c.is_ascii() && c.is_numeric()) || c == '-'
}

fn is_space(c: char) -> bool {
    c == ' ' || c == '\t' || c == '\r'
}

struct Scanner {
    chars: Vec<char>,
    pos: usize,
    line: usize,
}

impl Scanner {
    fn peek(&self) -> Option<char> {
        self.chars.get(self.pos).copied()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += 1;
        if c == '\n' {
            self.line += 1;
        }
        Some(c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(is_space) {
            self.pos += 1;
        }
    }

    fn err<T>(&self, message: impl Into<String>) -> Result<T, SyntaxError> {
        Err(SyntaxError { line: self.line, message: message.into() })
    }

    /// After a header or a value: only a comment or the line end may follow.
    fn end_of_line(&mut self) -> Result<(), SyntaxError> {
        self.skip_space();
        match self.peek() {
            None => Ok(()),
            Some('\n') => {
                self.bump();
                Ok(())
            }
            Some(';' | '#') => {
                self.skip_comment();
                Ok(())
            }
            Some(_) => self.err("expected EOL, EOF, or comment"),
        }
    }

    fn skip_comment(&mut self) {
        while self.peek().is_some_and(|c| c != '\n') {
            self.pos += 1;
        }
        if self.peek() == Some('\n') {
            self.bump();
        }
    }

    fn ident(&mut self) -> String {
        let start = self.pos;
        while self.peek().is_some_and(is_ident_char) {
            self.pos += 1;
        }
        self.chars[start..self.pos].iter().collect()
    }

    /// A quoted subsection name; escapes `\"`, `\\`, `\n` (gcfg's scanner rejects others).
    fn quoted(&mut self) -> Result<String, SyntaxError> {
        self.bump(); // opening quote
        let mut out = String::new();
        loop {
            match self.bump() {
                None | Some('\n') => return self.err("string not terminated"),
                Some('"') => return Ok(out),
                Some('\\') => match self.bump() {
                    Some('n') => out.push('\n'),
                    Some(c @ ('\\' | '"')) => out.push(c),
                    _ => return self.err("unknown escape sequence"),
                },
                Some(c) => out.push(c),
            }
        }
    }

    /// A value after `=`: to the end of the line or an unquoted `;`/`#`, trailing space trimmed,
    /// quotes removed, escapes and line continuations applied.
    fn value(&mut self) -> Result<(String, bool), SyntaxError> {
        self.skip_space();
        let mut out = String::new();
        // Length of `out` up to its last character that is not trailing space.
        let mut keep = 0;
        let mut in_quote = false;
        loop {
            let Some(c) = self.peek() else {
                if in_quote {
                    return self.err("string not terminated");
                }
                break;
            };
            if in_quote && c == '\n' {
                return self.err("string not terminated");
            }
            if !in_quote && (c == '\n' || c == ';' || c == '#') {
                let glued = (c == ';' || c == '#') && keep > 0 && keep == out.len();
                out.truncate(keep);
                return Ok((out, glued));
            }
            self.bump();
            match c {
                '"' => {
                    in_quote = !in_quote;
                    keep = out.len();
                }
                '\\' if in_quote => match self.bump() {
                    Some('n') => out.push('\n'),
                    Some('t') => out.push('\t'),
                    Some(e @ ('\\' | '"')) => out.push(e),
                    _ => return self.err("unknown escape sequence"),
                },
                '\\' => {
                    if self.peek() == Some('\r') {
                        self.bump();
                    }
                    if self.peek() != Some('\n') {
                        return self.err("unquoted '\\' must be followed by new line");
                    }
                    self.bump();
                }
                '\r' => {}
                c => {
                    out.push(c);
                    if in_quote || !is_space(c) {
                        keep = out.len();
                    }
                }
            }
            if in_quote {
                keep = out.len();
            }
        }
        out.truncate(keep);
        Ok((out, false))
    }
}

/// Reads a whole file. The first syntax error ends the read (gcfg stops there too).
pub fn parse(text: &str) -> Result<Vec<Section>, SyntaxError> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut s = Scanner { chars: text.chars().collect(), pos: 0, line: 1 };
    let mut sections: Vec<Section> = Vec::new();
    let mut current: Option<usize> = None;
    loop {
        s.skip_space();
        let Some(c) = s.peek() else { break };
        match c {
            '\n' => {
                s.bump();
            }
            ';' | '#' => s.skip_comment(),
            '[' => {
                let header_line = s.line;
                s.bump();
                s.skip_space();
                if !s.peek().is_some_and(is_letter) {
                    return s.err("expected section name");
                }
                let name = s.ident().to_lowercase();
                s.skip_space();
                let sub = if s.peek() == Some('"') {
                    let sub = s.quoted()?;
                    if sub.is_empty() {
                        return s.err("empty subsection name");
                    }
                    s.skip_space();
                    Some(sub)
                } else {
                    None
                };
                if s.peek() != Some(']') {
                    return match s.peek() {
                        Some(c) if !is_ident_char(c) && c != '"' && !is_space(c) && c != '\n' => {
                            s.err(format!("illegal character {c:?} in a section header"))
                        }
                        _ => s.err("expected right bracket"),
                    };
                }
                s.bump();
                s.end_of_line()?;
                current = Some(match sections.iter().position(|x| x.name == name && x.sub == sub) {
                    Some(i) => i,
                    None => {
                        sections.push(Section { name, sub, line: header_line, vars: Vec::new() });
                        sections.len() - 1
                    }
                });
            }
            c if is_letter(c) => {
                let line = s.line;
                let raw_name = s.ident();
                let Some(idx) = current else {
                    return s.err("expected section header");
                };
                s.skip_space();
                let (value, cut) = match s.peek() {
                    None | Some('\n') => (None, false),
                    Some(';' | '#') => (None, false),
                    Some('=') => {
                        s.bump();
                        let (v, cut) = s.value()?;
                        (Some(v), cut)
                    }
                    Some(c) => {
                        return s
                            .err(format!("illegal character {c:?} (names are letters, digits and '-'), expected '='"));
                    }
                };
                s.end_of_line()?;
                sections[idx].vars.push(Var {
                    name: raw_name.to_lowercase(),
                    raw_name,
                    value,
                    line,
                    cut_by_comment: cut,
                });
            }
            c => return s.err(format!("illegal character {c:?}: expected a section header or a variable")),
        }
    }
    Ok(sections)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(text: &str) -> Vec<(Option<String>, String, Option<String>)> {
        parse(text)
            .unwrap()
            .into_iter()
            .flat_map(|s| s.vars.into_iter().map(move |v| (s.sub.clone(), v.name, v.value)))
            .collect()
    }

    #[test]
    fn names_are_case_insensitive_and_subsections_are_not() {
        let sections = parse("[Global]\nCluster-Name = a\n[NodeGroup \"NG1\"]\n[nodegroup \"ng1\"]\n").unwrap();
        assert_eq!(sections.len(), 3);
        assert_eq!(sections[0].name, "global");
        assert_eq!(sections[0].vars[0].name, "cluster-name");
        assert_eq!(sections[1].sub.as_deref(), Some("NG1"));
        assert_eq!(sections[2].sub.as_deref(), Some("ng1"));
    }

    #[test]
    fn values_lose_quotes_comments_and_trailing_space_and_keep_inner_space() {
        let v = vars(
            "[g]\na = \"size=100\"\nb=name=wan,ip=\"auto\" ; comment\nc = two  words   # note\n\
             d = \"keep ; this\"  \ne = x\\\n  y\nf\ng = \"tab\\there\\n\"\nh =\n",
        );
        let get = |k: &str| v.iter().find(|(_, n, _)| n == k).unwrap().2.clone();
        assert_eq!(get("a").as_deref(), Some("size=100"));
        assert_eq!(get("b").as_deref(), Some("name=wan,ip=auto"));
        assert_eq!(get("c").as_deref(), Some("two  words"));
        assert_eq!(get("d").as_deref(), Some("keep ; this"));
        assert_eq!(get("e").as_deref(), Some("x  y"));
        assert_eq!(get("f"), None);
        assert_eq!(get("g").as_deref(), Some("tab\there\n"));
        assert_eq!(get("h").as_deref(), Some(""));
    }

    #[test]
    fn repeated_keys_and_sections_are_kept_in_order() {
        let v = vars("[g]\ndisk = size=100\n[n \"x\"]\ndisk=a\n[g]\ndisk = size=200\n");
        let g: Vec<_> = v.iter().filter(|(s, _, _)| s.is_none()).map(|(_, _, v)| v.clone().unwrap()).collect();
        assert_eq!(g, ["size=100", "size=200"]);
    }

    #[test]
    fn a_comment_glued_to_a_value_is_flagged() {
        let s = parse("[g]\npassword = abc#123\nssh-key = ssh-rsa AAA user@host # mine\n").unwrap();
        assert_eq!(s[0].vars[0].value.as_deref(), Some("abc"));
        assert!(s[0].vars[0].cut_by_comment);
        assert!(!s[0].vars[1].cut_by_comment);
    }

    #[test]
    fn what_gcfg_rejects_is_a_syntax_error_with_its_line() {
        for (text, line, msg) in [
            ("a = 1\n", 1, "expected section header"),
            ("[g]\ndefault_cpu = 2A\n", 2, "illegal character '_'"),
            ("[g]\n\n[n \"\"]\n", 3, "empty subsection name"),
            ("[g]\nx = \"open\n", 2, "string not terminated"),
            ("[g]\nx = a\\b\n", 2, "unquoted '\\' must be followed by new line"),
            ("[g \"x\" y]\n", 1, "expected right bracket"),
        ] {
            let e = parse(text).unwrap_err();
            assert_eq!(e.line, line, "{text:?}: {e}");
            assert!(e.message.contains(msg), "{text:?}: {e}");
        }
    }
}
