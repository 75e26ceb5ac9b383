//! Log lines: what [`crate::elog!`] writes to stderr.
//!
//! Owns: the line format of the node's log, which is a timestamp (UTC, RFC
//! 3339 with milliseconds) and then the message, so that an operator can
//! tell when a peer timed out or a resync ended. `serve` turns timestamps on
//! ([`set_timestamps`]) unless its stderr is the systemd journal, which
//! stamps every line itself (`JOURNAL_STREAM`, see systemd.exec(5)), or the
//! operator said `--log-timestamps never`. The one-shot commands (`resync`,
//! `info`, ...) print their errors without one.
//!
//! Each line goes to stderr in one `write(2)`, so lines from the event loop
//! and from helper threads never interleave mid-line.

use std::io::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

static TIMESTAMPS: AtomicBool = AtomicBool::new(false);

/// Prefix every later log line with the time (or stop doing so).
pub fn set_timestamps(on: bool) {
    TIMESTAMPS.store(on, Ordering::Relaxed);
}

/// Whether log lines carry a timestamp.
pub fn timestamps() -> bool {
    TIMESTAMPS.load(Ordering::Relaxed)
}

/// Whether this process's stderr is the systemd journal: `JOURNAL_STREAM`
/// holds the device and inode ("DEV:INO") of the stream systemd connected,
/// and they are stderr's (a child that inherited the variable but was given
/// another stderr does not count).
pub fn stderr_is_journal() -> bool {
    let Ok(v) = std::env::var("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = v.split_once(':') else {
        return false;
    };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else {
        return false;
    };
    // SAFETY: an all-zero `stat` is a valid value of the plain C struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: fstat on fd 2 into a buffer we own.
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev == dev && st.st_ino == ino
}

/// Write one log line (a newline is added), with the timestamp if they are on.
pub fn line(args: std::fmt::Arguments<'_>) {
    let mut s = String::with_capacity(128);
    if timestamps() {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        s.push_str(&rfc3339_millis(now.as_secs(), now.subsec_millis()));
        s.push(' ');
    }
    let _ = std::fmt::write(&mut s, args);
    s.push('\n');
    // A log line that cannot be written (stderr a closed pipe, a full disk)
    // is dropped: see `elog!`.
    let _ = std::io::stderr().write_all(s.as_bytes());
}

/// `secs` since the Unix epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_millis(secs: u64, millis: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = (if mp < 10 { mp + 3 } else { mp - 9 }) as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// A rate limit for a kind of log line that a client can make the node
/// write at will: a read of a corrupt block logs one, and a client (or a
/// guest's retry loop) reading it again and again wrote 11 MB of log a
/// second (a tester's find). At most `burst` such lines are written per
/// `window`; the rest are counted, and the count is logged ("N more `what`
/// ...") once their window has ended: at the next line of the kind, or at
/// the owner's tick ([`Limiter::log_suppressed`]), so that a burst that
/// stops is still reported.
#[derive(Debug)]
pub struct Limiter {
    /// The lines' kind, plural ("checksum failures").
    what: &'static str,
    window: std::time::Duration,
    burst: u32,
    since: Option<std::time::Instant>,
    used: u32,
    suppressed: u64,
}

impl Limiter {
    pub const fn new(what: &'static str, window: std::time::Duration, burst: u32) -> Limiter {
        Limiter {
            what,
            window,
            burst,
            since: None,
            used: 0,
            suppressed: 0,
        }
    }

    /// A line of this kind is due at `now`: whether to write it (false: it
    /// is counted). Logs the count of an ended window first.
    pub fn allow(&mut self, now: std::time::Instant) -> bool {
        self.log_suppressed(now);
        if self
            .since
            .is_none_or(|s| now.saturating_duration_since(s) >= self.window)
        {
            self.since = Some(now);
            self.used = 0;
        }
        if self.used < self.burst {
            self.used += 1;
            true
        } else {
            self.suppressed += 1;
            false
        }
    }

    /// How many lines were suppressed in a window that has ended by `now`
    /// (0 while it lasts, or when none were); the count starts again.
    pub fn suppressed_due(&mut self, now: std::time::Instant) -> u64 {
        match self.since {
            Some(s) if self.suppressed > 0 && now.saturating_duration_since(s) >= self.window => {
                std::mem::take(&mut self.suppressed)
            }
            _ => 0,
        }
    }

    /// Log how many lines were held back, once their window has ended.
    pub fn log_suppressed(&mut self, now: std::time::Instant) {
        let n = self.suppressed_due(now);
        if n > 0 {
            line(format_args!(
                "nbdmirror: {n} more {} in the last {} s were not logged one by one",
                self.what,
                self.window.as_secs()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{rfc3339_millis, Limiter};
    use std::time::{Duration, Instant};

    #[test]
    fn a_limiter_lets_a_burst_through_then_counts_until_the_window_ends() {
        let mut l = Limiter::new("test lines", Duration::from_secs(10), 3);
        let t0 = Instant::now();
        let allowed = (0..100).filter(|_| l.allow(t0)).count();
        assert_eq!(allowed, 3);
        assert_eq!(
            l.suppressed_due(t0 + Duration::from_secs(9)),
            0,
            "window not over"
        );
        assert_eq!(l.suppressed_due(t0 + Duration::from_secs(10)), 97);
        assert_eq!(
            l.suppressed_due(t0 + Duration::from_secs(11)),
            0,
            "reported once"
        );
        // A new window lets a new burst through.
        let t1 = t0 + Duration::from_secs(12);
        assert!(l.allow(t1) && l.allow(t1) && l.allow(t1) && !l.allow(t1));
        assert_eq!(l.suppressed_due(t1 + Duration::from_secs(10)), 1);
    }

    #[test]
    fn formats_known_instants() {
        assert_eq!(rfc3339_millis(0, 0), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 (a leap day in a century leap year), 23:59:59.999
        assert_eq!(rfc3339_millis(951_868_799, 999), "2000-02-29T23:59:59.999Z");
        // `date -u -d @1795786200`: 2026-11-27T13:30:00Z
        assert_eq!(rfc3339_millis(1_795_786_200, 7), "2026-11-27T13:30:00.007Z");
        // 2100-03-01 (2100 is not a leap year)
        assert_eq!(rfc3339_millis(4_107_542_400, 0), "2100-03-01T00:00:00.000Z");
    }
}
