#!/usr/bin/env python3
"""Hand-rolled NBD protocol tests for bad and edge-case input.

Speaks the NBD protocol (doc/proto.md of NetworkBlockDevice/nbd) over plain
sockets, standard library only, so it runs under any python3.  It covers what
a library client such as libnbd will not send: unknown options, commands and
flags, oversized and out-of-range requests, bad magic, clients that vanish
mid-request, and connections that misbehave while others are in use.

Usage:
    raw_protocol.py URI [--strict] [--only=NAME[,NAME...]] [--skip=NAME[,...]]
                      [--max-connections=N] [--list]

URI is nbd://HOST[:PORT]/[EXPORT] or nbd+unix:///[EXPORT]?socket=PATH.

Every check is classified by the spec wording it rests on:
  MUST   a violation is a FAIL;
  SHOULD a violation is a WARN, counted as a failure with --strict.
The script prints one line per check, runs every test case on fresh
connections, prints "N passed, N failed" (plus warnings) and exits 1 if
anything failed.

The script writes to the export (the first few MiB and the last MiB).
"""

import os
import socket
import struct
import sys
import time
import traceback
import urllib.parse

# ---------------------------------------------------------------- constants
NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x0003E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
STRUCTURED_REPLY_MAGIC = 0x668E33EF
EXTENDED_REQUEST_MAGIC = 0x21E41C71
EXTENDED_REPLY_MAGIC = 0x6E8A278C

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2

OPT_EXPORT_NAME = 1
OPT_ABORT = 2
OPT_LIST = 3
OPT_STARTTLS = 5
OPT_INFO = 6
OPT_GO = 7
OPT_STRUCTURED_REPLY = 8
OPT_LIST_META_CONTEXT = 9
OPT_SET_META_CONTEXT = 10
OPT_EXTENDED_HEADERS = 11

REP_ACK = 1
REP_SERVER = 2
REP_INFO = 3
REP_META_CONTEXT = 4
REP_ERR_BIT = 0x80000000
REP_ERR_UNSUP = REP_ERR_BIT + 1
REP_ERR_POLICY = REP_ERR_BIT + 2
REP_ERR_INVALID = REP_ERR_BIT + 3
REP_ERR_UNKNOWN = REP_ERR_BIT + 6
REP_NAMES = {
    1: "ACK", 2: "SERVER", 3: "INFO", 4: "META_CONTEXT",
    REP_ERR_BIT + 1: "ERR_UNSUP", REP_ERR_BIT + 2: "ERR_POLICY",
    REP_ERR_BIT + 3: "ERR_INVALID", REP_ERR_BIT + 4: "ERR_PLATFORM",
    REP_ERR_BIT + 5: "ERR_TLS_REQD", REP_ERR_BIT + 6: "ERR_UNKNOWN",
    REP_ERR_BIT + 7: "ERR_SHUTDOWN", REP_ERR_BIT + 8: "ERR_BLOCK_SIZE_REQD",
    REP_ERR_BIT + 9: "ERR_TOO_BIG", REP_ERR_BIT + 10: "ERR_EXT_HEADER_REQD",
}

INFO_EXPORT = 0
INFO_NAME = 1
INFO_DESCRIPTION = 2
INFO_BLOCK_SIZE = 3

TF_HAS_FLAGS = 0x1
TF_READ_ONLY = 0x2
TF_SEND_FLUSH = 0x4
TF_SEND_FUA = 0x8
TF_ROTATIONAL = 0x10
TF_SEND_TRIM = 0x20
TF_SEND_WRITE_ZEROES = 0x40
TF_SEND_DF = 0x80
TF_CAN_MULTI_CONN = 0x100
TF_SEND_RESIZE = 0x200
TF_SEND_CACHE = 0x400
TF_SEND_FAST_ZERO = 0x800

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_TRIM = 4
CMD_CACHE = 5
CMD_WRITE_ZEROES = 6
CMD_BLOCK_STATUS = 7

CMD_FLAG_FUA = 0x1
CMD_FLAG_NO_HOLE = 0x2
CMD_FLAG_DF = 0x4
CMD_FLAG_REQ_ONE = 0x8
CMD_FLAG_FAST_ZERO = 0x10
CMD_FLAG_PAYLOAD_LEN = 0x20

REPLY_FLAG_DONE = 1
RT_NONE = 0
RT_OFFSET_DATA = 1
RT_OFFSET_HOLE = 2
RT_BLOCK_STATUS = 5
RT_BLOCK_STATUS_EXT = 6
RT_ERROR = 0x8001
RT_ERROR_OFFSET = 0x8002

EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP, ESHUTDOWN = 1, 5, 12, 22, 28, 75, 95, 108
ERRNAMES = {0: "OK", 1: "EPERM", 5: "EIO", 12: "ENOMEM", 22: "EINVAL", 28: "ENOSPC",
            75: "EOVERFLOW", 95: "ENOTSUP", 108: "ESHUTDOWN"}

TIMEOUT = 20.0
MiB = 1 << 20


def errname(e):
    return ERRNAMES.get(e, str(e))


def repname(t):
    return REP_NAMES.get(t, hex(t))


# ---------------------------------------------------------------- reporting
class Fail(Exception):
    """A MUST-level violation."""


class Closed(Exception):
    """The server closed (or reset) the connection."""


STRICT = False
MAX_CONNECTIONS = 48   # --max-connections=N (qemu-nbd -e 8 serves at most 8)
WARNINGS = []
CURRENT = [""]


def check(cond, msg):
    if not cond:
        raise Fail(msg)
    print("    ok   %s" % msg)


def should(cond, msg):
    """A SHOULD-level expectation: a WARN unless --strict."""
    if cond:
        print("    ok   %s" % msg)
        return True
    WARNINGS.append("%s: %s" % (CURRENT[0], msg))
    print("    WARN %s (spec: SHOULD)" % msg)
    return False


def info(msg):
    print("    ..   %s" % msg)


# ---------------------------------------------------------------- transport
class Target:
    def __init__(self, uri):
        u = urllib.parse.urlsplit(uri)
        self.export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path).encode()
        if u.scheme == "nbd":
            self.family = socket.AF_INET6 if (u.hostname or "").count(":") else socket.AF_INET
            self.addr = (u.hostname or "localhost", u.port or 10809)
        elif u.scheme == "nbd+unix":
            q = urllib.parse.parse_qs(u.query)
            self.family = socket.AF_UNIX
            self.addr = q["socket"][0]
        else:
            raise SystemExit("unsupported URI scheme: %s" % uri)

    def connect(self):
        s = socket.socket(self.family, socket.SOCK_STREAM)
        s.settimeout(TIMEOUT)
        s.connect(self.addr)
        if self.family != socket.AF_UNIX:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return Conn(s)


class Reply:
    def __init__(self, cookie):
        self.cookie = cookie
        self.kind = None          # "simple" | "structured" | "extended"
        self.error = 0
        self.errmsg = b""
        self.data = None          # simple read payload
        self.chunks = []          # (type, flags, payload)

    def __repr__(self):
        return "Reply(cookie=%d kind=%s error=%s chunks=%s)" % (
            self.cookie, self.kind, errname(self.error),
            [(t, len(p)) for t, _, p in self.chunks])


class Conn:
    def __init__(self, sock):
        self.s = sock
        self.next_cookie = 1
        self.pending = {}        # cookie -> (type, offset, length)
        self.partial = {}        # cookie -> Reply (structured, not DONE yet)
        self.structured = False
        self.extended = False
        self.size = None
        self.tflags = None
        self.blocksize = None

    # -- raw io
    def send(self, b):
        try:
            self.s.sendall(b)
        except (BrokenPipeError, ConnectionResetError) as e:
            raise Closed("send failed: %s" % e)

    def recvn(self, n):
        buf = bytearray()
        while len(buf) < n:
            try:
                chunk = self.s.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError as e:
                raise Closed("connection reset after %d of %d bytes" % (len(buf), n)) from e
            if not chunk:
                raise Closed("EOF after %d of %d bytes" % (len(buf), n))
            buf += chunk
        return bytes(buf)

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass

    def wait_closed(self, timeout=TIMEOUT):
        """True if the server closes the connection within timeout (any data
        received before EOF is discarded)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            self.s.settimeout(max(0.05, deadline - time.time()))
            try:
                b = self.s.recv(65536)
            except socket.timeout:
                break
            except ConnectionResetError:
                return True
            if not b:
                return True
        self.s.settimeout(TIMEOUT)
        return False

    # -- handshake
    def greeting(self, cflags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        magic, opt, hflags = struct.unpack(">QQH", self.recvn(18))
        if magic != NBDMAGIC:
            raise Fail("bad NBDMAGIC %#x" % magic)
        if opt != IHAVEOPT:
            raise Fail("server did not send IHAVEOPT (oldstyle?) %#x" % opt)
        self.hflags = hflags
        self.cflags = cflags
        self.send(struct.pack(">I", cflags))
        return hflags

    def opt(self, opt, data=b""):
        self.send(struct.pack(">QII", IHAVEOPT, opt, len(data)) + data)

    def opt_reply(self, expect_opt):
        magic, opt, rtype, ln = struct.unpack(">QIII", self.recvn(20))
        if magic != OPT_REPLY_MAGIC:
            raise Fail("bad option reply magic %#x" % magic)
        if opt != expect_opt:
            raise Fail("option reply for option %d, expected %d" % (opt, expect_opt))
        data = self.recvn(ln)
        return rtype, data

    def opt_all(self, opt, data=b""):
        """Send an option, collect replies until ACK or an error.
        Returns (final_type, [(type, data), ...])."""
        self.opt(opt, data)
        reps = []
        while True:
            rtype, d = self.opt_reply(opt)
            if rtype == REP_ACK or rtype & REP_ERR_BIT:
                return rtype, reps
            reps.append((rtype, d))

    @staticmethod
    def info_data(name, infos=(INFO_BLOCK_SIZE,)):
        return (struct.pack(">I", len(name)) + name + struct.pack(">H", len(infos))
                + b"".join(struct.pack(">H", i) for i in infos))

    def info_or_go(self, opt, name, infos=(INFO_BLOCK_SIZE,)):
        final, reps = self.opt_all(opt, self.info_data(name, infos))
        res = {"final": final, "size": None, "flags": None, "blocksize": None}
        for t, d in reps:
            if t != REP_INFO:
                raise Fail("unexpected reply %s to INFO/GO" % repname(t))
            (it,) = struct.unpack(">H", d[:2])
            if it == INFO_EXPORT:
                if len(d) != 12:
                    raise Fail("NBD_INFO_EXPORT length %d != 12" % len(d))
                res["size"], res["flags"] = struct.unpack(">QH", d[2:])
            elif it == INFO_BLOCK_SIZE:
                if len(d) != 14:
                    raise Fail("NBD_INFO_BLOCK_SIZE length %d != 14" % len(d))
                res["blocksize"] = struct.unpack(">III", d[2:])
            elif it in (INFO_NAME, INFO_DESCRIPTION):
                if len(d) - 2 > 4096:
                    raise Fail("NBD_INFO_%s string longer than 4096 bytes" % ("NAME" if it == 1 else "DESCRIPTION"))
                res["name" if it == INFO_NAME else "description"] = d[2:]
        if final == REP_ACK and res["size"] is None:
            raise Fail("successful INFO/GO without NBD_INFO_EXPORT")
        return res

    def go(self, name, infos=(INFO_BLOCK_SIZE,)):
        res = self.info_or_go(OPT_GO, name, infos)
        if res["final"] != REP_ACK:
            raise Fail("OPT_GO(%r) failed: %s" % (name, repname(res["final"])))
        self.size, self.tflags, self.blocksize = res["size"], res["flags"], res["blocksize"]
        return res

    def structured_reply(self):
        final, reps = self.opt_all(OPT_STRUCTURED_REPLY)
        if final == REP_ACK:
            self.structured = True
        return final

    @staticmethod
    def meta_data(name, queries):
        d = struct.pack(">I", len(name)) + name + struct.pack(">I", len(queries))
        for q in queries:
            d += struct.pack(">I", len(q)) + q
        return d

    def meta(self, opt, name, queries):
        final, reps = self.opt_all(opt, self.meta_data(name, queries))
        ctxs = {}
        for t, d in reps:
            if t != REP_META_CONTEXT:
                raise Fail("unexpected reply %s to META_CONTEXT option" % repname(t))
            (cid,) = struct.unpack(">I", d[:4])
            ctxs[d[4:]] = cid
        return final, ctxs

    # -- transmission
    def pipeline(self, reqs):
        """Send many requests from a background thread while this thread
        reads the replies (a client that sent everything before reading
        could deadlock against a server blocked on writing replies).
        reqs: list of (ctype, offset, length, flags, payload).  Returns
        (cookies in request order, {cookie: Reply})."""
        import threading
        blobs, cookies = [], []
        saved = self.send
        self.send = blobs.append
        try:
            for ctype, off, ln, fl, payload in reqs:
                cookies.append(self.cmd(ctype, off, ln, fl, payload))
        finally:
            self.send = saved
        errors = []

        def sender():
            try:
                self.s.sendall(b"".join(blobs))
            except OSError as e:
                errors.append(e)
        t = threading.Thread(target=sender, daemon=True)
        t.start()
        got = {}
        for _ in range(len(reqs)):
            r = self.reply()
            if r.cookie in got:
                raise Fail("cookie %d answered twice" % r.cookie)
            got[r.cookie] = r
        t.join(TIMEOUT)
        if errors:
            raise Closed("send failed: %s" % errors[0])
        return cookies, got

    def cmd(self, ctype, offset=0, length=0, flags=0, payload=b"", cookie=None, magic=REQUEST_MAGIC):
        if cookie is None:
            cookie = self.next_cookie
            self.next_cookie += 1
        if self.extended:
            if payload:
                flags |= CMD_FLAG_PAYLOAD_LEN
                length = len(payload)
            hdr = struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, flags, ctype, cookie, offset, length)
        else:
            hdr = struct.pack(">IHHQQI", magic, flags, ctype, cookie, offset, length)
        self.pending[cookie] = (ctype, offset, length)
        self.send(hdr + payload)
        return cookie

    def reply(self):
        """Read until one request's reply is complete; return that Reply."""
        while True:
            (magic,) = struct.unpack(">I", self.recvn(4))
            if magic == SIMPLE_REPLY_MAGIC:
                err, cookie = struct.unpack(">IQ", self.recvn(12))
                if cookie not in self.pending:
                    raise Fail("simple reply for unknown cookie %d" % cookie)
                if cookie in self.partial:
                    raise Fail("simple reply for cookie %d that already has structured chunks" % cookie)
                ctype, off, ln = self.pending.pop(cookie)
                r = Reply(cookie)
                r.kind = "simple"
                r.error = err
                if ctype == CMD_READ and err == 0:
                    if self.structured:
                        raise Fail("simple reply to READ after structured replies were negotiated")
                    r.data = self.recvn(ln)
                return r
            elif magic in (STRUCTURED_REPLY_MAGIC, EXTENDED_REPLY_MAGIC):
                if magic == STRUCTURED_REPLY_MAGIC:
                    if not self.structured:
                        raise Fail("structured reply chunk although not negotiated")
                    flags, rtype, cookie, ln = struct.unpack(">HHQI", self.recvn(16))
                    kind = "structured"
                else:
                    if not self.extended:
                        raise Fail("extended reply although not negotiated")
                    flags, rtype, cookie, _off, ln = struct.unpack(">HHQQQ", self.recvn(28))
                    kind = "extended"
                if cookie not in self.pending:
                    raise Fail("structured chunk for unknown cookie %d" % cookie)
                payload = self.recvn(ln)
                r = self.partial.setdefault(cookie, Reply(cookie))
                r.kind = kind
                r.chunks.append((rtype, flags, payload))
                if rtype & 0x8000:
                    if len(payload) < 6:
                        raise Fail("error chunk too short (%d)" % len(payload))
                    err, mlen = struct.unpack(">IH", payload[:6])
                    if err == 0:
                        raise Fail("error chunk with error value 0")
                    if 6 + mlen > len(payload):
                        raise Fail("error chunk message length %d overruns payload" % mlen)
                    r.error = r.error or err
                    r.errmsg = payload[6:6 + mlen]
                if flags & REPLY_FLAG_DONE:
                    del self.partial[cookie]
                    self.pending.pop(cookie)
                    return r
            else:
                raise Fail("bad reply magic %#x" % magic)

    def reply_for(self, cookie):
        r = self.reply()
        if r.cookie != cookie:
            raise Fail("got reply for cookie %d, expected %d" % (r.cookie, cookie))
        return r

    def do(self, ctype, offset=0, length=0, flags=0, payload=b""):
        c = self.cmd(ctype, offset, length, flags, payload)
        return self.reply_for(c)

    def read(self, offset, length, flags=0):
        """READ, returning (error, data) with structured chunks reassembled
        and validated."""
        c = self.cmd(CMD_READ, offset, length, flags)
        r = self.reply_for(c)
        if r.kind == "simple":
            return r.error, r.data
        return r.error, assemble_read(r, offset, length)

    def write(self, offset, data, flags=0):
        return self.do(CMD_WRITE, offset, len(data), flags, data).error


def assemble_read(r, offset, length):
    """Validate the chunks of a structured READ reply and reassemble the data."""
    buf = bytearray(length)
    covered = []
    for rtype, flags, p in r.chunks:
        if rtype == RT_OFFSET_DATA:
            (o,) = struct.unpack(">Q", p[:8])
            n = len(p) - 8
            if n == 0:
                raise Fail("OFFSET_DATA chunk with no data")
            seg = (o, o + n)
            if offset <= o and o + n <= offset + length:
                buf[o - offset:o - offset + n] = p[8:]
        elif rtype == RT_OFFSET_HOLE:
            if len(p) != 12:
                raise Fail("OFFSET_HOLE chunk length %d != 12" % len(p))
            o, n = struct.unpack(">QI", p)
            if n == 0:
                raise Fail("OFFSET_HOLE chunk of size 0")
            seg = (o, o + n)
        elif rtype == RT_NONE:
            if not flags & REPLY_FLAG_DONE:
                raise Fail("NONE chunk without DONE flag")
            if r.chunks.index((rtype, flags, p)) != len(r.chunks) - 1:
                raise Fail("NONE chunk not last")
            continue
        elif rtype & 0x8000:
            continue
        else:
            raise Fail("unexpected chunk type %d in READ reply" % rtype)
        if seg[0] < offset or seg[1] > offset + length:
            raise Fail("READ chunk %s outside request [%d,%d)" % (seg, offset, offset + length))
        for a, b in covered:
            if seg[0] < b and a < seg[1]:
                raise Fail("READ chunks overlap: %s and %s" % ((a, b), seg))
        covered.append(seg)
    if r.error == 0:
        total = sum(b - a for a, b in covered)
        if total != length:
            raise Fail("successful READ reply covers %d of %d bytes" % (total, length))
        return bytes(buf)
    return None


# ---------------------------------------------------------------- test cases
TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


class Ctx:
    """Shared per-run facts."""

    def __init__(self, target):
        self.t = target
        self.name = target.export

    def conn(self, structured=False, meta=None, cflags=FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES):
        c = self.t.connect()
        c.greeting(cflags)
        if structured:
            if c.structured_reply() != REP_ACK:
                raise Fail("server refused NBD_OPT_STRUCTURED_REPLY")
        if meta:
            final, ctxs = c.meta(OPT_SET_META_CONTEXT, self.name, meta)
            if final != REP_ACK:
                raise Fail("SET_META_CONTEXT %r failed: %s" % (meta, repname(final)))
            c.contexts = ctxs
        c.go(self.name)
        return c

    def alive(self, c, what="the connection"):
        """A READ on c still works."""
        err, data = c.read(0, 4096)
        check(err == 0 and data is not None and len(data) == 4096, "%s still serves a READ afterwards" % what)

    def fresh_conn_works(self, what="a new connection"):
        c = self.conn()
        err, data = c.read(0, 512)
        check(err == 0 and len(data) == 512, "%s negotiates and serves a READ" % what)
        c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 999, 0, 0))
        c.close()


def pattern(seed, n):
    """Deterministic non-trivial bytes."""
    out = bytearray()
    x = seed & 0xFFFFFFFF or 1
    while len(out) < n:
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        out += struct.pack("<I", x)
    return bytes(out[:n])


@test
def greeting_is_fixed_newstyle_with_no_zeroes(ctx):
    c = ctx.t.connect()
    h = c.greeting()
    check(h & FLAG_FIXED_NEWSTYLE, "server sets NBD_FLAG_FIXED_NEWSTYLE (flags %#x)" % h)
    should(h & FLAG_NO_ZEROES, "server sets NBD_FLAG_NO_ZEROES")
    check(h & ~3 == 0, "no unknown handshake flags (%#x)" % h)
    c.opt(OPT_ABORT)
    c.close()


@test
def unknown_client_flags_close_the_connection(ctx):
    c = ctx.t.connect()
    c.greeting(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES | 0x40000000)
    try:
        c.opt(OPT_LIST)
        closed = c.wait_closed(5)
    except Closed:
        closed = True
    check(closed, "server closes the connection when the client sets an unknown flag (MUST)")
    c.close()
    ctx.fresh_conn_works()


@test
def unknown_option_gets_err_unsup_and_next_option_parses(ctx):
    c = ctx.t.connect()
    c.greeting()
    c.opt(0xDEAD, b"some option payload")
    t, d = c.opt_reply(0xDEAD)
    check(t == REP_ERR_UNSUP, "unknown option 0xdead with 19 bytes of data -> ERR_UNSUP (got %s)" % repname(t))
    c.opt(0x7FFFFFFF)
    t, d = c.opt_reply(0x7FFFFFFF)
    check(t == REP_ERR_UNSUP, "unknown option 0x7fffffff without data -> ERR_UNSUP (got %s)" % repname(t))
    c.opt(4)  # NBD_OPT_PEEK_EXPORT, withdrawn
    t, d = c.opt_reply(4)
    check(t & REP_ERR_BIT, "withdrawn option PEEK_EXPORT (4) -> an error (got %s)" % repname(t))
    final, reps = c.opt_all(OPT_LIST)
    check(final == REP_ACK, "NBD_OPT_LIST after unknown options ends with ACK (got %s)" % repname(final))
    names = []
    for t, d in reps:
        check(t == REP_SERVER, "LIST reply type is REP_SERVER")
        (ln,) = struct.unpack(">I", d[:4])
        check(4 + ln <= len(d), "REP_SERVER name length %d fits in reply (%d)" % (ln, len(d)))
        names.append(d[4:4 + ln])
    info("exports listed: %r" % names)
    check(len(names) >= 1, "LIST names at least one export")
    c.go(ctx.name)
    ctx.alive(c)
    c.close()


@test
def opt_list_with_data_is_rejected(ctx):
    c = ctx.t.connect()
    c.greeting()
    final, reps = c.opt_all(OPT_LIST, b"junk")
    should(final == REP_ERR_INVALID, "NBD_OPT_LIST with data -> ERR_INVALID (got %s)" % repname(final))
    final, reps = c.opt_all(OPT_LIST)
    check(final == REP_ACK, "a following NBD_OPT_LIST works (got %s)" % repname(final))
    c.close()


@test
def opt_info_then_go_report_the_same_export(ctx):
    c = ctx.t.connect()
    c.greeting()
    i = c.info_or_go(OPT_INFO, ctx.name)
    check(i["final"] == REP_ACK, "NBD_OPT_INFO on the export succeeds (got %s)" % repname(i["final"]))
    info("size=%d flags=%#x blocksize=%s" % (i["size"], i["flags"], i["blocksize"]))
    f = i["flags"]
    check(f & TF_HAS_FLAGS, "transmission flags have HAS_FLAGS")
    check(not (f & TF_SEND_DF), "SEND_DF is clear while structured replies are not negotiated (MUST)")
    check(not (f & TF_SEND_FAST_ZERO) or (f & TF_SEND_WRITE_ZEROES),
          "SEND_FAST_ZERO only together with SEND_WRITE_ZEROES")
    g = c.go(ctx.name)
    check((g["size"], g["flags"], g["blocksize"]) == (i["size"], i["flags"], i["blocksize"]),
          "OPT_GO returns the same size/flags/block sizes as the identical OPT_INFO (MUST)")
    if g["blocksize"]:
        mn, pref, mx = g["blocksize"]
        p2 = lambda v: v and v & (v - 1) == 0
        check(p2(mn) and mn <= 65536, "minimum block size %d is a power of 2 <= 64 KiB" % mn)
        check(p2(pref) and pref >= max(mn, 512), "preferred block size %d is a power of 2 >= max(min, 512)" % pref)
        check(mx >= pref, "maximum payload %d >= preferred %d" % (mx, pref))
        should(mx >= min(MiB, g["size"]), "maximum payload %d >= 1 MiB" % mx)
    ctx.alive(c)
    c.close()


@test
def info_name_and_description_requests(ctx):
    c = ctx.t.connect()
    c.greeting()
    i = c.info_or_go(OPT_INFO, ctx.name, (INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE, 0x7777))
    check(i["final"] == REP_ACK, "OPT_INFO requesting NAME, DESCRIPTION, BLOCK_SIZE and unknown 0x7777 succeeds")
    info("name=%r description=%r" % (i.get("name"), i.get("description")))
    g = c.go(ctx.name, (INFO_NAME, INFO_BLOCK_SIZE))
    ctx.alive(c)
    c.close()


@test
def malformed_info_and_go_are_rejected_without_disconnect(ctx):
    c = ctx.t.connect()
    c.greeting()
    bad = [
        ("name length past the end", struct.pack(">I", 100) + b"ab" + struct.pack(">H", 0)),
        ("info count past the end", struct.pack(">I", len(ctx.name)) + ctx.name + struct.pack(">H", 5) + b"\0\3"),
        ("too short for the fixed fields", b"\0\0"),
        ("trailing garbage", c.info_data(ctx.name, ()) + b"xyz"),
    ]
    for what, data in bad:
        for opt, oname in ((OPT_INFO, "INFO"), (OPT_GO, "GO")):
            try:
                final, reps = c.opt_all(opt, data)
            except Closed as e:
                raise Fail("OPT_%s with %s: server disconnected (%s); it MUST keep replying with errors" % (oname, what, e))
            check(final & REP_ERR_BIT, "OPT_%s with %s -> an error (got %s)" % (oname, what, repname(final)))
            should(final == REP_ERR_INVALID, "... ERR_INVALID (got %s)" % repname(final))
    c.go(ctx.name)
    ctx.alive(c)
    c.close()


@test
def huge_option_length_does_not_hurt_the_server(ctx):
    c = ctx.t.connect()
    c.greeting()
    c.send(struct.pack(">QII", IHAVEOPT, 0xDEAD, 0x7FFFFFFF) + b"\0" * MiB)
    other = ctx.conn()
    ctx.alive(other, "another connection, while one announces a 2 GiB option,")
    other.close()
    c.close()
    ctx.fresh_conn_works()


@test
def go_with_zero_info_requests_works(ctx):
    """What the kernel's nbd-client sends: OPT_GO without info requests."""
    c = ctx.t.connect()
    c.greeting()
    g = c.go(ctx.name, infos=())
    check(g["size"] is not None, "OPT_GO with no info requests succeeds (size %d)" % g["size"])
    ctx.alive(c)
    c.close()


@test
def unknown_export_name_fails_info_and_go_without_hanging(ctx):
    c = ctx.t.connect()
    c.greeting()
    for opt, oname in ((OPT_INFO, "INFO"), (OPT_GO, "GO")):
        r = c.info_or_go(opt, b"no-such-export-xyzzy")
        check(r["final"] & REP_ERR_BIT, "OPT_%s for an unknown export fails (got %s)" % (oname, repname(r["final"])))
        should(r["final"] == REP_ERR_UNKNOWN, "... with ERR_UNKNOWN (got %s)" % repname(r["final"]))
    c.go(ctx.name)
    ctx.alive(c, "the same connection, after a GO to the real export,")
    c.close()


@test
def export_name_option_legacy_path(ctx):
    c = ctx.t.connect()
    c.greeting()
    c.opt(OPT_EXPORT_NAME, ctx.name)
    size, flags = struct.unpack(">QH", c.recvn(10))
    check(size > 0 and flags & TF_HAS_FLAGS, "OPT_EXPORT_NAME answers size %d and flags %#x" % (size, flags))
    check(not (flags & TF_SEND_DF), "SEND_DF clear without structured replies (MUST)")
    c.size = size
    # With NO_ZEROES negotiated there must be no 124-byte pad: the next bytes
    # are the reply to our READ.
    ctx.alive(c, "the connection (no 124-byte zero pad after NO_ZEROES)")
    c.close()

    c = ctx.t.connect()
    c.greeting(FLAG_FIXED_NEWSTYLE)  # no NO_ZEROES: pad must be present
    c.opt(OPT_EXPORT_NAME, ctx.name)
    size2, flags2 = struct.unpack(">QH", c.recvn(10))
    pad = c.recvn(124)
    check(pad == bytes(124), "without NO_ZEROES the reply carries 124 zero bytes")
    ctx.alive(c)
    c.close()

    c = ctx.t.connect()
    c.greeting()
    c.opt(OPT_EXPORT_NAME, b"no-such-export-xyzzy")
    check(c.wait_closed(10), "OPT_EXPORT_NAME with an unknown name: the server closes the connection")
    c.close()
    ctx.fresh_conn_works()


@test
def opt_abort_is_acked(ctx):
    c = ctx.t.connect()
    c.greeting()
    c.opt(OPT_ABORT)
    try:
        t, d = c.opt_reply(OPT_ABORT)
        check(t == REP_ACK, "NBD_OPT_ABORT -> ACK (MUST; got %s)" % repname(t))
    except Closed:
        raise Fail("server closed the connection without ACKing NBD_OPT_ABORT (MUST reply ACK)")
    check(c.wait_closed(10), "server closes the connection after ABORT")
    c.close()
    # client that goes away without waiting for the ACK
    c = ctx.t.connect()
    c.greeting()
    c.opt(OPT_ABORT)
    c.close()
    ctx.fresh_conn_works()


@test
def starttls_refused_in_notls_mode(ctx):
    c = ctx.t.connect()
    c.greeting()
    final, _ = c.opt_all(OPT_STARTTLS)
    check(final in (REP_ERR_UNSUP, REP_ERR_POLICY),
          "NBD_OPT_STARTTLS without TLS support -> ERR_UNSUP or ERR_POLICY (got %s)" % repname(final))
    c.go(ctx.name)
    ctx.alive(c)
    c.close()


@test
def structured_reply_option(ctx):
    c = ctx.t.connect()
    c.greeting()
    final, _ = c.opt_all(OPT_STRUCTURED_REPLY, b"\0\0\0\0")
    should(final == REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY with data -> ERR_INVALID (got %s)" % repname(final))
    final = c.structured_reply()
    check(final == REP_ACK, "NBD_OPT_STRUCTURED_REPLY without data -> ACK (got %s)" % repname(final))
    g = c.go(ctx.name)
    info("flags with structured replies: %#x" % g["flags"])
    ctx.alive(c)
    c.close()


@test
def meta_context_negotiation(ctx):
    c = ctx.t.connect()
    c.greeting()
    final, ctxs = c.meta(OPT_SET_META_CONTEXT, ctx.name, [b"base:allocation"])
    should(final == REP_ERR_INVALID,
           "SET_META_CONTEXT before STRUCTURED_REPLY -> ERR_INVALID (got %s, contexts %r)" % (repname(final), ctxs))
    check(c.structured_reply() == REP_ACK, "structured replies negotiated")

    final, ctxs = c.meta(OPT_LIST_META_CONTEXT, ctx.name, [])
    check(final == REP_ACK, "LIST_META_CONTEXT with no queries -> ACK (got %s)" % repname(final))
    check(b"base:allocation" in ctxs or b"base:" in ctxs,
          "LIST_META_CONTEXT with no queries offers base:allocation (got %r)" % list(ctxs))
    final, ctxs = c.meta(OPT_LIST_META_CONTEXT, ctx.name, [b"base:"])
    check(final == REP_ACK and b"base:allocation" in ctxs,
          "LIST_META_CONTEXT 'base:' lists base:allocation (got %s %r)" % (repname(final), list(ctxs)))
    final, ctxs = c.meta(OPT_LIST_META_CONTEXT, ctx.name, [b"nosuchns:thing"])
    check(final == REP_ACK and not ctxs,
          "LIST_META_CONTEXT for an unknown namespace -> just ACK (got %s %r)" % (repname(final), list(ctxs)))

    # Malformed: query length runs past the option length (MUST ERR_INVALID).
    bad = struct.pack(">I", len(ctx.name)) + ctx.name + struct.pack(">I", 1) + struct.pack(">I", 200) + b"base:"
    final, reps = c.opt_all(OPT_SET_META_CONTEXT, bad)
    check(final == REP_ERR_INVALID, "SET_META_CONTEXT with a query length past the end -> ERR_INVALID (got %s)" % repname(final))
    bad = struct.pack(">I", 1000) + ctx.name
    final, reps = c.opt_all(OPT_LIST_META_CONTEXT, bad)
    check(final == REP_ERR_INVALID, "LIST_META_CONTEXT with an export name length past the end -> ERR_INVALID (got %s)" % repname(final))
    # Unknown export
    final, ctxs = c.meta(OPT_SET_META_CONTEXT, b"no-such-export-xyzzy", [b"base:allocation"])
    should(final & REP_ERR_BIT or not ctxs,
          "SET_META_CONTEXT for an unknown export selects nothing (got %s %r)" % (repname(final), list(ctxs)))

    final, ctxs = c.meta(OPT_SET_META_CONTEXT, ctx.name, [])
    check(final == REP_ACK and not ctxs,
          "SET_META_CONTEXT with zero queries selects nothing (got %s %r)" % (repname(final), list(ctxs)))
    final, ctxs = c.meta(OPT_SET_META_CONTEXT, ctx.name, [b"base:allocation", b"nosuchns:thing"])
    check(final == REP_ACK and list(ctxs) == [b"base:allocation"],
          "SET_META_CONTEXT base:allocation + unknown namespace selects exactly base:allocation (got %s %r)"
          % (repname(final), list(ctxs)))
    c.go(ctx.name)
    cid = ctxs[b"base:allocation"]
    r = c.do(CMD_BLOCK_STATUS, 0, 65536)
    check(r.error == 0, "BLOCK_STATUS after selecting base:allocation succeeds (%s)" % errname(r.error))
    bs = [p for t, f, p in r.chunks if t == RT_BLOCK_STATUS]
    check(len(bs) == 1, "exactly one BLOCK_STATUS chunk for one context (got %d)" % len(bs))
    (rid,) = struct.unpack(">I", bs[0][:4])
    check(rid == cid, "BLOCK_STATUS chunk carries the negotiated context id %d (got %d)" % (cid, rid))
    c.close()


@test
def block_status_without_context_is_einval(ctx):
    c = ctx.conn(structured=True)
    r = c.do(CMD_BLOCK_STATUS, 0, 4096)
    check(r.error != 0, "BLOCK_STATUS with no selected context fails (got %s)" % errname(r.error))
    should(r.error == EINVAL, "... with EINVAL (got %s)" % errname(r.error))
    ctx.alive(c)
    c.close()


def parse_extents(r):
    out = []
    for t, f, p in r.chunks:
        if t == RT_BLOCK_STATUS:
            (cid,) = struct.unpack(">I", p[:4])
            body = p[4:]
            if len(body) % 8 or not body:
                raise Fail("BLOCK_STATUS chunk payload %d is not a non-empty multiple of 8" % len(body))
            ex = [struct.unpack(">II", body[i:i + 8]) for i in range(0, len(body), 8)]
            out.append((cid, ex))
    return out


@test
def block_status_extents_are_well_formed(ctx):
    c = ctx.conn(structured=True, meta=[b"base:allocation"])
    size = c.size
    check(c.write(0, pattern(7, 65536)) == 0, "write 64 KiB of data at 0")
    check(c.do(CMD_TRIM, MiB, MiB).error == 0, "trim [1 MiB, 2 MiB)")
    check(c.do(CMD_WRITE_ZEROES, 2 * MiB, MiB).error == 0, "write_zeroes [2 MiB, 3 MiB)")
    length = min(4 * MiB, size)
    r = c.do(CMD_BLOCK_STATUS, 0, length)
    check(r.error == 0, "BLOCK_STATUS [0, %d) succeeds" % length)
    ((cid, ex),) = parse_extents(r)
    check(all(n > 0 for n, fl in ex), "every extent has nonzero length")
    check(all(fl & ~3 == 0 for n, fl in ex), "extent flags only use HOLE|ZERO (%r)" % ex[:8])
    check(not (ex[0][1] & 2), "the written first 64 KiB is not reported as ZERO (first extent %r)" % (ex[0],))
    info("extents: %r%s" % (ex[:8], " ..." if len(ex) > 8 else ""))
    total = sum(n for n, fl in ex)
    check(total <= size, "extents do not run past the end of the export (%d > %d)" % (total, size))
    r = c.do(CMD_BLOCK_STATUS, 0, 4096, CMD_FLAG_REQ_ONE)
    check(r.error == 0, "BLOCK_STATUS with REQ_ONE succeeds")
    ((cid, ex),) = parse_extents(r)
    check(len(ex) == 1 and ex[0][0] <= 4096, "REQ_ONE gives exactly one extent no longer than the request (%r)" % ex)
    r = c.do(CMD_BLOCK_STATUS, size - 4096, 4096)
    check(r.error == 0, "BLOCK_STATUS of the last 4 KiB succeeds")
    ((cid, ex),) = parse_extents(r)
    check(sum(n for n, f in ex) <= 4096, "block status at the tail does not run past the end (%r)" % ex)
    r = c.do(CMD_BLOCK_STATUS, size - 4096, 8192)
    check(r.error != 0, "BLOCK_STATUS past the end fails (got %s)" % errname(r.error))
    should(r.error == EINVAL, "... with EINVAL (got %s)" % errname(r.error))
    ctx.alive(c)
    c.close()


@test
def commands_work_with_simple_replies(ctx):
    c = ctx.conn()
    f = c.tflags
    data = pattern(1, 131072)
    check(c.write(4096, data, CMD_FLAG_FUA if f & TF_SEND_FUA else 0) == 0, "WRITE 128 KiB (FUA) at 4096")
    err, back = c.read(4096, 131072)
    check(err == 0 and back == data, "READ returns what was written")
    err, back = c.read(4096 + 1, 1000)
    check(err == 0 and back == data[1:1001], "unaligned READ (offset 4097, 1000 bytes) returns the right bytes")
    check(c.write(4096 + 3, b"xyz") == 0, "unaligned 3-byte WRITE at 4099")
    err, back = c.read(4096, 8)
    check(back == data[:3] + b"xyz" + data[6:8], "unaligned WRITE landed exactly (read-modify-write)")
    if f & TF_SEND_FLUSH:
        check(c.do(CMD_FLUSH).error == 0, "FLUSH succeeds")
    if f & TF_SEND_WRITE_ZEROES:
        check(c.do(CMD_WRITE_ZEROES, 8192, 16384).error == 0, "WRITE_ZEROES [8192, 24576)")
        err, back = c.read(4096, 131072)
        check(back == data[:3] + b"xyz" + data[6:4096] + bytes(16384) + data[20480:],
              "WRITE_ZEROES zeroed exactly its range")
        check(c.do(CMD_WRITE_ZEROES, 8192, 4096, CMD_FLAG_NO_HOLE | CMD_FLAG_FUA).error == 0,
              "WRITE_ZEROES with NO_HOLE|FUA succeeds")
    if f & TF_SEND_TRIM:
        check(c.do(CMD_TRIM, 65536, 65536).error == 0, "TRIM succeeds")
    if f & TF_SEND_CACHE:
        check(c.do(CMD_CACHE, 0, 65536).error == 0, "CACHE succeeds")
    c.close()


@test
def structured_reads_are_well_formed(ctx):
    c = ctx.conn(structured=True)
    f = c.tflags
    data = pattern(2, 65536)
    check(c.write(0, data) == 0, "WRITE 64 KiB at 0")
    if f & TF_SEND_WRITE_ZEROES:
        c.do(CMD_WRITE_ZEROES, 65536, 65536)
    err, back = c.read(0, 131072)
    check(err == 0 and back[:65536] == data, "structured READ reassembles to the written data")
    check(back[65536:] == bytes(65536) or not (f & TF_SEND_WRITE_ZEROES), "... and zeroes after it")
    should(f & TF_SEND_DF, "SEND_DF advertised once structured replies are negotiated")
    if f & TF_SEND_DF:
        c2 = c.cmd(CMD_READ, 0, 65536, CMD_FLAG_DF)
        r = c.reply_for(c2)
        check(r.error == 0, "DF read of 64 KiB succeeds (MUST support >= 64 KiB)")
        content = [t for t, fl, p in r.chunks if t in (RT_OFFSET_DATA, RT_OFFSET_HOLE)]
        check(len(content) <= 1, "DF read has at most one content chunk (got %d)" % len(content))
        check(assemble_read(r, 0, 65536) == data, "DF read data is correct")
    c.close()


@test
def pipelined_requests_all_get_one_reply(ctx):
    """64 WRITEs in flight at once, then 64 READs in flight at once. (A READ
    sent while an overlapping WRITE is still unanswered may legitimately see
    old data: the server may process requests in any order.)"""
    c = ctx.conn(structured=True)
    n = 64
    want = {i: pattern(100 + i, 8192) for i in range(n)}
    cookies, got = c.pipeline([(CMD_WRITE, MiB + i * 8192, 8192, 0, want[i]) for i in range(n)])
    check(set(got) == set(cookies), "all %d pipelined WRITEs answered exactly once" % n)
    check(all(r.error == 0 for r in got.values()), "all pipelined WRITEs succeeded")
    cookies, got = c.pipeline([(CMD_READ, MiB + i * 8192, 8192, 0, b"") for i in range(n)])
    check(set(got) == set(cookies), "all %d pipelined READs answered exactly once" % n)
    check(all(r.error == 0 for r in got.values()), "all pipelined READs succeeded")
    check(all(assemble_read(got[cookies[i]], MiB + i * 8192, 8192) == want[i] for i in range(n)),
          "each pipelined READ returns the data of the completed WRITEs")
    reqs = []
    for i in range(n):
        reqs.append((CMD_WRITE, 2 * MiB + i * 4096, 4096, 0, pattern(300 + i, 4096)))
        reqs.append((CMD_READ, MiB + i * 8192, 8192, 0, b""))
    cookies, got = c.pipeline(reqs)
    check(set(got) == set(cookies) and all(r.error == 0 for r in got.values()),
          "128 interleaved WRITEs and READs on disjoint ranges all succeed")
    check(all(assemble_read(got[cookies[2 * i + 1]], MiB + i * 8192, 8192) == want[i] for i in range(n)),
          "the interleaved READs return the right data")
    big = [(CMD_READ, 0, 1 << 20, 0, b"") for _ in range(32)]
    cookies, got = c.pipeline(big)
    check(all(got[ck].error == 0 and assemble_read(got[ck], 0, 1 << 20) is not None for ck in cookies),
          "32 pipelined 1 MiB READs (32 MiB of replies) all complete")
    c.close()


@test
def pipelined_writes_trickled_in_small_pieces(ctx):
    """Several WRITEs sent back to back but delivered in small, odd-sized
    pieces, so payloads straddle reads (regression: a server that parsed the
    next header while a WRITE payload was still arriving read data as a
    header and dropped the connection, as the kernel client's mkfs showed)."""
    import time
    for sizes, chunk in (([4096, 4096], 5000), ([4096, 131072, 512, 4096], 1000), ([65536] * 4, 7777), ([1, 4097, 3], 3)):
        c = ctx.conn()
        blobs = []
        want = []
        off = 3 * MiB
        for i, n in enumerate(sizes):
            data = pattern(700 + i, n)
            want.append((off, data))
            blobs.append(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 50 + i, off, n) + data)
            off += n + 512
        stream = b"".join(blobs)
        for i in range(0, len(stream), chunk):
            c.s.sendall(stream[i:i + chunk])
            time.sleep(0.001)
        for i in range(len(sizes)):
            c.pending[50 + i] = (CMD_WRITE, want[i][0], len(want[i][1]))
        errs = [c.reply().error for _ in sizes]
        check(all(e == 0 for e in errs), "trickled WRITEs %s in %d-byte pieces all succeed" % (sizes, chunk))
        for o, data in want:
            err, got = c.read(o, len(data))
            check(err == 0 and got == data, "trickled WRITE at %d reads back" % o)
        c.close()


@test
def thousands_of_instantly_answered_requests_in_one_write(ctx):
    """50,000 FLUSHes and 20,000 CACHEs sent at once, each answered without
    touching the disk (regression: replies that completed at once re-entered
    the request parser, one stack frame per request, until the server
    overflowed its stack and died)."""
    for ctype, n in ((CMD_FLUSH, 50000), (CMD_CACHE, 20000)):
        c = ctx.conn()
        length = 0 if ctype == CMD_FLUSH else 4096
        cookies, got = c.pipeline([(ctype, 0, length, 0, b"")] * n)
        check(len(got) == n and all(r.error == 0 for r in got.values()),
              "all %d pipelined %s requests answered OK" % (n, "FLUSH" if ctype == CMD_FLUSH else "CACHE"))
        ctx.alive(c)
        c.close()
    ctx.fresh_conn_works("after the flood, a new connection")


@test
def half_closed_client_gets_replies_to_buffered_requests(ctx):
    """A client pipelines 300 WRITEs and a FLUSH, then shuts down its sending
    side: every request already sent is still answered, then the server
    closes (nbdmirror dropped buffered requests at EOF before)."""
    c = ctx.conn()
    n = 300
    for i in range(n):
        c.pending[7000 + i] = (CMD_WRITE, 5 * MiB + i * 4096, 4096)
    c.pending[9999] = (CMD_FLUSH, 0, 0)
    stream = b"".join(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 7000 + i, 5 * MiB + i * 4096, 4096)
                      + pattern(900 + i, 4096) for i in range(n))
    stream += struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_FLUSH, 9999, 0, 0)
    c.s.sendall(stream)
    c.s.shutdown(socket.SHUT_WR)
    try:
        errs = [c.reply().error for _ in range(n + 1)]
    except Closed:
        errs = [1]
    # Not a MUST (a client should send DISC; nbdkit answers some of these with
    # errors), so a WARN for reference servers; nbdmirror runs with --strict.
    if not should(all(e == 0 for e in errs), "all %d requests sent before the half-close are answered OK" % (n + 1)):
        c.close()
        return
    c.close()
    c2 = ctx.conn()
    err, data = c2.read(5 * MiB + 17 * 4096, 4096)
    check(err == 0 and data == pattern(917, 4096), "their data reads back on a new connection")
    c2.close()


def expect_error_and_alive(ctx, c, r, want, what, strict_errno=True):
    check(r.error != 0, "%s -> an error reply (got %s)" % (what, errname(r.error)))
    if strict_errno:
        should(r.error == want, "%s -> %s (got %s)" % (what, errname(want), errname(r.error)))
    ctx.alive(c)


@test
def unknown_command_type_is_einval(ctx):
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        c = ctx.conn(structured=structured)
        for ctype in (0x4A, 0xFFFF, 8):
            if ctype == 8 and c.tflags & TF_SEND_RESIZE:
                continue
            try:
                r = c.do(ctype, 0, 0)
            except Closed as e:
                raise Fail("[%s] server dropped the connection on unknown command %#x: %s" % (mode, ctype, e))
            expect_error_and_alive(ctx, c, r, EINVAL, "[%s] unknown command type %#x" % (mode, ctype))
        c.close()


@test
def unknown_command_flags_are_einval(ctx):
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        c = ctx.conn(structured=structured)
        cases = [(CMD_FLUSH, 0, 0, 0x8000, b"", "FLUSH with unknown flag 0x8000"),
                 (CMD_READ, 0, 4096, 0x4000, b"", "READ with unknown flag 0x4000"),
                 (CMD_WRITE, 0, 4096, 0x0400, pattern(3, 4096), "WRITE (4 KiB payload) with unknown flag 0x0400"),
                 (CMD_TRIM, 0, 4096, 0x1000, b"", "TRIM with unknown flag 0x1000")]
        if c.tflags & TF_SEND_CACHE:
            cases.append((CMD_CACHE, 0, 4096, 0x0200, b"", "CACHE with unknown flag 0x0200"))
        for ctype, off, ln, fl, payload, what in cases:
            before = c.read(0, 4096)[1]
            try:
                r = c.do(ctype, off, ln, fl, payload)
            except Closed as e:
                # The client broke a MUST ("MUST NOT set a command flag bit
                # that is not documented"), so a hard disconnect is allowed,
                # but the spec's preferred answer is EINVAL.
                should(False, "[%s] %s -> EINVAL, not a disconnect (%s)" % (mode, what, e))
                c.close()
                c = ctx.conn(structured=structured)
                continue
            expect_error_and_alive(ctx, c, r, EINVAL, "[%s] %s" % (mode, what))
            if ctype == CMD_WRITE:
                check(c.read(0, 4096)[1] == before, "[%s] the rejected WRITE changed nothing" % mode)
        c.close()


@test
def flags_not_applicable_to_the_command(ctx):
    c = ctx.conn(structured=True)
    cases = [(CMD_WRITE, 0, 512, CMD_FLAG_DF, pattern(4, 512), "WRITE with DF"),
             (CMD_READ, 0, 512, CMD_FLAG_REQ_ONE, b"", "READ with REQ_ONE")]
    # (WRITE_ZEROES with an unadvertised FAST_ZERO is deliberately not sent:
    # it trips an assertion in nbdkit 1.32, backend.c:725, killing the
    # reference server.)
    for ctype, off, ln, fl, payload, what in cases:
        try:
            r = c.do(ctype, off, ln, fl, payload)
        except Closed as e:
            should(False, "%s -> EINVAL, not a disconnect (%s)" % (what, e))
            c.close()
            c = ctx.conn(structured=True)
            continue
        should(r.error == EINVAL, "%s -> EINVAL (got %s)" % (what, errname(r.error)))
        ctx.alive(c)
    c.close()


@test
def requests_past_the_end(ctx):
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        c = ctx.conn(structured=structured)
        size = c.size
        tail_before = c.read(size - 4096, 4096)[1]
        r = c.do(CMD_READ, size - 512, 1024)
        if structured:
            check(r.kind != "simple", "[%s] READ error uses a structured reply (MUST NOT be simple)" % mode)
        expect_error_and_alive(ctx, c, r, EINVAL, "[%s] READ [size-512, size+512)" % mode)
        r = c.do(CMD_READ, size, 512)
        expect_error_and_alive(ctx, c, r, EINVAL, "[%s] READ at offset == size" % mode)
        r = c.do(CMD_READ, (1 << 64) - 512, 1024)
        expect_error_and_alive(ctx, c, r, EINVAL, "[%s] READ whose offset+length overflows u64" % mode)
        r = c.do(CMD_WRITE, size - 512, 1024, 0, pattern(5, 1024))
        expect_error_and_alive(ctx, c, r, ENOSPC, "[%s] WRITE [size-512, size+512)" % mode)
        check(c.read(size - 4096, 4096)[1] == tail_before, "[%s] the rejected WRITE changed nothing" % mode)
        r = c.do(CMD_WRITE, size, 512, 0, pattern(5, 512))
        expect_error_and_alive(ctx, c, r, ENOSPC, "[%s] WRITE at offset == size" % mode)
        if c.tflags & TF_SEND_WRITE_ZEROES:
            r = c.do(CMD_WRITE_ZEROES, size - 512, 1024)
            expect_error_and_alive(ctx, c, r, ENOSPC, "[%s] WRITE_ZEROES past the end" % mode)
            check(c.read(size - 4096, 4096)[1] == tail_before, "[%s] the rejected WRITE_ZEROES changed nothing" % mode)
        if c.tflags & TF_SEND_TRIM:
            r = c.do(CMD_TRIM, size - 512, 1024)
            expect_error_and_alive(ctx, c, r, EINVAL, "[%s] TRIM past the end" % mode)
        c.close()


@test
def oversized_write_33mib_is_refused_and_server_stays_up(ctx):
    c = ctx.conn()
    mx = c.blocksize[2] if c.blocksize else 32 * MiB
    ln = 33 * MiB
    if mx >= ln:
        info("server advertises maximum payload %d >= 33 MiB; skipping" % mx)
        c.close()
        return
    before = c.read(0, 4096)[1]
    outcome = None
    before_check = False
    try:
        ck = c.cmd(CMD_WRITE, 0, ln, 0, b"\xee" * ln)
        r = c.reply_for(ck)
        outcome = "reply %s" % errname(r.error)
        # A client MUST NOT exceed the advertised maximum; the server may
        # reply with an error or hard-disconnect. Accepting it is lenient.
        if should(r.error != 0, "33 MiB WRITE (max payload %d) is refused with an error (got %s)"
                  % (mx, errname(r.error))):
            should(r.error == EINVAL, "... with EINVAL (got %s)" % errname(r.error))
            before_check = True
        else:
            before_check = False
        ctx.alive(c)
    except Closed as e:
        outcome = "disconnect (%s)" % e
        info("server hard-disconnected, allowed for payloads over the maximum")
    info("outcome: %s" % outcome)
    c.close()
    if outcome.startswith("disconnect") or before_check:
        c = ctx.conn()
        check(c.read(0, 4096)[1] == before, "the refused 33 MiB WRITE changed nothing")
        c.close()
    ctx.fresh_conn_works()


@test
def oversized_read_33mib_simple_mode(ctx):
    c = ctx.conn()
    mx = c.blocksize[2] if c.blocksize else 32 * MiB
    ln = 33 * MiB
    if mx >= ln or c.size < ln:
        info("maximum payload %d or export size %d makes this moot; skipping" % (mx, c.size))
        c.close()
        return
    try:
        ck = c.cmd(CMD_READ, 0, ln)
        r = c.reply_for(ck)
        info("reply %s" % errname(r.error))
        if r.error:
            ctx.alive(c)
    except Closed as e:
        info("server disconnected (%s)" % e)
    c.close()
    ctx.fresh_conn_works()


@test
def zero_length_requests_do_not_disconnect(ctx):
    """Length 0 is unspecified for READ/WRITE/TRIM/WRITE_ZEROES/BLOCK_STATUS,
    but the server SHOULD NOT disconnect."""
    for structured in (False, True):
        mode = "structured" if structured else "simple"
        c = ctx.conn(structured=structured, meta=[b"base:allocation"] if structured else None)
        cases = [(CMD_READ, "READ"), (CMD_WRITE, "WRITE"), (CMD_TRIM, "TRIM"),
                 (CMD_WRITE_ZEROES, "WRITE_ZEROES"), (CMD_CACHE, "CACHE")]
        if structured:
            cases.append((CMD_BLOCK_STATUS, "BLOCK_STATUS"))
        for ctype, what in cases:
            try:
                r = c.do(ctype, 4096, 0)
                info("[%s] %s of length 0 -> %s" % (mode, what, errname(r.error)))
                if ctype == CMD_READ and r.error == 0 and r.kind != "simple":
                    assemble_read(r, 4096, 0)
            except Closed as e:
                should(False, "[%s] %s of length 0 does not disconnect (%s)" % (mode, what, e))
                c.close()
                c = ctx.conn(structured=structured, meta=[b"base:allocation"] if structured else None)
                continue
            ctx.alive(c)
        c.close()
    ctx.fresh_conn_works()


@test
def no_payload_commands_larger_than_max_payload(ctx):
    """TRIM/WRITE_ZEROES/BLOCK_STATUS/CACHE may exceed the maximum payload;
    the server SHOULD NOT disconnect; it may succeed or answer EINVAL/EOVERFLOW."""
    c = ctx.conn(structured=True, meta=[b"base:allocation"])
    size = c.size
    mx = c.blocksize[2] if c.blocksize else 32 * MiB
    ln = min(size, 0xFFFFF000) // 4096 * 4096
    if ln <= mx:
        info("export (%d) not larger than max payload (%d); using the whole export" % (size, mx))
    d = pattern(55, 65536)
    check(c.write(ln - 65536, d) == 0, "write 64 KiB at the end of the range")
    for ctype, what, fl in ((CMD_BLOCK_STATUS, "BLOCK_STATUS", 0), (CMD_CACHE, "CACHE", 0),
                            (CMD_TRIM, "TRIM", 0), (CMD_WRITE_ZEROES, "WRITE_ZEROES(NO_HOLE)", CMD_FLAG_NO_HOLE)):
        try:
            r = c.do(ctype, 0, ln, fl)
        except Closed as e:
            raise Fail("%s of %d bytes (max payload %d): server disconnected (%s); SHOULD NOT" % (what, ln, mx, e))
        check(r.error in (0, EINVAL, EOVERFLOW),
              "%s of %d bytes -> success, EINVAL or EOVERFLOW (got %s)" % (what, ln, errname(r.error)))
        if ctype == CMD_WRITE_ZEROES and r.error == 0:
            err, back = c.read(ln - 65536, 65536)
            check(back == bytes(65536), "the large WRITE_ZEROES zeroed the end of its range")
        ctx.alive(c)
    c.close()


@test
def many_concurrent_connections(ctx):
    n = MAX_CONNECTIONS
    conns = []
    for i in range(n):
        conns.append(ctx.conn(structured=bool(i % 2)))
    for i, c in enumerate(conns):
        c.cmd(CMD_WRITE, 6 * MiB + i * 4096, 4096, 0, pattern(900 + i, 4096))
    for c in conns:
        r = c.reply()
        if r.error:
            raise Fail("write on one of %d connections failed: %s" % (n, errname(r.error)))
    ok = all(c.read(6 * MiB + i * 4096, 4096) == (0, pattern(900 + i, 4096)) for i, c in enumerate(conns))
    check(ok, "%d simultaneous connections each write and read back their own block" % n)
    for c in conns:
        c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 1, 0, 0))
        c.close()
    ctx.fresh_conn_works()


@test
def bad_request_magic_disconnects(ctx):
    c = ctx.conn()
    c.send(struct.pack(">IHHQQI", 0x12345678, 0, CMD_READ, 1, 0, 512))
    check(c.wait_closed(10), "server closes the connection after a request with bad magic")
    c.close()
    for magic in (0x12560953, 0x25609514):  # reserved magics
        c = ctx.conn()
        c.send(struct.pack(">IHHQQI", magic, 0, CMD_READ, 1, 0, 512))
        check(c.wait_closed(10), "server closes the connection after reserved magic %#x" % magic)
        c.close()
    ctx.fresh_conn_works()


@test
def extended_request_magic_without_negotiation_disconnects(ctx):
    c = ctx.conn()
    c.send(struct.pack(">IHHQQQ", EXTENDED_REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512))
    check(c.wait_closed(10), "extended request magic without EXTENDED_HEADERS -> disconnect")
    c.close()
    ctx.fresh_conn_works()


@test
def client_vanishing_mid_request_does_not_hurt_the_server(ctx):
    c = ctx.conn()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:13])
    c.close()
    ctx.fresh_conn_works("a new connection after a half header")
    c = ctx.conn()
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 0, 65536) + b"\xab" * 30000)
    c.close()
    ctx.fresh_conn_works("a new connection after half a WRITE payload")
    c = ctx.t.connect()
    c.recvn(10)
    c.close()
    ctx.fresh_conn_works("a new connection after a client vanished mid-greeting")
    c = ctx.t.connect()
    c.greeting()
    c.send(struct.pack(">QII", IHAVEOPT, OPT_GO, 100) + b"\0\0")
    c.close()
    ctx.fresh_conn_works("a new connection after a client vanished mid-option")


@test
def client_reset_with_replies_in_flight(ctx):
    """A client that stops reading replies, or resets with many reads in
    flight, must neither block other connections nor hurt the server.
    (nbdkit 1.32 can abort here: connections.c:402 raw_send_socket:
    Assertion `sock >= 0' failed.)"""
    good = ctx.conn()
    not_reading = ctx.conn()
    not_reading.s.settimeout(0.5)
    sent = 0
    for i in range(256):                  # never reads its replies
        try:
            not_reading.cmd(CMD_READ, 0, 128 * 1024)
            sent += 1
        except (socket.timeout, Closed):
            break
    info("%d reads of 128 KiB queued on a connection that never reads" % sent)
    for i in range(20):
        d = pattern(2000 + i, 4096)
        if good.write(3 * MiB + i * 4096, d) != 0 or good.read(3 * MiB + i * 4096, 4096) != (0, d):
            raise Fail("good connection round trip %d failed while another connection does not read" % i)
    check(True, "20 round trips on a good connection while another does not read its replies")
    not_reading.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    not_reading.close()
    c = ctx.conn()
    for i in range(64):
        c.cmd(CMD_READ, 0, 256 * 1024)
    c.s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    c.close()
    ctx.alive(good, "the good connection, after two clients reset with replies in flight,")
    good.close()
    ctx.fresh_conn_works("a new connection after clients reset with reads in flight")


@test
def misbehaving_connections_do_not_block_others(ctx):
    good = ctx.conn()
    stalled_payload = ctx.conn()
    stalled_payload.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_WRITE, 1, 2 * MiB, MiB) + b"\x11" * 1000)
    stalled_header = ctx.conn()
    stalled_header.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_READ, 1, 0, 512)[:7])
    stalled_handshake = ctx.t.connect()  # never reads the greeting
    bad = ctx.conn()
    bad.send(struct.pack(">IHHQQI", 0xBADBAD00, 0, CMD_READ, 1, 0, 512))
    t0 = time.time()
    for i in range(50):
        d = pattern(1000 + i, 4096)
        if good.write(3 * MiB + i * 4096, d) != 0 or good.read(3 * MiB + i * 4096, 4096) != (0, d):
            raise Fail("good connection round trip %d failed" % i)
    check(True, "50 write+read round trips on a good connection while four others misbehave (%.2fs)" % (time.time() - t0))
    late = ctx.conn()
    ctx.alive(late, "a connection opened while others misbehave")
    for x in (stalled_payload, stalled_header, stalled_handshake, bad, late):
        x.close()
    ctx.alive(good, "the good connection, after the misbehaving ones closed,")
    good.close()
    ctx.fresh_conn_works()


@test
def disc_finishes_outstanding_requests(ctx):
    c = ctx.conn()
    d = pattern(42, 65536)
    ck = c.cmd(CMD_WRITE, 4 * MiB, 65536, 0, d)
    c.send(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, CMD_DISC, 777, 0, 0))
    must_have_landed = True
    try:
        r = c.reply_for(ck)
        # "The server MUST handle all outstanding requests"; nbdkit answers
        # ESHUTDOWN to requests racing with DISC, which the spec tolerates
        # for a server that is shutting down the session.
        if not should(r.error == 0, "the WRITE sent just before DISC succeeds (got %s)" % errname(r.error)):
            must_have_landed = False
        check(c.wait_closed(10), "server closes the connection after DISC, with no reply to DISC")
    except Closed:
        # Whether replies to outstanding requests must still be sent is not
        # spelled out (qemu-nbd drops them but performs the writes).
        should(False, "the WRITE sent just before DISC is answered before the server closes")
    c.close()
    c = ctx.conn()
    got = c.read(4 * MiB, 65536)
    if must_have_landed:
        check(got == (0, d), "a new connection sees the WRITE sent before DISC (MUST handle it)")
    c.close()


@test
def multi_conn_writes_visible_across_connections(ctx):
    a = ctx.conn()
    if not (a.tflags & TF_CAN_MULTI_CONN):
        info("CAN_MULTI_CONN not advertised; skipping")
        a.close()
        return
    b = ctx.conn()
    d = pattern(77, 65536)
    check(a.write(5 * MiB, d) == 0, "write on connection A")
    check(b.do(CMD_FLUSH).error == 0, "flush on connection B")
    check(b.read(5 * MiB, 65536) == (0, d), "connection B reads A's write after its own FLUSH")
    d2 = pattern(78, 65536)
    check(b.write(5 * MiB, d2, CMD_FLAG_FUA) == 0, "FUA write on B")
    check(a.read(5 * MiB, 65536) == (0, d2), "connection A reads B's FUA write")
    a.close()
    b.close()


@test
def extended_headers_if_offered(ctx):
    c = ctx.t.connect()
    c.greeting()
    final, _ = c.opt_all(OPT_EXTENDED_HEADERS, b"x")
    check(final & REP_ERR_BIT, "EXTENDED_HEADERS with data is rejected (got %s)" % repname(final))
    final, _ = c.opt_all(OPT_EXTENDED_HEADERS)
    if final == REP_ERR_UNSUP:
        info("server does not support extended headers (ERR_UNSUP); fine")
        c.go(ctx.name)
        ctx.alive(c)
        c.close()
        return
    check(final == REP_ACK, "EXTENDED_HEADERS -> ACK or ERR_UNSUP (got %s)" % repname(final))
    c.extended = True
    c.structured = True
    c.go(ctx.name)
    d = pattern(9, 8192)
    check(c.write(0, d) == 0, "extended-header WRITE")
    check(c.read(0, 8192) == (0, d), "extended-header READ")
    c.close()


# ---------------------------------------------------------------- main
def main(argv):
    global STRICT, MAX_CONNECTIONS
    args = [a for a in argv[1:] if not a.startswith("--")]
    opts = [a for a in argv[1:] if a.startswith("--")]
    only = None
    skip = set()
    for o in opts:
        if o == "--strict":
            STRICT = True
        elif o.startswith("--max-connections="):
            MAX_CONNECTIONS = int(o.split("=", 1)[1])
        elif o.startswith("--skip="):
            skip = set(o.split("=", 1)[1].split(","))
        elif o.startswith("--only="):
            only = set(o.split("=", 1)[1].split(","))
        elif o == "--list":
            for t in TESTS:
                print(t.__name__)
            return 0
        else:
            raise SystemExit("unknown option %s" % o)
    if len(args) != 1:
        raise SystemExit(__doc__)
    target = Target(args[0])
    ctx = Ctx(target)
    passed, failed = [], []
    for t in TESTS:
        if only and t.__name__ not in only:
            continue
        if t.__name__ in skip:
            print("[ SKIP ] %s (--skip)" % t.__name__)
            continue
        CURRENT[0] = t.__name__
        nwarn = len(WARNINGS)
        print("[ RUN  ] %s" % t.__name__, flush=True)
        start = time.time()
        try:
            t(ctx)
        except Fail as e:
            print("[ FAIL ] %s: %s" % (t.__name__, e), flush=True)
            failed.append((t.__name__, str(e)))
            continue
        except Closed as e:
            print("[ FAIL ] %s: server closed the connection unexpectedly: %s" % (t.__name__, e), flush=True)
            failed.append((t.__name__, "unexpected disconnect: %s" % e))
            continue
        except (socket.timeout, TimeoutError):
            print("[ FAIL ] %s: timed out waiting for the server (%.0fs)\n%s"
                  % (t.__name__, TIMEOUT, traceback.format_exc()), flush=True)
            failed.append((t.__name__, "timeout"))
            continue
        except Exception as e:  # noqa: BLE001
            print("[ FAIL ] %s: %s: %s\n%s" % (t.__name__, type(e).__name__, e, traceback.format_exc()), flush=True)
            failed.append((t.__name__, "%s: %s" % (type(e).__name__, e)))
            continue
        if STRICT and len(WARNINGS) > nwarn:
            print("[ FAIL ] %s: SHOULD-level expectation missed (--strict)" % t.__name__, flush=True)
            failed.append((t.__name__, "; ".join(WARNINGS[nwarn:])))
        else:
            print("[  OK  ] %s (%.2fs)" % (t.__name__, time.time() - start), flush=True)
            passed.append(t.__name__)
    print()
    if WARNINGS:
        print("Warnings (SHOULD-level):")
        for w in WARNINGS:
            print("  - %s" % w)
    if failed:
        print("Failures:")
        for n, m in failed:
            print("  - %s: %s" % (n, m))
    print("raw_protocol: %d passed, %d failed, %d warnings" % (len(passed), len(failed), len(WARNINGS)))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
