//! The I/O interface (VirtualBox's `VDINTERFACEIO`): backends read and write images only through
//! [`Storage`] and find, create, rename and delete files only through [`StorageProvider`], so an
//! image can live in a file, in memory, or anywhere a host application provides.

use std::collections::HashMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use crate::flags::OpenFlags;

/// One run of bytes in a storage object: data, or a hole that reads as zeros.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StorageRun {
    /// Whether the run holds data (`false`: a hole that reads as zeros).
    pub data: bool,
    /// Length of the run in bytes.
    pub len: u64,
}

/// One open file, addressed by position. All methods take `&self`, so a storage object can be
/// shared between threads; implementations synchronise internally.
///
/// End-of-file semantics: [`read_exact_at`](Storage::read_exact_at) past the end fails with
/// [`io::ErrorKind::UnexpectedEof`]; [`write_all_at`](Storage::write_all_at) past the end extends
/// the storage.
pub trait Storage: Send + Sync + Debug {
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()>;
    /// Writes all of `buf` at `offset`, growing the storage if needed.
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()>;
    /// Current length in bytes.
    fn len(&self) -> io::Result<u64>;
    /// Whether the storage is empty.
    fn is_empty(&self) -> io::Result<bool> {
        Ok(self.len()? == 0)
    }
    /// Truncates or extends (with zeros) to `len` bytes.
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&self) -> io::Result<()>;
    /// Writes zeros over `[offset, offset + len)`.
    fn zero_range(&self, offset: u64, len: u64) -> io::Result<()> {
        const CHUNK: u64 = 256 * 1024;
        let end = offset.checked_add(len).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "the range ends past 2^64")
        })?;
        let zeros = vec![0u8; usize::try_from(CHUNK.min(len)).map_err(io::Error::other)?];
        let mut pos = offset;
        // `end - pos` and `pos + n`: pos < end, and pos + n <= end.
        while let Some(left) = end.checked_sub(pos).filter(|&l| l > 0) {
            let n = left.min(CHUNK);
            let n_usize = usize::try_from(n).map_err(io::Error::other)?;
            let chunk = zeros
                .get(..n_usize)
                .ok_or_else(|| io::Error::other("zero chunk"))?;
            self.write_all_at(pos, chunk)?;
            pos = pos.saturating_add(n);
        }
        Ok(())
    }
    /// Releases `[offset, offset + len)` so that it reads as zeros, punching a hole where the
    /// storage supports it. The default writes zeros.
    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        self.zero_range(offset, len)
    }
    /// Whether `offset` starts a data run or a hole, and how long that run is (at most
    /// `max_len`). The default reports everything as data.
    fn run_at(&self, offset: u64, max_len: u64) -> io::Result<StorageRun> {
        let _ = offset;
        Ok(StorageRun {
            data: true,
            len: max_len,
        })
    }
    /// The host file descriptor behind this storage, for system calls that work on files
    /// rather than buffers (`copy_file_range`, see [`crate::copy`]). `None` (the default) for
    /// storage that is not one host file, or that must see every byte itself (a fault
    /// injector, an encrypting layer): callers then fall back to
    /// [`read_exact_at`](Storage::read_exact_at) and [`write_all_at`](Storage::write_all_at).
    ///
    /// The descriptor is opened for what the storage was opened for (a read-only storage
    /// hands out a read-only descriptor); writes through it land at the same offsets as
    /// [`write_all_at`](Storage::write_all_at).
    fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        None
    }
    /// Starts writing back the completed writes in `[offset, offset + len)` (`len` 0: to the
    /// end) without waiting for them, so that a later [`flush`](Storage::flush) finds less
    /// to do. A hint only: it makes nothing durable, and the default does nothing.
    ///
    /// # Errors
    /// I/O errors starting the writeback; callers may ignore them (the flush still follows).
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
    /// Whether writes fail because the storage is read-only.
    fn is_read_only(&self) -> bool {
        false
    }
    /// Changes the locks this storage holds on its file to those of an opener in `mode`
    /// (`None`: releases them), as when an image is reopened in another mode. Storage that is
    /// not a shared file takes no locks (the default).
    ///
    /// # Errors
    /// [`io::ErrorKind::ResourceBusy`] when another opener's use conflicts with `mode`; the
    /// locks are then those held before the call.
    fn relock(&self, mode: Option<OpenMode>) -> io::Result<()> {
        let _ = mode;
        Ok(())
    }
}

/// How a file is opened by a [`StorageProvider`], and what the opener lets other processes do
/// with it meanwhile (see [`FileStorage`] for the locks).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OpenMode {
    /// Reads only; writes fail. Other processes may read, but not write or resize.
    ReadOnly,
    /// Reads and writes. Other processes may not write or resize, and only readers that allow
    /// writers ([`ReadOnlyShared`](OpenMode::ReadOnlyShared)) may read.
    ReadWrite,
    /// Reads only, and lets other processes write meanwhile (qemu-img's `-U`, force-share):
    /// what is read may change under the reader.
    ReadOnlyShared,
}

impl OpenMode {
    /// The mode for an image opened with `flags`: read-only with
    /// [`READ_ONLY`](OpenFlags::READ_ONLY), shared with
    /// [`FORCE_SHARE`](OpenFlags::FORCE_SHARE).
    ///
    /// # Errors
    /// `InvalidArgument` for `FORCE_SHARE` without `READ_ONLY`: a writer cannot let others
    /// write too (QEMU refuses the same).
    pub fn from_flags(flags: OpenFlags) -> crate::Result<Self> {
        match (
            flags.contains(OpenFlags::READ_ONLY),
            flags.contains(OpenFlags::FORCE_SHARE),
        ) {
            (true, false) => Ok(Self::ReadOnly),
            (true, true) => Ok(Self::ReadOnlyShared),
            (false, false) => Ok(Self::ReadWrite),
            (false, true) => Err(crate::Error::invalid_argument(
                "force-share can only be used on a read-only open",
            )),
        }
    }

    /// Whether writes are refused.
    pub fn is_read_only(self) -> bool {
        self != Self::ReadWrite
    }
}

/// The file system as backends see it: opening, creating, deleting and renaming files, and
/// resolving a path relative to another image.
pub trait StorageProvider: Send + Sync + Debug {
    /// Opens an existing file.
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>>;
    /// Creates a file for reading and writing. Fails with `AlreadyExists` unless `overwrite`.
    fn create(&self, path: &Path, overwrite: bool) -> io::Result<Arc<dyn Storage>>;
    /// Deletes a file.
    fn delete(&self, path: &Path) -> io::Result<()>;
    /// Renames a file.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Whether a file exists.
    fn exists(&self, path: &Path) -> bool;
    /// Resolves `target` relative to the directory holding `base` (an image path).
    fn resolve(&self, base: &Path, target: &Path) -> PathBuf {
        if target.is_absolute() {
            return target.to_path_buf();
        }
        match base.parent() {
            Some(dir) => dir.join(target),
            None => target.to_path_buf(),
        }
    }
    /// A canonical name for `path`, used to detect cycles in disk chains.
    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        Ok(path.to_path_buf())
    }
    /// Whether `a` and `b` name the same existing file. The default compares canonical names.
    fn same_file(&self, a: &Path, b: &Path) -> bool {
        matches!((self.canonicalize(a), self.canonicalize(b)), (Ok(x), Ok(y)) if x == y)
    }
    /// Where a new file that replaces `path` must be renamed to: `path` itself, or the file a
    /// symbolic link at `path` leads to, so the link survives. The default is `path`.
    ///
    /// # Errors
    /// `InvalidInput` when `path` exists and is not a regular file (a device, a FIFO, a
    /// directory, a dangling link): such paths are never replaced.
    fn replace_target(&self, path: &Path) -> io::Result<PathBuf> {
        Ok(path.to_path_buf())
    }
    /// Creates a new, empty file for reading and writing in the directory that holds `target`,
    /// under a name of its own, so that it can later be renamed over `target` (see
    /// [`replace_target`](StorageProvider::replace_target)). Returns its path.
    ///
    /// # Errors
    /// I/O errors creating the file.
    fn create_beside(&self, target: &Path) -> io::Result<(PathBuf, Arc<dyn Storage>)> {
        let temp = temp_name(target);
        let storage = self.create(&temp, false)?;
        Ok((temp, storage))
    }
}

/// A name for a temporary file beside `target`: hidden, unique in this process, and telling
/// what it is for.
fn temp_name(target: &Path) -> PathBuf {
    use std::sync::atomic::{AtomicU64, Ordering};
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let name = target
        .file_name()
        .map_or_else(|| "image".into(), |n| n.to_string_lossy());
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    target.with_file_name(format!(".{name}.vd-{}-{n}.tmp", std::process::id()))
}

fn not_regular(path: &Path, what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{} is {what}, not a regular file; refusing to replace or remove it",
            path.display()
        ),
    )
}

/// What kind of file `meta` describes, in words.
fn file_kind(meta: &std::fs::Metadata) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    let t = meta.file_type();
    if t.is_dir() {
        "a directory"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else {
        "a special file"
    }
}

/// Fails unless `path` is absent or a regular file (links not followed).
fn regular_or_absent(path: &Path) -> io::Result<bool> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.is_file() => Ok(true),
        Ok(m) => Err(not_regular(path, file_kind(&m))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e),
    }
}

/// A file on the host file system.
///
/// [`open`](FileStorage::open) locks the file the way QEMU does (open-file-description
/// byte-range locks on bytes 100+n and 200+n, see the `lock` module), so vd and QEMU exclude
/// each other exactly as two QEMUs do: a writer excludes other writers and readers that do not
/// share writing; readers share with readers; [`OpenMode::ReadOnlyShared`] gets along with
/// everyone. The locks last as long as the file is open.
#[derive(Debug)]
pub struct FileStorage {
    file: File,
    read_only: bool,
    /// The mode the file is locked for (`None`: no locks), restored when a relock fails.
    locked: Mutex<Option<OpenMode>>,
}

impl FileStorage {
    /// Wraps an open file. Takes no lock: see [`relock`](Storage::relock).
    pub fn new(file: File, read_only: bool) -> Self {
        Self::locked_for(file, read_only, None)
    }

    /// Wraps an open file that is already locked for `mode`.
    fn locked_for(file: File, read_only: bool, mode: Option<OpenMode>) -> Self {
        Self {
            file,
            read_only,
            locked: Mutex::new(mode),
        }
    }

    /// Opens `path` in `mode` and locks it for that mode.
    ///
    /// # Errors
    /// Any error of [`OpenOptions::open`]; [`io::ErrorKind::ResourceBusy`] when another
    /// process has the file open in a conflicting mode.
    pub fn open(path: &Path, mode: OpenMode) -> io::Result<Self> {
        let read_only = mode.is_read_only();
        let file = OpenOptions::new().read(true).write(!read_only).open(path)?;
        if file.metadata()?.is_dir() {
            return Err(io::Error::new(
                io::ErrorKind::IsADirectory,
                "is a directory",
            ));
        }
        crate::lock::apply(&file, Some(mode))?;
        Ok(Self::locked_for(file, read_only, Some(mode)))
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "storage is opened read-only",
            ))
        } else {
            Ok(())
        }
    }
}

impl Storage for FileStorage {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.check_writable()?;
        self.file.write_all_at(buf, offset)
    }

    fn len(&self) -> io::Result<u64> {
        use std::io::Seek;
        use std::os::unix::fs::FileTypeExt;
        let meta = self.file.metadata()?;
        if meta.file_type().is_block_device() {
            // A block device's size is where its end is (its metadata says 0); all I/O here is
            // positional, so moving the file position is harmless.
            return (&self.file).seek(io::SeekFrom::End(0));
        }
        Ok(meta.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.file.set_len(len)
    }

    fn flush(&self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        self.file.sync_data()
    }

    fn discard(&self, offset: u64, len: u64) -> io::Result<()> {
        use rustix::fs::{FallocateFlags, fallocate};
        self.check_writable()?;
        let end = offset
            .checked_add(len)
            .ok_or_else(|| io::Error::other("discard range overflows"))?;
        let file_len = self.len()?;
        // Punching past the end would be a no-op; writing zeros there would grow the file.
        let len = end.min(file_len).saturating_sub(offset);
        if len == 0 {
            return Ok(());
        }
        match fallocate(
            &self.file,
            FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
            offset,
            len,
        ) {
            Ok(()) => Ok(()),
            Err(e)
                if e == rustix::io::Errno::OPNOTSUPP
                    || e == rustix::io::Errno::NOSYS
                    || e == rustix::io::Errno::INVAL =>
            {
                self.zero_range(offset, len)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn run_at(&self, offset: u64, max_len: u64) -> io::Result<StorageRun> {
        use rustix::fs::{SeekFrom, seek};
        let len = self.len()?;
        if offset >= len {
            return Ok(StorageRun {
                data: false,
                len: max_len,
            });
        }
        let data_start = match seek(&self.file, SeekFrom::Data(offset)) {
            Ok(p) => p,
            Err(e) if e == rustix::io::Errno::NXIO => len,
            // File systems without SEEK_DATA: everything is data.
            Err(_) => {
                return Ok(StorageRun {
                    data: true,
                    len: max_len,
                });
            }
        };
        if let Some(gap) = data_start.checked_sub(offset).filter(|&g| g > 0) {
            return Ok(StorageRun {
                data: false,
                len: gap.min(max_len),
            });
        }
        let hole_start = match seek(&self.file, SeekFrom::Hole(offset)) {
            Ok(p) => p,
            Err(_) => len,
        };
        Ok(StorageRun {
            data: true,
            len: hole_start.saturating_sub(offset).min(max_len),
        })
    }

    fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        Some(self.file.as_fd())
    }

    /// `sync_file_range(SYNC_FILE_RANGE_WRITE)`: queues the dirty pages of the range for
    /// writing and returns; a read-only storage has nothing to write back.
    fn start_writeback(&self, offset: u64, len: u64) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        let offset = libc::off64_t::try_from(offset).map_err(io::Error::other)?;
        let len = libc::off64_t::try_from(len).map_err(io::Error::other)?;
        #[allow(
            unsafe_code,
            reason = "sync_file_range(2) has no safe wrapper in rustix or std"
        )]
        // SAFETY: `sync_file_range` takes a descriptor and three integers; the descriptor is
        // borrowed from `self.file`, which stays open for the whole call, and no memory is
        // passed to the kernel.
        let rc = unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                offset,
                len,
                libc::SYNC_FILE_RANGE_WRITE,
            )
        };
        if rc == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    fn is_read_only(&self) -> bool {
        self.read_only
    }

    fn relock(&self, mode: Option<OpenMode>) -> io::Result<()> {
        if self.read_only && mode == Some(OpenMode::ReadWrite) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "a read-only file cannot be locked for writing",
            ));
        }
        // Held across the change, so two relocks of one storage do not interleave.
        let mut locked = self.locked.lock();
        match crate::lock::apply(&self.file, mode) {
            Ok(()) => {
                *locked = mode;
                Ok(())
            }
            Err(e) => {
                // `apply` takes the new bytes before it looks for conflicts: put the old set
                // back, as QEMU does, so a refused upgrade leaves no lock behind. The old set
                // was ours until now, so nobody can have taken a conflicting lock meanwhile.
                if let Err(back) = crate::lock::apply(&self.file, *locked) {
                    log::warn!("cannot restore the previous image locks: {back}");
                }
                Err(e)
            }
        }
    }
}

/// A storage object in memory.
#[derive(Debug, Default)]
pub struct MemStorage {
    data: RwLock<Vec<u8>>,
}

impl MemStorage {
    /// An empty storage object.
    pub fn new() -> Self {
        Self::default()
    }

    /// A storage object holding `bytes`.
    pub fn from_bytes(bytes: Vec<u8>) -> Self {
        Self {
            data: RwLock::new(bytes),
        }
    }

    /// A copy of the contents.
    pub fn to_vec(&self) -> Vec<u8> {
        self.data.read().clone()
    }
}

fn range(offset: u64, len: usize) -> io::Result<(usize, usize)> {
    let start = usize::try_from(offset).map_err(io::Error::other)?;
    let end = start
        .checked_add(len)
        .ok_or_else(|| io::Error::other("range overflows"))?;
    Ok((start, end))
}

impl Storage for MemStorage {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        let data = self.data.read();
        let (start, end) = range(offset, buf.len())?;
        let src = data
            .get(start..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        let mut data = self.data.write();
        let (start, end) = range(offset, buf.len())?;
        if data.len() < end {
            data.resize(end, 0);
        }
        if let Some(dst) = data.get_mut(start..end) {
            dst.copy_from_slice(buf);
        }
        Ok(())
    }

    fn len(&self) -> io::Result<u64> {
        Ok(self.data.read().len() as u64)
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let len = usize::try_from(len).map_err(io::Error::other)?;
        self.data.write().resize(len, 0);
        Ok(())
    }

    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
}

/// The host file system through `std::fs`.
#[derive(Debug, Default, Clone, Copy)]
pub struct FileSystem;

impl StorageProvider for FileSystem {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        Ok(Arc::new(FileStorage::open(path, mode)?))
    }

    /// Creates `path`; with `overwrite`, an existing regular file (or the regular file a link
    /// leads to) is locked first and then emptied. Anything else that exists is refused.
    fn create(&self, path: &Path, overwrite: bool) -> io::Result<Arc<dyn Storage>> {
        let mut opts = OpenOptions::new();
        opts.read(true).write(true);
        if overwrite {
            match std::fs::metadata(path) {
                Ok(m) if !m.is_file() => return Err(not_regular(path, file_kind(&m))),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
            opts.create(true);
        } else {
            opts.create_new(true);
        }
        let file = opts.open(path)?;
        // Lock before emptying: a file another process has open must not be truncated.
        crate::lock::apply(&file, Some(OpenMode::ReadWrite))?;
        if overwrite {
            file.set_len(0)?;
        }
        Ok(Arc::new(FileStorage::locked_for(
            file,
            false,
            Some(OpenMode::ReadWrite),
        )))
    }

    /// Deletes a regular file; refuses anything else (a device, a FIFO, a link).
    fn delete(&self, path: &Path) -> io::Result<()> {
        if !regular_or_absent(path)? {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        std::fs::remove_file(path)
    }

    /// Renames a regular file; refuses to replace anything at `to` but a regular file.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        if !regular_or_absent(from)? {
            return Err(io::Error::from(io::ErrorKind::NotFound));
        }
        regular_or_absent(to)?;
        std::fs::rename(from, to)
    }

    fn exists(&self, path: &Path) -> bool {
        path.is_file()
    }

    fn canonicalize(&self, path: &Path) -> io::Result<PathBuf> {
        std::fs::canonicalize(path)
    }

    /// The same device and inode: hard links, symbolic links, bind mounts and `..` are seen
    /// through.
    fn same_file(&self, a: &Path, b: &Path) -> bool {
        use std::os::unix::fs::MetadataExt;
        match (std::fs::metadata(a), std::fs::metadata(b)) {
            (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
            _ => false,
        }
    }

    fn replace_target(&self, path: &Path) -> io::Result<PathBuf> {
        match std::fs::symlink_metadata(path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(path.to_path_buf()),
            Err(e) => Err(e),
            Ok(m) if m.is_file() => Ok(path.to_path_buf()),
            Ok(m) if m.file_type().is_symlink() => match std::fs::canonicalize(path) {
                Ok(target) => {
                    regular_or_absent(&target)?;
                    Ok(target)
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    Err(not_regular(path, "a dangling symbolic link"))
                }
                Err(e) => Err(e),
            },
            Ok(m) => Err(not_regular(path, file_kind(&m))),
        }
    }

    /// A new file beside `target`, locked for writing, with the permissions of the file it
    /// will replace (if any).
    fn create_beside(&self, target: &Path) -> io::Result<(PathBuf, Arc<dyn Storage>)> {
        use std::os::unix::fs::PermissionsExt;
        let temp = temp_name(target);
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&temp)?;
        let kept = std::fs::metadata(target)
            .ok()
            .filter(std::fs::Metadata::is_file)
            .map(|m| m.permissions().mode());
        let locked =
            crate::lock::apply(&file, Some(OpenMode::ReadWrite)).and_then(|()| match kept {
                Some(mode) => file.set_permissions(std::fs::Permissions::from_mode(mode)),
                None => Ok(()),
            });
        if let Err(e) = locked {
            drop(file);
            let _ = std::fs::remove_file(&temp);
            return Err(e);
        }
        Ok((
            temp,
            Arc::new(FileStorage::locked_for(
                file,
                false,
                Some(OpenMode::ReadWrite),
            )),
        ))
    }
}

/// An in-memory file system: a map from paths to storage objects. Tests put any storage (for
/// example a fault-injecting one) at a path with [`MemFileSystem::insert`].
#[derive(Debug, Default)]
pub struct MemFileSystem {
    files: Mutex<HashMap<PathBuf, Arc<dyn Storage>>>,
}

impl MemFileSystem {
    /// An empty file system.
    pub fn new() -> Self {
        Self::default()
    }

    /// Places `storage` at `path`, replacing what was there.
    pub fn insert(&self, path: impl Into<PathBuf>, storage: Arc<dyn Storage>) {
        self.files.lock().insert(path.into(), storage);
    }

    /// The storage at `path`, if any.
    pub fn get(&self, path: &Path) -> Option<Arc<dyn Storage>> {
        self.files.lock().get(path).cloned()
    }

    /// Every path, sorted.
    pub fn paths(&self) -> Vec<PathBuf> {
        let mut v: Vec<_> = self.files.lock().keys().cloned().collect();
        v.sort();
        v
    }
}

/// A read-only view of another storage object.
#[derive(Debug)]
struct ReadOnlyStorage(Arc<dyn Storage>);

impl Storage for ReadOnlyStorage {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.0.read_exact_at(offset, buf)
    }
    fn write_all_at(&self, _offset: u64, _buf: &[u8]) -> io::Result<()> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "storage is opened read-only",
        ))
    }
    fn len(&self) -> io::Result<u64> {
        self.0.len()
    }
    fn set_len(&self, _len: u64) -> io::Result<()> {
        self.write_all_at(0, &[])
    }
    fn flush(&self) -> io::Result<()> {
        Ok(())
    }
    fn discard(&self, _offset: u64, _len: u64) -> io::Result<()> {
        self.write_all_at(0, &[])
    }
    fn run_at(&self, offset: u64, max_len: u64) -> io::Result<StorageRun> {
        self.0.run_at(offset, max_len)
    }
    fn is_read_only(&self) -> bool {
        true
    }
}

impl StorageProvider for MemFileSystem {
    fn open(&self, path: &Path, mode: OpenMode) -> io::Result<Arc<dyn Storage>> {
        let s = self
            .get(path)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        Ok(match mode {
            OpenMode::ReadWrite => s,
            OpenMode::ReadOnly | OpenMode::ReadOnlyShared => Arc::new(ReadOnlyStorage(s)),
        })
    }

    fn create(&self, path: &Path, overwrite: bool) -> io::Result<Arc<dyn Storage>> {
        let mut files = self.files.lock();
        if let Some(existing) = files.get(path) {
            if !overwrite {
                return Err(io::Error::from(io::ErrorKind::AlreadyExists));
            }
            // Keep the object (it may be a test double a test placed there) and empty it.
            existing.set_len(0)?;
            return Ok(existing.clone());
        }
        let s: Arc<dyn Storage> = Arc::new(MemStorage::new());
        files.insert(path.to_path_buf(), s.clone());
        Ok(s)
    }

    fn delete(&self, path: &Path) -> io::Result<()> {
        self.files
            .lock()
            .remove(path)
            .map(|_| ())
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut files = self.files.lock();
        let s = files
            .remove(from)
            .ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))?;
        files.insert(to.to_path_buf(), s);
        Ok(())
    }

    fn exists(&self, path: &Path) -> bool {
        self.files.lock().contains_key(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mem_storage_reads_past_end_as_eof() {
        let s = MemStorage::from_bytes(vec![1, 2, 3]);
        let mut b = [0u8; 4];
        let e = s.read_exact_at(0, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        s.write_all_at(5, &[9]).unwrap();
        assert_eq!(s.to_vec(), vec![1, 2, 3, 0, 0, 9]);
    }

    #[test]
    fn file_storage_punches_holes_and_reports_runs() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let fs = FileSystem;
        let s = fs.create(&path, false).unwrap();
        let mib = 1 << 20;
        s.write_all_at(0, &vec![0xaa; 4 * mib]).unwrap();
        s.discard(mib as u64, 2 * mib as u64).unwrap();
        let mut b = vec![0u8; mib];
        s.read_exact_at(mib as u64, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        s.read_exact_at(3 * mib as u64, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0xaa));
        // tmpfs and ext4 both support holes; the first run is data.
        let run = s.run_at(0, 4 * mib as u64).unwrap();
        assert!(run.data);
        assert!(run.len >= mib as u64);
        // The writer's lock keeps readers out until it closes the file.
        let busy = fs.open(&path, OpenMode::ReadOnly).unwrap_err();
        assert_eq!(busy.kind(), io::ErrorKind::ResourceBusy);
        drop(s);
        let ro = fs.open(&path, OpenMode::ReadOnly).unwrap();
        assert!(ro.write_all_at(0, &[1]).is_err());
        assert!(fs.create(&path, false).is_err());
    }

    #[test]
    fn file_system_never_replaces_or_removes_what_is_not_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let fs = FileSystem;
        let fifo = dir.path().join("fifo");
        assert!(
            std::process::Command::new("mkfifo")
                .arg(&fifo)
                .status()
                .unwrap()
                .success()
        );
        let file = dir.path().join("file");
        std::fs::write(&file, b"keep").unwrap();
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        let dangling = dir.path().join("dangling");
        std::os::unix::fs::symlink(dir.path().join("nowhere"), &dangling).unwrap();

        for p in [&fifo, dir.path()] {
            let e = fs.create(p, true).map(|_| ()).unwrap_err();
            assert_eq!(
                e.kind(),
                io::ErrorKind::InvalidInput,
                "{}: {e}",
                p.display()
            );
            assert_eq!(
                fs.replace_target(p).unwrap_err().kind(),
                io::ErrorKind::InvalidInput
            );
        }
        assert_eq!(
            fs.replace_target(&dangling).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            fs.delete(&fifo).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            fs.delete(&link).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(
            fs.rename(&file, &fifo).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert!(fifo.exists() && link.exists());
        assert_eq!(std::fs::read(&file).unwrap(), b"keep");
        // A link is replaced through: the new file goes beside its target.
        assert_eq!(
            fs.replace_target(&link).unwrap(),
            std::fs::canonicalize(&file).unwrap()
        );
        let (temp, s) = fs.create_beside(&file).unwrap();
        assert_eq!(temp.parent(), file.parent());
        s.write_all_at(0, b"new").unwrap();
        fs.rename(&temp, &file).unwrap();
        assert_eq!(std::fs::read(&link).unwrap(), b"new");
        assert!(
            std::fs::symlink_metadata(&link)
                .unwrap()
                .file_type()
                .is_symlink()
        );
    }

    #[test]
    fn same_file_sees_through_hard_and_symbolic_links() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        std::fs::write(&a, b"x").unwrap();
        let hard = dir.path().join("hard");
        std::fs::hard_link(&a, &hard).unwrap();
        let sym = dir.path().join("sym");
        std::os::unix::fs::symlink("hard", &sym).unwrap();
        let dotted = dir.path().join("sub/../a");
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let b = dir.path().join("b");
        std::fs::write(&b, b"x").unwrap();
        let fs = FileSystem;
        for p in [&hard, &sym, &dotted] {
            assert!(fs.same_file(&a, p), "{}", p.display());
        }
        assert!(!fs.same_file(&a, &b));
        assert!(!fs.same_file(&a, &dir.path().join("missing")));
    }

    #[test]
    fn a_read_only_shared_open_gets_along_with_a_writer() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let fs = FileSystem;
        let w = fs.create(&path, false).unwrap();
        w.write_all_at(0, &[5; 512]).unwrap();
        assert_eq!(
            fs.open(&path, OpenMode::ReadWrite).unwrap_err().kind(),
            io::ErrorKind::ResourceBusy
        );
        let r = fs.open(&path, OpenMode::ReadOnlyShared).unwrap();
        let mut b = [0u8; 512];
        r.read_exact_at(0, &mut b).unwrap();
        assert_eq!(b, [5; 512]);
        assert!(r.write_all_at(0, &[1]).is_err());
    }

    #[test]
    fn mem_file_system_create_keeps_inserted_storage() {
        let fs = MemFileSystem::new();
        let s: Arc<dyn Storage> = Arc::new(MemStorage::from_bytes(vec![7; 10]));
        fs.insert("/a", s.clone());
        let c = fs.create(Path::new("/a"), true).unwrap();
        assert!(Arc::ptr_eq(&s, &c));
        assert_eq!(s.len().unwrap(), 0);
        fs.rename(Path::new("/a"), Path::new("/b")).unwrap();
        assert!(fs.exists(Path::new("/b")) && !fs.exists(Path::new("/a")));
        let ro = fs.open(Path::new("/b"), OpenMode::ReadOnly).unwrap();
        assert!(ro.write_all_at(0, &[1]).is_err());
        fs.delete(Path::new("/b")).unwrap();
        assert!(fs.open(Path::new("/b"), OpenMode::ReadOnly).is_err());
    }

    #[test]
    fn mem_storage_reads_writes_and_resizes_bytes() {
        let s = MemStorage::new();
        assert!(s.is_empty().unwrap());
        s.write_all_at(2, b"abc").unwrap();
        assert_eq!(s.to_vec(), b"\0\0abc");
        s.write_all_at(3, b"XY").unwrap();
        assert_eq!(
            s.to_vec(),
            b"\0\0aXY",
            "an overwrite inside does not grow it"
        );
        let mut b = [0u8; 3];
        s.read_exact_at(2, &mut b).unwrap();
        assert_eq!(&b, b"aXY");
        s.set_len(8).unwrap();
        assert_eq!(s.to_vec(), b"\0\0aXY\0\0\0");
        s.set_len(3).unwrap();
        assert_eq!(s.to_vec(), b"\0\0a");
        // A read that ends one byte past the end fails and leaves the buffer alone.
        let mut b = [0xEE; 2];
        let e = s.read_exact_at(2, &mut b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(b, [0xEE; 2]);
        s.read_exact_at(3, &mut []).unwrap();
        assert_eq!(
            s.read_exact_at(4, &mut [0]).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert!(s.write_all_at(u64::MAX, &[1, 2]).is_err(), "range overflow");
        assert_eq!(s.len().unwrap(), 3);
    }

    #[test]
    fn zero_range_and_the_default_discard_write_zeros_in_place() {
        let s = MemStorage::from_bytes(vec![0xFF; 600 * 1024]);
        s.zero_range(1, 300 * 1024).unwrap();
        let v = s.to_vec();
        assert_eq!(v[0], 0xFF);
        assert!(v[1..=300 * 1024].iter().all(|&b| b == 0));
        assert_eq!(v[300 * 1024 + 1], 0xFF);
        s.discard(599 * 1024, 1024).unwrap();
        let v = s.to_vec();
        assert_eq!(v.len(), 600 * 1024);
        assert!(v[599 * 1024..].iter().all(|&b| b == 0));
        assert_eq!(v[599 * 1024 - 1], 0xFF);
        s.zero_range(10, 0).unwrap();
        assert_eq!(s.to_vec(), v);
        let e = s.zero_range(u64::MAX - 1, 4).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::InvalidInput,
            "a range past 2^64: {e}"
        );
        assert_eq!(s.to_vec(), v);
        assert_eq!(
            s.run_at(5, 77).unwrap(),
            StorageRun {
                data: true,
                len: 77
            },
            "memory has no holes"
        );
        assert!(!s.is_read_only());
        s.relock(Some(OpenMode::ReadWrite)).unwrap();
    }

    #[test]
    fn file_storage_reads_writes_and_sets_len() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"0123456789").unwrap();
        let s = FileStorage::open(&path, OpenMode::ReadWrite).unwrap();
        assert_eq!(s.len().unwrap(), 10);
        s.write_all_at(12, b"ab").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"0123456789\0\0ab");
        let mut b = [0u8; 4];
        s.read_exact_at(8, &mut b).unwrap();
        assert_eq!(&b, b"89\0\0");
        let e = s.read_exact_at(12, &mut [0u8; 3]).unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::UnexpectedEof,
            "a short read is an error"
        );
        s.set_len(4).unwrap();
        assert_eq!(s.len().unwrap(), 4);
        s.set_len(4096).unwrap();
        let mut tail = [0xEE; 8];
        s.read_exact_at(4088, &mut tail).unwrap();
        assert_eq!(tail, [0; 8]);
        s.flush().unwrap();
        assert!(!s.is_read_only());
        assert_eq!(
            s.relock(Some(OpenMode::ReadOnly)).map_err(|e| e.kind()),
            Ok(())
        );
    }

    #[test]
    fn read_only_file_storage_refuses_every_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [5u8; 4096]).unwrap();
        let s = FileStorage::open(&path, OpenMode::ReadOnly).unwrap();
        assert!(s.is_read_only());
        for r in [
            s.write_all_at(0, &[1]),
            s.set_len(0),
            s.discard(0, 4096),
            s.zero_range(0, 10),
        ] {
            assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
        }
        s.flush().unwrap();
        assert_eq!(
            s.relock(Some(OpenMode::ReadWrite)).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
        assert_eq!(std::fs::read(&path).unwrap(), vec![5u8; 4096]);
        let mut b = [0u8; 2];
        s.read_exact_at(4094, &mut b).unwrap();
        assert_eq!(b, [5, 5]);
    }

    #[test]
    fn file_storage_discard_past_the_end_does_not_grow_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [7u8; 8192]).unwrap();
        let s = FileStorage::open(&path, OpenMode::ReadWrite).unwrap();
        s.discard(4096, 1 << 20).unwrap();
        assert_eq!(s.len().unwrap(), 8192);
        let v = std::fs::read(&path).unwrap();
        assert!(v[..4096].iter().all(|&b| b == 7));
        assert!(v[4096..].iter().all(|&b| b == 0));
        s.discard(1 << 20, 4096).unwrap();
        assert_eq!(s.len().unwrap(), 8192);
        assert!(s.discard(u64::MAX, 2).is_err(), "range overflow");
        assert_eq!(
            s.run_at(8192, 10).unwrap(),
            StorageRun {
                data: false,
                len: 10
            },
            "past the end is a hole"
        );
    }

    #[test]
    fn open_modes_follow_the_flags() {
        use crate::OpenFlags;
        for (flags, want) in [
            (OpenFlags::empty(), Some(OpenMode::ReadWrite)),
            (OpenFlags::READ_ONLY, Some(OpenMode::ReadOnly)),
            (
                OpenFlags::READ_ONLY | OpenFlags::FORCE_SHARE,
                Some(OpenMode::ReadOnlyShared),
            ),
            (OpenFlags::FORCE_SHARE, None),
        ] {
            let got = OpenMode::from_flags(flags);
            assert_eq!(got.as_ref().ok().copied(), want, "{flags:?}");
            if let Err(e) = got {
                assert_eq!(e.kind(), crate::ErrorKind::InvalidArgument);
            }
        }
        assert!(!OpenMode::ReadWrite.is_read_only());
        assert!(OpenMode::ReadOnly.is_read_only());
        assert!(OpenMode::ReadOnlyShared.is_read_only());
    }

    #[test]
    fn mem_file_system_paths_and_errors() {
        let fs = MemFileSystem::new();
        let kind = |r: io::Result<Arc<dyn Storage>>| r.map(drop).unwrap_err().kind();
        assert_eq!(
            kind(fs.open(Path::new("/none"), OpenMode::ReadOnly)),
            io::ErrorKind::NotFound
        );
        let a = fs.create(Path::new("/d/a"), false).unwrap();
        a.write_all_at(0, b"hello").unwrap();
        assert_eq!(
            kind(fs.create(Path::new("/d/a"), false)),
            io::ErrorKind::AlreadyExists
        );
        assert_eq!(fs.paths(), vec![PathBuf::from("/d/a")]);
        // Read-only views read through and refuse every change.
        for mode in [OpenMode::ReadOnly, OpenMode::ReadOnlyShared] {
            let ro = fs.open(Path::new("/d/a"), mode).unwrap();
            assert!(ro.is_read_only());
            let mut b = [0u8; 5];
            ro.read_exact_at(0, &mut b).unwrap();
            assert_eq!(&b, b"hello");
            assert_eq!(ro.len().unwrap(), 5);
            assert_eq!(ro.run_at(0, 5).unwrap(), StorageRun { data: true, len: 5 });
            for r in [ro.write_all_at(0, b"x"), ro.set_len(0), ro.discard(0, 1)] {
                assert_eq!(r.unwrap_err().kind(), io::ErrorKind::PermissionDenied);
            }
            ro.flush().unwrap();
        }
        let rw = fs.open(Path::new("/d/a"), OpenMode::ReadWrite).unwrap();
        assert!(Arc::ptr_eq(&rw, &a), "read-write opens share the object");
        assert_eq!(
            fs.resolve(Path::new("/d/a"), Path::new("b")),
            PathBuf::from("/d/b")
        );
        assert_eq!(
            fs.resolve(Path::new("/d/a"), Path::new("/x/b")),
            PathBuf::from("/x/b")
        );
        assert!(fs.same_file(Path::new("/d/a"), Path::new("/d/a")));
        assert!(!fs.same_file(Path::new("/d/a"), Path::new("/d/b")));
        let (temp, s) = fs.create_beside(Path::new("/d/a")).unwrap();
        assert_eq!(temp.parent(), Some(Path::new("/d")));
        assert!(temp.to_string_lossy().contains(".a.vd-"), "{temp:?}");
        assert_eq!(s.len().unwrap(), 0);
        assert!(fs.exists(&temp));
        assert_eq!(
            fs.rename(Path::new("/none"), Path::new("/x"))
                .unwrap_err()
                .kind(),
            io::ErrorKind::NotFound
        );
        assert_eq!(
            fs.delete(Path::new("/none")).unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
    }

    #[test]
    fn a_refused_relock_keeps_the_previous_locks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, [0u8; 512]).unwrap();
        let a = FileStorage::open(&path, OpenMode::ReadWrite).unwrap();
        a.relock(Some(OpenMode::ReadOnly)).unwrap();
        let b = FileStorage::open(&path, OpenMode::ReadOnly).unwrap();
        // `a` cannot become a writer while `b` reads without sharing writes...
        let e = a.relock(Some(OpenMode::ReadWrite)).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        // ...and the refused attempt leaves `a` a plain reader: another reader still fits,
        // and once `b` is gone nobody sees a writer.
        let c = FileStorage::open(&path, OpenMode::ReadOnly).unwrap();
        drop((b, c));
        let d = FileStorage::open(&path, OpenMode::ReadOnly).unwrap();
        drop(d);
        // `a` can now upgrade, and then excludes readers.
        a.relock(Some(OpenMode::ReadWrite)).unwrap();
        let e = FileStorage::open(&path, OpenMode::ReadOnly).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy);
        a.relock(None).unwrap();
        FileStorage::open(&path, OpenMode::ReadWrite).unwrap();
    }
}
