//! Disk geometry (cylinders, heads, sectors) and the default synthesis for formats that store
//! none.

use serde::Serialize;

/// A CHS geometry (VirtualBox `VDGEOMETRY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize)]
pub struct Geometry {
    /// Number of cylinders.
    pub cylinders: u32,
    /// Number of heads.
    pub heads: u32,
    /// Sectors per track.
    pub sectors: u32,
}

impl Geometry {
    /// The physical geometry the VHD specification (and ATA) assigns to a disk of `size` bytes:
    /// the classic rule with 17, 31, 63 and 255 sectors per track, at most 65535 cylinders.
    pub fn synthesize_pchs(size: u64) -> Self {
        let max = 65535u64 * 16 * 255;
        let total = (size / 512).min(max);
        let (sectors, heads, cyl_times_heads);
        if total >= 65535 * 16 * 63 {
            sectors = 255;
            heads = 16;
            cyl_times_heads = total / sectors;
        } else {
            let mut s = 17u64;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h * 1024 || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h * 1024 {
                s = 63;
                h = 16;
                cth = total / s;
            }
            sectors = s;
            heads = h;
            cyl_times_heads = cth;
        }
        Self {
            cylinders: u32::try_from(cyl_times_heads / heads).unwrap_or(u32::MAX),
            heads: u32::try_from(heads).unwrap_or(16),
            sectors: u32::try_from(sectors).unwrap_or(255),
        }
    }

    /// The logical (BIOS) geometry for a disk of `size` bytes: 63 sectors per track, the fewest
    /// heads from 16, 32, 64, 128, 255 that keep the cylinders at or under 1024.
    pub fn synthesize_lchs(size: u64) -> Self {
        let total = size / 512;
        let heads = [16u64, 32, 64, 128, 255]
            .into_iter()
            .find(|h| total / (h * 63) <= 1024)
            .unwrap_or(255);
        let cylinders = (total / (heads * 63)).clamp(1, 1024);
        Self {
            cylinders: u32::try_from(cylinders).unwrap_or(1024),
            heads: u32::try_from(heads).unwrap_or(255),
            sectors: 63,
        }
    }

    /// Capacity covered by the geometry, in bytes (512-byte sectors).
    pub fn capacity(&self) -> u64 {
        u64::from(self.cylinders) * u64::from(self.heads) * u64::from(self.sectors) * 512
    }
}

/// Parses a byte count with an optional binary suffix: `512`, `4K`, `1M`, `8G`, `2T`, `10B`.
/// Returns `None` for anything else or an overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (t.get(..t.len() - 1)?, 10),
        Some('M') => (t.get(..t.len() - 1)?, 20),
        Some('G') => (t.get(..t.len() - 1)?, 30),
        Some('T') => (t.get(..t.len() - 1)?, 40),
        Some('B') => (t.get(..t.len() - 1)?, 0),
        _ => (t, 0),
    };
    num.parse::<u64>().ok()?.checked_mul(1u64 << shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vhd_rule_matches_known_values() {
        // Values as computed by the VHD specification's algorithm (and Hyper-V / qemu-img).
        assert_eq!(
            Geometry::synthesize_pchs(10 * 1024 * 1024),
            Geometry {
                cylinders: 301,
                heads: 4,
                sectors: 17
            }
        );
        assert_eq!(
            Geometry::synthesize_pchs(1 << 30),
            Geometry {
                cylinders: 2080,
                heads: 16,
                sectors: 63
            }
        );
        assert_eq!(
            Geometry::synthesize_pchs(127 << 30),
            Geometry {
                cylinders: 65278,
                heads: 16,
                sectors: 255
            }
        );
        assert_eq!(
            Geometry::synthesize_pchs(0),
            Geometry {
                cylinders: 0,
                heads: 4,
                sectors: 17
            }
        );
    }

    #[test]
    fn sizes_parse_with_suffixes() {
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("4k"), Some(4096));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("2G"), Some(2 << 30));
        assert_eq!(parse_size("1T"), Some(1 << 40));
        assert_eq!(parse_size("7B"), Some(7));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size(""), None);
        assert_eq!(parse_size("99999999999T"), None);
    }

    #[test]
    fn lchs_stays_within_bios_limits() {
        for size in [0u64, 1 << 20, 1 << 30, 8 << 30, 1 << 40] {
            let g = Geometry::synthesize_lchs(size);
            assert!(g.cylinders >= 1 && g.cylinders <= 1024, "{g:?}");
            assert_eq!(g.sectors, 63);
        }
        assert_eq!(Geometry::synthesize_lchs(1 << 30).heads, 64);
    }
}
