//! The metadata region ([MS-VHDX] 2.6): parsing the table and the system items, and building a
//! region from a list of items (what `create` and the metadata edits write). The known system
//! items, their lengths and flags are listed once, in [`SYSTEM_ITEMS`]; the parent locator
//! item's contents are `locator`'s.

use uuid::Uuid;
use vd_core::{Error, ErrorKind, Result, Storage, Warning};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::{Corruption, fit, io_at, overflow, warning};
use crate::format::{
    FileParameterFlags, FileParameters, MAX_BLOCK_SIZE, MAX_METADATA_ENTRIES, MAX_METADATA_ITEM,
    MAX_VIRTUAL_SIZE, METADATA_SIGNATURE, METADATA_TABLE_SIZE, MIN_BLOCK_SIZE, MetadataFlags,
    MetadataTableEntry, MetadataTableHeader,
};
use crate::guid::{
    Guid, META_FILE_PARAMETERS, META_INCOMPLETE_FILE, META_LOGICAL_SECTOR_SIZE,
    META_PARENT_LOCATOR, META_PHYSICAL_SECTOR_SIZE, META_VIRTUAL_DISK_ID, META_VIRTUAL_DISK_SIZE,
};
use crate::locator::{ParentLocator, parse_locator};
use crate::region::Region;

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

/// A system item vd knows ([MS-VHDX] 2.6.2): its GUID, name, length (`None`: variable) and the
/// flags it must carry besides IsRequired.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KnownItem {
    /// Item GUID.
    pub guid: Uuid,
    /// Name used in errors.
    pub name: &'static str,
    /// Fixed length in bytes, if any.
    pub length: Option<u32>,
    /// Whether IsVirtualDisk must be set.
    pub virtual_disk: bool,
}

/// The file parameters item (2.6.2).
pub(crate) const FILE_PARAMETERS: KnownItem = KnownItem {
    guid: META_FILE_PARAMETERS,
    name: "file parameters",
    length: Some(8),
    virtual_disk: false,
};
/// The virtual disk size item (2.6.2).
pub(crate) const VIRTUAL_DISK_SIZE: KnownItem = KnownItem {
    guid: META_VIRTUAL_DISK_SIZE,
    name: "virtual disk size",
    length: Some(8),
    virtual_disk: true,
};
/// The virtual disk id item (2.6.2).
pub(crate) const VIRTUAL_DISK_ID: KnownItem = KnownItem {
    guid: META_VIRTUAL_DISK_ID,
    name: "virtual disk id",
    length: Some(16),
    virtual_disk: true,
};
/// The logical sector size item (2.6.2).
pub(crate) const LOGICAL_SECTOR_SIZE: KnownItem = KnownItem {
    guid: META_LOGICAL_SECTOR_SIZE,
    name: "logical sector size",
    length: Some(4),
    virtual_disk: true,
};
/// The physical sector size item (2.6.2).
pub(crate) const PHYSICAL_SECTOR_SIZE: KnownItem = KnownItem {
    guid: META_PHYSICAL_SECTOR_SIZE,
    name: "physical sector size",
    length: Some(4),
    virtual_disk: true,
};
/// The parent locator item (2.6.2).
pub(crate) const PARENT_LOCATOR: KnownItem = KnownItem {
    guid: META_PARENT_LOCATOR,
    name: "parent locator",
    length: None,
    virtual_disk: false,
};
/// Every system item of 2.6.2, in the order vd writes them.
pub(crate) const SYSTEM_ITEMS: [KnownItem; 6] = [
    FILE_PARAMETERS,
    VIRTUAL_DISK_SIZE,
    VIRTUAL_DISK_ID,
    LOGICAL_SECTOR_SIZE,
    PHYSICAL_SECTOR_SIZE,
    PARENT_LOCATOR,
];

impl KnownItem {
    /// The flags this item is written with.
    pub(crate) fn flags(&self) -> MetadataFlags {
        if self.virtual_disk {
            MetadataFlags::IS_REQUIRED | MetadataFlags::IS_VIRTUAL_DISK
        } else {
            MetadataFlags::IS_REQUIRED
        }
    }
}

/// The known system item `guid`.
fn known(guid: Uuid) -> Option<&'static KnownItem> {
    SYSTEM_ITEMS.iter().find(|k| k.guid == guid)
}

/// One metadata item with its contents, as written into a region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ItemData {
    /// Item GUID.
    pub guid: Uuid,
    /// Table entry flags.
    pub flags: MetadataFlags,
    /// The item's bytes.
    pub data: Vec<u8>,
}

impl ItemData {
    /// An item with explicit flags.
    pub(crate) fn new(guid: Uuid, flags: MetadataFlags, data: Vec<u8>) -> Self {
        Self { guid, flags, data }
    }

    /// A known system item with the flags 2.6.2 gives it.
    pub(crate) fn system(guid: Uuid, data: Vec<u8>) -> Self {
        let flags = known(guid).map_or(MetadataFlags::IS_REQUIRED, KnownItem::flags);
        Self { guid, flags, data }
    }

    /// The "incomplete file" marker (required, empty): a file holding it refuses to open.
    pub(crate) fn incomplete_marker() -> Self {
        Self::new(META_INCOMPLETE_FILE, MetadataFlags::IS_REQUIRED, Vec::new())
    }

    fn is_user(&self) -> bool {
        self.flags.contains(MetadataFlags::IS_USER)
    }

    /// The items of a parsed table with their bytes taken from `region` (the whole metadata
    /// region).
    ///
    /// # Errors
    /// `Corrupt` ([`Corruption::MetadataItemRange`]) for an item outside `region`
    /// (`read_metadata` has checked every range against the region, so only a shorter buffer
    /// gets here).
    pub(crate) fn from_table(items: &[MetadataItem], region: &[u8]) -> Result<Vec<Self>> {
        items
            .iter()
            .map(|i| {
                let start = fit::<usize, _>(i.offset, "metadata item offset")?;
                let len = fit::<usize, _>(i.length, "metadata item length")?;
                let data = start
                    .checked_add(len)
                    .and_then(|end| region.get(start..end))
                    .ok_or_else(|| {
                        Corruption::MetadataItemRange {
                            guid: i.guid,
                            offset: i.offset,
                            length: i.length,
                            reason: "beyond the end of the metadata region",
                        }
                        .at("metadata table", 0)
                    })?;
                Ok(Self {
                    guid: i.guid,
                    flags: i.flags(),
                    data: data.to_vec(),
                })
            })
            .collect()
    }
}

impl MetadataItem {
    /// The table entry flags.
    pub fn flags(&self) -> MetadataFlags {
        let mut f = MetadataFlags::empty();
        f.set(MetadataFlags::IS_USER, self.is_user);
        f.set(MetadataFlags::IS_VIRTUAL_DISK, self.is_virtual_disk);
        f.set(MetadataFlags::IS_REQUIRED, self.is_required);
        f
    }
}

/// Sets, replaces or (with `data` `None`) removes the item `guid` of the kind `flags` says
/// (user or system).
pub(crate) fn set_item(
    items: &mut Vec<ItemData>,
    guid: Uuid,
    flags: MetadataFlags,
    data: Option<Vec<u8>>,
) {
    let user = flags.contains(MetadataFlags::IS_USER);
    let pos = items
        .iter()
        .position(|i| i.guid == guid && i.is_user() == user);
    match (pos, data) {
        (Some(p), Some(d)) => {
            if let Some(i) = items.get_mut(p) {
                i.data = d;
            }
        }
        (Some(p), None) => {
            items.remove(p);
        }
        (None, Some(d)) => items.push(ItemData::new(guid, flags, d)),
        (None, None) => {}
    }
}

/// Replaces the data of an existing system item.
pub(crate) fn replace_item(items: &mut [ItemData], guid: Uuid, data: Vec<u8>) {
    if let Some(i) = items.iter_mut().find(|i| i.guid == guid && !i.is_user()) {
        i.data = data;
    }
}

/// The parameters a new image's system items hold.
#[derive(Debug, Clone)]
pub(crate) struct NewDisk {
    /// Block size.
    pub block_size: u32,
    /// LeaveBlockAllocated (fixed).
    pub fixed: bool,
    /// Virtual size.
    pub virtual_size: u64,
    /// Virtual Disk ID.
    pub disk_id: Uuid,
    /// Logical sector size.
    pub logical_sector_size: u32,
    /// Physical sector size.
    pub physical_sector_size: u32,
    /// The parent locator's bytes, for a differencing image.
    pub locator: Option<Vec<u8>>,
}

/// The system items of a new image, in the order of [`SYSTEM_ITEMS`].
pub(crate) fn system_items(d: &NewDisk) -> Vec<ItemData> {
    let mut fp_flags = FileParameterFlags::empty();
    fp_flags.set(FileParameterFlags::LEAVE_BLOCK_ALLOCATED, d.fixed);
    fp_flags.set(FileParameterFlags::HAS_PARENT, d.locator.is_some());
    let fp = FileParameters {
        block_size: U32::new(d.block_size),
        flags: U32::new(fp_flags.bits()),
    };
    let mut items = vec![
        ItemData::system(META_FILE_PARAMETERS, fp.as_bytes().to_vec()),
        ItemData::system(
            META_VIRTUAL_DISK_SIZE,
            d.virtual_size.to_le_bytes().to_vec(),
        ),
        ItemData::system(META_VIRTUAL_DISK_ID, Guid::from_uuid(d.disk_id).0.to_vec()),
        ItemData::system(
            META_LOGICAL_SECTOR_SIZE,
            d.logical_sector_size.to_le_bytes().to_vec(),
        ),
        ItemData::system(
            META_PHYSICAL_SECTOR_SIZE,
            d.physical_sector_size.to_le_bytes().to_vec(),
        ),
    ];
    if let Some(loc) = &d.locator {
        items.push(ItemData::system(META_PARENT_LOCATOR, loc.clone()));
    }
    items
}

/// Lays out a metadata region of `len` bytes: the table, then each item's data from 64 KiB on,
/// 8-byte aligned, in order (an empty item has offset 0).
///
/// # Errors
/// `OutOfRange` when the items do not fit.
pub(crate) fn build_metadata_region(items: &[ItemData], len: usize) -> Result<Vec<u8>> {
    let full = || Error::new(ErrorKind::OutOfRange, "the metadata region is full");
    let count = u16::try_from(items.len())
        .ok()
        .filter(|c| *c <= MAX_METADATA_ENTRIES)
        .ok_or_else(full)?;
    let mut new = vec![0u8; len];
    let header = MetadataTableHeader {
        signature: U64::new(METADATA_SIGNATURE),
        reserved: U16::new(0),
        entry_count: U16::new(count),
        reserved2: [0; 20],
    };
    let put = |buf: &mut Vec<u8>, at: usize, b: &[u8]| -> Result<()> {
        buf.get_mut(at..at.checked_add(b.len()).ok_or_else(full)?)
            .ok_or_else(full)?
            .copy_from_slice(b);
        Ok(())
    };
    put(&mut new, 0, header.as_bytes())?;
    let entry_size = size_of::<MetadataTableEntry>();
    let mut data_off = METADATA_TABLE_SIZE;
    for (n, i) in items.iter().enumerate() {
        let at = n
            .checked_add(1)
            .and_then(|k| k.checked_mul(entry_size))
            .ok_or_else(full)?;
        if at
            .checked_add(entry_size)
            .is_none_or(|end| end > METADATA_TABLE_SIZE)
        {
            return Err(full());
        }
        let offset = if i.data.is_empty() {
            0
        } else {
            u32::try_from(data_off).map_err(|_| full())?
        };
        let entry = MetadataTableEntry {
            item_id: Guid::from_uuid(i.guid),
            offset: U32::new(offset),
            length: U32::new(u32::try_from(i.data.len()).map_err(|_| full())?),
            flags: U32::new(i.flags.bits()),
            reserved: U32::new(0),
        };
        put(&mut new, at, entry.as_bytes())?;
        put(&mut new, data_off, &i.data)?;
        data_off = data_off
            .checked_add(i.data.len().checked_next_multiple_of(8).ok_or_else(full)?)
            .ok_or_else(full)?;
    }
    Ok(new)
}

/// The file offset of entry `i` of the metadata table at `table_off`.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "i < 2047 (MAX_METADATA_ENTRIES, checked before the entries are read) and \
              table_off is the metadata region's offset, whose end (at least 64 KiB further, \
              the table) does not overflow (read_region_table)"
)]
fn entry_offset(table_off: u64, i: usize) -> u64 {
    table_off + 32 + 32 * i as u64
}

/// The end of an item at `offset` with `length` inside the region: two 32-bit fields, so the
/// sum is below 2^33.
fn item_end(offset: u32, length: u32) -> u64 {
    u64::from(offset).saturating_add(u64::from(length))
}

struct Reader<'a> {
    storage: &'a dyn Storage,
    region: Region,
}

impl Reader<'_> {
    fn read(&self, item: &MetadataItem) -> Result<Vec<u8>> {
        let off = self
            .region
            .offset
            .checked_add(u64::from(item.offset))
            .ok_or_else(|| overflow("metadata item offset"))?;
        let mut buf = vec![0u8; fit::<usize, _>(item.length, "metadata item length")?];
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
    warnings: &mut Vec<Warning>,
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
    let field = format!("{name} metadata item");
    if strict {
        return Err(c.at(field, at));
    }
    warnings.push(warning(c.kind(), field, at, c.to_string()));
    Ok(())
}

/// Reads and validates the metadata table and the system items.
///
/// # Errors
/// `Corrupt` for every rule of 2.6; `NotSupported` for an unknown required item.
pub fn read_metadata(
    storage: &dyn Storage,
    region: Region,
    strict: bool,
    warnings: &mut Vec<Warning>,
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
        let entry_off = entry_offset(table_off, i);
        let flags = MetadataFlags::from_bits_retain(e.flags.get());
        let item = MetadataItem {
            guid: e.item_id.to_uuid(),
            offset: e.offset.get(),
            length: e.length.get(),
            is_user: flags.contains(MetadataFlags::IS_USER),
            is_virtual_disk: flags.contains(MetadataFlags::IS_VIRTUAL_DISK),
            is_required: flags.contains(MetadataFlags::IS_REQUIRED),
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
            if u64::from(item.offset) < METADATA_TABLE_SIZE as u64 {
                return Err(bad("inside the metadata table"));
            }
            if item_end(item.offset, item.length) > region.length {
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
            && item_end(a.0, a.1) > u64::from(b.0)
        {
            return Err(Corruption::MetadataOverlap {
                first: a.2,
                second: b.2,
            }
            .at("metadata table", table_off));
        }
    }

    let reader = Reader { storage, region };
    let known = SYSTEM_ITEMS.map(|k| k.guid);
    for (i, item) in items.iter().enumerate() {
        if item.is_user || known.contains(&item.guid) {
            continue;
        }
        let entry_off = entry_offset(table_off, i);
        if item.guid == META_INCOMPLETE_FILE {
            return Err(Corruption::IncompleteFile.at("metadata table", entry_off));
        }
        if item.is_required {
            return Err(Corruption::UnknownRequiredMetadata { guid: item.guid }
                .at(format!("metadata table entry {i}"), entry_off));
        }
        warnings.push(warning(
            ErrorKind::NotSupported,
            format!("metadata table entry {i}"),
            entry_off,
            format!("ignoring unknown optional metadata item {}", item.guid),
        ));
    }
    let find = |guid: Uuid, name: &'static str| {
        items
            .iter()
            .find(|i| i.guid == guid && !i.is_user)
            .copied()
            .ok_or_else(|| Corruption::MissingMetadata { name }.at("metadata table", table_off))
    };
    // Every item lies inside the region (checked above), whose end does not overflow.
    let at = |item: &MetadataItem| region.offset.saturating_add(u64::from(item.offset));

    // Finds a system item and checks its length and flags.
    let system = |k: &KnownItem, warnings: &mut Vec<Warning>| -> Result<MetadataItem> {
        let item = find(k.guid, k.name)?;
        if let Some(len) = k.length {
            fixed_len(&item, k.name, len, at(&item))?;
        }
        check_flags(&item, k.name, k.virtual_disk, at(&item), strict, warnings)?;
        Ok(item)
    };
    // A fixed-length item too short for its value (`system` has checked the length, so this
    // is only reached if that rule changes).
    let short = |k: &KnownItem, item: &MetadataItem, expected: u32| {
        Corruption::MetadataItemLength {
            name: k.name,
            length: item.length,
            expected,
        }
        .at(format!("{} metadata item", k.name), at(item))
    };

    let fp_item = system(&FILE_PARAMETERS, warnings)?;
    let fp = FileParameters::read_from_bytes(&reader.read(&fp_item)?)
        .map_err(|_| short(&FILE_PARAMETERS, &fp_item, 8))?;
    let block_size = fp.block_size.get();
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(Corruption::BlockSize { found: block_size }
            .at("file parameters block size", at(&fp_item)));
    }
    let flags = FileParameterFlags::from_bits_retain(fp.flags.get());
    let leave_block_allocated = flags.contains(FileParameterFlags::LEAVE_BLOCK_ALLOCATED);
    let has_parent = flags.contains(FileParameterFlags::HAS_PARENT);

    let mut sector = |k: &KnownItem, which: &'static str| -> Result<u32> {
        let item = system(k, warnings)?;
        let v = U32::read_from_bytes(&reader.read(&item)?)
            .map_err(|_| short(k, &item, 4))?
            .get();
        if v != 512 && v != 4096 {
            return Err(Corruption::SectorSize { which, found: v }
                .at(format!("{} metadata item", k.name), at(&item)));
        }
        Ok(v)
    };
    let logical_sector_size = sector(&LOGICAL_SECTOR_SIZE, "logical")?;
    let physical_sector_size = sector(&PHYSICAL_SECTOR_SIZE, "physical")?;

    let vs_item = system(&VIRTUAL_DISK_SIZE, warnings)?;
    let virtual_size = U64::read_from_bytes(&reader.read(&vs_item)?)
        .map_err(|_| short(&VIRTUAL_DISK_SIZE, &vs_item, 8))?
        .get();
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
    if !virtual_size.is_multiple_of(u64::from(logical_sector_size)) {
        return Err(vs_bad("not a multiple of the logical sector size"));
    }

    let id_item = system(&VIRTUAL_DISK_ID, warnings)?;
    let virtual_disk_id = Guid::read_from_bytes(&reader.read(&id_item)?)
        .map_err(|_| short(&VIRTUAL_DISK_ID, &id_item, 16))?
        .to_uuid();

    let parent_locator = if has_parent {
        let item = system(&PARENT_LOCATOR, warnings)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::guid::{REGION_METADATA, USER_COMMENT};
    use crate::locator::ParentLocator;
    use vd_core::MemStorage;

    const AT: u64 = 3 * 1024 * 1024;
    const LEN: usize = 1024 * 1024;

    fn region() -> Region {
        Region {
            guid: REGION_METADATA,
            offset: AT,
            length: LEN as u64,
            required: true,
        }
    }

    fn disk(locator: Option<Vec<u8>>) -> NewDisk {
        NewDisk {
            block_size: 2 << 20,
            fixed: false,
            virtual_size: 10 << 30,
            disk_id: uuid::uuid!("12345678-9abc-def0-1234-56789abcdef0"),
            logical_sector_size: 4096,
            physical_sector_size: 512,
            locator,
        }
    }

    fn parse(items: &[ItemData]) -> (Result<Metadata>, Vec<u8>, Vec<Warning>) {
        let bytes = build_metadata_region(items, LEN).unwrap();
        let mut file = vec![0u8; usize::try_from(AT).unwrap()];
        file.extend_from_slice(&bytes);
        let s = MemStorage::from_bytes(file);
        let mut warnings = Vec::new();
        let m = read_metadata(&s, region(), true, &mut warnings);
        (m, bytes, warnings)
    }

    #[test]
    fn table_round_trips_through_the_parser() {
        let loc = ParentLocator::from_pairs([
            (
                "parent_linkage",
                "{00000000-0000-0000-0000-000000000001}".to_string(),
            ),
            ("relative_path", r".\p.vhdx".to_string()),
        ]);
        let mut items = system_items(&disk(Some(loc.to_bytes().unwrap())));
        items.push(ItemData::new(
            USER_COMMENT,
            MetadataFlags::IS_USER,
            b"hello".to_vec(),
        ));
        let (m, bytes, warnings) = parse(&items);
        let m = m.unwrap();
        assert!(warnings.is_empty(), "{warnings:?}");
        assert_eq!(m.block_size, 2 << 20);
        assert!(!m.leave_block_allocated);
        assert!(m.has_parent);
        assert_eq!(m.virtual_size, 10 << 30);
        assert_eq!(
            m.virtual_disk_id,
            uuid::uuid!("12345678-9abc-def0-1234-56789abcdef0")
        );
        assert_eq!((m.logical_sector_size, m.physical_sector_size), (4096, 512));
        assert_eq!(m.parent_locator, Some(loc));
        // The parsed table gives back the same items, flags and bytes.
        assert_eq!(ItemData::from_table(&m.items, &bytes).unwrap(), items);
        // Every system item carries the flags of SYSTEM_ITEMS.
        for k in SYSTEM_ITEMS {
            let i = m.items.iter().find(|i| i.guid == k.guid).unwrap();
            assert_eq!(i.flags(), k.flags(), "{}", k.name);
            if let Some(len) = k.length {
                assert_eq!(i.length, len, "{}", k.name);
            }
        }
    }

    #[test]
    fn layout_of_the_region() {
        let items = system_items(&disk(None));
        let bytes = build_metadata_region(&items, LEN).unwrap();
        let (h, rest) = MetadataTableHeader::read_from_prefix(&bytes).unwrap();
        assert_eq!(h.signature.get(), METADATA_SIGNATURE);
        assert_eq!(h.entry_count.get(), 5);
        let (e, _) = <[MetadataTableEntry]>::ref_from_prefix_with_elems(rest, 5).unwrap();
        // Data from 64 KiB on, 8-byte aligned, in order.
        let offsets: Vec<u32> = e.iter().map(|e| e.offset.get()).collect();
        assert_eq!(offsets, [0x10000, 0x10008, 0x10010, 0x10020, 0x10028]);
        assert_eq!(e[0].flags.get(), 4);
        assert_eq!(e[1].flags.get(), 6);
        // A fixed disk sets LeaveBlockAllocated.
        let fixed = system_items(&NewDisk {
            fixed: true,
            ..disk(None)
        });
        assert_eq!(fixed[0].data, [0, 0, 0x20, 0, 1, 0, 0, 0]);
    }

    #[test]
    fn an_empty_item_has_offset_zero_and_marks_an_incomplete_file() {
        let mut items = system_items(&disk(None));
        items.push(ItemData::incomplete_marker());
        let (m, bytes, _) = parse(&items);
        let e = MetadataTableEntry::read_from_prefix(&bytes[32 * 6..])
            .unwrap()
            .0;
        assert_eq!((e.offset.get(), e.length.get()), (0, 0));
        let err = m.unwrap_err();
        assert_eq!(
            crate::error::corruption_of(&err),
            Some(&Corruption::IncompleteFile)
        );
        // Without the marker, the region differs only in the count and the last entry.
        items.pop();
        let without = build_metadata_region(&items, LEN).unwrap();
        let diff: Vec<usize> = (0..LEN).filter(|&i| bytes[i] != without[i]).collect();
        assert!(
            diff.iter().all(|&i| i == 10 || (192..224).contains(&i)),
            "{diff:?}"
        );
    }

    #[test]
    fn unknown_items_required_or_not() {
        let unknown = uuid::uuid!("aaaaaaaa-bbbb-cccc-dddd-eeeeeeeeeeee");
        let mut items = system_items(&disk(None));
        items.push(ItemData::new(unknown, MetadataFlags::empty(), vec![1]));
        let (m, _, warnings) = parse(&items);
        assert!(m.is_ok());
        assert_eq!(warnings.len(), 1);
        assert_eq!(warnings[0].kind, ErrorKind::NotSupported);
        assert!(
            warnings[0]
                .field
                .as_deref()
                .is_some_and(|f| f.starts_with("metadata table entry")),
            "{warnings:?}"
        );
        items.pop();
        items.push(ItemData::new(unknown, MetadataFlags::IS_REQUIRED, vec![1]));
        let err = parse(&items).0.unwrap_err();
        assert_eq!(
            crate::error::corruption_of(&err),
            Some(&Corruption::UnknownRequiredMetadata { guid: unknown })
        );
    }

    #[test]
    fn set_and_replace_items() {
        let mut items = system_items(&disk(None));
        set_item(
            &mut items,
            USER_COMMENT,
            MetadataFlags::IS_USER,
            Some(vec![1]),
        );
        assert_eq!(items.len(), 6);
        set_item(
            &mut items,
            USER_COMMENT,
            MetadataFlags::IS_USER,
            Some(vec![2]),
        );
        assert_eq!(items.last().unwrap().data, [2]);
        set_item(&mut items, USER_COMMENT, MetadataFlags::IS_USER, None);
        assert_eq!(items.len(), 5);
        replace_item(
            &mut items,
            META_VIRTUAL_DISK_SIZE,
            7u64.to_le_bytes().to_vec(),
        );
        assert_eq!(items[1].data, 7u64.to_le_bytes());
        // A user item with a system GUID is not the system item.
        set_item(
            &mut items,
            META_VIRTUAL_DISK_SIZE,
            MetadataFlags::IS_USER,
            Some(vec![9]),
        );
        assert_eq!(items.len(), 6);
        assert_eq!(items[1].data, 7u64.to_le_bytes());
    }

    #[test]
    fn a_full_region_is_an_error() {
        let big = ItemData::new(USER_COMMENT, MetadataFlags::IS_USER, vec![0; LEN]);
        assert!(build_metadata_region(&[big], LEN).is_err());
        let many: Vec<ItemData> = (0..2048u32)
            .map(|n| {
                ItemData::new(
                    Uuid::from_u128(u128::from(n)),
                    MetadataFlags::IS_USER,
                    Vec::new(),
                )
            })
            .collect();
        assert!(build_metadata_region(&many, LEN).is_err());
    }

    /// The metadata region of the system items plus `extra` one-byte user items.
    fn with_user_items(extra: usize) -> Vec<ItemData> {
        let mut items = system_items(&disk(None));
        for i in 0..extra {
            let n = u128::try_from(i).unwrap() + 1;
            items.push(ItemData::new(
                Uuid::from_u128(0xaaaa_0000_0000_4000_8000_0000_0000_0000 | n),
                MetadataFlags::IS_USER,
                vec![1],
            ));
        }
        items
    }

    fn reparse(bytes: Vec<u8>) -> Result<Metadata> {
        let mut file = vec![0u8; usize::try_from(AT).unwrap()];
        file.extend_from_slice(&bytes);
        read_metadata(
            &MemStorage::from_bytes(file),
            region(),
            true,
            &mut Vec::new(),
        )
    }

    #[test]
    fn metadata_entry_count_limit() {
        // At the limit (the table is full): parsed, every entry kept.
        let system = system_items(&disk(None)).len();
        let items = with_user_items(usize::from(MAX_METADATA_ENTRIES) - system);
        let (m, mut bytes, _) = parse(&items);
        assert_eq!(m.unwrap().items.len(), usize::from(MAX_METADATA_ENTRIES));
        // Just over: a typed error naming the count and the table.
        bytes[10..12].copy_from_slice(&(MAX_METADATA_ENTRIES + 1).to_le_bytes());
        let err = reparse(bytes).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Corrupt);
        assert_eq!(
            crate::error::corruption_of(&err),
            Some(&Corruption::MetadataEntryCount { count: 2048 })
        );
        assert_eq!(err.context().field.as_deref(), Some("metadata table"));
    }

    #[test]
    fn metadata_item_length_limit() {
        let (m, mut bytes, _) = parse(&with_user_items(1));
        assert!(m.is_ok());
        // The user item's entry (after the five system items) says one byte more than 1 MiB.
        let e = 32 + 32 * 5;
        bytes[e + 20..e + 24].copy_from_slice(&(MAX_METADATA_ITEM + 1).to_le_bytes());
        let err = reparse(bytes).unwrap_err();
        assert!(
            matches!(
                crate::error::corruption_of(&err),
                Some(Corruption::MetadataItemRange { reason, length, .. })
                    if *reason == "longer than 1 MiB" && *length == MAX_METADATA_ITEM + 1
            ),
            "{err}"
        );
        assert_eq!(
            err.context().field.as_deref(),
            Some("metadata table entry 5")
        );
    }
}
