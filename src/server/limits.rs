//! Keeping clients honest: the limits that stop one client from holding
//! the server up or using up its memory, enforced on every tick: the
//! handshake deadline, connections that stop reading their replies or
//! sending their payloads while memory is short, returning freed memory
//! to the system, and the shutdown deadline.

use super::*;

impl Server {
    /// A client that connects and never finishes the handshake (sends
    /// nothing, or half an option) is closed after [`HANDSHAKE_LIMIT`], as
    /// qemu-nbd does, instead of holding a connection for ever.
    pub(super) fn enforce_handshake_limit(&mut self) {
        let stale: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| {
                matches!(c.phase, Phase::Handshake(_))
                    && !c.reading_done
                    && c.opened.elapsed() > HANDSHAKE_LIMIT
            })
            .map(|(&id, _)| id)
            .collect();
        for id in stale {
            crate::elog!(
                "nbdmirror: connection {id}: handshake not finished within {} s; closing",
                HANDSHAKE_LIMIT.as_secs()
            );
            self.hard_close(id);
        }
    }

    /// Close connection `id` without waiting for its queued replies: no
    /// more requests are read, the pending send fails and the pending
    /// receive ends (shutdown), queued output is dropped; requests it
    /// started still complete in the store.
    fn hard_close(&mut self, id: u64) {
        if let Some(conn) = self.conns.get_mut(&id) {
            conn.reading_done = true;
            conn.abort = true;
            // SAFETY: shutdown on a socket we own.
            unsafe { libc::shutdown(conn.fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        self.drop_output(id);
        self.maybe_close(id);
    }

    /// While memory is short (over the server-wide budget), close
    /// connections that hold some of it and have made no progress of their
    /// own for [`STALL_LIMIT`]: replies they do not take (no send completed,
    /// and the socket's send queue did not shrink over the last half of the
    /// limit, so a client reading slower than the kernel wakes a sender
    /// still counts as reading), or a payload they do not finish. The
    /// largest go first, and only as many as bring the server back within
    /// its budget. Requests they started still complete in the store
    /// (nothing acknowledged is lost; the client just never hears of them,
    /// as after any disconnect).
    pub(super) fn enforce_stall_limit(&mut self) {
        let now = self.batch_time;
        let late = now.saturating_duration_since(self.last_stall_check);
        self.last_stall_check = now;
        if late > STALL_TICK_LATE {
            // The loop itself stood still (a disk that hung, SIGSTOP): the
            // completions that show the clients' progress meanwhile are
            // still to be dispatched. Everyone's clock starts again.
            for c in self.conns.values_mut() {
                c.sent_at = now;
                c.received_at = now;
            }
            return;
        }
        let total = self.total_inflight_bytes + self.total_out_bytes;
        if total < MAX_TOTAL_INFLIGHT_BYTES {
            return;
        }
        let mut stalled: Vec<(u64, usize, &'static str)> = Vec::new();
        for (&id, c) in self.conns.iter_mut() {
            if c.shut || c.abort || c.held() < CONN_RESERVED_BYTES {
                continue;
            }
            if c.send_in_flight {
                let idle = now.saturating_duration_since(c.sent_at);
                if idle <= STALL_LIMIT / 2 {
                    continue;
                }
                let mut q: libc::c_int = 0;
                // SAFETY: SIOCOUTQ (= TIOCOUTQ) on a socket we own writes
                // one int: the bytes its send queue holds.
                if unsafe { libc::ioctl(c.fd.as_raw_fd(), libc::TIOCOUTQ, &mut q) } != 0 {
                    continue;
                }
                match c.outq_sample {
                    Some((at, was)) if at == c.sent_at && q < was => {
                        // The client took some: progress.
                        c.sent_at = now;
                        c.outq_sample = None;
                        continue;
                    }
                    Some((at, _)) if at == c.sent_at => {}
                    _ => c.outq_sample = Some((c.sent_at, q)),
                }
                if idle > STALL_LIMIT {
                    stalled.push((id, c.held(), "taken no byte of its replies"));
                }
            } else if c.sink.is_some()
                && c.recv_in_flight
                && !c.eof
                && now.saturating_duration_since(c.received_at) > STALL_LIMIT
            {
                stalled.push((id, c.held(), "sent no byte of the WRITE payload it started"));
            }
        }
        stalled.sort_by_key(|&(id, held, _)| (std::cmp::Reverse(held), id));
        let mut over = total - MAX_TOTAL_INFLIGHT_BYTES;
        for (id, held, what) in stalled {
            if !self.conns.contains_key(&id) {
                continue;
            }
            crate::elog!(
                "nbdmirror: connection {id}: has {what} for {} s while it holds {} MiB and the \
                 server is over its {} MiB memory budget; closing it",
                STALL_LIMIT.as_secs(),
                held >> 20,
                MAX_TOTAL_INFLIGHT_BYTES >> 20
            );
            self.hard_close(id);
            if held > over {
                break;
            }
            over -= held;
        }
    }

    /// After a storm of connections (thousands of idle clients, or
    /// handshakes cut short), glibc keeps their freed buffers: a tester
    /// saw 534 MB held with no client left after 4000 had gone. Once many
    /// connections have closed, at most once a second, the heap's free
    /// memory goes back to the system.
    pub(super) fn trim_memory(&mut self) {
        if self.closed_since_trim < TRIM_AFTER_CLOSES
            || self.last_trim.elapsed() < Duration::from_secs(1)
        {
            return;
        }
        self.closed_since_trim = 0;
        self.last_trim = std::time::Instant::now();
        #[cfg(target_env = "gnu")]
        // SAFETY: malloc_trim only returns free heap memory to the system.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    /// A client that stops reading its replies must not hold shutdown up
    /// forever: after the grace period its connection is dropped (the store
    /// still finishes every request it started, so nothing is lost).
    pub(super) fn enforce_shutdown_deadline(&mut self) {
        let Some(since) = self.shutdown_since else {
            return;
        };
        if since.elapsed() >= REFUSE_WINDOW {
            let ids: Vec<u64> = self.conns.keys().copied().collect();
            for id in ids {
                if let Some(conn) = self.conns.get_mut(&id) {
                    if conn.refusing {
                        conn.refusing = false;
                        conn.reading_done = true;
                    }
                }
                self.maybe_close(id);
            }
        }
        if since.elapsed() < SHUTDOWN_GRACE || self.conns.is_empty() {
            return;
        }
        let ids: Vec<u64> = self.conns.keys().copied().collect();
        for id in ids {
            if self.conns.get(&id).is_some_and(|c| !c.abort) {
                crate::elog!(
                    "nbdmirror: connection {id}: not reading its replies; dropping it to shut down"
                );
            }
            self.hard_close(id);
        }
    }
}
