//! The parent locator ([MS-VHDX] 2.6.2.6): parsing it from a metadata item and building one.
//!
//! A locator is a header (the locator type and the pair count), one entry per key/value pair
//! (offsets and lengths into the item), then the keys and values as UTF-16LE strings.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use uuid::Uuid;
use vd_core::{Error, ParentCandidates, Result, StorageProvider};
use zerocopy::little_endian::{U16, U32};
use zerocopy::{FromBytes, IntoBytes};

use crate::error::Corruption;
use crate::format::{MAX_LOCATOR_ENTRIES, ParentLocatorEntry, ParentLocatorHeader};
use crate::guid::{Guid, PARENT_LOCATOR_TYPE_VHDX};

/// The parent locator's key/value pairs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParentLocator {
    /// Every pair, keys as stored.
    pub entries: BTreeMap<String, String>,
}

impl ParentLocator {
    /// The value for `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries.get(key).map(String::as_str)
    }

    /// `parent_linkage` as a UUID.
    pub fn linkage(&self) -> Option<Uuid> {
        self.get("parent_linkage").and_then(parse_guid)
    }

    /// `parent_linkage2` as a UUID, where present and not nil.
    pub fn linkage2(&self) -> Option<Uuid> {
        self.get("parent_linkage2")
            .and_then(parse_guid)
            .filter(|u| !u.is_nil())
    }
}

/// Parses a GUID string with or without braces, in any case.
pub fn parse_guid(s: &str) -> Option<Uuid> {
    let t = s.trim();
    let t = t.strip_prefix('{').unwrap_or(t);
    let t = t.strip_suffix('}').unwrap_or(t);
    Uuid::parse_str(t).ok()
}

fn decode_utf16(
    buf: &[u8],
    off: u32,
    len: u16,
    what: &str,
) -> std::result::Result<String, Corruption> {
    let bad = |reason: &str| Corruption::ParentLocator {
        reason: format!("{what} at {off:#x} (length {len}): {reason}"),
    };
    if len == 0 || !len.is_multiple_of(2) {
        return Err(bad("length is zero or odd"));
    }
    let start = usize::try_from(off).map_err(|_| bad("outside the item"))?;
    let bytes = buf
        .get(start..start.saturating_add(usize::from(len)))
        .ok_or_else(|| bad("outside the item"))?;
    // The length is even (checked above), so there is no remainder.
    let units: Vec<u16> = bytes
        .as_chunks::<2>()
        .0
        .iter()
        .map(|c| u16::from_le_bytes(*c))
        .collect();
    if units.contains(&0) {
        return Err(bad("contains a NUL"));
    }
    String::from_utf16(&units).map_err(|_| bad("not valid UTF-16"))
}

/// Parses a parent locator item (2.6.2.6).
///
/// # Errors
/// [`Corruption::ParentLocator`] naming what is wrong.
pub fn parse_locator(buf: &[u8]) -> std::result::Result<ParentLocator, Corruption> {
    let bad = |reason: String| Corruption::ParentLocator { reason };
    let (hdr, rest) = ParentLocatorHeader::read_from_prefix(buf)
        .map_err(|_| bad("shorter than its header".into()))?;
    if hdr.locator_type.to_uuid() != PARENT_LOCATOR_TYPE_VHDX {
        return Err(bad(format!("unknown locator type {}", hdr.locator_type)));
    }
    let count = hdr.key_value_count.get();
    if count > MAX_LOCATOR_ENTRIES {
        return Err(bad(format!(
            "{count} entries, at most {MAX_LOCATOR_ENTRIES} are accepted"
        )));
    }
    let (entries, _) = <[ParentLocatorEntry]>::ref_from_prefix_with_elems(rest, usize::from(count))
        .map_err(|_| bad(format!("{count} entries do not fit in the item")))?;
    let mut loc = ParentLocator::default();
    for e in entries {
        let key = decode_utf16(buf, e.key_offset.get(), e.key_length.get(), "key")?;
        let value = decode_utf16(buf, e.value_offset.get(), e.value_length.get(), "value")?;
        if loc.entries.insert(key.clone(), value).is_some() {
            return Err(bad(format!("key {key:?} appears twice")));
        }
    }
    let linkage = loc
        .get("parent_linkage")
        .ok_or_else(|| bad("parent_linkage is missing".into()))?;
    if parse_guid(linkage).is_none() {
        return Err(bad(format!("parent_linkage {linkage:?} is not a GUID")));
    }
    if !["relative_path", "volume_path", "absolute_win32_path"]
        .iter()
        .any(|k| loc.get(k).is_some())
    {
        return Err(bad(
            "no parent path (relative_path, volume_path, absolute_win32_path)".into(),
        ));
    }
    Ok(loc)
}

/// Encodes `s` as UTF-16LE bytes.
pub(crate) fn encode_utf16(s: &str) -> Vec<u8> {
    s.encode_utf16().flat_map(u16::to_le_bytes).collect()
}

impl ParentLocator {
    /// A locator holding `pairs` (a later pair with the same key replaces an earlier one).
    pub fn from_pairs<K: Into<String>>(pairs: impl IntoIterator<Item = (K, String)>) -> Self {
        Self {
            entries: pairs.into_iter().map(|(k, v)| (k.into(), v)).collect(),
        }
    }

    /// The item bytes: header, entries in key order, then each key and value.
    ///
    /// # Errors
    /// `InvalidArgument` when there are more than [`MAX_LOCATOR_ENTRIES`] pairs or a key or
    /// value is too long for its 16-bit length field.
    pub fn to_bytes(&self) -> Result<Vec<u8>> {
        let count = u16::try_from(self.entries.len())
            .ok()
            .filter(|c| *c <= MAX_LOCATOR_ENTRIES)
            .ok_or_else(|| {
                Error::invalid_argument(format!(
                    "a parent locator holds at most {MAX_LOCATOR_ENTRIES} pairs, not {}",
                    self.entries.len()
                ))
            })?;
        // count <= MAX_LOCATOR_ENTRIES (256), so this is at most 20 + 12 * 256 bytes.
        let header_len = size_of::<ParentLocatorEntry>()
            .checked_mul(usize::from(count))
            .and_then(|n| n.checked_add(size_of::<ParentLocatorHeader>()))
            .ok_or_else(|| Error::invalid_argument("parent locator too large"))?;
        let mut strings = Vec::new();
        let mut entries = Vec::new();
        let too_long = |what: &str, k: &str| {
            Error::invalid_argument(format!("parent locator {what} of {k:?} is too long"))
        };
        let offset = |n: usize, what: &str, k: &str| {
            header_len
                .checked_add(n)
                .and_then(|o| u32::try_from(o).ok())
                .ok_or_else(|| too_long(what, k))
        };
        for (k, v) in &self.entries {
            let (kb, vb) = (encode_utf16(k), encode_utf16(v));
            let key_offset = offset(strings.len(), "key", k)?;
            strings.extend_from_slice(&kb);
            let value_offset = offset(strings.len(), "value", k)?;
            strings.extend_from_slice(&vb);
            entries.push(ParentLocatorEntry {
                key_offset: U32::new(key_offset),
                value_offset: U32::new(value_offset),
                key_length: U16::new(u16::try_from(kb.len()).map_err(|_| too_long("key", k))?),
                value_length: U16::new(u16::try_from(vb.len()).map_err(|_| too_long("value", k))?),
            });
        }
        let mut out = ParentLocatorHeader {
            locator_type: Guid::from_uuid(PARENT_LOCATOR_TYPE_VHDX),
            reserved: U16::new(0),
            key_value_count: U16::new(count),
        }
        .as_bytes()
        .to_vec();
        for e in &entries {
            out.extend_from_slice(e.as_bytes());
        }
        out.extend_from_slice(&strings);
        Ok(out)
    }
}

/// Where the parent of the image at `image` may be, most likely first, without duplicates:
/// `relative_path` resolved against the image's folder (through `provider`), then
/// `volume_path` and `absolute_win32_path` mapped to this host where possible (a drive letter
/// to `/mnt/<letter>`), then each path's file name next to the image.
pub(crate) fn candidate_paths(
    loc: &ParentLocator,
    image: &Path,
    provider: &dyn StorageProvider,
) -> Vec<PathBuf> {
    let mut c = ParentCandidates::new(image, provider);
    if let Some(rel) = loc.get("relative_path") {
        c.relative(rel);
    }
    for key in ["volume_path", "absolute_win32_path"] {
        if let Some(v) = loc.get(key) {
            c.windows_absolute(v);
        }
    }
    c.into_paths()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ParentLocator {
        ParentLocator::from_pairs([
            (
                "parent_linkage",
                "{3f2504e0-4f89-11d3-9a0c-0305e82c3301}".to_string(),
            ),
            ("relative_path", r".\parent.vhdx".to_string()),
            ("absolute_win32_path", r"C:\disks\parent.vhdx".to_string()),
        ])
    }

    #[test]
    fn round_trip() {
        let loc = sample();
        let bytes = loc.to_bytes().unwrap();
        assert_eq!(parse_locator(&bytes).unwrap(), loc);
        assert_eq!(
            loc.linkage(),
            Some(uuid::uuid!("3f2504e0-4f89-11d3-9a0c-0305e82c3301"))
        );
        assert_eq!(loc.linkage2(), None);
    }

    #[test]
    fn layout_is_header_entries_then_strings() {
        let loc = ParentLocator::from_pairs([
            (
                "parent_linkage",
                "{00000000-0000-0000-0000-000000000001}".to_string(),
            ),
            ("relative_path", "a".to_string()),
        ]);
        let bytes = loc.to_bytes().unwrap();
        let (h, rest) = ParentLocatorHeader::read_from_prefix(&bytes).unwrap();
        assert_eq!(h.key_value_count.get(), 2);
        assert_eq!(h.locator_type.to_uuid(), PARENT_LOCATOR_TYPE_VHDX);
        let (e, _) = <[ParentLocatorEntry]>::ref_from_prefix_with_elems(rest, 2).unwrap();
        // 20-byte header, two 12-byte entries, then "parent_linkage" (28 bytes).
        assert_eq!(e[0].key_offset.get(), 44);
        assert_eq!(e[0].key_length.get(), 28);
        assert_eq!(e[0].value_offset.get(), 72);
        assert_eq!(e[1].value_length.get(), 2);
        assert_eq!(bytes.len(), 44 + 28 + 76 + 26 + 2);
    }

    #[test]
    fn parse_rejects_bad_locators() {
        let good = sample().to_bytes().unwrap();
        // Unknown locator type.
        let mut b = good.clone();
        b[0] ^= 1;
        assert!(matches!(
            parse_locator(&b),
            Err(Corruption::ParentLocator { .. })
        ));
        // Shorter than its header.
        assert!(parse_locator(&good[..10]).is_err());
        // An entry pointing outside the item.
        let mut b = good.clone();
        b[20..24].copy_from_slice(&0xFFFF_0000u32.to_le_bytes());
        assert!(parse_locator(&b).is_err());
        // Odd string length.
        let mut b = good.clone();
        b[28..30].copy_from_slice(&3u16.to_le_bytes());
        assert!(parse_locator(&b).is_err());
        // No parent_linkage.
        let b = ParentLocator::from_pairs([("relative_path", "x".to_string())])
            .to_bytes()
            .unwrap();
        assert!(parse_locator(&b).is_err());
        // No path.
        let b = ParentLocator::from_pairs([(
            "parent_linkage",
            "{00000000-0000-0000-0000-000000000001}".to_string(),
        )])
        .to_bytes()
        .unwrap();
        assert!(parse_locator(&b).is_err());
    }

    #[test]
    fn build_rejects_overlong_values() {
        let loc = ParentLocator::from_pairs([("relative_path", "x".repeat(40_000))]);
        assert!(loc.to_bytes().is_err());
    }

    #[test]
    fn guids_parse_with_or_without_braces() {
        let u = uuid::uuid!("3f2504e0-4f89-11d3-9a0c-0305e82c3301");
        assert_eq!(
            parse_guid("{3F2504E0-4F89-11D3-9A0C-0305E82C3301}"),
            Some(u)
        );
        assert_eq!(
            parse_guid(" 3f2504e0-4f89-11d3-9a0c-0305e82c3301 "),
            Some(u)
        );
        assert_eq!(parse_guid("nope"), None);
    }
}
