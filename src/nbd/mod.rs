//! The NBD protocol: wire format, the transmission loop, and the kernel side.

mod input;
pub mod kernel;
mod poll;
pub mod proto;
pub mod transmit;
