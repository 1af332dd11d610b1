//! What kubelet is told: the device list, the preferred allocation, and what a
//! container gets for the devices allocated to it.

use crate::api::deviceplugin as dp;
use crate::config::{ResourceConfig, ResourceKind};
use crate::pool::{DeviceKind, PoolDevice};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use trellis_devices::sysfs::VFIO_DRIVER;

pub const HEALTHY: &str = "Healthy";
pub const UNHEALTHY: &str = "Unhealthy";

/// Where a pod finds vhost-user sockets: `TRELLIS_VHOST_USER_<PREFIX>_<NAME>`.
pub fn vhost_env_name(r: &ResourceConfig) -> String {
    r.env_name()
        .replacen("PCIDEVICE_", "TRELLIS_VHOST_USER_", 1)
}

/// The ListAndWatch list.
pub fn device_list(resource: &ResourceConfig, devices: &[PoolDevice]) -> Vec<dp::Device> {
    devices
        .iter()
        .map(|d| dp::Device {
            id: d.id.clone(),
            health: if d.health.is_ok() { HEALTHY } else { UNHEALTHY }.into(),
            topology: d.numa_node.filter(|_| !resource.exclude_topology).map(|n| {
                dp::TopologyInfo {
                    nodes: vec![dp::NumaNode { id: n as i64 }],
                }
            }),
        })
        .collect()
}

fn pf_of(d: &PoolDevice) -> String {
    match &d.kind {
        DeviceKind::Pci(p) => p
            .vf_of
            .as_ref()
            .map(|v| v.pf.to_string())
            .unwrap_or_else(|| p.address.to_string()),
        DeviceKind::VhostUser(s) => s.dir().display().to_string(),
    }
}

/// `size` devices out of `available`, keeping `must_include`: on one NUMA node
/// where possible (the must-include devices' node, else the one with the most
/// free devices), then from as few PFs as possible.
pub fn preferred(
    devices: &[PoolDevice],
    available: &[String],
    must_include: &[String],
    size: usize,
) -> Vec<String> {
    let by_id: HashMap<&str, &PoolDevice> = devices.iter().map(|d| (d.id.as_str(), d)).collect();
    let mut chosen: Vec<String> = must_include.to_vec();
    let must: BTreeSet<&str> = must_include.iter().map(String::as_str).collect();
    let candidates: Vec<&PoolDevice> = available
        .iter()
        .filter(|id| !must.contains(id.as_str()))
        .filter_map(|id| by_id.get(id.as_str()).copied())
        .filter(|d| d.health.is_ok())
        .collect();
    let want = size.saturating_sub(chosen.len());
    if want == 0 {
        chosen.truncate(size.max(must_include.len()));
        return chosen;
    }
    let mut per_numa: BTreeMap<Option<u32>, usize> = BTreeMap::new();
    for d in &candidates {
        *per_numa.entry(d.numa_node).or_default() += 1;
    }
    let must_numa = must_include
        .iter()
        .filter_map(|id| by_id.get(id.as_str()))
        .find_map(|d| d.numa_node);
    let numa = must_numa.map(Some).unwrap_or_else(|| {
        // Most free devices wins; ties go to the lowest node.
        per_numa
            .iter()
            .max_by(|a, b| a.1.cmp(b.1).then(b.0.cmp(a.0)))
            .map(|(n, _)| *n)
            .unwrap_or(None)
    });
    let must_pfs: BTreeSet<String> = must_include
        .iter()
        .filter_map(|id| by_id.get(id.as_str()))
        .map(|d| pf_of(d))
        .collect();
    let mut per_pf: HashMap<String, usize> = HashMap::new();
    for d in candidates.iter().filter(|d| d.numa_node == numa) {
        *per_pf.entry(pf_of(d)).or_default() += 1;
    }
    let mut ranked = candidates;
    ranked.sort_by(|a, b| {
        let key = |d: &PoolDevice| {
            let pf = pf_of(d);
            (
                d.numa_node != numa,
                !must_pfs.contains(&pf),
                std::cmp::Reverse(per_pf.get(&pf).copied().unwrap_or(0)),
                pf,
                d.id.clone(),
            )
        };
        key(a).cmp(&key(b))
    });
    chosen.extend(ranked.into_iter().take(want).map(|d| d.id.clone()));
    chosen
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AllocateError {
    #[error("device {id} is not in pool {pool}")]
    Unknown { id: String, pool: String },
    #[error("device {id} of pool {pool} is unhealthy: {why}")]
    Unhealthy {
        id: String,
        pool: String,
        why: String,
    },
    #[error("no devices requested from pool {0}")]
    Empty(String),
}

/// What one container gets for `ids`: the `PCIDEVICE_*` env listing them, vfio
/// device nodes, vhost-user socket directories mounted at the pool's mount path.
pub fn container_response(
    resource: &ResourceConfig,
    devices: &[PoolDevice],
    ids: &[String],
) -> Result<dp::ContainerAllocateResponse, AllocateError> {
    let pool = resource.full_name();
    if ids.is_empty() {
        return Err(AllocateError::Empty(pool));
    }
    let mut resp = dp::ContainerAllocateResponse::default();
    let mut vfio_groups = BTreeSet::new();
    let mut socket_dirs: Vec<PathBuf> = Vec::new();
    let mut sockets = Vec::new();
    for id in ids {
        let d = devices
            .iter()
            .find(|d| &d.id == id)
            .ok_or_else(|| AllocateError::Unknown {
                id: id.clone(),
                pool: pool.clone(),
            })?;
        if let Err(why) = &d.health {
            return Err(AllocateError::Unhealthy {
                id: id.clone(),
                pool: pool.clone(),
                why: why.clone(),
            });
        }
        match &d.kind {
            DeviceKind::Pci(p) if p.driver.as_deref() == Some(VFIO_DRIVER) => {
                if let Some(g) = p.iommu_group {
                    vfio_groups.insert(g);
                }
            }
            DeviceKind::Pci(_) => {}
            DeviceKind::VhostUser(s) => {
                let dir = s.dir().to_path_buf();
                let i = match socket_dirs.iter().position(|d| *d == dir) {
                    Some(i) => i,
                    None => {
                        socket_dirs.push(dir);
                        socket_dirs.len() - 1
                    }
                };
                sockets.push((i, s.file_name()));
            }
        }
    }
    resp.envs.insert(resource.env_name(), ids.join(","));
    if !vfio_groups.is_empty() {
        let spec = |p: String| dp::DeviceSpec {
            container_path: p.clone(),
            host_path: p,
            permissions: "rw".into(),
        };
        resp.devices.push(spec("/dev/vfio/vfio".into()));
        for g in vfio_groups {
            resp.devices.push(spec(format!("/dev/vfio/{g}")));
        }
    }
    if let ResourceKind::VhostUser { mount_path, .. } = &resource.kind {
        // One directory: at the mount path itself; several: one subdirectory each.
        let in_container = |i: usize| {
            if socket_dirs.len() == 1 {
                mount_path.clone()
            } else {
                mount_path.join(i.to_string())
            }
        };
        for (i, dir) in socket_dirs.iter().enumerate() {
            resp.mounts.push(dp::Mount {
                container_path: in_container(i).display().to_string(),
                host_path: dir.display().to_string(),
                read_only: false,
            });
        }
        let paths: Vec<String> = sockets
            .iter()
            .map(|(i, name)| in_container(*i).join(name).display().to_string())
            .collect();
        resp.envs.insert(vhost_env_name(resource), paths.join(","));
    }
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DeviceConfig, DEFAULT_PREFIX};
    use crate::pool::{build, Inventory};
    use trellis_devices::fixture::{FixtureSysfs, Pf};
    use trellis_devices::sysfs::Sysfs;

    fn pool(fx: &FixtureSysfs) -> (ResourceConfig, Vec<PoolDevice>) {
        let c = DeviceConfig::parse(
            r#"{"resourceList":[{"resourceName":"vf","selectors":{"devices":["10ca"]}}]}"#,
            DEFAULT_PREFIX,
        )
        .unwrap();
        let inv = Inventory {
            pci: Sysfs::new(fx.root()).discover().unwrap(),
        };
        let p = build(&c, &inv).remove(0);
        (p.resource, p.devices)
    }

    fn two_numa() -> FixtureSysfs {
        let fx = FixtureSysfs::new();
        // NUMA 0: PF a with 2 VFs, PF b with 4. NUMA 1: PF c with 3.
        fx.add_pf(&Pf {
            address: "0000:3b:00.0",
            netdev: "a",
            numa: 0,
            vfs: 2,
            ..Pf::igb()
        });
        fx.add_pf(&Pf {
            address: "0000:3c:00.0",
            netdev: "b",
            numa: 0,
            vfs: 4,
            ..Pf::igb()
        });
        fx.add_pf(&Pf {
            address: "0000:af:00.0",
            netdev: "c",
            numa: 1,
            vfs: 3,
            ..Pf::igb()
        });
        fx
    }

    fn ids(devs: &[PoolDevice]) -> Vec<String> {
        devs.iter().map(|d| d.id.clone()).collect()
    }

    #[test]
    fn preferred_packs_one_numa_node_then_fewest_pfs() {
        let fx = two_numa();
        let (_, devs) = pool(&fx);
        let all = ids(&devs);
        // NUMA 0 has the most free; PF b the most of those.
        let p = preferred(&devs, &all, &[], 3);
        assert_eq!(p, ["0000:3c:10.0", "0000:3c:10.2", "0000:3c:10.4"]);
        // A must-include device pins its node and PF first.
        let p = preferred(&devs, &all, &["0000:af:10.2".into()], 3);
        assert_eq!(p, ["0000:af:10.2", "0000:af:10.0", "0000:af:10.4"]);
        // More than one node has: the rest spills over.
        let p = preferred(&devs, &all, &["0000:af:10.2".into()], 5);
        assert_eq!(p.len(), 5);
        assert!(p[..3].iter().all(|id| id.starts_with("0000:af")), "{p:?}");
        // Only what is available, and never an unknown ID.
        let avail = vec![
            "0000:3b:10.0".to_string(),
            "0000:af:10.0".into(),
            "bogus".into(),
        ];
        assert_eq!(preferred(&devs, &avail, &[], 2).len(), 2);
    }

    #[test]
    fn allocate_gives_env_vfio_nodes_and_names_bad_ids() {
        let fx = two_numa();
        fx.bind("0000:3b:10.0", "vfio-pci");
        fx.unbind("0000:3b:10.2");
        let (r, devs) = pool(&fx);
        let resp =
            container_response(&r, &devs, &["0000:3b:10.0".into(), "0000:3c:10.0".into()]).unwrap();
        assert_eq!(
            resp.envs["PCIDEVICE_INTEL_COM_VF"],
            "0000:3b:10.0,0000:3c:10.0"
        );
        let g = devs.iter().find(|d| d.id == "0000:3b:10.0").unwrap();
        let DeviceKind::Pci(p) = &g.kind else {
            panic!()
        };
        let paths: Vec<&str> = resp.devices.iter().map(|d| d.host_path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "/dev/vfio/vfio".to_string(),
                format!("/dev/vfio/{}", p.iommu_group.unwrap())
            ]
        );
        assert!(resp.mounts.is_empty());
        assert_eq!(
            container_response(&r, &devs, &["0000:99:10.0".into()])
                .unwrap_err()
                .to_string(),
            "device 0000:99:10.0 is not in pool intel.com/vf"
        );
        assert!(container_response(&r, &devs, &["0000:3b:10.2".into()])
            .unwrap_err()
            .to_string()
            .contains("is unhealthy: no driver bound"));
    }

    #[test]
    fn vhost_sockets_are_mounted_with_their_paths_in_env() {
        let d1 = tempfile::tempdir().unwrap();
        let d2 = tempfile::tempdir().unwrap();
        let _l = [
            std::os::unix::net::UnixListener::bind(d1.path().join("vhu0")).unwrap(),
            std::os::unix::net::UnixListener::bind(d1.path().join("vhu1")).unwrap(),
            std::os::unix::net::UnixListener::bind(d2.path().join("vhu9")).unwrap(),
        ];
        let c = DeviceConfig::parse(
            &format!(
                r#"{{"resourceList":[{{"resourceName":"vhu","deviceType":"vhostUser","mountPath":"/run/vhu",
                    "selectors":{{"socketDirs":[{:?},{:?}]}}}}]}}"#,
                d1.path(),
                d2.path()
            ),
            DEFAULT_PREFIX,
        )
        .unwrap();
        let p = build(&c, &Inventory::default()).remove(0);
        assert_eq!(p.devices.len(), 3);
        let one = |ids: &[&str]| {
            let ids: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
            container_response(&p.resource, &p.devices, &ids).unwrap()
        };
        let s0 = d1.path().join("vhu0").display().to_string();
        let s1 = d1.path().join("vhu1").display().to_string();
        let s9 = d2.path().join("vhu9").display().to_string();
        let r = one(&[&s0, &s1]);
        assert_eq!(r.mounts.len(), 1);
        assert_eq!(r.mounts[0].host_path, d1.path().display().to_string());
        assert_eq!(r.mounts[0].container_path, "/run/vhu");
        assert_eq!(
            r.envs["TRELLIS_VHOST_USER_INTEL_COM_VHU"],
            "/run/vhu/vhu0,/run/vhu/vhu1"
        );
        assert_eq!(r.envs["PCIDEVICE_INTEL_COM_VHU"], format!("{s0},{s1}"));
        let r = one(&[&s0, &s9]);
        assert_eq!(r.mounts.len(), 2);
        assert_eq!(
            r.envs["TRELLIS_VHOST_USER_INTEL_COM_VHU"],
            "/run/vhu/0/vhu0,/run/vhu/1/vhu9"
        );
    }

    #[test]
    fn device_list_carries_health_and_numa_unless_excluded() {
        let fx = two_numa();
        fx.unbind("0000:af:10.0");
        let (mut r, devs) = pool(&fx);
        let l = device_list(&r, &devs);
        let af = l.iter().find(|d| d.id == "0000:af:10.0").unwrap();
        assert_eq!(af.health, UNHEALTHY);
        assert_eq!(af.topology.as_ref().unwrap().nodes[0].id, 1);
        r.exclude_topology = true;
        assert!(device_list(&r, &devs).iter().all(|d| d.topology.is_none()));
    }
}
