//! nbd-vram: parse, dispatch, map errors to exit codes. Nothing else.

mod cli;
mod cuda;
mod daemon;
mod fail;
mod gpu;
mod listen;
mod log;
mod nbd;
mod notify;
mod pressure;
mod signals;
mod sock;
mod stats;
mod stop;
mod store;
mod swap;

use std::process::ExitCode;

use cli::Command;
use fail::{Code, Failure};

fn main() -> ExitCode {
    let parsed = match cli::parse(std::env::args().skip(1)) {
        Ok(p) => p,
        Err(msg) => {
            eprintln!("nbd-vram: {msg}");
            return ExitCode::from(Code::Usage as u8);
        }
    };
    log::init(parsed.log_level);
    match run(parsed.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            error!("{f}");
            ExitCode::from(f.code as u8)
        }
    }
}

fn run(command: Command) -> Result<(), Failure> {
    match command {
        Command::Help => print!("{}", cli::HELP),
        Command::Version => println!("nbd-vram {}", env!("CARGO_PKG_VERSION")),
        Command::Serve { store, listen } => store::with_store(&store, listen::Serve(&listen))?,
        Command::Swap(opts) => store::with_store(&opts.store, daemon::Daemon(&opts))?,
        Command::Gpus { libcuda } => gpu::list(libcuda.as_deref())?,
        Command::Stop { device } => stop::stop(&device)?,
        _ => return Err(Failure::new(Code::Other, "not implemented yet")),
    }
    Ok(())
}
