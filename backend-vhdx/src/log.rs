//! The log ([MS-VHDX] 2.3): finding the active sequence, validating every entry, and replaying
//! it, either into the file (read-write opens) or into an in-memory overlay that read-only opens
//! read through, so metadata and data read as after replay while the file stays untouched.

use std::collections::BTreeMap;
use std::io;
use std::sync::Arc;

use vd_core::{Result, Storage};
use zerocopy::FromBytes;

use crate::checksum::crc32c_with_zero_field;
use crate::error::{Corruption, fit, io_at, overflow};
use crate::format::{
    DATA_DESC_SIGNATURE, DATA_SECTOR_SIGNATURE, DataSector, Descriptor, LOG_ENTRY_SIGNATURE,
    LOG_SECTOR_SIZE, LogEntryHeader, REGION_TABLE_OFFSETS, ZERO_DESC_SIGNATURE,
};
use crate::guid::Guid;

/// Largest file a log may ask for or write into (its LastFileOffset, a descriptor's end): the
/// largest valid image (64 TiB of payload) plus 1 TiB for its structures. Further is `Corrupt`.
/// Up to it, a read-write replay extends the file as MS-VHDX 2.3.3 asks (a sparse file on a real
/// file system; QEMU does the same), a read-only replay only in memory.
pub const MAX_LAST_FILE_OFFSET: u64 = 65 << 40;
/// Most 4 KiB sectors one replay may write (4 GiB), zero descriptors included: it bounds the
/// work of a replay and the memory of an in-memory one, whatever lengths the descriptors claim
/// (no writer logs more than a few MiB between flushes). More is `Corrupt`.
pub const MAX_REPLAY_SECTORS: u64 = 1 << 20;

/// One write the log asks for.
#[derive(Debug, Clone)]
pub enum LogWrite {
    /// A whole 4 KiB sector.
    Data {
        /// Target file offset.
        offset: u64,
        /// The rebuilt sector.
        data: Arc<[u8]>,
    },
    /// Zeros.
    Zero {
        /// Target file offset.
        offset: u64,
        /// Length.
        length: u64,
    },
}

/// A validated entry.
#[derive(Debug, Clone)]
struct Entry {
    position: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    writes: Vec<LogWrite>,
}

/// One entry of the active sequence, for `dump`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct EntrySummary {
    /// Offset inside the log.
    pub log_offset: u64,
    /// Entry length.
    pub length: u64,
    /// Sequence number.
    pub sequence: u64,
    /// Tail: log offset of the oldest entry of its sequence.
    pub tail: u64,
    /// Number of descriptors (data and zero).
    pub descriptors: usize,
    /// FlushedFileOffset.
    pub flushed_file_offset: u64,
    /// LastFileOffset.
    pub last_file_offset: u64,
}

/// What replaying the active sequence does.
#[derive(Debug, Clone, Default)]
pub struct ReplayPlan {
    /// The entries of the active sequence, oldest first.
    pub summary: Vec<EntrySummary>,
    /// The writes, in order.
    pub writes: Vec<LogWrite>,
    /// Entries in the active sequence.
    pub entries: usize,
    /// Sequence number of the head entry.
    pub head_sequence: u64,
    /// The head's LastFileOffset: the file must be at least this long afterwards.
    pub last_file_offset: u64,
    /// What the log asks for beyond the end of the file (the head's LastFileOffset, writes past
    /// the end), each with the file offset of the log entry that asks for it. [MS-VHDX] 2.3.3
    /// allows it (replay extends the file) as long as the file is at least FlushedFileOffset
    /// long; strict opens refuse it.
    pub beyond_file: Vec<(Corruption, u64)>,
}

impl ReplayPlan {
    /// Whether there is nothing to replay: no intact entry carries the LogGuid.
    pub fn is_empty(&self) -> bool {
        self.entries == 0
    }
}

struct Log<'a> {
    bytes: &'a [u8],
    offset: u64,
    guid: Guid,
}

impl Log<'_> {
    fn len(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// `len` bytes at `pos`, wrapping around the end of the log.
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "checked at the top: pos < n and len <= n, so first <= n - pos, \
                  pos + first <= n and len - first >= 0"
    )]
    fn wrapped(&self, pos: u64, len: u64) -> Option<Vec<u8>> {
        let n = self.len();
        if len > n || pos >= n {
            return None;
        }
        let first = (n - pos).min(len);
        let mut out = self
            .bytes
            .get(usize::try_from(pos).ok()?..usize::try_from(pos + first).ok()?)?
            .to_vec();
        if first < len {
            out.extend_from_slice(self.bytes.get(..usize::try_from(len - first).ok()?)?);
        }
        Some(out)
    }

    /// Parses and validates the entry at `pos` (steps 1-5 of the validity rules).
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "count is a u32 field, so count + 2 < 2^33 and desc_sectors * 4096 < 2^38; \
                  the desc_sectors check bounds count by 32 * length / 4096 and length by the \
                  log's length (a slice in memory), so 64 + 32 * i < length; data_index is at \
                  most desc_sectors + count < 2^34, so data_index * 4096 < 2^46"
    )]
    fn entry(&self, pos: u64) -> std::result::Result<Option<Entry>, Corruption> {
        let Some(first) = self.wrapped(pos, LOG_SECTOR_SIZE) else {
            return Ok(None);
        };
        let Ok((h, _)) = LogEntryHeader::read_from_prefix(&first) else {
            return Ok(None);
        };
        if h.signature.get() != LOG_ENTRY_SIGNATURE || h.log_guid != self.guid {
            return Ok(None);
        }
        let length = u64::from(h.entry_length.get());
        let tail = u64::from(h.tail.get());
        let sequence = h.sequence_number.get();
        let count = u64::from(h.descriptor_count.get());
        if length == 0
            || length % LOG_SECTOR_SIZE != 0
            || length > self.len()
            || tail >= self.len()
            || tail % LOG_SECTOR_SIZE != 0
            || sequence == 0
        {
            return Ok(None);
        }
        let desc_sectors = (count + 2).div_ceil(128);
        if desc_sectors * LOG_SECTOR_SIZE > length {
            return Ok(None);
        }
        let Some(bytes) = self.wrapped(pos, length) else {
            return Ok(None);
        };
        if crc32c_with_zero_field(&bytes, 4) != h.checksum.get() {
            return Ok(None);
        }
        // From here the entry is intact (its checksum matches); a rule it breaks is corruption,
        // not a stale leftover.
        let bad = |reason: String| Corruption::LogEntry {
            log_offset: pos,
            reason,
        };
        let mut writes = Vec::new();
        let mut data_index = desc_sectors;
        let n_desc = usize::try_from(count).map_err(|_| bad("too many descriptors".into()))?;
        for i in 0..n_desc {
            let at = 64 + 32 * i;
            let d = bytes
                .get(at..)
                .and_then(|b| b.get(..32))
                .and_then(|b| Descriptor::read_from_bytes(b).ok())
                .ok_or_else(|| bad(format!("descriptor {i} is outside the entry")))?;
            if d.sequence_number.get() != sequence {
                return Err(bad(format!("descriptor {i} has another sequence number")));
            }
            let target = d.file_offset.get();
            if target % LOG_SECTOR_SIZE != 0 {
                return Err(bad(format!(
                    "descriptor {i} target {target:#x} is not 4 KiB aligned"
                )));
            }
            match d.signature.get() {
                ZERO_DESC_SIGNATURE => {
                    let length = u64::from_le_bytes(d.leading_bytes);
                    if length % LOG_SECTOR_SIZE != 0 {
                        return Err(bad(format!(
                            "zero descriptor {i} length {length:#x} is not a 4 KiB multiple"
                        )));
                    }
                    writes.push(LogWrite::Zero {
                        offset: target,
                        length,
                    });
                }
                DATA_DESC_SIGNATURE => {
                    let at = usize::try_from(data_index * LOG_SECTOR_SIZE)
                        .map_err(|_| bad("entry too large".into()))?;
                    let s = bytes
                        .get(at..)
                        .and_then(|b| b.get(..4096))
                        .and_then(|b| DataSector::read_from_bytes(b).ok())
                        .ok_or_else(|| {
                            bad(format!(
                                "data sector for descriptor {i} is outside the entry"
                            ))
                        })?;
                    if s.signature.get() != DATA_SECTOR_SIGNATURE
                        || u64::from(s.sequence_high.get()) != sequence >> 32
                        || u64::from(s.sequence_low.get()) != sequence & 0xffff_ffff
                    {
                        return Err(bad(format!(
                            "data sector for descriptor {i} is torn or misplaced"
                        )));
                    }
                    let mut sector = Vec::with_capacity(4096);
                    sector.extend_from_slice(&d.leading_bytes);
                    sector.extend_from_slice(&s.data);
                    sector.extend_from_slice(&d.trailing_bytes);
                    writes.push(LogWrite::Data {
                        offset: target,
                        data: sector.into(),
                    });
                    data_index += 1;
                }
                other => return Err(bad(format!("descriptor {i} has signature {other:#010x}"))),
            }
        }
        if data_index * LOG_SECTOR_SIZE != length {
            return Err(bad(format!(
                "entry length {length:#x} does not match {data_index} sectors"
            )));
        }
        let last_file_offset = h.last_file_offset.get();
        if last_file_offset > MAX_LAST_FILE_OFFSET {
            return Err(bad(format!(
                "LastFileOffset {last_file_offset:#x} is absurd"
            )));
        }
        Ok(Some(Entry {
            position: pos,
            length,
            tail,
            sequence,
            flushed_file_offset: h.flushed_file_offset.get(),
            last_file_offset,
            writes,
        }))
    }
}

/// Finds the active sequence of the log at `log_offset` (`log_bytes` is the whole log) and
/// returns what replaying it writes. Every target is checked against the header section and
/// the log itself.
///
/// A log in which no intact entry carries `log_guid` is empty: the plan has no entries (see
/// [`ReplayPlan::is_empty`]). QEMU sets the LogGuid before it writes the first entry, so a
/// crash in between leaves exactly that, and QEMU reads it as an empty log.
///
/// # Errors
/// `Corrupt`: intact entries of `log_guid` that form no complete sequence, a malformed entry,
/// a protected target, a truncated file; `OutOfRange` when the log's end overflows.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "log positions: start < sectors = log length / 4096, an entry's position is below \
              the log length and its length at most the log length (Log::entry), so positions \
              and sector numbers stay below twice the log length (a slice in memory); the \
              modulo divisors are the log's length and sector count, non-zero inside the loop \
              over its sectors; at(pos) adds a position inside the log to its offset, and the \
              log's end is checked not to overflow at the top"
)]
pub fn plan_replay(
    log_bytes: &[u8],
    log_offset: u64,
    log_guid: Guid,
    file_len: u64,
) -> Result<ReplayPlan> {
    let log = Log {
        bytes: log_bytes,
        offset: log_offset,
        guid: log_guid,
    };
    let log_end = log_offset
        .checked_add(log.len())
        .ok_or_else(|| overflow("log end"))?;
    let at = |pos: u64| log.offset + pos;
    let sectors = log.len() / LOG_SECTOR_SIZE;
    let mut cache: BTreeMap<u64, Option<Entry>> = BTreeMap::new();
    let mut get = |pos: u64| -> Result<Option<Entry>> {
        if let Some(e) = cache.get(&pos) {
            return Ok(e.clone());
        }
        let e = log.entry(pos).map_err(|c| c.at("log entry", at(pos)))?;
        cache.insert(pos, e.clone());
        Ok(e)
    };
    let mut covered = vec![false; fit::<usize, _>(sectors, "log sectors")?];
    let mut best: Option<Vec<Entry>> = None;
    for start in 0..sectors {
        let pos = start * LOG_SECTOR_SIZE;
        if covered
            .get(fit::<usize, _>(start, "log sector")?)
            .copied()
            .unwrap_or(true)
        {
            continue;
        }
        let Some(first) = get(pos)? else { continue };
        // Follow the chain of consecutive entries.
        let mut seen = std::collections::HashSet::from([first.position]);
        let mut chain = vec![first];
        while let Some(last) = chain.last() {
            if chain.len() as u64 > sectors {
                break;
            }
            let next_pos = (last.position + last.length) % log.len();
            let want = last.sequence.wrapping_add(1);
            match get(next_pos)? {
                Some(e) if e.sequence == want && seen.insert(e.position) => chain.push(e),
                _ => break,
            }
        }
        for e in &chain {
            for s in 0..e.length / LOG_SECTOR_SIZE {
                let idx = (e.position / LOG_SECTOR_SIZE + s) % sectors;
                if let Some(c) = covered.get_mut(fit::<usize, _>(idx, "log sector")?) {
                    *c = true;
                }
            }
        }
        // Complete: the head's tail is an entry of the chain; keep the part from it on.
        let Some(head) = chain.last() else { continue };
        let Some(tail_index) = chain.iter().position(|e| e.position == head.tail) else {
            continue;
        };
        let active: Vec<Entry> = chain.split_off(tail_index);
        let better = match (&best, active.last()) {
            (Some(b), Some(h)) => b.last().is_none_or(|bh| h.sequence > bh.sequence),
            (None, Some(_)) => true,
            _ => false,
        };
        if better {
            best = Some(active);
        }
    }
    let Some(active) = best else {
        // No entry carries the LogGuid at all (none intact: torn, stale, another log's): the
        // header was set before the first entry landed, as QEMU does, and a crash came between.
        // Like QEMU, that is an empty log. Intact entries that form no complete sequence are
        // another matter: something asked for a replay that cannot be done.
        if cache.values().any(Option::is_some) {
            return Err(Corruption::NoActiveLogSequence.at("log", log.offset));
        }
        return Ok(ReplayPlan::default());
    };
    let Some(head) = active.last() else {
        return Err(Corruption::NoActiveLogSequence.at("log", log.offset));
    };
    if file_len < head.flushed_file_offset {
        return Err(Corruption::LogTruncatedFile {
            file_len,
            flushed: head.flushed_file_offset,
        }
        .at("log head entry", at(head.position)));
    }
    let mut plan = ReplayPlan {
        summary: active
            .iter()
            .map(|e| EntrySummary {
                log_offset: e.position,
                length: e.length,
                sequence: e.sequence,
                tail: e.tail,
                descriptors: e.writes.len(),
                flushed_file_offset: e.flushed_file_offset,
                last_file_offset: e.last_file_offset,
            })
            .collect(),
        entries: active.len(),
        head_sequence: head.sequence,
        last_file_offset: head.last_file_offset,
        writes: Vec::new(),
        beyond_file: Vec::new(),
    };
    if head.last_file_offset > file_len {
        plan.beyond_file.push((
            Corruption::LogBeyondFile {
                what: format!(
                    "head entry's LastFileOffset asks for a file of {:#x} bytes",
                    head.last_file_offset
                ),
                end: head.last_file_offset,
                file_len,
            },
            at(head.position),
        ));
    }
    let log_range = (log.offset, log_end);
    let mut total_sectors = 0u64;
    for e in &active {
        for w in &e.writes {
            let (target, length) = match w {
                LogWrite::Data { offset, .. } => (*offset, LOG_SECTOR_SIZE),
                LogWrite::Zero { offset, length } => (*offset, *length),
            };
            let end = target.saturating_add(length);
            let protected = if target < REGION_TABLE_OFFSETS[0] {
                Some("header area")
            } else if target < log_range.1 && end > log_range.0 {
                Some("log")
            } else if end > MAX_LAST_FILE_OFFSET {
                Some("space beyond any valid file")
            } else {
                None
            };
            if let Some(what) = protected {
                return Err(Corruption::LogTarget {
                    target,
                    length,
                    what,
                }
                .at("log entry", at(e.position)));
            }
            if end > file_len {
                plan.beyond_file.push((
                    Corruption::LogBeyondFile {
                        what: format!("entry writes {target:#x}..{end:#x}"),
                        end,
                        file_len,
                    },
                    at(e.position),
                ));
            }
            // At most MAX_REPLAY_SECTORS before, so a saturated sum is past the cap too.
            total_sectors = total_sectors.saturating_add(length / LOG_SECTOR_SIZE);
            if total_sectors > MAX_REPLAY_SECTORS {
                return Err(Corruption::LogEntry {
                    log_offset: e.position,
                    reason: "the log writes more than 4 GiB".into(),
                }
                .at("log entry", at(e.position)));
            }
            plan.writes.push(w.clone());
        }
    }
    Ok(plan)
}

/// Reads the whole log region.
///
/// # Errors
/// I/O errors.
pub fn read_log(storage: &dyn Storage, offset: u64, length: u64) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; fit::<usize, _>(length, "log length")?];
    storage
        .read_exact_at(offset, &mut buf)
        .map_err(|e| io_at("log", offset, e))?;
    Ok(buf)
}

/// Applies a plan to writable storage, extends the file to LastFileOffset, and flushes.
///
/// # Errors
/// I/O errors.
pub fn apply(storage: &dyn Storage, plan: &ReplayPlan) -> io::Result<()> {
    for w in &plan.writes {
        match w {
            LogWrite::Data { offset, data } => storage.write_all_at(*offset, data)?,
            LogWrite::Zero { offset, length } => storage.zero_range(*offset, *length)?,
        }
    }
    if storage.len()? < plan.last_file_offset {
        storage.set_len(plan.last_file_offset)?;
    }
    storage.flush()
}

#[derive(Debug, Clone)]
enum Sector {
    Zero,
    Data(Arc<[u8]>),
}

/// A read-only view of a file with a replayed log laid over it in memory.
#[derive(Debug)]
pub struct OverlayStorage {
    base: Arc<dyn Storage>,
    sectors: BTreeMap<u64, Sector>,
    len: u64,
}

impl OverlayStorage {
    /// `base` as it reads after `plan` is applied.
    ///
    /// # Errors
    /// I/O errors reading the base length; `InvalidData` for a write whose end overflows
    /// (`plan_replay` refuses those, as writes past any valid file).
    pub fn new(base: Arc<dyn Storage>, plan: &ReplayPlan) -> io::Result<Self> {
        let mut sectors = BTreeMap::new();
        let mut len = base.len()?;
        for w in &plan.writes {
            let (offset, length) = match w {
                LogWrite::Data { offset, .. } => (*offset, LOG_SECTOR_SIZE),
                LogWrite::Zero { offset, length } => (*offset, *length),
            };
            let end = offset.checked_add(length).ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("log write of {length:#x} bytes at {offset:#x} overflows"),
                )
            })?;
            // Sectors `offset / 4096 ..= (end - 1) / 4096`; `end` did not overflow.
            let (first, stop) = (offset / LOG_SECTOR_SIZE, end / LOG_SECTOR_SIZE);
            match w {
                LogWrite::Data { data, .. } => {
                    sectors.insert(first, Sector::Data(data.clone()));
                }
                LogWrite::Zero { .. } => {
                    for s in first..stop {
                        sectors.insert(s, Sector::Zero);
                    }
                }
            }
            len = len.max(end);
        }
        Ok(Self {
            base,
            sectors,
            len: len.max(plan.last_file_offset),
        })
    }

    fn read_base(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let base_len = self.base.len()?;
        // More than `buf` past `offset` (or more than `usize` holds) is all of `buf`.
        let inside = usize::try_from(base_len.saturating_sub(offset))
            .map_or(buf.len(), |n| n.min(buf.len()));
        let (a, b) = buf.split_at_mut(inside);
        if !a.is_empty() {
            self.base.read_exact_at(offset, a)?;
        }
        b.fill(0);
        Ok(())
    }
}

impl Storage for OverlayStorage {
    #[allow(
        clippy::arithmetic_side_effects,
        reason = "end = offset + buf.len() is checked; every position used lies in \
                  offset..=end, so at - offset fits the buffer; a sector key s comes from a \
                  write whose end new() checked, so (s + 1) * 4096 does not overflow; \
                  s_start >= s * 4096 and from + dst.len() <= 4096"
    )]
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let end = offset
            .checked_add(buf.len() as u64)
            .ok_or_else(|| io::Error::other("range overflows"))?;
        if end > self.len {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        // Buffer index of a file offset inside the request.
        let idx = |at: u64| usize::try_from(at - offset).map_err(io::Error::other);
        let internal = || io::Error::other("overlay range error");
        let mut pos = offset;
        let first = offset / LOG_SECTOR_SIZE;
        let last = end.div_ceil(LOG_SECTOR_SIZE);
        for (&s, sector) in self.sectors.range(first..last) {
            let s_start = (s * LOG_SECTOR_SIZE).max(offset);
            if s_start > pos {
                let gap = buf.get_mut(idx(pos)?..idx(s_start)?).ok_or_else(internal)?;
                self.read_base(pos, gap)?;
            }
            let s_end = ((s + 1) * LOG_SECTOR_SIZE).min(end);
            let dst = buf
                .get_mut(idx(s_start)?..idx(s_end)?)
                .ok_or_else(internal)?;
            match sector {
                Sector::Zero => dst.fill(0),
                Sector::Data(d) => {
                    let from =
                        usize::try_from(s_start - s * LOG_SECTOR_SIZE).map_err(io::Error::other)?;
                    let src = d.get(from..from + dst.len()).ok_or_else(internal)?;
                    dst.copy_from_slice(src);
                }
            }
            pos = s_end;
        }
        if pos < end {
            let rest = buf.get_mut(idx(pos)?..).ok_or_else(internal)?;
            self.read_base(pos, rest)?;
        }
        Ok(())
    }

    fn write_all_at(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "a read-only image with a replayed log cannot be written",
        ))
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.len)
    }

    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.write_all_at(0, &[])
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }

    fn is_read_only(&self) -> bool {
        true
    }
}

/// Data sectors one entry can carry in a log of `log_len` bytes, keeping one sector free.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "n <= sectors - 2 = log_len / 4096 - 2 < 2^52, so n + 2 and the sum cannot \
              overflow; n > 0 before n -= 1"
)]
pub fn max_pages_per_entry(log_len: u64) -> u64 {
    let sectors = log_len / LOG_SECTOR_SIZE;
    let mut n = sectors.saturating_sub(2);
    while n > 0 && (n + 2).div_ceil(128) + n > sectors.saturating_sub(1) {
        n -= 1;
    }
    n
}

/// The length of a log entry carrying `pages` data sectors: its descriptor sectors (the
/// 64-byte header and 32 bytes per descriptor) and one sector per page.
///
/// # Errors
/// `OutOfRange` when it overflows.
pub fn entry_length(pages: u64) -> Result<u64> {
    pages
        .checked_add(2)
        .map(|d| d.div_ceil(128))
        .and_then(|desc| desc.checked_add(pages))
        .and_then(|sectors| sectors.checked_mul(LOG_SECTOR_SIZE))
        .ok_or_else(|| overflow("log entry length"))
}

/// Fields of a log entry header a writer chooses.
#[derive(Debug, Clone, Copy)]
pub struct EntryParams {
    /// The session's LogGuid.
    pub guid: Guid,
    /// Sequence number (non-zero).
    pub sequence: u64,
    /// Log offset of the oldest entry not yet applied.
    pub tail: u64,
    /// File size known to be stable.
    pub flushed_file_offset: u64,
    /// File size needed for every structure the log refers to.
    pub last_file_offset: u64,
}

/// Builds a log entry that writes each `(file_offset, 4 KiB page)`; the pages must be 4 KiB
/// long and 4 KiB aligned.
///
/// # Errors
/// `InvalidArgument` for a page that is not 4 KiB long; `OutOfRange` when the entry's length,
/// the tail or the descriptor count do not fit their 32-bit fields.
#[allow(
    clippy::arithmetic_side_effects,
    reason = "entry_length checks that (desc_sectors + n) * 4096 does not overflow, and \
              i < n, so 64 + 32 * i and (desc_sectors + i) * 4096 are below the entry's \
              length, which fits in usize (fit)"
)]
pub fn build_entry(params: &EntryParams, pages: &[(u64, Vec<u8>)]) -> Result<Vec<u8>> {
    use zerocopy::IntoBytes;
    use zerocopy::little_endian::{U32, U64};
    let n = fit::<u64, _>(pages.len(), "log descriptor count")?;
    let length = entry_length(n)?;
    let desc_sectors = length / LOG_SECTOR_SIZE - n;
    let mut entry = vec![0u8; fit::<usize, _>(length, "log entry length")?];
    let header = LogEntryHeader {
        signature: U32::new(LOG_ENTRY_SIGNATURE),
        checksum: U32::new(0),
        entry_length: U32::new(fit(length, "log entry length")?),
        tail: U32::new(fit(params.tail, "log entry tail")?),
        sequence_number: U64::new(params.sequence),
        descriptor_count: U32::new(fit(n, "log descriptor count")?),
        reserved: U32::new(0),
        log_guid: params.guid,
        flushed_file_offset: U64::new(params.flushed_file_offset),
        last_file_offset: U64::new(params.last_file_offset),
    };
    let put = |entry: &mut Vec<u8>, at: usize, bytes: &[u8]| -> Result<()> {
        entry
            .get_mut(at..at.saturating_add(bytes.len()))
            .ok_or_else(|| {
                vd_core::Error::new(
                    vd_core::ErrorKind::OutOfRange,
                    format!("log entry bytes {at:#x}.. are outside the entry"),
                )
            })?
            .copy_from_slice(bytes);
        Ok(())
    };
    put(&mut entry, 0, header.as_bytes())?;
    let (high, low) = (params.sequence >> 32, params.sequence & 0xffff_ffff);
    for (i, (offset, page)) in pages.iter().enumerate() {
        let page: &[u8; 4096] = page.as_slice().try_into().map_err(|_| {
            vd_core::Error::invalid_argument(format!(
                "a logged page at {offset:#x} is {} bytes, not 4096",
                page.len()
            ))
        })?;
        let (leading, rest) = page.split_first_chunk::<8>().ok_or_else(|| {
            vd_core::Error::invalid_argument("a logged page is shorter than 8 bytes")
        })?;
        let (middle, trailing) = rest.split_first_chunk::<4084>().ok_or_else(|| {
            vd_core::Error::invalid_argument("a logged page is shorter than 4092 bytes")
        })?;
        let trailing: [u8; 4] = trailing
            .try_into()
            .map_err(|_| vd_core::Error::invalid_argument("a logged page is not 4096 bytes"))?;
        let desc = Descriptor {
            signature: U32::new(DATA_DESC_SIGNATURE),
            trailing_bytes: trailing,
            leading_bytes: *leading,
            file_offset: U64::new(*offset),
            sequence_number: U64::new(params.sequence),
        };
        put(&mut entry, 64 + 32 * i, desc.as_bytes())?;
        let sector = DataSector {
            signature: U32::new(DATA_SECTOR_SIGNATURE),
            sequence_high: U32::new(fit(high, "log sequence high")?),
            data: *middle,
            sequence_low: U32::new(fit(low, "log sequence low")?),
        };
        let i = fit::<u64, _>(i, "log descriptor index")?;
        let at = fit::<usize, _>((desc_sectors + i) * LOG_SECTOR_SIZE, "log data sector")?;
        put(&mut entry, at, sector.as_bytes())?;
    }
    let sum = crc32c_with_zero_field(&entry, 4);
    put(&mut entry, 4, &sum.to_le_bytes())?;
    Ok(entry)
}

#[cfg(test)]
#[allow(
    clippy::cast_possible_truncation,
    reason = "test offsets and lengths are at most a few MiB"
)]
mod tests {
    use super::*;
    use crate::error::corruption_of;
    use crate::format::{Descriptor, LogEntryHeader, MIB};
    use vd_core::MemStorage;
    use zerocopy::little_endian::{U32, U64};
    use zerocopy::{FromBytes, IntoBytes};

    /// The log region: 16 sectors at 1 MiB.
    const LOG_OFFSET: u64 = MIB;
    const LOG_LEN: u64 = 16 * LOG_SECTOR_SIZE;
    const FILE_LEN: u64 = 4 * MIB;
    /// Where the tests' entries write: past the log, inside the file.
    const TARGET: u64 = 2 * MIB;
    const S: u64 = LOG_SECTOR_SIZE;

    fn guid() -> Guid {
        Guid([0x5A; 16])
    }

    fn params(sequence: u64, tail: u64) -> EntryParams {
        EntryParams {
            guid: guid(),
            sequence,
            tail,
            flushed_file_offset: FILE_LEN,
            last_file_offset: FILE_LEN,
        }
    }

    /// A 4 KiB page whose bytes depend on `seed` and their index, so misplaced bytes show.
    fn page(seed: u8) -> Vec<u8> {
        (0..4096u32)
            .map(|i| (i as u8).wrapping_mul(7) ^ seed)
            .collect()
    }

    /// An entry of `sequence` with tail `tail`, writing one page per `(target, seed)`.
    fn entry(sequence: u64, tail: u64, pages: &[(u64, u8)]) -> Vec<u8> {
        let pages: Vec<(u64, Vec<u8>)> = pages.iter().map(|&(t, s)| (t, page(s))).collect();
        build_entry(&params(sequence, tail), &pages).unwrap()
    }

    /// An empty log.
    fn log() -> Vec<u8> {
        vec![0; LOG_LEN as usize]
    }

    /// Writes `bytes` into the log at `pos`, wrapping around its end.
    fn put(log: &mut [u8], pos: u64, bytes: &[u8]) {
        let n = log.len();
        for (i, b) in bytes.iter().enumerate() {
            log[(pos as usize + i) % n] = *b;
        }
    }

    /// Recomputes an entry's checksum after a test edited it, so the edit is "intact".
    fn reseal(entry: &mut [u8]) {
        let sum = crc32c_with_zero_field(entry, 4);
        entry[4..8].copy_from_slice(&sum.to_le_bytes());
    }

    fn plan(log: &[u8]) -> Result<ReplayPlan> {
        plan_replay(log, LOG_OFFSET, guid(), FILE_LEN)
    }

    #[track_caller]
    fn corruption(r: Result<ReplayPlan>) -> Corruption {
        let err = r.expect_err("the plan must fail");
        corruption_of(&err)
            .unwrap_or_else(|| panic!("no Corruption behind {err}"))
            .clone()
    }

    fn data_writes(plan: &ReplayPlan) -> Vec<(u64, Vec<u8>)> {
        plan.writes
            .iter()
            .map(|w| match w {
                LogWrite::Data { offset, data } => (*offset, data.to_vec()),
                LogWrite::Zero { .. } => panic!("unexpected zero write {w:?}"),
            })
            .collect()
    }

    #[test]
    fn an_empty_log_is_nothing_to_replay() {
        let p = plan(&log()).expect("an empty log");
        assert!(p.is_empty() && p.writes.is_empty() && p.summary.is_empty());
    }

    #[test]
    fn a_torn_only_entry_is_nothing_to_replay() {
        // QEMU's crash window: the LogGuid is set, the first entry did not land whole.
        let mut e = entry(1, 0, &[(TARGET, 1)]);
        e[S as usize + 7] ^= 0x40;
        let mut l = log();
        put(&mut l, 0, &e);
        assert!(plan(&l).expect("a torn entry is no entry").is_empty());
    }

    #[test]
    fn intact_entries_without_a_complete_sequence_are_refused() {
        // The head's tail names an entry that is not there: an intact entry asks for a replay
        // that cannot be done.
        let mut l = log();
        put(&mut l, 4 * S, &entry(9, 8 * S, &[(TARGET, 1)]));
        assert_eq!(corruption(plan(&l)), Corruption::NoActiveLogSequence);
    }

    #[test]
    fn one_entry_is_a_complete_sequence() {
        let mut l = log();
        put(&mut l, 0, &entry(7, 0, &[(TARGET, 1), (TARGET + 3 * S, 2)]));
        let p = plan(&l).expect("one complete entry");
        assert_eq!(p.entries, 1);
        assert_eq!(p.head_sequence, 7);
        assert_eq!(p.last_file_offset, FILE_LEN);
        assert!(p.beyond_file.is_empty(), "{:?}", p.beyond_file);
        assert_eq!(
            p.summary,
            vec![EntrySummary {
                log_offset: 0,
                length: 3 * S,
                sequence: 7,
                tail: 0,
                descriptors: 2,
                flushed_file_offset: FILE_LEN,
                last_file_offset: FILE_LEN,
            }]
        );
        assert_eq!(
            data_writes(&p),
            vec![(TARGET, page(1)), (TARGET + 3 * S, page(2))],
            "each page is rebuilt from its descriptor and data sector"
        );
    }

    #[test]
    fn an_entry_without_descriptors_is_one_sector() {
        let mut l = log();
        put(&mut l, 4 * S, &entry(3, 4 * S, &[]));
        let p = plan(&l).expect("an empty entry is valid");
        assert_eq!((p.entries, p.head_sequence), (1, 3));
        assert_eq!(p.summary[0].length, S);
        assert!(p.writes.is_empty());
    }

    #[test]
    fn a_sequence_replays_from_the_heads_tail_in_order() {
        let mut l = log();
        // Three consecutive entries; the head's tail points at the second, so the first was
        // already applied and is not part of the active sequence.
        put(&mut l, 0, &entry(10, 0, &[(TARGET, 1)]));
        put(&mut l, 2 * S, &entry(11, 2 * S, &[(TARGET, 2)]));
        put(&mut l, 4 * S, &entry(12, 2 * S, &[(TARGET + S, 3)]));
        let p = plan(&l).expect("complete sequence");
        assert_eq!(p.entries, 2);
        assert_eq!(p.head_sequence, 12);
        let offsets: Vec<u64> = p.summary.iter().map(|e| e.log_offset).collect();
        assert_eq!(offsets, vec![2 * S, 4 * S]);
        assert_eq!(
            data_writes(&p),
            vec![(TARGET, page(2)), (TARGET + S, page(3))]
        );

        // With the head's tail at the first entry, all three replay, oldest first.
        put(&mut l, 4 * S, &entry(12, 0, &[(TARGET + S, 3)]));
        let p = plan(&l).expect("complete sequence");
        assert_eq!(p.entries, 3);
        assert_eq!(
            data_writes(&p),
            vec![(TARGET, page(1)), (TARGET, page(2)), (TARGET + S, page(3))]
        );
    }

    #[test]
    fn entries_wrap_around_the_end_of_the_log() {
        let mut l = log();
        // Sectors 14, 15 and 0: an entry split by the end of the log.
        put(
            &mut l,
            14 * S,
            &entry(20, 14 * S, &[(TARGET, 4), (TARGET + S, 5)]),
        );
        put(&mut l, S, &entry(21, 14 * S, &[(TARGET + 2 * S, 6)]));
        let p = plan(&l).expect("a wrapped sequence");
        assert_eq!(p.entries, 2);
        assert_eq!(p.head_sequence, 21);
        assert_eq!(p.summary[0].log_offset, 14 * S);
        assert_eq!(p.summary[1].log_offset, S);
        assert_eq!(
            data_writes(&p),
            vec![
                (TARGET, page(4)),
                (TARGET + S, page(5)),
                (TARGET + 2 * S, page(6))
            ]
        );
    }

    #[test]
    fn a_torn_last_entry_is_not_replayed() {
        let mut l = log();
        put(&mut l, 0, &entry(30, 0, &[(TARGET, 1)]));
        let mut torn = entry(31, 0, &[(TARGET + S, 2)]);
        // The data sector of the head never reached the disk completely.
        torn[S as usize + 100] ^= 0xFF;
        put(&mut l, 2 * S, &torn);
        let p = plan(&l).expect("the sequence before the torn entry");
        assert_eq!((p.entries, p.head_sequence), (1, 30));
        assert_eq!(data_writes(&p), vec![(TARGET, page(1))]);
    }

    #[test]
    fn a_bad_checksum_ends_the_sequence() {
        let mut l = log();
        put(&mut l, 0, &entry(40, 0, &[(TARGET, 1)]));
        let mut bad = entry(41, 0, &[(TARGET, 2)]);
        bad[4] ^= 1;
        put(&mut l, 2 * S, &bad);
        // The entry after it is intact, but its tail leads through the bad one, so its chain
        // is incomplete.
        put(&mut l, 4 * S, &entry(42, 0, &[(TARGET, 3)]));
        let p = plan(&l).expect("the first entry alone is complete");
        assert_eq!((p.entries, p.head_sequence), (1, 40));
        assert_eq!(data_writes(&p), vec![(TARGET, page(1))]);
    }

    #[test]
    fn a_gap_in_sequence_numbers_ends_the_sequence() {
        let mut l = log();
        put(&mut l, 0, &entry(50, 0, &[(TARGET, 1)]));
        put(&mut l, 2 * S, &entry(52, 0, &[(TARGET, 2)]));
        let p = plan(&l).expect("the first entry");
        assert_eq!((p.entries, p.head_sequence), (1, 50));
    }

    #[test]
    fn the_newest_of_two_sequences_is_chosen() {
        for (newer_at, older_at) in [(0, 8 * S), (8 * S, 0)] {
            let mut l = log();
            put(&mut l, older_at, &entry(60, older_at, &[(TARGET, 1)]));
            put(&mut l, newer_at, &entry(90, newer_at, &[(TARGET, 9)]));
            let p = plan(&l).expect("two complete sequences");
            assert_eq!(p.head_sequence, 90, "newer at {newer_at:#x}");
            assert_eq!(p.summary[0].log_offset, newer_at);
            assert_eq!(data_writes(&p), vec![(TARGET, page(9))]);
        }
    }

    #[test]
    fn entries_of_another_log_guid_or_sequence_zero_are_ignored() {
        let mut l = log();
        let mut other = params(5, 0);
        other.guid = Guid([0xA5; 16]);
        put(
            &mut l,
            0,
            &build_entry(&other, &[(TARGET, page(1))]).unwrap(),
        );
        assert!(plan(&l).expect("another log's entry").is_empty());

        let mut l = log();
        put(&mut l, 0, &entry(0, 0, &[(TARGET, 1)]));
        assert!(plan(&l).expect("sequence 0 is no entry").is_empty());
    }

    #[test]
    fn a_file_shorter_than_flushed_file_offset_is_truncated() {
        let mut l = log();
        let mut p = params(70, 0);
        p.flushed_file_offset = FILE_LEN + S;
        p.last_file_offset = FILE_LEN + S;
        put(&mut l, 0, &build_entry(&p, &[(TARGET, page(1))]).unwrap());
        assert_eq!(
            corruption(plan(&l)),
            Corruption::LogTruncatedFile {
                file_len: FILE_LEN,
                flushed: FILE_LEN + S,
            }
        );
    }

    #[test]
    fn what_the_log_asks_beyond_the_file_is_listed_not_refused() {
        let mut l = log();
        let mut p = params(80, 0);
        p.last_file_offset = FILE_LEN + MIB;
        put(&mut l, 0, &build_entry(&p, &[(FILE_LEN, page(1))]).unwrap());
        let plan = plan(&l).expect("the file is at least FlushedFileOffset long");
        assert_eq!(plan.last_file_offset, FILE_LEN + MIB);
        let found: Vec<(u64, u64)> = plan
            .beyond_file
            .iter()
            .map(|(c, at)| match c {
                Corruption::LogBeyondFile { end, file_len, .. } => {
                    assert_eq!(*file_len, FILE_LEN);
                    (*end, *at)
                }
                other => panic!("unexpected {other:?}"),
            })
            .collect();
        assert_eq!(
            found,
            vec![(FILE_LEN + MIB, LOG_OFFSET), (FILE_LEN + S, LOG_OFFSET)],
            "the head's LastFileOffset, then the write past the end, each at its entry"
        );
        assert_eq!(data_writes(&plan), vec![(FILE_LEN, page(1))]);
    }

    #[test]
    fn writes_into_the_header_area_or_the_log_are_refused() {
        for (target, what) in [
            (0, "header area"),
            (REGION_TABLE_OFFSETS[0] - S, "header area"),
            (LOG_OFFSET, "log"),
            (LOG_OFFSET + LOG_LEN - S, "log"),
        ] {
            let mut l = log();
            put(&mut l, 0, &entry(90, 0, &[(target, 1)]));
            assert_eq!(
                corruption(plan(&l)),
                Corruption::LogTarget {
                    target,
                    length: S,
                    what,
                },
                "target {target:#x}"
            );
        }
        // Right after the header area and right after the log are fine.
        let mut l = log();
        let fine = [(REGION_TABLE_OFFSETS[0], 1), (LOG_OFFSET + LOG_LEN, 2)];
        put(&mut l, 0, &entry(91, 0, &fine));
        assert_eq!(plan(&l).expect("allowed targets").writes.len(), 2);
    }

    /// An intact entry (valid checksum) that breaks a rule, and the reason expected.
    fn malformed(edit: impl FnOnce(&mut Vec<u8>), reason: &str) {
        let mut e = entry(100, 0, &[(TARGET, 1)]);
        edit(&mut e);
        reseal(&mut e);
        let mut l = log();
        put(&mut l, 0, &e);
        match corruption(plan(&l)) {
            Corruption::LogEntry {
                log_offset,
                reason: r,
            } => {
                assert_eq!(log_offset, 0);
                assert!(r.contains(reason), "{r:?} does not say {reason:?}");
            }
            other => panic!("expected a LogEntry corruption ({reason}), got {other:?}"),
        }
    }

    #[test]
    fn intact_entries_that_break_a_rule_are_corruption() {
        // Descriptor 0 starts at byte 64: signature, trailing, leading, file offset, sequence.
        malformed(|e| e[64 + 24] ^= 1, "another sequence number");
        malformed(|e| e[64 + 16] = 0x10, "not 4 KiB aligned");
        malformed(|e| e[64..68].copy_from_slice(b"what"), "has signature");
        malformed(
            |e| e[S as usize..S as usize + 4].copy_from_slice(b"atad"),
            "torn",
        );
        // The data sector's low sequence half (its last 4 bytes) disagrees.
        malformed(|e| e[2 * S as usize - 1] ^= 1, "torn or misplaced");
        malformed(
            |e| {
                // Claim one more sector than the descriptors account for.
                e.extend_from_slice(&[0; 4096]);
                e[8..12].copy_from_slice(&(3 * S as u32).to_le_bytes());
            },
            "does not match",
        );
        malformed(
            |e| e[56..64].copy_from_slice(&(MAX_LAST_FILE_OFFSET + S).to_le_bytes()),
            "absurd",
        );
    }

    /// A one-sector entry of `sequence` holding one zero descriptor.
    fn zero_entry(sequence: u64, target: u64, length: u64) -> Vec<u8> {
        let mut e = entry(sequence, 0, &[]);
        e[24..28].copy_from_slice(&1u32.to_le_bytes());
        let d = Descriptor {
            signature: U32::new(ZERO_DESC_SIGNATURE),
            trailing_bytes: [0; 4],
            leading_bytes: length.to_le_bytes(),
            file_offset: U64::new(target),
            sequence_number: U64::new(sequence),
        };
        e[64..96].copy_from_slice(d.as_bytes());
        reseal(&mut e);
        e
    }

    #[test]
    fn zero_descriptors_become_zero_writes() {
        let mut l = log();
        put(&mut l, 0, &zero_entry(110, TARGET, 3 * S));
        let p = plan(&l).expect("a zero entry");
        assert_eq!(p.summary[0].length, S);
        match p.writes.as_slice() {
            [LogWrite::Zero { offset, length }] => {
                assert_eq!((*offset, *length), (TARGET, 3 * S));
            }
            other => panic!("expected one zero write, got {other:?}"),
        }

        let mut l = log();
        put(&mut l, 0, &zero_entry(111, TARGET, S + 1));
        assert!(matches!(
            corruption(plan(&l)),
            Corruption::LogEntry { ref reason, .. } if reason.contains("not a 4 KiB multiple")
        ));
    }

    #[test]
    fn the_parsed_header_round_trips_through_build_entry() {
        let mut p = params(0x1_0000_0002, 3 * S);
        p.flushed_file_offset = 3 * MIB;
        p.last_file_offset = 5 * MIB;
        let bytes = build_entry(&p, &[(TARGET, page(1)), (TARGET + S, page(2))]).unwrap();
        let (h, _) = LogEntryHeader::read_from_prefix(&bytes).expect("64-byte header");
        assert_eq!(h.signature.get(), LOG_ENTRY_SIGNATURE);
        assert_eq!(u64::from(h.entry_length.get()), bytes.len() as u64);
        assert_eq!(u64::from(h.tail.get()), 3 * S);
        assert_eq!(h.sequence_number.get(), 0x1_0000_0002);
        assert_eq!(h.descriptor_count.get(), 2);
        assert_eq!(h.log_guid, guid());
        assert_eq!(h.flushed_file_offset.get(), 3 * MIB);
        assert_eq!(h.last_file_offset.get(), 5 * MIB);
        assert_eq!(h.checksum.get(), crc32c_with_zero_field(&bytes, 4));

        let mut l = log();
        put(&mut l, 0, &bytes);
        let log = Log {
            bytes: &l,
            offset: 0,
            guid: guid(),
        };
        let e = log.entry(0).expect("intact").expect("an entry");
        assert_eq!(
            (e.position, e.length, e.tail, e.sequence),
            (0, 3 * S, 3 * S, 0x1_0000_0002)
        );
        assert_eq!(
            (e.flushed_file_offset, e.last_file_offset),
            (3 * MIB, 5 * MIB)
        );
        assert_eq!(e.writes.len(), 2);
    }

    #[test]
    fn max_pages_per_entry_fills_the_log_but_one_sector() {
        for sectors in [2u64, 3, 16, 129, 130, 256, 257, 1024] {
            let n = max_pages_per_entry(sectors * S);
            let used = |n: u64| (n + 2).div_ceil(128) + n;
            assert!(used(n) < sectors, "{n} pages overfill {sectors} sectors");
            assert!(
                used(n + 1) >= sectors,
                "{} pages would fit in {sectors} sectors",
                n + 1
            );
        }
        assert_eq!(max_pages_per_entry(0), 0);
        assert_eq!(max_pages_per_entry(S), 0);
    }

    #[test]
    fn the_overlay_reads_as_the_file_after_apply() {
        let base: Vec<u8> = (0..FILE_LEN).map(|i| (i % 251) as u8).collect();
        let mut l = log();
        let mut p = params(120, 0);
        p.last_file_offset = FILE_LEN + 2 * S;
        put(
            &mut l,
            0,
            &build_entry(&p, &[(TARGET, page(1)), (FILE_LEN + S, page(2))]).unwrap(),
        );
        // zero_entry's tail is 0: this sequence's first entry.
        put(&mut l, 3 * S, &zero_entry(121, TARGET + S, 2 * S));
        let plan = plan(&l).expect("complete sequence");
        assert_eq!(plan.entries, 2);

        let applied = MemStorage::from_bytes(base.clone());
        apply(&applied, &plan).expect("apply");
        let after = applied.to_vec();
        assert_eq!(after.len() as u64, FILE_LEN + 2 * S);
        assert_eq!(&after[TARGET as usize..(TARGET + S) as usize], &page(1)[..]);
        assert!(
            after[(TARGET + S) as usize..(TARGET + 3 * S) as usize]
                .iter()
                .all(|&b| b == 0)
        );
        assert_eq!(&after[(FILE_LEN + S) as usize..], &page(2)[..]);

        let overlay = OverlayStorage::new(Arc::new(MemStorage::from_bytes(base.clone())), &plan)
            .expect("overlay");
        assert_eq!(overlay.len().expect("len"), FILE_LEN + 2 * S);
        // Unaligned reads that straddle replayed and untouched sectors.
        for (off, len) in [
            (0, 4096),
            (TARGET - 100, 300),
            (TARGET + S - 7, 2 * S as usize + 14),
            (FILE_LEN - 10, 2 * S as usize + 10),
            (0, after.len()),
        ] {
            let mut got = vec![0xEE; len];
            overlay.read_exact_at(off, &mut got).expect("overlay read");
            assert_eq!(got, &after[off as usize..off as usize + len], "at {off:#x}");
        }
        let mut past = [0u8; 2];
        assert_eq!(
            overlay
                .read_exact_at(FILE_LEN + 2 * S - 1, &mut past)
                .expect_err("past the end")
                .kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(overlay.is_read_only());
        assert_eq!(
            overlay.write_all_at(0, &[1]).expect_err("read-only").kind(),
            io::ErrorKind::PermissionDenied
        );
        assert!(overlay.set_len(0).is_err());
    }

    #[test]
    fn read_log_reads_the_region_and_reports_short_files() {
        let bytes: Vec<u8> = (0..3 * S).map(|i| (i % 13) as u8).collect();
        let s = MemStorage::from_bytes(bytes.clone());
        assert_eq!(
            read_log(&s, S, S).expect("inside"),
            &bytes[S as usize..2 * S as usize]
        );
        let err = read_log(&s, 2 * S, 2 * S).expect_err("past the end");
        assert_eq!(err.kind(), vd_core::ErrorKind::Io);
    }

    /// A 4 KiB page of `fill` with marker bytes at both ends, so the descriptor's leading and
    /// trailing bytes show where they came from.
    fn marked_page(fill: u8) -> Vec<u8> {
        let mut p = vec![fill; 4096];
        p[0] = 0xAA; // leading bytes
        p[4095] = 0xBB; // trailing bytes
        p
    }

    /// A log holding `entries` one after the other from its start.
    fn log_of(entries: &[Vec<u8>]) -> Vec<u8> {
        let mut l = log();
        let mut pos = 0;
        for e in entries {
            put(&mut l, pos, e);
            pos += e.len() as u64;
        }
        l
    }

    #[test]
    fn entry_header_and_descriptors_round_trip() {
        let pages = vec![(5 * MIB, marked_page(1)), (5 * MIB + 4096, marked_page(2))];
        let e = build_entry(&params(0x1_0000_0002, 0), &pages).unwrap();
        // One descriptor sector (2 descriptors + header fit), then two data sectors.
        assert_eq!(e.len(), 3 * 4096);
        let (h, rest) = LogEntryHeader::read_from_prefix(&e).unwrap();
        assert_eq!(h.signature.get(), LOG_ENTRY_SIGNATURE);
        assert_eq!(h.checksum.get(), crc32c_with_zero_field(&e, 4));
        assert_eq!(h.entry_length.get(), 3 * 4096);
        assert_eq!(h.sequence_number.get(), 0x1_0000_0002);
        assert_eq!(h.descriptor_count.get(), 2);
        assert_eq!(h.log_guid, guid());
        assert_eq!(
            (h.flushed_file_offset.get(), h.last_file_offset.get()),
            (FILE_LEN, FILE_LEN)
        );
        let (d, _) = <[Descriptor]>::ref_from_prefix_with_elems(rest, 2).unwrap();
        assert_eq!(d[1].signature.get(), DATA_DESC_SIGNATURE);
        assert_eq!(d[1].file_offset.get(), 5 * MIB + 4096);
        assert_eq!(d[1].leading_bytes, [0xAA, 2, 2, 2, 2, 2, 2, 2]);
        assert_eq!(d[1].trailing_bytes, [2, 2, 2, 0xBB]);
        let (s, _) = DataSector::read_from_prefix(&e[2 * 4096..]).unwrap();
        assert_eq!(s.signature.get(), DATA_SECTOR_SIGNATURE);
        assert_eq!((s.sequence_high.get(), s.sequence_low.get()), (1, 2));
    }

    #[test]
    fn descriptor_sectors_grow_with_the_page_count() {
        // 126 descriptors fit in the first sector with the header; the 127th needs another.
        let pages: Vec<(u64, Vec<u8>)> = (0..127).map(|i| (i * 4096, marked_page(0))).collect();
        let e = build_entry(&params(1, 0), &pages[..126]).unwrap();
        assert_eq!(e.len(), (1 + 126) * 4096);
        let e = build_entry(&params(1, 0), &pages).unwrap();
        assert_eq!(e.len(), (2 + 127) * 4096);
        assert_eq!(max_pages_per_entry(MIB), 253);
    }

    #[test]
    fn build_rejects_a_short_page() {
        assert!(build_entry(&params(1, 0), &[(0, vec![0; 100])]).is_err());
    }

    #[test]
    fn plan_replays_the_active_sequence_in_order() {
        let first = build_entry(&params(7, 0), &[(4 * MIB, marked_page(1))]).unwrap();
        let second = build_entry(&params(8, 0), &[(4 * MIB, marked_page(2))]).unwrap();
        let log = log_of(&[first, second]);
        let plan = plan_replay(&log, LOG_OFFSET, guid(), 2 * FILE_LEN).unwrap();
        assert_eq!((plan.entries, plan.head_sequence), (2, 8));
        assert_eq!(plan.summary[0].log_offset, 0);
        assert_eq!(plan.summary[1].log_offset, 2 * 4096);
        let data: Vec<(u64, u8)> = plan
            .writes
            .iter()
            .map(|w| match w {
                LogWrite::Data { offset, data } => (*offset, data[1]),
                LogWrite::Zero { offset, .. } => (*offset, 0),
            })
            .collect();
        assert_eq!(data, [(4 * MIB, 1), (4 * MIB, 2)]);
        assert!(plan.beyond_file.is_empty());
    }

    #[test]
    fn plan_ignores_other_guids_and_rejects_truncated_files() {
        let e = build_entry(&params(7, 0), &[(4 * MIB, marked_page(1))]).unwrap();
        let log = log_of(&[e]);
        let other = Guid::from_uuid(uuid::uuid!("99999999-0000-4000-8000-000000000000"));
        let p = plan_replay(&log, LOG_OFFSET, other, FILE_LEN).unwrap();
        assert!(p.is_empty(), "another LogGuid's entry is not replayed");
        let err = plan_replay(&log, LOG_OFFSET, guid(), FILE_LEN - MIB).unwrap_err();
        assert!(matches!(
            corruption_of(&err),
            Some(Corruption::LogTruncatedFile { .. })
        ));
    }

    #[test]
    fn plan_refuses_writes_into_the_header_section() {
        let e = build_entry(&params(7, 0), &[(64 * 1024, marked_page(1))]).unwrap();
        assert!(plan_replay(&log_of(&[e]), LOG_OFFSET, guid(), FILE_LEN).is_err());
    }

    #[test]
    fn overflowing_log_values_are_errors() {
        // A log whose end overflows the file offset space.
        let e = plan_replay(&[0u8; 4096], u64::MAX - 100, Guid::ZERO, 1 << 20).unwrap_err();
        assert!(e.to_string().contains("log end overflows"), "{e}");
        // An entry length whose sector count overflows.
        assert!(entry_length(u64::MAX).is_err());
        assert_eq!(entry_length(1).unwrap(), 2 * LOG_SECTOR_SIZE);
        // A zero write whose end overflows (plan_replay refuses it; the overlay too).
        let base: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(vec![0; 4096]));
        let plan = ReplayPlan {
            writes: vec![LogWrite::Zero {
                offset: u64::MAX - 4095,
                length: 8192,
            }],
            ..ReplayPlan::default()
        };
        let e = OverlayStorage::new(base, &plan).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    }
}
