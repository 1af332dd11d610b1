//! The agent with `networks.source = "kubernetes"` against a fake of the API
//! endpoints it uses (no kube-apiserver can run here): pods of this node and NADs from
//! watches, a GET when the cache is behind, network-status patched onto the pod.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Duration;
use trellis_rig::fake_apiserver::Kind;
use trellis_rig::netns::Netns;
use trellis_rig::node::{kube_networks, kube_node, networks_annotation, wait_ready, TestNode};
use trellis_rig::require_root;

const NODE: &str = "node-a";
const NADS: &str = "/apis/k8s.cni.cncf.io/v1/network-attachment-definitions";

fn add(
    node: &TestNode,
    container: &str,
    pod: &Netns,
    name: &str,
) -> trellis_rig::node::ShimOutcome {
    node.shim(
        "ADD",
        container,
        &pod.path().to_string_lossy(),
        ("pods", name),
        &node.shim_conf(None),
    )
}

fn del(node: &TestNode, container: &str, pod: &Netns, name: &str) {
    node.shim(
        "DEL",
        container,
        &pod.path().to_string_lossy(),
        ("pods", name),
        &node.shim_conf(None),
    )
    .expect_ok("DEL");
}

fn wait_log(node: &TestNode, line: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !node.agent_log().contains(line) {
        assert!(
            std::time::Instant::now() < deadline,
            "no {line:?} in the agent's log:\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn assert_clean(node: &TestNode, pod: &Netns) {
    assert!(pod.links().is_empty(), "pod links left: {:?}", pod.links());
    // Bridges the bridge plugin made stay, as they do on a real node; veths must not.
    assert!(
        node.host_links().iter().all(|l| !l.starts_with("veth")),
        "host links left: {:?}",
        node.host_links()
    );
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
}

#[test]
fn pods_and_nads_come_from_watches_and_network_status_is_patched() {
    require_root!();
    let (mut node, api) = kube_node(NODE);
    // As Multus posts them (off by default: one API write per ADD).
    *node.networks_toml.as_mut().unwrap() += "added_interface_events = true\n";

    api.put_nad("pods", "mv-a", &node.macvlan_conf("10.78.1.0/24"));
    api.put_pod(
        "pods",
        "a",
        "uid-c1",
        NODE,
        &networks_annotation("mv-a, late@data0"),
    );
    api.put_pod("pods", "elsewhere", "uid-x", "node-b", &BTreeMap::new());
    node.start_agent();
    wait_ready(&node);

    // A NAD created after the caches synced reaches the agent through its watch.
    let br = trellis_rig::unique("trx");
    let rv = api.put_nad(
        "pods",
        "late",
        &node.bridge_conf("late", &br, "10.78.2.0/24"),
    );
    assert!(api.wait_delivered(Kind::Nad, rv, Duration::from_secs(10)));
    // Sent is not cached: the agent logs the change once its cache holds it.
    wait_log(&node, "NetworkAttachmentDefinition changed nad=pods/late");

    let pod = Netns::new("trp");
    let r = add(&node, "c1", &pod, "a").expect_ok("ADD");
    let ifs: Vec<&str> = r["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["sandbox"].as_str().is_some_and(|s| !s.is_empty()))
        .map(|i| i["name"].as_str().unwrap())
        .collect();
    assert_eq!(ifs, ["eth0", "net1", "data0"], "{r}");
    assert!(pod.addrs("data0")[0].starts_with("10.78.2."));

    let reqs = api.requests();
    // Only this node's pods are listed and watched.
    let pod_lists: Vec<_> = reqs.iter().filter(|q| q.path == "/api/v1/pods").collect();
    assert!(
        pod_lists.iter().any(|q| q.is_watch()),
        "no pod watch: {reqs:?}"
    );
    for q in &pod_lists {
        assert_eq!(
            q.query.get("fieldSelector").map(String::as_str),
            Some("spec.nodeName=node-a"),
            "{q:?}"
        );
    }
    assert!(reqs.iter().any(|q| q.path == NADS && q.is_watch()));
    // Both the pod and the late NAD were served from the caches.
    assert!(
        !reqs
            .iter()
            .any(|q| q.method == "GET" && q.path.contains("/namespaces/")),
        "cache miss where the watch had the object: {reqs:?}\n{}",
        node.agent_log()
    );

    // network-status, patched onto the pod's status subresource as a merge patch.
    let patches: Vec<_> = reqs.iter().filter(|q| q.method == "PATCH").collect();
    assert_eq!(patches.len(), 1, "{patches:?}");
    assert_eq!(patches[0].path, "/api/v1/namespaces/pods/pods/a/status");
    let stored = api.pod("pods", "a").unwrap();
    let status: Value = serde_json::from_str(
        stored["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
            .as_str()
            .expect("network-status annotation"),
    )
    .unwrap();
    let entries = status.as_array().unwrap();
    assert_eq!(entries.len(), 3, "{status}");
    assert_eq!(entries[0]["interface"], "eth0");
    assert_eq!(entries[0]["default"], true);
    assert_eq!(entries[1]["name"], "pods/mv-a");
    assert_eq!(entries[1]["interface"], "net1");
    assert_eq!(entries[2]["name"], "pods/late");
    assert_eq!(entries[2]["interface"], "data0");
    let data_ip = pod.addrs("data0")[0].split('/').next().unwrap().to_string();
    assert_eq!(entries[2]["ips"], json!([data_ip]), "{status}");
    assert!(entries[2]["mac"].as_str().is_some_and(|m| m.len() == 17));
    // The pod's own annotations are kept.
    assert_eq!(
        stored["metadata"]["annotations"]["k8s.v1.cni.cncf.io/networks"],
        "mv-a, late@data0"
    );
    // One AddedInterface event per interface (posted in the background).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let added = loop {
        let added: Vec<String> = api
            .requests()
            .iter()
            .filter(|q| q.method == "POST" && q.path.ends_with("/events"))
            .map(|q| serde_json::from_str::<Value>(&q.body).unwrap())
            .filter(|e| e["reason"] == "AddedInterface")
            .map(|e| e["message"].as_str().unwrap().to_string())
            .collect();
        if added.len() >= 3 || std::time::Instant::now() > deadline {
            break added;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(added.len(), 3, "{added:?}");
    assert!(
        added
            .iter()
            .any(|m| m.starts_with("Add data0 [10.78.2.") && m.ends_with("from pods/late")),
        "{added:?}"
    );

    del(&node, "c1", &pod, "a");
    assert_clean(&node, &pod);
}

#[test]
fn cache_miss_falls_back_to_get_and_api_errors_are_named() {
    require_root!();
    let (mut node, api) = kube_node(NODE);
    node.start_agent();
    wait_ready(&node);

    // Watches stall: the pod and NAD exist only in the API, not in the caches.
    api.hold_watches(true);
    api.put_nad("pods", "mv-a", &node.macvlan_conf("10.78.1.0/24"));
    api.put_pod("pods", "b", "uid-c2", NODE, &networks_annotation("mv-a"));
    let pod = Netns::new("trp");
    add(&node, "c2", &pod, "b").expect_ok("ADD with stale caches");
    assert_eq!(pod.links().len(), 2, "{:?}", pod.links());
    let reqs = api.requests();
    assert!(reqs
        .iter()
        .any(|q| q.method == "GET" && q.path == "/api/v1/namespaces/pods/pods/b"));
    assert!(reqs.iter().any(|q| q.method == "GET"
        && q.path
            == "/apis/k8s.cni.cncf.io/v1/namespaces/pods/network-attachment-definitions/mv-a"));
    del(&node, "c2", &pod, "b");
    assert_clean(&node, &pod);

    // A pod the API does not have.
    let (_, msg) = add(&node, "c3", &pod, "ghost").expect_err("ADD for a missing pod");
    assert!(msg.contains("pods/ghost"), "{msg}");
    assert_clean(&node, &pod);

    // A pod naming a NAD the API does not have.
    api.put_pod(
        "pods",
        "c",
        "uid-c4",
        NODE,
        &networks_annotation("mv-a, nope"),
    );
    let (_, msg) = add(&node, "c4", &pod, "c").expect_err("ADD naming a missing NAD");
    assert!(msg.contains("pods/nope"), "{msg}");
    assert_clean(&node, &pod);

    // Same name, another pod (the runtime's uid differs from the API's).
    let (_, msg) = add(&node, "c5", &pod, "c").expect_err("ADD for a re-created pod");
    assert!(msg.contains("uid-c5"), "{msg}");
    assert_clean(&node, &pod);
}

#[test]
fn unreachable_api_makes_status_fail_and_add_name_it() {
    require_root!();
    let mut node = TestNode::new();
    // Nothing listens on this port in the node's fresh namespace.
    let kubeconfig = "apiVersion: v1\nkind: Config\nclusters:\n- name: x\n  cluster:\n    server: http://127.0.0.1:9\ncontexts:\n- name: x\n  context:\n    cluster: x\n    user: u\nusers:\n- name: u\n  user: {}\ncurrent-context: x\n";
    std::fs::write(node.path("kubeconfig"), kubeconfig).unwrap();
    node.networks_toml = Some(kube_networks(&node, NODE));
    node.start_agent();
    let (code, msg) = node
        .shim("STATUS", "", "", ("", ""), &node.shim_conf(None))
        .expect_err("STATUS without an API server");
    assert_eq!(code, 50, "{msg}");
    assert!(msg.contains("not synced"), "{msg}");

    let pod = Netns::new("trp");
    let (code, msg) = add(&node, "c1", &pod, "a").expect_err("ADD without an API server");
    assert_ne!(code, 0);
    assert!(msg.contains("pod lookup"), "{msg}");
    assert_clean(&node, &pod);
}
