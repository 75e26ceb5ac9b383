//! Payloads of the replication frames (Record, SummedRecord, Ack, Flush,
//! FlushAck, Ping, Pong, SumsRequest, Sums, BlockRequest, BlockData)
//! exchanged after the peer handshake. docs/peer-protocol.md
//! ("Replication") is the specification.
//!
//! Owns: encoding and strict decoding of those payloads. A payload that does
//! not decode is a protocol error: the receiver drops the connection.

use crate::store::checksum::block_checksum;
use crate::store::format::BLOCK_SIZE;

pub const RECORD_HEADER: usize = 64;

pub const KIND_WRITE: u8 = 1;
pub const KIND_ZERO: u8 = 2;
pub const KIND_TRIM: u8 = 3;

pub const FLAG_FUA: u8 = 1;
pub const FLAG_NO_HOLE: u8 = 2;
/// Sent by resync rather than by a client write (informational).
pub const FLAG_RESYNC: u8 = 4;

/// The fixed part of a Record. For KIND_WRITE the data (`length` bytes)
/// follows the 64-byte header in the same payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub id: u64,
    pub offset: u64,
    pub length: u32,
    pub kind: u8,
    pub flags: u8,
}

impl RecordHeader {
    pub fn encode(&self) -> [u8; RECORD_HEADER] {
        let mut h = [0u8; RECORD_HEADER];
        h[0..8].copy_from_slice(&self.id.to_le_bytes());
        h[8..16].copy_from_slice(&self.offset.to_le_bytes());
        h[16..20].copy_from_slice(&self.length.to_le_bytes());
        h[20] = self.kind;
        h[21] = self.flags;
        h
    }

    /// Decode and check a Record payload against a disk of `size` bytes.
    pub fn decode(p: &[u8], size: u64) -> Result<RecordHeader, String> {
        let h = Self::parse(p)?;
        let data = p.len() - RECORD_HEADER;
        match h.kind {
            KIND_WRITE if data != h.length as usize => {
                return Err(format!(
                    "Record declares {} bytes but carries {data}",
                    h.length
                ))
            }
            KIND_ZERO | KIND_TRIM if data != 0 => {
                return Err("zero/trim Record carries data".into())
            }
            _ => {}
        }
        h.check_range(size)?;
        Ok(h)
    }

    /// The header at the start of a Record or SummedRecord payload, with
    /// its reserved bytes, flags and kind checked.
    fn parse(p: &[u8]) -> Result<RecordHeader, String> {
        if p.len() < RECORD_HEADER {
            return Err(format!("Record payload of {} bytes is too short", p.len()));
        }
        let h = RecordHeader {
            id: u64::from_le_bytes(p[0..8].try_into().unwrap()),
            offset: u64::from_le_bytes(p[8..16].try_into().unwrap()),
            length: u32::from_le_bytes(p[16..20].try_into().unwrap()),
            kind: p[20],
            flags: p[21],
        };
        if p[22..RECORD_HEADER].iter().any(|&b| b != 0) {
            return Err("Record header has nonzero reserved bytes".into());
        }
        if h.flags & !(FLAG_FUA | FLAG_NO_HOLE | FLAG_RESYNC) != 0 {
            return Err(format!("Record has unknown flags {:#x}", h.flags));
        }
        match h.kind {
            KIND_WRITE | KIND_ZERO | KIND_TRIM => Ok(h),
            k => Err(format!("Record has unknown kind {k}")),
        }
    }

    fn check_range(&self, size: u64) -> Result<(), String> {
        let h = self;
        if h.length == 0
            || h.offset
                .checked_add(h.length as u64)
                .is_none_or(|e| e > size)
        {
            return Err(format!(
                "Record addresses bytes {}..+{} outside the {size}-byte disk",
                h.offset, h.length
            ));
        }
        Ok(())
    }
}

/// Bytes of disk each block checksum of a SummedRecord covers: the store's
/// block.
pub const SUMMED_BLOCK: u64 = BLOCK_SIZE;

// The frame layer's coverage rule (`peer::frame::covered_len`) assumes the
// same record header and block sizes.
const _: () = assert!(
    crate::peer::frame::SUMMED_HEAD == RECORD_HEADER
        && crate::peer::frame::SUMMED_BLOCK as u64 == SUMMED_BLOCK
);

/// Whether a write of `len` bytes at `offset` can go as a SummedRecord: it
/// covers whole blocks.
pub fn summable(offset: u64, len: u64) -> bool {
    len > 0 && offset.is_multiple_of(SUMMED_BLOCK) && len.is_multiple_of(SUMMED_BLOCK)
}

/// The block checksums (`store::checksum::checksums_of`) in SummedRecord
/// form (after the record header).
pub fn encode_block_sums(sums: &[u64]) -> Vec<u8> {
    sums.iter().flat_map(|s| s.to_le_bytes()).collect()
}

/// A decoded SummedRecord payload: a write of whole blocks, the checksum
/// of each, and where its data starts in the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SummedRecord {
    pub header: RecordHeader,
    pub sums: Vec<u64>,
    pub data_at: usize,
}

/// Decode and check a SummedRecord payload (record header, then one u64
/// block checksum per 4 KiB block of the write, then its data) against a
/// disk of `size` bytes. The data is not checked against the block
/// checksums here: [`verify_block_sums`] does that, and must, before the
/// data is used (the frame checksum does not cover it).
pub fn decode_summed(p: &[u8], size: u64) -> Result<SummedRecord, String> {
    let h = RecordHeader::parse(p)?;
    if h.kind != KIND_WRITE {
        return Err(format!(
            "SummedRecord of kind {} (only writes are summed)",
            h.kind
        ));
    }
    if !summable(h.offset, h.length as u64) {
        return Err(format!(
            "SummedRecord for bytes {}..+{} is not whole 4 KiB blocks",
            h.offset, h.length
        ));
    }
    h.check_range(size)?;
    let n = h.length as usize / SUMMED_BLOCK as usize;
    let data_at = RECORD_HEADER + 8 * n;
    if p.len() != data_at + h.length as usize {
        return Err(format!(
            "SummedRecord of {} bytes carries {} bytes, expected {}",
            h.length,
            p.len(),
            data_at + h.length as usize
        ));
    }
    let sums = p[RECORD_HEADER..data_at]
        .chunks(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok(SummedRecord {
        header: h,
        sums,
        data_at,
    })
}

/// Check a SummedRecord's data (`payload[r.data_at..]`) against its block
/// checksums: a mismatch is data damaged in transit (or a peer computing
/// block checksums another way), and the connection must be dropped.
pub fn verify_block_sums(r: &SummedRecord, payload: &[u8]) -> Result<(), String> {
    let first = r.header.offset / SUMMED_BLOCK;
    let data = &payload[r.data_at..];
    for (i, (b, &sent)) in data.chunks(SUMMED_BLOCK as usize).zip(&r.sums).enumerate() {
        let got = block_checksum(first + i as u64, b);
        if got != sent {
            return Err(format!(
                "record {}: block {} (disk bytes {}..+4096) does not match the checksum sent \
                 with it ({sent:016x}, the data hashes to {got:016x}): the data was corrupted \
                 in transit, dropping the connection",
                r.header.id,
                first + i as u64,
                (first + i as u64) * SUMMED_BLOCK
            ));
        }
    }
    Ok(())
}

/// Ack and FlushAck: the id answered and an errno (0 = success).
pub fn encode_answer(id: u64, errno: u32) -> [u8; 12] {
    let mut b = [0u8; 12];
    b[0..8].copy_from_slice(&id.to_le_bytes());
    b[8..12].copy_from_slice(&errno.to_le_bytes());
    b
}

pub fn decode_answer(p: &[u8]) -> Result<(u64, u32), String> {
    if p.len() != 12 {
        return Err(format!("answer payload of {} bytes, expected 12", p.len()));
    }
    Ok((
        u64::from_le_bytes(p[0..8].try_into().unwrap()),
        u32::from_le_bytes(p[8..12].try_into().unwrap()),
    ))
}

/// Flush, Ping and Pong carry one u64.
pub fn decode_u64(p: &[u8], what: &str) -> Result<u64, String> {
    if p.len() != 8 {
        return Err(format!("{what} payload of {} bytes, expected 8", p.len()));
    }
    Ok(u64::from_le_bytes(p.try_into().unwrap()))
}

/// Generation flag: the frame only tells the primary's run, the peer is
/// not in sync (it records the run if it holds that generation).
pub const GEN_RUN_ONLY: u32 = 1;

/// A Generation frame: the primary's generation, its run (None before
/// protocol version 6) and flags.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenerationFrame {
    pub generation: u64,
    pub run: Option<u32>,
    pub run_only: bool,
}

/// Generation: `generation u64` (before protocol version 6), or
/// `generation u64, run u32, flags u32` (`GEN_RUN_ONLY`; other bits 0).
pub fn decode_generation(p: &[u8]) -> Result<GenerationFrame, String> {
    // 0 means "none": a primary always has one (its fresh ones are odd),
    // and a replica told it holds none would say so while full of data.
    if p.len() >= 8 && p[..8] == [0; 8] {
        return Err("Generation payload names generation 0 (none)".into());
    }
    match p.len() {
        8 => Ok(GenerationFrame {
            generation: u64::from_le_bytes(p.try_into().unwrap()),
            run: None,
            run_only: false,
        }),
        16 => {
            let flags = u32::from_le_bytes(p[12..16].try_into().unwrap());
            if flags & !GEN_RUN_ONLY != 0 {
                return Err(format!("Generation payload with unknown flags {flags:#x}"));
            }
            Ok(GenerationFrame {
                generation: u64::from_le_bytes(p[0..8].try_into().unwrap()),
                run: Some(u32::from_le_bytes(p[8..12].try_into().unwrap())),
                run_only: flags & GEN_RUN_ONLY != 0,
            })
        }
        n => Err(format!("Generation payload of {n} bytes, expected 8 or 16")),
    }
}

/// A Generation payload for a session at protocol `version` (None: that
/// version has no run-only frame).
pub fn encode_generation(g: u64, run: u32, version: u16, run_only: bool) -> Option<Vec<u8>> {
    let mut b = g.to_le_bytes().to_vec();
    if version >= RUN_VERSION {
        b.extend_from_slice(&run.to_le_bytes());
        b.extend_from_slice(&(if run_only { GEN_RUN_ONLY } else { 0 }).to_le_bytes());
    } else if run_only {
        return None;
    }
    Some(b)
}

/// The peer protocol version whose Generation frames carry the run.
pub const RUN_VERSION: u16 = 6;

/// Most blocks one SumsRequest may ask for.
pub const MAX_SUMS: u32 = 4096;

/// SumsRequest: `id u64, first block u64, count u32`.
pub fn encode_sums_request(id: u64, first: u64, n: u32) -> [u8; 20] {
    let mut b = [0u8; 20];
    b[0..8].copy_from_slice(&id.to_le_bytes());
    b[8..16].copy_from_slice(&first.to_le_bytes());
    b[16..20].copy_from_slice(&n.to_le_bytes());
    b
}

pub fn decode_sums_request(p: &[u8], blocks: u64) -> Result<(u64, u64, u32), String> {
    decode_range_request(p, blocks, MAX_SUMS, "SumsRequest")
}

/// `id u64, first block u64, count u32` for 1..=`max` blocks inside a disk
/// of `blocks` blocks (SumsRequest, BlockRequest).
fn decode_range_request(
    p: &[u8],
    blocks: u64,
    max: u32,
    what: &str,
) -> Result<(u64, u64, u32), String> {
    if p.len() != 20 {
        return Err(format!("{what} payload of {} bytes, expected 20", p.len()));
    }
    let id = u64::from_le_bytes(p[0..8].try_into().unwrap());
    let first = u64::from_le_bytes(p[8..16].try_into().unwrap());
    let n = u32::from_le_bytes(p[16..20].try_into().unwrap());
    if n == 0 || n > max || first.checked_add(n as u64).is_none_or(|e| e > blocks) {
        return Err(format!(
            "{what} for blocks {first}..+{n} outside the disk (or over {max})"
        ));
    }
    Ok((id, first, n))
}

/// Sums: the request's `id u64, first u64, count u32`, then `count` u64
/// checksums (u64::MAX = not settled, compare as different).
pub fn encode_sums(id: u64, first: u64, sums: &[u64]) -> Vec<u8> {
    let mut b = Vec::with_capacity(20 + sums.len() * 8);
    b.extend_from_slice(&encode_sums_request(id, first, sums.len() as u32));
    for s in sums {
        b.extend_from_slice(&s.to_le_bytes());
    }
    b
}

pub fn decode_sums(p: &[u8]) -> Result<(u64, u64, Vec<u64>), String> {
    if p.len() < 20 {
        return Err("Sums payload too short".into());
    }
    let id = u64::from_le_bytes(p[0..8].try_into().unwrap());
    let first = u64::from_le_bytes(p[8..16].try_into().unwrap());
    let n = u32::from_le_bytes(p[16..20].try_into().unwrap()) as usize;
    if p.len() != 20 + n * 8 {
        return Err(format!(
            "Sums declares {n} checksums but carries {} bytes",
            p.len() - 20
        ));
    }
    let sums = p[20..]
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap()))
        .collect();
    Ok((id, first, sums))
}

/// Most blocks one VerifyRequest may ask for (1 MiB).
pub const MAX_VERIFY_BLOCKS: u32 = 256;

/// In a Verified frame: the block failed verification against the
/// secondary's own checksum table (rot on its disk), or could not be read.
pub const BAD_SUM: u64 = u64::MAX - 1;

/// VerifyRequest: `id u64, first block u64, count u32`, as SumsRequest.
/// Answered by Verified, laid out as Sums: the checksum of each block as
/// read now (`BAD_SUM` for one that failed verification, `u64::MAX` for
/// one whose state is not settled).
pub fn decode_verify_request(p: &[u8], blocks: u64) -> Result<(u64, u64, u32), String> {
    decode_range_request(p, blocks, MAX_VERIFY_BLOCKS, "VerifyRequest")
}

/// Most blocks one BlockRequest may ask for (1 MiB).
pub const MAX_REPAIR_BLOCKS: u32 = 256;

/// BlockRequest: `id u64, first block u64, count u32`, as SumsRequest.
pub fn encode_block_request(id: u64, first: u64, n: u32) -> [u8; 20] {
    encode_sums_request(id, first, n)
}

pub fn decode_block_request(p: &[u8], blocks: u64) -> Result<(u64, u64, u32), String> {
    decode_range_request(p, blocks, MAX_REPAIR_BLOCKS, "BlockRequest")
}

/// BlockData header: `id u64, errno u32, reserved u32 = 0`; with errno 0
/// the data of the blocks asked for follows, else nothing.
pub const BLOCK_DATA_HEADER: usize = 16;

pub fn encode_block_data_header(id: u64, errno: u32) -> [u8; BLOCK_DATA_HEADER] {
    let mut b = [0u8; BLOCK_DATA_HEADER];
    b[0..8].copy_from_slice(&id.to_le_bytes());
    b[8..12].copy_from_slice(&errno.to_le_bytes());
    b
}

/// (id, errno, data) of a BlockData payload; the caller checks the data's
/// length against what it asked for.
pub fn decode_block_data(p: &[u8]) -> Result<(u64, u32, &[u8]), String> {
    if p.len() < BLOCK_DATA_HEADER {
        return Err(format!(
            "BlockData payload of {} bytes is too short",
            p.len()
        ));
    }
    let id = u64::from_le_bytes(p[0..8].try_into().unwrap());
    let errno = u32::from_le_bytes(p[8..12].try_into().unwrap());
    if p[12..16] != [0; 4] {
        return Err("BlockData has nonzero reserved bytes".into());
    }
    let data = &p[BLOCK_DATA_HEADER..];
    if errno != 0 && !data.is_empty() {
        return Err("BlockData with an error carries data".into());
    }
    Ok((id, errno, data))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generation_zero_is_refused() {
        for v in [RUN_VERSION - 1, RUN_VERSION] {
            let b = encode_generation(0, 3, v, false).unwrap();
            assert!(decode_generation(&b).unwrap_err().contains("generation 0"));
            let b = encode_generation(5, 3, v, false).unwrap();
            assert_eq!(decode_generation(&b).unwrap().generation, 5);
        }
    }

    #[test]
    fn record_round_trip_and_rejects() {
        let h = RecordHeader {
            id: 9,
            offset: 4096,
            length: 8,
            kind: KIND_WRITE,
            flags: FLAG_FUA,
        };
        let mut p = h.encode().to_vec();
        p.extend_from_slice(&[1; 8]);
        assert_eq!(RecordHeader::decode(&p, 1 << 20), Ok(h));
        // Past the end of the disk.
        assert!(RecordHeader::decode(&p, 4100).is_err());
        // Length mismatch.
        assert!(RecordHeader::decode(&p[..p.len() - 1], 1 << 20).is_err());
        // Unknown kind, flags, reserved bytes.
        for (i, v) in [(20, 9u8), (21, 0x80), (40, 1)] {
            let mut q = p.clone();
            q[i] = v;
            assert!(RecordHeader::decode(&q, 1 << 20).is_err(), "byte {i}");
        }
        let z = RecordHeader {
            kind: KIND_ZERO,
            ..h
        };
        assert!(RecordHeader::decode(&z.encode(), 1 << 20).is_ok());
        assert!(decode_answer(&encode_answer(3, 5)) == Ok((3, 5)));
        assert!(decode_answer(&[0; 11]).is_err());
        let r = encode_sums_request(4, 10, 5);
        assert_eq!(decode_sums_request(&r, 15), Ok((4, 10, 5)));
        assert!(decode_sums_request(&r, 14).is_err());
        assert!(decode_sums_request(&encode_sums_request(4, 0, 0), 15).is_err());
        let s = encode_sums(4, 10, &[1, 2, u64::MAX]);
        assert_eq!(decode_sums(&s), Ok((4, 10, vec![1, 2, u64::MAX])));
        assert!(decode_sums(&s[..s.len() - 1]).is_err());
        let r = encode_block_request(6, 10, 5);
        assert_eq!(decode_block_request(&r, 15), Ok((6, 10, 5)));
        assert!(decode_block_request(&r, 14).is_err());
        assert!(decode_block_request(&encode_block_request(6, 0, 257), 1000).is_err());
        let mut d = encode_block_data_header(6, 0).to_vec();
        d.extend_from_slice(&[7; 4096]);
        assert_eq!(decode_block_data(&d), Ok((6, 0, &[7u8; 4096][..])));
        assert_eq!(
            decode_block_data(&encode_block_data_header(6, 5)),
            Ok((6, 5, &[][..]))
        );
        let mut e = encode_block_data_header(6, 5).to_vec();
        e.push(1);
        assert!(decode_block_data(&e).is_err());
        d[13] = 1;
        assert!(decode_block_data(&d).is_err());
    }

    #[test]
    fn summed_record_round_trip_verify_and_rejects() {
        let data: Vec<u8> = (0..3 * 4096).map(|i| (i % 253) as u8 + 1).collect();
        let mut data = data;
        data[4096..8192].fill(0); // a zero block sums to 0
        let h = RecordHeader {
            id: 4,
            offset: 8192,
            length: data.len() as u32,
            kind: KIND_WRITE,
            flags: FLAG_FUA,
        };
        let sums = crate::store::checksum::checksums_of(2, &data);
        assert_eq!(sums[1], 0);
        assert_eq!(sums[0], block_checksum(2, &data[..4096]));
        let mut p = h.encode().to_vec();
        p.extend_from_slice(&encode_block_sums(&sums));
        p.extend_from_slice(&data);
        assert_eq!(
            crate::peer::frame::covered_len(
                crate::peer::frame::FrameKind::SummedRecord.code(),
                p.len()
            ),
            RECORD_HEADER + 24
        );
        let r = decode_summed(&p, 1 << 20).unwrap();
        assert_eq!(
            (r.header, &r.sums, r.data_at),
            (h, &sums, RECORD_HEADER + 24)
        );
        verify_block_sums(&r, &p).unwrap();
        // Damaged data, or blocks swapped, fail the check and name the block.
        for at in [r.data_at, r.data_at + 4096 + 7, p.len() - 1] {
            let mut q = p.clone();
            q[at] ^= 0x40;
            let e = verify_block_sums(&decode_summed(&q, 1 << 20).unwrap(), &q).unwrap_err();
            let block = 2 + (at - r.data_at) / 4096;
            assert!(e.contains(&format!("block {block} ")), "{e}");
        }
        let mut q = p.clone();
        let (a, b) = q[r.data_at..].split_at_mut(4096);
        a.swap_with_slice(&mut b[4096..8192]);
        assert!(verify_block_sums(&decode_summed(&q, 1 << 20).unwrap(), &q).is_err());
        // Unaligned, not a write, past the disk, wrong lengths.
        let bad = |f: &dyn Fn(&mut RecordHeader)| {
            let mut g = h;
            f(&mut g);
            let mut q = g.encode().to_vec();
            q.extend_from_slice(&p[RECORD_HEADER..]);
            decode_summed(&q, 1 << 20).unwrap_err()
        };
        bad(&|g| g.offset = 8192 + 512);
        bad(&|g| g.length -= 512);
        bad(&|g| g.kind = KIND_ZERO);
        bad(&|g| g.offset = (1 << 20) - 4096);
        bad(&|g| g.length = 4096);
        assert!(decode_summed(&p[..p.len() - 1], 1 << 20).is_err());
        assert!(decode_summed(&p[..10], 1 << 20).is_err());
        assert!(summable(0, 4096) && !summable(0, 0) && !summable(512, 4096));
    }
}
