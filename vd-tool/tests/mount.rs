//! `vd-tool mount` as root over `/dev/fuse`, with real bytes and real peers: `sha256` of the
//! `disk` file against the corpus' content hashes, `sfdisk` reading the table through `disk`,
//! `mkfs.ext4` and the kernel's ext4 (through a loop device) on a partition, `qemu-img check`
//! on the images afterwards.
//!
//! Every mount is held by a guard that unmounts it (lazily, loop mounts first) and kills
//! vd-tool when the test ends however it ends, so a failing test leaves no stale mount. A
//! missing tool, `/dev/fuse`, or root fails the test with the command that installs it.

use std::fs::{File, OpenOptions};
use std::io::{ErrorKind, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vd_tests::corpus::{self, decompress};
use vd_tests::hash::{sha256, sha256_file};
use vd_tests::peers::{Peer, require};
use vd_tests::process::{run_ok, stdout};
use vd_tests::qemu::{self, DirtyLog, dirty_vhdx};
use vd_tests::s;

vd_tests::vd_tool_fns!();

const MIB: u64 = 1 << 20;

/// Fails the test unless it runs as root with `/dev/fuse`, and every `(program, package)` is
/// on the PATH, naming the command that installs what is missing (as `.ci/peers` does).
#[track_caller]
fn need(tools: &[(&str, &str)]) {
    let uid = Command::new("id").arg("-u").output().expect("id runs");
    assert_eq!(
        String::from_utf8_lossy(&uid.stdout).trim(),
        "0",
        "the mount tests run as root (they mount FUSE and loop devices)"
    );
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is required by this test and is missing: load it with `modprobe fuse`"
    );
    for (program, package) in tools {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            found,
            "{program} is required by this test and is missing: install it with \
             `apt-get install -y {package}` (or run `.ci/peers`, which installs every peer)"
        );
    }
}

/// Whether a file system of type `fstype` is mounted on `dir`, per /proc/self/mountinfo.
fn mounted(dir: &Path, fstype: &str) -> bool {
    let info = std::fs::read_to_string("/proc/self/mountinfo").expect("mountinfo");
    info.lines().any(|line| {
        let mut halves = line.split(" - ");
        let (Some(left), Some(right)) = (halves.next(), halves.next()) else {
            return false;
        };
        left.split(' ').nth(4) == Some(s(dir)) && right.split(' ').next() == Some(fstype)
    })
}

/// A running `vd-tool mount`. Dropped without [`Mounted::stop`], it unmounts lazily and kills
/// vd-tool.
struct Mounted {
    child: Option<Child>,
    dir: PathBuf,
    log: PathBuf,
}

impl Mounted {
    /// Runs `vd-tool mount ARGS IMAGE DIR` and waits until the kernel shows the mount.
    #[track_caller]
    fn start(args: &[&str], image: &Path, dir: &Path) -> Mounted {
        let dir = dir.canonicalize().expect("mount point");
        let log = dir.with_extension("log");
        let child = Command::new(vd_tests::vd_tool_bin!())
            .arg("mount")
            .args(args)
            .arg(image)
            .arg(&dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file"))
            .spawn()
            .expect("vd-tool runs");
        let mut m = Mounted {
            child: Some(child),
            dir,
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !mounted(&m.dir, "fuse") {
            if let Some(status) = m.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("vd-tool mount exited ({status}): {}", m.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "not mounted after 30 s: {}",
                m.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        m
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn file(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The names in the mount, sorted.
    fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.dir)
            .expect("readdir")
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// Ends the mount the way a user does (`fusermount3 -u`, or SIGTERM to vd-tool) and
    /// requires vd-tool to exit 0, unmounted, saying it closed the image; returns its stderr.
    #[track_caller]
    fn stop(mut self, how: Stop) -> String {
        let mut child = self.child.take().expect("running");
        match how {
            Stop::Fusermount => {
                run_ok("fusermount3", &["-u", s(&self.dir)]);
            }
            Stop::Signal(signal) => {
                run_ok("kill", &[format!("-{signal}"), child.id().to_string()]);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(60);
        let status = loop {
            if let Some(status) = child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                self.child = Some(child);
                panic!(
                    "vd-tool mount still running 60 s after {how:?}: {}",
                    self.stderr()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        let err = self.stderr();
        assert!(status.success(), "vd-tool mount: {status}: {err}");
        assert!(!mounted(&self.dir, "fuse"), "still mounted after {how:?}");
        assert!(err.contains("image closed"), "{err}");
        assert!(!err.contains("panicked"), "{err}");
        err
    }
}

#[derive(Debug, Clone, Copy)]
enum Stop {
    Fusermount,
    Signal(&'static str),
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("fusermount3")
                .args(["-u", "-z"])
                .arg(&self.dir)
                .stderr(Stdio::null())
                .status();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A loop mount of a file of the FUSE mount; dropped, it unmounts (lazily if it must), so it
/// goes before the FUSE mount it lives on (declare it after the [`Mounted`]).
struct LoopMount(PathBuf);

impl LoopMount {
    #[track_caller]
    fn new(file: &Path, dir: &Path, options: &str) -> LoopMount {
        run_ok("mount", &["-o", options, s(file), s(dir)]);
        LoopMount(dir.to_path_buf())
    }

    #[track_caller]
    fn unmount(self) {
        run_ok("umount", &[s(&self.0)]);
        std::mem::forget(self);
    }
}

impl Drop for LoopMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The partitions `sfdisk --json` reads from `disk`, as (`pN`, offset, length) in bytes.
fn sfdisk_partitions(disk: &Path) -> Vec<(String, u64, u64)> {
    let o = run_ok("sfdisk", &["--json", s(disk)]);
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).expect("sfdisk JSON");
    let table = &v["partitiontable"];
    let sector = table["sectorsize"].as_u64().unwrap_or(512);
    let mut parts: Vec<(String, u64, u64)> = table["partitions"]
        .as_array()
        .expect("partitions")
        .iter()
        .map(|p| {
            // The node is the disk's path with the partition number appended.
            let node = p["node"].as_str().unwrap();
            let number = node.trim_start_matches(s(disk));
            (
                format!("p{number}"),
                p["start"].as_u64().unwrap() * sector,
                p["size"].as_u64().unwrap() * sector,
            )
        })
        .collect();
    parts.sort();
    parts
}

/// The files of a mount other than `disk`, as (`pN`, offset, length), checking each `pN`'s
/// bytes against `disk` at the offset `sfdisk` gives (first and last MiB).
#[track_caller]
fn assert_partitions_match_sfdisk(m: &Mounted) {
    let parts = sfdisk_partitions(&m.file("disk"));
    let mut names: Vec<String> = parts.iter().map(|p| p.0.clone()).collect();
    names.push("disk".into());
    names.sort();
    assert_eq!(m.names(), names, "the mount shows sfdisk's partitions");
    let disk = File::open(m.file("disk")).unwrap();
    for (name, offset, length) in &parts {
        let part = File::open(m.file(name)).unwrap();
        assert_eq!(part.metadata().unwrap().len(), *length, "{name}: size");
        for at in [0, length.saturating_sub(MIB)] {
            let len = usize::try_from(MIB.min(*length)).unwrap();
            let (mut a, mut b) = (vec![0u8; len], vec![0u8; len]);
            part.read_exact_at(&mut a, at).unwrap();
            disk.read_exact_at(&mut b, offset + at).unwrap();
            assert!(
                a == b,
                "{name}: bytes at {at:#x} differ from disk at {:#x}",
                offset + at
            );
        }
    }
}

#[track_caller]
fn assert_qemu_clean(image: &Path) {
    let o = qemu::img(&["check", s(image)]);
    assert!(
        o.status.success(),
        "qemu-img check: {}",
        vd_tests::process::show(&o)
    );
}

#[test]
fn corpus_disk_reads_the_content_hash_and_leaves_the_file_untouched() {
    need(&[("fusermount3", "fuse3"), ("sfdisk", "fdisk")]);
    let dir = tempfile::tempdir().unwrap();
    // A dirty log (replayed in memory) and a clean image; both small enough to hash quickly.
    let wanted = [
        "adiskreader/small_ntfs_test.vhdx.gz",
        "coreos-hyperv/config2_base.vhdx.bz2",
    ];
    for entry in corpus::expected() {
        let name = entry["file"].as_str().unwrap();
        if !wanted.contains(&name) {
            continue;
        }
        let image = dir.path().join(corpus::image_name(name));
        decompress(name, &image);
        let before = sha256_file(&image);
        let mp = dir.path().join("mnt");
        std::fs::create_dir_all(&mp).unwrap();
        let m = Mounted::start(&[], &image, &mp);
        assert_eq!(
            sha256_file(&m.file("disk")),
            entry["content_sha256"].as_str().unwrap(),
            "{name}: the disk file's hash"
        );
        assert_partitions_match_sfdisk(&m);
        m.stop(Stop::Fusermount);
        assert_eq!(
            sha256_file(&image),
            before,
            "{name}: the image file changed"
        );
    }
}

#[test]
fn ext4_in_a_partition_written_through_one_mount_reads_back_through_another() {
    need(&[
        ("fusermount3", "fuse3"),
        ("sfdisk", "fdisk"),
        ("mkfs.ext4", "e2fsprogs"),
        ("losetup", "mount"),
    ]);
    require(&[Peer::QemuImg]);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("x.vhdx");
    let mp = dir.path().join("mnt");
    let inner = dir.path().join("ext4");
    std::fs::create_dir_all(&mp).unwrap();
    std::fs::create_dir_all(&inner).unwrap();
    vd_ok(&["create", "-f", "vhdx", s(&image), "64M"]);

    // A GPT with two partitions, written by sfdisk into `disk`.
    let m = Mounted::start(&["--writable"], &image, &mp);
    assert_eq!(m.names(), ["disk"]);
    let mut sfdisk = Command::new("sfdisk")
        .args(["-q", s(&m.file("disk"))])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("sfdisk runs");
    std::io::Write::write_all(
        sfdisk.stdin.as_mut().unwrap(),
        b"label: gpt\nsize=40M, type=linux\ntype=linux\n",
    )
    .unwrap();
    assert!(sfdisk.wait().unwrap().success(), "sfdisk failed");
    m.stop(Stop::Fusermount);

    // The next mount shows them; an ext4 made on p1 gets files through a loop mount.
    let m = Mounted::start(&["--writable"], &image, &mp);
    assert_eq!(m.names(), ["disk", "p1", "p2"]);
    assert_partitions_match_sfdisk(&m);
    assert_eq!(std::fs::metadata(m.file("p1")).unwrap().len(), 40 * MIB);
    run_ok("mkfs.ext4", &["-q", "-F", "-L", "vdtest", s(&m.file("p1"))]);
    let big: Vec<u8> = (0..3 * MIB).map(|i| (i * 7 % 251) as u8).collect();
    let lm = LoopMount::new(&m.file("p1"), &inner, "loop");
    std::fs::write(inner.join("hello.txt"), b"hello from vd\n").unwrap();
    std::fs::create_dir(inner.join("sub")).unwrap();
    std::fs::write(inner.join("sub/big.bin"), &big).unwrap();
    lm.unmount();
    m.stop(Stop::Signal("TERM"));
    assert_qemu_clean(&image);

    // A read-only mount of the image: the loop mount lists and reads them back.
    let before = sha256_file(&image);
    let m = Mounted::start(&[], &image, &mp);
    assert_eq!(
        OpenOptions::new()
            .write(true)
            .open(m.file("p1"))
            .unwrap_err()
            .kind(),
        ErrorKind::ReadOnlyFilesystem
    );
    let lm = LoopMount::new(&m.file("p1"), &inner, "loop,ro");
    let mut names: Vec<String> = std::fs::read_dir(&inner)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hello.txt", "lost+found", "sub"]);
    assert_eq!(
        std::fs::read(inner.join("hello.txt")).unwrap(),
        b"hello from vd\n"
    );
    assert!(
        std::fs::read(inner.join("sub/big.bin")).unwrap() == big,
        "big.bin differs"
    );
    lm.unmount();
    m.stop(Stop::Fusermount);
    assert_eq!(
        sha256_file(&image),
        before,
        "a read-only mount changed the image"
    );
    assert_qemu_clean(&image);
}

#[test]
fn writes_through_disk_land_in_the_image_clipped_at_its_end() {
    need(&[("fusermount3", "fuse3")]);
    require(&[Peer::QemuImg]);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("w.vhdx");
    let mp = dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    vd_ok(&["create", "-f", "vhdx", s(&image), "64M"]);
    let size = 64 * MIB;

    let m = Mounted::start(&["--writable"], &image, &mp);
    let disk = OpenOptions::new()
        .write(true)
        .read(true)
        .open(m.file("disk"))
        .unwrap();
    assert_eq!(disk.metadata().unwrap().len(), size);
    disk.write_all_at(&vec![0x5a; MIB as usize], 3 * MIB)
        .unwrap();
    disk.write_all_at(&[0xa5; 4096], 10 * MIB + 123).unwrap();
    // A write across the end is cut there; one at the end has no room.
    assert_eq!(disk.write_at(&[0x77; 200], size - 100).unwrap(), 100);
    assert_eq!(
        disk.write_at(&[0x77; 10], size).unwrap_err().raw_os_error(),
        Some(28), // ENOSPC
    );
    disk.sync_all().unwrap();
    // Reads across the end return what lies before it.
    let mut buf = [0u8; 300];
    assert_eq!(disk.read_at(&mut buf, size - 100).unwrap(), 100);
    assert!(buf[..100].iter().all(|&b| b == 0x77));
    assert_eq!(disk.read_at(&mut buf, size).unwrap(), 0);
    let mut all = Vec::new();
    File::open(m.file("disk"))
        .unwrap()
        .read_to_end(&mut all)
        .unwrap();
    assert_eq!(all.len() as u64, size);
    drop(disk);
    m.stop(Stop::Fusermount);

    assert_qemu_clean(&image);
    vd_ok(&[
        "io",
        "-r",
        "-c",
        "read -P 0x5a 3M 1M",
        "-c",
        "read -P 0xa5 10485883 4096",
        "-c",
        "read -P 0x77 67108764 100",
        "-c",
        "read -P 0 0 3M",
        s(&image),
    ]);
    // qemu reads the same disk the mount showed.
    assert_eq!(sha256(&qemu::raw(&image)), sha256(&all));
}

#[test]
fn a_read_only_mount_of_a_dirty_log_shows_the_replayed_disk_and_changes_nothing() {
    need(&[("fusermount3", "fuse3")]);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("dirty.vhdx");
    dirty_vhdx(&image, &DirtyLog::default());
    let before = sha256_file(&image);
    let raw = dir.path().join("replayed.raw");
    vd_ok(&["convert", "-O", "raw", s(&image), s(&raw)]);
    assert!(
        std::fs::read(&raw).unwrap()[..MIB as usize]
            .iter()
            .all(|&b| b == 0xab),
        "the replayed log's data"
    );
    let mp = dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();

    let m = Mounted::start(&[], &image, &mp);
    assert_eq!(m.names(), ["disk"]);
    assert_eq!(sha256_file(&m.file("disk")), sha256_file(&raw));
    let err = OpenOptions::new()
        .write(true)
        .open(m.file("disk"))
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::ReadOnlyFilesystem, "{err}");
    let err = m.stop(Stop::Signal("INT"));
    assert!(err.contains("read-only"), "{err}");
    assert_eq!(
        sha256_file(&image),
        before,
        "a read-only mount changed the image"
    );
}

#[test]
fn a_busy_mount_survives_sigterm_and_a_missing_mount_point_is_an_error() {
    need(&[("fusermount3", "fuse3")]);
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("b.vhdx");
    vd_ok(&["create", "-f", "vhdx", s(&image), "8M"]);
    let o = vd(&["mount", s(&image), s(&dir.path().join("nowhere"))]);
    vd_tests::tool::assert_fails(&o, "nowhere");

    let mp = dir.path().join("mnt");
    std::fs::create_dir_all(&mp).unwrap();
    let m = Mounted::start(&[], &image, &mp);
    let open = File::open(m.file("disk")).unwrap();
    // Busy: SIGTERM cannot unmount, says so, and the mount keeps serving.
    run_ok(
        "kill",
        &[
            "-TERM".to_string(),
            m.child.as_ref().unwrap().id().to_string(),
        ],
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    while !m.stderr().contains("still mounted") {
        assert!(Instant::now() < deadline, "no busy message: {}", m.stderr());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut buf = [1u8; 512];
    open.read_exact_at(&mut buf, 0).unwrap();
    assert_eq!(buf, [0u8; 512]);
    drop(open);
    m.stop(Stop::Signal("TERM"));
}
