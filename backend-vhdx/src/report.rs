//! What the backend reports about an image, as typed values a front end renders as text or
//! JSON: the log's state after open, the facts `info` shows ([`Details`]) and every on-disk
//! structure ([`Dump`]).

use std::collections::BTreeMap;

use serde::Serialize;
use uuid::Uuid;
use vd_core::{ByteSize, Offset};

use crate::bat::{BatSummary, Layout};
use crate::guid::guid_name;
use crate::header::ActiveHeader;
use crate::log::EntrySummary;
use crate::metadata::Metadata;
use crate::region::{Region, RegionTable};

/// A count and its noun, singular for one: `plural(1, "entry", "entries")` is `1 entry`.
pub(crate) fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// How a dirty log was replayed when the image was opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LogReplay {
    /// Not replayed: the log was clean.
    None,
    /// Replayed into the file (a read-write open), which is now clean.
    File,
    /// Replayed into an overlay in memory (a read-only open); the file still holds the log.
    Memory,
}

/// What happened to the log at open.
#[derive(Debug, Clone, Serialize)]
pub struct LogState {
    /// Whether the header asked for a replay.
    pub dirty: bool,
    /// How the log was replayed.
    pub replay: LogReplay,
    /// Entries in the active sequence.
    pub entries: usize,
    /// Sequence number of the head entry.
    pub head_sequence: u64,
    /// Log offset.
    pub offset: Offset,
    /// Log length.
    pub length: ByteSize,
    /// The replayed entries, oldest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub sequence: Vec<EntrySummary>,
}

impl LogState {
    /// The state of a log at `offset` and `length`, before any replay.
    pub fn new(dirty: bool, offset: u64, length: u64) -> Self {
        Self {
            dirty,
            replay: LogReplay::None,
            entries: 0,
            head_sequence: 0,
            offset: Offset(offset),
            length: ByteSize(length),
            sequence: Vec::new(),
        }
    }

    /// One phrase for people: `clean`, or dirty and where it was replayed.
    pub fn condition(&self) -> &'static str {
        match (self.dirty, self.replay) {
            (false, _) => "clean",
            (true, LogReplay::File) => "dirty, replayed in file",
            (true, LogReplay::Memory) => "dirty, replayed in memory",
            (true, LogReplay::None) => "dirty, not replayed",
        }
    }
}

/// The kind of a VHDX image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageType {
    /// Every block allocated when created (`LeaveBlockAllocated`).
    Fixed,
    /// Blocks allocated on first write.
    Dynamic,
    /// A child of a parent image (`HasParent`).
    Differencing,
}

impl ImageType {
    /// The kind the file parameters describe.
    pub fn of(meta: &Metadata) -> Self {
        if meta.has_parent {
            Self::Differencing
        } else if meta.leave_block_allocated {
            Self::Fixed
        } else {
            Self::Dynamic
        }
    }
}

/// The format-specific facts `info` shows (qemu-img's "format specific information").
#[derive(Debug, Clone, Serialize)]
pub struct Details {
    /// Fixed, dynamic or differencing.
    #[serde(rename = "type")]
    pub kind: ImageType,
    /// The file identifier's creator string.
    pub creator: String,
    /// Payload block size.
    pub block_size: ByteSize,
    /// Logical sector size.
    pub logical_sector_size: ByteSize,
    /// Physical sector size.
    pub physical_sector_size: ByteSize,
    /// The Virtual Disk ID (page 83) item.
    pub virtual_disk_id: Uuid,
    /// The header's DataWriteGuid.
    pub data_write_guid: Uuid,
    /// The header's FileWriteGuid.
    pub file_write_guid: Uuid,
    /// The log's condition in one phrase ([`LogState::condition`]).
    pub log_state: &'static str,
    /// The log.
    pub log: LogState,
    /// The parent locator's key/value pairs, for a differencing image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_locator: Option<BTreeMap<String, String>>,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    /// BAT entries (payload and sector-bitmap entries).
    pub bat_entries: u64,
    /// The payload blocks covering the virtual size, by what the BAT says of them; absent when
    /// the BAT cannot be read.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<BlockCounts>,
}

/// The payload blocks covering the virtual size, by state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BlockCounts {
    /// Every payload block.
    pub total: u64,
    /// Blocks with space in the file (fully present).
    pub allocated: u64,
    /// Blocks with space in the file whose sectors are partly the parent's (partially present,
    /// differencing images only).
    pub partially_allocated: u64,
    /// Blocks that read as zeros without space in the file (ZERO, UNMAPPED, UNDEFINED).
    pub zero: u64,
    /// Blocks with no space in the file (NOT_PRESENT): zeros, or the parent's data in a
    /// differencing image.
    pub unallocated: u64,
}

impl BlockCounts {
    /// The counts of `blocks` payload blocks with these states.
    pub fn new(blocks: u64, s: &BatSummary) -> Self {
        Self {
            total: blocks,
            allocated: s.fully_present,
            partially_allocated: s.partially_present,
            zero: s.zero,
            unallocated: s.not_present,
        }
    }
}

impl Details {
    /// The facts of an opened image.
    pub fn new(
        creator: &str,
        header: &ActiveHeader,
        meta: &Metadata,
        layout: &Layout,
        states: Option<&BatSummary>,
        log: &LogState,
    ) -> Self {
        Self {
            kind: ImageType::of(meta),
            creator: creator.to_string(),
            block_size: ByteSize(u64::from(meta.block_size)),
            logical_sector_size: ByteSize(u64::from(meta.logical_sector_size)),
            physical_sector_size: ByteSize(u64::from(meta.physical_sector_size)),
            virtual_disk_id: meta.virtual_disk_id,
            data_write_guid: header.data_write_guid().to_uuid(),
            file_write_guid: header.file_write_guid().to_uuid(),
            log_state: log.condition(),
            log: log.clone(),
            parent_locator: meta.parent_locator.as_ref().map(|l| l.entries.clone()),
            chunk_ratio: layout.chunk_ratio,
            bat_entries: layout.entries,
            blocks: states.map(|s| BlockCounts::new(layout.data_blocks, s)),
        }
    }
}

/// Every on-disk structure of an image, for `dump`.
#[derive(Debug, Clone, Serialize)]
pub struct Dump {
    /// The file identifier.
    pub file_identifier: IdentifierFacts,
    /// Both header copies, as the file holds them.
    pub headers: Vec<HeaderFacts>,
    /// Both region table copies, as the file holds them.
    pub region_tables: Vec<TableCopyFacts>,
    /// The entries of the region table in use.
    pub region_table: RegionTableFacts,
    /// The metadata table's items, with their parsed values.
    pub metadata: Vec<ItemFacts>,
    /// The BAT's shape and what its entries say.
    pub bat: BatFacts,
    /// The log.
    pub log: LogFacts,
}

/// The file identifier.
#[derive(Debug, Clone, Serialize)]
pub struct IdentifierFacts {
    /// The creator string.
    pub creator: String,
}

/// One header copy as the file holds it.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderFacts {
    /// Which copy: 1 (at 64 KiB) or 2 (at 128 KiB).
    pub copy: usize,
    /// File offset.
    pub offset: Offset,
    /// Whether the image uses this copy.
    pub current: bool,
    /// Whether the signature is `head`.
    pub signature_valid: bool,
    /// Whether the stored CRC-32C matches the copy's bytes.
    pub checksum_valid: bool,
    /// The copy's fields; absent when the file is too short to hold it.
    #[serde(flatten)]
    pub fields: Option<HeaderFields>,
}

/// The fields of a header copy.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderFields {
    /// SequenceNumber.
    pub sequence: u64,
    /// FileWriteGuid.
    pub file_write_guid: Uuid,
    /// DataWriteGuid.
    pub data_write_guid: Uuid,
    /// LogGuid (nil when the log is clean).
    pub log_guid: Uuid,
    /// LogVersion.
    pub log_version: u16,
    /// Version.
    pub version: u16,
    /// LogOffset.
    pub log_offset: Offset,
    /// LogLength.
    pub log_length: ByteSize,
}

/// One copy of a redundant table (a region table) as the file holds it.
#[derive(Debug, Clone, Serialize)]
pub struct TableCopyFacts {
    /// Which copy: 1 or 2.
    pub copy: usize,
    /// File offset.
    pub offset: Offset,
    /// Whether the image uses this copy.
    pub current: bool,
    /// Whether the signature is right.
    pub signature_valid: bool,
    /// Whether the stored CRC-32C matches the copy's bytes.
    pub checksum_valid: bool,
    /// EntryCount as stored; absent when the file is too short to hold the copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub entries: Option<u32>,
}

/// The region table in use.
#[derive(Debug, Clone, Serialize)]
pub struct RegionTableFacts {
    /// Which copy is used: 1 or 2.
    pub copy: usize,
    /// Its entries: the BAT, the metadata region, then any others.
    pub regions: Vec<RegionFacts>,
}

/// One region table entry.
#[derive(Debug, Clone, Serialize)]
pub struct RegionFacts {
    /// The region's GUID.
    pub guid: Uuid,
    /// What the GUID names, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'static str>,
    /// File offset.
    pub offset: Offset,
    /// Length.
    pub length: ByteSize,
    /// Whether a reader must understand it.
    pub required: bool,
}

/// One metadata table entry.
#[derive(Debug, Clone, Serialize)]
pub struct ItemFacts {
    /// The item's GUID.
    pub guid: Uuid,
    /// What the GUID names, where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<&'static str>,
    /// Offset inside the metadata region.
    pub offset: Offset,
    /// Length in bytes.
    pub length: u32,
    /// IsUser.
    pub user: bool,
    /// IsVirtualDisk.
    pub virtual_disk: bool,
    /// IsRequired.
    pub required: bool,
    /// The parsed value, for the items this crate knows.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<ItemValue>,
}

/// The parsed value of a known metadata item.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum ItemValue {
    /// File Parameters.
    FileParameters {
        /// BlockSize.
        block_size: ByteSize,
        /// LeaveBlockAllocated.
        leave_block_allocated: bool,
        /// HasParent.
        has_parent: bool,
    },
    /// A size: Virtual Disk Size, Logical or Physical Sector Size.
    Size(ByteSize),
    /// A GUID: the Virtual Disk ID.
    Id(Uuid),
    /// A geometry of vd's user items.
    Geometry(vd_core::Geometry),
    /// Text: vd's comment.
    Text(String),
    /// The Parent Locator.
    ParentLocator {
        /// LocatorType.
        locator_type: Uuid,
        /// What the locator type names.
        locator_type_name: &'static str,
        /// The key/value pairs.
        entries: BTreeMap<String, String>,
    },
}

/// The BAT's shape and the states of its entries.
#[derive(Debug, Clone, Serialize)]
pub struct BatFacts {
    /// Entries, payload and sector-bitmap.
    pub entries: u64,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks covering the virtual size.
    pub payload_blocks: u64,
    /// Payload block size.
    pub block_size: ByteSize,
    /// What the entries say.
    #[serde(flatten)]
    pub states: BatSummary,
}

/// The log: the header's LogGuid and the state after open.
#[derive(Debug, Clone, Serialize)]
pub struct LogFacts {
    /// The current header's LogGuid (nil when the log is clean).
    pub guid: Uuid,
    /// What happened to the log at open.
    #[serde(flatten)]
    pub state: LogState,
}

impl Dump {
    /// The entries of a region table as facts.
    pub fn regions(regions: &RegionTable) -> RegionTableFacts {
        let region = |r: &Region| RegionFacts {
            guid: r.guid,
            name: guid_name(r.guid),
            offset: Offset(r.offset),
            length: ByteSize(r.length),
            required: r.required,
        };
        RegionTableFacts {
            // copy is 0 or 1: shown as 1 or 2.
            copy: regions.copy.saturating_add(1),
            regions: [&regions.bat, &regions.metadata]
                .into_iter()
                .chain(&regions.others)
                .map(region)
                .collect(),
        }
    }

    /// The BAT facts.
    pub fn bat(layout: &Layout, states: BatSummary) -> BatFacts {
        BatFacts {
            entries: layout.entries,
            chunk_ratio: layout.chunk_ratio,
            payload_blocks: layout.data_blocks,
            block_size: ByteSize(layout.block_size),
            states,
        }
    }

    /// The value the system item `guid` holds, from the parsed metadata.
    pub fn system_value(guid: Uuid, meta: &Metadata) -> Option<ItemValue> {
        use crate::guid::{
            META_FILE_PARAMETERS, META_LOGICAL_SECTOR_SIZE, META_PARENT_LOCATOR,
            META_PHYSICAL_SECTOR_SIZE, META_VIRTUAL_DISK_ID, META_VIRTUAL_DISK_SIZE,
            PARENT_LOCATOR_TYPE_VHDX,
        };
        Some(match guid {
            META_FILE_PARAMETERS => ItemValue::FileParameters {
                block_size: ByteSize(u64::from(meta.block_size)),
                leave_block_allocated: meta.leave_block_allocated,
                has_parent: meta.has_parent,
            },
            META_VIRTUAL_DISK_SIZE => ItemValue::Size(ByteSize(meta.virtual_size)),
            META_VIRTUAL_DISK_ID => ItemValue::Id(meta.virtual_disk_id),
            META_LOGICAL_SECTOR_SIZE => {
                ItemValue::Size(ByteSize(u64::from(meta.logical_sector_size)))
            }
            META_PHYSICAL_SECTOR_SIZE => {
                ItemValue::Size(ByteSize(u64::from(meta.physical_sector_size)))
            }
            // A parsed locator is always of the VHDX type (the parser refuses others).
            META_PARENT_LOCATOR => {
                let l = meta.parent_locator.as_ref()?;
                ItemValue::ParentLocator {
                    locator_type: PARENT_LOCATOR_TYPE_VHDX,
                    locator_type_name: guid_name(PARENT_LOCATOR_TYPE_VHDX)?,
                    entries: l.entries.clone(),
                }
            }
            _ => return None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_of_one_are_singular() {
        assert_eq!(plural(1, "entry", "entries"), "1 entry");
        assert_eq!(plural(0, "entry", "entries"), "0 entries");
        assert_eq!(plural(5, "entry", "entries"), "5 entries");
    }

    #[test]
    fn the_log_condition_names_where_it_was_replayed() {
        let mut log = LogState::new(false, 0x10_0000, 0x10_0000);
        assert_eq!(log.condition(), "clean");
        log.dirty = true;
        assert_eq!(log.condition(), "dirty, not replayed");
        log.replay = LogReplay::Memory;
        assert_eq!(log.condition(), "dirty, replayed in memory");
        log.replay = LogReplay::File;
        assert_eq!(log.condition(), "dirty, replayed in file");
        let v = serde_json::to_value(&log).expect("json");
        assert_eq!(v["replay"], "file");
        assert!(v.get("sequence").is_none(), "no entries, no list: {v}");
    }
}
