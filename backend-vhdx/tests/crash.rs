//! Crash tests: a scripted workload (allocating writes, overwrites, differencing writes,
//! discards, write-zeroes, flushes) runs on a fault-injecting storage that loses power after
//! every possible number of mutating operations. Each cut restarts with the unflushed writes
//! dropped, kept, or a seeded random subset kept; the image must then open (replaying its log),
//! pass our check, and read every write that a completed flush covered. A crash during create
//! must never leave a file that opens as a healthy disk with wrong contents.

use std::path::Path;
use std::sync::Arc;

use backend_vhdx as _;
use vd_core::testing::{FaultyStorage, LossMode, fill_pattern};
use vd_core::{
    CreateParams, Disk, DiskOptions, ImageFlags, MemFileSystem, MemStorage, OpenFlags, Registry,
    Severity,
};

const CHILD: &str = "/crash/child.vhdx";
const PARENT: &str = "/crash/parent.vhdx";
const SIZE: u64 = 6 << 20;

#[derive(Clone, Copy, Debug)]
enum Step {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Zero(u64, u64),
    Flush,
}

/// Allocations, overwrites, partial and whole blocks, sector-bitmap updates, a discard, zeroes.
const SCRIPT: &[Step] = &[
    Step::Write(0, 4096, 1),
    Step::Write(1 << 20, 3 << 19, 2),
    Step::Flush,
    Step::Write(512, 1024, 3),
    Step::Write(3 << 20, 1 << 20, 4),
    Step::Write(5 << 20, 8192, 5),
    Step::Flush,
    Step::Discard(3 << 20, 1 << 20),
    Step::Write(2 << 20, 4096, 6),
    Step::Zero(1 << 20, 65536),
    Step::Flush,
    Step::Write(4 << 20, 1 << 20, 7),
    Step::Write(100 * 512, 512, 8),
];

fn options() -> CreateParams {
    CreateParams {
        size: SIZE,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    }
}

/// Builds the parent (with a pattern) in `fs`, returns its contents.
fn make_parent(fs: &Arc<MemFileSystem>) -> Vec<u8> {
    let reg = Registry::builtin_with_provider(fs.clone());
    let p = reg
        .create("vhdx", Path::new(PARENT), &options(), None, true)
        .unwrap();
    let mut data = vec![0u8; SIZE as usize];
    fill_pattern(&mut data[..(SIZE / 2) as usize], 0, 0x77);
    p.write_at(0, &data).unwrap();
    p.close(false).unwrap();
    data
}

/// Runs the script on a fresh image, cutting the power after `cut` mutations (None: never).
/// Returns the storage, the durable model and the bytes changed since the last flush.
fn run(
    differencing: bool,
    cut: Option<u64>,
) -> (Arc<MemFileSystem>, Arc<FaultyStorage>, Vec<u8>, Vec<bool>) {
    let fs = Arc::new(MemFileSystem::new());
    let initial = if differencing {
        make_parent(&fs)
    } else {
        vec![0u8; SIZE as usize]
    };
    let reg = Registry::builtin_with_provider(fs.clone());
    let faulty = Arc::new(FaultyStorage::new());
    fs.insert(CHILD, faulty.clone());
    let img = if differencing {
        let parent = reg.open(Path::new(PARENT), OpenFlags::READ_ONLY).unwrap();
        let params = CreateParams {
            image_flags: ImageFlags::DIFF,
            ..options()
        };
        let c = reg
            .create(
                "vhdx",
                Path::new(CHILD),
                &params,
                Some((Path::new(PARENT), parent.as_ref())),
                true,
            )
            .unwrap();
        c.close(false).unwrap();
        Disk::open(
            &reg,
            Path::new(CHILD),
            &DiskOptions {
                flags: OpenFlags::empty(),
                ..DiskOptions::default()
            },
        )
        .unwrap()
    } else {
        let c = reg
            .create("vhdx", Path::new(CHILD), &options(), None, true)
            .unwrap();
        Disk::from_layers(vec![c]).unwrap()
    };
    img.flush().unwrap();
    if let Some(n) = cut {
        faulty.cut_power_after(n);
    }
    let mut model = initial.clone();
    let mut durable = initial;
    let mut dirty = vec![false; SIZE as usize];
    for step in SCRIPT {
        let r = match *step {
            Step::Write(off, len, seed) => {
                let mut buf = vec![0u8; len as usize];
                fill_pattern(&mut buf, off, seed);
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                dirty[off as usize..(off + len) as usize].fill(true);
                img.write_at(off, &buf)
            }
            Step::Discard(off, len) | Step::Zero(off, len) => {
                model[off as usize..(off + len) as usize].fill(0);
                dirty[off as usize..(off + len) as usize].fill(true);
                if matches!(step, Step::Discard(..)) {
                    img.discard(off, len)
                } else {
                    img.write_zeroes(off, len)
                }
            }
            Step::Flush => {
                let r = img.flush();
                if r.is_ok() {
                    durable.copy_from_slice(&model);
                    dirty.fill(false);
                }
                r
            }
        };
        if r.is_err() {
            assert!(
                faulty.is_powered_off(),
                "{step:?} failed without a fault: {r:?}"
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
    (fs, faulty, durable, dirty)
}

fn verify(differencing: bool, cut: u64, mode: LossMode) {
    let (fs, faulty, durable, dirty) = run(differencing, Some(cut));
    let fs2 = Arc::new(MemFileSystem::new());
    fs2.insert(CHILD, Arc::new(faulty.restart(mode)));
    if differencing {
        let p = fs.get(Path::new(PARENT)).unwrap();
        let mut bytes = vec![0u8; p.len().unwrap() as usize];
        p.read_exact_at(0, &mut bytes).unwrap();
        fs2.insert(PARENT, Arc::new(MemStorage::from_bytes(bytes)));
    }
    let reg = Registry::builtin_with_provider(fs2);
    let ctx = format!("differencing={differencing} cut={cut} {mode:?}");
    // A read-write open replays the log; the check then finds nothing wrong.
    let disk = Disk::open(
        &reg,
        Path::new(CHILD),
        &DiskOptions {
            flags: OpenFlags::empty(),
            ..DiskOptions::default()
        },
    )
    .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    let report = disk.top().repair(true).unwrap();
    let errors: Vec<_> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error && !f.repaired)
        .collect();
    assert!(errors.is_empty(), "{ctx}: check: {errors:?}");
    let mut buf = vec![0u8; SIZE as usize];
    disk.read_at(0, &mut buf).unwrap();
    for i in 0..buf.len() {
        if !dirty[i] && buf[i] != durable[i] {
            panic!(
                "{ctx}: flushed byte {i:#x} is {:#04x}, expected {:#04x}",
                buf[i], durable[i]
            );
        }
    }
    disk.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
}

fn mutations(differencing: bool) -> u64 {
    let (_, faulty, _, _) = run(differencing, None);
    faulty.mutation_count()
}

fn cut_everywhere(differencing: bool) {
    let n = mutations(differencing);
    assert!(n > 20, "the script makes {n} mutations");
    for cut in 0..=n {
        for mode in [
            LossMode::DropAll,
            LossMode::KeepAll,
            LossMode::Random(cut * 7919 + 1),
            LossMode::Random(cut + 17),
        ] {
            verify(differencing, cut, mode);
        }
    }
}

#[test]
fn dynamic_survives_a_crash_at_every_write() {
    cut_everywhere(false);
}

#[test]
fn differencing_survives_a_crash_at_every_write() {
    cut_everywhere(true);
}

#[test]
fn a_crash_while_creating_never_yields_a_healthy_looking_disk() {
    // Count the mutations of a complete create.
    let count = {
        let fs = Arc::new(MemFileSystem::new());
        let faulty = Arc::new(FaultyStorage::new());
        fs.insert(CHILD, faulty.clone());
        let reg = Registry::builtin_with_provider(fs);
        let img = reg
            .create("vhdx", Path::new(CHILD), &options(), None, true)
            .unwrap();
        let n = faulty.mutation_count();
        img.close(false).unwrap();
        n
    };
    for cut in 0..count {
        for mode in [LossMode::DropAll, LossMode::KeepAll, LossMode::Random(cut)] {
            let fs = Arc::new(MemFileSystem::new());
            let faulty = Arc::new(FaultyStorage::new());
            fs.insert(CHILD, faulty.clone());
            faulty.cut_power_after(cut);
            let reg = Registry::builtin_with_provider(fs);
            let created = reg.create("vhdx", Path::new(CHILD), &options(), None, true);
            assert!(created.is_err(), "cut {cut} of {count}: create succeeded");
            let fs2 = Arc::new(MemFileSystem::new());
            fs2.insert(CHILD, Arc::new(faulty.restart(mode)));
            let reg2 = Registry::builtin_with_provider(fs2);
            // Either the file is refused, or it is a complete, empty disk of the right size.
            if let Ok(img) = reg2.open_as("vhdx", Path::new(CHILD), OpenFlags::READ_ONLY) {
                assert_eq!(img.size(), SIZE, "cut {cut} {mode:?}");
                let mut buf = vec![1u8; SIZE as usize];
                img.read_at(0, &mut buf).unwrap();
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "cut {cut} {mode:?}: a half-created disk reads data"
                );
            }
        }
    }
}
