//! Crash tests for the VHD write path: scripted workloads (allocating writes, overwrites,
//! differencing writes with sector bitmaps, discards, write-zeroes, UUID, geometry and parent
//! edits, flushes) run on a fault-injecting storage that loses power after every possible
//! number of mutating operations (or a seeded sample of them). Each cut restarts with the
//! unflushed writes dropped, kept, a seeded random subset kept, reordered (old-over-new), or
//! torn at 512- or 4096-byte sectors; the image must then open for writing, pass our check,
//! read every write that a completed flush covered, and read every other 512-byte sector as
//! its flushed contents or as one of the contents written to it since. A crash during create
//! must never leave a file that opens as a healthy disk with wrong contents. Committing a
//! child into its parent is cut the same way on the parent.

use std::path::Path;
use std::sync::Arc;

use backend_vhd as _;
use vd_core::testing::crash::{
    CrashModel, CrashSubject, assert_checks_clean, check_commit_survives_crashes,
    check_create_survives_crashes, create_child, cut_points, loss_modes, open_rw,
};
use vd_core::testing::{FaultyStorage, LossMode, fill_pattern};
use vd_core::{CreateParams, Disk, Geometry, MemFileSystem, MemStorage, Registry};

const CHILD: &str = "/crash/child.vhd";
const PARENT: &str = "/crash/parent.vhd";
const SIZE: u64 = 6 << 20;

#[derive(Clone, Copy, Debug)]
enum Step {
    Write(u64, u64, u8),
    Discard(u64, u64),
    Zero(u64, u64),
    Flush,
    /// A new unique ID (the footer and its copy).
    Uuid,
    /// A new CHS geometry (the footer and its copy).
    Geometry,
    /// The parent recorded again (locators, then the header; differencing images).
    ParentName,
}

/// Allocations (several blocks in one write, and one at a time), overwrites, partial blocks,
/// sector-bitmap updates, a discard, zeroes.
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

/// Footer and header edits with data written around them.
const EDITS: &[Step] = &[
    Step::Write(0, 8192, 1),
    Step::Write(2 << 20, 1 << 20, 2),
    Step::Flush,
    Step::Uuid,
    Step::ParentName,
    Step::Write(4096, 4096, 3),
    Step::Geometry,
    Step::Discard(2 << 20, 1 << 19),
    Step::Flush,
    Step::Write(1 << 20, 4096, 4),
    Step::Uuid,
    Step::Write(5 << 20, 4096, 5),
    Step::Flush,
    Step::Write(512, 512, 6),
];

fn options() -> CreateParams {
    CreateParams {
        size: SIZE,
        options: [("block_size".to_string(), "512K".to_string())].into(),
        ..CreateParams::default()
    }
}

/// Builds the parent (with a pattern) in `fs`, returns its contents.
fn make_parent(fs: &Arc<MemFileSystem>) -> Vec<u8> {
    let reg = Registry::builtin_with_provider(fs.clone());
    let p = reg
        .create("vhd", Path::new(PARENT), &options(), None, true)
        .unwrap();
    let mut data = vec![0u8; SIZE as usize];
    fill_pattern(&mut data[..(SIZE / 2) as usize], 0, 0x77);
    p.write_at(0, &data).unwrap();
    p.close(false).unwrap();
    data
}

/// Runs `script` on a fresh image, cutting the power after `cut` mutations (None: never).
/// Returns the file system (for the parent), the storage and the model.
fn run(
    script: &[Step],
    differencing: bool,
    cut: Option<u64>,
) -> (Arc<MemFileSystem>, Arc<FaultyStorage>, CrashModel) {
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
        create_child(&reg, "vhd", CHILD, PARENT, &options())
            .close(false)
            .unwrap();
        open_rw(&reg, CHILD).unwrap()
    } else {
        let c = reg
            .create("vhd", Path::new(CHILD), &options(), None, true)
            .unwrap();
        Disk::from_layers(vec![c]).unwrap()
    };
    img.flush().unwrap();
    if let Some(n) = cut {
        faulty.cut_power_after(n);
    }
    let mut model = CrashModel::new(initial);
    for step in script {
        let top = img.top();
        let r = match *step {
            Step::Write(off, len, seed) => {
                let mut buf = vec![0u8; len as usize];
                fill_pattern(&mut buf, off, seed);
                model.wrote(off, &buf);
                img.write_at(off, &buf)
            }
            Step::Discard(off, len) | Step::Zero(off, len) => {
                model.wrote(off, &vec![0u8; len as usize]);
                // A differencing VHD cannot discard: its zeros are written.
                if matches!(step, Step::Discard(..)) && !differencing {
                    img.discard(off, len)
                } else {
                    img.write_zeroes(off, len)
                }
            }
            Step::Flush => {
                let r = img.flush();
                if r.is_ok() {
                    model.flushed();
                }
                r
            }
            Step::Uuid => top.set_uuid(uuid::Uuid::new_v4()),
            Step::Geometry => top.set_pchs_geometry(Geometry {
                cylinders: 200,
                heads: 4,
                sectors: 17,
            }),
            Step::ParentName if differencing => top.set_parent_filename("parent.vhd"),
            Step::ParentName => Ok(()),
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
    (fs, faulty, model)
}

fn verify(script: &[Step], differencing: bool, cut: u64, mode: LossMode) {
    let (fs, faulty, model) = run(script, differencing, Some(cut));
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
    // The image opens for writing, and the check finds nothing wrong.
    let disk = open_rw(&reg, CHILD).unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
    assert_checks_clean(disk.top(), &ctx);
    let size = disk.size();
    let mut buf = vec![0u8; SIZE.min(size) as usize];
    disk.read_at(0, &mut buf).unwrap();
    model.check(size, &buf, &ctx);
    disk.close().unwrap_or_else(|e| panic!("{ctx}: close: {e}"));
}

fn mutations(script: &[Step], differencing: bool) -> u64 {
    let (_, faulty, _) = run(script, differencing, None);
    faulty.mutation_count()
}

/// Cuts at every mutation of `script`, or at `sample` seeded ones when there are more.
fn cut_everywhere(script: &[Step], differencing: bool, sample: Option<u64>) {
    let n = mutations(script, differencing);
    assert!(n > 20, "the script makes {n} mutations");
    for cut in cut_points(n, sample) {
        for mode in loss_modes(cut) {
            verify(script, differencing, cut, mode);
        }
    }
}

#[test]
fn dynamic_survives_a_crash_at_every_write() {
    cut_everywhere(SCRIPT, false, None);
}

#[test]
fn differencing_survives_a_crash_at_every_write() {
    cut_everywhere(SCRIPT, true, None);
}

#[test]
fn footer_and_header_edits_survive_a_crash_at_every_write() {
    cut_everywhere(EDITS, false, None);
    cut_everywhere(EDITS, true, None);
}

#[test]
fn committing_into_the_parent_survives_a_crash_at_every_write() {
    check_commit_survives_crashes(&CrashSubject {
        format: "vhd",
        params: options(),
    });
}

#[test]
fn a_crash_while_creating_never_yields_a_healthy_looking_disk() {
    check_create_survives_crashes(&CrashSubject {
        format: "vhd",
        params: options(),
    });
}
