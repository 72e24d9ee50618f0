//! Writing VHD images. VHD has no log, so the order of the writes is what keeps an image whole
//! through a crash:
//!
//! 1. A new block goes where the footer was. The footer is first written again past the new
//!    blocks and made durable, so the file always ends in a valid footer.
//! 2. The data is written into the block.
//! 3. The block's sector bitmap is changed in memory only. [`Image::flush`] makes the data
//!    durable, then writes the changed bitmaps, makes them durable, then writes the changed BAT
//!    entries and makes them durable.
//!
//! So a BAT entry on disk always points to a block whose bitmap is on disk, and a bitmap bit on
//! disk always covers data on disk. A crash loses the writes no flush covered and leaks the
//! space of blocks allocated since the last flush; it never makes a sector read anything but
//! what was flushed there or written there since.

use std::path::Path;

use vd_core::{Error, ErrorKind, Image, Mapping, OpenFlags, Result, check_range};

use crate::format::{self, FOOTER_SIZE, SECTOR, UNALLOCATED};
use crate::{Dynamic, Meta, VhdImage, io_err};

/// The most bytes of changed sector bitmaps kept in memory between flushes (4096 bitmaps of
/// 2 MiB blocks): past this, a write flushes them itself.
const MAX_DIRTY_BITMAP_BYTES: u64 = 2 << 20;

/// `bits` `[first, first + count)` of a most-significant-bit-first bitmap set to `value`;
/// whether any bit changed.
fn set_bits(bitmap: &mut [u8], first: u64, count: u64, value: bool) -> bool {
    let mut changed = false;
    for bit in first..first.saturating_add(count) {
        let Some(byte) = usize::try_from(bit / 8)
            .ok()
            .and_then(|i| bitmap.get_mut(i))
        else {
            break;
        };
        // bit % 8 < 8.
        let mask = 0x80u8
            .checked_shr(u32::try_from(bit % 8).unwrap_or(0))
            .unwrap_or(0);
        let new = if value { *byte | mask } else { *byte & !mask };
        changed |= new != *byte;
        *byte = new;
    }
    changed
}

impl VhdImage {
    /// `ReadOnly` unless the image was opened for writing.
    pub(crate) fn writable(&self) -> Result<()> {
        if self.open_flags().contains(OpenFlags::READ_ONLY) {
            return Err(Error::read_only("writing").with_path(&self.path));
        }
        if self.meta.read().footer_from_copy {
            return Err(Error::new(
                ErrorKind::Corrupt,
                "the footer at the end of the file is damaged (the copy at 0 reads); nothing \
                 is written until `vd-tool check -r all` restores it",
            )
            .with_field("footer")
            .with_path(&self.path));
        }
        Ok(())
    }

    pub(crate) fn read_with(&self, m: &Meta, offset: u64, buf: &mut [u8]) -> Result<()> {
        let extents = m.mapped(self.storage.as_ref(), offset, buf.len() as u64)?;
        for e in extents {
            // The extents tile [offset, offset + buf.len()).
            let from = usize::try_from(e.offset.saturating_sub(offset)).unwrap_or(usize::MAX);
            let to = usize::try_from(e.length)
                .ok()
                .and_then(|l| from.checked_add(l))
                .unwrap_or(usize::MAX);
            let part = buf
                .get_mut(from..to)
                .ok_or_else(|| Error::corrupt("map", e.offset, "extent outside the request"))?;
            match e.mapping {
                Mapping::Data {
                    file_offset: Some(at),
                } => self
                    .storage
                    .read_exact_at(at, part)
                    .map_err(|e| Error::io("read failed", e).with_offset(at))?,
                _ => part.fill(0),
            }
        }
        Ok(())
    }

    /// Writes into a fixed image: in place.
    pub(crate) fn write_fixed(&self, m: &Meta, offset: u64, buf: &[u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, m.footer.current_size)?;
        self.storage
            .write_all_at(offset, buf)
            .map_err(|e| Error::io("write failed", e).with_offset(offset))
    }

    pub(crate) fn write_with(&self, m: &mut Meta, offset: u64, buf: &[u8]) -> Result<()> {
        let len = buf.len() as u64;
        check_range(offset, len, m.footer.current_size)?;
        if len == 0 {
            return Ok(());
        }
        if m.dynamic.is_none() {
            return self.write_fixed(m, offset, buf);
        }
        // Within the disk, whose size is a whole number of sectors: no overflow.
        let end = offset.saturating_add(len);
        let start = offset.saturating_sub(offset % SECTOR);
        let wide_end = end.next_multiple_of(SECTOR);
        if start == offset && wide_end == end {
            return self.write_sectors(m, offset, buf);
        }
        if m.is_diff() {
            return Err(Error::invalid_argument(format!(
                "a differencing VHD is written in whole 512-byte sectors ({len} bytes at {offset})"
            )));
        }
        // Fill the partial sectors at the edges with what they read now.
        let wide_len = usize::try_from(wide_end.saturating_sub(start))
            .map_err(|_| Error::invalid_argument("write too large"))?;
        let mut wide = vec![0u8; wide_len];
        let sector = SECTOR as usize;
        let last = wide_len.saturating_sub(sector);
        if let Some(first) = wide.get_mut(..sector) {
            self.read_with(m, start, first)?;
        }
        if let Some(tail) = wide.get_mut(last..) {
            self.read_with(m, wide_end.saturating_sub(SECTOR), tail)?;
        }
        let from = usize::try_from(offset.saturating_sub(start)).unwrap_or(0);
        wide.get_mut(from..from.saturating_add(buf.len()))
            .ok_or_else(|| Error::invalid_argument("write too large"))?
            .copy_from_slice(buf);
        self.write_sectors(m, start, &wide)
    }

    /// Writes whole sectors into a dynamic or differencing image.
    fn write_sectors(&self, m: &mut Meta, offset: u64, buf: &[u8]) -> Result<()> {
        let Some(dy) = m.dynamic.as_ref() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let block = u64::from(dy.header.block_size);
        let end = offset.saturating_add(buf.len() as u64);
        // block is a power of two of at least 512.
        let first = offset.checked_div(block).unwrap_or(0);
        let last = end.saturating_sub(1).checked_div(block).unwrap_or(0);
        let missing: Vec<usize> = (first..=last)
            .filter_map(|i| usize::try_from(i).ok())
            .filter(|&i| dy.bat.get(i).is_none_or(|&e| e == UNALLOCATED))
            .collect();
        if !missing.is_empty() {
            self.allocate(m, &missing)?;
        }
        let storage = self.storage.as_ref();
        let Some(dy) = m.dynamic.as_mut() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let mut pos = offset;
        while pos < end {
            let index = pos.checked_div(block).unwrap_or(0);
            let block_start = index.saturating_mul(block);
            let piece_end = block_start.saturating_add(block).min(end);
            let i = usize::try_from(index).unwrap_or(usize::MAX);
            let entry = dy.bat.get(i).copied().unwrap_or(UNALLOCATED);
            let bitmap_at = u64::from(entry).saturating_mul(SECTOR);
            let in_block = pos.saturating_sub(block_start);
            let data_at = bitmap_at
                .saturating_add(dy.bitmap_size)
                .saturating_add(in_block);
            let from = usize::try_from(pos.saturating_sub(offset)).unwrap_or(usize::MAX);
            let n = usize::try_from(piece_end.saturating_sub(pos)).unwrap_or(usize::MAX);
            let part = buf
                .get(from..from.saturating_add(n))
                .ok_or_else(|| Error::invalid_argument("write outside the buffer"))?;
            storage
                .write_all_at(data_at, part)
                .map_err(|e| Error::io("write failed", e).with_offset(data_at))?;
            Self::mark(dy, storage, i, bitmap_at, in_block, n as u64, true)?;
            pos = piece_end;
        }
        if (dy.dirty_bitmaps.len() as u64).saturating_mul(dy.bitmap_size) > MAX_DIRTY_BITMAP_BYTES {
            // Bounds the memory held between flushes.
            self.flush_with(m)?;
        }
        Ok(())
    }

    /// Sets (or clears) the bits of `len` bytes from `in_block` in block `index`'s bitmap,
    /// in memory; the bitmap is written at the next flush.
    fn mark(
        dy: &mut Dynamic,
        storage: &dyn vd_core::Storage,
        index: usize,
        bitmap_at: u64,
        in_block: u64,
        len: u64,
        value: bool,
    ) -> Result<()> {
        let mut bitmap = Vec::new();
        Meta::bitmap(dy, storage, index, bitmap_at, &mut bitmap)?;
        if set_bits(&mut bitmap, in_block / SECTOR, len / SECTOR, value) {
            dy.dirty_bitmaps.insert(index, bitmap);
        }
        Ok(())
    }

    /// Places blocks `missing` where the footer is, in order, and moves the footer past them
    /// (durably, before anything overwrites the old one). Their bitmaps (all set in a dynamic
    /// image, whose new space reads as zeros; all clear in a differencing one) and BAT entries
    /// wait for the next flush.
    fn allocate(&self, m: &mut Meta, missing: &[usize]) -> Result<()> {
        let Some(dy) = m.dynamic.as_ref() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let span = dy
            .bitmap_size
            .saturating_add(u64::from(dy.header.block_size));
        let first_at = m.footer_offset.next_multiple_of(SECTOR);
        let mut at = first_at;
        let mut entries = Vec::with_capacity(missing.len());
        for _ in missing {
            let sector = u32::try_from(at / SECTOR)
                .ok()
                .filter(|&s| s != UNALLOCATED)
                .ok_or_else(|| {
                    Error::new(
                        ErrorKind::OutOfRange,
                        "the image file would pass 2 TiB, the most a VHD's BAT addresses",
                    )
                })?;
            entries.push(sector);
            at = at.checked_add(span).ok_or_else(|| {
                Error::new(
                    ErrorKind::OutOfRange,
                    "the image file would pass 2^64 bytes",
                )
            })?;
        }
        self.storage
            .write_all_at(at, &m.footer_raw)
            .map_err(|e| Error::io("cannot move the footer", e).with_offset(at))?;
        self.storage
            .flush()
            .map_err(|e| Error::io("cannot move the footer", e).with_offset(at))?;
        let diff = m.is_diff();
        let Some(dy) = m.dynamic.as_mut() else {
            return Err(Error::invalid_argument("not a dynamic image"));
        };
        let bitmap =
            vec![if diff { 0 } else { 0xFF }; usize::try_from(dy.bitmap_size).unwrap_or(0)];
        for (&i, &sector) in missing.iter().zip(&entries) {
            if let Some(e) = dy.bat.get_mut(i) {
                *e = sector;
                dy.dirty_bat.insert(i);
                dy.dirty_bitmaps.insert(i, bitmap.clone());
            }
        }
        m.footer_offset = at;
        m.file_len = at.saturating_add(FOOTER_SIZE as u64);
        Ok(())
    }

    pub(crate) fn flush_with(&self, m: &mut Meta) -> Result<()> {
        let s = self.storage.as_ref();
        let sync = |what: &str| s.flush().map_err(|e| Error::io(what.to_string(), e));
        sync("cannot flush the data")?;
        let Some(dy) = m.dynamic.as_mut() else {
            return Ok(());
        };
        if dy.dirty_bitmaps.is_empty() && dy.dirty_bat.is_empty() {
            return Ok(());
        }
        for (&i, bitmap) in &dy.dirty_bitmaps {
            let at = dy
                .bat
                .get(i)
                .map_or(0, |&e| u64::from(e).saturating_mul(SECTOR));
            s.write_all_at(at, bitmap)
                .map_err(|e| Error::io("cannot write a sector bitmap", e).with_offset(at))?;
        }
        if !dy.dirty_bat.is_empty() {
            sync("cannot flush the sector bitmaps")?;
        }
        // Each changed 512-byte sector of the BAT, once.
        let per_sector = (SECTOR / 4) as usize;
        let sectors: std::collections::BTreeSet<usize> = dy
            .dirty_bat
            .iter()
            .map(|i| i.checked_div(per_sector).unwrap_or(0))
            .collect();
        for sector in sectors {
            let from = sector.saturating_mul(per_sector);
            let to = from.saturating_add(per_sector).min(dy.bat.len());
            let bytes: Vec<u8> = dy
                .bat
                .get(from..to)
                .unwrap_or_default()
                .iter()
                .flat_map(|e| e.to_be_bytes())
                .collect();
            let at = dy
                .header
                .table_offset
                .saturating_add((from as u64).saturating_mul(4));
            s.write_all_at(at, &bytes)
                .map_err(|e| Error::io("cannot write the BAT", e).with_offset(at))?;
        }
        sync("cannot flush the BAT")?;
        dy.dirty_bitmaps.clear();
        dy.dirty_bat.clear();
        Ok(())
    }

    /// Changes the footer with `edit`, then stores it at the end (made durable) and in the copy
    /// at 0 of a dynamic or differencing image.
    pub(crate) fn edit_footer(
        &self,
        edit: impl FnOnce(&mut format::FooterFields<'_>),
    ) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        let mut raw = m.footer_raw;
        format::edit_footer(&mut raw, edit);
        let footer = self.at(format::parse_footer(&raw, m.footer_offset))?;
        let io = |e| io_err("cannot write the footer", &self.path, e);
        let at = m.footer_offset;
        self.storage.write_all_at(at, &raw).map_err(io)?;
        self.storage.flush().map_err(io)?;
        if m.dynamic.is_some() {
            self.storage.write_all_at(0, &raw).map_err(io)?;
            self.storage.flush().map_err(io)?;
        }
        m.footer_raw = raw;
        m.footer = footer;
        m.file_len = m.file_len.max(at.saturating_add(FOOTER_SIZE as u64));
        Ok(())
    }

    /// Changes the dynamic header of a differencing image with `edit` and stores it durably.
    pub(crate) fn edit_header(
        &self,
        edit: impl FnOnce(&mut format::HeaderFields<'_>),
    ) -> Result<()> {
        self.writable()?;
        let mut m = self.meta.write();
        self.at(self.edit_header_with(&mut m, edit))
    }

    fn edit_header_with(
        &self,
        m: &mut Meta,
        edit: impl FnOnce(&mut format::HeaderFields<'_>),
    ) -> Result<()> {
        let file_len = m.file_len;
        let diff = m.is_diff();
        let Some(dy) = m.dynamic.as_mut().filter(|_| diff) else {
            return Err(Error::not_supported(
                "parent fields of images without a parent",
            ));
        };
        let mut raw = dy.header_raw;
        format::edit_header(&mut raw, edit);
        let header = format::parse_header(&raw, dy.header_offset, file_len)?;
        let io = |e| Error::io("cannot write the dynamic header", e).with_offset(dy.header_offset);
        self.storage
            .write_all_at(dy.header_offset, &raw)
            .map_err(io)?;
        self.storage.flush().map_err(io)?;
        dy.header_raw = raw;
        dy.header = header;
        Ok(())
    }

    /// Records the parent at `name` (a path relative to this image's folder, or absolute):
    /// the locators' data first (durably), then the header with their lengths and the Parent
    /// Unicode Name. A locator keeps the sectors it has; a path that does not fit is refused
    /// before anything is written.
    pub(crate) fn set_parent_with(&self, m: &mut Meta, name: &str) -> Result<()> {
        let diff = m.is_diff();
        let Some(dy) = m.dynamic.as_ref().filter(|_| diff) else {
            return Err(Error::not_supported(
                "parent file names of images without a parent",
            ));
        };
        let target = self.provider.resolve(&self.path, Path::new(name));
        let relative = vd_core::relative_windows_path(&self.path, &target).ok_or_else(|| {
            Error::invalid_argument("cannot express the parent path relative to the child")
        })?;
        let absolute = self
            .provider
            .canonicalize(&target)
            .unwrap_or_else(|_| target.clone());
        let absolute = crate::create::windows_path(&absolute.to_string_lossy());
        let mut writes = Vec::new();
        for l in &dy.header.locators {
            let path = match &l.code {
                b"W2ru" => &relative,
                b"W2ku" => &absolute,
                _ => continue,
            };
            let data = format::encode_locator(path);
            let room = u64::from(l.length).next_multiple_of(SECTOR);
            if data.len() as u64 > room {
                return Err(Error::invalid_argument(format!(
                    "the parent path {path:?} needs {} bytes, but the {} locator has {room}",
                    data.len(),
                    l.code.escape_ascii()
                )));
            }
            writes.push((l.code, l.offset, data));
        }
        let io = |e| Error::io("cannot write a parent locator", e);
        for (_, at, data) in &writes {
            self.storage.write_all_at(*at, data).map_err(io)?;
        }
        self.storage.flush().map_err(io)?;
        let file_name = target
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        self.edit_header_with(m, |h| {
            h.set_parent_unicode_name(&file_name);
            for (code, _, data) in &writes {
                // Bounded by the locator's room, checked above.
                h.set_locator_length(*code, u32::try_from(data.len()).unwrap_or(0));
            }
        })
    }

    pub(crate) fn discard_with(&self, m: &mut Meta, offset: u64, len: u64) -> Result<()> {
        check_range(offset, len, m.footer.current_size)?;
        let end = offset.saturating_add(len);
        if m.dynamic.is_none() {
            return self
                .storage
                .zero_range(offset, len)
                .map_err(|e| Error::io("cannot zero", e).with_offset(offset));
        }
        if m.is_diff() {
            return Err(Error::not_supported(
                "discard in a differencing VHD (a cleared sector reads its parent's data)",
            ));
        }
        // Whole sectors inside the range; partial ones at the edges get zeros written.
        let inner_start = offset.next_multiple_of(SECTOR);
        let inner_end = end.saturating_sub(end % SECTOR);
        if inner_start >= inner_end {
            let zeros = vec![0u8; usize::try_from(len).unwrap_or(0)];
            return self.write_with(m, offset, &zeros);
        }
        for (a, b) in [(offset, inner_start), (inner_end, end)] {
            if b > a {
                let zeros = vec![0u8; usize::try_from(b.saturating_sub(a)).unwrap_or(0)];
                self.write_with(m, a, &zeros)?;
            }
        }
        let storage = self.storage.as_ref();
        let Some(dy) = m.dynamic.as_mut() else {
            return Ok(());
        };
        let block = u64::from(dy.header.block_size);
        let mut pos = inner_start;
        while pos < inner_end {
            let index = pos.checked_div(block).unwrap_or(0);
            let block_start = index.saturating_mul(block);
            let piece_end = block_start.saturating_add(block).min(inner_end);
            let i = usize::try_from(index).unwrap_or(usize::MAX);
            let entry = dy.bat.get(i).copied().unwrap_or(UNALLOCATED);
            if entry != UNALLOCATED {
                let bitmap_at = u64::from(entry).saturating_mul(SECTOR);
                let in_block = pos.saturating_sub(block_start);
                let n = piece_end.saturating_sub(pos);
                Self::mark(dy, storage, i, bitmap_at, in_block, n, false)?;
                // The sectors read as zeros by their clear bits; the data goes back to the
                // file system (a crash that keeps the old bits reads these zeros too).
                let data_at = bitmap_at
                    .saturating_add(dy.bitmap_size)
                    .saturating_add(in_block);
                storage
                    .discard(data_at, n)
                    .map_err(|e| Error::io("cannot release", e).with_offset(data_at))?;
            }
            pos = piece_end;
        }
        Ok(())
    }

    pub(crate) fn write_zeroes_with(&self, m: &mut Meta, offset: u64, len: u64) -> Result<()> {
        if !m.is_diff() {
            return self.discard_with(m, offset, len);
        }
        check_range(offset, len, m.footer.current_size)?;
        const CHUNK: u64 = 1 << 20;
        let zeros = vec![0u8; usize::try_from(CHUNK.min(len)).unwrap_or(0)];
        let end = offset.saturating_add(len);
        let mut pos = offset;
        while pos < end {
            let n = end.saturating_sub(pos).min(CHUNK);
            let part = zeros
                .get(..usize::try_from(n).unwrap_or(0))
                .unwrap_or_default();
            self.write_with(m, pos, part)?;
            pos = pos.saturating_add(n);
        }
        Ok(())
    }
}

impl Drop for VhdImage {
    /// Stores what a flush would (the bitmaps and BAT entries of writes since the last one), so
    /// that an image dropped without [`Image::close`] keeps its writes; errors are logged.
    fn drop(&mut self) {
        let dirty = self
            .meta
            .get_mut()
            .dynamic
            .as_ref()
            .is_some_and(|d| !d.dirty_bitmaps.is_empty() || !d.dirty_bat.is_empty());
        if dirty {
            let mut m = self.meta.write();
            if let Err(e) = self.flush_with(&mut m) {
                log::error!("{}: {e}", self.path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::set_bits;

    #[test]
    fn bits_are_most_significant_first() {
        let mut b = [0u8; 2];
        assert!(set_bits(&mut b, 1, 3, true));
        assert_eq!(b, [0b0111_0000, 0]);
        assert!(!set_bits(&mut b, 2, 2, true));
        assert!(set_bits(&mut b, 7, 2, true));
        assert_eq!(b, [0b0111_0001, 0b1000_0000]);
        assert!(set_bits(&mut b, 0, 16, false));
        assert_eq!(b, [0, 0]);
    }
}
