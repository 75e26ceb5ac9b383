//! The node's log: `serve` starts every line with the time (UTC, RFC 3339,
//! milliseconds) so that an operator can tell when things happened; not
//! when its stderr is the systemd journal (which stamps lines itself, found
//! through `JOURNAL_STREAM`), nor with `--log-timestamps never`; the
//! one-shot commands print their errors plainly.

mod common;

use std::fs::{self, File};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

/// Whether `l` starts with `YYYY-MM-DDTHH:MM:SS.mmmZ ` (checked by shape,
/// and the year against today's).
fn stamped(l: &str) -> bool {
    let b = l.as_bytes();
    if b.len() < 25 {
        return false;
    }
    let digits = |r: std::ops::Range<usize>| b[r].iter().all(u8::is_ascii_digit);
    let shape = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19)
        && b[19] == b'.'
        && digits(20..23)
        && &b[23..25] == b"Z ";
    shape
        && l[0..4]
            .parse::<u32>()
            .is_ok_and(|y| (2024..2200).contains(&y))
}

/// Serve `dir` with `extra` arguments and `env`, stderr to `log`; wait for the
/// "serving" line, then stop the node (SIGTERM) and return its log.
fn serve_and_stop(dir: &Path, log: &Path, extra: &[&str], env: &[(&str, String)]) -> String {
    let port = free_port();
    let mut c = Command::new(NBDMIRROR_BIN);
    c.arg("serve")
        .arg("--dir")
        .arg(dir)
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(extra)
        .env_remove("JOURNAL_STREAM")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(File::create(log).unwrap());
    for (k, v) in env {
        c.env(k, v);
    }
    eprintln!("+ {} &", describe(&c));
    let mut child = c.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !fs::read_to_string(log)
        .unwrap_or_default()
        .contains("nbdmirror: serving ")
    {
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "nbdmirror exited with {st} before serving:\n{}",
                fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(Instant::now() < deadline, "no \"serving\" line within 20 s");
        thread::sleep(Duration::from_millis(50));
    }
    // A real client, so that the log has a connection in it too.
    if find_tool("nbdinfo").is_some() {
        run_ok_timeout(
            Command::new(tool("nbdinfo"))
                .arg("--size")
                .arg(format!("nbd://127.0.0.1:{port}/")),
            Duration::from_secs(30),
        );
    }
    send_signal(child.id(), "TERM");
    let st = child.wait().unwrap();
    assert!(st.success(), "nbdmirror exited with {st} on SIGTERM");
    fs::read_to_string(log).unwrap()
}

#[test]
fn serve_log_lines_carry_a_timestamp_unless_the_journal_stamps_them() {
    let tmp = TempDir::new("logging");
    let dir = tmp.join("r");
    run_ok(
        Command::new(NBDMIRROR_BIN)
            .args(["init", "--size", "16M", "--dir"])
            .arg(&dir),
    );

    // Default: every line stamped, the stamp close to now.
    let log = tmp.join("default.log");
    let before = std::time::SystemTime::now();
    let out = serve_and_stop(&dir, &log, &[], &[]);
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines.len() >= 2, "too few log lines:\n{out}");
    for l in &lines {
        assert!(stamped(l), "log line without a timestamp: {l:?}\n{out}");
    }
    let serving = lines
        .iter()
        .find(|l| l.contains("nbdmirror: serving "))
        .unwrap();
    let date = Command::new("date")
        .args(["-u", "-d", &serving[..23], "+%s"])
        .output()
        .unwrap();
    let at: u64 = stdout_str(&date).trim().parse().unwrap_or_else(|_| {
        panic!("`date` cannot parse the stamp {:?}", &serving[..23]);
    });
    let t0 = before
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    assert!(
        at + 1 >= t0 && at <= t0 + 60,
        "stamp {} is not the time of the run (started at {t0})",
        &serving[..23]
    );

    // stderr is the systemd journal (JOURNAL_STREAM names its device and
    // inode): no stamps of our own.
    let log = tmp.join("journal.log");
    File::create(&log).unwrap();
    let m = fs::metadata(&log).unwrap();
    let journal = format!("{}:{}", m.dev(), m.ino());
    let out = serve_and_stop(&dir, &log, &[], &[("JOURNAL_STREAM", journal)]);
    assert!(out.contains("nbdmirror: serving "), "{out}");
    for l in out.lines() {
        assert!(
            l.starts_with("nbdmirror"),
            "a line stamped or prefixed under the journal: {l:?}"
        );
    }

    // An inherited JOURNAL_STREAM that names another file: stamps stay on.
    let log = tmp.join("inherited.log");
    let out = serve_and_stop(
        &dir,
        &log,
        &[],
        &[("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino() + 1))],
    );
    assert!(out.lines().all(stamped), "{out}");

    // Asked for by name, both ways.
    let log = tmp.join("never.log");
    let out = serve_and_stop(&dir, &log, &["--log-timestamps", "never"], &[]);
    assert!(out.lines().all(|l| l.starts_with("nbdmirror")), "{out}");
    let log = tmp.join("always.log");
    File::create(&log).unwrap();
    let m = fs::metadata(&log).unwrap();
    let out = serve_and_stop(
        &dir,
        &log,
        &["--log-timestamps", "always"],
        &[("JOURNAL_STREAM", format!("{}:{}", m.dev(), m.ino()))],
    );
    assert!(out.lines().all(stamped), "{out}");

    // A one-shot command's error is plain.
    let o = Command::new(NBDMIRROR_BIN)
        .args(["info", "--dir"])
        .arg(tmp.join("nothing-here"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.starts_with("nbdmirror: "), "{err}");
}
