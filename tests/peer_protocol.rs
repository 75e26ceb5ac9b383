//! The peer protocol, end to end in memory: frames, the handshake between two
//! state machines with bytes shuttled between them, every way it must refuse,
//! and a smoke run of the fuzz harness (`cargo fuzz run peer_frames` in fuzz/
//! is the real fuzzing).

use nbdmirror::fuzzing::{peer_config, peer_frames};
use nbdmirror::peer::frame::{
    encode, FrameDecoder, FrameError, FrameKind, HEADER_LEN, MAX_PAYLOAD,
};
use nbdmirror::peer::handshake::HANDSHAKE_MAX_PAYLOAD;
use nbdmirror::peer::messages::{Hello, Reject, PROTOCOL_VERSION};
use nbdmirror::peer::{Config, Event, Handshake, HandshakeError, RejectCode, Role};
use nbdmirror::sim::Rng;
use proptest::prelude::*;

fn cfg(node: u32, nonce: u8) -> Config {
    let mut c = peer_config(node, nonce);
    c.generations.current = 0x1000 + node as u64;
    c.last_applied_seq = 42 * node as u64;
    c
}

/// What one side did during a run.
#[derive(Default, Debug)]
struct Side {
    wire: Vec<u8>,
    events: Vec<Event>,
}

impl Side {
    fn kinds(&self) -> Vec<FrameKind> {
        let mut d = FrameDecoder::new();
        d.push(&self.wire);
        let mut k = Vec::new();
        while let Some(f) = d.pull().unwrap() {
            k.push(f.kind);
        }
        k
    }

    fn rejected(&self) -> Option<(&HandshakeError, bool)> {
        self.events.iter().find_map(|e| match e {
            Event::Rejected { reason, by_peer } => Some((reason, *by_peer)),
            _ => None,
        })
    }

    fn established(&self) -> bool {
        self.events
            .iter()
            .any(|e| matches!(e, Event::Established(_)))
    }
}

/// Move everything one side wants to send to the other, `chunk` bytes at a
/// time, until neither has anything more to say.
fn drain(h: &mut Handshake, side: &mut Side) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(e) = h.poll_event() {
        match e {
            Event::Send(b) => out.extend(b),
            e => side.events.push(e),
        }
    }
    side.wire.extend_from_slice(&out);
    out
}

fn run(i: &mut Handshake, r: &mut Handshake, chunk: usize) -> (Side, Side) {
    let (mut si, mut sr) = (Side::default(), Side::default());
    loop {
        let to_r = drain(i, &mut si);
        for c in to_r.chunks(chunk) {
            r.receive(c);
        }
        let to_i = drain(r, &mut sr);
        for c in to_i.chunks(chunk) {
            i.receive(c);
        }
        if to_r.is_empty() && to_i.is_empty() {
            drain(i, &mut si);
            drain(r, &mut sr);
            return (si, sr);
        }
    }
}

fn pair(ci: Config, cr: Config) -> (Handshake, Handshake) {
    (
        Handshake::new(Role::Initiator, ci).unwrap(),
        Handshake::new(Role::Responder, cr).unwrap(),
    )
}

fn frame(kind: FrameKind, seq: u64, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    encode(kind, seq, payload, &mut v);
    v
}

/// Both sides rejected, neither established, and the logged reasons.
fn both_rejected(si: &Side, sr: &Side) -> ((HandshakeError, bool), (HandshakeError, bool)) {
    assert!(!si.established() && !sr.established(), "{si:?} {sr:?}");
    let ri = si.rejected().expect("initiator rejected");
    let rr = sr.rejected().expect("responder rejected");
    // The reasons are what the caller logs: they must say something.
    assert!(ri.0.to_string().len() > 20 && rr.0.to_string().len() > 20);
    ((ri.0.clone(), ri.1), (rr.0.clone(), rr.1))
}

#[test]
fn handshake_succeeds_whole_and_byte_at_a_time() {
    for chunk in [usize::MAX, 1, 7] {
        let (mut i, mut r) = pair(cfg(1, 1), cfg(2, 2));
        let (si, sr) = run(&mut i, &mut r, chunk);
        assert_eq!(
            si.kinds(),
            [FrameKind::Hello, FrameKind::Auth, FrameKind::Ready]
        );
        assert_eq!(
            sr.kinds(),
            [FrameKind::Hello, FrameKind::Auth, FrameKind::Ready]
        );
        let [Event::Established(pi)] = si.events[..] else {
            panic!("{si:?}")
        };
        let [Event::Established(pr)] = sr.events[..] else {
            panic!("{sr:?}")
        };
        assert_eq!(
            (pi.node_id, pi.last_applied_seq, pi.generations.current),
            (2, 84, 0x1002)
        );
        assert_eq!(
            (pr.node_id, pr.last_applied_seq, pr.generations.current),
            (1, 42, 0x1001)
        );
        assert!(i.is_established() && r.is_established());
    }
}

#[test]
fn expected_node_ids_that_match_are_accepted() {
    let mut ci = cfg(1, 1);
    ci.expected_peer = Some(2);
    let mut cr = cfg(2, 2);
    cr.expected_peer = Some(1);
    let (mut i, mut r) = pair(ci, cr);
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    assert!(si.established() && sr.established());
}

#[test]
fn session_carries_on_with_frames_pipelined_behind_the_handshake() {
    let (mut i, mut r) = pair(cfg(1, 1), cfg(2, 2));
    // Initiator: Hello -> responder; responder: Hello -> initiator.
    let mut si = Side::default();
    let mut sr = Side::default();
    r.receive(&drain(&mut i, &mut si));
    i.receive(&drain(&mut r, &mut sr));
    r.receive(&drain(&mut i, &mut si)); // Auth
    i.receive(&drain(&mut r, &mut sr)); // Auth + Ready
    let ready = drain(&mut i, &mut si);
    assert!(i.is_established());
    let mut s_i = i.into_session().unwrap();
    // The primary sends a big record right behind its Ready, in one write.
    let record = vec![0xee; 4 << 20];
    let mut wire = ready;
    s_i.encode(FrameKind::Record, &record, &mut wire);
    r.receive(&wire);
    drain(&mut r, &mut sr);
    assert!(r.is_established(), "{sr:?}");
    let mut s_r = r.into_session().unwrap();
    let f = s_r.decoder.pull().unwrap().unwrap();
    assert_eq!(
        (f.kind, f.seq, f.payload().len()),
        (FrameKind::Record, 3, 4 << 20)
    );
    // And the other way.
    let mut back = Vec::new();
    s_r.encode(FrameKind::Ack, b"ack", &mut back);
    s_r.reject(RejectCode::SplitBrain, "both sides wrote", &mut back);
    s_i.decoder.push(&back);
    assert_eq!(s_i.decoder.pull().unwrap().unwrap().kind, FrameKind::Ack);
    let f = s_i.decoder.pull().unwrap().unwrap();
    let rej = Reject::decode(f.payload()).unwrap();
    assert_eq!(rej.code, RejectCode::SplitBrain);
}

#[test]
fn wrong_secret_on_either_side_is_rejected_by_both() {
    for wrong_side in [Role::Initiator, Role::Responder] {
        let (mut ci, mut cr) = (cfg(1, 1), cfg(2, 2));
        let c = if wrong_side == Role::Initiator {
            &mut ci
        } else {
            &mut cr
        };
        c.secret = b"a different secret of some length".to_vec();
        let (mut i, mut r) = pair(ci, cr);
        let (si, sr) = run(&mut i, &mut r, usize::MAX);
        let ((ei, by_i), (er, by_r)) = both_rejected(&si, &sr);
        assert_eq!((er, by_r), (HandshakeError::BadSecret, false));
        assert!(by_i);
        let HandshakeError::PeerRejected(rej) = &ei else {
            panic!("{ei}")
        };
        assert_eq!(rej.code, RejectCode::BadSecret);
        assert!(ei.to_string().contains("authentication failed"), "{ei}");
        // The responder revealed nothing but its Hello before refusing: no
        // Auth, no volume uuid, no node id.
        assert_eq!(sr.kinds(), [FrameKind::Hello, FrameKind::Reject]);
        assert!(!sr.wire.windows(16).any(|w| w == [0x5a; 16]));
    }
}

#[test]
fn wrong_volume_is_rejected_by_both_after_authentication() {
    let mut cr = cfg(2, 2);
    cr.volume_uuid = [0x77; 16];
    let (mut i, mut r) = pair(cfg(1, 1), cr);
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    let ((ei, by_i), (er, by_r)) = both_rejected(&si, &sr);
    assert!(
        matches!(er, HandshakeError::WrongVolume { .. }) && !by_r,
        "{er}"
    );
    // The initiator sees the responder's authenticated identity first and
    // reaches the same verdict itself.
    assert!(
        matches!(ei, HandshakeError::WrongVolume { .. }) && !by_i,
        "{ei}"
    );
    assert!(er.to_string().contains("77777777-7777"), "{er}");
    assert_eq!(
        sr.kinds(),
        [FrameKind::Hello, FrameKind::Auth, FrameKind::Reject]
    );
    assert_eq!(
        si.kinds(),
        [FrameKind::Hello, FrameKind::Auth, FrameKind::Reject]
    );
}

#[test]
fn unexpected_node_ids_are_rejected() {
    // The responder expects node 9 at the other end.
    let mut cr = cfg(2, 2);
    cr.expected_peer = Some(9);
    let (mut i, mut r) = pair(cfg(1, 1), cr);
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    let ((ei, by_i), (er, _)) = both_rejected(&si, &sr);
    assert_eq!(
        er,
        HandshakeError::UnexpectedNode {
            expected: 9,
            found: 1
        }
    );
    assert!(by_i);
    assert!(matches!(ei, HandshakeError::PeerRejected(ref r) if r.code == RejectCode::WrongNode));

    // The initiator expects node 9.
    let mut ci = cfg(1, 1);
    ci.expected_peer = Some(9);
    let (mut i, mut r) = pair(ci, cfg(2, 2));
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    let ((ei, by_i), (er, by_r)) = both_rejected(&si, &sr);
    assert_eq!(
        (ei, by_i),
        (
            HandshakeError::UnexpectedNode {
                expected: 9,
                found: 2
            },
            false
        )
    );
    assert!(
        by_r && matches!(er, HandshakeError::PeerRejected(ref r) if r.code == RejectCode::WrongNode)
    );

    // Both configured with the same node id.
    let (mut i, mut r) = pair(cfg(3, 1), cfg(3, 2));
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    let (_, (er, _)) = both_rejected(&si, &sr);
    assert_eq!(er, HandshakeError::SameNodeId { node_id: 3 });

    // A peer claiming node id 0, which no node has (a secondary took one).
    let (mut i, mut r) = pair(cfg(0, 1), cfg(2, 2));
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    let ((ei, _), (er, _)) = both_rejected(&si, &sr);
    assert_eq!(er, HandshakeError::ZeroNodeId);
    assert!(matches!(ei, HandshakeError::PeerRejected(ref r) if r.code == RejectCode::WrongNode));
}

/// Feed `bytes` to a fresh `role` handshake; return its reason and what it sent.
fn refuse(role: Role, bytes: &[u8]) -> (HandshakeError, Vec<FrameKind>, Option<Reject>) {
    let mut h = Handshake::new(role, cfg(2, 2)).unwrap();
    h.receive(bytes);
    let mut side = Side::default();
    drain(&mut h, &mut side);
    assert!(!side.established());
    let (reason, by_peer) = side
        .rejected()
        .unwrap_or_else(|| panic!("not rejected: {side:?}"));
    assert!(!by_peer);
    let mut d = FrameDecoder::new();
    d.push(&side.wire);
    let mut kinds = Vec::new();
    let mut rej = None;
    while let Some(f) = d.pull().unwrap() {
        kinds.push(f.kind);
        if f.kind == FrameKind::Reject {
            rej = Some(Reject::decode(f.payload()).unwrap());
        }
    }
    (reason.clone(), kinds, rej)
}

#[test]
fn version_mismatch_is_rejected() {
    // A Hello offering version 0.
    let hello = Hello {
        version: 0,
        role: Role::Initiator,
        nonce: [9; 32],
    }
    .encode();
    let (e, kinds, rej) = refuse(Role::Responder, &frame(FrameKind::Hello, 0, &hello));
    assert_eq!(
        e,
        HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: 0
        }
    );
    assert_eq!(kinds, [FrameKind::Reject]);
    assert_eq!(rej.unwrap().code, RejectCode::VersionMismatch);

    // A frame layout from the future.
    let mut f = frame(FrameKind::Hello, 0, &hello);
    f[4] = 2;
    let (e, _, rej) = refuse(Role::Responder, &f);
    assert_eq!(
        e,
        HandshakeError::Frame(FrameError::UnsupportedVersion { found: 2 })
    );
    assert_eq!(rej.unwrap().code, RejectCode::VersionMismatch);

    // A responder answering with a version the initiator did not offer.
    let hello_r = Hello {
        version: PROTOCOL_VERSION + 1,
        role: Role::Responder,
        nonce: [9; 32],
    }
    .encode();
    let (e, kinds, _) = refuse(Role::Initiator, &frame(FrameKind::Hello, 0, &hello_r));
    assert_eq!(
        e,
        HandshakeError::VersionMismatch {
            ours: PROTOCOL_VERSION,
            theirs: PROTOCOL_VERSION + 1
        }
    );
    assert_eq!(kinds, [FrameKind::Hello, FrameKind::Reject]);

    // A newer initiator offering a later version is answered with ours.
    let mut r = Handshake::new(Role::Responder, cfg(2, 2)).unwrap();
    let hello7 = Hello {
        version: PROTOCOL_VERSION + 1,
        role: Role::Initiator,
        nonce: [9; 32],
    }
    .encode();
    r.receive(&frame(FrameKind::Hello, 0, &hello7));
    let Some(Event::Send(b)) = r.poll_event() else {
        panic!()
    };
    assert_eq!(
        Hello::decode(&b[HEADER_LEN..]).unwrap().version,
        PROTOCOL_VERSION
    );
}

#[test]
fn garbage_on_the_peer_port_is_refused_with_bad_magic() {
    let http = b"GET / HTTP/1.1\r\nHost: node2:7000\r\n\r\n".to_vec();
    // An NBD client's first bytes: client flags, then IHAVEOPT.
    let mut nbd_client = vec![0, 0, 0, 3];
    nbd_client.extend_from_slice(b"IHAVEOPT\0\0\0\x07\0\0\0\0");
    let tls = vec![0x16, 0x03, 0x01, 0x00, 0xa5, 0x01];
    let mut rng = Rng::new(7);
    let mut cases = vec![(http, "HTTP"), (nbd_client, "NBD client"), (tls, "TLS")];
    for _ in 0..50 {
        let n = 1 + rng.below(300) as usize;
        let mut random: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
        if random[0] == b'N' {
            random[0] = 0;
        }
        cases.push((random, ""));
    }
    for (bytes, hint) in cases {
        for chunk in [bytes.len(), 1] {
            let mut h = Handshake::new(Role::Responder, cfg(2, 2)).unwrap();
            for c in bytes.chunks(chunk) {
                h.receive(c);
            }
            let mut side = Side::default();
            drain(&mut h, &mut side);
            let (reason, _) = side.rejected().expect("rejected");
            let msg = reason.to_string();
            assert!(matches!(
                reason,
                HandshakeError::Frame(FrameError::BadMagic { .. })
            ));
            assert!(msg.contains("is it an nbdmirror peer?"), "{msg}");
            // Refused from the first differing byte; with more bytes at hand
            // the message also guesses what is talking.
            if chunk == bytes.len() {
                assert!(msg.contains(hint), "{msg}");
            }
            assert_eq!(side.kinds(), [FrameKind::Reject]);
        }
    }
    // An initiator pointed at an NBD server's port.
    let (e, _, _) = refuse(Role::Initiator, b"NBDMAGICIHAVEOPT\0\x03");
    assert!(e.to_string().contains("NBD port"), "{e}");
}

#[test]
fn protocol_violations_are_malformed() {
    let hello_i = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Initiator,
        nonce: [9; 32],
    }
    .encode();
    let cases: Vec<(Vec<u8>, &str)> = vec![
        // Auth before Hello.
        (
            frame(FrameKind::Auth, 0, &[0; 96]),
            "waiting for the peer's Hello",
        ),
        // A data frame during the handshake.
        (
            frame(FrameKind::Record, 0, b"data"),
            "waiting for the peer's Hello",
        ),
        // A Hello of the wrong size.
        (
            frame(FrameKind::Hello, 0, &hello_i[..30]),
            "payload of 30 bytes",
        ),
        // A responder's Hello sent to a responder.
        (
            frame(
                FrameKind::Hello,
                0,
                &Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::Responder,
                    nonce: [9; 32],
                }
                .encode(),
            ),
            "also claims to be the responder",
        ),
        // Our own Hello reflected back (same nonce).
        (
            frame(
                FrameKind::Hello,
                0,
                &Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::Initiator,
                    nonce: [2; 32],
                }
                .encode(),
            ),
            "our own nonce",
        ),
        // A Hello whose nonce was never filled in.
        (
            frame(
                FrameKind::Hello,
                0,
                &Hello {
                    version: PROTOCOL_VERSION,
                    role: Role::Initiator,
                    nonce: [0; 32],
                }
                .encode(),
            ),
            "all-zero nonce",
        ),
        // Two Hellos.
        (
            [
                frame(FrameKind::Hello, 0, &hello_i),
                frame(FrameKind::Hello, 1, &hello_i),
            ]
            .concat(),
            "waiting for the peer's Auth",
        ),
        // Out of sequence.
        (frame(FrameKind::Hello, 5, &hello_i), "frame number 5"),
    ];
    for (bytes, expect) in cases {
        let (e, kinds, rej) = refuse(Role::Responder, &bytes);
        assert!(e.to_string().contains(expect), "{e} / {expect}");
        assert_eq!(kinds.last(), Some(&FrameKind::Reject));
        assert_eq!(rej.unwrap().code, RejectCode::Malformed);
    }
}

#[test]
fn truncated_frames_wait_then_eof_ends_the_handshake() {
    let hello_i = Hello {
        version: PROTOCOL_VERSION,
        role: Role::Initiator,
        nonce: [9; 32],
    }
    .encode();
    let f = frame(FrameKind::Hello, 0, &hello_i);
    for cut in [0, 1, 10, HEADER_LEN, f.len() - 1] {
        let mut r = Handshake::new(Role::Responder, cfg(2, 2)).unwrap();
        r.receive(&f[..cut]);
        assert_eq!(r.poll_event(), None, "cut at {cut}");
        r.eof();
        let Some(Event::Rejected {
            reason,
            by_peer: false,
        }) = r.poll_event()
        else {
            panic!()
        };
        let HandshakeError::Closed {
            waiting_for,
            truncated,
        } = &reason
        else {
            panic!("{reason}")
        };
        assert_eq!(*waiting_for, "the peer's Hello");
        assert_eq!(truncated.is_some(), cut > 0, "{reason}");
        assert_eq!(r.poll_event(), None);
    }
}

#[test]
fn oversized_frames_are_refused_from_the_header_alone() {
    let mut f = frame(FrameKind::Record, 0, b"");
    f[20..24].copy_from_slice(&(MAX_PAYLOAD as u32 + 1).to_le_bytes());
    let mut d = FrameDecoder::new();
    d.push(&f);
    assert_eq!(
        d.pull(),
        Err(FrameError::TooLarge {
            len: MAX_PAYLOAD as u64 + 1,
            max: MAX_PAYLOAD
        })
    );
    // u32::MAX too.
    f[20..24].copy_from_slice(&u32::MAX.to_le_bytes());
    let mut d = FrameDecoder::new();
    d.push(&f);
    assert!(matches!(d.pull(), Err(FrameError::TooLarge { .. })));
    // Exactly MAX_PAYLOAD is fine, and buffered only as it arrives.
    f[20..24].copy_from_slice(&(MAX_PAYLOAD as u32).to_le_bytes());
    let mut d = FrameDecoder::new();
    d.push(&f);
    assert_eq!(d.pull(), Ok(None));
    // Before authentication a handshake accepts only small frames.
    let mut f = frame(FrameKind::Hello, 0, b"");
    f[20..24].copy_from_slice(&(1u32 << 20).to_le_bytes());
    let (e, _, _) = refuse(Role::Responder, &f);
    assert_eq!(
        e,
        HandshakeError::Frame(FrameError::TooLarge {
            len: 1 << 20,
            max: HANDSHAKE_MAX_PAYLOAD
        })
    );
}

#[test]
fn any_flipped_bit_is_detected() {
    let payload: Vec<u8> = (0..40u8).collect();
    let good = frame(FrameKind::Record, 0, &payload);
    for bit in 0..good.len() * 8 {
        let mut f = good.clone();
        f[bit / 8] ^= 1 << (bit % 8);
        let mut d = FrameDecoder::with_max_payload(4096);
        d.push(&f);
        // A longer length waits for more bytes: give them.
        d.push(&[0; 4096 + HEADER_LEN]);
        let e = d.pull().expect_err("corruption went unnoticed");
        match bit / 8 {
            0..=3 => assert!(matches!(e, FrameError::BadMagic { .. }), "{bit}: {e}"),
            4..=5 => assert!(
                matches!(e, FrameError::UnsupportedVersion { .. }),
                "{bit}: {e}"
            ),
            20..=23 => assert!(
                matches!(
                    e,
                    FrameError::ChecksumMismatch { .. } | FrameError::TooLarge { .. }
                ),
                "{bit}: {e}"
            ),
            _ => assert!(
                matches!(e, FrameError::ChecksumMismatch { .. }),
                "{bit}: {e}"
            ),
        }
    }
}

#[test]
fn replayed_auth_fails_in_a_new_session() {
    // Record a good session.
    let (mut i, mut r) = pair(cfg(1, 1), cfg(2, 2));
    let (si, sr) = run(&mut i, &mut r, usize::MAX);
    assert!(si.established() && sr.established());

    // An attacker without the secret replays the initiator's whole stream
    // (Hello with the old nonce, Auth, Ready) to a responder whose nonce is new.
    let mut r2 = Handshake::new(Role::Responder, cfg(2, 3)).unwrap();
    r2.receive(&si.wire);
    let mut s = Side::default();
    drain(&mut r2, &mut s);
    assert!(!s.established());
    assert_eq!(s.rejected(), Some((&HandshakeError::BadSecret, false)));
    assert_eq!(s.kinds(), [FrameKind::Hello, FrameKind::Reject]);

    // And the responder's stream replayed to an initiator with a new nonce.
    let mut i2 = Handshake::new(Role::Initiator, cfg(1, 4)).unwrap();
    i2.receive(&sr.wire);
    let mut s = Side::default();
    drain(&mut i2, &mut s);
    assert!(!s.established());
    assert_eq!(s.rejected(), Some((&HandshakeError::BadSecret, false)));

    // Reflection: the responder's own Auth MAC cannot pass as an initiator's
    // (the role byte differs), even within one session.
    let mut r3 = Handshake::new(Role::Responder, cfg(2, 2)).unwrap();
    let mut wire_i = Vec::new();
    let mut i3 = Handshake::new(Role::Initiator, cfg(1, 1)).unwrap();
    let mut s3 = Side::default();
    r3.receive(&drain(&mut i3, &mut s3));
    let mut sr3 = Side::default();
    let hello_r = drain(&mut r3, &mut sr3);
    i3.receive(&hello_r);
    wire_i.extend(drain(&mut i3, &mut s3)); // genuine Auth_i, not delivered
                                            // Forge: the recorded session's responder Auth, renumbered, as Auth_i.
    let mut d = FrameDecoder::new();
    d.push(&sr.wire);
    let _ = d.pull().unwrap();
    let auth_r = d.pull().unwrap().unwrap();
    r3.receive(&frame(FrameKind::Auth, 1, auth_r.payload()));
    drain(&mut r3, &mut sr3);
    assert_eq!(sr3.rejected(), Some((&HandshakeError::BadSecret, false)));
}

#[test]
fn reject_from_the_peer_is_reported_sanitized() {
    let rej = Reject {
        code: RejectCode::Other(999),
        message: "go away\nnbdmirror: fake log line".into(),
    };
    let mut i = Handshake::new(Role::Initiator, cfg(1, 1)).unwrap();
    i.receive(&frame(FrameKind::Reject, 0, &rej.encode()));
    let mut s = Side::default();
    drain(&mut i, &mut s);
    let (e, by_peer) = s.rejected().unwrap();
    assert!(by_peer);
    let msg = e.to_string();
    assert!(msg.contains("code 999") && !msg.contains('\n'), "{msg}");
    // A Reject is never answered with a Reject.
    assert_eq!(s.kinds(), [FrameKind::Hello]);
}

#[test]
fn fuzz_harness_smoke() {
    let mut rng = Rng::new(0xfeed);
    // A valid initiator stream, to mutate.
    let (mut i, mut r) = pair(peer_config(1, 0x11), peer_config(2, 0x22));
    let (si, _) = run(&mut i, &mut r, usize::MAX);
    for round in 0..3000u64 {
        let mode = (round % 6) as u8;
        let mut data = vec![mode];
        if round % 2 == 0 {
            let n = rng.below(400) as usize;
            data.extend((0..n).map(|_| rng.next_u64() as u8));
        } else {
            data.push(rng.next_u64() as u8);
            let mut s = si.wire.clone();
            for _ in 0..1 + rng.below(3) {
                let at = rng.below(s.len() as u64) as usize;
                s[at] ^= 1 + rng.below(255) as u8;
            }
            let cut = rng.below(s.len() as u64 + 1) as usize;
            data.extend_from_slice(&s[..cut]);
        }
        peer_frames(&data);
    }
    // Every flip position of the honest stream.
    for pos in 0..si.wire.len() as u16 {
        let [a, b] = pos.to_le_bytes();
        peer_frames(&[5, a, b, 0x40, (pos % 40) as u8]);
    }
    // SummedRecords, whole and with a byte changed, as payloads (mode 6)
    // and as frames (mode 0).
    use nbdmirror::mirror::wire;
    for round in 0..200u64 {
        let n = 1 + rng.below(3) as usize;
        let mut data: Vec<u8> = (0..n * 4096).map(|_| rng.next_u64() as u8).collect();
        if round % 5 == 0 {
            data[..4096].fill(0);
        }
        let h = wire::RecordHeader {
            id: round,
            offset: rng.below(1000) * 4096,
            length: data.len() as u32,
            kind: wire::KIND_WRITE,
            flags: 0,
        };
        let mut p = h.encode().to_vec();
        p.extend_from_slice(&wire::encode_block_sums(
            &nbdmirror::store::checksum::checksums_of(h.offset / 4096, &data),
        ));
        p.extend_from_slice(&data);
        if round % 2 == 1 {
            let at = rng.below(p.len() as u64) as usize;
            p[at] ^= 1 + rng.below(255) as u8;
        }
        let mut m = vec![6u8];
        m.extend_from_slice(&p);
        peer_frames(&m);
        let mut f = vec![0u8];
        nbdmirror::peer::encode(FrameKind::SummedRecord, 0, &p, &mut f);
        peer_frames(&f);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn frames_round_trip_split_anywhere(
        frames in prop::collection::vec(
            (0..FrameKind::ALL.len(), prop::collection::vec(any::<u8>(), 0..3000)),
            0..12,
        ),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..20),
    ) {
        let mut wire = Vec::new();
        for (seq, (k, p)) in frames.iter().enumerate() {
            encode(FrameKind::ALL[*k], seq as u64, p, &mut wire);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(wire.len() + 1)).collect();
        cuts.push(wire.len());
        cuts.sort_unstable();
        let mut d = FrameDecoder::new();
        let mut got = Vec::new();
        let mut at = 0;
        for c in cuts {
            d.push(&wire[at..c]);
            at = c;
            while let Some(f) = d.pull().unwrap() {
                got.push(f);
            }
        }
        d.finish().unwrap();
        prop_assert_eq!(got.len(), frames.len());
        for (seq, (f, (k, p))) in got.iter().zip(&frames).enumerate() {
            prop_assert_eq!(f.kind, FrameKind::ALL[*k]);
            prop_assert_eq!(f.seq, seq as u64);
            prop_assert_eq!(f.payload(), p);
        }
    }
}

/// A node of the previous protocol version (2) and one of this version
/// agree on version 2 either way round (a volume is upgraded a node at a
/// time); a version-3 pair runs at 3. The session's version is what the
/// mirror checks before asking a peer for blocks (read repair is v3).
#[test]
fn mixed_versions_agree_on_the_lower_one() {
    use nbdmirror::peer::messages::MIN_PROTOCOL_VERSION;
    for (vi, vr, want) in [
        (PROTOCOL_VERSION, PROTOCOL_VERSION, PROTOCOL_VERSION),
        (MIN_PROTOCOL_VERSION, PROTOCOL_VERSION, MIN_PROTOCOL_VERSION),
        (PROTOCOL_VERSION, MIN_PROTOCOL_VERSION, MIN_PROTOCOL_VERSION),
    ] {
        let mut i = Handshake::with_version(Role::Initiator, cfg(1, 1), vi).unwrap();
        let mut r = Handshake::with_version(Role::Responder, cfg(2, 2), vr).unwrap();
        let (si, sr) = run(&mut i, &mut r, 4096);
        let vi_got = si.events.iter().find_map(|e| match e {
            Event::Established(p) => Some(p.version),
            _ => None,
        });
        let vr_got = sr.events.iter().find_map(|e| match e {
            Event::Established(p) => Some(p.version),
            _ => None,
        });
        assert_eq!(
            (vi_got, vr_got),
            (Some(want), Some(want)),
            "{vi} with {vr}: {:?} {:?}",
            si.events,
            sr.events
        );
    }
    // Below the oldest version this build speaks: refused.
    assert!(Handshake::with_version(Role::Initiator, cfg(1, 1), MIN_PROTOCOL_VERSION - 1).is_err());
}
