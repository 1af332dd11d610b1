//! The node's device inventory as `trellis devices` shows it: every PCI network
//! device and vhost-user socket, with names, topology, health and pool.

use crate::config::DeviceConfig;
use crate::pool::{self, DeviceKind, Inventory, PoolDevice};
use serde::Serialize;
use trellis_devices::sysfs::PciNetDevice;

#[derive(Debug, Clone, Serialize)]
pub struct Row {
    #[serde(flatten)]
    pub device: PoolDevice,
    pub vendor_name: Option<&'static str>,
    pub device_name: Option<&'static str>,
    /// `prefix/name` of the pool that offers it; `None` for devices no pool takes.
    pub pool: Option<String>,
    /// Why it is not offered, when that is not just "no selector matches".
    pub note: Option<String>,
}

/// Rows for every discovered device, the pooled ones tagged with their pool.
pub fn rows(inventory: &Inventory, config: Option<&DeviceConfig>) -> Vec<Row> {
    let pools = config
        .map(|c| pool::build(c, inventory))
        .unwrap_or_default();
    let pool_of = |id: &str| {
        pools
            .iter()
            .find(|p| p.devices.iter().any(|d| d.id == id))
            .map(|p| p.resource.full_name())
    };
    let mut out: Vec<Row> = inventory
        .pci
        .iter()
        .map(|d| {
            let mut device = pool::pci_device(d);
            if d.has_vfs_enabled() {
                device.health = Ok(());
            }
            Row {
                pool: pool_of(&device.id),
                vendor_name: crate::names::vendor_name(d.vendor),
                device_name: crate::names::device_name(d.vendor, d.device),
                note: d
                    .has_vfs_enabled()
                    .then(|| "PF with VFs enabled: its VFs are offered".to_string()),
                device,
            }
        })
        .collect();
    for p in &pools {
        for d in p
            .devices
            .iter()
            .filter(|d| matches!(d.kind, DeviceKind::VhostUser(_)))
        {
            out.push(Row {
                device: d.clone(),
                vendor_name: None,
                device_name: None,
                pool: Some(p.resource.full_name()),
                note: None,
            });
        }
    }
    out
}

fn role(d: &PciNetDevice) -> String {
    match (&d.sriov, &d.vf_of) {
        (_, Some(v)) if v.index == u32::MAX => format!("VF of {}", v.pf),
        (_, Some(v)) => format!(
            "VF {} of {}",
            v.index,
            v.pf_netdev.clone().unwrap_or_else(|| v.pf.to_string())
        ),
        (Some(s), None) => format!("PF {}/{} VFs", s.num_vfs, s.total_vfs),
        (None, None) => "PCI function".into(),
    }
}

/// The columns of the device table (the CLI renders them).
pub const HEADER: [&str; 9] = [
    "DEVICE", "ID", "NAME", "DRIVER", "NETDEV", "NUMA", "ROLE", "POOL", "HEALTH",
];

/// The table's header and one row of cells per device.
pub fn cells(rows: &[Row]) -> (&'static [&'static str], Vec<Vec<String>>) {
    let mut lines = Vec::new();
    for r in rows {
        let health = match &r.device.health {
            Ok(()) => "ok".to_string(),
            Err(e) => format!("unhealthy: {e}"),
        };
        let pool = r
            .pool
            .clone()
            .or_else(|| r.note.clone())
            .unwrap_or_else(|| "-".into());
        let numa = r
            .device
            .numa_node
            .map(|n| n.to_string())
            .unwrap_or_else(|| "-".into());
        lines.push(match &r.device.kind {
            DeviceKind::Pci(d) => vec![
                d.address.to_string(),
                format!("{:04x}:{:04x}", d.vendor, d.device),
                match (r.vendor_name, r.device_name) {
                    (Some(v), Some(n)) => format!("{v} {n}"),
                    (Some(v), None) => v.to_string(),
                    _ => "-".into(),
                },
                d.driver.clone().unwrap_or_else(|| "-".into()),
                if d.netdevs.is_empty() {
                    "-".into()
                } else {
                    d.netdevs.join(",")
                },
                numa,
                role(d),
                pool,
                health,
            ],
            DeviceKind::VhostUser(s) => vec![
                s.path.display().to_string(),
                "vhost-user".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                numa,
                "socket".into(),
                pool,
                health,
            ],
        });
    }
    (&HEADER, lines)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_PREFIX;
    use trellis_devices::fixture::{FixtureSysfs, Pf};
    use trellis_devices::sysfs::Sysfs;

    #[test]
    fn every_device_with_its_pool() {
        let fx = FixtureSysfs::new();
        fx.add_pf(&Pf {
            vfs: 2,
            ..Pf::igb()
        });
        fx.unbind("0000:01:10.2");
        let inv = Inventory {
            pci: Sysfs::new(fx.root()).discover().unwrap(),
        };
        let c = DeviceConfig::parse(
            r#"{"resourceList":[{"resourceName":"igbvf","selectors":{"devices":["10ca"]}}]}"#,
            DEFAULT_PREFIX,
        )
        .unwrap();
        let rows = rows(&inv, Some(&c));
        assert_eq!(rows.len(), 3);
        assert_eq!(rows[0].pool, None);
        assert!(rows[0]
            .note
            .as_deref()
            .unwrap()
            .contains("PF with VFs enabled"));
        assert_eq!(rows[1].pool.as_deref(), Some("intel.com/igbvf"));
        let (header, cells) = cells(&rows);
        assert_eq!(header[0], "DEVICE");
        let line = |i: usize| cells[i].join(" ");
        assert!(
            line(0).contains("8086:10c9")
                && line(0).contains("82576")
                && line(0).contains("PF 2/7 VFs"),
            "{}",
            line(0)
        );
        assert!(
            line(1).contains("VF 0 of enp1s0")
                && line(1).contains("intel.com/igbvf")
                && cells[1][8] == "ok",
            "{}",
            line(1)
        );
        assert!(
            line(2).contains("unhealthy: no driver bound"),
            "{}",
            line(2)
        );
        let json = serde_json::to_value(&rows).unwrap();
        assert_eq!(json[1]["id"], "0000:01:10.0");
        assert_eq!(json[1]["pool"], "intel.com/igbvf");
        assert_eq!(json[1]["type"], "pci");
        assert_eq!(json[1]["health"], "ok");
        assert_eq!(json[1]["vf_of"]["index"], 0);
        assert_eq!(json[2]["health"], "unhealthy: no driver bound");
    }
}
