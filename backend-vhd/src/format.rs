//! On-disk structures of the *Virtual Hard Disk Image Format Specification* (the footer, the
//! dynamic disk header and its parent locator entries) and their parsing into checked domain
//! values. No I/O here: callers hand in the bytes.

use uuid::Uuid;
use vd_core::{Error, ErrorKind, Result};
use zerocopy::big_endian::{U16, U32, U64};
use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout, Unaligned};

/// Size of the hard disk footer.
pub const FOOTER_SIZE: usize = 512;
/// Size of the dynamic disk header.
pub const HEADER_SIZE: usize = 1024;
/// The footer's cookie.
pub const FOOTER_COOKIE: [u8; 8] = *b"conectix";
/// The dynamic disk header's cookie.
pub const HEADER_COOKIE: [u8; 8] = *b"cxsparse";
/// The sector size of every VHD.
pub const SECTOR: u64 = 512;
/// A BAT entry (and a fixed image's data offset, in 32 bits) that points nowhere.
pub const UNALLOCATED: u32 = 0xFFFF_FFFF;

/// The smallest block size accepted: one sector.
pub const MIN_BLOCK_SIZE: u32 = 512;
/// The largest block size accepted (the specification's default is 2 MiB; 256 MiB bounds the
/// sector bitmap at 64 KiB).
pub const MAX_BLOCK_SIZE: u32 = 256 << 20;
/// The most BAT entries accepted: 2^24 entries (a 64 MiB table) cover 2040 GiB, the format's
/// largest disk, with blocks of 128 KiB or more.
pub const MAX_TABLE_ENTRIES: u32 = 1 << 24;
/// The longest parent locator read (a path, in bytes).
pub const MAX_LOCATOR_LEN: u32 = 64 << 10;

/// The hard disk footer, as stored (big-endian).
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawFooter {
    cookie: [u8; 8],
    features: U32,
    file_format_version: U32,
    data_offset: U64,
    time_stamp: U32,
    creator_application: [u8; 4],
    creator_version: U32,
    creator_host_os: [u8; 4],
    original_size: U64,
    current_size: U64,
    cylinders: U16,
    heads: u8,
    sectors_per_track: u8,
    disk_type: U32,
    checksum: U32,
    unique_id: [u8; 16],
    saved_state: u8,
    reserved: [u8; 427],
}
const _: () = assert!(size_of::<RawFooter>() == FOOTER_SIZE);
const _: () = assert!(std::mem::offset_of!(RawFooter, checksum) == 64);
const _: () = assert!(std::mem::offset_of!(RawFooter, unique_id) == 68);

/// One parent locator entry of the dynamic disk header.
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawLocator {
    platform_code: [u8; 4],
    platform_data_space: U32,
    platform_data_length: U32,
    reserved: U32,
    platform_data_offset: U64,
}
const _: () = assert!(size_of::<RawLocator>() == 24);

/// The dynamic disk header, as stored (big-endian).
#[repr(C)]
#[derive(FromBytes, IntoBytes, KnownLayout, Immutable, Unaligned)]
pub struct RawHeader {
    cookie: [u8; 8],
    data_offset: U64,
    table_offset: U64,
    header_version: U32,
    max_table_entries: U32,
    block_size: U32,
    checksum: U32,
    parent_unique_id: [u8; 16],
    parent_time_stamp: U32,
    reserved1: U32,
    parent_unicode_name: [u8; 512],
    locators: [RawLocator; 8],
    reserved2: [u8; 256],
}
const _: () = assert!(size_of::<RawHeader>() == HEADER_SIZE);
const _: () = assert!(std::mem::offset_of!(RawHeader, checksum) == 36);
const _: () = assert!(std::mem::offset_of!(RawHeader, parent_unicode_name) == 64);
const _: () = assert!(std::mem::offset_of!(RawHeader, locators) == 576);

/// The one's complement of the sum of every byte of `bytes` except the four at
/// `checksum_at` (the specification's checksum of the footer and of the dynamic header).
pub fn checksum(bytes: &[u8], checksum_at: usize) -> u32 {
    let skip = checksum_at..checksum_at.saturating_add(4);
    let sum = bytes
        .iter()
        .enumerate()
        .filter(|(i, _)| !skip.contains(i))
        .fold(0u32, |acc, (_, &b)| acc.wrapping_add(u32::from(b)));
    !sum
}

/// The disk type of the footer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskType {
    /// Type 2: the data, then the footer.
    Fixed,
    /// Type 3: a dynamic header, a BAT and blocks.
    Dynamic,
    /// Type 4: a dynamic image whose unwritten sectors read from a parent.
    Differencing,
}

/// A checked footer.
#[derive(Debug, Clone)]
pub struct Footer {
    /// Offset of the dynamic header (`u64::MAX` for fixed images).
    pub data_offset: u64,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub time_stamp: u32,
    /// Creator application, four bytes (`vpc `, `win `, `qemu`, ...).
    pub creator_application: [u8; 4],
    /// Creator version, major in the high 16 bits.
    pub creator_version: u32,
    /// Creator host OS (`Wi2k`, `Mac `).
    pub creator_host_os: [u8; 4],
    /// Size at creation.
    pub original_size: u64,
    /// The virtual size.
    pub current_size: u64,
    /// Cylinders, heads and sectors per track.
    pub chs: (u16, u8, u8),
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// The image's unique ID.
    pub unique_id: Uuid,
    /// Whether the image is in a saved state.
    pub saved_state: bool,
}

fn invalid(field: &str, offset: u64, message: String) -> Error {
    Error::new(ErrorKind::InvalidHeader, message)
        .with_field(field.to_string())
        .with_offset(offset)
}

/// Parses a footer read at `offset` of the file: cookie, checksum, disk type and size.
///
/// # Errors
/// `InvalidHeader` naming the field.
pub fn parse_footer(bytes: &[u8; FOOTER_SIZE], offset: u64) -> Result<Footer> {
    let raw = RawFooter::ref_from_bytes(bytes.as_slice())
        .map_err(|_| invalid("footer", offset, "footer has the wrong size".into()))?;
    if raw.cookie != FOOTER_COOKIE {
        return Err(invalid(
            "footer cookie",
            offset,
            format!(
                "no VHD footer (cookie {:?}, not \"conectix\")",
                raw.cookie.escape_ascii().to_string()
            ),
        ));
    }
    let want = checksum(bytes, 64);
    if raw.checksum.get() != want {
        return Err(invalid(
            "footer checksum",
            offset,
            format!(
                "footer checksum mismatch: stored {:#010x}, computed {want:#010x}",
                raw.checksum.get()
            ),
        ));
    }
    let disk_type = match raw.disk_type.get() {
        2 => DiskType::Fixed,
        3 => DiskType::Dynamic,
        4 => DiskType::Differencing,
        t => {
            return Err(Error::new(
                ErrorKind::NotSupported,
                format!("VHD disk type {t} (only 2 fixed, 3 dynamic and 4 differencing exist)"),
            )
            .with_field("footer disk type")
            .with_offset(offset));
        }
    };
    let current_size = raw.current_size.get();
    if current_size % SECTOR != 0 {
        return Err(invalid(
            "footer current size",
            offset,
            format!("current size {current_size} is not a whole number of 512-byte sectors"),
        ));
    }
    Ok(Footer {
        data_offset: raw.data_offset.get(),
        time_stamp: raw.time_stamp.get(),
        creator_application: raw.creator_application,
        creator_version: raw.creator_version.get(),
        creator_host_os: raw.creator_host_os,
        original_size: raw.original_size.get(),
        current_size,
        chs: (raw.cylinders.get(), raw.heads, raw.sectors_per_track),
        disk_type,
        unique_id: Uuid::from_bytes(raw.unique_id),
        saved_state: raw.saved_state != 0,
    })
}

/// A parent locator entry of the dynamic header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locator {
    /// Platform code: `W2ku`, `W2ru`, `MacX`, ...
    pub code: [u8; 4],
    /// Where the locator's data lies in the file.
    pub offset: u64,
    /// Its length in bytes.
    pub length: u32,
}

/// A checked dynamic disk header.
#[derive(Debug, Clone)]
pub struct Header {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes per block, a power of two.
    pub block_size: u32,
    /// The parent's unique ID (differencing images).
    pub parent_unique_id: Uuid,
    /// The parent's time stamp (differencing images; 0 in real Windows children).
    pub parent_time_stamp: u32,
    /// The parent's file name, decoded from UTF-16 BE up to the first NUL.
    pub parent_unicode_name: String,
    /// Locator entries with a platform code.
    pub locators: Vec<Locator>,
}

/// Parses a dynamic header read at `offset`: cookie, checksum, block size and BAT bounds
/// (`file_len` is the image file's length).
///
/// # Errors
/// `InvalidHeader` naming the field.
pub fn parse_header(bytes: &[u8; HEADER_SIZE], offset: u64, file_len: u64) -> Result<Header> {
    let raw = RawHeader::ref_from_bytes(bytes.as_slice())
        .map_err(|_| invalid("dynamic header", offset, "header has the wrong size".into()))?;
    if raw.cookie != HEADER_COOKIE {
        return Err(invalid(
            "dynamic header cookie",
            offset,
            "no dynamic disk header (cookie is not \"cxsparse\")".into(),
        ));
    }
    let want = checksum(bytes, 36);
    if raw.checksum.get() != want {
        return Err(invalid(
            "dynamic header checksum",
            offset,
            format!(
                "dynamic header checksum mismatch: stored {:#010x}, computed {want:#010x}",
                raw.checksum.get()
            ),
        ));
    }
    let block_size = raw.block_size.get();
    if !block_size.is_power_of_two() || !(MIN_BLOCK_SIZE..=MAX_BLOCK_SIZE).contains(&block_size) {
        return Err(invalid(
            "dynamic header block size",
            offset,
            format!(
                "block size {block_size} is not a power of two from {MIN_BLOCK_SIZE} to {MAX_BLOCK_SIZE}"
            ),
        ));
    }
    let entries = raw.max_table_entries.get();
    if entries > MAX_TABLE_ENTRIES {
        return Err(invalid(
            "dynamic header max table entries",
            offset,
            format!("{entries} BAT entries, more than the limit {MAX_TABLE_ENTRIES}"),
        ));
    }
    let table_offset = raw.table_offset.get();
    let table_end = table_offset.checked_add(u64::from(entries).saturating_mul(4));
    if table_end.is_none_or(|end| end > file_len) {
        return Err(invalid(
            "dynamic header table offset",
            offset,
            format!(
                "BAT of {entries} entries at {table_offset:#x} does not fit in the file of {file_len} bytes"
            ),
        ));
    }
    let units: Vec<u16> = raw
        .parent_unicode_name
        .chunks_exact(2)
        .map(|c| {
            u16::from_be_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .take_while(|&u| u != 0)
        .collect();
    let parent_unicode_name = String::from_utf16_lossy(&units);
    let locators = raw
        .locators
        .iter()
        .filter(|l| l.platform_code != [0; 4])
        .map(|l| Locator {
            code: l.platform_code,
            offset: l.platform_data_offset.get(),
            length: l.platform_data_length.get(),
        })
        .collect();
    Ok(Header {
        table_offset,
        max_table_entries: entries,
        block_size,
        parent_unique_id: Uuid::from_bytes(raw.parent_unique_id),
        parent_time_stamp: raw.parent_time_stamp.get(),
        parent_unicode_name,
        locators,
    })
}

/// Decodes a parent locator's bytes into a path: UTF-16 LE for `W2ku`/`W2ru`, a UTF-8 file URL
/// for `MacX`; `None` for other platforms or undecodable data.
pub fn decode_locator(code: &[u8; 4], data: &[u8]) -> Option<String> {
    match code {
        b"W2ku" | b"W2ru" => {
            let units: Vec<u16> = data
                .chunks_exact(2)
                .map(|c| {
                    u16::from_le_bytes([
                        c.first().copied().unwrap_or(0),
                        c.get(1).copied().unwrap_or(0),
                    ])
                })
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16(&units).ok()
        }
        b"MacX" => {
            let s = std::str::from_utf8(data).ok()?.trim_end_matches('\0');
            let s = s.strip_prefix("file://").unwrap_or(s);
            let s = s.strip_prefix("localhost").unwrap_or(s);
            Some(s.to_string())
        }
        _ => None,
    }
}

/// The footer's Features field: bit 1 (reserved) is always set.
pub const FEATURES_RESERVED: u32 = 2;
/// The footer's and the dynamic header's format version, 1.0.
pub const VERSION_1_0: u32 = 0x0001_0000;
/// The largest virtual size vd creates: 2040 GiB, as Hyper-V and QEMU (the BAT addresses the
/// file in 32-bit sector numbers, so no image file can exceed 2 TiB).
pub const MAX_CREATE_SIZE: u64 = 2040 << 30;

/// Stores the checksum of a footer (`checksum_at` 64) or a dynamic header (36) in `bytes`.
pub fn seal(bytes: &mut [u8], checksum_at: usize) {
    let sum = checksum(bytes, checksum_at);
    if let Some(dst) = bytes.get_mut(checksum_at..checksum_at.saturating_add(4)) {
        dst.copy_from_slice(&sum.to_be_bytes());
    }
}

/// What a new footer holds.
#[derive(Debug, Clone)]
pub struct NewFooter {
    /// Fixed, dynamic or differencing.
    pub disk_type: DiskType,
    /// The virtual size.
    pub size: u64,
    /// Cylinders, heads and sectors per track.
    pub chs: (u16, u8, u8),
    /// The image's unique ID.
    pub unique_id: Uuid,
    /// Seconds since 2000-01-01 00:00:00 UTC.
    pub time_stamp: u32,
}

/// A sealed footer: creator `vd  ` (so that QEMU takes the current size, not the CHS product,
/// as the size), host `Wi2k`, the dynamic header at 512 for dynamic and differencing images.
pub fn encode_footer(f: &NewFooter) -> [u8; FOOTER_SIZE] {
    let mut bytes = [0u8; FOOTER_SIZE];
    if let Ok(raw) = RawFooter::mut_from_bytes(bytes.as_mut_slice()) {
        raw.cookie = FOOTER_COOKIE;
        raw.features = U32::new(FEATURES_RESERVED);
        raw.file_format_version = U32::new(VERSION_1_0);
        raw.data_offset = U64::new(match f.disk_type {
            DiskType::Fixed => u64::MAX,
            DiskType::Dynamic | DiskType::Differencing => FOOTER_SIZE as u64,
        });
        raw.time_stamp = U32::new(f.time_stamp);
        raw.creator_application = *b"vd  ";
        raw.creator_version = U32::new(VERSION_1_0);
        raw.creator_host_os = *b"Wi2k";
        raw.original_size = U64::new(f.size);
        raw.current_size = U64::new(f.size);
        raw.cylinders = U16::new(f.chs.0);
        raw.heads = f.chs.1;
        raw.sectors_per_track = f.chs.2;
        raw.disk_type = U32::new(match f.disk_type {
            DiskType::Fixed => 2,
            DiskType::Dynamic => 3,
            DiskType::Differencing => 4,
        });
        raw.unique_id = *f.unique_id.as_bytes();
    }
    seal(&mut bytes, 64);
    bytes
}

/// Changes a stored footer's fields, keeping the others (reserved bytes included), and seals it.
pub fn edit_footer(bytes: &mut [u8; FOOTER_SIZE], edit: impl FnOnce(&mut FooterFields<'_>)) {
    if let Ok(raw) = RawFooter::mut_from_bytes(bytes.as_mut_slice()) {
        edit(&mut FooterFields(raw));
    }
    seal(bytes, 64);
}

/// The editable fields of a stored footer ([`edit_footer`]).
pub struct FooterFields<'a>(&'a mut RawFooter);

impl FooterFields<'_> {
    /// Sets the virtual size (Current Size).
    pub fn set_current_size(&mut self, size: u64) {
        self.0.current_size = U64::new(size);
    }
    /// Sets the CHS geometry.
    pub fn set_chs(&mut self, chs: (u16, u8, u8)) {
        self.0.cylinders = U16::new(chs.0);
        self.0.heads = chs.1;
        self.0.sectors_per_track = chs.2;
    }
    /// Sets the unique ID.
    pub fn set_unique_id(&mut self, id: Uuid) {
        self.0.unique_id = *id.as_bytes();
    }
}

/// One parent locator to store: its platform code, where its data lies, its data's length and
/// the space reserved for it (bytes, a multiple of 512).
#[derive(Debug, Clone, Copy)]
pub struct NewLocator {
    /// `W2ru`, `W2ku`.
    pub code: [u8; 4],
    /// Where the data lies in the file.
    pub offset: u64,
    /// The data's length in bytes.
    pub length: u32,
    /// The space reserved, in bytes (stored in sectors, as the specification says).
    pub space: u32,
}

/// What a new dynamic header holds.
#[derive(Debug, Clone)]
pub struct NewHeader<'a> {
    /// Offset of the BAT.
    pub table_offset: u64,
    /// Entries in the BAT.
    pub max_table_entries: u32,
    /// Bytes per block.
    pub block_size: u32,
    /// For a differencing image: the parent's unique ID, its time stamp, its file name and
    /// the locators.
    pub parent: Option<(Uuid, u32, &'a str, &'a [NewLocator])>,
}

/// A sealed dynamic header.
pub fn encode_header(h: &NewHeader<'_>) -> [u8; HEADER_SIZE] {
    let mut bytes = [0u8; HEADER_SIZE];
    if let Ok(raw) = RawHeader::mut_from_bytes(bytes.as_mut_slice()) {
        raw.cookie = HEADER_COOKIE;
        raw.data_offset = U64::new(u64::MAX);
        raw.table_offset = U64::new(h.table_offset);
        raw.header_version = U32::new(VERSION_1_0);
        raw.max_table_entries = U32::new(h.max_table_entries);
        raw.block_size = U32::new(h.block_size);
        if let Some((id, stamp, name, locators)) = h.parent {
            raw.parent_unique_id = *id.as_bytes();
            raw.parent_time_stamp = U32::new(stamp);
            set_unicode_name(raw, name);
            for (slot, l) in raw.locators.iter_mut().zip(locators) {
                slot.platform_code = l.code;
                slot.platform_data_space = U32::new(l.space.div_ceil(SECTOR as u32));
                slot.platform_data_length = U32::new(l.length);
                slot.platform_data_offset = U64::new(l.offset);
            }
        }
    }
    seal(&mut bytes, 36);
    bytes
}

/// Changes a stored dynamic header's fields, keeping the others, and seals it.
pub fn edit_header(bytes: &mut [u8; HEADER_SIZE], edit: impl FnOnce(&mut HeaderFields<'_>)) {
    if let Ok(raw) = RawHeader::mut_from_bytes(bytes.as_mut_slice()) {
        edit(&mut HeaderFields(raw));
    }
    seal(bytes, 36);
}

/// The editable fields of a stored dynamic header ([`edit_header`]).
pub struct HeaderFields<'a>(&'a mut RawHeader);

impl HeaderFields<'_> {
    /// Sets the number of BAT entries.
    pub fn set_max_table_entries(&mut self, n: u32) {
        self.0.max_table_entries = U32::new(n);
    }
    /// Sets the BAT's offset.
    pub fn set_table_offset(&mut self, at: u64) {
        self.0.table_offset = U64::new(at);
    }
    /// Sets the parent's unique ID.
    pub fn set_parent_unique_id(&mut self, id: Uuid) {
        self.0.parent_unique_id = *id.as_bytes();
    }
    /// Sets the Parent Unicode Name (UTF-16 BE, cut at 255 code units).
    pub fn set_parent_unicode_name(&mut self, name: &str) {
        set_unicode_name(self.0, name);
    }
    /// Sets the data length of the locator with platform `code` (the caller has written the
    /// data).
    pub fn set_locator_length(&mut self, code: [u8; 4], length: u32) {
        for l in self
            .0
            .locators
            .iter_mut()
            .filter(|l| l.platform_code == code)
        {
            l.platform_data_length = U32::new(length);
        }
    }
}

/// Stores `name` as the Parent Unicode Name: UTF-16 BE, at most 255 code units and a NUL.
fn set_unicode_name(raw: &mut RawHeader, name: &str) {
    raw.parent_unicode_name = [0; 512];
    for (dst, unit) in raw
        .parent_unicode_name
        .chunks_exact_mut(2)
        .take(255)
        .zip(name.encode_utf16())
    {
        dst.copy_from_slice(&unit.to_be_bytes());
    }
}

/// `path` as a locator's data: UTF-16 LE, as `W2ru` and `W2ku` store it.
pub fn encode_locator(path: &str) -> Vec<u8> {
    path.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

/// The VHD geometry of a disk of `size` bytes, by the specification's algorithm (at most
/// 65535 × 16 × 255 sectors).
pub fn chs_for(size: u64) -> (u16, u8, u8) {
    let g = vd_core::Geometry::synthesize_pchs(size);
    (
        u16::try_from(g.cylinders).unwrap_or(u16::MAX),
        u8::try_from(g.heads).unwrap_or(u8::MAX),
        u8::try_from(g.sectors).unwrap_or(u8::MAX),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn footer(disk_type: u32, size: u64) -> [u8; FOOTER_SIZE] {
        let mut b = [0u8; FOOTER_SIZE];
        b[..8].copy_from_slice(&FOOTER_COOKIE);
        b[48..56].copy_from_slice(&size.to_be_bytes());
        b[60..64].copy_from_slice(&disk_type.to_be_bytes());
        let c = checksum(&b, 64);
        b[64..68].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn footer_checks_cookie_checksum_type_and_size() {
        let f = parse_footer(&footer(2, 1 << 20), 0).unwrap();
        assert_eq!((f.disk_type, f.current_size), (DiskType::Fixed, 1 << 20));
        let mut bad = footer(2, 1 << 20);
        bad[100] = 1;
        let e = parse_footer(&bad, 7).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::InvalidHeader);
        assert_eq!(e.context().field.as_deref(), Some("footer checksum"));
        assert_eq!(e.context().offset, Some(7));
        let e = parse_footer(&footer(5, 512), 0).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::NotSupported);
        let e = parse_footer(&footer(3, 513), 0).unwrap_err();
        assert_eq!(e.context().field.as_deref(), Some("footer current size"));
        let mut cookie = footer(2, 512);
        cookie[0] = b'x';
        let e = parse_footer(&cookie, 0).unwrap_err();
        assert_eq!(e.context().field.as_deref(), Some("footer cookie"));
    }

    fn header(entries: u32, block: u32, table: u64) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[..8].copy_from_slice(&HEADER_COOKIE);
        b[16..24].copy_from_slice(&table.to_be_bytes());
        b[28..32].copy_from_slice(&entries.to_be_bytes());
        b[32..36].copy_from_slice(&block.to_be_bytes());
        for (i, u) in "p.vhd".encode_utf16().enumerate() {
            b[64 + 2 * i..66 + 2 * i].copy_from_slice(&u.to_be_bytes());
        }
        let c = checksum(&b, 36);
        b[36..40].copy_from_slice(&c.to_be_bytes());
        b
    }

    #[test]
    fn header_bounds_block_size_and_bat() {
        let h = parse_header(&header(4, 2 << 20, 1536), 512, 1536 + 16).unwrap();
        assert_eq!((h.max_table_entries, h.block_size), (4, 2 << 20));
        assert_eq!(h.parent_unicode_name, "p.vhd");
        let field = |b: &[u8; HEADER_SIZE], len| {
            parse_header(b, 512, len)
                .unwrap_err()
                .context()
                .field
                .clone()
                .unwrap()
        };
        assert_eq!(
            field(&header(4, 3 << 20, 1536), 4096),
            "dynamic header block size"
        );
        assert_eq!(
            field(&header(4, 256, 1536), 4096),
            "dynamic header block size"
        );
        assert_eq!(
            field(&header(5, 2 << 20, 1536), 1536 + 16),
            "dynamic header table offset"
        );
        assert_eq!(
            field(&header(MAX_TABLE_ENTRIES + 1, 4096, 0), u64::MAX),
            "dynamic header max table entries"
        );
        assert_eq!(
            field(&header(1, 4096, u64::MAX - 1), u64::MAX),
            "dynamic header table offset"
        );
        let mut bad = header(4, 2 << 20, 1536);
        bad[600] ^= 1;
        assert_eq!(field(&bad, 4096), "dynamic header checksum");
    }

    #[test]
    fn locators_decode_by_platform() {
        let w: Vec<u8> = ".\\p.vhd"
            .encode_utf16()
            .flat_map(u16::to_le_bytes)
            .collect();
        assert_eq!(decode_locator(b"W2ru", &w).as_deref(), Some(".\\p.vhd"));
        assert_eq!(
            decode_locator(b"MacX", b"file://localhost/a/p.vhd").as_deref(),
            Some("/a/p.vhd")
        );
        assert_eq!(decode_locator(b"Mac ", b"alias"), None);
    }
}
