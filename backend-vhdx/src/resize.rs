//! Resizing ([MS-VHDX] 2.6.2.2): the Virtual Disk Size item changes through the log, together
//! with any BAT entries that must change.
//!
//! - Growing zeros the tail of a partially used last block (so old bytes past the end can never
//!   reappear) and, in a fixed image, preallocates the new blocks. The BAT must fit in its
//!   region, or it moves to a larger region at the end of the file (copied and flushed before
//!   both region tables switch to it through the log).
//! - Shrinking is refused when the part cut off holds data; the blocks past the new end become
//!   NOT_PRESENT.

use vd_core::{Error, ErrorKind, Result};

use crate::bat::{BlockState, Forbidden, Layout};
use crate::engine::Engine;
use crate::error::{fit, overflow};
use crate::format::{
    BatEntry, MAX_BAT_SIZE, MAX_VIRTUAL_SIZE, MIB, PayloadState, REGION_TABLE_OFFSETS,
};
use crate::guid::META_VIRTUAL_DISK_SIZE;
use crate::region::build_region_table;
use crate::write::copy_range;
use crate::write_state::WriteState;

impl Engine {
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "both layouts come from Layout::from_parts (virtual sizes at most 2^46, block \
                  sizes 2^20..=2^28, entries below 2^27, so entries * 8 < 2^30); b < \
                  old.data_blocks <= 2^26, so (b + 1) * block_size <= 2^46 + 2^28; start < end \
                  because b >= new_size / block_size and b * block_size < old.virtual_size; \
                  old.data_blocks >= 1 (the virtual size is non-zero); within < block_size and \
                  off + within is inside the file (check_block)"
    )]
    pub(crate) fn resize(&self, new_size: u64) -> Result<()> {
        self.check_writable("resizing")?;
        let mut ws = self.write_state.lock();
        let old = self.layout();
        let ss = old.sector_size;
        if new_size == 0 || new_size > MAX_VIRTUAL_SIZE || !new_size.is_multiple_of(ss) {
            return Err(Error::invalid_argument(format!(
                "the new size {new_size} must be a non-zero multiple of {ss} up to 64 TiB"
            )));
        }
        if new_size == old.virtual_size {
            return Ok(());
        }
        let mut meta = self.metadata().clone();
        meta.virtual_size = new_size;
        let new = Layout::new(&meta)?;
        if new.entries * 8 > MAX_BAT_SIZE {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("a BAT for {new_size} bytes would be too large"),
            ));
        }
        let storage = self.storage.clone();
        // Every check comes before the first write (the header update of `begin_visible`):
        // the whole BAT first, then the part of the disk a shrink cuts off.
        self.preflight(&mut ws)?;
        // No read may see the BAT or a block in a place it leaves, or past a cut end.
        let _moving = self.relocate();
        if new_size < old.virtual_size {
            // Nothing past the new end may hold data.
            let first_cut = new_size / old.block_size;
            for b in first_cut..old.data_blocks {
                let state = self.bat.block(b)?;
                let start = (b * old.block_size).max(new_size);
                let end = ((b + 1) * old.block_size).min(old.virtual_size);
                if matches!(state, BlockState::Full(_) | BlockState::Partial(_)) {
                    let mut buf = vec![0u8; fit::<usize, _>(end - start, "block tail")?];
                    self.read_held(start, &mut buf)?;
                    if buf.iter().any(|&x| x != 0) {
                        return Err(Error::invalid_argument(format!(
                            "the part of the disk beyond {new_size} bytes holds data (block {b}); discard it first"
                        )));
                    }
                }
            }
        }
        self.begin_visible(&mut ws)?;
        if new.entries * 8 > self.regions().bat.length {
            self.move_bat(&mut ws, (new.entries * 8).div_ceil(MIB) * MIB)?;
        }
        {
            if new_size < old.virtual_size {
                for b in new.data_blocks..old.data_blocks {
                    self.set_entry(&mut ws, old.payload_index(b)?, BatEntry::EMPTY)?;
                }
            } else {
                // The tail of a partial last block must read as zeros once it is inside the disk.
                if !old.virtual_size.is_multiple_of(old.block_size) {
                    let b = old.data_blocks - 1;
                    if let BlockState::Full(off) = self.bat.block(b)? {
                        let within = old.virtual_size % old.block_size;
                        storage
                            .zero_range(off + within, old.block_size - within)
                            .map_err(|e| Error::io("cannot zero the old last block", e))?;
                    }
                }
                if meta.leave_block_allocated {
                    for b in old.data_blocks..new.data_blocks {
                        let off = self.allocate(&mut ws, old.block_size)?;
                        self.set_entry(
                            &mut ws,
                            new.payload_index(b)?,
                            BatEntry::payload(PayloadState::FullyPresent, off),
                        )?;
                    }
                }
            }
        }
        self.edit_metadata_locked(&mut ws, |items| {
            crate::metadata::replace_item(
                items,
                META_VIRTUAL_DISK_SIZE,
                new_size.to_le_bytes().to_vec(),
            );
            Ok(())
        })?;
        self.bat.set_layout(new);
        Ok(())
    }

    /// Moves the BAT to a larger region at the end of the file: copy, flush, then switch both
    /// region tables through the log.
    ///
    /// Only the FileWriteGuid changes for the move itself: where the BAT lives is not what the
    /// disk reads.
    fn move_bat(&self, ws: &mut WriteState, new_len: u64) -> Result<()> {
        let storage = self.storage.clone();
        self.begin(ws)?;
        self.commit(ws)?;
        let mut table = self.regions();
        let old = table.bat;
        let new_off = self.allocate(ws, new_len)?;
        let copy = old.length.min(new_len);
        copy_range(
            storage.as_ref(),
            old.offset,
            new_off,
            copy,
            "cannot copy the BAT",
        )?;
        table.bat.offset = new_off;
        table.bat.length = new_len;
        let bytes = build_region_table(&table)?;
        for copy_off in REGION_TABLE_OFFSETS {
            let mut current = vec![0u8; bytes.len()];
            storage
                .read_exact_at(copy_off, &mut current)
                .map_err(|e| Error::io("cannot read the region table", e))?;
            for (k, (a, b)) in current.chunks(4096).zip(bytes.chunks(4096)).enumerate() {
                if a != b {
                    let at = (k as u64)
                        .checked_mul(4096)
                        .and_then(|o| o.checked_add(copy_off))
                        .ok_or_else(|| overflow("region table page offset"))?;
                    ws.queue_page(at, b.to_vec());
                }
            }
        }
        // The copy is flushed by the commit before the entry that switches to it.
        self.commit(ws)?;
        let mut forbidden: Vec<Forbidden> = self
            .bat
            .forbidden()
            .into_iter()
            .filter(|f| f.start != old.offset)
            .collect();
        forbidden.push(Forbidden {
            start: new_off,
            end: new_off
                .checked_add(new_len)
                .ok_or_else(|| overflow("BAT region end"))?,
            what: "BAT region",
        });
        self.bat.relocate(new_off, forbidden);
        *self.regions.write() = table;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use vd_core::{Image, OpenFlags};

    use crate::format::MIB;
    use crate::test_support::{create, read, reopen};

    #[test]
    fn grow_keeps_data_and_the_new_part_reads_zeros() {
        let (s, image) = create(3 * MIB + 512, &[("block_size", "1M")]);
        image.write_at(3 * MIB, &[5; 512]).unwrap();
        image.resize(64 * MIB, &mut |_, _| {}).unwrap();
        image.close(false).unwrap();
        let again = reopen(&s, OpenFlags::READ_ONLY);
        assert_eq!(again.size(), 64 * MIB);
        let tail = read(&again, 3 * MIB, 4096);
        assert!(tail[..512].iter().all(|&b| b == 5));
        assert!(tail[512..].iter().all(|&b| b == 0));
    }

    #[test]
    fn shrink_refuses_to_cut_off_data() {
        let (_, image) = create(8 * MIB, &[("block_size", "1M")]);
        image.write_at(6 * MIB, &[1; 512]).unwrap();
        assert!(image.resize(4 * MIB, &mut |_, _| {}).is_err());
        assert_eq!(image.size(), 8 * MIB);
        image.discard(6 * MIB, MIB).unwrap();
        image.resize(4 * MIB, &mut |_, _| {}).unwrap();
        assert_eq!(image.size(), 4 * MIB);
    }

    #[test]
    fn growing_past_the_bat_region_moves_the_bat() {
        // 1 MiB blocks: one BAT MiB holds 131072 entries, about 128 GiB of disk.
        let (s, image) = create(MIB, &[("block_size", "1M")]);
        image.write_at(0, &[9; 512]).unwrap();
        image.resize(200 << 30, &mut |_, _| {}).unwrap();
        image.close(false).unwrap();
        let again = reopen(&s, OpenFlags::READ_ONLY);
        assert_eq!(again.size(), 200 << 30);
        assert!(again.engine.regions().bat.length >= 2 * MIB);
        assert!(read(&again, 0, 512).iter().all(|&b| b == 9));
    }
}
