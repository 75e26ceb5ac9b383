//! Per-block checksums: one xxh3-64 per 4 KiB block, seeded with the block
//! number so a block written to the wrong place fails verification.
//!
//! Owns: the checksum function, the in-memory table and which pages of it are
//! dirty (to be written to `meta` at checkpoint). The value 0 means "all
//! zeroes" (a fresh or trimmed block); real hashes that happen to be 0 are
//! stored as 1. Never does I/O itself.

use super::format::BLOCK_SIZE;

/// XORed into the checksum of a block known to hold corrupt bytes: the stored
/// value then differs from every real checksum of the block's content, so reads
/// fail until a whole-block write installs a fresh checksum.
pub const CORRUPT_MARK: u64 = 0xC0AA_0B7D_5EED_BAD1;

/// Bytes of table per dirty-tracking page.
pub const TABLE_PAGE: usize = 4096;
const ENTRIES_PER_PAGE: u64 = (TABLE_PAGE / 8) as u64;

/// The checksum of each 4 KiB block of `data`, whose first block is block
/// `first` (`data` covers whole blocks).
pub fn checksums_of(first: u64, data: &[u8]) -> Vec<u64> {
    debug_assert!(data.len().is_multiple_of(BLOCK_SIZE as usize));
    data.chunks(BLOCK_SIZE as usize)
        .enumerate()
        .map(|(i, b)| block_checksum(first + i as u64, b))
        .collect()
}

pub fn block_checksum(block: u64, data: &[u8]) -> u64 {
    debug_assert_eq!(data.len() as u64, BLOCK_SIZE);
    if is_zero(data) {
        return 0;
    }
    match crate::xxh3::hash_seeded(data, block) {
        0 => 1,
        h => h,
    }
}

pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle part of an initialised byte slice.
        data.align_to::<u64>()
    };
    // 16 words OR-ed per step: the inner fold vectorises, the early exit
    // stays per 128 bytes.
    pre.iter().all(|&b| b == 0)
        && post.iter().all(|&b| b == 0)
        && mid.chunks(16).all(|c| c.iter().fold(0, |a, &w| a | w) == 0)
}

pub struct ChecksumTable {
    sums: Vec<u64>,
    dirty: Vec<bool>,
}

impl ChecksumTable {
    pub fn from_bytes(bytes: &[u8], blocks: u64) -> ChecksumTable {
        let mut t = ChecksumTable::zeroed(blocks);
        t.load(0, bytes);
        t
    }

    /// A table of `blocks` entries, all 0, none dirty.
    pub fn zeroed(blocks: u64) -> ChecksumTable {
        let pages = (blocks * 8).div_ceil(TABLE_PAGE as u64) as usize;
        ChecksumTable {
            sums: vec![0u64; blocks as usize],
            dirty: vec![false; pages],
        }
    }

    /// Fill entries from `first` on with the table bytes `bytes` (as read
    /// from `meta`, a piece at a time); entries past the end are ignored.
    pub fn load(&mut self, first: u64, bytes: &[u8]) {
        let from = (first as usize).min(self.sums.len());
        for (s, b) in self.sums[from..].iter_mut().zip(bytes.chunks_exact(8)) {
            *s = u64::from_le_bytes(b.try_into().unwrap());
        }
    }

    pub fn blocks(&self) -> u64 {
        self.sums.len() as u64
    }

    pub fn get(&self, block: u64) -> u64 {
        self.sums[block as usize]
    }

    pub fn set(&mut self, block: u64, sum: u64) {
        if self.sums[block as usize] != sum {
            self.sums[block as usize] = sum;
            self.dirty[(block / ENTRIES_PER_PAGE) as usize] = true;
        }
    }

    pub fn verify(&self, block: u64, data: &[u8]) -> bool {
        block_checksum(block, data) == self.get(block)
    }

    /// The block whose bytes checksum to `fresh` was marked corrupt (see
    /// [`CORRUPT_MARK`]) and has not changed since.
    pub fn marked(&self, block: u64, fresh: u64) -> bool {
        self.get(block) == fresh ^ CORRUPT_MARK
    }

    /// Dirty table pages as (byte offset within the table, bytes); clears the
    /// dirty marks.
    pub fn take_dirty_pages(&mut self) -> Vec<(u64, Vec<u8>)> {
        let mut out = Vec::new();
        for (page, d) in self.dirty.iter_mut().enumerate() {
            if !*d {
                continue;
            }
            *d = false;
            let first = page as u64 * ENTRIES_PER_PAGE;
            let last = (first + ENTRIES_PER_PAGE).min(self.sums.len() as u64);
            let mut bytes = Vec::with_capacity(TABLE_PAGE);
            for s in &self.sums[first as usize..last as usize] {
                bytes.extend_from_slice(&s.to_le_bytes());
            }
            out.push((page as u64 * TABLE_PAGE as u64, bytes));
        }
        out
    }

    /// Mark pages dirty again (a checkpoint that failed to write them).
    pub fn mark_all_dirty(&mut self) {
        self.dirty.iter_mut().for_each(|d| *d = true);
    }
}

#[cfg(test)]
mod tests {
    use super::is_zero;

    #[test]
    fn is_zero_checks_every_byte_at_any_alignment() {
        let mut b = vec![0u8; 4096 + 64];
        for start in 0..9 {
            for len in [0, 1, 7, 8, 127, 128, 129, 4096] {
                let s = &mut b[start..start + len];
                assert!(is_zero(s));
                for k in 0..len {
                    s[k] = 1;
                    assert!(!is_zero(s), "start {start} len {len} byte {k}");
                    s[k] = 0;
                }
            }
        }
    }
}
