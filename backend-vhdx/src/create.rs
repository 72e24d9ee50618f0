//! Creating fixed, dynamic and differencing images ([MS-VHDX] 2.2–2.6; the shape QEMU and
//! openvmm produce).
//!
//! Layout: header section (1 MiB), log (default 1 MiB), metadata region (1 MiB), BAT region,
//! then data blocks (fixed images: every block preallocated and FULLY_PRESENT).
//!
//! Crash safety: the metadata table is first written with the "incomplete file" item, so a
//! crash while creating leaves a file that refuses to open; only after everything else is
//! flushed is the table rewritten without it.

use std::path::{Component, Path};

use uuid::Uuid;
use vd_core::{CreateRequest, Error, ImageFlags, OpenFlags, OpenRequest, Result};
use zerocopy::IntoBytes;
use zerocopy::little_endian::{U16, U32, U64};

use crate::checksum::crc32c_with_zero_field;
use crate::format::{
    FILE_SIGNATURE, HEADER_OFFSETS, HEADER_SIGNATURE, Header, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE,
    METADATA_SIGNATURE, MIB, MIN_BLOCK_SIZE, MetadataTableEntry, MetadataTableHeader,
    ParentLocatorEntry, ParentLocatorHeader, REGION_SIGNATURE, REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE, RegionTableEntry, RegionTableHeader, bat_state,
};
use crate::guid::{
    Guid, META_FILE_PARAMETERS, META_INCOMPLETE_FILE, META_LOGICAL_SECTOR_SIZE,
    META_PARENT_LOCATOR, META_PHYSICAL_SECTOR_SIZE, META_VIRTUAL_DISK_ID, META_VIRTUAL_DISK_SIZE,
    PARENT_LOCATOR_TYPE_VHDX, REGION_BAT, REGION_METADATA,
};
use crate::image::VhdxImage;

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

fn parse_size(key: &str, v: &str) -> Result<u64> {
    vd_core::parse_size(v)
        .ok_or_else(|| Error::invalid_argument(format!("{key}={v} is not a size")))
}

impl CreateOptions {
    /// Parses `-o` options: `subformat=dynamic|fixed`, `block_size`, `log_size`,
    /// `logical_sector_size`, `physical_sector_size` (sizes take K/M/G suffixes).
    ///
    /// # Errors
    /// `InvalidArgument` for unknown options or values out of range.
    pub fn from_request(req: &CreateRequest<'_>) -> Result<Self> {
        let p = req.params;
        let mut o = Self {
            size: p.size,
            fixed: p.image_flags.contains(ImageFlags::FIXED),
            block_size: 32 * 1024 * 1024,
            log_size: MIB,
            logical_sector_size: 512,
            physical_sector_size: 4096,
        };
        let mut block_size_given = false;
        for (k, v) in &p.options {
            match k.as_str() {
                "subformat" => match v.as_str() {
                    "dynamic" => o.fixed = false,
                    "fixed" => o.fixed = true,
                    _ => {
                        return Err(Error::invalid_argument(format!(
                            "subformat={v}: use dynamic or fixed"
                        )));
                    }
                },
                "block_size" => {
                    let b = parse_size(k, v)?;
                    o.block_size = u32::try_from(b)
                        .ok()
                        .filter(|b| {
                            b.is_power_of_two() && (MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(b)
                        })
                        .ok_or_else(|| {
                            Error::invalid_argument(format!(
                                "block_size={v}: a power of two from 1M to 256M"
                            ))
                        })?;
                    block_size_given = true;
                }
                "log_size" => {
                    o.log_size = parse_size(k, v)?;
                    if o.log_size < MIB
                        || !o.log_size.is_multiple_of(MIB)
                        || o.log_size > 1024 * MIB
                    {
                        return Err(Error::invalid_argument(format!(
                            "log_size={v}: a multiple of 1M from 1M to 1G"
                        )));
                    }
                }
                "logical_sector_size" | "physical_sector_size" => {
                    let s = parse_size(k, v)?;
                    let s = u32::try_from(s)
                        .ok()
                        .filter(|s| *s == 512 || *s == 4096)
                        .ok_or_else(|| Error::invalid_argument(format!("{k}={v}: 512 or 4096")))?;
                    if k == "logical_sector_size" {
                        o.logical_sector_size = s;
                    } else {
                        o.physical_sector_size = s;
                    }
                }
                _ => {
                    return Err(Error::invalid_argument(format!(
                        "vhdx does not support the option {k}={v} (supported: subformat, block_size, log_size, logical_sector_size, physical_sector_size)"
                    )));
                }
            }
        }
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

/// `target` relative to the folder of `from`, Windows-style (`.\\name`, `..\\dir\\name`).
fn relative_windows_path(from: &Path, target: &Path) -> Option<String> {
    let base: Vec<Component<'_>> = from.parent()?.components().collect();
    let to: Vec<Component<'_>> = target.components().collect();
    let common = base.iter().zip(&to).take_while(|(a, b)| a == b).count();
    let mut parts: Vec<String> = Vec::new();
    if common == base.len() {
        parts.push(".".into());
    }
    for _ in common..base.len() {
        parts.push("..".into());
    }
    for c in to.get(common..)? {
        parts.push(c.as_os_str().to_str()?.to_string());
    }
    Some(parts.join("\\"))
}

fn utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

pub(crate) fn parent_locator(pairs: &[(&str, String)]) -> Vec<u8> {
    let header_len = 20 + 12 * pairs.len();
    let mut strings = Vec::new();
    let mut entries = Vec::new();
    for (k, v) in pairs {
        let (kb, vb) = (utf16(k), utf16(v));
        let ko = header_len + strings.len();
        strings.extend_from_slice(&kb);
        let vo = header_len + strings.len();
        strings.extend_from_slice(&vb);
        entries.push(ParentLocatorEntry {
            key_offset: U32::new(u32::try_from(ko).unwrap_or(0)),
            value_offset: U32::new(u32::try_from(vo).unwrap_or(0)),
            key_length: U16::new(u16::try_from(kb.len()).unwrap_or(0)),
            value_length: U16::new(u16::try_from(vb.len()).unwrap_or(0)),
        });
    }
    let mut out = ParentLocatorHeader {
        locator_type: Guid::from_uuid(PARENT_LOCATOR_TYPE_VHDX),
        reserved: U16::new(0),
        key_value_count: U16::new(u16::try_from(pairs.len()).unwrap_or(0)),
    }
    .as_bytes()
    .to_vec();
    for e in &entries {
        out.extend_from_slice(e.as_bytes());
    }
    out.extend_from_slice(&strings);
    out
}

/// Builds the 64 KiB metadata table and the items area for these options.
fn metadata_region(o: &CreateOptions, locator: Option<&[u8]>, incomplete: bool) -> Vec<u8> {
    let mut region = vec![0u8; usize::try_from(MIB).unwrap_or(0)];
    let mut items: Vec<(Uuid, Vec<u8>, u32)> = Vec::new();
    const REQ: u32 = 4;
    const VD: u32 = 2;
    let mut fp_flags = 0u32;
    if o.fixed {
        fp_flags |= 1;
    }
    if locator.is_some() {
        fp_flags |= 2;
    }
    let mut fp = o.block_size.to_le_bytes().to_vec();
    fp.extend_from_slice(&fp_flags.to_le_bytes());
    items.push((META_FILE_PARAMETERS, fp, REQ));
    items.push((
        META_VIRTUAL_DISK_SIZE,
        o.size.to_le_bytes().to_vec(),
        REQ | VD,
    ));
    items.push((
        META_VIRTUAL_DISK_ID,
        Guid::from_uuid(Uuid::new_v4()).0.to_vec(),
        REQ | VD,
    ));
    items.push((
        META_LOGICAL_SECTOR_SIZE,
        o.logical_sector_size.to_le_bytes().to_vec(),
        REQ | VD,
    ));
    items.push((
        META_PHYSICAL_SECTOR_SIZE,
        o.physical_sector_size.to_le_bytes().to_vec(),
        REQ | VD,
    ));
    if let Some(loc) = locator {
        items.push((META_PARENT_LOCATOR, loc.to_vec(), REQ));
    }
    if incomplete {
        items.push((META_INCOMPLETE_FILE, Vec::new(), REQ));
    }
    let header = MetadataTableHeader {
        signature: U64::new(METADATA_SIGNATURE),
        reserved: U16::new(0),
        entry_count: U16::new(u16::try_from(items.len()).unwrap_or(0)),
        reserved2: [0; 20],
    };
    let put = |region: &mut Vec<u8>, at: usize, b: &[u8]| {
        if let Some(d) = region.get_mut(at..at + b.len()) {
            d.copy_from_slice(b);
        }
    };
    put(&mut region, 0, header.as_bytes());
    let mut data_off = 64 * 1024usize;
    for (i, (guid, data, flags)) in items.iter().enumerate() {
        let entry = MetadataTableEntry {
            item_id: Guid::from_uuid(*guid),
            offset: U32::new(if data.is_empty() {
                0
            } else {
                u32::try_from(data_off).unwrap_or(0)
            }),
            length: U32::new(u32::try_from(data.len()).unwrap_or(0)),
            flags: U32::new(*flags),
            reserved: U32::new(0),
        };
        put(&mut region, 32 + 32 * i, entry.as_bytes());
        put(&mut region, data_off, data);
        data_off += data.len().div_ceil(8) * 8;
    }
    region
}

fn header(seq: u64, log_offset: u64, log_len: u64) -> Header {
    let mut h = Header {
        signature: U32::new(HEADER_SIGNATURE),
        checksum: U32::new(0),
        sequence_number: U64::new(seq),
        file_write_guid: Guid::from_uuid(Uuid::new_v4()),
        data_write_guid: Guid::from_uuid(Uuid::new_v4()),
        log_guid: Guid::ZERO,
        log_version: U16::new(0),
        version: U16::new(1),
        log_length: U32::new(u32::try_from(log_len).unwrap_or(0)),
        log_offset: U64::new(log_offset),
        reserved: [0; 4016],
    };
    let sum = crc32c_with_zero_field(h.as_bytes(), 4);
    h.checksum.set(sum);
    h
}

fn region_table(bat: (u64, u64), meta: (u64, u64)) -> Vec<u8> {
    let mut t = vec![0u8; REGION_TABLE_SIZE];
    let h = RegionTableHeader {
        signature: U32::new(REGION_SIGNATURE),
        checksum: U32::new(0),
        entry_count: U32::new(2),
        reserved: U32::new(0),
    };
    let e = |guid, (off, len): (u64, u64)| RegionTableEntry {
        guid: Guid::from_uuid(guid),
        file_offset: U64::new(off),
        length: U32::new(u32::try_from(len).unwrap_or(0)),
        flags: U32::new(1),
    };
    let mut bytes = h.as_bytes().to_vec();
    bytes.extend_from_slice(e(REGION_BAT, bat).as_bytes());
    bytes.extend_from_slice(e(REGION_METADATA, meta).as_bytes());
    if let Some(d) = t.get_mut(..bytes.len()) {
        d.copy_from_slice(&bytes);
    }
    let sum = crc32c_with_zero_field(&t, 4);
    if let Some(d) = t.get_mut(4..8) {
        d.copy_from_slice(&sum.to_le_bytes());
    }
    t
}

/// Creates an image as `req` asks and opens it read-write.
///
/// # Errors
/// `InvalidArgument` for bad options; I/O errors.
pub fn create(req: CreateRequest<'_>) -> Result<VhdxImage> {
    let o = CreateOptions::from_request(&req)?;
    let locator = match req.parent {
        Some((parent_path, parent)) => {
            let linkage = parent.modification_uuid()?;
            let mut pairs = vec![("parent_linkage", format!("{{{linkage}}}"))];
            let rel = relative_windows_path(req.path, parent_path).ok_or_else(|| {
                Error::invalid_argument("cannot express the parent path relative to the child")
            })?;
            pairs.push(("relative_path", rel));
            Some(parent_locator(&pairs))
        }
        None => None,
    };
    let s = req.storage.clone();
    let io = |e: std::io::Error| Error::io("cannot create the image", e);
    let log_offset = MIB;
    let meta_offset = log_offset + o.log_size;
    let bs = u64::from(o.block_size);
    let chunk_ratio = ((1u64 << 23) * u64::from(o.logical_sector_size) / bs).max(1);
    let data_blocks = o.size.div_ceil(bs);
    let entries = if locator.is_some() {
        data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
    } else {
        data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
    };
    let bat_offset = meta_offset + MIB;
    let bat_len = (entries * 8).div_ceil(MIB) * MIB;
    let data_offset = bat_offset + bat_len;

    s.set_len(0).map_err(io)?;
    // File identifier.
    let mut ident = FILE_SIGNATURE.to_le_bytes().to_vec();
    ident.extend_from_slice(&utf16(concat!("vd ", env!("CARGO_PKG_VERSION"))));
    s.write_all_at(0, &ident).map_err(io)?;
    // Metadata first, marked incomplete.
    s.write_all_at(meta_offset, &metadata_region(&o, locator.as_deref(), true))
        .map_err(io)?;
    // BAT.
    let mut end = data_offset;
    if o.fixed {
        let mut bat = vec![
            0u8;
            usize::try_from(entries * 8)
                .map_err(|_| Error::invalid_argument("disk too large"))?
        ];
        for b in 0..data_blocks {
            let idx = usize::try_from(b + b / chunk_ratio).unwrap_or(usize::MAX);
            let v = ((data_offset + b * bs) / MIB) << 20 | u64::from(bat_state::FULLY_PRESENT);
            if let Some(d) = bat.get_mut(idx * 8..idx * 8 + 8) {
                d.copy_from_slice(&v.to_le_bytes());
            }
        }
        s.write_all_at(bat_offset, &bat).map_err(io)?;
        end = data_offset + data_blocks * bs;
    }
    s.set_len(end.max(bat_offset + bat_len)).map_err(io)?;
    // Region tables and headers.
    let rt = region_table((bat_offset, bat_len), (meta_offset, MIB));
    for off in REGION_TABLE_OFFSETS {
        s.write_all_at(off, &rt).map_err(io)?;
    }
    let h = header(0, log_offset, o.log_size);
    s.write_all_at(HEADER_OFFSETS[0], h.as_bytes())
        .map_err(io)?;
    let mut h2 = h;
    h2.sequence_number.set(1);
    h2.checksum.set(0);
    let sum = crc32c_with_zero_field(h2.as_bytes(), 4);
    h2.checksum.set(sum);
    s.write_all_at(HEADER_OFFSETS[1], h2.as_bytes())
        .map_err(io)?;
    s.flush().map_err(io)?;
    // Complete: rewrite the metadata without the incomplete-file marker. The virtual disk id
    // must stay the same, so only the table entry count changes (the marker is the last entry).
    let mut table = vec![0u8; 64 * 1024];
    s.read_exact_at(meta_offset, &mut table).map_err(io)?;
    let count = u16::from_le_bytes([
        table.get(10).copied().unwrap_or(0),
        table.get(11).copied().unwrap_or(0),
    ]);
    let last = 32 + 32 * usize::from(count.saturating_sub(1));
    if let Some(d) = table.get_mut(last..last + 32) {
        d.fill(0);
    }
    if let Some(d) = table.get_mut(10..12) {
        d.copy_from_slice(&count.saturating_sub(1).to_le_bytes());
    }
    s.write_all_at(meta_offset, &table).map_err(io)?;
    s.flush().map_err(io)?;
    VhdxImage::open(OpenRequest {
        path: req.path,
        storage: req.storage,
        provider: req.provider,
        flags: OpenFlags::empty(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn relative_paths_are_windows_style() {
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(
            relative_windows_path(&p("/a/b/c.vhdx"), &p("/a/b/p.vhdx")).unwrap(),
            r".\p.vhdx"
        );
        assert_eq!(
            relative_windows_path(&p("/a/b/c.vhdx"), &p("/a/p.vhdx")).unwrap(),
            r"..\p.vhdx"
        );
        assert_eq!(
            relative_windows_path(&p("/a/b/c.vhdx"), &p("/a/x/p.vhdx")).unwrap(),
            r"..\x\p.vhdx"
        );
    }
}
