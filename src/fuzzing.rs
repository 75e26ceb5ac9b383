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
