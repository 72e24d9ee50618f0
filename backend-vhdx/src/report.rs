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
    /// Payload block size in bytes.
    pub block_size: u32,
    /// Logical sector size in bytes.
    pub logical_sector_size: u32,
    /// Physical sector size in bytes.
    pub physical_sector_size: u32,
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
    /// Payload blocks covering the virtual size.
    pub data_blocks: u64,
}

impl Details {
    /// The facts of an opened image.
    pub fn new(
        creator: &str,
        header: &ActiveHeader,
        meta: &Metadata,
        layout: &Layout,
        log: &LogState,
    ) -> Self {
        Self {
            kind: ImageType::of(meta),
            creator: creator.to_string(),
            block_size: meta.block_size,
            logical_sector_size: meta.logical_sector_size,
            physical_sector_size: meta.physical_sector_size,
            virtual_disk_id: meta.virtual_disk_id,
            data_write_guid: header.data_write_guid().to_uuid(),
            file_write_guid: header.file_write_guid().to_uuid(),
            log_state: log.condition(),
            log: log.clone(),
            parent_locator: meta.parent_locator.as_ref().map(|l| l.entries.clone()),
            chunk_ratio: layout.chunk_ratio,
            bat_entries: layout.entries,
            data_blocks: layout.data_blocks,
        }
    }
}

/// Every on-disk structure of an image, for `dump`.
#[derive(Debug, Clone, Serialize)]
pub struct Dump {
    /// The file identifier.
    pub file_identifier: IdentifierFacts,
    /// The current header.
    pub header: HeaderFacts,
    /// The region table in use.
    pub region_table: RegionTableFacts,
    /// The metadata table's items.
    pub metadata: Vec<ItemFacts>,
    /// The parent locator's key/value pairs, for a differencing image.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_locator: Option<BTreeMap<String, String>>,
    /// The BAT's shape and what its entries say.
    pub bat: BatFacts,
    /// The log.
    pub log: LogState,
}

/// The file identifier.
#[derive(Debug, Clone, Serialize)]
pub struct IdentifierFacts {
    /// The creator string.
    pub creator: String,
}

/// The current header.
#[derive(Debug, Clone, Serialize)]
pub struct HeaderFacts {
    /// Which copy is current: 1 or 2.
    pub slot: usize,
    /// SequenceNumber.
    pub sequence: u64,
    /// FileWriteGuid.
    pub file_write_guid: Uuid,
    /// DataWriteGuid.
    pub data_write_guid: Uuid,
    /// LogGuid (nil when the log is clean).
    pub log_guid: Uuid,
    /// LogOffset.
    pub log_offset: Offset,
    /// LogLength.
    pub log_length: ByteSize,
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
}

/// The BAT's shape and the states of its entries.
#[derive(Debug, Clone, Serialize)]
pub struct BatFacts {
    /// Entries, payload and sector-bitmap.
    pub entries: u64,
    /// Payload blocks per sector-bitmap block.
    pub chunk_ratio: u64,
    /// Payload blocks covering the virtual size.
    pub data_blocks: u64,
    /// Payload block size.
    pub block_size: ByteSize,
    /// What the entries say.
    #[serde(flatten)]
    pub states: BatSummary,
}

impl Dump {
    /// The structures of an opened image.
    pub fn new(
        creator: &str,
        header: &ActiveHeader,
        regions: &RegionTable,
        meta: &Metadata,
        layout: &Layout,
        states: BatSummary,
        log: &LogState,
    ) -> Self {
        let region = |r: &Region| RegionFacts {
            guid: r.guid,
            name: guid_name(r.guid),
            offset: Offset(r.offset),
            length: ByteSize(r.length),
            required: r.required,
        };
        Self {
            file_identifier: IdentifierFacts {
                creator: creator.to_string(),
            },
            header: HeaderFacts {
                // slot and copy are 0 or 1: shown as 1 or 2.
                slot: header.slot.saturating_add(1),
                sequence: header.sequence(),
                file_write_guid: header.file_write_guid().to_uuid(),
                data_write_guid: header.data_write_guid().to_uuid(),
                log_guid: header.log_guid().to_uuid(),
                log_offset: Offset(header.log_offset()),
                log_length: ByteSize(header.log_length()),
            },
            region_table: RegionTableFacts {
                copy: regions.copy.saturating_add(1),
                regions: [&regions.bat, &regions.metadata]
                    .into_iter()
                    .chain(&regions.others)
                    .map(region)
                    .collect(),
            },
            metadata: meta
                .items
                .iter()
                .map(|i| ItemFacts {
                    guid: i.guid,
                    name: guid_name(i.guid),
                    offset: Offset(u64::from(i.offset)),
                    length: i.length,
                    user: i.is_user,
                    virtual_disk: i.is_virtual_disk,
                    required: i.is_required,
                })
                .collect(),
            parent_locator: meta.parent_locator.as_ref().map(|l| l.entries.clone()),
            bat: BatFacts {
                entries: layout.entries,
                chunk_ratio: layout.chunk_ratio,
                data_blocks: layout.data_blocks,
                block_size: ByteSize(layout.block_size),
                states,
            },
            log: log.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
