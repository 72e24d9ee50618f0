//! `vd-tool map FILE`: which ranges hold data or zeros, and which image of the chain holds them.
//!
//! The disk is mapped [`WINDOW`] bytes at a time and each run is written out as soon as the
//! next one shows it is complete, so memory stays bounded however large the disk: the table
//! and the JSON Lines stream one extent at a time, and `--visual` folds the runs into a grid
//! whose number of cells is bounded by its size on the screen.

use std::io::{IsTerminal, Write};

use anyhow::bail;
use serde::Serialize;
use vd_core::{Disk, ExtentKind, Image, Registry};

use crate::cli::{ColorChoice, MapArgs, Output};
use crate::commands::open_disk_with;
use crate::render::{SCHEMA_VERSION, sanitize};

/// Bytes of the disk mapped per request: bounds the extents held at once.
const WINDOW: u64 = 256 << 20;

/// One run of the disk, resolved through the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    start: u64,
    length: u64,
    /// `Data` or `Zero`; never `Unallocated` (resolved through the chain).
    state: ExtentKind,
    /// The image of the chain that holds the run (0 = the top); `None` for zeros no image
    /// stores (below the base, or past the end of a shorter parent).
    layer: Option<usize>,
}

impl Run {
    /// Whether `next` continues this run.
    fn joins(&self, next: &Run) -> bool {
        self.state == next.state
            && self.layer == next.layer
            && self.start.checked_add(self.length) == Some(next.start)
    }
}

/// Appends `r`, extending the last run when `r` continues it.
fn push(out: &mut Vec<Run>, r: Run) {
    if r.length == 0 {
        return;
    }
    if let Some(last) = out.last_mut()
        && last.joins(&r)
    {
        last.length = last.length.saturating_add(r.length);
        return;
    }
    out.push(r);
}

/// Resolves `[offset, offset + len)` from `layers[index]` down: what the layer holds, and
/// for what it leaves to its parent, the parent's answer (as [`Disk::map`] does, keeping the
/// layer that stores zeros).
fn resolve(
    layers: &[Box<dyn Image>],
    index: usize,
    offset: u64,
    len: u64,
    out: &mut Vec<Run>,
) -> anyhow::Result<()> {
    let Some(layer) = layers.get(index) else {
        push(
            out,
            Run {
                start: offset,
                length: len,
                state: ExtentKind::Zero,
                layer: None,
            },
        );
        return Ok(());
    };
    let avail = layer.size().saturating_sub(offset).min(len);
    if avail > 0 {
        for e in layer.map(offset, avail)? {
            let (state, layer) = match e.kind {
                ExtentKind::Unallocated if index.saturating_add(1) < layers.len() => {
                    resolve(layers, index.saturating_add(1), e.offset, e.length, out)?;
                    continue;
                }
                ExtentKind::Unallocated => (ExtentKind::Zero, None),
                ExtentKind::Zero => (ExtentKind::Zero, Some(index)),
                ExtentKind::Data => (ExtentKind::Data, Some(index)),
            };
            push(
                out,
                Run {
                    start: e.offset,
                    length: e.length,
                    state,
                    layer,
                },
            );
        }
    }
    if avail < len {
        push(
            out,
            Run {
                start: offset.saturating_add(avail),
                length: len.abs_diff(avail),
                state: ExtentKind::Zero,
                layer: None,
            },
        );
    }
    Ok(())
}

/// Calls `emit` with every run of the disk in order, adjacent runs of one state and layer
/// merged, mapping [`WINDOW`] bytes at a time.
fn walk(disk: &Disk, mut emit: impl FnMut(Run) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let size = disk.size();
    let mut pending: Option<Run> = None;
    let mut batch = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let len = size.abs_diff(pos).min(WINDOW);
        batch.clear();
        resolve(disk.layers(), 0, pos, len, &mut batch)?;
        for r in batch.drain(..) {
            match &mut pending {
                Some(p) if p.joins(&r) => p.length = p.length.saturating_add(r.length),
                _ => {
                    if let Some(done) = pending.replace(r) {
                        emit(done)?;
                    }
                }
            }
        }
        pos = pos.saturating_add(len);
    }
    if let Some(done) = pending {
        emit(done)?;
    }
    Ok(())
}

/// One extent line of the JSON Lines output.
#[derive(Debug, Serialize)]
struct MapEntry<'a> {
    start: u64,
    length: u64,
    /// `data` or `zero`.
    state: ExtentKind,
    /// Depth in the chain of the image holding the range (0 = the image named); absent for
    /// zeros no image stores.
    #[serde(skip_serializing_if = "Option::is_none")]
    layer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<&'a str>,
}

/// One image of the chain, in the header line.
#[derive(Debug, Serialize)]
struct Layer {
    layer: usize,
    file: String,
    format: &'static str,
}

/// The first line of the JSON Lines output.
#[derive(Debug, Serialize)]
struct MapHeader<'a> {
    schema_version: u32,
    /// Always `jsonl`: one JSON document per line follows.
    format: &'static str,
    file: &'a str,
    virtual_size: u64,
    layers: &'a [Layer],
}

pub fn run(registry: &Registry, args: &MapArgs, output: Output) -> anyhow::Result<u8> {
    if args.visual && output == Output::Json {
        bail!("--visual draws a picture for people; `map --output json` gives the same as data");
    }
    let disk = open_disk_with(
        registry,
        &args.file,
        args.chain.share.read_only(),
        args.chain.format.as_deref(),
        &args.chain.parents,
    )?;
    let layers: Vec<Layer> = disk
        .layers()
        .iter()
        .enumerate()
        .map(|(i, img)| Layer {
            layer: i,
            file: img.path().display().to_string(),
            format: img.format(),
        })
        .collect();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    if args.visual {
        let color = match args.color {
            ColorChoice::Always => true,
            ColorChoice::Never => false,
            ColorChoice::Auto => {
                std::io::stdout().is_terminal()
                    && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
            }
        };
        let width = args.width.map_or_else(terminal_width, usize::from);
        draw(&disk, &layers, width, color, &mut out)?;
    } else if output == Output::Json {
        let file = args.file.display().to_string();
        serde_json::to_writer(
            &mut out,
            &MapHeader {
                schema_version: SCHEMA_VERSION,
                format: "jsonl",
                file: &file,
                virtual_size: disk.size(),
                layers: &layers,
            },
        )?;
        writeln!(out)?;
        walk(&disk, |r| {
            serde_json::to_writer(
                &mut out,
                &MapEntry {
                    start: r.start,
                    length: r.length,
                    state: r.state,
                    layer: r.layer,
                    file: r.layer.and_then(|l| layers.get(l)).map(|l| l.file.as_str()),
                },
            )?;
            writeln!(out)?;
            Ok(())
        })?;
    } else {
        writeln!(
            out,
            "{:<18} {:<18} {:<5} {:>5}  FILE",
            "START", "LENGTH", "STATE", "LAYER"
        )?;
        walk(&disk, |r| {
            let state = match r.state {
                ExtentKind::Data => "data",
                _ => "zero",
            };
            let layer = r.layer.map_or_else(|| "-".to_string(), |l| l.to_string());
            let file = r
                .layer
                .and_then(|l| layers.get(l))
                .map_or("-", |l| l.file.as_str());
            writeln!(
                out,
                "{:<#18x} {:<#18x} {state:<5} {layer:>5}  {}",
                r.start,
                r.length,
                sanitize(file)
            )?;
            Ok(())
        })?;
    }
    out.flush()?;
    drop(out);
    disk.close()?;
    Ok(crate::exit::OK)
}

/// The width to draw in: `$COLUMNS`, else the terminal's width when stdout is a terminal,
/// else 80.
fn terminal_width() -> usize {
    const DEFAULT: usize = 80;
    if let Some(cols) = std::env::var("COLUMNS")
        .ok()
        .and_then(|c| c.trim().parse::<usize>().ok())
        .filter(|&c| c > 0)
    {
        return cols.clamp(MIN_WIDTH, MAX_WIDTH);
    }
    let stdout = std::io::stdout();
    if stdout.is_terminal()
        && let Ok(size) = rustix::termios::tcgetwinsize(&stdout)
        && size.ws_col > 0
    {
        return usize::from(size.ws_col).clamp(MIN_WIDTH, MAX_WIDTH);
    }
    DEFAULT
}

/// The narrowest picture drawn.
pub const MIN_WIDTH: usize = 20;
/// The widest picture drawn.
pub const MAX_WIDTH: usize = 1000;
/// The most rows of cells the grid has.
const MAX_ROWS: u64 = 32;

/// What one cell of the grid shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cell {
    /// Nothing mapped into it yet.
    Empty,
    /// Data stored in this layer of the chain.
    Data(usize),
    /// Reads as zeros, and an image of the chain says so.
    Zero,
    /// Reads as zeros, and no image of the chain holds it.
    Unmapped,
    /// More than one of the kinds above.
    Mixed,
}

impl Cell {
    fn of(r: &Run) -> Self {
        match (r.state, r.layer) {
            (ExtentKind::Data, Some(l)) => Self::Data(l),
            (_, Some(_)) => Self::Zero,
            _ => Self::Unmapped,
        }
    }

    fn merge(self, other: Self) -> Self {
        match self {
            Self::Empty => other,
            _ if self == other => self,
            _ => Self::Mixed,
        }
    }

    /// The character and its ANSI colour (SGR parameters).
    fn glyph(self) -> (char, &'static str) {
        match self {
            Self::Data(0) => ('#', "32"),
            Self::Data(l) => (
                u32::try_from(l)
                    .ok()
                    .filter(|&l| l <= 9)
                    .and_then(|l| char::from_digit(l, 10))
                    .unwrap_or('p'),
                "36",
            ),
            Self::Zero => ('.', "2"),
            Self::Unmapped | Self::Empty => (' ', ""),
            Self::Mixed => ('+', "33"),
        }
    }
}

/// How the grid divides the disk.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Scale {
    /// Bytes of the disk per cell.
    cell_bytes: u64,
    /// Number of cells.
    cells: u64,
    /// The scale in words.
    text: String,
}

/// Cells of `unit`-byte blocks (or, for a disk of fewer blocks than one row holds, of
/// fractions of a block) so that the grid of `cols` columns has at most [`MAX_ROWS`] rows.
fn scale(size: u64, unit: u64, cols: u64) -> Scale {
    let unit = unit.max(1);
    let cols = cols.max(1);
    let blocks = size.div_ceil(unit);
    if blocks >= cols || unit <= 4096 {
        // A power of two, so rows start at round offsets.
        let n = blocks
            .div_ceil(cols.saturating_mul(MAX_ROWS))
            .max(1)
            .checked_next_power_of_two()
            .unwrap_or(u64::MAX);
        let cell_bytes = n.saturating_mul(unit);
        Scale {
            cell_bytes,
            cells: size.div_ceil(cell_bytes),
            text: format!(
                "one cell = {n} block{} of {} (= {cell_bytes} bytes)",
                if n == 1 { "" } else { "s" },
                short_size(unit)
            ),
        }
    } else {
        // Fewer blocks than one row: a power-of-two fraction of a block per cell, at least 4 KiB.
        let cell_bytes = size
            .div_ceil(cols)
            .checked_next_power_of_two()
            .unwrap_or(unit)
            .clamp(4096, unit);
        Scale {
            cell_bytes,
            cells: size.div_ceil(cell_bytes),
            text: format!(
                "one cell = 1/{} block of {} (= {cell_bytes} bytes)",
                unit / cell_bytes,
                short_size(unit)
            ),
        }
    }
}

/// A size in the largest binary unit that keeps a short number: `64 KiB`, `1.5 MiB`.
pub fn short_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut unit = 0;
    let mut whole = bytes;
    while whole >= 1024 && unit + 1 < UNITS.len() {
        whole /= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes} B");
    }
    #[allow(
        clippy::cast_precision_loss,
        reason = "a size for people, shown to three digits"
    )]
    let v = bytes as f64 / (1u64 << (10 * unit)) as f64;
    if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round(), UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Draws the disk as a grid `width` columns wide, then the scale and the legend.
fn draw(
    disk: &Disk,
    layers: &[Layer],
    width: usize,
    color: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let size = disk.size();
    let top = disk.layers().first();
    let unit = top.and_then(|t| t.block_size()).unwrap_or(1 << 20);
    let label_width = format!("{:#x}", size.saturating_sub(1)).len();
    // "LABEL |CELLS|"
    let cols = width.saturating_sub(label_width + 3).max(8) as u64;
    let sc = scale(size, unit, cols);
    // At most cols × MAX_ROWS cells (or one row), so the grid fits in memory.
    let mut cells = vec![Cell::Empty; usize::try_from(sc.cells)?];
    walk(disk, |r| {
        let first = r.start / sc.cell_bytes;
        let last = r.start.saturating_add(r.length).saturating_sub(1) / sc.cell_bytes;
        for c in first..=last {
            if let Some(cell) = usize::try_from(c).ok().and_then(|c| cells.get_mut(c)) {
                *cell = cell.merge(Cell::of(&r));
            }
        }
        Ok(())
    })?;
    writeln!(
        out,
        "{}: {} virtual disk",
        sanitize(&layers.first().map_or(String::new(), |l| l.file.clone())),
        short_size(size),
    )?;
    let paint_run = |c: Cell, n: usize| -> String {
        let (ch, sgr) = c.glyph();
        let run: String = std::iter::repeat_n(ch, n).collect();
        if color && !sgr.is_empty() {
            format!("\x1b[{sgr}m{run}\x1b[0m")
        } else {
            run
        }
    };
    let paint = |c: Cell| paint_run(c, 1);
    let row_bytes = sc.cell_bytes.saturating_mul(cols);
    for (i, row) in cells.chunks(usize::try_from(cols)?).enumerate() {
        let start = (i as u64).saturating_mul(row_bytes);
        let line: String = row
            .chunk_by(|a, b| a == b)
            .map(|same| paint_run(same[0], same.len()))
            .collect();
        writeln!(out, "{:>label_width$} |{line}|", format!("{start:#x}"))?;
    }
    writeln!(out)?;
    writeln!(out, "{}", sc.text)?;
    writeln!(
        out,
        "  {}  data in this image ({})",
        paint(Cell::Data(0)),
        sanitize(&layers.first().map_or(String::new(), |l| l.file.clone()))
    )?;
    for l in layers.iter().skip(1) {
        writeln!(
            out,
            "  {}  data from parent layer {} ({})",
            paint(Cell::Data(l.layer)),
            l.layer,
            sanitize(&l.file)
        )?;
    }
    writeln!(
        out,
        "  {}  zeros an image stores (a zero block, or one a base image has not allocated)",
        paint(Cell::Zero)
    )?;
    writeln!(
        out,
        "  {}  unmapped: no image of the chain holds it (reads as zeros)",
        paint(Cell::Unmapped)
    )?;
    writeln!(
        out,
        "  {}  partly present: the cell mixes the kinds above",
        paint(Cell::Mixed)
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_grid_stays_within_its_rows() {
        // 64 TiB of 1 MiB blocks in 60 columns.
        let s = scale(64 << 40, 1 << 20, 60);
        assert!(s.cells <= 60 * MAX_ROWS, "{s:?}");
        assert!(s.cells.div_ceil(60) <= MAX_ROWS);
        assert_eq!(s.cell_bytes % (1 << 20), 0);
        // A disk of three 32 MiB blocks is cut into fractions of a block.
        let s = scale(96 << 20, 32 << 20, 60);
        assert!(
            s.cell_bytes < 32 << 20 && (32 << 20) % s.cell_bytes == 0,
            "{s:?}"
        );
        assert!(s.cells <= 60, "{s:?}");
        // More blocks than a row holds, fewer than the grid: one block per cell.
        let s = scale(100 << 20, 1 << 20, 60);
        assert_eq!((s.cell_bytes, s.cells), (1 << 20, 100));
        // Ten blocks in 60 columns: quarter blocks.
        let s = scale(10 << 20, 1 << 20, 60);
        assert_eq!((s.cell_bytes, s.cells), (256 << 10, 40));
    }

    #[test]
    fn cells_mixing_kinds_are_partial() {
        assert_eq!(Cell::Empty.merge(Cell::Zero), Cell::Zero);
        assert_eq!(Cell::Data(1).merge(Cell::Data(1)), Cell::Data(1));
        assert_eq!(Cell::Data(0).merge(Cell::Data(1)), Cell::Mixed);
        assert_eq!(Cell::Zero.merge(Cell::Unmapped), Cell::Mixed);
        assert_eq!(Cell::Data(12).glyph().0, 'p');
        assert_eq!(Cell::Data(3).glyph().0, '3');
    }

    #[test]
    fn short_sizes() {
        assert_eq!(short_size(512), "512 B");
        assert_eq!(short_size(64 << 10), "64 KiB");
        assert_eq!(short_size(3 << 19), "1.5 MiB");
    }
}
