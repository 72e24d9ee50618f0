//! CRC-32C (Castagnoli) as [MS-VHDX] uses it: computed over a structure with its 4-byte checksum
//! field taken as zero, without modifying the buffer.

/// CRC-32C of `buf` with the four bytes at `field` treated as zero. A `field` that does not fit
/// in `buf` is ignored (the caller validates sizes).
pub fn crc32c_with_zero_field(buf: &[u8], field: usize) -> u32 {
    let (Some(prefix), Some(suffix)) = (buf.get(..field), buf.get(field.saturating_add(4)..))
    else {
        return crc32c::crc32c(buf);
    };
    let crc = crc32c::crc32c(prefix);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    crc32c::crc32c_append(crc, suffix)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_field_at_the_end_of_the_address_space_is_ignored_without_overflow() {
        let buf = [1u8, 2, 3, 4, 5, 6, 7, 8];
        for field in [usize::MAX - 3, usize::MAX - 2, usize::MAX, 5] {
            assert_eq!(crc32c_with_zero_field(&buf, field), crc32c::crc32c(&buf));
        }
    }

    #[test]
    fn check_value() {
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
    }

    #[test]
    fn zero_field_equals_zeroing_the_copy() {
        let mut buf: Vec<u8> = (0..=255u8).cycle().take(4096).collect();
        let got = crc32c_with_zero_field(&buf, 4);
        buf[4..8].fill(0);
        assert_eq!(got, crc32c::crc32c(&buf));
    }

    #[test]
    fn every_field_position_matches_a_zeroed_copy_and_leaves_the_buffer_alone() {
        let buf: Vec<u8> = (0..64u8).map(|i| i.wrapping_mul(37) ^ 0x5C).collect();
        for field in 0..=buf.len() - 4 {
            let before = buf.clone();
            let got = crc32c_with_zero_field(&buf, field);
            assert_eq!(buf, before, "the buffer is not modified");
            let mut zeroed = buf.clone();
            zeroed[field..field + 4].fill(0);
            assert_eq!(got, crc32c::crc32c(&zeroed), "field at {field}");
        }
    }

    #[test]
    fn the_stored_checksum_does_not_change_the_result() {
        let mut buf = vec![0xA7u8; 512];
        let sum = crc32c_with_zero_field(&buf, 4);
        buf[4..8].copy_from_slice(&sum.to_le_bytes());
        assert_eq!(crc32c_with_zero_field(&buf, 4), sum);
        buf[100] ^= 1;
        assert_ne!(
            crc32c_with_zero_field(&buf, 4),
            sum,
            "a flipped bit changes it"
        );
    }

    #[test]
    fn a_field_that_does_not_fit_is_ignored() {
        let buf = b"123456789";
        for field in [6, 9, 100] {
            assert_eq!(
                crc32c_with_zero_field(buf, field),
                0xE306_9283,
                "field {field}"
            );
        }
        assert_eq!(crc32c_with_zero_field(&[], 0), 0);
    }
}
