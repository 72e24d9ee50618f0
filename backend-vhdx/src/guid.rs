//! GUIDs in the mixed-endian Windows layout, and the GUIDs [MS-VHDX] defines.

use std::fmt;

use uuid::{Uuid, uuid};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// A GUID as stored on disk: the Windows layout, converted with `Uuid::from_bytes_le`.
#[repr(transparent)]
#[derive(
    Clone,
    Copy,
    PartialEq,
    Eq,
    Hash,
    Default,
    FromBytes,
    IntoBytes,
    KnownLayout,
    Immutable,
    Unaligned,
)]
pub struct Guid(pub [u8; 16]);

impl Guid {
    /// The all-zero GUID.
    pub const ZERO: Self = Self([0; 16]);

    /// The GUID as a `Uuid`.
    pub fn to_uuid(self) -> Uuid {
        Uuid::from_bytes_le(self.0)
    }

    /// The on-disk form of `u`.
    pub fn from_uuid(u: Uuid) -> Self {
        Self(u.to_bytes_le())
    }

    /// Whether every byte is zero.
    pub fn is_zero(self) -> bool {
        self == Self::ZERO
    }
}

impl fmt::Debug for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_uuid())
    }
}

impl fmt::Display for Guid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.to_uuid())
    }
}

/// BAT region (2.2.3.1).
pub const REGION_BAT: Uuid = uuid!("2DC27766-F623-4200-9D64-115E9BFD4A08");
/// Metadata region (2.2.3.1).
pub const REGION_METADATA: Uuid = uuid!("8B7CA206-4790-4B9A-B8FE-575F050F886E");

/// File Parameters item.
pub const META_FILE_PARAMETERS: Uuid = uuid!("CAA16737-FA36-4D43-B3B6-33F0AA44E76B");
/// Virtual Disk Size item.
pub const META_VIRTUAL_DISK_SIZE: Uuid = uuid!("2FA54224-CD1B-4876-B211-5DBED83BF4B8");
/// Virtual Disk ID (page 83) item.
pub const META_VIRTUAL_DISK_ID: Uuid = uuid!("BECA12AB-B2E6-4523-93EF-C309E000C746");
/// Logical Sector Size item.
pub const META_LOGICAL_SECTOR_SIZE: Uuid = uuid!("8141BF1D-A96F-4709-BA47-F233A8FAAB5F");
/// Physical Sector Size item.
pub const META_PHYSICAL_SECTOR_SIZE: Uuid = uuid!("CDA348C7-445D-4471-9CC9-E9885251C556");
/// Parent Locator item.
pub const META_PARENT_LOCATOR: Uuid = uuid!("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C");
/// The VHDX parent locator type.
pub const PARENT_LOCATOR_TYPE_VHDX: Uuid = uuid!("B04AEFB7-D19E-4A81-B789-25B8E9445913");
/// Marks a file whose creation has not finished (openvmm); such a file must not be opened.
pub const META_INCOMPLETE_FILE: Uuid = uuid!("71CC85F0-1B69-4E28-9558-C3BF83AE75D3");

/// vd's user metadata item holding the physical geometry (3 × u32: cylinders, heads, sectors).
pub const USER_PCHS: Uuid = uuid!("6f2f6b0e-2a8c-4d0b-9b53-7a1c3d9e5a01");
/// vd's user metadata item holding the logical geometry (3 × u32).
pub const USER_LCHS: Uuid = uuid!("6f2f6b0e-2a8c-4d0b-9b53-7a1c3d9e5a02");
/// vd's user metadata item holding the comment (UTF-8).
pub const USER_COMMENT: Uuid = uuid!("6f2f6b0e-2a8c-4d0b-9b53-7a1c3d9e5a03");

/// The name of a GUID this crate knows (a region, a metadata item, the parent locator type),
/// for dumps.
pub fn guid_name(guid: Uuid) -> Option<&'static str> {
    Some(match guid {
        REGION_BAT => "BAT",
        REGION_METADATA => "metadata",
        META_FILE_PARAMETERS => "file parameters",
        META_VIRTUAL_DISK_SIZE => "virtual disk size",
        META_VIRTUAL_DISK_ID => "virtual disk ID",
        META_LOGICAL_SECTOR_SIZE => "logical sector size",
        META_PHYSICAL_SECTOR_SIZE => "physical sector size",
        META_PARENT_LOCATOR => "parent locator",
        PARENT_LOCATOR_TYPE_VHDX => "VHDX parent locator type",
        META_INCOMPLETE_FILE => "incomplete file",
        USER_PCHS => "vd physical geometry",
        USER_LCHS => "vd logical geometry",
        USER_COMMENT => "vd comment",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bat_guid_is_stored_mixed_endian() {
        let g = Guid::from_uuid(REGION_BAT);
        assert_eq!(
            g.0,
            [
                0x66, 0x77, 0xC2, 0x2D, 0x23, 0xF6, 0x00, 0x42, 0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD,
                0x4A, 0x08
            ]
        );
        assert_eq!(g.to_string(), "2dc27766-f623-4200-9d64-115e9bfd4a08");
    }

    #[test]
    fn uuid_conversions_round_trip_and_swap_the_first_three_fields() {
        for u in [
            REGION_BAT,
            REGION_METADATA,
            META_FILE_PARAMETERS,
            META_PARENT_LOCATOR,
            PARENT_LOCATOR_TYPE_VHDX,
        ] {
            let g = Guid::from_uuid(u);
            assert_eq!(g.to_uuid(), u);
            let b = u.as_bytes();
            assert_eq!(&g.0[..4], &[b[3], b[2], b[1], b[0]], "{u}");
            assert_eq!(&g.0[4..8], &[b[5], b[4], b[7], b[6]], "{u}");
            assert_eq!(&g.0[8..], &b[8..], "{u}");
            assert_eq!(g.to_string(), u.hyphenated().to_string());
            assert_eq!(format!("{g:?}"), g.to_string());
        }
    }

    #[test]
    fn only_the_all_zero_guid_is_zero() {
        assert!(Guid::ZERO.is_zero());
        assert!(Guid::default().is_zero());
        assert_eq!(Guid::ZERO.to_uuid(), Uuid::nil());
        for i in 0..16 {
            let mut g = Guid::ZERO;
            g.0[i] = 1;
            assert!(!g.is_zero(), "byte {i}");
        }
    }

    #[test]
    fn known_guids_are_distinct() {
        let all = [
            REGION_BAT,
            REGION_METADATA,
            META_FILE_PARAMETERS,
            META_VIRTUAL_DISK_SIZE,
            META_VIRTUAL_DISK_ID,
            META_LOGICAL_SECTOR_SIZE,
            META_PHYSICAL_SECTOR_SIZE,
            META_PARENT_LOCATOR,
            PARENT_LOCATOR_TYPE_VHDX,
            META_INCOMPLETE_FILE,
        ];
        let set: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(set.len(), all.len());
        let names: std::collections::HashSet<_> =
            all.iter().map(|g| guid_name(*g).expect("named")).collect();
        assert_eq!(names.len(), all.len(), "each known GUID has its own name");
        assert_eq!(guid_name(Uuid::nil()), None);
    }
}
