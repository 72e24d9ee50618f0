//! The copy engine: copies a virtual [`Disk`] (through its whole chain) into a raw file, an
//! [`Image`], or an in-order stream, as `convert` does; `commit` copies a child's own ranges
//! into its parent through it ([`Source::top_layer`]). `compact` does not copy a disk (it moves
//! blocks within one file) and does not use it.
//!
//! # What it does
//!
//! - **Plans from the map.** The source is mapped one window at a time ([`Image::map_file`]
//!   through every layer, as [`Disk::read_at`] does): ranges that read as zeros (zero extents,
//!   and unallocated ranges that fall through to below the base) are never read. When the
//!   destination already reads as zeros there they are skipped; otherwise they are zeroed
//!   ([`Storage::zero_range`], [`Image::write_zeroes`], or zeros written to the stream).
//! - **Large requests.** Contiguous data is coalesced into requests of
//!   [`CopyOptions::request_size`] bytes (4 MiB by default), cut at multiples of that size so
//!   requests line up with the destination's blocks; the last one may be short (unaligned disk
//!   sizes are copied to the byte).
//! - **Skips zeros on both sides.** Within a request, runs of [`CopyOptions::sparse_size`]
//!   bytes ([`ZERO_GRANULE`], 4 KiB, by default; on multiples of it) that read as all zeros are
//!   not written to a destination that already reads as zeros there, so holes stay holes; the
//!   non-zero runs between them are written with one call each. A sparse size of 0 writes
//!   every byte (qemu-img convert `-S 0`).
//! - **Overlaps reads and writes.** [`CopyOptions::workers`] threads each take the next request
//!   from a shared planner, read it into a buffer of their own, and write it: while one thread
//!   waits for a read, another writes. A stream destination is written in order: each thread
//!   waits for its request's turn before writing, so reads still overlap the writes.
//! - **Copies file ranges in the kernel** (optional, [`CopyOptions::copy_file_range`]): a
//!   request that is one plain range of a source layer's file (its [`Mapping::Data`] has a file
//!   offset and the layer's [`Storage::host_fd`] is known) and goes to a raw file destination
//!   is copied with `copy_file_range(2)` (a reflink where the file system has them); on
//!   `EXDEV`, `EOPNOTSUPP`, `EINVAL`, `ENOSYS` and the like the engine falls back to reads and
//!   writes for good. Such ranges are copied verbatim, so all-zero data in them is written.
//! - **Starts writeback early.** Every [`CopyOptions::writeback_every`] bytes written, the
//!   destination's dirty pages are queued for writing ([`Storage::start_writeback`],
//!   `sync_file_range(SYNC_FILE_RANGE_WRITE)` for files), so the disk writes while the copy
//!   goes on and the final flush finds little left. This is a hint: durability still comes
//!   only from the caller's flush (for a staged image, [`StagedImage::commit`]), which the engine
//!   never skips or replaces.
//!
//! # Memory
//!
//! Peak memory is a constant, whatever the image size: one page-aligned buffer of
//! `request_size` bytes per worker (16 MiB with the defaults: 4 workers × 4 MiB), plus the map
//! of one planning window (at most [`PLAN_WINDOW`] bytes of the disk; the extents of one window
//! are bounded by the window divided by the smallest extent, a few MiB at worst for a raw
//! source with 4 KiB holes, a few KiB for VHDX), plus a zero block of 64 KiB. See
//! [`CopyOptions::peak_buffer_bytes`].
//!
//! # Errors and the destination
//!
//! The first error stops every worker and is returned with the disk offset it happened at;
//! what was written by then stays written. The caller decides what that means: `convert`
//! writes into a [`StagedImage`] and drops it on error, which deletes the new file and leaves
//! the destination as it was.
//!
//! [`StagedImage`]: crate::StagedImage
//! [`StagedImage::commit`]: crate::StagedImage::commit

use std::collections::VecDeque;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::{Condvar, Mutex};

use crate::disk::Disk;
use crate::error::{Error, ErrorKind, Result};
use crate::image::{Image, check_range};
use crate::mapping::Mapping;
use crate::storage::{OpenMode, Storage, StorageProvider};

/// How much of the disk is mapped at once when planning requests.
pub const PLAN_WINDOW: u64 = 256 << 20;

/// The default request size: 4 MiB.
pub const DEFAULT_REQUEST_SIZE: usize = 4 << 20;

/// The default number of worker threads (and of buffers).
pub const DEFAULT_WORKERS: usize = 4;

/// The default writeback interval: 32 MiB.
pub const DEFAULT_WRITEBACK_EVERY: u64 = 32 << 20;

/// The largest request size accepted: 64 MiB.
pub const MAX_REQUEST_SIZE: usize = 64 << 20;

/// The most worker threads accepted.
pub const MAX_WORKERS: usize = 64;

/// The granularity at which all-zero data is found and not written (when the destination
/// reads as zeros already): a file system block, as qemu-img's default `-S 4k`.
pub const ZERO_GRANULE: u64 = 4096;

/// Page alignment of the buffers.
const PAGE: usize = 4096;

/// A block of zeros, compared against and written from.
static ZEROS: [u8; 64 * 1024] = [0; 64 * 1024];

/// How to copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CopyOptions {
    /// Bytes per request (rounded up to a multiple of 4 KiB; 4 KiB to [`MAX_REQUEST_SIZE`]).
    pub request_size: usize,
    /// Worker threads, each with one buffer of `request_size` bytes (1 to [`MAX_WORKERS`]).
    pub workers: usize,
    /// Start writeback of the destination every this many bytes written (0: never).
    pub writeback_every: u64,
    /// Copy plain file ranges with `copy_file_range(2)` when both ends are host files. Such
    /// ranges are copied verbatim: all-zero data in them is written, not skipped.
    pub copy_file_range: bool,
    /// The sparse threshold (qemu-img convert's `-S`): on a destination that reads as zeros
    /// already, all-zero data is not written in runs of this many bytes, on multiples of it on
    /// the disk ([`ZERO_GRANULE`] by default; use a power of two up to `request_size`). 0 writes
    /// every byte as data, zeros included, even where the source reads as zeros without data:
    /// the destination ends up fully allocated.
    pub sparse_size: u64,
}

impl Default for CopyOptions {
    fn default() -> Self {
        Self {
            request_size: DEFAULT_REQUEST_SIZE,
            workers: DEFAULT_WORKERS,
            writeback_every: DEFAULT_WRITEBACK_EVERY,
            copy_file_range: false,
            sparse_size: ZERO_GRANULE,
        }
    }
}

impl CopyOptions {
    /// The bytes of buffers a copy with these options holds at most: one page-aligned buffer
    /// per worker, plus its alignment slack.
    pub fn peak_buffer_bytes(&self) -> u64 {
        let (req, workers) = self.clamped();
        (req.saturating_add(PAGE) as u64).saturating_mul(workers as u64)
    }

    /// `request_size` and `workers` brought within their limits.
    fn clamped(&self) -> (usize, usize) {
        let req = self
            .request_size
            .clamp(PAGE, MAX_REQUEST_SIZE)
            .checked_next_multiple_of(PAGE)
            .unwrap_or(MAX_REQUEST_SIZE);
        (req, self.workers.clamp(1, MAX_WORKERS))
    }
}

/// What was done, in bytes of the virtual disk.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CopyStats {
    /// Bytes written to the destination (data, and zeros the destination needed).
    pub written: u64,
    /// Bytes not written because the destination already reads as zeros there.
    pub skipped: u64,
    /// Of `written`, the bytes copied by `copy_file_range(2)`.
    pub file_copied: u64,
}

/// Where a copy goes.
pub enum Destination<'a> {
    /// A storage object that holds the disk byte for byte (a raw image's file, a block
    /// device): disk offset = storage offset.
    Raw {
        /// The storage; at least as long as the disk.
        storage: &'a dyn Storage,
        /// Whether it reads as zeros everywhere now (a new sparse file), so zero ranges and
        /// all-zero data are skipped. `false` (a device) zeroes them.
        reads_as_zeros: bool,
    },
    /// An image, written with [`Image::write_at`].
    Image {
        /// The image; at least as large as the disk.
        image: &'a dyn Image,
        /// Whether it reads as zeros everywhere now (a new image).
        reads_as_zeros: bool,
        /// The image's file, if known, for writeback hints only.
        file: Option<&'a dyn Storage>,
    },
    /// A stream of the raw disk, written in order from offset 0 (zeros included).
    Stream(&'a mut (dyn Write + Send)),
}

impl std::fmt::Debug for Destination<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Raw {
                storage,
                reads_as_zeros,
            } => f
                .debug_struct("Raw")
                .field("storage", storage)
                .field("reads_as_zeros", reads_as_zeros)
                .finish(),
            Self::Image {
                image,
                reads_as_zeros,
                ..
            } => f
                .debug_struct("Image")
                .field("image", &image.path())
                .field("reads_as_zeros", reads_as_zeros)
                .finish_non_exhaustive(),
            Self::Stream(_) => f.write_str("Stream"),
        }
    }
}

/// The disk to copy, and where known the storage of each layer's file (for
/// `copy_file_range`).
#[derive(Debug)]
pub struct Source<'a> {
    disk: &'a Disk,
    files: Vec<Option<Arc<dyn Storage>>>,
    /// Only the top layer's own ranges: what it leaves to its parents is left alone.
    top_only: bool,
}

impl<'a> Source<'a> {
    /// A disk whose layers' files are not known: every range is read with [`Disk::read_at`].
    pub fn new(disk: &'a Disk) -> Self {
        Self {
            disk,
            files: Vec::new(),
            top_only: false,
        }
    }

    /// Only what the disk's top layer holds itself (its data and its zero ranges), as
    /// `commit` copies a differencing image into its parent: ranges the top layer leaves to
    /// its parents are neither read nor written, so the destination keeps what it has there.
    pub fn top_layer(disk: &'a Disk) -> Self {
        Self {
            disk,
            files: Vec::new(),
            top_only: true,
        }
    }

    /// A disk whose layers were opened through `tracker`: each layer's storage is the one the
    /// tracker handed out for the layer's path (none where that is not unique).
    pub fn tracked(disk: &'a Disk, tracker: &TrackingProvider) -> Self {
        let files = disk
            .layers()
            .iter()
            .map(|l| tracker.storage(l.path()))
            .collect();
        Self {
            disk,
            files,
            top_only: false,
        }
    }

    /// The disk.
    pub fn disk(&self) -> &'a Disk {
        self.disk
    }

    fn file(&self, layer: usize) -> Option<&dyn Storage> {
        self.files.get(layer).and_then(Option::as_deref)
    }
}

/// A [`StorageProvider`] that remembers the storage objects it opens and creates, by path, so
/// that the copy engine can reach an image's file (a layer's file for `copy_file_range`, a new
/// image's file for writeback hints) without the image exposing it. It holds them weakly:
/// closing an image still closes its file.
#[derive(Debug)]
pub struct TrackingProvider {
    inner: Arc<dyn StorageProvider>,
    opened: Mutex<Vec<(PathBuf, Weak<dyn Storage>)>>,
}

impl TrackingProvider {
    /// Tracks what `inner` opens and creates.
    pub fn new(inner: Arc<dyn StorageProvider>) -> Self {
        Self {
            inner,
            opened: Mutex::new(Vec::new()),
        }
    }

    /// The storage handed out for `path` that is still open, if exactly one is.
    pub fn storage(&self, path: &Path) -> Option<Arc<dyn Storage>> {
        let mut opened = self.opened.lock();
        opened.retain(|(_, w)| w.strong_count() > 0);
        let mut live = opened
            .iter()
            .filter(|(p, _)| p == path)
            .filter_map(|(_, w)| w.upgrade());
        let first = live.next()?;
        live.next().is_none().then_some(first)
    }

    fn record(&self, path: &Path, storage: &Arc<dyn Storage>) {
        let mut opened = self.opened.lock();
        opened.retain(|(_, w)| w.strong_count() > 0);
        opened.push((path.to_path_buf(), Arc::downgrade(storage)));
    }
}

impl StorageProvider for TrackingProvider {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let s = self.inner.open(path, mode)?;
        self.record(path, &s);
        Ok(s)
    }

    fn create(&self, path: &Path, overwrite: bool) -> io::Result<Arc<dyn Storage>> {
        let s = self.inner.create(path, overwrite)?;
        self.record(path, &s);
        Ok(s)
    }

    fn delete(&self, path: &Path) -> io::Result<()> {
        self.inner.delete(path)
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        self.inner.rename(from, to)?;
        for (p, _) in self.opened.lock().iter_mut() {
            if p == from {
                *p = to.to_path_buf();
            }
        }
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.inner.exists(path)
    }

    fn resolve(&self, base: &Path, target: &Path) -> PathBuf {
        self.inner.resolve(base, target)
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.canonicalize(path)
    }

    fn same_file(&self, a: &Path, b: &Path) -> bool {
        self.inner.same_file(a, b)
    }

    fn replace_target(&self, path: &Path) -> io::Result<PathBuf> {
        self.inner.replace_target(path)
    }

    fn create_beside(&self, target: &Path) -> io::Result<(PathBuf, Arc<dyn Storage>)> {
        let (path, s) = self.inner.create_beside(target)?;
        self.record(&path, &s);
        Ok((path, s))
    }
}

/// Where the bytes of one planned piece come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    /// Reads as zeros.
    Zero,
    /// Left to a layer the copy does not include ([`Source::top_layer`]): not copied.
    Keep,
    /// Data in `layer`, at `file` in its file when that is a plain range.
    Data { layer: usize, file: Option<u64> },
}

/// One run of the disk with one source, as the planner found it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Piece {
    offset: u64,
    len: u64,
    from: Origin,
}

/// What one request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Work {
    /// Make the range read as zeros.
    Zero,
    /// Leave the range as the destination has it.
    Keep,
    /// Read the range through the disk and write it.
    Read,
    /// Copy the range from `layer`'s file at `file` with `copy_file_range`.
    FileRange { layer: usize, file: u64 },
}

/// One request, numbered in disk order (streams write in that order).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Job {
    seq: u64,
    offset: u64,
    len: u64,
    work: Work,
}

/// Maps the disk window by window and cuts it into requests.
struct Planner<'s, 'a> {
    src: &'s Source<'a>,
    size: u64,
    /// Next disk offset to map.
    mapped_to: u64,
    pieces: VecDeque<Piece>,
    request: u64,
    /// Whether data may be copied as file ranges.
    file_ranges: bool,
    /// Whether zero ranges cost nothing (the destination reads as zeros already).
    zeros_free: bool,
    seq: u64,
}

fn corrupt(path: &Path, msg: String) -> Error {
    Error::new(ErrorKind::Corrupt, msg).with_path(path)
}

impl<'s, 'a> Planner<'s, 'a> {
    fn new(src: &'s Source<'a>, request: u64, file_ranges: bool, zeros_free: bool) -> Self {
        Self {
            src,
            size: src.disk.size(),
            mapped_to: 0,
            pieces: VecDeque::new(),
            request,
            file_ranges,
            zeros_free,
            seq: 0,
        }
    }

    /// Appends the pieces of `[offset, offset + len)` as layer `index` and those below it see
    /// them. The map must tile the range exactly (it comes from the file: a gap or an overlap
    /// is corruption, never a reason to copy stale bytes).
    fn map_layer(&mut self, index: usize, offset: u64, len: u64) -> Result<()> {
        if index > 0 && self.src.top_only {
            self.push(Piece {
                offset,
                len,
                from: Origin::Keep,
            });
            return Ok(());
        }
        let Some(layer) = self.src.disk.layers().get(index) else {
            self.push(Piece {
                offset,
                len,
                from: Origin::Zero,
            });
            return Ok(());
        };
        // A parent smaller than its child: the rest reads as zeros.
        let avail = layer.size().saturating_sub(offset).min(len);
        let mut expect = offset;
        if avail > 0 {
            for e in layer.map_file(offset, avail)? {
                let end = e.offset.checked_add(e.length);
                if e.offset != expect
                    || e.length == 0
                    || end.is_none_or(|x| x > offset.saturating_add(avail))
                {
                    return Err(corrupt(
                        layer.path(),
                        format!(
                            "map returned extent {:#x}+{:#x} where {expect:#x} was expected \
                             (request {offset:#x}+{avail:#x})",
                            e.offset, e.length
                        ),
                    ));
                }
                expect = end.unwrap_or(expect);
                match e.mapping {
                    Mapping::Data { file_offset } => self.push(Piece {
                        offset: e.offset,
                        len: e.length,
                        from: Origin::Data {
                            layer: index,
                            file: file_offset,
                        },
                    }),
                    Mapping::Zero => self.push(Piece {
                        offset: e.offset,
                        len: e.length,
                        from: Origin::Zero,
                    }),
                    Mapping::Unallocated => {
                        self.map_layer(index.saturating_add(1), e.offset, e.length)?;
                    }
                }
            }
        }
        // offset + avail is within the disk (the window is).
        if expect != offset.saturating_add(avail) {
            return Err(corrupt(
                layer.path(),
                format!("map stopped at {expect:#x}, short of the request"),
            ));
        }
        if avail < len {
            self.push(Piece {
                offset: offset.saturating_add(avail),
                len: len.abs_diff(avail),
                from: Origin::Zero,
            });
        }
        Ok(())
    }

    /// Appends a piece, joining it to the last one when it continues it.
    fn push(&mut self, p: Piece) {
        if p.len == 0 {
            return;
        }
        if let Some(last) = self.pieces.back_mut()
            && last.offset.checked_add(last.len) == Some(p.offset)
            && let Some(len) = last.len.checked_add(p.len)
        {
            let joins = match (last.from, p.from) {
                (Origin::Zero, Origin::Zero) | (Origin::Keep, Origin::Keep) => true,
                (
                    Origin::Data {
                        layer: a,
                        file: Some(fa),
                    },
                    Origin::Data {
                        layer: b,
                        file: Some(fb),
                    },
                ) => a == b && fa.checked_add(last.len) == Some(fb),
                (
                    Origin::Data {
                        layer: a,
                        file: None,
                    },
                    Origin::Data {
                        layer: b,
                        file: None,
                    },
                ) => a == b,
                _ => false,
            };
            if joins {
                last.len = len;
                return;
            }
        }
        self.pieces.push_back(p);
    }

    /// Maps the next window, if any is left; returns whether it did.
    fn refill(&mut self) -> Result<bool> {
        let left = self.size.saturating_sub(self.mapped_to);
        if left == 0 {
            return Ok(false);
        }
        let len = left.min(PLAN_WINDOW);
        let at = self.mapped_to;
        check_range(at, len, self.size)?;
        self.map_layer(0, at, len)?;
        self.mapped_to = at.saturating_add(len);
        Ok(true)
    }

    /// The next request: zeros up to the next data, or up to `request` bytes of data, cut at
    /// a multiple of `request` so that requests line up with the destination's blocks.
    fn next_job(&mut self) -> Result<Option<Job>> {
        // Enough pieces to fill a request, or the end of the disk.
        loop {
            let have = self
                .pieces
                .iter()
                .map(|p| p.len)
                .try_fold(0u64, u64::checked_add);
            if have.is_some_and(|h| h >= self.request) || !self.refill()? {
                break;
            }
        }
        let Some(first) = self.pieces.front().copied() else {
            return Ok(None);
        };
        let offset = first.offset;
        // The end of the request: the next multiple of `request`, or less.
        let cut = offset
            .checked_add(1)
            .and_then(|o| o.checked_next_multiple_of(self.request))
            .unwrap_or(u64::MAX);
        // Zeros a destination skips are not cut at all (skipping costs nothing); zeros it must
        // write are cut like data, so progress moves and streams interleave fairly.
        let zero_cut = if self.zeros_free { u64::MAX } else { cut };
        let work = match first.from {
            Origin::Zero => Work::Zero,
            Origin::Keep => Work::Keep,
            Origin::Data {
                layer,
                file: Some(file),
            } if self.file_ranges && self.src.file(layer).is_some() => {
                Work::FileRange { layer, file }
            }
            Origin::Data { .. } => Work::Read,
        };
        let mut end = offset;
        while let Some(p) = self.pieces.front_mut() {
            let same = match (work, p.from) {
                (Work::Zero, Origin::Zero) | (Work::Keep, Origin::Keep) => true,
                (Work::Zero | Work::Keep, _) | (_, Origin::Zero | Origin::Keep) => false,
                // A file range is one piece: pieces are merged when their file ranges continue.
                (Work::FileRange { .. }, _) => end == offset,
                (Work::Read, _) => true,
            };
            let limit = match work {
                Work::Zero => zero_cut,
                // Kept ranges cost nothing: never cut.
                Work::Keep => u64::MAX,
                Work::Read | Work::FileRange { .. } => cut,
            };
            if !same || end >= limit {
                break;
            }
            let room = limit.saturating_sub(end);
            let take = p.len.min(room);
            end = end.saturating_add(take);
            if take == p.len {
                self.pieces.pop_front();
            } else {
                p.offset = p.offset.saturating_add(take);
                p.len = p.len.saturating_sub(take);
                if let Origin::Data { file: Some(f), .. } = &mut p.from {
                    *f = f.saturating_add(take);
                }
            }
            if matches!(work, Work::Zero | Work::Keep) && self.pieces.is_empty() {
                // Zeros (and kept ranges) may continue in the next window.
                if !self.refill()? {
                    break;
                }
            }
        }
        let job = Job {
            seq: self.seq,
            offset,
            len: end.saturating_sub(offset),
            work,
        };
        self.seq = self.seq.saturating_add(1);
        Ok(Some(job))
    }
}

/// A zeroed buffer of `len` bytes starting on a page boundary, without `unsafe`: the vector
/// holds a page more than asked and the slice starts where the allocation is aligned.
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> Result<Self> {
        let total = len
            .checked_add(PAGE)
            .ok_or_else(|| Error::invalid_argument("copy buffer too large"))?;
        let bytes = vec![0u8; total];
        let start = bytes.as_ptr().align_offset(PAGE).min(PAGE);
        Ok(Self { bytes, start, len })
    }

    fn get(&mut self, n: usize) -> Result<&mut [u8]> {
        let end = self.start.saturating_add(self.len.min(n));
        self.bytes
            .get_mut(self.start..end)
            .ok_or_else(|| Error::invalid_argument("copy buffer"))
    }
}

/// Whether `buf` is all zeros.
fn is_zero(buf: &[u8]) -> bool {
    buf.chunks(ZEROS.len())
        .all(|c| ZEROS.get(..c.len()).is_some_and(|z| z == c))
}

/// `n` as a buffer length.
fn to_usize(n: u64) -> Result<usize> {
    usize::try_from(n).map_err(|_| Error::invalid_argument("request too large"))
}

/// Errors that mean `copy_file_range` cannot be used for these files (rather than that the
/// data cannot be read or written).
fn cfr_unsupported(e: rustix::io::Errno) -> bool {
    use rustix::io::Errno;
    [
        Errno::XDEV,
        Errno::OPNOTSUPP,
        Errno::INVAL,
        Errno::NOSYS,
        Errno::BADF,
        Errno::PERM,
        Errno::TXTBSY,
        Errno::ISDIR,
    ]
    .contains(&e)
}

/// The state the workers share.
struct Shared<'s, 'a, 'd> {
    planner: Mutex<Planner<'s, 'a>>,
    src: &'s Source<'a>,
    dst: Dst<'d>,
    opts: &'s CopyOptions,
    /// Set by the first failure; every worker stops at its next step.
    abort: AtomicBool,
    error: Mutex<Option<Error>>,
    /// Cleared when `copy_file_range` is found not to work for these files.
    file_ranges: AtomicBool,
    written: AtomicU64,
    skipped: AtomicU64,
    file_copied: AtomicU64,
    /// Bytes written since the last writeback hint.
    since_writeback: AtomicU64,
    progress: &'s (dyn Fn(u64) + Sync),
}

/// The destination as the workers see it.
enum Dst<'d> {
    Raw {
        storage: &'d dyn Storage,
        zeroed: bool,
    },
    Image {
        image: &'d dyn Image,
        zeroed: bool,
        file: Option<&'d dyn Storage>,
    },
    /// The stream and the number of the next request to write.
    Stream {
        out: Mutex<(u64, &'d mut (dyn Write + Send))>,
        turn: Condvar,
    },
}

impl Dst<'_> {
    fn reads_as_zeros(&self) -> bool {
        match self {
            Self::Raw { zeroed, .. } | Self::Image { zeroed, .. } => *zeroed,
            Self::Stream { .. } => false,
        }
    }

    fn writeback_target(&self) -> Option<&dyn Storage> {
        match self {
            Self::Raw { storage, .. } => Some(*storage),
            Self::Image { file, .. } => *file,
            Self::Stream { .. } => None,
        }
    }
}

fn write_err(offset: u64, e: Error) -> Error {
    Error::new(
        e.kind(),
        format!("writing the destination at disk offset {offset:#x}"),
    )
    .with_offset(offset)
    .with_source(e)
}

/// A part of a request's buffer that is not there: a bug in the copy's own bookkeeping, never
/// a reason to write less than was read.
fn slice_err(offset: u64) -> Error {
    Error::new(
        ErrorKind::Io,
        format!("copy: a part of the request at disk offset {offset:#x} is outside its buffer"),
    )
}

fn read_err(offset: u64, e: Error) -> Error {
    Error::new(
        e.kind(),
        format!("reading the source at disk offset {offset:#x}"),
    )
    .with_offset(offset)
    .with_source(e)
}

impl Shared<'_, '_, '_> {
    fn fail(&self, e: Error) {
        self.error.lock().get_or_insert(e);
        self.abort.store(true, Ordering::SeqCst);
        if let Dst::Stream { out, turn } = &self.dst {
            // Wake writers waiting for a turn that will never come.
            drop(out.lock());
            turn.notify_all();
        }
    }

    /// Counts a finished request of which `wrote` bytes were written (the rest skipped).
    fn done(&self, job: &Job, wrote: u64, by_file_range: bool) {
        self.written.fetch_add(wrote, Ordering::Relaxed);
        self.skipped
            .fetch_add(job.len.saturating_sub(wrote), Ordering::Relaxed);
        if by_file_range {
            self.file_copied.fetch_add(wrote, Ordering::Relaxed);
        }
        (self.progress)(job.len);
        if wrote > 0 && self.opts.writeback_every > 0 {
            let since = self
                .since_writeback
                .fetch_add(wrote, Ordering::Relaxed)
                .saturating_add(wrote);
            if since >= self.opts.writeback_every
                && self
                    .since_writeback
                    .compare_exchange(since, 0, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok()
                && let Some(s) = self.dst.writeback_target()
                && let Err(e) = s.start_writeback(0, 0)
            {
                log::debug!("starting writeback failed (the final flush still follows): {e}");
            }
        }
    }

    /// One worker: takes requests until none are left or a copy failed.
    fn work(&self, buf: &mut AlignedBuf) {
        while !self.abort.load(Ordering::SeqCst) {
            let job = match self.planner.lock().next_job() {
                Ok(Some(j)) => j,
                Ok(None) => return,
                Err(e) => return self.fail(e),
            };
            if let Err(e) = self.run(&job, buf) {
                return self.fail(e);
            }
        }
    }

    fn run(&self, job: &Job, buf: &mut AlignedBuf) -> Result<()> {
        match job.work {
            Work::Zero => {
                let wrote = self.zero(job)?;
                self.done(job, if wrote { job.len } else { 0 }, false);
            }
            Work::Keep => self.done(job, 0, false),
            Work::FileRange { layer, file } if self.file_ranges.load(Ordering::Relaxed) => {
                if self.file_range(job, layer, file)? {
                    self.done(job, job.len, true);
                } else {
                    self.read_write(job, buf)?;
                }
            }
            Work::FileRange { .. } | Work::Read => self.read_write(job, buf)?,
        }
        Ok(())
    }

    fn read_write(&self, job: &Job, buf: &mut AlignedBuf) -> Result<()> {
        let data = buf.get(to_usize(job.len)?)?;
        self.src
            .disk
            .read_at(job.offset, data)
            .map_err(|e| read_err(job.offset, e))?;
        let granule = self.opts.sparse_size;
        if !self.dst.reads_as_zeros() || granule == 0 {
            // Every byte is written (a stream's requests each take their turn).
            self.write(job.offset, data, job)?;
            self.done(job, job.len, false);
            return Ok(());
        }
        // Only the runs that hold a non-zero byte, found in granules of `sparse_size` bytes (on
        // multiples of it on the disk), so holes stay holes at the file system's block.
        let mut written = 0u64;
        let mut run: Option<(usize, usize)> = None;
        let mut at = 0usize;
        while at < data.len() {
            let pos = job.offset.saturating_add(at as u64);
            let to_boundary = granule.saturating_sub(pos.checked_rem(granule).unwrap_or(0));
            let end = at
                .saturating_add(usize::try_from(to_boundary).unwrap_or(usize::MAX))
                .min(data.len());
            let granule = data.get(at..end).ok_or_else(|| slice_err(job.offset))?;
            if is_zero(granule) {
                if let Some((s, e)) = run.take() {
                    written = written.saturating_add(self.write_part(job, data, s, e)?);
                }
            } else {
                run = Some(run.map_or((at, end), |(s, _)| (s, end)));
            }
            at = end;
        }
        if let Some((s, e)) = run {
            written = written.saturating_add(self.write_part(job, data, s, e)?);
        }
        self.done(job, written, false);
        Ok(())
    }

    /// Writes `data[s..e]` of `job`'s buffer; returns the bytes written.
    fn write_part(&self, job: &Job, data: &[u8], s: usize, e: usize) -> Result<u64> {
        let part = data.get(s..e).ok_or_else(|| slice_err(job.offset))?;
        self.write(job.offset.saturating_add(s as u64), part, job)?;
        Ok(part.len() as u64)
    }

    /// Waits for `job`'s turn on a stream, runs `f` on the stream, and passes the turn on.
    fn in_turn(&self, job: &Job, f: impl FnOnce(&mut dyn Write) -> io::Result<()>) -> Result<()> {
        let Dst::Stream { out, turn } = &self.dst else {
            return Ok(());
        };
        let mut g = out.lock();
        while g.0 != job.seq {
            if self.abort.load(Ordering::SeqCst) {
                return Err(Error::new(ErrorKind::Io, "copy aborted"));
            }
            turn.wait(&mut g);
        }
        let r = f(&mut *g.1);
        g.0 = g.0.saturating_add(1);
        drop(g);
        turn.notify_all();
        r.map_err(|e| write_err(job.offset, Error::io("write failed", e)))
    }

    /// Writes `data` at disk offset `offset` (within `job`).
    fn write(&self, offset: u64, data: &[u8], job: &Job) -> Result<()> {
        match &self.dst {
            Dst::Raw { storage, .. } => storage
                .write_all_at(offset, data)
                .map_err(|e| write_err(offset, Error::io("write failed", e))),
            Dst::Image { image, .. } => image
                .write_at(offset, data)
                .map_err(|e| write_err(offset, e)),
            Dst::Stream { .. } => self.in_turn(job, |out| out.write_all(data)),
        }
    }

    /// Makes the job's range read as zeros; returns whether bytes were written for it.
    fn zero(&self, job: &Job) -> Result<bool> {
        if self.opts.sparse_size == 0 && !matches!(self.dst, Dst::Stream { .. }) {
            // Fully allocated: the zeros are written as data.
            let mut at = 0u64;
            while at < job.len {
                let n = job.len.saturating_sub(at).min(ZEROS.len() as u64);
                let z = ZEROS
                    .get(..to_usize(n)?)
                    .ok_or_else(|| slice_err(job.offset))?;
                self.write(job.offset.saturating_add(at), z, job)?;
                at = at.saturating_add(n);
            }
            return Ok(true);
        }
        match &self.dst {
            Dst::Raw { zeroed: true, .. } | Dst::Image { zeroed: true, .. } => Ok(false),
            Dst::Raw { storage, .. } => storage
                .zero_range(job.offset, job.len)
                .map(|()| true)
                .map_err(|e| write_err(job.offset, Error::io("write failed", e))),
            Dst::Image { image, .. } => image
                .write_zeroes(job.offset, job.len)
                .map(|()| true)
                .map_err(|e| write_err(job.offset, e)),
            Dst::Stream { .. } => self
                .in_turn(job, |out| {
                    let mut left = job.len;
                    while left > 0 {
                        let n = left.min(ZEROS.len() as u64);
                        let z = usize::try_from(n)
                            .ok()
                            .and_then(|n| ZEROS.get(..n))
                            .unwrap_or(&ZEROS);
                        out.write_all(z)?;
                        left = left.saturating_sub(z.len() as u64);
                    }
                    Ok(())
                })
                .map(|()| true),
        }
    }

    /// Copies the job's range from `layer`'s file at `file` with `copy_file_range`. Returns
    /// `false` (having copied nothing, and turned file ranges off) when the system call cannot
    /// be used for these files.
    fn file_range(&self, job: &Job, layer: usize, file: u64) -> Result<bool> {
        let (Some(src), Dst::Raw { storage, .. }) = (self.src.file(layer), &self.dst) else {
            return Ok(false);
        };
        let (Some(in_fd), Some(out_fd)) = (src.host_fd(), storage.host_fd()) else {
            self.file_ranges.store(false, Ordering::Relaxed);
            return Ok(false);
        };
        let image = self.src.disk.layers().get(layer);
        // The layer's data stays where its map said until the copy is done.
        let _hold = image.map(|l| l.hold_layout());
        let mut off_in = file;
        let mut off_out = job.offset;
        let mut left = job.len;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(usize::MAX);
            match rustix::fs::copy_file_range(
                in_fd,
                Some(&mut off_in),
                out_fd,
                Some(&mut off_out),
                n,
            ) {
                Ok(0) => {
                    let e = io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("the image file ends before {off_in:#x}"),
                    );
                    return Err(read_err(job.offset, Error::io("read failed", e)));
                }
                Ok(copied) => left = left.saturating_sub(copied as u64),
                Err(e) if left == job.len && cfr_unsupported(e) => {
                    log::debug!("copy_file_range unusable ({e}); copying through buffers");
                    self.file_ranges.store(false, Ordering::Relaxed);
                    return Ok(false);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    let at = job.offset.saturating_add(job.len.saturating_sub(left));
                    return Err(write_err(at, Error::io("copy_file_range failed", e.into())));
                }
            }
        }
        Ok(true)
    }
}

/// Copies every byte of `src` into `dst` with `opts`, calling `progress` with the number of
/// bytes each finished request covered (from several threads, in any order). The destination
/// is not flushed: the caller flushes (or commits) it, and on an error drops it.
///
/// # Errors
/// `InvalidArgument` when the destination image is smaller than the disk; the first read or
/// write error, with the disk offset it happened at; typed corruption errors of the source's
/// maps.
pub fn copy(
    src: &Source<'_>,
    dst: Destination<'_>,
    opts: &CopyOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<CopyStats> {
    let size = src.disk.size();
    let (request, workers) = opts.clamped();
    if src.top_only && matches!(dst, Destination::Stream(_)) {
        return Err(Error::invalid_argument(
            "a stream receives every byte of the disk; it cannot keep what a parent holds",
        ));
    }
    let (dst, file_ranges) = match dst {
        Destination::Raw {
            storage,
            reads_as_zeros,
        } => (
            Dst::Raw {
                storage,
                zeroed: reads_as_zeros,
            },
            opts.copy_file_range,
        ),
        Destination::Image {
            image,
            reads_as_zeros,
            file,
        } => {
            if image.size() < size {
                return Err(Error::invalid_argument(format!(
                    "the destination holds {} bytes, less than the disk's {size}",
                    image.size()
                )));
            }
            (
                Dst::Image {
                    image,
                    zeroed: reads_as_zeros,
                    file,
                },
                false,
            )
        }
        Destination::Stream(out) => (
            Dst::Stream {
                out: Mutex::new((0, out)),
                turn: Condvar::new(),
            },
            false,
        ),
    };
    // With a sparse size of 0 every zero range is written, in requests of the usual size.
    let zeros_free = dst.reads_as_zeros() && opts.sparse_size > 0;
    let shared = Shared {
        planner: Mutex::new(Planner::new(src, request as u64, file_ranges, zeros_free)),
        src,
        dst,
        opts,
        abort: AtomicBool::new(false),
        error: Mutex::new(None),
        file_ranges: AtomicBool::new(file_ranges),
        written: AtomicU64::new(0),
        skipped: AtomicU64::new(0),
        file_copied: AtomicU64::new(0),
        since_writeback: AtomicU64::new(0),
        progress,
    };
    let mut bufs = (0..workers)
        .map(|_| AlignedBuf::new(request))
        .collect::<Result<Vec<_>>>()?;
    std::thread::scope(|s| {
        let shared = &shared;
        let mut rest = bufs.iter_mut();
        let first = rest.next();
        for buf in rest {
            s.spawn(move || shared.work(buf));
        }
        // The calling thread is a worker too.
        if let Some(buf) = first {
            shared.work(buf);
        }
    });
    if let Some(e) = shared.error.into_inner() {
        return Err(e);
    }
    if let Dst::Stream { out, .. } = shared.dst {
        out.into_inner()
            .1
            .flush()
            .map_err(|e| write_err(size, Error::io("write failed", e)))?;
    }
    Ok(CopyStats {
        written: shared.written.into_inner(),
        skipped: shared.skipped.into_inner(),
        file_copied: shared.file_copied.into_inner(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::DiskOptions;
    use crate::registry::Registry;
    use crate::storage::{MemFileSystem, MemStorage};
    use crate::testing::SplitMix64 as Rng;
    use crate::testing::backends::{LayerBackend, LayerSpec};

    /// A chain of `depth` layers of `size` bytes with random ranges in each (some all zeros),
    /// opened as a disk, and the bytes it reads as.
    fn random_chain(seed: u64, size: u64, depth: usize) -> (Disk, Vec<u8>) {
        let fs = Arc::new(MemFileSystem::new());
        let mut reg = Registry::empty(fs.clone());
        reg.register(Arc::new(LayerBackend::default())).unwrap();
        let mut rng = Rng::new(seed);
        for i in 0..depth {
            let mut spec = if i + 1 == depth {
                LayerSpec::base(size)
            } else {
                LayerSpec::child(size, &format!("/l{}.layer", i + 1))
            };
            for _ in 0..6 {
                let off = rng.next_u64() % size;
                let len = (rng.next_u64() % (size / 4)).min(size - off).max(1);
                if rng.next_u64().is_multiple_of(4) {
                    spec.data.push((off, vec![0; len as usize]));
                } else {
                    spec = spec.data(off, len, (rng.next_u64() % 250) as u8 + 1);
                }
            }
            spec.put(&fs, &format!("/l{i}.layer"));
        }
        let disk = Disk::open(&reg, Path::new("/l0.layer"), &DiskOptions::default()).unwrap();
        let mut want = vec![0u8; size as usize];
        disk.read_at(0, &mut want).unwrap();
        (disk, want)
    }

    fn opts(request_size: usize, workers: usize) -> CopyOptions {
        CopyOptions {
            request_size,
            workers,
            writeback_every: 8192,
            copy_file_range: true,
            sparse_size: ZERO_GRANULE,
        }
    }

    #[test]
    fn chains_copy_byte_for_byte_to_every_destination_kind() {
        for seed in 0..12u64 {
            // Unaligned sizes, requests from one page to more than the disk.
            let size = 3 * 4096 + 1 + seed * 7919 % 200_000;
            let (disk, want) = random_chain(seed, size, 1 + (seed as usize % 4));
            let src = Source::new(&disk);
            for (req, workers) in [(4096, 1), (8192, 3), (65536, 4), (1 << 20, 2)] {
                let o = opts(req, workers);
                let done = AtomicU64::new(0);
                let progress = |n: u64| {
                    done.fetch_add(n, Ordering::Relaxed);
                };
                // A new sparse file.
                let fresh = MemStorage::from_bytes(vec![0; size as usize]);
                let dst = Destination::Raw {
                    storage: &fresh,
                    reads_as_zeros: true,
                };
                let st = copy(&src, dst, &o, &progress).unwrap();
                assert_eq!(fresh.to_vec(), want, "seed {seed} req {req}");
                assert_eq!(st.written + st.skipped, size);
                assert_eq!(st.file_copied, 0, "memory has no descriptors");
                assert_eq!(done.swap(0, Ordering::Relaxed), size);
                // Only granules holding a non-zero byte are written.
                let nonzero = want
                    .chunks(ZERO_GRANULE as usize)
                    .filter(|c| c.iter().any(|&b| b != 0))
                    .map(|c| c.len() as u64)
                    .sum::<u64>();
                let nonzero_bytes = want.iter().filter(|&&b| b != 0).count() as u64;
                assert!(
                    (nonzero_bytes..=nonzero).contains(&st.written),
                    "seed {seed} req {req}: {} written",
                    st.written
                );
                // A device full of old bytes: zeros are written too.
                let dev = MemStorage::from_bytes(vec![0xEE; size as usize]);
                let dst = Destination::Raw {
                    storage: &dev,
                    reads_as_zeros: false,
                };
                let st = copy(&src, dst, &o, &progress).unwrap();
                assert_eq!(dev.to_vec(), want);
                assert_eq!((st.written, st.skipped), (size, 0));
                // A stream, in order.
                let mut out = Vec::new();
                let st = copy(&src, Destination::Stream(&mut out), &o, &progress).unwrap();
                assert_eq!(out, want, "seed {seed} req {req} workers {workers}");
                assert_eq!(st.written, size);
            }
        }
    }

    #[test]
    fn the_sparse_size_sets_which_zero_runs_are_skipped_and_0_writes_everything() {
        for seed in 0..6u64 {
            let size = (1 << 20) + 4096 * seed;
            let (disk, want) = random_chain(seed, size, 2);
            let src = Source::new(&disk);
            for sparse in [0u64, 4096, 65536] {
                let o = CopyOptions {
                    sparse_size: sparse,
                    ..opts(1 << 20, 3)
                };
                // Old bytes the copy is told read as zeros: what it skips keeps them.
                let dst = MemStorage::from_bytes(vec![0xEE; size as usize]);
                let st = copy(
                    &src,
                    Destination::Raw {
                        storage: &dst,
                        reads_as_zeros: true,
                    },
                    &o,
                    &|_| {},
                )
                .unwrap();
                let got = dst.to_vec();
                assert_eq!(st.written + st.skipped, size);
                if sparse == 0 {
                    assert_eq!(got, want, "seed {seed}: -S 0 writes every byte");
                    assert_eq!((st.written, st.skipped), (size, 0));
                    continue;
                }
                // Every byte is the disk's, or an old byte where the disk reads as zeros.
                for (i, (&g, &w)) in got.iter().zip(&want).enumerate() {
                    assert!(
                        g == w || (w == 0 && g == 0xEE),
                        "seed {seed} -S {sparse}: byte {i}"
                    );
                }
                // No aligned run of `sparse` zeros was written; what was written is bounded by
                // the granules holding data.
                let mut granules = 0u64;
                for (g, w) in got
                    .chunks(sparse as usize)
                    .zip(want.chunks(sparse as usize))
                {
                    if w.iter().all(|&b| b == 0) {
                        assert!(g.iter().all(|&b| b == 0xEE), "seed {seed} -S {sparse}");
                    } else {
                        granules += w.len() as u64;
                    }
                }
                let nonzero = want.iter().filter(|&&b| b != 0).count() as u64;
                assert!(
                    (nonzero..=granules).contains(&st.written),
                    "seed {seed} -S {sparse}: {} written",
                    st.written
                );
            }
        }
    }

    #[test]
    fn top_layer_copies_only_what_the_top_layer_holds() {
        for seed in 0..8u64 {
            let size = (1 << 20) + 512 * seed;
            let (disk, want) = random_chain(seed, size, 3);
            // What the destination must hold: the disk where the top layer maps the range,
            // its old bytes everywhere else.
            let mut expect = vec![0xEEu8; size as usize];
            let mut own = 0u64;
            for e in disk.layers()[0].map_file(0, size).unwrap() {
                if e.mapping != Mapping::Unallocated {
                    let r = e.offset as usize..(e.offset + e.length) as usize;
                    expect[r.clone()].copy_from_slice(&want[r]);
                    own += e.length;
                }
            }
            assert!(
                0 < own && own < size,
                "seed {seed}: the top layer holds part of the disk"
            );
            for workers in [1, 3] {
                let dev = MemStorage::from_bytes(vec![0xEE; size as usize]);
                let dst = Destination::Raw {
                    storage: &dev,
                    reads_as_zeros: false,
                };
                let st = copy(
                    &Source::top_layer(&disk),
                    dst,
                    &opts(8192, workers),
                    &|_| {},
                )
                .unwrap();
                assert_eq!(dev.to_vec(), expect, "seed {seed} workers {workers}");
                assert_eq!((st.written, st.skipped), (own, size - own));
            }
        }
        let (disk, _) = random_chain(1, 1 << 20, 2);
        let mut out = Vec::new();
        let e = copy(
            &Source::top_layer(&disk),
            Destination::Stream(&mut out),
            &opts(8192, 2),
            &|_| {},
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(out.is_empty());
    }

    #[test]
    fn the_planner_coalesces_data_and_cuts_at_request_multiples() {
        let (disk, _) = random_chain(99, 1 << 20, 3);
        for req in [4096u64, 12288, 1 << 16] {
            let src = Source::new(&disk);
            let mut p = Planner::new(&src, req, false, true);
            let mut pos = 0;
            let mut seq = 0;
            let mut last_zero = false;
            while let Some(j) = p.next_job().unwrap() {
                assert_eq!((j.offset, j.seq), (pos, seq), "jobs tile the disk in order");
                assert!(j.len > 0);
                if j.work == Work::Zero {
                    assert!(!last_zero, "adjacent zero runs are one request");
                } else {
                    assert!(j.len <= req);
                    let end = j.offset + j.len;
                    assert!(
                        end % req == 0
                            || end == 1 << 20
                            || p.pieces.front().is_some_and(|n| n.from == Origin::Zero),
                        "a data request ends at a multiple, the end, or zeros"
                    );
                }
                last_zero = j.work == Work::Zero;
                pos += j.len;
                seq += 1;
            }
            assert_eq!(pos, 1 << 20);
        }
    }

    #[test]
    fn a_failed_read_stops_the_copy_with_its_offset() {
        use crate::testing::FaultyStorage;
        let fs = Arc::new(MemFileSystem::new());
        let mut reg = Registry::empty(fs.clone());
        reg.register(Arc::new(LayerBackend::default())).unwrap();
        let spec = LayerSpec::base(1 << 20).data(0, 1 << 20, 7);
        let faulty = Arc::new(FaultyStorage::from_bytes(spec.bytes()));
        fs.insert("/f.layer", faulty.clone());
        let disk = Disk::open(&reg, Path::new("/f.layer"), &DiskOptions::default()).unwrap();
        let src = Source::new(&disk);
        for workers in [1, 4] {
            faulty.fail_nth(5);
            let out = MemStorage::new();
            let e = copy(
                &src,
                Destination::Raw {
                    storage: &out,
                    reads_as_zeros: true,
                },
                &opts(4096, workers),
                &|_| {},
            )
            .unwrap_err();
            assert!(
                e.to_string().contains("reading the source at disk offset"),
                "{e}"
            );
            assert!(e.context().offset.is_some());
            // A stream waiting for its turn is woken and stops too.
            faulty.fail_nth(3);
            let mut sink = Vec::new();
            copy(
                &src,
                Destination::Stream(&mut sink),
                &opts(4096, workers),
                &|_| {},
            )
            .unwrap_err();
        }
    }

    #[test]
    fn peak_buffer_memory_is_workers_times_request() {
        let o = CopyOptions::default();
        assert_eq!(o.peak_buffer_bytes(), 4 * ((4 << 20) + 4096));
        let huge = CopyOptions {
            request_size: usize::MAX,
            workers: usize::MAX,
            ..CopyOptions::default()
        };
        assert_eq!(
            huge.peak_buffer_bytes(),
            (MAX_WORKERS * (MAX_REQUEST_SIZE + 4096)) as u64
        );
        let tiny = CopyOptions {
            request_size: 1,
            workers: 0,
            ..CopyOptions::default()
        };
        assert_eq!(tiny.clamped(), (4096, 1));
    }

    #[test]
    fn a_destination_image_smaller_than_the_disk_is_refused() {
        let (disk, _) = random_chain(1, 64 << 10, 1);
        let (small, _) = random_chain(2, 32 << 10, 1);
        let e = copy(
            &Source::new(&disk),
            Destination::Image {
                image: small.top(),
                reads_as_zeros: false,
                file: None,
            },
            &CopyOptions::default(),
            &|_| {},
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
    }

    #[test]
    fn tracking_provider_finds_the_one_live_storage_of_a_path() {
        let fs = Arc::new(MemFileSystem::new());
        let t = TrackingProvider::new(fs.clone());
        let a = t.create(Path::new("/a"), false).unwrap();
        assert!(Arc::ptr_eq(&t.storage(Path::new("/a")).unwrap(), &a));
        assert!(t.storage(Path::new("/b")).is_none());
        t.rename(Path::new("/a"), Path::new("/b")).unwrap();
        assert!(t.storage(Path::new("/a")).is_none());
        assert!(Arc::ptr_eq(&t.storage(Path::new("/b")).unwrap(), &a));
        drop(a);
        let (p, s) = t.create_beside(Path::new("/d/x")).unwrap();
        assert!(Arc::ptr_eq(&t.storage(&p).unwrap(), &s));
        let again = t.open(&p, OpenMode::ReadOnly).unwrap();
        assert!(
            t.storage(&p).is_none(),
            "two live storages for one path: ambiguous"
        );
        drop(again);
        assert!(t.storage(&p).is_some());
        assert!(t.exists(&p));
        t.delete(&p).unwrap();
    }
}
