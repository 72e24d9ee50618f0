//! `vd-tool io [-f FMT] [-r] -c CMD ... FILE`: a small qemu-io. Commands: `read [-P PATTERN]
//! OFF LEN` (a pattern mismatch fails the run with exit code 1), `write [-P PATTERN | -z] OFF
//! LEN`, `discard OFF LEN`, `flush`, `sleep MS` (keeps the image open). One line per completed
//! command, as qemu-io prints; with `--output json`, one document listing what each did.

use anyhow::{Context, bail};
use serde::Serialize;
use vd_core::{Disk, OpenFlags, Registry};

use crate::cli::{IoArgs, Output};
use crate::commands::{open_disk_with, parse_byte, parse_size};
use crate::render::emit;

/// What one command did, for `--output json`.
#[derive(Debug, Serialize)]
struct Done {
    /// The command as given.
    command: String,
    /// `read`, `write`, `discard`, `flush` or `sleep`.
    op: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    offset: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    length: Option<u64>,
    /// The byte written, or the byte a read was compared with.
    #[serde(skip_serializing_if = "Option::is_none")]
    pattern: Option<u8>,
    /// Whether `write -z` wrote zeros.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    zero: bool,
    /// `ok`, or `mismatch` when a read's pattern did not match.
    result: &'static str,
    /// The first offset whose byte differs from the pattern, on a mismatch.
    #[serde(skip_serializing_if = "Option::is_none")]
    mismatch_offset: Option<u64>,
    /// How long `sleep` kept the image open.
    #[serde(skip_serializing_if = "Option::is_none")]
    milliseconds: Option<u64>,
}

impl Done {
    fn new(command: &str, op: &'static str) -> Self {
        Self {
            command: command.to_string(),
            op,
            offset: None,
            length: None,
            pattern: None,
            zero: false,
            result: "ok",
            mismatch_offset: None,
            milliseconds: None,
        }
    }

    fn range(mut self, (offset, length): (u64, u64)) -> Self {
        self.offset = Some(offset);
        self.length = Some(length);
        self
    }

    /// The line qemu-io prints for it.
    fn line(&self) -> Option<String> {
        let (off, len) = (self.offset.unwrap_or(0), self.length.unwrap_or(0));
        Some(match (self.op, self.mismatch_offset) {
            ("read", Some(at)) => format!(
                "Pattern verification failed at offset {at}, {} bytes",
                (off + len).saturating_sub(at)
            ),
            ("read", None) => format!("read {len}/{len} bytes at offset {off}"),
            ("write", _) => format!("wrote {len}/{len} bytes at offset {off}"),
            ("discard", _) => format!("discard {len}/{len} bytes at offset {off}"),
            ("flush", _) => "flushed".to_string(),
            _ => return None,
        })
    }
}

/// What `io --output json` prints.
#[derive(Debug, Serialize)]
struct IoResult {
    file: String,
    /// The commands run, in order; a failed pattern check is the last.
    commands: Vec<Done>,
}

/// Runs one command and says what it did (`result` is `mismatch` when a read's pattern did not
/// match).
fn run_command(disk: &Disk, cmd: &str) -> anyhow::Result<Done> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let Some((&name, rest)) = words.split_first() else {
        bail!("empty command");
    };
    let mut pattern = None;
    let mut zero = false;
    let mut args = Vec::new();
    let mut it = rest.iter();
    while let Some(&w) = it.next() {
        match w {
            "-P" => {
                let p = it
                    .next()
                    .with_context(|| format!("{name}: -P needs a pattern"))?;
                pattern = Some(parse_byte(p).with_context(|| format!("{name}: -P"))?);
            }
            "-z" => zero = true,
            "-q" => {}
            _ => args.push(w),
        }
    }
    let range = || -> anyhow::Result<(u64, u64)> {
        match args.as_slice() {
            [off, len] => Ok((
                parse_size(off).with_context(|| format!("{name}: the offset"))?,
                parse_size(len).with_context(|| format!("{name}: the length"))?,
            )),
            _ => bail!("{name}: expected OFFSET LENGTH"),
        }
    };
    Ok(match name {
        "read" => {
            let (off, len) = range()?;
            let mut buf = vec![0u8; usize::try_from(len)?];
            disk.read_at(off, &mut buf)?;
            let mut done = Done::new(cmd, "read").range((off, len));
            done.pattern = pattern;
            if let Some(p) = pattern
                && let Some(i) = buf.iter().position(|&b| b != p)
            {
                done.result = "mismatch";
                done.mismatch_offset = Some(off + i as u64);
            }
            done
        }
        "write" => {
            let (off, len) = range()?;
            let mut done = Done::new(cmd, "write").range((off, len));
            if zero {
                if pattern.is_some() {
                    bail!("write: -P and -z exclude each other");
                }
                disk.write_zeroes(off, len)?;
                done.zero = true;
            } else {
                let p = pattern.unwrap_or(0xcd);
                let buf = vec![p; usize::try_from(len)?];
                disk.write_at(off, &buf)?;
                done.pattern = Some(p);
            }
            done
        }
        "discard" => {
            let (off, len) = range()?;
            disk.discard(off, len)?;
            Done::new(cmd, "discard").range((off, len))
        }
        "flush" => {
            disk.flush()?;
            Done::new(cmd, "flush")
        }
        "sleep" => {
            // As qemu-io's: keeps the image open (and locked) for MS milliseconds.
            let [ms] = args.as_slice() else {
                bail!("sleep: expected MILLISECONDS");
            };
            let ms: u64 = ms
                .parse()
                .with_context(|| format!("sleep: {ms:?} is not a number of milliseconds"))?;
            std::io::Write::flush(&mut std::io::stdout())?;
            std::thread::sleep(std::time::Duration::from_millis(ms));
            let mut done = Done::new(cmd, "sleep");
            done.milliseconds = Some(ms);
            done
        }
        other => bail!("unknown command {other:?} (read, write, discard, flush, sleep)"),
    })
}

pub fn run(registry: &Registry, args: &IoArgs, output: Output) -> anyhow::Result<u8> {
    let flags = if args.read_only {
        args.share.read_only()
    } else {
        args.share.read_only() - OpenFlags::READ_ONLY
    };
    let disk = open_disk_with(registry, &args.file, flags, args.format.as_deref(), &[])?;
    let mut ok = true;
    let mut commands = Vec::new();
    for cmd in &args.commands {
        match run_command(&disk, cmd) {
            Ok(done) => {
                if output == Output::Human
                    && let Some(line) = done.line()
                {
                    println!("{line}");
                }
                ok = done.result == "ok";
                commands.push(done);
                if !ok {
                    break;
                }
            }
            Err(e) => {
                // Keep what was written so far consistent before reporting.
                if let Err(close) = disk.close() {
                    log::warn!("closing after an error: {close}");
                }
                return Err(e.context(format!("{cmd:?}")));
            }
        }
    }
    disk.close()?;
    if output == Output::Json {
        let result = IoResult {
            file: args.file.display().to_string(),
            commands,
        };
        emit(output, &result, |_, _| Ok(()))?;
    }
    Ok(if ok {
        crate::exit::OK
    } else {
        crate::exit::PROBLEMS
    })
}
