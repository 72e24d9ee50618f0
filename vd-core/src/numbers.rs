//! Numbers as qemu accepts them: sizes, offsets and lengths in decimal or `0x` hex, with an
//! optional binary suffix and decimals, and byte patterns.
//!
//! The rules follow qemu's `qemu_strtosz` (what `qemu-img create`, `qemu-io` and `-o` options
//! read), with two differences that only ever refuse:
//!
//! - qemu truncates a fraction that is not a whole number of bytes (`1.0001K` is 1024); vd
//!   refuses it, so a typo never silently becomes another size;
//! - qemu skips leading spaces; vd takes the word as given.
//!
//! Accepted: `4096`, `0x8100000`, `4K`, `4k`, `1.5G`, `.5M`, `1.K`, `512B`; suffixes `B` (bytes)
//! and `K`, `M`, `G`, `T`, `P`, `E` (1024-based), in either case. Refused, as by qemu: hex with a
//! suffix or a fraction (`0x20M`, `0x1.8`), `KB` and `KiB`, exponents (`1e3`), signs, and
//! anything above 2^64 - 1 (`16E`).

/// The accepted syntax, as error messages show it.
pub const SIZE_SYNTAX: &str = "use a number of bytes, in decimal or 0x hex, optionally with a K, \
     M, G, T, P or E suffix (1024-based) and decimals (1.5G)";

/// The accepted syntax of a byte pattern, as error messages show it.
pub const BYTE_SYNTAX: &str = "use a byte, 0 to 255 in decimal or 0x00 to 0xff in hex";

/// Why a word is not a number.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum NumberError {
    /// Not in the accepted syntax.
    #[error("{0:?} is not a size: {SIZE_SYNTAX}")]
    Syntax(String),
    /// The size has a fraction of a byte.
    #[error("{0:?} is not a whole number of bytes: {SIZE_SYNTAX}")]
    Fraction(String),
    /// The size is 2^64 bytes or more.
    #[error("{0:?} is too large: at most 18446744073709551615 bytes (16E - 1)")]
    Overflow(String),
    /// Not a byte pattern.
    #[error("{0:?} is not a byte: {BYTE_SYNTAX}")]
    Byte(String),
}

/// The power of 1024 a suffix stands for (`B`: 0).
fn suffix_shift(c: u8) -> Option<u32> {
    Some(match c.to_ascii_uppercase() {
        b'B' => 0,
        b'K' => 10,
        b'M' => 20,
        b'G' => 30,
        b'T' => 40,
        b'P' => 50,
        b'E' => 60,
        _ => return None,
    })
}

/// Parses a size, offset or length: decimal or `0x` hex bytes, or decimal with a suffix and
/// decimals (see the module docs).
///
/// # Errors
/// [`NumberError::Syntax`], [`NumberError::Fraction`] or [`NumberError::Overflow`]; each
/// message shows the accepted syntax.
pub fn parse_size(s: &str) -> Result<u64, NumberError> {
    let syntax = || NumberError::Syntax(s.to_string());
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(syntax());
        }
        return u64::from_str_radix(hex, 16).map_err(|_| NumberError::Overflow(s.to_string()));
    }
    let bytes = s.as_bytes();
    let (number, shift) = match bytes.split_last() {
        Some((&last, rest)) if !last.is_ascii_digit() && last != b'.' => {
            (rest, suffix_shift(last).ok_or_else(syntax)?)
        }
        _ => (bytes, 0),
    };
    let (int, frac) = match number.iter().position(|&b| b == b'.') {
        Some(dot) => (
            number.get(..dot).unwrap_or_default(),
            number.get(dot.saturating_add(1)..).unwrap_or_default(),
        ),
        None => (number, &[][..]),
    };
    let all_digits = |d: &[u8]| d.iter().all(u8::is_ascii_digit);
    // A dot needs digits on one side at least (`1.K` and `.5G` are qemu's too).
    if (int.is_empty() && frac.is_empty()) || !all_digits(int) || !all_digits(frac) {
        return Err(syntax());
    }
    let overflow = || NumberError::Overflow(s.to_string());
    let mut value = 0u64;
    for &d in int {
        value = value
            .checked_mul(10)
            .and_then(|v| v.checked_add(u64::from(d.wrapping_sub(b'0'))))
            .ok_or_else(overflow)?;
    }
    value = value.checked_mul(1u64 << shift).ok_or_else(overflow)?;
    // The fraction times 2^shift, exactly: double its decimal digits `shift` times; the digits
    // that come out to the left of the point are bytes, and any non-zero digit still to the
    // right is a fraction of a byte.
    let frac = frac
        .iter()
        .rposition(|&d| d != b'0')
        .map_or(&[][..], |last| frac.get(..=last).unwrap_or_default());
    if !frac.is_empty() {
        let mut digits: Vec<u8> = frac.iter().map(|d| d.wrapping_sub(b'0')).collect();
        let mut whole = 0u64;
        for _ in 0..shift {
            let mut carry = 0u8;
            for d in digits.iter_mut().rev() {
                // At most 9 * 2 + 1.
                let twice = d.wrapping_mul(2).wrapping_add(carry);
                *d = twice % 10;
                carry = twice / 10;
            }
            whole = whole
                .checked_mul(2)
                .and_then(|w| w.checked_add(u64::from(carry)))
                .ok_or_else(overflow)?;
        }
        if digits.iter().any(|&d| d != 0) {
            return Err(NumberError::Fraction(s.to_string()));
        }
        value = value.checked_add(whole).ok_or_else(overflow)?;
    }
    Ok(value)
}

/// Parses a byte pattern: `0` to `255`, or `0x00` to `0xff`.
///
/// # Errors
/// [`NumberError::Byte`], whose message shows the accepted syntax.
pub fn parse_byte(s: &str) -> Result<u8, NumberError> {
    let parsed = match s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        Some(hex) if !hex.starts_with('+') => u8::from_str_radix(hex, 16).ok(),
        Some(_) => None,
        None if !s.starts_with('+') => s.parse::<u8>().ok(),
        None => None,
    };
    parsed.ok_or_else(|| NumberError::Byte(s.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_in_decimal_hex_suffixes_and_decimals() {
        for (text, want) in [
            ("0", 0),
            ("512", 512),
            ("4096", 4096),
            ("0x8100000", 0x810_0000),
            ("0X10", 16),
            ("0xffffffffffffffff", u64::MAX),
            ("4k", 4096),
            ("4K", 4096),
            ("1M", 1 << 20),
            ("2g", 2 << 30),
            ("1T", 1 << 40),
            ("1P", 1 << 50),
            ("1E", 1 << 60),
            ("15E", 15 << 60),
            ("512B", 512),
            ("512b", 512),
            ("1.5G", 1_610_612_736),
            ("1.5M", 1_572_864),
            ("1.5E", 1_729_382_256_910_270_464),
            ("1.K", 1024),
            (".5G", 512 << 20),
            ("0.5k", 512),
            ("1.000K", 1024),
            ("08", 8),
            ("010", 10),
            ("0G", 0),
            ("16777215T", 16_777_215 << 40),
            ("18446744073709551615", u64::MAX),
            // 2^-60 E is one byte.
            (
                "0.000000000000000000867361737988403547205962240695953369140625E",
                1,
            ),
        ] {
            assert_eq!(parse_size(text), Ok(want), "{text}");
        }
    }

    #[test]
    fn sizes_out_of_syntax_are_refused_with_the_syntax() {
        for bad in [
            "", "K", ".", ".K", "x", "1.5Q", "1KB", "1KiB", "1 K", " 1", "1 ", "-1", "+1", "0x",
            "0x20M", "0x1.8", "0xg", "1e3", "1.2.3", "1,5G", "0b101",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(matches!(e, NumberError::Syntax(_)), "{bad:?}: {e:?}");
            assert!(e.to_string().contains(SIZE_SYNTAX), "{e}");
        }
        assert_eq!(
            parse_size("1.5Q").unwrap_err().to_string(),
            "\"1.5Q\" is not a size: use a number of bytes, in decimal or 0x hex, optionally \
             with a K, M, G, T, P or E suffix (1024-based) and decimals (1.5G)"
        );
    }

    #[test]
    fn fractions_of_a_byte_and_overflows_are_refused() {
        for bad in ["1.5", "1.5B", "1.0001K", "0.1K", "0.3M"] {
            assert_eq!(
                parse_size(bad),
                Err(NumberError::Fraction(bad.to_string())),
                "{bad}"
            );
        }
        for bad in [
            "16E",
            "16777216T",
            "18446744073709551616",
            "0x10000000000000000",
            "15.9999999999999999999E",
            "99999999999999999999K",
        ] {
            let e = parse_size(bad).expect_err(bad);
            assert!(
                matches!(e, NumberError::Overflow(_) | NumberError::Fraction(_)),
                "{bad}: {e:?}"
            );
        }
        assert_eq!(parse_size("16E"), Err(NumberError::Overflow("16E".into())));
        // Near the top: 15.75E is 63 * 2^58; 0xffffffffffffffff and 15E + 1023P + ... fit.
        assert_eq!(parse_size("15.75E"), Ok(63 << 58));
    }

    #[test]
    fn bytes_are_decimal_or_hex() {
        for (text, byte) in [
            ("0", 0),
            ("165", 0xa5),
            ("0xa5", 0xa5),
            ("0X5A", 0x5a),
            ("0xff", 255),
            ("255", 255),
        ] {
            assert_eq!(parse_byte(text), Ok(byte), "{text}");
        }
        for bad in [
            "256", "0x100", "-1", "+1", "0x+1", "0x", "a5", "", " 1", "1K",
        ] {
            let e = parse_byte(bad).expect_err(bad);
            assert!(e.to_string().contains(BYTE_SYNTAX), "{e}");
        }
    }
}
