//! Logical networks through the real shim and agent: two tenants carve subnets out
//! of one macvlan master and one bridge. Within a tenant traffic flows; across
//! tenants it is dropped and counted, also when a pod gives itself an address of the
//! other tenant and when the sender is no trellis pod at all; overlapping carvings
//! and addresses outside a tenant's subnets fail the ADD and leave nothing.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;
use trellis_rig::traffic::{counter, interface, trellis_stats};

fn logical(subnets: &[&str]) -> BTreeMap<String, String> {
    [(
        "trellis.dev/logical-network".to_string(),
        json!({ "subnets": subnets }).to_string(),
    )]
    .into()
}

/// (ingress, egress) drops of the pod's net1.
fn drops(node: &TestNode, pod: &str) -> (u64, u64) {
    let s = trellis_stats(&node.bpf_dir, &["--pod", pod]);
    let i: &Value = interface(&s, None, "net1");
    (
        counter(i, "ingress", "drops"),
        counter(i, "egress", "drops"),
    )
}

struct Pods<'a> {
    node: &'a TestNode,
    made: Vec<(String, Netns, String, Value)>,
}

impl Pods<'_> {
    /// ADDs pod `name` of namespace `ns` with network `net`: its netns, or the error.
    fn add(&mut self, ns: &str, name: &str, net: &str) -> Result<usize, String> {
        let n = Netns::new("trl");
        n.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        let conf = self.node.shim_conf(Some(&networks_annotation(net)));
        let out = self
            .node
            .shim("ADD", name, &n.path().to_string_lossy(), (ns, name), &conf);
        if !out.ok {
            let e = out.expect_err("ADD").1;
            assert!(
                n.links().is_empty(),
                "{name}: {:?} left after: {e}\n{}",
                n.links(),
                self.node.agent_log()
            );
            return Err(e);
        }
        self.made.push((name.into(), n, ns.into(), conf));
        Ok(self.made.len() - 1)
    }

    fn ns(&self, i: usize) -> &Netns {
        &self.made[i].1
    }

    fn ip(&self, i: usize) -> String {
        self.ns(i).addrs("net1")[0]
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }
}

impl Drop for Pods<'_> {
    fn drop(&mut self) {
        for (name, n, ns, conf) in &self.made {
            let _ = self
                .node
                .shim("DEL", name, &n.path().to_string_lossy(), (ns, name), conf);
        }
    }
}

#[test]
fn tenants_on_one_master_and_one_bridge_are_isolated() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad_annotated(
        "tenant-a",
        "lan",
        &node.macvlan_conf("10.79.1.0/24"),
        &logical(&["10.79.1.0/24"]),
    );
    node.add_nad_annotated(
        "tenant-b",
        "lan",
        &node.macvlan_conf("10.79.2.0/24"),
        &logical(&["10.79.2.0/24"]),
    );
    // Overlaps tenant-a's carving of the same master.
    node.add_nad_annotated(
        "tenant-c",
        "lan",
        &node.macvlan_conf("10.79.1.128/25"),
        &logical(&["10.79.1.128/25"]),
    );
    // Its IPAM hands out addresses outside its carving.
    node.add_nad_annotated(
        "tenant-d",
        "lan",
        &node.macvlan_conf("10.79.6.0/24"),
        &logical(&["10.79.5.0/24"]),
    );
    // One bridge, both tenants; the host routes between their gateways (the bridge
    // plugin gives a bridge one gateway address: the second is added by hand).
    let bridge = trellis_rig::unique("trlb");
    for (t, subnet) in [("tenant-a", "10.79.7.0/24"), ("tenant-b", "10.79.8.0/24")] {
        let mut conf = node.bridge_conf("br", &bridge, subnet);
        conf["plugins"][0]["isGateway"] = json!(t == "tenant-a");
        node.add_nad_annotated(t, "br", &conf, &logical(&[subnet]));
    }
    // A plain network whose bridge plugin fails part way (its bridge has another
    // gateway address): it leaves the pod's veth, which the rollback's DEL removes.
    let bridge2 = trellis_rig::unique("trlb");
    node.host.sh(&format!(
        "ip link add {bridge2} type bridge && ip addr add 10.79.10.1/24 dev {bridge2} && ip link set {bridge2} up"
    ));
    node.add_nad(
        "tenant-e",
        "gw",
        &node.bridge_conf("gw", &bridge2, "10.79.9.0/24"),
    );
    // Plain networks on the wires the tenants share.
    node.add_nad("tenant-f", "lan", &node.macvlan_conf("10.79.2.0/24"));
    node.add_nad(
        "tenant-f",
        "br",
        &node.bridge_conf("br", &bridge, "10.79.11.0/24"),
    );

    // A logical NAD on a wire the node does not share out, and a plain one on the
    // shared master by an altname.
    node.add_nad_annotated(
        "tenant-g",
        "lan",
        &node.bridge_conf("lan", &bridge2, "10.79.12.0/24"),
        &logical(&["10.79.12.0/24"]),
    );
    // Longer than an interface name may be: only an altname can be.
    let alt = format!("{}-a-long-altname", trellis_rig::unique("tra"));
    node.host.sh(&format!(
        "ip link property add dev {} altname {alt}",
        node.master
    ));
    let mut by_alt = node.macvlan_conf("10.79.13.0/24");
    by_alt["master"] = json!(alt);
    node.add_nad("tenant-h", "lan", &by_alt);
    // A master that is empty (the plugin then takes the default-route device), and
    // one inside the pod (linkInContainer: the pod's own logical net1).
    let mut empty = node.macvlan_conf("10.79.14.0/24");
    empty["master"] = json!("");
    node.add_nad("tenant-i", "lan", &empty);
    let mut inside = node.macvlan_conf("10.79.15.0/24");
    inside["master"] = json!("net1");
    inside["linkInContainer"] = json!(true);
    node.add_nad("tenant-j", "lan", &inside);
    node.top_toml.push_str(&format!(
        "\nlogical_physical_networks = [\"master:{}\", \"bridge:{bridge}\"]\n",
        node.master
    ));

    // Without the Kubernetes API the agent cannot see whether a pod may send raw
    // frames: it refuses, unless told to trust the pods; nothing is left.
    node.start_agent();
    let mut pods = Pods {
        node: &node,
        made: Vec::new(),
    };
    let e = pods.add("tenant-a", "a0", "lan").unwrap_err();
    assert!(
        e.contains("logical_trust_pod_privileges") && e.contains("master:"),
        "{e}"
    );
    drop(pods);
    node.stop_agent();
    node.top_toml
        .push_str("\nlogical_trust_pod_privileges = true\n");
    node.start_agent();
    let mut pods = Pods {
        node: &node,
        made: Vec::new(),
    };
    let a1 = pods.add("tenant-a", "a1", "lan").unwrap();
    let a2 = pods.add("tenant-a", "a2", "lan").unwrap();
    let b1 = pods.add("tenant-b", "b1", "lan").unwrap();

    // Not hot-plugged into a running pod (its delegate brings the link up before the
    // programs could isolate it): refused, nothing changed.
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["attach", "--pod", "tenant-a/a1", "lan@late0", "--socket"])
        .arg(node.socket())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("cannot be added to a running pod"),
        "{err}"
    );
    assert!(!pods.ns(a1).links().contains(&"late0".to_string()));

    // Within a tenant: free. (What a1 dropped so far is b1's gratuitous ARP from the
    // macvlan plugin: about an address of tenant b.)
    let before = drops(&node, "a1");
    assert_eq!(before.1, 0);
    assert!(pods.ns(a1).ping(&pods.ip(a2)));
    assert_eq!(drops(&node, "a1"), before);

    // Across tenants on the shared master (routes make the other subnet reachable on
    // the wire): dropped at the sender's egress, counted.
    // ARP between them is dropped (its target is the other tenant's): the test puts
    // the neighbours in by hand so that IP packets are sent at all.
    pods.ns(a1).sh("ip route add 10.79.2.0/24 dev net1");
    pods.ns(b1).sh("ip route add 10.79.1.0/24 dev net1");
    let arp_before = drops(&node, "a1").1;
    assert!(!pods.ns(a1).ping(&pods.ip(b1)));
    assert!(drops(&node, "a1").1 > arp_before, "a1's ARP for b1 dropped");
    for (from, to) in [(a1, b1), (b1, a1)] {
        let mac = pods
            .ns(to)
            .sh("ip -o link show dev net1 | sed 's/.*link\\/ether \\([^ ]*\\).*/\\1/'");
        pods.ns(from).sh(&format!(
            "ip neigh replace {} lladdr {} dev net1 nud permanent",
            pods.ip(to),
            mac.trim()
        ));
    }
    let arp_drops = drops(&node, "a1").1;
    assert!(!pods.ns(a1).ping(&pods.ip(b1)));
    let (_, out1) = drops(&node, "a1");
    assert!(
        out1 >= arp_drops + 2,
        "a1's pings to b1 dropped at its egress: {arp_drops} -> {out1}"
    );

    // A pod that takes an address of the other tenant gets nothing out with it. (b1
    // has dropped tenant a's ARP broadcasts on the shared wire before: only what
    // comes now counts.)
    let b1_in = drops(&node, "b1").0;
    pods.ns(a1).sh("ip addr add 10.79.2.99/32 dev net1");
    let spoofed = pods.ns(a1).try_sh(&format!(
        "ping -c 2 -i 0.2 -W 1 -I 10.79.2.99 {}",
        pods.ip(b1)
    ));
    assert!(!spoofed.status.success());
    let (_, out2) = drops(&node, "a1");
    assert!(out2 >= out1 + 2, "spoofed pings dropped: {out1} -> {out2}");
    assert_eq!(drops(&node, "b1").0, b1_in, "nothing reached b1");

    // A sender on the wire that is no trellis pod, with an address of tenant b: what
    // it sends a1 is dropped at a1's ingress.
    node.host.sh(&format!(
        "ip link add trlh link {} type macvlan mode bridge && ip addr add 10.79.2.200/24 dev trlh && \
         ip link set trlh up && ip route add 10.79.1.0/24 dev trlh",
        node.master
    ));
    assert!(!node.host.ping(&pods.ip(a1)));
    assert!(drops(&node, "a1").0 >= 2, "{:?}", drops(&node, "a1"));

    // Overlapping carvings of one physical network: refused, naming both.
    let e = pods.add("tenant-c", "c1", "lan").unwrap_err();
    assert!(
        e.contains("overlaps") && e.contains("tenant-a/lan") && e.contains("10.79.1.128/25"),
        "{e}"
    );
    // A NAD that is no logical network on the shared master (by its name or an
    // altname) or bridge: refused. A logical one on a wire not shared out: refused.
    for (ns, net) in [("tenant-f", "lan"), ("tenant-f", "br"), ("tenant-h", "lan")] {
        let e = pods.add(ns, &format!("{ns}-{net}"), net).unwrap_err();
        assert!(
            e.contains("trellis.dev/logical-network") && e.contains("must be a logical network"),
            "{e}"
        );
    }
    let e = pods.add("tenant-g", "g-lan", "lan").unwrap_err();
    assert!(e.contains("logical_physical_networks"), "{e}");
    let e = pods.add("tenant-i", "i-lan", "lan").unwrap_err();
    assert!(e.contains("cannot be told"), "{e}");
    let e = pods.add("tenant-j", "j-lan", "lan").unwrap_err();
    assert!(e.contains("linkInContainer"), "{e}");
    // Addresses outside the carving: refused, the address released.
    let e = pods.add("tenant-d", "d9", "lan").unwrap_err();
    assert!(e.contains("outside") && e.contains("10.79.5.0/24"), "{e}");
    assert!(
        node.reservations().iter().all(|r| !r.contains("10.79.6.")),
        "{:?}",
        node.reservations()
    );

    // The same on a bridge whose host side routes between the tenants' subnets.
    node.host.sh("sysctl -qw net.ipv4.ip_forward=1");
    let d1 = pods.add("tenant-a", "d1", "br").unwrap();
    let d2 = pods.add("tenant-a", "d2", "br").unwrap();
    node.host
        .sh(&format!("ip addr add 10.79.8.1/24 dev {bridge}"));
    let e1 = pods.add("tenant-b", "e1", "br").unwrap();
    assert!(pods.ns(d1).ping(&pods.ip(d2)));
    pods.ns(d1).sh("ip route add 10.79.8.0/24 via 10.79.7.1");
    pods.ns(e1).sh("ip route add 10.79.7.0/24 via 10.79.8.1");
    assert!(!pods.ns(d1).ping(&pods.ip(e1)));
    assert!(drops(&node, "d1").1 >= 2, "{:?}", drops(&node, "d1"));
    // (Pods::add checks that the refused pod has no interface left.)
    let e = pods.add("tenant-e", "g1", "gw").unwrap_err();
    assert!(e.contains("bridge addr"), "{e}");
    drop(pods);
    assert!(node.records().is_empty(), "{:?}", node.records());
    node.host.sh(&format!("ip link del {bridge2}"));
}

/// Through the Kubernetes API (a fake of it): the pod's spec decides whether it may
/// join a logical network on a macvlan master, the first carving of a subnet in the
/// cluster keeps it, and a plain NAD stays off the shared master.
#[test]
fn the_pod_spec_and_the_clusters_nads_decide() {
    require_root!();
    const NODE: &str = "node-l";
    let (mut node, api) = trellis_rig::node::kube_node(NODE);
    node.dataplane = true;
    api.put_nad_annotated(
        "tenant-a",
        "lan",
        &node.macvlan_conf("10.79.21.0/24"),
        &logical(&["10.79.21.0/24"]),
    );
    // Carved later, overlapping: never on this node before, still refused.
    api.put_nad_annotated(
        "tenant-b",
        "lan",
        &node.macvlan_conf("10.79.21.0/25"),
        &logical(&["10.79.21.0/25"]),
    );
    api.put_nad("tenant-c", "plain", &node.macvlan_conf("10.79.22.0/24"));
    node.top_toml.push_str(&format!(
        "\nlogical_physical_networks = [\"master:{}\"]\n",
        node.master
    ));
    let safe = json!({"capabilities": {"drop": ["ALL"]}});
    let pods = [
        (
            "tenant-a",
            "safe",
            "lan",
            json!([{"name": "c", "image": "pause", "securityContext": safe}]),
        ),
        (
            "tenant-a",
            "raw",
            "lan",
            json!([{"name": "c", "image": "pause"}]),
        ),
        (
            "tenant-a",
            "admin",
            "lan",
            json!([{"name": "c", "image": "pause",
            "securityContext": {"capabilities": {"add": ["NET_ADMIN"], "drop": ["ALL"]}}}]),
        ),
        (
            "tenant-b",
            "late",
            "lan",
            json!([{"name": "c", "image": "pause", "securityContext": safe}]),
        ),
        (
            "tenant-c",
            "plain",
            "plain",
            json!([{"name": "c", "image": "pause"}]),
        ),
    ];
    for (ns, name, net, containers) in &pods {
        api.put_pod_with_containers(
            ns,
            name,
            &format!("uid-{name}"),
            NODE,
            &networks_annotation(net),
            containers.clone(),
        );
    }
    node.start_agent();
    trellis_rig::node::wait_ready(&node);
    let conf = node.shim_conf(None);
    let mut made = Vec::new();
    let mut add = |ns: &str, name: &str| {
        let n = Netns::new("trl");
        let out = node.shim("ADD", name, &n.path().to_string_lossy(), (ns, name), &conf);
        let r = if out.ok {
            Ok(())
        } else {
            let e = out.expect_err("ADD").1;
            assert!(
                n.links().is_empty(),
                "{name}: {:?} left after: {e}",
                n.links()
            );
            Err(e)
        };
        made.push((ns.to_string(), name.to_string(), n));
        r
    };
    add("tenant-a", "safe").unwrap();
    let e = add("tenant-a", "raw").unwrap_err();
    assert!(e.contains("\"c\" does not drop capability NET_RAW"), "{e}");
    let e = add("tenant-a", "admin").unwrap_err();
    assert!(e.contains("adds capability NET_ADMIN"), "{e}");
    let e = add("tenant-b", "late").unwrap_err();
    assert!(
        e.contains("tenant-a/lan") && e.contains("created first"),
        "{e}"
    );
    let e = add("tenant-c", "plain").unwrap_err();
    assert!(e.contains("must be a logical network"), "{e}");
    for (ns, name, n) in &made {
        node.shim("DEL", name, &n.path().to_string_lossy(), (ns, name), &conf)
            .expect_ok("DEL");
    }
    assert!(node.records().is_empty(), "{:?}", node.records());
}

/// What a slot on a logical network lets through, frame by frame
/// (BPF_PROG_TEST_RUN): IP with both ends inside, ARP about addresses inside,
/// neighbour discovery about targets inside (router advertisements only in), and
/// nothing else: no other EtherType, no second VLAN tag.
#[test]
fn a_logical_slot_passes_only_its_own_addresses() {
    use std::net::{Ipv4Addr, Ipv6Addr};
    use trellis_agent::dataplane::{Dataplane, Owner};
    use trellis_ebpf_common::{DIR_EGRESS, DIR_INGRESS, TCX_DROP, TCX_NEXT};
    use trellis_rig::packets::{arp, frame, nd, tagged, UDP};
    require_root!();
    let dir = trellis_rig::BpfDir::new("trellis-logical");
    let mut dp = Dataplane::open(&dir.0).expect("load the programs");
    let l = trellis_agent::logical::Logical {
        physical: "master:eth1".into(),
        subnets: ["10.1.0.0/24", "fd00:1::/64"]
            .iter()
            .map(|s| trellis_agent::logical::Subnet::parse(s).unwrap())
            .collect(),
    };
    let owner = Owner {
        namespace: "t".into(),
        pod: "p".into(),
        network: "t/lan".into(),
        ifname: "net1".into(),
        container: "c-p".into(),
    };
    let probe = dp
        .probe_with(&owner, &Default::default(), Some(l.to_map()))
        .expect("probe");
    let v4 = |s: &str| -> Ipv4Addr { s.parse().unwrap() };
    let v6 = |s: &str| -> Ipv6Addr { s.parse().unwrap() };
    let udp = |a: &str, b: &str| frame(a.parse().unwrap(), b.parse().unwrap(), UDP, 53, 64);
    let mut other = udp("10.1.0.1", "10.1.0.2");
    other[12..14].copy_from_slice(&0x88b5u16.to_be_bytes());
    let cases: Vec<(&str, Vec<u8>, u32, i32)> = vec![
        (
            "IPv4 inside",
            udp("10.1.0.1", "10.1.0.2"),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "IPv4 to another tenant",
            udp("10.1.0.1", "10.2.0.2"),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "IPv4 from another tenant",
            udp("10.2.0.1", "10.1.0.2"),
            DIR_INGRESS,
            TCX_DROP,
        ),
        (
            "IPv6 inside",
            udp("fd00:1::1", "fd00:1::2"),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "IPv6 link-local echo",
            frame(
                "fe80::1".parse().unwrap(),
                "fd00:1::2".parse().unwrap(),
                trellis_rig::packets::ICMPV6,
                0,
                64,
            ),
            DIR_INGRESS,
            TCX_DROP,
        ),
        (
            "one VLAN tag",
            tagged(&udp("10.1.0.1", "10.1.0.2"), 0x8100, 5),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "two VLAN tags",
            tagged(&tagged(&udp("10.1.0.1", "10.1.0.2"), 0x8100, 5), 0x88a8, 7),
            DIR_EGRESS,
            TCX_DROP,
        ),
        ("another EtherType", other, DIR_EGRESS, TCX_DROP),
        (
            "ARP inside",
            arp(v4("10.1.0.1"), v4("10.1.0.2")),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "ARP probe",
            arp(v4("0.0.0.0"), v4("10.1.0.2")),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "ARP claiming another tenant's address",
            arp(v4("10.2.0.9"), v4("10.2.0.9")),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "ARP for another tenant's address",
            arp(v4("10.1.0.1"), v4("10.2.0.1")),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "ARP answering a probe",
            arp(v4("10.1.0.1"), v4("0.0.0.0")),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "ARP from nobody to nobody",
            arp(v4("0.0.0.0"), v4("0.0.0.0")),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "NS for an address inside",
            nd(135, v6("fe80::1"), v6("ff02::1:ff00:2"), v6("fd00:1::2")),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "NS for a link-local address",
            nd(135, v6("fe80::1"), v6("ff02::1:ff00:2"), v6("fe80::2")),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "NA for another tenant's address",
            nd(136, v6("fe80::1"), v6("ff02::1"), v6("fd00:2::9")),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "NS from another tenant's address",
            nd(135, v6("fd00:2::9"), v6("ff02::1:ff00:2"), v6("fe80::2")),
            DIR_INGRESS,
            TCX_DROP,
        ),
        (
            "NS to another tenant's address",
            nd(135, v6("fe80::1"), v6("fd00:2::9"), v6("fe80::2")),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "NA from the unspecified address",
            nd(136, Ipv6Addr::UNSPECIFIED, v6("ff02::1"), v6("fd00:1::2")),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "router advertisement from a global address",
            nd(134, v6("fd00:2::1"), v6("ff02::1"), Ipv6Addr::UNSPECIFIED),
            DIR_INGRESS,
            TCX_DROP,
        ),
        (
            "router solicitation",
            nd(133, v6("fe80::1"), v6("ff02::2"), Ipv6Addr::UNSPECIFIED),
            DIR_EGRESS,
            TCX_NEXT,
        ),
        (
            "router advertisement in",
            nd(134, v6("fe80::9"), v6("ff02::1"), Ipv6Addr::UNSPECIFIED),
            DIR_INGRESS,
            TCX_NEXT,
        ),
        (
            "router advertisement out",
            nd(134, v6("fe80::1"), v6("ff02::1"), Ipv6Addr::UNSPECIFIED),
            DIR_EGRESS,
            TCX_DROP,
        ),
        (
            "a cut ARP packet",
            arp(v4("10.1.0.1"), v4("10.1.0.2"))[..30].to_vec(),
            DIR_EGRESS,
            TCX_DROP,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, f, d, want) in &cases {
        let (got, _) = probe.run(*d, f, 1).expect("test run");
        if got != *want {
            wrong.push(format!("{what}: {got}, want {want}"));
        }
    }
    assert!(wrong.is_empty(), "{wrong:#?}");
    dp.detach(probe.slot).unwrap();
}
