//! nbd-vram: block the signals it takes, parse, dispatch, map errors to
//! exit codes. Nothing else.

mod bench;
mod cli;
mod cuda;
mod daemon;
mod desk;
mod dirfd;
mod elastic;
mod fail;
mod gpus;
mod log;
mod nbd;
mod notify;
mod nvml;
mod pressure;
mod reroot;
mod resize;
mod signals;
mod slice;
mod sock;
mod stats;
mod status;
mod serve;
mod stop;
mod store;
mod swap;
mod touch;
mod tuning;
mod uapi;
mod uncached;
mod workers;

use std::process::ExitCode;

use cli::Command;
use fail::{Code, Failure};

fn main() -> ExitCode {
    if let Some(code) = swap::run_child_if_asked() {
        return ExitCode::from(code);
    }
    let parsed = match cli::parse(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("nbd-vram: {msg}");
            return ExitCode::from(Code::Usage as u8);
        }
    };
    // Before any library is loaded or thread started (parsing does
    // neither), so that every thread, the CUDA driver's too, inherits the
    // mask; other commands keep Ctrl-C's default.
    let serves = matches!(parsed.command, Command::Serve { .. } | Command::Swap(_));
    if serves {
        signals::Signals::block();
    } else {
        signals::Signals::block_wake();
    }
    if matches!(parsed.command, Command::Swap(_)) {
        signals::Signals::ignore_job_control();
        signals::Signals::wait_for_children();
    }
    log::init(parsed.log_level);
    if serves {
        log::start_relay(); // a thread, so after the mask
    }
    // Only for what serves or opens a GPU: a bad knob must not stop `stop`.
    let tuned = matches!(parsed.command, Command::Serve { .. } | Command::Swap(_) | Command::Gpus { .. });
    let tuning = match tuned.then(tuning::Tuning::from_env).unwrap_or_else(|| Ok(tuning::Tuning::default())) {
        Ok(t) => t,
        Err(msg) => {
            error!("{msg}");
            log::flush();
            return ExitCode::from(Code::Usage as u8);
        }
    };
    tuning.log();
    let swap = matches!(parsed.command, Command::Swap(_));
    let code = match run(parsed.command, &tuning) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            error!("{f}");
            ExitCode::from(f.code as u8)
        }
    };
    if swap {
        // However it ended, even before it served.
        reroot::forget_marker();
    }
    log::flush(); // what the log thread still holds
    code
}

fn run(command: Command, tuning: &tuning::Tuning) -> Result<(), Failure> {
    match command {
        Command::Help => print!("{}", cli::HELP),
        Command::Version => println!("nbd-vram {}", env!("CARGO_PKG_VERSION")),
        Command::Serve { store, listen, allow_remote, connections } => {
            store::with_store(&store, connections, tuning, serve::Serve { addr: &listen, store: &store, allow_remote, connections, tuning })?
        }
        Command::Swap(opts) => daemon::run(&opts, tuning)?,
        Command::Resize { size, device } => resize::resize(size, device.as_deref())?,
        Command::Gpus { libcuda } => gpus::list(libcuda.as_deref(), tuning)?,
        Command::Stop { device } => stop::stop(&device)?,
        Command::Bench { servers, verify: true, connections, .. } => bench::verify(&servers[0].0, connections, 0x6e62_642d_7672_616d)?,
        Command::Bench { servers, connections, sweep, seconds, svg, .. } => {
            let servers = bench::Servers { list: &servers, connections };
            match (sweep, servers.list.len()) {
                (true, _) => bench::sweep(&servers, seconds, svg.as_deref())?,
                (false, 1) => bench::run(&servers, seconds)?,
                (false, _) => bench::compare(&servers, seconds)?,
            }
        }
        Command::Status { json } => status::show(json)?,
    }
    Ok(())
}
