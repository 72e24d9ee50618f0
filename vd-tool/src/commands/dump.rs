//! `vd-tool dump FILE`: every on-disk structure, as the backend describes it.

use serde::Serialize;
use vd_core::{Facts, OpenFlags, Registry};

use crate::cli::{DumpArgs, Output};
use crate::render::emit;
use crate::tree::{Node, write_tree};

#[derive(Debug, Serialize)]
struct DumpResult {
    file: String,
    format: &'static str,
    /// The backend's typed description of its on-disk structures.
    structures: Facts,
}

pub fn run(registry: &Registry, args: &DumpArgs, output: Output) -> anyhow::Result<u8> {
    let flags = args.share.read_only() | OpenFlags::INFO;
    let img = match &args.format {
        Some(f) => registry.open_as(f, &args.file, flags),
        None => registry.open(&args.file, flags),
    }?;
    let result = DumpResult {
        file: args.file.display().to_string(),
        format: img.format(),
        structures: img.dump()?,
    };
    emit(output, &result, |out, r| {
        write_tree(
            out,
            &Node::of(&r.structures).map_err(std::io::Error::other)?,
            0,
        )
    })?;
    img.close(false)?;
    Ok(crate::exit::OK)
}
