//! The logic of the cargo-fuzz targets in `fuzz/` (issue 9, "Hostile input"), kept here so CI
//! compiles it and `tests/tests/fuzz_regressions.rs` replays every stored finding through it.
//! Each `fuzz/fuzz_targets/<name>.rs` only calls the function of the same name.
//!
//! Every function takes arbitrary bytes, must never panic on them (a panic is the finding),
//! and bounds its own work: whole-disk reads only for disks of at most [`WHOLE_READ_LIMIT`]
//! bytes (otherwise a bounded sample of ranges), and at most [`MAX_OPS`] operations.
//!
//! | target | input |
//! | --- | --- |
//! | [`probe`] | a file ([`file_of`]: raw, or a sparse description), probed by every backend |
//! | [`open`] | a file, opened read-only tolerant and strict |
//! | [`open_read_all`] | a file, opened read-only, read, mapped, checked, dumped |
//! | [`log_replay`] | bytes laid over the log of a dirty image made by our `create` |
//! | [`chain`] | bytes laid over a child's parent locator and its parent's header GUIDs |
//! | [`write_model`] | a script of writes, zeroes, discards, flushes, resizes and reopens |

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, OnceLock};

use backend_raw as _;
use backend_vhd as _;
use backend_vhdx as _;
use vd_core::testing::{FaultyStorage, LossMode, fill_pattern};
use vd_core::{
    CreateParams, Disk, DiskOptions, ErrorKind, Image, ImageFlags, MemFileSystem, MemStorage,
    OpenFlags, Registry, Storage,
};

use crate::vhdx;

/// Disks up to this size are read whole; larger ones by a bounded sample.
pub const WHOLE_READ_LIMIT: u64 = 8 << 20;
/// The most operations [`write_model`] runs for one input.
pub const MAX_OPS: usize = 48;
/// The target names, as in `fuzz/fuzz_targets/` and `fuzz/regressions/`.
pub const TARGETS: [&str; 6] = [
    "probe",
    "open",
    "open_read_all",
    "log_replay",
    "chain",
    "write_model",
];

const IMAGE: &str = "/fuzz/image.vhdx";
const CHILD: &str = "/fuzz/child.vhdx";
const PARENT: &str = "/fuzz/parent.vhdx";
const MIB: u64 = 1 << 20;
/// Of corpus images, the seeds describe the pages in the first this many bytes (the structures;
/// the rest is mostly payload, which would only slow every run down).
const CORPUS_SEED_LEN: usize = 6 << 20;
/// Bytes read per sampled range of a large disk.
const SAMPLE_LEN: u64 = 64 * 1024;
/// Sampled ranges of a large disk.
const SAMPLES: u64 = 16;

/// Runs target `name` on `data`.
///
/// # Panics
///
/// For an unknown target name, and whenever the target finds a bug.
pub fn run(name: &str, data: &[u8]) {
    match name {
        "probe" => probe(data),
        "open" => open(data),
        "open_read_all" => open_read_all(data),
        "log_replay" => log_replay(data),
        "chain" => chain(data),
        "write_model" => write_model(data),
        _ => panic!("no fuzz target named {name:?}"),
    }
}

/// The most bytes a file under test may grow to ([`Capped`]).
pub const CAPACITY: u64 = 64 << 20;

/// In-memory storage on a small disk (the fuzz targets' is [`CAPACITY`] bytes): a write or
/// `set_len` past it fails with `StorageFull`, as a real disk that is full would, instead of
/// allocating what a hostile image asks for (a log replay extends the file to the
/// LastFileOffset of its head entry, which MS-VHDX lets be up to 65 TiB; on a real file system
/// that is a sparse file).
#[derive(Debug)]
pub struct Capped {
    inner: MemStorage,
    capacity: u64,
}

impl Capped {
    /// A file holding `bytes` on a disk of `capacity` bytes.
    pub fn new(bytes: Vec<u8>, capacity: u64) -> Self {
        Self {
            inner: MemStorage::from_bytes(bytes),
            capacity,
        }
    }

    /// The file's bytes.
    pub fn to_vec(&self) -> Vec<u8> {
        self.inner.to_vec()
    }

    fn check(&self, end: Option<u64>) -> std::io::Result<()> {
        match end {
            Some(end) if end <= self.capacity => Ok(()),
            _ => Err(std::io::Error::new(
                std::io::ErrorKind::StorageFull,
                "the fuzzing disk is full",
            )),
        }
    }
}

impl Storage for Capped {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        self.inner.read_exact_at(offset, buf)
    }
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> std::io::Result<()> {
        self.check(offset.checked_add(buf.len() as u64))?;
        self.inner.write_all_at(offset, buf)
    }
    fn len(&self) -> std::io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> std::io::Result<()> {
        self.check(Some(len))?;
        self.inner.set_len(len)
    }
    fn flush(&self) -> std::io::Result<()> {
        self.inner.flush()
    }
    fn zero_range(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check(offset.checked_add(len))?;
        self.inner.zero_range(offset, len)
    }
    fn discard(&self, offset: u64, len: u64) -> std::io::Result<()> {
        self.check(offset.checked_add(len))?;
        self.inner.discard(offset, len)
    }
}

/// A registry of every built-in backend over an in-memory file system holding `bytes` at `path`
/// (on a disk of [`CAPACITY`] bytes), and the storage object (to compare its bytes afterwards).
fn with_file(path: &str, bytes: &[u8]) -> (Arc<MemFileSystem>, Registry, Arc<Capped>) {
    let fs = Arc::new(MemFileSystem::new());
    let storage = Arc::new(Capped::new(bytes.to_vec(), CAPACITY));
    fs.insert(path, storage.clone());
    let registry = Registry::builtin_with_provider(fs.clone());
    (fs, registry, storage)
}

/// Files a sparse input describes are at most this long (4096 pages of 4 KiB).
pub const MAX_SPARSE_FILE: usize = 16 << 20;
const PAGE: usize = 4096;

/// The file a file target ([`probe`], [`open`], [`open_read_all`]) works on, from its input.
///
/// A VHDX file is mostly zeros between structures that sit at MiB offsets, so a raw input
/// would spend almost every mutation on padding. `data[0]` even: the file is `data[1..]` as
/// is. `data[0]` odd: a sparse description: the file's length in 4 KiB pages (`u16` LE, at
/// most [`MAX_SPARSE_FILE`]), then records of a page number (`u16` LE), a byte count (`u16`
/// LE) and that many bytes, written from the start of that page (clipped to the file); the
/// rest of the file is zeros. Any file can be described both ways.
pub fn file_of(data: &[u8]) -> Vec<u8> {
    let Some((&mode, rest)) = data.split_first() else {
        return Vec::new();
    };
    if mode & 1 == 0 {
        return rest.to_vec();
    }
    let mut input = Bytes(rest);
    let len = (usize::from(input.u16()) * PAGE).min(MAX_SPARSE_FILE);
    let mut file = vec![0u8; len];
    while !input.0.is_empty() {
        let at = usize::from(input.u16()) * PAGE;
        let n = usize::from(input.u16()).min(input.0.len());
        let (bytes, rest) = input.0.split_at(n);
        input.0 = rest;
        if at < len {
            let end = (at + n).min(len);
            file[at..end].copy_from_slice(&bytes[..end - at]);
        }
    }
    file
}

/// The sparse description ([`file_of`]) of the first `keep` bytes of `file`, as a file of
/// `file`'s length (capped at [`MAX_SPARSE_FILE`]): pages past `keep` read as zeros.
pub fn sparse(file: &[u8], keep: usize) -> Vec<u8> {
    let len = file.len().min(MAX_SPARSE_FILE);
    let pages = u16::try_from(len.div_ceil(PAGE)).expect("at most 4096 pages");
    let mut out = vec![1u8];
    out.extend(pages.to_le_bytes());
    for (i, page) in file[..len.min(keep)].chunks(PAGE).enumerate() {
        if let Some(last) = page.iter().rposition(|&b| b != 0) {
            out.extend(u16::try_from(i).expect("page number").to_le_bytes());
            out.extend(u16::try_from(last + 1).expect("page length").to_le_bytes());
            out.extend(&page[..=last]);
        }
    }
    out
}

/// The bytes of the file at `path` in `fs`.
fn file_bytes(fs: &MemFileSystem, path: &str) -> Vec<u8> {
    let s = fs.get(Path::new(path)).expect("the file exists");
    let len = usize::try_from(s.len().expect("length")).expect("fits");
    let mut b = vec![0u8; len];
    s.read_exact_at(0, &mut b).expect("read back");
    b
}

fn params(size: u64, flags: ImageFlags, options: &[(&str, &str)]) -> CreateParams {
    CreateParams {
        size,
        image_flags: flags,
        options: options
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect::<BTreeMap<_, _>>(),
        ..CreateParams::default()
    }
}

/// Probes the file of `data` ([`file_of`]) with every built-in backend. Any answer is fine; a panic is not.
pub fn probe(data: &[u8]) {
    let (_fs, registry, _) = with_file(IMAGE, &file_of(data));
    let _ = registry.probe(Path::new(IMAGE));
}

/// Opens the file of `data` ([`file_of`]) read-only, tolerant then strict, and reads its size and identity.
///
/// # Panics
///
/// When a read-only open changes the file.
pub fn open(data: &[u8]) {
    let data = file_of(data);
    let (_fs, registry, storage) = with_file(IMAGE, &data);
    each_read_only_open(&registry, |img| {
        let _ = (img.size(), img.uuid(), img.parent_uuid(), img.warnings());
    });
    assert_unchanged(storage.as_ref(), &data, "a read-only open");
}

/// Asserts that `storage` still holds `data`, comparing in chunks (no copy of the file).
fn assert_unchanged(storage: &dyn Storage, data: &[u8], what: &str) {
    let len = storage.len().expect("length");
    assert_eq!(len, data.len() as u64, "{what} changed the file's length");
    let mut buf = vec![0u8; 64 * 1024];
    for (i, chunk) in data.chunks(buf.len()).enumerate() {
        let got = &mut buf[..chunk.len()];
        storage
            .read_exact_at((i * 64 * 1024) as u64, got)
            .expect("read back");
        assert!(
            got == chunk,
            "{what} changed the file near {:#x}",
            i * 64 * 1024
        );
    }
}

/// The ranges a bounded read of a disk of `size` bytes covers: all of it when small, else
/// [`SAMPLES`] ranges spread over it (the first and last included).
fn sample_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= WHOLE_READ_LIMIT {
        return vec![(0, size)];
    }
    let step = size / SAMPLES;
    let mut out: Vec<(u64, u64)> = (0..SAMPLES).map(|i| (i * step, SAMPLE_LEN)).collect();
    out.push((size - SAMPLE_LEN, SAMPLE_LEN));
    out
}

/// Everything a read-only user does with an image: reads (bounded), `map`, a check (`repair`
/// with `dry_run`), `dump`, `details`, the geometry and the comment.
fn exercise(img: &dyn Image) {
    let size = img.size();
    for (off, len) in sample_ranges(size) {
        let mut buf = vec![0u8; usize::try_from(len).expect("bounded")];
        let _ = img.read_at(off, &mut buf);
        let _ = img.map(off, len);
        let _ = img.map_file(off, len);
    }
    if let Ok(report) = img.repair(true) {
        let _ = serde_json::to_string(&report);
    }
    if let Ok(facts) = img.dump() {
        let _ = serde_json::to_string(&facts);
    }
    if let Some(facts) = img.details() {
        let _ = serde_json::to_string(&facts);
    }
    let _ = (img.pchs_geometry(), img.lchs_geometry(), img.comment());
    let _ = (
        img.parent_filename(),
        img.parent_candidates(),
        img.file_size(),
    );
}

/// Opens the file of `data` ([`file_of`]) read-only (tolerant and strict) and does what a
/// reader does: bounded reads, `map`, `map_file`, a check (`repair(true)`), `dump`, `details`,
/// geometry, comment and parent queries.
///
/// # Panics
///
/// When anything changes the file.
pub fn open_read_all(data: &[u8]) {
    let data = file_of(data);
    let (_fs, registry, storage) = with_file(IMAGE, &data);
    each_read_only_open(&registry, exercise);
    assert_unchanged(storage.as_ref(), &data, "a read-only open and its reads");
}

/// Opens [`IMAGE`] read-only, tolerant then strict, and runs `f` on each open that succeeds.
fn each_read_only_open(registry: &Registry, mut f: impl FnMut(&dyn Image)) {
    for flags in [
        OpenFlags::READ_ONLY,
        OpenFlags::READ_ONLY | OpenFlags::STRICT,
    ] {
        if let Ok(img) = registry.open(Path::new(IMAGE), flags) {
            f(img.as_ref());
            let _ = img.close(false);
        }
    }
}

/// A small dynamic image with a dirty log whose entries are not yet applied in place: the
/// workload (allocating writes and flushes) runs on a [`FaultyStorage`] whose power is cut at
/// the first point where the log is dirty after a restart dropping every unflushed write.
pub fn dirty_image() -> &'static [u8] {
    static IMAGE_BYTES: OnceLock<Vec<u8>> = OnceLock::new();
    IMAGE_BYTES.get_or_init(|| {
        let workload = |cut: Option<u64>| {
            let fs = Arc::new(MemFileSystem::new());
            let faulty = Arc::new(FaultyStorage::new());
            fs.insert(IMAGE, faulty.clone());
            let reg = Registry::builtin_with_provider(fs);
            let img = reg
                .create(
                    "vhdx",
                    Path::new(IMAGE),
                    &params(4 * MIB, ImageFlags::empty(), &[("block_size", "1M")]),
                    None,
                    true,
                )
                .expect("create");
            img.flush().expect("flush");
            if let Some(n) = cut {
                faulty.cut_power_after(n);
            }
            let mut buf = vec![0u8; 3 * MIB as usize / 2];
            for (i, off) in [0, MIB + 4096, 3 * MIB - 8192].into_iter().enumerate() {
                fill_pattern(&mut buf, off, 0x40 + i as u8);
                if img.write_at(off, &buf).is_err() || img.flush().is_err() {
                    break;
                }
            }
            faulty.cut_power_now();
            drop(img);
            (faulty.mutation_count(), faulty.restart(LossMode::DropAll))
        };
        let (total, _) = workload(None);
        (1..total)
            .map(|cut| workload(Some(cut)).1.to_vec())
            .find(|b| vhdx::log_is_dirty(b))
            .expect("some cut leaves a dirty log")
    })
}

/// Re-seals the checksum of every log entry found at a 4 KiB boundary of `log` whose
/// `EntryLength` fits (so the parser gets past the checksum to what the entry says).
pub fn reseal_log(log: &mut [u8]) {
    let mut at = 0;
    while at + 64 <= log.len() {
        if &log[at..at + 4] == b"loge" {
            let len = vhdx::u32_at(log, at + 8) as usize;
            if len >= 4096 && len.is_multiple_of(4096) && at + len <= log.len() {
                vhdx::fix_crc(log, at, len);
                at += len;
                continue;
            }
        }
        at += 4096;
    }
}

/// Lays `data` over the log of [`dirty_image`] and opens the result read-only and read-write.
/// `data[0]`: bit 0 overwrites the log with the bytes instead of XOR-ing them in; bit 1
/// re-seals the entry checksums afterwards; bit 2 opens strict. The rest is laid over the log
/// from its start.
///
/// # Panics
///
/// When the read-only open changes the file.
pub fn log_replay(data: &[u8]) {
    let Some((&mode, patch)) = data.split_first() else {
        return;
    };
    let mut bytes = dirty_image().to_vec();
    let (log_off, log_len) = vhdx::log_region(&bytes);
    {
        let log = &mut bytes[log_off..log_off + log_len];
        for (dst, &src) in log.iter_mut().zip(patch) {
            *dst = if mode & 1 != 0 { src } else { *dst ^ src };
        }
        if mode & 2 != 0 {
            reseal_log(log);
        }
    }
    let strict = if mode & 4 != 0 {
        OpenFlags::STRICT
    } else {
        OpenFlags::empty()
    };
    let (_fs, registry, storage) = with_file(IMAGE, &bytes);
    if let Ok(img) = registry.open(Path::new(IMAGE), OpenFlags::READ_ONLY | strict) {
        exercise(img.as_ref());
        let _ = img.close(false);
    }
    assert_unchanged(
        storage.as_ref(),
        &bytes,
        "a read-only open of a dirty image",
    );
    if let Ok(img) = registry.open(Path::new(IMAGE), strict) {
        exercise(img.as_ref());
        let _ = img.write_at(0, &[0x5a; 4096]);
        let _ = img.flush();
        let _ = img.close(false);
    }
}

/// A parent (dynamic, 4 MiB, a pattern in its first half) and a differencing child over it,
/// both made by our `create`: (parent bytes, child bytes).
pub fn chain_pair() -> &'static (Vec<u8>, Vec<u8>) {
    static PAIR: OnceLock<(Vec<u8>, Vec<u8>)> = OnceLock::new();
    PAIR.get_or_init(|| {
        let fs = Arc::new(MemFileSystem::new());
        let reg = Registry::builtin_with_provider(fs.clone());
        let opts = [("block_size", "1M")];
        let parent = reg
            .create(
                "vhdx",
                Path::new(PARENT),
                &params(4 * MIB, ImageFlags::empty(), &opts),
                None,
                true,
            )
            .expect("create the parent");
        let mut buf = vec![0u8; 2 * MIB as usize];
        fill_pattern(&mut buf, 0, 0x21);
        parent.write_at(0, &buf).expect("write the parent");
        parent.close(false).expect("close the parent");
        let parent = reg
            .open(Path::new(PARENT), OpenFlags::READ_ONLY)
            .expect("reopen the parent");
        let child = reg
            .create(
                "vhdx",
                Path::new(CHILD),
                &params(4 * MIB, ImageFlags::DIFF, &opts),
                Some((Path::new(PARENT), parent.as_ref())),
                true,
            )
            .expect("create the child");
        child.write_at(MIB, &[0x33; 8192]).expect("write the child");
        child.close(false).expect("close the child");
        parent.close(false).expect("close the parent");
        (file_bytes(&fs, PARENT), file_bytes(&fs, CHILD))
    })
}

/// Mutates [`chain_pair`] and opens the child as a [`Disk`], reading through the chain.
/// `data[0]`: bit 0 re-seals the parent's headers after the change; bit 1 opens strict.
/// `data[1..49]` is XOR-ed into both parent headers' FileWriteGuid, DataWriteGuid and LogGuid;
/// the rest into the child's parent locator item and then its metadata table entry.
pub fn chain(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let (guids, locator) = rest.split_at(rest.len().min(48));
    let (parent, child) = chain_pair();
    let mut parent = parent.clone();
    let mut child = child.clone();
    for h in vhdx::HEADERS {
        for (i, &x) in guids.iter().enumerate() {
            parent[h + 16 + i] ^= x;
        }
        if mode & 1 != 0 {
            vhdx::fix_crc(&mut parent, h, vhdx::HEADER_SIZE);
        }
    }
    let entry = vhdx::meta_entry(&child, uuid::uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C"));
    let item = vhdx::metadata_offset(&child) + vhdx::u32_at(&child, entry + 16) as usize;
    let item_len = vhdx::u32_at(&child, entry + 20) as usize;
    let (in_item, in_entry) = locator.split_at(locator.len().min(item_len));
    for (i, &x) in in_item.iter().enumerate() {
        child[item + i] ^= x;
    }
    for (i, &x) in in_entry.iter().take(32).enumerate() {
        child[entry + i] ^= x;
    }
    let fs = Arc::new(MemFileSystem::new());
    fs.insert(CHILD, Arc::new(MemStorage::from_bytes(child)));
    fs.insert(PARENT, Arc::new(MemStorage::from_bytes(parent)));
    let registry = Registry::builtin_with_provider(fs);
    let mut flags = OpenFlags::READ_ONLY;
    if mode & 2 != 0 {
        flags |= OpenFlags::STRICT;
    }
    let opts = DiskOptions {
        flags,
        ..DiskOptions::default()
    };
    if let Ok(disk) = Disk::open(&registry, Path::new(CHILD), &opts) {
        for (off, len) in sample_ranges(disk.size()) {
            let mut buf = vec![0u8; usize::try_from(len).expect("bounded")];
            let _ = disk.read_at(off, &mut buf);
            let _ = disk.map(off, len);
        }
        let _ = disk.close();
    }
}

/// Reads fuzz bytes as numbers, yielding zeros once they run out.
struct Bytes<'a>(&'a [u8]);

impl Bytes<'_> {
    fn u8(&mut self) -> u8 {
        match self.0.split_first() {
            Some((&b, rest)) => {
                self.0 = rest;
                b
            }
            None => 0,
        }
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }
    fn u24(&mut self) -> u32 {
        u32::from_le_bytes([self.u8(), self.u8(), self.u8(), 0])
    }
}

/// The disk under test in [`write_model`] and how to reopen it.
struct Subject {
    registry: Registry,
    disk: Option<Disk>,
    ctx: String,
}

impl Subject {
    fn disk(&self) -> &Disk {
        self.disk.as_ref().expect("the disk is open")
    }

    fn reopen(&mut self) {
        let disk = self.disk.take().expect("the disk is open");
        disk.close()
            .unwrap_or_else(|e| panic!("{}: close: {e}", self.ctx));
        self.disk = Some(open_rw(&self.registry, &self.ctx));
    }

    /// Compares `[off, off + len)` of the disk with the model.
    fn compare(&self, model: &[u8], off: u64, len: u64, what: &str) {
        let disk = self.disk();
        assert_eq!(
            disk.size(),
            model.len() as u64,
            "{}: size after {what}",
            self.ctx
        );
        let start = usize::try_from(off).expect("small");
        let end = start + usize::try_from(len).expect("small");
        let mut buf = vec![0u8; end - start];
        disk.read_at(off, &mut buf)
            .unwrap_or_else(|e| panic!("{}: read {off}+{len} after {what}: {e}", self.ctx));
        // One memcmp first: a byte loop is slow under coverage instrumentation.
        if buf[..] == model[start..end] {
            return;
        }
        if let Some(i) = (0..buf.len()).find(|&i| buf[i] != model[start + i]) {
            panic!(
                "{}: after {what}, byte {:#x} reads {:#04x}, the model has {:#04x}",
                self.ctx,
                start + i,
                buf[i],
                model[start + i]
            );
        }
    }
}

fn open_rw(registry: &Registry, ctx: &str) -> Disk {
    Disk::open(
        registry,
        Path::new(IMAGE),
        &DiskOptions {
            flags: OpenFlags::empty(),
            ..DiskOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{ctx}: open: {e}"))
}

/// Interprets `data` as a script run on a new in-memory image and on a `Vec<u8>` model, and
/// compares the two after every step: the touched range (widened by a sector each side) always,
/// the whole disk every eighth step and at the end.
///
/// `data[0]`: image kind (`% 3`: dynamic, fixed, differencing over a parent with a pattern),
/// bit 2: 4 KiB logical sectors. `data[1]`: size, 1–4 MiB plus up to three sectors. Then
/// operations of one opcode byte (`% 6`: write, write zeroes, discard, flush, resize,
/// close and reopen) and their arguments. An operation the image refuses as an invalid
/// argument (an unaligned differencing write, a shrink that cuts off data) must leave the disk
/// as it was; any other error is a finding.
///
/// # Panics
///
/// On any mismatch with the model (the finding).
pub fn write_model(data: &[u8]) {
    let mut input = Bytes(data);
    let kind = input.u8();
    let shape = input.u8();
    let sector: u64 = if kind & 4 != 0 { 4096 } else { 512 };
    let size = (1 + u64::from(shape % 4)) * MIB + u64::from((shape >> 2) % 4) * sector;
    let (flags, subformat) = match kind % 3 {
        0 => (ImageFlags::empty(), "dynamic"),
        1 => (ImageFlags::FIXED, "fixed"),
        _ => (ImageFlags::DIFF, "dynamic"),
    };
    let diff = flags.contains(ImageFlags::DIFF);
    let ss = sector.to_string();
    let opts = [
        ("block_size", "1M"),
        ("subformat", subformat),
        ("logical_sector_size", ss.as_str()),
    ];
    let fs = Arc::new(MemFileSystem::new());
    let registry = Registry::builtin_with_provider(fs.clone());
    let ctx = format!("{subformat} diff={diff} sector={sector} size={size}");
    let mut model = vec![0u8; usize::try_from(size).expect("small")];
    let image = if diff {
        let parent = registry
            .create(
                "vhdx",
                Path::new(PARENT),
                &params(size, ImageFlags::empty(), &opts),
                None,
                true,
            )
            .unwrap_or_else(|e| panic!("{ctx}: create the parent: {e}"));
        let half = model.len() / 2;
        fill_pattern(&mut model[..half], 0, 0x77);
        parent
            .write_at(0, &model[..half])
            .expect("write the parent");
        parent.close(false).expect("close the parent");
        let parent = registry
            .open(Path::new(PARENT), OpenFlags::READ_ONLY)
            .expect("reopen the parent");
        let child = registry
            .create(
                "vhdx",
                Path::new(IMAGE),
                &params(size, flags, &opts),
                Some((Path::new(PARENT), parent.as_ref())),
                true,
            )
            .unwrap_or_else(|e| panic!("{ctx}: create: {e}"));
        parent.close(false).expect("close the parent");
        child
    } else {
        registry
            .create(
                "vhdx",
                Path::new(IMAGE),
                &params(size, flags, &opts),
                None,
                true,
            )
            .unwrap_or_else(|e| panic!("{ctx}: create: {e}"))
    };
    image.close(false).expect("close after create");
    let mut subject = Subject {
        disk: Some(open_rw(&registry, &ctx)),
        registry,
        ctx,
    };
    for step in 0..MAX_OPS {
        if input.0.is_empty() {
            break;
        }
        let op = input.u8();
        let len_now = model.len() as u64;
        // Offsets and lengths: sector-aligned unless bit 7 of the opcode asks for bytes.
        let unaligned = op & 0x80 != 0;
        let unit = if unaligned { 1 } else { sector };
        let off = (u64::from(input.u24()) * unit) % len_now;
        let max_len = len_now - off;
        let what;
        let touched;
        match op % 6 {
            0 => {
                let len = (u64::from(input.u16()) * unit % 0x30_0000).min(max_len);
                let seed = input.u8();
                let mut buf = vec![0u8; usize::try_from(len).expect("small")];
                fill_pattern(&mut buf, off, seed);
                what = format!("step {step}: write {off}+{len} seed {seed}");
                let r = subject.disk().write_at(off, &buf);
                touched = (off, len);
                match r {
                    Ok(()) => model[off as usize..(off + len) as usize].copy_from_slice(&buf),
                    Err(e) if e.kind() == ErrorKind::InvalidArgument && diff && unaligned => {}
                    Err(e) => panic!("{}: {what}: {e}", subject.ctx),
                }
            }
            k @ (1 | 2) => {
                let len = (u64::from(input.u16()) * unit * 64).min(max_len);
                let discard = k == 2;
                what = format!("step {step}: zero {off}+{len} discard={discard}");
                let r = if discard {
                    subject.disk().discard(off, len)
                } else {
                    subject.disk().write_zeroes(off, len)
                };
                touched = (off, len);
                match r {
                    Ok(()) => model[off as usize..(off + len) as usize].fill(0),
                    Err(e) if e.kind() == ErrorKind::InvalidArgument && diff && unaligned => {}
                    Err(e) => panic!("{}: {what}: {e}", subject.ctx),
                }
            }
            3 => {
                what = format!("step {step}: flush");
                subject
                    .disk()
                    .flush()
                    .unwrap_or_else(|e| panic!("{}: {what}: {e}", subject.ctx));
                touched = (off, 0);
            }
            4 => {
                // Differencing images keep their size: what a grown child reads there is the
                // parent's business, which this model does not describe.
                let new_size = (u64::from(input.u16()) * sector) % (8 * MIB) + sector;
                what = format!("step {step}: resize {len_now} -> {new_size}");
                if !diff {
                    let r = subject.disk().top().resize(new_size, &mut |_, _| {});
                    match r {
                        Ok(()) => model.resize(usize::try_from(new_size).expect("small"), 0),
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::InvalidArgument | ErrorKind::OutOfRange
                            ) && new_size < len_now => {}
                        Err(e) => panic!("{}: {what}: {e}", subject.ctx),
                    }
                }
                touched = (0, 0);
            }
            _ => {
                what = format!("step {step}: reopen");
                subject.reopen();
                touched = (0, 0);
            }
        }
        let size = model.len() as u64;
        let start = touched.0.min(size).saturating_sub(sector);
        let end = (touched.0 + touched.1 + sector).min(size);
        subject.compare(&model, start, end - start, &what);
        if step % 8 == 7 {
            subject.compare(&model, 0, size, &what);
        }
    }
    subject.compare(&model, 0, model.len() as u64, "the last step");
    subject.reopen();
    subject.compare(&model, 0, model.len() as u64, "the final reopen");
    let report = subject
        .disk()
        .top()
        .repair(true)
        .unwrap_or_else(|e| panic!("{}: check: {e}", subject.ctx));
    let errors: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.severity == vd_core::Severity::Error)
        .collect();
    assert!(errors.is_empty(), "{}: check: {errors:?}", subject.ctx);
    let disk = subject.disk.take().expect("open");
    disk.close()
        .unwrap_or_else(|e| panic!("{}: close: {e}", subject.ctx));
}

/// The seed inputs of target `name`: images made by our `create` (dynamic, fixed,
/// differencing, 4 KiB sectors) and the VHDX images of the corpus in `tests/data/` (the pages
/// of their first 6 MiB), all as sparse descriptions ([`sparse`]), for the file targets; small
/// scripts for the others.
///
/// # Panics
///
/// For an unknown target name.
pub fn seeds(name: &str) -> Vec<(String, Vec<u8>)> {
    match name {
        "probe" | "open" | "open_read_all" => {
            let mut out = created_images();
            for file in crate::corpus::images() {
                let bytes = crate::corpus::read(&file);
                let name = crate::corpus::image_name(&file).to_string();
                if file.starts_with("vhd/") {
                    // VHDs whole (their footer is at the end), where they are small enough.
                    if bytes.len() <= MAX_SPARSE_FILE {
                        out.push((name, sparse(&bytes, MAX_SPARSE_FILE)));
                    }
                    continue;
                }
                out.push((name, sparse(&bytes, CORPUS_SEED_LEN)));
            }
            out.push((
                "dirty-log.vhdx".into(),
                sparse(dirty_image(), MAX_SPARSE_FILE),
            ));
            out
        }
        "log_replay" => vec![
            ("unchanged".into(), vec![0]),
            ("resealed".into(), vec![2]),
            ("strict".into(), vec![4]),
            ("first-entry-flipped".into(), {
                let mut v = vec![2u8; 65];
                v[0] = 2;
                v
            }),
        ],
        "chain" => vec![
            ("unchanged".into(), vec![0]),
            ("strict".into(), vec![2]),
            ("linkage-changed".into(), {
                let mut v = vec![1u8; 49];
                v[0] = 1;
                v
            }),
        ],
        "write_model" => {
            let script = |kind: u8| {
                let mut v = vec![kind, 5];
                // write, zero, discard, flush, resize, reopen, write unaligned.
                v.extend([0, 0, 8, 0, 0x10, 0, 0xaa]);
                v.extend([1, 0, 2, 0, 4, 0]);
                v.extend([2, 0, 16, 0, 64, 0]);
                v.extend([3, 0, 0, 0]);
                v.extend([4, 0, 0, 0, 0x00, 0x30]);
                v.extend([5, 0, 0, 0]);
                v.extend([0x80, 7, 3, 0, 99, 1, 0x5b]);
                v
            };
            vec![
                ("dynamic".into(), script(0)),
                ("fixed".into(), script(1)),
                ("differencing".into(), script(2)),
                ("dynamic-4k".into(), script(4)),
                ("differencing-4k".into(), script(6)),
            ]
        }
        _ => panic!("no fuzz target named {name:?}"),
    }
}

/// Small images made by our own `create`: dynamic, fixed, a differencing child (its parent
/// absent), 4 KiB sectors.
fn created_images() -> Vec<(String, Vec<u8>)> {
    let fs = Arc::new(MemFileSystem::new());
    let reg = Registry::builtin_with_provider(fs.clone());
    let mut out = Vec::new();
    for (name, flags, opts) in [
        (
            "dynamic.vhdx",
            ImageFlags::empty(),
            &[("block_size", "1M")][..],
        ),
        (
            "fixed.vhdx",
            ImageFlags::FIXED,
            &[("block_size", "1M"), ("subformat", "fixed")][..],
        ),
        (
            "dynamic-4k.vhdx",
            ImageFlags::empty(),
            &[("block_size", "1M"), ("logical_sector_size", "4096")][..],
        ),
    ] {
        let path = format!("/seeds/{name}");
        let img = reg
            .create(
                "vhdx",
                Path::new(&path),
                &params(MIB, flags, opts),
                None,
                true,
            )
            .expect("create a seed");
        let mut buf = vec![0u8; 64 * 1024];
        fill_pattern(&mut buf, 0, 0x11);
        img.write_at(0, &buf).expect("write a seed");
        img.close(false).expect("close a seed");
        out.push((
            name.to_string(),
            sparse(&file_bytes(&fs, &path), MAX_SPARSE_FILE),
        ));
    }
    out.push((
        "differencing.vhdx".into(),
        sparse(&chain_pair().1, MAX_SPARSE_FILE),
    ));
    out
}
