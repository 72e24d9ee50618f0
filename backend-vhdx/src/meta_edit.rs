//! Rewriting the metadata region through the log: UUID, parent locator, geometry and comment
//! setters. Unknown and user items are carried through untouched.

use uuid::{Uuid, uuid};
use vd_core::{Error, ErrorKind, Geometry, Result};

use crate::create::parent_locator;
use crate::format::{
    LOG_SECTOR_SIZE, METADATA_SIGNATURE, METADATA_TABLE_SIZE, MetadataTableEntry,
    MetadataTableHeader,
};
use crate::guid::{Guid, META_PARENT_LOCATOR, META_VIRTUAL_DISK_ID};
use crate::image::VhdxImage;
use crate::metadata::{parse_locator, read_metadata};

/// vd's user metadata item holding the physical geometry (3 × u32: cylinders, heads, sectors).
pub const USER_PCHS: Uuid = uuid!("6f2f6b0e-2a8c-4d0b-9b53-7a1c3d9e5a01");
/// vd's user metadata item holding the logical geometry (3 × u32).
pub const USER_LCHS: Uuid = uuid!("6f2f6b0e-2a8c-4d0b-9b53-7a1c3d9e5a02");
/// vd's user metadata item holding the comment (UTF-8).
pub const USER_COMMENT: Uuid = uuid!("6f2f6b0e-2a8c-4d0b-9b53-7a1c3d9e5a03");

const FLAG_USER: u32 = 1;
const MAX_COMMENT: usize = 64 * 1024;

/// One metadata item with its contents.
#[derive(Debug, Clone)]
pub struct ItemData {
    guid: Uuid,
    flags: u32,
    data: Vec<u8>,
}

impl ItemData {
    /// An item with raw flags (bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired).
    pub(crate) fn new(guid: Uuid, flags: u32, data: Vec<u8>) -> Self {
        Self { guid, flags, data }
    }

    fn is_user(&self) -> bool {
        self.flags & FLAG_USER != 0
    }
}

fn set_item(items: &mut Vec<ItemData>, guid: Uuid, flags: u32, data: Option<Vec<u8>>) {
    let user = flags & FLAG_USER != 0;
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
        (None, Some(d)) => items.push(ItemData {
            guid,
            flags,
            data: d,
        }),
        (None, None) => {}
    }
}

/// Replaces the data of an existing system item.
pub(crate) fn replace_item(items: &mut [ItemData], guid: Uuid, data: Vec<u8>) {
    if let Some(i) = items.iter_mut().find(|i| i.guid == guid && !i.is_user()) {
        i.data = data;
    }
}

fn geometry_bytes(g: Geometry) -> Vec<u8> {
    [g.cylinders, g.heads, g.sectors]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

/// Lays out a metadata region of `len` bytes: the table, then each item's data from 64 KiB on,
/// 8-byte aligned, in order.
///
/// # Errors
/// `OutOfRange` when the items do not fit.
pub(crate) fn build_metadata_region(items: &[ItemData], len: usize) -> Result<Vec<u8>> {
    use zerocopy::IntoBytes;
    let mut new = vec![0u8; len];
    let header = MetadataTableHeader {
        signature: zerocopy::little_endian::U64::new(METADATA_SIGNATURE),
        reserved: zerocopy::little_endian::U16::new(0),
        entry_count: zerocopy::little_endian::U16::new(
            u16::try_from(items.len()).unwrap_or(u16::MAX),
        ),
        reserved2: [0; 20],
    };
    let full = || Error::new(ErrorKind::OutOfRange, "the metadata region is full");
    let put = |buf: &mut Vec<u8>, at: usize, b: &[u8]| -> Result<()> {
        buf.get_mut(at..at + b.len())
            .ok_or_else(full)?
            .copy_from_slice(b);
        Ok(())
    };
    put(&mut new, 0, header.as_bytes())?;
    let mut data_off = METADATA_TABLE_SIZE;
    for (n, i) in items.iter().enumerate() {
        if 32 + 32 * (n + 1) > METADATA_TABLE_SIZE {
            return Err(full());
        }
        let entry = MetadataTableEntry {
            item_id: Guid::from_uuid(i.guid),
            offset: zerocopy::little_endian::U32::new(if i.data.is_empty() {
                0
            } else {
                u32::try_from(data_off).unwrap_or(0)
            }),
            length: zerocopy::little_endian::U32::new(u32::try_from(i.data.len()).unwrap_or(0)),
            flags: zerocopy::little_endian::U32::new(i.flags),
            reserved: zerocopy::little_endian::U32::new(0),
        };
        put(&mut new, 32 + 32 * n, entry.as_bytes())?;
        put(&mut new, data_off, &i.data)?;
        data_off += i.data.len().div_ceil(8) * 8;
    }
    Ok(new)
}

impl VhdxImage {
    /// The data of a user or system item, read from the file.
    pub(crate) fn item_data(&self, guid: Uuid, user: bool) -> Result<Option<Vec<u8>>> {
        let (item, region) = {
            let meta = self.metadata();
            let Some(item) = meta
                .items
                .iter()
                .find(|i| i.guid == guid && i.is_user == user)
                .copied()
            else {
                return Ok(None);
            };
            (item, self.regions().metadata)
        };
        let mut buf = vec![0u8; item.length as usize];
        self.storage()
            .read_exact_at(region.offset + u64::from(item.offset), &mut buf)
            .map_err(|e| Error::io("cannot read a metadata item", e))?;
        Ok(Some(buf))
    }

    /// The stored geometry of vd's user item `guid`, if any.
    pub(crate) fn stored_geometry(&self, guid: Uuid) -> Result<Option<Geometry>> {
        Ok(self.item_data(guid, true)?.and_then(|d| {
            let v: Vec<u32> = d
                .chunks_exact(4)
                .map(|c| u32::from_le_bytes(c.try_into().unwrap_or([0; 4])))
                .collect();
            match v.as_slice() {
                [c, h, s] => Some(Geometry {
                    cylinders: *c,
                    heads: *h,
                    sectors: *s,
                }),
                _ => None,
            }
        }))
    }

    /// Rebuilds the metadata region with `edit` applied and commits the changed pages through
    /// the log. Only the FileWriteGuid changes (MS-VHDX 2.2.2): the metadata items are not what
    /// the virtual disk reads, so differencing children made from this image stay valid. The
    /// operations that do change what is read (resize) change the DataWriteGuid themselves
    /// before calling this.
    pub(crate) fn edit_metadata(
        &self,
        edit: impl FnOnce(&mut Vec<ItemData>) -> Result<()>,
    ) -> Result<()> {
        self.check_writable("changing metadata")?;
        let storage = self.storage().clone();
        let region = self.regions().metadata;
        let mut ws = self.write_state().lock();
        self.begin(&mut ws)?;
        self.commit(&mut ws)?;
        let len = usize::try_from(region.length)
            .map_err(|_| Error::invalid_argument("metadata region too large"))?;
        let mut old = vec![0u8; len];
        storage
            .read_exact_at(region.offset, &mut old)
            .map_err(|e| Error::io("cannot read the metadata region", e))?;
        let mut items: Vec<ItemData> = self
            .metadata()
            .items
            .iter()
            .map(|i| ItemData {
                guid: i.guid,
                flags: u32::from(i.is_user)
                    | u32::from(i.is_virtual_disk) << 1
                    | u32::from(i.is_required) << 2,
                data: old
                    .get(i.offset as usize..i.offset as usize + i.length as usize)
                    .map(<[u8]>::to_vec)
                    .unwrap_or_default(),
            })
            .collect();
        edit(&mut items)?;
        let new = build_metadata_region(&items, len)?;
        let page = usize::try_from(LOG_SECTOR_SIZE).unwrap_or(4096);
        for (k, (a, b)) in old.chunks(page).zip(new.chunks(page)).enumerate() {
            if a != b {
                ws.queue_page(region.offset + (k * page) as u64, b.to_vec());
            }
        }
        self.commit(&mut ws)?;
        let mut warnings = Vec::new();
        let meta = read_metadata(storage.as_ref(), region, false, &mut warnings)?;
        *self.metadata_lock().write() = meta;
        Ok(())
    }

    /// Sets the Virtual Disk ID (page 83).
    pub(crate) fn set_disk_id(&self, id: Uuid) -> Result<()> {
        self.edit_metadata(|items| {
            set_item(
                items,
                META_VIRTUAL_DISK_ID,
                0b110,
                Some(Guid::from_uuid(id).0.to_vec()),
            );
            Ok(())
        })
    }

    /// Changes one key of the parent locator.
    pub(crate) fn set_locator_key(&self, key: &str, value: String) -> Result<()> {
        let current = self
            .item_data(META_PARENT_LOCATOR, false)?
            .ok_or_else(|| Error::not_supported("parent settings of an image without a parent"))?;
        let mut loc = parse_locator(&current).map_err(|c| c.at("parent locator", 0))?;
        loc.entries.insert(key.to_string(), value);
        let pairs: Vec<(&str, String)> = loc
            .entries
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let bytes = parent_locator(&pairs);
        self.edit_metadata(|items| {
            set_item(items, META_PARENT_LOCATOR, 0b100, Some(bytes));
            Ok(())
        })
    }

    /// Stores a geometry in vd's user item.
    pub(crate) fn set_geometry(&self, guid: Uuid, g: Geometry) -> Result<()> {
        self.edit_metadata(|items| {
            set_item(items, guid, FLAG_USER, Some(geometry_bytes(g)));
            Ok(())
        })
    }

    /// Stores (or removes) the comment in vd's user item.
    pub(crate) fn set_comment_item(&self, comment: Option<&str>) -> Result<()> {
        if comment.is_some_and(|c| c.len() > MAX_COMMENT) {
            return Err(Error::invalid_argument("a comment is at most 64 KiB"));
        }
        let data = comment
            .filter(|c| !c.is_empty())
            .map(|c| c.as_bytes().to_vec());
        self.edit_metadata(|items| {
            set_item(items, USER_COMMENT, FLAG_USER, data);
            Ok(())
        })
    }
}
