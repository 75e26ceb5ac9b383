//! The volume config file: one TOML file, the same on every node, that
//! describes a volume once (its uuid, size, secret and primary, and each
//! node's id, replica directory and addresses).
//!
//! Owns: parsing and checking the file, and answering "what does node N
//! do": its directory, whether it is the primary, whom it mirrors to or
//! where it accepts the replication stream. It never touches a replica; the
//! CLI turns its answers into `init`, `serve` and `resync` calls. A file
//! with anything wrong in it (a syntax error, an unknown key, a missing or
//! contradictory setting) is refused as a whole with one message naming the
//! file and the problem, before anything is created, opened or served.
//!
//! ```toml
//! [volume]
//! uuid = "9a6f403c-d704-c609-8133-fb4123f98c24"
//! size = "10G"
//! secret-file = "vol0.secret"     # relative paths: from the config file's directory
//! primary = 1
//!
//! [[node]]
//! id = 1
//! dir = "/var/lib/nbdmirror/vol0"
//! nbd-listen = ["0.0.0.0:10809"]
//! peer-address = "10.0.0.1:10810"
//!
//! [[node]]
//! id = 2
//! dir = "/var/lib/nbdmirror/vol0"
//! peer-address = "10.0.0.2:10810"
//! ```

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::size::parse_size;

/// Most nodes a volume may have (a primary mirrors to at most 63 peers).
pub const MAX_NODES: usize = 64;

/// A size: a number of bytes, or a string with a K/M/G/T suffix.
#[derive(Deserialize)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(untagged)]
enum RawAddrs {
    One(String),
    Many(Vec<String>),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawVolume {
    uuid: Option<String>,
    size: RawSize,
    journal_size: Option<RawSize>,
    secret_file: Option<PathBuf>,
    primary: u32,
    peer_timeout_ms: Option<u64>,
    resync_rate: Option<RawSize>,
    scrub_rate: Option<RawSize>,
    scrub_interval: Option<RawSize>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
struct RawNode {
    id: u32,
    dir: PathBuf,
    peer_address: Option<String>,
    nbd_listen: Option<RawAddrs>,
    unix: Option<PathBuf>,
    admin_socket: Option<PathBuf>,
    export_name: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    volume: RawVolume,
    #[serde(default)]
    node: Vec<RawNode>,
}

/// One node of the volume, as the config describes it.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: u32,
    /// Its replica directory (relative paths resolved against the config
    /// file's directory).
    pub dir: PathBuf,
    /// Where it accepts the replication stream while it is a secondary,
    /// and where the primary connects to it.
    pub peer_address: Option<SocketAddr>,
    /// Where it serves NBD while it is the primary (empty: the default).
    pub nbd_listen: Vec<SocketAddr>,
    pub unix: Option<PathBuf>,
    pub admin_socket: Option<PathBuf>,
    pub export_name: Option<String>,
}

/// A checked volume config.
#[derive(Debug, Clone)]
pub struct VolumeConfig {
    /// The file it was read from.
    pub path: PathBuf,
    pub uuid: Option<[u8; 16]>,
    pub size: u64,
    pub journal_size: Option<u64>,
    pub secret_file: Option<PathBuf>,
    pub primary: u32,
    pub peer_timeout_ms: Option<u64>,
    pub resync_rate: Option<u64>,
    pub scrub_rate: Option<u64>,
    /// Seconds between scheduled scrubs (0 = off).
    pub scrub_interval: Option<u64>,
    pub nodes: Vec<NodeConfig>,
}

/// The bytes of a small file (`what`, for messages: "config file"), at most
/// `max` of them: a wrong path (a disk image, `/dev/zero`) is refused
/// rather than read whole.
pub fn read_bounded(path: &Path, max: u64, what: &str) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(max + 1).read_to_end(&mut bytes))
        .map_err(|e| format!("cannot read {what} {}: {e}", path.display()))?;
    if bytes.len() as u64 > max {
        return Err(format!(
            "{what} {} is longer than {max} bytes; is it the right file?",
            path.display()
        ));
    }
    Ok(bytes)
}

/// Shorter peer timeouts are refused: the primary pings a quarter of it
/// apart, and scheduling hiccups alone would then disconnect peers.
pub const MIN_PEER_TIMEOUT_MS: u64 = 100;

/// HOST:PORT (an IP address or a name, resolved here; `[v6]:PORT` for
/// IPv6) to the first address it resolves to.
pub fn parse_addr(s: &str) -> Result<SocketAddr, String> {
    if let Ok(a) = s.parse() {
        return Ok(a);
    }
    if !s.contains(':') {
        return Err(format!("{s:?}: expected HOST:PORT, e.g. 127.0.0.1:10809"));
    }
    std::net::ToSocketAddrs::to_socket_addrs(s)
        .map_err(|e| format!("{s:?}: {e}"))?
        .next()
        .ok_or_else(|| format!("{s:?} resolves to no address"))
}

fn size_of(v: &RawSize, what: &str) -> Result<u64, String> {
    match v {
        RawSize::Bytes(n) => Ok(*n),
        RawSize::Text(s) => parse_size(s).map_err(|e| format!("{what}: {e}")),
    }
}

impl VolumeConfig {
    /// Read and check the config file at `path`.
    pub fn load(path: &Path) -> Result<VolumeConfig, String> {
        let bytes = read_bounded(path, 1 << 20, "config file")?;
        let text = String::from_utf8(bytes).map_err(|e| {
            format!(
                "config file {} is not UTF-8 text (bad byte at offset {}); is it the right file?",
                path.display(),
                e.utf8_error().valid_up_to()
            )
        })?;
        let base = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::parse(&text, &base)
            .map_err(|e| format!("config file {}: {e}", path.display()))
            .map(|mut c| {
                c.path = path.to_path_buf();
                c
            })
    }

    /// Parse and check config text; relative paths are taken from `base`.
    pub fn parse(text: &str, base: &Path) -> Result<VolumeConfig, String> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            e.to_string()
                .trim()
                .replace(
                    "data did not match any variant of untagged enum RawSize",
                    "expected a number of bytes or a size such as \"10G\"",
                )
                .replace(
                    "data did not match any variant of untagged enum RawAddrs",
                    "expected \"HOST:PORT\" or a list of them",
                )
        })?;
        let v = raw.volume;
        let rel = |p: &Path| {
            if p.is_absolute() {
                p.to_path_buf()
            } else {
                base.join(p)
            }
        };
        let uuid = v
            .uuid
            .as_deref()
            .map(crate::store::dir::parse_uuid)
            .transpose()
            .map_err(|e| format!("[volume] uuid: {e}"))?;
        let size = size_of(&v.size, "[volume] size")?;
        let block = crate::store::format::BLOCK_SIZE;
        if size == 0 || !size.is_multiple_of(block) {
            return Err(format!(
                "[volume] size: {size} bytes is not a positive multiple of {block}"
            ));
        }
        let journal_size = v
            .journal_size
            .as_ref()
            .map(|s| size_of(s, "[volume] journal-size"))
            .transpose()?;
        let resync_rate = v
            .resync_rate
            .as_ref()
            .map(|s| size_of(s, "[volume] resync-rate"))
            .transpose()?;
        let scrub_rate = v
            .scrub_rate
            .as_ref()
            .map(|s| size_of(s, "[volume] scrub-rate"))
            .transpose()?;
        if let Some(ms) = v.peer_timeout_ms.filter(|&ms| ms < MIN_PEER_TIMEOUT_MS) {
            return Err(format!(
                "[volume] peer-timeout-ms = {ms} is too short: at least {MIN_PEER_TIMEOUT_MS} \
                 (the default is 3000)"
            ));
        }
        let scrub_interval = v
            .scrub_interval
            .as_ref()
            .map(|s| {
                let t = match s {
                    RawSize::Bytes(n) => n.to_string(),
                    RawSize::Text(t) => t.clone(),
                };
                crate::size::parse_duration_secs(&t)
                    .map_err(|e| format!("[volume] scrub-interval: {e}"))
            })
            .transpose()?;
        if raw.node.is_empty() {
            return Err("no [[node]] sections: a volume has at least one node".into());
        }
        if raw.node.len() > MAX_NODES {
            return Err(format!(
                "{} [[node]] sections: a volume has at most {MAX_NODES} nodes (a primary and 63 peers)",
                raw.node.len()
            ));
        }
        let mut nodes = Vec::new();
        let mut ids = HashSet::new();
        let mut dirs = HashSet::new();
        let mut peer_addrs = HashSet::new();
        for n in raw.node {
            let at = format!("[[node]] id = {}", n.id);
            if n.id == 0 {
                return Err("[[node]] id = 0: node ids start at 1".into());
            }
            if !ids.insert(n.id) {
                return Err(format!("{at}: node {} is described twice", n.id));
            }
            if n.dir.as_os_str().is_empty() {
                return Err(format!("{at}: dir is empty"));
            }
            let dir = rel(&n.dir);
            // Two nodes may use the same path on different machines, not
            // on one (told apart by the IP of their peer addresses).
            let peer_address = n
                .peer_address
                .as_deref()
                .map(parse_addr)
                .transpose()
                .map_err(|e| format!("{at}: peer-address {e}"))?;
            if let Some(a) = peer_address {
                if a.ip().is_unspecified() || a.port() == 0 {
                    return Err(format!(
                        "{at}: peer-address {a}: the primary connects to it, so it needs a \
                         real address and port"
                    ));
                }
                if !peer_addrs.insert(a) {
                    return Err(format!(
                        "{at}: peer-address {a} is another node's too; each node needs its own"
                    ));
                }
                if !dirs.insert((a.ip(), dir.clone())) {
                    return Err(format!(
                        "{at}: dir {} is also the dir of another node on the same host ({})",
                        dir.display(),
                        a.ip()
                    ));
                }
            }
            let nbd_listen = match &n.nbd_listen {
                None => Vec::new(),
                Some(RawAddrs::One(s)) => vec![s.clone()],
                Some(RawAddrs::Many(v)) => v.clone(),
            }
            .iter()
            .map(|s| parse_addr(s))
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| format!("{at}: nbd-listen {e}"))?;
            if let Some(a) = nbd_listen.iter().find(|a| a.port() == 0) {
                return Err(format!(
                    "{at}: nbd-listen {a}: port 0 is no port a client can find"
                ));
            }
            nodes.push(NodeConfig {
                id: n.id,
                dir,
                peer_address,
                nbd_listen,
                unix: n.unix.as_deref().map(rel),
                admin_socket: n.admin_socket.as_deref().map(rel),
                export_name: n.export_name,
            });
        }
        if !ids.contains(&v.primary) {
            return Err(format!(
                "[volume] primary = {}: there is no [[node]] with that id (nodes: {})",
                v.primary,
                id_list(&nodes)
            ));
        }
        if nodes.len() > 1 && v.secret_file.is_none() {
            return Err(
                "[volume] secret-file is missing: the nodes of a mirrored volume authenticate \
                 each other with a shared secret (e.g. `head -c 32 /dev/urandom | base64 > FILE`)"
                    .into(),
            );
        }
        for n in &nodes {
            if nodes.len() > 1 && n.peer_address.is_none() {
                return Err(format!(
                    "[[node]] id = {}: peer-address is missing; every node of a mirrored volume \
                     needs one: a secondary accepts the replication stream there, and the \
                     primary connects to it (any node may become a secondary)",
                    n.id
                ));
            }
            if let Some(a) = n.nbd_listen.iter().find(|a| peer_addrs.contains(a)) {
                return Err(format!(
                    "[[node]] id = {}: nbd-listen {a} is also a peer-address",
                    n.id
                ));
            }
        }
        // The secret file itself is read (and checked) by `init` and
        // `serve`, not here: `info` and `resync` need no secret.
        let secret_file = v.secret_file.as_deref().map(rel);
        Ok(VolumeConfig {
            path: PathBuf::new(),
            uuid,
            size,
            journal_size,
            secret_file,
            primary: v.primary,
            peer_timeout_ms: v.peer_timeout_ms,
            resync_rate,
            scrub_rate,
            scrub_interval,
            nodes,
        })
    }

    /// Node `id`, or an error that lists the nodes there are.
    pub fn node(&self, id: u32) -> Result<&NodeConfig, String> {
        self.nodes.iter().find(|n| n.id == id).ok_or_else(|| {
            format!(
                "config file {} has no node {id} (nodes: {})",
                self.path.display(),
                id_list(&self.nodes)
            )
        })
    }

    /// What the primary mirrors to: every other node, at its peer address.
    pub fn peers_of(&self, id: u32) -> Vec<(u32, SocketAddr)> {
        self.nodes
            .iter()
            .filter(|n| n.id != id)
            .filter_map(|n| n.peer_address.map(|a| (n.id, a)))
            .collect()
    }
}

fn id_list(nodes: &[NodeConfig]) -> String {
    nodes
        .iter()
        .map(|n| n.id.to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
[volume]
uuid = "9a6f403c-d704-c609-8133-fb4123f98c24"
size = "1G"
secret-file = "s"
primary = 1

[[node]]
id = 1
dir = "a"
nbd-listen = "127.0.0.1:10809"
peer-address = "127.0.0.1:10811"

[[node]]
id = 2
dir = "/abs/b"
peer-address = "127.0.0.1:10810"
"#;

    /// A directory holding the secret file `s` the configs name.
    fn base() -> crate::testdir::TestDir {
        let d = crate::testdir::TestDir::new("config");
        std::fs::write(d.join("s"), "a-secret-of-more-than-16-bytes").unwrap();
        d
    }

    fn parse(t: &str) -> Result<VolumeConfig, String> {
        VolumeConfig::parse(t, &base())
    }

    #[test]
    fn good_config() {
        let b = base();
        let c = VolumeConfig::parse(GOOD, &b).unwrap();
        assert_eq!(c.size, 1 << 30);
        assert_eq!(c.primary, 1);
        assert_eq!(c.secret_file, Some(b.join("s")));
        assert_eq!(c.node(1).unwrap().dir, b.join("a"));
        assert_eq!(c.node(2).unwrap().dir, Path::new("/abs/b"));
        assert_eq!(
            c.node(1).unwrap().nbd_listen,
            vec!["127.0.0.1:10809".parse().unwrap()]
        );
        assert_eq!(c.peers_of(1), vec![(2, "127.0.0.1:10810".parse().unwrap())]);
        assert!(c.node(3).unwrap_err().contains("no node 3 (nodes: 1, 2)"));
        assert_eq!((c.scrub_rate, c.scrub_interval), (None, None));
        let t = GOOD.replace(
            "primary = 1",
            "primary = 1\nscrub-rate = \"50M\"\nscrub-interval = \"7d\"",
        );
        let c = parse(&t).unwrap();
        assert_eq!(c.scrub_rate, Some(50 << 20));
        assert_eq!(c.scrub_interval, Some(7 * 86_400));
        let t = GOOD.replace("primary = 1", "primary = 1\nscrub-interval = \"7y\"");
        assert!(parse(&t).unwrap_err().contains("scrub-interval"));
    }

    #[test]
    fn bad_configs_say_what_is_wrong() {
        let cases: &[(&str, &str, &str)] = &[
            ("size = \"1G\"", "size = \"1Q\"", "size"),
            ("size = \"1G\"", "size = 1000", "multiple of 4096"),
            ("primary = 1", "primary = 7", "no [[node]] with that id"),
            (
                "peer-address = \"127.0.0.1:10810\"",
                "",
                "peer-address is missing",
            ),
            (
                "peer-address = \"127.0.0.1:10810\"",
                "peer-adress = \"127.0.0.1:10810\"",
                "unknown field `peer-adress`",
            ),
            ("secret-file = \"s\"", "", "secret-file is missing"),
            ("id = 2", "id = 1", "described twice"),
            ("id = 2", "id = 0", "start at 1"),
            (
                "uuid = \"9a6f403c-d704-c609-8133-fb4123f98c24\"",
                "uuid = \"xyz\"",
                "uuid",
            ),
            ("[volume]", "[volume\n", "line"),
            (
                "peer-address = \"127.0.0.1:10811\"",
                "",
                "peer-address is missing",
            ),
            ("127.0.0.1:10810", "0.0.0.0:10810", "real address"),
            ("127.0.0.1:10810", "127.0.0.1:0", "real address"),
            (
                "nbd-listen = \"127.0.0.1:10809\"",
                "nbd-listen = \"127.0.0.1:10810\"",
                "also a peer-address",
            ),
            (
                "nbd-listen = \"127.0.0.1:10809\"",
                "nbd-listen = \"127.0.0.1:0\"",
                "port 0",
            ),
            (
                "nbd-listen = \"127.0.0.1:10809\"",
                "nbd-listen = 5",
                "HOST:PORT",
            ),
            ("size = \"1G\"", "size = -4096", "size such as"),
            ("127.0.0.1:10810", "127.0.0.1:10811", "another node's too"),
            (
                "nbd-listen = \"127.0.0.1:10809\"",
                "nbd-listen = \"nowhere\"",
                "HOST:PORT",
            ),
            (
                "primary = 1",
                "primary = 1\npeer-timeout-ms = 0",
                "too short",
            ),
        ];
        for (from, to, want) in cases {
            assert!(GOOD.contains(from), "{from}");
            let text = GOOD.replacen(from, to, 1);
            let err = parse(&text).expect_err(&text);
            assert!(err.contains(want), "{from} -> {to}: {err}");
        }
        assert!(parse("").unwrap_err().contains("volume"));
        let one = "[volume]\nsize = 4096\nprimary = 1\n";
        assert!(parse(one).unwrap_err().contains("no [[node]]"));
        let single = format!("{one}[[node]]\nid = 1\ndir = \"d\"\n");
        let c = parse(&single).unwrap();
        assert!(c.secret_file.is_none() && c.peers_of(1).is_empty());
    }

    proptest::proptest! {
        /// Any text, and any damage to a good file (bytes cut out, bytes
        /// put in), is parsed or refused with a message; never a panic.
        #[test]
        fn damaged_configs_never_panic(
            cut in 0..GOOD.len(), n in 0..40usize, junk in "[ -~\n\\[\\]=\"\u{0}-\u{ff}]{0,12}",
        ) {
            let mut t: String = GOOD.chars().take(cut).collect();
            t.push_str(&junk);
            t.extend(GOOD.chars().skip(cut + n));
            if let Err(e) = parse(&t) {
                proptest::prop_assert!(!e.is_empty());
            }
            let _ = parse(&junk);
        }
    }
}
