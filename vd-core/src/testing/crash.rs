//! What crash tests share: a model of what a disk may read after a power cut, the loss modes a
//! cut is restarted under, and the cut points of a script.

use std::collections::BTreeMap;

use super::{LossMode, SplitMix64};

const SECTOR: usize = 512;

/// What a disk may read after a crash: each 512-byte sector's flushed contents, or the contents
/// it had after any write since the last completed flush; and the flushed size or any size set
/// since. The model tracks the first `initial.len()` bytes of the disk.
#[derive(Debug, Clone)]
pub struct CrashModel {
    now: Vec<u8>,
    durable: Vec<u8>,
    since_flush: BTreeMap<usize, Vec<Vec<u8>>>,
    sizes: Vec<u64>,
}

impl CrashModel {
    /// A disk of `initial.len()` bytes holding `initial`, all of it flushed.
    pub fn new(initial: Vec<u8>) -> Self {
        let size = initial.len() as u64;
        Self::with_size(initial, size)
    }

    /// A disk of `size` bytes whose first `initial.len()` bytes (the part tracked) hold
    /// `initial`, all of it flushed.
    pub fn with_size(initial: Vec<u8>, size: u64) -> Self {
        Self {
            durable: initial.clone(),
            now: initial,
            since_flush: BTreeMap::new(),
            sizes: vec![size],
        }
    }

    /// Records that `[off, off + data.len())` now holds `data` (the part past the tracked bytes
    /// is not kept).
    pub fn wrote(&mut self, off: u64, data: &[u8]) {
        let off = usize::try_from(off).unwrap_or(usize::MAX);
        let end = off.saturating_add(data.len()).min(self.now.len());
        if off >= end {
            return;
        }
        self.now[off..end].copy_from_slice(&data[..end - off]);
        for s in off / SECTOR..end.div_ceil(SECTOR) {
            let to = ((s + 1) * SECTOR).min(self.now.len());
            let now = self.now[s * SECTOR..to].to_vec();
            self.since_flush.entry(s).or_default().push(now);
        }
    }

    /// Records a new disk size.
    pub fn resized(&mut self, size: u64) {
        self.sizes.push(size);
    }

    /// Records a completed flush: everything written and the last size set are durable.
    pub fn flushed(&mut self) {
        self.durable.clone_from(&self.now);
        self.since_flush.clear();
        let size = self.sizes.last().copied().unwrap_or(0);
        self.sizes = vec![size];
    }

    /// The flushed contents of the tracked bytes.
    pub fn durable(&self) -> &[u8] {
        &self.durable
    }

    /// The sizes a crash may leave: the flushed one, then each set since.
    pub fn sizes(&self) -> &[u64] {
        &self.sizes
    }

    /// Whether nothing was written since the last flush.
    pub fn is_settled(&self) -> bool {
        self.since_flush.is_empty()
    }

    /// Fails, naming `ctx`, unless a disk of `size` bytes whose first bytes are `buf` is a
    /// state the model allows.
    ///
    /// # Panics
    ///
    /// When it is not.
    #[track_caller]
    pub fn check(&self, size: u64, buf: &[u8], ctx: &str) {
        assert!(
            self.sizes.contains(&size),
            "{ctx}: size {size} is none of {:?}",
            self.sizes
        );
        for (s, got) in buf.chunks(SECTOR).enumerate() {
            let at = s * SECTOR;
            let old = self
                .durable
                .get(at..at + got.len())
                .unwrap_or(&[0u8; SECTOR][..got.len()]);
            if got == old {
                continue;
            }
            let new = self.since_flush.get(&s);
            assert!(
                new.is_some_and(|v| v.iter().any(|n| n.as_slice() == got)),
                "{ctx}: sector {s} (byte {at:#x}) is neither its flushed contents{} ({} \
                 candidates)",
                if new.is_some() {
                    " nor any written since"
                } else {
                    " (flushed, unchanged since)"
                },
                new.map_or(0, Vec::len)
            );
        }
    }
}

/// The loss modes a cut at `cut` is restarted under: the whole-write ones, reordering, and
/// tearing at 512- and 4096-byte sectors, each seeded by `cut`.
pub fn loss_modes(cut: u64) -> [LossMode; 7] {
    [
        LossMode::DropAll,
        LossMode::KeepAll,
        LossMode::Random(cut.wrapping_mul(7919).wrapping_add(1)),
        LossMode::Random(cut.wrapping_add(17)),
        LossMode::Reorder(cut.wrapping_mul(31).wrapping_add(5)),
        LossMode::Torn {
            seed: cut.wrapping_mul(131).wrapping_add(3),
            sector: 512,
        },
        LossMode::TornReordered {
            seed: cut.wrapping_mul(977).wrapping_add(11),
            sector: 4096,
        },
    ]
}

/// The cut points of a script of `mutations` mutating operations: every one (0 to
/// `mutations`), or `sample` seeded ones when `sample` is given and smaller.
pub fn cut_points(mutations: u64, sample: Option<u64>) -> Vec<u64> {
    match sample {
        Some(k) if k < mutations => {
            let mut r = SplitMix64::new(mutations);
            (0..k).map(|_| r.next_u64() % (mutations + 1)).collect()
        }
        _ => (0..=mutations).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_model_allows_flushed_or_written_contents_only() {
        let mut m = CrashModel::new(vec![0u8; 2048]);
        m.wrote(512, &[1u8; 512]);
        m.wrote(512, &[2u8; 512]);
        let mut buf = vec![0u8; 2048];
        m.check(2048, &buf, "nothing landed");
        buf[512..1024].fill(1);
        m.check(2048, &buf, "the first write landed");
        buf[0] = 9;
        let r = std::panic::catch_unwind(|| m.check(2048, &buf, "garbage"));
        assert!(r.is_err(), "a sector nobody wrote changed");
        m.flushed();
        assert!(m.is_settled());
        assert_eq!(&m.durable()[512..1024], &[2u8; 512][..]);
        let r = std::panic::catch_unwind(|| m.check(2048, &vec![0u8; 2048], "lost"));
        assert!(r.is_err(), "a flushed write was lost");
        m.resized(4096);
        m.check(4096, m.durable(), "the new size");
        m.check(2048, m.durable(), "the old size");
    }

    #[test]
    fn cut_points_are_all_or_a_seeded_sample() {
        assert_eq!(cut_points(3, None), vec![0, 1, 2, 3]);
        assert_eq!(cut_points(3, Some(10)), vec![0, 1, 2, 3]);
        let s = cut_points(100, Some(5));
        assert_eq!(s.len(), 5);
        assert!(s.iter().all(|&c| c <= 100));
        assert_eq!(s, cut_points(100, Some(5)), "the sample is seeded");
    }
}
