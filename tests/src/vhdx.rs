//! VHDX structures by offset ([MS-VHDX] 2.2), for tests that read fields or damage images on
//! purpose: little-endian field access, the tests' own CRC-32C (independent of the backend's)
//! and re-sealing of the checksummed structures after an edit.
//!
//! Offsets come from the image bytes; like any test helper these index directly and panic on a
//! malformed image, which fails the test that made it.

use uuid::{Uuid, uuid};

/// 1 KiB.
pub const KIB: usize = 1024;
/// 1 MiB.
pub const MIB: usize = 1024 * KIB;
/// The two header copies (2.2.2).
pub const HEADERS: [usize; 2] = [64 * KIB, 128 * KIB];
/// The two region table copies (2.2.3).
pub const REGION_TABLES: [usize; 2] = [192 * KIB, 256 * KIB];
/// Bytes covered by a header's checksum.
pub const HEADER_SIZE: usize = 4 * KIB;
/// Bytes covered by a region table's checksum.
pub const REGION_TABLE_SIZE: usize = 64 * KIB;

/// Header field: SequenceNumber.
pub const H_SEQUENCE: usize = 8;
/// Header field: LogGuid.
pub const H_LOG_GUID: usize = 48;
/// Header field: LogLength.
pub const H_LOG_LENGTH: usize = 68;
/// Header field: LogOffset.
pub const H_LOG_OFFSET: usize = 72;

/// Region: the BAT.
pub const REGION_BAT: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Region: the metadata.
pub const REGION_METADATA: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");

/// CRC-32C (Castagnoli, reflected polynomial 0x82F63B78), table-driven.
const CRC_TABLE: [u32; 256] = {
    let mut table = [0u32; 256];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                (c >> 1) ^ 0x82F6_3B78
            } else {
                c >> 1
            };
            k += 1;
        }
        table[i] = c;
        i += 1;
    }
    table
};

/// CRC-32C of `data`: the tests' own, independent of the backend's.
pub fn crc32c(data: &[u8]) -> u32 {
    let mut c = !0u32;
    for &b in data {
        c = CRC_TABLE[((c ^ u32::from(b)) & 0xFF) as usize] ^ (c >> 8);
    }
    !c
}

/// The little-endian `u16` at `at`.
pub fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes(b[at..at + 2].try_into().expect("two bytes"))
}

/// The little-endian `u32` at `at`.
pub fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("four bytes"))
}

/// The little-endian `u64` at `at`.
pub fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("eight bytes"))
}

/// Writes `v` little-endian at `at`.
pub fn put_u16(b: &mut [u8], at: usize, v: u16) {
    b[at..at + 2].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `at`.
pub fn put_u32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_le_bytes());
}

/// Writes `v` little-endian at `at`.
pub fn put_u64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_le_bytes());
}

/// A file value as `usize`.
pub fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("fits in usize")
}

/// Recomputes the CRC-32C stored at `at + 4` over `len` bytes from `at`, the field taken as zero.
pub fn fix_crc(b: &mut [u8], at: usize, len: usize) {
    b[at + 4..at + 8].fill(0);
    let sum = crc32c(&b[at..at + len]);
    put_u32(b, at + 4, sum);
}

/// The slot (0 or 1) of the header with the higher sequence number.
pub fn current_slot(b: &[u8]) -> usize {
    usize::from(u64_at(b, HEADERS[1] + H_SEQUENCE) > u64_at(b, HEADERS[0] + H_SEQUENCE))
}

/// File offset of the current header (the one with the higher sequence number).
pub fn current_header(b: &[u8]) -> usize {
    HEADERS[current_slot(b)]
}

/// Log offset and length, from the current header.
pub fn log_region(b: &[u8]) -> (usize, usize) {
    let h = current_header(b);
    (
        usize_of(u64_at(b, h + H_LOG_OFFSET)),
        usize_of(u64::from(u32_at(b, h + H_LOG_LENGTH))),
    )
}

/// Whether the current header's LogGuid is set (a log replay is due).
pub fn log_is_dirty(b: &[u8]) -> bool {
    let h = current_header(b);
    b[h + H_LOG_GUID..h + H_LOG_GUID + 16]
        .iter()
        .any(|&x| x != 0)
}

/// Offset inside a region table of the entry for `guid`.
pub fn region_entry(table: &[u8], guid: Uuid) -> usize {
    let n = usize_of(u64::from(u32_at(table, 8)));
    (0..n)
        .map(|i| 16 + 32 * i)
        .find(|&e| table[e..e + 16] == guid.to_bytes_le())
        .unwrap_or_else(|| panic!("region {guid} not in the table"))
}

/// File offset and length of region `guid`, from region table copy 1.
pub fn region(b: &[u8], guid: Uuid) -> (usize, usize) {
    let t = REGION_TABLES[0];
    let e = t + region_entry(&b[t..t + REGION_TABLE_SIZE], guid);
    (
        usize_of(u64_at(b, e + 16)),
        usize_of(u64::from(u32_at(b, e + 24))),
    )
}

/// Applies `f` to the 4 KiB header in `slot` and fixes its checksum.
pub fn patch_header(b: &mut [u8], slot: usize, f: impl FnOnce(&mut [u8])) {
    let at = HEADERS[slot];
    f(&mut b[at..at + HEADER_SIZE]);
    fix_crc(b, at, HEADER_SIZE);
}

/// Applies `f` to both region table copies and fixes their checksums.
pub fn patch_region_tables(b: &mut [u8], f: impl Fn(&mut [u8])) {
    for at in REGION_TABLES {
        f(&mut b[at..at + REGION_TABLE_SIZE]);
        fix_crc(b, at, REGION_TABLE_SIZE);
    }
}

/// Appends a region table entry to both copies.
pub fn add_region(b: &mut [u8], guid: Uuid, offset: u64, length: u32, flags: u32) {
    patch_region_tables(b, |t| {
        let n = u32_at(t, 8);
        let e = 16 + 32 * usize_of(u64::from(n));
        t[e..e + 16].copy_from_slice(&guid.to_bytes_le());
        put_u64(t, e + 16, offset);
        put_u32(t, e + 24, length);
        put_u32(t, e + 28, flags);
        put_u32(t, 8, n + 1);
    });
}

/// File offset of the metadata region.
pub fn metadata_offset(b: &[u8]) -> usize {
    region(b, REGION_METADATA).0
}

/// File offset of the metadata table entry for `guid`.
pub fn meta_entry(b: &[u8], guid: Uuid) -> usize {
    let m = metadata_offset(b);
    let n = usize::from(u16_at(b, m + 10));
    (0..n)
        .map(|i| m + 32 + 32 * i)
        .find(|&e| b[e..e + 16] == guid.to_bytes_le())
        .unwrap_or_else(|| panic!("metadata item {guid} not in the table"))
}

/// File offset of metadata item `guid`'s data.
pub fn meta_item(b: &[u8], guid: Uuid) -> usize {
    metadata_offset(b) + usize_of(u64::from(u32_at(b, meta_entry(b, guid) + 16)))
}

/// Appends a metadata table entry.
pub fn add_meta_entry(b: &mut [u8], guid: Uuid, offset: u32, length: u32, flags: u32) {
    let m = metadata_offset(b);
    let n = u16_at(b, m + 10);
    let e = m + 32 + 32 * usize::from(n);
    b[e..e + 16].copy_from_slice(&guid.to_bytes_le());
    put_u32(b, e + 16, offset);
    put_u32(b, e + 20, length);
    put_u32(b, e + 24, flags);
    put_u32(b, e + 28, 0);
    put_u16(b, m + 10, n + 1);
}

/// File offset of BAT entry `index`.
pub fn bat_entry(b: &[u8], index: usize) -> usize {
    region(b, REGION_BAT).0 + 8 * index
}

/// Sets the FlushedFileOffset of the log entry at the start of the log (the only entry of a
/// one-write dirty image) and re-seals its checksum.
pub fn set_flushed_offset(b: &mut [u8], flushed: u64) {
    let (log, _) = log_region(b);
    assert_eq!(
        u32_at(b, log),
        u32::from_le_bytes(*b"loge"),
        "entry at log start"
    );
    let len = usize_of(u64::from(u32_at(b, log + 8)));
    put_u64(b, log + 48, flushed);
    fix_crc(b, log, len);
}

/// Where a truncation test cuts an image file (images with blocks of 1 MiB or more).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cut {
    /// In the middle of the log.
    Log,
    /// 256 bytes into the BAT.
    Bat,
    /// 32 KiB into the metadata region.
    Metadata,
    /// In the middle of the payload: the last 2.5 MiB of the file are gone.
    Payload,
    /// The last half MiB of the file is gone.
    LastBlock,
}

/// Every [`Cut`].
pub const CUTS: [Cut; 5] = [
    Cut::Log,
    Cut::Bat,
    Cut::Metadata,
    Cut::Payload,
    Cut::LastBlock,
];

/// Where `cut` cuts the image `b`.
pub fn cut_at(b: &[u8], cut: Cut) -> usize {
    match cut {
        Cut::Log => {
            let (off, len) = log_region(b);
            off + len / 2
        }
        Cut::Bat => region(b, REGION_BAT).0 + 256,
        Cut::Metadata => region(b, REGION_METADATA).0 + 32 * KIB,
        Cut::Payload => b.len() - 5 * MIB / 2,
        Cut::LastBlock => b.len() - MIB / 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_matches_the_published_check_value_and_the_bitwise_form() {
        // RFC 3720 B.4 check value.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let bitwise = |data: &[u8]| {
            let mut c = !0u32;
            for &b in data {
                c ^= u32::from(b);
                for _ in 0..8 {
                    c = if c & 1 != 0 {
                        (c >> 1) ^ 0x82F6_3B78
                    } else {
                        c >> 1
                    };
                }
            }
            !c
        };
        let data: Vec<u8> = (0..=255u8).cycle().take(4099).collect();
        assert_eq!(crc32c(&data), bitwise(&data));
    }

    #[test]
    fn fix_crc_seals_what_crc32c_checks() {
        let mut b: Vec<u8> = (0..64u8).collect();
        fix_crc(&mut b, 8, 32);
        let stored = u32_at(&b, 12);
        let mut zeroed = b[8..40].to_vec();
        zeroed[4..8].fill(0);
        assert_eq!(stored, crc32c(&zeroed));
    }
}
