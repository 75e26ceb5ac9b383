#!/usr/bin/env python3
"""resyncbench: measure nbdmirror's resync against the two resync targets of issue 4.

Stdlib only (3.8+).  See benches/README.md ("Resync benchmark") for usage and output.

  1. throughput: resync of 1 GiB of dirty data >= 1 GiB/s unthrottled.
     A 2-node volume on loopback; the secondary is stopped, --size bytes of random data
     are written to the primary (so the peer's bitmap has --size bytes dirty), the
     secondary is started again and the time until the primary reports it `in_sync` is
     measured, both by polling `nbdmirror resync status` (every 50 ms, from the start of
     the secondary process) and from the primary's own line
     "peer 2 (...) is in sync: resync took X s" (from link establishment).
  2. iops: client IOPS during a rate-limited resync >= 70% of idle.
     fio randwrite 4k QD32 against the primary with the peer in_sync (idle), then again
     while a resync capped at --rate runs (the peer was stopped while a few GiB were
     written, so the resync lasts longer than the fio run).

  3. scrub (not an issue target; reported): the time an unthrottled scrub of the whole
     (prefilled, mirrored) disk takes, and client IOPS during a scrub capped at --rate
     against idle (fio randwrite 4k QD32, as in 2).  Each pass must find nothing.

Every repetition uses a fresh volume.  After each repetition both nodes are stopped
(SIGTERM) and their data files are compared byte for byte.
Helpers (process handling, fio invocation, sizes) come from nbdbench.py next to this file.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import mmap
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Optional

sys.dont_write_bytecode = True  # no benches/__pycache__ from the import below
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import nbdbench as nb  # noqa: E402  (same directory; stdlib only)

HOST = nb.HOST
REPO_ROOT = nb.REPO_ROOT
GIB = 1 << 30
MIB = 1 << 20
PEER = 2                       # the secondary's node id
POLL_S = 0.05                  # status poll interval while timing a resync
SAMPLE_S = 0.5                 # status sample interval during the IOPS-under-resync run
IOPS_JOB = {"rw": "randwrite", "bs": "4k", "iodepth": 32}
FILL_JOB = {"rw": "write", "bs": "1m", "iodepth": 8, "end_fsync": 1}
# random, incompressible, never all-zero buffers (nbdmirror sends an all-zero run as a
# zero record); randrepeat=0: different data in every run
RANDOM_DATA = ["--refill_buffers", "--randrepeat=0"]

# (key, description, wanted, unit): checked against the medians
TARGETS = [
    ("resync_gib_s_own", "resync throughput, unthrottled (nbdmirror's timer: link up -> in_sync)",
     1.0, "GiB/s"),
    ("resync_gib_s_wall", "resync throughput, unthrottled (wall: secondary start -> in_sync seen)",
     1.0, "GiB/s"),
    ("iops_ratio", "client IOPS during rate-limited resync / idle IOPS", 0.70, "x"),
]

log = nb.log


# ------------------------------------------------------------------- the volume

class Volume:
    """A 2-node nbdmirror volume on loopback: node 1 (primary, serves NBD on P1, mirrors to
    node 2) and node 2 (secondary, replication stream on P2).  Each in its own directory."""

    def __init__(self, args, root: str, tag: str, disk: int, secret: str):
        self.args, self.tag, self.disk, self.secret = args, tag, disk, secret
        self.bin = args.bin if os.path.isabs(args.bin) else os.path.join(REPO_ROOT, args.bin)
        self.base = os.path.join(root, tag)
        self.d1, self.d2 = os.path.join(self.base, "node1"), os.path.join(self.base, "node2")
        self.logdir = os.path.join(root, "logs")
        self.p1, self.p2 = nb.free_port(), nb.free_port()
        self.uri = f"nbd://{HOST}:{self.p1}/"
        self.primary: Optional[subprocess.Popen] = None
        self.secondary: Optional[subprocess.Popen] = None
        self.primary_log = os.path.join(self.logdir, f"{tag}.node1.log")
        self.nsec = 0              # secondary starts so far (one log file each)
        self.sec_log = ""
        self.commands: list[str] = []
        self._files: list = []

    # --- setup / processes
    def init(self) -> None:
        os.makedirs(self.base)
        cmd = [self.bin, "init", "--dir", self.d1, "--size", str(self.disk), "--node-id", "1"]
        out = nb._run_setup_cmd(cmd)
        m = re.search(r"volume ([0-9a-fA-F]{8}-[0-9a-fA-F-]{27})", out)
        if not m:
            raise RuntimeError(f"no volume uuid in the output of `{shlex.join(cmd)}`: {out!r}")
        cmd2 = [self.bin, "init", "--dir", self.d2, "--size", str(self.disk), "--node-id",
                str(PEER), "--volume-uuid", m.group(1)]
        nb._run_setup_cmd(cmd2)
        self.commands += [shlex.join(cmd), shlex.join(cmd2)]

    def _spawn(self, argv: list[str], path: str) -> subprocess.Popen:
        f = open(path, "ab")
        self._files.append(f)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=f, stderr=subprocess.STDOUT,
                             start_new_session=True)
        nb._live_procs.append(p)
        return p

    def secondary_argv(self) -> list[str]:
        return [self.bin, "serve", "--dir", self.d2, "--role", "secondary", "--peer-listen",
                f"{HOST}:{self.p2}", "--secret-file", self.secret]

    def primary_argv(self) -> list[str]:
        return [self.bin, "serve", "--dir", self.d1, "--listen", f"{HOST}:{self.p1}",
                "--peer", f"{PEER}={HOST}:{self.p2}", "--secret-file", self.secret]

    def start_secondary(self, timeout: float = 60.0) -> subprocess.Popen:
        """Start node 2 and wait until it listens on P2 (read from /proc/net/tcp, so no
        connection is made to the replication port)."""
        self.nsec += 1
        self.sec_log = os.path.join(self.logdir, f"{self.tag}.node2.start{self.nsec}.log")
        argv = self.secondary_argv()
        if self.nsec == 1:
            self.commands.append(shlex.join(argv))
        self.secondary = self._spawn(argv, self.sec_log)
        deadline = time.monotonic() + timeout
        while not nb.tcp_listening(HOST, self.p2):
            if self.secondary.poll() is not None:
                raise RuntimeError(f"secondary exited with {self.secondary.returncode} before "
                                   f"listening; log:\n{nb._tail(self.sec_log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"secondary not listening on {HOST}:{self.p2} after "
                                   f"{timeout:.0f}s; log:\n{nb._tail(self.sec_log)}")
            time.sleep(0.005)
        return self.secondary

    def start_primary(self, timeout: float = 60.0) -> None:
        argv = self.primary_argv()
        self.commands.append(shlex.join(argv))
        self.primary = self._spawn(argv, self.primary_log)
        deadline = time.monotonic() + timeout
        while not nb.nbd_greeting(socket.AF_INET, (HOST, self.p1)):
            if self.primary.poll() is not None:
                raise RuntimeError(f"primary exited with {self.primary.returncode}; log:\n"
                                   f"{nb._tail(self.primary_log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"primary not serving NBD on {HOST}:{self.p1} after "
                                   f"{timeout:.0f}s; log:\n{nb._tail(self.primary_log)}")
            time.sleep(0.1)

    def stop_secondary(self) -> Optional[int]:
        if self.secondary is None:
            return None
        rc = nb.stop_process(self.secondary, timeout=self.args.stop_timeout)
        self.secondary = None
        if rc != 0:
            log(f"  WARNING: secondary exited with rc {rc}; log:\n{nb._tail(self.sec_log)}")
        return rc

    def stop_primary(self) -> Optional[int]:
        if self.primary is None:
            return None
        rc = nb.stop_process(self.primary, timeout=self.args.stop_timeout)
        self.primary = None
        if rc != 0:
            log(f"  WARNING: primary exited with rc {rc}; log:\n{nb._tail(self.primary_log)}")
        return rc

    def stop_all(self) -> tuple[Optional[int], Optional[int]]:
        """Primary first (it flushes to the secondary on its way out), then the secondary."""
        try:
            r1 = self.stop_primary()
        finally:
            r2 = self.stop_secondary()
            for f in self._files:
                f.close()
            self._files = []
        return r1, r2

    def dead(self) -> Optional[str]:
        for name, p, lp in (("primary", self.primary, self.primary_log),
                            ("secondary", self.secondary, self.sec_log)):
            if p is not None and p.poll() is not None:
                return f"{name} exited (rc {p.returncode}); log:\n{nb._tail(lp)}"
        return None

    # --- admin
    def admin(self, *words: str, timeout: float = 20.0) -> str:
        cmd = [self.bin, "resync", *words, "--dir", self.d1]
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError(f"`{shlex.join(cmd)}` exited {r.returncode}: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r.stdout

    def status(self) -> dict:
        """The primary's status entry for node 2 (plus 'rate_limit_node')."""
        out = self.admin("status", "--json")
        st = json.loads(out[out.index("{"):])
        for p in st.get("peers", []):
            if int(p.get("node_id", -1)) == PEER:
                p = dict(p)
                p["_t"] = time.monotonic()
                return p
        raise RuntimeError(f"node {PEER} not in status: {out.strip()[:500]}")

    def wait_for(self, what: str, pred: Callable[[dict], bool], timeout: float,
                 poll: float = 0.2) -> tuple[dict, float]:
        """Poll status until pred(peer) holds.  Returns (that status, seconds waited)."""
        t0 = time.monotonic()
        last_print, st, err = t0, None, None
        while True:
            gone = self.dead()
            if gone:
                raise RuntimeError(f"{gone}\n(while waiting for {what})")
            try:
                st, err = self.status(), None
                if pred(st):
                    return st, time.monotonic() - t0
            except Exception as e:  # noqa: BLE001  (admin socket not up yet, ...)
                err = str(e)
            now = time.monotonic()
            if now - t0 > timeout:
                raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}: "
                                   + (describe(st) if st else "") + (f" ({err})" if err else ""))
            if now - last_print >= 10:
                log(f"  waiting for {what} ({now - t0:.0f}s): "
                    + (describe(st) if st and not err else f"status: {err}"))
                last_print = now
            time.sleep(poll)

    def primary_log_size(self) -> int:
        try:
            return os.path.getsize(self.primary_log)
        except OSError:
            return 0

    def in_sync_line(self, since: int) -> Optional[dict]:
        """The primary's 'peer 2 (...) is in sync: resync took X s (N bytes resent since
        start)' line, the first one after byte offset `since` of its log."""
        try:
            with open(self.primary_log, "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        m = re.search(rf"peer {PEER} \(([^)]*)\) is in sync: resync took ([0-9.]+) s "
                      rf"\((\d+) bytes resent since start\)", text)
        if not m:
            return None
        return {"line": m.group(0), "secs": float(m.group(2)), "resent_total": int(m.group(3))}

    def remove(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)


def describe(p: dict) -> str:
    s = f"node {p.get('node_id')} {p.get('state')}"
    total, done = p.get("resync_total_bytes") or 0, p.get("resync_done_bytes") or 0
    if p.get("state") == "syncing" and total:
        s += f" {done / MIB:.0f}/{total / MIB:.0f} MiB"
    if p.get("comparing"):
        s += " (comparing)"
    if p.get("rate_bytes_per_sec"):
        s += f" at {p['rate_bytes_per_sec'] / MIB:.0f} MiB/s"
    if p.get("dirty_bytes"):
        s += f", dirty {p['dirty_bytes'] / MIB:.1f} MiB"
    if p.get("last_error"):
        s += f", last error: {p['last_error']}"
    return s


def in_sync(p: dict) -> bool:
    return p.get("state") == "in_sync"


def not_streaming(p: dict) -> bool:
    return p.get("state") in ("disconnected", "connecting")


# ------------------------------------------------------------------- utilities

def compare_files(a: str, b: str, length: int, chunk: int = 8 * MIB) -> Optional[str]:
    """None if the first `length` bytes of a and b are equal and both are at least that
    long, else a description of the first difference."""
    sa, sb = os.path.getsize(a), os.path.getsize(b)
    if sa < length or sb < length:
        return f"sizes {sa} / {sb}, expected >= {length}"
    with open(a, "rb") as fa, open(b, "rb") as fb:
        off = 0
        while off < length:
            n = min(chunk, length - off)
            x, y = fa.read(n), fb.read(n)
            if x != y:
                for i in range(0, n, 4096):
                    if x[i:i + 4096] != y[i:i + 4096]:
                        return f"first difference in the 4 KiB block at byte {off + i}"
                return f"difference at {off}..{off + n}"
            off += n
    return None


def zero_blocks(path: str, length: int, chunk: int = 8 * MIB) -> int:
    """How many 4 KiB blocks in the first `length` bytes of path are all zero."""
    z, zb, n0 = 0, bytes(4096), 0
    with open(path, "rb") as f:
        while n0 < length:
            data = f.read(min(chunk, length - n0))
            if not data:
                break
            if data.count(0) == len(data):
                z += (len(data) + 4095) // 4096
            elif data.count(0) > 0:
                z += sum(1 for i in range(0, len(data), 4096) if data[i:i + 4096] == zb)
            n0 += len(data)
    return z


def group_cpu(p: Optional[subprocess.Popen]) -> Optional[float]:
    return nb.group_cpu_seconds(p.pid) if p is not None and p.poll() is None else None


def fill(vol: Volume, logdir: str, name: str, size: int, offset: int = 0) -> dict:
    """Write `size` bytes of random data sequentially (1 MiB, QD8) from `offset`, then
    FLUSH (fio end_fsync = NBD FLUSH)."""
    out = os.path.join(logdir, f"{vol.tag}.{name}.fio.json")
    cmd = nb.fio_cmd(name, vol.uri, size, FILL_JOB, out, None,
                     RANDOM_DATA + ([f"--offset={offset}"] if offset else []))
    log(f"  {name}: {shlex.join(cmd)}")
    d = nb.run_fio(cmd, out, timeout=1800)
    w = d["jobs"][0]["write"]
    r = {"command": shlex.join(cmd), "wall_s": d["_wall_s"], "bytes": w["io_bytes"],
         "mib_s": w["bw_bytes"] / MIB}
    log(f"    {w['io_bytes'] / MIB:.0f} MiB in {d['_wall_s']:.1f}s ({r['mib_s']:.0f} MiB/s)")
    return r


def settle(args) -> dict:
    """Before a measurement: sync(2) (no writeback of the last fill competes with it) and
    optionally wait for the machine to be quiet."""
    os.sync()
    if args.wait_quiet > 0:
        waited, busy = nb.wait_quiet(args.wait_quiet)
        if waited > 1.5:
            log(f"  waited {waited:.0f}s for the machine to quieten (now {busy:.0f}% of a core busy)")
        return {"quiet_wait_s": waited, "busy_before_pct": busy}
    return {}


def machine_cpu() -> tuple[float, float]:
    """(user+nice+system seconds, irq+softirq seconds), summed over all CPUs, from
    /proc/stat.  Loopback TCP is mostly softirq work, charged to no process; it is kept
    apart so that it does not count as foreign load."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    tck = os.sysconf("SC_CLK_TCK")
    return (v[0] + v[1] + v[2]) / tck, (v[5] + v[6]) / tck


class CpuWindow:
    """CPU of our nodes and of the whole machine over a window, to spot foreign load."""

    def __init__(self, vol: Volume):
        self.vol = vol
        self.t0 = time.monotonic()
        self.m0, self.irq0 = machine_cpu()
        self.c1 = group_cpu(vol.primary) or 0.0
        self.c2 = group_cpu(vol.secondary) or 0.0   # 0 if it is not running yet
        self.f0 = nb.children_cpu()

    def end(self) -> dict:
        wall = time.monotonic() - self.t0
        m1, irq1 = machine_cpu()
        c1, c2 = group_cpu(self.vol.primary), group_cpu(self.vol.secondary)
        f1 = nb.children_cpu()
        r = {"window_s": wall}
        if c1 is None or c2 is None or wall <= 0:
            return r
        p, s = c1 - self.c1, c2 - self.c2
        r.update({"primary_cpu_pct": 100 * p / wall, "secondary_cpu_pct": 100 * s / wall,
                  "machine_cpu_pct": 100 * (m1 - self.m0 + irq1 - self.irq0) / wall,
                  "irq_cpu_pct": 100 * (irq1 - self.irq0) / wall})
        # fio and our short-lived `resync status` children are reaped -> children_cpu;
        # what is left: other processes and kernel threads (writeback, ...)
        r["other_cpu_pct"] = max(0.0, 100 * ((m1 - self.m0) - p - s - (f1 - self.f0)) / wall)
        return r


# ------------------------------------------------------------ 1. resync throughput

def run_throughput(args, root: str, secret: str, rep: int) -> dict:
    size = args.size
    vol = Volume(args, root, f"tput{rep}", size, secret)
    res: dict = {"rep": rep, "disk": size}
    try:
        vol.init()
        vol.start_secondary()
        vol.start_primary()
        _, w = vol.wait_for("the fresh peer to be in_sync (checksum compare)", in_sync,
                            args.sync_timeout)
        log(f"  fresh peer in_sync after {w:.1f}s")
        if args.prefill:
            # mirrored: both data files allocated (and cached) before the measured resync
            res["prefill"] = fill(vol, vol.logdir, "prefill", size)
            vol.wait_for("in_sync after the prefill", in_sync, args.sync_timeout)
        rc = vol.stop_secondary()
        res["secondary_stop_rc"] = rc
        vol.wait_for("the primary to see the peer gone", not_streaming, 30)
        res["fill"] = fill(vol, vol.logdir, "dirty", size)
        st = vol.status()
        dirty = st["dirty_bytes"]
        res["dirty_bytes"] = dirty
        log(f"  peer {describe(st)}")
        if dirty < 0.99 * size:
            log(f"  WARNING: only {dirty / MIB:.0f} MiB dirty after writing {size / MIB:.0f} MiB")
        res.update(settle(args))
        sent0 = st["resync_sent_bytes"]
        since = vol.primary_log_size()

        # --- timed part
        cpu = CpuWindow(vol)
        t0 = time.monotonic()
        vol.start_secondary()
        t_listen = time.monotonic() - t0
        # the primary reconnects with backoff (100 ms doubling to 5 s): ask it to retry now,
        # so the wall time measures the resync, not the backoff left over from the downtime
        try:
            vol.admin("start", "--peer", str(PEER))
        except Exception as e:  # noqa: BLE001
            log(f"  note: `resync start` failed: {e}")
        t_link = None
        samples = []
        while True:
            st = vol.status()
            now = time.monotonic() - t0
            samples.append((round(now, 3), st["state"], st["resync_done_bytes"],
                            st["rate_bytes_per_sec"]))
            if t_link is None and not not_streaming(st):
                t_link = now
            if in_sync(st):
                t_sync = now
                break
            gone = vol.dead()
            if gone:
                raise RuntimeError(gone)
            if now > args.sync_timeout:
                raise RuntimeError(f"not in_sync after {args.sync_timeout:.0f}s: {describe(st)}")
            time.sleep(POLL_S)
        res.update(cpu.end())
        # --- end of timed part

        own = None
        for _ in range(40):  # the line is printed when the state flips; give the log a moment
            own = vol.in_sync_line(since)
            if own:
                break
            time.sleep(0.05)
        res.update({"listen_s": t_listen, "link_s": t_link, "wall_s": t_sync,
                    "resync_gib_s_wall": dirty / GIB / t_sync if t_sync else None,
                    "sent_bytes": st["resync_sent_bytes"] - sent0, "samples": samples})
        if own:
            res.update({"own_s": own["secs"], "own_line": own["line"],
                        "resync_gib_s_own": dirty / GIB / own["secs"] if own["secs"] else None})
        else:
            log("  WARNING: no 'is in sync: resync took' line in the primary's log")
        log(f"  resync of {dirty / MIB:.0f} MiB: wall {t_sync:.2f}s "
            f"({res['resync_gib_s_wall']:.2f} GiB/s; listening after {t_listen:.2f}s, link up "
            f"seen after {t_link if t_link is not None else float('nan'):.2f}s), "
            + (f"own {own['secs']:.2f}s ({res['resync_gib_s_own']:.2f} GiB/s)" if own else "own: -")
            + f", sent {res['sent_bytes'] / MIB:.0f} MiB, CPU primary "
            f"{res.get('primary_cpu_pct', 0):.0f}% secondary {res.get('secondary_cpu_pct', 0):.0f}%")
        r1, r2 = vol.stop_all()
        res["stop_rc"] = [r1, r2]
        verify(vol, res, size)
        res["disk_gib_s"] = disk_probe(root, size)
        if res["disk_gib_s"]:
            log(f"  disk probe: {size / MIB:.0f} MiB O_DIRECT + fdatasync at "
                f"{res['disk_gib_s']:.2f} GiB/s")
    finally:
        vol.stop_all()
        res["commands"] = vol.commands
        if not args.keep:
            vol.remove()
    return res


def disk_probe(root: str, size: int, chunk: int = 4 * MIB) -> Optional[float]:
    """GiB/s of writing `size` bytes of random data with O_DIRECT, then fdatasync, into a new
    file in `root`: what the disk takes at the moment. A resync is done only once its bytes are
    durable on the secondary (which writes large records with O_DIRECT), so on loopback this is
    its ceiling. None where O_DIRECT is refused (tmpfs)."""
    path = os.path.join(root, "diskprobe")
    buf = mmap.mmap(-1, chunk)  # page-aligned, as O_DIRECT needs
    buf.write(os.urandom(chunk))
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    except OSError:
        return None
    try:
        t0 = time.monotonic()
        done = 0
        while done < size:
            done += os.pwrite(fd, buf, done)
        os.fdatasync(fd)
        return size / GIB / (time.monotonic() - t0)
    except OSError:
        return None
    finally:
        os.close(fd)
        os.unlink(path)


def verify(vol: Volume, res: dict, size: int) -> None:
    t = time.monotonic()
    diff = compare_files(os.path.join(vol.d1, "data"), os.path.join(vol.d2, "data"), size)
    z = zero_blocks(os.path.join(vol.d1, "data"), size)
    res["identical"] = diff is None
    res["zero_blocks_primary"] = z
    log(f"  data files {'identical' if diff is None else 'DIFFER: ' + diff} "
        f"({size / MIB:.0f} MiB compared in {time.monotonic() - t:.1f}s; "
        f"{z} all-zero 4 KiB blocks on the primary)")
    if diff is not None:
        res["difference"] = diff


# ------------------------------------------------- 2. client IOPS during resync

def iops_sizes(args) -> tuple[int, int]:
    """(dirty bytes, disk size) for the IOPS test.  Dirty: enough for the capped resync
    to outlast the fio run (ramp + runtime) by 20% even at the full cap; disk: dirty plus
    at least 256 MiB, rounded up to 1 GiB."""
    if args.iops_dirty:
        dirty = args.iops_dirty
    else:
        need = args.rate_bytes * (args.runtime + nb.RAMP_TIME + 1) * 1.2
        dirty = int(-(-need // (64 * MIB)) * 64 * MIB)
    disk = args.iops_disk or int(-(-(dirty + 256 * MIB) // GIB) * GIB)
    if disk < dirty:
        raise SystemExit(f"--iops-disk {disk} is smaller than the dirty amount {dirty}")
    return dirty, disk


def randwrite(vol: Volume, args, name: str) -> dict:
    out = os.path.join(vol.logdir, f"{vol.tag}.{name}.fio.json")
    cmd = nb.fio_cmd(name, vol.uri, vol.disk, IOPS_JOB, out, args.runtime, [])
    log(f"  {name}: {shlex.join(cmd)}")
    d = nb.run_fio(cmd, out, timeout=args.runtime + nb.RAMP_TIME + 120)
    m = nb.extract_metrics(d, "write")
    m["wall_s"] = d["_wall_s"]
    m["command"] = shlex.join(cmd)
    log(f"    {m['iops']:.0f} IOPS, p50 {m['clat_p50_us']:.0f} µs, p99 {m['clat_p99_us']:.0f} µs")
    return m


class Sampler(threading.Thread):
    """Samples the peer's status every SAMPLE_S seconds until stopped."""

    def __init__(self, vol: Volume):
        super().__init__(daemon=True)
        self.vol, self.samples, self.errors = vol, [], []
        self._stop_ev = threading.Event()

    def run(self):
        while not self._stop_ev.is_set():
            try:
                self.samples.append(self.vol.status())
            except Exception as e:  # noqa: BLE001
                self.errors.append(str(e))
            self._stop_ev.wait(SAMPLE_S)

    def stop(self):
        self._stop_ev.set()
        self.join(30)


def run_iops(args, root: str, secret: str, rep: int) -> dict:
    dirty_want, disk = iops_sizes(args)
    vol = Volume(args, root, f"iops{rep}", disk, secret)
    res: dict = {"rep": rep, "disk": disk, "dirty_wanted": dirty_want, "rate": args.rate}
    try:
        vol.init()
        vol.start_secondary()
        vol.start_primary()
        vol.wait_for("the fresh peer to be in_sync (checksum compare)", in_sync, args.sync_timeout)
        # prefill (mirrored): every measured write overwrites written data, on both nodes
        res["prefill"] = fill(vol, vol.logdir, "prefill", disk)
        vol.wait_for("in_sync after the prefill", in_sync, args.sync_timeout)

        # idle baseline
        res["idle_settle"] = settle(args)
        cpu = CpuWindow(vol)
        res["idle"] = randwrite(vol, args, "idle")
        res["idle"].update(cpu.end())
        st = vol.status()
        if not in_sync(st):
            raise RuntimeError(f"peer not in_sync after the idle run: {describe(st)}")

        # make a long resync: peer away while dirty_want bytes are written
        res["secondary_stop_rc"] = vol.stop_secondary()
        vol.wait_for("the primary to see the peer gone", not_streaming, 30)
        res["dirty_fill"] = fill(vol, vol.logdir, "dirty", dirty_want)
        st = vol.status()
        res["dirty_bytes"] = st["dirty_bytes"]
        log(f"  peer {describe(st)}")
        vol.admin("rate", args.rate)
        res["settle"] = settle(args)
        vol.start_secondary()
        try:
            vol.admin("start", "--peer", str(PEER))  # skip the reconnect backoff
        except Exception as e:  # noqa: BLE001
            log(f"  note: `resync start` failed: {e}")
        st, w = vol.wait_for("the resync to be running",
                             lambda p: p.get("state") == "syncing"
                             and (p.get("resync_done_bytes") or 0) > 0, args.sync_timeout, poll=0.05)
        log(f"  resync running after {w:.2f}s: {describe(st)}")
        if st.get("rate_limit") not in (None, args.rate_bytes):
            log(f"  note: status rate_limit {st.get('rate_limit')} != --rate {args.rate_bytes}")

        # the measured run, while the resync runs
        sampler = Sampler(vol)
        s0 = vol.status()
        cpu = CpuWindow(vol)
        sampler.start()
        try:
            res["during"] = randwrite(vol, args, "during-resync")
        finally:
            sampler.stop()
        res["during"].update(cpu.end())
        s1 = vol.status()
        window = s1["_t"] - s0["_t"]
        res["resync_sent_during"] = s1["resync_sent_bytes"] - s0["resync_sent_bytes"]
        res["resync_mib_s_sent"] = res["resync_sent_during"] / MIB / window if window else None
        rates = [p["rate_bytes_per_sec"] for p in sampler.samples
                 if p.get("state") == "syncing" and p.get("rate_bytes_per_sec")]
        res["rate_samples_mib_s"] = [round(r / MIB, 1) for r in rates]
        res["rate_sample_median_mib_s"] = statistics.median(rates) / MIB if rates else None
        states = [p.get("state") for p in sampler.samples]
        res["states_during"] = {s: states.count(s) for s in set(states)}
        res["still_syncing"] = s1.get("state") == "syncing"
        res["left_after_bytes"] = s1.get("dirty_bytes")
        res["iops_ratio"] = (res["during"]["iops"] / res["idle"]["iops"]
                             if res["idle"]["iops"] else None)
        log(f"  idle {res['idle']['iops']:.0f} IOPS, during resync {res['during']['iops']:.0f} "
            f"IOPS: {res['iops_ratio']:.2f}x; resync sent {res['resync_mib_s_sent']:.0f} MiB/s "
            f"over the run (status rate median "
            f"{nb._f(res['rate_sample_median_mib_s'], '{:.0f}')} MiB/s, cap {args.rate}); "
            f"after the run: {describe(s1)}")
        if not res["still_syncing"]:
            log("  WARNING: the resync finished before the fio run did: the run was partly "
                "idle. Use a larger --iops-dirty (or a lower --rate).")

        # finish: uncapped, then stop and compare
        vol.admin("rate", "0")
        vol.wait_for("in_sync after the uncapped rest of the resync", in_sync, args.sync_timeout)
        res["stop_rc"] = list(vol.stop_all())
        verify(vol, res, disk)
    finally:
        vol.stop_all()
        res["commands"] = vol.commands
        if not args.keep:
            vol.remove()
    return res


# ------------------------------------------------------------------- 3. scrub

def scrub(vol: Volume, *words: str) -> str:
    cmd = [vol.bin, "scrub", *words, "--dir", vol.d1]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=30)
    if r.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return r.stdout


def scrub_status(vol: Volume) -> dict:
    st = json.loads(scrub(vol, "status", "--json"))
    st["_t"] = time.monotonic()
    return st


def scrub_found_nothing(st: dict) -> Optional[str]:
    f = (st.get("last") or {}).get("found") or {}
    bad = [f"{k} {f.get(k)}" for k in ("bad_blocks", "read_errors") if f.get(k)]
    for p in f.get("peers", []):
        bad += [f"peer {p['node_id']} {k} {p[k]}" for k in ("bad_blocks", "differing_blocks")
                if p.get(k)]
    return ", ".join(bad) or None


def run_scrub(args, root: str, secret: str, rep: int) -> dict:
    _, disk = iops_sizes(args)
    vol = Volume(args, root, f"scrub{rep}", disk, secret)
    res: dict = {"rep": rep, "disk": disk, "rate": args.rate}
    try:
        vol.init()
        vol.start_secondary()
        vol.start_primary()
        vol.wait_for("the fresh peer to be in_sync (checksum compare)", in_sync, args.sync_timeout)
        res["prefill"] = fill(vol, vol.logdir, "prefill", disk)
        vol.wait_for("in_sync after the prefill", in_sync, args.sync_timeout)

        # an unthrottled pass over the whole disk
        scrub(vol, "rate", "0")
        res["settle"] = settle(args)
        cpu = CpuWindow(vol)
        t0 = time.monotonic()
        scrub(vol, "start")
        while True:
            st = scrub_status(vol)
            if st["state"] == "idle":
                break
            if time.monotonic() - t0 > args.sync_timeout:
                raise RuntimeError(f"the scrub did not finish: {st}")
            time.sleep(POLL_S)
        res["scrub_s"] = time.monotonic() - t0
        res["scrub_cpu"] = cpu.end()
        res["scrub_gib_s"] = disk / GIB / res["scrub_s"]
        res["found"] = scrub_found_nothing(st)
        log(f"  unthrottled scrub of {nb.fmt_size(disk)}: {res['scrub_s']:.2f}s, "
            f"{res['scrub_gib_s']:.2f} GiB/s; found: {res['found'] or 'nothing'}")

        # idle baseline, then the same while a capped scrub runs
        res["idle_settle"] = settle(args)
        res["idle"] = randwrite(vol, args, "idle")
        scrub(vol, "rate", str(args.rate_bytes))
        scrub(vol, "start")
        s0 = scrub_status(vol)
        res["during"] = randwrite(vol, args, "during-scrub")
        s1 = scrub_status(vol)
        res["still_scrubbing"] = s1["state"] == "running"
        window = s1["_t"] - s0["_t"]
        res["scrub_mib_s_during"] = ((s1["position_bytes"] - s0["position_bytes"]) / MIB / window
                                     if res["still_scrubbing"] and window else None)
        res["iops_ratio"] = (res["during"]["iops"] / res["idle"]["iops"]
                             if res["idle"]["iops"] else None)
        log(f"  idle {res['idle']['iops']:.0f} IOPS, during the scrub "
            f"{res['during']['iops']:.0f} IOPS: {res['iops_ratio']:.2f}x; scrub moved "
            f"{nb._f(res['scrub_mib_s_during'], '{:.0f}')} MiB/s (cap {args.rate})")
        if not res["still_scrubbing"]:
            log("  WARNING: the scrub finished before the fio run did")
        scrub(vol, "rate", "0")
        while scrub_status(vol)["state"] != "idle":
            time.sleep(0.2)
        found = scrub_found_nothing(scrub_status(vol))
        if found:
            res["found"] = (res["found"] + "; " if res["found"] else "") + found
        vol.wait_for("in_sync after the scrub", in_sync, args.sync_timeout)
        res["stop_rc"] = list(vol.stop_all())
        verify(vol, res, disk)
    finally:
        vol.stop_all()
        res["commands"] = vol.commands
        if not args.keep:
            vol.remove()
    return res


# ------------------------------------------------------------------------ main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", type=nb.parse_size, default=nb.parse_size("1G"),
                    help="throughput test: disk size = bytes written while the peer is away "
                         "(the target is about 1 GiB)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions (medians are reported)")
    ap.add_argument("--runtime", type=int, default=10,
                    help=f"IOPS test: measured seconds per fio run (plus {nb.RAMP_TIME}s ramp)")
    ap.add_argument("--rate", default="100M",
                    help="IOPS test: resync rate cap (`nbdmirror resync rate`; K/M/G suffixes)")
    ap.add_argument("--iops-dirty", type=nb.parse_size, default=None,
                    help="IOPS test: bytes written while the peer is away (default: enough for "
                         "the capped resync to outlast the fio run: rate x (runtime + ramp + 1) "
                         "x 1.2, rounded up to 64 MiB; 1600 MiB for the defaults)")
    ap.add_argument("--iops-disk", type=nb.parse_size, default=None,
                    help="IOPS test: disk size (default: dirty + 256 MiB rounded up to 1 GiB)")
    ap.add_argument("--prefill", action="store_true",
                    help="throughput test: write the whole disk once (mirrored) before the peer "
                         "is stopped, so the resync overwrites allocated, cached blocks on the "
                         "secondary instead of filling holes of its sparse data file")
    ap.add_argument("--tests", default="throughput,iops",
                    help="comma-separated subset of: throughput, iops, scrub (not in the default)")
    ap.add_argument("--bin", default="target/release/nbdmirror",
                    help="nbdmirror binary (relative paths are relative to the repo root)")
    ap.add_argument("--json", metavar="FILE", help="write every measurement and the medians here")
    ap.add_argument("--workdir", default=os.environ.get("NBDBENCH_TMPDIR", "/var/tmp"),
                    help="parent of the temp dir (must be on a real disk, not tmpfs)")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (node directories and logs)")
    ap.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                    help="before each measurement wait up to this long for the machine to be "
                         f"quiet (< {nb.QUIET_CPU_PCT:.0f}%% of a core busy over 1 s); 0 = off")
    ap.add_argument("--sync-timeout", type=float, default=600.0, metavar="SECONDS",
                    help="how long to wait for a peer to be in_sync / a resync to start")
    ap.add_argument("--stop-timeout", type=float, default=30.0,
                    help="seconds between SIGTERM and SIGKILL when stopping a node")
    return ap


def med(rows: list[dict], key: str) -> Optional[float]:
    vals = [r[key] for r in rows if isinstance(r.get(key), (int, float))]
    return statistics.median(vals) if vals else None


def table(head: list[str], rows: list[list]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]

    def line(r):
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    return "\n".join([line(head), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    tests = [t.strip() for t in args.tests.split(",") if t.strip()]
    bad = [t for t in tests if t not in ("throughput", "iops", "scrub")]
    if bad or not tests:
        log(f"unknown --tests {bad}; known: throughput, iops, scrub")
        return 2
    if args.repeat < 1 or args.runtime < 1:
        log("--repeat and --runtime must be >= 1")
        return 2
    try:
        args.rate_bytes = nb.parse_size(args.rate)
    except argparse.ArgumentTypeError as e:
        log(f"--rate: {e} (the IOPS test needs a cap > 0)")
        return 2
    b = args.bin if os.path.isabs(args.bin) else os.path.join(REPO_ROOT, args.bin)
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        log(f"binary {b} not found / not executable (cargo build --release)")
        return 2
    if not shutil.which("fio"):
        log("fio not found on PATH (apt-get install fio)")
        return 2

    atexit.register(nb.cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, nb._on_signal)

    os.makedirs(args.workdir, exist_ok=True)
    wtype = nb.fs_type(args.workdir)
    if wtype in ("tmpfs", "ramfs"):
        log(f"warning: --workdir {args.workdir} is on {wtype}; results will not reflect disk I/O")
    root = tempfile.mkdtemp(prefix="resyncbench.", dir=args.workdir)
    if not args.keep:
        nb._temp_dirs.append(root)
    os.makedirs(os.path.join(root, "logs"))
    secret = os.path.join(root, "mirror.secret")
    fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(os.urandom(32).hex() + "\n")

    dirty_i, disk_i = iops_sizes(args)
    meta = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "argv": sys.argv, "host": platform.node(), "kernel": platform.release(),
        "nproc": os.cpu_count(), "workdir": root, "workdir_fs": wtype,
        "binary": nb.binary_fingerprint(b), "fio": nb.tool_version(["fio", "--version"]),
        "tests": tests, "repeat": args.repeat, "size": args.size, "prefill": args.prefill,
        "runtime": args.runtime,
        "ramp_time": nb.RAMP_TIME, "rate": args.rate, "rate_bytes": args.rate_bytes,
        "iops_dirty": dirty_i, "iops_disk": disk_i, "fill_fio": FILL_JOB, "iops_fio": IOPS_JOB,
        "random_data_args": RANDOM_DATA,
    }
    log(f"resyncbench: workdir {root} ({wtype}), tests {','.join(tests)}, repeat {args.repeat}; "
        f"throughput: {nb.fmt_size(args.size)} dirty; iops: disk {nb.fmt_size(disk_i)}, "
        f"{nb.fmt_size(dirty_i)} dirty, rate cap {args.rate}, runtime {args.runtime}s")

    tput: list[dict] = []
    iops: list[dict] = []
    scrubs: list[dict] = []
    errors: list[str] = []
    warnings: list[str] = []
    try:
        for rep in range(1, args.repeat + 1):
            for t in tests:
                log(f"[rep {rep}/{args.repeat}] {t}")
                fp = nb.binary_fingerprint(b)
                if fp != meta["binary"]:
                    msg = f"binary changed during the run (now {fp}, at the start {meta['binary']})"
                    log(f"  WARNING: {msg}")
                    if msg not in warnings:
                        warnings.append(msg)
                try:
                    if t == "throughput":
                        tput.append(run_throughput(args, root, secret, rep))
                    elif t == "scrub":
                        scrubs.append(run_scrub(args, root, secret, rep))
                    else:
                        iops.append(run_iops(args, root, secret, rep))
                except Exception as e:  # noqa: BLE001
                    log(f"  {t} rep {rep} FAILED: {e}")
                    errors.append(f"{t} rep {rep}: {e}")
    finally:
        if nb._live_procs:
            nb.cleanup()

    # ---- report
    good_t = [r for r in tput if r.get("identical")]
    good_i = [r for r in iops if r.get("identical") and r.get("still_syncing")]
    medians = {
        "resync_gib_s_own": med(good_t, "resync_gib_s_own"),
        "resync_gib_s_wall": med(good_t, "resync_gib_s_wall"),
        "own_s": med(good_t, "own_s"), "wall_s": med(good_t, "wall_s"),
        "link_s": med(good_t, "link_s"),
        "disk_gib_s": med([r for r in good_t if r.get("disk_gib_s")], "disk_gib_s"),
        "idle_iops": statistics.median([r["idle"]["iops"] for r in good_i]) if good_i else None,
        "during_iops": statistics.median([r["during"]["iops"] for r in good_i]) if good_i else None,
        "iops_ratio": med(good_i, "iops_ratio"),
        "resync_mib_s_sent": med(good_i, "resync_mib_s_sent"),
        "rate_sample_median_mib_s": med(good_i, "rate_sample_median_mib_s"),
    }
    print()
    print(f"resyncbench: {os.cpu_count()} CPUs, workdir fs {wtype}, {meta['fio']}, "
          f"binary {meta['binary']}")
    if "throughput" in tests:
        print(f"\nresync throughput: {nb.fmt_size(args.size)} written while the peer was away, "
              f"then the peer restarted (unthrottled); "
              + ("disk prefilled (mirrored) first" if args.prefill else
                 "no prefill: the secondary's sparse data file is filled"))
        rows = []
        for r in tput:
            rows.append([r["rep"], nb._f(r.get("dirty_bytes", 0) / MIB),
                         nb._f(r.get("link_s"), "{:.2f}"), nb._f(r.get("own_s"), "{:.2f}"),
                         nb._f(r.get("resync_gib_s_own"), "{:.2f}"),
                         nb._f(r.get("wall_s"), "{:.2f}"), nb._f(r.get("resync_gib_s_wall"), "{:.2f}"),
                         nb._f(r.get("primary_cpu_pct")), nb._f(r.get("secondary_cpu_pct")),
                         nb._f(r.get("other_cpu_pct")),
                         {True: "yes", False: "NO"}.get(r.get("identical"), "-"),
                         nb._f(r.get("disk_gib_s"), "{:.2f}")])
        rows.append(["median", "", nb._f(medians["link_s"], "{:.2f}"),
                     nb._f(medians["own_s"], "{:.2f}"), nb._f(medians["resync_gib_s_own"], "{:.2f}"),
                     nb._f(medians["wall_s"], "{:.2f}"), nb._f(medians["resync_gib_s_wall"], "{:.2f}"),
                     "", "", "", "", nb._f(medians["disk_gib_s"], "{:.2f}")])
        print(table(["rep", "dirty MiB", "link up s", "own s", "own GiB/s", "wall s",
                     "wall GiB/s", "prim CPU%", "sec CPU%", "other CPU%", "identical",
                     "disk GiB/s"], rows))
        if medians["disk_gib_s"] and medians["resync_gib_s_own"]:
            print(f"disk GiB/s = the same bytes written with O_DIRECT + fdatasync by this script "
                  f"right after each rep: the disk's pace, and a durable resync's ceiling. "
                  f"Resync (own) / disk: "
                  f"{medians['resync_gib_s_own'] / medians['disk_gib_s']:.2f}x")
    if "iops" in tests:
        print(f"\nclient IOPS during a resync capped at {args.rate}: fio randwrite 4k QD32, "
              f"{args.runtime}s (+{nb.RAMP_TIME}s ramp), disk {nb.fmt_size(disk_i)}, "
              f"{nb.fmt_size(dirty_i)} dirty")
        rows = []
        for r in iops:
            i, d = r.get("idle", {}), r.get("during", {})
            rows.append([r["rep"], nb._f(i.get("iops")), nb._f(d.get("iops")),
                         nb._f(r.get("iops_ratio"), "{:.2f}"),
                         nb._f(r.get("resync_mib_s_sent"), "{:.0f}"),
                         nb._f(r.get("rate_sample_median_mib_s"), "{:.0f}"),
                         {True: "yes", False: "NO (finished early)"}.get(r.get("still_syncing"), "-"),
                         nb._f(i.get("other_cpu_pct")) + "/" + nb._f(d.get("other_cpu_pct")),
                         {True: "yes", False: "NO"}.get(r.get("identical"), "-")])
        rows.append(["median", nb._f(medians["idle_iops"]), nb._f(medians["during_iops"]),
                     nb._f(medians["iops_ratio"], "{:.2f}"), nb._f(medians["resync_mib_s_sent"]),
                     nb._f(medians["rate_sample_median_mib_s"]), "", "", ""])
        print(table(["rep", "idle IOPS", "resync IOPS", "ratio", "resync MiB/s",
                     "status rate MiB/s", "still syncing", "other CPU% idle/resync",
                     "identical"], rows))

    if "scrub" in tests:
        good_s = [r for r in scrubs if r.get("identical") and not r.get("found")]
        print(f"\nscrub (reported, no target): an unthrottled pass over the prefilled "
              f"{nb.fmt_size(disk_i)} disk (primary and peer each read every block), then fio "
              f"randwrite 4k QD32 idle and during a scrub capped at {args.rate}")
        rows = [[r["rep"], nb._f(r.get("scrub_s"), "{:.2f}"), nb._f(r.get("scrub_gib_s"), "{:.2f}"),
                 nb._f(r.get("idle", {}).get("iops")), nb._f(r.get("during", {}).get("iops")),
                 nb._f(r.get("iops_ratio"), "{:.2f}"), nb._f(r.get("scrub_mib_s_during"), "{:.0f}"),
                 r.get("found") or "nothing",
                 {True: "yes", False: "NO"}.get(r.get("identical"), "-")] for r in scrubs]
        rows.append(["median", nb._f(med(good_s, "scrub_s"), "{:.2f}"),
                     nb._f(med(good_s, "scrub_gib_s"), "{:.2f}"),
                     nb._f(statistics.median([r["idle"]["iops"] for r in good_s]) if good_s else None),
                     nb._f(statistics.median([r["during"]["iops"] for r in good_s]) if good_s else None),
                     nb._f(med(good_s, "iops_ratio"), "{:.2f}"),
                     nb._f(med(good_s, "scrub_mib_s_during"), "{:.0f}"), "", ""])
        print(table(["rep", "scrub s", "GiB/s", "idle IOPS", "scrub IOPS", "ratio",
                     "scrub MiB/s", "found", "identical"], rows))

    targets = []
    for key, desc, want, unit in TARGETS:
        if key.startswith("resync") and "throughput" not in tests:
            continue
        if key == "iops_ratio" and "iops" not in tests:
            continue
        got = medians.get(key)
        note = ""
        if key.startswith("resync") and args.size != GIB:
            note = f"(measured with {nb.fmt_size(args.size)}, the target says 1 GiB)"
        targets.append({"key": key, "target": desc, "wanted": want, "unit": unit, "got": got,
                        "met": got is not None and got >= want, "note": note})
    print("\ntargets (issue 4), medians:")
    print(table(["target", "wanted", "got", ""],
                [[t["target"], f">= {t['wanted']:.2f} {t['unit']}",
                  nb._f(t["got"], "{:.2f} " + t["unit"]),
                  ("met" if t["met"] else "NOT met") + (" " + t["note"] if t["note"] else "")]
                 for t in targets]))
    print("\nown = the primary's 'resync took X s' (link up -> in_sync); wall = secondary "
          "process start -> in_sync seen by polling status every 50 ms; resync MiB/s = "
          "resync_sent_bytes delta over the fio run; other CPU% = user+system CPU of the machine "
          "not used by the nodes, fio or the status polls (other processes, kernel threads such "
          "as writeback; softirq (loopback TCP) is not included, see irq_cpu_pct in the JSON).")
    bad_t = [r for r in tput if not r.get("identical")]
    bad_i = [r for r in iops if not (r.get("identical") and r.get("still_syncing"))]
    for r in bad_t + bad_i:
        print(f"WARNING: rep {r['rep']} excluded from the medians: "
              + ("data files differ: " + r.get("difference", "?") if not r.get("identical")
                 else "the resync finished before the fio run did"))
    noisy = [x for r in tput for x in [r.get("other_cpu_pct")] if x and x > nb.NOISY_OTHER_CPU_PCT]
    noisy += [x for r in iops for k in ("idle", "during")
              for x in [r.get(k, {}).get("other_cpu_pct")] if x and x > nb.NOISY_OTHER_CPU_PCT]
    if noisy:
        print(f"WARNING: {len(noisy)} measurement(s) ran while other work used > "
              f"{nb.NOISY_OTHER_CPU_PCT:.0f}% of a core (max {max(noisy):.0f}%)")
    for w in warnings:
        print(f"WARNING: {w}")
    for e in errors:
        print(f"ERROR: {e.splitlines()[0]}")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "throughput": tput, "iops": iops, "medians": medians,
                       "targets": targets, "errors": errors,
                       "warnings": warnings}, f, indent=1)
        log(f"wrote {args.json}")
    if args.keep:
        log(f"kept workdir {root}")
    return 0 if not errors and not bad_t and not bad_i else 1


if __name__ == "__main__":
    sys.exit(main())
