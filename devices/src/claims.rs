//! Which VFs the agent has placed in pods. The agent's SR-IOV kind saves a VF's
//! host-side state in `<state dir>/vfs/<pci>.json` before it changes anything and
//! removes the file only once the VF is back as it was; while the file is there the VF
//! is claimed. The device plugin reads the same files: a claimed VF's netdev has left
//! the host's view by design, which is no reason to report it unhealthy. Both sides
//! reach the files only through this type.

use crate::pci::PciAddress;
use std::path::{Path, PathBuf};

/// The claims directory under a state dir.
pub const CLAIMS_DIR: &str = "vfs";

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VfClaims {
    dir: PathBuf,
}

impl VfClaims {
    /// The claims of the agent whose state dir is `state_dir`.
    pub fn under(state_dir: &Path) -> VfClaims {
        VfClaims {
            dir: state_dir.join(CLAIMS_DIR),
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The claim file of `device` (a PCI address, `dddd:bb:dd.f`).
    pub fn path(&self, device: &str) -> PathBuf {
        self.dir.join(format!("{device}.json"))
    }

    /// Whether the agent holds `device` in a pod (or has not yet put it back).
    pub fn is_claimed(&self, device: &str) -> bool {
        self.path(device).exists()
    }

    /// Every claimed device, from the file names: `<pci address>.json` and nothing
    /// else (files being written start with a dot; a name that is no PCI address is
    /// no claim of ours). An unreadable dir has none.
    pub fn claimed(&self) -> Vec<String> {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        let mut out: Vec<String> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().into_owned();
                name.strip_suffix(".json")
                    .filter(|d| d.parse::<PciAddress>().is_ok())
                    .map(str::to_string)
            })
            .collect();
        out.sort();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_claim_is_its_file_and_temp_files_are_not_claims() {
        let d = tempfile::tempdir().unwrap();
        let c = VfClaims::under(d.path());
        assert_eq!(c.dir(), d.path().join("vfs"));
        assert!(c.claimed().is_empty(), "no dir, no claims");
        std::fs::create_dir(c.dir()).unwrap();
        std::fs::write(c.path("0000:01:10.0"), b"{}").unwrap();
        std::fs::write(c.dir().join(".0000:01:10.2.json.tmp"), b"{").unwrap();
        std::fs::write(c.dir().join(".0000:01:10.4.json"), b"{").unwrap();
        std::fs::write(c.dir().join("notes.txt"), b"").unwrap();
        std::fs::write(c.dir().join("x.json"), b"{}").unwrap();
        assert!(c.is_claimed("0000:01:10.0"));
        assert!(!c.is_claimed("0000:01:10.2"));
        assert_eq!(c.claimed(), ["0000:01:10.0"]);
        std::fs::remove_file(c.path("0000:01:10.0")).unwrap();
        assert!(!c.is_claimed("0000:01:10.0"));
    }
}
