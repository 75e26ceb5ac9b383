//! Server side of the fixed-newstyle handshake, as a sans-I/O state machine.
//!
//! Owns: the greeting, client-flag checks, option haggling (EXPORT_NAME, ABORT,
//! LIST, INFO, GO, STRUCTURED_REPLY, LIST/SET_META_CONTEXT; everything else is
//! answered ERR_UNSUP and the next option is still parsed) and the result of the
//! negotiation. Bytes go in with [`Handshake::feed`], reply bytes come out in the
//! caller's buffer. Never touches a socket, never blocks, never panics on input.

use crate::consts::*;
use crate::wire::{put_u16, put_u32, put_u64, Reader};

/// What the server offers for one export.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExportInfo {
    /// The export's name; the empty name always selects the first export.
    pub name: String,
    pub description: String,
    pub size: u64,
    /// Transmission flags offered (HAS_FLAGS is added, SEND_DF only with
    /// structured replies).
    pub flags: u16,
    pub min_block: u32,
    pub preferred_block: u32,
    pub max_block: u32,
}

/// The outcome of a successful handshake.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Negotiated {
    /// Index into the export list given to [`Handshake::new`].
    pub export: usize,
    pub size: u64,
    /// Transmission flags as sent to the client.
    pub flags: u16,
    pub structured_replies: bool,
    /// Context id of `base:allocation` if the client selected it.
    pub base_allocation: Option<u32>,
    pub max_payload: u32,
}

/// Why the handshake ended without reaching transmission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeEnd {
    /// The client sent NBD_OPT_ABORT; the ACK is in the output buffer.
    Aborted,
    /// The client violated a MUST of the protocol; close without a reply.
    ProtocolViolation(String),
    /// EXPORT_NAME for an export that does not exist: the spec's only answer
    /// is to close the connection.
    UnknownExport(String),
    /// EXPORT_NAME while the server shuts down (see
    /// [`Handshake::shut_down`]): it has no error reply, so close.
    ShuttingDown,
}

/// Result of feeding bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HandshakeStatus {
    /// More input is needed.
    Continue,
    /// Transmission starts with the byte after `consumed`.
    Done(Negotiated),
    /// Send what is in the output buffer, then close.
    End(HandshakeEnd),
}

#[derive(Debug)]
enum State {
    ClientFlags,
    Options,
    /// Discarding the payload of an oversized option before replying.
    Discard {
        option: u32,
        remaining: u64,
    },
    Finished,
}

/// Context id given to `base:allocation`.
pub const BASE_ALLOCATION_ID: u32 = 1;

/// One connection's handshake.
#[derive(Debug)]
pub struct Handshake {
    exports: Vec<ExportInfo>,
    state: State,
    /// The client set C_FIXED_NEWSTYLE. Without it only EXPORT_NAME is
    /// understood (plain newstyle has no option replies to fall back on).
    fixed: bool,
    no_zeroes: bool,
    structured: bool,
    /// Export name the meta context selection was made for, if any.
    meta_export: Option<String>,
    meta_selected: bool,
    /// Every option but ABORT gets NBD_REP_ERR_SHUTDOWN.
    shutting_down: bool,
}

/// Bytes the server sends first.
pub fn greeting(out: &mut Vec<u8>) {
    put_u64(out, NBDMAGIC);
    put_u64(out, IHAVEOPT);
    put_u16(out, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
}

enum InfoRequest {
    Name(String),
    Requests(String, Vec<u16>),
}

impl Handshake {
    pub fn new(exports: Vec<ExportInfo>) -> Self {
        assert!(!exports.is_empty(), "a server needs at least one export");
        Handshake {
            exports,
            state: State::ClientFlags,
            fixed: false,
            no_zeroes: false,
            structured: false,
            meta_export: None,
            meta_selected: false,
            shutting_down: false,
        }
    }

    /// The server is shutting down: from now on every option but ABORT is
    /// answered with NBD_REP_ERR_SHUTDOWN (the spec: the server "SHOULD
    /// error further options received (other than an NBD_OPT_ABORT) with
    /// NBD_REP_ERR_SHUTDOWN"), and EXPORT_NAME, which has no error reply,
    /// ends the handshake.
    pub fn shut_down(&mut self) {
        self.shutting_down = true;
    }

    /// Consume as much of `input` as forms complete messages, appending replies
    /// to `out`. Returns how many bytes were consumed and the status. After
    /// `Done`, bytes past `consumed` belong to the transmission phase.
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> (usize, HandshakeStatus) {
        let mut used = 0;
        loop {
            let rest = &input[used..];
            match self.state {
                State::Finished => return (used, HandshakeStatus::Continue),
                State::ClientFlags => {
                    if rest.len() < 4 {
                        return (used, HandshakeStatus::Continue);
                    }
                    let flags = u32::from_be_bytes(rest[..4].try_into().unwrap());
                    used += 4;
                    if flags & !(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES) != 0 {
                        self.state = State::Finished;
                        return (
                            used,
                            HandshakeStatus::End(HandshakeEnd::ProtocolViolation(format!(
                                "client sent unknown handshake flags {flags:#x}"
                            ))),
                        );
                    }
                    self.no_zeroes = flags & CLIENT_NO_ZEROES != 0;
                    self.fixed = flags & CLIENT_FIXED_NEWSTYLE != 0;
                    self.state = State::Options;
                }
                State::Discard { option, remaining } => {
                    let take = (rest.len() as u64).min(remaining) as usize;
                    used += take;
                    let remaining = remaining - take as u64;
                    if remaining > 0 {
                        self.state = State::Discard { option, remaining };
                        return (used, HandshakeStatus::Continue);
                    }
                    self.state = State::Options;
                    option_error(out, option, REP_ERR_TOO_BIG, "option data too large");
                }
                State::Options => {
                    if rest.len() < 16 {
                        return (used, HandshakeStatus::Continue);
                    }
                    let magic = u64::from_be_bytes(rest[..8].try_into().unwrap());
                    let option = u32::from_be_bytes(rest[8..12].try_into().unwrap());
                    let len = u32::from_be_bytes(rest[12..16].try_into().unwrap());
                    if magic != IHAVEOPT {
                        self.state = State::Finished;
                        return (
                            used,
                            HandshakeStatus::End(HandshakeEnd::ProtocolViolation(format!(
                                "bad option magic {magic:#x}"
                            ))),
                        );
                    }
                    if !self.fixed && option != OPT_EXPORT_NAME {
                        // A plain-newstyle client cannot read an option
                        // reply: close, as for any option the server cannot
                        // answer in that mode.
                        self.state = State::Finished;
                        return (
                            used,
                            HandshakeStatus::End(HandshakeEnd::ProtocolViolation(format!(
                                "option {option} from a client without fixed newstyle"
                            ))),
                        );
                    }
                    if len > MAX_OPTION_LEN && option == OPT_EXPORT_NAME {
                        // EXPORT_NAME has no error reply: a name no export
                        // can have ends the session at once.
                        used += 16;
                        self.state = State::Finished;
                        return (
                            used,
                            HandshakeStatus::End(HandshakeEnd::UnknownExport(format!(
                                "<a name of {len} bytes>"
                            ))),
                        );
                    }
                    if len > MAX_OPTION_LEN {
                        used += 16;
                        self.state = State::Discard {
                            option,
                            remaining: len as u64,
                        };
                        continue;
                    }
                    if rest.len() < 16 + len as usize {
                        return (used, HandshakeStatus::Continue);
                    }
                    let data = &rest[16..16 + len as usize];
                    used += 16 + len as usize;
                    if let Some(status) = self.option(option, data, out) {
                        self.state = State::Finished;
                        return (used, status);
                    }
                }
            }
        }
    }

    fn find(&self, name: &str) -> Option<usize> {
        if name.is_empty() {
            return Some(0);
        }
        self.exports.iter().position(|e| e.name == name)
    }

    fn flags_for(&self, export: usize) -> u16 {
        let mut flags = self.exports[export].flags | TFLAG_HAS_FLAGS;
        if !self.structured {
            flags &= !TFLAG_SEND_DF;
        }
        if flags & TFLAG_SEND_WRITE_ZEROES == 0 {
            flags &= !TFLAG_SEND_FAST_ZERO;
        }
        flags
    }

    fn negotiated(&self, export: usize, name: &str) -> Negotiated {
        let e = &self.exports[export];
        let base_allocation =
            if self.meta_selected && self.structured && self.meta_export.as_deref() == Some(name) {
                Some(BASE_ALLOCATION_ID)
            } else {
                None
            };
        Negotiated {
            export,
            size: e.size,
            flags: self.flags_for(export),
            structured_replies: self.structured,
            base_allocation,
            max_payload: e.max_block,
        }
    }

    /// Handle one complete option. Returns a status when the handshake ends.
    fn option(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) -> Option<HandshakeStatus> {
        if self.shutting_down && option != OPT_ABORT {
            if option == OPT_EXPORT_NAME {
                return Some(HandshakeStatus::End(HandshakeEnd::ShuttingDown));
            }
            option_error(out, option, REP_ERR_SHUTDOWN, "the server is shutting down");
            return None;
        }
        match option {
            OPT_EXPORT_NAME => {
                let name = match std::str::from_utf8(data) {
                    Ok(n) if n.len() <= MAX_STRING => n.to_string(),
                    _ => {
                        return Some(HandshakeStatus::End(HandshakeEnd::UnknownExport(
                            String::from_utf8_lossy(&data[..data.len().min(64)]).into_owned(),
                        )))
                    }
                };
                let Some(export) = self.find(&name) else {
                    return Some(HandshakeStatus::End(HandshakeEnd::UnknownExport(name)));
                };
                let neg = self.negotiated(export, &name);
                put_u64(out, neg.size);
                put_u16(out, neg.flags);
                if !self.no_zeroes {
                    out.extend_from_slice(&[0u8; 124]);
                }
                Some(HandshakeStatus::Done(neg))
            }
            OPT_ABORT => {
                option_reply(out, option, REP_ACK, &[]);
                Some(HandshakeStatus::End(HandshakeEnd::Aborted))
            }
            OPT_LIST => {
                if !data.is_empty() {
                    option_error(out, option, REP_ERR_INVALID, "LIST takes no data");
                    return None;
                }
                for e in &self.exports {
                    let mut payload = Vec::with_capacity(4 + e.name.len());
                    put_u32(&mut payload, e.name.len() as u32);
                    payload.extend_from_slice(e.name.as_bytes());
                    payload.extend_from_slice(e.description.as_bytes());
                    option_reply(out, option, REP_SERVER, &payload);
                }
                option_reply(out, option, REP_ACK, &[]);
                None
            }
            OPT_INFO | OPT_GO => self.info_or_go(option, data, out),
            OPT_STRUCTURED_REPLY => {
                if !data.is_empty() {
                    option_error(
                        out,
                        option,
                        REP_ERR_INVALID,
                        "STRUCTURED_REPLY takes no data",
                    );
                } else {
                    self.structured = true;
                    option_reply(out, option, REP_ACK, &[]);
                }
                None
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => {
                self.meta_context(option, data, out);
                None
            }
            OPT_STARTTLS if !data.is_empty() => {
                option_error(out, option, REP_ERR_INVALID, "STARTTLS carries no data");
                None
            }
            OPT_STARTTLS => {
                option_error(
                    out,
                    option,
                    REP_ERR_POLICY,
                    "TLS is not offered by this server",
                );
                None
            }
            _ => {
                option_error(out, option, REP_ERR_UNSUP, "option not supported");
                None
            }
        }
    }

    fn parse_info(data: &[u8]) -> Option<InfoRequest> {
        let mut r = Reader::new(data);
        let name_len = r.u32()? as usize;
        if name_len > MAX_STRING || name_len > data.len().saturating_sub(6) {
            return None;
        }
        let name = nbd_string(r.bytes(name_len)?)?;
        let count = r.u16()? as usize;
        if r.remaining() != count * 2 {
            return None;
        }
        let mut reqs = Vec::with_capacity(count);
        for _ in 0..count {
            reqs.push(r.u16()?);
        }
        if reqs.is_empty() {
            Some(InfoRequest::Name(name))
        } else {
            Some(InfoRequest::Requests(name, reqs))
        }
    }

    fn info_or_go(
        &mut self,
        option: u32,
        data: &[u8],
        out: &mut Vec<u8>,
    ) -> Option<HandshakeStatus> {
        let (name, reqs) = match Self::parse_info(data) {
            Some(InfoRequest::Name(n)) => (n, Vec::new()),
            Some(InfoRequest::Requests(n, r)) => (n, r),
            None => {
                option_error(out, option, REP_ERR_INVALID, "malformed INFO/GO request");
                return None;
            }
        };
        let Some(export) = self.find(&name) else {
            option_error(out, option, REP_ERR_UNKNOWN, "no export of that name");
            return None;
        };
        let neg = self.negotiated(export, &name);
        let e = &self.exports[export];
        let mut info = Vec::with_capacity(12);
        put_u16(&mut info, INFO_EXPORT);
        put_u64(&mut info, neg.size);
        put_u16(&mut info, neg.flags);
        option_reply(out, option, REP_INFO, &info);
        if reqs.contains(&INFO_NAME) {
            let mut p = Vec::new();
            put_u16(&mut p, INFO_NAME);
            p.extend_from_slice(e.name.as_bytes());
            option_reply(out, option, REP_INFO, &p);
        }
        if reqs.contains(&INFO_DESCRIPTION) && !e.description.is_empty() {
            let mut p = Vec::new();
            put_u16(&mut p, INFO_DESCRIPTION);
            p.extend_from_slice(e.description.as_bytes());
            option_reply(out, option, REP_INFO, &p);
        }
        let mut p = Vec::with_capacity(14);
        put_u16(&mut p, INFO_BLOCK_SIZE);
        put_u32(&mut p, e.min_block);
        put_u32(&mut p, e.preferred_block);
        put_u32(&mut p, e.max_block);
        option_reply(out, option, REP_INFO, &p);
        option_reply(out, option, REP_ACK, &[]);
        if option == OPT_GO {
            Some(HandshakeStatus::Done(neg))
        } else {
            None
        }
    }

    fn meta_context(&mut self, option: u32, data: &[u8], out: &mut Vec<u8>) {
        let set = option == OPT_SET_META_CONTEXT;
        if set {
            // SET replaces the selection even when it fails.
            self.meta_selected = false;
            self.meta_export = None;
        }
        if !self.structured {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "negotiate structured replies first",
            );
            return;
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            option_error(
                out,
                option,
                REP_ERR_INVALID,
                "malformed meta context request",
            );
            return;
        };
        if self.find(&name).is_none() {
            option_error(out, option, REP_ERR_UNKNOWN, "no export of that name");
            return;
        }
        let matches = if set {
            queries.iter().any(|q| q == BASE_ALLOCATION)
        } else {
            queries.is_empty() || queries.iter().any(|q| q == BASE_ALLOCATION || q == "base:")
        };
        if matches {
            let mut p = Vec::new();
            // LIST: "the server SHOULD set [the id] to zero"; SET: the id
            // block status replies will carry.
            put_u32(&mut p, if set { BASE_ALLOCATION_ID } else { 0 });
            p.extend_from_slice(BASE_ALLOCATION.as_bytes());
            option_reply(out, option, REP_META_CONTEXT, &p);
            if set {
                self.meta_selected = true;
                self.meta_export = Some(name);
            }
        }
        option_reply(out, option, REP_ACK, &[]);
    }
}

/// An export name as NBD allows it: UTF-8 without NUL. None makes the
/// request malformed (ERR_INVALID, as nbdkit and qemu-nbd answer a name
/// with NUL), not a request for an unknown export.
fn nbd_string(b: &[u8]) -> Option<String> {
    std::str::from_utf8(b)
        .ok()
        .filter(|n| !n.contains('\0'))
        .map(str::to_string)
}

fn parse_meta_request(data: &[u8]) -> Option<(String, Vec<String>)> {
    let mut r = Reader::new(data);
    let name_len = r.u32()? as usize;
    if name_len > MAX_STRING {
        return None;
    }
    let name = nbd_string(r.bytes(name_len)?)?;
    let count = r.u32()? as usize;
    let mut queries = Vec::new();
    for _ in 0..count {
        let len = r.u32()? as usize;
        if len > MAX_STRING {
            return None;
        }
        queries.push(std::str::from_utf8(r.bytes(len)?).ok()?.to_string());
    }
    if r.remaining() != 0 {
        return None;
    }
    Some((name, queries))
}

fn option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    put_u64(out, OPTION_REPLY_MAGIC);
    put_u32(out, option);
    put_u32(out, reply);
    put_u32(out, data.len() as u32);
    out.extend_from_slice(data);
}

fn option_error(out: &mut Vec<u8>, option: u32, error: u32, message: &str) {
    option_reply(out, option, error, message.as_bytes());
}
