//! The file identifier and the two headers ([MS-VHDX] 2.2.1, 2.2.2): parsing, choosing the
//! current header, and the update procedure of 2.2.2.1.

use std::sync::Arc;

use vd_core::{Error, ErrorKind, Result, Storage};
use zerocopy::little_endian::{U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::checksum::crc32c_with_zero_field;
use crate::error::{CopyFault, Corruption, DamagedCopy, io_at, warning};
use crate::format::{
    FILE_SIGNATURE, FileIdentifier, HEADER_OFFSETS, HEADER_SECTION_SIZE, HEADER_SIGNATURE,
    HEADER_SIZE, Header, MAX_LOG_SIZE, MIB,
};
use crate::guid::Guid;

/// Reads the creator string of the file identifier, after checking the signature.
///
/// # Errors
/// `InvalidHeader` when the signature is wrong; I/O errors.
pub fn read_identifier(storage: &dyn Storage) -> Result<String> {
    let mut buf = [0u8; size_of::<FileIdentifier>()];
    storage
        .read_exact_at(0, &mut buf)
        .map_err(|e| io_at("file identifier", 0, e))?;
    let id = FileIdentifier::read_from_bytes(&buf)
        .map_err(|_| Error::new(ErrorKind::InvalidHeader, "file identifier is truncated"))?;
    if id.signature.get() != FILE_SIGNATURE {
        return Err(Corruption::FileSignature {
            found: id.signature.get(),
        }
        .at("file identifier signature", 0));
    }
    let units: Vec<u16> = id
        .creator
        .iter()
        .map(|u| u.get())
        .take_while(|&u| u != 0)
        .collect();
    Ok(String::from_utf16_lossy(&units))
}

/// The header in force, validated, as plain values (2.2.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHeader {
    /// Which slot (0 or 1) it was read from.
    pub slot: usize,
    /// SequenceNumber: higher is newer.
    pub sequence: u64,
    /// FileWriteGuid.
    pub file_write_guid: Guid,
    /// DataWriteGuid.
    pub data_write_guid: Guid,
    /// LogGuid: non-zero when the log holds entries to replay.
    pub log_guid: Guid,
    /// LogVersion (0).
    pub log_version: u16,
    /// Version (1).
    pub version: u16,
    /// LogLength.
    pub log_length: u32,
    /// LogOffset.
    pub log_offset: u64,
}

impl ActiveHeader {
    /// The values of the wire header `h`, read from `slot`.
    pub fn from_wire(slot: usize, h: &Header) -> Self {
        Self {
            slot,
            sequence: h.sequence_number.get(),
            file_write_guid: h.file_write_guid,
            data_write_guid: h.data_write_guid,
            log_guid: h.log_guid,
            log_version: h.log_version.get(),
            version: h.version.get(),
            log_length: h.log_length.get(),
            log_offset: h.log_offset.get(),
        }
    }

    /// The wire header with these values, reserved bytes zero, sealed with its checksum.
    pub fn to_wire(self) -> Header {
        let mut h = Header {
            signature: U32::new(HEADER_SIGNATURE),
            checksum: U32::new(0),
            sequence_number: U64::new(self.sequence),
            file_write_guid: self.file_write_guid,
            data_write_guid: self.data_write_guid,
            log_guid: self.log_guid,
            log_version: U16::new(self.log_version),
            version: U16::new(self.version),
            log_length: U32::new(self.log_length),
            log_offset: U64::new(self.log_offset),
            reserved: FromZeros::new_zeroed(),
        };
        seal(&mut h);
        h
    }

    /// SequenceNumber.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }
    /// FileWriteGuid.
    pub fn file_write_guid(&self) -> Guid {
        self.file_write_guid
    }
    /// DataWriteGuid.
    pub fn data_write_guid(&self) -> Guid {
        self.data_write_guid
    }
    /// LogGuid.
    pub fn log_guid(&self) -> Guid {
        self.log_guid
    }
    /// LogOffset.
    pub fn log_offset(&self) -> u64 {
        self.log_offset
    }
    /// LogLength.
    pub fn log_length(&self) -> u64 {
        u64::from(self.log_length)
    }
    /// The end of the log in the file. A parsed header's log ends inside the file (checked
    /// there), and an empty log ends at its offset, so it never saturates.
    pub fn log_end(&self) -> u64 {
        self.log_offset.saturating_add(self.log_length())
    }
}

/// The fields a header update (2.2.2.1) may change; `None` keeps the current value. The
/// sequence number and slot are the update procedure's own.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderUpdate {
    /// A new FileWriteGuid.
    pub file_write_guid: Option<Guid>,
    /// A new DataWriteGuid.
    pub data_write_guid: Option<Guid>,
    /// A new LogGuid (zero: the log is empty).
    pub log_guid: Option<Guid>,
}

impl HeaderUpdate {
    /// A fresh random FileWriteGuid (the first change of a session).
    pub fn new_file_write_guid() -> Self {
        Self {
            file_write_guid: Some(Guid::from_uuid(uuid::Uuid::new_v4())),
            ..Self::default()
        }
    }

    /// Sets the LogGuid.
    pub fn log_guid(guid: Guid) -> Self {
        Self {
            log_guid: Some(guid),
            ..Self::default()
        }
    }

    /// Sets the DataWriteGuid.
    pub fn data_write_guid(guid: Guid) -> Self {
        Self {
            data_write_guid: Some(guid),
            ..Self::default()
        }
    }

    /// `current` with these changes.
    pub fn apply(self, current: &ActiveHeader) -> ActiveHeader {
        ActiveHeader {
            file_write_guid: self.file_write_guid.unwrap_or(current.file_write_guid),
            data_write_guid: self.data_write_guid.unwrap_or(current.data_write_guid),
            log_guid: self.log_guid.unwrap_or(current.log_guid),
            ..*current
        }
    }
}

/// Checks one header slot's signature, checksum and fields.
fn validate(buf: &[u8], file_len: u64) -> std::result::Result<Header, Corruption> {
    let h = Header::read_from_bytes(buf).map_err(|_| Corruption::HeaderSignature { found: 0 })?;
    if h.signature.get() != HEADER_SIGNATURE {
        return Err(Corruption::HeaderSignature {
            found: h.signature.get(),
        });
    }
    let computed = crc32c_with_zero_field(buf, 4);
    if computed != h.checksum.get() {
        return Err(Corruption::Checksum {
            stored: h.checksum.get(),
            computed,
        });
    }
    if h.version.get() != 1 {
        return Err(Corruption::HeaderVersion {
            found: h.version.get(),
        });
    }
    if !h.log_guid.is_zero() && h.log_version.get() != 0 {
        return Err(Corruption::LogVersion {
            found: h.log_version.get(),
        });
    }
    let (offset, length) = (h.log_offset.get(), u64::from(h.log_length.get()));
    let bad = |reason| Corruption::LogRange {
        offset,
        length,
        reason,
    };
    if length == 0 {
        if !h.log_guid.is_zero() {
            return Err(Corruption::LogGuidWithoutLog);
        }
    } else {
        if offset % MIB != 0 || length % MIB != 0 {
            return Err(bad("not a multiple of 1 MiB"));
        }
        if offset < HEADER_SECTION_SIZE {
            return Err(bad("inside the header section"));
        }
        if length > MAX_LOG_SIZE {
            return Err(bad("longer than 1 GiB"));
        }
        if offset.checked_add(length).is_none_or(|end| end > file_len) {
            return Err(bad("beyond the end of the file"));
        }
    }
    Ok(h)
}

/// The file offset of header 1's SequenceNumber field.
const HEADER1_SEQUENCE_AT: u64 = HEADER_OFFSETS[0] + 8;

/// One header slot as read: its 4 KiB, and the header or why it is invalid.
struct Slot {
    bytes: Vec<u8>,
    parsed: std::result::Result<Header, Corruption>,
}

/// Reads and validates both header slots. A slot the file ends before is invalid.
fn read_slots(storage: &dyn Storage, file_len: u64) -> Result<[Slot; 2]> {
    let read = |off: u64| -> Result<Slot> {
        let mut bytes = vec![0u8; HEADER_SIZE];
        let parsed = match storage.read_exact_at(off, &mut bytes) {
            Ok(()) => validate(&bytes, file_len),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Corruption::HeaderSignature { found: 0 })
            }
            Err(e) => return Err(io_at("header", off, e)),
        };
        Ok(Slot { bytes, parsed })
    };
    let [first, second] = HEADER_OFFSETS;
    Ok([read(first)?, read(second)?])
}

/// Whether each header slot (header 1, header 2) fails its signature, checksum, version or
/// field checks as the file is now.
///
/// # Errors
/// I/O errors.
pub fn invalid_slots(storage: &dyn Storage, file_len: u64) -> Result<[bool; 2]> {
    let [first, second] = read_slots(storage, file_len)?;
    Ok([first.parsed.is_err(), second.parsed.is_err()])
}

/// The result of reading both headers.
#[derive(Debug)]
pub struct Headers {
    /// The current header.
    pub active: ActiveHeader,
    /// Tolerated problems of the redundant copies (one bad header, equal sequence numbers on
    /// different headers), each with its warning.
    pub damaged: Vec<DamagedCopy>,
}

/// The warning for header `slot` (0 or 1) being invalid, using the other one.
fn invalid_header(slot: usize, why: &Corruption) -> DamagedCopy {
    let (n, other) = if slot == 0 { (1, 2) } else { (2, 1) };
    let [first, second] = HEADER_OFFSETS;
    let off = if slot == 0 { first } else { second };
    DamagedCopy {
        fault: CopyFault::Header(slot),
        warning: warning(
            ErrorKind::Corrupt,
            format!("header {n}"),
            off,
            format!("header {n} at {off:#x} is invalid ({why}); using header {other}"),
        ),
    }
}

/// Reads both headers and picks the current one: the only valid one, or the valid one with the
/// higher sequence number. Two valid headers with equal sequence numbers are accepted when they
/// are identical (Disk2VHD writes them so), and otherwise only when not `strict` (header 1 is
/// used, with a warning). A valid header older than the other is how the update procedure
/// (2.2.2.1) leaves them, not a problem.
///
/// # Errors
/// `Corrupt` when no header is current; I/O errors.
pub fn read_headers(storage: &dyn Storage, file_len: u64, strict: bool) -> Result<Headers> {
    let [first, second] = read_slots(storage, file_len)?;
    let mut damaged = Vec::new();
    let slot = match (&first.parsed, &second.parsed) {
        (Ok(a), Ok(b)) => {
            let (sa, sb) = (a.sequence_number.get(), b.sequence_number.get());
            if sa > sb {
                0
            } else if sb > sa {
                1
            } else if first.bytes == second.bytes {
                0
            } else if strict {
                return Err(Corruption::HeaderSequenceTie { sequence: sa }
                    .at("header sequence number", HEADER1_SEQUENCE_AT));
            } else {
                damaged.push(DamagedCopy {
                    fault: CopyFault::HeaderTie,
                    warning: warning(
                        ErrorKind::Corrupt,
                        "header sequence number",
                        HEADER1_SEQUENCE_AT,
                        format!(
                            "both headers have sequence number {sa} but differ; using header 1"
                        ),
                    ),
                });
                0
            }
        }
        (Ok(_), Err(e)) => {
            damaged.push(invalid_header(1, e));
            0
        }
        (Err(e), Ok(_)) => {
            damaged.push(invalid_header(0, e));
            1
        }
        (Err(a), Err(b)) => {
            return Err(Corruption::NoValidHeader {
                first: a.to_string(),
                second: b.to_string(),
            }
            .at("headers", HEADER_OFFSETS[0]));
        }
    };
    let raw = if slot == 0 { first } else { second }
        .parsed
        .map_err(|c| c.at("header", 0))?;
    Ok(Headers {
        active: ActiveHeader::from_wire(slot, &raw),
        damaged,
    })
}

/// Sets a header's checksum over its 4 KiB with the field taken as zero.
pub fn seal(h: &mut Header) {
    h.checksum.set(0);
    let sum = crc32c_with_zero_field(h.as_bytes(), 4);
    h.checksum.set(sum);
}

fn write_slot(storage: &dyn Storage, h: &ActiveHeader) -> Result<()> {
    let [first, second] = HEADER_OFFSETS;
    let off = if h.slot & 1 == 0 { first } else { second };
    storage
        .write_all_at(off, h.to_wire().as_bytes())
        .and_then(|()| storage.flush())
        .map_err(|e| Error::io("cannot write the header", e).with_offset(off))?;
    Ok(())
}

/// The header update procedure (2.2.2.1): builds the next header from `current` with `update`
/// applied and SequenceNumber + 1, writes it over the non-current slot and flushes, then does
/// the same again so both slots are up to date. Returns the new current header.
///
/// # Errors
/// `Corrupt` if the sequence number would overflow; I/O errors.
pub fn update_headers(
    storage: &Arc<dyn Storage>,
    current: &ActiveHeader,
    update: HeaderUpdate,
) -> Result<ActiveHeader> {
    let mut h = update.apply(current);
    for _ in 0..2 {
        h.sequence = h.sequence.checked_add(1).ok_or_else(|| {
            Error::new(ErrorKind::Corrupt, "header sequence number would overflow")
        })?;
        h.slot ^= 1;
        write_slot(storage.as_ref(), &h)?;
    }
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vd_core::MemStorage;

    fn sample() -> ActiveHeader {
        ActiveHeader {
            slot: 1,
            sequence: 7,
            file_write_guid: Guid::from_uuid(uuid::uuid!("11111111-2222-3333-4444-555555555555")),
            data_write_guid: Guid::from_uuid(uuid::uuid!("66666666-7777-8888-9999-aaaaaaaaaaaa")),
            log_guid: Guid::ZERO,
            log_version: 0,
            version: 1,
            log_length: 1 << 20,
            log_offset: MIB,
        }
    }

    #[test]
    fn header_round_trips_through_the_wire_form() {
        let h = sample();
        let wire = h.to_wire();
        assert_eq!(wire.signature.get(), HEADER_SIGNATURE);
        assert!(wire.reserved.iter().all(|&b| b == 0));
        let parsed = validate(wire.as_bytes(), 4 * MIB).unwrap();
        assert_eq!(ActiveHeader::from_wire(1, &parsed), h);
        // Any flipped bit breaks the checksum.
        let mut bytes = wire.as_bytes().to_vec();
        bytes[100] ^= 1;
        assert!(matches!(
            validate(&bytes, 4 * MIB),
            Err(Corruption::Checksum { .. })
        ));
    }

    #[test]
    fn updates_change_only_what_they_name() {
        let h = sample();
        let g = Guid::from_uuid(uuid::uuid!("bbbbbbbb-cccc-dddd-eeee-ffffffffffff"));
        assert_eq!(
            HeaderUpdate::log_guid(g).apply(&h),
            ActiveHeader { log_guid: g, ..h }
        );
        assert_eq!(
            HeaderUpdate::data_write_guid(g).apply(&h),
            ActiveHeader {
                data_write_guid: g,
                ..h
            }
        );
        let f = HeaderUpdate::new_file_write_guid().apply(&h);
        assert_ne!(f.file_write_guid, h.file_write_guid);
        assert_eq!(
            ActiveHeader {
                file_write_guid: h.file_write_guid,
                ..f
            },
            h
        );
        assert_eq!(HeaderUpdate::default().apply(&h), h);
    }

    #[test]
    fn update_writes_both_slots_and_the_newer_one_wins() {
        let mut file = vec![0u8; usize::try_from(4 * MIB).unwrap()];
        let h = sample();
        for (slot, &off) in HEADER_OFFSETS.iter().enumerate() {
            let at = usize::try_from(off).unwrap();
            file[at..at + HEADER_SIZE]
                .copy_from_slice(ActiveHeader { slot, ..h }.to_wire().as_bytes());
        }
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(file));
        let g = Guid::from_uuid(uuid::uuid!("bbbbbbbb-cccc-dddd-eeee-ffffffffffff"));
        let new = update_headers(&s, &h, HeaderUpdate::log_guid(g)).unwrap();
        // Two writes: slot 0 with sequence 8, then slot 1 with sequence 9.
        assert_eq!((new.slot, new.sequence, new.log_guid), (1, 9, g));
        let read = read_headers(s.as_ref(), 4 * MIB, true).unwrap();
        assert!(read.damaged.is_empty());
        assert_eq!(read.active, new);
        assert_eq!(invalid_slots(s.as_ref(), 4 * MIB).unwrap(), [false, false]);
        // A corrupt current header falls back to the other, one sequence older.
        s.write_all_at(HEADER_OFFSETS[1] + 200, &[1]).unwrap();
        let read = read_headers(s.as_ref(), 4 * MIB, false).unwrap();
        assert_eq!((read.active.slot, read.active.sequence), (0, 8));
        assert_eq!(read.damaged.len(), 1);
        assert_eq!(read.damaged[0].fault, CopyFault::Header(1));
        assert_eq!(invalid_slots(s.as_ref(), 4 * MIB).unwrap(), [false, true]);
        // The warning names the damaged copy as a typed location.
        let w = &read.damaged[0].warning;
        assert_eq!(w.kind, ErrorKind::Corrupt);
        assert_eq!(
            (w.field.as_deref(), w.offset),
            (Some("header 2"), Some(HEADER_OFFSETS[1]))
        );
    }

    #[test]
    fn sequence_overflow_is_an_error() {
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(vec![0; 1 << 20]));
        let h = ActiveHeader {
            sequence: u64::MAX,
            ..sample()
        };
        assert!(update_headers(&s, &h, HeaderUpdate::default()).is_err());
    }
}
