//! Every on-disk structure of [MS-VHDX] 1.0, as zerocopy wire structs, with the constants and
//! layout assertions. No I/O and no validation here: each module parses these into validated
//! domain values.

use std::mem::{offset_of, size_of};

use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

use crate::guid::Guid;

/// 1 KiB.
pub const KIB: u64 = 1024;
/// 1 MiB, the unit of BAT offsets and region alignment.
pub const MIB: u64 = 1024 * 1024;

/// Offsets of the two header slots (2.2.2).
pub const HEADER_OFFSETS: [u64; 2] = [64 * KIB, 128 * KIB];
/// Offsets of the two region table copies (2.2.3).
pub const REGION_TABLE_OFFSETS: [u64; 2] = [192 * KIB, 256 * KIB];
/// Size of the header section: nothing else may live in the first MiB.
pub const HEADER_SECTION_SIZE: u64 = MIB;
/// Size of a header structure (covered by its checksum).
pub const HEADER_SIZE: usize = 4096;
/// Size of a region table (covered by its checksum).
pub const REGION_TABLE_SIZE: usize = 64 * 1024;
/// Size of the metadata table at the start of the metadata region.
pub const METADATA_TABLE_SIZE: usize = 64 * 1024;
/// Size of a log sector.
pub const LOG_SECTOR_SIZE: u64 = 4096;

/// `vhdxfile`.
pub const FILE_SIGNATURE: u64 = u64::from_le_bytes(*b"vhdxfile");
/// `head`.
pub const HEADER_SIGNATURE: u32 = u32::from_le_bytes(*b"head");
/// `regi`.
pub const REGION_SIGNATURE: u32 = u32::from_le_bytes(*b"regi");
/// `metadata`.
pub const METADATA_SIGNATURE: u64 = u64::from_le_bytes(*b"metadata");
/// `loge`.
pub const LOG_ENTRY_SIGNATURE: u32 = u32::from_le_bytes(*b"loge");
/// `desc`.
pub const DATA_DESC_SIGNATURE: u32 = u32::from_le_bytes(*b"desc");
/// `zero`.
pub const ZERO_DESC_SIGNATURE: u32 = u32::from_le_bytes(*b"zero");
/// `data`.
pub const DATA_SECTOR_SIGNATURE: u32 = u32::from_le_bytes(*b"data");

/// Most entries a region table may hold (2.2.3): the spec's own cap, and what fits in the
/// 64 KiB table after its 16-byte header. A larger count is `Corrupt` (`RegionEntryCount`).
pub const MAX_REGION_ENTRIES: u32 = 2047;
/// Most entries a metadata table may hold (2.6.1): the spec's cap, and what fits in the 64 KiB
/// table after its 32-byte header. A larger count is `Corrupt` (`MetadataEntryCount`).
pub const MAX_METADATA_ENTRIES: u16 = 2047;
/// Largest metadata item (2.6.1.2): the spec's cap; it bounds the one allocation an item read
/// makes (the parent locator is the only variable-length system item).
pub const MAX_METADATA_ITEM: u32 = 1024 * 1024;
/// Largest virtual disk (64 TiB, 2.6.2.2): the spec's cap; with it the BAT arithmetic cannot
/// overflow and the BAT stays under [`MAX_BAT_SIZE`].
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;
/// Smallest block size (2.6.2.1): the spec's range is 1 MiB to 256 MiB, powers of two.
pub const MIN_BLOCK_SIZE: u32 = 1024 * 1024;
/// Largest block size (2.6.2.1): the spec's cap; it bounds one payload block's extent.
pub const MAX_BLOCK_SIZE: u32 = 256 * 1024 * 1024;
/// Most key/value pairs accepted in a parent locator: no writer needs more than a handful
/// (Hyper-V writes five), and the cap bounds the pairs' allocation independently of the 1 MiB
/// item cap.
pub const MAX_LOCATOR_ENTRIES: u16 = 256;
/// Largest log accepted (openvmm's cap): a replay reads the whole log, so this bounds the work
/// and the memory of a replay; the spec allows up to 4 GiB - 1 MiB, no writer uses more than a
/// few MiB.
pub const MAX_LOG_SIZE: u64 = 1024 * MIB;
/// Largest BAT accepted: 64 TiB at 1 MiB blocks with 512-byte sectors needs about 513 MiB. The
/// BAT is read lazily, page by page, so this bounds the region an open accepts, not memory; a
/// BAT that needs more than this (or than its region's length) is `Corrupt`.
pub const MAX_BAT_SIZE: u64 = 520 * MIB;

/// File type identifier (2.2.1): signature and a UTF-16LE creator, never rewritten.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct FileIdentifier {
    /// `vhdxfile`.
    pub signature: U64,
    /// Creator, UTF-16LE, NUL-terminated inside the field; informational.
    pub creator: [U16; 256],
}
const _: () = assert!(size_of::<FileIdentifier>() == 520);

/// Header (2.2.2), 4 KiB including reserved bytes.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct Header {
    /// `head`.
    pub signature: U32,
    /// CRC-32C over the 4 KiB header with this field zero.
    pub checksum: U32,
    /// Higher is newer.
    pub sequence_number: U64,
    /// Changes on the first modification of every writable session.
    pub file_write_guid: Guid,
    /// Changes before the first user-visible change of a session.
    pub data_write_guid: Guid,
    /// Non-zero: the log holds entries to replay.
    pub log_guid: Guid,
    /// Must be 0.
    pub log_version: U16,
    /// Must be 1.
    pub version: U16,
    /// Log length, a multiple of 1 MiB.
    pub log_length: U32,
    /// Log offset, a multiple of 1 MiB.
    pub log_offset: U64,
    /// Zero, but covered by the checksum.
    pub reserved: [u8; 4016],
}
const _: () = assert!(size_of::<Header>() == HEADER_SIZE);
const _: () = assert!(offset_of!(Header, log_guid) == 48);
const _: () = assert!(offset_of!(Header, log_offset) == 72);

/// Region table header (2.2.3).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RegionTableHeader {
    /// `regi`.
    pub signature: U32,
    /// CRC-32C over the 64 KiB table with this field zero.
    pub checksum: U32,
    /// At most 2047.
    pub entry_count: U32,
    /// Zero.
    pub reserved: U32,
}
const _: () = assert!(size_of::<RegionTableHeader>() == 16);

/// Region table entry (2.2.3.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RegionTableEntry {
    /// Which region.
    pub guid: Guid,
    /// Offset, a multiple of 1 MiB, at least 1 MiB.
    pub file_offset: U64,
    /// Length, a multiple of 1 MiB.
    pub length: U32,
    /// Bit 0: required.
    pub flags: U32,
}
const _: () = assert!(size_of::<RegionTableEntry>() == 32);

/// Metadata table header (2.6.1.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct MetadataTableHeader {
    /// `metadata`.
    pub signature: U64,
    /// Zero.
    pub reserved: U16,
    /// At most 2047.
    pub entry_count: U16,
    /// Zero.
    pub reserved2: [u8; 20],
}
const _: () = assert!(size_of::<MetadataTableHeader>() == 32);

/// Metadata table entry (2.6.1.2).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct MetadataTableEntry {
    /// Which item.
    pub item_id: Guid,
    /// From the start of the metadata region; at least 64 KiB unless the length is 0.
    pub offset: U32,
    /// At most 1 MiB.
    pub length: U32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    pub flags: U32,
    /// Zero.
    pub reserved: U32,
}
const _: () = assert!(size_of::<MetadataTableEntry>() == 32);

/// File Parameters item (2.6.2.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct FileParameters {
    /// Block size, a power of two from 1 MiB to 256 MiB.
    pub block_size: U32,
    /// Bit 0 LeaveBlockAllocated, bit 1 HasParent.
    pub flags: U32,
}
const _: () = assert!(size_of::<FileParameters>() == 8);

/// Parent locator header (2.6.2.6).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ParentLocatorHeader {
    /// The locator type; only the VHDX type is defined.
    pub locator_type: Guid,
    /// Zero.
    pub reserved: U16,
    /// Number of key/value entries.
    pub key_value_count: U16,
}
const _: () = assert!(size_of::<ParentLocatorHeader>() == 20);

/// Parent locator key/value entry (2.6.2.6.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct ParentLocatorEntry {
    /// Key offset from the start of the locator item.
    pub key_offset: U32,
    /// Value offset from the start of the locator item.
    pub value_offset: U32,
    /// Key length in bytes.
    pub key_length: U16,
    /// Value length in bytes.
    pub value_length: U16,
}
const _: () = assert!(size_of::<ParentLocatorEntry>() == 12);

/// Log entry header (2.3.1.1).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct LogEntryHeader {
    /// `loge`.
    pub signature: U32,
    /// CRC-32C over the whole entry with this field zero.
    pub checksum: U32,
    /// Entry length, a multiple of 4 KiB.
    pub entry_length: U32,
    /// Log offset of the oldest entry of the sequence.
    pub tail: U32,
    /// Non-zero; +1 per entry.
    pub sequence_number: U64,
    /// Number of descriptors.
    pub descriptor_count: U32,
    /// Zero.
    pub reserved: U32,
    /// Must equal the header's LogGuid.
    pub log_guid: Guid,
    /// File size known stable when the entry was written.
    pub flushed_file_offset: U64,
    /// File size needed for every structure the log refers to.
    pub last_file_offset: U64,
}
const _: () = assert!(size_of::<LogEntryHeader>() == 64);

/// Zero or data descriptor (2.3.1.2, 2.3.1.3); the two share one layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct Descriptor {
    /// `zero` or `desc`.
    pub signature: U32,
    /// Data: the last 4 bytes of the target sector. Zero: reserved.
    pub trailing_bytes: [u8; 4],
    /// Data: the first 8 bytes of the target sector. Zero: the zero length.
    pub leading_bytes: [u8; 8],
    /// Target file offset, 4 KiB aligned.
    pub file_offset: U64,
    /// The entry's sequence number.
    pub sequence_number: U64,
}
const _: () = assert!(size_of::<Descriptor>() == 32);

/// Log data sector (2.3.1.4).
#[repr(C)]
#[derive(Debug, Clone, Copy, FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct DataSector {
    /// `data`.
    pub signature: U32,
    /// High 32 bits of the entry's sequence number.
    pub sequence_high: U32,
    /// Bytes 8..4092 of the target sector.
    pub data: [u8; 4084],
    /// Low 32 bits of the entry's sequence number.
    pub sequence_low: U32,
}
const _: () = assert!(size_of::<DataSector>() == 4096);

/// Payload block states (2.5.1.1) and sector-bitmap block states (2.5.1.2).
pub mod bat_state {
    /// Payload: not present (from the parent in a differencing image).
    pub const NOT_PRESENT: u8 = 0;
    /// Payload: undefined contents.
    pub const UNDEFINED: u8 = 1;
    /// Payload: reads as zeros.
    pub const ZERO: u8 = 2;
    /// Payload: unmapped (trimmed).
    pub const UNMAPPED: u8 = 3;
    /// Payload: unmapped, value from spec draft 0.95.
    pub const UNMAPPED_LEGACY: u8 = 5;
    /// Payload: data at the offset.
    pub const FULLY_PRESENT: u8 = 6;
    /// Payload: per-sector bitmap decides.
    pub const PARTIALLY_PRESENT: u8 = 7;
    /// Sector bitmap: present.
    pub const SB_PRESENT: u8 = 6;
}

/// Mask of the reserved BAT entry bits 3..=19.
pub const BAT_RESERVED_MASK: u64 = 0xF_FFF8;

bitflags::bitflags! {
    /// Region table entry flags ([MS-VHDX] 2.2.3.2, `Required`).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegionFlags: u32 {
        /// The region must be understood to open the file.
        const REQUIRED = 1;
    }
}

bitflags::bitflags! {
    /// Metadata table entry flags ([MS-VHDX] 2.6.1.2).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct MetadataFlags: u32 {
        /// IsUser: a user item (vd's geometry and comment), not a system item.
        const IS_USER = 1;
        /// IsVirtualDisk: the item describes the virtual disk, not the file.
        const IS_VIRTUAL_DISK = 2;
        /// IsRequired: the item must be understood to open the file.
        const IS_REQUIRED = 4;
    }
}

bitflags::bitflags! {
    /// File Parameters flags ([MS-VHDX] 2.6.2.1).
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct FileParameterFlags: u32 {
        /// LeaveBlockAllocated: a fixed disk.
        const LEAVE_BLOCK_ALLOCATED = 1;
        /// HasParent: a differencing disk.
        const HAS_PARENT = 2;
    }
}

/// A state value no [`PayloadState`] or [`BitmapState`] has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("{field} {value} is not a valid state")]
pub struct InvalidState {
    /// The field: "payload block state" or "sector bitmap state".
    pub field: &'static str,
    /// The value found.
    pub value: u8,
}

/// The state of a payload block's BAT entry ([MS-VHDX] 2.5.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PayloadState {
    /// PAYLOAD_BLOCK_NOT_PRESENT: the parent's data, or zeros for a base image.
    NotPresent,
    /// PAYLOAD_BLOCK_UNDEFINED: contents undefined (read as zeros).
    Undefined,
    /// PAYLOAD_BLOCK_ZERO: reads as zeros.
    Zero,
    /// PAYLOAD_BLOCK_UNMAPPED: trimmed (read as zeros).
    Unmapped,
    /// Unmapped, the value of spec draft 0.95 (read as zeros).
    UnmappedLegacy,
    /// PAYLOAD_BLOCK_FULLY_PRESENT: the data is at the entry's offset.
    FullyPresent,
    /// PAYLOAD_BLOCK_PARTIALLY_PRESENT: the sector bitmap decides, per sector.
    PartiallyPresent,
}

impl PayloadState {
    /// The 3-bit value stored in the entry.
    pub const fn bits(self) -> u8 {
        match self {
            Self::NotPresent => bat_state::NOT_PRESENT,
            Self::Undefined => bat_state::UNDEFINED,
            Self::Zero => bat_state::ZERO,
            Self::Unmapped => bat_state::UNMAPPED,
            Self::UnmappedLegacy => bat_state::UNMAPPED_LEGACY,
            Self::FullyPresent => bat_state::FULLY_PRESENT,
            Self::PartiallyPresent => bat_state::PARTIALLY_PRESENT,
        }
    }
}

impl TryFrom<u8> for PayloadState {
    type Error = InvalidState;

    fn try_from(v: u8) -> Result<Self, InvalidState> {
        Ok(match v {
            bat_state::NOT_PRESENT => Self::NotPresent,
            bat_state::UNDEFINED => Self::Undefined,
            bat_state::ZERO => Self::Zero,
            bat_state::UNMAPPED => Self::Unmapped,
            bat_state::UNMAPPED_LEGACY => Self::UnmappedLegacy,
            bat_state::FULLY_PRESENT => Self::FullyPresent,
            bat_state::PARTIALLY_PRESENT => Self::PartiallyPresent,
            value => {
                return Err(InvalidState {
                    field: "payload block state",
                    value,
                });
            }
        })
    }
}

/// The state of a sector-bitmap block's BAT entry ([MS-VHDX] 2.5.1.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BitmapState {
    /// SB_BLOCK_NOT_PRESENT.
    NotPresent,
    /// SB_BLOCK_PRESENT: the bitmap is at the entry's offset.
    Present,
}

impl BitmapState {
    /// The 3-bit value stored in the entry.
    pub const fn bits(self) -> u8 {
        match self {
            Self::NotPresent => bat_state::NOT_PRESENT,
            Self::Present => bat_state::SB_PRESENT,
        }
    }
}

impl TryFrom<u8> for BitmapState {
    type Error = InvalidState;

    /// 0 and 6 as the specification says; 7 is read as present too (some writers store the
    /// payload value there; openvmm reads it the same way).
    fn try_from(v: u8) -> Result<Self, InvalidState> {
        match v {
            bat_state::NOT_PRESENT => Ok(Self::NotPresent),
            bat_state::SB_PRESENT | 7 => Ok(Self::Present),
            value => Err(InvalidState {
                field: "sector bitmap state",
                value,
            }),
        }
    }
}

/// One BAT entry ([MS-VHDX] 2.5.1): the state in bits 0..=2, reserved bits 3..=19 (zero), and
/// the file offset in MiB in bits 20..=63.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct BatEntry(u64);

impl BatEntry {
    /// The entry of an unallocated block (state 0, offset 0).
    pub const EMPTY: Self = Self(0);

    /// The entry stored as `raw` (a little-endian `u64` in the file).
    pub const fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    /// The value stored in the file.
    pub const fn raw(self) -> u64 {
        self.0
    }

    fn with_state(state: u8, file_offset: u64) -> Self {
        debug_assert!(
            file_offset.is_multiple_of(MIB),
            "BAT offsets are MiB-aligned"
        );
        // `file_offset / MIB` has at most 44 bits, so the shift cannot lose any.
        Self((file_offset / MIB) << 20 | u64::from(state))
    }

    /// A payload entry; `file_offset` is 1 MiB-aligned (0 for states without data).
    pub fn payload(state: PayloadState, file_offset: u64) -> Self {
        Self::with_state(state.bits(), file_offset)
    }

    /// A sector-bitmap entry; `file_offset` is 1 MiB-aligned (0 when not present).
    pub fn bitmap(state: BitmapState, file_offset: u64) -> Self {
        Self::with_state(state.bits(), file_offset)
    }

    /// The 3-bit state field, undecoded.
    pub const fn state_bits(self) -> u8 {
        // The mask keeps three bits, so the value fits.
        #[allow(clippy::cast_possible_truncation)] // masked to 3 bits
        let s = (self.0 & 7) as u8;
        s
    }

    /// The state as a payload entry.
    ///
    /// # Errors
    /// [`InvalidState`] for 4 and any other undefined value.
    pub fn payload_state(self) -> Result<PayloadState, InvalidState> {
        PayloadState::try_from(self.state_bits())
    }

    /// The state as a sector-bitmap entry.
    ///
    /// # Errors
    /// [`InvalidState`] for values other than 0, 6 and 7.
    pub fn bitmap_state(self) -> Result<BitmapState, InvalidState> {
        BitmapState::try_from(self.state_bits())
    }

    /// The reserved bits 3..=19 (zero in a valid entry).
    pub const fn reserved(self) -> u64 {
        self.0 & BAT_RESERVED_MASK
    }

    /// The file offset in bytes (FileOffsetMB × 1 MiB, at most 2^64 − 1 MiB): the entry with
    /// its low 20 bits (state and reserved bits) cleared, so it cannot overflow.
    pub const fn file_offset(self) -> u64 {
        self.0 & !(MIB - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAYLOAD: [(u8, PayloadState); 7] = [
        (0, PayloadState::NotPresent),
        (1, PayloadState::Undefined),
        (2, PayloadState::Zero),
        (3, PayloadState::Unmapped),
        (5, PayloadState::UnmappedLegacy),
        (6, PayloadState::FullyPresent),
        (7, PayloadState::PartiallyPresent),
    ];

    #[test]
    fn payload_states_round_trip_and_reject_unknown_values() {
        for (bits, state) in PAYLOAD {
            assert_eq!(PayloadState::try_from(bits), Ok(state));
            assert_eq!(state.bits(), bits);
        }
        for v in [4u8, 8, 0xff] {
            let e = PayloadState::try_from(v).unwrap_err();
            assert_eq!(e.field, "payload block state");
            assert_eq!(e.value, v);
            assert_eq!(
                e.to_string(),
                format!("payload block state {v} is not a valid state")
            );
        }
    }

    #[test]
    fn bitmap_states_round_trip_and_reject_unknown_values() {
        assert_eq!(BitmapState::try_from(0), Ok(BitmapState::NotPresent));
        assert_eq!(BitmapState::try_from(6), Ok(BitmapState::Present));
        // 7 is tolerated as present; it is written back as 6.
        assert_eq!(BitmapState::try_from(7), Ok(BitmapState::Present));
        assert_eq!(BitmapState::Present.bits(), 6);
        assert_eq!(BitmapState::NotPresent.bits(), 0);
        for v in 1..=5u8 {
            let e = BitmapState::try_from(v).unwrap_err();
            assert_eq!((e.field, e.value), ("sector bitmap state", v));
        }
    }

    #[test]
    fn bat_entries_round_trip() {
        let max_offset = (u64::MAX >> 20) * MIB;
        for (_, state) in PAYLOAD {
            for off in [0, MIB, 3 * MIB, 1 << 40, max_offset] {
                let e = BatEntry::payload(state, off);
                assert_eq!(e.payload_state(), Ok(state));
                assert_eq!(e.file_offset(), off);
                assert_eq!(e.reserved(), 0);
                assert_eq!(BatEntry::from_raw(e.raw()), e);
            }
        }
        let e = BatEntry::bitmap(BitmapState::Present, 5 * MIB);
        assert_eq!(e.raw(), 5 << 20 | 6);
        assert_eq!(e.bitmap_state(), Ok(BitmapState::Present));
        assert_eq!(BatEntry::EMPTY.raw(), 0);
        assert_eq!(
            BatEntry::EMPTY.payload_state(),
            Ok(PayloadState::NotPresent)
        );
    }

    #[test]
    fn bat_entry_fields_are_where_the_spec_puts_them() {
        // State in bits 0..=2, reserved 3..=19, FileOffsetMB in 20..=63.
        let e = BatEntry::from_raw(0xABC_0000_0000_0000 | 1 << 19 | 1 << 3 | 4);
        assert_eq!(e.state_bits(), 4);
        assert!(e.payload_state().is_err());
        assert_eq!(e.reserved(), 1 << 19 | 1 << 3);
        assert_eq!(e.file_offset(), (0xABC_0000_0000_0000 >> 20) * MIB);
        assert_eq!(BAT_RESERVED_MASK, ((1u64 << 20) - 1) & !7);
    }

    #[test]
    fn flags_keep_unknown_bits_for_reporting() {
        let f = MetadataFlags::from_bits_retain(0b1101);
        assert!(f.contains(MetadataFlags::IS_USER | MetadataFlags::IS_REQUIRED));
        assert!(!f.contains(MetadataFlags::IS_VIRTUAL_DISK));
        assert_eq!(f.bits(), 0b1101);
        assert_eq!(
            FileParameterFlags::from_bits_retain(3),
            FileParameterFlags::LEAVE_BLOCK_ALLOCATED | FileParameterFlags::HAS_PARENT
        );
        assert_eq!(RegionFlags::REQUIRED.bits(), 1);
    }
}
