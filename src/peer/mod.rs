//! The peer protocol between mirror nodes, sans-I/O.
//!
//! - [`frame`]: the frame layout on the wire and the incremental decoder.
//! - [`messages`]: payload codecs of the handshake frames.
//! - [`handshake`]: the mutual-authentication state machine both ends run.
//!
//! This module owns the protocol's bytes and decisions only. It must never
//! do I/O, read clocks or randomness, log, or touch the store: the caller
//! (the server's event loop, later) moves bytes between sockets and these
//! state machines, supplies nonces, enforces timeouts and logs the reasons
//! it is given. The specification is docs/peer-protocol.md.

pub mod frame;
pub mod handshake;
pub mod messages;

pub use frame::{encode, Frame, FrameDecoder, FrameError, FrameKind, MAX_PAYLOAD};
pub use handshake::{Config, Event, Handshake, HandshakeError, PeerInfo, Session};
pub use messages::{GenerationIds, RejectCode, Role};
