//! The NBD protocol: wire format, the transmission loop, and the kernel side.

pub mod bindings;
pub mod kernel;
pub mod proto;
pub mod serve;
