//! Runs the recovery fuzz harnesses on damaged real journals and metadata:
//! recovery must refuse or truncate, never panic (the real fuzzing is
//! `cargo fuzz run journal|superblock` in fuzz/).

use nbdmirror::fuzzing::{self, new_replica, DISK};
use nbdmirror::io::Io;
use nbdmirror::sim::{Rng, SimIo};
use nbdmirror::store::format::MIN_JOURNAL;
use nbdmirror::store::{load_superblock, Store, Tuning};

/// A journal and meta image holding real records of random writes.
fn written_images(seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut sim = SimIo::new(seed);
    let files = new_replica(&mut sim, DISK, MIN_JOURNAL);
    let sb = load_superblock(&mut sim, files.meta).unwrap();
    let tuning = Tuning {
        sync_interval: std::time::Duration::from_secs(3600),
        checkpoint_interval: std::time::Duration::from_secs(3600),
        ..Tuning::default()
    };
    let mut st = Store::open(&mut sim, files, sb, tuning).unwrap();
    let mut rng = Rng::new(seed);
    for i in 0..20u64 {
        let len = 1 + rng.below(9000) as usize;
        let off = rng.below(DISK - len as u64);
        let mut buf = vec![0u8; 64 + len];
        buf[64..].fill(i as u8 + 1);
        if rng.below(4) == 0 {
            st.write_zeroes(&mut sim, i, off, len as u64, false, false);
        } else {
            st.write(&mut sim, i, off, buf, 64, len, false);
        }
        let mut cs = Vec::new();
        sim.wait(0, None, &mut cs).unwrap();
        for c in cs {
            st.complete(&mut sim, c);
        }
    }
    let mut cs = Vec::new();
    sim.wait(0, None, &mut cs).unwrap();
    for c in cs {
        st.complete(&mut sim, c);
    }
    (
        sim.live(files.journal).to_vec(),
        sim.live(files.meta).to_vec(),
    )
}

#[test]
fn recovery_survives_damaged_journals_and_metadata() {
    let mut rng = Rng::new(99);
    for seed in 0..40 {
        let (journal, meta) = written_images(seed);
        let used = journal.iter().rposition(|&b| b != 0).unwrap_or(0) + 1;
        for _ in 0..15 {
            let mut j = journal[..used].to_vec();
            match rng.below(3) {
                0 => {
                    let i = rng.below(j.len() as u64) as usize;
                    j[i] ^= 1 << rng.below(8);
                }
                1 => j.truncate(rng.below(j.len() as u64) as usize),
                _ => {
                    let i = rng.below(j.len() as u64) as usize;
                    let n = (rng.below(600) as usize).min(j.len() - i);
                    j[i..i + n].fill(rng.next_u64() as u8);
                }
            }
            fuzzing::recover_journal(&j);
        }
        for _ in 0..10 {
            let mut m = meta.clone();
            let i = rng.below(m.len() as u64) as usize;
            m[i] ^= 1 << rng.below(8);
            fuzzing::superblock(&m[..4096]);
            fuzzing::recover_meta(&m);
        }
    }
    for n in [0usize, 1, 63, 64, 65, 511, 512, 4096, 9000] {
        let junk: Vec<u8> = (0..n).map(|i| (i * 7 + 3) as u8).collect();
        fuzzing::recover_journal(&junk);
        fuzzing::recover_meta(&junk);
        fuzzing::superblock(&junk);
    }
}

#[test]
fn intact_journal_recovers_every_record() {
    let (journal, meta) = written_images(5);
    let mut sim = SimIo::new(1);
    let files = new_replica(&mut sim, DISK, MIN_JOURNAL);
    for (fd, img) in [(files.journal, journal), (files.meta, meta)] {
        let f = sim.files.get_mut(&fd).unwrap();
        f.live = img.clone();
        f.durable = img;
    }
    assert!(fuzzing::open_and_read(&mut sim, files));
    // Replay wrote the data file.
    assert!(sim.live(files.data).iter().any(|&b| b != 0));
}
