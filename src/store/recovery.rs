//! Crash recovery's second half: replaying the records the journal scan
//! (`journal::scan`) found into the data file and the checksum table.
//!
//! Owns: re-applying journaled writes, zeroes and trims in sequence order;
//! rebuilding the checksums of blocks that in-place writes (intent records)
//! may have changed since the last checkpoint, and vouching for those whose
//! data matches a logged checksum record (docs/format.md, "Checksum
//! records"); and reporting the blocks nothing can vouch for (`uncertain`).
//! It runs before the store serves anything, with blocking I/O through the
//! [`Io`] seam; `Store::open` calls it.

use std::os::fd::RawFd;

use super::*;

/// Recovery says before it starts re-reading at least this much of the
/// data file.
const RECOVERY_NOTE_BYTES: u64 = 256 << 20;

/// Replay recovered records in order. An InPlace record means "the data file
/// holds this range's bytes": its blocks' checksums are rebuilt from whatever
/// the data file holds once later records are replayed (a write cut short by
/// the crash leaves old, new or mixed sectors, as on any disk; it was not
/// flushed, or it would be whole).
pub(super) fn replay_all(
    io: &mut dyn Io,
    data: RawFd,
    journal: RawFd,
    sums: &mut ChecksumTable,
    size: u64,
    records: Vec<journal::Recovered>,
    extra: &[(u64, u64)],
) -> Result<Vec<(u64, u64)>, String> {
    // Blocks (runs [first, end)) whose checksums recovery rebuilt from the
    // data file without anything to check them against.
    let mut unsure: Vec<(u64, u64)> = extra
        .iter()
        .map(|&(s, e)| (s / BLOCK_SIZE, e.div_ceil(BLOCK_SIZE)))
        .collect();
    let inplace: Vec<(u64, u64, u64)> = records
        .iter()
        .filter(|r| r.header.kind == RecordKind::InPlace)
        .map(|r| {
            (
                r.header.seq,
                r.header.offset,
                r.header.offset + r.header.length as u64,
            )
        })
        .collect();
    // Say what is coming before the long part: on a slow disk re-reading
    // 256 open regions (4 GiB) takes a while, and the node serves nothing
    // until it is done.
    let region_bytes: u64 = extra
        .iter()
        .map(|&(s, e)| e.saturating_sub(s))
        .chain(inplace.iter().map(|&(_, s, e)| e.saturating_sub(s)))
        .sum();
    let to_replay = records
        .iter()
        .filter(|r| !matches!(r.header.kind, RecordKind::InPlace | RecordKind::Void))
        .count();
    if region_bytes >= RECOVERY_NOTE_BYTES {
        crate::elog!(
            "nbdmirror: recovery: re-reading {} MiB of the data file (regions written in place \
             since the last checkpoint){} before serving",
            region_bytes >> 20,
            if to_replay > 0 {
                format!(" and applying {to_replay} journaled writes")
            } else {
                String::new()
            }
        );
    }
    for rec in &records {
        let h = rec.header;
        // Intents are handled below; Void records here are checksum
        // records (the scan passes no other), read below too.
        if h.kind == RecordKind::InPlace || h.kind == RecordKind::Void {
            continue;
        }
        // In-place writes never overlap older records still in the journal,
        // block for block (see `journaled_chunks`, `split_plan`), so every
        // record replays whole.
        replay(io, data, journal, sums, size, rec)?;
    }
    // Rebuild the checksums of the blocks that changed in intent regions
    // and in the ranges of records that could not be replayed (`extra`,
    // first: their blocks are never vouched for, the data file may hold a
    // stale copy of what such a record wrote).
    let mut changed = 0u64;
    // Only with checksum records is there anything to vouch with; without
    // (a primary) the blocks go straight to `unsure`, as runs.
    let vouching = records.iter().any(|r| r.header.kind == RecordKind::Void);
    let mut candidates: Vec<(u64, u64)> = Vec::new();
    let regions = extra
        .iter()
        .map(|&(s, e)| (false, s, e))
        .chain(inplace.iter().map(|&(_, s, e)| (true, s, e)));
    let mut n_regions = 0usize;
    for (vouchable, s, e) in regions {
        n_regions += 1;
        if e > size {
            return Err(format!(
                "journal in-place record addresses bytes {s}..{e} beyond the {size}-byte disk"
            ));
        }
        read_blocks(
            io,
            data,
            s / BLOCK_SIZE,
            e.div_ceil(BLOCK_SIZE),
            "data",
            |blk, block| {
                let fresh = block_checksum(blk, block);
                // A block marked corrupt and unchanged since stays corrupt.
                if sums.get(blk) != fresh && !sums.marked(blk, fresh) {
                    changed += 1;
                    sums.set(blk, fresh);
                    if vouchable && vouching {
                        candidates.push((blk, fresh));
                    } else {
                        push_block_run(&mut unsure, blk);
                    }
                }
            },
        )?;
    }
    let checksum_records: Vec<&journal::Recovered> = records
        .iter()
        .filter(|r| r.header.kind == RecordKind::Void)
        .collect();
    let vouched = vouch_for_blocks(io, journal, &checksum_records, &mut candidates)?;
    for (blk, _) in candidates {
        push_block_run(&mut unsure, blk);
    }
    if changed > vouched {
        crate::elog!(
            "nbdmirror: recovery rebuilt the checksums of {} blocks from the data file \
             in {n_regions} regions (in-place writes since the last checkpoint, whose checksums \
             had not been written yet, flushed or cut short by the crash, or records that could \
             not be replayed); on its own a node cannot tell corruption in them from new data",
            changed - vouched
        );
    }
    if vouched > 0 {
        crate::elog!(
            "nbdmirror: recovery found {vouched} blocks written in place since the last \
             checkpoint holding data whose checksum the journal logged: vouched for"
        );
    }
    Ok(unsure)
}

/// Add block `blk` to the runs `unsure` (merged with the last run when it
/// extends it).
fn push_block_run(unsure: &mut Vec<(u64, u64)>, blk: u64) {
    match unsure.last_mut() {
        Some((_, e)) if *e == blk => *e += 1,
        _ => unsure.push((blk, blk + 1)),
    }
}

/// Remove from `candidates` (block, checksum of what `data` holds) every
/// block whose data has a checksum one of the checksum records logged
/// (`Tuning::vouch_inplace`): its bytes are those of a write the store
/// made, not a torn write or rot. Returns how many were removed. Reads the
/// records one at a time (the scan kept their headers only); a malformed
/// one (its data checksum verified, so never written by a sound store) is
/// skipped.
fn vouch_for_blocks(
    io: &mut dyn Io,
    journal: RawFd,
    records: &[&journal::Recovered],
    candidates: &mut Vec<(u64, u64)>,
) -> Result<u64, String> {
    if records.is_empty() || candidates.is_empty() {
        return Ok(0);
    }
    candidates.sort_unstable();
    let mut ok = vec![false; candidates.len()];
    for rec in records {
        let bytes = journal::reread_data(io, journal, rec)?;
        let Some(pairs) = format::decode_sum_runs(&bytes) else {
            crate::elog!(
                "nbdmirror: note: checksum record {} is malformed; ignored",
                rec.header.seq
            );
            continue;
        };
        for (b, sum) in pairs {
            if let Ok(i) = candidates.binary_search_by_key(&b, |c| c.0) {
                if candidates[i].1 == sum {
                    ok[i] = true;
                }
            }
        }
    }
    let mut i = 0;
    candidates.retain(|_| {
        i += 1;
        !ok[i - 1]
    });
    Ok(ok.iter().filter(|&&v| v).count() as u64)
}

/// Re-apply one recovered record to the data file and rebuild the checksums
/// of the blocks it touched.
fn replay(
    io: &mut dyn Io,
    data: RawFd,
    journal: RawFd,
    sums: &mut ChecksumTable,
    size: u64,
    rec: &journal::Recovered,
) -> Result<(), String> {
    let h = &rec.header;
    let end = h
        .offset
        .checked_add(h.length as u64)
        .filter(|&e| e <= size)
        .ok_or_else(|| {
            format!(
                "journal record {} addresses bytes {}..{} beyond the {size}-byte disk; \
             was this journal written for another volume?",
                h.seq,
                h.offset,
                h.offset as u128 + h.length as u128
            )
        })?;
    if h.length == 0 {
        return Ok(());
    }
    // Blocks the record covers only partly whose bytes, before it is
    // applied, carry the corrupt mark (`checksum::CORRUPT_MARK`: a partial
    // write found them corrupt, and a checkpoint made the mark durable):
    // they stay marked. Without this, rebuilding their checksums from the
    // data file would turn bytes known to be corrupt into good data.
    let first = h.offset / BLOCK_SIZE;
    let last = end.div_ceil(BLOCK_SIZE);
    let mut marked = Vec::new();
    if h.kind == RecordKind::Write || h.kind == RecordKind::Zero {
        for b in [first, last - 1] {
            let covered = b * BLOCK_SIZE >= h.offset && (b + 1) * BLOCK_SIZE <= end;
            if covered || marked.contains(&b) {
                continue;
            }
            let buf = read_blocking(io, data, b * BLOCK_SIZE, BLOCK_SIZE as usize)
                .map_err(|e| format!("reading block {b} during recovery: {e}"))?;
            if sums.marked(b, block_checksum(b, &buf)) {
                marked.push(b);
            }
        }
    }
    match h.kind {
        RecordKind::Write => {
            // The scan kept headers only: memory for one record at a time,
            // not up to a ring's worth.
            let bytes = journal::reread_data(io, journal, rec)?;
            for b in h.offset.div_ceil(BLOCK_SIZE)..end / BLOCK_SIZE {
                let s = (b * BLOCK_SIZE - h.offset) as usize;
                sums.set(b, block_checksum(b, &bytes[s..s + BLOCK_SIZE as usize]));
            }
            write_blocking(io, data, h.offset, bytes)?;
        }
        RecordKind::Zero => {
            let c = io.run(Op::Fallocate {
                fd: data,
                mode: zero_mode(h.flags & ZERO_FLAG_NO_HOLE != 0),
                offset: h.offset,
                len: h.length as u64,
            });
            if c.result < 0 {
                // No hole punching here: write zeroes, a bounded buffer at a
                // time (a Zero record may cover up to 4 GiB).
                let mut at = 0u64;
                while at < h.length as u64 {
                    let piece = (h.length as u64 - at).min(ZERO_CHUNK as u64);
                    write_blocking(io, data, h.offset + at, vec![0u8; piece as usize])?;
                    at += piece;
                }
            }
        }
        _ => return Ok(()),
    }
    for b in first..last {
        let covered = b * BLOCK_SIZE >= h.offset && (b + 1) * BLOCK_SIZE <= end;
        if covered && h.kind == RecordKind::Zero {
            sums.set(b, 0);
            continue;
        }
        if covered {
            // A Write's: set from its data above.
            continue;
        }
        let buf = read_blocking(io, data, b * BLOCK_SIZE, BLOCK_SIZE as usize)
            .map_err(|e| format!("reading block {b} during recovery: {e}"))?;
        let sum = block_checksum(b, &buf);
        sums.set(
            b,
            if marked.contains(&b) {
                sum ^ checksum::CORRUPT_MARK
            } else {
                sum
            },
        );
    }
    Ok(())
}
