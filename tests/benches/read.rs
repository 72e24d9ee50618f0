//! 4 KiB random reads: the storage alone, `Image::read_at` on a dynamic VHDX full of data,
//! `Disk::read_at` on the same image, and `Disk::read_at` on a two-layer chain (a differencing
//! child holding about half of the sectors over that image), and `Image::map_file` alone (the
//! lookup a read adds to the storage).
//!
//! Then `Disk::read_at` on that image from 1, 2 and 4 threads sharing one `Disk`: 4 KiB reads
//! at random offsets and 1 MiB sequential reads (each thread in its own part of the disk, into
//! its own page-aligned buffer), reported as throughput; reads scale when the throughput grows
//! with the threads, up to the cores there are.
//!
//! Run with `cargo bench -p vd-tests --bench read`. The goal (issue 8): `Disk` within 1.5x of
//! `Image::read_at`, and `Image::read_at` within 1.5x of the storage alone; issue 10: reads from
//! many threads scale.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::path::Path;
use std::time::{Duration, Instant};

use backend_raw as _;
use backend_vhdx as _;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vd_core::testing::{SplitMix64, fill_pattern};
use vd_core::{
    CreateParams, Disk, DiskOptions, FileStorage, ImageFlags, OpenFlags, OpenMode, Registry,
    Storage,
};

/// Virtual size of the images.
const SIZE: u64 = 64 << 20;
/// Bytes per read.
const READ: usize = 4096;
/// Random offsets cycled through, so the offset generator costs nothing measurable.
const OFFSETS: usize = 4096;
/// Bytes per sequential read.
const SEQ_READ: usize = 1 << 20;
/// Thread counts of the threaded group.
const THREADS: [usize; 3] = [1, 2, 4];

fn create(registry: &Registry, path: &Path, flags: ImageFlags, parent: Option<&Path>) {
    let params = CreateParams {
        size: SIZE,
        image_flags: flags,
        ..CreateParams::default()
    };
    let parent_image = parent.map(|p| registry.open(p, OpenFlags::READ_ONLY).expect("open parent"));
    let image = registry
        .create(
            "vhdx",
            path,
            &params,
            parent.zip(parent_image.as_deref()),
            false,
        )
        .expect("create image");
    image.close(false).expect("close new image");
}

fn write_all(registry: &Registry, path: &Path, seed: u8) {
    let image = registry
        .open(path, OpenFlags::empty())
        .expect("open for writing");
    let mut buf = vec![0u8; 1 << 20];
    for off in (0..SIZE).step_by(buf.len()) {
        fill_pattern(&mut buf, off, seed);
        image.write_at(off, &buf).expect("write");
    }
    image.close(false).expect("close");
}

fn write_half(registry: &Registry, path: &Path, seed: u8) {
    let image = registry
        .open(path, OpenFlags::empty())
        .expect("open for writing");
    let mut rng = SplitMix64::new(7);
    let mut buf = vec![0u8; READ];
    for _ in 0..(SIZE / READ as u64) / 2 {
        let off = rng.next_u64() % (SIZE / READ as u64) * READ as u64;
        fill_pattern(&mut buf, off, seed);
        image.write_at(off, &buf).expect("write");
    }
    image.close(false).expect("close");
}

fn offsets() -> Vec<u64> {
    let mut rng = SplitMix64::new(42);
    (0..OFFSETS)
        .map(|_| rng.next_u64() % (SIZE / READ as u64) * READ as u64)
        .collect()
}

fn bench(c: &mut Criterion) {
    let dir = tempfile::tempdir().expect("temporary directory");
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    let registry = Registry::builtin();
    create(&registry, &base, ImageFlags::empty(), None);
    write_all(&registry, &base, 1);
    create(&registry, &child, ImageFlags::DIFF, Some(&base));
    write_half(&registry, &child, 2);
    let offsets = offsets();
    let mut group = c.benchmark_group("read_4k_random");

    let storage = FileStorage::open(&base, OpenMode::ReadOnly).expect("open file");
    let file_len = storage.len().expect("file length");
    let mut buf = vec![0u8; READ];
    let mut i = 0;
    group.bench_function("storage", |b| {
        b.iter(|| {
            // The same offsets, shifted past the 1 MiB header area into the payload.
            let off = (offsets[i % OFFSETS] + (4 << 20)) % (file_len - READ as u64);
            i += 1;
            storage
                .read_exact_at(black_box(off), &mut buf)
                .expect("read");
        });
    });

    let image = registry
        .open(&base, OpenFlags::READ_ONLY)
        .expect("open image");
    group.bench_function("image", |b| {
        b.iter(|| {
            image
                .read_at(black_box(offsets[i % OFFSETS]), &mut buf)
                .expect("read");
            i += 1;
        });
    });
    // The lookup alone (no payload I/O): what a read adds to the storage.
    group.bench_function("image_map_file", |b| {
        b.iter(|| {
            let m = image
                .map_file(black_box(offsets[i % OFFSETS]), READ as u64)
                .expect("map");
            i += 1;
            black_box(m);
        });
    });
    drop(image);

    let disk = Disk::open(&registry, &base, &DiskOptions::default()).expect("open disk");
    group.bench_function("disk", |b| {
        b.iter(|| {
            disk.read_at(black_box(offsets[i % OFFSETS]), &mut buf)
                .expect("read");
            i += 1;
        });
    });
    drop(disk);

    let chain = Disk::open(&registry, &child, &DiskOptions::default()).expect("open chain");
    assert_eq!(chain.layers().len(), 2);
    group.bench_function("disk_chain", |b| {
        b.iter(|| {
            chain
                .read_at(black_box(offsets[i % OFFSETS]), &mut buf)
                .expect("read");
            i += 1;
        });
    });
    group.finish();
    drop(chain);
    threaded(c, &registry, &base, &offsets);
}

/// A page-aligned buffer of `len` bytes inside `storage` (the kernel copies to page-aligned
/// memory faster, and vd-tool reads into such buffers).
fn aligned(storage: &mut Vec<u8>, len: usize) -> &mut [u8] {
    *storage = vec![0u8; len + 4096];
    let start = storage.as_ptr().align_offset(4096).min(4096);
    &mut storage[start..start + len]
}

/// `iters` reads of `len` bytes split over `threads` threads sharing `disk`; thread `t` reads
/// `at(t, j)` for its `j`-th read. Returns the wall time of the whole run.
fn run_threads(
    disk: &Disk,
    threads: usize,
    iters: u64,
    len: usize,
    at: &(dyn Fn(usize, u64) -> u64 + Sync),
) -> Duration {
    run_reads(threads, iters, len, &|t, j, buf| {
        disk.read_at(black_box(at(t, j)), buf).expect("read");
    })
}

/// `iters` calls of `read(thread, j, buffer)` split over `threads` threads, each with its own
/// page-aligned buffer of `len` bytes. Returns the wall time of the whole run.
fn run_reads(
    threads: usize,
    iters: u64,
    len: usize,
    read: &(dyn Fn(usize, u64, &mut [u8]) + Sync),
) -> Duration {
    let mut storage: Vec<Vec<u8>> = vec![Vec::new(); threads];
    let mut bufs: Vec<&mut [u8]> = storage.iter_mut().map(|s| aligned(s, len)).collect();
    let per_thread = iters.div_ceil(threads as u64);
    let start = Instant::now();
    std::thread::scope(|s| {
        for (t, buf) in bufs.iter_mut().enumerate() {
            let n = per_thread.min(iters.saturating_sub(per_thread * t as u64));
            s.spawn(move || {
                for j in 0..n {
                    read(t, j, buf);
                }
            });
        }
    });
    start.elapsed()
}

/// `Disk::read_at` from 1, 2 and 4 threads sharing one `Disk`.
fn threaded(c: &mut Criterion, registry: &Registry, base: &Path, offsets: &[u64]) {
    let disk = Disk::open(registry, base, &DiskOptions::default()).expect("open disk");
    let mut group = c.benchmark_group("disk_threads");
    group.throughput(Throughput::Bytes(READ as u64));
    // The control: the same reads from the file alone (offsets shifted into the payload, as in
    // the single-threaded group), so what the machine allows shows beside what `Disk` gets.
    let storage = FileStorage::open(base, OpenMode::ReadOnly).expect("open file");
    let file_len = storage.len().expect("file length");
    for threads in THREADS {
        let at = |t: usize, j: u64| {
            (offsets[(t * OFFSETS / threads + j as usize) % OFFSETS] + (4 << 20))
                % (file_len - READ as u64)
        };
        group.bench_with_input(
            BenchmarkId::new("storage_4k_random", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    run_reads(threads, iters, READ, &|t, j, buf| {
                        storage
                            .read_exact_at(black_box(at(t, j)), buf)
                            .expect("read");
                    })
                });
            },
        );
    }
    for threads in THREADS {
        // Each thread starts at its own place in the offset table.
        let at = |t: usize, j: u64| offsets[(t * OFFSETS / threads + j as usize) % OFFSETS];
        group.bench_with_input(
            BenchmarkId::new("read_4k_random", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(&disk, threads, iters, READ, &at)),
        );
    }
    group.throughput(Throughput::Bytes(SEQ_READ as u64));
    let chunks = SIZE / SEQ_READ as u64;
    for threads in THREADS {
        // Thread `t` reads its own part of the disk in order, wrapping within the disk.
        let at =
            |t: usize, j: u64| (t as u64 * chunks / threads as u64 + j) % chunks * SEQ_READ as u64;
        group.bench_with_input(
            BenchmarkId::new("read_1m_sequential", threads),
            &threads,
            |b, &threads| b.iter_custom(|iters| run_threads(&disk, threads, iters, SEQ_READ, &at)),
        );
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
