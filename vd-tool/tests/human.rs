//! The human output: one warning once on stderr, counts that mean what they say, singular
//! for one, aligned `key: value` lines.

use std::path::Path;
use std::process::Output;

use vd_tests::corpus::decompress;
use vd_tests::process::{stderr, stdout};
use vd_tests::qemu::{self, DirtyLog, dirty_vhdx};
use vd_tests::s;

vd_tests::vd_tool_fns!();

#[test]
fn the_dirty_log_warning_is_printed_once_on_stderr() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dirty.vhdx");
    dirty_vhdx(&img, &DirtyLog::default());
    let note = "to replay; replayed in memory";
    for cmd in ["info", "map", "dump", "check"] {
        let o = vd_in(dir.path(), &[cmd, "dirty.vhdx"]);
        assert!(
            !stdout(&o).contains(note),
            "{cmd}: the warning is on stdout: {}",
            stdout(&o)
        );
        assert_eq!(
            stderr(&o).matches(note).count(),
            1,
            "{cmd}: once on stderr: {}",
            stderr(&o)
        );
    }
    // check reports the dirty log once, as its finding, and says so in the singular.
    let o = vd_in(dir.path(), &["check", "dirty.vhdx"]);
    let out = stdout(&o);
    assert_eq!(out.matches("the log holds").count(), 1, "{out}");
    assert!(
        out.contains("the log holds 1 entry that had not been replayed"),
        "{out}"
    );
    assert!(out.contains("1 error was found on the image."), "{out}");
}

/// The value of `key: value` in `text`, the columns of spaces trimmed.
fn value<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.trim_start().strip_prefix(&format!("{key}:")))
        .unwrap_or_else(|| panic!("no {key:?} in:\n{text}"))
        .trim()
}

/// `info --output json`'s block counts of `img` in `dir`, and the human text.
fn block_counts(dir: &Path, img: &str) -> (serde_json::Value, String) {
    let o = vd_in(dir, &["info", "--output", "json", img]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("a JSON document");
    let text = stdout(&vd_in(dir, &["info", img]));
    (v["format_specific"]["blocks"].clone(), text)
}

#[test]
fn info_counts_blocks_by_what_the_bat_says() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Our create leaves blocks NOT_PRESENT: 8 blocks of 1 MiB, data in blocks 1 and 2, block 5
    // zeroed (a ZERO entry), the others never written.
    let ok = |o: Output| assert!(o.status.success(), "{}", stderr(&o));
    ok(vd_in(
        d,
        &[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            "vd.vhdx",
            "8M",
        ],
    ));
    ok(vd_in(
        d,
        &[
            "io",
            "-c",
            "write -P 1 1M 2M",
            "-c",
            "write -z 5M 1M",
            "vd.vhdx",
        ],
    ));
    let (blocks, text) = block_counts(d, "vd.vhdx");
    let want = serde_json::json!({
        "total": 8, "allocated": 2, "partially_allocated": 0, "zero": 1, "unallocated": 5
    });
    assert_eq!(blocks, want);
    assert_eq!(value(&text, "total"), "8");
    assert_eq!(value(&text, "allocated"), "2");
    assert_eq!(value(&text, "zero"), "1");
    assert_eq!(value(&text, "unallocated"), "5");
    assert!(!text.contains("data_blocks"), "{text}");

    // qemu marks never-written blocks ZERO, and allocates a block written with zeros.
    let img = d.join("q.vhdx");
    qemu::create(&img, Some("block_size=1M"), "8M");
    qemu::io(&[
        "-f",
        "vhdx",
        "-c",
        "write -P 0xab 1M 2M",
        "-c",
        "write -P 0 5M 1M",
        s(&img),
    ]);
    let (blocks, _) = block_counts(d, "q.vhdx");
    let want = serde_json::json!({
        "total": 8, "allocated": 3, "partially_allocated": 0, "zero": 5, "unallocated": 0
    });
    assert_eq!(blocks, want);
}

#[test]
fn info_shows_the_log_and_parent_locator_as_aligned_lines() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    decompress(
        "dissect.hypervisor/differencing.avhdx.gz",
        &d.join("child.avhdx"),
    );
    let text = stdout(&vd_in(d, &["info", "child.avhdx"]));
    assert_eq!(value(&text, "log_state"), "clean");
    assert_eq!(value(&text, "replay"), "none");
    assert_eq!(
        value(&text, "relative_path"),
        r".\Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx"
    );
    assert_eq!(
        value(&text, "parent_linkage"),
        "{ff34003b-11ed-4cf8-a166-b2be05e20b80}"
    );
    assert_eq!(value(&text, "block_size"), "2 MiB (2097152 bytes)");
    assert!(!text.contains("\":"), "no JSON in the text: {text}");
    // In every group of lines at one indent, values start in one column.
    let mut columns: Vec<(usize, usize)> = Vec::new();
    for line in text.lines() {
        let indent = line.len() - line.trim_start().len();
        // A line at a smaller indent ends the groups deeper than it.
        columns.retain(|&(i, _)| i <= indent);
        let Some(colon) = line.find(": ") else {
            continue;
        };
        let column = colon + 2 + line[colon + 2..].len() - line[colon + 2..].trim_start().len();
        match columns.last() {
            Some(&(i, c)) if i == indent => {
                assert_eq!(c, column, "misaligned line {line:?} in:\n{text}");
            }
            _ => columns.push((indent, column)),
        }
    }
}

#[test]
fn check_says_1_error_in_the_singular() {
    let dir = tempfile::tempdir().unwrap();
    decompress(
        "adversarial/bat-shared-block.vhdx.gz",
        &dir.path().join("shared.vhdx"),
    );
    let o = vd_in(dir.path(), &["check", "shared.vhdx"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stdout(&o).ends_with("\n1 error was found on the image.\n"),
        "{}",
        stdout(&o)
    );
    decompress(
        "adversarial/huge-bat-length.vhdx.gz",
        &dir.path().join("huge.vhdx"),
    );
    let o = vd_in(dir.path(), &["check", "huge.vhdx"]);
    assert!(
        stdout(&o).ends_with("\n3 errors were found on the image.\n"),
        "{}",
        stdout(&o)
    );
}
