//! Harnesses for the cargo-fuzz targets in `fuzz/` and for the smoke tests
//! that run them on every test run: arbitrary bytes as a superblock, as a
//! metadata file, and as a journal. Recovery must refuse or truncate, never
//! panic, and a recovered store must read its whole disk without panicking.

use crate::io::Io;
use crate::sim::SimIo;
use crate::store::format::{Superblock, CHECKSUM_TABLE_OFFSET, FORMAT_VERSION, MIN_JOURNAL};
use crate::store::{self, Files, Store, StoreEvent, Tuning};

/// Disk size used by the recovery harnesses.
pub const DISK: u64 = 64 * 1024;

pub fn superblock_for(size: u64, journal: u64) -> Superblock {
    Superblock {
        version: FORMAT_VERSION,
        block_size: 4096,
        volume_uuid: [1; 16],
        node_id: 1,
        size,
        journal_size: journal,
        write_counter: 0,
        tail_pos: 0,
        tail_seq: 1,
        epoch: 1,
    }
}

/// A fresh replica in `sim`: zeroed data, zeroed journal, meta with a superblock.
pub fn new_replica(sim: &mut SimIo, size: u64, journal: u64) -> Files {
    let sb = superblock_for(size, journal);
    let mut meta = sb.encode();
    meta.resize((CHECKSUM_TABLE_OFFSET + size / 4096 * 8) as usize, 0);
    let data = sim.add_file(vec![0; size as usize]);
    let journal = sim.add_file(vec![0; journal as usize]);
    let meta = sim.add_file(meta);
    Files {
        data,
        journal,
        meta,
    }
}

/// Arbitrary bytes as a superblock slot.
pub fn superblock(data: &[u8]) {
    if let Ok(sb) = Superblock::decode(data) {
        assert_eq!(Superblock::decode(&sb.encode()).unwrap(), sb);
    }
}

/// Open a replica whose journal starts with `journal_bytes` and read it all.
/// The superblock expects epoch 2: the epoch a new replica writes records
/// with after its first open, so journals made by a real store replay.
pub fn recover_journal(journal_bytes: &[u8]) {
    let mut sim = SimIo::new(1);
    let files = new_replica(&mut sim, DISK, MIN_JOURNAL);
    {
        let mut sb = superblock_for(DISK, MIN_JOURNAL);
        sb.epoch = 2;
        let m = sim.files.get_mut(&files.meta).unwrap();
        m.live[..4096].copy_from_slice(&sb.encode());
        m.durable = m.live.clone();
    }
    {
        let j = sim.files.get_mut(&files.journal).unwrap();
        let n = journal_bytes.len().min(j.live.len());
        j.live[..n].copy_from_slice(&journal_bytes[..n]);
        j.durable = j.live.clone();
    }
    open_and_read(&mut sim, files);
}

/// Arbitrary bytes as the metadata file (superblocks and checksum table).
pub fn recover_meta(meta_bytes: &[u8]) {
    let mut sim = SimIo::new(1);
    let files = new_replica(&mut sim, DISK, MIN_JOURNAL);
    {
        let m = sim.files.get_mut(&files.meta).unwrap();
        let n = meta_bytes.len().min(m.live.len());
        m.live[..n].copy_from_slice(&meta_bytes[..n]);
        m.durable = m.live.clone();
    }
    open_and_read(&mut sim, files);
}

/// Recover and read the whole disk; returns false if recovery refused.
pub fn open_and_read(sim: &mut SimIo, files: Files) -> bool {
    let Ok(sb) = store::load_superblock(sim, files.meta) else {
        return false;
    };
    // A superblock that decodes may still describe files we do not have.
    if sb.size != DISK || sb.journal_size != MIN_JOURNAL {
        return false;
    }
    let Ok(mut st) = Store::open(sim, files, sb, Tuning::default()) else {
        return false;
    };
    st.read(sim, 1, 0, DISK, 0);
    let mut events = Vec::new();
    for _ in 0..1000 {
        let mut cs = Vec::new();
        sim.wait(0, None, &mut cs).unwrap();
        if cs.is_empty() {
            break;
        }
        for c in cs {
            st.complete(sim, c);
        }
    }
    st.drain_events(&mut events);
    assert!(
        events.iter().any(|e| matches!(e, StoreEvent::Read(1, _))),
        "read never completed"
    );
    true
}

/// Arbitrary bytes against the peer protocol (`cargo fuzz run peer_frames`).
/// The first byte picks what they are fed to:
///
/// - 0: a [`FrameDecoder`](crate::peer::FrameDecoder), in chunks; every frame
///   it returns must re-encode to exactly the bytes it consumed, and after an
///   error it must stay poisoned.
/// - 1 / 2: a responder / an initiator handshake, as raw bytes.
/// - 3 / 4: a responder / an initiator, as frames with valid headers and
///   checksums built from the input, so payload decoding and the state
///   machine are reached.
/// - 5: an honest initiator-responder pair with one byte of the initiator's
///   stream flipped; the responder must not establish.
///
/// Never a panic, and never Established with a party that does not hold
/// the secret.
pub fn peer_frames(data: &[u8]) {
    use crate::peer::{Event, FrameDecoder, FrameKind, Handshake, Role};
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let chunk = 1 + rest.first().copied().unwrap_or(0) as usize % 64;
    if mode % 7 == 6 {
        replication_payloads(rest);
        return;
    }
    match mode % 6 {
        0 => {
            let mut d = FrameDecoder::with_max_payload(64 * 1024);
            let mut consumed = 0;
            for piece in rest.chunks(chunk) {
                d.push(piece);
                loop {
                    match d.pull() {
                        Ok(Some(f)) => {
                            let mut again = Vec::new();
                            crate::peer::encode(f.kind, f.seq, f.payload(), &mut again);
                            assert_eq!(again[..], rest[consumed..consumed + again.len()]);
                            consumed += again.len();
                        }
                        Ok(None) => break,
                        Err(e) => {
                            assert_eq!(d.pull(), Err(e.clone()));
                            assert_eq!(d.finish(), Err(e));
                            return;
                        }
                    }
                }
            }
            let _ = d.finish();
        }
        1 | 2 => {
            let role = if mode % 6 == 1 {
                Role::Responder
            } else {
                Role::Initiator
            };
            let mut h = Handshake::new(role, peer_config(2, 0x22)).unwrap();
            for piece in rest.chunks(chunk) {
                h.receive(piece);
            }
            h.eof();
            assert_not_established(&mut h);
        }
        3 | 4 => {
            let role = if mode % 6 == 3 {
                Role::Responder
            } else {
                Role::Initiator
            };
            let mut h = Handshake::new(role, peer_config(2, 0x22)).unwrap();
            let mut input = rest;
            let mut seq = 0u64;
            while let [k, l, tail @ ..] = input {
                let kind = FrameKind::ALL[*k as usize % FrameKind::ALL.len()];
                let len = (*l as usize).min(tail.len());
                let mut frame = Vec::new();
                // Mostly in sequence; sometimes not.
                let s = if *k >= 0xf0 { seq + 1 } else { seq };
                crate::peer::encode(kind, s, &tail[..len], &mut frame);
                h.receive(&frame);
                seq += 1;
                input = &tail[len..];
            }
            h.eof();
            assert_not_established(&mut h);
        }
        _ => {
            let [a, b, c, x, ..] = *rest else { return };
            let pos = u16::from_le_bytes([a, b]) as usize;
            let xor = c | 1;
            let mut i = Handshake::new(Role::Initiator, peer_config(1, 0x11)).unwrap();
            let mut r = Handshake::new(Role::Responder, peer_config(2, 0x22)).unwrap();
            let mut sent = 0usize;
            for _ in 0..4 {
                while let Some(e) = i.poll_event() {
                    if let Event::Send(mut bytes) = e {
                        if (sent..sent + bytes.len()).contains(&pos) {
                            bytes[pos - sent] ^= xor;
                        }
                        sent += bytes.len();
                        for piece in bytes.chunks(1 + x as usize % 40) {
                            r.receive(piece);
                        }
                    }
                }
                while let Some(e) = r.poll_event() {
                    if let Event::Send(bytes) = e {
                        i.receive(&bytes);
                    }
                }
            }
            if pos < sent {
                assert_not_established(&mut r);
            }
        }
    }
}

/// The replication payload decoders (Record, Ack/FlushAck, Flush/Ping,
/// SumsRequest, Sums) on arbitrary bytes: refuse or decode, and what decodes
/// re-encodes to the same bytes.
pub fn replication_payloads(p: &[u8]) {
    use crate::mirror::wire;
    let disk = 1 << 30;
    if let Ok(h) = wire::RecordHeader::decode(p, disk) {
        assert_eq!(h.encode()[..], p[..wire::RECORD_HEADER]);
        assert!(h.offset + h.length as u64 <= disk);
        if h.kind == wire::KIND_WRITE {
            assert_eq!(p.len() - wire::RECORD_HEADER, h.length as usize);
        }
    }
    if let Ok((id, e)) = wire::decode_answer(p) {
        assert_eq!(wire::encode_answer(id, e)[..], p[..]);
    }
    let _ = wire::decode_u64(p, "fuzz");
    if let Ok((id, first, n)) = wire::decode_sums_request(p, disk / 4096) {
        assert_eq!(wire::encode_sums_request(id, first, n)[..], p[..]);
    }
    if let Ok((id, first, sums)) = wire::decode_sums(p) {
        assert_eq!(wire::encode_sums(id, first, &sums)[..], p[..]);
    }
    if let Ok(r) = wire::decode_summed(p, disk) {
        assert_eq!(r.header.encode()[..], p[..wire::RECORD_HEADER]);
        assert!(wire::summable(r.header.offset, r.header.length as u64));
        assert!(r.header.offset + r.header.length as u64 <= disk);
        assert_eq!(
            r.sums.len() as u64 * wire::SUMMED_BLOCK,
            r.header.length as u64
        );
        assert_eq!(p.len(), r.data_at + r.header.length as usize);
        assert_eq!(
            wire::encode_block_sums(&r.sums)[..],
            p[wire::RECORD_HEADER..r.data_at]
        );
        let ok = wire::verify_block_sums(&r, p).is_ok();
        assert_eq!(
            ok,
            crate::store::checksum::checksums_of(r.header.offset / 4096, &p[r.data_at..]) == r.sums
        );
    }
}

/// The handshake configuration the peer fuzz harness and smoke test use.
pub fn peer_config(node_id: u32, nonce: u8) -> crate::peer::Config {
    crate::peer::Config {
        secret: b"fuzzing secret, 32 bytes long!!!".to_vec(),
        volume_uuid: [0x5a; 16],
        node_id,
        expected_peer: None,
        generations: crate::peer::GenerationIds::default(),
        last_applied_seq: 0,
        nonce: [nonce; 32],
    }
}

fn assert_not_established(h: &mut crate::peer::Handshake) {
    while let Some(e) = h.poll_event() {
        assert!(
            !matches!(e, crate::peer::Event::Established(_)),
            "established with a peer that does not hold the secret"
        );
    }
    assert!(!h.is_established());
}
