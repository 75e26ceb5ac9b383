//! The volume config file with real processes: a 2-node volume set up and
//! served from one config file (`init`, `serve`, `resync status`, `info`
//! with `--config F --node N`), a real client writing through it, the
//! replicas identical; a planned switchover (`--role`) and back; and bad input: a corrupt
//! or contradictory config, or a config that does not match the replica
//! directory, is refused with a message naming the problem, and changes
//! nothing on disk.

mod common;

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use common::*;

const MIB: u64 = 1 << 20;

/// A running node, killed if the test ends (or fails) without stopping it.
struct Node(Child);

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

struct Vol {
    tmp: TempDir,
    cfg: PathBuf,
    nbd: u16,
    peer1: u16,
    peer2: u16,
}

impl Vol {
    /// A 2-node volume config (node 1 primary) in a fresh temp dir, with a
    /// secret file, both replicas initialised from it.
    fn new(tag: &str, size: &str) -> Vol {
        let tmp = TempDir::new(tag);
        fs::write(tmp.join("secret"), "a-secret-of-more-than-16-bytes\n").unwrap();
        let v = Vol {
            cfg: tmp.join("vol.toml"),
            tmp,
            nbd: free_port(),
            peer1: free_port(),
            peer2: free_port(),
        };
        let text = v.text(size, "9a6f403c-d704-c609-8133-fb4123f98c24");
        fs::write(&v.cfg, text).unwrap();
        for n in ["1", "2"] {
            let out = nbdmirror(&["init", "--config", v.cfg_str(), "--node", n]);
            assert!(out.0, "init node {n}: {}", out.2);
            assert!(out.1.contains("initialised"), "{}", out.1);
        }
        v
    }

    fn text(&self, size: &str, uuid: &str) -> String {
        format!(
            "# a test volume\n\
             [volume]\n\
             uuid = \"{uuid}\"\n\
             size = \"{size}\"\n\
             secret-file = \"secret\"\n\
             primary = 1\n\
             peer-timeout-ms = 2000\n\
             \n\
             [[node]]\n\
             id = 1\n\
             dir = \"n1\"\n\
             nbd-listen = \"127.0.0.1:{}\"\n\
             peer-address = \"127.0.0.1:{}\"\n\
             \n\
             [[node]]\n\
             id = 2\n\
             dir = \"n2\"\n\
             nbd-listen = \"127.0.0.1:{}\"\n\
             peer-address = \"127.0.0.1:{}\"\n",
            self.nbd, self.peer1, self.nbd, self.peer2
        )
    }

    fn cfg_str(&self) -> &str {
        self.cfg.to_str().unwrap()
    }

    fn serve(&self, node: &str, extra: &[&str]) -> Node {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.tmp.join(format!("node{node}.log")))
            .unwrap();
        Node(
            Command::new(NBDMIRROR_BIN)
                .args(["serve", "--config", self.cfg_str(), "--node", node])
                .args(extra)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        )
    }

    fn log(&self, node: &str) -> String {
        fs::read_to_string(self.tmp.join(format!("node{node}.log"))).unwrap_or_default()
    }

    fn status(&self, node: &str) -> Option<Json> {
        let out = nbdmirror(&[
            "resync",
            "status",
            "--config",
            self.cfg_str(),
            "--node",
            node,
            "--json",
        ]);
        out.0.then(|| Json::parse(out.1.trim()).ok()).flatten()
    }

    /// Wait until `node` reports its peer in sync with nothing dirty.
    fn wait_in_sync(&self, node: &str, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(j) = self.status(node) {
                let peers = j.at("peers").as_array();
                if !peers.is_empty()
                    && peers.iter().all(|p| {
                        p.at("state").as_str() == Some("in_sync")
                            && p.at("dirty_bytes").as_u64() == Some(0)
                    })
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "node {node} not in sync after {timeout:?}; status {:?}\nlogs:\n{}\n{}",
                self.status(node).map(|j| format!("{j:?}")),
                self.log("1"),
                self.log("2")
            );
            thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Run nbdmirror with `args`: (success, stdout, stderr).
fn nbdmirror(args: &[&str]) -> (bool, String, String) {
    let out = run_timeout(
        Command::new(NBDMIRROR_BIN).args(args),
        Duration::from_secs(30),
    );
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn stop(mut n: Node) {
    let c = &mut n.0;
    if c.try_wait().unwrap().is_none() {
        send_signal(c.id(), "TERM");
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if let Some(st) = c.try_wait().unwrap() {
            assert!(st.success(), "node exited with {st}");
            return;
        }
        thread::sleep(Duration::from_millis(50));
    }
    panic!("node did not stop within 20 s of SIGTERM");
}

fn wait_port(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "nothing listens on {port}");
        thread::sleep(Duration::from_millis(50));
    }
}

/// Every file under `dir` with its bytes and, after them, its modification
/// time (for "nothing changed": a refused start used to leave `meta`'s
/// bytes alone but move its time).
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    if let Ok(rd) = fs::read_dir(dir) {
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(snapshot(&p));
            } else if let Ok(mut b) = fs::read(&p) {
                if let Ok(t) = fs::metadata(&p).and_then(|m| m.modified()) {
                    b.extend_from_slice(format!("{t:?}").as_bytes());
                }
                out.insert(p, b);
            }
        }
    }
    out
}

#[test]
fn a_volume_set_up_and_served_from_its_config_file() {
    let test = "a_volume_set_up_and_served_from_its_config_file";
    if !require_tools(test, &["nbdcopy"]) {
        return;
    }
    let v = Vol::new("config-volume", "32M");
    let n2 = v.serve("2", &[]);
    thread::sleep(Duration::from_millis(200));
    let n1 = v.serve("1", &[]);
    wait_port(v.nbd);
    v.wait_in_sync("1", Duration::from_secs(20));

    // The status names the roles the config gave.
    let s1 = v.status("1").unwrap();
    assert_eq!(s1.at("role").as_str(), Some("primary"));
    let peers = s1.at("peers").as_array();
    assert_eq!(peers.len(), 1);
    assert_eq!(peers[0].at("node_id").as_u64(), Some(2));
    assert_eq!(
        v.status("2").unwrap().at("role").as_str(),
        Some("secondary")
    );

    // A real client writes through the primary.
    let src = v.tmp.join("src.img");
    write_random_file(&src, 32 * MIB, 7, &[(MIB, 2 * MIB)]);
    let uri = format!("nbd://127.0.0.1:{}/", v.nbd);
    run_ok_timeout(
        Command::new(tool("nbdcopy")).args([src.to_str().unwrap(), &uri]),
        Duration::from_secs(60),
    );
    v.wait_in_sync("1", Duration::from_secs(20));
    // A planned switchover: node 1 hands over to node 2 and stops.
    let (ok, out, err) = nbdmirror(&["switchover", "--config", v.cfg_str(), "--node", "1"]);
    assert!(
        ok && out.contains("handed over"),
        "{out}\n{err}\n{}",
        v.log("1")
    );
    stop(n1);
    stop(n2);
    assert_files_equal(&src, &v.tmp.join("n1/data"));
    assert_files_equal(&src, &v.tmp.join("n2/data"));

    // `info` finds the node's directory through the config.
    let info = nbdmirror(&["info", "--config", v.cfg_str(), "--node", "2"]);
    assert!(info.0, "{}", info.2);
    assert!(
        info.1.contains("9a6f403c-d704-c609-8133-fb4123f98c24") && info.1.contains("node id     2"),
        "{}",
        info.1
    );
    let info1 = nbdmirror(&["info", "--config", v.cfg_str(), "--node", "1"]);
    assert!(info1.1.contains("handed over"), "{}", info1.1);
    // The file still names node 1 the primary; started as it says, node 1
    // would serve next to a promoted node 2: refused, with the way out.
    let (ok, _, err) = nbdmirror(&["serve", "--config", v.cfg_str(), "--node", "1"]);
    assert!(
        !ok && err.contains("handed") && err.contains("--role"),
        "{err}"
    );

    // Node 2 is promoted with --role and mirrors to node 1, which takes the
    // stream at its peer address and is taken back (not split brain).
    let n1 = v.serve("1", &["--role", "secondary"]);
    thread::sleep(Duration::from_millis(200));
    let n2 = v.serve("2", &["--role", "primary"]);
    wait_port(v.nbd);
    v.wait_in_sync("2", Duration::from_secs(20));
    assert!(v.log("2").contains("promoted"), "{}", v.log("2"));
    let mut c = MiniClient::connect(&format!("127.0.0.1:{}", v.nbd), "disk").unwrap();
    let data = random_bytes(9, 64 * 1024);
    assert_eq!(c.write(3 * MIB, &data, 1).unwrap(), 0);
    assert_eq!(c.read(3 * MIB, 64 * 1024).unwrap(), data);
    drop(c);
    v.wait_in_sync("2", Duration::from_secs(20));
    let (ok, out, err) = nbdmirror(&["switchover", "--config", v.cfg_str(), "--node", "2"]);
    assert!(
        ok && out.contains("handed over"),
        "{out}\n{err}\n{}",
        v.log("2")
    );
    stop(n2);
    stop(n1);
    assert!(!v.log("1").contains("split brain"), "{}", v.log("1"));
    assert_files_equal(&v.tmp.join("n1/data"), &v.tmp.join("n2/data"));
    let d1 = fs::read(v.tmp.join("n1/data")).unwrap();
    assert!(
        d1[3 * MIB as usize..][..64 * 1024] == data[..],
        "node 1 lacks node 2's write"
    );

    // And back. The file still names node 1 the primary, but node 1's
    // replica now follows node 2: started as the file says, it would be
    // promoted (and with a stale file, two primaries would serve), so that
    // takes an explicit --role primary.
    let (ok, _, err) = nbdmirror(&["serve", "--config", v.cfg_str(), "--node", "1"]);
    assert!(!ok && err.contains("--role primary"), "{err}");
    let n2 = v.serve("2", &[]);
    thread::sleep(Duration::from_millis(200));
    let n1 = v.serve("1", &["--role", "primary"]);
    wait_port(v.nbd);
    v.wait_in_sync("1", Duration::from_secs(20));
    stop(n1);
    stop(n2);
    assert_files_equal(&v.tmp.join("n1/data"), &v.tmp.join("n2/data"));
}

#[test]
fn bad_configs_are_refused_with_a_reason_and_change_nothing() {
    let v = Vol::new("config-bad", "16M");
    let good = fs::read_to_string(&v.cfg).unwrap();
    let before = snapshot(v.tmp.path());
    let bad = v.tmp.join("bad.toml");
    // (what to replace, with what, what the error must say)
    let cases: Vec<(&str, String, &str)> = vec![
        ("[volume]", "[volume".into(), "line"),
        ("size = \"16M\"", "size = \"16Q\"".into(), "size"),
        (
            "size = \"16M\"",
            "size = \"32M\"".into(),
            "its disk is 16777216 bytes",
        ),
        ("primary = 1", "primary = 3".into(), "primary = 3"),
        (
            "peer-timeout-ms",
            "peer-timeout".into(),
            "unknown field `peer-timeout`",
        ),
        (
            "secret-file = \"secret\"\n",
            String::new(),
            "secret-file is missing",
        ),
        (
            "secret-file = \"secret\"",
            "secret-file = \"nope\"".into(),
            "[volume] secret-file: cannot",
        ),
        ("id = 2", "id = 1".into(), "described twice"),
        (
            "9a6f403c-d704-c609-8133-fb4123f98c24",
            "0a6f403c-d704-c609-8133-fb4123f98c24".into(),
            "belongs to volume 9a6f403c",
        ),
        (
            "dir = \"n2\"",
            "dir = \"n1\"".into(),
            "also the dir of another node",
        ),
        (
            "dir = \"n1\"",
            "dir = \"n2\"".into(),
            "also the dir of another node",
        ),
        (&good[..], "\u{0}\u{1}garbage\u{ff}".into(), "line"),
    ];
    for (from, to, want) in &cases {
        assert!(good.contains(from), "{from}");
        fs::write(&bad, good.replacen(from, to, 1)).unwrap();
        for node in ["1", "2"] {
            let (ok, _, err) =
                nbdmirror(&["serve", "--config", bad.to_str().unwrap(), "--node", node]);
            assert!(!ok, "{from:?} -> {to:?}: node {node} was served");
            assert!(
                err.contains(want) && !err.contains("panicked"),
                "{from:?} -> {to:?}: node {node}'s error does not say {want:?}: {err}"
            );
        }
    }
    // Not a file at all, and a node the file does not have.
    let (ok, _, err) = nbdmirror(&["serve", "--config", "/nonexistent.toml", "--node", "1"]);
    assert!(
        !ok && err.contains("cannot read config file /nonexistent.toml"),
        "{err}"
    );
    let (ok, _, err) = nbdmirror(&["serve", "--config", v.cfg_str(), "--node", "5"]);
    assert!(!ok && err.contains("no node 5 (nodes: 1, 2)"), "{err}");
    // A config and a --dir, or a --node without a config.
    let (ok, _, err) = nbdmirror(&[
        "serve",
        "--config",
        v.cfg_str(),
        "--node",
        "1",
        "--dir",
        "x",
    ]);
    assert!(!ok && err.contains("cannot be used with"), "{err}");
    // init of a node that exists refuses to overwrite it.
    let (ok, _, err) = nbdmirror(&["init", "--config", v.cfg_str(), "--node", "1"]);
    assert!(!ok && err.contains("already holds a replica"), "{err}");
    // init without a uuid in the file suggests one and makes nothing.
    let no_uuid = good.replacen("uuid = \"9a6f403c-d704-c609-8133-fb4123f98c24\"\n", "", 1);
    fs::write(&bad, no_uuid.replace("\"n1\"", "\"n3\"")).unwrap();
    let (ok, _, err) = nbdmirror(&["init", "--config", bad.to_str().unwrap(), "--node", "1"]);
    assert!(
        !ok && err.contains("has no volume uuid") && err.contains("uuid = \""),
        "{err}"
    );
    assert!(
        !v.tmp.join("n3").exists(),
        "init without a uuid made a directory"
    );
    fs::remove_file(&bad).unwrap();
    // A directory with an earlier replica's history left in it (its meta,
    // data and journal moved away, as init's own refusal suggests).
    let old = v.tmp.join("old");
    fs::create_dir_all(&old).unwrap();
    fs::copy(v.tmp.join("n1/generation"), old.join("generation")).ok();
    fs::write(old.join("generation"), b"x").unwrap();
    fs::write(old.join("peer-2.bitmap"), b"x").unwrap();
    let (ok, _, err) = nbdmirror(&["init", "--dir", old.to_str().unwrap(), "--size", "16M"]);
    assert!(
        !ok && err.contains("generation") && err.contains("peer-2.bitmap"),
        "{err}"
    );
    assert!(!old.join("meta").exists());
    fs::remove_dir_all(&old).unwrap();
    assert!(
        snapshot(v.tmp.path()) == before,
        "a refused config changed files under {}",
        v.tmp.path().display()
    );
}

/// The command line is checked like a config file: one --peer per node and
/// per address, a peer timeout of at least 100 ms. Refused before anything
/// is opened.
#[test]
fn bad_peer_lists_on_the_command_line_are_refused() {
    let tmp = TempDir::new("cli-peers");
    let dir = tmp.join("r");
    let secret = tmp.join("secret");
    fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let d = dir.to_str().unwrap();
    let s = secret.to_str().unwrap();
    for (args, want) in [
        (
            vec!["--peer", "2=127.0.0.1:5000", "--peer", "2=127.0.0.1:5001"],
            "more than once",
        ),
        (
            vec!["--peer", "2=127.0.0.1:5000", "--peer", "3=127.0.0.1:5000"],
            "same address",
        ),
        (
            vec!["--peer", "2=127.0.0.1:5000", "--peer-timeout-ms", "10"],
            "at least 100 ms",
        ),
    ] {
        let mut a = vec!["serve", "--dir", d, "--size", "16M", "--secret-file", s];
        a.extend(args.iter().copied());
        let (ok, _, err) = nbdmirror(&a);
        assert!(!ok && err.contains(want), "{a:?}: {err}");
        assert!(!dir.join("meta").exists(), "{a:?} created a replica");
    }
}

/// A switchover whose handover cannot finish. With node 2 frozen
/// (SIGSTOP) the handover waits for its flush until the peer timeout; the
/// primary then stops without handing over, the command says so, and the
/// primary's log says which peer failed (it said nothing before). And a
/// primary killed while it waits: the command says the node died, at
/// once, instead of polling its left-over admin socket for 300 s (both
/// found by a tester).
#[test]
fn a_switchover_that_cannot_hand_over_says_why_and_does_not_wait_for_a_dead_node() {
    let v = Vol::new("config-switchover-fails", "16M");
    let mut n2 = v.serve("2", &[]);
    thread::sleep(Duration::from_millis(200));
    let n1 = v.serve("1", &[]);
    wait_port(v.nbd);
    v.wait_in_sync("1", Duration::from_secs(20));

    send_signal(n2.0.id(), "STOP");
    let (ok, out, err) = nbdmirror(&["switchover", "--config", v.cfg_str(), "--node", "1"]);
    send_signal(n2.0.id(), "CONT");
    assert!(
        !ok && err.contains("WITHOUT handing over"),
        "a switchover with a frozen peer: {out}\n{err}\n{}",
        v.log("1")
    );
    stop(n1);
    assert!(
        v.log("1")
            .contains("switchover NOT done: peer 2 failed during the handover"),
        "the primary's log does not say why it did not hand over:\n{}",
        v.log("1")
    );

    // The same through `--admin-socket` alone: the command used to exit 0
    // ("its log says whether it handed over") as it did not know the
    // replica; the node now says where it is (a tester's find).
    let n1 = v.serve("1", &[]);
    wait_port(v.nbd);
    v.wait_in_sync("1", Duration::from_secs(20));
    send_signal(n2.0.id(), "STOP");
    let sock = v.tmp.join("n1").join("admin.sock");
    let (ok, out, err) = nbdmirror(&["switchover", "--admin-socket", sock.to_str().unwrap()]);
    send_signal(n2.0.id(), "CONT");
    assert!(
        !ok && err.contains("WITHOUT handing over"),
        "a switchover by --admin-socket with a frozen peer: {out}\n{err}"
    );
    stop(n1);

    // Node 1 is still the primary of its generation: started again, it
    // takes node 2 back.
    let n1 = v.serve("1", &[]);
    wait_port(v.nbd);
    v.wait_in_sync("1", Duration::from_secs(20));
    send_signal(n2.0.id(), "STOP");
    let cfg = v.cfg_str().to_string();
    let started = Instant::now();
    let cmd = thread::spawn(move || nbdmirror(&["switchover", "--config", &cfg, "--node", "1"]));
    thread::sleep(Duration::from_millis(1000));
    let mut n1 = n1;
    let _ = n1.0.kill();
    let _ = n1.0.wait();
    let (ok, out, err) = cmd.join().unwrap();
    let took = started.elapsed();
    send_signal(n2.0.id(), "CONT");
    assert!(
        !ok && err.contains("died") && err.contains("WITHOUT handing over"),
        "a switchover whose primary was killed: {out}\n{err}"
    );
    assert!(
        took < Duration::from_secs(20),
        "the switchover command took {took:?} to notice its primary died"
    );
    let _ = n2.0.kill();
}

/// `info` and `check` with a config file whose node's `dir` holds another
/// node's replica (a typo, swapped lines) refuse it, as `serve` does,
/// instead of showing the other node's replica as this one's (a tester's
/// find: exit 0 and node 2's superblock under `--node 3`).
#[test]
fn info_and_check_refuse_a_config_dir_that_holds_another_nodes_replica() {
    let v = Vol::new("config-swapped-dirs", "8M");
    let text = fs::read_to_string(&v.cfg)
        .unwrap()
        .replace("dir = \"n1\"", "dir = \"nX\"")
        .replace("dir = \"n2\"", "dir = \"n1\"")
        .replace("dir = \"nX\"", "dir = \"n2\"");
    let swapped = v.tmp.join("swapped.toml");
    fs::write(&swapped, text).unwrap();
    for cmd in ["info", "check"] {
        let (ok, out, err) =
            nbdmirror(&[cmd, "--config", swapped.to_str().unwrap(), "--node", "2"]);
        assert!(
            !ok && err.contains("holds node 1's replica") && err.contains("not node 2's"),
            "{cmd} --node 2 with node 1's replica in its dir:\n{out}\n{err}"
        );
        let (ok, out, err) = nbdmirror(&[cmd, "--config", v.cfg_str(), "--node", "2"]);
        assert!(ok, "{cmd} --node 2 with the right config:\n{out}\n{err}");
    }
}

/// `info --config` says when the replica does not match the file (a size
/// that disagrees), as `serve --config` refuses it; it printed the
/// replica without a word (a tester's find).
#[test]
fn info_warns_when_the_replica_does_not_match_the_config() {
    let v = Vol::new("config-info-size", "8M");
    let text = fs::read_to_string(&v.cfg)
        .unwrap()
        .replace("size = \"8M\"", "size = \"16M\"");
    assert!(text.contains("16M"), "{text}");
    let other = v.tmp.join("bigger.toml");
    fs::write(&other, text).unwrap();
    let (ok, out, err) = nbdmirror(&["info", "--config", other.to_str().unwrap(), "--node", "1"]);
    assert!(
        ok && err.contains("does not match") && err.contains("the config says 16777216"),
        "info with a config of another size:\n{out}\n{err}"
    );
    let (ok, out, err) = nbdmirror(&["info", "--config", v.cfg_str(), "--node", "1"]);
    assert!(
        ok && !err.contains("does not match"),
        "info with the right config:\n{out}\n{err}"
    );
}
