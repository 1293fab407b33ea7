//! Generates the NBD UAPI bindings from `wrapper.h`, and keeps the binary's
//! only shared library libc (see `static_unwinder`).

use std::env;
use std::fs;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_var("NBD_.*")
        .allowlist_type("nbd_vram_.*")
        .allowlist_item("NBD_.*")
        .allowlist_var("SWAP_FLAG_.*")
        .allowlist_var("PR_SET_IO_FLUSHER")
        .allowlist_var("RAMFS_MAGIC")
        .prepend_enum_name(false)
        .generate()
        .expect("bindgen could not read wrapper.h: install linux-libc-dev and libclang-dev")
        .write_to_file(out.join("nbd_bindings.rs"))
        .expect("writing bindings to OUT_DIR");
    static_unwinder(&out);
}

/// Rust's std asks for `-lgcc_s` even with `panic = "abort"`, which would
/// make libgcc_s.so.1 a run-time dependency, missing from many initramfs
/// images. A linker script named `libgcc_s.so`, found first, points the
/// linker at the static unwinder `libgcc_eh.a` instead.
fn static_unwinder(out: &std::path::Path) {
    if env::var("CARGO_CFG_TARGET_ENV").as_deref() != Ok("gnu") {
        return;
    }
    let cc = env::var("CC").unwrap_or_else(|_| "cc".into());
    let found = Command::new(cc).arg("-print-file-name=libgcc_eh.a").output();
    let Ok(found) = found else { return };
    let path = String::from_utf8_lossy(&found.stdout).trim().to_string();
    if !path.starts_with('/') {
        return; // the compiler does not know it: keep the default
    }
    let dir = out.join("unwind");
    fs::create_dir_all(&dir).expect("creating OUT_DIR/unwind");
    fs::write(dir.join("libgcc_s.so"), format!("INPUT({path})\n")).expect("writing linker script");
    println!("cargo:rustc-link-search=native={}", dir.display());
}
