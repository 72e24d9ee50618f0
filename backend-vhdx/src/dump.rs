//! Describing an open image as typed facts: the `dump` of every structure and the `details`
//! `info` shows (the types are in `report`).

use vd_core::{BlockRuns, ByteSize, LayoutRegion, Offset, RegionKind, Result, Storage};
use zerocopy::FromBytes;

use crate::bat::BlockState;
use crate::checksum::crc32c_with_zero_field;
use crate::engine::Engine;
use crate::error::io_at;
use crate::format::{
    HEADER_OFFSETS, HEADER_SECTION_SIZE, HEADER_SIGNATURE, HEADER_SIZE, Header, KIB, MIB,
    REGION_SIGNATURE, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE, RegionTableHeader,
};
use crate::guid::{REGION_BAT, REGION_METADATA, USER_COMMENT, USER_LCHS, USER_PCHS, guid_name};
use crate::report::{
    Details, Dump, HeaderFacts, HeaderFields, IdentifierFacts, ItemFacts, ItemValue, LogFacts,
    TableCopyFacts,
};

/// Reads `len` bytes at `offset`; `None` when the file ends first.
fn read_copy(storage: &dyn Storage, offset: u64, len: usize) -> Result<Option<Vec<u8>>> {
    let mut buf = vec![0u8; len];
    match storage.read_exact_at(offset, &mut buf) {
        Ok(()) => Ok(Some(buf)),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Ok(None),
        Err(e) => Err(io_at("dump", offset, e)),
    }
}

/// Both header copies as `storage` holds them; `current` is the slot in use.
fn header_copies(storage: &dyn Storage, current: usize) -> Result<Vec<HeaderFacts>> {
    let mut out = Vec::with_capacity(HEADER_OFFSETS.len());
    for (slot, &offset) in HEADER_OFFSETS.iter().enumerate() {
        let buf = read_copy(storage, offset, HEADER_SIZE)?;
        let wire = buf.as_deref().and_then(|b| Header::read_from_bytes(b).ok());
        out.push(HeaderFacts {
            copy: slot.saturating_add(1),
            offset: Offset(offset),
            current: slot == current,
            signature_valid: wire.is_some_and(|h| h.signature.get() == HEADER_SIGNATURE),
            checksum_valid: match (&buf, &wire) {
                (Some(b), Some(h)) => crc32c_with_zero_field(b, 4) == h.checksum.get(),
                _ => false,
            },
            fields: wire.map(|h| HeaderFields {
                sequence: h.sequence_number.get(),
                file_write_guid: h.file_write_guid.to_uuid(),
                data_write_guid: h.data_write_guid.to_uuid(),
                log_guid: h.log_guid.to_uuid(),
                log_version: h.log_version.get(),
                version: h.version.get(),
                log_offset: Offset(h.log_offset.get()),
                log_length: ByteSize(u64::from(h.log_length.get())),
            }),
        });
    }
    Ok(out)
}

/// Both region table copies as `storage` holds them; `current` is the copy in use.
fn region_table_copies(storage: &dyn Storage, current: usize) -> Result<Vec<TableCopyFacts>> {
    let mut out = Vec::with_capacity(REGION_TABLE_OFFSETS.len());
    for (copy, &offset) in REGION_TABLE_OFFSETS.iter().enumerate() {
        let buf = read_copy(storage, offset, REGION_TABLE_SIZE)?;
        let wire = buf
            .as_deref()
            .and_then(|b| RegionTableHeader::read_from_prefix(b).ok())
            .map(|(h, _)| h);
        out.push(TableCopyFacts {
            copy: copy.saturating_add(1),
            offset: Offset(offset),
            current: copy == current,
            signature_valid: wire.is_some_and(|h| h.signature.get() == REGION_SIGNATURE),
            checksum_valid: match (&buf, &wire) {
                (Some(b), Some(h)) => crc32c_with_zero_field(b, 4) == h.checksum.get(),
                _ => false,
            },
            entries: wire.map(|h| h.entry_count.get()),
        });
    }
    Ok(out)
}

/// The most separate runs of payload and sector-bitmap blocks [`Engine::file_layout`] lists: beyond
/// it, runs of one kind separated by small gaps are joined (see [`BlockRuns`]).
const MAX_BLOCK_RUNS: usize = 4096;

/// The space each of the fixed structures of the header section has (2.1): the file
/// identifier, each header and each region table own 64 KiB.
const SECTION_SLOT: u64 = 64 * KIB;

/// The size of a sector-bitmap block (2.5.1: one MiB, whatever the block size).
const SECTOR_BITMAP_BLOCK: u64 = MIB;

impl Engine {
    /// Where each structure lies in the file (2.1): the file identifier, both headers and both
    /// region tables (the copies in force labelled), the rest of the 1 MiB header section, the
    /// log, the BAT, the metadata region and other regions of the region table, then runs of
    /// payload and sector-bitmap blocks found in the BAT (reading every entry is the only I/O).
    /// Sorted by offset.
    ///
    /// # Errors
    /// I/O errors and the BAT's typed corruption errors (an entry pointing outside the file or
    /// into another structure).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "header-section constants, all within its 1 MiB"
    )]
    pub(crate) fn file_layout(&self) -> Result<Vec<LayoutRegion>> {
        let header = *self.header.read();
        let regions = self.regions();
        let mut out = vec![
            LayoutRegion::new(RegionKind::FileIdentifier, 0, SECTION_SLOT)
                .with_label(format!("file identifier (creator {:?})", self.creator)),
        ];
        for (i, (&off, copy)) in HEADER_OFFSETS.iter().zip([1u8, 2]).enumerate() {
            let label = if header.slot == i {
                "header (in force)"
            } else {
                "header"
            };
            out.push(
                LayoutRegion::new(RegionKind::Header, off, SECTION_SLOT)
                    .with_copy(copy)
                    .with_label(label),
            );
        }
        for (i, (&off, copy)) in REGION_TABLE_OFFSETS.iter().zip([1u8, 2]).enumerate() {
            let label = if regions.copy == i {
                "region table (in force)"
            } else {
                "region table"
            };
            out.push(
                LayoutRegion::new(RegionKind::RegionTable, off, SECTION_SLOT)
                    .with_copy(copy)
                    .with_label(label),
            );
        }
        let reserved = REGION_TABLE_OFFSETS[1] + SECTION_SLOT;
        out.push(
            LayoutRegion::new(
                RegionKind::Reserved,
                reserved,
                HEADER_SECTION_SIZE - reserved,
            )
            .with_label("rest of the header section"),
        );
        out.push(
            LayoutRegion::new(RegionKind::Log, header.log_offset(), header.log_length())
                .with_label(if self.log.dirty { "log (dirty)" } else { "log" }),
        );
        for r in [&regions.bat, &regions.metadata]
            .into_iter()
            .chain(&regions.others)
        {
            let (kind, label) = if r.guid == REGION_BAT {
                (RegionKind::Bat, "BAT".to_string())
            } else if r.guid == REGION_METADATA {
                (RegionKind::Metadata, "metadata region".to_string())
            } else {
                (RegionKind::Other, format!("region {}", r.guid))
            };
            out.push(LayoutRegion::new(kind, r.offset, r.length).with_label(label));
        }
        let layout = self.bat.layout();
        let mut runs = BlockRuns::new(MAX_BLOCK_RUNS);
        for b in 0..layout.data_blocks {
            match self.bat.block_in(&layout, b)? {
                BlockState::Full(off) | BlockState::Partial(off) => {
                    runs.add(RegionKind::Payload, off, layout.block_size);
                }
                BlockState::NotPresent | BlockState::Zero => {}
            }
        }
        if layout.has_parent {
            for c in 0..layout.data_blocks.div_ceil(layout.chunk_ratio) {
                if let Some(off) = self.bat.bitmap_in(&layout, c)? {
                    runs.add(RegionKind::SectorBitmap, off, SECTOR_BITMAP_BLOCK);
                }
            }
        }
        out.extend(runs.finish());
        out.sort_by_key(|r| (r.offset, r.kind));
        Ok(out)
    }

    /// Every on-disk structure: the header and region table copies as the file holds them, the
    /// parsed metadata with each known item's value, the BAT's entry states and the log.
    pub(crate) fn dump(&self) -> Result<Dump> {
        let states = self.bat.summary()?;
        let header = *self.header.read();
        let regions = self.regions();
        let mut metadata = Vec::new();
        let items = self.metadata().items.clone();
        for i in items {
            let value = if i.is_user {
                match i.guid {
                    USER_PCHS | USER_LCHS => self.stored_geometry(i.guid)?.map(ItemValue::Geometry),
                    USER_COMMENT => self.comment()?.map(ItemValue::Text),
                    _ => None,
                }
            } else {
                Dump::system_value(i.guid, &self.metadata())
            };
            metadata.push(ItemFacts {
                guid: i.guid,
                name: guid_name(i.guid),
                offset: Offset(u64::from(i.offset)),
                length: i.length,
                user: i.is_user,
                virtual_disk: i.is_virtual_disk,
                required: i.is_required,
                value,
            });
        }
        Ok(Dump {
            file_identifier: IdentifierFacts {
                creator: self.creator.clone(),
            },
            headers: header_copies(self.file.as_ref(), header.slot)?,
            region_tables: region_table_copies(self.file.as_ref(), regions.copy)?,
            region_table: Dump::regions(&regions),
            metadata,
            bat: Dump::bat(&self.bat.layout(), states),
            log: LogFacts {
                guid: header.log_guid().to_uuid(),
                state: self.log.clone(),
            },
        })
    }

    /// The format-specific facts for `info`. The block counts read every BAT entry; they are
    /// left out when that fails (a damaged BAT is `check`'s to report).
    pub(crate) fn details(&self) -> Details {
        let header = *self.header.read();
        let states = self
            .bat
            .summary()
            .inspect_err(|e| log::debug!("no block counts: {e}"))
            .ok();
        Details::new(
            &self.creator,
            &header,
            &self.metadata(),
            &self.bat.layout(),
            states.as_ref(),
            &self.log,
        )
    }
}

#[cfg(test)]
mod tests {
    use vd_core::{OpenFlags, RegionKind};

    use crate::bat::BlockState;

    use crate::format::MIB;
    use crate::test_support::{create, reopen};

    #[test]
    fn the_dump_lists_the_structures_of_the_file() {
        let (storage, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(2 * MIB, &[9; 512]).unwrap();
        image.close(false).unwrap();
        let img = reopen(&storage, OpenFlags::READ_ONLY);
        let dump = img.engine.dump().unwrap();
        let regions = img.engine.regions();
        assert_eq!(dump.file_identifier.creator, img.creator());
        assert_eq!(dump.region_table.copy, regions.copy + 1);
        let bat = &dump.region_table.regions[0];
        assert_eq!((bat.name, bat.offset.0), (Some("BAT"), regions.bat.offset));
        assert_eq!(dump.region_table.regions[1].name, Some("metadata"));
        assert_eq!(dump.metadata.len(), img.metadata().items.len());
        assert!(
            dump.metadata.iter().all(|i| i.name.is_some()),
            "{:?}",
            dump.metadata
        );
        assert_eq!(dump.bat.entries, img.layout().entries);
        assert_eq!(
            (dump.bat.states.fully_present, dump.bat.states.not_present),
            (1, 3)
        );
        assert!(!dump.log.state.dirty);
        let json = serde_json::to_value(&dump).unwrap();
        assert_eq!(
            json["bat"]["fully_present"], 1,
            "states are flattened into bat: {json}"
        );
        assert_eq!(json["headers"][0]["log_offset"], img.engine.log.offset.0);
        assert_eq!(json["headers"].as_array().map(Vec::len), Some(2));
        for h in json["headers"].as_array().unwrap() {
            assert_eq!(h["checksum_valid"], true, "{h}");
        }
        assert!(
            json["headers"][0]["current"] != json["headers"][1]["current"],
            "one header is current: {json}"
        );
        for t in json["region_tables"].as_array().unwrap() {
            assert_eq!(
                (&t["checksum_valid"], &t["entries"]),
                (&true.into(), &2.into())
            );
        }
        let value = |name: &str| {
            dump.metadata
                .iter()
                .find(|i| i.name == Some(name))
                .and_then(|i| serde_json::to_value(&i.value).ok())
                .unwrap_or_default()
        };
        assert_eq!(value("virtual disk size"), 4 * MIB);
        assert_eq!(value("logical sector size"), 512);
        assert_eq!(value("file parameters")["block_size"], MIB);
    }

    #[test]
    fn the_layout_places_every_structure_and_block() {
        let (storage, image) = create(8 * MIB, &[("block_size", "1M")]);
        image.write_at(2 * MIB, &[9; 512]).unwrap();
        image.write_at(3 * MIB, &[9; 512]).unwrap();
        image.write_at(7 * MIB, &[9; 512]).unwrap();
        image.close(false).unwrap();
        let img = reopen(&storage, OpenFlags::READ_ONLY);
        let layout = img.engine.file_layout().unwrap();
        assert!(
            layout.windows(2).all(|w| w[0].end() <= w[1].offset),
            "sorted, no overlaps: {layout:#?}"
        );
        let of = |kind| -> Vec<(u64, u64, Option<u64>)> {
            layout
                .iter()
                .filter(|r| r.kind == kind)
                .map(|r| (r.offset, r.length, r.blocks))
                .collect()
        };
        let regions = img.engine.regions();
        assert_eq!(
            of(RegionKind::Bat),
            vec![(regions.bat.offset, regions.bat.length, None)]
        );
        let header = *img.engine.header.read();
        assert_eq!(
            of(RegionKind::Log),
            vec![(header.log_offset(), header.log_length(), None)]
        );
        assert_eq!(of(RegionKind::Header).len(), 2);
        assert_eq!(of(RegionKind::RegionTable).len(), 2);
        // Three blocks written in order: one run, in the order the BAT places them.
        let payload = of(RegionKind::Payload);
        assert_eq!(payload.len(), 1, "{payload:?}");
        assert_eq!((payload[0].1, payload[0].2), (3 * MIB, Some(3)));
        let layout_state = img.layout();
        for b in [2, 3, 7] {
            let BlockState::Full(off) = img.engine.bat.block_in(&layout_state, b).unwrap() else {
                panic!("block {b} is not present");
            };
            assert!(payload[0].0 <= off && off + MIB <= payload[0].0 + payload[0].1);
        }
        let forced: Vec<_> = layout
            .iter()
            .filter(|r| r.label.as_deref().is_some_and(|l| l.contains("in force")))
            .map(|r| (r.kind, r.copy))
            .collect();
        assert!(forced.contains(&(
            RegionKind::Header,
            Some(u8::try_from(header.slot + 1).unwrap())
        )));
    }

    #[test]
    fn details_say_what_kind_of_image_it_is() {
        let (storage, image) = create(4 * MIB, &[("subformat", "fixed")]);
        image.close(false).unwrap();
        let img = reopen(&storage, OpenFlags::READ_ONLY);
        let json = serde_json::to_value(img.engine.details()).unwrap();
        assert_eq!(json["type"], "fixed");
        assert_eq!(json["log_state"], "clean");
        let blocks = img.layout().data_blocks;
        assert_eq!(json["blocks"]["total"], blocks);
        assert_eq!(
            json["blocks"]["allocated"], blocks,
            "fixed: every block: {json}"
        );
        assert_eq!(json["blocks"]["unallocated"], 0);
        assert_eq!(json["log"]["replay"], "none");
        assert_eq!(
            json["virtual_disk_id"],
            img.metadata().virtual_disk_id.to_string()
        );
        assert!(json.get("parent_locator").is_none(), "{json}");
    }
}
