//! What crash tests share: a model of what a disk may read after a power cut, the loss modes a
//! cut is restarted under, the cut points of a script, the chain helpers, and two whole tests
//! any format with differencing images runs: commit into a parent, and create, each cut at
//! every write.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use super::{FaultyStorage, LossMode, SplitMix64, fill_pattern};
use crate::{
    CreateParams, Disk, DiskOptions, ExtentKind, Finding, Image, ImageFlags, MemFileSystem,
    OpenFlags, Registry, Result, Severity,
};

const SECTOR: usize = 512;

/// What a disk may read after a crash: each 512-byte sector's flushed contents, or the contents
/// it had after any write since the last completed flush; and the flushed size or any size set
/// since. The model tracks the first `initial.len()` bytes of the disk.
#[derive(Debug, Clone)]
pub struct CrashModel {
    now: Vec<u8>,
    durable: Vec<u8>,
    since_flush: BTreeMap<usize, Vec<Vec<u8>>>,
    sizes: Vec<u64>,
}

impl CrashModel {
    /// A disk of `initial.len()` bytes holding `initial`, all of it flushed.
    pub fn new(initial: Vec<u8>) -> Self {
        let size = initial.len() as u64;
        Self::with_size(initial, size)
    }

    /// A disk of `size` bytes whose first `initial.len()` bytes (the part tracked) hold
    /// `initial`, all of it flushed.
    pub fn with_size(initial: Vec<u8>, size: u64) -> Self {
        Self {
            durable: initial.clone(),
            now: initial,
            since_flush: BTreeMap::new(),
            sizes: vec![size],
        }
    }

    /// Records that `[off, off + data.len())` now holds `data` (the part past the tracked bytes
    /// is not kept).
    pub fn wrote(&mut self, off: u64, data: &[u8]) {
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        let end = off.saturating_add(data.len()).min(self.now.len());
        if off >= end {
            return;
        }
        self.now[off..end].copy_from_slice(&data[..end - off]);
        for s in off / SECTOR..end.div_ceil(SECTOR) {
            let to = ((s + 1) * SECTOR).min(self.now.len());
            let now = self.now[s * SECTOR..to].to_vec();
            self.since_flush.entry(s).or_default().push(now);
        }
    }

    /// Records a new disk size.
    pub fn resized(&mut self, size: u64) {
        self.sizes.push(size);
    }

    /// Records a completed flush: everything written and the last size set are durable.
    pub fn flushed(&mut self) {
        self.durable.clone_from(&self.now);
        self.since_flush.clear();
        let size = self.sizes.last().copied().unwrap_or(0);
        self.sizes = vec![size];
    }

    /// The flushed contents of the tracked bytes.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// The sizes a crash may leave: the flushed one, then each set since.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Whether nothing was written since the last flush.
    pub fn is_settled(&self) -> bool {
        self.since_flush.is_empty()
    }

    /// Fails, naming `ctx`, unless a disk of `size` bytes whose first bytes are `buf` is a
    /// state the model allows.
    ///
    /// # Panics
    ///
    /// When it is not.
    #[track_caller]
    pub fn check(&self, size: u64, buf: &[u8], ctx: &str) {
        assert!(
            self.sizes.contains(&size),
            "{ctx}: size {size} is none of {:?}",
            self.sizes
        );
        for (s, got) in buf.chunks(SECTOR).enumerate() {
            let at = s * SECTOR;
            let old = self
                .durable
                .get(at..at + got.len())
                .unwrap_or(&[0u8; SECTOR][..got.len()]);
            if got == old {
                continue;
            }
            let new = self.since_flush.get(&s);
            assert!(
                new.is_some_and(|v| v.iter().any(|n| n.as_slice() == got)),
                "{ctx}: sector {s} (byte {at:#x}) is neither its flushed contents{} ({} \
                 candidates)",
                if new.is_some() {
                    " nor any written since"
                } else {
                    " (flushed, unchanged since)"
                },
                new.map_or(0, Vec::len)
            );
        }
    }
}

/// The loss modes a cut at `cut` is restarted under: the whole-write ones, reordering, and
/// tearing at 512- and 4096-byte sectors, each seeded by `cut`.
pub fn loss_modes(cut: u64) -> [LossMode; 7] {
    [
        LossMode::DropAll,
        LossMode::KeepAll,
        LossMode::Random(cut.wrapping_mul(7919).wrapping_add(1)),
        LossMode::Random(cut.wrapping_add(17)),
        LossMode::Reorder(cut.wrapping_mul(31).wrapping_add(5)),
        LossMode::Torn {
            seed: cut.wrapping_mul(131).wrapping_add(3),
            sector: 512,
        },
        LossMode::TornReordered {
            seed: cut.wrapping_mul(977).wrapping_add(11),
            sector: 4096,
        },
    ]
}

/// The cut points of a script of `mutations` mutating operations: every one (0 to
/// `mutations`), or `sample` seeded ones when `sample` is given and smaller.
pub fn cut_points(mutations: u64, sample: Option<u64>) -> Vec<u64> {
    match sample {
        Some(k) if k < mutations => {
            let mut r = SplitMix64::new(mutations);
            (0..k).map(|_| r.next_u64() % (mutations + 1)).collect()
        }
        _ => (0..=mutations).collect(),
    }
}

/// A format under crash test: its name and the parameters of its images (`params.size` is
/// the disk size).
#[derive(Debug, Clone)]
pub struct CrashSubject<'a> {
    /// The backend's name.
    pub format: &'a str,
    /// What images are created with.
    pub params: CreateParams,
}

const CHILD: &str = "/crash/child";
const PARENT: &str = "/crash/parent";

/// Builds the parent (a pattern over its first half) in `fs`, returns its contents.
fn make_parent(subject: &CrashSubject<'_>, fs: &Arc<MemFileSystem>) -> Vec<u8> {
    let reg = Registry::builtin_with_provider(fs.clone());
    let p = reg
        .create(
            subject.format,
            Path::new(PARENT),
            &subject.params,
            None,
            true,
        )
        .unwrap();
    let size = subject.params.size as usize;
    let mut data = vec![0u8; size];
    fill_pattern(&mut data[..size / 2], 0, 0x77);
    p.write_at(0, &data).unwrap();
    p.close(false).unwrap();
    data
}

/// A new differencing image of `format` at `child` whose parent is the image at `parent`,
/// created with `params` (the differencing flag set here).
pub fn create_child(
    reg: &Registry,
    format: &str,
    child: &str,
    parent: &str,
    params: &CreateParams,
) -> Box<dyn Image> {
    let p = reg
        .open(Path::new(parent), OpenFlags::READ_ONLY)
        .expect("open the parent");
    let params = CreateParams {
        image_flags: ImageFlags::DIFF,
        ..params.clone()
    };
    reg.create(
        format,
        Path::new(child),
        &params,
        Some((Path::new(parent), p.as_ref())),
        true,
    )
    .expect("create the child")
}

/// The image at `path`, with its parents, as a read-write disk (a dirty log is replayed).
///
/// # Errors
/// Errors opening the chain.
pub fn open_rw(reg: &Registry, path: &str) -> Result<Disk> {
    Disk::open(
        reg,
        Path::new(path),
        &DiskOptions {
            flags: OpenFlags::empty(),
            ..DiskOptions::default()
        },
    )
}

/// Checks `img` and fails naming `ctx` when the check finds an error it did not repair.
///
/// # Panics
///
/// When it does, or the check fails.
#[track_caller]
pub fn assert_checks_clean(img: &dyn Image, ctx: &str) {
    let report = img.repair(true).expect("check");
    let errors: Vec<&Finding> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error && !f.repaired)
        .collect();
    assert!(errors.is_empty(), "{ctx}: check: {errors:?}");
}

/// Checks commit (a child merged into its parent) as vd-tool does it: the child's data and zero
/// extents are written into the parent through the chain, then the parent is flushed. The
/// power is cut on the parent at every write; the parent must then open, check clean, read
/// as the model allows, and read the whole child once the commit completed. The disk is at
/// least 6 MiB.
///
/// # Panics
///
/// When any of that fails.
pub fn check_commit_survives_crashes(subject: &CrashSubject<'_>) {
    let (format, size) = (subject.format, subject.params.size);
    assert!(size >= 6 << 20, "the commit script writes up to 6 MiB");
    let commit = |cut: Option<u64>| {
        let fs = Arc::new(MemFileSystem::new());
        let before = make_parent(subject, &fs);
        let reg = Registry::builtin_with_provider(fs.clone());
        // The child: data over the parent's pattern and past it, and a zeroed block.
        {
            let c = create_child(&reg, format, CHILD, PARENT, &subject.params);
            let mut buf = vec![0u8; 3 << 19];
            fill_pattern(&mut buf, 1 << 19, 0x31);
            c.write_at(1 << 19, &buf).unwrap();
            let mut buf = vec![0u8; 8192];
            fill_pattern(&mut buf, 5 << 20, 0x32);
            c.write_at(5 << 20, &buf).unwrap();
            c.write_zeroes(2 << 20, 1 << 20).unwrap();
            c.close(false).unwrap();
        }
        // The parent on fault-injecting storage, holding what it holds now.
        let p = fs.get(Path::new(PARENT)).unwrap();
        let mut bytes = vec![0u8; p.len().unwrap() as usize];
        p.read_exact_at(0, &mut bytes).unwrap();
        let faulty = Arc::new(FaultyStorage::from_bytes(bytes));
        fs.insert(PARENT, faulty.clone());
        let chain = Disk::open(
            &reg,
            Path::new(CHILD),
            &DiskOptions {
                writable_parent: true,
                ..DiskOptions::default()
            },
        )
        .unwrap();
        let mut expected = vec![0u8; size as usize];
        chain.read_at(0, &mut expected).unwrap();
        let mut model = CrashModel::new(before);
        if let Some(n) = cut {
            faulty.cut_power_after(n);
        }
        let [child, parent, ..] = chain.layers() else {
            panic!("a chain of two")
        };
        let result = (|| -> Result<()> {
            for e in child.map(0, size)? {
                let (off, len) = (e.offset, e.length);
                let data = &expected[off as usize..(off + len) as usize];
                match e.kind {
                    ExtentKind::Data => {
                        model.wrote(off, data);
                        parent.write_at(off, data)?;
                    }
                    ExtentKind::Zero => {
                        model.wrote(off, data);
                        parent.write_zeroes(off, len)?;
                    }
                    ExtentKind::Unallocated => {}
                }
            }
            parent.flush()?;
            model.flushed();
            Ok(())
        })();
        match cut {
            None => {
                result.unwrap();
                chain.close().unwrap();
            }
            Some(_) => {
                assert!(result.is_ok() || faulty.is_powered_off(), "{result:?}");
                faulty.cut_power_now();
                drop(chain);
            }
        }
        (faulty, model, expected)
    };
    let (faulty, _, expected) = commit(None);
    let n = faulty.mutation_count();
    assert!(n > 5, "commit makes {n} mutations");
    for cut in 0..=n {
        let (faulty, model, _) = commit(Some(cut));
        for mode in loss_modes(cut) {
            let ctx = format!("commit cut={cut} {mode:?}");
            let fs = Arc::new(MemFileSystem::new());
            fs.insert(PARENT, Arc::new(faulty.restart(mode)));
            let reg = Registry::builtin_with_provider(fs);
            let p = reg
                .open_as(format, Path::new(PARENT), OpenFlags::empty())
                .unwrap_or_else(|e| panic!("{ctx}: reopen: {e}"));
            assert_checks_clean(p.as_ref(), &ctx);
            let mut buf = vec![0u8; size as usize];
            p.read_at(0, &mut buf).unwrap();
            model.check(size, &buf, &ctx);
            if model.is_settled() && model.durable() == expected.as_slice() {
                assert_eq!(buf, expected, "{ctx}: a completed commit");
            }
            p.close(false).unwrap();
        }
    }
}

/// Checks that a create cut at any write never leaves a file that opens as a healthy disk
/// with wrong contents: either it is refused, or it is a complete, empty disk of the size
/// asked for.
///
/// # Panics
///
/// When a cut create opens with another size or reads data.
pub fn check_create_survives_crashes(subject: &CrashSubject<'_>) {
    let (format, size) = (subject.format, subject.params.size);
    // Count the mutations of a complete create.
    let count = {
        let fs = Arc::new(MemFileSystem::new());
        let faulty = Arc::new(FaultyStorage::new());
        fs.insert(CHILD, faulty.clone());
        let reg = Registry::builtin_with_provider(fs);
        let img = reg
            .create(format, Path::new(CHILD), &subject.params, None, true)
            .unwrap();
        let n = faulty.mutation_count();
        img.close(false).unwrap();
        n
    };
    for cut in 0..count {
        for mode in loss_modes(cut) {
            let fs = Arc::new(MemFileSystem::new());
            let faulty = Arc::new(FaultyStorage::new());
            fs.insert(CHILD, faulty.clone());
            faulty.cut_power_after(cut);
            let reg = Registry::builtin_with_provider(fs);
            let created = reg.create(format, Path::new(CHILD), &subject.params, None, true);
            assert!(created.is_err(), "cut {cut} of {count}: create succeeded");
            let fs2 = Arc::new(MemFileSystem::new());
            fs2.insert(CHILD, Arc::new(faulty.restart(mode)));
            let reg2 = Registry::builtin_with_provider(fs2);
            // Either the file is refused, or it is a complete, empty disk of the right size.
            if let Ok(img) = reg2.open_as(format, Path::new(CHILD), OpenFlags::READ_ONLY) {
                assert_eq!(img.size(), size, "cut {cut} {mode:?}");
                let mut buf = vec![1u8; size as usize];
                img.read_at(0, &mut buf).unwrap();
                assert!(
                    buf.iter().all(|&b| b == 0),
                    "cut {cut} {mode:?}: a half-created disk reads data"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_allows_flushed_or_written_contents_only() {
        let mut m = CrashModel::new(vec![0u8; 2048]);
        m.wrote(512, &[1u8; 512]);
        m.wrote(512, &[2u8; 512]);
        let mut buf = vec![0u8; 2048];
        m.check(2048, &buf, "nothing landed");
        buf[512..1024].fill(1);
        m.check(2048, &buf, "the first write landed");
        buf[0] = 9;
        let r = std::panic::catch_unwind(|| m.check(2048, &buf, "garbage"));
        assert!(r.is_err(), "a sector nobody wrote changed");
        m.flushed();
        assert!(m.is_settled());
        assert_eq!(&m.durable()[512..1024], &[2u8; 512][..]);
        let r = std::panic::catch_unwind(|| m.check(2048, &vec![0u8; 2048], "lost"));
        assert!(r.is_err(), "a flushed write was lost");
        m.resized(4096);
        m.check(4096, m.durable(), "the new size");
        m.check(2048, m.durable(), "the old size");
    }

    #[test]
    fn cut_points_are_all_or_a_seeded_sample() {
        assert_eq!(cut_points(3, None), vec![0, 1, 2, 3]);
        assert_eq!(cut_points(3, Some(10)), vec![0, 1, 2, 3]);
        let s = cut_points(100, Some(5));
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|&c| c <= 100));
        assert_eq!(s, cut_points(100, Some(5)), "the sample is seeded");
    }
}
