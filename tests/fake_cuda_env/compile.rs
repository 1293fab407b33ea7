//! Compiles a C file of tests/fake_cuda, for the integration tests
//! (`fake_cuda_env`) and for the unit tests that load the fake driver into
//! their own process. Standard library only, as both include it.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::SystemTime;

fn modified(p: &Path) -> Option<SystemTime> {
    fs::metadata(p).and_then(|m| m.modified()).ok()
}

/// Compiles `tests/fake_cuda/SOURCE` into `DIR/OUTPUT` unless an output at
/// least as new as the source is there. Several test binaries may run at
/// once, so each compiles to its own name and renames into place.
pub fn compile(dir: &Path, source: &str, output: &str, flags: &[&str]) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_cuda").join(source);
    let out = dir.join(output);
    let src_time = modified(&src).unwrap_or_else(|| panic!("{} is missing", src.display()));
    if modified(&out).is_some_and(|t| t >= src_time) {
        return out;
    }
    fs::create_dir_all(dir).expect("creating a directory for the fake driver");
    let tmp = dir.join(format!(".{output}.{}", std::process::id()));
    let cc = Command::new("cc").args(flags).arg("-o").arg(&tmp).arg(&src).output().expect("running cc");
    assert!(cc.status.success(), "cc {source}: {}", String::from_utf8_lossy(&cc.stderr));
    fs::rename(&tmp, &out).expect("moving the fake into place");
    out
}
