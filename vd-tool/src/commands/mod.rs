//! One module per subcommand; each returns data and renders it through [`crate::render`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use anyhow::bail;
use vd_core::{Disk, DiskOptions, OpenFlags, Registry};

use crate::cli::{Cli, Command};

mod backends;
mod bench;
mod check;
mod compare;
mod convert;
mod create;
mod dump;
mod info;
mod io;
mod layout;
mod map;
mod modify;
mod mount;
mod options_help;
mod probe;
mod serve;
mod shell;

/// Runs the command line's subcommand and returns the exit code.
pub fn run(cli: &Cli) -> anyhow::Result<u8> {
    let registry = Registry::builtin();
    match &cli.command {
        Command::Backends => backends::run(&registry, cli.output),
        Command::Probe { file } => probe::run(&registry, file, cli.output),
        Command::Info(args) => info::run(&registry, args, cli.output),
        Command::Convert(args) => convert::run(&registry, args, cli.output),
        Command::Map(args) => map::run(&registry, args, cli.output),
        Command::Layout(args) => layout::run(&registry, args, cli.output),
        Command::Dump(args) => dump::run(&registry, args, cli.output),
        Command::Compare(args) => compare::run(&registry, args, cli.output),
        Command::Create(args) => create::run(&registry, args, cli.output),
        Command::Io(args) => io::run(&registry, args, cli.output),
        Command::Check(args) => check::run(&registry, args, cli.output),
        Command::Resize(args) => modify::resize(&registry, args, cli.output),
        Command::Discard(args) => modify::discard(&registry, args, cli.output),
        Command::Commit(args) => modify::commit(&registry, args, cli.output),
        Command::Setuuid(args) => modify::setuuid(&registry, args, cli.output),
        Command::Geometry(args) => modify::geometry(&registry, args, cli.output),
        Command::Comment(args) => modify::comment(&registry, args, cli.output),
        Command::Compact(args) => modify::compact(&registry, args, cli.output),
        Command::Bench(args) => bench::run(&registry, args, cli.output),
        Command::Serve(args) => serve::run(&registry, args, cli.output),
        Command::Mount(args) => mount::run(&registry, args),
        Command::Completions { shell } => shell::completions(*shell),
        Command::Man { dir } => shell::man(dir.as_deref()),
    }
}

/// Opens `path` with `flags` (for the top image) and its backing chain.
pub fn open_disk_with(
    registry: &Registry,
    path: &Path,
    flags: OpenFlags,
    format: Option<&str>,
    parents: &[PathBuf],
) -> anyhow::Result<Disk> {
    Ok(Disk::open(
        registry,
        path,
        &DiskOptions {
            flags,
            format: format.map(str::to_string),
            parents: parents.to_vec(),
            ..DiskOptions::default()
        },
    )?)
}

/// Progress on stderr for `-p`: a bar on a terminal, plain lines otherwise, nothing when not
/// `enabled`.
pub fn progress_bar(enabled: bool, total: u64) -> crate::progress::Progress {
    crate::progress::Progress::new(enabled, total)
}

/// A page-aligned I/O buffer. The kernel copies to and from page-aligned memory several times
/// faster than to the 16-byte-aligned blocks `malloc` returns for large allocations.
pub struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes starting on a 4 KiB boundary.
    pub fn new(len: usize) -> Self {
        let bytes = vec![0u8; len + 4096];
        let start = bytes.as_ptr().align_offset(4096).min(4096);
        Self { bytes, start, len }
    }

    /// The buffer.
    pub fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
}

/// Parses a size, offset or length as qemu does: decimal or `0x` hex bytes, or a K, M, G, T,
/// P or E suffix (1024-based) with decimals (`1.5G`); the error shows the syntax.
pub fn parse_size(s: &str) -> anyhow::Result<u64> {
    Ok(vd_core::parse_size(s)?)
}

/// Parses a byte pattern, `0` to `255` or `0x00` to `0xff`; the error shows the syntax.
pub fn parse_byte(s: &str) -> anyhow::Result<u8> {
    Ok(vd_core::parse_byte(s)?)
}

/// Parses `key=value,key=value` format options.
pub fn parse_options(s: Option<&str>) -> anyhow::Result<BTreeMap<String, String>> {
    let mut map = BTreeMap::new();
    for item in s.unwrap_or("").split(',').filter(|i| !i.is_empty()) {
        let Some((k, v)) = item.split_once('=') else {
            bail!("option {item:?} is not key=value");
        };
        if map
            .insert(k.trim().to_string(), v.trim().to_string())
            .is_some()
        {
            bail!("option {k:?} is given twice");
        }
    }
    Ok(map)
}

/// The note `create` and `convert` print on standard error when the new image is larger than
/// asked: the backend rounded the size up (the VHD backend does, to a whole MiB, with
/// `azure=on`; the rule is the backend's, this only reports what it did). None when the size is
/// the one asked.
pub fn rounding_note(
    file: &Path,
    format: &str,
    options: &BTreeMap<String, String>,
    asked: u64,
    got: u64,
) -> Option<String> {
    if got == asked {
        return None;
    }
    let why = match options.get("azure") {
        Some(v) => format!("{format} with azure={v}"),
        None => format.to_string(),
    };
    Some(format!(
        "note: {}: virtual size {asked} bytes rounded up to {}, as {why} requires",
        crate::render::sanitize(&file.display().to_string()),
        crate::render::human_size(got)
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_parse_and_reject_garbage() {
        let m = parse_options(Some("a=1,b=x")).unwrap();
        assert_eq!(m.get("a").map(String::as_str), Some("1"));
        assert!(parse_options(Some("a")).is_err());
        assert!(parse_options(Some("a=1,a=2")).is_err());
        assert!(parse_options(None).unwrap().is_empty());
    }
}
