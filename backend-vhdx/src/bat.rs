//! The block allocation table ([MS-VHDX] 2.5) and sector bitmaps (2.5.1.2, 2.6.x), loaded
//! lazily page by page, so opening a huge image costs memory proportional to what is touched.
//! Every entry is validated when it is first used.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::RwLock;
use vd_core::{Error, ErrorKind, Result, Storage};

use crate::error::{BlockRef, Corruption, fit, io_at, overflow};
use crate::format::{
    BatEntry, BitmapState, InvalidState, MAX_BLOCK_SIZE, MAX_VIRTUAL_SIZE, MIB, MIN_BLOCK_SIZE,
    PayloadState,
};
use crate::metadata::Metadata;
use crate::shard::Sharded;

/// Entries per 4 KiB BAT page.
const ENTRIES_PER_PAGE: u64 = 512;
/// Bytes per cached sector-bitmap page.
const SB_PAGE: u64 = 4096;
const SB_PAGE_BYTES: usize = 4096;
/// Bytes per BAT page.
const PAGE_BYTES: usize = 4096;
/// Bytes per BAT page, as a file offset.
const PAGE_BYTES_U64: u64 = ENTRIES_PER_PAGE * 8;
/// Bits in a chunk's sector bitmap (1 MiB).
const SB_BITS: u64 = 8 * MIB;

/// Most unchanged BAT pages kept in memory: 4096 pages of 4 KiB are 16 MiB and describe 2M
/// blocks (2 TiB at 1 MiB blocks), enough for any working set a caller re-reads, while a scan of
/// a 64 TiB disk (a 512 MiB BAT) cannot pin the whole table. Past the cap the unchanged pages are
/// dropped and re-read when needed; pages changed in this session stay until they are written
/// back, so they are bounded by what the session writes, not by the file. The pages are shared
/// by the per-thread shards of the cache (see `Bat`); each shard adds only its index of them,
/// about 32 bytes a page.
pub const MAX_CACHED_BAT_PAGES: usize = 4096;

/// Most unchanged 4 KiB sector-bitmap pages kept in memory (4 MiB, the bits of 4 chunks' worth
/// of sectors), for the same reason and with the same eviction as [`MAX_CACHED_BAT_PAGES`].
pub const MAX_CACHED_BITMAP_PAGES: usize = 1024;

/// A page cache bounded in its unchanged pages: pages changed in this session (which may hold
/// changes not yet written back) are never dropped; when more than `cap` unchanged pages would
/// be held, every unchanged page is dropped at once (reads then load them again).
#[derive(Debug, Clone)]
struct PageCache<T> {
    map: HashMap<u64, (Arc<[T]>, bool)>,
    clean: usize,
    cap: usize,
}

impl<T> PageCache<T> {
    fn new(cap: usize) -> Self {
        Self {
            map: HashMap::new(),
            clean: 0,
            cap,
        }
    }

    fn get(&self, key: u64) -> Option<Arc<[T]>> {
        self.map.get(&key).map(|(p, _)| p.clone())
    }

    /// The cached page, borrowed (no reference count is touched).
    fn get_ref(&self, key: u64) -> Option<&[T]> {
        self.map.get(&key).map(|(p, _)| &**p)
    }

    /// Caches `page` as read from the file, unless the key is cached already; returns the cached
    /// page.
    fn insert_clean(&mut self, key: u64, page: Arc<[T]>) -> Arc<[T]> {
        if let Some((p, _)) = self.map.get(&key) {
            return p.clone();
        }
        if self.clean >= self.cap {
            self.map.retain(|_, (_, changed)| *changed);
            self.clean = 0;
        }
        // `clean` counts unchanged pages held, at most `cap` (a few thousand): it never
        // saturates.
        self.clean = self.clean.saturating_add(1);
        self.map.insert(key, (page.clone(), false));
        page
    }

    /// Caches a changed page; it stays for the session.
    fn insert_changed(&mut self, key: u64, page: Arc<[T]>) {
        if let Some((_, false)) = self.map.insert(key, (page, true)) {
            // An unchanged page was held, so `clean` counted it and is at least 1.
            self.clean = self.clean.saturating_sub(1);
        }
    }

    /// Pages held, changed or not.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

/// Entry `index`, at `slot` of its cached `page`.
///
/// # Errors
/// `OutOfRange` when the slot is outside the page (never: a page holds 512 entries and the
/// slot is an index modulo 512).
fn entry_of(page: &[u64], index: u64, slot: usize) -> Result<BatEntry> {
    page.get(slot)
        .copied()
        .map(BatEntry::from_raw)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfRange,
                format!("BAT entry {index} is outside its cached page"),
            )
        })
}

/// The arithmetic of 2.5: blocks, chunks, and where their entries live.
///
/// Built by [`Layout::from_parts`], which checks the caps every derived value relies on:
/// block size a power of two from 1 MiB to 256 MiB, logical sector size 512 or 4096, virtual
/// size at most `MAX_VIRTUAL_SIZE` (64 TiB). So `chunk_ratio` is 16..=32768, `data_blocks`
/// at most 2^26 and `entries` below 2^27: products of an entry index by 8 and of a block
/// number below `data_blocks` by the block size stay far below `u64::MAX`.
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
    /// The layout of the disk `meta` describes.
    ///
    /// # Errors
    /// As [`from_parts`](Layout::from_parts) (never for parsed metadata, which is validated
    /// against the same caps).
    pub fn new(meta: &Metadata) -> Result<Self> {
        Self::from_parts(
            meta.virtual_size,
            meta.block_size,
            meta.logical_sector_size,
            meta.has_parent,
        )
    }

    /// The layout of a disk of `virtual_size` bytes with these (validated) block and logical
    /// sector sizes: chunk ratio = 2^23 × sector size / block size (2.5), at least 1; a
    /// differencing disk's BAT holds whole chunks, each followed by its sector-bitmap entry,
    /// and any other disk's BAT ends with the last payload entry.
    ///
    /// # Errors
    /// `OutOfRange` when the block size is not a power of two from 1 MiB to 256 MiB, the sector
    /// size is not 512 or 4096, or the virtual size exceeds `MAX_VIRTUAL_SIZE`: the caps the
    /// layout's arithmetic relies on (metadata parsing, `create` and `resize` check them first).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "checked just above: block_size is 2^20..=2^28, sector_size 512 or 4096 and \
                  virtual_size at most 2^46, so chunk_ratio = 2^23 * sector_size / block_size is \
                  16..=32768, data_blocks at most 2^26 and entries below 2^27"
    )]
    pub fn from_parts(
        virtual_size: u64,
        block_size: u32,
        logical_sector_size: u32,
        has_parent: bool,
    ) -> Result<Self> {
        if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size)
        {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("block size {block_size:#x} is not a power of two from 1 MiB to 256 MiB"),
            ));
        }
        if !matches!(logical_sector_size, 512 | 4096) {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("logical sector size {logical_sector_size} is not 512 or 4096"),
            ));
        }
        if virtual_size > MAX_VIRTUAL_SIZE {
            return Err(Error::new(
                ErrorKind::OutOfRange,
                format!("virtual size {virtual_size:#x} exceeds 64 TiB"),
            ));
        }
        let block_size = u64::from(block_size);
        let sector_size = u64::from(logical_sector_size);
        let chunk_ratio = (1u64 << 23) * sector_size / block_size;
        let data_blocks = virtual_size.div_ceil(block_size);
        let entries = if has_parent {
            data_blocks.div_ceil(chunk_ratio) * (chunk_ratio + 1)
        } else {
            data_blocks + data_blocks.saturating_sub(1) / chunk_ratio
        };
        Ok(Self {
            virtual_size,
            block_size,
            sector_size,
            chunk_ratio,
            data_blocks,
            entries,
            has_parent,
        })
    }

    /// BAT index of payload block `block`.
    ///
    /// # Errors
    /// `OutOfRange` when the index overflows (a block number no disk has).
    pub fn payload_index(&self, block: u64) -> Result<u64> {
        block
            .checked_add(self.chunk_of(block))
            .ok_or_else(|| overflow("BAT index of a payload block"))
    }

    /// BAT index of the sector-bitmap entry of chunk `chunk`.
    ///
    /// # Errors
    /// `OutOfRange` when the index overflows (a chunk number no disk has).
    pub fn bitmap_index(&self, chunk: u64) -> Result<u64> {
        chunk
            .checked_mul(self.group())
            .and_then(|i| i.checked_add(self.chunk_ratio))
            .ok_or_else(|| overflow("BAT index of a sector bitmap"))
    }

    /// Entries per chunk: its payload entries and its sector-bitmap entry.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "chunk_ratio is at most 32768 (from_parts)"
    )]
    pub fn group(&self) -> u64 {
        self.chunk_ratio + 1
    }

    /// The chunk payload block `block` belongs to.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "chunk_ratio is at least 16 (from_parts), never zero"
    )]
    pub fn chunk_of(&self, block: u64) -> u64 {
        block / self.chunk_ratio
    }

    /// The position of payload block `block` inside its chunk (less than `chunk_ratio`).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "chunk_ratio is at least 16 (from_parts), never zero"
    )]
    pub fn slot_in_chunk(&self, block: u64) -> u64 {
        block % self.chunk_ratio
    }

    /// Sectors per payload block.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "sector_size is 512 or 4096 (from_parts), never zero"
    )]
    pub fn sectors_per_block(&self) -> u64 {
        self.block_size / self.sector_size
    }

    /// The first sector-bitmap bit of payload block `block` in its chunk's bitmap: its slot in
    /// the chunk times the sectors per block, below 2^23 (a chunk's bitmap is 1 MiB, 2^23 bits).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "slot_in_chunk < chunk_ratio, and chunk_ratio * sectors_per_block = 2^23 \
                  (from_parts)"
    )]
    pub fn bitmap_base(&self, block: u64) -> u64 {
        self.slot_in_chunk(block) * self.sectors_per_block()
    }

    /// The virtual disk offset of payload block `block`.
    ///
    /// # Errors
    /// `OutOfRange` when it overflows (a block number no disk has).
    pub fn disk_offset(&self, block: u64) -> Result<u64> {
        block
            .checked_mul(self.block_size)
            .ok_or_else(|| overflow("disk offset of a payload block"))
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
///
/// What a read looks up (the layout, where the BAT and the file end, the ranges blocks may
/// not overlap, and the cached BAT pages) is kept in a [`Sharded`] [`View`]: a read takes the
/// shard lock of its own thread, whose cache line no other core writes, and looks the entry up
/// and validates it while holding that guard, without touching the page's reference count.
/// Changes (a page loaded on a miss, an entry set, a file grown or cut, a resize or a BAT move)
/// lock every shard and change every copy.
#[derive(Debug)]
pub struct Bat {
    storage: Arc<dyn Storage>,
    view: Sharded<View>,
    bitmap_pages: RwLock<PageCache<u8>>,
}

/// One shard's copy of what BAT lookups read.
#[derive(Debug, Clone)]
struct View {
    layout: Layout,
    bounds: Bounds,
    pages: PageCache<u64>,
}

/// Where the BAT lives and what its entries are checked against.
#[derive(Debug, Clone)]
struct Bounds {
    region_offset: u64,
    file_len: u64,
    forbidden: Vec<Forbidden>,
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
            view: Sharded::new(View {
                layout,
                bounds: Bounds {
                    region_offset,
                    file_len,
                    forbidden,
                },
                pages: PageCache::new(MAX_CACHED_BAT_PAGES),
            }),
            bitmap_pages: RwLock::new(PageCache::new(MAX_CACHED_BITMAP_PAGES)),
        }
    }

    /// The BAT's file offset.
    pub fn region_offset(&self) -> u64 {
        self.view.read().bounds.region_offset
    }

    /// Points the BAT at its new region (after its contents were copied there) and replaces the
    /// ranges blocks may not overlap.
    pub fn relocate(&self, offset: u64, forbidden: Vec<Forbidden>) {
        self.view.update(|v| {
            v.bounds.forbidden.clone_from(&forbidden);
            v.bounds.region_offset = offset;
        });
    }

    /// The ranges blocks may not overlap.
    pub fn forbidden(&self) -> Vec<Forbidden> {
        self.view.read().bounds.forbidden.clone()
    }

    /// Sets the file length after truncation.
    pub fn reset_file_len(&self, len: u64) {
        self.view.update(|v| v.bounds.file_len = len);
    }

    /// The current layout (it changes on resize).
    pub fn layout(&self) -> Layout {
        self.view.read().layout
    }

    /// Replaces the layout after a resize.
    pub fn set_layout(&self, layout: Layout) {
        self.view.update(|v| v.layout = layout);
    }

    fn file_len(&self) -> u64 {
        self.view.read().bounds.file_len
    }

    /// Records that the file grew (a block was allocated).
    pub fn set_file_len(&self, len: u64) {
        self.view
            .update(|v| v.bounds.file_len = v.bounds.file_len.max(len));
    }

    /// Reads a whole 4 KiB page of the region (the part past the end of the file reads as
    /// zeros). The region is a multiple of 1 MiB and holds every entry, so every page of an
    /// entry lies inside it.
    fn load_page(&self, page: u64) -> Result<Arc<[u64]>> {
        let (off, file_len) = {
            let v = self.view.read();
            (v.bounds.page_offset(page)?, v.bounds.file_len)
        };
        let mut buf = vec![0u8; PAGE_BYTES];
        // More than a page past `off` (or more than `usize` holds) is a whole page.
        let avail =
            usize::try_from(file_len.saturating_sub(off)).map_or(PAGE_BYTES, |n| n.min(PAGE_BYTES));
        if let Some(part) = buf.get_mut(..avail)
            && !part.is_empty()
        {
            self.storage
                .read_exact_at(off, part)
                .map_err(|e| io_at("BAT", off, e))?;
        }
        Ok(buf
            .as_chunks::<8>()
            .0
            .iter()
            .map(|c| u64::from_le_bytes(*c))
            .collect())
    }

    /// BAT page `page`, loaded (and cached) on a miss: for writers and scans, which keep the
    /// page. Lookups use [`with_entry`](Self::with_entry), which touches no reference count.
    fn page(&self, page: u64) -> Result<Arc<[u64]>> {
        if let Some(p) = self.view.read().pages.get(page) {
            return Ok(p);
        }
        let entries = self.load_page(page)?;
        Ok(self
            .view
            .update(|v| v.pages.insert_clean(page, entries.clone())))
    }

    /// Calls `f` with the calling thread's [`Bounds`] and entry `index` (an entry the layout
    /// uses) under one guard of the thread's shard, after checking that the entry lies inside
    /// the file; a page not cached is read first (with no lock held) and cached. `f` runs
    /// under the guard, so it must take no lock of this `Bat`.
    ///
    /// # Errors
    /// `Truncated` when the entry lies past the end of the file; I/O errors loading its page;
    /// what `f` returns.
    fn with_entry<R>(
        &self,
        index: u64,
        f: impl FnOnce(&Bounds, BatEntry) -> Result<R>,
    ) -> Result<R> {
        let page_no = index / ENTRIES_PER_PAGE;
        let slot = fit::<usize, _>(index % ENTRIES_PER_PAGE, "BAT entry slot")?;
        {
            let v = self.view.read();
            // An entry past the end of a truncated file is unknown, never NOT_PRESENT. Writable
            // sessions never fail here: their open refuses a BAT region past the end of the
            // file.
            v.bounds.entry_in_file(index)?;
            if let Some(page) = v.pages.get_ref(page_no) {
                return f(&v.bounds, entry_of(page, index, slot)?);
            }
        }
        let loaded = self.load_page(page_no)?;
        // What another thread cached meanwhile wins (it may be a page changed since).
        let page = self
            .view
            .update(|v| v.pages.insert_clean(page_no, loaded.clone()));
        let v = self.view.read();
        v.bounds.entry_in_file(index)?;
        f(&v.bounds, entry_of(&page, index, slot)?)
    }

    /// Sets the raw entry at `index` in the cache and returns the index of its 4 KiB page,
    /// which the caller must log and write back.
    ///
    /// # Errors
    /// I/O errors loading the page.
    pub fn set_entry(&self, index: u64, entry: BatEntry) -> Result<u64> {
        let page = index / ENTRIES_PER_PAGE;
        let current = self.page(page)?;
        let mut copy = current.to_vec();
        let slot = fit::<usize, _>(index % ENTRIES_PER_PAGE, "BAT entry slot")?;
        *copy.get_mut(slot).ok_or_else(|| {
            Error::new(
                ErrorKind::OutOfRange,
                format!("BAT entry {index} is outside its cached page"),
            )
        })? = entry.raw();
        let copy: Arc<[u64]> = copy.into();
        self.view
            .update(|v| v.pages.insert_changed(page, copy.clone()));
        Ok(page)
    }

    /// The file offset and bytes of BAT page `page`, as cached.
    ///
    /// # Errors
    /// I/O errors loading the page.
    pub fn page_bytes(&self, page: u64) -> Result<(u64, Vec<u8>)> {
        let entries = self.page(page)?;
        let bytes = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
        Ok((self.view.read().bounds.page_offset(page)?, bytes))
    }

    /// Sets the sector-bitmap bits `[first_bit, first_bit + count)` of the bitmap block at
    /// `sb_offset` (a validated block: it and its 1 MiB lie inside the file) in the cache;
    /// returns the file offsets of the 4 KiB pages changed.
    ///
    /// # Errors
    /// `OutOfRange` when the bits are not inside the 1 MiB bitmap block or the block's end
    /// overflows; I/O errors loading a page.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "checked at the top: bit < end <= 2^23 (SB_BITS) and sb_offset + 1 MiB does \
                  not overflow, so every page offset and page end bit is at most sb_offset + 1 MiB"
    )]
    pub fn set_bits(&self, sb_offset: u64, first_bit: u64, count: u64) -> Result<Vec<u64>> {
        let end = first_bit
            .checked_add(count)
            .filter(|&e| e <= SB_BITS)
            .ok_or_else(|| overflow("sector bitmap bit range"))?;
        sb_offset
            .checked_add(MIB)
            .ok_or_else(|| overflow("sector bitmap block end"))?;
        let mut changed = Vec::new();
        let mut bit = first_bit;
        while bit < end {
            let page_off = sb_offset + bit / 8 / SB_PAGE * SB_PAGE;
            let page_end_bit = (bit / 8 / SB_PAGE + 1) * SB_PAGE * 8;
            let stop = end.min(page_end_bit);
            let mut copy = self.bitmap_page(page_off)?.to_vec();
            for b in bit..stop {
                let byte = fit::<usize, _>(b / 8 % SB_PAGE, "sector bitmap byte")?;
                *copy.get_mut(byte).ok_or_else(|| {
                    Error::new(
                        ErrorKind::OutOfRange,
                        format!("sector bitmap bit {b} is outside its page"),
                    )
                })? |= 1 << (b % 8);
            }
            self.bitmap_pages
                .write()
                .insert_changed(page_off, copy.into());
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

    /// The entry at `index` (empty past the entries the layout uses).
    ///
    /// # Errors
    /// I/O errors.
    pub fn entry(&self, index: u64) -> Result<BatEntry> {
        self.entry_in(&self.layout(), index)
    }

    /// [`entry`](Bat::entry) under a layout the caller took once for its whole request.
    ///
    /// # Errors
    /// As [`entry`](Bat::entry).
    pub fn entry_in(&self, layout: &Layout, index: u64) -> Result<BatEntry> {
        if index >= layout.entries {
            return Ok(BatEntry::EMPTY);
        }
        self.with_entry(index, |_, entry| Ok(entry))
    }

    /// The file offset of entry `index`, for messages and the truncation check (see
    /// [`Bounds::entry_at`]).
    pub fn entry_at(&self, index: u64) -> u64 {
        self.view.read().bounds.entry_at(index)
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
        let index = layout.payload_index(block)?;
        if index >= layout.entries {
            return self
                .view
                .read()
                .bounds
                .payload_state(layout, block, index, BatEntry::EMPTY);
        }
        self.with_entry(index, |bounds, entry| {
            bounds.payload_state(layout, block, index, entry)
        })
    }

    /// [`bitmap`](Bat::bitmap) under a layout the caller took once for its whole request.
    ///
    /// # Errors
    /// As [`bitmap`](Bat::bitmap).
    pub fn bitmap_in(&self, layout: &Layout, chunk: u64) -> Result<Option<u64>> {
        let index = layout.bitmap_index(chunk)?;
        if index >= layout.entries {
            return self
                .view
                .read()
                .bounds
                .bitmap_state(chunk, index, BatEntry::EMPTY);
        }
        self.with_entry(index, |bounds, entry| {
            bounds.bitmap_state(chunk, index, entry)
        })
    }

    /// The file offset of chunk `chunk`'s sector bitmap, if present.
    ///
    /// # Errors
    /// `Corrupt` for invalid entries; I/O errors.
    pub fn bitmap(&self, chunk: u64) -> Result<Option<u64>> {
        self.bitmap_in(&self.layout(), chunk)
    }
}

/// Entry checks, against the bounds of one consistent view (no lock taken).
impl Bounds {
    /// The file offset of BAT page `page`.
    ///
    /// # Errors
    /// `OutOfRange` when it overflows (a page past any BAT region).
    fn page_offset(&self, page: u64) -> Result<u64> {
        page.checked_mul(PAGE_BYTES_U64)
            .and_then(|o| o.checked_add(self.region_offset))
            .ok_or_else(|| overflow("BAT page offset"))
    }

    /// The file offset of entry `index`, for messages and the truncation check. It saturates
    /// at `u64::MAX`, past the end of any file, only for an index past every BAT region: the
    /// region holds every entry the layout uses (the open checks it) and its end does not
    /// overflow (`read_region_table` checks it).
    fn entry_at(&self, index: u64) -> u64 {
        self.region_offset.saturating_add(index.saturating_mul(8))
    }

    /// `Truncated` unless entry `index` lies inside the file.
    fn entry_in_file(&self, index: u64) -> Result<()> {
        let at = self.entry_at(index);
        let file_len = self.file_len;
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
        // A block whose end overflows (FileOffsetMB near 2^44) ends past every structure and
        // past the end of any file: the saturated end says so, and BatBeyondFile reports it.
        let end = offset.saturating_add(needed);
        for f in &self.forbidden {
            if offset < f.end && end > f.start {
                return Err(Corruption::BatOverlap {
                    index,
                    offset,
                    what: f.what,
                }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
            }
        }
        if end > self.file_len {
            return Err(Corruption::BatBeyondFile {
                index,
                block,
                offset,
                end,
                file_len: self.file_len,
            }
            .at(format!("BAT entry {index}"), self.entry_at(index)));
        }
        Ok(())
    }

    /// Validates the entry of payload block `block` (at BAT index `index`).
    fn payload_state(
        &self,
        layout: &Layout,
        block: u64,
        index: u64,
        entry: BatEntry,
    ) -> Result<BlockState> {
        let bad_state = |e: InvalidState| {
            Corruption::BatState {
                index,
                state: e.value,
            }
            .at(format!("BAT entry {index}"), self.entry_at(index))
        };
        if entry.reserved() != 0 {
            return Err(Corruption::BatReservedBits {
                index,
                value: entry.raw(),
            }
            .at(format!("BAT entry {index}"), self.entry_at(index)));
        }
        let state = entry.payload_state().map_err(bad_state)?;
        let offset = entry.file_offset();
        // The last block may be partial; only the part inside the virtual disk must exist.
        // A block past the end of the disk (its entry is past the BAT, so NOT_PRESENT) needs
        // no bytes.
        let disk_offset = layout.disk_offset(block)?;
        let needed = layout
            .virtual_size
            .saturating_sub(disk_offset)
            .min(layout.block_size);
        let block_ref = BlockRef::Payload { block, disk_offset };
        Ok(match state {
            PayloadState::NotPresent => BlockState::NotPresent,
            PayloadState::Undefined
            | PayloadState::Zero
            | PayloadState::Unmapped
            | PayloadState::UnmappedLegacy => BlockState::Zero,
            PayloadState::FullyPresent => {
                self.check_block(index, block_ref, offset, needed)?;
                BlockState::Full(offset)
            }
            PayloadState::PartiallyPresent => {
                if !layout.has_parent {
                    return Err(Corruption::PartiallyPresentWithoutParent { index }
                        .at(format!("BAT entry {index}"), self.entry_at(index)));
                }
                self.check_block(index, block_ref, offset, needed)?;
                BlockState::Partial(offset)
            }
        })
    }

    /// Validates the entry of chunk `chunk`'s sector bitmap (at BAT index `index`).
    fn bitmap_state(&self, chunk: u64, index: u64, entry: BatEntry) -> Result<Option<u64>> {
        if entry.reserved() != 0 {
            return Err(Corruption::BatReservedBits {
                index,
                value: entry.raw(),
            }
            .at(format!("BAT entry {index}"), self.entry_at(index)));
        }
        match entry.bitmap_state() {
            Ok(BitmapState::NotPresent) => Ok(None),
            Ok(BitmapState::Present) => {
                let offset = entry.file_offset();
                self.check_block(index, BlockRef::SectorBitmap { chunk }, offset, MIB)?;
                Ok(Some(offset))
            }
            Err(e) => Err(Corruption::BatState {
                index,
                state: e.value,
            }
            .at(format!("BAT entry {index}"), self.entry_at(index))),
        }
    }
}

impl Bat {
    fn bitmap_page(&self, file_offset: u64) -> Result<Arc<[u8]>> {
        if let Some(p) = self.bitmap_pages.read().get(file_offset) {
            return Ok(p);
        }
        let mut buf = vec![0u8; SB_PAGE_BYTES];
        self.storage
            .read_exact_at(file_offset, &mut buf)
            .map_err(|e| io_at("sector bitmap", file_offset, e))?;
        let page: Arc<[u8]> = buf.into();
        // Changed pages may hold changes not yet written back, so only unchanged ones are
        // dropped (MAX_CACHED_BITMAP_PAGES).
        Ok(self.bitmap_pages.write().insert_clean(file_offset, page))
    }

    /// Calls `f(first_sector, count, present)` for the runs of sectors `[first, first + count)`
    /// of payload block `block` whose sector-bitmap bits are equal, under a layout the caller
    /// took once for its whole request.
    ///
    /// # Errors
    /// `Corrupt` when the bitmap is missing; `OutOfRange` when the sectors are not inside the
    /// block; I/O errors.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "checked at the top: first + count <= sectors_per_block, so s < first + count, \
                  bit = base + s < 2^23 (bitmap_base) and byte < 1 MiB; sb + 1 MiB lies inside \
                  the file (bitmap_in checked the block), so page_off cannot overflow; \
                  s - run_start and first + count - run_start are >= 0 as run_start <= s"
    )]
    pub fn bitmap_runs(
        &self,
        layout: &Layout,
        block: u64,
        first: u64,
        count: u64,
        mut f: impl FnMut(u64, u64, bool),
    ) -> Result<()> {
        if first
            .checked_add(count)
            .is_none_or(|end| end > layout.sectors_per_block())
        {
            return Err(overflow("sector range of a payload block"));
        }
        let chunk = layout.chunk_of(block);
        let Some(sb) = self.bitmap_in(layout, chunk)? else {
            let index = layout.payload_index(block)?;
            return Err(Corruption::SectorBitmapMissing { index }
                .at(format!("BAT entry {index}"), self.entry_at(index)));
        };
        let base = layout.bitmap_base(block);
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
            let in_page = fit::<usize, _>(byte % SB_PAGE, "sector bitmap byte")?;
            let v = page_cache
                .as_ref()
                .and_then(|(_, page)| page.get(in_page))
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
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "first <= index <= i < first + n <= layout.entries < 2^27 (Layout::from_parts), \
                  so products by 8 are below 2^30 and page_no + 1 below 2^18; region + first * 8 \
                  is inside the BAT region, whose end does not overflow (read_region_table) and \
                  which holds every entry (the open's BatTooSmall check); group >= 17, never \
                  zero; chunk * chunk_ratio + slot is a block number below 2^27"
    )]
    pub fn verify_all(&self, mut f: impl FnMut(Error) -> Result<()>) -> Result<()> {
        const PIECE_ENTRIES: u64 = 128 * 1024;
        let layout = self.layout();
        let region = self.region_offset();
        let file_len = self.file_len();
        let group = layout.group();
        let mut buf = vec![0u8; fit::<usize, _>(PIECE_ENTRIES * 8, "BAT piece")?];
        let mut first = 0;
        while first < layout.entries {
            let n = (layout.entries - first).min(PIECE_ENTRIES);
            let off = region + first * 8;
            // Bytes of this piece inside the file; entries past them are reported below.
            let avail = file_len.saturating_sub(off).min(n * 8);
            if let Some(part) = buf.get_mut(..fit::<usize, _>(avail, "BAT piece")?)
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
                // The page as cached (if it is), then the bounds: the file grows before an entry
                // that points into the new part is set, so these bounds hold every block the
                // page points to.
                let (cached, bounds) = {
                    let v = self.view.read();
                    (v.pages.get(page_no), v.bounds.clone())
                };
                for i in index..page_end {
                    let entry = if let Some(p) = &cached {
                        let slot = fit::<usize, _>(i % ENTRIES_PER_PAGE, "BAT entry slot")?;
                        entry_of(p, i, slot)?
                    } else {
                        let at = fit::<usize, _>((i - first) * 8, "BAT piece offset")?;
                        match buf
                            .get(at..at.saturating_add(8))
                            .filter(|_| (i - first + 1) * 8 <= avail)
                            .and_then(|b| <[u8; 8]>::try_from(b).ok())
                        {
                            Some(b) => BatEntry::from_raw(u64::from_le_bytes(b)),
                            None => {
                                if let Err(e) = bounds.entry_in_file(i) {
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
                            bounds.bitmap_state(chunk, i, entry).map(|_| ())
                        } else {
                            Ok(())
                        }
                    } else {
                        let block = chunk * layout.chunk_ratio + slot;
                        if block < layout.data_blocks {
                            bounds.payload_state(&layout, block, i, entry).map(|_| ())
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
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "each count is at most data_blocks <= 2^26 (Layout::from_parts)"
    )]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_ratio_follows_the_sector_and_block_size() {
        // 2^23 × sector size / block size (2.5, table in 2.5.1).
        for (sector, block, ratio) in [
            (512, MIB, 4096),
            (512, 32 * MIB, 128),
            (512, 256 * MIB, 16),
            (4096, MIB, 32768),
            (4096, 256 * MIB, 128),
        ] {
            let l = Layout::from_parts(GIB, u32::try_from(block).unwrap(), sector, false).unwrap();
            assert_eq!(l.chunk_ratio, ratio, "sector {sector}, block {block}");
            assert_eq!(l.sectors_per_block(), block / u64::from(sector));
        }
    }

    const GIB: u64 = 1024 * MIB;

    #[test]
    fn entries_interleave_bitmaps_after_each_chunk() {
        // 512-byte sectors, 256 MiB blocks: 16 payload entries, then a bitmap entry.
        let l = Layout::from_parts(64 * GIB, 256 << 20, 512, true).unwrap();
        assert_eq!(l.chunk_ratio, 16);
        assert_eq!(l.data_blocks, 256);
        assert_eq!(l.payload_index(0).unwrap(), 0);
        assert_eq!(l.payload_index(15).unwrap(), 15);
        assert_eq!(l.bitmap_index(0).unwrap(), 16);
        assert_eq!(l.payload_index(16).unwrap(), 17);
        assert_eq!(l.bitmap_index(15).unwrap(), 15 * 17 + 16);
        assert_eq!(l.payload_index(255).unwrap(), 255 + 15);
        // 16 whole chunks, each with its bitmap entry.
        assert_eq!(l.entries, 16 * 17);
    }

    #[test]
    fn last_partial_block_and_chunk() {
        // 33 blocks of 256 MiB and a bit: 34 payload blocks, the last one partial.
        let size = 33 * 256 * MIB + 512;
        let diff = Layout::from_parts(size, 256 << 20, 512, true).unwrap();
        assert_eq!(diff.data_blocks, 34);
        // A differencing BAT holds whole chunks: 3 chunks × 17 entries.
        assert_eq!(diff.entries, 3 * 17);
        assert_eq!(diff.bitmap_index(2).unwrap(), 2 * 17 + 16);
        assert!(diff.bitmap_index(2).unwrap() < diff.entries);
        // Any other BAT ends with the last payload entry, bitmaps interleaved before it.
        let base = Layout::from_parts(size, 256 << 20, 512, false).unwrap();
        assert_eq!(base.entries, 34 + 33 / 16);
        assert_eq!(base.payload_index(33).unwrap(), base.entries - 1);
        // Exactly one chunk: no bitmap entry after it in a base image.
        let one = Layout::from_parts(16 * 256 * MIB, 256 << 20, 512, false).unwrap();
        assert_eq!(one.entries, 16);
        assert_eq!(one.payload_index(15).unwrap(), 15);
    }

    #[test]
    fn sector_bitmap_block_of_a_sector() {
        // Each sector-bitmap block covers one chunk: chunk_ratio × block bytes, 2^23 sectors.
        let l = Layout::from_parts(64 * GIB, 32 << 20, 512, true).unwrap();
        let sectors_per_chunk = l.chunk_ratio * l.sectors_per_block();
        assert_eq!(sectors_per_chunk, 1 << 23);
        assert_eq!(sectors_per_chunk / 8, MIB);
        let block = 129; // chunk 1, second block
        assert_eq!(block / l.chunk_ratio, 1);
        assert_eq!(l.payload_index(block).unwrap(), 130);
        assert_eq!(l.bitmap_index(block / l.chunk_ratio).unwrap(), 2 * 129 - 1);
    }

    /// A BAT over `entries` entries of a 1 MiB-block base disk whose region is at offset 0 of
    /// an in-memory file holding `fill` in every entry.
    fn bat_of(entries: u64, fill: u64) -> (Bat, Arc<vd_core::MemStorage>) {
        let bytes: Vec<u8> = (0..entries).flat_map(|_| fill.to_le_bytes()).collect();
        let len = bytes.len() as u64;
        let storage = Arc::new(vd_core::MemStorage::from_bytes(bytes));
        let layout = Layout::from_parts(entries * MIB, 1 << 20, 512, false).unwrap();
        (
            Bat::new(storage.clone(), layout, 0, len, Vec::new()),
            storage,
        )
    }

    #[test]
    fn the_bat_page_cache_holds_at_most_its_cap_of_unchanged_pages() {
        // Just over the cap: reading one entry of every page never holds more than the cap.
        let pages = MAX_CACHED_BAT_PAGES as u64 + 1;
        let (bat, _) = bat_of(pages * ENTRIES_PER_PAGE, 0);
        for p in 0..pages {
            assert_eq!(bat.entry(p * ENTRIES_PER_PAGE).unwrap(), BatEntry::EMPTY);
            assert!(
                bat.view.read().pages.len() <= MAX_CACHED_BAT_PAGES,
                "page {p}"
            );
        }
        // At the cap every page stays cached.
        let (bat, _) = bat_of(MAX_CACHED_BAT_PAGES as u64 * ENTRIES_PER_PAGE, 0);
        for p in 0..MAX_CACHED_BAT_PAGES as u64 {
            bat.entry(p * ENTRIES_PER_PAGE).unwrap();
        }
        assert_eq!(bat.view.read().pages.len(), MAX_CACHED_BAT_PAGES);
    }

    #[test]
    fn a_changed_bat_page_survives_the_eviction_of_unchanged_ones() {
        let pages = 2 * MAX_CACHED_BAT_PAGES as u64 + 1;
        let (bat, _) = bat_of(pages * ENTRIES_PER_PAGE, 0);
        let zero = BatEntry::payload(PayloadState::Zero, 0);
        bat.set_entry(5, zero).unwrap();
        for p in 1..pages {
            bat.entry(p * ENTRIES_PER_PAGE).unwrap();
        }
        // The file still holds 0 there: only the cache has the change.
        assert_eq!(bat.entry(5).unwrap(), zero);
        assert!(bat.view.read().pages.len() <= MAX_CACHED_BAT_PAGES + 1);
    }

    #[test]
    fn the_bitmap_page_cache_holds_at_most_its_cap_of_unchanged_pages() {
        let pages = MAX_CACHED_BITMAP_PAGES + 1;
        let storage = Arc::new(vd_core::MemStorage::from_bytes(vec![
            0;
            pages * SB_PAGE_BYTES
        ]));
        let layout = Layout::from_parts(MIB, 1 << 20, 512, true).unwrap();
        let bat = Bat::new(
            storage,
            layout,
            0,
            (pages * SB_PAGE_BYTES) as u64,
            Vec::new(),
        );
        let changed = bat.set_bits(0, 3, 1).unwrap();
        assert_eq!(changed, vec![0]);
        for p in 1..pages as u64 {
            bat.bitmap_page(p * SB_PAGE).unwrap();
            assert!(bat.bitmap_pages.read().len() <= MAX_CACHED_BITMAP_PAGES + 1);
        }
        assert_eq!(bat.bitmap_page_bytes(0).unwrap()[0], 1 << 3);
    }

    #[test]
    fn smallest_disk() {
        let l = Layout::from_parts(512, 1 << 20, 512, false).unwrap();
        assert_eq!((l.data_blocks, l.entries), (1, 1));
        let d = Layout::from_parts(512, 1 << 20, 512, true).unwrap();
        assert_eq!((d.data_blocks, d.entries), (1, 4097));
    }

    #[test]
    fn a_bat_entry_at_the_largest_file_offset_is_beyond_the_file_not_a_wrap() {
        // FileOffsetMB = 2^44 - 1 (the largest the field holds), FULLY_PRESENT: the block's end
        // overflows u64; it must be reported as beyond the end of the file, saturated.
        let raw = (((1u64 << 44) - 1) << 20) | u64::from(PayloadState::FullyPresent.bits());
        let (bat, _) = bat_of(16, raw);
        let e = bat.block(0).unwrap_err();
        match crate::error::corruption_of(&e) {
            Some(Corruption::BatBeyondFile {
                index, offset, end, ..
            }) => {
                assert_eq!((*index, *offset, *end), (0, u64::MAX - (MIB - 1), u64::MAX));
            }
            other => panic!("{other:?}: {e}"),
        }
    }

    #[test]
    fn layout_rejects_values_past_its_caps_and_indexes_that_overflow() {
        let out = |r: Result<Layout>| r.unwrap_err().kind();
        assert_eq!(
            out(Layout::from_parts(MIB, 3 << 20, 512, false)),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            out(Layout::from_parts(MIB, 1 << 20, 0, true)),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            out(Layout::from_parts(MIB, 1 << 20, 520, true)),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            out(Layout::from_parts(
                MAX_VIRTUAL_SIZE + 512,
                1 << 20,
                512,
                false
            )),
            ErrorKind::OutOfRange
        );
        let l = Layout::from_parts(MIB, 1 << 20, 512, true).unwrap();
        assert_eq!(
            l.payload_index(u64::MAX).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            l.bitmap_index(u64::MAX).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
        assert_eq!(
            l.disk_offset(u64::MAX).unwrap_err().kind(),
            ErrorKind::OutOfRange
        );
    }

    #[test]
    fn sector_bitmap_bits_outside_the_bitmap_block_are_refused() {
        let (bat, _) = bat_of(16, 0);
        let e = bat.set_bits(MIB, SB_BITS - 8, 9).unwrap_err();
        assert!(e.to_string().contains("sector bitmap bit range"), "{e}");
        assert!(bat.set_bits(MIB, u64::MAX, 1).is_err());
        assert!(bat.set_bits(u64::MAX - 4096, 0, 1).is_err());
    }
}
