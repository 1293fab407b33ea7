//! What ends the program: a message a user can act on, and the exit code
//! that `--help` documents for it.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Code {
    Other = 1,
    Usage = 2,
    Cuda = 3,
    NoVram = 4,
    NoNbd = 5,
    Busy = 6,
    Permission = 7,
    Swap = 8,
}

#[derive(Debug)]
pub struct Failure {
    pub code: Code,
    pub message: String,
}

impl Failure {
    pub fn new(code: Code, message: impl Into<String>) -> Failure {
        Failure { code, message: message.into() }
    }

    /// An OS error on `what`, classed by errno so that the exit code tells
    /// a missing permission from a busy device.
    pub fn os(what: impl fmt::Display, err: std::io::Error) -> Failure {
        let code = match err.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => Code::Permission,
            Some(libc::EBUSY) => Code::Busy,
            _ => Code::Other,
        };
        let what = what.to_string();
        let hint = match code {
            Code::Permission if !what.contains("needs") => " (run as root, or with CAP_SYS_ADMIN)",
            _ => "",
        };
        Failure::new(code, format!("{what}: {err}{hint}"))
    }
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str(&self.message)
    }
}
