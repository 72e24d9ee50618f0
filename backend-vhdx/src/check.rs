//! Checking an open image: every BAT entry (states, reserved bits, offsets inside the file and
//! outside the other structures, no two blocks sharing space), the log state, and the tolerated
//! deviations found at open.

use vd_core::{CheckReport, ErrorKind, Finding, Result, Severity};

use crate::bat::BlockState;
use crate::engine::Engine;
use crate::error::warning;
use crate::report::{LogReplay, plural};

impl Engine {
    /// Checks every BAT entry and reports the log state and the warnings of the open. A dirty
    /// log counts as repaired when the image was opened read-write (the open replayed it).
    ///
    /// A truncated file is an error per missing structure and per missing block, and is never
    /// repaired: nothing is written, and the file is not extended to make missing data read as
    /// zeros.
    pub(crate) fn check(&self) -> Result<CheckReport> {
        let mut report = CheckReport::default();
        // A dirty log is one finding below; the open's note that it replayed the log in
        // memory says the same again.
        let replay_note = |w: &&vd_core::Warning| {
            self.log.dirty && w.kind == ErrorKind::ReadOnly && w.field.as_deref() == Some("log")
        };
        for w in self.warnings.iter().filter(|w| !replay_note(w)) {
            report
                .findings
                .push(Finding::from_warning(Severity::Warning, w));
        }
        for t in &self.truncated {
            report
                .findings
                .push(Finding::from_warning(Severity::Error, t));
        }
        if self.log.dirty {
            let message = format!(
                "the log holds {} that had not been replayed",
                plural(self.log.entries, "entry", "entries")
            );
            let w = warning(ErrorKind::Corrupt, "log", self.log.offset.0, message);
            report.findings.push(
                Finding::from_warning(Severity::Error, &w)
                    .repaired(self.log.replay == LogReplay::File),
            );
        }
        let layout = self.bat.layout();
        let mut used: Vec<(u64, u64, String)> = Vec::new();
        for b in 0..layout.data_blocks {
            match self.bat.block(b) {
                Ok(BlockState::Full(off) | BlockState::Partial(off)) => {
                    used.push((off, layout.block_size, format!("payload block {b}")));
                }
                Ok(_) => {}
                Err(e) => report
                    .findings
                    .push(Finding::from_error(Severity::Error, &e)),
            }
        }
        for c in 0..layout.data_blocks.div_ceil(layout.chunk_ratio) {
            if layout.has_parent {
                match self.bat.bitmap(c) {
                    Ok(Some(off)) => {
                        used.push((off, crate::format::MIB, format!("sector bitmap {c}")));
                    }
                    Ok(None) => {}
                    Err(e) => report
                        .findings
                        .push(Finding::from_error(Severity::Error, &e)),
                }
            } else if let Ok(index) = layout.bitmap_index(c)
                && index < layout.entries
                && self
                    .bat
                    .entry(index)
                    .is_ok_and(|e| e != crate::format::BatEntry::EMPTY)
            {
                let w = warning(
                    ErrorKind::Corrupt,
                    format!("BAT entry {index}"),
                    self.bat.entry_at(index),
                    format!("sector bitmap entry of chunk {c} is set in an image without a parent"),
                );
                report
                    .findings
                    .push(Finding::from_warning(Severity::Warning, &w));
            }
        }
        used.sort_by_key(|u| u.0);
        for w in used.windows(2) {
            if let [a, b] = w
                // Validated blocks lie inside the file; a saturated end still overlaps.
                && a.0.saturating_add(a.1) > b.0
            {
                let w = warning(
                    ErrorKind::Corrupt,
                    b.2.clone(),
                    b.0,
                    format!("{} at {:#x} overlaps {} at {:#x}", a.2, a.0, b.2, b.0),
                );
                report
                    .findings
                    .push(Finding::from_warning(Severity::Error, &w));
            }
        }
        Ok(report)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vd_core::{ErrorKind, Finding, OpenFlags, Severity, Storage};

    use crate::format::{BatEntry, BitmapState, MIB, PayloadState};
    use crate::test_support::{create, reopen};

    #[test]
    fn a_written_image_checks_clean() {
        let (storage, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(MIB, &[1; 4096]).unwrap();
        image.close(false).unwrap();
        let report = reopen(&storage, OpenFlags::READ_ONLY)
            .engine
            .check()
            .unwrap();
        assert!(report.is_clean(), "{report:?}");
    }

    /// Stores `entry` at `at` in the BAT and checks the image, which must find one problem.
    fn only_finding(storage: &Arc<dyn Storage>, at: u64, entry: BatEntry) -> Finding {
        storage
            .write_all_at(at, &entry.raw().to_le_bytes())
            .unwrap();
        let report = reopen(storage, OpenFlags::READ_ONLY)
            .engine
            .check()
            .unwrap();
        assert_eq!(report.findings.len(), 1, "{report:?}");
        report.findings[0].clone()
    }

    #[test]
    fn blocks_sharing_space_are_an_error_at_the_second_one() {
        let (storage, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(0, &[1; 4096]).unwrap();
        image.close(false).unwrap();
        let (bat, first) = {
            let img = reopen(&storage, OpenFlags::READ_ONLY);
            (
                img.engine.regions().bat.offset,
                img.engine.bat.entry(0).unwrap(),
            )
        };
        assert_eq!(
            first,
            BatEntry::payload(PayloadState::FullyPresent, first.file_offset())
        );
        // Block 1 claims block 0's space.
        let overlap = &only_finding(&storage, bat + 8, first);
        assert!(overlap.message.contains("overlaps"), "{overlap:?}");
        assert_eq!(
            (overlap.severity, overlap.kind),
            (Severity::Error, ErrorKind::Corrupt)
        );
        assert_eq!(overlap.field.as_deref(), Some("payload block 1"));
        assert_eq!(overlap.offset, Some(first.file_offset()));
    }

    #[test]
    fn a_sector_bitmap_entry_in_a_base_image_is_a_warning_at_its_entry() {
        // 256 MiB blocks: 16 per chunk, so 17 blocks need a sector-bitmap entry after the
        // first chunk. Nothing is written, so the image stays small in memory.
        let (storage, image) = create(17 * 256 * MIB, &[("block_size", "256M")]);
        image.close(false).unwrap();
        let (bat, layout) = {
            let img = reopen(&storage, OpenFlags::READ_ONLY);
            (img.engine.regions().bat.offset, img.layout())
        };
        assert_eq!(layout.chunk_ratio, 16);
        let index = layout.bitmap_index(0).unwrap();
        assert!(index < layout.entries, "{layout:?}");
        let stray = BatEntry::bitmap(BitmapState::Present, 0);
        let f = &only_finding(&storage, bat + 8 * index, stray);
        assert!(
            f.message.contains("sector bitmap entry of chunk 0"),
            "{f:?}"
        );
        assert_eq!(
            (f.severity, f.kind),
            (Severity::Warning, ErrorKind::Corrupt)
        );
        assert_eq!(f.field, Some(format!("BAT entry {index}")));
        assert_eq!(f.offset, Some(bat + 8 * index));
    }
}
