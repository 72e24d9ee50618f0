//! `vd-tool probe FILE`: which backend claims a file.

use std::path::Path;

use serde::Serialize;
use vd_core::{Confidence, Registry};

use crate::cli::Output;
use crate::render::{emit, sanitize};

#[derive(Debug, Serialize)]
struct ProbeResult {
    file: String,
    backend: &'static str,
    confidence: Confidence,
}

pub fn run(registry: &Registry, file: &Path, output: Output) -> anyhow::Result<u8> {
    let m = registry.probe(file)?;
    let result = ProbeResult {
        file: file.display().to_string(),
        backend: m.backend.name(),
        confidence: m.confidence,
    };
    emit(output, &result, |out, r| {
        writeln!(
            out,
            "{}: {} ({})",
            sanitize(&r.file),
            r.backend,
            serde_json::to_value(r.confidence)
                .ok()
                .and_then(|v| v.as_str().map(str::to_owned))
                .unwrap_or_default()
        )
    })?;
    Ok(crate::exit::OK)
}
