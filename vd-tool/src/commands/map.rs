//! `vd-tool map FILE`: which ranges hold data or zeros, and which image of the chain holds them.

use serde::Serialize;
use vd_core::{ExtentKind, Registry};

use crate::cli::{MapArgs, Output};
use crate::commands::open_disk_with;
use crate::render::{emit, sanitize};

#[derive(Debug, Serialize)]
struct MapEntry {
    start: u64,
    length: u64,
    /// `data` or `zero`.
    state: ExtentKind,
    /// Depth in the chain of the image holding the range (0 = the image named); absent for
    /// zeros no image stores.
    #[serde(skip_serializing_if = "Option::is_none")]
    layer: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file: Option<String>,
}

#[derive(Debug, Serialize)]
struct MapResult {
    file: String,
    virtual_size: u64,
    extents: Vec<MapEntry>,
}

pub fn run(registry: &Registry, args: &MapArgs, output: Output) -> anyhow::Result<u8> {
    let disk = open_disk_with(
        registry,
        &args.file,
        args.chain.share.read_only(),
        args.chain.format.as_deref(),
        &args.chain.parents,
    )?;
    let size = disk.size();
    let extents = disk
        .map(0, size)?
        .into_iter()
        .map(|e| MapEntry {
            start: e.offset,
            length: e.length,
            state: e.kind,
            layer: e.layer,
            file: e
                .layer
                .and_then(|l| disk.layers().get(l))
                .map(|img| img.path().display().to_string()),
        })
        .collect();
    let result = MapResult {
        file: args.file.display().to_string(),
        virtual_size: size,
        extents,
    };
    emit(output, &result, |out, r| {
        writeln!(
            out,
            "{:<18} {:<18} {:<5} {:>5}  FILE",
            "START", "LENGTH", "STATE", "LAYER"
        )?;
        for e in &r.extents {
            let state = match e.state {
                ExtentKind::Data => "data",
                _ => "zero",
            };
            let layer = e.layer.map_or_else(|| "-".to_string(), |l| l.to_string());
            writeln!(
                out,
                "{:<#18x} {:<#18x} {state:<5} {layer:>5}  {}",
                e.start,
                e.length,
                sanitize(e.file.as_deref().unwrap_or("-"))
            )?;
        }
        Ok(())
    })?;
    disk.close()?;
    Ok(crate::exit::OK)
}
