//! Regression tests for what a NAD author, a pod author or a misbehaving delegate could
//! do to the node through the agent (issue 10): no path is ever exec'd, GC never
//! collects what it cannot prove stale, a delegate that ran is always DEL'd, nothing a
//! delegate prints brings a request down.

use serde_json::json;
use std::collections::BTreeMap;
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::require_root;

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
}

fn add(
    node: &TestNode,
    container: &str,
    pod: &Netns,
    networks: &str,
) -> trellis_rig::node::ShimOutcome {
    node.shim(
        "ADD",
        container,
        &pod.path().to_string_lossy(),
        ("pods", container),
        &node.shim_conf(Some(&networks_annotation(networks))),
    )
}

fn del(node: &TestNode, container: &str, pod: &Netns) -> trellis_rig::node::ShimOutcome {
    node.shim(
        "DEL",
        container,
        &pod.path().to_string_lossy(),
        ("pods", container),
        &node.shim_conf(None),
    )
}

/// GC as a runtime sends it (cniVersion 1.1.0), with `extra` keys added to the conf.
fn gc(node: &TestNode, extra: serde_json::Value) -> trellis_rig::node::ShimOutcome {
    let mut conf = node.shim_conf(None);
    conf["cniVersion"] = json!("1.1.0");
    for (k, v) in extra.as_object().unwrap() {
        conf[k] = v.clone();
    }
    let env = BTreeMap::from([
        ("CNI_COMMAND", "GC".to_string()),
        ("CNI_PATH", "/usr/lib/cni".into()),
    ]);
    node.shim_raw(&env, conf.to_string().as_bytes())
}

#[test]
fn no_nad_can_make_the_agent_exec_a_path() {
    require_root!();
    let mut node = TestNode::new();
    let marker = node.path("ran-as-root");
    let evil = node.path("evil.sh");
    std::fs::write(&evil, format!("#!/bin/sh\ntouch {}\n", marker.display())).unwrap();
    std::fs::set_permissions(&evil, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let evil = evil.display().to_string();
    // From the bin dir: ../evil.sh is the same file.
    let dotdot = "../evil.sh";
    let cases = [
        (
            "vhost-abs",
            json!({"cniVersion":"1.0.0","type":"vhostuser","deviceID":"/nonexistent.sock","ipam":{"type": evil}}),
            "plugins[0].ipam.type",
        ),
        (
            "sriov-dotdot",
            json!({"cniVersion":"1.0.0","type":"sriov","deviceID":"0000:00:01.0","ipam":{"type": dotdot}}),
            "plugins[0].ipam.type",
        ),
        (
            "macvlan-abs",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":node.master,"ipam":{"type": evil}}),
            "plugins[0].ipam.type",
        ),
        (
            "chain",
            json!({"cniVersion":"1.0.0","plugins":[{"type":"macvlan","master":node.master},{"type": dotdot}]}),
            "plugins[1].type",
        ),
        (
            "type-abs",
            json!({"cniVersion":"1.0.0","type": evil}),
            "plugins[0].type",
        ),
    ];
    for (name, conf, _) in &cases {
        node.add_nad("pods", name, conf);
    }
    node.start_agent();
    let pod = Netns::new("trp");
    for (i, (name, _, field)) in cases.iter().enumerate() {
        let c = format!("x{i}");
        let (code, msg) = add(&node, &c, &pod, name).expect_err(name);
        assert_eq!(code, 7, "{name}: {msg}");
        assert!(msg.contains(field), "{name}: wanted {field} in {msg}");
        del(&node, &c, &pod).expect_ok(name);
        assert!(
            !marker.exists(),
            "{name}: the NAD made the agent exec {evil}"
        );
        assert_clean(&node, &pod, name);
    }
}

#[test]
fn gc_without_the_valid_list_collects_nothing() {
    require_root!();
    let mut node = TestNode::new();
    // Pods just added count as stale here (no grace).
    node.top_toml = "gc_grace_secs = 0\n".into();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.76.1.0/24"));
    node.start_agent();
    let (p1, p2) = (Netns::new("trp"), Netns::new("trp"));
    add(&node, "keep", &p1, "mv-a").expect_ok("ADD keep");
    add(&node, "stale", &p2, "mv-a").expect_ok("ADD stale");
    assert_eq!(node.reservations().len(), 4);
    for extra in [json!({}), json!({"cni.dev/valid-attachments": null})] {
        let (code, msg) = gc(&node, extra.clone()).expect_err("GC without the list");
        assert_eq!(code, 7, "{extra}: {msg}");
        assert!(msg.contains("cni.dev/valid-attachments"), "{msg}");
        assert_eq!(node.records().len(), 2, "{extra}: GC collected live pods");
        assert_eq!(node.reservations().len(), 4, "{extra}");
    }
    // libcni's other spelling of the same list.
    gc(
        &node,
        json!({"cni.dev/attachments": [{"containerID": "keep", "ifname": "eth0"}]}),
    )
    .expect_ok("GC with cni.dev/attachments");
    assert_eq!(node.records(), ["keep.json"]);
    assert_eq!(node.reservations().len(), 2, "{:?}", node.reservations());
    del(&node, "keep", &p1).expect_ok("DEL keep");
}

#[test]
fn gc_leaves_alone_an_add_under_way() {
    require_root!();
    let mut node = TestNode::new();
    node.top_toml = "gc_grace_secs = 0\n".into();
    // macvlan that waits to be let go: GC arrives mid-ADD.
    let gate = Gate::plugin(&node);
    let mut conf = node.macvlan_conf("10.76.2.0/24");
    conf["type"] = json!("slowmacvlan");
    node.add_nad("pods", "slow", &conf);
    node.start_agent();
    let pod = Netns::new("trp");
    std::thread::scope(|s| {
        let adding = s.spawn(|| add(&node, "new", &pod, "slow"));
        gate.wait_started();
        // The runtime's list predates the pod: it is not in it. GC waits for the ADD
        // under way: it is let go once GC has surely arrived (nothing tells when).
        let collecting = s.spawn(|| gc(&node, json!({"cni.dev/valid-attachments": []})));
        std::thread::sleep(std::time::Duration::from_secs(2));
        gate.release();
        adding.join().unwrap().expect_ok("ADD under way");
        collecting.join().unwrap().expect_ok("GC");
    });
    assert_eq!(
        node.records(),
        ["new.json"],
        "GC collected a pod being added"
    );
    assert_eq!(node.reservations().len(), 2, "{:?}", node.reservations());
    assert!(
        pod.links().contains(&"net1".to_string()),
        "{:?}",
        pod.links()
    );
    // A GC whose list was made after the pod came does collect it when not listed
    // (its interfaces go with its sandbox's netns: GC passes delegates none).
    gc(&node, json!({"cni.dev/valid-attachments": []})).expect_ok("GC");
    assert!(node.records().is_empty(), "{:?}", node.records());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
}

#[test]
fn a_delegate_that_crashes_or_hangs_is_deleted() {
    require_root!();
    let mut node = TestNode::new();
    node.delegate_timeout_secs = 3;
    // Each makes a host link on ADD (as a bridge or ptp delegate would), then fails
    // without error JSON or hangs; its DEL removes the link.
    for (name, fail) in [("crasher", "exit 3"), ("hanger", "sleep 30")] {
        node.add_plugin_script(
            name,
            &format!(
                r#"cat >/dev/null
l=tr{name}$(echo "$CNI_CONTAINERID" | tr -cd 0-9)
case "$CNI_COMMAND" in
ADD) ip link add "$l" type veth peer name "$l"p; {fail};;
DEL) ip link del "$l" 2>/dev/null; exit 0;;
esac"#
            ),
        );
        node.add_nad("pods", name, &json!({"cniVersion":"1.0.0","type": name}));
    }
    node.start_agent();
    let pod = Netns::new("trp");
    for (i, name) in ["crasher", "hanger"].into_iter().enumerate() {
        let c = format!("c{i}");
        let (code, msg) = add(&node, &c, &pod, name).expect_err(name);
        assert_eq!(code, 5, "{name}: {msg}");
        let left: Vec<String> = node
            .host_links()
            .into_iter()
            .filter(|l| l.starts_with("tr"))
            .collect();
        assert!(left.is_empty(), "{name}: its DEL never came: {left:?}");
        assert_clean(&node, &pod, name);
    }
}

#[test]
fn a_delegate_printing_a_multibyte_tail_is_an_error_not_a_crash() {
    require_root!();
    let mut node = TestNode::new();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.76.3.0/24"));
    node.add_plugin_script(
        "utf8",
        &format!(
            "cat >/dev/null; [ \"$CNI_COMMAND\" = ADD ] || exit 0; printf '{}\\303\\251'; exit 3",
            "a".repeat(1999)
        ),
    );
    node.add_nad("pods", "utf8", &json!({"cniVersion":"1.0.0","type":"utf8"}));
    node.start_agent();
    let pod = Netns::new("trp");
    let (code, msg) = add(&node, "u1", &pod, "mv-a,utf8").expect_err("utf8");
    assert_eq!(code, 5, "{msg}");
    assert!(msg.contains("aaaa"), "{msg}");
    // The rollback ran (the macvlan and both IPs are gone) and the agent still answers.
    assert_clean(&node, &pod, "utf8");
    add(&node, "u2", &pod, "mv-a").expect_ok("the next ADD");
    del(&node, "u2", &pod).expect_ok("DEL");
}

#[test]
fn gc_keeps_pods_added_within_its_grace() {
    require_root!();
    let mut node = TestNode::new();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.76.4.0/24"));
    node.start_agent();
    let pod = Netns::new("trp");
    add(&node, "fresh", &pod, "mv-a").expect_ok("ADD");
    // The runtime's list was made a moment before the pod came (default grace 60 s).
    gc(&node, json!({"cni.dev/valid-attachments": []})).expect_ok("GC");
    assert_eq!(node.records(), ["fresh.json"]);
    assert_eq!(node.reservations().len(), 2);
    del(&node, "fresh", &pod).expect_ok("DEL");
}

#[test]
fn nads_cannot_name_host_devices_paths_or_ports() {
    require_root!();
    let mut node = TestNode::new();
    // The agent's default policy, with the node's one uplink for NADs to use.
    node.nad_policy_toml = format!("[nad_policy]\nmasters = [{:?}]\n", node.master);
    let m = node.master.clone();
    let cases = [
        (
            "hostdev",
            json!({"cniVersion":"1.0.0","type":"host-device","device":"lo"}),
            "plugins[0].type \"host-device\" is not a plugin NADs may use",
        ),
        (
            "datadir",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"host-local","subnet":"10.76.5.0/24","dataDir":"/etc"}}),
            "plugins[0].ipam.dataDir: NADs may not set \"dataDir\"",
        ),
        (
            "dhcpsock",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"dhcp","daemonSocketPath":"/run/containerd/containerd.sock"}}),
            "plugins[0].ipam.daemonSocketPath",
        ),
        (
            "portmap",
            json!({"cniVersion":"1.0.0","plugins":[{"type":"macvlan","master":m},{"type":"portmap","capabilities":{"portMappings":true}}]}),
            "plugins[1].type \"portmap\"",
        ),
        (
            "uplink",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":"eth0"}),
            "plugins[0].master: \"eth0\" is not one NADs may use",
        ),
        (
            "pcibus",
            json!({"cniVersion":"1.0.0","type":"sriov","pciBusID":"0000:00:01.0"}),
            "plugins[0].pciBusID",
        ),
        // Go plugins read keys case-insensitively: other spellings are refused.
        (
            "upperipam",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"IPAM":{"type":"host-local","subnet":"10.76.5.0/24","dataDir":"/etc"}}),
            "plugins[0].IPAM: spell it \"ipam\"",
        ),
        (
            "twoipams",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"host-local","subnet":"10.76.5.0/24"},"IPAM":{"dataDir":"/etc"}}),
            "plugins[0].IPAM: spell it",
        ),
        (
            "uppermaster",
            json!({"cniVersion":"1.0.0","type":"macvlan","Master":"eth0"}),
            "plugins[0].Master: spell it \"master\"",
        ),
        (
            "longs",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"dhcp","daemon\u{17f}ocketPath":"/x"}}),
            "keys must be ASCII",
        ),
        (
            "mixeddatadir",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"host-local","subnet":"10.76.5.0/24","DataDir":"/etc"}}),
            "NADs may not set \"DataDir\"",
        ),
        // whereabouts' host paths, also nested.
        (
            "wblog",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"whereabouts","range":"10.76.6.0/24","log_file":"/etc/cron.d/x"}}),
            "plugins[0].ipam.log_file",
        ),
        (
            "wbkubeconfig",
            json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"ipam":{"type":"whereabouts","range":"10.76.6.0/24","kubernetes":{"kubeconfig":"/etc/kubernetes/admin.conf"}}}),
            "plugins[0].ipam.kubernetes.kubeconfig",
        ),
        // masters set: a macvlan without one would take the default route's uplink.
        (
            "nomaster",
            json!({"cniVersion":"1.0.0","type":"macvlan"}),
            "plugins[0].master is not set",
        ),
    ];
    for (name, conf, _) in &cases {
        node.add_nad("pods", name, conf);
    }
    node.add_nad(
        "pods",
        "fine",
        &json!({"cniVersion":"1.0.0","type":"macvlan","master":m,"mode":"bridge"}),
    );
    node.start_agent();
    let pod = Netns::new("trp");
    for (i, (name, _, want)) in cases.iter().enumerate() {
        let (code, msg) = add(&node, &format!("p{i}"), &pod, name).expect_err(name);
        assert_eq!(code, 7, "{name}: {msg}");
        assert!(msg.contains(want), "{name}: wanted {want:?} in {msg}");
        assert!(msg.contains(&format!("pods/{name}")), "{name}: {msg}");
        assert!(
            pod.links().iter().all(|l| l == "lo"),
            "{name}: {:?}",
            pod.links()
        );
        assert!(node.records().is_empty(), "{name}");
    }
    add(&node, "ok", &pod, "fine").expect_ok("a NAD within the policy");
    del(&node, "ok", &pod).expect_ok("DEL");
}

/// A second agent on the same state dir stops at once, naming the lock, and the
/// running one keeps serving (it holds the lock even while draining after SIGTERM).
#[test]
fn a_second_agent_on_the_same_state_dir_stops() {
    require_root!();
    let mut node = TestNode::new();
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.76.7.0/24"));
    node.start_agent();
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["agent", "--config"])
        .arg(node.path("agent.toml"))
        .env("RUST_BACKTRACE", "0")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(
        err.contains("agent.lock is held: another trellis agent runs with this state_dir"),
        "{err}"
    );
    let pod = Netns::new("trp");
    add(&node, "still", &pod, "mv-a").expect_ok("the first agent still serves");
    del(&node, "still", &pod).expect_ok("DEL");
}

/// SIGTERM mid-ADD: the ADD finishes and is answered, the lock is held while the
/// agent drains (a second agent stops), then it exits 0; the next agent DELs the pod.
#[test]
fn sigterm_lets_an_add_in_flight_finish() {
    require_root!();
    let mut node = TestNode::new();
    let gate = Gate::plugin(&node);
    let mut conf = node.macvlan_conf("10.76.8.0/24");
    conf["type"] = json!("slowmacvlan");
    node.add_nad("pods", "slow", &conf);
    node.start_agent();
    let pid = nix::unistd::Pid::from_raw(node.agent.as_ref().unwrap().pid() as i32);
    let pod = Netns::new("trp");
    std::thread::scope(|s| {
        let adding = s.spawn(|| add(&node, "inflight", &pod, "slow"));
        gate.wait_started();
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(100));
        // The ADD is held until this is seen: the first agent cannot have let go of
        // the lock, and a second one that ran anyway is cut off by `timeout`.
        let second = std::process::Command::new("timeout")
            .arg("20")
            .arg(trellis_rig::bins::trellis())
            .args(["agent", "--config"])
            .arg(node.path("agent.toml"))
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&second.stderr);
        assert!(err.contains("agent.lock is held"), "{err}");
        gate.release();
        adding.join().unwrap().expect_ok("the ADD in flight");
    });
    let status = node
        .agent
        .as_mut()
        .unwrap()
        .wait_exit(std::time::Duration::from_secs(10))
        .expect("the agent exits after its drain");
    assert!(status.success(), "{status}: {}", node.agent_log());
    assert!(
        node.agent_log()
            .contains("letting requests in flight finish"),
        "{}",
        node.agent_log()
    );
    assert_eq!(node.records(), ["inflight.json"]);
    node.start_agent();
    del(&node, "inflight", &pod).expect_ok("DEL by the next agent");
    assert!(node.records().is_empty());
    assert!(node.reservations().is_empty(), "{:?}", node.reservations());
}

/// `slowmacvlan`: macvlan whose ADD says it started, then waits to be let go (30 s at
/// most, should the test fail first), so a test acts while an ADD is surely in flight
/// (on a loaded machine too).
struct Gate {
    started: std::path::PathBuf,
    release: std::path::PathBuf,
}

impl Gate {
    fn plugin(node: &TestNode) -> Gate {
        let g = Gate {
            started: node.path("slow-started"),
            release: node.path("slow-release"),
        };
        node.add_plugin_script(
            "slowmacvlan",
            &format!(
                r#"if [ "$CNI_COMMAND" = ADD ]; then
  touch {}; i=0
  while [ ! -e {} ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done
fi
exec /usr/lib/cni/macvlan"#,
                g.started.display(),
                g.release.display()
            ),
        );
        g
    }

    fn wait_started(&self) {
        trellis_rig::wait_until(
            "the ADD reaching its plugin",
            std::time::Duration::from_secs(30),
            || self.started.exists(),
        );
    }

    fn release(&self) {
        std::fs::write(&self.release, b"").unwrap();
    }
}
