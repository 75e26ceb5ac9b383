//! Shared harness for the end-to-end tests: temp dirs, free ports, a guard
//! that runs the NBD server under test, command helpers, a tool check that
//! fails in CI, a tiny JSON reader and a minimal NBD client.
//!
//! The server under test is picked with `NBDMIRROR_TEST_SERVER`:
//! * `nbdmirror` (default): `nbdmirror init` + `nbdmirror serve`;
//! * `nbdkit`: `nbdkit file` on a preallocated image, with filters so that it
//!   advertises the same block sizes and export names as nbdmirror;
//! * `qemu-nbd`: `qemu-nbd -t -e 8 -f raw -x disk` on a preallocated image.
//!
//! The reference servers exist to "test the tests": the whole suite must pass
//! against them too, except where a test documents a legitimate difference.
#![allow(dead_code)]

use std::collections::hash_map::DefaultHasher;
use std::fmt::Write as _;
use std::fs::{self, File};
use std::hash::{Hash, Hasher};
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;

/// Path of the server binary built by cargo for these tests.
pub const NBDMIRROR_BIN: &str = env!("CARGO_BIN_EXE_nbdmirror");
/// Directory of this package (for the python scripts under tests/).
pub const MANIFEST_DIR: &str = env!("CARGO_MANIFEST_DIR");

// ------------------------------------------------------------------ temp dirs

/// A unique directory under `std::env::temp_dir()`, removed on drop (kept if
/// `NBDMIRROR_KEEP_TMP` is set, for post-mortems).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .subsec_nanos();
        let n = COUNTER.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "nbdmirror-test-{}-{}-{}-{:08x}",
            tag,
            std::process::id(),
            n,
            nanos
        ));
        fs::create_dir_all(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        TempDir { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join<P: AsRef<Path>>(&self, p: P) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("NBDMIRROR_KEEP_TMP").is_some() {
            eprintln!("keeping {}", self.path.display());
            return;
        }
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().unwrap().port()
}

// ------------------------------------------------------------------ tools

/// True when running in CI (`CI=true`): missing tools are then failures.
pub fn in_ci() -> bool {
    matches!(
        std::env::var("CI").as_deref(),
        Ok("true") | Ok("1") | Ok("TRUE") | Ok("yes")
    )
}

/// Full path of an executable found on PATH (plus the sbin directories,
/// which a non-login PATH may lack: losetup, mkfs.ext4, e2fsck live there).
pub fn find_tool(name: &str) -> Option<PathBuf> {
    if name.contains('/') {
        let p = PathBuf::from(name);
        return is_executable(&p).then_some(p);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let extra = ["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"];
    std::env::split_paths(&path)
        .chain(extra.iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// Path of a tool, panicking if it is missing (use after `require_tools`).
pub fn tool(name: &str) -> PathBuf {
    find_tool(name).unwrap_or_else(|| panic!("tool {name} not found"))
}

/// Returns true if every tool exists. Otherwise: outside CI prints a SKIP
/// line and returns false (the caller returns early); in CI (`CI=true`)
/// panics, so a missing tool can never make a test silently pass.
pub fn require_tools(test: &str, tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools
        .iter()
        .copied()
        .filter(|t| find_tool(t).is_none())
        .collect();
    if missing.is_empty() {
        return true;
    }
    skip_or_fail(test, &format!("missing tools: {}", missing.join(", ")))
}

/// Skip (outside CI) or fail (in CI) with a reason.
pub fn skip_or_fail(test: &str, reason: &str) -> bool {
    if in_ci() {
        panic!("{test}: {reason} (CI=true, so this is a failure, not a skip; run tools/install-deps.sh)");
    }
    eprintln!("SKIP {test}: {reason} (would fail with CI=true)");
    false
}

/// `/usr/bin/python3` with the Debian `python3-libnbd` module importable.
pub const SYSTEM_PYTHON: &str = "/usr/bin/python3";

pub fn require_python_libnbd(test: &str) -> bool {
    let ok = Command::new(SYSTEM_PYTHON)
        .args(["-c", "import nbd"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok || skip_or_fail(
        test,
        "/usr/bin/python3 cannot `import nbd` (package python3-libnbd)",
    )
}

/// Some python3 for the stdlib-only scripts.
pub fn any_python() -> Option<PathBuf> {
    find_tool(SYSTEM_PYTHON).or_else(|| find_tool("python3"))
}

// ------------------------------------------------------------------ commands

/// Render a command for messages.
pub fn describe(cmd: &Command) -> String {
    let mut s = cmd.get_program().to_string_lossy().into_owned();
    for a in cmd.get_args() {
        let a = a.to_string_lossy();
        if a.contains(' ') || a.is_empty() {
            let _ = write!(s, " '{a}'");
        } else {
            let _ = write!(s, " {a}");
        }
    }
    s
}

/// Spawn `cmd` and capture its stdout and stderr. `Err` carries what it
/// printed if it outlived `timeout` (it is killed then).
fn capture(cmd: &mut Command, timeout: Duration) -> Result<Output, Result<Output, String>> {
    let desc = describe(cmd);
    let mut child = match cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) => return Err(Err(format!("spawn `{desc}`: {e}"))),
    };
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let to = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        v
    });
    let te = thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    let start = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break st,
            Ok(None) => {}
            Err(e) => return Err(Err(format!("wait for `{desc}`: {e}"))),
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let st = child.wait().expect("wait after kill");
            return Err(Ok(Output {
                status: st,
                stdout: to.join().unwrap(),
                stderr: te.join().unwrap(),
            }));
        }
        thread::sleep(Duration::from_millis(10));
    };
    Ok(Output {
        status,
        stdout: to.join().unwrap(),
        stderr: te.join().unwrap(),
    })
}

/// Run a command with a timeout, capturing stdout and stderr. A command that
/// outlives the timeout is killed and reported as a failure.
pub fn run_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = describe(cmd);
    eprintln!("+ {desc}");
    match capture(cmd, timeout) {
        Ok(out) => out,
        Err(Err(e)) => panic!("{e}"),
        Err(Ok(out)) => panic!(
            "`{desc}` did not finish within {:?}; killed\n--- stdout ---\n{}\n--- stderr ---\n{}",
            timeout,
            tail(&String::from_utf8_lossy(&out.stdout), 20000),
            tail(&String::from_utf8_lossy(&out.stderr), 20000)
        ),
    }
}

/// Run a command quietly with a timeout (for status polls). Err on spawn
/// failure or timeout (the command is killed).
pub fn run_quiet(cmd: &mut Command, timeout: Duration) -> Result<Output, String> {
    let desc = describe(cmd);
    capture(cmd, timeout).map_err(|e| match e {
        Err(e) => e,
        Ok(_) => format!("`{desc}` did not finish within {timeout:?}"),
    })
}

/// Run a command (default timeout 5 minutes) and assert it succeeded,
/// printing stdout/stderr on failure. Returns the output.
pub fn run_ok(cmd: &mut Command) -> Output {
    run_ok_timeout(cmd, Duration::from_secs(300))
}

pub fn run_ok_timeout(cmd: &mut Command, timeout: Duration) -> Output {
    let desc = describe(cmd);
    let out = run_timeout(cmd, timeout);
    if !out.status.success() {
        panic!(
            "`{desc}` failed: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            out.status,
            tail(&String::from_utf8_lossy(&out.stdout), 30000),
            tail(&String::from_utf8_lossy(&out.stderr), 30000)
        );
    }
    out
}

/// Poll `log()` until a line contains `needle` (up to 20 s) and return
/// that line; panic with the log's tail if none comes.
pub fn wait_for_line(log: impl Fn() -> String, needle: &str) -> String {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let text = log();
        if let Some(l) = text.lines().find(|l| l.contains(needle)) {
            return l.to_string();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no line with {needle:?} in 20 s:\n{}",
            tail(&text, 3000)
        );
        thread::sleep(Duration::from_millis(200));
    }
}

/// The last `n` bytes of a string (on a char boundary).
pub fn tail(s: &str, n: usize) -> &str {
    if s.len() <= n {
        return s;
    }
    let mut i = s.len() - n;
    while !s.is_char_boundary(i) {
        i += 1;
    }
    &s[i..]
}

pub fn stdout_str(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Send a signal to a process by pid with kill(1) (std has no kill(2)).
pub fn send_signal(pid: u32, sig: &str) {
    let st = Command::new("kill")
        .args([&format!("-{sig}"), &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(st.success(), "kill -{sig} {pid} failed");
}

// ------------------------------------------------------------------ data

/// Deterministic pseudo-random bytes (xorshift64*), fast enough for
/// hundreds of MiB.
pub fn fill_random(seed: u64, buf: &mut [u8]) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    for chunk in buf.chunks_mut(8) {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let v = x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

pub fn random_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    fill_random(seed, &mut v);
    v
}

/// Write `size` bytes of seeded random data to `path` in 1 MiB pieces;
/// ranges listed in `holes` (offset, len; MiB-aligned) are left as sparse
/// holes (they read as zeroes).
pub fn write_random_file(path: &Path, size: u64, seed: u64, holes: &[(u64, u64)]) {
    let mut f = File::create(path).unwrap();
    f.set_len(size).unwrap();
    let mut buf = vec![0u8; MIB as usize];
    let mut off = 0;
    use std::io::{Seek, SeekFrom};
    while off < size {
        let n = (size - off).min(MIB) as usize;
        let in_hole = holes.iter().any(|&(h, l)| off >= h && off < h + l);
        if !in_hole {
            fill_random(seed ^ (off / MIB).wrapping_mul(0x1000_0001), &mut buf[..n]);
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&buf[..n]).unwrap();
        }
        off += n as u64;
    }
    f.sync_all().unwrap();
}

/// Compare two files byte for byte; panic with the first differing offset.
pub fn assert_files_equal(a: &Path, b: &Path) {
    let la = fs::metadata(a).unwrap().len();
    let lb = fs::metadata(b).unwrap().len();
    assert_eq!(
        la,
        lb,
        "{} is {la} bytes but {} is {lb}",
        a.display(),
        b.display()
    );
    let mut fa = io::BufReader::with_capacity(MIB as usize, File::open(a).unwrap());
    let mut fb = io::BufReader::with_capacity(MIB as usize, File::open(b).unwrap());
    let mut ba = vec![0u8; MIB as usize];
    let mut bb = vec![0u8; MIB as usize];
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(MIB) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = (0..n).find(|&i| ba[i] != bb[i]).unwrap();
            panic!(
                "{} and {} differ at byte {} (0x{:02x} vs 0x{:02x})",
                a.display(),
                b.display(),
                off + i as u64,
                ba[i],
                bb[i]
            );
        }
        off += n as u64;
    }
}

pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

// ------------------------------------------------------------------ servers

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ServerKind {
    Nbdmirror,
    Nbdkit,
    QemuNbd,
}

impl ServerKind {
    /// From `NBDMIRROR_TEST_SERVER` (default `nbdmirror`).
    pub fn from_env() -> ServerKind {
        match std::env::var("NBDMIRROR_TEST_SERVER").as_deref() {
            Err(_) | Ok("") | Ok("nbdmirror") => ServerKind::Nbdmirror,
            Ok("nbdkit") => ServerKind::Nbdkit,
            Ok("qemu-nbd") | Ok("qemu") => ServerKind::QemuNbd,
            Ok(other) => {
                panic!("NBDMIRROR_TEST_SERVER={other}: expected nbdmirror, nbdkit or qemu-nbd")
            }
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            ServerKind::Nbdmirror => "nbdmirror",
            ServerKind::Nbdkit => "nbdkit",
            ServerKind::QemuNbd => "qemu-nbd",
        }
    }

    /// Tools needed to run this server.
    pub fn tools(self) -> &'static [&'static str] {
        match self {
            ServerKind::Nbdmirror => &[],
            ServerKind::Nbdkit => &["nbdkit"],
            ServerKind::QemuNbd => &["qemu-nbd"],
        }
    }

    /// The export name clients use by default. nbdmirror and (our) nbdkit
    /// answer to both "" and "disk"; qemu-nbd serves only "disk".
    pub fn default_export(self) -> &'static str {
        match self {
            ServerKind::QemuNbd => "disk",
            _ => "",
        }
    }

    /// Whether the server is expected to advertise NBD_FLAG_SEND_FAST_ZERO
    /// (nbdkit's file plugin does not on this setup).
    pub fn advertises_fast_zero(self) -> bool {
        !matches!(self, ServerKind::Nbdkit)
    }

    /// True for the server this project builds, whose exact behaviour the
    /// tests hold to the spec's SHOULDs as well.
    pub fn is_nbdmirror(self) -> bool {
        self == ServerKind::Nbdmirror
    }
}

/// Check that the server under test can be run at all (tools present).
/// Whether the server under test is nbdmirror; if not, says that `test`
/// is skipped because it tests `what` (something only nbdmirror has).
pub fn nbdmirror_only(test: &str, what: &str) -> bool {
    let kind = ServerKind::from_env();
    if !kind.is_nbdmirror() {
        eprintln!("SKIP {test}: {what} (server under test: {})", kind.name());
    }
    kind.is_nbdmirror()
}

pub fn require_server(test: &str) -> bool {
    require_tools(test, ServerKind::from_env().tools())
}

/// Format a size for `nbdmirror init --size`: binary suffix when exact, to
/// exercise the suffix parser, else plain bytes.
pub fn size_arg(size: u64) -> String {
    if size.is_multiple_of(GIB) {
        format!("{}G", size / GIB)
    } else if size.is_multiple_of(MIB) {
        format!("{}M", size / MIB)
    } else if size.is_multiple_of(KIB) {
        format!("{}K", size / KIB)
    } else {
        size.to_string()
    }
}

/// The storage behind an export: an nbdmirror replica directory or a raw
/// image file for the reference servers. Survives server restarts.
pub struct Export {
    pub kind: ServerKind,
    pub size: u64,
    /// nbdmirror: the replica directory; others: the image file.
    pub path: PathBuf,
    /// where server logs go
    pub log_dir: PathBuf,
    /// Extra `nbdmirror serve` arguments (ignored by the other servers).
    pub serve_args: Vec<String>,
}

impl Export {
    /// Create storage of `size` bytes inside `tmp`.
    pub fn create(tmp: &TempDir, size: u64) -> Export {
        let kind = ServerKind::from_env();
        let log_dir = tmp.join("logs");
        fs::create_dir_all(&log_dir).unwrap();
        let path = match kind {
            ServerKind::Nbdmirror => {
                let dir = tmp.join("replica");
                run_ok_timeout(
                    Command::new(NBDMIRROR_BIN)
                        .arg("init")
                        .arg("--dir")
                        .arg(&dir)
                        .arg("--size")
                        .arg(size_arg(size)),
                    Duration::from_secs(120),
                );
                dir
            }
            ServerKind::Nbdkit | ServerKind::QemuNbd => {
                let img = tmp.join("disk.img");
                let f = File::create(&img).unwrap();
                drop(f);
                // Preallocate (as a real disk would be); fall back to sparse.
                let ok = find_tool("fallocate")
                    .map(|fa| {
                        Command::new(fa)
                            .arg("-l")
                            .arg(size.to_string())
                            .arg(&img)
                            .status()
                            .map(|s| s.success())
                            .unwrap_or(false)
                    })
                    .unwrap_or(false);
                if !ok {
                    File::options()
                        .write(true)
                        .open(&img)
                        .unwrap()
                        .set_len(size)
                        .unwrap();
                }
                img
            }
        };
        Export {
            kind,
            size,
            path,
            log_dir,
            serve_args: Vec::new(),
        }
    }

    /// Start a server on this export (TCP on 127.0.0.1, free port) and wait
    /// until it accepts connections.
    pub fn serve(&self) -> Server {
        let mut last_err = String::new();
        for attempt in 0..3 {
            let port = free_port();
            match Server::start(self, port, attempt) {
                Ok(s) => return s,
                Err(e) => last_err = e,
            }
        }
        panic!("could not start {}: {last_err}", self.kind.name());
    }
}

/// A running server process; killed (SIGKILL) on drop if still running.
pub struct Server {
    pub kind: ServerKind,
    pub port: u16,
    child: Option<Child>,
    stderr_path: PathBuf,
    pub size: u64,
}

impl Server {
    fn command(export: &Export, port: u16) -> Command {
        match export.kind {
            ServerKind::Nbdmirror => {
                let mut c = Command::new(NBDMIRROR_BIN);
                c.arg("serve")
                    .arg("--dir")
                    .arg(&export.path)
                    .arg("--listen")
                    .arg(format!("127.0.0.1:{port}"))
                    .args(&export.serve_args);
                c
            }
            ServerKind::Nbdkit => {
                let mut c = Command::new(tool("nbdkit"));
                c.args([
                    "-f",
                    "--exit-with-parent",
                    "-i",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                ])
                // Advertise the block sizes nbdmirror advertises and enforce them,
                // and answer only to "" and "disk" like nbdmirror.
                .args(["--filter=exportname", "--filter=blocksize-policy", "file"])
                .arg(&export.path)
                .args([
                    "blocksize-minimum=1",
                    "blocksize-preferred=4096",
                    "blocksize-maximum=33554432",
                    "blocksize-error-policy=error",
                    "exportname=",
                    "exportname=disk",
                    "exportname-strict=true",
                    "exportname-list=explicit",
                ]);
                c
            }
            ServerKind::QemuNbd => {
                let mut c = Command::new(tool("qemu-nbd"));
                c.args([
                    "-t",
                    "-e",
                    "8",
                    "-f",
                    "raw",
                    "-b",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-x",
                    "disk",
                ])
                .arg(&export.path);
                c
            }
        }
    }

    fn start(export: &Export, port: u16, attempt: u32) -> Result<Server, String> {
        let stderr_path = export
            .log_dir
            .join(format!("{}-{port}-{attempt}.stderr", export.kind.name()));
        let stdout_path = export
            .log_dir
            .join(format!("{}-{port}-{attempt}.stdout", export.kind.name()));
        let mut cmd = Server::command(export, port);
        eprintln!("+ {} &", describe(&cmd));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(File::create(&stdout_path).unwrap())
            .stderr(File::create(&stderr_path).unwrap())
            .spawn()
            .map_err(|e| format!("spawn {}: {e}", describe(&cmd)))?;
        let mut s = Server {
            kind: export.kind,
            port,
            child: Some(child),
            stderr_path,
            size: export.size,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        loop {
            if let Some(st) = s.child.as_mut().unwrap().try_wait().unwrap() {
                s.child = None;
                return Err(format!(
                    "{} exited during startup with {st}\n--- stderr ---\n{}",
                    export.kind.name(),
                    s.stderr()
                ));
            }
            if let Ok(c) = TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
                let _ = c.shutdown(Shutdown::Both);
                return Ok(s);
            }
            if Instant::now() > deadline {
                let stderr = s.stderr();
                drop(s);
                panic!(
                    "{} did not accept TCP connections on {addr} within 10 s\n--- stderr ---\n{stderr}",
                    export.kind.name()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// URI of the default export for this server kind.
    pub fn uri(&self) -> String {
        self.uri_named(self.kind.default_export())
    }

    pub fn uri_named(&self, name: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, name)
    }

    pub fn export_name(&self) -> &'static str {
        self.kind.default_export()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server not running").id()
    }

    /// What the server wrote to stderr so far.
    pub fn stderr(&self) -> String {
        fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    /// Panic (with the server's stderr) if the server has exited.
    pub fn assert_running(&mut self) {
        let c = self.child.as_mut().expect("server was already stopped");
        if let Some(st) = c.try_wait().unwrap() {
            self.child = None;
            panic!(
                "{} died: {st}\n--- stderr ---\n{}",
                self.kind.name(),
                tail(&self.stderr(), 20000)
            );
        }
    }

    /// SIGTERM the server and wait (up to `timeout`) for it to exit;
    /// returns its exit status. Panics with stderr if it does not exit.
    pub fn terminate_timeout(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("server not running");
        if let Some(st) = child.try_wait().unwrap() {
            panic!(
                "{} had already exited ({st}) before SIGTERM\n--- stderr ---\n{}",
                self.kind.name(),
                tail(&self.stderr(), 20000)
            );
        }
        send_signal(child.id(), "TERM");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(st) = child.try_wait().unwrap() {
                return st;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{} did not exit within {timeout:?} of SIGTERM\n--- stderr ---\n{}",
                    self.kind.name(),
                    tail(&self.stderr(), 20000)
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL the server (a crash) and reap it.
    pub fn kill(&mut self) -> ExitStatus {
        let mut child = self.child.take().expect("server not running");
        let _ = child.kill();
        child.wait().expect("wait for killed server")
    }

    pub fn terminate(&mut self) -> ExitStatus {
        self.terminate_timeout(Duration::from_secs(30))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
            if thread::panicking() {
                eprintln!(
                    "--- {} stderr (port {}) ---\n{}",
                    self.kind.name(),
                    self.port,
                    tail(&self.stderr(), 20000)
                );
            }
        }
    }
}

// ------------------------------------------------------------------ minimal JSON

/// Just enough JSON for nbdinfo/fio/qemu-img output.
#[derive(Debug, Clone, PartialEq)]
pub enum Json {
    Null,
    Bool(bool),
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    pub fn parse(s: &str) -> Result<Json, String> {
        let b = s.as_bytes();
        let mut i = 0;
        let v = parse_value(b, &mut i)?;
        skip_ws(b, &mut i);
        if i != b.len() {
            return Err(format!("trailing data at byte {i}"));
        }
        Ok(v)
    }

    pub fn get(&self, key: &str) -> Option<&Json> {
        match self {
            Json::Obj(kv) => kv.iter().find(|(k, _)| k == key).map(|(_, v)| v),
            _ => None,
        }
    }

    /// `self[key]`, panicking with the document if missing.
    pub fn at(&self, key: &str) -> &Json {
        self.get(key)
            .unwrap_or_else(|| panic!("JSON key {key:?} missing in {self:?}"))
    }

    pub fn as_bool(&self) -> Option<bool> {
        if let Json::Bool(b) = self {
            Some(*b)
        } else {
            None
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        if let Json::Num(n) = self {
            (*n >= 0.0 && n.fract() == 0.0).then_some(*n as u64)
        } else {
            None
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        if let Json::Num(n) = self {
            Some(*n)
        } else {
            None
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        if let Json::Str(s) = self {
            Some(s)
        } else {
            None
        }
    }

    pub fn as_array(&self) -> &[Json] {
        match self {
            Json::Arr(v) => v,
            _ => &[],
        }
    }
}

fn skip_ws(b: &[u8], i: &mut usize) {
    while *i < b.len() && b[*i].is_ascii_whitespace() {
        *i += 1;
    }
}

fn parse_value(b: &[u8], i: &mut usize) -> Result<Json, String> {
    skip_ws(b, i);
    match b.get(*i) {
        None => Err("unexpected end".into()),
        Some(b'{') => {
            *i += 1;
            let mut kv = Vec::new();
            loop {
                skip_ws(b, i);
                if b.get(*i) == Some(&b'}') {
                    *i += 1;
                    return Ok(Json::Obj(kv));
                }
                let k = match parse_value(b, i)? {
                    Json::Str(s) => s,
                    other => return Err(format!("object key {other:?}")),
                };
                skip_ws(b, i);
                if b.get(*i) != Some(&b':') {
                    return Err(format!("expected ':' at {}", *i));
                }
                *i += 1;
                let v = parse_value(b, i)?;
                kv.push((k, v));
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b'}') => {}
                    _ => return Err(format!("expected ',' or '}}' at {}", *i)),
                }
            }
        }
        Some(b'[') => {
            *i += 1;
            let mut v = Vec::new();
            loop {
                skip_ws(b, i);
                if b.get(*i) == Some(&b']') {
                    *i += 1;
                    return Ok(Json::Arr(v));
                }
                v.push(parse_value(b, i)?);
                skip_ws(b, i);
                match b.get(*i) {
                    Some(b',') => *i += 1,
                    Some(b']') => {}
                    _ => return Err(format!("expected ',' or ']' at {}", *i)),
                }
            }
        }
        Some(b'"') => {
            *i += 1;
            let mut s = Vec::new();
            while let Some(&c) = b.get(*i) {
                *i += 1;
                match c {
                    b'"' => return Ok(Json::Str(String::from_utf8_lossy(&s).into_owned())),
                    b'\\' => {
                        let e = *b.get(*i).ok_or("bad escape")?;
                        *i += 1;
                        match e {
                            b'n' => s.push(b'\n'),
                            b't' => s.push(b'\t'),
                            b'r' => s.push(b'\r'),
                            b'b' => s.push(8),
                            b'f' => s.push(12),
                            b'u' => {
                                let h = std::str::from_utf8(b.get(*i..*i + 4).ok_or("bad \\u")?)
                                    .unwrap();
                                let cp = u32::from_str_radix(h, 16).map_err(|e| e.to_string())?;
                                *i += 4;
                                let ch = char::from_u32(cp).unwrap_or('\u{fffd}');
                                let mut buf = [0u8; 4];
                                s.extend_from_slice(ch.encode_utf8(&mut buf).as_bytes());
                            }
                            other => s.push(other),
                        }
                    }
                    _ => s.push(c),
                }
            }
            Err("unterminated string".into())
        }
        Some(b't') if b[*i..].starts_with(b"true") => {
            *i += 4;
            Ok(Json::Bool(true))
        }
        Some(b'f') if b[*i..].starts_with(b"false") => {
            *i += 5;
            Ok(Json::Bool(false))
        }
        Some(b'n') if b[*i..].starts_with(b"null") => {
            *i += 4;
            Ok(Json::Null)
        }
        Some(_) => {
            let start = *i;
            while *i < b.len() && matches!(b[*i], b'-' | b'+' | b'.' | b'e' | b'E' | b'0'..=b'9') {
                *i += 1;
            }
            let t = std::str::from_utf8(&b[start..*i]).unwrap();
            t.parse::<f64>().map(Json::Num).map_err(|_| {
                format!(
                    "bad token at {start}: {:?}",
                    &b[start..(start + 10).min(b.len())]
                )
            })
        }
    }
}

// ------------------------------------------------------------------ mini NBD client

/// A minimal synchronous NBD client (fixed newstyle, OPT_GO, simple replies)
/// for tests that must control exactly when requests are sent, e.g. to keep
/// a connection open with unflushed writes while the server is stopped.
pub struct MiniClient {
    s: TcpStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

pub const NBD_CMD_READ: u16 = 0;
pub const NBD_CMD_WRITE: u16 = 1;
pub const NBD_CMD_DISC: u16 = 2;
pub const NBD_CMD_FLUSH: u16 = 3;

impl MiniClient {
    pub fn connect(addr: &str, export: &str) -> io::Result<MiniClient> {
        let mut s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut g = [0u8; 18];
        s.read_exact(&mut g)?;
        assert_eq!(&g[..8], b"NBDMAGIC", "server greeting magic");
        assert_eq!(&g[8..16], b"IHAVEOPT", "server is not newstyle");
        let hflags = u16::from_be_bytes([g[16], g[17]]);
        let cflags: u32 = 1 | (hflags as u32 & 2); // FIXED_NEWSTYLE (+ NO_ZEROES if offered)
        s.write_all(&cflags.to_be_bytes())?;
        // OPT_GO with no info requests
        let mut data = Vec::new();
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut opt = Vec::new();
        opt.extend_from_slice(b"IHAVEOPT");
        opt.extend_from_slice(&7u32.to_be_bytes());
        opt.extend_from_slice(&(data.len() as u32).to_be_bytes());
        opt.extend_from_slice(&data);
        s.write_all(&opt)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut h = [0u8; 20];
            s.read_exact(&mut h)?;
            let rtype = u32::from_be_bytes(h[12..16].try_into().unwrap());
            let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
            let mut d = vec![0u8; len];
            s.read_exact(&mut d)?;
            match rtype {
                1 => break, // ACK
                3 if len >= 12 && d[0..2] == [0, 0] => {
                    size = Some(u64::from_be_bytes(d[2..10].try_into().unwrap()));
                    flags = u16::from_be_bytes(d[10..12].try_into().unwrap());
                }
                t if t & 0x8000_0000 != 0 => {
                    return Err(io::Error::other(format!(
                        "OPT_GO failed: reply type {t:#x}"
                    )))
                }
                _ => {}
            }
        }
        let size = size.ok_or_else(|| io::Error::other("no NBD_INFO_EXPORT"))?;
        Ok(MiniClient {
            s,
            size,
            flags,
            cookie: 1,
        })
    }

    /// Send any request without waiting for its reply; returns the cookie.
    pub fn request(
        &mut self,
        flags: u16,
        ty: u16,
        offset: u64,
        len: u32,
        payload: &[u8],
    ) -> io::Result<u64> {
        let cookie = self.cookie;
        self.cookie += 1;
        let mut h = request_header(flags, ty, cookie, offset, len);
        h.extend_from_slice(payload);
        self.s.write_all(&h)?;
        Ok(cookie)
    }

    fn simple_reply(&mut self, cookie: u64) -> io::Result<u32> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            0x6744_6698,
            "simple reply magic"
        );
        assert_eq!(
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            cookie,
            "reply cookie"
        );
        Ok(u32::from_be_bytes(r[4..8].try_into().unwrap()))
    }

    /// WRITE (flags: 1 = FUA); returns the NBD error value (0 = success).
    pub fn write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u32> {
        let c = self.request(flags, NBD_CMD_WRITE, offset, data.len() as u32, data)?;
        self.simple_reply(c)
    }

    /// A request without payload or data reply (TRIM = 4, WRITE_ZEROES =
    /// 6, FLUSH = 3); returns the NBD error value.
    pub fn command(&mut self, ty: u16, offset: u64, len: u32) -> io::Result<u32> {
        let c = self.request(0, ty, offset, len, &[])?;
        self.simple_reply(c)
    }

    pub fn read(&mut self, offset: u64, len: u32) -> io::Result<Vec<u8>> {
        let c = self.request(0, NBD_CMD_READ, offset, len, &[])?;
        let err = self.simple_reply(c)?;
        if err != 0 {
            return Err(io::Error::other(format!("READ error {err}")));
        }
        let mut v = vec![0u8; len as usize];
        self.s.read_exact(&mut v)?;
        Ok(v)
    }

    pub fn flush(&mut self) -> io::Result<u32> {
        let c = self.request(0, NBD_CMD_FLUSH, 0, 0, &[])?;
        self.simple_reply(c)
    }

    pub fn set_write_timeout(&mut self, t: Duration) -> io::Result<()> {
        self.s.set_write_timeout(Some(t))
    }

    /// Send a WRITE without waiting for its reply; returns the cookie.
    pub fn send_write(&mut self, offset: u64, data: &[u8], flags: u16) -> io::Result<u64> {
        self.request(flags, NBD_CMD_WRITE, offset, data.len() as u32, data)
    }

    /// The connection, for tests that drive the socket themselves.
    pub fn stream(&mut self) -> &mut TcpStream {
        &mut self.s
    }

    /// Send raw bytes (e.g. half a request).
    pub fn send_raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.s.write_all(bytes)
    }

    /// Read the next simple reply to a non-READ request: (cookie, error).
    pub fn recv_reply(&mut self) -> io::Result<(u64, u32)> {
        let mut r = [0u8; 16];
        self.s.read_exact(&mut r)?;
        assert_eq!(
            u32::from_be_bytes(r[0..4].try_into().unwrap()),
            0x6744_6698,
            "simple reply magic"
        );
        Ok((
            u64::from_be_bytes(r[8..16].try_into().unwrap()),
            u32::from_be_bytes(r[4..8].try_into().unwrap()),
        ))
    }

    /// Soft disconnect.
    pub fn disconnect(mut self) {
        let _ = self.request(0, NBD_CMD_DISC, 0, 0, &[]);
        let _ = self.s.shutdown(Shutdown::Write);
    }

    /// True if the server closed the connection (EOF/reset) within `timeout`.
    pub fn wait_closed(&mut self, timeout: Duration) -> bool {
        let _ = self.s.set_read_timeout(Some(timeout));
        let mut b = [0u8; 1];
        match self.s.read(&mut b) {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
        }
    }
}

/// A request header's 28 bytes (a WRITE's payload goes after them).
pub fn request_header(flags: u16, ty: u16, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
    let mut r = Vec::with_capacity(28);
    r.extend_from_slice(&0x2560_9513u32.to_be_bytes());
    r.extend_from_slice(&flags.to_be_bytes());
    r.extend_from_slice(&ty.to_be_bytes());
    r.extend_from_slice(&cookie.to_be_bytes());
    r.extend_from_slice(&offset.to_be_bytes());
    r.extend_from_slice(&len.to_be_bytes());
    r
}

/// The run's seed: `SEED` from the environment, else from the clock.
pub fn test_seed(test: &str) -> u64 {
    let seed = match std::env::var("SEED") {
        Ok(s) => {
            let s = s.trim();
            let v = if let Some(h) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
                u64::from_str_radix(h, 16)
            } else {
                s.parse::<u64>()
            };
            v.unwrap_or_else(|e| panic!("SEED={s:?} is not a number: {e}"))
        }
        Err(_) => {
            let d = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap();
            (d.as_nanos() as u64) ^ ((std::process::id() as u64) << 32)
        }
    };
    eprintln!("{test}: SEED={seed} (rerun with SEED={seed})");
    seed
}

/// splitmix64: small, fast, good enough for test choices.
#[derive(Clone)]
pub struct Rng(pub u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x5DEE_CE66_D1CE_4E5B)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in 0..n (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// Uniform in lo..=hi.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
    pub fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }
}
