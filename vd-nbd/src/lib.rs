//! An NBD (Network Block Device) server over a [`vd_core::Disk`]: any image vd opens (a
//! differencing chain through its parents, a VHDX with a dirty log replayed in memory, a
//! 4K-sector image) exported to NBD clients such as `qemu-img`, `qemu-io`, `nbdcopy` or the
//! kernel's `nbd-client`.
//!
//! The protocol is implemented from its specification (the `nbd` project's `doc/proto.md`):
//!
//! - **Handshake:** fixed newstyle only, with `NBD_FLAG_NO_ZEROES`. Options: `NBD_OPT_GO`,
//!   `NBD_OPT_INFO` (`NBD_INFO_EXPORT`, `NBD_INFO_NAME`, `NBD_INFO_BLOCK_SIZE`),
//!   `NBD_OPT_LIST`, `NBD_OPT_ABORT`, `NBD_OPT_EXPORT_NAME`, `NBD_OPT_STRUCTURED_REPLY`,
//!   `NBD_OPT_LIST_META_CONTEXT` and `NBD_OPT_SET_META_CONTEXT` with the `base:allocation`
//!   context. Any other option gets `NBD_REP_ERR_UNSUP` and the handshake goes on.
//! - **Transmission:** `READ` (one data chunk when structured replies are negotiated), `WRITE`,
//!   `FLUSH`, `TRIM` (→ [`Disk::discard`]), `WRITE_ZEROES`, `BLOCK_STATUS` for
//!   `base:allocation` (from [`Disk::map`]: data is `0`, zeros are `NBD_STATE_HOLE |
//!   NBD_STATE_ZERO`, since [`Disk::map`] reports no allocated zeros), `DISC`, and the `FUA`
//!   flag (a flush after the write).
//! - **Exports:** one, under the name in [`ServerOptions::export_name`] (the empty name, the
//!   default export, selects it too). Read-only (`NBD_FLAG_READ_ONLY`; writes get `NBD_EPERM`)
//!   unless [`ServerOptions::writable`]. `NBD_FLAG_CAN_MULTI_CONN` is set: every connection
//!   shares the one [`Disk`], so a flush on any connection flushes what all of them wrote.
//! - **Block sizes:** minimum = the image's logical sector size (1 when the disk size is not
//!   a multiple of it), preferred = at least 4 KiB, maximum payload = [`MAX_PAYLOAD`]. Requests
//!   that are not aligned are served anyway ([`Disk`] widens them).
//!
//! # Security
//!
//! Every byte a client sends is untrusted. The parser is strict: a bad magic or unknown client
//! flags close the connection; option data is bounded by [`MAX_OPTION_LEN`] (a longer option
//! gets `NBD_REP_ERR_TOO_BIG` and the connection is closed), names by 4096 bytes; a request's
//! length is bounded by [`MAX_PAYLOAD`] before any buffer is allocated, and its range is
//! checked against the disk size (`NBD_EINVAL`, or `NBD_ENOSPC` for writes); unknown commands
//! and flags get `NBD_EINVAL`. A client that misbehaves or disconnects ends only its own
//! connection; other connections go on. No client value sizes an allocation beyond these
//! bounds, and nothing a client sends can panic the server.
//!
//! # Example
//!
//! ```no_run
//! use std::os::unix::net::UnixListener;
//! use std::sync::Arc;
//! use vd_core::{Disk, DiskOptions, Registry};
//! use vd_nbd::{Listener, Server, ServerOptions};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let disk = Disk::open(&Registry::builtin(), "disk.vhdx".as_ref(), &DiskOptions::default())?;
//! let server = Server::new(Arc::new(disk), ServerOptions::default());
//! let stop = server.shutdown_handle();
//! // Another thread (a signal handler, a UI) calls `stop.shutdown()` to end `serve`.
//! # stop.shutdown();
//! server.serve(Listener::from(UnixListener::bind("/tmp/disk.sock")?))?;
//! // Every connection has ended and the disk is flushed: close it.
//! if let Ok(disk) = Arc::try_unwrap(server.into_disk()) {
//!     disk.close()?;
//! }
//! # Ok(())
//! # }
//! ```

#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic,
        clippy::arithmetic_side_effects
    )
)]
#![warn(clippy::cast_possible_truncation)]

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use vd_core::Disk;

mod proto;
mod session;

/// The largest `READ` or `WRITE` payload (32 MiB), advertised as the maximum block size. A
/// larger read gets `NBD_EINVAL`; a larger write closes the connection (its payload cannot be
/// skipped without reading it).
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The largest option data accepted during the handshake (8 KiB: a name of the protocol's
/// 4096-byte limit plus its counts and queries).
pub const MAX_OPTION_LEN: u32 = 8 << 10;

/// How often idle connections and the accept loop look at the shutdown flag.
const POLL: Duration = Duration::from_millis(100);

/// How long a reply may wait for a client that does not read: past this the connection is
/// closed, so a stalled client cannot hold a shutdown (or its thread) forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// How a [`Server`] exports its disk.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// The export's name (the empty name, the default export, always selects it too).
    pub export_name: String,
    /// Accept writes; otherwise the export is read-only and writes get `NBD_EPERM`.
    pub writable: bool,
    /// Connections served at once; one over the limit is closed at once.
    pub max_connections: usize,
    /// How long a client may take over the handshake before its connection is closed (a
    /// client that connects and says nothing would otherwise hold one of the
    /// [`max_connections`](ServerOptions::max_connections) slots for ever).
    pub handshake_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            export_name: String::new(),
            writable: false,
            max_connections: 16,
            handshake_timeout: Duration::from_secs(30),
        }
    }
}

/// A socket to accept NBD clients on.
#[derive(Debug)]
pub enum Listener {
    /// A Unix domain socket (`nbd+unix:///?socket=PATH`).
    Unix(UnixListener),
    /// A TCP socket (`nbd://HOST:PORT`).
    Tcp(TcpListener),
}

impl From<UnixListener> for Listener {
    fn from(l: UnixListener) -> Self {
        Listener::Unix(l)
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Self {
        Listener::Tcp(l)
    }
}

impl Listener {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Listener::Unix(l) => l.set_nonblocking(on),
            Listener::Tcp(l) => l.set_nonblocking(on),
        }
    }

    fn accept(&self) -> io::Result<Stream> {
        Ok(match self {
            Listener::Unix(l) => Stream::Unix(l.accept()?.0),
            Listener::Tcp(l) => {
                let s = l.accept()?.0;
                // Replies are written whole; small ones must not wait for Nagle.
                s.set_nodelay(true)?;
                Stream::Tcp(s)
            }
        })
    }
}

/// One client connection.
#[derive(Debug)]
enum Stream {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Stream {
    fn prepare(&self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => {
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                s.set_read_timeout(Some(POLL))
            }
            Stream::Tcp(s) => {
                s.set_nonblocking(false)?;
                s.set_write_timeout(Some(WRITE_TIMEOUT))?;
                s.set_read_timeout(Some(POLL))
            }
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.read(buf),
            Stream::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Unix(s) => s.write(buf),
            Stream::Tcp(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Unix(s) => s.flush(),
            Stream::Tcp(s) => s.flush(),
        }
    }
}

/// Ends a running [`Server::serve`]: it stops accepting, lets each connection finish the
/// request it is serving (connections waiting for a request are closed; a reply to a client
/// that stopped reading gives up after 60 s), flushes the disk and returns. Cheap to clone and safe to use from any thread (or a signal-handling thread).
#[derive(Debug, Clone)]
pub struct ShutdownHandle {
    flag: Arc<AtomicBool>,
}

impl ShutdownHandle {
    /// Asks the server to stop; returns at once.
    pub fn shutdown(&self) {
        self.flag.store(true, Ordering::SeqCst);
    }

    /// Whether a shutdown was asked for.
    pub fn is_shutdown(&self) -> bool {
        self.flag.load(Ordering::SeqCst)
    }
}

/// One of the [`ServerOptions::max_connections`] slots, given back when dropped.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What every connection of a server shares.
#[derive(Debug)]
struct Shared {
    disk: Arc<Disk>,
    name: String,
    writable: bool,
    size: u64,
    min_block: u32,
    preferred_block: u32,
    handshake_timeout: Duration,
    stop: Arc<AtomicBool>,
}

/// An NBD server exporting one [`Disk`]. See the [crate documentation](crate) for the protocol
/// subset and the limits.
#[derive(Debug)]
pub struct Server {
    shared: Arc<Shared>,
    max_connections: usize,
}

impl Server {
    /// A server for `disk`. The disk must have been opened writable for
    /// [`ServerOptions::writable`] to be of use (otherwise the disk refuses each write, and
    /// the client gets `NBD_EPERM`).
    pub fn new(disk: Arc<Disk>, options: ServerOptions) -> Self {
        let size = disk.size();
        let sector = disk.top().sector_size().max(1);
        let min_block = if sector.is_power_of_two()
            && sector <= 64 << 10
            && size.is_multiple_of(u64::from(sector))
        {
            sector
        } else {
            1
        };
        Self {
            shared: Arc::new(Shared {
                disk,
                name: options.export_name,
                writable: options.writable,
                size,
                min_block,
                preferred_block: min_block.max(4096),
                handshake_timeout: options.handshake_timeout,
                stop: Arc::new(AtomicBool::new(false)),
            }),
            max_connections: options.max_connections.max(1),
        }
    }

    /// A handle that stops [`serve`](Server::serve).
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
            flag: Arc::clone(&self.shared.stop),
        }
    }

    /// Accepts clients on `listener`, each served on its own thread, until a
    /// [`ShutdownHandle`] stops it; then waits for the connections to end and flushes the disk.
    ///
    /// # Errors
    /// Making the listener non-blocking; a failed final flush (as [`io::Error`] wrapping the
    /// [`vd_core::Error`]). Errors accepting one client or on one connection are logged and
    /// end only that connection.
    pub fn serve(&self, listener: Listener) -> io::Result<()> {
        listener.set_nonblocking(true)?;
        let active = Arc::new(AtomicUsize::new(0));
        let mut workers: Vec<JoinHandle<()>> = Vec::new();
        let mut next_id: u64 = 0;
        while !self.shared.stop.load(Ordering::SeqCst) {
            let (done, running): (Vec<_>, Vec<_>) =
                workers.into_iter().partition(JoinHandle::is_finished);
            workers = running;
            for w in done {
                if w.join().is_err() {
                    log::error!("an NBD connection thread panicked");
                }
            }
            let stream = match listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    thread::sleep(POLL);
                    continue;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, a client gone before accept: keep serving the others.
                    log::warn!("accepting an NBD client: {e}");
                    thread::sleep(POLL);
                    continue;
                }
            };
            next_id = next_id.wrapping_add(1);
            if active.load(Ordering::SeqCst) >= self.max_connections {
                log::warn!(
                    "NBD client {next_id} refused: {} connections already",
                    self.max_connections
                );
                continue;
            }
            if let Err(e) = stream.prepare() {
                log::warn!("NBD client {next_id}: {e}");
                continue;
            }
            active.fetch_add(1, Ordering::SeqCst);
            let shared = Arc::clone(&self.shared);
            let counter = Arc::clone(&active);
            let id = next_id;
            let spawned = thread::Builder::new()
                .name(format!("nbd-{id}"))
                .spawn(move || {
                    // Frees the slot however the session ends, a panic included.
                    let _slot = Slot(counter);
                    session::run(&shared, stream, id);
                });
            match spawned {
                Ok(h) => workers.push(h),
                Err(e) => {
                    active.fetch_sub(1, Ordering::SeqCst);
                    log::warn!("NBD client {id}: no thread: {e}");
                }
            }
        }
        for w in workers {
            if w.join().is_err() {
                log::error!("an NBD connection thread panicked");
            }
        }
        self.shared.disk.flush().map_err(io::Error::other)
    }

    /// The disk, for closing it once [`serve`](Server::serve) has returned (then no
    /// connection holds it any more).
    pub fn into_disk(self) -> Arc<Disk> {
        Arc::clone(&self.shared.disk)
    }
}
