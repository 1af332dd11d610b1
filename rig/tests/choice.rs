//! Choosing a network by measured load (`trellis.dev/network-choice`) on real parts:
//! two bridge networks, one carrying real traffic (iperf3 between two other pods), a
//! pod asking for the less utilized lands on the other; cheapest by NAD cost; bad
//! choices fail the ADD naming the field, leaving nothing.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;

fn annotated(pairs: &[(&str, String)]) -> BTreeMap<String, String> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

fn add(
    node: &TestNode,
    id: &str,
    pod: &Netns,
    name: &str,
    ann: &BTreeMap<String, String>,
) -> trellis_rig::node::ShimOutcome {
    node.shim(
        "ADD",
        id,
        &pod.path().to_string_lossy(),
        ("pods", name),
        &node.shim_conf(Some(ann)),
    )
}

fn del(node: &TestNode, id: &str, pod: &Netns, name: &str, ann: &BTreeMap<String, String>) {
    node.shim(
        "DEL",
        id,
        &pod.path().to_string_lossy(),
        ("pods", name),
        &node.shim_conf(Some(ann)),
    )
    .expect_ok("DEL");
}

fn choice(by: &str) -> BTreeMap<String, String> {
    annotated(&[(
        "trellis.dev/network-choice",
        json!([{"interface": "data0", "from": ["br-x", "br-y"], "by": by}]).to_string(),
    )])
}

/// One load at a time in this binary: two UDP floods at once on a two-core machine
/// starve each other's receivers, and each test judges utilization by its own.
static LOAD: Mutex<()> = Mutex::new(());

fn networks(node: &TestNode) -> Vec<Value> {
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["networks", "-o", "json", "--socket"])
        .arg(node.socket())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn a_pod_lands_on_the_less_utilized_network_and_the_cheapest() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.top_toml = "[dynamic]\nkpi_sample_ms = 100\nkpi_window_secs = 2\n".into();
    let (bx, by) = (trellis_rig::unique("trx"), trellis_rig::unique("try"));
    let cap = |cost: &str| {
        annotated(&[
            ("trellis.dev/capacity", "1G".into()),
            ("trellis.dev/cost", cost.into()),
        ])
    };
    node.add_nad_annotated(
        "pods",
        "br-x",
        &node.bridge_conf("br-x", &bx, "10.80.1.0/24"),
        &cap("1"),
    );
    node.add_nad_annotated(
        "pods",
        "br-y",
        &node.bridge_conf("br-y", &by, "10.80.2.0/24"),
        &cap("5"),
    );
    node.start_agent();

    // Load on br-x: iperf3 between two pods of it.
    let (l1, l2) = (Netns::new("trl"), Netns::new("trl"));
    let on_x = networks_annotation("br-x");
    add(&node, "cl1", &l1, "l1", &on_x).expect_ok("ADD l1");
    add(&node, "cl2", &l2, "l2", &on_x).expect_ok("ADD l2");
    let l2_ip = l2.addrs("net1")[0].split('/').next().unwrap().to_string();
    let p = Netns::new("trp");
    let _one = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    let chose = std::thread::scope(|s| {
        let started = Instant::now();
        let load =
            s.spawn(|| trellis_rig::traffic::iperf3(&l2, &l1, &l2_ip, 6, Some(200_000_000), false));
        let rate = |kpis: &[Value], n: &str| {
            kpis.iter()
                .find(|k| k["network"] == n)
                .map(|k| k["rx_bps"].as_f64().unwrap() + k["tx_bps"].as_f64().unwrap())
                .unwrap_or(0.0)
        };
        // Once the load shows (iperf3 starts slowly on a loaded machine), well
        // within its 6 s.
        std::thread::sleep(Duration::from_millis(1500));
        let mut kpis = networks(&node);
        while rate(&kpis, "pods/br-x") <= 50e6 && started.elapsed() < Duration::from_secs(5) {
            std::thread::sleep(Duration::from_millis(250));
            kpis = networks(&node);
        }
        assert!(
            rate(&kpis, "pods/br-x") > 50e6,
            "br-x carries the load: {kpis:?}"
        );
        let x = kpis.iter().find(|k| k["network"] == "pods/br-x").unwrap();
        assert!(x["utilization"].as_f64().unwrap() > 0.05, "{x}");
        let r = add(&node, "cp", &p, "p", &choice("least-utilized")).expect_ok("ADD p");
        let got = load.join().unwrap();
        assert!(got.bps > 50e6, "the load ran: {got:?}");
        r
    });
    let data0 = p.addrs("data0");
    assert!(
        data0[0].starts_with("10.80.2."),
        "landed on br-y: {data0:?} {chose}"
    );
    let rec = node.record("cp");
    let chosen = &rec["attachments"][1]["chosen"];
    assert_eq!(chosen["choice"]["by"], "least-utilized", "{rec}");
    assert!(
        chosen["reason"]
            .as_str()
            .unwrap()
            .contains("pods/br-x utilization"),
        "{chosen}"
    );
    let status = rec["network_status"].as_array().unwrap();
    let entry = status.iter().find(|e| e["interface"] == "data0").unwrap();
    assert_eq!(entry["name"], "pods/br-y");
    assert_eq!(entry["trellis.dev/chosen-by"]["policy"], "least-utilized");

    // Cheapest: br-x (cost 1) whatever its load.
    let q = Netns::new("trp");
    add(&node, "cq", &q, "q", &choice("cheapest")).expect_ok("ADD q");
    assert!(
        q.addrs("data0")[0].starts_with("10.80.1."),
        "{:?}",
        q.addrs("data0")
    );

    // Bad choices: the ADD fails naming the field, and leaves nothing.
    let reservations = node.reservations().len();
    for (ann, expect) in [
        (
            json!([{"interface": "data0", "from": ["br-x", "nope"], "by": "cheapest"}]),
            "trellis.dev/network-choice[0].from[1]",
        ),
        (
            json!([{"interface": "data0", "from": ["br-x"], "by": "fastest"}]),
            "[0].by: unknown policy \"fastest\"",
        ),
        (
            json!([{"interface": "data0", "from": ["br-x"], "by": "cheapest", "move": {"when": "cheaper"}}]),
            "[0].move.min_dwell: is required",
        ),
        (
            json!([{"interface": "net1", "from": ["br-x"], "by": "cheapest"}]),
            "used twice",
        ),
    ] {
        let z = Netns::new("trp");
        let mut a = annotated(&[("trellis.dev/network-choice", ann.to_string())]);
        a.insert("k8s.v1.cni.cncf.io/networks".into(), "br-y".into());
        let (_, msg) = add(&node, "cz", &z, "z", &a).expect_err("ADD with a bad choice");
        assert!(msg.contains(expect), "{ann}: {msg}");
        assert!(z.links().is_empty(), "{ann}: {:?}", z.links());
        assert_eq!(node.reservations().len(), reservations, "{ann}");
        assert!(!node.records().iter().any(|r| r.contains("cz")), "{ann}");
    }

    for (id, ns, name, ann) in [
        ("cl1", &l1, "l1", on_x.clone()),
        ("cl2", &l2, "l2", on_x),
        ("cp", &p, "p", choice("least-utilized")),
        ("cq", &q, "q", choice("cheapest")),
    ] {
        del(&node, id, ns, name, &ann);
    }
    assert!(node.records().is_empty(), "{:?}", node.records());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
}

/// A bridge network with a route to the node's service range 10.81.9.0/`route_len`
/// through its gateway (both networks reach 10.81.9.1; the /25 is the more specific).
fn routed_bridge(node: &TestNode, name: &str, bridge: &str, net: u8, route_len: u8) -> Value {
    json!({
        "cniVersion": "1.0.0", "name": name,
        "plugins": [{"type": "bridge", "bridge": bridge, "isGateway": true,
            "ipam": {"type": "host-local", "subnet": format!("10.81.{net}.0/24"),
                     "dataDir": node.path("ipam"),
                     "routes": [{"dst": format!("10.81.9.0/{route_len}"), "gw": format!("10.81.{net}.1")}]}}]
    })
}

/// Make-before-break: a pod on the cheaper network moves to the other when real load
/// keeps its network above the threshold for the dwell time; a ping through the
/// chosen network keeps flowing (the packets lost in the move are counted).
#[test]
fn a_loaded_network_is_left_for_another_and_traffic_keeps_flowing() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    node.top_toml =
        "[dynamic]\nkpi_sample_ms = 100\nkpi_window_secs = 2\nmove_grace_secs = 2\n".into();
    let (bx, by) = (trellis_rig::unique("trx"), trellis_rig::unique("try"));
    let ann = |cost: &str| {
        annotated(&[
            ("trellis.dev/capacity", "100M".into()),
            ("trellis.dev/cost", cost.into()),
        ])
    };
    node.add_nad_annotated(
        "pods",
        "br-x",
        &routed_bridge(&node, "br-x", &bx, 1, 24),
        &ann("1"),
    );
    node.add_nad_annotated(
        "pods",
        "br-y",
        &routed_bridge(&node, "br-y", &by, 2, 25),
        &ann("2"),
    );
    let svc = trellis_rig::unique("trs");
    node.host.sh(&format!(
        "ip link add {svc} type veth peer name {svc}p && ip addr add 10.81.9.1/32 dev {svc} && ip link set {svc} up && ip link set {svc}p up"
    ));
    node.start_agent();

    let p = Netns::new("trp");
    let choice = annotated(&[(
        "trellis.dev/network-choice",
        json!([{"interface": "data0", "from": ["br-x", "br-y"], "by": "cheapest",
                "move": {"when": "utilization > 0.5", "min_dwell": "2s"}}])
        .to_string(),
    )]);
    add(&node, "cp", &p, "p", &choice).expect_ok("ADD p");
    assert!(
        p.addrs("data0")[0].starts_with("10.81.1."),
        "cheapest first: br-x"
    );
    assert!(p.ping("10.81.9.1"));

    let (l1, l2) = (Netns::new("trl"), Netns::new("trl"));
    let on_x = networks_annotation("br-x");
    add(&node, "cl1", &l1, "l1", &on_x).expect_ok("ADD l1");
    add(&node, "cl2", &l2, "l2", &on_x).expect_ok("ADD l2");
    let l2_ip = l2.addrs("net1")[0].split('/').next().unwrap().to_string();

    let _one = LOAD.lock().unwrap_or_else(|e| e.into_inner());
    let (ping, moved_after) = std::thread::scope(|s| {
        let started = Instant::now();
        let ping = s.spawn(|| p.sh("ping -q -i 0.01 -W 1 -w 16 10.81.9.1 || true"));
        std::thread::sleep(Duration::from_secs(1));
        let load = s
            .spawn(|| trellis_rig::traffic::iperf3(&l2, &l1, &l2_ip, 10, Some(150_000_000), false));
        let mut moved_after = None;
        while started.elapsed() < Duration::from_secs(15) {
            if moved_after.is_none() && p.links().iter().any(|l| l == "data0m") {
                moved_after = Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        load.join().unwrap();
        (ping.join().unwrap(), moved_after)
    });
    let moved_after = moved_after.unwrap_or_else(|| panic!("never moved\n{}", node.agent_log()));
    // Both up for the grace period, then only the new one.
    assert_eq!(
        p.links().iter().filter(|l| l.starts_with("data0")).count(),
        1,
        "{:?}",
        p.links()
    );
    assert!(
        p.addrs("data0m")[0].starts_with("10.81.2."),
        "{:?}",
        p.addrs("data0m")
    );
    let rec = node.record("cp");
    let a = rec["attachments"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["ifname"] == "data0m")
        .unwrap()
        .clone();
    assert_eq!(a["network"], "pods/br-y");
    let reason = a["chosen"]["reason"].as_str().unwrap();
    assert!(
        reason.contains("moved from pods/br-x (data0): utilization"),
        "{reason}"
    );
    // ping's summary: "N packets transmitted, M received".
    let line = ping
        .lines()
        .find(|l| l.contains("transmitted"))
        .unwrap_or_default();
    let sent_recv: Vec<u64> = line
        .split(|c: char| !c.is_ascii_digit())
        .filter_map(|w| w.parse().ok())
        .take(2)
        .collect();
    let (sent, recv) = (sent_recv[0], sent_recv[1]);
    eprintln!(
        "move: data0 (br-x) -> data0m (br-y) {:.1}s into the run; ping every 10 ms: {sent} sent, {} lost",
        moved_after.as_secs_f64(),
        sent - recv
    );
    assert!(recv * 2 > sent, "traffic kept flowing: {line}");
    assert!(p.ping("10.81.9.1"), "through the new network");

    for (id, ns, name, a) in [
        ("cp", &p, "p", choice.clone()),
        ("cl1", &l1, "l1", on_x.clone()),
        ("cl2", &l2, "l2", on_x),
    ] {
        del(&node, id, ns, name, &a);
    }
    assert!(node.records().is_empty(), "{:?}", node.records());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
}
