//! `vd-tool convert [-f FMT] -O FMT [-o OPTS] [-p] SRC DST`: copies the virtual disk, writing
//! only ranges that hold non-zero data, so holes stay holes.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use serde::Serialize;
use vd_core::{
    CreateParams, Disk, ExtentKind, FileStorage, OpenMode, Registry, StagedImage, Storage,
};

use crate::cli::{ConvertArgs, Output};
use crate::commands::{AlignedBuf, open_disk_with, parse_options, progress_bar};
use crate::render::{emit, sanitize};

/// Copy granularity; also the granularity at which all-zero data is detected and skipped.
const CHUNK: u64 = 1 << 20;

#[derive(Debug, Serialize)]
struct ConvertResult {
    source: String,
    destination: String,
    format: String,
    virtual_size: u64,
    bytes_written: u64,
    bytes_skipped: u64,
}

/// Where the converted disk goes.
enum Sink {
    /// A new image, renamed over the destination once complete.
    Image(StagedImage),
    /// A block device, written in place (raw output only).
    Device(Arc<dyn Storage>),
    /// `-`, a FIFO or a character device: the raw disk as one stream, in order.
    Stream(Box<dyn Write>),
}

impl Sink {
    /// Writes `buf` at `pos`. An image skips all-zero chunks (they read as zeros already);
    /// returns whether the bytes were written.
    fn write(&mut self, pos: u64, buf: &[u8]) -> anyhow::Result<bool> {
        match self {
            Self::Image(img) => {
                if buf.iter().all(|&b| b == 0) {
                    return Ok(false);
                }
                img.image().write_at(pos, buf)?;
            }
            Self::Device(dev) => dev.write_all_at(pos, buf)?,
            Self::Stream(out) => out.write_all(buf)?,
        }
        Ok(true)
    }

    /// Makes `[pos, pos + len)` read as zeros; returns whether bytes were written for it.
    fn zeros(&mut self, pos: u64, len: u64) -> anyhow::Result<bool> {
        match self {
            // A new image reads as zeros where nothing was written.
            Self::Image(_) => return Ok(false),
            Self::Device(dev) => dev.zero_range(pos, len)?,
            Self::Stream(out) => {
                let zeros = [0u8; 64 * 1024];
                let mut left = len;
                while left > 0 {
                    let n = left.min(zeros.len() as u64);
                    out.write_all(&zeros[..usize::try_from(n)?])?;
                    left -= n;
                }
            }
        }
        Ok(true)
    }
}

/// Copies every range of `src` into `dst` in order. Returns `(written, skipped)` byte counts.
fn copy(src: &Disk, dst: &mut Sink, pb: &ProgressBar) -> anyhow::Result<(u64, u64)> {
    let size = src.size();
    let mut aligned = AlignedBuf::new(usize::try_from(CHUNK)?);
    let buf = aligned.as_mut();
    let (mut written, mut skipped) = (0u64, 0u64);
    let mut count = |wrote: bool, n: u64| {
        if wrote {
            written += n;
        } else {
            skipped += n;
        }
        pb.inc(n);
    };
    for e in src.map(0, size)? {
        if e.kind != ExtentKind::Data {
            let wrote = dst
                .zeros(e.offset, e.length)
                .with_context(|| format!("writing the destination at offset {:#x}", e.offset))?;
            count(wrote, e.length);
            continue;
        }
        let mut pos = e.offset;
        let end = e.offset + e.length;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let chunk = &mut buf[..usize::try_from(n)?];
            src.read_at(pos, chunk)
                .with_context(|| format!("reading the source at offset {pos:#x}"))?;
            let wrote = dst
                .write(pos, chunk)
                .with_context(|| format!("writing the destination at offset {pos:#x}"))?;
            count(wrote, n);
            pos += n;
        }
    }
    Ok((written, skipped))
}

/// Converting onto the source (or one of its parents) would destroy it before it is read:
/// refused when the destination is the same file (device and inode, so hard links, symbolic
/// links and bind mounts are seen through) as any layer of the source's chain.
fn refuse_overwriting_a_source(registry: &Registry, src: &Disk, dst: &Path) -> anyhow::Result<()> {
    for layer in src.layers() {
        if registry.provider().same_file(layer.path(), dst) {
            bail!(
                "{}: the destination is the same file as the source image {}; refusing to \
                 overwrite it",
                dst.display(),
                layer.path().display()
            );
        }
    }
    Ok(())
}

/// Opens the destination: a new image beside a regular file (or where nothing is yet), a
/// block device in place, or a stream. Nothing that is not a regular file is ever replaced.
fn open_sink(
    registry: &Registry,
    args: &ConvertArgs,
    params: &CreateParams,
    output: Output,
) -> anyhow::Result<Sink> {
    use std::os::unix::fs::FileTypeExt;
    let dst = &args.destination;
    let raw_only = |what: &str| -> anyhow::Result<()> {
        if args.output_format.eq_ignore_ascii_case("raw") {
            Ok(())
        } else {
            bail!(
                "{}: {what} can only receive raw output (-O raw); {} needs a regular file",
                dst.display(),
                args.output_format
            )
        }
    };
    if dst.as_os_str() == "-" {
        raw_only("standard output")?;
        if output == Output::Json {
            bail!("--output json cannot share standard output with the converted disk");
        }
        return Ok(Sink::Stream(Box::new(std::io::BufWriter::with_capacity(
            1 << 20,
            std::io::stdout(),
        ))));
    }
    let kind = match std::fs::metadata(dst) {
        Ok(m) => Some(m.file_type()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("{}", dst.display())),
    };
    match kind {
        None => {}
        Some(t) if t.is_file() => {}
        Some(t) if t.is_block_device() => {
            raw_only("a block device")?;
            let dev = FileStorage::open(dst, OpenMode::ReadWrite).map_err(|e| {
                vd_core::Error::io("cannot open the block device", e).with_path(dst)
            })?;
            let len = dev.len().with_context(|| format!("{}", dst.display()))?;
            if len < params.size {
                bail!(
                    "{}: the block device holds {len} bytes, less than the disk's {}; \
                     nothing was written",
                    dst.display(),
                    params.size
                );
            }
            return Ok(Sink::Device(Arc::new(dev)));
        }
        Some(t) if t.is_fifo() || t.is_char_device() => {
            raw_only(if t.is_fifo() {
                "a FIFO"
            } else {
                "a character device"
            })?;
            if output == Output::Json
                && registry.provider().same_file(dst, Path::new("/dev/stdout"))
            {
                bail!("--output json cannot share standard output with the converted disk");
            }
            // Written as it is: never created, truncated or replaced.
            let out = std::fs::OpenOptions::new()
                .write(true)
                .open(dst)
                .with_context(|| format!("opening {}", dst.display()))?;
            return Ok(Sink::Stream(Box::new(std::io::BufWriter::with_capacity(
                1 << 20,
                out,
            ))));
        }
        Some(t) if t.is_dir() => bail!("{}: is a directory", dst.display()),
        Some(_) => bail!(
            "{}: not a regular file, block device, FIFO or character device; refusing to \
             write it",
            dst.display()
        ),
    }
    Ok(Sink::Image(registry.create_staged(
        &args.output_format,
        dst,
        params,
        None,
    )?))
}

pub fn run(registry: &Registry, args: &ConvertArgs, output: Output) -> anyhow::Result<u8> {
    let src = open_disk_with(
        registry,
        &args.source,
        args.share.read_only(),
        args.format.as_deref(),
        &args.parents,
    )?;
    refuse_overwriting_a_source(registry, &src, &args.destination)?;
    let size = src.size();
    let params = CreateParams {
        size,
        options: parse_options(args.options.as_deref())?,
        ..CreateParams::default()
    };
    let mut sink = open_sink(registry, args, &params, output)?;
    let pb = progress_bar(args.progress, size);
    let copied = copy(&src, &mut sink, &pb);
    pb.finish_and_clear();
    // On an error the staged image is dropped, which deletes it: the destination keeps what
    // it held before.
    let (written, skipped) = copied?;
    let what = args.destination.display();
    match sink {
        Sink::Image(img) => img.commit().with_context(|| format!("finishing {what}"))?,
        Sink::Device(dev) => dev.flush().with_context(|| format!("flushing {what}"))?,
        Sink::Stream(mut out) => out.flush().with_context(|| format!("writing {what}"))?,
    }
    src.close()?;
    let result = ConvertResult {
        source: args.source.display().to_string(),
        destination: args.destination.display().to_string(),
        format: args.output_format.clone(),
        virtual_size: size,
        bytes_written: written,
        bytes_skipped: skipped,
    };
    // Like qemu-img, convert prints nothing on success unless asked for JSON.
    if output == Output::Json {
        emit(output, &result, |_, _| Ok(()))?;
    } else {
        log::info!(
            "{} -> {}: {written} bytes written, {skipped} bytes skipped",
            sanitize(&result.source),
            sanitize(&result.destination)
        );
    }
    Ok(crate::exit::OK)
}
