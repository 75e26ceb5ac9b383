//! The NBD protocol (fixed newstyle) as a sans-I/O library: bytes in, events out.
//!
//! - [`consts`]: wire constants.
//! - [`handshake`]: the server's option negotiation state machine.
//! - [`transmission`]: request decoding/validation and reply encoding.
//!
//! Nothing here opens a socket, spawns a thread or blocks; the driver feeds
//! bytes it received and sends the bytes this library writes. Every decoder is
//! total: malformed input yields an error value, never a panic.

pub mod consts;
pub mod fuzzing;
pub mod handshake;
pub mod transmission;
mod wire;

pub use handshake::{greeting, ExportInfo, Handshake, HandshakeEnd, HandshakeStatus, Negotiated};
pub use transmission::{Command, Decoded, Request, RequestRules};
