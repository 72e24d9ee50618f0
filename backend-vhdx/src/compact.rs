//! Compacting: moving blocks down into holes (left by discards and shrinks) and truncating the
//! file.
//!
//! Each move copies the block to free space, flushes, and only then points the BAT entry at
//! the copy through the log; the file is truncated after the last entry is applied. A crash at
//! any point leaves every entry pointing at a complete copy of its block.

use vd_core::{Error, Result};

use crate::bat::BlockState;
use crate::engine::Engine;
use crate::error::overflow;
use crate::format::{BatEntry, BitmapState, HEADER_SECTION_SIZE, MIB, PayloadState};
use crate::write::copy_range;

#[derive(Debug, Clone, Copy)]
enum Owner {
    Payload(u64, PayloadState),
    Bitmap(u64),
}

impl Engine {
    pub(crate) fn compact(&self, progress: vd_core::Progress<'_>) -> Result<()> {
        self.check_writable("compacting")?;
        let storage = self.storage.clone();
        let mut ws = self.write_state.lock();
        let layout = self.layout();
        // Everything is read and validated before the first write: `begin` checks the whole
        // BAT (refusing a truncated image) before it updates the header, and the block list
        // below reads every entry again (cached entries included).
        self.preflight(&mut ws)?;
        // No read may see a block in a place it leaves, or past the truncated end.
        let _moving = self.relocate();
        // Structures that never move.
        let regions = self.regions();
        let header = *self.header.read();
        let mut fixed: Vec<(u64, u64)> = vec![
            (0, HEADER_SECTION_SIZE),
            (regions.bat.offset, regions.bat.end()),
            (regions.metadata.offset, regions.metadata.end()),
        ];
        if header.log_length() > 0 {
            fixed.push((header.log_offset(), header.log_end()));
        }
        fixed.extend(regions.others.iter().map(|r| (r.offset, r.end())));
        let mut blocks: Vec<(u64, u64, Owner)> = Vec::new();
        for b in 0..layout.data_blocks {
            match self.bat.block(b)? {
                BlockState::Full(off) => blocks.push((
                    off,
                    layout.block_size,
                    Owner::Payload(b, PayloadState::FullyPresent),
                )),
                BlockState::Partial(off) => {
                    blocks.push((
                        off,
                        layout.block_size,
                        Owner::Payload(b, PayloadState::PartiallyPresent),
                    ));
                }
                _ => {}
            }
        }
        if layout.has_parent {
            for c in 0..layout.data_blocks.div_ceil(layout.chunk_ratio) {
                if let Some(off) = self.bat.bitmap(c)? {
                    blocks.push((off, MIB, Owner::Bitmap(c)));
                }
            }
        }
        self.begin(&mut ws)?;
        self.commit(&mut ws)?;
        blocks.sort_by_key(|b| b.0);
        let total = blocks.len() as u64;
        let overlaps_fixed = |start: u64, len: u64| {
            fixed
                .iter()
                // A saturated end lies past every structure, so it still overlaps.
                .find(|f| start < f.1 && start.saturating_add(len) > f.0)
                .copied()
        };
        let mut target = MIB;
        for (done, (off, len, owner)) in (1u64..).zip(blocks) {
            // The lowest free, 1 MiB-aligned place at or after `target`.
            while let Some(f) = overlaps_fixed(target, len) {
                target =
                    f.1.checked_next_multiple_of(MIB)
                        .ok_or_else(|| overflow("compaction target"))?;
            }
            let block_end = off.checked_add(len).ok_or_else(|| overflow("block end"))?;
            if target < off {
                copy_range(storage.as_ref(), off, target, len, "cannot move a block")?;
                let (index, entry) = match owner {
                    Owner::Payload(b, s) => {
                        (layout.payload_index(b)?, BatEntry::payload(s, target))
                    }
                    Owner::Bitmap(c) => (
                        layout.bitmap_index(c)?,
                        BatEntry::bitmap(BitmapState::Present, target),
                    ),
                };
                self.set_entry(&mut ws, index, entry)?;
                // Data is flushed before the entry that points at it (commit flushes first).
                self.commit(&mut ws)?;
                // Below `off + len`, which did not overflow.
                target = target.saturating_add(len);
            } else {
                target = target.max(block_end);
            }
            progress(done, total);
        }
        let end = fixed.iter().map(|f| f.1).fold(target, u64::max);
        if end < ws.file_end() {
            // Every entry is applied and flushed. A log left pending would say the file is
            // longer than it is about to be, and a crash before `close` would leave an image
            // whose replay is refused as truncated (LogTruncatedFile); 2.3.1.1 asks a writer
            // to end the log before it shrinks the file.
            self.end_log(&mut ws)?;
            storage
                .set_len(end)
                .and_then(|()| storage.flush())
                .map_err(|e| Error::io("cannot truncate the file", e))?;
            ws.set_file_end(end)?;
            self.bat.reset_file_len(end);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vd_core::OpenFlags;

    use crate::format::MIB;
    use crate::test_support::{create, read, reopen};

    #[test]
    fn compact_moves_blocks_into_holes_and_truncates() {
        let (s, image) = create(8 * MIB, &[("block_size", "1M")]);
        for b in 0..4u8 {
            image.write_at(u64::from(b) * MIB, &[b + 1; 4096]).unwrap();
        }
        image.flush().unwrap();
        let full = s.len().unwrap();
        image.discard(0, 2 * MIB).unwrap();
        image.compact(&mut |_, _| {}).unwrap();
        assert_eq!(s.len().unwrap(), full - 2 * MIB);
        image.close(false).unwrap();
        let again = reopen(&s, OpenFlags::READ_ONLY);
        for b in 0..4u8 {
            let want = if b < 2 { 0 } else { b + 1 };
            assert!(
                read(&again, u64::from(b) * MIB, 4096)
                    .iter()
                    .all(|&x| x == want),
                "block {b}"
            );
        }
    }
}
