//! Power loss as QEMU sees it: images that a crash leaves must not hang QEMU 10, and a crash
//! state that QEMU itself leaves must open in vd as it opens in QEMU.
//!
//! - A log filled and started anew within one session, power lost before close (every write
//!   kept, as [`LossMode::KeepAll`]): `qemu-img info` and `qemu-img check` finish (under
//!   `timeout`), and vd and qemu-io read the same data.
//! - A LogGuid that no log entry carries (QEMU sets it before it writes the first entry; a crash
//!   in between): QEMU reads the image as having an empty log, and so does vd, with a warning;
//!   a strict open refuses; a read-write open clears the LogGuid.

use std::path::Path;
use std::process::Output;
use std::sync::Arc;

use backend_vhdx::{Corruption, corruption_of};
use vd_core::testing::{FaultyStorage, LossMode};
use vd_core::{
    CreateParams, Image, MemFileSystem, MemStorage, OpenFlags, Registry, Severity, Storage,
};
use vd_tests::peers::{Peer, require};
use vd_tests::process::{output, show, stderr};
use vd_tests::vhdx::{H_LOG_GUID, current_header, log_is_dirty, log_region, patch_header};
use vd_tests::{qemu, s};

const IMG: &str = "/powerloss/image.vhdx";
const SIZE: u64 = 8 << 20;
const DATA: u8 = 0x5a;

/// A new dynamic image of `SIZE` with 1 MiB blocks on `storage`, its first MiB written with
/// `DATA`.
fn new_image(storage: Arc<dyn Storage>) -> Box<dyn Image> {
    let fs = Arc::new(MemFileSystem::new());
    fs.insert(IMG, storage);
    let reg = Registry::builtin_with_provider(fs);
    let params = CreateParams {
        size: SIZE,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    };
    let img = reg
        .create("vhdx", Path::new(IMG), &params, None, true)
        .unwrap();
    img.write_at(0, &vec![DATA; 1 << 20]).unwrap();
    img
}

/// Runs `program args` under `timeout 20` and fails the test if it did not finish.
#[track_caller]
fn finishes(program: &str, args: &[&str]) -> Output {
    let mut all = vec!["20", program];
    all.extend_from_slice(args);
    let o = output("timeout", &all);
    assert_ne!(
        o.status.code(),
        Some(124),
        "{program} {args:?} did not finish in 20 s: {}",
        show(&o)
    );
    assert!(
        o.status.code().is_some(),
        "{program} was killed: {}",
        show(&o)
    );
    o
}

/// Opens `bytes` as a VHDX with `flags`.
fn open(bytes: Vec<u8>, flags: OpenFlags) -> (Arc<MemStorage>, vd_core::Result<Box<dyn Image>>) {
    let fs = Arc::new(MemFileSystem::new());
    let storage = Arc::new(MemStorage::from_bytes(bytes));
    fs.insert(IMG, storage.clone());
    let img = Registry::builtin_with_provider(fs).open_as("vhdx", Path::new(IMG), flags);
    (storage, img)
}

/// What vd reads from the whole disk of `bytes` (read-only: a log is replayed in memory).
fn vd_read(bytes: &[u8]) -> Vec<u8> {
    let (_, img) = open(bytes.to_vec(), OpenFlags::READ_ONLY);
    let img = img.expect("vd opens the image");
    let mut buf = vec![0u8; usize::try_from(img.size()).expect("small disk")];
    img.read_at(0, &mut buf).expect("vd reads the disk");
    buf
}

/// `DATA` over the first MiB, zeros after it: what every image here holds.
fn assert_expected(buf: &[u8], who: &str) {
    assert!(
        buf[..1 << 20].iter().all(|&b| b == DATA),
        "{who}: first MiB"
    );
    assert!(buf[1 << 20..].iter().all(|&b| b == 0), "{who}: the rest");
}

/// The current header's LogGuid.
fn log_guid(b: &[u8]) -> [u8; 16] {
    let h = current_header(b);
    b[h + H_LOG_GUID..h + H_LOG_GUID + 16]
        .try_into()
        .expect("16 bytes")
}

#[test]
fn a_log_filled_in_one_session_and_cut_before_close_does_not_hang_qemu() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("crash.vhdx");
    // Comments of these lengths make log entries of different sizes, so the log's end is met
    // at different places.
    for len in [1usize, 2100, 4500] {
        let faulty = Arc::new(FaultyStorage::new());
        let img = new_image(faulty.clone());
        img.flush().unwrap();
        let mut logs = std::collections::BTreeSet::new();
        let mut commits = 0;
        // Until three different logs were started (the first one filled up twice).
        while logs.len() < 3 {
            commits += 1;
            assert!(commits < 1000, "len {len}: the log never filled up");
            let c: String =
                std::iter::repeat_n(char::from(b'a' + (commits % 26) as u8), len).collect();
            img.set_comment(Some(&c)).unwrap();
            // The power is lost now, with every write kept: the LogGuid of this session is
            // set and the log holds what was written so far.
            let bytes = faulty.after_power_loss(LossMode::KeepAll);
            assert!(
                log_is_dirty(&bytes),
                "len {len} commit {commits}: the log is in use"
            );
            logs.insert(log_guid(&bytes));
            std::fs::write(&file, &bytes).unwrap();
            let o = finishes("qemu-img", &["info", "-f", "vhdx", s(&file)]);
            assert!(
                o.status.success() || stderr(&o).contains("needs to be replayed"),
                "len {len} commit {commits}: {}",
                show(&o)
            );
        }
        faulty.cut_power_now();
        drop(img);
        let bytes = faulty.after_power_loss(LossMode::KeepAll);
        assert_expected(&vd_read(&bytes), "vd, log replayed in memory");
        std::fs::write(&file, &bytes).unwrap();
        finishes("qemu-img", &["check", "-f", "vhdx", s(&file)]);
        // QEMU replays the log only read-write: check -r all, then check and read.
        let o = finishes("qemu-img", &["check", "-r", "all", "-f", "vhdx", s(&file)]);
        assert!(o.status.success(), "len {len}: {}", show(&o));
        let o = finishes("qemu-img", &["check", "-f", "vhdx", s(&file)]);
        assert!(o.status.success(), "len {len}: {}", show(&o));
        qemu::assert_reads(&file, &[(DATA, 0, 1 << 20), (0, 1 << 20, SIZE - (1 << 20))]);
        assert_expected(
            &vd_read(&std::fs::read(&file).unwrap()),
            "vd after QEMU's replay",
        );
    }
}

/// A LogGuid set in both headers (checksums re-sealed) of `b`, as QEMU leaves it when power is
/// lost between setting it and writing the first log entry.
fn set_log_guid(b: &mut [u8]) {
    let guid = uuid::Uuid::new_v4().to_bytes_le();
    for slot in 0..2 {
        patch_header(b, slot, |h| {
            h[H_LOG_GUID..H_LOG_GUID + 16].copy_from_slice(&guid);
        });
    }
}

/// vd and QEMU agree on an image whose LogGuid no entry carries: both read it as clean.
fn assert_log_guid_without_entries_is_an_empty_log(b: &[u8], what: &str) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("guid.vhdx");
    std::fs::write(&file, b).unwrap();
    // QEMU: opens read-only (nothing to replay), check finds nothing, reads the data.
    let o = finishes("qemu-img", &["check", "-f", "vhdx", s(&file)]);
    assert!(o.status.success(), "{what}: qemu-img check: {}", show(&o));
    qemu::assert_reads(&file, &[(DATA, 0, 1 << 20), (0, 1 << 20, SIZE - (1 << 20))]);

    // vd, read-only: opens with a warning naming the LogGuid, reads the same.
    let (_, img) = open(b.to_vec(), OpenFlags::READ_ONLY);
    let img = img.unwrap_or_else(|e| panic!("{what}: vd refuses: {e}"));
    let w = img.warnings();
    assert!(
        w.iter().any(|w| w.kind == vd_core::ErrorKind::Corrupt
            && w.field.as_deref() == Some("header log guid")
            && w.message.contains("nothing to replay")),
        "{what}: {w:?}"
    );
    let report = img.repair(true).unwrap();
    assert!(
        report
            .findings
            .iter()
            .all(|f| f.severity != Severity::Error),
        "{what}: {:?}",
        report.findings
    );
    assert!(
        report
            .findings
            .iter()
            .any(|f| f.message.contains("nothing to replay")),
        "{what}: check reports it: {:?}",
        report.findings
    );
    assert_expected(&vd_read(b), what);

    // Strict: the letter of the spec (a LogGuid asks for a replay) refuses.
    let (_, strict) = open(b.to_vec(), OpenFlags::READ_ONLY | OpenFlags::STRICT);
    let err = strict
        .err()
        .unwrap_or_else(|| panic!("{what}: strict opened"));
    assert_eq!(
        corruption_of(&err),
        Some(&Corruption::NoActiveLogSequence),
        "{what}: {err}"
    );

    // Read-write: the LogGuid is cleared, the file opens cleanly afterwards, in QEMU too.
    let (storage, rw) = open(b.to_vec(), OpenFlags::empty());
    rw.unwrap_or_else(|e| panic!("{what}: rw: {e}"))
        .close(false)
        .unwrap();
    let after = storage.to_vec();
    assert!(!log_is_dirty(&after), "{what}: the LogGuid is cleared");
    let (_, again) = open(after.clone(), OpenFlags::READ_ONLY | OpenFlags::STRICT);
    let again = again.unwrap_or_else(|e| panic!("{what}: reopen: {e}"));
    assert!(
        again.warnings().is_empty(),
        "{what}: {:?}",
        again.warnings()
    );
    std::fs::write(&file, &after).unwrap();
    let o = finishes("qemu-img", &["check", "-f", "vhdx", s(&file)]);
    assert!(o.status.success(), "{what}: after vd: {}", show(&o));
    qemu::assert_reads(&file, &[(DATA, 0, 1 << 20), (0, 1 << 20, SIZE - (1 << 20))]);
}

#[test]
fn a_log_guid_that_no_entry_carries_is_an_empty_log_in_qemu_and_vd() {
    require(&[Peer::QemuImg, Peer::QemuIo]);
    // A QEMU image.
    let dir = tempfile::tempdir().expect("temporary directory");
    let file = dir.path().join("qemu.vhdx");
    qemu::create(&file, Some("block_size=1M"), &SIZE.to_string());
    qemu::io(&[
        "-f",
        "vhdx",
        "-c",
        &format!("write -P {DATA:#x} 0 1M"),
        s(&file),
    ]);
    let mut b = std::fs::read(&file).unwrap();
    set_log_guid(&mut b);
    assert_log_guid_without_entries_is_an_empty_log(&b, "qemu image");

    // Our own image, whose log still holds an entry of an earlier LogGuid, and then a torn
    // entry of the current one (its checksum fails): neither is a sequence to replay.
    let storage = Arc::new(MemStorage::new());
    let img = new_image(storage.clone());
    img.close(false).unwrap();
    let mut b = storage.to_vec();
    let (log, _) = log_region(&b);
    assert_eq!(
        &b[log..log + 4],
        b"loge",
        "the session left its entry in the log"
    );
    set_log_guid(&mut b);
    assert_log_guid_without_entries_is_an_empty_log(&b, "vd image, old entry");
    // An entry of the current LogGuid whose checksum fails (torn).
    let guid = log_guid(&b);
    b[log + 32..log + 48].copy_from_slice(&guid);
    assert_log_guid_without_entries_is_an_empty_log(&b, "vd image, torn entry");
}
