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
    // A plain network whose bridge plugin fails part way (a second gateway address
    // on the bridge): it leaves the pod's veth, which the rollback's DEL removes.
    node.add_nad(
        "tenant-e",
        "gw",
        &node.bridge_conf("gw", &bridge, "10.79.9.0/24"),
    );
    node.start_agent();
    let mut pods = Pods {
        node: &node,
        made: Vec::new(),
    };
    let a1 = pods.add("tenant-a", "a1", "lan").unwrap();
    let a2 = pods.add("tenant-a", "a2", "lan").unwrap();
    let b1 = pods.add("tenant-b", "b1", "lan").unwrap();

    // Within a tenant: free.
    assert!(pods.ns(a1).ping(&pods.ip(a2)));
    assert_eq!(drops(&node, "a1"), (0, 0));

    // Across tenants on the shared master (routes make the other subnet reachable on
    // the wire): dropped at the sender's egress, counted.
    pods.ns(a1).sh("ip route add 10.79.2.0/24 dev net1");
    pods.ns(b1).sh("ip route add 10.79.1.0/24 dev net1");
    assert!(!pods.ns(a1).ping(&pods.ip(b1)));
    let (_, out1) = drops(&node, "a1");
    assert!(out1 >= 2, "a1's pings to b1 dropped at its egress: {out1}");

    // A pod that takes an address of the other tenant gets nothing out with it.
    pods.ns(a1).sh("ip addr add 10.79.2.99/32 dev net1");
    let spoofed = pods.ns(a1).try_sh(&format!(
        "ping -c 2 -i 0.2 -W 1 -I 10.79.2.99 {}",
        pods.ip(b1)
    ));
    assert!(!spoofed.status.success());
    let (_, out2) = drops(&node, "a1");
    assert!(out2 >= out1 + 2, "spoofed pings dropped: {out1} -> {out2}");
    assert_eq!(drops(&node, "b1").0, 0, "nothing reached b1");

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
}
