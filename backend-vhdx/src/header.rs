//! The file identifier and the two headers ([MS-VHDX] 2.2.1, 2.2.2): parsing, choosing the
//! current header, and the update procedure of 2.2.2.1.

use std::sync::Arc;

use vd_core::{Error, ErrorKind, Result, Storage};
use zerocopy::{FromBytes, FromZeros, IntoBytes};

use crate::checksum::crc32c_with_zero_field;
use crate::error::{Corruption, io_at};
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

/// The header in force, validated.
#[derive(Debug, Clone)]
pub struct ActiveHeader {
    /// Which slot (0 or 1) it was read from.
    pub slot: usize,
    /// The raw structure, kept to build the next header from.
    pub raw: Header,
}

impl ActiveHeader {
    /// SequenceNumber.
    pub fn sequence(&self) -> u64 {
        self.raw.sequence_number.get()
    }
    /// FileWriteGuid.
    pub fn file_write_guid(&self) -> Guid {
        self.raw.file_write_guid
    }
    /// DataWriteGuid.
    pub fn data_write_guid(&self) -> Guid {
        self.raw.data_write_guid
    }
    /// LogGuid.
    pub fn log_guid(&self) -> Guid {
        self.raw.log_guid
    }
    /// LogOffset.
    pub fn log_offset(&self) -> u64 {
        self.raw.log_offset.get()
    }
    /// LogLength.
    pub fn log_length(&self) -> u64 {
        u64::from(self.raw.log_length.get())
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

/// The result of reading both headers.
#[derive(Debug)]
pub struct Headers {
    /// The current header.
    pub active: ActiveHeader,
    /// Tolerated problems (one bad header, equal sequence numbers).
    pub warnings: Vec<String>,
}

/// Reads both headers and picks the current one: the only valid one, or the valid one with the
/// higher sequence number. Two valid headers with equal sequence numbers are accepted when they
/// are identical (Disk2VHD writes them so), and otherwise only when not `strict` (header 1 is
/// used, with a warning).
///
/// # Errors
/// `Corrupt` when no header is current; I/O errors.
pub fn read_headers(storage: &dyn Storage, file_len: u64, strict: bool) -> Result<Headers> {
    let mut parsed = Vec::with_capacity(2);
    let mut bufs = Vec::with_capacity(2);
    for &off in &HEADER_OFFSETS {
        let mut buf = vec![0u8; HEADER_SIZE];
        let r = match storage.read_exact_at(off, &mut buf) {
            Ok(()) => validate(&buf, file_len),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Corruption::HeaderSignature { found: 0 })
            }
            Err(e) => return Err(io_at("header", off, e)),
        };
        parsed.push(r);
        bufs.push(buf);
    }
    let mut warnings = Vec::new();
    let (first, second) = (parsed.remove(0), parsed.remove(0));
    let slot = match (&first, &second) {
        (Ok(a), Ok(b)) => {
            let (sa, sb) = (a.sequence_number.get(), b.sequence_number.get());
            if sa > sb {
                0
            } else if sb > sa {
                1
            } else if bufs.first() == bufs.get(1) {
                0
            } else if strict {
                return Err(Corruption::HeaderSequenceTie { sequence: sa }
                    .at("header sequence number", HEADER_OFFSETS[0] + 8));
            } else {
                warnings.push(format!(
                    "both headers have sequence number {sa} but differ; using header 1"
                ));
                0
            }
        }
        (Ok(_), Err(e)) => {
            warnings.push(format!(
                "header 2 at {:#x} is invalid ({e}); using header 1",
                HEADER_OFFSETS[1]
            ));
            0
        }
        (Err(e), Ok(_)) => {
            warnings.push(format!(
                "header 1 at {:#x} is invalid ({e}); using header 2",
                HEADER_OFFSETS[0]
            ));
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
    let raw = if slot == 0 { first } else { second }.map_err(|c| c.at("header", 0))?;
    Ok(Headers {
        active: ActiveHeader { slot, raw },
        warnings,
    })
}

/// Sets a header's checksum over its 4 KiB with the field taken as zero.
pub fn seal(h: &mut Header) {
    h.checksum.set(0);
    let sum = crc32c_with_zero_field(h.as_bytes(), 4);
    h.checksum.set(sum);
}

fn write_slot(storage: &dyn Storage, slot: usize, mut h: Header) -> Result<Header> {
    seal(&mut h);
    let [first, second] = HEADER_OFFSETS;
    let off = if slot & 1 == 0 { first } else { second };
    storage
        .write_all_at(off, h.as_bytes())
        .and_then(|()| storage.flush())
        .map_err(|e| Error::io("cannot write the header", e).with_offset(off))?;
    Ok(h)
}

/// The header update procedure (2.2.2.1): builds the next header from `current` with `change`
/// applied and SequenceNumber + 1, writes it over the non-current slot and flushes, then does
/// the same again so both slots are up to date. Returns the new current header.
///
/// # Errors
/// `Corrupt` if the sequence number would overflow; I/O errors.
pub fn update_headers(
    storage: &Arc<dyn Storage>,
    current: &ActiveHeader,
    change: impl Fn(&mut Header),
) -> Result<ActiveHeader> {
    let mut h = current.raw;
    h.reserved = FromZeros::new_zeroed();
    change(&mut h);
    let mut slot = current.slot;
    let mut seq = current.sequence();
    for _ in 0..2 {
        seq = seq.checked_add(1).ok_or_else(|| {
            Error::new(ErrorKind::Corrupt, "header sequence number would overflow")
        })?;
        h.sequence_number.set(seq);
        slot ^= 1;
        h = write_slot(storage.as_ref(), slot, h)?;
    }
    Ok(ActiveHeader { slot, raw: h })
}
