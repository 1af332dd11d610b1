//! The accounting programs on a real veth between namespaces this test makes:
//! counters equal the packets and bytes sent, survive the loader going away (pins
//! and filters), are read from the pins alone, and detach leaves nothing of that
//! attachment.

use trellis_agent::dataplane::{check_bpffs, read_stats, Dataplane, DataplaneError, Owner};
use trellis_rig::netns::Netns;
use trellis_rig::require_root;
use trellis_rig::traffic::{slot_stats, veth_pair};
use trellis_rig::BpfDir;

/// Pod a's attachment on a0.
fn owner_a() -> Owner {
    Owner {
        namespace: "pods".into(),
        pod: "a".into(),
        network: "pods/net-a".into(),
        ifname: "a0".into(),
        container: "c1".into(),
    }
}

#[test]
fn counters_match_the_traffic_and_survive_the_loader() {
    require_root!();
    let dir = BpfDir::new("trellis-test");
    let (a, _b) = veth_pair("tra", ["a0", "b0"], "10.88.0", None);
    let owner = owner_a();
    let slot = {
        let mut dp = Dataplane::open(&dir.0).expect("load");
        dp.attach(&a.path(), &owner).expect("attach")
    };
    // The loader is gone; the filters and pinned maps keep the programs running.
    assert!(a
        .sh("ping -c 5 -i 0.2 -W 2 10.88.0.2")
        .contains("5 received"));
    let s = slot_stats(&dir.0, slot);
    assert_eq!(s.owner, owner);
    // ICMP echo of 84 IP bytes + 14 Ethernet = 98 at tc, 5 out and 5 back.
    assert_eq!((s.egress.packets, s.egress.bytes), (5, 490), "{s:?}");
    assert_eq!((s.ingress.packets, s.ingress.bytes), (5, 490), "{s:?}");

    // A new loader re-adopts the pinned maps: counting goes on from where it was.
    let mut dp = Dataplane::open(&dir.0).expect("reload");
    assert!(a
        .sh("ping -c 3 -i 0.2 -W 2 10.88.0.2")
        .contains("3 received"));
    let s = slot_stats(&dir.0, slot);
    assert_eq!((s.egress.packets, s.ingress.packets), (8, 8), "{s:?}");

    // A second attachment gets its own slot and counters.
    let (c, _d) = veth_pair("tra", ["a0", "b0"], "10.88.0", None);
    let other = Owner {
        pod: "c".into(),
        ..owner.clone()
    };
    let slot2 = dp.attach(&c.path(), &other).expect("attach second");
    assert_ne!(slot, slot2);
    assert!(c
        .sh("ping -c 2 -i 0.2 -W 2 10.88.0.2")
        .contains("2 received"));
    assert_eq!(slot_stats(&dir.0, slot2).egress.packets, 2);
    assert_eq!(slot_stats(&dir.0, slot).egress.packets, 8);

    // Detach: its filters, the clsact qdisc it added and its map entries go, the
    // other attachment stays.
    assert!(a
        .sh("tc filter show dev a0 ingress")
        .contains(&format!("trellis-{slot}")));
    dp.detach(slot).expect("detach");
    assert_eq!(trellis_rig::bpf::live_hooks(&dir.0), 2);
    assert_eq!(a.sh("tc filter show dev a0 ingress").trim(), "");
    assert_eq!(a.sh("tc filter show dev a0 egress").trim(), "");
    assert!(!a.sh("tc qdisc show dev a0").contains("clsact"));
    assert!(c
        .sh("tc filter show dev a0 egress")
        .contains(&format!("trellis-{slot2}")));
    assert!(read_stats(&dir.0).unwrap().iter().all(|s| s.slot != slot));
    assert!(
        a.sh("ping -c 1 -W 2 10.88.0.2").contains("1 received"),
        "traffic still flows"
    );
    dp.detach(slot2).expect("detach second");
    assert!(read_stats(&dir.0).unwrap().is_empty());
    assert_eq!(trellis_rig::bpf::live_hooks(&dir.0), 0);
}

/// A clsact qdisc that was there before (with someone else's filter) is kept, with
/// that filter, when the attachment goes; a filter that could not be removed (its
/// netns unreachable) counts nothing once its slot is freed.
#[test]
fn other_filters_are_kept_and_a_stray_filter_is_inert() {
    require_root!();
    let dir = BpfDir::new("trellis-test");
    let (a, _b) = veth_pair("tro", ["a0", "b0"], "10.88.1", None);
    a.sh("tc qdisc add dev a0 clsact && tc filter add dev a0 ingress pref 9 u32 match u32 0 0 classid 1:1");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let slot = dp.attach(&a.path(), &owner_a()).expect("attach");
    assert!(a
        .sh("ping -c 2 -i 0.2 -W 2 10.88.1.2")
        .contains("2 received"));
    assert_eq!(slot_stats(&dir.0, slot).egress.packets, 2);
    dp.detach(slot).expect("detach");
    assert!(a.sh("tc qdisc show dev a0").contains("clsact"));
    let left = a.sh("tc filter show dev a0 ingress");
    assert!(left.contains("u32") && !left.contains("trellis"), "{left}");

    // Attached again, then its filter's netns path made unreachable for the agent:
    // the detach cannot remove the filter, but the slot moves to a new generation.
    let alias = a.path().with_extension("alias");
    std::fs::write(&alias, "").unwrap();
    let mount = |args: &[&std::ffi::OsStr]| {
        assert!(std::process::Command::new(args[0])
            .args(&args[1..])
            .status()
            .unwrap()
            .success())
    };
    mount(&[
        "mount".as_ref(),
        "--bind".as_ref(),
        a.path().as_os_str(),
        alias.as_os_str(),
    ]);
    let slot = dp.attach(&alias, &owner_a()).expect("attach again");
    mount(&["umount".as_ref(), alias.as_os_str()]);
    std::fs::remove_file(&alias).unwrap();
    dp.detach(slot).expect("detach without its netns");
    assert!(a
        .sh("tc filter show dev a0 egress")
        .contains(&format!("trellis-{slot}")));
    assert_eq!(trellis_rig::bpf::live_hooks(&dir.0), 0);
    // A new attachment elsewhere gets another slot; the stray filter counts nothing.
    let (c, _d) = veth_pair("tro", ["a0", "b0"], "10.88.1", None);
    let slot2 = dp
        .attach(
            &c.path(),
            &Owner {
                pod: "c".into(),
                ..owner_a()
            },
        )
        .expect("attach c");
    assert_ne!(
        slot2, slot,
        "a freed slot number is not handed out again at once"
    );
    assert!(a
        .sh("ping -c 2 -i 0.2 -W 2 10.88.1.2")
        .contains("2 received"));
    assert_eq!(slot_stats(&dir.0, slot2).egress.packets, 0);
    dp.detach(slot2).expect("detach c");
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

/// (rx bytes, tx bytes, rx packets, tx packets) as the kernel counts them.
fn kernel_bytes(ns: &Netns, ifname: &str) -> [u64; 4] {
    let v: serde_json::Value =
        serde_json::from_str(&ns.sh(&format!("ip -j -s link show dev {ifname}"))).unwrap();
    let s = &v[0]["stats64"];
    let n = |d: &str, k: &str| s[d][k].as_u64().unwrap();
    [
        n("rx", "bytes"),
        n("tx", "bytes"),
        n("rx", "packets"),
        n("tx", "packets"),
    ]
}

#[test]
fn a_tcp_transfer_of_known_size_is_counted_as_the_kernel_counts_it() {
    require_root!();
    let dir = BpfDir::new("trellis-test");
    let (a, b) = veth_pair("tra", ["a0", "b0"], "10.88.0", None);
    let owner = owner_a();
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let slot = dp.attach(&a.path(), &owner).expect("attach");
    const SIZE: usize = 4 << 20;
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let b_path = b.path();
    let server = std::thread::spawn(move || {
        Netns::at(b_path).enter_this_thread();
        let l = std::net::TcpListener::bind("10.88.0.2:7001").unwrap();
        ready_tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        let mut got = Vec::new();
        std::io::Read::read_to_end(&mut c, &mut got).unwrap();
        got.len()
    });
    ready_rx.recv().unwrap();
    let (k0, s0) = (kernel_bytes(&a, "a0"), slot_stats(&dir.0, slot));
    let a_path = a.path();
    std::thread::spawn(move || {
        Netns::at(a_path).enter_this_thread();
        let mut c = std::net::TcpStream::connect("10.88.0.2:7001").unwrap();
        std::io::Write::write_all(&mut c, &vec![0x5a; SIZE]).unwrap();
    })
    .join()
    .unwrap();
    assert_eq!(server.join().unwrap(), SIZE);
    let (k1, s1) = (kernel_bytes(&a, "a0"), slot_stats(&dir.0, slot));
    let ours = [
        s1.ingress.bytes - s0.ingress.bytes,
        s1.egress.bytes - s0.egress.bytes,
        s1.ingress.packets - s0.ingress.packets,
        s1.egress.packets - s0.egress.packets,
    ];
    let kernel: Vec<u64> = (0..4).map(|i| k1[i] - k0[i]).collect();
    assert_eq!(
        ours.to_vec(),
        kernel,
        "(rx, tx bytes, rx, tx packets): trellis vs the kernel"
    );
    // The 4 MiB and every header went out; what came back is ACKs and the handshake.
    assert!(
        ours[1] > SIZE as u64 && ours[1] < SIZE as u64 * 11 / 10,
        "{ours:?}"
    );
    dp.detach(slot).unwrap();
}
