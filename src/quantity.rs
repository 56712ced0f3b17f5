//! Kubernetes resource quantities: just enough to read `"2"`, `"1500m"`, `"4Gi"`, `"20G"` from
//! configuration and clouds, and to write canonical text back into template nodes.

/// Parses a quantity into thousandths of a unit (millicores for CPU, millibytes for memory).
///
/// Accepts a decimal number with an optional SI (`m`, `k`, `M`, `G`, `T`, `P`, `E`) or binary
/// (`Ki` … `Ei`) suffix. Returns `None` for anything else, for negatives and on overflow.
pub fn parse_milli(text: &str) -> Option<u128> {
    let text = text.trim();
    let split = text.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(text.len());
    let (number, suffix) = text.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 {
        return None;
    }
    // Multiplier in thousandths of a unit.
    let multiplier: u128 = match suffix {
        "" => 1_000,
        "m" => 1,
        "k" => 1_000_000,
        "M" => 1_000_000_000,
        "G" => 1_000_000_000_000,
        "T" => 1_000_000_000_000_000,
        "P" => 1_000_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000_000,
        "Ki" => 1_000 << 10,
        "Mi" => 1_000 << 20,
        "Gi" => 1_000 << 30,
        "Ti" => 1_000 << 40,
        "Pi" => 1_000 << 50,
        "Ei" => 1_000 << 60,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if whole.is_empty() && fraction.is_empty() {
        return None;
    }
    let whole: u128 = if whole.is_empty() { 0 } else { whole.parse().ok()? };
    let mut value = whole.checked_mul(multiplier)?;
    // Fractional digits: each one is worth a tenth of the previous. Anything finer than one
    // thousandth of a unit is dropped, as Kubernetes rounds it up anyway.
    let mut scale = multiplier;
    for digit in fraction.chars() {
        scale /= 10;
        if scale == 0 {
            break;
        }
        value = value.checked_add(u128::from(digit.to_digit(10)?) * scale)?;
    }
    Some(value)
}

/// Parses a CPU quantity into millicores.
pub fn parse_cpu_millis(text: &str) -> Option<u64> {
    parse_milli(text).and_then(|v| u64::try_from(v).ok())
}

/// Parses a byte quantity (memory, storage) into bytes, rounding thousandths up.
pub fn parse_bytes(text: &str) -> Option<u64> {
    parse_milli(text).and_then(|v| u64::try_from(v.div_ceil(1_000)).ok())
}

/// Canonical text for millicores: `"2"` or `"1500m"`.
pub fn format_cpu_millis(millis: u64) -> String {
    if millis.is_multiple_of(1_000) { (millis / 1_000).to_string() } else { format!("{millis}m") }
}

/// Canonical text for bytes, in the largest binary unit that divides it exactly.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [(&str, u32); 5] = [("Pi", 50), ("Ti", 40), ("Gi", 30), ("Mi", 20), ("Ki", 10)];
    if bytes == 0 {
        return "0".to_owned();
    }
    for (suffix, shift) in UNITS {
        if bytes.is_multiple_of(1u64 << shift) {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_forms_kubernetes_users_write() {
        assert_eq!(parse_cpu_millis("2"), Some(2_000));
        assert_eq!(parse_cpu_millis("1500m"), Some(1_500));
        assert_eq!(parse_cpu_millis("0.5"), Some(500));
        assert_eq!(parse_cpu_millis(".25"), Some(250));
        assert_eq!(parse_bytes("4Gi"), Some(4 << 30));
        assert_eq!(parse_bytes("20G"), Some(20_000_000_000));
        assert_eq!(parse_bytes("1.5Gi"), Some(3 << 29));
        assert_eq!(parse_bytes("512Mi"), Some(512 << 20));
        assert_eq!(parse_bytes("1000"), Some(1000));
    }

    #[test]
    fn rejects_what_kubernetes_would_reject() {
        for bad in ["", "-1", "abc", "1.2.3", "4GB", "Gi", ".", "1e3"] {
            assert_eq!(parse_milli(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn formats_canonically() {
        assert_eq!(format_cpu_millis(2_000), "2");
        assert_eq!(format_cpu_millis(1_500), "1500m");
        assert_eq!(format_bytes(4 << 30), "4Gi");
        assert_eq!(format_bytes(3 << 29), "1536Mi");
        assert_eq!(format_bytes(1000), "1000");
        assert_eq!(format_bytes(0), "0");
    }
}
