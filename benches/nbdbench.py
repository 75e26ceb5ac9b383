#!/usr/bin/env python3
"""nbdbench: compare NBD servers (nbdmirror vs. nbdkit / qemu-nbd) with fio's nbd engine.

Stdlib only.  See benches/README.md for usage and how to read the output.

Layout of one run:
  * one backing file of --size bytes is created (preallocated) in a temp dir on disk;
    nbdkit and qemu-nbd both serve that file, nbdmirror serves its own data file
    (created once by `nbdmirror init` in a sub-directory of the same temp dir);
  * mirrored configurations (nbdmirror-1peer / -2peers, qemu-quorum) start helper
    processes first (secondaries, a backend qemu-nbd) and stop them after the server;
    nbdmirror ones are measured only while every peer is in_sync;
  * for rep in 1..N: for server in servers: start server, run every selected job,
    stop server  (round-robin, so slow drifts of the noisy machine hit all servers);
  * the median over repetitions of each metric is reported, plus the ratio of each
    subject server (default nbdmirror, else the nbdmirror-* ones) to each reference server.

Everything that can be extended lives in three tables: JOBS, SERVERS and TARGETS.
Traffic only ever goes to 127.0.0.1 (or a unix socket in the temp dir).
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import json
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional

HOST = "127.0.0.1"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RAMP_TIME = 2  # seconds, passed to fio --ramp_time
QUIET_CPU_PCT = 20.0  # --wait-quiet threshold (% of one core)
NOISY_OTHER_CPU_PCT = 25.0  # warn when foreign CPU use during a job exceeds this (% of a core)


# --------------------------------------------------------------------------- jobs

@dataclass
class Job:
    name: str
    side: str                      # "read" or "write": which half of fio's JSON to report
    fio: dict                      # extra fio options (key -> value), e.g. rw, bs, iodepth
    prefill: bool = False          # needs the whole export written once before it runs
    description: str = ""


# Add new jobs here.  Order matters: jobs run in this order for each server.
JOBS: list[Job] = [
    Job("randwrite-4k-qd32", "write", {"rw": "randwrite", "bs": "4k", "iodepth": 32},
        description="random 4 KiB writes, 32 in flight (write throughput / IOPS)"),
    Job("randread-4k-qd32", "read", {"rw": "randread", "bs": "4k", "iodepth": 32},
        prefill=True,
        description="random 4 KiB reads, 32 in flight, over a fully written export"),
    Job("seqwrite-1m-qd8", "write", {"rw": "write", "bs": "1m", "iodepth": 8},
        description="sequential 1 MiB writes, 8 in flight (bandwidth)"),
    Job("randwrite-4k-qd1", "write", {"rw": "randwrite", "bs": "4k", "iodepth": 1},
        description="random 4 KiB writes, one at a time (per-request latency)"),
    Job("randwrite-4k-qd32-fsync32", "write",
        {"rw": "randwrite", "bs": "4k", "iodepth": 32, "fsync": 32},
        description="as randwrite-4k-qd32 plus an NBD FLUSH after every 32 writes"),
]

PREFILL_FIO = {"rw": "write", "bs": "1m", "iodepth": 8}


# ------------------------------------------------------------------------ servers

@dataclass
class Ctx:
    """Per-run context handed to server command builders."""
    args: argparse.Namespace
    workdir: str
    backing_file: str
    size: int


@dataclass
class Aux:
    """A helper process a server configuration needs besides the server itself: a mirror
    peer, the NBD backend of a qemu quorum.  Helpers are started before the server, in list
    order, each waited for until ready(); they are stopped after the server, in reverse
    order.  Their CPU time counts as the server's."""
    name: str                      # short, used in log file names ("node2", "backend")
    argv: list[str]
    ready: Callable[[], bool]      # True once the helper serves
    addr: str = ""                 # where it serves ("127.0.0.1:P" or a unix socket path)
    info: Optional[dict] = None    # anything the server command needs (e.g. node id)


@dataclass
class ServerSpec:
    name: str
    command: Callable[[Ctx, int, list[Aux]], list[str]]   # (ctx, port, helpers) -> argv
    setup: Optional[Callable[[Ctx], list[list[str]]]] = None  # run once; returns commands run
    notes: Callable[[Ctx], str] = lambda ctx: ""
    available: Callable[[Ctx], Optional[str]] = lambda ctx: None  # reason if unavailable
    # helpers to start first; called once per start (fresh ports)
    aux: Optional[Callable[[Ctx], list[Aux]]] = None
    # after the NBD greeting, before the prefill and before every measured job: wait (up to
    # the timeout) until the configuration is ready to be measured (e.g. every mirror peer
    # in sync); raises if it is not.  Returns a short description or None.
    wait_ready: Optional[Callable[[Ctx, "ServerProcess", float], Optional[str]]] = None
    # after every measured job: None if the configuration was intact throughout (e.g. every
    # peer still in sync), else why the measurement must be discarded
    check: Optional[Callable[[Ctx, "ServerProcess"], Optional[str]]] = None


def _which_or_reason(prog: str) -> Callable[[Ctx], Optional[str]]:
    return lambda ctx: None if shutil.which(prog) else f"{prog} not found on PATH"


def _nbdmirror_bin(ctx: Ctx) -> str:
    p = ctx.args.nbdmirror
    return p if os.path.isabs(p) else os.path.join(REPO_ROOT, p)


def _nbdmirror_dir(ctx: Ctx) -> str:
    return os.path.join(ctx.workdir, "nbdmirror")


def _nbdmirror_available(ctx: Ctx) -> Optional[str]:
    b = _nbdmirror_bin(ctx)
    if not (os.path.isfile(b) and os.access(b, os.X_OK)):
        return f"binary {b} not found / not executable (build with `cargo build --release`)"
    return None


def _run_setup_cmd(cmd: list[str]) -> str:
    log(f"  setup: {shlex.join(cmd)}")
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {r.returncode}: {r.stdout.strip()[-2000:]}")
    return r.stdout


def _nbdmirror_setup(ctx: Ctx, name: str = "nbdmirror") -> list[list[str]]:
    d = os.path.join(ctx.workdir, name)
    shutil.rmtree(d, ignore_errors=True)
    # init is expected to create DIR itself; we do not pre-create it.
    cmd = [_nbdmirror_bin(ctx), "init", "--dir", d, "--size", str(ctx.size)]
    cmd += shlex.split(ctx.args.nbdmirror_init_args)
    _run_setup_cmd(cmd)
    return [cmd]


def _nbdmirror_cmd(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
    return ([_nbdmirror_bin(ctx), "serve", "--dir", _nbdmirror_dir(ctx),
             "--listen", f"{HOST}:{port}"] + shlex.split(ctx.args.nbdmirror_args))


def _pinned_cpu() -> int:
    """The CPU nbdmirror-pinned's loop gets: the last one this process may use."""
    return max(os.sched_getaffinity(0))


def _nbdmirror_pinned_cmd(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
    return ([_nbdmirror_bin(ctx), "serve", "--dir", os.path.join(ctx.workdir, "nbdmirror-pinned"),
             "--listen", f"{HOST}:{port}", "--cpu", str(_pinned_cpu())]
            + shlex.split(ctx.args.nbdmirror_args))


def _nbdkit_cmd(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
    # -i binds to loopback only; default thread model (file plugin: parallel, 16 threads),
    # file plugin cache=default (page cache), FLUSH -> fdatasync.
    return ["nbdkit", "-f", "-i", HOST, "-p", str(port), "file", ctx.backing_file]


# --- nbdkit-xxh3: nbdkit file plus the checksum work nbdmirror must do (an xxh3-64 per 4 KiB
# block on every write, verified on every read), as a filter built from
# benches/ceiling/nbdkit-xxh3-filter.c.  Not a competitor: the fair upper bound for the
# "with checksums on" targets (benches/README.md, "Tenth session").

XXH3_FILTER_SRC = os.path.join(REPO_ROOT, "benches", "ceiling", "nbdkit-xxh3-filter.c")


def _xxh3_filter_so(ctx: Ctx) -> str:
    return os.path.join(ctx.workdir, "nbdkit-xxh3-filter.so")


def _xxh3_available(ctx: Ctx) -> Optional[str]:
    for prog in ("nbdkit", "cc"):
        if not shutil.which(prog):
            return f"{prog} not found on PATH"
    for header, pkg in (("/usr/include/nbdkit-filter.h", "nbdkit-plugin-dev"),
                        ("/usr/include/xxhash.h", "libxxhash-dev")):
        if not os.path.exists(header):
            return f"{header} missing (apt-get install {pkg})"
    return None


def _xxh3_setup(ctx: Ctx) -> list[list[str]]:
    cmd = ["cc", "-O2", "-march=native", "-fPIC", "-shared", "-o", _xxh3_filter_so(ctx),
           XXH3_FILTER_SRC]
    _run_setup_cmd(cmd)
    return [cmd]


def _nbdkit_xxh3_cmd(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
    return ["nbdkit", "-f", "-i", HOST, "-p", str(port), f"--filter={_xxh3_filter_so(ctx)}",
            "file", ctx.backing_file]


def _qemu_flags(ctx: Ctx) -> list[str]:
    """The qemu-nbd flags every qemu-nbd in the harness gets."""
    return ["-t", "-e", "8", "--cache=writeback", f"--aio={ctx.args.qemu_aio}"]


def _qemu_cmd(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
    # -b binds to loopback only (qemu-nbd defaults to 0.0.0.0).
    return (["qemu-nbd"] + _qemu_flags(ctx)[:3] + ["-f", "raw"] + _qemu_flags(ctx)[3:]
            + ["-b", HOST, "-p", str(port), ctx.backing_file])


# --- qemu-quorum: qemu's own userspace mirror.  A front qemu-nbd serves a quorum block
# device (vote-threshold 1: every write goes to both children and completes when both have
# it; reads come from the first child) whose children are the shared local backing file and
# an NBD export served by a second ("backend") qemu-nbd over its own file.

def _qemu_quorum_peer_file(ctx: Ctx) -> str:
    return os.path.join(ctx.workdir, "qemu-quorum-peer.img")


def _qemu_quorum_setup(ctx: Ctx) -> list[list[str]]:
    path = _qemu_quorum_peer_file(ctx)
    make_backing_file(path, ctx.size)
    return [["posix_fallocate", path, str(ctx.size)]]


def _qemu_quorum_aux(ctx: Ctx) -> list[Aux]:
    peer = _qemu_quorum_peer_file(ctx)
    if ctx.args.qemu_quorum_transport == "unix":
        sock = os.path.join(ctx.workdir, "qemu-quorum-backend.sock")
        try:
            os.unlink(sock)
        except FileNotFoundError:
            pass
        argv = (["qemu-nbd"] + _qemu_flags(ctx)[:3] + ["-f", "raw"] + _qemu_flags(ctx)[3:]
                + ["-k", sock, peer])
        return [Aux("backend", argv, lambda: nbd_greeting(socket.AF_UNIX, sock), addr=sock,
                    info={"server": {"type": "unix", "path": sock}})]
    port = free_port()
    argv = (["qemu-nbd"] + _qemu_flags(ctx)[:3] + ["-f", "raw"] + _qemu_flags(ctx)[3:]
            + ["-b", HOST, "-p", str(port), peer])
    return [Aux("backend", argv, lambda: nbd_greeting(socket.AF_INET, (HOST, port)),
                addr=f"{HOST}:{port}",
                info={"server": {"type": "inet", "host": HOST, "port": str(port)}})]


def _qemu_quorum_cmd(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
    spec = {
        "driver": "quorum", "vote-threshold": 1, "read-pattern": "fifo",
        "children": [
            {"driver": "raw", "file": {"driver": "file", "filename": ctx.backing_file,
                                       "aio": ctx.args.qemu_aio}},
            {"driver": "raw", "file": {"driver": "nbd", "server": aux[0].info["server"]}},
        ],
    }
    # no -f: the json: filename names its driver itself
    return (["qemu-nbd"] + _qemu_flags(ctx) + ["-b", HOST, "-p", str(port),
             "json:" + json.dumps(spec, separators=(",", ":"))])


# --- nbdmirror-Npeers: one primary (node 1, serves NBD) mirroring synchronously to N
# secondaries (nodes 2..N+1) over TCP on loopback.  docs/mirroring.md has the CLI.

_peer_support: dict[str, Optional[str]] = {}


def _nbdmirror_mirror_available(ctx: Ctx) -> Optional[str]:
    reason = _nbdmirror_available(ctx)
    if reason:
        return reason
    b = _nbdmirror_bin(ctx)
    if b not in _peer_support:
        try:
            r = subprocess.run([b, "serve", "--help"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, timeout=30)
            _peer_support[b] = (None if re.search(r"--peer\b", r.stdout) else
                                f"{b} has no `serve --peer` option (a build without mirroring)")
        except Exception as e:  # noqa: BLE001
            _peer_support[b] = f"`{b} serve --help` failed: {e}"
    return _peer_support[b]


def _secret_file(ctx: Ctx) -> str:
    """The shared secret of every mirrored configuration in this run (created once)."""
    path = os.path.join(ctx.workdir, "mirror.secret")
    if not os.path.exists(path):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
    return path


def _mirror_node_dir(ctx: Ctx, name: str, node: int) -> str:
    return os.path.join(ctx.workdir, name, f"node{node}")


def _mirror_status(ctx: Ctx, name: str) -> dict:
    cmd = [_nbdmirror_bin(ctx), "resync", "status", "--dir", _mirror_node_dir(ctx, name, 1),
           "--json"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                       timeout=20)
    if r.returncode != 0:
        raise RuntimeError(f"`{shlex.join(cmd)}` exited {r.returncode}: "
                           f"{(r.stderr or r.stdout).strip()[-500:]}")
    return json.loads(r.stdout[r.stdout.index("{"):])


def _peer_states(st: dict) -> dict[int, str]:
    return {int(p.get("node_id", -1)): str(p.get("state")) for p in st.get("peers", [])}


def _describe_peers(st: dict) -> str:
    parts = []
    for p in st.get("peers", []):
        s = f"node {p.get('node_id')} {p.get('state')}"
        total, done = p.get("resync_total_bytes") or 0, p.get("resync_done_bytes") or 0
        if p.get("state") == "syncing" and total:
            s += f" {done / (1 << 20):.0f}/{total / (1 << 20):.0f} MiB ({100.0 * done / total:.0f}%)"
        if p.get("rate_bytes_per_sec"):
            s += f" at {p['rate_bytes_per_sec'] / (1 << 20):.0f} MiB/s"
        if p.get("dirty_bytes"):
            s += f", dirty {p['dirty_bytes'] / (1 << 20):.1f} MiB"
        if p.get("paused"):
            s += ", paused"
        if p.get("last_error"):
            s += f", last error: {p['last_error']}"
        parts.append(s)
    return "; ".join(parts) or "no peers listed"


def _make_mirror_spec(name: str, npeers: int) -> ServerSpec:
    nodes = list(range(2, npeers + 2))

    def setup(ctx: Ctx) -> list[list[str]]:
        shutil.rmtree(os.path.join(ctx.workdir, name), ignore_errors=True)
        os.makedirs(os.path.join(ctx.workdir, name))
        extra = shlex.split(ctx.args.nbdmirror_init_args)
        b = _nbdmirror_bin(ctx)
        cmd = [b, "init", "--dir", _mirror_node_dir(ctx, name, 1), "--size", str(ctx.size),
               "--node-id", "1"] + extra
        out = _run_setup_cmd(cmd)
        m = re.search(r"volume ([0-9a-fA-F]{8}-[0-9a-fA-F-]{27})", out)
        if not m:
            raise RuntimeError(f"no volume uuid in the output of `{shlex.join(cmd)}`: {out.strip()!r}")
        cmds = [cmd]
        for k in nodes:
            cmd = [b, "init", "--dir", _mirror_node_dir(ctx, name, k), "--size", str(ctx.size),
                   "--node-id", str(k), "--volume-uuid", m.group(1)] + extra
            _run_setup_cmd(cmd)
            cmds.append(cmd)
        return cmds

    def aux(ctx: Ctx) -> list[Aux]:
        out = []
        for k in nodes:
            port = free_port()
            argv = ([_nbdmirror_bin(ctx), "serve", "--dir", _mirror_node_dir(ctx, name, k),
                     "--role", "secondary", "--peer-listen", f"{HOST}:{port}",
                     "--secret-file", _secret_file(ctx)]
                    + shlex.split(ctx.args.nbdmirror_secondary_args))
            # readiness = a listening socket (from /proc/net/tcp), so no half-open
            # connection is made to the replication port
            out.append(Aux(f"node{k}", argv, lambda p=port: tcp_listening(HOST, p),
                           addr=f"{HOST}:{port}", info={"node_id": k}))
        return out

    def command(ctx: Ctx, port: int, aux: list[Aux]) -> list[str]:
        argv = [_nbdmirror_bin(ctx), "serve", "--dir", _mirror_node_dir(ctx, name, 1),
                "--listen", f"{HOST}:{port}"]
        for a in aux:
            argv += ["--peer", f"{a.info['node_id']}={a.addr}"]
        return argv + ["--secret-file", _secret_file(ctx)] + shlex.split(ctx.args.nbdmirror_args)

    def wait_ready(ctx: Ctx, sp: "ServerProcess", timeout: float) -> Optional[str]:
        """Wait until every peer is in_sync (a fresh secondary gets a full resync first)."""
        t0 = time.monotonic()
        last_print, last_err, st = t0, None, None
        while True:
            gone = sp.dead_part()
            if gone:
                raise RuntimeError(f"{gone} while waiting for the peers to be in sync")
            try:
                st = _mirror_status(ctx, name)
                last_err = None
                states = _peer_states(st)
                if all(states.get(k) == "in_sync" for k in nodes):
                    waited = time.monotonic() - t0
                    if waited > 2:
                        log(f"  all peers in_sync after {waited:.0f}s")
                    return f"in_sync after {waited:.1f}s"
            except Exception as e:  # noqa: BLE001  (admin socket not up yet, bad JSON, ...)
                last_err = str(e)
            now = time.monotonic()
            if now - t0 > timeout:
                raise RuntimeError(f"peers not in_sync after {timeout:.0f}s: "
                                   + (_describe_peers(st) if st else "")
                                   + (f" (status: {last_err})" if last_err else ""))
            if now - last_print >= 10:
                log(f"  waiting for peers ({now - t0:.0f}s): "
                    + (_describe_peers(st) if st and not last_err else f"status: {last_err}"))
                last_print = now
            time.sleep(0.2 if now - t0 < 5 else 1.0)

    def check(ctx: Ctx, sp: "ServerProcess") -> Optional[str]:
        gone = sp.dead_part()
        if gone:
            return gone
        try:
            st = _mirror_status(ctx, name)
        except Exception as e:  # noqa: BLE001
            return f"resync status failed: {e}"
        states = _peer_states(st)
        if any(states.get(k) != "in_sync" for k in nodes):
            return f"peer(s) not in_sync after the job: {_describe_peers(st)}"
        return None

    return ServerSpec(
        name, command, setup=setup, available=_nbdmirror_mirror_available, aux=aux,
        wait_ready=wait_ready, check=check,
        notes=lambda ctx: (f"primary (node 1) mirroring synchronously to {npeers} secondar"
                           f"{'y' if npeers == 1 else 'ies'} (nodes {','.join(map(str, nodes))}) "
                           f"over TCP on {HOST}, each its own dir; measured only with every "
                           f"peer in_sync; extra serve args: primary {ctx.args.nbdmirror_args!r}, "
                           f"secondaries {ctx.args.nbdmirror_secondary_args!r}"))


# Add new servers / setups here.
SERVERS: dict[str, ServerSpec] = {
    "nbdmirror": ServerSpec(
        "nbdmirror", _nbdmirror_cmd, setup=_nbdmirror_setup,
        available=_nbdmirror_available,
        notes=lambda ctx: ("own data file in DIR (initialised once per run with `nbdmirror init`); "
                           f"extra serve args: {ctx.args.nbdmirror_args!r}")),
    "nbdmirror-pinned": ServerSpec(
        "nbdmirror-pinned", _nbdmirror_pinned_cmd,
        setup=lambda ctx: _nbdmirror_setup(ctx, "nbdmirror-pinned"),
        available=_nbdmirror_available,
        notes=lambda ctx: (f"as nbdmirror, with `serve --cpu {_pinned_cpu()}` (the event loop and its "
                           "io-wq workers on one CPU; fio is left the others); "
                           f"extra serve args: {ctx.args.nbdmirror_args!r}")),
    "nbdkit": ServerSpec(
        "nbdkit", _nbdkit_cmd, available=_which_or_reason("nbdkit"),
        notes=lambda ctx: ("file plugin, default thread model (parallel, 16 threads), "
                           "page cache (cache=default), FLUSH=fdatasync")),
    "nbdkit-xxh3": ServerSpec(
        "nbdkit-xxh3", _nbdkit_xxh3_cmd, setup=_xxh3_setup, available=_xxh3_available,
        notes=lambda ctx: ("as nbdkit, plus a filter doing nbdmirror's checksum work (xxh3-64 "
                           "per 4 KiB block on write, verified on read; "
                           "benches/ceiling/nbdkit-xxh3-filter.c): the upper bound for a server "
                           "that must checksum")),
    "qemu-nbd": ServerSpec(
        "qemu-nbd", _qemu_cmd, available=_which_or_reason("qemu-nbd"),
        notes=lambda ctx: (f"raw, --cache=writeback (page cache, FLUSH=fdatasync), "
                           f"--aio={ctx.args.qemu_aio}"
                           + (" (not qemu's default 'threads')" if ctx.args.qemu_aio == "io_uring"
                              else "") + ", -t -e 8")),
    "nbdmirror-1peer": _make_mirror_spec("nbdmirror-1peer", 1),
    "nbdmirror-2peers": _make_mirror_spec("nbdmirror-2peers", 2),
    "qemu-quorum": ServerSpec(
        "qemu-quorum", _qemu_quorum_cmd, setup=_qemu_quorum_setup, aux=_qemu_quorum_aux,
        available=_which_or_reason("qemu-nbd"),
        notes=lambda ctx: ("qemu-nbd serving a quorum (vote-threshold 1, read-pattern fifo) of "
                           "the local backing file (raw/file) and an NBD export of a second "
                           f"file served by a backend qemu-nbd over "
                           f"{'a unix socket' if ctx.args.qemu_quorum_transport == 'unix' else 'TCP on ' + HOST}; "
                           f"both qemu-nbd: --cache=writeback --aio={ctx.args.qemu_aio} -t -e 8")),
}

# Ratio targets printed after the table when both servers ran the job:
# (subject, reference, job, minimum ratio of median IOPS).  Issue 4: a synchronous
# 1-peer mirror must beat qemu's userspace mirror (qemu-nbd + quorum).
TARGETS: list[tuple[str, str, str, float]] = [
    ("nbdmirror-1peer", "qemu-quorum", "randwrite-4k-qd32", 2.0),
    ("nbdmirror-1peer", "qemu-quorum", "seqwrite-1m-qd8", 1.5),
]


# ------------------------------------------------------------------------ helpers

def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_size(s: str) -> int:
    """'1G', '512M', '4k', '1GiB', '1073741824' -> bytes (binary units)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*", s, re.IGNORECASE)
    if not m:
        raise argparse.ArgumentTypeError(f"bad size {s!r} (use e.g. 1G, 512M, 1073741824)")
    mult = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[m.group(2).lower()]
    v = int(float(m.group(1)) * mult)
    if v <= 0 or v % 4096:
        raise argparse.ArgumentTypeError(f"size {s!r} must be a positive multiple of 4 KiB")
    return v


def fmt_size(n: int) -> str:
    for unit, m in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= m and n % m == 0:
            return f"{n // m} {unit}"
    return f"{n} B"


def fs_type(path: str) -> str:
    """Filesystem type of the mount containing path (from /proc/mounts)."""
    path = os.path.realpath(path)
    best, best_type = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, best_type = mnt, parts[2]
    except OSError:
        pass
    return best_type


def binary_fingerprint(prog: str) -> str:
    path = prog if os.sep in prog else (shutil.which(prog) or prog)
    try:
        st = os.stat(path)
        mtime = datetime.datetime.fromtimestamp(st.st_mtime).strftime("%Y-%m-%d %H:%M:%S")
        return f"{os.path.realpath(path)} size {st.st_size} mtime {mtime}"
    except OSError as e:
        return f"{path}: {e.strerror}"


_ports_given: set[int] = set()


def free_port() -> int:
    """A free TCP port on HOST, never one this run already handed out (a configuration
    with helpers asks for several before any of them is bound)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in _ports_given:
            _ports_given.add(port)
            return port


def nbd_greeting(family: int, addr) -> bool:
    """True if an NBD server at addr (a (host, port) or a unix socket path) sends the
    newstyle greeting "NBDMAGIC".  The connection is then dropped (servers tolerate this)."""
    try:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(addr)
            return s.recv(8) == b"NBDMAGIC"
    except OSError:
        return False


def tcp_listening(host: str, port: int) -> bool:
    """True if some process listens on host:port (IPv4), read from /proc/net/tcp, so that
    no connection has to be made to find out."""
    want = {f"{socket.htonl(int.from_bytes(socket.inet_aton(h), 'big')):08X}:{port:04X}"
            for h in (host, "0.0.0.0")}
    try:
        with open("/proc/net/tcp") as f:
            next(f)
            for line in f:
                parts = line.split()
                if len(parts) > 3 and parts[3] == "0A" and parts[1] in want:
                    return True
    except OSError:
        pass
    return False


def make_backing_file(path: str, size: int) -> None:
    """Create path with size bytes, preallocated (posix_fallocate, else written zeros)."""
    with open(path, "wb") as f:
        try:
            os.posix_fallocate(f.fileno(), 0, size)
        except OSError as e:
            log(f"fallocate failed ({e}); writing zeros instead")
            chunk = b"\0" * (1 << 20)
            for _ in range(size // len(chunk)):
                f.write(chunk)
            f.write(b"\0" * (size % len(chunk)))
            f.flush()
            os.fsync(f.fileno())


def tool_version(cmd: list[str]) -> str:
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=10)
        return r.stdout.strip().splitlines()[0] if r.stdout.strip() else "?"
    except Exception as e:  # noqa: BLE001
        return f"? ({e})"


def group_cpu_seconds(pgid: int) -> Optional[float]:
    """utime+stime (all threads) summed over the live processes of process group pgid."""
    total, found = 0, False
    tck = os.sysconf("SC_CLK_TCK")
    for ent in os.listdir("/proc"):
        if not ent.isdigit():
            continue
        try:
            with open(f"/proc/{ent}/stat") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(")") + 2:].split()
        # fields[0] = state (stat field 3): pgrp = field 5 -> [2]; utime 14 -> [11]; stime 15 -> [12]
        try:
            if int(fields[2]) != pgid:
                continue
            total += int(fields[11]) + int(fields[12])
            found = True
        except (ValueError, IndexError):
            continue
    return total / tck if found else None


def machine_cpu() -> tuple[float, float]:
    """(busy seconds summed over all CPUs excluding steal, steal seconds) from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return 0.0, 0.0
    user, nice, system, _idle, _iowait, irq, softirq = v[:7]
    steal = v[7] if len(v) > 7 else 0
    tck = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / tck, steal / tck


def wait_quiet(max_wait: float, threshold_pct: float = QUIET_CPU_PCT) -> tuple[float, float]:
    """Wait (up to max_wait s) until the machine's CPU use over a 1 s sample is below
    threshold_pct of one core.  Our server is idle at this point, so what is measured is
    other work.  Returns (seconds waited, last sampled busy %)."""
    t0 = time.monotonic()
    busy = 0.0
    while True:
        b0, _ = machine_cpu()
        time.sleep(1.0)
        b1, _ = machine_cpu()
        busy = 100.0 * (b1 - b0)
        waited = time.monotonic() - t0
        if busy < threshold_pct or waited >= max_wait:
            return waited, busy


def children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


# ------------------------------------------------------------ process management

_live_procs: list[subprocess.Popen] = []
_temp_dirs: list[str] = []


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    """Signal the process group of one of our children (started with start_new_session, so
    the group holds only that child and its descendants)."""
    try:
        os.killpg(p.pid, sig)
    except (ProcessLookupError, PermissionError):
        if p.poll() is None:
            try:
                p.send_signal(sig)
            except ProcessLookupError:
                pass


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
        return True
    except (ProcessLookupError, PermissionError):
        return False


def stop_process(p: subprocess.Popen, timeout: float = 10.0) -> Optional[int]:
    """SIGTERM the child's process group, wait, then SIGKILL whatever is left of it."""
    if p.poll() is None or _group_alive(p.pid):
        _signal_group(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        try:
            p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        # leader gone: give stragglers in its group the rest of the timeout
        while _group_alive(p.pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if p.poll() is None or _group_alive(p.pid):
            log(f"  pid {p.pid} (or its children) ignored SIGTERM for {timeout}s, sending SIGKILL")
            _signal_group(p, signal.SIGKILL)
            p.wait(timeout=10)
    if p in _live_procs:
        _live_procs.remove(p)
    return p.returncode


def cleanup() -> None:
    # newest first: a server before the helpers (peers, backends) it was started after
    for p in reversed(list(_live_procs)):
        try:
            stop_process(p, timeout=5)
        except Exception as e:  # noqa: BLE001
            log(f"cleanup: failed to stop pid {p.pid}: {e}")
    for d in list(_temp_dirs):
        shutil.rmtree(d, ignore_errors=True)
        _temp_dirs.remove(d)


def _on_signal(signum, _frame):
    log(f"\ninterrupted by signal {signum}, cleaning up")
    cleanup()
    sys.exit(128 + signum)


class ServerProcess:
    """One start of a server configuration: its helper processes (spec.aux, if any) and the
    NBD server itself."""

    def __init__(self, spec: ServerSpec, ctx: Ctx, logdir: str, tag: str):
        self.spec, self.ctx = spec, ctx
        self.port = free_port()
        self.aux: list[Aux] = spec.aux(ctx) if spec.aux else []
        self.argv = spec.command(ctx, self.port, self.aux)
        self.logdir, self.tag = logdir, tag
        self.log_path = os.path.join(logdir, f"{spec.name}.{tag}.log")
        self.proc: Optional[subprocess.Popen] = None
        self.aux_procs: list[tuple[Aux, subprocess.Popen, str]] = []  # (aux, process, log path)
        self._logfs: list = []
        self.uri = f"nbd://{HOST}:{self.port}/"

    def _spawn(self, argv: list[str], log_path: str) -> subprocess.Popen:
        logf = open(log_path, "wb")
        self._logfs.append(logf)
        p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=logf,
                             stderr=subprocess.STDOUT, start_new_session=True)
        _live_procs.append(p)
        return p

    def start(self, timeout: float) -> None:
        for a in self.aux:
            lp = os.path.join(self.logdir, f"{self.spec.name}.{a.name}.{self.tag}.log")
            log(f"  start {a.name}: {shlex.join(a.argv)}")
            p = self._spawn(a.argv, lp)
            self.aux_procs.append((a, p, lp))
            deadline = time.monotonic() + timeout
            while not a.ready():
                if p.poll() is not None:
                    raise RuntimeError(f"{self.spec.name}: {a.name} exited with {p.returncode} "
                                       f"before it was ready; log tail:\n{_tail(lp)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.spec.name}: {a.name} not ready at {a.addr} within "
                                       f"{timeout}s; log tail:\n{_tail(lp)}")
                time.sleep(0.1)
        log(f"  start: {shlex.join(self.argv)}")
        self.proc = self._spawn(self.argv, self.log_path)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.spec.name} exited with {self.proc.returncode} before "
                                   f"accepting connections; log tail:\n{self.log_tail()}")
            # NBD newstyle servers send "NBDMAGIC" first; wait for it so we know the server
            # is really serving, then hang up (servers tolerate this).
            if nbd_greeting(socket.AF_INET, (HOST, self.port)):
                return
            gone = self.dead_part()
            if gone:
                raise RuntimeError(f"{self.spec.name}: {gone} before the server accepted "
                                   f"connections")
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.spec.name} did not accept connections on "
                                   f"{HOST}:{self.port} within {timeout}s "
                                   f"({self.proc_state()}); log tail:\n{self.log_tail()}")
            time.sleep(0.1)

    def proc_state(self) -> str:
        """e.g. 'state D, wchan jbd2_log_wait_commit, cpu 0.01s' - why a start is slow."""
        pid = self.proc.pid
        try:
            with open(f"/proc/{pid}/stat") as f:
                data = f.read()
            state = data[data.rindex(")") + 2:].split()[0]
            with open(f"/proc/{pid}/wchan") as f:
                wchan = f.read().strip() or "-"
            cpu = group_cpu_seconds(pid)
            return f"pid {pid} state {state}, wchan {wchan}, cpu {cpu or 0:.2f}s"
        except OSError:
            return f"pid {pid} gone"

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def dead_part(self) -> Optional[str]:
        """None while the server and all its helpers run, else which one exited (+ log)."""
        if self.proc is not None and self.proc.poll() is not None:
            return (f"the server exited (rc {self.proc.returncode}); log tail:\n"
                    f"{self.log_tail()}")
        for a, p, lp in self.aux_procs:
            if p.poll() is not None:
                return f"helper {a.name} exited (rc {p.returncode}); log tail:\n{_tail(lp)}"
        return None

    def cpu_seconds(self) -> Optional[float]:
        """CPU seconds of the server's process group plus those of its helpers."""
        if not self.alive():
            return None
        total = 0.0
        for pid in [self.proc.pid] + [p.pid for _, p, _ in self.aux_procs]:
            c = group_cpu_seconds(pid)
            if c is None:
                return None
            total += c
        return total

    def stop(self) -> Optional[int]:
        """Stop the server first, then its helpers in reverse start order.  Returns the
        server's exit code."""
        rc = None
        try:
            if self.proc is not None:
                rc = stop_process(self.proc, timeout=self.ctx.args.stop_timeout)
                log(f"  stopped {self.spec.name} (rc {rc})")
        finally:
            for a, p, _ in reversed(self.aux_procs):
                try:
                    arc = stop_process(p, timeout=self.ctx.args.stop_timeout)
                    log(f"  stopped {a.name} (rc {arc})")
                except Exception as e:  # noqa: BLE001
                    log(f"  failed to stop {a.name} (pid {p.pid}): {e}")
            for f in self._logfs:
                f.close()
            self._logfs = []
        return rc

    def log_tail(self, n: int = 20) -> str:
        return _tail(self.log_path, n)


def _tail(path: str, n: int = 20) -> str:
    try:
        with open(path, "rb") as f:
            lines = f.read().decode(errors="replace").splitlines()
        return "\n".join("    | " + l for l in lines[-n:]) or "    | (empty)"
    except OSError:
        return "    | (no log)"


def export_size(uri: str, fallback: int) -> int:
    """Ask the server for the export size (nbdinfo, if installed); else use fallback."""
    if shutil.which("nbdinfo"):
        try:
            r = subprocess.run(["nbdinfo", "--size", uri], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, timeout=20)
            if r.returncode == 0:
                return int(r.stdout.strip())
            log(f"  nbdinfo --size failed ({r.stderr.strip()}); assuming {fallback}")
        except Exception as e:  # noqa: BLE001
            log(f"  nbdinfo --size failed ({e}); assuming {fallback}")
    return fallback


# ---------------------------------------------------------------------- fio runs

def fio_cmd(name: str, uri: str, size: int, opts: dict, out_path: str,
            runtime: Optional[int], extra: list[str]) -> list[str]:
    cmd = ["fio", f"--name={name}", "--ioengine=nbd", f"--uri={uri}", "--direct=1",
           f"--size={size}", "--output-format=json", f"--output={out_path}"]
    if runtime is not None:
        cmd += ["--time_based", f"--runtime={runtime}", f"--ramp_time={RAMP_TIME}"]
    cmd += [f"--{k}={v}" for k, v in opts.items()]
    return cmd + extra


def run_fio(cmd: list[str], out_path: str, timeout: float) -> dict:
    t0 = time.monotonic()
    try:
        r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"fio timed out after {timeout:.0f}s")
    wall = time.monotonic() - t0
    try:
        with open(out_path) as f:
            text = f.read()
        # fio sometimes prefixes warnings to the JSON; skip to the first '{'
        data = json.loads(text[text.index("{"):])
    except (OSError, ValueError) as e:
        raise RuntimeError(f"fio exited {r.returncode}, no usable JSON ({e}); output:\n"
                           f"{r.stdout.strip()[-2000:]}")
    if r.returncode != 0:
        raise RuntimeError(f"fio exited {r.returncode}; output:\n{r.stdout.strip()[-2000:]}")
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job error {job['error']}; output:\n{r.stdout.strip()[-2000:]}")
    data["_wall_s"] = wall
    data["_fio_stdout"] = r.stdout
    return data


def _pct(d: dict, p: str) -> Optional[float]:
    v = (d or {}).get("percentile", {}).get(p)
    return v / 1000.0 if v is not None else None  # ns -> us


def extract_metrics(data: dict, side: str) -> dict:
    job = data["jobs"][0]
    s = job[side]
    m = {
        "iops": s["iops"],
        "mib_s": s["bw_bytes"] / (1 << 20),
        "clat_p50_us": _pct(s.get("clat_ns"), "50.000000"),
        "clat_p99_us": _pct(s.get("clat_ns"), "99.000000"),
        "clat_mean_us": s.get("clat_ns", {}).get("mean", 0) / 1000.0,
        "total_ios": s.get("total_ios"),
        "fio_usr_cpu_pct": job.get("usr_cpu"),
        "fio_sys_cpu_pct": job.get("sys_cpu"),
    }
    sync = job.get("sync")
    if sync and sync.get("total_ios"):
        m["sync_ios"] = sync["total_ios"]
        m["sync_p50_us"] = _pct(sync.get("lat_ns"), "50.000000")
        m["sync_p99_us"] = _pct(sync.get("lat_ns"), "99.000000")
    return m


# ----------------------------------------------------------------------- report

def median_of(runs: list[dict], key: str) -> Optional[float]:
    vals = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
    return statistics.median(vals) if vals else None


def spread_pct(runs: list[dict], key: str) -> Optional[float]:
    vals = [r["metrics"][key] for r in runs if r["metrics"].get(key) is not None]
    if len(vals) < 2:
        return None
    med = statistics.median(vals)
    return 100.0 * (max(vals) - min(vals)) / med if med else None


def _f(v, fmt="{:.0f}", none="-"):
    return none if v is None else fmt.format(v)


def render_table(jobs: list[Job], servers: list[str], medians: dict, ratios: dict,
                 errors: dict, repeat: int) -> str:
    """ratios: {subject: {job: {reference: ratio}}}; printed on the subjects' rows."""
    head = ["job", "server", "IOPS", "±%", "MiB/s", "p50 µs", "p99 µs", "srv CPU%", "other CPU%",
            "ratio (IOPS)"]
    rows = []
    for job in jobs:
        for srv in servers:
            med = medians.get(job.name, {}).get(srv)
            if med is None:
                err = errors.get((job.name, srv)) or errors.get(srv) or "no data"
                rows.append([job.name, srv, "FAILED", "", "", "", "", "", "",
                             err.splitlines()[0][:70]])
                continue
            ratio = "  ".join(f"{srv}/{ref} {r:.2f}x"
                              for ref, r in ratios.get(srv, {}).get(job.name, {}).items())
            partial = f" ({med['n']}/{repeat})" if med["n"] < repeat else ""
            rows.append([job.name, srv, _f(med["iops"]) + partial,
                         _f(med.get("iops_spread_pct"), "{:.1f}"),
                         _f(med["mib_s"], "{:.1f}"), _f(med["clat_p50_us"], "{:.1f}"),
                         _f(med["clat_p99_us"], "{:.1f}"), _f(med.get("srv_cpu_pct"), "{:.0f}"),
                         _f(med.get("other_cpu_pct"), "{:.0f}"), ratio])
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    right = {2, 3, 4, 5, 6, 7, 8}

    def line(r):
        return "  ".join((str(c).rjust(w) if i in right else str(c).ljust(w))
                         for i, (c, w) in enumerate(zip(r, widths))).rstrip()
    out = [line(head), line(["-" * w for w in widths])]
    prev = None
    for r in rows:
        if prev is not None and r[0] != prev:
            out.append("")
        out.append(line(r))
        prev = r[0]
    return "\n".join(out)


# ------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runtime", type=int, default=10, help="measured seconds per job "
                    f"(plus {RAMP_TIME}s ramp)")
    ap.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    ap.add_argument("--size", type=parse_size, default=parse_size("1G"),
                    help="export / backing file size (e.g. 1G, 512M, bytes)")
    ap.add_argument("--servers", default="nbdmirror,nbdkit,qemu-nbd",
                    help=f"comma-separated, from: {','.join(SERVERS)}")
    ap.add_argument("--jobs", default=",".join(j.name for j in JOBS),
                    help="comma-separated subset of job names (see --list)")
    ap.add_argument("--subject", default=None,
                    help="comma-separated server(s) whose IOPS ratio to each reference is "
                         "printed. Default: nbdmirror if it runs, else every nbdmirror-* "
                         "server that runs")
    ap.add_argument("--reference", default=None,
                    help="comma-separated server(s) the subjects are compared with. "
                         "Default: every server that runs and is not a subject")
    ap.add_argument("--json", metavar="PATH", help="write all raw results + medians here")
    ap.add_argument("--nbdmirror", default="target/release/nbdmirror",
                    help="nbdmirror binary (relative paths are relative to the repo root)")
    ap.add_argument("--nbdmirror-args", default="", help="extra args for `nbdmirror serve` "
                    "(one shell-quoted string)")
    ap.add_argument("--nbdmirror-init-args", default="",
                    help="extra args for every `nbdmirror init`")
    ap.add_argument("--nbdmirror-secondary-args", default="",
                    help="extra args for `nbdmirror serve --role secondary` (the peers of "
                         "nbdmirror-1peer / -2peers; --nbdmirror-args goes to their primary)")
    ap.add_argument("--sync-timeout", type=float, default=1800.0, metavar="SECONDS",
                    help="how long to wait for every mirror peer to be in_sync (a fresh "
                         "secondary is fully resynced first) before the prefill and each job")
    ap.add_argument("--qemu-aio", default="io_uring", choices=["threads", "io_uring", "native"],
                    help="qemu-nbd --aio mode. io_uring (not qemu's default, threads) is used "
                         "because nbdmirror is io_uring-based and it is qemu-nbd's fastest "
                         "buffered mode (~3x threads on randread here); native needs O_DIRECT")
    ap.add_argument("--qemu-quorum-transport", default="unix", choices=["unix", "tcp"],
                    help="how qemu-quorum's front qemu-nbd reaches its backend qemu-nbd. unix: "
                         "qemu 7.2's NBD client over TCP stalls on Nagle/delayed ACK with more "
                         "than one request in flight (~400 IOPS at QD32 here)")
    ap.add_argument("--fio-args", default="", help="extra args appended to every fio command")
    ap.add_argument("--workdir", default=os.environ.get("NBDBENCH_TMPDIR", "/var/tmp"),
                    help="parent directory for the temp dir (must be on disk, not tmpfs)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (logs, data)")
    ap.add_argument("--no-sync", action="store_true",
                    help="do not sync(2) between jobs (by default dirty page cache is flushed "
                         "before each measured job so one job's writeback does not bleed "
                         "into the next)")
    ap.add_argument("--no-prefill", action="store_true",
                    help="prefill a server only right before a job that reads, instead of "
                         "once before its first measured job")
    ap.add_argument("--drop-caches", action="store_true",
                    help="also drop the page cache before each job (root; machine-wide)")
    ap.add_argument("--wait-quiet", type=float, default=30.0, metavar="SECONDS",
                    help="before each measured job wait up to this long for the machine to be "
                         f"quiet (< {QUIET_CPU_PCT:.0f}%% of a core busy over 1 s); 0 = off")
    ap.add_argument("--start-timeout", type=float, default=60.0,
                    help="seconds to wait for a server to send the NBD greeting")
    ap.add_argument("--stop-timeout", type=float, default=15.0,
                    help="seconds between SIGTERM and SIGKILL when stopping a server")
    ap.add_argument("--list", action="store_true", help="list jobs and servers and exit")
    return ap


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)

    if args.list:
        print("jobs:")
        for j in JOBS:
            opts = " ".join(f"{k}={v}" for k, v in j.fio.items())
            print(f"  {j.name:28s} {opts:38s} {j.description}")
        print("servers:", ", ".join(SERVERS))
        return 0

    server_names = [s.strip() for s in args.servers.split(",") if s.strip()]
    job_names = [s.strip() for s in args.jobs.split(",") if s.strip()]
    bad = [s for s in server_names if s not in SERVERS]
    if bad:
        log(f"unknown server(s) {bad}; known: {list(SERVERS)}")
        return 2
    by_name = {j.name: j for j in JOBS}
    bad = [j for j in job_names if j not in by_name]
    if bad:
        log(f"unknown job(s) {bad}; known: {list(by_name)}")
        return 2
    jobs = [j for j in JOBS if j.name in job_names]  # keep table order
    if args.subject is not None:
        subjects = [s.strip() for s in args.subject.split(",") if s.strip()]
    elif "nbdmirror" in server_names or "nbdmirror-pinned" in server_names:
        subjects = [s for s in ("nbdmirror", "nbdmirror-pinned") if s in server_names]
    else:
        subjects = [s for s in server_names if s.startswith("nbdmirror")]
    missing = [s for s in subjects if s not in server_names]
    if missing:
        log(f"note: --subject {','.join(missing)} not among --servers; no ratios for it")
    subjects = [s for s in subjects if s in server_names]
    if args.reference is not None:
        references = [s.strip() for s in args.reference.split(",") if s.strip()]
        bad = [s for s in references if s not in server_names]
        if bad:
            log(f"--reference {bad} not among --servers {server_names}")
            return 2
    else:
        references = [s for s in server_names if s not in subjects]
    if args.repeat < 1 or args.runtime < 1:
        log("--repeat and --runtime must be >= 1")
        return 2
    if not shutil.which("fio"):
        log("fio not found on PATH (apt-get install fio)")
        return 2

    atexit.register(cleanup)
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _on_signal)

    os.makedirs(args.workdir, exist_ok=True)
    wtype = fs_type(args.workdir)
    if wtype in ("tmpfs", "ramfs"):
        log(f"warning: --workdir {args.workdir} is on {wtype}; results will not reflect disk I/O")
    workdir = tempfile.mkdtemp(prefix="nbdbench.", dir=args.workdir)
    if not args.keep:
        _temp_dirs.append(workdir)
    logdir = os.path.join(workdir, "logs")
    os.makedirs(logdir)
    backing = os.path.join(workdir, "backing.img")
    ctx = Ctx(args=args, workdir=workdir, backing_file=backing, size=args.size)

    meta = {
        "started": datetime.datetime.now(datetime.timezone.utc).isoformat(),
        "argv": sys.argv,
        "host": platform.node(), "kernel": platform.release(), "nproc": os.cpu_count(),
        "workdir": workdir, "workdir_fs": wtype, "backing_file": backing, "size": args.size,
        "runtime": args.runtime, "ramp_time": RAMP_TIME, "repeat": args.repeat,
        "versions": {
            "fio": tool_version(["fio", "--version"]),
            "nbdkit": tool_version(["nbdkit", "--version"]) if shutil.which("nbdkit") else None,
            "qemu-nbd": tool_version(["qemu-nbd", "--version"]) if shutil.which("qemu-nbd") else None,
        },
        "sync_between_jobs": not args.no_sync, "drop_caches": args.drop_caches,
        "prefill_first": not args.no_prefill, "wait_quiet_s": args.wait_quiet, "prefill_fio": PREFILL_FIO,
    }
    log(f"nbdbench: workdir {workdir} ({wtype}), size {fmt_size(args.size)}, "
        f"runtime {args.runtime}s (+{RAMP_TIME}s ramp), repeat {args.repeat}")
    log(f"servers: {', '.join(server_names)}; jobs: {', '.join(j.name for j in jobs)}")

    # backing file, preallocated
    make_backing_file(backing, args.size)

    server_info: dict[str, dict] = {}
    server_errors: dict[str, str] = {}
    job_errors: dict[tuple, str] = {}
    runs: list[dict] = []
    discarded: list[dict] = []  # measurements rejected by a server's check (e.g. peer lost)
    prefilled: set[str] = set()
    dead: set[str] = set()
    start_failures: dict[str, list[str]] = {}
    warnings: list[str] = []
    failed_reps: dict[str, list[str]] = {}

    for name in server_names:
        spec = SERVERS[name]
        reason = spec.available(ctx)
        server_info[name] = {"notes": spec.notes(ctx), "setup_commands": [], "commands": []}
        if reason:
            log(f"skipping {name}: {reason}")
            server_errors[name] = reason
            dead.add(name)

    def between_jobs():
        if not args.no_sync:
            os.sync()
        if args.drop_caches:
            try:
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            except OSError as e:
                log(f"  drop_caches failed: {e}")

    fio_extra = shlex.split(args.fio_args)
    fio_timeout = args.runtime + RAMP_TIME + 120

    try:
        for rep in range(1, args.repeat + 1):
            for name in server_names:
                if name in dead:
                    continue
                spec = SERVERS[name]
                log(f"[rep {rep}/{args.repeat}] {name}")
                if spec.setup and not server_info[name]["setup_commands"]:
                    try:
                        server_info[name]["setup_commands"] = [shlex.join(c) for c in spec.setup(ctx)]
                    except Exception as e:  # noqa: BLE001
                        log(f"  {name} setup failed: {e}")
                        server_errors[name] = f"setup failed: {e}"
                        dead.add(name)
                        continue
                sp = ServerProcess(spec, ctx, logdir, f"rep{rep}")
                server_info[name]["commands"].append(shlex.join(sp.argv))
                if sp.aux:
                    server_info[name].setdefault("aux_commands", []).append(
                        [shlex.join(a.argv) for a in sp.aux])
                fp = binary_fingerprint(sp.argv[0])
                fps = server_info[name].setdefault("binary", [])
                if fps and fp != fps[0]:
                    msg = (f"{name}: binary {sp.argv[0]} changed during the run (rep {rep}: {fp}, "
                           f"first: {fps[0]}) - results mix builds")
                    log(f"  WARNING: {msg}")
                    if msg not in warnings:
                        warnings.append(msg)
                fps.append(fp)
                try:
                    try:
                        sp.start(args.start_timeout)
                    except Exception as e:  # noqa: BLE001
                        # not marked dead: a start can fail transiently on a busy machine,
                        # so it is tried again in the next repetition
                        log(f"  {name} failed to start (rep {rep}): {e}")
                        start_failures.setdefault(name, []).append(f"rep {rep}: {e}")
                        failed_reps.setdefault(name, []).append(str(rep))
                        server_errors[name] = (f"failed to start in rep {','.join(failed_reps[name])}"
                                               f": {e}")
                        continue
                    esize = export_size(sp.uri, args.size)
                    if esize != args.size:
                        log(f"  note: {name} export size {esize} != requested {args.size}")
                    esize = min(esize, args.size)
                    server_info[name]["export_size"] = esize

                    def ready_or_fail(i: int) -> bool:
                        """Wait for spec.wait_ready (e.g. every mirror peer in_sync); on
                        failure mark job i and the rest as failed for this repetition."""
                        if not spec.wait_ready:
                            return True
                        try:
                            desc = spec.wait_ready(ctx, sp, args.sync_timeout)
                            if desc:
                                server_info[name].setdefault("ready", []).append(
                                    f"rep {rep} before {jobs[i].name}: {desc}")
                            return True
                        except Exception as e:  # noqa: BLE001
                            log(f"  {name} not ready: {e}")
                            for j in jobs[i:]:
                                job_errors[(j.name, name)] = f"not ready: {e}"
                            return False

                    for i, job in enumerate(jobs):
                        gone = sp.dead_part()
                        if gone:
                            job_errors[(job.name, name)] = gone.splitlines()[0]
                            log(f"  {name}: {gone}")
                            break
                        if not ready_or_fail(i):
                            break
                        # Prefill once per server (data persists across its restarts).  By
                        # default before its first job, so no server's measured writes pay
                        # first-touch costs (unwritten extents, sparse holes) that another
                        # server already paid on the shared file; with --no-prefill only
                        # right before a job that needs data to read.
                        if name not in prefilled and (job.prefill or (i == 0 and not args.no_prefill)):
                            out = os.path.join(logdir, f"prefill.{name}.json")
                            cmd = fio_cmd("prefill", sp.uri, esize, PREFILL_FIO, out, None, fio_extra)
                            log(f"  prefill: {shlex.join(cmd)}")
                            try:
                                d = run_fio(cmd, out, timeout=1800)
                                prefilled.add(name)
                                server_info[name]["prefill_s"] = d["_wall_s"]
                                server_info[name]["prefill_command"] = shlex.join(cmd)
                                log(f"  prefill done in {d['_wall_s']:.1f}s")
                            except Exception as e:  # noqa: BLE001
                                log(f"  prefill failed: {e}")
                                job_errors[(job.name, name)] = f"prefill failed: {e}"
                                continue
                            if not ready_or_fail(i):  # e.g. a peer dropped out during the prefill
                                break
                        between_jobs()
                        out = os.path.join(logdir, f"{job.name}.{name}.rep{rep}.json")
                        cmd = fio_cmd(job.name, sp.uri, esize, job.fio, out, args.runtime,
                                      fio_extra)
                        quiet_s, quiet_busy = (wait_quiet(args.wait_quiet) if args.wait_quiet > 0
                                               else (0.0, None))
                        if quiet_s > 1.5:
                            log(f"  waited {quiet_s:.0f}s for the machine to quieten "
                                f"(now {quiet_busy:.0f}% of a core busy)")
                        log(f"  {job.name}: {shlex.join(cmd)}")
                        load1 = os.getloadavg()[0]
                        cpu0, fio0, (mach0, steal0) = sp.cpu_seconds(), children_cpu(), machine_cpu()
                        try:
                            data = run_fio(cmd, out, timeout=fio_timeout)
                        except Exception as e:  # noqa: BLE001
                            log(f"  {job.name} on {name} failed: {e}")
                            job_errors[(job.name, name)] = str(e)
                            continue
                        cpu1, fio1, (mach1, steal1) = sp.cpu_seconds(), children_cpu(), machine_cpu()
                        m = extract_metrics(data, job.side)
                        problem = spec.check(ctx, sp) if spec.check else sp.dead_part()
                        if problem:
                            # e.g. a mirror peer dropped out: this was not a measurement of
                            # the configuration, so it does not count
                            log(f"  {job.name} on {name} discarded: {problem}")
                            job_errors[(job.name, name)] = f"discarded: {problem}"
                            data.pop("_fio_stdout", None)
                            discarded.append({"rep": rep, "server": name, "job": job.name,
                                              "command": shlex.join(cmd), "reason": problem,
                                              "metrics": m})
                            continue
                        wall = data["_wall_s"]
                        m["load1_before"] = load1
                        m["quiet_wait_s"] = quiet_s
                        m["busy_before_pct"] = quiet_busy
                        if cpu0 is not None and cpu1 is not None and wall > 0:
                            # all CPU figures: % of one core over the whole fio run (ramp incl.)
                            m["srv_cpu_s"] = cpu1 - cpu0
                            m["srv_cpu_pct"] = 100.0 * (cpu1 - cpu0) / wall
                            m["fio_cpu_pct"] = 100.0 * (fio1 - fio0) / wall
                            m["machine_cpu_pct"] = 100.0 * (mach1 - mach0) / wall
                            m["steal_pct"] = 100.0 * (steal1 - steal0) / wall
                            # CPU used by everything else on the machine (other builds, tests,
                            # kernel work not charged to our processes such as writeback)
                            m["other_cpu_pct"] = max(0.0, 100.0 * ((mach1 - mach0) - (cpu1 - cpu0)
                                                                   - (fio1 - fio0)) / wall)
                        log(f"    {m['iops']:.0f} IOPS, {m['mib_s']:.1f} MiB/s, "
                            f"p50 {_f(m['clat_p50_us'], '{:.1f}')} µs, "
                            f"p99 {_f(m['clat_p99_us'], '{:.1f}')} µs")
                        stdout = data.pop("_fio_stdout", "")
                        runs.append({"rep": rep, "server": name, "job": job.name,
                                     "command": shlex.join(cmd), "wall_s": data.pop("_wall_s"),
                                     "metrics": m, "fio": data,
                                     "fio_stdout": stdout if stdout.strip() else None})
                        job_errors.pop((job.name, name), None)
                finally:
                    sp.stop()
    finally:
        cleanup_needed = bool(_live_procs)
        if cleanup_needed:
            cleanup()

    # medians
    metric_keys = ["iops", "mib_s", "clat_p50_us", "clat_p99_us", "clat_mean_us",
                   "srv_cpu_pct", "fio_cpu_pct", "other_cpu_pct", "steal_pct",
                   "sync_p50_us", "sync_p99_us"]
    medians: dict[str, dict[str, dict]] = {}
    for job in jobs:
        for name in server_names:
            rs = [r for r in runs if r["job"] == job.name and r["server"] == name]
            if not rs:
                continue
            med = {k: median_of(rs, k) for k in metric_keys}
            med["iops_spread_pct"] = spread_pct(rs, "iops")
            med["n"] = len(rs)
            medians.setdefault(job.name, {})[name] = med

    # ratios[subject][job][reference] = subject median IOPS / reference median IOPS
    ratios: dict[str, dict[str, dict[str, float]]] = {}
    for subject in subjects:
        for job in jobs:
            sm = medians.get(job.name, {}).get(subject)
            if not sm:
                continue
            for ref in references:
                if ref == subject:
                    continue
                rm = medians.get(job.name, {}).get(ref)
                if rm and rm["iops"]:
                    ratios.setdefault(subject, {}).setdefault(job.name, {})[ref] = (
                        sm["iops"] / rm["iops"])
    targets = []
    for subj, ref, jname, want in TARGETS:
        sm = medians.get(jname, {}).get(subj)
        rm = medians.get(jname, {}).get(ref)
        if sm and rm and rm["iops"]:
            got = sm["iops"] / rm["iops"]
            targets.append({"subject": subj, "reference": ref, "job": jname, "min_ratio": want,
                            "ratio": got, "met": got >= want})

    errors_flat: dict = dict(server_errors)
    errors_flat.update(job_errors)
    print()
    print(f"nbdbench: {fmt_size(args.size)} export, {args.runtime}s runtime (+{RAMP_TIME}s ramp), "
          f"median of {args.repeat} rep(s), fio {meta['versions']['fio']}, "
          f"{os.cpu_count()} CPUs, workdir fs {wtype}")
    nw = max(10, *(len(n) for n in server_names))
    for name in server_names:
        print(f"  {name:{nw}s} {server_info[name]['notes']}")
        for a in (server_info[name].get("aux_commands") or [[]])[0]:
            print(f"  {'':{nw}s} helper: {a}")
        if server_info[name]["commands"]:
            print(f"  {'':{nw}s} cmd: {server_info[name]['commands'][0]}")
    print()
    print(render_table(jobs, server_names, medians, ratios, errors_flat, args.repeat))
    if targets:
        print()
        for t in targets:
            print(f"target: {t['job']}: {t['subject']}/{t['reference']} {t['ratio']:.2f}x "
                  f"(wanted >= {t['min_ratio']:.2f}x): {'met' if t['met'] else 'NOT met'}")
    print()
    print("IOPS/MiB/s/latencies: medians over repetitions; ±% = (max-min)/median of IOPS; "
          "p50/p99 = fio completion latency; srv CPU% = server CPU time / fio wall time "
          "(100% = one core); IOPS (k/N) = only k of N repetitions succeeded; other CPU% = CPU used by the rest of the machine meanwhile "
          "(neither server nor fio: other builds/tests, unattributed kernel work).")
    busy = [(r["job"], r["server"], r["rep"], r["metrics"]["other_cpu_pct"]) for r in runs
            if r["metrics"].get("other_cpu_pct", 0) > NOISY_OTHER_CPU_PCT]
    if busy:
        print(f"WARNING: {len(busy)}/{len(runs)} measurement(s) ran while other work used "
              f"> {NOISY_OTHER_CPU_PCT:.0f}% of a core (max {max(b[3] for b in busy):.0f}%); "
              f"on {os.cpu_count()} CPUs that skews results - rerun on a quiet machine or use "
              f"more --repeat.")
    for w in warnings:
        print(f"WARNING: {w}")
    for d in discarded:
        print(f"WARNING: discarded {d['job']} on {d['server']} rep {d['rep']} "
              f"({d['metrics']['iops']:.0f} IOPS): {d['reason'].splitlines()[0]}")
    if server_errors:
        print("\nserver errors:")
        for k, v in server_errors.items():
            print(f"  {k}: {v.splitlines()[0]}")
    if job_errors:
        print("\njob errors:")
        for (j, s), v in job_errors.items():
            print(f"  {j} on {s}: {v.splitlines()[0]}")

    if args.json:
        doc = {
            "meta": meta,
            "jobs": [{"name": j.name, "side": j.side, "fio": j.fio, "prefill": j.prefill,
                      "description": j.description} for j in jobs],
            "servers": server_info,
            "server_errors": server_errors,
            "start_failures": start_failures,
            "warnings": warnings,
            "job_errors": {f"{j}|{s}": v for (j, s), v in job_errors.items()},
            "runs": runs,
            "discarded_runs": discarded,
            "medians": medians,
            # "subject"/"iops": the first subject (the layout before there could be several)
            "ratios": {"subject": subjects[0] if subjects else None,
                       "iops": ratios.get(subjects[0], {}) if subjects else {},
                       "subjects": subjects, "references": references,
                       "by_subject": ratios},
            "targets": targets,
        }
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)
        log(f"wrote {args.json}")
    if args.keep:
        log(f"kept workdir {workdir}")

    # non-zero if anything requested did not produce results (the table is still printed)
    return 0 if (runs and not job_errors and not server_errors) else 1


if __name__ == "__main__":
    sys.exit(main())
