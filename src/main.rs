//! `nbdmirror`: command-line entry point.
//!
//! Owns: argument parsing and turning it into calls on `store::dir` (init),
//! `server` (serve) and the admin socket (`resync`). Errors reach the user as
//! one line and a non-zero exit.
//!
//! The commands that talk to a running node's admin socket (`resync`,
//! `scrub`, `switchover`) and the rendering of their reports are in
//! `cli/`.

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

mod cli;

use cli::admin::{resync, scrub, switchover};
use cli::status::human;

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

/// Checks the secret file a config names; an error names the config too,
/// since the path in it may be relative to the config's directory.
fn read_config_secret(c: &nbdmirror::config::VolumeConfig) -> Result<(), String> {
    match &c.secret_file {
        Some(f) => read_secret(f).map(drop).map_err(|e| {
            format!(
                "config file {}, [volume] secret-file: {e}",
                c.path.display()
            )
        }),
        None => Ok(()),
    }
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
/// How the replica whose superblock is `sb` differs from the volume `c`
/// describes (its uuid and size; the node id is the caller's to check).
fn volume_mismatches(c: &VolumeConfig, sb: &nbdmirror::store::format::Superblock) -> Vec<String> {
    let mut wrong = Vec::new();
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
    wrong
}

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
    wrong.extend(volume_mismatches(c, &sb));
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
                    read_config_secret(&c)?;
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
                        read_config_secret(c)?;
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
            let (path, expect, volume) = match config.load()? {
                Some((c, n)) => (n.dir, Some(n.id), Some(c)),
                None => (path.expect("clap requires --dir"), None, None),
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
            // What `serve --config` would refuse is said here too (a
            // tester saw `info` show such a replica without a word).
            if let Some(c) = &volume {
                let wrong = volume_mismatches(c, &sb);
                if !wrong.is_empty() {
                    eprintln!(
                        "nbdmirror: warning: this replica does not match {}: {}; `serve --config` \
                         refuses it",
                        c.path.display(),
                        wrong.join("; ")
                    );
                }
            }
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
