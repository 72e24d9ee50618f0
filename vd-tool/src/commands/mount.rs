//! `mount`: the disk and its partitions as files in a directory (FUSE), served in the
//! foreground until unmounted or interrupted, then the image is closed cleanly.

use anyhow::Context;
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vd_core::{OpenFlags, Registry};

use crate::cli::MountArgs;
use crate::commands::open_disk_with;

pub fn run(registry: &Registry, args: &MountArgs) -> anyhow::Result<u8> {
    let flags = if args.writable {
        OpenFlags::empty()
    } else {
        OpenFlags::READ_ONLY
    };
    let disk = open_disk_with(registry, &args.file, flags, args.format.as_deref(), &[])
        .with_context(|| format!("opening {}", args.file.display()))?;
    // Signals are caught before mounting, so one arriving meanwhile is not lost: it unmounts
    // as soon as the mount exists.
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("catching SIGINT and SIGTERM")?;
    let options = vd_fuse::MountOptions {
        writable: args.writable,
        allow_other: args.allow_other,
        fs_name: format!("vd:{}", args.file.display()),
        ..vd_fuse::MountOptions::default()
    };
    let mount = match vd_fuse::mount(disk, &args.mountpoint, &options) {
        Ok(mount) => mount,
        Err(failed) => {
            if let Some(disk) = failed.disk
                && let Err(e) = disk.close()
            {
                log::warn!("closing {} after a failed mount: {e}", args.file.display());
            }
            return Err(anyhow::Error::new(failed.error)
                .context(format!("mounting {}", args.file.display())));
        }
    };
    for warning in mount.warnings() {
        log::warn!("partition table: {warning}");
    }
    let names: Vec<&str> = mount.files().iter().map(|f| f.name.as_str()).collect();
    eprintln!(
        "vd-tool: {} mounted {} on {} ({}); unmount with `fusermount3 -u {}` or Ctrl-C",
        args.file.display(),
        if args.writable {
            "writable"
        } else {
            "read-only"
        },
        mount.mountpoint().display(),
        names.join(", "),
        mount.mountpoint().display(),
    );
    let unmounter = mount.unmounter();
    let signal_handle = signals.handle();
    let watcher = std::thread::spawn(move || {
        for signal in signals.forever() {
            log::info!("signal {signal}: unmounting");
            if let Err(e) = unmounter.unmount() {
                eprintln!(
                    "vd-tool: {:#}; still mounted (close the files using it and try again)",
                    anyhow::Error::new(e)
                );
            }
        }
    });
    let ended = mount.wait();
    signal_handle.close();
    if watcher.join().is_err() {
        log::warn!("the signal thread panicked");
    }
    let ended = ended.context("serving the mount")?;
    ended
        .disk
        .close()
        .with_context(|| format!("closing {}", args.file.display()))?;
    ended.session.context("serving the mount")?;
    eprintln!(
        "vd-tool: unmounted {}; image closed",
        args.mountpoint.display()
    );
    Ok(0)
}
