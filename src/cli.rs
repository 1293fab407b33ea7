//! Command-line arguments, hand-rolled: `--help` text and validation whose
//! messages say what to type instead.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use crate::store::{check_size, StoreKind, StoreOpts, MIB};

pub const HELP: &str = "\
nbd-vram: idle NVIDIA GPU memory as a Linux swap tier, through /dev/nbdN

USAGE
  nbd-vram [OPTIONS]                 allocate VRAM, attach /dev/nbdN, swapon, serve
  nbd-vram serve --listen ADDR [OPTIONS]
                                     serve the store to NBD clients (no kernel, no swap)
  nbd-vram gpus [--libcuda PATH]     list GPUs with total and free memory
  nbd-vram stop DEVICE               swapoff and detach DEVICE served by a running daemon
  nbd-vram resize SIZE [DEVICE]      shrink or grow a running daemon's tier to SIZE, in
                                     whole slices, and wait until it has (root)
  nbd-vram status [--json]           show running instances
  nbd-vram bench --connect ADDR [--seconds N] [--connections N] [--verify]
                                     measure an NBD server the way the kernel drives it
  nbd-vram bench --connect ADDR [--label NAME]... [--seconds N] [--connections N]
                                     several servers, in turns, 1 s at a time
  nbd-vram bench --sweep [--svg FILE] --connect ADDR [--label NAME]... [--connections N]
                                     MB/s against request size, for one or more servers

STORE OPTIONS
  --size SIZE        store size; plain numbers are MiB, or give a K, M, G or T
                     suffix; a positive multiple of 4 KiB (default 1024)
  --store KIND       vram (default) or host (ordinary RAM; for tests)
  --gpu N            CUDA device index (default 0)
  --step SIZE        when SIZE cannot be allocated, retry this much smaller
                     (default 512)
  --min-size SIZE    give up below this (default 512)
  --libcuda PATH     the CUDA driver library (default: libcuda.so.1, then
                     libcuda.so; also the NBD_VRAM_LIBCUDA variable)

SWAP DAEMON OPTIONS
  --device DEV       /dev/nbdN, or auto for the first free one (default auto)
  --priority N       swap priority, 0..32767 (default 100: before disks)
  --discard          let swap discard freed pages (SWAP_FLAG_DISCARD)
  --timeout S        kernel request timeout in seconds; 0 (default) waits for
                     ever, as failing a swap request kills its process
  --no-swap          only export the block device, without swapon
  --connections N    kernel connections to the device, 1..16, each served by
                     its own thread (default 1; see the README)
  --reserve SIZE     keep this much VRAM free for other processes: below it,
                     give slices back (swapoff, detach, free), the one with
                     the fewest pages first; take them again once the reserve
                     and a slice are free for --hold-off (default 0: never)
  --slice-size SIZE  split the tier into slices of this size, each its own
                     VRAM, /dev/nbdN and swap area at the same priority
                     (default: the whole --size; with --reserve, a quarter)
  --hold-off S       seconds free VRAM must stay above the reserve and a
                     slice before one is taken again (default 30)

SERVE OPTIONS
  --listen ADDR      unix:PATH (created mode 0600) or tcp:HOST:PORT; HOST
                     must be loopback (127.0.0.1, ::1, localhost) unless
                     --allow-remote is given
  --allow-remote     let tcp: listen where other hosts reach it (0.0.0.0, a
                     LAN address). NBD has no authentication or encryption:
                     anyone who can connect reads and writes the export.
                     Prefer a unix socket or loopback with an SSH or TLS
                     tunnel
  --connections N    clients served at once, 1..16, each by its own thread
                     (default 1). With 1, another client waits until the
                     one served leaves; with more, a client beyond N is
                     turned away after waiting 1 s for a free thread

BENCH OPTIONS
  --connect ADDR     unix:PATH or tcp:HOST:PORT of a running NBD server; given
                     more than once (without --sweep), the servers take turns
                     within each pattern, 1 s each, and each is compared with
                     the first
  --seconds N        time per pattern (default 3); with several servers, the
                     turns each takes
  --connections N    drive N connections (1..64, default 1) to each server at
                     once, each its own thread and handshake, pipelined at the
                     pattern's depth on its own 1/N of the region; prints the
                     sum and each connection (bench: conn=I lines). The
                     server must serve N clients at once
  --verify           instead: write the whole export, read it back, compare;
                     with --connections N, each read on another connection
                     than its write (the server must say CAN_MULTI_CONN)
  --sweep            instead: sequential reads and writes at depth 8 of 4K, 16K,
                     64K, 128K, 512K and 1M requests (--seconds N each), against
                     every --connect in turn
  --label NAME       names the --connect before it (default: the address); one
                     word, as it goes into key=value lines
  --svg FILE         with --sweep: also plot MB/s against request size, one
                     line per server and direction, as an SVG file

GENERAL
  -q, --quiet        only errors
  -v, --verbose      also debug messages
  -h, --help         this text
  -V, --version      the version

EXIT CODES
  0  success           1  other failure       2  bad arguments
  3  CUDA unavailable (no driver, version mismatch, no such GPU)
  4  not enough free VRAM for --min-size
  5  nbd unavailable (module not loaded, no /dev/nbdN)
  6  device busy (in use by another server or already swap)
  7  permission denied (run as root, or with CAP_SYS_ADMIN)
  8  swap failure (swapon or swapoff refused)
";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Addr {
    Unix(PathBuf),
    Tcp(String),
}

impl std::fmt::Display for Addr {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self {
            Addr::Unix(p) => write!(f, "unix:{}", p.display()),
            Addr::Tcp(h) => write!(f, "tcp:{h}"),
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
pub struct SwapOpts {
    pub store: StoreOpts,
    /// `None` picks the first free /dev/nbdN.
    pub device: Option<PathBuf>,
    pub priority: i32,
    pub discard: bool,
    pub timeout: u32,
    pub swap: bool,
    /// Kernel connections (`NBD_SET_SOCK` each), one serve loop each.
    pub connections: usize,
    /// VRAM to keep free for others; 0: never give back on our own.
    pub reserve: u64,
    /// Bytes per slice; `store.size` is a whole number of them.
    pub slice: u64,
    pub hold_off: u32,
}

impl SwapOpts {
    /// Slices in the whole tier.
    pub fn slices(&self) -> usize {
        (self.store.size / self.slice.max(1)) as usize
    }
}

/// Slices per tier at most: each is a /dev/nbdN (the nbd module makes 16
/// by default) and a swap area (the kernel allows 32 or fewer).
pub const MAX_SLICES: u64 = 16;

#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Swap(SwapOpts),
    /// `allow_remote`: tcp: may listen beyond loopback.
    /// `connections`: clients served at once.
    Serve { store: StoreOpts, listen: Addr, allow_remote: bool, connections: usize },
    Gpus { libcuda: Option<PathBuf> },
    Stop { device: PathBuf },
    Resize { size: u64, device: Option<PathBuf> },
    Status { json: bool },
    /// `servers`: each --connect with its --label (one with `verify`);
    /// `connections`: to each at once (with `verify`, taking turns).
    Bench { servers: Vec<(Addr, String)>, seconds: u32, connections: usize, verify: bool, sweep: bool, svg: Option<PathBuf> },
    Help,
    Version,
}

#[derive(Debug, PartialEq, Eq)]
pub struct Parsed {
    pub command: Command,
    pub log_level: u8,
}

/// Connections per device at most: each costs a thread, 32 MiB of pinned
/// staging and, while busy, an SM for its mailbox kernel.
pub const MAX_CONNECTIONS: u32 = 16;

/// What the first word asks for; none of these: the swap daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Daemon,
    Serve,
    Gpus,
    Stop,
    Resize,
    Status,
    Bench,
}

const MODES: [(&str, Mode); 6] = [
    ("serve", Mode::Serve),
    ("gpus", Mode::Gpus),
    ("stop", Mode::Stop),
    ("resize", Mode::Resize),
    ("status", Mode::Status),
    ("bench", Mode::Bench),
];

impl Mode {
    fn name(self) -> &'static str {
        MODES.iter().find(|(_, m)| *m == self).map_or("the swap daemon", |(name, _)| name)
    }
}

/// The modes each flag applies to; `--help`, `--version`, `--quiet` and
/// `--verbose` apply to all. The HELP text above groups them the same way.
const FLAGS: &[(&str, &[Mode])] = {
    use Mode::*;
    &[
        ("--size", &[Daemon, Serve]),
        ("--store", &[Daemon, Serve]),
        ("--gpu", &[Daemon, Serve]),
        ("--step", &[Daemon, Serve]),
        ("--min-size", &[Daemon, Serve]),
        ("--libcuda", &[Daemon, Serve, Gpus]),
        ("--device", &[Daemon]),
        ("--priority", &[Daemon]),
        ("--timeout", &[Daemon]),
        ("--discard", &[Daemon]),
        ("--no-swap", &[Daemon]),
        ("--reserve", &[Daemon]),
        ("--slice-size", &[Daemon]),
        ("--hold-off", &[Daemon]),
        ("--listen", &[Serve]),
        ("--allow-remote", &[Serve]),
        ("--connect", &[Bench]),
        ("--label", &[Bench]),
        ("--sweep", &[Bench]),
        ("--svg", &[Bench]),
        ("--seconds", &[Bench]),
        ("--connections", &[Daemon, Serve, Bench]),
        ("--verify", &[Bench]),
        ("--json", &[Status]),
    ]
};

/// Parses `args` (without the program name).
pub fn parse<I: IntoIterator<Item = String>>(args: I) -> Result<Parsed, String> {
    let mut args = args.into_iter().peekable();
    let mode = match args.peek().and_then(|word| MODES.iter().find(|(name, _)| name == word)) {
        Some(&(_, mode)) => {
            args.next();
            mode
        }
        None => Mode::Daemon,
    };
    let mut store = StoreOpts {
        kind: StoreKind::Vram,
        size: 1024 * MIB,
        gpu: 0,
        step: 512 * MIB,
        min_size: 512 * MIB,
        libcuda: None,
    };
    let mut swap = SwapOpts {
        store: store.clone(),
        device: None,
        priority: 100,
        discard: false,
        timeout: 0,
        swap: true,
        connections: 1,
        reserve: 0,
        slice: 0,
        hold_off: 30,
    };
    let (mut listen, mut positional, mut second) = (None, None, None);
    let mut servers: Vec<(Addr, Option<String>)> = Vec::new();
    let (mut sweep, mut svg, mut connections) = (false, None, 1);
    let (mut json, mut seconds, mut log_level) = (false, 3, crate::log::INFO);
    let (mut verify, mut allow_remote) = (false, false);

    while let Some(arg) = args.next() {
        let (flag, inline) = match arg.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f.to_string(), Some(v.to_string())),
            _ => (arg.clone(), None),
        };
        // Before its value is read: a value is no matter where the flag is.
        if let Some((_, modes)) = FLAGS.iter().find(|(name, _)| *name == flag) {
            if !modes.contains(&mode) {
                return Err(format!("{flag} does not apply to {} (see nbd-vram --help)", mode.name()));
            }
        }
        let mut value = |name: &str| -> Result<String, String> {
            // An empty one (`--libcuda ""`, an unset variable) is none.
            inline.clone().or_else(|| args.next()).filter(|v| !v.is_empty()).ok_or_else(|| format!("{name} needs a value (see nbd-vram --help)"))
        };
        // A switch is on by being there: `--allow-remote=no` must not turn it on.
        let switch = || match &inline {
            Some(v) => Err(format!("{flag} takes no value (got {flag}={v}); leave it out to turn it off")),
            None => Ok(()),
        };
        match flag.as_str() {
            "-h" | "--help" => return Ok(Parsed { command: Command::Help, log_level }),
            "-V" | "--version" => return Ok(Parsed { command: Command::Version, log_level }),
            "-q" | "--quiet" => {
                switch()?;
                log_level = crate::log::ERR;
            }
            "-v" | "--verbose" => {
                switch()?;
                log_level = crate::log::DEBUG;
            }
            "--size" => {
                store.size = size(&flag, &value(&flag)?)?;
            }
            "--store" => {
                store.kind = match value(&flag)?.as_str() {
                    "vram" => StoreKind::Vram,
                    "host" => StoreKind::Host,
                    other => return Err(format!("--store {other}: expected vram or host")),
                };
            }
            "--gpu" => {
                store.gpu = number(&flag, &value(&flag)?, 0, u32::MAX)?;
            }
            "--step" => {
                store.step = size(&flag, &value(&flag)?)?;
            }
            "--min-size" => {
                store.min_size = size(&flag, &value(&flag)?)?;
            }
            "--libcuda" => {
                store.libcuda = Some(PathBuf::from(value(&flag)?));
            }
            "--device" => {
                let v = value(&flag)?;
                swap.device = if v == "auto" { None } else { Some(PathBuf::from(v)) };
            }
            "--priority" => {
                swap.priority = number(&flag, &value(&flag)?, 0, 32767)?;
            }
            "--timeout" => {
                swap.timeout = number(&flag, &value(&flag)?, 0, 86400)?;
            }
            "--discard" => {
                switch()?;
                swap.discard = true;
            }
            "--no-swap" => {
                switch()?;
                swap.swap = false;
            }
            "--reserve" => {
                let v = value(&flag)?;
                swap.reserve = size_or_none(&flag, &v)?;
            }
            "--slice-size" => {
                swap.slice = size(&flag, &value(&flag)?)?;
            }
            "--hold-off" => {
                swap.hold_off = number(&flag, &value(&flag)?, 0, 86400)?;
            }
            "--listen" => {
                listen = Some(addr(&value(&flag)?)?);
            }
            "--allow-remote" => {
                switch()?;
                allow_remote = true;
            }
            "--connect" => {
                servers.push((addr(&value(&flag)?)?, None));
            }
            "--label" => {
                let v = value(&flag)?;
                let Some(last) = servers.last_mut() else { return Err("--label names the --connect before it".into()) };
                // Its results go out as key=value lines.
                if v.is_empty() || v.contains(|c: char| c.is_whitespace() || c == '=') || last.1.replace(v).is_some() {
                    return Err("--label takes one word (no spaces, no '='), once per --connect".into());
                }
            }
            "--sweep" => {
                switch()?;
                sweep = true;
            }
            "--svg" => {
                svg = Some(PathBuf::from(value(&flag)?));
            }
            "--seconds" => {
                seconds = number(&flag, &value(&flag)?, 1, 3600)?;
            }
            "--connections" => {
                // A client may drive more than a server serves.
                let most = if mode == Mode::Bench { 64 } else { MAX_CONNECTIONS };
                connections = number(&flag, &value(&flag)?, 1u32, most)? as usize;
            }
            "--verify" => {
                switch()?;
                verify = true;
            }
            "--json" => {
                switch()?;
                json = true;
            }
            _ if !arg.starts_with('-') && matches!(mode, Mode::Stop | Mode::Resize) && positional.is_none() => positional = Some(arg.clone()),
            _ if !arg.starts_with('-') && mode == Mode::Resize && second.is_none() => second = Some(PathBuf::from(&arg)),
            _ if MODES.iter().any(|(name, _)| *name == arg) => return Err(format!("'{arg}' must come first: nbd-vram {arg} [OPTIONS]")),
            _ => return Err(format!("unknown argument '{arg}' (see nbd-vram --help)")),
        }
    }
    if store.min_size > store.size {
        store.min_size = store.size;
    }
    let command = match mode {
        Mode::Daemon => Command::Swap(settle_slices(SwapOpts { store, connections, ..swap })?),
        Mode::Serve => {
            let listen = listen.ok_or("serve needs --listen unix:PATH or --listen tcp:HOST:PORT")?;
            if let (Addr::Tcp(hostport), false) = (&listen, allow_remote) {
                // Refused here, before any store is allocated; binding
                // resolves and checks again. A name that does not resolve
                // is left to binding, whose error says so.
                if let Ok(addrs) = hostport.to_socket_addrs() {
                    refuse_remote(hostport, &addrs.collect::<Vec<_>>())?;
                }
            }
            Command::Serve { store, listen, allow_remote, connections }
        }
        Mode::Gpus => Command::Gpus { libcuda: store.libcuda },
        Mode::Stop => Command::Stop { device: positional.ok_or("stop needs a device, e.g. nbd-vram stop /dev/nbd0")?.into() },
        Mode::Resize => {
            let want = positional.ok_or("resize needs a size, e.g. nbd-vram resize 8G")?;
            let size = size_or_none("resize", &want)?;
            Command::Resize { size, device: second }
        }
        Mode::Status => Command::Status { json },
        Mode::Bench => {
            if servers.is_empty() {
                return Err("bench needs --connect unix:PATH or --connect tcp:HOST:PORT".into());
            }
            if !sweep && svg.is_some() {
                return Err("--svg goes with --sweep".into());
            }
            if sweep && verify {
                return Err("bench takes --sweep or --verify, not both".into());
            }
            if verify && servers.len() > 1 {
                return Err("--verify checks one server: give one --connect".into());
            }
            let servers = servers.into_iter().map(|(a, l)| (a.clone(), l.unwrap_or_else(|| a.to_string()))).collect();
            Command::Bench { servers, seconds, connections, verify, sweep, svg }
        }
    };
    Ok(Parsed { command, log_level })
}

/// Settles the slice size: given, or all of `--size` (one slice, the
/// tier as a whole), or with `--reserve` a quarter of it, so that giving
/// back is gradual; `--size` is rounded down to whole slices.
fn settle_slices(mut swap: SwapOpts) -> Result<SwapOpts, String> {
    let size = swap.store.size;
    if swap.slice == 0 {
        swap.slice = if swap.reserve > 0 { (size / 4).max(4096) & !4095 } else { size };
    }
    if !swap.swap && (swap.reserve > 0 || swap.slice < size) {
        return Err("--reserve and --slice-size give memory back by swapoff: they need swap (leave out --no-swap)".into());
    }
    if swap.slice > size {
        return Err(format!("--slice-size {} is larger than --size {}", Shown(swap.slice), Shown(size)));
    }
    if size / swap.slice > MAX_SLICES {
        return Err(format!("--size {} in slices of {} makes more than {MAX_SLICES}: give a larger --slice-size", Shown(size), Shown(swap.slice)));
    }
    // Checked here, before any memory is taken: mkswap's own minimum.
    if swap.swap && swap.slice < crate::swap::MIN_SIZE {
        let what = if swap.slice == size { "--size" } else { "each slice (--slice-size, or a quarter of --size with --reserve)" };
        return Err(format!("{what} is {}: swap needs at least {} (10 pages)", Shown(swap.slice), Shown(crate::swap::MIN_SIZE)));
    }
    swap.store.size = size / swap.slice * swap.slice;
    swap.store.min_size = swap.store.min_size.min(swap.store.size);
    Ok(swap)
}

/// A size in MiB, or in KiB where it is no whole number of MiB.
struct Shown(u64);

impl std::fmt::Display for Shown {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        match self.0 % MIB {
            0 => write!(f, "{} MiB", self.0 / MIB),
            _ => write!(f, "{} KiB", self.0 / 1024),
        }
    }
}

/// `Err` unless every address of `tcp:HOSTPORT` is loopback: NBD has no
/// authentication, and the export may be someone's swap, so reaching beyond
/// this host takes `--allow-remote`.
pub fn refuse_remote(hostport: &str, addrs: &[SocketAddr]) -> Result<(), String> {
    let Some(open) = addrs.iter().find(|a| !a.ip().to_canonical().is_loopback()) else {
        return Ok(());
    };
    let ip = open.ip();
    let reach = if ip.is_unspecified() { "every interface".to_string() } else { ip.to_string() };
    Err(format!(
        "tcp:{hostport} would listen on {reach}, beyond this host, and NBD has no authentication or encryption: \
         anyone who can connect could read and write the whole export. Listen on 127.0.0.1 or a unix socket and \
         reach it through an SSH or TLS tunnel, or add --allow-remote to serve it openly anyway"
    ))
}

/// A size: plain numbers are MiB; K, M, G, T suffixes (binary) are allowed.
/// `size`, where nothing (0, in any unit) is allowed too.
fn size_or_none(flag: &str, v: &str) -> Result<u64, String> {
    match bytes(flag, v)? {
        0 => Ok(0),
        _ => size(flag, v),
    }
}

fn size(flag: &str, v: &str) -> Result<u64, String> {
    check_size(bytes(flag, v)?).map_err(|e| format!("{flag} {v}: {e}"))
}

/// A number of MiB, or of the unit it ends in.
fn bytes(flag: &str, v: &str) -> Result<u64, String> {
    let digits = v.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let n: u64 = digits.parse().map_err(|_| format!("{flag} {v}: not a size (e.g. 7168 for 7168 MiB, or 7G)"))?;
    let unit = match v[digits.len()..].to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => MIB,
        "K" | "KB" | "KIB" => 1 << 10,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        _ => return Err(format!("{flag} {v}: unknown unit (use K, M, G or T; plain numbers are MiB)")),
    };
    n.checked_mul(unit).ok_or_else(|| format!("{flag} {v}: too large"))
}

fn number<T: TryFrom<i64> + std::fmt::Display + Copy>(flag: &str, v: &str, lo: T, hi: T) -> Result<T, String>
where
    i64: From<T>,
{
    let range = || format!("{flag} {v}: expected a whole number from {lo} to {hi}");
    let n: i64 = v.parse().map_err(|_| range())?;
    if n < i64::from(lo) || n > i64::from(hi) {
        return Err(range());
    }
    T::try_from(n).map_err(|_| range())
}

fn addr(v: &str) -> Result<Addr, String> {
    match v.split_once(':') {
        Some(("unix", path)) if !path.is_empty() => Ok(Addr::Unix(PathBuf::from(path))),
        Some(("tcp", hostport)) if hostport.rsplit_once(':').is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()) => {
            Ok(Addr::Tcp(hostport.to_string()))
        }
        _ => Err(format!("address '{v}': expected unix:PATH or tcp:HOST:PORT")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, String> {
        parse(s.split_whitespace().map(String::from)).map(|p| p.command)
    }

    /// Too small for swap is said before any memory is taken, naming what
    /// is too small, in the unit it was given in.
    #[test]
    fn a_slice_too_small_for_swap_is_refused_at_once() {
        assert_eq!(p("--size 16K").unwrap_err(), "--size is 16 KiB: swap needs at least 40 KiB (10 pages)");
        assert!(p("--size 64K --reserve 16K").unwrap_err().starts_with("each slice (--slice-size, or a quarter of --size with --reserve) is 16 KiB"));
        assert!(p("--size 16K --no-swap").is_ok(), "no swap, no minimum");
        assert_eq!(p("--size 2G --slice-size 1536K").unwrap_err(), "--size 2048 MiB in slices of 1536 KiB makes more than 16: give a larger --slice-size");
    }

    #[test]
    fn slices_default_to_one_or_a_quarter_with_a_reserve_and_need_swap() {
        let sliced = |s: &str| match p(s) {
            Ok(Command::Swap(o)) => (o.slices(), o.slice >> 20, o.store.size >> 20, o.reserve >> 20),
            other => panic!("{s}: {other:?}"),
        };
        assert_eq!(sliced("--size 4096"), (1, 4096, 4096, 0), "one slice: the daemon as it always was");
        assert_eq!(sliced("--size 4096 --reserve 1024"), (4, 1024, 4096, 1024));
        for none in ["0", "0M", "0K", "0G"] {
            assert_eq!(p(&format!("--size 4096 --reserve {none}")).map(|_| ()), Ok(()), "--reserve {none}");
        }
        assert!(p("--size 4096 --reserve 0X").unwrap_err().contains("unknown unit"));
        assert_eq!(sliced("--size 1000 --slice-size 300"), (3, 300, 900, 0), "rounded down to whole slices");
        assert!(p("--size 1024 --slice-size 2048").unwrap_err().contains("larger than --size"));
        assert!(p("--size 1024 --slice-size 32").unwrap_err().contains("more than 16"));
        assert!(p("--size 1024 --reserve 256 --no-swap").unwrap_err().contains("need swap"));
        assert!(p("--size 1024 --slice-size 256 --no-swap").unwrap_err().contains("need swap"));
        assert!(p("serve --listen unix:/x --reserve 1").unwrap_err().contains("does not apply"));
        assert_eq!(p("resize 8G /dev/nbd2"), Ok(Command::Resize { size: 8 << 30, device: Some("/dev/nbd2".into()) }));
        assert_eq!(p("resize 0"), Ok(Command::Resize { size: 0, device: None }));
        assert!(p("resize").is_err() && p("resize 7x").is_err());
    }

    #[test]
    fn product_line_parses() {
        let Command::Swap(o) = p("--size 7168 --device /dev/nbd0 --priority 100").unwrap() else { panic!() };
        assert_eq!(o.store.size, 7168 * MIB);
        assert_eq!(o.device, Some(PathBuf::from("/dev/nbd0")));
        assert_eq!(o.priority, 100);
        assert_eq!(o.store.kind, StoreKind::Vram);
        assert!(o.swap);
    }

    #[test]
    fn serve_with_units_and_equals() {
        let c = p("serve --listen=unix:/tmp/s --store host --size 64K").unwrap();
        let Command::Serve { store, listen, allow_remote: false, connections: 1 } = c else { panic!() };
        assert_eq!(store.size, 64 << 10);
        assert_eq!(store.kind, StoreKind::Host);
        assert_eq!(listen, Addr::Unix("/tmp/s".into()));
        assert!(matches!(p("serve --listen tcp:127.0.0.1:10809").unwrap(), Command::Serve { .. }));
    }

    #[test]
    fn connections_for_the_daemon_and_serve() {
        let Command::Swap(o) = p("--connections 4").unwrap() else { panic!() };
        assert_eq!(o.connections, 4);
        assert!(matches!(p("serve --listen unix:/s --connections=2").unwrap(), Command::Serve { connections: 2, .. }));
        assert!(p("--connections 0").unwrap_err().contains("from 1 to 16"));
        assert!(p("--connections 17").unwrap_err().contains("from 1 to 16"));
        assert!(p("status --connections 2").unwrap_err().contains("does not apply"));
        assert!(p("status --listen foo").unwrap_err().contains("--listen does not apply to status"));
        assert!(p("gpus --store bogus").unwrap_err().contains("--store does not apply to gpus"));
    }

    #[test]
    fn bad_input_says_what_is_wrong() {
        assert!(p("--size 6K").unwrap_err().contains("multiple of 4 KiB"));
        assert!(p("--size 0").unwrap_err().contains("positive"));
        assert!(p("--size abc").unwrap_err().contains("not a size"));
        assert!(p("--size 5X").unwrap_err().contains("unknown unit"));
        assert!(p("--size 99999999999T").unwrap_err().contains("too large"));
        assert!(p("--priority 40000").unwrap_err().contains("0 to 32767"));
        assert!(p("--bogus").unwrap_err().contains("unknown argument"));
        assert_eq!(p("-v status").unwrap_err(), "'status' must come first: nbd-vram status [OPTIONS]");
        assert!(parse(["gpus", "--libcuda", ""].map(String::from)).is_err_and(|e| e.contains("--libcuda needs a value")));
        assert!(p("gpus --libcuda=").unwrap_err().contains("--libcuda needs a value"));
        assert!(p("--size").unwrap_err().contains("needs a value"));
        assert!(p("serve --size 4").unwrap_err().contains("--listen"));
        assert!(p("serve --listen foo").unwrap_err().contains("unix:PATH"));
        assert!(p("serve --listen unix:/x --priority 3").unwrap_err().contains("does not apply to serve"));
        assert!(p("stop").unwrap_err().contains("needs a device"));
        assert!(p("--no-swap --discard -q").is_ok());
        for switch in ["--no-swap=false", "--discard=no", "--verbose=0"] {
            let flag = switch.split('=').next().unwrap();
            assert!(p(switch).unwrap_err().contains(&format!("{flag} takes no value")), "{switch}");
        }
        assert!(p("serve --listen tcp:0.0.0.0:10809 --allow-remote=no").unwrap_err().contains("--allow-remote takes no value"));
        assert!(p("bench --connect unix:/x --verify=no").unwrap_err().contains("--verify takes no value"));
        assert!(p("bench --connect unix:/x --label a=b").unwrap_err().contains("no '='"));
    }

    #[test]
    fn subcommands() {
        assert_eq!(p("stop /dev/nbd3").unwrap(), Command::Stop { device: "/dev/nbd3".into() });
        assert_eq!(p("status --json").unwrap(), Command::Status { json: true });
        assert_eq!(p("gpus").unwrap(), Command::Gpus { libcuda: None });
        assert_eq!(p("-h").unwrap(), Command::Help);
        assert!(matches!(p("bench --connect unix:/s --seconds 2").unwrap(), Command::Bench { seconds: 2, .. }));
    }

    #[test]
    fn bench_sweep_takes_several_labelled_servers() {
        let c = p("bench --connect unix:/a --label ours --connect tcp:h:1 --sweep --svg /t/x.svg --seconds 1").unwrap();
        let Command::Bench { servers, seconds: 1, connections: 1, verify: false, sweep: true, svg: Some(svg) } = c else {
            panic!("{c:?}")
        };
        assert_eq!(servers, [(Addr::Unix("/a".into()), "ours".into()), (Addr::Tcp("h:1".into()), "tcp:h:1".into())]);
        assert_eq!(svg, PathBuf::from("/t/x.svg"));
        let c = p("bench --connect unix:/a --label a --connect unix:/b --seconds 2").unwrap();
        let Command::Bench { servers, seconds: 2, connections: 1, verify: false, sweep: false, svg: None } = c else {
            panic!("{c:?}")
        };
        assert_eq!(servers, [(Addr::Unix("/a".into()), "a".into()), (Addr::Unix("/b".into()), "unix:/b".into())]);
        assert!(p("bench --connect unix:/a --connect unix:/b --verify").unwrap_err().contains("one --connect"));
        assert!(p("bench --connect unix:/a --svg x.svg").unwrap_err().contains("with --sweep"));
        assert!(p("bench --label x --connect unix:/a --sweep").unwrap_err().contains("before it"));
        assert!(p("bench --connect unix:/a --label x --label y --sweep").unwrap_err().contains("once per"));
        assert!(p("bench --connect unix:/a --sweep --verify").unwrap_err().contains("not both"));
        assert!(p("serve --listen unix:/x --sweep").unwrap_err().contains("does not apply"));
    }

    #[test]
    fn bench_connections_go_with_every_method() {
        let c = p("bench --connect unix:/a --connections 4 --seconds 1").unwrap();
        assert!(matches!(c, Command::Bench { connections: 4, seconds: 1, verify: false, .. }), "{c:?}");
        let c = p("bench --connect unix:/a --connect unix:/b --connections=64").unwrap();
        assert!(matches!(&c, Command::Bench { connections: 64, servers, .. } if servers.len() == 2), "{c:?}");
        assert!(matches!(p("bench --connect unix:/a --sweep --connections 2").unwrap(), Command::Bench { connections: 2, .. }));
        assert!(matches!(p("bench --connect unix:/a --verify --connections 1").unwrap(), Command::Bench { verify: true, .. }));
        for bad in ["0", "65", "-1", "two"] {
            let e = p(&format!("bench --connect unix:/a --connections {bad}")).unwrap_err();
            assert!(e.contains("--connections") && e.contains("from 1 to 64"), "{bad}: {e}");
        }
        assert!(matches!(p("bench --connect unix:/a --verify --connections 2").unwrap(), Command::Bench { verify: true, connections: 2, .. }));
        assert!(p("serve --listen unix:/x --connections 17").unwrap_err().contains("from 1 to 16"), "a server serves fewer than a client drives");
    }

    #[test]
    fn tcp_beyond_loopback_needs_allow_remote() {
        for host in ["0.0.0.0", "[::]", "192.0.2.1", "[::ffff:192.0.2.1]"] {
            let line = format!("serve --listen tcp:{host}:10809");
            assert!(p(&line).unwrap_err().contains("--allow-remote"), "{host}");
            let c = p(&format!("{line} --allow-remote")).unwrap();
            assert!(matches!(c, Command::Serve { allow_remote: true, .. }), "{host}");
        }
        for host in ["127.0.0.1", "127.1.2.3", "[::1]", "[::ffff:127.0.0.1]"] {
            assert!(p(&format!("serve --listen tcp:{host}:10809")).is_ok(), "{host}");
        }
        assert!(p("serve --listen unix:/s --allow-remote").is_ok());
        assert!(p("bench --connect tcp:0.0.0.0:1 --allow-remote").unwrap_err().contains("does not apply to bench"));
    }

    #[test]
    fn min_size_never_exceeds_size() {
        let Command::Swap(o) = p("--size 256").unwrap() else { panic!() };
        assert_eq!(o.store.min_size, 256 * MIB);
    }
}
