//! `completions` and `man`: shell completion scripts and manual pages, made from the same
//! definitions the parser uses ([`crate::help::command`]).

use std::io::Write;
use std::path::Path;

use anyhow::Context;

use crate::exit;

/// `vd-tool completions SHELL`: the completion script on stdout.
pub fn completions(shell: clap_complete::Shell) -> anyhow::Result<u8> {
    let mut cmd = crate::help::command();
    let mut out = std::io::stdout().lock();
    clap_complete::generate(shell, &mut cmd, "vd-tool", &mut out);
    out.flush()?;
    Ok(exit::OK)
}

/// `vd-tool man [--dir DIR]`: vd-tool(1) on stdout, or vd-tool.1 and one vd-tool-COMMAND.1 per
/// command written into `dir`.
pub fn man(dir: Option<&Path>) -> anyhow::Result<u8> {
    let mut cmd = crate::help::command();
    cmd.build();
    let Some(dir) = dir else {
        let mut out = std::io::stdout().lock();
        clap_mangen::Man::new(cmd).render(&mut out)?;
        out.flush()?;
        return Ok(exit::OK);
    };
    let write = |name: &str, page: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut bytes = Vec::new();
        clap_mangen::Man::new(page).render(&mut bytes)?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        log::info!("wrote {}", path.display());
        Ok(())
    };
    for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
        let name = format!("vd-tool-{}", sub.get_name());
        write(&name, sub.clone().name(name.clone()))?;
    }
    write("vd-tool", cmd)?;
    Ok(exit::OK)
}
