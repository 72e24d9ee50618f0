//! The server against raw protocol bytes over a Unix socket: well-formed sessions read the
//! image's bytes, and malformed handshakes and requests get the protocol's error or a closed
//! connection while another connection keeps being served. Numbers are written out here from
//! the specification (`doc/proto.md`), independently of the crate's own table.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use backend_raw as _;
use vd_core::{Disk, DiskOptions, OpenFlags, Registry};
use vd_nbd::{Listener, Server, ServerOptions, ShutdownHandle};

const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;
const OPT_GO: u32 = 7;
const OPT_STRUCTURED_REPLY: u32 = 8;
const OPT_SET_META_CONTEXT: u32 = 10;
const REP_ACK: u32 = 1;
const REP_INFO: u32 = 3;
const REP_META_CONTEXT: u32 = 4;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_TOO_BIG: u32 = (1 << 31) + 9;
const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_BLOCK_STATUS: u16 = 7;
const EPERM: u32 = 1;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

const SIZE: u64 = 4 << 20;

/// The byte at `offset` of the test image.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

/// A server on a socket in a temporary folder, over a 4 MiB raw image holding [`pattern`]
/// in its first 2 MiB and a hole after; stopped (and checked to stop) when dropped.
struct Fixture {
    _dir: tempfile::TempDir,
    socket: PathBuf,
    image: PathBuf,
    stop: ShutdownHandle,
    thread: Option<JoinHandle<std::io::Result<()>>>,
}

impl Fixture {
    fn new(writable: bool) -> Self {
        Self::with(writable, Duration::from_secs(30))
    }

    fn with(writable: bool, handshake_timeout: Duration) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let image = dir.path().join("disk.img");
        let mut bytes: Vec<u8> = (0..SIZE / 2).map(pattern).collect();
        bytes.resize(SIZE as usize, 0);
        std::fs::write(&image, &bytes).expect("write image");
        let flags = if writable {
            OpenFlags::empty()
        } else {
            OpenFlags::READ_ONLY
        };
        let disk = Disk::open(
            &Registry::builtin(),
            &image,
            &DiskOptions {
                flags,
                format: Some("raw".into()),
                ..DiskOptions::default()
            },
        )
        .expect("open the image");
        let socket = dir.path().join("nbd.sock");
        let listener = UnixListener::bind(&socket).expect("bind");
        let server = Server::new(
            Arc::new(disk),
            ServerOptions {
                export_name: "disk".into(),
                writable,
                handshake_timeout,
                ..ServerOptions::default()
            },
        );
        let stop = server.shutdown_handle();
        let thread = std::thread::spawn(move || {
            let r = server.serve(Listener::from(listener));
            let disk = Arc::try_unwrap(server.into_disk()).expect("no connection holds the disk");
            disk.close().expect("close");
            r
        });
        Self {
            _dir: dir,
            socket,
            image,
            stop,
            thread: Some(thread),
        }
    }

    fn connect(&self) -> Client {
        let s = UnixStream::connect(&self.socket).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(20)))
            .expect("timeout");
        Client(s)
    }

    fn image(&self) -> &Path {
        &self.image
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        self.stop.shutdown();
        if let Some(t) = self.thread.take() {
            let r = t.join();
            if !std::thread::panicking() {
                r.expect("the server thread did not panic")
                    .expect("serve ended cleanly");
            }
        }
    }
}

struct Client(UnixStream);

impl Client {
    fn send(&mut self, b: &[u8]) {
        self.0.write_all(b).expect("send");
    }

    fn recv(&mut self, n: usize) -> Vec<u8> {
        let mut b = vec![0u8; n];
        self.0.read_exact(&mut b).expect("receive");
        b
    }

    fn u16(&mut self) -> u16 {
        u16::from_be_bytes(self.recv(2).try_into().unwrap())
    }
    fn u32(&mut self) -> u32 {
        u32::from_be_bytes(self.recv(4).try_into().unwrap())
    }
    fn u64(&mut self) -> u64 {
        u64::from_be_bytes(self.recv(8).try_into().unwrap())
    }

    /// Whether the server has closed the connection (EOF; a reset counts too).
    fn closed(&mut self) -> bool {
        let mut b = [0u8; 1];
        matches!(self.0.read(&mut b), Ok(0) | Err(_))
    }

    /// The server's greeting, answered with fixed newstyle and no zeroes.
    fn greet(&mut self) {
        assert_eq!(&self.recv(8), b"NBDMAGIC");
        assert_eq!(self.u64(), IHAVEOPT);
        assert_eq!(self.u16(), 0b11, "FIXED_NEWSTYLE | NO_ZEROES");
        self.send(&3u32.to_be_bytes());
    }

    fn option(&mut self, option: u32, data: &[u8]) {
        let mut m = IHAVEOPT.to_be_bytes().to_vec();
        m.extend_from_slice(&option.to_be_bytes());
        m.extend_from_slice(&(data.len() as u32).to_be_bytes());
        m.extend_from_slice(data);
        self.send(&m);
    }

    /// One option reply: (option, type, data).
    fn reply(&mut self) -> (u32, u32, Vec<u8>) {
        assert_eq!(self.u64(), OPT_REPLY_MAGIC);
        let option = self.u32();
        let kind = self.u32();
        let len = self.u32() as usize;
        (option, kind, self.recv(len))
    }

    /// `NBD_OPT_GO` for `name` with a block size request; returns (size, flags, block sizes).
    fn go(&mut self, name: &str) -> (u64, u16, Vec<u8>) {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&1u16.to_be_bytes());
        d.extend_from_slice(&3u16.to_be_bytes());
        self.option(OPT_GO, &d);
        let (mut size, mut flags, mut blocks) = (None, None, Vec::new());
        loop {
            let (o, kind, data) = self.reply();
            assert_eq!(o, OPT_GO);
            match kind {
                REP_ACK => break,
                REP_INFO => match u16::from_be_bytes([data[0], data[1]]) {
                    0 => {
                        size = Some(u64::from_be_bytes(data[2..10].try_into().unwrap()));
                        flags = Some(u16::from_be_bytes([data[10], data[11]]));
                    }
                    3 => blocks = data[2..].to_vec(),
                    _ => {}
                },
                other => panic!("NBD_OPT_GO failed with {other:#x}"),
            }
        }
        (
            size.expect("NBD_INFO_EXPORT"),
            flags.expect("flags"),
            blocks,
        )
    }

    fn request(&mut self, flags: u16, kind: u16, cookie: u64, offset: u64, length: u32) {
        let mut m = REQUEST_MAGIC.to_be_bytes().to_vec();
        m.extend_from_slice(&flags.to_be_bytes());
        m.extend_from_slice(&kind.to_be_bytes());
        m.extend_from_slice(&cookie.to_be_bytes());
        m.extend_from_slice(&offset.to_be_bytes());
        m.extend_from_slice(&length.to_be_bytes());
        self.send(&m);
    }

    /// A simple reply's error, checking its cookie.
    fn simple(&mut self, cookie: u64) -> u32 {
        assert_eq!(self.u32(), SIMPLE_REPLY_MAGIC);
        let error = self.u32();
        assert_eq!(self.u64(), cookie);
        error
    }

    /// A simple-reply read of `len` bytes at `offset`, checked against the image.
    fn read_ok(&mut self, offset: u64, len: u32) {
        self.request(0, CMD_READ, 77, offset, len);
        assert_eq!(self.simple(77), 0);
        let data = self.recv(len as usize);
        for (i, b) in data.iter().enumerate() {
            let at = offset + i as u64;
            let want = if at < SIZE / 2 { pattern(at) } else { 0 };
            assert_eq!(*b, want, "byte at {at:#x}");
        }
    }

    /// One structured chunk: (flags, type, payload), checking the cookie.
    fn chunk(&mut self, cookie: u64) -> (u16, u16, Vec<u8>) {
        assert_eq!(self.u32(), STRUCTURED_REPLY_MAGIC);
        let flags = self.u16();
        let kind = self.u16();
        assert_eq!(self.u64(), cookie);
        let len = self.u32() as usize;
        (flags, kind, self.recv(len))
    }
}

fn session(f: &Fixture) -> Client {
    let mut c = f.connect();
    c.greet();
    c
}

#[test]
fn go_read_and_disconnect() {
    let f = Fixture::new(false);
    let mut c = session(&f);
    let (size, flags, blocks) = c.go("disk");
    assert_eq!(size, SIZE);
    // HAS_FLAGS | READ_ONLY | SEND_FLUSH | CAN_MULTI_CONN, and no trim or write zeroes.
    assert_eq!(flags, 1 | 2 | 4 | 256);
    let want: Vec<u8> = [512u32, 4096, 32 << 20]
        .iter()
        .flat_map(|v| v.to_be_bytes())
        .collect();
    assert_eq!(blocks, want, "min 512, preferred 4 KiB, max 32 MiB");
    c.read_ok(0, 4096);
    c.read_ok(SIZE / 2 - 100, 300);
    c.read_ok(SIZE - 512, 512);
    // A flush on a read-only export has nothing to write and succeeds.
    c.request(0, 3, 2, 0, 0);
    assert_eq!(c.simple(2), 0);
    c.request(0, CMD_DISC, 1, 0, 0);
    assert!(c.closed());
    drop(f);
}

#[test]
fn bad_magic_closes_the_connection_only() {
    let f = Fixture::new(false);
    let mut other = session(&f);
    let mut c = session(&f);
    c.send(&0x1234_5678_9abc_def0u64.to_be_bytes());
    c.send(&[0u8; 8]);
    assert!(c.closed(), "a bad option magic closes the connection");
    // A bad request magic, after a good handshake, closes too.
    let mut c = session(&f);
    c.go("");
    let mut m = 0x2560_9514u32.to_be_bytes().to_vec();
    m.extend_from_slice(&[0u8; 24]);
    c.send(&m);
    assert!(c.closed(), "a bad request magic closes the connection");
    other.go("disk");
    other.read_ok(0, 1024);
}

#[test]
fn unknown_client_flags_close() {
    let f = Fixture::new(false);
    let mut c = f.connect();
    c.recv(18);
    c.send(&0x8000_0001u32.to_be_bytes());
    assert!(c.closed());
}

#[test]
fn huge_option_length_is_refused_without_reading_it() {
    let f = Fixture::new(false);
    let mut c = session(&f);
    let mut m = IHAVEOPT.to_be_bytes().to_vec();
    m.extend_from_slice(&OPT_GO.to_be_bytes());
    m.extend_from_slice(&u32::MAX.to_be_bytes());
    c.send(&m);
    let (o, kind, _) = c.reply();
    assert_eq!((o, kind), (OPT_GO, REP_ERR_TOO_BIG));
    assert!(c.closed());
}

#[test]
fn unknown_option_is_unsupported_and_the_session_goes_on() {
    let f = Fixture::new(false);
    let mut c = session(&f);
    c.option(99, b"whatever");
    let (o, kind, _) = c.reply();
    assert_eq!((o, kind), (99, REP_ERR_UNSUP));
    // NBD_OPT_STARTTLS (5) is not offered either.
    c.option(5, &[]);
    assert_eq!(c.reply().1, REP_ERR_UNSUP);
    // An unknown export name is refused with NBD_REP_ERR_UNKNOWN, and the session goes on.
    let mut d = 5u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"other");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(OPT_GO, &d);
    assert_eq!(c.reply().1, (1 << 31) + 6);
    // A name length past the option's end is NBD_REP_ERR_INVALID.
    c.option(OPT_GO, &100u32.to_be_bytes());
    assert_eq!(c.reply().1, (1 << 31) + 3);
    c.go("disk");
    c.read_ok(4096, 4096);
}

#[test]
fn bad_requests_get_errors_and_the_connection_goes_on() {
    let f = Fixture::new(false);
    let mut c = session(&f);
    c.go("disk");
    // Unknown command.
    c.request(0, 42, 1, 0, 512);
    assert_eq!(c.simple(1), EINVAL);
    // Unknown flag on a read.
    c.request(0x100, CMD_READ, 2, 0, 512);
    assert_eq!(c.simple(2), EINVAL);
    // A read past the end, one that wraps around, and one of 4 GiB.
    c.request(0, CMD_READ, 3, SIZE - 512, 1024);
    assert_eq!(c.simple(3), EINVAL);
    c.request(0, CMD_READ, 4, u64::MAX - 10, 512);
    assert_eq!(c.simple(4), EINVAL);
    c.request(0, CMD_READ, 5, 0, u32::MAX);
    assert_eq!(c.simple(5), EINVAL);
    // A write on a read-only export: the payload is read, then refused.
    c.request(0, CMD_WRITE, 6, 0, 4096);
    c.send(&[0xaa; 4096]);
    assert_eq!(c.simple(6), EPERM);
    // Block status without a negotiated context.
    c.request(0, CMD_BLOCK_STATUS, 7, 0, 4096);
    assert_eq!(c.simple(7), EINVAL);
    c.read_ok(0, 8192);
    let before = std::fs::read(f.image()).expect("image");
    drop(c);
    drop(f);
    assert_eq!(before.len() as u64, SIZE);
}

#[test]
fn writes_past_the_end_and_oversized_writes() {
    let f = Fixture::new(true);
    let mut c = session(&f);
    let (_, flags, _) = c.go("disk");
    assert_eq!(flags & 2, 0, "writable: no READ_ONLY flag");
    assert_ne!(flags & (1 << 5), 0, "SEND_TRIM");
    assert_ne!(flags & (1 << 6), 0, "SEND_WRITE_ZEROES");
    c.request(0, CMD_WRITE, 1, SIZE - 512, 1024);
    c.send(&[0x5a; 1024]);
    assert_eq!(c.simple(1), ENOSPC);
    c.request(0, CMD_WRITE, 2, 0, 512);
    c.send(&[0x5a; 512]);
    assert_eq!(c.simple(2), 0);
    c.request(0, 3, 3, 0, 0); // NBD_CMD_FLUSH
    assert_eq!(c.simple(3), 0);
    // A write larger than the maximum payload cannot be skipped: the connection is closed.
    c.request(0, CMD_WRITE, 4, 0, u32::MAX);
    assert!(c.closed());
    drop(f);
}

#[test]
fn disconnect_mid_request_ends_only_that_connection() {
    let f = Fixture::new(true);
    let mut other = session(&f);
    other.go("disk");
    // Half a request header.
    let mut c = session(&f);
    c.go("disk");
    c.send(&REQUEST_MAGIC.to_be_bytes());
    c.send(&[0, 0, 0]);
    drop(c);
    // A write whose payload stops short.
    let mut c = session(&f);
    c.go("disk");
    c.request(0, CMD_WRITE, 9, 0, 65536);
    c.send(&[1u8; 1000]);
    drop(c);
    // Half an option.
    let mut c = session(&f);
    c.send(&IHAVEOPT.to_be_bytes());
    drop(c);
    other.read_ok(0, 65536);
    // The short write wrote nothing: the image is unchanged there.
    let image = std::fs::read(f.image()).expect("image");
    assert_eq!(image[..16], (0..16).map(pattern).collect::<Vec<u8>>()[..]);
}

#[test]
fn structured_read_and_block_status() {
    let f = Fixture::new(false);
    let mut c = session(&f);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    let query = b"base:allocation";
    let mut d = 0u32.to_be_bytes().to_vec(); // the default export
    d.extend_from_slice(&1u32.to_be_bytes());
    d.extend_from_slice(&(query.len() as u32).to_be_bytes());
    d.extend_from_slice(query);
    c.option(OPT_SET_META_CONTEXT, &d);
    let (_, kind, data) = c.reply();
    assert_eq!(kind, REP_META_CONTEXT);
    let id = u32::from_be_bytes(data[..4].try_into().unwrap());
    assert_eq!(&data[4..], query);
    assert_eq!(c.reply().1, REP_ACK);
    c.go("disk");

    c.request(0, CMD_READ, 5, 1000, 3000);
    let (flags, kind, payload) = c.chunk(5);
    assert_eq!((flags & 1, kind), (1, 1), "one final OFFSET_DATA chunk");
    assert_eq!(u64::from_be_bytes(payload[..8].try_into().unwrap()), 1000);
    assert_eq!(
        payload[8..],
        (1000..4000).map(pattern).collect::<Vec<u8>>()[..]
    );
    // Errors of a structured read come as an error chunk.
    c.request(0, CMD_READ, 6, SIZE, 512);
    let (flags, kind, payload) = c.chunk(6);
    assert_eq!((flags & 1, kind), (1, (1 << 15) + 1));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), EINVAL);

    c.request(0, CMD_BLOCK_STATUS, 7, 0, SIZE as u32);
    let (flags, kind, payload) = c.chunk(7);
    assert_eq!((flags & 1, kind), (1, 5));
    assert_eq!(u32::from_be_bytes(payload[..4].try_into().unwrap()), id);
    let extents: Vec<(u32, u32)> = payload[4..]
        .chunks(8)
        .map(|e| {
            (
                u32::from_be_bytes(e[..4].try_into().unwrap()),
                u32::from_be_bytes(e[4..].try_into().unwrap()),
            )
        })
        .collect();
    let total: u64 = extents.iter().map(|e| u64::from(e.0)).sum();
    assert_eq!(total, SIZE, "{extents:?}");
    assert_eq!(extents[0].1, 0, "the image starts with data: {extents:?}");
    // With REQ_ONE, one descriptor no longer than the request.
    c.request(8, CMD_BLOCK_STATUS, 8, 0, 4096);
    let (_, _, payload) = c.chunk(8);
    assert_eq!(payload.len(), 12);
    assert!(u32::from_be_bytes(payload[4..8].try_into().unwrap()) <= 4096);
}

#[test]
fn shutdown_ends_idle_connections_and_serve() {
    let f = Fixture::new(true);
    let mut idle = session(&f);
    idle.go("disk");
    let mut handshaking = session(&f);
    f.stop.shutdown();
    assert!(idle.closed());
    assert!(handshaking.closed());
    drop(f);
}

#[test]
fn more_clients_than_the_limit_are_closed() {
    let f = Fixture::new(false);
    let mut held: Vec<Client> = (0..16).map(|_| session(&f)).collect();
    let mut extra = f.connect();
    assert!(extra.closed(), "the 17th connection is closed");
    held[0].go("disk");
    held[0].read_ok(0, 512);
}

#[test]
fn a_silent_client_is_closed_after_the_handshake_timeout() {
    let f = Fixture::with(false, Duration::from_millis(500));
    let mut silent = f.connect();
    silent.recv(18);
    let mut served = session(&f);
    served.go("disk");
    std::thread::sleep(Duration::from_millis(800));
    assert!(
        silent.closed(),
        "a client silent past the timeout is closed"
    );
    // One that finished its handshake in time is not.
    served.read_ok(0, 512);
}

#[test]
fn list_info_meta_context_listing_export_name_and_abort() {
    let f = Fixture::new(false);
    let mut c = session(&f);
    // NBD_OPT_LIST: one NBD_REP_SERVER naming the export, then NBD_REP_ACK.
    c.option(3, &[]);
    let (o, kind, data) = c.reply();
    assert_eq!((o, kind), (3, 2));
    assert_eq!(data, [&4u32.to_be_bytes()[..], b"disk"].concat());
    assert_eq!(c.reply().1, REP_ACK);
    // NBD_OPT_INFO: NBD_INFO_EXPORT then NBD_REP_ACK, and the handshake goes on.
    let mut d = 4u32.to_be_bytes().to_vec();
    d.extend_from_slice(b"disk");
    d.extend_from_slice(&0u16.to_be_bytes());
    c.option(6, &d);
    let (o, kind, data) = c.reply();
    assert_eq!((o, kind, data.len()), (6, REP_INFO, 12));
    assert_eq!(u64::from_be_bytes(data[2..10].try_into().unwrap()), SIZE);
    assert_eq!(c.reply().1, REP_ACK);
    // Meta contexts need structured replies first.
    let list = [0u32.to_be_bytes(), 0u32.to_be_bytes()].concat();
    c.option(9, &list);
    assert_eq!(c.reply().1, (1 << 31) + 3);
    c.option(OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    // With no queries, the list names base:allocation.
    c.option(9, &list);
    let (o, kind, data) = c.reply();
    assert_eq!((o, kind), (9, REP_META_CONTEXT));
    assert_eq!(&data[4..], b"base:allocation");
    assert_eq!(c.reply().1, REP_ACK);
    // A query of an unknown namespace selects nothing, without error.
    let mut d = [0u32.to_be_bytes(), 1u32.to_be_bytes()].concat();
    d.extend_from_slice(&(b"qemu:dirty-bitmap:x".len() as u32).to_be_bytes());
    d.extend_from_slice(b"qemu:dirty-bitmap:x");
    c.option(OPT_SET_META_CONTEXT, &d);
    assert_eq!(c.reply().1, REP_ACK);
    // NBD_OPT_ABORT is acknowledged and the connection closed.
    c.option(2, &[]);
    assert_eq!(c.reply().1, REP_ACK);
    assert!(c.closed());

    // NBD_OPT_EXPORT_NAME: size and flags, no zeroes (NO_ZEROES was negotiated).
    let mut c = session(&f);
    c.option(1, b"disk");
    assert_eq!(c.u64(), SIZE);
    assert_eq!(c.u16(), 1 | 2 | 4 | 256);
    c.read_ok(512, 512);
    // An unknown name closes the connection (the option has no error reply).
    let mut c = session(&f);
    c.option(1, b"nope");
    assert!(c.closed());
}
