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

/// A small deterministic PRNG (xorshift64*), so a seed reproduces a run.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next(&mut self) -> u64 {
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
            self.next() % n
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
        let f = self.files[&fd].clone();
        let mut img = f.durable.clone();
        let n = self.rng.below(f.unsynced.len() as u64 + 1) as usize;
        for (i, (off, data)) in f.unsynced.iter().take(n).enumerate() {
            let torn = i + 1 == n && self.rng.below(2) == 0;
            for (s, chunk) in data.chunks(SECTOR).enumerate() {
                if torn && self.rng.below(2) == 0 {
                    continue;
                }
                let at = *off as usize + s * SECTOR;
                write_into(&mut img, at, chunk);
            }
        }
        img
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
        self.ops_done += 1;
        match op {
            Op::Read { fd, buf, at, offset } => {
                if let Some(FaultEffect::Errno(e)) = self.fault_for(*fd, FaultOn::Read) {
                    return -e;
                }
                let Some(f) = self.files.get(fd) else { return -libc::EBADF };
                let off = *offset as usize;
                let want = buf.len() - *at;
                let n = f.live.len().saturating_sub(off).min(want);
                buf[*at..*at + n].copy_from_slice(&f.live[off..off + n]);
                n as i32
            }
            Op::Write { fd, buf, start, end, offset } => {
                let mut len = *end - *start;
                match self.fault_for(*fd, FaultOn::Write) {
                    Some(FaultEffect::Errno(e)) => return -e,
                    Some(FaultEffect::ShortWrite) => len = (len / 2 / SECTOR * SECTOR).max(1),
                    None => {}
                }
                let Some(f) = self.files.get_mut(fd) else { return -libc::EBADF };
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
                let Some(f) = self.files.get_mut(fd) else { return -libc::EBADF };
                f.durable = f.live.clone();
                f.unsynced.clear();
                self.syncs += 1;
                0
            }
            Op::Fallocate { fd, mode, offset, len } => {
                if let Some(FaultEffect::Errno(e)) = self.fault_for(*fd, FaultOn::Write) {
                    return -e;
                }
                let Some(f) = self.files.get_mut(fd) else { return -libc::EBADF };
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
            Op::Accept { .. } | Op::Recv { .. } | Op::Send { .. } => -libc::EOPNOTSUPP,
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

    fn wait(&mut self, min: usize, _timeout: Option<Duration>, out: &mut Vec<Completion>) -> io::Result<()> {
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
