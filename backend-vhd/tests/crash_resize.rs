//! Crash tests for resizing and compacting VHD images: scripted workloads (allocating writes,
//! discards, a grow past the BAT's spare entries so that the BAT moves, a shrink, a grow back,
//! compaction, flushes) run on a fault-injecting storage that loses power after every mutating
//! operation. Each cut restarts with the unflushed writes dropped, kept, a seeded subset kept,
//! reordered, or torn at 512- or 4096-byte sectors; the image must then open for writing
//! without a warning (its end footer whole), pass our check, have a size the script allowed,
//! read every flushed write, and read every other sector as flushed or as written since. A resize and a compaction are durable when they return.

use std::path::Path;
use std::sync::Arc;

use backend_vhd as _;
use vd_core::testing::crash::{CrashModel, assert_checks_clean, cut_points, loss_modes};
use vd_core::testing::{FaultyStorage, LossMode, fill_pattern};
use vd_core::{
    CreateParams, Disk, DiskOptions, ImageFlags, MemFileSystem, MemStorage, OpenFlags, Registry,
};

const CHILD: &str = "/crash/child.vhd";
const PARENT: &str = "/crash/parent.vhd";
const MIB: u64 = 1 << 20;
const KIB: u64 = 1 << 10;
/// The disk's size at creation.
const SIZE: u64 = 4 * MIB;
/// The part of the disk the model follows (writes stay inside it).
const MODEL: u64 = 8 * MIB;
/// Past 64 MiB, 512 KiB blocks need more than the 128 entries of the BAT's sector.
const GROWN: u64 = 80 * MIB;

#[derive(Clone, Copy, Debug)]
enum Step {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Zero(u64, u64),
    Flush,
    Resize(u64),
    Compact,
}

use Step::{Compact, Discard, Flush, Resize, Write, Zero};

/// Dynamic images: the BAT moves, blocks are allocated after it, compaction moves them below
/// it, a shrink releases blocks and a grow back reuses the BAT's spare entries.
const DYNAMIC: &[Step] = &[
    Write(0, 4096, 1),
    Write(MIB, 600 * KIB, 2),
    Flush,
    Write(512, 1024, 3),
    Write(3 * MIB, 512 * KIB, 4),
    Discard(3 * MIB, 512 * KIB),
    Resize(GROWN),
    Write(6 * MIB, 4096, 5),
    Flush,
    Discard(MIB, 512 * KIB),
    Compact,
    Write(4096, 512, 6),
    Discard(2 * MIB, GROWN - 2 * MIB),
    Resize(2 * MIB),
    Resize(5 * MIB),
    Write(4 * MIB, 512, 7),
    Compact,
    Write(8192, 512, 8),
];

/// Fixed images: grow, write in the grown part, zero and shrink, grow back.
const FIXED: &[Step] = &[
    Write(0, 4096, 1),
    Flush,
    Write(SIZE - 512, 512, 2),
    Resize(6 * MIB),
    Write(5 * MIB, 4096, 3),
    Flush,
    Write(4096, 512, 4),
    Discard(3 * MIB, 3 * MIB),
    Resize(3 * MIB),
    Write(8192, 512, 5),
    Resize(7 * MIB),
    Write(6 * MIB, 512, 6),
];

/// Differencing images: the same moves, with zeros written instead of discards.
const DIFFERENCING: &[Step] = &[
    Write(0, 4096, 1),
    Write(MIB, 600 * KIB, 2),
    Flush,
    Resize(GROWN),
    Write(6 * MIB, 4096, 3),
    Flush,
    Zero(MIB, 512 * KIB),
    Compact,
    Write(512, 512, 4),
    Zero(6 * MIB, 4096),
    Resize(5 * MIB),
    Resize(6 * MIB),
    Write(5 * MIB, 512, 5),
    Compact,
];

fn params(fixed: bool) -> CreateParams {
    let opt = if fixed {
        ("subformat", "fixed")
    } else {
        ("block_size", "512K")
    };
    CreateParams {
        size: SIZE,
        options: [(opt.0.to_string(), opt.1.to_string())].into(),
        ..CreateParams::default()
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Fixed,
    Dynamic,
    Differencing,
}

fn script(kind: Kind) -> &'static [Step] {
    match kind {
        Kind::Fixed => FIXED,
        Kind::Dynamic => DYNAMIC,
        Kind::Differencing => DIFFERENCING,
    }
}

/// The parent's contents: a pattern over its first half.
fn parent_data() -> Vec<u8> {
    let mut data = vec![0u8; SIZE as usize];
    fill_pattern(&mut data[..(SIZE / 2) as usize], 0, 0x77);
    data
}

fn parent_bytes() -> Vec<u8> {
    let fs = Arc::new(MemFileSystem::new());
    let reg = Registry::builtin_with_provider(fs.clone());
    let p = reg
        .create("vhd", Path::new(PARENT), &params(false), None, true)
        .unwrap();
    p.write_at(0, &parent_data()).unwrap();
    p.close(false).unwrap();
    let s = fs.get(Path::new(PARENT)).unwrap();
    let mut b = vec![0u8; s.len().unwrap() as usize];
    s.read_exact_at(0, &mut b).unwrap();
    b
}

/// A file system holding the parent (for differencing runs) and `child` at CHILD.
fn file_system(kind: Kind, parent: &[u8], child: Arc<dyn vd_core::Storage>) -> Registry {
    let fs = Arc::new(MemFileSystem::new());
    if kind == Kind::Differencing {
        fs.insert(PARENT, Arc::new(MemStorage::from_bytes(parent.to_vec())));
    }
    fs.insert(CHILD, child);
    Registry::builtin_with_provider(fs)
}

fn open(reg: &Registry, flags: OpenFlags) -> vd_core::Result<Disk> {
    Disk::open(
        reg,
        Path::new(CHILD),
        &DiskOptions {
            flags,
            ..DiskOptions::default()
        },
    )
}

/// Runs the script on a fresh image, cutting the power after `cut` mutations (None: never).
fn run(kind: Kind, parent: &[u8], cut: Option<u64>) -> (Arc<FaultyStorage>, CrashModel) {
    let faulty = Arc::new(FaultyStorage::new());
    let reg = file_system(kind, parent, faulty.clone());
    let created = if kind == Kind::Differencing {
        let p = reg.open(Path::new(PARENT), OpenFlags::READ_ONLY).unwrap();
        let params = CreateParams {
            image_flags: ImageFlags::DIFF,
            size: 0,
            ..params(false)
        };
        reg.create(
            "vhd",
            Path::new(CHILD),
            &params,
            Some((Path::new(PARENT), p.as_ref())),
            true,
        )
        .unwrap()
    } else {
        reg.create(
            "vhd",
            Path::new(CHILD),
            &params(kind == Kind::Fixed),
            None,
            true,
        )
        .unwrap()
    };
    created.close(false).unwrap();
    let img = open(&reg, OpenFlags::empty()).unwrap();
    if let Some(n) = cut {
        faulty.cut_power_after(n);
    }
    let mut initial = if kind == Kind::Differencing {
        parent_data()
    } else {
        Vec::new()
    };
    initial.resize(MODEL as usize, 0);
    let mut model = CrashModel::with_size(initial, SIZE);
    for step in script(kind) {
        let top = img.top();
        let r = match *step {
            Write(off, len, seed) => {
                let mut buf = vec![0u8; len as usize];
                fill_pattern(&mut buf, off, seed);
                model.wrote(off, &buf);
                top.write_at(off, &buf)
            }
            Discard(off, len) | Zero(off, len) => {
                model.wrote(off, &vec![0u8; len.min(MODEL) as usize]);
                if matches!(step, Discard(..)) {
                    top.discard(off, len)
                } else {
                    top.write_zeroes(off, len)
                }
            }
            Flush => top.flush().inspect(|()| model.flushed()),
            Resize(size) => {
                model.resized(size);
                top.resize(size, &mut |_, _| {})
                    .inspect(|()| model.flushed())
            }
            Compact => top.compact(&mut |_, _| {}).inspect(|()| model.flushed()),
        };
        if let Err(e) = r {
            assert!(
                faulty.is_powered_off(),
                "{step:?} failed without a fault: {e}"
            );
            break;
        }
    }
    if cut.is_none() {
        img.close().unwrap();
    } else {
        faulty.cut_power_now();
        drop(img);
    }
    (faulty, model)
}

fn verify(kind: Kind, parent: &[u8], cut: u64, mode: LossMode) {
    let (faulty, model) = run(kind, parent, Some(cut));
    let reg = file_system(kind, parent, Arc::new(faulty.restart(mode)));
    let ctx = format!("{kind:?} cut={cut} {mode:?}");
    let disk = open(&reg, OpenFlags::empty()).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    let w = disk.top().warnings();
    assert!(w.is_empty(), "{ctx}: warnings {w:?}");
    // The check finds no error (leaked blocks of an interrupted allocation or move are
    // warnings, reclaimed by the next compact).
    assert_checks_clean(disk.top(), &ctx);
    let size = disk.size();
    let mut buf = vec![0u8; MODEL.min(size) as usize];
    disk.read_at(0, &mut buf).unwrap();
    model.check(size, &buf, &ctx);
    if size > MODEL {
        // Nothing was written past the model's part: the grown end reads as zeros.
        let mut tail = vec![1u8; MIB as usize];
        disk.read_at(size - MIB, &mut tail).unwrap();
        assert!(tail.iter().all(|&b| b == 0), "{ctx}: the grown end");
    }
    // The image still takes writes that survive a reopen.
    disk.top().write_at(0, &[0x5A; 512]).unwrap();
    disk.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
}

/// Cuts at every mutation of the script.
fn cut_everywhere(kind: Kind) {
    let parent = if kind == Kind::Differencing {
        parent_bytes()
    } else {
        Vec::new()
    };
    let (faulty, model) = run(kind, &parent, None);
    let n = faulty.mutation_count();
    assert!(n > 20, "the script makes {n} mutations");
    // The whole script ran: its last resize took effect.
    assert_eq!(model.sizes().len(), 1, "{kind:?}");
    for cut in cut_points(n, None) {
        for mode in loss_modes(cut) {
            verify(kind, &parent, cut, mode);
        }
    }
}

#[test]
fn fixed_resize_survives_a_crash_at_every_write() {
    cut_everywhere(Kind::Fixed);
}

#[test]
fn dynamic_resize_and_compact_survive_a_crash_at_every_write() {
    cut_everywhere(Kind::Dynamic);
}

#[test]
fn differencing_resize_and_compact_survive_a_crash_at_every_write() {
    cut_everywhere(Kind::Differencing);
}
