//! Payload codecs of the handshake frames: Hello, Auth, Ready, Reject.
//!
//! Owns: the byte layout of each handshake payload (little-endian, fixed
//! size except Reject's message) and strict decoding of it.
//!
//! Must never: accept a payload of the wrong length or with nonzero reserved
//! bytes, panic on any input, or return peer-supplied text unsanitized
//! (Reject messages end up in logs, so control characters are escaped and
//! the length is capped). It makes no decisions: the handshake does.

use std::fmt;

use super::frame::FrameKind;

/// Version of the peer protocol's messages (carried in Hello).
/// 2: the Session frame, and `gen_bitmap` carries a secondary's session.
/// 3: BlockRequest and BlockData (read repair).
/// 4: the primary announces its generation whenever a peer is in sync,
/// also at connect when the peer already holds it, so a secondary knows
/// that records taken before the announce are resync data (it marks
/// itself inconsistent, `generation::FLAG_INCONSISTENT`).
/// 5: VerifyRequest and Verified (scrub: the secondary reads blocks,
/// verifies them against its own checksums and reports what they hold).
/// 6: a Generation frame also carries the primary's run and flags (16
/// bytes; RUN_ONLY: the run alone, to a peer being resynced and after each
/// Session frame), and is sent again to streaming peers when the run
/// advances.
/// 7: SummedRecord: a write of whole blocks carries the checksum of each
/// block, which covers its data in place of the frame checksum.
pub const PROTOCOL_VERSION: u16 = 7;
/// The oldest version this node still speaks: a session runs at the lower
/// of the two nodes' versions, so a volume can be upgraded a node at a
/// time (a version-2 session has no read repair).
pub const MIN_PROTOCOL_VERSION: u16 = 2;
/// Bytes of a Hello payload.
pub const HELLO_LEN: usize = 36;
/// Bytes of an identity (the part of Auth before the MAC).
pub const IDENTITY_LEN: usize = 16 + 4 + 4 + 8 * 4 + 8;
/// Bytes of an Auth payload.
pub const AUTH_LEN: usize = IDENTITY_LEN + MAC_LEN;
/// Bytes of an HMAC-SHA256.
pub const MAC_LEN: usize = 32;
/// Longest Reject message sent or accepted, in bytes.
pub const MAX_REJECT_MESSAGE: usize = 1024;

/// Which end of the connection a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Connected out (the primary).
    Initiator,
    /// Accepted the connection (a secondary).
    Responder,
}

impl Role {
    /// Wire value, also the role byte in the MAC input.
    pub fn code(self) -> u8 {
        match self {
            Role::Initiator => 1,
            Role::Responder => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Role> {
        match c {
            1 => Some(Role::Initiator),
            2 => Some(Role::Responder),
            _ => None,
        }
    }
}

/// Data generation identifiers, after DRBD's: the current generation, the
/// one the bitmap of writes the peer missed starts from, and two older ones.
/// The handshake only carries them (authenticated); resync policy compares them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct GenerationIds {
    pub current: u64,
    pub bitmap: u64,
    pub history: [u64; 2],
}

/// First message each way: no identity, only what is needed to agree on a
/// protocol and to challenge the other side.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hello {
    pub version: u16,
    pub role: Role,
    pub nonce: [u8; 32],
}

/// Who a node is. Sent inside Auth, covered by its MAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Identity {
    pub volume_uuid: [u8; 16],
    pub node_id: u32,
    pub generations: GenerationIds,
    pub last_applied_seq: u64,
}

/// Second message each way: identity plus the HMAC over the transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Auth {
    pub identity: Identity,
    pub mac: [u8; MAC_LEN],
}

/// Why a handshake was refused, as sent in a Reject frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RejectCode {
    /// The MAC did not verify: the secrets differ, or a replay.
    BadSecret,
    /// The nodes serve different volumes.
    WrongVolume,
    /// The peer's node id is not the expected one (or equals ours).
    WrongNode,
    /// No protocol version in common.
    VersionMismatch,
    /// Bytes that are not this protocol, or messages out of order.
    Malformed,
    /// Both nodes wrote independently; reserved for the resync policy.
    SplitBrain,
    /// A secondary already streams from another primary whose session is
    /// alive; one primary at a time.
    Busy,
    /// The sender's storage failed (a write or sync to its disk: ENOSPC,
    /// EIO); it stops. Older builds show it as "code 8" with the message.
    Failed,
    /// A code this build does not know (from a newer peer).
    Other(u16),
}

impl RejectCode {
    pub fn code(self) -> u16 {
        match self {
            RejectCode::BadSecret => 1,
            RejectCode::WrongVolume => 2,
            RejectCode::WrongNode => 3,
            RejectCode::VersionMismatch => 4,
            RejectCode::Malformed => 5,
            RejectCode::SplitBrain => 6,
            RejectCode::Busy => 7,
            RejectCode::Failed => 8,
            RejectCode::Other(c) => c,
        }
    }

    pub fn from_code(c: u16) -> RejectCode {
        match c {
            1 => RejectCode::BadSecret,
            2 => RejectCode::WrongVolume,
            3 => RejectCode::WrongNode,
            4 => RejectCode::VersionMismatch,
            5 => RejectCode::Malformed,
            6 => RejectCode::SplitBrain,
            7 => RejectCode::Busy,
            8 => RejectCode::Failed,
            c => RejectCode::Other(c),
        }
    }
}

impl fmt::Display for RejectCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RejectCode::BadSecret => f.write_str("bad secret"),
            RejectCode::WrongVolume => f.write_str("wrong volume"),
            RejectCode::WrongNode => f.write_str("wrong node"),
            RejectCode::VersionMismatch => f.write_str("version mismatch"),
            RejectCode::Malformed => f.write_str("malformed"),
            RejectCode::SplitBrain => f.write_str("split brain"),
            RejectCode::Busy => f.write_str("another primary holds the session"),
            RejectCode::Failed => f.write_str("storage failed"),
            RejectCode::Other(c) => write!(f, "code {c}"),
        }
    }
}

/// A refusal: code plus a sanitized human reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub code: RejectCode,
    pub message: String,
}

/// A handshake payload that does not decode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MessageError {
    /// Wrong payload size for the kind.
    Length {
        kind: FrameKind,
        expected: usize,
        found: usize,
    },
    /// A field with a value this version does not define.
    BadField {
        kind: FrameKind,
        field: &'static str,
        value: u64,
    },
}

impl fmt::Display for MessageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MessageError::Length {
                kind,
                expected,
                found,
            } => write!(
                f,
                "peer sent a {kind} payload of {found} bytes; protocol version {PROTOCOL_VERSION} defines {expected}"
            ),
            MessageError::BadField { kind, field, value } => write!(
                f,
                "peer sent a {kind} with {field} = {value}, which protocol version {PROTOCOL_VERSION} does not define"
            ),
        }
    }
}

impl std::error::Error for MessageError {}

fn check_len(kind: FrameKind, p: &[u8], expected: usize) -> Result<(), MessageError> {
    if p.len() != expected {
        return Err(MessageError::Length {
            kind,
            expected,
            found: p.len(),
        });
    }
    Ok(())
}

fn u64_at(p: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(p[at..at + 8].try_into().unwrap())
}

impl Hello {
    /// Layout: version u16, role u8, reserved u8 (0), nonce [32].
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(HELLO_LEN);
        p.extend_from_slice(&self.version.to_le_bytes());
        p.push(self.role.code());
        p.push(0);
        p.extend_from_slice(&self.nonce);
        p
    }

    pub fn decode(p: &[u8]) -> Result<Hello, MessageError> {
        let kind = FrameKind::Hello;
        check_len(kind, p, HELLO_LEN)?;
        let version = u16::from_le_bytes([p[0], p[1]]);
        let role = Role::from_code(p[2]).ok_or(MessageError::BadField {
            kind,
            field: "role",
            value: p[2] as u64,
        })?;
        if p[3] != 0 {
            return Err(MessageError::BadField {
                kind,
                field: "reserved",
                value: p[3] as u64,
            });
        }
        Ok(Hello {
            version,
            role,
            nonce: p[4..36].try_into().unwrap(),
        })
    }
}

impl Identity {
    /// Layout: volume uuid [16], node id u32, reserved u32 (0), generation
    /// current, bitmap, history[0], history[1] (u64 each), last applied seq u64.
    pub fn encode_into(&self, p: &mut Vec<u8>) {
        p.extend_from_slice(&self.volume_uuid);
        p.extend_from_slice(&self.node_id.to_le_bytes());
        p.extend_from_slice(&0u32.to_le_bytes());
        let g = &self.generations;
        for v in [g.current, g.bitmap, g.history[0], g.history[1]] {
            p.extend_from_slice(&v.to_le_bytes());
        }
        p.extend_from_slice(&self.last_applied_seq.to_le_bytes());
    }

    fn decode(p: &[u8]) -> Result<Identity, MessageError> {
        let reserved = u32::from_le_bytes(p[20..24].try_into().unwrap());
        if reserved != 0 {
            return Err(MessageError::BadField {
                kind: FrameKind::Auth,
                field: "reserved",
                value: reserved as u64,
            });
        }
        Ok(Identity {
            volume_uuid: p[0..16].try_into().unwrap(),
            node_id: u32::from_le_bytes(p[16..20].try_into().unwrap()),
            generations: GenerationIds {
                current: u64_at(p, 24),
                bitmap: u64_at(p, 32),
                history: [u64_at(p, 40), u64_at(p, 48)],
            },
            last_applied_seq: u64_at(p, 56),
        })
    }
}

impl Auth {
    /// Layout: identity, then the MAC.
    pub fn encode(&self) -> Vec<u8> {
        let mut p = Vec::with_capacity(AUTH_LEN);
        self.identity.encode_into(&mut p);
        p.extend_from_slice(&self.mac);
        p
    }

    pub fn decode(p: &[u8]) -> Result<Auth, MessageError> {
        check_len(FrameKind::Auth, p, AUTH_LEN)?;
        Ok(Auth {
            identity: Identity::decode(&p[..IDENTITY_LEN])?,
            mac: p[IDENTITY_LEN..].try_into().unwrap(),
        })
    }
}

/// Ready has an empty payload.
pub fn decode_ready(p: &[u8]) -> Result<(), MessageError> {
    check_len(FrameKind::Ready, p, 0)
}

/// Make peer-supplied text safe to log: control characters and non-ASCII
/// quotes escaped, at most [`MAX_REJECT_MESSAGE`] bytes considered.
pub fn sanitize(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_REJECT_MESSAGE)]);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    out
}

impl Reject {
    /// Layout: code u16, message length u16, message (UTF-8, at most
    /// [`MAX_REJECT_MESSAGE`] bytes; longer messages are cut on a char boundary).
    pub fn encode(&self) -> Vec<u8> {
        let mut end = self.message.len().min(MAX_REJECT_MESSAGE);
        while !self.message.is_char_boundary(end) {
            end -= 1;
        }
        let msg = &self.message.as_bytes()[..end];
        let mut p = Vec::with_capacity(4 + msg.len());
        p.extend_from_slice(&self.code.code().to_le_bytes());
        p.extend_from_slice(&(msg.len() as u16).to_le_bytes());
        p.extend_from_slice(msg);
        p
    }

    pub fn decode(p: &[u8]) -> Result<Reject, MessageError> {
        let kind = FrameKind::Reject;
        if p.len() < 4 {
            return Err(MessageError::Length {
                kind,
                expected: 4,
                found: p.len(),
            });
        }
        let code = RejectCode::from_code(u16::from_le_bytes([p[0], p[1]]));
        let len = u16::from_le_bytes([p[2], p[3]]) as usize;
        if len > MAX_REJECT_MESSAGE {
            return Err(MessageError::BadField {
                kind,
                field: "message length",
                value: len as u64,
            });
        }
        check_len(kind, p, 4 + len)?;
        Ok(Reject {
            code,
            message: sanitize(&p[4..]),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_round_trip_and_strictness() {
        let h = Hello {
            version: PROTOCOL_VERSION,
            role: Role::Responder,
            nonce: [7; 32],
        };
        let b = h.encode();
        assert_eq!(b.len(), HELLO_LEN);
        assert_eq!(Hello::decode(&b).unwrap(), h);
        assert!(Hello::decode(&b[..35]).is_err());
        let mut bad = b.clone();
        bad[2] = 3;
        assert!(Hello::decode(&bad).is_err());
        bad = b;
        bad[3] = 1;
        assert!(Hello::decode(&bad).is_err());
    }

    #[test]
    fn auth_round_trip() {
        let a = Auth {
            identity: Identity {
                volume_uuid: [3; 16],
                node_id: 9,
                generations: GenerationIds {
                    current: 1,
                    bitmap: 2,
                    history: [3, 4],
                },
                last_applied_seq: 77,
            },
            mac: [5; 32],
        };
        let b = a.encode();
        assert_eq!(b.len(), AUTH_LEN);
        assert_eq!(Auth::decode(&b).unwrap(), a);
        let mut bad = b.clone();
        bad[21] = 1;
        assert!(Auth::decode(&bad).is_err());
        assert!(Auth::decode(&b[1..]).is_err());
    }

    #[test]
    fn reject_round_trip_sanitized_and_capped() {
        let r = Reject {
            code: RejectCode::WrongVolume,
            message: "volume mismatch".into(),
        };
        assert_eq!(Reject::decode(&r.encode()).unwrap(), r);
        let evil = Reject {
            code: RejectCode::Other(77),
            message: "line\nfake log line\x1b[31m".into(),
        };
        let d = Reject::decode(&evil.encode()).unwrap();
        assert_eq!(d.code, RejectCode::Other(77));
        assert!(!d.message.contains('\n') && !d.message.contains('\x1b'));
        let long = Reject {
            code: RejectCode::Malformed,
            message: "é".repeat(MAX_REJECT_MESSAGE),
        };
        let enc = long.encode();
        assert!(enc.len() <= 4 + MAX_REJECT_MESSAGE);
        Reject::decode(&enc).unwrap();
        assert!(Reject::decode(&[1, 0, 5, 0, b'a']).is_err());
        assert!(decode_ready(&[0]).is_err());
    }
}
