//! The metadata region ([MS-VHDX] 2.6): the table, the system items, and the parent locator.

use std::collections::BTreeMap;

use uuid::Uuid;
use vd_core::{Result, Storage};
use zerocopy::FromBytes;
use zerocopy::little_endian::{U32, U64};

use crate::error::{Corruption, io_at};
use crate::format::{
    FileParameters, MAX_BLOCK_SIZE, MAX_LOCATOR_ENTRIES, MAX_METADATA_ENTRIES, MAX_METADATA_ITEM,
    MAX_VIRTUAL_SIZE, METADATA_SIGNATURE, METADATA_TABLE_SIZE, MIN_BLOCK_SIZE, MetadataTableEntry,
    MetadataTableHeader, ParentLocatorEntry, ParentLocatorHeader,
};
use crate::guid::{
    Guid, META_FILE_PARAMETERS, META_INCOMPLETE_FILE, META_LOGICAL_SECTOR_SIZE,
    META_PARENT_LOCATOR, META_PHYSICAL_SECTOR_SIZE, META_VIRTUAL_DISK_ID, META_VIRTUAL_DISK_SIZE,
    PARENT_LOCATOR_TYPE_VHDX,
};
use crate::region::Region;

const FLAG_USER: u32 = 1;
const FLAG_VIRTUAL_DISK: u32 = 2;
const FLAG_REQUIRED: u32 = 4;

/// One metadata table entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetadataItem {
    /// Item GUID.
    pub guid: Uuid,
    /// Offset inside the metadata region.
    pub offset: u32,
    /// Length.
    pub length: u32,
    /// IsUser.
    pub is_user: bool,
    /// IsVirtualDisk.
    pub is_virtual_disk: bool,
    /// IsRequired.
    pub is_required: bool,
}

/// The parent locator's key/value pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// Every pair, keys as stored.
    pub entries: BTreeMap<String, String>,
}

impl ParentLocator {
    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// `parent_linkage` as a UUID.
    pub fn linkage(&self) -> Option<Uuid> {
        self.get("parent_linkage").and_then(parse_guid)
    }

    /// `parent_linkage2` as a UUID, where present and not nil.
    pub fn linkage2(&self) -> Option<Uuid> {
        self.get("parent_linkage2")
            .and_then(parse_guid)
            .filter(|u| !u.is_nil())
    }
}

/// Parses a GUID string with or without braces, in any case.
pub fn parse_guid(s: &str) -> Option<Uuid> {
    let t = s.trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    Uuid::parse_str(t).ok()
}

/// Validated disk parameters from the system metadata items.
#[derive(Debug, Clone)]
pub struct Metadata {
    /// Every table entry.
    pub items: Vec<MetadataItem>,
    /// Block size in bytes.
    pub block_size: u32,
    /// LeaveBlockAllocated (fixed disk).
    pub leave_block_allocated: bool,
    /// HasParent (differencing disk).
    pub has_parent: bool,
    /// Virtual disk size in bytes.
    pub virtual_size: u64,
    /// Virtual Disk ID (page 83).
    pub virtual_disk_id: Uuid,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// The parent locator, for differencing disks.
    pub parent_locator: Option<ParentLocator>,
}

struct Reader<'a> {
    storage: &'a dyn Storage,
    region: Region,
}

impl Reader<'_> {
    fn read(&self, item: &MetadataItem) -> Result<Vec<u8>> {
        let off = self.region.offset + u64::from(item.offset);
        let mut buf = vec![0u8; item.length as usize];
        self.storage
            .read_exact_at(off, &mut buf)
            .map_err(|e| io_at("metadata item", off, e))?;
        Ok(buf)
    }
}

fn fixed_len(item: &MetadataItem, name: &'static str, expected: u32, at: u64) -> Result<()> {
    if item.length != expected {
        return Err(Corruption::MetadataItemLength {
            name,
            length: item.length,
            expected,
        }
        .at(format!("{name} metadata item"), at));
    }
    Ok(())
}

/// Checks a system item's IsRequired and IsVirtualDisk flags (2.6.2). Early Hyper-V images lack
/// IsRequired on the physical sector size item; that, and any other deviation when not
/// `strict`, is a warning.
fn check_flags(
    item: &MetadataItem,
    name: &'static str,
    virtual_disk: bool,
    at: u64,
    strict: bool,
    warnings: &mut Vec<String>,
) -> Result<()> {
    if item.is_required && item.is_virtual_disk == virtual_disk {
        return Ok(());
    }
    let c = Corruption::MetadataFlags {
        name,
        required: item.is_required,
        virtual_disk: item.is_virtual_disk,
        expected: if virtual_disk {
            "IsRequired and IsVirtualDisk"
        } else {
            "IsRequired only"
        },
    };
    if strict {
        return Err(c.at(format!("{name} metadata item"), at));
    }
    warnings.push(c.to_string());
    Ok(())
}

/// Reads and validates the metadata table and the system items.
///
/// # Errors
/// `Corrupt` for every rule of 2.6; `Unsupported` for an unknown required item.
pub fn read_metadata(
    storage: &dyn Storage,
    region: Region,
    strict: bool,
    warnings: &mut Vec<String>,
) -> Result<Metadata> {
    let table_off = region.offset;
    let mut buf = vec![0u8; METADATA_TABLE_SIZE];
    storage
        .read_exact_at(table_off, &mut buf)
        .map_err(|e| io_at("metadata table", table_off, e))?;
    let (hdr, rest) = MetadataTableHeader::read_from_prefix(&buf)
        .map_err(|_| Corruption::MetadataSignature { found: 0 }.at("metadata table", table_off))?;
    if hdr.signature.get() != METADATA_SIGNATURE {
        return Err(Corruption::MetadataSignature {
            found: hdr.signature.get(),
        }
        .at("metadata table signature", table_off));
    }
    let count = hdr.entry_count.get();
    if count > MAX_METADATA_ENTRIES {
        return Err(Corruption::MetadataEntryCount { count }.at("metadata table", table_off));
    }
    let (entries, _) = <[MetadataTableEntry]>::ref_from_prefix_with_elems(rest, usize::from(count))
        .map_err(|_| Corruption::MetadataEntryCount { count }.at("metadata table", table_off))?;
    let mut items: Vec<MetadataItem> = Vec::with_capacity(entries.len());
    let mut ranges = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let entry_off = table_off + 32 + 32 * i as u64;
        let flags = e.flags.get();
        let item = MetadataItem {
            guid: e.item_id.to_uuid(),
            offset: e.offset.get(),
            length: e.length.get(),
            is_user: flags & FLAG_USER != 0,
            is_virtual_disk: flags & FLAG_VIRTUAL_DISK != 0,
            is_required: flags & FLAG_REQUIRED != 0,
        };
        let bad = |reason| {
            Corruption::MetadataItemRange {
                guid: item.guid,
                offset: item.offset,
                length: item.length,
                reason,
            }
            .at(format!("metadata table entry {i}"), entry_off)
        };
        if item.length > MAX_METADATA_ITEM {
            return Err(bad("longer than 1 MiB"));
        }
        if item.length > 0 {
            if (item.offset as usize) < METADATA_TABLE_SIZE {
                return Err(bad("inside the metadata table"));
            }
            if u64::from(item.offset) + u64::from(item.length) > region.length {
                return Err(bad("beyond the end of the metadata region"));
            }
            ranges.push((item.offset, item.length, item.guid));
        } else if item.offset != 0 {
            return Err(bad("empty item with a non-zero offset"));
        }
        if items
            .iter()
            .any(|o| o.guid == item.guid && o.is_user == item.is_user)
        {
            return Err(Corruption::MetadataDuplicate { guid: item.guid }
                .at(format!("metadata table entry {i}"), entry_off));
        }
        items.push(item);
    }
    ranges.sort_by_key(|r| r.0);
    for w in ranges.windows(2) {
        if let [a, b] = w
            && u64::from(a.0) + u64::from(a.1) > u64::from(b.0)
        {
            return Err(Corruption::MetadataOverlap {
                first: a.2,
                second: b.2,
            }
            .at("metadata table", table_off));
        }
    }

    let reader = Reader { storage, region };
    let known = [
        META_FILE_PARAMETERS,
        META_VIRTUAL_DISK_SIZE,
        META_VIRTUAL_DISK_ID,
        META_LOGICAL_SECTOR_SIZE,
        META_PHYSICAL_SECTOR_SIZE,
        META_PARENT_LOCATOR,
    ];
    for (i, item) in items.iter().enumerate() {
        if item.is_user || known.contains(&item.guid) {
            continue;
        }
        let entry_off = table_off + 32 + 32 * i as u64;
        if item.guid == META_INCOMPLETE_FILE {
            return Err(Corruption::IncompleteFile.at("metadata table", entry_off));
        }
        if item.is_required {
            return Err(Corruption::UnknownRequiredMetadata { guid: item.guid }
                .at(format!("metadata table entry {i}"), entry_off));
        }
        warnings.push(format!(
            "ignoring unknown optional metadata item {}",
            item.guid
        ));
    }
    let find = |guid: Uuid, name: &'static str| {
        items
            .iter()
            .find(|i| i.guid == guid && !i.is_user)
            .copied()
            .ok_or_else(|| Corruption::MissingMetadata { name }.at("metadata table", table_off))
    };
    let at = |item: &MetadataItem| region.offset + u64::from(item.offset);

    let fp_item = find(META_FILE_PARAMETERS, "file parameters")?;
    fixed_len(&fp_item, "file parameters", 8, at(&fp_item))?;
    check_flags(
        &fp_item,
        "file parameters",
        false,
        at(&fp_item),
        strict,
        warnings,
    )?;
    let fp = FileParameters::read_from_bytes(&reader.read(&fp_item)?).map_err(|_| {
        Corruption::MissingMetadata {
            name: "file parameters",
        }
        .at("file parameters", at(&fp_item))
    })?;
    let block_size = fp.block_size.get();
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Corruption::BlockSize { found: block_size }
            .at("file parameters block size", at(&fp_item)));
    }
    let flags = fp.flags.get();
    let leave_block_allocated = flags & 1 != 0;
    let has_parent = flags & 2 != 0;

    let mut sector = |guid, name: &'static str, which: &'static str| -> Result<u32> {
        let item = find(guid, name)?;
        fixed_len(&item, name, 4, at(&item))?;
        check_flags(&item, name, true, at(&item), strict, warnings)?;
        let v = U32::read_from_bytes(&reader.read(&item)?)
            .map(|v| v.get())
            .unwrap_or(0);
        if v != 512 && v != 4096 {
            return Err(Corruption::SectorSize { which, found: v }
                .at(format!("{name} metadata item"), at(&item)));
        }
        Ok(v)
    };
    let logical_sector_size = sector(META_LOGICAL_SECTOR_SIZE, "logical sector size", "logical")?;
    let physical_sector_size = sector(
        META_PHYSICAL_SECTOR_SIZE,
        "physical sector size",
        "physical",
    )?;

    let vs_item = find(META_VIRTUAL_DISK_SIZE, "virtual disk size")?;
    fixed_len(&vs_item, "virtual disk size", 8, at(&vs_item))?;
    check_flags(
        &vs_item,
        "virtual disk size",
        true,
        at(&vs_item),
        strict,
        warnings,
    )?;
    let virtual_size = U64::read_from_bytes(&reader.read(&vs_item)?)
        .map(|v| v.get())
        .unwrap_or(0);
    let vs_bad = |reason| {
        Corruption::VirtualSize {
            found: virtual_size,
            reason,
        }
        .at("virtual disk size metadata item", at(&vs_item))
    };
    if virtual_size == 0 {
        return Err(vs_bad("zero"));
    }
    if virtual_size > MAX_VIRTUAL_SIZE {
        return Err(vs_bad("larger than 64 TiB"));
    }
    if virtual_size % u64::from(logical_sector_size) != 0 {
        return Err(vs_bad("not a multiple of the logical sector size"));
    }

    let id_item = find(META_VIRTUAL_DISK_ID, "virtual disk id")?;
    fixed_len(&id_item, "virtual disk id", 16, at(&id_item))?;
    check_flags(
        &id_item,
        "virtual disk id",
        true,
        at(&id_item),
        strict,
        warnings,
    )?;
    let virtual_disk_id = Guid::read_from_bytes(&reader.read(&id_item)?)
        .map(Guid::to_uuid)
        .unwrap_or_default();

    let parent_locator = if has_parent {
        let item = find(META_PARENT_LOCATOR, "parent locator")?;
        check_flags(&item, "parent locator", false, at(&item), strict, warnings)?;
        Some(parse_locator(&reader.read(&item)?).map_err(|c| c.at("parent locator", at(&item)))?)
    } else {
        None
    };

    Ok(Metadata {
        items,
        block_size,
        leave_block_allocated,
        has_parent,
        virtual_size,
        virtual_disk_id,
        logical_sector_size,
        physical_sector_size,
        parent_locator,
    })
}

fn utf16(buf: &[u8], off: u32, len: u16, what: &str) -> std::result::Result<String, Corruption> {
    let bad = |reason: &str| Corruption::ParentLocator {
        reason: format!("{what} at {off:#x} (length {len}): {reason}"),
    };
    if len == 0 || !len.is_multiple_of(2) {
        return Err(bad("length is zero or odd"));
    }
    let start = off as usize;
    let bytes = buf
        .get(start..start + usize::from(len))
        .ok_or_else(|| bad("outside the item"))?;
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes(c.try_into().unwrap_or([0, 0])))
        .collect();
    if units.contains(&0) {
        return Err(bad("contains a NUL"));
    }
    String::from_utf16(&units).map_err(|_| bad("not valid UTF-16"))
}

/// Parses a parent locator item (2.6.2.6).
///
/// # Errors
/// [`Corruption::ParentLocator`] naming what is wrong.
pub fn parse_locator(buf: &[u8]) -> std::result::Result<ParentLocator, Corruption> {
    let bad = |reason: String| Corruption::ParentLocator { reason };
    let (hdr, rest) = ParentLocatorHeader::read_from_prefix(buf)
        .map_err(|_| bad("shorter than its header".into()))?;
    if hdr.locator_type.to_uuid() != PARENT_LOCATOR_TYPE_VHDX {
        return Err(bad(format!("unknown locator type {}", hdr.locator_type)));
    }
    let count = hdr.key_value_count.get();
    if count > MAX_LOCATOR_ENTRIES {
        return Err(bad(format!(
            "{count} entries, at most {MAX_LOCATOR_ENTRIES} are accepted"
        )));
    }
    let (entries, _) = <[ParentLocatorEntry]>::ref_from_prefix_with_elems(rest, usize::from(count))
        .map_err(|_| bad(format!("{count} entries do not fit in the item")))?;
    let mut loc = ParentLocator::default();
    for e in entries {
        let key = utf16(buf, e.key_offset.get(), e.key_length.get(), "key")?;
        let value = utf16(buf, e.value_offset.get(), e.value_length.get(), "value")?;
        if loc.entries.insert(key.clone(), value).is_some() {
            return Err(bad(format!("key {key:?} appears twice")));
        }
    }
    let linkage = loc
        .get("parent_linkage")
        .ok_or_else(|| bad("parent_linkage is missing".into()))?;
    if parse_guid(linkage).is_none() {
        return Err(bad(format!("parent_linkage {linkage:?} is not a GUID")));
    }
    if !["relative_path", "volume_path", "absolute_win32_path"]
        .iter()
        .any(|k| loc.get(k).is_some())
    {
        return Err(bad(
            "no parent path (relative_path, volume_path, absolute_win32_path)".into(),
        ));
    }
    Ok(loc)
}
