//! The dataplane against input and traffic made to slip past it (issue 10): names at
//! the longest legal length are kept whole, IPv6 extension headers and fragments do
//! not hide a port, a pod that bypasses its own egress hook meets its egress rules at
//! the host side of its veth, and pins and records are reconciled after a reboot.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};
use trellis_agent::acl::Acl;
use trellis_agent::dataplane::{read_acl_hits, Dataplane, DataplaneError, Owner};
use trellis_ebpf_common::{DIR_EGRESS, DIR_INGRESS, TCX_DROP, TCX_NEXT};
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::packets::{frame, ipv4_udp, send_raw, with_ipv6_ext, TCP, UDP};
use trellis_rig::require_root;
use trellis_rig::traffic::{received_while, slot_stats, udp, udp_sized, veth_pair};
use trellis_rig::BpfDir;

fn owner(network: &str, ifname: &str) -> Owner {
    Owner {
        namespace: "pods".into(),
        pod: "p".into(),
        network: network.into(),
        ifname: ifname.into(),
        container: "c-p".into(),
    }
}

fn acl(json: serde_json::Value) -> Acl {
    Acl::parse(&json.to_string()).expect("valid ACL")
}

#[test]
fn names_of_the_longest_legal_length_are_kept_whole() {
    require_root!();
    let dir = BpfDir::new("trellis-names");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    // A DNS label namespace (63) and a DNS subdomain NAD name (253) share a prefix
    // far longer than the old 127-byte field, so a cut name would alias.
    let ns = "n".repeat(63);
    let name = |last: char| format!("{}{last}", "a.".repeat(126));
    let (net_a, net_b) = (format!("{ns}/{}", name('x')), format!("{ns}/{}", name('y')));
    assert_eq!(net_a.len(), 63 + 1 + 253);
    let deny_tcp =
        acl(serde_json::json!({"rules": [{"action":"deny","cidr":"0.0.0.0/0","protocol":"tcp"}]}));
    let f = frame(
        "10.0.0.9".parse().unwrap(),
        "192.0.2.1".parse().unwrap(),
        TCP,
        80,
        80,
    );
    for round in 0..3 {
        dp.set_network_acl(&net_a, Some(&deny_tcp))
            .expect("set ACL");
        let a = dp.probe(&owner(&net_a, "net1")).expect("probe a");
        let b = dp.probe(&owner(&net_b, "net2")).expect("probe b");
        assert_eq!(
            a.run(DIR_INGRESS, &f, 1).unwrap().0,
            TCX_DROP,
            "round {round}: the ACL did not apply"
        );
        assert_eq!(
            b.run(DIR_INGRESS, &f, 1).unwrap().0,
            TCX_NEXT,
            "round {round}: another network's ACL applied"
        );
        let hits = read_acl_hits(&dir.0).unwrap();
        assert_eq!(
            hits.len(),
            1,
            "round {round}: {:?}",
            hits.iter().map(|h| &h.network).collect::<Vec<_>>()
        );
        assert_eq!(hits[0].network, net_a, "the name comes back whole");
        dp.detach(a.slot).unwrap();
        dp.detach(b.slot).unwrap();
        // The last attachment took the ACL (and its id) with it: none burnt.
        assert!(read_acl_hits(&dir.0).unwrap().is_empty(), "round {round}");
    }
    // One byte more than any legal name: refused by field, nothing made.
    let too_long = format!("{net_a}zzzz");
    let e = dp.set_network_acl(&too_long, Some(&deny_tcp)).unwrap_err();
    assert!(
        matches!(
            e,
            DataplaneError::NameTooLong {
                field: "network",
                ..
            }
        ),
        "{e}"
    );
    let e = dp.probe(&owner(&too_long, "net1")).err().expect("refused");
    assert!(e.to_string().contains("network"), "{e}");
    assert!(read_acl_hits(&dir.0).unwrap().is_empty());
}

#[test]
fn ipv6_extension_headers_and_fragments_do_not_hide_the_port() {
    require_root!();
    let dir = BpfDir::new("trellis-ext");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    // One network denies UDP to port 53; the other denies all UDP (no port).
    dp.set_network_acl(
        "pods/port",
        Some(&acl(serde_json::json!({"rules": [{"action":"deny","cidr":"::/0","protocol":"udp","ports":"53"}]}))),
    )
    .unwrap();
    dp.set_network_acl(
        "pods/udp",
        Some(&acl(
            serde_json::json!({"rules": [{"action":"deny","cidr":"::/0","protocol":"udp"}]}),
        )),
    )
    .unwrap();
    let port = dp.probe(&owner("pods/port", "net1")).unwrap();
    let any_udp = dp.probe(&owner("pods/udp", "net2")).unwrap();
    let remote: IpAddr = "fd00::9".parse().unwrap();
    let local: IpAddr = "2001:db8::1".parse().unwrap();
    let to = |dport: u16| frame(remote, local, UDP, dport, 120);
    let opts = |len8: u8| {
        let mut b = vec![0u8; 7 + 8 * len8 as usize];
        b[0] = len8;
        b
    };
    let hbh = (0u8, opts(0));
    let dst = (60u8, opts(1));
    let rth = (43u8, opts(0));
    let ah = (51u8, {
        let mut b = vec![0u8; 11];
        b[0] = 1; // (1 + 2) * 4 = 12 bytes
        b
    });
    let frag = |offset8: u16, more: bool| {
        let v = (offset8 << 3) | more as u16;
        (44u8, vec![0, (v >> 8) as u8, v as u8, 0, 0, 0, 7])
    };
    let run = |p: &trellis_agent::dataplane::Probe, f: &[u8]| p.run(DIR_INGRESS, f, 1).unwrap().0;
    // Port 53 behind each kind of extension header, and behind a chain of them.
    for (what, headers) in [
        ("hop-by-hop", vec![hbh.clone()]),
        ("destination options", vec![dst.clone()]),
        ("routing", vec![rth.clone()]),
        ("authentication", vec![ah.clone()]),
        ("first fragment", vec![frag(0, true)]),
        (
            "a chain of five",
            vec![
                hbh.clone(),
                dst.clone(),
                rth.clone(),
                ah.clone(),
                frag(0, true),
            ],
        ),
    ] {
        assert_eq!(
            run(&port, &with_ipv6_ext(&to(53), &headers)),
            TCX_DROP,
            "{what} hid port 53"
        );
        assert_eq!(
            run(&port, &with_ipv6_ext(&to(54), &headers)),
            TCX_NEXT,
            "{what}: port 54 dropped"
        );
    }
    // A later fragment has no ports: only port-less rules judge it, as with IPv4.
    let later = with_ipv6_ext(&to(53), &[frag(185, false)]);
    assert_eq!(run(&port, &later), TCX_NEXT);
    assert_eq!(run(&any_udp, &later), TCX_DROP);
    // What follows a later fragment's header is the datagram's middle, whatever its
    // bytes say: not walked as headers (here they would claim 2 KiB of options).
    let mut junk = opts(0);
    junk[0] = 255;
    let later_junk = with_ipv6_ext(&to(53), &[frag(185, false), (60u8, junk)]);
    assert_eq!(run(&port, &later_junk), TCX_NEXT);
    // More headers than the walk goes, or one cut short: dropped where there is an ACL.
    let eight: Vec<_> = (0..8).map(|_| dst.clone()).collect();
    let nine: Vec<_> = (0..9).map(|_| dst.clone()).collect();
    assert_eq!(run(&port, &with_ipv6_ext(&to(80), &eight)), TCX_NEXT);
    assert_eq!(run(&port, &with_ipv6_ext(&to(80), &nine)), TCX_DROP);
    let mut cut = with_ipv6_ext(&to(80), &[(0u8, opts(10))]);
    cut.truncate(14 + 40 + 16);
    assert_eq!(run(&port, &cut), TCX_DROP);
    // IPv4's tiny first fragment (RFC 1858): too short for the ports, which come in
    // the next one. Dropped; a whole later fragment is judged without ports.
    dp.set_network_acl(
        "pods/port",
        Some(&acl(serde_json::json!({"rules": [{"action":"deny","cidr":"0.0.0.0/0","protocol":"udp","ports":"53"}]}))),
    )
    .unwrap();
    let v4 = |dport| {
        frame(
            "10.0.0.9".parse().unwrap(),
            "192.0.2.1".parse().unwrap(),
            UDP,
            dport,
            14 + 20 + 8,
        )
    };
    let mut tiny = v4(53);
    tiny[14 + 6] |= 0x20; // more fragments, offset 0
    tiny.truncate(14 + 20 + 2);
    assert_eq!(run(&port, &tiny), TCX_DROP);
    let mut later4 = v4(53);
    later4[14 + 6..14 + 8].copy_from_slice(&185u16.to_be_bytes());
    assert_eq!(run(&port, &later4), TCX_NEXT);
    assert_eq!(run(&port, &v4(53)), TCX_DROP);
    dp.detach(port.slot).unwrap();
    dp.detach(any_udp.slot).unwrap();
}

#[test]
fn fragmented_datagrams_to_a_denied_port_do_not_arrive() {
    require_root!();
    let dir = BpfDir::new("trellis-frag");
    let (a, b) = veth_pair("trf", ["a0", "b0"], "10.90.0", Some("fd00:90::"));
    let mut dp = Dataplane::open(&dir.0).expect("load");
    dp.set_network_acl(
        "pods/frag",
        Some(&acl(serde_json::json!({"rules": [
            {"action":"deny","direction":"ingress","cidr":"10.90.0.2/32","protocol":"udp","ports":"9050"},
            {"action":"deny","direction":"ingress","cidr":"fd00:90::2/128","protocol":"udp","ports":"9050"}
        ]}))),
    )
    .unwrap();
    let slot = dp
        .attach(&a.path(), &owner("pods/frag", "a0"))
        .expect("attach");
    for (host, what) in [("10.90.0.1", "IPv4"), ("[fd00:90::1]", "IPv6")] {
        let at = |port: u16| format!("{host}:{port}").parse::<SocketAddr>().unwrap();
        // 3,000 bytes: two fragments on a 1,500-byte MTU.
        assert_eq!(
            udp_sized(&b, &a, at(9050), 3, 3000),
            0,
            "{what}: fragmented datagrams to a denied port arrived"
        );
        assert_eq!(
            udp_sized(&b, &a, at(9051), 3, 3000),
            3,
            "{what}: datagrams to an allowed port were lost"
        );
    }
    // Each denied datagram's first fragment was dropped (its later one has no port).
    assert!(slot_stats(&dir.0, slot).ingress.drops >= 6);
    dp.detach(slot).unwrap();
}

#[test]
fn egress_rules_hold_at_the_host_side_of_a_veth() {
    require_root!();
    let dir = BpfDir::new("trellis-peer");
    // a: the pod (a0); b: the node, where the agent runs, with the veth's host side b0.
    let (pod, node) = veth_pair("trv", ["a0", "b0"], "10.91.0", None);
    let node_path = node.path();
    let dir_path = dir.0.clone();
    let pod_path = pod.path();
    // The agent's side runs in the node's netns (a thread of its own).
    let (slot, dp) = std::thread::spawn(move || {
        Netns::at(node_path).enter_this_thread();
        let mut dp = Dataplane::open(&dir_path).expect("load");
        dp.set_network_acl(
            "pods/peer",
            Some(&acl(serde_json::json!({"rules": [
                {"action":"deny","direction":"egress","cidr":"10.91.0.2/32","protocol":"udp","ports":"9050"}
            ]}))),
        )
        .unwrap();
        let slot = dp.attach(&pod_path, &owner("pods/peer", "a0")).expect("attach");
        (slot, dp)
    })
    .join()
    .unwrap();
    let host_filters = node.sh("tc filter show dev b0 ingress");
    assert!(
        host_filters.contains(&format!("trellis-{slot}")),
        "no program on the host side: {host_filters}"
    );
    let to = |port: u16| SocketAddr::from(([10, 91, 0, 2], port));
    // Through the pod's stack: dropped at its own egress.
    assert_eq!(udp(&pod, &node, to(9050), 3), 0);
    // Past its egress hook (what CAP_NET_RAW allows): dropped at the host side.
    let raw = |port: u16| {
        ipv4_udp(
            [2, 0, 0, 0, 0, 1],
            [2, 0, 0, 0, 0, 2],
            [10, 91, 0, 1].into(),
            [10, 91, 0, 2].into(),
            port,
            b"bypass",
        )
    };
    let got = received_while(&node, to(9050), || {
        for _ in 0..2 {
            send_raw(&pod, "a0", &raw(9050), true);
        }
    });
    assert_eq!(
        got, 0,
        "a datagram that skipped the pod's egress hook got through"
    );
    // The same path to an allowed port arrives: the bypass is real.
    let got = received_while(&node, to(9051), || send_raw(&pod, "a0", &raw(9051), true));
    assert_eq!(got, 1);
    let s = slot_stats(&dir.0, slot);
    assert_eq!(s.egress.drops, 3 + 2, "{s:?}");
    let mut dp = dp;
    dp.detach(slot).unwrap();
    assert_eq!(trellis_rig::bpf::live_hooks(&dir.0), 0);
    // Detached: the bypass reaches the node again.
    let got = received_while(&node, to(9050), || send_raw(&pod, "a0", &raw(9050), true));
    assert_eq!(got, 1);
    let _ = DIR_EGRESS;
}

fn wait_for_pins(node: &TestNode, n: usize) {
    let start = Instant::now();
    while node.live_hooks() != n {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{} live hooks, not {n}\n{}",
            node.live_hooks(),
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn dataplane_node() -> TestNode {
    let mut node = TestNode::new();
    node.dataplane = true;
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.75.1.0/24"));
    node.start_agent();
    node
}

fn add(node: &TestNode, c: &str, ns: &str, pod: &str) {
    node.shim(
        "ADD",
        c,
        ns,
        ("pods", pod),
        &node.shim_conf(Some(&networks_annotation("mv-a"))),
    )
    .expect_ok("ADD");
}

#[test]
fn after_a_reboot_an_old_sandbox_cannot_detach_a_new_pod() {
    require_root!();
    let mut node = dataplane_node();
    let a = Netns::new("trp");
    let a_path = a.path().to_string_lossy().into_owned();
    add(&node, "old", &a_path, "a");
    // eth0 (bridge veth: ingress, egress, host side) + net1 (macvlan: 2).
    wait_for_pins(&node, 5);
    // "Reboot": the pod's netns and bpffs are gone, the records stay.
    node.stop_agent();
    drop(a);
    std::fs::remove_dir_all(&node.bpf_dir).unwrap();
    node.start_agent();
    let b = Netns::new("trp");
    add(&node, "new", &b.path().to_string_lossy(), "b");
    wait_for_pins(&node, 5);
    // The runtime's DEL of the old sandbox (its netns gone).
    node.shim("DEL", "old", &a_path, ("pods", "a"), &node.shim_conf(None))
        .expect_ok("DEL old");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(
        node.live_hooks(),
        5,
        "the old sandbox's DEL detached the new pod"
    );
    let stats = trellis_rig::traffic::trellis_stats(&node.bpf_dir, &["--pod", "b"]);
    assert_eq!(stats.len(), 2, "{stats:?}");
    assert!(
        node.agent_log()
            .contains("names a dataplane slot that is gone"),
        "{}",
        node.agent_log()
    );
    node.shim(
        "DEL",
        "new",
        &b.path().to_string_lossy(),
        ("pods", "b"),
        &node.shim_conf(None),
    )
    .expect_ok("DEL new");
    assert_eq!(node.live_hooks(), 0);
}

#[test]
fn slots_no_record_owns_are_detached_at_start() {
    require_root!();
    let mut node = dataplane_node();
    let a = Netns::new("trp");
    add(&node, "lost", &a.path().to_string_lossy(), "a");
    wait_for_pins(&node, 5);
    node.stop_agent();
    // The record is lost (a disk fault, a state dir wiped): its slots are orphans.
    std::fs::remove_file(node.state_dir().join("containers/lost.json")).unwrap();
    node.start_agent();
    wait_for_pins(&node, 0);
    assert!(trellis_rig::traffic::trellis_stats(&node.bpf_dir, &[]).is_empty());
    assert!(
        node.agent_log()
            .contains("dataplane slot with no attachment record: detached"),
        "{}",
        node.agent_log()
    );
}

/// A shim request for pod `pod` (container `c`) in netns `ns`, as the runtime sends it.
fn request(
    cmd: &str,
    c: &str,
    ns: &str,
    pod: &str,
    node: &TestNode,
) -> trellis_shim::wire::Request {
    let env = [
        ("CNI_COMMAND", cmd.to_string()),
        ("CNI_CONTAINERID", c.to_string()),
        ("CNI_NETNS", ns.to_string()),
        ("CNI_IFNAME", "eth0".to_string()),
        ("CNI_PATH", "/usr/lib/cni".to_string()),
        (
            "CNI_ARGS",
            format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=pods;K8S_POD_NAME={pod}"),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    trellis_shim::wire::Request {
        env,
        stdin: node
            .shim_conf(Some(&networks_annotation("slow-acl")))
            .to_string(),
    }
}

fn expect_ok(h: &trellis_agent::verbs::Handler, r: &trellis_shim::wire::Request, what: &str) {
    let resp = h.handle(r);
    assert!(resp.ok, "{what}: {}", resp.stdout);
}

/// An ADD that read the NAD before an edit, and attaches after the sync applied that
/// edit, must not put the old rules back: the NAD is the last writer.
#[test]
fn an_add_planned_before_a_nad_edit_does_not_undo_it() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    // A macvlan that takes a second before it starts: the edit lands mid-ADD.
    node.add_plugin_script(
        "slowmacvlan",
        r#"[ "$CNI_COMMAND" = ADD ] && sleep 1; exec /usr/lib/cni/macvlan"#,
    );
    let mut conf = node.macvlan_conf("10.73.1.0/24");
    conf["type"] = serde_json::json!("slowmacvlan");
    let rules = |n: usize| {
        let r: Vec<_> = (0..n)
            .map(|i| serde_json::json!({"action":"deny","cidr": format!("10.9.{i}.0/24")}))
            .collect();
        [(
            "trellis.dev/acl".to_string(),
            serde_json::json!({"rules": r}).to_string(),
        )]
        .into()
    };
    node.add_nad_annotated("pods", "slow-acl", &conf, &rules(1));
    std::fs::write(node.path("agent.toml"), node.config_toml()).unwrap();
    let config =
        trellis_agent::config::AgentConfig::load(&node.path("agent.toml")).expect("config");
    // The agent's side, in-process, in the node's netns (no background ACL sync: the
    // test runs the sync pass itself, at the moment the race needs it).
    let host = node.host.path();
    let h = {
        let host = host.clone();
        let config = config.clone();
        std::thread::spawn(move || {
            Netns::at(host).enter_this_thread();
            let source =
                std::sync::Arc::new(trellis_agent::source::files::FileSource::new(match &config
                    .networks
                {
                    trellis_agent::config::NetworksConfig::Files { dir } => dir.clone(),
                    _ => unreachable!(),
                }));
            let dp = Dataplane::open(&config.dataplane.bpffs_dir).expect("dataplane");
            std::sync::Arc::new(
                trellis_agent::verbs::Handler::new(&config, source)
                    .unwrap()
                    .with_dataplane(dp),
            )
        })
        .join()
        .unwrap()
    };
    let in_host = |f: Box<dyn FnOnce() + Send>| {
        let host = host.clone();
        std::thread::spawn(move || {
            Netns::at(host).enter_this_thread();
            f()
        })
    };
    let (p1, p2) = (Netns::new("trp"), Netns::new("trp"));
    let (n1, n2) = (
        p1.path().to_string_lossy().into_owned(),
        p2.path().to_string_lossy().into_owned(),
    );
    let r1 = request("ADD", "c1", &n1, "a", &node);
    let hh = h.clone();
    in_host(Box::new(move || expect_ok(&hh, &r1, "first pod")))
        .join()
        .unwrap();
    let rules_now = || {
        read_acl_hits(&config.dataplane.bpffs_dir).unwrap()[0]
            .rules
            .len()
    };
    assert_eq!(rules_now(), 1);
    // The second pod's ADD reads the NAD (1 rule), then waits on its delegate...
    let r2 = request("ADD", "c2", &n2, "b", &node);
    let hh = h.clone();
    let adding = in_host(Box::new(move || expect_ok(&hh, &r2, "second pod")));
    std::thread::sleep(Duration::from_millis(300));
    // ...while the NAD is edited (2 rules) and the sync applies the edit.
    node.add_nad_annotated("pods", "slow-acl", &conf, &rules(2));
    let hh = h.clone();
    in_host(Box::new(move || hh.sync_acls(&mut Default::default())))
        .join()
        .unwrap();
    assert_eq!(rules_now(), 2, "the sync did not apply the edit");
    adding.join().unwrap();
    assert_eq!(rules_now(), 2, "the ADD put the NAD's old rules back");
    for (c, n, pod) in [("c1", &n1, "a"), ("c2", &n2, "b")] {
        let r = request("DEL", c, n, pod, &node);
        let hh = h.clone();
        in_host(Box::new(move || expect_ok(&hh, &r, "DEL")))
            .join()
            .unwrap();
    }
    assert!(read_acl_hits(&config.dataplane.bpffs_dir)
        .unwrap()
        .is_empty());
}

/// Pins of another layout (an upgrade): the agent still serves CNI, without its
/// dataplane, and refuses ACL networks naming why.
#[test]
fn pins_of_another_layout_keep_the_agent_up_without_its_dataplane() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    {
        // Pins as an agent of layout 1 would have left them.
        drop(Dataplane::open(&node.bpf_dir).expect("load"));
        let m = aya::maps::MapData::from_pin(node.bpf_dir.join(trellis_ebpf_common::maps::LAYOUT))
            .unwrap();
        let mut layout: aya::maps::Array<aya::maps::MapData, u32> =
            aya::maps::Array::try_from(aya::maps::Map::Array(m)).unwrap();
        layout.set(0, 1, 0).unwrap();
    }
    node.add_nad("pods", "mv-a", &node.macvlan_conf("10.73.2.0/24"));
    let acl: std::collections::BTreeMap<String, String> = [(
        "trellis.dev/acl".to_string(),
        r#"{"rules":[{"action":"deny","cidr":"10.0.0.0/8"}]}"#.to_string(),
    )]
    .into();
    node.add_nad_annotated("pods", "acl-net", &node.macvlan_conf("10.73.3.0/24"), &acl);
    node.start_agent();
    assert!(
        node.agent_log().contains("are layout 1"),
        "{}",
        node.agent_log()
    );
    let pod = Netns::new("trp");
    let p = pod.path().to_string_lossy().into_owned();
    add(&node, "c1", &p, "a");
    node.shim("DEL", "c1", &p, ("pods", "a"), &node.shim_conf(None))
        .expect_ok("DEL");
    let (code, msg) = node
        .shim(
            "ADD",
            "c2",
            &p,
            ("pods", "a"),
            &node.shim_conf(Some(&networks_annotation("acl-net"))),
        )
        .expect_err("ACL network without a dataplane");
    assert_eq!(code, 7, "{msg}");
    assert!(
        msg.contains("not started") && msg.contains("layout 1"),
        "{msg}"
    );
}

/// Pins that say this layout but hold a map of another shape (a build that changed a
/// map and not LAYOUT_VERSION): refused by name, never re-adopted and misread.
#[test]
fn a_pinned_map_of_another_shape_is_refused_naming_it() {
    require_root!();
    let node = TestNode::new();
    drop(Dataplane::open(&node.bpf_dir).expect("load"));
    let slot = node.bpf_dir.join(trellis_ebpf_common::maps::SLOT);
    std::fs::remove_file(&slot).unwrap();
    trellis_rig::bpf::pin_array(&slot, 4, 8).unwrap();
    let Err(e) = Dataplane::open(&node.bpf_dir) else {
        panic!("a SLOT pin of another shape was re-adopted");
    };
    let msg = e.to_string();
    assert!(
        msg.contains("map SLOT is of another shape") && msg.contains("rm -r"),
        "{msg}"
    );
    // Nothing was re-adopted or replaced.
    let info = aya::maps::MapInfo::from_pin(&slot).unwrap();
    assert_eq!((info.value_size(), info.max_entries()), (4, 8));
}

/// Pins lost while a pod lives on (bpffs emptied, the agent restarted) and its ACL
/// network's NAD unreadable: the interface comes back denying everything, never
/// unfiltered, until the NAD reads again and the sync puts its rules back.
#[test]
fn an_acl_interface_whose_nad_cannot_be_read_comes_back_denying_all() {
    require_root!();
    let mut node = TestNode::new();
    node.dataplane = true;
    let acl =
        serde_json::json!({"default":"allow","rules":[{"action":"deny","cidr":"10.9.9.0/24"}]});
    let annotations = [("trellis.dev/acl".to_string(), acl.to_string())].into();
    let conf = node.macvlan_conf("10.75.2.0/24");
    node.add_nad_annotated("pods", "acl-net", &conf, &annotations);
    node.start_agent();
    let pod = Netns::new("trp");
    let pod_path = pod.path().to_string_lossy().into_owned();
    node.shim(
        "ADD",
        "c1",
        &pod_path,
        ("pods", "p"),
        &node.shim_conf(Some(&networks_annotation("acl-net"))),
    )
    .expect_ok("ADD");
    wait_for_pins(&node, 5);
    let rules_of = |node: &TestNode| -> Option<(usize, &'static str)> {
        read_acl_hits(&node.bpf_dir)
            .unwrap_or_default()
            .into_iter()
            .find(|h| h.network == "pods/acl-net")
            .map(|h| (h.rules.len(), h.default_action))
    };
    assert_eq!(rules_of(&node), Some((1, "allow")));

    node.stop_agent();
    std::fs::remove_dir_all(&node.bpf_dir).unwrap();
    let nad = node.path("nads/pods-acl-net.json");
    let saved = std::fs::read(&nad).unwrap();
    std::fs::remove_file(&nad).unwrap();
    node.start_agent();
    wait_for_pins(&node, 5);
    assert_eq!(rules_of(&node), Some((0, "deny")), "{}", node.agent_log());
    assert!(
        node.agent_log().contains("deny all traffic until it can"),
        "{}",
        node.agent_log()
    );

    std::fs::write(&nad, saved).unwrap();
    let start = Instant::now();
    while rules_of(&node) != Some((1, "allow")) {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "{}",
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node.shim("DEL", "c1", &pod_path, ("pods", "p"), &node.shim_conf(None))
        .expect_ok("DEL");
    assert_eq!(node.live_hooks(), 0);
}
