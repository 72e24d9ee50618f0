//! The state of an open VHDX image and the open that builds it.
//!
//! [`Engine`] owns the storage, the header, the region table, the metadata, the BAT, what the
//! open found (log state, warnings, truncated structures) and the write session's state. The
//! modules above it work on it: `read` (mapping and reading), `write` (the header protocol,
//! allocation and the log writer), `meta_edit`, `resize`, `compact`, `check` and `dump`.
//! `image` wraps it as the `vd_core::Image` impl. Nothing here knows the image's path: errors
//! leave without it, and `image` attaches it.

use std::path::Path;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};
use uuid::Uuid;
use vd_core::{Error, ErrorKind, ImageFlags, OpenFlags, RelocationLock, Result, Storage, Warning};

use crate::bat::{Bat, Forbidden, Layout};
use crate::error::{Corruption, DamagedCopy, io_err, warning};
use crate::format::{HEADER_SECTION_SIZE, MAX_BAT_SIZE};
use crate::guid::Guid;
use crate::header::{ActiveHeader, HeaderUpdate, read_headers, read_identifier, update_headers};
use crate::locator::ParentLocator;
use crate::log::{OverlayStorage, ReplayPlan, apply, plan_replay, read_log};
use crate::metadata::{Metadata, read_metadata};
use crate::region::{RegionTable, read_region_table};
use crate::report::{LogReplay, LogState, plural};
use crate::shard::{Sharded, ShardedWriteGuard};
use crate::write_state::WriteState;

/// Where a header's LogGuid field is, from the header's start.
const LOG_GUID_FIELD: u64 = std::mem::offset_of!(crate::format::Header, log_guid) as u64;

/// The state of an open image, which the change, check and dump modules work on.
///
/// # Locks
///
/// Reads hold one lock across payload I/O, for the whole request, so no block moves between
/// mapping it and reading it: `read` (`Image::read_at`) holds its thread's shard of
/// `read_holds`, and `map_file` and `read_file_at` a shared hold of `relocation`, which `Disk`
/// also keeps across its `map_file` and `read_file_at` calls through `Image::hold_layout`. A
/// read copies the [`Layout`] once per request and then, per block, takes its thread's shard
/// of the BAT's view briefly (shared, released before the next one is taken), under which the
/// entry is looked up and checked; the file is read after the mapping of each run is known.
/// The shards (see `shard`) are why reads from many threads scale: a read writes only lock
/// words on cache lines of its own thread's shard, no line that other cores read.
///
/// Lock order, outermost first; a lock further down is never held while one further up is
/// taken:
/// 1. `write_state` (the `WriteState` mutex): held for a whole change (write, write-zeroes,
///    discard, metadata edit, resize, compact, flush, close), so changes are serialised. The
///    layout a change works with is read after it is taken. Readers never take it.
/// 2. `relocation`, then `read_holds`: `relocation` is shared by `Disk` holds, `map_file` and
///    `read_file_at` (recursively, so a `Disk` hold and the engine's own nest); a shard of
///    `read_holds` by `read` (never nested: nothing inside a read reads this image again, and
///    what a read takes under it is further down this list). Compaction and resize take both
///    exclusively ([`Engine::relocate`]: `relocation`, then every shard of `read_holds`) after
///    `write_state` and keep them to the end: no read sees a block, a bitmap or the BAT in a
///    place it has left.
/// 3. `header`, then `meta`, then `regions`: each written only while `write_state` is held,
///    and while no other lock of this list is held; shared guards nest only in this order
///    (`details` reads `meta` under `header`, `item_data` reads `regions` under `meta`).
/// 4. The `Bat`'s own locks (the shards of its view, which hold the layout, the bounds and the
///    BAT page cache, and the sector-bitmap page cache): leaves, each held only inside one
///    `Bat` method call, never while another lock is taken (a change locks every shard of the
///    view, in shard order, and nothing else).
///
/// The write mutex stays held across payload writes: a write into a new block allocates the
/// block, writes its data and only then publishes the BAT entry, and that sequence must not
/// interleave with another writer allocating the same block. An overwrite of an existing block
/// could now run under a `relocation` hold instead; it does not yet (writes are serialised).
pub(crate) struct Engine {
    /// What the image is read through: the file, or the file under a log replayed in memory.
    pub(crate) storage: Arc<dyn Storage>,
    /// The image file itself, for `read_file_at`.
    pub(crate) file: Arc<dyn Storage>,
    /// Whether `storage` is the plain file (no log replayed in memory over it), so data runs
    /// can be reported with their file offsets.
    pub(crate) plain_file: bool,
    pub(crate) flags: OpenFlags,
    /// The creator string of the file identifier.
    pub(crate) creator: String,
    pub(crate) header: RwLock<ActiveHeader>,
    pub(crate) regions: RwLock<RegionTable>,
    pub(crate) meta: RwLock<Metadata>,
    pub(crate) bat: Bat,
    /// What happened to the log at open.
    pub(crate) log: LogState,
    /// The redundant copies (headers, region tables) the open found damaged or disagreeing,
    /// each with its warning: warnings of the open, and errors for `check`.
    pub(crate) damaged: Vec<DamagedCopy>,
    /// The other tolerated deviations found at open.
    pub(crate) warnings: Vec<Warning>,
    /// Structures the file ends before (a tolerant read-only open): warnings of the open, and
    /// errors for `check`.
    pub(crate) truncated: Vec<Warning>,
    pub(crate) write_state: Mutex<WriteState>,
    /// Held shared by `Disk` holds and by `map_file` and `read_file_at` requests, exclusively
    /// by what moves or cuts data in the file (compaction, resize).
    pub(crate) relocation: RelocationLock,
    /// Held shared, in its own thread's shard, by every `read` request; exclusively, every
    /// shard, by what moves or cuts data, after `relocation` ([`Engine::relocate`]).
    pub(crate) read_holds: Sharded<()>,
}

/// The exclusive hold of [`Engine::relocate`]: no read of the image runs while it lives.
pub(crate) struct Relocating<'a> {
    _relocation: RwLockWriteGuard<'a, ()>,
    _reads: ShardedWriteGuard<'a, ()>,
}

impl Engine {
    /// Opens an image: identifier, headers, log, region table, metadata, BAT (the steps and
    /// rules are documented on `VhdxImage::open`).
    ///
    /// `path` names the image in log messages only: the errors returned carry no path.
    pub(crate) fn open(file: Arc<dyn Storage>, flags: OpenFlags, path: &Path) -> Result<Self> {
        let strict = flags.contains(OpenFlags::STRICT);
        let read_only = flags.contains(OpenFlags::READ_ONLY) || file.is_read_only();
        let file_len = file
            .len()
            .map_err(|e| io_err("cannot read the file size", e))?;
        let creator = read_identifier(file.as_ref())?;
        let headers = read_headers(file.as_ref(), file_len, strict)?;
        let mut damaged = headers.damaged;
        let mut warnings = Vec::new();
        let mut header = headers.active;
        let mut log = LogState::new(
            !header.log_guid().is_zero(),
            header.log_offset(),
            header.log_length(),
        );
        // Structures the file ends before, each as the error a refusing open returns.
        let mut truncation: Vec<Error> = Vec::new();
        let mut storage = file.clone();
        let mut plan = None;
        let mut clear_log_guid = false;
        if log.dirty {
            // Where the current header's LogGuid field is.
            let log_guid_at = crate::format::HEADER_OFFSETS
                .get(header.slot)
                .and_then(|h| h.checked_add(LOG_GUID_FIELD))
                .ok_or_else(|| {
                    Error::new(ErrorKind::OutOfRange, "the current header has no slot")
                })?;
            if flags.contains(OpenFlags::REFUSE_DIRTY_LOG) {
                return Err(Corruption::DirtyLogRefused.at("header log guid", log_guid_at));
            }
            let bytes = read_log(file.as_ref(), header.log_offset(), header.log_length())?;
            let p: ReplayPlan =
                plan_replay(&bytes, header.log_offset(), header.log_guid(), file_len)?;
            if p.is_empty() {
                // No intact entry carries the LogGuid: QEMU's crash window between setting the
                // LogGuid and writing the first entry. Nothing to replay, as QEMU reads it; a
                // strict open holds to the letter of [MS-VHDX] 2.3 (a set LogGuid asks for a
                // replay) and refuses.
                if strict {
                    return Err(Corruption::NoActiveLogSequence.at("log", header.log_offset()));
                }
                warnings.push(warning(
                    ErrorKind::Corrupt,
                    "header log guid",
                    log_guid_at,
                    format!(
                        "the header's LogGuid {} is carried by no valid log entry: nothing to \
                         replay (a crash before the first entry landed); {}",
                        header.log_guid(),
                        if read_only {
                            "left as it is (read-only)"
                        } else {
                            "cleared"
                        }
                    ),
                ));
                log.dirty = false;
                clear_log_guid = !read_only;
            } else {
                log.entries = p.entries;
                log.head_sequence = p.head_sequence;
                log.sequence = p.summary.clone();
                // Allowed by 2.3.3 (the file is at least FlushedFileOffset long, checked above):
                // a warning, or an error in strict mode. Blocks past the end stay missing: the BAT
                // checks them against the file's own length, not the replayed one.
                for (c, at) in &p.beyond_file {
                    if strict {
                        return Err(c.clone().at("log entry", *at));
                    }
                    warnings.push(Warning::from_error(&c.clone().at("log entry", *at)));
                }
                // Read through the replayed log in memory until the image is known to be sound.
                storage = Arc::new(
                    OverlayStorage::new(file.clone(), &p)
                        .map_err(|e| io_err("cannot replay the log in memory", e))?,
                );
                log.replay = LogReplay::Memory;
                plan = Some(p);
            }
        }
        let regions = read_region_table(
            storage.as_ref(),
            file_len,
            (header.log_offset(), header.log_length()),
            &mut warnings,
            &mut damaged,
        )?;
        let meta = read_metadata(storage.as_ref(), regions.metadata, strict, &mut warnings)?;
        let layout = Layout::new(&meta)?;
        // Below 2^30: Layout::from_parts caps the entries below 2^27.
        let needed = layout.entries.saturating_mul(8);
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
        let truncated: Vec<Warning> = truncation.iter().map(Warning::from_error).collect();
        if (strict || !read_only)
            && let Some(first) = truncation.into_iter().next()
        {
            log::debug!(
                "{}: refused ({}): {} {} beyond the end of the file",
                path.display(),
                if strict { "strict" } else { "read-write" },
                truncated.len(),
                if truncated.len() == 1 {
                    "structure ends"
                } else {
                    "structures end"
                }
            );
            return Err(first);
        }
        let mut forbidden = vec![
            Forbidden {
                start: 0,
                end: HEADER_SECTION_SIZE,
                what: "header section",
            },
            Forbidden {
                start: regions.bat.offset,
                end: regions.bat.end(),
                what: "BAT region",
            },
            Forbidden {
                start: regions.metadata.offset,
                end: regions.metadata.end(),
                what: "metadata region",
            },
        ];
        if header.log_length() > 0 {
            forbidden.push(Forbidden {
                start: header.log_offset(),
                end: header.log_end(),
                what: "log",
            });
        }
        for r in &regions.others {
            forbidden.push(Forbidden {
                start: r.offset,
                end: r.end(),
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
                warnings.push(warning(
                    ErrorKind::ReadOnly,
                    "log",
                    header.log_offset(),
                    format!(
                        "the log holds {} to replay; replayed in memory (the file is read-only)",
                        plural(plan.entries, "entry", "entries")
                    ),
                ));
            } else {
                // Replaying is the first change: the image must be whole before it.
                bat.verify_all(Err)?;
                verified = true;
                // Log playback is a modification: a new FileWriteGuid goes first.
                header = update_headers(&file, &header, HeaderUpdate::new_file_write_guid())?;
                apply(file.as_ref(), &plan).map_err(|e| io_err("cannot replay the log", e))?;
                header = update_headers(&file, &header, HeaderUpdate::log_guid(Guid::ZERO))?;
                log.replay = LogReplay::File;
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
        if clear_log_guid {
            // Not a replay: only the header changes (a new FileWriteGuid with it).
            header = update_headers(
                &file,
                &header,
                HeaderUpdate {
                    log_guid: Some(Guid::ZERO),
                    ..HeaderUpdate::new_file_write_guid()
                },
            )?;
        }
        for w in damaged
            .iter()
            .map(|d| &d.warning)
            .chain(&warnings)
            .chain(&truncated)
        {
            log::warn!("{}: {w}", path.display());
        }
        let mut write = WriteState::new(write_len)?;
        if verified {
            write.set_verified();
        }
        let plain_file = Arc::ptr_eq(&storage, &file);
        Ok(Self {
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
            damaged,
            warnings,
            truncated,
            write_state: Mutex::new(write),
            relocation: RelocationLock::new(),
            read_holds: Sharded::new(()),
        })
    }

    /// Keeps every read of the image out (waiting for those under way) until the guard is
    /// dropped: `relocation`, then every shard of `read_holds`. For what moves or cuts data in
    /// the file; the caller holds `write_state` and no other lock of the image.
    pub(crate) fn relocate(&self) -> Relocating<'_> {
        let relocation = self.relocation.relocate();
        Relocating {
            _relocation: relocation,
            _reads: self.read_holds.write_all(),
        }
    }

    /// The block layout.
    pub(crate) fn layout(&self) -> Layout {
        self.bat.layout()
    }

    /// The parsed metadata.
    pub(crate) fn metadata(&self) -> RwLockReadGuard<'_, Metadata> {
        self.meta.read()
    }

    /// A copy of the region table.
    pub(crate) fn regions(&self) -> RegionTable {
        self.regions.read().clone()
    }

    /// The length of the file the image is read through.
    pub(crate) fn file_size(&self) -> Result<u64> {
        self.storage
            .len()
            .map_err(|e| io_err("cannot read the file size", e))
    }

    /// `FIXED` when blocks stay allocated, `DIFF` with a parent.
    pub(crate) fn image_flags(&self) -> ImageFlags {
        let mut f = ImageFlags::empty();
        if self.metadata().leave_block_allocated {
            f |= ImageFlags::FIXED;
        }
        if self.metadata().has_parent {
            f |= ImageFlags::DIFF;
        }
        f
    }

    /// A differencing image tracks whole logical sectors in its sector bitmap.
    pub(crate) fn write_granularity(&self) -> u32 {
        let m = self.metadata();
        if m.has_parent {
            m.logical_sector_size
        } else {
            1
        }
    }

    /// The header's DataWriteGuid.
    pub(crate) fn data_write_guid(&self) -> Uuid {
        self.header.read().data_write_guid().to_uuid()
    }

    /// `parent_linkage`: the parent's DataWriteGuid when this child was made.
    pub(crate) fn parent_uuid(&self) -> Result<Uuid> {
        self.metadata()
            .parent_locator
            .as_ref()
            .and_then(|l| l.linkage())
            .ok_or_else(|| Error::not_supported("parent UUIDs of images without a parent"))
    }

    /// `parent_linkage2`, where present and not nil.
    pub(crate) fn parent_modification_uuid(&self) -> Result<Uuid> {
        self.metadata()
            .parent_locator
            .as_ref()
            .and_then(|l| l.linkage2())
            .ok_or_else(|| Error::not_supported("parent_linkage2"))
    }

    /// The first path key of the parent locator: `relative_path`, `volume_path`, then
    /// `absolute_win32_path`.
    pub(crate) fn parent_filename(&self) -> Result<String> {
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

    /// A copy of the parent locator; `NotSupported` (naming `what`) without one.
    pub(crate) fn parent_locator(&self, what: &str) -> Result<ParentLocator> {
        self.metadata()
            .parent_locator
            .clone()
            .ok_or_else(|| Error::not_supported(what))
    }
}

#[cfg(test)]
mod tests {
    use vd_core::{ErrorKind, MemStorage, OpenFlags, Storage};

    use super::*;
    use crate::format::MIB;
    use crate::test_support::create;

    /// A 4 MiB image with 1 MiB blocks, all four written, cut inside its BAT region.
    fn truncated() -> Arc<dyn Storage> {
        let (storage, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(0, &vec![7u8; 4 << 20]).unwrap();
        image.close(false).unwrap();
        let bat = Engine::open(storage.clone(), OpenFlags::READ_ONLY, Path::new("t"))
            .unwrap()
            .regions()
            .bat;
        let mut bytes = vec![0u8; usize::try_from(bat.offset + 4096).unwrap()];
        storage.read_exact_at(0, &mut bytes).unwrap();
        Arc::new(MemStorage::from_bytes(bytes))
    }

    #[test]
    fn a_clean_image_opens_without_warnings() {
        let (storage, image) = create(4 * MIB, &[]);
        image.close(false).unwrap();
        let engine = Engine::open(storage, OpenFlags::READ_ONLY, Path::new("t")).unwrap();
        assert!(
            engine.damaged.is_empty() && engine.warnings.is_empty() && engine.truncated.is_empty()
        );
        assert_eq!(engine.log.replay, LogReplay::None);
        assert!(
            engine.plain_file,
            "no log overlay: data runs carry file offsets"
        );
        assert_eq!(engine.metadata().virtual_size, 4 * MIB);
    }

    #[test]
    fn a_truncated_file_is_kept_apart_from_tolerated_deviations() {
        let storage = truncated();
        let engine = Engine::open(storage.clone(), OpenFlags::READ_ONLY, Path::new("t"))
            .expect("a tolerant read-only open succeeds");
        assert!(engine.warnings.is_empty(), "{:?}", engine.warnings);
        assert_eq!(engine.truncated.len(), 1, "{:?}", engine.truncated);
        let t = &engine.truncated[0];
        assert_eq!(t.kind, ErrorKind::Corrupt);
        assert_eq!(t.field.as_deref(), Some("BAT region"));
        assert_eq!(t.offset, Some(engine.regions().bat.offset));
        for flags in [OpenFlags::READ_ONLY | OpenFlags::STRICT, OpenFlags::empty()] {
            let Err(e) = Engine::open(storage.clone(), flags, Path::new("t")) else {
                panic!("{flags:?}: a truncated image must be refused");
            };
            assert_eq!(e.kind(), ErrorKind::Corrupt, "{flags:?}: {e}");
            assert_eq!(e.context().path, None, "the engine attaches no path");
        }
    }
}
