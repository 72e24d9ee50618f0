//! Describing an open image: the `dump` listing of every structure and the JSON `details`.

use std::io;

use serde_json::json;

use crate::engine::Engine;
use crate::error::io_err;
use vd_core::Result;

impl Engine {
    /// Writes a human-readable description of every on-disk structure.
    pub(crate) fn dump(&self, out: &mut dyn io::Write) -> Result<()> {
        let w = |e: io::Error| io_err("cannot write the dump", e);
        let h = *self.header.read();
        let l = self.bat.layout();
        writeln!(out, "file identifier: creator {:?}", self.creator).map_err(w)?;
        writeln!(
            out,
            "header (slot {}): sequence {}, file write guid {}, data write guid {}, log guid {}, log {:#x}+{:#x}",
            h.slot + 1,
            h.sequence(),
            h.file_write_guid(),
            h.data_write_guid(),
            h.log_guid(),
            h.log_offset(),
            h.log_length()
        )
        .map_err(w)?;
        let regions = self.regions();
        writeln!(out, "region table (copy {}):", regions.copy + 1).map_err(w)?;
        for r in [regions.bat, regions.metadata]
            .iter()
            .chain(&regions.others)
        {
            writeln!(
                out,
                "  {} at {:#x}, length {:#x}, required {}",
                r.guid, r.offset, r.length, r.required
            )
            .map_err(w)?;
        }
        writeln!(out, "metadata:").map_err(w)?;
        for i in &self.metadata().items {
            writeln!(
                out,
                "  {} at +{:#x}, length {}, user {}, virtual disk {}, required {}",
                i.guid, i.offset, i.length, i.is_user, i.is_virtual_disk, i.is_required
            )
            .map_err(w)?;
        }
        if let Some(loc) = &self.metadata().parent_locator {
            writeln!(out, "parent locator:").map_err(w)?;
            for (k, v) in &loc.entries {
                writeln!(out, "  {k} = {v}").map_err(w)?;
            }
        }
        writeln!(
            out,
            "BAT: {} entries, chunk ratio {}, {} data blocks of {} bytes",
            l.entries, l.chunk_ratio, l.data_blocks, l.block_size
        )
        .map_err(w)?;
        let s = self.bat.summary()?;
        writeln!(
            out,
            "  not present {}, zero {}, fully present {}, partially present {}, bitmaps present {}",
            s.not_present, s.zero, s.fully_present, s.partially_present, s.bitmaps_present
        )
        .map_err(w)?;
        writeln!(
            out,
            "log: {}, replay {}, {} entries, head sequence {}",
            if self.log.dirty { "dirty" } else { "clean" },
            self.log.replay,
            self.log.entries,
            self.log.head_sequence
        )
        .map_err(w)?;
        for e in &self.log.sequence {
            writeln!(
                out,
                "  entry at log +{:#x}: sequence {}, length {:#x}, tail {:#x}, {} descriptors, flushed file offset {:#x}, last file offset {:#x}",
                e.log_offset, e.sequence, e.length, e.tail, e.descriptors, e.flushed_file_offset, e.last_file_offset
            )
            .map_err(w)?;
        }
        Ok(())
    }

    /// Format-specific facts for `info`.
    pub(crate) fn details(&self) -> serde_json::Value {
        let h = self.header.read();
        let kind = if self.metadata().has_parent {
            "differencing"
        } else if self.metadata().leave_block_allocated {
            "fixed"
        } else {
            "dynamic"
        };
        json!({
            "type": kind,
            "creator": self.creator,
            "block_size": self.metadata().block_size,
            "logical_sector_size": self.metadata().logical_sector_size,
            "physical_sector_size": self.metadata().physical_sector_size,
            "virtual_disk_id": self.metadata().virtual_disk_id.to_string(),
            "data_write_guid": h.data_write_guid().to_uuid().to_string(),
            "file_write_guid": h.file_write_guid().to_uuid().to_string(),
            "log_state": if self.log.dirty { format!("dirty, replayed in {}", self.log.replay) } else { "clean".to_string() },
            "log": self.log,
            "parent_locator": self.metadata().parent_locator.as_ref().map(|l| &l.entries),
            "chunk_ratio": self.bat.layout().chunk_ratio,
            "bat_entries": self.bat.layout().entries,
            "data_blocks": self.bat.layout().data_blocks,
        })
    }
}
