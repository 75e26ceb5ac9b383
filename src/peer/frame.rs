//! Peer protocol framing: the bytes of one frame on the wire and an
//! incremental decoder for a stream of them.
//!
//! Owns: the 32-byte frame header (magic, version, kind, flags, sequence
//! number, payload length, xxh3-64 checksum), [`encode`], and
//! [`FrameDecoder`], which turns a byte stream into checked [`Frame`]s.
//!
//! Must never: do I/O, allocate or buffer a payload whose declared length is
//! over the decoder's limit, hand out a frame whose checksum or sequence
//! number is wrong, panic on any input, or go on decoding after an error
//! (the decoder is poisoned; the connection must be dropped). It does not
//! interpret payloads; that is `messages` and `handshake`.
//!
//! Wire format (little-endian), see docs/peer-protocol.md:
//!
//! ```text
//!  0  magic    b"NMPF"
//!  4  version  u16  (FRAME_VERSION = 1)
//!  6  kind     u16  (FrameKind)
//!  8  flags    u16  (none defined in version 1: must be 0)
//! 10  reserved u16  (must be 0)
//! 12  seq      u64  (per direction, 0 for a connection's first frame, +1 each frame)
//! 20  length   u32  (payload bytes that follow the header)
//! 24  checksum u64  (xxh3-64 of bytes 0..24 followed by the payload)
//! 32  payload
//! ```
//!
//! One kind is checksummed only in part: a SummedRecord's checksum covers
//! its record header and block checksums ([`covered_len`]); its data is
//! covered by those block checksums, which the receiver must check (the
//! block checksums are work both ends do anyway, so a large write's bytes
//! are hashed once per node instead of twice).

use std::fmt;

/// The first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"NMPF";
/// Version of the frame layout above. A different value is refused.
pub const FRAME_VERSION: u16 = 1;
/// Bytes in a frame header.
pub const HEADER_LEN: usize = 32;
/// Largest payload any frame may carry: a 32 MiB write plus room for its
/// record header. A header declaring more is refused before any of the
/// payload is buffered.
pub const MAX_PAYLOAD: usize = 33 * 1024 * 1024;

/// What a frame carries. The numbers are the wire values of `kind`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum FrameKind {
    /// Handshake: protocol version, role, nonce.
    Hello = 1,
    /// Handshake: identity and the HMAC proving the shared secret.
    Auth = 2,
    /// Handshake: the sender accepted the peer.
    Ready = 3,
    /// Handshake refused (or, later, the session ended) with a code and a reason.
    Reject = 4,
    /// A replicated journal record (payload not yet defined).
    Record = 16,
    /// A record applied on the secondary (payload not yet defined).
    Ack = 17,
    /// Make everything so far durable (payload not yet defined).
    Flush = 18,
    /// Answer to a Flush (payload not yet defined).
    FlushAck = 19,
    /// Ask for the checksums of a range of blocks (checksum resync).
    SumsRequest = 20,
    /// The checksums asked for.
    Sums = 21,
    /// The primary's data generation, sent when a peer is in sync.
    Generation = 22,
    /// The primary's token for the replication session it starts (sent
    /// first after Ready); the secondary records it.
    Session = 23,
    /// Ask for the data of a range of blocks (read repair, version 3).
    BlockRequest = 24,
    /// The data asked for, or why it cannot be had.
    BlockData = 25,
    /// Ask for the checksums of what a range of blocks holds, read and
    /// verified now (scrub, version 5).
    VerifyRequest = 26,
    /// The checksums of the blocks read (or why they could not be).
    Verified = 27,
    /// A block-aligned write record carrying the checksum of each of its
    /// blocks, which cover its data instead of the frame checksum
    /// ([`covered_len`]; version 7).
    SummedRecord = 28,
    /// Liveness probe (opaque payload, echoed by Pong).
    Ping = 32,
    /// Answer to a Ping.
    Pong = 33,
}

impl FrameKind {
    /// Every kind, in wire order.
    pub const ALL: [FrameKind; 19] = [
        FrameKind::Hello,
        FrameKind::Auth,
        FrameKind::Ready,
        FrameKind::Reject,
        FrameKind::Record,
        FrameKind::Ack,
        FrameKind::Flush,
        FrameKind::FlushAck,
        FrameKind::SumsRequest,
        FrameKind::Sums,
        FrameKind::Generation,
        FrameKind::Session,
        FrameKind::BlockRequest,
        FrameKind::BlockData,
        FrameKind::VerifyRequest,
        FrameKind::Verified,
        FrameKind::SummedRecord,
        FrameKind::Ping,
        FrameKind::Pong,
    ];

    /// The kind with wire value `code`, if it is one.
    pub fn from_code(code: u16) -> Option<FrameKind> {
        FrameKind::ALL.into_iter().find(|k| k.code() == code)
    }

    /// The wire value.
    pub fn code(self) -> u16 {
        self as u16
    }
}

impl fmt::Display for FrameKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// One decoded, checked frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub seq: u64,
    /// The payload is `buf[at..]` (`at` > 0 only for a large payload placed
    /// for alignment, see [`FrameDecoder::align_large_payloads`]).
    buf: Vec<u8>,
    at: usize,
}

impl Frame {
    pub fn payload(&self) -> &[u8] {
        &self.buf[self.at..]
    }

    /// The buffer holding the payload and the payload's start in it.
    pub fn into_buf(self) -> (Vec<u8>, usize) {
        (self.buf, self.at)
    }
}

/// Memory alignment [`FrameDecoder::align_large_payloads`] gives.
pub const PAYLOAD_ALIGN: usize = 4096;

/// Why a byte stream is not a valid frame stream. Every one of these means
/// the connection must be dropped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameError {
    /// The stream does not start with `NMPF`; `start` is up to the first 16
    /// bytes that were there.
    BadMagic { start: Vec<u8> },
    /// A frame of a layout version this build does not speak.
    UnsupportedVersion { found: u16 },
    /// A header declared a payload over the limit.
    TooLarge { len: u64, max: usize },
    /// The checksum does not match the header and payload.
    ChecksumMismatch {
        seq: u64,
        kind: u16,
        expected: u64,
        computed: u64,
    },
    /// A checksummed frame with a kind this version does not define.
    UnknownKind { code: u16 },
    /// Flags or reserved bits set that version 1 does not define.
    ReservedBits { flags: u16, reserved: u16 },
    /// A frame out of order: frames are numbered 0, 1, 2, ... per direction.
    OutOfSequence { expected: u64, found: u64 },
    /// The stream ended inside a frame.
    Truncated { have: usize, need: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::BadMagic { start } => {
                let mut word = [0u8; 4];
                let n = start.len().min(4);
                word[..n].copy_from_slice(&start[..n]);
                write!(
                    f,
                    "peer sent a frame with bad magic 0x{:08x} (first bytes {:?}); is it an nbdmirror peer?",
                    u32::from_be_bytes(word),
                    String::from_utf8_lossy(start)
                )?;
                if start.starts_with(b"NBDM") {
                    write!(f, " (it looks like an NBD server: is the peer address the NBD port?)")?;
                } else if start.len() >= 8 && start[4..].starts_with(b"IHAV") {
                    write!(f, " (it looks like an NBD client: is it pointed at the peer port?)")?;
                } else if [&b"GET "[..], b"POST", b"HEAD", b"PUT ", b"HTTP"]
                    .iter()
                    .any(|m| start.starts_with(m))
                {
                    write!(f, " (it looks like HTTP)")?;
                } else if start.first() == Some(&0x16) {
                    write!(f, " (it looks like a TLS handshake)")?;
                }
                Ok(())
            }
            FrameError::UnsupportedVersion { found } => write!(
                f,
                "peer sent frame layout version {found}; this build speaks only version {FRAME_VERSION}: upgrade the older node"
            ),
            FrameError::TooLarge { len, max } => write!(
                f,
                "peer declared a {len}-byte frame payload, over the {max}-byte limit; refusing it without reading it"
            ),
            FrameError::ChecksumMismatch {
                seq,
                kind,
                expected,
                computed,
            } => write!(
                f,
                "frame (seq {seq}, kind {kind}, as its possibly damaged header says) failed its checksum: header has {expected:016x}, bytes hash to {computed:016x}; the data was corrupted in transit, dropping the connection"
            ),
            FrameError::UnknownKind { code } => write!(
                f,
                "peer sent a frame of unknown kind {code}; it speaks a protocol this build does not: check both nodes run compatible versions"
            ),
            FrameError::ReservedBits { flags, reserved } => write!(
                f,
                "peer sent a frame with undefined flags 0x{flags:04x} / reserved 0x{reserved:04x}; it speaks a protocol this build does not"
            ),
            FrameError::OutOfSequence { expected, found } => write!(
                f,
                "peer sent frame number {found} where {expected} was next: frames were lost, duplicated or reordered"
            ),
            FrameError::Truncated { have, need } => write!(
                f,
                "connection ended inside a frame ({have} of {need} bytes received)"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// Bytes of a SummedRecord payload before its block checksums: the record
/// header (`mirror::wire::RECORD_HEADER`).
pub const SUMMED_HEAD: usize = 64;
/// Bytes of data each block checksum of a SummedRecord covers.
pub const SUMMED_BLOCK: usize = 4096;

/// How many bytes at the start of a payload of `len` bytes the frame
/// checksum covers, for a frame of kind code `kind`: all of them, except
/// for a SummedRecord, whose payload is a 64-byte record header, `n` 8-byte
/// block checksums and `n` 4 KiB blocks: then the header and the checksums,
/// `64 + 8n` with `n = (len - 64) / 4104` (a length that is not of that
/// form is the message decoder's to refuse; the header carries the length
/// and is covered).
pub fn covered_len(kind: u16, len: usize) -> usize {
    if kind != FrameKind::SummedRecord.code() || len < SUMMED_HEAD {
        return len;
    }
    SUMMED_HEAD + 8 * ((len - SUMMED_HEAD) / (8 + SUMMED_BLOCK))
}

/// The checksum of a frame: xxh3-64 of the first 24 header bytes, then the
/// part of the payload [`covered_len`] gives (the kind is read from the
/// header, which the checksum covers).
pub fn checksum(header: &[u8], payload: &[u8]) -> u64 {
    let kind = u16::from_le_bytes([header[6], header[7]]);
    let covered = covered_len(kind, payload.len());
    crate::xxh3::hash_parts(&[&header[..24], &payload[..covered]], 0)
}

/// Append one frame to `out`.
///
/// # Panics
/// If `payload` is over [`MAX_PAYLOAD`]: that is a bug in the sender, which
/// must split its data, not something a peer can cause.
pub fn encode(kind: FrameKind, seq: u64, payload: &[u8], out: &mut Vec<u8>) {
    encode_parts(kind, seq, &[payload], out)
}

/// Append one frame whose payload is the concatenation of `parts` (a
/// replicated record's header and its data, without joining them first).
///
/// # Panics
/// As [`encode`].
pub fn encode_parts(kind: FrameKind, seq: u64, parts: &[&[u8]], out: &mut Vec<u8>) {
    let h = header(kind, seq, parts);
    let len: usize = parts.iter().map(|p| p.len()).sum();
    out.reserve(HEADER_LEN + len);
    out.extend_from_slice(&h);
    for p in parts {
        out.extend_from_slice(p);
    }
}

/// Make `buf` one frame: its payload is already at `buf[HEADER_LEN..]`, and
/// the header is written into `buf[..HEADER_LEN]`. For a large payload read
/// straight into a buffer with room for the header, so it is sent as it is
/// instead of being copied into a send buffer.
///
/// # Panics
/// If `buf` is shorter than a header, or as [`encode`].
pub fn encode_in_place(kind: FrameKind, seq: u64, buf: &mut [u8]) {
    let (h, payload) = buf.split_at_mut(HEADER_LEN);
    h.copy_from_slice(&header(kind, seq, &[payload]));
}

/// The header of a frame whose payload is the concatenation of `parts`.
fn header(kind: FrameKind, seq: u64, parts: &[&[u8]]) -> [u8; HEADER_LEN] {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    assert!(
        len <= MAX_PAYLOAD,
        "peer frame payload of {len} bytes is over MAX_PAYLOAD"
    );
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&FRAME_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&kind.code().to_le_bytes());
    // 8..12: flags and reserved, zero.
    h[12..20].copy_from_slice(&seq.to_le_bytes());
    h[20..24].copy_from_slice(&(len as u32).to_le_bytes());
    // The checksum covers header bytes 0..24 and then the parts, as far as
    // `covered_len` says.
    let mut left = covered_len(kind.code(), len);
    let mut covered: [&[u8]; 4] = [&h[..24], &[], &[], &[]];
    let mut n = 1;
    let mut rest: Vec<&[u8]> = Vec::new();
    for p in parts {
        let p = &p[..p.len().min(left)];
        left -= p.len();
        if n < covered.len() {
            covered[n] = p;
            n += 1;
        } else {
            rest.push(p);
        }
    }
    let sum = if rest.is_empty() {
        crate::xxh3::hash_parts(&covered[..n], 0)
    } else {
        let all: Vec<&[u8]> = covered.iter().copied().chain(rest).collect();
        crate::xxh3::hash_parts(&all, 0)
    };
    h[24..32].copy_from_slice(&sum.to_le_bytes());
    h
}

/// Incremental frame decoder: [`push`](Self::push) received bytes, then
/// [`pull`](Self::pull) until it returns `Ok(None)` (needs more bytes) or an
/// error.
///
/// Buffering is bounded by the payload limit plus one `push`: a header is
/// checked (magic, version, length) before any of its payload is waited for,
/// so a peer declaring an oversized frame costs 32 bytes, not the size it
/// declared. Callers must pull after each push so complete frames do not pile
/// up. The magic is checked from the very first byte, so a client speaking
/// another protocol is refused as soon as its first byte differs.
///
/// After an error the decoder is poisoned: `pull` returns that error forever
/// and `push` discards its input.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: Vec<u8>,
    start: usize,
    max_payload: usize,
    next_seq: u64,
    error: Option<FrameError>,
    /// A frame with a large payload whose header has been read: its payload
    /// bytes go straight into their own buffer, never through `buf`.
    body: Option<Body>,
    /// Buffers for large payloads, handed back by the caller.
    spare: Vec<Vec<u8>>,
    /// Place payloads of at least `.1` bytes so that their byte at offset
    /// `.0` is aligned to [`PAYLOAD_ALIGN`] in memory.
    align_at: Option<(usize, usize)>,
}

/// Payloads at least this long are collected in a buffer of their own.
const BODY_MIN: usize = 64 * 1024;

#[derive(Debug)]
struct Body {
    header: [u8; HEADER_LEN],
    /// The payload is `buf[at..]`; `buf[at..filled]` has arrived.
    buf: Vec<u8>,
    at: usize,
    filled: usize,
    /// `payload` is lent out for a receive ([`FrameDecoder::take_body_target`]).
    lent: bool,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        FrameDecoder::new()
    }
}

impl FrameDecoder {
    /// A decoder for a new connection, accepting payloads up to [`MAX_PAYLOAD`].
    pub fn new() -> FrameDecoder {
        FrameDecoder::with_max_payload(MAX_PAYLOAD)
    }

    /// A decoder with a lower payload limit (clamped to [`MAX_PAYLOAD`]).
    pub fn with_max_payload(max: usize) -> FrameDecoder {
        FrameDecoder {
            buf: Vec::new(),
            start: 0,
            max_payload: max.min(MAX_PAYLOAD),
            next_seq: 0,
            error: None,
            body: None,
            spare: Vec::new(),
            align_at: None,
        }
    }

    /// Change the payload limit for frames not yet decoded (clamped to
    /// [`MAX_PAYLOAD`]). The handshake runs with a small limit and raises it
    /// once the peer is authenticated.
    pub fn set_max_payload(&mut self, max: usize) {
        self.max_payload = max.min(MAX_PAYLOAD);
    }

    /// The payload limit in force.
    pub fn max_payload(&self) -> usize {
        self.max_payload
    }

    /// Sequence number the next frame must carry.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Bytes received and not yet returned as frames.
    pub fn buffered(&self) -> usize {
        let body = self
            .body
            .as_ref()
            .map_or(0, |b| HEADER_LEN + b.filled - b.at);
        self.buf.len() - self.start + body
    }

    /// Where the rest of a large payload can be received directly: the
    /// payload buffer and how much of it is filled. Give it back with
    /// [`body_received`](Self::body_received) before any other call.
    /// The bytes to receive go to `buf[filled..]` (to its end).
    pub fn take_body_target(&mut self) -> Option<(Vec<u8>, usize)> {
        let b = self.body.as_mut()?;
        if self.error.is_some() || b.lent || b.filled == b.buf.len() {
            return None;
        }
        b.lent = true;
        Some((std::mem::take(&mut b.buf), b.filled))
    }

    /// Place each payload of at least `min_len` bytes (and 64 KiB; those
    /// are collected in a buffer of their own) so that its byte at `offset`
    /// lies at a [`PAYLOAD_ALIGN`]-aligned address: a record's data can then
    /// be written with O_DIRECT without a copy. A SummedRecord's data starts
    /// after its block checksums: its payload is placed so that the byte at
    /// [`covered_len`] is aligned instead.
    pub fn align_large_payloads(&mut self, offset: usize, min_len: usize) {
        self.align_at = Some((offset, min_len));
    }

    /// The buffer from [`take_body_target`](Self::take_body_target), with `n`
    /// more bytes received into it.
    pub fn body_received(&mut self, payload: Vec<u8>, n: usize) {
        if let Some(b) = self.body.as_mut() {
            b.buf = payload;
            b.filled = (b.filled + n).min(b.buf.len());
            b.lent = false;
        }
    }

    /// Whether [`recycle`](Self::recycle) would keep another buffer.
    pub fn wants_spare(&self) -> bool {
        self.spare.len() < 2
    }

    /// Hand back a payload buffer of a frame returned earlier, to be reused
    /// for a later large payload (spares page faults and zeroing).
    pub fn recycle(&mut self, buf: Vec<u8>) {
        if buf.capacity() >= BODY_MIN && self.spare.len() < 8 {
            self.spare.push(buf);
        }
    }

    /// The error that poisoned this decoder, if any.
    pub fn error(&self) -> Option<&FrameError> {
        self.error.as_ref()
    }

    /// Add received bytes. Discarded if the decoder is poisoned.
    pub fn push(&mut self, bytes: &[u8]) {
        if self.error.is_some() || bytes.is_empty() {
            return;
        }
        let mut bytes = bytes;
        if let Some(b) = self.body.as_mut() {
            debug_assert!(!b.lent, "push while the payload buffer is lent out");
            let take = bytes.len().min(b.buf.len() - b.filled);
            b.buf[b.filled..b.filled + take].copy_from_slice(&bytes[..take]);
            b.filled += take;
            bytes = &bytes[take..];
            if bytes.is_empty() {
                return;
            }
        }
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed, or the
    /// error that poisoned the stream.
    pub fn pull(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        match self.decode() {
            Ok(f) => Ok(f),
            Err(e) => {
                self.error = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
        }
    }

    /// Call at end of stream: an error if it ended inside a frame (or the
    /// decoder was already poisoned).
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        let have = self.buffered();
        if have == 0 {
            return Ok(());
        }
        let need = if let Some(b) = &self.body {
            HEADER_LEN + b.buf.len() - b.at
        } else if have >= HEADER_LEN {
            let h = &self.buf[self.start..];
            HEADER_LEN + u32::from_le_bytes(h[20..24].try_into().unwrap()) as usize
        } else {
            HEADER_LEN
        };
        Err(FrameError::Truncated { have, need })
    }

    fn decode(&mut self) -> Result<Option<Frame>, FrameError> {
        if let Some(b) = &self.body {
            if b.lent || b.filled < b.buf.len() {
                return Ok(None);
            }
            let b = self.body.take().unwrap();
            return self.check(b.header, b.buf, b.at).map(Some);
        }
        let avail = &self.buf[self.start..];
        // Magic, byte by byte as it arrives.
        let m = avail.len().min(4);
        if avail[..m] != MAGIC[..m] {
            return Err(FrameError::BadMagic {
                start: avail[..avail.len().min(16)].to_vec(),
            });
        }
        if avail.len() >= 6 {
            let version = u16::from_le_bytes([avail[4], avail[5]]);
            if version != FRAME_VERSION {
                return Err(FrameError::UnsupportedVersion { found: version });
            }
        }
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let h: [u8; HEADER_LEN] = avail[..HEADER_LEN].try_into().unwrap();
        let len = u32::from_le_bytes(h[20..24].try_into().unwrap()) as usize;
        if len > self.max_payload {
            return Err(FrameError::TooLarge {
                len: len as u64,
                max: self.max_payload,
            });
        }
        let total = HEADER_LEN + len;
        let code = u16::from_le_bytes([h[6], h[7]]);
        let align = self
            .align_at
            .filter(|&(_, min)| len >= min)
            .map(|(off, _)| {
                if code == FrameKind::SummedRecord.code() {
                    covered_len(code, len)
                } else {
                    off
                }
            });
        if avail.len() < total || (len >= BODY_MIN && align.is_some()) {
            if len >= BODY_MIN {
                // Collect the payload in a buffer of its own: what has
                // arrived now, the rest as it comes.
                let room = len + align.map_or(0, |_| PAYLOAD_ALIGN);
                let mut buf = match self.spare.iter().position(|b| b.capacity() >= room) {
                    Some(i) => self.spare.swap_remove(i),
                    None => Vec::with_capacity(room),
                };
                let at = match align {
                    Some(off) => {
                        let addr = buf.as_ptr() as usize + off;
                        (PAYLOAD_ALIGN - addr % PAYLOAD_ALIGN) % PAYLOAD_ALIGN
                    }
                    None => 0,
                };
                // Recycled buffers are reused as they are (their old bytes
                // are overwritten); only growth is zeroed.
                buf.resize(at + len, 0);
                let have = (avail.len() - HEADER_LEN).min(len);
                buf[at..at + have].copy_from_slice(&avail[HEADER_LEN..HEADER_LEN + have]);
                self.start += HEADER_LEN + have;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                self.body = Some(Body {
                    header: h,
                    buf,
                    at,
                    filled: at + have,
                    lent: false,
                });
                // Complete already (all of it was buffered): check it now.
                return self.decode();
            }
            // Make room once for the rest of a frame we know is acceptable.
            let missing = total - avail.len();
            self.buf.reserve(missing);
            return Ok(None);
        }
        // Capacity rounded up to 512 bytes: a Record's buffer is padded in
        // place to its journal record's span (512-byte units) on a secondary,
        // which an exact capacity made a realloc and copy per record.
        let mut payload = Vec::with_capacity(len.next_multiple_of(512));
        payload.extend_from_slice(&avail[HEADER_LEN..total]);
        self.start += total;
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        self.check(h, payload, 0).map(Some)
    }

    /// The checks of a complete frame (payload `buf[at..]`) after its header's.
    fn check(&mut self, h: [u8; HEADER_LEN], buf: Vec<u8>, at: usize) -> Result<Frame, FrameError> {
        let expected = u64::from_le_bytes(h[24..32].try_into().unwrap());
        let computed = checksum(&h, &buf[at..]);
        let seq = u64::from_le_bytes(h[12..20].try_into().unwrap());
        let code = u16::from_le_bytes([h[6], h[7]]);
        if expected != computed {
            return Err(FrameError::ChecksumMismatch {
                seq,
                kind: code,
                expected,
                computed,
            });
        }
        let flags = u16::from_le_bytes([h[8], h[9]]);
        let reserved = u16::from_le_bytes([h[10], h[11]]);
        if flags != 0 || reserved != 0 {
            return Err(FrameError::ReservedBits { flags, reserved });
        }
        let kind = FrameKind::from_code(code).ok_or(FrameError::UnknownKind { code })?;
        if seq != self.next_seq {
            return Err(FrameError::OutOfSequence {
                expected: self.next_seq,
                found: seq,
            });
        }
        self.next_seq += 1;
        Ok(Frame { kind, seq, buf, at })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: FrameKind, seq: u64, payload: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        encode(kind, seq, payload, &mut v);
        v
    }

    /// Large payloads take the decoder's own-buffer path: fed in odd pieces,
    /// partly through `push` and partly received straight into the lent
    /// buffer, mixed with small frames, they decode exactly; a damaged one
    /// is still caught; a stream cut inside one is reported truncated.
    #[test]
    fn large_payloads_received_in_place() {
        let big: Vec<u8> = (0..300_000u32).map(|i| (i * 31 + 7) as u8).collect();
        let mut wire = Vec::new();
        encode(FrameKind::Record, 0, &big, &mut wire);
        encode(FrameKind::Ping, 1, b"x", &mut wire);
        encode(FrameKind::Record, 2, &big[..70_000], &mut wire);
        for align in [None, Some(64)] {
            let mut d = FrameDecoder::new();
            if let Some(off) = align {
                d.align_large_payloads(off, 0);
            }
            let (mut at, mut step, mut frames) = (0, 1usize, Vec::new());
            while at < wire.len() {
                step = (step * 7 + 13) % 50_000 + 1;
                let n = step.min(wire.len() - at);
                match d.take_body_target() {
                    Some((mut buf, filled)) if step % 2 == 0 => {
                        let n = n.min(buf.len() - filled);
                        buf[filled..filled + n].copy_from_slice(&wire[at..at + n]);
                        d.body_received(buf, n);
                        at += n;
                    }
                    Some((buf, _)) => {
                        d.body_received(buf, 0);
                        d.push(&wire[at..at + n]);
                        at += n;
                    }
                    None => {
                        d.push(&wire[at..at + n]);
                        at += n;
                    }
                }
                while let Some(f) = d.pull().unwrap() {
                    frames.push(f);
                }
            }
            assert_eq!(frames.len(), 3);
            assert_eq!(frames[0].payload(), big);
            assert_eq!(frames[1].payload(), b"x");
            assert_eq!(frames[2].payload(), &big[..70_000]);
            assert_eq!(d.buffered(), 0);
            d.finish().unwrap();
            if let Some(off) = align {
                // Large payloads are placed so that byte `off` is aligned.
                for f in [&frames[0], &frames[2]] {
                    let p = f.payload().as_ptr() as usize + off;
                    assert_eq!(p % PAYLOAD_ALIGN, 0);
                }
                // A recycled buffer is reused, still aligned.
                let (buf, _) = frames.swap_remove(0).into_buf();
                d.recycle(buf);
                let mut again = Vec::new();
                encode(FrameKind::Record, 3, &big, &mut again);
                d.push(&again);
                let f = d.pull().unwrap().unwrap();
                assert_eq!(f.payload(), big);
                assert_eq!((f.payload().as_ptr() as usize + off) % PAYLOAD_ALIGN, 0);
            }
        }

        let mut bad = Vec::new();
        encode(FrameKind::Record, 0, &big, &mut bad);
        bad[HEADER_LEN + 200_000] ^= 1;
        let mut d = FrameDecoder::new();
        d.push(&bad[..1000]);
        assert!(d.pull().unwrap().is_none());
        d.push(&bad[1000..]);
        assert!(matches!(d.pull(), Err(FrameError::ChecksumMismatch { .. })));

        let mut d = FrameDecoder::new();
        d.push(&wire[..100_000]);
        assert!(d.pull().unwrap().is_none());
        assert!(matches!(
            d.finish(),
            Err(FrameError::Truncated { have: 100_000, need }) if need == HEADER_LEN + big.len()
        ));
    }

    #[test]
    fn round_trip_every_kind() {
        let mut d = FrameDecoder::new();
        for (i, k) in FrameKind::ALL.into_iter().enumerate() {
            d.push(&frame(k, i as u64, &[i as u8; 5]));
        }
        for (i, k) in FrameKind::ALL.into_iter().enumerate() {
            let f = d.pull().unwrap().unwrap();
            assert_eq!(
                (f.kind, f.seq, f.payload()),
                (k, i as u64, &[i as u8; 5][..])
            );
        }
        assert_eq!(d.pull().unwrap(), None);
        assert_eq!(d.buffered(), 0);
        d.finish().unwrap();
    }

    #[test]
    fn header_layout() {
        let f = frame(FrameKind::Ping, 0x0102030405060708, b"abc");
        assert_eq!(&f[0..4], b"NMPF");
        assert_eq!(&f[4..6], &[1, 0]);
        assert_eq!(&f[6..8], &[32, 0]);
        assert_eq!(&f[8..12], &[0; 4]);
        assert_eq!(&f[12..20], &[8, 7, 6, 5, 4, 3, 2, 1]);
        assert_eq!(&f[20..24], &[3, 0, 0, 0]);
        assert_eq!(
            u64::from_le_bytes(f[24..32].try_into().unwrap()),
            xxhash_rust::xxh3::xxh3_64(&[&f[..24], b"abc"].concat())
        );
        assert_eq!(&f[32..], b"abc");
    }

    #[test]
    fn bad_magic_from_first_byte_and_poisoned() {
        let mut d = FrameDecoder::new();
        d.push(b"G");
        let e = d.pull().unwrap_err();
        assert!(matches!(e, FrameError::BadMagic { .. }));
        assert!(e.to_string().contains("is it an nbdmirror peer?"), "{e}");
        d.push(&frame(FrameKind::Ping, 0, b""));
        assert_eq!(d.pull().unwrap_err(), e);
        assert_eq!(d.buffered(), 0);
    }

    #[test]
    fn oversized_is_refused_from_the_header() {
        let mut f = frame(FrameKind::Record, 0, b"");
        f[20..24].copy_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        let mut d = FrameDecoder::new();
        d.push(&f);
        assert!(matches!(d.pull(), Err(FrameError::TooLarge { .. })));
        assert!(d.buf.capacity() < 1024);
    }

    #[test]
    fn lower_limit_applies() {
        let mut d = FrameDecoder::with_max_payload(4);
        d.push(&frame(FrameKind::Ping, 0, b"12345"));
        assert_eq!(d.pull(), Err(FrameError::TooLarge { len: 5, max: 4 }));
    }

    #[test]
    fn sequence_is_checked() {
        let mut d = FrameDecoder::new();
        d.push(&frame(FrameKind::Ping, 1, b""));
        assert_eq!(
            d.pull(),
            Err(FrameError::OutOfSequence {
                expected: 0,
                found: 1
            })
        );
    }

    #[test]
    fn truncated_waits_then_finish_reports() {
        let f = frame(FrameKind::Ping, 0, b"hello");
        let mut d = FrameDecoder::new();
        d.push(&f[..f.len() - 1]);
        assert_eq!(d.pull(), Ok(None));
        assert_eq!(
            d.finish(),
            Err(FrameError::Truncated {
                have: f.len() - 1,
                need: f.len()
            })
        );
        d.push(&f[f.len() - 1..]);
        assert!(d.pull().unwrap().is_some());
        d.finish().unwrap();
    }

    #[test]
    fn unknown_kind_and_flags_after_checksum() {
        for (at, val) in [(6usize, 99u16), (8, 1), (10, 1)] {
            let mut f = frame(FrameKind::Ping, 0, b"");
            f[at..at + 2].copy_from_slice(&val.to_le_bytes());
            let sum = checksum(&f, b"");
            f[24..32].copy_from_slice(&sum.to_le_bytes());
            let mut d = FrameDecoder::new();
            d.push(&f);
            let e = d.pull().unwrap_err();
            assert!(
                matches!(
                    e,
                    FrameError::UnknownKind { .. } | FrameError::ReservedBits { .. }
                ),
                "{e}"
            );
        }
    }

    /// A SummedRecord's frame checksum covers its header and block
    /// checksums but not its data: damage to the data passes the frame
    /// (the receiver checks the block checksums), damage anywhere else does
    /// not. Large and small ones, aligned or not, decode the same.
    #[test]
    fn summed_record_checksum_covers_head_and_sums_only() {
        assert_eq!(
            covered_len(FrameKind::SummedRecord.code(), 64 + 4104 * 3),
            64 + 24
        );
        assert_eq!(covered_len(FrameKind::SummedRecord.code(), 10), 10);
        assert_eq!(covered_len(FrameKind::Record.code(), 64 + 4104), 64 + 4104);
        for n in [1usize, 2, 40] {
            let head = [7u8; SUMMED_HEAD];
            let sums: Vec<u8> = (0..n * 8).map(|i| i as u8).collect();
            let data: Vec<u8> = (0..n * SUMMED_BLOCK).map(|i| (i % 251) as u8).collect();
            let mut f = Vec::new();
            encode_parts(FrameKind::SummedRecord, 0, &[&head, &sums, &data], &mut f);
            for align in [false, true] {
                let mut d = FrameDecoder::new();
                if align {
                    d.align_large_payloads(SUMMED_HEAD, 0);
                }
                d.push(&f);
                let fr = d.pull().unwrap().unwrap();
                assert_eq!(fr.kind, FrameKind::SummedRecord);
                assert_eq!(fr.payload().len(), SUMMED_HEAD + n * (8 + SUMMED_BLOCK));
                if align && f.len() - HEADER_LEN >= BODY_MIN {
                    let p = fr.payload();
                    let data_at = p[SUMMED_HEAD + 8 * n..].as_ptr() as usize;
                    assert_eq!(data_at % PAYLOAD_ALIGN, 0, "{n} blocks");
                }
            }
            // Data damage passes the frame layer.
            let mut g = f.clone();
            let last = g.len() - 1;
            g[last] ^= 1;
            let mut d = FrameDecoder::new();
            d.push(&g);
            assert!(d.pull().unwrap().is_some());
            // Damage to the header or a block checksum does not.
            for at in [20, HEADER_LEN + 3, HEADER_LEN + SUMMED_HEAD + 8 * n - 1] {
                let mut g = f.clone();
                g[at] ^= 1;
                let mut d = FrameDecoder::new();
                d.push(&g);
                let e = d.pull();
                assert!(
                    matches!(
                        e,
                        Err(FrameError::ChecksumMismatch { .. })
                            | Err(FrameError::TooLarge { .. })
                            | Ok(None)
                    ),
                    "byte {at}: {e:?}"
                );
                assert!(d.finish().is_err() || e.is_err(), "byte {at}");
            }
        }
    }
}
