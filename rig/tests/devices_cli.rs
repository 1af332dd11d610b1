//! `trellis devices` on fixture sysfs trees: the inventory, pools, JSON, bad configs.

use std::process::Command;
use trellis_devices::fixture::{FixtureSysfs, Pf};

fn devices(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(trellis_rig::bins::trellis())
        .arg("devices")
        .args(args)
        .env("RUST_BACKTRACE", "0")
        .output()
        .expect("run trellis devices");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn inventory_and_pools_from_a_fixture_tree() {
    let fx = FixtureSysfs::new();
    fx.add_pf(&Pf {
        address: "0000:3b:00.0",
        netdev: "ens1f0",
        numa: 0,
        vfs: 3,
        ..Pf::igb()
    });
    fx.add_pf(&Pf {
        address: "0000:5e:00.0",
        netdev: "ens2f0",
        numa: 1,
        vfs: 2,
        ..Pf::igb()
    });
    fx.bind("0000:5e:10.0", "vfio-pci");
    fx.unbind("0000:5e:10.2");
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        r#"{"resourceList":[
            {"resourceName":"dpdk","resourcePrefix":"trellis.dev","selectors":{"drivers":["vfio-pci"]}},
            {"resourceName":"igbvf","selectors":{"devices":["10ca"],"pfNames":["ens1f0#0-1","ens2f0"]}}]}"#,
    )
    .unwrap();
    let root = fx.root().to_str().unwrap();
    let cfg_path = cfg.path().to_str().unwrap();

    let (ok, table, err) = devices(&["--sysfs-root", root, "--device-config", cfg_path]);
    assert!(ok, "{err}");
    let line = |addr: &str| {
        table
            .lines()
            .find(|l| l.starts_with(addr))
            .unwrap_or_else(|| panic!("{addr} missing:\n{table}"))
    };
    assert!(line("0000:3b:00.0").contains("PF 3/7 VFs"), "{table}");
    assert!(line("0000:3b:10.0").contains("intel.com/igbvf"), "{table}");
    assert!(line("0000:3b:10.2").contains("VF 1 of ens1f0"), "{table}");
    // VF 2 is outside the ens1f0#0-1 range.
    assert!(line("0000:3b:10.4").contains("  -  "), "{table}");
    assert!(
        line("0000:5e:10.0").contains("trellis.dev/dpdk")
            && line("0000:5e:10.0").contains("vfio-pci"),
        "{table}"
    );
    assert!(
        line("0000:5e:10.2").contains("unhealthy: no driver bound"),
        "{table}"
    );
    assert!(
        line("0000:3b:10.0").contains("Intel Corporation 82576 Virtual Function"),
        "{table}"
    );

    let (ok, json, err) = devices(&["--sysfs-root", root, "--device-config", cfg_path, "--json"]);
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let rows = v.as_array().unwrap();
    assert_eq!(rows.len(), 2 + 3 + 2);
    let vf = rows.iter().find(|r| r["id"] == "0000:5e:10.0").unwrap();
    assert_eq!(vf["driver"], "vfio-pci");
    assert_eq!(vf["numa_node"], 1);
    assert_eq!(vf["vendor"], "8086");
    assert_eq!(vf["device"], "10ca");
    assert_eq!(vf["pool"], "trellis.dev/dpdk");
    assert_eq!(vf["vf_of"]["pf"], "0000:5e:00.0");
    assert!(vf["iommu_group"].as_u64().is_some());
}

#[test]
fn bad_config_and_missing_tree_are_named() {
    let fx = FixtureSysfs::new();
    let cfg = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        cfg.path(),
        r#"{"resourceList":[{"resourceName":"a","selectors":{"pfNames":["ens1f0#3-1"]}}]}"#,
    )
    .unwrap();
    let (ok, _, err) = devices(&[
        "--sysfs-root",
        fx.root().to_str().unwrap(),
        "--device-config",
        cfg.path().to_str().unwrap(),
    ]);
    assert!(!ok);
    assert!(
        err.contains(cfg.path().to_str().unwrap())
            && err.contains("resourceList[0] (a).selectors.pfNames[0]")
            && err.contains("runs backwards"),
        "{err}"
    );
    let (ok, _, err) = devices(&["--sysfs-root", "/nonexistent-sysfs"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent-sysfs/bus/pci/devices"), "{err}");
}
