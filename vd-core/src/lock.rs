//! Image locks compatible with QEMU's.
//!
//! QEMU's file driver (`block/file-posix.c`) expresses what an opener does with an image, and
//! what it lets others do, as permission bits, and publishes them as open-file-description
//! (OFD) byte-range read locks on the image file itself:
//!
//! - byte `100 + n` is locked while the opener holds permission `n`;
//! - byte `200 + n` is locked while the opener does not share permission `n` with others.
//!
//! An opener that wants permission `n` conflicts with anyone holding byte `200 + n`; one that
//! does not share `n` conflicts with anyone holding byte `100 + n`. Locks are applied first
//! and checked afterwards, so two openers racing each other both see the conflict. Taking the
//! same locks with the same meanings makes vd and QEMU exclude each other exactly as two QEMUs
//! do. Measured against `qemu-io` 10: a writer locks bytes 100, 101, 103, 201 and 203; a reader
//! 100, 201 and 203; a reader with `-U` (force-share) only 100.
//!
//! OFD locks belong to one open file description: they are released when it is closed, are not
//! lost when another descriptor of the same file is closed (unlike classic POSIX locks), and
//! conflict between two descriptors of the same process.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::storage::OpenMode;

/// QEMU's `BLK_PERM_CONSISTENT_READ`: reads see consistent data.
const PERM_CONSISTENT_READ: u32 = 1 << 0;
/// QEMU's `BLK_PERM_WRITE`: the contents may change.
const PERM_WRITE: u32 = 1 << 1;
/// QEMU's `BLK_PERM_WRITE_UNCHANGED`: writes that leave the contents as they are.
const PERM_WRITE_UNCHANGED: u32 = 1 << 2;
/// QEMU's `BLK_PERM_RESIZE`: the size may change.
const PERM_RESIZE: u32 = 1 << 3;
/// Every permission QEMU 10 knows.
const PERM_ALL: u32 = PERM_CONSISTENT_READ | PERM_WRITE | PERM_WRITE_UNCHANGED | PERM_RESIZE;
/// Byte `PERM_BASE + n` is locked while permission `n` is held.
const PERM_BASE: i64 = 100;
/// Byte `SHARED_BASE + n` is locked while permission `n` is not shared.
const SHARED_BASE: i64 = 200;

/// The permissions an opener in `mode` holds, and those it shares with other openers.
fn permissions(mode: OpenMode) -> (u32, u32) {
    match mode {
        OpenMode::ReadWrite => (
            PERM_CONSISTENT_READ | PERM_WRITE | PERM_RESIZE,
            PERM_ALL & !(PERM_WRITE | PERM_RESIZE),
        ),
        OpenMode::ReadOnly => (PERM_CONSISTENT_READ, PERM_ALL & !(PERM_WRITE | PERM_RESIZE)),
        OpenMode::ReadOnlyShared => (PERM_CONSISTENT_READ, PERM_ALL),
    }
}

fn perm_name(bit: u32) -> &'static str {
    match bit {
        PERM_CONSISTENT_READ => "consistent read",
        PERM_WRITE => "write",
        PERM_WRITE_UNCHANGED => "write unchanged",
        _ => "resize",
    }
}

/// Why a lock could not be taken: another opener's use of the image conflicts with ours.
/// Carried inside an [`io::Error`] of kind [`io::ErrorKind::ResourceBusy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockConflict {
    /// The permission (QEMU's name) that conflicts.
    pub permission: &'static str,
    /// `true`: another opener holds the permission, which we do not share; `false`: another
    /// opener does not share the permission, which we need.
    pub held_by_other: bool,
}

impl std::fmt::Display for LockConflict {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.held_by_other {
            write!(
                f,
                "another process has the image open with \"{}\" permission \
                 (failed to get the shared \"{}\" lock)",
                self.permission, self.permission
            )
        } else {
            write!(
                f,
                "another process has the image open and does not share \"{}\" permission \
                 (failed to get the \"{}\" lock)",
                self.permission, self.permission
            )
        }
    }
}

impl std::error::Error for LockConflict {}

impl LockConflict {
    fn into_io(self) -> io::Error {
        io::Error::new(io::ErrorKind::ResourceBusy, self)
    }
}

/// One byte-range lock request on `file` (`F_OFD_SETLK` or `F_OFD_GETLK`). Returns the lock
/// type the kernel reports (for `GETLK`: `F_UNLCK` when nothing conflicts).
#[allow(
    unsafe_code,
    reason = "fcntl(2) byte-range OFD locks have no safe wrapper in std"
)]
fn fcntl_lock(file: &File, cmd: libc::c_int, kind: libc::c_int, byte: i64) -> io::Result<i32> {
    let mut fl = libc::flock {
        l_type: libc::c_short::try_from(kind).map_err(io::Error::other)?,
        l_whence: libc::c_short::try_from(libc::SEEK_SET).map_err(io::Error::other)?,
        l_start: byte,
        l_len: 1,
        // OFD locks require l_pid to be 0.
        l_pid: 0,
    };
    // SAFETY: the descriptor is open for the lifetime of `file`; `fl` is a fully initialised
    // `struct flock` that outlives the call, which is what F_OFD_SETLK/F_OFD_GETLK read (and,
    // for GETLK, write back).
    let r = unsafe { libc::fcntl(file.as_raw_fd(), cmd, &raw mut fl) };
    if r == -1 {
        return Err(io::Error::last_os_error());
    }
    Ok(i32::from(fl.l_type))
}

fn set_byte(file: &File, byte: i64, locked: bool) -> io::Result<()> {
    let kind = if locked { libc::F_RDLCK } else { libc::F_UNLCK };
    fcntl_lock(file, libc::F_OFD_SETLK, kind, byte).map(|_| ())
}

/// Whether an open file description other than `file`'s holds a lock on `byte`.
fn held_by_other(file: &File, byte: i64) -> io::Result<bool> {
    Ok(fcntl_lock(file, libc::F_OFD_GETLK, libc::F_WRLCK, byte)? != libc::F_UNLCK)
}

/// QEMU's four permissions: each one's permission byte, its not-shared byte and its bit.
const PERMISSIONS: [(i64, i64, u32); 4] = [
    (PERM_BASE, SHARED_BASE, 1),
    (PERM_BASE + 1, SHARED_BASE + 1, 2),
    (PERM_BASE + 2, SHARED_BASE + 2, 4),
    (PERM_BASE + 3, SHARED_BASE + 3, 8),
];

fn bits() -> impl Iterator<Item = (i64, i64, u32)> {
    PERMISSIONS.into_iter()
}

/// Locks `file` for an opener in `mode` (`None`: releases every lock), then checks the locks
/// of other openers.
///
/// # Errors
/// [`io::ErrorKind::ResourceBusy`] with a [`LockConflict`] inside when another opener's use
/// conflicts; the errors of `fcntl` (a file system without OFD lock support, say).
pub(crate) fn apply(file: &File, mode: Option<OpenMode>) -> io::Result<()> {
    let (perm, shared) = mode.map_or((0, PERM_ALL), permissions);
    for (perm_byte, shared_byte, bit) in bits() {
        set_byte(file, perm_byte, perm & bit != 0).map_err(|e| lock_error(e, bit, true))?;
        set_byte(file, shared_byte, shared & bit == 0).map_err(|e| lock_error(e, bit, false))?;
    }
    for (perm_byte, shared_byte, bit) in bits() {
        if perm & bit != 0 && held_by_other(file, shared_byte)? {
            return Err(LockConflict {
                permission: perm_name(bit),
                held_by_other: false,
            }
            .into_io());
        }
        if shared & bit == 0 && held_by_other(file, perm_byte)? {
            return Err(LockConflict {
                permission: perm_name(bit),
                held_by_other: true,
            }
            .into_io());
        }
    }
    Ok(())
}

/// A lock byte that cannot be taken because someone holds a write lock on it is a conflict;
/// anything else is the file system's error.
fn lock_error(e: io::Error, bit: u32, held: bool) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EAGAIN | libc::EACCES) => LockConflict {
            permission: perm_name(bit),
            held_by_other: !held,
        }
        .into_io(),
        _ => io::Error::new(e.kind(), format!("cannot lock the image: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(path: &std::path::Path) -> File {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .unwrap()
    }

    fn conflict(r: io::Result<()>) -> Option<LockConflict> {
        let e = r.err()?;
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
        e.get_ref()?.downcast_ref::<LockConflict>().cloned()
    }

    /// The same matrix two QEMUs obey: writers exclude writers and plain readers; readers
    /// share with readers; force-share readers get along with everyone.
    #[test]
    fn lock_matrix_matches_qemu() {
        use OpenMode::{ReadOnly, ReadOnlyShared, ReadWrite};
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let cases = [
            (ReadWrite, ReadWrite, false),
            (ReadWrite, ReadOnly, false),
            (ReadOnly, ReadWrite, false),
            (ReadWrite, ReadOnlyShared, true),
            (ReadOnlyShared, ReadWrite, true),
            (ReadOnly, ReadOnly, true),
            (ReadOnly, ReadOnlyShared, true),
            (ReadOnlyShared, ReadOnlyShared, true),
        ];
        for (first, second, ok) in cases {
            let a = open(&path);
            apply(&a, Some(first)).unwrap();
            let b = open(&path);
            let r = apply(&b, Some(second));
            assert_eq!(r.is_ok(), ok, "{first:?} then {second:?}: {r:?}");
            if !ok {
                let c = conflict(r).unwrap();
                assert!(c.permission == "write", "{c:?}");
            }
            // Releasing the first opener's locks lets the second in.
            apply(&a, None).unwrap();
            apply(&b, Some(second)).unwrap();
        }
    }

    #[test]
    fn closing_the_file_releases_its_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = open(&path);
        apply(&a, Some(OpenMode::ReadWrite)).unwrap();
        let b = open(&path);
        assert!(conflict(apply(&b, Some(OpenMode::ReadWrite))).is_some());
        drop(a);
        apply(&b, Some(OpenMode::ReadWrite)).unwrap();
    }

    /// The lock bytes some other open file description holds on `path`, seen from a new one.
    fn held_bytes(path: &std::path::Path) -> Vec<i64> {
        let probe = open(path);
        (PERM_BASE..PERM_BASE + 4)
            .chain(SHARED_BASE..SHARED_BASE + 4)
            .filter(|&b| held_by_other(&probe, b).expect("F_OFD_GETLK"))
            .collect()
    }

    /// The exact bytes QEMU locks: 100 + n while permission n is held (consistent read 0,
    /// write 1, write unchanged 2, resize 3), 200 + n while permission n is not shared. Two
    /// descriptions of one file in one process see each other's locks (OFD locks, unlike
    /// POSIX record locks, belong to the open file description, not the process).
    #[test]
    fn each_mode_locks_qemus_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        for (mode, want) in [
            (Some(OpenMode::ReadWrite), vec![100, 101, 103, 201, 203]),
            (Some(OpenMode::ReadOnly), vec![100, 201, 203]),
            (Some(OpenMode::ReadOnlyShared), vec![100]),
            (None, vec![]),
        ] {
            let f = open(&path);
            apply(&f, mode).unwrap();
            assert_eq!(held_bytes(&path), want, "{mode:?}");
            // The description's own locks never count against it.
            assert!(!held_by_other(&f, PERM_BASE).unwrap());
        }
    }

    #[test]
    fn relocking_changes_what_others_may_do() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("img");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let writer = open(&path);
        apply(&writer, Some(OpenMode::ReadWrite)).unwrap();
        let reader = open(&path);
        let c = conflict(apply(&reader, Some(OpenMode::ReadOnly))).unwrap();
        assert_eq!(
            c,
            LockConflict {
                permission: "write",
                held_by_other: true,
            }
        );
        // The writer downgrades to reading: now the reader fits, and the writer cannot
        // upgrade again while the reader refuses to share writing.
        apply(&writer, Some(OpenMode::ReadOnly)).unwrap();
        apply(&reader, Some(OpenMode::ReadOnly)).unwrap();
        let c = conflict(apply(&writer, Some(OpenMode::ReadWrite))).unwrap();
        assert_eq!(
            c,
            LockConflict {
                permission: "write",
                held_by_other: false,
            }
        );
        // `apply` alone leaves the bytes of the refused mode in place (FileStorage::relock
        // restores the previous set; see the storage tests).
        assert_eq!(held_bytes(&path), vec![100, 101, 103, 201, 203]);
    }

    #[test]
    fn permissions_and_conflict_messages() {
        assert_eq!(
            permissions(OpenMode::ReadWrite),
            (0b1011, PERM_CONSISTENT_READ | PERM_WRITE_UNCHANGED)
        );
        assert_eq!(permissions(OpenMode::ReadOnly), (0b0001, 0b0101));
        assert_eq!(permissions(OpenMode::ReadOnlyShared), (0b0001, PERM_ALL));
        let names: Vec<_> = bits().map(|(_, _, b)| perm_name(b)).collect();
        assert_eq!(
            names,
            vec!["consistent read", "write", "write unchanged", "resize"]
        );
        let held = LockConflict {
            permission: "write",
            held_by_other: true,
        };
        assert_eq!(
            held.to_string(),
            "another process has the image open with \"write\" permission (failed to get the \
             shared \"write\" lock)"
        );
        let unshared = LockConflict {
            permission: "resize",
            held_by_other: false,
        };
        assert!(unshared.to_string().contains("does not share \"resize\""));
        let e = lock_error(
            io::Error::from_raw_os_error(libc::EAGAIN),
            PERM_RESIZE,
            true,
        );
        assert_eq!(
            conflict(Err(e)),
            Some(LockConflict {
                permission: "resize",
                held_by_other: false,
            })
        );
        let e = lock_error(io::Error::from_raw_os_error(libc::ENOLCK), PERM_WRITE, true);
        assert_ne!(e.kind(), io::ErrorKind::ResourceBusy);
        assert!(e.to_string().starts_with("cannot lock the image"), "{e}");
    }
}
