//! The NBD front end: listeners, connections and the event loop that joins
//! them to the replica store.
//!
//! Owns: accepting connections (TCP, Unix, systemd socket activation),
//! feeding received bytes to the `nbd` state machines, turning requests into
//! store calls, sending replies in completion order, back-pressure per
//! connection, and graceful shutdown on SIGINT/SIGTERM/SIGHUP (finish in-flight
//! requests, flush, checkpoint, exit 0). It holds no disk state of its own and
//! never decides durability: that is the store's.
//!
//! Beside it: `sockets` (binding listeners, socket activation, socket
//! options) and `limits` (the per-tick deadlines and memory limits that keep
//! one client from holding up the others).

mod limits;
mod sockets;

pub use sockets::{bind_tcp, socket_activation_fds};
pub(crate) use sockets::{connected_to_itself, set_nodelay, set_reuseaddr};
use sockets::{open_listener, remove_dead_sockets};

use std::collections::VecDeque;

use crate::idmap::IdMap;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::Duration;

use nbd::consts::*;
use nbd::transmission::{self as tx, REQUEST_HEADER_LEN};
use nbd::{
    Command, Decoded, ExportInfo, Handshake, HandshakeEnd, HandshakeStatus, Request, RequestRules,
};

use crate::io::{Completion, Io, Op, UringIo};
use crate::mirror::{self, Mirror, MirrorConfig};
use crate::store::{self, dir, Store, StoreEvent, Tuning, STORE_TOKEN, WRITE_HEADROOM};

/// Largest request payload accepted (advertised as the maximum block size).
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Requests one connection may have in flight before we stop reading from it.
const MAX_INFLIGHT: usize = 256;
/// Bytes of replies queued on one connection (counted with
/// [`REPLY_OVERHEAD`] per queued buffer) before we stop reading from it.
const MAX_QUEUED_REPLY_BYTES: usize = 32 << 20;
/// What a queued reply buffer costs beyond its bytes (allocation and queue
/// slot), so that a flood of 16-byte replies is counted at what it holds.
const REPLY_OVERHEAD: usize = 64;
/// Small replies are appended to the last queued buffer while it is shorter
/// than this: a client that pipelines without reading costs 16 bytes per
/// reply, not an allocation each.
const APPEND_REPLY_MAX: usize = 64 << 10;
/// Queued replies are gathered into one send up to this many bytes.
const GATHER_SEND_MAX: usize = 4 << 20;
/// Memory (payloads in flight plus replies not yet sent) one connection may
/// hold before we stop reading from it.
const MAX_CONN_INFLIGHT_BYTES: usize = 64 << 20;
/// The same budget for the whole server. Once it is spent, a connection
/// holding at least [`CONN_RESERVED_BYTES`] reads no more until memory
/// frees; one holding less may still start a request, so clients that stall
/// with large payloads, or leave their replies unread, cannot hold others
/// to one request at a time (a well-behaved client at queue depth 64 of 4
/// KiB writes keeps its depth). That leaves at most one maximum-size
/// payload per connection outside the budget: a payload's memory is only
/// touched as it arrives, so a client that stalls after a WRITE header
/// costs little, but one that sends all but the last byte of 32 MiB and
/// stalls holds them (nbdkit has the same exposure).
const MAX_TOTAL_INFLIGHT_BYTES: usize = 512 << 20;
/// What a connection may hold whatever the server-wide budget says.
const CONN_RESERVED_BYTES: usize = 1 << 20;
/// Recycled payload buffers kept for reuse, and the largest one kept.
const POOL_BUFFERS: usize = 16;
const POOL_MAX_BUFFER: usize = (4 << 20) + 4096;
const RECV_BUF: usize = 256 * 1024;
/// A connection's input buffer until its handshake is done (it grows if an
/// option needs more): connections that never finish one cost little.
const HANDSHAKE_RECV_BUF: usize = 4096;
/// Receive size right after a payload too large for the input buffer.
const SMALL_RECV: usize = 4096;
/// A WRITE payload up to this long that is not all in the input buffer yet
/// waits there for the next receive (then one copy out) instead of getting
/// a receive of its own: with 4 KiB writes at QD32 the sink made two
/// receives per request (header and most of the payload, then the rest),
/// about 1.4 receive syscalls more per write than needed.
const INLINE_PAYLOAD: usize = 64 * 1024;
const TICK: Duration = Duration::from_millis(20);
/// How long, after a shutdown signal, requests that arrive are answered
/// with ESHUTDOWN (the spec's soft disconnect) before connections close.
const REFUSE_WINDOW: Duration = Duration::from_secs(2);
/// How long a client may take from connecting to finishing the handshake
/// (qemu-nbd's default `--handshake-limit`).
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(10);
/// While the server is over its memory budget ([`MAX_TOTAL_INFLIGHT_BYTES`]),
/// a connection that holds at least [`CONN_RESERVED_BYTES`] and has taken
/// no byte of its replies, or sent no byte of a WRITE payload it started,
/// for this long is closed: without it, each client that pipelines large
/// READs and never reads (or stalls inside a large payload) keeps one
/// maximum-size request beyond the budget for ever, and enough of them
/// exhaust the machine's memory. A client that reads or sends at any pace
/// is never closed, nor is any client while memory is to spare.
const STALL_LIMIT: Duration = Duration::from_secs(30);
/// Connections closed before the heap's free memory is given back.
const TRIM_AFTER_CLOSES: usize = 64;
/// A tick this late means the loop itself stood still (see
/// `Server::enforce_stall_limit`).
const STALL_TICK_LATE: Duration = Duration::from_secs(1);
/// How long shutdown waits for clients to take their replies.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long a listener waits after an accept failed for want of
/// descriptors or memory.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// At most one log line per this long about failed accepts.
const ACCEPT_LOG_EVERY: Duration = Duration::from_secs(10);

/// Failed accepts of one kind of listener. Accepting again at once after
/// EMFILE, ENFILE, ENOBUFS or ENOMEM fails again at once: the loop would
/// spin and the log fill the disk (a tester saw 12 MB a second with the
/// descriptors used up). So such a failure pauses the listener for
/// [`ACCEPT_BACKOFF`], and failures are logged once per
/// [`ACCEPT_LOG_EVERY`] with their number.
#[derive(Default)]
pub(crate) struct AcceptBackoff {
    until: Option<std::time::Instant>,
    failures: u64,
    logged: Option<std::time::Instant>,
}

impl AcceptBackoff {
    /// An accept of `what` failed with errno `e`: log it (or count it), and
    /// say whether the listener must wait before accepting again.
    pub(crate) fn failed(&mut self, what: &str, e: i32) -> bool {
        let now = std::time::Instant::now();
        self.failures += 1;
        if self
            .logged
            .is_none_or(|t| now.duration_since(t) >= ACCEPT_LOG_EVERY)
        {
            let n = std::mem::take(&mut self.failures);
            let more = if n > 1 {
                format!(
                    " ({n} failures in the last {} s)",
                    ACCEPT_LOG_EVERY.as_secs()
                )
            } else {
                String::new()
            };
            let hint = if matches!(e, libc::EMFILE | libc::ENFILE) {
                "; new connections wait (raise the open-files limit, `ulimit -n`)"
            } else {
                ""
            };
            crate::elog!(
                "nbdmirror: {what} failed: {}{more}{hint}",
                std::io::Error::from_raw_os_error(e)
            );
            self.logged = Some(now);
        }
        // Errors of one pending connection (accept(2) passes the network's
        // on) are retried at once; anything else (no descriptors or memory,
        // or a listener that cannot accept at all) waits, or the loop spins.
        let pause = !matches!(
            e,
            libc::ECONNABORTED
                | libc::EINTR
                | libc::EAGAIN
                | libc::EPROTO
                | libc::EPERM
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENONET
        );
        if pause {
            self.until = Some(now + ACCEPT_BACKOFF);
        }
        pause
    }

    /// Whether a paused listener may accept again.
    pub(crate) fn over(&mut self) -> bool {
        if self.until.is_some_and(|t| std::time::Instant::now() < t) {
            return false;
        }
        self.until = None;
        true
    }
}
/// Most extents in one BLOCK_STATUS reply, and most bytes one looks at: the
/// answer is worked out on the event loop (two lseeks per extent of the
/// data file), so every other client waits for it. 4096 extents took 12.5
/// ms on a fragmented disk, and four clients mapping it in a loop took
/// another client's write p99 from 7 to 68 ms (a tester); 1024 take about
/// 3. A reply may cover less than was asked (the spec allows it; clients
/// ask again from where it ended).
const MAX_EXTENTS: usize = 1024;
const MAX_STATUS_BYTES: u64 = 1 << 30;

const KIND_SHIFT: u64 = 56;
const KIND_LISTENER: u64 = 1;
const KIND_CONN_RECV: u64 = 2;
const KIND_CONN_SEND: u64 = 3;
const KIND_SIGNAL: u64 = 4;
const KIND_TICK: u64 = 5;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;

fn token(kind: u64, id: u64) -> u64 {
    (kind << KIND_SHIFT) | (id & ID_MASK)
}

/// Where to listen.
#[derive(Clone, Debug)]
pub enum Listen {
    Tcp(SocketAddr),
    Unix(PathBuf),
    /// An already-bound listening socket (systemd socket activation).
    Fd(RawFd),
}

#[derive(Clone, Debug)]
pub struct ServeConfig {
    pub dir: PathBuf,
    pub listen: Vec<Listen>,
    pub export_name: String,
    pub tuning: Tuning,
    /// Mirroring (roles, peers, secret); `None` for a single node.
    pub mirror: Option<MirrorConfig>,
    /// Whether large writes go to the data file with O_DIRECT.
    pub direct_writes: DirectWrites,
    /// `serve --cpu`: the CPU the loop and its io-wq workers are pinned to.
    pub cpu: Option<usize>,
    /// `serve --poll-us`: how long the loop polls before it sleeps while
    /// few requests are in flight (see [`POLL_MAX_INFLIGHT`]).
    pub poll: Duration,
}

/// The loop polls (`ServeConfig::poll`) only while at most this many client
/// requests are in flight: a latency-bound client (one request at a time)
/// sends its next one within microseconds, while at higher queue depths
/// there is work to do anyway and polling would only take CPU from the
/// client and the kernel's workers.
pub const POLL_MAX_INFLIGHT: usize = 2;
/// ... and only this soon after the last client or peer completion, so an
/// idle node sleeps.
const POLL_WINDOW: Duration = Duration::from_millis(1);

/// `serve --direct-writes`: whether in-place writes bypass the page cache
/// (see `Store::set_direct_fd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum DirectWrites {
    /// The page cache on every node, as `off` (it was O_DIRECT on a
    /// secondary until the twenty-second session measured that slower:
    /// docs/mirroring.md, "The write path (primary)").
    Auto,
    On,
    Off,
}

enum Phase {
    Handshake(Box<Handshake>),
    Transmission(RequestRules),
}

/// A WRITE whose payload is still arriving.
struct PayloadSink {
    req: Request,
    buf: Vec<u8>,
    filled: usize,
}

struct Conn {
    fd: OwnedFd,
    phase: Phase,
    inbuf: Vec<u8>,
    start: usize,
    filled: usize,
    /// The receive buffer (inbuf or the payload sink) is lent to the kernel.
    recv_in_flight: bool,
    sink: Option<PayloadSink>,
    discard: u64,
    /// The error reply of a rejected request, sent once its payload (a
    /// WRITE's) has been read and discarded: a client still sending the
    /// payload (libnbd) takes a reply to a command it has not finished
    /// sending as a protocol error.
    after_discard: Option<Vec<u8>>,
    outq: VecDeque<Vec<u8>>,
    /// Bytes of replies queued or being sent, with [`REPLY_OVERHEAD`] per
    /// buffer (also counted in `Server::total_out_bytes`).
    out_bytes: usize,
    /// The part of `out_bytes` the send in flight carries.
    sending_bytes: usize,
    send_in_flight: bool,
    inflight: usize,
    inflight_bytes: usize,
    /// No more requests will be read (EOF, DISC, protocol error, shutdown).
    reading_done: bool,
    /// Close without waiting for queued output (hard disconnect).
    abort: bool,
    shut: bool,
    /// `process_input` is on the stack for this connection.
    parsing: bool,
    /// The client closed its side; buffered requests are still answered.
    eof: bool,
    /// The last request's payload was received into its own buffer.
    after_large: bool,
    /// Shutting down: new requests get ESHUTDOWN until the client leaves
    /// or [`REFUSE_WINDOW`] ends.
    refusing: bool,
    /// When it was accepted (for the handshake time limit).
    opened: std::time::Instant,
    /// When the send in flight was submitted or last took bytes, and when
    /// a receive last brought some (for [`STALL_LIMIT`]).
    sent_at: std::time::Instant,
    received_at: std::time::Instant,
    /// The send queue's length (SIOCOUTQ) when first looked at while the
    /// send in flight, begun or last progressed at the `Instant`, stalled.
    outq_sample: Option<(std::time::Instant, libc::c_int)>,
}

impl Conn {
    /// Memory the connection holds: payloads in flight, replies not sent.
    fn held(&self) -> usize {
        self.inflight_bytes + self.out_bytes
    }

    /// Give the input buffer the transmission phase's size (nothing is
    /// lent to the kernel while this runs: no receive is in flight). A
    /// fresh zeroed allocation, not a resize, which writes all 256 KiB at
    /// once (calloc leaves fresh pages untouched until used; reused heap
    /// memory it clears).
    fn grow_inbuf(&mut self) {
        if self.inbuf.len() >= RECV_BUF {
            return;
        }
        let mut b = vec![0u8; RECV_BUF];
        let rest = self.filled - self.start;
        b[..rest].copy_from_slice(&self.inbuf[self.start..self.filled]);
        self.inbuf = b;
        self.start = 0;
        self.filled = rest;
    }

    /// Whether it holds as much as one connection may: no more requests
    /// are read from it until some of that is done or sent.
    fn over_budget(&self) -> bool {
        self.inflight >= MAX_INFLIGHT
            || self.out_bytes >= MAX_QUEUED_REPLY_BYTES
            || self.held() >= MAX_CONN_INFLIGHT_BYTES
    }
}

/// Read repairs a client read may go through before it fails with EIO:
/// this many, plus one per run a repair covers (bad blocks spread over a
/// 32 MiB read take up to 32 repairs).
const MAX_READ_REPAIRS: u64 = 8;

fn max_read_repairs(len: u64) -> u64 {
    MAX_READ_REPAIRS + len.div_ceil(mirror::wire::MAX_REPAIR_BLOCKS as u64 * 4096)
}

struct PendingReq {
    conn: u64,
    cookie: u64,
    command: Command,
    offset: u64,
    structured: bool,
    /// Bytes of memory budget this request holds.
    cost: usize,
    /// Read repairs tried for it (see `Server::reply_read`).
    repairs: u8,
}

pub struct Server {
    io: UringIo,
    /// See [`ServeConfig::poll`]; zero on a secondary (no client waits on
    /// it directly, and at queue depth 1 the primary's poll is what counts).
    poll: Duration,
    /// A read refused on an inconsistent secondary was logged (once per
    /// stretch of refusals).
    inconsistent_reads_logged: bool,
    /// This node runs as a secondary.
    secondary: bool,
    /// When the last completion other than the tick arrived.
    last_active: std::time::Instant,
    /// When the loop's current batch of completions came back (the clock
    /// for per-connection stall times; one reading per batch).
    batch_time: std::time::Instant,
    /// When [`Server::enforce_stall_limit`] last ran.
    last_stall_check: std::time::Instant,
    /// Connections closed since the allocator last gave memory back (see
    /// [`Server::trim_memory`]), and when that was.
    closed_since_trim: usize,
    last_trim: std::time::Instant,
    store: Store,
    /// The O_DIRECT descriptor of the data file the store writes through.
    _direct: Option<std::fs::File>,
    /// The data file's O_DIRECT read descriptor (see `Store::set_media_fd`).
    _media: Option<std::fs::File>,
    /// The data file's descriptor for page-cache writes left to the ring's
    /// workers (see `Store::set_worker_data_fd`).
    _worker_data: Option<OwnedFd>,
    mirror: Option<Mirror>,
    exports: Vec<ExportInfo>,
    listeners: Vec<OwnedFd>,
    /// The Unix sockets this server created, with the (device, inode) each
    /// had: removed at exit if the path still names that socket.
    unix_sockets: Vec<(PathBuf, (u64, u64))>,
    conns: IdMap<u64, Conn>,
    next_conn: u64,
    pending: IdMap<u64, PendingReq>,
    next_req: u64,
    signal_fd: OwnedFd,
    /// Log lines about reads that fail for want of a repair (a client can
    /// trigger them at will, as the store's checksum-failure lines).
    repair_log: crate::log::Limiter,
    /// Log lines about connections refused in the handshake: anyone who
    /// can connect can make them (a tester's loop of bad handshakes wrote
    /// 42 MB of log in 5 s).
    conn_log: crate::log::Limiter,
    shutting_down: bool,
    shutdown_since: Option<std::time::Instant>,
    events: Vec<StoreEvent>,
    /// Payload bytes held by all in-flight requests.
    total_inflight_bytes: usize,
    /// `out_bytes` of every connection: replies not sent yet.
    total_out_bytes: usize,
    accept_backoff: AcceptBackoff,
    /// Listeners whose accept waits for the back-off to end.
    accept_paused: Vec<usize>,
    /// Connections that stopped reading because the server-wide budget ran out.
    starved: Vec<u64>,
    /// Large payload buffers for reuse.
    pool: Vec<Vec<u8>>,
}

/// The signals that stop the server cleanly: SIGTERM and SIGINT always;
/// SIGHUP unless it was ignored when the process started (`nohup`): the
/// kernel queues a blocked signal even when it is ignored, so blocking it
/// to read it from the signalfd would turn a hang-up that `nohup` meant to
/// ignore into a shutdown.
///
/// SIGINT is taken even when ignored at start, as nbdkit and qemu-nbd do: a
/// non-interactive shell starts its background jobs with SIGINT ignored,
/// so a script's `nbdmirror serve ... &` and later `kill -INT $!` (a
/// tester's) waited forever, while both reference servers stopped.
fn stop_signals() -> libc::sigset_t {
    // SAFETY: plain libc calls on a local sigset and sigaction.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        let mut old: libc::sigaction = std::mem::zeroed();
        let ignored = libc::sigaction(libc::SIGHUP, std::ptr::null(), &mut old) == 0
            && old.sa_sigaction == libc::SIG_IGN;
        if !ignored {
            libc::sigaddset(&mut set, libc::SIGHUP);
        }
        set
    }
}

/// Block the stop signals (read from a signalfd instead, see
/// [`stop_signals`]) and SIGPIPE in this thread, and so in every thread
/// and io_uring worker it starts later.
fn block_termination_signals() -> Result<(), String> {
    let mut set = stop_signals();
    // SAFETY: plain libc calls on a local sigset.
    unsafe {
        libc::sigaddset(&mut set, libc::SIGPIPE);
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err("cannot block signals".into());
        }
    }
    Ok(())
}

fn block_signals() -> Result<OwnedFd, String> {
    block_termination_signals()?;
    let only = stop_signals();
    // SAFETY: a libc call on a local sigset; the returned fd is owned.
    unsafe {
        let fd = libc::signalfd(-1, &only, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(format!("signalfd: {}", std::io::Error::last_os_error()));
        }
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Why a replica whose crash recovery could not vouch for `how_many` of
/// its blocks is not promoted, and what to do instead.
fn unvouched_refusal(dir: &std::path::Path, how_many: &str) -> String {
    format!(
        "{}: crash recovery could not vouch for {how_many} of this replica's blocks (listed in \
         {}), and no primary has resent them: their checksums were rebuilt from whatever the \
         data file held, and served as the primary it would copy them over every peer. Promote \
         a node that was in sync instead (`nbdmirror info` shows each replica's state), or start \
         this one as a secondary so its primary resends them, or, if this replica is the only \
         copy left, pass --force-inconsistent",
        dir.display(),
        store::uncertain::Uncertain::path(dir).display()
    )
}

impl Server {
    pub fn new(config: ServeConfig, replica: &dir::ReplicaDir) -> Result<Server, String> {
        let mut io = UringIo::new(1024).map_err(|e| format!("cannot set up io_uring: {e}"))?;
        if let Some(cpu) = config.cpu {
            io.pin_to_cpu(cpu)
                .map_err(|e| format!("--cpu {cpu}: {e}"))?;
            crate::elog!("nbdmirror: event loop and its io-wq workers pinned to CPU {cpu}");
        }
        // Listen first: a port that cannot be had is refused before recovery
        // touches the replica (it bumps the epoch in the superblock).
        let mut listeners = Vec::new();
        let mut unix_sockets = Vec::new();
        for l in &config.listen {
            listeners.push(open_listener(l)?);
            if let Listen::Unix(path) = l {
                use std::os::unix::fs::MetadataExt;
                if let Ok(m) = std::fs::symlink_metadata(path) {
                    unix_sockets.push((path.clone(), (m.dev(), m.ino())));
                }
            }
        }
        // The same for the peer port, and a generation file that cannot be
        // read is refused here too, before recovery writes anything.
        let mut peer_listener = None;
        let mut admin = None;
        let generation = match &config.mirror {
            Some(m) => {
                // A damaged split-brain mark is refused here too, before
                // recovery replays the journal (Mirror::new reads it again
                // after recovery; a tester saw the refusal come only once
                // recovery had rewritten meta and the journal).
                mirror::generation::Diverged::load(&m.dir)?;
                Some(mirror::generation::Generation::load(&m.dir)?)
            }
            None => None,
        };
        // A follower's replica served as the primary (a promotion) tracks
        // the blocks its recovery cannot vouch for, as a secondary does:
        // whether it may be promoted must not depend on whether it was
        // restarted as a secondary first (a tester saw a replica refused
        // after that start and promoted without it).
        let promoting = config
            .mirror
            .as_ref()
            .zip(generation)
            .is_some_and(|(m, g)| {
                m.role == mirror::NodeRole::Primary
                    && g.current != 0
                    && g.flags & mirror::generation::FLAG_PRIMARY == 0
            });
        if let (Some(m), Some(g)) = (&config.mirror, generation) {
            if m.role == mirror::NodeRole::Primary {
                g.refuse_inconsistent_promotion(m.force_inconsistent)
                    .map_err(|e| {
                        if store::uncertain::Uncertain::path(&m.dir).exists() {
                            unvouched_refusal(&m.dir, "some")
                        } else {
                            format!("{}: {e}", m.dir.display())
                        }
                    })?;
            }
            if let Some(a) = m.peer_listen {
                peer_listener = Some(mirror::bind_peer_listener(&mut io, a)?);
            }
            admin = Some(mirror::bind_admin_socket(m.admin_socket.as_deref()));
        }
        let files = replica.files();
        // Journal appends are on the reply path: do them inline (see io.rs).
        io.inline_write_fds.push(files.journal);
        let sb = store::load_superblock(&mut io, files.meta)
            .map_err(|e| format!("{}: {e}; refusing to serve it", replica.path.display()))?;
        dir::check_sizes(replica, &sb)?;
        if let Some(m) = config
            .mirror
            .as_ref()
            .filter(|m| m.role == mirror::NodeRole::Primary)
        {
            // Before recovery writes anything.
            mirror::refuse_left_out_peers(m, sb.node_id)?;
            // A damaged peer bitmap is refused here too (Mirror::new opens
            // them again after recovery); opening changes no byte of it.
            for &(id, _) in &m.peers {
                if m.dir.join(format!("peer-{id}.bitmap")).exists() {
                    mirror::bitmap::DirtyBitmap::open_or_create(
                        &m.dir,
                        &sb.volume_uuid,
                        id,
                        sb.size,
                    )?;
                }
            }
        }
        // Only a secondary keeps blocks recovery could not vouch for: its
        // primary settles them (see `store::uncertain`). A set left by a
        // run as a secondary means nothing to a primary (one promoted with
        // --force-inconsistent): it goes, or a later run as a secondary
        // would distrust blocks written since. A promotion keeps it until
        // its own recovery has counted it (below): a secondary's start may
        // have saved it and stopped before it marked the replica.
        if let Some(m) = config
            .mirror
            .as_ref()
            .filter(|m| m.role == mirror::NodeRole::Primary && !promoting)
        {
            let p = store::uncertain::Uncertain::path(&m.dir);
            if p.exists() {
                crate::elog!(
                    "nbdmirror: removing {}: a primary keeps its own copy of the blocks it lists",
                    p.display()
                );
                std::fs::remove_file(&p)
                    .map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
            }
        }
        let tracking = config
            .mirror
            .as_ref()
            .filter(|m| m.role == mirror::NodeRole::Secondary || promoting)
            .map(|_| replica.path.as_path());
        let mut store = Store::open_tracking(&mut io, files, sb, config.tuning, tracking)
            .map_err(|e| format!("{}: recovery failed: {e}", replica.path.display()))?;
        if let (Some(m), Some(mut g)) = (config.mirror.as_ref().filter(|_| promoting), generation) {
            let n = store.uncertain_count();
            if n > 0 && !m.force_inconsistent {
                // Kept as a secondary's start would keep them: the set is
                // saved, and the replica is marked inconsistent, so that
                // `info` and a later start say the same.
                g.flags |= mirror::generation::FLAG_INCONSISTENT;
                g.store(&m.dir)?;
                return Err(unvouched_refusal(&m.dir, &n.to_string()));
            }
            if n > 0 {
                crate::elog!(
                    "nbdmirror: WARNING: promoting a replica whose crash recovery could not vouch \
                     for {n} blocks (--force-inconsistent): its peers will be made to match them"
                );
            }
            // A primary keeps its own copy (see above); an emptied set's
            // file is removed.
            store.settle_all();
        }
        let secondary = config
            .mirror
            .as_ref()
            .is_some_and(|m| m.role == mirror::NodeRole::Secondary);
        let direct = match config.direct_writes {
            DirectWrites::Off | DirectWrites::Auto => None,
            DirectWrites::On => Some(dir::open_direct(replica)?),
        };
        store.set_direct_fd(direct.as_ref().map(|f| f.as_raw_fd()));
        // A scrub reads the disk itself, not the page cache.
        let media = match dir::open_media(replica) {
            Ok(f) => Some(f),
            Err(e) => {
                crate::elog!("nbdmirror: {e}; a scrub reads through the page cache");
                None
            }
        };
        store.set_media_fd(media.as_ref().map(|f| f.as_raw_fd()));
        // Data-file writes (applying the journal, in-place pieces) run on
        // the loop, except one in-place piece in four, which goes to the
        // workers through a second descriptor so that another CPU shares
        // the copying (docs/design.md, "Data-file writes on the loop").
        // Without that descriptor (dup failing: out of descriptors) every
        // piece runs on the loop; with O_DIRECT in-place writes none is
        // needed.
        io.inline_piece_fds.push(files.data);
        let worker_data = match direct {
            Some(_) => None,
            // SAFETY: `files.data` is open for as long as the store lives.
            None => unsafe { std::os::fd::BorrowedFd::borrow_raw(files.data) }
                .try_clone_to_owned()
                .ok(),
        };
        store.set_worker_data_fd(worker_data.as_ref().map(|f| f.as_raw_fd()));
        let mirror = match &config.mirror {
            Some(m) => Some(Mirror::with_listener(
                m.clone(),
                &mut store,
                &mut io,
                peer_listener.take(),
                admin.take(),
            )?),
            None => None,
        };
        let read_only = mirror
            .as_ref()
            .is_some_and(|m| m.role() == mirror::NodeRole::Secondary);
        // A read-only export offers no command that writes (as `nbdkit -r`);
        // FUA stays, since it is valid on every command.
        let writes = if read_only {
            TFLAG_READ_ONLY
        } else {
            TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES | TFLAG_SEND_FAST_ZERO
        };
        let flags = writes
            | TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_DF
            | TFLAG_CAN_MULTI_CONN
            | TFLAG_SEND_CACHE;
        let export = ExportInfo {
            name: config.export_name.clone(),
            description: format!(
                "nbdmirror volume {}",
                dir::format_uuid(&store.superblock().volume_uuid)
            ),
            size: store.size(),
            flags,
            min_block: 1,
            preferred_block: 4096,
            max_block: MAX_PAYLOAD,
        };
        let signal_fd = block_signals()?;
        let poll = if secondary {
            Duration::ZERO
        } else {
            config.poll
        };
        Ok(Server {
            secondary,
            io,
            poll,
            inconsistent_reads_logged: false,
            last_active: std::time::Instant::now(),
            batch_time: std::time::Instant::now(),
            last_stall_check: std::time::Instant::now(),
            closed_since_trim: 0,
            last_trim: std::time::Instant::now(),
            store,
            _direct: direct,
            _media: media,
            _worker_data: worker_data,
            mirror,
            exports: vec![export],
            listeners,
            unix_sockets,
            conns: IdMap::default(),
            next_conn: 1,
            pending: IdMap::default(),
            next_req: 1,
            signal_fd,
            repair_log: crate::log::Limiter::new(
                "reads failed with EIO for want of a repair",
                Duration::from_secs(10),
                10,
            ),
            conn_log: crate::log::Limiter::new(
                "connections closed in the handshake",
                Duration::from_secs(10),
                20,
            ),
            shutting_down: false,
            shutdown_since: None,
            events: Vec::new(),
            total_inflight_bytes: 0,
            total_out_bytes: 0,
            accept_backoff: AcceptBackoff::default(),
            accept_paused: Vec::new(),
            starved: Vec::new(),
            pool: Vec::new(),
        })
    }

    pub fn run(mut self) -> Result<(), String> {
        for (i, l) in self.listeners.iter().enumerate() {
            self.io.submit(
                token(KIND_LISTENER, i as u64),
                Op::Accept { fd: l.as_raw_fd() },
            );
        }
        self.io.submit(
            token(KIND_SIGNAL, 0),
            Op::Read {
                fd: self.signal_fd.as_raw_fd(),
                buf: vec![0u8; std::mem::size_of::<libc::signalfd_siginfo>()],
                at: 0,
                offset: u64::MAX,
            },
        );
        self.io.submit(token(KIND_TICK, 0), Op::timeout(TICK));
        if let Some(m) = self.mirror.as_mut() {
            m.start(&mut self.io);
        }
        let mut completions = Vec::with_capacity(256);
        loop {
            completions.clear();
            self.io.spin = if !self.poll.is_zero()
                && self.pending.len() <= POLL_MAX_INFLIGHT
                && self.last_active.elapsed() < POLL_WINDOW
            {
                self.poll
            } else {
                Duration::ZERO
            };
            self.io
                .wait(1, None, &mut completions)
                .map_err(|e| format!("io_uring wait failed: {e}"))?;
            self.batch_time = std::time::Instant::now();
            if completions.iter().any(|c| c.token != token(KIND_TICK, 0)) {
                self.last_active = self.batch_time;
            }
            for c in completions.drain(..) {
                self.dispatch(c);
            }
            self.deliver_store_events();
            if let Some(m) = self.mirror.as_mut() {
                m.flush_sends(&mut self.io);
            }
            if !self.shutting_down && self.secondary && self.store.failure().is_some() {
                // A secondary whose store failed would take every session
                // and fail its first write, so its primary would reconnect
                // to it forever while redundancy stays lost. It stops (exit
                // status 1) instead: a restart, once the disk is fixed or
                // has space, replays the journal and resyncs what the
                // primary recorded in its bitmap meanwhile.
                crate::elog!(
                    "nbdmirror: this secondary cannot store writes any more; stopping so that \
                     a restart (after the disk is fixed or has free space) recovers it and \
                     resyncs from the primary"
                );
                let why = self.store.failure().unwrap_or_default().to_string();
                if let Some(m) = self.mirror.as_mut() {
                    m.store_failed(&mut self.io, &why);
                }
                self.begin_shutdown();
            }
            if self.shutting_down
                && self.conns.is_empty()
                && self.mirror.as_ref().is_none_or(|m| m.quiet())
            {
                self.store.drain(&mut self.io);
                self.deliver_store_events();
                if self.store.is_quiet() || self.store.failure().is_some() {
                    let ok = self.store.failure().is_none();
                    if let Some(m) = self.mirror.as_mut() {
                        if m.start_handover(&mut self.io, ok) {
                            m.flush_sends(&mut self.io);
                            continue;
                        }
                    }
                    break;
                }
            }
        }
        if let Some(m) = self.mirror.as_mut() {
            m.finish(&mut self.io);
        }
        self.remove_unix_sockets();
        if let Some(why) = self.store.failure() {
            return Err(format!("stopped after a storage failure: {why}"));
        }
        crate::elog!("nbdmirror: clean shutdown; journal checkpointed");
        Ok(())
    }

    /// Remove the Unix sockets this server created, unless a path now
    /// names something else (another server started on it since).
    fn remove_unix_sockets(&mut self) {
        use std::os::unix::fs::MetadataExt;
        for (path, id) in self.unix_sockets.drain(..) {
            match std::fs::symlink_metadata(&path) {
                Ok(m) if (m.dev(), m.ino()) == id => {
                    let _ = std::fs::remove_file(&path);
                }
                _ => {}
            }
        }
    }

    fn dispatch(&mut self, c: Completion) {
        if c.token & STORE_TOKEN != 0 {
            self.store.complete(&mut self.io, c);
            return;
        }
        if mirror::is_mirror_token(c.token) {
            if let Some(m) = self.mirror.as_mut() {
                m.complete(&mut self.io, &mut self.store, c);
            }
            return;
        }
        let kind = c.token >> KIND_SHIFT;
        let id = c.token & ID_MASK;
        match kind {
            KIND_LISTENER => self.accepted(id as usize, c),
            KIND_CONN_RECV => self.received(id, c),
            KIND_CONN_SEND => self.sent(id, c),
            KIND_SIGNAL if c.result > 0 && !self.shutting_down => {
                crate::elog!(
                    "nbdmirror: signal received; finishing in-flight requests and shutting down"
                );
                self.begin_shutdown();
            }
            KIND_TICK => {
                self.store.tick(&mut self.io);
                let now = std::time::Instant::now();
                self.repair_log.log_suppressed(now);
                self.conn_log.log_suppressed(now);
                if let Some(m) = self.mirror.as_mut() {
                    m.tick(&mut self.io, &mut self.store);
                }
                if !self.shutting_down
                    && self
                        .mirror
                        .as_mut()
                        .is_some_and(|m| m.switchover_requested())
                {
                    crate::elog!(
                        "nbdmirror: switchover asked for; finishing in-flight requests, handing over to the peers and shutting down"
                    );
                    self.begin_shutdown();
                }
                self.enforce_shutdown_deadline();
                self.enforce_handshake_limit();
                self.enforce_stall_limit();
                self.trim_memory();
                self.resume_accepts();
                self.io.submit(token(KIND_TICK, 0), Op::timeout(TICK));
            }
            _ => {}
        }
    }

    fn begin_shutdown(&mut self) {
        self.shutting_down = true;
        if let Some(m) = self.mirror.as_mut() {
            m.begin_shutdown(&mut self.io);
        }
        self.shutdown_since = Some(std::time::Instant::now());
        for l in &self.listeners {
            // SAFETY: shutdown on a listening socket we own; it makes the
            // pending accept complete.
            unsafe { libc::shutdown(l.as_raw_fd(), libc::SHUT_RDWR) };
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            if let Some(conn) = self.conns.get_mut(&id) {
                // Requests already sent (pipelined) or still coming get an
                // ESHUTDOWN reply rather than silence, and options of a
                // client still in the handshake NBD_REP_ERR_SHUTDOWN, until
                // the client leaves or REFUSE_WINDOW ends.
                if !conn.reading_done {
                    if let Phase::Handshake(h) = &mut conn.phase {
                        h.shut_down();
                    }
                    conn.refusing = true;
                }
            }
            self.process_input(id);
            self.post_recv(id);
            self.maybe_close(id);
        }
    }

    fn accepted(&mut self, idx: usize, c: Completion) {
        if self.shutting_down {
            if c.result >= 0 {
                // SAFETY: a fresh descriptor from accept that nobody else owns.
                drop(unsafe { OwnedFd::from_raw_fd(c.result) });
            }
            return;
        }
        if c.result < 0 && self.accept_backoff.failed("accept", -c.result) {
            self.accept_paused.push(idx);
            return;
        }
        let lfd = self.listeners[idx].as_raw_fd();
        self.io
            .submit(token(KIND_LISTENER, idx as u64), Op::Accept { fd: lfd });
        if c.result < 0 {
            return;
        }
        // SAFETY: accept returned a new descriptor that we now own.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
        set_nodelay(fd.as_raw_fd());
        let id = self.next_conn;
        self.next_conn += 1;
        let mut greeting = Vec::with_capacity(18);
        nbd::greeting(&mut greeting);
        let conn = Conn {
            fd,
            phase: Phase::Handshake(Box::new(Handshake::new(self.exports.clone()))),
            inbuf: vec![0u8; HANDSHAKE_RECV_BUF],
            start: 0,
            filled: 0,
            recv_in_flight: false,
            sink: None,
            discard: 0,
            after_discard: None,
            outq: VecDeque::new(),
            out_bytes: 0,
            sending_bytes: 0,
            send_in_flight: false,
            inflight: 0,
            inflight_bytes: 0,
            reading_done: false,
            abort: false,
            shut: false,
            parsing: false,
            eof: false,
            after_large: false,
            refusing: false,
            opened: std::time::Instant::now(),
            sent_at: self.batch_time,
            received_at: self.batch_time,
            outq_sample: None,
        };
        self.conns.insert(id, conn);
        self.queue(id, greeting);
        self.post_recv(id);
    }

    /// Listeners paused by the accept back-off accept again.
    fn resume_accepts(&mut self) {
        if self.accept_paused.is_empty() || !self.accept_backoff.over() {
            return;
        }
        for idx in std::mem::take(&mut self.accept_paused) {
            if self.shutting_down {
                continue;
            }
            let lfd = self.listeners[idx].as_raw_fd();
            self.io
                .submit(token(KIND_LISTENER, idx as u64), Op::Accept { fd: lfd });
        }
    }

    fn post_recv(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        // While requests are being parsed the buffer is in use; the caller of
        // `process_input` posts the receive when parsing is done.
        if conn.recv_in_flight || conn.reading_done || conn.shut || conn.parsing || conn.eof {
            return;
        }
        // The rest of a payload is always received: its memory was counted
        // when its header was admitted, and only its arrival can free it
        // (starved here, a connection whose only holding is that payload
        // would wait for a wake-up that may never come).
        if conn.sink.is_none() {
            if conn.over_budget() {
                return;
            }
            if self.total_inflight_bytes + self.total_out_bytes >= MAX_TOTAL_INFLIGHT_BYTES
                && conn.held() >= CONN_RESERVED_BYTES
            {
                if !self.starved.contains(&id) {
                    self.starved.push(id);
                }
                return;
            }
        }
        let fd = conn.fd.as_raw_fd();
        let op = if let Some(sink) = conn.sink.as_mut() {
            Op::Recv {
                fd,
                end: sink.buf.len(),
                buf: std::mem::take(&mut sink.buf),
                at: sink.filled,
            }
        } else {
            if conn.start > 0 {
                conn.inbuf.copy_within(conn.start..conn.filled, 0);
                conn.filled -= conn.start;
                conn.start = 0;
            }
            if conn.filled == conn.inbuf.len() {
                conn.inbuf.resize(conn.inbuf.len() * 2, 0);
            }
            // After a large payload the next request is likely another: take
            // just its header (and a little payload) here, so the payload
            // lands in its own buffer instead of being copied out of inbuf.
            let end = if conn.after_large {
                conn.inbuf.len().min(conn.filled + SMALL_RECV)
            } else {
                conn.inbuf.len()
            };
            conn.after_large = false;
            Op::Recv {
                fd,
                buf: std::mem::take(&mut conn.inbuf),
                at: conn.filled,
                end,
            }
        };
        conn.recv_in_flight = true;
        self.io.submit(token(KIND_CONN_RECV, id), op);
    }

    fn received(&mut self, id: u64, c: Completion) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.recv_in_flight = false;
        let Op::Recv { buf, .. } = c.op else { return };
        let n = c.result;
        if n > 0 {
            conn.received_at = self.batch_time;
        }
        if let Some(sink) = conn.sink.as_mut() {
            sink.buf = buf;
            if n > 0 {
                sink.filled += n as usize;
            }
        } else {
            conn.inbuf = buf;
            if n > 0 {
                conn.filled += n as usize;
                if matches!(conn.phase, Phase::Transmission(_)) {
                    conn.grow_inbuf();
                }
            }
        }
        if n <= 0 {
            // EOF or error: nothing more will arrive. A payload cut short is
            // dropped; complete requests already buffered (a client may
            // half-close after pipelining) are still answered.
            conn.eof = true;
            if let Some(sink) = conn.sink.take() {
                let len = sink.req.length as usize;
                conn.inflight_bytes -= len;
                self.total_inflight_bytes -= len;
                self.wake_starved(id);
            }
            self.process_input(id);
            if let Some(conn) = self.conns.get_mut(&id) {
                if conn.start == conn.filled {
                    conn.reading_done = true;
                }
            }
            self.maybe_close(id);
            return;
        }
        self.process_input(id);
        self.post_recv(id);
        self.maybe_close(id);
    }

    /// Parse and start the requests buffered on connection `id`. Replies that
    /// complete at once call back into this (through `finish`); the `parsing`
    /// flag turns those calls into no-ops, because the outer loop is still
    /// running and re-checks its limits on every request. Without it a
    /// client pipelining thousands of instantly answered requests (FLUSH,
    /// CACHE, BLOCK_STATUS) recursed once per request and overflowed the stack.
    fn process_input(&mut self, id: u64) {
        match self.conns.get_mut(&id) {
            Some(conn) if !conn.parsing => conn.parsing = true,
            _ => return,
        }
        self.parse_requests(id);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.parsing = false;
        }
    }

    fn parse_requests(&mut self, id: u64) {
        loop {
            let Some(conn) = self.conns.get_mut(&id) else {
                return;
            };
            // The error reply of a rejected request goes once its payload,
            // if any, has been read and dropped.
            if conn.discard == 0 {
                if let Some(out) = conn.after_discard.take() {
                    self.queue(id, out);
                    continue;
                }
            }
            // While a receive is in flight its buffer belongs to the kernel.
            if conn.reading_done || conn.recv_in_flight {
                return;
            }
            // A WRITE payload being collected.
            if let Some(sink) = conn.sink.as_ref() {
                if sink.filled < sink.buf.len() {
                    return;
                }
                let sink = conn.sink.take().unwrap();
                conn.after_large = true;
                self.start_request(id, sink.req, Some(sink.buf), true);
                continue;
            }
            let avail = conn.filled - conn.start;
            if conn.discard > 0 {
                let n = (conn.discard as usize).min(avail);
                conn.start += n;
                conn.discard -= n as u64;
                if conn.discard > 0 {
                    return;
                }
                continue;
            }
            let (over_budget, held) = (conn.over_budget(), conn.held());
            match &mut conn.phase {
                Phase::Handshake(h) => {
                    let mut out = Vec::new();
                    let (used, status) = h.feed(&conn.inbuf[conn.start..conn.filled], &mut out);
                    conn.start += used;
                    if !out.is_empty() {
                        self.queue(id, out);
                    }
                    let conn = self.conns.get_mut(&id).unwrap();
                    match status {
                        HandshakeStatus::Continue => {
                            if conn.eof {
                                // Half an option, then the client hung up:
                                // the handshake cannot finish. Close now,
                                // not at the handshake limit (a tester's
                                // clients that sent two bytes and closed
                                // held 20000 descriptors and 5 GB that way).
                                conn.reading_done = true;
                            }
                            return;
                        }
                        HandshakeStatus::Done(neg) => {
                            conn.phase = Phase::Transmission(RequestRules::from(&neg));
                            // The handshake's small buffer grows to the
                            // transmission phase's when the first request
                            // comes (here if one is already buffered, else
                            // in `received`): an idle connection keeps 4
                            // KiB, not 256 (9000 idle clients held 2.3 GB, a
                            // tester's find).
                            if conn.filled > conn.start {
                                conn.grow_inbuf();
                            }
                        }
                        HandshakeStatus::End(end) => {
                            match end {
                                HandshakeEnd::Aborted => {}
                                HandshakeEnd::ProtocolViolation(why) => {
                                    if self.conn_log.allow(std::time::Instant::now()) {
                                        crate::elog!("nbdmirror: connection {id}: closing: {why}");
                                    }
                                    conn.abort = true;
                                }
                                // Replies to options before it still go out.
                                HandshakeEnd::ShuttingDown => {}
                                HandshakeEnd::UnknownExport(name) => {
                                    if self.conn_log.allow(std::time::Instant::now()) {
                                        crate::elog!("nbdmirror: connection {id}: unknown export {name:?}; closing");
                                    }
                                    conn.abort = true;
                                }
                            }
                            conn.reading_done = true;
                            return;
                        }
                    }
                }
                Phase::Transmission(rules) => {
                    if over_budget {
                        return;
                    }
                    // A refusing connection's requests get ESHUTDOWN and
                    // hold no memory: answer them, budget or not.
                    if self.total_inflight_bytes + self.total_out_bytes >= MAX_TOTAL_INFLIGHT_BYTES
                        && held >= CONN_RESERVED_BYTES
                        && !conn.refusing
                    {
                        if !self.starved.contains(&id) {
                            self.starved.push(id);
                        }
                        return;
                    }
                    let structured = rules.structured;
                    match rules.decode(&conn.inbuf[conn.start..conn.filled]) {
                        Decoded::NeedMore => {
                            if conn.eof {
                                // The rest is a partial request that cannot complete.
                                conn.reading_done = true;
                            }
                            return;
                        }
                        Decoded::Fatal(why) => {
                            crate::elog!(
                                "nbdmirror: connection {id}: protocol error: {why}; disconnecting"
                            );
                            conn.reading_done = true;
                            conn.abort = true;
                            return;
                        }
                        Decoded::Reject {
                            cookie,
                            command,
                            error,
                            discard,
                            reply,
                        } => {
                            conn.start += REQUEST_HEADER_LEN;
                            conn.discard = discard as u64;
                            if reply {
                                let mut out = Vec::new();
                                let msg = format!("request type {command} rejected");
                                tx::error_reply(&mut out, structured, cookie, error, &msg);
                                conn.after_discard = Some(out);
                            }
                        }
                        Decoded::Request(req)
                            if conn.refusing && req.command != Command::Disconnect =>
                        {
                            conn.start += REQUEST_HEADER_LEN;
                            let mut out = Vec::new();
                            tx::error_reply(
                                &mut out,
                                structured,
                                req.cookie,
                                ESHUTDOWN,
                                "the server is shutting down",
                            );
                            if req.command == Command::Write {
                                conn.discard = req.length as u64;
                            }
                            conn.after_discard = Some(out);
                        }
                        Decoded::Request(req) => {
                            conn.start += REQUEST_HEADER_LEN;
                            if req.command == Command::Write {
                                let len = req.length as usize;
                                let avail = conn.filled - conn.start;
                                if avail < len && len <= INLINE_PAYLOAD {
                                    // Wait for the rest in the input buffer
                                    // (RECV_BUF, far more than one such
                                    // request); the header is parsed again
                                    // then. A payload cut short by EOF is
                                    // dropped, as with a sink.
                                    conn.start -= REQUEST_HEADER_LEN;
                                    if conn.eof {
                                        conn.reading_done = true;
                                    }
                                    return;
                                }
                                let span = store::format::RecordHeader::span_for(len) as usize;
                                let want = WRITE_HEADROOM + len;
                                let need = span.max(want);
                                let fits =
                                    |b: &Vec<u8>| b.capacity() >= need && b.capacity() <= 2 * need;
                                let mut buf = match self.pool.iter().position(fits) {
                                    // Recycled buffers hold old payload bytes, which the
                                    // new payload overwrites: no zeroing, no page faults.
                                    Some(i) => self.pool.swap_remove(i),
                                    // All of it is here: copied in whole, nothing to zero.
                                    None if avail >= len => Vec::with_capacity(need),
                                    // A fresh one comes zeroed from the allocator
                                    // (large ones as untouched pages), so memory is
                                    // only used as the payload arrives: a client that
                                    // sends a 32 MiB WRITE header and stalls costs a
                                    // page, not 32 MiB (40 such connections took the
                                    // server from 244 MB to 1.4 GB when this buffer
                                    // was zero-filled by hand).
                                    None => {
                                        let mut b = vec![0u8; span.max(want)];
                                        b.truncate(want);
                                        b
                                    }
                                };
                                if avail >= len {
                                    buf.clear();
                                    buf.resize(WRITE_HEADROOM, 0);
                                    buf.extend_from_slice(
                                        &conn.inbuf[conn.start..conn.start + len],
                                    );
                                    conn.start += len;
                                    self.start_request(id, req, Some(buf), false);
                                    continue;
                                }
                                if buf.len() >= want {
                                    buf.truncate(want);
                                } else {
                                    buf.resize(want, 0);
                                }
                                let take = avail.min(len);
                                buf[WRITE_HEADROOM..WRITE_HEADROOM + take]
                                    .copy_from_slice(&conn.inbuf[conn.start..conn.start + take]);
                                conn.start += take;
                                if take < len {
                                    // The payload's memory counts against the
                                    // budgets from now on, not when complete.
                                    conn.inflight_bytes += len;
                                    self.total_inflight_bytes += len;
                                    let conn = self.conns.get_mut(&id).unwrap();
                                    conn.sink = Some(PayloadSink {
                                        req,
                                        buf,
                                        filled: WRITE_HEADROOM + take,
                                    });
                                    // Its stall clock starts now, not at
                                    // the receive that brought the header
                                    // (it may have waited for budget).
                                    conn.received_at = self.batch_time;
                                    return;
                                }
                                self.start_request(id, req, Some(buf), false);
                            } else {
                                self.start_request(id, req, None, false);
                            }
                        }
                    }
                }
            }
        }
    }

    /// `precounted`: the payload's bytes were already added to the budgets
    /// when its receive started.
    fn start_request(&mut self, id: u64, req: Request, payload: Option<Vec<u8>>, precounted: bool) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Phase::Transmission(rules) = &conn.phase else {
            return;
        };
        let structured = rules.structured;
        let context = rules.base_allocation;
        if req.command == Command::Disconnect {
            conn.reading_done = true;
            return;
        }
        let rid = self.next_req;
        self.next_req += 1;
        let cost = match req.command {
            Command::Read | Command::Write => req.length as usize,
            _ => 0,
        };
        conn.inflight += 1;
        if !precounted {
            conn.inflight_bytes += cost;
            self.total_inflight_bytes += cost;
        }
        self.pending.insert(
            rid,
            PendingReq {
                conn: id,
                cookie: req.cookie,
                command: req.command,
                offset: req.offset,
                structured,
                cost,
                repairs: 0,
            },
        );
        let io = &mut self.io;
        if let Some(m) = self.mirror.as_mut().filter(|m| m.mirrors_writes()) {
            let st = &mut self.store;
            match req.command {
                Command::Write => {
                    let buf = payload.expect("write payload");
                    m.client_write(
                        io,
                        st,
                        rid,
                        req.offset,
                        buf,
                        WRITE_HEADROOM,
                        req.length as usize,
                        req.fua(),
                    );
                    self.deliver_store_events();
                    return;
                }
                Command::Flush => {
                    m.client_flush(io, st, rid);
                    self.deliver_store_events();
                    return;
                }
                Command::Trim | Command::WriteZeroes => {
                    let trim = req.command == Command::Trim;
                    m.client_zero(
                        io,
                        st,
                        rid,
                        req.offset,
                        req.length as u64,
                        !trim && req.no_hole(),
                        req.fua(),
                        trim,
                    );
                    self.deliver_store_events();
                    return;
                }
                _ => {}
            }
        }
        // A secondary's read-only export may refuse reads (see
        // `Mirror::read_refusal`).
        let refusal = match req.command {
            Command::Read => self
                .mirror
                .as_ref()
                .and_then(|m| m.read_refusal(&self.store)),
            _ => None,
        };
        match req.command {
            Command::Read if refusal.is_some() => {
                if !std::mem::replace(&mut self.inconsistent_reads_logged, true) {
                    crate::elog!(
                        "nbdmirror: refusing reads (EIO): {}",
                        refusal.unwrap_or_default()
                    );
                }
                self.store.fail_read(rid, libc::EIO);
            }
            Command::Read => {
                self.inconsistent_reads_logged = false;
                let head = if structured {
                    tx::OFFSET_DATA_HEADER_LEN
                } else {
                    tx::SIMPLE_REPLY_LEN
                };
                self.store
                    .read(io, rid, req.offset, req.length as u64, head);
            }
            Command::Write => {
                let buf = payload.expect("write payload");
                self.store.write(
                    io,
                    rid,
                    req.offset,
                    buf,
                    WRITE_HEADROOM,
                    req.length as usize,
                    req.fua(),
                );
            }
            Command::Flush => self.store.flush(io, rid),
            Command::Trim => {
                self.store
                    .write_zeroes(io, rid, req.offset, req.length as u64, false, req.fua())
            }
            Command::WriteZeroes => self.store.write_zeroes(
                io,
                rid,
                req.offset,
                req.length as u64,
                req.no_hole(),
                req.fua(),
            ),
            Command::Cache => self.reply_status(rid, Ok(())),
            Command::BlockStatus => {
                let max = if req.req_one() { 1 } else { MAX_EXTENTS };
                let len = (req.length as u64).min(MAX_STATUS_BYTES);
                let extents = self.store.block_status(&mut self.io, req.offset, len, max);
                let p = self.pending.remove(&rid).unwrap();
                let mut out = Vec::new();
                tx::block_status_chunk(&mut out, p.cookie, context.unwrap_or(0), &extents);
                self.finish(p.conn, p.cost, out);
            }
            Command::Disconnect => unreachable!(),
        }
        self.deliver_store_events();
    }

    fn deliver_store_events(&mut self) {
        for b in self.store.recycled.drain(..) {
            let b = match self.mirror.as_mut() {
                Some(m) => match m.take_buffer(b) {
                    Some(b) => b,
                    None => continue,
                },
                None => b,
            };
            if self.pool.len() < POOL_BUFFERS && b.capacity() <= POOL_MAX_BUFFER {
                self.pool.push(b);
            }
        }
        loop {
            self.store.drain_events(&mut self.events);
            if self.events.is_empty() {
                if self.mirror.as_ref().is_some_and(|m| !m.answers.is_empty()) {
                    self.deliver_mirror_answers();
                    continue;
                }
                return;
            }
            let events = std::mem::take(&mut self.events);
            for ev in events {
                let rid = match &ev {
                    StoreEvent::Written(rid, _)
                    | StoreEvent::Flushed(rid, _)
                    | StoreEvent::Read(rid, _) => *rid,
                };
                if let Some(m) = self.mirror.as_mut().filter(|m| m.owns(rid)) {
                    m.store_event(&mut self.io, &mut self.store, ev);
                    continue;
                }
                match ev {
                    StoreEvent::Written(rid, r) | StoreEvent::Flushed(rid, r) => {
                        self.reply_status(rid, r)
                    }
                    StoreEvent::Read(rid, r) => self.reply_read(rid, r),
                }
            }
            self.deliver_mirror_answers();
        }
    }

    fn deliver_mirror_answers(&mut self) {
        let Some(m) = self.mirror.as_mut() else {
            return;
        };
        if m.answers.is_empty() {
            return;
        }
        let answers = std::mem::take(&mut m.answers);
        for (rid, r) in answers {
            self.reply_status(rid, r);
        }
    }

    fn reply_status(&mut self, rid: u64, r: Result<(), i32>) {
        let Some(p) = self.pending.remove(&rid) else {
            return;
        };
        let mut out = Vec::with_capacity(32);
        match r {
            Ok(()) => {
                if p.structured && p.command == Command::Read {
                    tx::none_done(&mut out, p.cookie);
                } else {
                    tx::simple_reply(&mut out, p.cookie, 0);
                }
            }
            Err(e) => {
                let msg = std::io::Error::from_raw_os_error(e).to_string();
                tx::error_reply(&mut out, p.structured, p.cookie, wire_errno(e), &msg);
            }
        }
        self.finish(p.conn, p.cost, out);
    }

    fn reply_read(&mut self, rid: u64, r: Result<Vec<u8>, i32>) {
        // Blocks that failed their checksums: a mirrored primary repairs
        // them from an in-sync peer and reads again (a few times at most, for
        // a read whose bad blocks need more than one request); otherwise,
        // or when that fails, the client gets EIO, never the bad data.
        if r.is_err() {
            let corrupt = self.store.take_corrupt(rid);
            if let (Some(c), Some(m), Some(p)) =
                (corrupt, self.mirror.as_mut(), self.pending.get_mut(&rid))
            {
                if (p.repairs as u64) < max_read_repairs(c.len) {
                    match m.repair_read(&mut self.io, rid, c) {
                        mirror::RepairStart::Started => {
                            p.repairs = p.repairs.saturating_add(1);
                            return;
                        }
                        mirror::RepairStart::Waiting => return,
                        mirror::RepairStart::No => {}
                    }
                    if self.repair_log.allow(std::time::Instant::now()) {
                        crate::elog!(
                            "nbdmirror: no peer in sync to repair the blocks from; the read \
                             fails with EIO"
                        );
                    }
                } else {
                    let repairs = p.repairs;
                    if self.repair_log.allow(std::time::Instant::now()) {
                        crate::elog!(
                            "nbdmirror: a read of {} bytes at {} still finds bad blocks after \
                             {repairs} repairs; it fails with EIO",
                            c.len,
                            c.offset,
                        );
                    }
                }
            }
        }
        let Some(p) = self.pending.remove(&rid) else {
            return;
        };
        match r {
            Ok(mut buf) => {
                // The store left room for the header in front of the data.
                if p.structured {
                    let len = (buf.len() - tx::OFFSET_DATA_HEADER_LEN) as u32;
                    if len == 0 {
                        buf.clear();
                        tx::none_done(&mut buf, p.cookie);
                    } else {
                        let h = (&mut buf[..tx::OFFSET_DATA_HEADER_LEN]).try_into().unwrap();
                        tx::offset_data_header_into(h, p.cookie, p.offset, len, true);
                    }
                } else {
                    let h = (&mut buf[..tx::SIMPLE_REPLY_LEN]).try_into().unwrap();
                    tx::simple_reply_into(h, p.cookie, 0);
                }
                self.finish(p.conn, p.cost, buf);
            }
            Err(e) => {
                let mut out = Vec::new();
                let msg = std::io::Error::from_raw_os_error(e).to_string();
                tx::error_reply(&mut out, p.structured, p.cookie, wire_errno(e), &msg);
                self.finish(p.conn, p.cost, out);
            }
        }
    }

    /// A request of connection `id` is answered with `out`.
    fn finish(&mut self, id: u64, cost: usize, out: Vec<u8>) {
        self.total_inflight_bytes -= cost;
        // The reply's bytes count from now on (`queue`); what the request
        // held beyond them is free for the connections waiting for memory.
        self.wake_starved(id);
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.inflight -= 1;
            conn.inflight_bytes -= cost;
            self.queue(id, out);
            // Capacity may have freed up: continue parsing buffered requests.
            self.process_input(id);
            self.post_recv(id);
            self.maybe_close(id);
        }
    }

    /// Memory was freed: let the connections waiting for the server-wide
    /// budget (other than `id`, whose caller goes on with it) read again.
    fn wake_starved(&mut self, id: u64) {
        if self.starved.is_empty()
            || self.total_inflight_bytes + self.total_out_bytes >= MAX_TOTAL_INFLIGHT_BYTES
        {
            return;
        }
        for sid in std::mem::take(&mut self.starved) {
            if sid != id {
                self.process_input(sid);
                self.post_recv(sid);
            }
        }
    }

    fn queue(&mut self, id: u64, out: Vec<u8>) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.shut {
            return;
        }
        // A small reply joins the last queued buffer (not the one being
        // sent: it is out of the queue).
        if let Some(last) = conn.outq.back_mut() {
            if last.len() + out.len() <= APPEND_REPLY_MAX {
                last.extend_from_slice(&out);
                conn.out_bytes += out.len();
                self.total_out_bytes += out.len();
                self.post_send(id);
                return;
            }
        }
        let n = out.len() + REPLY_OVERHEAD;
        conn.out_bytes += n;
        self.total_out_bytes += n;
        conn.outq.push_back(out);
        self.post_send(id);
    }

    /// Forget the replies queued on connection `id` (it is being dropped).
    fn drop_output(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        conn.outq.clear();
        let queued = conn.out_bytes - conn.sending_bytes;
        conn.out_bytes = conn.sending_bytes;
        self.total_out_bytes -= queued;
        self.wake_starved(id);
    }

    fn post_send(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if conn.send_in_flight || conn.outq.is_empty() || conn.shut {
            return;
        }
        // Gather what is queued, up to GATHER_SEND_MAX, into one send: each
        // buffer is taken once, so draining a long queue costs its length.
        let mut buf = conn.outq.pop_front().unwrap();
        let mut accounted = buf.len() + REPLY_OVERHEAD;
        if conn
            .outq
            .front()
            .is_some_and(|b| buf.len() + b.len() <= GATHER_SEND_MAX)
        {
            let queued = conn.out_bytes - conn.sending_bytes;
            let mut all = Vec::with_capacity(queued.min(GATHER_SEND_MAX));
            all.extend_from_slice(&buf);
            while let Some(b) = conn.outq.front() {
                if all.len() + b.len() > GATHER_SEND_MAX {
                    break;
                }
                all.extend_from_slice(b);
                accounted += b.len() + REPLY_OVERHEAD;
                conn.outq.pop_front();
            }
            buf = all;
        }
        conn.sending_bytes = accounted;
        conn.send_in_flight = true;
        conn.sent_at = self.batch_time;
        let fd = conn.fd.as_raw_fd();
        self.io
            .submit(token(KIND_CONN_SEND, id), Op::Send { fd, buf, at: 0 });
    }

    fn sent(&mut self, id: u64, c: Completion) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        let Op::Send { fd, buf, at } = c.op else {
            return;
        };
        if c.result <= 0 {
            // The client stopped reading; drop everything for it.
            conn.send_in_flight = false;
            conn.reading_done = true;
            conn.abort = true;
            let sent = std::mem::take(&mut conn.sending_bytes);
            conn.out_bytes -= sent;
            self.total_out_bytes -= sent;
            self.drop_output(id);
            self.maybe_close(id);
            return;
        }
        conn.sent_at = self.batch_time;
        let at = at + c.result as usize;
        if at < buf.len() {
            self.io
                .submit(token(KIND_CONN_SEND, id), Op::Send { fd, buf, at });
            return;
        }
        conn.send_in_flight = false;
        let sent = std::mem::take(&mut conn.sending_bytes);
        conn.out_bytes -= sent;
        self.total_out_bytes -= sent;
        self.wake_starved(id);
        self.post_send(id);
        self.process_input(id);
        self.post_recv(id);
        self.maybe_close(id);
    }

    /// Close a connection once nothing of it is in flight.
    fn maybe_close(&mut self, id: u64) {
        let Some(conn) = self.conns.get_mut(&id) else {
            return;
        };
        if !conn.reading_done {
            return;
        }
        let output_done = conn.abort || (conn.outq.is_empty() && !conn.send_in_flight);
        if !conn.shut && conn.inflight == 0 && output_done {
            conn.shut = true;
            // SAFETY: shutdown on a socket we own; wakes a pending receive.
            unsafe { libc::shutdown(conn.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if conn.shut && !conn.recv_in_flight && !conn.send_in_flight && conn.inflight == 0 {
            let mut freed = conn.out_bytes;
            if let Some(sink) = conn.sink.take() {
                self.total_inflight_bytes -= sink.req.length as usize;
                freed += sink.req.length as usize;
            }
            self.total_out_bytes -= conn.out_bytes;
            self.conns.remove(&id);
            self.closed_since_trim += 1;
            if freed > 0 {
                self.wake_starved(id);
            }
        }
    }
}

/// The NBD error for a local errno.
fn wire_errno(e: i32) -> u32 {
    match e {
        libc::EPERM | libc::EROFS => EPERM,
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => ENOSPC,
        libc::EINVAL => EINVAL,
        libc::EOVERFLOW => EOVERFLOW,
        libc::ENOTSUP => ENOTSUP,
        libc::ESHUTDOWN => ESHUTDOWN,
        _ => EIO,
    }
}

/// Raise the soft limit on open files to the hard one (as nginx, qemu and
/// most servers do): the usual soft limit, 1024, is a few hundred idle
/// clients, and a node out of descriptors cannot accept its own operator
/// or peers. Best effort; the limit stays as it was if it cannot be raised.
fn raise_open_files_limit() {
    // SAFETY: getrlimit/setrlimit on a local struct.
    unsafe {
        let mut l: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return;
        }
        let want = l.rlim_max.min(1 << 20);
        if l.rlim_cur < want {
            l.rlim_cur = want;
            libc::setrlimit(libc::RLIMIT_NOFILE, &l);
        }
    }
}

/// Open the replica directory and serve it until a signal arrives.
pub fn serve(config: ServeConfig) -> Result<(), String> {
    // Before any thread or io_uring worker exists: they inherit the mask,
    // so SIGTERM or SIGINT during recovery waits for the signalfd (a clean
    // shutdown once serving) instead of killing the node through a thread
    // that does not block it (seen in a test: SIGTERM right after start).
    block_termination_signals()?;
    raise_open_files_limit();
    let replica = dir::open(&config.dir)?;
    let server = match Server::new(config.clone(), &replica) {
        Ok(s) => s,
        Err(e) => {
            remove_dead_sockets(&config);
            return Err(e);
        }
    };
    let where_: Vec<String> = config
        .listen
        .iter()
        .map(|l| match l {
            Listen::Tcp(a) => format!("nbd://{a}/"),
            Listen::Unix(p) => format!("nbd+unix:///?socket={}", p.display()),
            Listen::Fd(fd) => format!("inherited socket fd {fd}"),
        })
        .collect();
    let mut where_ = where_;
    if let Some(a) = config.mirror.as_ref().and_then(|m| m.peer_listen) {
        where_.push(format!("replication stream from a primary on {a}"));
    }
    if let Some(m) = config.mirror.as_ref().filter(|m| !m.peers.is_empty()) {
        let peers: Vec<String> = m.peers.iter().map(|(id, a)| format!("{id}={a}")).collect();
        where_.push(format!("mirroring to peers {}", peers.join(", ")));
    }
    crate::elog!(
        "nbdmirror: serving {} ({} bytes) on {}",
        config.dir.display(),
        server.store.size(),
        where_.join("; ")
    );
    let r = server.run();
    drop(replica);
    r
}
