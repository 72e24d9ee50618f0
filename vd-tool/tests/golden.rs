//! Golden-output tests: the stdout of `info`, `check`, `map`, `map --visual`, `layout`, `dump`,
//! `probe` and `backends`, human and `--output json` (`map`'s as JSON Lines; the grid has none),
//! over corpus images, compared with the files in `tests/golden/`.
//!
//! Set `VD_UPDATE_GOLDEN=1` to rewrite the files from what the commands print now; review the
//! changes (`git diff vd-tool/tests/golden`) before committing them.
//!
//! The images are decompressed into a temporary folder under fixed names and the commands run
//! there with relative paths, so the output names no temporary path. The one host-dependent
//! value, the bytes a file occupies on the host (`disk size`, `actual_size`), is replaced with
//! a placeholder.

use std::path::{Path, PathBuf};
use std::process::Command;

use vd_tests::corpus::decompress;

const VD: &str = env!("CARGO_BIN_EXE_vd-tool");

/// Stands for the host-dependent allocated size.
const HOST_SIZE: &str = "<host-dependent>";

/// The corpus images, under the names the golden files use.
const IMAGES: &[(&str, &str)] = &[
    ("dissect.hypervisor/dynamic.vhdx.gz", "dynamic.vhdx"),
    ("dissect.hypervisor/fixed.vhdx.gz", "fixed.vhdx"),
    ("synthetic/qemu-patched-4k-logical.vhdx.gz", "4k.vhdx"),
    ("synthetic/qemu-blkdebug-dirty-log.vhdx.gz", "dirty.vhdx"),
    ("dissect.hypervisor/differencing.avhdx.gz", "child.avhdx"),
    (
        "synthetic/differencing-avhdx-standin-parent.vhdx.gz",
        // The name the child's parent locator gives.
        "Generation 1_49C4BAF3-4B25-4406-8C4B-D39E65C32385.avhdx",
    ),
];

/// The images the per-image commands run on: the four kinds and the child (read through its
/// parent).
const SUBJECTS: &[&str] = &[
    "dynamic.vhdx",
    "fixed.vhdx",
    "4k.vhdx",
    "dirty.vhdx",
    "child.avhdx",
];

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden")
}

/// `text` with the host-dependent allocated size replaced: the `disk size:` line of the human
/// `info`, and `actual_size` in JSON documents.
fn normalise(text: &str, json: bool) -> String {
    if json {
        let mut v: serde_json::Value = serde_json::from_str(text)
            .unwrap_or_else(|e| panic!("not one JSON document ({e}):\n{text}"));
        fn walk(v: &mut serde_json::Value) {
            match v {
                serde_json::Value::Object(m) => {
                    if let Some(a) = m.get_mut("actual_size") {
                        *a = HOST_SIZE.into();
                    }
                    m.values_mut().for_each(walk);
                }
                serde_json::Value::Array(items) => items.iter_mut().for_each(walk),
                _ => {}
            }
        }
        walk(&mut v);
        let mut out = serde_json::to_string_pretty(&v).expect("a document");
        out.push('\n');
        out
    } else {
        text.lines()
            .map(|l| match l.strip_prefix("disk size:") {
                Some(rest) => {
                    let pad = rest.len() - rest.trim_start().len();
                    format!("disk size:{}{HOST_SIZE}\n", " ".repeat(pad))
                }
                None => format!("{l}\n"),
            })
            .collect()
    }
}

/// A unified-diff-like listing of the lines that differ (longest common subsequence).
fn diff(want: &str, got: &str) -> String {
    let (a, b): (Vec<&str>, Vec<&str>) = (want.lines().collect(), got.lines().collect());
    let mut lcs = vec![vec![0usize; b.len() + 1]; a.len() + 1];
    for i in (0..a.len()).rev() {
        for j in (0..b.len()).rev() {
            lcs[i][j] = if a[i] == b[j] {
                lcs[i + 1][j + 1] + 1
            } else {
                lcs[i + 1][j].max(lcs[i][j + 1])
            };
        }
    }
    let (mut i, mut j, mut out) = (0, 0, String::new());
    while i < a.len() || j < b.len() {
        if i < a.len() && j < b.len() && a[i] == b[j] {
            i += 1;
            j += 1;
        } else if j < b.len() && (i == a.len() || lcs[i][j + 1] >= lcs[i + 1][j]) {
            out.push_str(&format!("@@ line {} @@\n+{}\n", j + 1, b[j]));
            j += 1;
        } else {
            out.push_str(&format!("@@ line {} @@\n-{}\n", i + 1, a[i]));
            i += 1;
        }
    }
    out
}

#[test]
fn outputs_match_the_golden_files() {
    let dir = tempfile::tempdir().unwrap();
    for (corpus, name) in IMAGES {
        decompress(corpus, &dir.path().join(name));
    }
    // (golden file stem, arguments, exit code)
    let mut cases: Vec<(String, Vec<&str>, i32)> = vec![("backends".into(), vec!["backends"], 0)];
    for &img in SUBJECTS {
        let stem = img.replace('.', "-");
        for cmd in ["info", "check", "map", "layout", "dump", "probe"] {
            // The dirty log is a problem check reports.
            let code = i32::from(cmd == "check" && img == "dirty.vhdx");
            cases.push((format!("{cmd}-{stem}"), vec![cmd, img], code));
        }
        cases.push((
            format!("map-visual-{stem}"),
            vec!["map", "--visual", "--width", "64", "--color", "never", img],
            0,
        ));
    }
    let update = std::env::var_os("VD_UPDATE_GOLDEN").is_some_and(|v| v == "1");
    let mut failures = Vec::new();
    for (stem, args, code) in &cases {
        for json in [false, true] {
            // The grid is a picture: it has no JSON form.
            if json && args.contains(&"--visual") {
                continue;
            }
            let mut a = args.clone();
            if json {
                a.extend(["--output", "json"]);
            }
            let o = Command::new(VD)
                .args(&a)
                .current_dir(dir.path())
                .output()
                .expect("vd-tool runs");
            assert_eq!(
                o.status.code(),
                Some(*code),
                "vd-tool {}: {}",
                a.join(" "),
                String::from_utf8_lossy(&o.stderr)
            );
            let text = String::from_utf8(o.stdout).expect("UTF-8");
            // map's JSON is JSON Lines (no host-dependent value in it): each line must parse.
            let got = if json && args[0] == "map" {
                for line in text.lines() {
                    serde_json::from_str::<serde_json::Value>(line)
                        .unwrap_or_else(|e| panic!("map line is not JSON ({e}): {line}"));
                }
                text
            } else {
                normalise(&text, json)
            };
            let file = golden_dir().join(format!("{stem}.{}", if json { "json" } else { "txt" }));
            if update {
                std::fs::create_dir_all(golden_dir()).unwrap();
                std::fs::write(&file, &got).unwrap();
                continue;
            }
            let want = std::fs::read_to_string(&file).unwrap_or_default();
            if want != got {
                let file = file.display();
                failures.push(format!(
                    "vd-tool {}: stdout differs from {file}:\n--- {file}\n+++ stdout\n{}",
                    a.join(" "),
                    diff(&want, &got)
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{}\n\nIf the new output is right, regenerate the files with \
         VD_UPDATE_GOLDEN=1 cargo test -p vd-tool --test golden, and review the diff.",
        failures.join("\n")
    );
}

#[test]
fn the_diff_names_the_lines_that_differ() {
    let d = diff("a\nb\nc\n", "a\nx\nc\nd\n");
    assert_eq!(d, "@@ line 2 @@\n+x\n@@ line 2 @@\n-b\n@@ line 4 @@\n+d\n");
    assert_eq!(diff("same\n", "same\n"), "");
}

#[test]
fn the_host_dependent_size_is_replaced() {
    assert_eq!(
        normalise("image:     x\ndisk size: 4 KiB\n", false),
        format!("image:     x\ndisk size: {HOST_SIZE}\n")
    );
    let j = normalise(
        r#"{"actual_size": 4096, "images": [{"actual_size": 1}]}"#,
        true,
    );
    assert!(!j.contains("4096") && !j.contains(": 1"), "{j}");
}
