//! The agent driving Debian's reference CNI plugins (bridge, macvlan, host-local,
//! static) through the real shim, in namespaces these tests make.

use serde_json::json;
use std::collections::BTreeMap;
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;

fn node_with_networks() -> TestNode {
    let mut node = TestNode::new();
    // GC here judges pods added a moment ago (no grace).
    node.top_toml = "gc_grace_secs = 0\n".into();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.78.1.0/24"));
    let br = trellis_rig::unique("trx");
    node.add_nad(
        "pods",
        "br-b",
        &node.bridge_conf("br-b", &br, "10.78.2.0/24"),
    );
    node.add_nad(
        "pods",
        "static-c",
        &json!({"cniVersion":"1.0.0","type":"macvlan","master":node.master,"mode":"bridge",
                "capabilities":{"ips":true,"mac":true},"ipam":{"type":"static"}}),
    );
    node.start_agent();
    node
}

#[test]
fn pod_gets_default_plus_two_networks_and_del_cleans_up() {
    require_root!();
    let node = node_with_networks();
    let p1 = Netns::new("trp");
    let p2 = Netns::new("trp");
    let ann = networks_annotation("mv-a, pods/br-b@data0");
    let r1 = node
        .shim(
            "ADD",
            "c1",
            &p1.path().to_string_lossy(),
            ("pods", "a"),
            &node.shim_conf(Some(&ann)),
        )
        .expect_ok("ADD pod a");
    // Merged result, in the runtime's cniVersion, names every pod interface.
    assert_eq!(r1["cniVersion"], "1.0.0");
    let sandbox_ifs: Vec<&str> = r1["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(sandbox_ifs, ["eth0", "net1", "data0"], "{r1}");
    assert_eq!(r1["ips"].as_array().unwrap().len(), 3, "{r1}");
    assert_eq!(p1.addrs("eth0")[0].rsplit_once('.').unwrap().0, "10.77.0");
    assert!(p1.addrs("net1")[0].starts_with("10.78.1."));
    assert!(p1.addrs("data0")[0].starts_with("10.78.2."));

    // JSON form, with static IPs and a MAC through runtimeConfig capabilities.
    let ann2 = networks_annotation(
        r#"[{"name":"mv-a"},{"name":"br-b","interface":"data0"},
            {"name":"static-c","ips":["10.78.3.7/24"],"mac":"02:00:00:00:03:07"}]"#,
    );
    node.shim(
        "ADD",
        "c2",
        &p2.path().to_string_lossy(),
        ("pods", "b"),
        &node.shim_conf(Some(&ann2)),
    )
    .expect_ok("ADD pod b");
    assert_eq!(p2.addrs("net3"), ["10.78.3.7/24"]);
    assert!(p2.sh("ip -o link show net3").contains("02:00:00:00:03:07"));

    // Traffic across each network.
    for ifname in ["eth0", "net1", "data0"] {
        let dst = p2.addrs(ifname)[0].split('/').next().unwrap().to_string();
        assert!(
            p1.ping(&dst),
            "pod a cannot reach pod b over {ifname} ({dst})"
        );
    }
    // The record carries the network-status.
    let rec = node.record("c1");
    let status = &rec["network_status"];
    assert_eq!(status[0]["name"], "cluster");
    assert_eq!(status[0]["default"], true);
    assert_eq!(status[1]["name"], "pods/mv-a");
    assert_eq!(status[2]["interface"], "data0");

    // CHECK passes while everything is in place.
    node.shim(
        "CHECK",
        "c1",
        &p1.path().to_string_lossy(),
        ("pods", "a"),
        &node.shim_conf(Some(&ann)),
    )
    .expect_ok("CHECK");

    for (c, p, pod) in [("c1", &p1, "a"), ("c2", &p2, "b")] {
        node.shim(
            "DEL",
            c,
            &p.path().to_string_lossy(),
            ("pods", pod),
            &node.shim_conf(None),
        )
        .expect_ok("DEL");
        // containerd's second DEL comes with an empty netns.
        node.shim("DEL", c, "", ("pods", pod), &node.shim_conf(None))
            .expect_ok("second DEL");
        assert!(p.links().is_empty(), "links left in pod: {:?}", p.links());
    }
    assert!(
        node.reservations().is_empty(),
        "IPs left: {:?}",
        node.reservations()
    );
    assert!(
        node.records().is_empty(),
        "records left: {:?}",
        node.records()
    );
    assert!(
        node.host_links().iter().all(|l| !l.starts_with("veth")),
        "{:?}",
        node.host_links()
    );
}

#[test]
fn failure_on_second_attachment_undoes_the_first() {
    require_root!();
    let node = node_with_networks();
    node.add_nad(
        "pods",
        "broken",
        &json!({"cniVersion":"1.0.0","type":"macvlan","master":"nosuchdev0",
                "ipam":{"type":"host-local","subnet":"10.78.9.0/24","dataDir":node.path("ipam")}}),
    );
    let p = Netns::new("trp");
    let ann = networks_annotation("mv-a,broken");
    let (code, msg) = node
        .shim(
            "ADD",
            "c3",
            &p.path().to_string_lossy(),
            ("pods", "x"),
            &node.shim_conf(Some(&ann)),
        )
        .expect_err("ADD with a broken second network");
    assert!(
        msg.contains("pods/broken") && msg.contains("net2"),
        "{code}: {msg}"
    );
    eprintln!("error as the runtime sees it: {code}: {msg}");
    assert!(p.links().is_empty(), "links left: {:?}", p.links());
    assert!(
        node.reservations().is_empty(),
        "IPs left: {:?}",
        node.reservations()
    );
    assert!(
        node.records().is_empty(),
        "records left: {:?}",
        node.records()
    );
    assert!(
        node.host_links().iter().all(|l| !l.starts_with("veth")),
        "{:?}",
        node.host_links()
    );
}

#[test]
fn del_works_after_agent_restart() {
    require_root!();
    let mut node = node_with_networks();
    let p = Netns::new("trp");
    let ns = p.path().to_string_lossy().into_owned();
    node.shim(
        "ADD",
        "c4",
        &ns,
        ("pods", "r"),
        &node.shim_conf(Some(&networks_annotation("mv-a"))),
    )
    .expect_ok("ADD");
    node.stop_agent();
    let (code, msg) = node
        .shim("DEL", "c4", &ns, ("pods", "r"), &node.shim_conf(None))
        .expect_err("DEL with the agent down");
    assert_eq!(code, 11, "{msg}");
    assert!(msg.contains(&node.socket().display().to_string()), "{msg}");
    node.start_agent();
    node.shim("DEL", "c4", &ns, ("pods", "r"), &node.shim_conf(None))
        .expect_ok("DEL after restart");
    assert!(p.links().is_empty());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
}

#[test]
fn gc_removes_attachments_not_in_the_valid_list() {
    require_root!();
    let node = node_with_networks();
    let p1 = Netns::new("trp");
    let p2 = Netns::new("trp");
    let ann = networks_annotation("mv-a");
    node.shim(
        "ADD",
        "keep",
        &p1.path().to_string_lossy(),
        ("pods", "k"),
        &node.shim_conf(Some(&ann)),
    )
    .expect_ok("ADD keep");
    node.shim(
        "ADD",
        "stale",
        &p2.path().to_string_lossy(),
        ("pods", "s"),
        &node.shim_conf(Some(&ann)),
    )
    .expect_ok("ADD stale");
    assert_eq!(node.reservations().len(), 4);
    let mut gc = node.shim_conf(None);
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "keep", "ifname": "eth0"}]);
    let env: BTreeMap<&str, String> = BTreeMap::from([
        ("CNI_COMMAND", "GC".to_string()),
        ("CNI_PATH", "/usr/lib/cni".into()),
    ]);
    let out = node.shim_raw(&env, gc.to_string().as_bytes());
    assert!(out.ok, "GC: {}", out.stdout);
    assert_eq!(node.records(), ["keep.json"]);
    assert_eq!(node.reservations().len(), 2, "{:?}", node.reservations());
    node.shim(
        "DEL",
        "keep",
        &p1.path().to_string_lossy(),
        ("pods", "k"),
        &node.shim_conf(None),
    )
    .expect_ok("DEL keep");
    assert!(node.reservations().is_empty());
}

/// A pod the runtime started on the primary network before trellis was installed:
/// trellis has no record of it. GC keeps it (the runtime lists it), and its DEL, which
/// now comes to trellis, reaches the primary network, which releases its IP.
#[test]
fn a_pod_from_before_install_is_kept_by_gc_and_deleted_on_the_primary() {
    require_root!();
    let node = node_with_networks();
    let pod = Netns::new("trp");
    let conf = node.bridge_conf("cluster", &node.bridge, "10.77.0.0/24");
    let mut plugin = conf["plugins"][0].clone();
    plugin["cniVersion"] = conf["cniVersion"].clone();
    plugin["name"] = conf["name"].clone();
    let file = node.path("pre.json");
    std::fs::write(&file, plugin.to_string()).unwrap();
    // As the runtime ran it, without trellis.
    node.host.sh(&format!(
        "CNI_COMMAND=ADD CNI_CONTAINERID=pre CNI_NETNS={} CNI_IFNAME=eth0 CNI_PATH=/usr/lib/cni /usr/lib/cni/bridge < {}",
        pod.path().display(),
        file.display()
    ));
    assert_eq!(node.reservations().len(), 1, "{:?}", node.reservations());
    // The primary as a 1.1.0 conf, so GC reaches it (Debian's bridge speaks 1.0.0:
    // the spy keeps what GC is told and hands everything else to bridge at 1.0.0).
    let seen = node.path("gc-stdin.json");
    node.add_plugin_script(
        "spybridge",
        &format!(
            "if [ \"$CNI_COMMAND\" = GC ]; then cat > {}; exit 0; fi\nsed 's/\"cniVersion\":\"1.1.0\"/\"cniVersion\":\"1.0.0\"/' | exec /usr/lib/cni/bridge",
            seen.display()
        ),
    );
    let mut primary = conf.clone();
    primary["cniVersion"] = json!("1.1.0");
    primary["plugins"][0]["type"] = json!("spybridge");
    node.write_default_network(&primary);
    let mut gc = node.shim_conf(None);
    gc["cniVersion"] = json!("1.1.0");
    gc["cni.dev/valid-attachments"] = json!([{"containerID": "pre", "ifname": "eth0"}]);
    let env: BTreeMap<&str, String> = BTreeMap::from([
        ("CNI_COMMAND", "GC".to_string()),
        ("CNI_PATH", "/usr/lib/cni".into()),
    ]);
    let out = node.shim_raw(&env, gc.to_string().as_bytes());
    assert!(out.ok, "GC: {}", out.stdout);
    let told: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&seen).expect("GC reached the primary")).unwrap();
    assert_eq!(
        told["cni.dev/valid-attachments"],
        json!([{"containerID": "pre", "ifname": "eth0"}]),
        "GC must keep a container the runtime runs that trellis has no record of"
    );
    assert_eq!(node.reservations().len(), 1);
    node.shim(
        "DEL",
        "pre",
        &pod.path().to_string_lossy(),
        ("pods", "pre"),
        &node.shim_conf(None),
    )
    .expect_ok("DEL of a pod trellis never saw");
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert!(
        !pod.links().contains(&"eth0".to_string()),
        "{:?}",
        pod.links()
    );
    assert!(node.records().is_empty());
    // Again: DEL is idempotent.
    node.shim(
        "DEL",
        "pre",
        &pod.path().to_string_lossy(),
        ("pods", "pre"),
        &node.shim_conf(None),
    )
    .expect_ok("second DEL");
}

#[test]
fn status_and_version() {
    require_root!();
    let node = node_with_networks();
    let mut conf = node.shim_conf(None);
    conf["cniVersion"] = json!("1.1.0");
    let status = |n: &TestNode| {
        n.shim_raw(
            &BTreeMap::from([("CNI_COMMAND", "STATUS".to_string())]),
            conf.to_string().as_bytes(),
        )
    };
    assert!(status(&node).ok, "{}", status(&node).stdout);
    // A default network whose plugin is missing: not ready, code 50.
    node.write_default_network(
        &json!({"cniVersion":"1.0.0","name":"cluster","plugins":[{"type":"nosuchplugin"}]}),
    );
    let out = status(&node);
    assert!(!out.ok);
    assert_eq!(out.json["code"], 50, "{}", out.stdout);
    assert!(out.stdout.contains("nosuchplugin"), "{}", out.stdout);
    // VERSION is answered by the shim itself, agent or not.
    let v = node.shim_raw(
        &BTreeMap::from([("CNI_COMMAND", "VERSION".to_string())]),
        br#"{"cniVersion":"1.0.0"}"#,
    );
    assert!(v.ok);
    assert!(v.json["supportedVersions"]
        .as_array()
        .unwrap()
        .contains(&json!("1.1.0")));
}

/// `default_network = { nad = ... }`: the cluster network from a NAD, without any pod
/// annotation; a pod's own default-network annotation still wins.
#[test]
fn the_default_network_can_be_a_nad_from_the_config() {
    require_root!();
    let mut node = TestNode::new();
    let br = trellis_rig::unique("trx");
    node.add_nad(
        "kube-system",
        "cluster-nad",
        &node.bridge_conf("cluster-nad", &br, "10.78.7.0/24"),
    );
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.78.8.0/24"));
    node.default_network_toml = Some("{ nad = \"kube-system/cluster-nad\" }".into());
    node.start_agent();
    let p = Netns::new("trp");
    let r = node
        .shim(
            "ADD",
            "nad-default",
            &p.path().to_string_lossy(),
            ("pods", "p"),
            &node.shim_conf(None),
        )
        .expect_ok("ADD");
    assert!(
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.78.7."),
        "{r}"
    );
    let status = &node.record("nad-default")["network_status"];
    assert_eq!(status[0]["name"], "kube-system/cluster-nad", "{status}");
    let ann: BTreeMap<String, String> = [(
        "v1.multus-cni.io/default-network".to_string(),
        "pods/mv-a".to_string(),
    )]
    .into();
    let q = Netns::new("trp");
    let r = node
        .shim(
            "ADD",
            "nad-override",
            &q.path().to_string_lossy(),
            ("pods", "q"),
            &node.shim_conf(Some(&ann)),
        )
        .expect_ok("ADD");
    assert!(
        r["ips"][0]["address"]
            .as_str()
            .unwrap()
            .starts_with("10.78.8."),
        "{r}"
    );
    for (c, ns) in [("nad-default", &p), ("nad-override", &q)] {
        node.shim(
            "DEL",
            c,
            &ns.path().to_string_lossy(),
            ("pods", "p"),
            &node.shim_conf(None),
        )
        .expect_ok("DEL");
    }
    assert!(node.records().is_empty());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
}
