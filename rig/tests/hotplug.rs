//! Hot-plug on real parts: a running pod's networks change when its networks
//! annotation is edited (the Kubernetes source's pod watch, from the fake API server)
//! or through `trellis attach` / `trellis detach` (files source), with traffic, counters
//! and ACLs on the new interfaces, and nothing left after removal or the pod's DEL.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use trellis_rig::fake_apiserver::FakeApiServer;
use trellis_rig::netns::Netns;
use trellis_rig::node::{kube_node, networks_annotation, wait_ready, TestNode};
use trellis_rig::require_root;
use trellis_rig::traffic::trellis_stats;

const NODE: &str = "node-h";

fn deny_icmp_in(subnet: &str) -> BTreeMap<String, String> {
    let acl = json!({"default": "allow", "rules": [
        {"action": "deny", "direction": "ingress", "cidr": subnet, "protocol": "icmp"}
    ]});
    [("trellis.dev/acl".to_string(), acl.to_string())].into()
}

fn shim(node: &TestNode, cmd: &str, container: &str, pod: &Netns, name: &str) -> Value {
    node.shim(
        cmd,
        container,
        &pod.path().to_string_lossy(),
        ("pods", name),
        &node.shim_conf(None),
    )
    .expect_ok(cmd)
}

fn ip(pod: &Netns, ifname: &str) -> String {
    pod.addrs(ifname)[0].split('/').next().unwrap().to_string()
}

/// Waits until `pred` holds (20 s at most: a hot-plug goes through the watch, a
/// delegate and the dataplane, slow on a loaded machine); how long it took.
fn wait_for(what: &str, node: &TestNode, pred: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !pred() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{what} did not happen within 20 s\n{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    start.elapsed()
}

fn has_link(pod: &Netns, ifname: &str) -> bool {
    pod.links().iter().any(|l| l == ifname)
}

/// The pod's network-status as the agent patched it onto the pod object.
fn network_status(api: &FakeApiServer, name: &str) -> Vec<Value> {
    let pod = api.pod("pods", name).expect("pod");
    let s = pod["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
        .as_str()
        .unwrap_or("[]")
        .to_string();
    serde_json::from_str::<Value>(&s)
        .unwrap()
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Reasons of the events posted about pod `name`, in order.
fn events(api: &FakeApiServer, name: &str) -> Vec<(String, String)> {
    api.requests()
        .iter()
        .filter(|q| q.method == "POST" && q.path.ends_with("/events"))
        .filter_map(|q| serde_json::from_str::<Value>(&q.body).ok())
        .filter(|e| e["involvedObject"]["name"] == name)
        .map(|e| {
            (
                e["reason"].as_str().unwrap_or("").to_string(),
                e["message"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn annotate(api: &FakeApiServer, name: &str, uid: &str, networks: &str) {
    api.put_pod("pods", name, uid, NODE, &networks_annotation(networks));
}

#[test]
fn annotation_edits_add_and_remove_interfaces_of_a_running_pod() {
    require_root!();
    let (mut node, api) = kube_node(NODE);
    node.dataplane = true;
    api.put_nad("pods", "mv-a", &node.macvlan_conf("10.79.1.0/24"));
    let br = trellis_rig::unique("trh");
    api.put_nad_annotated(
        "pods",
        "br-acl",
        &node.bridge_conf("br-acl", &br, "10.79.2.0/24"),
        &deny_icmp_in("10.79.2.0/24"),
    );
    api.put_pod("pods", "a", "uid-ca", NODE, &BTreeMap::new());
    api.put_pod(
        "pods",
        "b",
        "uid-cb",
        NODE,
        &networks_annotation("mv-a, br-acl"),
    );
    node.start_agent();
    wait_ready(&node);
    let (a, b) = (Netns::new("trp"), Netns::new("trp"));
    for p in [&a, &b] {
        p.sh("sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1");
    }
    shim(&node, "ADD", "ca", &a, "a");
    shim(&node, "ADD", "cb", &b, "b");
    assert_eq!(a.links(), ["eth0"]);
    let reservations_before = node.reservations().len();

    // Added: net1 on mv-a, with traffic over it and counters on it.
    annotate(&api, "a", "uid-ca", "mv-a");
    let took = wait_for("net1 added", &node, || has_link(&a, "net1"));
    eprintln!("hot-plug: annotation edit to net1 present in {took:?}");
    wait_for("net1 addressed", &node, || !a.addrs("net1").is_empty());
    let a_net1 = ip(&a, "net1");
    assert!(a_net1.starts_with("10.79.1."), "{a_net1}");
    assert!(a.ping(&ip(&b, "net1")), "traffic over the added interface");
    wait_for("network-status with net1", &node, || {
        network_status(&api, "a")
            .iter()
            .any(|e| e["interface"] == "net1" && e["trellis.dev/attached-at"].is_string())
    });
    let st = trellis_stats(&node.bpf_dir, &["--pod", "a"]);
    let net1 = st
        .iter()
        .find(|s| s["owner"]["ifname"] == "net1")
        .unwrap_or_else(|| panic!("net1 not in trellis stats: {st:?}"));
    assert!(net1["ingress"]["packets"].as_u64().unwrap() > 0, "{net1}");
    // Events are posted on their own, possibly after the network-status PATCH.
    wait_for("net1's AddedInterface event", &node, || {
        events(&api, "a")
            .iter()
            .any(|(r, m)| r == "AddedInterface" && m.contains("net1") && m.contains("pods/mv-a"))
    });

    // Added: acl0 on the ACL network (its ACL on it: b's ping is dropped); net1 stays
    // exactly as it was.
    annotate(&api, "a", "uid-ca", "mv-a, br-acl@acl0");
    wait_for("acl0 added", &node, || {
        has_link(&a, "acl0") && !a.addrs("acl0").is_empty()
    });
    assert_eq!(ip(&a, "net1"), a_net1, "net1 was not made again");
    let a_acl0 = ip(&a, "acl0");
    assert!(
        !b.ping(&a_acl0),
        "the ACL network's rules are on the added interface"
    );
    assert!(a.ping(&ip(&b, "net1")));

    // Bad edits change nothing: an unknown NAD, the cluster interface, a name in use.
    for bad in [
        "mv-a, br-acl@acl0, nope",
        "mv-a, br-acl@acl0, mv-a@eth0",
        "mv-a, br-acl@acl0, mv-a@acl0",
    ] {
        let before = events(&api, "a").len();
        annotate(&api, "a", "uid-ca", bad);
        wait_for("a failure event", &node, || {
            events(&api, "a").len() > before
        });
        let e = events(&api, "a");
        let last = e.last().unwrap();
        assert_eq!(last.0, "FailedAddingInterface", "{bad}: {e:?}");
        assert_eq!(a.links().len(), 3, "{bad}: {:?}", a.links());
        assert_eq!(ip(&a, "net1"), a_net1);
    }
    assert!(events(&api, "a")
        .iter()
        .any(|(_, m)| m.contains("pods/nope") && m.contains("not found")));

    // Removed: net1 (its address back in the pool), acl0 stays.
    annotate(&api, "a", "uid-ca", "br-acl@acl0");
    wait_for("net1 removed", &node, || !has_link(&a, "net1"));
    assert!(has_link(&a, "acl0"));
    wait_for("net1 out of network-status", &node, || {
        let s = network_status(&api, "a");
        !s.iter().any(|e| e["interface"] == "net1") && s.iter().any(|e| e["interface"] == "acl0")
    });
    wait_for("net1's RemovedInterface event", &node, || {
        events(&api, "a")
            .iter()
            .any(|(r, m)| r == "RemovedInterface" && m.contains("net1"))
    });
    assert_eq!(
        node.reservations().len(),
        reservations_before + 1,
        "{:?}",
        node.reservations()
    );
    assert!(!trellis_stats(&node.bpf_dir, &["--pod", "a"])
        .iter()
        .any(|s| s["owner"]["ifname"] == "net1"));

    // A choice added to the running pod: chosen (mv-a has more free addresses than
    // br-acl, which a and b both use), made, shown; taken away again.
    let mut with_choice = networks_annotation("br-acl@acl0");
    with_choice.insert(
        "trellis.dev/network-choice".into(),
        json!([{"interface": "pick0", "from": ["br-acl", "mv-a"], "by": "most-free-addresses"}])
            .to_string(),
    );
    api.put_pod("pods", "a", "uid-ca", NODE, &with_choice);
    wait_for("pick0 chosen", &node, || has_link(&a, "pick0"));
    wait_for("pick0 in network-status", &node, || {
        network_status(&api, "a").iter().any(|e| {
            e["interface"] == "pick0"
                && e["name"] == "pods/mv-a"
                && e["trellis.dev/chosen-by"]["policy"] == "most-free-addresses"
        })
    });
    annotate(&api, "a", "uid-ca", "br-acl@acl0");
    wait_for("pick0 removed", &node, || !has_link(&a, "pick0"));

    // A pod that opted out is left alone.
    let mut opted = networks_annotation("");
    opted.insert("trellis.dev/dynamic".into(), "false".into());
    api.put_pod("pods", "c", "uid-cc", NODE, &opted);
    let c = Netns::new("trp");
    std::thread::sleep(Duration::from_millis(300));
    shim(&node, "ADD", "cc", &c, "c");
    opted.insert("k8s.v1.cni.cncf.io/networks".into(), "mv-a".into());
    api.put_pod("pods", "c", "uid-cc", NODE, &opted);
    std::thread::sleep(Duration::from_millis(500));
    assert!(!has_link(&c, "net1"), "{:?}", c.links());

    // DEL takes the hot-plugged attachment too: nothing left.
    for (id, p, name) in [("ca", &a, "a"), ("cb", &b, "b"), ("cc", &c, "c")] {
        shim(&node, "DEL", id, p, name);
    }
    assert!(node.records().is_empty(), "{:?}", node.records());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert_eq!(node.live_hooks(), 0);
    assert!(a.links().is_empty(), "{:?}", a.links());
}

fn trellis(node: &TestNode, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(args)
        .arg("--socket")
        .arg(node.socket())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr),
    )
}

#[test]
fn trellis_attach_and_detach_change_a_running_pod() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.79.3.0/24"));
    node.add_plugin_script(
        "failing",
        r#"cat >/dev/null; echo '{"cniVersion":"1.0.0","code":11,"msg":"refused on purpose"}'; exit 1"#,
    );
    node.add_nad(
        "pods",
        "fails",
        &json!({"cniVersion": "1.0.0", "name": "fails", "type": "failing"}),
    );
    node.start_agent();
    let (a, b) = (Netns::new("trp"), Netns::new("trp"));
    shim(&node, "ADD", "ca", &a, "a");
    node.shim(
        "ADD",
        "cb",
        &b.path().to_string_lossy(),
        ("pods", "b"),
        &node.shim_conf(Some(&networks_annotation("mv-a"))),
    )
    .expect_ok("ADD b");
    let record_before = node.record("ca");

    let (ok, out) = trellis(&node, &["attach", "--pod", "pods/a", "mv-a"]);
    assert!(ok, "{out}\n{}", node.agent_log());
    assert!(out.contains("\"net1\""), "{out}");
    assert!(has_link(&a, "net1"));
    assert!(a.ping(&ip(&b, "net1")));
    assert!(trellis_stats(&node.bpf_dir, &["--pod", "a"])
        .iter()
        .any(|s| s["owner"]["ifname"] == "net1"));
    let rec = node.record("ca");
    let net1 = &rec["attachments"][1];
    assert_eq!(net1["ifname"], "net1");
    assert!(net1["attached_at"].is_string(), "{rec}");

    // Refused, nothing changed: a name in use, the cluster interface, an unknown NAD,
    // a delegate that fails (undone), an unknown pod, a bad pod name.
    let after_attach = node.record("ca");
    for (args, expect) in [
        (vec!["attach", "--pod", "pods/a", "mv-a@net1"], "in use"),
        (
            vec!["attach", "--pod", "pods/a", "mv-a@eth0"],
            "cluster network",
        ),
        (
            vec!["detach", "--pod", "pods/a", "@eth0"],
            "cluster network",
        ),
        (vec!["attach", "--pod", "pods/a", "nope"], "not found"),
        (
            vec!["attach", "--pod", "pods/a", "fails"],
            "refused on purpose",
        ),
        (
            vec!["attach", "--pod", "pods/zz", "mv-a"],
            "no finished ADD",
        ),
        (vec!["attach", "--pod", "a", "mv-a"], "NAMESPACE/NAME"),
        (vec!["detach", "--pod", "pods/a", "@net9"], "no attachment"),
    ] {
        let (ok, out) = trellis(&node, &args);
        assert!(!ok, "{args:?} succeeded: {out}");
        assert!(out.contains(expect), "{args:?}: {out}");
        assert_eq!(a.links().len(), 2, "{args:?}: {:?}", a.links());
        let mut rec = node.record("ca");
        rec["network_status"] = after_attach["network_status"].clone();
        assert_eq!(rec, after_attach, "{args:?} changed the record");
    }

    let (ok, out) = trellis(&node, &["detach", "--pod", "pods/a", "mv-a"]);
    assert!(ok, "{out}");
    assert!(!has_link(&a, "net1"));
    let mut rec = node.record("ca");
    rec["network_status"] = record_before["network_status"].clone();
    assert_eq!(
        rec, record_before,
        "detach left the record as before attach"
    );
    assert!(!trellis_stats(&node.bpf_dir, &["--pod", "a"])
        .iter()
        .any(|s| s["owner"]["ifname"] == "net1"));

    // Attached again, then the pod's DEL removes it with the rest.
    assert!(trellis(&node, &["attach", "--pod", "pods/a", "mv-a@data0"]).0);
    assert!(has_link(&a, "data0"));
    shim(&node, "DEL", "ca", &a, "a");
    node.shim(
        "DEL",
        "cb",
        &b.path().to_string_lossy(),
        ("pods", "b"),
        &node.shim_conf(Some(&networks_annotation("mv-a"))),
    )
    .expect_ok("DEL b");
    assert!(node.records().is_empty(), "{:?}", node.records());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
    assert_eq!(node.live_hooks(), 0);
}

/// A pod's networks annotation edited while the agent was down: the agent, started
/// again, follows it (the reconciler starts from the pods already listed, whatever
/// the order of its start and the first list).
#[test]
fn an_annotation_edited_while_the_agent_was_down_is_followed_at_start() {
    require_root!();
    let (mut node, api) = kube_node(NODE);
    api.put_nad("pods", "mv-a", &node.macvlan_conf("10.79.5.0/24"));
    api.put_pod("pods", "c", "uid-cc", NODE, &BTreeMap::new());
    node.start_agent();
    wait_ready(&node);
    let c = Netns::new("trp");
    shim(&node, "ADD", "cc", &c, "c");
    assert_eq!(c.links(), ["eth0"]);
    node.stop_agent();
    annotate(&api, "c", "uid-cc", "mv-a");
    node.start_agent();
    wait_for("net1 added after the restart", &node, || {
        has_link(&c, "net1")
    });
    shim(&node, "DEL", "cc", &c, "c");
    assert_eq!(c.links(), Vec::<String>::new());
    assert!(node.records().is_empty(), "{:?}", node.records());
}
