//! Fault-injection tests of the replica store on simulated I/O: failed
//! fsyncs, EIO and ENOSPC on journal writes, short writes, data-file read
//! errors, silent corruption of a data block, and back-pressure when the
//! journal ring is full. Each test drives a [`Store`] through the public API
//! with [`SimIo`] faults and checks what the client is told and what survives
//! a crash.

#![allow(clippy::identity_op)]

mod sim_common;

use nbdmirror::sim::{init_replica, CrashMode, Fault, FaultEffect, FaultOn, SimIo};
use nbdmirror::store::format::BLOCK_SIZE;
use nbdmirror::store::{StoreEvent, Tuning, WRITE_HEADROOM};
use sim_common::*;

fn fault(fd: i32, on: FaultOn, effect: FaultEffect) -> Fault {
    Fault {
        fd: Some(fd),
        on,
        skip: 0,
        effect,
        sticky: false,
    }
}

fn verify_on(t: Tuning) -> Tuning {
    Tuning {
        verify_reads: true,
        ..t
    }
}

/// Recover from "only what was fsynced" and return the recovered replica.
fn crash(rig: &mut Rig) -> Rig {
    let sim = rig.sim.crash_copy_mode(99, CrashMode::DurableOnly);
    Rig::open(sim, rig.files, verify_on(rig.tuning)).expect("recovery after the crash")
}

/// (a) A failed journal fsync fails the FLUSH waiting for it and every later
/// FLUSH and FUA write: the data it covered may be gone (Linux drops the
/// dirty pages and reports the error once), so the store must never report
/// it durable, not even after a "successful" retry.
#[test]
fn failed_fsync_is_never_reported_durable() {
    for lazy in [true, false] {
        let tuning = if lazy { lazy_tuning() } else { eager_tuning() };
        let mut rig = Rig::new(1, 1 * MIB, 4 * MIB, tuning);
        let j = rig.files.journal;
        rig.write_sync(0, &pattern(1, 0, 8192), false).unwrap();
        rig.flush_sync().unwrap();
        // The next journal fsync fails once.
        rig.sim
            .faults
            .push(fault(j, FaultOn::Fsync, FaultEffect::Errno(libc::EIO)));
        let w = rig.write_sync(8192, &pattern(2, 8192, 4096), false);
        // With eager syncs the failing fsync may already have run under the
        // plain write (which is then answered before it, from the journal
        // write alone).
        assert_eq!(w, Ok(()), "lazy={lazy}");
        assert_eq!(
            rig.flush_sync(),
            Err(libc::EIO),
            "lazy={lazy}: flush after a failed fsync"
        );
        assert!(
            rig.sim.faults.is_empty(),
            "lazy={lazy}: the fault never fired"
        );
        // No retry pretends success: the fsync would succeed now, but what it
        // covered may be lost.
        assert_eq!(
            rig.flush_sync(),
            Err(libc::EIO),
            "lazy={lazy}: second flush"
        );
        assert_eq!(
            rig.write_sync(16384, &pattern(3, 16384, 4096), true),
            Err(libc::EIO)
        );
        assert_eq!(
            rig.write_sync(16384, &pattern(3, 16384, 4096), false),
            Err(libc::EIO)
        );
        assert!(rig.st.failure().is_some());
        // Reads still work.
        assert_eq!(rig.read_sync(0, 8192).unwrap(), pattern(1, 0, 8192));
        // The data flushed before the failure survives a crash.
        let mut after = crash(&mut rig);
        assert_eq!(after.read_sync(0, 8192).unwrap(), pattern(1, 0, 8192));
        // And a restarted store works again.
        after
            .write_sync(8192, &pattern(4, 8192, 4096), true)
            .unwrap();
        assert_eq!(after.read_sync(8192, 4096).unwrap(), pattern(4, 8192, 4096));
    }
}

/// (a') A FUA write whose covering fsync fails gets an error, as do the
/// FLUSHes and FUA writes waiting with it.
#[test]
fn fua_write_fails_when_its_fsync_fails() {
    let mut rig = Rig::new(2, 1 * MIB, 4 * MIB, lazy_tuning());
    let j = rig.files.journal;
    rig.sim
        .faults
        .push(fault(j, FaultOn::Fsync, FaultEffect::Errno(libc::EIO)));
    let (a, b, f) = (rig.fresh_id(), rig.fresh_id(), rig.fresh_id());
    let data = pattern(5, 4096, 4096);
    rig.st.write(
        &mut rig.sim,
        a,
        4096,
        payload(&data, WRITE_HEADROOM),
        WRITE_HEADROOM,
        4096,
        true,
    );
    rig.st
        .write(&mut rig.sim, b, 12288, payload(&data, 0), 0, 4096, true);
    rig.st.flush(&mut rig.sim, f);
    let ea = rig.wait_event(a);
    let eb = rig.wait_event(b);
    let ef = rig.wait_event(f);
    assert!(
        matches!(ea, StoreEvent::Written(_, Err(libc::EIO))),
        "{ea:?}"
    );
    assert!(
        matches!(eb, StoreEvent::Written(_, Err(libc::EIO))),
        "{eb:?}"
    );
    assert!(
        matches!(ef, StoreEvent::Flushed(_, Err(libc::EIO))),
        "{ef:?}"
    );
}

/// (b) EIO on a write's journal record: that write fails with EIO, the
/// store rewrites the slot as a Void record and keeps serving, and after a
/// crash the writes flushed after it are intact (the chain is not broken).
#[test]
fn eio_on_journal_write_reaches_client_and_store_keeps_serving() {
    for lazy in [true, false] {
        let tuning = if lazy { lazy_tuning() } else { eager_tuning() };
        let mut rig = Rig::new(3, 1 * MIB, 4 * MIB, tuning);
        let j = rig.files.journal;
        rig.write_sync(0, &pattern(1, 0, 4096), false).unwrap();
        rig.sim
            .faults
            .push(fault(j, FaultOn::Write, FaultEffect::Errno(libc::EIO)));
        // Unaligned, to take the copy path and a read-modify-write later.
        let failed = rig.write_sync(4096 + 100, &pattern(2, 4196, 5000), false);
        assert_eq!(failed, Err(libc::EIO), "lazy={lazy}");
        assert!(
            rig.st.failure().is_none(),
            "lazy={lazy}: one failed record poisoned the store"
        );
        // Later writes, flushes and reads work.
        rig.write_sync(16384, &pattern(3, 16384, 8192), false)
            .unwrap();
        rig.write_sync(4096, &pattern(4, 4096, 100), true).unwrap();
        rig.flush_sync().unwrap();
        let mut expect = vec![0u8; 32768];
        expect[..4096].copy_from_slice(&pattern(1, 0, 4096));
        expect[4096..4196].copy_from_slice(&pattern(4, 4096, 100));
        expect[16384..24576].copy_from_slice(&pattern(3, 16384, 8192));
        assert_eq!(
            rig.read_sync(0, 32768).unwrap(),
            expect,
            "lazy={lazy}: live read"
        );
        // Crash before any checkpoint (lazy) or after some (eager).
        let mut after = crash(&mut rig);
        assert_eq!(
            after.read_sync(0, 32768).unwrap(),
            expect,
            "lazy={lazy}: after crash"
        );
        // After a drain and a crash too.
        rig.drain();
        let mut after = crash(&mut rig);
        assert_eq!(
            after.read_sync(0, 32768).unwrap(),
            expect,
            "lazy={lazy}: after drain+crash"
        );
    }
}

/// A FUA write whose journal write is still in flight when the store is
/// poisoned (here: the Void rewrite of an earlier failed record fails too)
/// must get an error, not wait forever for a sync that will never come.
#[test]
fn fua_write_in_flight_when_the_store_is_poisoned_gets_an_error() {
    let mut sim = SimIo::new(11);
    sim.reorder = false;
    let (files, _) = init_replica(&mut sim, 1 * MIB, 4 * MIB);
    let mut rig = Rig::open(sim, files, lazy_tuning()).unwrap();
    let j = files.journal;
    let d = pattern(1, 0, 4096);
    // X's journal write fails; its slot is queued for a Void rewrite.
    rig.sim
        .faults
        .push(fault(j, FaultOn::Write, FaultEffect::Errno(libc::EIO)));
    rig.st.write(
        &mut rig.sim,
        1,
        0,
        payload(&d, WRITE_HEADROOM),
        WRITE_HEADROOM,
        4096,
        false,
    );
    rig.run_op("X's journal write", is_write_to(j));
    assert!(matches!(
        rig.take_event(1),
        Some(StoreEvent::Written(1, Err(libc::EIO)))
    ));
    // Y (FUA) is submitted behind the Void rewrite.
    rig.st.write(
        &mut rig.sim,
        2,
        8192,
        payload(&d, WRITE_HEADROOM),
        WRITE_HEADROOM,
        4096,
        true,
    );
    // The Void rewrite fails: the store is poisoned.
    rig.sim
        .faults
        .push(fault(j, FaultOn::Write, FaultEffect::Errno(libc::EIO)));
    rig.run_op("the Void rewrite", is_write_to(j));
    assert!(rig.st.failure().is_some());
    // Y's journal write completes afterwards.
    rig.run_op("Y's journal write", is_write_to(j));
    rig.pump();
    rig.st.tick(&mut rig.sim);
    rig.pump();
    match rig.take_event(2) {
        Some(StoreEvent::Written(2, Err(libc::EIO))) => {}
        other => panic!("FUA write in flight at poisoning: {other:?}"),
    }
}

/// (c) ENOSPC on the journal write is reported as ENOSPC (not EIO) for that
/// write only.
#[test]
fn enospc_on_journal_write_is_reported_as_enospc() {
    let mut rig = Rig::new(4, 1 * MIB, 4 * MIB, lazy_tuning());
    let j = rig.files.journal;
    rig.sim
        .faults
        .push(fault(j, FaultOn::Write, FaultEffect::Errno(libc::ENOSPC)));
    assert_eq!(
        rig.write_sync(0, &pattern(1, 0, 4096), false),
        Err(libc::ENOSPC)
    );
    // Let the Void rewrite of the failed slot finish first.
    rig.pump();
    // EDQUOT maps to ENOSPC as well.
    rig.sim
        .faults
        .push(fault(j, FaultOn::Write, FaultEffect::Errno(libc::EDQUOT)));
    assert_eq!(
        rig.write_sync(0, &pattern(1, 0, 4096), true),
        Err(libc::ENOSPC)
    );
    rig.write_sync(0, &pattern(2, 0, 4096), true).unwrap();
    assert_eq!(rig.read_sync(0, 4096).unwrap(), pattern(2, 0, 4096));
}

/// (d) Short writes to the journal and to the data file are completed: the
/// data is intact live, after a checkpoint, and after a crash.
#[test]
fn short_writes_are_completed() {
    for (name, on_data) in [("journal", false), ("data", true)] {
        let mut rig = Rig::new(5, 1 * MIB, 4 * MIB, eager_tuning());
        let fd = if on_data {
            rig.files.data
        } else {
            rig.files.journal
        };
        // Faults are consumed in order, each letting one write through
        // first: every other write to the file is short, four times.
        for _ in 0..4 {
            rig.sim.faults.push(Fault {
                fd: Some(fd),
                on: FaultOn::Write,
                skip: 1,
                effect: FaultEffect::ShortWrite,
                sticky: false,
            });
        }
        let mut expect = vec![0u8; 256 * KIB as usize];
        let reqs = [
            (0u64, 65536u64),
            (70000, 30000),
            (131072, 4096),
            (140000, 100),
            (151552, 40960),
            (200000, 9000),
            (212992, 8192),
            (230000, 5),
        ];
        for (i, (off, len)) in reqs.into_iter().enumerate() {
            let d = pattern(10 + i as u64, off, len);
            expect[off as usize..(off + len) as usize].copy_from_slice(&d);
            rig.write_sync(off, &d, i % 2 == 0).unwrap();
        }
        rig.flush_sync().unwrap();
        rig.drain();
        assert!(
            rig.sim.faults.is_empty(),
            "{name}: not every short write fired"
        );
        assert!(rig.st.failure().is_none(), "{name}: {:?}", rig.st.failure());
        assert_eq!(rig.read_sync(0, 256 * KIB).unwrap(), expect, "{name}: live");
        let mut after = crash(&mut rig);
        assert_eq!(
            after.read_sync(0, 256 * KIB).unwrap(),
            expect,
            "{name}: after crash"
        );
    }
}

/// (e) EIO reading the data file: that read fails with EIO, the store keeps
/// serving reads and writes.
#[test]
fn data_file_read_error_fails_the_read_only() {
    let mut rig = Rig::new(6, 1 * MIB, 4 * MIB, eager_tuning());
    let d = rig.files.data;
    rig.write_sync(0, &pattern(1, 0, 65536), false).unwrap();
    rig.drain();
    assert!(rig.st.is_quiet());
    rig.sim
        .faults
        .push(fault(d, FaultOn::Read, FaultEffect::Errno(libc::EIO)));
    assert_eq!(rig.read_sync(4096, 8192), Err(libc::EIO));
    assert_eq!(rig.read_sync(4096, 8192).unwrap(), pattern(1, 4096, 8192));
    // A read in several parts (overlay + data file) with one part failing.
    rig.write_sync(20000, &pattern(2, 20000, 10), false)
        .unwrap();
    rig.sim
        .faults
        .push(fault(d, FaultOn::Read, FaultEffect::Errno(libc::EIO)));
    assert_eq!(rig.read_sync(0, 65536), Err(libc::EIO));
    rig.write_sync(100, &pattern(3, 100, 50), true).unwrap();
    let mut expect = pattern(1, 0, 65536);
    expect[20000..20010].copy_from_slice(&pattern(2, 20000, 10));
    expect[100..150].copy_from_slice(&pattern(3, 100, 50));
    assert_eq!(rig.read_sync(0, 65536).unwrap(), expect);
    assert!(rig.st.failure().is_none());
}

/// (f) A block corrupted on disk after it was applied and checkpointed fails
/// its checksum: reads touching it get EIO, other blocks read fine.
#[test]
fn corrupted_data_block_reads_as_eio_and_others_still_read() {
    let mut rig = Rig::new(7, 1 * MIB, 4 * MIB, eager_tuning());
    let d = rig.files.data;
    let data = pattern(1, 0, 16 * 4096);
    rig.write_sync(0, &data, true).unwrap();
    rig.drain();
    assert!(rig.st.is_quiet());
    // Bit rot in block 5.
    rig.sim.files.get_mut(&d).unwrap().live[5 * 4096 + 123] ^= 0x01;
    assert_eq!(
        rig.read_sync(5 * 4096 + 100, 50),
        Err(libc::EIO),
        "the bad bytes"
    );
    assert_eq!(
        rig.read_sync(5 * 4096 + 3000, 10),
        Err(libc::EIO),
        "other bytes of the bad block"
    );
    assert_eq!(
        rig.read_sync(0, 16 * 4096),
        Err(libc::EIO),
        "a read spanning it"
    );
    assert!(rig.st.stats.checksum_failures >= 3);
    assert_eq!(rig.read_sync(0, 5 * 4096).unwrap(), data[..5 * 4096]);
    assert_eq!(
        rig.read_sync(6 * 4096, 10 * 4096).unwrap(),
        data[6 * 4096..]
    );
    // Rewriting the whole block heals it.
    rig.write_sync(5 * 4096, &pattern(2, 5 * 4096, 4096), false)
        .unwrap();
    rig.flush_sync().unwrap();
    rig.drain();
    assert_eq!(
        rig.read_sync(5 * 4096, 4096).unwrap(),
        pattern(2, 5 * 4096, 4096)
    );
    // A block of zeroes corrupted to non-zero fails too.
    rig.sim.files.get_mut(&d).unwrap().live[100 * 4096] = 1;
    assert_eq!(rig.read_sync(100 * 4096, 4096), Err(libc::EIO));
}

/// A partial write over a block that fails its checksum: the apply pass keeps
/// the block marked corrupt, so the bytes the client did not rewrite are never
/// served as good data (EIO until the whole block is rewritten).
#[test]
fn partial_write_over_a_corrupted_block_keeps_reporting_the_corruption() {
    let mut rig = Rig::new(8, 1 * MIB, 4 * MIB, eager_tuning());
    let d = rig.files.data;
    rig.write_sync(0, &pattern(1, 0, 4096), true).unwrap();
    rig.drain();
    rig.sim.files.get_mut(&d).unwrap().live[3000] ^= 0x01;
    rig.write_sync(10, &pattern(2, 10, 10), true).unwrap();
    rig.drain();
    let r = rig.read_sync(2990, 20);
    assert!(
        r.is_err() || r.as_ref().unwrap() == &pattern(1, 2990, 20),
        "corrupted bytes returned as data: {r:?}"
    );
}

/// (g) Back-pressure: far more data than the journal holds, written without
/// FLUSH, all in flight at once: every write succeeds (none errors or hangs)
/// and the disk ends up with the last data, live and after a crash.
#[test]
fn full_journal_applies_back_pressure_and_every_write_succeeds() {
    for (name, tuning) in [("lazy", lazy_tuning()), ("eager", eager_tuning())] {
        let size = 8 * MIB;
        let mut rig = Rig::new(9, size, 4 * MIB, tuning);
        let mut expect = vec![0u8; size as usize];
        let mut ids = Vec::new();
        let mut rng = nbdmirror::sim::Rng::new(42);
        // ~40 MiB of writes of 4 KiB .. 1.5 MiB, plus one write bigger than
        // the whole journal.
        let mut reqs: Vec<(u64, u64)> = (0..120)
            .map(|_| {
                let len = [4096, 65536, 300_000, 1_000_000, 1_500_000][rng.below(5) as usize];
                (rng.below(size - len), len)
            })
            .collect();
        reqs.push((512, 6 * MIB));
        for (n, &(off, len)) in reqs.iter().enumerate() {
            let id = rig.fresh_id();
            let d = pattern(id, off, len);
            expect[off as usize..(off + len) as usize].copy_from_slice(&d);
            let at = if n % 2 == 0 { WRITE_HEADROOM } else { 3 };
            rig.st.write(
                &mut rig.sim,
                id,
                off,
                payload(&d, at),
                at,
                len as usize,
                false,
            );
            ids.push(id);
        }
        for id in ids {
            match rig.wait_event(id) {
                StoreEvent::Written(_, Ok(())) => {}
                e => panic!("{name}: {e:?}"),
            }
        }
        assert!(
            rig.st.stats.checkpoints > 0,
            "{name}: the ring never filled?"
        );
        assert_eq!(rig.read_sync(0, size).unwrap(), expect, "{name}: live");
        rig.flush_sync().unwrap();
        let mut after = crash(&mut rig);
        assert_eq!(
            after.read_sync(0, size).unwrap(),
            expect,
            "{name}: after crash"
        );
    }
}

/// An I/O error reading one superblock slot must not make recovery fall back
/// to the other (older) slot silently: its journal tail can point into ring
/// space that newer records have reused, and recovery would then drop flushed
/// writes. Either refuse to open or recover everything.
#[test]
fn superblock_slot_read_error_does_not_roll_back_to_the_older_slot() {
    // Checkpoints only when the ring is full, so the ring wraps between two
    // checkpoints and overwrites the records behind the older slot's tail.
    let tuning = lazy_tuning();
    let size = 4 * MIB;
    let mut rig = Rig::new(10, size, 4 * MIB, tuning);
    let mut expect = vec![0u8; size as usize];
    let mut i = 0u64;
    let mut since_ckpt = 0;
    let mut last_ckpts = 0;
    loop {
        let off = (i * 37 % 15) * 262144;
        let d = pattern(100 + i, off, 262144);
        expect[off as usize..off as usize + d.len()].copy_from_slice(&d);
        rig.write_sync(off, &d, false).unwrap();
        rig.flush_sync().unwrap();
        i += 1;
        if rig.st.stats.checkpoints != last_ckpts {
            last_ckpts = rig.st.stats.checkpoints;
            since_ckpt = 0;
        } else {
            since_ckpt += 1;
        }
        // Two checkpoints done, then most of a lap of flushed writes that
        // are in the journal only.
        if last_ckpts >= 2 && since_ckpt == 10 {
            break;
        }
        assert!(i < 200, "no checkpoints?");
    }
    let newest = rig.st.superblock().write_counter;
    let mut sim: SimIo = rig.sim.crash_copy_mode(1, CrashMode::DurableOnly);
    // The slot holding the newest superblock cannot be read.
    sim.faults.push(Fault {
        fd: Some(rig.files.meta),
        on: FaultOn::Read,
        skip: newest % 2,
        effect: FaultEffect::Errno(libc::EIO),
        sticky: false,
    });
    match Rig::open(sim, rig.files, verify_on(tuning)) {
        Err(e) => eprintln!("refused, as it may: {e}"),
        Ok(mut after) => {
            let got = after
                .read_sync(0, size)
                .expect("recovered from the older superblock: the disk does not even read back");
            let bad = got.iter().zip(&expect).filter(|(a, b)| a != b).count();
            assert_eq!(
                bad, 0,
                "{bad} bytes of flushed writes lost after recovering from the older superblock"
            );
        }
    }
}

/// Sanity: `init_replica` makes a replica the store opens, reading zeroes.
#[test]
fn fresh_sim_replica_reads_zeroes() {
    let mut sim = SimIo::new(0);
    let (files, sb) = init_replica(&mut sim, 256 * KIB, 4 * MIB);
    assert_eq!(sb.size, 256 * KIB);
    let mut rig = Rig::open(sim, files, eager_tuning()).unwrap();
    assert_eq!(
        rig.read_sync(0, 256 * KIB).unwrap(),
        vec![0u8; 256 * KIB as usize]
    );
    assert_eq!(BLOCK_SIZE, 4096);
}

/// WRITE_ZEROES is applied with FALLOC_FL_PUNCH_HOLE. Where the data file
/// cannot punch holes (EOPNOTSUPP: some filesystems and block devices),
/// recovery already falls back to writing zeroes; the live apply path must
/// too, rather than poison the store.
#[test]
fn zeroes_are_applied_where_punch_hole_is_unsupported() {
    let mut rig = Rig::new(12, 1 * MIB, 4 * MIB, eager_tuning());
    let d = rig.files.data;
    rig.write_sync(0, &pattern(1, 0, 65536), true).unwrap();
    rig.drain();
    // Every fallocate on the data file fails (FaultOn::Write also covers
    // data writes, so let plain writes through by matching fallocates only:
    // the zero range is block aligned, so its apply is a single fallocate).
    rig.sim.faults.push(Fault {
        fd: Some(d),
        on: FaultOn::Write,
        skip: 0,
        effect: FaultEffect::Errno(libc::EOPNOTSUPP),
        sticky: false,
    });
    rig.zero_sync(8192, 16384, true).unwrap();
    rig.drain();
    assert!(
        rig.st.failure().is_none(),
        "store poisoned: {:?}",
        rig.st.failure()
    );
    let mut expect = pattern(1, 0, 65536);
    expect[8192..24576].fill(0);
    assert_eq!(rig.read_sync(0, 65536).unwrap(), expect);
    let mut after = crash(&mut rig);
    assert_eq!(after.read_sync(0, 65536).unwrap(), expect);
    // And the store still takes writes.
    rig.write_sync(0, &pattern(2, 0, 4096), true).unwrap();
}

/// A data-file write error while applying journaled writes: the store stops
/// taking writes and flushes (it cannot keep its durability promises), and
/// everything it acknowledged as durable is recovered from the journal.
#[test]
fn apply_failure_poisons_the_store_and_the_journal_keeps_the_data() {
    let mut rig = Rig::new(13, 1 * MIB, 4 * MIB, eager_tuning());
    let d = rig.files.data;
    rig.sim
        .faults
        .push(fault(d, FaultOn::Write, FaultEffect::Errno(libc::EIO)));
    rig.write_sync(0, &pattern(1, 0, 8192), true).unwrap();
    rig.pump();
    assert!(rig.st.failure().is_some(), "apply failure not noticed");
    assert_eq!(
        rig.write_sync(8192, &pattern(2, 8192, 4096), false),
        Err(libc::EIO)
    );
    assert_eq!(rig.flush_sync(), Err(libc::EIO));
    // Still readable (from the overlay).
    assert_eq!(rig.read_sync(0, 8192).unwrap(), pattern(1, 0, 8192));
    let mut after = crash(&mut rig);
    assert_eq!(after.read_sync(0, 8192).unwrap(), pattern(1, 0, 8192));
    assert_eq!(after.read_sync(8192, 4096).unwrap(), vec![0; 4096]);
}

/// A checkpoint whose checksum-table write fails: the store is poisoned,
/// and the replica recovers with every flushed write and valid checksums.
#[test]
fn checkpoint_failure_poisons_the_store_and_recovery_is_clean() {
    let mut rig = Rig::new(14, 1 * MIB, 4 * MIB, eager_tuning());
    let m = rig.files.meta;
    rig.sim
        .faults
        .push(fault(m, FaultOn::Write, FaultEffect::Errno(libc::EIO)));
    rig.write_sync(4096, &pattern(1, 4096, 12288), true)
        .unwrap();
    rig.write_sync(100_000, &pattern(2, 100_000, 5000), false)
        .unwrap();
    rig.flush_sync().unwrap();
    rig.pump();
    assert!(rig.st.failure().is_some(), "checkpoint failure not noticed");
    assert_eq!(rig.write_sync(0, &pattern(3, 0, 10), true), Err(libc::EIO));
    assert_eq!(rig.flush_sync(), Err(libc::EIO));
    let mut after = crash(&mut rig);
    assert_eq!(
        after.read_sync(4096, 12288).unwrap(),
        pattern(1, 4096, 12288)
    );
    assert_eq!(
        after.read_sync(100_000, 5000).unwrap(),
        pattern(2, 100_000, 5000)
    );
    // Whole disk verifies.
    after.read_all().unwrap();
}

/// In-place writes through a direct (O_DIRECT) descriptor: when the
/// filesystem refuses one (EINVAL, e.g. an alignment it does not take), the
/// write is made through the page cache instead, the client sees success,
/// later writes skip the direct descriptor, and a flushed write survives a
/// crash. Another error on the direct descriptor is a real disk error and
/// reaches the client.
#[test]
fn refused_direct_write_falls_back_to_the_page_cache() {
    let tuning = Tuning {
        inplace_min: 64 * KIB,
        inplace_regions: nbdmirror::store::INPLACE_REGIONS,
        // Large writes start where in-place ones do, as they did before
        // small writes went in place.
        large_write: 64 * KIB,
        vouch_inplace: false,
        ..lazy_tuning()
    };
    let mut rig = Rig::new(5, 4 * MIB, 4 * MIB, tuning);
    let direct = rig.sim.alias_fd(rig.files.data);
    rig.st.set_direct_fd(Some(direct));

    // A direct write that works.
    let a = pattern(1, 0, 256 * KIB);
    rig.write_sync(0, &a, false).unwrap();
    assert_eq!(rig.st.stats.inplace_writes, 1);

    // The next one is refused with EINVAL, then succeeds buffered.
    rig.sim.faults.push(fault(
        direct,
        FaultOn::Write,
        FaultEffect::Errno(libc::EINVAL),
    ));
    let b = pattern(2, MIB, 256 * KIB);
    rig.write_sync(MIB, &b, true).unwrap();
    assert!(
        rig.st.failure().is_none(),
        "a refused direct write is no disk failure"
    );
    assert_eq!(rig.st.stats.inplace_writes, 2);
    // Direct I/O is off now: a fault on the direct descriptor is never hit.
    rig.sim.faults.push(Fault {
        sticky: true,
        ..fault(direct, FaultOn::Write, FaultEffect::Errno(libc::EIO))
    });
    let c = pattern(3, 2 * MIB, 256 * KIB);
    rig.write_sync(2 * MIB, &c, false).unwrap();
    rig.flush_sync().unwrap();
    rig.sim.faults.clear();
    let mut after = crash(&mut rig);
    assert_eq!(after.read_sync(0, 256 * KIB).unwrap(), a);
    assert_eq!(after.read_sync(MIB, 256 * KIB).unwrap(), b);
    assert_eq!(after.read_sync(2 * MIB, 256 * KIB).unwrap(), c);

    // EIO on a direct write is a disk error: the client is told.
    let mut rig = Rig::new(6, 4 * MIB, 4 * MIB, tuning);
    let direct = rig.sim.alias_fd(rig.files.data);
    rig.st.set_direct_fd(Some(direct));
    rig.sim
        .faults
        .push(fault(direct, FaultOn::Write, FaultEffect::Errno(libc::EIO)));
    assert_eq!(rig.write_sync(0, &a, false), Err(libc::EIO));
}

/// A data-file write that fails for want of space poisons the store as any
/// write error does, but writes and flushes then get ENOSPC, not EIO, so
/// the client learns the cause (found by a tester: a full filesystem read
/// as a broken disk).
#[test]
fn apply_failure_for_want_of_space_is_reported_as_enospc() {
    let mut rig = Rig::new(15, 1 * MIB, 4 * MIB, eager_tuning());
    let d = rig.files.data;
    rig.sim
        .faults
        .push(fault(d, FaultOn::Write, FaultEffect::Errno(libc::ENOSPC)));
    rig.write_sync(0, &pattern(1, 0, 8192), true).unwrap();
    rig.pump();
    assert!(rig.st.failure().is_some(), "apply failure not noticed");
    assert_eq!(
        rig.write_sync(8192, &pattern(2, 8192, 4096), false),
        Err(libc::ENOSPC)
    );
    assert_eq!(rig.flush_sync(), Err(libc::ENOSPC));
    let mut after = crash(&mut rig);
    assert_eq!(after.read_sync(0, 8192).unwrap(), pattern(1, 0, 8192));
}

/// An in-place write that fails for want of space after some of its pieces
/// reached the data file: the client is told ENOSPC, and reads of the range
/// give each block's old or new data, never EIO (a tester's find: a full
/// filesystem made 176 blocks fail verification, logged as corruption,
/// until a restart). After a crash either copy is still what reads return.
#[test]
fn in_place_write_failing_part_way_leaves_readable_blocks() {
    let tuning = verify_on(Tuning {
        inplace_min: 64 * KIB,
        inplace_regions: nbdmirror::store::INPLACE_REGIONS,
        // Large writes start where in-place ones do, as they did before
        // small writes went in place.
        large_write: 64 * KIB,
        vouch_inplace: false,
        ..lazy_tuning()
    });
    let mut rig = Rig::new(16, 4 * MIB, 4 * MIB, tuning);
    let old = pattern(1, 0, 256 * KIB);
    rig.write_sync(0, &old, false).unwrap();
    rig.flush_sync().unwrap();
    assert_eq!(rig.st.stats.inplace_writes, 1);
    let d = rig.files.data;
    rig.sim.faults.push(Fault {
        skip: 2,
        ..fault(d, FaultOn::Write, FaultEffect::Errno(libc::ENOSPC))
    });
    let new = pattern(2, 0, 256 * KIB);
    assert_eq!(rig.write_sync(0, &new, false), Err(libc::ENOSPC));
    assert!(rig.st.failure().is_some());
    let got = rig
        .read_sync(0, 256 * KIB)
        .expect("reads after the failed write");
    let mut from_new = 0;
    for (i, (g, (o, n))) in got
        .chunks(4096)
        .zip(old.chunks(4096).zip(new.chunks(4096)))
        .enumerate()
    {
        assert!(g == o || g == n, "block {i} holds neither copy");
        from_new += (g == n) as usize;
    }
    assert!(
        from_new > 0,
        "no piece of the failed write reached the data file"
    );
    assert_eq!(rig.st.stats.checksum_failures, 0);
    rig.sim.faults.clear();
    let mut after = crash(&mut rig);
    let got = after.read_sync(0, 256 * KIB).unwrap();
    for (g, (o, n)) in got.chunks(4096).zip(old.chunks(4096).zip(new.chunks(4096))) {
        assert!(g == o || g == n);
    }
}

/// A large write that finds the journal ring too full for its in-place
/// intent record is journaled instead (and waits for room like any other
/// write). It used to be dropped: never written, never answered (a
/// reviewer's find), which a client sees as a write that hangs for good.
#[test]
fn large_write_meeting_a_full_ring_is_journaled_not_lost() {
    // The ring full; and one 512-byte slot left, which the intent of the
    // write's first 16 MiB region takes, so that its second region's fails.
    large_write_meeting_a_full_ring(8192, 48 * MIB);
    large_write_meeting_a_full_ring(8191, 48 * MIB - 512 * 1024);
}

fn large_write_meeting_a_full_ring(fill: u64, at: u64) {
    let t = Tuning {
        inplace_min: 64 * 1024,
        inplace_regions: nbdmirror::store::INPLACE_REGIONS,
        // Large writes start where in-place ones do, as they did before
        // small writes went in place.
        large_write: 64 * 1024,
        vouch_inplace: false,
        ..lazy_tuning()
    };
    let mut rig = Rig::new(1, 64 * MIB, 4 * MIB, t);
    // Fill the 4 MiB ring with small records (512 bytes each with their
    // headers), nothing applied yet.
    let mut small = Vec::new();
    for i in 0..fill {
        let id = rig.fresh_id();
        let d = pattern(id, i * 4096, 448);
        rig.st.write(
            &mut rig.sim,
            id,
            i * 4096,
            payload(&d, WRITE_HEADROOM),
            WRITE_HEADROOM,
            448,
            false,
        );
        small.push((id, i * 4096, d));
    }
    let big = rig.fresh_id();
    let d = pattern(big, at, MIB);
    rig.st.write(
        &mut rig.sim,
        big,
        at,
        payload(&d, WRITE_HEADROOM),
        WRITE_HEADROOM,
        MIB as usize,
        false,
    );
    let mut answered = None;
    let mut idle = 0;
    for _ in 0..1_000_000 {
        rig.st.drain_events(&mut rig.events);
        if let Some(r) = rig.events.iter().find_map(|e| match e {
            StoreEvent::Written(i, r) if *i == big => Some(*r),
            _ => None,
        }) {
            answered = Some(r);
            break;
        }
        if rig.sim.pending() == 0 {
            idle += 1;
            assert!(
                idle < 1000,
                "the store went idle without answering the write"
            );
            rig.st.tick(&mut rig.sim);
            continue;
        }
        idle = 0;
        rig.step(usize::MAX);
    }
    assert_eq!(answered, Some(Ok(())), "the large write was not answered");
    rig.flush_sync().unwrap();
    assert_eq!(rig.read_sync(at, MIB).unwrap(), d, "fill {fill}, at {at}");
    for (_, off, d) in small.iter().step_by(997) {
        assert_eq!(&rig.read_sync(*off, 448).unwrap(), d);
    }
}
