//! Blocks a crash recovery could not vouch for, kept until a primary has
//! resent them.
//!
//! Recovery rebuilds the checksums of blocks it has nothing to check against:
//! the regions of in-place writes made since the last checkpoint (their new
//! checksums had not reached `meta`) and the ranges of journal records it
//! could not replay (a torn or damaged journal). Such a block may hold a write
//! the crash cut short (fine: it was never flushed), an older copy of a
//! flushed write lost with a damaged journal, or bit rot; a checksum rebuilt
//! from it vouches for whatever it holds. A secondary keeps the set (file
//! `uncertain` in the replica directory, written before recovery moves the
//! journal tail, so a second crash does not forget it) and answers its
//! primary's compare with "unknown" for those blocks, so the primary resends
//! them (see `mirror`, and "Uncertain blocks" in docs/mirroring.md).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

const MAGIC: &[u8; 8] = b"NMUNSURE";

/// A set of block numbers as runs, persisted in `<dir>/uncertain`.
#[derive(Debug)]
pub struct Uncertain {
    /// start -> end (exclusive); runs never touch or overlap.
    runs: BTreeMap<u64, u64>,
    path: PathBuf,
}

impl Uncertain {
    pub fn path(dir: &Path) -> PathBuf {
        dir.join("uncertain")
    }

    /// The set in `dir` (empty when there is no file). A damaged file is an
    /// error: guessing would either trust blocks nobody checked or distrust
    /// the whole disk.
    pub fn load(dir: &Path) -> Result<Uncertain, String> {
        let path = Self::path(dir);
        let mut u = Uncertain {
            runs: BTreeMap::new(),
            path,
        };
        let b = match std::fs::read(&u.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(u),
            Err(e) => return Err(format!("cannot read {}: {e}", u.path.display())),
        };
        let shown = u.path.display().to_string();
        let damaged = || {
            format!(
                "{} is damaged. It lists blocks a crash recovery could not vouch for, which \
                 this node checks against its peers. Restore it, or remove it to trust those \
                 blocks as they are (a scrub then finds any that differ between replicas)",
                shown
            )
        };
        if b.len() < 24 || &b[..8] != MAGIC || (b.len() - 24) % 16 != 0 {
            return Err(damaged());
        }
        let at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
        let n = at(8) as usize;
        let end = b.len() - 8;
        if n != (end - 16) / 16 || xxh3_64(&b[..end]) != at(end) {
            return Err(damaged());
        }
        for k in 0..n {
            let (s, e) = (at(16 + k * 16), at(24 + k * 16));
            if s >= e {
                return Err(damaged());
            }
            u.add(s, e);
        }
        Ok(u)
    }

    /// Add blocks `[first, end)`.
    pub fn add(&mut self, first: u64, end: u64) {
        if first >= end {
            return;
        }
        let (mut s, mut e) = (first, end);
        // Merge with every run that overlaps or touches [s, e).
        let touching: Vec<u64> = self
            .runs
            .range(..=e)
            .rev()
            .take_while(|(_, &re)| re >= s)
            .map(|(&rs, _)| rs)
            .collect();
        for rs in touching {
            let re = self.runs.remove(&rs).unwrap();
            s = s.min(rs);
            e = e.max(re);
        }
        self.runs.insert(s, e);
    }

    pub fn contains(&self, b: u64) -> bool {
        self.runs
            .range(..=b)
            .next_back()
            .is_some_and(|(_, &e)| b < e)
    }

    /// Remove block `b` (if present).
    pub fn remove(&mut self, b: u64) {
        let Some((&s, &e)) = self.runs.range(..=b).next_back() else {
            return;
        };
        if b >= e {
            return;
        }
        self.runs.remove(&s);
        if s < b {
            self.runs.insert(s, b);
        }
        if b + 1 < e {
            self.runs.insert(b + 1, e);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.runs.is_empty()
    }

    pub fn count(&self) -> u64 {
        self.runs.iter().map(|(s, e)| e - s).sum()
    }

    pub fn clear(&mut self) {
        self.runs.clear();
    }

    /// Write the set durably (temp file, fsync, rename, directory fsync);
    /// an empty set removes the file.
    pub fn save(&self) -> Result<(), String> {
        let dir = self.path.parent().unwrap_or(Path::new("."));
        let sync_dir = || {
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", dir.display()))
        };
        if self.runs.is_empty() {
            return match std::fs::remove_file(&self.path) {
                Ok(()) => sync_dir(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(format!("cannot remove {}: {e}", self.path.display())),
            };
        }
        let mut b = Vec::with_capacity(24 + self.runs.len() * 16);
        b.extend_from_slice(MAGIC);
        b.extend_from_slice(&(self.runs.len() as u64).to_le_bytes());
        for (s, e) in &self.runs {
            b.extend_from_slice(&s.to_le_bytes());
            b.extend_from_slice(&e.to_le_bytes());
        }
        let sum = xxh3_64(&b);
        b.extend_from_slice(&sum.to_le_bytes());
        let tmp = self.path.with_extension("tmp");
        let err = |e: std::io::Error| format!("cannot write {}: {e}", tmp.display());
        let mut f = File::create(&tmp).map_err(err)?;
        f.write_all(&b).map_err(err)?;
        f.sync_all().map_err(err)?;
        std::fs::rename(&tmp, &self.path).map_err(err)?;
        sync_dir()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir() -> crate::testdir::TestDir {
        crate::testdir::TestDir::new("uncertain")
    }

    proptest::proptest! {
        /// Adds and removes against a plain set; save and load round-trip.
        #[test]
        fn behaves_as_a_set(ops in proptest::collection::vec((0u64..200, 0u64..20, proptest::bool::ANY), 0..60)) {
            let d = dir();
            let _ = std::fs::remove_file(Uncertain::path(&d));
            let mut u = Uncertain::load(&d).unwrap();
            let mut model = std::collections::BTreeSet::new();
            for (s, n, add) in ops {
                if add {
                    u.add(s, s + n);
                    model.extend(s..s + n);
                } else {
                    u.remove(s);
                    model.remove(&s);
                }
                let runs: Vec<(u64, u64)> = u.runs.iter().map(|(&a, &b)| (a, b)).collect();
                for w in runs.windows(2) {
                    proptest::prop_assert!(w[0].1 < w[1].0, "runs touch: {:?}", runs);
                }
            }
            for b in 0..230 {
                proptest::prop_assert_eq!(u.contains(b), model.contains(&b), "block {}", b);
            }
            proptest::prop_assert_eq!(u.count(), model.len() as u64);
            u.save().unwrap();
            let v = Uncertain::load(&d).unwrap();
            proptest::prop_assert_eq!(&v.runs, &u.runs);
            proptest::prop_assert_eq!(Uncertain::path(&d).exists(), !model.is_empty());
        }
    }

    #[test]
    fn a_damaged_file_is_refused() {
        let base = dir();
        let d = base.join("damaged");
        std::fs::create_dir_all(&d).unwrap();
        let mut u = Uncertain::load(&d).unwrap();
        u.add(5, 9);
        u.save().unwrap();
        let p = Uncertain::path(&d);
        let good = std::fs::read(&p).unwrap();
        for i in 0..good.len() {
            let mut b = good.clone();
            b[i] ^= 0x10;
            std::fs::write(&p, &b).unwrap();
            assert!(
                Uncertain::load(&d).unwrap_err().contains("damaged"),
                "byte {i}"
            );
        }
        std::fs::write(&p, &good[..good.len() - 1]).unwrap();
        assert!(Uncertain::load(&d).is_err());
    }
}
