//! One client connection: the fixed newstyle handshake, then the transmission phase.

use std::io::{self, Read, Write};
use std::sync::atomic::Ordering;
use std::time::Instant;

use vd_core::{ErrorKind, ExtentKind};

use crate::proto::*;
use crate::{MAX_OPTION_LEN, MAX_PAYLOAD, Shared};

/// The protocol's limit on a string (export name, context name, query).
const MAX_STRING: usize = 4096;
/// Options one handshake may send before the connection is closed (bounds the work of a
/// client that never leaves the handshake).
const MAX_OPTIONS: u32 = 1024;
/// The most descriptors one block status reply carries (the protocol's advice is 2^20).
const MAX_EXTENTS: usize = 1 << 16;

/// Why a connection ends.
#[derive(Debug)]
enum End {
    /// The client closed its side (between messages or in the middle of one).
    Closed,
    /// The server is shutting down.
    Shutdown,
    /// The client broke the protocol; the connection is closed without a reply.
    Protocol(String),
    /// The client asked to end the session.
    Done,
    /// Reading or writing the socket failed.
    Io(io::Error),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => End::Closed,
            _ => End::Io(e),
        }
    }
}

type Step<T> = Result<T, End>;

/// Serves one client until it leaves, breaks the protocol or the server stops.
pub(crate) fn run<S: Read + Write>(shared: &Shared, stream: S, id: u64) {
    let mut conn = Conn {
        shared,
        stream,
        structured: false,
        base_allocation: false,
        buf: Vec::new(),
        deadline: Instant::now().checked_add(shared.handshake_timeout),
    };
    let end = conn
        .handshake()
        .and_then(|go| if go { conn.transmission() } else { Ok(()) });
    match end {
        Ok(()) | Err(End::Done) => log::debug!("NBD client {id}: session ended"),
        Err(End::Closed) => log::debug!("NBD client {id}: disconnected"),
        Err(End::Shutdown) => log::debug!("NBD client {id}: closed for shutdown"),
        Err(End::Protocol(why)) => log::warn!("NBD client {id}: closed: {why}"),
        Err(End::Io(e)) => log::warn!("NBD client {id}: {e}"),
    }
}

/// Big-endian fields from a byte slice; every read is bounds-checked.
struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.0.len() {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u16(&mut self) -> Option<u16> {
        self.take(2)?.try_into().ok().map(u16::from_be_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)?.try_into().ok().map(u32::from_be_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)?.try_into().ok().map(u64::from_be_bytes)
    }
    /// A string with a 32-bit length, at most [`MAX_STRING`] bytes.
    fn string(&mut self) -> Option<&'a [u8]> {
        let len = usize::try_from(self.u32()?).ok()?;
        if len > MAX_STRING {
            return None;
        }
        self.take(len)
    }
    fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// One request header of the transmission phase.
#[derive(Debug, Clone, Copy)]
struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    length: u32,
}

struct Conn<'a, S> {
    shared: &'a Shared,
    stream: S,
    structured: bool,
    base_allocation: bool,
    /// The payload buffer, reused across requests; never larger than [`MAX_PAYLOAD`].
    buf: Vec<u8>,
    /// When the handshake must be over (`None` once in transmission).
    deadline: Option<Instant>,
}

impl<S: Read + Write> Conn<'_, S> {
    /// Fills `buf` from the client. The stream has a read timeout, so a client that sends
    /// nothing lets the loop look at the shutdown flag.
    fn read_full(&mut self, buf: &mut [u8]) -> Step<()> {
        let mut filled = 0;
        while let Some(rest) = buf.get_mut(filled..) {
            if rest.is_empty() {
                break;
            }
            match self.stream.read(rest) {
                Ok(0) => return Err(End::Closed),
                Ok(n) => filled = filled.saturating_add(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    if self.shared.stop.load(Ordering::SeqCst) {
                        return Err(End::Shutdown);
                    }
                    if self.deadline.is_some_and(|d| Instant::now() >= d) {
                        return Err(End::Protocol("the handshake took too long".into()));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    fn read_array<const N: usize>(&mut self) -> Step<[u8; N]> {
        let mut b = [0u8; N];
        self.read_full(&mut b)?;
        Ok(b)
    }

    /// Reads `len` bytes (at most [`MAX_PAYLOAD`], checked by the caller) into `self.buf`.
    fn read_payload(&mut self, len: u32) -> Step<()> {
        let len = usize::try_from(len).map_err(|_| End::Protocol("payload too large".into()))?;
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len, 0);
        let r = self.read_full(&mut buf);
        self.buf = buf;
        r
    }

    fn send(&mut self, bytes: &[u8]) -> Step<()> {
        self.stream.write_all(bytes)?;
        Ok(())
    }

    // ----- handshake -----

    /// Runs the handshake; `Ok(true)` to go on to transmission, `Ok(false)` when the client
    /// aborted.
    fn handshake(&mut self) -> Step<bool> {
        let mut hello = Vec::with_capacity(18);
        hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
        hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
        hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
        self.send(&hello)?;
        let client = u32::from_be_bytes(self.read_array::<4>()?);
        if client & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
            return Err(End::Protocol(format!("unknown client flags {client:#x}")));
        }
        let no_zeroes = client & FLAG_C_NO_ZEROES != 0;
        for _ in 0..MAX_OPTIONS {
            let head = self.read_array::<16>()?;
            let mut c = Cursor(&head);
            let (magic, option, len) = match (c.u64(), c.u32(), c.u32()) {
                (Some(m), Some(o), Some(l)) => (m, o, l),
                _ => return Err(End::Protocol("short option header".into())),
            };
            if magic != IHAVEOPT {
                return Err(End::Protocol(format!("bad option magic {magic:#x}")));
            }
            if len > MAX_OPTION_LEN {
                // Skipping gigabytes of option data is not worth it: say why and close.
                self.reply_error(option, REP_ERR_TOO_BIG, "option data too long")?;
                return Err(End::Protocol(format!(
                    "option {option} with {len} bytes of data"
                )));
            }
            let mut data = vec![0u8; usize::try_from(len).unwrap_or(0)];
            self.read_full(&mut data)?;
            match option {
                OPT_EXPORT_NAME => {
                    if data != self.shared.name.as_bytes() && !data.is_empty() {
                        return Err(End::Protocol(
                            "NBD_OPT_EXPORT_NAME for an unknown export".into(),
                        ));
                    }
                    let mut reply = Vec::with_capacity(134);
                    reply.extend_from_slice(&self.shared.size.to_be_bytes());
                    reply.extend_from_slice(&self.transmission_flags().to_be_bytes());
                    if !no_zeroes {
                        reply.resize(reply.len().saturating_add(124), 0);
                    }
                    self.send(&reply)?;
                    return Ok(true);
                }
                OPT_ABORT => {
                    // The client may already be gone; either way the session ends.
                    let _ = self.reply(option, REP_ACK, &[]);
                    return Err(End::Done);
                }
                OPT_LIST => {
                    if !data.is_empty() {
                        self.reply_error(option, REP_ERR_INVALID, "NBD_OPT_LIST takes no data")?;
                        continue;
                    }
                    let name = self.shared.name.clone();
                    let mut body = Vec::with_capacity(name.len().saturating_add(4));
                    body.extend_from_slice(&len_u32(name.len()).to_be_bytes());
                    body.extend_from_slice(name.as_bytes());
                    self.reply(option, REP_SERVER, &body)?;
                    self.reply(option, REP_ACK, &[])?;
                }
                OPT_INFO | OPT_GO => {
                    if self.info(option, &data)? && option == OPT_GO {
                        return Ok(true);
                    }
                }
                OPT_STRUCTURED_REPLY => {
                    if data.is_empty() {
                        self.structured = true;
                        self.reply(option, REP_ACK, &[])?;
                    } else {
                        self.reply_error(
                            option,
                            REP_ERR_INVALID,
                            "NBD_OPT_STRUCTURED_REPLY takes no data",
                        )?;
                    }
                }
                OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, &data)?,
                _ => self.reply_error(option, REP_ERR_UNSUP, "option not supported")?,
            }
        }
        Err(End::Protocol(format!("more than {MAX_OPTIONS} options")))
    }

    fn transmission_flags(&self) -> u16 {
        let mut flags = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_CAN_MULTI_CONN;
        if self.shared.writable {
            flags |= FLAG_SEND_FUA | FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES;
        } else {
            flags |= FLAG_READ_ONLY;
        }
        flags
    }

    fn is_our_name(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.shared.name.as_bytes()
    }

    /// `NBD_OPT_INFO` / `NBD_OPT_GO`; `Ok(true)` when the export was accepted.
    fn info(&mut self, option: u32, data: &[u8]) -> Step<bool> {
        let mut c = Cursor(data);
        let Some(name) = c.string() else {
            self.reply_error(option, REP_ERR_INVALID, "bad export name length")?;
            return Ok(false);
        };
        let mut requests = Vec::new();
        let count = c.u16();
        for _ in 0..count.unwrap_or(0) {
            match c.u16() {
                Some(r) => requests.push(r),
                None => break,
            }
        }
        if count.is_none() || requests.len() != usize::from(count.unwrap_or(0)) || !c.is_empty() {
            self.reply_error(option, REP_ERR_INVALID, "malformed information requests")?;
            return Ok(false);
        }
        if !self.is_our_name(name) {
            self.reply_error(option, REP_ERR_UNKNOWN, "no such export")?;
            return Ok(false);
        }
        let mut export = Vec::with_capacity(12);
        export.extend_from_slice(&INFO_EXPORT.to_be_bytes());
        export.extend_from_slice(&self.shared.size.to_be_bytes());
        export.extend_from_slice(&self.transmission_flags().to_be_bytes());
        self.reply(option, REP_INFO, &export)?;
        if requests.contains(&INFO_NAME) {
            let mut body = INFO_NAME.to_be_bytes().to_vec();
            body.extend_from_slice(self.shared.name.as_bytes());
            self.reply(option, REP_INFO, &body)?;
        }
        if requests.contains(&INFO_BLOCK_SIZE) {
            let mut body = Vec::with_capacity(14);
            body.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
            body.extend_from_slice(&self.shared.min_block.to_be_bytes());
            body.extend_from_slice(&self.shared.preferred_block.to_be_bytes());
            body.extend_from_slice(&MAX_PAYLOAD.to_be_bytes());
            self.reply(option, REP_INFO, &body)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(true)
    }

    /// `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT` with `base:allocation`.
    fn meta_context(&mut self, option: u32, data: &[u8]) -> Step<()> {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // A SET replaces the selection even when it fails.
            self.base_allocation = false;
        }
        if !self.structured {
            return self.reply_error(option, REP_ERR_INVALID, "structured replies first");
        }
        let mut c = Cursor(data);
        let (Some(name), Some(count)) = (c.string(), c.u32()) else {
            return self.reply_error(option, REP_ERR_INVALID, "malformed meta context request");
        };
        let mut queries = Vec::new();
        for _ in 0..count {
            match c.string() {
                Some(q) => queries.push(q),
                None => {
                    return self.reply_error(option, REP_ERR_INVALID, "malformed query");
                }
            }
        }
        if !c.is_empty() {
            return self.reply_error(option, REP_ERR_INVALID, "trailing data");
        }
        if !self.is_our_name(name) {
            return self.reply_error(option, REP_ERR_UNKNOWN, "no such export");
        }
        if queries.iter().any(|q| !q.contains(&b':')) {
            return self.reply_error(option, REP_ERR_INVALID, "a query has no namespace");
        }
        let matches = if set {
            queries.iter().any(|q| *q == BASE_ALLOCATION.as_bytes())
        } else {
            queries.is_empty()
                || queries
                    .iter()
                    .any(|q| *q == b"base:" || *q == BASE_ALLOCATION.as_bytes())
        };
        if matches {
            let mut body = Vec::with_capacity(BASE_ALLOCATION.len().saturating_add(4));
            // The one context's id when selected; lists carry 0.
            body.extend_from_slice(&u32::from(set).to_be_bytes());
            body.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &body)?;
            self.base_allocation = set;
        }
        self.reply(option, REP_ACK, &[])
    }

    fn reply(&mut self, option: u32, kind: u32, data: &[u8]) -> Step<()> {
        let mut out = Vec::with_capacity(data.len().saturating_add(20));
        out.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&option.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&len_u32(data.len()).to_be_bytes());
        out.extend_from_slice(data);
        self.send(&out)
    }

    fn reply_error(&mut self, option: u32, kind: u32, message: &str) -> Step<()> {
        self.reply(option, kind, message.as_bytes())
    }

    // ----- transmission -----

    fn transmission(&mut self) -> Step<()> {
        self.deadline = None;
        loop {
            let head = self.read_array::<28>()?;
            let mut c = Cursor(&head);
            let fields = (c.u32(), c.u16(), c.u16(), c.u64(), c.u64(), c.u32());
            let (Some(magic), Some(flags), Some(kind), Some(cookie), Some(offset), Some(length)) =
                fields
            else {
                return Err(End::Protocol("short request header".into()));
            };
            if magic != REQUEST_MAGIC {
                return Err(End::Protocol(format!("bad request magic {magic:#x}")));
            }
            let req = Request {
                flags,
                kind,
                cookie,
                offset,
                length,
            };
            if kind == CMD_WRITE {
                if length > MAX_PAYLOAD {
                    return Err(End::Protocol(format!("write of {length} bytes")));
                }
                self.read_payload(length)?;
            }
            if kind == CMD_DISC {
                return Err(End::Done);
            }
            self.serve(req)?;
        }
    }

    /// Checks `offset + length` against the disk size.
    fn in_range(&self, req: Request) -> bool {
        req.offset
            .checked_add(u64::from(req.length))
            .is_some_and(|end| end <= self.shared.size)
    }

    fn serve(&mut self, req: Request) -> Step<()> {
        let allowed = match req.kind {
            CMD_READ => CMD_FLAG_DF,
            CMD_WRITE => CMD_FLAG_FUA,
            CMD_FLUSH => 0,
            CMD_TRIM => CMD_FLAG_FUA,
            CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
            CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
            _ => return self.error(req, EINVAL, "unknown command"),
        };
        if req.flags & !allowed != 0 {
            return self.error(req, EINVAL, "unknown or invalid command flags");
        }
        let disk = &self.shared.disk;
        let result = match req.kind {
            CMD_READ => return self.read(req),
            CMD_BLOCK_STATUS => return self.block_status(req),
            CMD_FLUSH => disk.flush(),
            CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES => {
                if !self.shared.writable {
                    return self.error(req, EPERM, "the export is read-only");
                }
                if !self.in_range(req) {
                    let e = if req.kind == CMD_TRIM { EINVAL } else { ENOSPC };
                    return self.error(req, e, "beyond the end of the export");
                }
                let len = u64::from(req.length);
                let done = match req.kind {
                    CMD_WRITE => {
                        let buf = std::mem::take(&mut self.buf);
                        let r = disk.write_at(req.offset, &buf);
                        self.buf = buf;
                        r
                    }
                    // A trim is advisory: an image that cannot discard ignores it.
                    CMD_TRIM => match disk.discard(req.offset, len) {
                        Err(e) if e.kind() == ErrorKind::NotSupported => Ok(()),
                        other => other,
                    },
                    _ => disk.write_zeroes(req.offset, len),
                };
                match done {
                    Ok(()) if req.flags & CMD_FLAG_FUA != 0 => disk.flush(),
                    other => other,
                }
            }
            // Every other kind returned above.
            _ => return self.error(req, EINVAL, "unknown command"),
        };
        match result {
            Ok(()) => self.simple(req, 0),
            Err(e) => {
                log::warn!("NBD request {} at {:#x}: {e:#}", req.kind, req.offset);
                self.error(req, errno(e.kind()), "the disk failed the request")
            }
        }
    }

    fn read(&mut self, req: Request) -> Step<()> {
        if req.length > MAX_PAYLOAD {
            return self.error(req, EINVAL, "read longer than the maximum payload");
        }
        if !self.in_range(req) {
            return self.error(req, EINVAL, "read beyond the end of the export");
        }
        let len = usize::try_from(req.length).unwrap_or(0);
        let mut buf = std::mem::take(&mut self.buf);
        buf.resize(len, 0);
        let result = self.shared.disk.read_at(req.offset, &mut buf);
        let sent = match result {
            Err(e) => {
                log::warn!("NBD read at {:#x}: {e:#}", req.offset);
                self.error(req, errno(e.kind()), "the disk failed the read")
            }
            Ok(()) if !self.structured => {
                let mut head = Vec::with_capacity(16);
                push_simple(&mut head, 0, req.cookie);
                self.stream
                    .write_all(&head)
                    .and_then(|()| self.stream.write_all(&buf))
                    .map_err(End::from)
            }
            Ok(()) if buf.is_empty() => self.chunk(req, REPLY_TYPE_NONE, &[], &[]),
            Ok(()) => self.chunk(req, REPLY_TYPE_OFFSET_DATA, &req.offset.to_be_bytes(), &buf),
        };
        self.buf = buf;
        sent
    }

    fn block_status(&mut self, req: Request) -> Step<()> {
        if !self.base_allocation {
            return self.error(req, EINVAL, "no metadata context was selected");
        }
        if req.length == 0 || !self.in_range(req) {
            return self.error(req, EINVAL, "block status beyond the end of the export");
        }
        let extents = match self.shared.disk.map(req.offset, u64::from(req.length)) {
            Ok(e) => e,
            Err(e) => {
                log::warn!("NBD block status at {:#x}: {e:#}", req.offset);
                return self.error(req, errno(e.kind()), "the disk failed to map the range");
            }
        };
        let limit = if req.flags & CMD_FLAG_REQ_ONE != 0 {
            1
        } else {
            MAX_EXTENTS
        };
        let mut body =
            Vec::with_capacity(4usize.saturating_add(extents.len().min(limit).saturating_mul(8)));
        body.extend_from_slice(&1u32.to_be_bytes());
        let mut count = 0usize;
        for e in extents.iter().filter(|e| e.length > 0).take(limit) {
            // Extents lie inside the request, whose length is a u32.
            let Ok(length) = u32::try_from(e.length) else {
                break;
            };
            let state = match e.kind {
                ExtentKind::Data => 0,
                ExtentKind::Zero | ExtentKind::Unallocated => STATE_HOLE | STATE_ZERO,
            };
            body.extend_from_slice(&length.to_be_bytes());
            body.extend_from_slice(&state.to_be_bytes());
            count = count.saturating_add(1);
        }
        if count == 0 {
            return self.error(req, EIO, "the disk mapped nothing");
        }
        self.chunk(req, REPLY_TYPE_BLOCK_STATUS, &body, &[])
    }

    /// A simple reply without payload.
    fn simple(&mut self, req: Request, error: u32) -> Step<()> {
        let mut out = Vec::with_capacity(16);
        push_simple(&mut out, error, req.cookie);
        self.send(&out)
    }

    /// An error reply: a structured error chunk for reads when structured replies are on,
    /// otherwise a simple reply.
    fn error(&mut self, req: Request, error: u32, message: &str) -> Step<()> {
        log::debug!(
            "NBD request {} at {:#x}+{:#x}: error {error}: {message}",
            req.kind,
            req.offset,
            req.length
        );
        if self.structured && req.kind == CMD_READ {
            let mut body = Vec::with_capacity(6usize.saturating_add(message.len()));
            body.extend_from_slice(&error.to_be_bytes());
            // The messages are this file's own short constants.
            let msg = message
                .as_bytes()
                .get(..message.len().min(MAX_STRING))
                .unwrap_or(&[]);
            body.extend_from_slice(&u16::try_from(msg.len()).unwrap_or(0).to_be_bytes());
            body.extend_from_slice(msg);
            self.chunk(req, REPLY_TYPE_ERROR, &body, &[])
        } else {
            self.simple(req, error)
        }
    }

    /// One structured reply chunk (the final one) with payload `head` then `data`.
    fn chunk(&mut self, req: Request, kind: u16, head: &[u8], data: &[u8]) -> Step<()> {
        let len = head.len().saturating_add(data.len());
        let mut out = Vec::with_capacity(head.len().saturating_add(20));
        out.extend_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
        out.extend_from_slice(&REPLY_FLAG_DONE.to_be_bytes());
        out.extend_from_slice(&kind.to_be_bytes());
        out.extend_from_slice(&req.cookie.to_be_bytes());
        out.extend_from_slice(&len_u32(len).to_be_bytes());
        out.extend_from_slice(head);
        self.stream.write_all(&out)?;
        if !data.is_empty() {
            self.stream.write_all(data)?;
        }
        Ok(())
    }
}

fn push_simple(out: &mut Vec<u8>, error: u32, cookie: u64) {
    out.extend_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&error.to_be_bytes());
    out.extend_from_slice(&cookie.to_be_bytes());
}

/// A length the server itself made (bounded by [`MAX_PAYLOAD`] plus a header) as a wire u32.
fn len_u32(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

/// The NBD error for a disk error.
fn errno(kind: ErrorKind) -> u32 {
    match kind {
        ErrorKind::ReadOnly => EPERM,
        ErrorKind::OutOfRange | ErrorKind::InvalidArgument => EINVAL,
        _ => EIO,
    }
}
