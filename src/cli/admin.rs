//! The operator's commands that talk to a running node through its admin
//! socket: `resync` (status, start, pause, resume, rate), `scrub` (start,
//! stop, status, rate) and `switchover`, and finding that socket from
//! `--dir`, `--admin-socket` or the config file.

use std::path::PathBuf;

use super::status::{human, render_scrub, render_status, term_cols};

use super::*;

fn admin_path(a: &AdminArgs) -> Result<PathBuf, String> {
    admin_target(a).map(|(sock, _)| sock)
}

/// The node's admin socket, and its replica directory when known.
fn admin_target(a: &AdminArgs) -> Result<(PathBuf, Option<PathBuf>), String> {
    if let Some((_, n)) = a.config.load()? {
        if a.dir.is_some() {
            return Err("--config --node names the node; leave out --dir".into());
        }
        let sock = a
            .admin_socket
            .clone()
            .or(n.admin_socket)
            .unwrap_or_else(|| n.dir.join("admin.sock"));
        return Ok((sock, Some(n.dir)));
    }
    match (&a.admin_socket, &a.dir) {
        (Some(p), d) => Ok((p.clone(), d.clone())),
        (None, Some(d)) => Ok((d.join("admin.sock"), Some(d.clone()))),
        (None, None) => {
            Err("say which node: --dir DIR, --admin-socket PATH or --config FILE --node N".into())
        }
    }
}

fn admin_call(a: &AdminArgs, line: &str) -> Result<serde_json::Value, String> {
    use std::io::{BufRead, Write};
    let path = admin_path(a)?;
    let mut s =
        nbdmirror::mirror::on_unix_path(&path, |p| std::os::unix::net::UnixStream::connect(p))
            .map_err(|e| {
                format!(
                    "cannot reach the node at {}: {e} (is `nbdmirror serve` running there?)",
                    path.display()
                )
            })?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("{line}\n").as_bytes())
        .map_err(|e| format!("cannot send to {}: {e}", path.display()))?;
    let mut reply = String::new();
    std::io::BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| {
            if matches!(
                e.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) {
                format!(
                    "no answer from {} within 10 s: the command was sent, and the node may \
                     still carry it out when it answers again (a node answers once it has \
                     recovered its journal at start); look at `status` before repeating it, \
                     and see its log",
                    path.display()
                )
            } else {
                format!(
                    "no answer from {}: {e} (did the node stop? see its log)",
                    path.display()
                )
            }
        })?;
    let v: serde_json::Value = serde_json::from_str(reply.trim())
        .map_err(|e| format!("unreadable answer from {}: {e}", path.display()))?;
    if v.get("ok") == Some(&serde_json::Value::Bool(false)) {
        return Err(v
            .get("error")
            .and_then(|e| e.as_str())
            .unwrap_or("refused")
            .to_string());
    }
    Ok(v)
}

/// `nbdmirror switchover`: ask the primary to hand over and stop, wait for
/// it to exit, and say whether the handover was done.
pub(crate) fn switchover(admin: &AdminArgs) -> Result<(), String> {
    let (path, mut dir) = admin_target(admin)?;
    if dir.is_none() {
        // Only the socket was named: the node says where its replica is, to
        // read the handover from once it has stopped, and that path is used
        // only if it names the same replica here (the same lock file, by
        // device and inode, held by the running node).
        let st = admin_call(admin, "status")?;
        dir = st
            .get("dir")
            .and_then(|d| d.as_str())
            .map(PathBuf::from)
            .filter(|d| {
                let here = dir::lock_id(d);
                d.is_absolute()
                    && here.is_some()
                    && here.as_deref() == st.get("dir_lock").and_then(|v| v.as_str())
                    && dir::in_use(d)
            });
    }
    admin_call(admin, "switchover")?;
    out!("switchover: the primary is stopping and handing over to its peers...");
    // The node removes its admin socket as the very last step of a clean
    // stop, after it has recorded the handover (the socket stops taking
    // connections as soon as the shutdown begins, which says nothing).
    let start = std::time::Instant::now();
    let deadline = start + std::time::Duration::from_secs(300);
    // A node that died (SIGKILL, a crash) leaves its socket behind but not
    // its lock on the replica.
    let mut died = false;
    while path.exists() {
        if dir
            .as_deref()
            .is_some_and(nbdmirror::store::dir::lock_is_free)
        {
            died = true;
            break;
        }
        // A node still taking connections seconds later has not begun to
        // stop: it called the switchover off (a peer fell out of sync).
        if start.elapsed() > std::time::Duration::from_secs(3)
            && nbdmirror::mirror::socket_is_live(&path)
        {
            return Err(
                "the switchover was called off (a peer fell out of sync; see the node's log): \
                 the node goes on serving as the primary"
                    .into(),
            );
        }
        if std::time::Instant::now() > deadline {
            return Err(format!(
                "the node at {} has not finished stopping within 300 s; see its log",
                path.display()
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let Some(dir) = dir else {
        // A node too old to say where its replica is, or one whose path
        // names another replica (or nothing) where this tool runs.
        return Err(
            "the node stopped, but this tool cannot tell whether it handed over (it cannot \
             see the node's replica directory from here): see its log before promoting a \
             secondary, or run `nbdmirror info --dir DIR` on its replica"
                .into(),
        );
    };
    let g = nbdmirror::mirror::generation::Generation::load(&dir)?;
    if g.flags & nbdmirror::mirror::generation::FLAG_HANDED_OVER != 0 {
        out!(
            "handed over generation {:016x}: start a secondary with --role primary, then this \
             node as its secondary (--role secondary)",
            g.current
        );
        Ok(())
    } else if died {
        Err(
            "the node died during the switchover (its replica is no longer held; its admin \
             socket was left behind) WITHOUT handing over: a secondary promoted now meets it \
             as split brain; start it again as the primary"
                .into(),
        )
    } else {
        Err(
            "the node stopped WITHOUT handing over (its log says why): a secondary promoted \
             now meets it as split brain; start it again as the primary"
                .into(),
        )
    }
}

pub(crate) fn resync(action: ResyncCmd) -> Result<(), String> {
    use std::io::IsTerminal;
    let sel = |cmd: &str, peer: Option<u32>| match peer {
        Some(p) => format!("{cmd} {p}"),
        None => cmd.to_string(),
    };
    match action {
        ResyncCmd::Status { admin, json, watch } => loop {
            let v = admin_call(&admin, "status")?;
            let cols = term_cols();
            if json {
                out!("{v}");
            } else {
                for l in render_status(&v, cols) {
                    out!("{l}");
                }
            }
            let all_in_sync = v["peers"].as_array().is_none_or(|ps| {
                ps.iter()
                    .all(|p| p["state"] == "in_sync" || p["state"] == "connected")
            });
            if !watch || all_in_sync {
                return Ok(());
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
            if !json && std::io::stdout().is_terminal() {
                let n = render_status(&v, cols).len();
                out_raw!("\x1b[{n}A\x1b[J");
            }
        },
        ResyncCmd::Start { admin, peer, full } => {
            let r = admin_call(&admin, &sel(if full { "full" } else { "start" }, peer))?;
            // A start lifts an operator's pause: say so, it outlives restarts.
            let unpaused: Vec<String> = r["unpaused"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|v| v.as_u64())
                        .map(|id| id.to_string())
                        .collect()
                })
                .unwrap_or_default();
            if !unpaused.is_empty() {
                out!(
                    "peer{} {} {} paused: the pause is lifted",
                    if unpaused.len() == 1 { "" } else { "s" },
                    unpaused.join(", "),
                    if unpaused.len() == 1 { "was" } else { "were" }
                );
            }
            // Say so when a peer cannot be resynced right now.
            let v = admin_call(&admin, "status")?;
            let mut waiting = Vec::new();
            for p in v["peers"].as_array().cloned().unwrap_or_default() {
                let id = p["node_id"].as_u64();
                if peer.is_some_and(|want| Some(want as u64) != id) {
                    continue;
                }
                let state = p["state"].as_str().unwrap_or("?").to_string();
                if state != "syncing" && state != "in_sync" {
                    waiting.push(format!("peer {} is {state}", id.unwrap_or(0)));
                }
            }
            if waiting.is_empty() {
                out!("resync started");
            } else {
                out!(
                    "resync requested; {}: it runs once the peer is connected (reconnecting now)",
                    waiting.join(", ")
                );
            }
            Ok(())
        }
        ResyncCmd::Pause { admin, peer } => {
            admin_call(&admin, &sel("pause", peer))?;
            out!("resync paused");
            Ok(())
        }
        ResyncCmd::Resume { admin, peer } => {
            admin_call(&admin, &sel("resume", peer))?;
            out!("resync resumed");
            Ok(())
        }
        ResyncCmd::Rate { rate, admin } => {
            admin_call(&admin, &format!("rate {rate}"))?;
            out!(
                "resync rate set to {} until the node restarts (then --resync-rate, or the \
                 config file's resync-rate, applies again)",
                if rate == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{}/s", human(rate as f64))
                }
            );
            Ok(())
        }
    }
}

pub(crate) fn scrub(action: ScrubCmd) -> Result<(), String> {
    use std::io::IsTerminal;
    let status = |admin: &AdminArgs| -> Result<serde_json::Value, String> {
        let v = admin_call(admin, "status")?;
        if v["scrub"].is_null() {
            return Err(format!(
                "node {} is a {}: scrubs run on the primary, which has every in-sync secondary verify its copy too",
                v["node_id"],
                v["role"].as_str().unwrap_or("secondary")
            ));
        }
        Ok(v)
    };
    // Show progress until the scrub is idle; the last status.
    let watch = |admin: &AdminArgs, json: bool| -> Result<serde_json::Value, String> {
        let mut shown = 0;
        loop {
            let v = status(admin)?;
            let idle = v["scrub"]["state"] == "idle";
            let paused = v["scrub"]["state"] == "paused";
            if !json && std::io::stdout().is_terminal() && shown > 0 {
                out_raw!("\x1b[{shown}A\x1b[J");
            }
            if json {
                out!("{}", v["scrub"]);
            } else {
                let lines = render_scrub(&v);
                shown = lines.len();
                for l in lines {
                    out!("{l}");
                }
            }
            if idle || paused {
                return Ok(v);
            }
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
    };
    match action {
        ScrubCmd::Status {
            admin,
            json,
            watch: w,
        } => {
            if w {
                watch(&admin, json)?;
                return Ok(());
            }
            let v = status(&admin)?;
            if json {
                out!("{}", v["scrub"]);
            } else {
                for l in render_scrub(&v) {
                    out!("{l}");
                }
            }
            Ok(())
        }
        ScrubCmd::Start { admin, wait } => {
            if let Err(e) = admin_call(&admin, "scrub start") {
                if wait && e.starts_with(nbdmirror::mirror::scrub::ALREADY_RUNNING) {
                    // Waiting for the pass that runs is what was asked
                    // for: a scheduled one, or one another shell started.
                    nbdmirror::elog!("nbdmirror: {e}; waiting for it to end");
                } else if wait {
                    // Exit status 1 is for what a scrub found.
                    nbdmirror::elog!("nbdmirror: error: {e}");
                    std::process::exit(2);
                } else {
                    return Err(e);
                }
            } else if !wait {
                out!("scrub started (`nbdmirror scrub status` shows its progress)");
                return Ok(());
            }
            // Exit status 2: the node could not be asked to the end (it
            // stopped, or died); 1 is for what the scrub found.
            let v = match watch(&admin, false) {
                Ok(v) => v,
                Err(e) => {
                    nbdmirror::elog!("nbdmirror: error: {e}");
                    std::process::exit(2);
                }
            };
            if v["scrub"]["state"] == "paused" {
                return Err("the scrub was paused before it finished".into());
            }
            if v["scrub"]["last"]["complete"].as_bool() == Some(false) {
                return Err("the scrub was cancelled before it finished".into());
            }
            if v["scrub"]["last"]["clean"].as_bool() == Some(false) {
                return Err(
                    "the scrub found blocks on this node that could not be repaired (above)".into(),
                );
            }
            Ok(())
        }
        ScrubCmd::Pause { admin } => {
            admin_call(&admin, "scrub pause")?;
            out!("scrub paused");
            Ok(())
        }
        ScrubCmd::Resume { admin } => {
            admin_call(&admin, "scrub resume")?;
            out!("scrub resumed");
            Ok(())
        }
        ScrubCmd::Cancel { admin } => {
            admin_call(&admin, "scrub cancel")?;
            out!("scrub cancelled");
            Ok(())
        }
        ScrubCmd::Rate { rate, admin } => {
            admin_call(&admin, &format!("scrub rate {rate}"))?;
            out!(
                "scrub rate set to {} until the node restarts (then --scrub-rate, or the \
                 config file's scrub-rate, applies again)",
                if rate == 0 {
                    "unlimited".to_string()
                } else {
                    format!("{}/s", human(rate as f64))
                }
            );
            Ok(())
        }
    }
}
