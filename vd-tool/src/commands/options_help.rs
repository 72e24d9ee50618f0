//! `-o help` (create, convert): each format's options with their values and defaults, from the
//! tables the backends parse with ([`vd_core::Backend::create_options`]).

use serde::Serialize;
use vd_core::{CreateOption, Registry};

use crate::cli::Output;
use crate::render::emit;

/// Whether `-o` asks for the list (`help` or qemu's `?`).
pub fn wants_help(options: Option<&str>) -> bool {
    matches!(options.map(str::trim), Some("help" | "?"))
}

#[derive(Debug, Serialize)]
struct FormatOptions {
    format: &'static str,
    options: Vec<OptionHelp>,
}

#[derive(Debug, Serialize)]
struct OptionHelp {
    #[serde(flatten)]
    option: CreateOption,
    /// The values in words, as the human list shows them.
    values: String,
}

#[derive(Debug, Serialize)]
struct Help {
    formats: Vec<FormatOptions>,
}

/// Prints the options of `format` (every format when `None`), in probe order.
///
/// # Errors
/// An unknown format (listing the formats); output errors.
pub fn print(registry: &Registry, format: Option<&str>, output: Output) -> anyhow::Result<u8> {
    let backends = match format {
        Some(f) => vec![registry.backend(f)?.clone()],
        None => registry.backends().to_vec(),
    };
    let help = Help {
        formats: backends
            .iter()
            .map(|b| FormatOptions {
                format: b.name(),
                options: b
                    .create_options()
                    .iter()
                    .map(|o| OptionHelp {
                        option: *o,
                        values: o.kind.describe(),
                    })
                    .collect(),
            })
            .collect(),
    };
    emit(output, &help, |out, h| {
        for (i, f) in h.formats.iter().enumerate() {
            if i > 0 {
                writeln!(out)?;
            }
            if f.options.is_empty() {
                writeln!(out, "{}: no options", f.format)?;
                continue;
            }
            writeln!(out, "{} options (-o key=value,...):", f.format)?;
            for o in &f.options {
                writeln!(
                    out,
                    "  {:<22} {} [default: {}]",
                    o.option.name, o.values, o.option.default
                )?;
                writeln!(out, "  {:<22} {}", "", o.option.help)?;
            }
        }
        Ok(())
    })?;
    Ok(crate::exit::OK)
}
