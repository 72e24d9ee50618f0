//! `vd-tool check [-r [leaks|all]] FILE`: exit 0 when clean, 1 when problems were found (and not all
//! repaired), 2 on error. An image too corrupt to open counts as a problem found.
//!
//! A differencing image is checked with its whole chain: each parent is looked up where the
//! child names it, opened read-only, matched against the child's record of it, and checked in
//! turn (never repaired). A parent that is missing, is not the one the child was made from,
//! or cannot be opened is a problem found, naming the paths tried.

use serde::Serialize;
use vd_core::{Disk, DiskOptions, ErrorKind, Finding, ImageFlags, OpenFlags, Registry, Severity};

use crate::cli::{CheckArgs, Output};
use crate::render::{emit, plural, sanitize};

#[derive(Debug, Serialize)]
struct CheckResult {
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'static str>,
    findings: Vec<Finding>,
    /// The parents checked with the image, nearest first.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    parents: Vec<String>,
    errors: usize,
    warnings: usize,
    repaired: usize,
}

pub fn run(registry: &Registry, args: &CheckArgs, output: Output) -> anyhow::Result<u8> {
    // -r leaks repairs what -r all does: vd has no leak repair of its own (see the help).
    let (level, file) = args.repair_and_file()?;
    let repair = level.is_some();
    // With -r and -U together the open refuses: a repair cannot let others write meanwhile.
    let flags = if repair {
        args.share.read_only() - OpenFlags::READ_ONLY
    } else {
        args.share.read_only()
    };
    let open = |flags| match &args.format {
        Some(f) => registry.open_as(f, file, flags),
        None => registry.open(file, flags),
    };
    let cannot_open = |e: &vd_core::Error| {
        let mut f = Finding::from_error(Severity::Error, e);
        f.message = format!("the image cannot be opened: {}", f.message);
        f
    };
    let mut differencing = false;
    let (format, mut findings) = match open(flags) {
        Ok(img) => {
            let report = img.repair(!repair)?;
            let format = img.format();
            differencing = img.image_flags().contains(ImageFlags::DIFF);
            img.close(false)?;
            (Some(format), report.findings)
        }
        // A read-write open refuses a damaged image (a truncated one, say) before it writes
        // anything; the read-only check still lists every problem, none of them repaired.
        Err(e) if repair && matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidHeader) => {
            let mut refused = Finding::from_error(Severity::Error, &e);
            refused.message = format!(
                "not repaired, the image was left unchanged: {}",
                refused.message
            );
            match open(args.share.read_only()) {
                Ok(img) => {
                    let mut report = img.repair(true)?;
                    let format = img.format();
                    differencing = img.image_flags().contains(ImageFlags::DIFF);
                    img.close(false)?;
                    report.findings.push(refused);
                    (Some(format), report.findings)
                }
                Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidHeader) => {
                    let mut f = cannot_open(&e);
                    f.message =
                        format!("not repaired, the image was left unchanged: {}", f.message);
                    (None, vec![f])
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidHeader) => {
            (None, vec![cannot_open(&e)])
        }
        Err(e) => return Err(e.into()),
    };
    let parents = if differencing {
        check_parents(registry, args, file, &mut findings)?
    } else {
        Vec::new()
    };
    let count = |sev| findings.iter().filter(|f| f.severity == sev).count();
    let result = CheckResult {
        filename: file.display().to_string(),
        format,
        parents,
        errors: count(Severity::Error),
        warnings: count(Severity::Warning),
        repaired: findings.iter().filter(|f| f.repaired).count(),
        findings,
    };
    emit(output, &result, |out, r| {
        for f in &r.findings {
            let label = match (f.severity, f.repaired) {
                (_, true) => "Repaired",
                (Severity::Error, false) => "ERROR",
                (Severity::Warning, false) => "Warning",
            };
            writeln!(out, "{label}: {}", sanitize(&f.message))?;
        }
        let unrepaired = r
            .findings
            .iter()
            .filter(|f| f.severity == Severity::Error && !f.repaired)
            .count();
        for p in &r.parents {
            writeln!(
                out,
                "Parent image {}: found, linked and checked.",
                sanitize(p)
            )?;
        }
        if unrepaired == 0 {
            writeln!(out, "No errors were found on the image.")?;
        } else {
            let n = plural(unrepaired as u64, "error was", "errors were");
            writeln!(out, "{n} found on the image.")?;
        }
        if r.repaired > 0 {
            let n = plural(r.repaired as u64, "problem was", "problems were");
            writeln!(out, "{n} repaired.")?;
        }
        Ok(())
    })?;
    let unrepaired = result
        .findings
        .iter()
        .any(|f| f.severity == Severity::Error && !f.repaired);
    Ok(if unrepaired {
        crate::exit::PROBLEMS
    } else {
        crate::exit::OK
    })
}

/// Opens the chain under the differencing image `file` read-only, as every reader of it
/// does ([`Disk::open`]: each parent where the child names it, matched by identity), and checks
/// each parent without repairing it. Appends the parents' findings, each naming its parent,
/// and returns their paths, nearest first. A parent that cannot be found, does not match, or is
/// damaged beyond opening is one finding naming what was tried.
///
/// # Errors
/// Errors that say nothing about the chain (I/O, a lock held by a writer).
fn check_parents(
    registry: &Registry,
    args: &CheckArgs,
    file: &std::path::Path,
    findings: &mut Vec<Finding>,
) -> anyhow::Result<Vec<String>> {
    let opts = DiskOptions {
        flags: args.share.read_only(),
        format: args.format.clone(),
        ..DiskOptions::default()
    };
    let disk = match Disk::open(registry, file, &opts) {
        Ok(disk) => disk,
        Err(e)
            if matches!(
                e.kind(),
                ErrorKind::NotFound
                    | ErrorKind::ParentMismatch
                    | ErrorKind::BadChain
                    | ErrorKind::Corrupt
                    | ErrorKind::InvalidHeader
                    | ErrorKind::UnknownFormat
                    | ErrorKind::NotSupported
            ) =>
        {
            let mut f = Finding::from_error(Severity::Error, &e);
            f.message = format!("the parent image cannot be used: {}", f.message);
            findings.push(f);
            return Ok(Vec::new());
        }
        Err(e) => return Err(e.into()),
    };
    let mut parents = Vec::new();
    for layer in disk.layers().iter().skip(1) {
        let path = layer.path().display().to_string();
        for mut f in layer.repair(true)?.findings {
            f.message = format!("parent image {path}: {}", f.message);
            findings.push(f);
        }
        parents.push(path);
    }
    disk.close()?;
    Ok(parents)
}
