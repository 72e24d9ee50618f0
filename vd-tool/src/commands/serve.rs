//! `vd-tool serve`: export the whole disk over NBD (the `vd-nbd` crate) until SIGINT or
//! SIGTERM, then flush and close the image cleanly.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use vd_core::{OpenFlags, Registry};
use vd_nbd::{Listener, Server, ServerOptions};

use crate::cli::{Output, ServeArgs};
use crate::commands::open_disk_with;
use crate::render::{SCHEMA_VERSION, sanitize};

/// The socket file this process created: removed on exit only while it is still that file.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl SocketFile {
    fn remove(&self) {
        match std::fs::symlink_metadata(&self.path) {
            Ok(m) if m.file_type().is_socket() && m.dev() == self.dev && m.ino() == self.ino => {
                if let Err(e) = std::fs::remove_file(&self.path) {
                    log::warn!("removing {}: {e}", self.path.display());
                }
            }
            _ => log::warn!(
                "{} is no longer the socket this server made; left alone",
                self.path.display()
            ),
        }
    }
}

/// `nbd+unix:///NAME?socket=PATH` or `nbd://HOST:PORT/NAME`.
fn uri(socket: Option<&Path>, addr: &str, name: &str) -> String {
    match socket {
        Some(path) => format!("nbd+unix:///{name}?socket={}", path.display()),
        None => format!("nbd://{addr}/{name}"),
    }
}

pub fn run(registry: &Registry, args: &ServeArgs, output: Output) -> anyhow::Result<u8> {
    let flags = if args.writable {
        OpenFlags::empty()
    } else {
        OpenFlags::READ_ONLY
    };
    let disk = open_disk_with(registry, &args.file, flags, args.format.as_deref(), &[])?;
    let size = disk.size();

    let (listener, socket, address) = match (&args.socket, args.port) {
        (Some(path), _) => {
            if std::fs::symlink_metadata(path).is_ok() {
                bail!(
                    "{} already exists (remove it if it is a stale socket)",
                    path.display()
                );
            }
            let l = UnixListener::bind(path)
                .with_context(|| format!("listening on {}", path.display()))?;
            let m = std::fs::symlink_metadata(path)
                .with_context(|| format!("reading {}", path.display()))?;
            let file = SocketFile {
                path: path.clone(),
                dev: m.dev(),
                ino: m.ino(),
            };
            (Listener::from(l), Some(file), path.display().to_string())
        }
        (None, Some(port)) => {
            let l = TcpListener::bind((args.bind.as_str(), port))
                .with_context(|| format!("listening on {}:{port}", args.bind))?;
            let local = l.local_addr().context("reading the bound address")?;
            (Listener::from(l), None, local.to_string())
        }
        (None, None) => bail!("give --socket PATH or --port N"),
    };

    let server = Server::new(
        Arc::new(disk),
        ServerOptions {
            export_name: args.export_name.clone(),
            writable: args.writable,
            ..ServerOptions::default()
        },
    );
    let stop = server.shutdown_handle();
    let mut signals = Signals::new([SIGINT, SIGTERM]).context("installing signal handlers")?;
    let signal_handle = signals.handle();
    let waiter = std::thread::spawn(move || {
        if let Some(sig) = signals.forever().next() {
            log::info!("signal {sig}: stopping");
            stop.shutdown();
        }
    });

    let link = uri(
        socket.as_ref().map(|s| s.path.as_path()),
        &address,
        &args.export_name,
    );
    eprintln!(
        "serving {} on {} ({}, {size} bytes)",
        sanitize(&args.file.display().to_string()),
        sanitize(&link),
        if args.writable {
            "writable"
        } else {
            "read-only"
        }
    );
    if output == Output::Json {
        let doc = serde_json::json!({
            "schema_version": SCHEMA_VERSION,
            "file": args.file.display().to_string(),
            "uri": link,
            "export_name": args.export_name,
            "writable": args.writable,
            "virtual_size": size,
        });
        let mut out = std::io::stdout().lock();
        writeln!(out, "{doc}")?;
        out.flush()?;
    }

    let served = server.serve(listener);
    signal_handle.close();
    if waiter.join().is_err() {
        log::warn!("the signal thread panicked");
    }
    if let Some(s) = &socket {
        s.remove();
    }
    served.context("serving")?;
    match Arc::try_unwrap(server.into_disk()) {
        Ok(disk) => disk
            .close()
            .with_context(|| format!("closing {}", args.file.display()))?,
        Err(_) => bail!("a connection still holds the disk; it was flushed but not closed"),
    }
    log::info!("{} closed", args.file.display());
    Ok(crate::exit::OK)
}
