//! `vd-tool compare A B`: whether two images hold the same virtual disk contents.
//!
//! Like `qemu-img compare`: exit 0 when identical, 1 when different (the first differing offset
//! is reported), 2 on error. Without `--strict`, images of different sizes are identical when
//! the larger one's extra part reads as zeros.

use serde::Serialize;
use vd_core::{Disk, ExtentKind, Registry};

use crate::cli::{CompareArgs, Output};
use crate::commands::{AlignedBuf, open_disk_with, progress_bar};
use crate::render::emit;

const CHUNK: u64 = 4 << 20;

#[derive(Debug, Serialize)]
struct CompareResult {
    identical: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    first_difference: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// Whether `[offset, offset + len)` reads as zeros in `disk`, as far as its map alone tells.
fn known_zero(disk: &Disk, offset: u64, len: u64) -> anyhow::Result<bool> {
    Ok(disk
        .map(offset, len)?
        .iter()
        .all(|e| e.kind == ExtentKind::Zero))
}

/// The first offset in `[from, to)` where the two disks differ (both must cover the range;
/// reads past one disk's end count as zeros).
fn first_difference(
    a: &Disk,
    b: &Disk,
    from: u64,
    to: u64,
    pb: &crate::progress::Progress,
) -> anyhow::Result<Option<u64>> {
    let mut aa = AlignedBuf::new(CHUNK as usize);
    let mut ab = AlignedBuf::new(CHUNK as usize);
    let (ba, bb) = (aa.as_mut(), ab.as_mut());
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(CHUNK);
        let in_a = a.size().saturating_sub(pos).min(n);
        let in_b = b.size().saturating_sub(pos).min(n);
        let za = in_a == 0 || known_zero(a, pos, in_a)?;
        let zb = in_b == 0 || known_zero(b, pos, in_b)?;
        if !(za && zb) {
            let (ca, cb) = (&mut ba[..n as usize], &mut bb[..n as usize]);
            ca.fill(0);
            cb.fill(0);
            if in_a > 0 && !za {
                a.read_at(pos, &mut ca[..in_a as usize])?;
            }
            if in_b > 0 && !zb {
                b.read_at(pos, &mut cb[..in_b as usize])?;
            }
            if let Some(i) = ca.iter().zip(cb.iter()).position(|(x, y)| x != y) {
                return Ok(Some(pos + i as u64));
            }
        }
        pos += n;
        pb.inc(n);
    }
    Ok(None)
}

pub fn run(registry: &Registry, args: &CompareArgs, output: Output) -> anyhow::Result<u8> {
    let flags = args.share.read_only();
    let a = open_disk_with(registry, &args.first, flags, args.format_a.as_deref(), &[])?;
    let b = open_disk_with(registry, &args.second, flags, args.format_b.as_deref(), &[])?;
    let result = if args.strict && a.size() != b.size() {
        CompareResult {
            identical: false,
            first_difference: None,
            reason: Some(format!(
                "image size mismatch: {} and {} bytes",
                a.size(),
                b.size()
            )),
        }
    } else {
        let end = a.size().max(b.size());
        let mut pb = progress_bar(args.progress, end);
        let diff = first_difference(&a, &b, 0, end, &pb)?;
        pb.finish_and_clear();
        CompareResult {
            identical: diff.is_none(),
            first_difference: diff,
            reason: diff.map(|d| format!("content mismatch at offset {d}")),
        }
    };
    emit(output, &result, |out, r| {
        if r.identical {
            writeln!(out, "Images are identical.")
        } else if let Some(off) = r.first_difference {
            writeln!(out, "Content mismatch at offset {off}!")
        } else {
            writeln!(out, "{}", r.reason.as_deref().unwrap_or("Images differ."))
        }
    })?;
    Ok(if result.identical {
        crate::exit::OK
    } else {
        crate::exit::PROBLEMS
    })
}
