//! Large page-cache folios: which pieces of the data file a large write may
//! have left in large folios, and the cache drops that keep small writes
//! from paying for them (docs/design.md, "Large folios").
//!
//! Owns `Store::large_folios` (a map of 1 MiB chunks, one bit per 64 KiB
//! piece), seeding it from what is cached when the store opens, marking
//! pieces after large writes, and turning a write about to go through the
//! page cache into the `DropCache` operations it needs first. The write
//! paths (applying journal records, in-place writes) call into it.

use std::os::fd::RawFd;

use super::*;

/// Entries of the map of large page-cache folios (`Store::large_folios`)
/// cover this much of the disk each, as 16 pieces of `PAGE_CACHE_PIECE`.
const FOLIO_CHUNK: u64 = 1 << 20;
const _: () = assert!(
    FOLIO_CHUNK / PAGE_CACHE_PIECE == 16,
    "FolioChunk masks are u16"
);
/// At most this many chunks are remembered (1 TiB of the disk); past that,
/// large writes are not tracked and small writes after them cost more.
const MAX_FOLIO_CHUNKS: usize = 1 << 20;

/// One 1 MiB chunk of `Store::large_folios`: which of its 64 KiB pieces may
/// hold large folios, as bit masks (bit i: piece i).
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct FolioChunk {
    /// `checkpoints_begun()` when a large write into the chunk last finished.
    mark: u64,
    /// Pieces a large write left, not dropped since.
    first: u16,
    /// `checkpoints_begun()` at the last first drop in the chunk.
    second_mark: u64,
    /// Pieces dropped once, waiting for a checkpoint after `second_mark`.
    second: u16,
    /// Pieces dropped once whose second drop is due (moved from `second`
    /// before a later first drop moves `second_mark` on, so that one
    /// piece's first drop does not hold back another's second).
    second_due: u16,
}

/// The pieces of `chunk` that `[start, end)` touches (`whole`: covers
/// whole), as a `FolioChunk` mask.
fn piece_mask(chunk: u64, start: u64, end: u64, whole: bool) -> u16 {
    let base = chunk * FOLIO_CHUNK;
    let lo = start.max(base) - base;
    let hi = end.min(base + FOLIO_CHUNK) - base;
    let (a, b) = if whole {
        (lo.div_ceil(PAGE_CACHE_PIECE), hi / PAGE_CACHE_PIECE)
    } else {
        (lo / PAGE_CACHE_PIECE, hi.div_ceil(PAGE_CACHE_PIECE))
    };
    if lo >= hi || a >= b {
        return 0;
    }
    (((1u32 << b) - (1u32 << a)) & 0xffff) as u16
}

/// The pieces of the data file wholly in the page cache as the store opens,
/// as `large_folios` entries. An earlier run's large writes (or readahead)
/// may have left them as large folios that this run's map knows nothing of,
/// and the first small writes into them would then make write-back write
/// whole folios (after a restart of a 1-peer mirror, the primary wrote 14.3
/// GB to disk during 12 s of 4 KiB random writes, against 4.1 GB before
/// it). Recovery has just synced the data file, so the pages are clean and
/// one drop before the first small write into each piece is enough: the
/// pieces start as `second_due`. A large write that replaces them drops
/// them first as for any piece not marked `first`. Nothing is marked when
/// the backend cannot tell what is cached.
///
/// The search asks how much of a range is cached (cachestat(2) walks the
/// range's cached pages): a range with nothing cached is skipped, a range
/// wholly cached is marked whole, any other is split in 16 down to pieces.
/// A fully cached disk costs one walk of its pages; the worst case (every
/// piece partly cached) five.
pub(super) fn cached_pieces(io: &mut dyn Io, fd: RawFd, size: u64) -> IdMap<u64, FolioChunk> {
    let mut map = IdMap::default();
    let whole = size / PAGE_CACHE_PIECE * PAGE_CACHE_PIECE;
    let mut todo: Vec<(u64, u64)> = Vec::new();
    // Largest ranges first; pushed in reverse so they are visited in order.
    let mut w = whole;
    while w > 0 {
        let s = (w - 1) / (1 << 30) * (1 << 30);
        todo.push((s, w));
        w = s;
    }
    while let Some((s, e)) = todo.pop() {
        if map.len() >= MAX_FOLIO_CHUNKS {
            break;
        }
        let n = match io.cached_bytes(fd, s, e - s) {
            None => return IdMap::default(),
            Some(n) => n,
        };
        // Less than a piece cached holds no whole cached piece (a disk
        // read at random leaves scattered pages: skip them cheaply).
        if n < PAGE_CACHE_PIECE {
            continue;
        }
        if n >= e - s {
            for c in s / FOLIO_CHUNK..e.div_ceil(FOLIO_CHUNK) {
                if map.len() >= MAX_FOLIO_CHUNKS && !map.contains_key(&c) {
                    break;
                }
                let entry: &mut FolioChunk = map.entry(c).or_default();
                entry.second_due |= piece_mask(c, s, e, true);
            }
            continue;
        }
        if e - s <= PAGE_CACHE_PIECE {
            continue;
        }
        let part = (e - s).div_ceil(16).div_ceil(PAGE_CACHE_PIECE) * PAGE_CACHE_PIECE;
        let mut at = e;
        while at > s {
            let from = s + (at - s - 1) / part * part;
            todo.push((from, at));
            at = from;
        }
    }
    map
}

impl Store {
    /// A page-cache write of `[start, end)` of at least a piece finished:
    /// it may have left large folios (see `large_folios`).
    pub(super) fn mark_large_folios(&mut self, start: u64, end: u64) {
        let mark = self.checkpoints_begun();
        for c in start / FOLIO_CHUNK..end.div_ceil(FOLIO_CHUNK) {
            if self.large_folios.len() >= MAX_FOLIO_CHUNKS && !self.large_folios.contains_key(&c) {
                continue;
            }
            let m = piece_mask(c, start, end, false);
            let e = self.large_folios.entry(c).or_default();
            e.mark = mark;
            e.first |= m;
            e.second &= !m;
            e.second_due &= !m;
        }
    }

    /// A small write into `[start, end)` is about to go through the page
    /// cache: for every piece there with large folios whose write a finished
    /// checkpoint has synced, queue a drop of its cached pages (clean pages
    /// go; a page dirtied since is only written back, and stays).
    pub(super) fn drop_large_folios(&mut self, start: u64, end: u64, out: &mut Vec<Op>) {
        if self.large_folios.is_empty() {
            return;
        }
        let (done, begun) = (self.stats.checkpoints, self.checkpoints_begun());
        for c in start / FOLIO_CHUNK..end.div_ceil(FOLIO_CHUNK) {
            let Some(e) = self.large_folios.get_mut(&c) else {
                continue;
            };
            if done > e.second_mark {
                e.second_due |= e.second;
                e.second = 0;
            }
            let m = piece_mask(c, start, end, false);
            if e.first & m != 0 && begun <= e.mark {
                // No checkpoint has started since the large write.
                self.folios_wanted = true;
            }
            let once = if done > e.mark { e.first & m } else { 0 };
            let twice = e.second_due & m;
            if once | twice == 0 {
                continue;
            }
            e.first &= !once;
            e.second_due &= !twice;
            if once != 0 {
                e.second |= once;
                e.second_mark = begun;
            }
            if e.first | e.second | e.second_due == 0 {
                self.large_folios.remove(&c);
            }
            self.stats.cache_drops += u64::from((once | twice).count_ones());
            self.push_piece_drops(c, once | twice, out);
        }
    }

    /// Drops of the cached pages of the whole pieces in `[start, end)` that
    /// a large write about to go through the page cache there may find in
    /// small folios: every piece not marked as holding a large write's
    /// folios (`FolioChunk::first`). Small writes and reads after a drop
    /// fill a piece with 4 KiB folios, and writing 64 KiB over sixteen of
    /// them costs more than into an empty range: on a 1-peer mirror,
    /// sequential 1 MiB writes after random 4 KiB ones ran at 911-1075
    /// MiB/s, and at 1229-1257 with the primary's cache emptied first. The
    /// write replaces the pieces whole, so no clean cached byte is worth
    /// keeping; dirty pages are not dropped. Edge pieces the write only
    /// partly covers are left alone (their other blocks may be read).
    pub(super) fn prewrite_drops(&mut self, start: u64, end: u64) -> Vec<Op> {
        let mut out = Vec::new();
        let full = self.large_folios.len() >= MAX_FOLIO_CHUNKS;
        for c in start / FOLIO_CHUNK..end.div_ceil(FOLIO_CHUNK) {
            let marked = match self.large_folios.get(&c) {
                Some(e) => e.first,
                // Past what the map can hold nothing is known: the pieces
                // may hold this very write's predecessor's dirty pages, and
                // DONTNEED would write them back only to be overwritten.
                None if full => continue,
                None => 0,
            };
            let need = piece_mask(c, start, end, true) & !marked;
            self.stats.prewrite_drops += u64::from(need.count_ones());
            self.push_piece_drops(c, need, &mut out);
        }
        out
    }

    /// Push one cache drop per run of adjacent pieces of `bits` in chunk `c`.
    fn push_piece_drops(&self, c: u64, mut bits: u16, out: &mut Vec<Op>) {
        while bits != 0 {
            let a = u64::from(bits.trailing_zeros());
            let run = u64::from((bits >> a).trailing_ones());
            bits &= !(((1u32 << (a + run)) - (1u32 << a)) as u16);
            let offset = c * FOLIO_CHUNK + a * PAGE_CACHE_PIECE;
            let len = (run * PAGE_CACHE_PIECE).min(self.sb.size.saturating_sub(offset));
            if len == 0 {
                // Past the end (cannot happen: pieces come from ranges
                // inside the disk); fadvise would read 0 as "to EOF".
                continue;
            }
            out.push(Op::DropCache {
                fd: self.files.data,
                offset,
                len,
            });
        }
    }
}
