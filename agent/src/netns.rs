//! Entering a network namespace: only through a guard that puts the thread back, and
//! only on a thread made for the purpose.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Where the host's files are seen from this process (`/proc/1/root` when the agent
/// runs in a container with hostPID); pods' netns paths are the host's.
static HOST_ROOT: OnceLock<PathBuf> = OnceLock::new();

/// Reads pods' netns paths through `root` from now on (once, at start-up).
pub fn set_host_root(root: PathBuf) {
    let _ = HOST_ROOT.set(root);
}

/// Opens a pod's netns (a host path), through the host's root if set, its symlinks
/// (`/var/run -> /run`) resolved there.
pub fn open(path: &Path) -> io::Result<File> {
    match HOST_ROOT.get() {
        Some(root) => trellis_delegate::host::open_in_root(root, path),
        None => File::open(path),
    }
}

/// A pod's netns path opened `O_PATH` (through the host's root if set), to look at
/// what is there without reading it: a FIFO put there does not block.
pub fn open_path(path: &Path) -> io::Result<File> {
    match HOST_ROOT.get() {
        Some(root) => trellis_delegate::host::open_path_in_root(root, path),
        None => {
            use std::os::unix::fs::OpenOptionsExt;
            std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_PATH)
                .open(path)
        }
    }
}

/// The inode of the network namespace at `path`, if a network namespace is there.
pub fn inode(path: &Path) -> Option<u64> {
    use std::os::unix::fs::MetadataExt;
    let f = open_path(path).ok()?;
    let fs = nix::sys::statfs::fstatfs(&f).ok()?;
    (fs.filesystem_type() == nix::sys::statfs::NSFS_MAGIC)
        .then(|| f.metadata().ok().map(|m| m.ino()))
        .flatten()
}

/// What still holds the network namespace of inode `ino` alive, if anything: a
/// process in it (the host's processes, as `/proc` shows them with hostPID) or a
/// mount of it in the host's mount namespace. Open fds of other processes are not
/// looked at.
pub fn holder(ino: u64) -> Option<String> {
    let want = format!("net:[{ino}]");
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = p.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        if std::fs::read_link(p.path().join("ns/net")).is_ok_and(|l| l.as_os_str() == want.as_str())
        {
            return Some(format!("process {pid} is in it"));
        }
    }
    // The host's mounts: PID 1's mount namespace (the agent's own without hostPID).
    let mounts = std::fs::read_to_string("/proc/1/mountinfo").unwrap_or_default();
    mounts
        .lines()
        .find(|l| l.split(' ').nth(3) == Some(want.as_str()))
        .and_then(|l| l.split(' ').nth(4))
        .map(|at| format!("it is still mounted at {at}"))
}

/// While alive, this thread is in another netns. `!Send`: it must be dropped on the
/// thread that made it.
pub struct NetnsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    pub fn enter(path: &Path) -> io::Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = open(path)?;
        setns(&target)?;
        Ok(NetnsGuard {
            original,
            _not_send: PhantomData,
        })
    }
}

impl Drop for NetnsGuard {
    fn drop(&mut self) {
        if let Err(e) = setns(&self.original) {
            // A thread stranded in a pod's netns would do later work in the wrong place.
            panic!("cannot return thread to its network namespace: {e}");
        }
    }
}

fn setns(f: &File) -> io::Result<()> {
    // Affects only the calling thread.
    nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(io::Error::from)
}

/// Runs `f` in the netns at `path` on a thread of its own.
pub fn run_in<T: Send>(path: &Path, f: impl FnOnce() -> T + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        s.spawn(|| {
            let _guard = NetnsGuard::enter(path)?;
            Ok(f())
        })
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p))
    })
}
