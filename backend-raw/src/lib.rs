//! # backend-raw
//!
//! Raw disk images: the virtual disk is the file, byte for byte. Raw is the probe's fallback:
//! it claims any readable file with [`Confidence::Fallback`] and the lowest priority, so it is
//! chosen only when no other backend recognises a file.
//!
//! - Create sparse (`set_len`, the default) or preallocated (`ImageFlags::FIXED`, or the option
//!   `preallocation=full`).
//! - Discard and write-zeroes punch holes where the file system supports it and write zeros
//!   otherwise.
//! - [`Image::map`] reports holes (`SEEK_DATA`/`SEEK_HOLE` through the storage), so copies can
//!   skip them.
//! - Geometry is synthesised with the VHD/ATA rule; raw stores no UUIDs or comment.
//!
//! Link it into a binary with `use backend_raw as _;`.

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;
use vd_core::linkme::distributed_slice;
use vd_core::{
    BACKENDS, Backend, ByteSize, Capabilities, CheckReport, Confidence, CreateOption,
    CreateRequest, Error, Extent, Facts, Image, ImageFlags, LayoutRegion, MappedExtent, Mapping,
    OpenFlags, OpenMode, OpenRequest, OptionKind, Progress, RegionKind, Result, Storage,
    StorageProvider, check_range, kind_runs, parse_create_options, push_extent,
};

/// The raw backend.
#[derive(Debug, Default, Clone, Copy)]
pub struct RawBackend;

#[distributed_slice(BACKENDS)]
static RAW: &'static dyn Backend = &RawBackend;

/// The priority raw probes with: the lowest, so every other format is asked first.
pub const RAW_PRIORITY: i32 = i32::MIN;

/// The `-o` options `create` takes: what `-o help` lists and what `create` parses.
pub static CREATE_OPTIONS: &[CreateOption] = &[CreateOption {
    name: "preallocation",
    kind: OptionKind::Choice {
        choices: &["off", "full"],
    },
    default: "off (full for a fixed image)",
    help: "off leaves the file sparse; full writes zeros over the whole disk",
}];

fn io_err(op: &str, path: &Path, e: io::Error) -> Error {
    Error::io(op, e).with_path(path)
}

impl Backend for RawBackend {
    fn name(&self) -> &'static str {
        "raw"
    }

    fn description(&self) -> &'static str {
        "raw disk image (the file is the disk)"
    }

    fn extensions(&self) -> &'static [&'static str] {
        &["img", "raw", "bin", "iso"]
    }

    fn create_options(&self) -> &'static [CreateOption] {
        CREATE_OPTIONS
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities::CREATE_FIXED
            | Capabilities::CREATE_DYNAMIC
            | Capabilities::FILE
            | Capabilities::DISCARD
            | Capabilities::RESIZE
            | Capabilities::REPAIR
            | Capabilities::WRITE
            | Capabilities::MAP
    }

    fn priority(&self) -> i32 {
        RAW_PRIORITY
    }

    /// Any readable file is a raw image, with [`Confidence::Fallback`].
    fn probe(&self, storage: &dyn Storage, path: &Path) -> Result<Confidence> {
        let len = storage.len().map_err(|e| io_err("cannot read", path, e))?;
        let mut probe = [0u8; 512];
        let n = usize::try_from(len.min(probe.len() as u64)).unwrap_or(0);
        storage
            .read_exact_at(0, probe.get_mut(..n).unwrap_or_default())
            .map_err(|e| io_err("cannot read", path, e))?;
        Ok(Confidence::Fallback)
    }

    fn open(&self, req: OpenRequest<'_>) -> Result<Box<dyn Image>> {
        let size = req
            .storage
            .len()
            .map_err(|e| io_err("cannot read the size", req.path, e))?;
        Ok(Box::new(RawImage {
            path: req.path.to_path_buf(),
            storage: RwLock::new(req.storage),
            provider: req.provider,
            flags: RwLock::new(req.flags),
            size: RwLock::new(size),
        }))
    }

    /// Creates a sparse image, or a preallocated one for `ImageFlags::FIXED` or
    /// `preallocation=full`. Options: `preallocation=off|full`.
    fn create(&self, req: CreateRequest<'_>) -> Result<Box<dyn Image>> {
        let params = req.params;
        if params.image_flags.contains(ImageFlags::DIFF) {
            return Err(Error::not_supported("differencing raw images"));
        }
        let given = parse_create_options("raw", CREATE_OPTIONS, &params.options)?;
        let full = match given.choice("preallocation") {
            Some(p) => p == "full",
            None => params.image_flags.contains(ImageFlags::FIXED),
        };
        let s = &req.storage;
        s.set_len(0)
            .and_then(|()| {
                if full {
                    s.zero_range(0, params.size)
                } else {
                    s.set_len(params.size)
                }
            })
            .and_then(|()| s.set_len(params.size))
            .and_then(|()| s.flush())
            .map_err(|e| io_err("cannot create", req.path, e))?;
        Ok(Box::new(RawImage {
            path: req.path.to_path_buf(),
            storage: RwLock::new(req.storage),
            provider: req.provider,
            flags: RwLock::new(OpenFlags::empty()),
            size: RwLock::new(params.size),
        }))
    }
}

/// An opened raw image.
#[derive(Debug)]
pub struct RawImage {
    path: PathBuf,
    storage: RwLock<Arc<dyn Storage>>,
    provider: Arc<dyn StorageProvider>,
    flags: RwLock<OpenFlags>,
    size: RwLock<u64>,
}

impl RawImage {
    fn storage(&self) -> Arc<dyn Storage> {
        self.storage.read().clone()
    }

    fn writable(&self, op: &str) -> Result<()> {
        if self.flags.read().contains(OpenFlags::READ_ONLY) {
            Err(Error::read_only(op).with_path(&self.path))
        } else {
            Ok(())
        }
    }

    fn err(&self, op: &str, e: io::Error) -> Error {
        io_err(op, &self.path, e)
    }
}

impl Image for RawImage {
    fn format(&self) -> &'static str {
        "raw"
    }

    fn path(&self) -> &Path {
        &self.path
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
        check_range(offset, buf.len() as u64, self.size())?;
        self.storage()
            .read_exact_at(offset, buf)
            .map_err(|e| self.err("read failed", e))
    }

    fn write_at(&self, offset: u64, buf: &[u8]) -> Result<()> {
        self.writable("writing")?;
        check_range(offset, buf.len() as u64, self.size())?;
        self.storage()
            .write_all_at(offset, buf)
            .map_err(|e| self.err("write failed", e))
    }

    fn flush(&self) -> Result<()> {
        self.storage()
            .flush()
            .map_err(|e| self.err("flush failed", e))
    }

    fn close(self: Box<Self>, delete: bool) -> Result<()> {
        if !self.flags.read().contains(OpenFlags::READ_ONLY) {
            self.flush()?;
        }
        if delete {
            self.provider
                .delete(&self.path)
                .map_err(|e| self.err("cannot delete", e))?;
        }
        Ok(())
    }

    fn rename(&mut self, new_path: &Path) -> Result<()> {
        self.provider
            .rename(&self.path, new_path)
            .map_err(|e| self.err("cannot rename", e))?;
        self.path = new_path.to_path_buf();
        Ok(())
    }

    fn size(&self) -> u64 {
        *self.size.read()
    }

    fn file_size(&self) -> Result<u64> {
        self.storage()
            .len()
            .map_err(|e| self.err("cannot read the size", e))
    }

    fn image_flags(&self) -> ImageFlags {
        ImageFlags::FIXED
    }

    /// The whole file is payload: byte `n` of the disk is byte `n` of the file.
    fn layout(&self) -> Result<Vec<LayoutRegion>> {
        let len = self.file_size()?;
        Ok(vec![
            LayoutRegion::new(RegionKind::Payload, 0, len).with_label("the virtual disk"),
        ])
    }

    fn open_flags(&self) -> OpenFlags {
        *self.flags.read()
    }

    /// Reopens the file when switching between read-only and read-write.
    fn set_open_flags(&self, flags: OpenFlags) -> Result<()> {
        let old = *self.flags.read();
        if old.contains(OpenFlags::READ_ONLY) != flags.contains(OpenFlags::READ_ONLY) {
            if !old.contains(OpenFlags::READ_ONLY) {
                self.flush()?;
            }
            let mode = OpenMode::from_flags(flags)?;
            let old_mode = OpenMode::from_flags(old)?;
            let mut storage = self.storage.write();
            // Our own locks would conflict with the new open: release them first, and take
            // them back if the new open fails.
            storage
                .relock(None)
                .map_err(|e| self.err("cannot unlock", e))?;
            match self.provider.open(&self.path, mode) {
                Ok(s) => *storage = s,
                Err(e) => {
                    if let Err(back) = storage.relock(Some(old_mode)) {
                        log::warn!("{}: cannot lock again: {back}", self.path.display());
                    }
                    return Err(self.err("cannot reopen", e));
                }
            }
        }
        *self.flags.write() = flags;
        Ok(())
    }

    /// Data runs and holes of the file; holes are [`ExtentKind::Zero`](vd_core::ExtentKind::Zero).
    fn map(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        Ok(kind_runs(self.map_file(offset, len)?))
    }

    /// Data runs (at the identical file offset) and holes ([`Mapping::Zero`]) of the file, found
    /// with `SEEK_DATA`/`SEEK_HOLE` through the storage.
    fn map_file(&self, offset: u64, len: u64) -> Result<Vec<MappedExtent>> {
        check_range(offset, len, self.size())?;
        let s = self.storage();
        let mut out: Vec<MappedExtent> = Vec::new();
        let mut pos = offset;
        // Within the disk: checked above.
        let end = offset.saturating_add(len);
        while let Some(left) = end.checked_sub(pos).filter(|&l| l > 0) {
            let run = s.run_at(pos, left).map_err(|e| self.err("cannot map", e))?;
            // Guard against a storage that reports empty runs: never loop forever.
            let n = run.len.clamp(1, left);
            let mapping = if run.data {
                Mapping::Data {
                    file_offset: Some(pos),
                }
            } else {
                Mapping::Zero
            };
            push_extent(
                &mut out,
                MappedExtent {
                    offset: pos,
                    length: n,
                    mapping,
                },
            );
            // n <= end - pos.
            pos = pos.saturating_add(n);
        }
        Ok(out)
    }

    /// The file is the disk: a plain read of the storage.
    fn read_file_at(&self, file_offset: u64, buf: &mut [u8]) -> Result<()> {
        self.storage()
            .read_exact_at(file_offset, buf)
            .map_err(|e| self.err("read failed", e).with_offset(file_offset))
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        self.writable("discard")?;
        check_range(offset, len, self.size())?;
        self.storage()
            .discard(offset, len)
            .map_err(|e| self.err("discard failed", e))
    }

    fn write_zeroes(&self, offset: u64, len: u64) -> Result<()> {
        self.discard(offset, len)
    }

    /// Sets the file length; shrinking drops the data beyond the new end.
    fn resize(&self, new_size: u64, progress: Progress<'_>) -> Result<()> {
        self.writable("resizing")?;
        self.storage()
            .set_len(new_size)
            .map_err(|e| self.err("resize failed", e))?;
        *self.size.write() = new_size;
        progress(1, 1);
        Ok(())
    }

    /// A raw image has no structure to check; the report is always clean.
    fn repair(&self, _dry_run: bool) -> Result<CheckReport> {
        Ok(CheckReport::default())
    }

    /// A raw image has no structures: its sizes are all there is to describe.
    fn dump(&self) -> Result<Facts> {
        Ok(Facts::new(RawDump {
            virtual_size: ByteSize(self.size()),
            file_size: ByteSize(self.file_size()?),
        }))
    }
}

/// What [`Image::dump`] reports about a raw image.
#[derive(serde::Serialize)]
struct RawDump {
    virtual_size: ByteSize,
    file_size: ByteSize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use vd_core::testing::conformance::{Subject, check_power_loss, check_sequences};
    use vd_core::{
        CreateParams, Disk, ExtentKind, FileSystem, MemFileSystem, MemStorage, Registry,
        merge_extents,
    };

    struct Raw;

    impl Subject for Raw {
        fn name(&self) -> String {
            "raw".into()
        }
        fn create(&self, registry: &Registry, path: &Path, size: u64) -> Result<Disk> {
            let img = registry.create(
                "raw",
                path,
                &CreateParams {
                    size,
                    ..CreateParams::default()
                },
                None,
                true,
            )?;
            Disk::from_layers(vec![img])
        }
    }

    #[test]
    fn conformance_sequences() {
        check_sequences(&Raw, 64);
    }

    #[test]
    fn conformance_power_loss() {
        check_power_loss(&Raw, 64);
    }

    #[test]
    fn probe_says_fallback_for_anything_readable() {
        let s = MemStorage::from_bytes(b"hello".to_vec());
        assert_eq!(
            RawBackend.probe(&s, Path::new("x")).unwrap(),
            Confidence::Fallback
        );
        let empty = MemStorage::new();
        assert_eq!(
            RawBackend.probe(&empty, Path::new("x")).unwrap(),
            Confidence::Fallback
        );
    }

    #[test]
    fn sparse_create_maps_holes_and_discard_punches() {
        let (dir, reg) = file_registry();
        let path = dir.path().join("a.img");
        let mib = 1u64 << 20;
        let img = reg
            .create("raw", &path, &sized(8 * mib), None, false)
            .unwrap();
        assert_eq!(
            img.map(0, 8 * mib).unwrap(),
            vec![Extent {
                offset: 0,
                length: 8 * mib,
                kind: ExtentKind::Zero
            }]
        );
        img.write_at(2 * mib, &vec![0x5a; mib as usize]).unwrap();
        let m = img.map(0, 8 * mib).unwrap();
        assert!(
            m.iter().any(|e| e.kind == ExtentKind::Data
                && e.offset <= 2 * mib
                && e.offset + e.length >= 3 * mib),
            "{m:?}"
        );
        img.discard(2 * mib, mib).unwrap();
        let mut b = vec![1u8; mib as usize];
        img.read_at(2 * mib, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        assert!(
            img.map(0, 8 * mib)
                .unwrap()
                .iter()
                .all(|e| e.kind == ExtentKind::Zero)
        );
        img.close(true).unwrap();
        assert!(!path.exists());
    }

    #[test]
    fn preallocated_create_is_all_data_and_read_only_refuses_writes() {
        let fs = Arc::new(MemFileSystem::new());
        let reg = Registry::builtin_with_provider(fs.clone());
        let params = CreateParams {
            size: 4096,
            image_flags: ImageFlags::FIXED,
            ..CreateParams::default()
        };
        let img = reg
            .create("raw", Path::new("/f"), &params, None, false)
            .unwrap();
        assert_eq!(img.file_size().unwrap(), 4096);
        img.close(false).unwrap();
        let img = reg.open(Path::new("/f"), OpenFlags::READ_ONLY).unwrap();
        let e = img.write_at(0, &[1]).unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::ReadOnly);
        img.set_open_flags(OpenFlags::empty()).unwrap();
        img.write_at(0, &[1]).unwrap();
        let e = img.read_at(4096, &mut [0]).unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::OutOfRange);
        let bad = CreateParams {
            size: 1,
            options: [("colour".to_string(), "red".to_string())].into(),
            ..CreateParams::default()
        };
        let e = reg
            .create("raw", Path::new("/g"), &bad, None, false)
            .unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::InvalidArgument);
        assert!(
            !fs.exists(Path::new("/g")),
            "a failed create leaves no file"
        );
    }

    #[test]
    fn rename_resize_and_geometry() {
        let fs = Arc::new(MemFileSystem::new());
        let reg = Registry::builtin_with_provider(fs.clone());
        let mut img = reg
            .create(
                "raw",
                Path::new("/a"),
                &CreateParams {
                    size: 10 << 20,
                    ..CreateParams::default()
                },
                None,
                false,
            )
            .unwrap();
        img.rename(Path::new("/b")).unwrap();
        assert_eq!(img.path(), Path::new("/b"));
        assert!(fs.exists(Path::new("/b")) && !fs.exists(Path::new("/a")));
        let g = img.pchs_geometry().unwrap();
        assert_eq!((g.cylinders, g.heads, g.sectors), (301, 4, 17));
        img.resize(20 << 20, &mut |_, _| {}).unwrap();
        assert_eq!(img.size(), 20 << 20);
        assert_eq!(
            img.uuid().unwrap_err().kind(),
            vd_core::ErrorKind::NotSupported
        );
        let dump = serde_json::to_value(img.dump().unwrap()).unwrap();
        assert_eq!(dump["virtual_size"], 20 << 20);
    }

    const MIB: u64 = 1 << 20;

    fn file_registry() -> (tempfile::TempDir, Registry) {
        let dir = tempfile::tempdir().unwrap();
        (dir, Registry::builtin_with_provider(Arc::new(FileSystem)))
    }

    fn sized(size: u64) -> CreateParams {
        CreateParams {
            size,
            ..CreateParams::default()
        }
    }

    /// Bytes the file system has allocated for `path`.
    fn allocated(path: &Path) -> u64 {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(path).unwrap().blocks() * 512
    }

    #[test]
    fn probe_reports_read_failures_as_io_errors() {
        let s = vd_core::testing::FaultyStorage::from_bytes(vec![1; 4096]);
        s.fail_nth(0);
        let e = RawBackend.probe(&s, Path::new("/p")).unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::Io);
        assert_eq!(e.context().path.as_deref(), Some(Path::new("/p")));
        assert_eq!(
            RawBackend.probe(&s, Path::new("/p")).unwrap(),
            Confidence::Fallback,
            "the failure was one-off"
        );
        assert_eq!(RawBackend.priority(), RAW_PRIORITY);
        assert_eq!(RawBackend.priority(), i32::MIN);
    }

    #[test]
    fn preallocation_follows_the_flags_and_the_option() {
        let (dir, reg) = file_registry();
        let create = |name: &str, flags: ImageFlags, option: Option<&str>| {
            let path = dir.path().join(name);
            let mut params = CreateParams {
                image_flags: flags,
                ..sized(4 * MIB)
            };
            if let Some(v) = option {
                params.options.insert("preallocation".into(), v.into());
            }
            let img = reg.create("raw", &path, &params, None, false).unwrap();
            assert_eq!(img.size(), 4 * MIB);
            assert_eq!(img.file_size().unwrap(), 4 * MIB);
            let map = img.map(0, 4 * MIB).unwrap();
            img.close(false).unwrap();
            (allocated(&path), map)
        };
        let whole = |kind| {
            vec![Extent {
                offset: 0,
                length: 4 * MIB,
                kind,
            }]
        };
        for (name, flags, option, full) in [
            ("sparse", ImageFlags::empty(), None, false),
            ("fixed", ImageFlags::FIXED, None, true),
            ("full", ImageFlags::empty(), Some("full"), true),
            // The option wins over the flag.
            ("fixed-off", ImageFlags::FIXED, Some("off"), false),
        ] {
            let (bytes, map) = create(name, flags, option);
            if full {
                assert!(bytes >= 4 * MIB, "{name}: {bytes} bytes allocated");
                assert_eq!(map, whole(ExtentKind::Data), "{name}");
            } else {
                assert!(bytes < MIB, "{name}: {bytes} bytes allocated");
                assert_eq!(map, whole(ExtentKind::Zero), "{name}");
            }
        }
        let bad = CreateParams {
            options: [("preallocation".to_string(), "falloc".to_string())].into(),
            ..sized(MIB)
        };
        let e = reg
            .create("raw", &dir.path().join("bad"), &bad, None, false)
            .unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::InvalidArgument);
        assert!(e.to_string().contains("preallocation=falloc"), "{e}");
        let diff = CreateParams {
            image_flags: ImageFlags::DIFF,
            ..sized(MIB)
        };
        let parent = reg
            .open(&dir.path().join("sparse"), OpenFlags::READ_ONLY)
            .unwrap();
        let e = reg
            .create(
                "raw",
                &dir.path().join("diff"),
                &diff,
                Some((&dir.path().join("sparse"), parent.as_ref())),
                false,
            )
            .unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::NotSupported);
        assert!(!dir.path().join("diff").exists());
    }

    #[test]
    fn create_over_an_existing_file_drops_its_old_bytes() {
        let fs = Arc::new(MemFileSystem::new());
        fs.insert("/old", Arc::new(MemStorage::from_bytes(vec![0xCC; 8192])));
        let reg = Registry::builtin_with_provider(fs.clone());
        let img = reg
            .create("raw", Path::new("/old"), &sized(4096), None, true)
            .unwrap();
        let mut b = vec![0xEE; 4096];
        img.read_at(0, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0), "no old byte survives");
        assert_eq!(img.file_size().unwrap(), 4096);
    }

    #[test]
    fn map_reports_data_islands_between_holes() {
        let (dir, reg) = file_registry();
        let path = dir.path().join("m.img");
        let img = reg
            .create("raw", &path, &sized(8 * MIB), None, false)
            .unwrap();
        img.write_at(MIB, &vec![1; MIB as usize]).unwrap();
        img.write_at(5 * MIB, &vec![2; MIB as usize]).unwrap();
        let m = img.map(0, 8 * MIB).unwrap();
        let kinds: Vec<ExtentKind> = m.iter().map(|e| e.kind).collect();
        use ExtentKind::{Data, Zero};
        assert_eq!(kinds, vec![Zero, Data, Zero, Data, Zero], "{m:?}");
        // The extents are contiguous, cover the range, and the data covers what was written.
        let mut pos = 0;
        for e in &m {
            assert_eq!(e.offset, pos);
            pos += e.length;
        }
        assert_eq!(pos, 8 * MIB);
        assert!(m[1].offset <= MIB && m[1].offset + m[1].length >= 2 * MIB);
        assert!(m[3].offset <= 5 * MIB && m[3].offset + m[3].length >= 6 * MIB);
        // An unaligned window is clipped to exactly the range asked for.
        let w = img.map(MIB - 3, 10).unwrap();
        assert_eq!(w.first().map(|e| e.offset), Some(MIB - 3));
        assert_eq!(w.iter().map(|e| e.length).sum::<u64>(), 10);
        assert_eq!(w.last().map(|e| e.kind), Some(Data));
        assert!(img.map(0, 0).unwrap().is_empty());
        assert_eq!(
            img.map(8 * MIB - 1, 2).unwrap_err().kind(),
            vd_core::ErrorKind::OutOfRange
        );

        // write_zeroes punches the island out again.
        img.write_zeroes(MIB, MIB).unwrap();
        let mut b = vec![9u8; MIB as usize];
        img.read_at(MIB, &mut b).unwrap();
        assert!(b.iter().all(|&x| x == 0));
        let kinds: Vec<ExtentKind> = img
            .map(0, 8 * MIB)
            .unwrap()
            .iter()
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, vec![Zero, Data, Zero]);
    }

    #[test]
    fn memory_has_no_holes_so_everything_maps_as_data() {
        let fs = Arc::new(MemFileSystem::new());
        fs.insert("/m", Arc::new(MemStorage::from_bytes(vec![0; 10_000])));
        let reg = Registry::builtin_with_provider(fs);
        let img = reg.open(Path::new("/m"), OpenFlags::READ_ONLY).unwrap();
        assert_eq!(
            img.map(100, 9000).unwrap(),
            vec![Extent {
                offset: 100,
                length: 9000,
                kind: ExtentKind::Data
            }]
        );
    }

    #[test]
    fn resize_shrinks_and_grows_the_file_and_discard_checks_its_range() {
        let fs = Arc::new(MemFileSystem::new());
        let reg = Registry::builtin_with_provider(fs.clone());
        let img = reg
            .create("raw", Path::new("/r"), &sized(8192), None, false)
            .unwrap();
        img.write_at(0, &[0xAB; 8192]).unwrap();
        let mut calls = Vec::new();
        img.resize(4096, &mut |done, total| calls.push((done, total)))
            .unwrap();
        assert_eq!(calls, vec![(1, 1)]);
        assert_eq!((img.size(), img.file_size().unwrap()), (4096, 4096));
        assert_eq!(
            img.read_at(4096, &mut [0]).unwrap_err().kind(),
            vd_core::ErrorKind::OutOfRange
        );
        img.resize(8192, &mut |_, _| {}).unwrap();
        let mut b = vec![0u8; 8192];
        img.read_at(0, &mut b).unwrap();
        assert!(b[..4096].iter().all(|&x| x == 0xAB));
        assert!(
            b[4096..].iter().all(|&x| x == 0),
            "shrinking dropped the data"
        );
        assert_eq!(
            img.discard(8000, 193).unwrap_err().kind(),
            vd_core::ErrorKind::OutOfRange
        );
        img.discard(10, 20).unwrap();
        img.read_at(0, &mut b[..40]).unwrap();
        assert_eq!(&b[..10], &[0xAB; 10]);
        assert_eq!(&b[10..30], &[0; 20]);
        assert_eq!(&b[30..40], &[0xAB; 10]);
        assert!(img.repair(false).unwrap().is_clean());
        img.close(false).unwrap();

        let img = reg.open(Path::new("/r"), OpenFlags::READ_ONLY).unwrap();
        for e in [
            img.resize(1, &mut |_, _| {}).unwrap_err(),
            img.discard(0, 1).unwrap_err(),
            img.write_zeroes(0, 1).unwrap_err(),
        ] {
            assert_eq!(e.kind(), vd_core::ErrorKind::ReadOnly);
        }
        assert_eq!(img.size(), 8192);
    }

    #[test]
    fn a_refused_switch_to_read_write_keeps_the_image_readable() {
        let (dir, reg) = file_registry();
        let path = dir.path().join("l.img");
        std::fs::write(&path, [3u8; 4096]).unwrap();
        let img = reg.open(&path, OpenFlags::READ_ONLY).unwrap();
        // Another reader that does not share writing.
        let other = reg.open(&path, OpenFlags::READ_ONLY).unwrap();
        let e = img.set_open_flags(OpenFlags::empty()).unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::Locked);
        assert_eq!(img.open_flags(), OpenFlags::READ_ONLY);
        let mut b = [0u8; 4];
        img.read_at(4092, &mut b).unwrap();
        assert_eq!(b, [3; 4]);
        // The image still holds its read lock: a writer is refused.
        let e = reg.open(&path, OpenFlags::empty()).unwrap_err();
        assert_eq!(e.kind(), vd_core::ErrorKind::Locked);
        drop(other);
        img.set_open_flags(OpenFlags::empty()).unwrap();
        img.write_at(0, &[9]).unwrap();
        img.flush().unwrap();
        assert_eq!(std::fs::read(&path).unwrap()[0], 9);
    }

    #[test]
    fn map_file_reports_data_at_identical_offsets_and_holes_as_zero() {
        let (dir, reg) = file_registry();
        let path = dir.path().join("m.img");
        let mib = 1u64 << 20;
        let img = reg
            .create("raw", &path, &sized(8 * mib), None, false)
            .unwrap();
        let data: Vec<u8> = (0..mib).map(|i| (i % 251) as u8 + 1).collect();
        img.write_at(3 * mib, &data).unwrap();
        img.flush().unwrap();
        let m = img.map_file(mib, 6 * mib).unwrap();
        // Contiguous, covering the request, merged, and data always at its own offset.
        assert_eq!(m.first().unwrap().offset, mib);
        let last = m.last().unwrap();
        assert_eq!(last.offset + last.length, 7 * mib);
        assert_eq!(merge_extents(m.clone()), m);
        for w in m.windows(2) {
            assert_eq!(w[0].offset + w[0].length, w[1].offset);
        }
        for e in &m {
            match e.mapping {
                Mapping::Data { file_offset } => assert_eq!(file_offset, Some(e.offset)),
                Mapping::Zero => {}
                Mapping::Unallocated => panic!("raw has no parent: {m:?}"),
            }
        }
        // The written MiB is data (the file system may report more around it); the kinds
        // agree with `map`.
        assert!(
            m.iter().any(|e| matches!(e.mapping, Mapping::Data { .. })
                && e.offset <= 3 * mib
                && e.offset + e.length >= 4 * mib),
            "{m:?}"
        );
        let kinds: Vec<Extent> = img.map(mib, 6 * mib).unwrap();
        let from_file: Vec<ExtentKind> = merge_extents(m.iter().map(|e| MappedExtent {
            mapping: match e.mapping {
                Mapping::Data { .. } => Mapping::Data { file_offset: None },
                other => other,
            },
            ..*e
        }))
        .iter()
        .map(|e| e.mapping.kind())
        .collect();
        assert_eq!(kinds.iter().map(|e| e.kind).collect::<Vec<_>>(), from_file);
        let mut got = vec![0u8; 4096];
        img.read_file_at(3 * mib + 4096, &mut got).unwrap();
        assert_eq!(got, data[4096..8192]);
        // Past the end of the file is an error, never zeros.
        assert!(img.read_file_at(8 * mib - 10, &mut got).is_err());
        img.close(true).unwrap();
    }

    #[test]
    fn map_file_on_storage_without_holes_is_one_data_run() {
        let fs = Arc::new(MemFileSystem::new());
        fs.insert("/d", Arc::new(MemStorage::from_bytes(vec![3; 64 << 10])));
        let reg = Registry::builtin_with_provider(fs);
        let img = reg
            .open_as("raw", Path::new("/d"), OpenFlags::READ_ONLY)
            .unwrap();
        assert_eq!(
            img.map_file(4096, 8192).unwrap(),
            vec![MappedExtent {
                offset: 4096,
                length: 8192,
                mapping: Mapping::Data {
                    file_offset: Some(4096)
                }
            }]
        );
        assert_eq!(
            img.map_file(0, (64 << 10) + 1).unwrap_err().kind(),
            vd_core::ErrorKind::OutOfRange
        );
    }
}
