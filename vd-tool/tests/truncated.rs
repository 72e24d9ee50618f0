//! Truncated VHDX images through vd-tool (the data-safety issue). Images made by vd-tool and by
//! qemu-img/qemu-io, clean and with a dirty log, are cut inside the log, the BAT, the metadata
//! region and the payload; then:
//! - read-only commands (`convert`, `io -r read`, `map`) fail with an error, never exit 0 with
//!   zeros for the missing data;
//! - `check` exits 1 and names the problem;
//! - every modifying command (`io write`, `discard`, `resize`, `compact`, `comment --set`,
//!   `geometry`, `setuuid`, `check -r`) fails and leaves the file byte-identical (SHA-256 and
//!   size);
//! - `convert` of a truncated source over an existing destination keeps the old destination.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vd_tests::hash::sha256_file;
use vd_tests::process::{stderr, stdout};
use vd_tests::qemu::{self, DirtyLog, dirty_vhdx};
use vd_tests::vhdx::{CUTS, cut_at};
use vd_tests::{s, vd_tool_fns, vhdx};

vd_tool_fns!();

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// 64 MiB images with 1 MiB blocks, 0xab over the first 8 MiB.
const WRITE: &str = "write -P 0xab 0 8M";

/// A 64 MiB, 1 MiB-block image by vd-tool holding the pattern; `dirty`: the writer flushed and
/// was killed before closing.
fn vd_image(path: &Path, dirty: bool) {
    vd_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        s(path),
        "64M",
    ]);
    if !dirty {
        vd_ok(&["io", "-c", WRITE, s(path)]);
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_vd-tool"))
        .args([
            "io",
            "-c",
            WRITE,
            "-c",
            "flush",
            "-c",
            "sleep 60000",
            s(path),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("vd-tool runs");
    let mut out = BufReader::new(child.stdout.take().expect("piped"));
    let mut line = String::new();
    while !line.starts_with("flushed") {
        line.clear();
        assert!(
            out.read_line(&mut line).expect("reading vd-tool io") > 0,
            "vd-tool io ended before flushing"
        );
    }
    child.kill().expect("killing the writer");
    child.wait().expect("reaping the writer");
}

/// The same by qemu-img/qemu-io; `dirty`: qemu's in-place BAT write fails once (blkdebug)
/// after its log entry (block 0's BAT update) is flushed.
fn qemu_image(path: &Path, dirty: bool) {
    let opts = "subformat=dynamic,block_size=1M";
    if dirty {
        let log = DirtyLog {
            size: 64 * MIB,
            opts: Some(opts),
            pattern: 0xab,
            len: 8 * MIB,
            replayed: MIB,
        };
        dirty_vhdx(path, &log);
        return;
    }
    qemu::create(path, Some(opts), "64M");
    qemu::io(&["-f", "vhdx", "-c", WRITE, s(path)]);
}

/// Every truncated variant of every image kind: (description, file).
fn truncated_images(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for (maker, dirty) in [("vd", false), ("vd", true), ("qemu", false), ("qemu", true)] {
        let full = dir.join(format!("{maker}-{dirty}.vhdx"));
        if maker == "vd" {
            vd_image(&full, dirty);
        } else {
            qemu_image(&full, dirty);
        }
        let bytes = std::fs::read(&full).expect("image");
        assert_eq!(vhdx::log_is_dirty(&bytes), dirty, "{maker} dirty={dirty}");
        for cut in CUTS {
            let at = cut_at(&bytes, cut) as u64;
            let small_flushed: &[bool] = if dirty { &[false, true] } else { &[false] };
            for &small in small_flushed {
                let mut b = bytes.clone();
                if small {
                    vhdx::set_flushed_offset(&mut b, at);
                }
                b.truncate(usize::try_from(at).expect("small"));
                let name = format!("{maker}-dirty{dirty}-{cut:?}-lowflushed{small}");
                let path = dir.join(format!("{name}.vhdx"));
                std::fs::write(&path, &b).expect("writing the cut image");
                out.push((name, path));
            }
        }
    }
    out
}

/// No panic, and an error exit.
#[track_caller]
fn fails(o: &std::process::Output, what: &str) {
    let err = stderr(o);
    assert!(!err.contains("panicked"), "{what}: {err}");
    assert!(
        !o.status.success(),
        "{what}: exit 0; stdout {} stderr {err}",
        stdout(o)
    );
}

#[test]
fn truncated_images_are_never_read_as_zeros_nor_changed() {
    let dir = tempfile::tempdir().expect("temp dir");
    for (name, img) in truncated_images(dir.path()) {
        let hash = sha256_file(&img);
        let size = std::fs::metadata(&img).expect("size").len();
        let unchanged = |what: &str| {
            assert_eq!(
                std::fs::metadata(&img).expect("size").len(),
                size,
                "{name}: {what} changed the file size"
            );
            assert_eq!(sha256_file(&img), hash, "{name}: {what} changed the file");
        };
        // Read-only commands fail (exit 2) rather than read zeros.
        let raw = dir.path().join("out.raw");
        let o = vd(&["convert", "-O", "raw", s(&img), s(&raw)]);
        fails(&o, &format!("{name}: convert"));
        assert_eq!(o.status.code(), Some(2), "{name}: convert");
        assert!(!raw.exists(), "{name}: convert left a partial output");
        let o = vd(&["io", "-r", "-c", "read -P 0xab 0 8M", s(&img)]);
        assert_eq!(o.status.code(), Some(2), "{name}: io read: {}", stdout(&o));
        fails(&o, &format!("{name}: io read"));
        fails(&vd(&["map", s(&img)]), &format!("{name}: map"));
        unchanged("reading");
        // check reports (exit 1) and names the problem.
        let o = vd(&["check", s(&img)]);
        assert_eq!(o.status.code(), Some(1), "{name}: check: {}", stdout(&o));
        let text = stdout(&o);
        assert!(
            text.contains("ERROR")
                && (text.contains("end of the file")
                    || text.contains("ends at")
                    || text.contains("were stable")),
            "{name}: check: {text}"
        );
        unchanged("check");
        // Modifying commands refuse before writing.
        for args in [
            vec!["io", "-c", "write -P 0xcd 0 512"],
            vec!["io", "-c", "write -P 0xcd 60M 1M"],
            vec!["discard", s(&img), "0", "1M"],
            vec!["resize", s(&img), "128M"],
            vec!["compact"],
            vec!["comment", "--set", "hello"],
            vec!["geometry", "--pchs", "100/16/63"],
            vec!["setuuid", "--uuid", "0b5d3c4e-58a0-4c4f-9b0e-123456789abc"],
            vec!["check", "-r"],
        ] {
            let mut args = args.clone();
            if !args.contains(&s(&img)) {
                args.push(s(&img));
            }
            let o = vd(&args);
            fails(&o, &format!("{name}: {args:?}"));
            unchanged(&format!("{args:?}"));
        }
    }
}

#[test]
fn check_repair_of_a_truncated_image_lists_the_missing_blocks_and_does_not_grow_it() {
    let dir = tempfile::tempdir().expect("temp dir");
    for dirty in [false, true] {
        let img = dir.path().join(format!("img-{dirty}.vhdx"));
        vd_image(&img, dirty);
        let mut b = std::fs::read(&img).expect("image");
        let at = b.len() as u64 - 5 * MIB / 2;
        if dirty {
            // The log entry was written when the file was this long (the issue's image).
            vhdx::set_flushed_offset(&mut b, at);
        }
        b.truncate(usize::try_from(at).expect("small"));
        std::fs::write(&img, &b).expect("writing");
        let hash = sha256_file(&img);
        for args in [vec!["check"], vec!["check", "-r"]] {
            let mut args = args.clone();
            args.push(s(&img));
            let o = vd(&args);
            assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stdout(&o));
            let text = stdout(&o);
            let missing = text
                .lines()
                .filter(|l| {
                    l.starts_with("ERROR")
                        && l.contains("payload block")
                        && !l.contains("not repaired")
                })
                .count();
            assert_eq!(missing, 3, "{args:?} dirty={dirty}: {text}");
            assert!(!text.contains("Repaired"), "{text}");
            assert_eq!(sha256_file(&img), hash, "{args:?} changed the file");
        }
    }
}

/// A clean source, and the issue's dirty one (its log entry written while the file was as
/// long as the cut, so only the blocks show the cut; it used to convert with exit 0 and zeros).
#[test]
fn converting_a_truncated_source_keeps_the_old_destination() {
    for dirty in [false, true] {
        convert_over_destination(dirty);
    }
}

fn convert_over_destination(dirty: bool) {
    let dir = tempfile::tempdir().expect("temp dir");
    let img = dir.path().join("src.vhdx");
    vd_image(&img, dirty);
    let mut b = std::fs::read(&img).expect("image");
    let at = b.len() as u64 - 5 * MIB / 2;
    if dirty {
        vhdx::set_flushed_offset(&mut b, at);
    }
    b.truncate(usize::try_from(at).expect("small"));
    std::fs::write(&img, &b).expect("writing");
    for fmt in ["raw", "vhdx"] {
        let dst = dir.path().join(format!("dst.{fmt}"));
        let old: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&dst, &old).expect("old destination");
        let o = vd(&["convert", "-O", fmt, s(&img), s(&dst)]);
        fails(&o, &format!("convert -O {fmt} (dirty {dirty})"));
        assert!(
            stderr(&o).contains("payload block"),
            "the error names the block: {}",
            stderr(&o)
        );
        assert!(
            std::fs::read(&dst).expect("the old destination survives") == old,
            "convert -O {fmt} changed the old destination"
        );
        let leftovers: Vec<_> = std::fs::read_dir(dir.path())
            .expect("dir")
            .filter_map(|e| e.ok())
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n != "src.vhdx" && !n.starts_with("dst."))
            .collect();
        assert!(leftovers.is_empty(), "staging files left: {leftovers:?}");
    }
}
