//! Creating VHD images: fixed, dynamic and differencing, with sizes as Windows and Azure read
//! them (the footer's Current Size is the virtual size; the CHS geometry is computed with the
//! specification's algorithm and stored beside it).

use std::time::SystemTime;

use uuid::Uuid;
use vd_core::{
    CreateOption, CreateRequest, Error, ImageFlags, OptionKind, Result, parse_create_options,
    relative_windows_path,
};

use crate::format::{
    self, DiskType, FOOTER_SIZE, HEADER_SIZE, MAX_CREATE_SIZE, MAX_TABLE_ENTRIES, NewFooter,
    NewHeader, NewLocator, SECTOR, UNALLOCATED,
};

const MIB: u64 = 1 << 20;

/// The smallest block size vd creates (Hyper-V's smallest).
pub const MIN_CREATE_BLOCK: u64 = 512 << 10;
/// The block size of new dynamic images: the specification's default, and what QEMU, Virtual
/// PC and Hyper-V write.
pub const DEFAULT_BLOCK: u64 = 2 << 20;
/// Where new dynamic images put their BAT: after the footer copy and the dynamic header.
const TABLE_OFFSET: u64 = (FOOTER_SIZE + HEADER_SIZE) as u64;

/// The `-o` options of `create` and `convert -O vhd`.
pub const CREATE_OPTIONS: &[CreateOption] = &[
    CreateOption {
        name: "subformat",
        kind: OptionKind::Choice {
            choices: &["dynamic", "fixed"],
        },
        default: "dynamic (fixed with azure=on)",
        help: "dynamic allocates blocks as they are written; fixed writes every byte",
    },
    CreateOption {
        name: "block_size",
        kind: OptionKind::Size {
            min: MIN_CREATE_BLOCK,
            max: format::MAX_BLOCK_SIZE as u64,
            multiple_of: 1,
            power_of_two: true,
        },
        default: "2M",
        help: "the unit a dynamic image allocates in",
    },
    CreateOption {
        name: "azure",
        kind: OptionKind::Choice {
            choices: &["on", "off"],
        },
        default: "off",
        help: "a fixed image Azure accepts: the size rounded up to a whole MiB",
    },
];

/// The virtual size Azure accepts for a disk of `size` bytes: `size` rounded up to a whole MiB
/// (a fixed VHD's file is then that plus the 512-byte footer). `None` on overflow.
pub fn azure_size(size: u64) -> Option<u64> {
    size.checked_next_multiple_of(MIB)
}

/// The seconds since 2000-01-01 00:00:00 UTC (the VHD epoch) of `t`, 0 before it.
pub(crate) fn vhd_time(t: SystemTime) -> u32 {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
        .saturating_sub(crate::VHD_EPOCH);
    u32::try_from(secs).unwrap_or(u32::MAX)
}

/// What to create, from the request and its `-o` options.
#[derive(Debug)]
struct Plan {
    disk_type: DiskType,
    size: u64,
    block_size: u32,
}

fn plan(req: &CreateRequest<'_>) -> Result<Plan> {
    let p = req.params;
    let given = parse_create_options("vhd", CREATE_OPTIONS, &p.options)?;
    let azure = given.choice("azure") == Some("on");
    let fixed = match given.choice("subformat") {
        Some(s) => s == "fixed",
        None => azure || p.image_flags.contains(ImageFlags::FIXED),
    };
    if azure && !fixed {
        return Err(Error::invalid_argument(
            "azure=on makes a fixed image (Azure accepts fixed VHDs only): drop subformat=dynamic",
        ));
    }
    let mut size = p.size;
    if let Some((_, parent)) = req.parent {
        if fixed {
            return Err(Error::invalid_argument(
                "a differencing image cannot be fixed (drop subformat=fixed)",
            ));
        }
        if size == 0 {
            size = parent.size();
        }
    }
    if azure {
        size = azure_size(size)
            .ok_or_else(|| Error::invalid_argument(format!("size {size}: too large")))?;
    }
    if !size.is_multiple_of(SECTOR) {
        return Err(Error::invalid_argument(format!(
            "size {size} is not a whole number of 512-byte sectors (VHD stores whole sectors)"
        )));
    }
    if !fixed && size > MAX_CREATE_SIZE {
        return Err(Error::invalid_argument(format!(
            "size {size}: a dynamic VHD holds at most 2040 GiB (use VHDX for larger disks)"
        )));
    }
    let block = given.size("block_size").unwrap_or(DEFAULT_BLOCK);
    if fixed && given.contains("block_size") {
        return Err(Error::invalid_argument(
            "block_size is for dynamic images; a fixed image has no blocks",
        ));
    }
    // At most 256 MiB (the table says so).
    let block_size = u32::try_from(block)
        .map_err(|_| Error::invalid_argument(format!("block_size={block}: out of range")))?;
    let disk_type = if req.parent.is_some() {
        DiskType::Differencing
    } else if fixed {
        DiskType::Fixed
    } else {
        DiskType::Dynamic
    };
    Ok(Plan {
        disk_type,
        size,
        block_size,
    })
}

/// `path` as Windows would write it: `/mnt/<letter>/…` (WSL's mount of a drive) as
/// `<LETTER>:\…`, anything else with its `/` turned into `\`.
pub(crate) fn windows_path(path: &str) -> String {
    let mut chars = path.strip_prefix("/mnt/").unwrap_or("").chars();
    if let (Some(letter), Some('/')) = (chars.next(), chars.next())
        && letter.is_ascii_alphabetic()
    {
        let rest: String = chars.collect();
        return format!(
            "{}:\\{}",
            letter.to_ascii_uppercase(),
            rest.replace('/', "\\")
        );
    }
    path.replace('/', "\\")
}

/// Writes the image `req` asks for into `req.storage` (the caller opens it afterwards). Every
/// check is made before the first write.
///
/// # Errors
/// `InvalidArgument` for bad options or sizes; I/O errors.
pub fn create(req: &CreateRequest<'_>) -> Result<()> {
    let plan = plan(req)?;
    let p = req.params;
    let chs = match p.pchs {
        Some(g) => (
            u16::try_from(g.cylinders)
                .map_err(|_| Error::invalid_argument("more than 65535 cylinders"))?,
            u8::try_from(g.heads).map_err(|_| Error::invalid_argument("more than 255 heads"))?,
            u8::try_from(g.sectors)
                .map_err(|_| Error::invalid_argument("more than 255 sectors per track"))?,
        ),
        None => format::chs_for(plan.size),
    };
    let footer = format::encode_footer(&NewFooter {
        disk_type: plan.disk_type,
        size: plan.size,
        chs,
        unique_id: p.uuid.unwrap_or_else(Uuid::new_v4),
        time_stamp: vhd_time(SystemTime::now()),
    });
    let s = &req.storage;
    let io = |e: std::io::Error| Error::io("cannot create the image", e);
    if plan.disk_type == DiskType::Fixed {
        s.set_len(0).map_err(io)?;
        s.set_len(plan.size).map_err(io)?;
        s.write_all_at(plan.size, &footer).map_err(io)?;
        return s.flush().map_err(io);
    }

    let block = u64::from(plan.block_size);
    let entries = plan.size.div_ceil(block);
    let entries = u32::try_from(entries)
        .ok()
        .filter(|&n| n <= MAX_TABLE_ENTRIES)
        .ok_or_else(|| {
            Error::invalid_argument(format!(
                "{entries} blocks of {block} bytes: more than the {MAX_TABLE_ENTRIES} BAT entries \
                 vd reads (use a larger block_size)"
            ))
        })?;
    // At most 2^24 entries of 4 bytes.
    let bat_len = u64::from(entries)
        .saturating_mul(4)
        .next_multiple_of(SECTOR);
    let mut end = TABLE_OFFSET.saturating_add(bat_len);

    // A differencing image records its parent: the ID, time stamp and name, and two locators
    // (relative, then absolute), each in its own run of sectors after the BAT.
    let mut locators = Vec::new();
    let mut locator_data = Vec::new();
    let parent_name;
    let mut parent_fields = None;
    if let Some((parent_path, parent)) = req.parent {
        if parent.format() != "vhd" {
            return Err(Error::invalid_argument(format!(
                "the parent of a VHD differencing image must be a VHD image ({} is {})",
                parent_path.display(),
                parent.format()
            )));
        }
        let relative = relative_windows_path(req.path, parent_path).ok_or_else(|| {
            Error::invalid_argument("cannot express the parent path relative to the child")
        })?;
        let absolute = req
            .provider
            .canonicalize(parent_path)
            .unwrap_or_else(|_| parent_path.to_path_buf());
        let absolute = windows_path(&absolute.to_string_lossy());
        for (code, path) in [(*b"W2ru", relative), (*b"W2ku", absolute)] {
            let data = format::encode_locator(&path);
            let length = u32::try_from(data.len())
                .ok()
                .filter(|&l| l <= format::MAX_LOCATOR_LEN)
                .ok_or_else(|| Error::invalid_argument("the parent path is too long"))?;
            let space = u64::from(length).next_multiple_of(SECTOR).max(SECTOR);
            locators.push(NewLocator {
                code,
                offset: end,
                length,
                // At most MAX_LOCATOR_LEN rounded to a sector.
                space: u32::try_from(space).unwrap_or(u32::MAX),
            });
            locator_data.push((end, data));
            end = end.saturating_add(space);
        }
        parent_name = parent_path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        parent_fields = Some((
            parent.uuid()?,
            vhd_time(parent.timestamp().unwrap_or(SystemTime::UNIX_EPOCH)),
        ));
    } else {
        parent_name = String::new();
    }
    let header = format::encode_header(&NewHeader {
        table_offset: TABLE_OFFSET,
        max_table_entries: entries,
        block_size: plan.block_size,
        parent: parent_fields.map(|(id, stamp)| (id, stamp, parent_name.as_str(), &locators[..])),
    });

    // The copy at 0 goes last: until then the file is no VHD a probe recognises by its start.
    s.set_len(0).map_err(io)?;
    s.write_all_at(FOOTER_SIZE as u64, &header).map_err(io)?;
    let bat = vec![0xFFu8; usize::try_from(bat_len).map_err(|_| Error::invalid_argument("BAT"))?];
    debug_assert!(bat.chunks(4).all(|c| c == UNALLOCATED.to_be_bytes()));
    s.write_all_at(TABLE_OFFSET, &bat).map_err(io)?;
    for (at, data) in &locator_data {
        s.write_all_at(*at, data).map_err(io)?;
    }
    s.write_all_at(end, &footer).map_err(io)?;
    s.write_all_at(0, &footer).map_err(io)?;
    s.flush().map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn azure_sizes_are_whole_mib() {
        assert_eq!(azure_size(64 << 20), Some(64 << 20));
        assert_eq!(azure_size((64 << 20) + 512), Some(65 << 20));
        assert_eq!(azure_size((10 << 20) - 512), Some(10 << 20));
        assert_eq!(azure_size(u64::MAX), None);
    }

    #[test]
    fn wsl_drive_paths_become_drive_letters() {
        assert_eq!(windows_path("/mnt/c/vms/p.vhd"), r"C:\vms\p.vhd");
        assert_eq!(windows_path("/srv/p.vhd"), r"\srv\p.vhd");
        assert_eq!(windows_path("/mnt/data/p.vhd"), r"\mnt\data\p.vhd");
    }

    #[test]
    fn the_vhd_epoch_is_2000() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(crate::VHD_EPOCH + 42);
        assert_eq!(vhd_time(t), 42);
        assert_eq!(vhd_time(SystemTime::UNIX_EPOCH), 0);
    }
}
