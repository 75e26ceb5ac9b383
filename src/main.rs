//! `nbdmirror`: command-line entry point.
//!
//! Owns: argument parsing and turning it into calls on `store::dir` (init),
//! `server` (serve) and the admin socket (`resync`). Errors reach the user as
//! one line and a non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nbdmirror::mirror::{MirrorConfig, NodeRole};
use nbdmirror::server::{self, DirectWrites, Listen, ServeConfig};
use nbdmirror::size::parse_size;

fn parse_inplace_min(s: &str) -> Result<u64, String> {
    let n = parse_size(s)?;
    if !n.is_multiple_of(4096) {
        return Err(format!(
            "{s:?} is not a multiple of 4096 (examples: 4K, 256K, 0)"
        ));
    }
    Ok(n)
}
use nbdmirror::store::{dir, Tuning};

#[derive(Parser)]
#[command(
    name = "nbdmirror",
    version,
    about = "Userspace block-device mirroring driver serving NBD over io_uring"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

// Parsed once at start; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// Create a replica directory for a new disk.
    Init {
        /// Replica directory (created if missing; must not hold a replica).
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        /// Disk size: bytes or with a K/M/G/T suffix (binary units), a multiple of 4 KiB.
        #[arg(long, value_parser = parse_size, required_unless_present = "config")]
        size: Option<u64>,
        /// Journal ring size (default: half the disk, between 16 MiB and 1 GiB).
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// This node's id within its volume (1 or more; each node its own; default 1).
        #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
        node_id: Option<u32>,
        /// Join an existing volume (its uuid, as `init` or `info` printed it)
        /// instead of creating a new one.
        #[arg(long)]
        volume_uuid: Option<String>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Serve a replica directory over NBD.
    Serve {
        /// Replica directory.
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
        /// Create the replica with this size first if the directory holds none
        /// (a replica of another size there is refused).
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// TCP address to listen on, HOST:PORT (repeatable; a host name is
        /// resolved, its first address used). Default 127.0.0.1:10809
        /// unless --unix is given or systemd passed sockets.
        #[arg(long, value_parser = parse_addr)]
        listen: Vec<SocketAddr>,
        /// Unix socket path to listen on.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// Export name (the default export "" also selects it). Default "disk".
        #[arg(long)]
        export_name: Option<String>,
        /// Do not verify block checksums on reads.
        #[arg(long)]
        no_verify_reads: bool,
        /// Checkpoint at least this often (ms) when something was applied;
        /// a checkpoint also runs whenever the journal is 40% full.
        #[arg(long, default_value_t = 30_000)]
        checkpoint_interval_ms: u64,
        /// Sync the journal at least this often (ms) when writes are unsynced.
        #[arg(long, default_value_t = 200)]
        sync_interval_ms: u64,
        /// primary: serves NBD and mirrors to its peers; secondary: accepts
        /// the replication stream and serves no NBD writes. Default: primary,
        /// or with --config what its `primary` says for this node.
        #[arg(long, value_enum)]
        role: Option<RoleArg>,
        /// (primary, repeatable) A secondary to mirror every write to: ID=HOST:PORT.
        #[arg(long, value_parser = parse_peer)]
        peer: Vec<(u32, SocketAddr)>,
        /// (secondary) Address to accept the replication stream on, HOST:PORT.
        #[arg(long, value_parser = parse_addr)]
        peer_listen: Option<SocketAddr>,
        /// File holding the volume's shared secret (at least 16 bytes; a
        /// trailing newline is ignored). Needed with --peer or --peer-listen.
        #[arg(long)]
        secret_file: Option<PathBuf>,
        /// A peer that does not answer within this many ms is disconnected
        /// (client I/O goes on; what it misses is recorded in its bitmap).
        /// Default 3000.
        #[arg(long)]
        peer_timeout_ms: Option<u64>,
        /// Resync rate cap in bytes per second, for each peer (K/M/G
        /// suffixes); 0 = unlimited (the default).
        #[arg(long, value_parser = parse_size)]
        resync_rate: Option<u64>,
        /// Control socket for `nbdmirror resync`, `scrub` and `switchover`
        /// (default DIR/admin.sock).
        #[arg(long)]
        admin_socket: Option<PathBuf>,
        /// Scrub (read and verify every block, and compare it with every
        /// in-sync peer) at this interval, counted from the end of the last
        /// scrub: 30d, 12h, 90m; 0 or off = only when `nbdmirror scrub
        /// start` asks. Default off. A primary only.
        #[arg(long, value_parser = nbdmirror::size::parse_duration_secs)]
        scrub_interval: Option<u64>,
        /// Scrub rate cap in bytes per second (K/M/G suffixes); 0 =
        /// unlimited. Default 100M.
        #[arg(long, value_parser = parse_size)]
        scrub_rate: Option<u64>,
        /// Large writes straight to the data file with O_DIRECT, bypassing
        /// the page cache (on), or through it (off; auto, the default, is
        /// off: faster here on every node, docs/mirroring.md).
        #[arg(long, value_enum, default_value_t = DirectWrites::Auto)]
        direct_writes: DirectWrites,
        /// Writes of whole 4 KiB blocks at least this long go straight to
        /// the data file, with only a small intent record in the journal
        /// (K/M suffixes; a multiple of 4096; 0 = journal every write).
        /// Default 4K (docs/design.md, "In-place writes").
        #[arg(long, value_parser = parse_inplace_min)]
        inplace_min: Option<u64>,
        /// At most this many 16 MiB regions open to in-place writes smaller
        /// than 256 KiB at once (crash recovery re-checksums them all).
        /// Default 256 (4 GiB).
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
        inplace_regions: Option<u64>,
        /// Pin the event loop thread and its kernel I/O workers to this CPU
        /// (default: not pinned). Keeps the node's work off the cores its
        /// clients run on; see docs/design.md, "Placement".
        #[arg(long, value_name = "CPU")]
        cpu: Option<usize>,
        /// While at most 2 client requests are in flight, the event loop
        /// polls this many microseconds for the next one before it sleeps
        /// (a client sending one request at a time gets its answers 2-3x
        /// sooner on a VM); 0 = never poll. Not on a secondary.
        #[arg(long, value_name = "MICROSECONDS", default_value_t = 30)]
        poll_us: u64,
        /// Promote (serve as the primary) a replica that was partway
        /// through a resync when it stopped. Its blocks are a mix of old and
        /// new data and every peer will be made to match it: only for when
        /// it is the last copy left (`nbdmirror info` shows the state).
        #[arg(long)]
        force_inconsistent: bool,
        /// Recover from the older superblock slot even though the journal
        /// holds records of a newer run (its newest slot was damaged or
        /// lost): that run's writes since its last checkpoint are dropped.
        /// Refused without this flag.
        #[arg(long)]
        force_older_superblock: bool,
        /// Serve a primary whose journal is damaged in the middle (intact
        /// records after the damage: writes the clients saw flushed are
        /// lost here), making its peers match it. Refused without this
        /// flag when the node has peers, which hold those writes.
        #[arg(long)]
        accept_journal_loss: bool,
        /// Start each log line with the time (UTC, RFC 3339): auto = yes,
        /// unless stderr is the systemd journal, which stamps lines itself.
        #[arg(long, value_enum, default_value_t = LogTimestamps::Auto)]
        log_timestamps: LogTimestamps,
    },
    /// Watch and steer resynchronisation on a running node.
    Resync {
        #[command(subcommand)]
        action: ResyncCmd,
    },
    /// Check the data on a running primary in the background: every block
    /// is read and verified against its checksum (bad ones are repaired from
    /// a peer), and every in-sync peer verifies its copy and reports what it
    /// holds (bad or differing blocks are resent to it).
    Scrub {
        #[command(subcommand)]
        action: ScrubCmd,
    },
    /// Stop a primary so that a secondary can take over: it finishes its
    /// requests, makes every peer durable and hands its data generation over
    /// (docs/mirroring.md, "Generations and split brain"), then exits.
    /// Then start a secondary with `--role primary`, and this node as its
    /// secondary.
    Switchover {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Read every block of a stopped replica and compare it with its
    /// checksum: finds silent corruption before a client reads it. Exits 1
    /// if any block fails.
    Check {
        /// The replica directory (its node must not be running).
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
    /// Print a replica directory's superblock.
    Info {
        /// The replica directory.
        #[arg(long, required_unless_present = "config")]
        dir: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArgs,
    },
}

/// A node of a volume described by a config file (docs/config.md).
#[derive(clap::Args, Clone, Default)]
struct ConfigArgs {
    /// The volume's config file (TOML, the same on every node; see
    /// docs/config.md). With --node it stands for --dir and the volume's
    /// settings; options given on the command line win over the file.
    #[arg(long, requires = "node", conflicts_with = "dir")]
    config: Option<PathBuf>,
    /// Which node of the config file this is.
    #[arg(long, requires = "config")]
    node: Option<u32>,
}

impl ConfigArgs {
    /// The config and this node's entry, when --config was given.
    fn load(&self) -> Result<Option<(VolumeConfig, NodeConfig)>, String> {
        let (Some(path), Some(id)) = (&self.config, self.node) else {
            return Ok(None);
        };
        let c = VolumeConfig::load(path)?;
        let n = c.node(id)?.clone();
        Ok(Some((c, n)))
    }
}

/// `serve --log-timestamps`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum LogTimestamps {
    /// On, unless stderr is the systemd journal (which stamps lines itself).
    Auto,
    Always,
    Never,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    Primary,
    Secondary,
}

#[derive(clap::Args, Clone)]
struct AdminArgs {
    /// Replica directory of the running node (its admin socket is DIR/admin.sock).
    #[arg(long)]
    dir: Option<PathBuf>,
    /// The node's admin socket, if not DIR/admin.sock.
    #[arg(long)]
    admin_socket: Option<PathBuf>,
    #[command(flatten)]
    config: ConfigArgs,
}

#[derive(Subcommand)]
enum ResyncCmd {
    /// Show each peer's state and resync progress.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print one JSON object (for scripts).
        #[arg(long)]
        json: bool,
        /// Keep showing progress until every peer is in sync.
        #[arg(long)]
        watch: bool,
    },
    /// Start (or retry now) the resync of one peer or all.
    Start {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this peer (its node id); default: every peer.
        #[arg(long)]
        peer: Option<u32>,
        /// Resend everything, not only the dirty blocks.
        #[arg(long)]
        full: bool,
    },
    /// Pause resync (client writes still mirror).
    Pause {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this peer (its node id); default: every peer.
        #[arg(long)]
        peer: Option<u32>,
    },
    /// Resume a paused resync.
    Resume {
        #[command(flatten)]
        admin: AdminArgs,
        /// Only this peer (its node id); default: every peer.
        #[arg(long)]
        peer: Option<u32>,
    },
    /// Set the resync rate cap (bytes/s, K/M/G suffixes; 0 = unlimited).
    Rate {
        #[arg(value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

#[derive(Subcommand)]
enum ScrubCmd {
    /// Show the running scrub's progress, the last one's findings and the
    /// next scheduled one.
    Status {
        #[command(flatten)]
        admin: AdminArgs,
        /// Print one JSON object (for scripts).
        #[arg(long)]
        json: bool,
        /// Keep showing progress until the scrub ends.
        #[arg(long)]
        watch: bool,
    },
    /// Start a scrub from the first block.
    Start {
        #[command(flatten)]
        admin: AdminArgs,
        /// Wait for it to finish, showing progress (if a scrub is running
        /// already, wait for that one); exit 1 if it left bad blocks on
        /// this node that could not be repaired (or was paused), 2 if the
        /// node could not be asked until the end.
        #[arg(long)]
        wait: bool,
    },
    /// Pause the running scrub (it keeps its place, also across a restart).
    Pause {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Resume a paused scrub.
    Resume {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// End the running scrub now (recorded as incomplete).
    Cancel {
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Set the scrub rate cap (bytes/s, K/M/G suffixes; 0 = unlimited).
    Rate {
        #[arg(value_parser = parse_size)]
        rate: u64,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

/// `println!` for command output: a reader that went away (`| head`) ends
/// the command quietly; any other failure to write (a full disk) is an
/// error and exit status 1, never a panic.
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let r = writeln!(std::io::stdout(), $($arg)*);
        output_written(r);
    }};
}

/// `print!` (no newline) for command output, as [`out!`].
macro_rules! out_raw {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let mut o = std::io::stdout();
        let r = write!(o, $($arg)*).and_then(|_| o.flush());
        output_written(r);
    }};
}

fn output_written(r: std::io::Result<()>) {
    if let Err(e) = r {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            // The reader went away (`| head`): end as a program killed by
            // SIGPIPE does (status 141), as Rust ignores the signal. Exit 0
            // here told `check | head -1` that a failing replica was healthy
            // (a tester's find).
            unsafe {
                libc::signal(libc::SIGPIPE, libc::SIG_DFL);
                libc::raise(libc::SIGPIPE);
            }
            std::process::exit(141);
        }
        nbdmirror::elog!("nbdmirror: cannot write the output: {e}");
        std::process::exit(1);
    }
}

use nbdmirror::config::{parse_addr, NodeConfig, VolumeConfig, MIN_PEER_TIMEOUT_MS};

fn parse_peer(s: &str) -> Result<(u32, SocketAddr), String> {
    let (id, addr) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected ID=HOST:PORT, e.g. 2=10.0.0.2:10810"))?;
    let id: u32 = id
        .parse()
        .ok()
        .filter(|&n| n > 0)
        .ok_or_else(|| format!("{id:?} is not a node id (a number, 1 or more)"))?;
    Ok((id, parse_addr(addr)?))
}

fn read_secret(path: &std::path::Path) -> Result<Vec<u8>, String> {
    // A secret is short; reading at most a little more than the largest
    // sensible one keeps `--secret-file /dev/zero` from eating the memory.
    let mut s = nbdmirror::config::read_bounded(path, 4096, "secret file")?;
    // One trailing newline (an editor's or echo's) is not part of it.
    if s.last() == Some(&b'\n') {
        s.pop();
        if s.last() == Some(&b'\r') {
            s.pop();
        }
    }
    if s.len() < 16 {
        return Err(format!(
            "secret file {} holds {} bytes; at least 16 are needed (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display(),
            s.len()
        ));
    }
    if s.iter().all(|b| b.is_ascii_whitespace()) {
        return Err(format!(
            "secret file {} holds only blank characters: no secret (e.g. `head -c 32 /dev/urandom | base64 > FILE`)",
            path.display()
        ));
    }
    Ok(s)
}

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

/// `nbdmirror switchover`: ask the primary to hand over and stop, wait for
/// it to exit, and say whether the handover was done.
fn switchover(admin: &AdminArgs) -> Result<(), String> {
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

/// Why serving `dir` as a primary without an explicit `--role primary`
/// would be a promotion: it handed its generation over at its last stop, or
/// it follows another primary's generation. None for a replica that is a
/// primary's (or new).
enum Follows {
    HandedOver(u64),
    Primary(u64),
}

fn follows(dir: &std::path::Path) -> Result<Option<Follows>, String> {
    use nbdmirror::mirror::generation::{Generation, FLAG_HANDED_OVER, FLAG_PRIMARY};
    let g = Generation::load(dir)?;
    Ok(if g.flags & FLAG_HANDED_OVER != 0 {
        Some(Follows::HandedOver(g.current))
    } else if g.current == 0 || g.flags & FLAG_PRIMARY != 0 {
        None
    } else {
        Some(Follows::Primary(g.current))
    })
}

/// The config names this node the primary, but its replica follows
/// another primary (it was a secondary, or was taken back as one after a
/// switchover): serving it as a primary would promote it, and if the file
/// is simply stale (someone else was promoted with `--role primary`) two
/// primaries would serve the volume. A promotion is the operator's explicit
/// choice: `--role primary`.
fn refuse_implicit_promotion(c: &VolumeConfig, n: &NodeConfig) -> Result<(), String> {
    match follows(&n.dir)? {
        None => Ok(()),
        Some(Follows::HandedOver(g)) => Err(format!(
            "the config file {} names node {} the primary, but it handed generation {g:016x} \
             over at its last stop (`nbdmirror switchover`): another node may serve as the \
             primary now. Start it as that node's secondary (--role secondary), or, if no other \
             node was promoted, as the primary again with --role primary",
            c.path.display(),
            n.id,
        )),
        Some(Follows::Primary(g)) => Err(format!(
            "the config file {} names node {} the primary, but its replica follows generation \
             {g:016x} as a secondary of another primary; serving it as the primary would promote \
             it. If that is what you want, make sure no other node serves as the primary and \
             start it with --role primary; otherwise set `primary` in the config to the node \
             that serves",
            c.path.display(),
            n.id,
        )),
    }
}

/// `serve --dir DIR` without `--role` serves as the primary (the default):
/// the same refusal as [`refuse_implicit_promotion`], without a config
/// file. Otherwise a mistyped command promotes a secondary's replica at
/// once, and if the other primary still serves, only a re-initialisation
/// of one side reconciles them.
fn refuse_implicit_promotion_of_dir(dir: &std::path::Path) -> Result<(), String> {
    match follows(dir)? {
        None => Ok(()),
        Some(Follows::HandedOver(g)) => Err(format!(
            "{} handed generation {g:016x} over at its last stop (`nbdmirror switchover`): \
             another node may serve as the primary now, and serving this one as a primary \
             too would split the volume. Start it as that node's secondary (--role secondary \
             --peer-listen ADDR), or, if no other node was promoted, as the primary again with \
             --role primary",
            dir.display(),
        )),
        Some(Follows::Primary(g)) => Err(format!(
            "{} is a secondary's replica (it follows generation {g:016x} of another primary); \
             `serve` without --role would serve it as a primary and so promote it, and if the \
             other primary still serves, the two would split the volume for good. Start it as a \
             secondary again (--role secondary --peer-listen ADDR), or, to promote it, make sure \
             no other node serves as the primary and pass --role primary",
            dir.display(),
        )),
    }
}

/// Refuse a replica directory that is not the one the config file
/// describes for this node (another node's, another volume's, or a
/// different size): a wrong --node or dir must not serve or mirror the
/// wrong disk. Nothing is written.
fn check_config_identity(c: &VolumeConfig, n: &NodeConfig) -> Result<(), String> {
    if !n.dir.join("meta").exists() {
        return Err(format!(
            "{} holds no replica yet; create it with `nbdmirror init --config {} --node {}`",
            n.dir.display(),
            c.path.display(),
            n.id
        ));
    }
    let replica = dir::open(&n.dir)?;
    let mut io = nbdmirror::io::UringIo::new(8).map_err(|e| format!("io_uring: {e}"))?;
    let sb = nbdmirror::store::load_superblock(&mut io, replica.files().meta)?;
    let mut wrong = Vec::new();
    if sb.node_id != n.id {
        wrong.push(format!("it is node {}, not node {}", sb.node_id, n.id));
    }
    if let Some(u) = c.uuid {
        if sb.volume_uuid != u {
            wrong.push(format!(
                "it belongs to volume {}, not {}",
                dir::format_uuid(&sb.volume_uuid),
                dir::format_uuid(&u)
            ));
        }
    }
    if sb.size != c.size {
        wrong.push(format!(
            "its disk is {} bytes, the config says {}",
            sb.size, c.size
        ));
    }
    if wrong.is_empty() {
        return Ok(());
    }
    Err(format!(
        "{} is not node {} of the volume in {}: {}; refusing to use it (wrong --node, or the \
         wrong dir in the config?)",
        n.dir.display(),
        n.id,
        c.path.display(),
        wrong.join("; ")
    ))
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

fn human(n: f64) -> String {
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
fn term_cols() -> Option<usize> {
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
fn render_status(v: &serde_json::Value, cols: Option<usize>) -> Vec<String> {
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
    if peers.is_empty() {
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
        if let Some(e) = p["last_error"].as_str() {
            if state != "in_sync" && state != "syncing" {
                line.push_str(&format!("  last error: {e}"));
            }
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
            "  DAMAGED IN TRANSIT: {frames} frames failed their checksum, {records} records \
             their block checksums; each connection was dropped and what it carried resent \
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

fn resync(action: ResyncCmd) -> Result<(), String> {
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
            admin_call(&admin, &sel(if full { "full" } else { "start" }, peer))?;
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

fn render_scrub(v: &serde_json::Value) -> Vec<String> {
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

fn scrub(action: ScrubCmd) -> Result<(), String> {
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

fn default_journal(size: u64) -> u64 {
    (size / 2).clamp(16 << 20, 1 << 30) / 4096 * 4096
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::Init {
            dir: path,
            size,
            journal_size,
            node_id,
            volume_uuid,
            config,
        } => {
            let (path, size, journal_size, node_id, uuid) = match config.load()? {
                Some((c, n)) => {
                    if size.is_some() || node_id.is_some() || volume_uuid.is_some() {
                        return Err(
                            "with --config, the size, node id and volume uuid come from \
                                    the config file; leave out --size, --node-id and --volume-uuid"
                                .into(),
                        );
                    }
                    let Some(uuid) = c.uuid else {
                        return Err(format!(
                            "config file {} has no volume uuid, and every node of the volume \
                             must be initialised with the same one: add\n  uuid = \"{}\"\nunder \
                             [volume] (a fresh one), then run this again",
                            c.path.display(),
                            dir::format_uuid(&dir::random_uuid())
                        ));
                    };
                    // The secret is checked now, not at the first serve.
                    if let Some(f) = &c.secret_file {
                        read_secret(f)?;
                    }
                    (
                        n.dir,
                        c.size,
                        journal_size.or(c.journal_size),
                        n.id,
                        Some(uuid),
                    )
                }
                None => (
                    path.expect("clap requires --dir"),
                    size.expect("clap requires --size"),
                    journal_size,
                    node_id.unwrap_or(1),
                    volume_uuid.as_deref().map(dir::parse_uuid).transpose()?,
                ),
            };
            let j = journal_size.unwrap_or_else(|| default_journal(size));
            let sb = dir::init(&path, size, j, node_id, uuid)?;
            out!(
                "initialised {}: volume {}, {} bytes, journal {} bytes",
                path.display(),
                dir::format_uuid(&sb.volume_uuid),
                sb.size,
                sb.journal_size
            );
            Ok(())
        }
        Cmd::Serve {
            dir: path,
            config,
            size,
            listen,
            unix,
            export_name,
            no_verify_reads,
            checkpoint_interval_ms,
            sync_interval_ms,
            role,
            peer,
            peer_listen,
            secret_file,
            peer_timeout_ms,
            resync_rate,
            admin_socket,
            scrub_interval,
            scrub_rate,
            direct_writes,
            inplace_min,
            inplace_regions,
            cpu,
            poll_us,
            force_inconsistent,
            force_older_superblock,
            accept_journal_loss,
            log_timestamps,
        } => {
            nbdmirror::log::set_timestamps(match log_timestamps {
                LogTimestamps::Auto => !nbdmirror::log::stderr_is_journal(),
                LogTimestamps::Always => true,
                LogTimestamps::Never => false,
            });
            let cfg = config.load()?;
            let (path, role, peer, peer_listen, secret_file, peer_timeout_ms, resync_rate) =
                match &cfg {
                    Some((c, n)) => {
                        if size.is_some()
                            || !peer.is_empty()
                            || peer_listen.is_some()
                            || secret_file.is_some()
                        {
                            return Err("with --config, the peers, the secret and the size come \
                                        from the config file; leave out --size, --peer, \
                                        --peer-listen and --secret-file"
                                .into());
                        }
                        if let Some(f) = &c.secret_file {
                            read_secret(f)?;
                        }
                        check_config_identity(c, n)?;
                        let role = match role {
                            Some(r) => r,
                            None if n.id == c.primary => {
                                refuse_implicit_promotion(c, n)?;
                                RoleArg::Primary
                            }
                            None => RoleArg::Secondary,
                        };
                        let (peers, listen_at) = match role {
                            RoleArg::Primary => (c.peers_of(n.id), None),
                            RoleArg::Secondary => match n.peer_address {
                                Some(a) => (Vec::new(), Some(a)),
                                None => {
                                    return Err(format!(
                                        "config file {}: node {} has no peer-address to accept \
                                         the replication stream on as a secondary",
                                        c.path.display(),
                                        n.id
                                    ))
                                }
                            },
                        };
                        (
                            n.dir.clone(),
                            role,
                            peers,
                            listen_at,
                            c.secret_file.clone(),
                            peer_timeout_ms.or(c.peer_timeout_ms),
                            resync_rate.or(c.resync_rate),
                        )
                    }
                    None => (
                        path.clone().expect("clap requires --dir"),
                        match role {
                            Some(r) => r,
                            None => {
                                refuse_implicit_promotion_of_dir(
                                    path.as_deref().expect("clap requires --dir"),
                                )?;
                                RoleArg::Primary
                            }
                        },
                        peer,
                        peer_listen,
                        secret_file,
                        peer_timeout_ms,
                        resync_rate,
                    ),
                };
            let peer_timeout_ms = peer_timeout_ms.unwrap_or(3000);
            if peer_timeout_ms < MIN_PEER_TIMEOUT_MS {
                return Err(format!(
                    "peer timeout {peer_timeout_ms} ms is too short: at least \
                     {MIN_PEER_TIMEOUT_MS} ms (the default is 3000)"
                ));
            }
            let resync_rate = resync_rate.unwrap_or(0);
            let vol = cfg.as_ref().map(|(c, _)| c);
            let scrub_rate = scrub_rate
                .or(vol.and_then(|c| c.scrub_rate))
                .unwrap_or(nbdmirror::mirror::scrub::DEFAULT_RATE);
            if role == RoleArg::Secondary && scrub_interval.is_some_and(|s| s > 0) {
                nbdmirror::elog!(
                    "nbdmirror: note: --scrub-interval is ignored on a secondary: the primary \
                     scrubs, and every in-sync secondary verifies its copy in the same pass"
                );
            }
            let scrub_interval = scrub_interval
                .or(vol.and_then(|c| c.scrub_interval))
                .unwrap_or(0);
            let (listen, unix, export_name, admin_socket) = match &cfg {
                // The config's NBD addresses are the primary's: a secondary
                // on the same host must not take them.
                Some((_, n)) if role == RoleArg::Primary => (
                    if listen.is_empty() {
                        n.nbd_listen.clone()
                    } else {
                        listen
                    },
                    unix.or(n.unix.clone()),
                    export_name.or(n.export_name.clone()),
                    admin_socket.or(n.admin_socket.clone()),
                ),
                Some((_, n)) => (
                    listen,
                    unix,
                    export_name.or(n.export_name.clone()),
                    admin_socket.or(n.admin_socket.clone()),
                ),
                None => (listen, unix, export_name, admin_socket),
            };
            let export_name = export_name.unwrap_or_else(|| "disk".to_string());
            if export_name.len() > 4096 {
                return Err(format!(
                    "--export-name is {} bytes; the NBD protocol allows at most 4096",
                    export_name.len()
                ));
            }
            let role = match role {
                RoleArg::Primary => NodeRole::Primary,
                RoleArg::Secondary => NodeRole::Secondary,
            };

            if role == NodeRole::Secondary && !peer.is_empty() {
                return Err("--peer is for a primary; a secondary takes --peer-listen".into());
            }
            if role == NodeRole::Secondary && peer_listen.is_none() {
                return Err(
                    "a secondary needs --peer-listen HOST:PORT for the replication stream".into(),
                );
            }
            if role == NodeRole::Primary && peer_listen.is_some() {
                return Err(
                    "--peer-listen is for a secondary: add --role secondary (a primary serves \
                     the disk and connects to its peers with --peer)"
                        .into(),
                );
            }
            let mut ids = std::collections::HashSet::new();
            let mut addrs = std::collections::HashMap::new();
            for (id, addr) in &peer {
                if !ids.insert(*id) {
                    return Err(format!(
                        "--peer {id}={addr}: node {id} is given more than once; one --peer per node"
                    ));
                }
                if let Some(other) = addrs.insert(*addr, *id) {
                    return Err(format!(
                        "--peer {id}={addr}: node {other} has the same address; each node \
                         listens on its own"
                    ));
                }
            }
            // What the config file refuses, the command line refuses too.
            if let Some(a) = listen.iter().find(|a| a.port() == 0) {
                return Err(format!("--listen {a}: port 0 is no port a client can find"));
            }
            if let Some(a) = peer_listen.filter(|a| a.port() == 0) {
                return Err(format!(
                    "--peer-listen {a}: port 0 is no port a primary can find"
                ));
            }
            if let Some(a) = peer_listen.filter(|a| listen.contains(a)) {
                return Err(format!(
                    "--peer-listen {a} is also a --listen address; each needs its own"
                ));
            }
            for (id, addr) in &peer {
                if addr.ip().is_unspecified() || addr.port() == 0 {
                    return Err(format!(
                        "--peer {id}={addr}: this node connects to it, so it needs a real \
                         address and port"
                    ));
                }
                if listen.contains(addr) {
                    return Err(format!(
                        "--peer {id}={addr} is this node's own --listen address (the peer's \
                         --peer-listen address is meant)"
                    ));
                }
            }
            let mirrored = !peer.is_empty() || peer_listen.is_some();
            let secret = match (&secret_file, mirrored) {
                (Some(f), _) => read_secret(f)?,
                (None, true) => {
                    return Err(
                        "mirroring needs --secret-file (the same secret on every node)".into(),
                    )
                }
                (None, false) => Vec::new(),
            };
            let admin_socket = admin_socket.unwrap_or_else(|| path.join("admin.sock"));
            let mut l: Vec<Listen> = listen.into_iter().map(Listen::Tcp).collect();
            if let Some(u) = unix {
                l.push(Listen::Unix(u));
            }
            for fd in server::socket_activation_fds() {
                l.push(Listen::Fd(fd));
            }
            if l.is_empty() && role == NodeRole::Primary {
                l.push(Listen::Tcp("127.0.0.1:10809".parse().unwrap()));
            }
            if !path.join("meta").exists() {
                match size {
                    Some(size) => {
                        // A TCP port that cannot be had is refused before
                        // a replica is made, as it is before recovery
                        // touches an existing one. (Probed, all held at
                        // once so that two addresses that collide are
                        // caught too, then let go; the server binds again
                        // at once, std sets SO_REUSEADDR.)
                        let tcp = l.iter().filter_map(|x| match x {
                            Listen::Tcp(a) => Some(*a),
                            _ => None,
                        });
                        let mut probes = Vec::new();
                        for a in tcp.chain(peer_listen) {
                            probes.push(
                                server::bind_tcp(a)
                                    .map_err(|e| format!("cannot listen on {a}: {e}"))?,
                            );
                        }
                        drop(probes);
                        dir::init(&path, size, default_journal(size), 1, None)?;
                        nbdmirror::elog!("nbdmirror: created a {size}-byte replica in {}", path.display());
                    }
                    None if path.join("data").exists() || path.join("journal").exists() => {
                        return Err(format!(
                            "{} has a data or journal file but no meta file: the replica is damaged \
                             or was never finished; refusing to serve it (restore meta, or move the \
                             directory away and run `nbdmirror init`)",
                            path.display()
                        ))
                    }
                    None => {
                        return Err(format!(
                            "{} holds no replica; run `nbdmirror init --dir {} --size SIZE` or pass --size",
                            path.display(),
                            path.display()
                        ))
                    }
                }
            } else if let (Some(want), Ok(m)) = (size, std::fs::metadata(path.join("data"))) {
                // A size that does not match is a wrong directory or a
                // wrong expectation: refused, as a config file's size is,
                // rather than serving another size than asked for.
                if m.len() != want {
                    return Err(format!(
                        "{} already holds a {}-byte replica, but --size says {want}: refusing \
                         (--size only creates a replica where there is none; leave it out to \
                         serve this one, or give a fresh directory)",
                        path.display(),
                        m.len()
                    ));
                }
            }
            let tuning = Tuning {
                verify_reads: !no_verify_reads,
                checkpoint_interval: std::time::Duration::from_millis(checkpoint_interval_ms),
                sync_interval: std::time::Duration::from_millis(sync_interval_ms),
                force_older_superblock,
                refuse_journal_loss: role == NodeRole::Primary
                    && !peer.is_empty()
                    && !accept_journal_loss,
                inplace_min: inplace_min.unwrap_or(Tuning::default().inplace_min),
                inplace_regions: inplace_regions
                    .map_or(nbdmirror::store::INPLACE_REGIONS, |n| n as usize),
                // A secondary's crash leaves uncertain (a compare of the
                // whole disk) what it cannot vouch for: its in-place writes
                // log their checksums (docs/format.md, "Checksum records").
                vouch_inplace: role == NodeRole::Secondary,
                ..Tuning::default()
            };
            server::serve(ServeConfig {
                dir: path.clone(),
                listen: l,
                export_name,
                tuning,
                mirror: Some(MirrorConfig {
                    role,
                    peers: peer,
                    peer_listen,
                    secret,
                    timeout: std::time::Duration::from_millis(peer_timeout_ms),
                    resync_rate,
                    admin_socket: Some(admin_socket),
                    dir: path.clone(),
                    force_inconsistent,
                    scrub_rate,
                    scrub_interval,
                    protocol_version: nbdmirror::peer::messages::PROTOCOL_VERSION,
                }),
                direct_writes,
                cpu,
                poll: std::time::Duration::from_micros(poll_us.min(10_000)),
            })
        }
        Cmd::Resync { action } => resync(action),
        Cmd::Scrub { action } => scrub(action),
        Cmd::Switchover { admin } => switchover(&admin),
        Cmd::Check { dir: path, config } => {
            let (path, expect) = match config.load()? {
                Some((_, n)) => (n.dir, Some(n.id)),
                None => (path.expect("clap requires --dir"), None),
            };
            check_replica(&path, expect)
        }
        Cmd::Info { dir: path, config } => {
            let (path, expect) = match config.load()? {
                Some((_, n)) => (n.dir, Some(n.id)),
                None => (path.expect("clap requires --dir"), None),
            };
            // info only reads: no lock, so a replica a running node holds
            // is shown too, as a snapshot.
            let (meta, running) = dir::open_meta_read_only(&path)?;
            let mut io = nbdmirror::io::UringIo::new(8).map_err(|e| format!("io_uring: {e}"))?;
            let sb = nbdmirror::store::load_superblock(&mut io, {
                use std::os::fd::AsRawFd;
                meta.as_raw_fd()
            })?;
            same_node(&path, expect, sb.node_id)?;
            if running {
                out!("(a running nbdmirror serves this replica: what follows is a snapshot)");
            }
            let mut damaged: Vec<&str> = Vec::new();
            out!("volume      {}", dir::format_uuid(&sb.volume_uuid));
            out!("node id     {}", sb.node_id);
            out!("format      {}", sb.version);
            out!("size        {}", sb.size);
            out!(
                "journal     {} bytes, tail at {} (seq {}), epoch {}",
                sb.journal_size,
                sb.tail_pos,
                sb.tail_seq,
                sb.epoch
            );
            match nbdmirror::mirror::generation::Generation::load(&path) {
                Ok(g) if g.current == 0 => {
                    out!("generation  none yet (never served or synced)")
                }
                Ok(g) => out!(
                    "generation  {:016x}{}{}{}",
                    g.current,
                    if g.previous != 0 && g.from_epoch != 0 {
                        format!(" (after run {} of {:016x})", g.from_epoch, g.previous)
                    } else if g.previous != 0 {
                        format!(" (after {:016x})", g.previous)
                    } else {
                        String::new()
                    },
                    if g.epoch != 0 {
                        format!(" run {}", g.epoch)
                    } else {
                        String::new()
                    },
                    if g.flags & nbdmirror::mirror::generation::FLAG_HANDED_OVER != 0 {
                        ", written as a primary, handed over to its peers at a clean shutdown"
                    } else if g.flags & nbdmirror::mirror::generation::FLAG_PRIMARY != 0 {
                        ", written as a primary"
                    } else if g.flags & nbdmirror::mirror::generation::FLAG_INCONSISTENT != 0
                        && nbdmirror::store::uncertain::Uncertain::path(&path).exists()
                    {
                        ", followed as a secondary; INCONSISTENT: its crash recovery could not \
                         vouch for some blocks, and its primary has not resent them (not \
                         promoted without --force-inconsistent)"
                    } else if g.flags & nbdmirror::mirror::generation::FLAG_INCONSISTENT != 0 {
                        ", followed as a secondary; INCONSISTENT: partway through a resync \
                         from its primary (not promoted without --force-inconsistent)"
                    } else {
                        ", followed as a secondary"
                    }
                ),
                Err(e) => {
                    out!("generation  {e}");
                    damaged.push("generation");
                }
            }
            match nbdmirror::mirror::generation::Diverged::load(&path) {
                Ok(None) => {}
                Ok(Some(d)) => out!(
                    "split brain refuses node {} (generation {:016x}, promoted while this replica \
                     went on following generation {:016x}; docs/mirroring.md)",
                    d.node_id,
                    d.generation,
                    d.followed
                ),
                Err(e) => {
                    out!("split brain {e}");
                    damaged.push("diverged");
                }
            }
            // Peer bitmaps (a primary's record of what each peer misses)
            // and the set of blocks crash recovery could not vouch for:
            // what `serve` refuses as damaged, `info` says is (a tester
            // saw `info` exit 0 on a bitmap `serve` refused).
            for id in nbdmirror::mirror::bitmap::peer_ids(&path) {
                match nbdmirror::mirror::bitmap::inspect(&path, &sb.volume_uuid, id, sb.size) {
                    Ok(dirty) => out!("bitmap      peer {id}: {dirty} bytes to resync"),
                    Err(e) => {
                        out!("bitmap      {e}");
                        damaged.push("bitmap");
                    }
                }
            }
            if let Err(e) = nbdmirror::store::uncertain::Uncertain::load(&path) {
                out!("uncertain   {e}");
                damaged.push("uncertain");
            }
            // What `serve` would refuse as damaged makes `info` fail too,
            // after it has shown what it could (scripts look at the status).
            let sizes = ["data", "journal"]
                .map(|n| std::fs::File::open(path.join(n)).map_err(|e| format!("{n}: {e}")));
            match sizes {
                [Ok(d), Ok(j)] => {
                    if let Err(e) = dir::check_file_sizes(&d, &j, &meta, &sb) {
                        out!("files       {e}");
                        damaged.push("files");
                    }
                }
                [a, b] => {
                    for e in [a.err(), b.err()].into_iter().flatten() {
                        out!("files       {e}");
                    }
                    damaged.push("files");
                }
            }
            if let Some(s) = nbdmirror::mirror::scrub::describe(&path) {
                out!("scrub       {s}");
            }
            if !damaged.is_empty() {
                return Err(format!(
                    "{}: damaged ({}): `serve` refuses it",
                    path.display(),
                    damaged.join(", ")
                ));
            }
            Ok(())
        }
    }
}

/// A config file's node `expect` must find its own replica in its `dir`
/// (a typo'd `dir` naming another node's replica is refused, as `serve`
/// refuses it, rather than shown as if it were this node's).
fn same_node(path: &std::path::Path, expect: Option<u32>, found: u32) -> Result<(), String> {
    match expect {
        Some(id) if id != found => Err(format!(
            "{} holds node {found}'s replica (its superblock says so), not node {id}'s: check \
             node {id}'s dir in the config file",
            path.display()
        )),
        _ => Ok(()),
    }
}

/// `nbdmirror check`: verify every block of a stopped replica, with
/// progress on a terminal.
fn check_replica(path: &std::path::Path, expect: Option<u32>) -> Result<(), String> {
    use std::io::IsTerminal;
    use std::os::fd::AsRawFd;
    let (meta, running) = dir::open_meta_read_only(path)?;
    if running {
        return Err(format!(
            "a running nbdmirror serves {}: stop it first (a running node verifies every block \
             it reads, and a mirrored primary repairs what fails from its peers)",
            path.display()
        ));
    }
    let open = |name: &str| {
        std::fs::File::open(path.join(name))
            .map_err(|e| format!("cannot open {}/{name}: {e}", path.display()))
    };
    let (data, journal) = (open("data")?, open("journal")?);
    let mut io = nbdmirror::io::UringIo::new(8).map_err(|e| format!("io_uring: {e}"))?;
    // What `serve` refuses as damaged, `check` does not call clean: the
    // files' sizes against the superblock, and the generation file.
    let sb = nbdmirror::store::load_superblock(&mut io, meta.as_raw_fd())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    same_node(path, expect, sb.node_id)?;
    dir::check_file_sizes(&data, &journal, &meta, &sb)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    nbdmirror::mirror::generation::Generation::load(path)?;
    let unsure = nbdmirror::store::uncertain::Uncertain::load(path)?;
    if !unsure.is_empty() {
        return Err(format!(
            "{}: its last crash recovery could not vouch for {} blocks (listed in {}): their \
             checksums were rebuilt from the data, so checking them against those proves \
             nothing. Start it as a secondary, and its primary compares every block and resends \
             those",
            path.display(),
            unsure.count(),
            nbdmirror::store::uncertain::Uncertain::path(path).display()
        ));
    }
    let files = nbdmirror::store::Files {
        data: data.as_raw_fd(),
        journal: journal.as_raw_fd(),
        meta: meta.as_raw_fd(),
    };
    let tty = std::io::stderr().is_terminal();
    let t0 = std::time::Instant::now();
    let mut last = t0;
    let mut progress = |done: u64, total: u64| {
        let now = std::time::Instant::now();
        if tty && (now - last >= std::time::Duration::from_millis(500) || done == total) {
            last = now;
            let rate = done as f64 / (now - t0).as_secs_f64().max(1e-3);
            eprint!(
                "\rchecking {:5.1}%  {} of {}  {}/s   ",
                done as f64 * 100.0 / total.max(1) as f64,
                human(done as f64),
                human(total as f64),
                human(rate)
            );
        }
    };
    let r = nbdmirror::store::check::check(&mut io, files, &mut progress)?;
    if tty {
        eprintln!();
    }
    let size = r.blocks * 4096;
    if r.bad == 0 {
        out!(
            "{}: all {} blocks ({}) match their checksums ({:.1} s)",
            path.display(),
            r.blocks,
            human(size as f64),
            t0.elapsed().as_secs_f64()
        );
        let g = nbdmirror::mirror::generation::Generation::load(path)?;
        if g.flags & nbdmirror::mirror::generation::FLAG_INCONSISTENT != 0 {
            out!(
                "note: this replica is marked INCONSISTENT (partway through a resync from its \
                 primary): its blocks match their checksums but are a mix of old and new data \
                 until its primary reports it in sync (`nbdmirror info`)"
            );
        }
        return Ok(());
    }
    for &(b, known) in &r.listed {
        out!(
            "block {b} (offset {}): {}",
            b * 4096,
            if known {
                "marked corrupt earlier (reads of it fail)"
            } else {
                "does not match its checksum"
            }
        );
    }
    if r.bad > r.listed.len() as u64 {
        out!("... and {} more", r.bad - r.listed.len() as u64);
    }
    Err(format!(
        "{} of {} blocks fail their checksum ({} of them marked corrupt earlier). Reads of them \
         fail with EIO. On a mirrored volume, a primary repairs such blocks from an in-sync peer \
         when they are read; a secondary's are rewritten by `nbdmirror resync start --full` on \
         its primary. A single node's can only be rewritten by the client",
        r.bad, r.blocks, r.known
    ))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            nbdmirror::elog!("nbdmirror: error: {e}");
            ExitCode::FAILURE
        }
    }
}
