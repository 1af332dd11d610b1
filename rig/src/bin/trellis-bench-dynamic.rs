//! Hot-plug figures, with the default configuration (dataplane on): the time from a
//! running pod's networks annotation being edited (the fake API server's watch) to the
//! new interface existing in the pod, and to the agent's network-status patch (the
//! whole change done: delegate, dataplane, record); the same for removal; and the same
//! through `trellis attach` / `detach` (files source). Prints p50/p99; asserts nothing
//! about speed. `--rounds N` (default 100), `--quick` (5).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use trellis_rig::fake_apiserver::FakeApiServer;
use trellis_rig::figures::{arg, ms, percentiles};
use trellis_rig::netns::Netns;
use trellis_rig::node::{kube_node, networks_annotation, wait_ready, TestNode};

const NODE: &str = "node-bench";

fn stats(v: Vec<f64>) -> String {
    let n = v.len();
    let [p50, p99, max] = percentiles(v, [0.5, 0.99, 1.0]);
    format!("p50 {p50:.2} ms, p99 {p99:.2} ms, max {max:.2} ms (n={n})")
}

/// Polls from inside `pod` (a thread of its own, in the pod's netns) until `ifname`
/// exists (`present`) or is gone; when, after `since`.
fn watch_link(pod: &Netns, ifname: &str, present: bool, since: Instant) -> Duration {
    let (path, ifname) = (pod.path(), ifname.to_string());
    std::thread::spawn(move || {
        Netns::at(path).enter_this_thread();
        let deadline = since + Duration::from_secs(10);
        loop {
            if nix::net::if_::if_nametoindex(ifname.as_str()).is_ok() == present {
                return since.elapsed();
            }
            assert!(Instant::now() < deadline, "{ifname} never changed");
            std::thread::sleep(Duration::from_micros(200));
        }
    })
    .join()
    .unwrap()
}

fn status_has(api: &FakeApiServer, ifname: &str) -> bool {
    api.pod("pods", "a")
        .and_then(|p| {
            p["metadata"]["annotations"]["k8s.v1.cni.cncf.io/network-status"]
                .as_str()
                .map(|s| s.contains(&format!("\"interface\":\"{ifname}\"")))
        })
        .unwrap_or(false)
}

fn wait_status(api: &FakeApiServer, ifname: &str, present: bool, since: Instant) -> Duration {
    let deadline = since + Duration::from_secs(10);
    while status_has(api, ifname) != present {
        assert!(Instant::now() < deadline, "network-status never changed");
        std::thread::sleep(Duration::from_micros(500));
    }
    since.elapsed()
}

fn main() {
    let rounds = if std::env::args().any(|a| a == "--quick") {
        5
    } else {
        arg("--rounds").unwrap_or(100)
    };
    println!("trellis hot-plug bench: {rounds} rounds each, default configuration (dataplane on), macvlan + host-local");

    // Annotation edits through the fake API server's pod watch.
    let (mut node, api) = kube_node(NODE);
    node.dataplane = true;
    api.put_nad("pods", "mv-a", &node.macvlan_conf("10.82.1.0/24"));
    api.put_pod("pods", "a", "uid-ca", NODE, &BTreeMap::new());
    node.start_agent();
    wait_ready(&node);
    let pod = Netns::new("trb");
    let conf = node.shim_conf(None);
    node.shim(
        "ADD",
        "ca",
        &pod.path().to_string_lossy(),
        ("pods", "a"),
        &conf,
    )
    .expect_ok("ADD");
    let (mut up, mut done, mut gone, mut undone) = (vec![], vec![], vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        api.put_pod("pods", "a", "uid-ca", NODE, &networks_annotation("mv-a"));
        up.push(ms(watch_link(&pod, "net1", true, t)));
        done.push(ms(wait_status(&api, "net1", true, t)));
        let t = Instant::now();
        api.put_pod("pods", "a", "uid-ca", NODE, &networks_annotation(""));
        gone.push(ms(watch_link(&pod, "net1", false, t)));
        undone.push(ms(wait_status(&api, "net1", false, t)));
    }
    println!(
        "annotation edit -> interface in the pod:        {}",
        stats(up)
    );
    println!(
        "annotation edit -> network-status patched:      {}",
        stats(done)
    );
    println!(
        "annotation edit -> interface gone:              {}",
        stats(gone)
    );
    println!(
        "annotation edit -> network-status without it:   {}",
        stats(undone)
    );
    node.shim(
        "DEL",
        "ca",
        &pod.path().to_string_lossy(),
        ("pods", "a"),
        &conf,
    )
    .expect_ok("DEL");
    drop(node);

    // trellis attach / detach (files source).
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.82.2.0/24"));
    node.start_agent();
    let pod = Netns::new("trb");
    let conf = node.shim_conf(None);
    node.shim(
        "ADD",
        "ca",
        &pod.path().to_string_lossy(),
        ("pods", "a"),
        &conf,
    )
    .expect_ok("ADD");
    let trellis = |args: &[&str]| {
        let out = std::process::Command::new(trellis_rig::bins::trellis())
            .args(args)
            .arg("--socket")
            .arg(node.socket())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let (mut attach, mut detach) = (vec![], vec![]);
    for _ in 0..rounds {
        let t = Instant::now();
        trellis(&["attach", "--pod", "pods/a", "mv-a"]);
        attach.push(ms(t.elapsed()));
        let t = Instant::now();
        trellis(&["detach", "--pod", "pods/a", "mv-a"]);
        detach.push(ms(t.elapsed()));
    }
    println!(
        "trellis attach (command start to its answer):   {}",
        stats(attach)
    );
    println!(
        "trellis detach (command start to its answer):   {}",
        stats(detach)
    );
    node.shim(
        "DEL",
        "ca",
        &pod.path().to_string_lossy(),
        ("pods", "a"),
        &conf,
    )
    .expect_ok("DEL");
}
