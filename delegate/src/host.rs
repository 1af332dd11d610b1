//! Host paths seen from a container: through a host process's root
//! (`/proc/<pid>/root`), with every symlink resolved inside that root
//! (`RESOLVE_IN_ROOT`), so `/var/run -> /run` and absolutely linked plugins lead where
//! they do on the host, never into the container's own tree.

use nix::fcntl::{OFlag, OpenHow, ResolveFlag};
use std::fs::File;
use std::io;
use std::path::Path;

/// Opens the host's `path` (absolute) through `root` for reading.
pub fn open_in_root(root: &Path, path: &Path) -> io::Result<File> {
    open(root, path, OFlag::O_RDONLY)
}

/// The host's `path` opened `O_PATH`: for fstat/fstatfs, whatever it is (a FIFO
/// there does not block).
pub fn open_path_in_root(root: &Path, path: &Path) -> io::Result<File> {
    open(root, path, OFlag::O_PATH)
}

/// Whether the host's `path` is a regular file (or a link to one).
pub fn is_file_in_root(root: &Path, path: &Path) -> bool {
    open(root, path, OFlag::O_PATH)
        .and_then(|f| f.metadata())
        .is_ok_and(|m| m.is_file())
}

fn open(root: &Path, path: &Path, flags: OFlag) -> io::Result<File> {
    let dir = File::open(root)?;
    let rel = path.strip_prefix("/").unwrap_or(path);
    let fd = nix::fcntl::openat2(
        &dir,
        rel,
        OpenHow::new()
            .flags(flags | OFlag::O_CLOEXEC)
            .resolve(ResolveFlag::RESOLVE_IN_ROOT),
    )?;
    Ok(File::from(fd))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn absolute_links_resolve_inside_the_root() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path();
        std::fs::create_dir_all(root.join("usr/lib/cni")).unwrap();
        std::fs::create_dir_all(root.join("opt/cni/bin")).unwrap();
        // A name the real host does not have: found only if the link resolved inside.
        std::fs::write(root.join("usr/lib/cni/only-in-root"), b"x").unwrap();
        std::os::unix::fs::symlink("/usr/lib/cni/only-in-root", root.join("opt/cni/bin/bridge"))
            .unwrap();
        // Out of the root, the same absolute link leads nowhere (or elsewhere).
        std::os::unix::fs::symlink("/etc/passwd", root.join("opt/cni/bin/escape")).unwrap();
        assert!(is_file_in_root(root, Path::new("/opt/cni/bin/bridge")));
        assert!(!is_file_in_root(root, Path::new("/opt/cni/bin/escape")));
        assert!(!is_file_in_root(
            root,
            Path::new("/opt/cni/bin/../../../etc/passwd")
        ));
        let mut text = String::new();
        std::io::Read::read_to_string(
            &mut open_in_root(root, Path::new("/opt/cni/bin/bridge")).unwrap(),
            &mut text,
        )
        .unwrap();
        assert_eq!(text, "x");
    }
}
