//! systemd's readiness protocol, by hand: one datagram to $NOTIFY_SOCKET
//! (sd_notify(3)). Silent where there is no such socket.

use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixDatagram};

fn send(message: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let path = path.to_string_lossy();
    // A leading '@' names an abstract socket.
    let addr = match path.strip_prefix('@') {
        Some(name) => SocketAddr::from_abstract_name(name.as_bytes()),
        None => SocketAddr::from_pathname(path.as_ref()),
    };
    let sent = addr.and_then(|addr| UnixDatagram::unbound()?.send_to_addr(message.as_bytes(), &addr));
    if let Err(e) = sent {
        crate::warn!("telling systemd '{message}' failed: {e}");
    }
}

/// Swap is on: `systemctl start` may return, `swap.target` may proceed.
pub fn ready(status: &str) {
    send(&format!("READY=1\nSTATUS={status}"));
}

pub fn stopping() {
    send("STOPPING=1\nSTATUS=swapoff: moving pages back to RAM");
}
