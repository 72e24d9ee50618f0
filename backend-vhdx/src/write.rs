//! Writing ([MS-VHDX] 2.2.2.1, 2.3, 2.5): the header protocol, block allocation, sector bitmaps,
//! and the log writer.
//!
//! Crash-consistency ordering:
//! 1. Before the first change of a session, the headers get a new FileWriteGuid and a new
//!    DataWriteGuid (double update, flushed).
//! 2. Payload data is written in place; a new block is appended at the 1 MiB-aligned end of the
//!    file, so its unwritten rest reads as zeros. BAT and sector-bitmap changes stay in memory.
//! 3. On `flush` (or when enough metadata is dirty): flush the data, write one log entry per
//!    batch of changed 4 KiB metadata pages, flush, set the session's LogGuid in the headers
//!    (once), write the pages to their final places, flush. Every entry's tail is itself, since
//!    all earlier entries have been applied.
//! 4. `close` does the same and then clears the LogGuid.
//! 5. When the next entry would not end two sectors before the end of the log, the log is
//!    closed as in 4 and a new one (new LogGuid) starts at its beginning: a log never wraps.
//!
//! A crash at any point leaves either the old metadata (the data of an unflushed allocation is
//! unreferenced) or a log whose replay produces the new metadata.

use uuid::Uuid;
use vd_core::{Error, ErrorKind, OpenFlags, Result, check_range};

use crate::bat::{BlockState, Layout};
use crate::engine::Engine;
use crate::error::{fit, io_err, overflow};
use crate::format::{BatEntry, BitmapState, LOG_SECTOR_SIZE, MIB, PayloadState};
use crate::guid::Guid;
use crate::header::{HeaderUpdate, update_headers};
use crate::log::{EntryParams, build_entry, entry_length, max_pages_per_entry};
use crate::write_state::WriteState;

/// Room every log entry leaves between its end and the end of the log: two sectors.
///
/// QEMU (10) searches the log from offset 0 and stops once its read position wraps to below the
/// place its current scan started. A sequence that ends exactly one sector before the end of
/// the log sends the next (failed) step to offset 0, where the search began: it starts over
/// and never ends. Ending each entry at least two sectors early, and starting a new log rather
/// than wrapping, keeps every log we leave readable to it.
const LOG_END_GAP: u64 = 2 * LOG_SECTOR_SIZE;

/// Dirty metadata pages that trigger a commit before the next `flush`.
const MAX_DIRTY_PAGES: usize = 256;

/// Copies `len` bytes of the file from `from` to `to` in 1 MiB pieces.
///
/// # Errors
/// `OutOfRange` when either range's end overflows; I/O errors.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "checked at the top: from + len and to + len do not overflow, and done < len in \
              the loop (done grows by at most len - done), so from + done, to + done and \
              len - done cannot overflow"
)]
pub(crate) fn copy_range(
    storage: &dyn vd_core::Storage,
    from: u64,
    to: u64,
    len: u64,
    what: &str,
) -> Result<()> {
    for (start, field) in [(from, "copy source end"), (to, "copy target end")] {
        start.checked_add(len).ok_or_else(|| overflow(field))?;
    }
    let mut buf = vec![0u8; fit::<usize, _>(MIB.min(len), "copy length")?];
    let mut done = 0;
    while done < len {
        let chunk = buf
            .get_mut(..fit::<usize, _>((len - done).min(MIB), "copy length")?)
            .ok_or_else(|| Error::invalid_argument("copy chunk"))?;
        storage
            .read_exact_at(from + done, chunk)
            .and_then(|()| storage.write_all_at(to + done, chunk))
            .map_err(|e| io_err(what, e))?;
        done += chunk.len() as u64;
    }
    Ok(())
}

impl Engine {
    /// `ReadOnly` unless the image was opened read-write on writable storage.
    pub(crate) fn check_writable(&self, op: &str) -> Result<()> {
        if self.flags.contains(OpenFlags::READ_ONLY) || self.storage.is_read_only() {
            return Err(Error::read_only(op));
        }
        Ok(())
    }

    /// Before the first change of a session: checks the whole BAT in one bounded-memory pass
    /// ([`Bat::verify_all`](crate::bat::Bat::verify_all)) and refuses an image with a missing
    /// (truncated) or otherwise invalid block, so nothing is written to a damaged image; the
    /// header update that follows is the session's first write. Opens stay lazy: the cost (one
    /// read of the BAT) is paid once per read-write session, and only if it changes something.
    /// `SKIP_CONSISTENCY_CHECKS` skips it.
    ///
    /// # Errors
    /// The first problem found.
    pub(crate) fn preflight(&self, ws: &mut WriteState) -> Result<()> {
        if ws.verified || self.flags.contains(OpenFlags::SKIP_CONSISTENCY_CHECKS) {
            return Ok(());
        }
        self.bat.verify_all(Err)?;
        ws.verified = true;
        Ok(())
    }

    /// Step 1 of the protocol: a new FileWriteGuid before the first change of any kind (moving
    /// blocks, say). The DataWriteGuid is left alone, so children of this image stay valid.
    pub(crate) fn begin(&self, ws: &mut WriteState) -> Result<()> {
        if ws.started {
            return Ok(());
        }
        self.preflight(ws)?;
        let mut header = self.header.write();
        *header = update_headers(&self.storage, &header, HeaderUpdate::new_file_write_guid())?;
        ws.started = true;
        Ok(())
    }

    /// Before the first change a reader of the disk could see (data, discards, size): a new
    /// DataWriteGuid too (MS-VHDX 2.2.2), in the same header update when the session has not
    /// started yet.
    pub(crate) fn begin_visible(&self, ws: &mut WriteState) -> Result<()> {
        if ws.data_changed {
            return Ok(());
        }
        self.preflight(ws)?;
        let started = ws.started;
        let mut header = self.header.write();
        let update = HeaderUpdate {
            file_write_guid: (!started).then(|| Guid::from_uuid(Uuid::new_v4())),
            data_write_guid: Some(Guid::from_uuid(Uuid::new_v4())),
            log_guid: None,
        };
        *header = update_headers(&self.storage, &header, update)?;
        ws.started = true;
        ws.data_changed = true;
        Ok(())
    }

    /// Sets the header's DataWriteGuid (children recording the old one no longer match).
    pub(crate) fn set_data_write_guid(&self, uuid: Uuid) -> Result<()> {
        self.check_writable("setting the modification UUID")?;
        let mut ws = self.write_state.lock();
        self.begin(&mut ws)?;
        let mut header = self.header.write();
        *header = update_headers(
            &self.storage,
            &header,
            HeaderUpdate::data_write_guid(Guid::from_uuid(uuid)),
        )?;
        Ok(())
    }

    /// Appends `len` zero bytes at the 1 MiB-aligned end of the file; returns their offset.
    pub(crate) fn allocate(&self, ws: &mut WriteState, len: u64) -> Result<u64> {
        let off = ws.file_end;
        let end = off
            .checked_add(len)
            .ok_or_else(|| Error::new(ErrorKind::OutOfRange, "the file would exceed 2^64 bytes"))?;
        self.storage
            .set_len(end)
            .map_err(|e| io_err("cannot grow the file", e))?;
        ws.file_end = end;
        self.bat.set_file_len(end);
        Ok(off)
    }

    pub(crate) fn set_entry(&self, ws: &mut WriteState, index: u64, entry: BatEntry) -> Result<()> {
        let page = self.bat.set_entry(index, entry)?;
        ws.dirty_bat.insert(page);
        Ok(())
    }

    /// Marks sectors `[first, first + count)` of `block` as present in this file, allocating the
    /// chunk's sector bitmap when needed.
    fn mark_present(&self, ws: &mut WriteState, block: u64, first: u64, count: u64) -> Result<()> {
        let layout = self.layout();
        let chunk = layout.chunk_of(block);
        let sb = match self.bat.bitmap(chunk)? {
            Some(off) => off,
            None => {
                let off = self.allocate(ws, MIB)?;
                self.set_entry(
                    ws,
                    layout.bitmap_index(chunk)?,
                    BatEntry::bitmap(BitmapState::Present, off),
                )?;
                off
            }
        };
        let first_bit = layout
            .bitmap_base(block)
            .checked_add(first)
            .ok_or_else(|| overflow("sector bitmap bit"))?;
        for page in self.bat.set_bits(sb, first_bit, count)? {
            ws.dirty_bitmaps.insert(page);
        }
        Ok(())
    }

    /// A write into a differencing image must be sector-aligned wherever it lands in a block
    /// whose sectors are tracked one by one (partially present, or not present yet and not
    /// written whole): checked for the whole request before anything is written, so a refused
    /// write changes no byte (not even the DataWriteGuid). Only the first and the last block of
    /// a request can be partly covered.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "check_range at the top: 0 < len and offset + len <= virtual_size <= 2^46, so \
                  end - 1 >= 0 and (block + 1) * block_size <= 2^46 + 2^28; block_size is \
                  never zero (Layout::from_parts); start <= stop as start < end and \
                  start < (block + 1) * block_size"
    )]
    fn check_diff_alignment(&self, layout: &Layout, offset: u64, len: u64) -> Result<()> {
        let ss = layout.sector_size;
        check_range(offset, len, layout.virtual_size)?;
        if len == 0 || !layout.has_parent || (offset.is_multiple_of(ss) && len.is_multiple_of(ss)) {
            return Ok(());
        }
        let end = offset + len;
        let first = offset / layout.block_size;
        let last = (end - 1) / layout.block_size;
        for block in [first, last] {
            let start = (block * layout.block_size).max(offset);
            let stop = ((block + 1) * layout.block_size).min(end);
            let within = start % layout.block_size;
            let n = stop - start;
            let whole = within == 0 && (n == layout.block_size || stop == layout.virtual_size);
            let aligned = within.is_multiple_of(ss) && n.is_multiple_of(ss);
            let tracked = match self.bat.block(block)? {
                BlockState::Partial(_) => true,
                BlockState::NotPresent => !whole,
                _ => false,
            };
            if tracked && !aligned {
                return Err(Error::invalid_argument(format!(
                    "a write into a differencing image must be {ss}-byte aligned"
                )));
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub(crate) fn write(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.check_writable("writing")?;
        let mut ws = self.write_state.lock();
        self.write_locked(&mut ws, offset, buf)
    }

    /// [`write`](Self::write) for a change that holds the write state: the layout is read
    /// under it, so a concurrent resize cannot change it halfway.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "check_range at the top: offset + buf.len() <= virtual_size <= 2^46 and \
                  done < buf.len(), so pos, pos + n and done + n_usize cannot overflow; \
                  block_size (>= 1 MiB) and sector_size (512 or 4096) are never zero \
                  (Layout::from_parts); within < block_size; a present block's file offset plus \
                  the part of it inside the disk is at most the file length (check_block), so \
                  file_off + within cannot overflow"
    )]
    fn write_locked(&self, ws: &mut WriteState, offset: u64, buf: &[u8]) -> Result<()> {
        let layout = self.layout();
        check_range(offset, buf.len() as u64, layout.virtual_size)?;
        if buf.is_empty() {
            return Ok(());
        }
        self.check_diff_alignment(&layout, offset, buf.len() as u64)?;
        self.begin_visible(ws)?;
        let storage = self.storage.clone();
        let ss = layout.sector_size;
        let mut done = 0usize;
        while done < buf.len() {
            let pos = offset + done as u64;
            let block = pos / layout.block_size;
            let within = pos % layout.block_size;
            let n = (layout.block_size - within).min((buf.len() - done) as u64);
            let n_usize =
                usize::try_from(n).map_err(|_| Error::invalid_argument("write too large"))?;
            let data = buf
                .get(done..done + n_usize)
                .ok_or_else(|| Error::invalid_argument("write range"))?;
            let whole = within == 0 && (n == layout.block_size || pos + n == layout.virtual_size);
            let aligned = within.is_multiple_of(ss) && n.is_multiple_of(ss);
            let write = |file_off: u64| {
                storage
                    .write_all_at(file_off + within, data)
                    .map_err(|e| io_err("write failed", e).with_offset(file_off + within))
            };
            match self.bat.block(block)? {
                BlockState::Full(file) => write(file)?,
                BlockState::Partial(file) => {
                    if !aligned {
                        return Err(Error::invalid_argument(format!(
                            "a write into a differencing image must be {ss}-byte aligned"
                        )));
                    }
                    write(file)?;
                    self.mark_present(ws, block, within / ss, n / ss)?;
                }
                BlockState::NotPresent if layout.has_parent && !whole => {
                    if !aligned {
                        return Err(Error::invalid_argument(format!(
                            "a write into a differencing image must be {ss}-byte aligned"
                        )));
                    }
                    let file = self.allocate(ws, layout.block_size)?;
                    write(file)?;
                    self.mark_present(ws, block, within / ss, n / ss)?;
                    let index = layout.payload_index(block)?;
                    self.set_entry(
                        ws,
                        index,
                        BatEntry::payload(PayloadState::PartiallyPresent, file),
                    )?;
                }
                // Not present in a base image, zero, unmapped, or a whole block: a new block
                // whose unwritten rest reads as zeros.
                BlockState::NotPresent | BlockState::Zero => {
                    let file = self.allocate(ws, layout.block_size)?;
                    write(file)?;
                    let index = layout.payload_index(block)?;
                    self.set_entry(
                        ws,
                        index,
                        BatEntry::payload(PayloadState::FullyPresent, file),
                    )?;
                }
            }
            done += n_usize;
        }
        if ws.dirty_bat.len().saturating_add(ws.dirty_bitmaps.len()) > MAX_DIRTY_PAGES {
            self.commit(ws)?;
        }
        Ok(())
    }

    /// Sets whole blocks to `state` (ZERO or UNMAPPED), and writes zeros over partial ones.
    ///
    /// The whole range is one change under the write state: the layout and each block's state
    /// are read under it, so a block cannot be allocated, moved or cut between the look and the
    /// change.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "check_range at the top: pos < end = offset + len <= virtual_size <= 2^46; \
                  block_size is never zero (Layout::from_parts) and within < block_size"
    )]
    pub(crate) fn zero(&self, offset: u64, len: u64, discard: bool) -> Result<()> {
        self.check_writable(if discard { "discard" } else { "writing zeros" })?;
        let mut ws = self.write_state.lock();
        let layout = self.layout();
        check_range(offset, len, layout.virtual_size)?;
        let end = offset + len;
        let mut pos = offset;
        let zeros = vec![0u8; fit::<usize, _>(layout.block_size.min(len), "zero length")?];
        while pos < end {
            let block = pos / layout.block_size;
            let within = pos % layout.block_size;
            let n = (layout.block_size - within).min(end - pos);
            let whole = within == 0 && (n == layout.block_size || pos + n == layout.virtual_size);
            let state = self.bat.block(block)?;
            if whole && layout.has_parent {
                // In a differencing image, a zeroed block becomes a present block of zeros (a
                // hole in the file, so it costs no space) rather than ZERO: ZERO must read as
                // zeros, but some readers (libvhdi 20260901) wrongly send it to the parent.
                if state != BlockState::Zero {
                    self.begin_visible(&mut ws)?;
                    let index = layout.payload_index(block)?;
                    if let BlockState::Full(off) = state {
                        self.storage
                            .discard(off, layout.block_size)
                            .map_err(|e| io_err("cannot zero a block", e))?;
                    } else {
                        let off = self.allocate(&mut ws, layout.block_size)?;
                        self.set_entry(
                            &mut ws,
                            index,
                            BatEntry::payload(PayloadState::FullyPresent, off),
                        )?;
                    }
                }
            } else if whole && !self.metadata().leave_block_allocated {
                if state != BlockState::Zero {
                    self.begin_visible(&mut ws)?;
                    // ZERO, not UNMAPPED, so the range reads as zeros in every reader. The old
                    // block stays in the file until `compact`.
                    let index = layout.payload_index(block)?;
                    self.set_entry(&mut ws, index, BatEntry::payload(PayloadState::Zero, 0))?;
                }
            } else if state != BlockState::Zero
                && (layout.has_parent || state != BlockState::NotPresent)
            {
                let part = zeros
                    .get(..fit::<usize, _>(n, "zero length")?)
                    .ok_or_else(|| Error::invalid_argument("zero range"))?;
                self.write_locked(&mut ws, pos, part)?;
            }
            pos += n;
        }
        Ok(())
    }

    /// Makes every completed write durable: data first, then the metadata through the log.
    pub(crate) fn flush(&self) -> Result<()> {
        if self.flags.contains(OpenFlags::READ_ONLY) {
            return Ok(());
        }
        let mut ws = self.write_state.lock();
        self.commit(&mut ws)?;
        self.storage.flush().map_err(|e| io_err("flush failed", e))
    }

    /// Logs and applies the dirty metadata pages.
    pub(crate) fn commit(&self, ws: &mut WriteState) -> Result<()> {
        if ws.dirty_bat.is_empty() && ws.dirty_bitmaps.is_empty() && ws.dirty_pages.is_empty() {
            return Ok(());
        }
        let storage = self.storage.clone();
        // The data of new blocks is durable before any entry points at it.
        storage.flush().map_err(|e| io_err("flush failed", e))?;
        let mut pages =
            Vec::with_capacity(ws.dirty_bat.len().saturating_add(ws.dirty_bitmaps.len()));
        for &p in &ws.dirty_bat {
            pages.push(self.bat.page_bytes(p)?);
        }
        for &off in &ws.dirty_bitmaps {
            pages.push((off, self.bat.bitmap_page_bytes(off)?));
        }
        for (off, page) in &ws.dirty_pages {
            pages.push((*off, page.clone()));
        }
        let (log_offset, log_len) = {
            let h = self.header.read();
            (h.log_offset(), h.log_length())
        };
        if log_len == 0 {
            return Err(Error::new(
                ErrorKind::NotSupported,
                "the image has no log to write metadata through",
            ));
        }
        let mut guid = *ws
            .log_guid
            .get_or_insert_with(|| Guid::from_uuid(Uuid::new_v4()));
        // Entries end at least two sectors before the end of the log (see `LOG_END_GAP`).
        let per_entry = fit::<usize, _>(
            max_pages_per_entry(log_len.saturating_sub(LOG_END_GAP - LOG_SECTOR_SIZE)).max(1),
            "log entry pages",
        )?;
        let file_len = storage
            .len()
            .map_err(|e| io_err("cannot read the file size", e))?;
        for batch in pages.chunks(per_entry) {
            let n = fit::<u64, _>(batch.len(), "log entry pages")?;
            let entry_len = entry_length(n)?;
            if entry_len.saturating_add(LOG_END_GAP) > log_len {
                return Err(Error::new(
                    ErrorKind::NotSupported,
                    format!(
                        "the log ({log_len:#x} bytes) is too small for a {entry_len:#x}-byte entry"
                    ),
                ));
            }
            // log_pos is at most the log length (below 4 GiB): entries stop LOG_END_GAP short.
            if ws
                .log_pos
                .saturating_add(entry_len)
                .saturating_add(LOG_END_GAP)
                > log_len
            {
                // The log would wrap: every entry so far is applied and flushed, so the log is
                // closed (LogGuid cleared) and a new one with a new LogGuid starts at offset 0.
                // No sequence ever crosses the end of the log, and entries of the old LogGuid
                // left behind are not part of the new log.
                self.end_log(ws)?;
                ws.log_pos = 0;
                guid = *ws
                    .log_guid
                    .get_or_insert_with(|| Guid::from_uuid(Uuid::new_v4()));
            }
            let entry = build_entry(
                &EntryParams {
                    guid,
                    sequence: ws.sequence,
                    tail: ws.log_pos,
                    flushed_file_offset: file_len,
                    last_file_offset: file_len.max(ws.file_end),
                },
                batch,
            )?;
            storage
                .write_all_at(
                    log_offset
                        .checked_add(ws.log_pos)
                        .ok_or_else(|| overflow("log entry offset"))?,
                    &entry,
                )
                .and_then(|()| storage.flush())
                .map_err(|e| io_err("cannot write the log", e))?;
            if !ws.header_has_guid {
                let mut header = self.header.write();
                *header = update_headers(&storage, &header, HeaderUpdate::log_guid(guid))?;
                ws.header_has_guid = true;
            }
            for (off, page) in batch {
                storage
                    .write_all_at(*off, page)
                    .map_err(|e| io_err("cannot write metadata", e).with_offset(*off))?;
            }
            storage.flush().map_err(|e| io_err("flush failed", e))?;
            ws.log_pos = ws
                .log_pos
                .checked_add(entry_len)
                .ok_or_else(|| overflow("log position"))?;
            ws.sequence = ws
                .sequence
                .checked_add(1)
                .ok_or_else(|| overflow("log sequence number"))?;
        }
        ws.dirty_bat.clear();
        ws.dirty_bitmaps.clear();
        ws.dirty_pages.clear();
        Ok(())
    }

    /// Clears the LogGuid once every entry is applied and flushed (after `commit`), so no
    /// replay is pending; the next commit starts a log with a new LogGuid.
    pub(crate) fn end_log(&self, ws: &mut WriteState) -> Result<()> {
        if ws.header_has_guid {
            let mut header = self.header.write();
            *header = update_headers(&self.storage, &header, HeaderUpdate::log_guid(Guid::ZERO))?;
            ws.header_has_guid = false;
            ws.log_guid = None;
            ws.log_pos = 0;
        }
        Ok(())
    }

    /// Applies everything and clears the LogGuid.
    pub(crate) fn close(&self) -> Result<()> {
        if self.flags.contains(OpenFlags::READ_ONLY) || self.storage.is_read_only() {
            return Ok(());
        }
        self.flush()?;
        let mut ws = self.write_state.lock();
        self.end_log(&mut ws)
    }
}

#[cfg(test)]
mod tests {
    use vd_core::OpenFlags;

    use crate::format::MIB;
    use crate::report::LogReplay;
    use crate::test_support::{create, read, reopen};

    #[test]
    fn writes_survive_a_reopen_and_allocate_whole_blocks() {
        let (s, image) = create(8 * MIB, &[("block_size", "1M")]);
        let before = s.len().unwrap();
        image.write_at(3 * MIB + 512, &[0xAB; 1024]).unwrap();
        image.flush().unwrap();
        // One new block at the 1 MiB-aligned end of the file.
        assert_eq!(s.len().unwrap(), before + MIB);
        image.close(false).unwrap();
        let again = reopen(&s, OpenFlags::READ_ONLY);
        assert!(!again.log_state().dirty);
        let got = read(&again, 3 * MIB, 4096);
        assert!(got[..512].iter().all(|&b| b == 0));
        assert!(got[512..1536].iter().all(|&b| b == 0xAB));
        assert!(got[1536..].iter().all(|&b| b == 0));
    }

    #[test]
    fn discarding_a_whole_block_makes_it_zero() {
        let (s, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(MIB, &vec![7; 1 << 20]).unwrap();
        image.discard(MIB, MIB).unwrap();
        image.close(false).unwrap();
        let again = reopen(&s, OpenFlags::READ_ONLY);
        assert!(read(&again, MIB, 1 << 20).iter().all(|&b| b == 0));
        assert_eq!(
            again.engine.bat.block(1).unwrap(),
            crate::bat::BlockState::Zero
        );
    }

    #[test]
    fn an_unflushed_session_replays_from_the_log() {
        let (s, image) = create(4 * MIB, &[("block_size", "1M")]);
        image.write_at(0, &[1; 4096]).unwrap();
        image.flush().unwrap();
        // No close: the LogGuid stays set, as after a crash following the flush.
        std::mem::forget(image);
        let again = reopen(&s, OpenFlags::READ_ONLY);
        assert!(again.log_state().dirty);
        assert_eq!(again.log_state().replay, LogReplay::Memory);
        assert!(read(&again, 0, 4096).iter().all(|&b| b == 1));
    }

    #[test]
    fn a_copy_whose_range_overflows_is_refused_before_any_io() {
        let s = vd_core::MemStorage::from_bytes(vec![7; 4096]);
        let e = super::copy_range(&s, u64::MAX - 10, 0, 4096, "copy").unwrap_err();
        assert!(e.to_string().contains("copy source end overflows"), "{e}");
        let e = super::copy_range(&s, 0, u64::MAX, 1, "copy").unwrap_err();
        assert!(e.to_string().contains("copy target end overflows"), "{e}");
    }
}
