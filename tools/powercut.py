#!/usr/bin/python3
"""powercut.py: the client side of the power-cut test (tools/vm-power-cut.sh).

An NBD server runs in a qemu guest with its files on the guest's own disk.
`write` drives it through libnbd with writes, WRITE_ZEROES, FUA and FLUSH at
several requests in flight, then cuts the power (SIGKILL to qemu) at a random
moment: everything in the guest's page cache is lost, as at a real power
failure, while what the guest wrote to its disk survives. After the guest
boots again and the server recovered, `check` reads the whole disk and
compares it with the model the writer kept.

The model is per 512-byte sector: the versions the sector may hold. Every
write gets a version number; a sector's content is a function of (sector,
version), so a sector shows which write it came from (version 0 is all
zeroes: the new disk and WRITE_ZEROES). A write that completed before a FLUSH
was sent, once that FLUSH completed, and a FUA write once it completed, are
durable: the sector may hold that version or a later one (a later write may
or may not have reached the disk), never an earlier one. Writes in flight are
never overlapping, so each sector's versions are totally ordered.

`check` fails on: a sector holding data no write put there, a sector holding
an older version than one made durable (lost flushed data), and a read error
(the server must not fail reads of what a crash left behind). Afterwards the
model holds what was read: after a fresh boot it came from the guest's disk,
so it is durable.

Run with /usr/bin/python3 (Debian's python3-libnbd).
"""

import argparse
import os
import pickle
import random
import signal
import struct
import sys
import time

import nbd

SECTOR = 512
ZERO = 0
FILL_MUL = 0x9E3779B97F4A7C15
MASK = (1 << 64) - 1
ZEROS = bytes(SECTOR)


def content(sector, version):
    """The 512 bytes a sector holds after write `version` (0: zeroes)."""
    if version == ZERO:
        return ZEROS
    fill = struct.pack("<Q", (version * FILL_MUL + sector) & MASK)
    return struct.pack("<QQ", sector, version) + fill * 62


def payload(first, count, version):
    return b"".join(content(s, version) for s in range(first, first + count))


class Model:
    """Per sector: the acceptable versions, oldest first (the first one is
    the durable floor), and how many versions were dropped before them."""

    def __init__(self, sectors):
        self.vers = [[ZERO] for _ in range(sectors)]
        self.base = [0] * sectors
        self.next_version = 1
        self.cycle = 0

    def issue(self, first, count, version):
        """Record a write issued; returns each sector's absolute position."""
        pos = []
        for s in range(first, first + count):
            pos.append(self.base[s] + len(self.vers[s]))
            self.vers[s].append(version)
        return pos

    def durable(self, first, pos):
        """The write issued at `pos` of each sector is durable."""
        for i, p in enumerate(pos):
            s = first + i
            drop = p - self.base[s]
            if drop > 0:
                del self.vers[s][:drop]
                self.base[s] = p


def connect(uri):
    h = nbd.NBD()
    h.set_handle_name("powercut")
    h.connect_uri(uri)
    return h


def pick_range(rng, sectors, busy):
    """A random extent of sectors not overlapping any in flight."""
    for _ in range(50):
        r = rng.random()
        if r < 0.40:
            count = 8
            first = rng.randrange(0, sectors // 8) * 8
        elif r < 0.55:
            count = rng.randint(1, 7)
            first = rng.randrange(0, sectors - count)
        elif r < 0.75:
            count = rng.randint(9, 256)
            first = rng.randrange(0, sectors - count)
        elif r < 0.90:
            count = 2048
            first = rng.randrange(0, sectors // 2048) * 2048
        else:
            count = rng.randint(256, 4096)
            first = rng.randrange(0, sectors - count)
        if all(first + count <= a or b <= first for a, b in busy.values()):
            return first, count
    return None


def cmd_write(args):
    with open(args.model, "rb") as f:
        model = pickle.load(f)
    rng = random.Random(args.seed)
    h = connect(args.uri)
    size = h.get_size()
    sectors = size // SECTOR
    assert sectors == len(model.vers), "disk size changed"
    can_fua = h.can_fua()
    model.cycle += 1
    cut_after = rng.uniform(args.min_seconds, args.max_seconds)
    start = time.monotonic()
    inflight = {}  # cookie -> (kind, first, pos, fua, writes a FLUSH makes durable)
    busy = {}  # cookie -> (first, end) of writes in flight
    since_flush = []  # writes completed since the last FLUSH was sent
    flush = None  # (cookie, writes it makes durable)
    stats = dict(writes=0, zeroes=0, fua=0, flushes=0, bytes=0, acked=0)
    durable_writes = 0
    killed = False
    stopping = False  # no cut (no --kill-pid): stop issuing, then flush
    final_sent = False
    in_flight_at_cut = 0
    bufs = {}  # cookie -> the payload buffer libnbd reads from

    def complete(cookie):
        nonlocal flush, durable_writes
        kind, first, pos, fua, keep = inflight.pop(cookie)
        busy.pop(cookie, None)
        if kind == "flush":
            for w in keep:
                model.durable(w[0], w[1])
            durable_writes += len(keep)
            flush = None
            stats["flushes"] += 1
            return
        stats["acked"] += 1
        since_flush.append((first, pos))
        if fua:
            model.durable(first, pos)
            durable_writes += 1

    while True:
        now = time.monotonic() - start
        if not killed and not stopping and now >= cut_after:
            if args.kill_pid:
                for pid in args.kill_pid:
                    os.kill(pid, signal.SIGKILL)
                killed = True
                in_flight_at_cut = len(inflight)
            else:
                stopping = True
        if not killed and not stopping:
            while len(inflight) < args.depth:
                r = rng.random()
                if r < 0.06 and flush is None and since_flush:
                    keep = list(since_flush)
                    since_flush.clear()
                    c = h.aio_flush()
                    flush = c
                    inflight[c] = ("flush", 0, None, False, keep)
                    continue
                ext = pick_range(rng, sectors, busy)
                if ext is None:
                    break
                first, count = ext
                version = model.next_version
                zero = r > 0.94
                if zero:
                    version = ZERO
                else:
                    model.next_version += 1
                fua = can_fua and rng.random() < 0.1
                flags = nbd.CMD_FLAG_FUA if fua else 0
                pos = model.issue(first, count, version)
                if zero:
                    c = h.aio_zero(count * SECTOR, first * SECTOR, flags=flags)
                    stats["zeroes"] += 1
                else:
                    buf = nbd.Buffer.from_bytearray(bytearray(payload(first, count, version)))
                    c = h.aio_pwrite(buf, first * SECTOR, flags=flags)
                    stats["writes"] += 1
                    bufs[c] = buf
                stats["bytes"] += count * SECTOR
                stats["fua"] += fua
                inflight[c] = ("write", first, pos, fua, None)
                busy[c] = (first, first + count)
        if not inflight:
            if killed or final_sent:
                break
            if stopping:
                # No cut: one last FLUSH makes every write durable.
                c = h.aio_flush()
                inflight[c] = ("flush", 0, None, False, list(since_flush))
                since_flush.clear()
                final_sent = True
            continue
        try:
            h.poll(100 if not killed else 1000)
        except nbd.Error:
            break  # the connection died with the guest
        done = []
        for c in list(inflight):
            try:
                if h.aio_command_completed(c):
                    done.append(c)
            except nbd.Error as e:
                if killed:
                    inflight.pop(c)
                    busy.pop(c, None)
                    continue
                print(f"powercut: FAIL: a request failed before the power cut: {e}", file=sys.stderr)
                return 1
        for c in done:
            complete(c)
            bufs.pop(c, None)
        if killed and h.aio_is_dead():
            break
    what = (f"power cut after {cut_after:.2f}s with {in_flight_at_cut} request(s) in flight"
            if killed else f"wrote for {cut_after:.2f}s, then flushed")
    print(
        f"powercut: cycle {model.cycle}: {what}; {stats['writes']} writes + {stats['zeroes']} zeroes "
        f"({stats['bytes'] >> 20} MiB, {stats['fua']} FUA), {stats['acked']} acknowledged, "
        f"{stats['flushes']} flushes completed, {durable_writes} writes made durable"
    )
    if durable_writes == 0:
        print("powercut: FAIL: nothing was made durable before the cut (raise the time)", file=sys.stderr)
        return 1
    with open(args.model + ".tmp", "wb") as f:
        pickle.dump(model, f)
    os.replace(args.model + ".tmp", args.model)
    return 0


def cmd_init(args):
    size = args.size_mib << 20
    with open(args.model, "wb") as f:
        pickle.dump(Model(size // SECTOR), f)
    return 0


def cmd_check(args):
    with open(args.model, "rb") as f:
        model = pickle.load(f)
    h = connect(args.uri)
    size = h.get_size()
    sectors = size // SECTOR
    if sectors != len(model.vers):
        print(f"powercut: FAIL: the disk has {size} bytes, the model {len(model.vers) * SECTOR}", file=sys.stderr)
        return 1
    chunk = 1 << 20
    lost = garbage = 0
    errors = []
    report = []
    for off in range(0, size, chunk):
        try:
            data = h.pread(min(chunk, size - off), off)
        except nbd.Error as e:
            errors.append(f"read of {off}+{chunk} failed: {e}")
            for s in range(off // SECTOR, (off + chunk) // SECTOR):
                model.vers[s] = [model.vers[s][0]]
            continue
        for i in range(len(data) // SECTOR):
            s = off // SECTOR + i
            got = data[i * SECTOR:(i + 1) * SECTOR]
            if got == ZEROS:
                v = ZERO
            else:
                hs, hv = struct.unpack_from("<QQ", got)
                v = hv if hs == s and got == content(s, hv) else None
            ok = model.vers[s]
            if v is None:
                garbage += 1
                if len(report) < 10:
                    report.append(f"sector {s} (byte {s * SECTOR}) holds data no write put there "
                                  f"(header {got[:16].hex()}); expected one of versions {ok[:8]}")
            elif v not in ok:
                lost += 1
                if len(report) < 10:
                    report.append(f"sector {s} (byte {s * SECTOR}) holds version {v}, older than "
                                  f"durable version {ok[0]} (acceptable: {ok[:8]})")
            model.vers[s] = [v if v is not None else ok[0]]
            model.base[s] = 0
    try:
        h.shutdown()
    except nbd.Error:
        pass
    for line in errors[:10] + report:
        print("powercut:   " + line, file=sys.stderr)
    if errors or lost or garbage:
        print(f"powercut: FAIL: after power cut {model.cycle}: {len(errors)} read error(s), {lost} sector(s) "
              f"lost flushed data, {garbage} sector(s) hold garbage", file=sys.stderr)
        return 1
    with open(args.model + ".tmp", "wb") as f:
        pickle.dump(model, f)
    os.replace(args.model + ".tmp", args.model)
    print(f"powercut: check after power cut {model.cycle}: all {sectors} sectors hold a version "
          f"they may hold; no read error")
    return 0


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    i = sub.add_parser("init", help="a model of a new all-zero disk")
    i.add_argument("--model", required=True)
    i.add_argument("--size-mib", type=int, required=True)
    w = sub.add_parser("write", help="write, then cut the power at a random moment")
    w.add_argument("--model", required=True)
    w.add_argument("--uri", required=True)
    w.add_argument("--kill-pid", type=int, action="append", default=[],
                   help="the process(es) to kill at the cut: qemu, and a host primary; "
                   "none: write until the time is up, then FLUSH")
    w.add_argument("--seed", type=int, default=None)
    w.add_argument("--depth", type=int, default=8)
    w.add_argument("--min-seconds", type=float, default=3.0)
    w.add_argument("--max-seconds", type=float, default=8.0)
    c = sub.add_parser("check", help="read the disk back and compare with the model")
    c.add_argument("--model", required=True)
    c.add_argument("--uri", required=True)
    args = p.parse_args()
    return {"init": cmd_init, "write": cmd_write, "check": cmd_check}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
