//! The copy engine (`vd_core::copy`) on real files and real backends: sparse and full sources,
//! a differencing chain flattened, unaligned sizes, zero extents, raw and VHDX destinations,
//! the `copy_file_range` path against the read/write path, and a failed copy that leaves no
//! destination behind.

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use backend_raw as _;
use backend_vhdx as _;
use vd_core::copy::{CopyOptions, CopyStats, Destination, Source, TrackingProvider, copy};
use vd_core::testing::{FaultyStorage, SplitMix64};
use vd_core::{
    CreateParams, Disk, DiskOptions, FileStorage, FileSystem, ImageFlags, MemFileSystem, OpenFlags,
    OpenMode, Registry, Storage, StorageProvider,
};

const MIB: u64 = 1 << 20;

fn params(size: u64, options: &[(&str, &str)]) -> CreateParams {
    CreateParams {
        size,
        options: options
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..CreateParams::default()
    }
}

fn random_bytes(rng: &mut SplitMix64, n: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(n + 8);
    while v.len() < n {
        v.extend_from_slice(&rng.next_u64().to_le_bytes());
    }
    v.truncate(n);
    v
}

/// A registry over the host file system that remembers the files it opens.
fn tracked() -> (Arc<TrackingProvider>, Registry) {
    let t = Arc::new(TrackingProvider::new(Arc::new(FileSystem)));
    let r = Registry::builtin_with_provider(t.clone());
    (t, r)
}

fn open(registry: &Registry, path: &Path) -> Disk {
    Disk::open(registry, path, &DiskOptions::default()).unwrap()
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut v = vec![0u8; disk.size() as usize];
    disk.read_at(0, &mut v).unwrap();
    v
}

fn opts(cfr: bool) -> CopyOptions {
    CopyOptions {
        copy_file_range: cfr,
        writeback_every: 2 * MIB,
        ..CopyOptions::default()
    }
}

/// Copies `disk` into a new raw file at `path` (through a staged raw image, as convert does)
/// and returns the stats.
fn to_raw(registry: &Registry, src: &Source<'_>, path: &Path, o: &CopyOptions) -> CopyStats {
    let staged = registry
        .create_staged("raw", path, &params(src.disk().size(), &[]), None)
        .unwrap();
    let st = copy(
        src,
        Destination::Raw {
            storage: staged.file(),
            reads_as_zeros: true,
        },
        o,
        &|_| {},
    )
    .unwrap();
    staged.commit().unwrap();
    st
}

/// Copies `disk` into a new VHDX at `path` and returns the stats.
fn to_vhdx(registry: &Registry, src: &Source<'_>, path: &Path, block: &str) -> CopyStats {
    let staged = registry
        .create_staged(
            "vhdx",
            path,
            &params(src.disk().size(), &[("block_size", block)]),
            None,
        )
        .unwrap();
    let st = copy(
        src,
        Destination::Image {
            image: staged.image(),
            reads_as_zeros: true,
            file: Some(staged.file()),
        },
        &opts(false),
        &|_| {},
    )
    .unwrap();
    staged.commit().unwrap();
    st
}

fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path).unwrap().blocks() * 512
}

/// A sparse raw file: a few data runs (one unaligned, one all zeros but allocated) over
/// `size` bytes.
fn sparse_raw(path: &Path, size: u64, rng: &mut SplitMix64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::create(path).unwrap();
    f.set_len(size).unwrap();
    f.write_all_at(&random_bytes(rng, 3 * MIB as usize + 123), 5 * MIB + 7)
        .unwrap();
    f.write_all_at(&random_bytes(rng, 4096), 17 * MIB).unwrap();
    f.write_all_at(&vec![0u8; 2 * MIB as usize], 20 * MIB)
        .unwrap();
    f.write_all_at(&random_bytes(rng, 100), size - 100).unwrap();
}

#[test]
fn sparse_and_full_raw_sources_copy_exactly_and_holes_stay_holes() {
    let dir = tempfile::tempdir().unwrap();
    let (t, reg) = tracked();
    let mut rng = SplitMix64::new(1);
    // Unaligned size: not a multiple of a sector or a page.
    let size = 32 * MIB + 4097;
    let sparse = dir.path().join("sparse.raw");
    sparse_raw(&sparse, size, &mut rng);
    let full = dir.path().join("full.raw");
    std::fs::write(&full, random_bytes(&mut rng, size as usize)).unwrap();
    for (src_path, is_sparse) in [(&sparse, true), (&full, false)] {
        let disk = open(&reg, src_path);
        let src = Source::tracked(&disk, &t);
        let want = std::fs::read(src_path).unwrap();
        for cfr in [false, true] {
            let out = dir.path().join(format!("out-{cfr}.raw"));
            let st = to_raw(&reg, &src, &out, &opts(cfr));
            assert_eq!(std::fs::read(&out).unwrap(), want, "{src_path:?} cfr {cfr}");
            assert_eq!(st.written + st.skipped, size);
            if is_sparse {
                // Holes stay holes. Zero data (the allocated 2 MiB of zeros) is skipped by the
                // read path; copy_file_range copies ranges verbatim, zeros included.
                let bound = if cfr { 6 * MIB } else { 4 * MIB };
                assert!(
                    allocated(&out) <= bound,
                    "{} bytes allocated (cfr {cfr}): holes were filled",
                    allocated(&out)
                );
            }
        }
    }
}

#[test]
fn the_copy_file_range_path_and_the_fallback_write_the_same_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (t, reg) = tracked();
    let mut rng = SplitMix64::new(2);
    let size = 24 * MIB + 512;
    // A full VHDX source: its data is plain ranges of its file.
    let src_path = dir.path().join("src.vhdx");
    let img = reg
        .create(
            "vhdx",
            &src_path,
            &params(size, &[("block_size", "2M")]),
            None,
            false,
        )
        .unwrap();
    let data = random_bytes(&mut rng, size as usize);
    img.write_at(0, &data).unwrap();
    img.close(false).unwrap();
    let disk = open(&reg, &src_path);
    let src = Source::tracked(&disk, &t);

    let by_kernel = dir.path().join("cfr.raw");
    let st = to_raw(&reg, &src, &by_kernel, &opts(true));
    assert_eq!(st.file_copied, size, "every byte by copy_file_range");
    let by_buffers = dir.path().join("rw.raw");
    let st = to_raw(&reg, &src, &by_buffers, &opts(false));
    assert_eq!(st.file_copied, 0);
    let a = std::fs::read(&by_kernel).unwrap();
    assert_eq!(a, std::fs::read(&by_buffers).unwrap());
    assert_eq!(a, data);

    // A destination whose descriptor copy_file_range refuses (a character device: EINVAL):
    // the engine falls back to writes through the storage, and the bytes are the same.
    let dst = FileStorage::open(&by_buffers, OpenMode::ReadWrite).unwrap();
    dst.set_len(0).unwrap();
    dst.set_len(size).unwrap();
    let null = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/null")
        .unwrap();
    let odd = ForeignFd {
        inner: dst,
        fd: null,
    };
    let st = copy(
        &src,
        Destination::Raw {
            storage: &odd,
            reads_as_zeros: true,
        },
        &opts(true),
        &|_| {},
    )
    .unwrap();
    assert_eq!(st.file_copied, 0, "copy_file_range refused, never used");
    assert_eq!(st.written, size);
    drop(odd);
    assert_eq!(std::fs::read(&by_buffers).unwrap(), data);
}

/// A storage whose writes go to `inner` but whose descriptor is another file: a stand-in for a
/// destination `copy_file_range` refuses.
#[derive(Debug)]
struct ForeignFd {
    inner: FileStorage,
    fd: std::fs::File,
}

impl Storage for ForeignFd {
    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> io::Result<()> {
        self.inner.read_exact_at(offset, buf)
    }
    fn write_all_at(&self, offset: u64, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all_at(offset, buf)
    }
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
    fn flush(&self) -> io::Result<()> {
        self.inner.flush()
    }
    fn host_fd(&self) -> Option<BorrowedFd<'_>> {
        use std::os::fd::AsFd;
        Some(self.fd.as_fd())
    }
}

/// `p.vhdx` full of random data and its child `c.vhdx` with about a quarter rewritten (some
/// of it with zeros, some unaligned to blocks), and what the chain reads as.
fn chain(reg: &Registry, dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let mut rng = SplitMix64::new(3);
    let parent = dir.join("p.vhdx");
    let p = reg
        .create(
            "vhdx",
            &parent,
            &params(size, &[("block_size", "1M")]),
            None,
            false,
        )
        .unwrap();
    let mut want = random_bytes(&mut rng, size as usize);
    p.write_at(0, &want).unwrap();
    // A zero extent in the parent.
    p.write_zeroes(3 * MIB, 2 * MIB).unwrap();
    want[3 * MIB as usize..5 * MIB as usize].fill(0);
    p.close(false).unwrap();
    let p = reg.open(&parent, OpenFlags::READ_ONLY).unwrap();
    let child = dir.join("c.vhdx");
    let c = reg
        .create(
            "vhdx",
            &child,
            &CreateParams {
                size,
                image_flags: ImageFlags::DIFF,
                options: [("block_size".to_string(), "1M".to_string())].into(),
                ..CreateParams::default()
            },
            Some((&parent, p.as_ref())),
            false,
        )
        .unwrap();
    drop(p);
    let mut rewrite = |off: u64, bytes: Vec<u8>| {
        c.write_at(off, &bytes).unwrap();
        want[off as usize..off as usize + bytes.len()].copy_from_slice(&bytes);
    };
    rewrite(512, random_bytes(&mut rng, MIB as usize));
    rewrite(
        6 * MIB + 4096,
        random_bytes(&mut rng, 2 * MIB as usize + 512),
    );
    rewrite(10 * MIB, vec![0; MIB as usize]);
    rewrite(size - 2048, random_bytes(&mut rng, 2048));
    c.close(false).unwrap();
    (child, want)
}

#[test]
fn a_differencing_chain_is_flattened_to_raw_vhdx_and_a_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (t, reg) = tracked();
    let size = 16 * MIB + 3 * 512;
    let (child, want) = chain(&reg, dir.path(), size);
    let disk = open(&reg, &child);
    assert_eq!(disk.layers().len(), 2);
    assert_eq!(read_all(&disk), want);
    let src = Source::tracked(&disk, &t);
    for cfr in [false, true] {
        let out = dir.path().join("flat.raw");
        let st = to_raw(&reg, &src, &out, &opts(cfr));
        assert_eq!(std::fs::read(&out).unwrap(), want, "cfr {cfr}");
        if cfr {
            assert!(
                st.file_copied > 0,
                "the parent's plain ranges go by copy_file_range"
            );
        }
        // The parent's zero extent is a hole; the zeros the child holds as data are skipped
        // by the read path only (copy_file_range copies ranges verbatim). The slack is the
        // file system's own blocks (the partial last block, extent-tree blocks).
        let holes = if cfr { 2 * MIB } else { 3 * MIB };
        assert!(
            allocated(&out) <= size - holes + 64 * 1024,
            "cfr {cfr}: {} bytes allocated",
            allocated(&out)
        );
    }
    let out = dir.path().join("flat.vhdx");
    let st = to_vhdx(&reg, &src, &out, "1M");
    assert!(
        st.skipped >= 3 * MIB,
        "zero extents and zero data are skipped"
    );
    let flat = open(&reg, &out);
    assert_eq!(flat.layers().len(), 1, "flattened: no parent");
    assert_eq!(read_all(&flat), want);
    let mut stream = Vec::new();
    copy(
        &src,
        Destination::Stream(&mut stream),
        &opts(false),
        &|_| {},
    )
    .unwrap();
    assert_eq!(stream, want);
}

#[test]
fn zero_extents_are_written_as_zeros_where_the_destination_holds_old_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (t, reg) = tracked();
    let (child, want) = chain(&reg, dir.path(), 12 * MIB);
    let disk = open(&reg, &child);
    let src = Source::tracked(&disk, &t);
    // A stand-in for a block device: a file full of old bytes, not read as zeros.
    let dev_path = dir.path().join("dev");
    std::fs::write(&dev_path, vec![0xA5u8; 12 * MIB as usize]).unwrap();
    let dev = FileStorage::open(&dev_path, OpenMode::ReadWrite).unwrap();
    for cfr in [false, true] {
        let st = copy(
            &src,
            Destination::Raw {
                storage: &dev,
                reads_as_zeros: false,
            },
            &opts(cfr),
            &|_| {},
        )
        .unwrap();
        assert_eq!((st.written, st.skipped), (12 * MIB, 0));
        dev.flush().unwrap();
        assert_eq!(std::fs::read(&dev_path).unwrap(), want);
    }
}

#[test]
fn a_read_error_mid_copy_leaves_no_destination() {
    let dir = tempfile::tempdir().unwrap();
    // The source lives in memory on a storage that fails its Nth operation.
    let mem = Arc::new(MemFileSystem::new());
    let src_reg = Registry::builtin_with_provider(mem.clone());
    let size = 16 * MIB;
    {
        let img = src_reg
            .create(
                "vhdx",
                Path::new("/src.vhdx"),
                &params(size, &[]),
                None,
                false,
            )
            .unwrap();
        img.write_at(0, &vec![0x3c; size as usize]).unwrap();
        img.close(false).unwrap();
    }
    let bytes = {
        let s = mem
            .open(Path::new("/src.vhdx"), OpenMode::ReadOnly)
            .unwrap();
        let mut v = vec![0u8; s.len().unwrap() as usize];
        s.read_exact_at(0, &mut v).unwrap();
        v
    };
    let faulty = Arc::new(FaultyStorage::from_bytes(bytes));
    mem.insert("/src.vhdx", faulty.clone());
    let disk = open(&src_reg, Path::new("/src.vhdx"));
    let src = Source::new(&disk);

    let (t, reg) = tracked();
    let dst = dir.path().join("out.raw");
    std::fs::write(&dst, b"the old destination").unwrap();
    for (format, workers) in [("raw", 1), ("raw", 4), ("vhdx", 4)] {
        faulty.fail_nth(6);
        let staged = reg
            .create_staged(format, &dst, &params(size, &[]), None)
            .unwrap();
        let file = t.storage(staged.image().path());
        let o = CopyOptions {
            workers,
            request_size: MIB as usize,
            ..CopyOptions::default()
        };
        let r = match (&file, format) {
            (Some(f), "raw") => copy(
                &src,
                Destination::Raw {
                    storage: f.as_ref(),
                    reads_as_zeros: true,
                },
                &o,
                &|_| {},
            ),
            _ => copy(
                &src,
                Destination::Image {
                    image: staged.image(),
                    reads_as_zeros: true,
                    file: file.as_deref(),
                },
                &o,
                &|_| {},
            ),
        };
        let e = r.expect_err("the read fails");
        assert!(e.context().offset.is_some(), "{e}");
        assert!(format!("{e}").contains("reading the source"), "{e}");
        drop(file);
        drop(staged);
        assert_eq!(std::fs::read(&dst).unwrap(), b"the old destination");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "the staged file is deleted: {left:?}");
    }
}
