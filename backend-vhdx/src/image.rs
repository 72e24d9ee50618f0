//! Opening a VHDX image and serving the `vd_core::Image` trait.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use serde_json::json;
use uuid::Uuid;
use vd_core::{
    CheckReport, Error, ErrorKind, Extent, Finding, Geometry, Image, ImageFlags, MappedExtent,
    Mapping, OpenFlags, OpenRequest, Result, Severity, Storage, StorageProvider, check_range,
    error_chain, push_extent,
};

use crate::bat::{Bat, BlockState, Forbidden, Layout};
use crate::error::{Corruption, io_err};
use crate::format::{HEADER_SECTION_SIZE, MAX_BAT_SIZE};
use crate::guid::{Guid, USER_COMMENT, USER_LCHS, USER_PCHS};
use crate::header::{ActiveHeader, HeaderUpdate, read_headers, read_identifier, update_headers};
use crate::log::{EntrySummary, OverlayStorage, ReplayPlan, apply, plan_replay, read_log};
use crate::metadata::{Metadata, read_metadata};
use crate::region::{RegionTable, read_region_table};
use crate::write_state::WriteState;

/// What happened to the log at open.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LogState {
    /// Whether the header asked for a replay.
    pub dirty: bool,
    /// How the log was replayed: `none`, `file` or `memory`.
    pub replay: &'static str,
    /// Entries in the active sequence.
    pub entries: usize,
    /// Sequence number of the head entry.
    pub head_sequence: u64,
    /// Log offset and length.
    pub offset: u64,
    /// Log length.
    pub length: u64,
    /// The replayed entries, oldest first.
    pub sequence: Vec<EntrySummary>,
}

/// An opened VHDX image.
///
/// # Locks
///
/// Reads take no lock across payload I/O. A read (or [`map_file`](Image::map_file)) copies the
/// [`Layout`] once per request (one shared lock) and then, per block, takes the BAT's page cache
/// and forbidden-range locks briefly (shared, released before the next one is taken); the file
/// is read after the mapping of each run is known, with no lock held.
///
/// Lock order, outermost first; a lock further down is never held while one further up is
/// taken:
/// 1. `write` (the `WriteState` mutex): held for a whole change (write, discard, metadata
///    edit, resize, compact, flush, close), so changes are serialised. Readers never take it.
/// 2. `header`, then `meta`, then `regions`: each written only while `write` is held, and
///    while no other lock of this list is held; shared guards nest only in this order
///    (`details` reads `meta` under `header`, `item_data` reads `regions` under `meta`).
/// 3. The `Bat`'s own locks (`layout`, `forbidden`, the BAT page and sector-bitmap page
///    caches): leaves, each held only inside one `Bat` method call, never while another lock is
///    taken.
///
/// The write mutex stays held across payload writes: a write into a new block allocates the
/// block, writes its data and only then publishes the BAT entry, and that sequence must not
/// interleave with another writer allocating the same block; an overwrite of an existing block
/// could run unlocked, but compaction and shrinking move or cut blocks under the same mutex,
/// so an unlocked overwrite could land in a block's old place after it was moved (lost data).
/// Releasing it would need a separate gate that compaction and resize take exclusively.
pub struct VhdxImage {
    path: PathBuf,
    provider: Arc<dyn StorageProvider>,
    /// What the image is read through: the file, or the file under a log replayed in memory.
    storage: Arc<dyn Storage>,
    /// The image file itself, for [`read_file_at`](Image::read_file_at).
    file: Arc<dyn Storage>,
    /// Whether `storage` is the plain file (no log replayed in memory over it), so data runs
    /// can be reported with their file offsets.
    plain_file: bool,
    flags: OpenFlags,
    creator: String,
    header: RwLock<ActiveHeader>,
    regions: RwLock<RegionTable>,
    meta: RwLock<Metadata>,
    bat: Bat,
    log: LogState,
    warnings: Vec<String>,
    /// Structures the file ends before (a tolerant read-only open): errors for `check`.
    truncated: Vec<String>,
    write: parking_lot::Mutex<WriteState>,
}

impl std::fmt::Debug for VhdxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxImage")
            .field("path", &self.path)
            .field("size", &self.metadata().virtual_size)
            .finish_non_exhaustive()
    }
}

/// Where the bytes of a range come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    File(u64),
    Zero,
    Parent,
}

impl VhdxImage {
    /// Opens an image: identifier, headers, log, region table, metadata, BAT.
    ///
    /// Nothing is written until the whole image has been validated: a dirty log is first
    /// replayed into an in-memory overlay, the structures are read through it, and only a
    /// read-write open that passes every check (including the one-pass BAT check of
    /// `Bat::verify_all`, so the replay cannot be applied to an image with missing blocks)
    /// replays it into the file.
    ///
    /// A file that ends before a structure (the log, the BAT or metadata region, another
    /// region, or bytes the log writes or needs) is truncated. Such an image is refused in
    /// strict mode and by read-write opens (nothing can be written safely); a tolerant
    /// read-only open succeeds with a warning, and a read of anything missing fails with a
    /// typed error. Payload and sector-bitmap blocks past the end are not found here (that
    /// would read the whole BAT): a read of one fails with [`Corruption::BatBeyondFile`],
    /// `check` counts each one, and the first change of a read-write session checks the whole
    /// BAT before it writes anything.
    ///
    /// # Errors
    /// Typed errors for every rule the image breaks; I/O errors.
    pub fn open(req: OpenRequest<'_>) -> Result<Self> {
        let flags = req.flags;
        let strict = flags.contains(OpenFlags::STRICT);
        let read_only = flags.contains(OpenFlags::READ_ONLY) || req.storage.is_read_only();
        let file = req.storage.clone();
        let file_len = file
            .len()
            .map_err(|e| io_err("cannot read the file size", e))?;
        let creator = read_identifier(file.as_ref())?;
        let headers = read_headers(file.as_ref(), file_len, strict)?;
        let mut warnings = headers.warnings;
        let mut header = headers.active;
        let mut log = LogState {
            dirty: !header.log_guid().is_zero(),
            replay: "none",
            entries: 0,
            head_sequence: 0,
            offset: header.log_offset(),
            length: header.log_length(),
            sequence: Vec::new(),
        };
        // Structures the file ends before, each as the error a refusing open returns.
        let mut truncation: Vec<Error> = Vec::new();
        let mut storage = file.clone();
        let mut plan = None;
        if log.dirty {
            if flags.contains(OpenFlags::REFUSE_DIRTY_LOG) {
                let at = crate::format::HEADER_OFFSETS
                    .get(header.slot)
                    .copied()
                    .ok_or_else(|| {
                        Error::new(ErrorKind::OutOfRange, "the current header has no slot")
                    })?
                    + 48;
                return Err(Corruption::DirtyLogRefused.at("header log guid", at));
            }
            let bytes = read_log(file.as_ref(), header.log_offset(), header.log_length())?;
            let p: ReplayPlan =
                plan_replay(&bytes, header.log_offset(), header.log_guid(), file_len)?;
            log.entries = p.entries;
            log.head_sequence = p.head_sequence;
            log.sequence = p.summary.clone();
            // Allowed by 2.3.3 (the file is at least FlushedFileOffset long, checked above):
            // a warning, or an error in strict mode. Blocks past the end stay missing: the BAT
            // checks them against the file's own length, not the replayed one.
            for (c, at) in &p.beyond_file {
                if strict {
                    return Err(c.clone().at("log entry", *at).with_path(req.path));
                }
                warnings.push(error_chain(&c.clone().at("log entry", *at)));
            }
            // Read through the replayed log in memory until the image is known to be sound.
            storage = Arc::new(
                OverlayStorage::new(file.clone(), &p)
                    .map_err(|e| io_err("cannot replay the log in memory", e))?,
            );
            log.replay = "memory";
            plan = Some(p);
        }
        let regions = read_region_table(
            storage.as_ref(),
            file_len,
            (header.log_offset(), header.log_length()),
            &mut warnings,
        )?;
        let meta = read_metadata(storage.as_ref(), regions.metadata, strict, &mut warnings)?;
        let layout = Layout::new(&meta);
        let needed = layout.entries * 8;
        if needed > regions.bat.length || needed > MAX_BAT_SIZE {
            return Err(Corruption::BatTooSmall {
                needed,
                have: regions.bat.length,
            }
            .at("BAT region", regions.bat.offset));
        }
        for (what, r) in [("BAT region".to_string(), &regions.bat)]
            .into_iter()
            .chain(
                regions
                    .others
                    .iter()
                    .map(|r| (format!("region {}", r.guid), r)),
            )
        {
            let end = r.offset.saturating_add(r.length);
            if end > file_len {
                truncation.push(
                    Corruption::Truncated {
                        what: what.clone(),
                        offset: r.offset,
                        end,
                        file_len,
                    }
                    .at(what, r.offset),
                );
            }
        }
        let truncated: Vec<String> = truncation.iter().map(|e| error_chain(e)).collect();
        if (strict || !read_only)
            && let Some(first) = truncation.into_iter().next()
        {
            log::debug!(
                "{}: refused ({}): {} structures end beyond the end of the file",
                req.path.display(),
                if strict { "strict" } else { "read-write" },
                truncated.len()
            );
            return Err(first.with_path(req.path));
        }
        warnings.extend(truncated.iter().cloned());
        let mut forbidden = vec![
            Forbidden {
                start: 0,
                end: HEADER_SECTION_SIZE,
                what: "header section",
            },
            Forbidden {
                start: regions.bat.offset,
                end: regions.bat.offset + regions.bat.length,
                what: "BAT region",
            },
            Forbidden {
                start: regions.metadata.offset,
                end: regions.metadata.offset + regions.metadata.length,
                what: "metadata region",
            },
        ];
        if header.log_length() > 0 {
            forbidden.push(Forbidden {
                start: header.log_offset(),
                end: header.log_offset() + header.log_length(),
                what: "log",
            });
        }
        for r in &regions.others {
            forbidden.push(Forbidden {
                start: r.offset,
                end: r.offset + r.length,
                what: "unknown region",
            });
        }
        let mut bat = Bat::new(
            storage.clone(),
            layout,
            regions.bat.offset,
            file_len,
            forbidden.clone(),
        );
        let mut verified = false;
        let mut write_len = file_len;
        if let Some(plan) = plan {
            if read_only {
                warnings.push(format!(
                    "the log holds {} entries to replay; replayed in memory (the file is read-only)",
                    plan.entries
                ));
            } else {
                // Replaying is the first change: the image must be whole before it.
                bat.verify_all(Err).map_err(|e| e.with_path(req.path))?;
                verified = true;
                // Log playback is a modification: a new FileWriteGuid goes first.
                header = update_headers(&file, &header, HeaderUpdate::new_file_write_guid())?;
                apply(file.as_ref(), &plan).map_err(|e| io_err("cannot replay the log", e))?;
                header = update_headers(&file, &header, HeaderUpdate::log_guid(Guid::ZERO))?;
                log.replay = "file";
                storage = file.clone();
                // The replay may have extended the file to LastFileOffset.
                write_len = file
                    .len()
                    .map_err(|e| io_err("cannot read the file size", e))?;
                bat = Bat::new(
                    storage.clone(),
                    layout,
                    regions.bat.offset,
                    write_len,
                    forbidden,
                );
            }
        }
        for w in &warnings {
            log::warn!("{}: {w}", req.path.display());
        }
        let mut write = WriteState::new(write_len);
        if verified {
            write.set_verified();
        }
        let plain_file = Arc::ptr_eq(&storage, &file);
        Ok(Self {
            path: req.path.to_path_buf(),
            provider: req.provider,
            storage,
            file,
            plain_file,
            flags,
            creator,
            header: RwLock::new(header),
            regions: RwLock::new(regions),
            meta: RwLock::new(meta),
            bat,
            log,
            warnings,
            truncated,
            write: parking_lot::Mutex::new(write),
        })
    }

    pub(crate) fn storage(&self) -> &Arc<dyn Storage> {
        &self.storage
    }

    pub(crate) fn flags(&self) -> OpenFlags {
        self.flags
    }

    pub(crate) fn path_buf(&self) -> &Path {
        &self.path
    }

    pub(crate) fn header_lock(&self) -> &RwLock<ActiveHeader> {
        &self.header
    }

    pub(crate) fn metadata_lock(&self) -> &RwLock<Metadata> {
        &self.meta
    }

    pub(crate) fn regions(&self) -> RegionTable {
        self.regions.read().clone()
    }

    pub(crate) fn regions_lock(&self) -> &RwLock<RegionTable> {
        &self.regions
    }

    pub(crate) fn bat(&self) -> &Bat {
        &self.bat
    }

    pub(crate) fn write_state(&self) -> &parking_lot::Mutex<WriteState> {
        &self.write
    }

    /// The block layout.
    pub fn layout(&self) -> Layout {
        self.bat.layout()
    }

    /// The parsed metadata.
    pub fn metadata(&self) -> parking_lot::RwLockReadGuard<'_, Metadata> {
        self.meta.read()
    }

    /// What happened to the log at open.
    pub fn log_state(&self) -> &LogState {
        &self.log
    }

    /// The creator string of the file identifier.
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// Calls `f(offset, len, source)` for consecutive runs covering `[offset, offset + len)`,
    /// merging runs whose file ranges are contiguous. The whole request is resolved under the
    /// one `layout` the caller took; no lock is held while `f` runs.
    fn resolve(
        &self,
        layout: &Layout,
        offset: u64,
        len: u64,
        mut f: impl FnMut(u64, u64, Source) -> Result<()>,
    ) -> Result<()> {
        let mut pending: Option<(u64, u64, Source)> = None;
        let mut emit = |off: u64,
                        n: u64,
                        src: Source,
                        f: &mut dyn FnMut(u64, u64, Source) -> Result<()>|
         -> Result<()> {
            if let Some((po, pn, ps)) = pending {
                let joins = match (ps, src) {
                    (Source::File(a), Source::File(b)) => a + pn == b,
                    (a, b) => a == b,
                };
                if joins && po + pn == off {
                    pending = Some((po, pn + n, ps));
                    return Ok(());
                }
                f(po, pn, ps)?;
            }
            pending = Some((off, n, src));
            Ok(())
        };
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            let block = pos / layout.block_size;
            let within = pos % layout.block_size;
            let n = (layout.block_size - within).min(end - pos);
            match self.bat.block_in(layout, block)? {
                BlockState::NotPresent => {
                    emit(
                        pos,
                        n,
                        if layout.has_parent {
                            Source::Parent
                        } else {
                            Source::Zero
                        },
                        &mut f,
                    )?;
                }
                BlockState::Zero => emit(pos, n, Source::Zero, &mut f)?,
                BlockState::Full(file) => emit(pos, n, Source::File(file + within), &mut f)?,
                BlockState::Partial(file) => {
                    let ss = layout.sector_size;
                    let first = within / ss;
                    let last = (within + n).div_ceil(ss);
                    let block_start = block * layout.block_size;
                    let mut runs = Vec::new();
                    self.bat
                        .bitmap_runs(layout, block, first, last - first, |s, c, present| {
                            runs.push((s, c, present));
                        })?;
                    for (s, c, present) in runs {
                        let a = (block_start + s * ss).max(pos);
                        let b = (block_start + (s + c) * ss).min(pos + n);
                        if b > a {
                            let src = if present {
                                Source::File(file + (a - block_start))
                            } else {
                                Source::Parent
                            };
                            emit(a, b - a, src, &mut f)?;
                        }
                    }
                }
            }
            pos += n;
        }
        if let Some((po, pn, ps)) = pending {
            f(po, pn, ps)?;
        }
        Ok(())
    }

    fn locator_paths(&self) -> Vec<PathBuf> {
        let Some(loc) = &self.metadata().parent_locator else {
            return Vec::new();
        };
        let dir = self
            .path
            .parent()
            .unwrap_or_else(|| Path::new(""))
            .to_path_buf();
        let mut out: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        let mut basenames = Vec::new();
        if let Some(rel) = loc.get("relative_path") {
            let parts: Vec<&str> = rel
                .split(['\\', '/'])
                .filter(|s| !s.is_empty() && *s != ".")
                .collect();
            let relative: PathBuf = parts.iter().collect();
            push(self.provider.resolve(&self.path, &relative));
            if let Some(b) = parts.last() {
                basenames.push((*b).to_string());
            }
        }
        for key in ["volume_path", "absolute_win32_path"] {
            let Some(v) = loc.get(key) else { continue };
            let v = v.strip_prefix(r"\\?\").unwrap_or(v);
            let parts: Vec<&str> = v.split('\\').filter(|s| !s.is_empty()).collect();
            // A drive letter maps to /mnt/<letter> (WSL's convention); a volume GUID cannot be
            // mapped, so only its file name is tried next to the child.
            if let Some(first) = parts.first()
                && first.len() == 2
                && first.ends_with(':')
            {
                let mut p = PathBuf::from("/mnt");
                p.push(first.trim_end_matches(':').to_ascii_lowercase());
                for part in parts.iter().skip(1) {
                    p.push(part);
                }
                push(p);
            }
            if let Some(b) = parts.last() {
                basenames.push((*b).to_string());
            }
        }
        for b in basenames {
            push(dir.join(b));
        }
        out
    }
}

impl Image for VhdxImage {
    fn format(&self) -> &'static str {
        "vhdx"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    /// Resolves the request under one layout snapshot, reading each run as soon as it is
    /// known (no lock held during the read).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        let layout = self.bat.layout();
        check_range(offset, buf.len() as u64, layout.virtual_size)?;
        self.resolve(&layout, offset, buf.len() as u64, |off, n, src| {
            let a = usize::try_from(off - offset).unwrap_or(usize::MAX);
            let b = a.saturating_add(usize::try_from(n).unwrap_or(usize::MAX));
            let Some(part) = buf.get_mut(a..b) else {
                return Err(Error::new(ErrorKind::Corrupt, "internal mapping error"));
            };
            match src {
                Source::File(file) => self.storage.read_exact_at(file, part).map_err(|e| {
                    io_err("read failed", e)
                        .with_offset(file)
                        .with_path(&self.path)
                }),
                Source::Zero | Source::Parent => {
                    part.fill(0);
                    Ok(())
                }
            }
        })
        .map_err(|e| e.with_path(&self.path))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.write_impl(offset, buf)
            .map_err(|e| e.with_path(&self.path))
    }

    fn flush(&self) -> Result<()> {
        self.flush_impl().map_err(|e| e.with_path(&self.path))
    }

    /// Discards whole blocks (they become ZERO; a fixed image keeps its blocks and zeros them)
    /// and writes zeros over partial ones.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_impl(offset, len, true)
            .map_err(|e| e.with_path(&self.path))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.zero_impl(offset, len, false)
            .map_err(|e| e.with_path(&self.path))
    }

    fn close(self: Box<Self>, delete: bool) -> Result<()> {
        self.close_impl().map_err(|e| e.with_path(&self.path))?;
        if delete {
            self.provider
                .delete(&self.path)
                .map_err(|e| io_err("cannot delete", e).with_path(&self.path))?;
        }
        Ok(())
    }

    fn rename(&mut self, new_path: &Path) -> Result<()> {
        self.provider
            .rename(&self.path, new_path)
            .map_err(|e| io_err("cannot rename", e).with_path(&self.path))?;
        self.path = new_path.to_path_buf();
        Ok(())
    }

    fn size(&self) -> u64 {
        self.metadata().virtual_size
    }

    fn sector_size(&self) -> u32 {
        self.metadata().logical_sector_size
    }

    /// A differencing image tracks whole logical sectors in its sector bitmap.
    fn write_granularity(&self) -> u32 {
        let m = self.metadata();
        if m.has_parent {
            m.logical_sector_size
        } else {
            1
        }
    }

    fn physical_sector_size(&self) -> u32 {
        self.metadata().physical_sector_size
    }

    fn file_size(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| io_err("cannot read the file size", e))
    }

    fn image_flags(&self) -> ImageFlags {
        let mut f = ImageFlags::empty();
        if self.metadata().leave_block_allocated {
            f |= ImageFlags::FIXED;
        }
        if self.metadata().has_parent {
            f |= ImageFlags::DIFF;
        }
        f
    }

    fn open_flags(&self) -> OpenFlags {
        self.flags
    }

    /// Stored in vd's user metadata item when set; synthesised otherwise.
    fn pchs_geometry(&self) -> Result<Geometry> {
        Ok(self
            .stored_geometry(USER_PCHS)?
            .unwrap_or_else(|| Geometry::synthesize_pchs(self.size())))
    }

    /// Stored as vd's own non-required user metadata item, which other readers ignore.
    fn set_pchs_geometry(&self, geometry: Geometry) -> Result<()> {
        self.set_geometry(USER_PCHS, geometry)
            .map_err(|e| e.with_path(&self.path))
    }

    /// Stored in vd's user metadata item when set; synthesised otherwise.
    fn lchs_geometry(&self) -> Result<Geometry> {
        Ok(self
            .stored_geometry(USER_LCHS)?
            .unwrap_or_else(|| Geometry::synthesize_lchs(self.size())))
    }

    /// Stored as vd's own non-required user metadata item.
    fn set_lchs_geometry(&self, geometry: Geometry) -> Result<()> {
        self.set_geometry(USER_LCHS, geometry)
            .map_err(|e| e.with_path(&self.path))
    }

    /// vd's user metadata item (VHDX itself has no comment).
    fn comment(&self) -> Result<Option<String>> {
        Ok(self
            .item_data(USER_COMMENT, true)?
            .map(|d| String::from_utf8_lossy(&d).into_owned()))
    }

    fn set_comment(&self, comment: Option<&str>) -> Result<()> {
        self.set_comment_item(comment)
            .map_err(|e| e.with_path(&self.path))
    }

    /// Rewrites the Virtual Disk ID (page 83) item.
    fn set_uuid(&self, uuid: Uuid) -> Result<()> {
        self.set_disk_id(uuid).map_err(|e| e.with_path(&self.path))
    }

    /// Sets the header's DataWriteGuid (children recording the old one no longer match).
    fn set_modification_uuid(&self, uuid: Uuid) -> Result<()> {
        self.check_writable("setting the modification UUID")?;
        let mut ws = self.write_state().lock();
        self.begin(&mut ws)?;
        let mut header = self.header.write();
        *header = update_headers(
            &self.storage,
            &header,
            HeaderUpdate::data_write_guid(Guid::from_uuid(uuid)),
        )?;
        Ok(())
    }

    /// Rewrites `parent_linkage`.
    fn set_parent_uuid(&self, uuid: Uuid) -> Result<()> {
        self.set_locator_key("parent_linkage", format!("{{{uuid}}}"))
            .map_err(|e| e.with_path(&self.path))
    }

    /// Rewrites `parent_linkage2`.
    fn set_parent_modification_uuid(&self, uuid: Uuid) -> Result<()> {
        self.set_locator_key("parent_linkage2", format!("{{{uuid}}}"))
            .map_err(|e| e.with_path(&self.path))
    }

    /// Rewrites `relative_path` (Windows separators).
    fn set_parent_filename(&self, name: &str) -> Result<()> {
        self.set_locator_key("relative_path", name.replace('/', "\\"))
            .map_err(|e| e.with_path(&self.path))
    }

    /// Moves blocks down into holes and truncates the file.
    fn compact(&self, progress: vd_core::Progress<'_>) -> Result<()> {
        self.compact_impl(progress)
            .map_err(|e| e.with_path(&self.path))
    }

    /// Grows (zeroing the old partial last block's tail; preallocating in fixed images) or
    /// shrinks (refused when the part cut off holds data). The BAT must fit in its region.
    fn resize(&self, new_size: u64, progress: vd_core::Progress<'_>) -> Result<()> {
        self.resize_impl(new_size)
            .map_err(|e| e.with_path(&self.path))?;
        progress(1, 1);
        Ok(())
    }

    /// The parent must be a VHDX image (MS-VHDX knows no other parent; a file of another
    /// format, probed as raw, would otherwise be read as the parent's data), have this image's
    /// logical sector size, and its DataWriteGuid must match `parent_linkage` (or
    /// `parent_linkage2`).
    fn check_parent(&self, parent: &dyn Image) -> Result<()> {
        if parent.format() != "vhdx" {
            return Err(Error::new(
                ErrorKind::ParentMismatch,
                format!(
                    "parent {} is not a VHDX image (it opens as {}): the parent of a VHDX \
                     differencing image is a VHDX image",
                    parent.path().display(),
                    parent.format()
                ),
            )
            .with_path(&self.path));
        }
        let ss = self.sector_size();
        if parent.sector_size() != ss {
            return Err(Error::new(
                ErrorKind::ParentMismatch,
                format!(
                    "parent {} has {}-byte logical sectors, the child {ss}-byte ones",
                    parent.path().display(),
                    parent.sector_size()
                ),
            )
            .with_path(&self.path));
        }
        vd_core::check_parent_identity(self, parent)
    }

    /// The Virtual Disk ID (page 83) metadata item.
    fn uuid(&self) -> Result<Uuid> {
        Ok(self.metadata().virtual_disk_id)
    }

    /// The header's DataWriteGuid: it changes whenever user-visible data changes.
    fn modification_uuid(&self) -> Result<Uuid> {
        Ok(self.header.read().data_write_guid().to_uuid())
    }

    /// `parent_linkage`: the parent's DataWriteGuid when this child was made.
    fn parent_uuid(&self) -> Result<Uuid> {
        self.metadata()
            .parent_locator
            .as_ref()
            .and_then(|l| l.linkage())
            .ok_or_else(|| Error::not_supported("parent UUIDs of images without a parent"))
    }

    /// `parent_linkage2`, where present and not nil.
    fn parent_modification_uuid(&self) -> Result<Uuid> {
        self.metadata()
            .parent_locator
            .as_ref()
            .and_then(|l| l.linkage2())
            .ok_or_else(|| Error::not_supported("parent_linkage2"))
    }

    /// The first path key of the parent locator: `relative_path`, `volume_path`, then
    /// `absolute_win32_path`.
    fn parent_filename(&self) -> Result<String> {
        let meta = self.metadata();
        let loc = meta
            .parent_locator
            .as_ref()
            .ok_or_else(|| Error::not_supported("parent file names of images without a parent"))?;
        ["relative_path", "volume_path", "absolute_win32_path"]
            .iter()
            .find_map(|k| loc.get(k))
            .map(str::to_string)
            .ok_or_else(|| Error::not_supported("parent file names"))
    }

    /// `relative_path` resolved against this image's folder, then `volume_path` and
    /// `absolute_win32_path` mapped to this host where possible, then each path's file name
    /// next to this image.
    fn parent_candidates(&self) -> Result<Vec<PathBuf>> {
        if self.metadata().parent_locator.is_none() {
            return Err(Error::not_supported(
                "parent lookup of images without a parent",
            ));
        }
        Ok(self.locator_paths())
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        let mut out: Vec<Extent> = Vec::new();
        for e in self.map_file(offset, len)? {
            let e = e.extent();
            match out.last_mut() {
                Some(last) if last.kind == e.kind && last.offset + last.length == e.offset => {
                    last.length += e.length;
                }
                _ => out.push(e),
            }
        }
        Ok(out)
    }

    /// Fully present blocks (all of a fixed image's) map to their place in the file; a
    /// partially present block of a differencing image maps run by run from its sector bitmap
    /// (present sectors at their file offsets, the others [`Unallocated`]); not-present blocks
    /// are [`Unallocated`] in a differencing image and [`Zero`] otherwise. While a log replayed
    /// in memory lies over the file (a read-only open of a dirty image), data runs carry no file
    /// offset, since the file may not hold what the image reads there.
    ///
    /// [`Unallocated`]: Mapping::Unallocated
    /// [`Zero`]: Mapping::Zero
    fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        let layout = self.bat.layout();
        check_range(offset, len, layout.virtual_size)?;
        let mut out: Vec<MappedExtent> = Vec::new();
        self.resolve(&layout, offset, len, |off, n, src| {
            let mapping = match src {
                Source::File(file) => Mapping::Data {
                    file_offset: self.plain_file.then_some(file),
                },
                Source::Zero => Mapping::Zero,
                Source::Parent => Mapping::Unallocated,
            };
            push_extent(
                &mut out,
                MappedExtent {
                    offset: off,
                    length: n,
                    mapping,
                },
            );
            Ok(())
        })
        .map_err(|e| e.with_path(&self.path))?;
        Ok(out)
    }

    /// A plain read of the image file (never through a log replayed in memory).
    fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file.read_exact_at(file_offset, buf).map_err(|e| {
            io_err("read failed", e)
                .with_offset(file_offset)
                .with_path(&self.path)
        })
    }

    /// Checks every BAT entry (states, reserved bits, offsets inside the file and outside the
    /// other structures, no two blocks sharing space) and reports the log state and the
    /// tolerated deviations found at open. A dirty log counts as repaired when the image was
    /// opened read-write (the open replayed it).
    ///
    /// A truncated file is an error per missing structure and per missing block, and is
    /// never repaired: nothing is written, and the file is not extended to make missing data
    /// read as zeros.
    fn repair(&self, dry_run: bool) -> Result<CheckReport> {
        let _ = dry_run;
        let mut report = CheckReport::default();
        for w in &self.warnings {
            let truncated = self.truncated.contains(w);
            report.findings.push(Finding {
                severity: if truncated {
                    Severity::Error
                } else {
                    Severity::Warning
                },
                message: w.clone(),
                repaired: false,
            });
        }
        if self.log.dirty {
            report.findings.push(Finding {
                severity: Severity::Error,
                message: format!(
                    "the log holds {} entries that had not been replayed",
                    self.log.entries
                ),
                repaired: self.log.replay == "file",
            });
        }
        let layout = self.bat.layout();
        let mut used: Vec<(u64, u64, String)> = Vec::new();
        for b in 0..layout.data_blocks {
            match self.bat.block(b) {
                Ok(BlockState::Full(off) | BlockState::Partial(off)) => {
                    used.push((off, layout.block_size, format!("payload block {b}")));
                }
                Ok(_) => {}
                Err(e) => report.findings.push(Finding {
                    severity: Severity::Error,
                    message: error_chain(&e),
                    repaired: false,
                }),
            }
        }
        for c in 0..layout.data_blocks.div_ceil(layout.chunk_ratio) {
            if layout.has_parent {
                match self.bat.bitmap(c) {
                    Ok(Some(off)) => {
                        used.push((off, crate::format::MIB, format!("sector bitmap {c}")));
                    }
                    Ok(None) => {}
                    Err(e) => report.findings.push(Finding {
                        severity: Severity::Error,
                        message: error_chain(&e),
                        repaired: false,
                    }),
                }
            } else if self
                .bat
                .entry(layout.bitmap_index(c))
                .is_ok_and(|e| e != crate::format::BatEntry::EMPTY)
                && layout.bitmap_index(c) < layout.entries
            {
                report.findings.push(Finding {
                    severity: Severity::Warning,
                    message: format!(
                        "sector bitmap entry of chunk {c} is set in an image without a parent"
                    ),
                    repaired: false,
                });
            }
        }
        used.sort_by_key(|u| u.0);
        for w in used.windows(2) {
            if let [a, b] = w
                && a.0 + a.1 > b.0
            {
                report.findings.push(Finding {
                    severity: Severity::Error,
                    message: format!("{} at {:#x} overlaps {} at {:#x}", a.2, a.0, b.2, b.0),
                    repaired: false,
                });
            }
        }
        Ok(report)
    }

    fn dump(&self, out: &mut dyn io::Write) -> Result<()> {
        let w = |e: io::Error| io_err("cannot write the dump", e);
        let h = *self.header.read();
        let l = self.bat.layout();
        writeln!(out, "file identifier: creator {:?}", self.creator).map_err(w)?;
        writeln!(
            out,
            "header (slot {}): sequence {}, file write guid {}, data write guid {}, log guid {}, log {:#x}+{:#x}",
            h.slot + 1,
            h.sequence(),
            h.file_write_guid(),
            h.data_write_guid(),
            h.log_guid(),
            h.log_offset(),
            h.log_length()
        )
        .map_err(w)?;
        let regions = self.regions();
        writeln!(out, "region table (copy {}):", regions.copy + 1).map_err(w)?;
        for r in [regions.bat, regions.metadata]
            .iter()
            .chain(&regions.others)
        {
            writeln!(
                out,
                "  {} at {:#x}, length {:#x}, required {}",
                r.guid, r.offset, r.length, r.required
            )
            .map_err(w)?;
        }
        writeln!(out, "metadata:").map_err(w)?;
        for i in &self.metadata().items {
            writeln!(
                out,
                "  {} at +{:#x}, length {}, user {}, virtual disk {}, required {}",
                i.guid, i.offset, i.length, i.is_user, i.is_virtual_disk, i.is_required
            )
            .map_err(w)?;
        }
        if let Some(loc) = &self.metadata().parent_locator {
            writeln!(out, "parent locator:").map_err(w)?;
            for (k, v) in &loc.entries {
                writeln!(out, "  {k} = {v}").map_err(w)?;
            }
        }
        writeln!(
            out,
            "BAT: {} entries, chunk ratio {}, {} data blocks of {} bytes",
            l.entries, l.chunk_ratio, l.data_blocks, l.block_size
        )
        .map_err(w)?;
        let s = self.bat.summary().map_err(|e| e.with_path(&self.path))?;
        writeln!(
            out,
            "  not present {}, zero {}, fully present {}, partially present {}, bitmaps present {}",
            s.not_present, s.zero, s.fully_present, s.partially_present, s.bitmaps_present
        )
        .map_err(w)?;
        writeln!(
            out,
            "log: {}, replay {}, {} entries, head sequence {}",
            if self.log.dirty { "dirty" } else { "clean" },
            self.log.replay,
            self.log.entries,
            self.log.head_sequence
        )
        .map_err(w)?;
        for e in &self.log.sequence {
            writeln!(
                out,
                "  entry at log +{:#x}: sequence {}, length {:#x}, tail {:#x}, {} descriptors, flushed file offset {:#x}, last file offset {:#x}",
                e.log_offset, e.sequence, e.length, e.tail, e.descriptors, e.flushed_file_offset, e.last_file_offset
            )
            .map_err(w)?;
        }
        Ok(())
    }

    fn warnings(&self) -> Vec<String> {
        self.warnings.clone()
    }

    fn details(&self) -> serde_json::Value {
        let h = self.header.read();
        let kind = if self.metadata().has_parent {
            "differencing"
        } else if self.metadata().leave_block_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        json!({
            "type": kind,
            "creator": self.creator,
            "block_size": self.metadata().block_size,
            "logical_sector_size": self.metadata().logical_sector_size,
            "physical_sector_size": self.metadata().physical_sector_size,
            "virtual_disk_id": self.metadata().virtual_disk_id.to_string(),
            "data_write_guid": h.data_write_guid().to_uuid().to_string(),
            "file_write_guid": h.file_write_guid().to_uuid().to_string(),
            "log_state": if self.log.dirty { format!("dirty, replayed in {}", self.log.replay) } else { "clean".to_string() },
            "log": self.log,
            "parent_locator": self.metadata().parent_locator.as_ref().map(|l| &l.entries),
            "chunk_ratio": self.bat.layout().chunk_ratio,
            "bat_entries": self.bat.layout().entries,
            "data_blocks": self.bat.layout().data_blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use vd_core::{CreateParams, Disk, ImageFlags, MemFileSystem, Registry, StorageProvider};

    use super::*;

    const MIB: u64 = 1 << 20;

    /// `x` as an index (test sizes are small).
    fn us(x: u64) -> usize {
        usize::try_from(x).unwrap()
    }

    fn registry() -> (Arc<MemFileSystem>, Registry) {
        let fs = Arc::new(MemFileSystem::new());
        let reg = Registry::builtin_with_provider(fs.clone());
        (fs, reg)
    }

    fn create(
        reg: &Registry,
        path: &str,
        flags: ImageFlags,
        parent: Option<(&Path, &dyn Image)>,
    ) -> Box<dyn Image> {
        let params = CreateParams {
            size: 4 * MIB,
            image_flags: flags,
            options: BTreeMap::from([("block_size".to_string(), "1M".to_string())]),
            ..CreateParams::default()
        };
        reg.create("vhdx", Path::new(path), &params, parent, false)
            .unwrap()
    }

    fn pattern(len: u64, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 253) as u8 ^ seed | 1).collect()
    }

    /// Every data run's file bytes are what `read_at` reads there.
    fn check_file_ranges(image: &dyn Image, map: &[MappedExtent]) {
        for e in map {
            if let Mapping::Data {
                file_offset: Some(f),
            } = e.mapping
            {
                let mut via_file = vec![0u8; usize::try_from(e.length).unwrap()];
                let mut via_image = via_file.clone();
                image.read_file_at(f, &mut via_file).unwrap();
                image.read_at(e.offset, &mut via_image).unwrap();
                assert_eq!(via_file, via_image, "run {e:?}");
            }
        }
    }

    #[test]
    fn map_file_of_a_differencing_image_follows_the_sector_bitmap() {
        let (_fs, reg) = registry();
        let base = create(&reg, "/base.vhdx", ImageFlags::empty(), None);
        base.write_at(0, &pattern(4 * MIB, 0x10)).unwrap();
        base.close(false).unwrap();
        let base = reg
            .open(Path::new("/base.vhdx"), OpenFlags::READ_ONLY)
            .unwrap();
        let child = create(
            &reg,
            "/child.vhdx",
            ImageFlags::DIFF,
            Some((Path::new("/base.vhdx"), base.as_ref())),
        );
        drop(base);
        // Block 0: sectors 1..3 and 8 present (partially present); block 2 whole (fully
        // present); blocks 1 and 3 not present.
        child.write_at(512, &pattern(1024, 0x20)).unwrap();
        child.write_at(4096, &pattern(512, 0x30)).unwrap();
        child.write_at(2 * MIB, &pattern(MIB, 0x40)).unwrap();
        let m = child.map_file(0, 4 * MIB).unwrap();
        let shape: Vec<(u64, u64, bool)> = m
            .iter()
            .map(|e| {
                (
                    e.offset,
                    e.length,
                    matches!(e.mapping, Mapping::Data { .. }),
                )
            })
            .collect();
        assert_eq!(
            shape,
            vec![
                (0, 512, false),
                (512, 1024, true),
                (1536, 4096 - 1536, false),
                (4096, 512, true),
                (4608, 2 * MIB - 4608, false),
                (2 * MIB, MIB, true),
                (3 * MIB, MIB, false),
            ]
        );
        for e in &m {
            match e.mapping {
                Mapping::Data { file_offset } => assert!(file_offset.is_some(), "{e:?}"),
                other => assert_eq!(other, Mapping::Unallocated, "{e:?}"),
            }
        }
        // Both runs of block 0 lie in one payload block, at their offsets within it.
        let off = |i: usize| match m[i].mapping {
            Mapping::Data { file_offset } => file_offset.unwrap(),
            _ => unreachable!(),
        };
        assert_eq!(off(3) - off(1), 4096 - 512);
        assert_eq!((off(1) - 512) % MIB, 0, "block 0 starts on a MiB boundary");
        check_file_ranges(child.as_ref(), &m);
        // A request inside one run maps to the matching part of it.
        assert_eq!(
            child.map_file(1024, 256).unwrap(),
            vec![MappedExtent {
                offset: 1024,
                length: 256,
                mapping: Mapping::Data {
                    file_offset: Some(off(1) + 512)
                }
            }]
        );
        // `map` is map_file without offsets.
        let kinds: Vec<Extent> = child.map(0, 4 * MIB).unwrap();
        assert_eq!(kinds.len(), m.len());
        assert!(kinds.iter().zip(&m).all(|(k, e)| *k == e.extent()));
        child.close(false).unwrap();
        // Through the chain: the child's sectors, the base elsewhere.
        let disk = Disk::from_layers(vec![
            reg.open(Path::new("/child.vhdx"), OpenFlags::READ_ONLY)
                .unwrap(),
            reg.open(Path::new("/base.vhdx"), OpenFlags::READ_ONLY)
                .unwrap(),
        ])
        .unwrap();
        let mut want = pattern(4 * MIB, 0x10);
        want[512..1536].copy_from_slice(&pattern(1024, 0x20));
        want[4096..4608].copy_from_slice(&pattern(512, 0x30));
        want[us(2 * MIB)..us(3 * MIB)].copy_from_slice(&pattern(MIB, 0x40));
        let mut got = vec![0u8; us(4 * MIB)];
        disk.read_at(0, &mut got).unwrap();
        assert!(got == want, "chain read differs");
        for (o, l) in [(0, 4096), (300, 5000), (MIB - 100, 200), (3 * MIB - 7, 14)] {
            let mut part = vec![0u8; l];
            disk.read_at(o, &mut part).unwrap();
            assert!(part == want[us(o)..us(o) + l], "{o:#x}+{l:#x}");
        }
    }

    #[test]
    fn map_file_of_fixed_and_dynamic_images() {
        let (_fs, reg) = registry();
        let fixed = create(&reg, "/fixed.vhdx", ImageFlags::FIXED, None);
        let m = fixed.map_file(0, 4 * MIB).unwrap();
        let mut covered = 0;
        for e in &m {
            assert!(
                matches!(
                    e.mapping,
                    Mapping::Data {
                        file_offset: Some(_)
                    }
                ),
                "{e:?}"
            );
            covered += e.length;
        }
        assert_eq!(covered, 4 * MIB);
        fixed.write_at(MIB + 5, &pattern(3000, 0x50)).unwrap();
        check_file_ranges(fixed.as_ref(), &fixed.map_file(0, 4 * MIB).unwrap());
        // A dynamic image: unwritten blocks read as zeros (no parent), written ones at offsets.
        let dynamic = create(&reg, "/dyn.vhdx", ImageFlags::empty(), None);
        dynamic.write_at(3 * MIB, &pattern(MIB, 0x60)).unwrap();
        let m = dynamic.map_file(2 * MIB, 2 * MIB).unwrap();
        assert_eq!(m.len(), 2, "{m:?}");
        assert_eq!(m[0].mapping, Mapping::Zero);
        assert!(matches!(
            m[1].mapping,
            Mapping::Data {
                file_offset: Some(_)
            }
        ));
        check_file_ranges(dynamic.as_ref(), &m);
        assert_eq!(
            dynamic.map_file(4 * MIB, 1).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn a_log_replayed_in_memory_hides_file_offsets() {
        let (fs, reg) = registry();
        let image = create(&reg, "/dirty.vhdx", ImageFlags::empty(), None);
        image.write_at(MIB, &pattern(MIB, 0x70)).unwrap();
        image.flush().unwrap();
        // Gone without closing: the header still names the session's log.
        drop(image);
        assert!(fs.exists(Path::new("/dirty.vhdx")));
        let image = reg
            .open(Path::new("/dirty.vhdx"), OpenFlags::READ_ONLY)
            .unwrap();
        let m = image.map_file(0, 4 * MIB).unwrap();
        assert!(
            m.iter()
                .any(|e| e.mapping == Mapping::Data { file_offset: None }),
            "{m:?}"
        );
        assert!(
            m.iter().all(|e| !matches!(
                e.mapping,
                Mapping::Data {
                    file_offset: Some(_)
                }
            )),
            "{m:?}"
        );
        // Readers fall back to read_at, and read what the log says.
        let disk = Disk::from_layers(vec![image]).unwrap();
        let mut got = vec![0u8; us(2 * MIB)];
        disk.read_at(0, &mut got).unwrap();
        assert!(got[..us(MIB)].iter().all(|&b| b == 0));
        assert!(got[us(MIB)..] == pattern(MIB, 0x70)[..]);
    }
}
