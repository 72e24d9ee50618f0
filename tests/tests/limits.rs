//! Resource limits (issue 9): an image at each of backend-vhdx's limits opens, and one just over
//! it gets a typed error naming the field, before anything is allocated for it. The limits are
//! `backend_vhdx::limits`; the ones not here are tested beside their parsers (region and
//! metadata entry counts in `region.rs` and `metadata.rs` and the full tables in
//! `adversarial.rs`, the metadata item and locator caps in `metadata.rs` and `locator.rs`, the
//! page caches in `bat.rs`, LastFileOffset in `log.rs`, the chain depth in `framework.rs`).
//!
//! Images that must be large (a 1 GiB log, a 64 TiB disk) are sparse files in a temporary
//! directory; the rest live in memory.

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use backend_raw as _;
use backend_vhdx::limits::{
    MAX_BAT_SIZE, MAX_COMMENT, MAX_LOG_SIZE, MAX_REPLAY_SECTORS, MAX_VIRTUAL_SIZE,
};
use backend_vhdx::{Corruption, corruption_of};
use vd_core::{
    CreateParams, Error, ErrorKind, Image, MemFileSystem, MemStorage, OpenFlags, Registry,
};
use vd_tests::fuzzing::reseal_log;
use vd_tests::vhdx::*;

const SECTOR: u64 = 4096;

fn params(size: u64) -> CreateParams {
    CreateParams {
        size,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    }
}

/// The kind and the backend's own corruption of an open that must fail.
fn refused(r: vd_core::Result<Box<dyn Image>>) -> Error {
    match r {
        Ok(_) => panic!("an image over a limit opened"),
        Err(e) => e,
    }
}

/// A small dynamic image made by our `create`, as bytes.
fn small_image() -> Vec<u8> {
    let fs = Arc::new(MemFileSystem::new());
    let reg = Registry::builtin_with_provider(fs.clone());
    let img = reg
        .create("vhdx", Path::new("/s.vhdx"), &params(8 << 20), None, true)
        .expect("creating");
    img.close(false).expect("closing");
    let s = fs.get(Path::new("/s.vhdx")).expect("created");
    let mut b = vec![0u8; usize_of(s.len().expect("length"))];
    s.read_exact_at(0, &mut b).expect("reading back");
    b
}

/// `bytes` with both headers' log moved to the first MiB boundary past the file and made
/// `length` long, written to `path` as a sparse file that reaches the log's end.
fn with_log_of(bytes: &[u8], path: &Path, length: u64) {
    let mut b = bytes.to_vec();
    let offset = (b.len() as u64).next_multiple_of(MIB as u64);
    for slot in 0..2 {
        patch_header(&mut b, slot, |h| {
            put_u64(h, H_LOG_OFFSET, offset);
            put_u32(
                h,
                H_LOG_LENGTH,
                u32::try_from(length).expect("a log length"),
            );
        });
    }
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .expect("the image file");
    f.write_all_at(&b, 0).expect("writing the image");
    f.set_len(offset + length)
        .expect("extending to the log's end");
}

/// A log of exactly `MAX_LOG_SIZE` (1 GiB) is accepted; 1 MiB more makes the header invalid
/// ("longer than 1 GiB"), and with both headers so, the image is `Corrupt`. A clean image never reads its log, so the limit is what a header may
/// say, checked before a replay would read the whole log into memory.
#[test]
fn a_log_at_the_size_limit_opens_and_one_mib_longer_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("log.vhdx");
    let base = small_image();
    let reg = Registry::builtin();

    with_log_of(&base, &path, MAX_LOG_SIZE);
    let img = reg
        .open(&path, OpenFlags::READ_ONLY | OpenFlags::STRICT)
        .expect("a 1 GiB log opens");
    assert_eq!(img.size(), 8 << 20);
    drop(img);

    with_log_of(&base, &path, MAX_LOG_SIZE + MIB as u64);
    let e = refused(reg.open(&path, OpenFlags::READ_ONLY));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    // Both headers say so, so neither is valid.
    let Some(Corruption::NoValidHeader { first, second }) = corruption_of(&e) else {
        panic!("not a header error: {e:?}");
    };
    for why in [first, second] {
        assert!(
            why.contains(&format!("length {:#x}", MAX_LOG_SIZE + MIB as u64))
                && why.contains("longer than 1 GiB"),
            "{why}"
        );
    }
}

/// `bytes` with a dirty log of one entry (sequence 1) holding one zero descriptor of `length`
/// bytes at `target`; the current header carries the entry's LogGuid.
fn with_zero_entry(bytes: &[u8], target: u64, length: u64) -> Vec<u8> {
    let mut b = bytes.to_vec();
    let (log, log_len) = log_region(&b);
    let guid = [0x5a; 16];
    let file_len = b.len() as u64;
    b[log..log + log_len].fill(0);
    let e = &mut b[log..log + 4096];
    e[0..4].copy_from_slice(b"loge");
    put_u32(e, L_LENGTH, 4096);
    put_u32(e, L_TAIL, 0);
    put_u64(e, L_SEQUENCE, 1);
    put_u32(e, L_DESCRIPTORS, 1);
    e[L_LOG_GUID..L_LOG_GUID + 16].copy_from_slice(&guid);
    put_u64(e, L_FLUSHED, file_len);
    put_u64(e, L_LAST, file_len);
    let d = &mut e[64..96];
    d[0..4].copy_from_slice(b"zero");
    put_u64(d, 8, length);
    put_u64(d, D_FILE_OFFSET, target);
    put_u64(d, D_SEQUENCE, 1);
    reseal_log(&mut b[log..log + log_len]);
    let slot = current_slot(&b);
    patch_header(&mut b, slot, |h| {
        h[H_LOG_GUID..H_LOG_GUID + 16].copy_from_slice(&guid);
    });
    b
}

/// A replay that zeroes exactly `MAX_REPLAY_SECTORS` 4 KiB sectors (4 GiB, past the end of the
/// file, which a tolerant open warns about) opens read-only and replays in memory; one sector
/// more is `Corrupt` (`LogEntry`, "more than 4 GiB"): a zero descriptor is 32 bytes whatever
/// length it claims, so this is what bounds a replay's work.
#[test]
fn a_replay_at_the_sector_limit_opens_and_one_sector_more_is_refused() {
    let base = small_image();
    let target = (base.len() as u64).next_multiple_of(MIB as u64);
    let fs = Arc::new(MemFileSystem::new());
    let reg = Registry::builtin_with_provider(fs.clone());
    let open = |bytes: Vec<u8>| {
        fs.insert("/z.vhdx", Arc::new(MemStorage::from_bytes(bytes)));
        reg.open(Path::new("/z.vhdx"), OpenFlags::READ_ONLY)
    };

    let at_limit = with_zero_entry(&base, target, MAX_REPLAY_SECTORS * SECTOR);
    let img = open(at_limit).expect("a 4 GiB replay opens");
    let warnings = img.warnings();
    assert!(
        warnings
            .iter()
            .any(|w| w.message.contains("LastFileOffset")
                || w.message.contains(&format!("{target:#x}"))),
        "the zeroes past the end are a warning: {warnings:?}"
    );
    let mut buf = vec![0xffu8; 4096];
    img.read_at(0, &mut buf)
        .expect("reading the replayed image");
    assert_eq!(buf, vec![0; 4096]);
    drop(img);

    let over = with_zero_entry(&base, target, (MAX_REPLAY_SECTORS + 1) * SECTOR);
    let e = refused(open(over));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        matches!(
            corruption_of(&e),
            Some(Corruption::LogEntry { reason, .. }) if reason.contains("more than 4 GiB")
        ),
        "{e}"
    );
}

/// The largest disk (`MAX_VIRTUAL_SIZE`, 64 TiB) at the smallest block size has the largest BAT
/// there is, and it fits `MAX_BAT_SIZE` (so that limit only refuses BAT regions no valid
/// geometry needs); a VirtualDiskSize 1 MiB larger is `Corrupt`.
#[test]
fn the_largest_disk_and_bat_open_and_a_larger_disk_is_refused() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("big.vhdx");
    let reg = Registry::builtin();
    let img = reg
        .create("vhdx", &path, &params(MAX_VIRTUAL_SIZE), None, true)
        .expect("creating a 64 TiB image");
    img.close(false).expect("closing");
    let img = reg
        .open(&path, OpenFlags::READ_ONLY | OpenFlags::STRICT)
        .expect("a 64 TiB image opens");
    assert_eq!(img.size(), MAX_VIRTUAL_SIZE);
    drop(img);

    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .expect("the image file");
    let mut head = vec![0u8; 320 * KIB];
    f.read_exact_at(&mut head, 0)
        .expect("reading the headers and region tables");
    let (meta, _) = region(&head, REGION_METADATA);
    head.resize(meta + MIB, 0);
    f.read_exact_at(&mut head, 0)
        .expect("reading up to the metadata's end");
    let (_, bat_len) = region(&head, REGION_BAT);
    assert!(
        bat_len as u64 <= MAX_BAT_SIZE && bat_len as u64 >= (64 << 20) * 8,
        "a BAT of {bat_len} bytes"
    );
    let size_at = meta_item(&head, META_VIRTUAL_DISK_SIZE);
    f.write_all_at(
        &(MAX_VIRTUAL_SIZE + MIB as u64).to_le_bytes(),
        size_at as u64,
    )
    .expect("patching VirtualDiskSize");
    drop(f);
    let e = refused(reg.open(&path, OpenFlags::READ_ONLY));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        matches!(
            corruption_of(&e),
            Some(Corruption::VirtualSize { found, reason: "larger than 64 TiB" })
                if *found == MAX_VIRTUAL_SIZE + MIB as u64
        ),
        "{e:?}"
    );
}

/// A comment of `MAX_COMMENT` bytes is stored and read back; one byte more is refused as an
/// invalid argument and the image keeps the comment it had.
#[test]
fn a_comment_at_the_limit_is_stored_and_one_byte_more_is_refused() {
    let fs = Arc::new(MemFileSystem::new());
    let reg = Registry::builtin_with_provider(fs);
    let img = reg
        .create("vhdx", Path::new("/c.vhdx"), &params(8 << 20), None, true)
        .expect("creating");
    let longest = "c".repeat(MAX_COMMENT);
    img.set_comment(Some(&longest))
        .expect("the longest comment");
    let e = img
        .set_comment(Some(&"d".repeat(MAX_COMMENT + 1)))
        .expect_err("a longer comment");
    assert_eq!(e.kind(), ErrorKind::InvalidArgument, "{e}");
    img.close(false).expect("closing");
    let img = reg
        .open(Path::new("/c.vhdx"), OpenFlags::READ_ONLY)
        .expect("reopening");
    assert_eq!(img.comment().expect("the comment"), Some(longest));
}
