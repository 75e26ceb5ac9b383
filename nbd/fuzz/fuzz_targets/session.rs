//! Fuzz the handshake and the request decoder with arbitrary client bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbd::fuzzing::session(data);
});
