//! Synchronous mirroring between the nodes of a volume.
//!
//! Owns, on a **primary**: the links to its peers (connect, handshake,
//! frames over io_uring sockets, timeouts, reconnection with backoff), the
//! replicated write path (a client write, zero, trim or flush is answered
//! only when the local store *and* every streaming peer finished it), the
//! range locks that keep overlapping writes (and resync) in one order on
//! every replica, the persistent per-peer dirty bitmaps ([`bitmap`]) and the
//! bitmap resync with its rate limit, pause/resume and progress. On a
//! **secondary**: the peer listener, the inbound session and applying its
//! Records and Flushes to the local store, answering Ack/FlushAck. On both:
//! the admin socket the `nbdmirror resync` tool talks to.
//!
//! It does not own bytes on disk (the store does) nor NBD (the server does):
//! the server hands it client writes and store events and gets back client
//! answers in [`Mirror::answers`]. docs/mirroring.md describes the behaviour
//! and docs/peer-protocol.md the wire format.

pub mod bitmap;
pub mod generation;
pub mod scrub;
pub mod wire;

use std::collections::{BTreeMap, VecDeque};

use crate::idmap::{IdMap, IdSet};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::io::{Completion, Io, Op};
use crate::peer::frame::{encode_in_place, encode_parts, HEADER_LEN};
use crate::peer::{Config as HsConfig, Event, FrameKind, GenerationIds, Handshake, Role, Session};
use crate::store::{CorruptRead, Store, StoreEvent, UNKNOWN_SUM, WRITE_HEADROOM};
use bitmap::{DirtyBitmap, BLOCK, FLAG_CLEAN, FLAG_COMPARE, FLAG_PAUSED};
use generation::{Generation, Verdict};
use wire::RecordHeader;

/// Store request ids issued by the mirror (resync reads, applying a peer's
/// records); client request ids never have this bit.
pub const MIRROR_RID: u64 = 1 << 61;

const KIND_SHIFT: u64 = 56;
/// Token kinds owned by the mirror (the server routes them here).
pub const KIND_PEER: u64 = 6;
pub const KIND_PEER_LISTEN: u64 = 7;
pub const KIND_ADMIN_LISTEN: u64 = 8;
pub const KIND_ADMIN: u64 = 9;
const ID_MASK: u64 = (1 << KIND_SHIFT) - 1;
const SUB_CONNECT: u64 = 0;
const SUB_RECV: u64 = 1;
const SUB_SEND: u64 = 2;

const RECV_BUF: usize = 1 << 20;
/// A link's receive buffer until its handshake is done.
const HANDSHAKE_RECV_BUF: usize = 4096;
/// The receive after a large payload (see `Link::after_body`).
const SMALL_RECV: usize = 4096;
/// Resync reads and sends at most this much at once.
const RESYNC_BATCH_BLOCKS: u64 = 256;
/// Room left in front of a resync read for the frame and record headers.
const RESYNC_HEAD: usize = HEADER_LEN + wire::RECORD_HEADER;
/// Resync bytes sent but not yet acknowledged, per peer.
const RESYNC_WINDOW: u64 = 16 << 20;
/// Acknowledged resync bytes after which a Flush is sent (bits are cleared
/// only when it is answered).
const RESYNC_FLUSH_BYTES: u64 = 64 << 20;
const RESYNC_FLUSH_INTERVAL: Duration = Duration::from_secs(1);
/// How long resync leaves a peer alone after reading blocks that are bad
/// on this node (a repair from another peer is asked for meanwhile), at
/// first; doubled at each failure in a row, up to `RESYNC_HOLD_MAX`.
const RESYNC_HOLD: Duration = Duration::from_secs(1);
const RESYNC_HOLD_MAX: Duration = Duration::from_secs(30);
/// Checksum requests in flight per peer during a compare.
const COMPARE_WINDOW: usize = 8;
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Refill a rate cap's token bucket (bytes) for `dt` seconds at `rate`
/// bytes per second (0: no cap, nothing to do). It holds at most a fifth
/// of a second's worth, and at least one `batch`, so a low cap still lets
/// a whole batch through now and then.
pub(crate) fn refill(tokens: &mut f64, rate: u64, dt: f64, batch: u64) {
    if rate > 0 {
        let cap = (rate as f64 / 5.0).max(batch as f64);
        *tokens = (*tokens + dt * rate as f64).min(cap);
    }
}

fn tok(kind: u64, id: u64) -> u64 {
    (kind << KIND_SHIFT) | (id & ID_MASK)
}

pub fn is_mirror_token(token: u64) -> bool {
    matches!(
        token >> KIND_SHIFT,
        KIND_PEER | KIND_PEER_LISTEN | KIND_ADMIN_LISTEN | KIND_ADMIN
    )
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeRole {
    Primary,
    Secondary,
}

impl NodeRole {
    fn name(self) -> &'static str {
        match self {
            NodeRole::Primary => "primary",
            NodeRole::Secondary => "secondary",
        }
    }
}

#[derive(Clone, Debug)]
pub struct MirrorConfig {
    pub role: NodeRole,
    /// Peers to mirror to (primary): node id and address.
    pub peers: Vec<(u32, SocketAddr)>,
    /// Where to accept the replication stream (secondary).
    pub peer_listen: Option<SocketAddr>,
    pub secret: Vec<u8>,
    pub timeout: Duration,
    /// Resync bytes per second, 0 = unlimited.
    pub resync_rate: u64,
    pub admin_socket: Option<PathBuf>,
    pub dir: PathBuf,
    /// Serve as the primary even a replica that is partway through a
    /// resync (`generation::FLAG_INCONSISTENT`).
    pub force_inconsistent: bool,
    /// Scrub rate cap, bytes per second (0 = unlimited).
    pub scrub_rate: u64,
    /// Seconds between scheduled scrubs (0 = only when asked).
    pub scrub_interval: u64,
    /// The highest peer protocol version this node offers:
    /// `peer::messages::PROTOCOL_VERSION`, lower only to test a volume
    /// whose nodes run different versions.
    pub protocol_version: u16,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PeerState {
    Connecting,
    Disconnected,
    Syncing,
    InSync,
}

impl PeerState {
    fn name(self) -> &'static str {
        match self {
            PeerState::Connecting => "connecting",
            PeerState::Disconnected => "disconnected",
            PeerState::Syncing => "syncing",
            PeerState::InSync => "in_sync",
        }
    }
}

/// Something sent to a peer and not yet answered.
#[derive(Debug)]
enum Out {
    Write {
        offset: u64,
        len: u64,
        since: Instant,
    },
    Flush {
        since: Instant,
        /// Resync batches this flush makes durable: cleared when answered.
        batches: Vec<(u64, u64)>,
        /// Acknowledged writes up to this counter become durable on the peer.
        upto: u64,
    },
    Resync {
        first: u64,
        n: u64,
        since: Instant,
    },
    /// A BlockRequest of a read repair (see [`Repair`]).
    Repair {
        since: Instant,
    },
    /// A scrub's VerifyRequest (see [`scrub`]).
    Verify {
        since: Instant,
    },
}

impl Out {
    fn since(&self) -> Instant {
        match self {
            Out::Write { since, .. }
            | Out::Flush { since, .. }
            | Out::Resync { since, .. }
            | Out::Repair { since }
            | Out::Verify { since } => *since,
        }
    }
}

/// What [`Mirror::repair_read`] did with a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepairStart {
    Started,
    Waiting,
    No,
}

/// A primary pings an idle link at least this often, whatever its own
/// timeout: the secondary's idle limit comes from *its* timeout, which the
/// protocol does not exchange, so a primary with a long timeout must not
/// go quiet for long (a 30 s primary timeout against a 3 s secondary made
/// the link drop every 6 s).
const PING_INTERVAL_MAX: Duration = Duration::from_millis(500);

/// How long a primary lets a link idle before it pings.
fn ping_interval(timeout: Duration) -> Duration {
    (timeout / 4).min(PING_INTERVAL_MAX)
}

/// How long a secondary waits for anything from its primary before it
/// drops the link: twice its own timeout, and never less than four of the
/// longest ping intervals.
fn primary_quiet_limit(timeout: Duration) -> Duration {
    (timeout * 2).max(PING_INTERVAL_MAX * 4)
}

/// The peer protocol version that has BlockRequest/BlockData.
const REPAIR_VERSION: u16 = 3;
/// The peer protocol version whose primary always announces its generation
/// when a peer is in sync (see `generation::FLAG_INCONSISTENT`).
const ANNOUNCE_VERSION: u16 = 4;
/// The peer protocol version that has VerifyRequest/Verified (scrub).
const VERIFY_VERSION: u16 = 5;
/// The peer protocol version that has SummedRecord: a block-aligned write
/// goes with its block checksums, which cover its data on the wire.
const SUMMED_VERSION: u16 = 7;
/// VerifyRequests a secondary takes in flight per link.
const MAX_VERIFY_READS: usize = 32;

/// Read repairs in flight at once (each holds up to 1 MiB at the peer).
const MAX_REPAIRS: usize = 16;

/// Whether peer `p` can be asked for its copy of blocks `first..first+n`
/// (read repair): it is streaming (and, with `in_sync`, in sync) at a
/// protocol version that has BlockRequest, and none of the blocks is dirty
/// for it (its copy of those is old).
fn repair_source(p: &Peer, in_sync: bool, first: u64, n: u64) -> bool {
    p.link.is_some()
        && p.version >= REPAIR_VERSION
        && if in_sync {
            p.state == PeerState::InSync
        } else {
            p.streaming()
        }
        && !(first..first + n).any(|b| p.bitmap.is_set(b))
}

/// The byte range a repair of `read` locks: its first run of bad blocks,
/// at most `MAX_REPAIR_BLOCKS` long.
fn repair_range(read: &CorruptRead) -> (u64, u64) {
    let (first, last) = (read.blocks[0], *read.blocks.last().unwrap());
    let n = (last - first + 1).min(wire::MAX_REPAIR_BLOCKS as u64);
    (first * BLOCK, (first + n) * BLOCK)
}

/// The handover of a primary's generation at a clean shutdown (see
/// `generation::FLAG_HANDED_OVER` and [`Mirror::start_handover`]).
#[derive(Debug)]
enum Handover {
    Idle,
    /// Generation and Flush frames sent: flush id -> peer index.
    Waiting(IdMap<u64, usize>),
    /// Finished: every peer adopted the generation and flushed (true), or
    /// not attempted or failed (false).
    Done(bool),
}

/// A read repair on the primary: a client read found blocks of the data
/// file that fail their checksums; an in-sync peer's copy of them is asked
/// for (`asked`), checked against this node's checksum table and written
/// over them (`!asked`), then the client's read runs again. The blocks'
/// range is locked like a write's meanwhile, so no client write can land
/// between the peer's read and the rewrite.
#[derive(Debug)]
struct Repair {
    client: u64,
    read: CorruptRead,
    peer: usize,
    /// The blocks asked for.
    first: u64,
    n: u64,
    /// Waiting for the peer's data (else for the rewrites).
    asked: bool,
    /// Rewrites not yet answered, and the first error one got.
    writes_left: u64,
    failed: Option<i32>,
    /// Peers asked so far (a peer whose copy is bad too is not asked twice).
    tried: Vec<usize>,
}

/// A checksum compare in progress: the next block to ask about, and the
/// requests in flight (id -> first block, count).
type Compare = (u64, IdMap<u64, (u64, u64)>);

struct Peer {
    node_id: u32,
    /// The protocol version of its current session (read repair needs 3).
    version: u16,
    addr: SocketAddr,
    link: Option<u64>,
    state: PeerState,
    bitmap: DirtyBitmap,
    outstanding: IdMap<u64, Out>,
    retry_at: Instant,
    backoff: Duration,
    last_error: Option<String>,
    /// Bumped on every disconnect: resync reads started before it are void.
    epoch: u64,
    paused: bool,
    cursor: u64,
    resync_inflight: u64,
    acked: Vec<(u64, u64)>,
    acked_bytes: u64,
    /// Client writes the peer acknowledged (they are in its journal, maybe
    /// only in its page cache) and no flush on the peer has covered yet:
    /// (counter, offset, len). If the peer fails, their bits are set, since
    /// a power failure there may have lost them.
    unflushed: VecDeque<(u64, u64, u64)>,
    unflushed_counter: u64,
    flush_in_flight: bool,
    /// A checksum compare finished; its FLAG_COMPARE stays set until a
    /// Flush sent after it is answered: "equal" meant the peer's copy as it
    /// stood, which a crash before that flush can take back.
    compare_unsettled: bool,
    /// The first flush id (without `MIRROR_RID`) sent after the compare.
    compare_settle_from: u64,
    last_resync_flush: Instant,
    /// Checksum compare in progress: next block to ask about, and the
    /// requests in flight (id -> first block, count).
    compare: Option<Compare>,
    compared_diff: u64,
    /// The token of the session just started, recorded in the bitmap once
    /// the peer answers anything (it has stored the token by then).
    pending_session: Option<u64>,
    /// The last session token sent to the peer in this run, answered or
    /// not: a peer that reports it took records only from this node (the
    /// token is a fresh random number), and whatever it missed of them is
    /// in the bitmap, so a link that failed before the peer's first answer
    /// does not make the next connect compare every checksum.
    sent_session: u64,
    resync_started: Instant,
    /// `sent_bytes` when `resync_started` was set.
    sent_at_resync_start: u64,
    /// Dirty bytes when the current resync began.
    total: u64,
    sent_bytes: u64,
    rate_mark: (Instant, u64),
    /// Start of the window `rate` is measured over: stretched while nothing
    /// is sent (see `tick`).
    rate_window: (Instant, u64),
    rate: f64,
    /// When this resync last sent something (while it is not running: now).
    last_progress: Instant,
    /// Resync token bucket (bytes; `--resync-rate` per peer): refilled by
    /// `tick`, spent by `resync_peer`.
    tokens: f64,
    /// Resync waits until then: blocks it read were bad on this node; and
    /// how long the next such wait is.
    resync_hold: Instant,
    resync_hold_for: Duration,
}

impl Peer {
    fn streaming(&self) -> bool {
        matches!(self.state, PeerState::Syncing | PeerState::InSync)
    }
}

struct Link {
    fd: OwnedFd,
    /// Primary: index of the configured peer this link belongs to.
    peer: Option<usize>,
    addr: String,
    hs: Option<Box<Handshake>>,
    session: Option<Session>,
    rbuf: Option<Vec<u8>>,
    recv_busy: bool,
    /// The receive in flight fills a large payload's own buffer (taken from
    /// the frame decoder), not `rbuf`.
    recv_body: bool,
    /// A large payload was just received into its own buffer: the next
    /// frame is likely another, so the next receive into `rbuf` takes only
    /// its header and a little payload; the rest lands in its own buffer
    /// instead of being copied out of `rbuf` (6% of a secondary's CPU
    /// during 1 MiB sequential writes).
    after_body: bool,
    send_busy: bool,
    connect_busy: bool,
    /// Frames waiting to be sent, oldest first: closed batches of small
    /// frames and large frames in buffers of their own (see
    /// [`Mirror::send_frame_owned`]), all older than `out`.
    segs: VecDeque<Vec<u8>>,
    /// The batch small frames are appended to (the newest frames).
    out: Vec<u8>,
    spare: Vec<u8>,
    closing: bool,
    close_after_send: bool,
    opened: Instant,
    last_rx: Instant,
    last_tx: Instant,
    /// Secondary: frames wait until older sessions' records are applied.
    held: bool,
    /// The protocol version the session runs at (0 before the handshake).
    version: u16,
    /// Secondary: the primary announced its generation in this session, so
    /// what it sends now is the live stream of an in-sync peer; records
    /// before that are resync data.
    announced: bool,
    /// Secondary: the primary's run from a RUN_ONLY Generation frame
    /// (generation, run), recorded with the next record this replica takes
    /// (recorded at once, a peer that took none of that run's writes would
    /// look as if it had: a reviewer's find).
    pending_run: Option<(u64, u32)>,
    /// Secondary: the Session frame of this session was received.
    session_started: bool,
    /// Secondary: the generation the primary of this session serves (from
    /// its handshake; 0 before). Resync data from it makes this replica a
    /// half copy of that generation.
    primary_generation: u64,
}

/// A client request the mirror is carrying: answered when the local store
/// is done and `mask` (peers still to answer) is empty.
struct MOp {
    offset: u64,
    locked: bool,
    local: Option<Result<(), i32>>,
    mask: u64,
}

enum Parked {
    Write {
        rid: u64,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
    },
    Zero {
        rid: u64,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
        trim: bool,
    },
}

impl Parked {
    fn range(&self) -> (u64, u64) {
        match self {
            Parked::Write { offset, len, .. } => (*offset, *offset + *len as u64),
            Parked::Zero { offset, len, .. } => (*offset, *offset + *len),
        }
    }
}

struct ResyncRead {
    peer: usize,
    epoch: u64,
    first: u64,
    n: u64,
}

struct AdminConn {
    fd: OwnedFd,
    buf: Vec<u8>,
    busy: bool,
    done: bool,
}

pub struct Mirror {
    cfg: MirrorConfig,
    node_id: u32,
    generation: Generation,
    /// Primary: the replica had no generation when this process started it
    /// (freshly initialised), so a peer holding data is likely the volume's
    /// real copy and this node a stale `primary` in a config file.
    started_empty: bool,
    /// Primary: the next client write starts a new run (see
    /// [`Mirror::advance_run`]).
    run_due: bool,
    /// Primary: storing the next run failed; not tried again before this.
    run_retry_at: Option<Instant>,
    volume_uuid: [u8; 16],
    size: u64,
    peers: Vec<Peer>,
    links: IdMap<u64, Link>,
    next_link: u64,
    listener: Option<OwnedFd>,
    admin: Option<UnixListener>,
    admin_conns: IdMap<u64, AdminConn>,
    next_admin: u64,
    /// Ranges being written or resynced, disjoint: start -> (end, owner).
    locks: BTreeMap<u64, (u64, u64)>,
    /// Read repairs in progress (primary), by the id of their BlockRequest.
    repairs: IdMap<u64, Repair>,
    /// Client reads with bad blocks waiting to be repaired or read again:
    /// their blocks are locked (a write or another repair is at them) or
    /// too many repairs are in flight. Retried by `unpark`.
    repair_waiting: Vec<(u64, CorruptRead)>,
    /// Store writes of a repair with several runs, by their own ids, to the
    /// repair's id: a store answers each request id once, so runs written
    /// under one id (a block marked corrupt takes a peer's copy through the
    /// journal, as a client write) lost all answers but one, and the repair
    /// and every read waiting on its lock hung (a tester's find).
    repair_parts: IdMap<u64, u64>,
    handover: Handover,
    /// Failed accepts on the peer and admin listeners, and which of them
    /// wait for the back-off to end.
    accept_backoff: crate::server::AcceptBackoff,
    peer_accept_paused: bool,
    admin_accept_paused: bool,
    /// A secondary that a primary refused as split brain: why, until a
    /// primary streams to it again. Its data may be superseded (a promoted
    /// node went on without it), so its read-only export answers EIO and
    /// `resync status` says so (the log alone said it before).
    refused: Option<String>,
    /// Secondary: a primary refused as split brain (`DIR/diverged`, see
    /// [`generation::Diverged`]).
    diverged: Option<generation::Diverged>,
    /// Secondary: a primary promoted from the generation this replica
    /// follows knocked (refused Busy) while a session with this node id's
    /// primary was alive. Stored as `diverged` before the next record from
    /// that node is applied (in this session or a later one: a link flap
    /// must not forget it); forgotten when another primary's session is
    /// accepted first (the old primary was frozen or dying and wrote
    /// nothing the newcomer lacks: a failover).
    pending_divergence: Option<(u32, generation::Diverged)>,
    /// `switchover` was asked for: stop, handing the generation over.
    switchover: bool,
    /// Store reads of blocks a primary asked for (secondary): read id ->
    /// (link, the request's id).
    peer_reads: IdMap<u64, (u64, u64)>,
    parked: VecDeque<Parked>,
    ops: IdMap<u64, MOp>,
    next_mrid: u64,
    /// Connections dropped because what arrived on them was damaged: a
    /// frame that failed its checksum, a SummedRecord whose data did not
    /// match its block checksums (status `damaged_in_transit`).
    damaged_frames: u64,
    damaged_records: u64,
    resync_reads: IdMap<u64, ResyncRead>,
    /// Secondary: store request -> (link, message id, is a flush).
    applying: IdMap<u64, (u64, u64, bool)>,
    last_refill: Instant,
    shutting_down: bool,
    send_queue: Vec<u64>,
    /// The time, as the I/O backend tells it (virtual under simulation),
    /// refreshed at every entry point.
    t: Instant,
    /// Client requests finished: (request id, result), for the server.
    pub answers: Vec<(u64, Result<(), i32>)>,
    /// Secondary: buffers of applied records, reused for the payloads of
    /// large incoming records (see [`Mirror::take_buffer`]).
    spare_payloads: Vec<Vec<u8>>,
    /// The scrub (primary; a secondary is scrubbed by its primary).
    scrub: scrub::Scrub,
    /// Secondary: store reads of a primary's VerifyRequests: read id ->
    /// (link, the request's id, first block, count).
    verify_reads: IdMap<u64, (u64, u64, u64, u64)>,
    /// Read repairs no read waits for (asked by resync for blocks bad
    /// here): nothing is read again or answered when they end.
    background: IdSet<u64>,
}

fn nonce() -> [u8; 32] {
    use std::io::Read;
    let mut n = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut n);
    }
    if n == [0; 32] {
        n[0] = 1;
    }
    n
}

fn errno_str(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
}

/// Whether a process listens on the Unix socket at `p` (a connect
/// succeeds): then it is not a stale one to replace.
pub fn socket_is_live(p: &std::path::Path) -> bool {
    on_unix_path(p, |q| std::os::unix::net::UnixStream::connect(q)).is_ok()
}

/// The admin socket at `p` (a stale one is replaced: the caller holds the
/// replica directory's lock). A failure is logged, not fatal: serving data
/// matters more than the control socket.
pub fn bind_admin_socket(p: Option<&std::path::Path>) -> Option<UnixListener> {
    let p = p?;
    // Only a stale socket is replaced: anything else at the path (a file
    // someone put there, a typo in --admin-socket) is left alone, and so is
    // a socket another running node answers on (taking it over made that
    // node's commands reach this one, and removed its socket at exit).
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() && socket_is_live(p) => {
            crate::elog!(
                "nbdmirror: WARNING: another running process answers on {}; not taking it \
                 over, so `nbdmirror resync` will not reach this node (use another \
                 --admin-socket)",
                p.display()
            );
            return None;
        }
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(p);
        }
        Ok(_) => {
            crate::elog!(
                "nbdmirror: WARNING: {} exists and is not a socket; not replacing it, so \
                 `nbdmirror resync` will not reach this node (remove it, or use --admin-socket)",
                p.display()
            );
            return None;
        }
        Err(_) => {}
    }
    match on_unix_path(p, |q| UnixListener::bind(q)) {
        Ok(l) => Some(l),
        Err(e) => {
            crate::elog!(
                "nbdmirror: WARNING: cannot create admin socket {}: {e}; \
                 `nbdmirror resync` will not reach this node (use --admin-socket)",
                p.display()
            );
            None
        }
    }
}

/// A primary must record every write a peer it mirrored before misses:
/// the peer's dirty bitmap is what brings it back. Started without that
/// peer in its list, it would record nothing for it, and when the peer came
/// back its unchanged session would pass as in sync, missing every write
/// made meanwhile. So a `peer-N.bitmap` in the directory for a node not in
/// the list refuses the start; removing the file forgets the node (if it
/// returns, it is compared by checksum as a new peer). `serve` calls it
/// before recovery, so a refused start writes nothing.
pub fn refuse_left_out_peers(cfg: &MirrorConfig, own_id: u32) -> Result<(), String> {
    // Checked here too (before recovery): a refused start writes nothing.
    if let Some((id, addr)) = cfg.peers.iter().find(|(id, _)| *id == own_id) {
        return Err(format!(
            "--peer {id}={addr} names this node itself (node id {id})"
        ));
    }
    let left_out: Vec<u32> = bitmap::peer_ids(&cfg.dir)
        .into_iter()
        .filter(|&id| id != own_id && !cfg.peers.iter().any(|&(p, _)| p == id))
        .filter(|&id| {
            // Never in a session with this replica (a mistyped --peer id
            // whose handshake was refused): nothing depends on its bits.
            let path = cfg.dir.join(format!("peer-{id}.bitmap"));
            let unused = bitmap::never_in_session(&path);
            if unused {
                crate::elog!(
                    "nbdmirror: note: {} is for node {id}, which is not in the peer list and \
                     never had a session with this replica; ignored (should node {id} join \
                     later, it is compared by checksum)",
                    path.display()
                );
            }
            !unused
        })
        .collect();
    let Some(&id) = left_out.first() else {
        return Ok(());
    };
    let path = cfg.dir.join(format!("peer-{id}.bitmap"));
    Err(format!(
        "node {id} was mirrored from this replica (its dirty bitmap is {}) but is not in the \
         peer list: served like this, the writes node {id} misses would be recorded nowhere \
         and it would later be taken back as in sync without them. Add it (--peer {id}=ADDR, \
         or its [[node]] in the config file); if node {id} has left the volume for good, \
         remove {} first (should it return, it is then compared by checksum as a new peer){}",
        path.display(),
        path.display(),
        if left_out.len() > 1 {
            format!(
                "; the same holds for node(s) {}",
                left_out[1..]
                    .iter()
                    .map(|n| n.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            String::new()
        }
    ))
}

/// On a secondary's link: the Session frame comes first after Ready, and
/// once (docs/peer-protocol.md). A record taken without one would be
/// credited to the last session this replica recorded, and a primary that
/// started that session would find it in sync while it holds a write the
/// primary never sent (a tester's find). `started`: the link's flag.
fn session_order(started: &mut bool, kind: FrameKind) -> Result<(), String> {
    match kind {
        FrameKind::Session if *started => {
            Err("protocol violation: a second Session frame in one session".into())
        }
        FrameKind::Session => {
            *started = true;
            Ok(())
        }
        FrameKind::Ping | FrameKind::Pong | FrameKind::Reject => Ok(()),
        _ if !*started => Err(format!(
            "protocol violation: {kind:?} before the Session frame"
        )),
        _ => Ok(()),
    }
}

/// The socket a secondary accepts its primary on.
pub fn bind_peer_listener(io: &mut dyn Io, a: SocketAddr) -> Result<OwnedFd, String> {
    io.tcp_listen(a)
        .map_err(|e| format!("cannot listen for peers on {a}: {e}"))
}

impl Mirror {
    /// Set up the mirror for `store`: open (or create) every peer's bitmap,
    /// mark what recovery replayed as dirty for every peer, bind the peer
    /// listener and the admin socket.
    pub fn new(cfg: MirrorConfig, store: &mut Store, io: &mut dyn Io) -> Result<Mirror, String> {
        Self::with_listener(cfg, store, io, None, None)
    }

    /// As [`Mirror::new`], with the peer listener and the admin socket
    /// already bound when given (the server binds them before recovery, so
    /// a busy port changes nothing on disk and the tool can reach a node as
    /// soon as it listens). `admin`: `Some(bound or failed)`, or `None` to
    /// bind it here.
    pub fn with_listener(
        cfg: MirrorConfig,
        store: &mut Store,
        io: &mut dyn Io,
        listener: Option<OwnedFd>,
        admin: Option<Option<UnixListener>>,
    ) -> Result<Mirror, String> {
        let sb = store.superblock().clone();
        let t0 = io.now();
        if cfg.secret.len() < crate::peer::handshake::MIN_SECRET && !cfg.secret.is_empty() {
            return Err(format!(
                "the shared secret is {} bytes; at least {} are needed",
                cfg.secret.len(),
                crate::peer::handshake::MIN_SECRET
            ));
        }
        let mut generation = Generation::load(&cfg.dir)?;
        let diverged = generation::Diverged::load(&cfg.dir)?;
        // A primary that served before starts a new run at its first write.
        let run_due = cfg.role == NodeRole::Primary && generation.is_own_primary();
        let started_empty = cfg.role == NodeRole::Primary && generation.current == 0;
        if cfg.role == NodeRole::Primary {
            let fresh = u64::from_le_bytes(nonce()[..8].try_into().unwrap()) | 1;
            let (g, what) = generation.for_primary(fresh);
            if let Some(what) = what {
                g.store(&cfg.dir)?;
                crate::elog!("nbdmirror: {what}");
            }
            generation = g;
        } else if generation.flags & generation::FLAG_PRIMARY != 0
            && generation.flags & generation::FLAG_HANDED_OVER == 0
        {
            crate::elog!(
                "nbdmirror: WARNING: this replica was last written as the primary of generation \
                 {:016x} and did not hand over at its stop (`nbdmirror switchover`); started as a \
                 secondary, any other primary will refuse it as split brain. If this node is \
                 still meant to be the primary (a stale config file?), stop it and start it with \
                 --role primary",
                generation.current
            );
        }
        let mut peers = Vec::new();
        for &(id, addr) in &cfg.peers {
            if id == sb.node_id {
                return Err(format!(
                    "--peer {id}={addr} names this node itself (node id {id})"
                ));
            }
            let (mut bm, created) =
                DirtyBitmap::open_or_create(&cfg.dir, &sb.volume_uuid, id, sb.size)?;
            let flags = bm.flags();
            if created {
                crate::elog!(
                    "nbdmirror: peer {id} ({addr}) is new to this node: its blocks are compared by \
                     checksum and every block that differs is copied"
                );
            } else if flags & FLAG_CLEAN == 0 && flags & FLAG_COMPARE == 0 {
                crate::elog!(
                    "nbdmirror: this node did not shut down cleanly: peer {id}'s blocks are compared \
                     by checksum to find writes it may hold that this node lost"
                );
            }
            // Until a clean shutdown sets it again, the bitmap may miss writes
            // the peer holds and this node lost (a power failure here): the
            // next start compares checksums.
            let flags = if flags & FLAG_CLEAN == 0 {
                flags | FLAG_COMPARE
            } else {
                flags
            };
            bm.set_flags(flags & !FLAG_CLEAN)?;
            let paused = flags & FLAG_PAUSED != 0;
            if paused {
                crate::elog!(
                    "nbdmirror: resync to peer {id} stays paused, as it was at the last stop \
                     (`nbdmirror resync resume` goes on)"
                );
            }
            store.extra_sync_fds.push(bm.fd());
            peers.push(Peer {
                node_id: id,
                addr,
                link: None,
                state: PeerState::Connecting,
                bitmap: bm,
                outstanding: IdMap::default(),
                retry_at: t0,
                backoff: BACKOFF_MIN,
                last_error: None,
                epoch: 0,
                paused,
                cursor: 0,
                resync_inflight: 0,
                acked: Vec::new(),
                acked_bytes: 0,
                unflushed: VecDeque::new(),
                unflushed_counter: 0,
                compare: None,
                compared_diff: 0,
                pending_session: None,
                sent_session: 0,
                version: crate::peer::messages::PROTOCOL_VERSION,
                resync_started: t0,
                sent_at_resync_start: 0,
                flush_in_flight: false,
                compare_unsettled: false,
                compare_settle_from: 0,
                last_resync_flush: t0,
                total: 0,
                sent_bytes: 0,
                rate_mark: (t0, 0),
                rate_window: (t0, 0),
                last_progress: t0,
                tokens: 0.0,
                rate: 0.0,
                resync_hold: t0,
                resync_hold_for: RESYNC_HOLD,
            });
        }
        if peers.len() > 63 {
            return Err("at most 63 peers".into());
        }
        // Blocks recovery could not vouch for (`store::uncertain`). On a
        // secondary they may hold rot or a stale copy of a write its damaged
        // journal lost: it is inconsistent (not promoted) until its primary
        // reports it in sync, reports no session so that the primary
        // compares every block, and answers the compare with "unknown" for
        // them so that the primary resends its copy. A primary cannot tell
        // which copy is right from checksums alone and keeps its own, as a
        // single node does (docs/mirroring.md, "Uncertain blocks").
        let unsure = store.uncertain_count();
        if unsure > 0 {
            if cfg.role == NodeRole::Secondary {
                let next = Generation {
                    session: 0,
                    flags: generation.flags | generation::FLAG_INCONSISTENT,
                    ..generation
                };
                if next != generation {
                    next.store(&cfg.dir)?;
                    generation = next;
                }
                crate::elog!(
                    "nbdmirror: recovery could not vouch for {unsure} blocks: this replica is \
                     inconsistent until the primary has compared every block and resent what \
                     differs"
                );
            } else {
                store.settle_all();
            }
        }
        let listener = match (listener, cfg.peer_listen) {
            (Some(l), _) => Some(l),
            (None, Some(a)) => Some(bind_peer_listener(io, a)?),
            (None, None) => None,
        };
        let admin = match admin {
            Some(a) => a,
            None => bind_admin_socket(cfg.admin_socket.as_deref()),
        };
        let scrub = scrub::Scrub::open(
            &cfg.dir,
            sb.size.div_ceil(BLOCK),
            cfg.scrub_rate,
            cfg.scrub_interval,
            t0,
            cfg.role == NodeRole::Primary,
        );
        Ok(Mirror {
            scrub,
            verify_reads: IdMap::default(),
            background: IdSet::default(),
            node_id: sb.node_id,
            generation,
            started_empty,
            run_due,
            run_retry_at: None,
            volume_uuid: sb.volume_uuid,
            size: sb.size,
            last_refill: t0,
            cfg,
            peers,
            links: IdMap::default(),
            next_link: 0,
            listener,
            admin,
            admin_conns: IdMap::default(),
            next_admin: 0,
            locks: BTreeMap::new(),
            repairs: IdMap::default(),
            repair_waiting: Vec::new(),
            repair_parts: IdMap::default(),
            peer_reads: IdMap::default(),
            handover: Handover::Idle,
            accept_backoff: Default::default(),
            peer_accept_paused: false,
            admin_accept_paused: false,
            refused: None,
            diverged,
            pending_divergence: None,
            switchover: false,
            parked: VecDeque::new(),
            ops: IdMap::default(),
            next_mrid: 0,
            damaged_frames: 0,
            damaged_records: 0,
            resync_reads: IdMap::default(),
            applying: IdMap::default(),
            shutting_down: false,
            send_queue: Vec::new(),
            t: t0,
            answers: Vec::new(),
            spare_payloads: Vec::new(),
        })
    }

    /// Every configured peer is connected and in sync, and nothing is in flight
    /// to any of them (tests and tools wait for this).
    pub fn all_in_sync(&self) -> bool {
        self.peers
            .iter()
            .all(|p| p.state == PeerState::InSync && p.outstanding.is_empty())
    }

    /// Client writes go through the mirror (this node is a primary with peers).
    /// Keep `buf` (a written record's buffer, back from the store) for a
    /// later incoming payload; gives it back if this node has no use for it.
    pub fn take_buffer(&mut self, buf: Vec<u8>) -> Option<Vec<u8>> {
        if self.cfg.role == NodeRole::Secondary && self.spare_payloads.len() < 8 {
            self.spare_payloads.push(buf);
            return None;
        }
        Some(buf)
    }

    pub fn mirrors_writes(&self) -> bool {
        self.cfg.role == NodeRole::Primary && !self.peers.is_empty()
    }

    pub fn role(&self) -> NodeRole {
        self.cfg.role
    }

    /// This replica is partway through a resync from its primary
    /// (`generation::FLAG_INCONSISTENT`): its blocks are a mix of old and
    /// new, so its read-only export answers reads with EIO.
    pub fn inconsistent(&self) -> bool {
        self.generation.flags & generation::FLAG_INCONSISTENT != 0
    }

    /// Why this secondary's read-only export answers reads with EIO, if it
    /// does: it is partway through a resync (`inconsistent`), or a primary
    /// refused it as split brain and none streams to it (`refused`).
    pub fn read_refusal(&self, store: &Store) -> Option<String> {
        if self.inconsistent() {
            if store.uncertain_count() > 0 {
                return Some(
                    "this secondary's crash recovery could not vouch for some of its blocks, \
                     and its primary has not resent them yet"
                        .into(),
                );
            }
            return Some(
                "this secondary is partway through a resync from its primary, and its blocks \
                 are a mix of old and new data"
                    .into(),
            );
        }
        self.refused
            .as_ref()
            .map(|r| format!("this secondary was {r}, so its data may be superseded"))
    }

    /// Whether the store request `rid` is one of the mirror's client ops.
    pub fn owns(&self, rid: u64) -> bool {
        rid & MIRROR_RID != 0 || self.ops.contains_key(&rid)
    }

    pub fn start(&mut self, io: &mut dyn Io) {
        self.t = io.now();
        if let Some(l) = &self.listener {
            io.submit(tok(KIND_PEER_LISTEN, 0), Op::Accept { fd: l.as_raw_fd() });
        }
        if let Some(a) = &self.admin {
            io.submit(tok(KIND_ADMIN_LISTEN, 0), Op::Accept { fd: a.as_raw_fd() });
        }
        for i in 0..self.peers.len() {
            self.connect(io, i);
        }
    }

    /// Nothing left that the mirror must finish before the process exits.
    pub fn quiet(&self) -> bool {
        self.ops.is_empty()
            && self.parked.is_empty()
            && self.resync_reads.is_empty()
            && self.applying.is_empty()
            && self.repairs.is_empty()
            && self.repair_waiting.is_empty()
            && self.peer_reads.is_empty()
            && self.verify_reads.is_empty()
            && self.scrub.steps.is_empty()
            && !matches!(self.handover, Handover::Waiting(_))
    }

    pub fn begin_shutdown(&mut self, io: &mut dyn Io) {
        self.shutting_down = true;
        if let Some(l) = &self.listener {
            io.shutdown(l.as_raw_fd());
        }
        if let Some(a) = &self.admin {
            io.shutdown(a.as_raw_fd());
        }
        if self.cfg.role == NodeRole::Secondary {
            let ids: Vec<u64> = self.links.keys().copied().collect();
            for id in ids {
                self.close_link(io, id);
            }
        }
    }

    /// A `switchover` was asked for on the admin socket: the caller stops
    /// the node as on SIGTERM. Checked again here: a peer that fell out of
    /// sync since the command calls it off (logged) rather than stop the
    /// primary for a handover that cannot happen.
    pub fn switchover_requested(&mut self) -> bool {
        if !self.switchover {
            return false;
        }
        if let Some(p) = self.peers.iter().find(|p| p.state != PeerState::InSync) {
            crate::elog!(
                "nbdmirror: switchover called off: peer {} is {} now; this node goes on serving",
                p.node_id,
                p.state.name()
            );
            self.switchover = false;
            return false;
        }
        true
    }

    /// After `switchover`, once the store is quiet: a primary whose store
    /// is healthy and whose every peer is in sync, with nothing dirty,
    /// unanswered or unflushed, hands its generation over. It moves to a
    /// fresh generation (stored first), sends it to every peer with a
    /// Flush after it, and when every FlushAck is in (each peer has stored
    /// the generation and made every acknowledged write durable),
    /// `finish` marks it handed over. True when frames went out: the
    /// caller keeps running the loop until the mirror is quiet again. A
    /// peer that fails meanwhile leaves the handover undone (the primary
    /// keeps the fresh generation; its peers hold it or the one before,
    /// both ordinary cases at the next connect).
    pub fn start_handover(&mut self, io: &mut dyn Io, store_ok: bool) -> bool {
        if !self.switchover || !matches!(self.handover, Handover::Idle) {
            return false;
        }
        self.handover = Handover::Done(false);
        // Flushes still out are fine: the handover's Flush comes after them.
        let lagging: Vec<String> = self
            .peers
            .iter()
            .filter(|p| {
                p.state != PeerState::InSync
                    || p.link.is_none()
                    || p.bitmap.dirty() != 0
                    || p.pending_session.is_some()
                    || p.outstanding
                        .values()
                        .any(|o| !matches!(o, Out::Flush { .. }))
            })
            .map(|p| {
                format!(
                    "peer {} ({}, {} dirty blocks, {} requests out)",
                    p.node_id,
                    p.state.name(),
                    p.bitmap.dirty(),
                    p.outstanding.len()
                )
            })
            .collect();
        if !store_ok || !self.quiet() || !lagging.is_empty() {
            crate::elog!(
                "nbdmirror: switchover NOT done: {}; this node stays the primary of its \
                 generation, and a peer promoted now meets it as split brain",
                if !store_ok {
                    "the store failed".to_string()
                } else if !lagging.is_empty() {
                    format!("not in sync at the end: {}", lagging.join(", "))
                } else {
                    "requests were still in flight".to_string()
                }
            );
            return false;
        }
        let fresh = u64::from_le_bytes(nonce()[..8].try_into().unwrap()) | 1;
        let Some(g) = self.generation.handover_start(fresh) else {
            return false;
        };
        if let Err(e) = g.store(&self.cfg.dir) {
            crate::elog!("nbdmirror: not handing over: {e}");
            return false;
        }
        self.generation = g;
        self.t = io.now();
        let mut waiting = IdMap::default();
        for i in 0..self.peers.len() {
            let link = self.peers[i].link.unwrap();
            // `fresh`, now our generation.
            self.send_generation(io, i, false);
            let id = MIRROR_RID | self.next_mrid;
            self.next_mrid += 1;
            self.send_frame(link, FrameKind::Flush, &[&id.to_le_bytes()]);
            let p = &mut self.peers[i];
            p.outstanding.insert(
                id,
                Out::Flush {
                    since: self.t,
                    batches: Vec::new(),
                    upto: p.unflushed_counter,
                },
            );
            waiting.insert(id, i);
            self.post_send(io, link);
        }
        self.handover = Handover::Waiting(waiting);
        true
    }

    /// Last step of a clean shutdown: links closed, bitmaps on disk, and a
    /// finished handover recorded (`generation::FLAG_HANDED_OVER`).
    pub fn finish(&mut self, io: &mut dyn Io) {
        if matches!(self.handover, Handover::Done(true)) {
            let g = self.generation.handed_over();
            match g.store(&self.cfg.dir) {
                Ok(()) => {
                    self.generation = g;
                    crate::elog!(
                        "nbdmirror: every peer is in sync and flushed: generation {:016x} handed \
                         over (a peer promoted now takes this node back as a secondary)",
                        g.current
                    );
                }
                Err(e) => crate::elog!("nbdmirror: {e}"),
            }
        }
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            self.close_link(io, id);
        }
        self.scrub.save_and_wait();
        for p in &mut self.peers {
            let f = p.bitmap.flags() | FLAG_CLEAN;
            if let Err(e) = p.bitmap.set_flags(f) {
                crate::elog!("nbdmirror: {e}");
            }
        }
        // Only a socket this node bound (not another node's it left alone).
        if let (Some(p), Some(_)) = (&self.cfg.admin_socket, &self.admin) {
            let _ = std::fs::remove_file(p);
        }
    }

    // ----- the replicated write path (primary) -----------------------------

    #[allow(clippy::too_many_arguments)]
    pub fn client_write(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
    ) {
        self.t = io.now();
        self.submit_or_park(
            io,
            store,
            Parked::Write {
                rid,
                offset,
                buf,
                at,
                len,
                fua,
            },
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub fn client_zero(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
        trim: bool,
    ) {
        self.t = io.now();
        self.submit_or_park(
            io,
            store,
            Parked::Zero {
                rid,
                offset,
                len,
                no_hole,
                fua,
                trim,
            },
        );
    }

    pub fn client_flush(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64) {
        self.t = io.now();
        let mut mask = 0u64;
        for i in 0..self.peers.len() {
            if !self.peers[i].streaming() {
                continue;
            }
            let link = self.peers[i].link.unwrap();
            self.send_frame(link, FrameKind::Flush, &[&rid.to_le_bytes()]);
            let upto = self.peers[i].unflushed_counter;
            self.peers[i].outstanding.insert(
                rid,
                Out::Flush {
                    since: self.t,
                    batches: Vec::new(),
                    upto,
                },
            );
            mask |= 1 << i;
            self.post_send(io, link);
        }
        self.ops.insert(
            rid,
            MOp {
                offset: 0,
                locked: false,
                local: None,
                mask,
            },
        );
        store.flush(io, rid);
    }

    /// Release the range lock starting at `s` if `owner` holds it.
    fn unlock(&mut self, s: u64, owner: u64) {
        if self.locks.get(&s).is_some_and(|&(_, o)| o == owner) {
            self.locks.remove(&s);
        }
    }

    fn locked(&self, s: u64, e: u64) -> bool {
        self.locks
            .range(..e)
            .next_back()
            .is_some_and(|(_, &(end, _))| end > s)
    }

    fn submit_or_park(&mut self, io: &mut dyn Io, store: &mut Store, p: Parked) {
        let (s, e) = p.range();
        if self.locked(s, e)
            || self.parked.iter().any(|q| {
                let (a, b) = q.range();
                a < e && s < b
            })
        {
            self.parked.push_back(p);
            return;
        }
        self.dispatch(io, store, p);
    }

    fn unpark(&mut self, io: &mut dyn Io, store: &mut Store) {
        // Reads waiting on a lock (or a repair slot) read again once it is
        // free: whatever held it may have rewritten the blocks. No more
        // are let go than there are free slots, or all would come back.
        let mut slots = MAX_REPAIRS.saturating_sub(self.repairs.len());
        for (client, read) in std::mem::take(&mut self.repair_waiting) {
            let (s, e) = repair_range(&read);
            if self.locked(s, e) || slots == 0 || store.busy(s / BLOCK, (e - s) / BLOCK) {
                self.repair_waiting.push((client, read));
            } else if self.background.contains(&client) {
                // No read to run again: try the repair itself again.
                slots -= 1;
                self.start_repair(io, client, read);
            } else {
                slots -= 1;
                self.read_again(io, store, client, &read);
            }
        }
        let mut blocked: Vec<(u64, u64)> = Vec::new();
        let mut i = 0;
        while i < self.parked.len() {
            let (s, e) = self.parked[i].range();
            if self.locked(s, e) || blocked.iter().any(|&(a, b)| a < e && s < b) {
                blocked.push((s, e));
                i += 1;
                continue;
            }
            let p = self.parked.remove(i).unwrap();
            self.dispatch(io, store, p);
        }
    }

    fn dispatch(&mut self, io: &mut dyn Io, store: &mut Store, p: Parked) {
        // Every client write's record goes out here, parked ones too (a
        // reviewer: a write parked behind an overlapping one was sent after
        // a peer failed, under the old run).
        self.advance_run(io);
        let (s, e) = p.range();
        let (rid, hdr, data): (u64, RecordHeader, &[u8]) = match &p {
            Parked::Write {
                rid,
                buf,
                at,
                len,
                fua,
                ..
            } => (
                *rid,
                RecordHeader {
                    id: *rid,
                    offset: s,
                    length: *len as u32,
                    kind: wire::KIND_WRITE,
                    flags: if *fua { wire::FLAG_FUA } else { 0 },
                },
                &buf[*at..*at + *len],
            ),
            Parked::Zero {
                rid,
                len,
                no_hole,
                fua,
                trim,
                ..
            } => (
                *rid,
                RecordHeader {
                    id: *rid,
                    offset: s,
                    length: *len as u32,
                    kind: if *trim {
                        wire::KIND_TRIM
                    } else {
                        wire::KIND_ZERO
                    },
                    flags: (if *fua { wire::FLAG_FUA } else { 0 })
                        | (if *no_hole { wire::FLAG_NO_HOLE } else { 0 }),
                },
                &[],
            ),
        };
        self.locks.insert(s, (e, rid));
        let mut mask = 0u64;
        let h = hdr.encode();
        // A large write of whole blocks that goes in place goes to peers
        // that speak it as a SummedRecord: the block checksums an in-place
        // write needs anyway, computed once here, cover its data on the wire
        // in place of a frame checksum over all of it (one pass over the
        // bytes on each node instead of two), and the store takes them too.
        // Smaller writes go as Records: for a few blocks the second pass
        // costs little, and a Record's payload buffer is what the secondary
        // writes (in place or journaled) as it is, where a SummedRecord's
        // (its data after the checksums) would be copied when journaled.
        let min = store.large_min();
        let sums = (hdr.kind == wire::KIND_WRITE
            && min > 0
            && e - s >= min
            && wire::summable(s, e - s)
            && self
                .peers
                .iter()
                .any(|p| p.streaming() && p.version >= SUMMED_VERSION))
        .then(|| crate::store::checksum::checksums_of(s / wire::SUMMED_BLOCK, data));
        let sum_bytes = sums.as_deref().map(wire::encode_block_sums);
        for i in 0..self.peers.len() {
            if self.peers[i].streaming() {
                let link = self.peers[i].link.unwrap();
                match &sum_bytes {
                    Some(b) if self.peers[i].version >= SUMMED_VERSION => {
                        self.send_frame(link, FrameKind::SummedRecord, &[&h, b, data])
                    }
                    _ => self.send_frame(link, FrameKind::Record, &[&h, data]),
                }
                self.peers[i].outstanding.insert(
                    rid,
                    Out::Write {
                        offset: s,
                        len: e - s,
                        since: self.t,
                    },
                );
                mask |= 1 << i;
                self.post_send(io, link);
            } else {
                self.peers[i].bitmap.set_range(s, e - s);
            }
        }
        self.ops.insert(
            rid,
            MOp {
                offset: s,
                locked: true,
                local: None,
                mask,
            },
        );
        match p {
            Parked::Write {
                rid,
                offset,
                buf,
                at,
                len,
                fua,
            } => store.write_summed(io, rid, offset, buf, at, len, fua, sums),
            Parked::Zero {
                rid,
                offset,
                len,
                no_hole,
                fua,
                ..
            } => store.write_zeroes(io, rid, offset, len, no_hole, fua),
        }
    }

    fn try_complete(&mut self, rid: u64) -> bool {
        let Some(op) = self.ops.get(&rid) else {
            return false;
        };
        let Some(r) = op.local else {
            return false;
        };
        if op.mask != 0 {
            return false;
        }
        let op = self.ops.remove(&rid).unwrap();
        if op.locked {
            self.unlock(op.offset, rid);
        }
        self.answers.push((rid, r));
        true
    }

    /// A store event for a request the mirror owns (see [`Mirror::owns`]).
    pub fn store_event(&mut self, io: &mut dyn Io, store: &mut Store, ev: StoreEvent) {
        self.t = io.now();
        match ev {
            StoreEvent::Written(rid, r) | StoreEvent::Flushed(rid, r) => {
                let rid = self.repair_parts.remove(&rid).unwrap_or(rid);
                if self.repairs.contains_key(&rid) {
                    self.repair_written(io, store, rid, r);
                    return;
                }
                if rid & MIRROR_RID != 0 {
                    self.applied(io, store, rid, r);
                    return;
                }
                if let Some(op) = self.ops.get_mut(&rid) {
                    op.local = Some(r);
                }
                if self.try_complete(rid) {
                    self.unpark(io, store);
                    self.kick_resync(io, store);
                }
            }
            StoreEvent::Read(rid, r) if self.scrub.owns(rid) => {
                self.scrub_read_done(io, store, rid, r);
            }
            StoreEvent::Read(rid, r) if self.verify_reads.contains_key(&rid) => {
                self.verify_read_done(io, store, rid, r);
            }
            StoreEvent::Read(rid, r) => {
                // Blocks that failed verification are reported by the
                // store for whoever asked.
                let corrupt = store.take_corrupt(rid);
                if let Some((link, id)) = self.peer_reads.remove(&rid) {
                    self.peer_read_done(io, link, id, r);
                } else {
                    self.resync_read_done(io, store, rid, r, corrupt);
                }
            }
        }
    }

    // ----- read repair ------------------------------------------------------

    /// A client read (`client`) failed because blocks of the data file did
    /// not verify: repair them from an in-sync peer and read again (the
    /// store answers the read as usual). `Started`, or `Waiting` when its
    /// blocks are locked or every repair slot is taken (it is read again
    /// later; that is no attempt of its own); `No` when there is nothing
    /// to repair from (not a primary, no peer in sync): the caller answers
    /// EIO.
    pub fn repair_read(&mut self, io: &mut dyn Io, client: u64, read: CorruptRead) -> RepairStart {
        self.t = io.now();
        // Also while shutting down: the peers stay connected until the end,
        // and a repair in flight keeps the mirror from being quiet.
        if self.cfg.role != NodeRole::Primary || read.blocks.is_empty() {
            return RepairStart::No;
        }
        let (s, e) = repair_range(&read);
        let (first, n) = (s / BLOCK, (e - s) / BLOCK);
        if !self.peers.iter().any(|p| repair_source(p, false, first, n)) {
            return RepairStart::No;
        }
        let waiting = self.repair_waiting.len();
        self.start_repair(io, client, read);
        if self.repair_waiting.len() > waiting {
            RepairStart::Waiting
        } else {
            RepairStart::Started
        }
    }

    /// Start repairing the first run of bad blocks of `read` (a read whose
    /// bad blocks lie further apart is repaired a request at a time), or
    /// keep it waiting while its blocks are locked (a write to them is in
    /// flight, which changes them and their checksums, or another read's
    /// repair is at them) or too many repairs are in flight: `unpark`
    /// reads it again then. With no peer in sync any more: EIO.
    fn start_repair(&mut self, io: &mut dyn Io, client: u64, read: CorruptRead) {
        let (s, e) = repair_range(&read);
        if self.locked(s, e) || self.repairs.len() >= MAX_REPAIRS {
            self.repair_waiting.push((client, read));
            return;
        }
        let first = read.blocks[0];
        let n = (e - s) / BLOCK;
        let id = MIRROR_RID | self.next_mrid;
        self.next_mrid += 1;
        self.locks.insert(s, (e, id));
        self.repairs.insert(
            id,
            Repair {
                client,
                read,
                peer: 0,
                first,
                n,
                asked: true,
                writes_left: 0,
                failed: None,
                tried: Vec::new(),
            },
        );
        if !self.ask_next_peer(io, id) {
            // No peer left since `repair_read` looked (not reached today).
            if let Some(r) = self.take_repair(id) {
                if let Some(step) = self.scrub.steps.get_mut(&r.client) {
                    // A scrub's: its blocks are beyond repair; the step
                    // starts over at the next tick.
                    let run = std::mem::take(&mut step.bad);
                    step.unrepairable.extend(run);
                    self.scrub.again(r.client);
                } else if !self.background.remove(&r.client) {
                    self.answers.push((r.client, Err(libc::EIO)));
                }
            }
        }
    }

    /// Send repair `id`'s BlockRequest to an in-sync peer not asked yet.
    /// False when there is none.
    fn ask_next_peer(&mut self, io: &mut dyn Io, id: u64) -> bool {
        let Some(r) = self.repairs.get(&id) else {
            return false;
        };
        // In-sync peers first; a peer being resynced holds the same data
        // except in its dirty blocks, and whatever it sends is checked
        // against this node's checksums anyway.
        let (first, n) = (r.first, r.n);
        let Some(i) = [true, false].into_iter().find_map(|in_sync| {
            (0..self.peers.len()).find(|&i| {
                repair_source(&self.peers[i], in_sync, first, n) && !r.tried.contains(&i)
            })
        }) else {
            return false;
        };
        let (first, n) = (r.first, r.n);
        let p = &mut self.peers[i];
        let link = p.link.unwrap();
        p.outstanding.insert(id, Out::Repair { since: self.t });
        crate::elog!(
            "nbdmirror: asking peer {} ({}) for its copy of blocks {first}..{} to repair them",
            p.node_id,
            p.addr,
            first + n
        );
        let r = self.repairs.get_mut(&id).unwrap();
        r.peer = i;
        r.tried.push(i);
        r.asked = true;
        r.failed = None;
        self.send_frame(
            link,
            FrameKind::BlockRequest,
            &[&wire::encode_block_request(id, first, n as u32)],
        );
        self.post_send(io, link);
        true
    }

    /// A BlockData frame from peer `i`.
    fn repair_data(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        i: usize,
        payload: &[u8],
    ) -> Result<(), String> {
        let (id, errno, data) = wire::decode_block_data(payload)?;
        if !matches!(self.peers[i].outstanding.get(&id), Some(Out::Repair { .. })) {
            return Err(format!("BlockData for unknown request {id}"));
        }
        self.peers[i].outstanding.remove(&id);
        let Some(r) = self.repairs.get_mut(&id) else {
            return Err(format!("BlockData for unknown request {id}"));
        };
        let node = self.peers[i].node_id;
        if errno == 0 && data.len() as u64 != r.n * BLOCK {
            return Err(format!(
                "BlockData carries {} bytes for {} blocks",
                data.len(),
                r.n
            ));
        }
        if errno != 0 {
            crate::elog!(
                "nbdmirror: peer {node} could not read blocks {}..{} either ({})",
                r.first,
                r.first + r.n,
                errno_str(errno as i32)
            );
            if !self.ask_next_peer(io, id) {
                crate::elog!("nbdmirror: no other peer to ask; the read fails with EIO");
                self.finish_repair(io, store, id, false);
            }
            return Ok(());
        }
        r.asked = false;
        // Only the blocks that failed are rewritten, run by run; the ones
        // between them verified here and may be newer than the peer's.
        let bad: Vec<u64> = r
            .read
            .blocks
            .iter()
            .copied()
            .filter(|&b| b < r.first + r.n)
            .collect();
        let first = r.first;
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in bad {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == b => *n += 1,
                _ => runs.push((b, 1)),
            }
        }
        // One store write per run; the repair finishes when the last one
        // is answered.
        r.writes_left = runs.len() as u64;
        let several = runs.len() > 1;
        for (b, k) in runs {
            let at = ((b - first) * BLOCK) as usize;
            let bytes = data[at..at + (k * BLOCK) as usize].to_vec();
            let part = if several {
                let part = MIRROR_RID | self.next_mrid;
                self.next_mrid += 1;
                self.repair_parts.insert(part, id);
                part
            } else {
                id
            };
            store.repair(io, part, b * BLOCK, bytes);
        }
        Ok(())
    }

    /// A store rewrite of a repair finished.
    fn repair_written(&mut self, io: &mut dyn Io, store: &mut Store, id: u64, r: Result<(), i32>) {
        let Some(rep) = self.repairs.get_mut(&id) else {
            return;
        };
        if let Err(e) = r {
            rep.failed = rep.failed.or(Some(e));
        }
        rep.writes_left -= 1;
        if rep.writes_left > 0 {
            return;
        }
        if let Some(e) = rep.failed {
            let node = self.peers[rep.peer].node_id;
            let (first, end) = (rep.first, rep.first + rep.n);
            match e {
                // A write reached the blocks meanwhile (only a journal or
                // apply state the lock does not cover): read again once the
                // store has applied it (`unpark` waits for that, and the
                // store is asked to sync now rather than at its interval),
                // not at once: that spun, a repair round trip and two log
                // lines at a time, and ran the read out of repairs (EIO).
                libc::EAGAIN => {
                    if let Some(r) = self.take_repair(id) {
                        self.repair_waiting.push((r.client, r.read));
                    }
                    store.hurry(io);
                }
                libc::EILSEQ => {
                    crate::elog!(
                        "nbdmirror: peer {node}'s copy of blocks {first}..{end} does not match \
                         this node's checksums (a block rewritten in part since it went bad \
                         cannot be repaired); asking another peer if there is one"
                    );
                    if !self.ask_next_peer(io, id) {
                        self.finish_repair(io, store, id, false);
                    }
                }
                _ => {
                    crate::elog!(
                        "nbdmirror: rewriting blocks {first}..{end} from peer {node}'s copy \
                         failed: {}; the read fails with EIO",
                        errno_str(e)
                    );
                    self.finish_repair(io, store, id, false);
                }
            }
            return;
        }
        let k = rep
            .read
            .blocks
            .iter()
            .filter(|&&b| b < rep.first + rep.n)
            .count();
        crate::elog!(
            "nbdmirror: repaired {k} block{} in blocks {}..{} from peer {}'s copy",
            if k == 1 { "" } else { "s" },
            rep.first,
            rep.first + rep.n,
            self.peers[rep.peer].node_id
        );
        self.finish_repair(io, store, id, true);
    }

    /// End repair `id`: unlock its blocks, then read again (`ok`) or answer
    /// the client EIO.
    fn finish_repair(&mut self, io: &mut dyn Io, store: &mut Store, id: u64, ok: bool) {
        let Some(r) = self.take_repair(id) else {
            return;
        };
        if self.background.remove(&r.client) {
            // Nobody reads; resync comes back to the blocks by itself.
        } else if ok {
            self.read_again(io, store, r.client, &r.read);
        } else if self.scrub.owns(r.client) {
            self.scrub_unrepaired(io, store, r.client);
        } else {
            self.answers.push((r.client, Err(libc::EIO)));
        }
        self.unpark(io, store);
        self.kick_resync(io, store);
    }

    /// Forget repair `id` and release its blocks' lock.
    fn take_repair(&mut self, id: u64) -> Option<Repair> {
        let r = self.repairs.remove(&id)?;
        self.unlock(r.first * BLOCK, id);
        Some(r)
    }

    /// A BlockRequest's store read finished (secondary): send the data.
    fn peer_read_done(&mut self, io: &mut dyn Io, link: u64, id: u64, r: Result<Vec<u8>, i32>) {
        match r {
            Ok(mut buf) => {
                // Sent from the buffer it was read into, as resync records
                // are: no copy of up to 1 MiB into the send queue.
                buf[HEADER_LEN..HEADER_LEN + wire::BLOCK_DATA_HEADER]
                    .copy_from_slice(&wire::encode_block_data_header(id, 0));
                self.send_frame_owned(link, FrameKind::BlockData, buf);
            }
            Err(e) => {
                self.send_frame(
                    link,
                    FrameKind::BlockData,
                    &[&wire::encode_block_data_header(id, e as u32)],
                );
            }
        }
        self.post_send(io, link);
    }

    // ----- peer failure -----------------------------------------------------

    fn fail_peer(&mut self, io: &mut dyn Io, store: &mut Store, i: usize, why: String) {
        let streaming = matches!(self.peers[i].state, PeerState::Syncing | PeerState::InSync);
        // Writes from now on miss it: they go under the next run.
        self.run_due |= streaming;
        let p = &mut self.peers[i];
        if streaming {
            crate::elog!(
                "nbdmirror: peer {} ({}) disconnected: {why}; writes continue and are recorded in its bitmap",
                p.node_id, p.addr
            );
        } else if p.last_error.as_deref() != Some(why.as_str()) {
            crate::elog!("nbdmirror: peer {} ({}): {why}", p.node_id, p.addr);
        }
        p.last_error = Some(why);
        p.state = PeerState::Disconnected;
        p.epoch += 1;
        p.retry_at = self.t + p.backoff;
        p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
        p.resync_inflight = 0;
        p.acked.clear();
        p.acked_bytes = 0;
        p.flush_in_flight = false;
        p.compare = None;
        p.pending_session = None;
        for (_, off, len) in p.unflushed.drain(..) {
            p.bitmap.set_range(off, len);
        }
        let mut check = Vec::new();
        let mut verifying = Vec::new();
        for (id, out) in p.outstanding.drain() {
            match out {
                Out::Write { offset, len, .. } => {
                    p.bitmap.set_range(offset, len);
                    check.push(id);
                }
                Out::Flush { .. } => check.push(id),
                Out::Verify { .. } => verifying.push(id),
                Out::Resync { .. } | Out::Repair { .. } => {}
            }
        }
        let link = p.link.take();
        for id in verifying {
            self.scrub_peer_answered(io, store, id, i, None);
        }
        for id in check {
            if let Some(op) = self.ops.get_mut(&id) {
                op.mask &= !(1u64 << i);
            }
            self.try_complete(id);
        }
        if let Handover::Waiting(w) = &self.handover {
            if w.values().any(|&p| p == i) {
                self.handover = Handover::Done(false);
                crate::elog!(
                    "nbdmirror: switchover NOT done: peer {} failed during the handover ({}); \
                     this node stays the primary of its generation, and a peer promoted now \
                     meets it as split brain",
                    self.peers[i].node_id,
                    self.peers[i]
                        .last_error
                        .as_deref()
                        .unwrap_or("disconnected")
                );
            }
        }
        // Repairs waiting for this peer's data read again: another peer
        // may be in sync, and if not the read fails as before.
        let waiting: Vec<u64> = self
            .repairs
            .iter()
            .filter(|(_, r)| r.peer == i && r.asked)
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            self.finish_repair(io, store, id, true);
        }
        if let Some(l) = link {
            self.close_link(io, l);
        }
        self.unpark(io, store);
    }

    // ----- links ------------------------------------------------------------

    fn hs_config(&self, expected_peer: Option<u32>) -> HsConfig {
        HsConfig {
            secret: self.cfg.secret.clone(),
            volume_uuid: self.volume_uuid,
            node_id: self.node_id,
            expected_peer,
            generations: GenerationIds {
                current: self.generation.current,
                // A secondary's session (see FrameKind::Session); 0 on a primary.
                bitmap: self.generation.session,
                history: [self.generation.previous, self.generation.wire_flags()],
            },
            // v1 carries the disk size here (see docs/peer-protocol.md).
            last_applied_seq: self.size,
            nonce: nonce(),
        }
    }

    fn new_link(&mut self, fd: OwnedFd, peer: Option<usize>, addr: String) -> u64 {
        let id = self.next_link;
        self.next_link += 1;
        self.links.insert(
            id,
            Link {
                fd,
                peer,
                addr,
                hs: None,
                session: None,
                rbuf: None,
                recv_busy: false,
                recv_body: false,
                after_body: false,
                send_busy: false,
                connect_busy: false,
                segs: VecDeque::new(),
                out: Vec::new(),
                spare: Vec::new(),
                closing: false,
                close_after_send: false,
                opened: self.t,
                last_rx: self.t,
                last_tx: self.t,
                held: false,
                version: 0,
                announced: false,
                session_started: false,
                pending_run: None,
                primary_generation: 0,
            },
        );
        id
    }

    fn connect(&mut self, io: &mut dyn Io, i: usize) {
        if self.shutting_down || self.peers[i].link.is_some() {
            return;
        }
        let addr = self.peers[i].addr;
        let fd = match io.tcp_socket(addr.is_ipv6()) {
            Ok(fd) => fd,
            Err(e) => {
                self.peers[i].last_error = Some(format!("cannot create a socket: {e}"));
                self.peers[i].retry_at = self.t + BACKOFF_MAX;
                return;
            }
        };
        let raw = fd.as_raw_fd();
        let id = self.new_link(fd, Some(i), addr.to_string());
        self.links.get_mut(&id).unwrap().connect_busy = true;
        self.peers[i].link = Some(id);
        if self.peers[i].state != PeerState::Disconnected {
            self.peers[i].state = PeerState::Connecting;
        }
        io.submit(
            tok(KIND_PEER, id << 2 | SUB_CONNECT),
            Op::connect(raw, &addr, self.cfg.timeout),
        );
    }

    fn send_frame(&mut self, link: u64, kind: FrameKind, parts: &[&[u8]]) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Some(s) = l.session.as_mut() else {
            return;
        };
        encode_parts(kind, s.next_send_seq, parts, &mut l.out);
        s.next_send_seq += 1;
    }

    /// Send a frame whose payload is already in `buf[HEADER_LEN..]` as it
    /// is, without copying it into the send batch (resync records: 1 MiB
    /// read straight into a buffer with room for the headers).
    fn send_frame_owned(&mut self, link: u64, kind: FrameKind, mut buf: Vec<u8>) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Some(s) = l.session.as_mut() else {
            return;
        };
        encode_in_place(kind, s.next_send_seq, &mut buf);
        s.next_send_seq += 1;
        if !l.out.is_empty() {
            let mut fresh = std::mem::take(&mut l.spare);
            fresh.clear();
            let older = std::mem::replace(&mut l.out, fresh);
            l.segs.push_back(older);
        }
        l.segs.push_back(buf);
    }

    /// Queue a link for sending: frames produced while one batch of
    /// completions is handled go out together in one send per link
    /// ([`Mirror::flush_sends`], called by the loop after each batch).
    fn post_send(&mut self, _io: &mut dyn Io, link: u64) {
        if !self.send_queue.contains(&link) {
            self.send_queue.push(link);
        }
    }

    /// Start the sends queued by [`Mirror::post_send`].
    pub fn flush_sends(&mut self, io: &mut dyn Io) {
        self.t = io.now();
        while !self.send_queue.is_empty() {
            for link in std::mem::take(&mut self.send_queue) {
                self.submit_send(io, link);
            }
        }
    }

    fn submit_send(&mut self, io: &mut dyn Io, link: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.send_busy
            || (l.out.is_empty() && l.segs.is_empty())
            || (l.closing && !l.close_after_send)
        {
            return;
        }
        let buf = match l.segs.pop_front() {
            Some(b) => b,
            None => {
                let mut buf = std::mem::take(&mut l.spare);
                buf.clear();
                std::mem::swap(&mut buf, &mut l.out);
                buf
            }
        };
        l.send_busy = true;
        l.last_tx = self.t;
        io.submit(
            tok(KIND_PEER, link << 2 | SUB_SEND),
            Op::Send {
                fd: l.fd.as_raw_fd(),
                buf,
                at: 0,
            },
        );
    }

    fn post_recv(&mut self, io: &mut dyn Io, link: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.recv_busy || l.closing || l.held {
            return;
        }
        l.recv_busy = true;
        // The rest of a large payload is received straight into its buffer.
        if let Some(s) = l.session.as_mut() {
            while s.decoder.wants_spare() {
                match self.spare_payloads.pop() {
                    Some(b) => s.decoder.recycle(b),
                    None => break,
                }
            }
            if let Some((buf, filled)) = s.decoder.take_body_target() {
                l.recv_body = true;
                io.submit(
                    tok(KIND_PEER, link << 2 | SUB_RECV),
                    Op::Recv {
                        fd: l.fd.as_raw_fd(),
                        end: buf.len(),
                        buf,
                        at: filled,
                    },
                );
                return;
            }
        }
        // Until the peer has authenticated, a small buffer: a flood of
        // connections that never finish the handshake cost 1 MiB each
        // (a tester's 3000 half Hellos: 418 MB on a secondary).
        let want = if l.session.is_some() {
            RECV_BUF
        } else {
            HANDSHAKE_RECV_BUF
        };
        let buf = match l.rbuf.take() {
            Some(b) if b.len() >= want => b,
            _ => vec![0u8; want],
        };
        let end = if std::mem::take(&mut l.after_body) {
            SMALL_RECV.min(buf.len())
        } else {
            buf.len()
        };
        io.submit(
            tok(KIND_PEER, link << 2 | SUB_RECV),
            Op::Recv {
                fd: l.fd.as_raw_fd(),
                end,
                buf,
                at: 0,
            },
        );
    }

    fn close_link(&mut self, io: &mut dyn Io, link: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.closing = true;
        if l.close_after_send && (l.send_busy || !l.out.is_empty() || !l.segs.is_empty()) {
            // A Reject is on its way out; `sent` closes after it.
            return;
        }
        l.close_after_send = false;
        io.shutdown(l.fd.as_raw_fd());
        self.reap_link(link);
    }

    /// Log `why`, send it to the primary on `link` in a Reject, and close
    /// the link once it is out: from now on nothing more is received or
    /// processed on it.
    fn refuse_primary(
        &mut self,
        io: &mut dyn Io,
        link: u64,
        code: crate::peer::RejectCode,
        why: &str,
    ) {
        crate::elog!("nbdmirror: {why}");
        let l = self.links.get_mut(&link).unwrap();
        if let Some(s) = l.session.as_mut() {
            s.reject(code, why, &mut l.out);
        }
        l.close_after_send = true;
        self.post_send(io, link);
        self.close_link(io, link);
    }

    /// A primary (`info`) knocked while the session on `live` held this
    /// secondary (see `pending_divergence`). If it is another node, promoted
    /// from the generation this replica follows with that session's
    /// primary, two primaries of one history run at once.
    fn note_divergence(&mut self, live: u64, info: &crate::peer::handshake::PeerInfo) {
        let ours = self.generation.current;
        let Some(s) = self.links.get(&live).and_then(|l| l.session.as_ref()) else {
            return;
        };
        let (cur, prev) = (info.generations.current, info.generations.history[0]);
        if ours == 0
            || self.generation.flags & generation::FLAG_PRIMARY != 0
            || s.peer.node_id == info.node_id
            || s.peer.generations.current != ours
            || cur == ours
            || prev != ours
            || self.diverged.is_some_and(|d| d.generation == cur)
            || self
                .pending_divergence
                .is_some_and(|(_, d)| d.generation == cur)
        {
            return;
        }
        crate::elog!(
            "nbdmirror: WARNING: node {} was promoted (generation {cur:016x}) from the generation \
             this replica follows ({ours:016x}) while the session with node {}, its primary, is \
             alive: two primaries at once, unless node {} is gone (its session then times out). \
             If it sends another write, node {} is refused as split brain from then on",
            info.node_id,
            s.peer.node_id,
            s.peer.node_id,
            info.node_id
        );
        self.pending_divergence = Some((
            s.peer.node_id,
            generation::Diverged {
                generation: cur,
                followed: ours,
                node_id: info.node_id,
            },
        ));
    }

    fn reap_link(&mut self, link: u64) {
        if let Some(l) = self.links.get(&link) {
            if l.closing && !l.recv_busy && !l.send_busy && !l.connect_busy {
                self.links.remove(&link);
            }
        }
    }

    /// A link failed: on a primary the peer is failed, on a secondary the
    /// link is closed.
    fn link_failed(&mut self, io: &mut dyn Io, store: &mut Store, link: u64, why: String) {
        let Some(l) = self.links.get(&link) else {
            return;
        };
        if l.closing {
            self.reap_link(link);
            return;
        }
        match l.peer {
            Some(i) if self.peers[i].link == Some(link) => self.fail_peer(io, store, i, why),
            _ => {
                if l.session.is_some() {
                    crate::elog!("nbdmirror: replication link from {} closed: {why}", l.addr);
                } else {
                    crate::elog!("nbdmirror: peer connection from {}: {why}", l.addr);
                }
                self.close_link(io, link);
            }
        }
    }

    pub fn complete(&mut self, io: &mut dyn Io, store: &mut Store, c: Completion) {
        self.t = io.now();
        let kind = c.token >> KIND_SHIFT;
        let id = c.token & ID_MASK;
        match kind {
            KIND_PEER_LISTEN => self.peer_accepted(io, c),
            KIND_ADMIN_LISTEN => self.admin_accepted(io, c),
            KIND_ADMIN => self.admin_io(io, store, id, c),
            KIND_PEER => {
                let link = id >> 2;
                match id & 3 {
                    SUB_CONNECT => self.connected(io, store, link, c),
                    SUB_RECV => self.received(io, store, link, c),
                    SUB_SEND => self.sent(io, store, link, c),
                    _ => {}
                }
            }
            _ => {}
        }
    }

    fn peer_accepted(&mut self, io: &mut dyn Io, c: Completion) {
        if self.shutting_down {
            if c.result >= 0 {
                // SAFETY: fresh descriptor from accept.
                drop(unsafe { OwnedFd::from_raw_fd(c.result) });
            }
            return;
        }
        if c.result < 0 && self.accept_backoff.failed("peer accept", -c.result) {
            self.peer_accept_paused = true;
            return;
        }
        if let Some(l) = &self.listener {
            io.submit(tok(KIND_PEER_LISTEN, 0), Op::Accept { fd: l.as_raw_fd() });
        }
        if c.result < 0 {
            return;
        }
        // SAFETY: fresh descriptor from accept.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
        crate::server::set_nodelay(fd.as_raw_fd());
        let addr = peer_name(fd.as_raw_fd());
        let id = self.new_link(fd, None, addr);
        match Handshake::with_version(
            Role::Responder,
            self.hs_config(None),
            self.cfg.protocol_version,
        ) {
            Ok(h) => self.links.get_mut(&id).unwrap().hs = Some(Box::new(h)),
            Err(e) => {
                crate::elog!("nbdmirror: cannot start a peer handshake: {e}");
                self.close_link(io, id);
                return;
            }
        }
        self.post_recv(io, id);
    }

    fn connected(&mut self, io: &mut dyn Io, store: &mut Store, link: u64, c: Completion) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.connect_busy = false;
        if l.closing {
            self.reap_link(link);
            return;
        }
        if c.result < 0 {
            let why = if c.result == -libc::ECANCELED {
                format!("connect timed out after {:?}", self.cfg.timeout)
            } else {
                format!("cannot connect: {}", errno_str(-c.result))
            };
            self.link_failed(io, store, link, why);
            return;
        }
        if crate::server::connected_to_itself(l.fd.as_raw_fd()) {
            // Nobody listens at the peer's address on this host, and the
            // kernel gave our socket that very port: left open, it would
            // keep the peer from listening there when it starts.
            self.link_failed(
                io,
                store,
                link,
                "cannot connect: nothing listens there (the socket connected to itself)".into(),
            );
            return;
        }
        let expected = l.peer.map(|i| self.peers[i].node_id);
        match Handshake::with_version(
            Role::Initiator,
            self.hs_config(expected),
            self.cfg.protocol_version,
        ) {
            Ok(h) => {
                let l = self.links.get_mut(&link).unwrap();
                l.hs = Some(Box::new(h));
                l.opened = self.t;
                l.last_rx = self.t;
            }
            Err(e) => {
                self.link_failed(io, store, link, format!("cannot start the handshake: {e}"));
                return;
            }
        }
        self.handshake_events(io, store, link);
        self.post_recv(io, link);
    }

    fn handshake_events(&mut self, io: &mut dyn Io, store: &mut Store, link: u64) {
        let mut established = None;
        let mut rejected = None;
        {
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            let Some(hs) = l.hs.as_mut() else {
                return;
            };
            while let Some(ev) = hs.poll_event() {
                match ev {
                    Event::Send(b) => l.out.extend_from_slice(&b),
                    Event::Established(info) => established = Some(info),
                    Event::Rejected { reason, by_peer } => rejected = Some((reason, by_peer)),
                }
            }
        }
        self.post_send(io, link);
        if let Some((reason, by_peer)) = rejected {
            let l = self.links.get_mut(&link).unwrap();
            l.hs = None;
            let who = if by_peer {
                "the peer refused us"
            } else {
                "refused the peer"
            };
            let why = format!("handshake failed ({who}): {reason}");
            match l.peer {
                Some(i) if self.peers[i].link == Some(link) => {
                    // Let the Reject go out before closing.
                    l.close_after_send = true;
                    self.fail_peer(io, store, i, why);
                }
                _ => {
                    crate::elog!("nbdmirror: peer connection from {}: {why}", l.addr);
                    l.close_after_send = true;
                    self.close_link(io, link);
                }
            }
            return;
        }
        if let Some(info) = established {
            let l = self.links.get_mut(&link).unwrap();
            let hs = l.hs.take().unwrap();
            l.session = hs.into_session();
            l.version = info.version;
            if l.peer.is_none() {
                // Secondary: place each large record so that its data (after
                // the record header) is aligned, for O_DIRECT writes.
                // (Only records large enough to go in place: smaller ones go
                // through the journal, which puts its header right before
                // the data.)
                if let Some(s) = l.session.as_mut() {
                    let min = wire::RECORD_HEADER + store.inplace_min() as usize;
                    s.decoder.align_large_payloads(wire::RECORD_HEADER, min);
                }
            }
            l.last_rx = self.t;
            match l.peer {
                Some(i) => {
                    if info.version != self.peers[i].version {
                        crate::elog!(
                            "nbdmirror: peer {} speaks peer protocol version {}{}",
                            self.peers[i].node_id,
                            info.version,
                            if info.version < REPAIR_VERSION {
                                ": no read repair from it until it is upgraded"
                            } else {
                                ""
                            }
                        );
                    }
                    self.peers[i].version = info.version;
                    let theirs = Generation {
                        current: info.generations.current,
                        previous: info.generations.history[0],
                        flags: info.generations.history[1] as u32,
                        session: info.generations.bitmap,
                        epoch: (info.generations.history[1] >> 32) as u32,
                        from_epoch: 0,
                    };
                    let verdict = if info.last_applied_seq != self.size {
                        Verdict::SplitBrain(format!(
                            "node {} has a {}-byte disk and this node a {}-byte one; a peer's \
                             replica must be the same size (re-initialise it with --size {})",
                            self.peers[i].node_id, info.last_applied_seq, self.size, self.size
                        ))
                    } else {
                        match generation::judge(&self.generation, &theirs, self.peers[i].node_id) {
                            Verdict::SplitBrain(why) => {
                                let id = self.peers[i].node_id;
                                // Only for data outside this node's history: a
                                // peer descended from it holds this node's writes.
                                let unrelated = theirs.current != self.generation.previous
                                    && theirs.previous != self.generation.current
                                    && theirs.current != self.generation.current;
                                let empty = if self.started_empty && unrelated {
                                    format!(
                                        " This node's replica was new when this process \
                                         started it as the primary: its clients see none of \
                                         the data node {id} holds (it started with an empty \
                                         disk). If that data is the volume's, stop this node, \
                                         move its replica directory away, re-initialise it and \
                                         start it as a secondary (--role secondary)."
                                    )
                                } else {
                                    String::new()
                                };
                                Verdict::SplitBrain(format!(
                                    "{why}.{empty} {}",
                                    generation::split_brain_advice(
                                        id,
                                        self.size,
                                        &crate::store::dir::format_uuid(&self.volume_uuid),
                                    )
                                ))
                            }
                            v => v,
                        }
                    };
                    match verdict {
                        Verdict::SplitBrain(why) => {
                            if let Some(s) = l.session.as_mut() {
                                s.reject(crate::peer::RejectCode::SplitBrain, &why, &mut l.out);
                            }
                            l.close_after_send = true;
                            self.post_send(io, link);
                            self.fail_peer(io, store, i, why);
                            return;
                        }
                        Verdict::ResyncCompare => {
                            let f = self.peers[i].bitmap.flags() | FLAG_COMPARE;
                            if let Err(e) = self.peers[i].bitmap.set_flags(f) {
                                self.fail_peer(io, store, i, e);
                                return;
                            }
                        }
                        Verdict::Resync => {}
                    }
                    if let Err(e) = self.start_session(io, i, link, theirs.session) {
                        self.fail_peer(io, store, i, e);
                        return;
                    }
                    // The reconnect backoff is reset when the peer answers
                    // in this session (`primary_frame`), not here: a peer
                    // that refuses the session (Busy: it follows another
                    // primary) would otherwise be retried every 100 ms.
                    let p = &mut self.peers[i];
                    p.last_error = None;
                    p.cursor = 0;
                    p.total = p.bitmap.dirty() * BLOCK;
                    p.resync_started = self.t;
                    p.sent_at_resync_start = p.sent_bytes;
                    p.rate = 0.0;
                    p.rate_mark = (self.t, p.sent_bytes);
                    p.rate_window = (self.t, p.sent_bytes);
                    p.compared_diff = 0;
                    p.compare_unsettled = false;
                    if p.bitmap.flags() & FLAG_COMPARE != 0 {
                        p.compare = Some((0, IdMap::default()));
                    }
                    p.state = if p.bitmap.dirty() > 0 || p.compare.is_some() {
                        PeerState::Syncing
                    } else {
                        PeerState::InSync
                    };
                    if p.state == PeerState::InSync {
                        // Even when it holds our generation already: from
                        // version 4 on, a secondary takes records before
                        // the announce as resync data (FLAG_INCONSISTENT).
                        self.announce_generation(io, i);
                    }
                    let p = &mut self.peers[i];
                    crate::elog!(
                        "nbdmirror: peer {} ({}) connected; {}",
                        p.node_id,
                        p.addr,
                        if p.compare.is_some() {
                            "comparing checksums".to_string()
                        } else if p.state == PeerState::Syncing {
                            format!("resyncing {} dirty bytes", p.total)
                        } else {
                            "in sync".to_string()
                        }
                    );
                    self.kick_resync(io, store);
                }
                None => {
                    crate::elog!(
                        "nbdmirror: primary node {} connected from {}",
                        info.node_id,
                        l.addr
                    );
                    // One primary at a time. A session that is still alive
                    // (heard from within the peer timeout, and at least two
                    // ping intervals: a live primary pings at least every
                    // PING_INTERVAL_MAX) keeps the secondary: the
                    // newcomer is refused, and none of its frames is looked
                    // at. A second primary (a copied node directory, a
                    // misconfigured node) must not take over the stream, or
                    // the secondary would hold writes its own primary never
                    // saw while both claim to be in sync.
                    let newcomer = l.addr.clone();
                    if info.last_applied_seq != self.size {
                        // The primary refuses a peer of another size; so
                        // does a secondary (a tester's authenticated peer
                        // claimed 128 MiB against 64 and was taken).
                        let why = format!(
                            "refusing primary node {} from {newcomer}: it has a {}-byte disk and \
                             this replica a {}-byte one; a peer's replica must be the same size",
                            info.node_id, info.last_applied_seq, self.size
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::Malformed, &why);
                        return;
                    }
                    let (t, timeout) = (self.t, self.cfg.timeout.max(PING_INTERVAL_MAX * 2));
                    let live = self
                        .links
                        .iter()
                        .find(|(&k, o)| {
                            k != link
                                && o.session.is_some()
                                && !o.closing
                                && t.saturating_duration_since(o.last_rx) <= timeout
                        })
                        .map(|(&k, o)| {
                            let who = match o.session.as_ref() {
                                Some(s) => {
                                    format!("primary node {} (at {})", s.peer.node_id, o.addr)
                                }
                                None => format!("primary at {}", o.addr),
                            };
                            (k, who, t.saturating_duration_since(o.last_rx))
                        });
                    if let Some((live_link, addr, quiet)) = live {
                        self.note_divergence(live_link, &info);
                        let why = format!(
                            "refusing primary node {} from {newcomer}: the session with the \
                             {addr} is alive (heard from {} ms ago); one primary at a \
                             time (a primary that reconnects gets in once its old session times \
                             out)",
                            info.node_id,
                            quiet.as_millis()
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::Busy, &why);
                        return;
                    }
                    let (cur, prev) = (info.generations.current, info.generations.history[0]);
                    if let Some(d) = self.diverged.filter(|d| d.refuses(cur, prev)) {
                        let why = format!(
                            "split brain: refusing primary node {} from {newcomer} (generation \
                             {cur:016x}): node {} was promoted to generation {:016x} while this \
                             replica went on taking writes from another primary of generation \
                             {:016x}, which node {} lacks. Nothing is written. Decide which \
                             history to keep: re-initialise this replica to follow node {} (its \
                             later writes are discarded), or re-initialise node {} (see {})",
                            info.node_id,
                            d.node_id,
                            d.generation,
                            d.followed,
                            d.node_id,
                            d.node_id,
                            d.node_id,
                            generation::Diverged::path(&self.cfg.dir).display()
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::SplitBrain, &why);
                        return;
                    }
                    let g = self.generation;
                    if g.flags & generation::FLAG_INCONSISTENT != 0
                        && g.current != 0
                        && cur != g.current
                        && prev != g.current
                    {
                        // A half copy of a generation this primary neither
                        // serves nor was promoted from: it may hold the last
                        // copy of that data. The primary's own check refuses
                        // it too (`generation::judge`); this one also holds
                        // against a primary of an older version.
                        let why = format!(
                            "split brain: refusing primary node {} from {newcomer} (generation \
                             {cur:016x}, after {prev:016x}): this replica is INCONSISTENT, a half \
                             copy of generation {:016x} (partway through a resync, or its crash \
                             recovery could not vouch for some blocks), which is not in that \
                             primary's history, and may hold the last copy of that data. Nothing \
                             is written. To give it the primary's data, re-initialise it; to keep \
                             its data, serve it as the primary (--role primary \
                             --force-inconsistent)",
                            info.node_id, g.current
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::SplitBrain, &why);
                        return;
                    }
                    if self
                        .pending_divergence
                        .is_some_and(|(old, _)| old != info.node_id)
                    {
                        // The old primary's session ended with no further
                        // record before this one was accepted: a failover.
                        self.pending_divergence = None;
                    }
                    // Older sessions that went quiet end, and this one waits
                    // until their records are applied, so no old record
                    // lands over a newer one.
                    let others: Vec<u64> = self
                        .links
                        .iter()
                        .filter(|(&k, o)| k != link && o.session.is_some() && !o.closing)
                        .map(|(&k, _)| k)
                        .collect();
                    for o in others {
                        crate::elog!("nbdmirror: closing the older replication session");
                        self.close_link(io, o);
                    }
                    let busy = self.applying.values().any(|&(l2, _, _)| l2 != link);
                    let l = self.links.get_mut(&link).unwrap();
                    l.held = busy;
                    l.primary_generation = cur;
                }
            }
            self.process_frames(io, store, link);
        }
    }

    fn received(&mut self, io: &mut dyn Io, store: &mut Store, link: u64, c: Completion) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.recv_busy = false;
        let Op::Recv { buf, .. } = c.op else {
            return;
        };
        let buf = if std::mem::take(&mut l.recv_body) {
            // The receive filled a large payload's own buffer: back to the
            // decoder; `rbuf` stands in below for the closing and error cases.
            if let Some(s) = l.session.as_mut() {
                s.decoder.body_received(buf, c.result.max(0) as usize);
            }
            if c.result > 0 && !l.closing {
                l.last_rx = self.t;
                l.after_body = true;
                self.process_frames(io, store, link);
                self.post_recv(io, link);
                return;
            }
            l.rbuf.take().unwrap_or_default()
        } else {
            buf
        };
        if l.closing {
            l.rbuf = Some(buf);
            self.reap_link(link);
            return;
        }
        if c.result <= 0 {
            l.rbuf = Some(buf);
            let why = if c.result == 0 {
                "the peer closed the connection".to_string()
            } else {
                format!("receive failed: {}", errno_str(-c.result))
            };
            if let Some(hs) = l.hs.as_mut() {
                hs.eof();
                self.handshake_events(io, store, link);
                if let Some(l) = self.links.get(&link) {
                    if !l.closing {
                        self.link_failed(io, store, link, why);
                    }
                }
                return;
            }
            self.link_failed(io, store, link, why);
            return;
        }
        let n = c.result as usize;
        l.last_rx = self.t;
        if let Some(hs) = l.hs.as_mut() {
            hs.receive(&buf[..n]);
            l.rbuf = Some(buf);
            self.handshake_events(io, store, link);
        } else if let Some(s) = l.session.as_mut() {
            s.decoder.push(&buf[..n]);
            l.rbuf = Some(buf);
            self.process_frames(io, store, link);
        } else {
            l.rbuf = Some(buf);
        }
        self.post_recv(io, link);
    }

    fn process_frames(&mut self, io: &mut dyn Io, store: &mut Store, link: u64) {
        loop {
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            if l.closing || l.held {
                return;
            }
            let Some(s) = l.session.as_mut() else {
                return;
            };
            let f = match s.decoder.pull() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // In an established session a frame that fails its
                    // checksum, or whose header is not even one (magic,
                    // layout version, length: checked before the checksum
                    // can be), was damaged on the way.
                    use crate::peer::frame::FrameError as E;
                    if matches!(
                        e,
                        E::ChecksumMismatch { .. }
                            | E::BadMagic { .. }
                            | E::UnsupportedVersion { .. }
                            | E::TooLarge { .. }
                    ) {
                        self.damaged_frames += 1;
                    }
                    self.link_failed(io, store, link, format!("bad frame: {e}"));
                    return;
                }
            };
            let kind = f.kind;
            let r = match l.peer {
                Some(i) => self.primary_frame(io, store, i, kind, f.payload()),
                None => session_order(&mut l.session_started, kind).and_then(|()| {
                    let (buf, at) = f.into_buf();
                    self.secondary_frame(io, store, link, kind, buf, at)
                }),
            };
            if let Err(why) = r {
                self.link_failed(io, store, link, why);
                return;
            }
        }
        self.post_send(io, link);
    }

    fn sent(&mut self, io: &mut dyn Io, store: &mut Store, link: u64, c: Completion) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Op::Send { fd, buf, at } = c.op else {
            return;
        };
        if c.result <= 0 {
            l.send_busy = false;
            l.spare = buf;
            l.out.clear();
            l.segs.clear();
            if l.close_after_send {
                l.close_after_send = false;
                self.close_link(io, link);
                return;
            }
            let why = format!("send failed: {}", errno_str(-c.result.min(-1)));
            self.link_failed(io, store, link, why);
            return;
        }
        let at = at + c.result as usize;
        if at < buf.len() {
            io.submit(
                tok(KIND_PEER, link << 2 | SUB_SEND),
                Op::Send { fd, buf, at },
            );
            return;
        }
        l.send_busy = false;
        // A large frame's own buffer is not kept as the spare batch buffer.
        if buf.capacity() <= RECV_BUF || l.spare.capacity() == 0 {
            l.spare = buf;
        }
        if l.out.is_empty() && l.segs.is_empty() && l.close_after_send {
            l.close_after_send = false;
            self.close_link(io, link);
            return;
        }
        if l.closing && !l.close_after_send {
            self.reap_link(link);
            return;
        }
        self.submit_send(io, link);
    }

    // ----- frames on a primary ---------------------------------------------

    fn primary_frame(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        i: usize,
        kind: FrameKind,
        payload: &[u8],
    ) -> Result<(), String> {
        if kind != FrameKind::Reject {
            // The peer handles frames in order and stores the session token
            // before the next one: any answer means it has it.
            if let Some(token) = self.peers[i].pending_session.take() {
                self.peers[i].bitmap.set_session(token)?;
                self.peers[i].backoff = BACKOFF_MIN;
            }
        }
        match kind {
            FrameKind::Ack => {
                let (id, errno) = wire::decode_answer(payload)?;
                if errno != 0 {
                    return Err(format!("peer failed a write: {}", errno_str(errno as i32)));
                }
                match self.peers[i].outstanding.remove(&id) {
                    Some(Out::Write { offset, len, .. }) => {
                        let p = &mut self.peers[i];
                        p.unflushed_counter += 1;
                        p.unflushed.push_back((p.unflushed_counter, offset, len));
                        if let Some(op) = self.ops.get_mut(&id) {
                            op.mask &= !(1u64 << i);
                        }
                        if self.try_complete(id) {
                            self.unpark(io, store);
                        }
                    }
                    Some(Out::Resync { first, n, .. }) => {
                        let p = &mut self.peers[i];
                        p.resync_inflight = p.resync_inflight.saturating_sub(n * BLOCK);
                        p.acked.push((first, n));
                        p.acked_bytes += n * BLOCK;
                        self.kick_resync(io, store);
                    }
                    Some(other) => {
                        // Back in place, so failing the peer accounts for it.
                        let what = format!("{other:?}");
                        self.peers[i].outstanding.insert(id, other);
                        return Err(format!("Ack for a request that was not a write: {what}"));
                    }
                    None => return Err(format!("Ack for unknown request {id}")),
                }
            }
            FrameKind::FlushAck => {
                let (id, errno) = wire::decode_answer(payload)?;
                if errno != 0 {
                    return Err(format!("peer failed a flush: {}", errno_str(errno as i32)));
                }
                match self.peers[i].outstanding.remove(&id) {
                    Some(Out::Flush { batches, upto, .. }) => {
                        let p = &mut self.peers[i];
                        while p.unflushed.front().is_some_and(|&(c, _, _)| c <= upto) {
                            p.unflushed.pop_front();
                        }
                        if id & MIRROR_RID != 0 {
                            p.flush_in_flight = false;
                            for (first, n) in batches {
                                p.bitmap.clear_blocks(first, n);
                            }
                            let mut again = false;
                            if p.compare_unsettled {
                                if id & !MIRROR_RID >= p.compare_settle_from {
                                    p.compare_unsettled = false;
                                    let f = p.bitmap.flags() & !FLAG_COMPARE;
                                    p.bitmap.set_flags(f)?;
                                } else {
                                    // Sent before the compare ended.
                                    again = true;
                                }
                            }
                            if let Handover::Waiting(w) = &mut self.handover {
                                if w.remove(&id).is_some() && w.is_empty() {
                                    self.handover = Handover::Done(true);
                                }
                            }
                            if again {
                                self.resync_flush(io, i);
                            }
                            self.kick_resync(io, store);
                        } else {
                            if let Some(op) = self.ops.get_mut(&id) {
                                op.mask &= !(1u64 << i);
                            }
                            self.try_complete(id);
                        }
                    }
                    other => {
                        if let Some(o) = other {
                            self.peers[i].outstanding.insert(id, o);
                        }
                        return Err(format!("FlushAck for unknown flush {id}"));
                    }
                }
            }
            FrameKind::Sums => self.sums_arrived(io, store, i, payload)?,
            FrameKind::BlockData => self.repair_data(io, store, i, payload)?,
            FrameKind::Verified => self.scrub_verified(io, store, i, payload)?,
            FrameKind::Pong => {}
            FrameKind::Ping => {
                let link = self.peers[i].link.unwrap();
                self.send_frame(link, FrameKind::Pong, &[payload]);
            }
            FrameKind::Reject => {
                let r = crate::peer::messages::Reject::decode(payload)
                    .map(|r| r.message)
                    .unwrap_or_else(|_| "(unreadable reason)".into());
                return Err(format!("the peer ended the session: {r}"));
            }
            k => return Err(format!("unexpected {k} frame from a secondary")),
        }
        Ok(())
    }

    // ----- frames on a secondary -------------------------------------------

    fn secondary_frame(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        link: u64,
        kind: FrameKind,
        buf: Vec<u8>,
        at: usize,
    ) -> Result<(), String> {
        let payload = &buf[at..];
        match kind {
            FrameKind::Record | FrameKind::SummedRecord => {
                // Where the data starts in the payload, and its block
                // checksums if they came with it (checked against the data
                // before anything else happens: the frame checksum does not
                // cover it).
                let (h, data_at, sums) = if kind == FrameKind::SummedRecord {
                    let v = self.links[&link].version;
                    if v < SUMMED_VERSION {
                        return Err(format!(
                            "peer sent a SummedRecord in a session at protocol version {v}"
                        ));
                    }
                    let r = wire::decode_summed(payload, self.size)?;
                    if let Err(e) = wire::verify_block_sums(&r, payload) {
                        self.damaged_records += 1;
                        return Err(e);
                    }
                    (r.header, r.data_at, Some(r.sums))
                } else {
                    (
                        RecordHeader::decode(payload, self.size)?,
                        wire::RECORD_HEADER,
                        None,
                    )
                };
                let pending = self.pending_divergence.filter(|(n, _)| {
                    self.links[&link].session.as_ref().map(|s| s.peer.node_id) == Some(*n)
                });
                if let Some((_, d)) = pending {
                    // Durable before the record is applied: from now on this
                    // replica holds a write the promoted node lacks.
                    d.store(&self.cfg.dir)?;
                    crate::elog!(
                        "nbdmirror: split brain: took a write from the primary after node {} was \
                         promoted from this replica's generation; node {} is refused from now on \
                         (recorded in {})",
                        d.node_id,
                        d.node_id,
                        generation::Diverged::path(&self.cfg.dir).display()
                    );
                    self.diverged = Some(d);
                    self.pending_divergence = None;
                }
                self.refused = None;
                let l = &self.links[&link];
                // Before the announce this session is a resync (resync data,
                // or live writes over a disk that misses older ones); after
                // it, a resync record means one was started on a live link
                // (`resync start --full`).
                let resync = !l.announced || h.flags & wire::FLAG_RESYNC != 0;
                // Resync data of another generation than the one this
                // replica holds makes it a half copy of that generation:
                // recorded as such (its previous one as `previous`), so that
                // a primary outside that history is refused as split brain
                // rather than let compare it (a re-initialised node started
                // as the primary copied its empty disk over a half-resynced
                // replica, the last other copy: a tester's and a reviewer's
                // finds), and the primary it came from, or one promoted from
                // it, resumes or compares.
                let announced_resync = l.version >= ANNOUNCE_VERSION && resync;
                let target = l.primary_generation;
                let retarget = announced_resync && target != 0 && target != self.generation.current;
                let mark = announced_resync
                    && (self.generation.flags & generation::FLAG_INCONSISTENT == 0 || retarget);
                let current = if retarget {
                    target
                } else {
                    self.generation.current
                };
                // The run this record belongs to, if the primary told it
                // (RUN_ONLY) and this replica holds (or now takes) its
                // generation.
                let run = self
                    .links
                    .get_mut(&link)
                    .and_then(|l| l.pending_run.take())
                    .filter(|&(g, r)| g == current && (retarget || r > self.generation.epoch))
                    .map(|(_, r)| r);
                if mark || run.is_some() {
                    // Durable before the record is applied: resync data,
                    // so that a crash in the middle leaves a replica that
                    // knows it holds a mix of old and new blocks, and the
                    // run, so that a node promoted from an earlier one
                    // does not roll this record back.
                    let next = if retarget {
                        self.generation.half_copy_of(target, run.unwrap_or(0))
                    } else {
                        Generation {
                            flags: if mark {
                                self.generation.flags | generation::FLAG_INCONSISTENT
                            } else {
                                self.generation.flags
                            },
                            epoch: run.unwrap_or(self.generation.epoch),
                            ..self.generation
                        }
                    };
                    next.store(&self.cfg.dir)?;
                    if mark {
                        crate::elog!(
                            "nbdmirror: taking resync data from the primary: this replica is \
                             inconsistent until the primary reports it in sync, and is not \
                             promoted meanwhile"
                        );
                    }
                    self.generation = next;
                }
                let rid = MIRROR_RID | self.next_mrid;
                self.next_mrid += 1;
                self.applying.insert(rid, (link, h.id, false));
                let fua = h.flags & wire::FLAG_FUA != 0;
                match h.kind {
                    wire::KIND_WRITE => {
                        // The store may build its journal record header in
                        // the bytes before the data (the record header, or
                        // the block checksums, decoded already).
                        debug_assert!(data_at >= WRITE_HEADROOM);
                        store.write_summed(
                            io,
                            rid,
                            h.offset,
                            buf,
                            at + data_at,
                            h.length as usize,
                            fua,
                            sums,
                        )
                    }
                    wire::KIND_ZERO => store.write_zeroes(
                        io,
                        rid,
                        h.offset,
                        h.length as u64,
                        h.flags & wire::FLAG_NO_HOLE != 0,
                        fua,
                    ),
                    _ => store.write_zeroes(io, rid, h.offset, h.length as u64, false, fua),
                }
            }
            FrameKind::Flush => {
                let id = wire::decode_u64(payload, "Flush")?;
                let rid = MIRROR_RID | self.next_mrid;
                self.next_mrid += 1;
                self.applying.insert(rid, (link, id, true));
                store.flush(io, rid);
            }
            FrameKind::Generation => {
                let f = wire::decode_generation(payload)?;
                let (g, run) = (f.generation, f.run);
                if f.run_only {
                    // Not in sync: the run is recorded with the next record
                    // taken (`pending_run`).
                    if let (Some(l), Some(r)) = (self.links.get_mut(&link), run) {
                        l.pending_run = Some((g, r));
                    }
                    return Ok(());
                }
                self.refused = None;
                if let Some(l) = self.links.get_mut(&link) {
                    l.announced = true;
                    // A handover moves the primary's generation on within
                    // the session: later resync data is of this one.
                    l.primary_generation = g;
                }
                // Every block the compare found different, unknown ones
                // included, was resent and is durable here.
                store.settle_all();
                // And their checksums are: checkpoint now rather than in
                // up to 30 s (a power cut of both nodes in between left the
                // resync's in-place blocks for recovery to distrust, and the
                // replica promotable only with --force-inconsistent: the
                // power-cut test, tools/vm-power-cut.sh).
                store.checkpoint_soon(io);
                let next = self.generation.in_sync_with(g, run.unwrap_or(0));
                if next != self.generation {
                    next.store(&self.cfg.dir)?;
                    // Said once per change of generation or of the mark, not
                    // at every new run of the same one (a tester counted 44).
                    if next.current != self.generation.current
                        || next.flags != self.generation.flags
                    {
                        crate::elog!(
                            "nbdmirror: in sync with the primary: this replica now holds data generation {g:016x}"
                        );
                    }
                    self.generation = next;
                }
            }
            FrameKind::Session => {
                // Durable before any record of the session is applied (frames
                // are handled in order), so the token a restarted secondary
                // reports never names a session whose writes it lacks.
                let token = wire::decode_u64(payload, "Session")?;
                // A replica last written as a primary (handed over) that
                // now takes another primary's records is no longer that
                // generation's primary: if it were served as a primary
                // again after a partial resync, it must be promoted to a
                // new generation, not carry on the old one.
                let flags = self.generation.flags
                    & !(generation::FLAG_PRIMARY | generation::FLAG_HANDED_OVER);
                let next = Generation {
                    session: token,
                    flags,
                    ..self.generation
                };
                if next != self.generation {
                    next.store(&self.cfg.dir)?;
                    if flags != self.generation.flags {
                        crate::elog!(
                            "nbdmirror: this replica, last written as the primary of generation \
                             {:016x}, now follows another primary",
                            self.generation.current
                        );
                    }
                    self.generation = next;
                }
            }
            FrameKind::SumsRequest => {
                let (id, first, n) = wire::decode_sums_request(payload, self.size.div_ceil(BLOCK))?;
                let mut sums = store.block_sums(first, n as u64);
                for (k, s) in sums.iter_mut().enumerate() {
                    if store.is_uncertain(first + k as u64) {
                        *s = UNKNOWN_SUM;
                    }
                }
                self.send_frame(
                    link,
                    FrameKind::Sums,
                    &[&wire::encode_sums(id, first, &sums)],
                );
            }
            FrameKind::BlockRequest => {
                let (id, first, n) =
                    wire::decode_block_request(payload, self.size.div_ceil(BLOCK))?;
                // A primary keeps at most MAX_REPAIRS in flight; more is a
                // peer trying to make this node buffer without bound.
                if self
                    .peer_reads
                    .values()
                    .filter(|&&(l, _)| l == link)
                    .count()
                    >= 2 * MAX_REPAIRS
                {
                    return Err(format!(
                        "more than {} BlockRequests in flight",
                        2 * MAX_REPAIRS
                    ));
                }
                let rid = MIRROR_RID | self.next_mrid;
                self.next_mrid += 1;
                self.peer_reads.insert(rid, (link, id));
                let (s, e) = (first * BLOCK, ((first + n as u64) * BLOCK).min(self.size));
                // Room for the frame and BlockData headers in front: the
                // buffer goes out as it is (peer_read_done).
                store.read_for_peer(io, rid, s, e - s, HEADER_LEN + wire::BLOCK_DATA_HEADER);
            }
            FrameKind::VerifyRequest => {
                let (id, first, n) =
                    wire::decode_verify_request(payload, self.size.div_ceil(BLOCK))?;
                // A primary keeps at most scrub::WINDOW in flight.
                if self.verify_reads.values().filter(|v| v.0 == link).count() >= MAX_VERIFY_READS {
                    return Err(format!(
                        "more than {MAX_VERIFY_READS} VerifyRequests in flight"
                    ));
                }
                let rid = MIRROR_RID | self.next_mrid;
                self.next_mrid += 1;
                self.verify_reads.insert(rid, (link, id, first, n as u64));
                let (s, e) = (first * BLOCK, ((first + n as u64) * BLOCK).min(self.size));
                store.read_verified(io, rid, s, e - s);
            }
            FrameKind::Ping => {
                wire::decode_u64(payload, "Ping")?;
                self.send_frame(link, FrameKind::Pong, &[payload]);
            }
            FrameKind::Pong => {}
            FrameKind::Reject => {
                let r = crate::peer::messages::Reject::decode(payload);
                if let (Ok(r), Some(l)) = (&r, self.links.get(&link)) {
                    // Not when that primary is the stale side: this replica
                    // follows a generation promoted from the primary's own
                    // (`generation::judge`'s "follows ... started after").
                    let theirs = l.session.as_ref().map_or(0, |s| s.peer.generations.current);
                    let stale_primary = self.generation.flags & generation::FLAG_PRIMARY == 0
                        && theirs != 0
                        && self.generation.previous == theirs;
                    if r.code == crate::peer::RejectCode::SplitBrain && !stale_primary {
                        self.refused = Some(format!(
                            "refused as split brain by the primary at {}",
                            l.addr
                        ));
                    }
                }
                let r = r
                    .map(|r| r.message)
                    .unwrap_or_else(|_| "(unreadable reason)".into());
                return Err(format!("the primary ended the session: {r}"));
            }
            k => return Err(format!("unexpected {k} frame from a primary")),
        }
        Ok(())
    }

    /// A store request the secondary issued for a peer's record finished.
    fn applied(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64, r: Result<(), i32>) {
        let Some((link, id, is_flush)) = self.applying.remove(&rid) else {
            return;
        };
        let errno = match r {
            Ok(()) => 0,
            Err(e) => e as u32,
        };
        let kind = if is_flush {
            FrameKind::FlushAck
        } else {
            FrameKind::Ack
        };
        self.send_frame(link, kind, &[&wire::encode_answer(id, errno)]);
        self.post_send(io, link);
        // Sessions held behind older ones may go on.
        if !self.links.values().any(|l| l.held) {
            return;
        }
        let held: Vec<u64> = self
            .links
            .iter()
            .filter(|(_, l)| l.held)
            .map(|(&k, _)| k)
            .collect();
        for h in held {
            if !self.applying.values().any(|&(l2, _, _)| l2 != h) {
                self.links.get_mut(&h).unwrap().held = false;
                self.process_frames(io, store, h);
                self.post_recv(io, h);
            }
        }
    }

    // ----- resync (primary) ---------------------------------------------------

    fn kick_resync(&mut self, io: &mut dyn Io, store: &mut Store) {
        for i in 0..self.peers.len() {
            self.resync_peer(io, store, i);
        }
    }

    fn resync_peer(&mut self, io: &mut dyn Io, store: &mut Store, i: usize) {
        if self.peers[i].state != PeerState::Syncing
            || self.shutting_down
            || self.t < self.peers[i].resync_hold
        {
            return;
        }
        self.compare_requests(io, i);
        let mut wrapped = false;
        loop {
            let p = &self.peers[i];
            if p.paused || p.resync_inflight >= RESYNC_WINDOW {
                break;
            }
            let run = p.bitmap.next_run(p.cursor, RESYNC_BATCH_BLOCKS);
            let run = match run {
                Some((first, n)) if first >= p.cursor => Some((first, n)),
                _ => None,
            };
            // The rate cap holds back sending, not the end of a pass: a
            // peer with nothing (left) to copy is declared in sync at once.
            if run.is_some() && self.cfg.resync_rate > 0 && p.tokens <= 0.0 {
                break;
            }
            let Some((first, n)) = run else {
                // End of a pass: once everything sent is durable, either
                // start another pass over what is still dirty or finish.
                let idle = p.resync_inflight == 0
                    && !self.resync_reads.values().any(|r| r.peer == i)
                    && !p
                        .outstanding
                        .values()
                        .any(|o| matches!(o, Out::Resync { .. }));
                if !idle {
                    break;
                }
                if !p.acked.is_empty() {
                    if !p.flush_in_flight {
                        self.resync_flush(io, i);
                    }
                    break;
                }
                if p.flush_in_flight {
                    break;
                }
                if p.compare.is_some() {
                    break;
                }
                if p.bitmap.dirty() == 0 {
                    self.announce_generation(io, i);
                    self.started_empty = false;
                    let p = &mut self.peers[i];
                    p.state = PeerState::InSync;
                    // A problem the resync met (bad blocks, since repaired
                    // or rewritten) is over: an in-sync peer showing it
                    // read as a standing fault.
                    p.last_error = None;
                    let secs = self
                        .t
                        .saturating_duration_since(p.resync_started)
                        .as_secs_f64();
                    crate::elog!(
                        "nbdmirror: peer {} ({}) is in sync: resync took {secs:.2} s ({} bytes resent \
                         since start), timed from the peer's connection (or from blocks found \
                         to resend), since which it sent {} bytes",
                        p.node_id,
                        p.addr,
                        p.sent_bytes,
                        p.sent_bytes - p.sent_at_resync_start
                    );
                    break;
                }
                if p.cursor == 0 || wrapped {
                    // Everything left is locked by writes (or another peer's
                    // resync) in flight; their completion kicks this again.
                    break;
                }
                wrapped = true;
                self.peers[i].cursor = 0;
                continue;
            };
            let (s, e) = (first * BLOCK, ((first + n) * BLOCK).min(self.size));
            if self.locked(s, e) {
                self.peers[i].cursor = first + n;
                continue;
            }
            let rid = MIRROR_RID | self.next_mrid;
            self.next_mrid += 1;
            self.locks.insert(s, (e, rid));
            let p = &mut self.peers[i];
            p.cursor = first + n;
            p.resync_inflight += n * BLOCK;
            if self.cfg.resync_rate > 0 {
                p.tokens -= (n * BLOCK) as f64;
            }
            self.resync_reads.insert(
                rid,
                ResyncRead {
                    peer: i,
                    epoch: p.epoch,
                    first,
                    n,
                },
            );
            store.read_for_peer(io, rid, s, e - s, RESYNC_HEAD);
        }
    }

    /// Start a replication session with peer `i` on `link`, before any
    /// record goes out. `theirs` is the session token the peer reported:
    /// the one it last accepted records in. If that is not the token this
    /// node gave it last time, another primary wrote to it since (one with
    /// this node's identity, or the generation check would have refused
    /// it: a copy of this replica directory that served while this node was
    /// away), or it lost what it had (re-initialised): the dirty bitmap
    /// does not cover those blocks, so every checksum is compared. Then a
    /// fresh token is sent; it is recorded here (durably) only once the
    /// peer answers, when it has stored it too: a session the peer refused
    /// (Busy) or lost before taking it must not look foreign next time.
    fn start_session(
        &mut self,
        io: &mut dyn Io,
        i: usize,
        link: u64,
        theirs: u64,
    ) -> Result<(), String> {
        let p = &mut self.peers[i];
        let ours = p.bitmap.session();
        if theirs != ours && theirs != 0 && theirs == p.sent_session {
            p.bitmap.set_session(theirs)?;
        } else if theirs != ours && p.bitmap.flags() & FLAG_COMPARE == 0 {
            if theirs == 0 {
                crate::elog!(
                    "nbdmirror: peer {} ({}) reports no session: its crash recovery could not \
                     vouch for some blocks, or it was re-initialised; comparing checksums",
                    p.node_id,
                    p.addr
                );
            } else {
                crate::elog!(
                    "nbdmirror: peer {} ({}) last took writes in a session this node did not \
                     start (its session {theirs:016x}, ours {ours:016x}): another primary with \
                     this node's identity (a copy of this replica directory?) wrote to it, or it \
                     was re-initialised; comparing checksums",
                    p.node_id,
                    p.addr
                );
            }
            let f = p.bitmap.flags() | FLAG_COMPARE;
            p.bitmap.set_flags(f)?;
        }
        let n = nonce();
        let token = u64::from_le_bytes(n[..8].try_into().unwrap()) | 1;
        p.pending_session = Some(token);
        p.sent_session = token;
        self.send_frame(link, FrameKind::Session, &[&token.to_le_bytes()]);
        // The run, before any record of the session: a peer that holds our
        // generation records it with the first record of this run it takes
        // (even while resynced), so that a node promoted from an earlier
        // run does not roll that record back. (`link` is `peers[i].link`.)
        self.send_generation(io, i, true);
        // Its Pong records the token here at once, even on an idle link.
        let stamp = self.next_mrid;
        self.send_frame(link, FrameKind::Ping, &[&stamp.to_le_bytes()]);
        self.post_send(io, link);
        Ok(())
    }

    /// Peer `i` holds exactly our data: tell it our generation (it records
    /// it, so a later connect knows its data is ours).
    fn announce_generation(&mut self, io: &mut dyn Io, i: usize) {
        self.send_generation(io, i, false);
    }

    /// The Generation frame to peer `i`: "in sync" (it adopts the
    /// generation and run), or `run_only` (it records the run if it holds
    /// the generation; not sent below protocol version 6).
    fn send_generation(&mut self, io: &mut dyn Io, i: usize, run_only: bool) {
        let Some(link) = self.peers[i].link else {
            return;
        };
        let Some(g) = wire::encode_generation(
            self.generation.current,
            self.generation.epoch,
            self.peers[i].version,
            run_only,
        ) else {
            return;
        };
        self.send_frame(link, FrameKind::Generation, &[&g]);
        self.post_send(io, link);
    }

    /// Primary: before the first client write of a run (after a start, or
    /// after a peer left the in-sync set), move to the next run, stored
    /// first, and tell every in-sync peer (they record it before the
    /// write's record). A peer that then follows this run holds writes a
    /// node promoted from an earlier one lacks (`generation::judge`).
    fn advance_run(&mut self, io: &mut dyn Io) {
        if !self.run_due
            || self.cfg.role != NodeRole::Primary
            || self.run_retry_at.is_some_and(|t| self.t < t)
        {
            return;
        }
        let next = Generation {
            epoch: self.generation.epoch.saturating_add(1),
            ..self.generation
        };
        if let Err(e) = next.store(&self.cfg.dir) {
            // Tried again at a write a second from now; meanwhile the peers
            // keep the run they hold, and a lagging node promoted later is
            // compared with them, as before runs existed.
            if self.run_retry_at.is_none() {
                crate::elog!("nbdmirror: WARNING: cannot record the next run: {e}");
            }
            self.run_retry_at = Some(io.now() + Duration::from_secs(1));
            return;
        }
        self.run_retry_at = None;
        self.run_due = false;
        self.generation = next;
        for i in 0..self.peers.len() {
            match self.peers[i].state {
                PeerState::InSync => self.send_generation(io, i, false),
                // Half resynced, it still holds the writes of this run it
                // takes: it records the run too (not "in sync").
                PeerState::Syncing => self.send_generation(io, i, true),
                _ => {}
            }
        }
    }

    /// Keep up to COMPARE_WINDOW checksum requests in flight to peer `i`.
    fn compare_requests(&mut self, io: &mut dyn Io, i: usize) {
        let blocks = self.peers[i].bitmap.blocks();
        let Some(link) = self.peers[i].link else {
            return;
        };
        loop {
            let Some((next, inflight)) = self.peers[i].compare.as_mut() else {
                return;
            };
            if inflight.len() >= COMPARE_WINDOW || *next >= blocks {
                break;
            }
            let first = *next;
            let n = (blocks - first).min(wire::MAX_SUMS as u64);
            *next += n;
            let id = MIRROR_RID | self.next_mrid;
            self.next_mrid += 1;
            inflight.insert(id, (first, n));
            self.send_frame(
                link,
                FrameKind::SumsRequest,
                &[&wire::encode_sums_request(id, first, n as u32)],
            );
        }
        self.post_send(io, link);
    }

    /// A peer's checksums arrived: every block whose checksum differs from
    /// ours (or is not settled on either side) becomes dirty.
    fn sums_arrived(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        i: usize,
        payload: &[u8],
    ) -> Result<(), String> {
        let (id, first, theirs) = wire::decode_sums(payload)?;
        let p = &mut self.peers[i];
        let Some((_, inflight)) = p.compare.as_mut() else {
            return Err(format!("Sums {id} while no compare is running"));
        };
        match inflight.remove(&id) {
            Some((f, n)) if f == first && n == theirs.len() as u64 => {}
            _ => return Err(format!("Sums {id} does not answer a request")),
        }
        let ours = store.block_sums(first, theirs.len() as u64);
        for (k, (a, b)) in ours.iter().zip(&theirs).enumerate() {
            if *a == UNKNOWN_SUM || *b == UNKNOWN_SUM || a != b {
                let blk = first + k as u64;
                if !p.bitmap.is_set(blk) {
                    p.compared_diff += 1;
                }
                p.bitmap.set_range(blk * BLOCK, BLOCK);
            }
        }
        let blocks = p.bitmap.blocks();
        let done = p
            .compare
            .as_ref()
            .is_some_and(|(next, inf)| *next >= blocks && inf.is_empty());
        if done {
            p.compare = None;
            p.total = p.bitmap.dirty() * BLOCK;
            // FLAG_COMPARE is cleared once a flush sent from now on is
            // answered (see `compare_unsettled`).
            p.compare_unsettled = true;
            p.compare_settle_from = self.next_mrid;
            crate::elog!(
                "nbdmirror: peer {} ({}): checksums compared, {} more blocks to copy (they \
                 differ, or the peer's crash recovery could not vouch for them); {} bytes to copy",
                p.node_id,
                p.addr,
                p.compared_diff,
                p.bitmap.dirty() * BLOCK
            );
        }
        if done && !self.peers[i].flush_in_flight {
            self.resync_flush(io, i);
        }
        self.resync_peer(io, store, i);
        Ok(())
    }

    fn resync_flush(&mut self, io: &mut dyn Io, i: usize) {
        let Some(link) = self.peers[i].link else {
            return;
        };
        let id = MIRROR_RID | self.next_mrid;
        self.next_mrid += 1;
        self.send_frame(link, FrameKind::Flush, &[&id.to_le_bytes()]);
        let p = &mut self.peers[i];
        let batches = std::mem::take(&mut p.acked);
        p.acked_bytes = 0;
        p.flush_in_flight = true;
        p.last_resync_flush = self.t;
        let upto = p.unflushed_counter;
        p.outstanding.insert(
            id,
            Out::Flush {
                since: self.t,
                batches,
                upto,
            },
        );
        self.post_send(io, link);
    }

    fn resync_read_done(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        r: Result<Vec<u8>, i32>,
        corrupt: Option<CorruptRead>,
    ) {
        let Some(rr) = self.resync_reads.remove(&rid) else {
            return;
        };
        let s = rr.first * BLOCK;
        self.unlock(s, rid);
        let i = rr.peer;
        let live = self.peers[i].epoch == rr.epoch && self.peers[i].streaming();
        match r {
            Ok(mut buf) if live => {
                let link = self.peers[i].link.unwrap();
                let len = buf.len() - RESYNC_HEAD;
                let zero = crate::store::checksum::is_zero(&buf[RESYNC_HEAD..]);
                let hdr = RecordHeader {
                    id: rid,
                    offset: s,
                    length: len as u32,
                    kind: if zero {
                        wire::KIND_ZERO
                    } else {
                        wire::KIND_WRITE
                    },
                    flags: wire::FLAG_RESYNC | if zero { wire::FLAG_NO_HOLE } else { 0 },
                };
                if zero {
                    self.send_frame(link, FrameKind::Record, &[&hdr.encode()]);
                } else {
                    buf[HEADER_LEN..RESYNC_HEAD].copy_from_slice(&hdr.encode());
                    self.send_frame_owned(link, FrameKind::Record, buf);
                }
                let p = &mut self.peers[i];
                p.sent_bytes += len as u64;
                p.resync_hold_for = RESYNC_HOLD;
                p.outstanding.insert(
                    rid,
                    Out::Resync {
                        first: rr.first,
                        n: rr.n,
                        since: self.t,
                    },
                );
                self.post_send(io, link);
            }
            Ok(_) => {}
            Err(_) if live && corrupt.is_some() => {
                // Blocks bad on this node: their bits stay set, another
                // peer is asked for them (a repair in the background), and
                // the resync comes back to them in a while.
                let c = corrupt.unwrap();
                let p = &mut self.peers[i];
                p.resync_inflight = p.resync_inflight.saturating_sub(rr.n * BLOCK);
                p.resync_hold = self.t + p.resync_hold_for;
                p.resync_hold_for = (p.resync_hold_for * 2).min(RESYNC_HOLD_MAX);
                let why = format!(
                    "blocks {} of this node's copy are bad (failed their checksums); resync \
                     retries them (every {} s at first, backing off to {} s) until they are \
                     repaired from another peer or written again",
                    c.blocks
                        .iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    RESYNC_HOLD.as_secs(),
                    RESYNC_HOLD_MAX.as_secs()
                );
                if p.last_error.as_deref() != Some(why.as_str()) {
                    crate::elog!("nbdmirror: peer {}: {why}", p.node_id);
                    p.last_error = Some(why);
                }
                let bg = MIRROR_RID | self.next_mrid;
                self.next_mrid += 1;
                self.background.insert(bg);
                if self.repair_read(io, bg, c) == RepairStart::No {
                    self.background.remove(&bg);
                }
            }
            Err(e) if live => {
                let p = &mut self.peers[i];
                p.resync_inflight = p.resync_inflight.saturating_sub(rr.n * BLOCK);
                p.paused = true;
                let why = format!(
                    "resync paused: reading blocks {}..{} locally failed: {}",
                    rr.first,
                    rr.first + rr.n,
                    errno_str(e)
                );
                crate::elog!("nbdmirror: peer {}: {why}", p.node_id);
                p.last_error = Some(why);
            }
            Err(_) => {}
        }
        self.unpark(io, store);
        self.resync_peer(io, store, i);
    }

    // ----- scrub (primary; the secondary's side is `verify_read_done`) ----

    /// Read a read's blocks again after a repair (or once their lock is
    /// free): a scrub's read verifies whatever the store is set to.
    fn read_again(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64, read: &CorruptRead) {
        if self.scrub.owns(rid) {
            store.read_verified(io, rid, read.offset, read.len);
        } else {
            store.read(io, rid, read.offset, read.len, read.head);
        }
    }

    /// Start scrub steps while the scrub runs and its window, rate cap and
    /// the range locks allow: each locks its range (waiting for client
    /// writes there to finish, so every replica holds the same bytes) and
    /// reads it, verified.
    fn scrub_kick(&mut self, io: &mut dyn Io, store: &mut Store) {
        if self.cfg.role != NodeRole::Primary || self.shutting_down {
            return;
        }
        while let Some((first, n)) = self.scrub.next_range() {
            let (s, e) = (first * BLOCK, ((first + n) * BLOCK).min(self.size));
            // Client writes waiting for the range go first; the scrub
            // comes back at the next tick or completion.
            if self.locked(s, e)
                || self.parked.iter().any(|q| {
                    let (a, b) = q.range();
                    a < e && s < b
                })
            {
                break;
            }
            let rid = MIRROR_RID | self.next_mrid;
            self.next_mrid += 1;
            self.locks.insert(s, (e, rid));
            self.scrub.begin(rid);
            store.read_verified(io, rid, s, e - s);
        }
    }

    /// A scrub step's read finished. Bad blocks of this node are repaired
    /// a run of adjacent ones at a time (a peer whose copy has a bad block
    /// of its own between two of ours could not answer a request spanning
    /// both), without the step's lock; then the step starts over. Blocks
    /// no peer can repair are set apart, and the step is compared with the
    /// peers without them.
    fn scrub_read_done(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        r: Result<Vec<u8>, i32>,
    ) {
        let corrupt = store.take_corrupt(rid);
        let Some(step) = self.scrub.steps.get_mut(&rid) else {
            return;
        };
        let (first, n, locked) = (step.first, step.n, step.locked);
        if let (Err(e), None) = (&r, &corrupt) {
            // A read error, not a checksum failure: nothing to compare
            // (`scrub_complete` releases the range).
            let e = *e;
            crate::elog!(
                "nbdmirror: scrub: reading blocks {first}..{} failed: {}",
                first + n,
                errno_str(e)
            );
            let ids: Vec<u32> = self.peers.iter().map(|p| p.node_id).collect();
            let t = self.scrub.tally_of(rid, true);
            t.read_errors += 1;
            for id in ids {
                t.peer(id).skipped_blocks += n;
            }
            self.scrub_complete(io, store, rid);
            return;
        }
        let now_bad: Vec<u64> = corrupt
            .as_ref()
            .map(|c| c.blocks.clone())
            .unwrap_or_default();
        // Count each bad block once (also across a restart: the pass
        // remembers them), and the ones a repair just fixed.
        let fresh: Vec<u64> = now_bad
            .iter()
            .copied()
            .filter(|b| !step.counted.contains(b))
            .collect();
        let step_pass = self.scrub.is_current(rid);
        let fresh: Vec<u64> = if step_pass {
            fresh
                .into_iter()
                .filter(|&b| self.scrub.first_sighting(b))
                .collect()
        } else {
            fresh
        };
        let step = self.scrub.steps.get_mut(&rid).unwrap();
        let fixed = if step.phase == scrub::Phase::Repairing {
            step.bad.iter().filter(|b| !now_bad.contains(b)).count() as u64
        } else {
            0
        };
        step.counted.extend(&fresh);
        if locked {
            // Blocks set apart that were written since are no longer bad.
            step.unrepairable.retain(|b| now_bad.contains(b));
        }
        let left: Vec<u64> = now_bad
            .iter()
            .copied()
            .filter(|b| !step.unrepairable.contains(b))
            .collect();
        if !fresh.is_empty() || fixed > 0 {
            let t = self.scrub.tally_of(rid, true);
            t.bad_blocks += fresh.len() as u64;
            t.repaired_blocks += fixed;
        }
        if left.is_empty() {
            if !locked {
                // Repaired, or nothing left but blocks beyond repair:
                // start over under the lock, and compare with the peers.
                self.scrub.again(rid);
                self.scrub_kick(io, store);
                return;
            }
            // Under the lock: this node's checksums of what it read, but
            // none for the blocks beyond repair.
            let data = match (r, corrupt) {
                (Ok(buf), _) => buf,
                (Err(_), Some(c)) => c.data,
                (Err(_), None) => unreachable!("handled above"),
            };
            let unrepairable = &self.scrub.steps[&rid].unrepairable;
            let ours = scrub::checksums_of(first, &data, unrepairable, UNKNOWN_SUM);
            self.scrub_compare(io, store, rid, ours);
            return;
        }
        // Bad blocks to repair: the repair takes the lock itself.
        let c = corrupt.expect("bad blocks come with their read");
        if self.scrub_unlock(rid) {
            self.unpark(io, store);
        }
        let step = self.scrub.steps.get_mut(&rid).unwrap();
        let run: Vec<u64> = left
            .iter()
            .copied()
            .enumerate()
            .take_while(|&(k, b)| b == left[0] + k as u64 && (k == 0 || !step.single))
            .map(|(_, b)| b)
            .collect();
        step.bad = run.clone();
        step.phase = scrub::Phase::Repairing;
        if step.attempts < scrub::MAX_ATTEMPTS {
            step.attempts += 1;
            let read = CorruptRead {
                blocks: run,
                data: Vec::new(),
                ..c
            };
            if self.repair_read(io, rid, read) != RepairStart::No {
                return;
            }
        }
        // Nothing to repair from (or too many tries): every bad block left
        // is beyond repair in this pass.
        let step = self.scrub.steps.get_mut(&rid).unwrap();
        step.bad.clear();
        step.unrepairable.extend(left);
        self.scrub.again(rid);
        self.scrub_kick(io, store);
    }

    /// Ask every streaming peer (protocol version 5) what it holds in scrub
    /// step `rid`'s blocks; `ours` are this node's checksums of them
    /// (`UNKNOWN_SUM`: not to be compared).
    fn scrub_compare(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64, ours: Vec<u64>) {
        let Some(step) = self.scrub.steps.get(&rid) else {
            return;
        };
        let (first, n) = (step.first, step.n);
        let mut mask = 0u64;
        for i in 0..self.peers.len() {
            // A peer being resynced is compared too, except for its dirty
            // blocks (see `scrub_peer_answered`); one whose bitmap is not
            // complete yet (a compare is running) is not.
            let p = &self.peers[i];
            if !p.streaming()
                || p.compare.is_some()
                || p.link.is_none()
                || p.version < VERIFY_VERSION
            {
                let node = p.node_id;
                self.scrub.tally_of(rid, false).peer(node).skipped_blocks += n;
                continue;
            }
            let link = p.link.unwrap();
            self.peers[i]
                .outstanding
                .insert(rid, Out::Verify { since: self.t });
            self.send_frame(
                link,
                FrameKind::VerifyRequest,
                &[&wire::encode_sums_request(rid, first, n as u32)],
            );
            self.post_send(io, link);
            mask |= 1 << i;
        }
        let step = self.scrub.steps.get_mut(&rid).unwrap();
        step.ours = ours;
        if mask == 0 {
            self.scrub_complete(io, store, rid);
        } else {
            step.phase = scrub::Phase::Verifying;
            step.waiting = mask;
        }
    }

    /// The repair of scrub step `rid`'s current run of bad blocks failed
    /// (no peer holds a copy that matches this node's checksums): set the
    /// run apart and read the step again for the next one.
    fn scrub_unrepaired(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64) {
        let Some(step) = self.scrub.steps.get_mut(&rid) else {
            return;
        };
        let run = std::mem::take(&mut step.bad);
        if run.len() > 1 {
            // A peer's copy of one block of the run may be bad too, and
            // then none of the run comes from that peer: go block by block.
            step.single = true;
        } else {
            step.unrepairable.extend(run);
        }
        let (s, e) = (
            step.first * BLOCK,
            ((step.first + step.n) * BLOCK).min(self.size),
        );
        store.read_verified(io, rid, s, e - s);
    }

    /// Release scrub step `rid`'s range lock if it holds it; true if it
    /// did (the caller lets parked writes go).
    fn scrub_unlock(&mut self, rid: u64) -> bool {
        let Some(step) = self.scrub.steps.get_mut(&rid).filter(|s| s.locked) else {
            return false;
        };
        step.locked = false;
        let at = step.first * BLOCK;
        self.unlock(at, rid);
        true
    }

    /// Scrub step `rid` is done: release its range, count it (and log the
    /// blocks of this node it left bad), go on.
    fn scrub_complete(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64) {
        self.scrub_unlock(rid);
        if let Some(step) = self
            .scrub
            .steps
            .get(&rid)
            .filter(|_| self.scrub.is_current(rid))
        {
            let mut bad = step.unrepairable.clone();
            if !bad.is_empty() {
                bad.sort_unstable();
                let why = if self.peers.is_empty() {
                    "this node has no peers to repair them from"
                } else {
                    "no peer could supply a copy that matches this node's checksums"
                };
                crate::elog!(
                    "nbdmirror: scrub: {} bad block{} of this node could not be repaired \
                     ({why}): blocks {}; client reads of them fail with EIO until they are \
                     written again",
                    bad.len(),
                    if bad.len() == 1 { "" } else { "s" },
                    bad.iter()
                        .map(|b| b.to_string())
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                self.scrub.tally_of(rid, true).unrepaired(&bad);
            }
        }
        self.scrub.complete(rid);
        self.unpark(io, store);
        self.kick_resync(io, store);
        self.scrub_kick(io, store);
    }

    /// A Verified frame from peer `i`.
    fn scrub_verified(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        i: usize,
        payload: &[u8],
    ) -> Result<(), String> {
        let (id, first, theirs) = wire::decode_sums(payload)?;
        match self.peers[i].outstanding.remove(&id) {
            Some(Out::Verify { .. }) => {}
            Some(other) => {
                self.peers[i].outstanding.insert(id, other);
                return Err(format!(
                    "Verified for request {id}, which was no VerifyRequest"
                ));
            }
            None => return Err(format!("Verified for unknown request {id}")),
        }
        match self.scrub.steps.get(&id) {
            Some(s) if s.first == first && s.n == theirs.len() as u64 => {}
            _ => {
                // The step must not wait for this peer any more.
                self.scrub_peer_answered(io, store, id, i, None);
                return Err(format!("Verified {id} does not answer its request"));
            }
        }
        self.scrub_peer_answered(io, store, id, i, Some(theirs));
        Ok(())
    }

    /// Peer `i` answered scrub step `rid` with the checksums of what it
    /// holds (`None`: it dropped out first). Blocks that failed its own
    /// checksums or hold other data than this node's are resent from here
    /// by resync (this node's copy verified, and it is the primary).
    /// Blocks dirty for the peer (resent anyway, maybe in flight to it
    /// right now) and blocks this node cannot vouch for are not compared,
    /// and counted as not compared.
    fn scrub_peer_answered(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        i: usize,
        theirs: Option<Vec<u64>>,
    ) {
        let node = self.peers[i].node_id;
        let Some(step) = self.scrub.steps.get_mut(&rid) else {
            return;
        };
        if step.waiting & (1 << i) == 0 {
            return;
        }
        step.waiting &= !(1u64 << i);
        let (first, n) = (step.first, step.n);
        match theirs {
            None => self.scrub.tally_of(rid, false).peer(node).skipped_blocks += n,
            Some(theirs) => {
                let (mut bad, mut differ, mut skipped, mut resend) = (0u64, 0u64, 0u64, Vec::new());
                let bitmap = &self.peers[i].bitmap;
                for (k, (a, b)) in step.ours.iter().zip(&theirs).enumerate() {
                    let blk = first + k as u64;
                    if *a == UNKNOWN_SUM || bitmap.is_set(blk) {
                        skipped += 1;
                        continue;
                    }
                    if a == b {
                        continue;
                    }
                    match *b {
                        wire::BAD_SUM => bad += 1,
                        // Not settled there (only when part of its read
                        // failed): resent, not counted.
                        UNKNOWN_SUM => {}
                        _ => differ += 1,
                    }
                    resend.push(blk);
                }
                step.verified.push((node, n - skipped));
                if skipped > 0 {
                    self.scrub.tally_of(rid, false).peer(node).skipped_blocks += skipped;
                }
                if !resend.is_empty() {
                    let t = self.scrub.tally_of(rid, bad + differ > 0).peer(node);
                    t.bad_blocks += bad;
                    t.differing_blocks += differ;
                    let unsettled = resend.len() as u64 - bad - differ;
                    crate::elog!(
                        "nbdmirror: scrub: peer {node}: in blocks {first}..{}, {bad} failed its \
                         own checksums and {differ} hold other data than this node's{}; \
                         resending {} block{} from this node",
                        first + n,
                        if unsettled > 0 {
                            format!(", {unsettled} could not be told there")
                        } else {
                            String::new()
                        },
                        resend.len(),
                        if resend.len() == 1 { "" } else { "s" }
                    );
                    let t = self.t;
                    let p = &mut self.peers[i];
                    let before = p.bitmap.dirty() * BLOCK;
                    for b in resend {
                        p.bitmap.set_range(b * BLOCK, BLOCK);
                    }
                    if p.state == PeerState::InSync {
                        p.state = PeerState::Syncing;
                        self.run_due = true;
                        let p = &mut self.peers[i];
                        p.cursor = 0;
                        p.resync_started = t;
                        p.sent_at_resync_start = p.sent_bytes;
                        p.total = p.bitmap.dirty() * BLOCK;
                    } else {
                        // A pass under way keeps what it has done: its total
                        // grows by what was added (it went back to about 0%).
                        p.total += p.bitmap.dirty() * BLOCK - before;
                    }
                }
            }
        }
        if self.scrub.steps.get(&rid).is_some_and(|s| s.waiting == 0) {
            self.scrub_complete(io, store, rid);
        }
    }

    /// A VerifyRequest's store read finished (secondary): send the
    /// checksum of every block as read, `BAD_SUM` for one that failed this
    /// replica's own checksums.
    fn verify_read_done(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        r: Result<Vec<u8>, i32>,
    ) {
        let corrupt = store.take_corrupt(rid);
        let Some((link, id, first, n)) = self.verify_reads.remove(&rid) else {
            return;
        };
        let sums: Vec<u64> = match (r, corrupt) {
            (Ok(buf), _) => scrub::checksums_of(first, &buf, &[], wire::BAD_SUM),
            // The blocks that verified are reported as read, the others
            // as bad.
            (Err(_), Some(c)) if c.data.len() as u64 == n * BLOCK => {
                scrub::checksums_of(first, &c.data, &c.blocks, wire::BAD_SUM)
            }
            (Err(_), _) => vec![wire::BAD_SUM; n as usize],
        };
        if self.links.get(&link).is_some_and(|l| !l.closing) {
            self.send_frame(
                link,
                FrameKind::Verified,
                &[&wire::encode_sums(id, first, &sums)],
            );
            self.post_send(io, link);
        }
    }

    // ----- timers -------------------------------------------------------------

    pub fn tick(&mut self, io: &mut dyn Io, store: &mut Store) {
        self.t = io.now();
        if (self.peer_accept_paused || self.admin_accept_paused)
            && !self.shutting_down
            && self.accept_backoff.over()
        {
            if std::mem::take(&mut self.peer_accept_paused) {
                if let Some(l) = &self.listener {
                    io.submit(tok(KIND_PEER_LISTEN, 0), Op::Accept { fd: l.as_raw_fd() });
                }
            }
            if std::mem::take(&mut self.admin_accept_paused) {
                if let Some(a) = &self.admin {
                    io.submit(tok(KIND_ADMIN_LISTEN, 0), Op::Accept { fd: a.as_raw_fd() });
                }
            }
        }
        let t = self.t;
        let dt = t.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = t;
        for p in &mut self.peers {
            refill(
                &mut p.tokens,
                self.cfg.resync_rate,
                dt,
                RESYNC_BATCH_BLOCKS * BLOCK,
            );
        }
        // Reads waiting for the store to apply a write to their blocks
        // (a repair found them busy): the store says nothing when it does.
        if !self.repair_waiting.is_empty() {
            self.unpark(io, store);
        }
        let primary = self.cfg.role == NodeRole::Primary && !self.shutting_down;
        self.scrub.tick(t, dt, primary);
        let timeout = self.cfg.timeout;
        // Links: handshake deadlines, liveness, pings.
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            let Some(l) = self.links.get(&id) else {
                continue;
            };
            if l.closing {
                continue;
            }
            if l.hs.is_some() && t.saturating_duration_since(l.opened) > timeout {
                self.link_failed(
                    io,
                    store,
                    id,
                    format!("handshake not finished within {timeout:?}"),
                );
                continue;
            }
            if l.session.is_none() {
                continue;
            }
            let silent = t.saturating_duration_since(l.last_rx);
            let limit = if l.peer.is_some() {
                timeout
            } else {
                primary_quiet_limit(timeout)
            };
            if silent > limit {
                self.link_failed(
                    io,
                    store,
                    id,
                    format!("no answer for {} ms", silent.as_millis()),
                );
                continue;
            }
            if t.saturating_duration_since(l.last_tx) > ping_interval(timeout) && l.peer.is_some() {
                let stamp = self.next_mrid;
                self.send_frame(id, FrameKind::Ping, &[&stamp.to_le_bytes()]);
                self.post_send(io, id);
            }
        }
        for i in 0..self.peers.len() {
            // Liveness is the pings' job (`timeout`). A peer that answers
            // pings but sits on a request has a stuck disk: a write older than
            // 4x the timeout, or a flush (which may have to write back a lot
            // of page cache) older than 10x, fails it.
            let stale = self.peers[i].outstanding.values().any(|o| {
                let limit = match o {
                    Out::Flush { .. } => timeout * 10,
                    _ => timeout * 4,
                };
                t.saturating_duration_since(o.since()) > limit
            });
            if stale && self.peers[i].streaming() {
                self.fail_peer(
                    io,
                    store,
                    i,
                    format!(
                        "a request was not answered within {} ms although the peer answers pings \
                         (its disk may be stuck)",
                        timeout.as_millis() * 4
                    ),
                );
            }
            let p = &mut self.peers[i];
            if p.link.is_none() && !self.shutting_down && t >= p.retry_at {
                self.connect(io, i);
            }
            let p = &mut self.peers[i];
            if p.paused || p.state != PeerState::Syncing {
                // The rate shown is this resync's, measured while it runs.
                p.rate = 0.0;
                p.rate_mark = (t, p.sent_bytes);
                p.rate_window = (t, p.sent_bytes);
                p.last_progress = t;
            }
            if p.sent_bytes > p.rate_mark.1 {
                p.last_progress = t;
            }
            let el = t.saturating_duration_since(p.rate_mark.0);
            if el >= Duration::from_secs(1) {
                // Under a low cap resync sends a batch (up to 1 MiB) every
                // few seconds: a window with nothing sent is stretched until
                // something is (up to 30 s), so the rate is the average over
                // whole bursts, and it is smoothed with a 5 s time constant.
                // A 1 s window halved each second swung between 0.5 MiB/s
                // and 16 KiB/s at a 100 KiB/s cap (ETA 34 min, then 18 h).
                let wel = t.saturating_duration_since(p.rate_window.0);
                let wbytes = p.sent_bytes - p.rate_window.1;
                if wbytes > 0 || wel >= Duration::from_secs(30) {
                    let secs = wel.as_secs_f64().max(el.as_secs_f64());
                    let inst = wbytes as f64 / secs;
                    let alpha = 1.0 - (-secs / 5.0).exp();
                    p.rate = if p.rate == 0.0 {
                        inst
                    } else {
                        p.rate + alpha * (inst - p.rate)
                    };
                    p.rate_window = (t, p.sent_bytes);
                }
                p.rate_mark = (t, p.sent_bytes);
                let _ = p.bitmap.flush_async();
            }
            // Resync batches become clearable, and acknowledged client writes
            // stop needing a bit, only when a flush on the peer covers them:
            // send one at least every second while either is waiting.
            let due = t.saturating_duration_since(p.last_resync_flush) >= RESYNC_FLUSH_INTERVAL;
            if p.streaming()
                && !p.flush_in_flight
                && ((p.state == PeerState::Syncing
                    && !p.acked.is_empty()
                    && (p.acked_bytes >= RESYNC_FLUSH_BYTES || due))
                    || (!p.unflushed.is_empty() && due))
            {
                self.resync_flush(io, i);
            }
        }
        self.kick_resync(io, store);
        self.scrub_kick(io, store);
    }

    // ----- status and the admin socket -------------------------------------

    /// The node's state for `nbdmirror resync status --json`: its peers
    /// and, given the store, the store's counters.
    pub fn status_json(&self, store: Option<&Store>, io: &dyn Io) -> String {
        use serde_json::json;
        let mut peers: Vec<serde_json::Value> = self
            .peers
            .iter()
            .map(|p| {
                let dirty = p.bitmap.dirty() * BLOCK;
                // A pass's total means something only while it runs: a
                // peer that went away has `dirty` to resync, nothing done.
                let total = if p.state == PeerState::Syncing {
                    p.total.max(dirty)
                } else {
                    dirty
                };
                // A resync that has sent nothing for a while says so rather
                // than show its last rate and an ETA that no longer means
                // anything: 10 s, or three 1 MiB batches' worth of the cap.
                let quiet = io.now().saturating_duration_since(p.last_progress);
                let stall_after = match self.cfg.resync_rate {
                    0 => Duration::from_secs(10),
                    r => Duration::from_secs(10)
                        .max(Duration::from_secs_f64(3.0 * (1 << 20) as f64 / r as f64)),
                };
                // Not while checksums are compared (nothing is sent until
                // blocks are found to differ) or a flush is awaited.
                let stalled = p.state == PeerState::Syncing
                    && !p.paused
                    && p.compare.is_none()
                    && !p.flush_in_flight
                    && quiet >= stall_after;
                // Never above the cap: the first batch goes at once, so a
                // young measurement overstates a low cap many times over (a
                // tester saw 1020 KiB/s and a 19 s ETA at a 100 KiB/s cap).
                let rate = if p.state == PeerState::Syncing && !p.paused && !stalled {
                    let r = p.rate.round() as u64;
                    match self.cfg.resync_rate {
                        0 => r,
                        cap => r.min(cap),
                    }
                } else {
                    0
                };
                json!({
                    "node_id": p.node_id,
                    "address": p.addr.to_string(),
                    "state": p.state.name(),
                    "dirty_bytes": dirty,
                    "resync_total_bytes": total,
                    "resync_done_bytes": total - dirty,
                    "resync_sent_bytes": p.sent_bytes,
                    "rate_bytes_per_sec": rate,
                    "stalled_seconds": if stalled { quiet.as_secs() } else { 0 },
                    "rate_limit": self.cfg.resync_rate,
                    "paused": p.paused,
                    "comparing": p.compare.is_some(),
                    "last_error": p.last_error,
                })
            })
            .collect();
        if self.cfg.role == NodeRole::Secondary {
            for l in self.links.values().filter(|l| !l.closing) {
                if let Some(sess) = &l.session {
                    peers.push(json!({
                        "node_id": sess.peer.node_id,
                        "address": l.addr,
                        "state": "connected",
                        // The primary reported this replica in sync in
                        // this session (only known from protocol version 4
                        // on: null before).
                        "in_sync": (l.version >= ANNOUNCE_VERSION).then_some(l.announced),
                    }));
                }
            }
        }
        json!({
            "node_id": self.node_id,
            // Absolute, for tools run elsewhere (`switchover --admin-socket`
            // reads the handover from it), with the device and inode of its
            // lock file so that a tool can tell whether the same path names
            // the same replica on its side (a container, a chroot).
            "dir": std::fs::canonicalize(&self.cfg.dir)
                .ok()
                .map(|d| d.display().to_string()),
            "dir_lock": crate::store::dir::lock_id(&self.cfg.dir),
            "role": self.cfg.role.name(),
            "inconsistent": self.generation.flags & generation::FLAG_INCONSISTENT != 0,
            // Why, when it is: a crash recovery that could not vouch for
            // some blocks (rather than a resync cut short).
            "uncertain": store.is_some_and(|s| s.uncertain_count() > 0),
            "refused": self.refused,
            "rate_limit": self.cfg.resync_rate,
            "peers": peers,
            // Connections dropped for damage in transit (each then resent
            // what it lost): frames that failed their checksum, records
            // whose data failed its block checksums.
            "damaged_in_transit": {
                "frames": self.damaged_frames,
                "records": self.damaged_records,
            },
            // A secondary is scrubbed by its primary.
            "scrub": (self.cfg.role == NodeRole::Primary).then(|| self.scrub.json(io.now())),
            "store": store.map(|s| s.status_json(io)),
        })
        .to_string()
    }

    /// Connections dropped for damage in transit: (frames that failed
    /// their checksum, SummedRecords whose data failed its block checksums).
    pub fn damaged_in_transit(&self) -> (u64, u64) {
        (self.damaged_frames, self.damaged_records)
    }

    /// Run one admin command (a line as the admin socket takes it) and
    /// return its JSON answer: for the simulation, which has no socket.
    pub fn admin_command(&mut self, io: &mut dyn Io, store: &mut Store, line: &str) -> String {
        self.t = io.now();
        self.command(io, store, line)
    }

    fn command(&mut self, io: &mut dyn Io, store: &mut Store, line: &str) -> String {
        let now = self.t;
        let words: Vec<&str> = line.split_whitespace().collect();
        let peer_sel = |w: Option<&&str>| -> Result<Option<u32>, String> {
            match w {
                None => Ok(None),
                Some(s) => s
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| format!("not a peer id: {s:?}")),
            }
        };
        let result: Result<(), String> = match words.first().copied() {
            Some("status") => return self.status_json(Some(store), io),
            Some("scrub") => self.scrub_command(&words[1..]),
            Some(cmd @ ("pause" | "resume" | "start" | "full")) => {
                match peer_sel(words.get(1)) {
                    Err(e) => Err(e),
                    Ok(sel) => {
                        let mut hit = false;
                        let mut failed = None;
                        let mut left_sync = false;
                        for p in self.peers.iter_mut() {
                            if sel.is_some_and(|id| id != p.node_id) {
                                continue;
                            }
                            hit = true;
                            p.rate = 0.0;
                            p.rate_mark = (now, p.sent_bytes);
                            p.rate_window = (now, p.sent_bytes);
                            match cmd {
                                "pause" => p.paused = true,
                                "resume" => p.paused = false,
                                "full" => {
                                    p.paused = false;
                                    p.bitmap.set_all();
                                    if p.state == PeerState::InSync {
                                        p.state = PeerState::Syncing;
                                        left_sync = true;
                                        p.resync_started = now;
                                        p.sent_at_resync_start = p.sent_bytes;
                                    }
                                    p.cursor = 0;
                                    p.total = p.bitmap.dirty() * BLOCK;
                                }
                                _ => {
                                    p.paused = false;
                                    p.backoff = BACKOFF_MIN;
                                    p.retry_at = self.t;
                                }
                            }
                            // An operator's pause outlives a restart.
                            let f = p.bitmap.flags();
                            let want = if p.paused {
                                f | FLAG_PAUSED
                            } else {
                                f & !FLAG_PAUSED
                            };
                            if want != f {
                                if let Err(e) = p.bitmap.set_flags(want) {
                                    failed = Some(e);
                                }
                            }
                        }
                        if left_sync {
                            // Writes from now on may miss what it holds.
                            self.run_due = true;
                        }
                        if let Some(e) = failed {
                            Err(e)
                        } else if hit {
                            Ok(())
                        } else if self.peers.is_empty() {
                            Err("this node has no peers to resync (it is not a primary with --peer)".into())
                        } else {
                            Err(format!(
                                "no such peer: {} (this node's peers: {})",
                                sel.unwrap_or(0),
                                self.peers
                                    .iter()
                                    .map(|p| p.node_id.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ))
                        }
                    }
                }
            }
            Some("switchover") if self.cfg.role != NodeRole::Primary || self.peers.is_empty() => {
                Err("only a primary with peers can switch over".into())
            }
            Some("switchover") => {
                // Stop as on SIGTERM, handing the generation over on the way
                // out (see `start_handover`); `resync status` is gone then.
                let lagging: Vec<String> = self
                    .peers
                    .iter()
                    .filter(|p| p.state != PeerState::InSync)
                    .map(|p| format!("peer {} is {}", p.node_id, p.state.name()))
                    .collect();
                if lagging.is_empty() {
                    self.switchover = true;
                    Ok(())
                } else {
                    Err(format!(
                        "not every peer is in sync ({}): a switchover now would leave a peer \
                         promoted without the newest writes; wait for `resync status` to show \
                         every peer in_sync",
                        lagging.join(", ")
                    ))
                }
            }
            Some("rate") if self.peers.is_empty() => {
                Err("this node has no peers to resync (it is not a primary with --peer)".into())
            }
            Some("rate") => match words.get(1).map(|w| crate::size::parse_size(w)) {
                Some(Ok(r)) => {
                    self.cfg.resync_rate = r;
                    for p in self.peers.iter_mut() {
                        p.rate = 0.0;
                        p.rate_mark = (now, p.sent_bytes);
                        p.rate_window = (now, p.sent_bytes);
                    }
                    Ok(())
                }
                Some(Err(e)) => Err(e),
                None => Err("rate needs a value".into()),
            },
            _ => Err(format!("unknown command {line:?}")),
        };
        self.kick_resync(io, store);
        self.scrub_kick(io, store);
        match result {
            Ok(()) => serde_json::json!({ "ok": true }).to_string(),
            Err(e) => serde_json::json!({ "ok": false, "error": e }).to_string(),
        }
    }

    /// `nbdmirror scrub start|pause|resume|cancel|rate SIZE`.
    fn scrub_command(&mut self, words: &[&str]) -> Result<(), String> {
        if self.cfg.role != NodeRole::Primary {
            return Err("this node is a secondary: scrubs run on the primary, which has every in-sync secondary verify its copy too (`nbdmirror check` verifies a stopped replica)"
                .into());
        }
        let now = self.t;
        let r = match words {
            ["start"] => self.scrub.start(now),
            ["pause"] => self.scrub.pause(),
            ["resume"] => self.scrub.resume(now),
            ["cancel"] => self.scrub.cancel(),
            ["rate", v] => crate::size::parse_size(v).map(|r| self.scrub.rate = r),
            _ => Err(format!("unknown scrub command {:?}", words.join(" "))),
        };
        if r.is_ok() && matches!(words.first(), Some(&"start") | Some(&"resume")) {
            crate::elog!(
                "nbdmirror: scrub {} ({}): every block is read from the disk and verified{}",
                if words[0] == "start" {
                    "started"
                } else {
                    "resumed"
                },
                if self.scrub.rate == 0 {
                    "no rate cap".to_string()
                } else {
                    format!("at most {} bytes/s", self.scrub.rate)
                },
                if self.peers.is_empty() {
                    String::new()
                } else {
                    ", and compared with every connected peer's copy".to_string()
                }
            );
        }
        r
    }

    fn admin_accepted(&mut self, io: &mut dyn Io, c: Completion) {
        if self.shutting_down {
            if c.result >= 0 {
                // SAFETY: fresh descriptor from accept.
                drop(unsafe { OwnedFd::from_raw_fd(c.result) });
            }
            return;
        }
        if c.result < 0 && self.accept_backoff.failed("admin accept", -c.result) {
            self.admin_accept_paused = true;
            return;
        }
        if let Some(a) = &self.admin {
            io.submit(tok(KIND_ADMIN_LISTEN, 0), Op::Accept { fd: a.as_raw_fd() });
        }
        if c.result < 0 {
            return;
        }
        // SAFETY: fresh descriptor from accept.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
        let id = self.next_admin;
        self.next_admin += 1;
        let raw = fd.as_raw_fd();
        self.admin_conns.insert(
            id,
            AdminConn {
                fd,
                buf: Vec::new(),
                busy: true,
                done: false,
            },
        );
        io.submit(
            tok(KIND_ADMIN, id << 1),
            Op::Recv {
                fd: raw,
                buf: vec![0u8; 1024],
                at: 0,
                end: 1024,
            },
        );
    }

    fn admin_io(&mut self, io: &mut dyn Io, store: &mut Store, id: u64, c: Completion) {
        let conn_id = id >> 1;
        let Some(conn) = self.admin_conns.get_mut(&conn_id) else {
            return;
        };
        conn.busy = false;
        let raw = conn.fd.as_raw_fd();
        if id & 1 == 1 {
            // A reply was sent (or failed): done.
            self.admin_conns.remove(&conn_id);
            return;
        }
        let Op::Recv { buf, .. } = c.op else {
            return;
        };
        if c.result <= 0 || conn.done {
            self.admin_conns.remove(&conn_id);
            return;
        }
        conn.buf.extend_from_slice(&buf[..c.result as usize]);
        if conn.buf.len() > 4096 {
            self.admin_conns.remove(&conn_id);
            return;
        }
        let Some(nl) = conn.buf.iter().position(|&b| b == b'\n') else {
            conn.busy = true;
            io.submit(
                tok(KIND_ADMIN, conn_id << 1),
                Op::Recv {
                    fd: raw,
                    end: buf.len(),
                    buf,
                    at: 0,
                },
            );
            return;
        };
        let line = String::from_utf8_lossy(&conn.buf[..nl]).into_owned();
        conn.done = true;
        let mut reply = self.command(io, store, &line);
        reply.push('\n');
        if let Some(conn) = self.admin_conns.get_mut(&conn_id) {
            conn.busy = true;
            io.submit(
                tok(KIND_ADMIN, conn_id << 1 | 1),
                Op::Send {
                    fd: raw,
                    buf: reply.into_bytes(),
                    at: 0,
                },
            );
        }
    }
}

/// Run `f` (bind or connect) on a Unix socket path; a path longer than
/// sun_path allows (108 bytes) is used relative to its directory instead.
/// Only for single-threaded moments (start-up, the CLI): the working
/// directory changes briefly.
pub fn on_unix_path<T>(
    p: &std::path::Path,
    f: impl Fn(&std::path::Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    match f(p) {
        Err(e) if p.as_os_str().len() >= 100 => {
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return Err(e);
            };
            let back = std::env::current_dir()?;
            std::env::set_current_dir(dir)?;
            let r = f(std::path::Path::new(name));
            std::env::set_current_dir(back)?;
            r
        }
        r => r,
    }
}

fn peer_name(fd: RawFd) -> String {
    // SAFETY: getpeername into a zeroed sockaddr_storage of the right length.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return "an unknown address".into();
        }
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let a = &*(&ss as *const _ as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                format!("{ip}:{}", u16::from_be(a.sin_port))
            }
            libc::AF_INET6 => {
                let a = &*(&ss as *const _ as *const libc::sockaddr_in6);
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                format!("[{ip}]:{}", u16::from_be(a.sin6_port))
            }
            _ => "a local socket".into(),
        }
    }
}
