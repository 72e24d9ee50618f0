//! End-to-end tests of the vd-tool binary: outputs, exit codes and every error path.

use std::path::Path;
use std::process::{Command, Output};

use vd_tests::peers::{Peer, require};
use vd_tests::process::{stderr, stdout};
use vd_tests::{qemu, s, vd_tool_fns};

vd_tool_fns!();

/// `vd-tool bench --output json ARGS`, its document.
fn bench_json(args: &[&str]) -> serde_json::Value {
    let mut a = vec!["bench", "--output", "json"];
    a.extend_from_slice(args);
    json(&vd(&a))
}

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "vd-tool failed: {}", stderr(o));
    serde_json::from_slice(&o.stdout).expect("stdout is one JSON document")
}

/// `text` with every run of spaces made one space: the human output aligns its values in
/// columns, and a test looks for the words.
fn squeeze(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if !(c == ' ' && out.ends_with(' ')) {
            out.push(c);
        }
    }
    out
}

/// An error: exit code 2, nothing on stdout, exactly one line on stderr that names `needle`.
fn assert_error(o: &Output, needle: &str) {
    assert_eq!(o.status.code(), Some(2), "stderr: {}", stderr(o));
    assert!(o.stdout.is_empty(), "stdout: {}", stdout(o));
    let err = stderr(o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "{err:?} should name {needle:?}");
    assert!(!err.contains("panicked"), "{err}");
}

/// qemu-img is on every development and CI machine; a missing one is a failure, not a skip.
fn qemu_img() -> &'static str {
    require(&[Peer::QemuImg]);
    "qemu-img"
}

#[test]
fn backends_lists_vhdx_then_vhd_then_raw() {
    let v = json(&vd(&["backends", "--output", "json"]));
    let names: Vec<&str> = v
        .as_array()
        .expect("an array")
        .iter()
        .map(|b| b["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["vhdx", "vhd", "raw"]);
    assert_eq!(v[0]["schema_version"], 1);
    let human = stdout(&vd(&["backends"]));
    assert!(human.find("vhdx").unwrap() < human.find("vhd ").unwrap());
    assert!(human.find("vhd ").unwrap() < human.find("raw").unwrap());
}

#[test]
fn probe_tells_raw_vhdx_and_vhd_apart() {
    let dir = tempfile::tempdir().unwrap();
    let random = dir.path().join("random.bin");
    // Deterministic pseudo-random bytes (not starting with any signature).
    let mut x = 0x1234_5678_9abc_def0u64;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&random, bytes).unwrap();
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, "just some text\n").unwrap();
    let vhdx = dir.path().join("q.vhdx");
    let st = Command::new(qemu_img())
        .args(["create", "-q", "-f", "vhdx", s(&vhdx), "64M"])
        .status()
        .unwrap();
    assert!(st.success());
    // A fixed VHD (footer only at the end) and a dynamic one (footer copy at 0) of the corpus.
    let fixed_vhd = dir.path().join("fixed.vhd");
    vd_tests::corpus::decompress("vhd/dissect.hypervisor/fixed.vhd.gz", &fixed_vhd);
    let dynamic_vhd = dir.path().join("dynamic.vhd");
    vd_tests::corpus::decompress("vhd/dissect.hypervisor/dynamic.vhd.gz", &dynamic_vhd);

    for (file, backend, confidence) in [
        (&random, "raw", "fallback"),
        (&text, "raw", "fallback"),
        (&vhdx, "vhdx", "certain"),
        (&fixed_vhd, "vhd", "certain"),
        (&dynamic_vhd, "vhd", "certain"),
    ] {
        let v = json(&vd(&["probe", "--output", "json", s(file)]));
        assert_eq!(v["backend"], backend, "{}", file.display());
        assert_eq!(v["confidence"], confidence);
        let h = stdout(&vd(&["probe", s(file)]));
        assert_eq!(
            h.trim(),
            format!("{}: {backend} ({confidence})", file.display())
        );
    }
}

/// `info` on a VHD: the format, the footer's current size (not the CHS product) and the
/// footer's and dynamic header's facts; a write lands (the backend writes VHD now) and reads
/// back in a read-only open, and the rest of the disk is unchanged.
#[test]
fn info_reports_vhd_facts_and_writes_land() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("dynamic.vhd");
    vd_tests::corpus::decompress("vhd/dissect.hypervisor/dynamic.vhd.gz", &img);
    let v = json(&vd(&["info", "--output", "json", s(&img)]));
    assert_eq!(v["format"], "vhd");
    assert_eq!(v["virtual_size"], 10 << 20);
    assert_eq!(v["uuid"], "4b6a0d04-f946-d74e-836f-d3dc87e1816b");
    let fs = &v["format_specific"];
    assert_eq!(fs["disk_type"], "dynamic", "{v}");
    assert_eq!(fs["creator_application"], "win ", "{v}");
    assert_eq!(fs["dynamic"]["block_size"], 2 << 20, "{v}");
    assert_eq!(fs["dynamic"]["blocks_allocated"], 3, "{v}");
    let before = qemu::raw(&img);
    vd_ok(&["io", "-c", "write -P 0x5a 0 512", s(&img)]);
    vd_ok(&["io", "-r", "-c", "read -P 0x5a 0 512", s(&img)]);
    let after = qemu::raw(&img);
    assert_eq!(after[..512], [0x5a; 512]);
    assert_eq!(
        after[512..],
        before[512..],
        "the rest of the disk is unchanged"
    );
}

#[test]
fn info_reports_raw_facts() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("disk.img");
    let f = std::fs::File::create(&img).unwrap();
    f.set_len(10 << 20).unwrap();
    let v = json(&vd(&["info", "--output", "json", s(&img)]));
    assert_eq!(v["format"], "raw");
    assert_eq!(v["virtual_size"], 10 << 20);
    assert_eq!(v["file_size"], 10 << 20);
    assert_eq!(v["pchs_geometry"]["cylinders"], 301);
    assert_eq!(v["pchs_geometry"]["heads"], 4);
    assert_eq!(v["pchs_geometry"]["sectors"], 17);
    assert_eq!(v["schema_version"], 1);
    let h = squeeze(&stdout(&vd(&["info", "-f", "raw", s(&img)])));
    assert!(h.contains("file format: raw"), "{h}");
    assert!(h.contains("virtual size: 10 MiB (10485760 bytes)"), "{h}");
}

#[test]
fn convert_raw_to_raw_keeps_holes() {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    let dst = dir.path().join("dst.img");
    let f = std::fs::File::create(&src).unwrap();
    f.set_len(64 << 20).unwrap();
    f.write_all_at(&[0xab; 4096], 5 << 20).unwrap();
    f.write_all_at(&[0xcd; 100], (40 << 20) + 7).unwrap();
    // An allocated but all-zero range must not become data in the copy.
    f.write_all_at(&vec![0u8; 8 << 20], 50 << 20).unwrap();
    drop(f);
    let o = vd(&["convert", "-p", "-f", "raw", "-O", "raw", s(&src), s(&dst)]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(o.stdout.is_empty());
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    let blocks = std::fs::metadata(&dst).unwrap().blocks() * 512;
    assert!(
        blocks <= 1 << 20,
        "destination allocates {blocks} bytes: holes were filled"
    );
    let v = json(&vd(&[
        "convert",
        "--output",
        "json",
        "-O",
        "raw",
        s(&src),
        s(&dst),
    ]));
    assert_eq!(v["virtual_size"], 64 << 20);
    assert!(v["bytes_written"].as_u64().unwrap() <= 8192);
}

#[test]
fn missing_and_unreadable_files_are_one_line_errors() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no-such-file.vhdx");
    for args in [
        vec!["probe", s(&missing)],
        vec!["info", s(&missing)],
        vec!["info", "--backing-chain", s(&missing)],
        vec!["info", "-f", "raw", s(&missing)],
        vec!["convert", "-O", "raw", s(&missing), "/dev/null"],
    ] {
        assert_error(&vd(&args), "no-such-file.vhdx");
    }
    // A directory cannot be read as an image.
    assert_error(&vd(&["probe", s(dir.path())]), s(dir.path()));
    assert_error(&vd(&["info", s(dir.path())]), s(dir.path()));
    // In JSON mode the same line goes to stderr, and stdout has the error as a document.
    let o = vd(&["probe", "--output", "json", s(&missing)]);
    assert_eq!(o.status.code(), Some(2));
    let err = stderr(&o);
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("a JSON document");
    assert_eq!(v["error"]["kind"], "not_found", "{v}");
    assert_eq!(
        format!("error: {}\n", v["error"]["message"].as_str().unwrap()),
        err
    );
}

#[test]
fn bad_formats_and_options_are_errors() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.img");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let out = dir.path().join("b.img");
    assert_error(&vd(&["info", "-f", "qcow9", s(&img)]), "qcow9");
    assert_error(&vd(&["convert", "-O", "qcow9", s(&img), s(&out)]), "qcow9");
    assert_error(
        &vd(&["convert", "-O", "raw", "-o", "colour=red", s(&img), s(&out)]),
        "colour=red",
    );
    assert_error(
        &vd(&["convert", "-O", "raw", "-o", "nonsense", s(&img), s(&out)]),
        "nonsense",
    );
    assert!(!out.exists(), "a failed convert leaves no destination");
    // Converting onto the source would destroy it.
    assert_error(&vd(&["convert", "-O", "raw", s(&img), s(&img)]), "refusing");
    assert_eq!(std::fs::read(&img).unwrap(), [0u8; 4096]);
    // The destination directory does not exist.
    assert_error(
        &vd(&["convert", "-O", "raw", s(&img), "/nonexistent-dir/x.img"]),
        "/nonexistent-dir/x.img",
    );
    // A VHDX image opens and reports its format.
    let vhdx = dir.path().join("q.vhdx");
    let st = Command::new(qemu_img())
        .args(["create", "-q", "-f", "vhdx", s(&vhdx), "8M"])
        .status()
        .unwrap();
    assert!(st.success());
    let v = json(&vd(&["info", "--output", "json", s(&vhdx)]));
    assert_eq!(v["format"], "vhdx");
    assert_eq!(v["virtual_size"], 8 << 20);
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        vec![],
        vec!["frobnicate"],
        vec!["probe"],
        vec!["convert", "a"],
        vec!["info", "--output", "xml", "x"],
    ] {
        let o = vd(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty());
    }
}

#[test]
fn broken_pipe_is_not_an_error() {
    use std::process::Stdio;
    let mut child = Command::new(env!("CARGO_BIN_EXE_vd-tool"))
        .args(["backends", "--output", "json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    assert!(!stderr(&o).contains("panicked"), "{}", stderr(&o));
}

/// A qemu-made dynamic VHDX with `0xab` at [1 MiB, 3 MiB) and `0xcd` at [40 MiB, 40 MiB + 4 KiB).
fn qemu_vhdx(dir: &Path) -> std::path::PathBuf {
    let img = dir.join("q.vhdx");
    qemu::create(&img, Some("block_size=1M"), "64M");
    qemu::io(&[
        "-f",
        "vhdx",
        "-c",
        "write -P 0xab 1M 2M",
        "-c",
        "write -P 0xcd 40M 4k",
        s(&img),
    ]);
    img
}

#[test]
fn map_reports_data_and_zero_ranges() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_vhdx(dir.path());
    let o = vd(&["map", "--output", "json", s(&img)]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (header, lines) = vd_tests::tool::map_lines(&o.stdout);
    assert_eq!(header["virtual_size"], 64u64 << 20);
    assert_eq!(header["layers"][0]["format"], "vhdx");
    let extents: Vec<(u64, u64, String, Option<u64>)> = lines
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().unwrap(),
                e["length"].as_u64().unwrap(),
                e["state"].as_str().unwrap().to_string(),
                e["layer"].as_u64(),
            )
        })
        .collect();
    let mib = 1u64 << 20;
    // Whole 1 MiB blocks are allocated around the writes; the image itself reads as zeros
    // elsewhere (layer 0: a base image's unallocated blocks).
    assert_eq!(
        extents,
        vec![
            (0, mib, "zero".into(), Some(0)),
            (mib, 2 * mib, "data".into(), Some(0)),
            (3 * mib, 37 * mib, "zero".into(), Some(0)),
            (40 * mib, mib, "data".into(), Some(0)),
            (41 * mib, 23 * mib, "zero".into(), Some(0)),
        ]
    );
    let human = stdout(&vd(&["map", s(&img)]));
    assert!(
        human
            .lines()
            .any(|l| l.starts_with("0x100000") && l.contains("data")),
        "{human}"
    );
}

#[test]
fn compare_exit_codes() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_vhdx(dir.path());
    let raw = dir.path().join("q.raw");
    let st = Command::new(qemu_img())
        .args(["convert", "-O", "raw", s(&img), s(&raw)])
        .status()
        .unwrap();
    assert!(st.success());
    let o = vd(&["compare", s(&img), s(&raw)]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(stdout(&o).trim(), "Images are identical.");
    // Change one byte in the raw copy.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
        f.write_all_at(&[0x00], (40 << 20) + 100).unwrap();
    }
    let o = vd(&["compare", s(&img), s(&raw)]);
    assert_eq!(o.status.code(), Some(1));
    assert_eq!(
        stdout(&o).trim(),
        format!("Content mismatch at offset {}!", (40 << 20) + 100)
    );
    let v: serde_json::Value =
        serde_json::from_slice(&vd(&["compare", "--output", "json", s(&img), s(&raw)]).stdout)
            .unwrap();
    assert_eq!(v["identical"], false);
    assert_eq!(v["first_difference"], (40 << 20) + 100);
    // A larger image whose extra part is zeros is identical unless --strict.
    let big = dir.path().join("big.raw");
    std::fs::copy(&raw, &big).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&big).unwrap();
        f.write_all_at(&[0xcd], (40 << 20) + 100).unwrap();
        f.set_len(80 << 20).unwrap();
    }
    assert_eq!(vd(&["compare", s(&img), s(&big)]).status.code(), Some(0));
    assert_eq!(
        vd(&["compare", "-s", s(&img), s(&big)]).status.code(),
        Some(1)
    );
    assert_error(
        &vd(&["compare", s(&img), "/no/such/image"]),
        "/no/such/image",
    );
}

#[test]
fn dump_and_info_describe_vhdx_structures() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_vhdx(dir.path());
    let text = squeeze(&stdout(&vd(&["dump", s(&img)])));
    for needle in [
        "file_identifier:\n creator: QEMU",
        "headers:\n - copy: 1\n offset: 0x10000\n",
        "- guid: 2dc27766-f623-4200-9d64-115e9bfd4a08, name: BAT, offset: 0x",
        "- guid: caa16737-fa36-4d43-b3b6-33f0aa44e76b\n name: file parameters",
        "chunk_ratio: 4096",
        "fully_present: 3",
        "log:\n guid: 00000000-0000-0000-0000-000000000000\n dirty: false\n replay: none",
    ] {
        assert!(text.contains(needle), "dump lacks {needle:?}:\n{text}");
    }
    // JSON holds the same structures as typed values, not lines of text.
    let v = json(&vd(&["dump", "--output", "json", s(&img)]));
    assert_eq!(v["format"], "vhdx");
    let st = &v["structures"];
    assert_eq!(st["bat"]["chunk_ratio"], 4096);
    assert_eq!(st["bat"]["fully_present"], 3);
    assert_eq!(st["bat"]["block_size"], 1 << 20);
    assert_eq!(st["log"]["dirty"], false);
    assert_eq!(st["log"]["replay"], "none");
    let bat = &st["region_table"]["regions"][0];
    assert_eq!(bat["guid"], "2dc27766-f623-4200-9d64-115e9bfd4a08");
    assert_eq!(bat["name"], "BAT");
    assert!(bat["offset"].as_u64().unwrap() >= 1 << 20, "{bat}");
    let info = squeeze(&stdout(&vd(&["info", s(&img)])));
    for needle in [
        "file format: vhdx",
        "type: dynamic",
        "block_size: 1 MiB (1048576 bytes)",
        "log_state: clean",
    ] {
        assert!(info.contains(needle), "info lacks {needle:?}:\n{info}");
    }
    // The source is never modified by reading commands.
    let before = std::fs::read(&img).unwrap();
    for args in [
        vec!["info"],
        vec!["map"],
        vec!["dump"],
        vec!["info", "--backing-chain"],
    ] {
        let mut a = args.clone();
        a.push(s(&img));
        assert!(vd(&a).status.success());
    }
    assert_eq!(before, std::fs::read(&img).unwrap());
}

#[test]
fn bench_reads_and_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_vhdx(dir.path());
    let v = bench_json(&["-c", "100", "-s", "64K", s(&img)]);
    assert_eq!(v["mode"], "read");
    assert_eq!(v["bytes"], 100 * 65536);
    assert!(v["seconds"].as_f64().unwrap() > 0.0);
    // Writes wrap around at the end of the disk and leave the pattern behind.
    let v = bench_json(&[
        "-w",
        "--pattern",
        "66",
        "-c",
        "80",
        "-s",
        "1M",
        "--flush-interval",
        "7",
        s(&img),
    ]);
    assert_eq!(v["mode"], "write");
    let o = vd(&["io", "-r", "-c", "read -P 66 0 64M", s(&img)]);
    assert!(o.status.success(), "{}{}", stdout(&o), stderr(&o));
    let st = Command::new(qemu_img())
        .args(["check", s(&img)])
        .status()
        .unwrap();
    assert!(st.success());
    assert_error(&vd(&["bench", "-s", "0", s(&img)]), "request size");
}

#[test]
fn bench_threads_read_and_write_one_shared_disk() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_vhdx(dir.path());
    // Four threads share the requests: every one is made, and the run says how many threads.
    let v = bench_json(&["-t", "4", "-c", "64", "-s", "64K", s(&img)]);
    assert_eq!(v["mode"], "read");
    assert_eq!(v["count"], 64);
    assert_eq!(v["bytes"], 64 * 65536);
    assert_eq!(v["threads"], 4);
    // qemu's queue depth, without -t, is the number of threads; -t wins over it.
    let v = bench_json(&["-d", "2", "-c", "16", s(&img)]);
    assert_eq!(v["threads"], 2);
    let v = bench_json(&["-t", "3", "-d", "8", "-c", "16", s(&img)]);
    assert_eq!(v["threads"], 3);
    // The human output keeps qemu-img bench's lines and names the threads.
    let human = stdout(&vd_ok(&["bench", "-t", "2", "-c", "8", s(&img)]));
    assert!(
        human.starts_with(
            "Sending 8 read requests, 4096 bytes each, from offset 0, step size 4096\n"
        ),
        "{human}"
    );
    assert!(human.contains("2 threads"), "{human}");
    // Three writers from offset 8M, 1 MiB each, 40 requests: 8M..48M holds the pattern (given
    // in hex), the rest of the disk what it held before (0xab at 1M..3M, zeros elsewhere:
    // 40M's 0xcd is overwritten). Flushes every 5 requests, counted over all threads.
    let v = bench_json(&[
        "-w",
        "-t",
        "3",
        "--pattern",
        "0x5a",
        "-o",
        "8M",
        "-c",
        "40",
        "-s",
        "1M",
        "--flush-interval",
        "5",
        s(&img),
    ]);
    assert_eq!(
        (v["mode"].as_str(), v["threads"].as_u64()),
        (Some("write"), Some(3))
    );
    let st = Command::new(qemu_img())
        .args(["check", "-q", s(&img)])
        .status()
        .unwrap();
    assert!(st.success());
    let bytes = qemu::raw(&img);
    const M: usize = 1 << 20;
    assert_eq!(bytes.len(), 64 * M);
    for (range, want) in [
        (0..M, 0),
        (M..3 * M, 0xab),
        (3 * M..8 * M, 0),
        (8 * M..48 * M, 0x5a),
        (48 * M..64 * M, 0),
    ] {
        let (start, end) = (range.start, range.end);
        assert!(
            bytes[range].iter().all(|&b| b == want),
            "{start:#x}..{end:#x} should be all {want:#x}"
        );
    }
    // Requests that cannot fit, and patterns that are not bytes, are refused.
    assert_error(&vd(&["bench", "-o", "64M", s(&img)]), "does not fit");
    let o = vd(&["bench", "-w", "--pattern", "0x100", s(&img)]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("not a byte"), "{}", stderr(&o));
}
