//! Text a caller sent (group ids, provider ids, node names), made safe for a log line or an
//! error message: quoted, every control character escaped (so a newline cannot forge a log
//! line), and cut to a bound (so a 4 MiB id does not come back in every answer).

use std::fmt::Write;

/// The most characters of one caller text that are kept.
pub const MAX_CHARS: usize = 128;

/// `text` as a quoted, escaped string literal of at most [`MAX_CHARS`] characters, with a note
/// of how much was cut.
pub fn quote(text: &str) -> String {
    let mut out = String::with_capacity(text.len().min(MAX_CHARS) + 2);
    out.push('"');
    let mut chars = text.chars();
    for c in chars.by_ref().take(MAX_CHARS) {
        out.extend(c.escape_debug());
    }
    out.push('"');
    let rest = chars.count();
    if rest > 0 {
        let _ = write!(out, " (and {rest} more characters)");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn control_characters_are_escaped_and_long_text_is_cut() {
        assert_eq!(quote("k3s://a"), "\"k3s://a\"");
        assert_eq!(quote("a\nINFO forged line\r\u{1b}[31m"), "\"a\\nINFO forged line\\r\\u{1b}[31m\"");
        let long = "x".repeat(10_000);
        let q = quote(&long);
        assert!(q.len() < MAX_CHARS + 50, "{q}");
        assert!(q.ends_with(&format!("(and {} more characters)", 10_000 - MAX_CHARS)));
        assert!(!quote("é\u{0}").contains('\0'));
    }
}
