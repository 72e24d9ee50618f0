//! Structural mutation test (issue 9): valid small images made by our own `create` are damaged
//! precisely, one to three fields at a time, and must then behave.
//!
//! The images: dynamic, fixed, a differencing child with its parent, 4 KiB logical sectors (all
//! with data written, the child with a partial block so it has a sector bitmap) and one with a
//! dirty log (a writer that flushed and never closed). The damaged structures: header fields,
//! region table entries and counts, metadata table entries and counts, metadata items
//! (including the parent locator's header and entries), BAT entries, sector-bitmap blocks, log
//! entry headers, descriptors and data sectors, and a raw byte anywhere. Half of the cases
//! re-seal the CRC-32C of both headers, both region tables and every log entry after the damage,
//! so it reaches the parsers behind the checksums.
//!
//! For every case, open (tolerant and strict, read-only), a full read, `map` and `repair(true)`
//! (a check) of the image alone, and the same through a [`Disk`] chain; then a read-write open
//! of a copy (the log replayed into it, writes that must read back at once, a flush, a discard,
//! a repair, a close and a second open), its parent read-only:
//! - never panic (a panic is caught and reported with the mutation that caused it),
//! - never hang: each case runs on its own thread and must finish within [`CASE_TIMEOUT`],
//! - never allocate more than [`ALLOC_BOUND`] live bytes at once beyond what the case held when
//!   it started (a counting global allocator, [`PeakAlloc`], measures the peak; the test is the
//!   only one in this binary, so nothing else allocates meanwhile),
//! - never write to a file opened read-only: every file is served by [`Trap`], whose writes,
//!   resizes and discards fail loudly and are counted, and the bytes are compared afterwards
//!   (in the read-write part, the parent is such a file),
//! - read back every write that succeeded, and never grow the file past [`RW_CAPACITY`] (its
//!   storage, [`Capped`], refuses that as a full disk would).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, mpsc};
use std::time::Duration;

use backend_raw as _;
use backend_vhdx as _;
use peak_alloc::PeakAlloc;
use proptest::prelude::*;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use vd_core::{
    CreateParams, Disk, DiskOptions, Image, ImageFlags, MemFileSystem, OpenFlags, Registry,
};
use vd_tests::fuzzing::Capped;
use vd_tests::vhdx::*;

#[global_allocator]
static ALLOC: PeakAlloc = PeakAlloc;

/// Most live bytes one case may add. The images are at most 16 MiB files with at most 8 MiB
/// virtual disks; a case holds the image (a copy in the trap file system) and a whole-disk read
/// buffer, while the library's own bounds are the 1 MiB metadata item cap, the 64 KiB tables, the
/// lazily cached 4 KiB BAT and bitmap pages and the 1 MiB log these images have. 64 MiB leaves
/// room for all of that several times over, and is far below what an unchecked length from the
/// file (a 4 GiB region, a 64 TiB disk) would ask for.
const ALLOC_BOUND: usize = 64 * MIB;

/// How long one case may run before it counts as a hang. A case takes milliseconds.
const CASE_TIMEOUT: Duration = Duration::from_secs(30);

/// Cases per run: about 6 s on two cores in the test profile, read-write part included (10,000
/// cases took 60 s and found nothing more).
const CASES: u32 = 1024;

/// Largest prefix of a (damaged) virtual disk that is read and mapped in full; beyond it only
/// the last MiB is, so a damaged size of terabytes does not turn the case into a long read.
const READ_CAP: u64 = 32 * MIB as u64;

/// The disk a read-write case's image lives on: room for the largest base image to grow by a
/// few blocks, and small enough that a damaged LastFileOffset or a runaway allocation fails as
/// a full disk long before it reaches [`ALLOC_BOUND`].
const RW_CAPACITY: u64 = 24 * MIB as u64;

/// Read-write opens that succeeded and writes that read back, over the whole run: the
/// read-write part must have done real work on most cases, not failed at the open.
static RW_OPENS: AtomicU64 = AtomicU64::new(0);
static RW_WRITES: AtomicU64 = AtomicU64::new(0);

const DIR: &str = "/m";
const IMG: &str = "/m/img.vhdx";
const PARENT: &str = "/m/parent.vhdx";

// ---------------------------------------------------------------------------------------------
// Base images
// ---------------------------------------------------------------------------------------------

/// One valid starting image, its parent if it is a differencing one.
#[derive(Debug, Clone)]
struct Base {
    name: &'static str,
    bytes: Vec<u8>,
    parent: Option<Vec<u8>>,
}

fn params(size: usize, opts: &[(&str, &str)]) -> CreateParams {
    CreateParams {
        size: size as u64,
        options: opts
            .iter()
            .map(|(k, v)| ((*k).to_string(), (*v).to_string()))
            .collect(),
        ..CreateParams::default()
    }
}

fn bytes_of(fs: &MemFileSystem, path: &str) -> Vec<u8> {
    let s = fs.get(Path::new(path)).expect("created file");
    let mut b = vec![0u8; usize_of(s.len().expect("length"))];
    s.read_exact_at(0, &mut b).expect("reading the file back");
    b
}

/// Creates an image at `path`, writes `writes` (offset, length, byte) and closes it, or with
/// `dirty` flushes and drops it unclosed (the log entry and the LogGuid stay in the file).
fn make(
    fs: &Arc<MemFileSystem>,
    path: &str,
    p: &CreateParams,
    parent: Option<&str>,
    writes: &[(usize, usize, u8)],
    dirty: bool,
) -> Vec<u8> {
    let reg = Registry::builtin_with_provider(fs.clone());
    let img = match parent {
        Some(pp) => {
            let pimg = reg
                .open(Path::new(pp), OpenFlags::READ_ONLY)
                .expect("opening the parent");
            let p = CreateParams {
                image_flags: ImageFlags::DIFF,
                ..p.clone()
            };
            reg.create(
                "vhdx",
                Path::new(path),
                &p,
                Some((Path::new(pp), pimg.as_ref())),
                true,
            )
            .expect("creating the child")
        }
        None => reg
            .create("vhdx", Path::new(path), p, None, true)
            .expect("creating"),
    };
    for &(off, len, v) in writes {
        img.write_at(off as u64, &vec![v; len]).expect("writing");
    }
    img.flush().expect("flushing");
    if dirty {
        drop(img);
    } else {
        img.close(false).expect("closing");
    }
    bytes_of(fs, path)
}

fn bases() -> &'static [Base] {
    static BASES: OnceLock<Vec<Base>> = OnceLock::new();
    BASES.get_or_init(|| {
        let fs = Arc::new(MemFileSystem::new());
        let mb1 = [("block_size", "1M")];
        let data = [(0, MIB + MIB / 2, 0xa1), (5 * MIB, 4096, 0xa2)];
        let dynamic = make(&fs, IMG, &params(8 * MIB, &mb1), None, &data, false);
        let fixed = make(
            &fs,
            IMG,
            &params(4 * MIB, &[("block_size", "1M"), ("subformat", "fixed")]),
            None,
            &[(MIB, 8192, 0xb1)],
            false,
        );
        let k4 = make(
            &fs,
            IMG,
            &params(
                8 * MIB,
                &[("block_size", "1M"), ("logical_sector_size", "4096")],
            ),
            None,
            &[(0, 3 * 4096, 0xc1), (3 * MIB, MIB, 0xc2)],
            false,
        );
        let dirty = make(&fs, IMG, &params(8 * MIB, &mb1), None, &data, true);
        assert!(log_is_dirty(&dirty), "the dirty base has a log to replay");
        let parent = make(&fs, PARENT, &params(8 * MIB, &mb1), None, &data, false);
        let child = make(
            &fs,
            IMG,
            &params(8 * MIB, &mb1),
            Some(PARENT),
            &[(512 * 3, 1024, 0xd1), (2 * MIB, MIB, 0xd2)],
            false,
        );
        vec![
            Base {
                name: "dynamic",
                bytes: dynamic,
                parent: None,
            },
            Base {
                name: "fixed",
                bytes: fixed,
                parent: None,
            },
            Base {
                name: "4k-sectors",
                bytes: k4,
                parent: None,
            },
            Base {
                name: "dirty-log",
                bytes: dirty,
                parent: None,
            },
            Base {
                name: "differencing",
                bytes: child,
                parent: Some(parent),
            },
        ]
    })
}

// ---------------------------------------------------------------------------------------------
// Mutations
// ---------------------------------------------------------------------------------------------

/// Which structure a mutation damages; the numbers pick an instance and a field inside it.
#[derive(Debug, Clone, Copy)]
enum Site {
    Header(usize, usize),
    RegionEntry(usize, usize, usize),
    RegionCount(usize),
    MetaCount,
    MetaEntry(usize, usize),
    MetaItem(usize, usize),
    Locator(usize),
    Bat(usize, bool),
    Bitmap(usize, usize),
    LogHeader(usize, usize),
    LogDescriptor(usize, usize, usize),
    LogData(usize, usize),
    Byte(usize),
}

/// The value written.
#[derive(Debug, Clone, Copy)]
enum Value {
    Zero,
    One,
    AllOnes,
    HighBit,
    FlipBit(u8),
    Plus(u8),
    Minus(u8),
    FileLen,
    BeyondFile,
    Mib(u16),
    BatState(u8),
    BatOffsetMib(u16),
    Random(u64),
}

#[derive(Debug, Clone, Copy)]
struct Mutation {
    site: Site,
    value: Value,
}

fn site() -> impl Strategy<Value = Site> {
    let n = || any::<usize>();
    prop_oneof![
        3 => (0..2usize, n()).prop_map(|(s, f)| Site::Header(s, f)),
        2 => (0..2usize, n(), n()).prop_map(|(c, e, f)| Site::RegionEntry(c, e, f)),
        1 => (0..2usize).prop_map(Site::RegionCount),
        1 => Just(Site::MetaCount),
        3 => (n(), n()).prop_map(|(e, f)| Site::MetaEntry(e, f)),
        2 => (n(), n()).prop_map(|(e, b)| Site::MetaItem(e, b)),
        2 => n().prop_map(Site::Locator),
        4 => (n(), any::<bool>()).prop_map(|(i, used)| Site::Bat(i, used)),
        2 => (n(), n()).prop_map(|(i, b)| Site::Bitmap(i, b)),
        3 => (n(), n()).prop_map(|(e, f)| Site::LogHeader(e, f)),
        2 => (n(), n(), n()).prop_map(|(e, d, f)| Site::LogDescriptor(e, d, f)),
        1 => (n(), n()).prop_map(|(e, b)| Site::LogData(e, b)),
        1 => n().prop_map(Site::Byte),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Zero),
        Just(Value::One),
        Just(Value::AllOnes),
        Just(Value::HighBit),
        (0..64u8).prop_map(Value::FlipBit),
        (1..8u8).prop_map(Value::Plus),
        (1..8u8).prop_map(Value::Minus),
        Just(Value::FileLen),
        Just(Value::BeyondFile),
        (0..32u16).prop_map(Value::Mib),
        (0..8u8).prop_map(Value::BatState),
        (0..32u16).prop_map(Value::BatOffsetMib),
        any::<u64>().prop_map(Value::Random),
    ]
}

/// Picks `items[i % len]`, if any.
fn pick<T: Copy>(items: &[T], i: usize) -> Option<T> {
    (!items.is_empty()).then(|| items[i % items.len()])
}

/// Where the structures of a pristine image are (found before any damage, so that a damaged
/// count or offset cannot mislead the test's own helpers).
struct Layout {
    len: usize,
    region_entries: [Vec<usize>; 2],
    meta_table: usize,
    meta_entries: Vec<(usize, usize, usize)>,
    locator: Option<(usize, usize)>,
    bat: usize,
    bat_used: Vec<usize>,
    bat_len: usize,
    bitmaps: Vec<usize>,
    logs: Vec<usize>,
}

impl Layout {
    fn of(b: &[u8]) -> Self {
        let (bat, _) = region(b, REGION_BAT);
        let bat_len = bat_len(b);
        let bat_used: Vec<usize> = (0..bat_len)
            .filter(|&i| u64_at(b, bat + 8 * i) != 0)
            .collect();
        let bitmaps = bat_used
            .iter()
            .map(|&i| u64_at(b, bat + 8 * i))
            // A present sector bitmap: state 6 in a bitmap slot. Payload entries in state 6
            // (fully present) are harmless extra targets: their first 4 KiB is data.
            .filter(|e| e & 7 == 6)
            .map(|e| usize_of(e >> 20 << 20))
            .filter(|&o| o + 4096 <= b.len())
            .collect();
        let meta_entries: Vec<(usize, usize, usize)> = meta_entries(b)
            .into_iter()
            .map(|(e, off, len)| (e, usize_of(off), usize_of(len)))
            .collect();
        let locator = meta_entries
            .iter()
            .find(|(e, _, _)| b[*e..*e + 16] == META_PARENT_LOCATOR.to_bytes_le())
            .map(|&(_, off, len)| (off, len));
        Self {
            len: b.len(),
            region_entries: [region_entries(b, 0), region_entries(b, 1)],
            meta_table: metadata_offset(b),
            meta_entries,
            locator,
            bat,
            bat_used,
            bat_len,
            bitmaps,
            logs: log_entries(b),
        }
    }

    /// File offset and width in bytes of `site`, if this image has it.
    fn resolve(&self, site: Site) -> Option<(usize, usize)> {
        const HEADER: [(usize, usize); 12] = [
            (0, 4),
            (4, 4),
            (H_SEQUENCE, 8),
            (H_FILE_WRITE_GUID, 8),
            (H_DATA_WRITE_GUID, 8),
            (H_LOG_GUID, 8),
            (H_LOG_GUID + 8, 8),
            (H_LOG_VERSION, 2),
            (H_VERSION, 2),
            (H_LOG_LENGTH, 4),
            (H_LOG_OFFSET, 8),
            (100, 4),
        ];
        const ENTRY: [(usize, usize); 5] = [
            (0, 8),
            (R_OFFSET, 8),
            (R_LENGTH, 4),
            (R_REQUIRED, 4),
            (8, 8),
        ];
        const META: [(usize, usize); 6] = [
            (0, 8),
            (8, 8),
            (M_OFFSET, 4),
            (M_LENGTH, 4),
            (M_FLAGS, 4),
            (28, 4),
        ];
        const LOG: [(usize, usize); 10] = [
            (0, 4),
            (L_LENGTH, 4),
            (L_TAIL, 4),
            (L_SEQUENCE, 8),
            (L_DESCRIPTORS, 4),
            (28, 4),
            (L_LOG_GUID, 8),
            (L_FLUSHED, 8),
            (L_LAST, 8),
            (L_LAST + 4, 4),
        ];
        const DESC: [(usize, usize); 5] =
            [(0, 4), (4, 4), (8, 8), (D_FILE_OFFSET, 8), (D_SEQUENCE, 8)];
        Some(match site {
            Site::Header(slot, f) => {
                let (at, w) = pick(&HEADER, f)?;
                (HEADERS[slot] + at, w)
            }
            Site::RegionEntry(copy, e, f) => {
                let (at, w) = pick(&ENTRY, f)?;
                (pick(&self.region_entries[copy], e)? + at, w)
            }
            Site::RegionCount(copy) => (REGION_TABLES[copy] + R_COUNT, 4),
            Site::MetaCount => (self.meta_table + M_COUNT, 2),
            Site::MetaEntry(e, f) => {
                let (at, w) = pick(&META, f)?;
                (pick(&self.meta_entries, e)?.0 + at, w)
            }
            Site::MetaItem(e, byte) => {
                let (_, off, len) = pick(&self.meta_entries, e)?;
                let w = [1, 2, 4, 8][byte % 4].min(len);
                (off + byte / 4 % (len - w + 1).max(1), w.max(1))
            }
            Site::Locator(f) => {
                let (off, len) = self.locator?;
                // The header (type, reserved, count) and the first entries' offsets and lengths.
                let fields = [(0, 8), (16, 2), (18, 2), (20, 4), (24, 4), (28, 2), (30, 2)];
                let n = u16::try_from(len / 12).unwrap_or(u16::MAX).min(8);
                let entry = f / 8 % usize::from(n.max(1));
                let (at, w) = pick(&fields, f)?;
                let at = if at >= 20 { at + 12 * entry } else { at };
                (at < len).then_some((off + at, w))?
            }
            Site::Bat(i, used) => {
                let index = if used {
                    pick(&self.bat_used, i)?
                } else {
                    i % self.bat_len.clamp(1, 64)
                };
                (self.bat + 8 * index, 8)
            }
            Site::Bitmap(i, byte) => (pick(&self.bitmaps, i)? + byte % 4096, [1, 8][byte % 2]),
            Site::LogHeader(e, f) => {
                let (at, w) = pick(&LOG, f)?;
                (pick(&self.logs, e)? + at, w)
            }
            Site::LogDescriptor(e, d, f) => {
                let (at, w) = pick(&DESC, f)?;
                (pick(&self.logs, e)? + 64 + 32 * (d % 4) + at, w)
            }
            Site::LogData(e, byte) => {
                let at = [0, 4, 4092, 8 + byte % 4084][byte % 4];
                (pick(&self.logs, e)? + 4096 + at, 4)
            }
            Site::Byte(at) => (at % self.len, 1),
        })
        .filter(|&(at, w)| at + w <= self.len)
    }
}

/// Reads `w` little-endian bytes at `at`.
fn get(b: &[u8], at: usize, w: usize) -> u64 {
    let mut v = [0u8; 8];
    v[..w].copy_from_slice(&b[at..at + w]);
    u64::from_le_bytes(v)
}

/// Writes the low `w` bytes of `v` little-endian at `at`.
fn set(b: &mut [u8], at: usize, w: usize, v: u64) {
    b[at..at + w].copy_from_slice(&v.to_le_bytes()[..w]);
}

/// Applies the mutations (and the re-sealing) to a copy of `base`.
fn damage(base: &[u8], layout: &Layout, muts: &[Mutation], reseal: bool) -> Vec<u8> {
    let mut b = base.to_vec();
    let len = b.len() as u64;
    let mib = MIB as u64;
    for m in muts {
        let Some((at, w)) = layout.resolve(m.site) else {
            continue;
        };
        let old = get(&b, at, w);
        let new = match m.value {
            Value::Zero => 0,
            Value::One => 1,
            Value::AllOnes => u64::MAX,
            Value::HighBit => 1 << (8 * w - 1),
            Value::FlipBit(bit) => old ^ (1 << (u32::from(bit) % (8 * w as u32))),
            Value::Plus(n) => old.wrapping_add(u64::from(n)),
            Value::Minus(n) => old.wrapping_sub(u64::from(n)),
            Value::FileLen => len,
            Value::BeyondFile => len + mib,
            Value::Mib(n) => u64::from(n) * mib,
            Value::BatState(s) => (old & !7) | u64::from(s),
            Value::BatOffsetMib(n) => (old & (mib - 1)) | (u64::from(n) * mib),
            Value::Random(r) => r,
        };
        set(&mut b, at, w, new);
    }
    if reseal {
        reseal_headers_and_regions(&mut b);
        for &e in &layout.logs {
            reseal_log_entry(&mut b, e);
        }
    }
    b
}

fn mutations() -> impl Strategy<Value = (usize, Vec<Mutation>, bool)> {
    (
        any::<usize>(),
        prop::collection::vec(
            (site(), value()).prop_map(|(site, value)| Mutation { site, value }),
            1..=3,
        ),
        any::<bool>(),
    )
}

// ---------------------------------------------------------------------------------------------
// One case
// ---------------------------------------------------------------------------------------------

/// The byte ranges a case reads and maps: the whole disk up to [`READ_CAP`], and its last MiB.
fn ranges(size: u64) -> Vec<(u64, u64)> {
    let mut r = vec![(0, size.min(READ_CAP))];
    if size > READ_CAP {
        let tail = (MIB as u64).min(size - READ_CAP);
        r.push((size - tail, tail));
    }
    r
}

/// Reads (in 1 MiB pieces), maps and checks the image alone; errors are fine, panics are not.
fn exercise_image(img: &dyn Image) {
    let mut buf = vec![0u8; MIB];
    for (start, len) in ranges(img.size()) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MIB as u64);
            let _ = img.read_at(start + done, &mut buf[..usize_of(n)]);
            done += n;
        }
        let _ = img.map(start, len);
    }
    let _ = img.repair(true);
    let _ = img.dump();
    let _ = img.warnings();
}

/// The same through a disk chain.
fn exercise_disk(disk: &Disk) {
    let mut buf = vec![0u8; MIB];
    for (start, len) in ranges(disk.size()) {
        let mut done = 0;
        while done < len {
            let n = (len - done).min(MIB as u64);
            let _ = disk.read_at(start + done, &mut buf[..usize_of(n)]);
            done += n;
        }
        let _ = disk.map(start, len);
    }
    let _ = disk.top().repair(true);
}

/// Runs one damaged image through every read-only operation; returns the write attempts.
fn run_case(bytes: Vec<u8>, parent: Option<Vec<u8>>) -> (u64, bool) {
    let fs = Arc::new(TrapFs::new(DIR));
    fs.insert(IMG, bytes.clone());
    if let Some(p) = &parent {
        fs.insert(PARENT, p.clone());
    }
    let reg = Registry::builtin_with_provider(fs.clone());
    for flags in [
        OpenFlags::READ_ONLY,
        OpenFlags::READ_ONLY | OpenFlags::STRICT,
    ] {
        if let Ok(img) = reg.open(Path::new(IMG), flags) {
            exercise_image(img.as_ref());
            let _ = img.close(false);
        }
        let opts = DiskOptions {
            flags,
            ..DiskOptions::default()
        };
        if let Ok(disk) = Disk::open(&reg, Path::new(IMG), &opts) {
            exercise_disk(&disk);
            let _ = disk.close();
        }
    }
    let unchanged =
        fs.bytes(IMG) == bytes && parent.as_ref().is_none_or(|p| fs.bytes(PARENT) == *p);
    let writes = fs.writes();
    // The read-only files go before the read-write copy comes, so the peak holds one of them.
    drop(reg);
    drop(fs);
    (writes + run_read_write(bytes, parent), unchanged)
}

/// Opens the damaged image read-write (its parent, if any, read-only behind a [`Trap`]) on a
/// disk of [`RW_CAPACITY`] bytes: the log is replayed into the file, each of a few writes must
/// read back at once, then a flush, a check with repair, a close and a second open follow.
/// Errors are fine; panics, a write that does not read back, and writes to the parent are not.
/// Returns the parent's write attempts.
fn run_read_write(bytes: Vec<u8>, parent: Option<Vec<u8>>) -> u64 {
    let fs = Arc::new(MemFileSystem::new());
    fs.insert(IMG, Arc::new(Capped::new(bytes, RW_CAPACITY)));
    let trap = parent.map(|p| Arc::new(Trap::new(p)));
    if let Some(t) = &trap {
        fs.insert(PARENT, t.clone());
    }
    let reg = Registry::builtin_with_provider(fs);
    let opts = DiskOptions {
        flags: OpenFlags::empty(),
        ..DiskOptions::default()
    };
    if let Ok(disk) = Disk::open(&reg, Path::new(IMG), &opts) {
        RW_OPENS.fetch_add(1, Ordering::Relaxed);
        let size = disk.size();
        let data: Vec<u8> = (0..64 * KIB).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        let mut back = vec![0u8; data.len()];
        for at in [0, size / 2, size.saturating_sub(data.len() as u64)] {
            let at = at - at % 4096;
            let Some(n) = size.checked_sub(at).map(|left| left.min(data.len() as u64)) else {
                continue;
            };
            let n = usize_of(n);
            if disk.write_at(at, &data[..n]).is_ok() && disk.read_at(at, &mut back[..n]).is_ok() {
                assert!(
                    back[..n] == data[..n],
                    "a write at {at:#x} did not read back"
                );
                RW_WRITES.fetch_add(1, Ordering::Relaxed);
            }
        }
        let _ = disk.flush();
        let _ = disk.discard(0, (MIB as u64).min(size));
        let _ = disk.top().repair(false);
        let _ = disk.close();
    }
    if let Ok(img) = reg.open(Path::new(IMG), OpenFlags::empty()) {
        exercise_image(img.as_ref());
        let _ = img.close(false);
    }
    trap.map_or(0, |t| t.writes())
}

/// Runs `case` on its own thread under the watchdog and the allocation bound; returns why it
/// failed, if it did.
fn guarded(what: &str, bytes: Vec<u8>, parent: Option<Vec<u8>>) -> Result<(), String> {
    let (tx, rx) = mpsc::channel();
    ALLOC.reset_peak_usage();
    let start = ALLOC.current_usage();
    std::thread::Builder::new()
        .name("mutation case".into())
        .spawn(move || {
            let r = catch_unwind(AssertUnwindSafe(|| run_case(bytes, parent)));
            let _ = tx.send(r.map_err(|p| {
                p.downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
                    .unwrap_or_default()
            }));
        })
        .expect("spawning the case thread");
    let (writes, unchanged) = match rx.recv_timeout(CASE_TIMEOUT) {
        Ok(Ok(r)) => r,
        Ok(Err(panic)) => return Err(format!("{what}: panicked: {panic}")),
        Err(_) => return Err(format!("{what}: did not finish within {CASE_TIMEOUT:?}")),
    };
    let peak = ALLOC.peak_usage().saturating_sub(start);
    if peak > ALLOC_BOUND {
        return Err(format!(
            "{what}: allocated {peak} live bytes at the peak, over the bound of {ALLOC_BOUND}"
        ));
    }
    if writes != 0 || !unchanged {
        return Err(format!(
            "{what}: {writes} write attempts on read-only files, bytes unchanged: {unchanged}"
        ));
    }
    Ok(())
}

#[test]
fn damaged_images_never_panic_hang_overallocate_or_write() {
    let bases = bases();
    let layouts: Vec<Layout> = bases.iter().map(|b| Layout::of(&b.bytes)).collect();
    // The structures every kind of damage needs exist in some base.
    assert!(
        layouts.iter().any(|l| !l.bitmaps.is_empty()),
        "a sector bitmap"
    );
    assert!(layouts.iter().any(|l| !l.logs.is_empty()), "a log entry");
    assert!(
        layouts.iter().any(|l| l.locator.is_some()),
        "a parent locator"
    );
    // Every base passes untouched.
    for b in bases {
        guarded(b.name, b.bytes.clone(), b.parent.clone()).unwrap_or_else(|e| panic!("{e}"));
    }
    let mut runner = TestRunner::new_with_rng(
        Config {
            cases: CASES,
            failure_persistence: None,
            ..Config::default()
        },
        TestRng::deterministic_rng(RngAlgorithm::ChaCha),
    );
    let result = runner.run(&mutations(), |(which, muts, reseal)| {
        let i = which % bases.len();
        let base = &bases[i];
        let bytes = damage(&base.bytes, &layouts[i], &muts, reseal);
        let what = format!("{} with {muts:?}, re-sealed: {reseal}", base.name);
        guarded(&what, bytes, base.parent.clone()).map_err(TestCaseError::fail)
    });
    if let Err(e) = result {
        panic!("{e}");
    }
    let (opens, writes) = (
        RW_OPENS.load(Ordering::Relaxed),
        RW_WRITES.load(Ordering::Relaxed),
    );
    eprintln!("read-write: {opens} opens, {writes} writes read back");
    assert!(
        opens > u64::from(CASES) / 2 && writes > u64::from(CASES),
        "the read-write part did little: {opens} opens and {writes} writes in {CASES} cases"
    );
}
