//! `vd-tool layout FILE`: where each structure lies in the image file, and the free space
//! between them.

use std::io::Write;

use serde::Serialize;
use vd_core::{LayoutRegion, OpenFlags, RegionKind, Registry};

use crate::cli::{LayoutArgs, Output};
use crate::commands::map::short_size;
use crate::render::{emit, sanitize};

#[derive(Debug, Serialize)]
struct LayoutResult {
    file: String,
    format: &'static str,
    file_size: u64,
    /// Sorted by offset, free space included.
    regions: Vec<LayoutRegion>,
}

/// Width of the bar drawn under the table.
const BAR_WIDTH: usize = 64;

pub fn run(registry: &Registry, args: &LayoutArgs, output: Output) -> anyhow::Result<u8> {
    let flags = args.share.read_only() | OpenFlags::INFO;
    let img = match &args.format {
        Some(f) => registry.open_as(f, &args.file, flags),
        None => registry.open(&args.file, flags),
    }?;
    let file_size = img.file_size()?;
    let mut regions = img.layout()?;
    regions.sort_by_key(|r| (r.offset, r.kind));
    let result = LayoutResult {
        file: args.file.display().to_string(),
        format: img.format(),
        file_size,
        regions: with_free_space(regions, file_size),
    };
    emit(output, &result, |out, r| render(out, r))?;
    img.close(false)?;
    Ok(crate::exit::OK)
}

/// `regions` (sorted) with the gaps between them, and after them up to `file_size`, as
/// [`RegionKind::Free`].
fn with_free_space(regions: Vec<LayoutRegion>, file_size: u64) -> Vec<LayoutRegion> {
    let mut out = Vec::with_capacity(regions.len().saturating_mul(2).saturating_add(1));
    let mut cursor = 0u64;
    for r in regions {
        if r.offset > cursor {
            out.push(LayoutRegion::new(
                RegionKind::Free,
                cursor,
                r.offset.abs_diff(cursor),
            ));
        }
        cursor = cursor.max(r.end());
        out.push(r);
    }
    if file_size > cursor {
        out.push(LayoutRegion::new(
            RegionKind::Free,
            cursor,
            file_size.abs_diff(cursor),
        ));
    }
    out
}

/// A region kind as people read it, and its character in the bar.
fn describe(kind: RegionKind) -> (&'static str, char) {
    match kind {
        RegionKind::FileIdentifier => ("identifier", 'I'),
        RegionKind::Header => ("header", 'H'),
        RegionKind::RegionTable => ("region table", 'R'),
        RegionKind::Reserved => ("reserved", '-'),
        RegionKind::Log => ("log", 'L'),
        RegionKind::Bat => ("BAT", 'B'),
        RegionKind::Metadata => ("metadata", 'M'),
        RegionKind::Payload => ("payload", '#'),
        RegionKind::SectorBitmap => ("sector bitmap", 's'),
        RegionKind::Free => ("free", '.'),
        _ => ("other", '?'),
    }
}

fn render(out: &mut dyn Write, r: &LayoutResult) -> std::io::Result<()> {
    writeln!(
        out,
        "{} ({}): file size {} ({:#x})",
        sanitize(&r.file),
        r.format,
        short_size(r.file_size),
        r.file_size
    )?;
    writeln!(
        out,
        "{:<14} {:<14} {:>10}  {:<15} WHAT",
        "OFFSET", "LENGTH", "SIZE", "KIND"
    )?;
    for g in &r.regions {
        let (kind, _) = describe(g.kind);
        let kind = match g.copy {
            Some(c) => format!("{kind} {c}"),
            None => kind.to_string(),
        };
        let mut what = g.label.as_deref().map(sanitize).unwrap_or_default();
        if let Some(n) = g.blocks {
            let blocks = format!("{n} block{}", if n == 1 { "" } else { "s" });
            what = if what.is_empty() {
                blocks
            } else {
                format!("{what}, {blocks}")
            };
        }
        if g.end() > r.file_size {
            what.push_str(" (past the end of the file)");
        }
        writeln!(
            out,
            "{:<#14x} {:<#14x} {:>10}  {kind:<15} {what}",
            g.offset,
            g.length,
            short_size(g.length)
        )?;
    }
    if r.file_size > 0 {
        writeln!(out)?;
        writeln!(out, "|{}|", bar(&r.regions, r.file_size, BAR_WIDTH))?;
        let mut seen: Vec<RegionKind> = r.regions.iter().map(|g| g.kind).collect();
        seen.sort();
        seen.dedup();
        let legend: Vec<String> = seen
            .into_iter()
            .map(|k| {
                let (name, ch) = describe(k);
                format!("{ch} {name}")
            })
            .collect();
        writeln!(
            out,
            " one character = {} of the file; {}",
            short_size(r.file_size.div_ceil(BAR_WIDTH as u64)),
            legend.join(", ")
        )?;
    }
    Ok(())
}

/// The file as `width` characters, each showing the kind that covers most of its bytes.
fn bar(regions: &[LayoutRegion], file_size: u64, width: usize) -> String {
    let step = file_size.div_ceil(width as u64).max(1);
    let cells = usize::try_from(file_size.div_ceil(step)).unwrap_or(width);
    // Bytes of each kind per character (RegionKind has a dozen variants).
    let mut best: Vec<(RegionKind, u64)> = vec![(RegionKind::Free, 0); cells];
    let mut tally: Vec<Vec<(RegionKind, u64)>> = vec![Vec::new(); cells];
    for g in regions {
        let end = g.end().min(file_size);
        let mut pos = g.offset;
        while pos < end {
            let cell = pos / step;
            let cell_end = cell.saturating_add(1).saturating_mul(step).min(end);
            let Some(t) = usize::try_from(cell).ok().and_then(|c| tally.get_mut(c)) else {
                break;
            };
            let n = cell_end.abs_diff(pos);
            match t.iter_mut().find(|(k, _)| *k == g.kind) {
                Some((_, b)) => *b = b.saturating_add(n),
                None => t.push((g.kind, n)),
            }
            pos = cell_end;
        }
    }
    for (b, t) in best.iter_mut().zip(&tally) {
        for &(k, n) in t {
            if n > b.1 {
                *b = (k, n);
            }
        }
    }
    best.iter().map(|&(k, _)| describe(k).1).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_become_free_space() {
        let regions = vec![
            LayoutRegion::new(RegionKind::Header, 0x10000, 0x10000),
            LayoutRegion::new(RegionKind::Payload, 0x100000, 0x100000),
        ];
        let all = with_free_space(regions, 0x300000);
        let got: Vec<_> = all.iter().map(|r| (r.kind, r.offset, r.length)).collect();
        assert_eq!(
            got,
            vec![
                (RegionKind::Free, 0, 0x10000),
                (RegionKind::Header, 0x10000, 0x10000),
                (RegionKind::Free, 0x20000, 0xe0000),
                (RegionKind::Payload, 0x100000, 0x100000),
                (RegionKind::Free, 0x200000, 0x100000),
            ]
        );
        // Each character shows the kind with the most bytes in its third of the file.
        assert_eq!(bar(&all, 0x300000, 3), ".#.");
    }
}
