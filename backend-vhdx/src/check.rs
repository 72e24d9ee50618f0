//! Checking an open image: the redundant copies (both headers, both region tables), every BAT
//! entry (states, reserved bits, offsets inside the file and outside the other structures, no
//! two blocks sharing space), the log state, and the tolerated deviations found at open; and
//! the one repair besides the log replay of a read-write open: rewriting a damaged redundant
//! copy from the good one.

use vd_core::{CheckReport, Error, ErrorKind, Finding, Result, Severity};

use crate::bat::BlockState;
use crate::engine::Engine;
use crate::error::{CopyFault, io_at, io_err, warning};
use crate::format::REGION_TABLE_OFFSETS;
use crate::header::{HeaderUpdate, invalid_slots, update_headers};
use crate::region::read_copies;
use crate::report::{LogReplay, plural};

impl Engine {
    /// [`repair`](Engine::repair) as a dry run: reports, writes nothing.
    #[cfg(test)]
    pub(crate) fn check(&self) -> Result<CheckReport> {
        self.repair(true)
    }

    /// Checks the image (see [`check_structures`](Engine::check_structures)) and reports each
    /// damaged redundant copy the open found as an error: a header or region table copy that
    /// fails its checks, two headers with one sequence number that differ, two region tables
    /// that differ. A valid header older than the other is how the update procedure leaves
    /// them ([MS-VHDX] 2.2.2.1), not a problem.
    ///
    /// Unless `dry_run`, the damaged copies are rewritten from the good ones
    /// ([`repair_copies`](Engine::repair_copies)), and each finding says whether its copy is
    /// sound afterwards. Nothing is written when another error was found, or when the headers
    /// tie (which one is right cannot be told): the findings say why.
    ///
    /// # Errors
    /// I/O errors; `ReadOnly` when a repair is due on an image opened read-only.
    pub(crate) fn repair(&self, dry_run: bool) -> Result<CheckReport> {
        let mut report = self.check_structures()?;
        let mut copies: Vec<Finding> = self
            .damaged
            .iter()
            .map(|d| Finding::from_warning(Severity::Error, &d.warning))
            .collect();
        if !dry_run && !self.damaged.is_empty() {
            let other_errors = report
                .findings
                .iter()
                .filter(|f| f.severity == Severity::Error && !f.repaired)
                .count();
            let refusal = if self.damaged.iter().any(|d| d.fault == CopyFault::HeaderTie) {
                Some("the headers tie, so neither can be trusted over the other".to_string())
            } else if other_errors > 0 {
                Some(format!(
                    "the image has {} besides",
                    plural(other_errors, "other error", "other errors")
                ))
            } else {
                None
            };
            match refusal {
                Some(why) => {
                    for f in &mut copies {
                        f.message =
                            format!("{}; not repaired ({why}): nothing was written", f.message);
                    }
                }
                None => {
                    self.repair_copies()?;
                    let file_len = self
                        .file
                        .len()
                        .map_err(|e| io_err("cannot read the file size", e))?;
                    let headers = invalid_slots(self.file.as_ref(), file_len)?;
                    let tables = read_copies(self.file.as_ref())?;
                    for (f, d) in copies.iter_mut().zip(&self.damaged) {
                        f.repaired = match d.fault {
                            CopyFault::Header(slot) => headers.get(slot) == Some(&false),
                            CopyFault::HeaderTie => false,
                            CopyFault::RegionTable(_) | CopyFault::RegionTablesDiffer => {
                                tables.agree
                            }
                        };
                        if f.repaired {
                            f.message = format!("{}; rewritten from the good copy", f.message);
                        }
                    }
                }
            }
        }
        report.findings.splice(0..0, copies);
        Ok(report)
    }

    /// Rewrites the damaged redundant copies from the good ones, flushed, as the first change
    /// of a write session: the session's header update ([MS-VHDX] 2.2.2.1: a new FileWriteGuid,
    /// SequenceNumber + 1 into the non-current slot, which is the damaged one, flushed, then
    /// the same into the other slot) leaves both headers valid; then, if the region tables
    /// disagree, the copy in use (the one the open validated) is written over the other, and
    /// flushed. The session start checks the whole BAT first and refuses a damaged one before
    /// any write.
    ///
    /// # Errors
    /// `ReadOnly`; the BAT's first problem; `Corrupt` when the region table in use is no
    /// longer valid in the file; I/O errors.
    fn repair_copies(&self) -> Result<()> {
        self.check_writable("repairing a damaged header or region table")?;
        let mut ws = self.write_state.lock();
        let started = ws.started;
        self.begin(&mut ws)?;
        let file_len = self
            .file
            .len()
            .map_err(|e| io_err("cannot read the file size", e))?;
        if started && invalid_slots(self.storage.as_ref(), file_len)?.contains(&true) {
            // The session's header update happened before this repair: one more update
            // writes the damaged (non-current) slot, then the other.
            let mut header = self.header.write();
            *header = update_headers(&self.storage, &header, HeaderUpdate::default())?;
        }
        let tables = read_copies(self.storage.as_ref())?;
        if !tables.agree {
            let good = self.regions.read().copy;
            let bad = good ^ 1;
            let (good_n, bad_n) = if good == 0 { (1, 2) } else { (2, 1) };
            let (Some(&true), Some(bytes), Some(&at)) = (
                tables.valid.get(good),
                tables.bytes.get(good),
                REGION_TABLE_OFFSETS.get(bad),
            ) else {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "region table copy {good_n} in use is no longer valid in the file: \
                         not copied over copy {bad_n}"
                    ),
                ));
            };
            self.storage
                .write_all_at(at, bytes)
                .and_then(|()| self.storage.flush())
                .map_err(|e| io_at("region table", at, e))?;
        }
        Ok(())
    }

    /// Checks every BAT entry and reports the log state and the other warnings of the open. A
    /// dirty log counts as repaired when the image was opened read-write (the open replayed
    /// it).
    ///
    /// A truncated file is an error per missing structure and per missing block, and is never
    /// repaired: nothing is written, and the file is not extended to make missing data read as
    /// zeros.
    fn check_structures(&self) -> Result<CheckReport> {
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

    use vd_core::{ErrorKind, Finding, Image, OpenFlags, Severity, Storage};
    use zerocopy::IntoBytes;

    use crate::checksum::crc32c_with_zero_field;
    use crate::error::CopyFault;
    use crate::format::{
        BatEntry, BitmapState, HEADER_OFFSETS, HEADER_SECTION_SIZE, MIB, PayloadState,
        REGION_TABLE_OFFSETS, REGION_TABLE_SIZE,
    };
    use crate::guid::Guid;
    use crate::header::{ActiveHeader, invalid_slots, read_headers};
    use crate::region::read_copies;
    use crate::test_support::{create, read, reopen};

    /// The whole file.
    fn bytes(storage: &Arc<dyn Storage>) -> Vec<u8> {
        let mut b = vec![0u8; usize::try_from(storage.len().unwrap()).unwrap()];
        storage.read_exact_at(0, &mut b).unwrap();
        b
    }

    /// A 4 MiB image with 1 MiB blocks, 0x5a over its second MiB, closed.
    fn written() -> Arc<dyn Storage> {
        let (storage, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(MIB, &[0x5a; 1 << 20]).unwrap();
        image.close(false).unwrap();
        storage
    }

    /// Changes one bit of the byte at `at`.
    fn flip(storage: &Arc<dyn Storage>, at: u64) {
        let mut b = [0u8];
        storage.read_exact_at(at, &mut b).unwrap();
        storage.write_all_at(at, &[b[0] ^ 1]).unwrap();
    }

    /// The check of a read-only open, which must write nothing.
    fn dry_check(storage: &Arc<dyn Storage>) -> Vec<Finding> {
        let before = bytes(storage);
        let img = reopen(storage, OpenFlags::READ_ONLY);
        let report = img.engine.check().unwrap();
        Box::new(img).close(false).unwrap();
        assert!(bytes(storage) == before, "a check changed the file");
        report.findings
    }

    /// The repair of a read-write open.
    fn repair(storage: &Arc<dyn Storage>) -> Vec<Finding> {
        let img = reopen(storage, OpenFlags::empty());
        let report = img.engine.repair(false).unwrap();
        Box::new(img).close(false).unwrap();
        report.findings
    }

    #[test]
    fn a_damaged_copy_is_an_error_and_a_repair_rewrites_it_from_the_good_one() {
        let [h1, h2] = HEADER_OFFSETS;
        let [r1, r2] = REGION_TABLE_OFFSETS;
        for (copy, field, fault) in [
            (h1, "header 1", CopyFault::Header(0)),
            (h2, "header 2", CopyFault::Header(1)),
            (r1, "region table 1", CopyFault::RegionTable(0)),
            (r2, "region table 2", CopyFault::RegionTable(1)),
        ] {
            let storage = written();
            // One byte of the copy's checksum.
            flip(&storage, copy + 4);
            let before = bytes(&storage);
            let disk = read(&reopen(&storage, OpenFlags::READ_ONLY), 0, 4 << 20);
            assert!(disk[1 << 20..2 << 20].iter().all(|&b| b == 0x5a), "{field}");

            let img = reopen(&storage, OpenFlags::READ_ONLY);
            assert_eq!(img.engine.damaged.len(), 1, "{field}");
            assert_eq!(img.engine.damaged[0].fault, fault);
            // A read-only open cannot repair, and says so before writing.
            let e = img.engine.repair(false).unwrap_err();
            assert_eq!(e.kind(), ErrorKind::ReadOnly, "{field}: {e}");
            drop(img);
            let found = dry_check(&storage);
            assert_eq!(found.len(), 1, "{field}: {found:?}");
            let f = &found[0];
            assert_eq!(
                (f.severity, f.kind, f.field.as_deref(), f.offset, f.repaired),
                (
                    Severity::Error,
                    ErrorKind::Corrupt,
                    Some(field),
                    Some(copy),
                    false
                ),
                "{f:?}"
            );
            assert!(f.message.contains(field), "{f:?}");

            let fixed = repair(&storage);
            assert_eq!(fixed.len(), 1, "{field}: {fixed:?}");
            assert!(fixed[0].repaired, "{field}: {fixed:?}");
            let after = bytes(&storage);
            // Only the header section changed, and the copy is sound again.
            assert_eq!(after.len(), before.len());
            let end = usize::try_from(HEADER_SECTION_SIZE).unwrap();
            assert!(
                after[end..] == before[end..],
                "{field}: beyond the header section"
            );
            assert_ne!(after, before, "{field}: nothing was written");
            let len = storage.len().unwrap();
            assert_eq!(invalid_slots(storage.as_ref(), len).unwrap(), [false; 2]);
            let tables = read_copies(storage.as_ref()).unwrap();
            assert_eq!((tables.valid, tables.agree), ([true; 2], true));
            assert!(tables.bytes[0] == tables.bytes[1], "{field}");
            assert!(dry_check(&storage).is_empty(), "{field}");
            let img = reopen(&storage, OpenFlags::READ_ONLY | OpenFlags::STRICT);
            assert!(img.engine.damaged.is_empty(), "{field}");
            assert!(read(&img, 0, 4 << 20) == disk, "{field}: the disk changed");
        }
    }

    #[test]
    fn region_tables_that_differ_are_an_error_and_copy_1_is_written_over_copy_2() {
        let storage = written();
        let [r1, r2] = REGION_TABLE_OFFSETS;
        let mut table = vec![0u8; REGION_TABLE_SIZE];
        storage.read_exact_at(r2, &mut table).unwrap();
        // Entry 0's Required flag, then the checksum: a valid table listing other regions.
        table[16 + 28] ^= 1;
        let sum = crc32c_with_zero_field(&table, 4);
        table[4..8].copy_from_slice(&sum.to_le_bytes());
        storage.write_all_at(r2, &table).unwrap();

        let found = dry_check(&storage);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(
            (
                found[0].field.as_deref(),
                found[0].offset,
                found[0].severity
            ),
            (Some("region table 2"), Some(r2), Severity::Error)
        );
        assert!(found[0].message.contains("differ"), "{found:?}");
        let fixed = repair(&storage);
        assert!(fixed.len() == 1 && fixed[0].repaired, "{fixed:?}");
        let mut first = vec![0u8; REGION_TABLE_SIZE];
        storage.read_exact_at(r1, &mut first).unwrap();
        storage.read_exact_at(r2, &mut table).unwrap();
        assert!(first == table, "copy 2 is copy 1 again");
        assert!(dry_check(&storage).is_empty());
    }

    #[test]
    fn headers_that_tie_are_an_error_and_never_repaired() {
        let storage = written();
        let len = storage.len().unwrap();
        let active = read_headers(storage.as_ref(), len, true).unwrap().active;
        let other = ActiveHeader {
            slot: active.slot ^ 1,
            file_write_guid: Guid::from_uuid(uuid::Uuid::new_v4()),
            ..active
        };
        storage
            .write_all_at(HEADER_OFFSETS[other.slot], other.to_wire().as_bytes())
            .unwrap();
        let found = dry_check(&storage);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].severity, Severity::Error);
        assert!(found[0].message.contains("sequence number"), "{found:?}");
        let before = bytes(&storage);
        let kept = repair(&storage);
        assert!(bytes(&storage) == before, "a tie was written over");
        assert!(kept.len() == 1 && !kept[0].repaired, "{kept:?}");
        assert!(kept[0].message.contains("not repaired"), "{kept:?}");
    }

    #[test]
    fn a_damaged_copy_of_an_image_with_other_errors_is_left_as_it_is() {
        let storage = written();
        let (bat, first) = {
            let img = reopen(&storage, OpenFlags::READ_ONLY);
            (
                img.engine.regions().bat.offset,
                img.engine.bat.entry(1).unwrap(),
            )
        };
        // Block 0 claims block 1's space, and header 1 is damaged.
        storage
            .write_all_at(bat, &first.raw().to_le_bytes())
            .unwrap();
        flip(&storage, HEADER_OFFSETS[0] + 4);
        let before = bytes(&storage);
        let kept = repair(&storage);
        assert!(bytes(&storage) == before, "a damaged image was written to");
        assert_eq!(kept.len(), 2, "{kept:?}");
        assert!(kept.iter().all(|f| !f.repaired), "{kept:?}");
        assert_eq!(kept[0].field.as_deref(), Some("header 1"));
        assert!(
            kept[0]
                .message
                .contains("not repaired (the image has 1 other error besides)"),
            "{kept:?}"
        );
    }

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
