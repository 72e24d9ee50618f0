//! Many threads on one image: reads, writes, write-zeroes, discards and flushes from several
//! threads at once, checked against a model, over dynamic, fixed and differencing images, on a
//! plain in-memory file and on a fault-injecting one that loses power.
//!
//! The disk is split in two parts:
//! - **Owned chunks** (the first 6 MiB): 4 KiB chunks dealt out round-robin, so each 1 MiB
//!   block holds chunks of every thread and the threads allocate the same blocks at once. A
//!   thread changes only its own chunks and checks every read of them exactly against its own
//!   model.
//! - **A shared part** (the last 2 MiB): every thread writes whole sectors filled with a tag
//!   that names the thread and the write, into overlapping ranges. A read there must show every
//!   sector whole (one tag, or the initial contents), and at the end each sector holds one of the
//!   tags written to it.
//!
//! Flushes race the writes of the other threads. After the threads finish, the whole disk is
//! compared, closed, reopened and compared again; `check` must find nothing. Under power loss,
//! every write a thread finished before one of its flushes returned must survive, and every
//! other sector reads as one of the contents it held.

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

use backend_vhdx::VhdxImage;
use support::{assert_checks_clean, open_rw};
use vd_core::testing::{FaultyStorage, LossMode, SplitMix64, fill_pattern};
use vd_core::{
    CreateParams, Disk, Image, ImageFlags, MemFileSystem, MemStorage, OpenFlags, Registry, Storage,
};

mod support;
const MIB: u64 = 1 << 20;
const SIZE: u64 = 8 * MIB;
const OWNED_END: u64 = 6 * MIB;
const CHUNK: u64 = 4096;
const SECTOR: u64 = 512;
const THREADS: usize = 4;
const OPS: usize = 300;
const CHILD: &str = "/threads/child.vhdx";
const PARENT: &str = "/threads/parent.vhdx";

/// The kinds of image the test runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dynamic,
    Fixed,
    Differencing,
}

// The engine is shared between threads by reference: these must hold, or nothing compiles.
const _: () = {
    const fn send_sync<T: Send + Sync + ?Sized>() {}
    send_sync::<Disk>();
    send_sync::<VhdxImage>();
    send_sync::<dyn Image>();
};

fn us(x: u64) -> usize {
    usize::try_from(x).expect("test offsets fit in usize")
}

/// The thread that owns the chunk holding `offset`.
fn owner(offset: u64) -> usize {
    us(offset / CHUNK) % THREADS
}

/// An image of `kind` on `storage` (the child of a patterned parent for `Differencing`), as a
/// read-write `Disk`, and the disk's initial contents.
fn make(kind: Kind, storage: Arc<dyn Storage>) -> (Arc<MemFileSystem>, Disk, Vec<u8>) {
    let fs = Arc::new(MemFileSystem::new());
    let reg = Registry::builtin_with_provider(fs.clone());
    let mut params = CreateParams {
        size: SIZE,
        options: [("block_size".to_string(), "1M".to_string())].into(),
        ..CreateParams::default()
    };
    if kind == Kind::Fixed {
        params
            .options
            .insert("subformat".to_string(), "fixed".to_string());
    }
    let mut initial = vec![0u8; us(SIZE)];
    let parent = if kind == Kind::Differencing {
        let p = reg
            .create("vhdx", Path::new(PARENT), &params, None, true)
            .expect("create the parent");
        fill_pattern(&mut initial, 0, 0x5c);
        p.write_at(0, &initial).expect("fill the parent");
        p.close(false).expect("close the parent");
        params.image_flags = ImageFlags::DIFF;
        Some(
            reg.open(Path::new(PARENT), OpenFlags::READ_ONLY)
                .expect("open the parent"),
        )
    } else {
        None
    };
    fs.insert(CHILD, storage);
    let child = reg
        .create(
            "vhdx",
            Path::new(CHILD),
            &params,
            parent.as_ref().map(|p| (Path::new(PARENT), p.as_ref())),
            true,
        )
        .expect("create the image");
    child.close(false).expect("close the new image");
    drop(parent);
    let disk = open_rw(&reg, CHILD).expect("open the disk");
    (fs, disk, initial)
}

/// What one thread did to its own chunks.
struct Owned {
    /// The contents of the whole disk as far as this thread's chunks go (other bytes unused).
    model: Vec<u8>,
    /// Per sector of its chunks: the contents when its last successful flush returned.
    durable: HashMap<u64, Vec<u8>>,
    /// Per sector: every content written after that flush (any may have reached the disk).
    since: HashMap<u64, Vec<Vec<u8>>>,
}

impl Owned {
    fn new(initial: &[u8]) -> Self {
        Self {
            model: initial.to_vec(),
            durable: HashMap::new(),
            since: HashMap::new(),
        }
    }

    /// Records new contents of `[offset, offset + data.len())`.
    fn set(&mut self, offset: u64, data: &[u8]) {
        self.model[us(offset)..us(offset) + data.len()].copy_from_slice(data);
        let first = offset / SECTOR;
        let last = (offset + data.len() as u64).div_ceil(SECTOR);
        for s in first..last {
            let sector = self.model[us(s * SECTOR)..us((s + 1) * SECTOR)].to_vec();
            self.since.entry(s).or_default().push(sector);
        }
    }

    /// A flush returned: everything written so far is durable.
    fn flushed(&mut self) {
        for (s, _) in std::mem::take(&mut self.since) {
            self.durable
                .insert(s, self.model[us(s * SECTOR)..us((s + 1) * SECTOR)].to_vec());
        }
    }
}

/// What the threads wrote into the shared part: per sector, every tag written there.
type SharedTags = Mutex<HashMap<u64, BTreeSet<u8>>>;

/// A tag naming thread `t` and its write number `n`: never 0, distinct per thread.
fn tag(t: usize, n: usize) -> u8 {
    u8::try_from(1 + t * 60 + n % 60).expect("tags fit in a byte")
}

/// Checks that every sector of `buf` (read at `offset` in the shared part) is whole: one tag,
/// or the initial contents.
fn check_shared_read(offset: u64, buf: &[u8], initial: &[u8], ctx: &str) {
    for (i, sector) in buf.chunks(us(SECTOR)).enumerate() {
        let at = offset + i as u64 * SECTOR;
        let first = sector[0];
        let whole_tag = first != 0 && sector.iter().all(|&b| b == first);
        let untouched = sector == &initial[us(at)..us(at + SECTOR)];
        assert!(
            whole_tag || untouched,
            "{ctx}: shared sector at {at:#x} is torn or foreign: starts {:02x?}",
            &sector[..8]
        );
    }
}

/// One thread's work: `OPS` random operations on its own chunks and on the shared part.
/// Stops at the first error when `may_fail` (power loss), and returns what it did.
fn worker(
    t: usize,
    disk: &Disk,
    initial: &[u8],
    shared: &SharedTags,
    may_fail: bool,
    kind: Kind,
) -> Owned {
    let mut rng = SplitMix64::new(0x7417_0000 + t as u64);
    let mut own = Owned::new(initial);
    let ctx = format!("{kind:?} thread {t}");
    let own_chunks: Vec<u64> = (0..OWNED_END / CHUNK)
        .map(|c| c * CHUNK)
        .filter(|&c| owner(c) == t)
        .collect();
    for n in 0..OPS {
        let chunk = own_chunks[us(rng.next_u64() % own_chunks.len() as u64)];
        // A sector-aligned piece of the chunk (differencing images track whole sectors; the
        // Disk widens unaligned writes, which would read other sectors of the same chunk only).
        let first = rng.next_u64() % (CHUNK / SECTOR);
        let count = 1 + rng.next_u64() % (CHUNK / SECTOR - first);
        let (off, len) = (chunk + first * SECTOR, count * SECTOR);
        let r = match rng.next_u64() % 10 {
            0..=3 => {
                let mut buf = vec![0u8; us(len)];
                fill_pattern(&mut buf, off, u8::try_from(t * 50 + n % 50).unwrap_or(0));
                let r = disk.write_at(off, &buf);
                if r.is_ok() {
                    own.set(off, &buf);
                }
                r
            }
            4 => {
                let r = disk.write_zeroes(off, len);
                if r.is_ok() {
                    own.set(off, &vec![0u8; us(len)]);
                }
                r
            }
            5 => {
                let r = disk.discard(off, len);
                if r.is_ok() {
                    own.set(off, &vec![0u8; us(len)]);
                }
                r
            }
            6 => {
                let r = disk.flush();
                if r.is_ok() {
                    own.flushed();
                }
                r
            }
            7 => {
                // Overlapping writes of whole tagged sectors into the shared part.
                let sectors = (SIZE - OWNED_END) / SECTOR;
                let s = rng.next_u64() % sectors;
                let k = 1 + rng.next_u64() % 16.min(sectors - s);
                let at = OWNED_END + s * SECTOR;
                let value = tag(t, n);
                {
                    let mut tags = shared.lock().expect("tags lock");
                    for i in 0..k {
                        tags.entry(at + i * SECTOR).or_default().insert(value);
                    }
                }
                disk.write_at(at, &vec![value; us(k * SECTOR)])
            }
            8 => {
                let at = OWNED_END + (rng.next_u64() % ((SIZE - OWNED_END) / CHUNK)) * CHUNK;
                let mut buf = vec![0u8; us(CHUNK)];
                let r = disk.read_at(at, &mut buf);
                if r.is_ok() {
                    check_shared_read(at, &buf, initial, &ctx);
                }
                r
            }
            _ => {
                let mut buf = vec![0u8; us(CHUNK)];
                let r = disk.read_at(chunk, &mut buf);
                if r.is_ok() {
                    assert!(
                        buf == own.model[us(chunk)..us(chunk + CHUNK)],
                        "{ctx}: op {n}: chunk {chunk:#x} does not read as written"
                    );
                }
                r
            }
        };
        if let Err(e) = r {
            assert!(may_fail, "{ctx}: op {n} failed: {e}");
            break;
        }
    }
    own
}

/// Runs the threads on `disk` and returns each one's record.
fn run_threads(
    disk: &Disk,
    initial: &[u8],
    shared: &SharedTags,
    may_fail: bool,
    kind: Kind,
) -> Vec<Owned> {
    let start = Barrier::new(THREADS);
    thread::scope(|s| {
        let handles: Vec<_> = (0..THREADS)
            .map(|t| {
                let start = &start;
                s.spawn(move || {
                    start.wait();
                    worker(t, disk, initial, shared, may_fail, kind)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a worker panicked"))
            .collect()
    })
}

/// Checks a whole-disk read against the threads' records: owned chunks exactly, shared
/// sectors as one of their tags.
fn check_disk(buf: &[u8], owned: &[Owned], initial: &[u8], shared: &SharedTags, ctx: &str) {
    for c in 0..OWNED_END / CHUNK {
        let at = c * CHUNK;
        let want = &owned[owner(at)].model[us(at)..us(at + CHUNK)];
        assert!(
            &buf[us(at)..us(at + CHUNK)] == want,
            "{ctx}: chunk {at:#x} of thread {} differs",
            owner(at)
        );
    }
    let tags = shared.lock().expect("tags lock");
    for s in 0..(SIZE - OWNED_END) / SECTOR {
        let at = OWNED_END + s * SECTOR;
        let sector = &buf[us(at)..us(at + SECTOR)];
        match tags.get(&at) {
            Some(written) => assert!(
                sector.iter().all(|&b| b == sector[0]) && written.contains(&sector[0]),
                "{ctx}: shared sector {at:#x} holds {:02x?}, not one of the tags {written:?}",
                &sector[..8]
            ),
            None => assert!(
                sector == &initial[us(at)..us(at + SECTOR)],
                "{ctx}: shared sector {at:#x} was never written but changed"
            ),
        }
    }
}

fn read_all(disk: &Disk) -> Vec<u8> {
    let mut buf = vec![0u8; us(SIZE)];
    disk.read_at(0, &mut buf).expect("read the whole disk");
    buf
}

/// Reopens the child in `fs` (with its parent) as a read-write disk.
fn reopen(fs: &Arc<MemFileSystem>) -> Disk {
    let reg = Registry::builtin_with_provider(fs.clone());
    open_rw(&reg, CHILD).expect("reopen")
}

fn stress(kind: Kind) {
    let ctx = format!("{kind:?}");
    let (fs, disk, initial) = make(kind, Arc::new(MemStorage::new()));
    let shared = SharedTags::default();
    let owned = run_threads(&disk, &initial, &shared, false, kind);
    check_disk(&read_all(&disk), &owned, &initial, &shared, &ctx);
    assert_checks_clean(disk.top(), &ctx);
    let before = read_all(&disk);
    disk.close().expect("close");
    let again = reopen(&fs);
    assert!(
        read_all(&again) == before,
        "{ctx}: the reopened disk differs"
    );
    assert_checks_clean(again.top(), &ctx);
}

#[test]
fn threads_share_a_dynamic_image() {
    stress(Kind::Dynamic);
}

#[test]
fn threads_share_a_fixed_image() {
    stress(Kind::Fixed);
}

#[test]
fn threads_share_a_differencing_image() {
    stress(Kind::Differencing);
}

/// Power is cut while the threads work; after a restart that loses a seeded subset of the
/// unflushed writes, the image opens, checks clean, and every sector of a thread's chunks
/// reads as it was at that thread's last completed flush or as something it wrote after.
fn power_loss(kind: Kind, cut: u64, mode: LossMode) {
    let ctx = format!("{kind:?} cut after {cut} mutations, {mode:?}");
    let faulty = Arc::new(FaultyStorage::new());
    let (fs, disk, initial) = make(kind, faulty.clone());
    faulty.cut_power_after(cut);
    let shared = SharedTags::default();
    let owned = run_threads(&disk, &initial, &shared, true, kind);
    assert!(
        faulty.is_powered_off(),
        "{ctx}: the cut must fall inside the run"
    );
    faulty.cut_power_now();
    drop(disk);
    let restarted = Arc::new(MemFileSystem::new());
    restarted.insert(CHILD, Arc::new(faulty.restart(mode)));
    if let Some(p) = fs.get(Path::new(PARENT)) {
        restarted.insert(PARENT, p);
    }
    let disk = reopen(&restarted);
    assert_checks_clean(disk.top(), &ctx);
    let buf = read_all(&disk);
    for (t, own) in owned.iter().enumerate() {
        for s in 0..OWNED_END / SECTOR {
            let at = s * SECTOR;
            if owner(at) != t {
                continue;
            }
            let got = &buf[us(at)..us(at + SECTOR)];
            let durable = own
                .durable
                .get(&s)
                .map_or(&initial[us(at)..us(at + SECTOR)], Vec::as_slice);
            let later = own.since.get(&s).map_or(&[][..], Vec::as_slice);
            assert!(
                got == durable || later.iter().any(|l| l.as_slice() == got),
                "{ctx}: sector {at:#x} of thread {t} is neither its flushed contents nor a later write"
            );
        }
    }
}

#[test]
fn threads_survive_power_loss_on_a_dynamic_image() {
    for (cut, seed) in [(40, 1), (150, 2), (400, 3), (900, 4)] {
        for mode in [LossMode::DropAll, LossMode::KeepAll, LossMode::Random(seed)] {
            power_loss(Kind::Dynamic, cut, mode);
        }
    }
}

#[test]
fn threads_survive_power_loss_on_a_differencing_image() {
    for (cut, seed) in [(60, 5), (300, 6), (700, 7)] {
        for mode in [LossMode::DropAll, LossMode::Random(seed)] {
            power_loss(Kind::Differencing, cut, mode);
        }
    }
}

/// Readers never see a block in a place it has left: compaction moves blocks and truncates
/// the file, and growing past the BAT region moves the BAT, while other threads read.
#[test]
fn readers_race_compaction_and_a_bat_move() {
    for round in 0..4u64 {
        let (_fs, disk, _) = make(Kind::Dynamic, Arc::new(MemStorage::new()));
        let mut model = vec![0u8; us(SIZE)];
        fill_pattern(&mut model, 0, 0x3a);
        disk.write_at(0, &model).expect("fill");
        // Holes in the file: whole blocks discarded (they read as zeros from now on).
        for b in [1u64, 3, 4] {
            disk.discard(b * MIB, MIB).expect("discard");
            model[us(b * MIB)..us((b + 1) * MIB)].fill(0);
        }
        disk.flush().expect("flush");
        let done = std::sync::atomic::AtomicBool::new(false);
        thread::scope(|s| {
            for t in 0..3u64 {
                let (disk, model, done) = (&disk, &model, &done);
                s.spawn(move || {
                    let mut rng = SplitMix64::new(round * 10 + t);
                    let mut reads = 0u32;
                    while !done.load(std::sync::atomic::Ordering::Relaxed) || reads < 50 {
                        let at = (rng.next_u64() % (SIZE / CHUNK)) * CHUNK;
                        let mut buf = vec![0u8; us(CHUNK)];
                        disk.read_at(at, &mut buf)
                            .unwrap_or_else(|e| panic!("round {round}: read at {at:#x}: {e}"));
                        assert!(
                            buf == model[us(at)..us(at + CHUNK)],
                            "round {round}: read at {at:#x} returned other data"
                        );
                        reads += 1;
                    }
                });
            }
            disk.top().compact(&mut |_, _| {}).expect("compact");
            // 600 GiB needs a bigger BAT than the region holds: the BAT moves.
            disk.top()
                .resize(600 << 30, &mut |_, _| {})
                .expect("grow past the BAT region");
            done.store(true, std::sync::atomic::Ordering::Relaxed);
        });
        let mut buf = vec![0u8; us(SIZE)];
        disk.read_at(0, &mut buf).expect("read back");
        assert!(buf == model, "round {round}: contents changed");
    }
}
