//! One module per subcommand; each returns data and renders it through [`crate::render`].

use std::collections::BTreeMap;

use anyhow::bail;
use vd_core::Registry;

use crate::cli::{Cli, Command};

mod backends;
mod convert;
mod info;
mod probe;

/// Runs the command line's subcommand and returns the exit code.
pub fn run(cli: &Cli) -> anyhow::Result<u8> {
    let registry = Registry::builtin();
    match &cli.command {
        Command::Backends => backends::run(&registry, cli.output),
        Command::Probe { file } => probe::run(&registry, file, cli.output),
        Command::Info(args) => info::run(&registry, args, cli.output),
        Command::Convert(args) => convert::run(&registry, args, cli.output),
    }
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
