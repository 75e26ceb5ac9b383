//! The store's page-cache hygiene on simulated I/O: a small write into a
//! 64 KiB piece that a large write left in the page cache (as large folios)
//! first drops that piece's cached pages (not its neighbours'), but only
//! once a checkpoint has synced the large write, at most twice per large
//! write, and never for pieces that only small writes touched. The drop is a hint: every byte reads back
//! as written, also after a crash.

mod sim_common;

use nbdmirror::store::{Tuning, WRITE_HEADROOM};
use sim_common::*;

const CHUNK: u64 = 1 << 20;
/// The store's page-cache piece: a folio never spans two.
const PIECE: u64 = nbdmirror::store::PAGE_CACHE_PIECE;

fn tuning(eager: bool) -> Tuning {
    let base = if eager { eager_tuning() } else { lazy_tuning() };
    Tuning {
        inplace_min: 256 * 1024,
        inplace_regions: nbdmirror::store::INPLACE_REGIONS,
        // Large writes start where in-place ones do, as they did before
        // small writes went in place.
        large_write: 256 * 1024,
        vouch_inplace: false,
        ..base
    }
}

/// A fresh replica of `size` bytes (4 MiB journal) and its model, all zero.
fn new_rig(seed: u64, size: u64, eager: bool) -> (Rig, Vec<u8>) {
    let rig = Rig::new(seed, size, 4 * CHUNK, tuning(eager));
    (rig, vec![0u8; size as usize])
}

/// Write, flush, and let every sync, apply and checkpoint run.
fn write_settled(rig: &mut Rig, model: &mut [u8], id: u64, off: u64, len: u64) {
    let data = pattern(id, off, len);
    rig.write_sync(off, &data, false).unwrap();
    rig.flush_sync().unwrap();
    for _ in 0..4 {
        rig.st.tick(&mut rig.sim);
        rig.pump();
    }
    model[off as usize..(off + len) as usize].copy_from_slice(&data);
}

#[test]
fn small_writes_after_a_large_one_drop_its_cached_pages_twice() {
    let size = 8 * CHUNK;
    let (mut rig, mut model) = new_rig(7, size, true);
    rig.sim.reorder = false;
    // Two chunks written in place, one sequential pass.
    write_settled(&mut rig, &mut model, 1, 0, 2 * CHUNK);
    assert!(
        rig.st.stats.inplace_writes >= 1,
        "the large write went in place"
    );
    assert_eq!(rig.st.stats.cache_drops, 0, "no small write yet");
    assert_eq!(
        rig.sim.cache_drops,
        vec![(0, CHUNK), (CHUNK, CHUNK)],
        "the large write first dropped what it replaces"
    );
    rig.sim.cache_drops.clear();

    // A chunk nothing large touched: no drop.
    write_settled(&mut rig, &mut model, 2, 5 * CHUNK + 4096, 4096);
    assert_eq!(rig.st.stats.cache_drops, 0);

    // First small write into piece 0: that piece (and nothing more of the
    // chunk) is dropped; the next small write there after another
    // checkpoint drops it the second time; then never again.
    write_settled(&mut rig, &mut model, 3, 8192, 4096);
    assert_eq!(rig.st.stats.cache_drops, 1);
    assert_eq!(rig.sim.cache_drops, vec![(0, PIECE)], "only the piece");
    write_settled(&mut rig, &mut model, 4, 12288, 4096);
    assert_eq!(rig.st.stats.cache_drops, 2);
    write_settled(&mut rig, &mut model, 5, 16384, 4096);
    assert_eq!(rig.st.stats.cache_drops, 2, "two drops per piece");

    // The next piece of the same chunk has its own count.
    write_settled(&mut rig, &mut model, 6, PIECE + 4096, 4096);
    assert_eq!(rig.st.stats.cache_drops, 3);
    assert_eq!(rig.sim.cache_drops.last(), Some(&(PIECE, PIECE)));

    // A small write across two untouched pieces drops both, in one call.
    write_settled(&mut rig, &mut model, 7, 3 * PIECE - 4096, 8192);
    assert_eq!(rig.st.stats.cache_drops, 5);
    assert_eq!(rig.sim.cache_drops.last(), Some(&(2 * PIECE, 2 * PIECE)));

    // Chunk 1 has its own pieces.
    write_settled(&mut rig, &mut model, 8, CHUNK + 4096, 4096);
    assert_eq!(rig.st.stats.cache_drops, 6);
    assert_eq!(rig.sim.cache_drops.last(), Some(&(CHUNK, PIECE)));

    // A new large write over chunk 0 starts over.
    write_settled(&mut rig, &mut model, 9, 0, CHUNK);
    write_settled(&mut rig, &mut model, 10, 20480, 4096);
    assert_eq!(rig.st.stats.cache_drops, 7);
    assert_eq!(rig.sim.cache_drops.last(), Some(&(0, PIECE)));
    assert!(
        rig.sim
            .cache_drops
            .iter()
            .all(|&(o, l)| o % PIECE == 0 && l % PIECE == 0 && o + l <= size),
        "every drop covers whole pieces inside the disk: {:?}",
        rig.sim.cache_drops
    );

    assert_eq!(rig.read_all().unwrap(), model, "reads after the drops");
    let mut back = rig.crash_durable_only(3).unwrap();
    assert_eq!(back.read_all().unwrap(), model, "after a crash");
}

/// Two small writes applied together: the first drops piece 0 for the
/// first time, the second is piece 2's second drop, which is due (a
/// checkpoint has passed since piece 2's first drop). Piece 0's drop must
/// not push piece 2's back to the next checkpoint.
#[test]
fn one_pieces_first_drop_does_not_delay_anothers_second() {
    let size = 4 * CHUNK;
    let (mut rig, mut model) = new_rig(10, size, true);
    rig.sim.reorder = false;
    write_settled(&mut rig, &mut model, 1, 0, CHUNK);
    rig.sim.cache_drops.clear();
    write_settled(&mut rig, &mut model, 2, 2 * PIECE + 4096, 4096);
    assert_eq!(rig.sim.cache_drops, vec![(2 * PIECE, PIECE)]);
    // Both records in one journal write, one sync, one apply batch.
    let (a, b) = (4096u64, 2 * PIECE + 8192);
    for (id, off) in [(3u64, a), (4, b)] {
        let data = pattern(id, off, 4096);
        let rid = rig.fresh_id();
        rig.st.write(
            &mut rig.sim,
            rid,
            off,
            payload(&data, WRITE_HEADROOM),
            WRITE_HEADROOM,
            4096,
            false,
        );
        model[off as usize..off as usize + 4096].copy_from_slice(&data);
    }
    rig.flush_sync().unwrap();
    rig.pump();
    assert_eq!(
        rig.sim.cache_drops,
        vec![(2 * PIECE, PIECE), (0, PIECE), (2 * PIECE, PIECE)],
        "piece 0's first drop and piece 2's second, in one batch"
    );
    assert_eq!(rig.read_all().unwrap(), model);
}

/// A large write about to go through the page cache first drops the cache
/// of the whole pieces it covers that hold no large write's folios (never
/// written, or dropped and then filled by small writes), so it writes into
/// an empty range instead of over 4 KiB folios; pieces whose large folios
/// are still there, and edge pieces it covers only in part, are left alone.
#[test]
fn large_writes_first_drop_pieces_without_large_folios() {
    let size = 4 * CHUNK;
    let (mut rig, mut model) = new_rig(11, size, true);
    rig.sim.reorder = false;
    // First write of chunk 0: every piece dropped first (nothing cached).
    write_settled(&mut rig, &mut model, 1, 0, CHUNK);
    assert_eq!(rig.sim.cache_drops, vec![(0, CHUNK)]);
    assert_eq!(rig.st.stats.prewrite_drops, 16);
    // Again: the pieces hold its folios now; nothing to drop.
    write_settled(&mut rig, &mut model, 2, 0, CHUNK);
    assert_eq!(rig.sim.cache_drops.len(), 1);
    // A small write drops piece 1 (small folios from now on)...
    write_settled(&mut rig, &mut model, 3, PIECE + 4096, 4096);
    assert_eq!(rig.sim.cache_drops.last(), Some(&(PIECE, PIECE)));
    // ...so the next large write over it drops piece 1 first, and only it.
    let n = rig.sim.cache_drops.len();
    write_settled(&mut rig, &mut model, 4, 0, CHUNK);
    assert_eq!(rig.sim.cache_drops[n..], [(PIECE, PIECE)]);
    // Unaligned to pieces: only the pieces covered whole (3 to 6 of chunk
    // 1), not the edges the write touches in part.
    let n = rig.sim.cache_drops.len();
    write_settled(&mut rig, &mut model, 5, CHUNK + 2 * PIECE + 4096, 5 * PIECE);
    assert_eq!(rig.sim.cache_drops[n..], [(CHUNK + 3 * PIECE, 4 * PIECE)]);
    assert_eq!(
        rig.st.stats.inplace_writes, 4,
        "the four large writes went in place"
    );
    assert_eq!(rig.read_all().unwrap(), model);
    let mut back = rig.crash_durable_only(4).unwrap();
    assert_eq!(back.read_all().unwrap(), model, "after a crash");
}

/// A disk whose size is no multiple of a piece: the last piece's drop
/// stops at the end of the disk (a zero or longer length would reach past
/// it; fadvise reads 0 as "to the end of the file"), and a large write
/// does not drop the part-piece at the end before it writes.
#[test]
fn drops_stop_at_the_end_of_the_disk() {
    let tail = 5 * 4096;
    let size = 2 * CHUNK + tail;
    let (mut rig, mut model) = new_rig(12, size, true);
    rig.sim.reorder = false;
    write_settled(&mut rig, &mut model, 1, CHUNK, CHUNK + tail);
    assert_eq!(
        rig.st.stats.inplace_writes, 1,
        "the large write went in place"
    );
    assert_eq!(
        rig.sim.cache_drops,
        vec![(CHUNK, CHUNK)],
        "only whole pieces are dropped before the write"
    );
    write_settled(&mut rig, &mut model, 2, 2 * CHUNK + 4096, 4096);
    assert_eq!(rig.sim.cache_drops.last(), Some(&(2 * CHUNK, tail)));
    assert_eq!(rig.read_all().unwrap(), model);
}

#[test]
fn no_drop_before_a_checkpoint_has_synced_the_large_write() {
    let size = 4 * CHUNK;
    // No checkpoint ever runs by itself.
    let (mut rig, mut model) = new_rig(8, size, false);
    write_settled(&mut rig, &mut model, 1, 0, CHUNK);
    write_settled(&mut rig, &mut model, 2, 4096, 4096);
    write_settled(&mut rig, &mut model, 3, 8192, 4096);
    assert_eq!(
        rig.st.stats.cache_drops, 0,
        "the large write's pages may still be dirty: dropping would only write them back"
    );
    assert_eq!(rig.read_all().unwrap(), model);
}

#[test]
fn zeroing_and_mid_sized_writes_leave_no_mark() {
    let size = 8 * CHUNK;
    let (mut rig, mut model) = new_rig(9, size, true);
    // WRITE_ZEROES/TRIM is applied with fallocate: it makes no folios.
    rig.zero_sync(0, 2 * CHUNK, false).unwrap();
    rig.flush_sync().unwrap();
    for _ in 0..4 {
        rig.st.tick(&mut rig.sim);
        rig.pump();
    }
    write_settled(&mut rig, &mut model, 1, 4096, 4096);
    write_settled(&mut rig, &mut model, 2, CHUNK + 4096, 4096);
    assert_eq!(rig.st.stats.cache_drops, 0, "after zeroing");
    // Journaled 16 KiB writes (smaller than a page-cache piece) neither
    // leave a mark nor, written again and again, drop their chunk each time.
    for i in 0..4u64 {
        write_settled(&mut rig, &mut model, 10 + i, 4 * CHUNK + i * 16384, 16384);
        write_settled(
            &mut rig,
            &mut model,
            20 + i,
            4 * CHUNK + 65536 + i * 4096,
            4096,
        );
    }
    assert_eq!(rig.st.stats.cache_drops, 0, "after 16 KiB writes");
    assert_eq!(rig.read_all().unwrap(), model);
}

#[test]
fn pieces_cached_when_the_store_opens_are_dropped_once_before_small_writes() {
    let size = 4 * CHUNK + 3 * PIECE + 4096;
    let (mut rig, mut model) = new_rig(13, size, true);
    rig.sim.reorder = false;
    write_settled(&mut rig, &mut model, 1, 0, 2 * CHUNK);
    rig.drain();
    // A restart: an earlier run's folios are still cached (this run's map
    // is empty). Chunk 0 wholly, chunk 1's pieces 0 and 1 wholly and
    // piece 2 in part, and the last, partial piece of the disk.
    let data = rig.files.data;
    rig.sim
        .page_cache
        .insert(data, vec![(0, CHUNK + 2 * PIECE + 4096), (4 * CHUNK, size)]);
    rig.st = recover(&mut rig.sim, rig.files, rig.tuning).unwrap();
    rig.sim.cache_drops.clear();
    assert_eq!(rig.st.stats.cache_drops, 0);

    // The first small write into a cached piece drops it, at once (the
    // open synced the data file: its pages are clean)...
    write_settled(&mut rig, &mut model, 2, 5 * PIECE + 4096, 4096);
    assert_eq!(rig.sim.cache_drops, vec![(5 * PIECE, PIECE)]);
    // ...and only once.
    write_settled(&mut rig, &mut model, 3, 5 * PIECE + 8192, 4096);
    write_settled(&mut rig, &mut model, 4, 5 * PIECE, 4096);
    assert_eq!(rig.sim.cache_drops.len(), 1);
    // Chunk 1: pieces 0 and 1 were wholly cached, piece 2 only in part.
    write_settled(&mut rig, &mut model, 5, CHUNK + PIECE + 512, 1024);
    write_settled(&mut rig, &mut model, 6, CHUNK + 2 * PIECE, 4096);
    assert_eq!(rig.sim.cache_drops[1..], [(CHUNK + PIECE, PIECE)]);
    // Nothing cached in chunk 3; the disk's partial last piece is never
    // dropped (a drop stops at whole pieces), and the whole ones before it are.
    write_settled(&mut rig, &mut model, 7, 3 * CHUNK + 4096, 4096);
    write_settled(&mut rig, &mut model, 8, 4 * CHUNK + 3 * PIECE, 4096);
    assert_eq!(rig.sim.cache_drops.len(), 2);
    write_settled(&mut rig, &mut model, 9, 4 * CHUNK + PIECE, 4096);
    assert_eq!(rig.sim.cache_drops[2..], [(4 * CHUNK + PIECE, PIECE)]);
    assert_eq!(rig.st.stats.cache_drops, 3);

    // A large write over cached pieces drops them first (they may hold
    // small folios), then marks them as its own.
    let n = rig.sim.cache_drops.len();
    write_settled(&mut rig, &mut model, 10, 0, CHUNK);
    assert_eq!(rig.sim.cache_drops[n..], [(0, CHUNK)]);

    // A backend that cannot tell what is cached: nothing marked.
    rig.drain();
    rig.sim.page_cache.clear();
    rig.st = recover(&mut rig.sim, rig.files, rig.tuning).unwrap();
    rig.sim.cache_drops.clear();
    write_settled(&mut rig, &mut model, 11, CHUNK + 4096, 4096);
    assert!(rig.sim.cache_drops.is_empty());

    assert_eq!(rig.read_all().unwrap(), model);
    let mut back = rig.crash_durable_only(5).unwrap();
    assert_eq!(back.read_all().unwrap(), model, "after a crash");
}

/// Small writes that go in place (the default, from 4 KiB) drop a large
/// write's folios as journaled ones do, before their data is written. When
/// no checkpoint has started since the large write, its pages may be dirty
/// and cannot be dropped yet: small in-place writes fill no ring, so the
/// next checkpoint could be the interval (30 s) away, so they ask for one
/// (at most a second after the last), and the drops follow it.
#[test]
fn small_in_place_writes_ask_for_the_checkpoint_their_drops_need() {
    let size = 4 * CHUNK;
    let tuning = Tuning {
        inplace_min: 4096,
        ..lazy_tuning()
    };
    let mut rig = Rig::new(8, size, 4 * CHUNK, tuning);
    rig.sim.reorder = false;
    let mut model = vec![0u8; size as usize];
    let mut write = |rig: &mut Rig, id: u64, off: u64, len: u64| {
        let data = pattern(id, off, len);
        rig.write_sync(off, &data, false).unwrap();
        model[off as usize..(off + len) as usize].copy_from_slice(&data);
    };
    write(&mut rig, 1, 0, CHUNK);
    let inplace = rig.st.stats.inplace_writes;
    assert!(inplace >= 1, "the large write went in place");
    // A small write into its piece 0: nothing to drop yet (no checkpoint
    // since), but it goes in place all the same.
    write(&mut rig, 2, 4096, 4096);
    assert_eq!(rig.st.stats.inplace_writes, inplace + 1);
    assert_eq!(rig.st.stats.cache_drops, 0);
    assert_eq!(rig.st.stats.checkpoints, 0);
    // The checkpoint it asked for comes within a second or so, with no
    // timer of the tuning's: nothing else would start one for an hour.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    rig.st.tick(&mut rig.sim);
    rig.pump();
    assert_eq!(rig.st.stats.checkpoints, 1, "no checkpoint for the drops");
    // Now small in-place writes drop the pieces they go into, first.
    rig.sim.cache_drops.clear();
    write(&mut rig, 3, PIECE + 8192, 4096);
    assert_eq!(rig.st.stats.inplace_writes, inplace + 2);
    assert_eq!(rig.st.stats.cache_drops, 1);
    assert_eq!(rig.sim.cache_drops, vec![(PIECE, PIECE)], "only the piece");
    // No further checkpoints are asked for.
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write(&mut rig, 4, 2 * PIECE + 8192, 4096);
    rig.st.tick(&mut rig.sim);
    rig.pump();
    assert_eq!(rig.st.stats.checkpoints, 1);
    assert_eq!(rig.st.stats.cache_drops, 2);
    assert_eq!(rig.read_all().unwrap(), model, "reads after the drops");
    rig.flush_sync().unwrap();
    let mut back = rig.crash_durable_only(4).unwrap();
    assert_eq!(back.read_all().unwrap(), model, "after a crash");
}
