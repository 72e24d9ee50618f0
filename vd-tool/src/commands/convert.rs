//! `vd-tool convert [-f FMT] -O FMT [-o OPTS] [-p] [-S SIZE] [-n [--target-is-zero]] [-B BACKING]
//! SRC DST`: copies the virtual disk with the copy engine ([`vd_core::copy`]), writing only
//! ranges that hold non-zero data, so holes stay holes (`-S`: at which granularity; `-S 0`:
//! every byte). A new image is staged beside the destination, flushed (fdatasync) and only then
//! renamed over it; on any error the staged file is deleted. With `-n` the destination is an
//! existing image, opened for writing (locked) and written in place; nothing is created,
//! renamed or deleted. With `-B` the new image is a differencing image over BACKING and holds
//! only what differs from it.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::copy::{CopyOptions, Destination, Source, ZERO_GRANULE};
use vd_core::{
    Confidence, CreateParams, Disk, FileStorage, Image, ImageFlags, OpenFlags, OpenMode, Registry,
    StagedImage, Storage,
};

use crate::cli::{ConvertArgs, Output};
use crate::commands::{
    AlignedBuf, open_disk_with, options_help, parse_options, parse_size, progress_bar,
    rounding_note,
};
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
    /// An existing image (`-n`), written in place; `bool`: it reads as zeros already
    /// (`--target-is-zero`).
    Existing(Box<dyn Image>, bool),
    /// A block device, written in place (raw output only); `bool`: it reads as zeros already
    /// (`-n --target-is-zero`).
    Device(Arc<dyn Storage>, bool),
    /// `-`, a FIFO or a character device: the raw disk as one stream, in order.
    Stream(Box<dyn Write + Send>),
}

/// The copy engine's options: the defaults (4 workers x 4 MiB requests, writeback hints
/// every 32 MiB), with `copy_file_range` off: `convert` promises that all-zero data is never
/// written into the new image (holes stay holes), a range copied by `copy_file_range` is
/// copied verbatim (zeros included), and on the 2-core ext4 test machine it bought no reliable
/// gain over reads and writes (see the copy engine's commit message).
fn copy_options(sparse_size: u64) -> CopyOptions {
    CopyOptions {
        copy_file_range: false,
        sparse_size,
        ..CopyOptions::default()
    }
}

/// `-S SIZE`: 0, or a power of two from 512 to the copy engine's request size (4 MiB), so that
/// the granules the engine tests for zeros never straddle two requests.
fn parse_sparse_size(s: &str) -> anyhow::Result<u64> {
    let n = parse_size(s).context("-S")?;
    let max = vd_core::copy::DEFAULT_REQUEST_SIZE as u64;
    if n == 0 || (n.is_power_of_two() && (512..=max).contains(&n)) {
        Ok(n)
    } else {
        bail!("-S {s}: use 0 (write every byte) or a power of two from 512 to 4M")
    }
}

/// Copies every range of `src` into `dst` with the copy engine. Returns `(written, skipped)`
/// byte counts.
fn copy(
    src: &Disk,
    sink: &mut Sink,
    sparse_size: u64,
    pb: &crate::progress::Progress,
) -> anyhow::Result<(u64, u64)> {
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
        Sink::Existing(img, zeroed) => Destination::Image {
            image: &**img,
            reads_as_zeros: *zeroed,
            file: None,
        },
        Sink::Device(dev, zeroed) => Destination::Raw {
            storage: &**dev,
            reads_as_zeros: *zeroed,
        },
        Sink::Stream(out) => Destination::Stream(out.as_mut()),
    };
    let stats = vd_core::copy::copy(
        &Source::new(src),
        dst,
        &copy_options(sparse_size),
        &progress,
    )?;
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

/// The image UUID the new image keeps: the source's (its top layer's, for a chain), in every
/// output format that stores one, as Hyper-V and Azure expect of a converted disk. None (a new
/// random one) when the source format has none, or when a layer of the `-B` backing chain has
/// it already: a differencing image must not share its parent's identity.
fn kept_uuid(src: &Disk, backing: Option<&Disk>) -> anyhow::Result<Option<uuid::Uuid>> {
    let id = match src.top().uuid() {
        Ok(id) => id,
        Err(e) if e.kind() == vd_core::ErrorKind::NotSupported => return Ok(None),
        Err(e) => return Err(e).context("reading the source's image UUID"),
    };
    let taken = backing.is_some_and(|chain| {
        chain
            .layers()
            .iter()
            .any(|layer| layer.uuid().is_ok_and(|u| u == id))
    });
    Ok((!id.is_nil() && !taken).then_some(id))
}

/// What to write and where, from the command line.
struct Target<'a> {
    dst: &'a Path,
    format: &'a str,
    /// `-n`: write into the existing image at `dst`.
    existing: bool,
    /// `--target-is-zero`.
    target_is_zero: bool,
    /// `-B`: the backing file and its opened chain.
    backing: Option<(&'a Path, &'a Disk)>,
}

/// `-n`: opens the existing image at `t.dst` for writing (locked), after making sure it is an
/// image of the `-O` format (a file another backend claims is never overwritten as raw) and
/// large enough for the disk.
fn open_existing(registry: &Registry, t: &Target<'_>, size: u64) -> anyhow::Result<Sink> {
    let dst = t.dst;
    let found = registry.probe(dst)?;
    if found.confidence > Confidence::Fallback
        && !found.backend.name().eq_ignore_ascii_case(t.format)
    {
        bail!(
            "{}: -n writes into an existing {} image, but this is a {} image; nothing was \
             written",
            dst.display(),
            t.format,
            found.backend.name()
        );
    }
    let img = registry.open_as(t.format, dst, OpenFlags::empty())?;
    if img.size() < size {
        let held = img.size();
        img.close(false)?;
        bail!(
            "{}: the image holds {held} bytes, less than the disk's {size}; nothing was written \
             (grow it with vd-tool resize, or convert without -n)",
            dst.display()
        );
    }
    Ok(Sink::Existing(img, t.target_is_zero))
}

/// Opens the destination: a new image beside a regular file (or where nothing is yet), an
/// existing image (`-n`), a block device in place, or a stream. Nothing that is not a regular
/// file is ever replaced.
fn open_sink(
    registry: &Registry,
    t: &Target<'_>,
    params: &CreateParams,
    output: Output,
) -> anyhow::Result<Sink> {
    use std::os::unix::fs::FileTypeExt;
    let dst = t.dst;
    let raw_only = |what: &str| -> anyhow::Result<()> {
        if t.backing.is_some() {
            bail!(
                "{}: {what} cannot hold a differencing image (-B); it needs a regular file",
                dst.display()
            );
        }
        if t.format.eq_ignore_ascii_case("raw") {
            Ok(())
        } else {
            bail!(
                "{}: {what} can only receive raw output (-O raw); {} needs a regular file",
                dst.display(),
                t.format
            )
        }
    };
    let not_a_stream = |what: &str| -> anyhow::Result<()> {
        if t.existing {
            bail!(
                "{}: -n writes into an existing image; {what} receives a stream",
                dst.display()
            );
        }
        Ok(())
    };
    if dst.as_os_str() == "-" {
        raw_only("standard output")?;
        not_a_stream("standard output")?;
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
        None if t.existing => bail!(
            "{}: no such image; -n writes into an existing one (without -n, convert creates it)",
            dst.display()
        ),
        None => {}
        Some(t2) if t2.is_file() && t.existing => return open_existing(registry, t, params.size),
        Some(t2) if t2.is_file() => {}
        Some(t2) if t2.is_block_device() => {
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
            return Ok(Sink::Device(Arc::new(dev), t.target_is_zero));
        }
        Some(t2) if t2.is_fifo() || t2.is_char_device() => {
            raw_only(if t2.is_fifo() {
                "a FIFO"
            } else {
                "a character device"
            })?;
            not_a_stream("it")?;
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
        Some(t2) if t2.is_dir() => bail!("{}: is a directory", dst.display()),
        Some(_) => bail!(
            "{}: not a regular file, block device, FIFO or character device; refusing to \
             write it",
            dst.display()
        ),
    }
    let parent = t.backing.map(|(path, disk)| (path, disk.top()));
    Ok(Sink::Image(
        registry.create_staged(t.format, dst, params, parent)?,
    ))
}

/// `-B`: writes into the new differencing image only the granules (of `sparse_size` bytes, 4
/// KiB for 0, on multiples of it on the disk) where the disk differs from the backing chain's;
/// everything else is left to the backing file. Returns `(written, skipped)`.
fn copy_over_backing(
    src: &Disk,
    base: &Disk,
    image: &dyn Image,
    sparse_size: u64,
    pb: &crate::progress::Progress,
) -> anyhow::Result<(u64, u64)> {
    const CHUNK: u64 = vd_core::copy::DEFAULT_REQUEST_SIZE as u64;
    let granule = if sparse_size == 0 {
        ZERO_GRANULE
    } else {
        sparse_size
    };
    let (size, base_size) = (src.size(), base.size());
    let (mut a, mut b) = (
        AlignedBuf::new(CHUNK as usize),
        AlignedBuf::new(CHUNK as usize),
    );
    let mut written = 0u64;
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(CHUNK);
        let len = usize::try_from(n)?;
        let ours = &mut a.as_mut()[..len];
        src.read_at(off, ours)
            .with_context(|| format!("reading the source at {off:#x}"))?;
        let theirs = &mut b.as_mut()[..len];
        // Beyond the backing file's end a differencing image reads as zeros.
        let inside = usize::try_from(base_size.saturating_sub(off).min(n))?;
        base.read_at(off, &mut theirs[..inside])
            .with_context(|| format!("reading the backing file at {off:#x}"))?;
        theirs[inside..].fill(0);
        let mut run: Option<usize> = None;
        let mut at = 0usize;
        while at <= len {
            let end = (at + usize::try_from(granule)?).min(len);
            let differs = at < len && ours[at..end] != theirs[at..end];
            match (differs, run) {
                (true, None) => run = Some(at),
                (false, Some(start)) => {
                    image
                        .write_at(off + start as u64, &ours[start..at])
                        .with_context(|| format!("writing the new image at {off:#x}"))?;
                    written += (at - start) as u64;
                    run = None;
                }
                _ => {}
            }
            if at == len {
                break;
            }
            at = end;
        }
        pb.inc(n);
        off += n;
    }
    Ok((written, size - written))
}

pub fn run(registry: &Registry, args: &ConvertArgs, output: Output) -> anyhow::Result<u8> {
    if options_help::wants_help(args.options.as_deref()) {
        return options_help::print(registry, args.output_format.as_deref(), output);
    }
    let Some(format) = args.output_format.as_deref() else {
        bail!("convert needs -O FORMAT (-o help lists the formats and their options)");
    };
    let (Some(source), Some(destination)) = (args.source.as_deref(), args.destination.as_deref())
    else {
        bail!("convert needs a SOURCE and a DESTINATION");
    };
    // An unknown format is refused before anything is opened (listing the formats).
    registry.backend(format)?;
    let sparse_size = match &args.sparse_size {
        Some(s) => parse_sparse_size(s)?,
        None => ZERO_GRANULE,
    };
    if args.no_create && args.options.is_some() {
        bail!("-o sets the options of a new image; with -n the destination exists already");
    }
    let src = open_disk_with(
        registry,
        source,
        args.share.read_only(),
        args.format.as_deref(),
        &args.parents,
    )?;
    refuse_overwriting_a_source(registry, &src, destination)?;
    let backing = match &args.backing {
        Some(b) => {
            let chain = open_disk_with(registry, b, args.share.read_only(), None, &[])?;
            for layer in chain.layers() {
                if registry.provider().same_file(layer.path(), destination) {
                    bail!(
                        "{}: the destination is the same file as {}, of the backing chain; \
                         refusing to overwrite it",
                        destination.display(),
                        layer.path().display()
                    );
                }
            }
            Some(chain)
        }
        None => None,
    };
    let size = src.size();
    let params = CreateParams {
        size,
        image_flags: if backing.is_some() {
            ImageFlags::DIFF
        } else {
            ImageFlags::empty()
        },
        options: parse_options(args.options.as_deref())?,
        uuid: kept_uuid(&src, backing.as_ref())?,
        ..CreateParams::default()
    };
    let target = Target {
        dst: destination,
        format,
        existing: args.no_create,
        target_is_zero: args.target_is_zero,
        backing: args.backing.as_deref().zip(backing.as_ref()),
    };
    let mut sink = open_sink(registry, &target, &params, output)?;
    if let Sink::Image(img) = &sink
        && let Some(note) = rounding_note(
            destination,
            format,
            &params.options,
            size,
            img.image().size(),
        )
    {
        eprintln!("{note}");
    }
    let mut pb = progress_bar(args.progress, size);
    let copied = match (&sink, &backing) {
        (Sink::Image(img), Some(base)) => {
            copy_over_backing(&src, base, img.image(), sparse_size, &pb)
        }
        _ => copy(&src, &mut sink, sparse_size, &pb),
    };
    pb.finish_and_clear();
    // On an error the staged image is dropped, which deletes it: the destination keeps what
    // it held before. An existing image (-n) keeps what was written: it is closed cleanly.
    let (written, skipped) = match copied {
        Ok(c) => c,
        Err(e) => {
            if let Sink::Existing(img, _) = sink
                && let Err(close) = img.close(false)
            {
                log::warn!("closing {} after an error: {close}", destination.display());
            }
            return Err(e);
        }
    };
    let what = destination.display();
    match sink {
        Sink::Image(img) => img.commit().with_context(|| format!("finishing {what}"))?,
        Sink::Existing(img, _) => img
            .close(false)
            .with_context(|| format!("closing {what}"))?,
        Sink::Device(dev, _) => dev.flush().with_context(|| format!("flushing {what}"))?,
        Sink::Stream(mut out) => out.flush().with_context(|| format!("writing {what}"))?,
    }
    src.close()?;
    if let Some(b) = backing {
        b.close()?;
    }
    let result = ConvertResult {
        source: source.display().to_string(),
        destination: destination.display().to_string(),
        format: format.to_string(),
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
