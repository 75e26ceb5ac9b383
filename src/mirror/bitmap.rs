//! The persistent dirty bitmap a primary keeps for one peer.
//!
//! Owns: one bit per 4 KiB block of the disk, set when the peer misses a
//! write to that block (it was disconnected, or failed before acknowledging)
//! and cleared only after the peer acknowledged a resync of the block *and*
//! a later flush on the peer completed. The file lives in the primary's
//! replica directory as `peer-<ID>.bitmap`, memory-mapped; the store's
//! checkpoint fdatasyncs it before it releases journal records (see
//! `Store::extra_sync_fds`), so a bit is durable before the record that
//! would replay its write is gone.
//!
//! Layout (little-endian): a 4096-byte header — magic `NMBITMAP`, version
//! u32 = 1, block size u32, volume uuid [16], peer node id u32, flags u32,
//! block count u64, session u64 (the token of the last replication session
//! this primary started with the peer; 0: none yet) — then the bits, bit `b % 8` of byte `b / 8` for block
//! `b`. Flags: [`FLAG_CLEAN`] (the primary shut down cleanly; cleared while
//! it runs) and [`FLAG_COMPARE`] (the bits are not known to be complete: the
//! replicas' checksums must be compared first). A missing file means the
//! primary knows nothing about the peer: it is created with no bits and
//! FLAG_COMPARE (checksum resync: only blocks whose checksums differ move).

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use memmap2::MmapMut;

const MAGIC: &[u8; 8] = b"NMBITMAP";
const VERSION: u32 = 1;
const HEADER: usize = 4096;
const FLAGS_AT: usize = 36;
const SESSION_AT: usize = 48;
/// The primary stopped cleanly with this bitmap up to date.
pub const FLAG_CLEAN: u32 = 1;
/// Compare checksums with the peer before trusting the bits.
pub const FLAG_COMPARE: u32 = 2;
/// The operator paused resync to this peer (`nbdmirror resync pause`); it
/// stays paused across a restart of the primary until resumed.
pub const FLAG_PAUSED: u32 = 4;
pub const BLOCK: u64 = 4096;

pub struct DirtyBitmap {
    path: PathBuf,
    file: File,
    map: MmapMut,
    blocks: u64,
    dirty: u64,
}

impl std::fmt::Debug for DirtyBitmap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "DirtyBitmap({}, {} of {} blocks dirty)",
            self.path.display(),
            self.dirty,
            self.blocks
        )
    }
}

/// The node ids of the peer bitmaps (`peer-N.bitmap`) in the replica
/// directory `dir`, in order; none if it cannot be read.
pub fn peer_ids(dir: &Path) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.flatten()
                .filter_map(|e| {
                    e.file_name()
                        .to_str()?
                        .strip_prefix("peer-")?
                        .strip_suffix(".bitmap")?
                        .parse()
                        .ok()
                })
                .collect()
        })
        .unwrap_or_default();
    ids.sort_unstable();
    ids
}

/// Whether the bitmap file at `path` belongs to a peer this primary never
/// started a session with (session 0) and whose bits are not trusted
/// anyway (FLAG_COMPARE): a peer listed by mistake (a wrong `--peer` id)
/// or one that never came. Dropping such a file loses nothing: the peer
/// would be compared by checksum either way. Anything unreadable: false.
pub fn never_in_session(path: &Path) -> bool {
    use std::io::Read;
    let mut h = [0u8; SESSION_AT + 8];
    let read = File::open(path).and_then(|mut f| f.read_exact(&mut h));
    read.is_ok()
        && &h[0..8] == MAGIC
        && u32::from_le_bytes(h[FLAGS_AT..FLAGS_AT + 4].try_into().unwrap()) & FLAG_COMPARE != 0
        && u64::from_le_bytes(h[SESSION_AT..SESSION_AT + 8].try_into().unwrap()) == 0
}

/// The bitmap for `peer` of a `disk_size`-byte volume: its blocks, its
/// file's length and its header up to the flags and session.
fn expected(volume_uuid: &[u8; 16], peer: u32, disk_size: u64) -> (u64, usize, Vec<u8>) {
    let blocks = disk_size.div_ceil(BLOCK);
    let bytes = HEADER + (blocks.div_ceil(8) as usize).next_multiple_of(4096);
    let mut header = vec![0u8; HEADER];
    header[0..8].copy_from_slice(MAGIC);
    header[8..12].copy_from_slice(&VERSION.to_le_bytes());
    header[12..16].copy_from_slice(&(BLOCK as u32).to_le_bytes());
    header[16..32].copy_from_slice(volume_uuid);
    header[32..36].copy_from_slice(&peer.to_le_bytes());
    header[40..48].copy_from_slice(&blocks.to_le_bytes());
    (blocks, bytes, header)
}

fn check_len(path: &Path, len: u64, bytes: usize, disk_size: u64, peer: u32) -> Result<(), String> {
    if len != bytes as u64 {
        return Err(format!(
            "{} is {len} bytes, expected {bytes} for a {disk_size}-byte disk; it is damaged or \
             belongs to another volume (remove it to force a full resync of peer {peer})",
            path.display()
        ));
    }
    Ok(())
}

fn check_header(path: &Path, got: &[u8], want: &[u8], peer: u32) -> Result<(), String> {
    if got[..FLAGS_AT] != want[..FLAGS_AT] || got[FLAGS_AT + 4..48] != want[FLAGS_AT + 4..48] {
        return Err(format!(
            "{} does not match this volume and peer {peer} (bad magic, version, uuid, peer id \
             or size); remove it to force a full resync of that peer",
            path.display()
        ));
    }
    Ok(())
}

/// Check the bitmap file for `peer` without changing it (for `info`, which
/// only reads): its length and header as [`DirtyBitmap::open_or_create`]
/// checks them. Returns the bytes it marks dirty.
pub fn inspect(
    dir: &Path,
    volume_uuid: &[u8; 16],
    peer: u32,
    disk_size: u64,
) -> Result<u64, String> {
    let path = dir.join(format!("peer-{peer}.bitmap"));
    let (_, bytes, header) = expected(volume_uuid, peer, disk_size);
    let b = std::fs::read(&path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    check_len(&path, b.len() as u64, bytes, disk_size, peer)?;
    check_header(&path, &b[..HEADER], &header, peer)?;
    Ok(b[HEADER..]
        .iter()
        .map(|x| x.count_ones() as u64)
        .sum::<u64>()
        * BLOCK)
}

impl DirtyBitmap {
    /// Open the bitmap for `peer`, or create it with every bit set. Returns
    /// the bitmap and whether it was created.
    pub fn open_or_create(
        dir: &Path,
        volume_uuid: &[u8; 16],
        peer: u32,
        disk_size: u64,
    ) -> Result<(DirtyBitmap, bool), String> {
        let path = dir.join(format!("peer-{peer}.bitmap"));
        let (blocks, bytes, header) = expected(volume_uuid, peer, disk_size);
        let created = !path.exists();
        if created {
            // Write it whole under a temporary name, then rename: a crash
            // never leaves a half-initialised bitmap that claims less dirt.
            let tmp = dir.join(format!("peer-{peer}.bitmap.tmp"));
            let f = OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&tmp)
                .map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
            f.set_len(bytes as u64)
                .map_err(|e| format!("cannot size {}: {e}", tmp.display()))?;
            reserve(&f, bytes as u64, &tmp)?;
            // SAFETY: the file was just created by us and is not shared.
            let mut map = unsafe { MmapMut::map_mut(&f) }
                .map_err(|e| format!("cannot map {}: {e}", tmp.display()))?;
            map[..HEADER].copy_from_slice(&header);
            map[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&(FLAG_CLEAN | FLAG_COMPARE).to_le_bytes());
            map.flush()
                .map_err(|e| format!("cannot sync {}: {e}", tmp.display()))?;
            drop(map);
            std::fs::rename(&tmp, &path)
                .map_err(|e| format!("cannot install {}: {e}", path.display()))?;
            File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
        let len = file
            .metadata()
            .map_err(|e| format!("cannot stat {}: {e}", path.display()))?
            .len();
        check_len(&path, len, bytes, disk_size, peer)?;
        // Bitmaps made before this was done are sparse.
        reserve(&file, len, &path)?;
        // SAFETY: the replica directory is locked by this process (flock), so
        // no one else maps or truncates the file.
        let map = unsafe { MmapMut::map_mut(&file) }
            .map_err(|e| format!("cannot map {}: {e}", path.display()))?;
        check_header(&path, &map[..HEADER], &header, peer)?;
        let dirty = map[HEADER..].iter().map(|b| b.count_ones() as u64).sum();
        Ok((
            DirtyBitmap {
                path,
                file,
                map,
                blocks,
                dirty,
            },
            created,
        ))
    }

    pub fn flags(&self) -> u32 {
        u32::from_le_bytes(self.map[FLAGS_AT..FLAGS_AT + 4].try_into().unwrap())
    }

    /// Set the header flags and write them back at once.
    pub fn set_flags(&mut self, flags: u32) -> Result<(), String> {
        self.map[FLAGS_AT..FLAGS_AT + 4].copy_from_slice(&flags.to_le_bytes());
        self.flush()
    }

    /// The token of the last session this primary started with the peer.
    pub fn session(&self) -> u64 {
        u64::from_le_bytes(self.map[SESSION_AT..SESSION_AT + 8].try_into().unwrap())
    }

    /// Record (durably) the token of a session being started.
    pub fn set_session(&mut self, token: u64) -> Result<(), String> {
        self.map[SESSION_AT..SESSION_AT + 8].copy_from_slice(&token.to_le_bytes());
        self.flush()
    }

    pub fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Dirty blocks.
    pub fn dirty(&self) -> u64 {
        self.dirty
    }

    pub fn is_set(&self, b: u64) -> bool {
        self.map[HEADER + (b / 8) as usize] & (1 << (b % 8)) != 0
    }

    /// Mark every block touched by `[offset, offset+len)` dirty.
    pub fn set_range(&mut self, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = offset / BLOCK;
        let end = (offset + len).div_ceil(BLOCK).min(self.blocks);
        for b in first..end {
            if !self.is_set(b) {
                set_bit(&mut self.map[HEADER..], b);
                self.dirty += 1;
            }
        }
    }

    /// Mark every block dirty (a forced full resync).
    pub fn set_all(&mut self) {
        self.set_range(0, self.blocks * BLOCK);
    }

    /// Clear blocks `[first, first+n)`.
    pub fn clear_blocks(&mut self, first: u64, n: u64) {
        for b in first..(first + n).min(self.blocks) {
            if self.is_set(b) {
                self.map[HEADER + (b / 8) as usize] &= !(1 << (b % 8));
                self.dirty -= 1;
            }
        }
    }

    /// The first run of dirty blocks at or after `from` (wrapping to 0 once),
    /// at most `max` long: `(first, n)`.
    pub fn next_run(&self, from: u64, max: u64) -> Option<(u64, u64)> {
        if self.dirty == 0 {
            return None;
        }
        let find = |lo: u64, hi: u64| -> Option<u64> {
            let mut b = lo;
            while b < hi {
                let byte = self.map[HEADER + (b / 8) as usize];
                if byte == 0 && b.is_multiple_of(8) {
                    b += 8;
                    continue;
                }
                if byte & (1 << (b % 8)) != 0 {
                    return Some(b);
                }
                b += 1;
            }
            None
        };
        let start = find(from.min(self.blocks), self.blocks).or_else(|| find(0, from))?;
        let mut n = 1;
        while n < max && start + n < self.blocks && self.is_set(start + n) {
            n += 1;
        }
        Some((start, n))
    }

    /// Start writing dirty pages back (persists cleared bits between
    /// checkpoints, so a restarted resync does not redo finished work).
    pub fn flush_async(&self) -> Result<(), String> {
        self.map
            .flush_async()
            .map_err(|e| format!("cannot sync {}: {e}", self.path.display()))
    }

    /// Write dirty pages back now (msync), e.g. at shutdown.
    pub fn flush(&self) -> Result<(), String> {
        self.map
            .flush()
            .map_err(|e| format!("cannot sync {}: {e}", self.path.display()))
    }
}

fn set_bit(bits: &mut [u8], b: u64) {
    bits[(b / 8) as usize] |= 1 << (b % 8);
}

/// Give every page of a bitmap file its disk blocks before it is mapped:
/// the first bit set in a sparse page would otherwise need a block then,
/// and on a full filesystem the kernel answers a store to the map with
/// SIGBUS, which kills the node with requests in flight. A filesystem
/// without fallocate keeps the file as it is.
fn reserve(f: &File, len: u64, path: &Path) -> Result<(), String> {
    use std::os::fd::AsRawFd;
    // SAFETY: fallocate on a descriptor we own; mode 0 within the file's
    // length only allocates, it changes no byte.
    let r = unsafe { libc::fallocate(f.as_raw_fd(), 0, 0, len as i64) };
    if r == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) => Ok(()),
        _ => Err(format!(
            "cannot reserve disk space for {} ({e}); a peer's bitmap must have all its space \
             before it is used, or a write that needs a bit there would kill the node: free \
             some space",
            path.display()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmpdir(tag: &str) -> crate::testdir::TestDir {
        crate::testdir::TestDir::new(&format!("bitmap-{tag}"))
    }

    #[test]
    fn new_bitmap_asks_for_a_compare_and_persists_bits() {
        let d = tmpdir("persist");
        let uuid = [7u8; 16];
        let (mut bm, created) = DirtyBitmap::open_or_create(&d, &uuid, 2, 100 * BLOCK).unwrap();
        assert!(created);
        assert_eq!(bm.dirty(), 0);
        assert_eq!(bm.flags(), FLAG_CLEAN | FLAG_COMPARE);
        bm.set_flags(0).unwrap();
        bm.set_all();
        assert_eq!(bm.dirty(), 100);
        bm.clear_blocks(0, 60);
        assert_eq!(bm.next_run(0, 8), Some((60, 8)));
        bm.flush().unwrap();
        drop(bm);
        let (bm, created) = DirtyBitmap::open_or_create(&d, &uuid, 2, 100 * BLOCK).unwrap();
        assert!(!created);
        assert_eq!(bm.dirty(), 40);
        assert_eq!(bm.flags(), 0);
        assert_eq!(bm.next_run(90, 100), Some((90, 10)));
        // Another volume's or peer's bitmap is refused.
        assert!(DirtyBitmap::open_or_create(&d, &[8u8; 16], 2, 100 * BLOCK).is_err());
        assert!(DirtyBitmap::open_or_create(&d, &uuid, 2, 200 * BLOCK).is_err());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn set_range_covers_partial_blocks_and_runs_wrap() {
        let d = tmpdir("ranges");
        let (mut bm, _) = DirtyBitmap::open_or_create(&d, &[1; 16], 3, 64 * BLOCK).unwrap();
        assert_eq!(bm.dirty(), 0);
        assert_eq!(bm.next_run(0, 10), None);
        bm.set_range(BLOCK + 1, 2 * BLOCK); // blocks 1..=3
        assert_eq!(bm.dirty(), 3);
        assert_eq!(bm.next_run(10, 10), Some((1, 3)));
        bm.set_range(63 * BLOCK, BLOCK);
        assert_eq!(bm.next_run(5, 10), Some((63, 1)));
        let _ = std::fs::remove_dir_all(&d);
    }
}
