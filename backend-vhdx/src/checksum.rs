//! CRC-32C (Castagnoli) as [MS-VHDX] uses it: computed over a structure with its 4-byte checksum
//! field taken as zero, without modifying the buffer.

/// CRC-32C of `buf` with the four bytes at `field` treated as zero. A `field` that does not fit
/// in `buf` is ignored (the caller validates sizes).
pub fn crc32c_with_zero_field(buf: &[u8], field: usize) -> u32 {
    let (Some(prefix), Some(suffix)) = (buf.get(..field), buf.get(field + 4..)) else {
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
}
