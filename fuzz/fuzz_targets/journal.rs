//! Fuzz crash recovery with arbitrary bytes as the journal.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    nbdmirror::fuzzing::recover_journal(data);
});
