//! `nbd-vram bench --verify`: writes the whole export with data derived
//! from each word's offset, in a scrambled order (every other chunk as
//! 128 KiB requests, the size swap writes), then reads it all back in
//! another order and compares every byte. Then lone 4 KiB reads, one at
//! a time as swap-ins come (the VRAM store's mailbox path), some right
//! after a write of new data to the same block, read back both ways. A
//! correctness check over the full range (every chunk of a VRAM store),
//! not a benchmark. Over several connections, requests still go one at a
//! time, and each read goes on another connection than the write it
//! checks: a write answered on one must be seen on every other at once.

use std::io::{Read, Write};
use std::time::Instant;

use super::client::{self, Conn, Shown};
use super::engine::request;
use crate::cli::Addr;
use crate::fail::{Code, Failure};
use crate::uapi as sys;
use crate::nbd::proto::REPLY_LEN;

const CHUNK: u64 = 4 << 20;
/// Every other chunk is written as requests of this size, each on the
/// next connection: with several, a VRAM store lands them in staging
/// around the CPU caches (`uncached`).
const PIECE: usize = 128 << 10;
/// Lone 4 KiB reads of the last pass (every fourth block rewritten first).
const LONE: u64 = 16384;

/// The word stored at byte `offset` (splitmix64 of it and the seed).
fn word(seed: u64, offset: u64) -> u64 {
    let mut z = (offset ^ seed).wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn fill(buf: &mut [u8], seed: u64, offset: u64) {
    for (i, w) in buf.chunks_exact_mut(8).enumerate() {
        w.copy_from_slice(&word(seed, offset + 8 * i as u64).to_le_bytes());
    }
}

/// Chunk `i` of `n` in a scrambled order: a stride coprime with `n` visits
/// every chunk once, far from its neighbours.
fn scrambled(i: u64, n: u64, stride: u64) -> u64 {
    (i.wrapping_mul(stride)) % n
}

fn coprime_stride(n: u64, near: u64) -> u64 {
    let gcd = |mut a: u64, mut b: u64| {
        while b != 0 {
            (a, b) = (b, a % b);
        }
        a
    };
    (near..).find(|&s| gcd(s, n) == 1).unwrap_or(1)
}

pub fn run(connect: &Addr, connections: usize, seed: u64) -> Result<(), Failure> {
    let at = Shown(connect);
    let fail = |what: String| Failure::new(Code::Other, format!("{at}: verify: {what}"));
    let open = |i: usize| {
        let mut conn = Conn::connect(connect)?;
        let export = client::handshake(&mut conn).map_err(|e| fail(format!("handshake of connection {i}: {e}")))?;
        Ok::<_, Failure>((conn, export))
    };
    let (first, export) = open(0)?;
    if connections > 1 && export.flags & sys::NBD_FLAG_CAN_MULTI_CONN as u16 == 0 {
        // Without it, what one connection answered need not show on another.
        return Err(fail("the server does not say CAN_MULTI_CONN: check it over one connection".into()));
    }
    let mut conns = vec![first];
    for i in 1..connections {
        conns.push(open(i)?.0);
    }
    if export.size == 0 {
        return Err(fail("the export is empty".into()));
    }
    let chunk = CHUNK.min(u64::from(export.max_block)).max(4096);
    if export.size % chunk != 0 {
        return Err(fail(format!("export size {} is not a multiple of {chunk}", export.size)));
    }
    let n = export.size / chunk;
    let mut want = vec![0u8; chunk as usize];
    let mut got = vec![0u8; chunk as usize];
    for (pass, stride) in [("write", coprime_stride(n, n / 3 + 1)), ("read", coprime_stride(n, n / 5 + 7))] {
        let start = Instant::now();
        for i in 0..n {
            let offset = scrambled(i, n, stride) * chunk;
            fill(&mut want, seed, offset);
            let turn = offset / chunk + u64::from(pass == "read");
            if pass == "write" && i % 2 == 1 {
                // Never on the connection the chunk is read back on (`turn + 1`).
                let others = conns.len() as u64 - 1;
                for (p, piece) in (0..).zip(want.chunks(PIECE)) {
                    let k = if others > 0 { turn + 2 + p % others } else { turn };
                    exchange(on(&mut conns, k), true, i, offset + p * PIECE as u64, piece, &mut got).map_err(fail)?;
                }
                continue;
            }
            exchange(on(&mut conns, turn), pass == "write", i, offset, &want, &mut got).map_err(fail)?;
        }
        let secs = start.elapsed().as_secs_f64();
        println!("verify: {pass} {} MiB in {secs:.1} s ({:.0} MB/s)", export.size >> 20, export.size as f64 / secs / 1e6);
    }
    let blocks = export.size / 4096;
    let stride = coprime_stride(blocks, blocks / 7 + 3);
    let (want, got) = (&mut want[..4096], &mut got[..4096]);
    let start = Instant::now();
    let lone = LONE.min(blocks);
    for i in 0..lone {
        let offset = scrambled(i, blocks, stride) * 4096;
        fill(want, seed, offset);
        exchange(on(&mut conns, i), false, 4 * i, offset, want, got).map_err(fail)?;
        if i % 4 == 0 {
            fill(want, !seed, offset);
            exchange(on(&mut conns, i + 1), true, 4 * i + 1, offset, want, got).map_err(fail)?;
            exchange(on(&mut conns, i + 2), false, 4 * i + 2, offset, want, got).map_err(fail)?;
            // Not 16-byte aligned, so not the mailbox kernel's: what it
            // wrote must be there for the copy engine too. Only where the
            // server takes requests of any size and place.
            if export.min_block == 1 {
                exchange(on(&mut conns, i + 3), false, 4 * i + 3, offset + 8, &want[8..4088], &mut got[8..4088]).map_err(fail)?;
            }
        }
    }
    println!("verify: {lone} lone 4 KiB reads in {:.2} s, a quarter of them after a write", start.elapsed().as_secs_f64());
    let over = if connections > 1 { format!(" over {connections} connections, each read on another than its write") } else { String::new() };
    println!("verify: PASS, {} MiB written and read back intact{over}", export.size >> 20);
    Ok(())
}

/// The connection of turn `k`: a read the turn after its write goes on
/// the next one.
fn on(conns: &mut [Conn], k: u64) -> &mut Conn {
    let n = conns.len() as u64;
    &mut conns[(k % n) as usize]
}

/// One request, answered before the next: a write of `want`, or a read
/// compared with it (`got` the same length, for the data).
fn exchange<C: Read + Write>(conn: &mut C, write: bool, cookie: u64, offset: u64, want: &[u8], got: &mut [u8]) -> Result<(), String> {
    let what = if write { "write" } else { "read" };
    let head = request(write, cookie as usize, offset, want.len() as u32);
    conn.write_all(&head).and_then(|()| if write { conn.write_all(want) } else { Ok(()) }).map_err(|e| format!("sending: {e}"))?;
    let mut reply = [0u8; REPLY_LEN];
    conn.read_exact(&mut reply).map_err(|e| format!("reply: {e}"))?;
    let error = u32::from_be_bytes([reply[4], reply[5], reply[6], reply[7]]);
    if reply[0..4] != sys::NBD_REPLY_MAGIC.to_be_bytes() || reply[8..16] != cookie.to_be_bytes() {
        return Err(format!("bad reply to the {what} at offset {offset}"));
    }
    if error != 0 {
        return Err(format!("{what} at offset {offset} answered error {error}"));
    }
    if !write {
        conn.read_exact(got).map_err(|e| format!("read data: {e}"))?;
        if let Some(at) = got.iter().zip(want).position(|(a, b)| a != b) {
            return Err(format!("data differs at byte {}", offset + at as u64));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrambled_order_visits_every_chunk_once() {
        for n in [1u64, 2, 7, 64, 4096] {
            let stride = coprime_stride(n, n / 3 + 1);
            let mut seen: Vec<u64> = (0..n).map(|i| scrambled(i, n, stride)).collect();
            seen.sort_unstable();
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
        }
    }

    #[test]
    fn data_depends_on_offset_and_seed() {
        assert_ne!(word(1, 0), word(1, 8));
        assert_ne!(word(1, 0), word(2, 0));
    }
}
