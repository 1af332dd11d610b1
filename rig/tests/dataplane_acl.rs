//! Per-network ACLs in the kernel: the loaded programs judge crafted packets exactly as
//! the rules' definition says (BPF_PROG_TEST_RUN), and on a real veth between
//! namespaces this test makes a deny rule drops and counts exactly the packets it
//! should, both directions and IPv6, rules change live, and a new loader (an agent
//! restart) keeps rules and counters.

use std::net::IpAddr;
use std::path::Path;
use trellis_agent::acl::Acl;
use trellis_agent::dataplane::{read_acl_hits, read_stats, Dataplane, Owner};
use trellis_ebpf_common::{DIR_EGRESS, DIR_INGRESS, TCX_DROP, TCX_NEXT};
use trellis_rig::packets::{frame, ICMP, ICMPV6, TCP, UDP};
use trellis_rig::require_root;
use trellis_rig::traffic::{slot_stats, udp, veth_pair};
use trellis_rig::BpfDir;

fn owner(pod: &str, network: &str, ifname: &str) -> Owner {
    Owner {
        namespace: "pods".into(),
        pod: pod.into(),
        network: network.into(),
        ifname: ifname.into(),
        container: format!("c-{pod}"),
    }
}

fn hits_of(dir: &Path, network: &str) -> (Vec<u64>, u64) {
    let h = read_acl_hits(dir)
        .unwrap()
        .into_iter()
        .find(|h| h.network == network)
        .unwrap_or_else(|| panic!("no ACL for {network} in the pins"));
    (h.rules, h.default)
}

struct Lcg(u64);
impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 11
    }
}

#[test]
fn kernel_verdicts_follow_the_rules() {
    require_root!();
    let dir = BpfDir::new("trellis-acl");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let mut g = Lcg(11);
    let local4: IpAddr = "192.0.2.1".parse().unwrap();
    let local6: IpAddr = "2001:db8::1".parse().unwrap();
    for round in 0..6 {
        // Nested CIDRs inside 10.0.0.0/8 and fd00::/16, ports and protocols mixed.
        let mut rules = Vec::new();
        for _ in 0..(20 + g.next() % 80) {
            let v4 = g.next().is_multiple_of(2);
            let (cidr, max) = if v4 {
                let p = 8 + (g.next() % 25) as u32;
                let a = (10u32 << 24 | (g.next() as u32 & 0x00ff_ffff)) & (u32::MAX << (32 - p));
                (format!("{}/{p}", std::net::Ipv4Addr::from(a)), 32)
            } else {
                let p = 16 + (g.next() % 113) as u32;
                let a = (0xfd00u128 << 112 | (g.next() as u128) << 48 | g.next() as u128 & 0xffff)
                    & (u128::MAX << (128 - p));
                (format!("{}/{p}", std::net::Ipv6Addr::from(a)), 128)
            };
            let _ = max;
            let proto = ["tcp", "udp", "any"][(g.next() % 3) as usize];
            let dirs = ["ingress", "egress", "both"];
            let mut r = serde_json::json!({
                "action": if g.next().is_multiple_of(2) { "allow" } else { "deny" },
                "cidr": cidr,
                "direction": dirs[(g.next() % 3) as usize],
                "protocol": proto,
            });
            if proto != "any" && g.next().is_multiple_of(2) {
                let lo = 1 + g.next() % 1000;
                r["ports"] = format!("{lo}-{}", lo + g.next() % 100).into();
            }
            rules.push(r);
        }
        let default = if round % 2 == 0 { "deny" } else { "allow" };
        let acl = Acl::parse(&serde_json::json!({"default": default, "rules": rules}).to_string())
            .expect("valid ACL");
        let network = format!("pods/net{round}");
        dp.set_network_acl(&network, Some(&acl)).expect("set ACL");
        let probe = dp.probe(&owner("p", &network, "net1")).expect("probe");
        let mut drops = [0u64; 2];
        for _ in 0..400 {
            let v4 = g.next().is_multiple_of(2);
            let remote: IpAddr = if v4 {
                std::net::Ipv4Addr::from(10u32 << 24 | (g.next() as u32 & 0x00ff_ffff)).into()
            } else {
                std::net::Ipv6Addr::from(
                    0xfd00u128 << 112 | (g.next() as u128) << 48 | g.next() as u128 & 0xffff,
                )
                .into()
            };
            let local = if v4 { local4 } else { local6 };
            let proto = [TCP, UDP, if v4 { ICMP } else { ICMPV6 }][(g.next() % 3) as usize];
            let dport = (1 + g.next() % 1100) as u16;
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                let f = if dir == DIR_INGRESS {
                    frame(remote, local, proto, dport, 100)
                } else {
                    frame(local, remote, proto, dport, 100)
                };
                let ports = matches!(proto, TCP | UDP).then_some(dport);
                let deny = match acl.decide(dir, remote, proto, ports) {
                    Some(i) => acl.rules[i].deny,
                    None => acl.default_deny,
                };
                let (verdict, _) = probe.run(dir, &f, 1).expect("test run");
                assert_eq!(
                    verdict,
                    if deny { TCX_DROP } else { TCX_NEXT },
                    "round {round} dir {dir} remote {remote} proto {proto} port {dport}"
                );
                drops[dir as usize] += deny as u64;
            }
        }
        let s = slot_stats(&dir.0, probe.slot);
        assert_eq!((s.ingress.drops, s.egress.drops), (drops[0], drops[1]));
        let (hits, default_hits) = hits_of(&dir.0, &network);
        assert_eq!(hits.iter().sum::<u64>() + default_hits, 800);
        dp.detach(probe.slot).expect("detach");
        assert!(
            read_acl_hits(&dir.0)
                .unwrap()
                .iter()
                .all(|h| h.network != network),
            "the last attachment of a network takes its ACL with it"
        );
    }
}

fn received(out: &str) -> usize {
    out.split(',')
        .find_map(|p| p.trim().strip_suffix(" received"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no ping summary in {out:?}"))
}

/// The filters on `dev` (both sides) as tc shows them: the stub programs' ids
/// among them, so an unchanged output means the same attachment.
fn filters(ns: &trellis_rig::netns::Netns, dev: &str) -> String {
    let out = ns.sh(&format!(
        "tc filter show dev {dev} ingress; tc filter show dev {dev} egress"
    ));
    assert!(out.contains(" id "), "{out}");
    out
}

#[test]
fn deny_rules_drop_exactly_change_live_and_survive_a_restart() {
    require_root!();
    let dir = BpfDir::new("trellis-acl");
    // IPv6 neighbours are found by ND, which an ACL must let through.
    let (a, b) = veth_pair("tra", ["a0", "b0"], "10.88.0", Some("fd00:88::"));
    let network = "pods/acl-net";
    let rules = |icmp_in: bool| {
        let mut r = vec![
            serde_json::json!({"action":"deny","direction":"egress","cidr":"10.88.0.0/24","protocol":"udp","ports":"9000-9099"}),
            serde_json::json!({"action":"deny","direction":"ingress","cidr":"fd00:88::2/128","protocol":"icmpv6"}),
        ];
        if icmp_in {
            r.push(serde_json::json!({"action":"deny","direction":"ingress","cidr":"10.88.0.2/32","protocol":"icmp"}));
        }
        Acl::parse(&serde_json::json!({"default":"allow","rules": r}).to_string()).unwrap()
    };
    let mut dp = Dataplane::open(&dir.0).expect("load");
    dp.set_network_acl(network, Some(&rules(true))).unwrap();
    let slot = dp
        .attach(&a.path(), &owner("a", network, "a0"))
        .expect("attach");
    let links = filters(&a, "a0");

    // Ingress IPv4: echo requests from b die at a's ingress, each counted once.
    assert_eq!(
        received(&b.sh("ping -c 4 -i 0.2 -W 1 10.88.0.1 || true")),
        0
    );
    // Egress: datagrams to 9050 are dropped on the way out; 9100 is not in the range.
    assert_eq!(udp(&a, &b, "10.88.0.2:9050".parse().unwrap(), 6), 0);
    assert_eq!(udp(&a, &b, "10.88.0.2:9100".parse().unwrap(), 3), 3);
    // IPv6: ND gets through (the datagrams arrive), echo requests do not.
    assert_eq!(udp(&b, &a, "[fd00:88::1]:7000".parse().unwrap(), 2), 2);
    assert_eq!(
        received(&b.sh("ping -6 -c 3 -i 0.2 -W 1 fd00:88::1 || true")),
        0
    );
    let s = slot_stats(&dir.0, slot);
    assert_eq!((s.ingress.drops, s.egress.drops), (4 + 3, 6), "{s:?}");
    let (hits, _) = hits_of(&dir.0, network);
    assert_eq!(hits, vec![6, 3, 4], "hits per rule in NAD order");

    // Live update: the ICMP rule goes; the same filters now let pings through.
    dp.set_network_acl(network, Some(&rules(false))).unwrap();
    assert_eq!(received(&b.sh("ping -c 3 -i 0.2 -W 1 10.88.0.1")), 3);
    assert_eq!(links, filters(&a, "a0"), "nothing was detached");
    assert_eq!(slot_stats(&dir.0, slot).ingress.drops, 7);
    // And back.
    dp.set_network_acl(network, Some(&rules(true))).unwrap();

    // Restart: a new loader finds the rules and counters where they were.
    drop(dp);
    assert_eq!(
        received(&b.sh("ping -c 2 -i 0.2 -W 1 10.88.0.1 || true")),
        0
    );
    let mut dp = Dataplane::open(&dir.0).expect("reload");
    let before = dp.acl_of(network).unwrap().expect("ACL kept");
    assert_eq!(
        dp.set_network_acl(network, Some(&rules(true))).unwrap(),
        Some(before.0)
    );
    assert_eq!(
        received(&b.sh("ping -c 2 -i 0.2 -W 1 10.88.0.1 || true")),
        0
    );
    assert_eq!(slot_stats(&dir.0, slot).ingress.drops, 7 + 4);
    // Rule 2 went away in the live update and came back: it counts from zero.
    assert_eq!(hits_of(&dir.0, network).0[2], 4);

    // DEL: the slot, its links and the network's ACL (its last attachment) are gone.
    dp.detach(slot).unwrap();
    assert!(read_stats(&dir.0).unwrap().is_empty());
    assert!(read_acl_hits(&dir.0).unwrap().is_empty());
    assert_eq!(trellis_rig::bpf::live_hooks(&dir.0), 0);
    assert!(dp.acl_of(network).unwrap().is_none());
    assert_eq!(received(&b.sh("ping -c 1 -W 1 10.88.0.1")), 1);
}

/// ACLs share one table space; the one that does not fit is refused by name, leaves
/// nothing behind, and the others keep working.
/// One namespace's ACL networks hold at most their share of the shared spaces and
/// of the ACL ids (`[dataplane] acl_share_per_namespace`): past it, that
/// namespace's next ACL is refused naming the namespace, while another's fits.
#[test]
fn a_namespace_holds_no_more_than_its_share() {
    require_root!();
    let dir = BpfDir::new("trellis-acl");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    // 0.5% of 1,024 ids: 5; of 262,144 IPv4 intervals: 1,310.
    dp.set_acl_share(0.005);
    let small = Acl::parse(r#"{"rules":[{"action":"deny","cidr":"10.9.0.0/16"}]}"#).unwrap();
    for i in 0..5 {
        dp.set_network_acl(&format!("tenant-a/n{i}"), Some(&small))
            .expect("within the share");
    }
    let e = dp
        .set_network_acl("tenant-a/n5", Some(&small))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("namespace tenant-a")
            && e.contains("ACL id")
            && e.contains("acl_share_per_namespace"),
        "{e}"
    );
    assert!(dp.acl_of("tenant-a/n5").unwrap().is_none());
    // Changing a network already held is not a new one.
    let other = Acl::parse(r#"{"rules":[{"action":"deny","cidr":"10.8.0.0/16"}]}"#).unwrap();
    dp.set_network_acl("tenant-a/n0", Some(&other))
        .expect("an update within the share");
    // Another namespace is not held back by tenant-a.
    dp.set_network_acl("tenant-b/n0", Some(&small))
        .expect("another namespace");
    // 1,000 /24s need 2 x 1,002 IPv4 intervals: past 1,310.
    let rules: Vec<String> = (0..1_000)
        .map(|i| {
            format!(
                r#"{{"action":"deny","cidr":"10.{}.{}.0/24"}}"#,
                i / 256,
                i % 256
            )
        })
        .collect();
    let big = Acl::parse(&format!(r#"{{"rules":[{}]}}"#, rules.join(","))).unwrap();
    let e = dp
        .set_network_acl("tenant-c/big", Some(&big))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("IPv4 interval") && e.contains("namespace tenant-c"),
        "{e}"
    );
    // The cluster network (no namespace) has no share.
    dp.set_network_acl("cluster", Some(&big))
        .expect("the cluster network");
}

#[test]
fn an_acl_that_does_not_fit_is_refused_cleanly() {
    require_root!();
    let dir = BpfDir::new("trellis-acl");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    // 10,000 adjacent IPv4 /24s on both directions: 2 x 10,002 of the 262,144
    // interval entries (and 20,000 of the 262,144 rule entries).
    let rules: Vec<String> = (0..10_000)
        .map(|i| {
            format!(
                r#"{{"action":"deny","cidr":"10.{}.{}.0/24"}}"#,
                i / 256,
                i % 256
            )
        })
        .collect();
    let big = Acl::parse(&format!(r#"{{"rules":[{}]}}"#, rules.join(","))).unwrap();
    let mut fitted = Vec::new();
    let err = loop {
        let network = format!("pods/big{}", fitted.len());
        match dp.set_network_acl(&network, Some(&big)) {
            Ok(_) => fitted.push(network),
            Err(e) => break (network, e),
        }
        assert!(fitted.len() < 20, "the space never ran out");
    };
    assert_eq!(fitted.len(), 13, "262,144 / 20,004 entries");
    let msg = err.1.to_string();
    assert!(
        msg.starts_with(&format!("network {}: its ACL needs ", err.0))
            && msg.contains(
                "IPv4 interval entries than are free in the shared table space (262144 in all"
            ),
        "{msg}"
    );
    assert!(dp.acl_of(&err.0).unwrap().is_none(), "nothing left of it");
    // The fitted ones still judge: a probe on the first drops what its rules deny.
    let probe = dp.probe(&owner("p", &fitted[0], "net1")).unwrap();
    let f = frame(
        "10.0.5.9".parse().unwrap(),
        "192.0.2.1".parse().unwrap(),
        TCP,
        80,
        80,
    );
    assert_eq!(probe.run(DIR_INGRESS, &f, 1).unwrap().0, TCX_DROP);
    dp.detach(probe.slot).unwrap();
    // Freed space is reused.
    dp.set_network_acl(&fitted[1], None).unwrap();
    dp.set_network_acl(&err.0, Some(&big))
        .expect("fits after one is removed");
}

/// 1,024 networks with an ACL fit at once; the next is refused by name and leaves
/// nothing; dropping one makes room again.
#[test]
fn a_thousand_and_twenty_four_acl_networks_fit() {
    require_root!();
    let dir = BpfDir::new("trellis-acl");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let acl = Acl::parse(
        r#"{"default":"deny","rules":[{"action":"allow","cidr":"10.0.0.0/8"},{"action":"allow","cidr":"fd00::/8","direction":"ingress"}]}"#,
    )
    .unwrap();
    for i in 0..trellis_ebpf_common::MAX_ACLS {
        dp.set_network_acl(&format!("ns/net-{i}"), Some(&acl))
            .unwrap_or_else(|e| panic!("ACL {i}: {e}"));
    }
    assert_eq!(trellis_ebpf_common::MAX_ACLS, 1024);
    let err = dp
        .set_network_acl("ns/one-too-many", Some(&acl))
        .expect_err("the 1,025th");
    assert_eq!(
        err.to_string(),
        "network ns/one-too-many: all 1024 ACL ids are in use by other networks"
    );
    assert!(dp.acl_of("ns/one-too-many").unwrap().is_none());
    dp.set_network_acl("ns/net-7", None).unwrap();
    dp.set_network_acl("ns/one-too-many", Some(&acl))
        .expect("a freed id is reused");
    // The last one still judges: a probe on it drops what its default denies.
    let probe = dp.probe(&owner("p", "ns/net-1023", "net1")).unwrap();
    let f = frame(
        "192.0.2.9".parse().unwrap(),
        "192.0.2.1".parse().unwrap(),
        trellis_rig::packets::UDP,
        53,
        64,
    );
    assert_eq!(probe.run(DIR_INGRESS, &f, 1).unwrap().0, TCX_DROP);
    let f = frame(
        "10.1.2.3".parse().unwrap(),
        "192.0.2.1".parse().unwrap(),
        trellis_rig::packets::UDP,
        53,
        64,
    );
    assert_eq!(probe.run(DIR_INGRESS, &f, 1).unwrap().0, TCX_NEXT);
    dp.detach(probe.slot).unwrap();
}
