//! `vd-tool create -f FMT [-o OPTS] [-b PARENT] FILE [SIZE]`.

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::{CreateParams, ImageFlags, OpenFlags, Registry};

use crate::cli::{CreateArgs, Output};
use crate::commands::{parse_options, parse_size};
use crate::render::{emit, sanitize};

#[derive(Debug, Serialize)]
struct Created {
    file: String,
    format: String,
    virtual_size: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    backing_file: Option<String>,
}

pub fn run(registry: &Registry, args: &CreateArgs, output: Output) -> anyhow::Result<u8> {
    let options = parse_options(args.options.as_deref())?;
    let parent = match &args.backing {
        Some(p) => {
            let flags = OpenFlags::READ_ONLY;
            Some(match &args.backing_format {
                Some(f) => registry.open_as(f, p, flags),
                None => registry.open(p, flags),
            }?)
        }
        None => None,
    };
    let size = match (&args.size, &parent) {
        (Some(s), _) => parse_size(s)?,
        (None, Some(p)) => p.size(),
        (None, None) => bail!("a size is needed (or -b PARENT)"),
    };
    if !args.force && std::path::Path::new(&args.file).exists() {
        bail!(
            "{}: the file exists; use --force to replace it",
            args.file.display()
        );
    }
    let mut image_flags = ImageFlags::empty();
    if parent.is_some() {
        image_flags |= ImageFlags::DIFF;
    }
    let params = CreateParams {
        size,
        image_flags,
        options,
        ..CreateParams::default()
    };
    let parent_ref = args.backing.as_deref().zip(parent.as_deref());
    let img = registry.create(&args.format, &args.file, &params, parent_ref, args.force)?;
    let created = Created {
        file: args.file.display().to_string(),
        format: args.format.clone(),
        virtual_size: img.size(),
        backing_file: args.backing.as_ref().map(|p| p.display().to_string()),
    };
    img.close(false)
        .with_context(|| format!("closing {}", args.file.display()))?;
    emit(output, &created, |out, c| {
        write!(
            out,
            "Formatting '{}', fmt={} size={}",
            sanitize(&c.file),
            c.format,
            c.virtual_size
        )?;
        if let Some(b) = &c.backing_file {
            write!(out, " backing_file={}", sanitize(b))?;
        }
        if let Some(o) = &args.options {
            write!(out, " {}", sanitize(o))?;
        }
        writeln!(out)
    })?;
    Ok(crate::exit::OK)
}
