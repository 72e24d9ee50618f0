//! Every VHD image of the corpus (`tests/data/vhd/`, made by Virtual PC, Hyper-V, Disk2vhd,
//! Windows and QEMU) reads as `tests/data/vhd/expected.json` says, through the VHD backend and
//! `Disk`: the probe names `vhd`, the virtual size is the footer's current size, and the content
//! hashes to `content_sha256` (or, for disks of 1 GiB and more, to `zchunk_sha256`, computed
//! from the map without reading the zeros). Differencing children read through their parent
//! (the stand-in parent for the Windows child), and images expected to fail fail with a typed
//! error.

use std::path::{Path, PathBuf};

use backend_raw as _;
use backend_vhd as _;
use backend_vhdx as _;
use serde_json::Value;
use sha2::{Digest, Sha256};
use vd_core::{Disk, DiskOptions, ErrorKind, ExtentKind, Registry};
use vd_tests::corpus::{decompress, dir, image_name};
use vd_tests::hash::{hex, sha256};

const MIB: u64 = 1 << 20;

/// The `images` array of `tests/data/vhd/expected.json`.
fn expected() -> Vec<Value> {
    let path = dir().join("vhd/expected.json");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    v["images"].as_array().unwrap().clone()
}

/// Decompresses `case`'s image (and its parent, under `place_as`) into `tmp`.
fn place(case: &Value, tmp: &Path) -> PathBuf {
    let file = case["file"].as_str().unwrap();
    let image = tmp.join(image_name(file));
    decompress(&format!("vhd/{file}"), &image);
    if let Some(parent) = case.get("parent").filter(|p| !p.is_null()) {
        let to = tmp.join(parent["place_as"].as_str().unwrap());
        decompress(&format!("vhd/{}", parent["file"].as_str().unwrap()), &to);
    }
    image
}

/// SHA-256 of the whole disk, read in 4 MiB pieces.
fn content_sha256(disk: &Disk) -> String {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 4 << 20];
    let mut pos = 0;
    while pos < disk.size() {
        let n = (disk.size() - pos).min(buf.len() as u64) as usize;
        disk.read_at(pos, &mut buf[..n]).unwrap();
        h.update(&buf[..n]);
        pos += n as u64;
    }
    hex(&h.finalize())
}

/// expected.json's `zchunk_sha256`: one line `<i> <sha256 of 1 MiB chunk i>` per chunk that is
/// not all zeros, then `size <virtual size>`; chunks the map shows as zeros are not read.
fn zchunk_sha256(disk: &Disk) -> String {
    let size = disk.size();
    let mut data_chunks = std::collections::BTreeSet::new();
    for e in disk.map(0, size).unwrap() {
        if e.kind == ExtentKind::Data {
            let first = e.offset / MIB;
            let last = (e.offset + e.length - 1) / MIB;
            data_chunks.extend(first..=last);
        }
    }
    let mut text = String::new();
    let mut buf = vec![0u8; MIB as usize];
    for i in data_chunks {
        let n = (size - i * MIB).min(MIB) as usize;
        disk.read_at(i * MIB, &mut buf[..n]).unwrap();
        if buf[..n].iter().any(|&b| b != 0) {
            text.push_str(&format!("{i} {}\n", sha256(&buf[..n])));
        }
    }
    text.push_str(&format!("size {size}\n"));
    sha256(text.as_bytes())
}

/// Checks one case; `true` when the image was read and its content hash compared.
fn check(case: &Value) -> bool {
    let file = case["file"].as_str().unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let image = place(case, tmp.path());
    let registry = Registry::builtin();
    assert_eq!(
        registry.probe(&image).unwrap().backend.name(),
        "vhd",
        "{file}"
    );
    let opened = Disk::open(&registry, &image, &DiskOptions::default());
    let expect = case["expect"].as_str().unwrap();
    let disk = match (expect, opened) {
        ("read" | "read-or-refuse:checksum", Ok(disk)) => disk,
        ("read-or-refuse:checksum", Err(e)) => {
            assert_eq!(e.kind(), ErrorKind::InvalidHeader, "{file}: {e}");
            assert!(e.to_string().contains("checksum"), "{file}: {e}");
            return false;
        }
        ("refuse:parent", Err(e)) => {
            assert_eq!(e.kind(), ErrorKind::NotFound, "{file}: {e}");
            // The error names the paths tried, which end in the parent's file name.
            let name = case["parent_unicode_name"].as_str().unwrap();
            let parent = name.rsplit(['\\', '/']).next().unwrap();
            assert!(e.to_string().contains(parent), "{file}: {e}");
            return false;
        }
        (_, Ok(_)) => panic!("{file}: expected {expect}, but it opened"),
        (_, Err(e)) => panic!("{file}: expected {expect}: {e}"),
    };
    assert_eq!(
        disk.size(),
        case["virtual_size"].as_u64().unwrap(),
        "{file}"
    );
    if disk.size() < 1 << 30 {
        assert_eq!(
            content_sha256(&disk),
            case["content_sha256"].as_str().unwrap(),
            "{file}"
        );
    } else {
        assert_eq!(
            zchunk_sha256(&disk),
            case["zchunk_sha256"].as_str().unwrap(),
            "{file}"
        );
    }
    true
}

#[test]
fn every_vhd_corpus_image_reads_as_expected() {
    let cases = expected();
    assert!(cases.len() >= 17, "{}", cases.len());
    let read = cases.iter().filter(|c| check(c)).count();
    let must_read = cases.iter().filter(|c| c["expect"] == "read").count();
    // Every `read` case was read and hashed; the two with both footer checksums broken are
    // refused (as QEMU refuses them).
    assert_eq!(read, must_read);
}

/// Writes into real images from other writers (Windows 10, QEMU) land where those writers'
/// readers find them: a write into an allocated block, one that allocates a new block past the
/// Windows footer, and an unaligned one; afterwards qemu-img and libvhdi read the whole disk as
/// vd does, and the check is clean.
#[test]
fn writes_into_real_images_read_back_in_qemu_and_libvhdi() {
    use vd_core::OpenFlags;
    vd_tests::peers::require(&[
        vd_tests::peers::Peer::QemuImg,
        vd_tests::peers::Peer::Pyvhdi,
    ]);
    for file in [
        "vhd/dissect.hypervisor/dynamic.vhd.gz",
        "vhd/dissect.hypervisor/fixed.vhd.gz",
        "vhd/synthetic/qemu-dynamic-chs-100M.vhd.gz",
    ] {
        let tmp = tempfile::tempdir().unwrap();
        let image = tmp.path().join(image_name(file));
        decompress(file, &image);
        let registry = Registry::builtin();
        let img = registry.open(&image, OpenFlags::empty()).unwrap();
        let size = img.size();
        let mut before = vec![0u8; size as usize];
        img.read_at(0, &mut before).unwrap();
        let mut want = before.clone();
        for (off, len, byte) in [
            (4096u64, 8192usize, 0x41u8),
            (size - 3 * MIB, 2 * MIB as usize, 0x42),
            (777, 1000, 0x43),
        ] {
            let data = vec![byte; len];
            img.write_at(off, &data).unwrap();
            want[off as usize..off as usize + len].copy_from_slice(&data);
        }
        img.flush().unwrap();
        assert!(img.repair(true).unwrap().is_clean(), "{file}");
        img.close(false).unwrap();
        let raw = tmp.path().join("qemu.raw");
        vd_tests::qemu::img(&[
            "convert",
            "-f",
            "vpc",
            "-O",
            "raw",
            vd_tests::s(&image),
            vd_tests::s(&raw),
        ]);
        let q = std::fs::read(&raw).unwrap();
        // QEMU takes the CHS product as the size for creator `qemu`: the same here.
        assert_eq!(q.len() as u64, size, "{file}: qemu's size");
        assert!(q == want, "{file}: qemu-img reads other bytes");
        let l = vd_tests::readers::libvhdi_read(&image, &[]);
        assert_eq!(l.sha256, sha256(&want), "{file}: libvhdi");
        let img = registry.open(&image, OpenFlags::READ_ONLY).unwrap();
        let mut got = vec![0u8; size as usize];
        img.read_at(0, &mut got).unwrap();
        assert!(got == want, "{file}: vd after reopening");
    }
}

/// Every corpus VHD whose file is under 32 MiB, truncated at many lengths and with single bytes
/// of its footer, dynamic header, BAT and first block changed, opens or fails with a typed
/// error, and what opens reads whole without a panic (mutated images may read other bytes;
/// they must not crash, hang or allocate without bound).
#[test]
fn damaged_and_truncated_corpus_images_never_panic() {
    use std::sync::Arc;
    use vd_core::{MemFileSystem, MemStorage, OpenFlags};
    let mut tried = 0;
    for case in expected() {
        if case["virtual_size"].as_u64().unwrap() > 300 << 20
            || case.get("parent").is_some_and(|p| !p.is_null())
        {
            continue;
        }
        let file = case["file"].as_str().unwrap();
        let bytes = vd_tests::corpus::read(&format!("vhd/{file}"));
        let n = bytes.len();
        if n > 32 << 20 {
            continue;
        }
        // Each damaged copy is made when it is tried, never all at once.
        let cuts = [
            0,
            1,
            511,
            512,
            513,
            1024,
            1535,
            1536,
            2048,
            n / 2,
            n - 513,
            n - 512,
            n - 511,
            n - 1,
        ];
        let mut spots: Vec<usize> = (0..2048).step_by(37).collect();
        // Bytes of the footer copy, the dynamic header, the BAT and the end footer.
        spots.extend((n.saturating_sub(512)..n).step_by(23));
        let variants = cuts
            .into_iter()
            .map(|cut| bytes[..cut.min(n)].to_vec())
            .chain(
                spots
                    .into_iter()
                    .flat_map(|at| [0x01u8, 0x80, 0xFF].map(|x| (at, x)))
                    .map(|(at, x)| {
                        let mut v = bytes.clone();
                        v[at] ^= x;
                        v
                    }),
            );
        for v in variants {
            let fs = Arc::new(MemFileSystem::new());
            fs.insert("/m.vhd", Arc::new(MemStorage::from_bytes(v)));
            let reg = Registry::builtin_with_provider(fs);
            if let Ok(img) = reg.open_as("vhd", Path::new("/m.vhd"), OpenFlags::READ_ONLY) {
                let mut buf = vec![0u8; 1 << 20];
                let mut pos = 0;
                while pos < img.size() {
                    let k = (img.size() - pos).min(buf.len() as u64) as usize;
                    let _ = img.read_at(pos, &mut buf[..k]);
                    pos += k as u64;
                }
                let _ = img.map(0, img.size());
            }
            tried += 1;
        }
    }
    assert!(tried > 1000, "{tried}");
}
