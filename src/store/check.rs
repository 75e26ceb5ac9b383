//! Offline verification of a stopped replica (`nbdmirror check`): every
//! block of `data` read back and compared with its checksum in `meta`, so
//! latent corruption is found before a client reads it. Only reads; owns no
//! on-disk structure. A replica whose journal still holds records past the
//! superblock's tail (the node did not stop cleanly), or records beyond a
//! damaged one there, is refused: its `data` and checksums match only once
//! recovery has applied them.

use super::checksum::block_checksum;
use super::format::BLOCK_SIZE;
use super::journal;
use super::{check_table_memory, load_superblock, read_blocks, read_checksum_table, Files};
use crate::io::Io;

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
    let end = journal::scan(
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
    // Records of the last run beyond a damaged one (or a newer run's) mean
    // the node did not stop cleanly either: the scan stopped at the damage
    // at once, so `data` holds writes whose checksums only recovery
    // rebuilds. Checking now would list them as corrupt (a tester's find:
    // 259 blocks "fail", and serve then rebuilt every one of them).
    let (stranded, newer) = journal::stranded(io, files.journal, sb.journal_size, &end, sb.epoch)?;
    if !stranded.is_empty() || newer.is_some() {
        return Err(format!(
            "the node did not stop cleanly and its journal is damaged where recovery would \
             start ({}; {} records of the last run{} lie beyond it), so `data` and its \
             checksums do not match yet: start the node once (recovery reports what it \
             cannot replay and rebuilds those blocks' checksums), stop it, then check again",
            end.reason,
            stranded.len(),
            if newer.is_some() {
                ", and records of a newer run than the superblock's,"
            } else {
                ""
            }
        ));
    }
    let blocks = sb.size / BLOCK_SIZE;
    let sums = read_checksum_table(io, files.meta, sb.size)?;
    let mut report = Report {
        blocks,
        ..Report::default()
    };
    // A piece of the disk at a time, so progress is reported as it goes.
    const PIECE: u64 = 16 << 20;
    let mut at = 0u64;
    while at < sb.size {
        let end = (at + PIECE).min(sb.size);
        read_blocks(
            io,
            files.data,
            at / BLOCK_SIZE,
            end / BLOCK_SIZE,
            "data",
            |blk, block| {
                let fresh = block_checksum(blk, block);
                if fresh == sums.get(blk) {
                    return;
                }
                let known = sums.marked(blk, fresh);
                report.bad += 1;
                report.known += u64::from(known);
                if report.listed.len() < LISTED {
                    report.listed.push((blk, known));
                }
            },
        )?;
        at = end;
        progress(at, sb.size);
    }
    Ok(report)
}
