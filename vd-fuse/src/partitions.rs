//! GPT and MBR partition tables, parsed by hand with every byte untrusted.
//!
//! The crates that exist do not take hostile input: `gpt` 4.1 asserts that the entry size is
//! 128 (a panic on a table that says otherwise) and reads as many entries as the header claims,
//! and `mbrman` 0.6 adds 32-bit sector numbers unchecked (an overflow panic in debug builds).
//! A table here can at worst yield no partitions and a warning: each header and entry array is
//! checked against its CRC-32, every sector number is multiplied and added with checks, the
//! entry array and the chain of extended boot records are bounded by named limits, and a
//! partition reaching past the end of the disk is clipped (or skipped when it starts there).
//!
//! Numbering follows Linux: GPT partition `n` is entry `n - 1` of the array (unused entries
//! leave gaps), MBR primary partitions are 1 to 4 by slot, and logical partitions in an
//! extended partition are 5, 6, … in chain order.

use std::collections::BTreeSet;
use std::io;

use zerocopy::little_endian::{U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Most bytes of a GPT partition entry array read: 1 MiB, 8192 entries of 128 bytes, 64 times
/// the 128 entries every tool writes.
pub const MAX_GPT_ARRAY_BYTES: u64 = 1 << 20;

/// Largest GPT entry size accepted; the size must also be a power of two of at least 128.
pub const MAX_GPT_ENTRY_SIZE: u32 = 4096;

/// Most logical partitions followed down an extended partition's chain (Linux shows at most
/// 256 partitions on a disk).
pub const MAX_LOGICAL_PARTITIONS: usize = 128;

/// A partition: a byte range of the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Partition {
    /// The partition number (`p1` is 1), as Linux numbers it.
    pub number: u32,
    /// Start in bytes from the start of the disk.
    pub offset: u64,
    /// Length in bytes (clipped to the disk).
    pub length: u64,
}

/// Which table a disk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableKind {
    /// No partition table was recognised.
    None,
    /// A master boot record (with any logical partitions).
    Mbr,
    /// A GUID partition table.
    Gpt,
}

/// What [`read_table`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    /// The kind of table.
    pub kind: TableKind,
    /// Its partitions, by number.
    pub partitions: Vec<Partition>,
    /// What was wrong with the table and what was done about it (a damaged header, an
    /// entry clipped or skipped).
    pub warnings: Vec<String>,
}

/// GPT header (UEFI 2.10, 5.3.2), the first 92 bytes of LBA 1.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct GptHeader {
    signature: [u8; 8],
    revision: U32,
    header_size: U32,
    header_crc32: U32,
    reserved: U32,
    my_lba: U64,
    alternate_lba: U64,
    first_usable_lba: U64,
    last_usable_lba: U64,
    disk_guid: [u8; 16],
    entries_lba: U64,
    entry_count: U32,
    entry_size: U32,
    entries_crc32: U32,
}
const _: () = assert!(size_of::<GptHeader>() == 92);
const _: () = assert!(std::mem::offset_of!(GptHeader, entries_lba) == 72);

/// GPT partition entry (UEFI 2.10, 5.3.3), the first 56 bytes (the name follows).
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct GptEntry {
    type_guid: [u8; 16],
    unique_guid: [u8; 16],
    first_lba: U64,
    last_lba: U64,
    attributes: U64,
}
const _: () = assert!(size_of::<GptEntry>() == 56);

/// MBR partition entry: 16 bytes, four of them at offset 446 of an MBR or EBR.
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
#[repr(C)]
struct MbrEntry {
    boot: u8,
    first_chs: [u8; 3],
    kind: u8,
    last_chs: [u8; 3],
    start_lba: U32,
    sectors: U32,
}
const _: () = assert!(size_of::<MbrEntry>() == 16);

const GPT_SIGNATURE: &[u8; 8] = b"EFI PART";
const MBR_ENTRIES_AT: usize = 446;
const MBR_PROTECTIVE: u8 = 0xee;
const MBR_EXTENDED: [u8; 3] = [0x05, 0x0f, 0x85];

/// Reads the disk's partition table through `read` (which fills a buffer from a disk offset;
/// it is only asked for ranges inside `size`). `sector_size` is the disk's logical sector
/// size, the unit of both tables' sector numbers.
///
/// A GPT is used when the MBR holds a protective entry (type 0xee); when both GPT headers are
/// damaged there are no partitions, and a warning.
///
/// # Errors
/// Only the errors of `read`; a malformed table is never an error.
pub fn read_table(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    sector_size: u32,
) -> io::Result<Table> {
    let mut table = Table {
        kind: TableKind::None,
        partitions: Vec::new(),
        warnings: Vec::new(),
    };
    let sector = u64::from(sector_size);
    if !(512..=65536).contains(&sector_size) || !sector_size.is_power_of_two() || size < sector {
        return Ok(table);
    }
    let mut mbr = [0u8; 512];
    read(0, &mut mbr)?;
    let Some(entries) = mbr_entries(&mbr) else {
        return Ok(table);
    };
    if entries.iter().any(|e| e.kind == MBR_PROTECTIVE) {
        table.kind = TableKind::Gpt;
        gpt(read, size, sector, &mut table)?;
    } else {
        table.kind = TableKind::Mbr;
        mbr_partitions(read, size, sector, &entries, &mut table)?;
    }
    table.partitions.sort_by_key(|p| p.number);
    Ok(table)
}

/// The four entries of a boot record, or `None` when it is not one: no 0x55 0xaa signature,
/// or a boot flag other than 0 and 0x80 (what tells a FAT boot sector from an MBR, as Linux
/// does).
fn mbr_entries(sector: &[u8; 512]) -> Option<Vec<MbrEntry>> {
    if sector.get(510..512) != Some(&[0x55, 0xaa][..]) {
        return None;
    }
    let mut entries = Vec::with_capacity(4);
    let mut rest = sector.get(MBR_ENTRIES_AT..510)?;
    for _ in 0..4 {
        let (entry, tail) = MbrEntry::read_from_prefix(rest).ok()?;
        if entry.boot != 0 && entry.boot != 0x80 {
            return None;
        }
        entries.push(entry);
        rest = tail;
    }
    Some(entries)
}

/// Adds the partition at sectors `start .. start + count` (numbers already made absolute by
/// the caller), clipped to the disk.
fn add(table: &mut Table, number: u32, start: u64, count: u64, sector: u64, size: u64) {
    let range = start
        .checked_mul(sector)
        .and_then(|offset| Some((offset, count.checked_mul(sector)?)));
    let Some((offset, length)) = range else {
        table.warnings.push(format!(
            "partition {number}: sector numbers overflow; skipped"
        ));
        return;
    };
    if length == 0 {
        return;
    }
    if offset >= size {
        table.warnings.push(format!(
            "partition {number}: starts at {offset:#x}, past the end of the disk ({size:#x}); skipped"
        ));
        return;
    }
    let room = size.saturating_sub(offset);
    let length = if length > room {
        table.warnings.push(format!(
            "partition {number}: {length:#x} bytes at {offset:#x} reach past the end of the disk \
             ({size:#x}); clipped to {room:#x}"
        ));
        room
    } else {
        length
    };
    table.partitions.push(Partition {
        number,
        offset,
        length,
    });
}

fn mbr_partitions(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    sector: u64,
    entries: &[MbrEntry],
    table: &mut Table,
) -> io::Result<()> {
    let mut extended = None;
    for (number, entry) in (1u32..).zip(entries) {
        if entry.kind == 0 || entry.sectors.get() == 0 {
            continue;
        }
        if MBR_EXTENDED.contains(&entry.kind) {
            if extended.is_none() {
                extended = Some(u64::from(entry.start_lba.get()));
            } else {
                table.warnings.push(format!(
                    "partition {number}: a second extended partition; its logical partitions are not read"
                ));
            }
            continue;
        }
        add(
            table,
            number,
            entry.start_lba.get().into(),
            entry.sectors.get().into(),
            sector,
            size,
        );
    }
    if let Some(start) = extended {
        logical_partitions(read, size, sector, start, table)?;
    }
    Ok(())
}

/// Follows the chain of extended boot records from `ext_start` (in sectors): each holds a
/// logical partition (relative to itself) and a link to the next record (relative to the
/// extended partition). Stops at a loop, at a record outside the disk or without a signature,
/// or after [`MAX_LOGICAL_PARTITIONS`].
fn logical_partitions(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    sector: u64,
    ext_start: u64,
    table: &mut Table,
) -> io::Result<()> {
    let mut seen = BTreeSet::new();
    let mut ebr_lba = ext_start;
    let mut number = 5u32;
    loop {
        if !seen.insert(ebr_lba) {
            table.warnings.push(format!(
                "extended boot record at sector {ebr_lba} loops back; chain ends"
            ));
            return Ok(());
        }
        if seen.len() > MAX_LOGICAL_PARTITIONS {
            table.warnings.push(format!(
                "more than {MAX_LOGICAL_PARTITIONS} extended boot records; the rest are not read"
            ));
            return Ok(());
        }
        let at = ebr_lba
            .checked_mul(sector)
            .filter(|at| at.checked_add(512).is_some_and(|end| end <= size));
        let Some(at) = at else {
            table.warnings.push(format!(
                "extended boot record at sector {ebr_lba} lies past the end of the disk; chain ends"
            ));
            return Ok(());
        };
        let mut record = [0u8; 512];
        read(at, &mut record)?;
        let Some(entries) = mbr_entries(&record) else {
            // An empty extended partition need not hold a record; a later one must.
            if ebr_lba != ext_start {
                table.warnings.push(format!(
                    "no extended boot record at sector {ebr_lba}; chain ends"
                ));
            }
            return Ok(());
        };
        let (Some(logical), Some(link)) = (entries.first(), entries.get(1)) else {
            return Ok(());
        };
        if logical.kind != 0 && logical.sectors.get() != 0 {
            match ebr_lba.checked_add(logical.start_lba.get().into()) {
                Some(start) => add(
                    table,
                    number,
                    start,
                    logical.sectors.get().into(),
                    sector,
                    size,
                ),
                None => table.warnings.push(format!(
                    "partition {number}: sector numbers overflow; skipped"
                )),
            }
            number = number.saturating_add(1);
        }
        if link.kind == 0 || link.start_lba.get() == 0 {
            return Ok(());
        }
        match ext_start.checked_add(link.start_lba.get().into()) {
            Some(next) => ebr_lba = next,
            None => return Ok(()),
        }
    }
}

fn gpt(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    sector: u64,
    table: &mut Table,
) -> io::Result<()> {
    // A disk smaller than one sector has no GPT.
    let Some(last_lba) = size.checked_div(sector).and_then(|n| n.checked_sub(1)) else {
        return Ok(());
    };
    let header = match gpt_header(read, size, sector, 1)? {
        Ok(header) => header,
        Err(primary) => match gpt_header(read, size, sector, last_lba)? {
            Ok(header) => {
                table.warnings.push(format!(
                    "primary GPT header: {primary}; using the backup at sector {last_lba}"
                ));
                header
            }
            Err(backup) => {
                table.warnings.push(format!(
                    "primary GPT header: {primary}; backup GPT header: {backup}; no partitions"
                ));
                return Ok(());
            }
        },
    };
    let entry_size = u64::from(header.entry_size);
    for (index, entry) in (0u32..).zip(header.entries.chunks_exact(usize_of(entry_size))) {
        let Ok((entry, _)) = GptEntry::read_from_prefix(entry) else {
            continue;
        };
        if entry.type_guid == [0; 16] {
            continue;
        }
        let number = index.saturating_add(1);
        let (first, last) = (entry.first_lba.get(), entry.last_lba.get());
        if first > last {
            table.warnings.push(format!(
                "partition {number}: first sector {first} after last sector {last}; skipped"
            ));
            continue;
        }
        // A count of 2^64 (first = 0, last = u64::MAX) does not fit: checked_add catches it.
        match last.checked_sub(first).and_then(|n| n.checked_add(1)) {
            Some(count) => add(table, number, first, count, sector, size),
            None => table.warnings.push(format!(
                "partition {number}: sector numbers overflow; skipped"
            )),
        }
    }
    Ok(())
}

/// A GPT header that passed its checks, with its entry array (also checked).
struct CheckedGpt {
    entry_size: u32,
    entries: Vec<u8>,
}

/// `usize` from a value already bounded by [`MAX_GPT_ARRAY_BYTES`].
fn usize_of(value: u64) -> usize {
    // Bounded by MAX_GPT_ARRAY_BYTES, which fits in usize; were it not, no chunk would fit.
    usize::try_from(value).unwrap_or(usize::MAX)
}

/// Reads and checks the GPT header at `lba` and its entry array: the outer error is the
/// disk's, the inner one says what is wrong with the table.
fn gpt_header(
    read: &mut dyn FnMut(u64, &mut [u8]) -> io::Result<()>,
    size: u64,
    sector: u64,
    lba: u64,
) -> io::Result<Result<CheckedGpt, String>> {
    let at = match lba.checked_mul(sector) {
        Some(at) if at.checked_add(sector).is_some_and(|end| end <= size) => at,
        _ => return Ok(Err(format!("sector {lba} lies past the end of the disk"))),
    };
    let mut bytes = vec![0u8; usize_of(sector)];
    read(at, &mut bytes)?;
    let Ok((header, _)) = GptHeader::read_from_prefix(&bytes) else {
        return Ok(Err("sector shorter than a header".into()));
    };
    if &header.signature != GPT_SIGNATURE {
        return Ok(Err("no \"EFI PART\" signature".into()));
    }
    let header_size = u64::from(header.header_size.get());
    if !(92..=sector).contains(&header_size) {
        return Ok(Err(format!(
            "header size {header_size} outside 92..={sector}"
        )));
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(bytes.get(..16).unwrap_or_default());
    crc.update(&[0; 4]);
    crc.update(bytes.get(20..usize_of(header_size)).unwrap_or_default());
    if crc.finalize() != header.header_crc32.get() {
        return Ok(Err("header checksum mismatch".into()));
    }
    if header.my_lba.get() != lba {
        return Ok(Err(format!(
            "header says it is at sector {}, read at {lba}",
            header.my_lba.get()
        )));
    }
    let entry_size = header.entry_size.get();
    if !(128..=MAX_GPT_ENTRY_SIZE).contains(&entry_size) || !entry_size.is_power_of_two() {
        return Ok(Err(format!(
            "entry size {entry_size} is not a power of two in 128..={MAX_GPT_ENTRY_SIZE}"
        )));
    }
    // Two u32 values: the product fits in u64.
    let array_bytes = u64::from(header.entry_count.get()).saturating_mul(u64::from(entry_size));
    if array_bytes > MAX_GPT_ARRAY_BYTES {
        return Ok(Err(format!(
            "entry array of {array_bytes} bytes exceeds the limit of {MAX_GPT_ARRAY_BYTES}"
        )));
    }
    let array_at = header.entries_lba.get().checked_mul(sector);
    let Some(array_at) =
        array_at.filter(|at| at.checked_add(array_bytes).is_some_and(|end| end <= size))
    else {
        return Ok(Err(format!(
            "entry array at sector {} lies past the end of the disk",
            header.entries_lba.get()
        )));
    };
    let mut entries = vec![0u8; usize_of(array_bytes)];
    read(array_at, &mut entries)?;
    if crc32fast::hash(&entries) != header.entries_crc32.get() {
        return Ok(Err("entry array checksum mismatch".into()));
    }
    Ok(Ok(CheckedGpt {
        entry_size,
        entries,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn reader(disk: &[u8]) -> impl FnMut(u64, &mut [u8]) -> io::Result<()> + '_ {
        |offset, buf| {
            let start = usize::try_from(offset).unwrap();
            buf.copy_from_slice(&disk[start..start + buf.len()]);
            Ok(())
        }
    }

    fn table_of(disk: &[u8], sector: u32) -> Table {
        read_table(&mut reader(disk), disk.len() as u64, sector).unwrap()
    }

    #[test]
    fn a_disk_smaller_than_a_sector_has_no_partitions() {
        for len in [0, 1, 511] {
            let t = table_of(&vec![0u8; len], 512);
            assert!(t.partitions.is_empty(), "{len}: {:?}", t.partitions);
        }
        // A protective MBR on a disk too small for a GPT header behind it.
        let mut disk = vec![0u8; 512];
        mbr_entry(&mut disk, 0, 0, 0xee, 1, 100);
        let t = table_of(&disk, 512);
        assert!(t.partitions.is_empty(), "{:?}", t.partitions);
    }

    fn mbr_entry(disk: &mut [u8], at: usize, slot: usize, kind: u8, start: u32, sectors: u32) {
        let e = at + MBR_ENTRIES_AT + 16 * slot;
        disk[e + 4] = kind;
        disk[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        disk[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
        disk[at + 510] = 0x55;
        disk[at + 511] = 0xaa;
    }

    /// A GPT disk of `size` bytes with 128 entries at LBA 2 and `parts` as (index, first,
    /// last).
    fn gpt_disk(size: usize, sector: usize, parts: &[(usize, u64, u64)]) -> Vec<u8> {
        let mut disk = vec![0u8; size];
        mbr_entry(&mut disk, 0, 0, MBR_PROTECTIVE, 1, u32::MAX);
        let mut array = vec![0u8; 128 * 128];
        for &(index, first, last) in parts {
            let e = &mut array[index * 128..];
            e[..16].copy_from_slice(&[0xaf; 16]);
            e[32..40].copy_from_slice(&first.to_le_bytes());
            e[40..48].copy_from_slice(&last.to_le_bytes());
        }
        disk[2 * sector..2 * sector + array.len()].copy_from_slice(&array);
        let header = GptHeader {
            signature: *GPT_SIGNATURE,
            revision: 0x10000.into(),
            header_size: 92.into(),
            header_crc32: 0.into(),
            reserved: 0.into(),
            my_lba: 1.into(),
            alternate_lba: ((size / sector) as u64 - 1).into(),
            first_usable_lba: 34.into(),
            last_usable_lba: ((size / sector) as u64 - 34).into(),
            disk_guid: [1; 16],
            entries_lba: 2.into(),
            entry_count: 128.into(),
            entry_size: 128.into(),
            entries_crc32: crc32fast::hash(&array).into(),
        };
        let crc = crc32fast::hash(header.as_bytes());
        disk[sector..sector + 92].copy_from_slice(header.as_bytes());
        disk[sector + 16..sector + 20].copy_from_slice(&crc.to_le_bytes());
        disk
    }

    #[test]
    fn no_signature_no_table() {
        let t = table_of(&vec![0u8; MIB as usize], 512);
        assert_eq!((t.kind, t.partitions.len()), (TableKind::None, 0));
    }

    #[test]
    fn a_fat_boot_sector_is_not_an_mbr() {
        let mut disk = vec![0u8; MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x83, 2048, 100);
        disk[MBR_ENTRIES_AT] = 0x12; // not a boot flag
        assert_eq!(table_of(&disk, 512).kind, TableKind::None);
    }

    #[test]
    fn mbr_primaries_by_slot_clipped_and_skipped() {
        let mut disk = vec![0u8; MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x83, 1, 100);
        mbr_entry(&mut disk, 0, 2, 0x83, 1000, 2000); // reaches past 2048 sectors: clipped
        mbr_entry(&mut disk, 0, 3, 0x83, 4000, 10); // starts past the end: skipped
        let t = table_of(&disk, 512);
        assert_eq!(t.kind, TableKind::Mbr);
        assert_eq!(
            t.partitions,
            [
                Partition {
                    number: 1,
                    offset: 512,
                    length: 100 * 512
                },
                Partition {
                    number: 3,
                    offset: 1000 * 512,
                    length: MIB - 1000 * 512
                },
            ]
        );
        assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
    }

    #[test]
    fn mbr_sectors_are_the_disks_logical_sectors() {
        let mut disk = vec![0u8; 4 * MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x83, 256, 256);
        let t = table_of(&disk, 4096);
        assert_eq!(
            t.partitions,
            [Partition {
                number: 1,
                offset: MIB,
                length: MIB
            }]
        );
    }

    #[test]
    fn logical_partitions_follow_the_chain_and_stop_at_the_end_or_a_loop() {
        let mut disk = vec![0u8; MIB as usize];
        mbr_entry(&mut disk, 0, 0, 0x05, 100, 1000);
        // EBR at 100: logical at 100 + 10, link to the extended start + 50 = 150.
        mbr_entry(&mut disk, 100 * 512, 0, 0x83, 10, 20);
        mbr_entry(&mut disk, 100 * 512, 1, 0x05, 50, 100);
        // EBR at 150: logical at 150 + 10; its link points far past the end of the disk.
        mbr_entry(&mut disk, 150 * 512, 0, 0x83, 10, 10);
        mbr_entry(&mut disk, 150 * 512, 1, 0x05, u32::MAX, 100);
        let expected = [
            Partition {
                number: 5,
                offset: 110 * 512,
                length: 20 * 512,
            },
            Partition {
                number: 6,
                offset: 160 * 512,
                length: 10 * 512,
            },
        ];
        let t = table_of(&disk, 512);
        assert_eq!(t.partitions, expected);
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("past the end"), "{:?}", t.warnings);

        // Now the EBR at 150 links to itself.
        mbr_entry(&mut disk, 150 * 512, 1, 0x05, 50, 100);
        let t = table_of(&disk, 512);
        assert_eq!(t.partitions, expected);
        assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
        assert!(t.warnings[0].contains("loops back"), "{:?}", t.warnings);
    }

    #[test]
    fn gpt_numbers_by_entry_and_clips() {
        let disk = gpt_disk(
            MIB as usize,
            512,
            &[(0, 34, 99), (2, 100, 1_000_000), (3, 50, 40)],
        );
        let t = table_of(&disk, 512);
        assert_eq!(t.kind, TableKind::Gpt);
        assert_eq!(
            t.partitions,
            [
                Partition {
                    number: 1,
                    offset: 34 * 512,
                    length: 66 * 512
                },
                Partition {
                    number: 3,
                    offset: 100 * 512,
                    length: MIB - 100 * 512
                }
            ]
        );
        assert_eq!(t.warnings.len(), 2, "{:?}", t.warnings);
    }

    #[test]
    fn gpt_on_4k_sectors() {
        let disk = gpt_disk(4 * MIB as usize, 4096, &[(0, 256, 511)]);
        let t = table_of(&disk, 4096);
        assert_eq!(
            t.partitions,
            [Partition {
                number: 1,
                offset: MIB,
                length: MIB
            }]
        );
    }

    #[test]
    fn damaged_gpt_gives_a_warning_not_partitions() {
        let good = gpt_disk(MIB as usize, 512, &[(0, 34, 99)]);
        for (at, what) in [
            (512 + 30, "header checksum"),
            (1024 + 40, "entry array checksum"),
        ] {
            let mut disk = good.clone();
            disk[at] ^= 1;
            let t = table_of(&disk, 512);
            assert_eq!(
                (t.kind, t.partitions.len()),
                (TableKind::Gpt, 0),
                "byte {at}"
            );
            assert_eq!(t.warnings.len(), 1, "{:?}", t.warnings);
            assert!(t.warnings[0].contains(what), "{:?}", t.warnings);
        }
    }

    /// Resealed headers with hostile sizes: refused by their checks, never a panic or a large
    /// allocation.
    #[test]
    fn hostile_gpt_header_fields_are_refused() {
        let good = gpt_disk(MIB as usize, 512, &[(0, 34, 99)]);
        let reseal = |disk: &mut Vec<u8>| {
            disk[512 + 16..512 + 20].fill(0);
            let crc = crc32fast::hash(&disk[512..512 + 92]);
            disk[512 + 16..512 + 20].copy_from_slice(&crc.to_le_bytes());
        };
        for (field, value) in [
            (12usize, 5000u64),        // header size past the sector
            (84, 100),                 // entry size below 128
            (84, 8192),                // entry size above the limit
            (80, u64::from(u32::MAX)), // entry count: 512 GiB of entries
            (72, u64::MAX / 2),        // entry array past the end
            (24, 7),                   // header not where it says
        ] {
            let mut disk = good.clone();
            let width = if field == 72 || field == 24 { 8 } else { 4 };
            disk[512 + field..512 + field + width].copy_from_slice(&value.to_le_bytes()[..width]);
            reseal(&mut disk);
            let t = table_of(&disk, 512);
            assert_eq!(t.partitions.len(), 0, "field {field}");
            assert!(
                t.warnings[0].contains("primary GPT header"),
                "{:?}",
                t.warnings
            );
        }
    }
}
