//! Simulated I/O: an in-memory disk behind the same [`Io`] trait as io_uring.
//!
//! Owns: per-file "live" and "durable" images, the writes not yet synced (so a
//! crash can be built from any prefix of them, with the last one torn at
//! 512-byte granularity), deterministic completion reordering from a seed, and
//! injected faults (EIO, ENOSPC, short writes, failed fsync). It never touches a
//! real file. With a [`SimNet`] attached (several nodes share one), it also
//! simulates TCP between them on a virtual clock: connect, accept, send and
//! receive with a delivery delay, partitions (segments held until healed,
//! connects time out) and resets; without one, socket ops fail EOPNOTSUPP.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;
use std::time::{Duration, Instant};

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
    /// The process was killed, the machine kept running: everything written
    /// (the page cache) survives, ops still queued are lost.
    ProcessKill,
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
    /// Virtual submit time of each queued op (parallel to `queue`).
    queued_at: Vec<Duration>,
    /// The network this node is on, and its node number there.
    net: Option<(Rc<RefCell<SimNet>>, u32)>,
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
    /// Files whose writes execute at submission, as `UringIo::inline_write_fds`
    /// does for the journal (their completions are delivered by the next wait).
    pub inline_write_fds: Vec<RawFd>,
    /// Descriptors that name another's file (an O_DIRECT descriptor of the
    /// data file, for instance): see [`SimIo::alias_fd`].
    aliases: HashMap<RawFd, RawFd>,
    inline_done: Vec<Completion>,
    /// Real descriptors (outside the simulation) whose fsyncs are passed
    /// through to the kernel.
    pub real_sync_fds: Vec<RawFd>,
    /// Every cache drop executed, as (offset, len): there is no page cache
    /// to drop, but tests check what the store asked for.
    pub cache_drops: Vec<(u64, u64)>,
    /// What `cached_bytes` reports: per descriptor, the byte ranges to
    /// count as in the page cache. Descriptors not here report `None`
    /// (cannot tell), as a kernel without cachestat(2) would.
    pub page_cache: HashMap<RawFd, Vec<(u64, u64)>>,
    next_fd: RawFd,
}

impl SimIo {
    pub fn new(seed: u64) -> SimIo {
        SimIo {
            files: HashMap::new(),
            queue: Vec::new(),
            queued_at: Vec::new(),
            net: None,
            inline_write_fds: Vec::new(),
            aliases: HashMap::new(),
            inline_done: Vec::new(),
            real_sync_fds: Vec::new(),
            cache_drops: Vec::new(),
            page_cache: HashMap::new(),
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
    /// A second descriptor for `fd`'s file (as a second `open` of the same
    /// path). Writes through it are ordinary unsynced writes to the file: the
    /// simulated disk gives O_DIRECT no durability of its own, which is what
    /// a drive with a volatile cache does.
    pub fn alias_fd(&mut self, fd: RawFd) -> RawFd {
        let alias = self.next_fd;
        self.next_fd += 1;
        self.aliases.insert(alias, fd);
        alias
    }

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
                CrashMode::ProcessKill => self.files[&fd].live.clone(),
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
        out.append(&mut self.inline_done);
        for _ in 0..k {
            let ready: Vec<usize> = (0..self.queue.len()).filter(|&i| self.ready(i)).collect();
            if ready.is_empty() {
                break;
            }
            let i = if self.reorder {
                ready[self.rng.below(ready.len() as u64) as usize]
            } else {
                ready[0]
            };
            self.run_queued(i, out);
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
        let at = self.queued_at.remove(index);
        let result = self.execute_at(&mut op, at);
        out.push(Completion { token, result, op });
    }

    /// Attach this node to `net` as node `node`.
    pub fn attach(&mut self, net: Rc<RefCell<SimNet>>, node: u32) {
        self.net = Some((net, node));
    }

    fn vnow(&self) -> Duration {
        self.net
            .as_ref()
            .map(|(n, _)| n.borrow().now)
            .unwrap_or_default()
    }

    /// Whether queued op `i` can complete now (disk ops always can; socket
    /// ops and timeouts depend on the network and the virtual clock).
    fn ready(&self, i: usize) -> bool {
        let Some((net, node)) = &self.net else {
            return true;
        };
        net.borrow()
            .ready(*node, &self.queue[i].1, self.queued_at[i])
    }

    fn execute_at(&mut self, op: &mut Op, at: Duration) -> i32 {
        if let Some((net, node)) = &self.net {
            if let Some(r) = net.borrow_mut().execute(*node, op, at) {
                self.ops_done += 1;
                return r;
            }
        }
        self.execute(op)
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
            crate::elog!("sim: op {}: {what} -> {r}", self.ops_done);
        }
        r
    }

    fn execute_inner(&mut self, op: &mut Op) -> i32 {
        if let Op::DropCache { offset, len, .. } = op {
            // No page cache to drop. Not counted as an op, and no fault
            // aimed at the file's writes applies to it.
            self.cache_drops.push((*offset, *len));
            return 0;
        }
        self.ops_done += 1;
        // An alias names another descriptor's file; a fault aimed at the
        // alias itself applies first.
        let on = match op {
            Op::Read { .. } => FaultOn::Read,
            Op::Fsync { .. } => FaultOn::Fsync,
            _ => FaultOn::Write,
        };
        if let Op::Read { fd, .. }
        | Op::Write { fd, .. }
        | Op::Fsync { fd, .. }
        | Op::Fallocate { fd, .. } = op
        {
            if let Some(&file) = self.aliases.get(fd) {
                let alias = *fd;
                *fd = file;
                if self.faults.iter().any(|f| f.fd == Some(alias)) {
                    if let Some(FaultEffect::Errno(e)) = self.fault_for(alias, on) {
                        return -e;
                    }
                }
            }
        }
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
                    // A real file outside the simulation (a mirror's dirty
                    // bitmap, which lives in a real directory): sync it.
                    if self.real_sync_fds.contains(fd) {
                        // SAFETY: fdatasync(2) on a descriptor the caller owns.
                        let r = unsafe { libc::fdatasync(*fd) };
                        return if r == 0 { 0 } else { -libc::EIO };
                    }
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
                if *mode & (libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_ZERO_RANGE) != 0 {
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
            Op::DropCache { .. } => 0,
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
    fn cached_bytes(&mut self, fd: RawFd, offset: u64, len: u64) -> Option<u64> {
        let end = offset.saturating_add(len);
        let ranges = self.page_cache.get(&fd)?;
        Some(
            ranges
                .iter()
                .map(|&(s, e)| e.min(end).saturating_sub(s.max(offset)))
                .sum(),
        )
    }

    fn submit(&mut self, token: u64, mut op: Op) {
        if let Op::Write { fd, .. } = &op {
            if self.inline_write_fds.contains(fd) {
                let result = self.execute(&mut op);
                self.inline_done.push(Completion { token, result, op });
                return;
            }
        }
        let at = self.vnow();
        self.queue.push((token, op));
        self.queued_at.push(at);
    }

    /// Complete every queued op that can complete now (socket ops that must
    /// wait for the network stay queued), in a shuffled order if `reorder`.
    fn wait(
        &mut self,
        min: usize,
        _timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        let _ = min;
        out.append(&mut self.inline_done);
        let ready: Vec<usize> = (0..self.queue.len()).filter(|&i| self.ready(i)).collect();
        // Take them out from the back (indices stay valid), then put them in
        // queue order and shuffle that if asked.
        let mut batch: Vec<(u64, Op, Duration)> = ready
            .into_iter()
            .rev()
            .map(|i| {
                let (t, op) = self.queue.remove(i);
                (t, op, self.queued_at.remove(i))
            })
            .collect();
        batch.reverse();
        if self.reorder {
            for i in (1..batch.len()).rev() {
                let j = self.rng.below(i as u64 + 1) as usize;
                batch.swap(i, j);
            }
        }
        for (token, mut op, at) in batch {
            let result = self.execute_at(&mut op, at);
            out.push(Completion { token, result, op });
        }
        Ok(())
    }

    fn now(&self) -> Instant {
        match &self.net {
            Some((n, _)) => {
                let n = n.borrow();
                n.base + n.now
            }
            None => Instant::now(),
        }
    }

    fn tcp_socket(&mut self, _v6: bool) -> io::Result<OwnedFd> {
        let Some((net, node)) = &self.net else {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        };
        net.borrow_mut().socket(*node, None)
    }

    fn tcp_listen(&mut self, addr: SocketAddr) -> io::Result<OwnedFd> {
        let Some((net, node)) = &self.net else {
            return Err(io::Error::from_raw_os_error(libc::EOPNOTSUPP));
        };
        net.borrow_mut().socket(*node, Some(addr))
    }

    fn shutdown(&mut self, fd: RawFd) {
        if let Some((net, _)) = &self.net {
            net.borrow_mut().shutdown(fd);
        }
    }
}

/// One TCP segment in flight: bytes or the end of the stream.
#[derive(Debug)]
enum Seg {
    Data(Vec<u8>),
    Fin,
}

#[derive(Debug)]
struct SimSock {
    node: u32,
    peer: Option<u64>,
    /// Segments for this end, with the virtual time they arrive.
    inbox: VecDeque<(Duration, Seg)>,
    /// Bytes of the front data segment already received.
    consumed: usize,
    got_fin: bool,
    shut: bool,
    reset: bool,
    listen: Option<SocketAddr>,
    backlog: VecDeque<u64>,
}

/// A simulated network of nodes (one [`SimIo`] each) on a virtual clock.
/// Sockets are real eventfd descriptors (so `OwnedFd` can close them
/// safely) mapped to simulated endpoints.
pub struct SimNet {
    /// Virtual time since the start; the test advances it.
    pub now: Duration,
    base: Instant,
    /// One-way delivery delay of every segment and connect.
    pub delay: Duration,
    socks: HashMap<u64, SimSock>,
    fds: HashMap<RawFd, u64>,
    listeners: HashMap<SocketAddr, u64>,
    next_id: u64,
    blocked: HashSet<(u32, u32)>,
    down: HashSet<u32>,
    /// Bytes delivered, for tests that want to see traffic.
    pub delivered: u64,
    /// Damage about one byte in this many sent (0: none): a segment of `n`
    /// bytes has one bit flipped on the way with probability `n / this`,
    /// as a faulty NIC or switch might (TCP's own checksum lets some
    /// through), so long data segments take most of the damage.
    pub damage_one_in: u64,
    /// Segments damaged so far.
    pub damaged: u64,
    damage_rng: u64,
}

impl SimNet {
    pub fn new(delay: Duration) -> Rc<RefCell<SimNet>> {
        Rc::new(RefCell::new(SimNet {
            now: Duration::ZERO,
            base: Instant::now(),
            delay,
            socks: HashMap::new(),
            fds: HashMap::new(),
            listeners: HashMap::new(),
            next_id: 1,
            blocked: HashSet::new(),
            down: HashSet::new(),
            delivered: 0,
            damage_one_in: 0,
            damaged: 0,
            damage_rng: 0x9e37_79b9_7f4a_7c15,
        }))
    }

    /// Cut the link between nodes `a` and `b`: segments wait, connects time out.
    pub fn partition(&mut self, a: u32, b: u32) {
        self.blocked.insert((a, b));
        self.blocked.insert((b, a));
    }

    pub fn heal(&mut self, a: u32, b: u32) {
        self.blocked.remove(&(a, b));
        self.blocked.remove(&(b, a));
    }

    pub fn heal_all(&mut self) {
        self.blocked.clear();
    }

    pub fn is_partitioned(&self, a: u32, b: u32) -> bool {
        self.blocked.contains(&(a, b))
    }

    /// Reset every connection between `a` and `b` (both ends see ECONNRESET).
    pub fn reset_between(&mut self, a: u32, b: u32) {
        let ids: Vec<u64> = self
            .socks
            .iter()
            .filter(|(_, s)| s.node == a && s.listen.is_none())
            .filter(|(_, s)| {
                s.peer
                    .and_then(|p| self.socks.get(&p))
                    .is_some_and(|p| p.node == b)
            })
            .map(|(&i, _)| i)
            .collect();
        for i in ids {
            self.reset(i);
        }
    }

    fn reset(&mut self, id: u64) {
        let peer = self.socks.get(&id).and_then(|s| s.peer);
        for i in std::iter::once(id).chain(peer) {
            if let Some(s) = self.socks.get_mut(&i) {
                s.reset = true;
                s.inbox.clear();
            }
        }
    }

    /// Node `n` crashed: its sockets vanish (peers see a reset), its
    /// listeners are gone. Call [`SimNet::up`] when it restarts.
    pub fn crash_node(&mut self, n: u32) {
        let ids: Vec<u64> = self
            .socks
            .iter()
            .filter(|(_, s)| s.node == n)
            .map(|(&i, _)| i)
            .collect();
        for i in ids {
            self.reset(i);
            if let Some(a) = self.socks.get(&i).and_then(|s| s.listen) {
                if self.listeners.get(&a) == Some(&i) {
                    self.listeners.remove(&a);
                }
            }
            if let Some(s) = self.socks.get_mut(&i) {
                s.shut = true;
            }
        }
        self.down.insert(n);
    }

    pub fn up(&mut self, n: u32) {
        self.down.remove(&n);
    }

    fn socket(&mut self, node: u32, listen: Option<SocketAddr>) -> io::Result<OwnedFd> {
        if let Some(a) = listen {
            if self.listeners.contains_key(&a) {
                return Err(io::Error::from_raw_os_error(libc::EADDRINUSE));
            }
        }
        // SAFETY: eventfd(2) gives a fresh descriptor we own.
        let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if raw < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: as above.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let id = self.new_sock(node, listen);
        self.fds.insert(raw, id);
        if let Some(a) = listen {
            self.listeners.insert(a, id);
        }
        Ok(fd)
    }

    fn new_sock(&mut self, node: u32, listen: Option<SocketAddr>) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.socks.insert(
            id,
            SimSock {
                node,
                peer: None,
                inbox: VecDeque::new(),
                consumed: 0,
                got_fin: false,
                shut: false,
                reset: false,
                listen,
                backlog: VecDeque::new(),
            },
        );
        id
    }

    fn shutdown(&mut self, fd: RawFd) {
        let Some(&id) = self.fds.get(&fd) else {
            return;
        };
        let now = self.now + self.delay;
        let Some(s) = self.socks.get_mut(&id) else {
            return;
        };
        if s.shut {
            return;
        }
        s.shut = true;
        if let Some(a) = s.listen {
            if self.listeners.get(&a) == Some(&id) {
                self.listeners.remove(&a);
            }
            return;
        }
        if let Some(p) = s.peer {
            if let Some(ps) = self.socks.get_mut(&p) {
                ps.inbox.push_back((now, Seg::Fin));
            }
        }
    }

    fn deliverable(&self, s: &SimSock) -> bool {
        let Some((t, _)) = s.inbox.front() else {
            return false;
        };
        if *t > self.now {
            return false;
        }
        let from = s.peer.and_then(|p| self.socks.get(&p)).map(|p| p.node);
        !from.is_some_and(|f| self.blocked.contains(&(f, s.node)))
    }

    fn ready(&self, node: u32, op: &Op, at: Duration) -> bool {
        let sock = |fd: &RawFd| self.fds.get(fd).and_then(|i| self.socks.get(i));
        match op {
            Op::Timeout { ts } => {
                let d = Duration::new(ts_secs(ts), ts_nanos(ts));
                self.now >= at + d
            }
            Op::Accept { fd } => sock(fd).is_none_or(|s| s.shut || !s.backlog.is_empty()),
            Op::Connect { timeout, .. } => {
                let d = Duration::new(ts_secs(timeout), ts_nanos(timeout));
                let target = self.connect_target(op);
                match target {
                    Some(l) if self.blocked.contains(&(node, l)) => self.now >= at + d,
                    _ => self.now >= at + self.delay,
                }
            }
            Op::Recv { fd, .. } => {
                sock(fd).is_none_or(|s| s.reset || s.shut || s.got_fin || self.deliverable(s))
            }
            Op::Send { .. } => true,
            _ => true,
        }
    }

    fn connect_target(&self, op: &Op) -> Option<u32> {
        let Op::Connect { addr, .. } = op else {
            return None;
        };
        let a = sockaddr_to_std(addr)?;
        let l = self.listeners.get(&a)?;
        Some(self.socks[l].node)
    }

    /// Execute a socket op or timeout; `None` for ops that are not the
    /// network's (disk ops).
    fn execute(&mut self, node: u32, op: &mut Op, at: Duration) -> Option<i32> {
        let _ = at;
        Some(match op {
            Op::Timeout { .. } => -libc::ETIME,
            Op::Accept { fd } => {
                let Some(&id) = self.fds.get(fd) else {
                    return Some(-libc::EBADF);
                };
                let s = self.socks.get_mut(&id).unwrap();
                if s.shut {
                    return Some(-libc::EINVAL);
                }
                let Some(conn) = s.backlog.pop_front() else {
                    return Some(-libc::EAGAIN);
                };
                // SAFETY: eventfd(2) gives a fresh descriptor; the caller
                // takes ownership of it from the completion.
                let raw = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
                if raw < 0 {
                    return Some(-libc::EMFILE);
                }
                self.fds.insert(raw, conn);
                raw
            }
            Op::Connect { fd, .. } => {
                let Some(&id) = self.fds.get(fd) else {
                    return Some(-libc::EBADF);
                };
                let target = self.connect_target(op);
                match target {
                    None => -libc::ECONNREFUSED,
                    Some(l) if self.down.contains(&l) => -libc::ECONNREFUSED,
                    Some(l) if self.blocked.contains(&(node, l)) => -libc::ECANCELED,
                    Some(l) => {
                        let Op::Connect { addr, .. } = op else {
                            unreachable!()
                        };
                        let a = sockaddr_to_std(addr).unwrap();
                        let lid = self.listeners[&a];
                        let server = self.new_sock(l, None);
                        self.socks.get_mut(&server).unwrap().peer = Some(id);
                        self.socks.get_mut(&id).unwrap().peer = Some(server);
                        self.socks.get_mut(&lid).unwrap().backlog.push_back(server);
                        0
                    }
                }
            }
            Op::Send { fd, buf, at } => {
                let Some(&id) = self.fds.get(fd) else {
                    return Some(-libc::EBADF);
                };
                let s = &self.socks[&id];
                if s.reset {
                    return Some(-libc::ECONNRESET);
                }
                if s.shut {
                    return Some(-libc::EPIPE);
                }
                let Some(p) = s.peer else {
                    return Some(-libc::ENOTCONN);
                };
                let when = self.now + self.delay;
                let mut data = buf[*at..].to_vec();
                let n = data.len() as i32;
                if self.damage_one_in > 0 && !data.is_empty() {
                    let mut roll = || {
                        // xorshift64: the damage is reproducible per run.
                        let mut x = self.damage_rng;
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        self.damage_rng = x;
                        x
                    };
                    if roll() % self.damage_one_in < data.len() as u64 {
                        let at = (roll() % data.len() as u64) as usize;
                        data[at] ^= 1 << (roll() % 8);
                        self.damaged += 1;
                    }
                }
                if let Some(ps) = self.socks.get_mut(&p) {
                    if !ps.shut && !ps.reset {
                        ps.inbox.push_back((when, Seg::Data(data)));
                    }
                }
                n
            }
            Op::Recv { fd, buf, at, end } => {
                let Some(&id) = self.fds.get(fd) else {
                    return Some(-libc::EBADF);
                };
                let deliverable = self.deliverable(&self.socks[&id]);
                let s = self.socks.get_mut(&id).unwrap();
                if s.reset {
                    return Some(-libc::ECONNRESET);
                }
                if s.shut || s.got_fin {
                    return Some(0);
                }
                if !deliverable {
                    return Some(-libc::EAGAIN);
                }
                let room = *end - *at;
                let mut n = 0;
                while n < room && !s.inbox.is_empty() {
                    let (t, seg) = s.inbox.front().unwrap();
                    if *t > self.now {
                        break;
                    }
                    match seg {
                        Seg::Fin => {
                            if n == 0 {
                                s.got_fin = true;
                                s.inbox.pop_front();
                            }
                            break;
                        }
                        Seg::Data(d) => {
                            let take = (d.len() - s.consumed).min(room - n);
                            buf[*at + n..*at + n + take]
                                .copy_from_slice(&d[s.consumed..s.consumed + take]);
                            n += take;
                            s.consumed += take;
                            if s.consumed == d.len() {
                                s.consumed = 0;
                                s.inbox.pop_front();
                            }
                        }
                    }
                }
                self.delivered += n as u64;
                n as i32
            }
            _ => return None,
        })
    }
}

fn ts_secs(ts: &io_uring::types::Timespec) -> u64 {
    // Timespec has no getters; it is two plain integers.
    // SAFETY: Timespec is repr(C) { tv_sec: i64, tv_nsec: i64 }.
    let raw: &[i64; 2] = unsafe { &*(ts as *const _ as *const [i64; 2]) };
    raw[0] as u64
}

fn ts_nanos(ts: &io_uring::types::Timespec) -> u32 {
    // SAFETY: as in `ts_secs`.
    let raw: &[i64; 2] = unsafe { &*(ts as *const _ as *const [i64; 2]) };
    raw[1] as u32
}

fn sockaddr_to_std(a: &crate::io::SockAddr) -> Option<SocketAddr> {
    match a.storage.ss_family as i32 {
        libc::AF_INET => {
            // SAFETY: the family says it is a sockaddr_in.
            let sin = unsafe { &*(&a.storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::from((
                std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)),
                u16::from_be(sin.sin_port),
            )))
        }
        _ => None,
    }
}

/// Create the three files of a fresh replica in `sim`, the way `store::dir::init`
/// lays them out: a zeroed data file of `size` bytes, a zeroed journal of
/// `journal_size` bytes, and a meta file with the superblock in slot 0 and an
/// all-zero checksum table (= an all-zero disk). Everything is durable.
pub fn init_replica(sim: &mut SimIo, size: u64, journal_size: u64) -> (Files, Superblock) {
    init_replica_node(sim, size, journal_size, 1)
}

/// [`init_replica`] for node `node_id` of the same volume.
pub fn init_replica_node(
    sim: &mut SimIo,
    size: u64,
    journal_size: u64,
    node_id: u32,
) -> (Files, Superblock) {
    let sb = Superblock {
        version: FORMAT_VERSION,
        block_size: BLOCK_SIZE as u32,
        volume_uuid: [0x5a; 16],
        node_id,
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
