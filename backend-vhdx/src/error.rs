//! Every rule a VHDX image can break, as one typed value per rule.
//!
//! Errors reach callers as [`vd_core::Error`] (kind `Corrupt`, or `NotSupported` for unknown
//! required structures) naming the image, the structure and the offset; the [`Corruption`] is
//! the error's `source()`, so callers and tests can downcast to the exact rule.

use thiserror::Error;
use uuid::Uuid;
use vd_core::{Error, ErrorKind, Warning};

/// One violated rule of [MS-VHDX], with the values found.
#[non_exhaustive]
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum Corruption {
    /// The file does not start with `vhdxfile`.
    #[error("file identifier signature is {found:#018x}, not \"vhdxfile\"")]
    FileSignature {
        /// The eight bytes found, as a little-endian integer.
        found: u64,
    },
    /// A header's signature is not `head`.
    #[error("header signature is {found:#010x}, not \"head\"")]
    HeaderSignature {
        /// The value found.
        found: u32,
    },
    /// A structure's CRC-32C does not match.
    #[error("checksum is {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The stored checksum.
        stored: u32,
        /// The checksum of the bytes.
        computed: u32,
    },
    /// Neither header is valid.
    #[error("neither header is valid (header 1: {first}; header 2: {second})")]
    NoValidHeader {
        /// Why header 1 is invalid.
        first: String,
        /// Why header 2 is invalid.
        second: String,
    },
    /// Both headers are valid, differ, and carry the same sequence number.
    #[error("both headers have sequence number {sequence} but different contents")]
    HeaderSequenceTie {
        /// The shared sequence number.
        sequence: u64,
    },
    /// The header version is not 1.
    #[error("header version is {found}, expected 1")]
    HeaderVersion {
        /// The version found.
        found: u16,
    },
    /// The log version is not 0.
    #[error("log version is {found}, expected 0")]
    LogVersion {
        /// The version found.
        found: u16,
    },
    /// The log's offset or length is misaligned, overlaps the header section, or lies outside
    /// the file.
    #[error("log at {offset:#x} with length {length:#x} is invalid: {reason}")]
    LogRange {
        /// Log offset.
        offset: u64,
        /// Log length.
        length: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// A log GUID is set but there is no log.
    #[error("the header has a log GUID but the log length is 0")]
    LogGuidWithoutLog,
    /// Neither region table is valid.
    #[error("neither region table is valid (copy 1: {first}; copy 2: {second})")]
    NoValidRegionTable {
        /// Why copy 1 is invalid.
        first: String,
        /// Why copy 2 is invalid.
        second: String,
    },
    /// The region table signature is not `regi`.
    #[error("region table signature is {found:#010x}, not \"regi\"")]
    RegionSignature {
        /// The value found.
        found: u32,
    },
    /// The region table claims more than 2047 entries.
    #[error("region table has {count} entries, at most 2047 are allowed")]
    RegionEntryCount {
        /// The count found.
        count: u32,
    },
    /// A region is misaligned, inside the header section, or outside the file.
    #[error("region {guid} at {offset:#x} with length {length:#x} is invalid: {reason}")]
    RegionRange {
        /// The region.
        guid: Uuid,
        /// Its offset.
        offset: u64,
        /// Its length.
        length: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two regions (or a region and the log) overlap.
    #[error("{first} overlaps {second}")]
    Overlap {
        /// One structure.
        first: String,
        /// The other.
        second: String,
    },
    /// A region GUID appears twice.
    #[error("region {guid} appears twice")]
    RegionDuplicate {
        /// The region.
        guid: Uuid,
    },
    /// A required region is not understood.
    #[error("required region {guid} is not supported")]
    UnknownRequiredRegion {
        /// The region.
        guid: Uuid,
    },
    /// The BAT or metadata region is missing.
    #[error("the {name} region is missing")]
    MissingRegion {
        /// Which region.
        name: &'static str,
    },
    /// The metadata table signature is not `metadata`.
    #[error("metadata table signature is {found:#018x}, not \"metadata\"")]
    MetadataSignature {
        /// The value found.
        found: u64,
    },
    /// The metadata table claims more than 2047 entries.
    #[error("metadata table has {count} entries, at most 2047 are allowed")]
    MetadataEntryCount {
        /// The count found.
        count: u16,
    },
    /// A metadata item lies outside the metadata region or inside its table, or is too long.
    #[error("metadata item {guid} at {offset:#x} with length {length:#x} is invalid: {reason}")]
    MetadataItemRange {
        /// The item.
        guid: Uuid,
        /// Offset inside the metadata region.
        offset: u32,
        /// Length.
        length: u32,
        /// What is wrong.
        reason: &'static str,
    },
    /// Two metadata items overlap.
    #[error("metadata items {first} and {second} overlap")]
    MetadataOverlap {
        /// One item.
        first: Uuid,
        /// The other.
        second: Uuid,
    },
    /// A metadata item appears twice.
    #[error("metadata item {guid} appears twice")]
    MetadataDuplicate {
        /// The item.
        guid: Uuid,
    },
    /// A required metadata item is not understood.
    #[error("required metadata item {guid} is not supported")]
    UnknownRequiredMetadata {
        /// The item.
        guid: Uuid,
    },
    /// A required system metadata item is missing.
    #[error("the {name} metadata item is missing")]
    MissingMetadata {
        /// Which item.
        name: &'static str,
    },
    /// A system metadata item has the wrong length.
    #[error("the {name} metadata item is {length} bytes long, expected {expected}")]
    MetadataItemLength {
        /// Which item.
        name: &'static str,
        /// Its length.
        length: u32,
        /// The required length.
        expected: u32,
    },
    /// A system metadata item has the wrong IsRequired or IsVirtualDisk flag.
    #[error(
        "the {name} metadata item has flags IsRequired={required}, IsVirtualDisk={virtual_disk}; expected {expected}"
    )]
    MetadataFlags {
        /// Which item.
        name: &'static str,
        /// IsRequired as found.
        required: bool,
        /// IsVirtualDisk as found.
        virtual_disk: bool,
        /// What the specification requires.
        expected: &'static str,
    },
    /// The file carries the "incomplete file" item: its creation never finished.
    #[error("the image's creation did not finish (incomplete-file marker present)")]
    IncompleteFile,
    /// The block size is not a power of two from 1 MiB to 256 MiB.
    #[error("block size {found:#x} is not a power of two from 1 MiB to 256 MiB")]
    BlockSize {
        /// The value found.
        found: u32,
    },
    /// A sector size is neither 512 nor 4096.
    #[error("{which} sector size is {found}, expected 512 or 4096")]
    SectorSize {
        /// `logical` or `physical`.
        which: &'static str,
        /// The value found.
        found: u32,
    },
    /// The virtual size is zero, too large, or not a multiple of the logical sector size.
    #[error("virtual disk size {found:#x} is invalid: {reason}")]
    VirtualSize {
        /// The value found.
        found: u64,
        /// What is wrong.
        reason: &'static str,
    },
    /// The BAT region is smaller than the BAT the disk needs.
    #[error("the BAT needs {needed:#x} bytes but its region is {have:#x} bytes")]
    BatTooSmall {
        /// Bytes needed.
        needed: u64,
        /// Region length.
        have: u64,
    },
    /// The parent locator is malformed.
    #[error("parent locator is invalid: {reason}")]
    ParentLocator {
        /// What is wrong.
        reason: String,
    },
    /// A BAT entry has reserved bits set.
    #[error("BAT entry {index} ({value:#018x}) has reserved bits set")]
    BatReservedBits {
        /// Entry index.
        index: u64,
        /// Raw entry.
        value: u64,
    },
    /// A BAT entry has a state that is not defined for its kind of entry.
    #[error("BAT entry {index} has invalid state {state}")]
    BatState {
        /// Entry index.
        index: u64,
        /// State found.
        state: u8,
    },
    /// A payload or sector-bitmap block ends beyond the end of the file (wholly or partly): its
    /// data is missing, because the file was truncated or the entry is corrupt.
    #[error(
        "{block} (BAT entry {index}) needs file bytes {offset:#x}..{end:#x}, but the file ends at {file_len:#x}: its data is missing (the file is truncated or the entry is corrupt)"
    )]
    BatBeyondFile {
        /// Entry index.
        index: u64,
        /// The block the entry describes.
        block: BlockRef,
        /// Block offset in the file.
        offset: u64,
        /// End of the bytes the block needs in the file (saturating).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// A structure the image needs ends beyond the end of the file: the file was truncated.
    #[error(
        "the {what} ({offset:#x}..{end:#x}) extends beyond the end of the file ({file_len:#x}): the file is truncated"
    )]
    Truncated {
        /// The structure (`"BAT region"`, `"log entry write"`, ...).
        what: String,
        /// Its first byte in the file.
        offset: u64,
        /// Its end in the file (saturating).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// A BAT entry points into the header section, the log, the BAT or the metadata region.
    #[error("BAT entry {index} points at {offset:#x}, inside the {what}")]
    BatOverlap {
        /// Entry index.
        index: u64,
        /// Block offset.
        offset: u64,
        /// The structure it overlaps.
        what: &'static str,
    },
    /// A payload block is partially present in an image without a parent.
    #[error("BAT entry {index} is PARTIALLY_PRESENT in an image without a parent")]
    PartiallyPresentWithoutParent {
        /// Entry index.
        index: u64,
    },
    /// A payload block is partially present but its chunk has no sector bitmap.
    #[error("BAT entry {index} is PARTIALLY_PRESENT but its sector bitmap is not present")]
    SectorBitmapMissing {
        /// Entry index.
        index: u64,
    },
    /// The log GUID is set but the log holds no complete sequence of entries.
    #[error("the log must be replayed but holds no complete sequence of valid entries")]
    NoActiveLogSequence,
    /// A log entry is malformed.
    #[error("log entry at log offset {log_offset:#x} is invalid: {reason}")]
    LogEntry {
        /// Offset inside the log.
        log_offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A log entry writes into the header section or the log itself.
    #[error("log entry writes {length:#x} bytes at {target:#x}, inside the {what}")]
    LogTarget {
        /// Target file offset.
        target: u64,
        /// Length.
        length: u64,
        /// The protected structure.
        what: &'static str,
    },
    /// The file is shorter than the log says was stable: it was truncated after the log was
    /// written.
    #[error("the file is {file_len:#x} bytes but the log says {flushed:#x} bytes were stable")]
    LogTruncatedFile {
        /// File length.
        file_len: u64,
        /// The head entry's FlushedFileOffset.
        flushed: u64,
    },
    /// The log writes, or asks the file to be extended, past the end of the file. [MS-VHDX]
    /// 2.3.3 allows it when the file is at least FlushedFileOffset long (replay extends the
    /// file); strict opens refuse it. Blocks past the end of the file stay missing either way.
    #[error("the log {what}, beyond the end of the file ({file_len:#x})")]
    LogBeyondFile {
        /// What the log asks for.
        what: String,
        /// The end of it in the file (saturating).
        end: u64,
        /// File length.
        file_len: u64,
    },
    /// A read-only open found a log to replay and the caller asked to refuse such images.
    #[error("the log must be replayed, and the open flags refuse dirty logs")]
    DirtyLogRefused,
}

/// The block a BAT entry describes, for messages naming a missing block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockRef {
    /// Payload block `block`, holding the virtual disk bytes from `disk_offset`.
    Payload {
        /// Payload block number.
        block: u64,
        /// Virtual disk offset of its first byte.
        disk_offset: u64,
    },
    /// The sector bitmap block of chunk `chunk`.
    SectorBitmap {
        /// Chunk number.
        chunk: u64,
    },
}

impl std::fmt::Display for BlockRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Payload { block, disk_offset } => {
                write!(f, "payload block {block} at disk offset {disk_offset:#x}")
            }
            Self::SectorBitmap { chunk } => write!(f, "sector bitmap block of chunk {chunk}"),
        }
    }
}

impl Corruption {
    /// The `vd_core` error kind for this rule.
    pub fn kind(&self) -> ErrorKind {
        match self {
            Self::UnknownRequiredRegion { .. } | Self::UnknownRequiredMetadata { .. } => {
                ErrorKind::NotSupported
            }
            Self::FileSignature { .. } => ErrorKind::InvalidHeader,
            _ => ErrorKind::Corrupt,
        }
    }

    /// This rule as a `vd_core` error naming the structure and offset.
    pub fn at(self, field: impl Into<String>, offset: u64) -> Error {
        let msg = match self.kind() {
            ErrorKind::NotSupported => "unsupported VHDX image",
            _ => "corrupt VHDX image",
        };
        Error::new(self.kind(), msg)
            .with_field(field)
            .with_offset(offset)
            .with_source(self)
    }
}

/// A redundant copy ([MS-VHDX] 2.2.2 keeps two headers, 2.2.3 two region tables, so that one
/// can be lost) that is damaged, or two copies that disagree. The open tolerates each with a
/// warning; `check` reports each as an error, and `check -r` rewrites the bad copy from the
/// good one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CopyFault {
    /// Header `slot` (0 or 1) fails its signature, checksum, version or field checks.
    Header(usize),
    /// Both headers are valid, differ, and carry the same sequence number (a lenient open uses
    /// header 1). Which one is right cannot be told, so it is never repaired.
    HeaderTie,
    /// Region table copy `copy` (0 or 1) fails its signature, checksum or entry count.
    RegionTable(usize),
    /// Both region tables are valid but list different regions; copy 1 is used.
    RegionTablesDiffer,
}

/// A [`CopyFault`] and the warning the open gave for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DamagedCopy {
    /// Which copy, and how.
    pub(crate) fault: CopyFault,
    /// What the open said, naming the copy and its offset.
    pub(crate) warning: Warning,
}

/// The [`Corruption`] behind a `vd_core` error, if any.
pub fn corruption_of(err: &Error) -> Option<&Corruption> {
    std::error::Error::source(err).and_then(|s| s.downcast_ref::<Corruption>())
}

/// A deviation of `kind` in `field` at `offset` that an open tolerated.
pub(crate) fn warning(
    kind: ErrorKind,
    field: impl Into<String>,
    offset: u64,
    message: impl Into<String>,
) -> Warning {
    Warning {
        kind,
        field: Some(field.into()),
        offset: Some(offset),
        message: message.into(),
    }
}

/// An I/O error during `op`.
pub(crate) fn io_err(op: &str, e: std::io::Error) -> Error {
    Error::io(op.to_string(), e)
}

/// An I/O error while reading `what` at `offset`.
pub fn io_at(what: &str, offset: u64, e: std::io::Error) -> Error {
    Error::io(format!("cannot read the {what}"), e)
        .with_field(what.to_string())
        .with_offset(offset)
}

/// `value` converted to `T` (a field's width, or `usize` for a length or index in memory), or
/// an `OutOfRange` error naming `field`: used instead of a fallback value, which could write a
/// wrong number into an image.
///
/// # Errors
/// `OutOfRange` when `value` does not fit in `T`.
pub(crate) fn fit<T, V>(value: V, field: &str) -> Result<T, Error>
where
    V: Copy + TryInto<T> + std::fmt::LowerHex,
{
    value.try_into().map_err(|_| {
        Error::new(
            ErrorKind::OutOfRange,
            format!(
                "{field} {value:#x} does not fit in {}",
                std::any::type_name::<T>()
            ),
        )
        .with_field(field.to_string())
    })
}

/// An `OutOfRange` error naming `field`: computing it from the image's values overflows `u64`.
/// Used by `checked_*` arithmetic on values an image supplies (or derives from them), instead
/// of a wrapped or saturated number that could be read from or written to the wrong place.
pub(crate) fn overflow(field: &str) -> Error {
    Error::new(
        ErrorKind::OutOfRange,
        format!("{field} overflows (the image's values are out of range)"),
    )
    .with_field(field.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fit_converts_or_names_the_field() {
        assert_eq!(fit::<u32, u64>(7, "x").unwrap(), 7);
        assert_eq!(fit::<u16, usize>(65535, "x").unwrap(), u16::MAX);
        let e = fit::<u32, u64>(1 << 32, "region length").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert!(
            e.to_string()
                .contains("region length 0x100000000 does not fit in u32"),
            "{e}"
        );
    }

    #[test]
    fn overflow_names_the_field() {
        let e = overflow("BAT page offset");
        assert_eq!(e.kind(), ErrorKind::OutOfRange);
        assert!(e.to_string().contains("BAT page offset overflows"), "{e}");
    }
}
