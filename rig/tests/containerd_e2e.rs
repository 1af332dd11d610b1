//! End to end through real containerd (CRI): trellis-cni is the node's only CNI
//! config; pods ask for extra networks by annotation and get them.

use serde_json::json;
use std::collections::HashMap;
use trellis_rig::containerd::Containerd;
use trellis_rig::netns::Netns;
use trellis_rig::node::TestNode;
use trellis_rig::require_root;

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
