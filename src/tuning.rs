//! Every environment knob, read once at start and checked: a bad value is
//! an error that names it, never a silent default. The switches exist to
//! compare the paths on one machine; the defaults are what measured best
//! (docs/performance.md). Passed down to whoever uses them.

use std::time::Duration;

/// How the resident mailbox kernel is used (`NBD_VRAM_MAILBOX`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MailboxUse {
    /// `0`: never loaded.
    Off,
    /// `lone`: lone copies only; batches go to the copy kernel.
    Lone,
    /// `1`, the default: lone copies and batches of small ones, as lists.
    Lists,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// `NBD_VRAM_LIBCUDA`: the CUDA driver library, when `--libcuda` is not given.
    pub libcuda: Option<String>,
    /// `NBD_VRAM_BATCH=0`: one driver call per copy, and no kernels.
    pub batch: bool,
    /// `NBD_VRAM_KERNEL=0`: no copy kernel for batches of small copies.
    pub copy_kernel: bool,
    pub mailbox: MailboxUse,
    /// `NBD_VRAM_SHARED=0`: other processes on the GPU are ignored.
    pub watch_neighbours: bool,
    /// `NBD_VRAM_SPIN` (µs): how long the loop polls its socket before it
    /// sleeps; `None`, the loop's own default.
    pub spin: Option<Duration>,
    /// `NBD_VRAM_GROUP`: read replies per device wait (0: the whole batch).
    /// Fewer waits make bigger batched copies and fewer driver calls; more
    /// let the first replies leave sooner. A whole batch by default: on an
    /// H200, 4 KiB QD32 reads went 11 % faster than with 8, and with 4 they
    /// lost half (docs/performance.md); larger requests never fill a group.
    pub group: usize,
    /// `NBD_VRAM_AHEAD=0`: each batch answered before the next is taken.
    pub ahead: bool,
    /// `NBD_VRAM_EARLY_HEADER=0`: a read's header only with its data.
    pub early_header: bool,
    /// `NBD_VRAM_UNCACHED=0`: write payloads always reach staging through
    /// the CPU caches, even while other connections write too.
    pub uncached: bool,
}

impl Default for Tuning {
    fn default() -> Tuning {
        Tuning {
            libcuda: None,
            batch: true,
            copy_kernel: true,
            mailbox: MailboxUse::Lists,
            watch_neighbours: true,
            spin: None,
            group: GROUP_MAX,
            ahead: true,
            early_header: true,
            uncached: true,
        }
    }
}

/// The largest read group: a whole batch of the transmission loop (its
/// `MAX_BATCH`, which checks that the two agree).
pub const GROUP_MAX: usize = 16;

/// The longest poll `NBD_VRAM_SPIN` may ask for: a second, far past any
/// gain, where a typo of a few zeros would burn a CPU.
const SPIN_MAX_US: u64 = 1_000_000;

impl Tuning {
    /// The knobs of this process's environment.
    pub fn from_env() -> Result<Tuning, String> {
        Tuning::parse(|name| std::env::var(name).ok())
    }

    /// An empty value counts as unset, as `KNOB=` in an environment file.
    fn parse(get: impl Fn(&str) -> Option<String>) -> Result<Tuning, String> {
        let get = |name: &str| get(name).filter(|v| !v.is_empty());
        let mut t = Tuning::default();
        let switch = |name: &str, default: bool| match get(name).as_deref() {
            None => Ok(default),
            Some("0") => Ok(false),
            Some("1") => Ok(true),
            Some(v) => Err(format!("{name}={v}: give 0 or 1")),
        };
        let number = |name: &str, max: u64| match get(name) {
            None => Ok(None),
            Some(v) => match v.parse::<u64>() {
                Ok(n) if n <= max => Ok(Some(n)),
                _ => Err(format!("{name}={v}: give a whole number from 0 to {max}")),
            },
        };
        t.libcuda = get("NBD_VRAM_LIBCUDA");
        t.batch = switch("NBD_VRAM_BATCH", t.batch)?;
        t.copy_kernel = switch("NBD_VRAM_KERNEL", t.copy_kernel)?;
        t.mailbox = match get("NBD_VRAM_MAILBOX").as_deref() {
            None | Some("1") => MailboxUse::Lists,
            Some("lone") => MailboxUse::Lone,
            Some("0") => MailboxUse::Off,
            Some(v) => return Err(format!("NBD_VRAM_MAILBOX={v}: give 1, lone or 0")),
        };
        t.watch_neighbours = switch("NBD_VRAM_SHARED", t.watch_neighbours)?;
        t.spin = number("NBD_VRAM_SPIN", SPIN_MAX_US)?.map(Duration::from_micros);
        t.group = number("NBD_VRAM_GROUP", GROUP_MAX as u64)?.map_or(t.group, |n| n as usize);
        t.ahead = switch("NBD_VRAM_AHEAD", t.ahead)?;
        t.early_header = switch("NBD_VRAM_EARLY_HEADER", t.early_header)?;
        t.uncached = switch("NBD_VRAM_UNCACHED", t.uncached)?;
        Ok(t)
    }

    /// One line with every setting, for `--verbose`.
    pub fn log(&self) {
        crate::debug!("settings: {self:?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[(&str, &str)]) -> Result<Tuning, String> {
        Tuning::parse(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    #[test]
    fn nothing_set_is_the_default() {
        assert_eq!(parse(&[]), Ok(Tuning::default()));
    }

    #[test]
    fn every_knob_is_read() {
        let vars = [
            ("NBD_VRAM_LIBCUDA", "/opt/libcuda.so.1"),
            ("NBD_VRAM_BATCH", "0"),
            ("NBD_VRAM_KERNEL", "0"),
            ("NBD_VRAM_MAILBOX", "lone"),
            ("NBD_VRAM_SHARED", "0"),
            ("NBD_VRAM_SPIN", "250"),
            ("NBD_VRAM_GROUP", "0"),
            ("NBD_VRAM_AHEAD", "0"),
            ("NBD_VRAM_EARLY_HEADER", "0"),
            ("NBD_VRAM_UNCACHED", "0"),
        ];
        let t = parse(&vars).unwrap();
        let want = Tuning {
            libcuda: Some("/opt/libcuda.so.1".into()),
            batch: false,
            copy_kernel: false,
            mailbox: MailboxUse::Lone,
            watch_neighbours: false,
            spin: Some(Duration::from_micros(250)),
            group: 0,
            ahead: false,
            early_header: false,
            uncached: false,
        };
        assert_eq!(t, want);
        assert_eq!(parse(&[("NBD_VRAM_MAILBOX", "0")]).unwrap().mailbox, MailboxUse::Off);
        assert_eq!(parse(&[("NBD_VRAM_LIBCUDA", ""), ("NBD_VRAM_BATCH", "")]), Ok(Tuning::default()));
    }

    #[test]
    fn a_bad_value_is_an_error_that_names_the_knob() {
        for (name, value, says) in [
            ("NBD_VRAM_BATCH", "no", "give 0 or 1"),
            ("NBD_VRAM_MAILBOX", "lists", "give 1, lone or 0"),
            ("NBD_VRAM_SPIN", "5000000", "from 0 to 1000000"),
            ("NBD_VRAM_SPIN", "-1", "whole number"),
            ("NBD_VRAM_GROUP", "17", "from 0 to 16"),
        ] {
            let e = parse(&[(name, value)]).unwrap_err();
            assert!(e.starts_with(&format!("{name}={value}: ")) && e.contains(says), "{e}");
        }
    }
}
