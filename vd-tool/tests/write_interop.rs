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

use std::ffi::OsStr;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use vd_tests::hash::sha256_chunks;
use vd_tests::peers::{Peer, require};
use vd_tests::process::{output, run_ok, show, stdout};
use vd_tests::readers::libvhdi_read;
use vd_tests::{qemu, s, vd_tool_fns};

vd_tool_fns!();

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

// ---------------------------------------------------------------------------------------------
// Running the tools

fn strings<S: AsRef<str>>(args: &[S]) -> Vec<String> {
    args.iter().map(|a| a.as_ref().to_string()).collect()
}

fn qemu() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
}

/// pyvhdi is required too (.ci/run installs it).
fn pyvhdi() {
    require(&[Peer::Pyvhdi]);
}

fn qemu_img<S: AsRef<OsStr>>(args: &[S]) -> Output {
    output("qemu-img", args)
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

/// Writes `ops` into `img` with `vd-tool io`.
fn vd_write(img: &Path, ops: &[Op]) {
    let mut args = strings(&["io"]);
    args.extend(io_args(ops));
    args.push(s(img).to_string());
    vd_ok(&args);
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

    /// Zeros a range; large ranges become holes (util-linux `fallocate --punch-hole`), so that
    /// the reference stays sparse and comparing it stays fast.
    fn zero(&self, off: u64, len: u64) {
        if len < 64 * KIB {
            return self.fill(off, len, 0);
        }
        run_ok(
            "fallocate",
            &strings(&[
                "--punch-hole",
                "--offset",
                &off.to_string(),
                "--length",
                &len.to_string(),
                s(&self.path),
            ]),
        );
    }

    /// Applies the ops; discard counts as zeroing (our writer and qemu both read discarded
    /// ranges as zeros).
    fn apply(&mut self, ops: &[Op]) {
        for &op in ops {
            let (off, len) = op.range();
            assert!(off + len <= self.size, "{op:?} is outside the disk");
            match op {
                Op::Write { pat, .. } => self.fill(off, len, pat),
                Op::Zero { .. } | Op::Discard { .. } => self.zero(off, len),
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
        sha256_chunks(&self.path, MIB)
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

fn with_c(cmds: &[String]) -> Vec<String> {
    cmds.iter()
        .flat_map(|c| ["-c".to_string(), c.clone()])
        .collect()
}

// ---------------------------------------------------------------------------------------------
// Readers

/// Images up to this size are also compared directly (`qemu-img compare REF.raw IMG.vhdx`).
/// QEMU's vhdx driver reports no block status, so a direct compare reads every byte of both
/// files; for larger disks that takes tens of seconds.
const DIRECT_COMPARE_MAX: u64 = 512 * MIB;

/// `qemu-img compare` of the reference with the image, exit code 0. Larger images are first
/// read whole by qemu (`qemu-img convert -f vhdx -O qcow2`, which detects zeros) and the qcow2
/// copy is compared, which block status makes fast.
fn qemu_compare(reference: &Reference, img: &Path) {
    let mut targets = vec![(img.to_path_buf(), "vhdx")];
    if reference.size > DIRECT_COMPARE_MAX {
        let qcow2 = img.with_extension("by-qemu.qcow2");
        run_ok(
            "qemu-img",
            &strings(&["convert", "-f", "vhdx", "-O", "qcow2", s(img), s(&qcow2)]),
        );
        targets = vec![(qcow2, "qcow2")];
    }
    for (target, fmt) in &targets {
        let cmp = qemu_img(&[
            "compare",
            "-f",
            "raw",
            "-F",
            fmt,
            s(&reference.path),
            s(target),
        ]);
        assert_eq!(
            cmp.status.code(),
            Some(0),
            "qemu-img compare {} {}: {}",
            reference.path.display(),
            target.display(),
            show(&cmp)
        );
        if *fmt == "qcow2" {
            std::fs::remove_file(target).expect("remove the qcow2 copy");
        }
    }
}

/// qemu-img check is clean, qemu-img compare against the reference is identical, and qemu-io
/// reads every touched range as the reference holds it.
fn verify_in_qemu(img: &Path, reference: &Reference) {
    let check = qemu_img(&["check", "-f", "vhdx", s(img)]);
    assert_eq!(
        check.status.code(),
        Some(0),
        "qemu-img check {}: {}",
        img.display(),
        show(&check)
    );
    qemu_compare(reference, img);
    let mut args = strings(&["-f", "vhdx", "-r"]);
    args.extend(with_c(&reference.expected_reads()));
    args.push(s(img).to_string());
    let o = run_ok("qemu-io", &args);
    assert!(
        !stdout(&o).contains("verification failed"),
        "qemu-io read back {}: {}",
        img.display(),
        show(&o)
    );
}

/// Our check is clean, our compare against the reference is identical, and `vd-tool io -r`
/// reads every touched range as the reference holds it.
fn verify_in_ours(img: &Path, reference: &Reference, parents: &[&Path]) {
    if parents.is_empty() {
        vd_ok(&["check", s(img)]);
    }
    let mut cmp = vec!["compare".to_string()];
    cmp.push(s(&reference.path).to_string());
    cmp.push(s(img).to_string());
    vd_ok(&cmp);
    let mut args = strings(&["io", "-r"]);
    args.extend(with_c(&reference.expected_reads()));
    args.push(s(img).to_string());
    vd_ok(&args);
}

/// `vd-tool convert -O raw` of the disk (through its parents), hashed.
fn ours_sha256(img: &Path, dir: &Path) -> (String, Vec<String>) {
    let out = dir.join(format!(
        "{}.ours.raw",
        img.file_name().and_then(|n| n.to_str()).expect("a name")
    ));
    vd_ok(&["convert", "-O", "raw", s(img), s(&out)]);
    sha256_chunks(&out, MIB)
}

fn info(img: &Path) -> serde_json::Value {
    let o = vd_ok(&["--output", "json", "info", s(img)]);
    serde_json::from_slice(&o.stdout).expect("info JSON")
}

// ---------------------------------------------------------------------------------------------
// The write pattern

/// Writes that cross block boundaries, are unaligned in offset and length, zero and discard
/// parts of blocks and whole blocks (after data went there), and touch the last sector. Ops
/// that do not fit in `size` are left out.
/// `vd-tool create -f vhdx -o OPTS IMG SIZE`, which must succeed.
fn vd_create(img: &Path, opts: &str, size: u64) {
    vd_ok(&[
        "create",
        "-f",
        "vhdx",
        "-o",
        opts,
        s(img),
        &size.to_string(),
    ]);
}

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
    pyvhdi();
    let dir = tempfile::tempdir().unwrap();
    // (subformat, block size, virtual size)
    // (subformat, block size, virtual size, more options)
    let configs: &[(&str, u64, u64, &str)] = &[
        ("dynamic", MIB, 6 * GIB, ""),
        ("dynamic", 32 * MIB, 230 * MIB + 512, ""),
        // Few blocks: every present 256 MiB block is read whole by each check.
        ("dynamic", 256 * MIB, 600 * MIB, ""),
        ("dynamic", 2 * MIB, 50 * MIB, ",log_size=8M"),
        ("fixed", MIB, 40 * MIB, ""),
        ("fixed", 32 * MIB, 210 * MIB + 3584, ""),
    ];
    for &(sub, bs, size, more) in configs {
        let name = format!("{sub}-{}M{more}", bs / MIB);
        let img = dir.path().join(format!("{name}.vhdx"));
        let opts = format!("subformat={sub},block_size={}M{more}", bs / MIB);
        vd_create(&img, &opts, size);
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
        if bs == 256 * MIB {
            // A whole block zeroed after data went there, written again (a new allocation),
            // then discarded whole.
            ops.extend([
                Op::Zero { off: bs, len: bs },
                w(bs + 5, 10, 0x25),
                Op::Discard { off: bs, len: bs },
                w(bs - 1, 2, 0x26),
            ]);
        }
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        vd_write(&img, &ops);
        verify_in_qemu(&img, &reference);
        verify_in_ours(&img, &reference, &[]);
        let qi = qemu_img(&["info", "--output=json", "-f", "vhdx", s(&img)]);
        let v: serde_json::Value = serde_json::from_slice(&qi.stdout).expect("qemu-img info");
        assert_eq!(v["virtual-size"], size, "{name}");
        assert_eq!(v["cluster-size"], bs, "{name}");
        if size <= 256 * MIB {
            assert_libvhdi_reads(&img, &[], &reference, &name);
        }
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
        vd_create(&img, &opts, size);
        let ops = ops_for(MIB, size);
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        vd_write(&img, &ops);

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
    pyvhdi();
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.raw");
    let size = raw_source(&src);
    let data = std::fs::read(&src).unwrap();
    let reference = Reference::new(dir.path().join("ref.raw"), size);
    reference.file.write_all_at(&data, 0).unwrap();
    // A fixed image (every block allocated) and a 4 KiB-sector one (which qemu cannot open;
    // libvhdi and ours read it).
    for (opts, logical) in [
        ("subformat=fixed,block_size=2M", 512),
        ("logical_sector_size=4096", 4096),
    ] {
        let dst = dir.path().join(format!("dst-{logical}.vhdx"));
        vd_ok(&["convert", "-O", "vhdx", "-o", opts, s(&src), s(&dst)]);
        vd_ok(&["check", s(&dst)]);
        vd_ok(&["compare", "-s", s(&src), s(&dst)]);
        assert_libvhdi_reads(&dst, &[], &reference, opts);
        if logical == 512 {
            verify_in_qemu(&dst, &reference);
        }
    }
    for bs in [MIB, 2 * MIB, 32 * MIB] {
        let dst = dir.path().join(format!("dst-{}M.vhdx", bs / MIB));
        let mut args = strings(&["convert", "-O", "vhdx"]);
        if bs != 32 * MIB {
            args.extend(strings(&["-o", &format!("block_size={}M", bs / MIB)]));
        }
        args.extend(strings(&[s(&src), s(&dst)]));
        vd_ok(&args);
        let check = qemu_img(&["check", "-f", "vhdx", s(&dst)]);
        assert_eq!(check.status.code(), Some(0), "{}", show(&check));
        run_ok(
            "qemu-img",
            &strings(&["compare", "-f", "raw", "-F", "vhdx", s(&src), s(&dst)]),
        );
        run_ok(
            "qemu-img",
            &strings(&["compare", "-f", "vhdx", "-F", "raw", s(&dst), s(&src)]),
        );
        vd_ok(&["compare", s(&dst), s(&src)]);
        vd_ok(&["compare", "-s", s(&src), s(&dst)]);

        // Data extents cover exactly the blocks that hold a non-zero byte.
        let m = vd_ok(&["--output", "json", "map", s(&dst)]);
        let (v, extents) = vd_tests::tool::map_lines(&m.stdout);
        assert_eq!(v["virtual_size"], size);
        let blocks = size.div_ceil(bs);
        let mut mapped = vec![false; blocks as usize];
        for e in &extents {
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
        args.extend(strings(&[s(&img), &size.to_string()]));
        run_ok("qemu-img", &args);
        let qi = qemu_img(&["info", "--output=json", "-f", "vhdx", s(&img)]);
        let v: serde_json::Value = serde_json::from_slice(&qi.stdout).expect("qemu-img info");
        let bs = v["cluster-size"].as_u64().expect("cluster-size");
        let mut ops = ops_for(bs, size);
        if size > 4 * GIB {
            ops.extend([w(4 * GIB - 513, 1025, 0x31), w(4 * GIB + 7 * MIB, 5, 0x32)]);
        }
        let mut reference = Reference::new(dir.path().join(format!("{name}.raw")), size);
        reference.apply(&ops);
        vd_write(&img, &ops);
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
        vd_create(&img, &opts, size);
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
        args.push(s(&img).to_string());
        run_ok("qemu-io", &args);
        verify_in_ours(&img, &reference, &[]);
        verify_in_qemu(&img, &reference);
        // A wrong pattern is exit code 1, and says where.
        let o = vd(&["io", "-r", "-c", "read -P 0x12 777 513", s(&img)]);
        assert_eq!(o.status.code(), Some(1), "{}", show(&o));
        assert!(
            stdout(&o).contains("Pattern verification failed at offset 777"),
            "{}",
            show(&o)
        );
        // Sessions taking turns: ours over qemu's, then qemu's over ours.
        let ours = [
            w(bs / 2, bs, 0x51),
            w(1500, 100, 0x52),
            Op::Zero {
                off: bs / 2 + 10,
                len: 20,
            },
            w(size - 700, 600, 0x53),
        ];
        reference.apply(&ours);
        vd_write(&img, &ours);
        verify_in_qemu(&img, &reference);
        let theirs = [w(bs / 2 - 5, 30, 0x54), w(1550, 3, 0x55)];
        reference.apply(&theirs);
        let mut args = strings(&["-f", "vhdx"]);
        args.extend(io_args(&theirs));
        args.push(s(&img).to_string());
        run_ok("qemu-io", &args);
        verify_in_ours(&img, &reference, &[]);
        verify_in_qemu(&img, &reference);
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Differencing chains and libvhdi

/// libvhdi reads the chain (`img` and its parents, immediate parent first) as the reference.
fn assert_libvhdi_reads(img: &Path, parents: &[&Path], reference: &Reference, what: &str) {
    let (want, want_chunks) = reference.sha256_and_chunks();
    let lib = libvhdi_read(img, parents);
    assert_eq!(lib.size, reference.size, "{what}: libvhdi size");
    assert_eq!(
        first_differing_chunk(&lib.chunks, &want_chunks),
        None,
        "{what}: libvhdi reads another disk (first differing MiB)"
    );
    assert_eq!(lib.sha256, want, "{what}: libvhdi");
}

/// Which tool made and wrote the parent of a chain.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ParentBy {
    Us,
    Qemu,
}

/// A parent full of data; a child we create over it and write into (partial blocks, unaligned
/// writes widened to sectors, writes over sectors the child already holds, whole blocks);
/// a grandchild over the child, written too. libvhdi and our reader see the same disks as the
/// reference, and `vd-tool convert` flattens the chain into an image qemu (or, for 4 KiB
/// sectors, libvhdi) reads the same. Then whole blocks zeroed in the child.
fn check_chain(dir: &Path, by: ParentBy, logical: u64) {
    let what = format!("parent by {by:?}, logical sector {logical}");
    let size = 48 * MIB;
    let parent = dir.join(format!("parent-{by:?}-{logical}.vhdx"));
    let child = dir.join(format!("child-{by:?}-{logical}.vhdx"));
    let grandchild = dir.join(format!("grandchild-{by:?}-{logical}.vhdx"));
    let parent_ops = [
        w(0, 20 * MIB, 0x61),
        w(20 * MIB, 20 * MIB, 0x62),
        w(44 * MIB + 4096, 100, 0x63),
    ];
    match by {
        ParentBy::Us => {
            let opts = format!("block_size=1M,logical_sector_size={logical}");
            vd_create(&parent, &opts, size);
            vd_write(&parent, &parent_ops);
        }
        ParentBy::Qemu => {
            assert_eq!(logical, 512, "qemu makes 512-byte sectors only");
            qemu::create(&parent, Some("block_size=1M"), &size.to_string());
            let mut args = strings(&["-f", "vhdx"]);
            args.extend(io_args(&parent_ops));
            args.push(s(&parent).to_string());
            run_ok("qemu-io", &args);
        }
    }
    let mut reference = Reference::new(dir.join(format!("chain-{by:?}-{logical}.raw")), size);
    reference.apply(&parent_ops);

    vd_ok(&["create", "-f", "vhdx", "-b", s(&parent), s(&child)]);
    let v = info(&child);
    assert_eq!(v["logical_sector_size"], logical, "{what}: {v}");
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
        // Over sectors the child holds and sectors it does not.
        w(3 * bs + 8000, 9000, 0x7a),
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
    vd_write(&child, &child_ops);
    vd_ok(&["check", s(&child)]);
    assert_eq!(
        ours_sha256(&child, dir).0,
        reference.sha256_and_chunks().0,
        "{what}: ours"
    );
    verify_in_ours(&child, &reference, &[&parent]);
    assert_libvhdi_reads(&child, &[&parent], &reference, &format!("{what}, child"));

    // Flattened by us, read by qemu (512-byte sectors) or libvhdi (4 KiB).
    let flat = dir.join(format!("flat-{by:?}-{logical}.vhdx"));
    vd_ok(&["convert", "-O", "vhdx", s(&child), s(&flat)]);
    if logical == 512 {
        verify_in_qemu(&flat, &reference);
    } else {
        assert_libvhdi_reads(&flat, &[], &reference, &format!("{what}, flattened"));
    }

    // A grandchild, written over both.
    vd_ok(&["create", "-f", "vhdx", "-b", s(&child), s(&grandchild)]);
    let grandchild_ops = [
        w(900, 200, 0x81),
        w(3 * bs + 4000, 5000, 0x82),
        w(5 * bs + bs / 2, bs, 0x83),
        w(30 * MIB + 1, 1, 0x84),
    ];
    reference.apply(&grandchild_ops);
    vd_write(&grandchild, &grandchild_ops);
    verify_in_ours(&grandchild, &reference, &[&child, &parent]);
    assert_libvhdi_reads(
        &grandchild,
        &[&child, &parent],
        &reference,
        &format!("{what}, grandchild"),
    );

    // Whole blocks zeroed or discarded in the grandchild read as zeros, not as the layers
    // below, in ours and in libvhdi (our writer stores them as present blocks of zeros, since
    // libvhdi 20260901 reads PAYLOAD_BLOCK_ZERO in a differencing image from the parent).
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
    vd_write(&grandchild, &zero_ops);
    let (want, _) = reference.sha256_and_chunks();
    assert_eq!(ours_sha256(&grandchild, dir).0, want, "{what}: ours");
    verify_in_ours(&grandchild, &reference, &[&child, &parent]);
    assert_libvhdi_reads(
        &grandchild,
        &[&child, &parent],
        &reference,
        &format!("{what}, grandchild after zeroing"),
    );
}

#[test]
fn differencing_chains_we_wrote_read_back_in_libvhdi_and_ours() {
    qemu();
    pyvhdi();
    let dir = tempfile::tempdir().unwrap();
    check_chain(dir.path(), ParentBy::Us, 512);
    check_chain(dir.path(), ParentBy::Us, 4096);
    check_chain(dir.path(), ParentBy::Qemu, 512);
}

/// Writes of zeros and discards that are not sector-aligned, into a differencing image: like
/// ordinary writes (which `Disk::write_at` widens to sectors), they succeed; the zeros read as
/// zeros in ours and in libvhdi, the bytes around them keep the parent's data, and a discarded
/// range reads as its old data or as zeros.
#[test]
fn unaligned_zeroing_and_discard_in_a_child_succeed() {
    pyvhdi();
    let dir = tempfile::tempdir().unwrap();
    let size = 16 * MIB;
    for logical in [512u64, 4096] {
        let parent = dir.path().join(format!("parent-{logical}.vhdx"));
        let child = dir.path().join(format!("child-{logical}.vhdx"));
        let opts = format!("block_size=1M,logical_sector_size={logical}");
        vd_create(&parent, &opts, size);
        vd_write(&parent, &[w(0, size, 0x61)]);
        vd_ok(&["create", "-f", "vhdx", "-b", s(&parent), s(&child)]);
        let mut reference = Reference::new(dir.path().join(format!("ref-{logical}.raw")), size);
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
            Op::Zero {
                off: 6 * MIB - 1,
                len: MIB + 2,
            },
        ];
        reference.apply(&ops);
        vd_write(&child, &ops);
        verify_in_ours(&child, &reference, &[&parent]);
        assert_libvhdi_reads(&child, &[&parent], &reference, &format!("{logical}"));

        // Discard may keep the data; it must not fail, nor touch what is around it.
        let (off, len) = (5 * MIB + 100, 3 * MIB);
        vd_ok(&["io", "-c", &format!("discard {off} {len}"), s(&child)]);
        let raw = dir.path().join(format!("child-{logical}.raw"));
        vd_ok(&["convert", "-O", "raw", s(&child), s(&raw)]);
        let got = std::fs::read(&raw).unwrap();
        let want = reference.read(0, size);
        let (lo, hi) = (off as usize, (off + len) as usize);
        assert!(got[..lo] == want[..lo], "{logical}: before the discard");
        assert!(got[hi..] == want[hi..], "{logical}: after the discard");
        assert!(
            got[lo..hi]
                .iter()
                .zip(&want[lo..hi])
                .all(|(&g, &w)| g == w || g == 0),
            "{logical}: the discarded range holds data it never had"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// 5. A writer killed mid-way

/// A writer's commands, and the writes among them.
struct Plan {
    /// `(offset, length, pattern)`; no two overlap.
    writes: Vec<(u64, u64, u8)>,
    /// Each command, with the index of its write (`None` for `flush`).
    cmds: Vec<(String, Option<usize>)>,
    /// The disk size.
    size: u64,
}

impl Plan {
    fn new(size: u64) -> Self {
        Self {
            writes: Vec::new(),
            cmds: Vec::new(),
            size,
        }
    }

    fn write(&mut self, off: u64, len: u64, pat: u8) {
        assert!(off + len <= self.size);
        self.cmds.push((
            format!("write -P {pat:#04x} {off} {len}"),
            Some(self.writes.len()),
        ));
        self.writes.push((off, len, pat));
    }

    fn flush(&mut self) {
        self.cmds.push(("flush".to_string(), None));
    }
}

fn pattern(i: usize) -> u8 {
    u8::try_from(i % 250 + 1).expect("a byte")
}

/// 200 writes, each inside its own 384 KiB slot (so writes never overlap, but neighbours share
/// a 1 MiB block and many cross a block boundary), unaligned in start and length; a flush after
/// every fifth. 240 commands.
fn small_plan() -> Plan {
    const SLOT: u64 = 384 * KIB;
    let mut plan = Plan::new(200 * SLOT + MIB);
    for i in 0..200u64 {
        plan.write(
            i * SLOT + (i % 7) * 1000,
            256 * KIB + (i % 3) * 4096 + (i % 5),
            pattern(i as usize),
        );
        if i % 5 == 4 {
            plan.flush();
        }
    }
    plan
}

/// On a 160 GiB disk with 1 MiB blocks every 512 MiB is described by its own 4 KiB BAT page:
/// 300 writes, each allocating a block under another BAT page (more dirty pages than the
/// writer keeps before it commits on its own), a flush, then 300 more that are never flushed.
/// Each commit spans several log entries and wraps the 1 MiB log. 601 commands.
fn many_pages_plan() -> Plan {
    let stride = 512 * MIB;
    let mut plan = Plan::new(320 * stride);
    for i in 0..300u64 {
        plan.write(i * stride + 5000 + i, 4096 + i % 3, pattern(i as usize));
    }
    plan.flush();
    for i in 0..300u64 {
        plan.write(
            i * stride + 256 * MIB + 123,
            1000,
            pattern(i as usize + 100),
        );
    }
    plan
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

/// Runs `vd-tool io` with the plan's commands; with `kill`, SIGKILLs it once it has printed
/// that many lines (completed that many commands) and slept that long more. Returns the fate
/// of each write and whether the process died before it finished.
fn crash_run(img: &Path, plan: &Plan, kill: Option<(usize, Duration)>) -> (Vec<Fate>, bool) {
    use std::io::{BufRead, BufReader, Read};
    let mut args = vec!["io".to_string()];
    for (c, _) in &plan.cmds {
        args.push("-c".to_string());
        args.push(c.clone());
    }
    args.push(s(img).to_string());
    let mut child = Command::new(env!("CARGO_BIN_EXE_vd-tool"))
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn vd-tool io");
    let mut out = BufReader::new(child.stdout.take().expect("stdout"));
    let mut stdout = String::new();
    if let Some((lines, extra)) = kill {
        let mut seen = 0;
        while seen < lines && out.read_line(&mut stdout).expect("read stdout") > 0 {
            seen += 1;
        }
        std::thread::sleep(extra);
        // SIGKILL; an error only means it already exited.
        let _ = child.kill();
    }
    out.read_to_string(&mut stdout).expect("read stdout");
    let status = child.wait().expect("wait for vd-tool io");
    if kill.is_none() {
        assert!(status.success(), "vd-tool io: {status:?}\n{stdout}");
    }
    // Only whole lines count; one line per completed command, in order.
    let done: Vec<&str> = stdout
        .split_inclusive('\n')
        .filter(|l| l.ends_with('\n'))
        .map(str::trim_end)
        .collect();
    assert!(done.len() <= plan.cmds.len());
    for (line, (cmd, _)) in done.iter().zip(&plan.cmds) {
        let expect = if cmd == "flush" { "flushed" } else { "wrote " };
        assert!(line.starts_with(expect), "{line:?} for {cmd:?}");
    }
    let last_flush = done.iter().rposition(|l| *l == "flushed");
    let mut fates = vec![Fate::Never; plan.writes.len()];
    for (idx, (_, write)) in plan.cmds.iter().enumerate() {
        let Some(i) = *write else { continue };
        fates[i] = if last_flush.is_some_and(|f| idx < f) {
            Fate::Durable
        } else if idx <= done.len() {
            Fate::Maybe
        } else {
            Fate::Never
        };
    }
    (fates, !status.success())
}

/// Checks every write's range in the disk (as a raw file) against its fate, and that
/// everything between the writes reads as zeros.
fn check_fates(raw: &Path, plan: &Plan, fates: &[Fate], what: &str) {
    let f = File::open(raw).expect("open the raw copy");
    assert_eq!(f.metadata().unwrap().len(), plan.size, "{what}: raw size");
    let zeros = vec![0u8; (2 * MIB) as usize];
    let read = |off: u64, len: u64| {
        let mut buf = vec![0u8; len as usize];
        f.read_exact_at(&mut buf, off).expect("read the raw copy");
        buf
    };
    let mut order: Vec<usize> = (0..plan.writes.len()).collect();
    order.sort_unstable_by_key(|&i| plan.writes[i].0);
    let mut pos = 0;
    for i in order {
        let (off, len, pat) = plan.writes[i];
        assert!(off >= pos, "the plan's writes overlap");
        assert!(
            read(pos, off - pos) == zeros[..(off - pos) as usize],
            "{what}: non-zero data before write {i}"
        );
        let got = read(off, len);
        match fates[i] {
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
        read(pos, plan.size - pos) == zeros[..(plan.size - pos) as usize],
        "{what}: non-zero data after the last write"
    );
}

/// `vd-tool map`'s extents: start, length, state.
fn map_extents(img: &Path) -> Vec<(u64, u64, String)> {
    let m = vd_ok(&["--output", "json", "map", s(img)]);
    let (_, extents) = vd_tests::tool::map_lines(&m.stdout);
    extents
        .iter()
        .map(|e| {
            (
                e["start"].as_u64().expect("start"),
                e["length"].as_u64().expect("length"),
                e["state"].as_str().expect("state").to_string(),
            )
        })
        .collect()
}

/// Offsets of the `read` commands whose pattern check failed in qemu-io (which runs every
/// command and prints a `read ... at offset OFF` line for each, after its failure line).
fn qemu_io_failed_reads(img: &Path, reads: &[String]) -> Vec<u64> {
    if reads.is_empty() {
        return Vec::new();
    }
    let mut args = strings(&["-f", "vhdx", "-r"]);
    args.extend(with_c(reads));
    args.push(s(img).to_string());
    let o = output("qemu-io", &args);
    let mut failed = Vec::new();
    let mut pending = false;
    let mut done = 0;
    for line in stdout(&o).lines() {
        if line.starts_with("Pattern verification failed") {
            pending = true;
        } else if let Some(at) = line.split(" at offset ").nth(1)
            && line.starts_with("read ")
        {
            done += 1;
            if pending {
                failed.push(at.trim().parse().expect("an offset"));
            }
            pending = false;
        }
    }
    assert_eq!(done, reads.len(), "qemu-io ran every read: {}", show(&o));
    failed
}

/// Checks the fates through qemu-io alone: durable writes read as their pattern, writes never
/// issued as zeros, the others as their pattern or as zeros (a 4 KiB write is not torn).
fn check_fates_in_qemu(img: &Path, plan: &Plan, fates: &[Fate], what: &str) {
    let read = |i: usize, zero: bool| {
        let (off, len, pat) = plan.writes[i];
        format!("read -P {:#04x} {off} {len}", if zero { 0 } else { pat })
    };
    let firm: Vec<String> = (0..fates.len())
        .filter(|&i| fates[i] != Fate::Maybe)
        .map(|i| read(i, fates[i] == Fate::Never))
        .collect();
    let bad = qemu_io_failed_reads(img, &firm);
    assert!(bad.is_empty(), "{what}: writes at {bad:?} read wrong");
    // The parsing above sees failures: a wrong pattern over the first write is one.
    let (off, len, pat) = plan.writes[0];
    let wrong = format!("read -P {:#04x} {off} {len}", pat ^ 0xff);
    assert_eq!(qemu_io_failed_reads(img, &[wrong]), [off], "{what}");
    let maybe: Vec<usize> = (0..fates.len())
        .filter(|&i| fates[i] == Fate::Maybe)
        .collect();
    let as_written = qemu_io_failed_reads(
        img,
        &maybe.iter().map(|&i| read(i, false)).collect::<Vec<_>>(),
    );
    let as_zero: Vec<String> = maybe
        .iter()
        .filter(|&&i| as_written.contains(&plan.writes[i].0))
        .map(|&i| read(i, true))
        .collect();
    let bad = qemu_io_failed_reads(img, &as_zero);
    assert!(
        bad.is_empty(),
        "{what}: unflushed writes at {bad:?} read neither as written nor as zeros"
    );
}

/// The BAT region's bytes (found through the first region table).
fn bat_bytes(img: &Path) -> Vec<u8> {
    const BAT_GUID: [u8; 16] = [
        0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a,
        0x08,
    ];
    let f = File::open(img).expect("open the image");
    let mut rt = vec![0u8; 64 * KIB as usize];
    f.read_exact_at(&mut rt, 192 * KIB).expect("region table");
    assert_eq!(&rt[..4], b"regi", "{}: region table", img.display());
    let count = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    for e in rt[16..].chunks_exact(32).take(count) {
        if e[..16] == BAT_GUID {
            let off = u64::from_le_bytes(e[16..24].try_into().unwrap());
            let len = u32::from_le_bytes(e[24..28].try_into().unwrap());
            let mut bat = vec![0u8; len as usize];
            f.read_exact_at(&mut bat, off).expect("read the BAT");
            return bat;
        }
    }
    panic!("{}: no BAT region", img.display());
}

/// Kills a writer of `plan` at each of `kills` (lines seen, then milliseconds), then requires:
/// `qemu-img check -r all` and `vd-tool check -r` (each on its own copy) both succeed and give
/// the same BAT and the same disk; both copies check clean in both tools; the unrepaired image
/// reads (read-only, replaying the log in memory) like the repaired ones; every flushed write
/// reads back in qemu-io and in ours; no write that was never issued left data. With
/// `full_pass` every byte of the disk is read (through `vd-tool compare` and a raw copy);
/// without, maps and qemu-io reads of the written ranges stand in for that.
fn crash_and_repair(dir: &Path, plan: &Plan, kills: &[(usize, u64)], full_pass: bool) {
    let create = |img: &Path| {
        vd_create(img, "block_size=1M", plan.size);
    };
    let mut killed_runs = 0;
    for (n, &(lines, ms)) in kills.iter().enumerate() {
        let img = dir.join(format!("crash{n}.vhdx"));
        create(&img);
        let (fates, killed) = crash_run(&img, plan, Some((lines, Duration::from_millis(ms))));
        killed_runs += usize::from(killed);
        let what = format!("killed after {lines} lines and {ms} ms");
        let durable = fates.iter().filter(|&&f| f == Fate::Durable).count();

        let by_qemu = dir.join(format!("crash{n}-qemu.vhdx"));
        let by_us = dir.join(format!("crash{n}-vd.vhdx"));
        for copy in [&by_qemu, &by_us] {
            run_ok("cp", &strings(&["--sparse=always", s(&img), s(copy)]));
        }
        let r = qemu_img(&["check", "-r", "all", "-f", "vhdx", s(&by_qemu)]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{what}: qemu-img check -r all: {}",
            show(&r)
        );
        let r = vd(&["check", "-r", s(&by_us)]);
        assert_eq!(
            r.status.code(),
            Some(0),
            "{what}: vd-tool check -r: {}",
            show(&r)
        );
        for repaired in [&by_qemu, &by_us] {
            let c = qemu_img(&["check", "-f", "vhdx", s(repaired)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", show(&c));
            let c = vd(&["check", s(repaired)]);
            assert_eq!(c.status.code(), Some(0), "{what}: {}", show(&c));
        }
        assert!(
            bat_bytes(&by_qemu) == bat_bytes(&by_us),
            "{what}: the two repairs left different BATs"
        );
        if plan.size <= DIRECT_COMPARE_MAX {
            let c = qemu_img(&[
                "compare",
                "-f",
                "vhdx",
                "-F",
                "vhdx",
                s(&by_qemu),
                s(&by_us),
            ]);
            assert_eq!(
                c.status.code(),
                Some(0),
                "{what}: repairs differ: {}",
                show(&c)
            );
        }
        // The repairs change metadata only, so equal BATs make equal disks. Reading all data
        // through both is a full pass over the disk, kept to the small plan; the large one
        // compares maps (the unrepaired image read-only, replaying its log in memory).
        if full_pass {
            vd_ok(&["compare", s(&by_qemu), s(&by_us)]);
            vd_ok(&["compare", s(&img), s(&by_us)]);
        } else {
            let unrepaired = map_extents(&img);
            assert_eq!(unrepaired, map_extents(&by_us), "{what}: maps differ");
            assert_eq!(unrepaired, map_extents(&by_qemu), "{what}: maps differ");
        }

        // Every flushed write reads back, in qemu-io and in ours.
        let reads: Vec<String> = fates
            .iter()
            .enumerate()
            .filter(|&(_, &f)| f == Fate::Durable)
            .map(|(i, _)| {
                let (off, len, pat) = plan.writes[i];
                format!("read -P {pat:#04x} {off} {len}")
            })
            .collect();
        if !reads.is_empty() {
            let mut args = strings(&["-f", "vhdx", "-r"]);
            args.extend(with_c(&reads));
            args.push(s(&by_qemu).to_string());
            let o = run_ok("qemu-io", &args);
            assert!(!stdout(&o).contains("verification failed"), "{what}");
            let mut args = strings(&["io", "-r"]);
            args.extend(with_c(&reads));
            args.push(s(&by_us).to_string());
            vd_ok(&args);
        }
        if full_pass {
            let raw = dir.join(format!("crash{n}.raw"));
            vd_ok(&["convert", "-O", "raw", s(&by_us), s(&raw)]);
            check_fates(&raw, plan, &fates, &what);
            std::fs::remove_file(&raw).unwrap();
        } else {
            check_fates_in_qemu(&by_qemu, plan, &fates, &what);
            // Data only in blocks some write touched.
            let mut blocks: Vec<u64> = plan
                .writes
                .iter()
                .flat_map(|&(off, len, _)| off / MIB..(off + len).div_ceil(MIB))
                .collect();
            blocks.sort_unstable();
            for (start, len, state) in map_extents(&by_us) {
                if state != "data" {
                    continue;
                }
                for b in start / MIB..(start + len).div_ceil(MIB) {
                    assert!(
                        blocks.binary_search(&b).is_ok(),
                        "{what}: block {b} holds data no write put there"
                    );
                }
            }
        }
        eprintln!("{what}: {durable} flushed writes, killed: {killed}");
        for f in [&img, &by_qemu, &by_us] {
            std::fs::remove_file(f).unwrap();
        }
    }
    assert!(
        killed_runs + 1 >= kills.len(),
        "only {killed_runs} of {} runs were killed before they finished",
        kills.len()
    );
}

#[test]
fn killed_writer_leaves_an_image_both_repairs_agree_on() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let plan = small_plan();

    // An uninterrupted run: every write durable.
    let full = dir.path().join("full.vhdx");
    vd_create(&full, "block_size=1M", plan.size);
    let (fates, _) = crash_run(&full, &plan, None);
    assert!(fates.iter().all(|&f| f == Fate::Durable));
    let raw = dir.path().join("full.raw");
    vd_ok(&["convert", "-O", "raw", s(&full), s(&raw)]);
    check_fates(&raw, &plan, &fates, "uninterrupted");
    let check = qemu_img(&["check", "-f", "vhdx", s(&full)]);
    assert_eq!(check.status.code(), Some(0), "{}", show(&check));

    // Kill points: after so many completed commands (of 240), then a few more milliseconds.
    let kills = [
        (0, 0),
        (0, 15),
        (4, 1),
        (6, 0),
        (30, 2),
        (95, 0),
        (160, 3),
        (233, 1),
    ];
    crash_and_repair(dir.path(), &plan, &kills, true);
}

#[test]
fn killed_writer_of_many_metadata_pages_leaves_an_image_both_repairs_agree_on() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let plan = many_pages_plan();
    // Line 301 is the flush. Kill after the first writes' own commit (257 dirty pages), right
    // after the flush, and after the unflushed writes' own commit.
    let kills = [(280, 0), (301, 0), (560, 0), (590, 1)];
    crash_and_repair(dir.path(), &plan, &kills, false);
}
