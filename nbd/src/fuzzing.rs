//! Harnesses shared by the cargo-fuzz targets (`nbd/fuzz/`) and the smoke
//! tests that run them on random input in every test run. They feed untrusted
//! bytes to the parsers and check the invariants that must hold for any input.

use crate::consts::*;
use crate::handshake::{ExportInfo, Handshake, HandshakeStatus};
use crate::transmission::{Decoded, RequestRules, REQUEST_HEADER_LEN};

fn export() -> ExportInfo {
    ExportInfo {
        name: "disk".into(),
        description: "fuzz".into(),
        size: 1 << 20,
        flags: TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_SEND_DF,
        min_block: 1,
        preferred_block: 4096,
        max_block: 1 << 16,
    }
}

/// Drive a server session with `data` as everything the client sends. The
/// first byte picks how the input is split into reads.
pub fn session(data: &[u8]) {
    let Some((&split, data)) = data.split_first() else {
        return;
    };
    let step = (split as usize % 61) + 1;
    let mut h = Handshake::new(vec![export()]);
    let mut out = Vec::new();
    let mut buf: Vec<u8> = Vec::new();
    let mut fed = 0;
    let mut rules: Option<RequestRules> = None;
    while fed < data.len() {
        let end = (fed + step).min(data.len());
        buf.extend_from_slice(&data[fed..end]);
        fed = end;
        let (used, st) = h.feed(&buf, &mut out);
        assert!(used <= buf.len());
        buf.drain(..used);
        match st {
            HandshakeStatus::Continue => continue,
            HandshakeStatus::Done(n) => {
                assert!(n.size == 1 << 20);
                rules = Some(RequestRules::from(&n));
                break;
            }
            HandshakeStatus::End(_) => return,
        }
    }
    let Some(rules) = rules else { return };
    buf.extend_from_slice(&data[fed..]);
    let mut pos = 0;
    loop {
        match rules.decode(&buf[pos..]) {
            Decoded::NeedMore | Decoded::Fatal(_) => return,
            Decoded::Request(r) => {
                assert!(
                    r.offset
                        .checked_add(r.length as u64)
                        .is_some_and(|e| e <= rules.size)
                        || matches!(
                            r.command,
                            crate::Command::Flush | crate::Command::Disconnect
                        )
                );
                pos += REQUEST_HEADER_LEN;
                if r.command == crate::Command::Write {
                    assert!(r.length <= rules.max_payload);
                    pos = (pos + r.length as usize).min(buf.len());
                }
            }
            Decoded::Reject { discard, error, .. } => {
                assert!(error != 0);
                pos = (pos + REQUEST_HEADER_LEN + discard as usize).min(buf.len());
            }
        }
    }
}
