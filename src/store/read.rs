//! The read path: serving a range from the journal overlay and the data
//! file, verifying every block against its checksum, and what follows a
//! mismatch.
//!
//! Owns `Store::read` and its variants (for a peer's resync, for a scrub
//! through O_DIRECT), the per-block checksums a peer compares
//! (`block_sums`), block status (`base:allocation`), and the corrupt-read
//! hand-off: a block that fails its checksum is reported to the caller,
//! which repairs it from a peer (`repair`) or fails the read with EIO.

use super::*;

impl Store {
    /// Read `[offset, offset+len)` into a buffer with `head` spare bytes in front.
    /// Why read `req` just failed with EIO, if its blocks failed
    /// verification: the read's range and the blocks that did not verify.
    /// Whoever handles the read's event takes it (a mirrored primary
    /// repairs the blocks from a peer, then reads again).
    pub fn take_corrupt(&mut self, req: ReqId) -> Option<CorruptRead> {
        self.corrupt.remove(&req)
    }

    /// Rewrite blocks of the data file that failed verification with
    /// `data`, another replica's copy of the blocks from `offset` (whole
    /// blocks). The checksum table already says what each block must hold,
    /// so nothing is written unless every block is settled (no write to it
    /// in flight, in the journal or being applied: EAGAIN) and `data`
    /// matches its checksum (EILSEQ); the table is not changed. One
    /// exception: a block whose peer copy does not match its table entry
    /// but is byte for byte what this node's data file holds has a rotted
    /// entry, not rotted data (the peer verified its copy against its own
    /// checksum, so two replicas and the peer's entry agree). The data file
    /// is read to find such blocks before EILSEQ is answered; they are
    /// rewritten whole with a fresh entry. Answered by
    /// `StoreEvent::Written(req, ..)`.
    pub fn repair(&mut self, io: &mut dyn Io, req: ReqId, offset: u64, data: Vec<u8>) {
        self.repair_checked(io, req, offset, data, None);
    }

    /// [`Store::repair`]; `vouched`: after the data file was read, the
    /// blocks whose peer copy is byte for byte this node's data (None
    /// before that read).
    fn repair_checked(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        data: Vec<u8>,
        vouched: Option<&[u64]>,
    ) {
        let n = data.len() as u64 / BLOCK_SIZE;
        let first = offset / BLOCK_SIZE;
        let mismatch = |s: &Self, b: u64, block: &[u8]| {
            !s.sums.verify(b, block)
                && s.marked_seen.get(&b) != Some(&s.sums.get(b))
                && !vouched.is_some_and(|v| v.contains(&b))
        };
        let refuse = if self.failed.is_some() {
            Some(EIO)
        } else if !offset.is_multiple_of(BLOCK_SIZE)
            || n == 0
            || data.len() as u64 != n * BLOCK_SIZE
            || offset + data.len() as u64 > self.sb.size
        {
            Some(libc::EINVAL)
        } else if self.busy(first, n) {
            Some(libc::EAGAIN)
        } else if data
            .chunks(BLOCK_SIZE as usize)
            .enumerate()
            .any(|(i, block)| mismatch(self, first + i as u64, block))
        {
            if vouched.is_none() {
                // Compare with this node's data before refusing the copy.
                let len = data.len();
                self.repair_compares.insert(req, data);
                self.submit(
                    io,
                    Ctx::RepairCompare { req, offset },
                    Op::Read {
                        fd: self.files.data,
                        buf: vec![0u8; len],
                        at: 0,
                        offset,
                    },
                );
                return;
            }
            Some(libc::EILSEQ)
        } else {
            None
        };
        if let Some(e) = refuse {
            self.events.push(StoreEvent::Written(req, Err(e)));
            return;
        }
        for &b in vouched.unwrap_or(&[]) {
            crate::elog!(
                "nbdmirror: block {b}: its checksum-table entry did not match its data, which a \
                 peer's copy (verified on the peer) repeats byte for byte: the entry rotted, \
                 not the data; rewriting the block whole with a fresh entry"
            );
        }
        // A block marked corrupt (bad, then written in part) holds a
        // checksum no copy can match: the peer's copy, which took the same
        // partial write over good data and verified on the peer, replaces
        // it as a whole-block write, exactly as if the client had rewritten
        // the block (which clears a mark): through the journal (data and
        // checksum durable together, replayed by recovery) or in place
        // (recovery rebuilds the checksum from the data file), as the
        // store's rules for writes decide.
        let adopt: Vec<u64> = data
            .chunks(BLOCK_SIZE as usize)
            .enumerate()
            .map(|(i, block)| (first + i as u64, block))
            .filter(|(b, block)| !self.sums.verify(*b, block))
            .map(|(b, _)| b)
            .collect();
        if !adopt.is_empty() {
            for b in &adopt {
                if self.marked_seen.remove(b).is_some() {
                    crate::elog!(
                        "nbdmirror: block {b}, marked corrupt, takes a peer's copy (rewritten \
                         whole, with its checksum)"
                    );
                }
            }
            self.stats.repaired_blocks += n;
            let len = data.len();
            let mut buf = vec![0u8; WRITE_HEADROOM + len];
            buf[WRITE_HEADROOM..].copy_from_slice(&data);
            self.write(io, req, offset, buf, WRITE_HEADROOM, len, false);
            return;
        }
        // A read racing with the rewrite verifies again rather than fails.
        self.apply_epoch += 1;
        let len = data.len();
        self.submit(
            io,
            Ctx::Repair { req, blocks: n },
            Op::Write {
                fd: self.files.data,
                buf: WriteBuf::Owned(data),
                start: 0,
                end: len,
                offset,
            },
        );
    }

    /// The data file's copy of a repair's blocks was read (see
    /// [`Store::repair`]): blocks whose peer copy does not match their
    /// entry but equals these bytes are vouched for; the repair is
    /// checked again with them (a write that came meanwhile makes it
    /// EAGAIN, as usual).
    pub(super) fn repair_compare_done(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        c: Completion,
        err: Option<i32>,
    ) {
        let Some(data) = self.repair_compares.remove(&req) else {
            return;
        };
        let Op::Read { buf, .. } = c.op else {
            unreachable!()
        };
        if let Some(e) = err {
            crate::elog!(
                "nbdmirror: reading the data file at byte {offset} to compare it with a peer's \
                 copy failed: {}",
                errno_str(e)
            );
        }
        let first = offset / BLOCK_SIZE;
        let vouched: Vec<u64> = if err.is_some() || c.result as usize != buf.len() {
            Vec::new()
        } else {
            data.chunks(BLOCK_SIZE as usize)
                .zip(buf.chunks(BLOCK_SIZE as usize))
                .enumerate()
                .filter(|(i, (peer, ours))| {
                    peer == ours && !self.sums.verify(first + *i as u64, peer)
                })
                .map(|(i, _)| first + i as u64)
                .collect()
        };
        self.repair_checked(io, req, offset, data, Some(&vouched));
    }

    /// Answer read `req` with `errno` without reading (the caller knows the
    /// data must not be served).
    pub fn fail_read(&mut self, req: ReqId, errno: i32) {
        self.events.push(StoreEvent::Read(req, Err(errno)));
    }

    pub fn read(&mut self, io: &mut dyn Io, req: ReqId, offset: u64, len: u64, head: usize) {
        let verify = self.tuning.verify_reads;
        self.read_checked(io, req, offset, len, head, verify, false);
    }

    /// As [`Store::read`], but every block is verified even when client
    /// reads are not (`--no-verify-reads`): data that goes to another
    /// replica (resync, a peer's repair) must never carry a bad block
    /// there under a fresh checksum.
    pub fn read_for_peer(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        len: u64,
        head: usize,
    ) {
        self.read_checked(io, req, offset, len, head, true, false);
    }

    /// As [`Store::read`], verifying every block taken from the data file
    /// even when reads are not verified (`--no-verify-reads`): a scrub's
    /// read, which exists to find blocks that fail.
    /// The data file's part is read from the disk when a media descriptor
    /// is set ([`Store::set_media_fd`]).
    pub fn read_verified(&mut self, io: &mut dyn Io, req: ReqId, offset: u64, len: u64) {
        self.read_checked(io, req, offset, len, 0, true, true);
    }

    #[allow(clippy::too_many_arguments)]
    fn read_checked(
        &mut self,
        io: &mut dyn Io,
        req: ReqId,
        offset: u64,
        len: u64,
        head: usize,
        verify: bool,
        media: bool,
    ) {
        let out = vec![0u8; head + len as usize];
        let r = ReadReq {
            start: offset,
            len,
            head,
            out,
            parts: Vec::new(),
            parts_left: 0,
            epoch: 0,
            retries: 0,
            verify,
            media,
        };
        self.reads.insert(req, r);
        self.start_read(io, req);
    }

    /// The checksums of blocks `[first, first+n)` as this replica holds
    /// them now, for comparing replicas; `UNKNOWN_SUM` for a block whose
    /// table entry may be stale (a write to it is in flight or not yet
    /// applied), which a comparison must treat as different.
    pub fn block_sums(&self, first: u64, n: u64) -> Vec<u64> {
        self.settled_sums(first, n)
            .into_iter()
            .map(|s| s.unwrap_or(UNKNOWN_SUM))
            .collect()
    }

    /// Whether a write to a block of `[first, first+n)` is in flight or not
    /// yet applied (its checksum is not settled). Not read from
    /// `block_sums`: a table entry may itself hold `UNKNOWN_SUM`'s value
    /// (rot; an erased flash page reads as all ones), and a repair of such
    /// a block then waited for a write that never came, hanging the read
    /// and the shutdown behind it (a tester's find).
    pub fn busy(&self, first: u64, n: u64) -> bool {
        self.settled_sums(first, n).iter().any(Option::is_none)
    }

    /// The table's checksum of each block of `[first, first+n)`, or None
    /// where a write to it is in flight or not yet applied.
    fn settled_sums(&self, first: u64, n: u64) -> Vec<Option<u64>> {
        let end = (first + n).min(self.sums.blocks());
        let mut busy: Vec<(u64, u64)> = self
            .in_flight
            .values()
            .map(|f| (f.start, f.end))
            .chain(self.backlog.iter().map(|w| (w.offset, w.offset + w.len)))
            .chain(self.inplace.values().map(|w| (w.offset, w.offset + w.len)))
            .chain(self.deferred.iter().map(|d| d.op.range()))
            .collect();
        busy.retain(|&(s, e)| e > first * BLOCK_SIZE && s < end * BLOCK_SIZE);
        (first..end)
            .map(|b| {
                let (s, e) = (b * BLOCK_SIZE, (b + 1) * BLOCK_SIZE);
                if self.overlay.overlaps(s, e)
                    || self.blocks_applying(b, b + 1)
                    || busy.iter().any(|&(bs, be)| bs < e && s < be)
                {
                    None
                } else {
                    Some(self.sums.get(b))
                }
            })
            .collect()
    }

    pub(super) fn blocks_applying(&self, first: u64, end: u64) -> bool {
        let applying = match self.applying.range(..end).next_back() {
            Some((_, &e)) => e > first,
            None => false,
        };
        let (s, e) = (first * BLOCK_SIZE, end * BLOCK_SIZE);
        applying
            || self
                .inplace
                .values()
                .any(|w| w.state == InPlaceState::Writing && w.offset < e && s < w.offset + w.len)
    }

    pub(super) fn start_read(&mut self, io: &mut dyn Io, req: ReqId) {
        let Some(r) = self.reads.get_mut(&req) else {
            return;
        };
        let (start, end) = (r.start, r.start + r.len);
        if r.len == 0 {
            let r = self.reads.remove(&req).unwrap();
            self.events.push(StoreEvent::Read(req, Ok(r.out)));
            return;
        }
        let pieces = self.overlay.pieces(start, end);
        // Gaps not covered by the overlay come from the data file.
        let mut gaps = Vec::new();
        let mut pos = start;
        for p in &pieces {
            if p.start > pos {
                gaps.push((pos, p.start));
            }
            pos = p.end;
        }
        if pos < end {
            gaps.push((pos, end));
        }
        // Merge gaps that share a block so each block is read (and verified) once.
        let mut ranges: Vec<(u64, u64)> = Vec::new();
        for (s, e) in gaps {
            let fs = s / BLOCK_SIZE * BLOCK_SIZE;
            let fe = e.div_ceil(BLOCK_SIZE) * BLOCK_SIZE;
            match ranges.last_mut() {
                Some(last) if last.1 >= fs => last.1 = last.1.max(fe),
                _ => ranges.push((fs, fe)),
            }
        }
        if ranges
            .iter()
            .any(|&(s, e)| self.blocks_applying(s / BLOCK_SIZE, e / BLOCK_SIZE))
        {
            self.deferred_reads.push(req);
            return;
        }
        let r = self.reads.get_mut(&req).unwrap();
        let head = r.head;
        for p in &pieces {
            let s = head + (p.start - start) as usize;
            let e = head + (p.end - start) as usize;
            p.content.copy_to(0, &mut r.out[s..e]);
        }
        r.epoch = self.apply_epoch;
        let media = r.media && self.media_fd.is_some();
        let direct = !media && pieces.is_empty() && ranges.len() == 1 && ranges[0] == (start, end);
        r.parts = ranges
            .iter()
            .map(|&(s, _)| ReadPart {
                file_start: s,
                buf: None,
                skip: 0,
                direct,
            })
            .collect();
        r.parts_left = ranges.len();
        // Remember which bytes the overlay provided so the data-file copy
        // does not overwrite them.
        self.read_pieces
            .insert(req, pieces.iter().map(|p| (p.start, p.end)).collect());
        if ranges.is_empty() {
            self.finish_read(io, req);
            return;
        }
        if direct {
            let out = std::mem::take(&mut r.out);
            let head = r.head;
            self.submit(
                io,
                Ctx::DataRead { read: req, part: 0 },
                Op::Read {
                    fd: self.files.data,
                    buf: out,
                    at: head,
                    offset: start,
                },
            );
            return;
        }
        for (i, (s, e)) in ranges.into_iter().enumerate() {
            let (fd, buf, at) = match self.media_fd.filter(|_| media) {
                // O_DIRECT wants a block-aligned buffer: read at the first
                // aligned address of one a block longer (`ReadPart::skip`).
                Some(fd) => {
                    let len = (e - s) as usize;
                    let mut buf: Vec<u8> = Vec::with_capacity(len + BLOCK_SIZE as usize);
                    let skip = buf.as_ptr().align_offset(BLOCK_SIZE as usize);
                    buf.resize(skip + len, 0);
                    (fd, buf, skip)
                }
                None => (self.files.data, vec![0u8; (e - s) as usize], 0),
            };
            if let Some(r) = self.reads.get_mut(&req) {
                r.parts[i].skip = at;
            }
            self.submit(
                io,
                Ctx::DataRead { read: req, part: i },
                Op::Read {
                    fd,
                    buf,
                    at,
                    offset: s,
                },
            );
        }
    }

    pub(super) fn finish_read(&mut self, io: &mut dyn Io, req: ReqId) {
        let covered = self.read_pieces.remove(&req).unwrap_or_default();
        let mut r = self.reads.remove(&req).unwrap();
        let (start, end) = (r.start, r.start + r.len);
        let mut bad: Vec<u64> = Vec::new();
        let mut marked: Vec<(u64, u64)> = Vec::new();
        let verify = r.verify;
        let sums = &self.sums;
        let failed_inplace = &self.failed_inplace;
        let mut adopt: Vec<(u64, u64)> = Vec::new();
        let mut find_bad = |file_start: u64, data: &[u8], bad: &mut Vec<u64>| {
            for (i, block) in data.chunks(BLOCK_SIZE as usize).enumerate() {
                let b = file_start / BLOCK_SIZE + i as u64;
                let fresh = checksum::block_checksum(b, block);
                if fresh != sums.get(b) {
                    if failed_inplace.iter().any(|(first, new)| {
                        b >= *first && new.get((b - first) as usize) == Some(&fresh)
                    }) {
                        adopt.push((b, fresh));
                        continue;
                    }
                    bad.push(b);
                    if sums.marked(b, fresh) {
                        marked.push((b, sums.get(b)));
                    }
                }
            }
        };
        for part in &r.parts {
            if part.direct {
                if verify {
                    find_bad(part.file_start, &r.out[r.head..], &mut bad);
                }
                continue;
            }
            let buf = &part.buf.as_ref().unwrap()[part.skip..];
            if verify {
                find_bad(part.file_start, buf, &mut bad);
            }
            // Copy the requested bytes not provided by the overlay.
            let ps = part.file_start;
            let pe = ps + buf.len() as u64;
            let mut pos = ps.max(start);
            let stop = pe.min(end);
            for &(cs, ce) in covered.iter().chain(std::iter::once(&(u64::MAX, u64::MAX))) {
                if ce <= pos {
                    continue;
                }
                let gap_end = cs.min(stop);
                if gap_end > pos {
                    let o = r.head + (pos - start) as usize;
                    let n = (gap_end - pos) as usize;
                    let b = (pos - ps) as usize;
                    r.out[o..o + n].copy_from_slice(&buf[b..b + n]);
                }
                pos = pos.max(ce);
                if pos >= stop {
                    break;
                }
            }
        }
        for (b, sum) in adopt {
            self.sums.set(b, sum);
        }
        if let Some(&block) = bad.first() {
            if r.epoch != self.apply_epoch && r.retries < 10_000 {
                // An apply batch or in-place write changed blocks under us:
                // read again. Only a mismatch with no such change is an error
                // (the cap only guards against a pathological livelock).
                r.retries += 1;
                self.reads.insert(req, r);
                self.start_read(io, req);
                return;
            }
            self.stats.checksum_failures += bad.len() as u64;
            if self.corrupt_log.allow(Instant::now()) {
                crate::elog!(
                    "nbdmirror: ERROR: block {block} (offset {}){} failed checksum verification",
                    block * BLOCK_SIZE,
                    if bad.len() > 1 {
                        format!(" and {} more blocks of the same read", bad.len() - 1)
                    } else {
                        String::new()
                    }
                );
            }
            if self.corrupt.len() >= MAX_CORRUPT_READS {
                self.corrupt.clear();
            }
            if self.marked_seen.len() < MAX_CORRUPT_READS {
                self.marked_seen.extend(marked);
            }
            self.corrupt.insert(
                req,
                CorruptRead {
                    offset: start,
                    len: r.len,
                    head: r.head,
                    blocks: bad,
                    data: if r.media { r.out } else { Vec::new() },
                },
            );
            self.events.push(StoreEvent::Read(req, Err(EIO)));
            return;
        }
        self.events.push(StoreEvent::Read(req, Ok(r.out)));
    }

    /// base:allocation extents for `[offset, offset+len)`: (length, flags).
    ///
    /// A block is reported zero only if its checksum says "all zeroes" and
    /// the data file has a hole there (or the overlay holds zeroes for it).
    /// The checksum alone is not enough: a damaged page of `meta` reads as
    /// zero checksums, and a client that trusts block status (nbdcopy,
    /// qemu-img convert) would then skip real data and make a copy with
    /// zeroes in its place, silently. Data where the table says zero is
    /// reported as data, and reading it fails verification loudly.
    pub fn block_status(
        &self,
        io: &mut dyn Io,
        offset: u64,
        len: u64,
        max_extents: usize,
    ) -> Vec<(u32, u32)> {
        let end = offset + len;
        let pieces = self.overlay.pieces(offset, end);
        // Where the data file may hold data; None: the backend cannot say,
        // and the table is trusted alone (the simulated disk).
        let data = io.data_ranges(self.files.data, offset, len, 2 * max_extents + 2);
        let mut di = 0;
        let mut out: Vec<(u32, u32)> = Vec::new();
        let mut pos = offset;
        let mut pi = 0;
        while pos < end && out.len() <= max_extents {
            let block = pos / BLOCK_SIZE;
            let bend = ((block + 1) * BLOCK_SIZE).min(end);
            while pi < pieces.len() && pieces[pi].end <= pos {
                pi += 1;
            }
            // Pieces touching [pos, bend): any data means data; zero pieces
            // read as zero; bytes outside pieces come from the data file.
            let mut any_piece = false;
            let mut any_data = false;
            let mut covered = 0u64;
            let mut i = pi;
            while i < pieces.len() && pieces[i].start < bend {
                any_piece = true;
                if matches!(pieces[i].content, Content::Data { .. }) {
                    any_data = true;
                }
                covered += pieces[i].end.min(bend) - pieces[i].start.max(pos);
                i += 1;
            }
            let hole = match &data {
                None => true,
                Some(d) => {
                    while di < d.len() && d[di].1 <= pos {
                        di += 1;
                    }
                    !(di < d.len() && d[di].0 < bend)
                }
            };
            let file_zero = hole && self.sums.get(block) == 0;
            let flags = if any_data {
                0
            } else if !any_piece && file_zero {
                nbd::consts::STATE_HOLE | nbd::consts::STATE_ZERO
            } else if covered == bend - pos || file_zero {
                nbd::consts::STATE_ZERO
            } else {
                0
            };
            let n = (bend - pos) as u32;
            match out.last_mut() {
                Some(last)
                    if last.1 == flags
                        && last.0 as u64 + n as u64 <= u32::MAX as u64 - BLOCK_SIZE =>
                {
                    last.0 += n
                }
                _ => {
                    if out.len() == max_extents {
                        break;
                    }
                    out.push((n, flags))
                }
            }
            pos = bend;
        }
        out
    }
}
