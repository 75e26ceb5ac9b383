//! Hash maps for the event loop's own keys: request ids, link ids, block
//! and chunk numbers.
//!
//! Owns [`IdMap`]/[`IdSet`], std's `HashMap`/`HashSet` with [`IdHasher`], a
//! cheap mixer (the 64-bit finaliser of MurmurHash3) in place of std's
//! SipHash. A mirrored primary touches several such maps per client write;
//! SipHash was 1.5% of the machine's CPU under 4 KiB random writes.
//!
//! Must never be used for keys an outsider chooses freely and many of
//! (the mixer has no secret key, so such a party could make keys collide):
//! the keys here are counters this process assigns, or block and chunk
//! numbers of one bounded disk.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasherDefault, Hasher};

pub type IdMap<K, V> = HashMap<K, V, BuildHasherDefault<IdHasher>>;
pub type IdSet<K> = HashSet<K, BuildHasherDefault<IdHasher>>;

#[derive(Default, Clone, Copy)]
pub struct IdHasher {
    h: u64,
}

impl IdHasher {
    fn add(&mut self, v: u64) {
        // Chain words (tuple keys) through a multiply before the next one.
        self.h = (self.h ^ v)
            .wrapping_mul(0x9E37_79B9_7F4A_7C15)
            .rotate_left(29);
    }
}

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        // fmix64: every input bit reaches the low bits (bucket index) and
        // the top 7 (hashbrown's tag).
        let mut k = self.h;
        k ^= k >> 33;
        k = k.wrapping_mul(0xff51_afd7_ed55_8ccd);
        k ^= k >> 33;
        k = k.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
        k ^ (k >> 33)
    }

    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut w = [0u8; 8];
            w[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(w));
        }
    }

    fn write_u8(&mut self, v: u8) {
        self.add(v as u64);
    }

    fn write_u16(&mut self, v: u16) {
        self.add(v as u64);
    }

    fn write_u32(&mut self, v: u32) {
        self.add(v as u64);
    }

    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }

    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    #[test]
    fn strided_keys_spread_over_buckets() {
        // Block numbers 256 apart (1 MiB strides) must not share low bits.
        let b = BuildHasherDefault::<IdHasher>::default();
        let mut low: HashSet<u64> = HashSet::new();
        for i in 0..1024u64 {
            low.insert(b.hash_one(i * 256) & 1023);
        }
        assert!(low.len() > 600, "only {} distinct buckets", low.len());
        let m: IdMap<u64, u64> = (0..10_000u64).map(|i| (i << 20, i)).collect();
        assert!((0..10_000u64).all(|i| m[&(i << 20)] == i));
    }
}
