//! End to end through real containerd (CRI): trellis-cni is the node's only CNI
//! config; pods ask for extra networks by annotation and get them.

use serde_json::json;
use std::collections::HashMap;
use trellis_rig::containerd::Containerd;
use trellis_rig::netns::Netns;
use trellis_rig::node::TestNode;
use trellis_rig::require_root;
use trellis_rig::traffic::{counter, interface, kernel_counts as kernel, trellis_stats, udp};

fn record(node: &TestNode, sandbox: &str) -> serde_json::Value {
    node.record(sandbox)
}

fn networks(value: &str) -> HashMap<String, String> {
    HashMap::from([("k8s.v1.cni.cncf.io/networks".to_string(), value.to_string())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_get_every_network_and_leave_nothing_behind() {
    require_root!();
    let mut node = TestNode::new();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.79.1.0/24"));
    let br = trellis_rig::unique("trx");
    node.add_nad(
        "pods",
        "br-b",
        &node.bridge_conf("br-b", &br, "10.79.2.0/24"),
    );
    node.start_agent();
    let ctrd = Containerd::start(&node.host, &node.path("containerd"), &node.socket());
    let mut cri = ctrd.cri().await;
    let logs = ctrd.log_dir();

    let a = cri
        .run_pod("pods", "pod-a", networks("mv-a, pods/br-b@data0"), &logs)
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox a: {e}\nagent: {}", node.agent_log()));
    let b = cri
        .run_pod(
            "pods",
            "pod-b",
            networks(r#"[{"name":"br-b","interface":"data0"},{"name":"mv-a","namespace":"pods"}]"#),
            &logs,
        )
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox b: {e}\nagent: {}", node.agent_log()));
    assert!(cri.pod_ip(&a).await.unwrap().starts_with("10.77.0."));

    let ns_a = Netns::at(record(&node, &a)["netns"].as_str().unwrap());
    let ns_b = Netns::at(record(&node, &b)["netns"].as_str().unwrap());
    let mut links_a = ns_a.links();
    links_a.sort();
    assert_eq!(links_a, ["data0", "eth0", "net1"]);
    let mut links_b = ns_b.links();
    links_b.sort();
    assert_eq!(links_b, ["data0", "eth0", "net2"]);
    for (from_if, to_if) in [("eth0", "eth0"), ("net1", "net2"), ("data0", "data0")] {
        let dst = ns_b.addrs(to_if)[0].split('/').next().unwrap().to_string();
        assert!(
            ns_a.ping(&dst),
            "pod-a {from_if} cannot reach pod-b {to_if} at {dst}"
        );
    }
    let status = &record(&node, &a)["network_status"];
    assert_eq!(status.as_array().unwrap().len(), 3, "{status}");
    assert_eq!(status[2]["name"], json!("pods/br-b"));

    for id in [&a, &b] {
        cri.stop_pod(id).await.unwrap();
        cri.remove_pod(id).await.unwrap();
    }
    assert!(
        node.records().is_empty(),
        "records left: {:?}",
        node.records()
    );
    assert!(
        node.reservations().is_empty(),
        "IPs left: {:?}",
        node.reservations()
    );
    assert!(
        node.host_links().iter().all(|l| !l.starts_with("veth")),
        "host links left: {:?}",
        node.host_links()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_annotations_fail_run_pod_sandbox_with_the_reason() {
    require_root!();
    let mut node = TestNode::new();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.79.3.0/24"));
    node.start_agent();
    let ctrd = Containerd::start(&node.host, &node.path("containerd"), &node.socket());
    let mut cri = ctrd.cri().await;
    let logs = ctrd.log_dir();
    for (i, (annotation, want)) in [
        (r#"[{"name":"mv-a""#, "invalid JSON"),
        ("mv-a,nope", "pods/nope not found"),
        ("mv-a@eth0", "used twice"),
    ]
    .into_iter()
    .enumerate()
    {
        let err = cri
            .run_pod("pods", &format!("bad-{i}"), networks(annotation), &logs)
            .await
            .expect_err("RunPodSandbox should fail");
        assert!(
            err.message().contains(want),
            "{annotation}: {}",
            err.message()
        );
    }
    // containerd removes a sandbox whose network setup failed (our cleanup DEL worked);
    // nothing of ours may be left either.
    let left = cri.list_pods().await.unwrap();
    assert!(left.is_empty(), "sandboxes left: {left:?}");
    assert!(
        node.records().is_empty(),
        "records left: {:?}",
        node.records()
    );
    assert!(
        node.reservations().is_empty(),
        "IPs left: {:?}",
        node.reservations()
    );
    assert!(
        node.host_links().iter().all(|l| !l.starts_with("veth")),
        "host links left: {:?}",
        node.host_links()
    );
}

fn stats(node: &TestNode, pod: &str) -> Vec<serde_json::Value> {
    trellis_stats(&node.bpf_dir, &["--namespace", "pods", "--pod", pod])
}

/// (rx packets, tx packets, rx drops) of `ifname` on `network` in `stats`.
fn counted(stats: &[serde_json::Value], network: &str, ifname: &str) -> (u64, u64, u64) {
    let s = interface(stats, Some(network), ifname);
    (
        counter(s, "ingress", "packets"),
        counter(s, "egress", "packets"),
        counter(s, "ingress", "drops"),
    )
}

/// Pods made by containerd with two extra networks, one with an ACL: `trellis stats`
/// counts each network's traffic as the kernel does, and the ACL's drops exactly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_network_counts_and_acl_drops_for_containerd_pods() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.79.4.0/24"));
    let br = trellis_rig::unique("trx");
    node.add_nad_annotated(
        "pods",
        "br-acl",
        &node.bridge_conf("br-acl", &br, "10.79.5.0/24"),
        &[(
            "trellis.dev/acl".to_string(),
            json!({"default": "allow", "rules": [
                {"action": "deny", "direction": "ingress", "cidr": "10.79.5.0/24", "protocol": "udp", "ports": "9000-9099"}
            ]})
            .to_string(),
        )]
        .into(),
    );
    node.start_agent();
    let ctrd = Containerd::start(&node.host, &node.path("containerd"), &node.socket());
    let mut cri = ctrd.cri().await;
    let logs = ctrd.log_dir();
    let mut pods = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let id = cri
            .run_pod("pods", name, networks("mv-a, br-acl"), &logs)
            .await
            .unwrap_or_else(|e| panic!("RunPodSandbox {name}: {e}\nagent: {}", node.agent_log()));
        let ns = Netns::at(record(&node, &id)["netns"].as_str().unwrap());
        ns.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
        pods.push((id, ns));
    }
    // The ACL network is filtered at once; the others attach just after ADD.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while stats(&node, "pod-a").len() < 3 || stats(&node, "pod-b").len() < 3 {
        assert!(std::time::Instant::now() < deadline, "{}", node.agent_log());
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let (a, b) = (&pods[0].1, &pods[1].1);
    let ip = |ns: &Netns, ifname: &str| ns.addrs(ifname)[0].split('/').next().unwrap().to_string();
    let (b_mv, b_br) = (ip(b, "net1"), ip(b, "net2"));

    // The kernel's counters and ours are read one after the other: read again until
    // no packet (an ARP exchange, say) arrived in between.
    let snapshot = || loop {
        let read = || {
            (
                kernel(a, "net1"),
                counted(&stats(&node, "pod-a"), "pods/mv-a", "net1"),
                kernel(b, "net2"),
                counted(&stats(&node, "pod-b"), "pods/br-acl", "net2"),
            )
        };
        let first = read();
        std::thread::sleep(std::time::Duration::from_millis(200));
        if read() == first {
            return first;
        }
    };
    let before = snapshot();
    assert!(a
        .sh(&format!("ping -c 5 -i 0.2 -W 2 {b_mv}"))
        .contains("5 received"));
    assert_eq!(
        udp(a, b, format!("{b_br}:9050").parse().unwrap(), 4),
        0,
        "denied"
    );
    assert_eq!(
        udp(a, b, format!("{b_br}:9100").parse().unwrap(), 3),
        3,
        "allowed"
    );
    let after = snapshot();
    // mv-a on pod-a: exactly what the kernel counted, at least the 5 pings each way.
    let k = (after.0 .0 - before.0 .0, after.0 .1 - before.0 .1);
    let ours = (after.1 .0 - before.1 .0, after.1 .1 - before.1 .1);
    assert_eq!(ours, k, "pods/mv-a net1 (rx, tx): trellis vs kernel");
    assert!(ours.0 >= 5 && ours.1 >= 5, "{ours:?}");
    // br-acl on pod-b: the 4 denied datagrams are drops (the kernel counted them as
    // received before tc dropped them), the 3 allowed ones are packets.
    let drops = after.3 .2 - before.3 .2;
    assert_eq!(drops, 4);
    let rx = after.3 .0 - before.3 .0;
    assert_eq!(
        rx + drops,
        after.2 .0 - before.2 .0,
        "rx + drops = the kernel's rx"
    );
    assert!(rx >= 3, "{rx}");

    for (id, _) in &pods {
        cri.stop_pod(id).await.unwrap();
        cri.remove_pod(id).await.unwrap();
    }
    assert!(stats(&node, "pod-a").is_empty() && stats(&node, "pod-b").is_empty());
    assert_eq!(node.live_hooks(), 0);
}
