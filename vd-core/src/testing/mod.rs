//! Test doubles and the backend conformance suite (feature `test-util`).
//!
//! - [`FaultyStorage`]: a storage object that fails the Nth operation or loses power, dropping
//!   every write that no completed flush covered (all of them, none, or a seeded random subset).
//! - [`conformance`]: proptest-generated sequences of write / read / flush / reopen / discard /
//!   resize checked against a plain in-memory model, runnable against any backend.
//! - [`backends`]: small in-memory backends for tests of the registry and of disk chains: a
//!   probe-order backend with a chosen confidence and priority, and a tiny differencing format.

mod faulty;

pub mod backends;
pub mod conformance;

pub use faulty::{FaultyStorage, LossMode};

/// A small deterministic pseudo-random generator (SplitMix64) for seeded test decisions.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// Fills `buf` with a pattern that depends on `seed` and on each byte's absolute disk offset,
/// so that misplaced data is detected.
pub fn fill_pattern(buf: &mut [u8], offset: u64, seed: u8) {
    for (i, b) in buf.iter_mut().enumerate() {
        let pos = offset + i as u64;
        let v = (pos ^ (pos >> 9) ^ (pos >> 17)).wrapping_mul(31);
        *b = (v as u8) ^ seed;
    }
}
