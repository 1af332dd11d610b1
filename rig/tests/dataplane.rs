//! The TCX accounting programs on a real veth between namespaces this test makes:
//! counters equal the packets and bytes sent, survive the loader going away (pins),
//! are read from the pins alone, and detach leaves nothing of that attachment.

use std::path::PathBuf;
use trellis_agent::dataplane::{check_bpffs, read_stats, Dataplane, DataplaneError, Owner};
use trellis_rig::netns::Netns;
use trellis_rig::require_root;

struct BpfDir(PathBuf);

impl Drop for BpfDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Two namespaces joined by a veth, IPv4 only, with static neighbours (so only the
/// packets the test sends cross).
fn pair() -> (Netns, Netns) {
    let a = Netns::new("tra");
    let b = Netns::new("trb");
    a.sh(&format!(
        "ip link add a0 type veth peer name b0 netns {} && ip link set a0 address 02:00:00:00:0a:01",
        b.name
    ));
    b.sh("ip link set b0 address 02:00:00:00:0b:01");
    for (ns, ifname, ip, peer_ip, peer_mac) in [
        (&a, "a0", "10.88.0.1/24", "10.88.0.2", "02:00:00:00:0b:01"),
        (&b, "b0", "10.88.0.2/24", "10.88.0.1", "02:00:00:00:0a:01"),
    ] {
        ns.sh(&format!(
            "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1 && \
             ip addr add {ip} dev {ifname} && ip link set {ifname} up && \
             ip neigh replace {peer_ip} lladdr {peer_mac} dev {ifname} nud permanent"
        ));
    }
    (a, b)
}

fn stats_of(dir: &std::path::Path, slot: u32) -> trellis_agent::dataplane::SlotStats {
    read_stats(dir)
        .unwrap()
        .into_iter()
        .find(|s| s.slot == slot)
        .unwrap_or_else(|| panic!("slot {slot} not in the pins"))
}

#[test]
fn counters_match_the_traffic_and_survive_the_loader() {
    require_root!();
    let dir = BpfDir(PathBuf::from(format!(
        "/sys/fs/bpf/{}",
        trellis_rig::unique("trellis-test")
    )));
    let (a, _b) = pair();
    let owner = Owner {
        namespace: "pods".into(),
        pod: "a".into(),
        network: "pods/net-a".into(),
        ifname: "a0".into(),
        container: "c1".into(),
    };
    let slot = {
        let mut dp = Dataplane::open(&dir.0).expect("load");
        dp.attach(&a.path(), &owner).expect("attach")
    };
    // The loader is gone; the pinned links keep the programs on the interface.
    assert!(a
        .sh("ping -c 5 -i 0.2 -W 2 10.88.0.2")
        .contains("5 received"));
    let s = stats_of(&dir.0, slot);
    assert_eq!(s.owner, owner);
    // ICMP echo of 84 IP bytes + 14 Ethernet = 98 at tc, 5 out and 5 back.
    assert_eq!((s.egress.packets, s.egress.bytes), (5, 490), "{s:?}");
    assert_eq!((s.ingress.packets, s.ingress.bytes), (5, 490), "{s:?}");

    // A new loader re-adopts the pinned maps: counting goes on from where it was.
    let mut dp = Dataplane::open(&dir.0).expect("reload");
    assert!(a
        .sh("ping -c 3 -i 0.2 -W 2 10.88.0.2")
        .contains("3 received"));
    let s = stats_of(&dir.0, slot);
    assert_eq!((s.egress.packets, s.ingress.packets), (8, 8), "{s:?}");

    // A second attachment gets its own slot and counters.
    let (c, _d) = pair();
    let other = Owner {
        pod: "c".into(),
        ..owner.clone()
    };
    let slot2 = dp.attach(&c.path(), &other).expect("attach second");
    assert_ne!(slot, slot2);
    assert!(c
        .sh("ping -c 2 -i 0.2 -W 2 10.88.0.2")
        .contains("2 received"));
    assert_eq!(stats_of(&dir.0, slot2).egress.packets, 2);
    assert_eq!(stats_of(&dir.0, slot).egress.packets, 8);

    // Detach: its link pins and map entries go, the other attachment stays.
    dp.detach(slot).expect("detach");
    let links: Vec<String> = std::fs::read_dir(dir.0.join("links"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links.iter().all(|l| l.starts_with(&format!("{slot2}-"))),
        "{links:?}"
    );
    assert!(read_stats(&dir.0).unwrap().iter().all(|s| s.slot != slot));
    assert!(
        a.sh("ping -c 1 -W 2 10.88.0.2").contains("1 received"),
        "traffic still flows"
    );
    dp.detach(slot2).expect("detach second");
    assert!(read_stats(&dir.0).unwrap().is_empty());
}

#[test]
fn a_dir_not_on_bpffs_is_refused_by_name() {
    require_root!();
    let d = tempfile::tempdir().unwrap();
    let err = check_bpffs(&d.path().join("trellis")).unwrap_err();
    assert!(matches!(err, DataplaneError::NoBpffs { .. }));
    assert!(err.to_string().contains("is not on a bpffs"), "{err}");
    let err = Dataplane::open(&d.path().join("x")).err().unwrap();
    assert!(err.to_string().contains("is not on a bpffs"), "{err}");
}
