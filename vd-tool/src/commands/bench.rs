//! `vd-tool bench`: COUNT sequential requests of SIZE bytes, timed, like `qemu-img bench`, so
//! the two can be run on the same image and compared as a ratio.

use std::time::Instant;

use anyhow::bail;
use serde::Serialize;
use vd_core::{OpenFlags, Registry};

use crate::cli::{BenchArgs, Output};
use crate::commands::{AlignedBuf, open_disk_with, parse_size};
use crate::render::emit;

#[derive(Debug, Serialize)]
struct BenchResult {
    mode: &'static str,
    count: u64,
    request_size: u64,
    bytes: u64,
    seconds: f64,
    mib_per_second: f64,
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
    let disk_size = disk.size();
    let mut aligned = AlignedBuf::new(usize::try_from(size)?);
    let buf = aligned.as_mut();
    buf.fill(args.pattern);
    let start = Instant::now();
    let mut pos = offset;
    for i in 0..args.count {
        // Wrap around at the end of the disk, as qemu-img bench does.
        if pos + size > disk_size {
            pos = offset;
        }
        if args.write {
            disk.write_at(pos, buf)?;
            if args.flush_interval > 0 && (i + 1) % args.flush_interval == 0 {
                disk.flush()?;
            }
        } else {
            disk.read_at(pos, buf)?;
        }
        pos += step;
    }
    if args.write {
        disk.flush()?;
    }
    disk.close()?;
    let seconds = start.elapsed().as_secs_f64();
    let bytes = args.count * size;
    let result = BenchResult {
        mode: if args.write { "write" } else { "read" },
        count: args.count,
        request_size: size,
        bytes,
        seconds,
        mib_per_second: bytes as f64 / (1024.0 * 1024.0) / seconds.max(1e-9),
    };
    emit(output, &result, |out, r| {
        writeln!(
            out,
            "Sending {} {} requests, {} bytes each, from offset {offset}, step size {step}",
            r.count, r.mode, r.request_size
        )?;
        writeln!(out, "Run completed in {:.3} seconds.", r.seconds)
    })?;
    Ok(crate::exit::OK)
}
