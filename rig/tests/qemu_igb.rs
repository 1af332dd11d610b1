//! Real SR-IOV VFs: QEMU's emulated 82576 (igb) in a guest. `trellis devices` reports
//! the PF and, once `sriov_numvfs` is set, its VFs with their IDs, driver and pool;
//! the agent's device plugin, watched by the test kubelet, follows `sriov_numvfs`;
//! a VF bound to vfio-pci moves to the vfio pool.

use serde_json::Value;
use std::time::Duration;
use trellis_rig::qemu::{GuestKernel, Initramfs};

const POOLS: &str = r#"{"resourceList":[
    {"resourceName":"igbvf","resourcePrefix":"trellis.dev","selectors":{"vendors":["8086"],"devices":["10ca"],"drivers":["igbvf"]}},
    {"resourceName":"igb_dpdk","resourcePrefix":"trellis.dev","selectors":{"devices":["10ca"],"drivers":["vfio-pci"]}},
    {"resourceName":"pf","resourcePrefix":"trellis.dev","selectors":{"devices":["10c9"]}}]}"#;

const AGENT: &str = r#"socket = "/run/trellis/cni.sock"
state_dir = "/run/trellis/state"
default_network = "/etc/trellis/default.conflist"
[dataplane]
enabled = false
[networks]
source = "files"
dir = "/etc/trellis/networks"
[devices]
config = "/etc/trellis/pools.json"
poll_interval_ms = 300
"#;

/// The guest's test: devices before and after VFs, the plugin following along.
const SCRIPT: &str = r#"
set -x
PF=$(ls /sys/bus/pci/drivers/igb | grep '^0000:')
PFDIR=/sys/bus/pci/devices/$PF
ip link set "$(ls $PFDIR/net)" up
echo "=== devices-0"
trellis devices --device-config /etc/trellis/pools.json --json
mkdir -p /var/lib/kubelet/device-plugins /etc/trellis/networks
trellis-kubelet-probe /var/lib/kubelet/device-plugins trellis.dev/igbvf 40 > /tmp/probe.log 2>&1 &
trellis agent --config /etc/trellis/agent.toml > /tmp/agent.log 2>&1 &
sleep 4
echo 2 > $PFDIR/sriov_numvfs
sleep 4
echo "=== devices-2"
trellis devices --device-config /etc/trellis/pools.json --json
echo 0 > $PFDIR/sriov_numvfs
echo 4 > $PFDIR/sriov_numvfs
sleep 4
VF=$(basename "$(readlink $PFDIR/virtfn3)")
echo vfio-pci > /sys/bus/pci/devices/$VF/driver_override
echo "$VF" > /sys/bus/pci/devices/$VF/driver/unbind
echo "$VF" > /sys/bus/pci/drivers_probe
sleep 4
echo "=== devices-4"
trellis devices --device-config /etc/trellis/pools.json --json
echo "=== vfio"
ls /dev/vfio
echo "=== probe"
cat /tmp/probe.log
echo "=== agent"
cat /tmp/agent.log
echo "=== end"
"#;

fn rows(json: &str) -> Vec<Value> {
    // The console may interleave kernel lines; the JSON array is the rest.
    let start = json
        .find('[')
        .unwrap_or_else(|| panic!("no JSON in {json}"));
    let end = json.rfind(']').unwrap();
    serde_json::from_str::<Value>(&json[start..=end])
        .unwrap_or_else(|e| panic!("{e}: {json}"))
        .as_array()
        .unwrap()
        .clone()
}

#[test]
fn igb_vfs_are_discovered_pooled_and_followed() {
    trellis_rig::require_root!();
    let Some(kernel) = GuestKernel::find() else {
        panic!(
            "no guest kernel: run scripts/setup.sh (it unpacks one to /var/cache/trellis/guest)"
        );
    };
    let img = Initramfs::new(&kernel);
    img.program(trellis_rig::bins::trellis(), "trellis");
    img.program(
        trellis_rig::bins::path("trellis-kubelet-probe"),
        "trellis-kubelet-probe",
    );
    img.text("etc/trellis/pools.json", POOLS, 0o644);
    img.text("etc/trellis/agent.toml", AGENT, 0o644);
    img.text(
        "etc/trellis/default.conflist",
        r#"{"cniVersion":"1.0.0","name":"none","plugins":[{"type":"loopback"}]}"#,
        0o644,
    );
    img.text("test.sh", SCRIPT, 0o755);
    let run = img.boot(&kernel, Duration::from_secs(600));
    let console = &run.console;
    assert_eq!(run.script_status(), Some(0), "{console}");

    // Before: the PF alone, SR-IOV capable with 7 VFs possible, offered itself.
    let before = rows(&run.section("devices-0").expect(console));
    assert_eq!(before.len(), 1, "{before:#?}");
    let pf = &before[0];
    assert_eq!(
        (pf["vendor"].as_str(), pf["device"].as_str()),
        (Some("8086"), Some("10c9"))
    );
    assert_eq!(pf["driver"], "igb");
    assert_eq!(pf["sriov"]["total_vfs"], 7);
    assert_eq!(pf["pool"], "trellis.dev/pf");
    assert!(pf["device_name"].as_str().unwrap().contains("82576"));

    // Two VFs: igbvf netdevs in the igbvf pool; the PF is no longer offered.
    let two = rows(&run.section("devices-2").expect(console));
    assert_eq!(two.len(), 3, "{two:#?}");
    assert!(two[0]["pool"].is_null() && two[0]["sriov"]["num_vfs"] == 2);
    for (i, vf) in two[1..].iter().enumerate() {
        assert_eq!(
            (vf["vendor"].as_str(), vf["device"].as_str()),
            (Some("8086"), Some("10ca"))
        );
        assert_eq!(vf["driver"], "igbvf");
        assert_eq!(vf["vf_of"]["index"], i);
        assert_eq!(vf["vf_of"]["pf"], pf["address"]);
        assert_eq!(vf["pool"], "trellis.dev/igbvf");
        assert_eq!(vf["health"], "ok");
        assert_eq!(vf["netdevs"].as_array().unwrap().len(), 1);
    }

    // Four VFs, the last bound to vfio-pci: it moves to the vfio pool.
    let four = rows(&run.section("devices-4").expect(console));
    assert_eq!(four.len(), 5, "{four:#?}");
    let vfio = &four[4];
    assert_eq!(vfio["driver"], "vfio-pci");
    assert_eq!(vfio["pool"], "trellis.dev/igb_dpdk");
    assert_eq!(vfio["health"], "ok");
    let group = vfio["iommu_group"].as_u64().expect("IOMMU group");
    let dev_vfio = run.section("vfio").expect(console);
    assert!(
        dev_vfio.split_whitespace().any(|g| g == group.to_string()),
        "{dev_vfio}"
    );
    assert!(four[1..4].iter().all(|v| v["pool"] == "trellis.dev/igbvf"));

    // The device plugin registered and its ListAndWatch followed sriov_numvfs:
    // 0 devices, then 2, then 4 (VFs may show up one by one), then 3 (the vfio
    // one left for the other pool).
    let probe = run.section("probe").expect(console);
    let sizes: Vec<usize> = probe
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| Some(v["devices"].as_array()?.len()))
        .collect();
    let why = format!(
        "ListAndWatch sizes {sizes:?}\n{probe}\n{}",
        run.section("agent").unwrap_or_default()
    );
    assert_eq!(sizes.first(), Some(&0), "{why}");
    let two_at = sizes.iter().position(|n| *n == 2).expect(&why);
    let four_at = sizes[two_at..].iter().position(|n| *n == 4).expect(&why) + two_at;
    assert_eq!(sizes[four_at..].last(), Some(&3), "{why}");
}
