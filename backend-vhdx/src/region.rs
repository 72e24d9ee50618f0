//! The region table ([MS-VHDX] 2.2.3): both copies, the known regions, and the layout checks
//! (alignment, inside the file, no overlaps with each other, the header section or the log).

use uuid::Uuid;
use vd_core::{ErrorKind, Result, Storage, Warning};
use zerocopy::FromBytes;

use crate::checksum::crc32c_with_zero_field;
use crate::error::{CopyFault, Corruption, DamagedCopy, fit, io_at, warning};
use crate::format::{
    HEADER_SECTION_SIZE, MAX_REGION_ENTRIES, MIB, REGION_SIGNATURE, REGION_TABLE_OFFSETS,
    REGION_TABLE_SIZE, RegionFlags, RegionTableEntry, RegionTableHeader,
};
use crate::guid::{REGION_BAT, REGION_METADATA};

/// One region.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// Which region.
    pub guid: Uuid,
    /// File offset.
    pub offset: u64,
    /// Length.
    pub length: u64,
    /// Whether a reader must understand it.
    pub required: bool,
}

impl Region {
    /// The end of the region in the file. `read_region_table` rejects a region whose end
    /// overflows and regions built here lie inside the file, so it never saturates; a
    /// saturated end would still lie past the end of any file and overlap what follows.
    pub fn end(&self) -> u64 {
        self.offset.saturating_add(self.length)
    }
}

/// The validated region table.
#[derive(Debug, Clone)]
pub struct RegionTable {
    /// The BAT region.
    pub bat: Region,
    /// The metadata region.
    pub metadata: Region,
    /// Regions we do not understand (optional ones; kept for rewriting).
    pub others: Vec<Region>,
    /// Which copy was used (0 or 1).
    pub copy: usize,
}

fn parse(buf: &[u8]) -> std::result::Result<Vec<Region>, Corruption> {
    let (hdr, rest) = RegionTableHeader::read_from_prefix(buf)
        .map_err(|_| Corruption::RegionSignature { found: 0 })?;
    if hdr.signature.get() != REGION_SIGNATURE {
        return Err(Corruption::RegionSignature {
            found: hdr.signature.get(),
        });
    }
    let computed = crc32c_with_zero_field(buf, 4);
    if computed != hdr.checksum.get() {
        return Err(Corruption::Checksum {
            stored: hdr.checksum.get(),
            computed,
        });
    }
    let count = hdr.entry_count.get();
    if count > MAX_REGION_ENTRIES {
        return Err(Corruption::RegionEntryCount { count });
    }
    let n = usize::try_from(count).map_err(|_| Corruption::RegionEntryCount { count })?;
    let (entries, _) = <[RegionTableEntry]>::ref_from_prefix_with_elems(rest, n)
        .map_err(|_| Corruption::RegionEntryCount { count })?;
    Ok(entries
        .iter()
        .map(|e| Region {
            guid: e.guid.to_uuid(),
            offset: e.file_offset.get(),
            length: u64::from(e.length.get()),
            required: RegionFlags::from_bits_retain(e.flags.get()).contains(RegionFlags::REQUIRED),
        })
        .collect())
}

/// The file offset of entry `i` of the region table at `table_off`.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "table_off is one of REGION_TABLE_OFFSETS (at most 256 KiB) and i < 2047 \
              (MAX_REGION_ENTRIES, checked by parse), so the offset is below 320 KiB"
)]
fn entry_offset(table_off: u64, i: usize) -> u64 {
    table_off + 16 + 32 * i as u64
}

/// Ranges that must not overlap, checked by sorting and sweeping.
pub fn check_overlaps(mut ranges: Vec<(u64, u64, String)>) -> std::result::Result<(), Corruption> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_by_key(|r| r.0);
    for w in ranges.windows(2) {
        if let [a, b] = w
            && a.0.saturating_add(a.1) > b.0
        {
            return Err(Corruption::Overlap {
                first: a.2.clone(),
                second: b.2.clone(),
            });
        }
    }
    Ok(())
}

/// One region table copy as read: its 64 KiB, and its regions or why it is invalid.
struct Copy {
    bytes: Vec<u8>,
    parsed: std::result::Result<Vec<Region>, Corruption>,
}

/// Reads and parses both copies. A copy the file ends before is invalid.
fn read_both(storage: &dyn Storage) -> Result<[Copy; 2]> {
    let read = |off: u64| -> Result<Copy> {
        let mut bytes = vec![0u8; REGION_TABLE_SIZE];
        let parsed = match storage.read_exact_at(off, &mut bytes) {
            Ok(()) => parse(&bytes),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                Err(Corruption::RegionSignature { found: 0 })
            }
            Err(e) => return Err(io_at("region table", off, e)),
        };
        Ok(Copy { bytes, parsed })
    };
    let [first, second] = REGION_TABLE_OFFSETS;
    Ok([read(first)?, read(second)?])
}

/// Both region table copies as the file holds them now.
#[derive(Debug)]
pub struct Copies {
    /// The 64 KiB of copy 1 and copy 2.
    pub bytes: [Vec<u8>; 2],
    /// Whether each copy passes its signature, checksum and entry-count checks.
    pub valid: [bool; 2],
    /// Whether both are valid and list the same regions.
    pub agree: bool,
}

/// Reads both region table copies for `check`: which are valid, and whether they agree.
///
/// # Errors
/// I/O errors.
pub fn read_copies(storage: &dyn Storage) -> Result<Copies> {
    let [first, second] = read_both(storage)?;
    let agree = matches!((&first.parsed, &second.parsed), (Ok(a), Ok(b)) if a == b);
    Ok(Copies {
        valid: [first.parsed.is_ok(), second.parsed.is_ok()],
        agree,
        bytes: [first.bytes, second.bytes],
    })
}

/// The damage of region table copy `copy` (0 or 1), using the other one.
fn invalid_copy(copy: usize, why: &Corruption) -> DamagedCopy {
    let (n, other) = if copy == 0 { (1, 2) } else { (2, 1) };
    let [first, second] = REGION_TABLE_OFFSETS;
    let off = if copy == 0 { first } else { second };
    DamagedCopy {
        fault: CopyFault::RegionTable(copy),
        warning: warning(
            ErrorKind::Corrupt,
            format!("region table {n}"),
            off,
            format!("region table {n} at {off:#x} is invalid ({why}); using region table {other}"),
        ),
    }
}

/// Reads both region tables, uses the first valid copy, and checks every region against the
/// file length and the log. A bad copy, or two valid copies that differ, goes to `damaged`;
/// other tolerated deviations to `warnings`.
///
/// # Errors
/// `Corrupt` for no valid copy or a bad layout; `NotSupported` for an unknown required region.
pub fn read_region_table(
    storage: &dyn Storage,
    file_len: u64,
    log: (u64, u64),
    warnings: &mut Vec<Warning>,
    damaged: &mut Vec<DamagedCopy>,
) -> Result<RegionTable> {
    let [first, second] = read_both(storage)?;
    let (copy, regions) = match (first.parsed, second.parsed) {
        (Ok(a), Ok(b)) => {
            if a != b {
                damaged.push(DamagedCopy {
                    fault: CopyFault::RegionTablesDiffer,
                    warning: warning(
                        ErrorKind::Corrupt,
                        "region table 2",
                        REGION_TABLE_OFFSETS[1],
                        format!(
                            "the two region tables differ: region table 2 at {:#x} lists other \
                             regions than region table 1; using region table 1",
                            REGION_TABLE_OFFSETS[1]
                        ),
                    ),
                });
            }
            (0, a)
        }
        (Ok(a), Err(e)) => {
            damaged.push(invalid_copy(1, &e));
            (0, a)
        }
        (Err(e), Ok(b)) => {
            damaged.push(invalid_copy(0, &e));
            (1, b)
        }
        (Err(a), Err(b)) => {
            return Err(Corruption::NoValidRegionTable {
                first: a.to_string(),
                second: b.to_string(),
            }
            .at("region tables", REGION_TABLE_OFFSETS[0]));
        }
    };
    let [first_off, second_off] = REGION_TABLE_OFFSETS;
    let table_off = if copy == 0 { first_off } else { second_off };
    let mut bat = None;
    let mut metadata = None;
    let mut others = Vec::new();
    let mut ranges = vec![(0, HEADER_SECTION_SIZE, "the header section".to_string())];
    if log.1 > 0 {
        ranges.push((log.0, log.1, "the log".to_string()));
    }
    for (i, r) in regions.iter().enumerate() {
        let field = format!("region table entry {i}");
        // At most 2047 entries (parse), so the entry offset is below 192 KiB + 64 KiB.
        let entry_off = entry_offset(table_off, i);
        let bad = |reason| {
            Corruption::RegionRange {
                guid: r.guid,
                offset: r.offset,
                length: r.length,
                reason,
            }
            .at(field.clone(), entry_off)
        };
        if r.offset % MIB != 0 || r.length % MIB != 0 {
            return Err(bad("not a multiple of 1 MiB"));
        }
        if r.length == 0 {
            return Err(bad("empty"));
        }
        if r.offset < HEADER_SECTION_SIZE {
            return Err(bad("inside the header section"));
        }
        if r.offset.checked_add(r.length).is_none() {
            return Err(bad("offset overflows"));
        }
        let slot = if r.guid == REGION_BAT {
            &mut bat
        } else if r.guid == REGION_METADATA {
            &mut metadata
        } else if r.required {
            return Err(Corruption::UnknownRequiredRegion { guid: r.guid }.at(field, entry_off));
        } else {
            warnings.push(warning(
                ErrorKind::NotSupported,
                field.clone(),
                entry_off,
                format!("ignoring unknown optional region {}", r.guid),
            ));
            others.push(*r);
            ranges.push((r.offset, r.length, format!("region {}", r.guid)));
            continue;
        };
        if slot.is_some() {
            return Err(Corruption::RegionDuplicate { guid: r.guid }.at(field, entry_off));
        }
        *slot = Some(*r);
        let name = if r.guid == REGION_BAT {
            "the BAT region"
        } else {
            "the metadata region"
        };
        ranges.push((r.offset, r.length, name.to_string()));
    }
    check_overlaps(ranges).map_err(|c| c.at("region table", table_off))?;
    let bat =
        bat.ok_or_else(|| Corruption::MissingRegion { name: "BAT" }.at("region table", table_off))?;
    let metadata = metadata.ok_or_else(|| {
        Corruption::MissingRegion { name: "metadata" }.at("region table", table_off)
    })?;
    if metadata.end() > file_len {
        return Err(Corruption::RegionRange {
            guid: metadata.guid,
            offset: metadata.offset,
            length: metadata.length,
            reason: "beyond the end of the file",
        }
        .at("metadata region", table_off));
    }
    if bat.offset >= file_len {
        return Err(Corruption::RegionRange {
            guid: bat.guid,
            offset: bat.offset,
            length: bat.length,
            reason: "beyond the end of the file",
        }
        .at("BAT region", table_off));
    }
    Ok(RegionTable {
        bat,
        metadata,
        others,
        copy,
    })
}

/// Serialises a region table (the BAT, the metadata region, then every other region) with its
/// checksum, as a 64 KiB block.
///
/// # Errors
/// `OutOfRange` when a region is longer than its 32-bit length field holds or the regions do
/// not fit in the table.
pub fn build_region_table(t: &RegionTable) -> Result<Vec<u8>> {
    use zerocopy::IntoBytes;
    use zerocopy::little_endian::{U32, U64};
    let regions: Vec<Region> = [t.bat, t.metadata]
        .into_iter()
        .chain(t.others.iter().copied())
        .collect();
    let mut out = vec![0u8; REGION_TABLE_SIZE];
    let header = RegionTableHeader {
        signature: U32::new(REGION_SIGNATURE),
        checksum: U32::new(0),
        entry_count: U32::new(fit(regions.len(), "region table entry count")?),
        reserved: U32::new(0),
    };
    let mut bytes = header.as_bytes().to_vec();
    for r in &regions {
        let e = RegionTableEntry {
            guid: crate::guid::Guid::from_uuid(r.guid),
            file_offset: U64::new(r.offset),
            length: U32::new(fit(r.length, "region length")?),
            flags: U32::new(if r.required {
                RegionFlags::REQUIRED.bits()
            } else {
                0
            }),
        };
        bytes.extend_from_slice(e.as_bytes());
    }
    out.get_mut(..bytes.len())
        .ok_or_else(|| {
            vd_core::Error::new(
                ErrorKind::OutOfRange,
                format!("{} regions do not fit in the region table", regions.len()),
            )
        })?
        .copy_from_slice(&bytes);
    let sum = crc32c_with_zero_field(&out, 4);
    // The table is 64 KiB, so its checksum field exists.
    if let Some(d) = out.get_mut(4..8) {
        d.copy_from_slice(&sum.to_le_bytes());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::uuid;
    use vd_core::MemStorage;

    fn table() -> RegionTable {
        let r = |guid, offset, length, required| Region {
            guid,
            offset,
            length,
            required,
        };
        RegionTable {
            bat: r(REGION_BAT, 3 * MIB, MIB, true),
            metadata: r(REGION_METADATA, 2 * MIB, MIB, true),
            others: vec![r(
                uuid!("aaaaaaaa-0000-4000-8000-000000000001"),
                4 * MIB,
                MIB,
                false,
            )],
            copy: 0,
        }
    }

    #[test]
    fn region_table_round_trips() {
        let bytes = build_region_table(&table()).unwrap();
        assert_eq!(bytes.len(), REGION_TABLE_SIZE);
        let regions = parse(&bytes).unwrap();
        let t = table();
        assert_eq!(regions, [t.bat, t.metadata, t.others[0]]);
        let (h, rest) = RegionTableHeader::read_from_prefix(&bytes).unwrap();
        assert_eq!(h.entry_count.get(), 3);
        let (e, _) = <[RegionTableEntry]>::ref_from_prefix_with_elems(rest, 3).unwrap();
        assert_eq!(e[0].flags.get(), RegionFlags::REQUIRED.bits());
        assert_eq!(e[2].flags.get(), 0);
    }

    #[test]
    fn a_bad_copy_falls_back_to_the_other() {
        let bytes = build_region_table(&table()).unwrap();
        let mut file = vec![0u8; usize::try_from(5 * MIB).unwrap()];
        for off in REGION_TABLE_OFFSETS {
            let at = usize::try_from(off).unwrap();
            file[at..at + REGION_TABLE_SIZE].copy_from_slice(&bytes);
        }
        let first = usize::try_from(REGION_TABLE_OFFSETS[0]).unwrap();
        file[first + 100] ^= 1;
        let s = MemStorage::from_bytes(file);
        let (mut warnings, mut damaged) = (Vec::new(), Vec::new());
        let t = read_region_table(&s, 5 * MIB, (MIB, MIB), &mut warnings, &mut damaged).unwrap();
        assert_eq!(t.copy, 1);
        assert_eq!(t.bat, table().bat);
        assert_eq!(damaged.len(), 1, "{damaged:?}");
        assert_eq!(damaged[0].fault, CopyFault::RegionTable(0));
        let w = &damaged[0].warning;
        assert_eq!(
            (w.kind, w.field.as_deref(), w.offset),
            (
                ErrorKind::Corrupt,
                Some("region table 1"),
                Some(REGION_TABLE_OFFSETS[0])
            )
        );
        let copies = read_copies(&s).unwrap();
        assert_eq!((copies.valid, copies.agree), ([false, true], false));
        // The table's unknown optional region is a typed "not supported" warning.
        assert!(
            warnings
                .iter()
                .any(|w| w.kind == ErrorKind::NotSupported && w.message.contains("optional region")),
            "{warnings:?}"
        );
    }

    #[test]
    fn a_region_too_long_for_its_field_is_an_error() {
        let mut t = table();
        t.others[0].length = 1 << 32;
        assert!(build_region_table(&t).is_err());
    }

    /// A sealed region table whose count says `count`, with `count` entries (distinct GUIDs)
    /// after the BAT and metadata entries of [`table`].
    fn table_with(count: u32) -> Vec<u8> {
        let mut bytes = build_region_table(&table()).unwrap();
        bytes[8..12].copy_from_slice(&count.to_le_bytes());
        for i in 3..usize::try_from(count).unwrap().min(2047) {
            let e = 16 + 32 * i;
            bytes[e..e + 4].copy_from_slice(&u32::try_from(i).unwrap().to_le_bytes());
            bytes[e + 16..e + 24].copy_from_slice(&(8 * MIB).to_le_bytes());
        }
        bytes[4..8].fill(0);
        let sum = crc32c_with_zero_field(&bytes, 4);
        bytes[4..8].copy_from_slice(&sum.to_le_bytes());
        bytes
    }

    #[test]
    fn region_entry_count_limit() {
        // At the limit (the table is full): parsed.
        assert_eq!(parse(&table_with(MAX_REGION_ENTRIES)).unwrap().len(), 2047);
        // Just over: a typed error naming the count.
        assert!(matches!(
            parse(&table_with(MAX_REGION_ENTRIES + 1)),
            Err(Corruption::RegionEntryCount { count: 2048 })
        ));
    }
}
