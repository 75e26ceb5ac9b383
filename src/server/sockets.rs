//! Sockets of the NBD front end (and of peer links): binding TCP listeners
//! (waiting out a killed predecessor's port), Unix sockets, systemd socket
//! activation, the accept backlog, socket options, and removing sockets a
//! dead server left behind.

use std::net::{SocketAddr, TcpListener};
use std::os::fd::RawFd;

use super::*;

/// Whether a connected TCP socket is connected to itself: its local and
/// peer addresses are the same. Linux does this when a socket connects to a
/// port on its own host that nobody listens on and the kernel happens to
/// pick that very port as the socket's local one (a simultaneous open with
/// itself). Then the port stays taken for as long as the socket lives, and
/// the node that should listen there cannot. False for anything that is
/// not a socket or whose addresses cannot be read.
pub(crate) fn connected_to_itself(fd: RawFd) -> bool {
    let name = |peer: bool| {
        // SAFETY: getsockname/getpeername write at most `len` bytes into a
        // zeroed sockaddr_storage, which is large enough for any address.
        unsafe {
            let mut ss: libc::sockaddr_storage = std::mem::zeroed();
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            let p = &mut ss as *mut libc::sockaddr_storage as *mut libc::sockaddr;
            let r = if peer {
                libc::getpeername(fd, p, &mut len)
            } else {
                libc::getsockname(fd, p, &mut len)
            };
            (r == 0).then(|| {
                let bytes = std::slice::from_raw_parts(p as *const u8, len as usize);
                bytes.to_vec()
            })
        }
    };
    match (name(false), name(true)) {
        (Some(local), Some(peer)) => local == peer,
        _ => false,
    }
}

/// Turn an int socket option on (best effort: a failure leaves it off).
fn set_flag(fd: RawFd, level: libc::c_int, name: libc::c_int) {
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid pointer to an int of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            level,
            name,
            &one as *const _ as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as u32,
        );
    }
}

pub(crate) fn set_reuseaddr(fd: RawFd) {
    set_flag(fd, libc::SOL_SOCKET, libc::SO_REUSEADDR);
}

pub(crate) fn set_nodelay(fd: RawFd) {
    set_flag(fd, libc::IPPROTO_TCP, libc::TCP_NODELAY);
}

/// Listening sockets passed by systemd (LISTEN_PID/LISTEN_FDS), if any.
pub fn socket_activation_fds() -> Vec<RawFd> {
    let pid_ok = std::env::var("LISTEN_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_some_and(|p| p == std::process::id());
    let n = std::env::var("LISTEN_FDS")
        .ok()
        .and_then(|n| n.parse::<i32>().ok())
        .unwrap_or(0);
    if !pid_ok || n <= 0 {
        return Vec::new();
    }
    (3..3 + n).collect()
}

/// Refuse an inherited descriptor (LISTEN_FDS) that is not a listening
/// stream socket. A unit with `Accept=yes` (inetd style) passes one
/// *connected* socket per connection: accept() on it failed with EINVAL at
/// once, every time, and the loop spun at 100% CPU while the client hung (a
/// tester's find). One process serves a replica directory (it holds its
/// lock), so only `Accept=no` can work.
fn check_inherited_listener(fd: RawFd) -> Result<(), String> {
    let opt = |name: libc::c_int| -> std::io::Result<libc::c_int> {
        let mut v: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt into an int we own, with its size.
        let r = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                &mut v as *mut _ as *mut libc::c_void,
                &mut len,
            )
        };
        if r == 0 {
            Ok(v)
        } else {
            Err(std::io::Error::last_os_error())
        }
    };
    let what = format!("descriptor {fd} passed by socket activation (LISTEN_FDS)");
    let ty = opt(libc::SO_TYPE).map_err(|e| format!("{what} is not a usable socket: {e}"))?;
    if ty != libc::SOCK_STREAM {
        return Err(format!("{what} is not a stream socket (type {ty})"));
    }
    if opt(libc::SO_ACCEPTCONN).map_err(|e| format!("{what}: {e}"))? == 0 {
        return Err(format!(
            "{what} is not a listening socket: a connected one comes from a socket unit \
             with Accept=yes (one process per connection), but one process serves a replica; \
             use Accept=no (the default)"
        ));
    }
    Ok(())
}

/// Pending connections a listener queues (the kernel caps it at
/// `net.core.somaxconn`). std's 128 made a burst of a thousand connects take
/// seconds: SYNs beyond the queue are dropped and retried after a second.
pub(super) const LISTEN_BACKLOG: i32 = 4096;

/// Raise the accept queue of a bound listener to [`LISTEN_BACKLOG`].
fn deepen_backlog(fd: RawFd) {
    // SAFETY: listen(2) again on a listening socket we own only changes
    // its backlog.
    unsafe { libc::listen(fd, LISTEN_BACKLOG) };
}

/// Call `held` every 100 ms while it says an address is held, for up to
/// 10 s, logging `waiting` once; whether it was released. A killed
/// predecessor's io_uring is torn down by the kernel after the process is
/// gone, and until then its listening sockets still hold their addresses
/// (seen when a node is restarted right after SIGKILL).
fn wait_for_release(waiting: std::fmt::Arguments, mut held: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let mut said = false;
    while held() {
        if std::time::Instant::now() >= deadline {
            return false;
        }
        if !said {
            crate::elog!("nbdmirror: {waiting}");
            said = true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Bind a TCP listener, waiting up to 10 s while the address is in use
/// (see [`wait_for_release`]).
pub fn bind_tcp(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let mut r = TcpListener::bind(addr);
    let mut again = false;
    wait_for_release(
        format_args!("{addr} is in use; waiting up to 10 s for it to be released"),
        || {
            if std::mem::replace(&mut again, true) {
                r = TcpListener::bind(addr);
            }
            matches!(&r, Err(e) if e.kind() == std::io::ErrorKind::AddrInUse)
        },
    );
    let l = r?;
    deepen_backlog(l.as_raw_fd());
    Ok(l)
}

pub(super) fn open_listener(l: &Listen) -> Result<OwnedFd, String> {
    match l {
        Listen::Tcp(addr) => {
            let s = bind_tcp(*addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
            Ok(OwnedFd::from(s))
        }
        Listen::Unix(path) => {
            if let Ok(meta) = std::fs::symlink_metadata(path) {
                use std::os::unix::fs::FileTypeExt;
                if meta.file_type().is_socket() {
                    // A stale socket is replaced; one a running process
                    // answers on (another node's) is not taken over. As
                    // with TCP ports (`bind_tcp`), a killed predecessor's
                    // socket answers until the kernel has torn its io_uring
                    // down: wait up to 10 s for that.
                    if !wait_for_release(
                        format_args!(
                            "another process answers on {}; waiting up to 10 s for it to go",
                            path.display()
                        ),
                        || crate::mirror::socket_is_live(path),
                    ) {
                        return Err(format!(
                            "cannot listen on {}: another running process answers on that \
                             socket",
                            path.display()
                        ));
                    }
                    let _ = std::fs::remove_file(path);
                }
            }
            let s = UnixListener::bind(path)
                .map_err(|e| format!("cannot listen on {}: {e}", path.display()))?;
            deepen_backlog(s.as_raw_fd());
            Ok(OwnedFd::from(s))
        }
        Listen::Fd(fd) => {
            check_inherited_listener(*fd)?;
            // SAFETY: systemd hands us ownership of these descriptors.
            Ok(unsafe { OwnedFd::from_raw_fd(*fd) })
        }
    }
}

/// After a refused start: the sockets this start bound (admin, `--unix`)
/// are closed by now; remove them, unless something else answers there
/// (another node's, which this start left alone).
pub(super) fn remove_dead_sockets(config: &ServeConfig) {
    use std::os::unix::fs::FileTypeExt;
    let admin = config.mirror.as_ref().and_then(|m| m.admin_socket.clone());
    let unix = config.listen.iter().filter_map(|l| match l {
        Listen::Unix(p) => Some(p.clone()),
        _ => None,
    });
    for p in admin.into_iter().chain(unix) {
        let is_socket = std::fs::symlink_metadata(&p).is_ok_and(|m| m.file_type().is_socket());
        if is_socket && !mirror::socket_is_live(&p) {
            let _ = std::fs::remove_file(&p);
        }
    }
}
