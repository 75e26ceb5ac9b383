//! A small blocking NBD client for the process-level tests: fixed newstyle
//! handshake with NO_ZEROES, OPT_GO without info requests, simple replies
//! only (structured replies are never negotiated, so a server that sends one
//! is a protocol error here), and pipelining: `send_*` puts a request on the
//! wire and returns its cookie, `recv` / `wait` read replies by cookie, in
//! whatever order the server sends them.
//!
//! Every failure is an `io::Error`: a dead server (EOF, reset) or a stuck one
//! (read/write timeouts, 30 s by default) gives an error, never a hang. An NBD
//! error reply to a blocking call (`write`, `read`, ...) is an error of kind
//! `Other` whose inner error is an [`NbdError`]; see [`nbd_errno`].
//!
//! Include it from a test crate with
//! `#[path = "common/nbd_client.rs"] mod nbd_client;`.
#![allow(dead_code)]

use nbd::consts::*;
use std::collections::HashMap;
use std::fmt;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream, ToSocketAddrs};
use std::time::Duration;

/// Default read/write timeout on the socket.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An NBD error reply (the wire error value) to one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdError {
    pub errno: u32,
    pub command: &'static str,
    pub offset: u64,
    pub len: u32,
}

impl fmt::Display for NbdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "NBD {} at {}+{} failed: {} ({})",
            self.command,
            self.offset,
            self.len,
            errno_name(self.errno),
            self.errno
        )
    }
}

impl std::error::Error for NbdError {}

/// The NBD error value inside an error returned by this client, if it is an
/// error reply (not a transport error).
pub fn nbd_errno(e: &io::Error) -> Option<u32> {
    e.get_ref()
        .and_then(|i| i.downcast_ref::<NbdError>())
        .map(|n| n.errno)
}

pub fn errno_name(e: u32) -> &'static str {
    match e {
        0 => "OK",
        EPERM => "EPERM",
        EIO => "EIO",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        ENOSPC => "ENOSPC",
        EOVERFLOW => "EOVERFLOW",
        ENOTSUP => "ENOTSUP",
        ESHUTDOWN => "ESHUTDOWN",
        _ => "unknown",
    }
}

pub fn command_name(ty: u16) -> &'static str {
    match ty {
        CMD_READ => "READ",
        CMD_WRITE => "WRITE",
        CMD_DISC => "DISC",
        CMD_FLUSH => "FLUSH",
        CMD_TRIM => "TRIM",
        CMD_CACHE => "CACHE",
        CMD_WRITE_ZEROES => "WRITE_ZEROES",
        CMD_BLOCK_STATUS => "BLOCK_STATUS",
        _ => "?",
    }
}

fn proto_err(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// One reply read off the wire.
#[derive(Debug, Clone)]
pub struct Reply {
    pub cookie: u64,
    /// NBD error value (0 = success).
    pub error: u32,
    /// READ payload (empty for other commands and for failed reads).
    pub data: Vec<u8>,
    pub command: u16,
    pub offset: u64,
    pub len: u32,
}

impl Reply {
    /// `Ok(self)` if the server reported success, else the NBD error.
    pub fn ok(self) -> io::Result<Reply> {
        if self.error == 0 {
            Ok(self)
        } else {
            Err(io::Error::other(NbdError {
                errno: self.error,
                command: command_name(self.command),
                offset: self.offset,
                len: self.len,
            }))
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct InFlight {
    command: u16,
    offset: u64,
    len: u32,
}

/// A connection to one export.
pub struct NbdClient {
    s: TcpStream,
    size: u64,
    flags: u16,
    next_cookie: u64,
    in_flight: HashMap<u64, InFlight>,
    /// Replies read while waiting for another cookie.
    stash: HashMap<u64, Reply>,
}

impl NbdClient {
    /// Connect to `addr` (e.g. "127.0.0.1:10809") and negotiate `export`.
    pub fn connect(addr: &str, export: &str) -> io::Result<NbdClient> {
        Self::connect_timeout(addr, export, DEFAULT_TIMEOUT)
    }

    /// As `connect`, with `timeout` for connecting and for every later
    /// socket read and write.
    pub fn connect_timeout(addr: &str, export: &str, timeout: Duration) -> io::Result<NbdClient> {
        let sa: SocketAddr = addr.to_socket_addrs()?.next().ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("no address for {addr}"),
            )
        })?;
        let s = TcpStream::connect_timeout(&sa, timeout)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        let mut c = NbdClient {
            s,
            size: 0,
            flags: 0,
            next_cookie: 1,
            in_flight: HashMap::new(),
            stash: HashMap::new(),
        };
        c.handshake(export)?;
        Ok(c)
    }

    fn handshake(&mut self, export: &str) -> io::Result<()> {
        let mut g = [0u8; 18];
        self.s.read_exact(&mut g)?;
        let magic = u64::from_be_bytes(g[0..8].try_into().unwrap());
        let opt = u64::from_be_bytes(g[8..16].try_into().unwrap());
        if magic != NBDMAGIC || opt != IHAVEOPT {
            return Err(proto_err(format!(
                "bad greeting {magic:#x} {opt:#x} (not fixed newstyle)"
            )));
        }
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        if hflags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(proto_err(format!(
                "server handshake flags {hflags:#x} lack FIXED_NEWSTYLE"
            )));
        }
        let mut cflags = CLIENT_FIXED_NEWSTYLE;
        if hflags & FLAG_NO_ZEROES != 0 {
            cflags |= CLIENT_NO_ZEROES;
        }
        self.s.write_all(&cflags.to_be_bytes())?;

        // NBD_OPT_GO: export name, zero info requests.
        let mut data = Vec::with_capacity(6 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::with_capacity(16 + data.len());
        opt.extend_from_slice(&IHAVEOPT.to_be_bytes());
        opt.extend_from_slice(&OPT_GO.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        self.s.write_all(&opt)?;

        let mut export_info = None;
        loop {
            let mut h = [0u8; 20];
            self.s.read_exact(&mut h)?;
            let magic = u64::from_be_bytes(h[0..8].try_into().unwrap());
            let option = u32::from_be_bytes(h[8..12].try_into().unwrap());
            let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
            if magic != OPTION_REPLY_MAGIC || option != OPT_GO {
                return Err(proto_err(format!(
                    "bad option reply header magic {magic:#x} option {option}"
                )));
            }
            if len > MAX_OPTION_LEN {
                return Err(proto_err(format!("option reply of {len} bytes")));
            }
            let mut d = vec![0u8; len as usize];
            self.s.read_exact(&mut d)?;
            match rtype {
                REP_ACK => break,
                REP_INFO => {
                    if d.len() >= 2 && u16::from_be_bytes([d[0], d[1]]) == INFO_EXPORT {
                        if d.len() != 12 {
                            return Err(proto_err(format!("NBD_INFO_EXPORT of {} bytes", d.len())));
                        }
                        let size = u64::from_be_bytes(d[2..10].try_into().unwrap());
                        let flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                        export_info = Some((size, flags));
                    }
                }
                t if t & 0x8000_0000 != 0 => {
                    return Err(io::Error::other(format!(
                        "OPT_GO for export {export:?} refused: reply {t:#x} {}",
                        String::from_utf8_lossy(&d)
                    )));
                }
                t => return Err(proto_err(format!("unexpected OPT_GO reply type {t:#x}"))),
            }
        }
        let (size, flags) =
            export_info.ok_or_else(|| proto_err("OPT_GO acked without NBD_INFO_EXPORT".into()))?;
        self.size = size;
        self.flags = flags;
        Ok(())
    }

    /// Export size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Transmission flags (`TFLAG_*`).
    pub fn flags(&self) -> u16 {
        self.flags
    }

    /// Requests sent whose reply has not been returned by `recv`/`wait` yet.
    pub fn in_flight(&self) -> usize {
        self.in_flight.len() + self.stash.len()
    }

    /// Change the socket timeouts.
    pub fn set_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.s.set_read_timeout(Some(t))?;
        self.s.set_write_timeout(Some(t))
    }

    // ---------------------------------------------------------- pipelined

    fn send(
        &mut self,
        flags: u16,
        command: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.next_cookie;
        self.next_cookie += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&command.to_be_bytes());
        h[8..16].copy_from_slice(&cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        // Register first: a request whose send fails half way may still be
        // acted on by the server, and the caller must know it was issued.
        if command != CMD_DISC {
            self.in_flight.insert(
                cookie,
                InFlight {
                    command,
                    offset,
                    len,
                },
            );
        }
        if payload.len() <= 64 * 1024 {
            let mut v = Vec::with_capacity(28 + payload.len());
            v.extend_from_slice(&h);
            v.extend_from_slice(payload);
            self.s.write_all(&v)?;
        } else {
            self.s.write_all(&h)?;
            self.s.write_all(payload)?;
        }
        Ok(cookie)
    }

    /// Send a WRITE; returns its cookie.
    pub fn send_write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<u64> {
        let len = u32::try_from(data.len())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "write too large"))?;
        self.send(
            if fua { CMD_FLAG_FUA } else { 0 },
            CMD_WRITE,
            offset,
            len,
            data,
        )
    }

    pub fn send_read(&mut self, offset: u64, len: u32) -> io::Result<u64> {
        self.send(0, CMD_READ, offset, len, &[])
    }

    pub fn send_flush(&mut self) -> io::Result<u64> {
        self.send(0, CMD_FLUSH, 0, 0, &[])
    }

    pub fn send_trim(&mut self, offset: u64, len: u32, fua: bool) -> io::Result<u64> {
        self.send(
            if fua { CMD_FLAG_FUA } else { 0 },
            CMD_TRIM,
            offset,
            len,
            &[],
        )
    }

    /// WRITE_ZEROES; `no_hole` sets NBD_CMD_FLAG_NO_HOLE.
    pub fn send_write_zeroes(
        &mut self,
        offset: u64,
        len: u32,
        fua: bool,
        no_hole: bool,
    ) -> io::Result<u64> {
        let mut f = 0;
        if fua {
            f |= CMD_FLAG_FUA;
        }
        if no_hole {
            f |= CMD_FLAG_NO_HOLE;
        }
        self.send(f, CMD_WRITE_ZEROES, offset, len, &[])
    }

    /// Read the next reply off the wire (or a stashed one), whatever its
    /// cookie. An NBD error is returned inside the `Reply`, not as `Err`.
    pub fn recv(&mut self) -> io::Result<Reply> {
        if let Some(&k) = self.stash.keys().next() {
            return Ok(self.stash.remove(&k).unwrap());
        }
        self.read_reply()
    }

    fn read_reply(&mut self) -> io::Result<Reply> {
        if self.in_flight.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "recv with no request in flight",
            ));
        }
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into().unwrap());
        if magic == STRUCTURED_REPLY_MAGIC {
            return Err(proto_err(
                "structured reply received but structured replies were not negotiated".into(),
            ));
        }
        if magic != SIMPLE_REPLY_MAGIC {
            return Err(proto_err(format!("bad reply magic {magic:#x}")));
        }
        let error = u32::from_be_bytes(r[4..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap());
        let req = self.in_flight.remove(&cookie).ok_or_else(|| {
            proto_err(format!("reply for unknown cookie {cookie} (error {error})"))
        })?;
        let mut data = Vec::new();
        if req.command == CMD_READ && error == 0 {
            data = vec![0u8; req.len as usize];
            self.s.read_exact(&mut data)?;
        }
        Ok(Reply {
            cookie,
            error,
            data,
            command: req.command,
            offset: req.offset,
            len: req.len,
        })
    }

    /// Read replies until the one for `cookie` arrives (others are kept for
    /// later `recv`/`wait` calls).
    pub fn wait(&mut self, cookie: u64) -> io::Result<Reply> {
        if let Some(r) = self.stash.remove(&cookie) {
            return Ok(r);
        }
        if !self.in_flight.contains_key(&cookie) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("cookie {cookie} is not in flight"),
            ));
        }
        loop {
            let r = self.read_reply()?;
            if r.cookie == cookie {
                return Ok(r);
            }
            self.stash.insert(r.cookie, r);
        }
    }

    // ---------------------------------------------------------- blocking

    pub fn write(&mut self, offset: u64, data: &[u8], fua: bool) -> io::Result<()> {
        let c = self.send_write(offset, data, fua)?;
        self.wait(c)?.ok().map(|_| ())
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let c = self.send_read(offset, len)?;
        Ok(self.wait(c)?.ok()?.data)
    }

    pub fn flush(&mut self) -> io::Result<()> {
        let c = self.send_flush()?;
        self.wait(c)?.ok().map(|_| ())
    }

    pub fn trim(&mut self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        let c = self.send_trim(offset, len, fua)?;
        self.wait(c)?.ok().map(|_| ())
    }

    pub fn write_zeroes(&mut self, offset: u64, len: u32, fua: bool) -> io::Result<()> {
        let c = self.send_write_zeroes(offset, len, fua, false)?;
        self.wait(c)?.ok().map(|_| ())
    }

    /// Read `len` bytes at `offset` in `chunk`-sized READs with up to
    /// `depth` of them in flight.
    pub fn read_range(
        &mut self,
        offset: u64,
        len: u64,
        chunk: u32,
        depth: usize,
    ) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; len as usize];
        let mut next = 0u64;
        let mut pending: HashMap<u64, u64> = HashMap::new();
        while next < len || !pending.is_empty() {
            while next < len && pending.len() < depth.max(1) {
                let n = (len - next).min(chunk as u64) as u32;
                let c = self.send_read(offset + next, n)?;
                pending.insert(c, next);
                next += n as u64;
            }
            let r = self.recv()?;
            let at = pending.remove(&r.cookie).ok_or_else(|| {
                io::Error::new(io::ErrorKind::InvalidInput, "read_range: foreign reply")
            })?;
            let r = r.ok()?;
            out[at as usize..at as usize + r.data.len()].copy_from_slice(&r.data);
        }
        Ok(out)
    }

    /// Wait for every request in flight; returns their replies (errors
    /// included) in arrival order.
    pub fn drain(&mut self) -> io::Result<Vec<Reply>> {
        let mut v: Vec<Reply> = self.stash.drain().map(|(_, r)| r).collect();
        while !self.in_flight.is_empty() {
            v.push(self.read_reply()?);
        }
        Ok(v)
    }

    /// NBD_CMD_DISC after waiting for outstanding replies, then close.
    pub fn disconnect(mut self) -> io::Result<()> {
        self.drain()?;
        self.send(0, CMD_DISC, 0, 0, &[])?;
        let _ = self.s.shutdown(Shutdown::Write);
        // The server closes its side; reading EOF confirms it.
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => Ok(()),
            Ok(_) => Err(proto_err("data after NBD_CMD_DISC".into())),
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => Ok(()),
            Err(e) => Err(e),
        }
    }
}
