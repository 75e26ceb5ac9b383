//! The replica store: one node's copy of the disk in one directory.
//!
//! Owns the data path below the protocol: journal appends, group commit, the
//! read overlay, applying journaled writes to the data file, per-block checksum
//! verification, checkpoints and crash recovery. It is a state machine driven
//! through the [`Io`](crate::io::Io) seam: callers submit requests, route
//! completions whose token has [`STORE_TOKEN`] set back to it, and collect
//! [`StoreEvent`]s. It never talks NBD and never touches a socket.
//!
//! Write path, top to bottom:
//! 1. `write`/`write_zeroes` place a record in the journal ring (waiting in the
//!    backlog when it is full) and submit the journal write.
//! 2. When the record is written, its extent enters the overlay (newest
//!    sequence number wins) and the client may be answered.
//! 3. A journal fdatasync covers every record written so far (group commit);
//!    FLUSH and FUA are answered when it covers their target sequence number.
//! 4. Records covered by a sync are applied to the data file and their blocks'
//!    checksums updated (the WAL rule: data never reaches the data file before
//!    its record is durable).
//! 5. A checkpoint syncs the data file and the checksum table, then moves the
//!    superblock's journal tail forward, freeing ring space.
//!
//! This file holds the store's state, the journaled write path, group commit
//! and completion dispatch; the other parts of the state machine live beside
//! it as `impl Store` blocks: `inplace` (whole-block writes straight to the
//! data file under intent records), `read` (step 2's overlay and the data
//! file, verified), `apply` (steps 4 and 5), `folios` (the page-cache drops
//! large folios need), `recovery` (replay after a crash) and `blocking`
//! (setup-time I/O helpers).

mod apply;
mod blocking;
pub mod check;
pub mod checksum;
pub mod dir;
mod folios;
pub mod format;
mod inplace;
pub mod journal;
pub mod overlay;
mod read;
mod recovery;
pub mod uncertain;

pub use blocking::{
    check_table_memory, load_superblock, read_blocking, read_blocks, read_checksum_table,
    sync_blocking, write_blocking, write_superblock_blocking,
};
use folios::{cached_pieces, FolioChunk};
use recovery::replay_all;

use std::collections::{BTreeMap, VecDeque};

use crate::idmap::IdMap;
use std::os::fd::RawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::io::{Completion, Io, Op, WriteBuf};
use checksum::{block_checksum, is_zero, ChecksumTable};
use format::{
    data_hash, RecordHeader, RecordKind, Superblock, BLOCK_SIZE, CHECKSUM_TABLE_OFFSET,
    RECORD_HEADER_LEN, SUPERBLOCK_SLOT,
};
use journal::{errno_str, JournalRing};
use overlay::{Content, Overlay, Piece};

/// One InPlace intent record covers this much of the disk: in-place writes
/// into a region whose intent is durable need no journal sync of their own.
pub const INTENT_REGION: u64 = 16 << 20;

/// Default `Tuning::large_write`. Writes at least this long (and at least
/// `Tuning::inplace_min`) are *large*: one that journal records block from going in place may be held
/// for a checkpoint, one going in place records the next region's intent
/// ahead (a sequential writer never waits for an intent sync), and a
/// mirrored one travels to peers as a SummedRecord. Smaller in-place writes
/// (random 4 KiB writes) do none of that, and may open at most
/// `Tuning::inplace_regions` regions (see there).
pub const LARGE_WRITE: u64 = 256 * 1024;

/// Default `Tuning::inplace_regions`: 4 GiB of the disk (256 regions of 16
/// MiB) open to small in-place writes at once.
pub const INPLACE_REGIONS: usize = 256;

/// Granularity of the map of journaled regions that in-place writes avoid.
const JOURNALED_CHUNK: u64 = 1 << 20;

/// Blocks of a [`JOURNALED_CHUNK`].
const CHUNK_BLOCKS: u64 = JOURNALED_CHUNK / BLOCK_SIZE;

/// A large write split around journaled blocks ([`Store::split_plan`])
/// sends runs of free blocks at least this long in place; shorter ones go
/// through the journal with the blocked blocks.
const SPLIT_MIN_RUN: u64 = 64 * 1024;

/// Request ids of the parts of a split write. Never a caller's: the server
/// counts its own from 0, the mirror's carry `MIRROR_RID` (1 << 61).
const SPLIT_RID: ReqId = 1 << 62;

/// A 1 MiB chunk of the disk that journal records not yet released by a
/// checkpoint touch (see `Store::journaled_chunks`).
struct JournaledChunk {
    /// The newest such record.
    seq: u64,
    /// Whether it came from a large write.
    large: bool,
    /// The chunk's blocks any of them touch (bit `b` for its block `b`);
    /// `None`: all of them (a chunk a zero record or a large write covers
    /// whole takes no mask). Bits are only ever added while the chunk is
    /// listed, so this may name blocks of records a checkpoint has since
    /// released: never fewer.
    blocks: Option<Box<[u64; (CHUNK_BLOCKS / 64) as usize]>>,
}

impl JournaledChunk {
    fn new() -> JournaledChunk {
        JournaledChunk {
            seq: 0,
            large: false,
            blocks: Some(Box::default()),
        }
    }

    /// Mark the disk's blocks `[first, end)` that fall in this chunk, the
    /// disk's chunk `c`.
    fn mark(&mut self, c: u64, first: u64, end: u64) {
        let base = c * CHUNK_BLOCKS;
        let lo = first.max(base) - base;
        let hi = end.min(base + CHUNK_BLOCKS).saturating_sub(base);
        if lo == 0 && hi == CHUNK_BLOCKS {
            self.blocks = None;
        }
        let Some(words) = self.blocks.as_mut() else {
            return;
        };
        let mut b = lo;
        while b < hi {
            let n = (64 - b % 64).min(hi - b);
            let bits = if n == 64 {
                u64::MAX
            } else {
                ((1u64 << n) - 1) << (b % 64)
            };
            words[(b / 64) as usize] |= bits;
            b += n;
        }
    }

    /// Whether the chunk's block `b` (0..CHUNK_BLOCKS) is marked.
    fn marked(&self, b: u64) -> bool {
        self.blocks
            .as_ref()
            .is_none_or(|w| w[(b / 64) as usize] & (1 << (b % 64)) != 0)
    }
}

/// Writes held until the cache drops that clear their range have finished
/// (a write first would fill the range again before the drop empties it).
#[derive(Debug, Default)]
struct AfterDrops {
    drops_left: usize,
    writes: Vec<Op>,
}

impl AfterDrops {
    /// One of the drops finished: the writes to submit now (all of them
    /// once no drop is left, else none).
    fn drop_done(&mut self) -> Vec<Op> {
        if self.drops_left == 0 {
            return Vec::new();
        }
        self.drops_left -= 1;
        if self.drops_left > 0 {
            return Vec::new();
        }
        std::mem::take(&mut self.writes)
    }
}

/// Tokens with this bit set belong to the store.
pub const STORE_TOKEN: u64 = 1 << 62;
/// Largest payload one journal record carries; bigger writes are split.
pub const MAX_RECORD_DATA: usize = 1024 * 1024;
/// Bytes a caller should leave in front of a write payload so the store can
/// put the record header there instead of copying the data.
pub const WRITE_HEADROOM: usize = RECORD_HEADER_LEN;

const EIO: i32 = libc::EIO;
/// Largest buffer of zeroes written where a hole cannot be punched.
const ZERO_CHUNK: usize = 1024 * 1024;

pub type ReqId = u64;

/// Least time between checkpoints started early for in-place writes.
const INPLACE_CHECKPOINT_GAP: Duration = Duration::from_millis(100);

/// Least time between checkpoints started early so that small writes may
/// drop large folios (`Store::folios_wanted`).
const FOLIO_CHECKPOINT_GAP: Duration = Duration::from_secs(1);

/// [`Store::block_sums`] for a block whose checksum is not settled.
pub const UNKNOWN_SUM: u64 = u64::MAX;

/// The outcome of a request, as an errno (positive) on failure.
#[derive(Debug)]
pub enum StoreEvent {
    Written(ReqId, Result<(), i32>),
    Flushed(ReqId, Result<(), i32>),
    /// Read data sits at `buf[head..head+len]`.
    Read(ReqId, Result<Vec<u8>, i32>),
}

#[derive(Clone, Copy, Debug)]
pub struct Tuning {
    /// Sync the journal once this many bytes are unsynced even with no FLUSH.
    pub sync_bytes: u64,
    /// Sync the journal at least this often when there are unsynced writes.
    pub sync_interval: Duration,
    /// Checkpoint when the ring is this full (fraction in 1/100).
    pub checkpoint_percent: u64,
    /// Checkpoint at least this often when something was applied.
    pub checkpoint_interval: Duration,
    /// Verify block checksums on every read.
    pub verify_reads: bool,
    /// Block-aligned writes at least this long go straight to the data file
    /// with only a small record in the journal (0 disables this): 4 KiB
    /// by default, so that every whole-block write skips the journal's
    /// double write (docs/design.md, "In-place writes").
    pub inplace_min: u64,
    /// In-place writes shorter than [`LARGE_WRITE`] go in place only into a
    /// region that already has an intent, or while fewer than this many
    /// regions have one; others are journaled. Crash recovery re-checksums
    /// every region with an intent since the last checkpoint, so this
    /// bounds that work for random writes all over a large disk (like
    /// DRBD's activity log, `al-extents`). Large writes are not limited.
    pub inplace_regions: usize,
    /// Where large writes start ([`LARGE_WRITE`], the default; tests of
    /// the large-write rules with small disks lower it).
    pub large_write: u64,
    /// Log the block checksums of in-place writes in the journal (a Void
    /// record with [`format::VOID_FLAG_SUMS`]) before their data is
    /// written, so that crash recovery can vouch for a block of an intent
    /// region whose data matches one (docs/format.md, "Checksum records").
    /// A secondary sets it: a block it cannot vouch for costs a compare of
    /// the whole disk with its primary.
    pub vouch_inplace: bool,
    /// Recover from the superblock found even when the journal holds
    /// records of the next run (`serve --force-older-superblock`; see
    /// `Store::open`).
    pub force_older_superblock: bool,
    /// Refuse to recover, writing nothing, when the journal is damaged in
    /// the middle (intact records follow the stop, so flushed writes would
    /// be dropped): a mirrored primary, whose peers hold those writes and
    /// would otherwise be made to match the older data (`serve
    /// --accept-journal-loss` turns it off).
    pub refuse_journal_loss: bool,
}

impl Default for Tuning {
    fn default() -> Self {
        Tuning {
            sync_bytes: 32 << 20,
            sync_interval: Duration::from_millis(200),
            checkpoint_percent: 40,
            checkpoint_interval: Duration::from_secs(5),
            verify_reads: true,
            inplace_min: BLOCK_SIZE,
            inplace_regions: INPLACE_REGIONS,
            large_write: LARGE_WRITE,
            vouch_inplace: false,
            force_older_superblock: false,
            refuse_journal_loss: false,
        }
    }
}

/// A request answered once the journal is durable up to `seq` and the data
/// file has been synced after `data` in-place writes completed.
#[derive(Debug)]
struct Waiter {
    seq: u64,
    data: u64,
    req: ReqId,
    is_write: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum InPlaceState {
    /// Waiting for the intent records of its regions to be durable.
    Recorded,
    /// Waiting for the journal write of the record that logs its blocks'
    /// checksums (`Tuning::vouch_inplace`).
    Summing,
    /// The record is durable; the data is being written to the data file.
    Writing,
}

/// A large aligned write that goes straight to the data file. Each 16 MiB
/// region it touches must have a durable InPlace *intent* record in the
/// journal before the data is written, so a crash can always find which
/// blocks to re-checksum; one intent serves every write into its region until
/// a checkpoint releases it.
#[derive(Debug)]
struct InPlaceWrite {
    req: ReqId,
    offset: u64,
    len: u64,
    buf: Vec<u8>,
    at: usize,
    fua: bool,
    state: InPlaceState,
    /// Seqs of the intent records covering this write's regions; the data
    /// may be written once all are durable.
    intents: Vec<u64>,
    /// The blocks' checksums, computed on arrival while the payload is
    /// still in the CPU cache; they enter the table once the data is written.
    sums: Vec<u64>,
    /// Written through the O_DIRECT descriptor (from an aligned copy when
    /// `bounced`).
    direct: bool,
    bounced: bool,
    /// Page-cache pieces still being written, and the first error one got.
    pieces_left: usize,
    piece_error: Option<i32>,
    /// Its pieces while cache drops clear their range first (see
    /// `Store::prewrite_drops`).
    held: AfterDrops,
}

/// With a worker descriptor, the last of every this many page-cache pieces
/// of an in-place write goes through it to the ring's workers, the others
/// through the data file's own descriptor, which `serve` has the loop write
/// (`Store::set_worker_data_fd`). Single node, fio 1 MiB writes at QD8 on
/// this 2-core VM: all on the workers 2.4-2.5 GiB/s, all on the loop
/// 2.7-2.8, 3 of 4 on the loop 2.9-3.1.
pub const WORKER_PIECE_EVERY: usize = 4;

/// At most this many checksum-failure log lines per this window; the rest
/// are counted in one line (`crate::log::Limiter`).
const CORRUPT_LOG_BURST: u32 = 10;
const CORRUPT_LOG_WINDOW: Duration = Duration::from_secs(10);

/// Zero record flag: WRITE_ZEROES with NO_HOLE; the range must stay
/// allocated, so it is zeroed with FALLOC_FL_ZERO_RANGE instead of a punched
/// hole (docs/format.md).
pub const ZERO_FLAG_NO_HOLE: u16 = 1;

/// Largest write the store sends to the data file through the page cache;
/// longer ones go as several, split at multiples of this offset. The kernel
/// sizes a page-cache folio by the write that creates it, and ext4 walks
/// every block of a folio on each later write into it: after 1 MiB writes,
/// each 4 KiB write into the same range cost about 15 us more on this
/// machine (docs/design.md, "Page-cache pieces").
pub const PAGE_CACHE_PIECE: u64 = 64 * 1024;

/// The fallocate mode that zeroes a range: a punched hole, or with
/// `provision` (NO_HOLE) zeroed blocks that stay allocated.
fn zero_mode(provision: bool) -> i32 {
    if provision {
        libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
    } else {
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
    }
}

/// After recovery moved the tail past every old record under a new epoch,
/// nothing in the ring is needed any more: zero it (FALLOC_FL_ZERO_RANGE,
/// which turns the extents unwritten and drops the ring's page cache).
///
/// Why: the recovery scan and the search for stranded records read the
/// ring in large pieces, and the kernel caches what a large read brings in
/// as large folios. ext4 walks every block of a folio on each small write
/// into it, so every journal append after that cost twice as much
/// (mirrored 4 KiB random writes: 20k -> 25k IOPS once dropped). Appends
/// into unwritten extents also never read a partial page back from disk.
/// A filesystem without ZERO_RANGE keeps the ring as it is: only slower.
fn renew_journal(io: &mut dyn Io, journal: RawFd, size: u64) {
    let c = io.run(Op::Fallocate {
        fd: journal,
        mode: zero_mode(true),
        offset: 0,
        len: size,
    });
    if c.result < 0 && c.result != -libc::EOPNOTSUPP {
        crate::elog!(
            "nbdmirror: note: could not zero the old journal ring ({}); appends may be slower",
            errno_str(-c.result)
        );
    }
}

/// `[offset, offset + len)` cut at multiples of [`PAGE_CACHE_PIECE`]:
/// (offset, len) of each piece, in order.
fn page_cache_pieces(offset: u64, len: u64) -> impl Iterator<Item = (u64, u64)> {
    let end = offset + len;
    let mut at = offset;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = ((at / PAGE_CACHE_PIECE) + 1) * PAGE_CACHE_PIECE;
        let piece = (at, next.min(end) - at);
        at = next.min(end);
        Some(piece)
    })
}

/// Memory alignment of O_DIRECT buffers (enough for every device's
/// `dio_mem_align`; offsets and lengths of in-place writes are whole blocks).
const DIRECT_ALIGN: usize = 4096;

/// A write held back until a checkpoint covers every journal record older
/// than it, so that it can go in place instead of through the journal (see
/// [`Store::write`]).
#[derive(Debug)]
struct Deferred {
    /// Released once `checkpointed_seq >= target` (0: with the one before).
    target: u64,
    op: DeferredOp,
}

#[derive(Debug)]
enum DeferredOp {
    Write {
        req: ReqId,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
    },
    Zeroes {
        req: ReqId,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    },
}

impl DeferredOp {
    fn range(&self) -> (u64, u64) {
        match *self {
            DeferredOp::Write { offset, len, .. } => (offset, offset + len as u64),
            DeferredOp::Zeroes { offset, len, .. } => (offset, offset + len),
        }
    }

    fn req(&self) -> ReqId {
        match *self {
            DeferredOp::Write { req, .. } | DeferredOp::Zeroes { req, .. } => req,
        }
    }
}

/// The three files of a replica directory.
#[derive(Clone, Copy, Debug)]
pub struct Files {
    pub data: RawFd,
    pub journal: RawFd,
    pub meta: RawFd,
}

#[derive(Debug, Clone, Copy)]
enum Ctx {
    JournalWrite {
        seq: u64,
    },
    JournalVoid {
        seq: u64,
    },
    JournalSync {
        covering: u64,
    },
    ApplyRead {
        block: u64,
    },
    ApplyWrite,
    DataRead {
        read: ReqId,
        part: usize,
    },
    InPlaceData {
        seq: u64,
    },
    InPlaceDrop {
        seq: u64,
    },
    /// A zero timeout: its completion, after everything else the event
    /// loop's current batch of completions started, logs one checksum
    /// record for all the in-place writes that became ready meanwhile.
    SumsBatch,
    /// The journal write of a checksum record for in-place writes.
    SumsRecord {
        seq: u64,
    },
    ApplyDrop,
    DataSync {
        count: u64,
    },
    Checkpoint,
    Repair {
        req: ReqId,
        blocks: u64,
    },
    /// The read of the data file's copy of a repair's blocks, to compare
    /// with the peer's copy (`Store::repair`).
    RepairCompare {
        req: ReqId,
        offset: u64,
    },
}

/// A read that failed because blocks of the data file did not verify
/// against their checksums (see [`Store::take_corrupt`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRead {
    pub offset: u64,
    pub len: u64,
    pub head: usize,
    /// The blocks that failed, in order.
    pub blocks: Vec<u64>,
    /// For a scrub's read ([`Store::read_verified`]): the bytes read, bad
    /// blocks included (so the checksums of the good ones can be taken);
    /// empty for other reads.
    pub data: Vec<u8>,
}

/// At most this many failed reads are remembered for `take_corrupt`.
const MAX_CORRUPT_READS: usize = 4096;

struct WriteReq {
    chunks_left: usize,
    /// Its last chunk is still in `backlog` (not submitted yet). A flag,
    /// not a search of the backlog at every chunk's completion: that was
    /// quadratic in a long backlog (a flood of small records took a
    /// secondary 200 s to stop, 97% of it there).
    queued: bool,
    max_seq: u64,
    fua: bool,
    error: Option<i32>,
}

#[derive(Debug)]
struct PendingWrite {
    req: ReqId,
    offset: u64,
    kind: RecordKind,
    flags: u16,
    /// Payload at `buf[at..at+len]`; for Zero records `buf` is empty.
    buf: Vec<u8>,
    at: usize,
    len: u64,
}

/// One data-file read that is part of a client read.
struct ReadPart {
    /// Block-aligned file range read.
    file_start: u64,
    buf: Option<Vec<u8>>,
    /// The part's bytes start at this index of `buf` (an O_DIRECT read
    /// into the first block-aligned address of it).
    skip: usize,
    /// The part is read straight into the reply buffer (`ReadReq::out`):
    /// a block-aligned read with nothing from the overlay, the common case.
    direct: bool,
}

struct ReadReq {
    start: u64,
    len: u64,
    head: usize,
    out: Vec<u8>,
    parts: Vec<ReadPart>,
    parts_left: usize,
    epoch: u64,
    retries: u32,
    /// Check every block taken from the data file against its checksum
    /// (`Tuning::verify_reads`, or a scrub's read).
    verify: bool,
    /// Read the data file through `media_fd` (a scrub's read).
    media: bool,
}

#[derive(Default)]
struct ApplyBatch {
    upto: u64,
    ops_left: usize,
    /// Block checksums to install when the batch lands.
    sums: Vec<(u64, u64)>,
    /// Pieces to drop from the overlay when the batch lands.
    pieces: Vec<(u64, u64)>,
    /// Data pieces of at least a page-cache piece: they leave large folios
    /// (see `Store::large_folios`).
    large: Vec<(u64, u64)>,
    /// The batch's writes while cache drops clear large folios first.
    held: AfterDrops,
    /// Blocks needing read-modify-write: block -> pieces touching it.
    rmw: IdMap<u64, Vec<Piece>>,
    failed: Option<i32>,
    /// Newest sequence number in the overlay when the batch was planned
    /// (see `Store::applied_needs_durable`).
    newest: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CkptPhase {
    /// fdatasync(data) and the checksum table pages.
    SyncData,
    /// fdatasync(meta) so the table is durable before the superblock moves.
    SyncTable,
    WriteSuper,
    SyncSuper,
}

struct Checkpoint {
    upto: u64,
    tail: (u64, u64),
    phase: CkptPhase,
    ops_left: usize,
    failed: Option<i32>,
    sb: Superblock,
}

/// Live statistics for logs and the control socket.
#[derive(Debug, Default, Clone)]
pub struct StoreStats {
    pub journal_syncs: u64,
    pub checkpoints: u64,
    pub applied_bytes: u64,
    pub checksum_failures: u64,
    /// Writes that went straight to the data file (not through the journal).
    pub inplace_writes: u64,
    /// Writes held back for a checkpoint so they could go in place.
    pub deferred_writes: u64,
    /// Large writes split around journaled blocks: most of them went in
    /// place, the blocks that journal records still cover through the
    /// journal (see `Store::split_plan`).
    pub split_writes: u64,
    /// Journal records logging in-place writes' checksums
    /// (`Tuning::vouch_inplace`), and batches of such writes that went
    /// unlogged because the ring had no room.
    pub sums_records: u64,
    pub unlogged_sums: u64,
    /// 64 KiB pieces of the data file whose large cached folios were
    /// dropped before a small write (see `Store::large_folios`).
    pub cache_drops: u64,
    /// 64 KiB pieces of the data file whose cache was dropped before a
    /// large in-place write (see `Store::prewrite_drops`).
    pub prewrite_drops: u64,
    /// Blocks that failed verification and were rewritten from a peer's
    /// copy (see `Store::repair`).
    pub repaired_blocks: u64,
}

pub struct Store {
    files: Files,
    sb: Superblock,
    tuning: Tuning,
    sums: ChecksumTable,
    overlay: Overlay,
    ring: JournalRing,
    ctx: IdMap<u64, Ctx>,
    next_token: u64,
    writes: IdMap<ReqId, WriteReq>,
    reads: IdMap<ReqId, ReadReq>,
    backlog: VecDeque<PendingWrite>,
    /// Requests answered once the journal is durable up to the target seq.
    waiters: Vec<Waiter>,
    durable_seq: u64,
    applied_seq: u64,
    /// A checkpoint up to `applied_seq` must wait until the journal is
    /// durable up to here. Bytes of a record <= applied_seq that a newer
    /// record (> applied_seq) overwrote in the overlay were never written to
    /// the data file; only that newer record carries them (or their
    /// successor) after a crash, so the tail may not pass the older record
    /// before the newer one is durable. (Found by
    /// tests/crash_consistency.rs: a FUA write was lost otherwise.)
    applied_needs_durable: u64,
    checkpointed_seq: u64,
    sync_in_flight: Option<u64>,
    unsynced_bytes: u64,
    last_sync: Instant,
    last_checkpoint: Instant,
    apply: Option<ApplyBatch>,
    /// Block ranges being rewritten by the apply batch: start -> end.
    applying: BTreeMap<u64, u64>,
    apply_epoch: u64,
    deferred_reads: Vec<ReqId>,
    checkpoint: Option<Checkpoint>,
    /// Set after a failure that makes durability claims impossible.
    failed: Option<String>,
    /// The error writes and flushes get once `failed` is set: ENOSPC when
    /// the data file ran out of space, EIO otherwise.
    failed_errno: i32,
    events: Vec<StoreEvent>,
    /// Journal writes in flight: seq -> what to put in the overlay when done.
    in_flight: IdMap<u64, InFlight>,
    /// Overlay ranges a read took its bytes from.
    read_pieces: IdMap<ReqId, Vec<(u64, u64)>>,
    draining: bool,
    /// In-place writes from record placement to data-file completion, by seq.
    inplace: BTreeMap<u64, InPlaceWrite>,
    /// The in-place writes waiting for each checksum record (by its seq).
    sums_batches: IdMap<u64, Vec<u64>>,
    /// A [`Ctx::SumsBatch`] timeout is in flight.
    sums_due: bool,
    /// `stats.checkpoints` when `maybe_checkpoint` last retired the
    /// intents in-flight writes held.
    intents_retired_at: u64,
    /// In-place writes completed so far, and how many of them the last
    /// completed data-file sync covers.
    inplace_done: u64,
    data_synced: u64,
    data_sync_in_flight: bool,
    /// Regions with an InPlace intent record the journal still holds:
    /// region -> the record's seq.
    intents: IdMap<u64, u64>,
    /// The newest intent record placed; a sync is due as soon as it is written
    /// so writes reaching its region find it durable.
    newest_intent: u64,
    next_inplace_id: u64,
    /// 1 MiB chunks touched by journal records the last checkpoint has not
    /// released: which of their blocks those records touch, the newest
    /// such record's seq and whether it came from a large write (one that
    /// could have gone in place). An in-place write may not touch those
    /// blocks: after a crash, replay would write the older record's bytes
    /// over the newer in-place data.
    journaled_chunks: IdMap<u64, JournaledChunk>,
    /// Split writes (see [`Store::split_plan`]) by the caller's request id:
    /// parts left and the first error.
    splits: IdMap<ReqId, (usize, Option<i32>)>,
    /// The part request ids of split writes -> the caller's request id.
    split_parts: IdMap<ReqId, ReqId>,
    next_split_part: u64,
    /// The 64 KiB pieces of `data` where a page-cache write of data of at
    /// least `PAGE_CACHE_PIECE` finished (zeroing makes no folios), kept per
    /// 1 MiB chunk with `checkpoints_begun()` at that moment. The kernel
    /// sizes a folio by the write that creates it (up to 64 KiB here, see
    /// `PAGE_CACHE_PIECE`), and a small write later dirties the whole
    /// folio: 4 KiB random writes after a sequential pass made a primary
    /// write back 1.3 GB/s for 130 MB/s of client data (docs/design.md,
    /// "Large folios"). Before the first small write into such a piece,
    /// once a checkpoint has synced the large write (its pages are clean),
    /// the piece's cached pages are dropped, so small writes make small
    /// folios again. Only the piece goes (a folio never spans two): the
    /// rest of the chunk stays cached, and reads that never write keep the
    /// cache. A folio dirtied before the drop stays, so the drop is
    /// repeated once more after the next checkpoint (`FolioChunk::second`).
    large_folios: IdMap<u64, FolioChunk>,
    /// Reads that failed verification, until their owner takes them.
    corrupt: IdMap<ReqId, CorruptRead>,
    /// Blocks a read found marked corrupt (`checksum::CORRUPT_MARK`: bad,
    /// then rewritten in part): no copy can match their checksum, so a
    /// repair adopts a peer's copy of them (see `Store::repair`).
    /// (block -> the marked table entry seen; adopted only while the entry
    /// is still that).
    marked_seen: IdMap<u64, u64>,
    /// Repairs whose peer copy is being compared with the data file's
    /// (request -> the peer's copy; see `Store::repair`).
    repair_compares: IdMap<ReqId, Vec<u8>>,
    /// In-place writes that failed (ENOSPC, EIO) after some of their pieces
    /// reached `data`: (first block, the write's checksums). Each block
    /// holds the old data (its table entry) or the new (listed here); a
    /// read that finds the new adopts its checksum, instead of calling the
    /// block corrupt and failing it with EIO until a restart (a tester's
    /// find: a full filesystem logged 176 blocks as failing verification).
    /// Only after a failure, so the store is refusing writes already.
    failed_inplace: Vec<(u64, Vec<u64>)>,

    /// Payload buffers the store is done with, for the caller to reuse (large
    /// buffers cost a page fault per 4 KiB and a memset when fresh).
    pub recycled: Vec<Vec<u8>>,
    pub stats: StoreStats,
    /// A large aligned write went through the journal because journaled
    /// records covered its range: checkpoint early (see `write`).
    inplace_wanted: bool,
    /// Small writes met large folios that no checkpoint has synced yet, so
    /// they cannot be dropped (`drop_large_folios`): checkpoint early (at
    /// most every [`FOLIO_CHECKPOINT_GAP`]). Small writes going in place
    /// fill no ring, so otherwise the checkpoint came only at the interval
    /// (30 s), and until then every 4 KiB write after a sequential fill
    /// went into a 64 KiB folio (ext4_block_write_begin was 10% of a
    /// mirror's CPU samples, and writeback writes the whole folio).
    folios_wanted: bool,
    /// A partial write found its block corrupt and kept it marked: the
    /// next checkpoint is due at once, so the mark is in `meta` before a
    /// crash could let recovery rebuild the block's checksum from the
    /// corrupt bytes (recovery keeps a mark it finds, see `replay`).
    corrupt_marked: bool,
    /// Checksum-failure log lines (a client can trigger them at will).
    corrupt_log: crate::log::Limiter,
    /// A checkpoint is due until one covers this journal sequence number
    /// ([`Store::checkpoint_soon`]; 0: none asked for).
    checkpoint_wanted: u64,
    /// Blocks recovery could not vouch for (a mirrored node only).
    uncertain: Option<uncertain::Uncertain>,
    /// An O_DIRECT descriptor of the data file: in-place writes go through
    /// it when set (see [`Store::set_direct_fd`]).
    direct_fd: Option<RawFd>,
    /// An O_DIRECT descriptor of the data file open for reading: a scrub's
    /// reads go through it (see [`Store::set_media_fd`]).
    media_fd: Option<RawFd>,
    /// A second descriptor of the data file whose writes go to the ring's
    /// workers (see [`Store::set_worker_data_fd`]).
    worker_data_fd: Option<RawFd>,
    /// Aligned copies for in-place payloads whose memory is not aligned.
    bounce: Vec<Vec<u8>>,
    /// Writes waiting for a checkpoint, in arrival order (see [`Deferred`]).
    deferred: VecDeque<Deferred>,
    /// Files (the peers' dirty bitmaps) that a checkpoint syncs together
    /// with the data file, before it moves the journal tail: a bit set for
    /// a write is durable before the record that replays it is released.
    pub extra_sync_fds: Vec<RawFd>,
}

struct InFlight {
    req: ReqId,
    start: u64,
    end: u64,
    content: Content,
    pos: u64,
    span: u64,
}

impl Store {
    /// Recover the store from its files: pick the newest valid superblock,
    /// load checksums, replay the journal, and checkpoint the result.
    pub fn open(
        io: &mut dyn Io,
        files: Files,
        sb: Superblock,
        tuning: Tuning,
    ) -> Result<Store, String> {
        Self::open_tracking(io, files, sb, tuning, None)
    }

    /// As [`Store::open`]; with `dir` (a mirrored node's replica directory)
    /// the blocks recovery cannot vouch for are kept in
    /// [`uncertain::Uncertain`] (saved there before the journal tail moves)
    /// for the mirror to settle with a peer.
    pub fn open_tracking(
        io: &mut dyn Io,
        files: Files,
        sb: Superblock,
        tuning: Tuning,
        dir: Option<&std::path::Path>,
    ) -> Result<Store, String> {
        let mut uncertain = dir.map(uncertain::Uncertain::load).transpose()?;
        let mut sums = read_checksum_table(io, files.meta, sb.size)?;
        let mut records = Vec::new();
        let end = journal::scan(
            io,
            files.journal,
            sb.journal_size,
            sb.tail_pos,
            sb.tail_seq,
            sb.epoch,
            |_, rec| {
                records.push(rec);
                Ok(())
            },
        )?;
        let replayed = records.len();
        // Records of this epoch from the stop on that were not replayed (the
        // one at the stop, if its header survived, and any later ones). The
        // data file may already hold them (applied before the crash), so
        // their blocks' checksums are rebuilt from it rather than left to
        // fail every read. Intact ones after the stop mean the journal is
        // damaged in the middle (a crash tears only its end): reported.
        let (stranded, newer) =
            journal::stranded(io, files.journal, sb.journal_size, &end, sb.epoch)?;
        // Only the run right after the superblock's can be lost this way:
        // any later run would have written a superblock over the older slot.
        if let Some(e) = newer.filter(|&e| e == sb.epoch.wrapping_add(1)) {
            if !tuning.force_older_superblock {
                return Err(format!(
                    "the journal holds records of run (epoch) {e}, newer than the superblock \
                     recovery would start from (epoch {}): the newest superblock slot in `meta` \
                     is damaged or was lost, and recovering from the older one would drop every \
                     write that run made since its last checkpoint. Nothing was written. Check \
                     the disk. A mirrored node can be re-initialised and resynced from its peers; \
                     to recover from the older superblock anyway, dropping those writes, serve \
                     with --force-older-superblock",
                    sb.epoch
                ));
            }
            crate::elog!(
                "nbdmirror: WARNING: the journal holds records of run {e}, newer than the \
                 superblock (epoch {}); recovering from it anyway (--force-older-superblock): \
                 that run's writes since its last checkpoint are dropped",
                sb.epoch
            );
        }
        if tuning.refuse_journal_loss {
            let later: Vec<u64> = stranded
                .iter()
                .filter(|r| r.intact && r.seq > end.next_seq)
                .map(|r| r.seq)
                .collect();
            if let (Some(first), Some(last)) = (later.first(), later.last()) {
                return Err(format!(
                    "the journal is damaged: recovery stops at record {} ({}), but {} intact \
                     records of the same run follow it (seq {first}..{last}), so writes the \
                     clients saw flushed would be lost. Nothing was written. This primary's \
                     peers hold those writes, and serving it would make them match its older \
                     data: promote a peer that was in sync (`serve --role primary` there, see \
                     docs/mirroring.md) and start this node as its secondary, which gets them \
                     back; or serve it anyway, dropping them on every replica, with \
                     --accept-journal-loss. Check the disk",
                    end.next_seq,
                    end.reason,
                    later.len()
                ));
            }
        }
        let extra: Vec<(u64, u64)> = stranded
            .iter()
            .filter(|r| r.kind != RecordKind::Wrap && r.kind != RecordKind::Void)
            .map(|r| (r.offset.min(sb.size), (r.offset + r.length).min(sb.size)))
            .filter(|(s, e)| s < e)
            .collect();
        let unsure = replay_all(
            io,
            files.data,
            files.journal,
            &mut sums,
            sb.size,
            records,
            &extra,
        )?;
        if let Some(u) = uncertain.as_mut() {
            let before = u.count();
            for &(s, e) in &unsure {
                u.add(s, e);
            }
            if u.count() != before {
                u.save()?;
                crate::elog!(
                    "nbdmirror: recovery could not vouch for {} blocks (in-place writes since \
                     the last checkpoint that differ from their checksums, or journal records \
                     it could not replay): they are kept in `uncertain` until the primary has \
                     resent them",
                    u.count() - before
                );
            }
        }
        if replayed > 0 {
            crate::elog!(
                "nbdmirror: recovery replayed {replayed} journal records (stopped: {})",
                end.reason
            );
        }
        let later: Vec<&journal::Stranded> = stranded
            .iter()
            .filter(|r| r.intact && r.seq > end.next_seq)
            .collect();
        if let (Some(first), Some(last)) = (later.first(), later.last()) {
            crate::elog!(
                "nbdmirror: ERROR: the journal is damaged: recovery stopped at record {} ({}), but \
                 {} intact records of the same run follow it (seq {}..{}). They cannot be replayed \
                 in order and are dropped, so writes the client saw flushed may be lost. Their \
                 blocks now read as whatever the data file holds (their data if it was applied \
                 before the crash, older data otherwise). The damaged record's own blocks \
                 cannot be named (its header is unreadable): where their data and checksums \
                 disagree, reads fail with EIO, and `nbdmirror check` lists them. Check the disk \
                 under {}; a mirrored \
                 secondary gets them back from its primary; a primary with peers refuses to \
                 start this way unless told to (--accept-journal-loss).",
                end.next_seq,
                end.reason,
                later.len(),
                first.seq,
                last.seq,
                "the replica directory"
            );
        }
        let mut sb = sb;
        // Make the replay durable, then move the tail past it under a new epoch.
        sync_blocking(io, files.data)?;
        for (off, page) in sums.take_dirty_pages() {
            write_blocking(io, files.meta, CHECKSUM_TABLE_OFFSET + off, page)?;
        }
        sync_blocking(io, files.meta)?;
        sb.tail_pos = end.pos;
        sb.tail_seq = end.next_seq;
        sb.epoch = sb.epoch.wrapping_add(1);
        sb.write_counter += 1;
        write_superblock_blocking(io, files.meta, &sb)?;
        renew_journal(io, files.journal, sb.journal_size);
        let ring = JournalRing::new(sb.journal_size, sb.tail_pos, sb.tail_seq);
        let last = sb.tail_seq - 1;
        let large_folios = cached_pieces(io, files.data, sb.size);
        Ok(Store {
            files,
            sb,
            tuning,
            sums,
            overlay: Overlay::default(),
            ring,
            ctx: IdMap::default(),
            next_token: 0,
            writes: IdMap::default(),
            reads: IdMap::default(),
            backlog: VecDeque::new(),
            waiters: Vec::new(),
            durable_seq: last,
            applied_seq: last,
            applied_needs_durable: 0,
            checkpointed_seq: last,
            sync_in_flight: None,
            unsynced_bytes: 0,
            last_sync: Instant::now(),
            last_checkpoint: Instant::now(),
            apply: None,
            applying: BTreeMap::new(),
            apply_epoch: 0,
            deferred_reads: Vec::new(),
            checkpoint: None,
            failed: None,
            failed_errno: EIO,
            events: Vec::new(),
            in_flight: IdMap::default(),
            read_pieces: IdMap::default(),
            draining: false,
            inplace: BTreeMap::new(),
            sums_batches: IdMap::default(),
            sums_due: false,
            intents_retired_at: u64::MAX,
            inplace_done: 0,
            data_synced: 0,
            data_sync_in_flight: false,
            journaled_chunks: IdMap::default(),
            splits: IdMap::default(),
            split_parts: IdMap::default(),
            next_split_part: 0,
            large_folios,
            corrupt: IdMap::default(),
            marked_seen: IdMap::default(),
            repair_compares: IdMap::default(),
            failed_inplace: Vec::new(),

            recycled: Vec::new(),
            intents: IdMap::default(),
            newest_intent: 0,
            next_inplace_id: 0,
            stats: StoreStats::default(),
            extra_sync_fds: Vec::new(),
            inplace_wanted: false,
            folios_wanted: false,
            corrupt_marked: false,
            corrupt_log: crate::log::Limiter::new(
                "checksum failures",
                CORRUPT_LOG_WINDOW,
                CORRUPT_LOG_BURST,
            ),
            checkpoint_wanted: 0,
            uncertain,
            direct_fd: None,
            media_fd: None,
            worker_data_fd: None,
            bounce: Vec::new(),
            deferred: VecDeque::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.sb.size
    }

    pub fn superblock(&self) -> &Superblock {
        &self.sb
    }

    pub fn failure(&self) -> Option<&str> {
        self.failed.as_deref()
    }

    /// Take the events produced so far. The parts of a split write
    /// ([`Store::split_plan`]) report as one: the caller's request, once
    /// all are done, with the first error.
    pub fn drain_events(&mut self, out: &mut Vec<StoreEvent>) {
        if self.split_parts.is_empty() {
            out.append(&mut self.events);
            return;
        }
        for ev in std::mem::take(&mut self.events) {
            let StoreEvent::Written(part, r) = ev else {
                out.push(ev);
                continue;
            };
            let Some(req) = self.split_parts.remove(&part) else {
                out.push(StoreEvent::Written(part, r));
                continue;
            };
            let (left, error) = self.splits.get_mut(&req).expect("split write state");
            *left -= 1;
            if let Err(e) = r {
                error.get_or_insert(e);
            }
            if *left == 0 {
                let (_, error) = self.splits.remove(&req).unwrap();
                out.push(StoreEvent::Written(req, error.map_or(Ok(()), Err)));
            }
        }
    }

    /// Nothing in flight, nothing unapplied, nothing uncheckpointed.
    pub fn is_quiet(&self) -> bool {
        self.ctx.is_empty()
            && self.backlog.is_empty()
            && self.writes.is_empty()
            && self.reads.is_empty()
            && self.overlay.is_empty()
            && self.inplace.is_empty()
            && self.deferred.is_empty()
            && self.checkpointed_seq + 1 >= self.ring.next_seq
    }

    fn submit(&mut self, io: &mut dyn Io, ctx: Ctx, op: Op) {
        let t = self.next_token;
        self.next_token = (self.next_token + 1) & (STORE_TOKEN - 1);
        self.ctx.insert(t, ctx);
        io.submit(STORE_TOKEN | t, op);
    }

    fn poison(&mut self, why: String) {
        if self.failed.is_none() {
            crate::elog!(
                "nbdmirror: ERROR: {why}; refusing further writes and flushes until restarted"
            );
            self.failed = Some(why);
        }
        // Nobody waiting for durability may be told it happened.
        let errno = self.failed_errno;
        for Waiter { req, is_write, .. } in std::mem::take(&mut self.waiters) {
            self.events.push(if is_write {
                StoreEvent::Written(req, Err(errno))
            } else {
                StoreEvent::Flushed(req, Err(errno))
            });
        }
        for p in std::mem::take(&mut self.backlog) {
            self.writes.remove(&p.req);
            self.events.push(StoreEvent::Written(p.req, Err(EIO)));
        }
        for d in std::mem::take(&mut self.deferred) {
            self.events.push(StoreEvent::Written(d.op.req(), Err(EIO)));
        }
        // In-place writes whose data write has not started never will. (A
        // write waiting for its cache drops is already Writing: its pieces
        // go when the drops finish and fail or land like those in flight;
        // the client gets EIO either way.)
        let stuck: Vec<u64> = self
            .inplace
            .iter()
            .filter(|(_, w)| w.state != InPlaceState::Writing)
            .map(|(&seq, _)| seq)
            .collect();
        for seq in stuck {
            let w = self.inplace.remove(&seq).unwrap();
            self.events.push(StoreEvent::Written(w.req, Err(EIO)));
        }
    }

    // ----- requests -------------------------------------------------------

    /// Write `buf[at..at+len]` at `offset`. Leave [`WRITE_HEADROOM`] bytes before
    /// `at` to spare a copy.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
    ) {
        self.write_summed(io, req, offset, buf, at, len, fua, None)
    }

    /// As [`write`](Self::write), given the data's block checksums
    /// (`checksum::block_checksum` of each 4 KiB block, the write covering
    /// whole blocks) when the caller has them already (a mirrored write,
    /// whose record carries them to the peers): a write that goes in place
    /// takes them instead of hashing its data again. Paths that journal the
    /// data hash it when they apply it, as always.
    #[allow(clippy::too_many_arguments)]
    pub fn write_summed(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
        sums: Option<Vec<u64>>,
    ) {
        let len64 = len as u64;
        debug_assert!(sums.as_ref().is_none_or(
            |s| offset.is_multiple_of(BLOCK_SIZE) && len64 == s.len() as u64 * BLOCK_SIZE
        ));
        if self.overlaps_deferred(offset, offset + len64) {
            // Keep the order of overlapping writes: wait behind the held one.
            self.deferred.push_back(Deferred {
                target: 0,
                op: DeferredOp::Write {
                    req,
                    offset,
                    buf,
                    at,
                    len,
                    fua,
                },
            });
            return;
        }
        self.write_inner(io, req, offset, buf, at, len, fua, true, sums);
    }

    #[allow(clippy::too_many_arguments)]
    fn write_inner(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
        may_defer: bool,
        sums: Option<Vec<u64>>,
    ) {
        let len64 = len as u64;
        let whole = self.inplace_eligible(offset, len64)
            || match self.split_plan(offset, len64) {
                // Its chunks hold journal records, but none touches its
                // blocks: in place whole.
                Some(plan) if matches!(plan[..], [(_, _, true)]) => true,
                Some(plan) => {
                    self.stats.split_writes += 1;
                    self.write_split(io, req, offset, buf, at, fua, plan);
                    return;
                }
                None => false,
            };
        let buf = match whole {
            true => match self.try_in_place(io, req, offset, buf, at, len, fua, sums) {
                None => return,
                Some(buf) => buf,
            },
            false => buf,
        };
        if self.is_large(len64)
            && offset.is_multiple_of(BLOCK_SIZE)
            && len64.is_multiple_of(BLOCK_SIZE)
        {
            // A large write cannot go in place because journal records not
            // yet checkpointed cover its range: checkpoint soon. Journaling
            // it would mark its range journaled again, so a sequential
            // writer coming back round (after random writes) would go
            // through the journal for good, each pass keeping the next
            // from going in place. Instead hold it until a checkpoint covers
            // every record older than it (once; a few hundred ms), then
            // write it in place.
            self.inplace_wanted = true;
            let target = self.ring.next_seq - 1;
            if may_defer
                && self.blocked_by_large_records(offset, offset + len64)
                && target > self.checkpointed_seq
                && self.failed.is_none()
                && self.backlog.is_empty()
                && !self.draining
            {
                // In-place writes elsewhere keep reusing their regions'
                // intents, and the tail may not pass an intent whose write
                // is in flight: a steady stream of them would keep every
                // checkpoint short of `target` for good. Intents up to
                // `target` serve no new writes; new ones get fresh intents,
                // and the old ones drain with their writes.
                self.intents.retain(|_, seq| *seq > target);
                self.stats.deferred_writes += 1;
                self.deferred.push_back(Deferred {
                    target,
                    op: DeferredOp::Write {
                        req,
                        offset,
                        buf,
                        at,
                        len,
                        fua,
                    },
                });
                self.kick(io, false);
                return;
            }
        }
        self.enqueue(io, req, offset, RecordKind::Write, 0, buf, at, len64, fua);
    }

    /// Read what [`Store::read_verified`] takes from the data file through
    /// `fd`, an O_DIRECT descriptor of it open for reading: a scrub then
    /// checks what the disk holds, not a copy in the page cache (rot on the
    /// medium under a cached copy would go unseen for as long as the copy
    /// stays), and its pass over the whole disk neither evicts the
    /// clients' cache nor leaves readahead's large folios behind for
    /// clients' small writes to pay for (docs/design.md, "Large folios").
    /// Dirty cached pages of the range are written back by the kernel
    /// before such a read, so it sees the newest data.
    pub fn set_media_fd(&mut self, fd: Option<RawFd>) {
        self.media_fd = fd;
    }

    /// What `nbdmirror resync status --json` shows of the store: journal
    /// fill, the counters of [`StoreStats`], and how often the backend's
    /// data-file writes on the loop made it wait (`Io::loop_write_stalls`).
    pub fn status_json(&self, io: &dyn Io) -> serde_json::Value {
        let st = &self.stats;
        serde_json::json!({
            "size_bytes": self.sb.size,
            "journal_bytes": self.ring.size,
            "journal_used_bytes": self.ring.used(),
            "journal_syncs": st.journal_syncs,
            "checkpoints": st.checkpoints,
            "applied_bytes": st.applied_bytes,
            "inplace_writes": st.inplace_writes,
            "deferred_writes": st.deferred_writes,
            "split_writes": st.split_writes,
            "sums_records": st.sums_records,
            "unlogged_sums": st.unlogged_sums,
            "cache_drops": st.cache_drops,
            "prewrite_drops": st.prewrite_drops,
            "checksum_failures": st.checksum_failures,
            "repaired_blocks": st.repaired_blocks,
            "loop_write_stalls": io.loop_write_stalls(),
            "failed": self.failed,
        })
    }

    /// Answer the waiters whose journal and data-file conditions now hold.
    fn resolve_waiters(&mut self) {
        let (durable, synced) = (self.durable_seq, self.data_synced);
        let (done, rest): (Vec<_>, Vec<_>) = std::mem::take(&mut self.waiters)
            .into_iter()
            .partition(|w| w.seq <= durable && w.data <= synced);
        self.waiters = rest;
        for w in done {
            self.events.push(if w.is_write {
                StoreEvent::Written(w.req, Ok(()))
            } else {
                StoreEvent::Flushed(w.req, Ok(()))
            });
        }
    }

    /// fdatasync the data file when a waiter needs in-place writes durable.
    fn maybe_data_sync(&mut self, io: &mut dyn Io) {
        if self.data_sync_in_flight || !self.waiters.iter().any(|w| w.data > self.data_synced) {
            return;
        }
        self.data_sync_in_flight = true;
        let count = self.inplace_done;
        self.submit(
            io,
            Ctx::DataSync { count },
            Op::Fsync {
                fd: self.files.data,
                datasync: true,
            },
        );
    }

    /// Make `[offset, offset+len)` read as zeroes (WRITE_ZEROES and TRIM).
    pub fn write_zeroes(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) {
        if self.overlaps_deferred(offset, offset + len) {
            self.deferred.push_back(Deferred {
                target: 0,
                op: DeferredOp::Zeroes {
                    req,
                    offset,
                    len,
                    no_hole,
                    fua,
                },
            });
            return;
        }
        self.write_zeroes_inner(io, req, offset, len, no_hole, fua);
    }

    fn write_zeroes_inner(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        len: u64,
        no_hole: bool,
        fua: bool,
    ) {
        let flags = if no_hole { ZERO_FLAG_NO_HOLE } else { 0 };
        self.enqueue(
            io,
            req,
            offset,
            RecordKind::Zero,
            flags,
            Vec::new(),
            0,
            len,
            fua,
        );
    }

    #[allow(clippy::too_many_arguments)]
    fn enqueue(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        kind: RecordKind,
        flags: u16,
        buf: Vec<u8>,
        at: usize,
        len: u64,
        fua: bool,
    ) {
        if self.failed.is_some() {
            self.events
                .push(StoreEvent::Written(req, Err(self.failed_errno)));
            return;
        }
        if len == 0 {
            self.events.push(StoreEvent::Written(req, Ok(())));
            return;
        }
        self.writes.insert(
            req,
            WriteReq {
                chunks_left: 0,
                queued: true,
                max_seq: 0,
                fua,
                error: None,
            },
        );
        self.backlog.push_back(PendingWrite {
            req,
            offset,
            kind,
            flags,
            buf,
            at,
            len,
        });
        self.drain_backlog(io);
    }

    fn drain_backlog(&mut self, io: &mut dyn Io) {
        while let Some(mut p) = self.backlog.pop_front() {
            let chunk = if p.kind == RecordKind::Write {
                p.len.min(MAX_RECORD_DATA as u64)
            } else {
                p.len.min(u32::MAX as u64 & !(BLOCK_SIZE - 1))
            };
            let data_len = if p.kind == RecordKind::Write {
                chunk as usize
            } else {
                0
            };
            let span = RecordHeader::span_for(data_len) as u64;
            let Some(place) = self.ring.place(span) else {
                // Full: back-pressure until a checkpoint frees space.
                self.backlog.push_front(p);
                self.kick(io, true);
                return;
            };
            if let Some((seq, pos, filler)) = place.wrap {
                self.submit_marker(io, RecordKind::Wrap, seq, pos, filler);
            }
            let seq = place.seq;
            let last_chunk = chunk == p.len;
            // Build the record buffer, reusing the payload buffer when the
            // whole payload fits in one record and the header fits before it.
            let mut record = if p.kind == RecordKind::Zero {
                vec![0u8; span as usize]
            } else if last_chunk && p.at == RECORD_HEADER_LEN {
                let mut b = std::mem::take(&mut p.buf);
                b.truncate(RECORD_HEADER_LEN + chunk as usize);
                b.resize(span as usize, 0);
                b
            } else {
                let mut b = vec![0u8; span as usize];
                b[RECORD_HEADER_LEN..RECORD_HEADER_LEN + chunk as usize]
                    .copy_from_slice(&p.buf[p.at..p.at + chunk as usize]);
                b
            };
            let hash = if p.kind == RecordKind::Write {
                data_hash(
                    &record[RECORD_HEADER_LEN..RECORD_HEADER_LEN + chunk as usize],
                    seq,
                )
            } else {
                0
            };
            RecordHeader {
                kind: p.kind,
                flags: p.flags,
                epoch: self.sb.epoch,
                seq,
                offset: p.offset,
                length: chunk as u32,
                span: span as u32,
                data_hash: hash,
            }
            .encode_into(&mut record);
            let large = p.kind == RecordKind::Write && self.is_large(p.len);
            let (first, end) = (
                p.offset / BLOCK_SIZE,
                (p.offset + chunk).div_ceil(BLOCK_SIZE),
            );
            for c in first / CHUNK_BLOCKS..end.div_ceil(CHUNK_BLOCKS) {
                let e = self
                    .journaled_chunks
                    .entry(c)
                    .or_insert_with(JournaledChunk::new);
                e.seq = seq;
                e.large = large;
                e.mark(c, first, end);
            }
            let w = self.writes.get_mut(&p.req).expect("write request state");
            w.chunks_left += 1;
            w.max_seq = seq;
            w.queued = !last_chunk;
            let rec = Arc::new(record);
            let content = if p.kind == RecordKind::Write {
                Content::Data {
                    buf: rec.clone(),
                    at: RECORD_HEADER_LEN,
                }
            } else {
                Content::Zero {
                    provision: p.flags & ZERO_FLAG_NO_HOLE != 0,
                }
            };
            self.in_flight.insert(
                seq,
                InFlight {
                    req: p.req,
                    start: p.offset,
                    end: p.offset + chunk,
                    content,
                    pos: place.pos,
                    span,
                },
            );
            self.unsynced_bytes += span;
            self.submit(
                io,
                Ctx::JournalWrite { seq },
                Op::Write {
                    fd: self.files.journal,
                    buf: WriteBuf::Shared(rec),
                    start: 0,
                    end: span as usize,
                    offset: place.pos,
                },
            );
            if !last_chunk {
                p.offset += chunk;
                p.at += chunk as usize;
                p.len -= chunk;
                self.backlog.push_front(p);
            }
        }
    }

    /// A header-only record (Wrap filler or Void) at `pos`.
    fn submit_marker(&mut self, io: &mut dyn Io, kind: RecordKind, seq: u64, pos: u64, span: u64) {
        self.submit_header_record(io, kind, seq, pos, span, 0, 0);
    }

    /// Write a record that is only a header (Wrap, Void, InPlace intent).
    #[allow(clippy::too_many_arguments)]
    fn submit_header_record(
        &mut self,
        io: &mut dyn Io,
        kind: RecordKind,
        seq: u64,
        pos: u64,
        span: u64,
        offset: u64,
        length: u32,
    ) {
        let ctx = if kind == RecordKind::Void {
            Ctx::JournalVoid { seq }
        } else {
            Ctx::JournalWrite { seq }
        };
        let header = RecordHeader {
            kind,
            flags: 0,
            epoch: self.sb.epoch,
            seq,
            offset,
            length,
            span: span as u32,
            data_hash: 0,
        };
        self.submit_record(io, ctx, pos, header, &[]);
    }

    /// Write `header` and `payload` after it at `pos` in the journal, as
    /// `ctx`: the record's bytes up to the next 512-byte boundary (a Wrap
    /// marker's filler past them is never read).
    fn submit_record(
        &mut self,
        io: &mut dyn Io,
        ctx: Ctx,
        pos: u64,
        header: RecordHeader,
        payload: &[u8],
    ) {
        let mut b = vec![0u8; RecordHeader::span_for(payload.len()) as usize];
        header.encode_into(&mut b);
        b[RECORD_HEADER_LEN..RECORD_HEADER_LEN + payload.len()].copy_from_slice(payload);
        let end = b.len();
        self.submit(
            io,
            ctx,
            Op::Write {
                fd: self.files.journal,
                buf: WriteBuf::Owned(b),
                start: 0,
                end,
                offset: pos,
            },
        );
    }

    /// Answer `req` once every write acknowledged so far is durable.
    pub fn flush(&mut self, io: &mut dyn Io, req: ReqId) {
        if self.failed.is_some() {
            self.events
                .push(StoreEvent::Flushed(req, Err(self.failed_errno)));
            return;
        }
        let target = self.ring.next_seq - 1;
        if target <= self.durable_seq && self.inplace_done <= self.data_synced {
            self.events.push(StoreEvent::Flushed(req, Ok(())));
            return;
        }
        self.waiters.push(Waiter {
            seq: target,
            data: self.inplace_done,
            req,
            is_write: false,
        });
        self.kick(io, false);
    }

    /// Sync the journal now rather than at the interval, so that written
    /// records are applied soon (a repair waits for that).
    pub fn hurry(&mut self, io: &mut dyn Io) {
        if self.failed.is_none() {
            self.maybe_sync(io, true);
        }
    }

    /// Whether recovery could not vouch for block `b` and no peer has
    /// settled it since (see [`uncertain`]).
    pub fn is_uncertain(&self, b: u64) -> bool {
        self.uncertain.as_ref().is_some_and(|u| u.contains(b))
    }

    /// How many blocks are uncertain.
    pub fn uncertain_count(&self) -> u64 {
        self.uncertain.as_ref().map_or(0, |u| u.count())
    }

    /// Forget every uncertain block: a secondary whose primary compared
    /// every block and resent what differed (or could not vouch for), or a
    /// primary, which has nothing to settle them with.
    pub fn settle_all(&mut self) {
        if let Some(u) = self.uncertain.as_mut() {
            if !u.is_empty() {
                u.clear();
                if let Err(e) = u.save() {
                    crate::elog!("nbdmirror: {e}");
                }
            }
        }
    }

    // ----- completions ----------------------------------------------------

    /// Handle a completion whose token carries [`STORE_TOKEN`].
    pub fn complete(&mut self, io: &mut dyn Io, c: Completion) {
        let token = c.token & !STORE_TOKEN;
        // Short transfers: resubmit the rest under the same token.
        match &c.op {
            Op::Write { start, end, .. } if c.result > 0 && (c.result as usize) < end - start => {
                let Op::Write {
                    fd,
                    buf,
                    start,
                    end,
                    offset,
                } = c.op
                else {
                    unreachable!()
                };
                let n = c.result as usize;
                io.submit(
                    c.token,
                    Op::Write {
                        fd,
                        buf,
                        start: start + n,
                        end,
                        offset: offset + n as u64,
                    },
                );
                return;
            }
            Op::Read { buf, at, .. } if c.result > 0 && (c.result as usize) < buf.len() - at => {
                let Op::Read {
                    fd,
                    buf,
                    at,
                    offset,
                } = c.op
                else {
                    unreachable!()
                };
                let n = c.result as usize;
                io.submit(
                    c.token,
                    Op::Read {
                        fd,
                        buf,
                        at: at + n,
                        offset: offset + n as u64,
                    },
                );
                return;
            }
            _ => {}
        }
        let Some(ctx) = self.ctx.remove(&token) else {
            return;
        };
        let err = if c.result < 0 {
            Some(-c.result)
        } else if matches!(c.op, Op::Write { .. }) && c.result == 0 {
            Some(libc::ENOSPC)
        } else {
            None
        };
        match ctx {
            Ctx::JournalWrite { seq } => self.journal_written(io, seq, err),
            Ctx::JournalVoid { seq } => {
                if let Some(e) = err {
                    self.poison(format!(
                        "rewriting failed journal record {seq}: {}",
                        errno_str(e)
                    ));
                } else {
                    self.ring.mark_written(seq);
                }
                self.kick(io, false);
            }
            Ctx::JournalSync { covering } => {
                self.sync_in_flight = None;
                self.stats.journal_syncs += 1;
                if let Some(e) = err {
                    self.poison(format!("journal fdatasync failed: {}", errno_str(e)));
                    return;
                }
                if self.failed.is_none() {
                    self.durable_seq = self.durable_seq.max(covering);
                    self.resolve_waiters();
                    self.start_inplace_data(io);
                }
                self.kick(io, false);
            }
            Ctx::Repair { req, blocks } => {
                self.apply_epoch += 1;
                let r = match err {
                    Some(e) => Err(e),
                    None => {
                        self.stats.repaired_blocks += blocks;
                        Ok(())
                    }
                };
                self.events.push(StoreEvent::Written(req, r));
            }
            Ctx::DataRead { read, part } => {
                let Op::Read { buf, at, .. } = c.op else {
                    unreachable!()
                };
                if let Some(e) = err {
                    if let Some(r) = self.reads.get_mut(&read) {
                        r.parts_left -= 1;
                        r.retries = u32::MAX;
                        if r.parts_left == 0 {
                            self.reads.remove(&read);
                            self.read_pieces.remove(&read);
                            crate::elog!(
                                "nbdmirror: ERROR: reading the data file: {}",
                                errno_str(e)
                            );
                            self.events.push(StoreEvent::Read(read, Err(e)));
                        }
                    }
                    return;
                }
                let mut buf = buf;
                if c.result == 0 {
                    // End of file: the rest reads as zeroes.
                    buf[at..].fill(0);
                }
                let Some(r) = self.reads.get_mut(&read) else {
                    return;
                };
                if r.parts[part].direct {
                    r.out = buf;
                } else {
                    r.parts[part].buf = Some(buf);
                }
                r.parts_left -= 1;
                if r.parts_left == 0 {
                    if r.retries == u32::MAX {
                        self.reads.remove(&read);
                        self.read_pieces.remove(&read);
                        self.events.push(StoreEvent::Read(read, Err(EIO)));
                    } else {
                        self.finish_read(io, read);
                    }
                }
            }
            Ctx::ApplyRead { block } => self.apply_read_done(io, block, c, err),
            Ctx::RepairCompare { req, offset } => self.repair_compare_done(io, req, offset, c, err),
            Ctx::InPlaceData { seq } => self.inplace_data_done(io, seq, c, err),
            Ctx::InPlaceDrop { seq } => self.inplace_drop_done(io, seq),
            Ctx::SumsRecord { seq } => self.sums_record_done(io, seq, err),
            Ctx::SumsBatch => {
                self.sums_due = false;
                let ready = self.ready_inplace();
                if !ready.is_empty() && !self.log_inplace_sums(io, &ready) {
                    self.write_inplace_data(io, ready);
                }
                self.kick(io, false);
            }
            Ctx::DataSync { count } => {
                self.data_sync_in_flight = false;
                if let Some(e) = err {
                    self.poison(format!("data file fdatasync failed: {}", errno_str(e)));
                    return;
                }
                if self.failed.is_none() {
                    self.data_synced = self.data_synced.max(count);
                    self.resolve_waiters();
                }
                self.kick(io, false);
            }
            Ctx::ApplyWrite => {
                if let (
                    Some(_),
                    Op::Fallocate {
                        fd, offset, len, ..
                    },
                ) = (err, &c.op)
                {
                    // Punching the hole failed (EOPNOTSUPP on filesystems and
                    // devices without it): write the zeroes instead, as
                    // recovery does, rather than poison the store (found by
                    // tests/store_faults.rs). If the writes fail too, the
                    // batch fails as before.
                    let (fd, offset, len) = (*fd, *offset, *len);
                    self.apply_zeroes_by_writing(io, fd, offset, len);
                    return;
                }
                self.apply_op_done(io, err)
            }
            Ctx::Checkpoint => self.checkpoint_op_done(io, err),
            // A hint: whether it worked changes no data.
            Ctx::ApplyDrop => self.apply_drop_done(io),
        }
    }

    fn journal_written(&mut self, io: &mut dyn Io, seq: u64, err: Option<i32>) {
        let inflight = self.in_flight.remove(&seq);
        match err {
            None => {
                self.ring.mark_written(seq);
                if let Some(f) = inflight {
                    self.overlay.insert(f.start, f.end, seq, f.content);
                    self.chunk_done(f.req, None);
                }
            }
            Some(e) => {
                crate::elog!(
                    "nbdmirror: ERROR: journal write of record {seq} failed: {}",
                    errno_str(e)
                );
                // Keep the chain intact: rewrite the slot as a Void record.
                if let Some(f) = &inflight {
                    self.submit_marker(io, RecordKind::Void, seq, f.pos, f.span);
                    self.chunk_done(f.req, Some(e));
                } else if self.intents.values().any(|&i| i == seq) {
                    // A failed intent: the writes relying on it fail.
                    self.intents.retain(|_, i| *i != seq);
                    let failed: Vec<u64> = self
                        .inplace
                        .iter()
                        .filter(|(_, w)| {
                            w.state == InPlaceState::Recorded && w.intents.contains(&seq)
                        })
                        .map(|(&id, _)| id)
                        .collect();
                    for id in failed {
                        let w = self.inplace.remove(&id).unwrap();
                        self.events
                            .push(StoreEvent::Written(w.req, Err(map_write_errno(e))));
                    }
                    if let Some(s) = self.ring.slot_mut(seq).cloned() {
                        self.submit_marker(io, RecordKind::Void, seq, s.pos, s.span);
                    }
                } else if let Some(s) = self.ring.slot_mut(seq).cloned() {
                    self.submit_marker(io, RecordKind::Void, seq, s.pos, s.span);
                }
            }
        }
        self.kick(io, false);
    }

    fn chunk_done(&mut self, req: ReqId, err: Option<i32>) {
        let Some(w) = self.writes.get_mut(&req) else {
            return;
        };
        if err.is_some() && w.error.is_none() {
            w.error = err;
        }
        w.chunks_left -= 1;
        if w.chunks_left > 0 || w.queued {
            return;
        }
        let w = self.writes.remove(&req).unwrap();
        if let Some(e) = w.error {
            self.events
                .push(StoreEvent::Written(req, Err(map_write_errno(e))));
        } else if w.fua && w.max_seq > self.durable_seq {
            if self.failed.is_some() {
                // Poisoned while this write was in flight: `poison` already
                // failed the waiters it knew of and nothing will sync again,
                // so a waiter added now would never be answered (found by
                // tests/store_faults.rs: the FUA write hung).
                self.events
                    .push(StoreEvent::Written(req, Err(self.failed_errno)));
            } else {
                self.waiters.push(Waiter {
                    seq: w.max_seq,
                    data: 0,
                    req,
                    is_write: true,
                });
            }
        } else {
            self.events.push(StoreEvent::Written(req, Ok(())));
        }
    }

    // ----- background work ------------------------------------------------

    /// Called by the event loop every few tens of milliseconds.
    pub fn tick(&mut self, io: &mut dyn Io) {
        self.kick(io, false);
        self.corrupt_log.log_suppressed(Instant::now());
    }

    /// Start whatever background work is due: journal sync, apply, checkpoint.
    fn kick(&mut self, io: &mut dyn Io, pressure: bool) {
        if self.failed.is_some() {
            return;
        }
        self.maybe_sync(io, pressure);
        self.maybe_data_sync(io);
        self.maybe_apply(io);
        self.maybe_checkpoint(io, pressure);
    }

    /// Checkpoint as soon as what was applied is durable, not at the
    /// interval. A secondary asks when it comes in sync: what the resync
    /// wrote in place then has its checksums in `meta`, so a crash soon
    /// after (both nodes losing power) leaves recovery nothing to rebuild
    /// and the replica nothing it cannot vouch for (docs/mirroring.md,
    /// "Uncertain blocks"). The request covers what was written so far
    /// only: with nothing to checkpoint, it does not make the checkpoint of
    /// a later write early.
    pub fn checkpoint_soon(&mut self, io: &mut dyn Io) {
        self.checkpoint_wanted = self.ring.next_seq - 1;
        self.kick(io, false);
    }

    /// Ask for everything to reach the data file and a final checkpoint.
    pub fn drain(&mut self, io: &mut dyn Io) {
        self.draining = true;
        self.release_deferred(io);
        self.kick(io, true);
    }

    fn maybe_sync(&mut self, io: &mut dyn Io, pressure: bool) {
        if self.sync_in_flight.is_some() {
            return;
        }
        let prefix = self.ring.written_prefix();
        if prefix <= self.durable_seq {
            return;
        }
        let waiter_ready = self.waiters.iter().any(|w| w.seq <= prefix)
            || (self.newest_intent > self.durable_seq && self.newest_intent <= prefix)
            || self.inplace.values().any(|w| {
                // (One whose intents are durable already waits for no sync:
                // with `vouch_inplace`, for its checksum record's batch.)
                w.state == InPlaceState::Recorded
                    && w.intents.iter().all(|&i| i <= prefix)
                    && w.intents.iter().any(|&i| i > self.durable_seq)
            })
            // Held writes wait for a checkpoint, which waits for this sync.
            || !self.deferred.is_empty();
        let due = waiter_ready
            || pressure
            // Writes waiting for ring space wait for a checkpoint, which
            // waits for their predecessors to be synced and applied.
            || !self.backlog.is_empty()
            || self.draining
            || self.unsynced_bytes >= self.tuning.sync_bytes
            // Half-way to a checkpoint, sync so that apply can progress, but
            // in batches of a 64th of the ring: syncing again the moment the
            // last sync ended (as before) made 1800 fdatasyncs a second on
            // each node of a mirror under 4 KiB random writes, each a device
            // cache flush, where 50 do the same work.
            || (self.ring.used() * 100 >= self.ring.size * self.tuning.checkpoint_percent / 2
                && self.unsynced_bytes >= self.ring.size / 64)
            || self.last_sync.elapsed() >= self.tuning.sync_interval;
        if !due {
            return;
        }
        self.sync_in_flight = Some(prefix);
        self.unsynced_bytes = 0;
        self.last_sync = Instant::now();
        self.submit(
            io,
            Ctx::JournalSync { covering: prefix },
            Op::Fsync {
                fd: self.files.journal,
                datasync: true,
            },
        );
    }
}

fn map_write_errno(e: i32) -> i32 {
    match e {
        libc::ENOSPC | libc::EDQUOT | libc::EFBIG => libc::ENOSPC,
        _ => EIO,
    }
}

#[cfg(test)]
mod tests {
    use super::{page_cache_pieces, PAGE_CACHE_PIECE as P};

    #[test]
    fn a_checksum_table_larger_than_memory_is_refused() {
        let err = super::check_table_memory(1 << 60).unwrap_err();
        assert!(err.contains("checksum table"), "{err}");
        super::check_table_memory(1 << 30).unwrap();
    }

    #[test]
    fn page_cache_pieces_cut_at_piece_multiples() {
        let cut = |o, l| page_cache_pieces(o, l).collect::<Vec<_>>();
        assert_eq!(cut(0, 4096), vec![(0, 4096)]);
        assert_eq!(cut(0, P), vec![(0, P)]);
        assert_eq!(cut(0, 2 * P), vec![(0, P), (P, P)]);
        assert_eq!(
            cut(P - 4096, P + 8192),
            vec![(P - 4096, 4096), (P, P), (2 * P, 4096)]
        );
        assert_eq!(cut(5 * P, 0), vec![]);
        // Every byte once, in order, no piece across a multiple of P.
        for (o, l) in [
            (12_288u64, 1_000_000u64),
            (3 * P + 512, 7 * P),
            (0, 16 << 20),
        ] {
            let v = cut(o, l);
            assert_eq!(v.first().unwrap().0, o);
            assert_eq!(v.iter().map(|p| p.1).sum::<u64>(), l);
            for w in v.windows(2) {
                assert_eq!(w[0].0 + w[0].1, w[1].0);
            }
            for &(a, n) in &v {
                assert!(n > 0 && n <= P && a / P == (a + n - 1) / P, "{a} {n}");
            }
        }
    }
}
