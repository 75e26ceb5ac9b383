//! Resync on a primary: bringing a peer back in sync from its dirty bitmap,
//! or by comparing checksums first (`COMPARE`: a crash, a new or unknown
//! peer), with the rate cap, pause/resume and the flush that settles a
//! compare (docs/mirroring.md, "Resync" and "Checksum resync").

use super::*;

impl Mirror {
    pub(super) fn kick_resync(&mut self, io: &mut dyn Io, store: &mut Store) {
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
            // Under a cap a run is no longer than the tokens allow (one
            // block at least): a whole 1 MiB batch at a time let a 4 KiB/s
            // cap resync 1 MiB at once (a tester's find).
            // (Never shorter than the bucket's size, a fifth of a second's
            // worth: at 100 MiB/s runs stay whole batches, as before.)
            let most = if self.cfg.resync_rate > 0 {
                let floor = (self.cfg.resync_rate / 5 / BLOCK).clamp(1, RESYNC_BATCH_BLOCKS);
                ((p.tokens / BLOCK as f64).floor() as u64).clamp(floor, RESYNC_BATCH_BLOCKS)
            } else {
                RESYNC_BATCH_BLOCKS
            };
            let run = p.bitmap.next_run(p.cursor, most);
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

    /// Primary: before the first client write of a run (after a start, or
    /// after a peer left the in-sync set), move to the next run, stored
    /// first, and tell every in-sync peer (they record it before the
    /// write's record). A peer that then follows this run holds writes a
    /// node promoted from an earlier one lacks (`generation::judge`).
    pub(super) fn advance_run(&mut self, io: &mut dyn Io) {
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
    pub(super) fn sums_arrived(
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

    pub(super) fn resync_flush(&mut self, io: &mut dyn Io, i: usize) {
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

    pub(super) fn resync_read_done(
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
                // Zeroes over a hole here go as a hole there (the peer
                // punches it): sent with NO_HOLE, a resynced replica became
                // fully allocated and reported every zeroed or trimmed range
                // as data once promoted (a tester's find). Zeroes that are
                // allocated here (NO_HOLE writes) stay allocated there.
                let hole = zero && {
                    let ext = store.block_status(io, s, len as u64, 64);
                    ext.iter().all(|&(_, f)| f & nbd::consts::STATE_HOLE != 0)
                        && ext.iter().map(|&(l, _)| u64::from(l)).sum::<u64>() >= len as u64
                };
                let hdr = RecordHeader {
                    id: rid,
                    offset: s,
                    length: len as u32,
                    kind: if zero {
                        wire::KIND_ZERO
                    } else {
                        wire::KIND_WRITE
                    },
                    flags: wire::FLAG_RESYNC | if zero && !hole { wire::FLAG_NO_HOLE } else { 0 },
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

    /// Read a read's blocks again after a repair (or once their lock is
    /// free): a scrub's read verifies whatever the store is set to.
    pub(super) fn read_again(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        read: &CorruptRead,
    ) {
        if self.scrub.owns(rid) {
            store.read_verified(io, rid, read.offset, read.len);
        } else {
            store.read(io, rid, read.offset, read.len, read.head);
        }
    }
}
