//! Fuzz the peer frame decoder and both ends of the peer handshake with
//! arbitrary bytes (see `nbdmirror::fuzzing::peer_frames`).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbdmirror::fuzzing::peer_frames(data);
});
