//! The I/O seam: every disk and network operation of the driver goes through
//! the [`Io`] trait as an owned, completion-based [`Op`].
//!
//! Owns: the operation vocabulary and the io_uring backend ([`UringIo`]). The
//! simulated backend lives in `sim`. Callers hand over their buffers with the op
//! and get them back in the [`Completion`], so a buffer is never freed or reused
//! while the kernel may still touch it. This module never interprets data and
//! never retries: a short transfer or an error is the caller's to handle.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use io_uring::{opcode, squeue, types, IoUring};

/// Bytes to write: owned, or shared with an in-memory cache (journal records
/// are written from the same buffer the read overlay serves from).
#[derive(Debug, Clone)]
pub enum WriteBuf {
    Owned(Vec<u8>),
    Shared(Arc<Vec<u8>>),
}

impl WriteBuf {
    pub fn as_slice(&self) -> &[u8] {
        match self {
            WriteBuf::Owned(v) => v,
            WriteBuf::Shared(a) => a,
        }
    }
}

/// One operation. Offsets are file offsets; `at` is a position inside `buf`.
#[derive(Debug)]
pub enum Op {
    Accept {
        fd: RawFd,
    },
    /// Receive into `buf[at..end]`.
    Recv {
        fd: RawFd,
        buf: Vec<u8>,
        at: usize,
        end: usize,
    },
    /// Send `buf[at..]`.
    Send {
        fd: RawFd,
        buf: Vec<u8>,
        at: usize,
    },
    /// Read into `buf[at..]` from file offset `offset`.
    Read {
        fd: RawFd,
        buf: Vec<u8>,
        at: usize,
        offset: u64,
    },
    /// Write `buf[start..end]` at file offset `offset`.
    Write {
        fd: RawFd,
        buf: WriteBuf,
        start: usize,
        end: usize,
        offset: u64,
    },
    /// fdatasync (or fsync when `datasync` is false).
    Fsync {
        fd: RawFd,
        datasync: bool,
    },
    /// fallocate(mode, offset, len).
    Fallocate {
        fd: RawFd,
        mode: i32,
        offset: u64,
        len: u64,
    },
    /// connect(2) to `addr`, cancelled (-ECANCELED) if not done within
    /// `timeout` (a link timeout, so a black-holed peer cannot hang it).
    Connect {
        fd: RawFd,
        addr: Box<SockAddr>,
        timeout: Box<types::Timespec>,
    },
    /// Completes after the duration (result -ETIME).
    Timeout {
        ts: Box<types::Timespec>,
    },
    /// posix_fadvise(POSIX_FADV_DONTNEED) over `[offset, offset+len)`: drop
    /// the clean cached pages of that range. A hint: data never changes.
    /// It runs on the ring (an io-wq worker: it may start write-back and
    /// wait for every CPU's page lists), so a caller that wants it done
    /// before a write waits for its completion.
    DropCache {
        fd: RawFd,
        offset: u64,
        len: u64,
    },
}

/// A socket address in the form connect(2) takes.
pub struct SockAddr {
    pub storage: libc::sockaddr_storage,
    pub len: libc::socklen_t,
}

impl std::fmt::Debug for SockAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SockAddr({} bytes)", self.len)
    }
}

impl SockAddr {
    pub fn from_std(a: &std::net::SocketAddr) -> SockAddr {
        // SAFETY: sockaddr_storage is plain old data; all-zero is valid.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let len = match a {
            std::net::SocketAddr::V4(v4) => {
                // SAFETY: sockaddr_storage is large and aligned enough for sockaddr_in.
                let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
                sin.sin_family = libc::AF_INET as libc::sa_family_t;
                sin.sin_port = v4.port().to_be();
                sin.sin_addr.s_addr = u32::from_ne_bytes(v4.ip().octets());
                std::mem::size_of::<libc::sockaddr_in>()
            }
            std::net::SocketAddr::V6(v6) => {
                // SAFETY: as above, for sockaddr_in6.
                let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
                sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
                sin6.sin6_port = v6.port().to_be();
                sin6.sin6_addr.s6_addr = v6.ip().octets();
                sin6.sin6_flowinfo = v6.flowinfo();
                sin6.sin6_scope_id = v6.scope_id();
                std::mem::size_of::<libc::sockaddr_in6>()
            }
        };
        SockAddr {
            storage,
            len: len as libc::socklen_t,
        }
    }
}

/// user_data of the link-timeout entries that guard connects; their
/// completions are not reported.
const LINK_TIMEOUT_UD: u64 = u64::MAX;

impl Op {
    pub fn connect(fd: RawFd, addr: &std::net::SocketAddr, timeout: Duration) -> Op {
        Op::Connect {
            fd,
            addr: Box::new(SockAddr::from_std(addr)),
            timeout: Box::new(
                types::Timespec::new()
                    .sec(timeout.as_secs())
                    .nsec(timeout.subsec_nanos()),
            ),
        }
    }

    pub fn timeout(d: Duration) -> Op {
        Op::Timeout {
            ts: Box::new(
                types::Timespec::new()
                    .sec(d.as_secs())
                    .nsec(d.subsec_nanos()),
            ),
        }
    }
}

/// A finished operation: the caller's token, the kernel-style result (bytes or
/// a negative errno) and the op with its buffers.
#[derive(Debug)]
pub struct Completion {
    pub token: u64,
    pub result: i32,
    pub op: Op,
}

/// The seam between the driver and the world. Implementations: [`UringIo`]
/// (real) and `sim::SimIo` (deterministic, fault-injecting).
pub trait Io {
    /// Queue an operation; its completion carries `token`.
    fn submit(&mut self, token: u64, op: Op);
    /// Push queued ops to the kernel and collect finished ones into `out`,
    /// blocking until at least `min` are available (or `timeout` passes).
    fn wait(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> io::Result<()>;
    /// The current time. The simulated backend runs a virtual clock.
    fn now(&self) -> std::time::Instant {
        std::time::Instant::now()
    }

    /// A new TCP socket (with TCP_NODELAY) to connect with.
    fn tcp_socket(&mut self, v6: bool) -> io::Result<OwnedFd> {
        let family = if v6 { libc::AF_INET6 } else { libc::AF_INET };
        // SAFETY: plain socket(2).
        let fd = unsafe { libc::socket(family, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        crate::server::set_nodelay(fd.as_raw_fd());
        // Its TIME_WAIT then does not keep a listener from binding its port
        // (as an accepted socket's does not, inheriting the listener's
        // SO_REUSEADDR). That matters when it connected to itself (see
        // `server::connected_to_itself`): its port is the peer's.
        crate::server::set_reuseaddr(fd.as_raw_fd());
        Ok(fd)
    }

    /// A listening TCP socket bound to `addr`.
    fn tcp_listen(&mut self, addr: std::net::SocketAddr) -> io::Result<OwnedFd> {
        Ok(OwnedFd::from(crate::server::bind_tcp(addr)?))
    }

    /// shutdown(SHUT_RDWR): pending operations on the socket complete.
    fn shutdown(&mut self, fd: RawFd) {
        // SAFETY: shutdown(2) on a descriptor the caller owns.
        unsafe { libc::shutdown(fd, libc::SHUT_RDWR) };
    }

    /// Inline data-file writes so far that made the loop wait (see
    /// `UringIo::inline_piece_fds`); 0 for backends that never wait.
    fn loop_write_stalls(&self) -> u64 {
        0
    }

    /// How many bytes of `[offset, offset+len)` of file `fd` are in the
    /// page cache, or `None` when the backend cannot tell (the simulated
    /// disk has no page cache; kernels before 6.5 lack cachestat(2)). A
    /// synchronous query, for start-up only.
    fn cached_bytes(&mut self, _fd: RawFd, _offset: u64, _len: u64) -> Option<u64> {
        None
    }

    /// The parts of `[offset, offset+len)` of file `fd` that the filesystem
    /// says may hold data (SEEK_DATA/SEEK_HOLE), as sorted, disjoint
    /// `(start, end)` ranges; everything else is a hole and reads as
    /// zeroes. At most `max_ranges` ranges are listed: the last one then
    /// runs to the end, as it does from where the filesystem fails to
    /// answer. `None` when the backend cannot tell at all. A synchronous
    /// query (an extent-tree lookup, no data read).
    fn data_ranges(
        &mut self,
        _fd: RawFd,
        _offset: u64,
        _len: u64,
        _max_ranges: usize,
    ) -> Option<Vec<(u64, u64)>> {
        None
    }

    /// Run one op to completion. Only for start-up and shutdown paths where
    /// nothing else is in flight.
    fn run(&mut self, op: Op) -> Completion {
        const TOKEN: u64 = u64::MAX;
        self.submit(TOKEN, op);
        let mut out = Vec::new();
        loop {
            out.clear();
            if let Err(e) = self.wait(1, None, &mut out) {
                // Cannot happen for a healthy ring; report it as the op failing.
                let code = e.raw_os_error().unwrap_or(libc::EIO);
                panic!("io backend failed while running a synchronous op: {code}");
            }
            if let Some(pos) = out.iter().position(|c| c.token == TOKEN) {
                return out.swap_remove(pos);
            }
        }
    }
}

/// The io_uring backend: one ring, owned by one thread.
pub struct UringIo {
    ring: IoUring,
    slots: Vec<Option<(u64, Op)>>,
    free: Vec<usize>,
    /// Writes to `inline_write_fds` queued by `submit`, run at the next
    /// `wait` (see `run_inline`).
    inline: Vec<(u64, Op)>,
    /// Completions of the inline writes, delivered by `wait`.
    ready: Vec<Completion>,
    /// Files whose positional writes are executed by the loop itself with
    /// pwrite(2)/pwritev(2) (queued at submission, run at the next `wait`)
    /// instead of through the ring. ext4 cannot do buffered writes
    /// without blocking, so io_uring hands each one to an io-wq worker thread:
    /// two context switches per write, which costs more than the copy into the
    /// page cache for small latency-critical writes (the journal). Adjacent
    /// writes of one batch go as one pwritev. The completion is delivered
    /// through `wait` either way, so callers cannot tell the difference.
    pub inline_write_fds: Vec<RawFd>,
    /// Files whose writes run inline too (the data file: applying the
    /// journal, in-place pieces), but each as its own pwrite(2) (never
    /// merged with its neighbours: the store sizes its page-cache writes to
    /// at most one piece, and a merged write would make larger folios, see
    /// docs/design.md "Large folios"), only those of at most
    /// [`INLINE_PIECE_MAX`], at most [`INLINE_BATCH_BUDGET`] of them per
    /// `wait`, and only while they are quick.
    /// One that takes longer than [`INLINE_STALL`] (the kernel made the
    /// writer wait: dirty-page throttling, write-back of the folio) sends
    /// writes to these files through the ring for [`INLINE_BACKOFF`], so a
    /// slow disk stalls io-wq workers instead of the loop and every client
    /// with it (the first such write of a batch stalls the loop; the rest of
    /// the batch goes to the ring too). See docs/design.md, "Data-file
    /// writes on the loop".
    pub inline_piece_fds: Vec<RawFd>,
    /// Until when writes to `inline_piece_fds` go through the ring.
    inline_backoff_until: Option<std::time::Instant>,
    /// How often an inline piece write was slow (for tests and probes).
    pub inline_stalls: u64,
    /// What counts as slow ([`INLINE_STALL`]; tests lower it).
    pub inline_stall: Duration,
    /// [`INLINE_BATCH_BUDGET`] (tests change it).
    pub inline_batch_budget: Duration,
    /// Before `wait` blocks, poll the ring for completions this long (zero:
    /// block at once). The caller sets it per wait (see `server`, "poll").
    pub spin: Duration,
}

/// io_uring_enter flag: reap completions (and, with DEFER_TASKRUN, run the
/// deferred work that posts them).
const IORING_ENTER_GETEVENTS: u32 = 1;

impl UringIo {
    pub fn new(entries: u32) -> io::Result<UringIo> {
        // One thread submits and reaps (the loop); completion work runs when
        // it waits instead of interrupting it (fewer context switches).
        let ring = IoUring::builder()
            .setup_cqsize(entries * 4)
            .setup_single_issuer()
            .setup_defer_taskrun()
            .build(entries)
            .or_else(|_| IoUring::builder().setup_cqsize(entries * 4).build(entries))?;
        Ok(UringIo {
            ring,
            slots: Vec::new(),
            free: Vec::new(),
            inline: Vec::new(),
            ready: Vec::new(),
            inline_write_fds: Vec::new(),
            inline_piece_fds: Vec::new(),
            inline_backoff_until: None,
            inline_stalls: 0,
            inline_stall: INLINE_STALL,
            inline_batch_budget: INLINE_BATCH_BUDGET,
            spin: Duration::ZERO,
        })
    }

    /// Pin the calling thread (the loop) and the ring's io-wq workers to
    /// `cpu`. The workers then share the loop's core and cache instead of
    /// being woken on another core for every file write.
    pub fn pin_to_cpu(&mut self, cpu: usize) -> io::Result<()> {
        // SAFETY: a zeroed cpu_set_t is a valid empty set.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
        if cpu >= max {
            return Err(io::Error::other(format!(
                "no such CPU (at most {})",
                max - 1
            )));
        }
        // SAFETY: `cpu` is within the set (checked above).
        unsafe { libc::CPU_SET(cpu, &mut set) };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `set` is a valid cpu_set_t of `size` bytes.
        if unsafe { libc::sched_setaffinity(0, size, &set) } != 0 {
            let err = io::Error::last_os_error();
            return Err(io::Error::other(format!(
                "cannot run on that CPU ({err}); this process may use CPUs {}",
                allowed_cpus()
            )));
        }
        self.ring
            .submitter()
            .register_iowq_aff(&set)
            .map_err(|e| io::Error::other(format!("cannot pin the io-wq workers: {e}")))
    }

    fn entry(idx: u64, op: &mut Op) -> squeue::Entry {
        let e = match op {
            Op::Accept { fd } => {
                opcode::Accept::new(types::Fd(*fd), std::ptr::null_mut(), std::ptr::null_mut())
                    .flags(libc::SOCK_CLOEXEC)
                    .build()
            }
            Op::Recv { fd, buf, at, end } => {
                let s = &mut buf[*at..*end];
                opcode::Recv::new(types::Fd(*fd), s.as_mut_ptr(), s.len() as u32).build()
            }
            Op::Send { fd, buf, at } => {
                let s = &buf[*at..];
                opcode::Send::new(types::Fd(*fd), s.as_ptr(), s.len() as u32)
                    .flags(libc::MSG_NOSIGNAL)
                    .build()
            }
            Op::Read {
                fd,
                buf,
                at,
                offset,
            } => {
                let s = &mut buf[*at..];
                opcode::Read::new(types::Fd(*fd), s.as_mut_ptr(), s.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Write {
                fd,
                buf,
                start,
                end,
                offset,
            } => {
                let s = &buf.as_slice()[*start..*end];
                opcode::Write::new(types::Fd(*fd), s.as_ptr(), s.len() as u32)
                    .offset(*offset)
                    .build()
            }
            Op::Fsync { fd, datasync } => {
                let flags = if *datasync {
                    types::FsyncFlags::DATASYNC
                } else {
                    types::FsyncFlags::empty()
                };
                opcode::Fsync::new(types::Fd(*fd)).flags(flags).build()
            }
            Op::Fallocate {
                fd,
                mode,
                offset,
                len,
            } => opcode::Fallocate::new(types::Fd(*fd), *len)
                .offset(*offset)
                .mode(*mode)
                .build(),
            Op::DropCache { fd, offset, len } => opcode::Fadvise::new(
                types::Fd(*fd),
                *len as libc::off_t,
                libc::POSIX_FADV_DONTNEED,
            )
            .offset(*offset)
            .build(),
            Op::Timeout { ts } => opcode::Timeout::new(&**ts as *const types::Timespec).build(),
            Op::Connect { fd, addr, .. } => opcode::Connect::new(
                types::Fd(*fd),
                &addr.storage as *const libc::sockaddr_storage as *const libc::sockaddr,
                addr.len,
            )
            .build()
            .flags(squeue::Flags::IO_LINK),
        };
        e.user_data(idx)
    }
}

/// The CPUs this process may run on, as a list like "0-3,6".
fn allowed_cpus() -> String {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
        })
        .unwrap_or_else(|| "(unknown)".into())
}

/// The fd, file offset and bytes of an inline write.
fn inline_write(op: &Op) -> (RawFd, u64, &[u8]) {
    match op {
        Op::Write {
            fd,
            buf,
            start,
            end,
            offset,
        } => (*fd, *offset, &buf.as_slice()[*start..*end]),
        _ => unreachable!("only writes are run inline"),
    }
}

/// Bytes a write op writes (0 for other ops).
fn op_len(op: &Op) -> usize {
    match op {
        Op::Write { start, end, .. } => end - start,
        _ => 0,
    }
}

/// pwrite(2) of `s` at `offset`: bytes written or -errno.
fn pwrite_one(fd: RawFd, offset: u64, s: &[u8]) -> i64 {
    // SAFETY: `s` is a live, initialised slice for the whole call.
    let r = unsafe {
        libc::pwrite(
            fd,
            s.as_ptr() as *const libc::c_void,
            s.len(),
            offset as i64,
        )
    };
    if r < 0 {
        -(io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EIO) as i64)
    } else {
        r as i64
    }
}

/// cachestat(2) (Linux 6.5): 451 in the common syscall table; the few
/// architectures that number it otherwise report "cannot tell".
#[cfg(not(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64")))]
const SYS_CACHESTAT: Option<libc::c_long> = Some(451);
#[cfg(any(target_arch = "mips", target_arch = "mips64", target_arch = "sparc64"))]
const SYS_CACHESTAT: Option<libc::c_long> = None;

#[repr(C)]
struct CachestatRange {
    off: u64,
    len: u64,
}

#[repr(C)]
#[derive(Default)]
struct Cachestat {
    nr_cache: u64,
    nr_dirty: u64,
    nr_writeback: u64,
    nr_evicted: u64,
    nr_recently_evicted: u64,
}

/// Bytes of `[offset, offset+len)` of `fd` in the page cache (cachestat(2)),
/// or `None` if the kernel cannot say.
fn cachestat_bytes(fd: RawFd, offset: u64, len: u64) -> Option<u64> {
    if len == 0 {
        // cachestat reads a zero length as "to the end of the file".
        return Some(0);
    }
    let nr = SYS_CACHESTAT?;
    let range = CachestatRange { off: offset, len };
    let mut cs = Cachestat::default();
    // SAFETY: both pointers refer to live, correctly laid out structs for
    // the whole call; the kernel writes only `cs`.
    let r = unsafe {
        libc::syscall(
            nr,
            fd,
            &range as *const CachestatRange,
            &mut cs as *mut Cachestat,
            0u32,
        )
    };
    if r != 0 {
        return None;
    }
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(cs.nr_cache.saturating_mul(page.max(1) as u64))
}

/// [`Io::data_ranges`] by lseek(2): SEEK_DATA finds the next byte that may
/// hold data, SEEK_HOLE the end of that data. Every descriptor of this crate
/// does positional I/O only, so moving the file offset disturbs nothing.
fn seek_data_ranges(
    fd: RawFd,
    offset: u64,
    len: u64,
    max_ranges: usize,
) -> Option<Vec<(u64, u64)>> {
    let end = offset.checked_add(len)?;
    let mut out: Vec<(u64, u64)> = Vec::new();
    let mut pos = offset;
    while pos < end {
        if out.len() + 1 >= max_ranges.max(1) {
            // Enough asked: the rest counts as data (never as a hole).
            out.push((pos, end));
            break;
        }
        // SAFETY: lseek has no memory arguments.
        let d = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
        if d < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no data from `pos` to the end of the file
            }
            // Cannot tell: the rest counts as data (never as a hole).
            out.push((pos, end));
            break;
        }
        let d = d as u64;
        if d >= end {
            break;
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(fd, d as libc::off_t, libc::SEEK_HOLE) };
        if h < 0 {
            out.push((d, end));
            break;
        }
        let h = (h as u64).clamp(d + 1, end);
        out.push((d, h));
        pos = h;
    }
    Some(out)
}

/// At most this many writes go in one pwritev (IOV_MAX on Linux).
const MAX_IOV: usize = 1024;

/// An inline write to `UringIo::inline_piece_fds` slower than this (a 64
/// KiB copy into the page cache takes about 10 us) means the kernel made
/// the loop wait ...
pub const INLINE_STALL: Duration = Duration::from_millis(2);
/// ... and such writes then go through the ring for this long.
pub const INLINE_BACKOFF: Duration = Duration::from_secs(1);
/// Writes to `UringIo::inline_piece_fds` longer than this go through the
/// ring: the store's page-cache writes are pieces of at most 64 KiB
/// (`store::PAGE_CACHE_PIECE`), and the rare longer ones (repairs, zeroes
/// written out where the filesystem cannot zero a range) would hold the
/// loop for the whole copy.
pub const INLINE_PIECE_MAX: usize = 64 << 10;
/// Once one `wait` has spent this long on inline piece writes, the rest of
/// its batch goes through the ring: a batch of many quick writes (applying
/// tens of MiB of journal) would otherwise hold the loop for milliseconds
/// without any single write tripping [`INLINE_STALL`].
pub const INLINE_BATCH_BUDGET: Duration = Duration::from_millis(1);

impl UringIo {
    /// Hand `op` to the kernel through the ring.
    fn submit_ring(&mut self, token: u64, op: Op) {
        let idx = match self.free.pop() {
            Some(i) => i,
            None => {
                self.slots.push(None);
                self.slots.len() - 1
            }
        };
        self.slots[idx] = Some((token, op));
        // The op now lives in the slot until its completion: its buffers (heap
        // allocations, and the boxed timespec) do not move while the kernel
        // uses them.
        let entry = Self::entry(idx as u64, &mut self.slots[idx].as_mut().unwrap().1);
        let link_timeout = match &self.slots[idx].as_ref().unwrap().1 {
            Op::Connect { timeout, .. } => Some(
                opcode::LinkTimeout::new(&**timeout as *const types::Timespec)
                    .build()
                    .user_data(LINK_TIMEOUT_UD),
            ),
            _ => None,
        };
        if link_timeout.is_some() {
            // The pair must go into the queue together.
            while {
                let sq = self.ring.submission();
                sq.capacity() - sq.len() < 2
            } {
                let _ = self.ring.submit();
            }
        }
        for entry in std::iter::once(entry).chain(link_timeout) {
            loop {
                // SAFETY: every pointer in `entry` refers to memory owned by
                // the op stored in `self.slots[idx]`, which is only dropped
                // after the kernel posts the completion for `idx`.
                let pushed = unsafe { self.ring.submission().push(&entry) };
                if pushed.is_ok() {
                    break;
                }
                // Submission queue full: hand what we have to the kernel.
                let _ = self.ring.submit();
            }
        }
    }

    /// Whether writes to `inline_piece_fds` go through the ring for now.
    pub fn inline_backing_off(&mut self) -> bool {
        match self.inline_backoff_until {
            Some(t) if std::time::Instant::now() < t => true,
            Some(_) => {
                self.inline_backoff_until = None;
                false
            }
            None => false,
        }
    }

    /// Run the queued inline writes. A run of writes to one file, each
    /// starting where the one before ended (journal records appended in a
    /// loop turn), goes as one pwritev: one syscall and one pass through
    /// the filesystem's write path instead of one per record. If the
    /// pwritev fails or comes up short, every write of the run is redone on
    /// its own, so each completion carries its own result.
    fn run_inline(&mut self) {
        if self.inline.is_empty() {
            return;
        }
        let ops = std::mem::take(&mut self.inline);
        // None: a piece write handed to the ring instead (backing off).
        let mut results: Vec<Option<i64>> = Vec::with_capacity(ops.len());
        let mut iov: Vec<libc::iovec> = Vec::new();
        // Piece writes are timed with one clock read each (the end of one
        // is the start of the next, unless other writes came between);
        // a batch without piece writes reads no clock at all.
        let mut pieces_start: Option<std::time::Instant> = None;
        let mut now: Option<std::time::Instant> = None;
        let mut i = 0;
        while i < ops.len() {
            let (fd, first, s) = inline_write(&ops[i].1);
            if self.inline_piece_fds.contains(&fd) {
                let t = now.unwrap_or_else(std::time::Instant::now);
                let since = *pieces_start.get_or_insert(t);
                // After a slow one, the rest of the batch goes to the ring
                // too: at most one stalled piece write per back-off. So does
                // what is left of a long batch.
                if self.inline_backoff_until.is_some_and(|until| t < until)
                    || t - since >= self.inline_batch_budget
                {
                    results.push(None);
                    now = Some(t);
                } else {
                    results.push(Some(pwrite_one(fd, first, s)));
                    let end = std::time::Instant::now();
                    if end - t >= self.inline_stall {
                        self.inline_stalls += 1;
                        self.inline_backoff_until = Some(end + INLINE_BACKOFF);
                    }
                    now = Some(end);
                }
                i += 1;
                continue;
            }
            now = None;
            let mut next = first + s.len() as u64;
            let mut j = i + 1;
            while j < ops.len() && j - i < MAX_IOV {
                let (f, off, s) = inline_write(&ops[j].1);
                if f != fd || off != next {
                    break;
                }
                next += s.len() as u64;
                j += 1;
            }
            if j - i == 1 {
                results.push(Some(pwrite_one(fd, first, s)));
                i = j;
                continue;
            }
            iov.clear();
            iov.extend(ops[i..j].iter().map(|(_, op)| {
                let s = inline_write(op).2;
                libc::iovec {
                    iov_base: s.as_ptr() as *mut libc::c_void,
                    iov_len: s.len(),
                }
            }));
            // SAFETY: every iovec points into a buffer owned by an op in
            // `ops`, alive and unmoved for the whole call.
            let r = unsafe { libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, first as i64) };
            if r >= 0 && r as u64 == next - first {
                results.extend(iov.iter().map(|v| Some(v.iov_len as i64)));
            } else {
                for (_, op) in &ops[i..j] {
                    let (fd, off, s) = inline_write(op);
                    results.push(Some(pwrite_one(fd, off, s)));
                }
            }
            i = j;
        }
        for ((token, op), r) in ops.into_iter().zip(results) {
            let Some(r) = r else {
                self.submit_ring(token, op);
                continue;
            };
            self.ready.push(Completion {
                token,
                result: r.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
                op,
            });
        }
    }
}

impl Io for UringIo {
    fn loop_write_stalls(&self) -> u64 {
        self.inline_stalls
    }

    fn cached_bytes(&mut self, fd: RawFd, offset: u64, len: u64) -> Option<u64> {
        cachestat_bytes(fd, offset, len)
    }

    fn data_ranges(
        &mut self,
        fd: RawFd,
        offset: u64,
        len: u64,
        max_ranges: usize,
    ) -> Option<Vec<(u64, u64)>> {
        seek_data_ranges(fd, offset, len, max_ranges)
    }

    fn submit(&mut self, token: u64, op: Op) {
        if let Op::Write { fd, .. } = &op {
            if self.inline_write_fds.contains(fd)
                || (self.inline_piece_fds.contains(fd)
                    && op_len(&op) <= INLINE_PIECE_MAX
                    && !self.inline_backing_off())
            {
                self.inline.push((token, op));
                return;
            }
        }
        self.submit_ring(token, op);
    }

    fn wait(
        &mut self,
        min: usize,
        timeout: Option<Duration>,
        out: &mut Vec<Completion>,
    ) -> io::Result<()> {
        self.run_inline();
        let inline = self.ready.len();
        out.append(&mut self.ready);
        let ready = self.ring.completion().len() + inline;
        let mut want = min.saturating_sub(ready);
        if want > 0 && !self.spin.is_zero() {
            // Poll before sleeping: a halted vCPU (or a deep C-state) takes
            // tens of microseconds to wake, longer than a client at queue
            // depth 1 takes to send its next request.
            let t0 = std::time::Instant::now();
            let _ = self.ring.submit();
            loop {
                // SAFETY: a plain io_uring_enter with no argument.
                let _ = unsafe {
                    self.ring.submitter().enter::<libc::sigset_t>(
                        0,
                        0,
                        IORING_ENTER_GETEVENTS,
                        None,
                    )
                };
                if !self.ring.completion().is_empty() {
                    want = 0;
                    break;
                }
                if t0.elapsed() >= self.spin {
                    break;
                }
                std::hint::spin_loop();
            }
        }
        let res = match timeout {
            Some(d) if want > 0 => {
                let ts = types::Timespec::new()
                    .sec(d.as_secs())
                    .nsec(d.subsec_nanos());
                let args = types::SubmitArgs::new().timespec(&ts);
                self.ring.submitter().submit_with_args(want, &args)
            }
            _ => self.ring.submit_and_wait(want),
        };
        match res {
            Ok(_) => {}
            Err(e)
                if e.raw_os_error() == Some(libc::ETIME)
                    || e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) => {}
            Err(e) => return Err(e),
        }
        for cqe in self.ring.completion() {
            if cqe.user_data() == LINK_TIMEOUT_UD {
                continue;
            }
            let idx = cqe.user_data() as usize;
            let (token, op) = self.slots[idx]
                .take()
                .expect("completion for an unknown slot");
            self.free.push(idx);
            out.push(Completion {
                token,
                result: cqe.result(),
                op,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    fn write(fd: RawFd, offset: u64, bytes: &[u8]) -> Op {
        Op::Write {
            fd,
            buf: WriteBuf::Owned(bytes.to_vec()),
            start: 0,
            end: bytes.len(),
            offset,
        }
    }

    fn wait_all(io: &mut UringIo, n: usize) -> Vec<Completion> {
        let mut out = Vec::new();
        while out.len() < n {
            io.wait(n - out.len(), None, &mut out).unwrap();
        }
        out.sort_by_key(|c| c.token);
        out
    }

    /// An empty file in the temp dir, open for reading and writing.
    fn scratch_file(name: &str) -> (std::path::PathBuf, std::fs::File) {
        let path = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        (path, f)
    }

    #[test]
    fn inline_writes_are_coalesced_and_each_gets_its_own_result() {
        let (path, f) = scratch_file("nbdm-io");
        let fd = f.as_raw_fd();
        let mut io = UringIo::new(8).unwrap();
        io.inline_write_fds.push(fd);
        // A run of three adjacent writes, a gap, then one more.
        io.submit(1, write(fd, 0, b"aaaa"));
        io.submit(2, write(fd, 4, b"bb"));
        io.submit(3, write(fd, 6, b"cccccc"));
        io.submit(4, write(fd, 20, b"dd"));
        let done = wait_all(&mut io, 4);
        let got: Vec<(u64, i32)> = done.iter().map(|c| (c.token, c.result)).collect();
        assert_eq!(got, vec![(1, 4), (2, 2), (3, 6), (4, 2)]);
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..12], b"aaaabbcccccc");
        assert_eq!(&data[12..20], &[0u8; 8]);
        assert_eq!(&data[20..], b"dd");

        // A descriptor opened read-only: every write of the run fails on
        // its own with EBADF.
        let ro = std::fs::File::open(&path).unwrap();
        let rfd = ro.as_raw_fd();
        io.inline_write_fds.push(rfd);
        io.submit(5, write(rfd, 0, b"x"));
        io.submit(6, write(rfd, 1, b"y"));
        let done = wait_all(&mut io, 2);
        assert!(done.iter().all(|c| c.result == -libc::EBADF), "{done:?}");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn long_piece_writes_and_long_batches_go_to_the_ring() {
        let (path, f) = scratch_file("nbdm-io-long");
        let fd = f.as_raw_fd();
        let mut io = UringIo::new(8).unwrap();
        io.inline_piece_fds.push(fd);
        io.inline_stall = Duration::from_secs(3600);
        // Longer than a piece: the ring.
        let big = vec![7u8; INLINE_PIECE_MAX + 4096];
        io.submit(1, write(fd, 0, &big));
        assert!(io.inline.is_empty(), "a long write went inline");
        let done = wait_all(&mut io, 1);
        assert_eq!(done[0].result, big.len() as i32);
        // A batch over its budget: queued inline, handed to the ring.
        io.inline_batch_budget = Duration::ZERO;
        io.submit(2, write(fd, 0, b"aaaa"));
        io.submit(3, write(fd, 4, b"bbbb"));
        assert_eq!(io.inline.len(), 2);
        let done = wait_all(&mut io, 2);
        let got: Vec<(u64, i32)> = done.iter().map(|c| (c.token, c.result)).collect();
        assert_eq!(got, vec![(2, 4), (3, 4)]);
        assert!(!io.inline_backing_off(), "a long batch is no stall");
        let data = std::fs::read(&path).unwrap();
        assert_eq!(&data[..8], b"aaaabbbb");
        assert_eq!(data.len(), big.len());
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn slow_inline_piece_writes_send_the_next_ones_to_the_ring() {
        let (path, f) = scratch_file("nbdm-io-piece");
        let fd = f.as_raw_fd();
        let mut io = UringIo::new(8).unwrap();
        io.inline_piece_fds.push(fd);
        // (No write counts as slow on a loaded machine for now.)
        io.inline_stall = Duration::from_secs(3600);
        // Adjacent piece writes run inline, each on its own.
        io.submit(1, write(fd, 0, b"aaaa"));
        io.submit(2, write(fd, 4, b"bbbb"));
        assert_eq!(io.inline.len(), 2);
        let done = wait_all(&mut io, 2);
        let got: Vec<(u64, i32)> = done.iter().map(|c| (c.token, c.result)).collect();
        assert_eq!(got, vec![(1, 4), (2, 4)]);
        assert_eq!(io.inline_stalls, 0);
        assert!(!io.inline_backing_off());
        // Every write counts as slow now: of a batch queued together, the
        // first still runs inline and the rest go through the ring, as do
        // later ones, with the same results.
        io.inline_stall = Duration::ZERO;
        io.submit(3, write(fd, 8, b"cccc"));
        io.submit(4, write(fd, 12, b"dddd"));
        assert_eq!(io.inline.len(), 2);
        let done = wait_all(&mut io, 2);
        let got: Vec<(u64, i32)> = done.iter().map(|c| (c.token, c.result)).collect();
        assert_eq!(got, vec![(3, 4), (4, 4)]);
        assert_eq!(io.inline_stalls, 1, "only the first ran inline");
        assert!(io.inline_backing_off());
        io.submit(5, write(fd, 16, b"eeee"));
        assert!(io.inline.is_empty(), "went inline while backing off");
        let done = wait_all(&mut io, 1);
        assert_eq!((done[0].token, done[0].result), (5, 4));
        assert_eq!(std::fs::read(&path).unwrap(), b"aaaabbbbccccddddeeee");
        std::fs::remove_file(&path).unwrap();
    }
}
