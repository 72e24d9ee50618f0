//! Corruption tests for `backend-vhdx`: one check per validation rule of [MS-VHDX].
//!
//! Every check starts from a valid image made by `qemu-img`/`qemu-io` (the tests fail, not skip,
//! when QEMU is missing), corrupts one field in memory by its byte offset ([`vd_tests::vhdx`]),
//! recomputing the CRC-32C of headers, region tables and log entries wherever the checksum
//! itself is not the rule under test, and opens the result from a [`MemFileSystem`]. Each check
//! asserts the exact [`Corruption`] variant (through [`corruption_of`]), the [`ErrorKind`] where
//! it matters, and that the error names the image path and an offset. Tolerated deviations must
//! open with a warning instead. Damages whose whole story is "open fails with this corruption"
//! are rows of one table ([`DAMAGES`]); the others are tests of their own.
//!
//! Differencing chains use the real Hyper-V child from the corpus (`tests/data`) with its
//! stand-in parent. Property tests flip random bytes (of a qemu image, of a log entry whose
//! checksum is then fixed, and of the real differencing child) and must never panic or hang.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use backend_raw as _;
use backend_vhdx as _;
use backend_vhdx::{BlockRef, Corruption, corruption_of};
use proptest::collection::vec as prop_vec;
use proptest::prop_oneof;
use proptest::test_runner::{Config, TestRunner};
use uuid::{Uuid, uuid};
use vd_core::{
    Disk, DiskOptions, Error, ErrorKind, Image, MemFileSystem, MemStorage, OpenFlags, Registry,
    Result, StorageProvider,
};
use vd_tests::corpus;
use vd_tests::qemu;
use vd_tests::vhdx::*;

/// Where every single-image test puts its image.
const IMG: &str = "/img.vhdx";

const META_FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
const META_VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
const META_LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
const META_PHYSICAL_SECTOR_SIZE: Uuid = uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
const META_PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
const META_INCOMPLETE_FILE: Uuid = uuid!("71CC85F0-1B69-4E28-9558-C3BF83AE75D3");

/// The file name the real differencing child's locator gives its parent.
const PARENT_NAME: &str = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx";
/// The same name with "Generation 1_" patched to "Generation 2_".
const OTHER_NAME: &str = "Generation 2_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx";

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// A dynamic VHDX with 1 MiB blocks made by `qemu-img`, optionally written to by `qemu-io`.
fn qemu_image(size: &str, write: Option<&str>) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("img.vhdx");
    qemu::create(&path, Some("subformat=dynamic,block_size=1M"), size);
    if let Some(cmd) = write {
        qemu::io(&["-f", "vhdx", "-c", cmd, vd_tests::s(&path)]);
    }
    std::fs::read(&path).expect("reading the qemu image")
}

/// 64 MiB, nothing written.
fn empty_image() -> Vec<u8> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE.get_or_init(|| qemu_image("64M", None)).clone()
}

/// 64 MiB, 0xab over [0, 3 MiB): blocks 0-2 are FULLY_PRESENT.
fn data_image() -> Vec<u8> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE
        .get_or_init(|| qemu_image("64M", Some("write -P 0xab 0 3M")))
        .clone()
}

/// 16 MiB, 0xab over [0, 3 MiB), for the property tests.
fn small_image() -> Vec<u8> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE
        .get_or_init(|| qemu_image("16M", Some("write -P 0xab 0 3M")))
        .clone()
}

/// The real Hyper-V differencing child (8 GiB, 2 MiB blocks).
fn child_image() -> Vec<u8> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE
        .get_or_init(|| corpus::read("dissect.hypervisor/differencing.avhdx.gz"))
        .clone()
}

/// The stand-in parent whose DataWriteGuid is the child's parent_linkage.
fn parent_image() -> Vec<u8> {
    static IMAGE: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE
        .get_or_init(|| corpus::read("synthetic/differencing-avhdx-standin-parent.vhdx.gz"))
        .clone()
}

// ---------------------------------------------------------------------------------------------
// Opening and asserting
// ---------------------------------------------------------------------------------------------

fn mem_fs(bytes: Vec<u8>) -> Arc<MemFileSystem> {
    let fs = Arc::new(MemFileSystem::new());
    fs.insert(IMG, Arc::new(MemStorage::from_bytes(bytes)));
    fs
}

fn registry(fs: &Arc<MemFileSystem>) -> Registry {
    let provider: Arc<dyn StorageProvider> = fs.clone();
    Registry::builtin_with_provider(provider)
}

fn open_in(fs: &Arc<MemFileSystem>, flags: OpenFlags) -> Result<Box<dyn Image>> {
    registry(fs).open(Path::new(IMG), flags)
}

fn open_ro(bytes: Vec<u8>) -> Result<Box<dyn Image>> {
    open_in(&mem_fs(bytes), OpenFlags::READ_ONLY)
}

fn file_bytes(fs: &MemFileSystem, path: &str) -> Vec<u8> {
    let s = fs.get(Path::new(path)).expect("the file exists");
    let mut v = vec![0u8; usize_of(s.len().expect("length"))];
    s.read_exact_at(0, &mut v).expect("reading the file");
    v
}

/// The error and its [`Corruption`].
#[track_caller]
fn corruption(err: Error) -> (Error, Corruption) {
    let c = corruption_of(&err)
        .unwrap_or_else(|| panic!("no Corruption behind {err} ({err:?})"))
        .clone();
    (err, c)
}

/// Opening must fail with a [`Corruption`].
#[track_caller]
fn open_fails_with(bytes: Vec<u8>, flags: OpenFlags) -> (Error, Corruption) {
    match open_in(&mem_fs(bytes), flags) {
        Ok(img) => panic!(
            "the image opened (warnings {:?}) but must be refused",
            img.warnings()
        ),
        Err(e) => corruption(e),
    }
}

#[track_caller]
fn open_fails(bytes: Vec<u8>) -> (Error, Corruption) {
    open_fails_with(bytes, OpenFlags::READ_ONLY)
}

/// The error's Display names the image path and an offset.
#[track_caller]
fn assert_names_path_and_offset(err: &Error) {
    let s = err.to_string();
    assert!(s.contains(IMG), "{s:?} does not name the image {IMG}");
    assert!(s.contains("offset 0x"), "{s:?} does not name an offset");
}

/// The error's context names `offset`.
#[track_caller]
fn assert_offset(err: &Error, offset: usize) {
    assert_eq!(
        err.context().offset,
        Some(offset as u64),
        "{err} should point at {offset:#x}"
    );
}

/// A corrupt-image error naming the path and an offset.
#[track_caller]
fn assert_corrupt(err: &Error) {
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_names_path_and_offset(err);
}

/// Opening read-only succeeds, with a warning containing `needle`.
#[track_caller]
fn opens_with_warning(bytes: Vec<u8>, needle: &str) -> Box<dyn Image> {
    let img = open_ro(bytes).unwrap_or_else(|e| panic!("open failed: {e} ({e:?})"));
    let w = img.warnings();
    assert!(
        w.iter().any(|w| w.message.contains(needle)),
        "no warning mentions {needle:?}: {w:?}"
    );
    img
}

/// Reads the whole virtual disk in 1 MiB pieces.
fn read_whole(img: &dyn Image) -> Result<()> {
    let size = img.size();
    let mut buf = vec![0u8; MIB];
    let mut off = 0u64;
    while off < size {
        let n = usize_of((size - off).min(MIB as u64));
        img.read_at(off, &mut buf[..n])?;
        off += n as u64;
    }
    Ok(())
}

/// Opening succeeds (BAT entries are validated lazily) and reading the whole disk fails with a
/// [`Corruption`].
#[track_caller]
fn read_fails(bytes: Vec<u8>) -> (Error, Corruption) {
    let img = open_ro(bytes).unwrap_or_else(|e| panic!("open failed: {e} ({e:?})"));
    match read_whole(img.as_ref()) {
        Ok(()) => panic!("reading the whole disk succeeded"),
        Err(e) => corruption(e),
    }
}

#[test]
fn crc32c_check_value() {
    assert_eq!(crc32c(b"123456789"), 0xE306_9283);
    // And it agrees with what qemu-img stored.
    let b = empty_image();
    for at in HEADERS {
        let mut h = b[at..at + HEADER_SIZE].to_vec();
        let stored = u32_at(&h, 4);
        fix_crc(&mut h, 0, HEADER_SIZE);
        assert_eq!(u32_at(&h, 4), stored);
    }
    let mut good = data_image();
    let copy = good.clone();
    patch_region_tables(&mut good, |_| {});
    assert!(
        good == copy,
        "recomputing region table checksums changed them"
    );
    let img = open_ro(copy).expect("the unmodified image opens");
    assert!(img.warnings().is_empty(), "{:?}", img.warnings());
    read_whole(img.as_ref()).expect("the unmodified image reads");
}

// ---------------------------------------------------------------------------------------------
// Headers
// ---------------------------------------------------------------------------------------------

#[test]
fn header_1_bad_checksum_opens_with_warning() {
    let mut b = data_image();
    b[HEADERS[0] + 4] ^= 0xFF;
    let img = opens_with_warning(b, "header 1");
    read_whole(img.as_ref()).expect("reads through header 2");
}

#[test]
fn header_2_bad_checksum_opens_with_warning() {
    let mut b = data_image();
    b[HEADERS[1] + 4] ^= 0xFF;
    let img = opens_with_warning(b, "header 2");
    read_whole(img.as_ref()).expect("reads through header 1");
}

#[test]
fn equal_sequence_numbers_with_different_contents_warn() {
    let mut b = empty_image();
    let seq = u64_at(&b, HEADERS[1] + 8);
    patch_header(&mut b, 0, |h| {
        put_u64(h, 8, seq);
        h[16..32].copy_from_slice(&Uuid::new_v4().to_bytes_le());
    });
    let img = opens_with_warning(b, "sequence number");
    read_whole(img.as_ref()).expect("reads");
}

#[test]
fn equal_sequence_numbers_with_different_contents_are_refused_when_strict() {
    let mut b = empty_image();
    let seq = u64_at(&b, HEADERS[1] + 8);
    patch_header(&mut b, 0, |h| {
        put_u64(h, 8, seq);
        h[16..32].copy_from_slice(&Uuid::new_v4().to_bytes_le());
    });
    let (err, c) = open_fails_with(b, OpenFlags::READ_ONLY | OpenFlags::STRICT);
    assert_eq!(c, Corruption::HeaderSequenceTie { sequence: seq });
    assert_corrupt(&err);
    assert_offset(&err, HEADERS[0] + 8);
}

#[test]
fn identical_headers_with_equal_sequence_numbers_open_cleanly() {
    let mut b = empty_image();
    let (h1, h2) = (HEADERS[0], HEADERS[1]);
    b.copy_within(h2..h2 + HEADER_SIZE, h1);
    for flags in [
        OpenFlags::READ_ONLY,
        OpenFlags::READ_ONLY | OpenFlags::STRICT,
    ] {
        let img = open_in(&mem_fs(b.clone()), flags).expect("identical headers are accepted");
        let w = img.warnings();
        assert!(
            !w.iter()
                .any(|w| w.message.to_lowercase().contains("header")),
            "warnings about headers: {w:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Region tables
// ---------------------------------------------------------------------------------------------

#[test]
fn one_region_table_bad_opens_with_warning() {
    for copy in 0..2 {
        let mut b = data_image();
        b[REGION_TABLES[copy] + 4] ^= 0xFF;
        let img = opens_with_warning(b, &format!("region table {} at", copy + 1));
        read_whole(img.as_ref()).expect("reads through the other copy");
    }
}

#[test]
fn region_tables_that_differ_open_with_warning() {
    let mut b = empty_image();
    // Copy 2 marks the BAT region required (qemu-img leaves the flag clear); both stay valid.
    let at = REGION_TABLES[1];
    let e = at + region_entry(&b[at..at + REGION_TABLE_SIZE], REGION_BAT);
    let flags = u32_at(&b, e + 28);
    put_u32(&mut b, e + 28, flags ^ 1);
    fix_crc(&mut b, at, REGION_TABLE_SIZE);
    opens_with_warning(b, "differ");
}

#[test]
fn overlapping_regions_are_refused() {
    let clean = empty_image();
    let (bat, _) = region(&clean, REGION_BAT);
    let (meta, _) = region(&clean, REGION_METADATA);
    assert!(meta > bat, "qemu puts the metadata after the BAT");
    let grown = u32::try_from(meta - bat + MIB).expect("small");
    let mut moved = clean.clone();
    patch_region_tables(&mut moved, |t| {
        put_u64(t, region_entry(t, REGION_BAT) + 16, meta as u64);
    });
    let mut overlapping = clean;
    patch_region_tables(&mut overlapping, |t| {
        put_u32(t, region_entry(t, REGION_BAT) + 24, grown);
    });
    // The BAT moved onto the metadata region, and the BAT grown into it.
    for b in [moved, overlapping] {
        let (err, c) = open_fails(b);
        match &c {
            Corruption::Overlap { first, second } => {
                let both = format!("{first} / {second}");
                assert!(both.contains("BAT") && both.contains("metadata"), "{both}");
            }
            other => panic!("expected Overlap, got {other:?}"),
        }
        assert_corrupt(&err);
        assert_offset(&err, REGION_TABLES[0]);
    }
}

/// A free 1 MiB area of the qemu images: 4-5 MiB (qemu puts the first block at 8 MiB).
const FREE_AREA: u64 = 4 * MIB as u64;

#[test]
fn unknown_optional_region_opens_with_warning() {
    let mut b = data_image();
    let guid = Uuid::new_v4();
    add_region(&mut b, guid, FREE_AREA, MIB as u32, 0);
    let img = opens_with_warning(b, &guid.to_string());
    read_whole(img.as_ref()).expect("reads");
}

// ---------------------------------------------------------------------------------------------
// Metadata
// ---------------------------------------------------------------------------------------------

/// An unused part of the qemu metadata region: its items end at +0x10028.
const FREE_ITEM_OFFSET: u32 = 0x1_0100;

#[test]
fn unknown_optional_metadata_item_opens_with_warning() {
    let mut b = data_image();
    let guid = Uuid::new_v4();
    add_meta_entry(&mut b, guid, FREE_ITEM_OFFSET, 8, 0);
    let img = opens_with_warning(b, &guid.to_string());
    read_whole(img.as_ref()).expect("reads");
}

#[test]
fn bad_block_sizes_are_refused() {
    for bad in [3 * MIB as u32, 512 * KIB as u32, 512 * MIB as u32, 0] {
        let mut b = empty_image();
        let at = meta_item(&b, META_FILE_PARAMETERS);
        put_u32(&mut b, at, bad);
        let (err, c) = open_fails(b);
        assert_eq!(c, Corruption::BlockSize { found: bad });
        assert_corrupt(&err);
        assert_offset(&err, at);
    }
}

// ---------------------------------------------------------------------------------------------
// BAT entries (validated when first read)
// ---------------------------------------------------------------------------------------------

/// The data image with BAT entry 0 (block 0, FULLY_PRESENT) replaced by `value`.
fn with_bat_entry_0(value: impl FnOnce(u64) -> u64) -> Vec<u8> {
    let mut b = data_image();
    let at = bat_entry(&b, 0);
    let old = u64_at(&b, at);
    assert_eq!(old & 7, 6, "qemu-io left block 0 FULLY_PRESENT");
    put_u64(&mut b, at, value(old));
    b
}

/// A corrupt-image error pointing at BAT entry `index` of the data image.
#[track_caller]
fn assert_bat_error(err: &Error, index: usize) {
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    assert_offset(err, bat_entry(&data_image(), index));
}

#[test]
fn bat_entry_beyond_the_file_is_refused() {
    let len = data_image().len() as u64;
    // Far beyond, and the first MiB past the end.
    for offset in [4096 * MIB as u64, len] {
        let b = with_bat_entry_0(|_| offset | 6);
        let (err, c) = read_fails(b);
        assert_eq!(
            c,
            Corruption::BatBeyondFile {
                index: 0,
                block: BlockRef::Payload {
                    block: 0,
                    disk_offset: 0
                },
                offset,
                end: offset + MIB as u64,
                file_len: len
            }
        );
        assert_bat_error(&err, 0);
    }
}

#[test]
fn bat_entry_into_another_structure_is_refused() {
    let clean = data_image();
    let (bat, _) = region(&clean, REGION_BAT);
    let (meta, _) = region(&clean, REGION_METADATA);
    let (log, _) = log_region(&clean);
    for (offset, what) in [
        (0, "header section"),
        (log, "log"),
        (bat, "BAT region"),
        (meta, "metadata region"),
        (usize_of(FREE_AREA), "unknown region"),
    ] {
        let mut b = clean.clone();
        add_region(&mut b, Uuid::new_v4(), FREE_AREA, MIB as u32, 0);
        put_u64(&mut b, bat_entry(&clean, 0), offset as u64 | 6);
        let (err, c) = read_fails(b);
        assert_eq!(
            c,
            Corruption::BatOverlap {
                index: 0,
                offset: offset as u64,
                what
            }
        );
        assert_bat_error(&err, 0);
    }
}

#[test]
fn bat_entry_with_reserved_bits_is_refused() {
    for bit in [3, 19] {
        let b = with_bat_entry_0(|old| old | (1 << bit));
        let (err, c) = read_fails(b);
        assert!(
            matches!(c, Corruption::BatReservedBits { index: 0, .. }),
            "{c:?}"
        );
        assert_bat_error(&err, 0);
    }
}

#[test]
fn bat_entry_in_state_4_is_refused() {
    let b = with_bat_entry_0(|old| (old & !7) | 4);
    let (err, c) = read_fails(b);
    assert_eq!(c, Corruption::BatState { index: 0, state: 4 });
    assert_bat_error(&err, 0);
}

#[test]
fn partially_present_block_without_parent_is_refused() {
    let b = with_bat_entry_0(|old| old | 7);
    let (err, c) = read_fails(b);
    assert_eq!(c, Corruption::PartiallyPresentWithoutParent { index: 0 });
    assert_bat_error(&err, 0);
}

/// Errors found when a BAT entry is first used must name the image like open-time errors do:
/// in a chain, "corrupt VHDX image (BAT entry 0 at offset 0x200000)" alone does not say which
/// file is broken.
#[test]
fn bat_errors_name_the_image_path_and_offset() {
    let b = with_bat_entry_0(|old| (old & !7) | 4);
    let (err, _) = read_fails(b.clone());
    assert_names_path_and_offset(&err);
    let img = open_ro(b).expect("opens");
    let err = img.map(0, img.size()).expect_err("map reads the BAT too");
    assert_names_path_and_offset(&err);
}

// ---------------------------------------------------------------------------------------------
// Log
// ---------------------------------------------------------------------------------------------

const LOG_ENTRY_SIZE: usize = 8 * KIB;

/// One log entry: one data descriptor writing a 4 KiB sector of `fill` at `target`.
#[derive(Clone, Copy)]
struct LogEntry {
    guid: [u8; 16],
    sequence: u64,
    /// Log offset of the oldest entry of the sequence.
    tail: u32,
    target: u64,
    fill: u8,
    flushed: u64,
    last: u64,
}

impl LogEntry {
    fn bytes(&self) -> Vec<u8> {
        let mut e = vec![0u8; LOG_ENTRY_SIZE];
        e[0..4].copy_from_slice(b"loge");
        put_u32(&mut e, 8, LOG_ENTRY_SIZE as u32); // EntryLength
        put_u32(&mut e, 12, self.tail);
        put_u64(&mut e, 16, self.sequence);
        put_u32(&mut e, 24, 1); // DescriptorCount
        e[32..48].copy_from_slice(&self.guid);
        put_u64(&mut e, 48, self.flushed); // FlushedFileOffset
        put_u64(&mut e, 56, self.last); // LastFileOffset
        let d = 64;
        e[d..d + 4].copy_from_slice(b"desc");
        e[d + 4..d + 8].fill(self.fill); // TrailingBytes
        e[d + 8..d + 16].fill(self.fill); // LeadingBytes
        put_u64(&mut e, d + 16, self.target); // FileOffset
        put_u64(&mut e, d + 24, self.sequence);
        let s = 4 * KIB;
        e[s..s + 4].copy_from_slice(b"data");
        put_u32(&mut e, s + 4, (self.sequence >> 32) as u32); // SequenceHigh
        e[s + 8..s + 4092].fill(self.fill);
        put_u32(&mut e, s + 4092, self.sequence as u32); // SequenceLow
        fix_crc(&mut e, 0, LOG_ENTRY_SIZE);
        e
    }
}

/// The entry with sequence number 1 at log offset 0 that is its own tail.
fn log_entry(guid: [u8; 16], target: u64, fill: u8, flushed: u64, last: u64) -> Vec<u8> {
    LogEntry {
        guid,
        sequence: 1,
        tail: 0,
        target,
        fill,
        flushed,
        last,
    }
    .bytes()
}

/// Writes `entry` at log offset `pos`, wrapping around the end of the log.
fn put_in_log(b: &mut [u8], pos: usize, entry: &[u8]) {
    let (log, len) = log_region(b);
    for (i, &x) in entry.iter().enumerate() {
        b[log + (pos + i) % len] = x;
    }
}

/// Sets a fresh LogGuid in both headers and returns it.
fn set_log_guid(b: &mut [u8]) -> [u8; 16] {
    let guid = Uuid::new_v4().to_bytes_le();
    for slot in 0..2 {
        patch_header(b, slot, |h| h[48..64].copy_from_slice(&guid));
    }
    guid
}

/// The data image with a dirty log: one entry writing `fill` over the 4 KiB at `target`.
fn with_log_entry(target: u64, fill: u8) -> Vec<u8> {
    let mut b = data_image();
    let guid = set_log_guid(&mut b);
    let len = b.len() as u64;
    let (log, log_len) = log_region(&b);
    assert!(log_len >= LOG_ENTRY_SIZE, "qemu made a log");
    let entry = log_entry(guid, target, fill, len, len);
    b[log..log + LOG_ENTRY_SIZE].copy_from_slice(&entry);
    b
}

/// The last MiB of the data image is block 2 (virtual [2 MiB, 3 MiB)); the first 4 KiB of it.
fn harmless_target(b: &[u8]) -> (u64, u64) {
    let file = (b.len() - MIB) as u64;
    let raw = u64_at(b, bat_entry(b, 2));
    assert_eq!(raw, file | 6, "qemu put block 2 in the last MiB");
    (file, 2 * MIB as u64)
}

#[test]
fn log_entry_writing_the_header_area_is_refused() {
    let b = with_log_entry(0x10000, 0xcd);
    for flags in [OpenFlags::READ_ONLY, OpenFlags::empty()] {
        let (err, c) = open_fails_with(b.clone(), flags);
        assert_eq!(
            c,
            Corruption::LogTarget {
                target: 0x10000,
                length: 4096,
                what: "header area"
            }
        );
        assert_corrupt(&err);
        assert_offset(&err, log_region(&b).0);
    }
}

#[test]
fn log_entry_is_replayed_in_memory_on_read_only_open() {
    let (target, virtual_offset) = harmless_target(&data_image());
    let b = with_log_entry(target, 0xcd);
    let fs = mem_fs(b.clone());
    let img = open_in(&fs, OpenFlags::READ_ONLY).expect("a valid dirty log is replayed");
    assert!(
        img.warnings().iter().any(|w| w.message.contains("log")),
        "{:?}",
        img.warnings()
    );
    let mut buf = vec![0u8; MIB];
    img.read_at(virtual_offset, &mut buf).expect("reads");
    assert!(buf[..4096].iter().all(|&x| x == 0xcd), "replayed sector");
    assert!(buf[4096..].iter().all(|&x| x == 0xab), "rest of the block");
    img.read_at(0, &mut buf).expect("reads");
    assert!(buf.iter().all(|&x| x == 0xab), "block 0 untouched");
    read_whole(img.as_ref()).expect("reads the whole disk");
    drop(img);
    assert!(
        file_bytes(&fs, IMG) == b,
        "a read-only open modified the file"
    );
}

#[test]
fn log_entry_is_replayed_into_the_file_on_read_write_open() {
    let (target, virtual_offset) = harmless_target(&data_image());
    let b = with_log_entry(target, 0xcd);
    let old_fwg = b[HEADERS[current_slot(&b)] + 16..][..16].to_vec();
    let fs = mem_fs(b);
    let img = open_in(&fs, OpenFlags::empty()).expect("a valid dirty log is replayed");
    let mut buf = vec![0u8; 8192];
    img.read_at(virtual_offset, &mut buf).expect("reads");
    assert!(buf[..4096].iter().all(|&x| x == 0xcd), "replayed sector");
    assert!(buf[4096..].iter().all(|&x| x == 0xab), "rest of the block");
    drop(img);
    let after = file_bytes(&fs, IMG);
    let t = usize_of(target);
    assert!(
        after[t..t + 4096].iter().all(|&x| x == 0xcd),
        "the sector was not written to the file"
    );
    let h = HEADERS[current_slot(&after)];
    let mut check = after[h..h + HEADER_SIZE].to_vec();
    let stored = u32_at(&check, 4);
    fix_crc(&mut check, 0, HEADER_SIZE);
    assert_eq!(u32_at(&check, 4), stored, "current header checksum");
    assert_eq!(&after[h..h + 4], b"head");
    assert_eq!(after[h + 48..h + 64], [0u8; 16], "LogGuid not cleared");
    assert_ne!(
        after[h + 16..h + 32],
        old_fwg[..],
        "replay must change the FileWriteGuid"
    );
    // Reopening finds a clean image.
    let img = open_in(&fs, OpenFlags::READ_ONLY).expect("reopens");
    assert!(img.warnings().is_empty(), "{:?}", img.warnings());
}

#[test]
fn refuse_dirty_log_flag_refuses_a_dirty_log() {
    let (target, _) = harmless_target(&data_image());
    let b = with_log_entry(target, 0xcd);
    let fs = mem_fs(b.clone());
    let err = match open_in(&fs, OpenFlags::READ_ONLY | OpenFlags::REFUSE_DIRTY_LOG) {
        Ok(_) => panic!("a dirty log was accepted with REFUSE_DIRTY_LOG"),
        Err(e) => e,
    };
    let (err, c) = corruption(err);
    assert_eq!(c, Corruption::DirtyLogRefused);
    assert_corrupt(&err);
    assert!(file_bytes(&fs, IMG) == b, "the file was modified");
    // Read-write opens are refused too, and leave the file alone.
    let err = match open_in(&fs, OpenFlags::REFUSE_DIRTY_LOG) {
        Ok(_) => panic!("a dirty log was accepted with REFUSE_DIRTY_LOG"),
        Err(e) => e,
    };
    assert_eq!(corruption(err).1, Corruption::DirtyLogRefused);
    assert!(file_bytes(&fs, IMG) == b, "the file was modified");
}

/// The refusal must point at the LogGuid that asked for the replay: the one in the current
/// header (header 2 in qemu's images), not always header 1's.
#[test]
fn dirty_log_refusal_points_at_the_current_header() {
    let (target, _) = harmless_target(&data_image());
    let b = with_log_entry(target, 0xcd);
    let current = current_slot(&b);
    assert_eq!(current, 1, "qemu leaves header 2 current");
    let (err, _) = open_fails_with(b, OpenFlags::READ_ONLY | OpenFlags::REFUSE_DIRTY_LOG);
    assert_offset(&err, HEADERS[current] + 48);
}

/// Block `n` of the data image: (file offset, virtual offset).
fn data_block(b: &[u8], n: usize) -> (u64, u64) {
    let raw = u64_at(b, bat_entry(b, n));
    assert_eq!(raw & 7, 6, "block {n} is FULLY_PRESENT");
    (raw & !0xF_FFFF, (n * MIB) as u64)
}

/// The first byte of each 4 KiB sector at the given virtual offsets, read after a read-only open.
fn first_bytes_after_replay(b: Vec<u8>, offsets: &[u64]) -> Vec<u8> {
    let img = open_ro(b).unwrap_or_else(|e| panic!("open failed: {e}"));
    offsets
        .iter()
        .map(|&o| {
            let mut buf = vec![0u8; 4096];
            img.read_at(o, &mut buf).expect("reads");
            assert!(
                buf.iter().all(|&x| x == buf[0]),
                "sector at {o:#x} is mixed"
            );
            buf[0]
        })
        .collect()
}

#[test]
fn log_entry_wrapping_around_the_end_of_the_log_is_replayed() {
    let mut b = data_image();
    let guid = set_log_guid(&mut b);
    let (_, log_len) = log_region(&b);
    let (target, virt) = data_block(&b, 1);
    let len = b.len() as u64;
    let pos = log_len - 4 * KIB;
    let entry = LogEntry {
        guid,
        sequence: 7,
        tail: u32::try_from(pos).expect("small"),
        target,
        fill: 0xc7,
        flushed: len,
        last: len,
    };
    put_in_log(&mut b, pos, &entry.bytes());
    assert_eq!(first_bytes_after_replay(b, &[virt]), [0xc7]);
}

#[test]
fn later_entries_of_the_active_sequence_win() {
    let mut b = data_image();
    let guid = set_log_guid(&mut b);
    let (target, virt) = data_block(&b, 1);
    let len = b.len() as u64;
    let first = LogEntry {
        guid,
        sequence: 10,
        tail: 0,
        target,
        fill: 0xc1,
        flushed: len,
        last: len,
    };
    let second = LogEntry {
        sequence: 11,
        fill: 0xc2,
        ..first
    };
    put_in_log(&mut b, 0, &first.bytes());
    put_in_log(&mut b, LOG_ENTRY_SIZE, &second.bytes());
    assert_eq!(first_bytes_after_replay(b.clone(), &[virt]), [0xc2]);
    // And in the file on a read-write open.
    let fs = mem_fs(b);
    drop(open_in(&fs, OpenFlags::empty()).expect("replays"));
    let after = file_bytes(&fs, IMG);
    let t = usize_of(target);
    assert!(after[t..t + 4096].iter().all(|&x| x == 0xc2));
}

#[test]
fn entries_before_the_tail_and_stale_sequences_are_not_replayed() {
    let mut b = data_image();
    let guid = set_log_guid(&mut b);
    let (t0, v0) = data_block(&b, 0);
    let (t1, v1) = data_block(&b, 1);
    let (t2, v2) = data_block(&b, 2);
    let len = b.len() as u64;
    let e = |sequence, tail, target, fill| {
        LogEntry {
            guid,
            sequence,
            tail,
            target,
            fill,
            flushed: len,
            last: len,
        }
        .bytes()
    };
    let step = LOG_ENTRY_SIZE;
    let stepu = LOG_ENTRY_SIZE as u32;
    // An older, complete sequence (3) far away in the log.
    put_in_log(&mut b, 8 * step, &e(3, 8 * stepu, t2, 0xee));
    // The active sequence: 10 at 0 (superseded: the head's tail is past it), 11 at 8 KiB.
    put_in_log(&mut b, 0, &e(10, 0, t0, 0xc1));
    put_in_log(&mut b, step, &e(11, stepu, t1, 0xc2));
    assert_eq!(
        first_bytes_after_replay(b, &[v0, v1, v2]),
        [0xab, 0xc2, 0xab]
    );
}

#[test]
fn log_entry_extending_the_file_is_replayed() {
    // The entry writes a new 4 KiB sector past the end of the file and says the file must be
    // 1 MiB longer (LastFileOffset): a read-only open sees the longer file in memory.
    let mut b = data_image();
    let guid = set_log_guid(&mut b);
    let len = b.len() as u64;
    let entry = LogEntry {
        guid,
        sequence: 1,
        tail: 0,
        target: len,
        fill: 0xc3,
        flushed: len,
        last: len + MIB as u64,
    };
    put_in_log(&mut b, 0, &entry.bytes());
    let fs = mem_fs(b.clone());
    let img = open_in(&fs, OpenFlags::READ_ONLY).expect("replays in memory");
    assert_eq!(img.file_size().expect("size"), len + MIB as u64);
    drop(img);
    assert!(
        file_bytes(&fs, IMG) == b,
        "a read-only open modified the file"
    );
    drop(open_in(&fs, OpenFlags::empty()).expect("replays into the file"));
    let after = file_bytes(&fs, IMG);
    assert_eq!(after.len() as u64, len + MIB as u64);
    let t = usize_of(len);
    assert!(after[t..t + 4096].iter().all(|&x| x == 0xc3));
}

// ---------------------------------------------------------------------------------------------
// Differencing chains (the real Hyper-V child and its stand-in parent)
// ---------------------------------------------------------------------------------------------

fn dir_path(name: &str) -> PathBuf {
    Path::new("/d").join(name)
}

fn put(fs: &MemFileSystem, path: &Path, bytes: Vec<u8>) {
    fs.insert(path, Arc::new(MemStorage::from_bytes(bytes)));
}

fn open_disk(fs: &Arc<MemFileSystem>, path: &Path) -> Result<Disk> {
    Disk::open(&registry(fs), path, &DiskOptions::default())
}

#[track_caller]
fn disk_fails(fs: &Arc<MemFileSystem>, path: &Path) -> Error {
    match open_disk(fs, path) {
        Ok(d) => panic!("the chain opened: {d:?}"),
        Err(e) => e,
    }
}

/// The current header's DataWriteGuid.
fn data_write_guid(b: &[u8]) -> [u8; 16] {
    let h = HEADERS[current_slot(b)];
    b[h + 32..h + 48].try_into().expect("16 bytes")
}

#[test]
fn differencing_child_naming_itself_is_a_cycle() {
    let fs = Arc::new(MemFileSystem::new());
    let path = dir_path(PARENT_NAME);
    put(&fs, &path, child_image());
    let err = disk_fails(&fs, &path);
    assert_eq!(err.kind(), ErrorKind::BadChain, "{err}");
}

#[test]
fn two_differencing_images_naming_each_other_are_a_cycle() {
    let a = child_image();
    // B: a copy of the child whose locator names "Generation 2_..." and whose DataWriteGuid
    // is A's parent_linkage, so that it passes as A's parent and A is then found as B's.
    let mut b = a.clone();
    let (meta, meta_len) = region(&b, REGION_METADATA);
    let from: Vec<u8> = "Generation 1_"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let to: Vec<u8> = "Generation 2_"
        .encode_utf16()
        .flat_map(u16::to_le_bytes)
        .collect();
    let mut replaced = 0;
    let mut i = meta;
    while i + from.len() <= meta + meta_len {
        if b[i..i + from.len()] == from[..] {
            b[i..i + to.len()].copy_from_slice(&to);
            replaced += 1;
            i += from.len();
        } else {
            i += 1;
        }
    }
    assert_eq!(replaced, 3, "relative, volume and absolute paths");
    let linkage = data_write_guid(&parent_image());
    for slot in 0..2 {
        patch_header(&mut b, slot, |h| h[32..48].copy_from_slice(&linkage));
    }
    let fs = Arc::new(MemFileSystem::new());
    let path_a = dir_path(OTHER_NAME);
    put(&fs, &path_a, a);
    put(&fs, &dir_path(PARENT_NAME), b);
    let err = disk_fails(&fs, &path_a);
    assert_eq!(err.kind(), ErrorKind::BadChain, "{err}");
}

#[test]
fn parent_with_another_data_write_guid_is_rejected() {
    let mut parent = parent_image();
    let slot = current_slot(&parent);
    let wrong = Uuid::new_v4();
    patch_header(&mut parent, slot, |h| {
        h[32..48].copy_from_slice(&wrong.to_bytes_le());
    });
    let fs = Arc::new(MemFileSystem::new());
    let child = dir_path("child.avhdx");
    put(&fs, &child, child_image());
    put(&fs, &dir_path(PARENT_NAME), parent);
    let err = disk_fails(&fs, &child);
    assert!(
        matches!(err.kind(), ErrorKind::ParentMismatch | ErrorKind::NotFound),
        "{err}"
    );
    let msg = err.to_string();
    assert!(
        msg.contains(&wrong.to_string()) && msg.contains("ff34003b-11ed-4cf8-a166-b2be05e20b80"),
        "the message does not name both identities: {msg}"
    );
}

/// Chain rule of the format notes (§10.3, as openvmm enforces it): a child and its parent must
/// have the same logical sector size, since the child's sector bitmap counts the child's sectors.
#[test]
fn parent_with_another_logical_sector_size_is_rejected() {
    let mut parent = parent_image();
    let at = meta_item(&parent, META_LOGICAL_SECTOR_SIZE);
    assert_eq!(u32_at(&parent, at), 512);
    put_u32(&mut parent, at, 4096);
    let fs = Arc::new(MemFileSystem::new());
    let child = dir_path("child.avhdx");
    let parent_path = dir_path(PARENT_NAME);
    put(&fs, &child, child_image());
    put(&fs, &parent_path, parent);
    // The patched parent is a valid image on its own.
    registry(&fs)
        .open(&parent_path, OpenFlags::READ_ONLY)
        .unwrap_or_else(|e| panic!("the patched parent opens on its own: {e}"));
    let err = disk_fails(&fs, &child);
    assert!(
        matches!(
            err.kind(),
            ErrorKind::ParentMismatch | ErrorKind::NotFound | ErrorKind::BadChain
        ),
        "{err}"
    );
    assert!(err.to_string().contains("sector"), "{err}");
}

#[test]
fn differencing_child_reads_through_its_parent() {
    let child = child_image();
    let parent = parent_image();
    let fs = Arc::new(MemFileSystem::new());
    let child_path = dir_path("child.avhdx");
    let parent_path = dir_path(PARENT_NAME);
    put(&fs, &child_path, child.clone());
    put(&fs, &parent_path, parent);
    let disk = open_disk(&fs, &child_path).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(disk.layers().len(), 2);

    // Block 1042 (2 MiB blocks, 512-byte sectors, chunk ratio 2048) is PARTIALLY_PRESENT and
    // its first MiB mixes sectors of the child and of the parent.
    let block = 1042usize;
    let raw = u64_at(&child, bat_entry(&child, block));
    assert_eq!(raw & 7, 7, "block {block} is PARTIALLY_PRESENT");
    let data = usize_of((raw >> 20) << 20);
    let sb_raw = u64_at(&child, bat_entry(&child, 2048));
    assert_eq!(sb_raw & 7, 6, "chunk 0 has a sector bitmap");
    let sb = usize_of((sb_raw >> 20) << 20);
    let offset = (block * 2 * MIB) as u64;

    let parent_img = registry(&fs)
        .open(&parent_path, OpenFlags::READ_ONLY)
        .expect("the parent opens");
    let mut from_parent = vec![0u8; MIB];
    parent_img
        .read_at(offset, &mut from_parent)
        .expect("the parent reads");
    let mut want = vec![0u8; MIB];
    let (mut mine, mut inherited) = (0, 0);
    for s in 0..MIB / 512 {
        let bit = block * 4096 + s;
        let range = s * 512..(s + 1) * 512;
        if child[sb + bit / 8] >> (bit % 8) & 1 == 1 {
            want[range.clone()].copy_from_slice(&child[data + range.start..data + range.end]);
            mine += 1;
        } else {
            want[range.clone()].copy_from_slice(&from_parent[range]);
            inherited += 1;
        }
    }
    assert!(mine > 0 && inherited > 0, "{mine} / {inherited}");
    let mut got = vec![0u8; MIB];
    disk.read_at(offset, &mut got).expect("the chain reads");
    let first_diff = got.iter().zip(&want).position(|(a, b)| a != b);
    assert_eq!(first_diff, None, "content differs");
}

// ---------------------------------------------------------------------------------------------
// The remaining rules, one test each
// ---------------------------------------------------------------------------------------------
// One damage, one refusal: the table
// ---------------------------------------------------------------------------------------------

/// A damaged image and what opening it must report.
struct Case {
    bytes: Vec<u8>,
    expect: Box<dyn FnOnce(Error, Corruption)>,
}

impl Case {
    fn new(bytes: Vec<u8>, expect: impl FnOnce(Error, Corruption) + 'static) -> Case {
        Case {
            bytes,
            expect: Box::new(expect),
        }
    }
}

/// A row: the name of a damage and the refusal it must cause, and a function that builds the
/// damaged image with the checks of what opening it returns.
type Damage = (&'static str, fn() -> Case);

/// One row per damage that an open must refuse with a given [`Corruption`].
const DAMAGES: &[Damage] = &[
    ("both_headers_bad_is_no_valid_header", || {
        let mut b = empty_image();
        b[HEADERS[0] + 4] ^= 0xFF;
        b[HEADERS[1] + 100] ^= 0x01; // a reserved byte: still covered by the checksum
        Case::new(b, move |err, c| {
            assert!(matches!(c, Corruption::NoValidHeader { .. }), "{c:?}");
            assert_corrupt(&err);
            assert_offset(&err, HEADERS[0]);
        })
    }),
    ("both_region_tables_bad_is_no_valid_region_table", || {
        let mut b = empty_image();
        b[REGION_TABLES[0] + 4] ^= 0xFF;
        b[REGION_TABLES[1] + 1000] ^= 0x01;
        Case::new(b, move |err, c| {
            assert!(matches!(c, Corruption::NoValidRegionTable { .. }), "{c:?}");
            assert_corrupt(&err);
            assert_offset(&err, REGION_TABLES[0]);
        })
    }),
    ("region_not_1mib_aligned_is_refused", || {
        let mut b = empty_image();
        let (bat, len) = region(&b, REGION_BAT);
        let moved = bat as u64 + 512 * KIB as u64;
        patch_region_tables(&mut b, |t| {
            put_u64(t, region_entry(t, REGION_BAT) + 16, moved);
        });
        Case::new(b, move |err, c| {
            match c {
                Corruption::RegionRange {
                    guid,
                    offset,
                    length,
                    ..
                } => {
                    assert_eq!(guid, REGION_BAT);
                    assert_eq!(offset, moved);
                    assert_eq!(length, len as u64);
                }
                other => panic!("expected RegionRange, got {other:?}"),
            }
            assert_corrupt(&err);
            let entry = region_entry(&data_image()[REGION_TABLES[0]..], REGION_BAT);
            assert_offset(&err, REGION_TABLES[0] + entry);
        })
    }),
    ("unknown_required_region_is_unsupported", || {
        let mut b = empty_image();
        let guid = Uuid::new_v4();
        add_region(&mut b, guid, FREE_AREA, MIB as u32, 1);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::UnknownRequiredRegion { guid });
            assert_eq!(err.kind(), ErrorKind::NotSupported, "{err}");
            assert_names_path_and_offset(&err);
            assert_offset(&err, REGION_TABLES[0] + 16 + 32 * 2);
        })
    }),
    ("unknown_required_metadata_item_is_unsupported", || {
        let mut b = empty_image();
        let guid = Uuid::new_v4();
        add_meta_entry(&mut b, guid, FREE_ITEM_OFFSET, 8, 4);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::UnknownRequiredMetadata { guid });
            assert_eq!(err.kind(), ErrorKind::NotSupported, "{err}");
            assert_names_path_and_offset(&err);
            assert_offset(&err, metadata_offset(&empty_image()) + 32 + 32 * 5);
        })
    }),
    ("logical_sector_size_1024_is_refused", || {
        let mut b = empty_image();
        let at = meta_item(&b, META_LOGICAL_SECTOR_SIZE);
        put_u32(&mut b, at, 1024);
        Case::new(b, move |err, c| {
            assert_eq!(
                c,
                Corruption::SectorSize {
                    which: "logical",
                    found: 1024
                }
            );
            assert_corrupt(&err);
            assert_offset(&err, at);
        })
    }),
    ("physical_sector_size_item_of_8_bytes_is_refused", || {
        let mut b = empty_image();
        let e = meta_entry(&b, META_PHYSICAL_SECTOR_SIZE);
        put_u32(&mut b, e + 20, 8);
        Case::new(b, move |err, c| {
            match c {
                Corruption::MetadataItemLength {
                    length, expected, ..
                } => assert_eq!((length, expected), (8, 4)),
                other => panic!("expected MetadataItemLength, got {other:?}"),
            }
            assert_corrupt(&err);
            assert_offset(&err, meta_item(&empty_image(), META_PHYSICAL_SECTOR_SIZE));
        })
    }),
    ("duplicate_metadata_item_is_refused", || {
        let mut b = empty_image();
        // A second logical-sector-size entry, at its own (non-overlapping) place.
        let at = meta_item(&b, META_LOGICAL_SECTOR_SIZE);
        let value = u32_at(&b, at);
        let m = metadata_offset(&b);
        put_u32(&mut b, m + usize_of(u64::from(FREE_ITEM_OFFSET)), value);
        add_meta_entry(&mut b, META_LOGICAL_SECTOR_SIZE, FREE_ITEM_OFFSET, 4, 6);
        Case::new(b, move |err, c| {
            assert_eq!(
                c,
                Corruption::MetadataDuplicate {
                    guid: META_LOGICAL_SECTOR_SIZE
                }
            );
            assert_corrupt(&err);
            assert_offset(&err, m + 32 + 32 * 5);
        })
    }),
    ("overlapping_metadata_items_are_refused", || {
        let mut b = empty_image();
        let logical = u32_at(&b, meta_entry(&b, META_LOGICAL_SECTOR_SIZE) + 16);
        let e = meta_entry(&b, META_PHYSICAL_SECTOR_SIZE);
        put_u32(&mut b, e + 16, logical);
        Case::new(b, move |err, c| {
            match c {
                Corruption::MetadataOverlap { first, second } => {
                    let mut pair = [first, second];
                    pair.sort();
                    let mut want = [META_LOGICAL_SECTOR_SIZE, META_PHYSICAL_SECTOR_SIZE];
                    want.sort();
                    assert_eq!(pair, want);
                }
                other => panic!("expected MetadataOverlap, got {other:?}"),
            }
            assert_corrupt(&err);
            assert_offset(&err, metadata_offset(&empty_image()));
        })
    }),
    ("metadata_item_beyond_the_region_is_refused", || {
        let mut b = empty_image();
        let (_, len) = region(&b, REGION_METADATA);
        let e = meta_entry(&b, META_PHYSICAL_SECTOR_SIZE);
        let offset = u32::try_from(len - 2).expect("small");
        put_u32(&mut b, e + 16, offset);
        Case::new(b, move |err, c| {
            match c {
                Corruption::MetadataItemRange {
                    guid,
                    offset: o,
                    length,
                    ..
                } => {
                    assert_eq!(guid, META_PHYSICAL_SECTOR_SIZE);
                    assert_eq!((o, length), (offset, 4));
                }
                other => panic!("expected MetadataItemRange, got {other:?}"),
            }
            assert_corrupt(&err);
            assert_offset(&err, e);
        })
    }),
    ("virtual_size_not_a_sector_multiple_is_refused", || {
        let mut b = empty_image();
        let at = meta_item(&b, META_VIRTUAL_DISK_SIZE);
        let bad = 64 * MIB as u64 + 100;
        put_u64(&mut b, at, bad);
        Case::new(b, move |err, c| {
            match c {
                Corruption::VirtualSize { found, .. } => assert_eq!(found, bad),
                other => panic!("expected VirtualSize, got {other:?}"),
            }
            assert_corrupt(&err);
            assert_offset(&err, at);
        })
    }),
    (
        "file_truncated_below_flushed_file_offset_is_refused",
        || {
            let (target, _) = harmless_target(&data_image());
            let mut b = with_log_entry(target - MIB as u64, 0xcd);
            let flushed = b.len() as u64;
            b.truncate(b.len() - MIB);
            let file_len = b.len() as u64;
            Case::new(b, move |err, c| {
                assert_eq!(c, Corruption::LogTruncatedFile { file_len, flushed });
                assert_corrupt(&err);
                assert_offset(&err, log_region(&data_image()).0);
            })
        },
    ),
    ("log_entry_whose_tail_is_missing_is_not_a_sequence", || {
        let mut b = data_image();
        let guid = set_log_guid(&mut b);
        let (target, _) = data_block(&b, 1);
        let len = b.len() as u64;
        let entry = LogEntry {
            guid,
            sequence: 5,
            tail: 4 * LOG_ENTRY_SIZE as u32,
            target,
            fill: 0xc1,
            flushed: len,
            last: len,
        };
        put_in_log(&mut b, 0, &entry.bytes());
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::NoActiveLogSequence);
            assert_corrupt(&err);
        })
    }),
    ("duplicate_region_is_refused", || {
        let mut b = empty_image();
        add_region(&mut b, REGION_BAT, FREE_AREA, MIB as u32, 1);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::RegionDuplicate { guid: REGION_BAT });
            assert_corrupt(&err);
        })
    }),
    ("missing_region_is_refused", || {
        let mut b = empty_image();
        patch_region_tables(&mut b, |t| {
            // Keep only the BAT entry.
            let bat = region_entry(t, REGION_BAT);
            t.copy_within(bat..bat + 32, 16);
            put_u32(t, 8, 1);
        });
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::MissingRegion { name: "metadata" });
            assert_corrupt(&err);
        })
    }),
    ("metadata_table_signature_is_checked", || {
        let mut b = empty_image();
        let m = metadata_offset(&b);
        b[m] = b'x';
        Case::new(b, move |err, c| {
            assert!(matches!(c, Corruption::MetadataSignature { .. }), "{c:?}");
            assert_corrupt(&err);
        })
    }),
    ("metadata_entry_count_is_capped", || {
        let mut b = empty_image();
        let m = metadata_offset(&b);
        put_u16(&mut b, m + 10, 2048);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::MetadataEntryCount { count: 2048 });
            assert_corrupt(&err);
        })
    }),
    ("missing_system_metadata_item_is_refused", || {
        let mut b = empty_image();
        // Replace the physical sector size entry's GUID with an unknown optional one.
        let e = meta_entry(&b, META_PHYSICAL_SECTOR_SIZE);
        b[e..e + 16].copy_from_slice(&Uuid::new_v4().to_bytes_le());
        put_u32(&mut b, e + 24, 0);
        Case::new(b, move |err, c| {
            assert_eq!(
                c,
                Corruption::MissingMetadata {
                    name: "physical sector size"
                }
            );
            assert_corrupt(&err);
        })
    }),
    ("incomplete_file_marker_is_refused", || {
        let mut b = empty_image();
        add_meta_entry(&mut b, META_INCOMPLETE_FILE, 0, 0, 0);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::IncompleteFile);
            assert_corrupt(&err);
        })
    }),
    ("has_parent_without_parent_locator_is_refused", || {
        let mut b = empty_image();
        let at = meta_item(&b, META_FILE_PARAMETERS);
        let flags = u32_at(&b, at + 4);
        put_u32(&mut b, at + 4, flags | 2);
        Case::new(b, move |err, c| {
            assert_eq!(
                c,
                Corruption::MissingMetadata {
                    name: "parent locator"
                }
            );
            assert_corrupt(&err);
        })
    }),
    ("bat_region_too_small_is_refused", || {
        let mut b = empty_image();
        let at = meta_item(&b, META_VIRTUAL_DISK_SIZE);
        put_u64(&mut b, at, 1 << 40); // 1 TiB at 1 MiB blocks: 8 MiB of BAT in a 1 MiB region
        Case::new(b, move |err, c| {
            assert!(matches!(c, Corruption::BatTooSmall { .. }), "{c:?}");
            assert_corrupt(&err);
        })
    }),
    ("log_entry_with_a_torn_descriptor_is_refused", || {
        let mut b = data_image();
        let guid = set_log_guid(&mut b);
        let len = b.len() as u64;
        let (log, _) = log_region(&b);
        let (target, _) = harmless_target(&b);
        let mut entry = log_entry(guid, target, 0xcd, len, len);
        put_u64(&mut entry, 64 + 24, 2); // the descriptor's sequence number
        fix_crc(&mut entry, 0, LOG_ENTRY_SIZE);
        b[log..log + LOG_ENTRY_SIZE].copy_from_slice(&entry);
        Case::new(b, move |err, c| {
            match &c {
                Corruption::LogEntry { log_offset, reason } => {
                    assert_eq!(*log_offset, 0);
                    assert!(reason.contains("sequence"), "{reason}");
                }
                other => panic!("expected LogEntry, got {other:?}"),
            }
            assert_corrupt(&err);
        })
    }),
    ("parent_locator_of_unknown_type_is_refused", || {
        let mut b = child_image();
        let at = meta_item(&b, META_PARENT_LOCATOR);
        b[at..at + 16].copy_from_slice(&Uuid::new_v4().to_bytes_le());
        Case::new(b, move |err, c| {
            match &c {
                Corruption::ParentLocator { reason } => {
                    assert!(reason.contains("locator type"), "{reason}");
                }
                other => panic!("expected ParentLocator, got {other:?}"),
            }
            assert_corrupt(&err);
        })
    }),
];

/// Logs whose LogGuid no intact entry carries. QEMU reads them as empty (it sets the LogGuid
/// before it writes the first entry, so a crash leaves exactly this), and so does a lenient open
/// (with a warning); a strict open refuses them with the [`Corruption`] of each row.
const EMPTY_LOG_DAMAGES: &[Damage] = &[
    ("log_guid_without_entries_is_no_active_log_sequence", || {
        let mut b = data_image();
        set_log_guid(&mut b);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::NoActiveLogSequence);
            assert_corrupt(&err);
            assert_offset(&err, log_region(&data_image()).0);
        })
    }),
    ("log_entries_of_another_log_guid_are_ignored", || {
        let (target, _) = harmless_target(&data_image());
        let mut b = with_log_entry(target, 0xcd);
        set_log_guid(&mut b); // a new LogGuid: the entry no longer belongs to the log
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::NoActiveLogSequence);
            assert_corrupt(&err);
        })
    }),
    ("log_entry_with_a_bad_checksum_is_ignored", || {
        let mut b = data_image();
        let guid = set_log_guid(&mut b);
        let len = b.len() as u64;
        let (log, _) = log_region(&b);
        let (target, _) = harmless_target(&b);
        let mut entry = log_entry(guid, target, 0xcd, len, len);
        entry[4] ^= 1;
        b[log..log + LOG_ENTRY_SIZE].copy_from_slice(&entry);
        Case::new(b, move |err, c| {
            assert_eq!(c, Corruption::NoActiveLogSequence);
            assert_corrupt(&err);
        })
    }),
];

#[test]
fn a_log_guid_no_entry_carries_is_refused_strictly_and_empty_otherwise() {
    for &(name, damage) in EMPTY_LOG_DAMAGES {
        eprintln!("row: {name}");
        let case = damage();
        let lenient = open_in(&mem_fs(case.bytes.clone()), OpenFlags::READ_ONLY)
            .unwrap_or_else(|e| panic!("{name}: a lenient open refuses: {e}"));
        assert!(
            lenient
                .warnings()
                .iter()
                .any(|w| w.field.as_deref() == Some("header log guid")),
            "{name}: {:?}",
            lenient.warnings()
        );
        let (err, c) = open_fails_with(case.bytes, OpenFlags::READ_ONLY | OpenFlags::STRICT);
        (case.expect)(err, c);
    }
}

#[test]
fn each_damage_is_refused_with_its_corruption() {
    for &(name, damage) in DAMAGES {
        eprintln!("row: {name}");
        let case = damage();
        let (err, c) = open_fails(case.bytes);
        (case.expect)(err, c);
    }
}

// ---------------------------------------------------------------------------------------------

#[test]
fn file_signature_is_checked_when_opening_as_vhdx() {
    let mut b = empty_image();
    b[0] = b'X';
    let fs = mem_fs(b);
    let err = match registry(&fs).open_as("vhdx", Path::new(IMG), OpenFlags::READ_ONLY) {
        Ok(_) => panic!("opened without the vhdxfile signature"),
        Err(e) => e,
    };
    let (err, c) = corruption(err);
    assert!(matches!(c, Corruption::FileSignature { .. }), "{c:?}");
    assert_eq!(err.kind(), ErrorKind::InvalidHeader, "{err}");
    assert_names_path_and_offset(&err);
}

/// Applies `f` to both headers (checksums fixed); opening must fail with [`NoValidHeader`]
/// whose reasons contain `why`, and with only header 1 changed it must open with a warning.
///
/// [`NoValidHeader`]: Corruption::NoValidHeader
#[track_caller]
fn header_rule(f: impl Fn(&mut [u8]), why: &str) {
    let mut one = data_image();
    patch_header(&mut one, 0, &f);
    let img = opens_with_warning(one.clone(), "header 1");
    assert!(
        img.warnings().iter().any(|w| w.message.contains(why)),
        "{:?}",
        img.warnings()
    );
    read_whole(img.as_ref()).expect("reads through header 2");
    let mut both = one;
    patch_header(&mut both, 1, &f);
    let (err, c) = open_fails(both);
    match &c {
        Corruption::NoValidHeader { first, second } => {
            assert!(first.contains(why) && second.contains(why), "{c}");
        }
        other => panic!("expected NoValidHeader, got {other:?}"),
    }
    assert_corrupt(&err);
}

#[test]
fn header_signature_is_checked() {
    header_rule(|h| h[0] = b'x', "signature");
}

#[test]
fn header_version_must_be_1() {
    header_rule(|h| put_u16(h, 66, 2), "header version is 2");
}

#[test]
fn log_version_must_be_0_when_a_log_guid_is_set() {
    header_rule(
        |h| {
            h[48..64].copy_from_slice(&Uuid::new_v4().to_bytes_le());
            put_u16(h, 64, 1);
        },
        "log version is 1",
    );
}

#[test]
fn log_guid_without_log_is_refused() {
    header_rule(
        |h| {
            h[48..64].copy_from_slice(&Uuid::new_v4().to_bytes_le());
            put_u32(h, 68, 0);
        },
        "log length is 0",
    );
}

#[test]
fn log_range_is_checked() {
    // Misaligned, inside the header section, beyond the end of the file.
    header_rule(|h| put_u64(h, 72, 0x10_8000), "not a multiple of 1 MiB");
    header_rule(|h| put_u64(h, 72, 0), "inside the header section");
    header_rule(|h| put_u64(h, 72, 1 << 40), "beyond the end of the file");
}

#[test]
fn region_table_signature_and_entry_count_are_checked() {
    for (f, why) in [
        (
            (|t: &mut [u8]| t[0] = b'x') as fn(&mut [u8]),
            "region table signature",
        ),
        (|t: &mut [u8]| put_u32(t, 8, 2048), "2048 entries"),
    ] {
        let mut b = empty_image();
        patch_region_tables(&mut b, f);
        let (err, c) = open_fails(b);
        match &c {
            Corruption::NoValidRegionTable { first, second } => {
                assert!(first.contains(why) && second.contains(why), "{c}");
            }
            other => panic!("expected NoValidRegionTable, got {other:?}"),
        }
        assert_corrupt(&err);
    }
}

#[test]
fn metadata_item_inside_the_table_or_too_long_is_refused() {
    for (offset, length, why) in [
        (0x100u32, 4u32, "inside the metadata table"),
        (FREE_ITEM_OFFSET, MIB as u32 + 1, "longer than 1 MiB"),
        (FREE_ITEM_OFFSET, 0, "empty item with a non-zero offset"),
    ] {
        let mut b = empty_image();
        let guid = Uuid::new_v4();
        add_meta_entry(&mut b, guid, offset, length, 0);
        let (err, c) = open_fails(b);
        assert_eq!(
            c,
            Corruption::MetadataItemRange {
                guid,
                offset,
                length,
                reason: why
            }
        );
        assert_corrupt(&err);
    }
}

#[test]
fn tolerated_payload_states_read_as_zeros() {
    // UNDEFINED, ZERO, UNMAPPED and the draft-0.95 UNMAPPED (5) read as zeros.
    for state in [1u64, 2, 3, 5] {
        let b = with_bat_entry_0(|old| (old & !7) | state);
        let img = open_ro(b).expect("opens");
        let mut buf = vec![0xEEu8; MIB];
        img.read_at(0, &mut buf).expect("reads");
        assert!(buf.iter().all(|&x| x == 0), "state {state}");
    }
}

#[test]
fn partially_present_block_without_sector_bitmap_is_refused() {
    let mut b = child_image();
    // Chunk 0's sector-bitmap entry (index 2048) set to NOT_PRESENT; block 0 is partial.
    let at = bat_entry(&b, 2048);
    put_u64(&mut b, at, 0);
    let img = open_ro(b).expect("the child opens on its own");
    let mut buf = vec![0u8; 4096];
    let err = img
        .read_at(0, &mut buf)
        .expect_err("a partial block needs its bitmap");
    let (err, c) = corruption(err);
    assert_eq!(c, Corruption::SectorBitmapMissing { index: 0 });
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
}

// ---------------------------------------------------------------------------------------------
// Fuzzing: never panic, always finish
// ---------------------------------------------------------------------------------------------

/// Opens `bytes` read-only and, if that works, reads, maps and dumps the whole disk. Errors are
/// fine; panics are not.
fn exercise(bytes: Vec<u8>) {
    let Ok(img) = open_ro(bytes) else { return };
    let size = img.size();
    let mut buf = vec![0u8; MIB];
    let mut off = 0u64;
    while off < size {
        let n = usize_of((size - off).min(MIB as u64));
        let _ = img.read_at(off, &mut buf[..n]);
        off += n as u64;
    }
    let _ = img.map(0, size);
    let _ = img.dump();
    let _ = img.details();
}

/// Runs `f` on another thread and fails if it does not finish in `secs` seconds.
fn within(secs: u64, f: impl FnOnce() -> std::result::Result<(), String> + Send + 'static) {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(Ok(())) => {}
        Ok(Err(e)) => panic!("{e}"),
        Err(mpsc::RecvTimeoutError::Timeout) => panic!("did not finish within {secs} s"),
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("the test thread died"),
    }
}

fn config() -> Config {
    Config {
        cases: 64,
        failure_persistence: None,
        ..Config::default()
    }
}

#[test]
fn random_byte_flips_never_panic() {
    let base = small_image();
    let (bat, _) = region(&base, REGION_BAT);
    let meta = metadata_offset(&base);
    within(120, move || {
        // Mostly anywhere in the first 2 MiB (header section and log), plus the BAT and the
        // metadata table and items, which carry no checksum.
        let offsets = prop_oneof![
            4 => 0..2 * MIB,
            1 => bat..bat + 64,
            1 => meta..meta + 256,
            1 => meta + 0x1_0000..meta + 0x1_0040,
        ];
        let flips = prop_vec((offsets, 1u8..=255), 1..24);
        let mut runner = TestRunner::new(config());
        runner
            .run(&flips, |flips| {
                let mut b = base.clone();
                for (at, x) in flips {
                    b[at] ^= x;
                }
                exercise(b);
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
}

#[test]
fn random_flips_in_a_log_entry_with_fixed_checksum_never_panic() {
    let b = small_image();
    let mut base = b.clone();
    let guid = set_log_guid(&mut base);
    let (log, _) = log_region(&base);
    let len = base.len() as u64;
    let target = u64_at(&base, bat_entry(&base, 0)) & !0xF_FFFF;
    let entry = log_entry(guid, target, 0xcd, len, len);
    base[log..log + LOG_ENTRY_SIZE].copy_from_slice(&entry);
    within(120, move || {
        let offsets = prop_oneof![
            4 => 0..128usize,
            1 => 0..LOG_ENTRY_SIZE,
        ];
        let flips = prop_vec((offsets, 1u8..=255), 1..8);
        let mut runner = TestRunner::new(config());
        runner
            .run(&flips, |flips| {
                let mut b = base.clone();
                for (at, x) in flips {
                    b[log + at] ^= x;
                }
                fix_crc(&mut b, log, LOG_ENTRY_SIZE);
                exercise(b);
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
}

#[test]
fn random_flips_in_a_differencing_child_never_panic() {
    // The first 16 MiB of the real child hold its metadata, BAT, the chunk-0 sector bitmap and
    // the partially present blocks 1041-1043; the rest is not needed for those reads.
    let mut base = child_image();
    base.truncate(16 * MIB);
    let (bat, _) = region(&base, REGION_BAT);
    let meta = metadata_offset(&base);
    let locator = meta_item(&base, META_PARENT_LOCATOR);
    let sb = usize_of(u64_at(&base, bat + 8 * 2048) & !0xF_FFFF);
    let img = open_ro(base.clone()).expect("the truncated child opens");
    let mut buf = vec![0u8; 2 * MIB];
    img.read_at(1042 * 2 * MIB as u64, &mut buf)
        .expect("and reads its partially present blocks");
    drop(img);
    within(120, move || {
        let offsets = prop_oneof![
            2 => meta..meta + 256,
            2 => meta + 0x1_0000..meta + 0x1_0028,
            4 => locator..locator + 1014,
            2 => bat + 8 * 1040..bat + 8 * 1044,
            1 => bat + 8 * 2048..bat + 8 * 2049,
            2 => sb + 1040 * 512..sb + 1044 * 512,
        ];
        let flips = prop_vec((offsets, 1u8..=255), 1..8);
        let mut runner = TestRunner::new(config());
        runner
            .run(&flips, |flips| {
                let mut b = base.clone();
                for (at, x) in flips {
                    b[at] ^= x;
                }
                let Ok(img) = open_ro(b) else { return Ok(()) };
                let mut buf = vec![0u8; 2 * MIB];
                for block in 1040..1044u64 {
                    let off = block * 2 * MIB as u64;
                    if off + buf.len() as u64 <= img.size() {
                        let _ = img.read_at(off, &mut buf);
                        let _ = img.map(off, buf.len() as u64);
                    }
                }
                let _ = img.parent_candidates();
                let _ = img.parent_uuid();
                let _ = img.details();
                Ok(())
            })
            .map_err(|e| e.to_string())
    });
}
