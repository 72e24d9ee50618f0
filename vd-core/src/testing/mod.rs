//! Test doubles and the backend conformance suite (feature `test-util`).
//!
//! - [`FaultyStorage`]: a storage object that fails the Nth operation or loses power, dropping
//!   every write that no completed flush covered (all of them, none, or a seeded random subset).
//! - [`conformance`]: proptest-generated sequences of write / read / flush / reopen / discard /
//!   resize checked against a plain in-memory model, runnable against any backend.
//! - [`crash`]: what crash tests share: a model of what a disk may read after a power cut, the
//!   loss modes a cut is restarted under, and the cut points of a script.
//! - [`backends`]: small in-memory backends for tests of the registry and of disk chains: a
//!   probe-order backend with a chosen confidence and priority, and a tiny differencing format.

mod faulty;

pub mod backends;
pub mod conformance;
pub mod crash;

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix64_matches_the_reference_sequence() {
        // The first outputs of SplitMix64 seeded with 0 (Vigna's reference implementation).
        let mut r = SplitMix64::new(0);
        assert_eq!(r.next_u64(), 0xE220_A839_7B1D_CDAF);
        assert_eq!(r.next_u64(), 0x6E78_9E6A_A1B9_65F4);
        let mut a = SplitMix64::new(42);
        let mut b = a.clone();
        assert_eq!(
            a.next_u64(),
            b.next_u64(),
            "a clone continues the same sequence"
        );
    }

    #[test]
    fn fill_pattern_depends_on_the_absolute_offset_and_the_seed() {
        let mut whole = vec![0u8; 2048];
        fill_pattern(&mut whole, 4096, 7);
        let mut part = vec![0u8; 100];
        fill_pattern(&mut part, 4096 + 1000, 7);
        assert_eq!(&whole[1000..1100], &part[..], "a slice matches the whole");
        let mut shifted = vec![0u8; 2048];
        fill_pattern(&mut shifted, 4096 + 512, 7);
        assert_ne!(whole, shifted, "misplaced data is detected");
        let mut other_seed = vec![0u8; 2048];
        fill_pattern(&mut other_seed, 4096, 8);
        assert!(whole.iter().zip(&other_seed).all(|(a, b)| a != b));
    }
}
