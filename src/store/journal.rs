//! The journal ring: where records go, how much room is left, and how a
//! journal is read back after a crash.
//!
//! Owns: placement of records in the ring (wrapping with a Wrap record),
//! space accounting (a record's space is reusable only after a checkpoint has
//! put it in the data file) and the recovery scan, which stops at the first
//! record that is torn, corrupt, from another epoch or out of sequence. Does
//! not decide when to sync or checkpoint (that is `store`).

use std::collections::VecDeque;
use std::os::fd::RawFd;

use super::format::{
    data_hash, RecordHeader, RecordKind, RECORD_ALIGN, RECORD_HEADER_LEN, RECORD_MAGIC,
    VOID_FLAG_SUMS,
};
use crate::io::{Io, Op};

#[derive(Debug, Clone)]
pub struct RecordSlot {
    pub seq: u64,
    pub pos: u64,
    pub span: u64,
    /// The record's bytes are in the journal file (page cache at least).
    pub written: bool,
}

#[derive(Debug)]
pub struct JournalRing {
    pub size: u64,
    /// Where the next record goes.
    pub head: u64,
    pub next_seq: u64,
    used: u64,
    /// Every record up to this sequence number is written.
    prefix: u64,
    /// Records not yet released by a checkpoint, oldest first.
    pub records: VecDeque<RecordSlot>,
}

/// Where a new record was placed; `wrap` is a filler record to write first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Placement {
    pub wrap: Option<(u64, u64, u64)>,
    pub seq: u64,
    pub pos: u64,
}

impl JournalRing {
    pub fn new(size: u64, head: u64, next_seq: u64) -> JournalRing {
        JournalRing {
            size,
            head,
            next_seq,
            used: 0,
            prefix: next_seq - 1,
            records: VecDeque::new(),
        }
    }

    pub fn used(&self) -> u64 {
        self.used
    }

    fn tail(&self) -> u64 {
        self.records.front().map(|r| r.pos).unwrap_or(self.head)
    }

    /// Reserve room for a record of `span` bytes; None if the ring is full.
    pub fn place(&mut self, span: u64) -> Option<Placement> {
        debug_assert!(span.is_multiple_of(RECORD_ALIGN) && span > 0);
        let tail = self.tail();
        let empty = self.records.is_empty();
        let fits_at_head = if empty || self.head >= tail {
            self.head + span <= self.size
        } else {
            self.head + span <= tail
        };
        let mut wrap = None;
        if !fits_at_head {
            // Only possible when the free space runs to the end of the ring.
            if !(empty || self.head >= tail) {
                return None;
            }
            let filler = self.size - self.head;
            let room_at_start = if empty { self.size } else { tail };
            if span > room_at_start || (filler > 0 && self.used + filler + span > self.size) {
                return None;
            }
            if filler > 0 {
                let seq = self.next_seq;
                // Take the filler's position before `push`, which moves the
                // head (to 0 here): the Wrap record goes at the old head, not
                // over the start of the ring (found by tests/crash_consistency).
                let pos = self.head;
                self.push(seq, pos, filler);
                wrap = Some((seq, pos, filler));
            }
            self.head = 0;
        }
        if self.used + span > self.size {
            return None;
        }
        let seq = self.next_seq;
        let pos = self.head;
        self.push(seq, pos, span);
        Some(Placement { wrap, seq, pos })
    }

    fn push(&mut self, seq: u64, pos: u64, span: u64) {
        self.records.push_back(RecordSlot {
            seq,
            pos,
            span,
            written: false,
        });
        self.used += span;
        self.next_seq = seq + 1;
        self.head = pos + span;
        if self.head == self.size {
            self.head = 0;
        }
    }

    pub fn slot_mut(&mut self, seq: u64) -> Option<&mut RecordSlot> {
        let first = self.records.front()?.seq;
        self.records.get_mut(seq.checked_sub(first)? as usize)
    }

    /// Mark record `seq` as written and return the new written prefix.
    pub fn mark_written(&mut self, seq: u64) -> u64 {
        if let Some(r) = self.slot_mut(seq) {
            r.written = true;
        }
        self.advance_prefix();
        self.prefix
    }

    fn advance_prefix(&mut self) {
        let Some(first) = self.records.front().map(|r| r.seq) else {
            self.prefix = self.next_seq - 1;
            return;
        };
        if self.prefix + 1 < first {
            self.prefix = first - 1;
        }
        while let Some(r) = self.records.get((self.prefix + 1 - first) as usize) {
            if !r.written {
                break;
            }
            self.prefix += 1;
        }
    }

    /// Highest sequence number such that it and every earlier record are
    /// written (kept up to date incrementally: O(1) to ask).
    pub fn written_prefix(&self) -> u64 {
        self.prefix
    }

    /// Position and sequence of the oldest record with seq > `seq`
    /// (or the head when there is none): the tail after a checkpoint up to `seq`.
    pub fn tail_after(&self, seq: u64) -> (u64, u64) {
        self.records
            .iter()
            .find(|r| r.seq > seq)
            .map(|r| (r.pos, r.seq))
            .unwrap_or((self.head, self.next_seq))
    }

    /// Release records up to and including `seq`.
    pub fn release_upto(&mut self, seq: u64) {
        while let Some(r) = self.records.front() {
            if r.seq > seq {
                break;
            }
            self.used -= r.span;
            self.records.pop_front();
        }
    }
}

/// A record found by the recovery scan.
#[derive(Debug)]
pub struct Recovered {
    pub header: RecordHeader,
    /// Where its header is in the ring. A Write record's data was verified
    /// by the scan but not kept (recovery would hold up to a ring's worth):
    /// [`reread_data`] reads it again.
    pub pos: u64,
}

/// Where the scan stopped and why.
#[derive(Debug)]
pub struct ScanEnd {
    pub pos: u64,
    pub next_seq: u64,
    pub reason: String,
}

/// Read the chain of records starting at (`pos`, `seq`), calling `each` for
/// every Write and Zero record in order. Stops at the first record that does
/// not verify. Never reads more than one lap of the ring.
pub fn scan(
    io: &mut dyn Io,
    fd: RawFd,
    size: u64,
    mut pos: u64,
    mut seq: u64,
    epoch: u32,
    mut each: impl FnMut(&mut dyn Io, Recovered) -> Result<(), String>,
) -> Result<ScanEnd, String> {
    let mut scanned = 0u64;
    loop {
        if scanned >= size {
            return Ok(ScanEnd {
                pos,
                next_seq: seq,
                reason: "scanned the whole ring".into(),
            });
        }
        let (buf, got) = read_at(io, fd, pos, RECORD_HEADER_LEN)?;
        let stop = |reason: String| ScanEnd {
            pos,
            next_seq: seq,
            reason,
        };
        if got < RECORD_HEADER_LEN {
            return Ok(stop("short read at end of journal".into()));
        }
        let h = match RecordHeader::decode(&buf) {
            Ok(h) => h,
            Err(e) => return Ok(stop(format!("no valid record header ({e:?})"))),
        };
        if h.epoch != epoch || h.seq != seq {
            return Ok(stop(format!(
                "record at {pos} has epoch {} seq {}, expected epoch {epoch} seq {seq}",
                h.epoch, h.seq
            )));
        }
        if pos + h.span as u64 > size {
            return Ok(stop(format!(
                "record at {pos} runs past the end of the ring"
            )));
        }
        match h.kind {
            RecordKind::Write => {
                if record_data(io, fd, pos, &h)?.is_none() {
                    return Ok(stop(format!(
                        "record {seq} at {pos} is torn (data checksum mismatch)"
                    )));
                }
                each(io, Recovered { header: h, pos })?;
            }
            RecordKind::Zero | RecordKind::InPlace => each(io, Recovered { header: h, pos })?,
            // A checksum record (docs/format.md): verified as a Write's
            // data is; one torn was never covered by a sync, so neither was
            // anything after it.
            RecordKind::Void if h.flags & VOID_FLAG_SUMS != 0 && h.length > 0 => {
                if RecordHeader::span_for(h.length as usize) > h.span {
                    return Ok(stop(format!(
                        "checksum record {seq} at {pos} claims {} bytes in a {}-byte span",
                        h.length, h.span
                    )));
                }
                // One whose data is torn is skipped, not the end: it changes
                // no data (its blocks are just not vouched for), and its
                // header, which verified, gives its span.
                if record_data(io, fd, pos, &h)?.is_some() {
                    each(io, Recovered { header: h, pos })?;
                }
            }
            RecordKind::Wrap | RecordKind::Void => {}
        }
        scanned += h.span as u64;
        seq += 1;
        pos += h.span as u64;
        if h.kind == RecordKind::Wrap || pos == size {
            pos = 0;
        }
    }
}

pub fn errno_str(errno: i32) -> String {
    std::io::Error::from_raw_os_error(errno).to_string()
}

/// A record of the same epoch found after the point where the recovery
/// scan stopped: a sign the journal is damaged in the middle, not torn at
/// its end.
#[derive(Debug, Clone, Copy)]
pub struct Stranded {
    pub seq: u64,
    pub kind: RecordKind,
    pub offset: u64,
    pub length: u64,
    /// Its data verified too (the record at the stop itself may not).
    pub intact: bool,
}

/// After `scan` stopped at `stop.pos` expecting `stop.next_seq`, look at the
/// rest of the ring (one lap, 1 MiB reads) for records of `epoch` with a
/// valid header from that sequence number on: the record at the stop (if
/// its header survived) and any later ones. A crash leaves none (or, with writeback
/// reordering, a few unflushed ones right behind the tear); damage in the
/// middle of the journal leaves every record after it.
///
/// Also returns the newest epoch above `epoch` that any record with a valid
/// header in the ring carries: epochs only grow, and a run writes records
/// only after its superblock is durable, so such a record proves that a
/// newer superblock than the one recovery started from existed (a damaged
/// superblock slot), and recovering from the older one would drop the
/// newer run's flushed writes.
pub fn stranded(
    io: &mut dyn Io,
    fd: RawFd,
    size: u64,
    stop: &ScanEnd,
    epoch: u32,
) -> Result<(Vec<Stranded>, Option<u32>), String> {
    const CHUNK: u64 = 1 << 20;
    let mut found = Vec::new();
    let mut newer: Option<u32> = None;
    let mut done = 0u64;
    let mut pos = stop.pos % size.max(1);
    while done < size {
        let n = CHUNK.min(size - pos).min(size - done);
        let (buf, got) = read_at(io, fd, pos, n as usize)?;
        let got = got.min(buf.len());
        let mut at = 0usize;
        while at + RECORD_HEADER_LEN <= got {
            if &buf[at..at + 4] == RECORD_MAGIC {
                if let Ok(h) = RecordHeader::decode(&buf[at..at + RECORD_HEADER_LEN]) {
                    if h.epoch > epoch {
                        newer = newer.max(Some(h.epoch));
                    }
                    if h.epoch == epoch && h.seq >= stop.next_seq {
                        // A read error here only means "not intact".
                        let intact = h.kind != RecordKind::Write
                            || record_data(io, fd, pos + at as u64, &h)
                                .ok()
                                .flatten()
                                .is_some();
                        found.push(Stranded {
                            seq: h.seq,
                            kind: h.kind,
                            offset: h.offset,
                            length: h.length as u64,
                            intact,
                        });
                    }
                }
            }
            at += RECORD_ALIGN as usize;
        }
        done += n;
        pos = (pos + n) % size;
    }
    found.sort_by_key(|r| r.seq);
    found.dedup_by_key(|r| r.seq);
    Ok((found, newer))
}

/// Read `len` bytes of the journal at `pos`: the buffer and how many bytes
/// the read returned.
fn read_at(io: &mut dyn Io, fd: RawFd, pos: u64, len: usize) -> Result<(Vec<u8>, usize), String> {
    let c = io.run(Op::Read {
        fd,
        buf: vec![0u8; len],
        at: 0,
        offset: pos,
    });
    if c.result < 0 {
        return Err(format!(
            "reading the journal at {pos}: {}",
            errno_str(-c.result)
        ));
    }
    let Op::Read { buf, .. } = c.op else {
        unreachable!()
    };
    Ok((buf, c.result as usize))
}

/// The data of the Write record `rec`, read from the ring again and
/// verified again.
pub fn reread_data(io: &mut dyn Io, fd: RawFd, rec: &Recovered) -> Result<Vec<u8>, String> {
    let h = &rec.header;
    record_data(io, fd, rec.pos, h)?.ok_or_else(|| {
        format!(
            "journal record {} at {} verified when recovery scanned it but not when it read it \
             again to replay it: the disk returns different bytes for the same place. Check \
             the disk",
            h.seq, rec.pos
        )
    })
}

/// The data of the Write record whose header (`h`) is at `pos`, if all of
/// it is there and matches the header's hash.
fn record_data(
    io: &mut dyn Io,
    fd: RawFd,
    pos: u64,
    h: &RecordHeader,
) -> Result<Option<Vec<u8>>, String> {
    let len = h.length as usize;
    let (buf, got) = read_at(io, fd, pos + RECORD_HEADER_LEN as u64, len)?;
    Ok((got >= len && data_hash(&buf, h.seq) == h.data_hash).then_some(buf))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// The Wrap filler goes where the head was, not at position 0 (where it
    /// used to land, over the first record of the next lap).
    #[test]
    fn wrap_filler_is_placed_at_the_old_head() {
        let a = RECORD_ALIGN;
        let mut j = JournalRing::new(8 * a, 0, 1);
        assert_eq!(j.place(5 * a).unwrap().pos, 0);
        j.release_upto(1);
        let p = j.place(4 * a).unwrap();
        assert_eq!(p.wrap, Some((2, 5 * a, 3 * a)));
        assert_eq!((p.seq, p.pos), (3, 0));
        let slots: Vec<(u64, u64, u64)> =
            j.records.iter().map(|r| (r.seq, r.pos, r.span)).collect();
        assert_eq!(slots, vec![(2, 5 * a, 3 * a), (3, 0, 4 * a)]);
    }

    proptest! {
        /// Placing, writing and releasing records never overlaps live records
        /// and never loses space.
        #[test]
        fn placements_never_overlap_live_records(spans in proptest::collection::vec(1u64..20, 1..200), release_every in 1usize..10) {
            let size = 64 * RECORD_ALIGN;
            let mut j = JournalRing::new(size, 0, 1);
            for (i, s) in spans.iter().enumerate() {
                let span = s * RECORD_ALIGN;
                if j.place(span).is_none() {
                    // Full: release everything written and retry once.
                    let last = j.records.back().map(|r| r.seq).unwrap_or(0);
                    j.release_upto(last);
                    prop_assert!(j.place(span).is_some());
                }
                let mut live: Vec<(u64, u64)> = j.records.iter().map(|r| (r.pos, r.pos + r.span)).collect();
                live.sort();
                for w in live.windows(2) {
                    prop_assert!(w[0].1 <= w[1].0, "overlap {:?}", w);
                }
                prop_assert!(live.iter().all(|&(_, e)| e <= size));
                prop_assert_eq!(j.used(), j.records.iter().map(|r| r.span).sum::<u64>());
                if i % release_every == 0 {
                    if let Some(r) = j.records.get(j.records.len() / 2).cloned() {
                        j.release_upto(r.seq);
                    }
                }
            }
        }
    }
}
