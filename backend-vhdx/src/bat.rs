//! The block allocation table ([MS-VHDX] 2.5) and sector bitmaps (2.5.1.2, 2.6.x), loaded
//! lazily page by page, so opening a huge image costs memory proportional to what is touched.
//! Every entry is validated when it is first used.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::RwLock;
use vd_core::{Error, Result, Storage};

use crate::error::{BlockRef, Corruption, io_at};
use crate::format::{BAT_RESERVED_MASK, MIB, bat_state};
use crate::metadata::Metadata;

/// Entries per 4 KiB BAT page.
const ENTRIES_PER_PAGE: u64 = 512;
/// Bytes per cached sector-bitmap page.
const SB_PAGE: u64 = 4096;
const SB_PAGE_BYTES: usize = 4096;
/// Bytes per BAT page.
const PAGE_BYTES: usize = 4096;

/// The arithmetic of 2.5: blocks, chunks, and where their entries live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    /// Virtual disk size.
    pub virtual_size: u64,
    /// Block size.
    pub block_size: u64,
    /// Logical sector size.
    pub sector_size: u64,
    /// Payload blocks per chunk (per sector-bitmap block).
    pub chunk_ratio: u64,
    /// Number of payload blocks.
    pub data_blocks: u64,
    /// Number of BAT entries the image needs.
    pub entries: u64,
    /// Whether this is a differencing image.
    pub has_parent: bool,
}

impl Layout {
    /// The layout of a disk with these parameters.
    pub fn new(meta: &Metadata) -> Self {
        let block_size = u64::from(meta.block_size);
        let sector_size = u64::from(meta.logical_sector_size);
        let chunk_ratio = ((1u64 << 23) * sector_size / block_size).max(1);
        let data_blocks = meta.virtual_size.div_ceil(block_size);
        let entries = if meta.has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        Self {
            virtual_size: meta.virtual_size,
            block_size,
            sector_size,
            chunk_ratio,
            data_blocks,
            entries,
            has_parent: meta.has_parent,
        }
    }

    /// BAT index of payload block `block`.
    pub fn payload_index(&self, block: u64) -> u64 {
        block + block / self.chunk_ratio
    }

    /// BAT index of the sector-bitmap entry of chunk `chunk`.
    pub fn bitmap_index(&self, chunk: u64) -> u64 {
        chunk * (self.chunk_ratio + 1) + self.chunk_ratio
    }

    /// Sectors per payload block.
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.sector_size
    }
}

/// What a payload block holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockState {
    /// Not in this file: the parent's data, or zeros for a base image.
    NotPresent,
    /// Reads as zeros (ZERO, UNDEFINED, UNMAPPED).
    Zero,
    /// All data at this file offset.
    Full(u64),
    /// Data at this file offset where the sector bitmap says so, the parent elsewhere.
    Partial(u64),
}

/// A range of the file no payload or bitmap block may overlap.
#[derive(Debug, Clone, Copy)]
pub struct Forbidden {
    /// Start.
    pub start: u64,
    /// End.
    pub end: u64,
    /// What lives there.
    pub what: &'static str,
}

/// The BAT of one image.
#[derive(Debug)]
pub struct Bat {
    storage: Arc<dyn Storage>,
    layout: RwLock<Layout>,
    region_offset: AtomicU64,
    file_len: AtomicU64,
    forbidden: RwLock<Vec<Forbidden>>,
    pages: RwLock<HashMap<u64, Arc<[u64]>>>,
    bitmap_pages: RwLock<HashMap<u64, Arc<[u8]>>>,
}

/// Counts of payload block states, for `info` and `dump`.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct BatSummary {
    /// NOT_PRESENT.
    pub not_present: u64,
    /// ZERO, UNDEFINED and UNMAPPED.
    pub zero: u64,
    /// FULLY_PRESENT.
    pub fully_present: u64,
    /// PARTIALLY_PRESENT.
    pub partially_present: u64,
    /// Present sector-bitmap blocks.
    pub bitmaps_present: u64,
}

impl Bat {
    /// A lazily loaded BAT at `region_offset`.
    pub fn new(
        storage: Arc<dyn Storage>,
        layout: Layout,
        region_offset: u64,
        file_len: u64,
        forbidden: Vec<Forbidden>,
    ) -> Self {
        Self {
            storage,
            layout: RwLock::new(layout),
            region_offset: AtomicU64::new(region_offset),
            file_len: AtomicU64::new(file_len),
            forbidden: RwLock::new(forbidden),
            pages: RwLock::new(HashMap::new()),
            bitmap_pages: RwLock::new(HashMap::new()),
        }
    }

    /// The BAT's file offset.
    pub fn region_offset(&self) -> u64 {
        self.region_offset.load(Ordering::Acquire)
    }

    /// Points the BAT at its new region (after its contents were copied there) and replaces the
    /// ranges blocks may not overlap.
    pub fn relocate(&self, offset: u64, forbidden: Vec<Forbidden>) {
        *self.forbidden.write() = forbidden;
        self.region_offset.store(offset, Ordering::Release);
    }

    /// The ranges blocks may not overlap.
    pub fn forbidden(&self) -> Vec<Forbidden> {
        self.forbidden.read().clone()
    }

    /// Sets the file length after truncation.
    pub fn reset_file_len(&self, len: u64) {
        self.file_len.store(len, Ordering::Release);
    }

    /// The current layout (it changes on resize).
    pub fn layout(&self) -> Layout {
        *self.layout.read()
    }

    /// Replaces the layout after a resize.
    pub fn set_layout(&self, layout: Layout) {
        *self.layout.write() = layout;
    }

    fn file_len(&self) -> u64 {
        self.file_len.load(Ordering::Acquire)
    }

    /// Records that the file grew (a block was allocated).
    pub fn set_file_len(&self, len: u64) {
        self.file_len.fetch_max(len, Ordering::AcqRel);
    }

    /// Reads a whole 4 KiB page of the region (the part past the end of the file reads as
    /// zeros). The region is a multiple of 1 MiB and holds every entry, so every page of an
    /// entry lies inside it.
    fn load_page(&self, page: u64) -> Result<Arc<[u64]>> {
        let off = self.region_offset() + page * ENTRIES_PER_PAGE * 8;
        let mut buf = vec![0u8; PAGE_BYTES];
        let avail = usize::try_from(self.file_len().saturating_sub(off))
            .unwrap_or(usize::MAX)
            .min(PAGE_BYTES);
        if let Some(part) = buf.get_mut(..avail)
            && !part.is_empty()
        {
            self.storage
                .read_exact_at(off, part)
                .map_err(|e| io_at("BAT", off, e))?;
        }
        Ok(buf
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
            .collect())
    }

    fn page(&self, page: u64) -> Result<Arc<[u64]>> {
        if let Some(p) = self.pages.read().get(&page) {
            return Ok(p.clone());
        }
        let entries = self.load_page(page)?;
        Ok(self.pages.write().entry(page).or_insert(entries).clone())
    }

    /// Sets the raw entry at `index` in the cache and returns the index of its 4 KiB page,
    /// which the caller must log and write back.
    ///
    /// # Errors
    /// I/O errors loading the page.
    pub fn set_raw(&self, index: u64, value: u64) -> Result<u64> {
        let page = index / ENTRIES_PER_PAGE;
        let current = self.page(page)?;
        let mut copy = current.to_vec();
        if let Some(slot) =
            copy.get_mut(usize::try_from(index % ENTRIES_PER_PAGE).unwrap_or(usize::MAX))
        {
            *slot = value;
        }
        self.pages.write().insert(page, copy.into());
        Ok(page)
    }

    /// The file offset and bytes of BAT page `page`, as cached.
    ///
    /// # Errors
    /// I/O errors loading the page.
    pub fn page_bytes(&self, page: u64) -> Result<(u64, Vec<u8>)> {
        let entries = self.page(page)?;
        let bytes = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        Ok((self.region_offset() + page * ENTRIES_PER_PAGE * 8, bytes))
    }

    /// Sets the sector-bitmap bits `[first_bit, first_bit + count)` of the bitmap block at
    /// `sb_offset` in the cache; returns the file offsets of the 4 KiB pages changed.
    ///
    /// # Errors
    /// I/O errors loading a page.
    pub fn set_bits(&self, sb_offset: u64, first_bit: u64, count: u64) -> Result<Vec<u64>> {
        let mut changed = Vec::new();
        let mut bit = first_bit;
        let end = first_bit + count;
        while bit < end {
            let page_off = sb_offset + bit / 8 / SB_PAGE * SB_PAGE;
            let page_end_bit = (bit / 8 / SB_PAGE + 1) * SB_PAGE * 8;
            let stop = end.min(page_end_bit);
            let mut copy = self.bitmap_page(page_off)?.to_vec();
            for b in bit..stop {
                let byte = usize::try_from(b / 8 % SB_PAGE).unwrap_or(usize::MAX);
                if let Some(v) = copy.get_mut(byte) {
                    *v |= 1 << (b % 8);
                }
            }
            self.bitmap_pages.write().insert(page_off, copy.into());
            changed.push(page_off);
            bit = stop;
        }
        Ok(changed)
    }

    /// The bytes of the sector-bitmap page at `file_offset`, as cached.
    ///
    /// # Errors
    /// I/O errors loading the page.
    pub fn bitmap_page_bytes(&self, file_offset: u64) -> Result<Vec<u8>> {
        Ok(self.bitmap_page(file_offset)?.to_vec())
    }

    /// The raw entry at `index`.
    ///
    /// # Errors
    /// I/O errors.
    pub fn raw(&self, index: u64) -> Result<u64> {
        self.raw_in(&self.layout(), index)
    }

    /// [`raw`](Bat::raw) under a layout the caller took once for its whole request.
    ///
    /// # Errors
    /// As [`raw`](Bat::raw).
    pub fn raw_in(&self, layout: &Layout, index: u64) -> Result<u64> {
        if index >= layout.entries {
            return Ok(0);
        }
        // An entry past the end of a truncated file is unknown, never NOT_PRESENT. Writable
        // sessions never get here: their open refuses a BAT region past the end of the file.
        self.entry_in_file(index)?;
        let page = self.page(index / ENTRIES_PER_PAGE)?;
        Ok(page
            .get(usize::try_from(index % ENTRIES_PER_PAGE).unwrap_or(usize::MAX))
            .copied()
            .unwrap_or(0))
    }

    fn entry_at(&self, index: u64) -> u64 {
        self.region_offset() + index * 8
    }

    /// `Truncated` unless entry `index` lies inside the file.
    fn entry_in_file(&self, index: u64) -> Result<()> {
        let at = self.entry_at(index);
        let file_len = self.file_len();
        if at.saturating_add(8) > file_len {
            return Err(Corruption::Truncated {
                what: format!("BAT entry {index}"),
                offset: at,
                end: at.saturating_add(8),
                file_len,
            }
            .at(format!("BAT entry {index}"), at));
        }
        Ok(())
    }

    fn check_block(&self, index: u64, block: BlockRef, offset: u64, needed: u64) -> Result<()> {
        for f in self.forbidden.read().iter() {
            if offset < f.end && offset + needed > f.start {
                return Err(Corruption::BatOverlap {
                    index,
                    offset,
                    what: f.what,
                }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
            }
        }
        let end = offset.saturating_add(needed);
        if end > self.file_len() {
            return Err(Corruption::BatBeyondFile {
                index,
                block,
                offset,
                end,
                file_len: self.file_len(),
            }
            .at(format!("BAT entry {index}"), self.entry_at(index)));
        }
        Ok(())
    }

    /// The validated state of payload block `block`.
    ///
    /// # Errors
    /// `Corrupt` for reserved bits, invalid states, offsets outside the file or inside other
    /// structures; I/O errors.
    pub fn block(&self, block: u64) -> Result<BlockState> {
        self.block_in(&self.layout(), block)
    }

    /// [`block`](Bat::block) under a layout the caller took once for its whole request.
    ///
    /// # Errors
    /// As [`block`](Bat::block).
    pub fn block_in(&self, layout: &Layout, block: u64) -> Result<BlockState> {
        let index = layout.payload_index(block);
        let raw = self.raw_in(layout, index)?;
        self.payload_state(layout, block, index, raw)
    }

    /// Validates the raw entry `raw` of payload block `block` (at BAT index `index`).
    fn payload_state(
        &self,
        layout: &Layout,
        block: u64,
        index: u64,
        raw: u64,
    ) -> Result<BlockState> {
        if raw & BAT_RESERVED_MASK != 0 {
            return Err(Corruption::BatReservedBits { index, value: raw }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
        }
        let state = (raw & 7) as u8;
        let offset = (raw >> 20) * MIB;
        // The last block may be partial; only the part inside the virtual disk must exist.
        let disk_offset = block * layout.block_size;
        let needed = (layout.virtual_size - disk_offset).min(layout.block_size);
        let block_ref = BlockRef::Payload { block, disk_offset };
        Ok(match state {
            bat_state::NOT_PRESENT => BlockState::NotPresent,
            bat_state::UNDEFINED
            | bat_state::ZERO
            | bat_state::UNMAPPED
            | bat_state::UNMAPPED_LEGACY => BlockState::Zero,
            bat_state::FULLY_PRESENT => {
                self.check_block(index, block_ref, offset, needed)?;
                BlockState::Full(offset)
            }
            bat_state::PARTIALLY_PRESENT => {
                if !layout.has_parent {
                    return Err(Corruption::PartiallyPresentWithoutParent { index }
                        .at(format!("BAT entry {index}"), self.entry_at(index)));
                }
                self.check_block(index, block_ref, offset, needed)?;
                BlockState::Partial(offset)
            }
            other => {
                return Err(Corruption::BatState {
                    index,
                    state: other,
                }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
            }
        })
    }

    /// The file offset of chunk `chunk`'s sector bitmap, if present.
    ///
    /// # Errors
    /// `Corrupt` for invalid entries; I/O errors.
    pub fn bitmap(&self, chunk: u64) -> Result<Option<u64>> {
        self.bitmap_in(&self.layout(), chunk)
    }

    /// [`bitmap`](Bat::bitmap) under a layout the caller took once for its whole request.
    ///
    /// # Errors
    /// As [`bitmap`](Bat::bitmap).
    pub fn bitmap_in(&self, layout: &Layout, chunk: u64) -> Result<Option<u64>> {
        let index = layout.bitmap_index(chunk);
        let raw = self.raw_in(layout, index)?;
        self.bitmap_state(chunk, index, raw)
    }

    /// Validates the raw entry `raw` of chunk `chunk`'s sector bitmap (at BAT index `index`).
    fn bitmap_state(&self, chunk: u64, index: u64, raw: u64) -> Result<Option<u64>> {
        if raw & BAT_RESERVED_MASK != 0 {
            return Err(Corruption::BatReservedBits { index, value: raw }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
        }
        match (raw & 7) as u8 {
            bat_state::NOT_PRESENT => Ok(None),
            // 7 in a bitmap slot is read as present (openvmm does the same).
            bat_state::SB_PRESENT | 7 => {
                let offset = (raw >> 20) * MIB;
                self.check_block(index, BlockRef::SectorBitmap { chunk }, offset, MIB)?;
                Ok(Some(offset))
            }
            other => Err(Corruption::BatState {
                index,
                state: other,
            }
            .at(format!("BAT entry {index}"), self.entry_at(index))),
        }
    }

    fn bitmap_page(&self, file_offset: u64) -> Result<Arc<[u8]>> {
        if let Some(p) = self.bitmap_pages.read().get(&file_offset) {
            return Ok(p.clone());
        }
        let mut buf = vec![0u8; SB_PAGE_BYTES];
        self.storage
            .read_exact_at(file_offset, &mut buf)
            .map_err(|e| io_at("sector bitmap", file_offset, e))?;
        let page: Arc<[u8]> = buf.into();
        // Cached pages may hold changes not yet written back, so they are never evicted; the
        // cache is bounded by the bitmap blocks the session touches.
        Ok(self
            .bitmap_pages
            .write()
            .entry(file_offset)
            .or_insert(page)
            .clone())
    }

    /// Calls `f(first_sector, count, present)` for the runs of sectors `[first, first + count)`
    /// of payload block `block` whose sector-bitmap bits are equal, under a layout the caller
    /// took once for its whole request.
    ///
    /// # Errors
    /// `Corrupt` when the bitmap is missing; I/O errors.
    pub fn bitmap_runs(
        &self,
        layout: &Layout,
        block: u64,
        first: u64,
        count: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<()> {
        let chunk = block / layout.chunk_ratio;
        let Some(sb) = self.bitmap_in(layout, chunk)? else {
            let index = layout.payload_index(block);
            return Err(Corruption::SectorBitmapMissing { index }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
        };
        let base = (block % layout.chunk_ratio) * layout.sectors_per_block();
        let mut run_start = first;
        let mut run_value = None;
        let mut page_cache: Option<(u64, Arc<[u8]>)> = None;
        for s in first..first + count {
            let bit = base + s;
            let byte = bit / 8;
            let page_off = sb + byte / SB_PAGE * SB_PAGE;
            // The page is looked up once per 4 KiB of bitmap and borrowed for each bit.
            if !matches!(&page_cache, Some((o, _)) if *o == page_off) {
                page_cache = Some((page_off, self.bitmap_page(page_off)?));
            }
            let v = page_cache
                .as_ref()
                .and_then(|(_, page)| {
                    page.get(usize::try_from(byte % SB_PAGE).unwrap_or(usize::MAX))
                })
                .is_some_and(|b| b >> (bit % 8) & 1 == 1);
            match run_value {
                Some(r) if r == v => {}
                Some(r) => {
                    f(run_start, s - run_start, r);
                    run_start = s;
                    run_value = Some(v);
                }
                None => run_value = Some(v),
            }
        }
        if let Some(r) = run_value {
            f(run_start, first + count - run_start, r);
        }
        Ok(())
    }

    /// Checks every entry the layout uses as [`block`](Bat::block) and [`bitmap`](Bat::bitmap)
    /// do (states, reserved bits, overlaps, and blocks or entries beyond the end of the file),
    /// in one pass over the BAT read in 1 MiB pieces that are not cached, so memory stays
    /// bounded for any BAT size; cached pages, which may hold changes not yet written, are used
    /// as they are. Calls `f` with each problem, oldest entry first, and stops at the first
    /// error `f` returns.
    ///
    /// # Errors
    /// What `f` returns; I/O errors reading the BAT.
    pub fn verify_all(&self, mut f: impl FnMut(Error) -> Result<()>) -> Result<()> {
        const PIECE_ENTRIES: u64 = 128 * 1024;
        let layout = self.layout();
        let region = self.region_offset();
        let file_len = self.file_len();
        let group = layout.chunk_ratio + 1;
        let mut buf = vec![0u8; usize::try_from(PIECE_ENTRIES * 8).unwrap_or(0)];
        let mut first = 0;
        while first < layout.entries {
            let n = (layout.entries - first).min(PIECE_ENTRIES);
            let off = region + first * 8;
            // Bytes of this piece inside the file; entries past them are reported below.
            let avail = file_len.saturating_sub(off).min(n * 8);
            if let Some(part) = buf.get_mut(..usize::try_from(avail).unwrap_or(0))
                && !part.is_empty()
            {
                self.storage
                    .read_exact_at(off, part)
                    .map_err(|e| io_at("BAT", off, e))?;
            }
            let mut index = first;
            while index < first + n {
                let page_no = index / ENTRIES_PER_PAGE;
                let page_end = ((page_no + 1) * ENTRIES_PER_PAGE).min(first + n);
                let cached = self.pages.read().get(&page_no).cloned();
                for i in index..page_end {
                    let raw = if let Some(p) = &cached {
                        p.get(usize::try_from(i % ENTRIES_PER_PAGE).unwrap_or(usize::MAX))
                            .copied()
                            .unwrap_or(0)
                    } else {
                        let at = usize::try_from((i - first) * 8).unwrap_or(usize::MAX);
                        match buf
                            .get(at..at.saturating_add(8))
                            .filter(|_| (i - first + 1) * 8 <= avail)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        {
                            Some(b) => u64::from_le_bytes(b),
                            None => {
                                if let Err(e) = self.entry_in_file(i) {
                                    f(e)?;
                                }
                                continue;
                            }
                        }
                    };
                    let (chunk, slot) = (i / group, i % group);
                    let checked = if slot == layout.chunk_ratio {
                        // Bitmap slots matter only where reads use them.
                        if layout.has_parent {
                            self.bitmap_state(chunk, i, raw).map(|_| ())
                        } else {
                            Ok(())
                        }
                    } else {
                        let block = chunk * layout.chunk_ratio + slot;
                        if block < layout.data_blocks {
                            self.payload_state(&layout, block, i, raw).map(|_| ())
                        } else {
                            Ok(())
                        }
                    };
                    if let Err(e) = checked {
                        f(e)?;
                    }
                }
                index = page_end;
            }
            first += n;
        }
        Ok(())
    }

    /// Counts the payload states of every block (reads the whole BAT).
    ///
    /// # Errors
    /// As [`block`](Bat::block).
    pub fn summary(&self) -> Result<BatSummary> {
        let layout = self.layout();
        let mut s = BatSummary::default();
        for b in 0..layout.data_blocks {
            match self.block(b)? {
                BlockState::NotPresent => s.not_present += 1,
                BlockState::Zero => s.zero += 1,
                BlockState::Full(_) => s.fully_present += 1,
                BlockState::Partial(_) => s.partially_present += 1,
            }
        }
        if layout.has_parent {
            for c in 0..self.layout().data_blocks.div_ceil(layout.chunk_ratio) {
                if self.bitmap(c)?.is_some() {
                    s.bitmaps_present += 1;
                }
            }
        }
        Ok(s)
    }
}
