//! One opened image: the per-image half of VirtualBox's `VDIMAGEBACKEND`.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use serde::Serialize;

use crate::error::{Error, ErrorKind, Result};
use crate::flags::{ImageFlags, OpenFlags};
use crate::geometry::Geometry;
use crate::layout::LayoutRegion;
use crate::mapping::{MappedExtent, Mapping, merge_extents};
use crate::relocation::LayoutHold;
use crate::report::{CheckReport, Facts, Warning};

/// What a range of an image holds, as far as this one image knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ExtentKind {
    /// Data stored in this image.
    Data,
    /// Reads as zeros and is not stored as data in this image.
    Zero,
    /// Not in this image: a differencing image's reads fall through to the parent; in a base
    /// image it reads as zeros.
    Unallocated,
}

/// A run of the virtual disk with one [`ExtentKind`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Extent {
    /// Start in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// What the run holds.
    pub kind: ExtentKind,
}

/// Progress callback: `(done, total)` in arbitrary units.
pub type Progress<'a> = &'a mut dyn FnMut(u64, u64);

/// One opened image. I/O methods take `&self`; implementations synchronise internally.
///
/// Optional operations have default implementations that return
/// [`ErrorKind::NotSupported`](crate::ErrorKind::NotSupported); the backend advertises what it
/// implements through [`Backend::capabilities`](crate::Backend::capabilities).
pub trait Image: Send + Sync {
    /// The backend's name (VirtualBox `pfnGetFormat`... the backend's `pszBackendName`).
    fn format(&self) -> &'static str;

    /// The path the image was opened from.
    fn path(&self) -> &Path;

    /// Reads `buf.len()` bytes at `offset` (`pfnRead`). Ranges this image does not hold read as
    /// zeros; [`Disk`](crate::Disk) uses [`map_file`](Image::map_file) to send them to the parent
    /// instead, and reads data with a known file offset through
    /// [`read_file_at`](Image::read_file_at). The last image of a chain (nothing below it) is
    /// read through this method alone.
    ///
    /// # Errors
    /// `OutOfRange` beyond the virtual size; I/O errors.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()>;

    /// Writes `buf` at `offset` (`pfnWrite`).
    ///
    /// # Errors
    /// `ReadOnly`, `OutOfRange`, I/O errors.
    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        let _ = (offset, buf);
        Err(Error::not_supported("writing"))
    }

    /// Makes every completed write durable (`pfnFlush`).
    ///
    /// # Errors
    /// I/O errors.
    fn flush(&self) -> Result<()>;

    /// Closes the image, deleting its file if `delete` (`pfnClose`).
    ///
    /// # Errors
    /// Errors of the final flush or the deletion.
    fn close(self: Box<Self>, delete: bool) -> Result<()>;

    /// Renames the image file (`pfnRename`).
    ///
    /// # Errors
    /// I/O errors; `NotSupported`.
    fn rename(&mut self, new_path: &Path) -> Result<()> {
        let _ = new_path;
        Err(Error::not_supported("renaming"))
    }

    /// Virtual disk size in bytes (`pfnGetSize`).
    fn size(&self) -> u64;

    /// Logical sector size in bytes (`pfnGetSectorSize`).
    fn sector_size(&self) -> u32 {
        512
    }

    /// The unit a differencing image records as "in this layer or the parent's": [`Disk`]
    /// widens writes to it, filling the edges from the chain. 1 (the default) means bytes.
    ///
    /// [`Disk`]: crate::Disk
    fn write_granularity(&self) -> u32 {
        1
    }

    /// Physical sector size in bytes.
    fn physical_sector_size(&self) -> u32 {
        self.sector_size()
    }

    /// Size of the image file in bytes (`pfnGetFileSize`).
    ///
    /// # Errors
    /// I/O errors.
    fn file_size(&self) -> Result<u64>;

    /// Physical CHS geometry (`pfnGetPCHSGeometry`); synthesised when the format stores none.
    ///
    /// # Errors
    /// `NotSupported`.
    fn pchs_geometry(&self) -> Result<Geometry> {
        Ok(Geometry::synthesize_pchs(self.size()))
    }

    /// Sets the physical geometry (`pfnSetPCHSGeometry`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_pchs_geometry(&self, geometry: Geometry) -> Result<()> {
        let _ = geometry;
        Err(Error::not_supported("setting the physical geometry"))
    }

    /// Logical CHS geometry (`pfnGetLCHSGeometry`); synthesised when the format stores none.
    ///
    /// # Errors
    /// `NotSupported`.
    fn lchs_geometry(&self) -> Result<Geometry> {
        Ok(Geometry::synthesize_lchs(self.size()))
    }

    /// Sets the logical geometry (`pfnSetLCHSGeometry`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_lchs_geometry(&self, geometry: Geometry) -> Result<()> {
        let _ = geometry;
        Err(Error::not_supported("setting the logical geometry"))
    }

    /// Image flags (`pfnGetImageFlags`).
    fn image_flags(&self) -> ImageFlags;

    /// Flags the image was opened with (`pfnGetOpenFlags`).
    fn open_flags(&self) -> OpenFlags;

    /// Changes the open flags, e.g. read-only to read-write (`pfnSetOpenFlags`).
    ///
    /// # Errors
    /// `NotSupported`; errors reopening the file.
    fn set_open_flags(&self, flags: OpenFlags) -> Result<()> {
        let _ = flags;
        Err(Error::not_supported("changing open flags"))
    }

    /// The image comment (`pfnGetComment`).
    ///
    /// # Errors
    /// `NotSupported`.
    fn comment(&self) -> Result<Option<String>> {
        Err(Error::not_supported("comments"))
    }

    /// Sets the image comment (`pfnSetComment`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_comment(&self, comment: Option<&str>) -> Result<()> {
        let _ = comment;
        Err(Error::not_supported("comments"))
    }

    /// The image UUID (`pfnGetUuid`).
    ///
    /// # Errors
    /// `NotSupported` for formats without one.
    fn uuid(&self) -> Result<uuid::Uuid> {
        Err(Error::not_supported("image UUIDs"))
    }

    /// Sets the image UUID (`pfnSetUuid`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_uuid(&self, uuid: uuid::Uuid) -> Result<()> {
        let _ = uuid;
        Err(Error::not_supported("image UUIDs"))
    }

    /// The modification UUID (`pfnGetModificationUuid`).
    ///
    /// # Errors
    /// `NotSupported`.
    fn modification_uuid(&self) -> Result<uuid::Uuid> {
        Err(Error::not_supported("modification UUIDs"))
    }

    /// Sets the modification UUID (`pfnSetModificationUuid`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_modification_uuid(&self, uuid: uuid::Uuid) -> Result<()> {
        let _ = uuid;
        Err(Error::not_supported("modification UUIDs"))
    }

    /// The parent's identity as recorded by this child (`pfnGetParentUuid`). By vd's
    /// convention this is the parent's [`modification_uuid`](Image::modification_uuid) at the
    /// time the child was made (VHDX: `parent_linkage`, the parent's DataWriteGuid), which is
    /// what the default [`check_parent`](Image::check_parent) compares.
    ///
    /// # Errors
    /// `NotSupported`.
    fn parent_uuid(&self) -> Result<uuid::Uuid> {
        Err(Error::not_supported("parent UUIDs"))
    }

    /// Sets the parent UUID (`pfnSetParentUuid`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_parent_uuid(&self, uuid: uuid::Uuid) -> Result<()> {
        let _ = uuid;
        Err(Error::not_supported("parent UUIDs"))
    }

    /// The parent's modification UUID as recorded by this child
    /// (`pfnGetParentModificationUuid`).
    ///
    /// # Errors
    /// `NotSupported`.
    fn parent_modification_uuid(&self) -> Result<uuid::Uuid> {
        Err(Error::not_supported("parent modification UUIDs"))
    }

    /// Sets the parent modification UUID (`pfnSetParentModificationUuid`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_parent_modification_uuid(&self, uuid: uuid::Uuid) -> Result<()> {
        let _ = uuid;
        Err(Error::not_supported("parent modification UUIDs"))
    }

    /// The parent's file name as stored in the child (`pfnGetParentFilename`).
    ///
    /// # Errors
    /// `NotSupported` for images without a parent.
    fn parent_filename(&self) -> Result<String> {
        Err(Error::not_supported("parent file names"))
    }

    /// Sets the stored parent file name (`pfnSetParentFilename`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`.
    fn set_parent_filename(&self, name: &str) -> Result<()> {
        let _ = name;
        Err(Error::not_supported("parent file names"))
    }

    /// Where to look for the parent, in the order to try (resolved against this image's
    /// location). The default resolves [`parent_filename`](Image::parent_filename).
    ///
    /// # Errors
    /// `NotSupported` for images without a parent.
    fn parent_candidates(&self) -> Result<Vec<PathBuf>> {
        let name = self.parent_filename()?;
        let dir = self.path().parent().unwrap_or_else(|| Path::new(""));
        Ok(vec![dir.join(name)])
    }

    /// Whether `parent` is the image this child was made from. The default compares the
    /// recorded parent UUID (and parent modification UUID, where stored) with the parent's
    /// modification UUID, accepting images that record neither.
    ///
    /// # Errors
    /// `ParentMismatch` naming both identities.
    fn check_parent(&self, parent: &dyn Image) -> Result<()> {
        check_parent_identity(self, parent)
    }

    /// Time of last modification where the format stores one (`pfnGetTimestamp`).
    ///
    /// # Errors
    /// `NotSupported`.
    fn timestamp(&self) -> Result<SystemTime> {
        Err(Error::not_supported("timestamps"))
    }

    /// What each part of `[offset, offset + len)` holds in this image (block status; VirtualBox
    /// reports it as `VERR_VD_BLOCK_FREE` from `pfnRead`). Extents are contiguous and cover the
    /// whole range.
    ///
    /// # Errors
    /// `OutOfRange`; I/O errors reading metadata.
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>>;

    /// Like [`map`](Image::map), and says where data lives: each data run carries its offset in
    /// the image file when it is a plain range of that file, so a reader can read it with
    /// [`read_file_at`](Image::read_file_at) (or copy it as a file range) without a second
    /// lookup. Extents are contiguous, cover the whole range, and adjacent ones that
    /// [join](MappedExtent::joins) are merged.
    ///
    /// The default reports [`map`](Image::map)'s runs with no file offsets, so readers fall
    /// back to [`read_at`](Image::read_at).
    ///
    /// # Errors
    /// `OutOfRange`; I/O errors reading metadata; typed corruption errors for data the image
    /// should hold but cannot (a block beyond the end of a truncated file, say), never zeros.
    fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        Ok(merge_extents(self.map(offset, len)?.into_iter().map(|e| {
            MappedExtent {
                offset: e.offset,
                length: e.length,
                mapping: match e.kind {
                    ExtentKind::Data => Mapping::Data { file_offset: None },
                    ExtentKind::Zero => Mapping::Zero,
                    ExtentKind::Unallocated => Mapping::Unallocated,
                },
            }
        })))
    }

    /// Reads `buf.len()` bytes of the image file at `file_offset`: a plain range of the file,
    /// read through the image's storage, as [`map_file`](Image::map_file) reported it.
    ///
    /// The default refuses: an image whose `map_file` reports file offsets implements it.
    ///
    /// # Errors
    /// `NotSupported`; I/O errors (a short read is `UnexpectedEof`).
    fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        let _ = (file_offset, buf);
        Err(Error::not_supported("reading file ranges"))
    }

    /// Discards `[offset, offset + len)` so that it reads as zeros (`pfnDiscard`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`, `OutOfRange`.
    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        let _ = (offset, len);
        Err(Error::not_supported("discard"))
    }

    /// Writes zeros over `[offset, offset + len)`, sparsely where the format can.
    ///
    /// # Errors
    /// As [`write_at`](Image::write_at).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "pos < end, and end = offset + len is checked not to overflow"
    )]
    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        const CHUNK: u64 = 1 << 20;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "the range ends past 2^64"))?;
        // At most CHUNK bytes, which fits in memory on every platform vd builds for.
        let zeros = vec![0u8; 1 << 20];
        let mut pos = offset;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let part = usize::try_from(n)
                .ok()
                .and_then(|n| zeros.get(..n))
                .ok_or_else(|| Error::invalid_argument("length overflows"))?;
            self.write_at(pos, part)?;
            pos += n;
        }
        Ok(())
    }

    /// Moves data down and shrinks the file (`pfnCompact`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`, I/O errors.
    fn compact(&self, progress: Progress<'_>) -> Result<()> {
        let _ = progress;
        Err(Error::not_supported("compacting"))
    }

    /// Changes the virtual size (`pfnResize`).
    ///
    /// # Errors
    /// `NotSupported`, `ReadOnly`, `InvalidArgument`.
    fn resize(&self, new_size: u64, progress: Progress<'_>) -> Result<()> {
        let _ = (new_size, progress);
        Err(Error::not_supported("resizing"))
    }

    /// Checks the image, and repairs what is safe unless `dry_run` (`pfnRepair` with
    /// `VD_REPAIR_DRY_RUN`).
    ///
    /// # Errors
    /// `NotSupported`; I/O errors.
    fn repair(&self, dry_run: bool) -> Result<CheckReport> {
        let _ = dry_run;
        Err(Error::not_supported("checking"))
    }

    /// Describes every on-disk structure (`pfnDump`), as typed facts a front end renders.
    ///
    /// # Errors
    /// `NotSupported`; I/O errors.
    fn dump(&self) -> Result<Facts> {
        Err(Error::not_supported("dumping"))
    }

    /// Tolerated deviations found while opening.
    fn warnings(&self) -> Vec<Warning> {
        Vec::new()
    }

    /// Format-specific facts for `info` (like qemu-img's "format specific information").
    fn details(&self) -> Option<Facts> {
        None
    }

    /// Holds the image's data in place for one read request: while the hold lives, the image
    /// moves or cuts no data in its file, so offsets from [`map_file`](Image::map_file) stay
    /// valid for [`read_file_at`](Image::read_file_at). [`Disk`](crate::Disk) takes it per
    /// layer for each read. Images that never move data return [`LayoutHold::none`].
    fn hold_layout(&self) -> LayoutHold<'_> {
        LayoutHold::none()
    }

    /// Where each structure of the image lies in its own file: headers, tables, logs, runs of
    /// payload blocks, and so on, sorted by offset. Ranges do not overlap; space between them
    /// is unused (front ends show it as [`RegionKind::Free`](crate::RegionKind::Free)).
    /// Adjacent blocks of one kind are one region, and the number of regions is bounded
    /// whatever the size of the image (see [`BlockRuns`](crate::BlockRuns)).
    ///
    /// The default refuses: a backend that knows its file's layout implements it.
    ///
    /// # Errors
    /// `NotSupported`; I/O errors and typed corruption errors reading the tables that say
    /// where the blocks are.
    fn layout(&self) -> Result<Vec<LayoutRegion>> {
        Err(Error::not_supported("describing the file layout"))
    }

    /// The unit the image allocates its payload in (VHDX: the block size), where the format
    /// has one; `None` (the default) when it has none, as for a raw file.
    fn block_size(&self) -> Option<u64> {
        None
    }
}

/// The identity check behind [`Image::check_parent`]'s default: the child's recorded parent UUID
/// (or parent modification UUID, where stored and not nil) must equal the parent's modification
/// UUID; images that record neither are accepted.
///
/// # Errors
/// `ParentMismatch` naming both identities, with a [`LinkageMismatch`](crate::LinkageMismatch)
/// as its source.
pub fn check_parent_identity<C: Image + ?Sized>(child: &C, parent: &dyn Image) -> Result<()> {
    let want = match child.parent_uuid() {
        Ok(u) => u,
        Err(e) if e.kind() == ErrorKind::NotSupported => return Ok(()),
        Err(e) => return Err(e),
    };
    let want2 = child.parent_modification_uuid().ok();
    let have = match parent.modification_uuid() {
        Ok(u) => u,
        Err(e) if e.kind() == ErrorKind::NotSupported => return Ok(()),
        Err(e) => return Err(e),
    };
    if have == want || want2.is_some_and(|w| !w.is_nil() && w == have) {
        Ok(())
    } else {
        Err(Error::linkage(crate::LinkageMismatch {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            found: have,
            expected: want,
        }))
    }
}

/// Checks that `[offset, offset + len)` lies inside a disk of `size` bytes.
///
/// # Errors
/// `OutOfRange` when it does not.
pub fn check_range(offset: u64, len: u64, size: u64) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::out_of_range(offset, len, size)),
    }
}

impl std::fmt::Debug for dyn Image {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Image")
            .field("format", &self.format())
            .field("path", &self.path())
            .field("size", &self.size())
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::LinkageMismatch;
    use parking_lot::Mutex;
    use uuid::Uuid;

    /// An image that implements only the required methods (over `size` zero bytes), records
    /// the writes it gets, and answers the identity questions it is given.
    #[derive(Default)]
    struct Bare {
        path: PathBuf,
        size: u64,
        writable: bool,
        writes: Mutex<Vec<(u64, usize, bool)>>,
        parent_name: Option<String>,
        parent_uuid: Option<Uuid>,
        parent_modification: Option<Uuid>,
        modification: Option<Uuid>,
    }

    impl Image for Bare {
        fn format(&self) -> &'static str {
            "bare"
        }
        fn path(&self) -> &Path {
            &self.path
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            check_range(offset, buf.len() as u64, self.size)?;
            buf.fill(0);
            Ok(())
        }
        fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
            if !self.writable {
                return Err(Error::not_supported("writing"));
            }
            check_range(offset, buf.len() as u64, self.size)?;
            let zero = buf.iter().all(|&b| b == 0);
            self.writes.lock().push((offset, buf.len(), zero));
            Ok(())
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
            ImageFlags::empty()
        }
        fn open_flags(&self) -> OpenFlags {
            OpenFlags::READ_ONLY
        }
        fn parent_filename(&self) -> Result<String> {
            self.parent_name
                .clone()
                .ok_or_else(|| Error::not_supported("parent file names"))
        }
        fn parent_uuid(&self) -> Result<Uuid> {
            self.parent_uuid
                .ok_or_else(|| Error::not_supported("parent UUIDs"))
        }
        fn parent_modification_uuid(&self) -> Result<Uuid> {
            self.parent_modification
                .ok_or_else(|| Error::not_supported("parent modification UUIDs"))
        }
        fn modification_uuid(&self) -> Result<Uuid> {
            self.modification
                .ok_or_else(|| Error::not_supported("modification UUIDs"))
        }
        fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
            check_range(offset, len, self.size)?;
            Ok(vec![Extent {
                offset,
                length: len,
                kind: ExtentKind::Zero,
            }])
        }
    }

    fn bare(size: u64) -> Bare {
        Bare {
            path: PathBuf::from("/images/child.img"),
            size,
            ..Bare::default()
        }
    }

    #[test]
    fn optional_operations_default_to_not_supported() {
        let mut img = bare(4096);
        let u = Uuid::from_u128(1);
        let g = Geometry::default();
        let results: Vec<(&str, Result<()>)> = vec![
            ("write_at", Image::write_at(&img, 0, &[1])),
            ("set_pchs_geometry", img.set_pchs_geometry(g)),
            ("set_lchs_geometry", img.set_lchs_geometry(g)),
            ("set_open_flags", img.set_open_flags(OpenFlags::empty())),
            ("comment", img.comment().map(drop)),
            ("set_comment", img.set_comment(Some("c"))),
            ("uuid", img.uuid().map(drop)),
            ("set_uuid", img.set_uuid(u)),
            ("set_modification_uuid", img.set_modification_uuid(u)),
            ("set_parent_uuid", img.set_parent_uuid(u)),
            (
                "set_parent_modification_uuid",
                img.set_parent_modification_uuid(u),
            ),
            ("set_parent_filename", img.set_parent_filename("p")),
            ("parent_candidates", img.parent_candidates().map(drop)),
            ("timestamp", img.timestamp().map(drop)),
            ("discard", img.discard(0, 512)),
            ("write_zeroes", img.write_zeroes(0, 512)),
            ("compact", img.compact(&mut |_, _| {})),
            ("resize", img.resize(8192, &mut |_, _| {})),
            ("repair", img.repair(true).map(drop)),
            ("dump", img.dump().map(drop)),
            ("rename", img.rename(Path::new("/x"))),
        ];
        for (op, r) in results {
            let e = r.expect_err(op);
            assert_eq!(e.kind(), ErrorKind::NotSupported, "{op}: {e}");
        }
        assert!(img.warnings().is_empty());
        assert!(img.details().is_none());
    }

    #[test]
    fn sector_sizes_and_geometry_have_defaults() {
        let img = bare(1 << 30);
        assert_eq!(img.sector_size(), 512);
        assert_eq!(img.physical_sector_size(), 512);
        assert_eq!(img.write_granularity(), 1);
        assert_eq!(
            img.pchs_geometry().expect("pchs"),
            Geometry::synthesize_pchs(1 << 30)
        );
        assert_eq!(
            img.lchs_geometry().expect("lchs"),
            Geometry::synthesize_lchs(1 << 30)
        );
    }

    #[test]
    fn parent_candidates_default_to_the_name_beside_the_child() {
        let img = Bare {
            parent_name: Some("base.img".into()),
            ..bare(512)
        };
        assert_eq!(
            img.parent_candidates().expect("one candidate"),
            vec![PathBuf::from("/images/base.img")]
        );
        let img = Bare {
            path: PathBuf::from("child.img"),
            parent_name: Some("base.img".into()),
            ..bare(512)
        };
        assert_eq!(
            img.parent_candidates().expect("relative child"),
            vec![PathBuf::from("base.img")]
        );
    }

    #[test]
    fn write_zeroes_writes_zeros_in_chunks_of_at_most_1_mib() {
        const MIB: u64 = 1 << 20;
        let img = Bare {
            writable: true,
            ..bare(4 * MIB)
        };
        img.write_zeroes(7, 2 * MIB + MIB / 2)
            .expect("write_zeroes");
        let writes = img.writes.lock().clone();
        assert_eq!(
            writes,
            vec![
                (7, 1 << 20, true),
                (7 + MIB, 1 << 20, true),
                (7 + 2 * MIB, 1 << 19, true)
            ]
        );
        img.writes.lock().clear();
        img.write_zeroes(100, 0).expect("empty range");
        assert!(img.writes.lock().is_empty());
        let e = img.write_zeroes(4 * MIB - 1, 2).expect_err("past the end");
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
    }

    #[test]
    fn check_parent_identity_compares_the_recorded_ids() {
        let a = Uuid::from_u128(0xA);
        let b = Uuid::from_u128(0xB);
        let parent = |modification| Bare {
            path: PathBuf::from("/images/base.img"),
            modification,
            ..bare(512)
        };
        let child = |parent_uuid, parent_modification| Bare {
            parent_uuid,
            parent_modification,
            ..bare(512)
        };
        // (child's parent UUID, child's parent modification UUID, parent's modification UUID,
        // accepted)
        for (pu, pm, m, ok) in [
            (None, None, Some(a), true),
            (Some(a), None, None, true),
            (Some(a), None, Some(a), true),
            (Some(a), None, Some(b), false),
            (Some(a), Some(b), Some(b), true),
            (Some(a), Some(Uuid::nil()), Some(b), false),
            (
                Some(Uuid::nil()),
                Some(Uuid::nil()),
                Some(Uuid::nil()),
                true,
            ),
        ] {
            let c = child(pu, pm);
            let p = parent(m);
            let r = c.check_parent(&p);
            assert_eq!(r.is_ok(), ok, "{pu:?} {pm:?} {m:?}: {r:?}");
            if let Err(e) = r {
                assert_eq!(e.kind(), ErrorKind::ParentMismatch);
                assert_eq!(
                    e.linkage_mismatch(),
                    Some(&LinkageMismatch {
                        child: PathBuf::from("/images/child.img"),
                        parent: PathBuf::from("/images/base.img"),
                        found: m.expect("a mismatch has a parent id"),
                        expected: pu.expect("a mismatch has a child id"),
                    })
                );
                assert_eq!(
                    e.context().path.as_deref(),
                    Some(Path::new("/images/child.img"))
                );
            }
        }
    }

    #[test]
    fn check_range_accepts_exactly_the_ranges_inside() {
        for (offset, len, size, ok) in [
            (0, 0, 0, true),
            (0, 512, 512, true),
            (512, 0, 512, true),
            (511, 1, 512, true),
            (511, 2, 512, false),
            (513, 0, 512, false),
            (u64::MAX, 1, u64::MAX, false),
            (1, u64::MAX, u64::MAX, false),
            (0, u64::MAX, u64::MAX, true),
        ] {
            let r = check_range(offset, len, size);
            assert_eq!(r.is_ok(), ok, "{offset:#x}+{len:#x} in {size:#x}");
            if let Err(e) = r {
                assert_eq!(e.kind(), ErrorKind::OutOfRange);
            }
        }
    }

    #[test]
    fn debug_output_names_the_image() {
        let img: Box<dyn Image> = Box::new(bare(4096));
        let d = format!("{img:?}");
        assert!(
            d.contains("bare") && d.contains("child.img") && d.contains("4096"),
            "{d}"
        );
    }
}
