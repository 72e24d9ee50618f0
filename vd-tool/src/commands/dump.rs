//! `vd-tool dump FILE`: every on-disk structure, as the backend describes it.

use serde::Serialize;
use vd_core::{OpenFlags, Registry};

use crate::cli::{DumpArgs, Output};
use crate::render::{emit, sanitize};

#[derive(Debug, Serialize)]
struct DumpResult {
    file: String,
    format: &'static str,
    lines: Vec<String>,
}

pub fn run(registry: &Registry, args: &DumpArgs, output: Output) -> anyhow::Result<u8> {
    let flags = args.share.read_only() | OpenFlags::INFO;
    let img = match &args.format {
        Some(f) => registry.open_as(f, &args.file, flags),
        None => registry.open(&args.file, flags),
    }?;
    let mut text = Vec::new();
    img.dump(&mut text)?;
    let result = DumpResult {
        file: args.file.display().to_string(),
        format: img.format(),
        lines: String::from_utf8_lossy(&text)
            .lines()
            .map(str::to_string)
            .collect(),
    };
    emit(output, &result, |out, r| {
        for l in &r.lines {
            writeln!(out, "{}", sanitize(l))?;
        }
        Ok(())
    })?;
    img.close(false)?;
    Ok(crate::exit::OK)
}
