//! Repairing a block that failed its checksum on a read: asking the peers
//! that hold a good copy, one after another, writing the copy that verifies
//! over the bad one, and answering the waiting read (docs/mirroring.md,
//! "Repair").

use super::*;

impl Mirror {
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
    pub(super) fn start_repair(&mut self, io: &mut dyn Io, client: u64, read: CorruptRead) {
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
    pub(super) fn repair_data(
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
    pub(super) fn repair_written(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        id: u64,
        r: Result<(), i32>,
    ) {
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
    pub(super) fn finish_repair(&mut self, io: &mut dyn Io, store: &mut Store, id: u64, ok: bool) {
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
    pub(super) fn peer_read_done(
        &mut self,
        io: &mut dyn Io,
        link: u64,
        id: u64,
        r: Result<Vec<u8>, i32>,
    ) {
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
}
