//! Write-back of the journal: applying durable records to the data file,
//! and checkpoints.
//!
//! Owns the steps 4 and 5 of the write path (see the store's module doc):
//! `maybe_apply` copies records a journal sync covered into the data file
//! (reading back the ones no longer held in memory, writing zeroes and
//! trims) and updates their blocks' checksums; `maybe_checkpoint` syncs the
//! data file and the checksum table, writes the superblock with the new
//! journal tail and so frees ring space. Both run from `kick`, after
//! completions and on the store's tick.

use std::os::fd::RawFd;

use super::*;

impl Store {
    pub(super) fn maybe_apply(&mut self, io: &mut dyn Io) {
        if self.apply.is_some() || self.durable_seq <= self.applied_seq {
            return;
        }
        let upto = self.durable_seq;
        let pieces = self.overlay.pieces_upto(upto);
        let newest = self.overlay.max_seq();
        // A journaled write newer than an in-place write still in flight must
        // not reach the data file first: wait for the in-place write. With
        // O_DIRECT in-place writes, wait for any in the same 1 MiB chunk
        // (since writes are split around journaled blocks, `split_plan`,
        // the two meet there): a page-cache write racing a direct write
        // into one large folio can leave stale bytes cached, which the
        // kernel cannot invalidate.
        let grain = if self.direct_fd.is_some() {
            JOURNALED_CHUNK
        } else {
            1
        };
        if pieces.iter().any(|p| {
            let (s, e) = (p.start / grain * grain, p.end.div_ceil(grain) * grain);
            self.inplace
                .values()
                .any(|w| w.offset < e && s < w.offset + w.len)
        }) {
            return;
        }
        if pieces.is_empty() {
            self.applied_seq = upto;
            self.applied_needs_durable = self.applied_needs_durable.max(newest);
            return;
        }
        self.apply_epoch += 1;
        let mut batch = ApplyBatch {
            upto,
            newest,
            ..Default::default()
        };
        let mut ops: Vec<Op> = Vec::new();
        let mut drops: Vec<Op> = Vec::new();
        for p in &pieces {
            batch.pieces.push((p.start, p.end));
            if matches!(p.content, Content::Data { .. }) {
                // Small writes drop large folios; only large ones leave
                // them (a steady stream of 8-32 KiB writes must not drop
                // and re-mark its chunks at every checkpoint).
                if p.end - p.start < PAGE_CACHE_PIECE {
                    self.drop_large_folios(p.start, p.end, &mut drops);
                } else {
                    batch.large.push((p.start, p.end));
                }
            }
            let first = p.start / BLOCK_SIZE;
            let end_block = p.end.div_ceil(BLOCK_SIZE);
            self.applying
                .entry(first)
                .and_modify(|e| *e = (*e).max(end_block))
                .or_insert(end_block);
            let full_first = p.start.div_ceil(BLOCK_SIZE);
            let full_end = p.end / BLOCK_SIZE;
            if p.start % BLOCK_SIZE != 0 {
                batch.rmw.entry(first).or_default().push(p.clone());
            }
            let last = (p.end - 1) / BLOCK_SIZE;
            if p.end % BLOCK_SIZE != 0 && !(last == first && p.start % BLOCK_SIZE != 0) {
                batch.rmw.entry(last).or_default().push(p.clone());
            }
            if full_first >= full_end {
                continue;
            }
            let (fs, fe) = (full_first * BLOCK_SIZE, full_end * BLOCK_SIZE);
            match &p.content {
                Content::Data { buf, at } => {
                    let s = at + (fs - p.start) as usize;
                    let e = s + (fe - fs) as usize;
                    for (i, block) in buf[s..e].chunks(BLOCK_SIZE as usize).enumerate() {
                        batch.sums.push((
                            full_first + i as u64,
                            block_checksum(full_first + i as u64, block),
                        ));
                    }
                    self.stats.applied_bytes += fe - fs;
                    for (off, n) in page_cache_pieces(fs, fe - fs) {
                        let start = s + (off - fs) as usize;
                        ops.push(Op::Write {
                            fd: self.files.data,
                            buf: WriteBuf::Shared(buf.clone()),
                            start,
                            end: start + n as usize,
                            offset: off,
                        });
                    }
                }
                Content::Zero { provision } => {
                    for b in full_first..full_end {
                        batch.sums.push((b, 0));
                    }
                    ops.push(Op::Fallocate {
                        fd: self.files.data,
                        mode: zero_mode(*provision),
                        offset: fs,
                        len: fe - fs,
                    });
                }
            }
        }
        let rmw_blocks: Vec<u64> = batch.rmw.keys().copied().collect();
        batch.ops_left = ops.len() + rmw_blocks.len();
        self.apply = Some(batch);
        // The writes wait for the drops (a write first would dirty a page of
        // a large folio, which the drop then cannot remove).
        let held = self.submit_after_drops(io, drops, Ctx::ApplyDrop, ops, Ctx::ApplyWrite);
        self.apply.as_mut().unwrap().held = held;
        for block in rmw_blocks {
            self.submit(
                io,
                Ctx::ApplyRead { block },
                Op::Read {
                    fd: self.files.data,
                    buf: vec![0u8; BLOCK_SIZE as usize],
                    at: 0,
                    offset: block * BLOCK_SIZE,
                },
            );
        }
    }

    pub(super) fn apply_read_done(
        &mut self,
        io: &mut dyn Io,
        block: u64,
        c: Completion,
        err: Option<i32>,
    ) {
        if let Some(e) = err {
            self.apply_op_done(io, Some(e));
            return;
        }
        let Op::Read { mut buf, at, .. } = c.op else {
            unreachable!()
        };
        if c.result == 0 {
            buf[at..].fill(0);
        }
        let was_corrupt = !self.sums.verify(block, &buf);
        if was_corrupt {
            self.stats.checksum_failures += 1;
            self.corrupt_marked = true;
            if self.corrupt_log.allow(Instant::now()) {
                crate::elog!(
                    "nbdmirror: ERROR: block {block} (offset {}) failed checksum verification before \
                     a partial write; it stays marked corrupt (reads return EIO) until the whole \
                     block is rewritten or, on a mirrored node, repaired from a peer",
                    block * BLOCK_SIZE
                );
            }
        }
        let batch = self.apply.as_mut().expect("apply batch");
        let bstart = block * BLOCK_SIZE;
        for p in batch.rmw.remove(&block).unwrap_or_default() {
            let s = p.start.max(bstart);
            let e = p.end.min(bstart + BLOCK_SIZE);
            p.content.copy_to(
                s - p.start,
                &mut buf[(s - bstart) as usize..(e - bstart) as usize],
            );
        }
        // A block that was corrupt keeps a checksum that cannot verify, so the
        // bytes the client did not rewrite are never served as good data.
        let sum = block_checksum(block, &buf);
        let sum = if was_corrupt {
            sum ^ checksum::CORRUPT_MARK
        } else {
            sum
        };
        batch.sums.push((block, sum));
        if was_corrupt && self.marked_seen.len() < MAX_CORRUPT_READS {
            // A repair already under way (a read found the block bad before
            // this write reached it) may take a peer's copy over the mark.
            self.marked_seen.insert(block, sum);
        }
        self.stats.applied_bytes += BLOCK_SIZE;
        self.submit(
            io,
            Ctx::ApplyWrite,
            Op::Write {
                fd: self.files.data,
                buf: WriteBuf::Owned(buf),
                start: 0,
                end: BLOCK_SIZE as usize,
                offset: bstart,
            },
        );
    }

    /// Replace one failed apply fallocate by plain writes of zeroes (in
    /// pieces of at most `ZERO_CHUNK`, sharing one buffer).
    pub(super) fn apply_zeroes_by_writing(
        &mut self,
        io: &mut dyn Io,
        fd: RawFd,
        offset: u64,
        len: u64,
    ) {
        let zeros = Arc::new(vec![0u8; (len as usize).min(ZERO_CHUNK)]);
        let n = len.div_ceil(ZERO_CHUNK as u64).max(1) as usize;
        self.apply.as_mut().expect("apply batch").ops_left += n - 1;
        let mut at = 0u64;
        while at < len {
            let piece = (len - at).min(ZERO_CHUNK as u64) as usize;
            self.submit(
                io,
                Ctx::ApplyWrite,
                Op::Write {
                    fd,
                    buf: WriteBuf::Shared(zeros.clone()),
                    start: 0,
                    end: piece,
                    offset: offset + at,
                },
            );
            at += piece as u64;
        }
        if len == 0 {
            self.apply_op_done(io, None);
        }
    }

    pub(super) fn apply_op_done(&mut self, io: &mut dyn Io, err: Option<i32>) {
        let batch = self.apply.as_mut().expect("apply batch");
        if err.is_some() && batch.failed.is_none() {
            batch.failed = err;
        }
        batch.ops_left -= 1;
        if batch.ops_left > 0 {
            return;
        }
        let batch = self.apply.take().unwrap();
        self.applying.clear();
        self.apply_epoch += 1;
        if let Some(e) = batch.failed {
            if self.failed.is_none() {
                self.failed_errno = map_write_errno(e);
            }
            self.poison(format!(
                "writing journaled data to the data file failed: {}",
                errno_str(e)
            ));
        } else {
            for (b, s) in batch.sums {
                self.sums.set(b, s);
            }
            for (s, e) in batch.pieces {
                self.overlay.remove_upto(s, e, batch.upto);
            }
            for (s, e) in batch.large {
                self.mark_large_folios(s, e);
            }
            self.applied_seq = batch.upto;
            self.applied_needs_durable = self.applied_needs_durable.max(batch.newest);
        }
        for req in std::mem::take(&mut self.deferred_reads) {
            self.start_read(io, req);
        }
        self.kick(io, false);
    }

    /// A cache drop of the apply batch finished: once all have, its writes go.
    pub(super) fn apply_drop_done(&mut self, io: &mut dyn Io) {
        let Some(batch) = self.apply.as_mut() else {
            return;
        };
        for op in batch.held.drop_done() {
            self.submit(io, Ctx::ApplyWrite, op);
        }
    }

    pub(super) fn maybe_checkpoint(&mut self, io: &mut dyn Io, pressure: bool) {
        if self.checkpoint.is_some() || self.applied_seq <= self.checkpointed_seq {
            return;
        }
        if self.durable_seq < self.applied_needs_durable {
            // Wait for the sync (see `applied_needs_durable`).
            return;
        }
        let due = pressure
            || self.draining
            || !self.backlog.is_empty()
            || self.ring.used() * 100 >= self.ring.size * self.tuning.checkpoint_percent
            || self.last_checkpoint.elapsed() >= self.tuning.checkpoint_interval
            || (self.inplace_wanted && self.last_checkpoint.elapsed() >= INPLACE_CHECKPOINT_GAP)
            || (self.folios_wanted && self.last_checkpoint.elapsed() >= FOLIO_CHECKPOINT_GAP)
            // Held writes wait for exactly this (each is held only once).
            || !self.deferred.is_empty()
            || self.corrupt_marked
            || self.checkpoint_wanted > self.checkpointed_seq;
        if !due {
            return;
        }
        // The tail may not pass an in-place record whose data is not written
        // yet: after a crash it is what says which blocks to re-checksum.
        let oldest_intent = self
            .inplace
            .values()
            .flat_map(|w| w.intents.iter().copied())
            .min();
        let upto = match oldest_intent {
            Some(first) => self.applied_seq.min(first - 1),
            None => self.applied_seq,
        };
        if upto < self.applied_seq && self.intents_retired_at != self.stats.checkpoints {
            // In-place writes in flight hold intents this checkpoint cannot
            // pass, and new writes would go on reusing them: under steady
            // small random writes some write always holds the oldest, and
            // the tail stopped there for good (the ring then filled with
            // checksum records, and batches went unlogged). New writes take
            // fresh intents from now on; the next checkpoint passes these
            // once their writes are done. Once per checkpoint, so that
            // fresh intents are not retired again while the old writes
            // drain.
            self.intents_retired_at = self.stats.checkpoints;
            let applied = self.applied_seq;
            self.intents.retain(|_, seq| *seq > applied);
        }
        if upto <= self.checkpointed_seq {
            return;
        }
        // Intents this checkpoint releases stop protecting new writes now;
        // writes into those regions start a new intent.
        self.intents.retain(|_, seq| *seq > upto);
        let tail = self.ring.tail_after(upto);
        self.corrupt_marked = false;
        let pages = self.sums.take_dirty_pages();
        self.checkpoint = Some(Checkpoint {
            upto,
            tail,
            phase: CkptPhase::SyncData,
            ops_left: 1 + pages.len() + self.extra_sync_fds.len(),
            failed: None,
            sb: self.sb.clone(),
        });
        self.last_checkpoint = Instant::now();
        self.submit(
            io,
            Ctx::Checkpoint,
            Op::Fsync {
                fd: self.files.data,
                datasync: true,
            },
        );
        for fd in self.extra_sync_fds.clone() {
            self.submit(io, Ctx::Checkpoint, Op::Fsync { fd, datasync: true });
        }
        for (off, page) in pages {
            let end = page.len();
            self.submit(
                io,
                Ctx::Checkpoint,
                Op::Write {
                    fd: self.files.meta,
                    buf: WriteBuf::Owned(page),
                    start: 0,
                    end,
                    offset: CHECKSUM_TABLE_OFFSET + off,
                },
            );
        }
    }

    pub(super) fn checkpoint_op_done(&mut self, io: &mut dyn Io, err: Option<i32>) {
        let ck = self.checkpoint.as_mut().expect("checkpoint");
        if err.is_some() && ck.failed.is_none() {
            ck.failed = err;
        }
        ck.ops_left -= 1;
        if ck.ops_left > 0 {
            return;
        }
        if let Some(e) = ck.failed {
            let phase = ck.phase;
            self.checkpoint = None;
            self.sums.mark_all_dirty();
            self.poison(format!("checkpoint failed in {phase:?}: {}", errno_str(e)));
            return;
        }
        let meta = self.files.meta;
        match ck.phase {
            CkptPhase::SyncData => {
                ck.phase = CkptPhase::SyncTable;
                ck.ops_left = 1;
                self.submit(
                    io,
                    Ctx::Checkpoint,
                    Op::Fsync {
                        fd: meta,
                        datasync: true,
                    },
                );
            }
            CkptPhase::SyncTable => {
                ck.phase = CkptPhase::WriteSuper;
                ck.ops_left = 1;
                ck.sb.tail_pos = ck.tail.0;
                ck.sb.tail_seq = ck.tail.1;
                ck.sb.write_counter += 1;
                let slot = ck.sb.write_counter % 2;
                let bytes = ck.sb.encode();
                let end = bytes.len();
                self.submit(
                    io,
                    Ctx::Checkpoint,
                    Op::Write {
                        fd: meta,
                        buf: WriteBuf::Owned(bytes),
                        start: 0,
                        end,
                        offset: slot * SUPERBLOCK_SLOT,
                    },
                );
            }
            CkptPhase::WriteSuper => {
                ck.phase = CkptPhase::SyncSuper;
                ck.ops_left = 1;
                self.submit(
                    io,
                    Ctx::Checkpoint,
                    Op::Fsync {
                        fd: meta,
                        datasync: true,
                    },
                );
            }
            CkptPhase::SyncSuper => {
                let ck = self.checkpoint.take().unwrap();
                self.sb = ck.sb;
                self.ring.release_upto(ck.upto);
                self.journaled_chunks.retain(|_, e| e.seq > ck.upto);
                self.checkpointed_seq = ck.upto;
                self.inplace_wanted = false;
                self.folios_wanted = false;
                self.stats.checkpoints += 1;
                self.release_deferred(io);
                self.drain_backlog(io);
                self.kick(io, false);
            }
        }
    }
    /// Checkpoints started so far. They run one at a time, so this is the
    /// finished ones (`stats.checkpoints`) plus the one running: a write
    /// that finished when this was `n` is synced once more than `n` have
    /// finished.
    pub(super) fn checkpoints_begun(&self) -> u64 {
        self.stats.checkpoints + u64::from(self.checkpoint.is_some())
    }
}
