use std::io;

use parking_lot::Mutex;

use super::SplitMix64;
use crate::storage::{MemStorage, Storage};

/// Which unflushed writes survive a simulated power loss, and how they land.
///
/// Whatever the mode, every write that a completed flush covered survives. The modes model what
/// real media do with the writes still in their cache:
///
/// - whole writes survive or not, in the order they were issued ([`DropAll`](Self::DropAll),
///   [`KeepAll`](Self::KeepAll), [`Random`](Self::Random));
/// - the surviving writes land in any order, so of two overlapping writes the older one can land
///   last ([`Reorder`](Self::Reorder));
/// - a write is torn at sector granularity: each of its `sector`-byte sectors (aligned to the
///   file, as a disk's are) lands or not on its own ([`Torn`](Self::Torn)), and
///   [`TornReordered`](Self::TornReordered) also lands the surviving sectors in any order.
///
/// A `set_len` is file-system metadata rather than a cached sector: it survives or not like a
/// whole write, and writes are never reordered across it (each stretch of writes between two
/// `set_len` calls is shuffled on its own).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMode {
    /// Every write since the last completed flush is lost.
    DropAll,
    /// Every write reached the medium (the cache happened to drain).
    KeepAll,
    /// Each unflushed write independently survives or not, decided by the seed.
    Random(u64),
    /// Each unflushed write independently survives or not, and the survivors land in a seeded
    /// random order (overlapping writes can land old-over-new).
    Reorder(u64),
    /// Each `sector`-byte sector of each unflushed write independently lands or not, in the
    /// order the writes were issued.
    Torn {
        /// Seeds the decisions.
        seed: u64,
        /// The medium's sector size: 512, or 4096 for 4K-sector media. Zero is taken as 512.
        sector: u64,
    },
    /// [`Torn`](Self::Torn), and the surviving sectors land in a seeded random order.
    TornReordered {
        /// Seeds the decisions.
        seed: u64,
        /// The medium's sector size: 512, or 4096 for 4K-sector media. Zero is taken as 512.
        sector: u64,
    },
}

impl LossMode {
    fn seed(self) -> Option<u64> {
        match self {
            Self::DropAll | Self::KeepAll => None,
            Self::Random(seed) | Self::Reorder(seed) => Some(seed),
            Self::Torn { seed, .. } | Self::TornReordered { seed, .. } => Some(seed),
        }
    }

    fn sector(self) -> Option<u64> {
        match self {
            Self::Torn { sector, .. } | Self::TornReordered { sector, .. } => {
                Some(if sector == 0 { 512 } else { sector })
            }
            _ => None,
        }
    }

    fn reorders(self) -> bool {
        matches!(self, Self::Reorder(_) | Self::TornReordered { .. })
    }
}

#[derive(Debug, Clone)]
enum Pending {
    Write(u64, Vec<u8>),
    SetLen(u64),
}

#[derive(Debug, Default)]
struct State {
    current: Vec<u8>,
    durable: Vec<u8>,
    pending: Vec<Pending>,
    ops: u64,
    mutations: u64,
    fail_at: Option<u64>,
    power_off_after: Option<u64>,
    powered_off: bool,
}

/// A fault-injecting in-memory storage object: fails the Nth operation, or simulates power loss
/// by dropping the writes that no completed flush covered.
#[derive(Debug, Default)]
pub struct FaultyStorage {
    state: Mutex<State>,
}

fn apply(data: &mut Vec<u8>, p: &Pending) {
    match p {
        Pending::Write(off, bytes) => {
            let start = usize::try_from(*off).unwrap_or(usize::MAX);
            let end = start.saturating_add(bytes.len());
            if data.len() < end {
                data.resize(end, 0);
            }
            if let Some(dst) = data.get_mut(start..end) {
                dst.copy_from_slice(bytes);
            }
        }
        Pending::SetLen(len) => data.resize(usize::try_from(*len).unwrap_or(usize::MAX), 0),
    }
}

impl FaultyStorage {
    /// An empty, fully durable storage object.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage object holding `bytes`, all durable.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            state: Mutex::new(State {
                durable: bytes.clone(),
                current: bytes,
                ..State::default()
            }),
        }
    }

    /// Makes the `n`-th operation from now (0-based; reads, writes, `set_len` and flushes
    /// count) fail once with an I/O error.
    pub fn fail_nth(&self, n: u64) {
        let mut s = self.state.lock();
        s.fail_at = Some(s.ops + n);
    }

    /// Cuts the power after `n` more mutating operations (writes, `set_len`, flushes): from
    /// then on every operation fails, as if the machine had stopped.
    pub fn cut_power_after(&self, n: u64) {
        let mut s = self.state.lock();
        s.power_off_after = Some(s.mutations + n);
    }

    /// Cuts the power now.
    pub fn cut_power_now(&self) {
        self.state.lock().powered_off = true;
    }

    /// Whether the power has been cut.
    pub fn is_powered_off(&self) -> bool {
        self.state.lock().powered_off
    }

    /// Number of operations so far.
    pub fn op_count(&self) -> u64 {
        self.state.lock().ops
    }

    /// Number of mutating operations so far.
    pub fn mutation_count(&self) -> u64 {
        self.state.lock().mutations
    }

    /// The contents as the running system sees them.
    pub fn contents(&self) -> Vec<u8> {
        self.state.lock().current.clone()
    }

    /// The contents as they would be found after a power loss now (see [`LossMode`]).
    pub fn after_power_loss(&self, mode: LossMode) -> Vec<u8> {
        let s = self.state.lock();
        let mut data = s.durable.clone();
        let mut rng = mode.seed().map(SplitMix64::new);
        let mut coin = || rng.as_mut().is_some_and(|r| r.next_u64() & 1 == 1);
        // The writes that land, in the order they land; flushed out at each `set_len`.
        let mut stretch: Vec<Pending> = Vec::new();
        let mut order = mode
            .seed()
            .map(|s| SplitMix64::new(s ^ 0x9E37_79B9_7F4A_7C15));
        let mut land = |data: &mut Vec<u8>, stretch: &mut Vec<Pending>| {
            if let (true, Some(r)) = (mode.reorders(), order.as_mut()) {
                // Fisher-Yates with the seeded generator.
                for i in (1..stretch.len()).rev() {
                    let j = usize::try_from(r.next_u64() % (i as u64 + 1)).unwrap_or(0);
                    stretch.swap(i, j);
                }
            }
            for p in stretch.drain(..) {
                apply(data, &p);
            }
        };
        for p in &s.pending {
            match (mode, p) {
                (LossMode::DropAll, _) => {}
                (LossMode::KeepAll, _) => apply(&mut data, p),
                (_, Pending::SetLen(_)) => {
                    land(&mut data, &mut stretch);
                    if coin() {
                        apply(&mut data, p);
                    }
                }
                (_, Pending::Write(off, bytes)) => match mode.sector() {
                    None => {
                        if coin() {
                            stretch.push(p.clone());
                        }
                    }
                    Some(sector) => {
                        // Split at the medium's sector boundaries, each piece on its own.
                        let mut pos = 0usize;
                        while pos < bytes.len() {
                            let at = off + pos as u64;
                            let room = sector - at % sector;
                            let n = usize::try_from(room)
                                .unwrap_or(usize::MAX)
                                .min(bytes.len() - pos);
                            if coin()
                                && let Some(piece) = bytes.get(pos..pos + n)
                            {
                                stretch.push(Pending::Write(at, piece.to_vec()));
                            }
                            pos += n;
                        }
                    }
                },
            }
        }
        land(&mut data, &mut stretch);
        data
    }

    /// A fresh storage object holding [`after_power_loss`](Self::after_power_loss).
    pub fn restart(&self, mode: LossMode) -> MemStorage {
        MemStorage::from_bytes(self.after_power_loss(mode))
    }

    fn begin(&self, s: &mut State, mutating: bool) -> io::Result<()> {
        if s.powered_off {
            return Err(io::Error::other("simulated power loss"));
        }
        let n = s.ops;
        s.ops += 1;
        if mutating {
            if s.power_off_after.is_some_and(|limit| s.mutations >= limit) {
                s.powered_off = true;
                return Err(io::Error::other("simulated power loss"));
            }
            s.mutations += 1;
        }
        if s.fail_at == Some(n) {
            s.fail_at = None;
            return Err(io::Error::other("injected i/o failure"));
        }
        Ok(())
    }
}

impl Storage for FaultyStorage {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        self.begin(&mut s, false)?;
        let start = usize::try_from(offset).map_err(io::Error::other)?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::other("range overflows"))?;
        let src = s
            .current
            .get(start..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut s = self.state.lock();
        self.begin(&mut s, true)?;
        let p = Pending::Write(offset, buf.to_vec());
        apply(&mut s.current, &p);
        s.pending.push(p);
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        let s = self.state.lock();
        if s.powered_off {
            return Err(io::Error::other("simulated power loss"));
        }
        Ok(s.current.len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut s = self.state.lock();
        self.begin(&mut s, true)?;
        let p = Pending::SetLen(len);
        apply(&mut s.current, &p);
        s.pending.push(p);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        let mut s = self.state.lock();
        self.begin(&mut s, true)?;
        // Apply the pending operations instead of copying the whole file: O(bytes written).
        let pending = std::mem::take(&mut s.pending);
        for p in &pending {
            apply(&mut s.durable, p);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unflushed_writes_are_lost() {
        let f = FaultyStorage::new();
        f.write_all_at(0, &[1; 4]).unwrap();
        f.flush().unwrap();
        f.write_all_at(2, &[2; 4]).unwrap();
        assert_eq!(f.after_power_loss(LossMode::DropAll), vec![1; 4]);
        assert_eq!(
            f.after_power_loss(LossMode::KeepAll),
            vec![1, 1, 2, 2, 2, 2]
        );
        assert_eq!(f.contents(), vec![1, 1, 2, 2, 2, 2]);
    }

    /// Every seeded mode, for seeds `0..n`, at 512 and 4096-byte sectors.
    fn seeded_modes(n: u64) -> Vec<LossMode> {
        let mut modes = Vec::new();
        for seed in 0..n {
            modes.push(LossMode::Random(seed));
            modes.push(LossMode::Reorder(seed));
            for sector in [512, 4096] {
                modes.push(LossMode::Torn { seed, sector });
                modes.push(LossMode::TornReordered { seed, sector });
            }
        }
        modes
    }

    #[test]
    fn flushed_data_is_never_lost() {
        let f = FaultyStorage::new();
        f.write_all_at(0, &[1; 8192]).unwrap();
        f.set_len(16384).unwrap();
        f.flush().unwrap();
        let durable = f.contents();
        // Unflushed: overlapping writes, a shrink and a grow.
        f.write_all_at(100, &[2; 5000]).unwrap();
        f.write_all_at(0, &[3; 600]).unwrap();
        f.set_len(12288).unwrap();
        f.write_all_at(4096, &[4; 4096]).unwrap();
        f.set_len(20480).unwrap();
        for mode in seeded_modes(64)
            .into_iter()
            .chain([LossMode::DropAll, LossMode::KeepAll])
        {
            let after = f.after_power_loss(mode);
            // Every byte is its flushed value or one of the values written over it since.
            for (i, &b) in after.iter().enumerate() {
                let old = durable.get(i).copied().unwrap_or(0);
                let ok = b == old
                    || (100..5100).contains(&i) && b == 2
                    || i < 600 && b == 3
                    || (4096..8192).contains(&i) && b == 4;
                assert!(ok, "{mode:?}: byte {i} is {b}");
            }
            assert!(after.len() >= 8192, "{mode:?}: flushed length lost");
        }
        assert_eq!(f.after_power_loss(LossMode::DropAll), durable);
    }

    #[test]
    fn a_torn_write_lands_some_sectors_new_and_some_old() {
        for sector in [512u64, 4096] {
            let f = FaultyStorage::from_bytes(vec![0; 8 * 4096]);
            f.write_all_at(0, &[9; 8 * 4096]).unwrap();
            let mut torn = 0;
            for seed in 0..32 {
                let after = f.after_power_loss(LossMode::Torn { seed, sector });
                let s = usize::try_from(sector).unwrap();
                let new: Vec<bool> = after.chunks(s).map(|c| c[0] == 9).collect();
                for (i, c) in after.chunks(s).enumerate() {
                    // Whole sectors: never a sector half old, half new.
                    assert!(c.iter().all(|&b| b == c[0]), "sector {i} torn inside");
                }
                if new.contains(&true) && new.contains(&false) {
                    torn += 1;
                }
            }
            assert!(
                torn > 16,
                "{sector}: only {torn} of 32 seeds tore the write"
            );
        }
        // An unaligned write tears at the medium's sector boundaries, not its own.
        let f = FaultyStorage::from_bytes(vec![0; 2048]);
        f.write_all_at(256, &[5; 1024]).unwrap();
        for seed in 0..16 {
            let after = f.after_power_loss(LossMode::Torn { seed, sector: 512 });
            for range in [256..512, 512..1024, 1024..1280] {
                let piece = &after[range.clone()];
                assert!(piece.iter().all(|&b| b == piece[0]), "{range:?} split");
            }
        }
    }

    #[test]
    fn reordered_overlapping_writes_can_land_old_over_new() {
        let f = FaultyStorage::from_bytes(vec![0; 512]);
        f.write_all_at(0, &[1; 512]).unwrap();
        f.write_all_at(0, &[2; 512]).unwrap();
        let mut seen = std::collections::BTreeSet::new();
        for seed in 0..64 {
            seen.insert(f.after_power_loss(LossMode::Reorder(seed))[0]);
            seen.insert(f.after_power_loss(LossMode::TornReordered { seed, sector: 512 })[0]);
        }
        assert_eq!(
            seen,
            [0, 1, 2].into(),
            "nothing, new-over-old, and old-over-new all occur"
        );
        // In order, the older write never lands over the newer one when both land.
        for seed in 0..64 {
            let f = FaultyStorage::from_bytes(vec![0; 512]);
            f.write_all_at(0, &[1; 512]).unwrap();
            f.write_all_at(0, &[2; 512]).unwrap();
            let b = f.after_power_loss(LossMode::Random(seed))[0];
            assert!(b == 0 || b == 1 || b == 2);
        }
        assert_eq!(f.after_power_loss(LossMode::KeepAll), vec![2; 512]);
    }

    #[test]
    fn writes_are_not_reordered_across_set_len() {
        // A one-byte write, then a two-byte write over it: landing the first after the second
        // shows as [1, 2].
        let old_over_new = |barrier: bool| {
            (0..64).any(|seed| {
                let f = FaultyStorage::from_bytes(vec![0; 4]);
                f.write_all_at(0, &[1]).unwrap();
                if barrier {
                    f.set_len(8).unwrap();
                }
                f.write_all_at(0, &[2, 2]).unwrap();
                f.after_power_loss(LossMode::Reorder(seed))[..2] == [1, 2]
            })
        };
        assert!(old_over_new(false), "writes in one stretch are reordered");
        assert!(
            !old_over_new(true),
            "a set_len between them keeps their order"
        );
    }

    #[test]
    fn nth_operation_fails_once() {
        let f = FaultyStorage::new();
        f.fail_nth(1);
        f.write_all_at(0, &[1]).unwrap();
        assert!(f.write_all_at(0, &[2]).is_err());
        f.write_all_at(0, &[3]).unwrap();
        assert_eq!(f.contents(), vec![3]);
    }

    #[test]
    fn power_cut_stops_everything() {
        let f = FaultyStorage::new();
        f.cut_power_after(2);
        f.write_all_at(0, &[1]).unwrap();
        f.flush().unwrap();
        assert!(f.write_all_at(0, &[2]).is_err());
        assert!(f.is_powered_off());
        let mut b = [0u8; 1];
        assert!(f.read_exact_at(0, &mut b).is_err());
        assert_eq!(f.after_power_loss(LossMode::KeepAll), vec![1]);
    }
}
