//! DPDK vhost-user sockets (as OVS-DPDK or VPP make them, in server mode) found in
//! directories; each socket is one device.

use crate::config::VhostSelector;
use serde::Serialize;
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VhostSocket {
    pub path: PathBuf,
}

impl VhostSocket {
    pub fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("/"))
    }

    pub fn file_name(&self) -> String {
        self.path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    }

    /// Present and accepting: a listening socket in this network namespace's
    /// /proc/net/unix, or else (the switch may be in another namespace) a connection
    /// it accepts.
    pub fn health(&self) -> Result<(), String> {
        match std::fs::symlink_metadata(&self.path) {
            Err(_) => return Err("socket is gone".into()),
            Ok(m) if !m.file_type().is_socket() => return Err("not a socket".into()),
            Ok(_) => {}
        }
        if listening_in_proc(&self.path) {
            return Ok(());
        }
        std::os::unix::net::UnixStream::connect(&self.path)
            .map(drop)
            .map_err(|e| format!("not accepting connections: {e}"))
    }
}

/// `/proc/net/unix` lists bound sockets; flag 0x10000 (__SO_ACCEPTCON) marks the
/// listening ones.
fn listening_in_proc(path: &Path) -> bool {
    let Ok(table) = std::fs::read_to_string("/proc/net/unix") else {
        return false;
    };
    let want = path.to_string_lossy();
    table.lines().skip(1).any(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f.len() >= 8
            && f[7] == want
            && u32::from_str_radix(f[3], 16).is_ok_and(|flags| flags & 0x10000 != 0)
    })
}

/// Sockets matching any selector, sorted by path; unreadable directories are
/// skipped (a switch that has not started yet has made none).
pub fn discover(selectors: &[VhostSelector]) -> Vec<VhostSocket> {
    let mut out = Vec::new();
    for s in selectors {
        for dir in &s.socket_dirs {
            let Ok(entries) = std::fs::read_dir(dir) else {
                continue;
            };
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                let is_socket = e.file_type().is_ok_and(|t| t.is_socket());
                if is_socket && crate::glob::matches(&s.name_pattern, &name) {
                    out.push(VhostSocket { path: e.path() });
                }
            }
        }
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn finds_sockets_by_pattern_and_checks_they_accept() {
        let d = tempfile::tempdir().unwrap();
        let l1 = UnixListener::bind(d.path().join("vhu1.sock")).unwrap();
        let _l2 = UnixListener::bind(d.path().join("other.sock")).unwrap();
        std::fs::write(d.path().join("vhu2.sock"), "not a socket").unwrap();
        let sel = VhostSelector {
            socket_dirs: vec![d.path().to_path_buf(), "/nonexistent".into()],
            name_pattern: "vhu*".into(),
        };
        let found = discover(std::slice::from_ref(&sel));
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].file_name(), "vhu1.sock");
        assert_eq!(found[0].health(), Ok(()));
        // The server goes away but leaves its socket file: not accepting.
        drop(l1);
        assert!(found[0].health().unwrap_err().contains("not accepting"));
        std::fs::remove_file(&found[0].path).unwrap();
        assert_eq!(found[0].health(), Err("socket is gone".into()));
    }
}
