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
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "divisions only: by the constants 17, 31, 63 and 255 and by heads, at least 4"
    )]
    pub fn synthesize_pchs(size: u64) -> Self {
        const MAX_SECTORS: u32 = 65535 * 16 * 255;
        let total = u32::try_from(size / 512).map_or(MAX_SECTORS, |t| t.min(MAX_SECTORS));
        let (sectors, heads, cyl_times_heads) = if total >= 65535 * 16 * 63 {
            (255, 16, total / 255)
        } else {
            let mut s = 17;
            let mut cth = total / s;
            let mut h = cth.div_ceil(1024).max(4);
            if cth >= h.saturating_mul(1024) || h > 16 {
                s = 31;
                h = 16;
                cth = total / s;
            }
            if cth >= h.saturating_mul(1024) {
                s = 63;
                h = 16;
                cth = total / s;
            }
            (s, h, cth)
        };
        Self {
            cylinders: cyl_times_heads / heads,
            heads,
            sectors,
        }
    }

    /// The logical (BIOS) geometry for a disk of `size` bytes: 63 sectors per track, the fewest
    /// heads from 16, 32, 64, 128, 255 that keep the cylinders at or under 1024.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "heads is one of five constants of at most 255, so heads * 63 neither \
                  overflows nor is zero"
    )]
    pub fn synthesize_lchs(size: u64) -> Self {
        let total = size / 512;
        let heads: u32 = [16, 32, 64, 128, 255]
            .into_iter()
            .find(|&h| total / (u64::from(h) * 63) <= 1024)
            .unwrap_or(255);
        // Saturating: more cylinders than a u32 holds is more than 1024.
        let cylinders = u32::try_from(total / (u64::from(heads) * 63))
            .unwrap_or(u32::MAX)
            .clamp(1, 1024);
        Self {
            cylinders,
            heads,
            sectors: 63,
        }
    }

    /// Capacity covered by the geometry, in bytes (512-byte sectors); `u64::MAX` when a geometry
    /// read from a file claims more than that.
    pub fn capacity(&self) -> u64 {
        u64::from(self.cylinders)
            .saturating_mul(u64::from(self.heads))
            .saturating_mul(u64::from(self.sectors))
            .saturating_mul(512)
    }
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
    fn lchs_stays_within_bios_limits() {
        for size in [0u64, 1 << 20, 1 << 30, 8 << 30, 1 << 40] {
            let g = Geometry::synthesize_lchs(size);
            assert!(g.cylinders >= 1 && g.cylinders <= 1024, "{g:?}");
            assert_eq!(g.sectors, 63);
        }
        assert_eq!(Geometry::synthesize_lchs(1 << 30).heads, 64);
    }

    fn chs(cylinders: u32, heads: u32, sectors: u32) -> Geometry {
        Geometry {
            cylinders,
            heads,
            sectors,
        }
    }

    #[test]
    fn pchs_switches_sectors_per_track_at_the_vhd_thresholds() {
        // Each row: a size in 512-byte sectors on either side of a switch of the VHD rule.
        for (sectors, want) in [
            (1, chs(0, 4, 17)),
            // 17 sectors, 4 heads, 1024 cylinders: the last size with 17 sectors per track.
            (17 * 4 * 1024 - 1, chs(1023, 4, 17)),
            (17 * 4 * 1024, chs(140, 16, 31)),
            // 31 sectors, 16 heads, 1024 cylinders: the switch to 63.
            (31 * 16 * 1024 - 1, chs(1023, 16, 31)),
            (31 * 16 * 1024, chs(503, 16, 63)),
            // 65535 cylinders, 16 heads, 63 sectors: the switch to 255.
            (65535 * 16 * 63 - 1, chs(65534, 16, 63)),
            (65535 * 16 * 63, chs(16191, 16, 255)),
        ] {
            assert_eq!(
                Geometry::synthesize_pchs(sectors * 512),
                want,
                "{sectors} sectors"
            );
        }
    }

    #[test]
    fn pchs_is_capped_and_never_exceeds_the_disk() {
        let cap = chs(65535, 16, 255);
        assert_eq!(Geometry::synthesize_pchs(65535 * 16 * 255 * 512), cap);
        assert_eq!(Geometry::synthesize_pchs(1 << 50), cap);
        assert_eq!(Geometry::synthesize_pchs(u64::MAX), cap);
        let mut size = 512u64;
        while size < 1 << 42 {
            for s in [size - 1, size, size + 511, size * 3 / 2] {
                let g = Geometry::synthesize_pchs(s);
                assert!(g.capacity() <= s, "{g:?} is more than {s} bytes");
                assert!(g.heads <= 16 && g.cylinders <= 65535, "{g:?}");
                assert!([17, 31, 63, 255].contains(&g.sectors), "{g:?}");
            }
            size *= 2;
        }
    }

    #[test]
    fn lchs_picks_the_fewest_heads_that_fit_1024_cylinders() {
        let limit = |heads: u64| (1025 * heads * 63 - 1) * 512;
        assert_eq!(Geometry::synthesize_lchs(limit(16)), chs(1024, 16, 63));
        assert_eq!(Geometry::synthesize_lchs(limit(16) + 512), chs(512, 32, 63));
        assert_eq!(Geometry::synthesize_lchs(limit(128)), chs(1024, 128, 63));
        assert_eq!(
            Geometry::synthesize_lchs(limit(128) + 512),
            chs(514, 255, 63)
        );
        // Beyond what 255 heads reach, the cylinders are capped.
        assert_eq!(Geometry::synthesize_lchs(u64::MAX), chs(1024, 255, 63));
        // A tiny disk still has one cylinder.
        assert_eq!(Geometry::synthesize_lchs(0), chs(1, 16, 63));
        assert_eq!(Geometry::synthesize_lchs(511), chs(1, 16, 63));
    }

    #[test]
    fn capacity_multiplies_without_overflow() {
        assert_eq!(chs(0, 16, 63).capacity(), 0);
        assert_eq!(chs(2, 3, 5).capacity(), 2 * 3 * 5 * 512);
        let max = u64::from(u32::MAX);
        assert_eq!(
            chs(u32::MAX, 1, 1).capacity(),
            max * 512,
            "computed in u64, not u32"
        ); // A geometry read from a file may claim more than 2^64 bytes: saturated, not wrapped.
        assert_eq!(chs(u32::MAX, u32::MAX, u32::MAX).capacity(), u64::MAX);
    }
}
