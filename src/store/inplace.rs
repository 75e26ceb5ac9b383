//! In-place writes: whole 4 KiB blocks written straight to the data file
//! under an intent record, instead of through the journal (docs/design.md,
//! "In-place writes"; docs/format.md, "Intent records" and "Checksum
//! records").
//!
//! Owns deciding which writes (or which parts of a write, `split_plan`) go
//! in place (`inplace_eligible`: shape, the region limit, large-write
//! rules), the intent records for their 16 MiB regions, the checksum
//! records a secondary logs for them, submitting their data in page-cache
//! pieces (some through the workers' descriptor) or with O_DIRECT, the
//! cache drops they wait for, and their completion: checksums updated, the
//! client answered. Large writes that must wait for a checkpoint are held
//! here too (`Deferred`).

use std::os::fd::RawFd;

use super::*;

impl Store {
    /// Send a write in place: record the intents of its regions and start
    /// its data write once they are durable. Gives the buffer back when the
    /// journal has no room for an intent (the caller journals the write).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn try_in_place(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        len: usize,
        fua: bool,
        sums: Option<Vec<u64>>,
    ) -> Option<Vec<u8>> {
        let len64 = len as u64;
        // Every region the write touches needs an intent record.
        let regions = offset / INTENT_REGION..(offset + len64).div_ceil(INTENT_REGION);
        let next_region = regions.end;
        let mut intents = Vec::new();
        for region in regions {
            // No room in the ring for an intent: the write goes through
            // the journal, which waits for room (returning `None` here
            // instead lost the write: it was never written nor answered).
            let Some(seq) = self.ensure_intent(io, region) else {
                return Some(buf);
            };
            intents.push(seq);
        }
        // A sequential writer will want the next region soon: record its
        // intent now so its sync overlaps with this region's writes. (Not
        // for small writes: random ones would open twice the regions.)
        if self.is_large(len64) && next_region * INTENT_REGION < self.sb.size {
            let _ = self.ensure_intent(io, next_region);
        }
        let sums =
            sums.unwrap_or_else(|| checksum::checksums_of(offset / BLOCK_SIZE, &buf[at..at + len]));
        let id = self.next_inplace_id;
        self.next_inplace_id += 1;
        self.inplace.insert(
            id,
            InPlaceWrite {
                req,
                offset,
                len: len64,
                buf,
                at,
                fua,
                state: InPlaceState::Recorded,
                intents,
                sums,
                direct: false,
                bounced: false,
                pieces_left: 0,
                piece_error: None,
                held: AfterDrops::default(),
            },
        );
        self.start_inplace_data(io);
        self.kick(io, false);
        None
    }

    /// How to write a large write that may not go in place only because
    /// journal records since the last checkpoint touch some of its blocks
    /// (small random writes all over the disk leave few 1 MiB chunks
    /// untouched, so otherwise nearly every large write among them, and
    /// every resync record a secondary takes while its client writes, went
    /// through the journal: written twice, and each asked for a
    /// checkpoint). As runs `(start, end, in_place)`: runs of free blocks
    /// of at least [`SPLIT_MIN_RUN`] in place, the rest through the
    /// journal, after the older records there, so replay keeps their order.
    /// `None` when the write is not such a write, or when less than half of
    /// it would go in place.
    pub(super) fn split_plan(&self, offset: u64, len: u64) -> Option<Vec<(u64, u64, bool)>> {
        let end = offset + len;
        if !self.inplace_shape(offset, len)
            || (!self.is_large(len) && !self.small_inplace_room(offset, end))
            || self.draining
            // Journal records in flight, in the overlay or being applied all
            // came after the last checkpoint: their blocks are marked in
            // `journaled_chunks`. In-place writes are not.
            || self
                .inplace
                .values()
                .any(|w| w.offset < end && offset < w.offset + w.len)
        {
            return None;
        }
        // With O_DIRECT, not while journaled data is being applied in its
        // chunks (see `maybe_apply`).
        if self.direct_fd.is_some()
            && self.blocks_applying(
                offset / JOURNALED_CHUNK * CHUNK_BLOCKS,
                end.div_ceil(JOURNALED_CHUNK) * CHUNK_BLOCKS,
            )
        {
            return None;
        }
        let blocked = |b: u64| {
            self.journaled_chunks
                .get(&(b / CHUNK_BLOCKS))
                .is_some_and(|e| e.marked(b % CHUNK_BLOCKS))
        };
        let mut plan: Vec<(u64, u64, bool)> = Vec::new();
        let mut in_place = 0;
        let (first, last) = (offset / BLOCK_SIZE, end / BLOCK_SIZE);
        let mut b = first;
        while b < last {
            let free = !blocked(b);
            let mut e = b + 1;
            while e < last && blocked(e) != free {
                e += 1;
            }
            let (s, t) = (b * BLOCK_SIZE, e * BLOCK_SIZE);
            let place = free && t - s >= SPLIT_MIN_RUN;
            if place {
                in_place += t - s;
            }
            match plan.last_mut() {
                Some((_, pe, false)) if !place => *pe = t,
                _ => plan.push((s, t, place)),
            }
            b = e;
        }
        (in_place * 2 >= len).then_some(plan)
    }

    /// Write `buf[at..]` as the parts of `plan` (see [`Store::split_plan`]),
    /// each a write of its own; `req` completes when all have, with the
    /// first error.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn write_split(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        buf: Vec<u8>,
        at: usize,
        fua: bool,
        plan: Vec<(u64, u64, bool)>,
    ) {
        self.splits.insert(req, (plan.len(), None));
        for (s, e, place) in plan {
            let part = SPLIT_RID | self.next_split_part;
            self.next_split_part = (self.next_split_part + 1) & (SPLIT_RID - 1);
            self.split_parts.insert(part, req);
            let n = (e - s) as usize;
            let from = at + (s - offset) as usize;
            // The part's copy, after `head` bytes: aligned for O_DIRECT in
            // place (no bounce copy then), room for the record header in the
            // journal (no second copy). Only the head is zeroed.
            let mut b: Vec<u8> = Vec::with_capacity(n + DIRECT_ALIGN.max(RECORD_HEADER_LEN));
            let head = if place {
                b.as_ptr().align_offset(DIRECT_ALIGN)
            } else {
                RECORD_HEADER_LEN
            };
            b.resize(head, 0);
            b.extend_from_slice(&buf[from..from + n]);
            let b = match place {
                true => match self.try_in_place(io, part, s, b, head, n, fua, None) {
                    None => continue,
                    Some(b) => b,
                },
                false => b,
            };
            self.enqueue(io, part, s, RecordKind::Write, 0, b, head, n as u64, fua);
        }
        if self.recycled.len() < 64 {
            self.recycled.push(buf);
        }
    }

    /// Whether journal records cover `[start, end)` and the newest in each
    /// covered chunk came from a large write. That is the self-sustaining
    /// case holding is for (a sequential writer meeting its own journaled
    /// writes); a range that small random writes keep journaling is left to
    /// the journal, or every large write among them would wait for a
    /// checkpoint (a mix of 80% 4 KiB and 20% 1 MiB random writes lost 7%
    /// throughput and tripled its p99.5 when held).
    pub(super) fn blocked_by_large_records(&self, start: u64, end: u64) -> bool {
        let mut any = false;
        for c in start / JOURNALED_CHUNK..end.div_ceil(JOURNALED_CHUNK) {
            match self.journaled_chunks.get(&c) {
                Some(e) if e.large => any = true,
                Some(_) => return false,
                None => {}
            }
        }
        any
    }

    pub(super) fn overlaps_deferred(&self, start: u64, end: u64) -> bool {
        self.deferred.iter().any(|d| {
            let (s, e) = d.op.range();
            s < end && start < e
        })
    }

    /// Submit the held writes whose checkpoint has come, in order.
    pub(super) fn release_deferred(&mut self, io: &mut dyn Io) {
        while let Some(d) = self.deferred.front() {
            if d.target > self.checkpointed_seq && self.failed.is_none() && !self.draining {
                self.inplace_wanted = true;
                break;
            }
            let d = self.deferred.pop_front().unwrap();
            match d.op {
                DeferredOp::Write {
                    req,
                    offset,
                    buf,
                    at,
                    len,
                    fua,
                } => self.write_inner(io, req, offset, buf, at, len, fua, false, None),
                DeferredOp::Zeroes {
                    req,
                    offset,
                    len,
                    no_hole,
                    fua,
                } => self.write_zeroes_inner(io, req, offset, len, no_hole, fua),
            }
        }
    }

    /// The seq of `region`'s intent record, placing and writing one if the
    /// region has none; None if the journal ring is full.
    fn ensure_intent(&mut self, io: &mut dyn Io, region: u64) -> Option<u64> {
        if let Some(&seq) = self.intents.get(&region) {
            return Some(seq);
        }
        let span = format::RECORD_ALIGN;
        let place = self.ring.place(span)?;
        if let Some((wseq, wpos, filler)) = place.wrap {
            self.submit_marker(io, RecordKind::Wrap, wseq, wpos, filler);
        }
        let seq = place.seq;
        let rstart = region * INTENT_REGION;
        let rlen = INTENT_REGION.min(self.sb.size - rstart);
        self.intents.insert(region, seq);
        self.newest_intent = seq;
        self.submit_header_record(
            io,
            RecordKind::InPlace,
            seq,
            place.pos,
            span,
            rstart,
            rlen as u32,
        );
        Some(seq)
    }

    /// Whether a write is one that may go in place, as far as it alone
    /// goes: big, block-aligned, not too long, and the store healthy with
    /// no writes queued for journal space.
    fn inplace_shape(&self, offset: u64, len: u64) -> bool {
        self.tuning.inplace_min > 0
            && len >= self.tuning.inplace_min
            && len <= MAX_RECORD_DATA as u64 * 32
            && offset.is_multiple_of(BLOCK_SIZE)
            && len.is_multiple_of(BLOCK_SIZE)
            && self.failed.is_none()
            && self.backlog.is_empty()
    }

    /// Whether a write of `len` bytes is large ([`LARGE_WRITE`]).
    pub(super) fn is_large(&self, len: u64) -> bool {
        self.tuning.inplace_min > 0 && len >= self.large_min()
    }

    /// The length from which a write is large (0: none goes in place).
    pub fn large_min(&self) -> u64 {
        match self.tuning.inplace_min {
            0 => 0,
            m => m.max(self.tuning.large_write),
        }
    }

    /// Whether a small in-place write may use the regions of
    /// `[offset, end)`: each already has an intent, or there is room for
    /// the new ones under `Tuning::inplace_regions`.
    fn small_inplace_room(&self, offset: u64, end: u64) -> bool {
        let regions = offset / INTENT_REGION..end.div_ceil(INTENT_REGION);
        let new = regions.filter(|r| !self.intents.contains_key(r)).count();
        new == 0 || self.intents.len() + new <= self.tuning.inplace_regions
    }

    /// Whether a write may bypass the journal: block-aligned, at least
    /// `inplace_min`, and not overlapping anything whose order relative to
    /// it the journal decides (overlay pieces, journal writes or other
    /// in-place writes in flight, blocks being applied, queued writes); a
    /// small one also needs region room ([`Store::small_inplace_room`]).
    pub(super) fn inplace_eligible(&self, offset: u64, len: u64) -> bool {
        if !self.inplace_shape(offset, len) {
            return false;
        }
        let end = offset + len;
        if !self.is_large(len) && !self.small_inplace_room(offset, end) {
            return false;
        }
        let chunks = offset / JOURNALED_CHUNK..end.div_ceil(JOURNALED_CHUNK);
        if chunks
            .clone()
            .any(|c| self.journaled_chunks.contains_key(&c))
        {
            return false;
        }
        if self.overlay.overlaps(offset, end)
            || self.blocks_applying(offset / BLOCK_SIZE, end / BLOCK_SIZE)
            || self
                .in_flight
                .values()
                .any(|f| f.start < end && offset < f.end)
            || self
                .inplace
                .values()
                .any(|w| w.offset < end && offset < w.offset + w.len)
        {
            return false;
        }
        true
    }

    /// Records made durable: write their data in place.
    pub(super) fn start_inplace_data(&mut self, io: &mut dyn Io) {
        if self.tuning.vouch_inplace {
            // One checksum record for every write that becomes ready in
            // this batch of the event loop's completions, not one each
            // (192k records for 192k 4 KiB writes filled a 32 MiB ring in
            // well under a second, and batches then went unlogged): the
            // zero timeout completes after the batch.
            if !self.sums_due && self.failed.is_none() {
                self.sums_due = true;
                self.submit(io, Ctx::SumsBatch, Op::timeout(Duration::ZERO));
            }
            return;
        }
        let ready = self.ready_inplace();
        if !ready.is_empty() {
            self.write_inplace_data(io, ready);
        }
    }

    /// In-place writes whose intents are durable and whose data is not
    /// being written yet.
    pub(super) fn ready_inplace(&self) -> Vec<u64> {
        let durable = self.durable_seq;
        self.inplace
            .iter()
            .filter(|(_, w)| {
                w.state == InPlaceState::Recorded && w.intents.iter().all(|&i| i <= durable)
            })
            .map(|(&id, _)| id)
            .collect()
    }

    /// Write one journal record with the block checksums of the in-place
    /// writes `ids` ([`format::VOID_FLAG_SUMS`]); their data is written
    /// once it is (in the page cache: a process crash then never leaves a
    /// block written that the journal has no checksum for; a power cut
    /// may, and recovery then cannot vouch for it, as without the record).
    /// False, writing nothing, when the ring has no room or the record
    /// would be too large: the writes go ahead unlogged.
    pub(super) fn log_inplace_sums(&mut self, io: &mut dyn Io, ids: &[u64]) -> bool {
        let payload = format::encode_sum_runs(ids.iter().map(|id| {
            let w = &self.inplace[id];
            (w.offset / BLOCK_SIZE, &w.sums[..])
        }));
        if payload.is_empty() || payload.len() > MAX_RECORD_DATA {
            return false;
        }
        let span = RecordHeader::span_for(payload.len()) as u64;
        let Some(place) = self.ring.place(span) else {
            self.stats.unlogged_sums += 1;
            return false;
        };
        if let Some((wseq, wpos, filler)) = place.wrap {
            self.submit_marker(io, RecordKind::Wrap, wseq, wpos, filler);
        }
        let seq = place.seq;
        for id in ids {
            self.inplace.get_mut(id).unwrap().state = InPlaceState::Summing;
        }
        self.sums_batches.insert(seq, ids.to_vec());
        self.stats.sums_records += 1;
        let header = RecordHeader {
            kind: RecordKind::Void,
            flags: format::VOID_FLAG_SUMS,
            epoch: self.sb.epoch,
            seq,
            offset: 0,
            length: payload.len() as u32,
            span: span as u32,
            data_hash: format::data_hash(&payload, seq),
        };
        self.submit_record(io, Ctx::SumsRecord { seq }, place.pos, header, &payload);
        true
    }

    /// A checksum record was written (or failed: its slot becomes a plain
    /// Void record, and the writes go ahead unlogged): write its writes'
    /// data.
    pub(super) fn sums_record_done(&mut self, io: &mut dyn Io, seq: u64, err: Option<i32>) {
        match err {
            None => {
                self.ring.mark_written(seq);
            }
            Some(e) => {
                crate::elog!(
                    "nbdmirror: ERROR: journal write of checksum record {seq} failed: {}",
                    errno_str(e)
                );
                if let Some(s) = self.ring.slot_mut(seq).cloned() {
                    self.submit_marker(io, RecordKind::Void, seq, s.pos, s.span);
                }
            }
        }
        let ids: Vec<u64> = self
            .sums_batches
            .remove(&seq)
            .unwrap_or_default()
            .into_iter()
            .filter(|id| {
                self.inplace
                    .get(id)
                    .is_some_and(|w| w.state == InPlaceState::Summing)
            })
            .collect();
        if self.failed.is_none() {
            self.write_inplace_data(io, ids);
        }
        self.kick(io, false);
    }

    /// Write the data of in-place writes `ids` (their intents durable).
    pub(super) fn write_inplace_data(&mut self, io: &mut dyn Io, ids: Vec<u64>) {
        for seq in ids {
            let w = self.inplace.get_mut(&seq).unwrap();
            w.state = InPlaceState::Writing;
            let mut buf = std::mem::take(&mut w.buf);
            let (len, offset) = (w.len as usize, w.offset);
            let mut fd = self.files.data;
            if let Some(direct) = self.direct_fd {
                fd = direct;
                w.direct = true;
                if !(buf[w.at..].as_ptr() as usize).is_multiple_of(DIRECT_ALIGN) {
                    // Copy into memory O_DIRECT accepts; the payload's own
                    // buffer goes back to the caller at once.
                    let need = len + DIRECT_ALIGN;
                    let mut b = match self.bounce.iter().position(|b| b.len() >= need) {
                        Some(i) => self.bounce.swap_remove(i),
                        None => vec![0u8; need],
                    };
                    let pad = b.as_ptr().align_offset(DIRECT_ALIGN);
                    b[pad..pad + len].copy_from_slice(&buf[w.at..w.at + len]);
                    if self.recycled.len() < 64 {
                        self.recycled.push(std::mem::replace(&mut buf, b));
                    } else {
                        buf = b;
                    }
                    w.at = pad;
                    w.bounced = true;
                }
            }
            let at = w.at;
            self.apply_epoch += 1;
            if w.direct {
                // No page cache, no folios: one write.
                w.pieces_left = 1;
                self.submit(
                    io,
                    Ctx::InPlaceData { seq },
                    Op::Write {
                        fd,
                        buf: WriteBuf::Owned(buf),
                        start: at,
                        end: at + len,
                        offset,
                    },
                );
                continue;
            }
            w.pieces_left = page_cache_pieces(offset, len as u64).count();
            let buf = Arc::new(buf);
            let worker_fd = self.worker_data_fd;
            let ops: Vec<Op> = page_cache_pieces(offset, len as u64)
                .enumerate()
                .map(|(i, (off, n))| {
                    let start = at + (off - offset) as usize;
                    let fd = match worker_fd {
                        Some(w) if i % WORKER_PIECE_EVERY == WORKER_PIECE_EVERY - 1 => w,
                        _ => fd,
                    };
                    Op::Write {
                        fd,
                        buf: WriteBuf::Shared(buf.clone()),
                        start,
                        end: start + n as usize,
                        offset: off,
                    }
                })
                .collect();
            // As in `maybe_apply`: a small write drops the large folios a
            // large one left (so that writeback does not write a whole
            // folio for it); a large one drops small folios first.
            let drops = if (len as u64) < PAGE_CACHE_PIECE {
                let mut drops = Vec::new();
                self.drop_large_folios(offset, offset + len as u64, &mut drops);
                drops
            } else {
                self.prewrite_drops(offset, offset + len as u64)
            };
            let held = self.submit_after_drops(
                io,
                drops,
                Ctx::InPlaceDrop { seq },
                ops,
                Ctx::InPlaceData { seq },
            );
            self.inplace.get_mut(&seq).unwrap().held = held;
        }
    }

    /// Submit `writes` (as `ctx`) now, or, when there are `drops`, submit
    /// those (as `drop_ctx`) and return the writes held until they finish.
    pub(super) fn submit_after_drops(
        &mut self,
        io: &mut dyn Io,
        drops: Vec<Op>,
        drop_ctx: Ctx,
        writes: Vec<Op>,
        ctx: Ctx,
    ) -> AfterDrops {
        if drops.is_empty() {
            for op in writes {
                self.submit(io, ctx, op);
            }
            return AfterDrops::default();
        }
        let held = AfterDrops {
            drops_left: drops.len(),
            writes,
        };
        for op in drops {
            self.submit(io, drop_ctx, op);
        }
        held
    }

    /// A cache drop before in-place write `seq` finished (its result is a
    /// hint and ignored): once all have, submit the write's pieces.
    pub(super) fn inplace_drop_done(&mut self, io: &mut dyn Io, seq: u64) {
        let Some(w) = self.inplace.get_mut(&seq) else {
            return;
        };
        for op in w.held.drop_done() {
            self.submit(io, Ctx::InPlaceData { seq }, op);
        }
    }

    pub(super) fn inplace_data_done(
        &mut self,
        io: &mut dyn Io,
        seq: u64,
        c: Completion,
        err: Option<i32>,
    ) {
        let Some(w) = self.inplace.get_mut(&seq) else {
            return;
        };
        let mut err = err;
        if !w.direct {
            // One of its page-cache pieces: the write is done with the last.
            w.piece_error = w.piece_error.or(err);
            w.pieces_left -= 1;
            if w.pieces_left > 0 {
                return;
            }
            err = w.piece_error;
        }
        let mut w = self.inplace.remove(&seq).unwrap();
        if err == Some(libc::EINVAL) && w.direct {
            // The filesystem takes no O_DIRECT writes of this shape: the page
            // cache from now on, starting with this write.
            crate::elog!(
                "nbdmirror: WARNING: direct write to the data file refused ({}); writing through the page cache",
                errno_str(libc::EINVAL)
            );
            self.direct_fd = None;
            let Op::Write { buf, .. } = c.op else {
                unreachable!()
            };
            let (at, len, offset) = (w.at, w.len as usize, w.offset);
            w.direct = false;
            w.pieces_left = 1;
            self.inplace.insert(seq, w);
            self.submit(
                io,
                Ctx::InPlaceData { seq },
                Op::Write {
                    fd: self.files.data,
                    buf,
                    start: at,
                    end: at + len,
                    offset,
                },
            );
            return;
        }
        self.apply_epoch += 1;
        if let Some(e) = err {
            if self.failed.is_none() {
                self.failed_errno = map_write_errno(e);
            }
            self.poison(format!(
                "writing {} bytes in place at offset {}: {}",
                w.len,
                w.offset,
                errno_str(e)
            ));
            // Some of its pieces may have reached `data`: reads accept
            // either copy of those blocks (see `failed_inplace`).
            if self.failed_inplace.len() < 1024 {
                self.failed_inplace
                    .push((w.offset / BLOCK_SIZE, std::mem::take(&mut w.sums)));
            }
            self.events
                .push(StoreEvent::Written(w.req, Err(map_write_errno(e))));
        } else {
            let Op::Write { buf, .. } = c.op else {
                unreachable!()
            };
            let first = w.offset / BLOCK_SIZE;
            for (i, &sum) in w.sums.iter().enumerate() {
                self.sums.set(first + i as u64, sum);
            }
            self.stats.applied_bytes += w.len;
            self.stats.inplace_writes += 1;
            self.inplace_done += 1;
            if !w.direct && w.len >= PAGE_CACHE_PIECE {
                self.mark_large_folios(w.offset, w.offset + w.len);
            }
            let owned = match buf {
                WriteBuf::Owned(b) => Some(b),
                WriteBuf::Shared(a) => Arc::try_unwrap(a).ok(),
            };
            if let Some(b) = owned {
                if w.bounced {
                    if self.bounce.len() < 8 {
                        self.bounce.push(b);
                    }
                } else if self.recycled.len() < 64 {
                    self.recycled.push(b);
                }
            }
            if self.failed.is_some() {
                self.events
                    .push(StoreEvent::Written(w.req, Err(self.failed_errno)));
            } else if w.fua {
                self.waiters.push(Waiter {
                    seq: w.intents.iter().copied().max().unwrap_or(0),
                    data: self.inplace_done,
                    req: w.req,
                    is_write: true,
                });
                self.resolve_waiters();
            } else {
                self.events.push(StoreEvent::Written(w.req, Ok(())));
            }
        }
        for req in std::mem::take(&mut self.deferred_reads) {
            self.start_read(io, req);
        }
        self.kick(io, false);
    }

    /// Write in-place data through `fd`, an O_DIRECT descriptor of the data
    /// file (None: through the page cache). A node that serves no reads
    /// (a secondary) gains: no page-cache copy, no page allocation, no
    /// writeback stall at the next checkpoint; the drive's own speed is the
    /// limit. FUA and FLUSH still fdatasync the data file, which flushes the
    /// drive's cache for these writes too. If the filesystem refuses a direct
    /// write (EINVAL), the store falls back to the page cache for good.
    pub fn set_direct_fd(&mut self, fd: Option<RawFd>) {
        self.direct_fd = fd;
    }

    /// Write one page-cache piece in [`WORKER_PIECE_EVERY`] of each in-place
    /// write through `fd`, a second descriptor of the data file whose writes
    /// go to the ring's workers, while the I/O backend runs the data file's
    /// own writes on the loop (`UringIo::inline_piece_fds`). The copy into
    /// the page cache is the largest cost of a large write: on the loop it
    /// reads a payload still in that CPU's cache and wakes no worker, and
    /// the workers' share lands on another CPU, so the two split the
    /// copying (docs/design.md, "Data-file writes on the loop").
    pub fn set_worker_data_fd(&mut self, fd: Option<RawFd>) {
        self.worker_data_fd = fd;
    }

    /// Writes at least this long (block-aligned) may go in place.
    pub fn inplace_min(&self) -> u64 {
        self.tuning.inplace_min
    }
}
