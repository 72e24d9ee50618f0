//! Integration tests of the vd-core framework through its public API only:
//!
//! - probe ordering and run-time registration in [`Registry`], with the test backends of
//!   `vd_core::testing::backends` next to the statically linked raw and VHDX backends;
//! - disk chains in [`Disk`]: fall-through reads, maps, writes and `std::io` over a three-level
//!   chain of "layer" images (the tiny differencing format of `vd_core::testing::backends`);
//! - chain validation: cycles, the depth cap, missing parents, explicit parents and parents that
//!   fail `Image::check_parent`;
//! - I/O faults injected with [`FaultyStorage`].

use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, mpsc};
use std::time::Duration;

use backend_raw as _;
use backend_vhdx as _;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use uuid::Uuid;
use vd_core::testing::backends::{LayerBackend, LayerSpec, TAG_MAGIC, tag, tagged_file};
use vd_core::testing::{FaultyStorage, fill_pattern};
use vd_core::{
    Confidence, Disk, DiskExtent, DiskOptions, Error, ErrorKind, Extent, ExtentKind,
    MAX_CHAIN_DEPTH, MemFileSystem, MemStorage, OpenFlags, Registry, Result, StorageProvider,
};

const KIB: u64 = 1024;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A registry of the linked backends (raw, vhdx) on a fresh in-memory file system.
fn mem_registry() -> (Arc<MemFileSystem>, Registry) {
    let fs = Arc::new(MemFileSystem::new());
    let provider: Arc<dyn StorageProvider> = fs.clone();
    (fs, Registry::builtin_with_provider(provider))
}

/// Like [`mem_registry`], with the layer backend registered at run time.
fn layer_registry() -> (Arc<MemFileSystem>, Registry) {
    let (fs, mut registry) = mem_registry();
    registry
        .register(Arc::new(LayerBackend::default()))
        .expect("registering the layer backend");
    (fs, registry)
}

fn put(fs: &MemFileSystem, path: &str, bytes: Vec<u8>) {
    fs.insert(path, Arc::new(MemStorage::from_bytes(bytes)));
}

fn names(registry: &Registry) -> Vec<&'static str> {
    registry.backends().iter().map(|b| b.name()).collect()
}

fn pattern(offset: u64, len: u64, seed: u8) -> Vec<u8> {
    let mut v = vec![0u8; usize::try_from(len).expect("small length")];
    fill_pattern(&mut v, offset, seed);
    v
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut buf = vec![0xEE; usize::try_from(disk.size()).expect("small disk")];
    disk.read_at(0, &mut buf).expect("reading the whole disk");
    buf
}

fn storage_bytes(fs: &MemFileSystem, path: &str) -> Vec<u8> {
    let s = fs.get(Path::new(path)).expect("file exists");
    let mut v = vec![0u8; usize::try_from(s.len().expect("len")).expect("small file")];
    s.read_exact_at(0, &mut v).expect("reading the file");
    v
}

fn rw() -> DiskOptions {
    DiskOptions {
        flags: OpenFlags::empty(),
        ..DiskOptions::default()
    }
}

/// `Disk::open` on another thread, failing the test instead of hanging if it never returns.
fn open_with_timeout(registry: &Registry, path: &str, opts: DiskOptions) -> Result<Disk> {
    let (tx, rx) = mpsc::channel();
    let registry = registry.clone();
    let path = PathBuf::from(path);
    std::thread::spawn(move || {
        let _ = tx.send(Disk::open(&registry, &path, &opts));
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("Disk::open did not return within 60 s: the chain walk hangs")
}

#[track_caller]
fn assert_kind<T: std::fmt::Debug>(r: Result<T>, kind: ErrorKind) -> Error {
    match r {
        Ok(v) => panic!("expected a {kind:?} error, got Ok({v:?})"),
        Err(e) => {
            assert_eq!(e.kind(), kind, "unexpected error kind: {e}");
            e
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Probe ordering and registration
// ---------------------------------------------------------------------------------------------

#[test]
fn backends_are_listed_by_priority_then_name_with_raw_last() {
    let (_fs, mut registry) = mem_registry();
    let builtin = names(&registry);
    assert!(builtin.contains(&"vhdx"), "vhdx is linked: {builtin:?}");
    assert_eq!(builtin.last(), Some(&"raw"), "raw probes last: {builtin:?}");

    // Registered in an order that is neither the probe order nor alphabetical.
    for b in [
        tag("tag-mid-b", 5, Confidence::Likely),
        tag("tag-low", i32::MIN + 1, Confidence::Likely),
        tag("tag-top", i32::MAX, Confidence::Likely),
        tag("tag-mid-a", 5, Confidence::Likely),
        tag("tag-neg", -7, Confidence::Likely),
        tag("tag-mid-c", 5, Confidence::Likely),
    ] {
        registry.register(b).expect("registering a new name");
    }
    let order = names(&registry);
    assert_eq!(order.len(), builtin.len() + 6);
    assert_eq!(order.first(), Some(&"tag-top"));
    assert_eq!(order.last(), Some(&"raw"));
    let pos = |n: &str| order.iter().position(|x| *x == n).expect("registered");
    assert!(pos("tag-mid-a") + 1 == pos("tag-mid-b") && pos("tag-mid-b") + 1 == pos("tag-mid-c"));
    assert!(pos("tag-mid-c") < pos("tag-neg"));
    assert!(pos("tag-neg") < pos("tag-low"));
    assert_eq!(
        pos("tag-low") + 1,
        pos("raw"),
        "raw (i32::MIN) comes right after MIN + 1"
    );

    // The whole list follows the documented rule: priority descending, then name ascending.
    for pair in registry.backends().windows(2) {
        let (a, b) = (&pair[0], &pair[1]);
        assert!(
            a.priority() > b.priority() || (a.priority() == b.priority() && a.name() < b.name()),
            "{} ({}) is listed before {} ({})",
            a.name(),
            a.priority(),
            b.name(),
            b.priority()
        );
    }
}

#[test]
fn a_certain_answer_beats_raw_and_confidence_beats_priority() {
    let (fs, mut registry) = mem_registry();
    put(&fs, "/p/tagged.img", tagged_file(4096));
    put(&fs, "/p/plain.img", vec![0x42; 4096]);
    let mut vhdx = b"vhdxfile".to_vec();
    vhdx.resize(4096, 0);
    put(&fs, "/p/disk.vhdx", vhdx);

    // Only raw claims the tagged file before a tag backend exists.
    let m = registry.probe(Path::new("/p/tagged.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("raw", Confidence::Fallback)
    );

    registry
        .register(tag("tag-likely", 1000, Confidence::Likely))
        .unwrap();
    let m = registry.probe(Path::new("/p/tagged.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("tag-likely", Confidence::Likely)
    );

    // Certain wins over Likely although its priority is far lower.
    registry
        .register(tag("tag-certain", -1000, Confidence::Certain))
        .unwrap();
    let m = registry.probe(Path::new("/p/tagged.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("tag-certain", Confidence::Certain)
    );
    let img = registry
        .open(Path::new("/p/tagged.img"), OpenFlags::READ_ONLY)
        .unwrap();
    assert_eq!(img.format(), "tag-certain");
    assert_eq!(img.path(), Path::new("/p/tagged.img"));

    // Files nobody else claims are still raw; the vhdx signature is still vhdx.
    let m = registry.probe(Path::new("/p/plain.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("raw", Confidence::Fallback)
    );
    let m = registry.probe(Path::new("/p/disk.vhdx")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("vhdx", Confidence::Certain)
    );
}

#[test]
fn confidence_ties_break_by_priority_then_name() {
    // Same confidence, different priorities: the higher priority wins, whatever the name and
    // the registration order.
    let (fs, mut registry) = mem_registry();
    put(&fs, "/t/tagged.img", tagged_file(1024));
    registry
        .register(tag("a-low", 3, Confidence::Likely))
        .unwrap();
    registry
        .register(tag("z-high", 7, Confidence::Likely))
        .unwrap();
    let m = registry.probe(Path::new("/t/tagged.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("z-high", Confidence::Likely)
    );

    // Same confidence and priority: the name decides, whatever the registration order.
    let (fs, mut registry) = mem_registry();
    put(&fs, "/t/tagged.img", tagged_file(1024));
    registry
        .register(tag("tie-c", 5, Confidence::Likely))
        .unwrap();
    registry
        .register(tag("tie-b", 5, Confidence::Likely))
        .unwrap();
    registry
        .register(tag("tie-a", 5, Confidence::Likely))
        .unwrap();
    // A higher priority with a lower confidence must not win.
    registry
        .register(tag("tie-fallback", 50, Confidence::Fallback))
        .unwrap();
    let m = registry.probe(Path::new("/t/tagged.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("tie-a", Confidence::Likely)
    );
    let img = registry
        .open(Path::new("/t/tagged.img"), OpenFlags::READ_ONLY)
        .unwrap();
    assert_eq!(img.format(), "tie-a");

    // A Fallback tie with raw: the run-time backend has the higher priority.
    let (fs, mut registry) = mem_registry();
    put(&fs, "/t/tagged.img", tagged_file(1024));
    registry
        .register(tag("fallback-too", 0, Confidence::Fallback))
        .unwrap();
    let m = registry.probe(Path::new("/t/tagged.img")).unwrap();
    assert_eq!(
        (m.backend.name(), m.confidence),
        ("fallback-too", Confidence::Fallback)
    );
}

#[test]
fn registering_a_duplicate_name_fails() {
    let (_fs, mut registry) = mem_registry();
    registry
        .register(tag("tag-dup", 1, Confidence::Likely))
        .unwrap();
    let before = names(&registry);
    for dup in [
        tag("tag-dup", 99, Confidence::Certain),
        tag("TAG-DUP", 99, Confidence::Certain),
        tag("raw", 99, Confidence::Certain),
        tag("VHDX", 99, Confidence::Certain),
    ] {
        let name = dup.name();
        let e = assert_kind(registry.register(dup), ErrorKind::AlreadyExists);
        assert!(e.to_string().contains(name), "{e}");
    }
    assert_eq!(
        names(&registry),
        before,
        "a failed registration changes nothing"
    );
    let kept = registry.get("tag-dup").unwrap();
    assert_eq!(kept.priority(), 1, "the first registration is kept");
    assert_eq!(registry.get("Tag-Dup").unwrap().name(), "tag-dup");
}

#[test]
fn open_as_bypasses_probing() {
    let (fs, mut registry) = mem_registry();
    put(&fs, "/o/plain.img", vec![7; 2048]);
    put(&fs, "/o/tagged.img", tagged_file(2048));
    registry
        .register(tag("tag-certain", 0, Confidence::Certain))
        .unwrap();

    // The tag backend's probe says No for the plain file; open_as does not ask.
    let plain = Path::new("/o/plain.img");
    assert_eq!(registry.probe(plain).unwrap().backend.name(), "raw");
    let img = registry
        .open_as("tag-certain", plain, OpenFlags::READ_ONLY)
        .unwrap();
    assert_eq!(img.format(), "tag-certain");
    let img = registry
        .open_as("TAG-CERTAIN", plain, OpenFlags::READ_ONLY)
        .unwrap();
    assert_eq!(img.format(), "tag-certain");

    // And raw opens a file another backend would win.
    let tagged = Path::new("/o/tagged.img");
    assert_eq!(
        registry.probe(tagged).unwrap().backend.name(),
        "tag-certain"
    );
    let img = registry
        .open_as("raw", tagged, OpenFlags::READ_ONLY)
        .unwrap();
    assert_eq!(img.format(), "raw");
    let mut head = [0u8; 8];
    img.read_at(0, &mut head).unwrap();
    assert_eq!(head, TAG_MAGIC);

    // DiskOptions::format does the same for a disk's top image.
    let opts = DiskOptions {
        format: Some("tag-certain".into()),
        ..DiskOptions::default()
    };
    let disk = Disk::open(&registry, plain, &opts).unwrap();
    assert_eq!(disk.top().format(), "tag-certain");
    assert_eq!(read_all(&disk), vec![7; 2048]);

    let e = assert_kind(
        registry.open_as("no-such-format", plain, OpenFlags::READ_ONLY),
        ErrorKind::NotFound,
    );
    assert!(e.to_string().contains("no-such-format"), "{e}");
}

#[test]
fn missing_or_unreadable_files_are_named_in_errors() {
    let (fs, registry) = mem_registry();
    let missing = "/nowhere/missing.img";
    let p = Path::new(missing);
    for e in [
        assert_kind(registry.probe(p), ErrorKind::NotFound),
        assert_kind(registry.open(p, OpenFlags::READ_ONLY), ErrorKind::NotFound),
        assert_kind(
            registry.open_as("raw", p, OpenFlags::READ_ONLY),
            ErrorKind::NotFound,
        ),
        assert_kind(
            Disk::open(&registry, p, &DiskOptions::default()),
            ErrorKind::NotFound,
        ),
    ] {
        assert!(e.to_string().contains(missing), "{e}");
        assert_eq!(e.context().path.as_deref(), Some(p));
    }

    // A file whose every read fails.
    let dead = Arc::new(FaultyStorage::from_bytes(vec![1; 4096]));
    dead.cut_power_now();
    fs.insert("/dead/unreadable.img", dead);
    let p = Path::new("/dead/unreadable.img");
    let e = registry.probe(p).unwrap_err();
    assert!(e.to_string().contains("/dead/unreadable.img"), "{e}");
    let e = registry
        .open_as("raw", p, OpenFlags::READ_ONLY)
        .unwrap_err();
    assert!(e.to_string().contains("/dead/unreadable.img"), "{e}");

    // The host file system: a missing file and a directory.
    let dir = tempfile::tempdir().unwrap();
    let host = Registry::builtin();
    let gone = dir.path().join("gone.img");
    let e = assert_kind(host.probe(&gone), ErrorKind::NotFound);
    assert!(e.to_string().contains(&*gone.to_string_lossy()), "{e}");
    let e = host.probe(dir.path()).unwrap_err();
    assert!(
        e.to_string().contains(&*dir.path().to_string_lossy()),
        "{e}"
    );
    let e = Disk::open(&host, dir.path(), &DiskOptions::default()).unwrap_err();
    assert!(
        e.to_string().contains(&*dir.path().to_string_lossy()),
        "{e}"
    );
}

/// What a disk over `layers` (top first) must read, and which layer each byte comes from,
/// computed byte by byte from the specification of `Disk`.
fn model(layers: &[&LayerSpec]) -> (Vec<u8>, Vec<Option<usize>>) {
    let size = layers[0].header.size;
    let mut bytes = Vec::new();
    let mut owners = Vec::new();
    for pos in 0..size {
        let mut found = (0, None);
        for (i, l) in layers.iter().enumerate() {
            if pos >= l.header.size {
                break;
            }
            if let Some(b) = l.holds(pos) {
                found = (b, Some(i));
                break;
            }
        }
        bytes.push(found.0);
        owners.push(found.1);
    }
    (bytes, owners)
}

/// The merged map of `owners[offset..offset + len]`.
fn model_map(owners: &[Option<usize>], offset: u64, len: u64) -> Vec<DiskExtent> {
    let mut out: Vec<DiskExtent> = Vec::new();
    for pos in offset..offset + len {
        let layer = owners[pos as usize];
        let kind = if layer.is_some() {
            ExtentKind::Data
        } else {
            ExtentKind::Zero
        };
        match out.last_mut() {
            Some(last) if last.layer == layer && last.kind == kind => last.length += 1,
            _ => out.push(DiskExtent {
                offset: pos,
                length: 1,
                kind,
                layer,
            }),
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The standard three-level chain
// ---------------------------------------------------------------------------------------------

const TOP: &str = "/chain/top.layer";
const MID: &str = "/chain/mid.layer";
const BASE: &str = "/chain/base.layer";

/// top (96 KiB) -> mid (64 KiB) -> base (32 KiB): each child is larger than its parent, extents
/// overlap across layers, some are unaligned, and some cross where the parent ends.
fn standard_chain() -> [LayerSpec; 3] {
    let base = LayerSpec::base(32 * KIB)
        // Two adjacent extents that read as one run.
        .data(0, 2 * KIB, 0xB1)
        .data(2 * KIB, 6 * KIB, 0xB1)
        .data(12 * KIB, 4 * KIB, 0xB2)
        .data(20_000, 100, 0xB3)
        .data(28 * KIB, 4 * KIB, 0xB4);
    let mid = LayerSpec::child(64 * KIB, "base.layer")
        .data(4 * KIB, 2 * KIB, 0xC1)
        .data(14 * KIB, 6 * KIB, 0xC2)
        .data(40 * KIB, 4 * KIB, 0xC3)
        .data(63 * KIB, KIB, 0xC4);
    let top = LayerSpec::child(96 * KIB, "/chain/mid.layer")
        .data(5 * KIB, 8 * KIB, 0xD1)
        .data(15_000, 1, 0xD2)
        .data(20_050, 3, 0xD3)
        .data(70 * KIB, 2 * KIB, 0xD4)
        // A newer extent overlapping an older one in the same layer wins.
        .data(71 * KIB, 2 * KIB, 0xD5)
        .data(96 * KIB - 7, 7, 0xD6);
    [top, mid, base]
}

fn put_standard_chain(fs: &MemFileSystem) -> (Vec<u8>, Vec<Option<usize>>) {
    let [top, mid, base] = standard_chain();
    top.put(fs, TOP);
    mid.put(fs, MID);
    base.put(fs, BASE);
    model(&[&top, &mid, &base])
}

// ---------------------------------------------------------------------------------------------
// Chain reads, maps, writes and std::io
// ---------------------------------------------------------------------------------------------

#[test]
fn chain_reads_fall_through_to_parents() {
    let (fs, registry) = layer_registry();
    let (expected, owners) = put_standard_chain(&fs);
    // The model is not trivial: every layer and the zeros below the base show through.
    for want in [Some(0), Some(1), Some(2), None] {
        assert!(owners.contains(&want), "model has no byte from {want:?}");
    }

    let disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();
    let paths: Vec<_> = disk
        .layers()
        .iter()
        .map(|l| l.path().to_path_buf())
        .collect();
    assert_eq!(paths, [TOP, MID, BASE].map(PathBuf::from));
    assert!(disk.layers().iter().all(|l| l.format() == "layer"));
    assert_eq!(disk.size(), 96 * KIB);
    assert_eq!(disk.top().path(), Path::new(TOP));
    assert_eq!(read_all(&disk), expected);

    // Spot checks of the rules, independently of the model.
    let byte = |pos: u64| {
        let mut b = [0xEE];
        disk.read_at(pos, &mut b).unwrap();
        b[0]
    };
    assert_eq!(
        byte(5 * KIB),
        pattern(5 * KIB, 1, 0xD1)[0],
        "top wins over mid and base"
    );
    assert_eq!(
        byte(4 * KIB),
        pattern(4 * KIB, 1, 0xC1)[0],
        "mid wins over base"
    );
    assert_eq!(
        byte(100),
        pattern(100, 1, 0xB1)[0],
        "falls through to the base"
    );
    assert_eq!(byte(24 * KIB), 0, "held by no layer");
    assert_eq!(
        byte(31 * KIB),
        pattern(31 * KIB, 1, 0xB4)[0],
        "base's last KiB"
    );
    assert_eq!(byte(33 * KIB), 0, "beyond the base inside mid");
    assert_eq!(byte(80 * KIB), 0, "beyond mid inside top");

    // Reads crossing every boundary, at awkward offsets and lengths.
    let size = disk.size();
    for len in [1u64, 2, 511, 512, 4097, 20_000] {
        let mut off = 0;
        while off + len <= size {
            let mut buf = vec![0xEE; len as usize];
            disk.read_at(off, &mut buf).unwrap();
            assert!(
                buf == expected[off as usize..(off + len) as usize],
                "read of {len} bytes at {off} differs"
            );
            off += 3001;
        }
    }

    // Out-of-range reads fail without touching the layers.
    let mut buf = [0u8; 2];
    assert_kind(disk.read_at(size - 1, &mut buf), ErrorKind::OutOfRange);
    assert_kind(disk.read_at(u64::MAX, &mut buf), ErrorKind::OutOfRange);
    disk.read_at(size, &mut []).unwrap();
}

#[test]
fn random_chain_reads_match_the_model() {
    let (fs, registry) = layer_registry();
    let (expected, _) = put_standard_chain(&fs);
    let disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();
    let size = disk.size();
    let mut runner = TestRunner::new(Config::with_cases(256));
    runner
        .run(&(0..size, 0..40_000u64), |(off, len)| {
            let len = len.min(size - off);
            let mut buf = vec![0xEE; len as usize];
            disk.read_at(off, &mut buf)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            if buf != expected[off as usize..(off + len) as usize] {
                return Err(TestCaseError::fail(format!(
                    "read of {len} at {off} differs"
                )));
            }
            let map = disk
                .map(off, len)
                .map_err(|e| TestCaseError::fail(e.to_string()))?;
            let mut pos = off;
            for e in &map {
                if e.offset != pos || e.length == 0 {
                    return Err(TestCaseError::fail(format!(
                        "map is not contiguous: {map:?}"
                    )));
                }
                pos += e.length;
            }
            if pos != off + len {
                return Err(TestCaseError::fail(format!("map does not cover: {map:?}")));
            }
            Ok(())
        })
        .unwrap();
}

#[test]
fn chain_map_names_layers_and_merges_extents() {
    let (fs, registry) = layer_registry();
    let (_, owners) = put_standard_chain(&fs);
    let disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();
    let size = disk.size();

    let map = disk.map(0, size).unwrap();
    assert_eq!(map, model_map(&owners, 0, size));
    assert!(map.iter().all(|e| e.kind != ExtentKind::Unallocated));
    assert!(
        map.windows(2)
            .all(|w| (w[0].kind, w[0].layer) != (w[1].kind, w[1].layer))
    );

    // Hand-checked pieces: base [0, 4K), mid [4K, 5K), top [5K, 13K) ...
    assert_eq!(
        &map[..4],
        &[
            DiskExtent {
                offset: 0,
                length: 4 * KIB,
                kind: ExtentKind::Data,
                layer: Some(2)
            },
            DiskExtent {
                offset: 4 * KIB,
                length: KIB,
                kind: ExtentKind::Data,
                layer: Some(1)
            },
            DiskExtent {
                offset: 5 * KIB,
                length: 8 * KIB,
                kind: ExtentKind::Data,
                layer: Some(0)
            },
            DiskExtent {
                offset: 13 * KIB,
                length: KIB,
                kind: ExtentKind::Data,
                layer: Some(2)
            },
        ]
    );
    // ... and zeros from the end of the base's last extent across mid's hole up to 40 KiB:
    // below the base and beyond it are both "zero, no layer", merged into one run.
    let tail = disk.map(28 * KIB, 16 * KIB).unwrap();
    assert_eq!(
        tail,
        vec![
            DiskExtent {
                offset: 28 * KIB,
                length: 4 * KIB,
                kind: ExtentKind::Data,
                layer: Some(2)
            },
            DiskExtent {
                offset: 32 * KIB,
                length: 8 * KIB,
                kind: ExtentKind::Zero,
                layer: None
            },
            DiskExtent {
                offset: 40 * KIB,
                length: 4 * KIB,
                kind: ExtentKind::Data,
                layer: Some(1)
            },
        ]
    );
    // Sub-ranges agree with the model everywhere.
    for (off, len) in [
        (1, 1),
        (4095, 2),
        (14_999, 3),
        (20_040, 70),
        (62 * KIB, 30 * KIB),
    ] {
        assert_eq!(
            disk.map(off, len).unwrap(),
            model_map(&owners, off, len),
            "{off}+{len}"
        );
    }
    assert_kind(disk.map(size - 1, 2), ErrorKind::OutOfRange);
}

#[test]
fn writes_go_to_the_top_layer() {
    let (fs, registry) = layer_registry();
    let (mut expected, mut owners) = put_standard_chain(&fs);
    let mid_before = storage_bytes(&fs, MID);
    let base_before = storage_bytes(&fs, BASE);

    let disk = Disk::open(&registry, Path::new(TOP), &rw()).unwrap();
    // Only the top is writable; parents are always opened read-only.
    assert!(!disk.top().open_flags().contains(OpenFlags::READ_ONLY));
    for parent in &disk.layers()[1..] {
        assert!(parent.open_flags().contains(OpenFlags::READ_ONLY));
    }
    let mut write = |off: u64, len: u64, seed: u8| {
        let data = pattern(off, len, seed);
        disk.write_at(off, &data).unwrap();
        expected[off as usize..(off + len) as usize].copy_from_slice(&data);
        owners[off as usize..(off + len) as usize].fill(Some(0));
    };
    write(30 * KIB, 6 * KIB, 0xE1); // over the base's end and into mid's hole
    write(1, 1, 0xE2); // a single byte over the base
    write(60 * KIB, 8 * KIB, 0xE3); // across mid's end
    write(13 * KIB - 3, 6, 0xE4); // across the end of a top extent
    assert_eq!(read_all(&disk), expected);
    assert_eq!(
        disk.map(0, disk.size()).unwrap(),
        model_map(&owners, 0, disk.size())
    );

    // The framework checks the range against the top's size before asking the image.
    assert_kind(disk.write_at(96 * KIB - 1, &[1, 2]), ErrorKind::OutOfRange);
    disk.flush().unwrap();
    disk.close().unwrap();

    assert_eq!(
        storage_bytes(&fs, MID),
        mid_before,
        "the parent is untouched"
    );
    assert_eq!(
        storage_bytes(&fs, BASE),
        base_before,
        "the grandparent is untouched"
    );

    // The data is in the top file: the top alone maps it as its own.
    let top = registry.open(Path::new(TOP), OpenFlags::READ_ONLY).unwrap();
    assert_eq!(
        top.map(60 * KIB, 8 * KIB).unwrap(),
        vec![
            Extent {
                offset: 60 * KIB,
                length: 4 * KIB,
                kind: ExtentKind::Data
            },
            Extent {
                offset: 64 * KIB,
                length: 4 * KIB,
                kind: ExtentKind::Data
            }
        ]
    );
    drop(top);

    let disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();
    assert_eq!(read_all(&disk), expected, "the writes persist");
    // A read-only disk refuses writes and keeps its data.
    assert_kind(disk.write_at(0, &[9]), ErrorKind::ReadOnly);
    assert_eq!(read_all(&disk), expected);
}

#[test]
fn disk_implements_std_io() {
    let (fs, registry) = layer_registry();
    let (mut expected, _) = put_standard_chain(&fs);
    let mut disk = Disk::open(&registry, Path::new(TOP), &rw()).unwrap();
    let size = disk.size();

    let mut all = Vec::new();
    disk.read_to_end(&mut all).unwrap();
    assert_eq!(all, expected);
    assert_eq!(disk.stream_position().unwrap(), size);
    assert_eq!(disk.read(&mut [0u8; 16]).unwrap(), 0, "end of disk");

    assert_eq!(disk.seek(SeekFrom::Start(5000)).unwrap(), 5000);
    let mut buf = vec![0u8; 3000];
    disk.read_exact(&mut buf).unwrap();
    assert_eq!(buf, expected[5000..8000]);
    assert_eq!(disk.seek(SeekFrom::Current(-1000)).unwrap(), 7000);
    let mut small = [0u8; 10];
    disk.read_exact(&mut small).unwrap();
    assert_eq!(small, expected[7000..7010]);
    assert_eq!(disk.seek(SeekFrom::End(-10)).unwrap(), size - 10);
    let mut rest = Vec::new();
    disk.read_to_end(&mut rest).unwrap();
    assert_eq!(rest, expected[size as usize - 10..]);
    // A read larger than what is left is short.
    disk.seek(SeekFrom::End(-4)).unwrap();
    assert_eq!(disk.read(&mut [0u8; 64]).unwrap(), 4);

    // Writes through io::Write, read back through io::Read.
    let data = pattern(33_333, 7_777, 0xF1);
    disk.seek(SeekFrom::Start(33_333)).unwrap();
    disk.write_all(&data).unwrap();
    Write::flush(&mut disk).unwrap();
    expected[33_333..33_333 + 7_777].copy_from_slice(&data);
    assert_eq!(disk.stream_position().unwrap(), 33_333 + 7_777);
    disk.rewind().unwrap();
    let mut all = Vec::new();
    io::copy(&mut disk, &mut all).unwrap();
    assert_eq!(all, expected);

    // Writing across the end is short, then fails; seeking before the start fails.
    disk.seek(SeekFrom::End(-100)).unwrap();
    assert_eq!(disk.write(&[0xAB; 200]).unwrap(), 100);
    assert_eq!(
        disk.write(&[0xAB; 1]).unwrap_err().kind(),
        io::ErrorKind::WriteZero
    );
    expected[size as usize - 100..].fill(0xAB);
    assert_eq!(
        disk.seek(SeekFrom::Current(-(size as i64) - 1))
            .unwrap_err()
            .kind(),
        io::ErrorKind::InvalidInput
    );
    assert_eq!(
        disk.stream_position().unwrap(),
        size,
        "a failed seek does not move"
    );
    assert_eq!(read_all(&disk), expected);
    disk.close().unwrap();

    // On a read-only disk io::Write reports PermissionDenied.
    let mut disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();
    assert_eq!(
        disk.write(&[1]).unwrap_err().kind(),
        io::ErrorKind::PermissionDenied
    );
}

// ---------------------------------------------------------------------------------------------
// Chain validation
// ---------------------------------------------------------------------------------------------

#[test]
fn parent_cycles_are_detected() {
    let (fs, mut registry) = mem_registry();
    let backend = Arc::new(LayerBackend::default());
    registry.register(backend.clone()).unwrap();
    // a -> b -> a
    LayerSpec::child(4 * KIB, "b.layer").put(&fs, "/cyc/a.layer");
    LayerSpec::child(4 * KIB, "a.layer").put(&fs, "/cyc/b.layer");
    // self -> self
    LayerSpec::child(4 * KIB, "self.layer").put(&fs, "/cyc/self.layer");
    // x -> y -> z -> y (the loop does not include the top)
    LayerSpec::child(4 * KIB, "y.layer").put(&fs, "/cyc/x.layer");
    LayerSpec::child(4 * KIB, "z.layer").put(&fs, "/cyc/y.layer");
    LayerSpec::child(4 * KIB, "/cyc/y.layer").put(&fs, "/cyc/z.layer");

    for top in [
        "/cyc/a.layer",
        "/cyc/b.layer",
        "/cyc/self.layer",
        "/cyc/x.layer",
    ] {
        let before = backend.opens.load(Ordering::Relaxed);
        let e = assert_kind(
            open_with_timeout(&registry, top, DiskOptions::default()),
            ErrorKind::BadChain,
        );
        assert!(e.to_string().contains("/cyc/"), "{e}");
        // The loop is found when it closes, not by the depth cap after walking it 256 times.
        let opened = backend.opens.load(Ordering::Relaxed) - before;
        assert!(
            opened <= 4,
            "{top}: {opened} images opened before the loop was found"
        );
    }
    // Without a useful depth cap, a loop still ends the walk.
    let opts = DiskOptions {
        max_depth: usize::MAX,
        ..DiskOptions::default()
    };
    assert_kind(
        open_with_timeout(&registry, "/cyc/x.layer", opts),
        ErrorKind::BadChain,
    );
}

#[test]
fn parent_cycles_through_host_paths_are_detected() {
    // On the host file system, a parent named by another path to the same file (here "./")
    // is the same image: canonicalisation must catch it.
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a.layer");
    let b = dir.path().join("b.layer");
    std::fs::write(&a, LayerSpec::child(4 * KIB, "./b.layer").bytes()).unwrap();
    std::fs::write(&b, LayerSpec::child(4 * KIB, "./sub/../a.layer").bytes()).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let mut registry = Registry::builtin();
    let backend = Arc::new(LayerBackend::default());
    registry.register(backend.clone()).unwrap();
    let e = assert_kind(
        open_with_timeout(&registry, a.to_str().unwrap(), DiskOptions::default()),
        ErrorKind::BadChain,
    );
    assert!(e.to_string().contains("b.layer"), "{e}");
    let opened = backend.opens.load(Ordering::Relaxed);
    assert!(
        opened <= 3,
        "{opened} images opened before the loop was found"
    );
}

/// `n` layers `/deep/l0.layer` (top) ... `/deep/l{n-1}.layer` (base), each holding the one
/// byte at its index.
fn put_deep_chain(fs: &MemFileSystem, n: usize) {
    for i in 0..n {
        let mut l = LayerSpec::base(1024).data(i as u64, 1, i as u8);
        if i + 1 < n {
            l = l.parent(&format!("l{}.layer", i + 1));
        }
        l.put(fs, &format!("/deep/l{i}.layer"));
    }
}

#[test]
fn chains_deeper_than_max_depth_are_refused() {
    let (fs, registry) = layer_registry();
    put_deep_chain(&fs, 12);
    let with_depth = |max_depth| DiskOptions {
        max_depth,
        ..DiskOptions::default()
    };
    let disk = Disk::open(&registry, Path::new("/deep/l0.layer"), &with_depth(12)).unwrap();
    assert_eq!(disk.layers().len(), 12);
    let all = read_all(&disk);
    for i in 0..12u64 {
        assert_eq!(
            all[i as usize],
            pattern(i, 1, i as u8)[0],
            "byte {i} comes from layer {i}"
        );
    }
    assert!(all[12..].iter().all(|&b| b == 0));
    let map = disk.map(0, 12).unwrap();
    assert_eq!(map.len(), 12);
    assert!(map.iter().enumerate().all(|(i, e)| e.layer == Some(i)));

    for cap in [11, 5, 2, 1, 0] {
        let e = assert_kind(
            Disk::open(&registry, Path::new("/deep/l0.layer"), &with_depth(cap)),
            ErrorKind::BadChain,
        );
        assert!(e.to_string().contains("/deep/l0.layer"), "{e}");
    }
    // Opening further down the chain needs fewer layers.
    let disk = Disk::open(&registry, Path::new("/deep/l7.layer"), &with_depth(5)).unwrap();
    assert_eq!(disk.layers().len(), 5);
    // A base image alone fits any cap.
    let disk = Disk::open(&registry, Path::new("/deep/l11.layer"), &with_depth(1)).unwrap();
    assert_eq!(disk.layers().len(), 1);
}

#[test]
fn max_depth_is_capped_at_max_chain_depth() {
    let (fs, registry) = layer_registry();
    put_deep_chain(&fs, MAX_CHAIN_DEPTH + 1);
    let p = |i: usize| PathBuf::from(format!("/deep/l{i}.layer"));
    // Exactly MAX_CHAIN_DEPTH layers open (from the second image down).
    let disk = Disk::open(&registry, &p(1), &DiskOptions::default()).unwrap();
    assert_eq!(disk.layers().len(), MAX_CHAIN_DEPTH);
    let all = read_all(&disk);
    for (i, &b) in all.iter().enumerate().take(MAX_CHAIN_DEPTH + 1).skip(1) {
        assert_eq!(b, pattern(i as u64, 1, i as u8)[0], "byte {i}");
    }
    drop(disk);
    // One more is refused, even when asked for a deeper cap.
    for max_depth in [MAX_CHAIN_DEPTH, MAX_CHAIN_DEPTH + 1, usize::MAX] {
        let opts = DiskOptions {
            max_depth,
            ..DiskOptions::default()
        };
        assert_kind(Disk::open(&registry, &p(0), &opts), ErrorKind::BadChain);
    }
}

#[test]
fn missing_parents_name_every_path_tried() {
    let (fs, registry) = layer_registry();
    LayerSpec::child(8 * KIB, "missing-1.layer")
        .parent("/elsewhere/missing-2.layer")
        .parent("sub/missing-3.layer")
        .put(&fs, "/m/top.layer");
    let e = assert_kind(
        Disk::open(
            &registry,
            Path::new("/m/top.layer"),
            &DiskOptions::default(),
        ),
        ErrorKind::NotFound,
    );
    let msg = e.to_string();
    for tried in [
        "/m/missing-1.layer",
        "/elsewhere/missing-2.layer",
        "/m/sub/missing-3.layer",
    ] {
        assert!(msg.contains(tried), "{tried} not named in: {msg}");
    }
    assert!(msg.contains("/m/top.layer"), "the child is named: {msg}");

    // A missing grandparent names the paths tried for it and the image that needs it.
    LayerSpec::child(8 * KIB, "mid.layer").put(&fs, "/m/top2.layer");
    LayerSpec::child(8 * KIB, "gone.layer").put(&fs, "/m/mid.layer");
    let e = assert_kind(
        Disk::open(
            &registry,
            Path::new("/m/top2.layer"),
            &DiskOptions::default(),
        ),
        ErrorKind::NotFound,
    );
    let msg = e.to_string();
    assert!(
        msg.contains("/m/gone.layer") && msg.contains("/m/mid.layer"),
        "{msg}"
    );

    // Candidates that are missing or cannot be opened are skipped; the first good one is used.
    let dead = Arc::new(FaultyStorage::from_bytes(vec![0; 64]));
    dead.cut_power_now();
    fs.insert("/m/unreadable.layer", dead);
    LayerSpec::base(8 * KIB)
        .data(0, 16, 0x77)
        .put(&fs, "/m/base.layer");
    LayerSpec::child(8 * KIB, "absent.layer")
        .parent("unreadable.layer")
        .parent("base.layer")
        .put(&fs, "/m/top3.layer");
    let disk = Disk::open(
        &registry,
        Path::new("/m/top3.layer"),
        &DiskOptions::default(),
    )
    .unwrap();
    assert_eq!(disk.layers()[1].path(), Path::new("/m/base.layer"));
    let mut b = [0u8; 16];
    disk.read_at(0, &mut b).unwrap();
    assert_eq!(b.to_vec(), pattern(0, 16, 0x77));
}

#[test]
fn explicit_parents_override_the_locator() {
    let (fs, registry) = layer_registry();
    put_standard_chain(&fs);
    let [top, mid, base] = standard_chain();
    let alt_mid = LayerSpec::child(64 * KIB, "never-looked-up.layer").data(0, 64 * KIB, 0xA1);
    let alt_base = LayerSpec::base(64 * KIB).data(0, 64 * KIB, 0xA2);
    let alt_mid2 = LayerSpec::child(64 * KIB, "alt-base.layer").data(0, 8 * KIB, 0xA3);
    alt_mid.put(&fs, "/alt/alt-mid.layer");
    alt_base.put(&fs, "/alt/alt-base.layer");
    alt_mid2.put(&fs, "/alt/alt-mid2.layer");

    let paths =
        |d: &Disk| -> Vec<PathBuf> { d.layers().iter().map(|l| l.path().to_path_buf()).collect() };
    let with_parents = |parents: &[&str]| DiskOptions {
        parents: parents.iter().map(PathBuf::from).collect(),
        ..DiskOptions::default()
    };

    // Both levels given: neither header locator is used.
    let disk = Disk::open(
        &registry,
        Path::new(TOP),
        &with_parents(&["/alt/alt-mid.layer", "/alt/alt-base.layer"]),
    )
    .unwrap();
    assert_eq!(
        paths(&disk),
        [TOP, "/alt/alt-mid.layer", "/alt/alt-base.layer"].map(PathBuf::from)
    );
    assert_eq!(read_all(&disk), model(&[&top, &alt_mid, &alt_base]).0);

    // One level given: the next one comes from that parent's own locator.
    let disk = Disk::open(
        &registry,
        Path::new(TOP),
        &with_parents(&["/alt/alt-mid2.layer"]),
    )
    .unwrap();
    assert_eq!(
        paths(&disk),
        [TOP, "/alt/alt-mid2.layer", "/alt/alt-base.layer"].map(PathBuf::from)
    );
    assert_eq!(read_all(&disk), model(&[&top, &alt_mid2, &alt_base]).0);

    // Without explicit parents the locator is used (sanity check of the fixture).
    let disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();
    assert_eq!(paths(&disk), [TOP, MID, BASE].map(PathBuf::from));
    assert_eq!(read_all(&disk), model(&[&top, &mid, &base]).0);

    // A missing explicit parent is not replaced by the locator's (existing) one.
    let e = assert_kind(
        Disk::open(
            &registry,
            Path::new(TOP),
            &with_parents(&["/alt/none.layer"]),
        ),
        ErrorKind::NotFound,
    );
    let msg = e.to_string();
    assert!(msg.contains("/alt/none.layer"), "{msg}");
    assert!(!msg.contains(MID), "the locator was not consulted: {msg}");

    // An explicit parent that is the child itself is a loop.
    assert_kind(
        open_with_timeout(&registry, TOP, with_parents(&[TOP])),
        ErrorKind::BadChain,
    );
}

#[test]
fn parents_must_pass_check_parent() {
    let (fs, registry) = layer_registry();
    let m1 = Uuid::from_u128(0x1111_0000_0000_4000_8000_0000_0000_0001);
    let m2 = Uuid::from_u128(0x2222_0000_0000_4000_8000_0000_0000_0002);
    let stale = Uuid::from_u128(0x3333_0000_0000_4000_8000_0000_0000_0003);
    LayerSpec::base(8 * KIB)
        .modification(m1)
        .data(0, 8 * KIB, 0x51)
        .put(&fs, "/u/base.layer");
    LayerSpec::base(8 * KIB)
        .modification(m2)
        .data(0, 8 * KIB, 0x52)
        .put(&fs, "/u/other.layer");
    LayerSpec::base(8 * KIB).put(&fs, "/u/anonymous.layer");

    let open = |path: &str| Disk::open(&registry, Path::new(path), &DiskOptions::default());

    // Matching modification UUID: accepted.
    LayerSpec::child(8 * KIB, "base.layer")
        .parent_uuid(m1)
        .put(&fs, "/u/good.layer");
    let disk = open("/u/good.layer").unwrap();
    assert_eq!(disk.layers()[1].path(), Path::new("/u/base.layer"));
    assert_eq!(
        disk.layers()[1].uuid().unwrap(),
        Uuid::from_u128(m1.as_u128() ^ 0xFFFF)
    );

    // Mismatch: the parent was found, so this is not "not found" but a mismatch that says
    // where it was found, what it is and what the child expects.
    LayerSpec::child(8 * KIB, "base.layer")
        .parent_uuid(m2)
        .put(&fs, "/u/bad.layer");
    let e = assert_kind(open("/u/bad.layer"), ErrorKind::ParentMismatch);
    let m = e.linkage_mismatch().expect("a linkage mismatch");
    assert_eq!(m.child, Path::new("/u/bad.layer"));
    assert_eq!(m.parent, Path::new("/u/base.layer"));
    assert_eq!((m.found, m.expected), (m1, m2));
    let msg = e.to_string();
    for part in [
        "/u/bad.layer",
        "/u/base.layer",
        &m1.to_string(),
        &m2.to_string(),
    ] {
        assert!(msg.contains(part), "{part} not in: {msg}");
    }
    // Image::check_parent's default itself reports ParentMismatch.
    let child = registry
        .open(Path::new("/u/bad.layer"), OpenFlags::READ_ONLY)
        .unwrap();
    let parent = registry
        .open(Path::new("/u/base.layer"), OpenFlags::READ_ONLY)
        .unwrap();
    let e = assert_kind(
        child.check_parent(parent.as_ref()),
        ErrorKind::ParentMismatch,
    );
    assert!(e.to_string().contains(&m1.to_string()), "{e}");
    let other = registry
        .open(Path::new("/u/other.layer"), OpenFlags::READ_ONLY)
        .unwrap();
    child.check_parent(other.as_ref()).unwrap();

    // A mismatching candidate is skipped for a matching later one.
    LayerSpec::child(8 * KIB, "base.layer")
        .parent("other.layer")
        .parent_uuid(m2)
        .put(&fs, "/u/second.layer");
    let disk = open("/u/second.layer").unwrap();
    assert_eq!(disk.layers()[1].path(), Path::new("/u/other.layer"));
    assert_eq!(read_all(&disk), pattern(0, 8 * KIB, 0x52));

    // An explicit parent is checked too.
    let opts = DiskOptions {
        parents: vec![PathBuf::from("/u/other.layer")],
        ..DiskOptions::default()
    };
    let e = assert_kind(
        Disk::open(&registry, Path::new("/u/good.layer"), &opts),
        ErrorKind::ParentMismatch,
    );
    assert!(e.to_string().contains(&m2.to_string()), "{e}");

    // The recorded parent modification UUID is an alternative match...
    LayerSpec::child(8 * KIB, "base.layer")
        .parent_uuid(stale)
        .parent_modification(m1)
        .put(&fs, "/u/alt.layer");
    open("/u/alt.layer").unwrap();
    // ...but a nil one matches nothing.
    LayerSpec::child(8 * KIB, "base.layer")
        .parent_uuid(stale)
        .parent_modification(Uuid::nil())
        .put(&fs, "/u/nil.layer");
    assert_kind(open("/u/nil.layer"), ErrorKind::ParentMismatch);
    // A parent that records no modification UUID cannot be checked and is accepted.
    LayerSpec::child(8 * KIB, "anonymous.layer")
        .parent_uuid(stale)
        .put(&fs, "/u/unchecked.layer");
    open("/u/unchecked.layer").unwrap();

    // Images that record no parent identity accept any parent.
    LayerSpec::child(8 * KIB, "base.layer").put(&fs, "/u/lenient.layer");
    open("/u/lenient.layer").unwrap();
}

// ---------------------------------------------------------------------------------------------
// Fault injection
// ---------------------------------------------------------------------------------------------

#[test]
fn an_injected_read_failure_is_an_io_error() {
    let (fs, registry) = mem_registry();
    let data = pattern(0, 64 * KIB, 0x99);
    let faulty = Arc::new(FaultyStorage::from_bytes(data.clone()));
    fs.insert("/f/raw.img", faulty.clone());
    let mut disk = Disk::open(&registry, Path::new("/f/raw.img"), &DiskOptions::default()).unwrap();
    assert_eq!(disk.top().format(), "raw");

    faulty.fail_nth(0);
    let mut buf = vec![0u8; 4096];
    let e = assert_kind(disk.read_at(4096, &mut buf), ErrorKind::Io);
    assert!(e.to_string().contains("/f/raw.img"), "{e}");
    // The failure was one-off.
    disk.read_at(4096, &mut buf).unwrap();
    assert_eq!(buf, data[4096..8192]);

    // Through std::io::Read: an io::Error carrying the vd error.
    faulty.fail_nth(0);
    let e = disk.read(&mut buf).unwrap_err();
    let inner = e
        .get_ref()
        .and_then(|e| e.downcast_ref::<Error>())
        .expect("the vd error is the source");
    assert_eq!(inner.kind(), ErrorKind::Io);
    assert_eq!(
        disk.stream_position().unwrap(),
        0,
        "a failed read does not move"
    );
    disk.read_exact(&mut buf).unwrap();
    assert_eq!(buf, data[..4096]);
}

#[test]
fn a_failure_in_a_parent_surfaces_through_the_chain() {
    let (fs, registry) = layer_registry();
    let [top, mid, base] = standard_chain();
    top.put(&fs, TOP);
    mid.put(&fs, MID);
    let faulty = Arc::new(FaultyStorage::from_bytes(base.bytes()));
    fs.insert(BASE, faulty.clone());
    let (expected, _) = model(&[&top, &mid, &base]);
    let disk = Disk::open(&registry, Path::new(TOP), &DiskOptions::default()).unwrap();

    faulty.fail_nth(0);
    // A range the top holds does not touch the base: the failure stays armed.
    let mut buf = vec![0u8; 8 * KIB as usize];
    disk.read_at(5 * KIB, &mut buf).unwrap();
    assert_eq!(buf, expected[5 * KIB as usize..13 * KIB as usize]);
    // A range that falls through to the base fails with the base's I/O error.
    let mut buf = vec![0u8; 4 * KIB as usize];
    let e = assert_kind(disk.read_at(0, &mut buf), ErrorKind::Io);
    assert!(e.to_string().contains(BASE), "{e}");
    disk.read_at(0, &mut buf).unwrap();
    assert_eq!(buf, expected[..4 * KIB as usize]);
}

#[test]
fn every_injected_failure_is_an_error_or_correct_data() {
    let data = pattern(0, 16 * KIB, 0x3C);
    let mut failures = 0;
    let mut n = 0;
    loop {
        let (fs, registry) = mem_registry();
        let faulty = Arc::new(FaultyStorage::from_bytes(data.clone()));
        fs.insert("/s/raw.img", faulty.clone());
        faulty.fail_nth(n);
        let result = Disk::open(&registry, Path::new("/s/raw.img"), &DiskOptions::default())
            .and_then(|disk| {
                let mut all = Vec::new();
                for off in (0..16 * KIB).step_by(4096) {
                    let mut buf = vec![0u8; 4096];
                    disk.read_at(off, &mut buf)?;
                    all.extend_from_slice(&buf);
                }
                Ok(all)
            });
        let fired = faulty.op_count() > n;
        match result {
            Ok(all) => assert_eq!(all, data, "wrong data with the failure at operation {n}"),
            Err(e) => {
                assert!(fired, "error without an injected failure: {e}");
                assert!(
                    matches!(e.kind(), ErrorKind::Io | ErrorKind::UnknownFormat),
                    "failure at operation {n}: {e}"
                );
                assert!(e.to_string().contains("/s/raw.img"), "{e}");
                failures += 1;
            }
        }
        if !fired {
            break;
        }
        n += 1;
    }
    assert!(
        n >= 4,
        "the sweep covered the probes and the four reads ({n} operations)"
    );
    assert!(
        failures >= 4,
        "every read failure surfaced ({failures} errors)"
    );
}
