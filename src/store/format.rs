//! On-disk formats of a replica directory: the superblock and the journal
//! record header. `docs/format.md` is the prose version; keep them in step.
//!
//! Owns: byte layouts, magic numbers, the format version and their checksums.
//! Decoding is total: any byte string yields a value or a typed error, never a
//! panic. All integers are little-endian.

use xxhash_rust::xxh3::xxh3_64;

pub const FORMAT_VERSION: u32 = 1;
pub const BLOCK_SIZE: u64 = 4096;
pub const SUPERBLOCK_MAGIC: &[u8; 8] = b"NBDMIRSB";
/// Two superblock slots of this size at the start of `meta`; written alternately.
pub const SUPERBLOCK_SLOT: u64 = 4096;
/// The checksum table starts here in `meta`.
pub const CHECKSUM_TABLE_OFFSET: u64 = 2 * SUPERBLOCK_SLOT;

pub const RECORD_MAGIC: &[u8; 4] = b"NMJR";
pub const RECORD_HEADER_LEN: usize = 64;
/// Records start on this alignment inside the journal ring.
pub const RECORD_ALIGN: u64 = 512;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Superblock {
    pub version: u32,
    pub block_size: u32,
    pub volume_uuid: [u8; 16],
    pub node_id: u32,
    pub size: u64,
    pub journal_size: u64,
    /// Incremented on every superblock write; the valid slot with the highest
    /// counter wins.
    pub write_counter: u64,
    /// Journal position and sequence number of the oldest record that is not
    /// yet known to be in the data file.
    pub tail_pos: u64,
    pub tail_seq: u64,
    /// Journal incarnation: records must carry this epoch. Bumped by recovery so
    /// stale records past a tear can never be mistaken for new ones.
    pub epoch: u32,
}

#[derive(Debug, PartialEq, Eq)]
pub enum SuperblockError {
    BadMagic,
    BadChecksum,
    NewerVersion(u32),
    Invalid(&'static str),
}

impl std::fmt::Display for SuperblockError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SuperblockError::BadMagic => write!(f, "not an nbdmirror superblock (bad magic)"),
            SuperblockError::BadChecksum => write!(f, "superblock checksum mismatch (damaged)"),
            SuperblockError::NewerVersion(v) => write!(
                f,
                "format version {v} is newer than this nbdmirror understands ({FORMAT_VERSION}); upgrade nbdmirror"
            ),
            SuperblockError::Invalid(why) => write!(f, "superblock is inconsistent: {why}"),
        }
    }
}

fn get_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}
fn get_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

impl Superblock {
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SUPERBLOCK_SLOT as usize];
        b[0..8].copy_from_slice(SUPERBLOCK_MAGIC);
        b[8..12].copy_from_slice(&self.version.to_le_bytes());
        b[12..16].copy_from_slice(&self.block_size.to_le_bytes());
        b[16..32].copy_from_slice(&self.volume_uuid);
        b[32..36].copy_from_slice(&self.node_id.to_le_bytes());
        b[36..40].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.size.to_le_bytes());
        b[48..56].copy_from_slice(&self.journal_size.to_le_bytes());
        b[56..64].copy_from_slice(&self.write_counter.to_le_bytes());
        b[64..72].copy_from_slice(&self.tail_pos.to_le_bytes());
        b[72..80].copy_from_slice(&self.tail_seq.to_le_bytes());
        let n = b.len();
        let sum = xxh3_64(&b[..n - 8]);
        b[n - 8..].copy_from_slice(&sum.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8]) -> Result<Superblock, SuperblockError> {
        if b.len() < SUPERBLOCK_SLOT as usize {
            return Err(SuperblockError::BadMagic);
        }
        let b = &b[..SUPERBLOCK_SLOT as usize];
        if &b[0..8] != SUPERBLOCK_MAGIC {
            return Err(SuperblockError::BadMagic);
        }
        let n = b.len();
        if xxh3_64(&b[..n - 8]) != get_u64(b, n - 8) {
            return Err(SuperblockError::BadChecksum);
        }
        let sb = Superblock {
            version: get_u32(b, 8),
            block_size: get_u32(b, 12),
            volume_uuid: b[16..32].try_into().unwrap(),
            node_id: get_u32(b, 32),
            epoch: get_u32(b, 36),
            size: get_u64(b, 40),
            journal_size: get_u64(b, 48),
            write_counter: get_u64(b, 56),
            tail_pos: get_u64(b, 64),
            tail_seq: get_u64(b, 72),
        };
        if sb.version > FORMAT_VERSION {
            return Err(SuperblockError::NewerVersion(sb.version));
        }
        if sb.block_size as u64 != BLOCK_SIZE {
            return Err(SuperblockError::Invalid("block size is not 4096"));
        }
        if sb.size == 0 || !sb.size.is_multiple_of(BLOCK_SIZE) {
            return Err(SuperblockError::Invalid(
                "size is not a positive multiple of 4096",
            ));
        }
        if sb.journal_size < MIN_JOURNAL || !sb.journal_size.is_multiple_of(RECORD_ALIGN) {
            return Err(SuperblockError::Invalid("journal size out of range"));
        }
        if sb.tail_pos >= sb.journal_size || !sb.tail_pos.is_multiple_of(RECORD_ALIGN) {
            return Err(SuperblockError::Invalid("journal tail outside the journal"));
        }
        Ok(sb)
    }
}

/// Smallest journal accepted: room for several maximal records.
pub const MIN_JOURNAL: u64 = 4 * 1024 * 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordKind {
    /// Client data for `[offset, offset+length)` follows the header.
    Write = 1,
    /// `[offset, offset+length)` reads as zeroes (WRITE_ZEROES, TRIM).
    Zero = 2,
    /// Filler to the end of the ring; the next record is at position 0.
    Wrap = 3,
    /// A record whose write failed, rewritten so the chain stays intact; no effect.
    Void = 4,
    /// `[offset, offset+length)` was written straight to the data file; the
    /// record (durable before the data write started) names the blocks whose
    /// checksums recovery must rebuild.
    InPlace = 5,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHeader {
    pub kind: RecordKind,
    pub flags: u16,
    pub epoch: u32,
    pub seq: u64,
    pub offset: u64,
    pub length: u32,
    /// Bytes this record occupies in the ring, header and padding included.
    pub span: u32,
    pub data_hash: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum RecordError {
    BadMagic,
    BadChecksum,
    BadKind(u16),
    BadSpan,
}

impl RecordHeader {
    /// Ring bytes needed by a record carrying `data_len` bytes.
    pub fn span_for(data_len: usize) -> u32 {
        let raw = (RECORD_HEADER_LEN + data_len) as u64;
        raw.div_ceil(RECORD_ALIGN) as u32 * RECORD_ALIGN as u32
    }

    pub fn encode_into(&self, b: &mut [u8]) {
        let b = &mut b[..RECORD_HEADER_LEN];
        b.fill(0);
        b[0..4].copy_from_slice(RECORD_MAGIC);
        b[4..6].copy_from_slice(&(self.kind as u16).to_le_bytes());
        b[6..8].copy_from_slice(&self.flags.to_le_bytes());
        b[8..16].copy_from_slice(&self.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.offset.to_le_bytes());
        b[24..28].copy_from_slice(&self.length.to_le_bytes());
        b[28..32].copy_from_slice(&self.span.to_le_bytes());
        b[32..36].copy_from_slice(&self.epoch.to_le_bytes());
        b[40..48].copy_from_slice(&self.data_hash.to_le_bytes());
        let sum = xxh3_64(&b[..56]);
        b[56..64].copy_from_slice(&sum.to_le_bytes());
    }

    pub fn decode(b: &[u8]) -> Result<RecordHeader, RecordError> {
        if b.len() < RECORD_HEADER_LEN || &b[0..4] != RECORD_MAGIC {
            return Err(RecordError::BadMagic);
        }
        if xxh3_64(&b[..56]) != get_u64(b, 56) {
            return Err(RecordError::BadChecksum);
        }
        let kind = match u16::from_le_bytes([b[4], b[5]]) {
            1 => RecordKind::Write,
            2 => RecordKind::Zero,
            3 => RecordKind::Wrap,
            4 => RecordKind::Void,
            5 => RecordKind::InPlace,
            k => return Err(RecordError::BadKind(k)),
        };
        let h = RecordHeader {
            kind,
            flags: u16::from_le_bytes([b[6], b[7]]),
            seq: get_u64(b, 8),
            offset: get_u64(b, 16),
            length: get_u32(b, 24),
            span: get_u32(b, 28),
            epoch: get_u32(b, 32),
            data_hash: get_u64(b, 40),
        };
        let min = if kind == RecordKind::Write {
            RecordHeader::span_for(h.length as usize)
        } else {
            RECORD_ALIGN as u32
        };
        if h.span < min || !(h.span as u64).is_multiple_of(RECORD_ALIGN) {
            return Err(RecordError::BadSpan);
        }
        Ok(h)
    }
}

/// Void record flag: the record carries the block checksums of in-place
/// writes (docs/format.md, "Checksum records"): runs of `first block` u64,
/// `count` u64, then `count` u64 checksums; `length` is their size and
/// `data_hash` covers them as a Write record's. Older binaries skip a Void
/// record whole, so they read such a journal as before.
pub const VOID_FLAG_SUMS: u16 = 2;

/// Encode checksum runs as a [`VOID_FLAG_SUMS`] record's payload.
pub fn encode_sum_runs<'a>(runs: impl Iterator<Item = (u64, &'a [u64])>) -> Vec<u8> {
    let mut out = Vec::new();
    for (first, sums) in runs {
        out.extend_from_slice(&first.to_le_bytes());
        out.extend_from_slice(&(sums.len() as u64).to_le_bytes());
        for s in sums {
            out.extend_from_slice(&s.to_le_bytes());
        }
    }
    out
}

/// Decode a [`VOID_FLAG_SUMS`] payload into `(block, checksum)` pairs;
/// `None` if it is malformed (a run longer than what follows, a partial
/// entry).
pub fn decode_sum_runs(b: &[u8]) -> Option<Vec<(u64, u64)>> {
    let mut out = Vec::new();
    let mut at = 0usize;
    let word = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    while at < b.len() {
        if b.len() - at < 16 {
            return None;
        }
        let (first, count) = (word(at), word(at + 8));
        at += 16;
        if count > ((b.len() - at) / 8) as u64 {
            return None;
        }
        for i in 0..count as usize {
            out.push((first.checked_add(i as u64)?, word(at + 8 * i)));
        }
        at += 8 * count as usize;
    }
    Some(out)
}

pub fn data_hash(data: &[u8], seq: u64) -> u64 {
    crate::xxh3::hash_seeded(data, seq)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sb() -> Superblock {
        Superblock {
            version: FORMAT_VERSION,
            block_size: 4096,
            volume_uuid: [7; 16],
            node_id: 1,
            size: 1 << 30,
            journal_size: 64 << 20,
            write_counter: 3,
            tail_pos: 512,
            tail_seq: 9,
            epoch: 2,
        }
    }

    #[test]
    fn superblock_round_trips() {
        assert_eq!(Superblock::decode(&sb().encode()).unwrap(), sb());
    }

    #[test]
    fn superblock_with_flipped_bit_is_rejected() {
        let mut b = sb().encode();
        b[70] ^= 1;
        assert_eq!(Superblock::decode(&b), Err(SuperblockError::BadChecksum));
    }

    #[test]
    fn newer_format_is_refused() {
        let mut s = sb();
        s.version = FORMAT_VERSION + 1;
        assert_eq!(
            Superblock::decode(&s.encode()),
            Err(SuperblockError::NewerVersion(FORMAT_VERSION + 1))
        );
    }

    #[test]
    fn record_header_round_trips_and_detects_damage() {
        let h = RecordHeader {
            kind: RecordKind::Write,
            flags: 0,
            epoch: 1,
            seq: 42,
            offset: 8192,
            length: 4096,
            span: RecordHeader::span_for(4096),
            data_hash: 5,
        };
        let mut b = [0u8; 64];
        h.encode_into(&mut b);
        assert_eq!(RecordHeader::decode(&b).unwrap(), h);
        b[20] ^= 0x10;
        assert_eq!(RecordHeader::decode(&b), Err(RecordError::BadChecksum));
    }

    /// Checksum-record payloads round-trip, and malformed ones (a run
    /// longer than what follows, a partial entry, a block number that
    /// overflows) are refused rather than read past their end.
    #[test]
    fn sum_runs_round_trip_and_malformed_ones_are_refused() {
        let a = [1u64, 2, 3];
        let b = [9u64];
        let enc = encode_sum_runs([(10u64, &a[..]), (500, &b[..])].into_iter());
        assert_eq!(enc.len(), 16 * 2 + 8 * 4);
        assert_eq!(
            decode_sum_runs(&enc).unwrap(),
            vec![(10, 1), (11, 2), (12, 3), (500, 9)]
        );
        assert_eq!(decode_sum_runs(&[]).unwrap(), vec![]);
        for cut in 1..enc.len() {
            if cut == 16 + 24 {
                continue; // a whole first run: valid
            }
            assert_eq!(decode_sum_runs(&enc[..cut]), None, "cut at {cut}");
        }
        let mut long = enc.clone();
        long[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert_eq!(decode_sum_runs(&long), None);
        let over = encode_sum_runs([(u64::MAX, &a[..])].into_iter());
        assert_eq!(decode_sum_runs(&over), None);
    }
}
