//! Differential tests of the VHDX backend against QEMU 10.
//!
//! Every image here is made by `qemu-img create` and written by `qemu-io`; the oracle is
//! `qemu-img convert -O raw` of the same image. Our backend (through [`Disk`]) must read every
//! image byte-identically to that raw file, and its block map must make sense: the extents
//! tile the disk and the `Data` extents are exactly the blocks qemu wrote.
//!
//! The matrix (chosen for coverage per second rather than as a full product; `bsz` is qemu's
//! `block_state_zero`, on by default):
//!
//! - `dyn_1m_6g`: dynamic, 1 MiB blocks, bsz on, 6 GiB. Chunk ratio 4096: blocks past the first
//!   chunk (BAT index shifted by one sector-bitmap entry), a write across the 4 GiB chunk
//!   boundary, `write -P 0xab 5G 1M`, the last block.
//! - `dyn_1m_6g_nz`: the same with bsz off (NOT_PRESENT blocks): the first and last block of
//!   each chunk.
//! - `dyn_32m_6g`: dynamic, 32 MiB blocks, bsz on, 6 GiB. Chunk ratio 128, a chunk crossing, a
//!   whole-block zero write.
//! - `dyn_2m_101m`: dynamic, 2 MiB blocks, bsz off, 101 MiB: a partial last block.
//! - `dyn_256m_600m`: dynamic, 256 MiB blocks, 600 MiB. Chunk ratio 16, a block crossing, a
//!   sub-sector write, a partial last block.
//! - `fixed_1m_64m`: fixed, 1 MiB blocks, bsz on (ZERO blocks until written).
//! - `fixed_2m_72m_nz`, `fixed_32m_96m_nz`: fixed, bsz off (every block FULLY_PRESENT).
//! - `fixed_256m_300m`: fixed, 256 MiB blocks, bsz on, a partial last block.
//!
//! Each image gets small writes unaligned to the block (512 bytes at 1 MiB - 512), writes across
//! block boundaries, zero writes (`write -z`) and discards (`discard`, which QEMU's VHDX driver
//! ignores: the reference shows whatever QEMU did). Writes use position-unique data (a different
//! pseudo-random stream per write, through `write -s`) so that a read from the wrong block or a
//! shifted offset cannot compare equal, plus a few `-P` patterns.
//!
//! Dirty logs come from [`vd_tests::qemu::dirty_vhdx`] (three size/pattern/length variants).
//! QEMU refuses to open them read-only, so the reference is a copy replayed by
//! `qemu-img check -r all`. We read the original read-only (replaying in memory) and must leave
//! it byte-identical; then a read-write open replays into the file, after which the image must
//! read the same, pass `qemu-img check`, and compare equal to the reference in QEMU's eyes.
//!
//! Huge holes are not read from the raw reference (a first read of a sparse file's hole costs
//! about 3 s per GiB on our 2-core VMs): `qemu-img map` of the raw file lists its holes, which
//! are zeros by construction; where we also report `Zero` our own read is still checked to be
//! zeros, without reading the reference.
//!
//! QEMU (`qemu-img`, `qemu-io`) is required: a missing tool fails the tests.

use std::collections::BTreeSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use backend_raw as _;
use backend_vhdx as _;
use tempfile::TempDir;
use vd_core::{Disk, DiskExtent, DiskOptions, ExtentKind, OpenFlags, Registry};
use vd_tests::process::{output, run_ok, stdout};
use vd_tests::qemu::{self, DirtyLog, dirty_vhdx};
use vd_tests::s;

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
const GIB: u64 = 1024 * MIB;

/// Bytes compared per read.
const CHUNK: u64 = 4 * MIB;

// ---------------------------------------------------------------------------------------------
// Running QEMU
// ---------------------------------------------------------------------------------------------

/// A copy that keeps holes (`std::fs::copy` may fill them in).
fn sparse_copy(from: &Path, to: &Path) {
    run_ok("cp", &["--sparse=always", "--", s(from), s(to)]);
}

/// The holes of a raw file, as `qemu-img map` (SEEK_HOLE) reports them: runs that read as
/// zeros by construction.
fn raw_holes(raw: &Path) -> Vec<(u64, u64)> {
    let json = stdout(&run_ok(
        "qemu-img",
        &["map", "--output=json", "-f", "raw", s(raw)],
    ));
    let v: serde_json::Value = serde_json::from_str(&json).expect("qemu-img map prints JSON");
    let mut holes: Vec<(u64, u64)> = Vec::new();
    for e in v.as_array().expect("qemu-img map prints an array") {
        let field = |k: &str| {
            e.get(k)
                .unwrap_or_else(|| panic!("map entry without {k}: {e}"))
        };
        let start = field("start").as_u64().expect("start is a number");
        let length = field("length").as_u64().expect("length is a number");
        let data = field("data").as_bool().expect("data is a boolean");
        let zero = field("zero").as_bool().expect("zero is a boolean");
        if !data && zero {
            match holes.last_mut() {
                Some(last) if last.0 + last.1 == start => last.1 += length,
                _ => holes.push((start, length)),
            }
        }
    }
    holes
}

// ---------------------------------------------------------------------------------------------
// Image specifications
// ---------------------------------------------------------------------------------------------

/// One `qemu-io` command.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `write -P pattern off len`.
    Fill(u64, u64, u8),
    /// `write -s source off len` with a pseudo-random stream unique to this write.
    Unique(u64, u64),
    /// `write -z off len`.
    Zero(u64, u64),
    /// `discard off len`.
    Discard(u64, u64),
}

impl Op {
    fn range(self) -> (u64, u64) {
        match self {
            Op::Fill(o, l, _) | Op::Unique(o, l) | Op::Zero(o, l) | Op::Discard(o, l) => (o, l),
        }
    }

    /// Whether the op leaves non-zero data (so its blocks must be allocated).
    fn writes_data(self) -> bool {
        match self {
            Op::Fill(_, _, p) => p != 0,
            Op::Unique(..) => true,
            Op::Zero(..) | Op::Discard(..) => false,
        }
    }
}

/// A qemu-made image.
#[derive(Debug, Clone)]
struct Spec {
    name: &'static str,
    size: u64,
    fixed: bool,
    block_size: u64,
    /// `None`: qemu's default (on).
    block_state_zero: Option<bool>,
    ops: Vec<Op>,
}

/// What the block map must say about `Data`.
#[derive(Debug, Clone)]
enum DataExpect {
    /// Every block is allocated (a fixed image without ZERO blocks).
    Everything,
    /// Block-granular: every block holding written data is `Data`, and nothing outside the
    /// blocks any op touched is.
    Blocks {
        block_size: u64,
        must: BTreeSet<u64>,
        may: BTreeSet<u64>,
    },
    /// `Data` covers these ranges (dirty-log images, whose block size qemu picks).
    Covers(Vec<(u64, u64)>),
}

impl Spec {
    fn expect(&self) -> DataExpect {
        if self.fixed && self.block_state_zero == Some(false) {
            return DataExpect::Everything;
        }
        let bs = self.block_size;
        let blocks = |(o, l): (u64, u64)| o / bs..(o + l).div_ceil(bs);
        let mut must = BTreeSet::new();
        let mut may = BTreeSet::new();
        for op in &self.ops {
            may.extend(blocks(op.range()));
            if op.writes_data() {
                must.extend(blocks(op.range()));
            }
        }
        // A later zero write or discard may (or may not) deallocate what earlier writes put
        // there.
        for op in &self.ops {
            if !op.writes_data() {
                for b in blocks(op.range()) {
                    must.remove(&b);
                }
            }
        }
        DataExpect::Blocks {
            block_size: bs,
            must,
            may,
        }
    }
}

/// splitmix64: a distinct, deterministic stream per seed.
fn unique_bytes(seed: u64, len: u64) -> Vec<u8> {
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 0xd1b5_4a32_d192_ed03;
    let mut out = Vec::with_capacity(usize::try_from(len).expect("write sizes fit in memory") + 8);
    while (out.len() as u64) < len {
        state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        out.extend_from_slice(&(z ^ (z >> 31)).to_le_bytes());
    }
    out.truncate(out.len().min(usize::try_from(len).unwrap_or(usize::MAX)));
    out
}

/// Makes the image with qemu and its raw reference; returns `(image, reference)`.
fn build(dir: &Path, spec: &Spec) -> (PathBuf, PathBuf) {
    let image = dir.join(format!("{}.vhdx", spec.name));
    let reference = dir.join(format!("{}.raw", spec.name));
    let mut opts = format!(
        "subformat={},block_size={}",
        if spec.fixed { "fixed" } else { "dynamic" },
        spec.block_size
    );
    if let Some(z) = spec.block_state_zero {
        opts.push_str(if z {
            ",block_state_zero=on"
        } else {
            ",block_state_zero=off"
        });
    }
    qemu::create(&image, Some(&opts), &spec.size.to_string());
    let mut cmds = Vec::new();
    for (i, op) in spec.ops.iter().enumerate() {
        cmds.push(match *op {
            Op::Fill(o, l, p) => format!("write -q -P {p:#x} {o} {l}"),
            Op::Unique(o, l) => {
                let src = dir.join(format!("{}-src{i}.bin", spec.name));
                let seed = spec.name.bytes().fold(i as u64, |h, b| {
                    h.wrapping_mul(0x100_0000_01b3) ^ u64::from(b)
                });
                std::fs::write(&src, unique_bytes(seed, l)).expect("writing a source file");
                format!("write -q -s {} {o} {l}", s(&src))
            }
            Op::Zero(o, l) => format!("write -q -z {o} {l}"),
            Op::Discard(o, l) => format!("discard -q {o} {l}"),
        });
    }
    if !cmds.is_empty() {
        let mut args = vec!["-f", "vhdx"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(s(&image));
        let out = stdout(&run_ok("qemu-io", &args));
        // qemu-io reports some command failures only on its output.
        assert!(
            !out.contains("failed") && !out.contains("error"),
            "qemu-io reported a failure for {}: {out}",
            spec.name
        );
    }
    qemu::vhdx_to_raw(&image, &reference);
    (image, reference)
}

// ---------------------------------------------------------------------------------------------
// Comparing
// ---------------------------------------------------------------------------------------------

fn open_ro(image: &Path) -> Disk {
    Disk::open(&Registry::builtin(), image, &DiskOptions::default())
        .unwrap_or_else(|e| panic!("{}: open failed: {e}", image.display()))
}

/// Which extent of `map` covers `offset`.
fn extent_at(map: &[DiskExtent], offset: u64) -> Option<&DiskExtent> {
    map.iter()
        .find(|e| e.offset <= offset && offset < e.offset + e.length)
}

/// Fails with the first differing byte of `ours` against `want` (read at `offset`).
fn assert_same(what: &str, map: &[DiskExtent], offset: u64, ours: &[u8], want: &[u8]) {
    if ours == want {
        return;
    }
    let i = ours
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(ours.len().min(want.len()));
    let at = offset + i as u64;
    let differing = ours.iter().zip(want).filter(|(a, b)| a != b).count();
    let show = |b: &[u8]| {
        b.get(i..(i + 16).min(b.len()))
            .unwrap_or_default()
            .iter()
            .map(|x| format!("{x:02x}"))
            .collect::<Vec<_>>()
            .join(" ")
    };
    panic!(
        "{what}: first difference at byte {at:#x} ({differing} bytes differ in the {}-byte read \
         at {offset:#x}); ours: [{}], qemu: [{}]; our map there: {:?}",
        ours.len(),
        show(ours),
        show(want),
        extent_at(map, at)
    );
}

/// The extents tile `[0, size)`: contiguous, non-empty, merged, never `Unallocated`, and
/// `Data` exactly when a layer is named.
fn check_tiling(name: &str, map: &[DiskExtent], size: u64) {
    let mut pos = 0;
    for (i, e) in map.iter().enumerate() {
        assert_eq!(
            e.offset, pos,
            "{name}: extent {i} leaves a gap or overlaps: {e:?}"
        );
        assert!(e.length > 0, "{name}: empty extent {i}: {e:?}");
        match e.kind {
            ExtentKind::Data => assert_eq!(e.layer, Some(0), "{name}: {e:?}"),
            ExtentKind::Zero => assert_eq!(e.layer, None, "{name}: {e:?}"),
            ExtentKind::Unallocated => panic!("{name}: a disk map has no Unallocated: {e:?}"),
        }
        if let Some(prev) = i.checked_sub(1).and_then(|p| map.get(p)) {
            assert!(
                prev.kind != e.kind || prev.layer != e.layer,
                "{name}: adjacent extents not merged: {prev:?} {e:?}"
            );
        }
        pos += e.length;
    }
    assert_eq!(pos, size, "{name}: the map stops short of the disk size");
}

fn check_data(name: &str, map: &[DiskExtent], size: u64, expect: &DataExpect) {
    let data: Vec<&DiskExtent> = map.iter().filter(|e| e.kind == ExtentKind::Data).collect();
    match expect {
        DataExpect::Everything => {
            assert_eq!(
                map,
                [DiskExtent {
                    offset: 0,
                    length: size,
                    kind: ExtentKind::Data,
                    layer: Some(0),
                }],
                "{name}: a fixed image without ZERO blocks is all data"
            );
        }
        DataExpect::Blocks {
            block_size,
            must,
            may,
        } => {
            let mut ours = BTreeSet::new();
            for e in data {
                let end = e.offset + e.length;
                assert!(
                    e.offset % block_size == 0 && (end % block_size == 0 || end == size),
                    "{name}: a data extent of a base image is not block-aligned: {e:?}"
                );
                ours.extend(e.offset / block_size..end.div_ceil(*block_size));
            }
            let missing: Vec<_> = must.difference(&ours).collect();
            assert!(
                missing.is_empty(),
                "{name}: blocks qemu wrote data to are not Data in our map: {missing:?} \
                 (map: {map:?})"
            );
            let extra: Vec<_> = ours.difference(may).collect();
            assert!(
                extra.is_empty(),
                "{name}: blocks qemu never wrote are Data in our map: {extra:?} (map: {map:?})"
            );
        }
        DataExpect::Covers(ranges) => {
            for &(o, l) in ranges {
                assert!(
                    data.iter()
                        .any(|e| e.offset <= o && o + l <= e.offset + e.length),
                    "{name}: [{o:#x}, {:#x}) is not covered by a Data extent: {map:?}",
                    o + l
                );
            }
        }
    }
}

/// `(start, end)` runs of `[0, size)` by whether they are in `a` and in `b`.
fn classify(size: u64, a: &[(u64, u64)], b: &[(u64, u64)]) -> Vec<(u64, u64, bool, bool)> {
    let mut cuts = vec![0, size];
    for &(o, l) in a.iter().chain(b) {
        cuts.extend([o.min(size), (o + l).min(size)]);
    }
    cuts.sort_unstable();
    cuts.dedup();
    let inside = |set: &[(u64, u64)], x: u64| set.iter().any(|&(o, l)| o <= x && x < o + l);
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for w in cuts.windows(2) {
        let (s, e) = (w[0], w[1]);
        let (ia, ib) = (inside(a, s), inside(b, s));
        match out.last_mut() {
            Some(last) if last.1 == s && last.2 == ia && last.3 == ib => last.1 = e,
            _ => out.push((s, e, ia, ib)),
        }
    }
    out
}

/// What a comparison did.
#[derive(Debug, Default)]
struct Stats {
    compared: u64,
    zero_checked: u64,
}

/// Reads the whole disk and compares it with qemu's raw file; checks the map.
fn verify(name: &str, image: &Path, reference: &Path, expect: &DataExpect, probes: &[(u64, u64)]) {
    let t = Instant::now();
    let disk = open_ro(image);
    let size = disk.size();
    let raw = File::open(reference).expect("opening the reference");
    let raw_len = raw.metadata().expect("reference metadata").len();
    assert_eq!(size, raw_len, "{name}: virtual size differs from qemu's");

    // The map: whole disk, then sub-ranges agree with it.
    let map = disk
        .map(0, size)
        .unwrap_or_else(|e| panic!("{name}: map failed: {e}"));
    check_tiling(name, &map, size);
    check_data(name, &map, size, expect);
    for &(o, l) in probes {
        let a = o.saturating_sub(4 * KIB + 3);
        let b = (o + l + 5 * KIB + 1).min(size);
        let sub = disk
            .map(a, b - a)
            .unwrap_or_else(|e| panic!("{name}: map({a:#x}, {:#x}) failed: {e}", b - a));
        let clipped: Vec<DiskExtent> = map
            .iter()
            .filter(|e| e.offset < b && a < e.offset + e.length)
            .map(|e| {
                let s = e.offset.max(a);
                DiskExtent {
                    offset: s,
                    length: (e.offset + e.length).min(b) - s,
                    ..*e
                }
            })
            .collect();
        assert_eq!(
            sub,
            clipped,
            "{name}: map({a:#x}, {:#x}) disagrees with the whole-disk map",
            b - a
        );
    }

    // The contents.
    let zero_runs: Vec<(u64, u64)> = map
        .iter()
        .filter(|e| e.kind == ExtentKind::Zero)
        .map(|e| (e.offset, e.length))
        .collect();
    let holes = raw_holes(reference);
    let zeros = vec![0u8; CHUNK as usize];
    let mut ours = vec![0u8; CHUNK as usize];
    let mut want = vec![0u8; CHUNK as usize];
    let mut stats = Stats::default();
    for (start, end, hole, we_say_zero) in classify(size, &holes, &zero_runs) {
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let len = usize::try_from(n).expect("chunk fits");
            let ours = &mut ours[..len];
            if hole && we_say_zero {
                // Both sides say zeros: check the image's own read path agrees with its map.
                disk.top()
                    .read_at(pos, ours)
                    .unwrap_or_else(|e| panic!("{name}: read at {pos:#x}+{n:#x} failed: {e}"));
                assert_same(name, &map, pos, ours, &zeros[..len]);
                stats.zero_checked += n;
            } else {
                disk.read_at(pos, ours)
                    .unwrap_or_else(|e| panic!("{name}: read at {pos:#x}+{n:#x} failed: {e}"));
                let want = if hole {
                    &zeros[..len]
                } else {
                    let w = &mut want[..len];
                    raw.read_exact_at(w, pos).expect("reading the reference");
                    &*w
                };
                assert_same(name, &map, pos, ours, want);
                stats.compared += n;
            }
            pos += n;
        }
    }

    // Unaligned reads around every write, through the disk and through the image itself.
    for &(o, l) in probes {
        for (a, b) in [
            (o.saturating_sub(777), o + 1234),
            ((o + l / 2).saturating_sub(1), o + l / 2 + 2),
            ((o + l).saturating_sub(999), o + l + 555),
        ] {
            let b = b.min(size);
            if b <= a {
                continue;
            }
            let len = usize::try_from(b - a).expect("probe fits");
            let mut w = vec![0u8; len];
            raw.read_exact_at(&mut w, a).expect("reading the reference");
            let mut r = vec![0u8; len];
            disk.read_at(a, &mut r)
                .unwrap_or_else(|e| panic!("{name}: read at {a:#x}+{len:#x} failed: {e}"));
            assert_same(&format!("{name} (disk probe)"), &map, a, &r, &w);
            disk.top()
                .read_at(a, &mut r)
                .unwrap_or_else(|e| panic!("{name}: read at {a:#x}+{len:#x} failed: {e}"));
            assert_same(&format!("{name} (image probe)"), &map, a, &r, &w);
        }
    }
    disk.close()
        .unwrap_or_else(|e| panic!("{name}: close failed: {e}"));
    eprintln!(
        "{name}: {} MiB compared with qemu, {} MiB of shared holes checked as zeros, {} extents, \
         {:.2?}",
        stats.compared / MIB,
        stats.zero_checked / MIB,
        map.len(),
        t.elapsed()
    );
}

/// Builds `spec` with qemu and checks our reading of it.
fn check_spec(spec: &Spec) {
    let t = Instant::now();
    let dir = TempDir::new().expect("temporary directory");
    let (image, reference) = build(dir.path(), spec);
    let built = t.elapsed();
    let probes: Vec<(u64, u64)> = spec.ops.iter().map(|op| op.range()).collect();
    verify(spec.name, &image, &reference, &spec.expect(), &probes);
    eprintln!(
        "{}: qemu took {built:.2?}, total {:.2?}",
        spec.name,
        t.elapsed()
    );
}

// ---------------------------------------------------------------------------------------------
// The matrix: dynamic images
// ---------------------------------------------------------------------------------------------

/// 1 MiB blocks, 512-byte sectors: chunk ratio 4096, so block 4096 (at 4 GiB) has BAT index 4097.
#[test]
fn dynamic_1m_blocks_6g_beyond_the_first_chunk() {
    check_spec(&Spec {
        name: "dyn_1m_6g",
        size: 6 * GIB,
        fixed: false,
        block_size: MIB,
        block_state_zero: None,
        ops: vec![
            Op::Unique(0, 64 * KIB),
            Op::Fill(MIB - 512, 512, 0x11),
            Op::Unique(2 * MIB - 512, 1024),
            Op::Fill(3 * MIB, 2 * MIB, 0x33),
            Op::Zero(3 * MIB + 512 * KIB, MIB),
            Op::Unique(4 * GIB - 768 * KIB, 1536 * KIB),
            Op::Fill(5 * GIB, MIB, 0xab),
            Op::Discard(5 * GIB + 256 * KIB, 256 * KIB),
            Op::Unique(5 * GIB + 3 * MIB + 4 * KIB, 4 * KIB),
            Op::Unique(6 * GIB - MIB - 512, MIB + 512),
        ],
    });
}

/// As above with NOT_PRESENT blocks: the first and last block of both chunks, and one in the
/// middle of the second.
#[test]
fn dynamic_1m_blocks_6g_block_state_zero_off() {
    check_spec(&Spec {
        name: "dyn_1m_6g_nz",
        size: 6 * GIB,
        fixed: false,
        block_size: MIB,
        block_state_zero: Some(false),
        ops: vec![
            Op::Unique(0, 4 * KIB),
            Op::Unique(4 * GIB - 4 * KIB, 4 * KIB),
            Op::Unique(4 * GIB, 4 * KIB),
            Op::Fill(5 * GIB, MIB, 0xab),
            Op::Unique(5 * GIB + 7 * MIB - 512, 3 * MIB + 1024),
            Op::Zero(5 * GIB + 8 * MIB, 512 * KIB),
            Op::Unique(6 * GIB - 512, 512),
        ],
    });
}

/// 32 MiB blocks: chunk ratio 128, the chunk boundary is again at 4 GiB.
#[test]
fn dynamic_32m_blocks_6g() {
    check_spec(&Spec {
        name: "dyn_32m_6g",
        size: 6 * GIB,
        fixed: false,
        block_size: 32 * MIB,
        block_state_zero: Some(true),
        ops: vec![
            Op::Fill(MIB - 512, 512, 0x22),
            Op::Unique(32 * MIB - 512, 1024),
            Op::Fill(64 * MIB, 32 * MIB, 0x44),
            Op::Zero(64 * MIB, 32 * MIB),
            Op::Unique(4 * GIB - 4 * KIB, 8 * KIB),
            Op::Fill(5 * GIB, MIB, 0xab),
            Op::Discard(5 * GIB, 512 * KIB),
            Op::Unique(6 * GIB - 32 * MIB - 4 * KIB, 8 * KIB),
        ],
    });
}

/// 2 MiB blocks over 101 MiB: the last block is half outside the disk.
#[test]
fn dynamic_2m_blocks_partial_last_block() {
    check_spec(&Spec {
        name: "dyn_2m_101m",
        size: 101 * MIB,
        fixed: false,
        block_size: 2 * MIB,
        block_state_zero: Some(false),
        ops: vec![
            Op::Fill(MIB - 512, 512, 0x5a),
            Op::Unique(2 * MIB - 512, 512),
            Op::Unique(4 * MIB - KIB, 2 * KIB),
            Op::Unique(10 * MIB, 6 * MIB + 4 * KIB),
            Op::Zero(12 * MIB, 2 * MIB),
            Op::Discard(14 * MIB, 2 * MIB),
            Op::Unique(100 * MIB + 512 * KIB, 512 * KIB),
        ],
    });
}

/// 256 MiB blocks: chunk ratio 16; a write across the first block boundary, a sub-sector
/// write, and the partial last block.
#[test]
fn dynamic_256m_blocks() {
    check_spec(&Spec {
        name: "dyn_256m_600m",
        size: 600 * MIB,
        fixed: false,
        block_size: 256 * MIB,
        block_state_zero: None,
        ops: vec![
            Op::Fill(MIB - 512, 512, 0x66),
            Op::Zero(MIB, MIB),
            Op::Unique(100 * MIB + 100, 3000),
            Op::Unique(256 * MIB - 64 * KIB, 128 * KIB),
            Op::Fill(512 * MIB + 80 * MIB, MIB, 0x77),
            Op::Unique(600 * MIB - 4 * KIB, 4 * KIB),
        ],
    });
}

// ---------------------------------------------------------------------------------------------
// The matrix: fixed images
// ---------------------------------------------------------------------------------------------

#[test]
fn fixed_1m_blocks() {
    check_spec(&Spec {
        name: "fixed_1m_64m",
        size: 64 * MIB,
        fixed: true,
        block_size: MIB,
        block_state_zero: None,
        ops: vec![
            Op::Unique(0, 4 * KIB),
            Op::Fill(MIB - 512, 512, 0x42),
            Op::Unique(8 * MIB - 2 * KIB, 4 * KIB),
            Op::Fill(10 * MIB, MIB, 0x24),
            Op::Zero(10 * MIB + 512 * KIB, 512 * KIB),
            Op::Discard(20 * MIB, MIB),
            Op::Unique(63 * MIB + 512 * KIB, 512 * KIB),
        ],
    });
}

#[test]
fn fixed_2m_blocks_block_state_zero_off() {
    check_spec(&Spec {
        name: "fixed_2m_72m_nz",
        size: 72 * MIB,
        fixed: true,
        block_size: 2 * MIB,
        block_state_zero: Some(false),
        ops: vec![
            Op::Fill(MIB - 512, 512, 0x13),
            Op::Unique(2 * MIB - 4 * KIB, 8 * KIB),
            Op::Zero(6 * MIB, 2 * MIB),
            Op::Unique(40 * MIB + 512, 512),
            Op::Unique(72 * MIB - 3 * MIB, 3 * MIB),
        ],
    });
}

#[test]
fn fixed_32m_blocks_block_state_zero_off() {
    check_spec(&Spec {
        name: "fixed_32m_96m_nz",
        size: 96 * MIB,
        fixed: true,
        block_size: 32 * MIB,
        block_state_zero: Some(false),
        ops: vec![
            Op::Unique(32 * MIB - 512, 1024),
            Op::Fill(MIB - 512, 512, 0x31),
            Op::Discard(32 * MIB, MIB),
            Op::Unique(96 * MIB - 4 * KIB, 4 * KIB),
        ],
    });
}

#[test]
fn fixed_256m_blocks_partial_last_block() {
    check_spec(&Spec {
        name: "fixed_256m_300m",
        size: 300 * MIB,
        fixed: true,
        block_size: 256 * MIB,
        block_state_zero: Some(true),
        ops: vec![
            Op::Fill(MIB - 512, 512, 0x99),
            Op::Unique(256 * MIB - 512, 1024),
            Op::Fill(290 * MIB, MIB, 0xef),
            Op::Unique(300 * MIB - 512, 512),
        ],
    });
}

// ---------------------------------------------------------------------------------------------
// Dirty logs
// ---------------------------------------------------------------------------------------------

/// Whether two files hold the same bytes.
fn same_bytes(a: &Path, b: &Path) -> bool {
    let (fa, fb) = (
        File::open(a).expect("opening a"),
        File::open(b).expect("opening b"),
    );
    let len = fa.metadata().expect("metadata").len();
    if len != fb.metadata().expect("metadata").len() {
        return false;
    }
    let mut ba = vec![0u8; CHUNK as usize];
    let mut bb = vec![0u8; CHUNK as usize];
    let mut pos = 0;
    while pos < len {
        let n = usize::try_from((len - pos).min(CHUNK)).expect("chunk fits");
        fa.read_exact_at(&mut ba[..n], pos).expect("reading a");
        fb.read_exact_at(&mut bb[..n], pos).expect("reading b");
        if ba[..n] != bb[..n] {
            return false;
        }
        pos += n as u64;
    }
    true
}

/// The image's typed details as JSON.
fn details_json(img: &dyn vd_core::Image) -> serde_json::Value {
    serde_json::to_value(img.details()).expect("details as JSON")
}

fn log_details(disk_or_image: &serde_json::Value) -> (bool, String) {
    let log = disk_or_image
        .get("log")
        .unwrap_or_else(|| panic!("details without a log: {disk_or_image}"));
    (
        log.get("dirty")
            .and_then(serde_json::Value::as_bool)
            .unwrap_or_else(|| panic!("log without dirty: {log}")),
        log.get("replay")
            .and_then(serde_json::Value::as_str)
            .unwrap_or_else(|| panic!("log without replay: {log}"))
            .to_string(),
    )
}

/// A dirty-log image from [`dirty_vhdx`], whose `[0, len)` is allocated after replay.
fn check_dirty_log(name: &str, log: &DirtyLog<'_>, len: u64) {
    let t = Instant::now();
    let dir = TempDir::new().expect("temporary directory");
    let image = dir.path().join(format!("{name}.vhdx"));
    dirty_vhdx(&image, log);

    // QEMU's replay, for the reference.
    let replayed = dir.path().join(format!("{name}-qemu-replayed.vhdx"));
    let reference = dir.path().join(format!("{name}.raw"));
    sparse_copy(&image, &replayed);
    // Exits non-zero when it repaired something; the plain check below must pass.
    let _ = output("qemu-img", &["check", "-r", "all", s(&replayed)]);
    run_ok("qemu-img", &["check", s(&replayed)]);
    qemu::vhdx_to_raw(&replayed, &reference);
    // Still dirty: qemu refuses a read-only open of the original.
    let still_dirty = output(
        "qemu-io",
        &["-r", "-f", "vhdx", "-c", "read -q 0 512", s(&image)],
    );
    assert!(
        !still_dirty.status.success(),
        "{name}: the generator did not leave a dirty log"
    );

    let pristine = dir.path().join(format!("{name}-pristine.vhdx"));
    sparse_copy(&image, &pristine);
    let expect = DataExpect::Covers(vec![(0, len)]);
    let probes = [(0, len), (len, MIB)];

    // 1. Read-only: replayed in memory, the file untouched.
    {
        let disk = open_ro(&image);
        let (dirty, replay) = log_details(&details_json(disk.top()));
        assert!(dirty, "{name}: the log is not reported dirty");
        assert_eq!(
            replay, "memory",
            "{name}: a read-only open must replay in memory"
        );
        assert!(
            !disk.top().warnings().is_empty(),
            "{name}: an in-memory replay should be reported as a warning"
        );
        disk.close().expect("close");
    }
    verify(
        &format!("{name} (read-only, log replayed in memory)"),
        &image,
        &reference,
        &expect,
        &probes,
    );
    assert!(
        same_bytes(&image, &pristine),
        "{name}: a read-only open modified the image file"
    );

    // 2. Read-write through the registry: replayed into the file, the log cleared.
    let img = Registry::builtin()
        .open(&image, OpenFlags::empty())
        .unwrap_or_else(|e| panic!("{name}: read-write open failed: {e}"));
    let (dirty, replay) = log_details(&details_json(img.as_ref()));
    assert!(dirty, "{name}: the log is not reported dirty");
    assert_eq!(
        replay, "file",
        "{name}: a read-write open must replay into the file"
    );
    img.close(false)
        .unwrap_or_else(|e| panic!("{name}: close failed: {e}"));
    assert!(
        !same_bytes(&image, &pristine),
        "{name}: a read-write open left the dirty image unchanged"
    );

    // 3. Clean now: for us, and for qemu.
    {
        let disk = open_ro(&image);
        let (dirty, replay) = log_details(&details_json(disk.top()));
        assert!(
            !dirty,
            "{name}: the log is still dirty after a read-write open"
        );
        assert_eq!(replay, "none", "{name}");
        disk.close().expect("close");
    }
    verify(
        &format!("{name} (after our replay)"),
        &image,
        &reference,
        &expect,
        &probes,
    );
    run_ok("qemu-img", &["check", s(&image)]);
    // qemu reads our replayed file as it read its own (raw against raw: `qemu-img compare`
    // skips the holes, which it cannot do against a VHDX).
    let ours = dir.path().join(format!("{name}-ours.raw"));
    qemu::vhdx_to_raw(&image, &ours);
    run_ok(
        "qemu-img",
        &[
            "compare",
            "-q",
            "-f",
            "raw",
            "-F",
            "raw",
            s(&ours),
            s(&reference),
        ],
    );
    eprintln!("{name}: total {:.2?}", t.elapsed());
}

#[test]
fn dirty_log_defaults() {
    // 64 MiB, 0xab over [0, 1 MiB).
    check_dirty_log("dirty_default", &DirtyLog::default(), MIB);
}

#[test]
fn dirty_log_256m_0x5a_3m() {
    let log = DirtyLog {
        size: 256 * MIB,
        opts: None,
        pattern: 0x5a,
        len: 3 * MIB,
        replayed: 3 * MIB,
    };
    check_dirty_log("dirty_256m", &log, 3 * MIB);
}

#[test]
fn dirty_log_2g_0xe7_17m() {
    // qemu picks 16 MiB blocks for 2 GiB, and the write spans two blocks. Only block 0's BAT
    // update reaches the log before the injected failure stops qemu, so after replay only
    // [0, 16 MiB) holds the pattern: block 1's payload was written to the file, but its BAT
    // entry still says ZERO, so [16 MiB, 17 MiB) must read as zeros (qemu's reference agrees).
    let log = DirtyLog {
        size: 2 * GIB,
        opts: None,
        pattern: 0xe7,
        len: 17 * MIB,
        replayed: 16 * MIB,
    };
    check_dirty_log("dirty_2g", &log, 16 * MIB);
}
