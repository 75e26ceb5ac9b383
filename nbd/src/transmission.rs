//! Transmission phase: decoding and validating requests, encoding replies.
//!
//! Owns every rule about which request is acceptable (magic, command, flags,
//! bounds, payload size) and the error value the spec prescribes for each
//! violation. It never performs the request; it tells the caller what was asked
//! or which error to send. Never panics on input.

use crate::consts::*;
use crate::handshake::Negotiated;
use crate::wire::{put_u16, put_u32, put_u64};

/// Size of a (compact) request header.
pub const REQUEST_HEADER_LEN: usize = 28;
/// WRITE payloads above the advertised maximum but below this are read and
/// discarded so the connection survives; larger ones are treated as a denial
/// of service and the connection is closed.
pub const DISCARD_LIMIT: u32 = 128 * 1024 * 1024;

/// A command the server understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disconnect,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

/// A validated request. For `Write`, `length` payload bytes follow the header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    pub cookie: u64,
    pub command: Command,
    pub flags: u16,
    pub offset: u64,
    pub length: u32,
}

impl Request {
    pub fn fua(&self) -> bool {
        self.flags & CMD_FLAG_FUA != 0
    }
    pub fn no_hole(&self) -> bool {
        self.flags & CMD_FLAG_NO_HOLE != 0
    }
    pub fn fast_zero(&self) -> bool {
        self.flags & CMD_FLAG_FAST_ZERO != 0
    }
    pub fn req_one(&self) -> bool {
        self.flags & CMD_FLAG_REQ_ONE != 0
    }
    pub fn df(&self) -> bool {
        self.flags & CMD_FLAG_DF != 0
    }
}

/// What the decoder found at the head of the input.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Not a whole header yet.
    NeedMore,
    /// A valid request; `header_len` bytes were the header. A WRITE's payload
    /// (`request.length` bytes) follows and is the caller's to collect.
    Request(Request),
    /// A well-framed but invalid request: skip `discard` payload bytes that
    /// follow the header, then reply `error` for `cookie` (unless `cookie` is
    /// from a DISC, which gets no reply: `reply` is false).
    Reject {
        cookie: u64,
        command: u16,
        error: u32,
        discard: u32,
        reply: bool,
    },
    /// The stream cannot be trusted any more: close the connection.
    Fatal(String),
}

/// The per-connection rules a request is checked against.
#[derive(Clone, Debug)]
pub struct RequestRules {
    pub size: u64,
    pub flags: u16,
    pub max_payload: u32,
    pub structured: bool,
    pub base_allocation: Option<u32>,
}

impl From<&Negotiated> for RequestRules {
    fn from(n: &Negotiated) -> Self {
        RequestRules {
            size: n.size,
            flags: n.flags,
            max_payload: n.max_payload,
            structured: n.structured_replies,
            base_allocation: n.base_allocation,
        }
    }
}

impl RequestRules {
    /// Decode the request header at the head of `input` (only the first 28
    /// bytes are looked at).
    pub fn decode(&self, input: &[u8]) -> Decoded {
        if input.len() < REQUEST_HEADER_LEN {
            return Decoded::NeedMore;
        }
        let magic = u32::from_be_bytes(input[0..4].try_into().unwrap());
        let flags = u16::from_be_bytes(input[4..6].try_into().unwrap());
        let kind = u16::from_be_bytes(input[6..8].try_into().unwrap());
        let cookie = u64::from_be_bytes(input[8..16].try_into().unwrap());
        let offset = u64::from_be_bytes(input[16..24].try_into().unwrap());
        let length = u32::from_be_bytes(input[24..28].try_into().unwrap());
        if magic != REQUEST_MAGIC {
            return Decoded::Fatal(format!("bad request magic {magic:#010x}"));
        }
        let reject = |error: u32, discard: u32| Decoded::Reject {
            cookie,
            command: kind,
            error,
            discard,
            reply: true,
        };
        let payload = if kind == CMD_WRITE { length } else { 0 };
        if payload > self.max_payload {
            if payload > DISCARD_LIMIT {
                return Decoded::Fatal(format!(
                    "write payload of {payload} bytes is far beyond the advertised maximum {}",
                    self.max_payload
                ));
            }
            return reject(EINVAL, payload);
        }
        let command = match kind {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disconnect,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return reject(EINVAL, 0),
        };
        // FUA is valid on every command once SEND_FUA is advertised: the
        // server "MUST accept all commands with this bit set (even by
        // ignoring the bit)"; clients are known to set it on reads.
        let fua = if self.flags & TFLAG_SEND_FUA != 0 {
            CMD_FLAG_FUA
        } else {
            0
        };
        let allowed = fua
            | match command {
                Command::Read => {
                    if self.structured {
                        CMD_FLAG_DF
                    } else {
                        0
                    }
                }
                Command::Write | Command::Trim => 0,
                Command::WriteZeroes => {
                    CMD_FLAG_NO_HOLE
                        | if self.flags & TFLAG_SEND_FAST_ZERO != 0 {
                            CMD_FLAG_FAST_ZERO
                        } else {
                            0
                        }
                }
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                Command::Flush | Command::Cache | Command::Disconnect => 0,
            };
        if command == Command::Disconnect {
            // DISC never gets a reply, whatever its flags.
            return Decoded::Request(Request {
                cookie,
                command,
                flags,
                offset,
                length,
            });
        }
        if flags & !allowed != 0 {
            return reject(EINVAL, payload);
        }
        // Read-only first: the spec's EPERM for any write, trim or zero on a
        // read-only export, even when trim or zeroes are not advertised
        // there (nbdkit -r does the same).
        if matches!(
            command,
            Command::Write | Command::Trim | Command::WriteZeroes
        ) && self.flags & TFLAG_READ_ONLY != 0
        {
            return reject(EPERM, payload);
        }
        let needs = match command {
            Command::Flush => TFLAG_SEND_FLUSH,
            Command::Trim => TFLAG_SEND_TRIM,
            Command::WriteZeroes => TFLAG_SEND_WRITE_ZEROES,
            _ => 0,
        };
        if self.flags & needs != needs {
            return reject(EINVAL, payload);
        }
        let end = offset.checked_add(length as u64);
        let in_bounds = matches!(end, Some(e) if e <= self.size);
        if !in_bounds && command != Command::Flush {
            let error = match command {
                Command::Write | Command::WriteZeroes => ENOSPC,
                _ => EINVAL,
            };
            return reject(error, payload);
        }
        match command {
            Command::Read if length > self.max_payload => return reject(EINVAL, 0),
            Command::BlockStatus if self.base_allocation.is_none() || length == 0 => {
                return reject(EINVAL, 0)
            }
            _ => {}
        }
        Decoded::Request(Request {
            cookie,
            command,
            flags,
            offset,
            length,
        })
    }
}

/// Append a simple reply header. For a successful READ the data follows.
pub fn simple_reply(out: &mut Vec<u8>, cookie: u64, error: u32) {
    let mut h = [0u8; SIMPLE_REPLY_LEN];
    simple_reply_into(&mut h, cookie, error);
    out.extend_from_slice(&h);
}

/// Bytes in a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Bytes in an OFFSET_DATA chunk header (chunk header plus offset).
pub const OFFSET_DATA_HEADER_LEN: usize = 28;

/// Write a simple reply header in place (e.g. in front of READ data already
/// in its send buffer).
pub fn simple_reply_into(out: &mut [u8; SIMPLE_REPLY_LEN], cookie: u64, error: u32) {
    out[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    out[4..8].copy_from_slice(&error.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
}

/// Append a structured chunk header for a payload of `len` bytes.
pub fn chunk_header(out: &mut Vec<u8>, cookie: u64, flags: u16, kind: u16, len: u32) {
    put_u32(out, STRUCTURED_REPLY_MAGIC);
    put_u16(out, flags);
    put_u16(out, kind);
    put_u64(out, cookie);
    put_u32(out, len);
}

/// Header of an OFFSET_DATA chunk; `data_len` bytes of data follow.
pub fn offset_data_header(out: &mut Vec<u8>, cookie: u64, offset: u64, data_len: u32, done: bool) {
    let mut h = [0u8; OFFSET_DATA_HEADER_LEN];
    offset_data_header_into(&mut h, cookie, offset, data_len, done);
    out.extend_from_slice(&h);
}

/// Write an OFFSET_DATA chunk header in place; `data_len` bytes follow it.
pub fn offset_data_header_into(
    out: &mut [u8; OFFSET_DATA_HEADER_LEN],
    cookie: u64,
    offset: u64,
    data_len: u32,
    done: bool,
) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    out[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    out[4..6].copy_from_slice(&flags.to_be_bytes());
    out[6..8].copy_from_slice(&REPLY_TYPE_OFFSET_DATA.to_be_bytes());
    out[8..16].copy_from_slice(&cookie.to_be_bytes());
    out[16..20].copy_from_slice(&(8 + data_len).to_be_bytes());
    out[20..28].copy_from_slice(&offset.to_be_bytes());
}

/// An OFFSET_HOLE chunk: `len` bytes at `offset` read as zeroes.
pub fn offset_hole(out: &mut Vec<u8>, cookie: u64, offset: u64, len: u32, done: bool) {
    let flags = if done { REPLY_FLAG_DONE } else { 0 };
    chunk_header(out, cookie, flags, REPLY_TYPE_OFFSET_HOLE, 12);
    put_u64(out, offset);
    put_u32(out, len);
}

/// The final empty chunk.
pub fn none_done(out: &mut Vec<u8>, cookie: u64) {
    chunk_header(out, cookie, REPLY_FLAG_DONE, REPLY_TYPE_NONE, 0);
}

/// A final ERROR chunk carrying a short message.
pub fn error_chunk(out: &mut Vec<u8>, cookie: u64, error: u32, message: &str) {
    let msg = &message.as_bytes()[..message.len().min(MAX_STRING)];
    chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_ERROR,
        6 + msg.len() as u32,
    );
    put_u32(out, error);
    put_u16(out, msg.len() as u16);
    out.extend_from_slice(msg);
}

/// A final BLOCK_STATUS chunk: `extents` are (length, flags) pairs.
pub fn block_status_chunk(out: &mut Vec<u8>, cookie: u64, context: u32, extents: &[(u32, u32)]) {
    chunk_header(
        out,
        cookie,
        REPLY_FLAG_DONE,
        REPLY_TYPE_BLOCK_STATUS,
        4 + 8 * extents.len() as u32,
    );
    put_u32(out, context);
    for &(len, flags) in extents {
        put_u32(out, len);
        put_u32(out, flags);
    }
}

/// Reply with an error in whichever form the connection negotiated.
pub fn error_reply(out: &mut Vec<u8>, structured: bool, cookie: u64, error: u32, message: &str) {
    if structured {
        error_chunk(out, cookie, error, message);
    } else {
        simple_reply(out, cookie, error);
    }
}
