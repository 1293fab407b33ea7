//! Serve mode: one NBD client at a time on a unix or TCP socket, until
//! stopped. The same transmission loop as the kernel path serves it.

use std::io::{self, ErrorKind};
use std::net::TcpListener;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

use crate::cli::Addr;
use crate::fail::{Code, Failure};
use crate::nbd::proto::{self, Export, Negotiated};
use crate::nbd::serve::{self, Buffers};
use crate::stats::Stats;
use crate::store::{Store, UseStore};
use crate::{info, warn};

pub struct Serve<'a>(pub &'a Addr);

impl UseStore for Serve<'_> {
    fn run<S: Store>(self, store: &mut S) -> Result<(), Failure> {
        serve(store, self.0)
    }
}

fn serve<S: Store>(store: &mut S, addr: &Addr) -> Result<(), Failure> {
    let export = Export::new(store.size());
    let mut bufs = Buffers::new(store).map_err(|e| Failure::os("allocating staging buffers", e))?;
    let stats = Stats::default();
    match addr {
        Addr::Unix(path) => {
            let listener = bind_unix(path)?;
            info!("serving {} MiB on unix:{}", export.size >> 20, path.display());
            loop {
                match listener.accept() {
                    Ok((mut conn, _)) => session(store, &mut bufs, &export, &stats, &mut conn),
                    Err(e) => accept_failed(e)?,
                }
            }
        }
        Addr::Tcp(hostport) => {
            let listener = TcpListener::bind(hostport).map_err(|e| Failure::os(format!("tcp:{hostport}"), e))?;
            info!("serving {} MiB on tcp:{hostport}", export.size >> 20);
            loop {
                match listener.accept() {
                    Ok((mut conn, peer)) => {
                        // Replies leave in one writev per batch: do not wait for more.
                        let _ = conn.set_nodelay(true);
                        info!("client {peer} connected");
                        session(store, &mut bufs, &export, &stats, &mut conn)
                    }
                    Err(e) => accept_failed(e)?,
                }
            }
        }
    }
}

/// A failing client never ends the server: log and take the next one.
fn session<S, T>(store: &mut S, bufs: &mut Buffers<S::Buf>, export: &Export, stats: &Stats, conn: &mut T)
where
    S: Store,
    T: io::Read + io::Write + std::os::fd::AsFd,
{
    match proto::handshake(conn, export) {
        Ok(Negotiated::Transmission) => {}
        Ok(Negotiated::Aborted) => return,
        Err(e) => return warn!("handshake failed: {e}"),
    }
    match serve::transmit(store, bufs, export, stats, conn) {
        Ok(end) => info!("client done ({end:?})"),
        Err(e) => warn!("connection dropped: {e}"),
    }
}

fn accept_failed(e: io::Error) -> Result<(), Failure> {
    match e.kind() {
        ErrorKind::Interrupted | ErrorKind::ConnectionAborted => Ok(()),
        _ if e.raw_os_error() == Some(libc::EMFILE) => {
            warn!("accept: {e}");
            Ok(())
        }
        _ => Err(Failure::os("accept", e)),
    }
}

/// Binds `path` mode 0600. A socket left by a dead server is replaced; one
/// that still answers is someone else's.
fn bind_unix(path: &Path) -> Result<UnixListener, Failure> {
    if path.exists() {
        if UnixStream::connect(path).is_ok() {
            return Err(Failure::new(Code::Busy, format!("{}: another server is listening there", path.display())));
        }
        std::fs::remove_file(path).map_err(|e| Failure::os(format!("removing stale {}", path.display()), e))?;
    }
    // SAFETY: umask only swaps the process's file mode mask; no memory is
    // involved. Serve mode is single-threaded, so no other file creation
    // races with the narrowed mask.
    let old = unsafe { libc::umask(0o177) };
    let bound = UnixListener::bind(path);
    // SAFETY: as above, restoring the previous mask.
    unsafe { libc::umask(old) };
    bound.map_err(|e| Failure::os(format!("unix:{}", path.display()), e))
}
