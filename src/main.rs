//! `nbdmirror`: command-line entry point.
//!
//! Owns: argument parsing and turning it into calls on `store::dir` (init) and
//! `server` (serve). Errors reach the user as one line and a non-zero exit.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use nbdmirror::server::{self, Listen, ServeConfig};
use nbdmirror::size::parse_size;
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

#[derive(Subcommand)]
enum Cmd {
    /// Create a replica directory for a new disk.
    Init {
        /// Replica directory (created if missing; must not hold a replica).
        #[arg(long)]
        dir: PathBuf,
        /// Disk size: bytes or with a K/M/G/T suffix (binary units), a multiple of 4 KiB.
        #[arg(long, value_parser = parse_size)]
        size: u64,
        /// Journal ring size (default: size/8, between 16 MiB and 1 GiB).
        #[arg(long, value_parser = parse_size)]
        journal_size: Option<u64>,
        /// This node's id within its volume.
        #[arg(long, default_value_t = 1)]
        node_id: u32,
    },
    /// Serve a replica directory over NBD.
    Serve {
        /// Replica directory.
        #[arg(long)]
        dir: PathBuf,
        /// Create the replica with this size first if the directory holds none.
        #[arg(long, value_parser = parse_size)]
        size: Option<u64>,
        /// TCP address to listen on (repeatable). Default 127.0.0.1:10809
        /// unless --unix is given or systemd passed sockets.
        #[arg(long)]
        listen: Vec<SocketAddr>,
        /// Unix socket path to listen on.
        #[arg(long)]
        unix: Option<PathBuf>,
        /// Export name (the default export "" also selects it).
        #[arg(long, default_value = "disk")]
        export_name: String,
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
    },
    /// Print a replica directory's superblock.
    Info {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn default_journal(size: u64) -> u64 {
    (size / 8).clamp(16 << 20, 1 << 30) / 4096 * 4096
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Cmd::Init {
            dir: path,
            size,
            journal_size,
            node_id,
        } => {
            let j = journal_size.unwrap_or_else(|| default_journal(size));
            let sb = dir::init(&path, size, j, node_id)?;
            println!(
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
            size,
            listen,
            unix,
            export_name,
            no_verify_reads,
            checkpoint_interval_ms,
            sync_interval_ms,
        } => {
            if !path.join("meta").exists() {
                match size {
                    Some(size) => {
                        dir::init(&path, size, default_journal(size), 1)?;
                        eprintln!("nbdmirror: created a {size}-byte replica in {}", path.display());
                    }
                    None => {
                        return Err(format!(
                            "{} holds no replica; run `nbdmirror init --dir {} --size SIZE` or pass --size",
                            path.display(),
                            path.display()
                        ))
                    }
                }
            }
            let mut l: Vec<Listen> = listen.into_iter().map(Listen::Tcp).collect();
            if let Some(u) = unix {
                l.push(Listen::Unix(u));
            }
            for fd in server::socket_activation_fds() {
                l.push(Listen::Fd(fd));
            }
            if l.is_empty() {
                l.push(Listen::Tcp("127.0.0.1:10809".parse().unwrap()));
            }
            let tuning = Tuning {
                verify_reads: !no_verify_reads,
                checkpoint_interval: std::time::Duration::from_millis(checkpoint_interval_ms),
                sync_interval: std::time::Duration::from_millis(sync_interval_ms),
                ..Tuning::default()
            };
            server::serve(ServeConfig {
                dir: path,
                listen: l,
                export_name,
                tuning,
            })
        }
        Cmd::Info { dir: path } => {
            let replica = dir::open(&path)?;
            let mut io = nbdmirror::io::UringIo::new(8).map_err(|e| format!("io_uring: {e}"))?;
            let sb = nbdmirror::store::load_superblock(&mut io, replica.files().meta)?;
            println!("volume      {}", dir::format_uuid(&sb.volume_uuid));
            println!("node id     {}", sb.node_id);
            println!("format      {}", sb.version);
            println!("size        {}", sb.size);
            println!(
                "journal     {} bytes, tail at {} (seq {}), epoch {}",
                sb.journal_size, sb.tail_pos, sb.tail_seq, sb.epoch
            );
            Ok(())
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nbdmirror: error: {e}");
            ExitCode::FAILURE
        }
    }
}
