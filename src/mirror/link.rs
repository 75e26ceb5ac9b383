//! Peer links: connecting (primary) and accepting (secondary) over io_uring
//! sockets, the authenticated handshake and the generation verdict that
//! starts a session, framed sends and receives, timeouts, and a link's
//! failure (the peer's writes go to its dirty bitmap; the primary
//! reconnects with backoff).

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::*;

/// The socket a secondary accepts its primary on.
pub fn bind_peer_listener(io: &mut dyn Io, a: SocketAddr) -> Result<OwnedFd, String> {
    io.tcp_listen(a)
        .map_err(|e| format!("cannot listen for peers on {a}: {e}"))
}

fn peer_name(fd: RawFd) -> String {
    // SAFETY: getpeername into a zeroed sockaddr_storage of the right length.
    unsafe {
        let mut ss: libc::sockaddr_storage = std::mem::zeroed();
        let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
        if libc::getpeername(fd, &mut ss as *mut _ as *mut libc::sockaddr, &mut len) != 0 {
            return "an unknown address".into();
        }
        match ss.ss_family as i32 {
            libc::AF_INET => {
                let a = &*(&ss as *const _ as *const libc::sockaddr_in);
                let ip = std::net::Ipv4Addr::from(u32::from_be(a.sin_addr.s_addr));
                format!("{ip}:{}", u16::from_be(a.sin_port))
            }
            libc::AF_INET6 => {
                let a = &*(&ss as *const _ as *const libc::sockaddr_in6);
                let ip = std::net::Ipv6Addr::from(a.sin6_addr.s6_addr);
                format!("[{ip}]:{}", u16::from_be(a.sin6_port))
            }
            _ => "a local socket".into(),
        }
    }
}

pub(super) fn nonce() -> [u8; 32] {
    use std::io::Read;
    let mut n = [0u8; 32];
    if let Ok(mut f) = std::fs::File::open("/dev/urandom") {
        let _ = f.read_exact(&mut n);
    }
    if n == [0; 32] {
        n[0] = 1;
    }
    n
}

/// Peer connections still in the handshake at once, at most (see
/// `peer_accepted`).
const MAX_UNAUTHENTICATED: usize = 64;

/// Answers a secondary queues for a primary that does not read them, at
/// most (see `process_frames`).
const UNREAD_ANSWERS_LIMIT: usize = 256 << 20;

/// How a secondary's error for a primary's Reject begins.
pub(super) const PRIMARY_ENDED: &str = "the primary ended the session";

/// A primary refused for the same reason again is logged at most this often.
const REFUSAL_RELOG: Duration = Duration::from_secs(60);

impl Mirror {
    pub(super) fn fail_peer(&mut self, io: &mut dyn Io, store: &mut Store, i: usize, why: String) {
        let streaming = matches!(self.peers[i].state, PeerState::Syncing | PeerState::InSync);
        // Writes from now on miss it: they go under the next run.
        self.run_due |= streaming;
        let p = &mut self.peers[i];
        if streaming {
            crate::elog!(
                "nbdmirror: peer {} ({}) disconnected: {why}; writes continue and are recorded in its bitmap",
                p.node_id, p.addr
            );
        } else if p.last_error.as_deref() != Some(why.as_str()) {
            crate::elog!("nbdmirror: peer {} ({}): {why}", p.node_id, p.addr);
        }
        p.last_error = Some(why);
        p.state = PeerState::Disconnected;
        p.epoch += 1;
        p.retry_at = self.t + p.backoff;
        p.backoff = (p.backoff * 2).min(BACKOFF_MAX);
        p.resync_inflight = 0;
        p.acked.clear();
        p.acked_bytes = 0;
        p.flush_in_flight = false;
        p.compare = None;
        p.pending_session = None;
        for (_, off, len) in p.unflushed.drain(..) {
            p.bitmap.set_range(off, len);
        }
        let mut check = Vec::new();
        let mut verifying = Vec::new();
        for (id, out) in p.outstanding.drain() {
            match out {
                Out::Write { offset, len, .. } => {
                    p.bitmap.set_range(offset, len);
                    check.push(id);
                }
                Out::Flush { .. } => check.push(id),
                Out::Verify { .. } => verifying.push(id),
                Out::Resync { .. } | Out::Repair { .. } => {}
            }
        }
        let link = p.link.take();
        for id in verifying {
            self.scrub_peer_answered(io, store, id, i, None);
        }
        for id in check {
            if let Some(op) = self.ops.get_mut(&id) {
                op.mask &= !(1u64 << i);
            }
            self.try_complete(id);
        }
        if let Handover::Waiting(w) = &self.handover {
            if w.values().any(|&p| p == i) {
                self.handover = Handover::Done(false);
                crate::elog!(
                    "nbdmirror: switchover NOT done: peer {} failed during the handover ({}); \
                     this node stays the primary of its generation, and a peer promoted now \
                     meets it as split brain",
                    self.peers[i].node_id,
                    self.peers[i]
                        .last_error
                        .as_deref()
                        .unwrap_or("disconnected")
                );
            }
        }
        // Repairs waiting for this peer's data read again: another peer
        // may be in sync, and if not the read fails as before.
        let waiting: Vec<u64> = self
            .repairs
            .iter()
            .filter(|(_, r)| r.peer == i && r.asked)
            .map(|(&id, _)| id)
            .collect();
        for id in waiting {
            self.finish_repair(io, store, id, true);
        }
        if let Some(l) = link {
            self.close_link(io, l);
        }
        self.unpark(io, store);
    }

    fn hs_config(&self, expected_peer: Option<u32>) -> HsConfig {
        HsConfig {
            secret: self.cfg.secret.clone(),
            volume_uuid: self.volume_uuid,
            node_id: self.node_id,
            expected_peer,
            generations: GenerationIds {
                current: self.generation.current,
                // A secondary's session (see FrameKind::Session); 0 on a primary.
                bitmap: self.generation.session,
                history: [self.generation.previous, self.generation.wire_flags()],
            },
            // v1 carries the disk size here (see docs/peer-protocol.md).
            last_applied_seq: self.size,
            nonce: nonce(),
        }
    }

    fn new_link(&mut self, fd: OwnedFd, peer: Option<usize>, addr: String) -> u64 {
        let id = self.next_link;
        self.next_link += 1;
        self.links.insert(
            id,
            Link {
                fd,
                peer,
                addr,
                hs: None,
                session: None,
                rbuf: None,
                recv_busy: false,
                recv_body: false,
                after_body: false,
                send_busy: false,
                connect_busy: false,
                segs: VecDeque::new(),
                out: Vec::new(),
                spare: Vec::new(),
                closing: false,
                close_after_send: false,
                opened: self.t,
                last_rx: self.t,
                last_tx: self.t,
                held: false,
                throttled: false,
                version: 0,
                announced: false,
                session_started: false,
                pending_run: None,
                primary_generation: 0,
            },
        );
        id
    }

    pub(super) fn connect(&mut self, io: &mut dyn Io, i: usize) {
        if self.shutting_down || self.peers[i].link.is_some() {
            return;
        }
        let addr = self.peers[i].addr;
        let fd = match io.tcp_socket(addr.is_ipv6()) {
            Ok(fd) => fd,
            Err(e) => {
                self.peers[i].last_error = Some(format!("cannot create a socket: {e}"));
                self.peers[i].retry_at = self.t + BACKOFF_MAX;
                return;
            }
        };
        let raw = fd.as_raw_fd();
        let id = self.new_link(fd, Some(i), addr.to_string());
        self.links.get_mut(&id).unwrap().connect_busy = true;
        self.peers[i].link = Some(id);
        if self.peers[i].state != PeerState::Disconnected {
            self.peers[i].state = PeerState::Connecting;
        }
        io.submit(
            tok(KIND_PEER, id << 2 | SUB_CONNECT),
            Op::connect(raw, &addr, self.cfg.timeout),
        );
    }

    pub(super) fn send_frame(&mut self, link: u64, kind: FrameKind, parts: &[&[u8]]) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Some(s) = l.session.as_mut() else {
            return;
        };
        encode_parts(kind, s.next_send_seq, parts, &mut l.out);
        s.next_send_seq += 1;
    }

    /// Send a frame whose payload is already in `buf[HEADER_LEN..]` as it
    /// is, without copying it into the send batch (resync records: 1 MiB
    /// read straight into a buffer with room for the headers).
    pub(super) fn send_frame_owned(&mut self, link: u64, kind: FrameKind, mut buf: Vec<u8>) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Some(s) = l.session.as_mut() else {
            return;
        };
        encode_in_place(kind, s.next_send_seq, &mut buf);
        s.next_send_seq += 1;
        if !l.out.is_empty() {
            let mut fresh = std::mem::take(&mut l.spare);
            fresh.clear();
            let older = std::mem::replace(&mut l.out, fresh);
            l.segs.push_back(older);
        }
        l.segs.push_back(buf);
    }

    /// Queue a link for sending: frames produced while one batch of
    /// completions is handled go out together in one send per link
    /// ([`Mirror::flush_sends`], called by the loop after each batch).
    pub(super) fn post_send(&mut self, _io: &mut dyn Io, link: u64) {
        if !self.send_queue.contains(&link) {
            self.send_queue.push(link);
        }
    }

    /// Start the sends queued by [`Mirror::post_send`].
    pub fn flush_sends(&mut self, io: &mut dyn Io) {
        self.t = io.now();
        while !self.send_queue.is_empty() {
            for link in std::mem::take(&mut self.send_queue) {
                self.submit_send(io, link);
            }
        }
    }

    fn submit_send(&mut self, io: &mut dyn Io, link: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.send_busy
            || (l.out.is_empty() && l.segs.is_empty())
            || (l.closing && !l.close_after_send)
        {
            return;
        }
        let buf = match l.segs.pop_front() {
            Some(b) => b,
            None => {
                let mut buf = std::mem::take(&mut l.spare);
                buf.clear();
                std::mem::swap(&mut buf, &mut l.out);
                buf
            }
        };
        l.send_busy = true;
        l.last_tx = self.t;
        io.submit(
            tok(KIND_PEER, link << 2 | SUB_SEND),
            Op::Send {
                fd: l.fd.as_raw_fd(),
                buf,
                at: 0,
            },
        );
    }

    pub(super) fn post_recv(&mut self, io: &mut dyn Io, link: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        if l.recv_busy || l.closing || l.held || l.throttled {
            return;
        }
        l.recv_busy = true;
        // The rest of a large payload is received straight into its buffer.
        if let Some(s) = l.session.as_mut() {
            while s.decoder.wants_spare() {
                match self.spare_payloads.pop() {
                    Some(b) => s.decoder.recycle(b),
                    None => break,
                }
            }
            if let Some((buf, filled)) = s.decoder.take_body_target() {
                l.recv_body = true;
                io.submit(
                    tok(KIND_PEER, link << 2 | SUB_RECV),
                    Op::Recv {
                        fd: l.fd.as_raw_fd(),
                        end: buf.len(),
                        buf,
                        at: filled,
                    },
                );
                return;
            }
        }
        // Until the peer has authenticated, a small buffer: a flood of
        // connections that never finish the handshake cost 1 MiB each
        // (a tester's 3000 half Hellos: 418 MB on a secondary).
        let want = if l.session.is_some() {
            RECV_BUF
        } else {
            HANDSHAKE_RECV_BUF
        };
        let buf = match l.rbuf.take() {
            Some(b) if b.len() >= want => b,
            _ => vec![0u8; want],
        };
        let end = if std::mem::take(&mut l.after_body) {
            SMALL_RECV.min(buf.len())
        } else {
            buf.len()
        };
        io.submit(
            tok(KIND_PEER, link << 2 | SUB_RECV),
            Op::Recv {
                fd: l.fd.as_raw_fd(),
                end,
                buf,
                at: 0,
            },
        );
    }

    pub(super) fn close_link(&mut self, io: &mut dyn Io, link: u64) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.closing = true;
        if l.close_after_send && (l.send_busy || !l.out.is_empty() || !l.segs.is_empty()) {
            // A Reject is on its way out; `sent` closes after it.
            return;
        }
        l.close_after_send = false;
        io.shutdown(l.fd.as_raw_fd());
        self.reap_link(link);
    }

    /// Log `why`, send it to the primary on `link` in a Reject, and close
    /// the link once it is out: from now on nothing more is received or
    /// processed on it.
    fn refuse_primary(
        &mut self,
        io: &mut dyn Io,
        link: u64,
        code: crate::peer::RejectCode,
        why: &str,
    ) {
        self.log_refusal(why, why.to_string());
        let l = self.links.get_mut(&link).unwrap();
        if let Some(s) = l.session.as_mut() {
            s.reject(code, why, &mut l.out);
        }
        l.close_after_send = true;
        self.post_send(io, link);
        self.close_link(io, link);
    }

    /// A primary (`info`) knocked while the session on `live` held this
    /// secondary (see `pending_divergence`). If it is another node, promoted
    /// from the generation this replica follows with that session's
    /// primary, two primaries of one history run at once.
    fn note_divergence(&mut self, live: u64, info: &crate::peer::handshake::PeerInfo) {
        let ours = self.generation.current;
        let Some(s) = self.links.get(&live).and_then(|l| l.session.as_ref()) else {
            return;
        };
        let (cur, prev) = (info.generations.current, info.generations.history[0]);
        if ours == 0
            || self.generation.flags & generation::FLAG_PRIMARY != 0
            || s.peer.node_id == info.node_id
            || s.peer.generations.current != ours
            || cur == ours
            || prev != ours
            || self.diverged.is_some_and(|d| d.generation == cur)
            || self
                .pending_divergence
                .is_some_and(|(_, d)| d.generation == cur)
        {
            return;
        }
        crate::elog!(
            "nbdmirror: WARNING: node {} was promoted (generation {cur:016x}) from the generation \
             this replica follows ({ours:016x}) while the session with node {}, its primary, is \
             alive: two primaries at once, unless node {} is gone (its session then times out). \
             If it sends another write, node {} is refused as split brain from then on",
            info.node_id,
            s.peer.node_id,
            s.peer.node_id,
            info.node_id
        );
        self.pending_divergence = Some((
            s.peer.node_id,
            generation::Diverged {
                generation: cur,
                followed: ours,
                node_id: info.node_id,
            },
        ));
    }

    /// Log `line` for a refusal between this secondary and a primary for
    /// `why`. A refused primary retries every few seconds for as long as it
    /// runs, so the same reason is logged at most once a minute, with the
    /// count of refusals in between (a tester saw 900 characters every 5 s
    /// after a failover).
    fn log_refusal(&mut self, why: &str, line: String) {
        match &mut self.last_refusal {
            Some((w, at, n))
                if w == why && self.t.saturating_duration_since(*at) < REFUSAL_RELOG =>
            {
                *n += 1;
            }
            last => {
                let again = match last {
                    Some((w, _, n)) if w == why && *n > 0 => {
                        format!(" ({n} more times for this reason since it was last logged)")
                    }
                    _ => String::new(),
                };
                crate::elog!("nbdmirror: {line}{again}");
                *last = Some((why.to_string(), self.t, 0));
            }
        }
    }

    /// The links `pick` chooses.
    pub(super) fn link_ids(&self, pick: impl Fn(&Link) -> bool) -> Vec<u64> {
        self.links
            .iter()
            .filter(|(_, l)| pick(l))
            .map(|(&k, _)| k)
            .collect()
    }

    fn reap_link(&mut self, link: u64) {
        if let Some(l) = self.links.get(&link) {
            if l.closing && !l.recv_busy && !l.send_busy && !l.connect_busy {
                self.links.remove(&link);
            }
        }
    }

    /// A link failed: on a primary the peer is failed, on a secondary the
    /// link is closed.
    pub(super) fn link_failed(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        link: u64,
        why: String,
    ) {
        let Some(l) = self.links.get(&link) else {
            return;
        };
        if l.closing {
            self.reap_link(link);
            return;
        }
        match l.peer {
            Some(i) if self.peers[i].link == Some(link) => self.fail_peer(io, store, i, why),
            _ => {
                if l.session.is_some() && why.starts_with(PRIMARY_ENDED) {
                    let line = format!("replication link from {} closed: {why}", l.addr);
                    self.log_refusal(&why, line);
                } else if l.session.is_some() {
                    crate::elog!("nbdmirror: replication link from {} closed: {why}", l.addr);
                } else if self.refused_log.allow(self.t) {
                    // Before authentication anyone who can connect makes
                    // these (a tester's loop wrote 134 MB of log in 10 s).
                    crate::elog!("nbdmirror: peer connection from {}: {why}", l.addr);
                }
                self.close_link(io, link);
            }
        }
    }

    pub(super) fn peer_accepted(&mut self, io: &mut dyn Io, c: Completion) {
        if self.shutting_down {
            if c.result >= 0 {
                // SAFETY: fresh descriptor from accept.
                drop(unsafe { OwnedFd::from_raw_fd(c.result) });
            }
            return;
        }
        if c.result < 0 && self.accept_backoff.failed("peer accept", -c.result) {
            self.peer_accept_paused = true;
            return;
        }
        if let Some(l) = &self.listener {
            io.submit(tok(KIND_PEER_LISTEN, 0), Op::Accept { fd: l.as_raw_fd() });
        }
        if c.result < 0 {
            return;
        }
        // SAFETY: fresh descriptor from accept.
        let fd = unsafe { OwnedFd::from_raw_fd(c.result) };
        // Connections still in the handshake are capped: anyone who can
        // reach the port opens them, and a tester's flood held the node at
        // its open-files limit (its NBD clients and admin socket starved)
        // although each one goes after the handshake timeout. Past the cap
        // a newcomer is closed at once; a real primary retries.
        let unauthenticated = self
            .links
            .values()
            .filter(|l| l.peer.is_none() && l.session.is_none())
            .count();
        if unauthenticated >= MAX_UNAUTHENTICATED {
            if self.refused_log.allow(self.t) {
                crate::elog!(
                    "nbdmirror: peer connection from {}: refused, {MAX_UNAUTHENTICATED} others \
                     are still in the handshake",
                    peer_name(fd.as_raw_fd())
                );
            }
            return;
        }
        crate::server::set_nodelay(fd.as_raw_fd());
        let addr = peer_name(fd.as_raw_fd());
        let id = self.new_link(fd, None, addr);
        match Handshake::with_version(
            Role::Responder,
            self.hs_config(None),
            self.cfg.protocol_version,
        ) {
            Ok(h) => self.links.get_mut(&id).unwrap().hs = Some(Box::new(h)),
            Err(e) => {
                crate::elog!("nbdmirror: cannot start a peer handshake: {e}");
                self.close_link(io, id);
                return;
            }
        }
        self.post_recv(io, id);
    }

    pub(super) fn connected(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        link: u64,
        c: Completion,
    ) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.connect_busy = false;
        if l.closing {
            self.reap_link(link);
            return;
        }
        if c.result < 0 {
            let why = if c.result == -libc::ECANCELED {
                format!("connect timed out after {:?}", self.cfg.timeout)
            } else {
                format!("cannot connect: {}", errno_str(-c.result))
            };
            self.link_failed(io, store, link, why);
            return;
        }
        if crate::server::connected_to_itself(l.fd.as_raw_fd()) {
            // Nobody listens at the peer's address on this host, and the
            // kernel gave our socket that very port: left open, it would
            // keep the peer from listening there when it starts.
            self.link_failed(
                io,
                store,
                link,
                "cannot connect: nothing listens there (the socket connected to itself)".into(),
            );
            return;
        }
        let expected = l.peer.map(|i| self.peers[i].node_id);
        match Handshake::with_version(
            Role::Initiator,
            self.hs_config(expected),
            self.cfg.protocol_version,
        ) {
            Ok(h) => {
                let l = self.links.get_mut(&link).unwrap();
                l.hs = Some(Box::new(h));
                l.opened = self.t;
                l.last_rx = self.t;
            }
            Err(e) => {
                self.link_failed(io, store, link, format!("cannot start the handshake: {e}"));
                return;
            }
        }
        self.handshake_events(io, store, link);
        self.post_recv(io, link);
    }

    fn handshake_events(&mut self, io: &mut dyn Io, store: &mut Store, link: u64) {
        let mut established = None;
        let mut rejected = None;
        {
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            let Some(hs) = l.hs.as_mut() else {
                return;
            };
            while let Some(ev) = hs.poll_event() {
                match ev {
                    Event::Send(b) => l.out.extend_from_slice(&b),
                    Event::Established(info) => established = Some(info),
                    Event::Rejected { reason, by_peer } => rejected = Some((reason, by_peer)),
                }
            }
        }
        self.post_send(io, link);
        if let Some((reason, by_peer)) = rejected {
            let l = self.links.get_mut(&link).unwrap();
            l.hs = None;
            let who = if by_peer {
                "the peer refused us"
            } else if matches!(
                reason,
                crate::peer::handshake::HandshakeError::Closed { .. }
            ) {
                // Nobody refused anybody: the peer went (it may have given
                // up waiting for this node, as a primary does after its
                // peer timeout).
                "the connection ended"
            } else {
                "refused the peer"
            };
            let why = format!("handshake failed ({who}): {reason}");
            match l.peer {
                Some(i) if self.peers[i].link == Some(link) => {
                    // Let the Reject go out before closing.
                    l.close_after_send = true;
                    self.fail_peer(io, store, i, why);
                }
                _ => {
                    if self.refused_log.allow(self.t) {
                        crate::elog!("nbdmirror: peer connection from {}: {why}", l.addr);
                    }
                    l.close_after_send = true;
                    self.close_link(io, link);
                }
            }
            return;
        }
        if let Some(info) = established {
            let l = self.links.get_mut(&link).unwrap();
            let hs = l.hs.take().unwrap();
            l.session = hs.into_session();
            l.version = info.version;
            if l.peer.is_none() {
                // Secondary: place each large record so that its data (after
                // the record header) is aligned, for O_DIRECT writes.
                // (Only records large enough to go in place: smaller ones go
                // through the journal, which puts its header right before
                // the data.)
                if let Some(s) = l.session.as_mut() {
                    let min = wire::RECORD_HEADER + store.inplace_min() as usize;
                    s.decoder.align_large_payloads(wire::RECORD_HEADER, min);
                }
            }
            l.last_rx = self.t;
            match l.peer {
                Some(i) => {
                    if info.version != self.peers[i].version {
                        crate::elog!(
                            "nbdmirror: peer {} speaks peer protocol version {}{}",
                            self.peers[i].node_id,
                            info.version,
                            if info.version < REPAIR_VERSION {
                                ": no read repair from it until it is upgraded"
                            } else {
                                ""
                            }
                        );
                    }
                    self.peers[i].version = info.version;
                    let theirs = Generation {
                        current: info.generations.current,
                        previous: info.generations.history[0],
                        flags: info.generations.history[1] as u32,
                        session: info.generations.bitmap,
                        epoch: (info.generations.history[1] >> 32) as u32,
                        from_epoch: 0,
                    };
                    let verdict = if info.last_applied_seq != self.size {
                        Verdict::SplitBrain(format!(
                            "node {} has a {}-byte disk and this node a {}-byte one; a peer's \
                             replica must be the same size (re-initialise it with --size {})",
                            self.peers[i].node_id, info.last_applied_seq, self.size, self.size
                        ))
                    } else {
                        match generation::judge(&self.generation, &theirs, self.peers[i].node_id) {
                            Verdict::SplitBrain(why) => {
                                let id = self.peers[i].node_id;
                                // Only for data outside this node's history: a
                                // peer descended from it holds this node's writes.
                                let unrelated = theirs.current != self.generation.previous
                                    && theirs.previous != self.generation.current
                                    && theirs.current != self.generation.current;
                                let empty = if self.started_empty && unrelated {
                                    format!(
                                        " This node's replica was new when this process \
                                         started it as the primary: its clients see none of \
                                         the data node {id} holds (it started with an empty \
                                         disk). If that data is the volume's, stop this node, \
                                         move its replica directory away, re-initialise it and \
                                         start it as a secondary (--role secondary)."
                                    )
                                } else {
                                    String::new()
                                };
                                Verdict::SplitBrain(format!(
                                    "{why}.{empty} {}",
                                    generation::split_brain_advice(
                                        id,
                                        self.size,
                                        &crate::store::dir::format_uuid(&self.volume_uuid),
                                    )
                                ))
                            }
                            v => v,
                        }
                    };
                    match verdict {
                        Verdict::SplitBrain(why) => {
                            if let Some(s) = l.session.as_mut() {
                                s.reject(crate::peer::RejectCode::SplitBrain, &why, &mut l.out);
                            }
                            l.close_after_send = true;
                            self.post_send(io, link);
                            self.fail_peer(io, store, i, why);
                            return;
                        }
                        Verdict::ResyncCompare => {
                            let f = self.peers[i].bitmap.flags() | FLAG_COMPARE;
                            if let Err(e) = self.peers[i].bitmap.set_flags(f) {
                                self.fail_peer(io, store, i, e);
                                return;
                            }
                        }
                        Verdict::Resync => {}
                    }
                    if let Err(e) = self.start_session(io, i, link, theirs.session) {
                        self.fail_peer(io, store, i, e);
                        return;
                    }
                    // The reconnect backoff is reset when the peer answers
                    // in this session (`primary_frame`), not here: a peer
                    // that refuses the session (Busy: it follows another
                    // primary) would otherwise be retried every 100 ms.
                    let p = &mut self.peers[i];
                    p.last_error = None;
                    p.cursor = 0;
                    p.total = p.bitmap.dirty() * BLOCK;
                    p.resync_started = self.t;
                    p.sent_at_resync_start = p.sent_bytes;
                    p.rate = 0.0;
                    p.rate_mark = (self.t, p.sent_bytes);
                    p.rate_window = (self.t, p.sent_bytes);
                    p.compared_diff = 0;
                    p.compare_unsettled = false;
                    if p.bitmap.flags() & FLAG_COMPARE != 0 {
                        p.compare = Some((0, IdMap::default()));
                    }
                    p.state = if p.bitmap.dirty() > 0 || p.compare.is_some() {
                        PeerState::Syncing
                    } else {
                        PeerState::InSync
                    };
                    if p.state == PeerState::InSync {
                        // Even when it holds our generation already: from
                        // version 4 on, a secondary takes records before
                        // the announce as resync data (FLAG_INCONSISTENT).
                        self.announce_generation(io, i);
                    }
                    let p = &mut self.peers[i];
                    crate::elog!(
                        "nbdmirror: peer {} ({}) connected; {}",
                        p.node_id,
                        p.addr,
                        if p.compare.is_some() {
                            "comparing checksums".to_string()
                        } else if p.state == PeerState::Syncing {
                            format!("resyncing {} dirty bytes", p.total)
                        } else {
                            "in sync".to_string()
                        }
                    );
                    self.kick_resync(io, store);
                }
                None => {
                    crate::elog!(
                        "nbdmirror: primary node {} connected from {}",
                        info.node_id,
                        l.addr
                    );
                    // One primary at a time. A session that is still alive
                    // (heard from within the peer timeout, and at least two
                    // ping intervals: a live primary pings at least every
                    // PING_INTERVAL_MAX) keeps the secondary: the
                    // newcomer is refused, and none of its frames is looked
                    // at. A second primary (a copied node directory, a
                    // misconfigured node) must not take over the stream, or
                    // the secondary would hold writes its own primary never
                    // saw while both claim to be in sync.
                    let newcomer = l.addr.clone();
                    if info.last_applied_seq != self.size {
                        // The primary refuses a peer of another size; so
                        // does a secondary (a tester's authenticated peer
                        // claimed 128 MiB against 64 and was taken).
                        let why = format!(
                            "refusing primary node {} from {newcomer}: it has a {}-byte disk and \
                             this replica a {}-byte one; a peer's replica must be the same size",
                            info.node_id, info.last_applied_seq, self.size
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::Malformed, &why);
                        return;
                    }
                    let (t, timeout) = (self.t, self.cfg.timeout.max(PING_INTERVAL_MAX * 2));
                    let live = self
                        .links
                        .iter()
                        .find(|(&k, o)| {
                            k != link
                                && o.session.is_some()
                                && !o.closing
                                && t.saturating_duration_since(o.last_rx) <= timeout
                        })
                        .map(|(&k, o)| {
                            let who = match o.session.as_ref() {
                                Some(s) => {
                                    format!("primary node {} (at {})", s.peer.node_id, o.addr)
                                }
                                None => format!("primary at {}", o.addr),
                            };
                            (k, who, t.saturating_duration_since(o.last_rx))
                        });
                    if let Some((live_link, addr, quiet)) = live {
                        self.note_divergence(live_link, &info);
                        let why = format!(
                            "refusing primary node {} from {newcomer}: the session with the \
                             {addr} is alive (heard from {} ms ago); one primary at a \
                             time (a primary that reconnects gets in once its old session times \
                             out)",
                            info.node_id,
                            quiet.as_millis()
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::Busy, &why);
                        return;
                    }
                    let (cur, prev) = (info.generations.current, info.generations.history[0]);
                    if let Some(d) = self.diverged.filter(|d| d.refuses(cur, prev)) {
                        let why = format!(
                            "split brain: refusing primary node {} from {newcomer} (generation \
                             {cur:016x}): node {} was promoted to generation {:016x} while this \
                             replica went on taking writes from another primary of generation \
                             {:016x}, which node {} lacks. Nothing is written. Decide which \
                             history to keep: re-initialise this replica to follow node {} (its \
                             later writes are discarded), or re-initialise node {} (see {})",
                            info.node_id,
                            d.node_id,
                            d.generation,
                            d.followed,
                            d.node_id,
                            d.node_id,
                            d.node_id,
                            generation::Diverged::path(&self.cfg.dir).display()
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::SplitBrain, &why);
                        return;
                    }
                    let g = self.generation;
                    if g.flags & generation::FLAG_INCONSISTENT != 0
                        && g.current != 0
                        && cur != g.current
                        && prev != g.current
                    {
                        // A half copy of a generation this primary neither
                        // serves nor was promoted from: it may hold the last
                        // copy of that data. The primary's own check refuses
                        // it too (`generation::judge`); this one also holds
                        // against a primary of an older version.
                        let why = format!(
                            "split brain: refusing primary node {} from {newcomer} (generation \
                             {cur:016x}, after {prev:016x}): this replica is INCONSISTENT, a half \
                             copy of generation {:016x} (partway through a resync, or its crash \
                             recovery could not vouch for some blocks), which is not in that \
                             primary's history, and may hold the last copy of that data. Nothing \
                             is written. To give it the primary's data, re-initialise it; to keep \
                             its data, serve it as the primary (--role primary \
                             --force-inconsistent)",
                            info.node_id, g.current
                        );
                        self.refuse_primary(io, link, crate::peer::RejectCode::SplitBrain, &why);
                        return;
                    }
                    if self
                        .pending_divergence
                        .is_some_and(|(old, _)| old != info.node_id)
                    {
                        // The old primary's session ended with no further
                        // record before this one was accepted: a failover.
                        self.pending_divergence = None;
                    }
                    // Older sessions that went quiet end, and this one waits
                    // until their records are applied, so no old record
                    // lands over a newer one.
                    let others: Vec<u64> = self
                        .links
                        .iter()
                        .filter(|(&k, o)| k != link && o.session.is_some() && !o.closing)
                        .map(|(&k, _)| k)
                        .collect();
                    for o in others {
                        crate::elog!("nbdmirror: closing the older replication session");
                        self.close_link(io, o);
                    }
                    let busy = self.applying.values().any(|&(l2, ..)| l2 != link);
                    let l = self.links.get_mut(&link).unwrap();
                    l.held = busy;
                    l.primary_generation = cur;
                }
            }
            self.process_frames(io, store, link);
        }
    }

    pub(super) fn received(
        &mut self,
        io: &mut dyn Io,
        store: &mut Store,
        link: u64,
        c: Completion,
    ) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        l.recv_busy = false;
        let Op::Recv { buf, .. } = c.op else {
            return;
        };
        let buf = if std::mem::take(&mut l.recv_body) {
            // The receive filled a large payload's own buffer: back to the
            // decoder; `rbuf` stands in below for the closing and error cases.
            if let Some(s) = l.session.as_mut() {
                s.decoder.body_received(buf, c.result.max(0) as usize);
            }
            if c.result > 0 && !l.closing {
                l.last_rx = self.t;
                l.after_body = true;
                self.process_frames(io, store, link);
                self.post_recv(io, link);
                return;
            }
            l.rbuf.take().unwrap_or_default()
        } else {
            buf
        };
        if l.closing {
            l.rbuf = Some(buf);
            self.reap_link(link);
            return;
        }
        if c.result <= 0 {
            l.rbuf = Some(buf);
            let why = if c.result == 0 {
                "the peer closed the connection".to_string()
            } else {
                format!("receive failed: {}", errno_str(-c.result))
            };
            if let Some(hs) = l.hs.as_mut() {
                hs.eof();
                self.handshake_events(io, store, link);
                if let Some(l) = self.links.get(&link) {
                    if !l.closing {
                        self.link_failed(io, store, link, why);
                    }
                }
                return;
            }
            self.link_failed(io, store, link, why);
            return;
        }
        let n = c.result as usize;
        l.last_rx = self.t;
        if let Some(hs) = l.hs.as_mut() {
            hs.receive(&buf[..n]);
            l.rbuf = Some(buf);
            self.handshake_events(io, store, link);
        } else if let Some(s) = l.session.as_mut() {
            s.decoder.push(&buf[..n]);
            l.rbuf = Some(buf);
            self.process_frames(io, store, link);
        } else {
            l.rbuf = Some(buf);
        }
        self.post_recv(io, link);
    }

    pub(super) fn process_frames(&mut self, io: &mut dyn Io, store: &mut Store, link: u64) {
        loop {
            let full = self.applying.len() >= secondary::APPLYING_MAX
                || self.applying_bytes >= secondary::APPLYING_MAX_BYTES;
            let Some(l) = self.links.get_mut(&link) else {
                return;
            };
            if l.closing || l.held {
                return;
            }
            if full && l.peer.is_none() {
                // Back-pressure on a primary that sends faster than this
                // replica applies: the socket is not read until half are
                // done (`record_applied`).
                l.throttled = true;
                break;
            }
            let Some(s) = l.session.as_mut() else {
                return;
            };
            let f = match s.decoder.pull() {
                Ok(Some(f)) => f,
                Ok(None) => break,
                Err(e) => {
                    // In an established session a frame that fails its
                    // checksum, or whose header is not even one (magic,
                    // layout version, length: checked before the checksum
                    // can be), was damaged on the way.
                    use crate::peer::frame::FrameError as E;
                    if matches!(
                        e,
                        E::ChecksumMismatch { .. }
                            | E::BadMagic { .. }
                            | E::UnsupportedVersion { .. }
                            | E::TooLarge { .. }
                    ) {
                        self.damaged_frames += 1;
                    }
                    self.link_failed(io, store, link, format!("bad frame: {e}"));
                    return;
                }
            };
            let kind = f.kind;
            // A primary that sends requests but does not read the answers
            // (Sums, Pong, FlushAck...) would make this node queue them
            // without bound: an authenticated tester's flood of SumsRequests
            // took a secondary to 14.6 GB in 20 s. A sound primary reads
            // them (it keeps at most a few ranges and blocks in flight), so
            // past the limit the link goes, as for any broken peer.
            if l.peer.is_none() {
                let queued = l.out.len() + l.segs.iter().map(Vec::len).sum::<usize>();
                if queued > UNREAD_ANSWERS_LIMIT {
                    self.link_failed(
                        io,
                        store,
                        link,
                        format!(
                            "the primary does not read its answers ({} MiB queued); closing",
                            queued >> 20
                        ),
                    );
                    return;
                }
            }
            let r = match l.peer {
                Some(i) => self.primary_frame(io, store, i, kind, f.payload()),
                None => session_order(&mut l.session_started, kind).and_then(|()| {
                    let (buf, at) = f.into_buf();
                    self.secondary_frame(io, store, link, kind, buf, at)
                }),
            };
            if let Err(why) = r {
                self.link_failed(io, store, link, why);
                return;
            }
        }
        self.post_send(io, link);
    }

    pub(super) fn sent(&mut self, io: &mut dyn Io, store: &mut Store, link: u64, c: Completion) {
        let Some(l) = self.links.get_mut(&link) else {
            return;
        };
        let Op::Send { fd, buf, at } = c.op else {
            return;
        };
        if c.result <= 0 {
            l.send_busy = false;
            l.spare = buf;
            l.out.clear();
            l.segs.clear();
            if l.close_after_send {
                l.close_after_send = false;
                self.close_link(io, link);
                return;
            }
            let why = format!("send failed: {}", errno_str(-c.result.min(-1)));
            self.link_failed(io, store, link, why);
            return;
        }
        let at = at + c.result as usize;
        if at < buf.len() {
            io.submit(
                tok(KIND_PEER, link << 2 | SUB_SEND),
                Op::Send { fd, buf, at },
            );
            return;
        }
        l.send_busy = false;
        // A large frame's own buffer is not kept as the spare batch buffer.
        if buf.capacity() <= RECV_BUF || l.spare.capacity() == 0 {
            l.spare = buf;
        }
        if l.out.is_empty() && l.segs.is_empty() && l.close_after_send {
            l.close_after_send = false;
            self.close_link(io, link);
            return;
        }
        if l.closing && !l.close_after_send {
            self.reap_link(link);
            return;
        }
        self.submit_send(io, link);
    }

    /// Start a replication session with peer `i` on `link`, before any
    /// record goes out. `theirs` is the session token the peer reported:
    /// the one it last accepted records in. If that is not the token this
    /// node gave it last time, another primary wrote to it since (one with
    /// this node's identity, or the generation check would have refused
    /// it: a copy of this replica directory that served while this node was
    /// away), or it lost what it had (re-initialised): the dirty bitmap
    /// does not cover those blocks, so every checksum is compared. Then a
    /// fresh token is sent; it is recorded here (durably) only once the
    /// peer answers, when it has stored it too: a session the peer refused
    /// (Busy) or lost before taking it must not look foreign next time.
    fn start_session(
        &mut self,
        io: &mut dyn Io,
        i: usize,
        link: u64,
        theirs: u64,
    ) -> Result<(), String> {
        let p = &mut self.peers[i];
        let ours = p.bitmap.session();
        if theirs != ours && theirs != 0 && theirs == p.sent_session {
            p.bitmap.set_session(theirs)?;
        } else if theirs != ours && p.bitmap.flags() & FLAG_COMPARE == 0 {
            if theirs == 0 {
                crate::elog!(
                    "nbdmirror: peer {} ({}) reports no session: its crash recovery could not \
                     vouch for some blocks, or it was re-initialised; comparing checksums",
                    p.node_id,
                    p.addr
                );
            } else {
                crate::elog!(
                    "nbdmirror: peer {} ({}) last took writes in a session this node did not \
                     start (its session {theirs:016x}, ours {ours:016x}): another primary with \
                     this node's identity (a copy of this replica directory?) wrote to it, or it \
                     was re-initialised; comparing checksums",
                    p.node_id,
                    p.addr
                );
            }
            let f = p.bitmap.flags() | FLAG_COMPARE;
            p.bitmap.set_flags(f)?;
        }
        let n = nonce();
        let token = u64::from_le_bytes(n[..8].try_into().unwrap()) | 1;
        p.pending_session = Some(token);
        p.sent_session = token;
        self.send_frame(link, FrameKind::Session, &[&token.to_le_bytes()]);
        // The run, before any record of the session: a peer that holds our
        // generation records it with the first record of this run it takes
        // (even while resynced), so that a node promoted from an earlier
        // run does not roll that record back. (`link` is `peers[i].link`.)
        self.send_generation(io, i, true);
        // Its Pong records the token here at once, even on an idle link.
        let stamp = self.next_mrid;
        self.send_frame(link, FrameKind::Ping, &[&stamp.to_le_bytes()]);
        self.post_send(io, link);
        Ok(())
    }

    /// Peer `i` holds exactly our data: tell it our generation (it records
    /// it, so a later connect knows its data is ours).
    pub(super) fn announce_generation(&mut self, io: &mut dyn Io, i: usize) {
        self.send_generation(io, i, false);
    }

    /// The Generation frame to peer `i`: "in sync" (it adopts the
    /// generation and run), or `run_only` (it records the run if it holds
    /// the generation; not sent below protocol version 6).
    pub(super) fn send_generation(&mut self, io: &mut dyn Io, i: usize, run_only: bool) {
        let Some(link) = self.peers[i].link else {
            return;
        };
        let Some(g) = wire::encode_generation(
            self.generation.current,
            self.generation.epoch,
            self.peers[i].version,
            run_only,
        ) else {
            return;
        };
        self.send_frame(link, FrameKind::Generation, &[&g]);
        self.post_send(io, link);
    }
}
