//! Rewriting the metadata region through the log: UUID, parent locator, geometry and comment
//! setters. Unknown and user items are carried through untouched.

use uuid::Uuid;
use vd_core::{Error, Geometry, Result};

use crate::engine::Engine;
use crate::error::{fit, overflow};
use crate::format::{LOG_SECTOR_SIZE, MetadataFlags};
use crate::guid::{Guid, META_PARENT_LOCATOR, META_VIRTUAL_DISK_ID, USER_COMMENT};
use crate::locator::parse_locator;
use crate::metadata::{ItemData, build_metadata_region, read_metadata, set_item};
use crate::write_state::WriteState;

/// Longest comment (vd's own user metadata item), in bytes: a comment is a note, and the cap keeps
/// it far under the 1 MiB item cap.
pub const MAX_COMMENT: usize = 64 * 1024;

fn geometry_bytes(g: Geometry) -> Vec<u8> {
    [g.cylinders, g.heads, g.sectors]
        .iter()
        .flat_map(|v| v.to_le_bytes())
        .collect()
}

impl Engine {
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
        let mut buf = vec![0u8; fit::<usize, _>(item.length, "metadata item length")?];
        self.storage
            .read_exact_at(
                region
                    .offset
                    .checked_add(u64::from(item.offset))
                    .ok_or_else(|| overflow("metadata item offset"))?,
                &mut buf,
            )
            .map_err(|e| Error::io("cannot read a metadata item", e))?;
        Ok(Some(buf))
    }

    /// The stored geometry of vd's user item `guid`, if any.
    pub(crate) fn stored_geometry(&self, guid: Uuid) -> Result<Option<Geometry>> {
        Ok(self.item_data(guid, true)?.and_then(|d| {
            let (words, rest) = d.as_chunks::<4>();
            let v: Vec<u32> = if rest.is_empty() {
                words.iter().map(|c| u32::from_le_bytes(*c)).collect()
            } else {
                Vec::new()
            };
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

    /// The geometry stored in vd's user item `guid`, or `synthesize` of the disk size.
    pub(crate) fn geometry(&self, guid: Uuid, synthesize: fn(u64) -> Geometry) -> Result<Geometry> {
        Ok(self
            .stored_geometry(guid)?
            .unwrap_or_else(|| synthesize(self.metadata().virtual_size)))
    }

    /// The comment in vd's user item.
    pub(crate) fn comment(&self) -> Result<Option<String>> {
        Ok(self
            .item_data(USER_COMMENT, true)?
            .map(|d| String::from_utf8_lossy(&d).into_owned()))
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
        let mut ws = self.write_state.lock();
        self.edit_metadata_locked(&mut ws, edit)
    }

    /// [`edit_metadata`](Self::edit_metadata) for a change that holds the write state already.
    pub(crate) fn edit_metadata_locked(
        &self,
        ws: &mut WriteState,
        edit: impl FnOnce(&mut Vec<ItemData>) -> Result<()>,
    ) -> Result<()> {
        let storage = self.storage.clone();
        let region = self.regions().metadata;
        self.begin(ws)?;
        self.commit(ws)?;
        let len = usize::try_from(region.length)
            .map_err(|_| Error::invalid_argument("metadata region too large"))?;
        let mut old = vec![0u8; len];
        storage
            .read_exact_at(region.offset, &mut old)
            .map_err(|e| Error::io("cannot read the metadata region", e))?;
        let mut items = ItemData::from_table(&self.metadata().items, &old)?;
        edit(&mut items)?;
        let new = build_metadata_region(&items, len)?;
        let page = fit::<usize, _>(LOG_SECTOR_SIZE, "log sector size")?;
        for (k, (a, b)) in old.chunks(page).zip(new.chunks(page)).enumerate() {
            if a != b {
                let at = k
                    .checked_mul(page)
                    .and_then(|at| u64::try_from(at).ok())
                    .and_then(|at| at.checked_add(region.offset))
                    .ok_or_else(|| overflow("metadata page offset"))?;
                ws.queue_page(at, b.to_vec());
            }
        }
        self.commit(ws)?;
        let mut warnings = Vec::new();
        let meta = read_metadata(storage.as_ref(), region, false, &mut warnings)?;
        *self.meta.write() = meta;
        Ok(())
    }

    /// Sets the Virtual Disk ID (page 83).
    pub(crate) fn set_disk_id(&self, id: Uuid) -> Result<()> {
        self.edit_metadata(|items| {
            set_item(
                items,
                META_VIRTUAL_DISK_ID,
                MetadataFlags::IS_REQUIRED | MetadataFlags::IS_VIRTUAL_DISK,
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
        let bytes = loc.to_bytes()?;
        self.edit_metadata(|items| {
            set_item(
                items,
                META_PARENT_LOCATOR,
                MetadataFlags::IS_REQUIRED,
                Some(bytes),
            );
            Ok(())
        })
    }

    /// Stores a geometry in vd's user item.
    pub(crate) fn set_geometry(&self, guid: Uuid, g: Geometry) -> Result<()> {
        self.edit_metadata(|items| {
            set_item(items, guid, MetadataFlags::IS_USER, Some(geometry_bytes(g)));
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
            set_item(items, USER_COMMENT, MetadataFlags::IS_USER, data);
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use vd_core::{Geometry, Image, OpenFlags};

    use crate::test_support::{create, reopen};

    #[test]
    fn comment_and_geometry_round_trip_through_the_file() {
        let (s, image) = create(64 << 20, &[]);
        let g = Geometry {
            cylinders: 100,
            heads: 16,
            sectors: 63,
        };
        image.set_comment(Some("hello")).unwrap();
        image.set_pchs_geometry(g).unwrap();
        let id = uuid::uuid!("01234567-89ab-cdef-0123-456789abcdef");
        image.set_uuid(id).unwrap();
        image.close(false).unwrap();
        let again = reopen(&s, OpenFlags::READ_ONLY);
        assert_eq!(again.comment().unwrap().as_deref(), Some("hello"));
        assert_eq!(again.pchs_geometry().unwrap(), g);
        assert_eq!(again.uuid().unwrap(), id);
        // The system items are untouched by the user items.
        assert_eq!(again.metadata().virtual_size, 64 << 20);
        drop(again);
        let image = reopen(&s, OpenFlags::empty());
        image.set_comment(None).unwrap();
        Box::new(image).close(false).unwrap();
        assert_eq!(reopen(&s, OpenFlags::READ_ONLY).comment().unwrap(), None);
    }

    #[test]
    fn a_comment_is_at_most_64_kib() {
        let (_, image) = create(64 << 20, &[]);
        assert!(image.set_comment(Some(&"x".repeat(65 * 1024))).is_err());
    }

    #[test]
    fn a_base_image_has_no_locator_to_edit() {
        let (_, image) = create(64 << 20, &[]);
        assert!(image.set_parent_filename("p.vhdx").is_err());
    }
}
