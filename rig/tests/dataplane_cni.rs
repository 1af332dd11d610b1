//! The dataplane through the CNI path: every pod interface an ADD makes gets the
//! programs; `trellis stats` (from the pins) counts what the kernel's own interface
//! counters count; DEL leaves none of that pod's pins.

use serde_json::Value;
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;
use trellis_rig::traffic::{counter, interface, kernel_counts, trellis_stats};

fn stats(node: &TestNode, pod: &str) -> Vec<Value> {
    trellis_stats(&node.bpf_dir, &["--pod", pod])
}

/// (rx, tx) of `ifname`: `what` is packets or drops.
fn ours(stats: &[Value], ifname: &str, what: &str) -> (u64, u64) {
    let s = interface(stats, None, ifname);
    (counter(s, "ingress", what), counter(s, "egress", what))
}

/// Pods a (container ca) and b (cb) in namespaces of their own (IPv4 only, so no
/// neighbour discovery chatter lands between two readings), each ADDed through the shim
/// with the network `nad`; `after_add` runs after each ADD with the pod's name.
fn add_pods_a_and_b(node: &TestNode, nad: &str, after_add: impl Fn(&str)) -> (Netns, Netns, Value) {
    let (a, b) = (Netns::new("trp"), Netns::new("trp"));
    let conf = node.shim_conf(Some(&networks_annotation(nad)));
    for (c, ns, name) in [("ca", &a, "a"), ("cb", &b, "b")] {
        ns.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        node.shim(
            "ADD",
            c,
            &ns.path().to_string_lossy(),
            ("pods", name),
            &conf,
        )
        .expect_ok("ADD");
        after_add(name);
    }
    (a, b, conf)
}

#[test]
fn pod_interfaces_are_counted_and_del_leaves_no_pins() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.78.1.0/24"));
    node.start_agent();
    let (a, b, conf) = add_pods_a_and_b(&node, "mv-a", |_| {});
    // The programs attach in the background, just after ADD returns.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stats(&node, "a").len() < 2 || stats(&node, "b").len() < 2 {
        assert!(
            std::time::Instant::now() < deadline,
            "dataplane never attached: {}",
            node.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let sa = stats(&node, "a");
    assert_eq!(sa.len(), 2, "eth0 and net1: {sa:?}");
    assert!(sa
        .iter()
        .any(|s| s["owner"]["network"] == "pods/mv-a" && s["owner"]["ifname"] == "net1"));
    assert!(sa
        .iter()
        .all(|s| s["owner"]["namespace"] == "pods" && s["owner"]["container"] == "ca"));

    let b_ip = b.addrs("net1")[0].split('/').next().unwrap().to_string();
    let (k0, o0) = (
        kernel_counts(&a, "net1"),
        ours(&stats(&node, "a"), "net1", "packets"),
    );
    assert!(a
        .sh(&format!("ping -c 5 -i 0.2 -W 2 {b_ip}"))
        .contains("5 received"));
    let (k1, o1) = (
        kernel_counts(&a, "net1"),
        ours(&stats(&node, "a"), "net1", "packets"),
    );
    let kernel = (k1.0 - k0.0, k1.1 - k0.1);
    let counted = (o1.0 - o0.0, o1.1 - o0.1);
    assert_eq!(counted, kernel, "trellis (rx, tx) vs the kernel's");
    assert!(counted.1 >= 5, "{counted:?}");

    // The same counters on the agent's /metrics, with the CNI request latencies.
    let text = scrape(&node.host);
    // (Read after the stats above, so at least that many: the interface lives on.)
    let series = "trellis_interface_packets_total{namespace=\"pods\",pod=\"a\",network=\"pods/mv-a\",interface=\"net1\",direction=\"tx\"} ";
    let value: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or_else(|| panic!("{series} not in:\n{text}"))
        .trim()
        .parse()
        .unwrap();
    assert!(value >= o1.1 && value <= o1.1 + 10, "{value} vs {}", o1.1);
    assert!(text.contains("trellis_attachments 4\n"), "{text}");
    assert!(
        text.contains(
            "trellis_cni_request_duration_seconds_count{command=\"ADD\",result=\"ok\"} 2\n"
        ),
        "{text}"
    );

    let pins_before = node.live_hooks();
    // Per pod: eth0 (a bridge veth) has its two directions and the egress check
    // on its host side; net1 (macvlan) has no host side.
    assert_eq!(pins_before, 10, "2 pods x (3 + 2)");
    node.shim(
        "DEL",
        "ca",
        &a.path().to_string_lossy(),
        ("pods", "a"),
        &conf,
    )
    .expect_ok("DEL");
    assert!(stats(&node, "a").is_empty());
    assert_eq!(stats(&node, "b").len(), 2);
    assert_eq!(node.live_hooks(), 5);
    node.shim(
        "DEL",
        "cb",
        &b.path().to_string_lossy(),
        ("pods", "b"),
        &conf,
    )
    .expect_ok("DEL");
    assert_eq!(node.live_hooks(), 0);
}

/// `GET /metrics` from the agent, which listens on 0.0.0.0:9105 in the node's netns.
fn scrape(host: &Netns) -> String {
    use std::io::{Read, Write};
    std::thread::scope(|sc| {
        sc.spawn(|| {
            // A thread of its own, which ends here.
            host.enter_this_thread();
            let mut c = std::net::TcpStream::connect("127.0.0.1:9105").expect("metrics port");
            c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut out = String::new();
            c.read_to_string(&mut out).unwrap();
            assert!(out.starts_with("HTTP/1.1 200"), "{out}");
            out
        })
        .join()
        .unwrap()
    })
}

fn acl_annotation(acl: Value) -> std::collections::BTreeMap<String, String> {
    [("trellis.dev/acl".to_string(), acl.to_string())].into()
}

/// A network with an ACL in its NAD: filtered from the moment ADD returns, a NAD edit
/// changes the live pods' rules, an agent restart keeps them, an invalid ACL fails
/// the ADD and leaves nothing.
#[test]
fn nad_acls_apply_at_add_follow_nad_edits_and_survive_restarts() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    let conf_mv = node.macvlan_conf("10.78.2.0/24");
    let deny_icmp_in = serde_json::json!({"default": "allow", "rules": [
        {"action": "deny", "direction": "ingress", "cidr": "10.78.2.0/24", "protocol": "icmp"}
    ]});
    node.add_nad_annotated(
        "pods",
        "mv-acl",
        &conf_mv,
        &acl_annotation(deny_icmp_in.clone()),
    );
    node.start_agent();
    let (a, b, conf) = add_pods_a_and_b(&node, "mv-acl", |name| {
        // Attached before ADD returned (no waiting here).
        assert!(
            stats(&node, name)
                .iter()
                .any(|s| s["owner"]["ifname"] == "net1"),
            "the ACL network is filtered when ADD returns"
        );
    });
    let b_ip = b.addrs("net1")[0].split('/').next().unwrap().to_string();
    assert!(a
        .sh(&format!("ping -c 3 -i 0.2 -W 1 {b_ip} || true"))
        .contains(" 0 received"));
    assert_eq!(ours(&stats(&node, "b"), "net1", "drops"), (3, 0));
    // Per rule: `trellis stats --acl` and the agent's metrics.
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args([
            "stats",
            "--acl",
            "--json",
            "--network",
            "pods/mv-acl",
            "--bpffs-dir",
        ])
        .arg(&node.bpf_dir)
        .output()
        .unwrap();
    let acl: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(acl[0]["rules"], serde_json::json!([3]), "{acl}");
    assert_eq!(acl[0]["actions"], serde_json::json!(["deny"]), "{acl}");
    let text = scrape(&node.host);
    assert!(
        text.contains("trellis_acl_drops_total{network=\"pods/mv-acl\",rule=\"0\"} 3\n"),
        "{text}"
    );

    // The NAD loses its deny rule: within the resync period, pings go through.
    node.add_nad_annotated(
        "pods",
        "mv-acl",
        &conf_mv,
        &acl_annotation(serde_json::json!({"default": "allow", "rules": []})),
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !a
        .sh(&format!("ping -c 1 -W 1 {b_ip} || true"))
        .contains(" 1 received")
    {
        assert!(std::time::Instant::now() < deadline, "{}", node.agent_log());
    }
    // And gets it back; then the agent restarts: rules and counters stay.
    node.add_nad_annotated("pods", "mv-acl", &conf_mv, &acl_annotation(deny_icmp_in));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while !a
        .sh(&format!("ping -c 1 -W 1 {b_ip} || true"))
        .contains(" 0 received")
    {
        assert!(std::time::Instant::now() < deadline, "{}", node.agent_log());
    }
    let before = ours(&stats(&node, "b"), "net1", "drops").0;
    node.stop_agent();
    assert!(a
        .sh(&format!("ping -c 2 -i 0.2 -W 1 {b_ip} || true"))
        .contains(" 0 received"));
    node.start_agent();
    std::thread::sleep(std::time::Duration::from_millis(1500));
    assert!(a
        .sh(&format!("ping -c 2 -i 0.2 -W 1 {b_ip} || true"))
        .contains(" 0 received"));
    assert_eq!(ours(&stats(&node, "b"), "net1", "drops").0, before + 4);

    // An invalid ACL: ADD fails naming the rule, and nothing of the pod is left.
    node.add_nad_annotated(
        "pods",
        "mv-bad",
        &node.macvlan_conf("10.78.3.0/24"),
        &acl_annotation(serde_json::json!({"rules": [
            {"action": "allow", "cidr": "10.0.0.0/8"},
            {"action": "deny", "cidr": "10.78.3.0/24", "protocol": "tcp", "ports": "443-80"}
        ]})),
    );
    let c = Netns::new("tra");
    let links_before = node.live_hooks();
    let bad = node.shim_conf(Some(&networks_annotation("mv-bad")));
    let (_, msg) = node
        .shim(
            "ADD",
            "cc",
            &c.path().to_string_lossy(),
            ("pods", "c"),
            &bad,
        )
        .expect_err("ADD with a bad ACL");
    assert!(
        msg.contains("NetworkAttachmentDefinition pods/mv-bad: annotation trellis.dev/acl: rule 1: ports \"443-80\": the range is backwards (443 > 80)"),
        "{msg}"
    );
    assert!(stats(&node, "c").is_empty());
    assert_eq!(node.live_hooks(), links_before);
    assert!(c.links().iter().all(|l| l == "lo"), "{:?}", c.links());
    assert!(!node.records().iter().any(|r| r.contains("cc")));

    for (c, ns, name) in [("ca", &a, "a"), ("cb", &b, "b")] {
        node.shim(
            "DEL",
            c,
            &ns.path().to_string_lossy(),
            ("pods", name),
            &conf,
        )
        .expect_ok("DEL");
    }
    assert_eq!(node.live_hooks(), 0);
    let hits = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["stats", "--json", "--bpffs-dir"])
        .arg(&node.bpf_dir)
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&hits.stdout).trim(), "[]");
}

/// A pod whose cluster network is a NAD (`v1.multus-cni.io/default-network`) with an
/// ACL: its eth0 is filtered when ADD returns, like any other ACL network.
#[test]
fn a_default_network_nad_with_an_acl_is_filtered_at_add() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad_annotated(
        "pods",
        "cluster-acl",
        &node.macvlan_conf("10.78.4.0/24"),
        &acl_annotation(serde_json::json!({"default": "allow", "rules": [
            {"action": "deny", "direction": "ingress", "cidr": "10.78.4.0/24", "protocol": "icmp"}
        ]})),
    );
    node.start_agent();
    let (a, b) = (Netns::new("trp"), Netns::new("trp"));
    let ann: std::collections::BTreeMap<String, String> = [(
        "v1.multus-cni.io/default-network".to_string(),
        "pods/cluster-acl".to_string(),
    )]
    .into();
    let conf = node.shim_conf(Some(&ann));
    for (c, ns, name) in [("ca", &a, "a"), ("cb", &b, "b")] {
        ns.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        node.shim(
            "ADD",
            c,
            &ns.path().to_string_lossy(),
            ("pods", name),
            &conf,
        )
        .expect_ok("ADD");
        let s = stats(&node, name);
        assert!(
            s.iter()
                .any(|s| s["owner"]["ifname"] == "eth0"
                    && s["owner"]["network"] == "pods/cluster-acl"),
            "eth0 filtered when ADD returns: {s:?}"
        );
    }
    let b_ip = b.addrs("eth0")[0].split('/').next().unwrap().to_string();
    assert!(a
        .sh(&format!("ping -c 2 -i 0.2 -W 1 {b_ip} || true"))
        .contains(" 0 received"));
    assert_eq!(ours(&stats(&node, "b"), "eth0", "drops"), (2, 0));
    for (c, ns, name) in [("ca", &a, "a"), ("cb", &b, "b")] {
        node.shim(
            "DEL",
            c,
            &ns.path().to_string_lossy(),
            ("pods", name),
            &conf,
        )
        .expect_ok("DEL");
    }
    assert_eq!(node.live_hooks(), 0);
}
