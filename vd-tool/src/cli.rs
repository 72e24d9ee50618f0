//! The command line (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

/// Inspect, probe and convert virtual disk images.
#[derive(Debug, Parser)]
#[command(
    name = "vd-tool",
    version,
    about,
    long_about = "Inspect, probe and convert virtual disk images.\n\n\
        Results go to stdout, logs and errors to stderr. With --output json every command prints \
        one JSON document with a \"schema_version\" field; fields are only ever added within a \
        schema version. Exit codes: 0 success, 1 problems or differences found, 2 error."
)]
pub struct Cli {
    /// More log output on stderr (-v, -vv, -vvv); RUST_LOG also works.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,

    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Human, global = true)]
    pub output: Output,

    /// The command.
    #[command(subcommand)]
    pub command: Command,
}

/// How results are rendered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Text for people.
    Human,
    /// One JSON document.
    Json,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// List the image backends in probe order.
    Backends,
    /// Tell which backend claims a file, and how sure it is.
    Probe {
        /// The file to probe.
        file: PathBuf,
    },
    /// Show facts about an image.
    Info(InfoArgs),
    /// Copy an image into another format (holes stay holes).
    Convert(ConvertArgs),
}

/// Arguments of `info`.
#[derive(Debug, Args)]
pub struct InfoArgs {
    /// Source format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Also show every image of the backing chain.
    #[arg(long)]
    pub backing_chain: bool,
    /// The image.
    pub file: PathBuf,
}

/// Arguments of `convert`.
#[derive(Debug, Args)]
pub struct ConvertArgs {
    /// Source format (otherwise probed).
    #[arg(short = 'f', long = "format")]
    pub format: Option<String>,
    /// Output format.
    #[arg(short = 'O', long = "output-format")]
    pub output_format: String,
    /// Output format options, `key=value,...`.
    #[arg(short = 'o', long = "options")]
    pub options: Option<String>,
    /// Show a progress bar on stderr.
    #[arg(short = 'p', long = "progress")]
    pub progress: bool,
    /// The source image.
    pub source: PathBuf,
    /// The image to write (replaced if it exists).
    pub destination: PathBuf,
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }
}
