//! Data safety through vd-tool: image locks against QEMU and against ourselves, destinations
//! that are never destroyed, and sources that cannot be overwritten under another name.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use vd_tests::hash::{sha256, sha256_file};
use vd_tests::process::{output, run_ok, stderr};
use vd_tests::tool::{Background, assert_fails, qemu_io_holding};
use vd_tests::{qemu, s, vd_tool_bin, vd_tool_fns};

vd_tool_fns!();

/// `vd-tool io` holding `img` open: runs `first` (a read or a write, with `-r` for a read),
/// then sleeps 30 s before closing. Returns once `first` is done.
fn vd_holding(img: &Path, read_only: bool, first: &str) -> Background {
    let mut args = vec!["io"];
    if read_only {
        args.push("-r");
    }
    args.extend(["-c", first, "-c", "sleep 30000", s(img)]);
    let mut child = Command::new(env!("CARGO_BIN_EXE_vd-tool"))
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vd-tool runs");
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().expect("piped"))
        .read_line(&mut line)
        .expect("vd-tool io prints");
    assert!(
        line.starts_with("wrote") || line.starts_with("read"),
        "{line:?}"
    );
    Background(child)
}

#[test]
fn a_qemu_writer_locks_vd_out_and_force_share_still_reads() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("a.vhdx");
    qemu::vhdx(&img, "64M", 0x5a, "1M");
    let qemu_io = qemu_io_holding(vd_tool_bin!(), &img, false);
    let before = sha256_file(&img);

    // A writer is refused, naming the file and the reason.
    let o = vd(&["io", "-c", "write -P 0xab 0 64k", s(&img)]);
    assert_fails(&o, "another process has the image open");
    assert!(stderr(&o).contains(s(&img)), "{}", stderr(&o));
    assert!(stderr(&o).contains("\"write\" lock"), "{}", stderr(&o));
    for args in [
        vec!["resize", s(&img), "+1M"],
        vec!["comment", "--set", "x", s(&img)],
        vec!["check", "-r", s(&img)],
        vec!["bench", "-w", "-c", "10", s(&img)],
    ] {
        assert_fails(&vd(&args), "lock");
    }
    // So is a reader that does not let others write (as `qemu-img info` is), with a hint.
    let o = vd(&["info", s(&img)]);
    assert_fails(&o, "shared \"write\" lock");
    assert!(stderr(&o).contains("-U"), "{}", stderr(&o));
    // -U reads anyway, through every read-only command.
    vd_ok(&["info", "-U", s(&img)]);
    vd_ok(&["map", "-U", s(&img)]);
    vd_ok(&["check", "-U", s(&img)]);
    vd_ok(&["io", "-r", "-U", "-c", "read -P 0x5a 0 1M", s(&img)]);
    let out = dir.path().join("out.raw");
    vd_ok(&["convert", "-U", "-O", "raw", s(&img), s(&out)]);
    assert_eq!(
        &std::fs::read(&out).unwrap()[..1 << 20],
        &[0x5a; 1 << 20][..]
    );
    // -U cannot be combined with writing.
    assert_fails(
        &vd(&["io", "-U", "-c", "write 0 4k", s(&img)]),
        "force-share",
    );
    assert_eq!(
        sha256_file(&img),
        before,
        "refused commands changed the image"
    );
    drop(qemu_io);
    // Once QEMU is gone, vd writes.
    vd_ok(&["io", "-c", "write -P 0xab 0 64k", s(&img)]);
}

#[test]
fn a_vd_writer_locks_qemu_and_other_vd_writers_out() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("b.vhdx");
    qemu::vhdx(&img, "64M", 0x01, "1M");
    let writer = vd_holding(&img, false, "write -P 0x11 0 64k");

    let o = output("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", s(&img)]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    let o = output("qemu-img", &["info", s(&img)]);
    assert!(!o.status.success());
    assert!(
        stderr(&o).contains("Failed to get shared \"write\" lock"),
        "{}",
        stderr(&o)
    );
    run_ok("qemu-img", &["info", "-U", s(&img)]);
    // A second vd writer loses nothing: it is refused before it writes.
    assert_fails(
        &vd(&["io", "-c", "write -P 0x22 0 64k", s(&img)]),
        "\"write\" lock",
    );
    assert_fails(&vd(&["bench", "-w", "-c", "16", s(&img)]), "lock");
    vd_ok(&["io", "-r", "-U", "-c", "read -P 0x11 0 64k", s(&img)]);
    drop(writer);

    // The killed writer left a dirty log; a new writer replays it and keeps the flushed data.
    vd_ok(&["io", "-c", "write -P 0x33 64k 64k", s(&img)]);
    let raw = qemu::raw(&img);
    assert!(raw[..64 << 10].iter().all(|&b| b == 0x11));
    assert!(raw[64 << 10..128 << 10].iter().all(|&b| b == 0x33));
    run_ok("qemu-img", &["check", s(&img)]);
}

#[test]
fn readers_share_and_a_writer_is_refused_while_they_read() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("c.vhdx");
    qemu::vhdx(&img, "16M", 0x07, "64k");
    let reader = vd_holding(&img, true, "read -P 0x07 0 64k");
    // Readers get along (a second reader, qemu-img info); a writer is refused while one reads.
    let o = vd(&["io", "-c", "write 0 4k", s(&img)]);
    assert_fails(&o, "does not share \"write\" permission");
    let o = output("qemu-io", &["-f", "vhdx", "-c", "write 0 4k", s(&img)]);
    assert!(
        stderr(&o).contains("Failed to get \"write\" lock"),
        "{}",
        stderr(&o)
    );
    vd_ok(&["info", s(&img)]);
    run_ok("qemu-img", &["info", s(&img)]);
    drop(reader);
}

/// A character device in the test's directory that discards what is written (like
/// `/dev/null`): `mknod c 1 3`, as root.
fn null_device(dir: &Path) -> PathBuf {
    let p = dir.join("null");
    run_ok("mknod", &[s(&p), "c", "1", "3"]);
    p
}

fn file_type(p: &Path) -> std::fs::FileType {
    std::fs::symlink_metadata(p).unwrap().file_type()
}

#[test]
fn devices_and_fifos_are_written_in_place_never_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("d.vhdx");
    qemu::vhdx(&img, "8M", 0xc3, "3M");
    let want = sha256(&qemu::raw(&img));

    let null = null_device(dir.path());
    vd_ok(&["convert", "-O", "raw", s(&img), s(&null)]);
    assert!(file_type(&null).is_char_device());
    // Only raw output can go there; nothing is deleted on the way.
    assert_fails(
        &vd(&["convert", "-O", "vhdx", s(&img), s(&null)]),
        "a character device can only receive raw output",
    );
    assert_fails(
        &vd(&["create", "-f", "vhdx", "--force", s(&null), "1M"]),
        "not a regular file",
    );
    assert!(file_type(&null).is_char_device());

    let fifo = dir.path().join("fifo");
    run_ok("mkfifo", &[s(&fifo)]);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            std::fs::File::open(fifo)
                .unwrap()
                .read_to_end(&mut bytes)
                .unwrap();
            bytes
        })
    };
    vd_ok(&["convert", "-O", "raw", s(&img), s(&fifo)]);
    assert_eq!(sha256(&reader.join().unwrap()), want);
    assert!(file_type(&fifo).is_fifo());
    assert_fails(
        &vd(&["create", "-f", "raw", "--force", s(&fifo), "1M"]),
        "not a regular file",
    );
    assert!(file_type(&fifo).is_fifo());
}

#[test]
fn raw_output_streams_to_stdout_and_dash() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("e.vhdx");
    qemu::vhdx(&img, "6M", 0x3c, "2M");
    let want = sha256(&qemu::raw(&img));
    for dst in ["/dev/stdout", "-"] {
        let o = vd_ok(&["convert", "-O", "raw", s(&img), dst]);
        assert_eq!(o.stdout.len(), 6 << 20, "{dst}");
        assert_eq!(sha256(&o.stdout), want, "{dst}");
    }
    assert!(Path::new("/dev/stdout").exists());
    assert_fails(
        &vd(&["convert", "-O", "vhdx", s(&img), "-"]),
        "can only receive raw output",
    );
    assert_fails(
        &vd(&["--output", "json", "convert", "-O", "raw", s(&img), "-"]),
        "json",
    );
}

/// A loop device over a file of `size` bytes, detached when dropped.
struct Loop(String);

impl Loop {
    fn new(backing: &Path, size: u64) -> Self {
        std::fs::File::create(backing)
            .unwrap()
            .set_len(size)
            .unwrap();
        let o = output("losetup", &["-f", "--show", s(backing)]);
        assert!(
            o.status.success(),
            "losetup is needed for the block-device test (root, loop devices): {}",
            stderr(&o)
        );
        Self(String::from_utf8(o.stdout).unwrap().trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn a_block_device_is_written_in_place_and_must_be_large_enough() {
    use std::os::unix::fs::FileTypeExt;
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("f.vhdx");
    qemu::vhdx(&img, "8M", 0x99, "1M");
    // Old contents of the device where the disk has zeros must not survive.
    let backing = dir.path().join("dev.img");
    let dev = Loop::new(&backing, 12 << 20);
    std::fs::write(&dev.0, vec![0xee; 12 << 20]).unwrap();
    vd_ok(&["convert", "-O", "raw", s(&img), &dev.0]);
    assert!(file_type(Path::new(&dev.0)).is_block_device());
    let bytes = std::fs::read(&backing).unwrap();
    assert_eq!(sha256(&bytes[..8 << 20]), sha256(&qemu::raw(&img)));
    assert!(
        bytes[8 << 20..].iter().all(|&b| b == 0xee),
        "beyond the disk"
    );

    let small_backing = dir.path().join("small.img");
    let small = Loop::new(&small_backing, 4 << 20);
    std::fs::write(&small.0, vec![0xee; 4 << 20]).unwrap();
    assert_fails(
        &vd(&["convert", "-O", "raw", s(&img), &small.0]),
        "less than the disk",
    );
    assert!(
        std::fs::read(&small_backing)
            .unwrap()
            .iter()
            .all(|&b| b == 0xee)
    );
    assert_fails(
        &vd(&["convert", "-O", "vhdx", s(&img), &dev.0]),
        "a block device can only receive raw output",
    );
}

#[test]
fn the_source_is_refused_as_destination_under_any_name() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("h.vhdx");
    qemu::vhdx(&img, "8M", 0x42, "1M");
    let hard = dir.path().join("hl.vhdx");
    std::fs::hard_link(&img, &hard).unwrap();
    let sym = dir.path().join("hs.vhdx");
    std::os::unix::fs::symlink("h.vhdx", &sym).unwrap();
    std::fs::create_dir(dir.path().join("sub")).unwrap();
    let dotted = dir.path().join("sub/../h.vhdx");
    let before = sha256_file(&img);
    for dst in [&img, &hard, &sym, &dotted] {
        for fmt in ["vhdx", "raw"] {
            assert_fails(
                &vd(&["convert", "-O", fmt, s(&img), s(dst)]),
                "is the same file as the source image",
            );
        }
    }
    // A parent of the source is protected too.
    let child = dir.path().join("child.vhdx");
    vd_ok(&["create", "-f", "vhdx", "-b", s(&img), s(&child)]);
    let parent_link = dir.path().join("parent-link.vhdx");
    std::fs::hard_link(&img, &parent_link).unwrap();
    assert_fails(
        &vd(&["convert", "-O", "raw", s(&child), s(&parent_link)]),
        "is the same file as the source image",
    );
    assert_eq!(sha256_file(&img), before);
    vd_ok(&["io", "-r", "-c", "read -P 0x42 0 1M", s(&child)]);
}

#[test]
fn a_failed_convert_or_create_keeps_the_old_destination() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.vhdx");
    qemu::vhdx(&img, "8M", 0x61, "1M");
    let dst = dir.path().join("dst.vhdx");
    std::fs::write(&dst, b"precious old contents").unwrap();
    // Refused by the backend after the destination was set up: the old file stays.
    assert_fails(
        &vd(&[
            "convert",
            "-O",
            "vhdx",
            "-o",
            "block_size=3M",
            s(&img),
            s(&dst),
        ]),
        "block",
    );
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious old contents");
    assert_fails(
        &vd(&[
            "create",
            "-f",
            "vhdx",
            "--force",
            "-o",
            "block_size=3M",
            s(&dst),
            "8M",
        ]),
        "block",
    );
    assert_eq!(std::fs::read(&dst).unwrap(), b"precious old contents");
    // No temporary file is left behind.
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");
    // A successful one replaces it, keeping its permissions.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dst, std::fs::Permissions::from_mode(0o600)).unwrap();
    vd_ok(&["convert", "-O", "vhdx", s(&img), s(&dst)]);
    run_ok("qemu-img", &["compare", s(&img), s(&dst)]);
    let mode = std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
}

#[test]
fn a_symlinked_destination_keeps_its_link() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("src.vhdx");
    qemu::vhdx(&img, "8M", 0x17, "2M");
    std::fs::create_dir(dir.path().join("store")).unwrap();
    let target = dir.path().join("store/disk.raw");
    std::fs::write(&target, b"old").unwrap();
    let link = dir.path().join("disk.raw");
    std::os::unix::fs::symlink("store/disk.raw", &link).unwrap();
    vd_ok(&["convert", "-O", "raw", s(&img), s(&link)]);
    assert!(file_type(&link).is_symlink());
    assert_eq!(sha256_file(&target), sha256(&qemu::raw(&img)));
    // A dangling link is not replaced either.
    let dangling = dir.path().join("dangling.raw");
    std::os::unix::fs::symlink("nowhere/x.raw", &dangling).unwrap();
    assert_fails(
        &vd(&["convert", "-O", "raw", s(&img), s(&dangling)]),
        "dangling symbolic link",
    );
    assert!(file_type(&dangling).is_symlink());
}

#[test]
fn create_refuses_a_chain_that_contains_itself() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.vhdx");
    qemu::vhdx(&base, "8M", 0x24, "1M");
    let mid = dir.path().join("mid.vhdx");
    vd_ok(&["create", "-f", "vhdx", "-b", s(&base), s(&mid)]);
    let before = (sha256_file(&base), sha256_file(&mid));
    let hard = dir.path().join("base-link.vhdx");
    std::fs::hard_link(&base, &hard).unwrap();
    for (parent, new) in [(&base, &base), (&base, &hard), (&mid, &mid), (&mid, &base)] {
        assert_fails(
            &vd(&["create", "-f", "vhdx", "--force", "-b", s(parent), s(new)]),
            "would be part of its own backing chain",
        );
    }
    assert_eq!((sha256_file(&base), sha256_file(&mid)), before);
    vd_ok(&["io", "-r", "-c", "read -P 0x24 0 1M", s(&mid)]);
}
