//! What only a driver shows, against the fake one (tests/fake_cuda) loaded
//! into this process: it aborts the process where a GPU would hang.

use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::{Context, Cuda};

#[path = "../../tests/fake_cuda_env/compile.rs"]
mod compile;

/// A context on the fake driver (built once and loaded into this
/// process), current on the calling thread.
pub fn fake_context() -> Context {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/tmp/fake-cuda-unit");
    let lib = compile::compile(&dir, "libcuda.c", "libcuda.so.1", &["-shared", "-fPIC", "-O2"]);
    let cuda = Cuda::init(Some(&lib.to_string_lossy())).unwrap_or_else(|e| panic!("loading the fake driver: {e:?}"));
    let ctx = cuda.device(0).and_then(|d| d.context()).expect("a context on the fake");
    ctx.make_current().expect("current");
    ctx
}

/// Runs this binary's ignored test `name` alone, in a process of its own:
/// the fake driver reads `env` when it starts.
pub fn alone(name: &str, env: &[(&str, &str)]) {
    let exe = std::env::current_exe().expect("the test binary");
    let out = std::process::Command::new(exe)
        .args([name, "--exact", "--ignored", "--test-threads=1"])
        .envs(env.iter().copied())
        .output()
        .expect("running the test binary");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && text.contains("1 passed"), "{name} with {env:?}:\n{text}");
}

/// `cuMemFree` waits for every kernel, and holds other threads' calls
/// meanwhile: one made while another thread's mailbox kernel serves would
/// wait for ever, unless that kernel is parked first. The free waits
/// (`gate::alone`) until the serving thread has parked it, which it does
/// at its next job, and the kernel serves again after.
#[test]
fn a_free_waits_until_another_threads_mailbox_kernel_is_parked() {
    let _turn = super::gate::serial();
    let ctx = fake_context();
    let memory = [ctx.alloc(1 << 20).expect("the store's memory")];
    let freed = ctx.alloc(1 << 16).expect("memory to free");
    let serving = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let (parks, jobs_after) = thread::scope(|s| {
        let server = s.spawn(|| {
            ctx.make_current().expect("current");
            let mut mailbox = ctx.mailbox(&memory, 1).expect("the fake runs the mailbox kernel").expect("loaded");
            let stream = ctx.stream().expect("a stream");
            let (mut parks, mut jobs_after) = (0, 0);
            // Bounded, so that a free that does not wait meets a kernel
            // left running, never told to end: the fake aborts.
            let until = Instant::now() + Duration::from_secs(5);
            while Instant::now() < until && jobs_after < 10 {
                if mailbox.holds_up_others() {
                    mailbox.park();
                    parks += 1;
                }
                if !mailbox.ready() {
                    mailbox.start().expect("launched");
                    continue;
                }
                serving.store(true, Ordering::SeqCst);
                let seq = mailbox.post_read(memory[0].ptr, 4096);
                thread::sleep(Duration::from_micros(200));
                mailbox.wait(seq).expect("a job done");
                // The loop's other driver calls, between jobs: behind a
                // free that waits for this kernel, one would wait for ever.
                stream.is_done().expect("a stream query");
                jobs_after += usize::from(done.load(Ordering::SeqCst));
            }
            (parks, jobs_after)
        });
        let start = Instant::now();
        while !serving.load(Ordering::SeqCst) && !server.is_finished() {
            assert!(start.elapsed() < Duration::from_secs(30), "the mailbox kernel did not start");
            thread::sleep(Duration::from_millis(1));
        }
        drop(freed);
        done.store(true, Ordering::SeqCst);
        server.join().expect("the serving thread")
    });
    assert!(parks >= 1, "the free did not wait for the kernel to be parked");
    assert_eq!(jobs_after, 10, "the kernel did not serve again after the free");
}

/// The copy kernel reaches host memory only through the GPU's mapping of
/// pinned memory: a piece on ordinary memory faults when the kernel runs,
/// and the context is lost from then on, as on a GPU.
#[test]
fn the_copy_kernel_faults_on_host_memory_that_is_not_pinned() {
    let _turn = super::gate::serial();
    let ctx = fake_context();
    let memory = ctx.alloc(1 << 20).expect("device memory");
    let pinned = ctx.pinned(4096).expect("pinned memory");
    let plain = vec![0u128; 256]; // 4 KiB on 16-byte boundaries, as the kernel needs
    let stream = ctx.stream().expect("a stream");
    let mover = ctx.mover().expect("a copy kernel on the fake").expect("loaded");
    let mut batch = super::CopyBatch::with_capacity(1);
    batch.push(memory.ptr, pinned.as_ptr() as u64, 4096, memory.ptr);
    stream.launch(&mover, &batch).expect("launched");
    stream.sync().expect("a piece on pinned memory copied");
    batch.clear();
    batch.push(memory.ptr + 4096, plain.as_ptr() as u64, 4096, memory.ptr);
    stream.launch(&mover, &batch).expect("launched: the fault shows when it runs");
    assert!(stream.sync().is_err(), "a piece on ordinary memory copied");
    assert!(stream.sync().is_err(), "the context works again after a fault");
}

/// Whether `knob` is set, as `alone` sets it; an ignored test run by hand
/// (`cargo test -- --ignored`) without it says so and does nothing.
pub fn knob_given(knob: &str) -> bool {
    let given = std::env::var_os(knob).is_some();
    if !given {
        eprintln!("needs {knob}: the test that runs this one alone sets it");
    }
    given
}

/// A kernel launched again is not taken for running on the word the one
/// before left: after 256 jobs between their launches the sequence has
/// wrapped, and that word equals the new kernel's.
#[test]
fn a_relaunched_kernel_is_not_ready_before_it_runs() {
    alone("cuda::fake_tests::relaunched_after_256_jobs", &[("FAKE_CUDA_LATE_START", "1")]);
}

#[test]
#[ignore = "run by a_relaunched_kernel_is_not_ready_before_it_runs"]
fn relaunched_after_256_jobs() {
    if !knob_given("FAKE_CUDA_LATE_START") {
        return;
    }
    let _turn = super::gate::serial();
    let ctx = fake_context();
    let memory = [ctx.alloc(1 << 20).expect("the store's memory")];
    let mut mailbox = ctx.mailbox(&memory, 1).expect("the fake runs the mailbox kernel").expect("loaded");
    let until = Instant::now() + Duration::from_secs(10);
    mailbox.start().expect("launched");
    // Started late: once its stream is asked about.
    while !mailbox.ready() {
        assert!(Instant::now() < until, "the first kernel never ran");
        mailbox.stream_is_done().expect("a stream query");
    }
    for _ in 0..255 {
        let seq = mailbox.post_read(memory[0].ptr, 4096);
        mailbox.wait(seq).expect("a job done");
    }
    mailbox.park(); // the 256th
    while !mailbox.stream_is_done().expect("a stream query") {
        assert!(Instant::now() < until, "the first kernel never ended");
        thread::sleep(Duration::from_millis(1));
    }
    mailbox.start().expect("launched again");
    assert!(!mailbox.ready(), "a kernel not yet running was taken for running");
    while !mailbox.ready() {
        assert!(Instant::now() < until, "the second kernel never ran");
        mailbox.stream_is_done().expect("a stream query");
    }
    let seq = mailbox.post_read(memory[0].ptr, 4096);
    mailbox.wait(seq).expect("a job done by the second kernel");
    mailbox.park();
}
