//! The library API as a host application uses it, without the CLI: mount a raw image holding
//! an MBR, read and write through the files, unmount (refused while busy), close the disk.
//! Needs root and /dev/fuse; without them the test fails, it does not skip.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::Path;

use backend_raw as _;
use vd_core::{Disk, DiskOptions, OpenFlags, Registry};
use vd_fuse::{File as MountFile, MountError, MountOptions};

const MIB: u64 = 1 << 20;

/// An 8 MiB raw disk whose MBR holds partition 1 at 1 MiB (2 MiB long) and partition 3 at
/// 4 MiB (reaching past the end, so clipped to 4 MiB), and bytes 0x11 over partition 1.
fn raw_disk(path: &Path) {
    let mut bytes = vec![0u8; 8 * MIB as usize];
    for (slot, start, sectors) in [(0usize, 2048u32, 4096u32), (2, 8192, 100_000)] {
        let e = 446 + 16 * slot;
        bytes[e + 4] = 0x83;
        bytes[e + 8..e + 12].copy_from_slice(&start.to_le_bytes());
        bytes[e + 12..e + 16].copy_from_slice(&sectors.to_le_bytes());
    }
    bytes[510..512].copy_from_slice(&[0x55, 0xaa]);
    bytes[MIB as usize..3 * MIB as usize].fill(0x11);
    std::fs::write(path, bytes).unwrap();
}

/// Unmounts `0` lazily when the test ends however it ends (after a clean unmount, a no-op),
/// so a failing test leaves no stale mount.
struct Guard(std::path::PathBuf);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .stderr(std::process::Stdio::null())
            .status();
    }
}

#[test]
fn a_host_application_mounts_writes_unmounts_and_closes() {
    assert!(
        Path::new("/dev/fuse").exists(),
        "/dev/fuse is required by this test and is missing: load it with `modprobe fuse`"
    );
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("disk.raw");
    raw_disk(&image);
    let mp = dir.path().join("mnt");
    std::fs::create_dir(&mp).unwrap();
    let registry = Registry::builtin();
    let opts = DiskOptions {
        flags: OpenFlags::empty(),
        ..DiskOptions::default()
    };
    let disk = Disk::open(&registry, &image, &opts).unwrap();

    // A mount point that is not a directory hands the disk back.
    let failed = vd_fuse::mount(disk, &image, &MountOptions::default()).unwrap_err();
    assert!(
        matches!(failed.error, MountError::MountPoint(..)),
        "{failed:?}"
    );
    let disk = failed.disk.expect("the disk comes back");

    let options = MountOptions {
        writable: true,
        ..MountOptions::default()
    };
    let _guard = Guard(mp.clone());
    let mount = vd_fuse::mount(disk, &mp, &options).unwrap();
    let file = |name: &str, offset, length| MountFile {
        name: name.into(),
        offset,
        length,
    };
    assert_eq!(
        mount.files(),
        [
            file("disk", 0, 8 * MIB),
            file("p1", MIB, 2 * MIB),
            file("p3", 4 * MIB, 4 * MIB)
        ]
    );
    assert_eq!(
        mount.warnings().len(),
        1,
        "p3 clipped: {:?}",
        mount.warnings()
    );

    let mut buf = vec![0u8; 4096];
    File::open(mp.join("p1"))
        .unwrap()
        .read_exact_at(&mut buf, 2 * MIB - 4096)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x11));
    let p3 = OpenOptions::new().write(true).open(mp.join("p3")).unwrap();
    p3.write_all_at(&[0x33; 4096], 8192).unwrap();
    p3.sync_all().unwrap();

    // Busy while a file is open: the mount stays and keeps serving.
    let busy = mount.unmounter().unmount().unwrap_err();
    assert!(matches!(busy, MountError::Unmount(..)), "{busy:?}");
    File::open(mp.join("disk"))
        .unwrap()
        .read_exact_at(&mut buf, 4 * MIB + 8192)
        .unwrap();
    assert!(buf.iter().all(|&b| b == 0x33));
    drop(p3);

    let ended = mount.unmount().unwrap();
    ended.session.unwrap();
    ended.disk.close().unwrap();
    let bytes = std::fs::read(&image).unwrap();
    assert!(
        bytes[4 * MIB as usize + 8192..][..4096]
            .iter()
            .all(|&b| b == 0x33)
    );
}
