//! What a qemu-img user types works: numbers in qemu's syntax (hex offsets, `1.5G`), `check -r
//! leaks|all`, `-o help`, convert's `-S`, `-n`, `-W`, `--target-is-zero` and `-B`, unknown
//! formats that list the formats there are, and the documented exit codes.

use std::path::{Path, PathBuf};
use std::process::Output;

use vd_tests::process::{stderr, stdout};
use vd_tests::qemu::{self, DirtyLog, dirty_vhdx};
use vd_tests::tool::assert_fails;
use vd_tests::{s, vd_tool_fns};

vd_tool_fns!();

const MIB: u64 = 1 << 20;

/// The syntax every size error shows.
const SYNTAX: &str = "use a number of bytes, in decimal or 0x hex, optionally with a K, M, G, \
                      T, P or E suffix (1024-based) and decimals (1.5G)";

fn code(o: &Output) -> Option<i32> {
    o.status.code()
}

/// A 64 MiB qemu-made VHDX with 1 MiB blocks: 0xab over [0, 8M), 0xcd over [32M, 40M).
fn qemu_image(dir: &Path, name: &str) -> PathBuf {
    let img = dir.join(name);
    qemu::create(&img, Some("block_size=1M"), "64M");
    qemu::io(&[
        "-f",
        "vhdx",
        "-c",
        "write -P 0xab 0 8M",
        "-c",
        "write -P 0xcd 32M 8M",
        s(&img),
    ]);
    img
}

/// `qemu-img compare a b` succeeds: QEMU reads the same disk from both.
#[track_caller]
fn qemu_same(a: &Path, b: &Path) {
    qemu::img(&["compare", s(a), s(b)]);
}

/// `qemu-img check` passes.
#[track_caller]
fn qemu_check(img: &Path) {
    qemu::img(&["check", s(img)]);
}

#[test]
fn discard_takes_hex_offsets() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path(), "l.vhdx");
    // 0x8100000 is 129 MiB: past the end, refused as a range, not as a number.
    let o = vd(&["discard", s(&img), "0x8100000", "4096"]);
    assert_fails(&o, "0x8100000");
    assert!(!stderr(&o).contains("is not a size"), "{}", stderr(&o));
    // 0x100000 = 1 MiB, 0x200000 = 2 MiB: one whole block.
    let o = vd_ok(&["discard", s(&img), "0x100000", "0x100000"]);
    assert!(
        stdout(&o).contains("discarded 1048576 bytes at offset 1048576"),
        "{}",
        stdout(&o)
    );
    qemu::assert_reads(
        &img,
        &[(0xab, 0, MIB), (0, MIB, MIB), (0xab, 2 * MIB, 6 * MIB)],
    );
    qemu_check(&img);
    // Bad numbers show the syntax.
    for bad in ["0x", "1.5Q", "1KB", "0x20M", "+1"] {
        let o = vd(&["discard", s(&img), bad, "4096"]);
        assert_fails(&o, SYNTAX);
        assert!(stderr(&o).contains(&format!("{bad:?}")), "{}", stderr(&o));
    }
}

#[test]
fn io_takes_hex_offsets_patterns_and_decimal_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("io.vhdx");
    vd_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=0x100000",
        s(&img),
        "16M",
    ]);
    let o = vd_ok(&[
        "io",
        "-c",
        "write -P 0x5a 0x100000 1.5M",
        "-c",
        "read -P 90 1M 0x180000",
        s(&img),
    ]);
    assert_eq!(
        stdout(&o),
        "wrote 1572864/1572864 bytes at offset 1048576\n\
         read 1572864/1572864 bytes at offset 1048576\n"
    );
    qemu::assert_reads(
        &img,
        &[(0, 0, MIB), (0x5a, MIB, 3 * MIB / 2), (0, 5 * MIB / 2, MIB)],
    );
    qemu_check(&img);
    for (cmd, says) in [
        ("write -P 0x5a 0x100000 1.5Q", SYNTAX),
        (
            "write -P 0x100 0 512",
            "use a byte, 0 to 255 in decimal or 0x00 to 0xff in hex",
        ),
        ("read 0 1.0001K", "not a whole number of bytes"),
        ("read 16E 1", "too large"),
    ] {
        assert_fails(&vd(&["io", "-c", cmd, s(&img)]), says);
    }
}

#[test]
fn bench_takes_hex_offsets_sizes_and_patterns() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.raw");
    vd_ok(&["create", "-f", "raw", s(&img), "4M"]);
    let o = vd_ok(&[
        "bench",
        "-w",
        "-c",
        "4",
        "-o",
        "0x100000",
        "-s",
        "0x1000",
        "-S",
        "0.5M",
        "--pattern",
        "0x5a",
        s(&img),
    ]);
    assert!(stdout(&o).contains("from offset 1048576"), "{}", stdout(&o));
    let bytes = std::fs::read(&img).unwrap();
    for i in 0..4usize {
        let at = (1 << 20) + i * (512 << 10);
        assert!(
            bytes[at..at + 4096].iter().all(|&b| b == 0x5a),
            "request {i}"
        );
        assert!(
            bytes[at + 4096..at + 8192].iter().all(|&b| b == 0),
            "after request {i}"
        );
    }
    assert_fails(&vd(&["bench", "-o", "1.5Q", s(&img)]), SYNTAX);
    let o = vd(&["bench", "-w", "--pattern", "0x1ff", s(&img)]);
    assert_eq!(code(&o), Some(2));
    assert!(stderr(&o).contains("0 to 255"), "{}", stderr(&o));
}

#[test]
fn create_and_resize_take_decimal_sizes() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vhdx");
    vd_ok(&["create", "-f", "vhdx", s(&img), "1.5G"]);
    let info = qemu::img(&["info", "--output", "json", s(&img)]);
    let v: serde_json::Value = serde_json::from_slice(&info.stdout).unwrap();
    assert_eq!(v["virtual-size"], 1_610_612_736u64);
    qemu_check(&img);
    vd_ok(&["resize", s(&img), "+0.5G"]);
    let v: serde_json::Value =
        serde_json::from_slice(&qemu::img(&["info", "--output", "json", s(&img)]).stdout).unwrap();
    assert_eq!(v["virtual-size"], 2u64 << 30);
    for (size, says) in [
        ("16E", "too large"),
        ("1.5", "not a whole number"),
        ("2Q", SYNTAX),
    ] {
        let other = dir.path().join("x.vhdx");
        assert_fails(&vd(&["create", "-f", "raw", s(&other), size]), says);
        assert!(!other.exists());
    }
}

#[test]
fn unknown_formats_list_the_formats() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.raw");
    std::fs::write(&img, [0u8; 4096]).unwrap();
    let out = dir.path().join("out");
    let says = "unknown format \"qcow2\"; the formats are: vhdx, vhd, raw";
    for args in [
        vec!["convert", "-O", "qcow2", s(&img), s(&out)],
        vec!["convert", "-f", "qcow2", "-O", "raw", s(&img), s(&out)],
        vec!["create", "-f", "qcow2", s(&out), "1M"],
        vec!["info", "-f", "qcow2", s(&img)],
        vec!["create", "-f", "qcow2", "-o", "help"],
    ] {
        assert_fails(&vd(&args), says);
    }
    assert!(!out.exists());
}

#[test]
fn o_help_lists_each_formats_options_from_the_table_the_backends_parse() {
    let o = vd_ok(&["create", "-o", "help"]);
    let text = stdout(&o);
    for line in [
        "vhdx options (-o key=value,...):",
        "  subformat              dynamic or fixed [default: dynamic]",
        "  block_size             a power of two from 1M to 256M [default: 32M (2M for a differencing image)]",
        "  log_size               a multiple of 1M from 1M to 1G [default: 1M]",
        "  logical_sector_size    512 or 4096",
        "  physical_sector_size   512 or 4096",
        "raw options (-o key=value,...):",
        "  preallocation          off or full",
    ] {
        assert!(text.contains(line), "{line:?} in:\n{text}");
    }
    assert!(text.find("vhdx options").unwrap() < text.find("raw options").unwrap());
    // -O FMT: only that format; convert lists the same.
    let raw_only = stdout(&vd_ok(&["convert", "-O", "raw", "-o", "help"]));
    assert!(
        raw_only.contains("preallocation") && !raw_only.contains("vhdx"),
        "{raw_only}"
    );
    assert_eq!(
        raw_only,
        stdout(&vd_ok(&["create", "-f", "raw", "-o", "help"]))
    );
    let vhdx_only = stdout(&vd_ok(&["convert", "-O", "vhdx", "-o", "help"]));
    assert!(
        vhdx_only.contains("block_size") && !vhdx_only.contains("raw"),
        "{vhdx_only}"
    );
    // JSON: the same table, typed.
    let o = vd_ok(&["create", "--output", "json", "-f", "vhdx", "-o", "help"]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let block = &v["formats"][0]["options"][1];
    assert_eq!(v["formats"][0]["format"], "vhdx");
    assert_eq!(block["name"], "block_size");
    assert_eq!(block["kind"]["type"], "size");
    assert_eq!(block["kind"]["min"], MIB);
    assert_eq!(block["kind"]["max"], 256 * MIB);
    // What the help lists is what create takes: each range's edges.
    let dir = tempfile::tempdir().unwrap();
    let new = |opts: &str| {
        let p = dir.path().join("o.vhdx");
        let _ = std::fs::remove_file(&p);
        (vd(&["create", "-f", "vhdx", "-o", opts, s(&p), "64M"]), p)
    };
    for good in [
        "block_size=1M",
        "block_size=0x10000000",
        "log_size=1G",
        "logical_sector_size=4K",
    ] {
        let (o, p) = new(good);
        assert_eq!(code(&o), Some(0), "{good}: {}", stderr(&o));
        assert_eq!(code(&vd(&["check", s(&p)])), Some(0), "{good}");
        // QEMU opens no VHDX with 4 KiB logical sectors.
        if !good.starts_with("logical") {
            qemu_check(&p);
        }
    }
    for (bad, says) in [
        (
            "block_size=512K",
            "block_size=512K: use a power of two from 1M to 256M",
        ),
        ("block_size=3M", "use a power of two from 1M to 256M"),
        (
            "log_size=1.5M",
            "log_size=1.5M: use a multiple of 1M from 1M to 1G",
        ),
        ("physical_sector_size=1024", "use 512 or 4096"),
        ("subformat=sparse", "use dynamic or fixed"),
        (
            "colour=red",
            "supported: subformat, block_size, log_size, logical_sector_size, physical_sector_size",
        ),
    ] {
        let (o, p) = new(bad);
        assert_fails(&o, says);
        assert!(!p.exists(), "{bad}");
    }
}

#[test]
fn check_takes_qemus_repair_levels() {
    let dir = tempfile::tempdir().unwrap();
    let clean = qemu_image(dir.path(), "clean.vhdx");
    for args in [
        vec!["check", "-r", "all", s(&clean)],
        vec!["check", "-r", "leaks", s(&clean)],
        vec!["check", "--repair=leaks", s(&clean)],
        vec!["check", "-r", s(&clean)],
        vec!["check", s(&clean), "-r"],
        vec!["check", s(&clean)],
    ] {
        let o = vd(&args);
        assert_eq!(code(&o), Some(0), "{args:?}: {}", stderr(&o));
        assert!(stdout(&o).contains("No errors were found"), "{args:?}");
    }
    assert_fails(
        &vd(&["check", "-r", "some", s(&clean)]),
        "the repair levels are leaks and all",
    );
    assert_fails(&vd(&["check", "-r", "leaks"]), "no image given");
    // -r leaks replays a dirty log as -r all does (and as qemu-img check -r leaks does).
    for level in ["leaks", "all"] {
        let img = dir.path().join(format!("dirty-{level}.vhdx"));
        dirty_vhdx(&img, &DirtyLog::default());
        assert_eq!(
            code(&vd(&["check", s(&img)])),
            Some(1),
            "dirty before -r {level}"
        );
        let o = vd(&["check", "-r", level, s(&img)]);
        assert_eq!(code(&o), Some(0), "-r {level}: {}", stdout(&o));
        assert!(stdout(&o).contains("Repaired"), "{}", stdout(&o));
        assert_eq!(code(&vd(&["check", s(&img)])), Some(0));
        qemu_check(&img);
        qemu::assert_reads(&img, &[(0xab, 0, MIB), (0, MIB, 63 * MIB)]);
    }
    let help = stdout(&vd_ok(&["check", "--help"]));
    assert!(
        help.contains("-r leaks repairs the same as -r all"),
        "{help}"
    );
}

#[test]
fn exit_codes_are_documented_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let img = qemu_image(dir.path(), "e.vhdx");
    let missing = dir.path().join("missing.vhdx");
    // check: 0 clean, 1 problems, 2 error (a missing file) and usage errors.
    assert_eq!(code(&vd(&["check", s(&img)])), Some(0));
    let cut = dir.path().join("cut.vhdx");
    std::fs::copy(&img, &cut).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&cut).unwrap();
    let len = f.metadata().unwrap().len();
    f.set_len(len - MIB).unwrap();
    drop(f);
    for args in [
        vec!["check", s(&cut)],
        vec!["check", "-r", "leaks", s(&cut)],
    ] {
        let o = vd(&args);
        assert_eq!(code(&o), Some(1), "{args:?}: {}", stdout(&o));
        assert!(stdout(&o).contains("ERROR"), "{}", stdout(&o));
    }
    assert_eq!(
        std::fs::metadata(&cut).unwrap().len(),
        len - MIB,
        "not grown"
    );
    assert_fails(&vd(&["check", s(&missing)]), "missing.vhdx");
    // compare: 0 same, 1 different, 2 error.
    let raw = dir.path().join("e.raw");
    vd_ok(&["convert", "-O", "raw", s(&img), s(&raw)]);
    assert_eq!(code(&vd(&["compare", s(&img), s(&raw)])), Some(0));
    vd_ok(&["io", "-c", "write -P 1 0x3000000 512", s(&raw)]);
    assert_eq!(code(&vd(&["compare", s(&img), s(&raw)])), Some(1));
    assert_fails(&vd(&["compare", s(&img), s(&missing)]), "missing.vhdx");
    // Usage errors: 2, for every command.
    for args in [
        vec!["check"],
        vec!["check", "--frobnicate", s(&img)],
        vec!["compare", s(&img)],
        vec!["convert", "--target-is-zero", "-O", "raw", s(&img), s(&raw)],
        vec!["discard", s(&img)],
    ] {
        let o = vd(&args);
        assert_eq!(code(&o), Some(2), "{args:?}: {}", stderr(&o));
        assert!(o.stdout.is_empty(), "{args:?}");
    }
    // The long help says how they map to qemu-img's.
    let help = stdout(&vd_ok(&["--help"]));
    assert!(help.contains("qemu-img check"), "{help}");
    assert!(help.contains("qemu-img compare"), "{help}");
}

/// The allocated bytes of a file.
fn allocated(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).unwrap().blocks() * 512
}

#[test]
fn convert_sparse_size_sets_what_stays_a_hole() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    vd_ok(&["create", "-f", "raw", s(&src), "16M"]);
    // Data in 4 KiB pieces 64 KiB apart over the first MiB (the rest of it zeros written as
    // data: -S looks at data read, the ranges the source maps as zeros stay holes anyway), and
    // more zeros written as data.
    let mut cmds = vec!["write -P 0 0 1M".to_string()];
    for i in 0..16 {
        cmds.push(format!("write -P 0x11 {} 4K", i * 65536));
    }
    cmds.push("write -P 0 4M 4M".into());
    let mut args = vec!["io".to_string()];
    for c in &cmds {
        args.push("-c".into());
        args.push(c.clone());
    }
    args.push(s(&src).into());
    vd_ok(&args);
    let out = |name: &str, sparse: Option<&str>| {
        let p = dir.path().join(name);
        let mut a = vec!["convert", "-O", "raw"];
        if let Some(sz) = sparse {
            a.extend(["-S", sz]);
        }
        a.extend([s(&src), s(&p)]);
        vd_ok(&a);
        qemu_same(&src, &p);
        p
    };
    let default = out("default.raw", None);
    let s4k = out("4k.raw", Some("4k"));
    let s1m = out("1m.raw", Some("1M"));
    let full = out("full.raw", Some("0"));
    // 4K (the default): 16 pieces of 4 KiB. 1M: the whole first MiB. 0: everything. (ext4
    // adds a block of extent tree for a file of more than 4 extents.)
    let about = |bytes: u64| bytes..bytes + 3 * 4096;
    assert!(
        about(16 * 4096).contains(&allocated(&default)),
        "{}",
        allocated(&default)
    );
    assert_eq!(allocated(&s4k), allocated(&default));
    assert!(about(MIB).contains(&allocated(&s1m)), "{}", allocated(&s1m));
    assert!(allocated(&full) >= 16 * MIB, "{}", allocated(&full));
    // A vhdx with -S 0: every block allocated; qemu reads the same disk.
    let v = dir.path().join("full.vhdx");
    vd_ok(&[
        "convert",
        "-S",
        "0",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&src),
        s(&v),
    ]);
    qemu_same(&src, &v);
    qemu_check(&v);
    let map = stdout(&vd_ok(&["map", "--output", "json", s(&v)]));
    assert!(!map.contains("\"zero\""), "fully allocated: {map}");
    for bad in ["1000", "8M", "3K", "x"] {
        assert_fails(
            &vd(&[
                "convert",
                "-S",
                bad,
                "-O",
                "raw",
                s(&src),
                s(&dir.path().join("bad")),
            ]),
            bad,
        );
    }
    // -W is accepted.
    let w = dir.path().join("w.raw");
    vd_ok(&["convert", "-W", "-O", "raw", s(&src), s(&w)]);
    qemu_same(&src, &w);
}

#[test]
fn convert_n_writes_into_an_existing_image() {
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_image(dir.path(), "src.vhdx");
    // A larger existing image full of old bytes.
    let dst = dir.path().join("dst.vhdx");
    qemu::create(&dst, Some("block_size=1M"), "80M");
    qemu::io(&["-f", "vhdx", "-c", "write -P 0xee 0 80M", s(&dst)]);
    let ino = |p: &Path| {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(p).unwrap().ino()
    };
    let before = ino(&dst);
    vd_ok(&["convert", "-n", "-O", "vhdx", s(&src), s(&dst)]);
    assert_eq!(ino(&dst), before, "written in place, not replaced");
    qemu_check(&dst);
    // The disk over its first 64 MiB (zeros where the source has none), old bytes after.
    qemu::assert_reads(
        &dst,
        &[
            (0xab, 0, 8 * MIB),
            (0, 8 * MIB, 24 * MIB),
            (0xcd, 32 * MIB, 8 * MIB),
            (0, 40 * MIB, 24 * MIB),
            (0xee, 64 * MIB, 16 * MIB),
        ],
    );
    // --target-is-zero: zeros are not written, so old bytes stay where the source reads zeros.
    let tz = dir.path().join("tz.vhdx");
    qemu::create(&tz, Some("block_size=1M"), "64M");
    qemu::io(&["-f", "vhdx", "-c", "write -P 0xee 16M 1M", s(&tz)]);
    vd_ok(&[
        "convert",
        "-n",
        "--target-is-zero",
        "-O",
        "vhdx",
        s(&src),
        s(&tz),
    ]);
    qemu::assert_reads(
        &tz,
        &[
            (0xab, 0, 8 * MIB),
            (0xee, 16 * MIB, MIB),
            (0xcd, 32 * MIB, 8 * MIB),
        ],
    );
    qemu_check(&tz);
    // A raw target.
    let raw = dir.path().join("dst.raw");
    std::fs::write(&raw, vec![0xeeu8; 64 << 20]).unwrap();
    vd_ok(&["convert", "-n", "-O", "raw", s(&src), s(&raw)]);
    qemu_same(&src, &raw);
    // Refused before anything is written: too small, missing, another format, -o.
    let small = dir.path().join("small.vhdx");
    qemu::create(&small, None, "32M");
    let small_bytes = std::fs::read(&small).unwrap();
    assert_fails(
        &vd(&["convert", "-n", "-O", "vhdx", s(&src), s(&small)]),
        "less than the disk's",
    );
    assert_eq!(std::fs::read(&small).unwrap(), small_bytes);
    let missing = dir.path().join("missing.vhdx");
    assert_fails(
        &vd(&["convert", "-n", "-O", "vhdx", s(&src), s(&missing)]),
        "no such image",
    );
    assert!(!missing.exists());
    let dst_bytes = std::fs::read(&dst).unwrap();
    assert_fails(
        &vd(&["convert", "-n", "-O", "raw", s(&src), s(&dst)]),
        "this is a vhdx image",
    );
    assert_fails(
        &vd(&[
            "convert",
            "-n",
            "-O",
            "vhdx",
            "-o",
            "block_size=1M",
            s(&src),
            s(&dst),
        ]),
        "-o sets the options of a new image",
    );
    assert_eq!(std::fs::read(&dst).unwrap(), dst_bytes);
    // The source itself is never a target.
    assert_fails(
        &vd(&["convert", "-n", "-O", "vhdx", s(&src), s(&src)]),
        "refusing",
    );
}

#[test]
fn convert_n_takes_the_write_lock() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let src = qemu_image(dir.path(), "src.vhdx");
    let dst = dir.path().join("busy.vhdx");
    qemu::create(&dst, None, "64M");
    // Another vd-tool holds the target open for writing.
    let mut child = vd_tests::tool::Background(
        Command::new(env!("CARGO_BIN_EXE_vd-tool"))
            .args(["io", "-c", "flush", "-c", "sleep 60000", s(&dst)])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(child.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "flushed\n");
    let before = std::fs::read(&dst).unwrap();
    assert_fails(
        &vd(&["convert", "-n", "-O", "vhdx", s(&src), s(&dst)]),
        "busy.vhdx",
    );
    assert_eq!(std::fs::read(&dst).unwrap(), before);
}

#[test]
fn convert_b_writes_only_what_differs_from_the_backing_file() {
    let dir = tempfile::tempdir().unwrap();
    let base = qemu_image(dir.path(), "base.vhdx");
    // The source: the base's disk, changed in three places (one of them zeroed).
    let src = dir.path().join("src.raw");
    qemu::vhdx_to_raw(&base, &src);
    qemu::io(&[
        "-f",
        "raw",
        "-c",
        "write -P 0x77 4M 1M",
        "-c",
        "write -z 33M 1M",
        "-c",
        "write -P 0x99 60M 64k",
        s(&src),
    ]);
    let out = dir.path().join("out.vhdx");
    let o = vd_ok(&[
        "--output",
        "json",
        "convert",
        "-B",
        s(&base),
        "-O",
        "vhdx",
        s(&src),
        s(&out),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    // Only the three changed ranges were written.
    assert_eq!(v["bytes_written"], 2 * MIB + 65536);
    // vd reads the same disk through the chain, and the new image names its backing file.
    assert_eq!(code(&vd(&["compare", s(&src), s(&out)])), Some(0));
    let info: serde_json::Value =
        serde_json::from_slice(&vd_ok(&["info", "--output", "json", s(&out)]).stdout).unwrap();
    assert!(info.to_string().contains("base.vhdx"), "{info}");
    // QEMU has no differencing VHDX: it reads the disk vd flattens from the chain.
    let flat = dir.path().join("flat.raw");
    vd_ok(&["convert", "-O", "raw", s(&out), s(&flat)]);
    qemu_same(&src, &flat);
    // The backing chain is never the destination; a stream cannot hold a differencing image.
    assert_fails(
        &vd(&["convert", "-B", s(&base), "-O", "vhdx", s(&src), s(&base)]),
        "refusing",
    );
    assert_fails(
        &vd(&["convert", "-B", s(&base), "-O", "raw", s(&src), "-"]),
        "-B",
    );
    let o = vd(&[
        "convert",
        "-n",
        "-B",
        s(&base),
        "-O",
        "vhdx",
        s(&src),
        s(&out),
    ]);
    assert_eq!(code(&o), Some(2), "-n and -B exclude each other");
}
