//! Shared helpers for the simulated-I/O store tests (`crash_consistency`,
//! `store_faults`): a replica in a [`SimIo`], a driver that pumps completions
//! into the [`Store`], and the data pattern writes are stamped with.
#![allow(dead_code, clippy::identity_op)]

use nbdmirror::io::{Io, Op};
use nbdmirror::sim::{init_replica, SimIo};
use nbdmirror::store::format::Superblock;
use nbdmirror::store::{load_superblock, Files, ReqId, Store, StoreEvent, Tuning, WRITE_HEADROOM};
use std::os::fd::RawFd;
use std::time::Duration;

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;
pub const HOUR: Duration = Duration::from_secs(3600);

/// Tuning where nothing happens on a timer: syncs only for FLUSH/FUA or under
/// pressure, checkpoints only under pressure or when draining.
pub fn lazy_tuning() -> Tuning {
    Tuning {
        sync_bytes: u64::MAX,
        sync_interval: HOUR,
        checkpoint_percent: 100,
        checkpoint_interval: HOUR,
        verify_reads: true,
        inplace_min: 0,
        inplace_regions: nbdmirror::store::INPLACE_REGIONS,
        large_write: nbdmirror::store::LARGE_WRITE,
        vouch_inplace: false,
        force_older_superblock: false,
        refuse_journal_loss: false,
    }
}

/// Tuning where every sync, apply and checkpoint happens as soon as it can.
pub fn eager_tuning() -> Tuning {
    Tuning {
        sync_bytes: 0,
        sync_interval: Duration::ZERO,
        checkpoint_percent: 0,
        checkpoint_interval: Duration::ZERO,
        verify_reads: true,
        inplace_min: 0,
        inplace_regions: nbdmirror::store::INPLACE_REGIONS,
        large_write: nbdmirror::store::LARGE_WRITE,
        vouch_inplace: false,
        force_older_superblock: false,
        refuse_journal_loss: false,
    }
}

/// The 8-byte word write `id` puts at disk offset `8 * word`: the write's id
/// (bytes 0..4, xored with a constant so small ids do not give zero bytes)
/// and a hash of (id, word) (bytes 4..8, never zero), so a byte in the wrong
/// place or from the wrong write is very unlikely to match.
pub fn pattern_word(id: u64, word: u64) -> [u8; 8] {
    let mut h = id.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ word.wrapping_mul(0xD6E8_FEB8_6659_FD93);
    h ^= h >> 29;
    h = h.wrapping_mul(0xBF58_476D_1CE4_E5B9);
    h ^= h >> 32;
    let idb = ((id as u32) ^ 0xC3A5_8080).to_le_bytes();
    let hb = h.to_le_bytes();
    let nz = |b: u8| if b == 0 { 0x11 } else { b };
    [
        idb[0],
        idb[1],
        idb[2],
        idb[3],
        nz(hb[4]),
        nz(hb[5]),
        nz(hb[6]),
        nz(hb[7]),
    ]
}

/// The byte write `id` puts at disk offset `o`.
pub fn pattern_byte(id: u64, o: u64) -> u8 {
    pattern_word(id, o / 8)[(o % 8) as usize]
}

/// The bytes write `id` puts at `[off, off+len)`.
pub fn pattern(id: u64, off: u64, len: u64) -> Vec<u8> {
    let (w0, w1) = (off / 8, (off + len).div_ceil(8));
    let mut v = Vec::with_capacity(((w1 - w0) * 8) as usize);
    for w in w0..w1 {
        v.extend_from_slice(&pattern_word(id, w));
    }
    let skip = (off - w0 * 8) as usize;
    v.drain(..skip);
    v.truncate(len as usize);
    v
}

/// Which write stamped this 8-byte word, if any (for failure messages).
pub fn stamp_at(img: &[u8], o: u64) -> Option<u64> {
    let w = (o / 8 * 8) as usize;
    if w + 8 > img.len() {
        return None;
    }
    let v = u32::from_le_bytes(img[w..w + 4].try_into().unwrap());
    if v == 0 {
        return None;
    }
    let id = (v ^ 0xC3A5_8080) as u64;
    (pattern_byte(id, w as u64 + 5) == img[w + 5]).then_some(id)
}

/// A payload buffer holding `data` at `at` (with junk around it, so a store
/// that reads outside `buf[at..at+len]` shows up).
pub fn payload(data: &[u8], at: usize) -> Vec<u8> {
    let mut b = vec![0xEE; at + data.len() + 13];
    b[at..at + data.len()].copy_from_slice(data);
    b
}

/// One replica in a simulator, with its store.
pub struct Rig {
    pub sim: SimIo,
    pub st: Store,
    pub files: Files,
    pub tuning: Tuning,
    /// Events produced and not yet consumed by a `*_sync` helper.
    pub events: Vec<StoreEvent>,
    next_id: ReqId,
}

impl Rig {
    /// A fresh replica of `size` bytes with a `jsize`-byte journal.
    pub fn new(seed: u64, size: u64, jsize: u64, tuning: Tuning) -> Rig {
        let mut sim = SimIo::new(seed);
        sim.trace = std::env::var("SIM_TRACE").is_ok();
        let (files, _sb) = init_replica(&mut sim, size, jsize);
        Rig::open(sim, files, tuning).expect("opening a fresh replica")
    }

    /// Recover and open the replica whose files are in `sim`.
    pub fn open(mut sim: SimIo, files: Files, tuning: Tuning) -> Result<Rig, String> {
        let st = recover(&mut sim, files, tuning)?;
        Ok(Rig {
            sim,
            st,
            files,
            tuning,
            events: Vec::new(),
            next_id: 1 << 40,
        })
    }

    /// Power failure now: recover from a crash image of every file.
    pub fn crash(&mut self, seed: u64, any_sector: bool) -> Result<Rig, String> {
        let sim = self.sim.crash_copy(seed, any_sector);
        Rig::open(sim, self.files, self.tuning)
    }

    /// Power failure that keeps only what was fsynced.
    pub fn crash_durable_only(&mut self, seed: u64) -> Result<Rig, String> {
        let mut sim = SimIo::new(seed);
        let mut fds: Vec<_> = self.sim.files.keys().copied().collect();
        fds.sort_unstable();
        for fd in fds {
            let d = self.sim.files[&fd].durable.clone();
            let got = sim.add_file(d);
            assert_eq!(got, fd, "crash copy must keep file descriptors");
        }
        Rig::open(sim, self.files, self.tuning)
    }

    pub fn fresh_id(&mut self) -> ReqId {
        self.next_id += 1;
        self.next_id
    }

    /// Execute up to `k` queued ops and hand their completions to the store.
    /// Returns the files that were fsynced successfully.
    pub fn step(&mut self, k: usize) -> Vec<RawFd> {
        let mut cs = Vec::new();
        let mut synced = Vec::new();
        self.sim.wait_some(k, &mut cs);
        for c in cs {
            if let (Op::Fsync { fd, .. }, true) = (&c.op, c.result == 0) {
                synced.push(*fd);
            }
            assert!(
                c.token & nbdmirror::store::STORE_TOKEN != 0,
                "completion without the store's token: {c:?}"
            );
            self.st.complete(&mut self.sim, c);
        }
        self.st.drain_events(&mut self.events);
        synced
    }

    /// Execute the oldest queued op that `pick` accepts (panics if none) and
    /// hand its completion to the store. For directed interleavings.
    pub fn run_op(&mut self, what: &str, pick: impl Fn(&Op) -> bool) {
        let i = self.sim.queued().position(&pick).unwrap_or_else(|| {
            panic!(
                "no queued op is {what}; queued: {:?}",
                self.sim.queued().map(op_summary).collect::<Vec<_>>()
            )
        });
        let mut cs = Vec::new();
        self.sim.run_queued(i, &mut cs);
        for c in cs {
            self.st.complete(&mut self.sim, c);
        }
        self.st.drain_events(&mut self.events);
    }

    /// Take the event for `id` if it has been produced already.
    pub fn take_event(&mut self, id: ReqId) -> Option<StoreEvent> {
        self.st.drain_events(&mut self.events);
        let i = self.events.iter().position(|e| event_id(e) == id)?;
        Some(self.events.remove(i))
    }

    /// Execute everything queued, including what the store submits in
    /// response, until the simulator is idle.
    pub fn pump(&mut self) {
        let mut guard = 0u64;
        loop {
            self.st.drain_events(&mut self.events);
            if self.sim.pending() == 0 {
                return;
            }
            let mut cs = Vec::new();
            self.sim.wait(0, None, &mut cs).unwrap();
            for c in cs {
                self.st.complete(&mut self.sim, c);
            }
            guard += 1;
            assert!(guard < 1_000_000, "store never goes idle");
        }
    }

    /// Take the event for `id` out of `events`, pumping (and ticking when idle)
    /// until it shows up.
    pub fn wait_event(&mut self, id: ReqId) -> StoreEvent {
        let mut idle_rounds = 0;
        loop {
            self.st.drain_events(&mut self.events);
            if let Some(i) = self.events.iter().position(|e| event_id(e) == id) {
                return self.events.remove(i);
            }
            if self.sim.pending() == 0 {
                idle_rounds += 1;
                assert!(
                    idle_rounds < 100,
                    "request {id} never completes (store idle; failure: {:?})",
                    self.st.failure()
                );
                self.st.tick(&mut self.sim);
                continue;
            }
            idle_rounds = 0;
            self.step(usize::MAX);
        }
    }

    pub fn write_sync(&mut self, off: u64, data: &[u8], fua: bool) -> Result<(), i32> {
        let id = self.fresh_id();
        let buf = payload(data, WRITE_HEADROOM);
        self.st
            .write(&mut self.sim, id, off, buf, WRITE_HEADROOM, data.len(), fua);
        match self.wait_event(id) {
            StoreEvent::Written(_, r) => r,
            e => panic!("unexpected event {e:?}"),
        }
    }

    pub fn zero_sync(&mut self, off: u64, len: u64, fua: bool) -> Result<(), i32> {
        let id = self.fresh_id();
        self.st
            .write_zeroes(&mut self.sim, id, off, len, false, fua);
        match self.wait_event(id) {
            StoreEvent::Written(_, r) => r,
            e => panic!("unexpected event {e:?}"),
        }
    }

    pub fn flush_sync(&mut self) -> Result<(), i32> {
        let id = self.fresh_id();
        self.st.flush(&mut self.sim, id);
        match self.wait_event(id) {
            StoreEvent::Flushed(_, r) => r,
            e => panic!("unexpected event {e:?}"),
        }
    }

    pub fn read_sync(&mut self, off: u64, len: u64) -> Result<Vec<u8>, i32> {
        let id = self.fresh_id();
        let head = 16;
        self.st.read(&mut self.sim, id, off, len, head);
        match self.wait_event(id) {
            StoreEvent::Read(_, r) => r.map(|mut b| {
                assert_eq!(b.len(), head + len as usize, "read buffer size");
                b.drain(..head);
                b
            }),
            e => panic!("unexpected event {e:?}"),
        }
    }

    /// The whole disk as the store serves it, read in pieces.
    pub fn read_all(&mut self) -> Result<Vec<u8>, (u64, i32)> {
        let size = self.st.size();
        let mut out = Vec::with_capacity(size as usize);
        let mut off = 0;
        while off < size {
            let n = (256 * KIB).min(size - off);
            match self.read_sync(off, n) {
                Ok(b) => out.extend_from_slice(&b),
                Err(e) => return Err((off, e)),
            }
            off += n;
        }
        Ok(out)
    }

    /// Drain: everything applied and checkpointed.
    pub fn drain(&mut self) {
        self.st.drain(&mut self.sim);
        self.pump();
    }
}

/// Load the superblock and open (recover) the store, leaving `sim` with the
/// caller even when recovery fails.
pub fn recover(sim: &mut SimIo, files: Files, tuning: Tuning) -> Result<Store, String> {
    let sb: Superblock = load_superblock(sim, files.meta)?;
    Store::open(sim, files, sb, tuning)
}

/// A short description of an op for messages.
pub fn op_summary(op: &Op) -> String {
    match op {
        Op::Read {
            fd,
            buf,
            at,
            offset,
        } => format!("read fd {fd} {offset}+{}", buf.len() - at),
        Op::Write {
            fd,
            start,
            end,
            offset,
            ..
        } => format!("write fd {fd} {offset}+{}", end - start),
        Op::Fsync { fd, .. } => format!("fsync fd {fd}"),
        Op::Fallocate {
            fd, offset, len, ..
        } => format!("fallocate fd {fd} {offset}+{len}"),
        other => format!("{other:?}"),
    }
}

/// Op predicates for [`Rig::run_op`].
pub fn is_write_to(fd: RawFd) -> impl Fn(&Op) -> bool {
    move |op| matches!(op, Op::Write { fd: f, .. } if *f == fd)
}
pub fn is_fsync_of(fd: RawFd) -> impl Fn(&Op) -> bool {
    move |op| matches!(op, Op::Fsync { fd: f, .. } if *f == fd)
}
pub fn is_any(_: &Op) -> bool {
    true
}

pub fn event_id(e: &StoreEvent) -> ReqId {
    match e {
        StoreEvent::Written(id, _) | StoreEvent::Flushed(id, _) | StoreEvent::Read(id, _) => *id,
    }
}

/// Seeds to run: `SEED=n` runs just that one, otherwise `0..default`
/// (`SEEDS=n` overrides the count, `SEED_BASE=b` the start).
pub fn seeds(default: u64) -> Vec<u64> {
    if let Ok(s) = std::env::var("SEED") {
        return vec![s.parse().expect("SEED must be a number")];
    }
    let n = std::env::var("SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default);
    let base = std::env::var("SEED_BASE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (base..base + n).collect()
}

/// Keep `Io` in scope for callers that use `sim.wait`.
pub fn _io_in_scope(_: &dyn Io) {}
