//! A FUSE file system over a [`vd_core::Disk`]: the whole virtual disk as one raw file, `disk`,
//! and each partition of its GPT or MBR partition table as another, `p1`, `p2`, … (numbered as
//! Linux numbers them), so `mount -o loop,ro MOUNTPOINT/p1 /mnt` opens the file system inside a
//! disk image that Linux itself cannot attach.
//!
//! ```no_run
//! use std::path::Path;
//! use vd_core::{Disk, DiskOptions, Registry};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let registry = Registry::builtin();
//! let disk = Disk::open(&registry, Path::new("disk.vhdx"), &DiskOptions::default())?;
//! let mount = vd_fuse::mount(disk, Path::new("/mnt/disk"), &vd_fuse::MountOptions::default())?;
//! for file in mount.files() {
//!     println!("{}: {} bytes", file.name, file.length);
//! }
//! // ... until the host is done with it:
//! let ended = mount.unmount()?;
//! ended.disk.close()?;
//! ended.session?;
//! # Ok(())
//! # }
//! ```
//!
//! # Behaviour
//! - The files are fixed when mounting: a partition table written through a writable mount
//!   shows its partitions at the next mount.
//! - Read-only unless [`MountOptions::writable`]: files are mode 0444 and opening one for
//!   writing fails with `EROFS`. Writable files (0644) write into the image; `fsync` and
//!   `close` on a file flush the disk.
//! - Reads past a file's end return what lies before it, as for a regular file; a write is
//!   clipped at the end (a short write), and one starting at or past the end fails with
//!   `ENOSPC`, as on a full block device. Sizes cannot change (truncating to another size is
//!   `EINVAL`).
//! - The kernel caches file pages; `disk` and a `pN` are separate files over the same bytes,
//!   so after writing one, reopen the other before reading the same range through it.
//!
//! # Security
//! The partition table is untrusted input: see [`partitions`]. Requests come from the kernel,
//! bounded by the sizes it negotiated and by [`MAX_REQUEST`]. The mount is private to the
//! user who made it unless [`MountOptions::allow_other`] is set.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
// Partition tables and FUSE requests are untrusted input: no unchecked arithmetic, indexing,
// unwrap or panic in library code (tests may).
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing,
        clippy::arithmetic_side_effects
    )
)]

use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::SystemTime;

use fuser::{Config, MountOption, Session, SessionACL};
use vd_core::Disk;

mod fs;
pub mod partitions;

pub use fs::MAX_REQUEST;
use partitions::TableKind;

/// How to mount.
#[derive(Debug, Clone)]
pub struct MountOptions {
    /// Let writes through to the disk (it must have been opened writable).
    pub writable: bool,
    /// Let users other than the one mounting (and root) use the mount (`allow_other`; for a
    /// user other than root it needs `user_allow_other` in `/etc/fuse.conf`).
    pub allow_other: bool,
    /// Threads serving requests; the disk is shared between them.
    pub threads: usize,
    /// The name the mount table shows as the source (`fsname`).
    pub fs_name: String,
}

impl Default for MountOptions {
    fn default() -> Self {
        Self {
            writable: false,
            allow_other: false,
            threads: 4,
            fs_name: "vd".into(),
        }
    }
}

/// A file of the mount: a byte range of the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    /// Its name: `disk`, or `pN` for partition N.
    pub name: String,
    /// Start on the disk in bytes.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// Why mounting or unmounting failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// The partition table could not be read from the disk.
    #[error("reading the partition table")]
    PartitionTable(#[source] io::Error),
    /// The mount point is not a directory that can be used.
    #[error("mount point {}", .0.display())]
    MountPoint(PathBuf, #[source] io::Error),
    /// The kernel (or fusermount3) refused the mount.
    #[error("mounting on {}", .0.display())]
    Mount(PathBuf, #[source] io::Error),
    /// Unmounting failed, typically because the mount is busy (a file open, a loop device
    /// attached); the file system keeps serving.
    #[error("unmounting {}", .0.display())]
    Unmount(PathBuf, #[source] io::Error),
    /// The thread serving the file system panicked.
    #[error("the file system thread panicked")]
    Panicked,
    /// The disk was still shared when the file system ended (a bug).
    #[error("the disk is still in use after the file system ended")]
    DiskInUse,
}

/// A failed [`mount`]: the error, and the disk handed back to be closed.
#[derive(Debug, thiserror::Error)]
#[error("mount failed")]
pub struct MountFailed {
    /// What went wrong.
    #[source]
    pub error: MountError,
    /// The disk, as it was passed to [`mount`]; `None` only if a share of it was kept
    /// somewhere (a bug).
    pub disk: Option<Disk>,
}

/// Reads the table and checks the mount point: the files, the warnings, the canonical mount
/// point and its metadata.
fn prepare(
    disk: &Disk,
    mountpoint: &Path,
) -> Result<(Vec<File>, Vec<String>, PathBuf, std::fs::Metadata), MountError> {
    let (files, warnings) = files_of(disk)?;
    let at = mountpoint
        .canonicalize()
        .map_err(|e| MountError::MountPoint(mountpoint.to_path_buf(), e))?;
    let meta = at
        .metadata()
        .map_err(|e| MountError::MountPoint(at.clone(), e))?;
    if !meta.is_dir() {
        return Err(MountError::MountPoint(
            at,
            io::Error::new(io::ErrorKind::NotADirectory, "not a directory"),
        ));
    }
    Ok((files, warnings, at, meta))
}

/// The files a mount of `disk` shows, and the warnings about its partition table (damaged
/// headers, partitions clipped or skipped).
///
/// # Errors
/// [`MountError::PartitionTable`] when reading the disk fails.
pub fn files_of(disk: &Disk) -> Result<(Vec<File>, Vec<String>), MountError> {
    let size = disk.size();
    let mut read =
        |offset: u64, buf: &mut [u8]| disk.read_at(offset, buf).map_err(io::Error::other);
    let table = partitions::read_table(&mut read, size, disk.top().sector_size())
        .map_err(MountError::PartitionTable)?;
    let mut files = vec![File {
        name: "disk".into(),
        offset: 0,
        length: size,
    }];
    if table.kind != TableKind::None {
        files.extend(table.partitions.iter().map(|p| File {
            name: format!("p{}", p.number),
            offset: p.offset,
            length: p.length,
        }));
    }
    Ok((files, table.warnings))
}

/// Mounts `disk` on the directory `mountpoint` and serves it from background threads until
/// [`Mount::unmount`], or until someone else unmounts it (`fusermount3 -u`, `umount`), which
/// [`Mount::wait`] waits for. Either hands the disk back to be closed.
///
/// As root the kernel mount is made directly through `/dev/fuse`; otherwise through the
/// `fusermount3` helper (package `fuse3`). No libfuse library is needed.
///
/// # Errors
/// A [`MountFailed`] holding the disk and [`MountError::PartitionTable`],
/// [`MountError::MountPoint`] when `mountpoint` is not an accessible directory, or
/// [`MountError::Mount`] when the mount is refused (no `/dev/fuse`, no permission, no
/// `fusermount3`).
pub fn mount(disk: Disk, mountpoint: &Path, options: &MountOptions) -> Result<Mount, MountFailed> {
    let (files, warnings, at, meta) = match prepare(&disk, mountpoint) {
        Ok(prepared) => prepared,
        Err(error) => {
            return Err(MountFailed {
                error,
                disk: Some(disk),
            });
        }
    };
    let disk = Arc::new(disk);
    let fs = fs::DiskFs {
        disk: Arc::clone(&disk),
        files: files.clone(),
        writable: options.writable,
        owner: fs::Owner {
            uid: meta.uid(),
            gid: meta.gid(),
            time: SystemTime::now(),
        },
    };
    let mut config = Config::default();
    config.mount_options = vec![
        MountOption::FSName(options.fs_name.clone()),
        MountOption::Subtype("vd".into()),
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
        if options.writable {
            MountOption::RW
        } else {
            MountOption::RO
        },
    ];
    config.acl = if options.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    config.n_threads = Some(options.threads.max(1));
    // Both failures drop the file system (and its share of the disk) before returning.
    let started = Session::new(fs, &at, &config).and_then(|session| {
        std::thread::Builder::new()
            .name("vd-fuse".into())
            .spawn(move || session.run())
    });
    let thread = match started {
        Ok(thread) => thread,
        Err(e) => {
            let error = MountError::Mount(at, e);
            // The only other share was the file system's, dropped above.
            let disk = Arc::into_inner(disk);
            return Err(MountFailed { error, disk });
        }
    };
    Ok(Mount {
        thread,
        disk,
        files,
        warnings,
        unmounter: Unmounter { mountpoint: at },
    })
}

/// A mounted disk. Dropping it without [`unmount`](Mount::unmount) or
/// [`wait`](Mount::wait) leaves the file system mounted and served until someone unmounts it.
#[derive(Debug)]
pub struct Mount {
    thread: JoinHandle<io::Result<()>>,
    disk: Arc<Disk>,
    files: Vec<File>,
    warnings: Vec<String>,
    unmounter: Unmounter,
}

/// What an ended mount hands back.
#[derive(Debug)]
pub struct Unmounted {
    /// The disk, to be closed ([`Disk::close`]).
    pub disk: Disk,
    /// How the file system's session ended (an error from `/dev/fuse`, which is rare).
    pub session: io::Result<()>,
}

impl Mount {
    /// The files shown: `disk` first, then the partitions by number.
    pub fn files(&self) -> &[File] {
        &self.files
    }

    /// What was wrong with the partition table (see [`files_of`]).
    pub fn warnings(&self) -> &[String] {
        &self.warnings
    }

    /// Where the file system is mounted (canonical path).
    pub fn mountpoint(&self) -> &Path {
        &self.unmounter.mountpoint
    }

    /// A handle that unmounts from another thread (a signal handler's, say), making
    /// [`wait`](Mount::wait) return.
    pub fn unmounter(&self) -> Unmounter {
        self.unmounter.clone()
    }

    /// Waits until the file system is unmounted, by [`Unmounter::unmount`] or from outside.
    ///
    /// # Errors
    /// [`MountError::Panicked`] or [`MountError::DiskInUse`], neither of which should happen.
    pub fn wait(self) -> Result<Unmounted, MountError> {
        let session = self.thread.join().map_err(|_| MountError::Panicked)?;
        let disk = Arc::into_inner(self.disk).ok_or(MountError::DiskInUse)?;
        Ok(Unmounted { disk, session })
    }

    /// Unmounts and waits for the file system to end.
    ///
    /// # Errors
    /// [`MountError::Unmount`] when the mount is busy: it stays mounted and served, and the
    /// error carries no disk (call again, or [`wait`](Mount::wait), once it is free). The
    /// errors of [`wait`](Mount::wait).
    pub fn unmount(self) -> Result<Unmounted, MountError> {
        self.unmounter.unmount()?;
        self.wait()
    }
}

/// Unmounts a [`Mount`] from any thread; cheap to clone.
#[derive(Debug, Clone)]
pub struct Unmounter {
    mountpoint: PathBuf,
}

impl Unmounter {
    /// Unmounts: `umount(2)` as root, otherwise `fusermount3 -u`. Unmounting something no
    /// longer mounted there is an error (`EINVAL`), so call it once per mount.
    ///
    /// # Errors
    /// [`MountError::Unmount`], typically `EBUSY` while a file is open or a loop device is
    /// attached; the mount then stays.
    pub fn unmount(&self) -> Result<(), MountError> {
        let error = |e| MountError::Unmount(self.mountpoint.clone(), e);
        match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => Ok(()),
            Err(rustix::io::Errno::PERM) => {
                let out = Command::new("fusermount3")
                    .arg("-u")
                    .arg(&self.mountpoint)
                    .output()
                    .map_err(error)?;
                if out.status.success() {
                    Ok(())
                } else {
                    let text = String::from_utf8_lossy(&out.stderr);
                    Err(error(io::Error::other(format!(
                        "fusermount3 -u: {}",
                        text.trim()
                    ))))
                }
            }
            Err(e) => Err(error(e.into())),
        }
    }
}
