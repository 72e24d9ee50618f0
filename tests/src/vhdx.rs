//! VHDX structures by offset ([MS-VHDX] 2.2), for tests that read fields or damage images on
//! purpose: little-endian field access, the tests' own CRC-32C (independent of the backend's)
//! and re-sealing of the checksummed structures after an edit.
//!
//! Offsets come from the image bytes; like any test helper these index directly and panic on a
//! malformed image, which fails the test that made it.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use uuid::{Uuid, uuid};
use vd_core::{MemStorage, OpenMode, Storage, StorageProvider, StorageRun};

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
/// Header field: FileWriteGuid.
pub const H_FILE_WRITE_GUID: usize = 16;
/// Header field: DataWriteGuid.
pub const H_DATA_WRITE_GUID: usize = 32;
/// Header field: LogGuid.
pub const H_LOG_GUID: usize = 48;
/// Header field: LogVersion (`u16`).
pub const H_LOG_VERSION: usize = 64;
/// Header field: Version (`u16`).
pub const H_VERSION: usize = 66;
/// Header field: LogLength.
pub const H_LOG_LENGTH: usize = 68;
/// Header field: LogOffset.
pub const H_LOG_OFFSET: usize = 72;

/// Region table entry field: FileOffset (`u64`).
pub const R_OFFSET: usize = 16;
/// Region table entry field: Length (`u32`).
pub const R_LENGTH: usize = 24;
/// Region table entry field: Required (`u32`).
pub const R_REQUIRED: usize = 28;
/// Region table header field: EntryCount (`u32`).
pub const R_COUNT: usize = 8;

/// Metadata table header field: EntryCount (`u16`).
pub const M_COUNT: usize = 10;
/// Metadata table entry field: Offset (`u32`, from the start of the region).
pub const M_OFFSET: usize = 16;
/// Metadata table entry field: Length (`u32`).
pub const M_LENGTH: usize = 20;
/// Metadata table entry field: flags (`u32`: IsUser 1, IsVirtualDisk 2, IsRequired 4).
pub const M_FLAGS: usize = 24;

/// Log entry header field: EntryLength (`u32`).
pub const L_LENGTH: usize = 8;
/// Log entry header field: Tail (`u32`).
pub const L_TAIL: usize = 12;
/// Log entry header field: SequenceNumber (`u64`).
pub const L_SEQUENCE: usize = 16;
/// Log entry header field: DescriptorCount (`u32`).
pub const L_DESCRIPTORS: usize = 24;
/// Log entry header field: LogGuid.
pub const L_LOG_GUID: usize = 32;
/// Log entry header field: FlushedFileOffset (`u64`).
pub const L_FLUSHED: usize = 48;
/// Log entry header field: LastFileOffset (`u64`).
pub const L_LAST: usize = 56;
/// Log descriptor field (from the descriptor's start): FileOffset (`u64`).
pub const D_FILE_OFFSET: usize = 16;
/// Log descriptor field: SequenceNumber (`u64`).
pub const D_SEQUENCE: usize = 24;

/// Region: the BAT.
pub const REGION_BAT: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Region: the metadata.
pub const REGION_METADATA: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");

/// Metadata item: file parameters.
pub const META_FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Metadata item: virtual disk size.
pub const META_VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Metadata item: logical sector size.
pub const META_LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Metadata item: the parent locator.
pub const META_PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");

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

/// File offsets of the entries of region table copy `copy` (0 or 1), as many as its count says
/// (at most the 2047 the table has room for).
pub fn region_entries(b: &[u8], copy: usize) -> Vec<usize> {
    let t = REGION_TABLES[copy];
    let n = usize_of(u64::from(u32_at(b, t + R_COUNT))).min(2047);
    (0..n).map(|i| t + 16 + 32 * i).collect()
}

/// The metadata table's entries: (entry offset, item offset, item length), each as the file
/// says (at most 2047; items may lie anywhere, even outside the file).
pub fn meta_entries(b: &[u8]) -> Vec<(usize, u64, u64)> {
    let m = metadata_offset(b);
    let n = usize::from(u16_at(b, m + M_COUNT)).min(2047);
    (0..n)
        .map(|i| {
            let e = m + 32 + 32 * i;
            (
                e,
                m as u64 + u64::from(u32_at(b, e + M_OFFSET)),
                u64::from(u32_at(b, e + M_LENGTH)),
            )
        })
        .collect()
}

/// Number of BAT entries the region holds (its length / 8).
pub fn bat_len(b: &[u8]) -> usize {
    region(b, REGION_BAT).1 / 8
}

/// File offsets of the log entries found by walking the log from its start: each starts with
/// `loge` and has a plausible length (a non-zero multiple of 4 KiB inside the log).
pub fn log_entries(b: &[u8]) -> Vec<usize> {
    let (off, len) = log_region(b);
    let mut found = Vec::new();
    let mut at = 0;
    while at + 4096 <= len && off + at + 64 <= b.len() {
        let e = off + at;
        let n = usize_of(u64::from(u32_at(b, e + L_LENGTH)));
        if u32_at(b, e) != u32::from_le_bytes(*b"loge")
            || n == 0
            || !n.is_multiple_of(4096)
            || at + n > len
        {
            break;
        }
        found.push(e);
        at += n;
    }
    found
}

/// Re-seals the CRC-32C of the log entry at file offset `at`, its length as it says (clamped to
/// the file).
pub fn reseal_log_entry(b: &mut [u8], at: usize) {
    let n = usize_of(u64::from(u32_at(b, at + L_LENGTH)));
    if n >= 64 && at + n <= b.len() {
        fix_crc(b, at, n);
    }
}

/// Re-seals both headers and both region tables.
pub fn reseal_headers_and_regions(b: &mut [u8]) {
    for at in HEADERS {
        fix_crc(b, at, HEADER_SIZE);
    }
    for at in REGION_TABLES {
        fix_crc(b, at, REGION_TABLE_SIZE);
    }
}

/// A test file that may only be read: writes, resizes and discards fail and are counted.
#[derive(Debug)]
pub struct Trap {
    inner: Arc<MemStorage>,
    writes: Arc<AtomicU64>,
}

impl Trap {
    /// A file holding `bytes` that may only be read.
    pub fn new(bytes: Vec<u8>) -> Self {
        Self {
            inner: Arc::new(MemStorage::from_bytes(bytes)),
            writes: Arc::default(),
        }
    }

    /// Write attempts so far (writes, resizes, zeroing, discards).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// The file's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.inner.to_vec()
    }

    fn refuse(&self) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a read-only test file was written",
        ))
    }
}

impl Storage for Trap {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(offset, buf)
    }
    fn write_all_at(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        self.refuse()
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.refuse()
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn zero_range(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.refuse()
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.refuse()
    }
    fn run_at(&self, offset: u64, max_len: u64) -> io::Result<StorageRun> {
        self.inner.run_at(offset, max_len)
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

/// Files served only as [`Trap`]s; any attempt to open for writing, create, delete or rename is
/// counted as a write and refused.
#[derive(Debug, Default)]
pub struct TrapFs {
    root: PathBuf,
    files: Mutex<HashMap<PathBuf, Arc<MemStorage>>>,
    writes: Arc<AtomicU64>,
}

impl TrapFs {
    /// An empty file system whose files all lie under `root`.
    pub fn new(root: &str) -> Self {
        Self {
            root: root.into(),
            ..Self::default()
        }
    }

    /// Write attempts so far (writes, resizes, discards, opens for writing, creates, deletes,
    /// renames).
    pub fn writes(&self) -> u64 {
        self.writes.load(Ordering::SeqCst)
    }

    /// Places a file holding `bytes` at `path`.
    pub fn insert(&self, path: &str, bytes: Vec<u8>) {
        self.files
            .lock()
            .expect("file table")
            .insert(path.into(), Arc::new(MemStorage::from_bytes(bytes)));
    }
    /// The bytes of the file at `path`.
    ///
    /// # Panics
    ///
    /// When there is no such file.
    pub fn bytes(&self, path: &str) -> Vec<u8> {
        self.files.lock().expect("file table")[Path::new(path)].to_vec()
    }
    fn refuse<T>(&self) -> io::Result<T> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "only read-only opens are allowed here",
        ))
    }
}

impl StorageProvider for TrapFs {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        if mode == OpenMode::ReadWrite {
            return self.refuse();
        }
        let inner = self
            .files
            .lock()
            .expect("file table")
            .get(path)
            .cloned()
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(Arc::new(Trap {
            inner,
            writes: self.writes.clone(),
        }))
    }
    fn create(&self, _path: &Path, _overwrite: bool) -> io::Result<Arc<dyn Storage>> {
        self.refuse()
    }
    fn delete(&self, _path: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn rename(&self, _from: &Path, _to: &Path) -> io::Result<()> {
        self.refuse()
    }
    fn exists(&self, path: &Path) -> bool {
        path.starts_with(&self.root) && self.files.lock().expect("file table").contains_key(path)
    }
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
