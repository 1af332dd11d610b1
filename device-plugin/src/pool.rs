//! Resource pools: the devices each configured resource offers. A device goes to the
//! first resource (in config order) whose selectors take it, so kubelet never hands
//! the same device out twice.

use crate::config::{DeviceConfig, NetSelector, ResourceConfig, ResourceKind};
use crate::vhost::VhostSocket;
use serde::Serialize;
use trellis_devices::sysfs::PciNetDevice;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum DeviceKind {
    Pci(PciNetDevice),
    VhostUser(VhostSocket),
}

/// One device as kubelet sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PoolDevice {
    /// The device ID kubelet allocates: the PCI address or the socket path.
    pub id: String,
    /// In the JSON already, as the PCI device's own.
    #[serde(skip)]
    pub numa_node: Option<u32>,
    /// `Err(why)` when unhealthy.
    #[serde(serialize_with = "health_json")]
    pub health: Result<(), String>,
    #[serde(flatten)]
    pub kind: DeviceKind,
}

/// `"ok"`, or the reason it is not.
fn health_json<S: serde::Serializer>(h: &Result<(), String>, s: S) -> Result<S::Ok, S::Error> {
    match h {
        Ok(()) => s.serialize_str("ok"),
        Err(e) => s.serialize_str(&format!("unhealthy: {e}")),
    }
}

#[derive(Debug, Clone)]
pub struct Pool {
    pub resource: ResourceConfig,
    pub devices: Vec<PoolDevice>,
}

/// Everything discovered on the node.
#[derive(Debug, Clone, Default)]
pub struct Inventory {
    pub pci: Vec<PciNetDevice>,
}

fn selector_takes(s: &NetSelector, d: &PciNetDevice) -> bool {
    let pf_name = d
        .vf_of
        .as_ref()
        .map(|v| (v.pf_netdev.clone(), v.index))
        .unwrap_or_else(|| (d.netdevs.first().cloned(), 0));
    let root = d.vf_of.as_ref().map(|v| v.pf).unwrap_or(d.address);
    (s.vendors.is_empty() || s.vendors.contains(&d.vendor))
        && (s.devices.is_empty() || s.devices.contains(&d.device))
        && (s.drivers.is_empty() || d.driver.as_ref().is_some_and(|x| s.drivers.contains(x)))
        && (s.pf_names.is_empty()
            || pf_name.0.as_deref().is_some_and(|pf| {
                s.pf_names.iter().any(|p| {
                    if d.is_vf() {
                        p.matches(pf, pf_name.1)
                    } else {
                        // A PF itself: by its own name, when no VF range is given.
                        p.pf == pf && p.vfs.is_none()
                    }
                })
            }))
        && (s.root_devices.is_empty() || s.root_devices.contains(&root))
        && (s.link_types.is_empty()
            || d.link_type
                .as_ref()
                .is_some_and(|l| s.link_types.iter().any(|x| x.eq_ignore_ascii_case(l))))
        && (s.pci_addresses.is_empty() || s.pci_addresses.contains(&d.address))
}

pub fn pci_device(d: &PciNetDevice) -> PoolDevice {
    PoolDevice {
        id: d.address.to_string(),
        numa_node: d.numa_node,
        health: d.health(),
        kind: DeviceKind::Pci(d.clone()),
    }
}

pub fn vhost_device(s: &VhostSocket) -> PoolDevice {
    PoolDevice {
        id: s.path.display().to_string(),
        numa_node: None,
        health: s.health(),
        kind: DeviceKind::VhostUser(s.clone()),
    }
}

/// Pools for every configured resource, from what discovery found now.
pub fn build(config: &DeviceConfig, inventory: &Inventory) -> Vec<Pool> {
    let mut taken = std::collections::HashSet::new();
    config
        .resources
        .iter()
        .map(|r| {
            let devices = match &r.kind {
                ResourceKind::NetDevice(selectors) => inventory
                    .pci
                    .iter()
                    .filter(|d| !d.has_vfs_enabled())
                    .filter(|d| selectors.iter().any(|s| selector_takes(s, d)))
                    .filter(|d| taken.insert(d.address.to_string()))
                    .map(pci_device)
                    .collect(),
                ResourceKind::VhostUser { selectors, .. } => crate::vhost::discover(selectors)
                    .iter()
                    .filter(|s| taken.insert(s.path.display().to_string()))
                    .map(vhost_device)
                    .collect(),
            };
            Pool {
                resource: r.clone(),
                devices,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_PREFIX;
    use trellis_devices::fixture::{FixtureSysfs, Pf};
    use trellis_devices::sysfs::Sysfs;

    fn fixture() -> FixtureSysfs {
        let fx = FixtureSysfs::new();
        fx.add_pf(&Pf {
            address: "0000:3b:00.0",
            netdev: "ens1f0",
            numa: 0,
            vfs: 4,
            ..Pf::igb()
        });
        fx.add_pf(&Pf {
            address: "0000:5e:00.0",
            netdev: "ens2f0",
            numa: 1,
            vfs: 2,
            ..Pf::igb()
        });
        fx.bind("0000:5e:10.2", "vfio-pci");
        // A PF with SR-IOV off: offered itself.
        fx.add_pf(&Pf {
            address: "0000:af:00.0",
            netdev: "ens3f0",
            numa: 1,
            vfs: 0,
            ..Pf::igb()
        });
        fx
    }

    fn pools(config: &str, fx: &FixtureSysfs) -> Vec<(String, Vec<String>)> {
        let c = DeviceConfig::parse(config, DEFAULT_PREFIX).unwrap();
        let inv = Inventory {
            pci: Sysfs::new(fx.root()).discover().unwrap(),
        };
        build(&c, &inv)
            .into_iter()
            .map(|p| {
                (
                    p.resource.full_name(),
                    p.devices.into_iter().map(|d| d.id).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn selectors_pick_devices_and_the_first_pool_wins() {
        let fx = fixture();
        let got = pools(
            r#"{"resourceList":[
                {"resourceName":"dpdk","selectors":{"drivers":["vfio-pci"]}},
                {"resourceName":"f0_low","selectors":{"pfNames":["ens1f0#0-1"]}},
                {"resourceName":"vfs","selectors":{"vendors":["8086"],"devices":["10ca"],"linkTypes":["ether"]}},
                {"resourceName":"pf","selectors":{"pfNames":["ens3f0"]}},
                {"resourceName":"by_root","selectors":[{"rootDevices":["0000:5e:00.0"]},{"pciAddresses":["0000:3b:10.6"]}]}
            ]}"#,
            &fx,
        );
        assert_eq!(
            got[0],
            ("intel.com/dpdk".into(), vec!["0000:5e:10.2".into()])
        );
        assert_eq!(got[1].1, ["0000:3b:10.0", "0000:3b:10.2"]);
        assert_eq!(got[2].1, ["0000:3b:10.4", "0000:3b:10.6", "0000:5e:10.0"]);
        // PFs with VFs enabled are never offered; one without is.
        assert_eq!(got[3].1, ["0000:af:00.0"]);
        // Everything it would take is taken already.
        assert!(got[4].1.is_empty(), "{got:?}");
    }

    #[test]
    fn numa_and_health_come_with_each_device() {
        let fx = fixture();
        fx.unbind("0000:3b:10.2");
        let c = DeviceConfig::parse(
            r#"{"resourceList":[{"resourceName":"all","selectors":{"devices":["10ca"]}}]}"#,
            DEFAULT_PREFIX,
        )
        .unwrap();
        let inv = Inventory {
            pci: Sysfs::new(fx.root()).discover().unwrap(),
        };
        let p = &build(&c, &inv)[0];
        let d = |id: &str| p.devices.iter().find(|d| d.id == id).unwrap();
        assert_eq!(d("0000:5e:10.0").numa_node, Some(1));
        assert_eq!(d("0000:3b:10.0").health, Ok(()));
        assert!(d("0000:3b:10.2").health.is_err());
        assert_eq!(d("0000:5e:10.2").health, Ok(()));
    }
}
