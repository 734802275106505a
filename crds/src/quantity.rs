//! Kubernetes resource quantities as byte counts.
//!
//! Only what storage sizes use: plain integers, decimal (k, M, G, T, P, E) and binary
//! (Ki … Ei) suffixes, and decimal fractions (`1.5Gi`). Results round up to whole bytes.

use thiserror::Error;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum QuantityError {
    #[error("quantity is empty")]
    Empty,
    #[error("quantity {0:?} is not a number with an optional suffix (e.g. 10Gi, 500M)")]
    Malformed(String),
    #[error("quantity {0:?} has unsupported suffix {1:?}")]
    UnknownSuffix(String, String),
    #[error("quantity {0:?} is negative")]
    Negative(String),
    #[error("quantity {0:?} does not fit in 64 bits")]
    Overflow(String),
}

/// Parses a quantity into bytes, rounding fractions up.
pub fn parse_quantity(text: &str) -> Result<u64, QuantityError> {
    let s = text.trim();
    if s.is_empty() {
        return Err(QuantityError::Empty);
    }
    if s.starts_with('-') {
        return Err(QuantityError::Negative(text.to_string()));
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(split);
    if number.is_empty() || number.matches('.').count() > 1 || number == "." {
        return Err(QuantityError::Malformed(text.to_string()));
    }
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "P" => 1_000_000_000_000_000,
        "E" => 1_000_000_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        "Pi" => 1 << 50,
        "Ei" => 1 << 60,
        other if other.starts_with(['e', 'E']) => {
            let exp: u32 = other[1..]
                .parse()
                .map_err(|_| QuantityError::Malformed(text.to_string()))?;
            10u128
                .checked_pow(exp)
                .ok_or_else(|| QuantityError::Overflow(text.to_string()))?
        }
        other => {
            return Err(QuantityError::UnknownSuffix(
                text.to_string(),
                other.to_string(),
            ))
        }
    };
    let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
    let overflow = || QuantityError::Overflow(text.to_string());
    let whole: u128 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| overflow())?
    };
    let mut bytes = whole.checked_mul(multiplier).ok_or_else(overflow)?;
    if !frac.is_empty() {
        let digits = frac.len().min(30) as u32;
        let frac_value: u128 = frac[..digits as usize].parse().map_err(|_| overflow())?;
        let scale = 10u128.pow(digits);
        let numerator = frac_value.checked_mul(multiplier).ok_or_else(overflow)?;
        bytes = bytes
            .checked_add(numerator.div_ceil(scale))
            .ok_or_else(overflow)?;
    }
    u64::try_from(bytes).map_err(|_| overflow())
}

/// Formats a byte count as the shortest exact binary quantity (`10Gi`, `1536Mi`, `12345`).
pub fn format_bytes_quantity(bytes: u64) -> String {
    const UNITS: [(&str, u32); 6] = [
        ("Ei", 60),
        ("Pi", 50),
        ("Ti", 40),
        ("Gi", 30),
        ("Mi", 20),
        ("Ki", 10),
    ];
    if bytes == 0 {
        return "0".to_string();
    }
    for (suffix, shift) in UNITS {
        if bytes.trailing_zeros() >= shift {
            return format!("{}{suffix}", bytes >> shift);
        }
    }
    bytes.to_string()
}

/// Bytes for people: `2.0 GiB`, `512.0 MiB`, `12 B` (binary units, one decimal).
pub fn format_bytes_human(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64 / 1024.0;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    format!("{value:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_binary_and_decimal_suffixes() {
        assert_eq!(parse_quantity("10Gi"), Ok(10 << 30));
        assert_eq!(parse_quantity("1Mi"), Ok(1 << 20));
        assert_eq!(parse_quantity("500M"), Ok(500_000_000));
        assert_eq!(parse_quantity("1.5Gi"), Ok(3 << 29));
        assert_eq!(parse_quantity("1e3"), Ok(1000));
        assert_eq!(parse_quantity("12345"), Ok(12345));
        assert_eq!(parse_quantity("0.1"), Ok(1));
    }

    #[test]
    fn rejects_garbage() {
        assert_eq!(parse_quantity(""), Err(QuantityError::Empty));
        assert!(matches!(
            parse_quantity("-1Gi"),
            Err(QuantityError::Negative(_))
        ));
        assert!(matches!(
            parse_quantity("10Qi"),
            Err(QuantityError::UnknownSuffix(..))
        ));
        assert!(matches!(
            parse_quantity("abc"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity("1.2.3"),
            Err(QuantityError::Malformed(_))
        ));
        assert!(matches!(
            parse_quantity("99999Ei"),
            Err(QuantityError::Overflow(_))
        ));
    }

    #[test]
    fn formats_round_trip() {
        for bytes in [0, 1, 1023, 1024, 10 << 30, (1 << 30) + (1 << 20), 12345] {
            assert_eq!(parse_quantity(&format_bytes_quantity(bytes)), Ok(bytes));
        }
        assert_eq!(format_bytes_quantity(10 << 30), "10Gi");
        assert_eq!(format_bytes_quantity(1536 << 20), "1536Mi");
    }

    #[test]
    fn human_sizes() {
        assert_eq!(super::format_bytes_human(0), "0 B");
        assert_eq!(super::format_bytes_human(1023), "1023 B");
        assert_eq!(super::format_bytes_human(1536), "1.5 KiB");
        assert_eq!(super::format_bytes_human(2 << 30), "2.0 GiB");
        assert_eq!(super::format_bytes_human(600 << 20), "600.0 MiB");
        assert_eq!(super::format_bytes_human(u64::MAX), "16.0 EiB");
    }
}
