//! Truncated VHDX images (the data-safety issue): a file that ends before a structure or an
//! allocated block is found, a read of missing data fails with a typed error naming the block
//! and its offsets (never zeros), `check` counts each missing block as an error, and no
//! modification (including log replay) writes a byte to such an image.
//!
//! Images come from `qemu-img`/`qemu-io` (QEMU is required, not optional) and from our own
//! writer, each clean and with a dirty log:
//! - qemu's dirty log is made as `qemu-io` makes one when its in-place BAT write fails: through
//!   the `blkdebug` driver failing that write once (the log entry is already flushed);
//! - ours is an image whose writer flushed (log entry written, LogGuid set) and then vanished
//!   without closing, as a killed process does.
//!
//! Each is cut inside the log, the BAT, the metadata region and the payload blocks.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use backend_raw as _;
use backend_vhdx as _;
use backend_vhdx::{BlockRef, Corruption, corruption_of};
use uuid::Uuid;
use vd_core::{
    CreateParams, Error, ErrorKind, Image, MemFileSystem, MemStorage, OpenFlags, Registry,
    Severity, StorageProvider,
};
use vd_tests::qemu::{self, DirtyLog, dirty_vhdx};
use vd_tests::s;
use vd_tests::vhdx::{
    CUTS, Cut, KIB, MIB, REGION_BAT, REGION_METADATA, cut_at, log_is_dirty, log_region, region,
    set_flushed_offset, u64_at, usize_of,
};

const IMG: &str = "/img.vhdx";
/// Every image is 64 MiB with 1 MiB blocks, 0xab over its first `DATA` bytes (blocks 0-7).
const DATA: usize = 8 * MIB;
const PATTERN: u8 = 0xab;

// ---------------------------------------------------------------------------------------------
// Images
// ---------------------------------------------------------------------------------------------

/// qemu-img's 64 MiB dynamic image with 1 MiB blocks; `dirty` leaves qemu's write of the
/// pattern with its log entry unreplayed (blkdebug fails the in-place BAT write once).
fn qemu_image(dirty: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("img.vhdx");
    let opts = "subformat=dynamic,block_size=1M";
    if dirty {
        // The write fails (EIO on the BAT) after its log entry is flushed: only block 0's BAT
        // update is in the log.
        let log = DirtyLog {
            size: 64 * MIB as u64,
            opts: Some(opts),
            pattern: PATTERN,
            len: DATA as u64,
            replayed: MIB as u64,
        };
        dirty_vhdx(&path, &log);
    } else {
        qemu::create(&path, Some(opts), "64M");
        let write = format!("write -q -P {PATTERN} 0 {DATA}");
        qemu::io(&["-f", "vhdx", "-c", &write, s(&path)]);
    }
    let b = std::fs::read(&path).expect("reading the qemu image");
    assert_eq!(log_is_dirty(&b), dirty, "qemu image dirty={dirty}");
    b
}

/// Our own 64 MiB image with 1 MiB blocks and the pattern; `dirty`: the writer flushed (the log
/// entry and the LogGuid are in the file) and never closed.
fn vd_image(dirty: bool) -> Vec<u8> {
    let fs = Arc::new(MemFileSystem::new());
    let reg = registry(&fs);
    let params = CreateParams {
        size: 64 * MIB as u64,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    };
    let img = reg
        .create("vhdx", Path::new(IMG), &params, None, false)
        .expect("creating");
    drop(img);
    let img = reg
        .open(Path::new(IMG), OpenFlags::empty())
        .expect("opening");
    img.write_at(0, &vec![PATTERN; DATA]).expect("writing");
    img.flush().expect("flushing");
    if dirty {
        drop(img);
    } else {
        img.close(false).expect("closing");
    }
    let b = file_bytes(&fs);
    assert_eq!(log_is_dirty(&b), dirty, "our image dirty={dirty}");
    b
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Maker {
    Qemu,
    Vd,
}

fn image(maker: Maker, dirty: bool) -> Vec<u8> {
    static IMAGES: [OnceLock<Vec<u8>>; 4] = [const { OnceLock::new() }; 4];
    let i = usize::from(maker == Maker::Vd) * 2 + usize::from(dirty);
    IMAGES[i]
        .get_or_init(|| match maker {
            Maker::Qemu => qemu_image(dirty),
            Maker::Vd => vd_image(dirty),
        })
        .clone()
}

fn truncated(maker: Maker, dirty: bool, cut: Cut) -> Vec<u8> {
    let mut b = image(maker, dirty);
    let at = cut_at(&b, cut);
    let (bat, _) = region(&b, REGION_BAT);
    let (meta, _) = region(&b, REGION_METADATA);
    if matches!(cut, Cut::Payload | Cut::LastBlock) {
        assert!(
            at > bat.max(meta) + MIB,
            "{maker:?}: the payload cut is past every structure"
        );
    }
    b.truncate(at);
    b
}

// ---------------------------------------------------------------------------------------------
// Opening and asserting
// ---------------------------------------------------------------------------------------------

fn registry(fs: &Arc<MemFileSystem>) -> Registry {
    let provider: Arc<dyn StorageProvider> = fs.clone();
    Registry::builtin_with_provider(provider)
}

fn mem_fs(bytes: Vec<u8>) -> Arc<MemFileSystem> {
    let fs = Arc::new(MemFileSystem::new());
    fs.insert(IMG, Arc::new(MemStorage::from_bytes(bytes)));
    fs
}

fn open_in(fs: &Arc<MemFileSystem>, flags: OpenFlags) -> vd_core::Result<Box<dyn Image>> {
    registry(fs).open(Path::new(IMG), flags)
}

fn file_bytes(fs: &MemFileSystem) -> Vec<u8> {
    let s = fs.get(Path::new(IMG)).expect("the file exists");
    let mut v = vec![0u8; usize_of(s.len().expect("length"))];
    s.read_exact_at(0, &mut v).expect("reading the file");
    v
}

/// A typed corrupt-image error naming the image, with the rule behind it.
#[track_caller]
fn typed(err: &Error) -> Corruption {
    assert_eq!(err.kind(), ErrorKind::Corrupt, "{err}");
    let s = err.to_string();
    assert!(s.contains(IMG), "{s:?} does not name the image");
    assert!(s.contains("offset 0x"), "{s:?} does not name an offset");
    corruption_of(err)
        .unwrap_or_else(|| panic!("no Corruption behind {err} ({err:?})"))
        .clone()
}

/// The rule says the file ends too early (a missing block, a structure past the end, or the
/// log's stable size).
#[track_caller]
fn assert_truncation(c: &Corruption) {
    assert!(
        matches!(
            c,
            Corruption::BatBeyondFile { .. }
                | Corruption::Truncated { .. }
                | Corruption::LogTruncatedFile { .. }
                | Corruption::LogBeyondFile { .. }
                | Corruption::RegionRange { .. }
                | Corruption::NoValidHeader { .. }
        ),
        "{c:?} is not a truncation"
    );
    if let Corruption::RegionRange { reason, .. } = c {
        assert!(reason.contains("end of the file"), "{c}");
    }
    if let Corruption::NoValidHeader { first, second } = c {
        assert!(
            first.contains("end of the file") && second.contains("end of the file"),
            "{c}"
        );
    }
}

/// Reads `[0, DATA)` in 1 MiB pieces; the data that is there is the pattern, and the first
/// piece that cannot be read fails with a typed truncation error. Returns that error's rule.
#[track_caller]
fn read_data_fails(img: &dyn Image) -> Corruption {
    let mut buf = vec![0u8; MIB];
    for off in (0..DATA).step_by(MIB) {
        match img.read_at(off as u64, &mut buf) {
            Ok(()) => assert!(
                buf.iter().all(|&x| x == PATTERN),
                "block at {off:#x} read, but not as written (zeros for missing data?)"
            ),
            Err(e) => {
                let c = typed(&e);
                assert_truncation(&c);
                return c;
            }
        }
    }
    panic!("every block of a truncated image read back");
}

/// A read-write session must refuse every change before writing a byte.
#[track_caller]
fn modifications_refused(bytes: &[u8], what: &str) {
    let fs = mem_fs(bytes.to_vec());
    match open_in(&fs, OpenFlags::empty()) {
        Err(e) => assert_truncation(&typed(&e)),
        Ok(img) => {
            let mut errs: Vec<(&str, vd_core::Result<()>)> = vec![
                ("write", img.write_at(0, &[1u8; 512])),
                ("discard", img.discard(0, MIB as u64)),
                ("resize", img.resize(128 * MIB as u64, &mut |_, _| {})),
                ("compact", img.compact(&mut |_, _| {})),
                ("comment", img.set_comment(Some("x"))),
                ("setuuid", img.set_uuid(Uuid::new_v4())),
                (
                    "modification uuid",
                    img.set_modification_uuid(Uuid::new_v4()),
                ),
                (
                    "geometry",
                    img.set_pchs_geometry(vd_core::Geometry {
                        cylinders: 10,
                        heads: 16,
                        sectors: 63,
                    }),
                ),
            ];
            for (op, r) in errs.drain(..) {
                let e = r.expect_err(op);
                assert_truncation(&typed(&e));
            }
            img.close(false).expect("closing after nothing was changed");
        }
    }
    assert!(
        file_bytes(&fs) == bytes,
        "{what}: a refused change modified the file"
    );
}

/// `check` (read-only) finds at least `min_errors` errors naming the truncation.
#[track_caller]
fn check_reports(img: &dyn Image, min_errors: usize) {
    let report = img.repair(true).expect("check runs");
    let errors: Vec<&str> = report
        .findings
        .iter()
        .filter(|f| f.severity == Severity::Error)
        .map(|f| f.message.as_str())
        .collect();
    assert!(
        errors.len() >= min_errors,
        "{} errors, expected at least {min_errors}: {:?}",
        errors.len(),
        report.findings
    );
    assert!(
        errors
            .iter()
            .any(|m| m.contains("end of the file") || m.contains("ends at")),
        "{errors:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// The cut-point matrix
// ---------------------------------------------------------------------------------------------

/// One image kind at every cut point. A dirty image is cut twice: as it is (its log entry says
/// the whole file was stable, so the log itself shows the cut) and with the entry's
/// FlushedFileOffset lowered to the cut (the entry was written while the file was that long),
/// which only the structures and blocks themselves can show.
fn matrix(maker: Maker, dirty: bool) {
    let variants: &[bool] = if dirty { &[false, true] } else { &[false] };
    for (cut, &small_flushed) in CUTS
        .iter()
        .flat_map(|&c| variants.iter().map(move |v| (c, v)))
    {
        let what = format!("{maker:?} dirty={dirty} flushed<=cut={small_flushed} cut {cut:?}");
        let b = if small_flushed {
            let mut b = image(maker, dirty);
            let at = cut_at(&b, cut);
            set_flushed_offset(&mut b, at as u64);
            b.truncate(at);
            b
        } else {
            truncated(maker, dirty, cut)
        };
        // Tolerant read-only: refused at open, or opens and never reads zeros for the cut part.
        match open_in(&mem_fs(b.clone()), OpenFlags::READ_ONLY) {
            Err(e) => assert_truncation(&typed(&e)),
            Ok(img) => {
                read_data_fails(img.as_ref());
                check_reports(img.as_ref(), 1);
            }
        }
        // Strict: structures past the end are refused at open; blocks are found at read time.
        match open_in(&mem_fs(b.clone()), OpenFlags::READ_ONLY | OpenFlags::STRICT) {
            Err(e) => assert_truncation(&typed(&e)),
            Ok(img) => {
                assert!(
                    matches!(cut, Cut::Payload | Cut::LastBlock),
                    "{what}: strict open accepted a structure past the end"
                );
                read_data_fails(img.as_ref());
            }
        }
        modifications_refused(&b, &what);
    }
}

#[test]
fn qemu_clean_image_cut_anywhere() {
    matrix(Maker::Qemu, false);
}

#[test]
fn qemu_dirty_log_image_cut_anywhere() {
    matrix(Maker::Qemu, true);
}

#[test]
fn vd_clean_image_cut_anywhere() {
    matrix(Maker::Vd, false);
}

#[test]
fn vd_dirty_log_image_cut_anywhere() {
    matrix(Maker::Vd, true);
}

// ---------------------------------------------------------------------------------------------
// Exact errors
// ---------------------------------------------------------------------------------------------

/// A clean image whose last 2.5 blocks are cut: the first blocks read, block 5 (half there)
/// fails naming the block and its file range, `check` counts blocks 5, 6 and 7.
#[test]
fn missing_blocks_are_named_and_counted() {
    for maker in [Maker::Qemu, Maker::Vd] {
        let full = image(maker, false);
        let b = truncated(maker, false, Cut::Payload);
        let file_len = b.len() as u64;
        let (bat, _) = region(&full, REGION_BAT);
        let fs = mem_fs(b);
        let img = open_in(&fs, OpenFlags::READ_ONLY).expect("opens: the BAT is lazy");
        assert!(img.warnings().is_empty(), "{:?}", img.warnings());
        let mut buf = vec![0u8; MIB];
        img.read_at(0, &mut buf).expect("block 0 is there");
        assert!(buf.iter().all(|&x| x == PATTERN));
        let e = img
            .read_at(5 * MIB as u64, &mut buf)
            .expect_err("block 5 is cut");
        let offset = u64_at(&full, bat + 8 * 5) & !0xF_FFFF;
        assert_eq!(
            typed(&e),
            Corruption::BatBeyondFile {
                index: 5,
                block: BlockRef::Payload {
                    block: 5,
                    disk_offset: 5 * MIB as u64
                },
                offset,
                end: offset + MIB as u64,
                file_len,
            },
            "{maker:?}"
        );
        assert_eq!(e.context().offset, Some((bat + 8 * 5) as u64));
        let msg = vd_core::error_chain(&e);
        assert!(
            msg.contains("payload block 5") && msg.contains(&format!("{file_len:#x}")),
            "{msg}"
        );
        // A read crossing from good data into the cut block fails as a whole.
        let mut two = vec![0u8; 2 * MIB];
        img.read_at(4 * MIB as u64, &mut two)
            .expect_err("a read touching block 5");
        let report = img.repair(true).expect("check runs");
        let missing = report
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error && f.message.contains("payload block"))
            .count();
        assert_eq!(missing, 3, "{maker:?}: {:?}", report.findings);
    }
}

/// Our image puts the metadata before the BAT: cut inside the BAT region (past the entries in
/// use), a tolerant read-only open warns, a strict or read-write one refuses.
#[test]
fn bat_region_past_the_end_is_a_warning_or_an_error() {
    let full = image(Maker::Vd, false);
    let (bat, bat_len) = region(&full, REGION_BAT);
    let (meta, _) = region(&full, REGION_METADATA);
    assert!(meta < bat, "vd writes the metadata region first");
    let mut b = full.clone();
    b.truncate(bat + 4 * KIB);
    let file_len = b.len() as u64;
    let expected = Corruption::Truncated {
        what: "BAT region".into(),
        offset: bat as u64,
        end: (bat + bat_len) as u64,
        file_len,
    };
    let img = open_in(&mem_fs(b.clone()), OpenFlags::READ_ONLY).expect("tolerant open");
    assert!(
        img.warnings()
            .iter()
            .any(|w| w.message.contains("BAT region") && w.message.contains("truncated")),
        "{:?}",
        img.warnings()
    );
    // Blocks 0-7 were allocated past the cut.
    assert!(matches!(
        read_data_fails(img.as_ref()),
        Corruption::BatBeyondFile { .. }
    ));
    check_reports(img.as_ref(), 9);
    drop(img);
    for flags in [OpenFlags::READ_ONLY | OpenFlags::STRICT, OpenFlags::empty()] {
        let fs = mem_fs(b.clone());
        let e = open_in(&fs, flags).expect_err("refused");
        assert_eq!(typed(&e), expected, "{flags:?}");
        assert!(file_bytes(&fs) == b);
    }
}

/// BAT entries past the end of the file are unknown, never NOT_PRESENT (zeros).
#[test]
fn bat_entries_past_the_end_are_not_zeros() {
    // Our BAT for 64 MiB with 1 MiB blocks has 64 entries; cut after entry 3.
    let full = image(Maker::Vd, false);
    let (bat, _) = region(&full, REGION_BAT);
    let mut b = full;
    b.truncate(bat + 4 * 8);
    let img = open_in(&mem_fs(b.clone()), OpenFlags::READ_ONLY).expect("tolerant open");
    let mut buf = vec![0u8; MIB];
    // Blocks 0-3 have entries but their data is gone; block 40's entry is gone.
    let e = img
        .read_at(40 * MIB as u64, &mut buf)
        .expect_err("block 40's entry is past the end");
    assert_eq!(
        typed(&e),
        Corruption::Truncated {
            what: "BAT entry 40".into(),
            offset: (bat + 8 * 40) as u64,
            end: (bat + 8 * 41) as u64,
            file_len: b.len() as u64,
        }
    );
}

/// Our dirty image whose log entry says only `flushed` bytes were stable, and a file cut after
/// that: the log replays (in memory) over a file whose blocks are partly gone. Before the fix a
/// read-only open read zeros there and a read-write open grew the file back to LastFileOffset.
fn dirty_with_small_flushed_offset() -> (Vec<u8>, usize) {
    let mut b = image(Maker::Vd, true);
    let (log, _) = log_region(&b);
    let cut = b.len() - 5 * MIB / 2;
    set_flushed_offset(&mut b, (4 * MIB) as u64);
    let last = usize_of(u64_at(&b, log + 56));
    assert_eq!(last, b.len(), "LastFileOffset is the full length");
    b.truncate(cut);
    (b, last)
}

#[test]
fn dirty_log_over_missing_blocks_never_reads_zeros() {
    let (b, last) = dirty_with_small_flushed_offset();
    let fs = mem_fs(b.clone());
    let img = open_in(&fs, OpenFlags::READ_ONLY).expect("tolerant open replays in memory");
    assert!(
        img.warnings()
            .iter()
            .any(|w| w.message.contains("LastFileOffset")),
        "{:?}",
        img.warnings()
    );
    assert!(matches!(
        read_data_fails(img.as_ref()),
        Corruption::BatBeyondFile {
            block: BlockRef::Payload { block: 5, .. },
            ..
        }
    ));
    check_reports(img.as_ref(), 3);
    drop(img);
    assert!(file_bytes(&fs) == b, "a read-only open changed the file");
    // Strict: the log asks for a longer file.
    let e = open_in(&fs, OpenFlags::READ_ONLY | OpenFlags::STRICT).expect_err("strict");
    match typed(&e) {
        Corruption::LogBeyondFile { end, file_len, .. } => {
            assert_eq!((end, file_len), (last as u64, b.len() as u64));
        }
        other => panic!("expected LogBeyondFile, got {other:?}"),
    }
    // Read-write: the whole BAT is checked before the replay writes (or grows) anything.
    let e = open_in(&fs, OpenFlags::empty()).expect_err("read-write open refused");
    assert!(matches!(typed(&e), Corruption::BatBeyondFile { .. }));
    let after = file_bytes(&fs);
    assert_eq!(after.len(), b.len(), "the file grew");
    assert!(after == b, "a refused replay changed the file");
}

/// Compacting shrinks the file. A crash after that and before `close` (here: the image is
/// dropped unclosed) must leave an image that opens, not a log whose FlushedFileOffset says
/// the file was longer (which is a truncated file).
#[test]
fn a_crash_after_compact_shrank_the_file_leaves_an_image_that_opens() {
    let fs = mem_fs(image(Maker::Vd, false));
    let img = open_in(&fs, OpenFlags::empty()).expect("opens");
    img.discard(0, 4 * MIB as u64).expect("discards blocks 0-3");
    img.compact(&mut |_, _| {}).expect("compacts");
    let len = img.file_size().expect("size");
    assert!(
        len < image(Maker::Vd, false).len() as u64,
        "compact shrank the file"
    );
    drop(img);
    let img = open_in(&fs, OpenFlags::READ_ONLY).expect("reopens after the crash");
    let mut buf = vec![0u8; MIB];
    img.read_at(0, &mut buf).expect("block 0");
    assert!(buf.iter().all(|&x| x == 0), "discarded");
    img.read_at(7 * MIB as u64, &mut buf).expect("block 7");
    assert!(
        buf.iter().all(|&x| x == PATTERN),
        "moved block 7 keeps its data"
    );
}
