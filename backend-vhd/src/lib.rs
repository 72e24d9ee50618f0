//! # backend-vhd
//!
//! Microsoft VHD images (Virtual PC, Hyper-V, Disk2vhd, QEMU's `vpc`), per the *Virtual Hard
//! Disk Image Format Specification*: fixed, dynamic and differencing images, read and written,
//! created (`subformat=fixed|dynamic`, `block_size`, `azure=on`; see [`CREATE_OPTIONS`]),
//! discarded, and with their UUIDs, geometry and parent settable. The write order that keeps an
//! image whole through a crash is described in the `write` module.
//!
//! - The footer (`conectix`, big-endian, one's-complement checksum) is read from the end of
//!   the file (the last 512 bytes, or 511 for images older than Virtual PC 2004); when it is
//!   damaged, the copy at offset 0 of a dynamic or differencing image is used, with a warning.
//! - The virtual size is the footer's Current Size, as Windows, Hyper-V and Azure read it (not
//!   the product of its CHS geometry, which QEMU uses for some creators).
//! - Dynamic images: the dynamic header (`cxsparse`), the BAT (`0xFFFFFFFF` = not allocated)
//!   and each block's sector bitmap, most significant bit first. Sectors whose bit is clear read
//!   from the parent in a differencing image and as zeros otherwise.
//! - Differencing images: parent candidates from the `W2ru`, `W2ku` and `MacX` locators and the
//!   Parent Unicode Name, resolved against the child's folder; the parent must be a VHD whose
//!   unique ID is the child's Parent Unique ID (the parent time stamp is not compared: Windows
//!   children store 0).
//!
//! Every value read from the file is checked before it sizes an allocation or a read
//! ([`format::MAX_TABLE_ENTRIES`], [`format::MAX_BLOCK_SIZE`], [`format::MAX_LOCATOR_LEN`]).
//!
//! Link it into a binary with `use backend_vhd as _;`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]

pub mod check;
mod compact;
mod create;
pub mod format;
mod resize;
mod write;

pub use create::{CREATE_OPTIONS, azure_size};

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use flag_cell::Flags;
use parking_lot::RwLock;
use uuid::Uuid;
use vd_core::linkme::distributed_slice;
use vd_core::{
    BACKENDS, Backend, BlockRuns, ByteSize, Capabilities, CheckReport, Confidence, Error,
    ErrorKind, Extent, Facts, Geometry, Image, ImageFlags, LayoutRegion, LinkageMismatch,
    MappedExtent, Mapping, OpenFlags, OpenRequest, ParentCandidates, RegionKind, Result, Storage,
    StorageProvider, Warning, check_range, kind_runs, push_extent,
};

use format::{
    DiskType, FOOTER_COOKIE, FOOTER_SIZE, Footer, HEADER_SIZE, Header, MAX_LOCATOR_LEN, SECTOR,
    UNALLOCATED,
};

/// The VHD backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct VhdBackend;

#[distributed_slice(BACKENDS)]
static VHD: &'static dyn Backend = &VhdBackend;

/// The footer size of images older than Virtual PC 2004.
const OLD_FOOTER_SIZE: u64 = 511;

/// The priority VHD probes with: below VHDX (100), above raw.
pub const VHD_PRIORITY: i32 = 50;

fn io_err(op: &str, path: &Path, e: io::Error) -> Error {
    Error::io(op, e).with_path(path)
}

/// Reads `buf` at `offset`, or returns `false` when the file is too short.
fn read_if_there(storage: &dyn Storage, offset: u64, buf: &mut [u8]) -> io::Result<bool> {
    match storage.read_exact_at(offset, buf) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

impl Backend for VhdBackend {
    fn name(&self) -> &'static str {
        "vhd"
    }

    fn description(&self) -> &'static str {
        "Microsoft VHD (Virtual PC / Hyper-V virtual hard disk)"
    }

    fn extensions(&self) -> &'static [&'static str] {
        &["vhd", "avhd"]
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::FILE
            | Capabilities::UUID
            | Capabilities::DIFF
            | Capabilities::MAP
            | Capabilities::WRITE
            | Capabilities::DISCARD
            | Capabilities::CREATE_DYNAMIC
            | Capabilities::CREATE_FIXED
            | Capabilities::RESIZE
            | Capabilities::COMPACT
            | Capabilities::REPAIR
    }

    fn priority(&self) -> i32 {
        VHD_PRIORITY
    }

    /// `Certain` when `conectix` starts the last 512 bytes, the last 511 (images older than
    /// Virtual PC 2004) or the file (the footer copy of a dynamic image); `No` otherwise. Reads
    /// at most 24 bytes.
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        let err = |e| io_err("cannot read the VHD footer", path, e);
        let len = storage.len().map_err(err)?;
        let mut cookie = [0u8; 8];
        for back in [FOOTER_SIZE as u64, OLD_FOOTER_SIZE] {
            if let Some(at) = len.checked_sub(back)
                && read_if_there(storage, at, &mut cookie).map_err(err)?
                && cookie == FOOTER_COOKIE
            {
                return Ok(Confidence::Certain);
            }
        }
        if read_if_there(storage, 0, &mut cookie).map_err(err)? && cookie == FOOTER_COOKIE {
            return Ok(Confidence::Certain);
        }
        Ok(Confidence::No)
    }

    /// Opens an image. An image whose footer at the end is damaged opens read-only only
    /// (from the copy at 0); `vd-tool check -r all` repairs it.
    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        VhdImage::open(req).map(|i| Box::new(i) as Box<dyn Image>)
    }

    fn create_options(&self) -> &'static [vd_core::CreateOption] {
        CREATE_OPTIONS
    }

    /// Creates a fixed, dynamic or differencing image, with the options of
    /// [`Backend::create_options`].
    fn create(&self, req: vd_core::CreateRequest<'_>) -> Result<Box<dyn Image>> {
        create::create(&req).map_err(|e| e.with_path(req.path))?;
        VhdImage::open(OpenRequest {
            path: req.path,
            storage: req.storage,
            provider: req.provider,
            flags: OpenFlags::empty(),
        })
        .map(|i| Box::new(i) as Box<dyn Image>)
    }
}

/// The parts of a dynamic or differencing image beyond the footer.
#[derive(Debug)]
struct Dynamic {
    header: Header,
    /// The dynamic header as stored, for edits that keep its other bytes.
    header_raw: [u8; HEADER_SIZE],
    header_offset: u64,
    /// The BAT: block `i`'s first sector in the file, or [`UNALLOCATED`].
    bat: Vec<u32>,
    /// Bytes of each block's sector bitmap (a whole number of sectors).
    bitmap_size: u64,
    /// Sector bitmaps changed since the last flush (block index to bitmap): written by
    /// [`Image::flush`] after the data they describe is durable.
    dirty_bitmaps: BTreeMap<usize, Vec<u8>>,
    /// BAT entries changed since the last flush: written by [`Image::flush`] after their
    /// blocks' bitmaps are durable.
    dirty_bat: BTreeSet<usize>,
}

/// What an image knows of its file, changed by writes and edits.
#[derive(Debug)]
struct Meta {
    footer: Footer,
    /// The footer as stored, for edits that keep its other bytes.
    footer_raw: [u8; FOOTER_SIZE],
    /// Where the footer is (the end of the data): new blocks go here.
    footer_offset: u64,
    dynamic: Option<Dynamic>,
    file_len: u64,
    /// The footer at the end is damaged and was read from the copy at 0: nothing is written
    /// until a repair restores it.
    footer_from_copy: bool,
    /// What was tolerated when the file was read.
    warnings: Vec<Warning>,
}

/// An opened VHD image.
#[derive(Debug)]
pub struct VhdImage {
    path: PathBuf,
    storage: Arc<dyn Storage>,
    provider: Arc<dyn StorageProvider>,
    flags: Flags,
    meta: RwLock<Meta>,
}

/// A tiny lock-free holder of the open flags (only `READ_ONLY`-preserving changes are
/// accepted, so a plain atomic suffices).
mod flag_cell {
    use std::sync::atomic::{AtomicU32, Ordering};
    use vd_core::OpenFlags;

    /// The open flags of an image.
    #[derive(Debug)]
    pub struct Flags(AtomicU32);

    impl Flags {
        pub fn new(f: OpenFlags) -> Self {
            Self(AtomicU32::new(f.bits()))
        }
        pub fn get(&self) -> OpenFlags {
            OpenFlags::from_bits_retain(self.0.load(Ordering::Relaxed))
        }
        pub fn set(&self, f: OpenFlags) {
            self.0.store(f.bits(), Ordering::Relaxed);
        }
    }
}

impl VhdImage {
    fn open(req: OpenRequest<'_>) -> Result<Self> {
        let path = req.path;
        let meta = Self::load(req.storage.as_ref(), req.flags).map_err(|e| e.with_path(path))?;
        Ok(Self {
            path: path.to_path_buf(),
            storage: req.storage,
            provider: req.provider,
            flags: Flags::new(req.flags),
            meta: RwLock::new(meta),
        })
    }

    /// Reads the footer and, for dynamic and differencing images, the dynamic header and the
    /// BAT. Opened for writing, a dynamic image whose footer copy at 0 differs from its sound
    /// footer at the end (an edit cut short by a crash) gets the copy rewritten.
    fn load(storage: &dyn Storage, flags: OpenFlags) -> Result<Meta> {
        let file_len = storage
            .len()
            .map_err(|e| Error::io("cannot read the size", e))?;
        let mut warnings = Vec::new();
        let (footer, footer_raw, footer_offset) =
            Self::read_footer(storage, file_len, &mut warnings)?;
        let footer_from_copy = !warnings.is_empty();
        let dynamic = match footer.disk_type {
            DiskType::Fixed => {
                if footer.current_size > footer_offset {
                    return Err(Error::corrupt(
                        "footer current size",
                        footer_offset,
                        format!(
                            "fixed image of {} bytes, but the footer sits at {footer_offset:#x}: the file is truncated",
                            footer.current_size
                        ),
                    ));
                }
                None
            }
            DiskType::Dynamic | DiskType::Differencing => {
                Some(Self::read_dynamic(storage, &footer, file_len)?)
            }
        };
        if dynamic.is_some() && !footer_from_copy && !flags.contains(OpenFlags::READ_ONLY) {
            let mut copy = [0u8; FOOTER_SIZE];
            let io = |e| Error::io("cannot restore the footer copy", e).with_offset(0);
            storage.read_exact_at(0, &mut copy).map_err(io)?;
            if copy != footer_raw {
                storage.write_all_at(0, &footer_raw).map_err(io)?;
                storage.flush().map_err(io)?;
            }
        }
        Ok(Meta {
            footer,
            footer_raw,
            footer_offset,
            dynamic,
            file_len,
            footer_from_copy,
            warnings,
        })
    }

    /// The footer at the end of the file (512 bytes, or 511 for old images), else its copy at
    /// offset 0 with a warning.
    fn read_footer(
        storage: &dyn Storage,
        file_len: u64,
        warnings: &mut Vec<Warning>,
    ) -> Result<(Footer, [u8; FOOTER_SIZE], u64)> {
        let read = |at: u64, len: usize| -> Result<[u8; FOOTER_SIZE]> {
            let mut b = [0u8; FOOTER_SIZE];
            let part = b.get_mut(..len).unwrap_or_default();
            storage
                .read_exact_at(at, part)
                .map_err(|e| Error::io("cannot read the VHD footer", e).with_offset(at))?;
            Ok(b)
        };
        let mut end_error = None;
        for len in [FOOTER_SIZE, FOOTER_SIZE.saturating_sub(1)] {
            let Some(at) = file_len.checked_sub(len as u64) else {
                continue;
            };
            let bytes = read(at, len)?;
            match format::parse_footer(&bytes, at) {
                Ok(f) => return Ok((f, bytes, at)),
                // A 511-byte footer is tried only when the 512-byte one has no cookie.
                Err(e) if e.context().field.as_deref() == Some("footer cookie") => {
                    end_error.get_or_insert(e);
                }
                Err(e) => {
                    end_error = Some(e);
                    break;
                }
            }
        }
        let end_error = end_error.unwrap_or_else(|| {
            Error::new(
                ErrorKind::InvalidHeader,
                format!("file of {file_len} bytes is too short for a VHD footer"),
            )
            .with_field("footer")
        });
        if file_len < FOOTER_SIZE as u64 {
            return Err(end_error);
        }
        let copy = read(0, FOOTER_SIZE)?;
        match format::parse_footer(&copy, 0) {
            Ok(f) if f.disk_type != DiskType::Fixed => {
                warnings.push(Warning::from_error(
                    &Error::new(
                        end_error.kind(),
                        format!("{end_error}; using the footer copy at offset 0"),
                    )
                    .with_field(end_error.context().field.clone().unwrap_or_default())
                    .with_offset(end_error.context().offset.unwrap_or(0)),
                ));
                // The copy stands for the footer at the end: the data ends before it.
                let at = file_len.saturating_sub(FOOTER_SIZE as u64);
                Ok((f, copy, at))
            }
            _ => Err(end_error),
        }
    }

    fn read_dynamic(storage: &dyn Storage, footer: &Footer, file_len: u64) -> Result<Dynamic> {
        let at = footer.data_offset;
        let fits = at
            .checked_add(HEADER_SIZE as u64)
            .is_some_and(|end| end <= file_len);
        if !fits {
            return Err(Error::new(
                ErrorKind::InvalidHeader,
                format!(
                    "dynamic header at {at:#x} lies beyond the end of the file ({file_len} bytes)"
                ),
            )
            .with_field("footer data offset")
            .with_offset(at));
        }
        let mut bytes = [0u8; HEADER_SIZE];
        storage
            .read_exact_at(at, &mut bytes)
            .map_err(|e| Error::io("cannot read the dynamic header", e).with_offset(at))?;
        let header = format::parse_header(&bytes, at, file_len)?;
        let block = u64::from(header.block_size);
        let entries = u64::from(header.max_table_entries);
        if entries.saturating_mul(block) < footer.current_size {
            return Err(Error::new(
                ErrorKind::InvalidHeader,
                format!(
                    "{entries} BAT entries of {block}-byte blocks cover less than the disk's {} bytes",
                    footer.current_size
                ),
            )
            .with_field("dynamic header max table entries")
            .with_offset(at));
        }
        // Bounded by MAX_TABLE_ENTRIES and the file length (parse_header).
        let table_len = usize::try_from(entries.saturating_mul(4))
            .map_err(|_| Error::invalid_argument("BAT too large for this machine"))?;
        let mut raw = vec![0u8; table_len];
        storage
            .read_exact_at(header.table_offset, &mut raw)
            .map_err(|e| Error::io("cannot read the BAT", e).with_offset(header.table_offset))?;
        // One bit per sector, rounded up to whole sectors.
        let sectors_per_block = block / SECTOR;
        let bitmap_size = sectors_per_block
            .div_ceil(8)
            .div_ceil(SECTOR)
            .saturating_mul(SECTOR);
        let block_span = bitmap_size.saturating_add(block);
        let mut bat = Vec::with_capacity(raw.len() / 4);
        for (i, c) in raw.chunks_exact(4).enumerate() {
            let e = u32::from_be_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
                c.get(2).copied().unwrap_or(0),
                c.get(3).copied().unwrap_or(0),
            ]);
            if e != UNALLOCATED {
                let start = u64::from(e).saturating_mul(SECTOR);
                if start.saturating_add(block_span) > file_len {
                    let entry_at = header
                        .table_offset
                        .saturating_add((i as u64).saturating_mul(4));
                    return Err(Error::corrupt(
                        format!("BAT entry {i}"),
                        entry_at,
                        format!(
                            "block {i} at {start:#x} ({block_span} bytes with its bitmap) extends beyond the end of the file ({file_len} bytes)"
                        ),
                    ));
                }
            }
            bat.push(e);
        }
        Ok(Dynamic {
            header,
            header_raw: bytes,
            header_offset: at,
            bat,
            bitmap_size,
            dirty_bitmaps: BTreeMap::new(),
            dirty_bat: BTreeSet::new(),
        })
    }

    fn at<T>(&self, r: Result<T>) -> Result<T> {
        r.map_err(|e| e.with_path(&self.path))
    }
}

impl Meta {
    fn is_diff(&self) -> bool {
        self.footer.disk_type == DiskType::Differencing
    }

    /// What a sector not held by this image reads as.
    fn absent(&self) -> Mapping {
        if self.is_diff() {
            Mapping::Unallocated
        } else {
            Mapping::Zero
        }
    }

    /// The sector bitmap of block `index`, stored at `bitmap_at`, into `out`: the one changed
    /// since the last flush, else the one in the file.
    fn bitmap(
        dy: &Dynamic,
        storage: &dyn Storage,
        index: usize,
        bitmap_at: u64,
        out: &mut Vec<u8>,
    ) -> Result<()> {
        if let Some(b) = dy.dirty_bitmaps.get(&index) {
            out.clone_from(b);
            return Ok(());
        }
        out.resize(usize::try_from(dy.bitmap_size).unwrap_or(0), 0);
        storage
            .read_exact_at(bitmap_at, out)
            .map_err(|e| Error::io("cannot read a sector bitmap", e).with_offset(bitmap_at))
    }

    fn mapped(&self, storage: &dyn Storage, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        check_range(offset, len, self.footer.current_size)?;
        let mut out = Vec::new();
        // Within the disk: checked above.
        let end = offset.saturating_add(len);
        let Some(dy) = &self.dynamic else {
            push_extent(
                &mut out,
                MappedExtent {
                    offset,
                    length: len,
                    mapping: Mapping::Data {
                        file_offset: Some(offset),
                    },
                },
            );
            return Ok(out);
        };
        let block = u64::from(dy.header.block_size);
        let mut pos = offset;
        let mut bitmap = Vec::new();
        while pos < end {
            // block > 0 (a power of two of at least 512).
            let index = pos.checked_div(block).unwrap_or(0);
            let block_start = index.saturating_mul(block);
            let block_end = block_start.saturating_add(block).min(end);
            let entry = usize::try_from(index)
                .ok()
                .and_then(|i| dy.bat.get(i))
                .copied()
                .unwrap_or(UNALLOCATED);
            if entry == UNALLOCATED {
                push_extent(
                    &mut out,
                    MappedExtent {
                        offset: pos,
                        length: block_end.saturating_sub(pos),
                        mapping: self.absent(),
                    },
                );
                pos = block_end;
                continue;
            }
            // Checked at open: the bitmap and the block lie inside the file.
            let bitmap_at = u64::from(entry).saturating_mul(SECTOR);
            let data_at = bitmap_at.saturating_add(dy.bitmap_size);
            let i = usize::try_from(index).unwrap_or(usize::MAX);
            Self::bitmap(dy, storage, i, bitmap_at, &mut bitmap)?;
            while pos < block_end {
                let in_block = pos.saturating_sub(block_start);
                let sector = in_block / SECTOR;
                let byte = usize::try_from(sector / 8)
                    .ok()
                    .and_then(|i| bitmap.get(i))
                    .copied()
                    .unwrap_or(0);
                // Most significant bit first.
                let bit = u32::try_from(sector % 8).unwrap_or(0);
                let set = byte.checked_shl(bit).is_some_and(|b| b & 0x80 != 0);
                let sector_end = block_start
                    .saturating_add(sector.saturating_add(1).saturating_mul(SECTOR))
                    .min(block_end);
                let mapping = if set {
                    Mapping::Data {
                        file_offset: Some(data_at.saturating_add(in_block)),
                    }
                } else {
                    self.absent()
                };
                push_extent(
                    &mut out,
                    MappedExtent {
                        offset: pos,
                        length: sector_end.saturating_sub(pos),
                        mapping,
                    },
                );
                pos = sector_end;
            }
        }
        Ok(out)
    }

    /// The dynamic header of a differencing image.
    fn header(&self, what: &str) -> Result<&Header> {
        match &self.dynamic {
            Some(d) if self.is_diff() => Ok(&d.header),
            _ => Err(Error::not_supported(what)),
        }
    }

    /// The decoded parent locators of a differencing image, as (platform code, path).
    fn locator_paths(&self, storage: &dyn Storage) -> Vec<(String, String)> {
        let Some(d) = &self.dynamic else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for l in &d.header.locators {
            if l.length == 0 || l.length > MAX_LOCATOR_LEN {
                continue;
            }
            let fits = l
                .offset
                .checked_add(u64::from(l.length))
                .is_some_and(|e| e <= self.file_len);
            let Ok(n) = usize::try_from(l.length) else {
                continue;
            };
            let mut buf = vec![0u8; n];
            if fits
                && storage.read_exact_at(l.offset, &mut buf).is_ok()
                && let Some(p) = format::decode_locator(&l.code, &buf)
            {
                out.push((l.code.escape_ascii().to_string(), p));
            }
        }
        out
    }
}

/// Seconds between 1970-01-01 and 2000-01-01, the VHD epoch.
pub(crate) const VHD_EPOCH: u64 = 946_684_800;

impl Image for VhdImage {
    fn format(&self) -> &'static str {
        "vhd"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let m = self.meta.read();
        self.at(self.read_with(&m, offset, buf))
    }

    /// Fixed images write in place. Dynamic and differencing images allocate blocks at the end
    /// of the file (the footer moves past them first), write the data, and set the sectors'
    /// bitmap bits in memory; [`flush`](Image::flush) stores the bitmaps and the BAT.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable()?;
        {
            // A fixed image's writes share the lock: they change no metadata.
            let m = self.meta.read();
            if m.dynamic.is_none() {
                return self.at(self.write_fixed(&m, offset, buf));
            }
        }
        let mut m = self.meta.write();
        self.at(self.write_with(&mut m, offset, buf))
    }

    /// Makes the data durable, then the changed sector bitmaps, then the changed BAT entries,
    /// each behind its own flush: a BAT entry never reaches the disk before the bitmap and the
    /// data it points to.
    fn flush(&self) -> Result<()> {
        if self.open_flags().contains(OpenFlags::READ_ONLY) {
            return Ok(());
        }
        let mut m = self.meta.write();
        self.at(self.flush_with(&mut m))
    }

    fn close(self: Box<Self>, delete: bool) -> Result<()> {
        if !delete {
            self.flush()?;
        }
        if delete {
            self.provider
                .delete(&self.path)
                .map_err(|e| io_err("cannot delete", &self.path, e))?;
        }
        Ok(())
    }

    fn size(&self) -> u64 {
        self.meta.read().footer.current_size
    }

    /// Differencing images record whole sectors as in the child or in its parent.
    fn write_granularity(&self) -> u32 {
        if self.meta.read().is_diff() {
            SECTOR as u32
        } else {
            1
        }
    }

    fn file_size(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| io_err("cannot read the size", &self.path, e))
    }

    /// The footer's CHS geometry.
    fn pchs_geometry(&self) -> Result<Geometry> {
        let (c, h, s) = self.meta.read().footer.chs;
        Ok(Geometry {
            cylinders: u32::from(c),
            heads: u32::from(h),
            sectors: u32::from(s),
        })
    }

    /// Stores `geometry` in the footer (and its copy).
    fn set_pchs_geometry(&self, geometry: Geometry) -> Result<()> {
        let chs = (
            u16::try_from(geometry.cylinders)
                .map_err(|_| Error::invalid_argument("more than 65535 cylinders"))?,
            u8::try_from(geometry.heads)
                .map_err(|_| Error::invalid_argument("more than 255 heads"))?,
            u8::try_from(geometry.sectors)
                .map_err(|_| Error::invalid_argument("more than 255 sectors per track"))?,
        );
        self.edit_footer(|f| f.set_chs(chs))
    }

    fn image_flags(&self) -> ImageFlags {
        match self.meta.read().footer.disk_type {
            DiskType::Fixed => ImageFlags::FIXED,
            DiskType::Dynamic => ImageFlags::empty(),
            DiskType::Differencing => ImageFlags::DIFF,
        }
    }

    fn open_flags(&self) -> OpenFlags {
        self.flags.get()
    }

    /// Changes the open flags. Going from writable to read-only flushes first; going from
    /// read-only to writable relocks the file for writing.
    fn set_open_flags(&self, flags: OpenFlags) -> Result<()> {
        let was_read_only = self.open_flags().contains(OpenFlags::READ_ONLY);
        let read_only = flags.contains(OpenFlags::READ_ONLY);
        if !was_read_only && read_only {
            self.flush()?;
        }
        if was_read_only != read_only {
            let mode = vd_core::OpenMode::from_flags(flags)?;
            self.storage
                .relock(Some(mode))
                .map_err(|e| io_err("cannot change the image's lock", &self.path, e))?;
        }
        self.flags.set(flags);
        Ok(())
    }

    /// The footer's unique ID.
    fn uuid(&self) -> Result<Uuid> {
        Ok(self.meta.read().footer.unique_id)
    }

    /// Stores a new unique ID in the footer and its copy. Children recording the old one no
    /// longer open over this image.
    fn set_uuid(&self, uuid: Uuid) -> Result<()> {
        self.edit_footer(|f| f.set_unique_id(uuid))
    }

    /// VHD has one identity: the unique ID, which is what a child records of its parent.
    fn modification_uuid(&self) -> Result<Uuid> {
        self.uuid()
    }

    /// The dynamic header's Parent Unique ID.
    fn parent_uuid(&self) -> Result<Uuid> {
        let m = self.meta.read();
        self.at(m
            .header("parent UUIDs of images without a parent")
            .map(|h| h.parent_unique_id))
    }

    /// Stores `uuid` as the Parent Unique ID.
    fn set_parent_uuid(&self, uuid: Uuid) -> Result<()> {
        self.edit_header(|h| h.set_parent_unique_id(uuid))
    }

    /// The dynamic header's Parent Unicode Name.
    fn parent_filename(&self) -> Result<String> {
        let m = self.meta.read();
        self.at(m
            .header("parent file names of images without a parent")
            .map(|h| h.parent_unicode_name.clone()))
    }

    /// Records `name` as the parent: the Parent Unicode Name gets its file name, the `W2ru`
    /// locator the path relative to this image and the `W2ku` locator the path itself, each
    /// where the reserved space holds it (refused before any write when it does not).
    fn set_parent_filename(&self, name: &str) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        self.at(self.set_parent_with(&mut m, name))
    }

    /// The relative locators (`W2ru`), the absolute ones (`W2ku`, `MacX`; a Windows drive
    /// letter maps to `/mnt/<letter>`), then the file names of all of them and of the Parent
    /// Unicode Name beside the child.
    fn parent_candidates(&self) -> Result<Vec<PathBuf>> {
        let m = self.meta.read();
        let header = self.at(m.header("parent lookup of images without a parent"))?;
        let mut c = ParentCandidates::new(&self.path, self.provider.as_ref());
        let mut locators = m.locator_paths(self.storage.as_ref());
        // Relative first: they survive moving the pair together.
        locators.sort_by_key(|(code, _)| code != "W2ru");
        for (code, p) in &locators {
            match code.as_str() {
                "W2ru" => c.relative(p),
                "W2ku" => c.windows_absolute(p),
                _ => {
                    c.host(PathBuf::from(p));
                    c.name(p);
                }
            }
        }
        c.name(&header.parent_unicode_name);
        Ok(c.into_paths())
    }

    /// The parent must be a VHD whose unique ID is this child's Parent Unique ID. The parent
    /// time stamp is not compared: Windows stores 0 there.
    fn check_parent(&self, parent: &dyn Image) -> Result<()> {
        if parent.format() != "vhd" {
            return Err(Error::new(
                ErrorKind::ParentMismatch,
                format!(
                    "parent {} is not a VHD image (it opens as {}): the parent of a VHD \
                     differencing image is a VHD image",
                    parent.path().display(),
                    parent.format()
                ),
            )
            .with_path(&self.path));
        }
        let expected = self.parent_uuid()?;
        let found = parent.uuid()?;
        if found == expected {
            Ok(())
        } else {
            Err(Error::linkage(LinkageMismatch {
                child: self.path.clone(),
                parent: parent.path().to_path_buf(),
                found,
                expected,
            }))
        }
    }

    /// The footer's time stamp.
    fn timestamp(&self) -> Result<SystemTime> {
        let secs = VHD_EPOCH.saturating_add(u64::from(self.meta.read().footer.time_stamp));
        SystemTime::UNIX_EPOCH
            .checked_add(Duration::from_secs(secs))
            .ok_or_else(|| Error::invalid_argument("time stamp out of range"))
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(kind_runs(self.map_file(offset, len)?))
    }

    /// A fixed image is one data run at the same offsets. In a dynamic image, sectors whose
    /// bitmap bit is set map to their place in their block; the others, and blocks the BAT
    /// does not allocate, are [`Mapping::Unallocated`] in a differencing image and
    /// [`Mapping::Zero`] otherwise.
    fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        let m = self.meta.read();
        self.at(m.mapped(self.storage.as_ref(), offset, len))
    }

    fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage
            .read_exact_at(file_offset, buf)
            .map_err(|e| io_err("read failed", &self.path, e).with_offset(file_offset))
    }

    /// Dynamic images: the sectors' bitmap bits are cleared (they read as zeros) and their
    /// data is released to the file system; partial sectors at the edges are written with
    /// zeros. Fixed images: the range is zeroed in place. Differencing images cannot record
    /// "zero" (a clear bit reads the parent): `NotSupported`.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        self.at(self.discard_with(&mut m, offset, len))
    }

    /// As [`discard`](Image::discard) for fixed and dynamic images; differencing images get
    /// zeros written.
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        self.at(self.write_zeroes_with(&mut m, offset, len))
    }

    /// Changes the virtual size: see the `resize` module for the order of the writes. A
    /// shrink is refused when the part cut off holds data; a dynamic image holds at most
    /// 2040 GiB. The geometry follows the new size.
    fn resize(&self, new_size: u64, progress: vd_core::Progress<'_>) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        self.at(self.flush_with(&mut m))?;
        self.at(self.resize_with(&mut m, new_size, progress))
    }

    /// Releases the blocks of a dynamic or differencing image that hold nothing, moves the
    /// others down into the holes and shortens the file: see the `compact` module. Fixed
    /// images: `NotSupported` (nothing to release).
    fn compact(&self, progress: vd_core::Progress<'_>) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        self.at(self.flush_with(&mut m))?;
        self.at(self.compact_with(&mut m, progress))
    }

    fn warnings(&self) -> Vec<Warning> {
        self.meta.read().warnings.clone()
    }

    /// Checks the file from scratch, as [`check::check`] does (never from what the open
    /// read), and repairs what is safe unless `dry_run`.
    ///
    /// # Errors
    /// `ReadOnly` for a repair (not a dry run) of an image opened read-only; I/O errors.
    ///
    /// Writes since the last flush are flushed first, so that the check sees them; after a
    /// repair the image reads its structures again.
    fn repair(&self, dry_run: bool) -> Result<CheckReport> {
        let read_only = self.flags.get().contains(OpenFlags::READ_ONLY);
        if !dry_run && read_only {
            return Err(Error::read_only("repairing a VHD image").with_path(&self.path));
        }
        let mut m = self.meta.write();
        if !read_only {
            self.at(self.flush_with(&mut m))?;
        }
        let report = self.at(check::check(self.storage.as_ref(), !dry_run))?;
        if !dry_run {
            *m = self.at(Self::load(self.storage.as_ref(), self.flags.get()))?;
        }
        Ok(report)
    }

    fn details(&self) -> Option<Facts> {
        Some(Facts::new(self.facts()))
    }

    fn dump(&self) -> Result<Facts> {
        Ok(Facts::new(self.facts()))
    }

    fn block_size(&self) -> Option<u64> {
        self.meta
            .read()
            .dynamic
            .as_ref()
            .map(|d| u64::from(d.header.block_size))
    }

    /// A fixed image: the data, then the footer. A dynamic one: the footer copy, the dynamic
    /// header, the BAT, each block's sector bitmap and data (in runs), the parent locators'
    /// data and the footer.
    fn layout(&self) -> Result<Vec<LayoutRegion>> {
        let m = self.meta.read();
        let footer = LayoutRegion::new(RegionKind::Header, m.footer_offset, FOOTER_SIZE as u64)
            .with_label("footer");
        let Some(d) = &m.dynamic else {
            return Ok(vec![
                LayoutRegion::new(RegionKind::Payload, 0, m.footer.current_size)
                    .with_label("the virtual disk"),
                footer,
            ]);
        };
        let mut out = vec![
            LayoutRegion::new(RegionKind::Header, 0, FOOTER_SIZE as u64)
                .with_copy(2)
                .with_label("footer copy"),
            LayoutRegion::new(RegionKind::Header, d.header_offset, HEADER_SIZE as u64)
                .with_label("dynamic disk header"),
            LayoutRegion::new(
                RegionKind::Bat,
                d.header.table_offset,
                u64::from(d.header.max_table_entries).saturating_mul(4),
            ),
        ];
        for l in &d.header.locators {
            out.push(
                LayoutRegion::new(RegionKind::Other, l.offset, u64::from(l.length))
                    .with_label(format!("parent locator {}", l.code.escape_ascii())),
            );
        }
        let mut runs = BlockRuns::new(MAX_BLOCK_RUNS);
        for &e in d.bat.iter().filter(|&&e| e != UNALLOCATED) {
            // Checked at open: the bitmap and the block lie inside the file.
            let at = u64::from(e).saturating_mul(SECTOR);
            runs.add(RegionKind::SectorBitmap, at, d.bitmap_size);
            runs.add(
                RegionKind::Payload,
                at.saturating_add(d.bitmap_size),
                u64::from(d.header.block_size),
            );
        }
        out.extend(runs.finish());
        out.push(footer.with_copy(1));
        out.sort_by_key(|r| r.offset);
        Ok(out)
    }
}

/// The most block runs [`Image::layout`] lists before joining nearby ones.
const MAX_BLOCK_RUNS: usize = 4096;

/// What `info` and `dump` show of a VHD.
#[derive(serde::Serialize)]
struct VhdFacts {
    disk_type: DiskType,
    creator_application: String,
    creator_version: String,
    creator_host_os: String,
    time_stamp: u32,
    original_size: ByteSize,
    current_size: ByteSize,
    chs: [u32; 3],
    unique_id: Uuid,
    saved_state: bool,
    footer_offset: vd_core::Offset,
    #[serde(skip_serializing_if = "Option::is_none")]
    dynamic: Option<DynamicFacts>,
}

/// The dynamic header's facts.
#[derive(serde::Serialize)]
struct DynamicFacts {
    header_offset: vd_core::Offset,
    table_offset: vd_core::Offset,
    max_table_entries: u32,
    block_size: ByteSize,
    blocks_allocated: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_unique_id: Option<Uuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_time_stamp: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_unicode_name: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    parent_locators: Vec<String>,
}

impl VhdImage {
    fn facts(&self) -> VhdFacts {
        let m = self.meta.read();
        let f = &m.footer;
        let (c, h, s) = f.chs;
        let diff = m.is_diff();
        VhdFacts {
            disk_type: f.disk_type,
            creator_application: f.creator_application.escape_ascii().to_string(),
            creator_version: format!("{}.{}", f.creator_version >> 16, f.creator_version & 0xFFFF),
            creator_host_os: f.creator_host_os.escape_ascii().to_string(),
            time_stamp: f.time_stamp,
            original_size: ByteSize(f.original_size),
            current_size: ByteSize(f.current_size),
            chs: [u32::from(c), u32::from(h), u32::from(s)],
            unique_id: f.unique_id,
            saved_state: f.saved_state,
            footer_offset: vd_core::Offset(m.footer_offset),
            dynamic: m.dynamic.as_ref().map(|d| DynamicFacts {
                header_offset: vd_core::Offset(d.header_offset),
                table_offset: vd_core::Offset(d.header.table_offset),
                max_table_entries: d.header.max_table_entries,
                block_size: ByteSize(u64::from(d.header.block_size)),
                blocks_allocated: d.bat.iter().filter(|&&e| e != UNALLOCATED).count(),
                parent_unique_id: diff.then_some(d.header.parent_unique_id),
                parent_time_stamp: diff.then_some(d.header.parent_time_stamp),
                parent_unicode_name: diff.then(|| d.header.parent_unicode_name.clone()),
                parent_locators: if diff {
                    m.locator_paths(self.storage.as_ref())
                        .into_iter()
                        .map(|(c, p)| format!("{c}: {p}"))
                        .collect()
                } else {
                    Vec::new()
                },
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use format::{HEADER_COOKIE, checksum};
    use vd_core::{Disk, DiskOptions, MemFileSystem, MemStorage, Registry};

    const BLOCK: u32 = 4096;

    fn seal_footer(f: &mut [u8]) {
        let c = checksum(f, 64);
        f[64..68].copy_from_slice(&c.to_be_bytes());
    }

    fn footer(disk_type: u32, size: u64, data_offset: u64, id: u8) -> Vec<u8> {
        let mut f = vec![0u8; FOOTER_SIZE];
        f[..8].copy_from_slice(&FOOTER_COOKIE);
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[28..32].copy_from_slice(b"vd  ");
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&disk_type.to_be_bytes());
        f[68..84].fill(id);
        seal_footer(&mut f);
        f
    }

    /// A dynamic (or, with `parent`, differencing) image of two 4 KiB blocks: block 0 holds
    /// sectors 0 and 2 (bitmap 0b1010_0000), block 1 is not allocated.
    fn dynamic(parent: Option<u8>) -> Vec<u8> {
        let size = 2 * u64::from(BLOCK);
        let kind = if parent.is_some() { 4 } else { 3 };
        let foot = footer(kind, size, 512, 1);
        let mut h = vec![0u8; HEADER_SIZE];
        h[..8].copy_from_slice(&HEADER_COOKIE);
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        h[28..32].copy_from_slice(&2u32.to_be_bytes());
        h[32..36].copy_from_slice(&BLOCK.to_be_bytes());
        if let Some(p) = parent {
            h[40..56].fill(p);
            for (i, u) in "p.vhd".encode_utf16().enumerate() {
                h[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
            }
        }
        let c = checksum(&h, 36);
        h[36..40].copy_from_slice(&c.to_be_bytes());
        let mut img = foot.clone();
        img.extend(&h);
        img.resize(1536, 0);
        // BAT: block 0 at sector 4 (offset 2048), block 1 unallocated.
        img.extend(4u32.to_be_bytes());
        img.extend(UNALLOCATED.to_be_bytes());
        img.resize(2048, 0xFF);
        let mut bitmap = vec![0u8; 512];
        bitmap[0] = 0b1010_0000;
        img.extend(&bitmap);
        img.extend((0..BLOCK).map(|i| (i / 512) as u8 + 1));
        img.extend(&foot);
        img
    }

    fn registry(files: &[(&str, Vec<u8>)]) -> Registry {
        let fs = Arc::new(MemFileSystem::new());
        for (name, bytes) in files {
            fs.insert(name, Arc::new(MemStorage::from_bytes(bytes.clone())));
        }
        Registry::builtin_with_provider(fs)
    }

    fn read_all(img: &dyn Image) -> Vec<u8> {
        let mut b = vec![0xEE; usize::try_from(img.size()).unwrap()];
        img.read_at(0, &mut b).unwrap();
        b
    }

    #[test]
    fn dynamic_reads_set_sectors_and_zeros_elsewhere() {
        let reg = registry(&[("/d.vhd", dynamic(None))]);
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY).unwrap();
        assert_eq!(img.format(), "vhd");
        let b = read_all(img.as_ref());
        assert!(b[..512].iter().all(|&x| x == 1));
        assert!(b[512..1024].iter().all(|&x| x == 0), "bit clear: zeros");
        assert!(b[1024..1536].iter().all(|&x| x == 3));
        assert!(b[1536..].iter().all(|&x| x == 0));
        let kinds: Vec<_> = img
            .map(0, img.size())
            .unwrap()
            .iter()
            .map(|e| e.kind)
            .collect();
        use vd_core::ExtentKind::{Data, Zero};
        assert_eq!(kinds, [Data, Zero, Data, Zero]);
        // An unaligned read inside a sector.
        let mut two = [0u8; 2];
        img.read_at(1023, &mut two).unwrap();
        assert_eq!(two, [0, 3]);
        assert!(img.warnings().is_empty());
        let layout: Vec<(RegionKind, u64, u64)> = img
            .layout()
            .unwrap()
            .iter()
            .map(|r| (r.kind, r.offset, r.length))
            .collect();
        assert_eq!(
            layout,
            [
                (RegionKind::Header, 0, 512),
                (RegionKind::Header, 512, 1024),
                (RegionKind::Bat, 1536, 8),
                (RegionKind::SectorBitmap, 2048, 512),
                (RegionKind::Payload, 2560, 4096),
                (RegionKind::Header, 6656, 512),
            ]
        );
    }

    #[test]
    fn a_damaged_end_footer_falls_back_to_the_copy_with_a_warning() {
        let mut bytes = dynamic(None);
        let n = bytes.len();
        bytes[n - 10] ^= 0xFF;
        let reg = registry(&[("/d.vhd", bytes.clone())]);
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY).unwrap();
        assert_eq!(read_all(img.as_ref())[1024], 3);
        let w = img.warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].message.contains("footer copy"), "{w:?}");
        // Both copies damaged: a typed error naming the checksum and the image.
        bytes[10] ^= 0xFF;
        let reg = registry(&[("/d.vhd", bytes)]);
        let e = reg
            .open_as("vhd", Path::new("/d.vhd"), OpenFlags::READ_ONLY)
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidHeader);
        assert!(
            e.to_string().contains("checksum") && e.to_string().contains("/d.vhd"),
            "{e}"
        );
    }

    #[test]
    fn fixed_images_and_old_511_byte_footers_read() {
        let mut data: Vec<u8> = (0..4096u32).map(|i| (i % 251) as u8).collect();
        let foot = footer(2, 4096, u64::MAX, 9);
        let mut fixed = data.clone();
        fixed.extend(&foot);
        let reg = registry(&[
            ("/f.vhd", fixed),
            ("/old.vhd", {
                // Pre-2004: the footer's last (reserved) byte is missing.
                data.extend(&foot[..511]);
                data.clone()
            }),
        ]);
        for name in ["/f.vhd", "/old.vhd"] {
            let m = reg.probe(Path::new(name)).unwrap();
            assert_eq!(
                (m.backend.name(), m.confidence),
                ("vhd", Confidence::Certain)
            );
            let img = reg.open(Path::new(name), OpenFlags::READ_ONLY).unwrap();
            assert_eq!(img.image_flags(), ImageFlags::FIXED);
            assert_eq!(read_all(img.as_ref()), data[..4096]);
        }
    }

    #[test]
    fn hostile_headers_give_typed_errors() {
        let reseal_header = |b: &mut Vec<u8>| {
            b[512 + 36..512 + 40].fill(0);
            let c = checksum(&b[512..512 + HEADER_SIZE], 36);
            b[512 + 36..512 + 40].copy_from_slice(&c.to_be_bytes());
        };
        type Damage = Box<dyn Fn(&mut Vec<u8>)>;
        let cases: Vec<(&str, Damage)> = vec![
            (
                "BAT entry 0",
                Box::new(|b: &mut Vec<u8>| {
                    b[1536..1540].copy_from_slice(&0x00FF_FFFFu32.to_be_bytes());
                }),
            ),
            (
                "dynamic header block size",
                Box::new(move |b: &mut Vec<u8>| {
                    b[512 + 32..512 + 36].copy_from_slice(&3000u32.to_be_bytes());
                    reseal_header(b);
                }),
            ),
            (
                "dynamic header max table entries",
                Box::new(move |b: &mut Vec<u8>| {
                    b[512 + 28..512 + 32].copy_from_slice(&u32::MAX.to_be_bytes());
                    reseal_header(b);
                }),
            ),
            (
                "dynamic header max table entries",
                Box::new(move |b: &mut Vec<u8>| {
                    b[512 + 28..512 + 32].copy_from_slice(&1u32.to_be_bytes());
                    reseal_header(b);
                }),
            ),
            (
                "dynamic header checksum",
                Box::new(|b: &mut Vec<u8>| b[512 + 700] ^= 1),
            ),
            (
                "footer data offset",
                Box::new(|b: &mut Vec<u8>| {
                    let n = b.len();
                    for at in [0, n - FOOTER_SIZE] {
                        b[at + 16..at + 24].copy_from_slice(&(u64::MAX - 4).to_be_bytes());
                        seal_footer(&mut b[at..at + FOOTER_SIZE]);
                    }
                }),
            ),
        ];
        for (field, damage) in cases {
            let mut bytes = dynamic(None);
            damage(&mut bytes);
            let reg = registry(&[("/h.vhd", bytes)]);
            let e = reg
                .open_as("vhd", Path::new("/h.vhd"), OpenFlags::READ_ONLY)
                .unwrap_err();
            assert_eq!(e.context().field.as_deref(), Some(field), "{e}");
            assert_eq!(e.context().path.as_deref(), Some(Path::new("/h.vhd")));
        }
        // Short and empty files are not VHDs, and never a panic.
        for len in [0, 8, 511, 512] {
            let reg = registry(&[("/s.vhd", vec![0; len])]);
            assert!(
                reg.open_as("vhd", Path::new("/s.vhd"), OpenFlags::READ_ONLY)
                    .is_err()
            );
        }
    }

    #[test]
    fn writes_allocate_at_the_footer_and_reach_the_file_at_flush() {
        let reg = registry(&[("/d.vhd", dynamic(None))]);
        let before = read_all(
            reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY)
                .unwrap()
                .as_ref(),
        );
        let old_len = dynamic(None).len() as u64;
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::empty()).unwrap();
        // An unaligned write into the allocated block (sector 1's bit is clear: it reads as
        // zeros, and the rest of its sector must stay zeros), and one into block 1.
        img.write_at(512 + 100, &[9; 10]).unwrap();
        img.write_at(u64::from(BLOCK) + 1024, &[7; 512]).unwrap();
        let mut want = before.clone();
        want[612..622].fill(9);
        let b1 = BLOCK as usize + 1024;
        want[b1..b1 + 512].fill(7);
        assert_eq!(read_all(img.as_ref()), want, "before the flush");
        // Block 1 went where the footer was; the footer moved past it at once.
        let storage = reg
            .provider()
            .open(Path::new("/d.vhd"), vd_core::OpenMode::ReadOnly)
            .unwrap();
        let len = storage.len().unwrap();
        assert_eq!(len, old_len + 512 + u64::from(BLOCK));
        let mut tail = [0u8; 512];
        storage.read_exact_at(len - 512, &mut tail).unwrap();
        assert!(format::parse_footer(&tail, len - 512).is_ok());
        // The BAT entry waits for the flush.
        let mut entry = [0u8; 4];
        storage.read_exact_at(1540, &mut entry).unwrap();
        assert_eq!(u32::from_be_bytes(entry), UNALLOCATED);
        img.flush().unwrap();
        storage.read_exact_at(1540, &mut entry).unwrap();
        assert_eq!(u64::from(u32::from_be_bytes(entry)) * 512, old_len - 512);
        img.close(false).unwrap();
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY).unwrap();
        assert_eq!(read_all(img.as_ref()), want, "after reopening");
        assert_eq!(
            img.write_at(0, &[1]).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }

    #[test]
    fn a_differencing_image_takes_whole_sectors_and_refuses_discard() {
        let reg = registry(&[("/c.vhd", dynamic(Some(3)))]);
        let img = reg.open(Path::new("/c.vhd"), OpenFlags::empty()).unwrap();
        assert_eq!(img.write_granularity(), 512);
        assert_eq!(
            img.write_at(10, &[1; 10]).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            img.discard(0, 512).unwrap_err().kind(),
            ErrorKind::NotSupported
        );
        img.write_at(512, &[5; 512]).unwrap();
        // Sectors 0 and 2 were in the child; now sector 1 joins them.
        let map = img.map_file(0, 2048).unwrap();
        assert!(matches!(map[0].mapping, Mapping::Data { .. }), "{map:?}");
        assert_eq!((map[0].offset, map[0].length), (0, 1536), "{map:?}");
        assert_eq!(map[1].mapping, Mapping::Unallocated, "{map:?}");
    }

    #[test]
    fn discard_clears_bits_and_zeroes_partial_sectors() {
        let reg = registry(&[("/d.vhd", dynamic(None))]);
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::empty()).unwrap();
        let mut want = read_all(img.as_ref());
        img.discard(100, 2000).unwrap();
        want[100..2100].fill(0);
        assert_eq!(read_all(img.as_ref()), want);
        let map = img.map(0, 2048).unwrap();
        assert_eq!(map[0].kind, vd_core::ExtentKind::Data, "{map:?}");
        img.close(false).unwrap();
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY).unwrap();
        assert_eq!(read_all(img.as_ref()), want);
    }

    #[test]
    fn a_damaged_end_footer_takes_no_writes_until_repaired() {
        let good = dynamic(None);
        let mut b = good.clone();
        let n = b.len();
        b[n - 512] ^= 1;
        let reg = registry(&[("/d.vhd", b)]);
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::empty()).unwrap();
        let e = img.write_at(0, &[1; 512]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("check -r all"), "{e}");
        let report = img.repair(false).unwrap();
        assert!(report.findings.iter().all(|f| f.repaired), "{report:?}");
        assert!(img.warnings().is_empty());
        img.write_at(0, &[1; 512]).unwrap();
        img.close(false).unwrap();
        let img = reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY).unwrap();
        let mut sector = [0u8; 512];
        img.read_at(0, &mut sector).unwrap();
        assert_eq!(sector, [1; 512]);
    }

    #[test]
    fn a_footer_copy_left_behind_by_a_crash_is_restored_by_a_writable_open() {
        let mut b = dynamic(None);
        // The copy at 0 with another unique ID (sealed): an edit cut between its two writes.
        b[68] ^= 0xFF;
        format::seal(&mut b[..512], 64);
        let reg = registry(&[("/d.vhd", b)]);
        let ro = reg.open(Path::new("/d.vhd"), OpenFlags::READ_ONLY).unwrap();
        assert!(
            ro.repair(true)
                .unwrap()
                .findings
                .iter()
                .any(|f| f.field.as_deref() == Some("footer copy"))
        );
        ro.close(false).unwrap();
        let rw = reg.open(Path::new("/d.vhd"), OpenFlags::empty()).unwrap();
        assert!(rw.repair(true).unwrap().is_clean());
    }

    #[test]
    fn a_child_reads_through_its_parent_and_checks_its_id() {
        let mut parent: Vec<u8> = vec![0x77; 2 * BLOCK as usize];
        parent.extend(footer(2, 2 * u64::from(BLOCK), u64::MAX, 5));
        let reg = registry(&[("/c.vhd", dynamic(Some(5))), ("/p.vhd", parent.clone())]);
        let disk = Disk::open(&reg, Path::new("/c.vhd"), &DiskOptions::default()).unwrap();
        let mut b = vec![0u8; 2 * BLOCK as usize];
        disk.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 1));
        assert!(
            b[512..1024].iter().all(|&x| x == 0x77),
            "bit clear: the parent's"
        );
        assert!(b[1024..1536].iter().all(|&x| x == 3));
        assert!(b[1536..].iter().all(|&x| x == 0x77));
        // A parent with another unique ID is refused as a mismatch.
        let reg = registry(&[("/c.vhd", dynamic(Some(6))), ("/p.vhd", parent)]);
        let e = Disk::open(&reg, Path::new("/c.vhd"), &DiskOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ParentMismatch, "{e}");
        // No parent at all: NotFound naming where it looked.
        let reg = registry(&[("/c.vhd", dynamic(Some(5)))]);
        let e = Disk::open(&reg, Path::new("/c.vhd"), &DiskOptions::default()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotFound, "{e}");
        assert!(e.to_string().contains("p.vhd"), "{e}");
    }
}
