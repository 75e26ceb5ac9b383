//! nbdmirror: a userspace block-device mirroring driver.
//!
//! - [`io`]: the I/O seam (io_uring backend) every disk and socket op goes through.
//! - [`sim`]: the simulated I/O backend for crash and fault tests.
//! - [`store`]: one replica's data, journal, checksums and recovery.
//! - [`server`]: the NBD front end and event loop.
//! - [`mirror`]: synchronous mirroring to peers, dirty bitmaps, resync, the admin socket.
//! - [`peer`]: the peer protocol (frames, handshake), sans-I/O.
//! - [`config`]: the volume config file (every node's settings in one TOML file).
//! - [`size`]: parsing of human sizes.
//! - [`log`]: the log line format (timestamps).
//! - [`xxh3`]: xxh3-64 with the SIMD width picked at run time.
//! - `testdir`: scratch directories for unit tests.

/// `eprintln!` that never panics: a log line that cannot be written (stderr
/// a closed pipe, a full disk) is dropped. A storage server must not die, or
/// skip its clean shutdown, because `tee` went away. The line is written in
/// one piece, with a timestamp in front when `serve` turned them on
/// ([`log`]).
#[macro_export]
macro_rules! elog {
    ($($arg:tt)*) => {{
        $crate::log::line(format_args!($($arg)*));
    }};
}

pub mod config;
pub mod fuzzing;
pub mod idmap;
pub mod io;
pub mod log;
pub mod mirror;
pub mod peer;
pub mod server;
pub mod sim;
pub mod size;
pub mod store;
#[cfg(test)]
pub mod testdir;
pub mod xxh3;
