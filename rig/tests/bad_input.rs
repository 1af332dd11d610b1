//! Every bad input gets a clear error naming what was wrong and leaves nothing behind:
//! no link in the pod, no IP reservation, no record.

use serde_json::json;
use std::collections::BTreeMap;
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;

fn node() -> TestNode {
    let mut node = TestNode::new();
    node.delegate_timeout_secs = 3;
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.81.1.0/24"));
    node.add_nad(
        "pods",
        "no-type",
        &json!({"cniVersion": "1.0.0", "master": "x"}),
    );
    node.add_nad(
        "pods",
        "no-binary",
        &json!({"cniVersion": "1.0.0", "type": "nosuchplugin"}),
    );
    node.add_nad(
        "pods",
        "old-version",
        &json!({"cniVersion": "0.2.0", "type": "macvlan"}),
    );
    // Hangs on ADD only: the agent kills it and DELs it (it may have made something).
    node.add_plugin_script("sleeper", r#"[ "$CNI_COMMAND" = ADD ] && sleep 30; exit 0"#);
    node.add_nad(
        "pods",
        "slow",
        &json!({"cniVersion": "1.0.0", "type": "sleeper"}),
    );
    // A chain whose second plugin fails after the first made an interface and took an IP.
    node.add_nad(
        "pods",
        "chain-fails",
        &json!({"cniVersion": "1.0.0", "name": "chain-fails", "plugins": [
            {"type": "macvlan", "master": node.master, "mode": "bridge",
             "ipam": {"type": "host-local", "subnet": "10.81.2.0/24", "dataDir": node.path("ipam")}},
            {"type": "tuning", "sysctl": {"net.ipv4.conf.IFNAME.no_such_knob": "1"}}
        ]}),
    );
    node.start_agent();
    node
}

fn assert_clean(node: &TestNode, pod: &Netns, what: &str) {
    assert!(
        pod.links().is_empty(),
        "{what}: links left in pod: {:?}",
        pod.links()
    );
    assert!(
        node.reservations().is_empty(),
        "{what}: IPs left: {:?}",
        node.reservations()
    );
    assert!(
        node.records().is_empty(),
        "{what}: records left: {:?}",
        node.records()
    );
    let stray: Vec<String> = node
        .host_links()
        .into_iter()
        .filter(|l| l.starts_with("veth"))
        .collect();
    assert!(stray.is_empty(), "{what}: host links left: {stray:?}");
}

#[test]
fn bad_annotations_and_nads() {
    require_root!();
    let node = node();
    let pod = Netns::new("trp");
    let ns = pod.path().to_string_lossy().into_owned();
    let cases: &[(&str, u64, &str)] = &[
        (r#"[{"name":"mv-a""#, 7, "invalid JSON"),
        ("mv-a,,mv-a", 7, "entry 2 is empty"),
        (
            r#"[{"name":"mv-a","ips":["10.81.1.9/24"]}]"#,
            7,
            "\"ips\" capability",
        ),
        (
            r#"[{"name":"mv-a","interfce":"x"}]"#,
            7,
            "unknown key \"interfce\"",
        ),
        ("mv-a,nope", 7, "pods/nope not found"),
        ("mv-a,no-type", 7, "pods/no-type: invalid spec.config"),
        ("mv-a,no-binary", 7, "\"nosuchplugin\" not found"),
        ("mv-a,old-version", 1, "0.2.0"),
        ("mv-a@bad/name", 7, "must not contain '/'"),
        ("mv-a@x,mv-a@x", 7, "used twice"),
        ("mv-a@eth0", 7, "used twice"),
        ("mv-a@abcdefghijklmnop", 7, "at most 15"),
        ("mv-a,slow", 5, "did not finish within 3 s"),
        ("mv-a,chain-fails", 999, "pods/chain-fails (net2)"),
    ];
    for (i, (annotation, code, want)) in cases.iter().enumerate() {
        let out = node.shim(
            "ADD",
            &format!("bad{i}"),
            &ns,
            ("pods", "p"),
            &node.shim_conf(Some(&networks_annotation(annotation))),
        );
        let (got_code, msg) = out.expect_err(annotation);
        assert!(
            msg.contains(want),
            "{annotation}: wanted {want:?} in {msg:?}"
        );
        assert_eq!(got_code, *code, "{annotation}: {msg}");
        assert_clean(&node, &pod, annotation);
    }
}

#[test]
fn bad_environment_and_stdin() {
    require_root!();
    let node = node();
    let pod = Netns::new("trp");
    let ns = pod.path().to_string_lossy().into_owned();
    let conf = node.shim_conf(Some(&networks_annotation("mv-a")));
    let base: BTreeMap<&str, String> = BTreeMap::from([
        ("CNI_COMMAND", "ADD".to_string()),
        ("CNI_CONTAINERID", "envtest".to_string()),
        ("CNI_NETNS", ns.clone()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/usr/lib/cni".to_string()),
    ]);
    let without = |k: &str| {
        let mut e = base.clone();
        e.remove(k);
        e
    };
    for (env, code, want) in [
        (without("CNI_CONTAINERID"), 4, "CNI_CONTAINERID is required"),
        (without("CNI_NETNS"), 4, "CNI_NETNS is required"),
        (without("CNI_IFNAME"), 4, "CNI_IFNAME is required"),
        (without("CNI_COMMAND"), 4, "CNI_COMMAND is not set"),
    ] {
        let (c, msg) = node
            .shim_raw(&env, conf.to_string().as_bytes())
            .expect_err(want);
        assert_eq!(c, code, "{msg}");
        assert!(msg.contains(want), "wanted {want:?} in {msg:?}");
    }
    let mut bad_id = base.clone();
    bad_id.insert("CNI_CONTAINERID", "../../etc".into());
    let (c, msg) = node
        .shim_raw(&bad_id, conf.to_string().as_bytes())
        .expect_err("bad id");
    assert_eq!(c, 4, "{msg}");
    for v in ["9.9.9", "0.2.0"] {
        let mut c2 = conf.clone();
        c2["cniVersion"] = json!(v);
        let (c, msg) = node
            .shim_raw(&base, c2.to_string().as_bytes())
            .expect_err(v);
        assert_eq!(c, 1, "{msg}");
        assert!(msg.contains(v), "{msg}");
    }
    let (c, msg) = node.shim_raw(&base, b"{not json").expect_err("bad json");
    assert_eq!(c, 6, "{msg}");
    let huge = vec![b' '; 2 << 20];
    let (c, msg) = node.shim_raw(&base, &huge).expect_err("oversized");
    assert_eq!(c, 6, "{msg}");
    assert!(msg.contains("larger than"), "{msg}");
    assert_clean(&node, &pod, "environment");
}

#[test]
fn default_route_moves_to_the_selected_network() {
    require_root!();
    let node = node();
    let pod = Netns::new("trp");
    let ns = pod.path().to_string_lossy().into_owned();
    let ann = networks_annotation(r#"[{"name":"mv-a","default-route":["10.81.1.1"]}]"#);
    node.shim("ADD", "dr", &ns, ("pods", "p"), &node.shim_conf(Some(&ann)))
        .expect_ok("ADD with default-route");
    let routes = pod.sh("ip -4 route show default");
    assert_eq!(routes.lines().count(), 1, "{routes}");
    assert!(
        routes.starts_with("default via 10.81.1.1 dev net1 "),
        "{routes}"
    );
    let rec = node.record("dr");
    assert_eq!(rec["network_status"][1]["default"], true);
    assert!(rec["network_status"][0].get("default").is_none());
    node.shim("DEL", "dr", &ns, ("pods", "p"), &node.shim_conf(None))
        .expect_ok("DEL");
    assert_clean(&node, &pod, "default-route");
    // A gateway the interface cannot reach: the ADD fails and is undone.
    let ann = networks_annotation(r#"[{"name":"mv-a","default-route":["192.0.2.1"]}]"#);
    let (_, msg) = node
        .shim(
            "ADD",
            "dr2",
            &ns,
            ("pods", "p"),
            &node.shim_conf(Some(&ann)),
        )
        .expect_err("unreachable gateway");
    assert!(msg.contains("default-route via 192.0.2.1 on net1"), "{msg}");
    assert_clean(&node, &pod, "unreachable gateway");
}
