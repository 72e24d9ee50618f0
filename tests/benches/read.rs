//! 4 KiB random reads: the storage alone, `Image::read_at` on a dynamic VHDX full of data,
//! `Disk::read_at` on the same image, and `Disk::read_at` on a two-layer chain (a differencing
//! child holding about half of the sectors over that image), and `Image::map_file` alone (the
//! lookup a read adds to the storage).
//!
//! Run with `cargo bench -p vd-tests --bench read`. The goal (issue 8): `Disk` within 1.5x of
//! `Image::read_at`, and `Image::read_at` within 1.5x of the storage alone.

#![allow(missing_docs)] // criterion's macros generate undocumented items

use std::hint::black_box;
use std::path::Path;

use backend_raw as _;
use backend_vhdx as _;
use criterion::{Criterion, criterion_group, criterion_main};
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
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .sample_size(30)
        .warm_up_time(std::time::Duration::from_secs(1))
        .measurement_time(std::time::Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
