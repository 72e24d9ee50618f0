//! Describing an open image as typed facts: the `dump` of every structure and the `details`
//! `info` shows (the types are in `report`).

use vd_core::Result;

use crate::engine::Engine;
use crate::report::{Details, Dump};

impl Engine {
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
    use vd_core::OpenFlags;

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
