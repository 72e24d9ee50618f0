//! Interop of what vd WRITES: images that `vd-tool create`, `vd-tool io` and `vd-tool convert`
//! produce must pass `qemu-img check` and read back identically in `qemu-io`, `qemu-img compare`
//! and libvhdi (`pyvhdi`); images that qemu created or wrote must read back in ours; and a
//! writer killed with SIGKILL must leave an image that qemu's and our repair agree on, holding
//! every write a completed `flush` covered.
//!
//! Every expectation is checked against a raw reference file built with the same writes. The
//! external tools are required: a missing `qemu-img`, `qemu-io` or `pyvhdi` (install it with
//! `python3 -m pip install libvhdi-python`) fails the tests instead of skipping them. QEMU 10
//! opens neither VHDX differencing images nor 4 KiB-logical-sector ones, so those are read by
//! libvhdi and by our own reader only.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Running the tools

fn p(path: &Path) -> &str {
    path.to_str().expect("temp paths are UTF-8")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn show(o: &Output) -> String {
    format!(
        "exit {:?}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        text(&o.stdout),
        text(&o.stderr)
    )
}

fn run(program: &str, args: &[String]) -> Output {
    Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

fn strings<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    args.iter().map(|a| a.as_ref().to_string()).collect()
}

/// Runs the command and requires exit code 0.
fn ok(program: &str, args: &[String]) -> Output {
    let o = run(program, args);
    assert!(
        o.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        show(&o)
    );
    o
}

fn vd<S: AsRef<str>>(args: &[S]) -> Output {
    run(env!("CARGO_BIN_EXE_vd-tool"), &strings(args))
}

fn vd_ok<S: AsRef<str>>(args: &[S]) -> Output {
    ok(env!("CARGO_BIN_EXE_vd-tool"), &strings(args))
}

/// A required external tool: missing is a failure, never a skip.
fn require(program: &str, hint: &str) {
    let found = Command::new(program)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(found, "{program} is required ({hint})");
}

fn qemu() {
    require("qemu-img", "CI installs qemu-utils");
    require("qemu-io", "CI installs qemu-utils");
}

/// pyvhdi is required too; CI runs `python3 -m pip install libvhdi-python`.
fn pyvhdi() {
    let o = run(
        "python3",
        &strings(&["-c", "import pyvhdi; print(pyvhdi.get_version())"]),
    );
    assert!(
        o.status.success(),
        "pyvhdi is required: run `python3 -m pip install libvhdi-python`\n{}",
        show(&o)
    );
}

fn qemu_img<S: AsRef<str>>(args: &[S]) -> Output {
    run("qemu-img", &strings(args))
}

// ---------------------------------------------------------------------------------------------
// Writes, and the raw reference that receives the same writes

/// One `vd-tool io` / `qemu-io` command that changes the disk.
#[derive(Debug, Clone, Copy)]
enum Op {
    Write { off: u64, len: u64, pat: u8 },
    Zero { off: u64, len: u64 },
    Discard { off: u64, len: u64 },
}

impl Op {
    fn range(self) -> (u64, u64) {
        match self {
            Op::Write { off, len, .. } | Op::Zero { off, len } | Op::Discard { off, len } => {
                (off, len)
            }
        }
    }

    /// The command, in the syntax both `vd-tool io` and `qemu-io` take.
    fn command(self) -> String {
        match self {
            Op::Write { off, len, pat } => format!("write -P {pat:#04x} {off} {len}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Discard { off, len } => format!("discard {off} {len}"),
        }
    }
}

fn w(off: u64, len: u64, pat: u8) -> Op {
    Op::Write { off, len, pat }
}

fn io_args(ops: &[Op]) -> Vec<String> {
    ops.iter()
        .flat_map(|op| ["-c".to_string(), op.command()])
        .collect()
}

/// A sparse raw file holding what the disk must read as.
struct Reference {
    path: PathBuf,
    file: File,
    size: u64,
    /// Every range a write touched (reads are generated for these).
    touched: Vec<(u64, u64)>,
}

impl Reference {
    fn new(path: PathBuf, size: u64) -> Self {
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("create the reference");
        file.set_len(size).expect("size the reference");
        Self {
            path,
            file,
            size,
            touched: Vec::new(),
        }
    }

    fn fill(&self, off: u64, len: u64, byte: u8) {
        let buf = vec![byte; usize::try_from(len).expect("len fits")];
        self.file
            .write_all_at(&buf, off)
            .expect("write the reference");
    }

    /// Applies the ops; discard counts as zeroing (our writer and qemu both read discarded
    /// ranges as zeros).
    fn apply(&mut self, ops: &[Op]) {
        for &op in ops {
            let (off, len) = op.range();
            assert!(off + len <= self.size, "{op:?} is outside the disk");
            match op {
                Op::Write { pat, .. } => self.fill(off, len, pat),
                Op::Zero { .. } | Op::Discard { .. } => self.fill(off, len, 0),
            }
            self.touched.push((off, len));
        }
    }

    fn read(&self, off: u64, len: u64) -> Vec<u8> {
        let mut buf = vec![0u8; usize::try_from(len).expect("len fits")];
        self.file
            .read_exact_at(&mut buf, off)
            .expect("read the reference");
        buf
    }

    /// `read -P` commands covering every touched range (with 4 KiB around it), one per run of
    /// equal bytes, as they are in the reference now.
    fn expected_reads(&self) -> Vec<String> {
        let mut ranges: Vec<(u64, u64)> = self
            .touched
            .iter()
            .map(|&(off, len)| {
                let start = off.saturating_sub(4 * KIB);
                (start, (off + len + 4 * KIB).min(self.size))
            })
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(u64, u64)> = Vec::new();
        for (s, e) in ranges {
            match merged.last_mut() {
                Some(last) if s <= last.1 => last.1 = last.1.max(e),
                _ => merged.push((s, e)),
            }
        }
        let mut cmds = Vec::new();
        for (s, e) in merged {
            let data = self.read(s, e - s);
            let mut i = 0usize;
            while i < data.len() {
                let b = data[i];
                let run = run_len(&data[i..]);
                cmds.push(format!("read -P {b:#04x} {} {run}", s + i as u64));
                i += run;
            }
        }
        cmds
    }

    fn sha256_and_chunks(&self) -> (String, Vec<String>) {
        sha256_file(&self.path)
    }
}

/// How many bytes at the start of `data` equal its first byte (memcmp-fast over long runs).
fn run_len(data: &[u8]) -> usize {
    let Some(&b) = data.first() else { return 0 };
    let block = [b; 4096];
    let mut n = 0;
    while data.len() - n >= block.len() && data[n..n + block.len()] == block {
        n += block.len();
    }
    n + data[n..].iter().take_while(|&&x| x == b).count()
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

/// SHA-256 of the whole file and of each 1 MiB chunk.
fn sha256_file(path: &Path) -> (String, Vec<String>) {
    let f = File::open(path).expect("open for hashing");
    let len = f.metadata().expect("metadata").len();
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(MIB) as usize;
        f.read_exact_at(&mut buf[..n], off)
            .expect("read for hashing");
        whole.update(&buf[..n]);
        chunks.push(hex(&Sha256::digest(&buf[..n])));
        off += n as u64;
    }
    (hex(&whole.finalize()), chunks)
}

fn with_c(cmds: &[String]) -> Vec<String> {
    cmds.iter()
        .flat_map(|c| ["-c".to_string(), c.clone()])
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Readers

/// qemu-img check is clean, qemu-img compare against the reference is identical, and qemu-io
/// reads every touched range as the reference holds it.
fn verify_in_qemu(img: &Path, reference: &Reference) {
    let check = qemu_img(&["check", "-f", "vhdx", p(img)]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check {}: {}",
        img.display(),
        show(&check)
    );
    let cmp = qemu_img(&[
        "compare",
        "-f",
        "raw",
        "-F",
        "vhdx",
        p(&reference.path),
        p(img),
    ]);
    assert_eq!(
        cmp.status.code(),
        Some(0),
        "qemu-img compare {} {}: {}",
        reference.path.display(),
        img.display(),
        show(&cmp)
    );
    let mut args = strings(&["-f", "vhdx", "-r"]);
    args.extend(with_c(&reference.expected_reads()));
    args.push(p(img).to_string());
    let o = ok("qemu-io", &args);
    assert!(
        !text(&o.stdout).contains("verification failed"),
        "qemu-io read back {}: {}",
        img.display(),
        show(&o)
    );
}

/// Our check is clean, our compare against the reference is identical, and `vd-tool io -r`
/// reads every touched range as the reference holds it.
fn verify_in_ours(img: &Path, reference: &Reference, parents: &[&Path]) {
    if parents.is_empty() {
        vd_ok(&["check", p(img)]);
    }
    let mut cmp = vec!["compare".to_string()];
    cmp.push(p(&reference.path).to_string());
    cmp.push(p(img).to_string());
    vd_ok(&cmp);
    let mut args = strings(&["io", "-r"]);
    args.extend(with_c(&reference.expected_reads()));
    args.push(p(img).to_string());
    vd_ok(&args);
}

/// What pyvhdi reads: the whole disk's SHA-256, per-MiB digests, the logical sector size.
#[derive(Debug)]
struct Libvhdi {
    sha256: String,
    chunks: Vec<String>,
    size: u64,
    bytes_per_sector: u64,
}

const PYVHDI_HASH: &str = r#"
import hashlib, json, sys
import pyvhdi
files = []
for path in sys.argv[1:]:
    f = pyvhdi.file()
    f.open(path)
    files.append(f)
for child, parent in zip(files, files[1:]):
    child.set_parent(parent)
f = files[0]
size = f.get_media_size()
whole = hashlib.sha256()
chunks = []
off = 0
while off < size:
    n = min(1 << 20, size - off)
    buf = f.read_buffer_at_offset(n, off)
    if len(buf) != n:
        sys.exit(f"short read at {off}: {len(buf)} of {n} bytes")
    whole.update(buf)
    chunks.append(hashlib.sha256(buf).hexdigest())
    off += n
print(json.dumps({"sha256": whole.hexdigest(), "chunks": chunks, "size": size,
                  "bytes_per_sector": f.get_bytes_per_sector()}))
"#;

/// Reads `img` (with its parents, immediate parent first) through pyvhdi.
fn libvhdi_read(img: &Path, parents: &[&Path]) -> Libvhdi {
    let mut args = strings(&["-c", PYVHDI_HASH, p(img)]);
    args.extend(parents.iter().map(|x| p(x).to_string()));
    let o = ok("python3", &args);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("the script's JSON");
    Libvhdi {
        sha256: v["sha256"].as_str().expect("sha256").to_string(),
        chunks: v["chunks"]
            .as_array()
            .expect("chunks")
            .iter()
            .map(|c| c.as_str().expect("digest").to_string())
            .collect(),
        size: v["size"].as_u64().expect("size"),
        bytes_per_sector: v["bytes_per_sector"].as_u64().expect("bytes_per_sector"),
    }
}

/// `vd-tool convert -O raw` of the disk (through its parents), hashed.
fn ours_sha256(img: &Path, dir: &Path) -> (String, Vec<String>) {
    let out = dir.join(format!(
        "{}.ours.raw",
        img.file_name().and_then(|n| n.to_str()).expect("a name")
    ));
    vd_ok(&["convert", "-O", "raw", p(img), p(&out)]);
    sha256_file(&out)
}

fn info(img: &Path) -> serde_json::Value {
    let o = vd_ok(&["--output", "json", "info", p(img)]);
    serde_json::from_slice(&o.stdout).expect("info JSON")
}

// ---------------------------------------------------------------------------------------------
// The write pattern

/// Writes that cross block boundaries, are unaligned in offset and length, zero and discard
/// parts of blocks and whole blocks (after data went there), and touch the last sector. Ops
/// that do not fit in `size` are left out.
fn ops_for(bs: u64, size: u64) -> Vec<Op> {
    let big = bs.min(4 * MIB) + 8 * KIB;
    let ops = [
        w(777, 513, 0x11),
        w(bs - 1000, 3000, 0x12),
        w(2 * bs - 4 * KIB, big, 0x13),
        Op::Zero {
            off: 2 * bs - 100,
            len: 5000,
        },
        w(3 * bs, 64 * KIB, 0x14),
        Op::Zero {
            off: 3 * bs,
            len: bs,
        },
        Op::Discard {
            off: 4 * bs + 512,
            len: 1024,
        },
        w(4 * bs, 8 * KIB, 0x15),
        Op::Discard {
            off: 4 * bs + 1000,
            len: 3000,
        },
        w(5 * bs + 100, 100, 0x16),
        Op::Discard {
            off: 5 * bs,
            len: bs,
        },
        w(6 * bs - 3, 7, 0x17),
        w(size - 512, 512, 0x18),
        w(size - 5000, 1000, 0x19),
        Op::Zero {
            off: size - 4800,
            len: 300,
        },
    ];
    ops.into_iter()
        .filter(|op| {
            let (off, len) = op.range();
            off.checked_add(len).is_some_and(|end| end <= size)
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// 1. Images we create and write, read by qemu

#[test]
fn created_images_written_by_us_pass_qemu_check_and_read_back() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    // (subformat, block size, virtual size)
    let configs: &[(&str, u64, u64)] = &[
        ("dynamic", MIB, 6 * GIB),
        ("dynamic", 32 * MIB, 230 * MIB + 512),
        ("dynamic", 256 * MIB, 1800 * MIB),
        ("fixed", MIB, 40 * MIB),
        ("fixed", 32 * MIB, 210 * MIB + 3584),
    ];
    for &(sub, bs, size) in configs {
        let name = format!("{sub}-{}M", bs / MIB);
        let img = dir.path().join(format!("{name}.vhdx"));
        let opts = format!("subformat={sub},block_size={}M", bs / MIB);
        vd_ok(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            &opts,
            p(&img),
            &size.to_string(),
        ]);
        let mut ops = ops_for(bs, size);
        if size > 4 * GIB {
            // Past 4 GiB, and across the 4 GiB line; also across a chunk boundary (block 4096
            // of a 1 MiB-block disk is the first of the second chunk).
            ops.extend([
                w(4 * GIB - 700, 1400, 0x21),
                w(4 * GIB + MIB, MIB, 0x22),
                Op::Zero {
                    off: 4 * GIB + MIB,
                    len: MIB,
                },
                w(5 * GIB + 3, 10, 0x23),
                Op::Discard {
                    off: 5 * GIB,
                    len: 2 * MIB,
                },
                w(5 * GIB + 2 * MIB - 1, 2, 0x24),
            ]);
        }
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        let mut args = strings(&["io"]);
        args.extend(io_args(&ops));
        args.push(p(&img).to_string());
        vd_ok(&args);
        verify_in_qemu(&img, &reference);
        verify_in_ours(&img, &reference, &[]);
        let qi = qemu_img(&["info", "--output=json", "-f", "vhdx", p(&img)]);
        let v: serde_json::Value = serde_json::from_slice(&qi.stdout).expect("qemu-img info");
        assert_eq!(v["virtual-size"], size, "{name}");
        assert_eq!(v["cluster-size"], bs, "{name}");
    }
}

#[test]
fn sector_size_options_read_back_in_libvhdi_and_ours() {
    qemu();
    pyvhdi();
    let dir = tempfile::tempdir().unwrap();
    let size = 40 * MIB;
    for (logical, physical) in [(4096u64, 512u64), (4096, 4096), (512, 512), (512, 4096)] {
        let name = format!("l{logical}-p{physical}");
        let img = dir.path().join(format!("{name}.vhdx"));
        let opts =
            format!("block_size=1M,logical_sector_size={logical},physical_sector_size={physical}");
        vd_ok(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            &opts,
            p(&img),
            &size.to_string(),
        ]);
        let ops = ops_for(MIB, size);
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        let mut args = strings(&["io"]);
        args.extend(io_args(&ops));
        args.push(p(&img).to_string());
        vd_ok(&args);

        let v = info(&img);
        assert_eq!(v["logical_sector_size"], logical, "{name}: {v}");
        assert_eq!(
            v["format_specific"]["physical_sector_size"], physical,
            "{name}: {v}"
        );
        let (want, want_chunks) = reference.sha256_and_chunks();
        let lib = libvhdi_read(&img, &[]);
        assert_eq!(lib.size, size, "{name}");
        assert_eq!(lib.bytes_per_sector, logical, "{name}");
        assert_eq!(
            first_differing_chunk(&lib.chunks, &want_chunks),
            None,
            "{name}: libvhdi reads another disk (MiB index)"
        );
        assert_eq!(lib.sha256, want, "{name}: libvhdi");
        assert_eq!(ours_sha256(&img, dir.path()).0, want, "{name}: ours");
        verify_in_ours(&img, &reference, &[]);
        if logical == 512 {
            verify_in_qemu(&img, &reference);
        }
    }
}

fn first_differing_chunk(got: &[String], want: &[String]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

// ---------------------------------------------------------------------------------------------
// 2. convert from raw

/// A raw file with random data and zero holes: whole zero blocks (holes and allocated zeros),
/// partial zero runs, a lone byte, and a size that is not a multiple of 1 MiB.
fn raw_source(path: &Path) -> u64 {
    let size = 40 * MIB + 4096;
    let f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut random = |len: u64| -> Vec<u8> {
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8 | 1
            })
            .collect()
    };
    // MiB 0: random. MiB 1-2: a hole. MiB 3: random with a zero run in the middle.
    f.write_all_at(&random(MIB), 0).unwrap();
    f.write_all_at(&random(MIB), 3 * MIB).unwrap();
    f.write_all_at(&vec![0u8; 300_000], 3 * MIB + 100_000)
        .unwrap();
    // MiB 5-6: allocated, all zeros. MiB 7: one byte at its end.
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 5 * MIB)
        .unwrap();
    f.write_all_at(&[0x5a], 8 * MIB - 1).unwrap();
    // MiB 9-16: random with zero runs of assorted lengths.
    f.write_all_at(&random(8 * MIB), 9 * MIB).unwrap();
    for (off, len) in [
        (9 * MIB + 1, 511),
        (11 * MIB, MIB),
        (13 * MIB + 4096, 65536),
    ] {
        f.write_all_at(&vec![0u8; len as usize], off).unwrap();
    }
    // MiB 33: a few bytes; the last 4 KiB + 1 MiB: random.
    f.write_all_at(&random(100), 33 * MIB + 12_345).unwrap();
    f.write_all_at(&random(MIB + 4096), 39 * MIB).unwrap();
    size
}

#[test]
fn convert_from_raw_passes_qemu_and_allocates_only_non_zero_blocks() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = raw_source(&src);
    let data = std::fs::read(&src).unwrap();
    for bs in [MIB, 2 * MIB, 32 * MIB] {
        let dst = dir.path().join(format!("dst-{}M.vhdx", bs / MIB));
        let mut args = strings(&["convert", "-O", "vhdx"]);
        if bs != 32 * MIB {
            args.extend(strings(&["-o", &format!("block_size={}M", bs / MIB)]));
        }
        args.extend(strings(&[p(&src), p(&dst)]));
        vd_ok(&args);
        let check = qemu_img(&["check", "-f", "vhdx", p(&dst)]);
        assert_eq!(check.status.code(), Some(0), "{}", show(&check));
        ok(
            "qemu-img",
            &strings(&["compare", "-f", "raw", "-F", "vhdx", p(&src), p(&dst)]),
        );
        ok(
            "qemu-img",
            &strings(&["compare", "-f", "vhdx", "-F", "raw", p(&dst), p(&src)]),
        );
        vd_ok(&["compare", p(&dst), p(&src)]);
        vd_ok(&["compare", "-s", p(&src), p(&dst)]);

        // Data extents cover exactly the blocks that hold a non-zero byte.
        let m = vd_ok(&["--output", "json", "map", p(&dst)]);
        let v: serde_json::Value = serde_json::from_slice(&m.stdout).unwrap();
        assert_eq!(v["virtual_size"], size);
        let blocks = size.div_ceil(bs);
        let mut mapped = vec![false; blocks as usize];
        for e in v["extents"].as_array().expect("extents") {
            let (start, len) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            if e["state"] == "data" {
                assert!(
                    start.is_multiple_of(bs) && (len.is_multiple_of(bs) || start + len == size),
                    "a data extent that is not whole blocks: {e}"
                );
                for b in start / bs..(start + len).div_ceil(bs) {
                    mapped[b as usize] = true;
                }
            }
        }
        for b in 0..blocks {
            let lo = (b * bs) as usize;
            let hi = ((b + 1) * bs).min(size) as usize;
            let nonzero = data[lo..hi].iter().any(|&x| x != 0);
            assert_eq!(
                mapped[b as usize],
                nonzero,
                "block {b} ({} MiB blocks): mapped as data {} but holds non-zero data {}",
                bs / MIB,
                mapped[b as usize],
                nonzero
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Our writes into qemu's images; qemu's writes into ours

#[test]
fn our_writes_into_qemu_created_images_read_back_in_qemu() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let variants: &[(&str, &[&str], u64)] = &[
        ("default", &[], GIB),
        ("no-zero-state", &["-o", "block_state_zero=off"], 300 * MIB),
        (
            "zero-state-1M",
            &["-o", "block_size=1M,block_state_zero=on"],
            5 * GIB,
        ),
        ("fixed", &["-o", "subformat=fixed,block_size=1M"], 24 * MIB),
        ("fixed-default", &["-o", "subformat=fixed"], 64 * MIB),
    ];
    for &(name, opts, size) in variants {
        let img = dir.path().join(format!("{name}.vhdx"));
        let mut args = strings(&["create", "-q", "-f", "vhdx"]);
        args.extend(strings(opts));
        args.extend(strings(&[p(&img), &size.to_string()]));
        ok("qemu-img", &args);
        let qi = qemu_img(&["info", "--output=json", "-f", "vhdx", p(&img)]);
        let v: serde_json::Value = serde_json::from_slice(&qi.stdout).expect("qemu-img info");
        let bs = v["cluster-size"].as_u64().expect("cluster-size");
        let mut ops = ops_for(bs, size);
        if size > 4 * GIB {
            ops.extend([w(4 * GIB - 513, 1025, 0x31), w(4 * GIB + 7 * MIB, 5, 0x32)]);
        }
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        let mut args = strings(&["io"]);
        args.extend(io_args(&ops));
        args.push(p(&img).to_string());
        vd_ok(&args);
        verify_in_qemu(&img, &reference);
        verify_in_ours(&img, &reference, &[]);
    }
}

#[test]
fn qemu_writes_into_our_images_read_back_in_ours() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let configs: &[(&str, u64, u64)] = &[
        ("dynamic", MIB, 5 * GIB),
        ("dynamic", 32 * MIB, 300 * MIB),
        ("fixed", 8 * MIB, 72 * MIB),
    ];
    for &(sub, bs, size) in configs {
        let name = format!("{sub}-{}M", bs / MIB);
        let img = dir.path().join(format!("{name}.vhdx"));
        let opts = format!("subformat={sub},block_size={}M", bs / MIB);
        vd_ok(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            &opts,
            p(&img),
            &size.to_string(),
        ]);
        // qemu's vhdx driver has no discard; its zero writes fall back to writing zeros.
        let mut ops: Vec<Op> = ops_for(bs, size)
            .into_iter()
            .filter(|op| !matches!(op, Op::Discard { .. }))
            .collect();
        if size > 4 * GIB {
            ops.extend([
                w(4 * GIB - 100, 200, 0x41),
                w(4 * GIB + 9 * MIB + 1, 3, 0x42),
            ]);
        }
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        let mut args = strings(&["-f", "vhdx"]);
        args.extend(io_args(&ops));
        args.push(p(&img).to_string());
        ok("qemu-io", &args);
        verify_in_ours(&img, &reference, &[]);
        verify_in_qemu(&img, &reference);
        // A wrong pattern is exit code 1, and says where.
        let o = vd(&["io", "-r", "-c", "read -P 0x12 777 513", p(&img)]);
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(
            text(&o.stdout).contains("Pattern verification failed at offset 777"),
            "{}",
            show(&o)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Differencing chains and libvhdi

/// A parent full of data, a child we create over it and write into (partial blocks, unaligned
/// writes widened to sectors, whole blocks, zeroed whole blocks); libvhdi and our reader see
/// the same disk as the reference.
#[test]
fn differencing_chain_we_wrote_reads_back_in_libvhdi_and_ours() {
    pyvhdi();
    let dir = tempfile::tempdir().unwrap();
    let size = 48 * MIB;
    for logical in [512u64, 4096] {
        let parent = dir.path().join(format!("parent-{logical}.vhdx"));
        let child = dir.path().join(format!("child-{logical}.vhdx"));
        let opts = format!("block_size=1M,logical_sector_size={logical}");
        vd_ok(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            &opts,
            p(&parent),
            &size.to_string(),
        ]);
        let parent_ops = [
            w(0, 20 * MIB, 0x61),
            w(20 * MIB, 20 * MIB, 0x62),
            w(44 * MIB + 4096, 100, 0x63),
        ];
        let mut reference = Reference::new(dir.path().join(format!("chain-{logical}.raw")), size);
        reference.apply(&parent_ops);
        let mut args = strings(&["io"]);
        args.extend(io_args(&parent_ops));
        args.push(p(&parent).to_string());
        vd_ok(&args);
        vd_ok(&["create", "-f", "vhdx", "-b", p(&parent), p(&child)]);
        let v = info(&child);
        assert_eq!(v["logical_sector_size"], logical, "{v}");
        let bs = v["format_specific"]["block_size"]
            .as_u64()
            .expect("block_size");
        let child_ops = [
            // Unaligned, inside one sector and across sectors: widened with the parent's data.
            w(1000, 3000, 0x71),
            w(5000, 100, 0x72),
            // Partial blocks, across a block boundary, unaligned at both ends.
            w(bs - 700, 1500, 0x73),
            w(3 * bs + 4096, 8192, 0x74),
            // A whole block, then a partial write into it.
            w(5 * bs, bs, 0x75),
            w(5 * bs + 10, 20, 0x76),
            // Over the parent's lone write and its hole; the last sector.
            w(44 * MIB + 4000, 50, 0x77),
            w(size - 512, 512, 0x78),
            w(size - 3 * MIB - 1, 2 * MIB + 2, 0x79),
            // Sector-aligned zeros over part of a block.
            Op::Zero {
                off: 7 * bs + 4096,
                len: 8192,
            },
        ];
        reference.apply(&child_ops);
        let mut args = strings(&["io"]);
        args.extend(io_args(&child_ops));
        args.push(p(&child).to_string());
        vd_ok(&args);
        vd_ok(&["check", p(&child)]);

        let (want, want_chunks) = reference.sha256_and_chunks();
        assert_eq!(ours_sha256(&child, dir.path()).0, want, "ours, {logical}");
        verify_in_ours(&child, &reference, &[&parent]);
        let lib = libvhdi_read(&child, &[&parent]);
        assert_eq!(lib.bytes_per_sector, logical);
        assert_eq!(
            first_differing_chunk(&lib.chunks, &want_chunks),
            None,
            "libvhdi reads another disk (MiB index), logical sector {logical}"
        );
        assert_eq!(lib.sha256, want, "libvhdi, logical sector {logical}");

        // Whole blocks zeroed or discarded in the child read as zeros, not as the parent
        // ([MS-VHDX] 2.5.1.1: PAYLOAD_BLOCK_ZERO "MUST return zeros"). Our writer stores them
        // as ZERO; libvhdi (20260901) reads ZERO in a differencing image from the parent, so
        // for these blocks it is only required to read either the zeros or the parent.
        let zero_ops = [
            Op::Zero {
                off: 9 * bs,
                len: bs,
            },
            Op::Discard {
                off: 11 * bs,
                len: 2 * bs,
            },
        ];
        reference.apply(&zero_ops);
        let mut args = strings(&["io"]);
        args.extend(io_args(&zero_ops));
        args.push(p(&child).to_string());
        vd_ok(&args);
        let (want, want_chunks) = reference.sha256_and_chunks();
        assert_eq!(ours_sha256(&child, dir.path()).0, want, "ours, {logical}");
        verify_in_ours(&child, &reference, &[&parent]);
        let lib = libvhdi_read(&child, &[&parent]);
        let parent_chunks = ours_sha256(&parent, dir.path());
        let zeroed = |mib: u64| {
            (9 * bs..10 * bs).contains(&(mib * MIB)) || (11 * bs..13 * bs).contains(&(mib * MIB))
        };
        let mut divergent = Vec::new();
        for (i, (got, want)) in lib.chunks.iter().zip(&want_chunks).enumerate() {
            if got == want {
                continue;
            }
            let mib = i as u64;
            assert!(
                zeroed(mib) && *got == parent_chunks.1[i],
                "libvhdi, logical sector {logical}: MiB {mib} reads neither the reference nor \
                 (in a zeroed block) the parent"
            );
            divergent.push(mib);
        }
        if !divergent.is_empty() {
            eprintln!(
                "note: libvhdi reads the child's ZERO blocks from the parent (MiB {divergent:?})"
            );
        }
    }
}

/// Writes of zeros and discards that are not sector-aligned, into a differencing image: like
/// ordinary writes (which `Disk::write_at` widens to sectors), they must succeed.
#[test]
fn unaligned_zeroing_and_discard_in_a_child_succeed() {
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    let parent = dir.path().join("parent.vhdx");
    let child = dir.path().join("child.vhdx");
    vd_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        "block_size=1M",
        p(&parent),
        &size.to_string(),
    ]);
    vd_ok(&["io", "-c", "write -P 0x61 0 16M", p(&parent)]);
    vd_ok(&["create", "-f", "vhdx", "-b", p(&parent), p(&child)]);
    let mut reference = Reference::new(dir.path().join("ref.raw"), size);
    reference.apply(&[w(0, size, 0x61)]);
    let ops = [
        Op::Zero {
            off: 20 * KIB + 100,
            len: 100,
        },
        Op::Zero {
            off: 3 * MIB - 10,
            len: 5000,
        },
    ];
    reference.apply(&ops);
    let mut args = strings(&["io"]);
    args.extend(io_args(&ops));
    args.push(p(&child).to_string());
    vd_ok(&args);
    verify_in_ours(&child, &reference, &[&parent]);
    // Discard may keep the data; it must not fail.
    vd_ok(&["io", "-c", "discard 5242980 1000", p(&child)]);
}

// ---------------------------------------------------------------------------------------------
// 5. A writer killed mid-way

const CRASH_WRITES: u64 = 240;
const CRASH_SLOT: u64 = 3 * MIB / 2;

/// Write `i`: inside its own 1.5 MiB slot, so writes never overlap, but neighbours share a
/// 1 MiB block; unaligned starts and lengths.
fn crash_write(i: u64) -> (u64, u64, u8) {
    let off = i * CRASH_SLOT + (i % 7) * 1000;
    let len = MIB + (i % 3) * 4096;
    let pat = u8::try_from(i % 250 + 1).expect("a byte");
    (off, len, pat)
}

/// The commands: every write, and a flush after every fourth.
fn crash_commands() -> Vec<(String, Option<u64>)> {
    let mut cmds = Vec::new();
    for i in 0..CRASH_WRITES {
        let (off, len, pat) = crash_write(i);
        cmds.push((format!("write -P {pat:#04x} {off} {len}"), Some(i)));
        if i % 4 == 3 {
            cmds.push(("flush".to_string(), None));
        }
    }
    cmds
}

/// What a write's range may hold after the crash.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// A completed flush covered it: exactly the pattern.
    Durable,
    /// Completed or started, not flushed: every byte is the pattern or zero.
    Maybe,
    /// Never started: zeros.
    Never,
}

/// Runs `vd-tool io` with the crash commands; kills it after `delay` (if given). Returns the
/// fate of each write and whether the process was killed before it finished.
fn crash_run(img: &Path, delay: Option<Duration>) -> (Vec<Fate>, bool) {
    let cmds = crash_commands();
    let mut args = vec!["io".to_string()];
    for (c, _) in &cmds {
        args.push("-c".to_string());
        args.push(c.clone());
    }
    args.push(p(img).to_string());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vd-tool"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vd-tool io");
    if let Some(d) = delay {
        std::thread::sleep(d);
        // SIGKILL; an error only means it already exited.
        let _ = child.kill();
    }
    let out = child.wait_with_output().expect("wait for vd-tool io");
    let killed = !out.status.success();
    if delay.is_none() {
        assert!(out.status.success(), "{}", show(&out));
    }
    let stdout = text(&out.stdout);
    // Only whole lines count; one line per completed command, in order.
    let done: Vec<&str> = stdout
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim_end)
        .collect();
    assert!(done.len() <= cmds.len());
    for (line, (cmd, _)) in done.iter().zip(&cmds) {
        let expect = if cmd == "flush" { "flushed" } else { "wrote " };
        assert!(line.starts_with(expect), "{line:?} for {cmd:?}");
    }
    let last_flush = done.iter().rposition(|l| *l == "flushed");
    let mut fates = vec![Fate::Never; CRASH_WRITES as usize];
    for (idx, (_, write)) in cmds.iter().enumerate() {
        let Some(i) = write else { continue };
        fates[*i as usize] = if last_flush.is_some_and(|f| idx < f) {
            Fate::Durable
        } else if idx <= done.len() {
            Fate::Maybe
        } else {
            Fate::Never
        };
    }
    (fates, killed)
}

/// Checks the disk (as a raw file) against the fates.
fn check_fates(raw: &Path, fates: &[Fate], size: u64, what: &str) {
    let f = File::open(raw).expect("open the raw copy");
    assert_eq!(f.metadata().unwrap().len(), size, "{what}: raw size");
    let zeros = vec![0u8; (2 * MIB) as usize];
    let read = |off: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).expect("read the raw copy");
        buf
    };
    let mut pos = 0;
    for (i, &fate) in fates.iter().enumerate() {
        let (off, len, pat) = crash_write(i as u64);
        assert!(
            read(pos, off - pos) == zeros[..(off - pos) as usize],
            "{what}: non-zero data before write {i}"
        );
        let got = read(off, len);
        match fate {
            Fate::Durable => assert!(
                got == vec![pat; len as usize],
                "{what}: flushed write {i} ({pat:#04x} at {off}, {len} bytes) did not survive"
            ),
            Fate::Maybe => assert!(
                got.iter().all(|&b| b == 0 || b == pat),
                "{what}: unflushed write {i} holds foreign data"
            ),
            Fate::Never => assert!(
                got == zeros[..len as usize],
                "{what}: write {i} was never issued but its range holds data"
            ),
        }
        pos = off + len;
    }
    assert!(
        read(pos, size - pos) == zeros[..(size - pos) as usize],
        "{what}: non-zero data after the last write"
    );
}

#[test]
fn killed_writer_leaves_an_image_both_repairs_agree_on() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let size = CRASH_WRITES * CRASH_SLOT + MIB;
    let create = |img: &Path| {
        vd_ok(&[
            "create",
            "-f",
            "vhdx",
            "-o",
            "block_size=1M",
            p(img),
            &size.to_string(),
        ]);
    };

    // An uninterrupted run: every write durable; it also times the run.
    let full = dir.path().join("full.vhdx");
    create(&full);
    let t = Instant::now();
    let (fates, _) = crash_run(&full, None);
    let total = t.elapsed();
    assert!(fates.iter().all(|&f| f == Fate::Durable));
    let raw = dir.path().join("full.raw");
    vd_ok(&["convert", "-O", "raw", p(&full), p(&raw)]);
    check_fates(&raw, &fates, size, "uninterrupted");
    let check = qemu_img(&["check", "-f", "vhdx", p(&full)]);
    assert_eq!(check.status.code(), Some(0), "{}", show(&check));

    let mut killed_runs = 0;
    let fractions = [0.0, 0.03, 0.1, 0.2, 0.35, 0.5, 0.65, 0.8, 0.95];
    for (n, frac) in fractions.into_iter().enumerate() {
        let img = dir.path().join(format!("crash{n}.vhdx"));
        create(&img);
        let delay = total.mul_f64(frac);
        let (fates, killed) = crash_run(&img, Some(delay));
        killed_runs += usize::from(killed);
        let what = format!("killed after {delay:?}");
        let durable = fates.iter().filter(|&&f| f == Fate::Durable).count();

        let by_qemu = dir.path().join(format!("crash{n}-qemu.vhdx"));
        let by_us = dir.path().join(format!("crash{n}-vd.vhdx"));
        std::fs::copy(&img, &by_qemu).unwrap();
        std::fs::copy(&img, &by_us).unwrap();
        let r = qemu_img(&["check", "-r", "all", "-f", "vhdx", p(&by_qemu)]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{what}: qemu-img check -r all: {}",
            show(&r)
        );
        let r = vd(&["check", "-r", p(&by_us)]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{what}: vd-tool check -r: {}",
            show(&r)
        );
        for repaired in [&by_qemu, &by_us] {
            let c = qemu_img(&["check", "-f", "vhdx", p(repaired)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", show(&c));
            let c = vd(&["check", p(repaired)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", show(&c));
        }
        let c = qemu_img(&[
            "compare",
            "-f",
            "vhdx",
            "-F",
            "vhdx",
            p(&by_qemu),
            p(&by_us),
        ]);
        assert_eq!(
            c.status.code(),
            Some(0),
            "{what}: repairs differ: {}",
            show(&c)
        );
        vd_ok(&["compare", p(&by_qemu), p(&by_us)]);

        // Every flushed write reads back, in qemu-io and in ours.
        let reads: Vec<String> = fates
            .iter()
            .enumerate()
            .filter(|&(_, &f)| f == Fate::Durable)
            .map(|(i, _)| {
                let (off, len, pat) = crash_write(i as u64);
                format!("read -P {pat:#04x} {off} {len}")
            })
            .collect();
        if !reads.is_empty() {
            let mut args = strings(&["-f", "vhdx", "-r"]);
            args.extend(with_c(&reads));
            args.push(p(&by_qemu).to_string());
            let o = ok("qemu-io", &args);
            assert!(!text(&o.stdout).contains("verification failed"), "{what}");
            let mut args = strings(&["io", "-r"]);
            args.extend(with_c(&reads));
            args.push(p(&by_us).to_string());
            vd_ok(&args);
        }
        let raw = dir.path().join(format!("crash{n}.raw"));
        vd_ok(&["convert", "-O", "raw", p(&by_us), p(&raw)]);
        check_fates(&raw, &fates, size, &what);
        eprintln!("{what}: {durable} flushed writes, killed: {killed}");
        for f in [&img, &by_qemu, &by_us, &raw] {
            std::fs::remove_file(f).unwrap();
        }
    }
    assert!(
        killed_runs >= fractions.len() / 2,
        "only {killed_runs} of {} runs were killed before they finished",
        fractions.len()
    );
}
