//! Adversarial images (issue 9): small VHDX files in `tests/data/adversarial/`, each built to
//! attack one parser assumption. Each test states in its doc comment what the library does
//! with its image (a typed error, or a documented safe behaviour) and asserts it, and asserts
//! that opening, reading, mapping and checking the image read-only changes no byte of it (every
//! file is served by [`TrapFs`], which counts and refuses writes).
//!
//! The images are made by [`regenerate_adversarial_images`] (ignored by default): it starts
//! from images our own `create` makes and damages them with the offset helpers of
//! [`vd_tests::vhdx`], re-sealing every checksum so the damage reaches the deeper parsers. It
//! writes the gzip files and prints their `SOURCES.md` rows; run it with
//! `cargo test -p vd-tests --test adversarial -- --ignored` and paste the rows.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use backend_raw as _;
use backend_vhdx as _;
use backend_vhdx::{Corruption, corruption_of};
use vd_core::{
    CreateParams, Disk, DiskOptions, Error, ErrorKind, ImageFlags, MemFileSystem, OpenFlags,
    Registry, Result,
};
use vd_tests::corpus;
use vd_tests::vhdx::*;

const DIR: &str = "/a";
const IMG: &str = "/a/a.vhdx";
const B: &str = "/a/b.vhdx";
const C: &str = "/a/c.vhdx";
const SIZE: usize = 8 * MIB;
/// 4 GiB - 1 MiB: the largest multiple of 1 MiB a 32-bit length holds.
const HUGE: u32 = 0xFFF0_0000;

// ---------------------------------------------------------------------------------------------
// Generator
// ---------------------------------------------------------------------------------------------

fn params(diff: bool) -> CreateParams {
    CreateParams {
        size: SIZE as u64,
        image_flags: if diff {
            ImageFlags::DIFF
        } else {
            ImageFlags::empty()
        },
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    }
}

fn file(fs: &MemFileSystem, path: &str) -> Vec<u8> {
    let s = fs.get(Path::new(path)).expect("created");
    let mut b = vec![0u8; usize_of(s.len().expect("length"))];
    s.read_exact_at(0, &mut b).expect("reading back");
    b
}

/// Creates `path` (a child of `parent` when given), writes 0xa1 over [0, 1.5 MiB) and closes
/// it, or with `dirty` flushes and drops it (its log entry and LogGuid stay).
fn make(fs: &Arc<MemFileSystem>, path: &str, parent: Option<&str>, dirty: bool) -> Vec<u8> {
    let reg = Registry::builtin_with_provider(fs.clone());
    let img = match parent {
        Some(p) => {
            let pimg = reg
                .open(Path::new(p), OpenFlags::READ_ONLY)
                .expect("parent");
            reg.create(
                "vhdx",
                Path::new(path),
                &params(true),
                Some((Path::new(p), pimg.as_ref())),
                true,
            )
            .expect("creating a child")
        }
        None => reg
            .create("vhdx", Path::new(path), &params(false), None, true)
            .expect("creating"),
    };
    img.write_at(0, &vec![0xa1; MIB + MIB / 2])
        .expect("writing");
    img.flush().expect("flushing");
    if dirty {
        drop(img);
    } else {
        img.close(false).expect("closing");
    }
    file(fs, path)
}

/// Replaces every UTF-16LE occurrence of `from` by `to` (same length).
fn replace_utf16(b: &mut [u8], from: &str, to: &str) -> usize {
    let f: Vec<u8> = from.encode_utf16().flat_map(u16::to_le_bytes).collect();
    let t: Vec<u8> = to.encode_utf16().flat_map(u16::to_le_bytes).collect();
    assert_eq!(f.len(), t.len(), "same length");
    let mut n = 0;
    let mut i = 0;
    while i + f.len() <= b.len() {
        if b[i..i + f.len()] == f[..] {
            b[i..i + f.len()].copy_from_slice(&t);
            n += 1;
            i += f.len();
        } else {
            i += 1;
        }
    }
    n
}

/// The DataWriteGuid of the current header as a locator writes it.
fn data_write_guid(b: &[u8]) -> String {
    let h = current_header(b);
    let g = uuid::Uuid::from_slice_le(&b[h + H_DATA_WRITE_GUID..h + H_DATA_WRITE_GUID + 16])
        .expect("16 bytes");
    format!("{{{g}}}")
}

/// The parent_linkage value of a child's locator.
fn linkage_of(b: &[u8]) -> String {
    let (_, off, len) = meta_entries(b)
        .into_iter()
        .find(|(e, _, _)| b[*e..*e + 16] == META_PARENT_LOCATOR.to_bytes_le())
        .expect("a locator");
    let item = &b[usize_of(off)..usize_of(off + len)];
    let text = String::from_utf16_lossy(
        &item
            .chunks_exact(2)
            .map(|c| u16::from_le_bytes([c[0], c[1]]))
            .collect::<Vec<_>>(),
    );
    let at = text.find('{').expect("a GUID value");
    text[at..at + 38].to_string()
}

/// Every adversarial image: its file name and bytes (the chain ones are several files).
fn adversarial_images() -> Vec<(&'static str, Vec<u8>)> {
    let fs = Arc::new(MemFileSystem::new());
    let clean = make(&fs, IMG, None, false);
    let dirty = make(&fs, IMG, None, true);
    let log = log_entries(&dirty)[0];
    let mut out = Vec::new();
    let reseal = |mut b: Vec<u8>| {
        reseal_headers_and_regions(&mut b);
        for e in log_entries(&b) {
            reseal_log_entry(&mut b, e);
        }
        b
    };

    // Log entries whose first descriptor targets header 1, and the log itself.
    for (name, target) in [
        ("log-targets-header.vhdx", HEADERS[0] as u64),
        ("log-targets-log.vhdx", log_region(&dirty).0 as u64),
    ] {
        let mut b = dirty.clone();
        put_u64(&mut b, log + 64 + D_FILE_OFFSET, target);
        out.push((name, reseal(b)));
    }
    // FlushedFileOffset beyond the file.
    let mut b = dirty.clone();
    set_flushed_offset(&mut b, dirty.len() as u64 + 64 * MIB as u64);
    out.push(("flushed-offset-beyond-file.vhdx", b));
    // Sequence numbers at u64::MAX: the log entry, its descriptors and data sectors, and the
    // current header.
    let mut b = dirty.clone();
    put_u64(&mut b, log + L_SEQUENCE, u64::MAX);
    let n = usize_of(u64::from(u32_at(&b, log + L_DESCRIPTORS)));
    for d in 0..n {
        put_u64(&mut b, log + 64 + 32 * d + D_SEQUENCE, u64::MAX);
    }
    let len = usize_of(u64::from(u32_at(&b, log + L_LENGTH)));
    let mut s = log + 4096;
    while s + 4096 <= log + len {
        if u32_at(&b, s) == u32::from_le_bytes(*b"data") {
            put_u32(&mut b, s + 4, u32::MAX);
            put_u32(&mut b, s + 4092, u32::MAX);
        }
        s += 4096;
    }
    let h = current_header(&b);
    put_u64(&mut b, h + H_SEQUENCE, u64::MAX);
    out.push(("sequence-max.vhdx", reseal(b)));

    // BAT entries: beyond the file, in the header area, shared by two blocks.
    let full = |off: u64| off | 6;
    let mut b = clean.clone();
    put_u64(
        &mut b,
        bat_entry(&clean, 0),
        full(clean.len() as u64 + 16 * MIB as u64),
    );
    out.push(("bat-beyond-file.vhdx", b));
    let mut b = clean.clone();
    put_u64(&mut b, bat_entry(&clean, 0), full(0));
    out.push(("bat-in-header-area.vhdx", b));
    let mut b = clean.clone();
    let first = u64_at(&b, bat_entry(&clean, 0));
    put_u64(&mut b, bat_entry(&clean, 1), first);
    out.push(("bat-shared-block.vhdx", b));

    // Metadata: the second item placed over the first.
    let mut b = clean.clone();
    let entries = meta_entries(&b);
    let first_off = u32_at(&b, entries[0].0 + M_OFFSET);
    put_u32(&mut b, entries[1].0 + M_OFFSET, first_off);
    out.push(("metadata-items-overlap.vhdx", b));
    // 2047 metadata entries: user items of one byte each after the system items.
    let mut b = clean.clone();
    let m = metadata_offset(&b);
    let last_end = entries
        .iter()
        .map(|&(_, off, len)| usize_of(off + len))
        .max()
        .expect("items");
    for i in entries.len()..2047 {
        let id = uuid::Uuid::from_u128(0xaaaa_0000_0000_4000_8000_0000_0000_0000 | i as u128);
        let at = last_end + i - m;
        add_meta_entry(&mut b, id, u32::try_from(at).expect("small"), 1, 1);
    }
    out.push(("metadata-2047-entries.vhdx", b));
    // 2047 region entries: optional unknown regions of 1 MiB, each past the end of the file.
    let mut b = clean.clone();
    let base = b.len() as u64;
    for i in 2..2047u64 {
        let id = uuid::Uuid::from_u128(0xbbbb_0000_0000_4000_8000_0000_0000_0000 | u128::from(i));
        add_region(&mut b, id, base + i * MIB as u64, MIB as u32, 0);
    }
    out.push(("region-2047-entries.vhdx", b));
    // Huge lengths: the BAT region and the log 4 GiB - 1 MiB (the largest 1 MiB multiple the
    // field holds), a metadata item u32::MAX.
    let mut b = clean.clone();
    patch_region_tables(&mut b, |t| {
        let e = region_entry(t, REGION_BAT);
        put_u32(t, e + R_LENGTH, HUGE);
    });
    out.push(("huge-bat-length.vhdx", b));
    let mut b = clean.clone();
    put_u32(&mut b, entries[0].0 + M_LENGTH, u32::MAX);
    out.push(("huge-metadata-length.vhdx", b));
    let mut b = clean.clone();
    for slot in 0..2 {
        patch_header(&mut b, slot, |h| put_u32(h, H_LOG_LENGTH, HUGE));
    }
    out.push(("huge-log-length.vhdx", b));

    // A child whose parent is itself: its locator's paths say a.vhdx instead of b.vhdx, and
    // its linkage is its own DataWriteGuid.
    let fs = Arc::new(MemFileSystem::new());
    make(&fs, B, None, false);
    let mut a = make(&fs, IMG, Some(B), false);
    assert!(replace_utf16(&mut a, "b.vhdx", "a.vhdx") > 0, "paths");
    let (own, old) = (data_write_guid(&a), linkage_of(&a));
    assert_eq!(replace_utf16(&mut a, &old, &own), 1, "linkage");
    out.push(("self-parent.vhdx", a));
    // A loop: a's parent is c, c's parent is a (c was made as a's child; a's locator then
    // pointed at c with c's DataWriteGuid).
    let fs = Arc::new(MemFileSystem::new());
    make(&fs, B, None, false);
    let mut a = make(&fs, IMG, Some(B), false);
    let c = make(&fs, C, Some(IMG), false);
    assert!(replace_utf16(&mut a, "b.vhdx", "c.vhdx") > 0, "paths");
    let (cg, old) = (data_write_guid(&c), linkage_of(&a));
    assert_eq!(replace_utf16(&mut a, &old, &cg), 1, "linkage");
    out.push(("loop-a.vhdx", a));
    out.push(("loop-c.vhdx", c));
    out
}

/// Rewrites `tests/data/adversarial/` and prints the `SOURCES.md` rows.
#[test]
#[ignore = "rewrites the committed adversarial images; run by hand"]
fn regenerate_adversarial_images() {
    let dir = corpus::dir().join("adversarial");
    std::fs::create_dir_all(&dir).expect("the adversarial folder");
    for (name, bytes) in adversarial_images() {
        let path = dir.join(format!("{name}.gz"));
        let f = std::fs::File::create(&path).expect("creating the file");
        let mut gz = flate2::GzBuilder::new().write(f, flate2::Compression::best());
        gz.write_all(&bytes).expect("compressing");
        gz.finish().expect("finishing");
        println!(
            "| `adversarial/{name}.gz` | ours: `regenerate_adversarial_images` in `tests/tests/adversarial.rs` | MIT OR Apache-2.0 | vd create, then damaged: see the test | {} |",
            vd_tests::hash::sha256_file(&path)
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Opening read-only
// ---------------------------------------------------------------------------------------------

/// What a read-only session on the image did.
struct Outcome {
    /// Tolerant open of the image alone.
    open: Result<()>,
    /// Strict open of the image alone.
    strict: Result<()>,
    /// A read of the whole disk through the chain (if the chain opened), and what it read.
    read: Option<Result<Vec<u8>>>,
    /// The chain's open.
    disk: Result<()>,
    /// Error findings of the check (repair(true)) of the image alone.
    check_errors: Option<Vec<String>>,
}

/// Loads `names` from the corpus into a [`TrapFs`] at `/a/<name>` (the first one as `a.vhdx`,
/// `loop-c.vhdx` as `c.vhdx`), runs every read-only operation, and asserts nothing was written.
fn run(names: &[&str]) -> Outcome {
    let fs = Arc::new(TrapFs::new(DIR));
    let mut stored = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let bytes = corpus::read(&format!("adversarial/{name}.gz"));
        let path = match (i, *name) {
            (0, _) => IMG,
            (_, "loop-c.vhdx") => C,
            _ => B,
        };
        fs.insert(path, bytes.clone());
        stored.push((path, bytes));
    }
    let reg = Registry::builtin_with_provider(fs.clone());
    let open_one = |flags| -> Result<Option<Vec<String>>> {
        let img = reg.open(Path::new(IMG), flags)?;
        let mut buf = vec![0u8; MIB];
        let mut off = 0;
        while off < img.size().min(SIZE as u64) {
            let _ = img.read_at(off, &mut buf);
            off += MIB as u64;
        }
        let _ = img.map(0, img.size());
        let errors = img.repair(true).map(|r| {
            r.findings
                .iter()
                .filter(|f| f.severity == vd_core::Severity::Error)
                .map(|f| format!("{f:?}"))
                .collect()
        });
        img.close(false)?;
        Ok(errors.ok())
    };
    let open = open_one(OpenFlags::READ_ONLY);
    let check_errors = open.as_ref().ok().cloned().flatten();
    let strict = open_one(OpenFlags::READ_ONLY | OpenFlags::STRICT).map(|_| ());
    let mut read = None;
    let disk = Disk::open(
        &reg,
        Path::new(IMG),
        &DiskOptions {
            flags: OpenFlags::READ_ONLY,
            ..DiskOptions::default()
        },
    )
    .map(|d| {
        let mut buf = vec![0u8; usize_of(d.size().min(SIZE as u64))];
        read = Some(d.read_at(0, &mut buf).map(|()| buf));
        let _ = d.map(0, d.size());
        let _ = d.close();
    });
    assert_eq!(fs.writes(), 0, "{names:?}: write attempts");
    for (path, bytes) in stored {
        assert!(fs.bytes(path) == bytes, "{names:?}: {path} changed");
    }
    Outcome {
        open: open.map(|_| ()),
        strict,
        read,
        disk,
        check_errors,
    }
}

fn corruption<T>(r: &Result<T>) -> Option<&Corruption> {
    r.as_ref().err().and_then(corruption_of)
}

/// Asserts that every open (tolerant, strict, the chain) fails with `Corrupt` and a
/// corruption `want` accepts, naming the image and a field.
fn refused(name: &str, want: impl Fn(&Corruption) -> bool) -> Outcome {
    let o = run(&[name]);
    for (what, r) in [
        ("tolerant", &o.open),
        ("strict", &o.strict),
        ("chain", &o.disk),
    ] {
        let err: &Error = r.as_ref().expect_err(what);
        assert_eq!(err.kind(), ErrorKind::Corrupt, "{name} {what}: {err}");
        assert!(
            corruption(r).is_some_and(&want),
            "{name} {what}: {:?}",
            corruption(r)
        );
        assert_eq!(err.context().path.as_deref(), Some(Path::new(IMG)), "{err}");
        assert!(err.context().field.is_some(), "{name} {what}: {err}");
    }
    o
}

/// The error findings of the check that contain `text`.
fn findings_with(o: &Outcome, text: &str) -> usize {
    o.check_errors
        .as_ref()
        .expect("the tolerant open succeeded and the check ran")
        .iter()
        .filter(|f| f.contains(text))
        .count()
}

/// What every adversarial image was written with: 0xa1 over [0, 1.5 MiB), zeros after.
fn expected_data() -> Vec<u8> {
    let mut d = vec![0u8; SIZE];
    d[..MIB + MIB / 2].fill(0xa1);
    d
}

/// A log entry whose descriptor writes over header 1: the replay is refused with
/// `LogTarget` naming the header area (a read-only open replays in memory, so the refusal also
/// protects writable opens).
#[test]
fn log_entry_targeting_a_header_is_refused() {
    refused(
        "log-targets-header.vhdx",
        |c| matches!(c, Corruption::LogTarget { target: 0x10000, what, .. } if *what == "header area"),
    );
}

/// A log entry whose descriptor writes over the log itself: refused with `LogTarget` naming
/// the log.
#[test]
fn log_entry_targeting_the_log_is_refused() {
    refused(
        "log-targets-log.vhdx",
        |c| matches!(c, Corruption::LogTarget { target: 0x100000, what, .. } if *what == "log"),
    );
}

/// FlushedFileOffset 64 MiB past the end of the file: the file lost data the log says was
/// stable, so the replay is refused with `LogTruncatedFile`.
#[test]
fn flushed_file_offset_beyond_the_file_is_refused() {
    refused(
        "flushed-offset-beyond-file.vhdx",
        |c| matches!(c, Corruption::LogTruncatedFile { flushed, file_len } if flushed > file_len),
    );
}

/// Sequence numbers at u64::MAX (the log entry, its descriptors and data sectors, and the
/// current header): documented safe behaviour. u64::MAX is a valid sequence number, the entry
/// is the whole (one-entry) sequence, so it replays in memory and the disk reads what was
/// written; nothing overflows. The check reports the log as not replayed (read-only).
#[test]
fn sequence_numbers_at_u64_max_replay_without_overflow() {
    let o = run(&["sequence-max.vhdx"]);
    o.open.as_ref().expect("tolerant open");
    o.strict.as_ref().expect("strict open");
    let data = o
        .read
        .as_ref()
        .expect("the chain opened")
        .as_ref()
        .expect("the read");
    assert!(
        *data == expected_data(),
        "the replayed disk reads what was written"
    );
    assert_eq!(findings_with(&o, "had not been replayed"), 1);
}

/// A FULLY_PRESENT block 16 MiB past the end of the file: opens (entries are checked when
/// used); reading it fails with `BatBeyondFile` naming the block, never zeros; the check counts
/// it.
#[test]
fn bat_entry_beyond_the_file_is_a_typed_error_on_read() {
    let o = run(&["bat-beyond-file.vhdx"]);
    o.open.as_ref().expect("tolerant open");
    let read = o.read.as_ref().expect("the chain opened");
    assert!(
        matches!(
            corruption(read),
            Some(Corruption::BatBeyondFile { index: 0, .. })
        ),
        "{:?}",
        corruption(read)
    );
    assert_eq!(findings_with(&o, "BAT entry 0"), 1);
}

/// A FULLY_PRESENT block at offset 0 (the header section): reading it fails with
/// `BatOverlap` naming the header section; the check counts it.
#[test]
fn bat_entry_in_the_header_area_is_a_typed_error_on_read() {
    let o = run(&["bat-in-header-area.vhdx"]);
    o.open.as_ref().expect("tolerant open");
    let read = o.read.as_ref().expect("the chain opened");
    assert!(
        matches!(
            corruption(read),
            Some(Corruption::BatOverlap { index: 0, offset: 0, what }) if *what == "header section"
        ),
        "{:?}",
        corruption(read)
    );
    assert_eq!(findings_with(&o, "BAT entry 0"), 1);
}

/// Blocks 0 and 1 pointing at the same file block: documented safe behaviour. Reads are
/// lazy and per block, so both read the shared data (block 1 reads 0xa1 where it was written
/// half full); the check reports the overlap as an error naming both blocks.
#[test]
fn bat_entries_sharing_a_block_are_reported_by_the_check() {
    let o = run(&["bat-shared-block.vhdx"]);
    let data = o
        .read
        .as_ref()
        .expect("the chain opened")
        .as_ref()
        .expect("the read");
    assert!(data[..MIB].iter().all(|&b| b == 0xa1));
    assert!(
        data[MIB..2 * MIB].iter().all(|&b| b == 0xa1),
        "block 1 reads block 0's data"
    );
    assert_eq!(
        findings_with(&o, "payload block 0 at 0x400000 overlaps payload block 1"),
        1
    );
}

/// Two metadata items at the same offset: refused with `MetadataOverlap` naming both.
#[test]
fn overlapping_metadata_items_are_refused() {
    refused("metadata-items-overlap.vhdx", |c| {
        matches!(c, Corruption::MetadataOverlap { .. })
    });
}

/// A full metadata table (2047 entries, the limit): accepted; the unknown user items are
/// kept, the disk reads what was written and the check finds nothing.
#[test]
fn a_full_metadata_table_is_accepted() {
    let o = run(&["metadata-2047-entries.vhdx"]);
    o.strict.as_ref().expect("strict open");
    let data = o
        .read
        .as_ref()
        .expect("the chain opened")
        .as_ref()
        .expect("the read");
    assert!(*data == expected_data());
    assert_eq!(o.check_errors.as_deref(), Some(&[][..]));
}

/// A full region table (2047 entries, the limit), 2045 of them optional unknown regions past
/// the end of the file: the tolerant open accepts it (optional regions are ignored, a truncated
/// file is tolerated read-only) and reads the disk; the strict open refuses it with
/// `Truncated` naming the first such region; the check reports each one.
#[test]
fn a_full_region_table_of_regions_past_the_file() {
    let o = run(&["region-2047-entries.vhdx"]);
    let data = o
        .read
        .as_ref()
        .expect("the chain opened")
        .as_ref()
        .expect("the read");
    assert!(*data == expected_data());
    assert!(
        matches!(corruption(&o.strict), Some(Corruption::Truncated { what, .. }) if what.starts_with("region bbbb0000")),
        "{:?}",
        corruption(&o.strict)
    );
    assert_eq!(
        findings_with(&o, "extends beyond the end of the file"),
        2045
    );
}

/// A BAT region of 4 GiB - 1 MiB in a 6 MiB file: nothing is allocated for it (the BAT is
/// read page by page). The strict open refuses it with `Truncated` naming the BAT region; the
/// tolerant open accepts the truncated file read-only, and block 0 (inside the claimed
/// region) reads as `BatOverlap`, never as data.
#[test]
fn a_huge_bat_region_is_refused_or_confined() {
    let o = run(&["huge-bat-length.vhdx"]);
    assert!(
        matches!(corruption(&o.strict), Some(Corruption::Truncated { what, .. }) if what == "BAT region"),
        "{:?}",
        corruption(&o.strict)
    );
    let read = o.read.as_ref().expect("the chain opened");
    assert!(
        matches!(corruption(read), Some(Corruption::BatOverlap { index: 0, what, .. }) if *what == "BAT region"),
        "{:?}",
        corruption(read)
    );
}

/// A metadata item of u32::MAX bytes: refused with `MetadataItemRange` (over the 1 MiB cap)
/// before anything is allocated for it.
#[test]
fn a_huge_metadata_item_is_refused() {
    refused(
        "huge-metadata-length.vhdx",
        |c| matches!(c, Corruption::MetadataItemRange { length: u32::MAX, reason, .. } if *reason == "longer than 1 MiB"),
    );
}

/// A log of 4 GiB - 1 MiB in both headers: refused (`NoValidHeader`, both headers invalid:
/// longer than the 1 GiB cap).
#[test]
fn a_huge_log_is_refused() {
    refused(
        "huge-log-length.vhdx",
        |c| matches!(c, Corruption::NoValidHeader { first, second } if first.contains("longer than 1 GiB") && second.contains("longer than 1 GiB")),
    );
}

/// A child whose locator names itself (paths and linkage): the image alone opens, the chain
/// is refused with `BadChain` ("is its own ancestor").
#[test]
fn a_child_that_is_its_own_parent_is_refused() {
    let o = run(&["self-parent.vhdx"]);
    o.open.as_ref().expect("the image alone opens");
    let err = o.disk.as_ref().expect_err("the chain");
    assert_eq!(err.kind(), ErrorKind::BadChain, "{err}");
    assert!(err.message().contains("is its own ancestor"), "{err}");
}

/// a.vhdx names c.vhdx as its parent and c.vhdx names a.vhdx (linkages matching): the chain
/// is refused with `BadChain` when the loop closes, after opening each file once.
#[test]
fn a_parent_loop_is_refused() {
    let o = run(&["loop-a.vhdx", "loop-c.vhdx"]);
    o.open.as_ref().expect("the image alone opens");
    let err = o.disk.as_ref().expect_err("the chain");
    assert_eq!(err.kind(), ErrorKind::BadChain, "{err}");
    assert!(
        err.message().contains("/a/a.vhdx is its own ancestor"),
        "{err}"
    );
}
