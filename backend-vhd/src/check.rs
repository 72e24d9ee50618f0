//! Checking a VHD file the way an fsck does: everything is read again from the storage, nothing
//! is taken from an opened image, and each problem becomes a [`Finding`] naming the field and
//! its offset in the file.
//!
//! What is checked:
//!
//! - the footer at the end of the file (512 bytes, or 511 for images older than Virtual PC
//!   2004): cookie and checksum;
//! - dynamic and differencing images: the footer copy at offset 0 (valid, and the same bytes
//!   as the footer at the end), the dynamic header (cookie, checksum, block size, BAT bounds,
//!   BAT entries covering the disk), every BAT entry (its block and sector bitmap inside the
//!   file, clear of the footer copy, the dynamic header, the BAT, the parent locators' data and
//!   the footer, and clear of every other block), every parent locator's data (inside the
//!   file, clear of the other structures), and space no structure uses with room for a
//!   block (leaks; smaller gaps are the alignment padding real writers leave);
//! - fixed images: the file holds the whole disk before the footer.
//!
//! What is repaired (unless a dry run), and only when nothing else is wrong:
//!
//! - a damaged or missing footer at the end, from a sound copy at offset 0: written over the
//!   last 512 bytes when they lie after every structure, else right after the last structure
//!   (a footer a truncation cut off);
//! - a damaged footer copy at offset 0, or one that differs from the footer at the end, from
//!   the footer at the end;
//! - unused space between the last structure and the footer of a dynamic image: the footer is
//!   written right after the last structure, flushed, and only then is the file cut behind it,
//!   so a crash in between leaves two sound footers (the one at the end unchanged).
//!
//! Leaks elsewhere (blocks no BAT entry uses, gaps between structures) are reported and left:
//! reclaiming them means moving blocks, which is what a compaction does. A damaged dynamic
//! header, BAT entries pointing outside the file or into other structures, and a truncated
//! file are never repaired: nothing is written to such an image.

use vd_core::{CheckReport, Error, ErrorKind, Finding, Result, Severity, Storage, Warning};

use crate::format::{
    self, DiskType, FOOTER_SIZE, HEADER_SIZE, MAX_LOCATOR_LEN, SECTOR, UNALLOCATED,
};

/// Where the locator table starts in the dynamic header.
const LOCATORS_AT: u64 = 576;
/// Bytes per locator entry.
const LOCATOR_SIZE: u64 = 24;
/// Locator entries in the dynamic header.
const LOCATOR_SLOTS: u64 = 8;
/// The most findings of one kind (BAT entries outside the file, overlaps, leaks) listed one by
/// one; the rest are counted in one more finding, so a hostile BAT of millions of bad entries
/// makes a short report.
pub const MAX_LISTED: usize = 32;

/// A finding of `severity` about `field` at `offset`.
fn finding(
    severity: Severity,
    kind: ErrorKind,
    field: impl Into<String>,
    offset: u64,
    message: impl Into<String>,
) -> Finding {
    Finding::from_warning(
        severity,
        &Warning {
            kind,
            field: Some(field.into()),
            offset: Some(offset),
            message: message.into(),
        },
    )
}

fn corrupt(field: impl Into<String>, offset: u64, message: impl Into<String>) -> Finding {
    finding(Severity::Error, ErrorKind::Corrupt, field, offset, message)
}

/// `e`'s finding with `message` in front of its own.
fn from_error(e: &Error, message: &str) -> Finding {
    let mut f = Finding::from_error(Severity::Error, e);
    f.message = format!("{message}: {}", f.message);
    f
}

fn io_at(op: &str, offset: u64, e: std::io::Error) -> Error {
    Error::io(op, e).with_offset(offset)
}

fn sector_ceil(n: u64) -> u64 {
    n.div_ceil(SECTOR).saturating_mul(SECTOR)
}

/// Reads `buf` at `at` when `[at, at + buf.len())` lies below `limit`; `false` otherwise.
fn read_below(storage: &dyn Storage, at: u64, buf: &mut [u8], limit: u64) -> Result<bool> {
    let fits = at
        .checked_add(buf.len() as u64)
        .is_some_and(|end| end <= limit);
    if !fits {
        return Ok(false);
    }
    storage
        .read_exact_at(at, buf)
        .map_err(|e| io_at("cannot read the image", at, e))?;
    Ok(true)
}

/// Findings of one kind, listed up to [`MAX_LISTED`] and counted beyond.
#[derive(Debug)]
struct Listed {
    severity: Severity,
    field: &'static str,
    what: &'static str,
    listed: usize,
    more: u64,
    first_more: Option<u64>,
}

impl Listed {
    fn new(severity: Severity, field: &'static str, what: &'static str) -> Self {
        Self {
            severity,
            field,
            what,
            listed: 0,
            more: 0,
            first_more: None,
        }
    }

    /// Pushes `f` while fewer than [`MAX_LISTED`] are listed, else counts it.
    fn push(&mut self, report: &mut CheckReport, f: Finding) -> Option<usize> {
        if self.listed < MAX_LISTED {
            self.listed = self.listed.saturating_add(1);
            report.findings.push(f);
            Some(report.findings.len().saturating_sub(1))
        } else {
            self.more = self.more.saturating_add(1);
            self.first_more.get_or_insert(f.offset.unwrap_or(0));
            None
        }
    }

    /// One finding for those not listed, if any.
    fn finish(self, report: &mut CheckReport) {
        if self.more > 0 {
            report.findings.push(finding(
                self.severity,
                ErrorKind::Corrupt,
                self.field,
                self.first_more.unwrap_or(0),
                format!("{} more {} (not listed one by one)", self.more, self.what),
            ));
        }
    }
}

/// What a range of the file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    FooterCopy,
    Header,
    Bat,
    Locator { slot: u64, code: [u8; 4] },
    Block { index: u32 },
    Footer,
}

/// One structure of the file, for the overlap and leak sweeps.
#[derive(Debug, Clone, Copy)]
struct Used {
    start: u64,
    len: u64,
    part: Part,
}

/// Where the dynamic header and the BAT lie, to name fields.
#[derive(Debug, Clone, Copy)]
struct Places {
    header: u64,
    table: u64,
    /// A block with its sector bitmap.
    span: u64,
}

impl Used {
    fn end(&self) -> u64 {
        self.start.saturating_add(self.len)
    }

    /// Which of two overlapping structures is at fault: a parent locator (whose data has no
    /// other use), else a block, else the later one.
    fn rank(&self) -> u8 {
        match self.part {
            Part::Locator { .. } => 2,
            Part::Block { .. } => 1,
            _ => 0,
        }
    }

    /// The field a finding about this structure names, and where that field lies.
    fn field(&self, p: Places) -> (String, u64) {
        match self.part {
            Part::FooterCopy => ("footer copy".into(), 0),
            Part::Header => ("dynamic header".into(), p.header),
            Part::Bat => (
                "dynamic header table offset".into(),
                p.header.saturating_add(16),
            ),
            Part::Locator { slot, .. } => {
                (format!("parent locator {slot}"), locator_entry(p, slot))
            }
            Part::Block { index } => (
                format!("BAT entry {index}"),
                p.table.saturating_add(u64::from(index).saturating_mul(4)),
            ),
            Part::Footer => ("footer".into(), self.start),
        }
    }

    /// How messages name it.
    fn describe(&self) -> String {
        let at = self.start;
        match self.part {
            Part::FooterCopy => "the footer copy at 0x0".into(),
            Part::Header => format!("the dynamic header at {at:#x}"),
            Part::Bat => format!("the BAT at {at:#x}"),
            Part::Locator { slot, code } => format!(
                "parent locator {slot} ({}) data at {at:#x}",
                code.escape_ascii()
            ),
            Part::Block { index } => format!("block {index} at {at:#x}"),
            Part::Footer => format!("the footer at {at:#x}"),
        }
    }
}

fn locator_entry(p: Places, slot: u64) -> u64 {
    p.header
        .saturating_add(LOCATORS_AT)
        .saturating_add(slot.saturating_mul(LOCATOR_SIZE))
}

/// The footer at the end of the file, as found.
#[derive(Debug)]
enum EndFooter {
    /// Sound, at `at`, `len` bytes long (512, or 511 for old images).
    Sound {
        footer: format::Footer,
        bytes: Box<[u8; FOOTER_SIZE]>,
        at: u64,
        len: u64,
    },
    /// Damaged or missing: the error naming why.
    Damaged(Error),
}

fn read_end_footer(storage: &dyn Storage, file_len: u64) -> Result<EndFooter> {
    let mut first_error = None;
    for len in [FOOTER_SIZE, FOOTER_SIZE.saturating_sub(1)] {
        let Some(at) = file_len.checked_sub(len as u64) else {
            continue;
        };
        let mut bytes = [0u8; FOOTER_SIZE];
        let part = bytes.get_mut(..len).unwrap_or_default();
        storage
            .read_exact_at(at, part)
            .map_err(|e| io_at("cannot read the VHD footer", at, e))?;
        match format::parse_footer(&bytes, at) {
            Ok(footer) => {
                return Ok(EndFooter::Sound {
                    footer,
                    bytes: Box::new(bytes),
                    at,
                    len: len as u64,
                });
            }
            // A 511-byte footer is tried only when the 512-byte one has no cookie.
            Err(e) if e.context().field.as_deref() == Some("footer cookie") => {
                first_error.get_or_insert(e);
            }
            Err(e) => {
                first_error.get_or_insert(e);
                break;
            }
        }
    }
    Ok(EndFooter::Damaged(first_error.unwrap_or_else(|| {
        Error::new(
            ErrorKind::InvalidHeader,
            format!("file of {file_len} bytes is too short for a VHD footer"),
        )
        .with_field("footer")
        .with_offset(0)
    })))
}

/// Checks the VHD in `storage` from scratch and, when `repair`, repairs what is safe (see the
/// module docs); with `repair == false` nothing is written.
///
/// Each repaired finding is marked [`repaired`](Finding::repaired) once the written bytes read
/// back sound; a repairable finding of an image with other errors says that nothing was
/// written.
///
/// # Errors
/// I/O errors reading or writing the file. Problems of the image are findings, not errors.
pub fn check(storage: &dyn Storage, repair: bool) -> Result<CheckReport> {
    let file_len = storage
        .len()
        .map_err(|e| Error::io("cannot read the file size", e))?;
    let mut report = CheckReport::default();
    let end = read_end_footer(storage, file_len)?;
    let mut copy = [0u8; FOOTER_SIZE];
    let copy_footer =
        read_below(storage, 0, &mut copy, file_len)?.then(|| format::parse_footer(&copy, 0));

    let mut plan = Plan::default();
    let footer = match (&end, &copy_footer) {
        (
            EndFooter::Sound {
                footer, bytes, len, ..
            },
            _,
        ) => {
            plan.good = **bytes;
            let n = usize::try_from(*len).unwrap_or(FOOTER_SIZE);
            if footer.disk_type != DiskType::Fixed {
                let problem = match &copy_footer {
                    None => Some(from_error(
                        &Error::new(ErrorKind::Corrupt, "the file is too short")
                            .with_field("footer copy")
                            .with_offset(0),
                        "no footer copy at offset 0",
                    )),
                    Some(Err(e)) => Some(from_error(e, "the footer copy at offset 0 is damaged")),
                    Some(Ok(_)) if copy.get(..n) != bytes.get(..n) => Some(corrupt(
                        "footer copy",
                        0,
                        "the footer copy at offset 0 differs from the footer at the end of the file",
                    )),
                    Some(Ok(_)) => None,
                };
                if let Some(mut f) = problem {
                    f.kind = ErrorKind::Corrupt;
                    f.field = Some("footer copy".into());
                    f.offset = Some(0);
                    f.message = format!("{} (repairable from the footer at the end)", f.message);
                    report.findings.push(f);
                    plan.copy = Some(report.findings.len().saturating_sub(1));
                }
            }
            footer.clone()
        }
        (EndFooter::Damaged(e), Some(Ok(good))) if good.disk_type != DiskType::Fixed => {
            plan.good = copy;
            let mut f = from_error(e, "the footer at the end of the file is damaged or missing");
            f.offset = Some(file_len.saturating_sub(FOOTER_SIZE as u64));
            f.message = format!(
                "{} (repairable from the footer copy at offset 0)",
                f.message
            );
            report.findings.push(f);
            plan.end = Some(report.findings.len().saturating_sub(1));
            good.clone()
        }
        (EndFooter::Damaged(e), _) => {
            report.findings.push(from_error(
                e,
                "no sound VHD footer at the end of the file, and no sound footer copy of a \
                 dynamic image at offset 0",
            ));
            return Ok(report);
        }
    };
    // The data of the image ends at the footer, or at the end of the file when the footer is
    // damaged.
    let (footer_at, footer_len) = match &end {
        EndFooter::Sound { at, len, .. } => (*at, *len),
        EndFooter::Damaged(_) => (file_len, 0),
    };

    if footer.disk_type == DiskType::Fixed {
        check_fixed(&footer, footer_at, &mut report);
        return Ok(report);
    }

    let Some((mut used, places)) =
        check_dynamic(storage, &footer, file_len, footer_at, &mut report)?
    else {
        plan.refuse(&mut report);
        return Ok(report);
    };
    if footer_len > 0 {
        used.push(Used {
            start: footer_at,
            len: footer_len,
            part: Part::Footer,
        });
    }
    used.sort_by_key(|u| (u.start, u.len));
    check_overlaps(&used, places, &mut report);
    plan.data_end = sector_ceil(
        used.iter()
            .filter(|u| u.part != Part::Footer)
            .map(Used::end)
            .max()
            .unwrap_or(0),
    );
    // Where the footer ends up after a repair of a damaged one: over the last 512 bytes, or
    // after the last structure.
    let leak_end = if footer_len > 0 {
        footer_at
    } else {
        file_len
            .saturating_sub(FOOTER_SIZE as u64)
            .max(plan.data_end)
    };
    // An old 511-byte footer is left where it is.
    let cuttable = footer_len != FOOTER_SIZE.saturating_sub(1) as u64;
    report_leaks(
        &used,
        places.span,
        leak_end,
        cuttable,
        &mut plan,
        &mut report,
    );

    if plan.other_errors(&report) > 0 {
        plan.refuse(&mut report);
    } else if repair {
        plan.apply(storage, file_len, &mut report)?;
    }
    Ok(report)
}

/// A fixed image: the disk, then the footer.
fn check_fixed(footer: &format::Footer, footer_at: u64, report: &mut CheckReport) {
    let size = footer.current_size;
    if size > footer_at {
        report.findings.push(corrupt(
            "footer current size",
            footer_at,
            format!(
                "fixed image of {size} bytes, but the footer sits at {footer_at:#x}: the file is \
                 truncated (not repaired)"
            ),
        ));
    } else if size < footer_at {
        report.findings.push(finding(
            Severity::Warning,
            ErrorKind::Corrupt,
            "leaked space",
            size,
            format!(
                "{} bytes from the end of the disk at {size:#x} to the footer at {footer_at:#x} \
                 are not used (leaked; left as they are)",
                footer_at.saturating_sub(size)
            ),
        ));
    }
}

/// What a repair would write.
#[derive(Debug)]
struct Plan {
    /// The sound footer: the one at the end, or the copy at offset 0 when that one is damaged.
    good: [u8; FOOTER_SIZE],
    /// The finding of a damaged footer at the end, rewritten from the copy.
    end: Option<usize>,
    /// The finding of a damaged copy at offset 0, rewritten from the footer at the end.
    copy: Option<usize>,
    /// The finding of unused space before the footer, cut away.
    trailing: Option<usize>,
    /// The end of the last structure, rounded up to a sector.
    data_end: u64,
}

impl Default for Plan {
    fn default() -> Self {
        Self {
            good: [0; FOOTER_SIZE],
            end: None,
            copy: None,
            trailing: None,
            data_end: 0,
        }
    }
}

impl Plan {
    fn repairs(&self, index: usize) -> bool {
        self.end == Some(index) || self.copy == Some(index)
    }

    /// Errors a repair does not fix.
    fn other_errors(&self, report: &CheckReport) -> usize {
        report
            .findings
            .iter()
            .enumerate()
            .filter(|(i, f)| f.severity == Severity::Error && !self.repairs(*i))
            .count()
    }

    /// Says in each repairable finding that nothing is written, and why.
    fn refuse(&mut self, report: &mut CheckReport) {
        let others = self.other_errors(report);
        for i in [self.end, self.copy, self.trailing].into_iter().flatten() {
            if let Some(f) = report.findings.get_mut(i) {
                f.message = format!(
                    "{}; not repaired (the image has {others} other error{} besides): nothing \
                     is written to it",
                    f.message,
                    if others == 1 { "" } else { "s" }
                );
            }
        }
        *self = Self::default();
    }

    /// Writes the repairs in a crash-safe order and marks the findings they fixed:
    ///
    /// 1. the footer copy at offset 0, from the footer at the end; flushed (a torn write
    ///    leaves the footer at the end sound);
    /// 2. the footer at the end: right after the last structure when a trailing leak is cut
    ///    or the footer was cut off with the file's end, else over the last 512 bytes;
    ///    flushed (until the file is cut, the old end or the copy at 0 is still sound);
    /// 3. the file cut right behind the new footer; flushed.
    fn apply(&self, storage: &dyn Storage, file_len: u64, report: &mut CheckReport) -> Result<()> {
        let size = FOOTER_SIZE as u64;
        if let Some(i) = self.copy {
            write_footer(storage, 0, &self.good)?;
            if reads_back(storage, 0, &self.good)? {
                mark(report, i, "rewritten from the footer at the end");
            }
        }
        let cut = self.trailing.is_some();
        if self.end.is_none() && !cut {
            return Ok(());
        }
        let last = file_len.saturating_sub(size);
        let at = if cut || last < self.data_end {
            self.data_end
        } else {
            last
        };
        write_footer(storage, at, &self.good)?;
        let new_len = at.saturating_add(size);
        if new_len < file_len {
            storage
                .set_len(new_len)
                .and_then(|()| storage.flush())
                .map_err(|e| io_at("cannot cut the file behind the footer", new_len, e))?;
        }
        let len = storage
            .len()
            .map_err(|e| Error::io("cannot read the file size", e))?;
        let sound = len == new_len && reads_back(storage, at, &self.good)?;
        if !sound {
            return Ok(());
        }
        if let Some(i) = self.end {
            mark(
                report,
                i,
                &format!("rewritten at {at:#x} from the footer copy at offset 0"),
            );
        }
        if let Some(i) = self.trailing {
            mark(
                report,
                i,
                &format!("the footer now lies at {at:#x} and the file was cut to {new_len} bytes"),
            );
        }
        Ok(())
    }
}

fn write_footer(storage: &dyn Storage, at: u64, bytes: &[u8; FOOTER_SIZE]) -> Result<()> {
    storage
        .write_all_at(at, bytes)
        .and_then(|()| storage.flush())
        .map_err(|e| io_at("cannot write the VHD footer", at, e))
}

/// Whether the footer at `at` reads back as `bytes`, and sound.
fn reads_back(storage: &dyn Storage, at: u64, bytes: &[u8; FOOTER_SIZE]) -> Result<bool> {
    let mut back = [0u8; FOOTER_SIZE];
    storage
        .read_exact_at(at, &mut back)
        .map_err(|e| io_at("cannot read the VHD footer", at, e))?;
    Ok(back == *bytes && format::parse_footer(&back, at).is_ok())
}

fn mark(report: &mut CheckReport, i: usize, how: &str) {
    if let Some(f) = report.findings.get_mut(i) {
        f.repaired = true;
        f.message = format!("{}; {how}", f.message);
    }
}

/// Checks the dynamic header, the parent locators and the BAT of a dynamic or differencing
/// image whose data ends at `footer_at`. Returns every structure found, for the overlap and
/// leak sweeps, or `None` when the header is too damaged to go on.
fn check_dynamic(
    storage: &dyn Storage,
    footer: &format::Footer,
    file_len: u64,
    footer_at: u64,
    report: &mut CheckReport,
) -> Result<Option<(Vec<Used>, Places)>> {
    let at = footer.data_offset;
    let mut bytes = [0u8; HEADER_SIZE];
    if at < FOOTER_SIZE as u64 || !read_below(storage, at, &mut bytes, footer_at)? {
        report.findings.push(corrupt(
            "footer data offset",
            footer_at.min(file_len.saturating_sub(FOOTER_SIZE as u64)),
            format!(
                "the dynamic header at {at:#x} does not lie between the footer copy and the \
                 footer at {footer_at:#x}: nothing else is checked"
            ),
        ));
        return Ok(None);
    }
    let header = match format::parse_header(&bytes, at, file_len) {
        Ok(h) => h,
        Err(e) => {
            report.findings.push(from_error(
                &e,
                "the dynamic header is damaged (not repaired; the BAT, blocks and parent \
                 locators are not checked)",
            ));
            return Ok(None);
        }
    };
    let block = u64::from(header.block_size);
    let entries = u64::from(header.max_table_entries);
    if entries.saturating_mul(block) < footer.current_size {
        report.findings.push(corrupt(
            "dynamic header max table entries",
            at.saturating_add(28),
            format!(
                "{entries} BAT entries of {block}-byte blocks cover less than the disk's {} bytes",
                footer.current_size
            ),
        ));
    }
    let bitmap_size = sector_ceil((block / SECTOR).div_ceil(8));
    let places = Places {
        header: at,
        table: header.table_offset,
        span: bitmap_size.saturating_add(block),
    };
    // Bounded by MAX_TABLE_ENTRIES and the file length (parse_header).
    let table_len = entries.saturating_mul(4);
    let mut used = vec![
        Used {
            start: 0,
            len: FOOTER_SIZE as u64,
            part: Part::FooterCopy,
        },
        Used {
            start: at,
            len: HEADER_SIZE as u64,
            part: Part::Header,
        },
    ];
    if table_len > 0 {
        used.push(Used {
            start: places.table,
            len: table_len,
            part: Part::Bat,
        });
    }
    // Parent locators: parse_header keeps the slots with a platform code, in order.
    let slots = (0..LOCATOR_SLOTS).filter(|&k| {
        let from =
            usize::try_from(locator_entry(places, k).saturating_sub(at)).unwrap_or(usize::MAX);
        bytes
            .get(from..from.saturating_add(4))
            .is_some_and(|code| code != [0; 4])
    });
    for (slot, l) in slots.zip(&header.locators) {
        if l.length == 0 {
            continue;
        }
        let len = u64::from(l.length);
        let inside = l.offset.checked_add(len).is_some_and(|e| e <= footer_at);
        if !inside || l.length > MAX_LOCATOR_LEN {
            report.findings.push(corrupt(
                format!("parent locator {slot}"),
                locator_entry(places, slot),
                format!(
                    "parent locator {slot} ({}): {len} bytes of data at {:#x} do not lie inside \
                     the file before {footer_at:#x}{}",
                    l.code.escape_ascii(),
                    l.offset,
                    if l.length > MAX_LOCATOR_LEN {
                        ", or are more than 64 KiB"
                    } else {
                        ""
                    }
                ),
            ));
            continue;
        }
        used.push(Used {
            start: l.offset,
            len,
            part: Part::Locator { slot, code: l.code },
        });
    }
    check_bat(
        storage, places, &header, footer_at, file_len, &mut used, report,
    )?;
    Ok(Some((used, places)))
}

/// Checks every allocated BAT entry: its sector bitmap and block lie inside the file before
/// the footer. Pushes each block that does onto `used`.
fn check_bat(
    storage: &dyn Storage,
    places: Places,
    header: &format::Header,
    footer_at: u64,
    file_len: u64,
    used: &mut Vec<Used>,
    report: &mut CheckReport,
) -> Result<()> {
    let span = places.span;
    let table_len = u64::from(header.max_table_entries).saturating_mul(4);
    let limit = if footer_at == file_len {
        format!("the end of the file at {file_len:#x}")
    } else {
        format!("the footer at {footer_at:#x}")
    };
    let mut outside = Listed::new(
        Severity::Error,
        "BAT entry",
        "BAT entries point outside the file",
    );
    // Read in pieces of at most 1 MiB.
    let mut chunk = vec![0u8; usize::try_from(table_len.min(1 << 20)).unwrap_or(0)];
    let mut done = 0u64;
    while done < table_len {
        let n = table_len.saturating_sub(done).min(chunk.len() as u64);
        let Some(part) = usize::try_from(n).ok().and_then(|n| chunk.get_mut(..n)) else {
            break;
        };
        let from = places.table.saturating_add(done);
        storage
            .read_exact_at(from, part)
            .map_err(|e| io_at("cannot read the BAT", from, e))?;
        let first = u32::try_from(done / 4).unwrap_or(u32::MAX);
        for (k, c) in (first..).zip(part.chunks_exact(4)) {
            let e = u32::from_be_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
                c.get(2).copied().unwrap_or(0),
                c.get(3).copied().unwrap_or(0),
            ]);
            if e == UNALLOCATED {
                continue;
            }
            let start = u64::from(e).saturating_mul(SECTOR);
            let u = Used {
                start,
                len: span,
                part: Part::Block { index: k },
            };
            if start.checked_add(span).is_none_or(|end| end > footer_at) {
                let (field, entry_at) = u.field(places);
                outside.push(
                    report,
                    corrupt(
                        field,
                        entry_at,
                        format!(
                            "block {k} at {start:#x} ({span} bytes with its sector bitmap) does \
                             not lie inside the file before {limit}"
                        ),
                    ),
                );
                continue;
            }
            used.push(u);
        }
        done = done.saturating_add(n);
    }
    outside.finish(report);
    Ok(())
}

/// One finding per structure that starts inside another (the sweep over the structures
/// sorted by offset), naming the locator or block at fault.
fn check_overlaps(used: &[Used], places: Places, report: &mut CheckReport) {
    let mut overlaps = Listed::new(Severity::Error, "BAT entry", "structures overlap others");
    let mut holder: Option<&Used> = None;
    for u in used {
        if let Some(h) = holder
            && u.start < h.end()
        {
            let (fault, other) = if u.rank() >= h.rank() { (u, h) } else { (h, u) };
            let (field, at) = fault.field(places);
            overlaps.push(
                report,
                corrupt(
                    field,
                    at,
                    format!(
                        "{} ({} bytes) overlaps {} ({} bytes)",
                        fault.describe(),
                        fault.len,
                        other.describe(),
                        other.len
                    ),
                ),
            );
        }
        if holder.is_none_or(|h| u.end() > h.end()) {
            holder = Some(u);
        }
    }
    overlaps.finish(report);
}

/// Reports the space no structure uses before `leak_end` (each structure rounded up to whole
/// sectors) where it has room for a block and its bitmap (`span`): smaller gaps are the
/// alignment real writers leave (Windows puts each block's data on a 4 KiB boundary and the
/// footer where the next block's bitmap goes; Virtual PC and Hyper-V pad the BAT), and no
/// block can leak into them. Space between the last structure and `leak_end` is the trailing
/// leak a repair cuts when `cuttable`.
fn report_leaks(
    used: &[Used],
    span: u64,
    leak_end: u64,
    cuttable: bool,
    plan: &mut Plan,
    report: &mut CheckReport,
) {
    let mut leaks = Listed::new(Severity::Warning, "leaked space", "unused ranges (leaked)");
    let mut pos = 0u64;
    for u in used.iter().filter(|u| u.part != Part::Footer) {
        let len = u.start.saturating_sub(pos);
        if len >= span {
            leaks.push(
                report,
                finding(
                    Severity::Warning,
                    ErrorKind::Corrupt,
                    "leaked space",
                    pos,
                    format!(
                        "{len} bytes from {pos:#x} to {:#x} are used by no structure (leaked; \
                         left as they are: a compaction reclaims them)",
                        u.start
                    ),
                ),
            );
        }
        pos = pos.max(sector_ceil(u.end()));
    }
    leaks.finish(report);
    let len = leak_end.saturating_sub(pos);
    if len >= span {
        report.findings.push(finding(
            Severity::Warning,
            ErrorKind::Corrupt,
            "leaked space",
            pos,
            format!(
                "{len} bytes from {pos:#x} to the footer at {leak_end:#x} are used by no \
                 structure (leaked{})",
                if cuttable {
                    "; repairable: the footer moves down and the file is cut"
                } else {
                    "; left as they are before an old 511-byte footer"
                }
            ),
        ));
        if cuttable {
            plan.trailing = Some(report.findings.len().saturating_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use vd_core::testing::{FaultyStorage, LossMode};
    use vd_core::{MemFileSystem, MemStorage, OpenFlags, Registry};

    use super::*;
    use crate::format::{FOOTER_COOKIE, HEADER_COOKIE, checksum};

    const BLOCK: u32 = 4096;

    fn seal_footer(f: &mut [u8]) {
        f[64..68].fill(0);
        let c = checksum(f, 64);
        f[64..68].copy_from_slice(&c.to_be_bytes());
    }

    fn seal_header(h: &mut [u8]) {
        h[36..40].fill(0);
        let c = checksum(h, 36);
        h[36..40].copy_from_slice(&c.to_be_bytes());
    }

    fn footer(disk_type: u32, size: u64, data_offset: u64) -> Vec<u8> {
        let mut f = vec![0u8; FOOTER_SIZE];
        f[..8].copy_from_slice(&FOOTER_COOKIE);
        f[16..24].copy_from_slice(&data_offset.to_be_bytes());
        f[40..48].copy_from_slice(&size.to_be_bytes());
        f[48..56].copy_from_slice(&size.to_be_bytes());
        f[60..64].copy_from_slice(&disk_type.to_be_bytes());
        f[68..84].fill(7);
        seal_footer(&mut f);
        f
    }

    /// A dynamic image of two 4 KiB blocks (or a differencing one, whose W2ru locator data
    /// lies at 0x800, after the BAT): the footer copy, the dynamic header at 0x200, the BAT
    /// at 0x600 (block 0 allocated right after the BAT or the locator data, block 1 not),
    /// then the footer.
    fn dynamic(diff: bool) -> Vec<u8> {
        let size = 2 * u64::from(BLOCK);
        let foot = footer(if diff { 4 } else { 3 }, size, 512);
        let mut h = vec![0u8; HEADER_SIZE];
        h[..8].copy_from_slice(&HEADER_COOKIE);
        h[8..16].copy_from_slice(&u64::MAX.to_be_bytes());
        h[16..24].copy_from_slice(&1536u64.to_be_bytes());
        h[28..32].copy_from_slice(&2u32.to_be_bytes());
        h[32..36].copy_from_slice(&BLOCK.to_be_bytes());
        let locator: Vec<u8> = ".\\p.vhd"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        if diff {
            h[40..56].fill(5);
            // Locator slot 0: W2ru, 512 bytes of space, its length, at 0x800.
            h[576..580].copy_from_slice(b"W2ru");
            h[580..584].copy_from_slice(&512u32.to_be_bytes());
            h[584..588].copy_from_slice(&(locator.len() as u32).to_be_bytes());
            h[592..600].copy_from_slice(&2048u64.to_be_bytes());
        }
        seal_header(&mut h);
        let mut img = foot.clone();
        img.extend(&h);
        let first_block: u32 = if diff { 5 } else { 4 };
        img.extend(first_block.to_be_bytes());
        img.extend(UNALLOCATED.to_be_bytes());
        img.resize(2048, 0xFF);
        if diff {
            img.extend(&locator);
            img.resize(2560, 0);
        }
        let mut bitmap = vec![0u8; 512];
        bitmap[0] = 0b1010_0000;
        img.extend(&bitmap);
        img.extend((0..BLOCK).map(|i| (i / 512) as u8 + 1));
        img.extend(&foot);
        img
    }

    fn fixed() -> Vec<u8> {
        let mut img: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        img.extend(footer(2, 8192, u64::MAX));
        img
    }

    /// Checks `bytes` without repairing, and requires that nothing was written.
    #[track_caller]
    fn dry(bytes: &[u8]) -> Vec<Finding> {
        let s = MemStorage::from_bytes(bytes.to_vec());
        let report = check(&s, false).unwrap();
        assert!(s.to_vec() == bytes, "a dry run changed the file");
        assert!(report.findings.iter().all(|f| !f.repaired));
        report.findings
    }

    /// Repairs `bytes`; returns the findings and the file afterwards.
    fn repaired(bytes: &[u8]) -> (Vec<Finding>, Vec<u8>) {
        let s = MemStorage::from_bytes(bytes.to_vec());
        let report = check(&s, true).unwrap();
        (report.findings, s.to_vec())
    }

    /// The only finding of a dry check of `bytes`.
    #[track_caller]
    fn only(bytes: &[u8]) -> Finding {
        let found = dry(bytes);
        assert_eq!(found.len(), 1, "{found:#?}");
        found[0].clone()
    }

    #[track_caller]
    fn assert_at(f: &Finding, severity: Severity, field: &str, offset: u64) {
        assert_eq!(
            (f.severity, f.field.as_deref(), f.offset),
            (severity, Some(field), Some(offset)),
            "{f:#?}"
        );
    }

    /// What the image reads as, through the backend.
    fn read_disk(bytes: &[u8]) -> Vec<u8> {
        let fs = Arc::new(MemFileSystem::new());
        fs.insert("/i.vhd", Arc::new(MemStorage::from_bytes(bytes.to_vec())));
        let reg = Registry::builtin_with_provider(fs);
        let img = reg
            .open_as("vhd", Path::new("/i.vhd"), OpenFlags::READ_ONLY)
            .unwrap();
        let mut b = vec![0u8; usize::try_from(img.size()).unwrap()];
        img.read_at(0, &mut b).unwrap();
        b
    }

    #[test]
    fn sound_images_check_clean() {
        for (name, img) in [
            ("dynamic", dynamic(false)),
            ("differencing", dynamic(true)),
            ("fixed", fixed()),
        ] {
            assert_eq!(dry(&img), [], "{name}");
            let (found, after) = repaired(&img);
            assert!(found.is_empty() && after == img, "{name}: {found:?}");
        }
        // The builder's images are what the backend reads.
        assert_eq!(read_disk(&dynamic(false))[1024], 3);
    }

    #[test]
    fn a_damaged_end_footer_is_rewritten_from_the_copy() {
        let good = dynamic(false);
        let n = good.len();
        for (at, field) in [
            (n - 512, "footer cookie"),
            (n - 512 + 100, "footer checksum"),
        ] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            let f = only(&bad);
            assert_at(&f, Severity::Error, field, (n - 512) as u64);
            assert!(f.message.contains("repairable"), "{f:?}");
            let (fixed, after) = repaired(&bad);
            assert!(fixed.len() == 1 && fixed[0].repaired, "{fixed:?}");
            assert!(
                after == good,
                "{field}: the file is not the sound image again"
            );
            assert_eq!(dry(&after), []);
        }
    }

    #[test]
    fn a_footer_cut_off_is_written_after_the_last_block() {
        let good = dynamic(false);
        let n = good.len();
        // Cut right after the last block, or in the middle of the footer: the last 512 bytes
        // are block data then, which the footer must not overwrite. (A footer cut by one byte
        // is a sound 511-byte footer of the images older than Virtual PC 2004.)
        for cut in [n - 512, n - 504, n - 300, n - 2] {
            let f = only(&good[..cut]);
            assert_at(&f, Severity::Error, "footer cookie", (cut - 512) as u64);
            let (fixed, after) = repaired(&good[..cut]);
            assert!(fixed.len() == 1 && fixed[0].repaired, "{cut}: {fixed:?}");
            assert!(
                fixed[0].message.contains(&format!("{:#x}", n - 512)),
                "{fixed:?}"
            );
            assert!(
                after == good,
                "{cut}: the footer is not right after the last block"
            );
            assert_eq!(dry(&after), []);
        }
    }

    #[test]
    fn a_damaged_or_different_footer_copy_is_rewritten_from_the_end() {
        let good = dynamic(true);
        let mut damaged = good.clone();
        damaged[70] ^= 1;
        let mut different = good.clone();
        different[24..28].copy_from_slice(&1234u32.to_be_bytes());
        seal_footer(&mut different[..512]);
        for (bad, says) in [(damaged, "damaged"), (different, "differs")] {
            let f = only(&bad);
            assert_at(&f, Severity::Error, "footer copy", 0);
            assert!(f.message.contains(says), "{f:?}");
            let (fixed, after) = repaired(&bad);
            assert!(fixed.len() == 1 && fixed[0].repaired, "{fixed:?}");
            assert!(after == good, "{says}");
        }
    }

    #[test]
    fn a_damaged_dynamic_header_is_an_error_and_blocks_every_repair() {
        let mut bad = dynamic(false);
        bad[512 + 700] ^= 1;
        let f = only(&bad);
        assert_at(&f, Severity::Error, "dynamic header checksum", 512);
        // With the copy at offset 0 damaged as well, nothing is written.
        bad[70] ^= 1;
        let found = dry(&bad);
        assert_eq!(found.len(), 2, "{found:#?}");
        let (kept, after) = repaired(&bad);
        assert!(
            after == bad,
            "an image with a damaged header was written to"
        );
        assert!(kept.iter().all(|f| !f.repaired), "{kept:?}");
        assert!(kept[0].message.contains("not repaired"), "{kept:?}");
    }

    /// `dynamic(false)` with BAT entry `i` set to `sector`.
    fn with_entry(i: usize, sector: u32) -> Vec<u8> {
        let mut b = dynamic(false);
        b[1536 + 4 * i..1540 + 4 * i].copy_from_slice(&sector.to_be_bytes());
        b
    }

    #[test]
    fn bat_entries_outside_the_file_or_into_structures_are_errors() {
        let n = dynamic(false).len() as u64;
        // Outside the file, and reaching into the footer.
        for sector in [0x00FF_FFFF, (n / 512) as u32 - 2] {
            let f = only(&with_entry(1, sector));
            assert_at(&f, Severity::Error, "BAT entry 1", 1540);
            assert!(f.message.contains("before the footer"), "{f:?}");
        }
        // Into the footer copy, the dynamic header and the BAT: each names what it hits.
        for (sector, hits) in [
            (0, "the footer copy"),
            (2, "the dynamic header"),
            (3, "the BAT"),
        ] {
            let found = dry(&with_entry(1, sector));
            let f = found
                .iter()
                .find(|f| f.message.contains(hits))
                .unwrap_or_else(|| panic!("{hits}: {found:#?}"));
            assert_at(f, Severity::Error, "BAT entry 1", 1540);
            assert!(
                found.iter().all(|f| f.severity == Severity::Error),
                "{found:#?}"
            );
            let (_, after) = repaired(&with_entry(1, sector));
            assert!(after == with_entry(1, sector), "{hits}: repaired");
        }
    }

    #[test]
    fn two_blocks_sharing_space_are_an_error_at_the_second() {
        let f = only(&with_entry(1, 4));
        assert_at(&f, Severity::Error, "BAT entry 1", 1540);
        assert!(
            f.message.contains("block 1 at 0x800") && f.message.contains("overlaps block 0"),
            "{f:?}"
        );
    }

    #[test]
    fn many_bad_entries_make_a_short_report() {
        // 64 entries, all pointing far outside the file.
        let mut b = dynamic(false);
        b[512 + 28..512 + 32].copy_from_slice(&64u32.to_be_bytes());
        seal_header(&mut b[512..1536]);
        b[1536..1536 + 256].fill(0x7F);
        let found = dry(&b);
        let errors: Vec<_> = found
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .collect();
        assert_eq!(errors.len(), MAX_LISTED + 1, "{found:#?}");
        assert!(
            errors[MAX_LISTED].message.starts_with("32 more"),
            "{found:#?}"
        );
        // Block 0's old space is no BAT entry's any more.
        assert!(
            found
                .iter()
                .any(|f| f.severity == Severity::Warning && f.offset == Some(2048)),
            "{found:#?}"
        );
    }

    #[test]
    fn leaked_space_is_a_warning_and_only_a_trailing_leak_is_cut() {
        let good = dynamic(false);
        let n = good.len();
        // Block 0 moved up by a block and its bitmap (9 sectors): that space is leaked.
        let mut gap = good[..2048].to_vec();
        gap[1536..1540].copy_from_slice(&13u32.to_be_bytes());
        gap.extend([0u8; 4608]);
        gap.extend(&good[2048..]);
        let f = only(&gap);
        assert_at(&f, Severity::Warning, "leaked space", 2048);
        assert!(f.message.contains("4608 bytes"), "{f:?}");
        let (kept, after) = repaired(&gap);
        assert!(after == gap && !kept[0].repaired, "{kept:?}");
        // Moved up by less (alignment padding, as Windows leaves): nothing to report.
        let mut pad = good[..2048].to_vec();
        pad[1536..1540].copy_from_slice(&12u32.to_be_bytes());
        pad.extend([0u8; 4096]);
        pad.extend(&good[2048..]);
        assert_eq!(dry(&pad), []);
        let mut short_tail = good[..n - 512].to_vec();
        short_tail.extend([0u8; 4096]);
        short_tail.extend(&good[n - 512..]);
        assert_eq!(dry(&short_tail), []);

        // 8 KiB of nothing between the last block and the footer.
        let mut tail = good[..n - 512].to_vec();
        tail.extend([0xAB; 8192]);
        tail.extend(&good[n - 512..]);
        let f = only(&tail);
        assert_at(&f, Severity::Warning, "leaked space", (n - 512) as u64);
        assert!(f.message.contains("repairable"), "{f:?}");
        let (fixed, after) = repaired(&tail);
        assert!(fixed.len() == 1 && fixed[0].repaired, "{fixed:?}");
        assert!(
            after == good,
            "the footer did not move down, or the file was not cut"
        );
        // With the footer damaged too, one repair writes it after the last block and cuts.
        let mut both = tail.clone();
        let m = both.len();
        both[m - 400] ^= 1;
        let found = dry(&both);
        assert_eq!(found.len(), 2, "{found:#?}");
        let (fixed, after) = repaired(&both);
        assert!(fixed.iter().all(|f| f.repaired), "{fixed:?}");
        assert!(after == good);
    }

    #[test]
    fn cutting_a_trailing_leak_survives_a_power_cut_at_every_step() {
        let good = dynamic(false);
        let n = good.len();
        let mut tail = good[..n - 512].to_vec();
        tail.extend([0xAB; 8192]);
        tail.extend(&good[n - 512..]);
        let steps = {
            let s = FaultyStorage::from_bytes(tail.clone());
            check(&s, true).unwrap();
            s.op_count()
        };
        for cut in 0..=steps {
            for mode in [LossMode::DropAll, LossMode::KeepAll, LossMode::Random(cut)] {
                let s = FaultyStorage::from_bytes(tail.clone());
                s.cut_power_after(cut);
                let _ = check(&s, true);
                let after = s.after_power_loss(mode);
                // Old or new, the image is sound and reads the same.
                let found = dry(&after);
                assert!(
                    found.iter().all(|f| f.severity == Severity::Warning),
                    "{cut}: {found:#?}"
                );
                assert!(read_disk(&after) == read_disk(&good), "{cut}");
            }
        }
    }

    #[test]
    fn a_fixed_image_shorter_than_its_disk_is_an_error() {
        let mut short = fixed();
        let foot = short.split_off(8192);
        short.truncate(4096);
        short.extend(&foot);
        let f = only(&short);
        assert_at(&f, Severity::Error, "footer current size", 4096);
        let (_, after) = repaired(&short);
        assert!(after == short);
        // A fixed image's first sector is data: a damaged footer has no copy to come from.
        let mut bad = fixed();
        let n = bad.len();
        bad[n - 1] ^= 1;
        let f = only(&bad);
        assert_at(&f, Severity::Error, "footer checksum", (n - 512) as u64);
        assert!(f.message.contains("no sound VHD footer"), "{f:?}");
    }

    #[test]
    fn parent_locators_outside_the_file_or_over_blocks_are_errors() {
        let good = dynamic(true);
        let n = good.len() as u64;
        for (offset, says) in [(n, "do not lie inside"), (2560 + 512, "overlaps")] {
            let mut bad = good.clone();
            bad[512 + 592..512 + 600].copy_from_slice(&offset.to_be_bytes());
            seal_header(&mut bad[512..1536]);
            let found = dry(&bad);
            let f = found
                .iter()
                .find(|f| f.field.as_deref() == Some("parent locator 0"))
                .unwrap_or_else(|| panic!("{found:#?}"));
            assert_at(f, Severity::Error, "parent locator 0", 512 + 576);
            assert!(f.message.contains(says), "{f:?}");
        }
    }

    #[test]
    fn image_repair_refuses_a_read_only_open_and_checks_from_the_file() {
        let mut bad = dynamic(false);
        bad[70] ^= 1;
        let fs = Arc::new(MemFileSystem::new());
        let storage = Arc::new(MemStorage::from_bytes(bad.clone()));
        fs.insert("/i.vhd", storage.clone());
        let reg = Registry::builtin_with_provider(fs);
        let img = reg
            .open_as("vhd", Path::new("/i.vhd"), OpenFlags::READ_ONLY)
            .unwrap();
        let e = img.repair(false).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ReadOnly, "{e}");
        assert!(e.to_string().contains("/i.vhd"), "{e}");
        let report = img.repair(true).unwrap();
        assert_eq!(report.findings.len(), 1, "{report:?}");
        assert_eq!(report.findings[0].field.as_deref(), Some("footer copy"));
        // The check reads the file again: damage after the open is found too.
        storage.write_all_at(512 + 700, &[0x55]).unwrap();
        let report = img.repair(true).unwrap();
        assert!(
            report
                .findings
                .iter()
                .any(|f| f.field.as_deref() == Some("dynamic header checksum")),
            "{report:?}"
        );
        assert!(storage.to_vec()[..512] == bad[..512]);
    }
}
