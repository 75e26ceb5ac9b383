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
//!
//! This file holds the state, the replicated write path (client writes,
//! range locks, parking, answers), store events, shutdown and handover and
//! the tick; the rest of `impl Mirror` lives beside it by concept: `link`
//! (connect/accept, handshake, frames, link failure), `secondary` (applying
//! a session's frames), `resync` (bitmap and checksum resync), `repair`
//! (healing a bad block from a peer), `scrubber` (a scrub pass; its state
//! and record are in `scrub`) and `admin` (the admin socket and status).

pub mod bitmap;
pub mod generation;
pub mod scrub;
pub mod wire;

mod admin;
mod link;
mod repair;
mod resync;
mod scrubber;
mod secondary;

pub use admin::{bind_admin_socket, on_unix_path, socket_is_live};
pub use link::bind_peer_listener;
use link::nonce;

use std::collections::{BTreeMap, VecDeque};

use crate::idmap::{IdMap, IdSet};
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
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
    /// Secondary: frames wait (the socket is not read) while too many
    /// records are being applied (`APPLYING_MAX`).
    throttled: bool,
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
    /// Accepted at; one without a whole command line `ADMIN_IDLE` later is
    /// shut down (see `tick`).
    opened: Instant,
}

/// How long an admin connection may take to send its command line.
const ADMIN_IDLE: Duration = Duration::from_secs(10);

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
    /// When to look again whether the process that answered on the admin
    /// socket at start has gone (`retry_admin_socket`).
    admin_retry_at: Option<Instant>,
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
    /// Secondary: the last refusal of a primary logged (why, when, refusals
    /// for the same reason since, not logged; see `refuse_primary`).
    last_refusal: Option<(String, Instant, u64)>,
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
    /// Log lines about peer connections refused before authentication.
    refused_log: crate::log::Limiter,
    /// Log lines about admin connections refused past the cap.
    admin_log: crate::log::Limiter,
    damaged_records: u64,
    resync_reads: IdMap<u64, ResyncRead>,
    /// Secondary: store request -> (link, message id, is a flush, payload
    /// bytes).
    applying: IdMap<u64, (u64, u64, bool, u64)>,
    /// Secondary: the payload bytes of `applying` (see `APPLYING_MAX`).
    applying_bytes: u64,
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

fn errno_str(e: i32) -> String {
    std::io::Error::from_raw_os_error(e).to_string()
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
        // Left alone because a process answered there: it may be one
        // that is going (looked at again, `retry_admin_socket`).
        let admin_retry_at = match (&admin, &cfg.admin_socket) {
            (None, Some(p))
                if std::fs::symlink_metadata(p).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) =>
            {
                Some(t0)
            }
            _ => None,
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
            admin_retry_at,
            admin,
            admin_conns: IdMap::default(),
            next_admin: 0,
            locks: BTreeMap::new(),
            repairs: IdMap::default(),
            repair_waiting: Vec::new(),
            repair_parts: IdMap::default(),
            peer_reads: IdMap::default(),
            handover: Handover::Idle,
            last_refusal: None,
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
            refused_log: crate::log::Limiter::new(
                "peer connections refused before authentication",
                Duration::from_secs(10),
                20,
            ),
            admin_log: crate::log::Limiter::new(
                "admin connections refused",
                Duration::from_secs(10),
                20,
            ),
            damaged_records: 0,
            resync_reads: IdMap::default(),
            applying: IdMap::default(),
            applying_bytes: 0,
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
                // Answers already queued go out first: a secondary stopping
                // because its store failed has just answered the write that
                // failed (ENOSPC, EIO), and its primary saw only "the peer
                // closed the connection" when the close overtook it (a
                // tester's find).
                if let Some(l) = self.links.get_mut(&id) {
                    l.close_after_send = l.session.is_some();
                }
                self.close_link(io, id);
            }
        }
    }

    /// Secondary: its store failed and it is stopping. Tell each primary
    /// why in a Reject (queued behind the answers already due, among them
    /// the failed write's), so that its log names the cause rather than
    /// only "the peer closed the connection" (a tester's find).
    pub fn store_failed(&mut self, io: &mut dyn Io, why: &str) {
        let msg = format!("this secondary's storage failed ({why}); it is stopping");
        let ids: Vec<u64> = self.links.keys().copied().collect();
        for id in ids {
            let Some(l) = self.links.get_mut(&id) else {
                continue;
            };
            if l.closing {
                continue;
            }
            if let Some(s) = l.session.as_mut() {
                s.reject(crate::peer::RejectCode::Failed, &msg, &mut l.out);
                self.post_send(io, id);
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
        // What a closing link still had to send (a Reject saying why this
        // node stops, answers) goes out now, if no send of it is in flight
        // (its bytes would interleave) and the socket takes it at once.
        for l in self.links.values_mut() {
            if !l.close_after_send || l.send_busy {
                continue;
            }
            let bufs: Vec<Vec<u8>> = l
                .segs
                .drain(..)
                .chain([std::mem::take(&mut l.out)])
                .collect();
            'bufs: for b in bufs {
                let mut at = 0;
                while at < b.len() {
                    // SAFETY: send from a live buffer on a socket this node owns.
                    let r = unsafe {
                        libc::send(
                            l.fd.as_raw_fd(),
                            b[at..].as_ptr().cast(),
                            b.len() - at,
                            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
                        )
                    };
                    if r <= 0 {
                        break 'bufs;
                    }
                    at += r as usize;
                }
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

    // ----- completions (routed to `link` and `admin`) -----------------------

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
            FrameKind::Pong => {
                wire::decode_u64(payload, "Pong")?;
            }
            FrameKind::Ping => {
                wire::decode_u64(payload, "Ping")?;
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

    // ----- timers -------------------------------------------------------------

    pub fn tick(&mut self, io: &mut dyn Io, store: &mut Store) {
        self.t = io.now();
        self.refused_log.log_suppressed(self.t);
        self.admin_log.log_suppressed(self.t);
        for c in self.admin_conns.values() {
            if !c.done && self.t.saturating_duration_since(c.opened) > ADMIN_IDLE {
                // The pending receive ends (0 bytes) and `admin_io` drops it.
                // SAFETY: shutdown on a socket this node owns.
                unsafe { libc::shutdown(c.fd.as_raw_fd(), libc::SHUT_RDWR) };
            }
        }
        if self.admin_retry_at.is_some_and(|at| self.t >= at) && !self.shutting_down {
            self.retry_admin_socket(io);
        }
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
            // Runs shrink to the tokens there are (`resync_peer`), so the
            // bucket need not hold a whole batch: a low cap is kept.
            refill(&mut p.tokens, self.cfg.resync_rate, dt, BLOCK);
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
            // Not reading it, for back-pressure: its silence is this node's.
            if l.session.is_none() || l.throttled {
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
                        "a request was not answered within {} ms (a flush within {} ms) although \
                         the connection is alive, its bytes still arriving (its disk may be stuck)",
                        timeout.as_millis() * 4,
                        timeout.as_millis() * 10
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
}
