//! Creating fixed, dynamic and differencing images ([MS-VHDX] 2.2–2.6; the shape QEMU and
//! openvmm produce).
//!
//! Layout: header section (1 MiB), log (default 1 MiB), metadata region (1 MiB), BAT region,
//! then data blocks (fixed images: every block preallocated and FULLY_PRESENT).
//!
//! Crash safety: the metadata table is first written with the "incomplete file" item, so a
//! crash while creating leaves a file that refuses to open; only after everything else is
//! flushed is the table rewritten without it.
//!
//! This module writes the file with the format modules only (header, region, metadata, BAT,
//! locator) and returns; the backend opens the result.

use uuid::Uuid;
use vd_core::{
    CreateOption, CreateRequest, Error, ImageFlags, OptionKind, Result, parse_create_options,
};
use zerocopy::IntoBytes;

use crate::bat::Layout;
use crate::format::{
    BatEntry, FILE_SIGNATURE, HEADER_OFFSETS, MAX_BAT_SIZE, MAX_BLOCK_SIZE, MAX_LOG_SIZE,
    MAX_VIRTUAL_SIZE, MIB, MIN_BLOCK_SIZE, PayloadState, REGION_TABLE_OFFSETS,
};
use crate::guid::{Guid, REGION_BAT, REGION_METADATA};
use crate::header::ActiveHeader;
use crate::locator::{ParentLocator, encode_utf16};
use crate::metadata::{ItemData, NewDisk, build_metadata_region, system_items};
use crate::region::{Region, RegionTable, build_region_table};

/// Validated creation options.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Virtual size.
    pub size: u64,
    /// Every block preallocated.
    pub fixed: bool,
    /// Block size.
    pub block_size: u32,
    /// Log size.
    pub log_size: u64,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
}

/// The `-o` options `create` takes, with their values and defaults: what `-o help` lists and
/// what [`CreateOptions::from_request`] parses, from the one table.
pub static CREATE_OPTIONS: &[CreateOption] = &[
    CreateOption {
        name: "subformat",
        kind: OptionKind::Choice {
            choices: &["dynamic", "fixed"],
        },
        default: "dynamic",
        help: "dynamic allocates blocks as they are written; fixed preallocates every block",
    },
    CreateOption {
        name: "block_size",
        kind: OptionKind::Size {
            min: MIN_BLOCK_SIZE as u64,
            max: MAX_BLOCK_SIZE as u64,
            multiple_of: 1,
            power_of_two: true,
        },
        default: "32M (2M for a differencing image)",
        help: "the unit of allocation",
    },
    CreateOption {
        name: "log_size",
        kind: OptionKind::Size {
            min: MIB,
            max: MAX_LOG_SIZE,
            multiple_of: MIB,
            power_of_two: false,
        },
        default: "1M",
        help: "the size of the metadata log",
    },
    CreateOption {
        name: "logical_sector_size",
        kind: OptionKind::SizeOneOf {
            sizes: &[512, 4096],
        },
        default: "512 (a differencing image: its parent's)",
        help: "the sector size the guest sees",
    },
    CreateOption {
        name: "physical_sector_size",
        kind: OptionKind::SizeOneOf {
            sizes: &[512, 4096],
        },
        default: "4096 (a differencing image: its parent's)",
        help: "the sector size the guest is told the disk writes in",
    },
];

impl CreateOptions {
    /// Parses `-o` options through [`CREATE_OPTIONS`]: `subformat=dynamic|fixed`,
    /// `block_size`, `log_size`, `logical_sector_size`, `physical_sector_size` (sizes in
    /// qemu's syntax: `1M`, `0x100000`).
    ///
    /// # Errors
    /// `InvalidArgument` for unknown options or values out of range.
    pub fn from_request(req: &CreateRequest<'_>) -> Result<Self> {
        let p = req.params;
        let given = parse_create_options("vhdx", CREATE_OPTIONS, &p.options)?;
        // Every size of these options is at most 256 MiB (the table says so).
        let u32_size = |name: &str, default: u32| {
            given.size(name).map_or(Ok(default), |s| {
                u32::try_from(s)
                    .map_err(|_| Error::invalid_argument(format!("{name}={s}: out of range")))
            })
        };
        let mut o = Self {
            size: p.size,
            fixed: match given.choice("subformat") {
                Some(s) => s == "fixed",
                None => p.image_flags.contains(ImageFlags::FIXED),
            },
            block_size: u32_size("block_size", 32 * 1024 * 1024)?,
            log_size: given.size("log_size").unwrap_or(MIB),
            logical_sector_size: u32_size("logical_sector_size", 512)?,
            physical_sector_size: u32_size("physical_sector_size", 4096)?,
        };
        let block_size_given = given.contains("block_size");
        if let Some((_, parent)) = req.parent {
            if p.options.contains_key("logical_sector_size")
                && o.logical_sector_size != parent.sector_size()
            {
                return Err(Error::invalid_argument(
                    "a differencing image must have its parent's logical sector size",
                ));
            }
            o.logical_sector_size = parent.sector_size();
            if !p.options.contains_key("physical_sector_size") {
                o.physical_sector_size = parent.physical_sector_size();
            }
            if !block_size_given {
                o.block_size = 2 * 1024 * 1024;
            }
            if o.size == 0 {
                o.size = parent.size();
            }
            if o.fixed {
                return Err(Error::invalid_argument(
                    "a differencing image cannot be fixed",
                ));
            }
        }
        if o.size == 0
            || o.size > MAX_VIRTUAL_SIZE
            || !o.size.is_multiple_of(u64::from(o.logical_sector_size))
        {
            return Err(Error::invalid_argument(format!(
                "size {} must be a non-zero multiple of {} up to 64 TiB",
                o.size, o.logical_sector_size
            )));
        }
        Ok(o)
    }
}

/// Where a new file's metadata region, BAT and first block go.
struct FilePlan {
    meta_offset: u64,
    bat_offset: u64,
    bat_len: u64,
    data_offset: u64,
}

impl FilePlan {
    /// The log at 1 MiB, then the metadata region (1 MiB), the BAT (whole MiBs), the blocks.
    ///
    /// # Errors
    /// `InvalidArgument` when the BAT would exceed [`MAX_BAT_SIZE`] (never for a layout of at
    /// most 64 TiB).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "log_size is at most 1 GiB (from_request checks it), entries * 8 below 2^30 \
                  (Layout::from_parts) and bat_len at most MAX_BAT_SIZE (checked here), so every \
                  offset is below 2 GiB + 520 MiB"
    )]
    fn new(o: &CreateOptions, layout: &Layout) -> Result<Self> {
        let bat_len = (layout.entries * 8).div_ceil(MIB) * MIB;
        if bat_len > MAX_BAT_SIZE || o.log_size > MAX_LOG_SIZE {
            return Err(Error::invalid_argument("disk too large"));
        }
        let meta_offset = MIB + o.log_size;
        let bat_offset = meta_offset + MIB;
        Ok(Self {
            meta_offset,
            bat_offset,
            bat_len,
            data_offset: bat_offset + bat_len,
        })
    }
}

/// A fixed image's BAT, every block FULLY_PRESENT from `data_offset` on in order, and the end
/// of the file after the last block.
///
/// # Errors
/// `InvalidArgument` when the BAT does not fit in memory.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "b < data_blocks <= 2^26 and block_size <= 2^28, so b * block_size <= 2^46 (the \
              virtual size cap, Layout::from_parts); data_offset is below 2^32 (FilePlan), and \
              payload indexes are below entries < 2^27, so index * 8 is below 2^30"
)]
fn fixed_bat(layout: &Layout, data_offset: u64) -> Result<(Vec<u8>, u64)> {
    let too_large = || Error::invalid_argument("disk too large");
    let mut bat = vec![0u8; usize::try_from(layout.entries * 8).map_err(|_| too_large())?];
    for b in 0..layout.data_blocks {
        let at = usize::try_from(layout.payload_index(b)? * 8).map_err(|_| too_large())?;
        let entry = BatEntry::payload(
            PayloadState::FullyPresent,
            data_offset + b * layout.block_size,
        );
        bat.get_mut(at..)
            .and_then(|rest| rest.get_mut(..8))
            .ok_or_else(too_large)?
            .copy_from_slice(&entry.raw().to_le_bytes());
    }
    Ok((bat, data_offset + layout.data_blocks * layout.block_size))
}

/// The first header of a new image: fresh write GUIDs, an empty log.
fn header(log_offset: u64, log_length: u32) -> ActiveHeader {
    ActiveHeader {
        slot: 0,
        sequence: 0,
        file_write_guid: Guid::from_uuid(Uuid::new_v4()),
        data_write_guid: Guid::from_uuid(Uuid::new_v4()),
        log_guid: Guid::ZERO,
        log_version: 0,
        version: 1,
        log_length,
        log_offset,
    }
}

/// Writes the image `req` asks for into `req.storage` (the caller opens it afterwards).
///
/// # Errors
/// `InvalidArgument` for bad options; I/O errors.
pub fn create(req: &CreateRequest<'_>) -> Result<()> {
    let o = CreateOptions::from_request(req)?;
    let locator = match req.parent {
        Some((parent_path, parent)) => {
            let linkage = parent.modification_uuid()?;
            let rel = vd_core::relative_windows_path(req.path, parent_path).ok_or_else(|| {
                Error::invalid_argument("cannot express the parent path relative to the child")
            })?;
            let loc = ParentLocator::from_pairs([
                ("parent_linkage", format!("{{{linkage}}}")),
                ("relative_path", rel),
            ]);
            Some(loc.to_bytes()?)
        }
        None => None,
    };
    let has_parent = locator.is_some();
    let s = req.storage.clone();
    let io = |e: std::io::Error| Error::io("cannot create the image", e);
    let log_offset = MIB;
    let layout = Layout::from_parts(o.size, o.block_size, o.logical_sector_size, has_parent)?;
    let FilePlan {
        meta_offset,
        bat_offset,
        bat_len,
        data_offset,
    } = FilePlan::new(&o, &layout)?;

    s.set_len(0).map_err(io)?;
    // File identifier.
    let mut ident = FILE_SIGNATURE.to_le_bytes().to_vec();
    ident.extend_from_slice(&encode_utf16(concat!("vd ", env!("CARGO_PKG_VERSION"))));
    s.write_all_at(0, &ident).map_err(io)?;
    // Metadata first, marked incomplete.
    let meta_len = usize::try_from(MIB).map_err(|_| Error::invalid_argument("1 MiB region"))?;
    let mut items = system_items(&NewDisk {
        block_size: o.block_size,
        fixed: o.fixed,
        virtual_size: o.size,
        // The image UUID asked for (convert keeps the source's), else a new one.
        disk_id: req.params.uuid.unwrap_or_else(Uuid::new_v4),
        logical_sector_size: o.logical_sector_size,
        physical_sector_size: o.physical_sector_size,
        locator,
    });
    items.push(ItemData::incomplete_marker());
    s.write_all_at(meta_offset, &build_metadata_region(&items, meta_len)?)
        .map_err(io)?;
    items.pop();
    // BAT.
    let mut end = data_offset;
    if o.fixed {
        let bat;
        (bat, end) = fixed_bat(&layout, data_offset)?;
        s.write_all_at(bat_offset, &bat).map_err(io)?;
    }
    s.set_len(end).map_err(io)?;
    // Region tables and headers.
    let region = |guid, offset, length| Region {
        guid,
        offset,
        length,
        required: true,
    };
    let rt = build_region_table(&RegionTable {
        bat: region(REGION_BAT, bat_offset, bat_len),
        metadata: region(REGION_METADATA, meta_offset, MIB),
        others: Vec::new(),
        copy: 0,
    })?;
    for off in REGION_TABLE_OFFSETS {
        s.write_all_at(off, &rt).map_err(io)?;
    }
    let log_len =
        u32::try_from(o.log_size).map_err(|_| Error::invalid_argument("log_size: at most 1G"))?;
    let h = header(log_offset, log_len);
    s.write_all_at(HEADER_OFFSETS[0], h.to_wire().as_bytes())
        .map_err(io)?;
    let h2 = ActiveHeader {
        slot: 1,
        sequence: 1,
        ..h
    };
    s.write_all_at(HEADER_OFFSETS[1], h2.to_wire().as_bytes())
        .map_err(io)?;
    s.flush().map_err(io)?;
    // Complete: rewrite the metadata without the incomplete-file marker (the last item, with
    // no data, so every other byte stays the same).
    s.write_all_at(meta_offset, &build_metadata_region(&items, meta_len)?)
        .map_err(io)?;
    s.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn a_fixed_image_parses_with_every_block_present() {
        use crate::bat::{Bat, BlockState};
        use crate::header::read_headers;
        use crate::metadata::read_metadata;
        use crate::region::read_region_table;
        let (s, _) = crate::test_support::create(
            5 * MIB + 512,
            &[
                ("subformat", "fixed"),
                ("block_size", "1M"),
                ("log_size", "2M"),
            ],
        );
        let len = s.len().unwrap();
        let h = read_headers(s.as_ref(), len, true).unwrap();
        assert!(h.damaged.is_empty());
        assert_eq!((h.active.slot, h.active.sequence), (1, 1));
        assert_eq!(
            (h.active.log_offset(), h.active.log_length()),
            (MIB, 2 * MIB)
        );
        let (mut warnings, mut damaged) = (Vec::new(), Vec::new());
        let r = read_region_table(s.as_ref(), len, (MIB, 2 * MIB), &mut warnings, &mut damaged)
            .unwrap();
        assert!(damaged.is_empty(), "{damaged:?}");
        assert_eq!(r.metadata.offset, 3 * MIB);
        assert_eq!(r.bat.offset, 4 * MIB);
        let m = read_metadata(s.as_ref(), r.metadata, true, &mut warnings).unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert!(m.leave_block_allocated && !m.has_parent);
        assert_eq!((m.block_size, m.virtual_size), (1 << 20, 5 * MIB + 512));
        // No incomplete-file marker left: exactly the five system items.
        assert_eq!(m.items.len(), 5);
        let layout = Layout::new(&m).unwrap();
        assert_eq!(layout.data_blocks, 6);
        let bat = Bat::new(s.clone(), layout, r.bat.offset, len, Vec::new());
        let data = r.bat.offset + r.bat.length;
        for b in 0..6 {
            assert_eq!(bat.block(b).unwrap(), BlockState::Full(data + b * MIB));
        }
        assert_eq!(len, data + 6 * MIB);
    }

    #[test]
    fn a_dynamic_image_has_an_empty_bat() {
        let (s, image) = crate::test_support::create(64 * MIB, &[]);
        assert_eq!(image.size(), 64 * MIB);
        // Header section, 1 MiB log, metadata, one BAT MiB, no blocks.
        assert_eq!(s.len().unwrap(), 4 * MIB);
        assert!(
            crate::test_support::read(image.as_ref(), 0, 4096)
                .iter()
                .all(|&b| b == 0)
        );
    }

    #[test]
    fn options_out_of_range_are_refused() {
        for o in [
            ("block_size", "3M"),
            ("block_size", "512M"),
            ("log_size", "1536K"),
            ("logical_sector_size", "1024"),
            ("subformat", "sparse"),
            ("unknown", "1"),
        ] {
            let params = vd_core::CreateParams {
                size: MIB,
                options: [(o.0.to_string(), o.1.to_string())].into(),
                ..vd_core::CreateParams::default()
            };
            let req = CreateRequest {
                path: Path::new("x.vhdx"),
                storage: std::sync::Arc::new(vd_core::MemStorage::new()),
                provider: std::sync::Arc::new(vd_core::MemFileSystem::new()),
                params: &params,
                parent: None,
            };
            assert!(CreateOptions::from_request(&req).is_err(), "{o:?}");
        }
    }
}
