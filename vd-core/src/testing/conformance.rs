//! The backend conformance suite (VirtualBox's `tstVDIo` idea): random sequences of operations
//! run against a backend and against a plain `Vec<u8>` model, which must agree byte for byte.
//!
//! A backend's tests describe how to create and open its images with a [`Subject`] and call
//! [`check_sequences`] and [`check_power_loss`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};

use super::{FaultyStorage, LossMode, fill_pattern};
use crate::disk::{Disk, DiskOptions};
use crate::error::Result;
use crate::flags::OpenFlags;
use crate::registry::Registry;
use crate::storage::{MemFileSystem, MemStorage, Storage, StorageProvider};

/// What the suite tests: one way of making images of one backend.
pub trait Subject: Send + Sync {
    /// A short description for failure messages.
    fn name(&self) -> String;

    /// The registry to open images with, on `provider` (by default the static table).
    fn registry(&self, provider: Arc<dyn StorageProvider>) -> Registry {
        Registry::builtin_with_provider(provider)
    }

    /// Creates an image of `size` bytes at `path` (and whatever parents it needs, elsewhere)
    /// and returns it opened read-write. Its contents must equal [`initial`](Subject::initial).
    ///
    /// # Errors
    /// Errors creating the image.
    fn create(&self, registry: &Registry, path: &Path, size: u64) -> Result<Disk>;

    /// Opens the image at `path`.
    ///
    /// # Errors
    /// Errors opening the image.
    fn open(&self, registry: &Registry, path: &Path, read_only: bool) -> Result<Disk> {
        let flags = if read_only {
            OpenFlags::READ_ONLY
        } else {
            OpenFlags::empty()
        };
        Disk::open(
            registry,
            path,
            &DiskOptions {
                flags,
                ..DiskOptions::default()
            },
        )
    }

    /// The contents of a newly created image.
    fn initial(&self, size: u64) -> Vec<u8> {
        vec![0; usize::try_from(size).unwrap_or(0)]
    }

    /// Smallest and largest virtual sizes to try (multiples of [`alignment`](Subject::alignment)).
    fn size_range(&self) -> (u64, u64) {
        (64 * 1024, 8 << 20)
    }

    /// Granularity of generated offsets, lengths and sizes.
    fn alignment(&self) -> u64 {
        512
    }

    /// Whether discard is tested (it must make ranges read as zeros).
    fn supports_discard(&self) -> bool {
        true
    }

    /// Whether resize is tested (growing reads zeros in the new part).
    fn supports_resize(&self) -> bool {
        true
    }
}

/// One step of a generated sequence. Offsets and lengths are raw numbers, scaled to the disk
/// size and the subject's alignment when run.
#[derive(Debug, Clone)]
pub enum Op {
    /// Write a pattern.
    Write {
        /// Raw offset.
        off: u64,
        /// Raw length.
        len: u64,
        /// Pattern seed.
        seed: u8,
    },
    /// Read and compare.
    Read {
        /// Raw offset.
        off: u64,
        /// Raw length.
        len: u64,
    },
    /// Flush.
    Flush,
    /// Close and open again.
    Reopen,
    /// Discard a range (it must read as zeros afterwards).
    Discard {
        /// Raw offset.
        off: u64,
        /// Raw length.
        len: u64,
    },
    /// Write zeros over a range.
    WriteZeroes {
        /// Raw offset.
        off: u64,
        /// Raw length.
        len: u64,
    },
    /// Change the virtual size.
    Resize {
        /// Raw new size.
        size: u64,
    },
}

fn op_strategy() -> impl Strategy<Value = Op> {
    let off = any::<u64>();
    // Mostly small requests, sometimes several MiB.
    let len = prop_oneof![4 => 1u64..=64 * 1024, 2 => 1u64..=(1 << 20), 1 => 1u64..=(5 << 20)];
    prop_oneof![
        8 => (off, len.clone(), any::<u8>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        4 => (off, len.clone()).prop_map(|(off, len)| Op::Read { off, len }),
        2 => Just(Op::Flush),
        1 => Just(Op::Reopen),
        2 => (off, len.clone()).prop_map(|(off, len)| Op::Discard { off, len }),
        1 => (off, len).prop_map(|(off, len)| Op::WriteZeroes { off, len }),
        1 => any::<u64>().prop_map(|size| Op::Resize { size }),
    ]
}

/// Turns raw `(off, len)` into an aligned in-range request; `None` for an empty disk.
fn scale(off: u64, len: u64, size: u64, align: u64) -> Option<(u64, u64)> {
    let units = size / align;
    if units == 0 {
        return None;
    }
    let o = (off % units) * align;
    let l = (len.div_ceil(align) * align).clamp(align, size - o);
    Some((o, l))
}

fn usize_of(v: u64) -> usize {
    usize::try_from(v).expect("test sizes fit in memory")
}

fn err(subject: &dyn Subject, step: usize, op: &Op, e: impl std::fmt::Display) -> TestCaseError {
    TestCaseError::fail(format!("{}: step {step} ({op:?}): {e}", subject.name()))
}

fn compare(
    subject: &dyn Subject,
    what: &str,
    disk: &Disk,
    model: &[u8],
    off: u64,
    len: u64,
) -> std::result::Result<(), TestCaseError> {
    let mut buf = vec![0u8; usize_of(len)];
    disk.read_at(off, &mut buf).map_err(|e| {
        TestCaseError::fail(format!("{}: {what}: read failed: {e}", subject.name()))
    })?;
    let want = &model[usize_of(off)..usize_of(off + len)];
    if let Some(i) = buf.iter().zip(want).position(|(a, b)| a != b) {
        return Err(TestCaseError::fail(format!(
            "{}: {what}: byte at {:#x} is {:#04x}, expected {:#04x}",
            subject.name(),
            off + i as u64,
            buf[i],
            want[i]
        )));
    }
    Ok(())
}

const PATH: &str = "/conformance/image";

/// Runs one sequence against the subject and the model.
///
/// # Errors
/// A description of the first disagreement or failure.
pub fn run_sequence(
    subject: &dyn Subject,
    size: u64,
    ops: &[Op],
) -> std::result::Result<(), TestCaseError> {
    let fs = Arc::new(MemFileSystem::new());
    let registry = subject.registry(fs.clone());
    let path = PathBuf::from(PATH);
    let align = subject.alignment();
    let (min_size, max_size) = subject.size_range();
    let mut disk = subject
        .create(&registry, &path, size)
        .map_err(|e| TestCaseError::fail(format!("{}: create {size}: {e}", subject.name())))?;
    let mut model = subject.initial(size);
    let mut size = size;
    for (step, op) in ops.iter().enumerate() {
        match *op {
            Op::Write { off, len, seed } => {
                let Some((o, l)) = scale(off, len, size, align) else {
                    continue;
                };
                let mut buf = vec![0u8; usize_of(l)];
                fill_pattern(&mut buf, o, seed);
                disk.write_at(o, &buf)
                    .map_err(|e| err(subject, step, op, e))?;
                model[usize_of(o)..usize_of(o + l)].copy_from_slice(&buf);
            }
            Op::Read { off, len } => {
                let Some((o, l)) = scale(off, len, size, align) else {
                    continue;
                };
                compare(
                    subject,
                    &format!("step {step} ({op:?})"),
                    &disk,
                    &model,
                    o,
                    l,
                )?;
            }
            Op::Flush => disk.flush().map_err(|e| err(subject, step, op, e))?,
            Op::Reopen => {
                disk.close().map_err(|e| err(subject, step, op, e))?;
                disk = subject
                    .open(&registry, &path, false)
                    .map_err(|e| err(subject, step, op, e))?;
                prop_assert_eq!(disk.size(), size, "{}: size after reopen", subject.name());
            }
            Op::Discard { off, len } => {
                if !subject.supports_discard() {
                    continue;
                }
                let Some((o, l)) = scale(off, len, size, align) else {
                    continue;
                };
                disk.discard(o, l).map_err(|e| err(subject, step, op, e))?;
                model[usize_of(o)..usize_of(o + l)].fill(0);
            }
            Op::WriteZeroes { off, len } => {
                let Some((o, l)) = scale(off, len, size, align) else {
                    continue;
                };
                disk.write_zeroes(o, l)
                    .map_err(|e| err(subject, step, op, e))?;
                model[usize_of(o)..usize_of(o + l)].fill(0);
            }
            Op::Resize { size: raw } => {
                if !subject.supports_resize() {
                    continue;
                }
                // Grow only: shrinking may be refused when the cut-off part holds data.
                let new = (size + raw % (max_size - min_size + 1)).min(max_size) / align * align;
                if new <= size {
                    continue;
                }
                disk.top()
                    .resize(new, &mut |_, _| {})
                    .map_err(|e| err(subject, step, op, e))?;
                model.resize(usize_of(new), 0);
                size = new;
                prop_assert_eq!(disk.size(), size, "{}: size after resize", subject.name());
            }
        }
    }
    compare(subject, "final read", &disk, &model, 0, size)?;
    disk.close()
        .map_err(|e| TestCaseError::fail(format!("{}: close: {e}", subject.name())))?;
    let disk = subject
        .open(&registry, &path, true)
        .map_err(|e| TestCaseError::fail(format!("{}: read-only reopen: {e}", subject.name())))?;
    compare(subject, "after read-only reopen", &disk, &model, 0, size)?;
    disk.close()
        .map_err(|e| TestCaseError::fail(format!("{}: close: {e}", subject.name())))?;
    Ok(())
}

fn runner(cases: u32) -> TestRunner {
    TestRunner::new(Config {
        cases,
        failure_persistence: None,
        max_shrink_iters: 2000,
        ..Config::default()
    })
}

fn size_strategy(subject: &dyn Subject) -> impl Strategy<Value = u64> + use<> {
    let (lo, hi) = subject.size_range();
    let align = subject.alignment();
    (lo / align..=hi / align).prop_map(move |u| u * align)
}

/// Runs `cases` random sequences against `subject`.
///
/// # Panics
/// On the first (shrunk) failing sequence, with a description of the disagreement.
pub fn check_sequences(subject: &dyn Subject, cases: u32) {
    let strategy = (
        size_strategy(subject),
        prop::collection::vec(op_strategy(), 1..40),
    );
    let result = runner(cases).run(&strategy, |(size, ops)| run_sequence(subject, size, &ops));
    if let Err(e) = result {
        panic!("conformance failed for {}: {e}", subject.name());
    }
}

/// Runs a sequence on a [`FaultyStorage`], cuts the power after `cut` mutating operations,
/// restarts with `mode`, and checks that the image opens and that every byte the sequence had
/// written and flushed before the cut (and not touched since) reads back.
///
/// # Errors
/// A description of lost data or a failure to reopen.
pub fn run_power_loss(
    subject: &dyn Subject,
    size: u64,
    ops: &[Op],
    cut: u64,
    mode: LossMode,
) -> std::result::Result<(), TestCaseError> {
    let fs = Arc::new(MemFileSystem::new());
    let registry = subject.registry(fs.clone());
    let path = PathBuf::from(PATH);
    let align = subject.alignment();
    let faulty = Arc::new(FaultyStorage::new());
    fs.insert(path.clone(), faulty.clone());
    let disk = subject
        .create(&registry, &path, size)
        .map_err(|e| TestCaseError::fail(format!("{}: create: {e}", subject.name())))?;
    disk.flush()
        .map_err(|e| TestCaseError::fail(format!("{}: flush after create: {e}", subject.name())))?;
    let mut durable = subject.initial(size);
    let mut model = durable.clone();
    // Bytes changed since the last completed flush: after the crash they may hold either value.
    let mut dirty = vec![false; usize_of(size)];
    faulty.cut_power_after(cut);
    for op in ops {
        let r = match *op {
            Op::Write { off, len, seed } => {
                let Some((o, l)) = scale(off, len, size, align) else {
                    continue;
                };
                let mut buf = vec![0u8; usize_of(l)];
                fill_pattern(&mut buf, o, seed);
                let (a, b) = (usize_of(o), usize_of(o + l));
                dirty[a..b].fill(true);
                let r = disk.write_at(o, &buf);
                model[a..b].copy_from_slice(&buf);
                r
            }
            Op::Discard { off, len } | Op::WriteZeroes { off, len } => {
                let Some((o, l)) = scale(off, len, size, align) else {
                    continue;
                };
                let (a, b) = (usize_of(o), usize_of(o + l));
                dirty[a..b].fill(true);
                let r = if matches!(op, Op::Discard { .. }) && subject.supports_discard() {
                    disk.discard(o, l)
                } else {
                    disk.write_zeroes(o, l)
                };
                model[a..b].fill(0);
                r
            }
            Op::Flush | Op::Reopen => {
                let r = disk.flush();
                if r.is_ok() {
                    durable.copy_from_slice(&model);
                    dirty.fill(false);
                }
                r
            }
            Op::Read { .. } | Op::Resize { .. } => Ok(()),
        };
        if r.is_err() {
            if faulty.is_powered_off() {
                break;
            }
            return Err(TestCaseError::fail(format!(
                "{}: {op:?} failed without a fault: {}",
                subject.name(),
                r.err().map(|e| e.to_string()).unwrap_or_default()
            )));
        }
    }
    faulty.cut_power_now();
    // Dropping an image on dead storage must not panic.
    drop(disk);
    // Restart: the same files, the crashed one as it would be found on the medium.
    let fs2 = Arc::new(MemFileSystem::new());
    for p in fs.paths() {
        let s: Arc<dyn Storage> = if p == path {
            Arc::new(faulty.restart(mode))
        } else {
            let src = fs.get(&p).expect("listed path exists");
            let mut bytes = vec![0u8; usize_of(src.len().expect("length"))];
            src.read_exact_at(0, &mut bytes).expect("copy parent");
            Arc::new(MemStorage::from_bytes(bytes))
        };
        fs2.insert(p, s);
    }
    let registry2 = subject.registry(fs2);
    let disk = subject.open(&registry2, &path, false).map_err(|e| {
        TestCaseError::fail(format!(
            "{}: reopen after power loss (cut {cut}, {mode:?}): {e}",
            subject.name()
        ))
    })?;
    let mut buf = vec![0u8; usize_of(size)];
    disk.read_at(0, &mut buf).map_err(|e| {
        TestCaseError::fail(format!("{}: read after power loss: {e}", subject.name()))
    })?;
    for i in 0..buf.len() {
        let ok = if dirty[i] {
            // Any value written since the flush, or the durable one; only check durable data
            // was not replaced by something unrelated when nothing was written there.
            true
        } else {
            buf[i] == durable[i]
        };
        if !ok {
            return Err(TestCaseError::fail(format!(
                "{}: flushed byte at {i:#x} lost after power loss (cut {cut}, {mode:?}): {:#04x}, expected {:#04x}",
                subject.name(),
                buf[i],
                durable[i]
            )));
        }
    }
    disk.close().map_err(|e| {
        TestCaseError::fail(format!("{}: close after power loss: {e}", subject.name()))
    })?;
    Ok(())
}

/// Runs `cases` random power-loss scenarios against `subject`: random sequences, cut at a random
/// mutating operation, restarted with a random [`LossMode`].
///
/// # Panics
/// On the first (shrunk) failing scenario.
pub fn check_power_loss(subject: &dyn Subject, cases: u32) {
    let mode = prop_oneof![
        Just(LossMode::DropAll),
        Just(LossMode::KeepAll),
        any::<u64>().prop_map(LossMode::Random)
    ];
    let strategy = (
        size_strategy(subject),
        prop::collection::vec(op_strategy(), 1..30),
        0u64..200,
        mode,
    );
    let result = runner(cases).run(&strategy, |(size, ops, cut, mode)| {
        run_power_loss(subject, size, &ops, cut, mode)
    });
    if let Err(e) = result {
        panic!("power-loss conformance failed for {}: {e}", subject.name());
    }
}
