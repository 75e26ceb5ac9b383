//! Running a scrub pass on a primary: reading every block (O_DIRECT when
//! it can) and verifying it, repairing bad blocks from a peer, and asking
//! every in-sync peer to verify its copy and compare checksums, with the
//! rate cap and the range locks that keep client writes in order.
//!
//! The pass's state, schedule and persistent record are in [`super::scrub`];
//! this part drives them through the store and the peer links.

use super::*;

impl Mirror {
    /// Start scrub steps while the scrub runs and its window, rate cap and
    /// the range locks allow: each locks its range (waiting for client
    /// writes there to finish, so every replica holds the same bytes) and
    /// reads it, verified.
    pub(super) fn scrub_kick(&mut self, io: &mut dyn Io, store: &mut Store) {
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
    pub(super) fn scrub_read_done(
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
    pub(super) fn scrub_unrepaired(&mut self, io: &mut dyn Io, store: &mut Store, rid: u64) {
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
    pub(super) fn scrub_verified(
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
    pub(super) fn scrub_peer_answered(
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
    pub(super) fn verify_read_done(
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
}
