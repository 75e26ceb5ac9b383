//! Rendering what a running node's admin socket reports, for people: the
//! `resync status` screen (one line and a progress bar per peer, warnings
//! such as DEGRADED or INCONSISTENT under the node line) and the `scrub
//! status` report, sized to the terminal. `--json` bypasses this.

pub(crate) fn human(n: f64) -> String {
    let units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < units.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", units[u])
    } else {
        format!("{v:.1} {}", units[u])
    }
}

/// One line per peer: state, a bar, percent, rate and ETA.
/// Columns of the terminal on stdout, if it is one.
pub(super) fn term_cols() -> Option<usize> {
    use std::io::IsTerminal;
    if !std::io::stdout().is_terminal() {
        return None;
    }
    // SAFETY: TIOCGWINSZ fills a winsize; a zeroed one is a valid buffer.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::ioctl(libc::STDOUT_FILENO, libc::TIOCGWINSZ, &mut ws) };
    Some(if r == 0 && ws.ws_col >= 20 {
        ws.ws_col as usize
    } else {
        80
    })
}

/// Status lines. On a terminal (`cols`), the progress bar gets a line of its
/// own, sized to fit, and no line is longer than the terminal is wide, so
/// `--watch` can redraw them in place.
pub(super) fn render_status(v: &serde_json::Value, cols: Option<usize>) -> Vec<String> {
    let mut lines = vec![format!(
        "node {} ({}){}",
        v["node_id"],
        v["role"].as_str().unwrap_or("?"),
        if v["inconsistent"].as_bool() == Some(true) && v["uncertain"].as_bool() == Some(true) {
            ", INCONSISTENT: its crash recovery could not vouch for some blocks (its primary \
             resends them)"
        } else if v["inconsistent"].as_bool() == Some(true) {
            ", INCONSISTENT: partway through a resync from its primary"
        } else {
            ""
        }
    )];
    if let Some(why) = v["refused"].as_str() {
        lines.push(format!(
            "  REFUSED: {why}; its data may be superseded, and its reads answer EIO (the log \
             has the primary's reason)"
        ));
    }
    let peers = v["peers"].as_array().cloned().unwrap_or_default();
    if peers.is_empty() && v["role"].as_str() == Some("primary") {
        // A secondary promoted after a failover, with no --peer yet, is
        // where a user holds one copy without being told (a tester's find).
        lines.push(
            "  no peers: writes are acknowledged with this node's copy only (serve it with \
             --peer to mirror)"
                .into(),
        );
    } else if peers.is_empty() {
        lines.push("  no peers".into());
    } else if v["role"].as_str() == Some("primary")
        && !peers.iter().any(|p| p["state"].as_str() == Some("in_sync"))
    {
        // No write quorum (docs/mirroring.md, "Limits"): say it loudly.
        // A syncing peer takes new writes too, but holds no full copy yet.
        lines.push(
            if peers.iter().any(|p| p["state"].as_str() == Some("syncing")) {
                "  DEGRADED: no peer is in sync yet (resyncing); until one is, this node holds \
                 the only full copy"
            } else {
                "  DEGRADED: no peer is in sync; writes are acknowledged with this node's copy \
                 only"
            }
            .into(),
        );
    }
    for p in peers {
        let state = p["state"].as_str().unwrap_or("?");
        let mut line = format!(
            "  peer {} {} {state}",
            p["node_id"],
            p["address"].as_str().unwrap_or("")
        );
        let total = p["resync_total_bytes"].as_f64().unwrap_or(0.0);
        let done = p["resync_done_bytes"].as_f64().unwrap_or(0.0);
        let dirty = p["dirty_bytes"].as_f64().unwrap_or(0.0);
        match p["in_sync"].as_bool() {
            Some(true) => line.push_str(", in sync"),
            Some(false) => line.push_str(", receiving resync data"),
            None => {}
        }
        if state != "syncing" && state != "in_sync" && dirty > 0.0 {
            line.push_str(&format!("  {} to resync", human(dirty)));
        }
        if state != "syncing" && p["paused"].as_bool() == Some(true) {
            // The next resync starts paused: say so before it does.
            line.push_str("  (resync paused)");
        }
        if state == "syncing" {
            let frac = if total > 0.0 {
                (done / total).clamp(0.0, 1.0)
            } else {
                0.0
            };
            let rate = p["rate_bytes_per_sec"].as_f64().unwrap_or(0.0);
            let eta = if rate > 0.0 {
                let s = (dirty / rate) as u64;
                format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
            } else {
                "--:--:--".into()
            };
            let stalled = p["stalled_seconds"].as_u64().unwrap_or(0);
            let mut text = if stalled > 0 {
                format!(
                    " {:5.1}%  {} of {}  stalled: nothing sent for {stalled} s",
                    frac * 100.0,
                    human(done),
                    human(total),
                )
            } else {
                format!(
                    " {:5.1}%  {} of {}  {}/s  ETA {eta}",
                    frac * 100.0,
                    human(done),
                    human(total),
                    human(rate),
                )
            };
            if p["paused"].as_bool() == Some(true) {
                text.push_str("  (paused)");
            }
            let indent = if cols.is_some() { 4 } else { 1 };
            let width = match cols {
                Some(c) => c.saturating_sub(indent + 2 + text.len() + 1).clamp(10, 30),
                None => 30,
            };
            let filled = (frac * width as f64).round() as usize;
            let bar = format!(
                "[{}{}]{text}",
                "#".repeat(filled),
                "-".repeat(width - filled)
            );
            if cols.is_some() {
                lines.push(line);
                line = format!("{}{bar}", " ".repeat(indent));
            } else {
                line.push(' ');
                line.push_str(&bar);
            }
        }
        let last_error = p["last_error"].as_str().filter(|_| state != "in_sync");
        match last_error {
            // A syncing peer's error is this session's (a session clears
            // it): a resync held up by blocks bad on this node says so under
            // its progress bar, which stayed at 99.6% without a word (a
            // tester's find).
            Some(e) if state == "syncing" => {
                lines.push(line);
                line = format!("    last error: {e}");
            }
            Some(e) => line.push_str(&format!("  last error: {e}")),
            None => {}
        }
        lines.push(line);
    }
    let store = &v["store"];
    if let Some(size) = store["journal_bytes"].as_f64().filter(|s| *s > 0.0) {
        let used = store["journal_used_bytes"].as_f64().unwrap_or(0.0);
        let mut line = format!(
            "  journal {:.0}% of {} used, {} checkpoints, {} in-place writes",
            used / size * 100.0,
            human(size),
            store["checkpoints"],
            store["inplace_writes"],
        );
        if let Some(e) = store["failed"].as_str() {
            line.push_str(&format!("  STORE FAILED: {e}"));
        }
        lines.push(line);
        // Silent corruption found by reads: worth a line of its own.
        let bad = store["checksum_failures"].as_u64().unwrap_or(0);
        if bad > 0 {
            lines.push(format!(
                "  CHECKSUM FAILURES: {bad} block reads failed verification, {} blocks repaired \
                 from a peer (see the node's log)",
                store["repaired_blocks"].as_u64().unwrap_or(0)
            ));
        }
    }
    // Damage on the replication links: a faulty NIC, cable or memory.
    let dmg = &v["damaged_in_transit"];
    let (frames, records) = (
        dmg["frames"].as_u64().unwrap_or(0),
        dmg["records"].as_u64().unwrap_or(0),
    );
    if frames + records > 0 {
        lines.push(format!(
            "  DAMAGED IN TRANSIT: {frames} frames arrived damaged (checksum or header), \
             {records} records failed their block checksums; each connection was dropped and what it carried resent \
             (see the node's log)"
        ));
    }
    // The scrub, when it runs or its last pass left something bad.
    let sc = &v["scrub"];
    if sc["state"] == "running" || sc["state"] == "paused" {
        let total = sc["total_bytes"].as_f64().unwrap_or(0.0);
        let pos = sc["position_bytes"].as_f64().unwrap_or(0.0);
        lines.push(format!(
            "  scrub {} at {:.1}% (`nbdmirror scrub status`)",
            sc["state"].as_str().unwrap_or("?"),
            if total > 0.0 {
                pos / total * 100.0
            } else {
                100.0
            }
        ));
    } else if sc["last"]["clean"] == false {
        let f = &sc["last"]["found"];
        lines.push(format!(
            "  LAST SCRUB LEFT PROBLEMS: {} bad blocks not repaired, {} read errors \
             (`nbdmirror scrub status`)",
            f["unrepaired_blocks"], f["read_errors"]
        ));
    }
    if let Some(c) = cols {
        for l in lines.iter_mut() {
            if let Some((cut, _)) = l.char_indices().nth(c.saturating_sub(1)) {
                l.truncate(cut);
            }
        }
    }
    lines
}

fn scrub_findings(f: &serde_json::Value) -> String {
    let bad = f["bad_blocks"].as_u64().unwrap_or(0);
    let mut s = format!(
        "{} checked; {bad} bad block{} on this node",
        human(f["checked_bytes"].as_f64().unwrap_or(0.0)),
        if bad == 1 { "" } else { "s" }
    );
    if f["bad_blocks"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!(
            " ({} repaired from a peer, {} NOT REPAIRED",
            f["repaired_blocks"], f["unrepaired_blocks"]
        ));
        if let Some(l) = f["unrepaired_list"].as_array().filter(|l| !l.is_empty()) {
            let more = f["unrepaired_blocks"].as_u64().unwrap_or(0) as usize;
            let l: Vec<String> = l.iter().map(|b| b.to_string()).collect();
            s.push_str(&format!(": blocks {}", l.join(", ")));
            if more > l.len() {
                s.push_str(&format!(" and {} more (see the log)", more - l.len()));
            }
        }
        s.push(')');
    }
    if f["read_errors"].as_u64().unwrap_or(0) > 0 {
        s.push_str(&format!("; {} READ ERRORS", f["read_errors"]));
    }
    for p in f["peers"].as_array().cloned().unwrap_or_default() {
        s.push_str(&format!(
            "; peer {}: {} compared, {} bad there, {} differing",
            p["node_id"],
            human(p["checked_bytes"].as_f64().unwrap_or(0.0)),
            p["bad_blocks"],
            p["differing_blocks"]
        ));
        if p["skipped_bytes"].as_u64().unwrap_or(0) > 0 {
            s.push_str(&format!(
                " ({} not compared: the peer was away or resyncing them, or they are bad here)",
                human(p["skipped_bytes"].as_f64().unwrap_or(0.0))
            ));
        }
    }
    s
}

pub(super) fn render_scrub(v: &serde_json::Value) -> Vec<String> {
    let sc = &v["scrub"];
    let mut lines = Vec::new();
    let state = sc["state"].as_str().unwrap_or("?");
    let total = sc["total_bytes"].as_f64().unwrap_or(0.0);
    // Progress: the blocks this pass has checked (steps finish out of
    // order; `position_bytes` is where a restart would resume).
    let pos = sc["current"]["checked_bytes"]
        .as_f64()
        .unwrap_or(0.0)
        .min(total);
    let limit = match sc["rate_limit"].as_u64().unwrap_or(0) {
        0 => "no rate cap".to_string(),
        r => format!("cap {}/s", human(r as f64)),
    };
    if state == "idle" {
        lines.push(format!("scrub: idle ({limit})"));
    } else {
        let frac = if total > 0.0 { pos / total } else { 1.0 };
        let rate = sc["rate_bytes_per_sec"].as_f64().unwrap_or(0.0);
        let eta = if rate > 0.0 && state == "running" {
            let s = ((total - pos) / rate) as u64;
            format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
        } else {
            "--:--:--".into()
        };
        let filled = (frac * 30.0).round() as usize;
        lines.push(format!(
            "scrub: {state} [{}{}] {:5.1}%  {} of {}  {}/s  ETA {eta}  ({limit})",
            "#".repeat(filled.min(30)),
            "-".repeat(30 - filled.min(30)),
            frac * 100.0,
            human(pos),
            human(total),
            human(rate),
        ));
        if let Some(t) = sc["started_at"].as_u64() {
            lines.push(format!("  started {}", nbdmirror::mirror::scrub::utc(t)));
        }
        lines.push(format!("  so far: {}", scrub_findings(&sc["current"])));
    }
    match sc["last"].as_object() {
        Some(l) => lines.push(format!(
            "last scrub: {} ({}, {}): {}",
            l["finished_at"]
                .as_u64()
                .map(nbdmirror::mirror::scrub::utc)
                .unwrap_or_default(),
            if l["complete"].as_bool() == Some(true) {
                "complete"
            } else {
                "cancelled"
            },
            if l["clean"].as_bool() == Some(true) {
                "nothing left bad on this node"
            } else {
                "PROBLEMS LEFT"
            },
            scrub_findings(&l["found"])
        )),
        None => lines.push("last scrub: none yet".into()),
    }
    let last_complete = sc["last_complete_at"].as_u64();
    if sc["last"]["complete"].as_bool() == Some(false) {
        lines.push(match last_complete {
            Some(t) => format!("last complete scrub: {}", nbdmirror::mirror::scrub::utc(t)),
            None => "last complete scrub: none yet".into(),
        });
    }
    let every = sc["interval_secs"].as_u64().unwrap_or(0);
    let every_s = nbdmirror::mirror::scrub::human_secs(every);
    match sc["next_at"].as_u64() {
        Some(t) => lines.push(format!(
            "next scheduled scrub: {} (every {every_s})",
            nbdmirror::mirror::scrub::utc(t),
        )),
        None if every > 0 => lines.push(format!(
            "scheduled every {every_s}: the next is due {every_s} after this pass completes"
        )),
        None => lines.push("no scheduled scrubs (serve --scrub-interval)".into()),
    }
    lines
}
