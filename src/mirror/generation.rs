//! Data generation ids: which history a replica's contents belong to.
//!
//! Owns the file `DIR/generation` of every replica and the rule that decides,
//! at connect time, whether a peer's data may be resynced from this primary
//! or whether the two diverged (split brain), which is never resolved
//! silently. After DRBD's generation UUIDs, reduced to what fixed roles need:
//!
//! - A primary's replica has a `current` generation it created and writes
//!   under (`FLAG_PRIMARY`). A replica that was following another primary
//!   (a secondary) and is now served as a primary is *promoted*: it starts a
//!   new generation and keeps the one it followed as `previous`.
//! - A secondary adopts its primary's `current` once it is in sync, so its
//!   data is known to be that generation's.
//! - A primary that stops cleanly with every peer in sync *hands over*:
//!   it moves to a fresh generation, has every peer adopt it and flush,
//!   then marks it `FLAG_HANDED_OVER`. It wrote nothing those peers lack,
//!   so one of them, promoted, may take it back as a secondary (comparing
//!   every block) instead of calling it split brain; a node that was not
//!   in sync then holds an older generation and is still refused. The mark
//!   is cleared before the replica serves as a primary again, and a
//!   secondary drops its primary flag before it takes a session's records.
//!
//! - A secondary also records the *session* token of the last primary
//!   session it accepted records in (the primary keeps the token it gave
//!   each peer in that peer's bitmap). A mismatch at connect means someone
//!   else wrote to the peer since, e.g. a copy of the primary's directory
//!   serving while the primary was away: the primary compares checksums.
//!
//! - A primary's generation has *runs* (`epoch`, from 1 at its first start
//!   or promotion): it moves to the next before the first client write
//!   after a restart or after a peer left the in-sync set
//!   (`Mirror::advance_run`). A secondary records the run with the
//!   generation when in sync, or with the first record of that run it
//!   takes while resynced; a promoted node keeps the run it had recorded
//!   (`from_epoch`). A peer holding the generation a node was promoted
//!   from, in a later run, holds writes that node never saw: split brain,
//!   not a compare (docs/mirroring.md, "Runs").
//!
//! Layout (little-endian, 48 bytes): magic `NMGEN002`, current u64, previous
//! u64, flags u32, epoch u32 (reserved zero before runs: older binaries
//! read the file and ignore it), session u64, xxh3-64 of bytes 0..40
//! (`NMGEN003` while `FLAG_HANDED_OVER` is set, `NMGEN004` while
//! `FLAG_INCONSISTENT` is, so older binaries refuse those). A promoted
//! primary that knows `from_epoch` writes 56 bytes: the same up to
//! session, from_epoch u32, reserved u32, xxh3-64 of bytes 0..48 (older
//! binaries refuse it). The first format (`NMGEN001`, 40 bytes, no
//! session, checksum at 32..40) is still read (session and runs 0). Written whole to a temporary file, synced and
//! renamed. A missing file is generation 0 (a replica that never served or
//! followed anyone); a damaged one is refused.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

const MAGIC_V1: &[u8; 8] = b"NMGEN001";
const LEN_V1: usize = 40;
const MAGIC: &[u8; 8] = b"NMGEN002";
/// The same layout, written while `FLAG_HANDED_OVER` is set, so that a
/// binary that does not know the flag refuses the file instead of serving
/// as the primary of a generation it handed over (and keeping the mark).
const MAGIC_HANDED_OVER: &[u8; 8] = b"NMGEN003";
/// The same layout, written while `FLAG_INCONSISTENT` is set, so that a
/// binary that does not know the flag refuses the file instead of
/// promoting a half-resynced replica.
const MAGIC_INCONSISTENT: &[u8; 8] = b"NMGEN004";
const LEN_V2: usize = 48;
const LEN: usize = 56;
/// This replica writes (wrote) as the primary of `current`.
pub const FLAG_PRIMARY: u32 = 1;
/// With `FLAG_PRIMARY`: the primary stopped cleanly with every peer in sync
/// and nothing dirty, so its data is exactly what its peers hold: a peer
/// promoted after that may take it back as a follower of `current` (a
/// planned switchover). Cleared, durably, before it serves as a primary
/// again.
pub const FLAG_HANDED_OVER: u32 = 2;
/// A secondary took records from its primary before the primary reported
/// it in sync (resync data, or live writes over a disk that misses older
/// ones), or resync records on an in-sync link (`resync start --full`), and
/// has not been told it is in sync since:
/// its blocks are a mix of old and new that matches no moment of any
/// history (DRBD's Inconsistent). Set durably before the first such record
/// is applied, cleared when the primary announces its generation. Resync
/// data of another generation than the replica's makes that generation its
/// `current` (the old one its `previous`) at the same moment: it is a half
/// copy of it. Such a replica is not promoted without `serve
/// --force-inconsistent`; the primary it came from resumes it, one promoted
/// from that generation compares every block (unless it holds a later run
/// of it: [`judge`]), and any other is refused as split brain, as it would
/// be by a consistent replica of that generation.
pub const FLAG_INCONSISTENT: u32 = 4;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Generation {
    pub current: u64,
    pub previous: u64,
    pub flags: u32,
    /// The last primary session this replica accepted records in (0: none).
    pub session: u64,
    /// A primary: the run of `current` it writes under (from 1). A
    /// secondary: the run it recorded (in sync, or records of it taken
    /// while resynced). 0: unknown (written by an older binary).
    pub epoch: u32,
    /// A promoted primary: the run of `previous` it had followed when it
    /// was promoted (0: unknown).
    pub from_epoch: u32,
}

fn path(dir: &Path) -> PathBuf {
    dir.join("generation")
}

impl Generation {
    pub fn load(dir: &Path) -> Result<Generation, String> {
        let p = path(dir);
        let b = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Generation::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        };
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        let u32_at = |at: usize| u32::from_le_bytes(b[at..at + 4].try_into().unwrap());
        let magic_ok = |m: &[u8]| m == MAGIC || m == MAGIC_HANDED_OVER || m == MAGIC_INCONSISTENT;
        let intact = match b.len() {
            LEN_V1 => &b[0..8] == MAGIC_V1 && xxh3_64(&b[0..32]) == u64_at(32),
            LEN_V2 => magic_ok(&b[0..8]) && xxh3_64(&b[0..40]) == u64_at(40),
            LEN => magic_ok(&b[0..8]) && xxh3_64(&b[0..48]) == u64_at(48),
            _ => false,
        };
        if !intact {
            return Err(format!(
                "{} is damaged; it says which data history this replica holds, so it is not \
                 guessed: restore it, or re-initialise this replica and let it resync",
                p.display()
            ));
        }
        Ok(Generation {
            current: u64_at(8),
            previous: u64_at(16),
            flags: u32::from_le_bytes(b[24..28].try_into().unwrap()),
            session: if b.len() == LEN_V1 { 0 } else { u64_at(32) },
            epoch: if b.len() == LEN_V1 { 0 } else { u32_at(28) },
            from_epoch: if b.len() == LEN && u32_at(24) & FLAG_PRIMARY != 0 {
                u32_at(40)
            } else {
                0
            },
        })
    }

    pub fn store(&self, dir: &Path) -> Result<(), String> {
        // The 48-byte layout (older binaries read it and ignore the run)
        // unless a promoted primary's `from_epoch` must be kept.
        let long = self.flags & FLAG_PRIMARY != 0 && self.from_epoch != 0;
        let mut b = [0u8; LEN];
        b[0..8].copy_from_slice(if self.flags & FLAG_HANDED_OVER != 0 {
            MAGIC_HANDED_OVER
        } else if self.flags & FLAG_INCONSISTENT != 0 {
            MAGIC_INCONSISTENT
        } else {
            MAGIC
        });
        b[8..16].copy_from_slice(&self.current.to_le_bytes());
        b[16..24].copy_from_slice(&self.previous.to_le_bytes());
        b[24..28].copy_from_slice(&self.flags.to_le_bytes());
        b[28..32].copy_from_slice(&self.epoch.to_le_bytes());
        b[32..40].copy_from_slice(&self.session.to_le_bytes());
        if !long {
            let sum = xxh3_64(&b[0..40]);
            b[40..48].copy_from_slice(&sum.to_le_bytes());
            return write_synced(dir, "generation", &b[..LEN_V2]);
        }
        b[40..44].copy_from_slice(&self.from_epoch.to_le_bytes());
        let sum = xxh3_64(&b[0..48]);
        b[48..56].copy_from_slice(&sum.to_le_bytes());
        write_synced(dir, "generation", &b)
    }

    /// The generation a primary serves under: a fresh replica gets its first
    /// generation, a replica that was following another primary is promoted
    /// (a new generation after the one it followed). Returns the generation
    /// and what happened, for the log.
    pub fn for_primary(self, fresh: u64) -> (Generation, Option<String>) {
        if self.current == 0 {
            let g = Generation {
                current: fresh,
                previous: 0,
                flags: FLAG_PRIMARY,
                session: 0,
                epoch: 1,
                from_epoch: 0,
            };
            return (g, Some(format!("starting data generation {fresh:016x}")));
        }
        if self.flags & FLAG_PRIMARY == 0 {
            // Forced while half a copy (`--force-inconsistent`): no history
            // of its own to continue. With the generation it was copying as
            // `previous`, every full copy of that generation would count as
            // an older state of this one and be compared, overwritten with
            // the mix (a reviewer's find); with none, a peer that holds data
            // is refused as split brain, and the operator decides.
            let half = self.flags & FLAG_INCONSISTENT != 0;
            let g = Generation {
                current: fresh,
                previous: if half { 0 } else { self.current },
                flags: FLAG_PRIMARY,
                session: 0,
                epoch: 1,
                from_epoch: if half { 0 } else { self.epoch },
            };
            let what = if half {
                format!(
                    "this replica was partway through a resync of generation {:016x} and is now \
                     served as a primary (--force-inconsistent): starting generation \
                     {fresh:016x} with no history, so a peer that holds data is refused as split \
                     brain (to give it this node's copy, re-initialise it)",
                    self.current
                )
            } else {
                format!(
                    "this replica followed generation {:016x} as a secondary and is now served as a \
                     primary: promoted, starting generation {fresh:016x}",
                    self.current
                )
            };
            return (g, Some(what));
        }
        // (Its run advances at its first write: `Mirror::advance_run`.)
        if self.flags & FLAG_HANDED_OVER != 0 {
            let g = Generation {
                flags: self.flags & !FLAG_HANDED_OVER,
                ..self
            };
            return (
                g,
                Some(format!(
                    "serving generation {:016x} as its primary again (it was handed over to the \
                     peers at the last shutdown)",
                    self.current
                )),
            );
        }
        (self, None)
    }

    /// Refuse to serve this replica as a primary while it is half
    /// resynced (`FLAG_INCONSISTENT`), unless `force`: promoted, it would
    /// copy its mix of old and new blocks over peers that hold the data.
    pub fn refuse_inconsistent_promotion(&self, force: bool) -> Result<(), String> {
        if self.flags & FLAG_INCONSISTENT == 0 || self.flags & FLAG_PRIMARY != 0 {
            return Ok(());
        }
        if force {
            crate::elog!(
                "nbdmirror: WARNING: promoting a replica that is partway through a resync \
                 (--force-inconsistent): its blocks are a mix of old and new data; peers that \
                 hold data are refused as split brain (nothing is written to them), and a peer \
                 re-initialised to follow this node is made to match it"
            );
            return Ok(());
        }
        Err(
            "this replica was partway through a resync from its primary when it last ran (it \
             took resync data and was not reported in sync since): its blocks are a mix of old \
             and new data, and served as the primary it would copy that mix over every peer, \
             including ones that hold the newer data. Promote a node that was in sync instead \
             (`nbdmirror info` shows each replica's state), or, if this replica is the only copy \
             left, pass --force-inconsistent"
                .to_string(),
        )
    }

    /// A secondary's generation once it takes resync data from a primary of
    /// another generation `g` (run `epoch`, 0: unknown): a half copy of `g`,
    /// inconsistent, its own generation kept as `previous` (see
    /// [`FLAG_INCONSISTENT`]).
    pub fn half_copy_of(self, g: u64, epoch: u32) -> Generation {
        Generation {
            current: g,
            previous: self.current,
            flags: FLAG_INCONSISTENT,
            session: self.session,
            epoch,
            from_epoch: 0,
        }
    }

    /// A secondary's generation once its primary, of generation `g`, reports
    /// it in sync: it holds `g` (the one before kept as `previous`), and is
    /// no longer inconsistent.
    /// `epoch` is the primary's run (0: unknown, an older primary).
    pub fn in_sync_with(self, g: u64, epoch: u32) -> Generation {
        if g != self.current {
            Generation {
                current: g,
                previous: self.current,
                flags: 0,
                session: self.session,
                epoch,
                from_epoch: 0,
            }
        } else {
            Generation {
                flags: self.flags & !FLAG_INCONSISTENT,
                epoch: epoch.max(self.epoch),
                ..self
            }
        }
    }

    /// Whether this replica was written as a primary of `current`: serving
    /// it as the primary again continues that history, in a new run.
    pub fn is_own_primary(&self) -> bool {
        self.current != 0 && self.flags & FLAG_PRIMARY != 0
    }

    /// The flags and run a node announces in the handshake (one field: the
    /// run in the high 32 bits, which older binaries ignore).
    pub fn wire_flags(&self) -> u64 {
        self.flags as u64 | (self.epoch as u64) << 32
    }

    /// The first step of a handover at a clean shutdown (see
    /// `FLAG_HANDED_OVER`): a primary's generation moves on to `fresh`
    /// (stored before the peers are told), so that only the peers that
    /// are in sync at the handover, and adopt `fresh`, hold it. None when
    /// this is not a primary's generation.
    pub fn handover_start(self, fresh: u64) -> Option<Generation> {
        (self.flags & FLAG_PRIMARY != 0).then_some(Generation {
            current: fresh,
            previous: self.current,
            flags: FLAG_PRIMARY,
            session: self.session,
            epoch: self.epoch,
            from_epoch: 0,
        })
    }

    /// The last step: every peer has adopted the generation and flushed.
    pub fn handed_over(self) -> Generation {
        Generation {
            flags: self.flags | FLAG_HANDED_OVER,
            ..self
        }
    }
}

/// Replace `dir/name` with `bytes` whole: written to `name.tmp`, synced,
/// renamed over it, and the directory synced.
fn write_synced(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), String> {
    let tmp = dir.join(format!("{name}.tmp"));
    let err = |e: std::io::Error| format!("cannot write {}: {e}", tmp.display());
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(bytes).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, dir.join(name)).map_err(err)?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// A primary this secondary must refuse: it was promoted from the
/// generation this replica follows while this replica went on taking
/// records from another primary of that generation (two primaries at once,
/// seen from a common peer: split brain). The records taken after it
/// appeared are missing from its history, and a compare would copy its
/// blocks over them. Kept in `DIR/diverged` (little-endian, 40 bytes: magic
/// `NMDIVG01`, the refused generation u64, the generation followed u64, the
/// refused node id u32, reserved u32, xxh3-64 of bytes 0..32), written
/// (synced) before the first such record is applied; removed only by
/// re-initialising the replica, which is the operator's decision of which
/// history to keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Diverged {
    pub generation: u64,
    pub followed: u64,
    pub node_id: u32,
}

const DIVERGED_MAGIC: &[u8; 8] = b"NMDIVG01";
const DIVERGED_LEN: usize = 40;

impl Diverged {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("diverged")
    }

    /// None when the file does not exist; an error when it is damaged.
    pub fn load(dir: &Path) -> Result<Option<Diverged>, String> {
        let p = Diverged::path(dir);
        let b = match std::fs::read(&p) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", p.display())),
        };
        let u64_at = |at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
        if b.len() != DIVERGED_LEN || &b[0..8] != DIVERGED_MAGIC || xxh3_64(&b[0..32]) != u64_at(32)
        {
            return Err(format!(
                "{} is damaged (it names a primary this replica must refuse as split brain); \
                 re-initialise the replica if its history is to be discarded",
                p.display()
            ));
        }
        Ok(Some(Diverged {
            generation: u64_at(8),
            followed: u64_at(16),
            node_id: u32::from_le_bytes(b[24..28].try_into().unwrap()),
        }))
    }

    pub fn store(&self, dir: &Path) -> Result<(), String> {
        let mut b = [0u8; DIVERGED_LEN];
        b[0..8].copy_from_slice(DIVERGED_MAGIC);
        b[8..16].copy_from_slice(&self.generation.to_le_bytes());
        b[16..24].copy_from_slice(&self.followed.to_le_bytes());
        b[24..28].copy_from_slice(&self.node_id.to_le_bytes());
        let sum = xxh3_64(&b[0..32]);
        b[32..40].copy_from_slice(&sum.to_le_bytes());
        write_synced(dir, "diverged", &b)
    }

    /// Whether a primary holding `current` (promoted from `previous`) is
    /// the refused one or descends from it.
    pub fn refuses(&self, current: u64, previous: u64) -> bool {
        current == self.generation || previous == self.generation
    }
}

/// What a primary may do with a peer, judged from both generations.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Same history (or a node that never held data): resync as usual.
    Resync,
    /// The peer holds an older generation of our history (it followed the
    /// primary we were promoted from): resync, comparing every block.
    ResyncCompare,
    /// The histories diverged: refuse, with a reason for the log.
    SplitBrain(String),
}

pub fn judge(ours: &Generation, peer: &Generation, peer_id: u32) -> Verdict {
    if peer.current == 0 {
        return Verdict::Resync;
    }
    if peer.current == ours.previous
        && peer.flags & FLAG_PRIMARY == 0
        && ours.from_epoch != 0
        && peer.epoch > ours.from_epoch
    {
        // It was in sync with a later run of the generation this node was
        // promoted from than this node had followed: that run's writes
        // (still on it, even half resynced since) are not here.
        return Verdict::SplitBrain(format!(
            "split brain: node {peer_id} was in sync with run {} of generation {:016x}, and \
             this node was promoted from run {} of it: node {peer_id} holds writes this node \
             never saw (the old primary was restarted as the primary after this node was \
             promoted, or it wrote on after this node lost touch with it; node {peer_id} should \
             have been promoted instead). Nothing was resynced either way",
            peer.epoch, peer.current, ours.from_epoch
        ));
    }
    let half = peer.flags & FLAG_INCONSISTENT != 0 && peer.flags & FLAG_PRIMARY == 0;
    if half && peer.current == ours.previous {
        // Half resynced from the generation this node was promoted from:
        // an older state of this node's history, nothing in it newer than
        // here. Compare every block.
        return Verdict::ResyncCompare;
    }
    // Half resynced from any other generation, it still holds mostly that
    // generation's data, and may be the last copy of it left
    // (`--force-inconsistent`): judged as a consistent replica of it would
    // be, so that a primary outside its history (a re-initialised node
    // started as the primary) cannot copy itself over it.
    if peer.current == ours.current {
        if peer.flags & FLAG_PRIMARY != 0 {
            return Verdict::SplitBrain(format!(
                "node {peer_id} also claims to be the primary of generation {:016x}; two primaries \
                 wrote to one volume",
                ours.current
            ));
        }
        return Verdict::Resync;
    }
    if peer.current == ours.previous
        && (peer.flags & FLAG_PRIMARY == 0 || peer.flags & FLAG_HANDED_OVER != 0)
    {
        // A follower of the generation we were promoted from, or its
        // primary after a clean handover: an older state of our history.
        return Verdict::ResyncCompare;
    }
    let how = if peer.flags & FLAG_PRIMARY == 0 && peer.previous == ours.current {
        // It did not write: it follows a primary promoted from our history
        // while this node was away, so the newer writes are that primary's.
        format!(
            "node {peer_id} follows generation {:016x}, which another node started as a primary \
             after this node's {:016x} (it was promoted while this node was away?), and holds \
             writes this node never saw. If that primary is still serving, this node should \
             not be: start it as that primary's secondary",
            peer.current, ours.current
        )
    } else if peer.current == ours.previous && peer.flags & FLAG_PRIMARY != 0 {
        // The old primary after a failover (no handover).
        format!(
            "node {peer_id} was the primary of generation {:016x}, which this node was promoted \
             from without a handover (a failover): node {peer_id} may have acknowledged writes \
             after this node lost touch with it, and this node may have taken writes of its own since",
            peer.current
        )
    } else if peer.previous == ours.current || peer.flags & FLAG_PRIMARY != 0 {
        format!(
            "node {peer_id} was served as a primary on its own (it wrote generation {:016x}{}) and \
             may hold writes this node never saw",
            peer.current,
            if peer.previous != 0 {
                format!(" after {:016x}", peer.previous)
            } else {
                String::new()
            }
        )
    } else {
        format!(
            "node {peer_id} holds data of generation {:016x}, unrelated to this node's {:016x}",
            peer.current, ours.current
        )
    };
    let partway = if half {
        format!(
            " (node {peer_id} is INCONSISTENT: partway through a resync of generation {:016x}, \
             or its crash recovery could not vouch for some blocks; it may hold the last copy \
             of that data, and serving it as the primary needs --force-inconsistent)",
            peer.current
        )
    } else {
        String::new()
    };
    Verdict::SplitBrain(format!(
        "split brain: {how}{partway}. Nothing was resynced either way"
    ))
}

/// What the operator can do about split brain with node `peer_id` of a
/// volume of `size` bytes with uuid `uuid` (the caller appends it to the
/// verdict: [`judge`] knows the histories, not the volume).
pub fn split_brain_advice(peer_id: u32, size: u64, uuid: &str) -> String {
    format!(
        "To keep this node's data, stop node {peer_id}, move its replica directory DIR away \
         (init refuses a directory that holds a replica), re-initialise it (`nbdmirror init \
         --dir DIR --size {size} --node-id {peer_id} --volume-uuid {uuid}`) and start it as a \
         secondary (`--role secondary`, also when a config file names it as the primary: a \
         fresh replica started as the primary would serve an empty disk); to keep node \
         {peer_id}'s data, serve it as the primary (--role primary) and do the same to this node"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_damage() {
        let d = crate::testdir::TestDir::new("gen");
        assert_eq!(Generation::load(&d).unwrap(), Generation::default());
        let g = Generation {
            current: 7,
            previous: 3,
            flags: FLAG_PRIMARY,
            session: 0x5e55,
            epoch: 4,
            from_epoch: 2,
        };
        g.store(&d).unwrap();
        assert_eq!(Generation::load(&d).unwrap(), g);
        // The first format (no session) still loads.
        let mut v1 = vec![0u8; LEN_V1];
        v1[0..8].copy_from_slice(MAGIC_V1);
        v1[8..16].copy_from_slice(&7u64.to_le_bytes());
        v1[24..28].copy_from_slice(&FLAG_PRIMARY.to_le_bytes());
        let sum = xxh3_64(&v1[0..32]);
        v1[32..40].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(d.join("generation"), &v1).unwrap();
        let old = Generation::load(&d).unwrap();
        assert_eq!((old.current, old.flags, old.session), (7, FLAG_PRIMARY, 0));
        // So does the second (48 bytes, no runs).
        let mut v2 = vec![0u8; LEN_V2];
        v2[0..8].copy_from_slice(MAGIC);
        v2[8..16].copy_from_slice(&7u64.to_le_bytes());
        v2[32..40].copy_from_slice(&9u64.to_le_bytes());
        let sum = xxh3_64(&v2[0..40]);
        v2[40..48].copy_from_slice(&sum.to_le_bytes());
        std::fs::write(d.join("generation"), &v2).unwrap();
        let old = Generation::load(&d).unwrap();
        assert_eq!(
            (old.current, old.session, old.epoch, old.from_epoch),
            (7, 9, 0, 0)
        );
        g.store(&d).unwrap();
        let mut b = std::fs::read(d.join("generation")).unwrap();
        b[9] ^= 1;
        std::fs::write(d.join("generation"), b).unwrap();
        assert!(Generation::load(&d).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn rules() {
        let fresh = Generation::default();
        let (p, _) = fresh.for_primary(10);
        assert_eq!(
            p,
            Generation {
                current: 10,
                previous: 0,
                flags: FLAG_PRIMARY,
                session: 0,
                epoch: 1,
                from_epoch: 0,
            }
        );
        // A restarted primary keeps its generation (its run advances at its
        // first write, `Mirror::advance_run`).
        assert_eq!(p.for_primary(11).0, p);
        assert!(p.is_own_primary());
        // A secondary that followed run 1 of 10 and is served as a primary
        // is promoted.
        let follower = Generation {
            current: 10,
            previous: 0,
            flags: 0,
            session: 0,
            epoch: 1,
            from_epoch: 0,
        };
        let (promoted, why) = follower.for_primary(20);
        assert_eq!(
            promoted,
            Generation {
                current: 20,
                previous: 10,
                flags: FLAG_PRIMARY,
                session: 0,
                epoch: 1,
                from_epoch: 1,
            }
        );
        assert!(why.unwrap().contains("promoted"));
        assert_eq!(judge(&p, &fresh, 2), Verdict::Resync);
        assert_eq!(judge(&p, &follower, 2), Verdict::Resync);
        // The old primary's follower meets the promoted node.
        assert_eq!(judge(&promoted, &follower, 1), Verdict::ResyncCompare);
        // The promoted node comes back to the old primary: split brain.
        assert!(matches!(judge(&p, &promoted, 2), Verdict::SplitBrain(_)));
        // The old primary comes back to the promoted node: split brain,
        // named as the failover it is (a tester read the generic text as
        // "node 1 went rogue").
        let Verdict::SplitBrain(why) = judge(&promoted, &p, 1) else {
            panic!("the old primary after a failover is not refused");
        };
        assert!(why.contains("promoted from without a handover"), "{why}");
        // Two primaries of one generation.
        assert!(matches!(judge(&p, &p, 2), Verdict::SplitBrain(_)));
        // A planned switchover. The handover moves the generation on
        // (10 -> 15); the peers in sync adopt 15, one of them is promoted
        // (25 after 15) and takes the old primary back, comparing blocks.
        let moved = p.handover_start(15).unwrap();
        assert_eq!(
            (moved.current, moved.previous, moved.flags),
            (15, 10, FLAG_PRIMARY)
        );
        let handed = moved.handed_over();
        assert_eq!(handed.flags, FLAG_PRIMARY | FLAG_HANDED_OVER);
        let follower15 = Generation {
            current: 15,
            previous: 10,
            flags: 0,
            session: 0,
            epoch: 1,
            from_epoch: 0,
        };
        let (promoted15, _) = follower15.for_primary(25);
        assert_eq!(judge(&promoted15, &handed, 1), Verdict::ResyncCompare);
        // A stale follower of 10 (not in sync at the handover), promoted,
        // must not take the old primary back: it lacks the newest writes.
        assert!(matches!(
            judge(&promoted, &handed, 1),
            Verdict::SplitBrain(_)
        ));
        // A handover that stopped after the first step (a peer failed):
        // the primary serves 15, the peers hold 10 or 15.
        assert_eq!(judge(&moved, &follower15, 2), Verdict::Resync);
        assert_eq!(judge(&moved, &follower, 2), Verdict::ResyncCompare);
        // Served as a primary again, it clears the mark first: after that
        // it may have written, and meeting the promoted node is split brain.
        let (again, why) = handed.for_primary(30);
        assert_eq!(again, moved);
        assert!(why.unwrap().contains("again"));
        assert!(matches!(
            judge(&promoted15, &again, 1),
            Verdict::SplitBrain(_)
        ));
        // Handed over is still a primary's generation: two primaries of one
        // generation stay refused.
        assert!(matches!(judge(&moved, &handed, 2), Verdict::SplitBrain(_)));
        // A follower never hands over.
        assert_eq!(follower.handover_start(16), None);
        // The mark is written under a magic older binaries refuse.
        let d = crate::testdir::TestDir::new("gen-ho");
        handed.store(&d).unwrap();
        assert_eq!(
            &std::fs::read(d.join("generation")).unwrap()[..8],
            MAGIC_HANDED_OVER
        );
        assert_eq!(Generation::load(&d).unwrap(), handed);
        again.store(&d).unwrap();
        assert_eq!(&std::fs::read(d.join("generation")).unwrap()[..8], MAGIC);
        std::fs::remove_dir_all(&d).unwrap();
        // Unrelated data.
        let other = Generation {
            current: 99,
            ..Generation::default()
        };
        assert!(matches!(judge(&p, &other, 2), Verdict::SplitBrain(_)));
        // A follower of a primary promoted after us is not called a
        // primary: it wrote nothing itself.
        let Verdict::SplitBrain(why) = judge(&p, &follower_of(&promoted), 3) else {
            panic!("a follower of a newer primary must be refused");
        };
        assert!(
            why.contains("follows") && !why.contains("on its own"),
            "{why}"
        );
        // Half resynced: refused as a primary unless forced, marked with a
        // magic older binaries refuse, compared only by a primary promoted
        // from its generation.
        let half = Generation {
            flags: FLAG_INCONSISTENT,
            ..other
        };
        assert!(half.refuse_inconsistent_promotion(false).is_err());
        assert!(half.refuse_inconsistent_promotion(true).is_ok());
        assert!(follower.refuse_inconsistent_promotion(false).is_ok());
        // Of an unrelated generation, it is refused as a consistent replica
        // of it would be: it may hold the last copy of that data (a tester's
        // re-initialised node, started as the primary, copied its empty
        // disk over such a replica).
        let Verdict::SplitBrain(why) = judge(&p, &half, 2) else {
            panic!("a half-resynced replica of unrelated data must be refused");
        };
        assert!(
            why.contains("unrelated") && why.contains("INCONSISTENT"),
            "{why}"
        );
        // Of the generation this node was promoted from: compared.
        let half_prev = Generation {
            flags: FLAG_INCONSISTENT,
            ..follower_of(&Generation {
                current: promoted.previous,
                ..Generation::default()
            })
        };
        assert_eq!(judge(&promoted, &half_prev, 2), Verdict::ResyncCompare);
        // Of a primary promoted after this node: refused, as its follower is.
        let half_newer = Generation {
            flags: FLAG_INCONSISTENT,
            ..follower_of(&promoted)
        };
        assert!(matches!(judge(&p, &half_newer, 3), Verdict::SplitBrain(_)));
        // A half copy records the generation it is resynced to, its old one
        // as `previous` (Mirror's record path), so the histories a reviewer
        // drew come out right. Node 1 primary of 10; node 2 promoted to 20;
        // node 3 compared by it, so half a copy of 20 after 10.
        let half20 = Generation {
            session: 7,
            ..follower
        }
        .half_copy_of(20, 0);
        assert_eq!(
            half20,
            Generation {
                current: 20,
                previous: 10,
                flags: FLAG_INCONSISTENT,
                session: 7,
                epoch: 0,
                from_epoch: 0,
            }
        );
        // Node 2 dies; node 1, back as the primary of 10, must not roll
        // node 3 back over 20's writes.
        assert!(matches!(judge(&p, &half20, 3), Verdict::SplitBrain(_)));
        // Another follower of 10 promoted meanwhile (40 after 10): siblings.
        let (sibling, _) = follower.for_primary(40);
        assert!(matches!(
            judge(&sibling, &half20, 3),
            Verdict::SplitBrain(_)
        ));
        // A node promoted from 20 (50 after 20): compares it.
        let (after20, _) = Generation::default().in_sync_with(20, 1).for_primary(50);
        assert_eq!(judge(&after20, &half20, 3), Verdict::ResyncCompare);
        // A new replica half resynced from 10, and a re-initialised primary.
        let half_new = Generation::default().half_copy_of(10, 0);
        // Forced while half a copy of 10: the full copies of 10 are
        // refused, not compared and overwritten with the mix (a reviewer's
        // find), whether the half copy was new or of another generation.
        let (forced, why) = half_new.for_primary(70);
        assert_eq!((forced.previous, forced.from_epoch), (0, 0));
        assert!(why.unwrap().contains("--force-inconsistent"));
        assert!(matches!(
            judge(&forced, &follower, 3),
            Verdict::SplitBrain(_)
        ));
        let (forced20, _) = half20.for_primary(80);
        assert!(matches!(
            judge(&forced20, &follower_of(&after20), 4),
            Verdict::SplitBrain(_)
        ));
        assert!(matches!(
            judge(&forced20, &Generation::default().in_sync_with(20, 1), 4),
            Verdict::SplitBrain(_)
        ));
        assert_eq!(judge(&forced, &fresh, 4), Verdict::Resync);
        let (reinit, _) = Generation::default().for_primary(60);
        assert!(matches!(
            judge(&reinit, &half_new, 2),
            Verdict::SplitBrain(_)
        ));
        assert_eq!(judge(&p, &half_new, 2), Verdict::Resync);
        let half10 = Generation {
            flags: FLAG_INCONSISTENT,
            ..follower
        };
        assert_eq!(judge(&p, &half10, 2), Verdict::Resync);
        // Reported in sync: the mark goes, a new generation is adopted.
        assert_eq!(half10.in_sync_with(10, 1), follower);
        let adopted = half10.in_sync_with(20, 3);
        assert_eq!(
            (
                adopted.current,
                adopted.previous,
                adopted.flags,
                adopted.epoch
            ),
            (20, 10, 0, 3)
        );
        let d = crate::testdir::TestDir::new("gen-inc");
        half.store(&d).unwrap();
        assert_eq!(
            &std::fs::read(d.join("generation")).unwrap()[..8],
            MAGIC_INCONSISTENT
        );
        assert_eq!(Generation::load(&d).unwrap(), half);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Runs: node 1 is the primary of 10 in run 1; node 2 is in sync with
    /// it and is promoted (20 after run 1 of 10) while node 1 is down; node
    /// 1 is restarted as the primary, writes (run 2) and node 3 is in sync
    /// with that run. Node 2 meets node 3: split brain, even half resynced
    /// since. A follower of run 1 (or of an unknown run: an older binary)
    /// is compared, as before.
    #[test]
    fn runs() {
        let (p1, _) = Generation::default().for_primary(10);
        assert_eq!(p1.epoch, 1);
        let follower1 = Generation::default().in_sync_with(10, p1.epoch);
        assert_eq!(follower1.epoch, 1);
        let (promoted, _) = follower1.for_primary(20);
        assert_eq!((promoted.previous, promoted.from_epoch), (10, 1));
        // The restart keeps run 1 until the first write (Mirror::advance_run).
        let (p1again, _) = p1.for_primary(99);
        assert_eq!(p1again, p1);
        let p2 = Generation { epoch: 2, ..p1 };
        let follower2 = follower1.in_sync_with(p2.current, p2.epoch);
        assert_eq!(follower2.epoch, 2);
        // An older primary's announce (no run) keeps the run recorded.
        assert_eq!(follower2.in_sync_with(10, 0).epoch, 2);
        let Verdict::SplitBrain(why) = judge(&promoted, &follower2, 3) else {
            panic!("a follower of a later run must be refused");
        };
        assert!(why.contains("run 2") && why.contains("run 1"), "{why}");
        let half2 = Generation {
            flags: FLAG_INCONSISTENT,
            ..follower2
        };
        assert!(matches!(
            judge(&promoted, &half2, 3),
            Verdict::SplitBrain(_)
        ));
        assert_eq!(judge(&promoted, &follower1, 3), Verdict::ResyncCompare);
        let unknown = Generation {
            epoch: 0,
            ..follower2
        };
        assert_eq!(judge(&promoted, &unknown, 3), Verdict::ResyncCompare);
        // Promoted by an older binary: no run to compare with.
        let old_promoted = Generation {
            from_epoch: 0,
            ..promoted
        };
        assert_eq!(judge(&old_promoted, &follower2, 3), Verdict::ResyncCompare);
        // The promoted node restarted keeps the run it was promoted from.
        let (promoted2, _) = promoted.for_primary(98);
        assert_eq!(promoted2.from_epoch, 1);
        assert!(matches!(
            judge(&promoted2, &follower2, 3),
            Verdict::SplitBrain(_)
        ));
        // The same primary's own followers, whatever run they saw, are
        // resynced as usual.
        assert_eq!(judge(&p2, &follower1, 2), Verdict::Resync);
        // Runs cross the wire in the flags field's high half.
        assert_eq!(p2.wire_flags(), FLAG_PRIMARY as u64 | 2 << 32);
        // Only a promoted primary needs the 56-byte layout; the rest stay
        // readable by older binaries (48 bytes, the run where they keep 0).
        let d = crate::testdir::TestDir::new("gen-runs");
        for (g, len) in [(follower2, LEN_V2), (p2, LEN_V2), (promoted2, LEN)] {
            g.store(&d).unwrap();
            assert_eq!(std::fs::read(d.join("generation")).unwrap().len(), len);
            assert_eq!(Generation::load(&d).unwrap(), g);
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    fn follower_of(g: &Generation) -> Generation {
        Generation {
            current: g.current,
            previous: g.previous,
            ..Generation::default()
        }
    }
}
