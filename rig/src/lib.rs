//! Test rigs built from real parts (see ../shared/RIGS.md): network namespaces made
//! and removed by the rig, the trellis agent as a process, the shim as the runtime
//! would run it. Used by the integration tests, the demo and the benchmarks.

pub mod agent;
pub mod bins;
pub mod bpf;
pub mod containerd;
pub mod cri;
pub mod daemonset;
pub mod dpdk;
pub mod fake_apiserver;
pub mod fake_kubelet;
pub mod figures;
pub mod lpm_baseline;
pub mod netns;
pub mod node;
pub mod packets;
pub mod pause;
pub mod procfs;
pub mod qemu;
pub mod rng;
pub mod traffic;

/// Whether the rig can run here (root is needed for namespaces).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// Skips a privileged test loudly when not root.
#[macro_export]
macro_rules! require_root {
    () => {
        if !$crate::is_root() {
            eprintln!("SKIPPED: this test needs root (network namespaces)");
            return;
        }
    };
}

/// A name unique to this process and call, short enough for interface names.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    format!("{prefix}{:x}{n}", std::process::id() % 0xfffff)
}

/// Polls `f` until it holds; panics naming `what` if it does not within `within`.
pub fn wait_until(what: &str, within: std::time::Duration, mut f: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + within;
    while !f() {
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: not within {within:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// A dir of its own under /sys/fs/bpf for a test's or bench's dataplane pins,
/// removed (with everything pinned in it) on drop.
pub struct BpfDir(pub std::path::PathBuf);

impl BpfDir {
    pub fn new(prefix: &str) -> BpfDir {
        BpfDir(std::path::PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            unique(prefix)
        )))
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
