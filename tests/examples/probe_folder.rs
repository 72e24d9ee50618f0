//! Probes every regular file in a folder with the statically linked backends and prints
//! `file: backend (confidence)`, or the error.
//!
//! ```text
//! cargo run -p vd-tests --example probe_folder -- [FOLDER]
//! ```
//!
//! `FOLDER` defaults to the current directory. Backends register themselves in vd-core's static
//! table when their crate is linked, so a host names each backend crate it wants once, with
//! `use backend_x as _;` — as this example does for raw and VHDX. (It lives in the `vd-tests`
//! package because vd-core cannot depend on backend crates.) Raw claims any readable file with
//! the lowest confidence, so the interesting answers are the files another format recognises.

use std::path::PathBuf;
use std::process::ExitCode;

use backend_raw as _;
use backend_vhd as _;
use backend_vhdx as _;
use vd_core::Registry;

fn main() -> ExitCode {
    let dir = std::env::args_os()
        .nth(1)
        .map_or_else(|| PathBuf::from("."), PathBuf::from);
    let entries = match std::fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) => {
            eprintln!("{}: cannot list the folder: {e}", dir.display());
            return ExitCode::FAILURE;
        }
    };
    // Regular files (following symbolic links), in name order.
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.metadata().is_ok_and(|m| m.is_file()))
        .collect();
    files.sort();

    let registry = Registry::builtin();
    let names: Vec<_> = registry.backends().iter().map(|b| b.name()).collect();
    println!(
        "probing {} file(s) in {} with {names:?}",
        files.len(),
        dir.display()
    );
    let mut failures = 0;
    for path in &files {
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        match registry.probe(path) {
            Ok(m) => println!(
                "{name}: {} ({})",
                m.backend.name(),
                format!("{:?}", m.confidence).to_lowercase()
            ),
            Err(e) => {
                failures += 1;
                println!("{name}: error: {e}");
            }
        }
    }
    if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
