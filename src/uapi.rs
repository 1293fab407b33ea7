//! The kernel ABI of `wrapper.h` (`<linux/nbd.h>`, swap flags, prctl, ramfs's magic) as
//! bindgen generated it (never edited), for whoever speaks to the kernel.
#![allow(dead_code, non_camel_case_types, non_upper_case_globals)]
include!(concat!(env!("OUT_DIR"), "/nbd_bindings.rs"));
