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

pub fn block_checksum(block: u64, data: &[u8]) -> u64 {
    debug_assert_eq!(data.len() as u64, BLOCK_SIZE);
    if is_zero(data) {
        return 0;
    }
    match xxh3_seeded(data, block) {
        0 => 1,
        h => h,
    }
}

/// xxh3-64 of `data` with `seed`, the same value as
/// `xxhash_rust::xxh3::xxh3_64_with_seed`. xxhash-rust picks its SIMD width
/// when it is compiled (SSE2 for a generic x86-64 build); this picks AVX2 at
/// run time where the CPU has it, which halves the cost of checksumming
/// every written block.
pub fn xxh3_seeded(data: &[u8], seed: u64) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if data.len() == BLOCK_SIZE as usize && std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::xxh3_4k(data.try_into().unwrap(), seed) };
    }
    xxhash_rust::xxh3::xxh3_64_with_seed(data, seed)
}

/// xxh3-64's long-input path for exactly one 4 KiB block, with AVX2.
/// Follows the reference XXH3_hashLong_64b_withSeed: a secret derived from
/// the seed, 1 KiB blocks of 16 stripes each followed by a scramble, the
/// last partial block, the last stripe, then the accumulator merge.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use xxhash_rust::const_xxh3::const_custom_default_secret;

    const STRIPE: usize = 64;
    const SECRET_LEN: usize = 192;
    const STRIPES_PER_BLOCK: usize = (SECRET_LEN - STRIPE) / 8;
    const PRIME32_1: u64 = 0x9E37_79B1;
    const PRIME32_2: u64 = 0x85EB_CA77;
    const PRIME32_3: u64 = 0xC2B2_AE3D;
    const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
    const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
    const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
    const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;
    const PRIME64_5: u64 = 0x27D4_EB2F_1656_67C5;

    #[inline(always)]
    unsafe fn accumulate(acc: &mut [__m256i; 2], stripe: *const u8, secret: *const u8) {
        for (i, a) in acc.iter_mut().enumerate() {
            let data = _mm256_loadu_si256(stripe.add(32 * i) as *const __m256i);
            let key = _mm256_loadu_si256(secret.add(32 * i) as *const __m256i);
            let data_key = _mm256_xor_si256(data, key);
            let data_key_lo = _mm256_srli_epi64(data_key, 32);
            let product = _mm256_mul_epu32(data_key, data_key_lo);
            let data_swap = _mm256_shuffle_epi32(data, 0b01_00_11_10);
            let sum = _mm256_add_epi64(*a, data_swap);
            *a = _mm256_add_epi64(product, sum);
        }
    }

    #[inline(always)]
    unsafe fn scramble(acc: &mut [__m256i; 2], secret: *const u8) {
        let prime = _mm256_set1_epi32(PRIME32_1 as i32);
        for (i, a) in acc.iter_mut().enumerate() {
            let shifted = _mm256_srli_epi64(*a, 47);
            let data = _mm256_xor_si256(*a, shifted);
            let key = _mm256_loadu_si256(secret.add(32 * i) as *const __m256i);
            let data_key = _mm256_xor_si256(data, key);
            let data_key_hi = _mm256_shuffle_epi32(data_key, 0b00_11_00_01);
            let prod_lo = _mm256_mul_epu32(data_key, prime);
            let prod_hi = _mm256_mul_epu32(data_key_hi, prime);
            *a = _mm256_add_epi64(prod_lo, _mm256_slli_epi64(prod_hi, 32));
        }
    }

    fn read64(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    fn mul128_fold64(a: u64, b: u64) -> u64 {
        let p = a as u128 * b as u128;
        (p as u64) ^ ((p >> 64) as u64)
    }

    #[target_feature(enable = "avx2")]
    pub unsafe fn xxh3_4k(data: &[u8; 4096], seed: u64) -> u64 {
        let secret = const_custom_default_secret(seed);
        let init: [u64; 8] = [
            PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
        ];
        let mut acc = [
            _mm256_loadu_si256(init.as_ptr() as *const __m256i),
            _mm256_loadu_si256(init.as_ptr().add(4) as *const __m256i),
        ];
        let (input, key) = (data.as_ptr(), secret.as_ptr());
        let block_len = STRIPE * STRIPES_PER_BLOCK;
        let blocks = (data.len() - 1) / block_len;
        for b in 0..blocks {
            for s in 0..STRIPES_PER_BLOCK {
                accumulate(
                    &mut acc,
                    input.add(b * block_len + s * STRIPE),
                    key.add(s * 8),
                );
            }
            scramble(&mut acc, key.add(SECRET_LEN - STRIPE));
        }
        let last_stripes = ((data.len() - 1) - block_len * blocks) / STRIPE;
        for s in 0..last_stripes {
            accumulate(
                &mut acc,
                input.add(blocks * block_len + s * STRIPE),
                key.add(s * 8),
            );
        }
        accumulate(
            &mut acc,
            input.add(data.len() - STRIPE),
            key.add(SECRET_LEN - STRIPE - 7),
        );
        let mut lanes = [0u64; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[0]);
        _mm256_storeu_si256(lanes.as_mut_ptr().add(4) as *mut __m256i, acc[1]);
        let mut h = (data.len() as u64).wrapping_mul(PRIME64_1);
        for i in 0..4 {
            let s = 11 + 16 * i;
            h = h.wrapping_add(mul128_fold64(
                lanes[2 * i] ^ read64(&secret, s),
                lanes[2 * i + 1] ^ read64(&secret, s + 8),
            ));
        }
        h ^= h >> 37;
        h = h.wrapping_mul(0x1656_6791_9E37_79F9);
        h ^ (h >> 32)
    }
}

pub fn is_zero(data: &[u8]) -> bool {
    let (pre, mid, post) = unsafe {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle part of an initialised byte slice.
        data.align_to::<u64>()
    };
    pre.iter().all(|&b| b == 0) && mid.iter().all(|&w| w == 0) && post.iter().all(|&b| b == 0)
}

pub struct ChecksumTable {
    sums: Vec<u64>,
    dirty: Vec<bool>,
}

impl ChecksumTable {
    pub fn from_bytes(bytes: &[u8], blocks: u64) -> ChecksumTable {
        let mut sums = vec![0u64; blocks as usize];
        for (i, s) in sums.iter_mut().enumerate() {
            let at = i * 8;
            if at + 8 <= bytes.len() {
                *s = u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap());
            }
        }
        let pages = (blocks * 8).div_ceil(TABLE_PAGE as u64) as usize;
        ChecksumTable {
            sums,
            dirty: vec![false; pages],
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
    use super::*;

    /// The run-time SIMD path must give exactly the reference xxh3 value:
    /// every checksum table on disk depends on it.
    #[test]
    fn xxh3_seeded_matches_reference() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut buf = vec![0u8; 4096];
        for round in 0..2000 {
            match round % 4 {
                0 => buf.iter_mut().for_each(|b| *b = next() as u8),
                1 => buf.fill(0xff),
                2 => {
                    buf.fill(0);
                    let at = next() as usize % 4096;
                    buf[at] = 1;
                }
                _ => buf.iter_mut().for_each(|b| *b = (next() % 3) as u8),
            }
            let seed = match round % 5 {
                0 => 0,
                1 => u64::MAX,
                _ => next(),
            };
            assert_eq!(
                xxh3_seeded(&buf, seed),
                xxhash_rust::xxh3::xxh3_64_with_seed(&buf, seed),
                "round {round}"
            );
        }
        for len in [0, 1, 17, 240, 241, 1024, 4095, 4097, 8192] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7) as u8).collect();
            assert_eq!(
                xxh3_seeded(&data, 9),
                xxhash_rust::xxh3::xxh3_64_with_seed(&data, 9)
            );
        }
    }
}
