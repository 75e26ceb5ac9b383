//! xxh3-64 with the SIMD width chosen at run time.
//!
//! Owns: every xxh3 computed over data (block checksums, journal record
//! hashes, peer frame checksums). The values are exactly those of
//! `xxhash_rust::xxh3::xxh3_64_with_seed` over the concatenated input; the
//! tests below hold them to it. xxhash-rust picks its SIMD width when it is
//! compiled (SSE2 for a generic x86-64 build); on a CPU with AVX2 this module
//! takes the AVX2 path for inputs over 240 bytes, which halves the cost of
//! hashing written data. Shorter inputs go to xxhash-rust unchanged.
//!
//! [`hash_parts`] hashes a sequence of slices as if they were one, so a frame
//! header and its payload need not be joined first.

/// Inputs up to this long use xxh3's short-input paths (no SIMD loop).
const MID_SIZE_MAX: usize = 240;

/// xxh3-64 of `data` with `seed`.
pub fn hash_seeded(data: &[u8], seed: u64) -> u64 {
    hash_parts(&[data], seed)
}

/// xxh3-64 with `seed` of the concatenation of `parts`.
pub fn hash_parts(parts: &[&[u8]], seed: u64) -> u64 {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    if total <= MID_SIZE_MAX {
        let mut joined = [0u8; MID_SIZE_MAX];
        let mut n = 0;
        for p in parts {
            joined[n..n + p.len()].copy_from_slice(p);
            n += p.len();
        }
        return xxhash_rust::xxh3::xxh3_64_with_seed(&joined[..n], seed);
    }
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU supports AVX2 (checked just above).
        return unsafe { avx2::long(parts, total, seed) };
    }
    if let [one] = parts {
        return xxhash_rust::xxh3::xxh3_64_with_seed(one, seed);
    }
    let mut h = xxhash_rust::xxh3::Xxh3::with_seed(seed);
    for p in parts {
        h.update(p);
    }
    h.digest()
}

/// Walks 64-byte stripes of a sequence of slices at increasing offsets,
/// gathering a stripe that spans two slices into a scratch buffer.
struct Stripes<'a> {
    parts: &'a [&'a [u8]],
    idx: usize,
    /// Offset of `parts[idx]` in the concatenation.
    base: usize,
    scratch: [u8; 64],
}

impl<'a> Stripes<'a> {
    fn new(parts: &'a [&'a [u8]]) -> Self {
        Stripes {
            parts,
            idx: 0,
            base: 0,
            scratch: [0; 64],
        }
    }

    /// The 64 bytes at `off` (`off + 64` within the input; offsets of
    /// successive calls never decrease).
    #[inline(always)]
    fn at(&mut self, off: usize) -> *const u8 {
        while off >= self.base + self.parts[self.idx].len() {
            self.base += self.parts[self.idx].len();
            self.idx += 1;
        }
        let p = self.parts[self.idx];
        let rel = off - self.base;
        if rel + 64 <= p.len() {
            return p[rel..].as_ptr();
        }
        let (mut n, mut i, mut r) = (0, self.idx, rel);
        while n < 64 {
            let q = self.parts[i];
            let take = (q.len() - r).min(64 - n);
            self.scratch[n..n + take].copy_from_slice(&q[r..r + take]);
            n += take;
            i += 1;
            r = 0;
        }
        self.scratch.as_ptr()
    }
}

/// The reference XXH3_hashLong_64b_withSeed with AVX2: a secret derived
/// from the seed, 1 KiB blocks of 16 stripes each followed by a scramble,
/// the last partial block, the last stripe, then the accumulator merge.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::Stripes;
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

    /// `total` is the parts' summed length, over 240.
    #[target_feature(enable = "avx2")]
    pub unsafe fn long(parts: &[&[u8]], total: usize, seed: u64) -> u64 {
        let secret = const_custom_default_secret(seed);
        let init: [u64; 8] = [
            PRIME32_3, PRIME64_1, PRIME64_2, PRIME64_3, PRIME64_4, PRIME32_2, PRIME64_5, PRIME32_1,
        ];
        let mut acc = [
            _mm256_loadu_si256(init.as_ptr() as *const __m256i),
            _mm256_loadu_si256(init.as_ptr().add(4) as *const __m256i),
        ];
        let key = secret.as_ptr();
        let mut input = Stripes::new(parts);
        let block_len = STRIPE * STRIPES_PER_BLOCK;
        let blocks = (total - 1) / block_len;
        for b in 0..blocks {
            for s in 0..STRIPES_PER_BLOCK {
                accumulate(
                    &mut acc,
                    input.at(b * block_len + s * STRIPE),
                    key.add(s * 8),
                );
            }
            scramble(&mut acc, key.add(SECRET_LEN - STRIPE));
        }
        let last_stripes = ((total - 1) - block_len * blocks) / STRIPE;
        for s in 0..last_stripes {
            accumulate(
                &mut acc,
                input.at(blocks * block_len + s * STRIPE),
                key.add(s * 8),
            );
        }
        // The last stripe may start before the previous one: a fresh walk.
        let mut tail = Stripes::new(parts);
        accumulate(
            &mut acc,
            tail.at(total - STRIPE),
            key.add(SECRET_LEN - STRIPE - 7),
        );
        let mut lanes = [0u64; 8];
        _mm256_storeu_si256(lanes.as_mut_ptr() as *mut __m256i, acc[0]);
        _mm256_storeu_si256(lanes.as_mut_ptr().add(4) as *mut __m256i, acc[1]);
        let mut h = (total as u64).wrapping_mul(PRIME64_1);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> u64 {
        let mut x = seed | 1;
        move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        }
    }

    /// Every checksum on disk and on the wire depends on these being the
    /// reference xxh3 values.
    #[test]
    fn blocks_match_reference() {
        let mut next = rng(0x1234_5678_9abc_def0);
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
                hash_seeded(&buf, seed),
                xxhash_rust::xxh3::xxh3_64_with_seed(&buf, seed),
                "round {round}"
            );
        }
    }

    #[test]
    fn any_length_and_split_matches_reference() {
        let mut next = rng(77);
        let data: Vec<u8> = (0..70_000).map(|_| next() as u8).collect();
        let mut lens: Vec<usize> = (0..300).collect();
        lens.extend([
            1023, 1024, 1025, 1087, 1088, 1089, 2048, 4095, 4096, 4097, 65_536, 70_000,
        ]);
        for _ in 0..200 {
            lens.push(next() as usize % 70_000);
        }
        for len in lens {
            let seed = next();
            let whole = xxhash_rust::xxh3::xxh3_64_with_seed(&data[..len], seed);
            assert_eq!(hash_seeded(&data[..len], seed), whole, "len {len}");
            // Split into up to four parts at random points (empty parts too).
            let mut cuts: Vec<usize> = (0..3).map(|_| next() as usize % (len + 1)).collect();
            cuts.sort();
            let parts = [
                &data[..cuts[0]],
                &data[cuts[0]..cuts[1]],
                &data[cuts[1]..cuts[2]],
                &data[cuts[2]..len],
            ];
            assert_eq!(hash_parts(&parts, seed), whole, "len {len} cuts {cuts:?}");
            // The frame shape: a 24-byte header, then the payload.
            if len >= 24 {
                let framed = [&data[..24], &data[24..len]];
                assert_eq!(
                    hash_parts(&framed, 0),
                    xxhash_rust::xxh3::xxh3_64(&data[..len])
                );
            }
        }
    }
}
