//! The replica directory: creating it (`init`), opening and locking it.
//!
//! Owns: file names (`data`, `journal`, `meta`), their sizes, the exclusive
//! lock that keeps a second process out, and the checks that refuse a
//! directory that is damaged, foreign or from a newer format before anything
//! is written to it.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::format::{
    Superblock, BLOCK_SIZE, CHECKSUM_TABLE_OFFSET, FORMAT_VERSION, MIN_JOURNAL, RECORD_ALIGN,
};
use super::Files;

pub struct ReplicaDir {
    pub path: PathBuf,
    pub data: File,
    pub journal: File,
    pub meta: File,
    _lock: File,
}

impl ReplicaDir {
    pub fn files(&self) -> Files {
        Files {
            data: self.data.as_raw_fd(),
            journal: self.journal.as_raw_fd(),
            meta: self.meta.as_raw_fd(),
        }
    }
}

fn lock(path: &Path) -> Result<File, String> {
    let f = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(path.join("lock"))
        .map_err(|e| format!("cannot open {}/lock: {e}", path.display()))?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let r = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if r != 0 {
        return Err(format!(
            "replica directory {} is in use by another nbdmirror process",
            path.display()
        ));
    }
    Ok(f)
}

/// Bytes an unprivileged writer may still allocate on `path`'s filesystem.
fn free_bytes(path: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    // SAFETY: a zeroed statvfs is a valid out-parameter.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `st` a valid statvfs.
    if unsafe { libc::statvfs(c.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some((st.f_bavail as u64).saturating_mul(st.f_frsize as u64))
}

/// A fresh random volume uuid.
pub fn random_uuid() -> [u8; 16] {
    let mut u = [0u8; 16];
    if let Ok(mut f) = File::open("/dev/urandom") {
        let _ = f.read_exact(&mut u);
    }
    u
}

pub fn format_uuid(u: &[u8; 16]) -> String {
    let h: String = u.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// Parse a volume uuid as printed by [`format_uuid`] (dashes optional).
pub fn parse_uuid(s: &str) -> Result<[u8; 16], String> {
    let hex: String = s.chars().filter(|&c| c != '-').collect();
    if hex.len() != 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a volume uuid (32 hex digits, e.g. as `nbdmirror info` prints it)"
        ));
    }
    let mut u = [0u8; 16];
    for (i, b) in u.iter_mut().enumerate() {
        *b = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).unwrap();
    }
    if u == [0; 16] {
        return Err(format!(
            "{s:?} is the nil uuid, which no volume has; give the uuid `nbdmirror init` or \
             `nbdmirror info` printed for the volume"
        ));
    }
    Ok(u)
}

/// Create a new replica directory for a disk of `size` bytes, for a new
/// volume or (with `volume_uuid`) as another node of an existing one.
pub fn init(
    path: &Path,
    size: u64,
    journal_size: u64,
    node_id: u32,
    volume_uuid: Option<[u8; 16]>,
) -> Result<Superblock, String> {
    if size == 0 || !size.is_multiple_of(BLOCK_SIZE) {
        return Err(format!(
            "size {size} must be a positive multiple of {BLOCK_SIZE} bytes"
        ));
    }
    if journal_size < MIN_JOURNAL || !journal_size.is_multiple_of(RECORD_ALIGN) {
        return Err(format!(
            "journal size {journal_size} must be at least {MIN_JOURNAL} bytes and a multiple of {RECORD_ALIGN}"
        ));
    }
    let existed = path.exists();
    std::fs::create_dir_all(path).map_err(|e| format!("cannot create {}: {e}", path.display()))?;
    if path.join("meta").exists() {
        return Err(format!(
            "{} already holds a replica; refusing to overwrite it (remove it first if you mean to)",
            path.display()
        ));
    }
    for name in ["data", "journal"] {
        if path.join(name).exists() {
            return Err(format!(
                "{} already has a {name} file (a damaged or half-made replica?); refusing to \
                 overwrite it (move it away first if you mean to)",
                path.display()
            ));
        }
    }
    // What an earlier replica here knew about its history and its peers
    // would be taken for this new, empty one's: a stale generation and
    // session token could make a primary count it as in sync.
    let leftovers: Vec<String> = std::fs::read_dir(path)
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| {
                    n == "generation"
                        || n == "generation.tmp"
                        || n == "diverged"
                        || n == "diverged.tmp"
                        || (n.starts_with("peer-") && n.ends_with(".bitmap"))
                })
                .collect()
        })
        .unwrap_or_default();
    if !leftovers.is_empty() {
        return Err(format!(
            "{} still holds {} from an earlier replica; a new replica must not inherit its \
             history: remove them (or use an empty directory)",
            path.display(),
            leftovers.join(", ")
        ));
    }
    let had_lock = path.join("lock").exists();
    let _lock = lock(path)?;
    let result = init_files(path, size, journal_size, node_id, volume_uuid);
    if result.is_err() {
        // Leave nothing behind that this call made: a half-made replica (or
        // a data file holding the space fallocate managed to get) helps
        // nobody. Files that were there before are not touched.
        let mut made = vec!["data", "journal", "meta.tmp"];
        if !had_lock {
            made.push("lock");
        }
        for name in made {
            let _ = std::fs::remove_file(path.join(name));
        }
        if !existed {
            let _ = std::fs::remove_dir(path);
        }
    }
    result
}

/// The files of a new replica directory (`init` has made and locked it).
fn init_files(
    path: &Path,
    size: u64,
    journal_size: u64,
    node_id: u32,
    volume_uuid: Option<[u8; 16]>,
) -> Result<Superblock, String> {
    let table = (size / BLOCK_SIZE) * 8;
    let needed = size
        .saturating_add(journal_size)
        .saturating_add(CHECKSUM_TABLE_OFFSET + table);
    if let Some(free) = free_bytes(path) {
        if needed > free {
            return Err(format!(
                "not enough space for a {size}-byte disk in {}: it needs {needed} bytes \
                 (data, journal and checksums) and the filesystem has {free} free",
                path.display()
            ));
        }
    }
    // `serve` would refuse it: do not make a replica that cannot be opened.
    super::check_table_memory(size)?;
    let create = |name: &str| {
        OpenOptions::new()
            .create_new(true)
            .read(true)
            .write(true)
            .open(path.join(name))
            .map_err(|e| format!("cannot create {}/{name}: {e}", path.display()))
    };
    let data = create("data")?;
    // Reserve the disk's space too (like a thick-provisioned volume): a full
    // host filesystem shows up here, not as ENOSPC under a client's write,
    // and writes do not pay for block allocation (fragmented holes made
    // sequential writes after random ones 2.5x slower). Filesystems without
    // fallocate get a sparse file.
    // SAFETY: fallocate on a file we own.
    let r = unsafe { libc::fallocate(data.as_raw_fd(), 0, 0, size as i64) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(format!(
                "not enough space for a {size}-byte disk in {}: {e}",
                path.display()
            ));
        }
        data.set_len(size)
            .map_err(|e| format!("cannot size the data file: {e}"))?;
    }
    let journal = create("journal")?;
    // Reserve the journal's space now so a full disk shows up at init, not
    // under a client's write.
    // SAFETY: fallocate on a file we own.
    let r = unsafe { libc::fallocate(journal.as_raw_fd(), 0, 0, journal_size as i64) };
    if r != 0 {
        journal
            .set_len(journal_size)
            .map_err(|e| format!("cannot size the journal: {e}"))?;
    }
    let meta_tmp = path.join("meta.tmp");
    let meta = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&meta_tmp)
        .map_err(|e| format!("cannot create {}: {e}", meta_tmp.display()))?;
    // Reserved like the other two: checksum pages are first written at a
    // checkpoint, and a sparse `meta` on a full filesystem failed that
    // checkpoint with ENOSPC and stopped the node's writes (a tester's find).
    // SAFETY: fallocate on a file we own.
    let r = unsafe {
        libc::fallocate(
            meta.as_raw_fd(),
            0,
            0,
            (CHECKSUM_TABLE_OFFSET + table) as i64,
        )
    };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            return Err(format!(
                "not enough space for the checksum table of a {size}-byte disk in {}: {e}",
                path.display()
            ));
        }
        meta.set_len(CHECKSUM_TABLE_OFFSET + table)
            .map_err(|e| format!("cannot size the metadata file: {e}"))?;
    }
    let sb = Superblock {
        version: FORMAT_VERSION,
        block_size: BLOCK_SIZE as u32,
        volume_uuid: volume_uuid.unwrap_or_else(random_uuid),
        node_id,
        size,
        journal_size,
        write_counter: 0,
        tail_pos: 0,
        tail_seq: 1,
        epoch: 1,
    };
    meta.write_all_at(&sb.encode(), 0)
        .map_err(|e| format!("cannot write the superblock: {e}"))?;
    for f in [&data, &journal, &meta] {
        f.sync_all()
            .map_err(|e| format!("cannot sync the new replica: {e}"))?;
    }
    std::fs::rename(&meta_tmp, path.join("meta"))
        .map_err(|e| format!("cannot finish init: {e}"))?;
    File::open(path)
        .and_then(|d| d.sync_all())
        .map_err(|e| format!("cannot sync {}: {e}", path.display()))?;
    let _ = (&meta).flush();
    Ok(sb)
}

/// Refuse a path that holds no replica.
fn require_replica(path: &Path) -> Result<(), String> {
    if !path.join("meta").exists() {
        return Err(format!(
            "{} is not a replica directory (no meta file); create one with `nbdmirror init --dir {} --size SIZE`",
            path.display(),
            path.display()
        ));
    }
    Ok(())
}

/// Open and lock an existing replica directory.
pub fn open(path: &Path) -> Result<ReplicaDir, String> {
    require_replica(path)?;
    let lock = lock(path)?;
    let open = |name: &str| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .open(path.join(name))
            .map_err(|e| format!("cannot open {}/{name}: {e}", path.display()))
    };
    let meta = open("meta")?;
    reserve_meta(path, &meta);
    Ok(ReplicaDir {
        path: path.to_path_buf(),
        data: open("data")?,
        journal: open("journal")?,
        meta,
        _lock: lock,
    })
}

/// Allocate whatever of `meta` is still sparse (replicas made before `init`
/// reserved it), so that checkpoints do not meet ENOSPC. A full filesystem
/// is only warned about here: the node can still serve reads, and what
/// fails later fails with a clear error.
fn reserve_meta(path: &Path, meta: &File) {
    let Ok(len) = meta.metadata().map(|m| m.len()) else {
        return;
    };
    // SAFETY: lseek on a descriptor we own; the offset is not used after.
    let hole = unsafe { libc::lseek(meta.as_raw_fd(), 0, libc::SEEK_HOLE) };
    if hole >= 0 && hole as u64 >= len {
        // Allocated already (every replica `init` made): nothing to do,
        // and a start that is then refused leaves even the file's times
        // alone (fallocate updates them).
        return;
    }
    // SAFETY: fallocate on a descriptor we own; KEEP_SIZE changes no length.
    let r = unsafe { libc::fallocate(meta.as_raw_fd(), libc::FALLOC_FL_KEEP_SIZE, 0, len as i64) };
    if r != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::ENOSPC) {
            crate::elog!(
                "nbdmirror: WARNING: cannot reserve space for {}/meta ({e}): the filesystem is \
                 full, and a checkpoint that needs new space there will fail and stop writes",
                path.display()
            );
        }
    }
}

/// The replica's `meta` file, read-only and without taking the lock (for
/// `info`, which only reads), and whether a running nbdmirror holds the
/// replica (then what is read is a snapshot).
pub fn open_meta_read_only(path: &Path) -> Result<(File, bool), String> {
    require_replica(path)?;
    let meta = File::open(path.join("meta"))
        .map_err(|e| format!("cannot open {}/meta: {e}", path.display()))?;
    Ok((meta, in_use(path)))
}

/// Whether nobody holds the replica at `path`: its lock file opens and
/// can be locked (false also when that cannot be known, e.g. the file is
/// not readable by this user).
pub fn lock_is_free(path: &Path) -> bool {
    File::open(path.join("lock")).is_ok_and(|f| {
        // SAFETY: flock on a descriptor we own; dropped (released) at once.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) == 0 }
    })
}

/// The device and inode of the replica's lock file at `path` ("dev:ino"):
/// what tells whether two paths (the node's and a tool's, from another
/// mount namespace) name the same replica.
pub fn lock_id(path: &Path) -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path.join("lock")).ok()?;
    Some(format!("{}:{}", m.dev(), m.ino()))
}

/// Whether a running nbdmirror holds the replica at `path` (its lock).
pub fn in_use(path: &Path) -> bool {
    File::open(path.join("lock")).is_ok_and(|f| {
        // SAFETY: flock on a descriptor we own; dropped (released) at once.
        unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_SH | libc::LOCK_NB) != 0 }
    })
}

/// A second descriptor of the replica's data file, opened with O_DIRECT.
pub fn open_direct(dir: &ReplicaDir) -> Result<File, String> {
    use std::os::unix::fs::OpenOptionsExt;
    OpenOptions::new()
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.path.join("data"))
        .map_err(|e| {
            format!(
                "cannot open {}/data for direct I/O: {e}",
                dir.path.display()
            )
        })
}

/// An O_DIRECT descriptor of `data` for reading (a scrub's reads), or why
/// there is none: the filesystem refuses O_DIRECT (tmpfs), or a probe read
/// through it fails.
pub fn open_media(dir: &ReplicaDir) -> Result<File, String> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(dir.path.join("data"))
        .map_err(|e| {
            format!(
                "cannot open {}/data for direct reads: {e}",
                dir.path.display()
            )
        })?;
    let mut buf: Vec<u8> = Vec::with_capacity(2 * 4096);
    let skip = buf.as_ptr().align_offset(4096);
    buf.resize(skip + 4096, 0);
    f.read_at(&mut buf[skip..], 0)
        .map_err(|e| format!("direct reads of {}/data fail: {e}", dir.path.display()))?;
    Ok(f)
}

/// Check that the files have the sizes the superblock promises.
pub fn check_sizes(dir: &ReplicaDir, sb: &Superblock) -> Result<(), String> {
    check_file_sizes(&dir.data, &dir.journal, &dir.meta, sb)
}

/// [`check_sizes`] for the three files, however they were opened.
pub fn check_file_sizes(
    data: &File,
    journal: &File,
    meta: &File,
    sb: &Superblock,
) -> Result<(), String> {
    let len = |f: &File| f.metadata().map(|m| m.len()).unwrap_or(0);
    if len(data) < sb.size {
        return Err(format!(
            "data file is {} bytes but the superblock says the disk is {} bytes; the replica is damaged",
            len(data),
            sb.size
        ));
    }
    if len(data) > sb.size {
        // Harmless (only the disk's bytes are served or checked), but an
        // operator who grew the file to grow the disk should hear that it
        // did not.
        crate::elog!(
            "nbdmirror: note: the data file is {} bytes, longer than the disk ({} bytes, from \
             the superblock): the extra bytes are ignored (a disk cannot be grown by growing \
             its data file)",
            len(data),
            sb.size
        );
    }
    if len(journal) < sb.journal_size {
        return Err(format!(
            "journal file is {} bytes but the superblock says {}; the replica is damaged",
            len(journal),
            sb.journal_size
        ));
    }
    let table = CHECKSUM_TABLE_OFFSET + sb.size / BLOCK_SIZE * 8;
    if len(meta) < table {
        return Err(format!(
            "metadata file is {} bytes, expected {table}; the replica is damaged",
            len(meta)
        ));
    }
    Ok(())
}
