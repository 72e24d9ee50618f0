//! `vd-tool convert [-f FMT] -O FMT [-o OPTS] [-p] SRC DST`: copies the virtual disk, writing
//! only ranges that hold non-zero data, so holes stay holes.

use std::io::Write;

use std::path::Path;

use anyhow::{Context, bail};
use indicatif::ProgressBar;
use serde::Serialize;
use vd_core::{CreateParams, Disk, ExtentKind, Image, Registry};

use crate::cli::{ConvertArgs, Output};
use crate::commands::{AlignedBuf, open_disk, parse_options, progress_bar};
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

/// Copies every data range of `src` into `dst`, skipping all-zero chunks. Returns
/// `(written, skipped)` byte counts.
fn copy(src: &Disk, dst: &dyn Image, pb: &ProgressBar) -> anyhow::Result<(u64, u64)> {
    let size = src.size();
    let mut aligned = AlignedBuf::new(usize::try_from(CHUNK)?);
    let buf = aligned.as_mut();
    let (mut written, mut skipped) = (0u64, 0u64);
    for e in src.map(0, size)? {
        if e.kind != ExtentKind::Data {
            skipped += e.length;
            pb.inc(e.length);
            continue;
        }
        let mut pos = e.offset;
        let end = e.offset + e.length;
        while pos < end {
            let n = (end - pos).min(CHUNK);
            let chunk = &mut buf[..usize::try_from(n)?];
            src.read_at(pos, chunk)
                .with_context(|| format!("reading the source at offset {pos:#x}"))?;
            if chunk.iter().all(|&b| b == 0) {
                skipped += n;
            } else {
                dst.write_at(pos, chunk)
                    .with_context(|| format!("writing the destination at offset {pos:#x}"))?;
                written += n;
            }
            pos += n;
            pb.inc(n);
        }
    }
    Ok((written, skipped))
}

/// Converting onto the source (or one of its parents) would truncate it before it is read.
fn refuse_overwriting_a_source(src: &Disk, dst: &Path) -> anyhow::Result<()> {
    let Ok(dst_canon) = std::fs::canonicalize(dst) else {
        return Ok(()); // the destination does not exist yet
    };
    for layer in src.layers() {
        if std::fs::canonicalize(layer.path()).is_ok_and(|c| c == dst_canon) {
            bail!(
                "{}: the destination is the source image {}; refusing to overwrite it",
                dst.display(),
                layer.path().display()
            );
        }
    }
    Ok(())
}

pub fn run(registry: &Registry, args: &ConvertArgs, output: Output) -> anyhow::Result<u8> {
    let src = open_disk(
        registry,
        &args.source,
        args.format.as_deref(),
        &args.parents,
    )?;
    refuse_overwriting_a_source(&src, &args.destination)?;
    let size = src.size();
    let params = CreateParams {
        size,
        options: parse_options(args.options.as_deref())?,
        ..CreateParams::default()
    };
    let dst = registry.create(&args.output_format, &args.destination, &params, None, true)?;
    let pb = progress_bar(args.progress, size);
    let copied = copy(&src, dst.as_ref(), &pb).and_then(|r| {
        dst.flush()
            .with_context(|| format!("flushing {}", args.destination.display()))?;
        Ok(r)
    });
    pb.finish_and_clear();
    let (written, skipped) = match copied {
        Ok(r) => r,
        Err(e) => {
            // Do not leave a half-written image behind.
            if let Err(del) = dst.close(true) {
                log::warn!("removing {}: {del}", args.destination.display());
            }
            return Err(e);
        }
    };
    dst.close(false)
        .with_context(|| format!("closing {}", args.destination.display()))?;
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
        std::io::stdout().flush()?;
    }
    Ok(crate::exit::OK)
}
