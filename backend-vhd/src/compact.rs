//! Compacting dynamic and differencing VHD images: blocks that hold nothing are released, the
//! remaining blocks move down into the holes, and the file is cut after the last structure.
//!
//! Released are the blocks of the BAT that lie past the disk's end, whose sector bitmap has no
//! bit set within the disk, and, in a dynamic image (not a differencing one, where a clear bit
//! reads the parent), whose sectors with a set bit all hold zeros. Space that no BAT entry
//! references (left by a crash after a block was allocated, or by a resize) is reclaimed by
//! the move.
//!
//! The order that keeps the image whole through a crash:
//!
//! 1. Everything is read and checked first: every block and structure lies inside the file and
//!    none overlaps another (the image is refused before any write otherwise).
//! 2. The released blocks' BAT entries become unallocated, durably. Each reads as it did
//!    (zeros, or the parent), so no crash can change what the disk reads.
//! 3. Each move copies a block's bitmap and data to the lowest free place below it (never
//!    overlapping its old place), flushes, then points its BAT entry there and flushes; only
//!    then is the old place free for the next move.
//! 4. The footer is written at the new end and flushed before the file is cut after it.
//!
//! Fixed images have nothing to release (every sector of the disk is in the file):
//! compacting one is `NotSupported`, as Hyper-V's `Optimize-VHD` refuses fixed disks.

use vd_core::{Error, ErrorKind, Progress, Result};

use crate::format::{FOOTER_SIZE, HEADER_SIZE, MAX_LOCATOR_LEN, SECTOR, UNALLOCATED};
use crate::resize::CHUNK;
use crate::{Meta, VhdImage};

/// A structure of the file that compaction keeps in place: `[start, end)` is what it holds,
/// `[start, reserve)` the space it owns (a locator's reserved space, the BAT's last sector).
#[derive(Debug, Clone, Copy)]
struct Fixed {
    start: u64,
    end: u64,
    reserve: u64,
    what: &'static str,
}

/// The locator entries' (offset, data length, data space) from the stored dynamic header.
fn raw_locators(header: &[u8; HEADER_SIZE]) -> Vec<(u64, u64, u64)> {
    let be32 = |b: &[u8]| -> u64 {
        let mut a = [0u8; 4];
        a.copy_from_slice(b.get(..4).unwrap_or(&[0; 4]));
        u64::from(u32::from_be_bytes(a))
    };
    let mut out = Vec::new();
    for i in 0..8usize {
        let at = 576usize.saturating_add(i.saturating_mul(24));
        let Some(e) = header.get(at..at.saturating_add(24)) else {
            break;
        };
        if e.get(..4).unwrap_or_default() == [0u8; 4] {
            continue;
        }
        let mut off = [0u8; 8];
        off.copy_from_slice(e.get(16..24).unwrap_or(&[0; 8]));
        let space = be32(e.get(4..8).unwrap_or_default());
        let length = be32(e.get(8..12).unwrap_or_default());
        out.push((u64::from_be_bytes(off), length, space));
    }
    out
}

fn corrupt(at: u64, message: String) -> Error {
    Error::corrupt("layout", at, message)
}

impl VhdImage {
    /// Compacts a dynamic or differencing image (see the module docs). The caller holds the
    /// write lock and has flushed the dirty bitmaps and BAT entries.
    pub(crate) fn compact_with(&self, m: &mut Meta, progress: Progress<'_>) -> Result<()> {
        let storage = self.storage.as_ref();
        let size = m.footer.current_size;
        let diff = m.is_diff();
        let footer_at = m.footer_offset;
        let file_len = m.file_len;
        let Some(dy) = m.dynamic.as_ref() else {
            return Err(Error::not_supported(
                "compacting a fixed VHD (every sector of its disk is in the file: there is \
                 nothing to release)",
            ));
        };
        let block = u64::from(dy.header.block_size);
        let span = dy.bitmap_size.saturating_add(block);
        let table = dy.header.table_offset;
        let table_end =
            table.saturating_add(u64::from(dy.header.max_table_entries).saturating_mul(4));
        let mut fixed = vec![
            Fixed {
                start: 0,
                end: FOOTER_SIZE as u64,
                reserve: 0,
                what: "footer copy",
            },
            Fixed {
                start: dy.header_offset,
                end: dy.header_offset.saturating_add(HEADER_SIZE as u64),
                reserve: 0,
                what: "dynamic header",
            },
            Fixed {
                start: table,
                end: table_end,
                reserve: table_end.next_multiple_of(SECTOR),
                what: "BAT",
            },
        ];
        for (offset, length, space) in raw_locators(&dy.header_raw) {
            // The space is in sectors as Windows writes it (bytes in some writers: then the
            // reserve is larger than needed, and bounded by what follows below).
            let room = space
                .saturating_mul(SECTOR)
                .min(u64::from(MAX_LOCATOR_LEN))
                .max(length.next_multiple_of(SECTOR));
            fixed.push(Fixed {
                start: offset,
                end: offset.saturating_add(length),
                reserve: offset.saturating_add(room),
                what: "parent locator",
            });
        }
        // Every allocated block: (offset, BAT index).
        let mut blocks: Vec<(u64, usize)> = dy
            .bat
            .iter()
            .enumerate()
            .filter(|&(_, &e)| e != UNALLOCATED)
            .map(|(i, &e)| (u64::from(e).saturating_mul(SECTOR), i))
            .collect();
        blocks.sort_unstable();
        fixed.retain(|f| f.reserve.max(f.end) > f.start);

        // 1. Nothing overlaps, everything lies before the footer.
        let mut all: Vec<(u64, u64, String)> = fixed
            .iter()
            .filter(|f| f.end > f.start)
            .map(|f| (f.start, f.end, f.what.to_string()))
            .chain(
                blocks
                    .iter()
                    .map(|&(at, i)| (at, at.saturating_add(span), format!("block {i}"))),
            )
            .collect();
        all.push((footer_at, file_len.max(footer_at), "footer".to_string()));
        all.sort_by_key(|a| (a.0, a.1));
        for pair in all.windows(2) {
            if let [(_, a_end, a), (b_start, _, b)] = pair
                && a_end > b_start
            {
                return Err(corrupt(
                    *b_start,
                    format!("{b} at {b_start:#x} overlaps {a}: compacting could lose data"),
                ));
            }
        }
        // A reserve ends where the next structure starts.
        for f in &mut fixed {
            let next = all
                .iter()
                .map(|a| a.0)
                .filter(|&s| s >= f.end.max(f.start.saturating_add(1)))
                .min()
                .unwrap_or(footer_at);
            f.reserve = f.reserve.min(next).max(f.end);
        }

        // Which blocks hold nothing the disk reads.
        let mut release = Vec::new();
        let mut bitmap = Vec::new();
        let mut data = vec![0u8; CHUNK];
        for &(at, i) in &blocks {
            let first = (i as u64).saturating_mul(block);
            // Sectors of this block inside the disk.
            let inside = size.saturating_sub(first).min(block) / SECTOR;
            Meta::bitmap(dy, storage, i, at, &mut bitmap)?;
            let bit = |s: u64| {
                usize::try_from(s / 8)
                    .ok()
                    .and_then(|b| bitmap.get(b))
                    .is_some_and(|&byte| {
                        byte.checked_shl(u32::try_from(s % 8).unwrap_or(0))
                            .is_some_and(|b| b & 0x80 != 0)
                    })
            };
            let mut holds = (0..inside).any(bit);
            if holds && !diff {
                holds = false;
                let data_at = at.saturating_add(dy.bitmap_size);
                let mut done = 0u64;
                let len = inside.saturating_mul(SECTOR);
                while done < len && !holds {
                    let n = len.saturating_sub(done).min(CHUNK as u64);
                    let part = data
                        .get_mut(..usize::try_from(n).unwrap_or(CHUNK))
                        .unwrap_or_default();
                    let pos = data_at.saturating_add(done);
                    storage
                        .read_exact_at(pos, part)
                        .map_err(|e| Error::io("cannot read a block", e).with_offset(pos))?;
                    holds = part.chunks(SECTOR as usize).enumerate().any(|(k, c)| {
                        bit((done / SECTOR).saturating_add(k as u64)) && c.iter().any(|&b| b != 0)
                    });
                    done = done.saturating_add(n);
                }
            }
            if !holds {
                release.push(i);
            }
        }

        // 2. Release, durably, before any place is reused.
        if let Some(dy) = m.dynamic.as_mut() {
            for &i in &release {
                if let Some(e) = dy.bat.get_mut(i) {
                    *e = UNALLOCATED;
                    dy.dirty_bat.insert(i);
                }
            }
        }
        self.flush_with(m)?;
        blocks.retain(|(_, i)| !release.contains(i));

        // 3. Move each block down into the lowest free place below it.
        let total = blocks.len() as u64;
        let mut target = 0u64;
        let mut buf = vec![0u8; CHUNK];
        for (done, &(at, i)) in (1u64..).zip(&blocks) {
            while let Some(f) = fixed
                .iter()
                .find(|f| target < f.reserve.max(f.end) && target.saturating_add(span) > f.start)
            {
                target = f.reserve.max(f.end).next_multiple_of(SECTOR);
            }
            let block_end = at.saturating_add(span);
            if target.saturating_add(span) <= at {
                self.copy_block(at, target, span, &mut buf)?;
                let sector = u32::try_from(target / SECTOR)
                    .ok()
                    .filter(|&s| s != UNALLOCATED)
                    .ok_or_else(|| {
                        Error::new(ErrorKind::OutOfRange, "block beyond the BAT's reach")
                    })?;
                if let Some(dy) = m.dynamic.as_mut()
                    && let Some(e) = dy.bat.get_mut(i)
                {
                    *e = sector;
                    dy.dirty_bat.insert(i);
                }
                // The copy is flushed before the entry that points at it, and the entry
                // before the old place is reused.
                self.flush_with(m)?;
                target = target.saturating_add(span);
            } else {
                target = target.max(block_end);
            }
            progress(done, total);
        }

        // 4. The footer at the new end, then the cut.
        let end = fixed
            .iter()
            .map(|f| f.reserve.max(f.end))
            .fold(target, u64::max)
            .next_multiple_of(SECTOR);
        if end < footer_at {
            let io = |e| Error::io("cannot move the footer", e).with_offset(end);
            storage.write_all_at(end, &m.footer_raw).map_err(io)?;
            storage.flush().map_err(io)?;
            let new_len = end.saturating_add(FOOTER_SIZE as u64);
            storage
                .set_len(new_len)
                .and_then(|()| storage.flush())
                .map_err(|e| Error::io("cannot truncate the file", e))?;
            m.footer_offset = end;
            m.file_len = new_len;
        }
        if total == 0 {
            progress(1, 1);
        }
        Ok(())
    }

    /// Copies `len` bytes from `from` to `to` (the ranges do not overlap).
    fn copy_block(&self, from: u64, to: u64, len: u64, buf: &mut [u8]) -> Result<()> {
        let mut done = 0u64;
        while done < len {
            let n = len.saturating_sub(done).min(buf.len() as u64);
            let part = buf
                .get_mut(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            let (src, dst) = (from.saturating_add(done), to.saturating_add(done));
            self.storage
                .read_exact_at(src, part)
                .map_err(|e| Error::io("cannot read a block", e).with_offset(src))?;
            self.storage
                .write_all_at(dst, part)
                .map_err(|e| Error::io("cannot move a block", e).with_offset(dst))?;
            done = done.saturating_add(n);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::resize::support::{Fs, KIB, MIB, all, bat_of};
    use vd_core::{Disk, DiskOptions, ErrorKind, Image, OpenFlags};

    const SPAN: u64 = 512 * KIB + 512;

    fn compact(img: &dyn Image) {
        img.compact(&mut |done, total| assert!(done <= total))
            .unwrap();
    }

    fn entry(bytes: &[u8], i: usize) -> u32 {
        let (table, _) = bat_of(bytes);
        let at = table as usize + 4 * i;
        u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap())
    }

    #[test]
    fn discarded_and_zero_blocks_are_released_and_the_rest_move_down() {
        let fs = Fs::new();
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        for b in 0..5u8 {
            img.write_at(u64::from(b) * 512 * KIB, &[b + 1; 4096])
                .unwrap();
        }
        // Block 5: written with zeros only; block 6: data past a discarded part.
        img.write_at(5 * 512 * KIB, &[0; 8192]).unwrap();
        img.write_at(6 * 512 * KIB + 4096, &[7; 512]).unwrap();
        img.flush().unwrap();
        let full = fs.storage("/d.vhd").len().unwrap();
        img.discard(0, MIB).unwrap();
        compact(img.as_ref());
        // Blocks 0, 1 (discarded) and 5 (zeros) are gone; 2, 3, 4 and 6 moved down.
        let bytes = fs.bytes("/d.vhd");
        assert_eq!(bytes.len() as u64, full - 3 * SPAN);
        for i in [0, 1, 5] {
            assert_eq!(entry(&bytes, i), u32::MAX, "block {i}");
        }
        let first = entry(&fs.bytes("/d.vhd"), 2);
        assert_eq!(
            u64::from(first) * 512,
            2048,
            "the first block follows the BAT"
        );
        img.write_at(7 * 512 * KIB, &[8; 512]).unwrap();
        img.close(false).unwrap();
        let img = fs.open("/d.vhd", OpenFlags::READ_ONLY);
        assert!(all(img.as_ref(), 0, MIB, 0));
        for b in 2..5u8 {
            assert!(
                all(img.as_ref(), u64::from(b) * 512 * KIB, 4096, b + 1),
                "{b}"
            );
        }
        assert!(all(img.as_ref(), 5 * 512 * KIB, 512 * KIB, 0));
        assert!(all(img.as_ref(), 6 * 512 * KIB + 4096, 512, 7));
        assert!(all(img.as_ref(), 7 * 512 * KIB, 512, 8));
    }

    #[test]
    fn space_no_entry_references_is_reclaimed() {
        let fs = Fs::new();
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        for b in 0..3u8 {
            img.write_at(u64::from(b) * 512 * KIB, &[b + 1; 512])
                .unwrap();
        }
        img.close(false).unwrap();
        // A crash before the flush leaves a block that no entry names: forget block 0's entry.
        let s = fs.storage("/d.vhd");
        let (table, _) = bat_of(&fs.bytes("/d.vhd"));
        s.write_all_at(table, &[0xFF; 4]).unwrap();
        let before = s.len().unwrap();
        let img = fs.open("/d.vhd", OpenFlags::empty());
        compact(img.as_ref());
        assert_eq!(s.len().unwrap(), before - SPAN);
        img.close(false).unwrap();
        let img = fs.open("/d.vhd", OpenFlags::READ_ONLY);
        assert!(all(img.as_ref(), 0, 512 * KIB, 0));
        assert!(all(img.as_ref(), 512 * KIB, 512, 2));
        assert!(all(img.as_ref(), MIB, 512, 3));
        // Nothing left to reclaim: a second compaction changes nothing.
        let bytes = fs.bytes("/d.vhd");
        drop(img);
        let img = fs.open("/d.vhd", OpenFlags::empty());
        compact(img.as_ref());
        img.close(false).unwrap();
        assert_eq!(fs.bytes("/d.vhd"), bytes);
    }

    #[test]
    fn blocks_after_a_moved_bat_move_into_the_holes_before_it() {
        let fs = Fs::new();
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        img.write_at(0, &[1; 512]).unwrap();
        img.write_at(512 * KIB, &[2; 512]).unwrap();
        img.resize(128 * MIB, &mut |_, _| {}).unwrap();
        img.write_at(100 * MIB, &[3; 512]).unwrap();
        img.discard(0, 512 * KIB).unwrap();
        compact(img.as_ref());
        img.close(false).unwrap();
        let bytes = fs.bytes("/d.vhd");
        let (table, entries) = bat_of(&bytes);
        assert_eq!(entries, 256);
        // The old BAT's place (sector 3) is free: block 1 moves there, block 200 after it,
        // below the new BAT, which stays where it is.
        assert_eq!(entry(&bytes, 1), 3);
        assert_eq!(entry(&bytes, 200), 3 + 1025);
        assert_eq!(bytes.len() as u64, table + 1024 + 512);
        let img = fs.open("/d.vhd", OpenFlags::READ_ONLY);
        assert!(all(img.as_ref(), 0, 512, 0));
        assert!(all(img.as_ref(), 512 * KIB, 512, 2));
        assert!(all(img.as_ref(), 100 * MIB, 512, 3));
    }

    #[test]
    fn a_differencing_image_keeps_its_zero_sectors_and_releases_clear_blocks() {
        let fs = Fs::new();
        let p = fs.create("/p.vhd", 2 * MIB, &[("block_size", "512K")]);
        p.write_at(0, &[0x77; 2 * MIB as usize]).unwrap();
        p.close(false).unwrap();
        let c = fs.child("/c.vhd", "/p.vhd");
        // Block 0: zeros over the parent's data (kept); block 1: data.
        c.write_at(0, &[0; 512]).unwrap();
        c.write_at(512 * KIB, &[1; 512]).unwrap();
        c.close(false).unwrap();
        // Block 2 allocated with a clear bitmap (as a crash after allocation leaves it).
        let s = fs.storage("/c.vhd");
        let bytes = fs.bytes("/c.vhd");
        let (table, _) = bat_of(&bytes);
        let footer_at = bytes.len() as u64 - 512;
        s.write_all_at(footer_at + SPAN, &bytes[bytes.len() - 512..])
            .unwrap();
        s.write_all_at(footer_at, &[0; 512]).unwrap();
        s.write_all_at(
            table + 8,
            &u32::try_from(footer_at / 512).unwrap().to_be_bytes(),
        )
        .unwrap();
        let c = fs.open("/c.vhd", OpenFlags::empty());
        let before = s.len().unwrap();
        compact(c.as_ref());
        assert_eq!(s.len().unwrap(), before - SPAN);
        c.close(false).unwrap();
        let disk = Disk::open(
            &fs.reg,
            std::path::Path::new("/c.vhd"),
            &DiskOptions::default(),
        )
        .unwrap();
        let mut b = vec![0u8; 2 * MIB as usize];
        disk.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0), "the child's zeros");
        assert!(b[512..512 * 1024].iter().all(|&x| x == 0x77));
        assert!(b[512 * 1024..512 * 1024 + 512].iter().all(|&x| x == 1));
        assert!(b[512 * 1024 + 512..].iter().all(|&x| x == 0x77));
    }

    #[test]
    fn fixed_images_are_not_compacted_and_overlaps_are_refused() {
        let fs = Fs::new();
        let img = fs.create("/f.vhd", MIB, &[("subformat", "fixed")]);
        assert_eq!(
            img.compact(&mut |_, _| {}).unwrap_err().kind(),
            ErrorKind::NotSupported
        );
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        img.write_at(0, &[1; 512]).unwrap();
        img.write_at(512 * KIB, &[2; 512]).unwrap();
        img.close(false).unwrap();
        // Two entries naming one block: compacting could lose data, so nothing is written.
        let s = fs.storage("/d.vhd");
        let bytes = fs.bytes("/d.vhd");
        let (table, _) = bat_of(&bytes);
        s.write_all_at(table + 8, &bytes[table as usize..table as usize + 4])
            .unwrap();
        let before = fs.bytes("/d.vhd");
        let img = fs.open("/d.vhd", OpenFlags::empty());
        let e = img.compact(&mut |_, _| {}).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert_eq!(fs.bytes("/d.vhd"), before);
    }
}
