//! `vd-tool check [-r [leaks|all]] FILE`: exit 0 when clean, 1 when problems were found (and not all
//! repaired), 2 on error. An image too corrupt to open counts as a problem found.

use serde::Serialize;
use vd_core::{ErrorKind, Finding, OpenFlags, Registry, Severity};

use crate::cli::{CheckArgs, Output};
use crate::render::{emit, plural, sanitize};

#[derive(Debug, Serialize)]
struct CheckResult {
    filename: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    format: Option<&'static str>,
    findings: Vec<Finding>,
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
    let (format, findings) = match open(flags) {
        Ok(img) => {
            let report = img.repair(!repair)?;
            let format = img.format();
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
                    img.close(false)?;
                    report.findings.push(refused);
                    (Some(format), report.findings)
                }
                Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidHeader) => {
                    (None, vec![cannot_open(&e)])
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(e) if matches!(e.kind(), ErrorKind::Corrupt | ErrorKind::InvalidHeader) => {
            (None, vec![cannot_open(&e)])
        }
        Err(e) => return Err(e.into()),
    };
    let count = |sev| findings.iter().filter(|f| f.severity == sev).count();
    let result = CheckResult {
        filename: file.display().to_string(),
        format,
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
