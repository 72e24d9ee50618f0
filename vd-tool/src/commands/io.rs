//! `vd-tool io [-f FMT] [-r] -c CMD ... FILE`: a small qemu-io. Commands: `read [-P PATTERN]
//! OFF LEN` (a pattern mismatch fails the run with exit code 1), `write [-P PATTERN | -z] OFF
//! LEN`, `discard OFF LEN`, `flush`, `sleep MS` (keeps the image open). One line per completed command, as qemu-io prints.

use anyhow::{Context, bail};
use vd_core::{Disk, OpenFlags, Registry};

use crate::cli::IoArgs;
use crate::commands::{open_disk_with, parse_byte, parse_size};

/// Runs one command; `Ok(false)` when a read's pattern did not match.
fn run_command(disk: &Disk, cmd: &str) -> anyhow::Result<bool> {
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
    match name {
        "read" => {
            let (off, len) = range()?;
            let mut buf = vec![0u8; usize::try_from(len)?];
            disk.read_at(off, &mut buf)?;
            if let Some(p) = pattern
                && let Some(i) = buf.iter().position(|&b| b != p)
            {
                println!(
                    "Pattern verification failed at offset {}, {} bytes",
                    off + i as u64,
                    len - i as u64
                );
                return Ok(false);
            }
            println!("read {len}/{len} bytes at offset {off}");
        }
        "write" => {
            let (off, len) = range()?;
            if zero {
                if pattern.is_some() {
                    bail!("write: -P and -z exclude each other");
                }
                disk.write_zeroes(off, len)?;
            } else {
                let buf = vec![pattern.unwrap_or(0xcd); usize::try_from(len)?];
                disk.write_at(off, &buf)?;
            }
            println!("wrote {len}/{len} bytes at offset {off}");
        }
        "discard" => {
            let (off, len) = range()?;
            disk.discard(off, len)?;
            println!("discard {len}/{len} bytes at offset {off}");
        }
        "flush" => {
            disk.flush()?;
            println!("flushed");
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
        }
        other => bail!("unknown command {other:?} (read, write, discard, flush, sleep)"),
    }
    Ok(true)
}

pub fn run(registry: &Registry, args: &IoArgs) -> anyhow::Result<u8> {
    let flags = if args.read_only {
        args.share.read_only()
    } else {
        args.share.read_only() - OpenFlags::READ_ONLY
    };
    let disk = open_disk_with(registry, &args.file, flags, args.format.as_deref(), &[])?;
    let mut ok = true;
    for cmd in &args.commands {
        match run_command(&disk, cmd) {
            Ok(true) => {}
            Ok(false) => {
                ok = false;
                break;
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
    Ok(if ok {
        crate::exit::OK
    } else {
        crate::exit::PROBLEMS
    })
}
