//! Blocking helpers for the store's setup and tools: reading and writing
//! the superblock and the checksum table, and plain reads, writes and syncs
//! through the [`Io`] seam, for code that runs before (or without) the event
//! loop: `Store::open`, `init`, `check`, `info`.

use std::os::fd::RawFd;

use super::*;

/// The checksum table is read in pieces of this many bytes.
const TABLE_READ_PIECE: u64 = 64 << 20;

/// The checksum table of a `size`-byte disk from `meta`, a piece at a time
/// (the table is 1/512 of the disk, and reading it whole first would need
/// twice that in memory); refused if it cannot fit (`check_table_memory`).
pub fn read_checksum_table(
    io: &mut dyn Io,
    meta: RawFd,
    size: u64,
) -> Result<ChecksumTable, String> {
    check_table_memory(size)?;
    let blocks = size / BLOCK_SIZE;
    let table_len = blocks * 8;
    let mut sums = ChecksumTable::zeroed(blocks);
    let mut at = 0u64;
    while at < table_len {
        let n = (table_len - at).min(TABLE_READ_PIECE);
        let buf = read_blocking(io, meta, CHECKSUM_TABLE_OFFSET + at, n as usize)
            .map_err(|e| format!("reading the checksum table: {e}"))?;
        sums.load(at / 8, &buf);
        at += n;
    }
    Ok(sums)
}

/// The checksum table (8 bytes per 4 KiB block, 1/512 of the disk) is
/// held in memory: refuse a disk whose table needs more than this
/// machine's memory, with a message, instead of dying in the allocator.
pub fn check_table_memory(size: u64) -> Result<(), String> {
    let need = size / BLOCK_SIZE * 8;
    let total = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            .map(|kib| kib * 1024)
    });
    match total {
        Some(t) if need > t / 2 => Err(format!(
            "a {size}-byte disk needs a {need}-byte checksum table in memory (8 bytes per 4 KiB \
             block), more than half of this machine's {t} bytes of memory; use a smaller disk \
             (at most {} bytes here)",
            t / 2 / 8 * BLOCK_SIZE
        )),
        _ => Ok(()),
    }
}

/// Read the blocks `first..end` of `fd` (start-up, recovery and `check`
/// only), 1 MiB at a time, calling `each(block, bytes)` for every one;
/// `what` names the file in errors.
pub fn read_blocks(
    io: &mut dyn Io,
    fd: RawFd,
    first: u64,
    end: u64,
    what: &str,
    mut each: impl FnMut(u64, &[u8]),
) -> Result<(), String> {
    let mut b = first;
    while b < end {
        let n = (end - b).min(256);
        let buf = read_blocking(io, fd, b * BLOCK_SIZE, (n * BLOCK_SIZE) as usize)
            .map_err(|e| format!("reading block {b} of {what}: {e}"))?;
        for (i, block) in buf.chunks(BLOCK_SIZE as usize).enumerate() {
            each(b + i as u64, block);
        }
        b += n;
    }
    Ok(())
}

/// Read `len` bytes at `offset` (start-up and recovery only); bytes past the
/// end of the file read as zero.
pub fn read_blocking(
    io: &mut dyn Io,
    fd: RawFd,
    offset: u64,
    len: usize,
) -> Result<Vec<u8>, String> {
    let c = io.run(Op::Read {
        fd,
        buf: vec![0u8; len],
        at: 0,
        offset,
    });
    if c.result < 0 {
        return Err(errno_str(-c.result));
    }
    let Op::Read { mut buf, .. } = c.op else {
        unreachable!()
    };
    buf[(c.result as usize).min(len)..].fill(0);
    Ok(buf)
}

pub fn write_blocking(io: &mut dyn Io, fd: RawFd, offset: u64, buf: Vec<u8>) -> Result<(), String> {
    let end = buf.len();
    let mut buf = WriteBuf::Owned(buf);
    let mut start = 0;
    while start < end {
        let c = io.run(Op::Write {
            fd,
            buf,
            start,
            end,
            offset: offset + start as u64,
        });
        if c.result <= 0 {
            let e = if c.result == 0 {
                libc::ENOSPC
            } else {
                -c.result
            };
            return Err(format!("write at offset {offset}: {}", errno_str(e)));
        }
        start += c.result as usize;
        let Op::Write { buf: b, .. } = c.op else {
            unreachable!()
        };
        buf = b;
    }
    Ok(())
}

pub fn sync_blocking(io: &mut dyn Io, fd: RawFd) -> Result<(), String> {
    let c = io.run(Op::Fsync { fd, datasync: true });
    if c.result < 0 {
        return Err(format!("fdatasync: {}", errno_str(-c.result)));
    }
    Ok(())
}

pub fn write_superblock_blocking(
    io: &mut dyn Io,
    meta: RawFd,
    sb: &Superblock,
) -> Result<(), String> {
    let slot = sb.write_counter % 2;
    write_blocking(io, meta, slot * SUPERBLOCK_SLOT, sb.encode())?;
    sync_blocking(io, meta)
}

/// Read both superblock slots and return the valid one with the highest
/// write counter, or say why neither is usable.
pub fn load_superblock(io: &mut dyn Io, meta: RawFd) -> Result<Superblock, String> {
    let mut best: Option<Superblock> = None;
    let mut errors = Vec::new();
    // Slots that hold something that does not verify (`init` writes only
    // slot 0, so an all-zero slot 1 is normal).
    let mut damaged: Vec<u64> = Vec::new();
    for slot in 0..2u64 {
        let c = io.run(Op::Read {
            fd: meta,
            buf: vec![0u8; SUPERBLOCK_SLOT as usize],
            at: 0,
            offset: slot * SUPERBLOCK_SLOT,
        });
        if c.result < 0 {
            // An unreadable slot may hold the newest superblock. Falling back
            // to the other slot would roll the journal tail back, possibly
            // into ring space newer records have reused, and recovery would
            // then drop flushed writes (found by tests/store_faults.rs).
            // Refuse rather than guess.
            return Err(format!(
                "cannot read superblock slot {slot}: {}; refusing to guess which superblock is current",
                errno_str(-c.result)
            ));
        }
        let Op::Read { buf, .. } = c.op else {
            unreachable!()
        };
        let never_written = is_zero(&buf[..c.result as usize]);
        match Superblock::decode(&buf[..c.result as usize]) {
            Ok(sb) => {
                if best
                    .as_ref()
                    .is_none_or(|b| sb.write_counter > b.write_counter)
                {
                    best = Some(sb);
                }
            }
            Err(e @ format::SuperblockError::NewerVersion(_)) => return Err(e.to_string()),
            Err(e) => {
                if !never_written {
                    damaged.push(slot);
                }
                errors.push(format!("slot {slot}: {e}"));
            }
        }
    }
    if best.is_some() && !damaged.is_empty() {
        crate::elog!(
            "nbdmirror: note: superblock {} does not verify; using the other slot (a crash while \
             a checkpoint wrote it leaves this; the journal is checked for records newer than \
             the slot used)",
            errors.join("; ")
        );
    }
    best.ok_or_else(|| format!("no valid superblock ({})", errors.join("; ")))
}
