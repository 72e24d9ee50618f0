//! `vd-tool check` sees everything (issue 11), on corpus images damaged one byte at a time:
//! - a damaged redundant copy (either header, either region table, or two region tables that
//!   differ) is a finding (exit 1) naming the copy; plain `check` changes no byte;
//! - `check -r` rewrites it from the good copy: `check` is then clean, `qemu-img check` is
//!   clean, and the disk reads as `expected.json` records, before and after;
//! - an image with both headers damaged is a finding that `check -r` refuses without writing;
//! - a differencing image is checked with its chain: a missing or mismatched parent is a
//!   finding naming the path looked at, a present parent is opened, matched and checked;
//! - counts in the human output are singular for one.

use std::path::Path;

use serde_json::Value;
use vd_tests::corpus::{decompress, expected};
use vd_tests::hash::{sha256_file, sha256_sparse};
use vd_tests::process::{output, show, stdout};
use vd_tests::vhdx::{HEADERS, REGION_TABLE_SIZE, REGION_TABLES, fix_crc};
use vd_tests::{s, vd_tool_fns};

vd_tool_fns!();

/// Hyper-V's dynamic image and QEMU's: each has two valid headers and two equal region tables.
const IMAGES: [&str; 2] = [
    "dissect.hypervisor/dynamic.vhdx.gz",
    "qemu-iotests/iotest-dynamic-1G.vhdx.bz2",
];

/// The differencing child and the stand-in for its parent, under the name the child records.
const CHILD: &str = "dissect.hypervisor/differencing.avhdx.gz";
const PARENT: &str = "synthetic/differencing-avhdx-standin-parent.vhdx.gz";
const PARENT_NAME: &str = "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx";

/// The SHA-256 of the whole disk of `file` that `expected.json` records.
fn content_sha256(file: &str) -> String {
    expected()
        .into_iter()
        .find(|i| i["file"] == file && i["content_sha256"].is_string())
        .and_then(|i| i["content_sha256"].as_str().map(str::to_string))
        .unwrap_or_else(|| panic!("{file}: no content_sha256 in expected.json"))
}

/// The SHA-256 of the disk `img` reads as (through `vd-tool convert -O raw`).
fn disk_sha256(img: &Path) -> String {
    let raw = img.with_extension("raw");
    vd_ok(&["convert", "-O", "raw", s(img), s(&raw)]);
    let sum = sha256_sparse(&raw);
    std::fs::remove_file(&raw).unwrap();
    sum
}

/// Changes one bit of the byte at `at` in the file.
fn flip(img: &Path, at: usize) {
    let mut b = std::fs::read(img).unwrap();
    b[at] ^= 1;
    std::fs::write(img, b).unwrap();
}

/// Runs `vd-tool check ARGS`, requires exit `code`, and requires that a plain check (no `-r`)
/// left every byte of `img` as it was. Returns the standard output.
#[track_caller]
fn check(args: &[&str], img: &Path, code: i32) -> String {
    let before = sha256_file(img);
    let mut all = vec!["check"];
    all.extend(args);
    all.push(s(img));
    let o = vd(&all);
    assert_eq!(o.status.code(), Some(code), "check {args:?}: {}", show(&o));
    if !args.contains(&"-r") {
        assert_eq!(sha256_file(img), before, "check {args:?} changed the file");
    }
    stdout(&o)
}

/// `qemu-img check` on `img` passes.
#[track_caller]
fn qemu_check_clean(img: &Path) {
    let o = output("qemu-img", &["check", "-f", "vhdx", s(img)]);
    assert_eq!(o.status.code(), Some(0), "qemu-img check: {}", show(&o));
}

#[test]
fn a_damaged_copy_is_a_finding_and_check_r_rewrites_it_from_the_good_one() {
    // (what, byte changed, the copy's name in the finding)
    let damages = [
        ("header 1 checksum", HEADERS[0] + 4, "header 1"),
        ("header 2 signature", HEADERS[1], "header 2"),
        (
            "region table 1 checksum",
            REGION_TABLES[0] + 4,
            "region table 1",
        ),
        // The first entry's file offset: the checksum no longer matches.
        (
            "region table 2 entry",
            REGION_TABLES[1] + 16 + 8,
            "region table 2",
        ),
    ];
    for file in IMAGES {
        let want = content_sha256(file);
        for (what, at, copy) in damages {
            let dir = tempfile::tempdir().unwrap();
            let img = dir.path().join("a.vhdx");
            decompress(file, &img);
            qemu_check_clean(&img);
            flip(&img, at);
            let case = format!("{file}, {what}");
            assert_eq!(
                disk_sha256(&img),
                want,
                "{case}: read through the good copy"
            );

            let text = check(&[], &img, 1);
            assert!(
                text.contains(&format!("ERROR: {copy} at ")),
                "{case}: {text}"
            );
            assert!(
                text.contains("1 error was found on the image."),
                "{case}: {text}"
            );
            let json: Value = serde_json::from_str(&check(&["--output", "json"], &img, 1)).unwrap();
            assert_eq!(json["errors"], 1, "{case}: {json}");
            assert_eq!(json["findings"][0]["field"], copy, "{case}: {json}");
            assert_eq!(json["findings"][0]["repaired"], false, "{case}: {json}");

            let len = std::fs::metadata(&img).unwrap().len();
            let text = check(&["-r"], &img, 0);
            assert!(
                text.contains(&format!("Repaired: {copy} at ")),
                "{case}: {text}"
            );
            assert!(text.contains("1 problem was repaired."), "{case}: {text}");
            assert_eq!(std::fs::metadata(&img).unwrap().len(), len, "{case}");

            let text = check(&[], &img, 0);
            assert_eq!(text, "No errors were found on the image.\n", "{case}");
            qemu_check_clean(&img);
            assert_eq!(disk_sha256(&img), want, "{case}: the disk changed");
            let b = std::fs::read(&img).unwrap();
            let table = |i: usize| &b[REGION_TABLES[i]..REGION_TABLES[i] + REGION_TABLE_SIZE];
            assert!(table(0) == table(1), "{case}: the region tables differ");
        }
    }
}

#[test]
fn region_tables_that_differ_are_a_finding_and_check_r_copies_the_first_over_the_second() {
    let file = IMAGES[0];
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhdx");
    decompress(file, &img);
    let mut b = std::fs::read(&img).unwrap();
    // The first entry's Required flag, re-sealed: a valid table that lists other regions.
    b[REGION_TABLES[1] + 16 + 28] ^= 1;
    fix_crc(&mut b, REGION_TABLES[1], REGION_TABLE_SIZE);
    std::fs::write(&img, &b).unwrap();

    let text = check(&[], &img, 1);
    assert!(text.contains("the two region tables differ"), "{text}");
    check(&["-r"], &img, 0);
    check(&[], &img, 0);
    qemu_check_clean(&img);
    let b = std::fs::read(&img).unwrap();
    let table = |i: usize| &b[REGION_TABLES[i]..REGION_TABLES[i] + REGION_TABLE_SIZE];
    assert!(table(0) == table(1), "the region tables still differ");
    assert_eq!(disk_sha256(&img), content_sha256(file));
}

#[test]
fn both_headers_damaged_is_a_finding_and_check_r_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhdx");
    decompress(IMAGES[0], &img);
    flip(&img, HEADERS[0] + 4);
    flip(&img, HEADERS[1] + 4);
    let text = check(&[], &img, 1);
    assert!(text.contains("neither header is valid"), "{text}");
    assert!(text.contains("1 error was found on the image."), "{text}");
    let before = sha256_file(&img);
    let text = check(&["-r"], &img, 1);
    assert!(
        text.contains("not repaired, the image was left unchanged"),
        "{text}"
    );
    assert!(text.contains("neither header is valid"), "{text}");
    assert_eq!(
        sha256_file(&img),
        before,
        "check -r wrote to an image it cannot repair"
    );
}

#[test]
fn check_opens_the_whole_chain_and_a_missing_or_wrong_parent_is_a_finding() {
    let dir = tempfile::tempdir().unwrap();
    let child = dir.path().join("child.avhdx");
    let parent = dir.path().join(PARENT_NAME);
    decompress(CHILD, &child);

    // No parent: a finding naming where it was looked for.
    let text = check(&[], &child, 1);
    assert!(text.contains("parent image not found"), "{text}");
    assert!(
        text.contains(&format!("{} (not found)", parent.display())),
        "{text}"
    );
    assert!(text.contains("1 error was found on the image."), "{text}");

    // Another image where the parent should be: a finding naming both identities.
    decompress(IMAGES[0], &parent);
    let text = check(&[], &child, 1);
    assert!(
        text.contains(&format!("parent found at {}", parent.display())),
        "{text}"
    );
    assert!(text.contains("but the child expects"), "{text}");

    // The parent: opened, matched and checked, and named in the output.
    decompress(PARENT, &parent);
    let sums = (sha256_file(&child), sha256_file(&parent));
    let text = check(&[], &child, 0);
    assert!(
        text.contains(&format!(
            "Parent image {}: found, linked and checked.",
            parent.display()
        )),
        "{text}"
    );
    let json: Value = serde_json::from_str(&check(&["--output", "json"], &child, 0)).unwrap();
    assert_eq!(json["parents"][0], s(&parent), "{json}");
    assert_eq!(json["errors"], 0, "{json}");

    // A damaged parent is a finding of the chain, naming the parent; it is never repaired,
    // even by `check -r` on the child. With the child's own damage, that is two errors.
    flip(&parent, HEADERS[0] + 4);
    flip(&child, HEADERS[0] + 4);
    let damaged_parent = sha256_file(&parent);
    let text = check(&[], &child, 1);
    assert!(
        text.contains(&format!(
            "ERROR: parent image {}: header 1 at ",
            parent.display()
        )),
        "{text}"
    );
    assert!(text.contains("2 errors were found on the image."), "{text}");
    let text = check(&["-r"], &child, 1);
    assert!(text.contains("Repaired: header 1 at "), "{text}");
    assert!(text.contains("1 error was found on the image."), "{text}");
    assert_eq!(
        sha256_file(&parent),
        damaged_parent,
        "check -r wrote to the parent"
    );
    assert_ne!(
        sha256_file(&child),
        sums.0,
        "the child's header was not rewritten"
    );
}

/// The corpus VHDs `check` runs on: Windows' dynamic and fixed images and QEMU's dynamic one.
const VHDS: [&str; 3] = [
    "vhd/dissect.hypervisor/dynamic.vhd.gz",
    "vhd/dissect.hypervisor/fixed.vhd.gz",
    "vhd/synthetic/qemu-convert-random-24M.vhd.gz",
];

/// `content_sha256` of corpus VHD `file` (`vhd/...`) in `tests/data/vhd/expected.json`.
fn vhd_content_sha256(file: &str) -> String {
    let path = vd_tests::corpus::dir().join("vhd/expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| format!("vhd/{}", i["file"].as_str().unwrap()) == file)
        .and_then(|i| i["content_sha256"].as_str())
        .unwrap_or_else(|| panic!("{file}: no content_sha256"))
        .to_string()
}

#[test]
fn check_on_corpus_vhds_is_clean_and_writes_nothing() {
    for file in VHDS {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("a.vhd");
        decompress(file, &img);
        let text = check(&[], &img, 0);
        assert_eq!(text, "No errors were found on the image.\n", "{file}");
        let json: Value = serde_json::from_str(&check(&["--output", "json"], &img, 0)).unwrap();
        assert_eq!(json["format"], "vhd", "{file}: {json}");
        assert_eq!(json["findings"], serde_json::json!([]), "{file}: {json}");
    }
}

/// A damaged end footer of a dynamic VHD is an error naming the checksum and its offset (exit
/// 1); `check -r all` rewrites it from the copy at offset 0, after which a check is clean and
/// the disk reads the same.
#[test]
fn a_damaged_vhd_footer_is_a_finding_and_check_r_repairs_it() {
    let file = VHDS[0];
    let want = vhd_content_sha256(file);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhd");
    decompress(file, &img);
    let n = std::fs::metadata(&img).unwrap().len() as usize;
    flip(&img, n - 512 + 100);
    assert_eq!(disk_sha256(&img), want, "read through the footer copy");

    let text = check(&[], &img, 1);
    assert!(
        text.contains("ERROR: the footer at the end of the file is damaged"),
        "{text}"
    );
    assert!(
        text.contains(&format!("at offset {:#x}", n - 512)),
        "{text}"
    );
    assert!(text.contains("1 error was found on the image."), "{text}");
    let json: Value = serde_json::from_str(&check(&["--output", "json"], &img, 1)).unwrap();
    assert_eq!(json["errors"], 1, "{json}");
    assert_eq!(json["findings"][0]["field"], "footer checksum", "{json}");
    assert_eq!(json["findings"][0]["offset"], n - 512, "{json}");
    assert_eq!(json["findings"][0]["repaired"], false, "{json}");

    let text = check(&["-r", "all"], &img, 0);
    assert!(text.contains("Repaired: the footer at the end"), "{text}");
    assert!(text.contains("1 problem was repaired."), "{text}");
    assert_eq!(std::fs::metadata(&img).unwrap().len() as usize, n);
    let text = check(&[], &img, 0);
    assert_eq!(text, "No errors were found on the image.\n");
    assert_eq!(disk_sha256(&img), want, "the disk changed");
}
