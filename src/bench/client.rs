//! The client end of an NBD connection, as far as bench needs one: connect
//! to `unix:PATH` or `tcp:HOST:PORT`, run the fixed-newstyle handshake with
//! `NBD_OPT_GO` (or `NBD_OPT_EXPORT_NAME` where the server lacks GO), and
//! learn the export's size, flags and block size limits. Simple replies
//! only: structured replies are never negotiated.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::cli::Addr;
use crate::fail::{Code, Failure};
use crate::nbd::proto::{
    FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES, IHAVEOPT, INFO_BLOCK_SIZE, INFO_EXPORT, NBDMAGIC, OPTION_REPLY_MAGIC,
    OPT_EXPORT_NAME, OPT_GO, REP_ACK, REP_ERR_UNSUP, REP_INFO,
};

/// The second greeting word of an oldstyle server ("Oldstyle negotiation").
const CLISERV_MAGIC: u64 = 0x0000_4202_8186_1253;
/// Option replies longer than this are not worth reading.
const MAX_REPLY_DATA: u32 = 64 * 1024;
/// Without `NBD_INFO_BLOCK_SIZE`, the spec's default maximum payload.
const DEFAULT_MAX_BLOCK: u32 = 32 * 1024 * 1024;

/// A connected socket of either family.
pub enum Conn {
    Unix(UnixStream),
    Tcp(TcpStream),
}

impl Conn {
    pub fn connect(addr: &Addr) -> Result<Conn, Failure> {
        let conn = match addr {
            Addr::Unix(path) => UnixStream::connect(path).map(Conn::Unix),
            Addr::Tcp(hostport) => TcpStream::connect(hostport.as_str()).map(|s| {
                // Requests go out one by one, as the kernel sends them.
                let _ = s.set_nodelay(true);
                Conn::Tcp(s)
            }),
        };
        conn.map_err(|e| connect_failure(addr, e))
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_nonblocking(on),
            Conn::Tcp(s) => s.set_nonblocking(on),
        }
    }

    /// Read and write timeouts for the blocking phases (handshake, goodbye).
    pub fn set_timeouts(&self, t: Duration) -> io::Result<()> {
        match self {
            Conn::Unix(s) => s.set_read_timeout(Some(t)).and_then(|()| s.set_write_timeout(Some(t))),
            Conn::Tcp(s) => s.set_read_timeout(Some(t)).and_then(|()| s.set_write_timeout(Some(t))),
        }
    }
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.read(buf),
            Conn::Tcp(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write(buf),
            Conn::Tcp(s) => s.write(buf),
        }
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Conn::Unix(s) => s.write_vectored(bufs),
            Conn::Tcp(s) => s.write_vectored(bufs),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl AsFd for Conn {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Conn::Unix(s) => s.as_fd(),
            Conn::Tcp(s) => s.as_fd(),
        }
    }
}

/// How an address reads on the command line.
pub struct Shown<'a>(pub &'a Addr);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self.0 {
            Addr::Unix(path) => write!(f, "unix:{}", path.display()),
            Addr::Tcp(hostport) => write!(f, "tcp:{hostport}"),
        }
    }
}

fn connect_failure(addr: &Addr, e: io::Error) -> Failure {
    let why = match e.kind() {
        io::ErrorKind::ConnectionRefused => "connection refused",
        io::ErrorKind::NotFound => "no such socket",
        _ => return Failure::os(format!("{}: connecting", Shown(addr)), e),
    };
    Failure::new(Code::Other, format!("{}: {why}: is the server running?", Shown(addr)))
}

/// What the handshake learned about the export.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
    /// Requests must be multiples of this, and at most `max_block` long.
    pub min_block: u32,
    pub max_block: u32,
}

/// Runs the client side of the fixed-newstyle handshake and ends in the
/// transmission phase. The error says what the server did wrong or refused.
pub fn handshake<S: Read + Write>(s: &mut S) -> Result<Export, String> {
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello[..16]).map_err(|e| io_failure("reading the greeting", e))?;
    if u64::from_be_bytes(word8(&hello[0..8])) != NBDMAGIC {
        return Err("not an NBD server (its greeting lacks NBDMAGIC)".into());
    }
    match u64::from_be_bytes(word8(&hello[8..16])) {
        IHAVEOPT => {}
        CLISERV_MAGIC => return Err("oldstyle NBD server: bench needs fixed newstyle negotiation".into()),
        other => return Err(format!("unknown NBD greeting {other:#018x}")),
    }
    s.read_exact(&mut hello[16..18]).map_err(|e| io_failure("reading the greeting", e))?;
    let server_flags = u16::from_be_bytes([hello[16], hello[17]]);
    if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
        return Err("server does not offer fixed newstyle negotiation".into());
    }
    let no_zeroes = server_flags & FLAG_NO_ZEROES != 0;
    let client_flags = FLAG_FIXED_NEWSTYLE | if no_zeroes { FLAG_NO_ZEROES } else { 0 };
    s.write_all(&u32::from(client_flags).to_be_bytes()).map_err(|e| io_failure("sending client flags", e))?;

    // Default export (empty name), one information request: block sizes.
    let mut go = [0u8; 8];
    go[4..6].copy_from_slice(&1u16.to_be_bytes());
    go[6..8].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    send_option(s, OPT_GO, &go)?;

    let mut export = Export { size: 0, flags: 0, min_block: 1, max_block: DEFAULT_MAX_BLOCK };
    let mut have_size = false;
    let mut data = Vec::new();
    loop {
        let kind = option_reply(s, OPT_GO, &mut data)?;
        match kind {
            REP_ACK => break,
            REP_INFO if data.len() >= 2 => match u16::from_be_bytes([data[0], data[1]]) {
                INFO_EXPORT if data.len() >= 12 => {
                    export.size = u64::from_be_bytes(word8(&data[2..10]));
                    export.flags = u16::from_be_bytes([data[10], data[11]]);
                    have_size = true;
                }
                INFO_BLOCK_SIZE if data.len() >= 14 => {
                    export.min_block = be32(&data[2..6]).max(1);
                    export.max_block = be32(&data[10..14]);
                }
                _ => {} // names, descriptions: not needed
            },
            REP_ERR_UNSUP => return export_name(s, no_zeroes),
            k if k & 0x8000_0000 != 0 => {
                let msg = String::from_utf8_lossy(&data);
                let msg = if msg.is_empty() { String::new() } else { format!(": {msg}") };
                return Err(format!("server refused NBD_OPT_GO: {}{msg}", rep_error(k)));
            }
            _ => {} // unknown reply types are skipped
        }
    }
    if !have_size {
        return Err("server acknowledged NBD_OPT_GO without sending the export size (NBD_INFO_EXPORT)".into());
    }
    Ok(export)
}

/// The old way in, for servers without `NBD_OPT_GO`: no error replies, no
/// block size information.
fn export_name<S: Read + Write>(s: &mut S, no_zeroes: bool) -> Result<Export, String> {
    send_option(s, OPT_EXPORT_NAME, &[])?;
    let mut tail = [0u8; 10 + 124];
    let want = if no_zeroes { 10 } else { tail.len() };
    s.read_exact(&mut tail[..want])
        .map_err(|e| io_failure("reading the NBD_OPT_EXPORT_NAME answer (is there a default export?)", e))?;
    Ok(Export {
        size: u64::from_be_bytes(word8(&tail[0..8])),
        flags: u16::from_be_bytes([tail[8], tail[9]]),
        min_block: 1,
        max_block: DEFAULT_MAX_BLOCK,
    })
}

/// One option request: magic, option, length, data.
pub fn option_request(option: u32, data: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(16 + data.len());
    m.extend_from_slice(&IHAVEOPT.to_be_bytes());
    m.extend_from_slice(&option.to_be_bytes());
    m.extend_from_slice(&(data.len() as u32).to_be_bytes());
    m.extend_from_slice(data);
    m
}

fn send_option<S: Write>(s: &mut S, option: u32, data: &[u8]) -> Result<(), String> {
    s.write_all(&option_request(option, data)).map_err(|e| io_failure("sending an option", e))
}

/// Reads one option reply to `option` into `data`; returns its type.
fn option_reply<S: Read>(s: &mut S, option: u32, data: &mut Vec<u8>) -> Result<u32, String> {
    let mut head = [0u8; 20];
    s.read_exact(&mut head).map_err(|e| io_failure("reading an option reply", e))?;
    if u64::from_be_bytes(word8(&head[0..8])) != OPTION_REPLY_MAGIC {
        return Err("bad option reply magic".into());
    }
    let (answered, kind, len) = (be32(&head[8..12]), be32(&head[12..16]), be32(&head[16..20]));
    if answered != option {
        return Err(format!("server answered option {answered} where option {option} was asked"));
    }
    if len > MAX_REPLY_DATA {
        return Err(format!("option reply of {len} bytes is too long"));
    }
    data.clear();
    data.resize(len as usize, 0);
    s.read_exact(data).map_err(|e| io_failure("reading an option reply", e))?;
    Ok(kind)
}

/// `NBD_REP_ERR_*` in words ("Option reply types").
fn rep_error(kind: u32) -> String {
    let what = match kind & 0x7fff_ffff {
        1 => "unsupported (NBD_REP_ERR_UNSUP)",
        2 => "forbidden by server policy (NBD_REP_ERR_POLICY)",
        3 => "invalid request (NBD_REP_ERR_INVALID)",
        4 => "unsupported on this platform (NBD_REP_ERR_PLATFORM)",
        5 => "TLS required (NBD_REP_ERR_TLS_REQD), which bench does not speak",
        6 => "no default export (NBD_REP_ERR_UNKNOWN)",
        7 => "server shutting down (NBD_REP_ERR_SHUTDOWN)",
        8 => "block size negotiation required (NBD_REP_ERR_BLOCK_SIZE_REQD)",
        9 => "request too big (NBD_REP_ERR_TOO_BIG)",
        10 => "extended headers required (NBD_REP_ERR_EXT_HEADER_REQD)",
        _ => return format!("error {kind:#010x}"),
    };
    what.to_string()
}

fn io_failure(what: &str, e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => format!("{what}: the server closed the connection"),
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => format!("{what}: the server did not answer in time"),
        _ => format!("{what}: {e}"),
    }
}

fn word8(b: &[u8]) -> [u8; 8] {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[..8]);
    w
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::proto;
    use crate::sock::Deadline;
    use std::thread;
    use std::time::Instant;

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        (a, b)
    }

    #[test]
    fn negotiates_with_our_server() {
        let (mut c, mut s) = pair();
        let server = thread::spawn(move || proto::handshake(&mut s, &proto::Export::new(64 << 20)).unwrap());
        let e = handshake(&mut c).unwrap();
        assert_eq!(server.join().unwrap(), proto::Negotiated::Transmission);
        assert_eq!(e.size, 64 << 20);
        assert_eq!(e.flags, proto::Export::new(0).flags);
        assert_eq!((e.min_block, e.max_block), (1, proto::MAX_PAYLOAD));
    }

    /// A scripted server: greets with `flags`, reads the client flags and
    /// one option, answers `answer`, and returns what the client sent.
    fn scripted(flags: u16, answer: Vec<u8>) -> (Result<Export, String>, Vec<u8>) {
        let (mut c, mut s) = pair();
        let server = thread::spawn(move || {
            let mut hello = NBDMAGIC.to_be_bytes().to_vec();
            hello.extend(IHAVEOPT.to_be_bytes());
            hello.extend(flags.to_be_bytes());
            s.write_all(&hello).unwrap();
            let mut got = [0u8; 4 + 16];
            if s.read_exact(&mut got).is_err() {
                return Vec::new(); // the client gave up after the greeting
            }
            let mut rest = vec![0u8; be32(&got[16..20]) as usize];
            s.read_exact(&mut rest).unwrap();
            s.write_all(&answer).unwrap();
            let mut v = got.to_vec();
            v.extend(rest);
            v
        });
        let r = handshake(&mut c);
        drop(c);
        (r, server.join().unwrap())
    }

    fn rep(option: u32, kind: u32, data: &[u8]) -> Vec<u8> {
        let mut v = OPTION_REPLY_MAGIC.to_be_bytes().to_vec();
        v.extend(option.to_be_bytes());
        v.extend(kind.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        v
    }

    #[test]
    fn sends_go_for_the_default_export_asking_block_sizes() {
        let (_, sent) = scripted(3, rep(OPT_GO, 0x8000_0002, b""));
        assert_eq!(&sent[0..4], &[0, 0, 0, 3], "FIXED_NEWSTYLE | NO_ZEROES");
        assert_eq!(sent[4..20], option_request(OPT_GO, &[0, 0, 0, 0, 0, 1, 0, 3])[..16]);
        assert_eq!(&sent[20..], &[0, 0, 0, 0, 0, 1, 0, 3]);
        let (_, sent) = scripted(1, rep(OPT_GO, 0x8000_0002, b""));
        assert_eq!(&sent[0..4], &[0, 0, 0, 1], "no NO_ZEROES unless offered");
    }

    #[test]
    fn error_replies_say_what_was_refused() {
        let (r, _) = scripted(3, rep(OPT_GO, 0x8000_0002, b"go away"));
        let e = r.unwrap_err();
        assert!(e.contains("NBD_REP_ERR_POLICY") && e.contains("go away"), "{e}");
        let (r, _) = scripted(3, rep(OPT_GO, 0x8000_0005, b""));
        assert!(r.unwrap_err().contains("TLS"));
        let (r, _) = scripted(3, rep(OPT_GO, REP_ACK, b""));
        assert!(r.unwrap_err().contains("export size"));
        let (r, _) = scripted(0, Vec::new());
        assert!(r.unwrap_err().contains("fixed newstyle"));
        let (r, _) = scripted(3, Vec::new());
        assert!(r.unwrap_err().contains("closed the connection"));
    }

    #[test]
    fn info_replies_are_parsed_until_ack() {
        let mut answer = rep(OPT_GO, REP_INFO, &[0, 1, 0, 4, b'n', b'a']); // INFO_NAME: skipped
        let mut export = vec![0, 0];
        export.extend((12345u64 << 12).to_be_bytes());
        export.extend(0x4du16.to_be_bytes());
        answer.extend(rep(OPT_GO, REP_INFO, &export));
        let mut sizes = vec![0, 3];
        sizes.extend(512u32.to_be_bytes());
        sizes.extend(4096u32.to_be_bytes());
        sizes.extend((1u32 << 25).to_be_bytes());
        answer.extend(rep(OPT_GO, REP_INFO, &sizes));
        answer.extend(rep(OPT_GO, REP_ACK, b""));
        let (r, _) = scripted(3, answer);
        assert_eq!(r.unwrap(), Export { size: 12345 << 12, flags: 0x4d, min_block: 512, max_block: 1 << 25 });
    }

    #[test]
    fn falls_back_to_export_name_without_go() {
        // Without NO_ZEROES the answer carries 124 zero bytes.
        let mut answer = (1u64 << 30).to_be_bytes().to_vec();
        answer.extend(1u16.to_be_bytes());
        answer.extend([0u8; 124]);
        let (mut c, mut s) = pair();
        let server = thread::spawn(move || {
            let mut hello = NBDMAGIC.to_be_bytes().to_vec();
            hello.extend(IHAVEOPT.to_be_bytes());
            hello.extend(1u16.to_be_bytes());
            s.write_all(&hello).unwrap();
            let mut got = [0u8; 4 + 16 + 8 + 16];
            s.read_exact(&mut got[..28]).unwrap();
            s.write_all(&rep(OPT_GO, REP_ERR_UNSUP, b"")).unwrap();
            s.read_exact(&mut got[28..]).unwrap();
            s.write_all(&answer).unwrap();
            got
        });
        let e = handshake(&mut c).unwrap();
        let got = server.join().unwrap();
        assert_eq!(&got[28..44], &option_request(OPT_EXPORT_NAME, &[])[..]);
        assert_eq!((e.size, e.flags, e.max_block), (1 << 30, 1, DEFAULT_MAX_BLOCK));
    }

    #[test]
    fn a_late_greeting_ends_at_the_deadline() {
        let dir = std::env::temp_dir().join(format!("nbd-vram-bench-deadline-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.sock");
        // Listening, never accepting: connect succeeds, no greeting comes.
        let _listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        let mut conn = Conn::connect(&Addr::Unix(path)).unwrap();
        let start = Instant::now();
        let e = handshake(&mut Deadline { conn: &mut conn, at: start + Duration::from_millis(200) }).unwrap_err();
        let took = start.elapsed();
        assert!(e.contains("reading the greeting: the server did not answer in time"), "{e}");
        assert!(took >= Duration::from_millis(190) && took < Duration::from_secs(2), "{took:?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn refused_connections_name_the_address_and_the_fix() {
        let f = Conn::connect(&Addr::Unix("/nonexistent/nbd-vram-bench.sock".into())).err().unwrap();
        assert_eq!(f.message, "unix:/nonexistent/nbd-vram-bench.sock: no such socket: is the server running?");
    }
}
