//! End-to-end tests of the commands that change VHDX images — resize, compact, discard, commit,
//! setuuid, geometry, comment — checking contents with our reader and with qemu-img/qemu-io,
//! and `qemu-img check` afterwards.

use std::path::{Path, PathBuf};

use vd_tests::process::stdout;
use vd_tests::{qemu, s, vd_tool_fns};

vd_tool_fns!();

fn ok(args: &[&str]) -> String {
    stdout(&vd_ok(args))
}

fn json(args: &[&str]) -> serde_json::Value {
    let mut a = args.to_vec();
    a.extend(["--output", "json"]);
    serde_json::from_str(&ok(&a)).unwrap()
}

fn qemu_check(img: &Path) {
    qemu::img(&["check", "-f", "vhdx", s(img)]);
}

/// qemu-io verifies `pattern` over `[off, off + len)`.
fn qemu_reads(img: &Path, pattern: u8, off: u64, len: u64) {
    qemu::assert_reads(img, &[(pattern, off, len)]);
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    ok(&["create", "-f", "vhdx", "-o", opts, s(&p), size]);
    p
}

fn io(img: &Path, cmds: &[&str]) {
    let mut a = vec!["io"];
    for c in cmds {
        a.extend(["-c", c]);
    }
    a.push(s(img));
    ok(&a);
}

const MIB: u64 = 1 << 20;

#[test]
fn resize_grows_shrinks_and_keeps_data() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "r.vhdx", "block_size=1M", "64M");
    io(&img, &["write -P 0xab 0 3M", "write -P 0xcd 63M 1M"]);
    ok(&["resize", s(&img), "+64M"]);
    qemu_check(&img);
    assert_eq!(json(&["info", s(&img)])["virtual_size"], 128 * MIB);
    qemu_reads(&img, 0xab, 0, 3 * MIB);
    qemu_reads(&img, 0xcd, 63 * MIB, MIB);
    qemu_reads(&img, 0, 64 * MIB, 64 * MIB);
    // Shrinking needs --shrink, and is refused over data unless forced.
    assert_eq!(vd(&["resize", s(&img), "32M"]).status.code(), Some(2));
    let o = vd(&["resize", "--shrink", s(&img), "2M"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("holds data"));
    ok(&["discard", s(&img), "63M", "1M"]);
    ok(&["resize", "--shrink", s(&img), "3M"]);
    qemu_check(&img);
    assert_eq!(json(&["info", s(&img)])["virtual_size"], 3 * MIB);
    ok(&["resize", "--shrink", "--force", s(&img), "1536K"]);
    qemu_check(&img);
    // Growing again: the old bytes past 1.5 MiB must not come back.
    ok(&["resize", s(&img), "8M"]);
    qemu_check(&img);
    qemu_reads(&img, 0xab, 0, 1536 * 1024);
    qemu_reads(&img, 0, 1536 * 1024, 8 * MIB - 1536 * 1024);
    io(&img, &["read -P 0 1536K 6656K"]);
}

#[test]
fn resize_fixed_preallocates() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "f.vhdx", "subformat=fixed,block_size=1M", "8M");
    io(&img, &["write -P 0x11 7M 1M"]);
    ok(&["resize", s(&img), "16M"]);
    qemu_check(&img);
    let (_, extents) =
        vd_tests::tool::map_lines(ok(&["map", s(&img), "--output", "json"]).as_bytes());
    let data: u64 = extents
        .iter()
        .filter(|e| e["state"] == "data")
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert_eq!(data, 16 * MIB, "every block of a fixed image is allocated");
    qemu_reads(&img, 0x11, 7 * MIB, MIB);
    qemu_reads(&img, 0, 8 * MIB, 8 * MIB);
}

#[test]
fn discard_and_compact_release_space() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "c.vhdx", "block_size=1M", "64M");
    io(
        &img,
        &[
            "write -P 0xaa 0 8M",
            "write -P 0xbb 30M 2M",
            "write -P 0xcc 60M 1M",
        ],
    );
    ok(&["discard", s(&img), "0", "6M"]);
    // A partial discard zeros the range.
    ok(&["discard", s(&img), "30M", "4K"]);
    qemu_check(&img);
    qemu_reads(&img, 0, 0, 6 * MIB);
    qemu_reads(&img, 0xaa, 6 * MIB, 2 * MIB);
    qemu_reads(&img, 0, 30 * MIB, 4096);
    qemu_reads(&img, 0xbb, 30 * MIB + 4096, 2 * MIB - 4096);
    let (_, extents) =
        vd_tests::tool::map_lines(ok(&["map", s(&img), "--output", "json"]).as_bytes());
    assert_eq!(extents[0]["state"], "zero");
    assert_eq!(extents[0]["length"], 6 * MIB);
    let raw = dir.path().join("before.raw");
    ok(&["convert", "-O", "raw", s(&img), s(&raw)]);
    let before = std::fs::metadata(&img).unwrap().len();
    let id_before = json(&["info", s(&img)])["modification_uuid"].clone();
    // A child of this image must stay valid: moving blocks is not a user-visible change.
    let child = dir.path().join("child.vhdx");
    ok(&["create", "-f", "vhdx", "-b", s(&img), s(&child)]);
    ok(&["compact", s(&img)]);
    assert_eq!(json(&["info", s(&img)])["modification_uuid"], id_before);
    assert_eq!(vd(&["compare", s(&child), s(&raw)]).status.code(), Some(0));
    let after = std::fs::metadata(&img).unwrap().len();
    assert!(after <= before - 6 * MIB, "compact: {before} -> {after}");
    qemu_check(&img);
    qemu::img(&["compare", "-f", "vhdx", "-F", "raw", s(&img), s(&raw)]);
    assert_eq!(vd(&["compare", s(&img), s(&raw)]).status.code(), Some(0));
}

#[test]
fn commit_merges_a_child_into_its_parent() {
    let dir = tempfile::tempdir().unwrap();
    let parent = create(dir.path(), "p.vhdx", "block_size=1M", "64M");
    io(&parent, &["write -P 0xaa 0 8M"]);
    let child = dir.path().join("c.vhdx");
    ok(&["create", "-f", "vhdx", "-b", s(&parent), s(&child)]);
    io(
        &child,
        &[
            "write -P 0xbb 1M 1000",
            "write -P 0xcc 20M 3M",
            "write -z 4M 2M",
        ],
    );
    let raw = dir.path().join("chain.raw");
    ok(&["convert", "-O", "raw", s(&child), s(&raw)]);
    ok(&["commit", s(&child)]);
    qemu_check(&parent);
    qemu::img(&["compare", "-f", "vhdx", "-F", "raw", s(&parent), s(&raw)]);
    // The child was relinked to the parent's new identity and still reads the same.
    assert_eq!(vd(&["compare", s(&child), s(&raw)]).status.code(), Some(0));
    let child_info = json(&["info", s(&child)]);
    let parent_info = json(&["info", s(&parent)]);
    assert_eq!(child_info["parent_uuid"], parent_info["modification_uuid"]);
    // A base image has nothing to commit.
    assert_eq!(vd(&["commit", s(&parent)]).status.code(), Some(2));
}

#[test]
fn setters_persist_and_survive_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "s.vhdx", "block_size=1M", "64M");
    io(&img, &["write -P 0x42 0 1M"]);
    let id = "11111111-2222-3333-4444-555555555555";
    ok(&["setuuid", "--uuid", id, s(&img)]);
    ok(&[
        "geometry",
        "--pchs",
        "100/16/63",
        "--lchs",
        "65/16/63",
        s(&img),
    ]);
    ok(&["comment", "--set", "made by the setters test", s(&img)]);
    let before = json(&["info", s(&img)]);
    // Metadata rewrites (resize) keep our user items.
    ok(&["resize", s(&img), "+1M"]);
    let info = json(&["info", s(&img)]);
    assert_eq!(info["uuid"], id);
    assert_eq!(info["format_specific"]["virtual_disk_id"], id);
    assert_eq!(info["comment"], "made by the setters test");
    assert_eq!(info["pchs_geometry"]["cylinders"], 100);
    assert_eq!(info["lchs_geometry"]["cylinders"], 65);
    assert_ne!(
        info["modification_uuid"], before["modification_uuid"],
        "resize is user-visible"
    );
    qemu_check(&img);
    qemu_reads(&img, 0x42, 0, MIB);
    let g = json(&["geometry", s(&img)]);
    assert_eq!(g["pchs"]["heads"], 16);
    ok(&["comment", "--clear", s(&img)]);
    assert!(json(&["info", s(&img)]).get("comment").is_none());
    let m = "99999999-8888-7777-6666-555555555555";
    ok(&["setuuid", "--modification-uuid", m, s(&img)]);
    assert_eq!(json(&["info", s(&img)])["modification_uuid"], m);
    qemu_check(&img);

    // A child whose parent UUID no longer matches is refused, and accepted again once fixed.
    let child = dir.path().join("c.vhdx");
    ok(&["create", "-f", "vhdx", "-b", s(&img), s(&child)]);
    let z = "00000000-0000-0000-0000-00000000abcd";
    ok(&["setuuid", "--parent-uuid", z, s(&child)]);
    let o = vd(&[
        "convert",
        "-O",
        "raw",
        s(&child),
        s(&dir.path().join("x.raw")),
    ]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains(z),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    ok(&["setuuid", "--parent-uuid", m, s(&child)]);
    ok(&[
        "convert",
        "-O",
        "raw",
        s(&child),
        s(&dir.path().join("x.raw")),
    ]);
}

#[test]
fn resize_moves_the_bat_when_it_must_grow() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "big.vhdx", "block_size=1M", "4G");
    io(&img, &["write -P 0xaa 0 2M", "write -P 0xbb 4095M 1M"]);
    let bat_offset = |dump: &str| {
        dump.lines()
            .find(|l| l.contains("2dc27766-f623-4200-9d64-115e9bfd4a08"))
            .map(str::to_string)
            .unwrap()
    };
    let before = bat_offset(&ok(&["dump", s(&img)]));
    ok(&["resize", s(&img), "600G"]);
    let after = bat_offset(&ok(&["dump", s(&img)]));
    assert_ne!(before, after, "the BAT region moved");
    qemu_check(&img);
    qemu_reads(&img, 0xaa, 0, 2 * MIB);
    qemu_reads(&img, 0xbb, 4095 * MIB, MIB);
    qemu_reads(&img, 0, 500 << 30, MIB);
    io(&img, &["write -P 0xcc 599G 1M"]);
    qemu_reads(&img, 0xcc, 599 << 30, MIB);
    qemu_check(&img);
}

/// The metadata region's (offset, length), from region table copy 1.
fn metadata_region(bytes: &[u8]) -> (usize, usize) {
    let meta = uuid::Uuid::parse_str("8B7CA206-4790-4B9A-B8FE-575F050F886E")
        .unwrap()
        .to_bytes_le();
    let rt = &bytes[192 * 1024..256 * 1024];
    let n = u32::from_le_bytes(rt[8..12].try_into().unwrap()) as usize;
    (0..n)
        .map(|i| &rt[16 + 32 * i..48 + 32 * i])
        .find(|e| e[..16] == meta)
        .map(|e| {
            (
                u64::from_le_bytes(e[16..24].try_into().unwrap()) as usize,
                u32::from_le_bytes(e[24..28].try_into().unwrap()) as usize,
            )
        })
        .unwrap()
}

/// The data of metadata item `guid` (any flags), if present.
fn item(bytes: &[u8], guid: uuid::Uuid) -> Option<Vec<u8>> {
    let (off, _) = metadata_region(bytes);
    let t = &bytes[off..off + 64 * 1024];
    let n = u16::from_le_bytes(t[10..12].try_into().unwrap()) as usize;
    (0..n)
        .map(|i| &t[32 + 32 * i..64 + 32 * i])
        .find(|e| e[..16] == guid.to_bytes_le())
        .map(|e| {
            let o = u32::from_le_bytes(e[16..20].try_into().unwrap()) as usize;
            let l = u32::from_le_bytes(e[20..24].try_into().unwrap()) as usize;
            bytes[off + o..off + o + l].to_vec()
        })
}

#[test]
fn unknown_optional_metadata_survives_rewrites() {
    let dir = tempfile::tempdir().unwrap();
    let img = create(dir.path(), "u.vhdx", "block_size=1M", "16M");
    io(&img, &["write -P 0x5a 0 1M"]);
    // Add an optional system item and a user item we do not know, as another tool might.
    let mut bytes = std::fs::read(&img).unwrap();
    let (off, _) = metadata_region(&bytes);
    let foreign = uuid::Uuid::parse_str("0f0e0d0c-0b0a-4908-8706-050403020100").unwrap();
    let user = uuid::Uuid::parse_str("1f1e1d1c-1b1a-4918-9716-151413121110").unwrap();
    let n = u16::from_le_bytes(bytes[off + 10..off + 12].try_into().unwrap()) as usize;
    for (k, (guid, flags, data)) in [
        (foreign, 0u32, b"kept by vd 1".as_slice()),
        (user, 1, b"user data 2".as_slice()),
    ]
    .into_iter()
    .enumerate()
    {
        let data_off = 200 * 1024 + 4096 * k;
        let e = off + 32 + 32 * (n + k);
        bytes[e..e + 16].copy_from_slice(&guid.to_bytes_le());
        bytes[e + 16..e + 20].copy_from_slice(&(data_off as u32).to_le_bytes());
        bytes[e + 20..e + 24].copy_from_slice(&(data.len() as u32).to_le_bytes());
        bytes[e + 24..e + 28].copy_from_slice(&flags.to_le_bytes());
        bytes[off + data_off..off + data_off + data.len()].copy_from_slice(data);
    }
    bytes[off + 10..off + 12].copy_from_slice(&((n + 2) as u16).to_le_bytes());
    std::fs::write(&img, &bytes).unwrap();
    qemu_check(&img);
    // Every metadata rewrite keeps both items.
    ok(&["comment", "--set", "a comment", s(&img)]);
    ok(&["resize", s(&img), "+16M"]);
    ok(&["setuuid", s(&img)]);
    ok(&["geometry", "--pchs", "10/16/63", s(&img)]);
    let after = std::fs::read(&img).unwrap();
    assert_eq!(
        item(&after, foreign).as_deref(),
        Some(b"kept by vd 1".as_slice())
    );
    assert_eq!(
        item(&after, user).as_deref(),
        Some(b"user data 2".as_slice())
    );
    assert_eq!(json(&["info", s(&img)])["comment"], "a comment");
    qemu_check(&img);
    qemu_reads(&img, 0x5a, 0, MIB);
}
