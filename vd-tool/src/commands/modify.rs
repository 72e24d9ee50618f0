//! Commands that change an image: `resize`, `discard`, `commit`, `setuuid`, `geometry`,
//! `comment`, `compact`. Each opens the image read-write, changes it, and closes it (which
//! applies the log and clears it).

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::copy::{CopyOptions, Destination, Source};
use vd_core::{Disk, DiskOptions, ErrorKind, Geometry, Image, OpenFlags, Registry};

use crate::cli::{
    CommentArgs, CommitArgs, DiscardArgs, FileArgs, GeometryArgs, Output, ResizeArgs, SetuuidArgs,
};
use crate::commands::{parse_size, progress_bar};
use crate::render::{emit, sanitize};

fn open_rw(registry: &Registry, a: &FileArgs) -> anyhow::Result<Box<dyn Image>> {
    Ok(match &a.format {
        Some(f) => registry.open_as(f, &a.file, OpenFlags::empty()),
        None => registry.open(&a.file, OpenFlags::empty()),
    }?)
}

fn open_ro(registry: &Registry, a: &FileArgs) -> anyhow::Result<Box<dyn Image>> {
    Ok(match &a.format {
        Some(f) => registry.open_as(f, &a.file, OpenFlags::READ_ONLY),
        None => registry.open(&a.file, OpenFlags::READ_ONLY),
    }?)
}

/// What a changing command did, for `--output json`.
#[derive(Debug, Default, Serialize)]
struct Done {
    file: String,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    virtual_size: Option<u64>,
    /// The range `discard` discarded.
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    /// The parent `commit` merged into.
    #[serde(skip_serializing_if = "Option::is_none")]
    parent: Option<String>,
    /// The file size before and after `compact`.
    #[serde(skip_serializing_if = "Option::is_none")]
    file_size_before: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    file_size_after: Option<u64>,
}

impl Done {
    fn new(file: &std::path::Path, action: &'static str) -> Self {
        Self {
            file: file.display().to_string(),
            action,
            ..Self::default()
        }
    }
}

fn done(
    output: Output,
    file: &std::path::Path,
    action: &'static str,
    size: Option<u64>,
    text: String,
) -> anyhow::Result<u8> {
    let d = Done {
        virtual_size: size,
        ..Done::new(file, action)
    };
    emit_done(output, &d, &text)
}

fn emit_done(output: Output, d: &Done, text: &str) -> anyhow::Result<u8> {
    emit(output, d, |out, _| writeln!(out, "{}", sanitize(text)))?;
    Ok(crate::exit::OK)
}

pub fn resize(registry: &Registry, args: &ResizeArgs, output: Output) -> anyhow::Result<u8> {
    let img = open_rw(registry, &args.image)?;
    let old = img.size();
    let s = args.size.trim();
    let new = if let Some(d) = s.strip_prefix('+') {
        old.checked_add(parse_size(d)?)
            .context("the size overflows")?
    } else if let Some(d) = s.strip_prefix('-') {
        old.checked_sub(parse_size(d)?)
            .context("the size would be negative")?
    } else {
        parse_size(s)?
    };
    if new < old && !args.shrink {
        bail!("use --shrink to make the image smaller ({old} -> {new} bytes)");
    }
    if new < old && args.force {
        img.discard(new, old - new)?;
    }
    img.resize(new, &mut |_, _| {})?;
    img.close(false)?;
    done(
        output,
        &args.image.file,
        "resize",
        Some(new),
        "Image resized.".into(),
    )
}

pub fn discard(registry: &Registry, args: &DiscardArgs, output: Output) -> anyhow::Result<u8> {
    let img = open_rw(registry, &args.image)?;
    let (off, len) = (parse_size(&args.offset)?, parse_size(&args.length)?);
    img.discard(off, len)?;
    img.close(false)?;
    let d = Done {
        offset: Some(off),
        length: Some(len),
        ..Done::new(&args.image.file, "discard")
    };
    emit_done(
        output,
        &d,
        &format!("discarded {len} bytes at offset {off}"),
    )
}

/// Merges the child's own data into its parent (VirtualBox's VDMerge, qemu-img commit), then
/// points the child at the parent's new identity so the chain stays valid.
pub fn commit(registry: &Registry, args: &CommitArgs, output: Output) -> anyhow::Result<u8> {
    // The parent is opened (and locked) for writing as part of the chain: opening it a second
    // time would conflict with the chain's own read lock on it.
    let chain = Disk::open(
        registry,
        &args.image.file,
        &DiskOptions {
            format: args.image.format.clone(),
            writable_parent: true,
            ..DiskOptions::default()
        },
    )?;
    let [child, parent, ..] = chain.layers() else {
        bail!(
            "{}: not a differencing image; nothing to commit",
            args.image.file.display()
        );
    };
    let parent_path = parent.path().to_path_buf();
    if child.size() > parent.size() {
        parent.resize(child.size(), &mut |_, _| {})?;
    }
    let size = child.size();
    let mut pb = progress_bar(args.progress, size);
    // The child's own ranges, copied by the copy engine: data read through the chain (which
    // finds it in the child), zero ranges made zero in the parent, the rest left as it is.
    vd_core::copy::copy(
        &Source::top_layer(&chain),
        Destination::Image {
            image: parent.as_ref(),
            reads_as_zeros: false,
            file: None,
        },
        &CopyOptions::default(),
        &|n| pb.inc(n),
    )?;
    pb.finish_and_clear();
    parent.flush()?;
    let new_id = parent.modification_uuid();
    chain.close()?;
    if let Ok(id) = new_id {
        let child = open_rw(registry, &args.image)?;
        match child.set_parent_uuid(id) {
            Ok(()) => {}
            Err(e) if e.kind() == ErrorKind::NotSupported => {}
            Err(e) => return Err(e.into()),
        }
        child.close(false)?;
    }
    let d = Done {
        virtual_size: Some(size),
        parent: Some(parent_path.display().to_string()),
        ..Done::new(&args.image.file, "commit")
    };
    emit_done(
        output,
        &d,
        &format!("Image committed into {}.", parent_path.display()),
    )
}

fn parse_uuid(s: &str) -> anyhow::Result<uuid::Uuid> {
    let t = s.trim().trim_start_matches('{').trim_end_matches('}');
    uuid::Uuid::parse_str(t).with_context(|| format!("{s:?} is not a UUID"))
}

/// One UUID `setuuid` set: its value before and after.
#[derive(Debug, Serialize)]
struct UuidChange {
    /// The value before, where the image had one.
    old: Option<uuid::Uuid>,
    new: uuid::Uuid,
}

/// What `setuuid --output json` prints.
#[derive(Debug, Serialize)]
struct SetuuidResult {
    file: String,
    action: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    uuid: Option<UuidChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    modification_uuid: Option<UuidChange>,
    #[serde(skip_serializing_if = "Option::is_none")]
    parent_uuid: Option<UuidChange>,
}

/// The value before a change: `None` when the image has none (or cannot say).
fn old_uuid(r: vd_core::Result<uuid::Uuid>) -> anyhow::Result<Option<uuid::Uuid>> {
    match r {
        Ok(u) => Ok(Some(u)),
        Err(e) if matches!(e.kind(), ErrorKind::NotSupported | ErrorKind::NotFound) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn setuuid(registry: &Registry, args: &SetuuidArgs, output: Output) -> anyhow::Result<u8> {
    let img = open_rw(registry, &args.image)?;
    let mut result = SetuuidResult {
        file: args.image.file.display().to_string(),
        action: "setuuid",
        uuid: None,
        modification_uuid: None,
        parent_uuid: None,
    };
    let any = args.uuid.is_some() || args.modification_uuid.is_some() || args.parent_uuid.is_some();
    if !any || args.uuid.is_some() {
        let u = match &args.uuid {
            Some(s) => parse_uuid(s)?,
            None => uuid::Uuid::new_v4(),
        };
        let old = old_uuid(img.uuid())?;
        img.set_uuid(u)?;
        result.uuid = Some(UuidChange { old, new: u });
    }
    if let Some(s) = &args.modification_uuid {
        let u = parse_uuid(s)?;
        let old = old_uuid(img.modification_uuid())?;
        img.set_modification_uuid(u)?;
        result.modification_uuid = Some(UuidChange { old, new: u });
    }
    if let Some(s) = &args.parent_uuid {
        let u = parse_uuid(s)?;
        let old = old_uuid(img.parent_uuid())?;
        img.set_parent_uuid(u)?;
        result.parent_uuid = Some(UuidChange { old, new: u });
    }
    img.close(false)?;
    emit(output, &result, |out, r| {
        for (label, change) in [
            ("UUID", &r.uuid),
            ("Modification UUID", &r.modification_uuid),
            ("Parent UUID", &r.parent_uuid),
        ] {
            if let Some(c) = change {
                writeln!(out, "{label} changed to: {}", c.new)?;
            }
        }
        Ok(())
    })?;
    Ok(crate::exit::OK)
}

fn parse_chs(s: &str) -> anyhow::Result<Geometry> {
    let v: Vec<u32> = s
        .split('/')
        .map(|p| p.trim().parse::<u32>())
        .collect::<Result<_, _>>()
        .with_context(|| format!("{s:?} is not C/H/S"))?;
    match v.as_slice() {
        [c, h, sec] if *h > 0 && *sec > 0 => Ok(Geometry {
            cylinders: *c,
            heads: *h,
            sectors: *sec,
        }),
        _ => bail!("{s:?} is not C/H/S with non-zero heads and sectors"),
    }
}

#[derive(Debug, Serialize)]
struct Geometries {
    pchs: Geometry,
    lchs: Geometry,
}

pub fn geometry(registry: &Registry, args: &GeometryArgs, output: Output) -> anyhow::Result<u8> {
    let img = if args.pchs.is_some() || args.lchs.is_some() {
        let img = open_rw(registry, &args.image)?;
        if let Some(p) = &args.pchs {
            img.set_pchs_geometry(parse_chs(p)?)?;
        }
        if let Some(l) = &args.lchs {
            img.set_lchs_geometry(parse_chs(l)?)?;
        }
        img
    } else {
        open_ro(registry, &args.image)?
    };
    let g = Geometries {
        pchs: img.pchs_geometry()?,
        lchs: img.lchs_geometry()?,
    };
    img.close(false)?;
    emit(output, &g, |out, g| {
        writeln!(
            out,
            "physical: {}/{}/{}",
            g.pchs.cylinders, g.pchs.heads, g.pchs.sectors
        )?;
        writeln!(
            out,
            "logical: {}/{}/{}",
            g.lchs.cylinders, g.lchs.heads, g.lchs.sectors
        )
    })?;
    Ok(crate::exit::OK)
}

#[derive(Debug, Serialize)]
struct CommentOut {
    comment: Option<String>,
}

pub fn comment(registry: &Registry, args: &CommentArgs, output: Output) -> anyhow::Result<u8> {
    let img = if args.set.is_some() || args.clear {
        let img = open_rw(registry, &args.image)?;
        img.set_comment(if args.clear {
            None
        } else {
            args.set.as_deref()
        })?;
        img
    } else {
        open_ro(registry, &args.image)?
    };
    let c = CommentOut {
        comment: img.comment()?,
    };
    img.close(false)?;
    emit(output, &c, |out, c| match &c.comment {
        Some(t) => writeln!(out, "{}", sanitize(t)),
        None => writeln!(out, "(no comment)"),
    })?;
    Ok(crate::exit::OK)
}

pub fn compact(registry: &Registry, args: &FileArgs, output: Output) -> anyhow::Result<u8> {
    let img = open_rw(registry, args)?;
    let before = img.file_size()?;
    img.compact(&mut |_, _| {})?;
    let after = img.file_size()?;
    img.close(false)?;
    let d = Done {
        file_size_before: Some(before),
        file_size_after: Some(after),
        ..Done::new(&args.file, "compact")
    };
    emit_done(
        output,
        &d,
        &format!("compacted from {before} to {after} bytes"),
    )
}
