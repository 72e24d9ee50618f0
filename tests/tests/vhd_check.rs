//! `backend_vhd::check` over every VHD of the corpus (`tests/data/vhd/expected.json`), from the
//! file and through `Image::repair(true)` of a read-only open:
//! - images expected to read have no error findings, and no warnings but those listed in
//!   `KNOWN_WARNINGS` (none: the gaps Windows, Hyper-V and Virtual PC leave between
//!   structures, all smaller than a block, are alignment padding, not leaks), so a new one
//!   fails the test until it is looked at;
//! - the two dfvfs images whose footers both fail their checksum are errors naming it;
//! - a check never changes a byte of the file;
//! - a copy of every dynamic image with its end footer damaged is repaired from the footer
//!   copy back to the original bytes.

use std::collections::BTreeSet;

use backend_raw as _;
use backend_vhd::check::check;
use backend_vhdx as _;
use serde_json::Value;
use vd_core::{FileStorage, OpenFlags, OpenMode, Registry, Severity};
use vd_tests::corpus::{decompress, dir, image_name};
use vd_tests::hash::sha256_file;

/// Warnings the check finds in real images: (image, field, offset, what the message says).
/// None so far: the unused space in real images is padding smaller than a block (Windows
/// puts each block's data on a 4 KiB boundary, 3.5 KiB after the previous block, and its
/// footer where the next block's bitmap would go; Virtual PC pads its BAT to 0x40000, and
/// Hyper-V 2012 R2 leaves 4 KiB after its BAT, its footer where the next block's bitmap
/// would go), which the check does not call a leak.
const KNOWN_WARNINGS: &[(&str, &str, u64, &str)] = &[];

/// Every VHD of the corpus once, with its expectation.
fn images() -> Vec<(String, String)> {
    let path = dir().join("vhd/expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for case in v["images"].as_array().unwrap() {
        let file = case["file"].as_str().unwrap().to_string();
        if seen.insert(file.clone()) {
            out.push((file, case["expect"].as_str().unwrap().to_string()));
        }
    }
    out
}

#[test]
fn every_corpus_vhd_checks_as_expected_and_is_never_written() {
    let tmp = tempfile::tempdir().unwrap();
    let mut warnings = BTreeSet::new();
    let all = images();
    assert!(all.len() >= 16, "{}", all.len());
    for (file, expect) in all {
        let image = tmp.path().join(image_name(&file));
        decompress(&format!("vhd/{file}"), &image);
        let before = sha256_file(&image);
        let storage = FileStorage::open(&image, OpenMode::ReadOnly).unwrap();
        let findings = check(&storage, false).unwrap().findings;
        drop(storage);
        // The same through the opened image, where it opens.
        if let Ok(img) = Registry::builtin().open_as("vhd", &image, OpenFlags::READ_ONLY) {
            assert_eq!(img.repair(true).unwrap().findings, findings, "{file}");
            img.close(false).unwrap();
        }
        assert_eq!(
            sha256_file(&image),
            before,
            "{file}: the check changed the file"
        );
        let errors: Vec<_> = findings
            .iter()
            .filter(|f| f.severity == Severity::Error)
            .collect();
        match expect.as_str() {
            "read" | "refuse:parent" => assert!(errors.is_empty(), "{file}: {errors:#?}"),
            "read-or-refuse:checksum" => assert!(
                errors
                    .iter()
                    .any(|f| f.field.as_deref().is_some_and(|x| x.contains("checksum"))),
                "{file}: {findings:#?}"
            ),
            other => panic!("{file}: unknown expectation {other}"),
        }
        for f in findings.iter().filter(|f| f.severity == Severity::Warning) {
            warnings.insert((
                file.clone(),
                f.field.clone().unwrap(),
                f.offset.unwrap(),
                f.message.clone(),
            ));
        }
        std::fs::remove_file(&image).unwrap();
    }
    let known: BTreeSet<_> = KNOWN_WARNINGS
        .iter()
        .map(|(file, field, offset, _)| ((*file).to_string(), (*field).to_string(), *offset))
        .collect();
    let found: BTreeSet<_> = warnings
        .iter()
        .map(|(file, field, offset, _)| (file.clone(), field.clone(), *offset))
        .collect();
    assert_eq!(found, known, "{warnings:#?}");
    for (file, field, offset, says) in KNOWN_WARNINGS {
        assert!(
            warnings
                .iter()
                .any(|w| w.0 == *file && w.1 == *field && w.2 == *offset && w.3.contains(says)),
            "{file}: {field} at {offset:#x} no longer says {says:?}"
        );
    }
}

/// The end footer of every dynamic or differencing corpus image whose footers are sound,
/// damaged in one byte: the check names it, and the repair writes the copy back, giving the
/// original file.
#[test]
fn a_damaged_end_footer_of_a_corpus_vhd_is_repaired_from_its_copy() {
    let tmp = tempfile::tempdir().unwrap();
    let mut repaired = 0;
    for (file, expect) in images() {
        if expect == "read-or-refuse:checksum" {
            continue;
        }
        let image = tmp.path().join(image_name(&file));
        decompress(&format!("vhd/{file}"), &image);
        let original = std::fs::read(&image).unwrap();
        if original[..8] != *b"conectix" {
            // A fixed image: no copy at offset 0.
            continue;
        }
        let mut bad = original.clone();
        let n = bad.len();
        bad[n - 512 + 64] ^= 0x10;
        std::fs::write(&image, &bad).unwrap();
        let storage = FileStorage::open(&image, OpenMode::ReadWrite).unwrap();
        let found = check(&storage, false).unwrap().findings;
        let f = found
            .iter()
            .find(|f| f.field.as_deref() == Some("footer checksum"))
            .unwrap_or_else(|| panic!("{file}: {found:#?}"));
        assert_eq!(f.offset, Some((n - 512) as u64), "{file}");
        let fixed = check(&storage, true).unwrap().findings;
        assert!(fixed.len() == 1 && fixed[0].repaired, "{file}: {fixed:#?}");
        assert_eq!(check(&storage, false).unwrap().findings, [], "{file}");
        drop(storage);
        let after = std::fs::read(&image).unwrap();
        assert!(after == original, "{file}: not the original file again");
        std::fs::remove_file(&image).unwrap();
        repaired += 1;
    }
    assert!(repaired >= 8, "{repaired}");
}
