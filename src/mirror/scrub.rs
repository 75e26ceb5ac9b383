//! Scrub: reading every block of the volume in the background, on a
//! schedule and under a rate cap, to find silent corruption and divergence
//! before a client (or a failover) runs into it.
//!
//! Owns: a scrub's progress and findings, persisted in `DIR/scrub` (so a
//! scrub resumes where it stopped after a restart, and the last result and
//! the schedule survive one), its rate bucket and measured rate, the
//! schedule (`--scrub-interval`), and the ranges in flight with what is
//! known of each. The [`Mirror`](super::Mirror) drives it: for each range it
//! takes the range lock (no client write is in flight there, so every
//! replica holds the same bytes), reads the range through the store with
//! verification, asks every in-sync peer to read and verify the same blocks
//! (VerifyRequest: only checksums come back), repairs this node's bad blocks
//! from a peer (read repair) and queues a peer's bad or differing blocks for
//! resync from this node.
//!
//! Must never: write data itself, or guess: a block that fails on this node
//! and cannot be repaired from a peer whose copy matches this node's
//! checksum is reported, not rewritten.

use std::collections::{BTreeMap, BTreeSet};

use crate::idmap::IdMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::bitmap::BLOCK;

/// Blocks one scrub step reads (1 MiB).
pub const STEP_BLOCKS: u64 = 256;
/// Steps in flight at once.
pub const WINDOW: usize = 4;
/// Default rate cap, bytes per second.
pub const DEFAULT_RATE: u64 = 100 << 20;
/// How a refused `scrub start` begins when a pass is running.
pub const ALREADY_RUNNING: &str = "a scrub is already running";
/// Repairs tried for one step (one run of adjacent bad blocks each, and
/// tries again while repair slots are taken) before the bad blocks left
/// are reported: a bound against loops, far above the 256 runs a step can
/// hold.
pub const MAX_ATTEMPTS: u16 = 2048;
/// Bad blocks listed by number in the status (all are counted and logged).
const LISTED: usize = 64;
const FILE: &str = "scrub";
/// Bad blocks a pass remembers by number (8 bytes each in `DIR/scrub`).
const SEEN_MAX: usize = 65_536;
const SAVE_EVERY: Duration = Duration::from_secs(5);
/// A scheduled scrub cancelled (or abandoned) is due again this long after
/// the cancel at the earliest (or one interval, if shorter).
const RETRY_CANCELLED: u64 = 86_400;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// What one peer's copy showed in a scrub pass.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct PeerTally {
    /// Blocks compared with this node's.
    pub checked_blocks: u64,
    /// Blocks that failed the peer's own checksums (rot on its disk).
    pub bad_blocks: u64,
    /// Blocks that verified on the peer but hold other data than this
    /// node's (the replicas diverged).
    pub differing_blocks: u64,
    /// Blocks not compared because the peer was not in sync, or dropped out
    /// while the range was being compared.
    pub skipped_blocks: u64,
}

/// What a scrub pass found.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq)]
pub struct Tally {
    pub checked_blocks: u64,
    /// Blocks of this replica that failed verification.
    pub bad_blocks: u64,
    /// Of them, rewritten from a peer's verified copy.
    pub repaired_blocks: u64,
    /// Of them, left bad (no peer in sync, or no copy matching this node's
    /// checksum): the first few by number, and how many.
    pub unrepaired: Vec<u64>,
    pub unrepaired_count: u64,
    /// Steps whose read failed for another reason than a checksum (EIO).
    pub read_errors: u64,
    pub peers: BTreeMap<u32, PeerTally>,
}

impl Tally {
    pub fn unrepaired(&mut self, blocks: &[u64]) {
        self.unrepaired_count += blocks.len() as u64;
        for &b in blocks {
            if self.unrepaired.len() < LISTED {
                self.unrepaired.push(b);
            }
        }
    }

    pub fn peer(&mut self, node: u32) -> &mut PeerTally {
        self.peers.entry(node).or_default()
    }

    /// Problems left standing: this node's unrepaired blocks and read
    /// errors (a peer's bad or differing blocks are resynced from here).
    pub fn clean(&self) -> bool {
        self.unrepaired_count == 0 && self.read_errors == 0
    }

    fn json(&self) -> serde_json::Value {
        use serde_json::json;
        json!({
            "checked_bytes": self.checked_blocks * BLOCK,
            "bad_blocks": self.bad_blocks,
            "repaired_blocks": self.repaired_blocks,
            "unrepaired_blocks": self.unrepaired_count,
            "unrepaired_list": self.unrepaired,
            "read_errors": self.read_errors,
            "peers": self.peers.iter().map(|(id, p)| json!({
                "node_id": id,
                "checked_bytes": p.checked_blocks * BLOCK,
                "bad_blocks": p.bad_blocks,
                "differing_blocks": p.differing_blocks,
                "skipped_bytes": p.skipped_blocks * BLOCK,
            })).collect::<Vec<_>>(),
        })
    }
}

/// A finished (or cancelled) pass.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub started: u64,
    pub finished: u64,
    /// Every block was read (false: cancelled).
    pub complete: bool,
    pub tally: Tally,
}

#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Idle,
    Running,
    Paused,
}

/// `DIR/scrub`: written whole to a temporary file and renamed.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct Saved {
    version: u32,
    state: State,
    /// Every block before this one was scrubbed in the current pass.
    cursor: u64,
    /// Steps at or past `cursor` already done in this pass (their first
    /// blocks): a resumed pass does not read them again.
    #[serde(default)]
    done_ahead: BTreeSet<u64>,
    /// Blocks of this node found bad in this pass (up to `SEEN_MAX`), so a
    /// step read again after a restart does not count them twice.
    #[serde(default)]
    seen_bad: BTreeSet<u64>,
    /// When the current pass started (unix seconds).
    started: u64,
    /// The schedule counts from here when no pass has finished yet (the
    /// first start with scrubbing known).
    since: u64,
    pass: Tally,
    last: Option<Outcome>,
    /// When the last complete pass finished (unix seconds): the schedule
    /// counts from it, and a cancelled pass recorded as `last` since does
    /// not hide it. (Files written before it was kept: `last`, if complete.)
    #[serde(default)]
    last_complete: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The store read of the range (under its lock).
    Reading,
    /// Waiting for the peers in `waiting` to report their checksums.
    Verifying,
    /// This node's bad blocks are being repaired from a peer (no lock held
    /// by the step: the repair locks them); then the range is read again.
    Repairing,
}

/// One range in flight.
#[derive(Debug)]
pub struct Step {
    pub first: u64,
    pub n: u64,
    pub phase: Phase,
    /// The step holds the range lock.
    pub locked: bool,
    /// This node's checksums of what it read.
    pub ours: Vec<u64>,
    /// Peers (indexes) still to answer, and those that did, with the
    /// blocks compared with each.
    pub waiting: u64,
    pub verified: Vec<(u32, u64)>,
    /// Repairs tried, and the blocks the last one was for.
    pub attempts: u16,
    pub bad: Vec<u64>,
    /// Blocks counted as bad in this step (a block is counted once).
    pub counted: Vec<u64>,
    /// A repair of a run of blocks failed: repair one block at a time.
    pub single: bool,
    /// Bad blocks no peer could repair in this step.
    pub unrepairable: Vec<u64>,
    /// The pass the step belongs to (a cancelled pass's steps finish, but
    /// count for nothing).
    pass: u64,
}

/// A range to read again: its bad blocks were repaired, or found
/// unrepairable (they are then left out of the comparison with peers).
#[derive(Debug, Clone)]
pub struct Retry {
    first: u64,
    n: u64,
    attempts: u16,
    counted: Vec<u64>,
    unrepairable: Vec<u64>,
}

pub struct Scrub {
    pub blocks: u64,
    /// Bytes per second, 0 = unlimited.
    pub rate: u64,
    /// Seconds between passes, 0 = only when asked.
    pub interval: u64,
    saved: Saved,
    /// Next block to start a step at.
    next: u64,
    /// Ranges to read again.
    retry: Vec<Retry>,
    pub steps: IdMap<u64, Step>,
    /// Bumped when a pass starts or ends.
    pass_id: u64,
    tokens: f64,
    changed: bool,
    /// A save was handed to the saver in this run.
    issued: bool,
    /// Findings to save at the next tick, not in 5 s.
    urgent: bool,
    last_save: Instant,
    /// Writes `DIR/scrub` off the event loop.
    saver: Saver,
    /// Findings of steps of a cancelled pass go here, and nowhere.
    scratch: Tally,
    /// Bytes checked, measured for the rate shown: since this run of the
    /// pass began (start, resume, restart), and a smoothed rate.
    run_mark: (Instant, u64),
    rate_mark: (Instant, u64),
    shown_rate: f64,
}

impl Scrub {
    /// Load `DIR/scrub`, or start a fresh record (the schedule counts from
    /// now). A damaged file is logged and replaced: it holds no data, only
    /// progress, and refusing to serve over it would help nobody.
    /// On a secondary (`primary` false) a pass left running or paused is
    /// ended: its primary scrubs it now, and what the pass saw before is
    /// another history's.
    pub fn open(
        dir: &Path,
        blocks: u64,
        rate: u64,
        interval: u64,
        now: Instant,
        primary: bool,
    ) -> Scrub {
        let path = dir.join(FILE);
        let path_for_saver = path.clone();
        let fresh = Saved {
            version: 1,
            state: State::Idle,
            cursor: 0,
            done_ahead: BTreeSet::new(),
            seen_bad: BTreeSet::new(),
            started: 0,
            since: unix_now(),
            pass: Tally::default(),
            last: None,
            last_complete: None,
        };
        let (saved, changed) = match std::fs::read(&path) {
            Ok(b) => match serde_json::from_slice::<Saved>(&b) {
                Ok(s) if s.version == 1 && s.cursor <= blocks => (s, false),
                Ok(_) | Err(_) => {
                    crate::elog!(
                        "nbdmirror: {} is damaged or from another version; scrub progress and \
                         the last result are forgotten (a scheduled scrub counts from now)",
                        path.display()
                    );
                    (fresh, true)
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => (fresh, true),
            Err(e) => {
                crate::elog!(
                    "nbdmirror: cannot read {}: {e}; scrub progress is forgotten",
                    path.display()
                );
                (fresh, true)
            }
        };
        let next = saved.cursor;
        let mut s = Scrub {
            blocks,
            rate,
            interval,
            saved,
            next,
            retry: Vec::new(),
            steps: IdMap::default(),
            pass_id: 1,
            tokens: 0.0,
            changed,
            issued: false,
            urgent: false,
            last_save: now,
            saver: Saver::start(path_for_saver),
            scratch: Tally::default(),
            run_mark: (now, 0),
            rate_mark: (now, 0),
            shown_rate: 0.0,
        };
        s.mark_run(now);
        if s.saved.state != State::Idle && !primary {
            let _ = s.abandon("ended: this node serves as a secondary now (its primary scrubs it)");
        } else if s.saved.state != State::Idle {
            crate::elog!(
                "nbdmirror: a scrub was {} at {:.1}% when this node stopped; it {}",
                if s.saved.state == State::Running {
                    "running"
                } else {
                    "paused"
                },
                s.percent(),
                if s.saved.state == State::Running {
                    "resumes there"
                } else {
                    "stays paused (`nbdmirror scrub resume`)"
                }
            );
        }
        if s.changed {
            s.save();
        }
        s
    }

    pub fn state(&self) -> State {
        self.saved.state
    }

    pub fn running(&self) -> bool {
        self.saved.state == State::Running
    }

    pub fn owns(&self, rid: u64) -> bool {
        self.steps.contains_key(&rid)
    }

    /// The findings of the pass step `rid` belongs to, to add to (a
    /// scratch tally for a step of a cancelled pass). `finding`: saved at
    /// the next tick rather than within 5 s.
    pub fn tally_of(&mut self, rid: u64, finding: bool) -> &mut Tally {
        if self.steps.get(&rid).is_some_and(|s| s.pass == self.pass_id) {
            self.changed = true;
            self.urgent |= finding;
            &mut self.saved.pass
        } else {
            self.scratch = Tally::default();
            &mut self.scratch
        }
    }

    /// Whether step `rid` belongs to the current pass.
    pub fn is_current(&self, rid: u64) -> bool {
        self.steps.get(&rid).is_some_and(|s| s.pass == self.pass_id)
    }

    /// Whether bad block `b` is new to this pass (and remember it).
    pub fn first_sighting(&mut self, b: u64) -> bool {
        if self.saved.seen_bad.len() >= SEEN_MAX {
            return !self.saved.seen_bad.contains(&b);
        }
        self.saved.seen_bad.insert(b)
    }

    fn checked_bytes(&self) -> u64 {
        self.saved.pass.checked_blocks * BLOCK
    }

    /// The rate shown starts afresh from here.
    fn mark_run(&mut self, now: Instant) {
        let c = self.checked_bytes();
        self.run_mark = (now, c);
        self.rate_mark = (now, c);
        self.shown_rate = 0.0;
    }

    /// Bytes per second shown: the average since this run of the pass
    /// began for its first 5 s, then a smoothed rate.
    fn rate_now(&self, now: Instant) -> u64 {
        let r = self.measured_rate(now);
        // The bucket lets a step or two through at once after a start or
        // a resume: never show more than the cap.
        if self.rate > 0 {
            r.min(self.rate)
        } else {
            r
        }
    }

    fn measured_rate(&self, now: Instant) -> u64 {
        if !self.running() {
            return 0;
        }
        let el = now.saturating_duration_since(self.run_mark.0).as_secs_f64();
        if el < 5.0 {
            if el < 0.2 {
                return 0;
            }
            return (self.checked_bytes().saturating_sub(self.run_mark.1) as f64 / el) as u64;
        }
        self.shown_rate.max(0.0).round() as u64
    }

    fn percent(&self) -> f64 {
        if self.blocks == 0 {
            100.0
        } else {
            self.cursor() as f64 * 100.0 / self.blocks as f64
        }
    }

    /// Every block before this was scrubbed in this pass.
    pub fn cursor(&self) -> u64 {
        self.steps
            .values()
            .filter(|s| s.pass == self.pass_id)
            .map(|s| s.first)
            .chain(self.retry.iter().map(|r| r.first))
            .min()
            .unwrap_or(self.next)
            .min(self.next)
    }

    /// When the last complete pass finished (unix seconds), if one did.
    pub fn last_complete(&self) -> Option<u64> {
        last_complete_of(&self.saved)
    }

    /// When the next scheduled pass is due (unix seconds), if scheduled:
    /// an interval after the last complete pass (or after scrubbing was
    /// first known), so that cancelling a pass does not put the next full
    /// check off by a whole interval (a tester's find); but a cancelled
    /// pass is not started again at once: not before `RETRY_CANCELLED`
    /// (or the interval, if shorter) after the cancel.
    pub fn due(&self) -> Option<u64> {
        if self.interval == 0 {
            return None;
        }
        let from = self.last_complete().unwrap_or(self.saved.since);
        let mut due = from.saturating_add(self.interval);
        if let Some(l) = self.saved.last.as_ref().filter(|l| !l.complete) {
            due = due.max(
                l.finished
                    .saturating_add(self.interval.min(RETRY_CANCELLED)),
            );
        }
        Some(due)
    }

    pub fn start(&mut self, now: Instant) -> Result<(), String> {
        match self.saved.state {
            State::Running => {
                // `scrub start --wait` recognises this prefix
                // ([`ALREADY_RUNNING`]) and waits for that pass instead.
                return Err(format!("{ALREADY_RUNNING} ({:.1}% done)", self.percent()));
            }
            State::Paused => {
                return Err(format!(
                    "a scrub is paused at {:.1}%: `nbdmirror scrub resume` continues it, \
                     `nbdmirror scrub cancel` ends it",
                    self.percent()
                ))
            }
            State::Idle => {}
        }
        self.saved.state = State::Running;
        self.saved.cursor = 0;
        self.saved.done_ahead.clear();
        self.saved.seen_bad.clear();
        self.saved.started = unix_now();
        self.saved.pass = Tally::default();
        self.next = 0;
        self.retry.clear();
        self.pass_id += 1;
        self.mark_run(now);
        self.changed = true;
        self.save();
        Ok(())
    }

    pub fn pause(&mut self) -> Result<(), String> {
        match self.saved.state {
            State::Running => {
                self.saved.state = State::Paused;
                self.changed = true;
                self.save();
                Ok(())
            }
            State::Paused => Err("the scrub is already paused".into()),
            State::Idle => Err("no scrub is running".into()),
        }
    }

    pub fn resume(&mut self, now: Instant) -> Result<(), String> {
        match self.saved.state {
            State::Paused => {
                self.saved.state = State::Running;
                self.mark_run(now);
                self.changed = true;
                self.save();
                Ok(())
            }
            State::Running => Err("the scrub is not paused".into()),
            State::Idle => Err("no scrub to resume: `nbdmirror scrub start` starts one".into()),
        }
    }

    /// End the pass now (recorded as incomplete); steps in flight finish
    /// and count for nothing.
    pub fn cancel(&mut self) -> Result<(), String> {
        self.abandon("cancelled")
    }

    /// End a running or paused pass, recorded as incomplete, saying `why`.
    pub fn abandon(&mut self, why: &str) -> Result<(), String> {
        if self.saved.state == State::Idle {
            return Err("no scrub is running".into());
        }
        crate::elog!(
            "nbdmirror: scrub {why} at {:.1}%: {}",
            self.percent(),
            summary(&self.saved.pass)
        );
        self.end(false);
        Ok(())
    }

    /// The pass is over: record it, go idle.
    fn end(&mut self, complete: bool) {
        let pass = std::mem::take(&mut self.saved.pass);
        let finished = unix_now();
        self.saved.last_complete = if complete {
            Some(finished)
        } else {
            last_complete_of(&self.saved)
        };
        self.saved.last = Some(Outcome {
            started: self.saved.started,
            finished,
            complete,
            tally: pass,
        });
        self.saved.state = State::Idle;
        self.saved.cursor = 0;
        self.saved.done_ahead.clear();
        self.saved.seen_bad.clear();
        self.next = 0;
        self.retry.clear();
        self.pass_id += 1;
        self.changed = true;
        self.save();
    }

    /// Refill the rate bucket; start a scheduled pass when one is due.
    pub fn tick(&mut self, now: Instant, dt: f64, may_start: bool) {
        super::refill(&mut self.tokens, self.rate, dt, STEP_BLOCKS * BLOCK);
        let checked = self.checked_bytes();
        let el = now
            .saturating_duration_since(self.rate_mark.0)
            .as_secs_f64();
        if el >= 1.0 {
            let inst = checked.saturating_sub(self.rate_mark.1) as f64 / el;
            let alpha = 1.0 - (-el / 3.0).exp();
            self.shown_rate += alpha * (inst - self.shown_rate);
            self.rate_mark = (now, checked);
        }
        if may_start && self.saved.state == State::Idle {
            if let Some(due) = self.due() {
                if unix_now() >= due {
                    crate::elog!(
                        "nbdmirror: scheduled scrub starting (every {}; `nbdmirror scrub status` \
                         shows its progress)",
                        human_secs(self.interval)
                    );
                    let _ = self.start(now);
                }
            }
        }
        if self.changed
            && (self.urgent || now.saturating_duration_since(self.last_save) >= SAVE_EVERY)
        {
            self.save();
            self.last_save = now;
        }
    }

    /// The next range to read (first block, count), if the window, the
    /// rate cap and the pass allow one. [`Scrub::begin`] takes it.
    pub fn next_range(&self) -> Option<(u64, u64)> {
        if self.saved.state != State::Running || self.steps.len() >= WINDOW {
            return None;
        }
        if self.rate > 0 && self.tokens <= 0.0 {
            return None;
        }
        if let Some(r) = self.retry.first() {
            return Some((r.first, r.n));
        }
        let next = self.next_new();
        (next < self.blocks).then(|| (next, (self.blocks - next).min(STEP_BLOCKS)))
    }

    /// The first block of the next step not done yet in this pass.
    fn next_new(&self) -> u64 {
        let mut next = self.next;
        while self.saved.done_ahead.contains(&next) {
            next += STEP_BLOCKS;
        }
        next
    }

    /// The range `next_range` gave starts as request `rid`.
    pub fn begin(&mut self, rid: u64) {
        let r = if self.retry.is_empty() {
            let first = self.next_new();
            let n = (self.blocks - first).min(STEP_BLOCKS);
            self.next = first + n;
            Retry {
                first,
                n,
                attempts: 0,
                counted: Vec::new(),
                unrepairable: Vec::new(),
            }
        } else {
            self.retry.remove(0)
        };
        if self.rate > 0 {
            self.tokens -= (r.n * BLOCK) as f64;
        }
        self.steps.insert(
            rid,
            Step {
                first: r.first,
                n: r.n,
                phase: Phase::Reading,
                locked: true,
                ours: Vec::new(),
                waiting: 0,
                verified: Vec::new(),
                attempts: r.attempts,
                bad: Vec::new(),
                counted: r.counted,
                single: false,
                unrepairable: r.unrepairable,
                pass: self.pass_id,
            },
        );
    }

    /// Step `rid` is done: its blocks count as checked (unless its pass
    /// was cancelled meanwhile). Ends the pass when nothing is left.
    pub fn complete(&mut self, rid: u64) {
        let Some(s) = self.steps.remove(&rid) else {
            return;
        };
        if s.pass != self.pass_id {
            return;
        }
        self.changed = true;
        let pass = &mut self.saved.pass;
        pass.checked_blocks += s.n;
        for (id, k) in s.verified {
            pass.peer(id).checked_blocks += k;
        }
        self.saved.done_ahead.insert(s.first);
        self.maybe_end();
    }

    /// Step `rid` is read again later, from the start (under its lock).
    pub fn again(&mut self, rid: u64) {
        if let Some(s) = self.steps.remove(&rid) {
            if s.pass == self.pass_id {
                self.retry.push(Retry {
                    first: s.first,
                    n: s.n,
                    attempts: s.attempts,
                    counted: s.counted,
                    unrepairable: s.unrepairable,
                });
            }
        }
    }

    fn maybe_end(&mut self) {
        if self.saved.state == State::Idle
            || self.next_new() < self.blocks
            || self.steps.values().any(|s| s.pass == self.pass_id)
            || !self.retry.is_empty()
        {
            return;
        }
        let started = self.saved.started;
        let took = unix_now().saturating_sub(started);
        crate::elog!(
            "nbdmirror: scrub finished in {}: {}",
            human_secs(took),
            summary(&self.saved.pass)
        );
        self.end(true);
    }

    /// Write `DIR/scrub` (temporary file, fsync, rename), off the event
    /// loop: the saver thread writes the newest record it was given. A
    /// failure is logged there, once: the scrub goes on, and only its
    /// resume point is older.
    pub fn save(&mut self) {
        self.save_with(false);
    }

    /// As [`Scrub::save`], returning once the record is on disk (at a clean
    /// stop).
    pub fn save_and_wait(&mut self) {
        // An idle scrub with nothing new has nothing to record (a full
        // filesystem made every stop log a failed save of a scrub that
        // never ran).
        // (Once a save was issued, this one also waits for it.)
        if self.saved.state == State::Idle && !self.changed && !self.issued {
            return;
        }
        self.save_with(true);
    }

    fn save_with(&mut self, wait: bool) {
        let c = self.cursor();
        self.saved.cursor = c;
        self.saved.done_ahead = self.saved.done_ahead.split_off(&c);
        if let Ok(body) = serde_json::to_vec(&self.saved) {
            self.saver.write(body, wait);
            self.issued = true;
        }
        self.changed = false;
        self.urgent = false;
    }

    pub fn json(&self, now: Instant) -> serde_json::Value {
        use serde_json::json;
        let cursor = self.cursor();
        let idle = self.saved.state == State::Idle;
        json!({
            "state": self.saved.state,
            "position_bytes": cursor * BLOCK,
            "total_bytes": self.blocks * BLOCK,
            "rate_bytes_per_sec": self.rate_now(now),
            "rate_limit": self.rate,
            "interval_secs": self.interval,
            "started_at": (self.saved.state != State::Idle).then_some(self.saved.started),
            // While a pass runs, the next is due only after it ends.
            "next_at": if idle { self.due() } else { None },
            "last_complete_at": self.last_complete(),
            "current": (self.saved.state != State::Idle).then(|| self.saved.pass.json()),
            "last": self.saved.last.as_ref().map(|l| json!({
                "started_at": l.started,
                "finished_at": l.finished,
                "complete": l.complete,
                "clean": l.tally.clean(),
                "found": l.tally.json(),
            })),
        })
    }
}

fn last_complete_of(s: &Saved) -> Option<u64> {
    s.last_complete
        .or_else(|| s.last.as_ref().filter(|l| l.complete).map(|l| l.finished))
}

/// What `DIR/scrub` says, in one line for `nbdmirror info` (None when
/// there is no record).
pub fn describe(dir: &Path) -> Option<String> {
    let b = std::fs::read(dir.join(FILE)).ok()?;
    let Ok(s) = serde_json::from_slice::<Saved>(&b) else {
        return Some("unreadable record (replaced at the next start)".into());
    };
    let mut out = match s.state {
        State::Idle => String::from("idle"),
        State::Running | State::Paused => format!(
            "{} at block {} (started {})",
            if s.state == State::Running {
                "running"
            } else {
                "paused"
            },
            s.cursor,
            utc(s.started)
        ),
    };
    match &s.last {
        Some(l) => out.push_str(&format!(
            "; last {} {}: {}",
            if l.complete { "finished" } else { "cancelled" },
            utc(l.finished),
            summary(&l.tally)
        )),
        None => out.push_str("; none finished yet"),
    }
    if s.last.as_ref().is_some_and(|l| !l.complete) {
        match last_complete_of(&s) {
            Some(t) => out.push_str(&format!("; last complete pass {}", utc(t))),
            None => out.push_str("; no complete pass yet"),
        }
    }
    Some(out)
}

/// The checksum of each 4 KiB block of `data` (block `first` onwards), or
/// `other` for the blocks `skip` names (and a short last piece).
pub fn checksums_of(first: u64, data: &[u8], skip: &[u64], other: u64) -> Vec<u64> {
    data.chunks(BLOCK as usize)
        .enumerate()
        .map(|(k, b)| {
            let blk = first + k as u64;
            if skip.contains(&blk) || b.len() != BLOCK as usize {
                other
            } else {
                crate::store::checksum::block_checksum(blk, b)
            }
        })
        .collect()
}

/// Unix time `t` as a UTC date and time.
pub fn utc(t: u64) -> String {
    // Civil date from days since 1970 (Howard Hinnant's algorithm), UTC.
    let (days, secs) = ((t / 86_400) as i64, t % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// The thread that writes `DIR/scrub`: records arrive in order, and only
/// the newest of those waiting is written.
struct Saver {
    tx: crossbeam_channel::Sender<(Vec<u8>, Option<crossbeam_channel::Sender<()>>)>,
}

impl Saver {
    fn start(path: PathBuf) -> Saver {
        let (tx, rx) =
            crossbeam_channel::unbounded::<(Vec<u8>, Option<crossbeam_channel::Sender<()>>)>();
        let spawned = std::thread::Builder::new()
            .name("scrub-saver".into())
            .spawn(move || {
                // Signals are the event loop's (a signalfd): never this
                // thread's, whatever mask it was started with.
                // SAFETY: a zeroed sigset_t filled by sigfillset is valid.
                unsafe {
                    let mut all: libc::sigset_t = std::mem::zeroed();
                    libc::sigfillset(&mut all);
                    libc::pthread_sigmask(libc::SIG_BLOCK, &all, std::ptr::null_mut());
                }
                let mut said: Option<String> = None;
                while let Ok(mut job) = rx.recv() {
                    let mut acks = Vec::new();
                    while let Ok(newer) = rx.try_recv() {
                        acks.extend(job.1.take());
                        job = newer;
                    }
                    acks.extend(job.1.take());
                    if let Err(e) = write_atomically(&path, &job.0) {
                        let e = e.to_string();
                        if said.as_deref() != Some(&e) {
                            crate::elog!(
                                "nbdmirror: cannot save {}: {e}; the scrub goes on, but a \
                                 restart would forget its progress",
                                path.display()
                            );
                            said = Some(e);
                        }
                    } else {
                        said = None;
                    }
                    for a in acks {
                        let _ = a.send(());
                    }
                }
            });
        if let Err(e) = spawned {
            crate::elog!("nbdmirror: cannot start the scrub record's writer: {e}");
        }
        Saver { tx }
    }

    /// Hand `body` to the thread; with `wait`, return once it is written.
    fn write(&self, body: Vec<u8>, wait: bool) {
        if wait {
            let (atx, arx) = crossbeam_channel::bounded(1);
            if self.tx.send((body, Some(atx))).is_ok() {
                let _ = arx.recv_timeout(Duration::from_secs(10));
            }
        } else {
            let _ = self.tx.send((body, None));
        }
    }
}

fn write_atomically(path: &Path, body: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let tmp = path.with_extension("tmp");
    let r = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(body)?;
        f.sync_data()?;
        std::fs::rename(&tmp, path)
    })();
    if r.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    r
}

/// One line: what a pass found.
pub fn summary(t: &Tally) -> String {
    let mut s = format!(
        "{} blocks checked; {} bad on this node",
        t.checked_blocks, t.bad_blocks
    );
    let more = t.unrepaired_count.saturating_sub(t.unrepaired.len() as u64);
    if t.bad_blocks > 0 {
        s.push_str(&format!(
            " ({} repaired from a peer, {} not",
            t.repaired_blocks, t.unrepaired_count
        ));
        if !t.unrepaired.is_empty() {
            let list: Vec<String> = t.unrepaired.iter().map(|b| b.to_string()).collect();
            s.push_str(&format!(": blocks {}", list.join(", ")));
            if more > 0 {
                s.push_str(&format!(" and {more} more"));
            }
        }
        s.push(')');
    }
    if t.read_errors > 0 {
        s.push_str(&format!("; {} read errors", t.read_errors));
    }
    for (id, p) in &t.peers {
        s.push_str(&format!(
            "; peer {id}: {} blocks compared, {} bad there, {} differing",
            p.checked_blocks, p.bad_blocks, p.differing_blocks
        ));
        if p.bad_blocks + p.differing_blocks > 0 {
            s.push_str(" (resent from here)");
        }
        if p.skipped_blocks > 0 {
            s.push_str(&format!(", {} not compared", p.skipped_blocks));
        }
    }
    s
}

pub fn human_secs(s: u64) -> String {
    if s >= 86_400 && s.is_multiple_of(86_400) {
        format!("{}d", s / 86_400)
    } else if s >= 3600 && s.is_multiple_of(3600) {
        format!("{}h", s / 3600)
    } else if s >= 60 && s.is_multiple_of(60) {
        format!("{}m", s / 60)
    } else {
        format!("{s}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(name: &str) -> crate::testdir::TestDir {
        crate::testdir::TestDir::new(&format!("scrub-{name}"))
    }

    #[test]
    fn a_pass_walks_every_block_once_and_resumes_after_a_restart() {
        let d = dir("walk");
        let t = Instant::now();
        let mut s = Scrub::open(&d, 1000, 0, 0, t, true);
        assert_eq!(s.state(), State::Idle);
        s.start(t).unwrap();
        assert!(s.start(t).is_err());
        let mut rid = 1;
        // Two steps, the second finishing first: the resume point is the
        // first one's start.
        let a = s.next_range().unwrap();
        s.begin(rid);
        let b = s.next_range().unwrap();
        s.begin(rid + 1);
        assert_eq!((a.0, b.0), (0, 256));
        s.complete(rid + 1);
        assert_eq!(s.cursor(), 0);
        s.save_and_wait();
        let mut s2 = Scrub::open(&d, 1000, 0, 0, t, true);
        assert_eq!(s2.state(), State::Running);
        // Resumed: step 0 again, then not step 1 (done), but step 2.
        assert_eq!(s2.next_range(), Some((0, 256)));
        s2.begin(1);
        assert_eq!(s2.next_range(), Some((512, 256)));
        s.complete(rid);
        assert_eq!(s.cursor(), 512);
        rid += 2;
        // A repaired step is read again before anything new.
        assert_eq!(s.next_range(), Some((512, 256)));
        s.begin(rid);
        s.steps.get_mut(&rid).unwrap().attempts = 1;
        s.again(rid);
        assert_eq!(s.next_range(), Some((512, 256)));
        rid += 1;
        s.begin(rid);
        assert_eq!(s.steps[&rid].attempts, 1);
        s.complete(rid);
        while s.next_range().is_some() {
            rid += 1;
            s.begin(rid);
            s.complete(rid);
        }
        assert_eq!(s.state(), State::Idle);
        let last = s.saved.last.clone().unwrap();
        assert!(last.complete);
        assert_eq!(last.tally.checked_blocks, 1000);
        // And the record survives a restart.
        s.save_and_wait();
        s2 = Scrub::open(&d, 1000, 0, 0, t, true);
        assert_eq!(s2.saved.last, Some(last));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_damaged_record_is_replaced_and_schedules_count_from_the_last_pass() {
        let d = dir("damaged");
        std::fs::write(d.join(FILE), b"{not json").unwrap();
        let t = Instant::now();
        let mut s = Scrub::open(&d, 10, 0, 3600, t, true);
        assert_eq!(s.state(), State::Idle);
        let since = s.saved.since;
        assert_eq!(s.due(), Some(since + 3600));
        s.start(t).unwrap();
        s.cancel().unwrap();
        let fin = s.saved.last.as_ref().unwrap().finished;
        assert_eq!(s.due(), Some(fin + 3600));
        assert!(!s.saved.last.as_ref().unwrap().complete);
        // Pause and resume keep the pass.
        s.start(t).unwrap();
        s.pause().unwrap();
        assert!(s.start(t).is_err());
        assert_eq!(s.next_range(), None);
        s.resume(t).unwrap();
        assert_eq!(s.next_range(), Some((0, 10)));
        // A cancelled pass's step counts for nothing in the next one.
        s.begin(7);
        s.cancel().unwrap();
        s.start(t).unwrap();
        s.complete(7);
        assert_eq!(s.saved.pass.checked_blocks, 0);
        assert_eq!(s.state(), State::Running);
        // A secondary does not carry a pass on.
        s.save_and_wait();
        let s3 = Scrub::open(&d, 10, 0, 3600, t, false);
        assert_eq!(s3.state(), State::Idle);
        assert!(!s3.saved.last.as_ref().unwrap().complete);
        let _ = std::fs::remove_dir_all(&d);
    }

    /// A cancelled pass neither puts the next scheduled one off by a whole
    /// interval nor hides when the last complete pass ran (a tester's
    /// find); a pass cancelled when it was due is tried again a day later.
    #[test]
    fn a_cancelled_pass_keeps_the_schedule_of_the_last_complete_one() {
        let d = dir("cancel");
        let t = Instant::now();
        let month = 30 * 86_400;
        let mut s = Scrub::open(&d, 10, 0, month, t, true);
        s.start(t).unwrap();
        let mut rid = 1;
        while s.next_range().is_some() {
            s.begin(rid);
            s.complete(rid);
            rid += 1;
        }
        assert!(s.saved.last.as_ref().unwrap().complete);
        let fin = s.last_complete().unwrap();
        assert_eq!(s.due(), Some(fin + month));
        s.start(t).unwrap();
        s.cancel().unwrap();
        assert_eq!(s.last_complete(), Some(fin));
        assert_eq!(s.due(), Some(fin + month));
        let j = s.json(t);
        assert_eq!(j["last_complete_at"].as_u64(), Some(fin), "{j}");
        assert_eq!(j["last"]["complete"].as_bool(), Some(false), "{j}");
        s.save_and_wait();
        let desc = describe(&d).unwrap();
        assert!(desc.contains("last complete pass"), "{desc}");
        // Kept across a restart.
        let mut s = Scrub::open(&d, 10, 0, month, t, true);
        assert_eq!(s.last_complete(), Some(fin));
        // The scheduled pass itself cancelled, a month later: a day later.
        s.saved.last.as_mut().unwrap().finished = fin + month;
        assert_eq!(s.due(), Some(fin + month + 86_400));
        // A record from before `last_complete` was kept: its complete `last`.
        s.saved.last_complete = None;
        s.saved.last.as_mut().unwrap().complete = true;
        assert_eq!(s.last_complete(), Some(fin + month));
    }

    #[test]
    fn dates() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_795_717_096), "2026-11-26 18:18:16 UTC");
    }

    #[test]
    fn the_rate_cap_holds_back_steps() {
        let d = dir("rate");
        let t = Instant::now();
        let mut s = Scrub::open(&d, 100_000, 1 << 20, 0, t, true);
        s.start(t).unwrap();
        // No tokens yet.
        assert_eq!(s.next_range(), None);
        s.tick(t + Duration::from_secs(1), 1.0, false);
        assert!(s.next_range().is_some());
        s.begin(1);
        assert_eq!(s.next_range(), None);
        let _ = std::fs::remove_dir_all(&d);
    }
}
