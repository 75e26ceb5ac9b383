//! Offline verification of a stopped replica (`nbdmirror check`): every
//! block of `data` read back and compared with its checksum in `meta`, so
//! latent corruption is found before a client reads it. Only reads; owns no
//! on-disk structure. A replica whose journal still holds records past the
//! superblock's tail (the node did not stop cleanly) is refused: its `data`
//! and checksums match only once recovery has applied them.

use super::checksum::{block_checksum, CORRUPT_MARK};
use super::format::BLOCK_SIZE;
use super::journal;
use super::{check_table_memory, load_superblock, read_blocking, read_checksum_table, Files};
use crate::io::Io;

/// Blocks read per request.
const CHUNK_BLOCKS: u64 = 256;
/// Bad blocks listed one by one; the rest are only counted.
pub const LISTED: usize = 100;

#[derive(Debug, Default)]
pub struct Report {
    /// Blocks checked (the whole disk).
    pub blocks: u64,
    /// Blocks whose bytes do not match their checksum.
    pub bad: u64,
    /// Of those, blocks already marked corrupt (a partial write found
    /// them corrupt earlier; reads of them fail).
    pub known: u64,
    /// The first `LISTED` bad blocks: (block, already marked).
    pub listed: Vec<(u64, bool)>,
}

/// Check every block of the replica whose files are `files`;
/// `progress(done_bytes, total_bytes)` is called after every chunk.
pub fn check(
    io: &mut dyn Io,
    files: Files,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<Report, String> {
    let sb = load_superblock(io, files.meta)?;
    // Before the journal scan: a disk too large is refused at once.
    check_table_memory(sb.size)?;
    let mut pending = 0u64;
    journal::scan(
        io,
        files.journal,
        sb.journal_size,
        sb.tail_pos,
        sb.tail_seq,
        sb.epoch,
        |_, _| {
            pending += 1;
            Ok(())
        },
    )?;
    if pending > 0 {
        return Err(format!(
            "the journal holds {pending} records past the last checkpoint (the node did not \
             stop cleanly), so `data` and its checksums do not match yet: start the node and \
             stop it once (recovery applies them), then check again"
        ));
    }
    let blocks = sb.size / BLOCK_SIZE;
    let sums = read_checksum_table(io, files.meta, sb.size)?;
    let mut report = Report {
        blocks,
        ..Report::default()
    };
    let mut b = 0u64;
    while b < blocks {
        let n = (blocks - b).min(CHUNK_BLOCKS);
        let buf = read_blocking(io, files.data, b * BLOCK_SIZE, (n * BLOCK_SIZE) as usize)
            .map_err(|e| format!("reading block {b} of data: {e}"))?;
        for (i, block) in buf.chunks(BLOCK_SIZE as usize).enumerate() {
            let blk = b + i as u64;
            let fresh = block_checksum(blk, block);
            let stored = sums.get(blk);
            if fresh == stored {
                continue;
            }
            let known = stored == fresh ^ CORRUPT_MARK;
            report.bad += 1;
            report.known += u64::from(known);
            if report.listed.len() < LISTED {
                report.listed.push((blk, known));
            }
        }
        b += n;
        progress(b * BLOCK_SIZE, sb.size);
    }
    Ok(report)
}
