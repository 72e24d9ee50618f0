//! `vd-tool backends`: the backend table in probe order.

use std::io::Write;

use serde::Serialize;
use vd_core::{Registry, flag_names};

use crate::cli::Output;
use crate::render::{SCHEMA_VERSION, emit};

#[derive(Debug, Serialize)]
struct BackendRow {
    schema_version: u32,
    name: &'static str,
    description: &'static str,
    extensions: Vec<&'static str>,
    capabilities: Vec<&'static str>,
    priority: i32,
}

#[derive(Debug, Serialize)]
struct BackendList {
    backends: Vec<BackendRow>,
}

pub fn run(registry: &Registry, output: Output) -> anyhow::Result<u8> {
    let list = BackendList {
        backends: registry
            .backends()
            .iter()
            .map(|b| BackendRow {
                schema_version: SCHEMA_VERSION,
                name: b.name(),
                description: b.description(),
                extensions: b.extensions().to_vec(),
                capabilities: flag_names(&b.capabilities()),
                priority: b.priority(),
            })
            .collect(),
    };
    if output == Output::Json {
        // The document is the array itself (probe order); each entry carries the schema version.
        let mut out = std::io::stdout().lock();
        serde_json::to_writer_pretty(&mut out, &list.backends)?;
        writeln!(out)?;
        out.flush()?;
        return Ok(crate::exit::OK);
    }
    emit(output, &list, |out, list| {
        let header = ["NAME", "PRIORITY", "EXTENSIONS", "DESCRIPTION"];
        writeln!(
            out,
            "{:<8} {:>11}  {:<16} {}",
            header[0], header[1], header[2], header[3]
        )?;
        for b in &list.backends {
            // The lowest priority is the probe's fallback (raw): say so rather than print i32::MIN.
            let priority = if b.priority == i32::MIN {
                "last".to_string()
            } else {
                b.priority.to_string()
            };
            writeln!(
                out,
                "{:<8} {:>11}  {:<16} {}",
                b.name,
                priority,
                b.extensions.join(","),
                b.description
            )?;
            writeln!(out, "{:<22}capabilities: {}", "", b.capabilities.join(" "))?;
        }
        Ok(())
    })?;
    Ok(crate::exit::OK)
}
