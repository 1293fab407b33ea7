//! Serve mode: NBD clients on a unix or TCP socket, up to `--connections`
//! at once, each on a serving thread of its own, until stopped. The same
//! transmission loop as the kernel path serves them.

use std::convert::Infallible;
use std::io::{self, ErrorKind};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::{UnixListener, UnixStream};
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::path::Path;

use std::thread;
use std::time::{Duration, Instant};

use crate::cli::{self, Addr};
use crate::store::StoreOpts;
use crate::tuning::Tuning;
use crate::signals::{Signals, STOP};
use crate::sock::{set_keepalive, set_recv_timeout, set_send_timeout, Deadline};
use crate::status::{self, Instance};
use crate::fail::{Code, Failure};
use crate::nbd::proto::{self, Export, Negotiated, MAX_PAYLOAD};
use crate::nbd::transmit::{self, Shared};
use crate::stats::Stats;
use crate::store::{Backing, UseStore};
use crate::desk::Desk;
use crate::workers::{self, Conn};
use crate::{error, info, pressure, warn};

/// How long a client may take to negotiate, from connect to transmission.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a client may stop in the middle of a request, or leave a
/// reply untaken: as long as TCP gives a reply (`sock::set_keepalive`).
const STALL: Duration = Duration::from_secs(60);

pub struct Serve<'a> {
    pub addr: &'a Addr,
    pub store: &'a StoreOpts,
    /// tcp: may listen beyond loopback (`--allow-remote`).
    pub allow_remote: bool,
    /// Clients served at once, one thread each.
    pub connections: usize,
    pub tuning: &'a Tuning,
}

impl UseStore for Serve<'_> {
    fn run<B: Backing>(self, backing: &B) -> Result<(), Failure> {
        serve(backing, &self)
    }
}

/// This thread accepts clients and hands each to a serving thread that is
/// free (`Desk`). With one serving thread a client waits until it is free,
/// as clients always did (no `CAN_MULTI_CONN`: none opens two). With
/// several, a client that finds every one busy for `GRACE` is turned away,
/// told why in the handshake, with a line in the log: the export says
/// `CAN_MULTI_CONN`, and a client told so may open more connections than
/// there are threads and wait for ever on the last (nbdcopy opens four);
/// the grace lets a client that reconnects while its last connection is
/// still closing in. Such a client waits on a thread of its own (one of
/// `WAITING`), so that the clients after it are taken meanwhile.
fn serve<B: Backing>(backing: &B, how: &Serve) -> Result<(), Failure> {
    let signals = Signals::taken();
    pressure::set_loops(how.connections);
    let shared = Shared::new(Export::new(backing.size()), how.connections);
    // Shared with the status thread, which may outlive this frame at exit.
    let stats: &'static [Stats] = Box::leak((0..how.connections).map(|_| Stats::default()).collect());
    // A served device may be someone's swap (nbd-client): same measures.
    pressure::prepare(false)?;
    let addr = how.addr;
    let listener = match addr {
        Addr::Unix(path) => Listener::Unix(bind_unix(path)?),
        Addr::Tcp(hostport) => Listener::Tcp(bind_tcp(hostport, how.allow_remote)?),
    };
    let instance = Instance {
        name: format!("serve-{}", std::process::id()),
        target: addr.to_string(),
        store: how.store.describe(),
        size: shared.export.size,
        priority: None,
    };
    let socket = match addr {
        Addr::Unix(path) => Some(path.clone()),
        Addr::Tcp(_) => None,
    };
    let stopper = move || {
        let all: Vec<&Stats> = stats.iter().collect();
        status::publish(&instance, &all, &|_| {}, || signals.wait(Duration::from_secs(1)).is_none_or(|sig| !STOP.contains(&sig)));
        if let Some(path) = socket {
            let _ = std::fs::remove_file(path);
        }
        info!("stopped");
        Signals::exit_now(0)
    };
    thread::Builder::new()
        .name("nbd-status".into())
        .stack_size(256 * 1024)
        .spawn(stopper)
        .map_err(|e| Failure::os("starting the status thread", e))?;
    let n = how.connections;
    let desk = Desk::new(n);
    let waiting = Desk::new(if n > 1 { WAITING } else { 0 });
    let work = |i: usize, mut conn: Conn<B>| {
        crate::log::relay_here();
        pressure::realtime();
        loop {
            match desk.next(i) {
                Client::Unix(mut client) => session(&mut conn, &shared, &stats[i], &mut client),
                Client::Tcp(mut client, peer) => {
                    // Replies leave in one writev per batch: do not wait for more.
                    let _ = client.set_nodelay(true);
                    let _ = set_keepalive(client.as_fd(), KEEPALIVE_IDLE);
                    info!("client {peer} connected");
                    session(&mut conn, &shared, &stats[i], &mut client)
                }
            }
        }
    };
    let served = thread::scope(|s| {
        let _workers = workers::spawn(s, backing, how.tuning, MAX_PAYLOAD as usize, "nbd-serve", 0..n, &work)?;
        // The address bound, where a name or port 0 left it open.
        let on = match &listener {
            Listener::Tcp(l) => l.local_addr().map_or_else(|_| addr.to_string(), |a| format!("tcp:{a}")),
            Listener::Unix(_) => addr.to_string(),
        };
        match n {
            1 => info!("serving {} MiB on {on}", shared.export.size >> 20),
            n => info!("serving {} MiB on {on}, {n} clients at once", shared.export.size >> 20),
        }
        pressure::realtime();
        for i in 0..waiting.threads() {
            let (desk, waiting) = (&desk, &waiting);
            let wait = move || loop {
                let client = waiting.next(i);
                if let Err(turned_away) = desk.hand(client, Some(GRACE)) {
                    turn_away(turned_away, n);
                }
            };
            // Not fatal: a client that finds no waiting thread free is
            // turned away without a grace.
            if let Err(e) = thread::Builder::new().name(format!("nbd-wait-{i}")).stack_size(64 * 1024).spawn_scoped(s, wait) {
                warn!("starting a thread for waiting clients: {e}");
            }
        }
        // Only a failed accept ends this; the serving threads would wait
        // for clients for ever, so the process ends with its error.
        let Err(f) = front_desk(&listener, &desk, &waiting);
        error!("{f}");
        Signals::exit_now(f.code as i32)
    });
    if let (Err(_), Addr::Unix(path)) = (&served, addr) {
        let _ = std::fs::remove_file(path); // a store that could not open for every worker
    }
    served
}

/// How long a client waits for a free serving thread when there are
/// several, before it is turned away.
const GRACE: Duration = Duration::from_secs(1);

/// Clients that wait out `GRACE` at once, each on a thread of its own;
/// one more than these is turned away without a grace.
const WAITING: usize = 4;

/// How long a client turned away has to hear why.
const REFUSAL: Duration = Duration::from_millis(500);

/// A TCP client silent this long is probed (`sock::set_keepalive`): an
/// idle one answers, a vanished one frees its serving thread.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(30);

/// How long accepting pauses while the process or the system is out of
/// descriptors or memory; the client waits in the listen backlog.
const ACCEPT_PAUSE: Duration = Duration::from_millis(100);

/// An accepted client, on its way to a serving thread.
enum Client {
    Unix(UnixStream),
    Tcp(TcpStream, SocketAddr),
}

/// Accepts clients and hands each to a free serving thread, or to a
/// `waiting` thread to wait for one, until accepting fails. Without
/// waiting threads (one serving thread) a client waits here.
fn front_desk(listener: &Listener, desk: &Desk<Client>, waiting: &Desk<Client>) -> Result<Infallible, Failure> {
    let mut warned = None;
    loop {
        let client = match listener {
            Listener::Unix(listener) => listener.accept().map(|(c, _)| Client::Unix(c)),
            Listener::Tcp(listener) => listener.accept().map(|(c, peer)| Client::Tcp(c, peer)),
        };
        let client = match client {
            Ok(client) if waiting.threads() == 0 => desk.hand(client, None),
            Ok(client) => desk.hand(client, Some(Duration::ZERO)).or_else(|c| waiting.hand(c, Some(Duration::ZERO))),
            Err(e) => {
                accept_failed(e, &mut warned)?;
                continue;
            }
        };
        if let Err(turned_away) = client {
            turn_away(turned_away, desk.threads());
        }
    }
}

/// Tells a client turned away, every one of the `n` serving threads busy,
/// why, in the handshake (`proto::refuse`), within `REFUSAL`; a line in the
/// log says so too.
fn turn_away(client: Client, n: usize) {
    warn!("a client was turned away: every one of the {n} connections is in use");
    let why = format!("nbd-vram: every one of the {n} connections is in use; open {n} at most");
    let at = Instant::now() + REFUSAL;
    let _ = match client {
        Client::Unix(mut c) => proto::refuse(&mut Deadline { conn: &mut c, at }, &why),
        Client::Tcp(mut c, _) => proto::refuse(&mut Deadline { conn: &mut c, at }, &why),
    };
}

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

/// A failing client never ends the server: log and take the next one.
fn session<B, T>(conn: &mut Conn<B>, shared: &Shared, stats: &Stats, client: &mut T)
where
    B: Backing,
    T: io::Read + io::Write + AsFd,
{
    // A worker serves one client at a time: one that says nothing,
    // trickles its bytes or never reads its replies must not hold it, so the whole
    // negotiation has one deadline. In transmission a client may idle for
    // hours between requests, but not stop half-way through one, nor
    // leave a reply untaken: each read or send then waits `STALL` at most.
    let negotiated = proto::handshake(&mut Deadline { conn: &mut *client, at: Instant::now() + HANDSHAKE_TIMEOUT }, &shared.export);
    let _ = set_recv_timeout(client.as_fd(), Some(STALL));
    let _ = set_send_timeout(client.as_fd(), Some(STALL));
    match negotiated {
        Ok(Negotiated::Transmission) => {}
        Ok(Negotiated::Aborted) => return,
        Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
            return warn!("handshake failed: client did not finish negotiating within {} s", HANDSHAKE_TIMEOUT.as_secs())
        }
        Err(e) => return warn!("handshake failed: {e}"),
    }
    let then = stats.snapshot();
    match transmit::run(&mut conn.store, &mut conn.bufs, shared, stats, client) {
        Ok(end) => info!("client done ({end:?}): {}", stats.since(&then)),
        Err(e) if e.kind() == ErrorKind::WouldBlock => {
            warn!("connection dropped: the client stopped for {} s in the middle of a request or reply; {}", STALL.as_secs(), stats.since(&then))
        }
        Err(e) => warn!("connection dropped: {}; {}", crate::log::ErrorText(&e), stats.since(&then)),
    }
}

/// What a failed accept costs: nothing for an error of the connection
/// being accepted (accept(2) says to take the next one, as Linux passes
/// such errors on); a pause while the process or the system is out of
/// descriptors or memory, said once in 10 s; the server, for anything
/// else (the listening socket itself is wrong).
fn accept_failed(e: io::Error, warned: &mut Option<Instant>) -> Result<(), Failure> {
    match e.raw_os_error() {
        Some(
            libc::EINTR
            | libc::ECONNABORTED
            | libc::EPROTO
            | libc::EPERM
            | libc::ENETDOWN
            | libc::ENOPROTOOPT
            | libc::EHOSTDOWN
            | libc::ENONET
            | libc::EHOSTUNREACH
            | libc::EOPNOTSUPP
            | libc::ENETUNREACH,
        ) => Ok(()),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM) => {
            if warned.is_none_or(|at: Instant| at.elapsed() >= Duration::from_secs(10)) {
                warn!("accept: {e}; new clients wait until it passes");
                *warned = Some(Instant::now());
            }
            thread::sleep(ACCEPT_PAUSE);
            Ok(())
        }
        _ => Err(Failure::os("accept", e)),
    }
}

/// Binds the addresses `hostport` resolves to, checked as they are bound
/// (a name may resolve differently than when the command line was read).
fn bind_tcp(hostport: &str, allow_remote: bool) -> Result<TcpListener, Failure> {
    let what = format!("tcp:{hostport}");
    let addrs: Vec<SocketAddr> = hostport.to_socket_addrs().map_err(|e| Failure::os(&what, e))?.collect();
    match (cli::refuse_remote(hostport, &addrs), allow_remote) {
        (Ok(()), _) => {}
        (Err(refusal), false) => return Err(Failure::new(Code::Usage, refusal)),
        (Err(_), true) => warn!(
            "{what} is open to other hosts (--allow-remote): NBD has no authentication or encryption, so anyone \
             who can reach the port can read and write the whole export; prefer a unix socket or loopback with an SSH or TLS tunnel"
        ),
    }
    TcpListener::bind(&addrs[..]).map_err(|e| match e.kind() {
        ErrorKind::AddrInUse => Failure::new(Code::Busy, format!("{what}: {e}: another server is listening there")),
        _ => Failure::os(&what, e),
    })
}

/// Binds `path` mode 0600. A socket left by a dead server is replaced; one
/// that still answers is someone else's.
fn bind_unix(path: &Path) -> Result<UnixListener, Failure> {
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(Failure::new(Code::Busy, format!("{} exists and is not a socket: choose another path", path.display())));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(Failure::new(Code::Busy, format!("{}: another server is listening there", path.display())));
        }
        std::fs::remove_file(path).map_err(|e| Failure::os(format!("removing stale {}", path.display()), e))?;
    }
    // SAFETY: umask only swaps the process's file mode mask; no memory is
    // involved. Owner only from the start, so that nobody connects before
    // the chmod below. Serving threads start after binding; a file or
    // directory the driver's own threads make meanwhile (a JIT cache
    // entry) only comes out private to its owner.
    let old = unsafe { libc::umask(0o077) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    let bound = bound.map_err(|e| Failure::os(format!("unix:{}", path.display()), e))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| Failure::os(format!("chmod {}", path.display()), e))?;
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Out of descriptors or memory, or a connection that failed on its
    /// way in: the next client is taken. Only a listener that is itself
    /// wrong ends serving.
    #[test]
    fn only_a_broken_listener_ends_accepting() {
        let mut warned = None;
        for errno in [libc::EINTR, libc::ECONNABORTED, libc::EPROTO, libc::ENETUNREACH, libc::EMFILE, libc::ENFILE, libc::ENOBUFS, libc::ENOMEM] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(accept_failed(e, &mut warned).is_ok(), "errno {errno} ended accepting");
        }
        assert!(warned.is_some(), "running out was said");
        for errno in [libc::EBADF, libc::EINVAL, libc::ENOTSOCK] {
            assert!(accept_failed(io::Error::from_raw_os_error(errno), &mut warned).is_err(), "errno {errno}");
        }
    }
}
