//! Small in-memory backends for tests of the framework itself (the registry and [`Disk`]).
//!
//! - [`TagBackend`]: claims files that start with [`TAG_MAGIC`] with a configurable
//!   [`Confidence`] and probe priority, and opens them as a flat disk whose
//!   [`Image::format`] names the backend, so a test sees which backend won a probe.
//! - [`LayerBackend`]: "layer", a tiny differencing format that holds only some ranges, with
//!   UUIDs and parent names, so chains of any shape can be built byte by byte with [`LayerSpec`].
//!
//! [`Disk`]: crate::Disk

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{Mutex, MutexGuard};
use uuid::Uuid;

use super::fill_pattern;
use crate::{
    Backend, Capabilities, Confidence, CreateRequest, Error, ErrorKind, Extent, ExtentKind, Image,
    ImageFlags, MemFileSystem, MemStorage, OpenFlags, OpenRequest, Result, Storage,
    StorageProvider, check_range,
};

// ---------------------------------------------------------------------------------------------
// Tag: a probe-test backend.
// ---------------------------------------------------------------------------------------------

/// The signature at offset 0 that every [`TagBackend`] claims.
pub const TAG_MAGIC: [u8; 8] = *b"TAGFILE!";

/// A probe-order test backend: claims files starting with [`TAG_MAGIC`] with a fixed
/// confidence, and opens them read-only as a flat disk of the whole file.
#[derive(Debug, Clone)]
pub struct TagBackend {
    name: &'static str,
    priority: i32,
    confidence: Confidence,
}

impl TagBackend {
    /// A backend called `name`, with probe `priority`, answering `confidence` for tagged files.
    pub const fn new(name: &'static str, priority: i32, confidence: Confidence) -> Self {
        Self {
            name,
            priority,
            confidence,
        }
    }
}

/// [`TagBackend::new`], shared, ready for [`Registry::register`](crate::Registry::register).
pub fn tag(name: &'static str, priority: i32, confidence: Confidence) -> Arc<dyn Backend> {
    Arc::new(TagBackend::new(name, priority, confidence))
}

/// A file of `len` bytes that [`TagBackend`]s claim: [`TAG_MAGIC`], then `0x42` bytes.
pub fn tagged_file(len: usize) -> Vec<u8> {
    let mut v = TAG_MAGIC.to_vec();
    v.resize(len, 0x42);
    v
}

impl Backend for TagBackend {
    fn name(&self) -> &'static str {
        self.name
    }
    fn description(&self) -> &'static str {
        "probe-order test backend"
    }
    fn extensions(&self) -> &'static [&'static str] {
        &["tag"]
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::FILE
    }
    fn priority(&self) -> i32 {
        self.priority
    }
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        let mut magic = [0u8; 8];
        match storage.read_exact_at(0, &mut magic) {
            Ok(()) if magic == TAG_MAGIC => Ok(self.confidence),
            Ok(()) => Ok(Confidence::No),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Confidence::No),
            Err(e) => Err(Error::io("cannot read the magic", e).with_path(path)),
        }
    }
    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        let size = req
            .storage
            .len()
            .map_err(|e| Error::io("cannot read the size", e).with_path(req.path))?;
        Ok(Box::new(TagImage {
            format: self.name,
            path: req.path.to_path_buf(),
            storage: req.storage,
            flags: req.flags,
            size,
        }))
    }
}

/// The whole file as a flat disk, reporting which backend opened it.
struct TagImage {
    format: &'static str,
    path: PathBuf,
    storage: Arc<dyn Storage>,
    flags: OpenFlags,
    size: u64,
}

impl Image for TagImage {
    fn format(&self) -> &'static str {
        self.format
    }
    fn path(&self) -> &Path {
        &self.path
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size)?;
        self.storage
            .read_exact_at(offset, buf)
            .map_err(|e| Error::io("read failed", e).with_path(&self.path))
    }
    fn flush(&self) -> Result<()> {
        Ok(())
    }
    fn close(self: Box<Self>, _delete: bool) -> Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn file_size(&self) -> Result<u64> {
        Ok(self.size)
    }
    fn image_flags(&self) -> ImageFlags {
        ImageFlags::FIXED
    }
    fn open_flags(&self) -> OpenFlags {
        self.flags
    }
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        check_range(offset, len, self.size)?;
        Ok(vec![Extent {
            offset,
            length: len,
            kind: ExtentKind::Data,
        }])
    }
}

// ---------------------------------------------------------------------------------------------
// Layer: a differencing format that holds only some ranges.
// ---------------------------------------------------------------------------------------------

/// The signature on the first line of a layer file.
pub const LAYER_MAGIC: &[u8; 8] = b"VDLAYER1";
/// Size of a layer file's header; data follows it.
pub const LAYER_HEADER_SIZE: u64 = 4096;
/// A layer image's [`Image::map`] reports runs split at multiples of this.
pub const LAYER_MAP_BLOCK: u64 = 16 * 1024;

/// One stored range of a layer file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerExtent {
    /// Virtual offset of the range.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Where its bytes are in the file.
    pub file_offset: u64,
}

/// The header of a layer file.
///
/// On disk it is text, padded with NULs to [`LAYER_HEADER_SIZE`]:
///
/// ```text
/// VDLAYER1
/// size <virtual size>
/// uuid <uuid>                  (optional)
/// modification <uuid>          (optional)
/// parent-uuid <uuid>           (optional)
/// parent-modification <uuid>   (optional)
/// parent <path>                (zero or more: the parent candidates, in order)
/// extent <offset> <length> <file offset>   (zero or more; later ones win)
/// ```
///
/// An image with a parent is a differencing image. Ranges no extent covers are
/// [`ExtentKind::Unallocated`]. Writes append the data to the file and add an extent.
#[derive(Debug, Clone, Default)]
pub struct LayerHeader {
    /// Virtual size in bytes.
    pub size: u64,
    /// The image UUID, when set.
    pub uuid: Option<Uuid>,
    /// The modification UUID, when set.
    pub modification: Option<Uuid>,
    /// The parent's UUID, when set.
    pub parent_uuid: Option<Uuid>,
    /// The parent's modification UUID, when set.
    pub parent_modification: Option<Uuid>,
    /// Parent candidates, in order (relative names are relative to the image's directory).
    pub parents: Vec<String>,
    /// Stored ranges; a later one wins where they overlap.
    pub extents: Vec<LayerExtent>,
}

fn bad_header(msg: impl Into<String>) -> Error {
    Error::new(ErrorKind::InvalidHeader, msg)
}

impl LayerHeader {
    /// The header as it is stored: [`LAYER_HEADER_SIZE`] bytes.
    ///
    /// # Errors
    /// `InvalidArgument` when the text does not fit.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut s = String::from("VDLAYER1\n");
        s += &format!("size {}\n", self.size);
        for (key, id) in [
            ("uuid", self.uuid),
            ("modification", self.modification),
            ("parent-uuid", self.parent_uuid),
            ("parent-modification", self.parent_modification),
        ] {
            if let Some(id) = id {
                s += &format!("{key} {id}\n");
            }
        }
        for p in &self.parents {
            s += &format!("parent {p}\n");
        }
        for e in &self.extents {
            s += &format!("extent {} {} {}\n", e.offset, e.length, e.file_offset);
        }
        let mut bytes = s.into_bytes();
        let full = usize::try_from(LAYER_HEADER_SIZE).expect("the header size is 4096");
        if bytes.len() > full {
            return Err(Error::invalid_argument("the layer header is full"));
        }
        bytes.resize(full, 0);
        Ok(bytes)
    }

    /// Parses a header read from a file of `file_len` bytes.
    ///
    /// # Errors
    /// `InvalidHeader` for a missing signature, an unknown key, a bad number or UUID or no
    /// size; `OutOfRange` for an extent outside the disk or the file.
    pub fn decode(bytes: &[u8], file_len: u64) -> Result<Self> {
        let text = bytes.split(|&b| b == 0).next().unwrap_or_default();
        let text = std::str::from_utf8(text).map_err(|_| bad_header("header is not UTF-8"))?;
        let mut lines = text.lines();
        if lines.next() != Some("VDLAYER1") {
            return Err(bad_header("no VDLAYER1 signature"));
        }
        let num = |s: Option<&str>| -> Result<u64> {
            s.and_then(|s| s.parse().ok())
                .ok_or_else(|| bad_header("bad number"))
        };
        let id = |s: &str| Uuid::parse_str(s).map_err(|_| bad_header("bad uuid"));
        let mut h = Self::default();
        let mut have_size = false;
        for line in lines {
            let (key, rest) = line.split_once(' ').unwrap_or((line, ""));
            match key {
                "size" => {
                    h.size = num(Some(rest))?;
                    have_size = true;
                }
                "uuid" => h.uuid = Some(id(rest)?),
                "modification" => h.modification = Some(id(rest)?),
                "parent-uuid" => h.parent_uuid = Some(id(rest)?),
                "parent-modification" => h.parent_modification = Some(id(rest)?),
                "parent" => h.parents.push(rest.to_owned()),
                "extent" => {
                    let mut f = rest.split(' ');
                    let e = LayerExtent {
                        offset: num(f.next())?,
                        length: num(f.next())?,
                        file_offset: num(f.next())?,
                    };
                    check_range(e.offset, e.length, h.size)?;
                    check_range(e.file_offset, e.length, file_len)?;
                    h.extents.push(e);
                }
                other => return Err(bad_header(format!("unknown header key {other:?}"))),
            }
        }
        if !have_size {
            return Err(bad_header("no size"));
        }
        Ok(h)
    }
}

/// A layer file under construction (the test side of the format).
#[derive(Debug, Clone, Default)]
pub struct LayerSpec {
    /// The header; its extents are added by [`LayerSpec::bytes`] for [`LayerSpec::data`].
    pub header: LayerHeader,
    /// The ranges the file holds: virtual offset and bytes, later ones winning.
    pub data: Vec<(u64, Vec<u8>)>,
}

impl LayerSpec {
    /// A base image of `size` bytes holding nothing.
    pub fn base(size: u64) -> Self {
        Self {
            header: LayerHeader {
                size,
                ..LayerHeader::default()
            },
            data: Vec::new(),
        }
    }

    /// A differencing image of `size` bytes over `parent`.
    pub fn child(size: u64, parent: &str) -> Self {
        Self::base(size).parent(parent)
    }

    /// Adds a parent candidate.
    pub fn parent(mut self, parent: &str) -> Self {
        self.header.parents.push(parent.to_owned());
        self
    }

    /// Holds `[offset, offset + len)` filled with [`fill_pattern`] of `seed`.
    pub fn data(mut self, offset: u64, len: u64, seed: u8) -> Self {
        let mut bytes = vec![0u8; usize::try_from(len).expect("a test range fits in memory")];
        fill_pattern(&mut bytes, offset, seed);
        self.data.push((offset, bytes));
        self
    }

    /// Sets the modification UUID to `id` and the image UUID to one derived from it.
    pub fn modification(mut self, id: Uuid) -> Self {
        self.header.uuid = Some(Uuid::from_u128(id.as_u128() ^ 0xFFFF));
        self.header.modification = Some(id);
        self
    }

    /// Sets the parent UUID.
    pub fn parent_uuid(mut self, id: Uuid) -> Self {
        self.header.parent_uuid = Some(id);
        self
    }

    /// Sets the parent modification UUID.
    pub fn parent_modification(mut self, id: Uuid) -> Self {
        self.header.parent_modification = Some(id);
        self
    }

    /// The byte this layer holds at `pos`, or `None` when it holds nothing there.
    pub fn holds(&self, pos: u64) -> Option<u8> {
        self.data.iter().rev().find_map(|(off, bytes)| {
            let i = pos.checked_sub(*off)?;
            bytes.get(usize::try_from(i).ok()?).copied()
        })
    }

    /// The file's bytes: the header, then the data in order.
    ///
    /// # Panics
    /// When the header does not fit in [`LAYER_HEADER_SIZE`] (a test that builds too much).
    pub fn bytes(&self) -> Vec<u8> {
        let mut h = self.header.clone();
        let mut body = Vec::new();
        for (offset, bytes) in &self.data {
            h.extents.push(LayerExtent {
                offset: *offset,
                length: bytes.len() as u64,
                file_offset: LAYER_HEADER_SIZE + body.len() as u64,
            });
            body.extend_from_slice(bytes);
        }
        let mut out = h.encode().expect("header fits");
        out.extend_from_slice(&body);
        out
    }

    /// Stores the file at `path` in `fs`.
    pub fn put(&self, fs: &MemFileSystem, path: &str) {
        fs.insert(path, Arc::new(MemStorage::from_bytes(self.bytes())));
    }
}

/// The "layer" backend; see [`LayerHeader`] for the format.
#[derive(Debug, Default)]
pub struct LayerBackend {
    /// Images opened so far.
    pub opens: AtomicUsize,
}

impl Backend for LayerBackend {
    fn name(&self) -> &'static str {
        "layer"
    }
    fn description(&self) -> &'static str {
        "test differencing format holding some ranges"
    }
    fn extensions(&self) -> &'static [&'static str] {
        &["layer"]
    }
    fn capabilities(&self) -> Capabilities {
        Capabilities::FILE
            | Capabilities::CREATE_DYNAMIC
            | Capabilities::DIFF
            | Capabilities::WRITE
            | Capabilities::MAP
    }
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        let mut magic = [0u8; 8];
        match storage.read_exact_at(0, &mut magic) {
            Ok(()) if &magic == LAYER_MAGIC => Ok(Confidence::Certain),
            Ok(()) => Ok(Confidence::No),
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(Confidence::No),
            Err(e) => Err(Error::io("cannot read the signature", e).with_path(path)),
        }
    }
    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        let io_err = |op: &str, e| Error::io(op, e).with_path(req.path);
        let len = req
            .storage
            .len()
            .map_err(|e| io_err("cannot read the size", e))?;
        let head_len =
            usize::try_from(len.min(LAYER_HEADER_SIZE)).expect("at most the 4096-byte header");
        let mut head = vec![0u8; head_len];
        req.storage
            .read_exact_at(0, &mut head)
            .map_err(|e| io_err("cannot read the header", e))?;
        let header = LayerHeader::decode(&head, len).map_err(|e| e.with_path(req.path))?;
        self.opens.fetch_add(1, Ordering::Relaxed);
        Ok(Box::new(LayerImage {
            path: req.path.to_path_buf(),
            storage: req.storage,
            provider: req.provider,
            flags: req.flags,
            header: Mutex::new(header),
        }))
    }
    /// Writes an empty layer of `params.size` bytes with `params.uuid` as its UUID; over a
    /// parent, records the parent's path (as given) and its UUIDs where it has them.
    fn create(&self, req: CreateRequest<'_>) -> Result<Box<dyn Image>> {
        if req.params.image_flags.contains(ImageFlags::FIXED) {
            return Err(Error::invalid_argument(
                "layer images cannot be preallocated",
            ));
        }
        let mut header = LayerHeader {
            size: req.params.size,
            uuid: req.params.uuid,
            ..LayerHeader::default()
        };
        if let Some((path, parent)) = req.parent {
            header.parents.push(path.display().to_string());
            header.parent_uuid = parent.modification_uuid().ok();
        }
        let bytes = header.encode()?;
        req.storage
            .write_all_at(0, &bytes)
            .map_err(|e| Error::io("cannot write the header", e).with_path(req.path))?;
        self.open(OpenRequest {
            path: req.path,
            storage: req.storage,
            provider: req.provider,
            flags: OpenFlags::empty(),
        })
    }
}

/// An opened layer file.
struct LayerImage {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    provider: Arc<dyn StorageProvider>,
    flags: OpenFlags,
    header: Mutex<LayerHeader>,
}

impl LayerImage {
    fn header(&self) -> MutexGuard<'_, LayerHeader> {
        self.header.lock()
    }

    fn io(&self, op: &str, e: io::Error) -> Error {
        Error::io(op, e).with_path(&self.path)
    }

    fn opt(id: Option<Uuid>, what: &str) -> Result<Uuid> {
        id.ok_or_else(|| Error::not_supported(what))
    }
}

/// `n` (at most a buffer length) as an index.
fn idx(n: u64) -> usize {
    usize::try_from(n).expect("bounded by a buffer length")
}

impl Image for LayerImage {
    fn format(&self) -> &'static str {
        "layer"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let h = self.header();
        check_range(offset, buf.len() as u64, h.size)?;
        buf.fill(0);
        let end = offset + buf.len() as u64;
        for e in &h.extents {
            let start = e.offset.max(offset);
            let stop = (e.offset + e.length).min(end);
            if start < stop {
                let dst = &mut buf[idx(start - offset)..idx(stop - offset)];
                self.storage
                    .read_exact_at(e.file_offset + (start - e.offset), dst)
                    .map_err(|err| self.io("cannot read data", err))?;
            }
        }
        Ok(())
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        if self.flags.contains(OpenFlags::READ_ONLY) {
            return Err(Error::read_only("writing").with_path(&self.path));
        }
        let mut h = self.header();
        check_range(offset, buf.len() as u64, h.size)?;
        if buf.is_empty() {
            return Ok(());
        }
        let len = self.storage.len().map_err(|e| self.io("cannot size", e))?;
        let file_offset = len.max(LAYER_HEADER_SIZE);
        self.storage
            .write_all_at(file_offset, buf)
            .map_err(|e| self.io("cannot write data", e))?;
        h.extents.push(LayerExtent {
            offset,
            length: buf.len() as u64,
            file_offset,
        });
        let head = h.encode().map_err(|e| e.with_path(&self.path))?;
        self.storage
            .write_all_at(0, &head)
            .map_err(|e| self.io("cannot write the header", e))
    }

    fn flush(&self) -> Result<()> {
        self.storage.flush().map_err(|e| self.io("flush failed", e))
    }

    fn close(self: Box<Self>, delete: bool) -> Result<()> {
        if delete {
            return self
                .provider
                .delete(&self.path)
                .map_err(|e| self.io("cannot delete", e));
        }
        if self.flags.contains(OpenFlags::READ_ONLY) {
            Ok(())
        } else {
            self.flush()
        }
    }

    fn size(&self) -> u64 {
        self.header().size
    }

    fn file_size(&self) -> Result<u64> {
        self.storage.len().map_err(|e| self.io("cannot size", e))
    }

    fn image_flags(&self) -> ImageFlags {
        if self.header().parents.is_empty() {
            ImageFlags::empty()
        } else {
            ImageFlags::DIFF
        }
    }

    fn open_flags(&self) -> OpenFlags {
        self.flags
    }

    fn uuid(&self) -> Result<Uuid> {
        Self::opt(self.header().uuid, "image UUIDs")
    }

    fn modification_uuid(&self) -> Result<Uuid> {
        Self::opt(self.header().modification, "modification UUIDs")
    }

    fn parent_uuid(&self) -> Result<Uuid> {
        Self::opt(self.header().parent_uuid, "parent UUIDs")
    }

    fn parent_modification_uuid(&self) -> Result<Uuid> {
        Self::opt(
            self.header().parent_modification,
            "parent modification UUIDs",
        )
    }

    fn parent_filename(&self) -> Result<String> {
        self.header()
            .parents
            .first()
            .cloned()
            .ok_or_else(|| Error::not_supported("parent file names"))
    }

    fn parent_candidates(&self) -> Result<Vec<PathBuf>> {
        let h = self.header();
        if h.parents.is_empty() {
            return Err(Error::not_supported("parent file names"));
        }
        let dir = self.path.parent().unwrap_or_else(|| Path::new(""));
        Ok(h.parents.iter().map(|p| dir.join(p)).collect())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let h = self.header();
        check_range(offset, len, h.size)?;
        let end = offset + len;
        let mut held: Vec<(u64, u64)> = h
            .extents
            .iter()
            .map(|e| (e.offset.max(offset), (e.offset + e.length).min(end)))
            .filter(|(s, t)| s < t)
            .collect();
        held.sort_unstable();
        let mut out: Vec<Extent> = Vec::new();
        let mut pos = offset;
        for (s, t) in held {
            if t <= pos {
                continue;
            }
            let s = s.max(pos);
            if s > pos {
                out.push(Extent {
                    offset: pos,
                    length: s - pos,
                    kind: ExtentKind::Unallocated,
                });
            }
            out.push(Extent {
                offset: s,
                length: t - s,
                kind: ExtentKind::Data,
            });
            pos = t;
        }
        if pos < end {
            out.push(Extent {
                offset: pos,
                length: end - pos,
                kind: ExtentKind::Unallocated,
            });
        }
        // Like a block-based format, report runs piecewise: split at every stored extent
        // (above) and at every block boundary, never merged. Disk::map must merge them.
        let mut pieces = Vec::new();
        for e in out {
            let mut pos = e.offset;
            let end = e.offset + e.length;
            while pos < end {
                let next = ((pos / LAYER_MAP_BLOCK + 1) * LAYER_MAP_BLOCK).min(end);
                pieces.push(Extent {
                    offset: pos,
                    length: next - pos,
                    kind: e.kind,
                });
                pos = next;
            }
        }
        Ok(pieces)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Registry;

    fn header() -> LayerHeader {
        LayerHeader {
            size: 65536,
            uuid: Some(Uuid::from_u128(1)),
            modification: Some(Uuid::from_u128(2)),
            parent_uuid: Some(Uuid::from_u128(3)),
            parent_modification: Some(Uuid::from_u128(4)),
            parents: vec!["base.layer".into(), "/abs/base.layer".into()],
            extents: vec![LayerExtent {
                offset: 512,
                length: 100,
                file_offset: LAYER_HEADER_SIZE,
            }],
        }
    }

    #[test]
    fn the_layer_header_round_trips() {
        let h = header();
        let bytes = h.encode().expect("fits");
        assert_eq!(bytes.len() as u64, LAYER_HEADER_SIZE);
        assert!(bytes.starts_with(LAYER_MAGIC));
        let back = LayerHeader::decode(&bytes, LAYER_HEADER_SIZE + 100).expect("decode");
        assert_eq!(format!("{back:?}"), format!("{h:?}"));
    }

    #[test]
    fn bad_layer_headers_are_refused() {
        let ok = String::from_utf8(header().encode().expect("fits"))
            .expect("text")
            .trim_end_matches('\0')
            .to_owned();
        let file_len = LAYER_HEADER_SIZE + 100;
        for (text, kind) in [
            ("VDLAYER2\nsize 1\n".to_owned(), ErrorKind::InvalidHeader),
            ("VDLAYER1\n".to_owned(), ErrorKind::InvalidHeader),
            ("VDLAYER1\nsize x\n".to_owned(), ErrorKind::InvalidHeader),
            (
                "VDLAYER1\nsize 1\ncolour red\n".to_owned(),
                ErrorKind::InvalidHeader,
            ),
            (
                "VDLAYER1\nsize 1\nuuid nope\n".to_owned(),
                ErrorKind::InvalidHeader,
            ),
            (
                "VDLAYER1\nsize 1\nextent 0 1\n".to_owned(),
                ErrorKind::InvalidHeader,
            ),
            // An extent outside the disk, or outside the file.
            (
                "VDLAYER1\nsize 10\nextent 5 6 0\n".to_owned(),
                ErrorKind::OutOfRange,
            ),
            (ok.replace("100 4096", "101 4096"), ErrorKind::OutOfRange),
        ] {
            let e = LayerHeader::decode(text.as_bytes(), file_len).expect_err(&text);
            assert_eq!(e.kind(), kind, "{text:?}");
        }
        let full = LayerHeader {
            parents: vec!["p".repeat(5000)],
            ..LayerHeader::default()
        };
        assert_eq!(
            full.encode().expect_err("too long").kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn layer_images_read_write_and_map_what_they_hold() {
        let fs = Arc::new(MemFileSystem::new());
        let mut r = Registry::empty(fs.clone());
        let backend = Arc::new(LayerBackend::default());
        r.register(backend.clone()).expect("register");
        let spec = LayerSpec::child(64 * 1024, "base.layer")
            .data(1000, 10, 1)
            .data(1005, 10, 2);
        spec.put(&fs, "/l/top.layer");
        let img = r
            .open(Path::new("/l/top.layer"), OpenFlags::empty())
            .expect("open");
        assert_eq!(backend.opens.load(Ordering::Relaxed), 1);
        assert_eq!(img.image_flags(), ImageFlags::DIFF);
        assert_eq!(
            img.parent_candidates().expect("parents"),
            vec![PathBuf::from("/l/base.layer")]
        );
        let mut b = vec![0xEE; 20];
        img.read_at(998, &mut b).expect("read");
        let want: Vec<u8> = (998..1018).map(|p| spec.holds(p).unwrap_or(0)).collect();
        assert_eq!(b, want);
        assert_eq!(spec.holds(1007), Some(want[9]), "the later extent wins");
        assert_eq!(spec.holds(999), None);

        img.write_at(20_000, &[7; 3]).expect("write");
        let m = img.map(0, 32 * 1024).expect("map");
        let data: Vec<(u64, u64)> = m
            .iter()
            .filter(|e| e.kind == ExtentKind::Data)
            .map(|e| (e.offset, e.length))
            .collect();
        // Piecewise like a block format: split where stored extents meet, never merged.
        assert_eq!(data, vec![(1000, 10), (1010, 5), (20_000, 3)]);
        assert!(m.iter().all(|e| {
            e.offset / LAYER_MAP_BLOCK == (e.offset + e.length - 1) / LAYER_MAP_BLOCK
        }));
        img.close(false).expect("close");
        let img = r
            .open(Path::new("/l/top.layer"), OpenFlags::READ_ONLY)
            .expect("reopen");
        let mut b = [0u8; 3];
        img.read_at(20_000, &mut b).expect("read");
        assert_eq!(b, [7; 3]);
        assert_eq!(
            img.write_at(0, &[1]).expect_err("read-only").kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            img.uuid().expect_err("no uuid").kind(),
            ErrorKind::NotSupported
        );
    }

    #[test]
    fn tag_images_are_the_whole_file() {
        let b = TagBackend::new("t", 0, Confidence::Likely);
        let fs = Arc::new(MemFileSystem::new());
        let bytes = tagged_file(100);
        let img = b
            .open(OpenRequest {
                path: Path::new("/t"),
                storage: Arc::new(MemStorage::from_bytes(bytes.clone())),
                provider: fs,
                flags: OpenFlags::READ_ONLY,
            })
            .expect("open");
        assert_eq!((img.format(), img.size()), ("t", 100));
        let mut all = vec![0u8; 100];
        img.read_at(0, &mut all).expect("read");
        assert_eq!(all, bytes);
        assert_eq!(img.image_flags(), ImageFlags::FIXED);
        assert_eq!(
            img.read_at(99, &mut [0, 0])
                .expect_err("past the end")
                .kind(),
            ErrorKind::OutOfRange
        );
    }
}
