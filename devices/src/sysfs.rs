//! PCI network devices from sysfs: PFs with their SR-IOV state, VFs with their PF and
//! index, drivers, netdevs, NUMA node and IOMMU group. The root is configurable so
//! tests read fixture trees laid out as the kernel lays out /sys.

use crate::pci::PciAddress;
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("cannot list PCI devices in {path}: {source}")]
    List {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// The kernel driver a VF needs to be usable by a pod as a netdev, or as vfio.
pub const VFIO_DRIVER: &str = "vfio-pci";

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SriovState {
    pub total_vfs: u32,
    pub num_vfs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VfOf {
    pub pf: PciAddress,
    pub index: u32,
    /// The PF's netdev, as pfNames selectors name it.
    pub pf_netdev: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PciNetDevice {
    pub address: PciAddress,
    #[serde(serialize_with = "hex4")]
    pub vendor: u16,
    #[serde(serialize_with = "hex4")]
    pub device: u16,
    pub driver: Option<String>,
    pub netdevs: Vec<String>,
    /// Of the first netdev: "ether", "infiniband", ...
    pub link_type: Option<String>,
    pub numa_node: Option<u32>,
    pub iommu_group: Option<u32>,
    /// Set on SR-IOV capable PFs.
    pub sriov: Option<SriovState>,
    /// Set on VFs.
    pub vf_of: Option<VfOf>,
}

/// PCI IDs as lspci and the selectors write them: "8086".
fn hex4<S: serde::Serializer>(v: &u16, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&format!("{v:04x}"))
}

impl PciNetDevice {
    pub fn is_vf(&self) -> bool {
        self.vf_of.is_some()
    }

    /// A PF whose VFs are enabled is not offered itself (its VFs are).
    pub fn has_vfs_enabled(&self) -> bool {
        self.sriov.as_ref().is_some_and(|s| s.num_vfs > 0)
    }

    /// Usable now: a driver is bound, and a kernel-netdev driver has its netdev.
    pub fn health(&self) -> Result<(), String> {
        match self.driver.as_deref() {
            None => Err("no driver bound".into()),
            Some(VFIO_DRIVER) if self.iommu_group.is_none() => {
                Err("bound to vfio-pci but has no IOMMU group".into())
            }
            Some(VFIO_DRIVER) => Ok(()),
            Some(d) if self.netdevs.is_empty() => Err(format!("driver {d} has no netdev")),
            Some(_) => Ok(()),
        }
    }
}

/// The sysfs tree to read: `/sys`, or a fixture that stands where /sys would.
#[derive(Debug, Clone)]
pub struct Sysfs {
    pub root: PathBuf,
}

impl Default for Sysfs {
    fn default() -> Self {
        Sysfs {
            root: PathBuf::from("/sys"),
        }
    }
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p)
        .ok()
        .map(|s| s.trim().to_string())
}

fn read_hex(p: &Path) -> Option<u32> {
    let s = read_trimmed(p)?;
    u32::from_str_radix(s.trim_start_matches("0x"), 16).ok()
}

fn link_name(p: &Path) -> Option<String> {
    let target = std::fs::read_link(p).ok()?;
    Some(target.file_name()?.to_string_lossy().into_owned())
}

/// ARPHRD_* numbers from `net/<if>/type`, as iproute2 names them.
fn link_type_name(arphrd: u32) -> String {
    match arphrd {
        1 => "ether".into(),
        32 => "infiniband".into(),
        772 => "loopback".into(),
        other => format!("arphrd{other}"),
    }
}

impl Sysfs {
    pub fn new(root: impl Into<PathBuf>) -> Sysfs {
        Sysfs { root: root.into() }
    }

    pub fn pci_devices_dir(&self) -> PathBuf {
        self.root.join("bus/pci/devices")
    }

    /// One device, with its PF and VF index when it is a VF; `None` if there is no
    /// such PCI device.
    pub fn device(&self, address: PciAddress) -> Option<PciNetDevice> {
        let path = self.pci_devices_dir().join(address.to_string());
        let mut d = read_device(address, &path)?;
        if let Some(pf) = link_name(&path.join("physfn")).and_then(|n| n.parse::<PciAddress>().ok())
        {
            let pf_path = self.pci_devices_dir().join(pf.to_string());
            let pf_dev = read_device(pf, &pf_path);
            let total = pf_dev
                .as_ref()
                .and_then(|p| p.sriov.as_ref())
                .map(|s| s.total_vfs)
                .unwrap_or(256);
            let index = (0..total)
                .find(|i| {
                    link_name(&pf_path.join(format!("virtfn{i}")))
                        .is_some_and(|n| n == address.to_string())
                })
                .unwrap_or(u32::MAX);
            if d.link_type.is_none() {
                d.link_type = pf_dev.as_ref().and_then(|p| p.link_type.clone());
            }
            d.vf_of = Some(VfOf {
                pf,
                index,
                pf_netdev: pf_dev.and_then(|p| p.netdevs.first().cloned()),
            });
        }
        Some(d)
    }

    /// Every PCI device of the network class (0x02), sorted by address.
    pub fn discover(&self) -> Result<Vec<PciNetDevice>, DiscoveryError> {
        let dir = self.pci_devices_dir();
        let entries = std::fs::read_dir(&dir).map_err(|source| DiscoveryError::List {
            path: dir.clone(),
            source,
        })?;
        let listed: Vec<(PciAddress, PathBuf)> = entries
            .flatten()
            .filter_map(|e| {
                let address = e.file_name().to_string_lossy().parse::<PciAddress>().ok()?;
                // The real directory behind the bus symlink: every read below would
                // otherwise resolve that link again.
                let link = e.path();
                let path = match std::fs::read_link(&link) {
                    Ok(t) if t.is_relative() => dir.join(t),
                    Ok(t) => t,
                    Err(_) => link,
                };
                Some((address, path))
            })
            .collect();
        // A thousand devices are a few thousand small reads: spread them over the cores.
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
            .clamp(1, 4);
        let chunk = listed.len().div_ceil(threads).max(1);
        let mut devices: Vec<(PciNetDevice, PathBuf)> = std::thread::scope(|sc| {
            let handles: Vec<_> = listed
                .chunks(chunk)
                .map(|part| {
                    sc.spawn(move || {
                        part.iter()
                            .filter(|(_, path)| {
                                // Class is 0xCCSSPP: network controllers are base class 2.
                                read_hex(&path.join("class")).is_some_and(|c| c >> 16 == 0x02)
                            })
                            .filter_map(|(address, path)| {
                                Some((read_device(*address, path)?, path.clone()))
                            })
                            .collect::<Vec<_>>()
                    })
                })
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        devices.sort_by_key(|(d, _)| d.address);
        // VF index and PF name come from the PF's virtfnN links: read each PF once.
        let mut vf_of: HashMap<PciAddress, VfOf> = HashMap::new();
        for (d, path) in &devices {
            let Some(s) = &d.sriov else { continue };
            if s.num_vfs == 0 {
                continue;
            }
            for index in 0..s.num_vfs.max(s.total_vfs) {
                let Some(vf) = link_name(&path.join(format!("virtfn{index}")))
                    .and_then(|n| n.parse::<PciAddress>().ok())
                else {
                    continue;
                };
                vf_of.insert(
                    vf,
                    VfOf {
                        pf: d.address,
                        index,
                        pf_netdev: d.netdevs.first().cloned(),
                    },
                );
            }
        }
        let mut out: Vec<PciNetDevice> = devices
            .into_iter()
            .map(|(mut d, path)| {
                d.vf_of = vf_of.remove(&d.address).or_else(|| {
                    // A VF whose PF is not a network device we listed (or whose link
                    // list we could not read): still a VF, index unknown.
                    let pf = link_name(&path.join("physfn"))?.parse().ok()?;
                    Some(VfOf {
                        pf,
                        index: u32::MAX,
                        pf_netdev: None,
                    })
                });
                d
            })
            .collect();
        // A VF without a netdev (vfio-pci, unbound) has its PF's link type, as
        // linkTypes selectors expect.
        let pf_link: HashMap<PciAddress, String> = out
            .iter()
            .filter_map(|d| Some((d.address, d.link_type.clone()?)))
            .collect();
        for d in &mut out {
            if d.link_type.is_none() {
                d.link_type = d.vf_of.as_ref().and_then(|v| pf_link.get(&v.pf).cloned());
            }
        }
        out.sort_by_key(|d| d.address);
        Ok(out)
    }
}

/// `net/` of the device, or of its virtio child (virtio-net puts its netdev under
/// `virtioN/net/`).
fn net_dir(path: &Path) -> PathBuf {
    let direct = path.join("net");
    if direct.is_dir() {
        return direct;
    }
    std::fs::read_dir(path)
        .into_iter()
        .flatten()
        .flatten()
        .find(|e| e.file_name().to_string_lossy().starts_with("virtio"))
        .map(|e| e.path().join("net"))
        .filter(|p| p.is_dir())
        .unwrap_or(direct)
}

fn read_device(address: PciAddress, path: &Path) -> Option<PciNetDevice> {
    let vendor = read_hex(&path.join("vendor"))? as u16;
    let device = read_hex(&path.join("device"))? as u16;
    let net_dir = net_dir(path);
    let mut netdevs: Vec<String> = std::fs::read_dir(&net_dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    netdevs.sort();
    let link_type = netdevs.first().and_then(|n| {
        read_trimmed(&net_dir.join(n).join("type"))?
            .parse()
            .ok()
            .map(link_type_name)
    });
    let numa_node = read_trimmed(&path.join("numa_node"))
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| *n >= 0)
        .map(|n| n as u32);
    let iommu_group = link_name(&path.join("iommu_group")).and_then(|g| g.parse().ok());
    let sriov = read_trimmed(&path.join("sriov_totalvfs"))
        .and_then(|t| t.parse::<u32>().ok())
        .filter(|t| *t > 0)
        .map(|total_vfs| SriovState {
            total_vfs,
            num_vfs: read_trimmed(&path.join("sriov_numvfs"))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0),
        });
    Some(PciNetDevice {
        address,
        vendor,
        device,
        driver: link_name(&path.join("driver")),
        netdevs,
        link_type,
        numa_node,
        iommu_group,
        sriov,
        vf_of: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fixture::{FixtureSysfs, Pf};

    #[test]
    fn finds_pfs_and_vfs_with_their_links() {
        let fx = FixtureSysfs::new();
        fx.add_pf(&Pf {
            address: "0000:3b:00.0",
            netdev: "ens1f0",
            numa: 1,
            total_vfs: 7,
            vfs: 3,
            vf_driver: Some("igbvf"),
            ..Pf::igb()
        });
        // An unbound VF and a vfio one on another PF; a non-network device.
        fx.add_pf(&Pf {
            address: "0000:5e:00.0",
            netdev: "ens2f0",
            numa: -1,
            vfs: 2,
            ..Pf::igb()
        });
        fx.unbind("0000:5e:10.0");
        fx.bind("0000:5e:10.2", "vfio-pci");
        fx.add_other("0000:00:1f.2", 0x010601);

        let devs = Sysfs::new(fx.root()).discover().unwrap();
        assert_eq!(devs.len(), 2 + 3 + 2, "{devs:#?}");
        let pf = &devs[0];
        assert_eq!(pf.address.to_string(), "0000:3b:00.0");
        assert_eq!((pf.vendor, pf.device), (0x8086, 0x10c9));
        assert_eq!(pf.driver.as_deref(), Some("igb"));
        assert_eq!(pf.netdevs, ["ens1f0"]);
        assert_eq!(pf.link_type.as_deref(), Some("ether"));
        assert_eq!(pf.numa_node, Some(1));
        assert_eq!(
            pf.sriov,
            Some(SriovState {
                total_vfs: 7,
                num_vfs: 3
            })
        );
        assert!(pf.has_vfs_enabled() && !pf.is_vf());

        let vf2 = devs
            .iter()
            .find(|d| d.address.to_string() == "0000:3b:10.4")
            .unwrap();
        assert_eq!((vf2.vendor, vf2.device), (0x8086, 0x10ca));
        let of = vf2.vf_of.as_ref().unwrap();
        assert_eq!((of.pf.to_string().as_str(), of.index), ("0000:3b:00.0", 2));
        assert_eq!(of.pf_netdev.as_deref(), Some("ens1f0"));
        assert_eq!(vf2.driver.as_deref(), Some("igbvf"));
        assert_eq!(vf2.netdevs.len(), 1);
        assert!(vf2.iommu_group.is_some());
        assert_eq!(vf2.health(), Ok(()));

        let unbound = devs
            .iter()
            .find(|d| d.address.to_string() == "0000:5e:10.0")
            .unwrap();
        assert_eq!(unbound.driver, None);
        assert_eq!(unbound.numa_node, None);
        assert!(unbound.health().unwrap_err().contains("no driver"));
        let vfio = devs
            .iter()
            .find(|d| d.address.to_string() == "0000:5e:10.2")
            .unwrap();
        assert_eq!(vfio.driver.as_deref(), Some("vfio-pci"));
        assert!(vfio.netdevs.is_empty());
        assert_eq!(vfio.health(), Ok(()));
        assert_eq!(vfio.vf_of.as_ref().unwrap().index, 1);
        assert_eq!(
            vfio.link_type.as_deref(),
            Some("ether"),
            "inherited from the PF"
        );
    }

    #[test]
    fn one_device_by_address() {
        let fx = FixtureSysfs::new();
        fx.add_pf(&Pf {
            address: "0000:3b:00.0",
            netdev: "ens1f0",
            vfs: 3,
            ..Pf::igb()
        });
        let s = Sysfs::new(fx.root());
        let vf = s.device("0000:3b:10.4".parse().unwrap()).unwrap();
        let of = vf.vf_of.unwrap();
        assert_eq!(
            (
                of.pf.to_string().as_str(),
                of.index,
                of.pf_netdev.as_deref()
            ),
            ("0000:3b:00.0", 2, Some("ens1f0"))
        );
        assert!(s
            .device("0000:3b:00.0".parse().unwrap())
            .unwrap()
            .vf_of
            .is_none());
        assert!(s.device("0000:99:00.0".parse().unwrap()).is_none());
    }

    #[test]
    fn a_missing_tree_is_an_error_naming_it() {
        let err = Sysfs::new("/nonexistent-sysfs").discover().unwrap_err();
        assert!(
            err.to_string()
                .contains("/nonexistent-sysfs/bus/pci/devices"),
            "{err}"
        );
    }
}
