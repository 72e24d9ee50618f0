//! Where an image keeps its structures in its own file: [`Image::layout`]'s answer.
//!
//! [`Image::layout`]: crate::Image::layout

use serde::Serialize;

/// What a range of an image file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RegionKind {
    /// The file-type identifier at the start of the file (VHDX: `vhdxfile` and the creator).
    FileIdentifier,
    /// A header (VHDX keeps two copies).
    Header,
    /// A region table (VHDX keeps two copies).
    RegionTable,
    /// The metadata log.
    Log,
    /// The block allocation table.
    Bat,
    /// The metadata region (VHDX: the metadata table and its items).
    Metadata,
    /// Payload: virtual-disk data blocks, or the whole file for a raw image.
    Payload,
    /// Sector-bitmap blocks of a differencing image.
    SectorBitmap,
    /// Space the format sets aside and leaves unused (VHDX: the rest of the 1 MiB header
    /// section).
    Reserved,
    /// A structure the format lists but vd does not interpret (an unknown optional region).
    Other,
    /// Space no structure uses (front ends compute it from the other regions).
    Free,
}

/// One range of an image file and what it holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayoutRegion {
    /// What the range holds.
    pub kind: RegionKind,
    /// Which copy of a redundant structure (1 or 2), for headers and region tables.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub copy: Option<u8>,
    /// Start in the image file, in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Blocks in the range, for runs of payload or sector-bitmap blocks.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<u64>,
    /// A few words for people (which structure, whether it is the active copy).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

impl LayoutRegion {
    /// A range of `kind` with no copy number, block count or label.
    pub fn new(kind: RegionKind, offset: u64, length: u64) -> Self {
        Self {
            kind,
            copy: None,
            offset,
            length,
            blocks: None,
            label: None,
        }
    }

    /// The same range as copy `copy` of a redundant structure.
    #[must_use]
    pub fn with_copy(mut self, copy: u8) -> Self {
        self.copy = Some(copy);
        self
    }

    /// The same range with a label.
    #[must_use]
    pub fn with_label(mut self, label: impl Into<String>) -> Self {
        self.label = Some(label.into());
        self
    }

    /// The end of the range in the file (saturating: a range that would end past `u64::MAX`
    /// ends there).
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// Runs of fixed-size blocks of one [`RegionKind`] in a file, merged as they are added and kept
/// to a bounded number of entries, for [`Image::layout`](crate::Image::layout) of a format
/// whose blocks lie anywhere in its file.
///
/// Blocks may be added in any order. Adjacent blocks of one kind (one file-contiguous run) make
/// one entry. When more than `limit` entries are kept, runs of one kind separated by small gaps
/// are joined (the gap doubling until the count fits); such a run's `length` then exceeds
/// `blocks × block size`, which is how a reader tells it is coarse. Memory stays bounded by
/// `limit` whatever the number of blocks.
#[derive(Debug, Clone)]
pub struct BlockRuns {
    runs: Vec<LayoutRegion>,
    limit: usize,
    gap: u64,
}

impl BlockRuns {
    /// No runs yet; at most `limit` (at least 16) are kept.
    pub fn new(limit: usize) -> Self {
        Self {
            runs: Vec::new(),
            limit: limit.max(16),
            gap: 0,
        }
    }

    /// Adds one block of `kind` at `offset`, `length` bytes long.
    pub fn add(&mut self, kind: RegionKind, offset: u64, length: u64) {
        if let Some(last) = self.runs.last_mut()
            && last.kind == kind
            && last.end() == offset
        {
            last.length = last.length.saturating_add(length);
            last.blocks = Some(last.blocks.unwrap_or(0).saturating_add(1));
            return;
        }
        let mut run = LayoutRegion::new(kind, offset, length);
        run.blocks = Some(1);
        self.runs.push(run);
        if self.runs.len() > self.limit.saturating_mul(2) {
            self.compact();
        }
    }

    /// Sorts the runs, merges touching ones, and joins runs across gaps until at most `limit`
    /// remain.
    fn compact(&mut self) {
        loop {
            self.runs.sort_by_key(|r| (r.offset, r.kind));
            let gap = self.gap;
            let mut out: Vec<LayoutRegion> = Vec::with_capacity(self.runs.len());
            for r in self.runs.drain(..) {
                if let Some(last) = out.last_mut()
                    && last.kind == r.kind
                    && r.offset >= last.end()
                    && r.offset.saturating_sub(last.end()) <= gap
                {
                    last.length = r.end().saturating_sub(last.offset);
                    last.blocks = Some(
                        last.blocks
                            .unwrap_or(0)
                            .saturating_add(r.blocks.unwrap_or(0)),
                    );
                    continue;
                }
                out.push(r);
            }
            self.runs = out;
            if self.runs.len() <= self.limit {
                return;
            }
            self.gap = self.gap.saturating_mul(2).max(1 << 20);
        }
    }

    /// The runs, sorted by offset.
    pub fn finish(mut self) -> Vec<LayoutRegion> {
        self.compact();
        self.runs
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn adjacent_blocks_make_one_run_in_any_order() {
        let mut runs = BlockRuns::new(16);
        for b in [3u64, 1, 2, 0, 7] {
            runs.add(RegionKind::Payload, b << 20, 1 << 20);
        }
        runs.add(RegionKind::SectorBitmap, 4 << 20, 1 << 20);
        let r = runs.finish();
        let got: Vec<_> = r
            .iter()
            .map(|r| (r.kind, r.offset >> 20, r.length >> 20, r.blocks))
            .collect();
        assert_eq!(
            got,
            vec![
                (RegionKind::Payload, 0, 4, Some(4)),
                (RegionKind::SectorBitmap, 4, 1, Some(1)),
                (RegionKind::Payload, 7, 1, Some(1)),
            ]
        );
    }

    #[test]
    fn many_scattered_blocks_stay_bounded_and_counted() {
        let mut runs = BlockRuns::new(16);
        // Every other MiB: 10 000 separate blocks.
        for b in 0..10_000u64 {
            runs.add(RegionKind::Payload, (2 * b) << 20, 1 << 20);
        }
        let r = runs.finish();
        assert!(r.len() <= 16, "{}", r.len());
        assert_eq!(r.iter().filter_map(|r| r.blocks).sum::<u64>(), 10_000);
        assert!(r.windows(2).all(|w| w[0].end() <= w[1].offset), "{r:?}");
        assert_eq!(r[0].offset, 0);
        assert_eq!(r.last().unwrap().end(), (2 * 9_999 + 1) << 20);
    }
}
