//! NBD wire format and the newstyle handshake, server side.
//!
//! Section names refer to the NBD protocol spec (doc/proto.md in the
//! NetworkBlockDevice/nbd repository). `<linux/nbd.h>` covers only the
//! transmission phase; the handshake constants below are the spec's, as the
//! kernel never negotiates.

use std::io::{self, Read, Write};

use crate::uapi as sys;

pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FLAGS_KNOWN: u32 = (FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES) as u32;

pub const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;

pub const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = 0x8000_0001;
pub const REP_ERR_POLICY: u32 = 0x8000_0002;
const REP_ERR_INVALID: u32 = 0x8000_0003;
const REP_ERR_TOO_BIG: u32 = 0x8000_0009;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Option data beyond this is refused: names are at most 4 KiB ("Option types").
const MAX_OPTION_LEN: u32 = 16 * 1024;

/// The largest request payload, and so the staging needed for one request.
/// 32 MiB is the spec's recommended ceiling ("Block size constraints").
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Preferred block size: the page size, which swap uses.
const PREFERRED_BLOCK: u32 = 4096;

/// `NBD_CMD_FLAG_NO_HOLE` (bit 1 of the command flags), absent from the
/// kernel header; the header keeps flags in the upper half of `type`.
pub const CMD_FLAG_FUA: u32 = sys::NBD_CMD_FLAG_FUA;
pub const CMD_FLAG_NO_HOLE: u32 = 1 << 17;

pub const REQUEST_LEN: usize = 28;
pub const REPLY_LEN: usize = 16;

/// What a client learns about the export.
#[derive(Clone, Copy, Debug)]
pub struct Export {
    pub size: u64,
    pub flags: u16,
}

impl Export {
    /// Every command the loop implements; the store supports them all.
    pub fn new(size: u64) -> Export {
        let flags = sys::NBD_FLAG_HAS_FLAGS
            | sys::NBD_FLAG_SEND_FLUSH
            | sys::NBD_FLAG_SEND_FUA
            | sys::NBD_FLAG_SEND_TRIM
            | sys::NBD_FLAG_SEND_WRITE_ZEROES;
        Export { size, flags: flags as u16 }
    }

    /// Served on up to `connections` connections at once. Several say
    /// `CAN_MULTI_CONN`, which promises that a flush on one covers the
    /// writes answered on all (`transmit::Shared`). One does not: a client
    /// told so may open several connections at once and wait for ever for
    /// a server that takes one at a time.
    pub fn with_connections(mut self, connections: usize) -> Export {
        if connections > 1 {
            self.flags |= sys::NBD_FLAG_CAN_MULTI_CONN as u16;
        }
        self
    }
}

/// One transmission request ("Request message").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request {
    /// Command flags, kept in the kernel header's layout (upper 16 bits).
    pub flags: u32,
    pub command: u32,
    pub cookie: [u8; 8],
    pub offset: u64,
    pub len: u32,
}

impl Request {
    /// `None` for a bad magic: the stream is out of sync and must close.
    pub fn parse(b: &[u8; REQUEST_LEN]) -> Option<Request> {
        if be32(&b[0..4]) != sys::NBD_REQUEST_MAGIC {
            return None;
        }
        let kind = be32(&b[4..8]);
        Some(Request {
            flags: kind & 0xffff_0000,
            command: kind & 0xffff,
            cookie: b[8..16].try_into().ok()?,
            offset: u64::from_be_bytes(b[16..24].try_into().ok()?),
            len: be32(&b[24..28]),
        })
    }

    /// The client side of `parse` (bench mode sends requests).
    pub fn encode(&self) -> [u8; REQUEST_LEN] {
        let mut b = [0u8; REQUEST_LEN];
        b[0..4].copy_from_slice(&sys::NBD_REQUEST_MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&(self.flags | self.command).to_be_bytes());
        b[8..16].copy_from_slice(&self.cookie);
        b[16..24].copy_from_slice(&self.offset.to_be_bytes());
        b[24..28].copy_from_slice(&self.len.to_be_bytes());
        b
    }
}

/// A simple reply header ("Simple reply message").
pub fn reply(error: u32, cookie: [u8; 8]) -> [u8; REPLY_LEN] {
    let mut b = [0u8; REPLY_LEN];
    b[0..4].copy_from_slice(&sys::NBD_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie);
    b
}

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

/// How a handshake ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Negotiated {
    Transmission,
    Aborted,
}

/// The error that ends a connection whose stream cannot go on: a peer
/// that broke the protocol, or a reply that cannot be honoured. `what` is
/// logged here: an error that carried it would be allocated, and a swap
/// server's connection may end so when memory is shortest.
pub fn broken(what: &'static str) -> io::Error {
    crate::warn!("{what}");
    io::ErrorKind::InvalidData.into()
}

/// Runs the server side of the newstyle handshake ("Newstyle
/// negotiation"), fixed or not. Protocol violations are errors: the caller
/// closes.
pub fn handshake<S: Read + Write>(s: &mut S, export: &Export) -> io::Result<Negotiated> {
    let client_flags = greet(s)?;
    // Without it the client speaks plain newstyle, as older nbd-client did:
    // it may send only NBD_OPT_EXPORT_NAME, and gets no option replies.
    let fixed = client_flags & u32::from(FLAG_FIXED_NEWSTYLE) != 0;
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;

    loop {
        let (option, len) = option_head(s)?;
        // "Option haggling": a plain newstyle client that sends anything but
        // EXPORT_NAME must be disconnected, without a reply.
        if !fixed && option != OPT_EXPORT_NAME {
            return Err(broken("client without fixed-newstyle sent an option other than NBD_OPT_EXPORT_NAME"));
        }
        if len > MAX_OPTION_LEN {
            if option == OPT_EXPORT_NAME {
                // EXPORT_NAME has no option replies: an error would be read
                // as the export's size and flags. The spec leaves only a close.
                return Err(broken("NBD_OPT_EXPORT_NAME name too long"));
            }
            // Skipped, not stored, so that haggling stays in sync without a
            // large allocation; the negotiation deadline bounds the time.
            discard(s, len)?;
            option_reply(s, option, REP_ERR_TOO_BIG, &[])?;
            continue;
        }
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match option {
            OPT_EXPORT_NAME => {
                let mut tail = [0u8; 10 + 124];
                tail[0..8].copy_from_slice(&export.size.to_be_bytes());
                tail[8..10].copy_from_slice(&export.flags.to_be_bytes());
                s.write_all(if no_zeroes { &tail[..10] } else { &tail })?;
                return Ok(Negotiated::Transmission);
            }
            OPT_INFO | OPT_GO => {
                if !info_request_is_valid(&data) {
                    option_reply(s, option, REP_ERR_INVALID, &[])?;
                    continue;
                }
                send_info(s, option, export)?;
                if option == OPT_GO {
                    return Ok(Negotiated::Transmission);
                }
            }
            OPT_LIST if data.is_empty() => {
                // One export, with the empty (default) name.
                option_reply(s, option, REP_SERVER, &0u32.to_be_bytes())?;
                option_reply(s, option, REP_ACK, &[])?;
            }
            OPT_LIST => option_reply(s, option, REP_ERR_INVALID, &[])?,
            OPT_ABORT => {
                // The client may already have gone; a failed ACK is no error.
                let _ = option_reply(s, option, REP_ACK, &[]);
                return Ok(Negotiated::Aborted);
            }
            _ => option_reply(s, option, REP_ERR_UNSUP, &[])?,
        }
    }
}

/// Turns a client away in the handshake, so that it learns `why`: the
/// greeting, then `why` in an error reply (`NBD_REP_ERR_POLICY`) to each of
/// its first options, until it aborts or asks what has no error reply
/// (plain newstyle, `NBD_OPT_EXPORT_NAME`), which only a close answers.
pub fn refuse<S: Read + Write>(s: &mut S, why: &str) -> io::Result<()> {
    const OPTIONS: usize = 8;
    let fixed = greet(s)? & u32::from(FLAG_FIXED_NEWSTYLE) != 0;
    for _ in 0..OPTIONS {
        let (option, len) = option_head(s)?;
        if !fixed || option == OPT_EXPORT_NAME || len > MAX_OPTION_LEN {
            break;
        }
        discard(s, len)?;
        if option == OPT_ABORT {
            let _ = option_reply(s, option, REP_ACK, &[]);
            break;
        }
        option_reply(s, option, REP_ERR_POLICY, why.as_bytes())?;
    }
    Ok(())
}

/// Sends the greeting and returns the client's flags.
fn greet<S: Read + Write>(s: &mut S) -> io::Result<u32> {
    let mut hello = [0u8; 18];
    hello[0..8].copy_from_slice(&NBDMAGIC.to_be_bytes());
    hello[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    hello[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    s.write_all(&hello)?;
    let mut word = [0u8; 4];
    s.read_exact(&mut word)?;
    let client_flags = u32::from_be_bytes(word);
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(broken("client sent unknown handshake flags"));
    }
    Ok(client_flags)
}

/// An option's code and data length.
fn option_head<S: Read>(s: &mut S) -> io::Result<(u32, u32)> {
    let mut head = [0u8; 16];
    s.read_exact(&mut head)?;
    if u64::from_be_bytes(head[0..8].try_into().unwrap_or_default()) != IHAVEOPT {
        return Err(broken("bad option magic"));
    }
    Ok((be32(&head[8..12]), be32(&head[12..16])))
}

/// Reads and drops `len` bytes of option data, a page at a time.
fn discard<S: Read>(s: &mut S, len: u32) -> io::Result<()> {
    let mut page = [0u8; 4096];
    let mut left = len as usize;
    while left > 0 {
        let n = left.min(page.len());
        s.read_exact(&mut page[..n])?;
        left -= n;
    }
    Ok(())
}

/// `NBD_OPT_INFO`/`GO` data: name length, name, request count, requests.
/// Any export name is accepted: there is exactly one export.
fn info_request_is_valid(data: &[u8]) -> bool {
    if data.len() < 6 {
        return false;
    }
    let name_len = be32(&data[0..4]) as usize;
    let Some(rest) = data.len().checked_sub(4 + name_len) else {
        return false;
    };
    if rest < 2 {
        return false;
    }
    let at = 4 + name_len;
    let requests = u16::from_be_bytes([data[at], data[at + 1]]) as usize;
    rest == 2 + 2 * requests
}

fn send_info<S: Write>(s: &mut S, option: u32, export: &Export) -> io::Result<()> {
    let mut info = [0u8; 12];
    info[0..2].copy_from_slice(&INFO_EXPORT.to_be_bytes());
    info[2..10].copy_from_slice(&export.size.to_be_bytes());
    info[10..12].copy_from_slice(&export.flags.to_be_bytes());
    option_reply(s, option, REP_INFO, &info)?;
    // Sent unasked too: the spec allows it, and min 1 says any alignment works.
    let mut sizes = [0u8; 14];
    sizes[0..2].copy_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    sizes[2..6].copy_from_slice(&1u32.to_be_bytes());
    sizes[6..10].copy_from_slice(&PREFERRED_BLOCK.to_be_bytes());
    sizes[10..14].copy_from_slice(&MAX_PAYLOAD.to_be_bytes());
    option_reply(s, option, REP_INFO, &sizes)?;
    option_reply(s, option, REP_ACK, &[])
}

fn option_reply<S: Write>(s: &mut S, option: u32, kind: u32, data: &[u8]) -> io::Result<()> {
    let mut head = [0u8; 20];
    head[0..8].copy_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    head[8..12].copy_from_slice(&option.to_be_bytes());
    head[12..16].copy_from_slice(&kind.to_be_bytes());
    head[16..20].copy_from_slice(&(data.len() as u32).to_be_bytes());
    s.write_all(&head)?;
    s.write_all(data)?;
    s.flush()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A scripted client: what it sends, and what the server wrote back.
    struct Duplex {
        input: Cursor<Vec<u8>>,
        output: Vec<u8>,
    }
    impl Read for Duplex {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Duplex {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.output.write(buf)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn option(code: u32, data: &[u8]) -> Vec<u8> {
        let mut v = IHAVEOPT.to_be_bytes().to_vec();
        v.extend(code.to_be_bytes());
        v.extend((data.len() as u32).to_be_bytes());
        v.extend(data);
        v
    }

    fn run(client_flags: u32, options: &[Vec<u8>]) -> (io::Result<Negotiated>, Vec<u8>) {
        let mut input = client_flags.to_be_bytes().to_vec();
        options.iter().for_each(|o| input.extend(o));
        let mut d = Duplex { input: Cursor::new(input), output: Vec::new() };
        let r = handshake(&mut d, &Export::new(1 << 20));
        (r, d.output)
    }

    /// Splits the server's option replies into (option, type, data).
    fn replies(out: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        let mut at = 18;
        while at + 20 <= out.len() {
            assert_eq!(&out[at..at + 8], &OPTION_REPLY_MAGIC.to_be_bytes());
            let len = be32(&out[at + 16..at + 20]) as usize;
            v.push((be32(&out[at + 8..]), be32(&out[at + 12..]), out[at + 20..at + 20 + len].to_vec()));
            at += 20 + len;
        }
        v
    }

    /// A client turned away hears why in answer to each option, until it
    /// aborts; one that cannot hear it (plain newstyle, EXPORT_NAME) gets
    /// the greeting and a close.
    #[test]
    fn a_refused_client_is_told_why_until_it_aborts() {
        let refuse_with = |flags: u32, options: &[Vec<u8>]| {
            let mut input = flags.to_be_bytes().to_vec();
            options.iter().for_each(|o| input.extend(o));
            let mut d = Duplex { input: Cursor::new(input), output: Vec::new() };
            refuse(&mut d, "all busy").map(|()| replies(&d.output))
        };
        let go = [0, 0, 0, 0, 0, 0];
        let told = refuse_with(3, &[option(OPT_LIST, &[]), option(OPT_GO, &go), option(OPT_ABORT, &[]), option(OPT_GO, &go)]).unwrap();
        let policy = (REP_ERR_POLICY, b"all busy".to_vec());
        assert_eq!(told, [(OPT_LIST, policy.0, policy.1.clone()), (OPT_GO, policy.0, policy.1), (OPT_ABORT, REP_ACK, vec![])]);
        assert_eq!(refuse_with(3, &[option(OPT_EXPORT_NAME, &[])]).unwrap(), []);
        assert_eq!(refuse_with(0, &[option(OPT_GO, &go)]).unwrap(), []);
        assert!(refuse_with(3, &[option(OPT_GO, &go)]).is_err(), "a client gone mid-handshake is an error");
    }

    #[test]
    fn greeting_is_fixed_newstyle_without_zeroes() {
        let (_, out) = run(3, &[]);
        assert_eq!(&out[0..8], b"NBDMAGIC");
        assert_eq!(&out[8..16], b"IHAVEOPT");
        assert_eq!(&out[16..18], &[0, 3]);
    }

    #[test]
    fn go_sends_export_and_block_size_then_ack() {
        let go = [0, 0, 0, 0, 0, 0];
        let (r, out) = run(3, &[option(OPT_GO, &go)]);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        let reps = replies(&out);
        assert_eq!(reps.len(), 3);
        assert_eq!(reps[0].1, REP_INFO);
        assert_eq!(&reps[0].2[2..10], &(1u64 << 20).to_be_bytes());
        assert_eq!(&reps[1].2[0..2], &INFO_BLOCK_SIZE.to_be_bytes());
        assert_eq!(reps[2].1, REP_ACK);
    }

    #[test]
    fn unknown_and_malformed_options_get_errors_and_negotiation_goes_on() {
        let bad_go = [0, 0, 0, 9, 1];
        let opts = [option(8, &[]), option(OPT_INFO, &bad_go), option(OPT_LIST, &[]), option(OPT_ABORT, &[])];
        let (r, out) = run(1, &opts);
        assert_eq!(r.unwrap(), Negotiated::Aborted);
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(kinds, [REP_ERR_UNSUP, REP_ERR_INVALID, REP_SERVER, REP_ACK, REP_ACK]);
    }

    #[test]
    fn export_name_without_no_zeroes_pads_124_bytes() {
        let (r, out) = run(1, &[option(OPT_EXPORT_NAME, b"any")]);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        assert_eq!(out.len(), 18 + 8 + 2 + 124);
    }

    /// Plain newstyle (no FIXED_NEWSTYLE), as nbd-server, nbdkit and
    /// qemu-nbd serve it: EXPORT_NAME works; anything else closes, since
    /// such a client reads no option replies.
    #[test]
    fn plain_newstyle_client_gets_export_name_and_nothing_else() {
        let (r, out) = run(0, &[option(OPT_EXPORT_NAME, b"")]);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        assert_eq!(out.len(), 18 + 8 + 2 + 124);
        let (r, out) = run(u32::from(FLAG_NO_ZEROES), &[option(OPT_EXPORT_NAME, b"")]);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        assert_eq!(out.len(), 18 + 8 + 2);
        for opt in [OPT_GO, OPT_LIST, OPT_ABORT] {
            let (r, out) = run(0, &[option(opt, &[0, 0, 0, 0, 0, 0])]);
            assert!(r.is_err(), "option {opt} from a plain newstyle client");
            assert_eq!(out.len(), 18, "no reply after the greeting for option {opt}");
        }
    }

    /// The reply to EXPORT_NAME is the export's size: an option reply there
    /// would be read as a size of 0x3e889045565a9.
    #[test]
    fn over_long_export_name_closes_without_a_reply() {
        let mut huge = IHAVEOPT.to_be_bytes().to_vec();
        huge.extend(OPT_EXPORT_NAME.to_be_bytes());
        huge.extend((MAX_OPTION_LEN + 1).to_be_bytes());
        huge.extend(vec![b'x'; MAX_OPTION_LEN as usize + 1]);
        for flags in [0, 3] {
            let (r, out) = run(flags, &[huge.clone()]);
            assert!(r.is_err());
            assert_eq!(out.len(), 18, "nothing after the greeting (client flags {flags})");
        }
    }

    #[test]
    fn over_long_option_is_skipped_and_refused_then_go_works() {
        let long = option(OPT_GO, &vec![0; MAX_OPTION_LEN as usize + 1]);
        let (r, out) = run(3, &[long, option(OPT_GO, &[0, 0, 0, 0, 0, 0])]);
        assert_eq!(r.unwrap(), Negotiated::Transmission);
        let kinds: Vec<u32> = replies(&out).iter().map(|r| r.1).collect();
        assert_eq!(kinds, [REP_ERR_TOO_BIG, REP_INFO, REP_INFO, REP_ACK]);
    }

    #[test]
    fn bad_flags_magic_and_truncated_options_close() {
        assert!(run(4, &[]).0.is_err());
        let mut bad = option(OPT_GO, &[]);
        bad[0] ^= 1;
        assert!(run(1, &[bad]).0.is_err());
        // Announced, never sent: the stream ends while it is skipped.
        let mut huge = IHAVEOPT.to_be_bytes().to_vec();
        huge.extend(OPT_GO.to_be_bytes());
        huge.extend(u32::MAX.to_be_bytes());
        assert!(run(1, &[huge]).0.is_err());
        assert!(run(1, &[option(OPT_GO, &[0, 0])]).0.is_err(), "EOF mid-negotiation");
    }

    #[test]
    fn request_round_trips_and_bad_magic_is_rejected() {
        let r = Request { flags: CMD_FLAG_FUA, command: 1, cookie: *b"cookie!!", offset: 1 << 40, len: 4096 };
        let mut b = r.encode();
        assert_eq!(Request::parse(&b), Some(r));
        b[0] = 0;
        assert_eq!(Request::parse(&b), None);
        let rep = reply(22, *b"cookie!!");
        assert_eq!(&rep[0..4], &[0x67, 0x44, 0x66, 0x98]);
        assert_eq!(&rep[4..8], &[0, 0, 0, 22]);
    }
}
