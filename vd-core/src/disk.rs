//! Disk chains: a differencing child over its parents, read and written as one virtual disk.

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::flags::{ImageFlags, OpenFlags};
use crate::image::{ExtentKind, Image, check_range};
use crate::mapping::Mapping;
use crate::registry::Registry;

/// The deepest chain [`Disk`] opens (the top image and its ancestors). Each layer holds an
/// open file and its own caches, and a read that falls through walks every layer, so the depth
/// bounds both memory and the work of one read; a loop in the parent links is caught by file
/// identity, and this cap stops a chain of distinct files that was made to be deep. No real
/// snapshot chain comes near it (Hyper-V and VirtualBox stay in the tens).
pub const MAX_CHAIN_DEPTH: usize = 256;

/// How to open a [`Disk`].
#[derive(Debug, Clone)]
pub struct DiskOptions {
    /// Flags for the top image. Parents are opened read-only (taking shared locks), keeping
    /// `STRICT` and `FORCE_SHARE` from these flags, except as [`writable_parent`] says.
    ///
    /// [`writable_parent`]: DiskOptions::writable_parent
    pub flags: OpenFlags,
    /// Open the nearest parent read-write (and lock it for writing), for merging the top image
    /// into it (`commit`).
    pub writable_parent: bool,
    /// The top image's format, bypassing probing.
    pub format: Option<String>,
    /// Explicit parents, nearest first; each one replaces the lookup by the child's locator.
    pub parents: Vec<PathBuf>,
    /// Chain depth cap (at most [`MAX_CHAIN_DEPTH`]).
    pub max_depth: usize,
}

impl Default for DiskOptions {
    fn default() -> Self {
        Self {
            flags: OpenFlags::READ_ONLY,
            writable_parent: false,
            format: None,
            parents: Vec::new(),
            max_depth: MAX_CHAIN_DEPTH,
        }
    }
}

/// A run of the virtual disk and where its contents come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct DiskExtent {
    /// Start in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// `Data` (stored in `layer`) or `Zero`; never `Unallocated`.
    pub kind: ExtentKind,
    /// Index of the image that holds the run (0 = top); `None` for zeros below the base.
    pub layer: Option<usize>,
}

/// A stack of images: a differencing child over its parent over its parent. Reads of ranges an
/// image does not hold fall through to its parent, and read as zeros below the base; writes go
/// to the top image.
pub struct Disk {
    layers: Vec<Box<dyn Image>>,
    pos: u64,
}

impl std::fmt::Debug for Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Disk")
            .field(
                "layers",
                &self.layers.iter().map(|l| l.path()).collect::<Vec<_>>(),
            )
            .field("pos", &self.pos)
            .finish()
    }
}

/// Why no parent could be used: `NotFound` when no candidate exists; otherwise the first
/// failure keeps its kind, so a parent that is found but is not the one the child was made
/// from stays a `ParentMismatch` with its [`LinkageMismatch`](crate::LinkageMismatch), and a
/// locked or damaged parent stays `Locked` or `Corrupt`.
fn parent_error(child: &Path, failed: Option<(PathBuf, Error)>, tried: &[String]) -> Error {
    match failed {
        None => Error::new(
            ErrorKind::NotFound,
            format!("parent image not found; tried: {}", tried.join("; ")),
        )
        .with_path(child),
        Some((_, e)) if e.linkage_mismatch().is_some() => e,
        Some((at, e)) => e.in_parent_of(child, &at),
    }
}

fn bad_chain(msg: String) -> Error {
    Error::new(ErrorKind::BadChain, msg)
}

/// `value` as a length in memory, or `InvalidArgument` naming `what`: never a fallback value
/// that would make a write shorter or longer than asked.
fn to_usize(value: u64, what: &str) -> Result<usize> {
    usize::try_from(value).map_err(|_| Error::invalid_argument(format!("{what} too large")))
}

/// `offset + len`, after checking that the range lies within `size`.
fn range_end(offset: u64, len: u64, size: u64) -> Result<u64> {
    check_range(offset, len, size)?;
    offset
        .checked_add(len)
        .ok_or_else(|| Error::out_of_range(offset, len, size))
}

/// `[offset, end)` widened to multiples of `g`: the start rounded down, the end up.
fn widen(offset: u64, end: u64, g: u64) -> Result<(u64, u64)> {
    let start = offset.checked_rem(g).and_then(|r| offset.checked_sub(r));
    match (start, end.checked_next_multiple_of(g)) {
        (Some(start), Some(stop)) => Ok((start, stop)),
        _ => Err(Error::invalid_argument(format!(
            "{offset:#x}..{end:#x} cannot be widened to multiples of {g}"
        ))),
    }
}

impl Disk {
    /// Opens the image at `path` and, for a differencing image, its ancestors: each parent is
    /// looked up at the candidates the child names (or taken from `opts.parents`), must exist,
    /// must not already be in the chain, and must pass the child's
    /// [`check_parent`](Image::check_parent).
    ///
    /// # Errors
    /// Errors opening any layer; `NotFound` naming every path tried when no parent exists;
    /// `ParentMismatch` (with a [`LinkageMismatch`](crate::LinkageMismatch)) when a parent is
    /// found but is not the image the child was made from; the kind of the failure when a found
    /// parent cannot be opened (`Locked`, `Corrupt`, ...); `BadChain` for a cycle or a chain
    /// deeper than the cap.
    pub fn open(registry: &Registry, path: &Path, opts: &DiskOptions) -> Result<Self> {
        let provider = registry.provider().clone();
        let max_depth = opts.max_depth.clamp(1, MAX_CHAIN_DEPTH);
        let top = match &opts.format {
            Some(f) => registry.open_as(f, path, opts.flags)?,
            None => registry.open(path, opts.flags)?,
        };
        // Layers already in the chain, compared by file identity (device and inode on the host
        // file system), so a hard link or a symbolic link cannot hide a loop.
        let mut seen = vec![path.to_path_buf()];
        let mut layers: Vec<Box<dyn Image>> = Vec::new();
        let mut explicit = opts.parents.iter();
        let parent_flags =
            OpenFlags::READ_ONLY | (opts.flags & (OpenFlags::STRICT | OpenFlags::FORCE_SHARE));
        let mut current = top;
        while current.image_flags().contains(ImageFlags::DIFF) {
            let parent_flags = if opts.writable_parent && layers.is_empty() {
                parent_flags & OpenFlags::STRICT
            } else {
                parent_flags
            };
            if layers.len().saturating_add(2) > max_depth {
                return Err(
                    bad_chain(format!("the disk chain is deeper than {max_depth} images"))
                        .with_path(path),
                );
            }
            let candidates = match explicit.next() {
                Some(p) => vec![p.clone()],
                None => current.parent_candidates()?,
            };
            let mut tried = Vec::new();
            let mut failed: Option<(PathBuf, Error)> = None;
            let mut found = None;
            for c in candidates {
                if !provider.exists(&c) {
                    tried.push(format!("{} (not found)", c.display()));
                    continue;
                }
                if seen.iter().any(|s| provider.same_file(s, &c)) {
                    return Err(bad_chain(format!(
                        "the disk chain loops: {} is its own ancestor",
                        c.display()
                    ))
                    .with_path(current.path()));
                }
                match registry
                    .open(&c, parent_flags)
                    .and_then(|p| current.check_parent(p.as_ref()).map(|()| p))
                {
                    Ok(p) => {
                        log::info!(
                            "{}: parent found at {}",
                            current.path().display(),
                            c.display()
                        );
                        seen.push(c.clone());
                        found = Some(p);
                        break;
                    }
                    Err(e) => {
                        tried.push(format!("{} ({e})", c.display()));
                        if failed.is_none() {
                            failed = Some((c.clone(), e));
                        }
                    }
                }
            }
            let Some(parent) = found else {
                return Err(parent_error(current.path(), failed, &tried));
            };
            layers.push(current);
            current = parent;
        }
        layers.push(current);
        Self::from_layers(layers)
    }

    /// A disk over already opened images, top first.
    ///
    /// # Errors
    /// `InvalidArgument` for no layers; `BadChain` beyond [`MAX_CHAIN_DEPTH`].
    pub fn from_layers(layers: Vec<Box<dyn Image>>) -> Result<Self> {
        if layers.is_empty() {
            return Err(Error::invalid_argument("a disk needs at least one image"));
        }
        if layers.len() > MAX_CHAIN_DEPTH {
            return Err(bad_chain(format!(
                "the disk chain is deeper than {MAX_CHAIN_DEPTH} images"
            )));
        }
        Ok(Self { layers, pos: 0 })
    }

    /// The images, top first.
    pub fn layers(&self) -> &[Box<dyn Image>] {
        &self.layers
    }

    /// The top image, where writes go.
    #[allow(
        clippy::expect_used,
        reason = "`open` builds a disk with its top image first and nothing removes layers"
    )]
    pub fn top(&self) -> &dyn Image {
        self.layers
            .first()
            .map(AsRef::as_ref)
            .expect("a disk has at least one layer")
    }

    /// Virtual size: the top image's.
    pub fn size(&self) -> u64 {
        self.top().size()
    }

    /// Reads `buf.len()` bytes at `offset` through the chain.
    ///
    /// # Errors
    /// `OutOfRange`; errors of the layers.
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let size = self.size();
        check_range(offset, buf.len() as u64, size)?;
        self.read_layer(0, Some(size), offset, buf)
    }

    /// Reads `buf` at `offset` from layer `index` in one pass: the layer is mapped once
    /// ([`Image::map_file`]); data with a file offset is read straight from that layer's file,
    /// data without one through the layer's [`Image::read_at`], zeros are filled, and only the
    /// ranges the layer does not hold go one layer down. Below the base, and beyond a layer
    /// smaller than the disk, the disk reads as zeros.
    ///
    /// The last layer (the base, or the only image) has nothing below it, so what it does not
    /// hold reads as zeros, which is exactly what its own [`Image::read_at`] returns: it is
    /// read with that one call, which maps and reads in one pass inside the backend (under the
    /// backend's own layout hold and checks), without the extent list, the second and third
    /// lock round trips of map-then-read, or (for raw files) the `SEEK_DATA`/`SEEK_HOLE` calls
    /// of mapping a file that is read in full anyway.
    ///
    /// `size` is the layer's size when the caller already asked for it.
    fn read_layer(
        &self,
        index: usize,
        size: Option<u64>,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<()> {
        let Some(layer) = self.layers.get(index) else {
            buf.fill(0);
            return Ok(());
        };
        let size = size.unwrap_or_else(|| layer.size());
        // A child may be larger than its parent: the part beyond this layer reads as zeros.
        let avail = usize::try_from(size.saturating_sub(offset))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (inside, beyond) = buf.split_at_mut(avail);
        beyond.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        if index.saturating_add(1) == self.layers.len() {
            return layer.read_at(offset, inside);
        }
        let inside_len = inside.len();
        // The layer's data stays where the map says until every part is read.
        let _hold = layer.hold_layout();
        // Extents must tile the request exactly; a gap would leave stale bytes in the buffer.
        let mut expect = offset;
        for e in layer.map_file(offset, inside_len as u64)? {
            if e.offset != expect {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "map left a gap at {expect:#x} (next extent at {:#x})",
                        e.offset
                    ),
                )
                .with_path(layer.path()));
            }
            expect = e.offset.saturating_add(e.length);
            let start = e
                .offset
                .checked_sub(offset)
                .and_then(|s| usize::try_from(s).ok());
            let len = usize::try_from(e.length).ok();
            let part = match (start, len) {
                (Some(s), Some(l)) => inside.get_mut(s..s.saturating_add(l)),
                _ => None,
            }
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "map returned extent {:#x}+{:#x} outside the request {offset:#x}+{:#x}",
                        e.offset, e.length, inside_len
                    ),
                )
                .with_path(layer.path())
            })?;
            match e.mapping {
                Mapping::Data {
                    file_offset: Some(file),
                } => layer.read_file_at(file, part)?,
                Mapping::Data { file_offset: None } => layer.read_at(e.offset, part)?,
                Mapping::Zero => part.fill(0),
                Mapping::Unallocated => {
                    self.read_layer(index.saturating_add(1), None, e.offset, part)?;
                }
            }
        }
        // `offset + inside_len` is at most the layer's size (`avail` above).
        if Some(expect) != offset.checked_add(inside_len as u64) {
            return Err(Error::new(
                ErrorKind::Corrupt,
                format!("map stopped at {expect:#x}, short of the request"),
            )
            .with_path(layer.path()));
        }
        Ok(())
    }

    /// Writes `buf` at `offset` to the top image.
    ///
    /// # Errors
    /// `OutOfRange`; errors of the top image.
    pub fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let end = range_end(offset, buf.len() as u64, self.size())?;
        let ss = u64::from(self.top().write_granularity().max(1));
        if self.layers.len() == 1 || (offset.is_multiple_of(ss) && end.is_multiple_of(ss)) {
            return self.top().write_at(offset, buf);
        }
        // A differencing image tracks whole sectors: widen the write to sector boundaries,
        // filling the edges with what the chain reads there now.
        let (start, stop) = widen(offset, end, ss)?;
        let mut wide = vec![0u8; to_usize(stop.abs_diff(start), "write")?];
        let head = to_usize(offset.abs_diff(start), "write head")?;
        let tail_start = to_usize(end.abs_diff(start), "write tail")?;
        let sector = to_usize(ss, "write granularity")?;
        if head > 0 {
            let first = wide
                .get_mut(..sector)
                .ok_or_else(|| Error::invalid_argument("write shorter than a sector"))?;
            self.read_at(start, first)?;
        }
        if stop > end {
            let last = wide
                .len()
                .checked_sub(sector)
                .and_then(|l| wide.get_mut(l..))
                .ok_or_else(|| Error::invalid_argument("write shorter than a sector"))?;
            // stop is a multiple of ss above end, so at least ss.
            self.read_at(stop.saturating_sub(ss), last)?;
        }
        if let Some(dst) = wide.get_mut(head..tail_start) {
            dst.copy_from_slice(buf);
        }
        self.top().write_at(start, &wide)
    }

    /// Writes zeros over a range of the top image.
    ///
    /// # Errors
    /// As [`write_at`](Disk::write_at).
    pub fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        self.zero_aligned(offset, len, |o, l| self.top().write_zeroes(o, l))
    }

    /// Runs `op` on the part of `[offset, offset + len)` aligned to the top image's write
    /// granularity, and writes zeros (widened through the chain) over the unaligned edges.
    fn zero_aligned(
        &self,
        offset: u64,
        len: u64,
        op: impl Fn(u64, u64) -> Result<()>,
    ) -> Result<()> {
        let g = u64::from(self.top().write_granularity().max(1));
        let end = range_end(offset, len, self.size())?;
        if g == 1 || self.layers.len() == 1 || (offset.is_multiple_of(g) && end.is_multiple_of(g)) {
            return op(offset, len);
        }
        // The aligned middle: the start rounded up, the end down (both within [offset, end]).
        let mid_start = offset.checked_next_multiple_of(g).unwrap_or(end).min(end);
        let mid_end = end.checked_rem(g).map_or(offset, |r| end.saturating_sub(r));
        if mid_start >= mid_end {
            let zeros = vec![0u8; to_usize(len, "range")?];
            return self.write_at(offset, &zeros);
        }
        let head = vec![0u8; to_usize(mid_start.abs_diff(offset), "zero head")?];
        let tail = vec![0u8; to_usize(end.abs_diff(mid_end), "zero tail")?];
        if !head.is_empty() {
            self.write_at(offset, &head)?;
        }
        op(mid_start, mid_end.abs_diff(mid_start))?;
        if !tail.is_empty() {
            self.write_at(mid_end, &tail)?;
        }
        Ok(())
    }

    /// Discards a range of the top image.
    ///
    /// # Errors
    /// `OutOfRange`; errors of the top image.
    pub fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, self.size())?;
        self.zero_aligned(offset, len, |o, l| self.top().discard(o, l))
    }

    /// Flushes the top image.
    ///
    /// # Errors
    /// Errors of the top image.
    pub fn flush(&self) -> Result<()> {
        self.top().flush()
    }

    /// Which layer holds each part of `[offset, offset + len)`; adjacent runs of the same kind
    /// and layer are merged.
    ///
    /// # Errors
    /// `OutOfRange`; errors of the layers.
    pub fn map(&self, offset: u64, len: u64) -> Result<Vec<DiskExtent>> {
        check_range(offset, len, self.size())?;
        let mut out = Vec::new();
        self.map_layer(0, offset, len, &mut out)?;
        Ok(out)
    }

    fn map_layer(
        &self,
        index: usize,
        offset: u64,
        len: u64,
        out: &mut Vec<DiskExtent>,
    ) -> Result<()> {
        let push = |out: &mut Vec<DiskExtent>, e: DiskExtent| {
            if e.length == 0 {
                return;
            }
            if let Some(last) = out.last_mut()
                && last.kind == e.kind
                && last.layer == e.layer
                && last.offset.checked_add(last.length) == Some(e.offset)
                && let Some(length) = last.length.checked_add(e.length)
            {
                last.length = length;
                return;
            }
            out.push(e);
        };
        let Some(layer) = self.layers.get(index) else {
            push(
                out,
                DiskExtent {
                    offset,
                    length: len,
                    kind: ExtentKind::Zero,
                    layer: None,
                },
            );
            return Ok(());
        };
        let avail = layer.size().saturating_sub(offset).min(len);
        if avail > 0 {
            for e in layer.map(offset, avail)? {
                match e.kind {
                    ExtentKind::Unallocated if index.saturating_add(1) < self.layers.len() => {
                        self.map_layer(index.saturating_add(1), e.offset, e.length, out)?;
                    }
                    ExtentKind::Unallocated | ExtentKind::Zero => push(
                        out,
                        DiskExtent {
                            offset: e.offset,
                            length: e.length,
                            kind: ExtentKind::Zero,
                            layer: None,
                        },
                    ),
                    ExtentKind::Data => push(
                        out,
                        DiskExtent {
                            offset: e.offset,
                            length: e.length,
                            kind: ExtentKind::Data,
                            layer: Some(index),
                        },
                    ),
                }
            }
        }
        if avail < len {
            push(
                out,
                DiskExtent {
                    // avail < len, and offset + len is within the disk (checked by `map`).
                    offset: offset.saturating_add(avail),
                    length: len.abs_diff(avail),
                    kind: ExtentKind::Zero,
                    layer: None,
                },
            );
        }
        Ok(())
    }

    /// Closes every layer, top first, returning the first error.
    ///
    /// # Errors
    /// The first close error.
    pub fn close(self) -> Result<()> {
        let mut first = None;
        for l in self.layers {
            if let Err(e) = l.close(false) {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

fn to_io(e: Error) -> io::Error {
    let kind = match e.kind() {
        ErrorKind::NotFound => io::ErrorKind::NotFound,
        ErrorKind::ReadOnly => io::ErrorKind::PermissionDenied,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => io::ErrorKind::InvalidInput,
        ErrorKind::Corrupt | ErrorKind::InvalidHeader => io::ErrorKind::InvalidData,
        ErrorKind::NotSupported => io::ErrorKind::Unsupported,
        _ => io::ErrorKind::Other,
    };
    io::Error::new(kind, e)
}

impl Read for Disk {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = usize::try_from(self.size().saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let part = buf
            .get_mut(..n)
            .ok_or_else(|| io::Error::other("read length"))?;
        self.read_at(self.pos, part).map_err(to_io)?;
        // The read succeeded, so pos + n is within the disk.
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }
}

impl Write for Disk {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = usize::try_from(self.size().saturating_sub(self.pos))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        if buf.is_empty() {
            return Ok(0);
        }
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                "end of the virtual disk",
            ));
        }
        let part = buf
            .get(..n)
            .ok_or_else(|| io::Error::other("write length"))?;
        self.write_at(self.pos, part).map_err(to_io)?;
        // The write succeeded, so pos + n is within the disk.
        self.pos = self.pos.saturating_add(n as u64);
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Disk::flush(self).map_err(to_io)
    }
}

impl Seek for Disk {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.size().checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) => {
                self.pos = p;
                Ok(p)
            }
            None => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "seek before the start",
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::flags::ImageFlags;
    use crate::image::Extent;

    #[test]
    fn widen_rounds_outwards_and_refuses_what_does_not_fit() {
        assert_eq!(widen(513, 1025, 512).unwrap(), (512, 1536));
        assert_eq!(widen(512, 1024, 512).unwrap(), (512, 1024));
        assert_eq!(widen(0, 1, 4096).unwrap(), (0, 4096));
        assert!(
            widen(0, u64::MAX, 4096).is_err(),
            "the end rounds up past 2^64"
        );
        assert!(widen(0, 1, 0).is_err(), "no granularity");
    }

    #[test]
    fn range_end_is_the_end_of_a_range_inside_the_disk() {
        assert_eq!(range_end(10, 20, 30).unwrap(), 30);
        assert_eq!(
            range_end(10, 21, 30).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            range_end(u64::MAX, 2, u64::MAX).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }
    use crate::mapping::{MappedExtent, merge_extents};
    use crate::storage::{MemStorage, Storage};

    /// A small deterministic generator (xorshift64*), so failures replay.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// What a model layer was asked, to check the reader's access pattern.
    #[derive(Debug, Default, Clone, PartialEq, Eq)]
    struct Calls {
        map: usize,
        map_file: usize,
        mapped_bytes: u64,
        read_at: usize,
        /// Bytes asked of `read_at`.
        read_bytes: u64,
        read_file_at: usize,
    }

    /// An image described by its runs: data at file offsets in an in-memory "file", zeros and
    /// unallocated ranges. With `offsets` false it maps data without file offsets, as a backend
    /// that cannot say where its data lives.
    #[derive(Debug)]
    struct Model {
        size: u64,
        runs: Vec<MappedExtent>,
        file: MemStorage,
        offsets: bool,
        calls: Mutex<Calls>,
    }

    impl Model {
        fn calls(&self) -> Calls {
            self.calls.lock().unwrap().clone()
        }

        /// The runs of `[offset, offset + len)`, clipped, file offsets shifted to match.
        fn clip(&self, offset: u64, len: u64) -> Vec<MappedExtent> {
            let end = offset + len;
            merge_extents(self.runs.iter().filter_map(|r| {
                let a = r.offset.max(offset);
                let b = (r.offset + r.length).min(end);
                (a < b).then(|| MappedExtent {
                    offset: a,
                    length: b - a,
                    mapping: match r.mapping {
                        Mapping::Data { file_offset } => Mapping::Data {
                            file_offset: file_offset
                                .map(|f| f + (a - r.offset))
                                .filter(|_| self.offsets),
                        },
                        m => m,
                    },
                })
            }))
        }

        /// The byte this layer holds at `pos`: `None` when unallocated here.
        fn byte(&self, pos: u64) -> Option<u8> {
            let r = self
                .runs
                .iter()
                .find(|r| r.offset <= pos && pos < r.offset + r.length)?;
            match r.mapping {
                Mapping::Data { file_offset } => {
                    let mut b = [0u8];
                    self.file
                        .read_exact_at(file_offset.unwrap() + (pos - r.offset), &mut b)
                        .unwrap();
                    Some(b[0])
                }
                Mapping::Zero => Some(0),
                Mapping::Unallocated => None,
            }
        }
    }

    /// The [`Image`] over a shared [`Model`] (the test keeps the model to inspect it).
    #[derive(Debug)]
    struct ModelLayer {
        path: PathBuf,
        model: Arc<Model>,
    }

    impl Image for ModelLayer {
        fn format(&self) -> &'static str {
            "model"
        }

        fn path(&self) -> &Path {
            &self.path
        }

        /// This layer alone (zeros where unallocated): for data without file offsets, and for
        /// the last layer of a disk.
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            {
                let mut c = self.model.calls.lock().unwrap();
                c.read_at += 1;
                c.read_bytes += buf.len() as u64;
            }
            check_range(offset, buf.len() as u64, self.model.size)?;
            for (i, b) in buf.iter_mut().enumerate() {
                *b = self.model.byte(offset + i as u64).unwrap_or(0);
            }
            Ok(())
        }

        fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
            self.model.calls.lock().unwrap().read_file_at += 1;
            self.model
                .file
                .read_exact_at(file_offset, buf)
                .map_err(|e| Error::io("read failed", e))
        }

        fn flush(&self) -> Result<()> {
            Ok(())
        }

        fn close(self: Box<Self>, _delete: bool) -> Result<()> {
            Ok(())
        }

        fn size(&self) -> u64 {
            self.model.size
        }

        fn file_size(&self) -> Result<u64> {
            self.model.file.len().map_err(|e| Error::io("len", e))
        }

        fn image_flags(&self) -> ImageFlags {
            ImageFlags::DIFF
        }

        fn open_flags(&self) -> OpenFlags {
            OpenFlags::READ_ONLY
        }

        fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            self.model.calls.lock().unwrap().map += 1;
            check_range(offset, len, self.model.size)?;
            Ok(self
                .model
                .clip(offset, len)
                .iter()
                .map(MappedExtent::extent)
                .collect())
        }

        fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
            {
                let mut c = self.model.calls.lock().unwrap();
                c.map_file += 1;
                c.mapped_bytes += len;
            }
            check_range(offset, len, self.model.size)?;
            Ok(self.model.clip(offset, len))
        }
    }

    /// A random layer of `size` bytes: runs of random kinds and lengths; the data runs are
    /// placed in the file in reverse order with gaps (so neither file offsets nor file
    /// neighbours match the disk's), filled with random non-zero bytes.
    fn random_model(rng: &mut Rng, size: u64, offsets: bool) -> Model {
        let mut runs = Vec::new();
        let mut pos = 0;
        while pos < size {
            let len = (1 + rng.below(3000)).min(size - pos);
            let mapping = match rng.below(3) {
                0 => Mapping::Data { file_offset: None },
                1 => Mapping::Zero,
                _ => Mapping::Unallocated,
            };
            runs.push(MappedExtent {
                offset: pos,
                length: len,
                mapping,
            });
            pos += len;
        }
        let file = MemStorage::new();
        let mut at = 1 + rng.below(100);
        for r in runs.iter_mut().rev() {
            if let Mapping::Data { file_offset } = &mut r.mapping {
                *file_offset = Some(at);
                let bytes: Vec<u8> = (0..r.length).map(|_| rng.next() as u8 | 1).collect();
                file.write_all_at(at, &bytes).unwrap();
                at += r.length + rng.below(64);
            }
        }
        Model {
            size,
            runs,
            file,
            offsets,
            calls: Mutex::default(),
        }
    }

    fn disk_of(models: &[Arc<Model>]) -> Disk {
        Disk::from_layers(
            models
                .iter()
                .enumerate()
                .map(|(i, m)| {
                    Box::new(ModelLayer {
                        path: PathBuf::from(format!("layer{i}")),
                        model: m.clone(),
                    }) as Box<dyn Image>
                })
                .collect(),
        )
        .unwrap()
    }

    /// What the chain reads at `pos` (the reference for [`Disk::read_at`]).
    fn expected(models: &[Arc<Model>], pos: u64) -> u8 {
        for m in models {
            if pos >= m.size {
                return 0;
            }
            if let Some(b) = m.byte(pos) {
                return b;
            }
        }
        0
    }

    /// Bytes of `[offset, offset + len)` that reach layer `depth`: those unallocated in, and
    /// inside, every layer above it.
    fn reaching(models: &[Arc<Model>], depth: usize, offset: u64, len: u64) -> u64 {
        (offset..offset + len)
            .filter(|&p| {
                models
                    .iter()
                    .take(depth + 1)
                    .enumerate()
                    .all(|(i, m)| p < m.size && (i == depth || m.byte(p).is_none()))
            })
            .count() as u64
    }

    #[test]
    fn chain_reads_in_one_pass_against_a_model() {
        for seed in 1..=24u64 {
            let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
            let depth = 1 + rng.below(4) as usize;
            let top = 20_000 + rng.below(20_000);
            let models: Vec<Arc<Model>> = (0..depth)
                .map(|i| {
                    // Lower layers may be smaller than the disk (the rest reads as zeros);
                    // every third seed has a layer that maps data without file offsets.
                    let size = if i == 0 {
                        top
                    } else {
                        5_000 + rng.below(40_000)
                    };
                    Arc::new(random_model(&mut rng, size, seed % 3 != 0 || i != 1))
                })
                .collect();
            let disk = disk_of(&models);
            for _ in 0..40 {
                let offset = rng.below(top);
                let len = 1 + rng.below((top - offset).min(9_000));
                let before: Vec<Calls> = models.iter().map(|m| m.calls()).collect();
                let mut buf = vec![0xEEu8; usize::try_from(len).unwrap()];
                disk.read_at(offset, &mut buf).unwrap();
                for (i, b) in buf.iter().enumerate() {
                    let pos = offset + i as u64;
                    assert_eq!(
                        *b,
                        expected(&models, pos),
                        "seed {seed}: byte {pos:#x} of {offset:#x}+{len:#x}"
                    );
                }
                for (d, m) in models.iter().enumerate() {
                    let (c, b) = (m.calls(), &before[d]);
                    // Never the kind-only map: one lookup per range, which says where to read.
                    assert_eq!(c.map, b.map, "seed {seed} layer {d}");
                    if d + 1 == models.len() {
                        // The last layer has nothing below: its own read_at (zeros where it
                        // holds nothing) reads each range that reaches it, once, unmapped.
                        assert_eq!(c.map_file, b.map_file, "seed {seed} layer {d}: not mapped");
                        assert_eq!(c.read_file_at, b.read_file_at, "seed {seed} layer {d}");
                        assert_eq!(
                            c.read_bytes - b.read_bytes,
                            reaching(&models, d, offset, len),
                            "seed {seed} layer {d}: only ranges left unallocated above go down"
                        );
                        if d == 0 {
                            assert_eq!(c.read_at - b.read_at, 1, "seed {seed}: one read");
                        }
                        continue;
                    }
                    assert_eq!(
                        c.mapped_bytes - b.mapped_bytes,
                        reaching(&models, d, offset, len),
                        "seed {seed} layer {d}: only ranges left unallocated above go down"
                    );
                    if d == 0 {
                        assert_eq!(c.map_file - b.map_file, 1, "seed {seed}: top mapped once");
                    }
                    if m.offsets {
                        assert_eq!(c.read_at, b.read_at, "seed {seed} layer {d}: no read_at");
                    } else {
                        assert_eq!(c.read_file_at, b.read_file_at, "seed {seed} layer {d}");
                    }
                }
            }
        }
    }

    fn fixed_model(size: u64, runs: Vec<MappedExtent>, file: Vec<u8>) -> Arc<Model> {
        Arc::new(Model {
            size,
            runs,
            file: MemStorage::from_bytes(file),
            offsets: true,
            calls: Mutex::default(),
        })
    }

    #[test]
    fn missing_data_is_an_error_never_zeros() {
        // The data run claims file bytes 8..24, but the file ends at 16 (a truncated file).
        let top = fixed_model(
            32,
            vec![
                MappedExtent {
                    offset: 0,
                    length: 16,
                    mapping: Mapping::Unallocated,
                },
                MappedExtent {
                    offset: 16,
                    length: 16,
                    mapping: Mapping::Data {
                        file_offset: Some(8),
                    },
                },
            ],
            vec![7; 16],
        );
        let base = fixed_model(
            32,
            vec![MappedExtent {
                offset: 0,
                length: 32,
                mapping: Mapping::Data {
                    file_offset: Some(0),
                },
            }],
            vec![9; 32],
        );
        let disk = disk_of(&[top, base]);
        let mut buf = [0u8; 16];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [9; 16]);
        let mut buf = [0u8; 32];
        let err = disk.read_at(0, &mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Io, "{err}");
    }

    #[test]
    fn a_map_that_does_not_tile_the_request_is_refused() {
        // A gap at 8..12: reading across it must fail rather than leave stale bytes.
        let gap = fixed_model(
            16,
            vec![
                MappedExtent {
                    offset: 0,
                    length: 8,
                    mapping: Mapping::Zero,
                },
                MappedExtent {
                    offset: 12,
                    length: 4,
                    mapping: Mapping::Zero,
                },
            ],
            Vec::new(),
        );
        // The gap is in the top layer (a map is only asked of layers with one below them).
        let base = || {
            fixed_model(
                16,
                vec![MappedExtent {
                    offset: 0,
                    length: 16,
                    mapping: Mapping::Data {
                        file_offset: Some(0),
                    },
                }],
                vec![9; 16],
            )
        };
        let disk = disk_of(&[gap, base()]);
        let mut buf = [1u8; 16];
        let err = disk.read_at(0, &mut buf).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
        assert!(err.to_string().contains("gap at 0x8"), "{err}");
        // A map that stops short is refused too.
        let short = fixed_model(
            16,
            vec![MappedExtent {
                offset: 0,
                length: 8,
                mapping: Mapping::Zero,
            }],
            Vec::new(),
        );
        let disk = disk_of(&[short, base()]);
        let err = disk.read_at(0, &mut buf).unwrap_err();
        assert!(err.to_string().contains("short of the request"), "{err}");
    }

    #[test]
    fn the_default_map_file_reads_through_read_at() {
        // An image that implements only `map` gets data runs without file offsets.
        #[derive(Debug)]
        struct OnlyMap(ModelLayer);
        impl Image for OnlyMap {
            fn format(&self) -> &'static str {
                "only-map"
            }
            fn path(&self) -> &Path {
                self.0.path()
            }
            fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
                self.0.read_at(offset, buf)
            }
            fn flush(&self) -> Result<()> {
                Ok(())
            }
            fn close(self: Box<Self>, _delete: bool) -> Result<()> {
                Ok(())
            }
            fn size(&self) -> u64 {
                self.0.size()
            }
            fn file_size(&self) -> Result<u64> {
                self.0.file_size()
            }
            fn image_flags(&self) -> ImageFlags {
                ImageFlags::empty()
            }
            fn open_flags(&self) -> OpenFlags {
                OpenFlags::READ_ONLY
            }
            fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
                self.0.map(offset, len)
            }
        }
        let model = fixed_model(
            16,
            vec![
                MappedExtent {
                    offset: 0,
                    length: 4,
                    mapping: Mapping::Data {
                        file_offset: Some(4),
                    },
                },
                MappedExtent {
                    offset: 4,
                    length: 12,
                    mapping: Mapping::Data {
                        file_offset: Some(0),
                    },
                },
            ],
            (1..=16).collect(),
        );
        let image = OnlyMap(ModelLayer {
            path: PathBuf::from("m"),
            model: model.clone(),
        });
        // Default: the kind-only runs, merged, with no file offsets.
        assert_eq!(
            image.map_file(0, 16).unwrap(),
            vec![MappedExtent {
                offset: 0,
                length: 16,
                mapping: Mapping::Data { file_offset: None }
            }]
        );
        assert_eq!(
            image.read_file_at(0, &mut [0u8; 1]).unwrap_err().kind(),
            ErrorKind::NotSupported
        );
        let disk = Disk::from_layers(vec![Box::new(image)]).unwrap();
        let mut buf = [0u8; 16];
        disk.read_at(0, &mut buf).unwrap();
        assert_eq!(buf, [5, 6, 7, 8, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        assert_eq!(model.calls().read_at, 1);
        assert_eq!(model.calls().read_file_at, 0);
    }

    #[test]
    fn chain_depth_limit() {
        let model = Arc::new(Model {
            size: 512,
            runs: Vec::new(),
            file: MemStorage::new(),
            offsets: false,
            calls: Mutex::new(Calls::default()),
        });
        // At the limit: accepted.
        let at = vec![model.clone(); MAX_CHAIN_DEPTH];
        assert_eq!(disk_of(&at).layers().len(), MAX_CHAIN_DEPTH);
        // Just over: a typed error naming the cap.
        let over: Vec<Box<dyn Image>> = (0..=MAX_CHAIN_DEPTH)
            .map(|i| {
                Box::new(ModelLayer {
                    path: PathBuf::from(format!("layer{i}")),
                    model: model.clone(),
                }) as Box<dyn Image>
            })
            .collect();
        let err = Disk::from_layers(over).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::BadChain);
        assert!(err.message().contains("deeper than 256"), "{err}");
    }
}
