//! The secondary's side of a session: applying the primary's Records,
//! Zeroes, Trims and Flushes to the local store in order and answering
//! Ack/FlushAck, serving its reads, checksum ranges and verifications for
//! resync, repair and scrub, and taking a handed-over generation.

use super::*;

/// Records a secondary takes off the link while earlier ones are still
/// being applied, at most, by count and by payload bytes: past either it
/// stops reading the link (TCP holds the primary back) until half are
/// done. A sound primary stays far below (its clients' requests are capped
/// at 512 MiB, and its acks come back as fast as the disk allows); an
/// authenticated tester's flood of records took a secondary to 8.9 GB in
/// 20 s without it.
pub(super) const APPLYING_MAX: usize = 16384;
pub(super) const APPLYING_MAX_BYTES: u64 = 256 << 20;

impl Mirror {
    pub(super) fn secondary_frame(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        link: u64,
        kind: FrameKind,
        buf: Vec<u8>,
        at: usize,
    ) -> Result<(), String> {
        let payload = &buf[at..];
        // Messages newer than the session's protocol version are refused,
        // as the SummedRecord is below: a primary at that version never
        // sends them (a hostile-peer tester's find: they were answered).
        let v = self.links[&link].version;
        let since = match kind {
            FrameKind::BlockRequest => REPAIR_VERSION,
            FrameKind::VerifyRequest => VERIFY_VERSION,
            FrameKind::Generation if payload.len() > 8 => wire::RUN_VERSION,
            _ => 0,
        };
        if v < since {
            return Err(format!(
                "peer sent a {kind} frame{} in a session at protocol version {v} (it came with \
                 version {since})",
                if kind == FrameKind::Generation {
                    " with a run"
                } else {
                    ""
                }
            ));
        }
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
                let bytes = if h.kind == wire::KIND_WRITE {
                    h.length as u64
                } else {
                    0
                };
                self.applying.insert(rid, (link, h.id, false, bytes));
                self.applying_bytes += bytes;
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
                self.applying.insert(rid, (link, id, true, 0));
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
            FrameKind::Pong => {
                wire::decode_u64(payload, "Pong")?;
            }
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
                return Err(format!("{}: {r}", link::PRIMARY_ENDED));
            }
            k => return Err(format!("unexpected {k} frame from a primary")),
        }
        Ok(())
    }

    /// A store request the secondary issued for a peer's record finished.
    pub(super) fn applied(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        rid: u64,
        r: Result<(), i32>,
    ) {
        let Some((link, id, is_flush, bytes)) = self.applying.remove(&rid) else {
            return;
        };
        self.applying_bytes -= bytes;
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
        if self.applying.len() <= APPLYING_MAX / 2 && self.applying_bytes <= APPLYING_MAX_BYTES / 2
        {
            for t in self.link_ids(|l| l.throttled) {
                let l = self.links.get_mut(&t).unwrap();
                l.throttled = false;
                l.last_rx = self.t;
                self.process_frames(io, store, t);
                self.post_recv(io, t);
            }
        }
        // Sessions held behind older ones may go on.
        if !self.links.values().any(|l| l.held) {
            return;
        }
        for h in self.link_ids(|l| l.held) {
            if !self.applying.values().any(|&(l2, ..)| l2 != h) {
                self.links.get_mut(&h).unwrap().held = false;
                self.process_frames(io, store, h);
                self.post_recv(io, h);
            }
        }
    }
}
