//! A minimal NBD client written from the protocol spec (doc/proto.md of
//! NetworkBlockDevice/nbd), independent of the server's code: fixed-newstyle
//! handshake, `NBD_OPT_GO`, simple replies. It can also send what no real
//! client would. Every socket read has a timeout, so a server that stops
//! answering fails the test instead of hanging it.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

pub const NBDMAGIC: &[u8; 8] = b"NBDMAGIC";
pub const IHAVEOPT: &[u8; 8] = b"IHAVEOPT";
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

pub const FLAG_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
pub const REP_ERR_INVALID: u32 = 0x8000_0003;
pub const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_WRITE_ZEROES: u16 = 6;

pub const FLAG_FUA: u16 = 1 << 0;

pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;

const TIMEOUT: Duration = Duration::from_secs(10);

/// Connects and reads the greeting; sends client flags FIXED_NEWSTYLE|NO_ZEROES.
pub fn greet(path: &Path) -> UnixStream {
    greet_with(path, FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES)
}

/// Connects, reads the greeting, sends `client_flags`.
pub fn greet_with(path: &Path, client_flags: u32) -> UnixStream {
    let mut s = UnixStream::connect(path).expect("connecting to the server");
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    s.set_write_timeout(Some(TIMEOUT)).expect("write timeout");
    let mut hello = [0u8; 18];
    s.read_exact(&mut hello).expect("reading the greeting");
    assert_eq!(&hello[0..8], NBDMAGIC);
    assert_eq!(&hello[8..16], IHAVEOPT);
    let flags = u16::from_be_bytes([hello[16], hello[17]]);
    assert_eq!(flags & 3, 3, "server must offer FIXED_NEWSTYLE and NO_ZEROES");
    s.write_all(&client_flags.to_be_bytes()).expect("sending client flags");
    s
}

pub fn send_option(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut m = option_head(option, data.len() as u32);
    m.extend(data);
    s.write_all(&m).expect("sending an option");
}

/// An option's header, announcing `len` bytes of data (which a test may
/// then send, trickle, or never send).
pub fn option_head(option: u32, len: u32) -> Vec<u8> {
    [IHAVEOPT.as_slice(), &option.to_be_bytes(), &len.to_be_bytes()].concat()
}

/// One option reply: (option, reply type, data).
pub fn option_reply(s: &mut UnixStream) -> (u32, u32, Vec<u8>) {
    let mut h = [0u8; 20];
    s.read_exact(&mut h).expect("reading an option reply");
    assert_eq!(u64::from_be_bytes(h[0..8].try_into().unwrap()), OPTION_REPLY_MAGIC);
    let len = u32::from_be_bytes(h[16..20].try_into().unwrap()) as usize;
    let mut data = vec![0u8; len];
    s.read_exact(&mut data).expect("reading option reply data");
    (be32(&h[8..12]), be32(&h[12..16]), data)
}

/// A simple reply's 16-byte header: (magic, error, cookie).
pub fn reply_header(h: &[u8; 16]) -> (u32, u32, u64) {
    (be32(&h[0..4]), be32(&h[4..8]), u64::from_be_bytes(h[8..16].try_into().unwrap()))
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes(b.try_into().unwrap())
}

/// A request that `Nbd::queue` sends with others.
pub enum Req<'a> {
    Read(u64, u32),
    Write(u64, &'a [u8]),
    Flush,
}

/// A connection in the transmission phase.
pub struct Nbd {
    pub s: UnixStream,
    pub size: u64,
    pub flags: u16,
    cookie: u64,
}

impl Nbd {
    pub fn connect(path: &Path) -> Nbd {
        Nbd::go(greet(path))
    }

    /// `NBD_OPT_GO` for the default export, no info requests.
    pub fn go(s: UnixStream) -> Nbd {
        Nbd::go_named(s, b"")
    }

    /// `NBD_OPT_GO` for export `name`, no info requests.
    pub fn go_named(mut s: UnixStream, name: &[u8]) -> Nbd {
        let mut data = (name.len() as u32).to_be_bytes().to_vec();
        data.extend(name);
        data.extend([0, 0]);
        send_option(&mut s, OPT_GO, &data);
        let mut export = None;
        loop {
            let (opt, kind, data) = option_reply(&mut s);
            assert_eq!(opt, OPT_GO);
            match kind {
                REP_INFO if data[0..2] == INFO_EXPORT.to_be_bytes() => {
                    assert_eq!(data.len(), 12, "NBD_INFO_EXPORT is 12 bytes");
                    let size = u64::from_be_bytes(data[2..10].try_into().unwrap());
                    export = Some((size, u16::from_be_bytes([data[10], data[11]])));
                }
                REP_INFO => {}
                REP_ACK => break,
                other => panic!("unexpected reply {other:#x} to NBD_OPT_GO"),
            }
        }
        let (size, flags) = export.expect("NBD_INFO_EXPORT before NBD_REP_ACK");
        Nbd::transmission(s, size, flags)
    }

    /// A connection already in the transmission phase.
    pub fn transmission(s: UnixStream, size: u64, flags: u16) -> Nbd {
        Nbd { s, size, flags, cookie: 0 }
    }

    /// Sends one request (and `payload` right after it); returns its cookie.
    pub fn send(&mut self, flags: u16, cmd: u16, offset: u64, len: u32, payload: &[u8]) -> u64 {
        self.cookie += 1;
        let mut m = header(flags, cmd, self.cookie, offset, len).to_vec();
        m.extend(payload);
        self.s.write_all(&m).expect("sending a request");
        self.cookie
    }

    /// Sends `reqs` in one write, cookies `first` on, as a client that
    /// queues requests does: the server finds them together.
    pub fn queue(&mut self, first: u64, reqs: &[Req]) {
        let mut wire = Vec::new();
        for (cookie, req) in (first..).zip(reqs) {
            let (cmd, offset, len, payload) = match *req {
                Req::Read(offset, len) => (CMD_READ, offset, len, &[][..]),
                Req::Write(offset, data) => (CMD_WRITE, offset, data.len() as u32, data),
                Req::Flush => (CMD_FLUSH, 0, 0, &[][..]),
            };
            wire.extend(header(0, cmd, cookie, offset, len));
            wire.extend(payload);
        }
        self.s.write_all(&wire).expect("sending requests");
    }

    /// The `len` bytes of data after a read's successful reply.
    pub fn data(&mut self, len: usize) -> Vec<u8> {
        let mut data = vec![0u8; len];
        self.s.read_exact(&mut data).expect("reading read data");
        data
    }

    /// One simple reply header: (error, cookie).
    pub fn reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).expect("reading a reply");
        let (magic, error, cookie) = reply_header(&h);
        assert_eq!(magic, SIMPLE_REPLY_MAGIC, "simple reply magic");
        (error, cookie)
    }

    /// A request without payload or reply data: its error (0 for success).
    pub fn command(&mut self, flags: u16, cmd: u16, offset: u64, len: u32) -> u32 {
        let cookie = self.send(flags, cmd, offset, len, &[]);
        self.answer(cookie)
    }

    pub fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.write_flags(0, offset, data)
    }

    pub fn write_flags(&mut self, flags: u16, offset: u64, data: &[u8]) -> u32 {
        let cookie = self.send(flags, CMD_WRITE, offset, data.len() as u32, data);
        self.answer(cookie)
    }

    /// `Err(error)` for a failed read, which carries no data.
    pub fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let cookie = self.send(0, CMD_READ, offset, len, &[]);
        match self.answer(cookie) {
            0 => Ok(self.data(len as usize)),
            e => Err(e),
        }
    }

    fn answer(&mut self, cookie: u64) -> u32 {
        let (error, got) = self.reply();
        assert_eq!(got, cookie, "reply for another request");
        error
    }

    /// Ends cleanly: `NBD_CMD_DISC`, after which the server closes.
    pub fn disconnect(mut self) {
        self.send(0, CMD_DISC, 0, 0, &[]);
        self.expect_closed();
    }

    /// Asserts the server closes the connection without sending anything.
    pub fn expect_closed(&mut self) {
        expect_closed(&mut self.s);
    }
}

pub fn expect_closed(s: &mut UnixStream) {
    let mut b = [0u8; 64];
    match s.read(&mut b) {
        Ok(0) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {}
        Ok(n) => panic!("expected the server to close, got {n} bytes: {:02x?}", &b[..n]),
        Err(e) => panic!("expected the server to close: {e}"),
    }
}

/// A request header ("Request message").
pub fn header(flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}
