//! The `vd_core::Image` impl: an opened image's path and storage provider around the engine
//! that holds its state. Each method hands its work to the engine and attaches the path to
//! the errors it returns, in one place ([`on`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use uuid::Uuid;
use vd_core::{
    CheckReport, Error, ErrorKind, Extent, Facts, Geometry, Image, ImageFlags, LayoutHold,
    LayoutRegion, MappedExtent, OpenFlags, OpenRequest, Result, StorageProvider, Warning,
};

use crate::bat::Layout;
use crate::engine::Engine;
use crate::error::io_err;
use crate::guid::{USER_LCHS, USER_PCHS};
use crate::locator::candidate_paths;
use crate::metadata::Metadata;
use crate::report::LogState;

/// An opened VHDX image.
///
/// Reads take no lock across payload I/O; changes (writes, discards, metadata edits, resize,
/// compact, flush, close) are serialised by one write mutex, which readers never take.
pub struct VhdxImage {
    path: PathBuf,
    provider: Arc<dyn StorageProvider>,
    pub(crate) engine: Engine,
}

impl std::fmt::Debug for VhdxImage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxImage")
            .field("path", &self.path)
            .field("size", &self.metadata().virtual_size)
            .finish_non_exhaustive()
    }
}

/// `r` with `path` attached to its error (kept if the error names a path already): the one
/// place the image's path is put on errors.
fn on<T>(path: &Path, r: Result<T>) -> Result<T> {
    r.map_err(|e| e.with_path(path))
}

/// The rules a parent must meet beyond its identity: a VHDX image with `sector_size`-byte
/// logical sectors.
fn parent_rules(sector_size: u32, parent: &dyn Image) -> Result<()> {
    if parent.format() != "vhdx" {
        return Err(Error::new(
            ErrorKind::ParentMismatch,
            format!(
                "parent {} is not a VHDX image (it opens as {}): the parent of a VHDX \
                 differencing image is a VHDX image",
                parent.path().display(),
                parent.format()
            ),
        ));
    }
    if parent.sector_size() != sector_size {
        return Err(Error::new(
            ErrorKind::ParentMismatch,
            format!(
                "parent {} has {}-byte logical sectors, the child {sector_size}-byte ones",
                parent.path().display(),
                parent.sector_size()
            ),
        ));
    }
    Ok(())
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
    /// A LogGuid that no intact log entry carries is an empty log, as QEMU reads it (QEMU sets
    /// the LogGuid before it writes its first entry, so a crash in between leaves exactly
    /// this): the open succeeds with a warning, and a read-write open clears the LogGuid. A
    /// strict open refuses it ([`Corruption::NoActiveLogSequence`]: to the letter of the spec a
    /// set LogGuid asks for a replay). Intact entries that form no complete sequence are refused
    /// in every mode.
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
    /// Typed errors for every rule the image breaks; I/O errors. Each names the image's path.
    ///
    /// [`Corruption::BatBeyondFile`]: crate::error::Corruption::BatBeyondFile
    /// [`Corruption::NoActiveLogSequence`]: crate::error::Corruption::NoActiveLogSequence
    pub fn open(req: OpenRequest<'_>) -> Result<Self> {
        let engine = on(req.path, Engine::open(req.storage, req.flags, req.path))?;
        Ok(Self {
            path: req.path.to_path_buf(),
            provider: req.provider,
            engine,
        })
    }

    /// `r` with this image's path attached to its error.
    fn at<T>(&self, r: Result<T>) -> Result<T> {
        on(&self.path, r)
    }

    /// The block layout.
    pub fn layout(&self) -> Layout {
        self.engine.layout()
    }

    /// The parsed metadata.
    pub fn metadata(&self) -> parking_lot::RwLockReadGuard<'_, Metadata> {
        self.engine.metadata()
    }

    /// What happened to the log at open.
    pub fn log_state(&self) -> &LogState {
        &self.engine.log
    }

    /// The creator string of the file identifier.
    pub fn creator(&self) -> &str {
        &self.engine.creator
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
        self.at(self.engine.read(offset, buf))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.at(self.engine.write(offset, buf))
    }

    fn flush(&self) -> Result<()> {
        self.at(self.engine.flush())
    }

    /// Discards whole blocks (they become ZERO; a fixed image keeps its blocks and zeros them)
    /// and writes zeros over partial ones.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.at(self.engine.zero(offset, len, true))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.at(self.engine.zero(offset, len, false))
    }

    fn close(self: Box<Self>, delete: bool) -> Result<()> {
        self.at(self.engine.close())?;
        if delete {
            let deleted = self.provider.delete(&self.path);
            self.at(deleted.map_err(|e| io_err("cannot delete", e)))?;
        }
        Ok(())
    }

    fn rename(&mut self, new_path: &Path) -> Result<()> {
        let renamed = self.provider.rename(&self.path, new_path);
        self.at(renamed.map_err(|e| io_err("cannot rename", e)))?;
        self.path = new_path.to_path_buf();
        Ok(())
    }

    /// From the layout, which lives in the calling thread's shard (see the engine's locks), not
    /// the metadata lock that every thread would write: `Disk` asks for the size on every read.
    fn size(&self) -> u64 {
        self.engine.layout().virtual_size
    }

    fn sector_size(&self) -> u32 {
        self.metadata().logical_sector_size
    }

    /// A differencing image tracks whole logical sectors in its sector bitmap.
    fn write_granularity(&self) -> u32 {
        self.engine.write_granularity()
    }

    fn physical_sector_size(&self) -> u32 {
        self.metadata().physical_sector_size
    }

    fn file_size(&self) -> Result<u64> {
        self.at(self.engine.file_size())
    }

    fn image_flags(&self) -> ImageFlags {
        self.engine.image_flags()
    }

    fn open_flags(&self) -> OpenFlags {
        self.engine.flags
    }

    /// Stored in vd's user metadata item when set; synthesised otherwise.
    fn pchs_geometry(&self) -> Result<Geometry> {
        self.at(self.engine.geometry(USER_PCHS, Geometry::synthesize_pchs))
    }

    /// Stored as vd's own non-required user metadata item, which other readers ignore.
    fn set_pchs_geometry(&self, geometry: Geometry) -> Result<()> {
        self.at(self.engine.set_geometry(USER_PCHS, geometry))
    }

    /// Stored in vd's user metadata item when set; synthesised otherwise.
    fn lchs_geometry(&self) -> Result<Geometry> {
        self.at(self.engine.geometry(USER_LCHS, Geometry::synthesize_lchs))
    }

    /// Stored as vd's own non-required user metadata item.
    fn set_lchs_geometry(&self, geometry: Geometry) -> Result<()> {
        self.at(self.engine.set_geometry(USER_LCHS, geometry))
    }

    /// vd's user metadata item (VHDX itself has no comment).
    fn comment(&self) -> Result<Option<String>> {
        self.at(self.engine.comment())
    }

    fn set_comment(&self, comment: Option<&str>) -> Result<()> {
        self.at(self.engine.set_comment_item(comment))
    }

    /// Rewrites the Virtual Disk ID (page 83) item.
    fn set_uuid(&self, uuid: Uuid) -> Result<()> {
        self.at(self.engine.set_disk_id(uuid))
    }

    /// Sets the header's DataWriteGuid (children recording the old one no longer match).
    fn set_modification_uuid(&self, uuid: Uuid) -> Result<()> {
        self.at(self.engine.set_data_write_guid(uuid))
    }

    /// Rewrites `parent_linkage`.
    fn set_parent_uuid(&self, uuid: Uuid) -> Result<()> {
        let linkage = format!("{{{uuid}}}");
        self.at(self.engine.set_locator_key("parent_linkage", linkage))
    }

    /// Rewrites `parent_linkage2`.
    fn set_parent_modification_uuid(&self, uuid: Uuid) -> Result<()> {
        let linkage = format!("{{{uuid}}}");
        self.at(self.engine.set_locator_key("parent_linkage2", linkage))
    }

    /// Rewrites `relative_path` (Windows separators).
    fn set_parent_filename(&self, name: &str) -> Result<()> {
        let windows = name.replace('/', "\\");
        self.at(self.engine.set_locator_key("relative_path", windows))
    }

    /// Moves blocks down into holes and truncates the file.
    fn compact(&self, progress: vd_core::Progress<'_>) -> Result<()> {
        self.at(self.engine.compact(progress))
    }

    /// Grows (zeroing the old partial last block's tail; preallocating in fixed images) or
    /// shrinks (refused when the part cut off holds data). The BAT must fit in its region.
    fn resize(&self, new_size: u64, progress: vd_core::Progress<'_>) -> Result<()> {
        self.at(self.engine.resize(new_size))?;
        progress(1, 1);
        Ok(())
    }

    /// The parent must be a VHDX image (MS-VHDX knows no other parent; a file of another
    /// format, probed as raw, would otherwise be read as the parent's data), have this image's
    /// logical sector size, and its DataWriteGuid must match `parent_linkage` (or
    /// `parent_linkage2`).
    fn check_parent(&self, parent: &dyn Image) -> Result<()> {
        self.at(parent_rules(self.sector_size(), parent))?;
        vd_core::check_parent_identity(self, parent)
    }

    /// The Virtual Disk ID (page 83) metadata item.
    fn uuid(&self) -> Result<Uuid> {
        Ok(self.metadata().virtual_disk_id)
    }

    /// The header's DataWriteGuid: it changes whenever user-visible data changes.
    fn modification_uuid(&self) -> Result<Uuid> {
        Ok(self.engine.data_write_guid())
    }

    /// `parent_linkage`: the parent's DataWriteGuid when this child was made.
    fn parent_uuid(&self) -> Result<Uuid> {
        self.at(self.engine.parent_uuid())
    }

    /// `parent_linkage2`, where present and not nil.
    fn parent_modification_uuid(&self) -> Result<Uuid> {
        self.at(self.engine.parent_modification_uuid())
    }

    /// The first path key of the parent locator: `relative_path`, `volume_path`, then
    /// `absolute_win32_path`.
    fn parent_filename(&self) -> Result<String> {
        self.at(self.engine.parent_filename())
    }

    /// `relative_path` resolved against this image's folder, then `volume_path` and
    /// `absolute_win32_path` mapped to this host where possible, then each path's file name
    /// next to this image.
    fn parent_candidates(&self) -> Result<Vec<PathBuf>> {
        let loc = self.at(self
            .engine
            .parent_locator("parent lookup of images without a parent"))?;
        Ok(candidate_paths(&loc, &self.path, self.provider.as_ref()))
    }

    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.at(self.engine.map(offset, len))
    }

    /// Fully present blocks (all of a fixed image's) map to their place in the file; a
    /// partially present block of a differencing image maps run by run from its sector bitmap
    /// (present sectors at their file offsets, the others [`Unallocated`]); not-present blocks
    /// are [`Unallocated`] in a differencing image and [`Zero`] otherwise. While a log replayed
    /// in memory lies over the file (a read-only open of a dirty image), data runs carry no file
    /// offset, since the file may not hold what the image reads there.
    ///
    /// [`Unallocated`]: vd_core::Mapping::Unallocated
    /// [`Zero`]: vd_core::Mapping::Zero
    fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        self.at(self.engine.map_file(offset, len))
    }

    /// A plain read of the image file (never through a log replayed in memory).
    fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.at(self.engine.read_file_at(file_offset, buf))
    }

    /// Checks every BAT entry (states, reserved bits, offsets inside the file and outside the
    /// other structures, no two blocks sharing space) and reports the log state, the damaged
    /// redundant copies (a header or region table copy that is invalid, two region tables that
    /// differ: errors) and the other tolerated deviations found at open. A dirty log counts as
    /// repaired when the image was opened read-write (the open replayed it).
    ///
    /// Unless `dry_run`, a damaged header or region table copy is rewritten from the good one
    /// (the header through the update procedure of [MS-VHDX] 2.2.2.1), but only when nothing
    /// else is wrong: an image with another error is left as it is, byte for byte.
    ///
    /// A truncated file is an error per missing structure and per missing block, and is
    /// never repaired: nothing is written, and the file is not extended to make missing data
    /// read as zeros.
    fn repair(&self, dry_run: bool) -> Result<CheckReport> {
        self.at(self.engine.repair(dry_run))
    }

    fn dump(&self) -> Result<Facts> {
        self.at(self.engine.dump().map(Facts::new))
    }

    /// The damaged redundant copies, the other tolerated deviations, then the structures a
    /// truncated file lacks.
    fn warnings(&self) -> Vec<Warning> {
        self.engine
            .damaged
            .iter()
            .map(|d| &d.warning)
            .chain(&self.engine.warnings)
            .chain(&self.engine.truncated)
            .cloned()
            .collect()
    }

    fn details(&self) -> Option<Facts> {
        Some(Facts::new(self.engine.details()))
    }

    /// The header section's structures, the log, the BAT, the metadata region and runs of
    /// payload and sector-bitmap blocks, from the headers, the region table in force and
    /// every BAT entry.
    fn layout(&self) -> Result<Vec<LayoutRegion>> {
        let _hold = self.engine.relocation.hold();
        self.at(self.engine.file_layout())
    }

    /// The block size of the metadata.
    fn block_size(&self) -> Option<u64> {
        Some(u64::from(self.metadata().block_size))
    }

    /// Compaction and resize wait for the hold; see the lock order on the engine.
    fn hold_layout(&self) -> LayoutHold<'_> {
        self.engine.relocation.hold()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use vd_core::{ErrorKind, Image, OpenFlags};

    use crate::format::MIB;
    use crate::test_support::{create, reopen};

    #[test]
    fn errors_name_the_image_once() {
        let (storage, image) = create(4 * MIB, &[]);
        image.close(false).unwrap();
        let img = reopen(&storage, OpenFlags::READ_ONLY);
        let mut buf = [0u8; 512];
        let e = img.read_at(4 * MIB, &mut buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert_eq!(e.context().path.as_deref(), Some(Path::new("t.vhdx")));
        assert_eq!(e.to_string().matches("t.vhdx").count(), 1, "{e}");
        let e = img.write_at(0, &buf).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly);
        assert_eq!(e.context().path.as_deref(), Some(Path::new("t.vhdx")));
        let e = img.parent_uuid().unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        assert_eq!(e.context().path.as_deref(), Some(Path::new("t.vhdx")));
    }

    #[test]
    fn the_image_reports_typed_facts() {
        let (storage, image) = create(4 * MIB, &[]);
        image.close(false).unwrap();
        let img = reopen(&storage, OpenFlags::READ_ONLY);
        assert!(img.warnings().is_empty());
        assert!(img.repair(true).unwrap().is_clean());
        let details = serde_json::to_value(img.details()).unwrap();
        assert_eq!(details["type"], "dynamic");
        let dump = serde_json::to_value(img.dump().unwrap()).unwrap();
        assert_eq!(dump["region_table"]["regions"][0]["name"], "BAT");
    }
}
