//! `vd-tool bench`: COUNT requests of SIZE bytes, timed, like `qemu-img bench`, so the two can
//! be run on the same image and compared as a ratio.
//!
//! The requests go out in qemu-img bench's order (the first at the offset, each next one a step
//! further, back to the offset when the next would pass the end of the disk). vd's I/O is
//! synchronous, so where qemu keeps DEPTH requests in flight from one thread, vd runs THREADS
//! worker threads over one opened [`Disk`], each with its own page-aligned buffer, taking the
//! next request number from a shared atomic counter when its last request is done.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::{Disk, OpenFlags, Registry};

use crate::cli::{BenchArgs, Output};
use crate::commands::{AlignedBuf, open_disk_with, parse_size};
use crate::render::{emit, plural};

#[derive(Debug, Serialize)]
struct BenchResult {
    mode: &'static str,
    count: u64,
    request_size: u64,
    threads: u16,
    bytes: u64,
    seconds: f64,
    mib_per_second: f64,
}

/// Where request number `i` goes.
#[derive(Debug, Clone, Copy)]
struct Plan {
    offset: u64,
    step: u64,
    /// Requests before the positions repeat (at least 1).
    period: u64,
}

impl Plan {
    /// The plan for requests of `size` bytes from `offset`, `step` apart, on a disk of
    /// `disk_size` bytes.
    fn new(offset: u64, size: u64, step: u64, disk_size: u64) -> anyhow::Result<Self> {
        let Some(room) = disk_size
            .checked_sub(offset)
            .and_then(|r| r.checked_sub(size))
        else {
            bail!(
                "a request of {size} bytes at offset {offset} does not fit in the disk \
                 ({disk_size} bytes)"
            );
        };
        // `room / step` positions after the first fit before the end; `room < 2^64 - 1`
        // because `size > 0`, so the sum cannot overflow.
        let period = match room.checked_div(step) {
            Some(more) => more.saturating_add(1),
            None => 1,
        };
        Ok(Self {
            offset,
            step,
            period,
        })
    }

    /// The offset of request `i`: at most `offset + room`, so inside the disk.
    fn position(&self, i: u64) -> u64 {
        let k = i.checked_rem(self.period).unwrap_or(0);
        // `k < period`, so `k * step <= room` (see `new`).
        self.offset.saturating_add(k.saturating_mul(self.step))
    }
}

/// What the workers share.
struct Job<'a> {
    disk: &'a Disk,
    plan: Plan,
    count: u64,
    write: bool,
    flush_interval: u64,
    /// The next request number to take.
    next: AtomicU64,
    /// Writes completed, for the flush interval.
    written: AtomicU64,
    /// Set when a worker fails, so the others stop.
    failed: AtomicBool,
}

impl Job<'_> {
    /// Takes requests until none are left (or another worker failed).
    fn work(&self, buf: &mut [u8]) -> anyhow::Result<()> {
        while !self.failed.load(Ordering::Relaxed) {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            if i >= self.count {
                break;
            }
            let pos = self.plan.position(i);
            if self.write {
                self.disk
                    .write_at(pos, buf)
                    .with_context(|| format!("writing {} bytes at {pos:#x}", buf.len()))?;
                if self.flush_interval > 0 {
                    let done = self
                        .written
                        .fetch_add(1, Ordering::Relaxed)
                        .saturating_add(1);
                    if done.is_multiple_of(self.flush_interval) {
                        self.disk.flush().context("flushing")?;
                    }
                }
            } else {
                self.disk
                    .read_at(pos, buf)
                    .with_context(|| format!("reading {} bytes at {pos:#x}", buf.len()))?;
            }
        }
        Ok(())
    }

    /// [`work`](Self::work), telling the other workers to stop when it fails.
    fn run(&self, buf: &mut [u8]) -> anyhow::Result<()> {
        let result = self.work(buf);
        if result.is_err() {
            self.failed.store(true, Ordering::Relaxed);
        }
        result
    }
}

pub fn run(registry: &Registry, args: &BenchArgs, output: Output) -> anyhow::Result<u8> {
    let size = parse_size(&args.size)?;
    let step = match &args.step {
        Some(s) => parse_size(s)?,
        None => size,
    };
    let offset = parse_size(&args.offset)?;
    if size == 0 {
        bail!("the request size must not be 0");
    }
    let threads = args.thread_count();
    let flags = if args.write {
        args.share.read_only() - OpenFlags::READ_ONLY
    } else {
        args.share.read_only()
    };
    let disk = open_disk_with(
        registry,
        &args.image.file,
        flags,
        args.image.format.as_deref(),
        &[],
    )?;
    let plan = Plan::new(offset, size, step, disk.size())?;
    let len = usize::try_from(size)?;
    // The buffers are made (and filled) before the clock starts.
    let mut bufs: Vec<AlignedBuf> = (0..threads)
        .map(|_| {
            let mut b = AlignedBuf::new(len);
            b.as_mut().fill(args.pattern);
            b
        })
        .collect();
    let job = Job {
        disk: &disk,
        plan,
        count: args.count,
        write: args.write,
        flush_interval: args.flush_interval,
        next: AtomicU64::new(0),
        written: AtomicU64::new(0),
        failed: AtomicBool::new(false),
    };
    let start = Instant::now();
    let results: Vec<anyhow::Result<()>> = std::thread::scope(|s| {
        let workers: Vec<_> = bufs
            .iter_mut()
            .map(|b| {
                let job = &job;
                s.spawn(move || job.run(b.as_mut()))
            })
            .collect();
        workers
            .into_iter()
            .map(|w| {
                w.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a bench thread panicked")))
            })
            .collect()
    });
    results.into_iter().collect::<anyhow::Result<()>>()?;
    if args.write {
        disk.flush()?;
    }
    disk.close()?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = args.count.saturating_mul(size);
    let result = BenchResult {
        mode: if args.write { "write" } else { "read" },
        count: args.count,
        request_size: size,
        threads,
        bytes,
        seconds,
        mib_per_second: bytes as f64 / (1024.0 * 1024.0) / seconds.max(1e-9),
    };
    emit(output, &result, |out, r| {
        writeln!(
            out,
            "Sending {}, {} each, from offset {offset}, step size {step}",
            plural(
                r.count,
                &format!("{} request", r.mode),
                &format!("{} requests", r.mode)
            ),
            plural(r.request_size, "byte", "bytes")
        )?;
        if r.threads > 1 {
            writeln!(out, "{} threads, one request in flight each", r.threads)?;
        }
        if args.write && args.flush_interval > 0 {
            let every = match args.flush_interval {
                1 => "request".to_string(),
                n => format!("{n} requests"),
            };
            writeln!(out, "Sending flush every {every}")?;
        }
        writeln!(out, "Run completed in {:.3} seconds.", r.seconds)
    })?;
    Ok(crate::exit::OK)
}

#[cfg(test)]
mod tests {
    use super::Plan;

    #[test]
    fn requests_wrap_back_to_the_offset_like_the_sequential_loop() {
        // The loop the plan replaces: step on, back to the offset when the next would not fit.
        for (offset, size, step, disk) in [
            (0, 4096, 4096, 65536),
            (512, 4096, 4096, 65536),
            (0, 1000, 3000, 10_000),
            (0, 4096, 0, 8192),
            (4096, 4096, 1 << 20, 8192),
            (0, 8192, 4096, 8192),
        ] {
            let plan = Plan::new(offset, size, step, disk).unwrap();
            let mut pos = offset;
            for i in 0..100 {
                if pos + size > disk {
                    pos = offset;
                }
                assert_eq!(plan.position(i), pos, "{offset} {size} {step} {disk}: {i}");
                pos += step;
            }
        }
        assert!(Plan::new(0, 8193, 4096, 8192).is_err());
        assert!(Plan::new(8192, 1, 4096, 8192).is_err());
    }
}
