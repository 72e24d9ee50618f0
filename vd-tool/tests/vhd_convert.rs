//! Conversions with VHD, through the `vd-tool` binary: every pair of raw, fixed VHD, dynamic
//! VHD and VHDX in both directions on a disk with holes, zero runs and data whose size is not a
//! multiple of any block size; differencing chains (VHDX, the corpus's Windows VHD child, and a
//! VHD chain we make) flattened into each format; the image UUID kept; `azure=on` (fixed, whole
//! MiB, a note when the size is rounded); and interop: what we write reads back identically in
//! qemu-img and libvhdi (`pyvhdi`), and VHDs qemu-img made convert to what qemu reads.
//!
//! Every content check compares against a reference built by the test itself (a raw file, or
//! the bytes the same writes give). The peers are required: a missing qemu-img, qemu-io or
//! pyvhdi fails the test with the command that installs it.
//!
//! The oracles' known limits, each handled where it matters: QEMU takes the CHS product as the
//! size for creators `vpc ` and `qemu` (we check qemu reads our current size), it neither
//! creates nor reads VHD differencing images, and `qemu-img check` does not support vpc (VHDX
//! outputs are checked with it, VHD ones are not); libvhdi reads a sector-bitmap bit without
//! masking it, so in a differencing image a sector whose bit is clear reads from the child
//! when an earlier sector of the same bitmap byte is present: libvhdi's reading of our
//! differencing images is compared only outside such bitmap bytes.

use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};

use backend_raw as _;
use backend_vhd as _;
use backend_vhdx as _;
use serde_json::Value;
use vd_core::{Disk, DiskOptions, Registry};
use vd_tests::hash::sha256;
use vd_tests::peers::{Peer, require};
use vd_tests::process::{output, run_ok, show, stderr};
use vd_tests::readers::libvhdi_read;
use vd_tests::{corpus, s, vd_tool_fns};

vd_tool_fns!();

const MIB: u64 = 1 << 20;
/// The test disk's size: 37 MiB and 3 sectors, a multiple of 512 and of no block size.
const SIZE: u64 = 37 * MIB + 3 * 512;

// ---------------------------------------------------------------------------------------------
// The reference disk

/// Bytes that are never a long run of zeros, different at every offset and for every `seed`.
fn data(seed: u64, off: u64, len: u64) -> Vec<u8> {
    (off..off + len)
        .map(|i| {
            let x = (i ^ seed.rotate_left(17))
                .wrapping_mul(0x9E37_79B9_7F4A_7C15)
                .rotate_right(29);
            (x as u8) | 1
        })
        .collect()
}

/// One change to a disk, applied both to an image (by `vd-tool io`) and to the reference bytes.
#[derive(Debug, Clone, Copy)]
enum Op {
    /// `len` bytes of [`data`] with this seed at `off`.
    Data { seed: u64, off: u64, len: u64 },
    /// `len` bytes of `byte` at `off` (`vd-tool io -c 'write -P byte off len'`).
    Pattern { byte: u8, off: u64, len: u64 },
    /// `len` zeros written at `off` (allocated zeros in a raw file, `write -z` in an image).
    Zero { off: u64, len: u64 },
}

impl Op {
    fn range(self) -> (u64, u64) {
        match self {
            Op::Data { off, len, .. } | Op::Pattern { off, len, .. } | Op::Zero { off, len } => {
                (off, len)
            }
        }
    }

    fn apply(self, disk: &mut [u8]) {
        let (off, len) = self.range();
        let at = off as usize..(off + len) as usize;
        match self {
            Op::Data { seed, .. } => disk[at].copy_from_slice(&data(seed, off, len)),
            Op::Pattern { byte, .. } => disk[at].fill(byte),
            Op::Zero { .. } => disk[at].fill(0),
        }
    }
}

/// The layout of the reference disk: data at the start, an unaligned run, allocated zeros,
/// data across a 2 MiB boundary, a full 2 MiB block, and the last five sectors; the rest holes.
fn reference_ops(size: u64) -> Vec<Op> {
    vec![
        Op::Data {
            seed: 1,
            off: 0,
            len: MIB,
        },
        Op::Data {
            seed: 2,
            off: MIB + 512,
            len: 64 * 1024 - 1024,
        },
        Op::Zero {
            off: 3 * MIB,
            len: 4 * MIB,
        },
        Op::Data {
            seed: 3,
            off: 10 * MIB - 4096,
            len: 12 * 1024,
        },
        Op::Data {
            seed: 4,
            off: 20 * MIB,
            len: 2 * MIB,
        },
        Op::Zero {
            off: 21 * MIB,
            len: 4096,
        },
        Op::Data {
            seed: 5,
            off: size - 5 * 512,
            len: 5 * 512,
        },
    ]
}

/// A sparse raw file of `size` bytes holding `ops` (zeros written where an op says so, holes
/// elsewhere); returns its contents.
fn write_raw(path: &Path, size: u64, ops: &[Op]) -> Vec<u8> {
    let mut disk = vec![0u8; size as usize];
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    for op in ops {
        op.apply(&mut disk);
        let (off, len) = op.range();
        f.write_all_at(&disk[off as usize..(off + len) as usize], off)
            .unwrap();
    }
    f.sync_all().unwrap();
    disk
}

/// The reference raw disk of [`SIZE`] bytes in `dir`, and its content hash.
fn reference(dir: &Path) -> (PathBuf, String) {
    let path = dir.join("reference.raw");
    let disk = write_raw(&path, SIZE, &reference_ops(SIZE));
    (path, sha256(&disk))
}

// ---------------------------------------------------------------------------------------------
// Formats and reading

/// An output of `vd-tool convert`: a format and the options that choose its kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fmt {
    Raw,
    VhdFixed,
    VhdDynamic,
    Vhdx,
}

const ALL: [Fmt; 4] = [Fmt::Raw, Fmt::VhdFixed, Fmt::VhdDynamic, Fmt::Vhdx];

impl Fmt {
    fn name(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::VhdFixed => "vhd-fixed",
            Fmt::VhdDynamic => "vhd-dynamic",
            Fmt::Vhdx => "vhdx",
        }
    }

    /// `-O` and `-o` for convert.
    fn args(self) -> &'static [&'static str] {
        match self {
            Fmt::Raw => &["-O", "raw"],
            Fmt::VhdFixed => &["-O", "vhd", "-o", "subformat=fixed"],
            // Dynamic is the default.
            Fmt::VhdDynamic => &["-O", "vhd"],
            Fmt::Vhdx => &["-O", "vhdx"],
        }
    }

    /// The format `vd-tool info` and qemu-img name.
    fn format(self) -> &'static str {
        match self {
            Fmt::Raw => "raw",
            Fmt::VhdFixed | Fmt::VhdDynamic => "vhd",
            Fmt::Vhdx => "vhdx",
        }
    }

    /// Checks that `path` is an image of this kind holding a disk of `size` bytes, from the
    /// file itself (and `vd-tool info`).
    #[track_caller]
    fn assert_is(self, path: &Path, size: u64) {
        let info = info(path);
        assert_eq!(info["format"], self.format(), "{}: {info}", path.display());
        assert_eq!(info["virtual_size"], size, "{}: {info}", path.display());
        let len = std::fs::metadata(path).unwrap().len();
        match self {
            Fmt::Raw => assert_eq!(len, size, "{}", path.display()),
            Fmt::VhdFixed => {
                assert_eq!(len, size + 512, "{}", path.display());
                footer(path).assert_new(path, size, DISK_FIXED);
            }
            Fmt::VhdDynamic => {
                footer(path).assert_new(path, size, DISK_DYNAMIC);
                // A dynamic image starts with a copy of its footer.
                let mut copy = [0u8; 512];
                std::fs::File::open(path)
                    .unwrap()
                    .read_exact_at(&mut copy, 0)
                    .unwrap();
                assert_eq!(footer_bytes(path), copy, "{}: footer copy", path.display());
            }
            Fmt::Vhdx => {
                let mut sig = [0u8; 8];
                std::fs::File::open(path)
                    .unwrap()
                    .read_exact_at(&mut sig, 0)
                    .unwrap();
                assert_eq!(&sig, b"vhdxfile", "{}", path.display());
            }
        }
    }
}

/// `vd-tool info --output json FILE`.
fn info(path: &Path) -> Value {
    let o = vd_ok(&["info", "--output", "json", s(path)]);
    serde_json::from_slice(&o.stdout).unwrap()
}

/// SHA-256 of the whole disk `path` (with its parents) as vd reads it.
fn content(path: &Path) -> String {
    let disk = Disk::open(&Registry::builtin(), path, &DiskOptions::default()).unwrap();
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut v).unwrap();
    sha256(&v)
}

/// The whole disk `path` as vd reads it.
fn read_disk(path: &Path) -> Vec<u8> {
    let disk = Disk::open(&Registry::builtin(), path, &DiskOptions::default()).unwrap();
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut v).unwrap();
    v
}

/// `vd-tool convert [fmt args] [extra] SRC DST`.
#[track_caller]
fn convert(src: &Path, dst: &Path, fmt: Fmt) -> std::process::Output {
    let mut args = vec!["convert"];
    args.extend(fmt.args());
    args.extend([s(src), s(dst)]);
    vd_ok(&args)
}

// ---------------------------------------------------------------------------------------------
// The VHD footer, read by the test (big-endian, per the VHD specification)

const DISK_FIXED: u32 = 2;
const DISK_DYNAMIC: u32 = 3;
const DISK_DIFFERENCING: u32 = 4;

fn footer_bytes(path: &Path) -> [u8; 512] {
    let f = std::fs::File::open(path).unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 512];
    f.read_exact_at(&mut b, len - 512).unwrap();
    b
}

#[derive(Debug)]
struct Footer {
    creator: [u8; 4],
    current_size: u64,
    original_size: u64,
    chs: (u16, u8, u8),
    disk_type: u32,
    unique_id: [u8; 16],
}

fn footer(path: &Path) -> Footer {
    let b = footer_bytes(path);
    assert_eq!(&b[..8], b"conectix", "{}: no VHD footer", path.display());
    let be64 = |at: usize| u64::from_be_bytes(b[at..at + 8].try_into().unwrap());
    // The checksum: the one's complement of the byte sum with the field taken as zero.
    let sum = b
        .iter()
        .enumerate()
        .filter(|(i, _)| !(64..68).contains(i))
        .fold(0u32, |a, (_, &x)| a.wrapping_add(u32::from(x)));
    assert_eq!(
        u32::from_be_bytes(b[64..68].try_into().unwrap()),
        !sum,
        "{}: footer checksum",
        path.display()
    );
    Footer {
        creator: b[28..32].try_into().unwrap(),
        original_size: be64(40),
        current_size: be64(48),
        chs: (u16::from_be_bytes([b[56], b[57]]), b[58], b[59]),
        disk_type: u32::from_be_bytes(b[60..64].try_into().unwrap()),
        unique_id: b[68..84].try_into().unwrap(),
    }
}

impl Footer {
    /// What every VHD we create holds: the size as current (and original) size, the spec's CHS
    /// for it, the disk type, a creator QEMU reads the current size of, and a unique ID.
    #[track_caller]
    fn assert_new(&self, path: &Path, size: u64, disk_type: u32) {
        let p = path.display();
        assert_eq!(self.disk_type, disk_type, "{p}: {self:?}");
        assert_eq!(self.current_size, size, "{p}: {self:?}");
        assert_eq!(self.original_size, size, "{p}: {self:?}");
        assert_eq!(self.chs, spec_chs(size), "{p}: {self:?}");
        // QEMU takes the CHS product as the size for these two creators.
        assert!(
            &self.creator != b"vpc " && &self.creator != b"qemu",
            "{p}: creator {:?}",
            self.creator
        );
        assert_ne!(self.unique_id, [0; 16], "{p}");
    }
}

/// The CHS geometry the VHD specification's algorithm (appendix, "CHS calculation") gives for
/// `size` bytes.
fn spec_chs(size: u64) -> (u16, u8, u8) {
    let total = (size / 512).min(65535 * 16 * 255);
    let (spt, heads, cth);
    if total >= 65535 * 16 * 63 {
        spt = 255;
        heads = 16;
        cth = total / spt;
    } else {
        let mut s = 17;
        let mut c = total / s;
        let mut h = c.div_ceil(1024);
        if h < 4 {
            h = 4;
        }
        if c >= h * 1024 || h > 16 {
            s = 31;
            h = 16;
            c = total / s;
        }
        if c >= h * 1024 {
            s = 63;
            h = 16;
            c = total / s;
        }
        (spt, heads, cth) = (s, h, c);
    }
    ((cth / heads) as u16, heads as u8, spt as u8)
}

/// The algorithm above gives what the corpus's independent tools computed
/// (`spec_chs_for_current_size` in `tests/data/vhd/expected.json`) for every corpus size.
#[test]
fn the_spec_chs_algorithm_matches_the_corpus_tools() {
    let path = corpus::dir().join("vhd/expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut n = 0;
    for case in v["images"].as_array().unwrap() {
        let chs = &case["spec_chs_for_current_size"];
        let want = (
            chs[0].as_u64().unwrap() as u16,
            chs[1].as_u64().unwrap() as u8,
            chs[2].as_u64().unwrap() as u8,
        );
        let size = case["virtual_size"].as_u64().unwrap();
        assert_eq!(spec_chs(size), want, "{}", case["file"]);
        n += 1;
    }
    assert!(n >= 17, "{n}");
}

// ---------------------------------------------------------------------------------------------
// Peers

fn qemu() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
}

/// `qemu-img info --output json -f FMT`'s virtual size.
fn qemu_size(path: &Path, fmt: &str) -> u64 {
    let o = run_ok(
        "qemu-img",
        &["info", "--output", "json", "-f", fmt, s(path)],
    );
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    v["virtual-size"].as_u64().unwrap()
}

/// `qemu-img compare -f FMT -F raw IMAGE RAW` must find them identical.
#[track_caller]
fn qemu_same(image: &Path, fmt: &str, raw: &Path) {
    let o = output(
        "qemu-img",
        &["compare", "-f", fmt, "-F", "raw", s(image), s(raw)],
    );
    assert_eq!(
        o.status.code(),
        Some(0),
        "qemu-img compare {} {}: {}",
        image.display(),
        raw.display(),
        show(&o)
    );
}

// ---------------------------------------------------------------------------------------------
// Every pair

/// Every pair of raw, fixed VHD, dynamic VHD and VHDX, both ways: the reference disk is made
/// into each format, each of those converted into every other format and back, and every image
/// made reads as the reference (and is the kind asked for). The raw round trips are the
/// reference file's bytes exactly.
#[test]
fn every_pair_of_formats_converts_both_ways_byte_identical() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, want) = reference(dir.path());
    let sources: Vec<(Fmt, PathBuf)> = ALL
        .iter()
        .map(|&f| {
            if f == Fmt::Raw {
                return (f, reference.clone());
            }
            let p = dir.path().join(format!("source.{}", f.name()));
            convert(&reference, &p, f);
            f.assert_is(&p, SIZE);
            assert_eq!(content(&p), want, "raw -> {}", f.name());
            (f, p)
        })
        .collect();
    let mut pairs = 0;
    for (from, src) in &sources {
        for to in ALL.iter().filter(|&&t| t != *from) {
            let pair = format!("{} -> {}", from.name(), to.name());
            let out = dir.path().join(format!("{}-to-{}", from.name(), to.name()));
            convert(src, &out, *to);
            to.assert_is(&out, SIZE);
            assert_eq!(content(&out), want, "{pair}");
            let back = dir
                .path()
                .join(format!("{}-to-{}-back", from.name(), to.name()));
            convert(&out, &back, *from);
            from.assert_is(&back, SIZE);
            assert_eq!(content(&back), want, "{pair} -> {}", from.name());
            if *from == Fmt::Raw {
                assert_eq!(
                    sha256(&std::fs::read(&back).unwrap()),
                    want,
                    "{pair} -> raw: the file's bytes"
                );
            }
            std::fs::remove_file(&out).unwrap();
            std::fs::remove_file(&back).unwrap();
            pairs += 1;
        }
    }
    assert_eq!(pairs, 12);
}

/// `qemu-img convert -O vpc -o subformat=SUB,force_size=on RAW VHD`: a VHD of the raw disk,
/// made by QEMU (creator `qem2`, whose current size QEMU reads).
fn qemu_vhd(raw: &Path, vhd: &Path, sub: &str) {
    qemu();
    let o = format!("subformat={sub},force_size=on");
    run_ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "vpc",
            "-o",
            &o,
            s(raw),
            s(vhd),
        ],
    );
}

/// Every source format (raw, VHDX, and fixed and dynamic VHDs that QEMU made) converts into
/// raw and VHDX reading as the reference, and back between raw and VHDX; the raw round trip is
/// the reference file's bytes exactly.
#[test]
fn every_format_converts_into_raw_and_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let (reference, want) = reference(dir.path());
    let vhdx = dir.path().join("source.vhdx");
    convert(&reference, &vhdx, Fmt::Vhdx);
    Fmt::Vhdx.assert_is(&vhdx, SIZE);
    let mut sources = vec![(Fmt::Raw, reference.clone()), (Fmt::Vhdx, vhdx)];
    for (f, sub) in [(Fmt::VhdFixed, "fixed"), (Fmt::VhdDynamic, "dynamic")] {
        let p = dir.path().join(format!("qemu.{}", f.name()));
        qemu_vhd(&reference, &p, sub);
        assert_eq!(
            footer(&p).disk_type,
            if sub == "fixed" {
                DISK_FIXED
            } else {
                DISK_DYNAMIC
            }
        );
        assert_eq!(content(&p), want, "QEMU's {sub} VHD");
        sources.push((f, p));
    }
    for (from, src) in &sources {
        for to in [Fmt::Raw, Fmt::Vhdx].into_iter().filter(|t| t != from) {
            let out = dir.path().join(format!("{}-to-{}", from.name(), to.name()));
            convert(src, &out, to);
            to.assert_is(&out, SIZE);
            assert_eq!(content(&out), want, "{} -> {}", from.name(), to.name());
            if matches!(from, Fmt::Raw | Fmt::Vhdx) {
                let back = dir.path().join(format!("{}-back", from.name()));
                convert(&out, &back, *from);
                from.assert_is(&back, SIZE);
                assert_eq!(
                    content(&back),
                    want,
                    "{} -> {} -> back",
                    from.name(),
                    to.name()
                );
                if *from == Fmt::Raw {
                    assert_eq!(sha256(&std::fs::read(&back).unwrap()), want);
                }
            }
        }
    }
}

/// A mostly empty disk (1 MiB of data at the start, 3 sectors at the end of 64 MiB) converts
/// into a dynamic VHD and a VHDX much smaller than the disk, and into a fixed VHD of the disk's
/// size plus the footer.
#[test]
fn dynamic_outputs_of_a_mostly_empty_disk_are_sparse() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB;
    let src = dir.path().join("empty.raw");
    let ops = [
        Op::Data {
            seed: 7,
            off: 0,
            len: MIB,
        },
        Op::Data {
            seed: 8,
            off: size - 1536,
            len: 1536,
        },
    ];
    let want = sha256(&write_raw(&src, size, &ops));
    let len = |p: &Path| std::fs::metadata(p).unwrap().len();
    let allocated = |p: &Path| std::fs::metadata(p).unwrap().blocks() * 512;

    let vhd = dir.path().join("d.vhd");
    convert(&src, &vhd, Fmt::VhdDynamic);
    Fmt::VhdDynamic.assert_is(&vhd, size);
    assert_eq!(content(&vhd), want);
    // Two 2 MiB blocks (the default block size) and the metadata.
    assert!(len(&vhd) < 5 * MIB, "{} bytes", len(&vhd));

    let vhdx = dir.path().join("d.vhdx");
    convert(&src, &vhdx, Fmt::Vhdx);
    assert_eq!(content(&vhdx), want);
    // The default 32 MiB blocks span the file, but only what holds data is allocated.
    assert!(allocated(&vhdx) < size / 4, "{} bytes", allocated(&vhdx));
    let small = dir.path().join("small.vhdx");
    vd_ok(&[
        "convert",
        "-O",
        "vhdx",
        "-o",
        "block_size=1M",
        s(&src),
        s(&small),
    ]);
    assert_eq!(content(&small), want);
    assert!(len(&small) < size / 4, "{} bytes", len(&small));

    let fixed = dir.path().join("f.vhd");
    convert(&src, &fixed, Fmt::VhdFixed);
    Fmt::VhdFixed.assert_is(&fixed, size);
    assert_eq!(content(&fixed), want);
}

// ---------------------------------------------------------------------------------------------
// Chains

/// Applies `ops` (patterns and zeros) to `image` with one `vd-tool io` run, in order.
///
/// Images are written by vd-tool processes, never opened for writing in this process: a
/// descriptor of ours inherited by a process another test spawns at that moment would keep
/// the image's lock for a while after we close it.
fn write_ops(image: &Path, ops: &[Op]) {
    let mut args = vec!["io".to_string()];
    for op in ops {
        let cmd = match *op {
            Op::Pattern { byte, off, len } => format!("write -P {byte:#04x} {off} {len}"),
            Op::Zero { off, len } => format!("write -z {off} {len}"),
            Op::Data { .. } => panic!("vd-tool io writes patterns, not {op:?}"),
        };
        args.extend(["-c".to_string(), cmd]);
    }
    args.push(s(image).to_string());
    vd_ok(&args);
}

/// What a child holds over its parent: aligned and unaligned data, zeros hiding the parent's
/// data (in whole 4 KiB and in single sectors), and the last sector.
fn child_ops(size: u64) -> Vec<Op> {
    vec![
        Op::Pattern {
            byte: 0x4b,
            off: 512 * 1024,
            len: 256 * 1024,
        },
        // One sector in the middle of the parent's first MiB: the rest of its bitmap byte
        // stays the parent's.
        Op::Pattern {
            byte: 0x4c,
            off: 64 * 1024 + 512,
            len: 512,
        },
        Op::Zero {
            off: 20 * MIB + 8192,
            len: 4096,
        },
        Op::Zero {
            off: 20 * MIB + 3 * 512,
            len: 512,
        },
        Op::Pattern {
            byte: 0x4d,
            off: 30 * MIB,
            len: 3 * MIB,
        },
        Op::Pattern {
            byte: 0x4e,
            off: size - 512,
            len: 512,
        },
    ]
}

/// A parent (the reference disk converted into `fmt`, with `-o opts`) and a child over it
/// (`create -f format -b parent -F format`) holding [`child_ops`], in `dir`; returns the child
/// and the chain's bytes.
fn make_chain(dir: &Path, format: &str, fmt: Fmt, opts: &str) -> (PathBuf, Vec<u8>) {
    let parent = dir.join(format!("base.{format}"));
    let child = dir.join(format!("child.{format}"));
    let raw = dir.join("base.raw");
    let mut disk = write_raw(&raw, SIZE, &reference_ops(SIZE));
    let mut args = vec!["convert"];
    args.extend(fmt.args());
    if !opts.is_empty() {
        args.extend(["-o", opts]);
    }
    args.extend([s(&raw), s(&parent)]);
    vd_ok(&args);
    vd_ok(&[
        "create",
        "-f",
        format,
        "-b",
        s(&parent),
        "-F",
        format,
        s(&child),
    ]);
    let ops = child_ops(SIZE);
    for op in &ops {
        op.apply(&mut disk);
    }
    write_ops(&child, &ops);
    assert_eq!(read_disk(&child), disk, "the {format} chain as written");
    (child, disk)
}

/// Converts the chain whose top is `child` into each format of `to`; each reads as `want`.
#[track_caller]
fn flatten_into(dir: &Path, child: &Path, want: &str, size: u64, to: &[Fmt]) {
    for &to in to {
        let out = dir.join(format!("flat.{}", to.name()));
        convert(child, &out, to);
        to.assert_is(&out, size);
        assert_eq!(content(&out), want, "{} -> {}", child.display(), to.name());
    }
}

/// A VHDX differencing chain made by vd-tool flattens into raw and VHDX, each reading as the
/// chain.
#[test]
fn a_vhdx_chain_flattens_into_raw_and_vhdx() {
    let dir = tempfile::tempdir().unwrap();
    let (child, disk) = make_chain(dir.path(), "vhdx", Fmt::Vhdx, "block_size=1M");
    flatten_into(
        dir.path(),
        &child,
        &sha256(&disk),
        SIZE,
        &[Fmt::Raw, Fmt::Vhdx],
    );
}

/// A VHDX differencing chain made by vd-tool flattens into fixed and dynamic VHDs, each
/// reading as the chain.
#[test]
fn a_vhdx_chain_flattens_into_vhd() {
    let dir = tempfile::tempdir().unwrap();
    let (child, disk) = make_chain(dir.path(), "vhdx", Fmt::Vhdx, "block_size=1M");
    flatten_into(
        dir.path(),
        &child,
        &sha256(&disk),
        SIZE,
        &[Fmt::VhdFixed, Fmt::VhdDynamic],
    );
}

/// The corpus's Windows differencing VHD, read through its stand-in parent, flattens into raw
/// and VHDX as `expected.json` says the chain reads.
#[test]
fn the_windows_vhd_chain_flattens_into_raw_and_vhdx() {
    windows_chain_into(&[Fmt::Raw, Fmt::Vhdx]);
}

/// The same chain flattens into fixed and dynamic VHDs.
#[test]
fn the_windows_vhd_chain_flattens_into_vhd() {
    windows_chain_into(&[Fmt::VhdFixed, Fmt::VhdDynamic]);
}

fn windows_chain_into(to: &[Fmt]) {
    let dir = tempfile::tempdir().unwrap();
    let path = corpus::dir().join("vhd/expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let case = v["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["file"] == "dfvfs/fat-differential.vhd.gz" && c["expect"] == "read")
        .unwrap()
        .clone();
    let child = dir.path().join("fat-differential.vhd");
    corpus::decompress("vhd/dfvfs/fat-differential.vhd.gz", &child);
    let parent = &case["parent"];
    corpus::decompress(
        &format!("vhd/{}", parent["file"].as_str().unwrap()),
        &dir.path().join(parent["place_as"].as_str().unwrap()),
    );
    assert_eq!(footer(&child).disk_type, DISK_DIFFERENCING);
    let want = case["content_sha256"].as_str().unwrap();
    assert_eq!(content(&child), want, "the chain itself");
    flatten_into(
        dir.path(),
        &child,
        want,
        case["virtual_size"].as_u64().unwrap(),
        to,
    );
}

/// The MiB chunks of the disk where libvhdi reads a VHD differencing child written by `ops`
/// wrongly: those holding a sector-bitmap byte (8 sectors, aligned on the disk as blocks are)
/// with an absent sector after a present one.
fn libvhdi_unreliable_chunks(ops: &[Op]) -> std::collections::BTreeSet<u64> {
    let mut present = std::collections::BTreeSet::new();
    for op in ops {
        let (off, len) = op.range();
        present.extend(off / 512..(off + len).div_ceil(512));
    }
    // libvhdi takes sector i as present when any sector of its byte up to i is: the sectors
    // it misreads are the absent ones after a present one in the same byte.
    let mut chunks = std::collections::BTreeSet::new();
    for &sec in &present {
        let byte_end = (sec / 8 + 1) * 8;
        if (sec + 1..byte_end).any(|later| !present.contains(&later)) {
            chunks.insert(sec * 512 / MIB);
        }
    }
    chunks
}

/// A dynamic VHD chain made by vd-tool (`create -f vhd -b`) reads as written in vd, flattens
/// into every format, and reads the same in libvhdi outside the bitmap bytes libvhdi misreads
/// (its parent and the flattened VHDs read whole).
#[test]
fn a_vhd_chain_we_make_flattens_and_reads_in_libvhdi() {
    require(&[Peer::Pyvhdi]);
    let dir = tempfile::tempdir().unwrap();
    let (child, disk) = make_chain(dir.path(), "vhd", Fmt::VhdDynamic, "");
    assert_eq!(footer(&child).disk_type, DISK_DIFFERENCING);
    let parent = dir.path().join("base.vhd");
    let want = sha256(&disk);
    flatten_into(dir.path(), &child, &want, SIZE, &ALL);

    let lib = libvhdi_read(&child, &[&parent]);
    assert_eq!(lib.size, SIZE);
    let unreliable = libvhdi_unreliable_chunks(&child_ops(SIZE));
    // The child's single sectors make partly set bitmap bytes: the trap is exercised.
    assert!(!unreliable.is_empty());
    let mut compared = 0;
    for (i, chunk) in lib.chunks.iter().enumerate() {
        let i = i as u64;
        if unreliable.contains(&i) {
            continue;
        }
        let end = ((i + 1) * MIB).min(SIZE);
        assert_eq!(
            chunk,
            &sha256(&disk[(i * MIB) as usize..end as usize]),
            "libvhdi, MiB {i} of the chain"
        );
        compared += 1;
    }
    assert!(compared >= 35, "{compared}");
    // Its parent, and the chain flattened into VHDs, read whole.
    let mut base = vec![0u8; SIZE as usize];
    for op in reference_ops(SIZE) {
        op.apply(&mut base);
    }
    assert_eq!(libvhdi_read(&parent, &[]).sha256, sha256(&base));
    for to in [Fmt::VhdFixed, Fmt::VhdDynamic] {
        let out = dir.path().join(format!("flat.{}", to.name()));
        assert_eq!(libvhdi_read(&out, &[]).sha256, want, "{}", to.name());
    }
}

/// A differencing VHD whose child writes are whole 4 KiB (whole bitmap bytes) reads in libvhdi
/// exactly as in vd, the whole disk.
#[test]
fn a_vhd_chain_with_aligned_writes_reads_whole_in_libvhdi() {
    require(&[Peer::Pyvhdi]);
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("p.vhd");
    let child = dir.path().join("c.vhd");
    let raw = dir.path().join("p.raw");
    let mut disk = write_raw(&raw, SIZE, &reference_ops(SIZE));
    convert(&raw, &parent, Fmt::VhdDynamic);
    vd_ok(&["create", "-f", "vhd", "-b", s(&parent), s(&child)]);
    let ops = [
        Op::Pattern {
            byte: 0x55,
            off: 256 * 1024,
            len: 8192,
        },
        Op::Zero {
            off: 20 * MIB + 4096,
            len: 4096,
        },
        Op::Pattern {
            byte: 0x56,
            off: 36 * MIB,
            len: MIB,
        },
    ];
    assert!(libvhdi_unreliable_chunks(&ops).is_empty());
    for op in &ops {
        op.apply(&mut disk);
    }
    write_ops(&child, &ops);
    let want = sha256(&disk);
    assert_eq!(content(&child), want);
    let lib = libvhdi_read(&child, &[&parent]);
    assert_eq!((lib.size, lib.sha256), (SIZE, want));
}

// ---------------------------------------------------------------------------------------------
// UUIDs

fn uuid(p: &Path) -> Option<String> {
    info(p)["uuid"].as_str().map(str::to_string)
}

/// libvhdi's reading of a VHD's unique ID (an independent reader of the footer's bytes).
fn libvhdi_identifier(p: &Path) -> String {
    require(&[Peer::Pyvhdi]);
    let o = run_ok(
        "python3",
        &[
            "-c",
            "import sys, pyvhdi\nf = pyvhdi.file()\nf.open(sys.argv[1])\nprint(f.get_identifier())",
            s(p),
        ],
    );
    String::from_utf8(o.stdout).unwrap().trim().to_string()
}

/// `convert` into VHDX keeps the source's image UUID: from a VHDX and from a VHD (QEMU's, its
/// ID as libvhdi reads it); a raw source has none, so each new image gets a new one.
#[test]
fn convert_into_vhdx_keeps_the_image_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = reference(dir.path());
    let vhdx = dir.path().join("a.vhdx");
    convert(&raw, &vhdx, Fmt::Vhdx);
    let id = uuid(&vhdx).expect("a VHDX has an image UUID");
    let copy = dir.path().join("copy.vhdx");
    convert(&vhdx, &copy, Fmt::Vhdx);
    assert_eq!(uuid(&copy).as_deref(), Some(id.as_str()), "vhdx -> vhdx");

    let vhd = dir.path().join("q.vhd");
    qemu_vhd(&raw, &vhd, "dynamic");
    let vhd_id = libvhdi_identifier(&vhd);
    assert_eq!(
        uuid(&vhd).as_deref(),
        Some(vhd_id.as_str()),
        "vd and libvhdi"
    );
    let from_vhd = dir.path().join("from-vhd.vhdx");
    convert(&vhd, &from_vhd, Fmt::Vhdx);
    assert_eq!(
        uuid(&from_vhd).as_deref(),
        Some(vhd_id.as_str()),
        "vhd -> vhdx"
    );

    let other = dir.path().join("b.vhdx");
    convert(&raw, &other, Fmt::Vhdx);
    assert_ne!(
        uuid(&other).as_deref(),
        Some(id.as_str()),
        "raw -> vhdx twice"
    );
}

/// `convert -O vhd` keeps the source's image UUID: from a VHDX (fixed and dynamic outputs, as
/// vd and libvhdi read the footer) and from a VHD; a raw source gets a new one each time.
#[test]
fn convert_into_vhd_keeps_the_image_uuid() {
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = reference(dir.path());
    let vhdx = dir.path().join("a.vhdx");
    convert(&raw, &vhdx, Fmt::Vhdx);
    let id = uuid(&vhdx).expect("a VHDX has an image UUID");
    for to in [Fmt::VhdFixed, Fmt::VhdDynamic] {
        let out = dir.path().join(format!("a.{}", to.name()));
        convert(&vhdx, &out, to);
        assert_eq!(
            uuid(&out).as_deref(),
            Some(id.as_str()),
            "vhdx -> {}",
            to.name()
        );
        assert_eq!(
            libvhdi_identifier(&out),
            id,
            "vhdx -> {}, in libvhdi",
            to.name()
        );
        let again = dir.path().join(format!("again.{}", to.name()));
        let other = if to == Fmt::VhdFixed {
            Fmt::VhdDynamic
        } else {
            Fmt::VhdFixed
        };
        convert(&out, &again, other);
        assert_eq!(uuid(&again).as_deref(), Some(id.as_str()), "vhd -> vhd");
    }
    let (a, b) = (dir.path().join("r1.vhd"), dir.path().join("r2.vhd"));
    convert(&raw, &a, Fmt::VhdDynamic);
    convert(&raw, &b, Fmt::VhdDynamic);
    assert!(uuid(&a).is_some());
    assert_ne!(uuid(&a), uuid(&b));
    assert_ne!(uuid(&a).as_deref(), Some(id.as_str()));
}

// ---------------------------------------------------------------------------------------------
// Azure

/// A raw disk of `size` bytes with data in its first MiB and its last sector.
fn edge_raw(path: &Path, size: u64) -> Vec<u8> {
    write_raw(
        path,
        size,
        &[
            Op::Data {
                seed: 31,
                off: 0,
                len: MIB.min(size),
            },
            Op::Data {
                seed: 32,
                off: size - 512,
                len: 512,
            },
        ],
    )
}

/// The note vd-tool prints when it rounds.
const ROUNDED: &str = "rounded up to";

/// `azure=on` makes a fixed VHD of a whole number of MiB (the size rounded up, with a note on
/// stderr exactly when it is rounded), the file that size plus the footer; the disk reads as
/// the source followed by zeros; qemu-img reads the same size and bytes. Both `convert -O vhd`
/// and `create -f vhd` round.
#[test]
fn azure_on_rounds_up_to_whole_mib_and_says_so() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    for size in [64 * MIB, 64 * MIB + 512, 10 * MIB - 512] {
        let rounded = size.div_ceil(MIB) * MIB;
        let src = dir.path().join(format!("{size}.raw"));
        let bytes = edge_raw(&src, size);
        let out = dir.path().join(format!("{size}.vhd"));
        let o = vd_ok(&["convert", "-O", "vhd", "-o", "azure=on", s(&src), s(&out)]);
        let err = stderr(&o);
        assert_eq!(err.contains(ROUNDED), rounded != size, "{size}: {err:?}");
        if rounded != size {
            assert!(
                err.contains(&size.to_string()) && err.contains(&rounded.to_string()),
                "{size}: {err:?}"
            );
        }
        assert_eq!(rounded % MIB, 0);
        Fmt::VhdFixed.assert_is(&out, rounded);
        assert_eq!(std::fs::metadata(&out).unwrap().len(), rounded + 512);
        let read = read_disk(&out);
        assert_eq!(read.len() as u64, rounded);
        assert_eq!(&read[..size as usize], &bytes[..], "{size}: the source");
        assert!(
            read[size as usize..].iter().all(|&b| b == 0),
            "{size}: the padding reads as zeros"
        );
        // qemu reads the current size, and the same bytes.
        assert_eq!(qemu_size(&out, "vpc"), rounded, "{size}");
        let padded = dir.path().join(format!("{size}-padded.raw"));
        std::fs::copy(&src, &padded).unwrap();
        std::fs::OpenOptions::new()
            .write(true)
            .open(&padded)
            .unwrap()
            .set_len(rounded)
            .unwrap();
        qemu_same(&out, "vpc", &padded);

        // create rounds the same way, and says so the same way.
        let made = dir.path().join(format!("{size}-created.vhd"));
        let o = vd_ok(&[
            "create",
            "-f",
            "vhd",
            "-o",
            "azure=on",
            s(&made),
            &size.to_string(),
        ]);
        let err = stderr(&o);
        assert_eq!(err.contains(ROUNDED), rounded != size, "{size}: {err:?}");
        Fmt::VhdFixed.assert_is(&made, rounded);
        assert_eq!(std::fs::metadata(&made).unwrap().len(), rounded + 512);
    }
}

/// Plain `subformat=fixed` keeps the exact size (a multiple of 512, not of a MiB) and prints
/// no note.
#[test]
fn plain_fixed_keeps_the_exact_size() {
    let dir = tempfile::tempdir().unwrap();
    let size = 64 * MIB + 512;
    let src = dir.path().join("s.raw");
    let bytes = edge_raw(&src, size);
    let out = dir.path().join("s.vhd");
    let o = convert(&src, &out, Fmt::VhdFixed);
    assert!(!stderr(&o).contains(ROUNDED), "{}", stderr(&o));
    Fmt::VhdFixed.assert_is(&out, size);
    assert_eq!(read_disk(&out), bytes);
    let made = dir.path().join("c.vhd");
    let o = vd_ok(&[
        "create",
        "-f",
        "vhd",
        "-o",
        "subformat=fixed",
        s(&made),
        &size.to_string(),
    ]);
    assert!(!stderr(&o).contains(ROUNDED), "{}", stderr(&o));
    Fmt::VhdFixed.assert_is(&made, size);
}

// ---------------------------------------------------------------------------------------------
// Interop

/// What we write as VHD reads back identically in the oracles: fixed and dynamic VHDs in
/// qemu-img (the same size: it reads our footer's current size, and the same bytes) and in
/// libvhdi (the same size and hash).
#[test]
fn our_vhd_outputs_read_identically_in_qemu_and_libvhdi() {
    qemu();
    require(&[Peer::Pyvhdi]);
    let dir = tempfile::tempdir().unwrap();
    let (raw, want) = reference(dir.path());
    for to in [Fmt::VhdFixed, Fmt::VhdDynamic] {
        let out = dir.path().join(format!("out.{}", to.name()));
        convert(&raw, &out, to);
        assert_eq!(qemu_size(&out, "vpc"), SIZE, "{}", to.name());
        qemu_same(&out, "vpc", &raw);
        let lib = libvhdi_read(&out, &[]);
        assert_eq!(
            (lib.size, lib.sha256),
            (SIZE, want.clone()),
            "{}",
            to.name()
        );
    }
}

/// What we write as VHDX (from raw, from a VHDX, from QEMU's dynamic VHD) passes
/// `qemu-img check` and compares equal to the reference in qemu-img.
#[test]
fn our_vhdx_outputs_pass_qemu_check_and_compare() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    let (raw, _) = reference(dir.path());
    let vhd = dir.path().join("q.vhd");
    qemu_vhd(&raw, &vhd, "dynamic");
    let a = dir.path().join("a.vhdx");
    convert(&raw, &a, Fmt::Vhdx);
    let b = dir.path().join("b.vhdx");
    convert(&a, &b, Fmt::Vhdx);
    let c = dir.path().join("c.vhdx");
    convert(&vhd, &c, Fmt::Vhdx);
    for out in [a, b, c] {
        assert_eq!(qemu_size(&out, "vhdx"), SIZE);
        run_ok("qemu-img", &["check", "-q", "-f", "vhdx", s(&out)]);
        qemu_same(&out, "vhdx", &raw);
    }
}

/// VHDs qemu-img made (dynamic and fixed, `force_size=on` so the size is exact) and qemu-io
/// wrote convert to raw and VHDX that read as qemu reads the VHD itself.
#[test]
fn vhds_made_by_qemu_convert_to_what_qemu_reads() {
    qemu();
    let dir = tempfile::tempdir().unwrap();
    for sub in ["dynamic", "fixed"] {
        let vhd = dir.path().join(format!("q-{sub}.vhd"));
        run_ok(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "vpc",
                "-o",
                &format!("subformat={sub},force_size=on"),
                s(&vhd),
                &SIZE.to_string(),
            ],
        );
        let cmds = [
            "write -P 0xab 0 1M".to_string(),
            format!("write -P 0x5c {} 12288", 10 * MIB - 4096),
            format!("write -P 0x11 {} 1536", SIZE - 1536),
            format!("write -P 0x77 {} 3584", 20 * MIB + 512),
            format!("write -z {} 1024", 20 * MIB + 1024),
        ];
        let mut args = vec!["-f", "vpc"];
        for c in &cmds {
            args.extend(["-c", c.as_str()]);
        }
        args.push(s(&vhd));
        run_ok("qemu-io", &args);
        let theirs = dir.path().join(format!("q-{sub}.qemu.raw"));
        run_ok(
            "qemu-img",
            &["convert", "-f", "vpc", "-O", "raw", s(&vhd), s(&theirs)],
        );
        let bytes = std::fs::read(&theirs).unwrap();
        assert_eq!(bytes.len() as u64, SIZE, "qemu's reading of its {sub} VHD");
        assert!(bytes[..MIB as usize].iter().all(|&b| b == 0xab));
        let want = sha256(&bytes);
        assert_eq!(content(&vhd), want, "{sub}: vd reads qemu's VHD");

        let raw = dir.path().join(format!("q-{sub}.raw"));
        convert(&vhd, &raw, Fmt::Raw);
        assert_eq!(sha256(&std::fs::read(&raw).unwrap()), want, "{sub} -> raw");
        let vhdx = dir.path().join(format!("q-{sub}.vhdx"));
        convert(&vhd, &vhdx, Fmt::Vhdx);
        Fmt::Vhdx.assert_is(&vhdx, SIZE);
        assert_eq!(content(&vhdx), want, "{sub} -> vhdx");
        run_ok("qemu-img", &["check", "-q", "-f", "vhdx", s(&vhdx)]);
        qemu_same(&vhdx, "vhdx", &theirs);
    }
}

/// `convert -O vhd -B BASE` makes a differencing VHD over BASE holding only what differs: a
/// VHDX chain re-based onto a VHD copy of its parent reads as the chain (in vd and, whole, in
/// libvhdi: convert writes whole 4 KiB granules, so no bitmap byte is partly set), keeps the
/// VHDX child's UUID and links to BASE's. Converting BASE itself over BASE gives an empty child
/// with a UUID of its own, never its parent's.
#[test]
fn convert_with_backing_makes_a_vhd_child() {
    require(&[Peer::Pyvhdi]);
    let dir = tempfile::tempdir().unwrap();
    let (child, disk) = make_chain(dir.path(), "vhdx", Fmt::Vhdx, "block_size=1M");
    let base = dir.path().join("base.vhd");
    convert(&dir.path().join("base.vhdx"), &base, Fmt::VhdDynamic);
    let new = dir.path().join("new.vhd");
    vd_ok(&["convert", "-O", "vhd", "-B", s(&base), s(&child), s(&new)]);
    assert_eq!(footer(&new).disk_type, DISK_DIFFERENCING);
    let want = sha256(&disk);
    assert_eq!(content(&new), want);
    let i = info(&new);
    assert_eq!(i["uuid"].as_str(), uuid(&child).as_deref());
    assert_eq!(i["parent_uuid"].as_str(), uuid(&base).as_deref());
    let len = std::fs::metadata(&new).unwrap().len();
    assert!(len < SIZE / 2, "{len} bytes");
    let lib = libvhdi_read(&new, &[&base]);
    assert_eq!((lib.size, lib.sha256), (SIZE, want));

    let same = dir.path().join("same.vhd");
    vd_ok(&["convert", "-O", "vhd", "-B", s(&base), s(&base), s(&same)]);
    assert_eq!(content(&same), content(&base));
    assert!(uuid(&same).is_some());
    assert_ne!(uuid(&same), uuid(&base));
    let (_, extents) =
        vd_tests::tool::map_lines(&vd_ok(&["map", "--output", "json", s(&same)]).stdout);
    assert!(extents.iter().any(|e| e["state"] == "data"), "{extents:?}");
    assert!(
        extents
            .iter()
            .filter(|e| e["state"] == "data")
            .all(|e| e["layer"] == 1),
        "the child holds no data of its own: {extents:?}"
    );
}
