//! The read overlay: client writes that are in the journal but not yet in the
//! data file, as non-overlapping byte extents tagged with their sequence number.
//!
//! Owns: which bytes of the disk are newer in memory than on the data file.
//! Reads consult it first; the applier drains it. An insert never replaces a
//! newer extent with older data, so whatever order journal writes complete in,
//! the newest sequence number wins. Never does I/O.

use std::collections::BTreeMap;
use std::sync::Arc;

#[derive(Clone, Debug)]
pub enum Content {
    /// Bytes start at `buf[at]` for the extent's start.
    Data { buf: Arc<Vec<u8>>, at: usize },
    /// Zeroes; `provision`: the client asked for the space to stay
    /// allocated (WRITE_ZEROES with NO_HOLE), so no hole may be punched.
    Zero { provision: bool },
}

impl Content {
    fn advance(&self, by: u64) -> Content {
        match self {
            Content::Data { buf, at } => Content::Data {
                buf: buf.clone(),
                at: at + by as usize,
            },
            Content::Zero { provision } => Content::Zero {
                provision: *provision,
            },
        }
    }

    /// Copy `len` bytes of this content (starting `skip` bytes in) to `out`.
    pub fn copy_to(&self, skip: u64, out: &mut [u8]) {
        match self {
            Content::Data { buf, at } => {
                let s = at + skip as usize;
                out.copy_from_slice(&buf[s..s + out.len()]);
            }
            Content::Zero { .. } => out.fill(0),
        }
    }
}

#[derive(Clone, Debug)]
pub struct Extent {
    pub end: u64,
    pub seq: u64,
    pub content: Content,
}

/// A clipped view of an extent: `[start, end)` with content starting at `start`.
#[derive(Clone, Debug)]
pub struct Piece {
    pub start: u64,
    pub end: u64,
    pub seq: u64,
    pub content: Content,
}

#[derive(Default)]
pub struct Overlay {
    map: BTreeMap<u64, Extent>,
    bytes: u64,
}

impl Overlay {
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Bytes of disk currently covered.
    pub fn covered_bytes(&self) -> u64 {
        self.bytes
    }

    fn take_overlapping(&mut self, start: u64, end: u64) -> Vec<(u64, Extent)> {
        let mut keys = Vec::new();
        if let Some((&k, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                keys.push(k);
            }
        }
        keys.extend(self.map.range(start..end).map(|(&k, _)| k));
        keys.into_iter()
            .map(|k| {
                let e = self.map.remove(&k).unwrap();
                self.bytes -= e.end - k;
                (k, e)
            })
            .collect()
    }

    fn put(&mut self, start: u64, end: u64, seq: u64, content: Content) {
        if start < end {
            self.bytes += end - start;
            self.map.insert(start, Extent { end, seq, content });
        }
    }

    /// Record that `[start, end)` holds `content` as of `seq`. Parts already
    /// covered by a newer sequence number keep their newer content.
    pub fn insert(&mut self, start: u64, end: u64, seq: u64, content: Content) {
        if start >= end {
            return;
        }
        // The common case (random writes over a large disk): nothing there
        // yet. Two lookups and an insert, no vectors.
        if !self.overlaps(start, end) {
            self.put(start, end, seq, content);
            return;
        }
        let old = self.take_overlapping(start, end);
        let mut newer: Vec<(u64, u64)> = Vec::new();
        for (es, e) in old {
            if e.seq > seq {
                newer.push((es.max(start), e.end.min(end)));
                self.put(es, e.end, e.seq, e.content);
            } else {
                if es < start {
                    self.put(es, start, e.seq, e.content.clone());
                }
                if e.end > end {
                    self.put(end, e.end, e.seq, e.content.advance(end - es));
                }
            }
        }
        newer.sort_unstable();
        let mut pos = start;
        for (ns, ne) in newer {
            if ns > pos {
                self.put(pos, ns, seq, content.advance(pos - start));
            }
            pos = pos.max(ne);
        }
        if pos < end {
            self.put(pos, end, seq, content.advance(pos - start));
        }
    }

    /// Whether any extent overlaps `[start, end)`.
    pub fn overlaps(&self, start: u64, end: u64) -> bool {
        if let Some((_, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                return true;
            }
        }
        self.map.range(start..end).next().is_some()
    }

    /// Pieces overlapping `[start, end)`, clipped to it, in offset order.
    pub fn pieces(&self, start: u64, end: u64) -> Vec<Piece> {
        let mut out = Vec::new();
        if let Some((&k, e)) = self.map.range(..start).next_back() {
            if e.end > start {
                out.push(Piece {
                    start,
                    end: e.end.min(end),
                    seq: e.seq,
                    content: e.content.advance(start - k),
                });
            }
        }
        for (&k, e) in self.map.range(start..end) {
            out.push(Piece {
                start: k,
                end: e.end.min(end),
                seq: e.seq,
                content: e.content.clone(),
            });
        }
        out
    }

    /// The newest sequence number held (0 when empty).
    pub fn max_seq(&self) -> u64 {
        self.map.values().map(|e| e.seq).max().unwrap_or(0)
    }

    /// Every piece with `seq <= max_seq`, in offset order.
    pub fn pieces_upto(&self, max_seq: u64) -> Vec<Piece> {
        self.map
            .iter()
            .filter(|(_, e)| e.seq <= max_seq)
            .map(|(&k, e)| Piece {
                start: k,
                end: e.end,
                seq: e.seq,
                content: e.content.clone(),
            })
            .collect()
    }

    /// Drop the parts of `[start, end)` whose sequence number is `<= max_seq`
    /// (they are now in the data file).
    pub fn remove_upto(&mut self, start: u64, end: u64, max_seq: u64) {
        // The common case: exactly the extent the write made. Extents do not
        // overlap, so no other one can reach into `[start, end)`.
        if let Some(e) = self.map.get(&start) {
            if e.end == end && e.seq <= max_seq {
                self.map.remove(&start);
                self.bytes -= end - start;
                return;
            }
        }
        for (es, e) in self.take_overlapping(start, end) {
            if e.seq > max_seq {
                self.put(es, e.end, e.seq, e.content);
                continue;
            }
            if es < start {
                self.put(es, start, e.seq, e.content.clone());
            }
            if e.end > end {
                self.put(end, e.end, e.seq, e.content.advance(end - es));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn read(o: &Overlay, base: &[u8], start: u64, end: u64) -> Vec<u8> {
        let mut out = base[start as usize..end as usize].to_vec();
        for p in o.pieces(start, end) {
            let s = (p.start - start) as usize;
            let e = (p.end - start) as usize;
            p.content.copy_to(0, &mut out[s..e]);
        }
        out
    }

    proptest! {
        /// Inserting writes in any order yields, for every byte, the value of
        /// the write with the highest sequence number that covers it.
        #[test]
        fn newest_sequence_wins_whatever_the_insert_order(
            writes in proptest::collection::vec((0u64..200, 1u64..60, any::<u8>()), 1..30),
            order_seed in any::<u64>(),
        ) {
            let size = 300usize;
            let mut model = vec![0u8; size];
            for (s, l, v) in &writes {
                let e = (*s + *l).min(size as u64);
                model[*s as usize..e as usize].fill(*v);
            }
            let mut idx: Vec<usize> = (0..writes.len()).collect();
            let mut x = order_seed | 1;
            for i in (1..idx.len()).rev() {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17;
                idx.swap(i, (x % (i as u64 + 1)) as usize);
            }
            let mut o = Overlay::default();
            for i in idx {
                let (s, l, v) = writes[i];
                let e = (s + l).min(size as u64);
                let buf = Arc::new(vec![v; (e - s) as usize]);
                let content = if v == 0 { Content::Zero { provision: i % 2 == 0 } } else { Content::Data { buf, at: 0 } };
                o.insert(s, e, i as u64 + 1, content);
            }
            let base = vec![0u8; size];
            prop_assert_eq!(read(&o, &base, 0, size as u64), model.clone());
            // Removing everything up to some seq and applying it to the base
            // keeps reads the same.
            let cut = writes.len() as u64 / 2;
            let mut base2 = base.clone();
            for p in o.pieces_upto(cut) {
                p.content.copy_to(0, &mut base2[p.start as usize..p.end as usize]);
            }
            // Removed write by write (the applier's way: each write's own
            // range, hitting the exact-extent fast path where it can).
            let mut o2 = Overlay::default();
            for p in o.pieces(0, size as u64) {
                o2.insert(p.start, p.end, p.seq, p.content.clone());
            }
            for (i, (s, l, _)) in writes.iter().enumerate() {
                if (i as u64) < cut {
                    o2.remove_upto(*s, (*s + *l).min(size as u64), cut);
                }
            }
            o.remove_upto(0, size as u64, cut);
            prop_assert_eq!(read(&o, &base2, 0, size as u64), model.clone());
            prop_assert_eq!(read(&o2, &base2, 0, size as u64), model);
            prop_assert_eq!(o.covered_bytes(), o2.covered_bytes());
        }
    }
}
