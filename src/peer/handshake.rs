//! The peer handshake: a sans-I/O state machine run by both ends.
//!
//! Owns: the order of handshake messages, mutual authentication with the
//! shared secret (HMAC-SHA256 challenge-response over the whole transcript),
//! the identity checks (volume uuid, node ids) and the verdict: an
//! [`Event::Established`] with the peer's identity, or an
//! [`Event::Rejected`] with a reason a person can act on.
//!
//! Must never: put the secret on the wire, compare MACs in variable time,
//! reveal anything about this node (volume, node id, generations) to a
//! connector before it proved it knows the secret (the responder side), let
//! an unauthenticated peer make it buffer more than a few KiB, panic on any
//! input, do I/O, read clocks or randomness (the caller supplies the nonce
//! and enforces timeouts), or write log lines (the caller logs the reasons
//! it gets back).
//!
//! Sequence (each arrow one frame; see docs/peer-protocol.md):
//!
//! ```text
//! initiator (primary)                       responder (secondary)
//!   Hello{v, role=I, nonce_i}         --->
//!                                     <---  Hello{v, role=R, nonce_r}
//!   Auth{identity_i, mac_i}           --->  verify mac_i, else Reject(BadSecret)
//!                                     <---  Auth{identity_r, mac_r}
//!                                     <---  Ready, or Reject(WrongVolume|WrongNode)
//!   verify mac_r, check identity_r
//!   Ready, or Reject(...)             --->
//! ```
//!
//! `mac_i = HMAC(secret, CONTEXT || 1 || hello_i || hello_r || identity_i)`
//! and `mac_r = HMAC(secret, CONTEXT || 2 || hello_i || hello_r || auth_i ||
//! identity_r)`, over the payload bytes as sent. Both nonces are in every
//! MAC, so an Auth recorded in one session fails in any other.

use std::collections::VecDeque;
use std::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::frame::{encode, FrameDecoder, FrameError, FrameKind, MAX_PAYLOAD};
use super::messages::{
    decode_ready, Auth, GenerationIds, Hello, Identity, MessageError, Reject, RejectCode, Role,
    MAC_LEN, MAX_REJECT_MESSAGE, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION,
};

type HmacSha256 = Hmac<Sha256>;

/// Domain separation for the MAC input.
pub const CONTEXT: &[u8] = b"nbdmirror peer auth v1";
/// Shortest shared secret accepted.
pub const MIN_SECRET: usize = 16;
/// Largest frame payload accepted before the handshake is done: the
/// largest handshake message (a Reject with a full message).
pub const HANDSHAKE_MAX_PAYLOAD: usize = 4 + MAX_REJECT_MESSAGE;

/// What a node brings to a handshake.
#[derive(Clone)]
pub struct Config {
    /// Shared secret, at least [`MIN_SECRET`] bytes. Never sent.
    pub secret: Vec<u8>,
    pub volume_uuid: [u8; 16],
    pub node_id: u32,
    /// If set, the peer must have this node id.
    pub expected_peer: Option<u32>,
    pub generations: GenerationIds,
    pub last_applied_seq: u64,
    /// Fresh random bytes for this connection (the caller reads /dev/urandom).
    pub nonce: [u8; 32],
}

impl fmt::Debug for Config {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Config")
            .field(
                "secret",
                &format_args!("<{} bytes redacted>", self.secret.len()),
            )
            .field("volume_uuid", &Uuid(&self.volume_uuid))
            .field("node_id", &self.node_id)
            .field("expected_peer", &self.expected_peer)
            .field("generations", &self.generations)
            .field("last_applied_seq", &self.last_applied_seq)
            .finish_non_exhaustive()
    }
}

/// Who the peer turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PeerInfo {
    pub node_id: u32,
    /// The protocol version the session runs at (see `MIN_PROTOCOL_VERSION`).
    pub version: u16,
    pub generations: GenerationIds,
    pub last_applied_seq: u64,
}

/// What the caller must do or know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// Write these bytes to the connection, in order.
    Send(Vec<u8>),
    /// Both ends authenticated and accepted each other. Take the session
    /// with [`Handshake::into_session`].
    Established(PeerInfo),
    /// The handshake failed; log `reason`, flush pending `Send`s (they may
    /// hold a Reject for the peer), then close. `by_peer` tells whether the
    /// peer refused us (true) or we refused it (false).
    Rejected {
        reason: HandshakeError,
        by_peer: bool,
    },
}

/// Why a handshake did not establish a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HandshakeError {
    /// The secret in the configuration is too short.
    WeakSecret {
        len: usize,
    },
    /// The nonce in the configuration is all zeros (not filled in).
    ZeroNonce,
    /// The byte stream is not valid frames.
    Frame(FrameError),
    /// A handshake payload that does not decode.
    Message(MessageError),
    /// A valid frame at the wrong moment.
    Unexpected {
        got: FrameKind,
        waiting_for: &'static str,
    },
    /// No protocol version in common.
    VersionMismatch {
        ours: u16,
        theirs: u16,
    },
    /// The peer's Hello claims the same role as ours.
    RoleConflict {
        peer_role: Role,
    },
    /// The peer's Hello carries our own nonce: a reflection.
    Reflected,
    /// The peer's Hello carries an all-zero nonce: it did not fill one in,
    /// so its half of the session's freshness is missing.
    PeerZeroNonce,
    /// The peer's MAC does not verify.
    BadSecret,
    WrongVolume {
        ours: [u8; 16],
        theirs: [u8; 16],
    },
    UnexpectedNode {
        expected: u32,
        found: u32,
    },
    SameNodeId {
        node_id: u32,
    },
    /// The peer claims node id 0, which no node has (`init` takes 1 and up).
    ZeroNodeId,
    /// The peer sent a Reject.
    PeerRejected(Reject),
    /// The connection ended before the handshake finished.
    Closed {
        waiting_for: &'static str,
        truncated: Option<FrameError>,
    },
}

struct Uuid<'a>(&'a [u8; 16]);

impl fmt::Display for Uuid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, b) in self.0.iter().enumerate() {
            if matches!(i, 4 | 6 | 8 | 10) {
                f.write_str("-")?;
            }
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Uuid<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for HandshakeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HandshakeError::WeakSecret { len } => write!(
                f,
                "the peer secret is {len} bytes; use at least {MIN_SECRET} random bytes (the same on every node)"
            ),
            HandshakeError::ZeroNonce => {
                f.write_str("handshake nonce is all zeros: fill it from /dev/urandom for every connection")
            }
            HandshakeError::Frame(e) => write!(f, "{e}"),
            HandshakeError::Message(e) => write!(f, "{e}"),
            HandshakeError::Unexpected { got, waiting_for } => write!(
                f,
                "peer sent a {got} frame while the handshake was waiting for {waiting_for}: protocol violation"
            ),
            HandshakeError::VersionMismatch { ours, theirs } => write!(
                f,
                "peer speaks peer protocol version {theirs}; this node speaks version {ours}: upgrade the older node"
            ),
            HandshakeError::RoleConflict { peer_role } => write!(
                f,
                "peer also claims to be the {}: protocol violation or a connection looped back",
                match peer_role {
                    Role::Initiator => "initiator",
                    Role::Responder => "responder",
                }
            ),
            HandshakeError::Reflected => f.write_str(
                "peer sent back our own nonce: a reflected or looped-back connection",
            ),
            HandshakeError::PeerZeroNonce => f.write_str(
                "peer's Hello carries an all-zero nonce: not a well-formed nbdmirror peer",
            ),
            HandshakeError::BadSecret => f.write_str(
                "authentication failed: the peer's MAC does not match, so the nodes have different peer secrets (or the message was replayed from another session); check the secret configured on both nodes",
            ),
            HandshakeError::WrongVolume { ours, theirs } => write!(
                f,
                "peer serves volume {}, this node serves volume {}: the peer address points at another volume's node",
                Uuid(theirs),
                Uuid(ours)
            ),
            HandshakeError::UnexpectedNode { expected, found } => write!(
                f,
                "peer is node {found}, but node {expected} was expected at this address: check the peer configuration"
            ),
            HandshakeError::SameNodeId { node_id } => write!(
                f,
                "peer has the same node id {node_id} as this node: every node needs its own id (or the node connected to itself)"
            ),
            HandshakeError::ZeroNodeId => {
                write!(f, "peer claims node id 0, which no node has (ids start at 1)")
            }
            HandshakeError::PeerRejected(r) => {
                write!(f, "peer rejected the handshake ({}): {}", r.code, r.message)
            }
            HandshakeError::Closed {
                waiting_for,
                truncated,
            } => {
                write!(
                    f,
                    "peer closed the connection while the handshake was waiting for {waiting_for}"
                )?;
                if let Some(t) = truncated {
                    write!(f, " ({t})")?;
                }
                Ok(())
            }
        }
    }
}

impl std::error::Error for HandshakeError {}

impl HandshakeError {
    /// The code to send the peer in a Reject, if we should send one.
    pub fn reject_code(&self) -> Option<RejectCode> {
        match self {
            HandshakeError::WeakSecret { .. }
            | HandshakeError::ZeroNonce
            | HandshakeError::PeerRejected(_)
            | HandshakeError::Closed { .. } => None,
            HandshakeError::Frame(FrameError::UnsupportedVersion { .. })
            | HandshakeError::VersionMismatch { .. } => Some(RejectCode::VersionMismatch),
            HandshakeError::Frame(_)
            | HandshakeError::Message(_)
            | HandshakeError::Unexpected { .. }
            | HandshakeError::RoleConflict { .. }
            | HandshakeError::Reflected
            | HandshakeError::PeerZeroNonce => Some(RejectCode::Malformed),
            HandshakeError::BadSecret => Some(RejectCode::BadSecret),
            HandshakeError::WrongVolume { .. } => Some(RejectCode::WrongVolume),
            HandshakeError::UnexpectedNode { .. }
            | HandshakeError::SameNodeId { .. }
            | HandshakeError::ZeroNodeId => Some(RejectCode::WrongNode),
        }
    }

    /// What to tell the peer. Before the peer is authenticated this says
    /// nothing about this node beyond its protocol version.
    fn reject_message(&self) -> String {
        match self {
            HandshakeError::BadSecret => {
                "authentication failed: the peer secrets differ (or the Auth was replayed)".into()
            }
            HandshakeError::WrongVolume { ours, theirs } => format!(
                "volume mismatch: you sent {}, I serve {}",
                Uuid(theirs),
                Uuid(ours)
            ),
            HandshakeError::UnexpectedNode { expected, found } => {
                format!("node id mismatch: you are node {found}, I expected node {expected}")
            }
            HandshakeError::SameNodeId { node_id } => {
                format!("node id mismatch: you have my own node id {node_id}")
            }
            HandshakeError::ZeroNodeId => "node id 0 is no node's id".into(),
            other => format!("refused: {other}"),
        }
    }
}

/// A finished handshake's connection state, to carry on with.
#[derive(Debug)]
pub struct Session {
    pub peer: PeerInfo,
    /// The decoder, holding any bytes the peer sent after its last handshake
    /// frame, with the full payload limit.
    pub decoder: FrameDecoder,
    /// Sequence number of the next frame this node sends.
    pub next_send_seq: u64,
}

impl Session {
    /// Append a frame with the next sequence number.
    pub fn encode(&mut self, kind: FrameKind, payload: &[u8], out: &mut Vec<u8>) {
        encode(kind, self.next_send_seq, payload, out);
        self.next_send_seq += 1;
    }

    /// Append a Reject (e.g. SplitBrain from the resync policy); the caller
    /// then closes the connection.
    pub fn reject(&mut self, code: RejectCode, message: &str, out: &mut Vec<u8>) {
        let p = Reject {
            code,
            message: message.to_string(),
        }
        .encode();
        self.encode(FrameKind::Reject, &p, out);
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    AwaitHello,
    AwaitAuth,
    AwaitReady,
    Established,
    Rejected,
}

impl State {
    fn waiting_for(self) -> &'static str {
        match self {
            State::AwaitHello => "the peer's Hello",
            State::AwaitAuth => "the peer's Auth",
            State::AwaitReady => "the peer's Ready",
            State::Established | State::Rejected => "nothing",
        }
    }
}

/// One end of one handshake. Feed it received bytes with
/// [`receive`](Self::receive), tell it about end of stream with
/// [`eof`](Self::eof), and act on [`poll_event`](Self::poll_event).
pub struct Handshake {
    role: Role,
    cfg: Config,
    state: State,
    decoder: FrameDecoder,
    send_seq: u64,
    hello_i: Vec<u8>,
    hello_r: Vec<u8>,
    auth_i: Vec<u8>,
    peer: Option<PeerInfo>,
    events: VecDeque<Event>,
    /// The version the session runs at: ours until the Hellos settle it.
    version: u16,
}

impl fmt::Debug for Handshake {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handshake")
            .field("role", &self.role)
            .field("state", &self.state)
            .field("cfg", &self.cfg)
            .finish_non_exhaustive()
    }
}

impl Handshake {
    /// Start a handshake. An initiator queues its Hello at once.
    pub fn new(role: Role, cfg: Config) -> Result<Handshake, HandshakeError> {
        Self::with_version(role, cfg, PROTOCOL_VERSION)
    }

    /// A handshake that speaks at most protocol `version` (at least
    /// `MIN_PROTOCOL_VERSION`): what a node of that version would do. For
    /// tests of mixed versions.
    pub fn with_version(
        role: Role,
        cfg: Config,
        version: u16,
    ) -> Result<Handshake, HandshakeError> {
        if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&version) {
            return Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: version,
            });
        }
        if cfg.secret.len() < MIN_SECRET {
            return Err(HandshakeError::WeakSecret {
                len: cfg.secret.len(),
            });
        }
        if cfg.nonce == [0; 32] {
            return Err(HandshakeError::ZeroNonce);
        }
        let mut h = Handshake {
            role,
            cfg,
            state: State::AwaitHello,
            decoder: FrameDecoder::with_max_payload(HANDSHAKE_MAX_PAYLOAD),
            send_seq: 0,
            hello_i: Vec::new(),
            hello_r: Vec::new(),
            auth_i: Vec::new(),
            peer: None,
            events: VecDeque::new(),
            version,
        };
        if role == Role::Initiator {
            h.hello_i = h.my_hello();
            let p = h.hello_i.clone();
            h.send(FrameKind::Hello, &p);
        }
        Ok(h)
    }

    pub fn role(&self) -> Role {
        self.role
    }

    /// True once Established or Rejected.
    pub fn is_done(&self) -> bool {
        matches!(self.state, State::Established | State::Rejected)
    }

    pub fn is_established(&self) -> bool {
        self.state == State::Established
    }

    /// The next thing for the caller to do or know.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// Bytes received from the peer. After the handshake is done, bytes are
    /// kept (Established: for the session) or dropped (Rejected).
    pub fn receive(&mut self, bytes: &[u8]) {
        match self.state {
            State::Rejected => return,
            State::Established => {
                self.decoder.push(bytes);
                return;
            }
            _ => {}
        }
        self.decoder.push(bytes);
        while !self.is_done() {
            match self.decoder.pull() {
                Ok(None) => break,
                Ok(Some(f)) => {
                    if let Err(e) = self.handle(f.kind, f.payload()) {
                        self.fail(e);
                    }
                }
                Err(e) => self.fail(HandshakeError::Frame(e)),
            }
        }
    }

    /// The peer closed its end (or the caller's timeout fired: then call
    /// this too, it ends the handshake the same way).
    pub fn eof(&mut self) {
        if self.is_done() {
            return;
        }
        let truncated = self.decoder.finish().err();
        let waiting_for = self.state.waiting_for();
        self.state = State::Rejected;
        self.events.push_back(Event::Rejected {
            reason: HandshakeError::Closed {
                waiting_for,
                truncated,
            },
            by_peer: false,
        });
    }

    /// The established session, or `None` if the handshake is not (yet)
    /// established.
    pub fn into_session(self) -> Option<Session> {
        if self.state != State::Established {
            return None;
        }
        let mut decoder = self.decoder;
        decoder.set_max_payload(MAX_PAYLOAD);
        Some(Session {
            peer: self.peer?,
            decoder,
            next_send_seq: self.send_seq,
        })
    }

    fn send(&mut self, kind: FrameKind, payload: &[u8]) {
        let mut out = Vec::new();
        encode(kind, self.send_seq, payload, &mut out);
        self.send_seq += 1;
        self.events.push_back(Event::Send(out));
    }

    fn my_hello(&self) -> Vec<u8> {
        Hello {
            version: self.version,
            role: self.role,
            nonce: self.cfg.nonce,
        }
        .encode()
    }

    fn my_identity(&self) -> Identity {
        Identity {
            volume_uuid: self.cfg.volume_uuid,
            node_id: self.cfg.node_id,
            generations: self.cfg.generations,
            last_applied_seq: self.cfg.last_applied_seq,
        }
    }

    /// The MAC `role` computes over the transcript so far plus its identity.
    fn mac(&self, role: Role, identity: &[u8]) -> HmacSha256 {
        let mut m =
            HmacSha256::new_from_slice(&self.cfg.secret).expect("HMAC takes any key length");
        m.update(CONTEXT);
        m.update(&[role.code()]);
        m.update(&self.hello_i);
        m.update(&self.hello_r);
        if role == Role::Responder {
            m.update(&self.auth_i);
        }
        m.update(identity);
        m
    }

    fn fail(&mut self, reason: HandshakeError) {
        if self.is_done() {
            return;
        }
        if let Some(code) = reason.reject_code() {
            let p = Reject {
                code,
                message: reason.reject_message(),
            }
            .encode();
            self.send(FrameKind::Reject, &p);
        }
        let by_peer = matches!(reason, HandshakeError::PeerRejected(_));
        self.state = State::Rejected;
        self.events.push_back(Event::Rejected { reason, by_peer });
    }

    fn handle(&mut self, kind: FrameKind, payload: &[u8]) -> Result<(), HandshakeError> {
        if kind == FrameKind::Reject {
            let r = Reject::decode(payload).map_err(HandshakeError::Message)?;
            return Err(HandshakeError::PeerRejected(r));
        }
        let unexpected = HandshakeError::Unexpected {
            got: kind,
            waiting_for: self.state.waiting_for(),
        };
        match (self.state, kind) {
            (State::AwaitHello, FrameKind::Hello) => self.on_hello(payload),
            (State::AwaitAuth, FrameKind::Auth) => self.on_auth(payload),
            (State::AwaitReady, FrameKind::Ready) => {
                decode_ready(payload).map_err(HandshakeError::Message)?;
                self.state = State::Established;
                let peer = self.peer.expect("peer identity is known before Ready");
                self.events.push_back(Event::Established(peer));
                Ok(())
            }
            _ => Err(unexpected),
        }
    }

    fn on_hello(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        let h = Hello::decode(payload).map_err(HandshakeError::Message)?;
        // Version: the responder answers with the lower of the offered
        // version and its own; the initiator accepts an answer it speaks.
        let supported = match self.role {
            Role::Responder => h.version >= MIN_PROTOCOL_VERSION,
            Role::Initiator => (MIN_PROTOCOL_VERSION..=self.version).contains(&h.version),
        };
        if !supported {
            return Err(HandshakeError::VersionMismatch {
                ours: PROTOCOL_VERSION,
                theirs: h.version,
            });
        }
        if h.role == self.role {
            return Err(HandshakeError::RoleConflict { peer_role: h.role });
        }
        if h.nonce == self.cfg.nonce {
            return Err(HandshakeError::Reflected);
        }
        if h.nonce == [0; 32] {
            return Err(HandshakeError::PeerZeroNonce);
        }
        // Both Hellos are in the transcript the MACs cover, so a version
        // cannot be lowered on the way without the handshake failing.
        self.version = h.version.min(self.version);
        match self.role {
            Role::Responder => {
                self.hello_i = payload.to_vec();
                self.hello_r = self.my_hello();
                let p = self.hello_r.clone();
                self.send(FrameKind::Hello, &p);
            }
            Role::Initiator => {
                self.hello_r = payload.to_vec();
                let mut p = Vec::new();
                self.my_identity().encode_into(&mut p);
                let mac = self.mac(Role::Initiator, &p).finalize().into_bytes();
                p.extend_from_slice(&mac);
                self.auth_i = p.clone();
                self.send(FrameKind::Auth, &p);
            }
        }
        self.state = State::AwaitAuth;
        Ok(())
    }

    fn on_auth(&mut self, payload: &[u8]) -> Result<(), HandshakeError> {
        let a = Auth::decode(payload).map_err(HandshakeError::Message)?;
        let peer_role = match self.role {
            Role::Initiator => Role::Responder,
            Role::Responder => Role::Initiator,
        };
        if self.role == Role::Responder {
            self.auth_i = payload.to_vec();
        }
        // The MAC first: nothing about identities is decided (or told) until
        // the peer proved it knows the secret.
        let identity_bytes = &payload[..payload.len() - MAC_LEN];
        self.mac(peer_role, identity_bytes)
            .verify_slice(&a.mac)
            .map_err(|_| HandshakeError::BadSecret)?;
        if self.role == Role::Responder {
            // The initiator is authenticated: prove ourselves in turn, with
            // our identity, so it can report a mismatch precisely.
            let mut p = Vec::new();
            self.my_identity().encode_into(&mut p);
            let mac = self.mac(Role::Responder, &p).finalize().into_bytes();
            p.extend_from_slice(&mac);
            self.send(FrameKind::Auth, &p);
        }
        self.check_identity(&a.identity)?;
        self.peer = Some(PeerInfo {
            node_id: a.identity.node_id,
            version: self.version,
            generations: a.identity.generations,
            last_applied_seq: a.identity.last_applied_seq,
        });
        self.send(FrameKind::Ready, &[]);
        self.state = State::AwaitReady;
        Ok(())
    }

    fn check_identity(&self, id: &Identity) -> Result<(), HandshakeError> {
        if id.volume_uuid != self.cfg.volume_uuid {
            return Err(HandshakeError::WrongVolume {
                ours: self.cfg.volume_uuid,
                theirs: id.volume_uuid,
            });
        }
        if id.node_id == 0 {
            return Err(HandshakeError::ZeroNodeId);
        }
        if id.node_id == self.cfg.node_id {
            return Err(HandshakeError::SameNodeId {
                node_id: id.node_id,
            });
        }
        if let Some(expected) = self.cfg.expected_peer {
            if id.node_id != expected {
                return Err(HandshakeError::UnexpectedNode {
                    expected,
                    found: id.node_id,
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(node: u32, nonce: u8) -> Config {
        Config {
            secret: b"0123456789abcdef-secret".to_vec(),
            volume_uuid: [0xab; 16],
            node_id: node,
            expected_peer: None,
            generations: GenerationIds {
                current: 10 + node as u64,
                bitmap: 0,
                history: [0, 0],
            },
            last_applied_seq: 100 * node as u64,
            nonce: [nonce; 32],
        }
    }

    fn sends(h: &mut Handshake) -> (Vec<u8>, Vec<Event>) {
        let mut bytes = Vec::new();
        let mut other = Vec::new();
        while let Some(e) = h.poll_event() {
            match e {
                Event::Send(b) => bytes.extend(b),
                e => other.push(e),
            }
        }
        (bytes, other)
    }

    #[test]
    fn config_is_validated_and_secret_redacted() {
        let mut c = cfg(1, 1);
        c.secret = b"short".to_vec();
        assert_eq!(
            Handshake::new(Role::Initiator, c).unwrap_err(),
            HandshakeError::WeakSecret { len: 5 }
        );
        let mut c = cfg(1, 1);
        c.nonce = [0; 32];
        assert_eq!(
            Handshake::new(Role::Initiator, c).unwrap_err(),
            HandshakeError::ZeroNonce
        );
        let h = Handshake::new(Role::Initiator, cfg(1, 1)).unwrap();
        let dbg = format!("{h:?}");
        assert!(
            !dbg.contains("secret\"") && !dbg.contains("0123456789"),
            "{dbg}"
        );
    }

    #[test]
    fn handshake_in_memory() {
        let mut i = Handshake::new(Role::Initiator, cfg(1, 1)).unwrap();
        let mut r = Handshake::new(Role::Responder, cfg(2, 2)).unwrap();
        let mut done_i = Vec::new();
        let mut done_r = Vec::new();
        for _ in 0..5 {
            let (b, e) = sends(&mut i);
            done_i.extend(e);
            r.receive(&b);
            let (b, e) = sends(&mut r);
            done_r.extend(e);
            i.receive(&b);
        }
        assert!(matches!(done_i[..], [Event::Established(p)] if p.node_id == 2));
        assert!(
            matches!(done_r[..], [Event::Established(p)] if p.node_id == 1 && p.last_applied_seq == 100)
        );
        let si = i.into_session().unwrap();
        let sr = r.into_session().unwrap();
        assert_eq!(si.next_send_seq, 3);
        assert_eq!(sr.next_send_seq, 3);
        assert_eq!(si.decoder.next_seq(), 3);
        assert_eq!(sr.decoder.max_payload(), MAX_PAYLOAD);
    }

    #[test]
    fn secret_never_on_the_wire() {
        let c = cfg(1, 1);
        let secret = c.secret.clone();
        let mut i = Handshake::new(Role::Initiator, c).unwrap();
        let mut r = Handshake::new(Role::Responder, cfg(2, 2)).unwrap();
        let mut wire = Vec::new();
        for _ in 0..5 {
            let (b, _) = sends(&mut i);
            wire.extend_from_slice(&b);
            r.receive(&b);
            let (b, _) = sends(&mut r);
            wire.extend_from_slice(&b);
            i.receive(&b);
        }
        assert!(!wire.windows(secret.len()).any(|w| w == secret));
        assert!(!wire.windows(8).any(|w| w == &secret[..8]));
    }
}
