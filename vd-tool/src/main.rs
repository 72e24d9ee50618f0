//! `vd-tool`: inspect, probe and convert virtual disk images.
//!
//! Exit codes: 0 success, 1 a check found problems or a comparison found differences, 2 error
//! (including usage errors).

#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::FromArgMatches;

// Link the backends into the static table.
use backend_raw as _;
use backend_vhd as _;
use backend_vhdx as _;

mod cli;
mod commands;
mod exit;
mod help;
mod progress;
mod render;
mod tree;

fn main() -> ExitCode {
    let matches = help::command().get_matches();
    let cli = cli::Cli::from_arg_matches(&matches).unwrap_or_else(|e| e.exit());
    let mut logger = env_logger::Builder::new();
    logger.filter_level(match cli.verbose {
        0 => log::LevelFilter::Warn,
        1 => log::LevelFilter::Info,
        2 => log::LevelFilter::Debug,
        _ => log::LevelFilter::Trace,
    });
    // `mount`: fuser warns about each FUSE operation a file system leaves to the kernel's
    // default and about its own second unmount attempt after one from outside; noise below -vv.
    if cli.verbose < 2 {
        logger.filter_module("fuser", log::LevelFilter::Error);
    }
    logger.parse_env("RUST_LOG").format_timestamp(None).init();
    let started = std::time::Instant::now();
    exit::run(cli.output, || {
        let code = commands::run(&cli)?;
        log::info!(
            "{} finished in {:.3} s (exit code {code})",
            matches.subcommand_name().unwrap_or("vd-tool"),
            started.elapsed().as_secs_f64()
        );
        Ok(code)
    })
}
