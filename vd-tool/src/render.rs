//! Rendering command results as human text or JSON.

use std::io::Write;

use serde::Serialize;

use crate::cli::Output;

/// The JSON schema version of every document vd-tool prints.
pub const SCHEMA_VERSION: u32 = 1;

/// Escapes control characters so that strings from untrusted images cannot drive the terminal.
pub fn sanitize(s: &str) -> String {
    s.chars()
        .flat_map(|c| {
            if c.is_control() && c != '\n' && c != '\t' {
                c.escape_default().collect::<Vec<_>>()
            } else {
                vec![c]
            }
        })
        .collect()
}

/// A size as qemu-img prints it: `10 MiB (10485760 bytes)`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut v = bytes as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    let num = if unit == 0 {
        format!("{bytes} B")
    } else if (v - v.round()).abs() < 0.005 {
        format!("{} {}", v.round(), UNITS[unit])
    } else {
        format!("{v:.3} {}", UNITS[unit])
    };
    if unit == 0 {
        num
    } else {
        format!("{num} ({bytes} bytes)")
    }
}

/// A count and its noun, singular for one: `plural(1, "error", "errors")` is `1 error`.
pub fn plural(n: u64, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

/// Writes `value` as one JSON document with `schema_version`, or calls `human` to write text.
pub fn emit<T: Serialize>(
    output: Output,
    value: &T,
    human: impl FnOnce(&mut dyn Write, &T) -> std::io::Result<()>,
) -> anyhow::Result<()> {
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    match output {
        Output::Json => {
            let mut doc = serde_json::to_value(value)?;
            if let Some(obj) = doc.as_object_mut() {
                obj.insert("schema_version".into(), SCHEMA_VERSION.into());
            } else {
                doc = serde_json::json!({ "schema_version": SCHEMA_VERSION, "items": doc });
            }
            serde_json::to_writer_pretty(&mut out, &doc)?;
            writeln!(out)?;
        }
        Output::Human => human(&mut out, value)?,
    }
    out.flush()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_read_like_qemu_img() {
        assert_eq!(human_size(512), "512 B");
        assert_eq!(human_size(10 << 20), "10 MiB (10485760 bytes)");
        assert_eq!(human_size(1536), "1.500 KiB (1536 bytes)");
    }

    #[test]
    fn one_is_singular_and_every_other_count_plural() {
        assert_eq!(plural(0, "error", "errors"), "0 errors");
        assert_eq!(plural(1, "error", "errors"), "1 error");
        assert_eq!(plural(2, "entry", "entries"), "2 entries");
    }

    #[test]
    fn control_characters_are_escaped() {
        assert_eq!(sanitize("a\u{1b}[31mb"), "a\\u{1b}[31mb");
        assert_eq!(sanitize("ok\n"), "ok\n");
    }
}
