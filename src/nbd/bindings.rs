//! `<linux/nbd.h>` as bindgen generated it from `wrapper.h` (never edited).
#![allow(dead_code, non_camel_case_types, non_upper_case_globals)]
include!(concat!(env!("OUT_DIR"), "/nbd_bindings.rs"));
