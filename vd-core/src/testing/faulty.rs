use std::io;

use parking_lot::Mutex;

use super::SplitMix64;
use crate::storage::{MemStorage, Storage};

/// Which unflushed writes survive a simulated power loss.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LossMode {
    /// Every write since the last completed flush is lost.
    DropAll,
    /// Every write reached the medium (the cache happened to drain).
    KeepAll,
    /// Each unflushed write independently survives or not, decided by the seed.
    Random(u64),
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

    /// The contents as they would be found after a power loss now.
    pub fn after_power_loss(&self, mode: LossMode) -> Vec<u8> {
        let s = self.state.lock();
        let mut data = s.durable.clone();
        let mut rng = match mode {
            LossMode::Random(seed) => Some(SplitMix64::new(seed)),
            _ => None,
        };
        for p in &s.pending {
            let keep = match mode {
                LossMode::DropAll => false,
                LossMode::KeepAll => true,
                LossMode::Random(_) => rng.as_mut().is_some_and(|r| r.next_u64() & 1 == 1),
            };
            if keep {
                apply(&mut data, p);
            }
        }
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
