//! The `sriov` network type with veths standing in for VF netdevs (no SR-IOV on the
//! host; real VFs are in rig/tests/qemu_igb.rs): moved into the pod, renamed, MTU, MAC,
//! IPAM, put back on DEL (also after an agent restart and when the pod netns is gone),
//! devices from the pod's allocation, and the error paths leaving the host as it was.
//! A device reaches a pod only if it is a VF of a pool of the node and, with kubelet
//! there, allocated to that pod: a NAD naming a PF, a plain NIC or another pod's VF is
//! refused.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use trellis_devices::fixture::FixtureSysfs;
use trellis_rig::fake_kubelet::{pod_with_devices, serve_pod_resources};
use trellis_rig::netns::Netns;
use trellis_rig::node::TestNode;
use trellis_rig::require_root;

struct Rig {
    node: TestNode,
    fx: FixtureSysfs,
    /// (PCI address, host netdev name, its original MAC)
    vfs: Vec<(String, String, String)>,
    /// A NIC without SR-IOV (a veth behind it), in pool intel.com/nic.
    nic: (String, String),
}

/// The stand-in VFs' PF (made by the fixture, no netdev).
const PF: &str = "0000:3b:00.0";

/// A word after `key` in `ip -o link show dev <ifname>` (nsenter keeps the host's
/// /sys, so /sys/class/net would show the wrong namespace).
fn link_field(ns: &Netns, ifname: &str, key: &str) -> String {
    let out = ns.sh(&format!("ip -o link show dev {ifname}"));
    let words: Vec<&str> = out.split_whitespace().collect();
    let i = words
        .iter()
        .position(|w| *w == key)
        .unwrap_or_else(|| panic!("no {key} in {out}"));
    words[i + 1].to_string()
}

fn mac_of(ns: &Netns, ifname: &str) -> String {
    link_field(ns, ifname, "link/ether")
}

fn mtu_of(ns: &Netns, ifname: &str) -> String {
    link_field(ns, ifname, "mtu")
}

impl Rig {
    /// A node whose "VFs" are veths in its host netns, listed in a fixture sysfs.
    fn new(n: usize) -> Rig {
        let mut node = TestNode::new();
        let fx = FixtureSysfs::new();
        let mut vfs = Vec::new();
        let veth = |node: &TestNode| {
            let name = trellis_rig::unique("trv");
            node.host.sh(&format!(
                "ip link add {name} type veth peer name {name}p && ip link set {name}p up"
            ));
            name
        };
        for i in 0..n {
            let name = veth(&node);
            let addr = format!("0000:3b:10.{i}");
            fx.add_standin_vf(&addr, &name);
            let mac = mac_of(&node.host, &name);
            vfs.push((addr, name, mac));
        }
        let nic = ("0000:3c:00.0".to_string(), veth(&node));
        fx.add_netdev_device(&nic.0, &nic.1, 0);
        node.top_toml = format!(
            "sysfs_root = {:?}\npod_resources_socket = {:?}\n",
            fx.root(),
            node.path("pod-resources.sock")
        );
        // The node's pools: the VFs, and the plain NIC on its own.
        let pools = node.path("devices.json");
        std::fs::write(
            &pools,
            format!(
                r#"{{"resourceList":[{{"resourceName":"nic","selectors":{{"pciAddresses":["{}"]}}}},
                   {{"resourceName":"vf","selectors":{{"devices":["10ca"]}}}}]}}"#,
                nic.0
            ),
        )
        .unwrap();
        node.devices_toml = Some(format!(
            "[devices]\nconfig = {pools:?}\nplugin_dir = {:?}\n",
            node.path("device-plugins")
        ));
        Rig { node, fx, vfs, nic }
    }

    fn sriov_conf(&self, extra: Value) -> Value {
        let mut c = json!({
            "cniVersion": "1.0.0", "type": "sriov", "name": "sriov-net",
            "capabilities": {"mac": true},
            "ipam": {"type": "host-local", "subnet": "10.79.0.0/24", "dataDir": self.node.path("ipam")},
        });
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    }

    fn add_nad_with_resource(&self, name: &str, resource: &str, conf: &Value) {
        let nad = json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": "pods",
                         "annotations": {"k8s.v1.cni.cncf.io/resourceName": resource}},
            "spec": {"config": conf.to_string()},
        });
        std::fs::write(
            self.node.path(&format!("nads/pods-{name}.json")),
            serde_json::to_vec(&nad).unwrap(),
        )
        .unwrap();
    }

    fn shim(
        &self,
        cmd: &str,
        container: &str,
        pod: &Netns,
        name: &str,
        networks: &str,
    ) -> trellis_rig::node::ShimOutcome {
        let ann = BTreeMap::from([(
            "k8s.v1.cni.cncf.io/networks".to_string(),
            networks.to_string(),
        )]);
        self.node.shim(
            cmd,
            container,
            &pod.path().to_string_lossy(),
            ("pods", name),
            &self.node.shim_conf(Some(&ann)),
        )
    }

    /// Every stand-in VF is back in the host as it was; nothing else is left.
    fn assert_host_as_before(&self) {
        let links = self.node.host.links();
        for (addr, name, mac) in &self.vfs {
            assert!(
                links.contains(name),
                "{addr}: {name} not back in the host: {links:?}"
            );
            assert_eq!(
                &mac_of(&self.node.host, name),
                mac,
                "{name} MAC not restored"
            );
            assert_eq!(
                mtu_of(&self.node.host, name),
                "1500",
                "{name} MTU not restored"
            );
        }
        assert!(
            self.node.records().is_empty(),
            "records left: {:?}",
            self.node.records()
        );
        assert!(
            self.node.reservations().is_empty(),
            "IPs left: {:?}",
            self.node.reservations()
        );
        let vfs: Vec<_> = std::fs::read_dir(self.node.vf_claims().dir())
            .unwrap()
            .flatten()
            .collect();
        assert!(vfs.is_empty(), "VF records left: {vfs:?}");
    }
}

#[test]
fn a_vf_netdev_is_placed_configured_and_restored() {
    require_root!();
    let mut rig = Rig::new(1);
    let (addr, host_name, _) = rig.vfs[0].clone();
    rig.node.add_nad(
        "pods",
        "sriov-a",
        &rig.sriov_conf(json!({"deviceID": addr, "mtu": 1400})),
    );
    rig.node.start_agent();
    let pod = Netns::new("trp");
    let networks = r#"[{"name":"sriov-a","interface":"fast0","mac":"02:11:22:33:44:55"}]"#;
    let r = rig.shim("ADD", "c1", &pod, "a", networks).expect_ok("ADD");

    // In the pod under the requested name, MTU and MAC, up, addressed.
    assert!(
        pod.links().contains(&"fast0".to_string()),
        "{:?}",
        pod.links()
    );
    assert!(
        !rig.node.host.links().contains(&host_name),
        "still in the host"
    );
    assert_eq!(mac_of(&pod, "fast0"), "02:11:22:33:44:55");
    assert_eq!(mtu_of(&pod, "fast0"), "1400");
    assert!(
        pod.sh("ip -o link show dev fast0").contains(",UP"),
        "not up"
    );
    assert!(
        pod.addrs("fast0")[0].starts_with("10.79.0."),
        "{:?}",
        pod.addrs("fast0")
    );
    let fast = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["name"] == "fast0")
        .expect("fast0 in result");
    assert_eq!(fast["mac"], "02:11:22:33:44:55");
    let status = &rig.node.record("c1")["network_status"];
    let entry = status
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["interface"] == "fast0")
        .unwrap();
    assert_eq!(entry["device-info"]["type"], "pci");
    assert_eq!(entry["device-info"]["pci"]["pci-address"], addr);
    assert!(rig
        .node
        .state_dir()
        .join(format!("vfs/{addr}.json"))
        .exists());

    // DEL after an agent restart puts it back as it was.
    rig.node.stop_agent();
    rig.node.start_agent();
    rig.shim("DEL", "c1", &pod, "a", networks).expect_ok("DEL");
    assert!(pod.links().is_empty(), "{:?}", pod.links());
    rig.assert_host_as_before();
    // DEL again: nothing to do, still fine.
    rig.shim("DEL", "c1", &pod, "a", networks)
        .expect_ok("DEL again");
    drop(rig.fx);
}

#[test]
fn devices_come_from_the_pods_allocation_in_annotation_order() {
    require_root!();
    let mut rig = Rig::new(2);
    let conf = rig.sriov_conf(json!({}));
    rig.add_nad_with_resource("sriov-a", "intel.com/vf", &conf);
    rig.node.start_agent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    // kubelet gave pod a the second device first.
    let _pr = {
        let _g = rt.enter();
        serve_pod_resources(
            &rig.node.path("pod-resources.sock"),
            vec![pod_with_devices(
                "pods",
                "a",
                "intel.com/vf",
                &[&rig.vfs[1].0, &rig.vfs[0].0],
            )],
            true,
        )
    };
    let pod = Netns::new("trp");
    let networks = "sriov-a@d0, sriov-a@d1";
    rig.shim("ADD", "c1", &pod, "a", networks).expect_ok("ADD");
    let status = rig.node.record("c1")["network_status"].clone();
    let dev = |ifname: &str| {
        status
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["interface"] == ifname)
            .unwrap()["device-info"]["pci"]["pci-address"]
            .clone()
    };
    assert_eq!(dev("d0"), json!(rig.vfs[1].0));
    assert_eq!(dev("d1"), json!(rig.vfs[0].0));
    assert_eq!(
        mac_of(&pod, "d0"),
        rig.vfs[1].2,
        "the MAC comes with the device"
    );
    rig.shim("DEL", "c1", &pod, "a", networks).expect_ok("DEL");
    rig.assert_host_as_before();

    // A pod with no such allocation: named, nothing changed.
    let (_, msg) = rig
        .shim("ADD", "c2", &pod, "b", "sriov-a")
        .expect_err("ADD without allocation");
    assert!(msg.contains("pods/b"), "{msg}");
    rig.assert_host_as_before();
    // More networks than devices.
    let (_, msg) = rig
        .shim("ADD", "c3", &pod, "a", "sriov-a, sriov-a, sriov-a")
        .expect_err("ADD with too few devices");
    assert!(
        msg.contains("allocated 2 device(s) of intel.com/vf but asks for 3"),
        "{msg}"
    );
    rig.assert_host_as_before();
}

#[test]
fn a_pod_netns_that_is_gone_does_not_block_del() {
    require_root!();
    let mut rig = Rig::new(1);
    let (addr, _, _) = rig.vfs[0].clone();
    rig.node.add_nad(
        "pods",
        "sriov-a",
        &rig.sriov_conf(json!({"deviceID": addr})),
    );
    rig.node.start_agent();
    let pod = Netns::new("trp");
    let path = pod.path().to_string_lossy().into_owned();
    rig.shim("ADD", "c1", &pod, "a", "sriov-a").expect_ok("ADD");
    // The runtime deleted the netns first: the veth stand-in dies with it (a real VF
    // would return to the host; rig/tests/qemu_igb.rs covers that).
    drop(pod);
    let ann = BTreeMap::from([(
        "k8s.v1.cni.cncf.io/networks".to_string(),
        "sriov-a".to_string(),
    )]);
    rig.node
        .shim(
            "DEL",
            "c1",
            &path,
            ("pods", "a"),
            &rig.node.shim_conf(Some(&ann)),
        )
        .expect_ok("DEL with the netns gone");
    assert!(rig.node.records().is_empty());
    assert!(
        rig.node.reservations().is_empty(),
        "{:?}",
        rig.node.reservations()
    );
    assert!(std::fs::read_dir(rig.node.vf_claims().dir())
        .unwrap()
        .next()
        .is_none());
}

#[test]
fn bad_input_leaves_the_host_as_it_was() {
    require_root!();
    let mut rig = Rig::new(1);
    let (addr, _, _) = rig.vfs[0].clone();
    let nads = [
        (
            "bad-ipam",
            json!({"deviceID": addr, "ipam": {"type": "host-local", "subnet": "not-a-subnet"}}),
        ),
        ("vlan-big", json!({"deviceID": addr, "vlan": 5000})),
        ("qos-only", json!({"deviceID": addr, "vlanQoS": 3})),
        (
            "bad-mac",
            json!({"deviceID": addr, "mac": "02:00:00:00:00"}),
        ),
        (
            "rates",
            json!({"deviceID": addr, "min_tx_rate": 500, "max_tx_rate": 100}),
        ),
        ("not-vf", json!({"deviceID": addr, "vlan": 100})),
        ("no-such", json!({"deviceID": "0000:99:00.0"})),
        ("ok", json!({"deviceID": addr})),
    ];
    for (name, extra) in &nads {
        rig.node
            .add_nad("pods", name, &rig.sriov_conf(extra.clone()));
    }
    // A chain naming two devices: one network attaches one.
    let mut second = rig.sriov_conf(json!({"deviceID": addr}));
    second["deviceID"] = json!("0000:3b:10.7");
    rig.node.add_nad(
        "pods",
        "two-devices",
        &json!({"cniVersion": "1.0.0", "name": "two", "plugins": [
            rig.sriov_conf(json!({"deviceID": addr})), second]}),
    );
    rig.node.start_agent();
    let pod = Netns::new("trp");
    let cases = [
        ("bad-ipam", "IPAM host-local"),
        ("vlan-big", "vlan: 5000 is outside 0-4094"),
        ("qos-only", "vlanQoS: needs a non-zero vlan"),
        ("bad-mac", "mac: \"02:00:00:00:00\" is not a MAC address"),
        ("rates", "min_tx_rate: 500 is above max_tx_rate 100"),
        ("not-vf", "has no netdev, so vlan"),
        (
            "no-such",
            "deviceID \"0000:99:00.0\": is not a device of any pool",
        ),
        ("two-devices", "a network attaches one device"),
    ];
    for (i, (nad, want)) in cases.iter().enumerate() {
        let (_, msg) = rig
            .shim("ADD", &format!("b{i}"), &pod, "a", nad)
            .expect_err(nad);
        assert!(msg.contains(want), "{nad}: {msg}");
        rig.assert_host_as_before();
        assert!(pod.links().is_empty(), "{nad}: {:?}", pod.links());
    }
    // The interface name is taken in the pod.
    pod.sh("ip link add net1 type veth peer name net1p");
    let (_, msg) = rig
        .shim("ADD", "b9", &pod, "a", "ok")
        .expect_err("ifname taken");
    assert!(msg.contains("net1 already exists"), "{msg}");
    rig.assert_host_as_before();
    pod.sh("ip link del net1");
    // The device is taken by another pod.
    let pod2 = Netns::new("trp");
    rig.shim("ADD", "c1", &pod, "a", "ok")
        .expect_ok("first ADD");
    let (_, msg) = rig
        .shim("ADD", "c2", &pod2, "b", "ok")
        .expect_err("second pod, same VF");
    assert!(
        msg.contains(&format!("{addr} is already in use by container c1")),
        "{msg}"
    );
    assert!(pod2.links().is_empty());
    rig.shim("DEL", "c1", &pod, "a", "ok").expect_ok("DEL");
    rig.assert_host_as_before();
}

#[test]
fn a_nad_cannot_take_a_device_it_was_not_given() {
    require_root!();
    let mut rig = Rig::new(2);
    let (vf0, vf1) = (rig.vfs[0].0.clone(), rig.vfs[1].0.clone());
    let nads = [
        ("the-pf", json!({"deviceID": PF})),
        ("the-nic", json!({"deviceID": rig.nic.0})),
        ("vf0", json!({"deviceID": vf0})),
        ("vf1", json!({"deviceID": vf1})),
    ];
    for (name, extra) in &nads {
        rig.node
            .add_nad("pods", name, &rig.sriov_conf(extra.clone()));
    }
    // A vhost-user NAD naming a host socket no pool serves (the agent's own).
    rig.node.add_nad(
        "pods",
        "any-socket",
        &json!({"cniVersion": "1.0.0", "type": "vhostuser", "deviceID": rig.node.socket()}),
    );
    // A NAD that claims the NIC pool but names a VF.
    rig.add_nad_with_resource(
        "wrong-pool",
        "intel.com/nic",
        &rig.sriov_conf(json!({"deviceID": vf0})),
    );
    rig.node.start_agent();
    let pod = Netns::new("trp");
    let nic_links = |rig: &Rig| rig.node.host.links().contains(&rig.nic.1);
    // Without kubelet: pools decide, and only a VF is ever placed.
    let cases = [
        (
            "the-pf",
            format!("deviceID \"{PF}\": is not a device of any pool"),
        ),
        (
            "the-nic",
            format!("deviceID: {} is not an SR-IOV VF", rig.nic.0),
        ),
        (
            "any-socket",
            format!(
                "deviceID {:?}: is not a device of any pool",
                rig.node.socket()
            ),
        ),
        (
            "wrong-pool",
            "is a device of pool intel.com/vf, not of the NAD's resourceName intel.com/nic"
                .to_string(),
        ),
    ];
    for (i, (nad, want)) in cases.iter().enumerate() {
        let (code, msg) = rig
            .shim("ADD", &format!("p{i}"), &pod, "a", nad)
            .expect_err(nad);
        assert_eq!(code, 7, "{nad}: {msg}");
        assert!(
            msg.contains(want.as_str()),
            "{nad}: wanted {want:?} in {msg}"
        );
        assert!(nic_links(&rig), "{nad}: the NIC left the host");
        rig.assert_host_as_before();
        assert!(pod.links().is_empty(), "{nad}: {:?}", pod.links());
    }
    // With kubelet: pod a was allocated vf0 only, so vf1 (named in a NAD) is not its.
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _pr = {
        let _g = rt.enter();
        serve_pod_resources(
            &rig.node.path("pod-resources.sock"),
            vec![pod_with_devices("pods", "a", "intel.com/vf", &[&vf0])],
            true,
        )
    };
    let (code, msg) = rig.shim("ADD", "p9", &pod, "a", "vf1").expect_err("vf1");
    assert_eq!(code, 7, "{msg}");
    assert!(msg.contains("kubelet did not allocate"), "{msg}");
    rig.assert_host_as_before();
    rig.shim("ADD", "p10", &pod, "a", "vf0")
        .expect_ok("vf0, allocated");
    rig.shim("DEL", "p10", &pod, "a", "vf0").expect_ok("DEL");
    rig.assert_host_as_before();
}

#[test]
fn vf_state_no_record_points_to_is_released_at_start() {
    require_root!();
    let mut rig = Rig::new(1);
    let (addr, host, mac) = rig.vfs[0].clone();
    rig.node
        .add_nad("pods", "vf0", &rig.sriov_conf(json!({"deviceID": addr})));
    // What an ADD whose undo failed left behind on main: the VF held by a container
    // that has no record, so no DEL ever comes for it.
    let claims = rig.node.vf_claims();
    let vfs = claims.dir().to_path_buf();
    std::fs::create_dir_all(&vfs).unwrap();
    std::fs::write(
        claims.path(&addr.to_string()),
        json!({"device": addr, "container_id": "ghost", "netns": "", "ifname": "net1",
               "host": {"index": 1, "name": host, "mac": null, "mtu": null, "up": false},
               "pf": null, "ipam": false})
        .to_string(),
    )
    .unwrap();
    rig.node.start_agent();
    assert!(
        std::fs::read_dir(&vfs).unwrap().next().is_none(),
        "the orphan VF state is still there"
    );
    assert!(rig
        .node
        .agent_log()
        .contains("held by no attachment record"));
    assert_eq!(mac_of(&rig.node.host, &host), mac);
    let pod = Netns::new("trp");
    rig.shim("ADD", "c1", &pod, "a", "vf0")
        .expect_ok("ADD of the freed VF");
    rig.shim("DEL", "c1", &pod, "a", "vf0").expect_ok("DEL");
    rig.assert_host_as_before();
}

#[test]
fn an_ipam_plugin_killed_on_its_timeout_is_released() {
    require_root!();
    let mut rig = Rig::new(1);
    rig.node.delegate_timeout_secs = 3;
    let (addr, _, _) = rig.vfs[0].clone();
    let held = rig.node.path("ipam-held");
    // Takes an "address" (the marker), then hangs; its DEL gives it back.
    rig.node.add_plugin_script(
        "hangipam",
        &format!(
            r#"cat >/dev/null
case "$CNI_COMMAND" in ADD) touch {0}; sleep 30;; DEL) rm -f {0};; esac"#,
            held.display()
        ),
    );
    rig.node.add_nad(
        "pods",
        "vf0",
        &rig.sriov_conf(json!({"deviceID": addr, "ipam": {"type": "hangipam"}})),
    );
    rig.node.start_agent();
    let pod = Netns::new("trp");
    let (code, msg) = rig.shim("ADD", "c1", &pod, "a", "vf0").expect_err("ADD");
    assert_eq!(code, 5, "{msg}");
    assert!(msg.contains("did not finish within 3 s"), "{msg}");
    assert!(
        !held.exists(),
        "the killed IPAM plugin's address was never released"
    );
    rig.assert_host_as_before();
    assert!(pod.links().is_empty(), "{:?}", pod.links());
}

/// Hot-plug of an SR-IOV network (`trellis attach`): only with a device kubelet already
/// allocated to the pod that none of its attachments uses; otherwise a clear error,
/// nothing changed. Detach puts the VF back in the host as it was.
#[test]
fn a_vf_is_hot_plugged_only_from_the_pods_spare_allocation() {
    require_root!();
    let mut rig = Rig::new(2);
    let conf = rig.sriov_conf(json!({}));
    rig.add_nad_with_resource("sriov-a", "intel.com/vf", &conf);
    rig.node.start_agent();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let _pr = {
        let _g = rt.enter();
        serve_pod_resources(
            &rig.node.path("pod-resources.sock"),
            vec![pod_with_devices(
                "pods",
                "a",
                "intel.com/vf",
                &[&rig.vfs[0].0, &rig.vfs[1].0],
            )],
            true,
        )
    };
    let trellis = |args: &[&str]| {
        let out = std::process::Command::new(trellis_rig::bins::trellis())
            .args(args)
            .arg("--socket")
            .arg(rig.node.socket())
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).to_string()
                + &String::from_utf8_lossy(&out.stderr),
        )
    };
    let pod = Netns::new("trp");
    rig.shim("ADD", "c1", &pod, "a", "sriov-a@d0")
        .expect_ok("ADD");
    assert!(pod.links().contains(&"d0".to_string()));

    // The spare allocated VF: hot-plugged.
    let (ok, out) = trellis(&["attach", "--pod", "pods/a", "sriov-a@d1"]);
    assert!(ok, "{out}\n{}", rig.node.agent_log());
    assert!(pod.links().contains(&"d1".to_string()), "{:?}", pod.links());
    let rec = rig.node.record("c1");
    let devices: Vec<&str> = rec["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|a| a["device"].as_str())
        .collect();
    assert_eq!(devices, [rig.vfs[0].0.as_str(), rig.vfs[1].0.as_str()]);

    // None left: refused, naming the pool and why, and nothing changed.
    let before = rig.node.record("c1");
    let (ok, out) = trellis(&["attach", "--pod", "pods/a", "sriov-a@d2"]);
    assert!(!ok);
    assert!(
        out.contains("holds 2 device(s) of intel.com/vf, 2 of them in use")
            && out.contains("cannot allocate another to a running pod"),
        "{out}"
    );
    assert_eq!(rig.node.record("c1"), before);
    assert!(!pod.links().contains(&"d2".to_string()));

    // Detached: the VF is back in the host, its MAC as it was; attached again.
    let (ok, out) = trellis(&["detach", "--pod", "pods/a", "@d1"]);
    assert!(ok, "{out}");
    let (_, name, mac) = &rig.vfs[1];
    assert!(rig.node.host.links().contains(name));
    assert_eq!(&mac_of(&rig.node.host, name), mac);
    assert!(trellis(&["attach", "--pod", "pods/a", "sriov-a@d1"]).0);

    rig.shim("DEL", "c1", &pod, "a", "sriov-a@d0")
        .expect_ok("DEL");
    rig.assert_host_as_before();
}
