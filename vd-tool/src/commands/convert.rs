//! `vd-tool convert [-f FMT] -O FMT [-o OPTS] [-p] SRC DST`: copies the virtual disk with the
//! copy engine ([`vd_core::copy`]), writing only ranges that hold non-zero data, so holes stay
//! holes. A new image is staged beside the destination, flushed (fdatasync) and only then
//! renamed over it; on any error the staged file is deleted.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::copy::{CopyOptions, Destination, Source};
use vd_core::{CreateParams, Disk, FileStorage, OpenMode, Registry, StagedImage, Storage};

use crate::cli::{ConvertArgs, Output};
use crate::commands::{open_disk_with, parse_options, progress_bar};
use crate::render::{emit, sanitize};

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
    Stream(Box<dyn Write + Send>),
}

/// The copy engine's options: the defaults (4 workers x 4 MiB requests, writeback hints
/// every 32 MiB), with `copy_file_range` off: `convert` promises that all-zero data is never
/// written into the new image (holes stay holes), a range copied by `copy_file_range` is
/// copied verbatim (zeros included), and on the 2-core ext4 test machine it bought no reliable
/// gain over reads and writes (see the copy engine's commit message).
fn copy_options() -> CopyOptions {
    CopyOptions {
        copy_file_range: false,
        ..CopyOptions::default()
    }
}

/// Copies every range of `src` into `dst` with the copy engine. Returns `(written, skipped)`
/// byte counts.
fn copy(src: &Disk, sink: &mut Sink, pb: &crate::progress::Progress) -> anyhow::Result<(u64, u64)> {
    let progress = |n: u64| pb.inc(n);
    let dst = match sink {
        // A raw image is its file: write the file directly, at the same offsets.
        Sink::Image(img) if img.image().format() == "raw" => Destination::Raw {
            storage: img.file(),
            reads_as_zeros: true,
        },
        Sink::Image(img) => Destination::Image {
            image: img.image(),
            reads_as_zeros: true,
            file: Some(img.file()),
        },
        Sink::Device(dev) => Destination::Raw {
            storage: &**dev,
            reads_as_zeros: false,
        },
        Sink::Stream(out) => Destination::Stream(out.as_mut()),
    };
    let stats = vd_core::copy::copy(&Source::new(src), dst, &copy_options(), &progress)?;
    log::debug!(
        "copied: {} bytes written, {} skipped",
        stats.written,
        stats.skipped
    );
    Ok((stats.written, stats.skipped))
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
    let mut pb = progress_bar(args.progress, size);
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
