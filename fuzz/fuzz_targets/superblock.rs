//! Fuzz the superblock decoder and recovery with arbitrary metadata bytes.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbdmirror::fuzzing::superblock(data);
    nbdmirror::fuzzing::recover_meta(data);
});
