//! VHD images resized and compacted by vd read as QEMU reads them: `qemu-img info` gives the new size and
//! `qemu-io` finds the data where it was written and zeros in the grown part. Fixed and dynamic
//! images grow (the dynamic one past its BAT's spare entries, so the BAT moves), shrink and are
//! compacted. QEMU (`qemu-img`, `qemu-io`) is required: a missing tool fails the tests.

use std::path::Path;

use backend_vhd as _;
use vd_core::{CreateParams, Image, OpenFlags, Registry};
use vd_tests::peers::{Peer, require};
use vd_tests::process::stdout;
use vd_tests::qemu;
use vd_tests::s;

const MIB: u64 = 1 << 20;

fn create(path: &Path, size: u64, opts: &[(&str, &str)]) -> Box<dyn Image> {
    let params = CreateParams {
        size,
        options: opts
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..CreateParams::default()
    };
    Registry::builtin()
        .create("vhd", path, &params, None, true)
        .unwrap()
}

fn open(path: &Path) -> Box<dyn Image> {
    Registry::builtin().open(path, OpenFlags::empty()).unwrap()
}

/// qemu-io reads `(pattern, offset, len)` of every entry from the VHD at `image`.
#[track_caller]
fn qemu_reads(image: &Path, reads: &[(u8, u64, u64)]) {
    qemu::assert_reads_as("vpc", image, reads);
}

/// `qemu-img info` gives the virtual size `size` (QEMU's vpc driver has no `check`).
#[track_caller]
fn qemu_sees(image: &Path, size: u64) {
    let o = qemu::img(&["info", "--output", "json", "-f", "vpc", s(image)]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    assert_eq!(v["virtual-size"].as_u64(), Some(size), "{}", stdout(&o));
}

#[test]
fn qemu_reads_grown_shrunk_and_compacted_dynamic_vhds() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.vhd");
    let img = create(&path, 8 * MIB, &[("block_size", "512K")]);
    img.write_at(0, &vec![0xaa; 2 * MIB as usize]).unwrap();
    img.write_at(7 * MIB, &vec![0xbb; MIB as usize]).unwrap();
    // 128 entries fit in the BAT's sector; 300 MiB needs 600: the BAT moves.
    img.resize(300 * MIB, &mut |_, _| {}).unwrap();
    img.write_at(299 * MIB, &vec![0xcc; MIB as usize]).unwrap();
    img.close(false).unwrap();
    qemu_sees(&path, 300 * MIB);
    qemu_reads(
        &path,
        &[
            (0xaa, 0, 2 * MIB),
            (0, 2 * MIB, 5 * MIB),
            (0xbb, 7 * MIB, MIB),
            (0, 8 * MIB, 291 * MIB),
            (0xcc, 299 * MIB, MIB),
        ],
    );
    // Discard, shrink, compact.
    let img = open(&path);
    img.discard(0, MIB).unwrap();
    img.discard(7 * MIB, 293 * MIB).unwrap();
    img.resize(7 * MIB, &mut |_, _| {}).unwrap();
    let before = img.file_size().unwrap();
    img.compact(&mut |_, _| {}).unwrap();
    let after = img.file_size().unwrap();
    assert!(after < before, "compacted from {before} to {after}");
    img.close(false).unwrap();
    qemu_sees(&path, 7 * MIB);
    qemu_reads(
        &path,
        &[(0, 0, MIB), (0xaa, MIB, MIB), (0, 2 * MIB, 5 * MIB)],
    );
    // Growing back: the cut part reads zeros.
    let img = open(&path);
    img.resize(16 * MIB, &mut |_, _| {}).unwrap();
    img.close(false).unwrap();
    qemu_sees(&path, 16 * MIB);
    qemu_reads(&path, &[(0xaa, MIB, MIB), (0, 2 * MIB, 14 * MIB)]);
}

#[test]
fn qemu_reads_grown_and_shrunk_fixed_vhds() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("f.vhd");
    let img = create(&path, 4 * MIB, &[("subformat", "fixed")]);
    img.write_at(3 * MIB, &vec![0xaa; MIB as usize]).unwrap();
    img.resize(10 * MIB, &mut |_, _| {}).unwrap();
    img.close(false).unwrap();
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 10 * MIB + 512);
    qemu_sees(&path, 10 * MIB);
    qemu_reads(
        &path,
        &[(0, 0, 3 * MIB), (0xaa, 3 * MIB, MIB), (0, 4 * MIB, 6 * MIB)],
    );
    let img = open(&path);
    img.discard(3 * MIB + 512 * 1024, 7 * MIB - 512 * 1024)
        .unwrap();
    img.resize(3 * MIB + 512 * 1024, &mut |_, _| {}).unwrap();
    img.close(false).unwrap();
    qemu_sees(&path, 3 * MIB + 512 * 1024);
    qemu_reads(&path, &[(0xaa, 3 * MIB, 512 * 1024)]);
}
