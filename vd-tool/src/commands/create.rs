//! `vd-tool create -f FMT [-o OPTS] [-b PARENT] FILE [SIZE]`.

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::{CreateParams, Disk, ImageFlags, OpenFlags, Registry};

use crate::cli::{CreateArgs, Output};
use crate::commands::{open_disk_with, options_help, parse_options, parse_size, rounding_note};
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
    if options_help::wants_help(args.options.as_deref()) {
        return options_help::print(registry, args.format.as_deref(), output);
    }
    let Some(format) = args.format.as_deref() else {
        bail!("create needs -f FORMAT (-o help lists the formats and their options)");
    };
    let Some(file) = args.file.as_deref() else {
        bail!("create needs the new image's FILE");
    };
    // An unknown format is refused before anything else (listing the formats).
    registry.backend(format)?;
    let options = parse_options(args.options.as_deref())?;
    // The whole backing chain is opened: the new image must not be any file of it (with
    // --force it would be replaced, leaving a chain that contains itself).
    let parent = match &args.backing {
        Some(p) => {
            let chain = open_disk_with(
                registry,
                p,
                OpenFlags::READ_ONLY,
                args.backing_format.as_deref(),
                &[],
            )?;
            for layer in chain.layers() {
                if registry.provider().same_file(layer.path(), file) {
                    bail!(
                        "{}: the new image would be part of its own backing chain (it is the \
                         same file as {}); refusing to create it",
                        file.display(),
                        layer.path().display()
                    );
                }
            }
            Some(chain)
        }
        None => None,
    };
    let size = match (&args.size, &parent) {
        (Some(s), _) => parse_size(s)?,
        (None, Some(p)) => p.size(),
        (None, None) => bail!("a size is needed (or -b PARENT)"),
    };
    if !args.force && file.exists() {
        bail!(
            "{}: the file exists; use --force to replace it",
            file.display()
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
    let parent_ref = args.backing.as_deref().zip(parent.as_ref().map(Disk::top));
    let virtual_size = if args.force {
        // Built beside the old file, which is replaced only once the new image is complete.
        let staged = registry.create_staged(format, file, &params, parent_ref)?;
        let size = staged.image().size();
        staged
            .commit()
            .with_context(|| format!("finishing {}", file.display()))?;
        size
    } else {
        let img = registry.create(format, file, &params, parent_ref, false)?;
        let size = img.size();
        img.close(false)
            .with_context(|| format!("closing {}", file.display()))?;
        size
    };
    if let Some(note) = rounding_note(file, format, &params.options, size, virtual_size) {
        eprintln!("{note}");
    }
    let created = Created {
        file: file.display().to_string(),
        format: format.to_string(),
        virtual_size,
        backing_file: args.backing.as_ref().map(|p| p.display().to_string()),
    };
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
