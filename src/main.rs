//! nbd-vram: parse, dispatch, map errors to exit codes. Nothing else.

mod cli;
mod fail;
mod listen;
mod log;
mod nbd;
mod sock;
mod stats;
mod store;

use std::process::ExitCode;

use cli::{Command, StoreKind, StoreOpts};
use fail::{Code, Failure};
use store::HostStore;

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
        Command::Serve { store, listen } => match store.kind {
            StoreKind::Host => listen::serve(&mut host_store(&store)?, &listen)?,
            StoreKind::Vram => return Err(Failure::new(Code::Cuda, "the VRAM store is not built yet: use --store host")),
        },
        _ => return Err(Failure::new(Code::Other, "not implemented yet")),
    }
    Ok(())
}

fn host_store(opts: &StoreOpts) -> Result<HostStore, Failure> {
    HostStore::new(opts.size).map_err(|e| Failure::os(format!("allocating {} MiB of RAM", opts.size >> 20), e))
}
