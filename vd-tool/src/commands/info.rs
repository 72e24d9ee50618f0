//! `vd-tool info [-f FMT] [--backing-chain] FILE`.

use std::io::Write;
use std::os::unix::fs::MetadataExt;

use serde::Serialize;
use vd_core::{
    ErrorKind, Facts, Geometry, Image, OpenFlags, Registry, Result as VdResult, Warning, flag_names,
};

use crate::cli::{InfoArgs, Output};
use crate::commands::open_disk_with;
use crate::render::{emit, human_size, sanitize};
use crate::tree::{Node, write_tree};

/// What `info` reports about one image.
#[derive(Debug, Serialize)]
pub struct ImageInfo {
    filename: String,
    format: &'static str,
    virtual_size: u64,
    file_size: u64,
    /// Bytes the file occupies on the host (allocated blocks), where known.
    #[serde(skip_serializing_if = "Option::is_none")]
    actual_size: Option<u64>,
    image_flags: Vec<&'static str>,
    logical_sector_size: u32,
    physical_sector_size: u32,
    pchs_geometry: Option<Geometry>,
    lchs_geometry: Option<Geometry>,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modification_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_uuid: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_filename: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    comment: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    warnings: Vec<Warning>,
    #[serde(skip_serializing_if = "Option::is_none")]
    format_specific: Option<Facts>,
}

/// `Ok(None)` for optional facts the format does not have.
fn optional<T>(r: VdResult<T>) -> anyhow::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.kind() == ErrorKind::NotSupported => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Collects the facts about one opened image.
pub fn describe(img: &dyn Image) -> anyhow::Result<ImageInfo> {
    let path = img.path();
    Ok(ImageInfo {
        filename: path.display().to_string(),
        format: img.format(),
        virtual_size: img.size(),
        file_size: img.file_size()?,
        actual_size: std::fs::metadata(path).ok().map(|m| m.blocks() * 512),
        image_flags: flag_names(&img.image_flags()),
        logical_sector_size: img.sector_size(),
        physical_sector_size: img.physical_sector_size(),
        pchs_geometry: optional(img.pchs_geometry())?,
        lchs_geometry: optional(img.lchs_geometry())?,
        uuid: optional(img.uuid())?.map(|u| u.to_string()),
        modification_uuid: optional(img.modification_uuid())?.map(|u| u.to_string()),
        parent_uuid: optional(img.parent_uuid())?.map(|u| u.to_string()),
        parent_filename: optional(img.parent_filename())?,
        comment: optional(img.comment())?.flatten(),
        warnings: img.warnings(),
        format_specific: img.details(),
    })
}

fn geometry(g: Option<Geometry>) -> String {
    g.map_or_else(
        || "-".into(),
        |g| format!("{}/{}/{}", g.cylinders, g.heads, g.sectors),
    )
}

/// Writes `pairs` as `label: value` lines with the values in one column.
fn write_aligned(out: &mut dyn Write, pairs: &[(&str, String)]) -> std::io::Result<()> {
    let width = pairs.iter().map(|(l, _)| l.len() + 1).max().unwrap_or(0);
    for (label, value) in pairs {
        writeln!(out, "{:<width$} {value}", format!("{label}:"))?;
    }
    Ok(())
}

/// The human form of `info`. The open's warnings are not repeated here: the backend logged
/// each once on stderr.
fn write_human(out: &mut dyn Write, i: &ImageInfo) -> std::io::Result<()> {
    let mut pairs = vec![
        ("image", sanitize(&i.filename)),
        ("file format", i.format.to_string()),
        ("virtual size", human_size(i.virtual_size)),
        ("file size", human_size(i.file_size)),
    ];
    if let Some(a) = i.actual_size {
        pairs.push(("disk size", human_size(a)));
    }
    if !i.image_flags.is_empty() {
        pairs.push(("image flags", i.image_flags.join(" ")));
    }
    pairs.push((
        "sector size",
        format!(
            "{} logical, {} physical",
            i.logical_sector_size, i.physical_sector_size
        ),
    ));
    pairs.push((
        "geometry (C/H/S)",
        format!(
            "physical {}, logical {}",
            geometry(i.pchs_geometry),
            geometry(i.lchs_geometry)
        ),
    ));
    for (label, v) in [
        ("uuid", &i.uuid),
        ("modification uuid", &i.modification_uuid),
        ("parent uuid", &i.parent_uuid),
        ("parent filename", &i.parent_filename),
        ("comment", &i.comment),
    ] {
        if let Some(v) = v {
            pairs.push((label, sanitize(v)));
        }
    }
    write_aligned(out, &pairs)?;
    if let Some(facts) = &i.format_specific {
        writeln!(out, "format specific information:")?;
        write_tree(out, &Node::of(facts).map_err(std::io::Error::other)?, 4)?;
    }
    Ok(())
}

#[derive(Debug, Serialize)]
struct Chain {
    images: Vec<ImageInfo>,
}

pub fn run(registry: &Registry, args: &InfoArgs, output: Output) -> anyhow::Result<u8> {
    let flags = args.share.read_only() | OpenFlags::INFO;
    if args.backing_chain {
        let disk = open_disk_with(
            registry,
            &args.file,
            flags,
            args.format.as_deref(),
            &args.parents,
        )?;
        let chain = Chain {
            images: disk
                .layers()
                .iter()
                .map(|l| describe(l.as_ref()))
                .collect::<anyhow::Result<_>>()?,
        };
        emit(output, &chain, |out, c| {
            for (n, i) in c.images.iter().enumerate() {
                if n > 0 {
                    writeln!(out)?;
                }
                write_human(out, i)?;
            }
            Ok(())
        })?;
    } else {
        let img = match &args.format {
            Some(f) => registry.open_as(f, &args.file, flags),
            None => registry.open(&args.file, flags),
        }?;
        let info = describe(img.as_ref())?;
        emit(output, &info, |out, i| write_human(out, i))?;
    }
    Ok(crate::exit::OK)
}
