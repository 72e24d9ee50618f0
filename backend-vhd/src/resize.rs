//! Resizing VHD images. Every check (the size, the 2040 GiB limit of dynamic images, data in a
//! part a shrink cuts off, room for the BAT) is made before the first write, and each step below
//! is made durable (flushed) before the next, so that a crash at any point leaves an image that
//! opens with its old size or its new one and reads what it read before.
//!
//! Fixed images (`F` the footer's place, `S` the old size, `N` the new one):
//!
//! - Growing: the footer, still saying `S`, is first copied to `N` (and the file cut to end
//!   there, should it go on past); the old footer's sectors and anything else between `S` and
//!   `N` are then zeroed; only then is the footer at `N` rewritten with the new size (one
//!   512-byte sector, in place). A fixed image whose footer lies past its size is valid (the
//!   bytes between are outside the disk), so each intermediate state opens as the old disk, and
//!   the grown part reads as zeros as soon as the new size is visible.
//! - Shrinking: the footer at `F` is rewritten in place with the new size (the data between `N`
//!   and `F` is then outside the disk), then written again at `N`, then the file is cut to end
//!   after it.
//!
//! Dynamic and differencing images:
//!
//! - Growing: BAT entries of blocks past the old size (and, in a partly used last block, the
//!   sector-bitmap bits past it) are cleared and made durable, so that nothing stale appears in
//!   the new part. Then the BAT gets room for the new blocks: in the rest of its last sector
//!   when it has spare entries there (the new entries are written as unallocated, then the
//!   header's entry count grows), else in a new BAT after the last block (the footer moves past
//!   it first, as for a new block, then the copy is written, then the header switches to it
//!   with the new count). Only then does the footer (at the end, then its copy at 0) take the
//!   new size and geometry: a reader never sees a size its BAT does not cover.
//! - Shrinking: the footer takes the new size first; then the BAT entries of blocks past it
//!   become unallocated and the bits past it in a partly cut block are cleared (their space
//!   leaks until `compact`). The BAT keeps its entries.
//!
//! A shrink is refused when the part cut off holds data (sectors that read as anything but
//! zeros from this image): discard it first, as `vd-tool resize --shrink --force` does.
//! The geometry is recomputed for the new size by the specification's algorithm.

use vd_core::{Error, ErrorKind, Mapping, Progress, Result};

use crate::format::{
    self, FOOTER_SIZE, HEADER_SIZE, MAX_CREATE_SIZE, MAX_TABLE_ENTRIES, SECTOR, UNALLOCATED,
};
use crate::{Meta, VhdImage};

/// Bytes read at a time when checking data for zeros or copying blocks.
pub(crate) const CHUNK: usize = 1 << 20;

/// Where the BAT gets room for more entries.
#[derive(Debug, Clone, Copy)]
enum BatPlan {
    /// The entries fit in the rest of the BAT's last sector.
    InPlace,
    /// A new BAT of `len` bytes at `at` (the footer's place), the footer after it.
    Move { at: u64, len: u64 },
}

fn overflow(what: &str) -> Error {
    Error::new(
        ErrorKind::OutOfRange,
        format!("{what} would pass 2^64 bytes"),
    )
}

fn sync(s: &dyn vd_core::Storage, what: &str) -> Result<()> {
    s.flush().map_err(|e| Error::io(what.to_string(), e))
}

fn put(s: &dyn vd_core::Storage, at: u64, bytes: &[u8], what: &str) -> Result<()> {
    s.write_all_at(at, bytes)
        .map_err(|e| Error::io(what.to_string(), e).with_offset(at))
}

impl VhdImage {
    /// Changes the virtual size to `new_size` (see the module docs for the order of writes).
    /// The caller holds the write lock and has flushed the dirty bitmaps and BAT entries.
    pub(crate) fn resize_with(
        &self,
        m: &mut Meta,
        new_size: u64,
        progress: Progress<'_>,
    ) -> Result<()> {
        if new_size == 0 || !new_size.is_multiple_of(SECTOR) {
            return Err(Error::invalid_argument(format!(
                "the new size {new_size} must be a non-zero multiple of 512 bytes"
            )));
        }
        if new_size != m.footer.current_size {
            if m.dynamic.is_some() {
                self.resize_dynamic(m, new_size)?;
            } else {
                self.resize_fixed(m, new_size)?;
            }
        }
        progress(1, 1);
        Ok(())
    }

    /// The stored footer with the current size `size` and the geometry of that size, checked.
    fn resized_footer(m: &Meta, size: u64) -> Result<([u8; FOOTER_SIZE], format::Footer)> {
        let mut raw = m.footer_raw;
        format::edit_footer(&mut raw, |f| {
            f.set_current_size(size);
            f.set_chs(format::chs_for(size));
        });
        let footer = format::parse_footer(&raw, m.footer_offset)?;
        Ok((raw, footer))
    }

    /// `InvalidArgument` when a sector of the disk from `from` to its end reads as anything
    /// but zeros from this image (its own data; a differencing image's parent is not read).
    pub(crate) fn refuse_data_beyond(&self, m: &Meta, from: u64) -> Result<()> {
        let size = m.footer.current_size;
        let extents = m.mapped(self.storage.as_ref(), from, size.saturating_sub(from))?;
        let mut buf = vec![0u8; CHUNK];
        for e in extents {
            let Mapping::Data {
                file_offset: Some(at),
            } = e.mapping
            else {
                continue;
            };
            let mut done = 0u64;
            while done < e.length {
                let n = e.length.saturating_sub(done).min(CHUNK as u64);
                let part = buf
                    .get_mut(..usize::try_from(n).unwrap_or(CHUNK))
                    .unwrap_or_default();
                let pos = at.saturating_add(done);
                self.storage
                    .read_exact_at(pos, part)
                    .map_err(|e| Error::io("cannot read the data", e).with_offset(pos))?;
                if let Some(i) = part.iter().position(|&b| b != 0) {
                    let disk_at = e.offset.saturating_add(done).saturating_add(i as u64);
                    let how = if m.is_diff() {
                        "write zeros over it first"
                    } else {
                        "discard it first"
                    };
                    return Err(Error::invalid_argument(format!(
                        "the part of the disk beyond {from} bytes holds data (at byte \
                         {disk_at:#x}); {how}"
                    )));
                }
                done = done.saturating_add(n);
            }
        }
        Ok(())
    }

    fn resize_fixed(&self, m: &mut Meta, n: u64) -> Result<()> {
        let s = self.storage.as_ref();
        let old = m.footer.current_size;
        let footer_at = m.footer_offset;
        let file_len = m.file_len;
        let end = n
            .checked_add(FOOTER_SIZE as u64)
            .ok_or_else(|| overflow("the image file"))?;
        let (raw, footer) = Self::resized_footer(m, n)?;
        if n < old {
            self.refuse_data_beyond(m, n)?;
            // The new size first, in the footer where it is: the disk ends at N from here on.
            put(s, footer_at, &raw, "cannot write the footer")?;
            sync(s, "cannot write the footer")?;
            put(s, n, &raw, "cannot move the footer")?;
            sync(s, "cannot move the footer")?;
            s.set_len(end)
                .map_err(|e| Error::io("cannot shorten the file", e))?;
            sync(s, "cannot shorten the file")?;
        } else {
            if footer_at != n {
                // The old footer at the new end: still the old disk, its bytes past S unused.
                put(s, n, &m.footer_raw, "cannot move the footer")?;
                sync(s, "cannot move the footer")?;
                if end < file_len {
                    s.set_len(end)
                        .map_err(|e| Error::io("cannot shorten the file", e))?;
                    sync(s, "cannot shorten the file")?;
                }
            }
            // The old footer (and anything else between S and N) becomes zeros of the disk.
            let zero_end = n.min(file_len);
            if zero_end > old {
                s.zero_range(old, zero_end.saturating_sub(old))
                    .map_err(|e| Error::io("cannot zero the grown part", e).with_offset(old))?;
                sync(s, "cannot zero the grown part")?;
            }
            put(s, n, &raw, "cannot write the footer")?;
            sync(s, "cannot write the footer")?;
        }
        m.footer_raw = raw;
        m.footer = footer;
        m.footer_offset = n;
        m.file_len = end;
        Ok(())
    }

    fn resize_dynamic(&self, m: &mut Meta, n: u64) -> Result<()> {
        if n > MAX_CREATE_SIZE {
            return Err(Error::invalid_argument(format!(
                "size {n}: a dynamic VHD holds at most 2040 GiB (use VHDX for larger disks)"
            )));
        }
        let Some(dy) = m.dynamic.as_ref() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let old = m.footer.current_size;
        let block = u64::from(dy.header.block_size);
        let needed = n.div_ceil(block);
        let needed = u32::try_from(needed)
            .ok()
            .filter(|&e| e <= MAX_TABLE_ENTRIES)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "{needed} blocks of {block} bytes: more than the {MAX_TABLE_ENTRIES} BAT \
                     entries vd reads"
                ))
            })?;
        let (raw, footer) = Self::resized_footer(m, n)?;
        if n < old {
            self.refuse_data_beyond(m, n)?;
            self.store_footer(m, raw, footer)?;
            return self.cut_blocks(m, n);
        }
        let plan = if needed > dy.header.max_table_entries {
            Some(Self::plan_bat(m, needed)?)
        } else {
            None
        };
        self.cut_blocks(m, old)?;
        if let Some(plan) = plan {
            self.grow_bat(m, needed, plan)?;
        }
        self.store_footer(m, raw, footer)
    }

    /// Writes `raw` as the footer at the end (durably), then as its copy at 0.
    fn store_footer(
        &self,
        m: &mut Meta,
        raw: [u8; FOOTER_SIZE],
        footer: format::Footer,
    ) -> Result<()> {
        let s = self.storage.as_ref();
        put(s, m.footer_offset, &raw, "cannot write the footer")?;
        sync(s, "cannot write the footer")?;
        put(s, 0, &raw, "cannot write the footer copy")?;
        sync(s, "cannot write the footer copy")?;
        m.footer_raw = raw;
        m.footer = footer;
        Ok(())
    }

    /// Makes the blocks wholly at or past `from` unallocated and clears the bits of the sectors
    /// at or past it in the block holding it, durably (bitmaps, then the BAT).
    fn cut_blocks(&self, m: &mut Meta, from: u64) -> Result<()> {
        let storage = self.storage.as_ref();
        let Some(dy) = m.dynamic.as_mut() else {
            return Ok(());
        };
        let block = u64::from(dy.header.block_size);
        // block is a power of two of at least 512.
        let first = from.checked_div(block).unwrap_or(0);
        let within = from.checked_rem(block).unwrap_or(0);
        let first = usize::try_from(first).unwrap_or(usize::MAX);
        let mut bitmap = Vec::new();
        for i in first..dy.bat.len() {
            let Some(&entry) = dy.bat.get(i) else {
                break;
            };
            if entry == UNALLOCATED {
                continue;
            }
            if i == first && within != 0 {
                let bitmap_at = u64::from(entry).saturating_mul(SECTOR);
                Meta::bitmap(dy, storage, i, bitmap_at, &mut bitmap)?;
                let sectors = block / SECTOR;
                let mut changed = false;
                for sector in within / SECTOR..sectors {
                    let Some(byte) = usize::try_from(sector / 8)
                        .ok()
                        .and_then(|b| bitmap.get_mut(b))
                    else {
                        break;
                    };
                    let mask = 0x80u8
                        .checked_shr(u32::try_from(sector % 8).unwrap_or(0))
                        .unwrap_or(0);
                    changed |= *byte & mask != 0;
                    *byte &= !mask;
                }
                if changed {
                    dy.dirty_bitmaps.insert(i, bitmap.clone());
                }
            } else if let Some(e) = dy.bat.get_mut(i) {
                *e = UNALLOCATED;
                dy.dirty_bat.insert(i);
                dy.dirty_bitmaps.remove(&i);
            }
        }
        self.flush_with(m)
    }

    /// Where the BAT finds room for `needed` entries: in its last sector when what follows it
    /// leaves that sector free, else in a new BAT where the footer is.
    fn plan_bat(m: &Meta, needed: u32) -> Result<BatPlan> {
        let Some(dy) = m.dynamic.as_ref() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let table = dy.header.table_offset;
        let table_end = table
            .checked_add(u64::from(dy.header.max_table_entries).saturating_mul(4))
            .ok_or_else(|| overflow("the BAT"))?;
        let mut room_end = table_end
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| overflow("the BAT"))?;
        // Every other structure: the footer copy and the footer, the header, the locators'
        // data and the blocks. One that reaches past the BAT's end ends the room where it
        // starts.
        let mut others: Vec<(u64, u64)> = vec![
            (0, FOOTER_SIZE as u64),
            (m.footer_offset, m.file_len.max(m.footer_offset)),
            (
                dy.header_offset,
                dy.header_offset.saturating_add(HEADER_SIZE as u64),
            ),
        ];
        for l in &dy.header.locators {
            let len = u64::from(l.length).max(1);
            others.push((l.offset, l.offset.saturating_add(len)));
        }
        let span = dy
            .bitmap_size
            .saturating_add(u64::from(dy.header.block_size));
        for &e in dy.bat.iter().filter(|&&e| e != UNALLOCATED) {
            let at = u64::from(e).saturating_mul(SECTOR);
            others.push((at, at.saturating_add(span)));
        }
        for (start, end) in others {
            if end > table_end && start < room_end {
                room_end = start.max(table_end);
            }
        }
        let want = table
            .checked_add(u64::from(needed).saturating_mul(4))
            .ok_or_else(|| overflow("the BAT"))?;
        if want <= room_end {
            return Ok(BatPlan::InPlace);
        }
        let at = m
            .footer_offset
            .checked_next_multiple_of(SECTOR)
            .ok_or_else(|| overflow("the BAT"))?;
        let len = u64::from(needed).saturating_mul(4).next_multiple_of(SECTOR);
        at.checked_add(len)
            .and_then(|e| e.checked_add(FOOTER_SIZE as u64))
            .ok_or_else(|| overflow("the image file"))?;
        Ok(BatPlan::Move { at, len })
    }

    /// Gives the BAT `needed` entries (the new ones unallocated) as `plan` says, durably, then
    /// the header its new entry count (and place).
    fn grow_bat(&self, m: &mut Meta, needed: u32, plan: BatPlan) -> Result<()> {
        let s = self.storage.as_ref();
        let footer_raw = m.footer_raw;
        let Some(dy) = m.dynamic.as_mut() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let count = usize::try_from(needed)
            .map_err(|_| Error::invalid_argument("BAT too large for this machine"))?;
        let old_count = dy.bat.len();
        let mut bat = dy.bat.clone();
        bat.resize(count, UNALLOCATED);
        let table_offset = match plan {
            BatPlan::InPlace => {
                let at = dy
                    .header
                    .table_offset
                    .saturating_add((old_count as u64).saturating_mul(4));
                let fresh: Vec<u8> = bat
                    .get(old_count..)
                    .unwrap_or_default()
                    .iter()
                    .flat_map(|e| e.to_be_bytes())
                    .collect();
                put(s, at, &fresh, "cannot write the BAT")?;
                sync(s, "cannot write the BAT")?;
                dy.header.table_offset
            }
            BatPlan::Move { at, len } => {
                // The footer first, past the new BAT: the file always ends in a footer.
                let footer_at = at.saturating_add(len);
                put(s, footer_at, &footer_raw, "cannot move the footer")?;
                sync(s, "cannot move the footer")?;
                m.footer_offset = footer_at;
                m.file_len = footer_at.saturating_add(FOOTER_SIZE as u64);
                let mut bytes: Vec<u8> = bat.iter().flat_map(|e| e.to_be_bytes()).collect();
                bytes.resize(usize::try_from(len).unwrap_or(bytes.len()), 0xFF);
                put(s, at, &bytes, "cannot write the BAT")?;
                sync(s, "cannot write the BAT")?;
                at
            }
        };
        let file_len = m.file_len;
        let Some(dy) = m.dynamic.as_mut() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let mut raw = dy.header_raw;
        format::edit_header(&mut raw, |h| {
            h.set_max_table_entries(needed);
            h.set_table_offset(table_offset);
        });
        let header = format::parse_header(&raw, dy.header_offset, file_len)?;
        put(s, dy.header_offset, &raw, "cannot write the dynamic header")?;
        sync(s, "cannot write the dynamic header")?;
        dy.header_raw = raw;
        dy.header = header;
        dy.bat = bat;
        Ok(())
    }
}

/// Helpers for the resize and compact tests: images made by `create` in memory.
#[cfg(test)]
pub(crate) mod support {
    use std::path::Path;
    use std::sync::Arc;

    use vd_core::{CreateParams, Image, ImageFlags, MemFileSystem, OpenFlags, Registry, Storage};

    pub const KIB: u64 = 1 << 10;
    pub const MIB: u64 = 1 << 20;

    pub struct Fs {
        pub fs: Arc<MemFileSystem>,
        pub reg: Registry,
    }

    impl Fs {
        pub fn new() -> Self {
            let fs = Arc::new(MemFileSystem::new());
            let reg = Registry::builtin_with_provider(fs.clone());
            Self { fs, reg }
        }

        /// A new image at `path` of `size` bytes with `-o` options `opts`.
        pub fn create(&self, path: &str, size: u64, opts: &[(&str, &str)]) -> Box<dyn Image> {
            let params = CreateParams {
                size,
                options: opts
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
                ..CreateParams::default()
            };
            self.reg
                .create("vhd", Path::new(path), &params, None, true)
                .unwrap()
        }

        /// A differencing image at `path` over the image at `parent`.
        pub fn child(&self, path: &str, parent: &str) -> Box<dyn Image> {
            let p = self
                .reg
                .open(Path::new(parent), OpenFlags::READ_ONLY)
                .unwrap();
            let params = CreateParams {
                image_flags: ImageFlags::DIFF,
                options: [("block_size".to_string(), "512K".to_string())].into(),
                ..CreateParams::default()
            };
            self.reg
                .create(
                    "vhd",
                    Path::new(path),
                    &params,
                    Some((Path::new(parent), p.as_ref())),
                    true,
                )
                .unwrap()
        }

        pub fn open(&self, path: &str, flags: OpenFlags) -> Box<dyn Image> {
            self.reg.open(Path::new(path), flags).unwrap()
        }

        pub fn storage(&self, path: &str) -> Arc<dyn Storage> {
            self.fs.get(Path::new(path)).unwrap()
        }

        pub fn bytes(&self, path: &str) -> Vec<u8> {
            let s = self.storage(path);
            let mut b = vec![0u8; usize::try_from(s.len().unwrap()).unwrap()];
            s.read_exact_at(0, &mut b).unwrap();
            b
        }
    }

    pub fn read(img: &dyn Image, at: u64, len: u64) -> Vec<u8> {
        let mut b = vec![0xEEu8; usize::try_from(len).unwrap()];
        img.read_at(at, &mut b).unwrap();
        b
    }

    pub fn all(img: &dyn Image, at: u64, len: u64, value: u8) -> bool {
        read(img, at, len).iter().all(|&b| b == value)
    }

    /// The dynamic header's (table offset, max table entries), from the file.
    pub fn bat_of(bytes: &[u8]) -> (u64, u32) {
        let h = &bytes[512..1536];
        (
            u64::from_be_bytes(h[16..24].try_into().unwrap()),
            u32::from_be_bytes(h[28..32].try_into().unwrap()),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::support::{Fs, KIB, MIB, all, bat_of, read};
    use crate::format::{self, FOOTER_SIZE, parse_footer};
    use vd_core::{ErrorKind, Geometry, Image, OpenFlags};

    fn resize(img: &dyn Image, size: u64) -> vd_core::Result<()> {
        let mut calls = 0;
        let r = img.resize(size, &mut |_, _| calls += 1);
        if r.is_ok() {
            assert!(calls > 0, "progress is reported");
        }
        r
    }

    /// The footer at the end of `bytes`, which must be valid and say `size`.
    fn end_footer(bytes: &[u8], size: u64) {
        let at = bytes.len() - FOOTER_SIZE;
        let f = parse_footer(bytes[at..].try_into().unwrap(), at as u64).unwrap();
        assert_eq!(f.current_size, size);
        assert_eq!(f.chs, format::chs_for(size));
    }

    #[test]
    fn a_fixed_image_grows_with_zeros_where_its_footer_was() {
        let fs = Fs::new();
        let img = fs.create("/f.vhd", 4 * MIB, &[("subformat", "fixed")]);
        img.write_at(4 * MIB - 512, &[7; 512]).unwrap();
        resize(img.as_ref(), 6 * MIB).unwrap();
        assert_eq!(img.size(), 6 * MIB);
        assert!(all(img.as_ref(), 4 * MIB - 512, 512, 7));
        assert!(all(img.as_ref(), 4 * MIB, 2 * MIB, 0), "the grown part");
        let g = img.pchs_geometry().unwrap();
        let (c, h, s) = format::chs_for(6 * MIB);
        assert_eq!(
            g,
            Geometry {
                cylinders: u32::from(c),
                heads: u32::from(h),
                sectors: u32::from(s)
            }
        );
        img.write_at(6 * MIB - 512, &[9; 512]).unwrap();
        img.close(false).unwrap();
        let bytes = fs.bytes("/f.vhd");
        assert_eq!(bytes.len() as u64, 6 * MIB + 512);
        end_footer(&bytes, 6 * MIB);
        let img = fs.open("/f.vhd", OpenFlags::READ_ONLY);
        assert_eq!(img.size(), 6 * MIB);
        assert!(all(img.as_ref(), 4 * MIB, 2 * MIB - 512, 0));
        assert!(all(img.as_ref(), 6 * MIB - 512, 512, 9));
    }

    #[test]
    fn a_fixed_image_shrinks_only_over_zeros() {
        let fs = Fs::new();
        let img = fs.create("/f.vhd", 4 * MIB, &[("subformat", "fixed")]);
        img.write_at(0, &[1; 4096]).unwrap();
        img.write_at(3 * MIB, &[2; 512]).unwrap();
        let before = fs.bytes("/f.vhd");
        let e = resize(img.as_ref(), 2 * MIB).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("holds data"), "{e}");
        assert_eq!(fs.bytes("/f.vhd"), before, "refused before any write");
        img.discard(2 * MIB, 2 * MIB).unwrap();
        resize(img.as_ref(), 2 * MIB).unwrap();
        img.close(false).unwrap();
        let bytes = fs.bytes("/f.vhd");
        assert_eq!(bytes.len() as u64, 2 * MIB + 512);
        end_footer(&bytes, 2 * MIB);
        let img = fs.open("/f.vhd", OpenFlags::empty());
        assert!(all(img.as_ref(), 0, 4096, 1));
        // Growing again reads zeros, not the old bytes.
        resize(img.as_ref(), 4 * MIB).unwrap();
        assert!(all(img.as_ref(), 2 * MIB, 2 * MIB, 0));
    }

    #[test]
    fn bad_sizes_and_read_only_images_are_refused_before_any_write() {
        let fs = Fs::new();
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        let before = fs.bytes("/d.vhd");
        for (size, kind) in [
            (0, ErrorKind::InvalidArgument),
            (4 * MIB + 100, ErrorKind::InvalidArgument),
            (format::MAX_CREATE_SIZE + 512, ErrorKind::InvalidArgument),
        ] {
            assert_eq!(resize(img.as_ref(), size).unwrap_err().kind(), kind);
        }
        // 2040 GiB itself is accepted by the checks (the BAT would need 4 M entries of 512K:
        // within the limit) but is not tried here.
        assert_eq!(fs.bytes("/d.vhd"), before);
        img.close(false).unwrap();
        let ro = fs.open("/d.vhd", OpenFlags::READ_ONLY);
        assert_eq!(
            resize(ro.as_ref(), 8 * MIB).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
        assert_eq!(
            ro.compact(&mut |_, _| {}).unwrap_err().kind(),
            ErrorKind::ReadOnly
        );
    }

    #[test]
    fn a_dynamic_image_grows_in_its_bat_sector_then_moves_its_bat() {
        let fs = Fs::new();
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        img.write_at(0, &[1; 4096]).unwrap();
        img.write_at(4 * MIB - 512, &[2; 512]).unwrap();
        let (table, entries) = bat_of(&fs.bytes("/d.vhd"));
        assert_eq!(entries, 8);
        // 128 entries fit in the BAT's sector: 64 MiB.
        resize(img.as_ref(), 64 * MIB).unwrap();
        let bytes = fs.bytes("/d.vhd");
        assert_eq!(bat_of(&bytes), (table, 128), "grown in place");
        end_footer(&bytes, 64 * MIB);
        assert_eq!(&bytes[..512], &bytes[bytes.len() - 512..], "the copy at 0");
        img.write_at(40 * MIB, &[3; 512]).unwrap();
        // 129 entries do not: the BAT moves past the last block.
        let len = bytes.len() as u64;
        resize(img.as_ref(), 64 * MIB + 512).unwrap();
        let bytes = fs.bytes("/d.vhd");
        let (moved, entries) = bat_of(&bytes);
        assert_eq!(entries, 129);
        assert!(moved > table && moved >= len - 512, "moved to {moved:#x}");
        end_footer(&bytes, 64 * MIB + 512);
        assert_eq!(
            &bytes[moved as usize + 128 * 4..moved as usize + 129 * 4],
            &[0xFF; 4],
            "the new entry is unallocated"
        );
        img.write_at(64 * MIB, &[4; 512]).unwrap();
        img.close(false).unwrap();
        let img = fs.open("/d.vhd", OpenFlags::READ_ONLY);
        assert_eq!(img.size(), 64 * MIB + 512);
        assert!(all(img.as_ref(), 0, 4096, 1));
        assert!(all(img.as_ref(), 4 * MIB - 512, 512, 2));
        assert!(all(img.as_ref(), 4 * MIB, 36 * MIB, 0));
        assert!(all(img.as_ref(), 40 * MIB, 512, 3));
        assert!(all(img.as_ref(), 40 * MIB + 512, 24 * MIB - 512, 0));
        assert!(all(img.as_ref(), 64 * MIB, 512, 4));
    }

    #[test]
    fn a_dynamic_image_shrinks_over_zeros_and_grows_back_to_zeros() {
        let fs = Fs::new();
        let img = fs.create("/d.vhd", 4 * MIB, &[("block_size", "512K")]);
        img.write_at(0, &[1; 4096]).unwrap();
        // Block 2 holds data on both sides of 1.25 MiB; block 6 is wholly past it.
        img.write_at(MIB, &[2; 512 * KIB as usize]).unwrap();
        img.write_at(3 * MIB, &[3; 4096]).unwrap();
        let e = resize(img.as_ref(), MIB + 256 * KIB).unwrap_err();
        assert!(e.to_string().contains("holds data"), "{e}");
        img.discard(MIB + 256 * KIB, 3 * MIB - 256 * KIB).unwrap();
        resize(img.as_ref(), MIB + 256 * KIB).unwrap();
        assert_eq!(img.size(), MIB + 256 * KIB);
        img.close(false).unwrap();
        let bytes = fs.bytes("/d.vhd");
        end_footer(&bytes, MIB + 256 * KIB);
        // Block 6's entry is released (the BAT keeps its 8 entries).
        let (table, entries) = bat_of(&bytes);
        assert_eq!(entries, 8);
        let e6 = &bytes[table as usize + 24..table as usize + 28];
        assert_eq!(e6, &[0xFF; 4]);
        let img = fs.open("/d.vhd", OpenFlags::empty());
        assert!(all(img.as_ref(), MIB, 256 * KIB, 2));
        resize(img.as_ref(), 4 * MIB).unwrap();
        assert!(all(img.as_ref(), 0, 4096, 1));
        assert!(all(img.as_ref(), MIB, 256 * KIB, 2));
        assert!(all(img.as_ref(), MIB + 256 * KIB, 3 * MIB - 256 * KIB, 0));
    }

    #[test]
    fn growing_clears_stale_bits_past_the_old_end() {
        // A block whose bits past the disk's end are set over data (as another writer could
        // leave it): growing must not make that data appear.
        let fs = Fs::new();
        let img = fs.create("/d.vhd", MIB, &[("block_size", "512K")]);
        img.write_at(512 * KIB, &[5; 512 * KIB as usize]).unwrap();
        img.discard(768 * KIB, 256 * KIB).unwrap();
        resize(img.as_ref(), 768 * KIB).unwrap();
        img.close(false).unwrap();
        // Set every bit of block 1's bitmap again and put data behind them.
        let s = fs.storage("/d.vhd");
        let bytes = fs.bytes("/d.vhd");
        let (table, _) = bat_of(&bytes);
        let e1 = u32::from_be_bytes(
            bytes[table as usize + 4..table as usize + 8]
                .try_into()
                .unwrap(),
        );
        let at = u64::from(e1) * 512;
        s.write_all_at(at, &[0xFF; 512]).unwrap();
        s.write_all_at(at + 512 + 256 * KIB, &[6; 256 * KIB as usize])
            .unwrap();
        let img = fs.open("/d.vhd", OpenFlags::empty());
        assert!(all(img.as_ref(), 512 * KIB, 256 * KIB, 5));
        resize(img.as_ref(), MIB).unwrap();
        assert!(all(img.as_ref(), 768 * KIB, 256 * KIB, 0));
        img.close(false).unwrap();
        let img = fs.open("/d.vhd", OpenFlags::READ_ONLY);
        assert!(all(img.as_ref(), 768 * KIB, 256 * KIB, 0));
        assert!(all(img.as_ref(), 512 * KIB, 256 * KIB, 5));
    }

    #[test]
    fn a_differencing_image_grows_and_keeps_reading_its_parent() {
        let fs = Fs::new();
        let p = fs.create("/p.vhd", 2 * MIB, &[("block_size", "512K")]);
        p.write_at(0, &[0x77; 2 * MIB as usize]).unwrap();
        p.close(false).unwrap();
        let c = fs.child("/c.vhd", "/p.vhd");
        c.write_at(512, &[1; 512]).unwrap();
        resize(c.as_ref(), 200 * MIB).unwrap();
        c.close(false).unwrap();
        let disk = vd_core::Disk::open(
            &fs.reg,
            std::path::Path::new("/c.vhd"),
            &vd_core::DiskOptions::default(),
        )
        .unwrap();
        assert_eq!(disk.size(), 200 * MIB);
        let mut b = vec![0u8; 4096];
        disk.read_at(0, &mut b).unwrap();
        assert!(b[..512].iter().all(|&x| x == 0x77));
        assert!(b[512..1024].iter().all(|&x| x == 1));
        assert!(b[1024..].iter().all(|&x| x == 0x77));
        let (_, entries) = bat_of(&fs.bytes("/c.vhd"));
        assert_eq!(entries, 400);
        let top = disk.top();
        assert!(read(top, 199 * MIB, 512).iter().all(|&x| x == 0));
    }
}
