//! The FUSE file system: one directory holding `disk` and `pN` files over a shared [`Disk`].

use std::ffi::OsStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, WriteFlags,
};
use vd_core::Disk;

use crate::File;

/// How long the kernel may keep names and attributes: the tree never changes while mounted.
const TTL: Duration = Duration::from_secs(60);

/// Largest read or write served in one request: 1 MiB, what the kernel allows today (256
/// pages). It is the `max_write` the file system asks for at `init`, and reads and writes are
/// cut to it, so a buffer is never sized by a number the file system did not choose.
pub const MAX_REQUEST: u32 = 1 << 20;

/// Who owns the files, and since when.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Owner {
    pub uid: u32,
    pub gid: u32,
    pub time: SystemTime,
}

/// The file system. Inode 1 is the root directory; file `i` of `files` is inode `i + 2`.
pub(crate) struct DiskFs {
    pub disk: Arc<Disk>,
    pub files: Vec<File>,
    pub writable: bool,
    pub owner: Owner,
}

impl DiskFs {
    fn file(&self, ino: INodeNo) -> Option<&File> {
        let index = u64::from(ino).checked_sub(2)?;
        self.files.get(usize::try_from(index).ok()?)
    }

    fn dir_attr(&self) -> FileAttr {
        FileAttr {
            ino: INodeNo::ROOT,
            size: 0,
            blocks: 0,
            atime: self.owner.time,
            mtime: self.owner.time,
            ctime: self.owner.time,
            crtime: self.owner.time,
            kind: FileType::Directory,
            perm: 0o555,
            nlink: 2,
            uid: self.owner.uid,
            gid: self.owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        }
    }

    fn file_attr(&self, index: usize, file: &File) -> FileAttr {
        FileAttr {
            ino: ino_of(index),
            size: file.length,
            blocks: file.length.div_ceil(512),
            perm: if self.writable { 0o644 } else { 0o444 },
            kind: FileType::RegularFile,
            nlink: 1,
            ..self.dir_attr()
        }
    }

    fn attr(&self, ino: INodeNo) -> Option<FileAttr> {
        if ino == INodeNo::ROOT {
            return Some(self.dir_attr());
        }
        let file = self.file(ino)?;
        let index = usize::try_from(u64::from(ino).checked_sub(2)?).ok()?;
        Some(self.file_attr(index, file))
    }

    /// Where `[offset, offset + len)` of `file` lies on the disk, and its length, clipped to
    /// the file's end and to [`MAX_REQUEST`]: `None` when nothing of it lies inside the file.
    fn clip(file: &File, offset: u64, len: usize) -> Option<(u64, usize)> {
        let room = file.length.checked_sub(offset).filter(|&r| r > 0)?;
        let cap = room.min(u64::from(MAX_REQUEST));
        // `cap` is at most MAX_REQUEST, so it fits in usize.
        let len = len.min(usize::try_from(cap).ok()?);
        let at = file.offset.checked_add(offset)?;
        Some((at, len))
    }

    fn flush_disk(&self, reply: ReplyEmpty) {
        if !self.writable {
            return reply.ok();
        }
        match self.disk.flush() {
            Ok(()) => reply.ok(),
            Err(e) => {
                log::warn!("flush: {e}");
                reply.error(Errno::EIO);
            }
        }
    }
}

impl Filesystem for DiskFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        if let Err(max) = config.set_max_write(MAX_REQUEST) {
            log::debug!("max_write {MAX_REQUEST} refused; the kernel's limit is {max}");
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        if parent != INodeNo::ROOT {
            return reply.error(Errno::ENOENT);
        }
        match self
            .files
            .iter()
            .enumerate()
            .find(|(_, f)| OsStr::new(&f.name) == name)
        {
            Some((index, file)) => reply.entry(&TTL, &self.file_attr(index, file), Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino) {
            Some(attr) => reply.attr(&TTL, &attr),
            None => reply.error(Errno::ENOENT),
        }
    }

    /// Only a no-op change is allowed: truncating to the current size (what `O_TRUNC` on an
    /// empty change, or `truncate -s SIZE`, asks). Sizes are the disk's and cannot change.
    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let Some(attr) = self.attr(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        if mode.is_some() || uid.is_some() || gid.is_some() {
            return reply.error(Errno::EPERM);
        }
        match size {
            Some(size) if size != attr.size => reply.error(Errno::EINVAL),
            // Times are not kept; accept the change as `touch` expects.
            _ => reply.attr(&TTL, &attr),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        if self.file(ino).is_none() {
            return reply.error(Errno::ENOENT);
        }
        if !self.writable && flags.acc_mode() != OpenAccMode::O_RDONLY {
            return reply.error(Errno::EROFS);
        }
        // No FOPEN_KEEP_CACHE: each open drops cached pages, so `disk` and a `pN` that alias
        // the same bytes agree again after a reopen.
        reply.opened(FileHandle(0), FopenFlags::empty());
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let Some(file) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        let Ok(size) = usize::try_from(size) else {
            return reply.error(Errno::EINVAL);
        };
        let Some((at, len)) = Self::clip(file, offset, size) else {
            return reply.data(&[]);
        };
        let mut buf = vec![0u8; len];
        match self.disk.read_at(at, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(e) => {
                log::warn!("{}: reading {len} bytes at {offset:#x}: {e}", file.name);
                reply.error(Errno::EIO);
            }
        }
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let Some(file) = self.file(ino) else {
            return reply.error(Errno::ENOENT);
        };
        if !self.writable {
            return reply.error(Errno::EROFS);
        }
        // A write at or past the end has no room: a full device says ENOSPC.
        let Some((at, len)) = Self::clip(file, offset, data.len()) else {
            return reply.error(Errno::ENOSPC);
        };
        // `len` is at most MAX_REQUEST and at most `data.len()`.
        let (Some(data), Ok(written)) = (data.get(..len), u32::try_from(len)) else {
            return reply.error(Errno::EIO);
        };
        match self.disk.write_at(at, data) {
            Ok(()) => reply.written(written),
            Err(e) => {
                log::warn!("{}: writing {len} bytes at {offset:#x}: {e}", file.name);
                reply.error(Errno::EIO);
            }
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.flush_disk(reply);
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.flush_disk(reply);
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        if ino != INodeNo::ROOT {
            return reply.error(Errno::ENOTDIR);
        }
        let entries = [
            (INodeNo::ROOT, FileType::Directory, "."),
            (INodeNo::ROOT, FileType::Directory, ".."),
        ]
        .into_iter()
        .chain(
            self.files
                .iter()
                .enumerate()
                .map(|(i, f)| (ino_of(i), FileType::RegularFile, f.name.as_str())),
        );
        for (next, (ino, kind, name)) in (1u64..).zip(entries) {
            if next <= offset {
                continue;
            }
            if reply.add(ino, next, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    /// No extended attributes (and no "not implemented" for each `ls -l`).
    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let blocks = self.disk.size().div_ceil(4096);
        let files = u64::try_from(self.files.len())
            .unwrap_or(u64::MAX)
            .saturating_add(1);
        reply.statfs(blocks, 0, 0, files, 0, 4096, 255, 4096);
    }
}

/// The inode of file `index`: 1 is the root directory, the files follow from 2.
fn ino_of(index: usize) -> INodeNo {
    INodeNo(u64::try_from(index).unwrap_or(u64::MAX).saturating_add(2))
}
