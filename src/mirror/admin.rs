//! The admin socket and what it answers: `nbdmirror resync`, `scrub` and
//! `switchover` talk to a running node through it.
//!
//! Owns binding the socket (refusing one a live node holds), accepting its
//! connections, reading one command line each and answering it (status as
//! text or JSON, resync start/pause/resume/rate, scrub start/stop/status,
//! switchover), and the status report itself (`status_json`).

use std::os::unix::net::UnixListener;

use super::*;

/// Whether a process listens on the Unix socket at `p` (a connect
/// succeeds, or finds its queue full): then it is not a stale one to
/// replace. The connect does not block: a listener that never accepts
/// (a hung process) fills its queue, and a blocking connect then waited
/// for it, on the event loop when a node looks again.
pub fn socket_is_live(p: &std::path::Path) -> bool {
    on_unix_path(p, connect_nonblocking).is_ok()
}

fn connect_nonblocking(p: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = p.as_os_str().as_bytes();
    // SAFETY: a zeroed sockaddr_un is valid; the path is copied in bounds.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    // SAFETY: a fresh socket, owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is ours.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: connect with a valid sockaddr_un and its size.
    let r = unsafe {
        libc::connect(
            fd.as_raw_fd(),
            &addr as *const _ as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t,
        )
    };
    match std::io::Error::last_os_error().raw_os_error() {
        _ if r == 0 => Ok(()),
        // A listener whose queue is full: alive, not accepting.
        Some(libc::EAGAIN) | Some(libc::EINPROGRESS) => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

/// The admin socket at `p` (a stale one is replaced: the caller holds the
/// replica directory's lock). A failure is logged, not fatal: serving data
/// matters more than the control socket.
pub fn bind_admin_socket(p: Option<&std::path::Path>) -> Option<UnixListener> {
    let p = p?;
    // Only a stale socket is replaced: anything else at the path (a file
    // someone put there, a typo in --admin-socket) is left alone, and so is
    // a socket another running node answers on (taking it over made that
    // node's commands reach this one, and removed its socket at exit).
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(p) {
        Ok(m) if m.file_type().is_socket() && socket_is_live(p) => {
            crate::elog!(
                "nbdmirror: WARNING: another process answers on {}; not taking it over while \
                 it does (looked at every second: a killed node's socket can outlive it \
                 briefly), and until then `nbdmirror resync` will not reach this node (or \
                 use another --admin-socket)",
                p.display()
            );
            return None;
        }
        Ok(m) if m.file_type().is_socket() => {
            let _ = std::fs::remove_file(p);
        }
        Ok(_) => {
            crate::elog!(
                "nbdmirror: WARNING: {} exists and is not a socket; not replacing it, so \
                 `nbdmirror resync` will not reach this node (remove it, or use --admin-socket)",
                p.display()
            );
            return None;
        }
        Err(_) => {}
    }
    match on_unix_path(p, |q| UnixListener::bind(q)) {
        Ok(l) => Some(l),
        Err(e) => {
            crate::elog!(
                "nbdmirror: WARNING: cannot create admin socket {}: {e}; \
                 `nbdmirror resync` will not reach this node (use --admin-socket)",
                p.display()
            );
            None
        }
    }
}

/// Run `f` (bind or connect) on a Unix socket path; a path longer than
/// sun_path allows (108 bytes) is reached through its directory's
/// descriptor instead (`/proc/self/fd/N/NAME`), which leaves the working
/// directory alone (other threads may use relative paths meanwhile).
pub fn on_unix_path<T>(
    p: &std::path::Path,
    f: impl Fn(&std::path::Path) -> std::io::Result<T>,
) -> std::io::Result<T> {
    match f(p) {
        Err(e) if p.as_os_str().len() >= 100 => {
            use std::os::unix::fs::OpenOptionsExt;
            let (Some(dir), Some(name)) = (p.parent(), p.file_name()) else {
                return Err(e);
            };
            let dir = if dir.as_os_str().is_empty() {
                std::path::Path::new(".")
            } else {
                dir
            };
            let Ok(d) = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH | libc::O_DIRECTORY)
                .open(dir)
            else {
                return Err(e);
            };
            let short = std::path::Path::new("/proc/self/fd")
                .join(d.as_raw_fd().to_string())
                .join(name);
            f(&short)
        }
        r => r,
    }
}

/// Admin socket connections open at once, at most.
const MAX_ADMIN_CONNS: usize = 64;

/// How often a node that found its admin socket answered by another
/// process looks again whether that process has gone.
pub(super) const ADMIN_RETRY: Duration = Duration::from_secs(1);

impl Mirror {
    /// The admin socket was answered by another process at start: take it
    /// once that has gone. A node killed a moment ago leaves a socket that
    /// still accepts connections (its io_uring is torn down after the
    /// process, holding the listener's pending accept), and a node
    /// promoted right then went without its admin socket for its whole run
    /// (a tester's find).
    pub(super) fn retry_admin_socket(&mut self, io: &mut dyn Io) {
        let Some(p) = self.cfg.admin_socket.clone() else {
            self.admin_retry_at = None;
            return;
        };
        self.admin_retry_at = Some(self.t + ADMIN_RETRY);
        if socket_is_live(&p) {
            return;
        }
        self.admin_retry_at = None;
        if let Some(a) = bind_admin_socket(Some(&p)) {
            io.submit(tok(KIND_ADMIN_LISTEN, 0), Op::Accept { fd: a.as_raw_fd() });
            self.admin = Some(a);
            crate::elog!(
                "nbdmirror: admin socket {}: the process that answered on it has gone; this \
                 node answers there now",
                p.display()
            );
        }
    }

    /// The node's state for `nbdmirror resync status --json`: its peers
    /// and, given the store, the store's counters.
    pub fn status_json(&self, store: Option<&Store>, io: &dyn Io) -> String {
        use serde_json::json;
        let mut peers: Vec<serde_json::Value> = self
            .peers
            .iter()
            .map(|p| {
                let dirty = p.bitmap.dirty() * BLOCK;
                // A pass's total means something only while it runs: a
                // peer that went away has `dirty` to resync, nothing done.
                let total = if p.state == PeerState::Syncing {
                    p.total.max(dirty)
                } else {
                    dirty
                };
                // A resync that has sent nothing for a while says so rather
                // than show its last rate and an ETA that no longer means
                // anything: 10 s, or three 1 MiB batches' worth of the cap.
                let quiet = io.now().saturating_duration_since(p.last_progress);
                let stall_after = match self.cfg.resync_rate {
                    0 => Duration::from_secs(10),
                    r => Duration::from_secs(10)
                        .max(Duration::from_secs_f64(3.0 * (1 << 20) as f64 / r as f64)),
                };
                // Not while checksums are compared (nothing is sent until
                // blocks are found to differ) or a flush is awaited.
                let stalled = p.state == PeerState::Syncing
                    && !p.paused
                    && p.compare.is_none()
                    && !p.flush_in_flight
                    && quiet >= stall_after;
                // Never above the cap: the first batch goes at once, so a
                // young measurement overstates a low cap many times over (a
                // tester saw 1020 KiB/s and a 19 s ETA at a 100 KiB/s cap).
                let rate = if p.state == PeerState::Syncing && !p.paused && !stalled {
                    let r = p.rate.round() as u64;
                    match self.cfg.resync_rate {
                        0 => r,
                        cap => r.min(cap),
                    }
                } else {
                    0
                };
                json!({
                    "node_id": p.node_id,
                    "address": p.addr.to_string(),
                    "state": p.state.name(),
                    "dirty_bytes": dirty,
                    "resync_total_bytes": total,
                    "resync_done_bytes": total - dirty,
                    "resync_sent_bytes": p.sent_bytes,
                    "rate_bytes_per_sec": rate,
                    "stalled_seconds": if stalled { quiet.as_secs() } else { 0 },
                    "rate_limit": self.cfg.resync_rate,
                    "paused": p.paused,
                    "comparing": p.compare.is_some(),
                    "last_error": p.last_error,
                })
            })
            .collect();
        if self.cfg.role == NodeRole::Secondary {
            for l in self.links.values().filter(|l| !l.closing) {
                if let Some(sess) = &l.session {
                    peers.push(json!({
                        "node_id": sess.peer.node_id,
                        "address": l.addr,
                        "state": "connected",
                        // The primary reported this replica in sync in
                        // this session (only known from protocol version 4
                        // on: null before), and has not started a resync
                        // of it since (`resync start --full` marks the
                        // replica inconsistent; it said in sync then).
                        "in_sync": (l.version >= ANNOUNCE_VERSION).then_some(
                            l.announced
                                && self.generation.flags & generation::FLAG_INCONSISTENT == 0
                        ),
                    }));
                }
            }
        }
        json!({
            "node_id": self.node_id,
            // Absolute, for tools run elsewhere (`switchover --admin-socket`
            // reads the handover from it), with the device and inode of its
            // lock file so that a tool can tell whether the same path names
            // the same replica on its side (a container, a chroot).
            "dir": std::fs::canonicalize(&self.cfg.dir)
                .ok()
                .map(|d| d.display().to_string()),
            "dir_lock": crate::store::dir::lock_id(&self.cfg.dir),
            "role": self.cfg.role.name(),
            "inconsistent": self.generation.flags & generation::FLAG_INCONSISTENT != 0,
            // Why, when it is: a crash recovery that could not vouch for
            // some blocks (rather than a resync cut short).
            "uncertain": store.is_some_and(|s| s.uncertain_count() > 0),
            "refused": self.refused,
            "rate_limit": self.cfg.resync_rate,
            "peers": peers,
            // Connections dropped for damage in transit (each then resent
            // what it lost): frames that failed their checksum, records
            // whose data failed its block checksums.
            "damaged_in_transit": {
                "frames": self.damaged_frames,
                "records": self.damaged_records,
            },
            // A secondary is scrubbed by its primary.
            "scrub": (self.cfg.role == NodeRole::Primary).then(|| self.scrub.json(io.now())),
            "store": store.map(|s| s.status_json(io)),
        })
        .to_string()
    }

    /// Connections dropped for damage in transit: (frames that failed
    /// their checksum, SummedRecords whose data failed its block checksums).
    pub fn damaged_in_transit(&self) -> (u64, u64) {
        (self.damaged_frames, self.damaged_records)
    }

    /// Run one admin command (a line as the admin socket takes it) and
    /// return its JSON answer: for the simulation, which has no socket.
    pub fn admin_command(&mut self, io: &mut dyn Io, store: &mut Store, line: &str) -> String {
        self.t = io.now();
        self.command(io, store, line)
    }

    fn command(&mut self, io: &mut dyn Io, store: &mut Store, line: &str) -> String {
        let now = self.t;
        let words: Vec<&str> = line.split_whitespace().collect();
        let peer_sel = |w: Option<&&str>| -> Result<Option<u32>, String> {
            match w {
                None => Ok(None),
                Some(s) => s
                    .parse::<u32>()
                    .map(Some)
                    .map_err(|_| format!("not a peer id: {s:?}")),
            }
        };
        // Words a command does not take are refused, not ignored: a
        // tester's `switchover now` switched over (and `rate 1 2` set a rate).
        let most = match words.first().copied() {
            Some("status" | "switchover") => 1,
            Some("pause" | "resume" | "start" | "full" | "rate") => 2,
            _ => usize::MAX,
        };
        // Peers whose operator pause a `start` lifted: the reply says so.
        let mut unpaused: Vec<u32> = Vec::new();
        let result: Result<(), String> = match words.first().copied() {
            Some(cmd) if words.len() > most => Err(format!(
                "{cmd:?} takes {}: {line:?}",
                if most == 1 {
                    "no arguments"
                } else {
                    "one argument at most"
                }
            )),
            Some("status") => return self.status_json(Some(store), io),
            Some("scrub") => self.scrub_command(&words[1..]),
            Some(cmd @ ("pause" | "resume" | "start" | "full")) => {
                match peer_sel(words.get(1)) {
                    Err(e) => Err(e),
                    Ok(sel) => {
                        let mut hit = false;
                        let mut failed = None;
                        let mut left_sync = false;
                        for p in self.peers.iter_mut() {
                            if sel.is_some_and(|id| id != p.node_id) {
                                continue;
                            }
                            hit = true;
                            if p.paused && matches!(cmd, "start" | "full") {
                                unpaused.push(p.node_id);
                                crate::elog!(
                                    "nbdmirror: resync {cmd}: peer {}'s pause is lifted",
                                    p.node_id
                                );
                            }
                            p.rate = 0.0;
                            p.rate_mark = (now, p.sent_bytes);
                            p.rate_window = (now, p.sent_bytes);
                            match cmd {
                                "pause" => p.paused = true,
                                "resume" => p.paused = false,
                                "full" => {
                                    p.paused = false;
                                    p.bitmap.set_all();
                                    if p.state == PeerState::InSync {
                                        p.state = PeerState::Syncing;
                                        left_sync = true;
                                        p.resync_started = now;
                                        p.sent_at_resync_start = p.sent_bytes;
                                    }
                                    p.cursor = 0;
                                    p.total = p.bitmap.dirty() * BLOCK;
                                }
                                _ => {
                                    p.paused = false;
                                    p.backoff = BACKOFF_MIN;
                                    p.retry_at = self.t;
                                }
                            }
                            // An operator's pause outlives a restart.
                            let f = p.bitmap.flags();
                            let want = if p.paused {
                                f | FLAG_PAUSED
                            } else {
                                f & !FLAG_PAUSED
                            };
                            if want != f {
                                if let Err(e) = p.bitmap.set_flags(want) {
                                    failed = Some(e);
                                }
                            }
                        }
                        if left_sync {
                            // Writes from now on may miss what it holds.
                            self.run_due = true;
                        }
                        if let Some(e) = failed {
                            Err(e)
                        } else if hit {
                            Ok(())
                        } else if self.peers.is_empty() {
                            Err("this node has no peers to resync (it is a secondary, or a primary without peers)".into())
                        } else {
                            Err(format!(
                                "no such peer: {} (this node's peers: {})",
                                sel.unwrap_or(0),
                                self.peers
                                    .iter()
                                    .map(|p| p.node_id.to_string())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            ))
                        }
                    }
                }
            }
            Some("switchover") if self.cfg.role != NodeRole::Primary || self.peers.is_empty() => {
                Err("only a primary with peers can switch over".into())
            }
            Some("switchover") => {
                // Stop as on SIGTERM, handing the generation over on the way
                // out (see `start_handover`); `resync status` is gone then.
                let lagging: Vec<String> = self
                    .peers
                    .iter()
                    .filter(|p| p.state != PeerState::InSync)
                    .map(|p| format!("peer {} is {}", p.node_id, p.state.name()))
                    .collect();
                if lagging.is_empty() {
                    self.switchover = true;
                    Ok(())
                } else {
                    Err(format!(
                        "not every peer is in sync ({}): a switchover now would leave a peer \
                         promoted without the newest writes; wait for `resync status` to show \
                         every peer in_sync",
                        lagging.join(", ")
                    ))
                }
            }
            Some("rate") if self.peers.is_empty() => Err(
                "this node has no peers to resync (it is a secondary, or a primary without peers)"
                    .into(),
            ),
            Some("rate") => match words.get(1).map(|w| crate::size::parse_size(w)) {
                Some(Ok(r)) => {
                    self.cfg.resync_rate = r;
                    for p in self.peers.iter_mut() {
                        p.rate = 0.0;
                        p.rate_mark = (now, p.sent_bytes);
                        p.rate_window = (now, p.sent_bytes);
                    }
                    Ok(())
                }
                Some(Err(e)) => Err(e),
                None => Err("rate needs a value".into()),
            },
            _ => Err(format!("unknown command {line:?}")),
        };
        self.kick_resync(io, store);
        self.scrub_kick(io, store);
        match result {
            Ok(()) if !unpaused.is_empty() => {
                serde_json::json!({ "ok": true, "unpaused": unpaused }).to_string()
            }
            Ok(()) => serde_json::json!({ "ok": true }).to_string(),
            Err(e) => serde_json::json!({ "ok": false, "error": e }).to_string(),
        }
    }

    /// `nbdmirror scrub start|pause|resume|cancel|rate SIZE`.
    fn scrub_command(&mut self, words: &[&str]) -> Result<(), String> {
        if self.cfg.role != NodeRole::Primary {
            return Err("this node is a secondary: scrubs run on the primary, which has every in-sync secondary verify its copy too (`nbdmirror check` verifies a stopped replica)"
                .into());
        }
        let now = self.t;
        let r = match words {
            ["start"] => self.scrub.start(now),
            ["pause"] => self.scrub.pause(),
            ["resume"] => self.scrub.resume(now),
            ["cancel"] => self.scrub.cancel(),
            ["rate", v] => crate::size::parse_size(v).map(|r| self.scrub.rate = r),
            _ => Err(format!("unknown scrub command {:?}", words.join(" "))),
        };
        if r.is_ok() && matches!(words.first(), Some(&"start") | Some(&"resume")) {
            crate::elog!(
                "nbdmirror: scrub {} ({}): every block is read from the disk and verified{}",
                if words[0] == "start" {
                    "started"
                } else {
                    "resumed"
                },
                if self.scrub.rate == 0 {
                    "no rate cap".to_string()
                } else {
                    format!("at most {} bytes/s", self.scrub.rate)
                },
                if self.peers.is_empty() {
                    String::new()
                } else {
                    ", and compared with every connected peer's copy".to_string()
                }
            );
        }
        r
    }

    pub(super) fn admin_accepted(&mut self, io: &mut dyn Io, c: Completion) {
        if self.shutting_down {
            if c.result >= 0 {
                // SAFETY: fresh descriptor from accept.
                drop(unsafe { OwnedFd::from_raw_fd(c.result) });
            }
            return;
        }
        if c.result < 0 && self.accept_backoff.failed("admin accept", -c.result) {
            self.admin_accept_paused = true;
            return;
        }
        if let Some(a) = &self.admin {
            io.submit(tok(KIND_ADMIN_LISTEN, 0), Op::Accept { fd: a.as_raw_fd() });
        }
        if c.result < 0 {
            return;
        }
        // SAFETY: fresh descriptor from accept.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
        // Capped, so that a process leaking connections to the socket
        // cannot use up the node's descriptors (a tester's 24000 held
        // connections starved its NBD clients). The command line tool
        // holds one for a moment.
        if self.admin_conns.len() >= MAX_ADMIN_CONNS {
            if self.admin_log.allow(self.t) {
                crate::elog!(
                    "nbdmirror: admin socket: {MAX_ADMIN_CONNS} connections open; closing a new one"
                );
            }
            return;
        }
        let id = self.next_admin;
        self.next_admin += 1;
        let raw = fd.as_raw_fd();
        self.admin_conns.insert(
            id,
            AdminConn {
                fd,
                buf: Vec::new(),
                busy: true,
                done: false,
                opened: self.t,
            },
        );
        io.submit(
            tok(KIND_ADMIN, id << 1),
            Op::Recv {
                fd: raw,
                buf: vec![0u8; 1024],
                at: 0,
                end: 1024,
            },
        );
    }

    pub(super) fn admin_io(&mut self, io: &mut dyn Io, store: &mut Store, id: u64, c: Completion) {
        let conn_id = id >> 1;
        let Some(conn) = self.admin_conns.get_mut(&conn_id) else {
            return;
        };
        conn.busy = false;
        let raw = conn.fd.as_raw_fd();
        if id & 1 == 1 {
            // A reply was sent (or failed): done.
            self.admin_conns.remove(&conn_id);
            return;
        }
        let Op::Recv { buf, .. } = c.op else {
            return;
        };
        if c.result <= 0 || conn.done {
            self.admin_conns.remove(&conn_id);
            return;
        }
        conn.buf.extend_from_slice(&buf[..c.result as usize]);
        if conn.buf.len() > 4096 {
            self.admin_conns.remove(&conn_id);
            return;
        }
        let Some(nl) = conn.buf.iter().position(|&b| b == b'\n') else {
            conn.busy = true;
            io.submit(
                tok(KIND_ADMIN, conn_id << 1),
                Op::Recv {
                    fd: raw,
                    end: buf.len(),
                    buf,
                    at: 0,
                },
            );
            return;
        };
        let line = String::from_utf8_lossy(&conn.buf[..nl]).into_owned();
        conn.done = true;
        let mut reply = self.command(io, store, &line);
        reply.push('\n');
        if let Some(conn) = self.admin_conns.get_mut(&conn_id) {
            conn.busy = true;
            io.submit(
                tok(KIND_ADMIN, conn_id << 1 | 1),
                Op::Send {
                    fd: raw,
                    buf: reply.into_bytes(),
                    at: 0,
                },
            );
        }
    }
}
