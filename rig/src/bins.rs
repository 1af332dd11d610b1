//! Where the built trellis binaries are: beside the test executable's `deps` dir, or
//! in `TRELLIS_BIN_DIR`.

use std::path::PathBuf;

pub fn bin_dir() -> PathBuf {
    if let Ok(d) = std::env::var("TRELLIS_BIN_DIR") {
        return PathBuf::from(d);
    }
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") || dir.ends_with("examples") {
        dir.pop();
    }
    dir
}

pub fn path(name: &str) -> PathBuf {
    let p = bin_dir().join(name);
    assert!(
        p.is_file(),
        "{} is not built: run `cargo build --workspace --bins` first (or set TRELLIS_BIN_DIR)",
        p.display()
    );
    p
}

pub fn trellis() -> PathBuf {
    path("trellis")
}

/// The shim: `TRELLIS_SHIM` if set (the benchmarks use the static build that ships,
/// scripts/build-shim.sh), else beside the other binaries.
pub fn shim() -> PathBuf {
    match std::env::var_os("TRELLIS_SHIM") {
        Some(p) => PathBuf::from(p),
        None => path("trellis-cni"),
    }
}
