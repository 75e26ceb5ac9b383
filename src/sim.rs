//! Simulated I/O: an in-memory disk behind the same [`Io`] trait as io_uring.
//!
//! Owns: per-file "live" and "durable" images, the writes not yet synced (so a
//! crash can be built from any prefix of them, with the last one torn at
//! 512-byte granularity), deterministic completion reordering from a seed, and
//! injected faults (EIO, ENOSPC, short writes, failed fsync). It never touches a
//! real file or socket; sockets are not simulated here (ops return EOPNOTSUPP).

use std::collections::HashMap;
use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::io::{Completion, Io, Op};
use crate::store::format::{Superblock, BLOCK_SIZE, CHECKSUM_TABLE_OFFSET, FORMAT_VERSION};
use crate::store::Files;

/// Sector size for torn writes.
pub const SECTOR: usize = 512;

#[derive(Clone, Debug, Default)]
pub struct SimFile {
    pub live: Vec<u8>,
    pub durable: Vec<u8>,
    /// Writes since the last sync, oldest first: (offset, bytes).
    pub unsynced: Vec<(u64, Vec<u8>)>,
}

/// Which ops a fault applies to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultOn {
    Write,
    Read,
    Fsync,
    Any,
}

/// What an injected fault does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FaultEffect {
    /// Fail with this errno; nothing is written.
    Errno(i32),
    /// Write only the first half (rounded down to a sector, at least 1 byte).
    ShortWrite,
}

#[derive(Clone, Copy, Debug)]
pub struct Fault {
    pub fd: Option<RawFd>,
    pub on: FaultOn,
    /// Matching ops to let through first.
    pub skip: u64,
    pub effect: FaultEffect,
    /// Keep failing after the first hit.
    pub sticky: bool,
}

/// What survives a simulated power failure, per file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CrashMode {
    /// Only what was fsynced ("freeze durability at the last sync point").
    DurableOnly,
    /// The durable bytes plus a random prefix of the unsynced writes, the
    /// last one torn ([`SimIo::crash_image`]).
    PrefixTorn,
    /// Every unsynced sector in any of its versions ([`SimIo::crash_image_any`]).
    AnySector,
}

/// A small deterministic PRNG (xorshift64*), so a seed reproduces a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next_u64() % n
        }
    }
}

pub struct SimIo {
    pub files: HashMap<RawFd, SimFile>,
    queue: Vec<(u64, Op)>,
    rng: Rng,
    /// Complete queued ops in a shuffled order.
    pub reorder: bool,
    pub faults: Vec<Fault>,
    /// Count of completed fsyncs, per file and overall.
    pub syncs: u64,
    /// Every op executed, for tests that want to stop after N of them.
    pub ops_done: u64,
    /// Print every executed op and its result to stderr (for debugging a seed).
    pub trace: bool,
    next_fd: RawFd,
}

impl SimIo {
    pub fn new(seed: u64) -> SimIo {
        SimIo {
            files: HashMap::new(),
            queue: Vec::new(),
            rng: Rng::new(seed),
            reorder: true,
            faults: Vec::new(),
            syncs: 0,
            ops_done: 0,
            trace: false,
            next_fd: 1000,
        }
    }

    /// Add a file whose live and durable contents are `bytes`.
    pub fn add_file(&mut self, bytes: Vec<u8>) -> RawFd {
        let fd = self.next_fd;
        self.next_fd += 1;
        self.files.insert(
            fd,
            SimFile {
                durable: bytes.clone(),
                live: bytes,
                unsynced: Vec::new(),
            },
        );
        fd
    }

    pub fn live(&self, fd: RawFd) -> &[u8] {
        &self.files[&fd].live
    }

    /// Ops submitted but not yet completed.
    pub fn pending(&self) -> usize {
        self.queue.len()
    }

    /// The image a crash could leave for `fd`: the durable bytes plus a random
    /// prefix of the unsynced writes, the last of which may be torn (a random
    /// subset of its sectors reached the disk).
    pub fn crash_image(&mut self, fd: RawFd) -> Vec<u8> {
        let rng = &mut self.rng;
        let f = &self.files[&fd];
        let mut img = f.durable.clone();
        let n = rng.below(f.unsynced.len() as u64 + 1) as usize;
        for (i, (off, data)) in f.unsynced.iter().take(n).enumerate() {
            let torn = i + 1 == n && rng.below(2) == 0;
            for (s, chunk) in data.chunks(SECTOR).enumerate() {
                if torn && rng.below(2) == 0 {
                    continue;
                }
                let at = *off as usize + s * SECTOR;
                write_into(&mut img, at, chunk);
            }
        }
        img
    }

    /// Like [`crash_image`](Self::crash_image) but with a harsher disk: every
    /// 512-byte sector touched since the last sync independently ends up in
    /// any of its versions (the durable one, or its contents after any of the
    /// unsynced writes), as when the page cache writes back out of order.
    pub fn crash_image_any(&mut self, fd: RawFd) -> Vec<u8> {
        let rng = &mut self.rng;
        let f = &self.files[&fd];
        let mut img = f.durable.clone();
        let mut cur = f.durable.clone();
        for (off, data) in &f.unsynced {
            write_into(&mut cur, *off as usize, data);
            if data.is_empty() {
                continue;
            }
            let first = *off as usize / SECTOR;
            let last = (*off as usize + data.len() - 1) / SECTOR;
            for s in first..=last {
                if rng.below(2) == 0 {
                    let a = s * SECTOR;
                    let b = ((s + 1) * SECTOR).min(cur.len());
                    write_into(&mut img, a, &cur[a..b]);
                }
            }
        }
        img
    }

    /// A new simulator holding what a power failure right now could leave on
    /// disk: every file replaced by a crash image (`any_sector` picks
    /// [`crash_image_any`](Self::crash_image_any), otherwise
    /// [`crash_image`](Self::crash_image)), all of it durable, with the same
    /// file descriptors. Queued ops are lost, as in a crash. `seed` drives the
    /// new simulator's own reordering.
    pub fn crash_copy(&mut self, seed: u64, any_sector: bool) -> SimIo {
        let mode = if any_sector {
            CrashMode::AnySector
        } else {
            CrashMode::PrefixTorn
        };
        self.crash_copy_mode(seed, mode)
    }

    /// [`crash_copy`](Self::crash_copy) with an explicit [`CrashMode`].
    pub fn crash_copy_mode(&mut self, seed: u64, mode: CrashMode) -> SimIo {
        let mut fds: Vec<RawFd> = self.files.keys().copied().collect();
        fds.sort_unstable();
        let mut next = SimIo::new(seed);
        next.trace = self.trace;
        for fd in fds {
            let img = match mode {
                CrashMode::DurableOnly => self.files[&fd].durable.clone(),
                CrashMode::PrefixTorn => self.crash_image(fd),
                CrashMode::AnySector => self.crash_image_any(fd),
            };
            next.files.insert(
                fd,
                SimFile {
                    live: img.clone(),
                    durable: img,
                    unsynced: Vec::new(),
                },
            );
            next.next_fd = next.next_fd.max(fd + 1);
        }
        next
    }

    /// Execute at most `k` queued ops, leaving the rest queued: picked at
    /// random when `reorder` is set, oldest first otherwise. Lets a test stop
    /// (crash) while some ops are still in flight.
    pub fn wait_some(&mut self, k: usize, out: &mut Vec<Completion>) {
        for _ in 0..k {
            if self.queue.is_empty() {
                break;
            }
            let i = if self.reorder {
                self.rng.below(self.queue.len() as u64) as usize
            } else {
                0
            };
            let (token, mut op) = self.queue.remove(i);
            let result = self.execute(&mut op);
            out.push(Completion { token, result, op });
        }
    }

    /// The ops waiting to execute, oldest first (for directed tests that pick
    /// the execution order with [`run_queued`](Self::run_queued)).
    pub fn queued(&self) -> impl Iterator<Item = &Op> {
        self.queue.iter().map(|(_, op)| op)
    }

    /// Execute only the queued op at `index` (in [`queued`](Self::queued) order).
    pub fn run_queued(&mut self, index: usize, out: &mut Vec<Completion>) {
        let (token, mut op) = self.queue.remove(index);
        let result = self.execute(&mut op);
        out.push(Completion { token, result, op });
    }

    /// The simulator's random stream (for tests that want reproducible choices
    /// tied to the same seed).
    pub fn rng(&mut self) -> &mut Rng {
        &mut self.rng
    }

    fn fault_for(&mut self, fd: RawFd, on: FaultOn) -> Option<FaultEffect> {
        let idx = self.faults.iter().position(|f| {
            (f.fd.is_none() || f.fd == Some(fd)) && (f.on == on || f.on == FaultOn::Any)
        })?;
        let f = &mut self.faults[idx];
        if f.skip > 0 {
            f.skip -= 1;
            return None;
        }
        let effect = f.effect;
        if !f.sticky {
            self.faults.remove(idx);
        }
        Some(effect)
    }

    fn execute(&mut self, op: &mut Op) -> i32 {
        let r = self.execute_inner(op);
        if self.trace {
            let what = match op {
                Op::Read {
                    fd,
                    buf,
                    at,
                    offset,
                } => format!("read fd {fd} {offset}+{}", buf.len() - *at),
                Op::Write {
                    fd,
                    start,
                    end,
                    offset,
                    ..
                } => format!("write fd {fd} {offset}+{}", *end - *start),
                Op::Fsync { fd, .. } => format!("fsync fd {fd}"),
                Op::Fallocate {
                    fd,
                    mode,
                    offset,
                    len,
                } => format!("fallocate fd {fd} mode {mode} {offset}+{len}"),
                other => format!("{other:?}"),
            };
            eprintln!("sim: op {}: {what} -> {r}", self.ops_done);
        }
        r
    }

    fn execute_inner(&mut self, op: &mut Op) -> i32 {
        self.ops_done += 1;
        match op {
            Op::Read {
                fd,
                buf,
                at,
                offset,
            } => {
                if let Some(FaultEffect::Errno(e)) = self.fault_for(*fd, FaultOn::Read) {
                    return -e;
                }
                let Some(f) = self.files.get(fd) else {
                    return -libc::EBADF;
                };
                let off = *offset as usize;
                let want = buf.len() - *at;
                let n = f.live.len().saturating_sub(off).min(want);
                buf[*at..*at + n].copy_from_slice(&f.live[off..off + n]);
                n as i32
            }
            Op::Write {
                fd,
                buf,
                start,
                end,
                offset,
            } => {
                let mut len = *end - *start;
                match self.fault_for(*fd, FaultOn::Write) {
                    Some(FaultEffect::Errno(e)) => return -e,
                    Some(FaultEffect::ShortWrite) => len = (len / 2 / SECTOR * SECTOR).max(1),
                    None => {}
                }
                let Some(f) = self.files.get_mut(fd) else {
                    return -libc::EBADF;
                };
                let data = buf.as_slice()[*start..*start + len].to_vec();
                write_into(&mut f.live, *offset as usize, &data);
                f.unsynced.push((*offset, data));
                len as i32
            }
            Op::Fsync { fd, .. } => {
                if let Some(FaultEffect::Errno(e)) = self.fault_for(*fd, FaultOn::Fsync) {
                    // Like Linux after a failed writeback: the dirty data may be
                    // gone and the error is reported once.
                    if let Some(f) = self.files.get_mut(fd) {
                        f.live = f.durable.clone();
                        f.unsynced.clear();
                    }
                    return -e;
                }
                let Some(f) = self.files.get_mut(fd) else {
                    return -libc::EBADF;
                };
                // durable := live, by replaying the unsynced writes rather than
                // copying the whole file (same result, much cheaper for big
                // files synced often).
                for (off, data) in std::mem::take(&mut f.unsynced) {
                    write_into(&mut f.durable, off as usize, &data);
                }
                if f.durable.len() != f.live.len() {
                    f.durable.resize(f.live.len(), 0);
                }
                self.syncs += 1;
                0
            }
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => {
                if let Some(FaultEffect::Errno(e)) = self.fault_for(*fd, FaultOn::Write) {
                    return -e;
                }
                let Some(f) = self.files.get_mut(fd) else {
                    return -libc::EBADF;
                };
                if *mode & libc::FALLOC_FL_PUNCH_HOLE != 0 {
                    let end = (*offset + *len).min(f.live.len() as u64);
                    if *offset < end {
                        let zeros = vec![0u8; (end - *offset) as usize];
                        write_into(&mut f.live, *offset as usize, &zeros);
                        f.unsynced.push((*offset, zeros));
                    }
                } else if (f.live.len() as u64) < *offset + *len {
                    f.live.resize((*offset + *len) as usize, 0);
                }
                0
            }
            Op::Timeout { .. } => -libc::ETIME,
            Op::Accept { .. } | Op::Recv { .. } | Op::Send { .. } | Op::Connect { .. } => {
                -libc::EOPNOTSUPP
            }
        }
    }
}

fn write_into(img: &mut Vec<u8>, at: usize, data: &[u8]) {
    if img.len() < at + data.len() {
        img.resize(at + data.len(), 0);
    }
    img[at..at + data.len()].copy_from_slice(data);
}

impl Io for SimIo {
    fn submit(&mut self, token: u64, op: Op) {
        self.queue.push((token, op));
    }

    fn wait(
        &mut self,
        min: usize,
        _timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        let _ = min;
        let mut batch = std::mem::take(&mut self.queue);
        if self.reorder {
            for i in (1..batch.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                batch.swap(i, j);
            }
        }
        for (token, mut op) in batch {
            let result = self.execute(&mut op);
            out.push(Completion { token, result, op });
        }
        Ok(())
    }
}

/// Create the three files of a fresh replica in `sim`, the way `store::dir::init`
/// lays them out: a zeroed data file of `size` bytes, a zeroed journal of
/// `journal_size` bytes, and a meta file with the superblock in slot 0 and an
/// all-zero checksum table (= an all-zero disk). Everything is durable.
pub fn init_replica(sim: &mut SimIo, size: u64, journal_size: u64) -> (Files, Superblock) {
    let sb = Superblock {
        version: FORMAT_VERSION,
        block_size: BLOCK_SIZE as u32,
        volume_uuid: [0x5a; 16],
        node_id: 1,
        size,
        journal_size,
        write_counter: 0,
        tail_pos: 0,
        tail_seq: 1,
        epoch: 1,
    };
    let data = sim.add_file(vec![0; size as usize]);
    let journal = sim.add_file(vec![0; journal_size as usize]);
    let mut meta = sb.encode();
    meta.resize((CHECKSUM_TABLE_OFFSET + size / BLOCK_SIZE * 8) as usize, 0);
    let meta = sim.add_file(meta);
    (
        Files {
            data,
            journal,
            meta,
        },
        sb,
    )
}
