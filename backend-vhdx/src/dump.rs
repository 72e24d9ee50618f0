//! Describing an open image as typed facts: the `dump` of every structure and the `details`
//! `info` shows (the types are in `report`).

use vd_core::{BlockRuns, LayoutRegion, RegionKind, Result};

use crate::bat::BlockState;
use crate::engine::Engine;
use crate::format::{HEADER_OFFSETS, HEADER_SECTION_SIZE, KIB, MIB, REGION_TABLE_OFFSETS};
use crate::guid::{REGION_BAT, REGION_METADATA};
use crate::report::{Details, Dump};

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

    /// Every on-disk structure; reading the BAT's entry states is the only I/O.
    pub(crate) fn dump(&self) -> Result<Dump> {
        let states = self.bat.summary()?;
        let header = *self.header.read();
        let meta = self.metadata();
        Ok(Dump::new(
            &self.creator,
            &header,
            &self.regions(),
            &meta,
            &self.bat.layout(),
            states,
            &self.log,
        ))
    }

    /// The format-specific facts for `info`.
    pub(crate) fn details(&self) -> Details {
        let header = *self.header.read();
        Details::new(
            &self.creator,
            &header,
            &self.metadata(),
            &self.bat.layout(),
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
        assert!(!dump.log.dirty);
        let json = serde_json::to_value(&dump).unwrap();
        assert_eq!(
            json["bat"]["fully_present"], 1,
            "states are flattened into bat: {json}"
        );
        assert_eq!(json["header"]["log_offset"], img.engine.log.offset.0);
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
        assert_eq!(json["log"]["replay"], "none");
        assert_eq!(
            json["virtual_disk_id"],
            img.metadata().virtual_disk_id.to_string()
        );
        assert!(json.get("parent_locator").is_none(), "{json}");
    }
}
