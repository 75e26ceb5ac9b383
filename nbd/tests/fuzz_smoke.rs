//! Runs the fuzz harness on pseudo-random and mutated valid input so every
//! test run exercises it (the real fuzzing is `cargo fuzz run session` in nbd/fuzz).

use nbd::consts::*;

fn rng(seed: &mut u64) -> u64 {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 7;
    *seed ^= *seed << 17;
    *seed
}

fn valid_prefix() -> Vec<u8> {
    let mut v = vec![7u8];
    v.extend_from_slice(&(CLIENT_FIXED_NEWSTYLE | CLIENT_NO_ZEROES).to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_STRUCTURED_REPLY.to_be_bytes());
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&OPT_GO.to_be_bytes());
    v.extend_from_slice(&6u32.to_be_bytes());
    v.extend_from_slice(&[0, 0, 0, 0, 0, 0]);
    for kind in 0..9u16 {
        v.extend_from_slice(&REQUEST_MAGIC.to_be_bytes());
        v.extend_from_slice(&0u16.to_be_bytes());
        v.extend_from_slice(&kind.to_be_bytes());
        v.extend_from_slice(&1u64.to_be_bytes());
        v.extend_from_slice(&4096u64.to_be_bytes());
        v.extend_from_slice(&512u32.to_be_bytes());
        if kind == CMD_WRITE {
            v.extend(std::iter::repeat_n(0xab, 512));
        }
    }
    v
}

#[test]
fn session_harness_survives_random_and_mutated_input() {
    let mut seed = 0x1234_5678_9abc_def1u64;
    for _ in 0..3000 {
        let len = (rng(&mut seed) % 600) as usize;
        let data: Vec<u8> = (0..len).map(|_| rng(&mut seed) as u8).collect();
        nbd::fuzzing::session(&data);
    }
    let base = valid_prefix();
    nbd::fuzzing::session(&base);
    for _ in 0..20000 {
        let mut d = base.clone();
        for _ in 0..(rng(&mut seed) % 4 + 1) {
            let i = (rng(&mut seed) as usize) % d.len();
            d[i] = rng(&mut seed) as u8;
        }
        let cut = (rng(&mut seed) as usize) % (d.len() + 1);
        d.truncate(cut.max(1));
        nbd::fuzzing::session(&d);
    }
}
