//! Entering a network namespace: only through a guard that puts the thread back, and
//! only on a thread made for the purpose.

use std::fs::File;
use std::io;
use std::marker::PhantomData;
use std::path::Path;

/// While alive, this thread is in another netns. `!Send`: it must be dropped on the
/// thread that made it.
pub struct NetnsGuard {
    original: File,
    _not_send: PhantomData<*const ()>,
}

impl NetnsGuard {
    pub fn enter(path: &Path) -> io::Result<NetnsGuard> {
        let original = File::open("/proc/thread-self/ns/net")?;
        let target = File::open(path)?;
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
