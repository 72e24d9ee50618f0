//! Read-mostly state kept once per thread shard, so that readers on different cores write no
//! shared cache line.
//!
//! A `parking_lot::RwLock` read acquisition is an atomic read-modify-write of the lock word:
//! when every reading thread takes the same lock, that word's cache line moves from core to
//! core on every read, and 4 KiB reads from two threads ran no faster than from one. Here each
//! thread takes the lock of its own shard (threads are handed shards round robin as they first
//! use one), whose line stays in its core's cache. Writers, which are rare (an allocation, a
//! BAT page loaded on a miss, a resize or a move), take every shard's lock, in shard order,
//! and change every copy while holding them all, so a reader sees each change whole and no
//! thread sees an older state than one that another thread has already seen.
//!
//! This is a "big reader" lock built from safe parts: each shard owns a copy of the value, so
//! the value is `Clone` and a change is applied once per shard.

use std::sync::atomic::{AtomicUsize, Ordering};

use parking_lot::{RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Aligns its value to 128 bytes (two 64-byte lines: x86 prefetches lines in pairs), so two
/// shards' lock words never share a cache line. A local type rather than
/// `crossbeam_utils::CachePadded`: one attribute does not need a dependency.
#[derive(Debug, Default)]
#[repr(align(128))]
struct Padded<T>(T);

/// Most shards: beyond this many concurrently reading threads, threads share shards (they
/// still contend less than on one lock), and a change does not take more locks than this.
const MAX_SHARDS: usize = 32;

/// The next shard number handed to a thread that has none.
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// This thread's shard number, taken on first use (reduced modulo the shard count).
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed);
}

/// A value kept once per shard: see the module docs.
#[derive(Debug)]
pub(crate) struct Sharded<T> {
    /// Shard 0, which every thread falls back on should its number not name another.
    first: Padded<RwLock<T>>,
    /// The other shards.
    rest: Box<[Padded<RwLock<T>>]>,
}

/// Every shard locked for writing, in shard order.
pub(crate) struct ShardedWriteGuard<'a, T> {
    first: RwLockWriteGuard<'a, T>,
    rest: Vec<RwLockWriteGuard<'a, T>>,
}

impl<T> std::fmt::Debug for ShardedWriteGuard<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShardedWriteGuard")
            .field("shards", &self.rest.len().saturating_add(1))
            .finish()
    }
}

impl<T: Clone> Sharded<T> {
    /// `value` in as many shards as twice the cores the process may use (at most
    /// [`MAX_SHARDS`]): more threads than cores are common (a reader pool larger than the
    /// machine), and a spare shard costs one more lock per change.
    pub(crate) fn new(value: T) -> Self {
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let shards = cores.saturating_mul(2).clamp(1, MAX_SHARDS);
        let rest = (1..shards)
            .map(|_| Padded(RwLock::new(value.clone())))
            .collect();
        Self {
            first: Padded(RwLock::new(value)),
            rest,
        }
    }
}

impl<T> Sharded<T> {
    /// The calling thread's shard.
    fn mine(&self) -> &RwLock<T> {
        let n = SHARD.with(|s| *s);
        // Shard `n mod count`: 0 is `first`, k > 0 is `rest[k - 1]`.
        let count = self.rest.len().saturating_add(1);
        match n.checked_rem(count).and_then(|k| k.checked_sub(1)) {
            Some(k) => self.rest.get(k).map_or(&self.first.0, |p| &p.0),
            None => &self.first.0,
        }
    }

    /// A shared guard on the calling thread's copy. Not to be taken again by a thread that
    /// holds one: a writer waiting for the shard would block the second acquisition.
    pub(crate) fn read(&self) -> RwLockReadGuard<'_, T> {
        self.mine().read()
    }

    /// Every shard locked for writing, in shard order: waits for every reader of every shard.
    pub(crate) fn write_all(&self) -> ShardedWriteGuard<'_, T> {
        let first = self.first.0.write();
        let rest = self.rest.iter().map(|p| p.0.write()).collect();
        ShardedWriteGuard { first, rest }
    }

    /// Applies `f` to every copy, with every shard locked for the whole change, and returns
    /// what it returned for the last one. `f` must change each copy in the same way (it is
    /// given copies that are equal), so the copies stay equal.
    pub(crate) fn update<R>(&self, mut f: impl FnMut(&mut T) -> R) -> R {
        let mut all = self.write_all();
        let mut last = f(&mut all.first);
        for g in &mut all.rest {
            last = f(g);
        }
        last
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn every_thread_sees_each_change_and_its_own_shard_is_padded() {
        assert!(align_of::<Padded<RwLock<u64>>>() >= 128);
        let s = Arc::new(Sharded::new(0u64));
        assert_eq!(s.update(|v| std::mem::replace(v, 7)), 0);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || *s.read())
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().unwrap(), 7);
        }
        let all = s.write_all();
        assert!(*all.first == 7 && all.rest.iter().all(|g| **g == 7));
        assert_eq!(all.rest.len(), s.rest.len());
    }
}
