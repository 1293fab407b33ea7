//! Two connections to one VRAM store, against the fake driver
//! (tests/fake_cuda) loaded into this process: it runs each stream's
//! copies as late as it may, the mailbox kernel's jobs on threads of their
//! own, and fails a job that would race with copies still pending.
//!
//! Every read and write goes to or from the staging of `two_connections`,
//! which outlives the stores, and no test changes a buffer a write still
//! copies from, or looks at one a read still copies into, before the wait
//! or sync that covers the copy: the promise `Store::read` and `write` ask
//! for (each `SAFETY: staging` below).

use std::time::{Duration, Instant};

use super::{VramBacking, VramStore};
use crate::cuda::fake_tests::{alone, fake_context, knob_given};
use crate::store::{Backing, Done, Store};
use crate::tuning::Tuning;

const BLOCK: usize = 4096;
const ROUNDS: usize = 40;

/// With `serves`, lone 4 KiB reads of block 0, each waited for, until the
/// mailbox kernel of `store` serves them; else it is parked. Bounded in
/// time, not in reads: on a loaded machine the fake's thread that runs the
/// kernel may wait long for a CPU.
fn kernel(store: &mut VramStore, buf: &mut [u8], serves: bool) -> Result<(), String> {
    if !serves {
        store.idle();
        return Ok(());
    }
    let until = Instant::now() + Duration::from_secs(20);
    while Instant::now() < until {
        if store.copier.kernel_serves() {
            return Ok(());
        }
        // SAFETY: staging.
        unsafe { store.read(0, &mut buf[..BLOCK]) }.map_err(|e| format!("a read: {e}"))?;
        let token = store.fence().map_err(|e| format!("a fence: {e}"))?;
        store.wait(token).map_err(|e| format!("a read's wait: {e}"))?;
    }
    Err("the mailbox kernel never served".into())
}

/// Writes `writes` pieces of `len` bytes on `a`, letting each be answered
/// (a fence), reads the first 4 KiB back on `b` and checks them, round
/// after round; `a_kernel` and `b_kernel` say whose mailbox kernel serves
/// meanwhile (it takes lone copies of up to 64 KiB).
fn written_on_one_read_on_the_other(a_kernel: bool, b_kernel: bool, len: usize, writes: usize) {
    two_connections(len, |a, sa, b, sb| {
        for round in 0..ROUNDS {
            kernel(a, sa, a_kernel)?;
            kernel(b, sb, b_kernel)?;
            let at = ((1 + round * writes) * len) as u64;
            let stamp = round as u8 + 1;
            sa.fill(stamp);
            // Writes answered in turn, the first read back: a later
            // publication must not hide an earlier one.
            for piece in 0..writes {
                let to = at + (piece * len) as u64;
                // SAFETY: staging.
                let done = unsafe { a.write(to, sa) }.map_err(|e| format!("round {round}: a write: {e}"))?;
                if done != Done::Queued {
                    return Err(format!("round {round}: a write to VRAM answered {done:?}"));
                }
                a.fence().map_err(|e| format!("round {round}: the fence a write's answer waits for: {e}"))?;
            }
            // SAFETY: staging.
            unsafe { b.read(at, sb) }.map_err(|e| format!("round {round}: the read: {e}"))?;
            let token = b.fence().map_err(|e| format!("round {round}: the read's fence: {e}"))?;
            b.wait(token).map_err(|e| format!("round {round}: the read's wait: {e}"))?;
            if sb.iter().any(|&x| x != stamp) {
                return Err(format!("round {round}: the read on the other connection saw {}, not {stamp}", sb[0]));
            }
            a.sync().map_err(|e| format!("round {round}: a sync, before the writes' staging is used again: {e}"))?;
        }
        Ok(())
    });
}

/// Two stores of one backing for two connections, on this thread, with
/// staging of `len` and 4 KiB; `rounds` runs on them and says what failed,
/// rather than panic: unwinding would free the staging before the stores.
fn two_connections(len: usize, rounds: impl FnOnce(&mut VramStore, &mut [u8], &mut VramStore, &mut [u8]) -> Result<(), String>) {
    let _turn = crate::cuda::gate::serial();
    let ctx = fake_context();
    let tuning = Tuning { watch_neighbours: false, ..Tuning::default() };
    let alone = crate::store::neighbours::Seen::default();
    let Ok(backing) = VramBacking::allocate(&ctx, &alone, 16 << 20, 0, 16 << 20, 2, &tuning) else { panic!("16 MiB on the fake") };
    let (mut a, mut b) = (backing.open().expect("a"), backing.open().expect("b"));
    let (mut sa, mut sb) = (a.staging(len).expect("staging"), b.staging(BLOCK).expect("staging"));
    let outcome = rounds(&mut a, &mut sa, &mut b, &mut sb);
    // One thread holds both: each kernel is parked before either store
    // goes (a store's end waits for every kernel to be parked), and the
    // stores go before their staging.
    a.idle();
    b.idle();
    drop((a, b));
    if let Err(e) = outcome {
        panic!("{e}");
    }
}

/// A write answered on one connection, then one to the same block on
/// another: the second lands last, whichever stream the fake runs first.
#[test]
fn a_later_write_on_another_connection_lands_last() {
    two_connections(BLOCK, |a, sa, b, sb| {
        for round in 0..ROUNDS as u8 {
            let at = (1 + u64::from(round)) * BLOCK as u64;
            sa.fill(2 * round + 1);
            sb.fill(2 * round + 2);
            // SAFETY: staging.
            unsafe { a.write(at, sa) }.map_err(|e| format!("round {round}: the first write: {e}"))?;
            a.fence().map_err(|e| format!("round {round}: its fence: {e}"))?;
            // SAFETY: staging.
            unsafe { b.write(at, sb) }.map_err(|e| format!("round {round}: the second write: {e}"))?;
            b.fence().map_err(|e| format!("round {round}: its fence: {e}"))?;
            b.sync().map_err(|e| format!("round {round}: {e}"))?;
            a.sync().map_err(|e| format!("round {round}: {e}"))?;
            // SAFETY: staging.
            unsafe { a.read(at, sa) }.map_err(|e| format!("round {round}: the read: {e}"))?;
            a.sync().map_err(|e| format!("round {round}: the read's sync: {e}"))?;
            if sa.iter().any(|&x| x != 2 * round + 2) {
                return Err(format!("round {round}: the block holds {}, not the later write's {}", sa[0], 2 * round + 2));
            }
        }
        Ok(())
    });
}

/// Copy-engine writes on one connection (128 KiB: the mailbox kernel
/// takes none), answered before they ran, and reads on another by the
/// copy engine: its stream waits for them.
#[test]
fn changes_answered_on_one_connection_are_seen_on_another() {
    written_on_one_read_on_the_other(false, false, 128 << 10, 2);
}

/// The same, read by a mailbox kernel that serves: the read goes the
/// stream's way, behind the writes (the fake fails a job that would race
/// with copies pending).
#[test]
fn changes_answered_on_one_connection_are_seen_by_anothers_mailbox_kernel() {
    written_on_one_read_on_the_other(false, true, 128 << 10, 2);
}

/// A lone write the mailbox kernel took, and a read on another connection
/// by the copy engine: the write is done before it is answered.
#[test]
fn a_change_the_mailbox_kernel_took_is_seen_by_another_connection() {
    written_on_one_read_on_the_other(true, false, BLOCK, 1);
}

/// Both through the mailbox kernels.
#[test]
fn a_change_crosses_between_mailbox_kernels() {
    written_on_one_read_on_the_other(true, true, BLOCK, 1);
}

/// A write payload goes around the CPU caches only while another
/// connection writes too, and not long after it stops; a payload over
/// 256 KiB only with 8 writers; a write seen only after a long gap, of
/// unknown age, does not count.
#[test]
fn payloads_go_around_the_caches_only_while_another_connection_writes() {
    two_connections(BLOCK, |a, _, b, sb| {
        let (small, large) = (128 << 10, 1 << 20);
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut write_on_b = || {
            b.idle(); // apart: by the copy engine, not a mailbox kernel started
            // SAFETY: staging.
            unsafe { b.write(0, sb) }.map_err(|e| format!("a write: {e}"))?;
            b.fence().map(|_| ()).map_err(|e| format!("its fence: {e}"))
        };
        if a.copier.uncached(small, || at(0)) {
            return Err("around the caches with no other connection writing".into());
        }
        write_on_b()?;
        if !a.copier.uncached(small, || at(1)) {
            return Err("through the caches while another connection writes".into());
        }
        if a.copier.uncached(large, || at(2)) {
            return Err("1 MiB around the caches with 2 writers".into());
        }
        if a.copier.uncached(small, || at(13)) {
            return Err("another connection still counted as writing 12 ms after it last did".into());
        }
        write_on_b()?;
        if a.copier.uncached(small, || at(40)) {
            return Err("a write first seen 27 ms after the last look counted as current".into());
        }
        write_on_b()?;
        if !a.copier.uncached(small, || at(41)) {
            return Err("through the caches while another connection writes again".into());
        }
        if b.copier.uncached(small, || at(41)) || b.copier.uncached(small, || at(42)) {
            return Err("a connection's own writes counted as another's".into());
        }
        Ok(())
    });
}

/// A write the mailbox kernel did not take in time may still land late,
/// over writes answered on other connections that no stream orders it
/// with: the fence that finds it says the store is lost.
#[test]
fn a_write_the_kernel_missed_loses_the_store() {
    for name in ["late_write_alone", "late_write_then_a_read"] {
        alone(&format!("store::vram::lanes_tests::{name}"), &[("FAKE_CUDA_MAILBOX_STALL", "1")]);
    }
}

/// The write's job is waited for by the fence, or before (when the read
/// after it is posted): either way the fence says the store is lost.
fn late_write(read_after: bool) {
    if !knob_given("FAKE_CUDA_MAILBOX_STALL") {
        return;
    }
    two_connections(BLOCK, |a, sa, _, other| {
        kernel(a, sa, true)?;
        sa.fill(1);
        // SAFETY: staging.
        unsafe { a.write(0, sa) }.map_err(|e| format!("the write: {e}"))?;
        if read_after {
            // SAFETY: staging.
            unsafe { a.read(5 * BLOCK as u64, other) }.map_err(|e| format!("the read: {e}"))?;
        }
        match a.fence() {
            Err(crate::store::Unfenced::Lost) => Ok(()),
            other => Err(format!("the fence after a job the kernel missed: {other:?}")),
        }
    });
}

#[test]
#[ignore = "run by a_write_the_kernel_missed_loses_the_store"]
fn late_write_alone() {
    late_write(false);
}

#[test]
#[ignore = "run by a_write_the_kernel_missed_loses_the_store"]
fn late_write_then_a_read() {
    late_write(true);
}

/// A write handed over in a group whose later batch could not start is
/// answered EIO, but its copy runs all the same: it is published, so that
/// a later write of its block on another connection lands after it.
#[test]
fn a_write_in_a_group_that_failed_is_published() {
    // Copies: 1 the store's clearing, 2 the write, 3 the read after it.
    alone("store::vram::lanes_tests::write_before_a_copy_that_fails", &[("FAKE_CUDA_FAIL_COPY", "3")]);
}

#[test]
#[ignore = "run by a_write_in_a_group_that_failed_is_published"]
fn write_before_a_copy_that_fails() {
    if !knob_given("FAKE_CUDA_FAIL_COPY") {
        return;
    }
    two_connections(2 * BLOCK, |a, sa, b, sb| {
        a.idle();
        b.idle();
        let at = BLOCK as u64;
        let (sa, other) = sa.split_at_mut(BLOCK);
        sa.fill(1);
        // SAFETY: staging.
        unsafe { a.write(at, sa) }.map_err(|e| format!("the write: {e}"))?;
        // Not a multiple of 16 bytes: the copy engine's, not the mailbox
        // kernel's. The change of direction issues the write first.
        // SAFETY: staging.
        unsafe { a.read(5 * at, &mut other[..4004]) }.map_err(|e| format!("the read: {e}"))?;
        if a.fence() != Err(crate::store::Unfenced::NotStarted) {
            return Err("the read's copy did not fail its group".into());
        }
        sb.fill(2);
        // SAFETY: staging.
        unsafe { b.write(at, sb) }.map_err(|e| format!("the later write: {e}"))?;
        b.fence().map_err(|e| format!("its fence: {e}"))?;
        b.sync().map_err(|e| format!("its sync: {e}"))?;
        let _ = a.sync();
        // SAFETY: staging.
        unsafe { b.read(at, sb) }.map_err(|e| format!("the read back: {e}"))?;
        let token = b.fence().map_err(|e| format!("its fence: {e}"))?;
        b.wait(token).map_err(|e| format!("its wait: {e}"))?;
        match sb[0] {
            2 => Ok(()),
            x => Err(format!("the block holds {x}: the write answered EIO landed after the later one")),
        }
    });
}
