//! Dataplane cost, every figure side by side in one run (rounds interleaved, medians):
//! 0. attaching one interface: the agent's attach + detach (a stub and a tc filter per
//!    direction) against two TCX links of an already loaded program (the kernel's
//!    part of the previous design, which also loaded and verified the whole object
//!    per interface), wall time and this process's CPU; then the kernel memory of
//!    1,000 attachments against what the previous design's per-interface copies held;
//! 1. per packet, through BPF_PROG_TEST_RUN: the TCX program with accounting only, and
//!    with an ACL of 0, 100 and 10,000 rules (IPv4, IPv6), against the same parse and
//!    accounting with the rules in a kernel LPM trie;
//! 2. on a veth between two namespaces this bench makes (two pods of one network, so
//!    both ends get the network's programs and rules): TCP single-stream throughput
//!    and 64-byte UDP packets per second with nothing attached, with the programs
//!    (accounting only), and with 1,000 and 10,000 rules as a trellis ACL and as the
//!    same rules in iptables (nft and legacy).
//!
//! Root. Prints figures; asserts nothing about speed.
//! `trellis-bench-dataplane [--rounds N] [--seconds S] [--quick] [--per-packet]
//! [--attach]` (the last two: only that part).

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::{Duration, Instant};
use trellis_agent::acl::Acl;
use trellis_agent::dataplane::{Dataplane, Owner};
use trellis_ebpf_common::{AclRule, ACT_DENY, DIR_INGRESS, TCX_NEXT};
use trellis_rig::figures::{arg, median, ms, percentiles};
use trellis_rig::lpm_baseline::LpmBaseline;
use trellis_rig::netns::Netns;
use trellis_rig::packets::{frame, TCP};
use trellis_rig::traffic::veth_pair;
use trellis_rig::BpfDir;

/// The i-th rule prefix: IPv4 10.a.b.0/24, IPv6 fd00:0:i::/48.
fn prefix(i: u32, v6: bool) -> (IpAddr, u8) {
    if v6 {
        (
            IpAddr::V6(Ipv6Addr::from(0xfd00u128 << 112 | (i as u128) << 80)),
            48,
        )
    } else {
        (IpAddr::V4(Ipv4Addr::from(10u32 << 24 | i << 8)), 24)
    }
}

/// `n` rules, each denying UDP port 53 on its own prefix, default allow.
fn acl_json(n: u32, v6: bool) -> String {
    let rules: Vec<String> = (0..n)
        .map(|i| {
            let (a, l) = prefix(i, v6);
            format!(r#"{{"action":"deny","cidr":"{a}/{l}","protocol":"udp","ports":53}}"#)
        })
        .collect();
    format!(r#"{{"default":"allow","rules":[{}]}}"#, rules.join(","))
}

fn owner(network: &str, ifname: &str) -> Owner {
    Owner {
        namespace: "bench".into(),
        pod: "bench".into(),
        network: network.into(),
        ifname: ifname.into(),
        container: "bench".into(),
    }
}

/// Part 1: ns per packet.
fn per_packet(dp: &mut Dataplane, rounds: usize, repeat: u32) {
    const SIZES: [Option<u32>; 4] = [None, Some(0), Some(100), Some(10_000)];
    struct Case {
        label: String,
        probe: trellis_agent::dataplane::Probe,
        lpm: Option<LpmBaseline>,
        packet: Vec<u8>,
        ours: Vec<f64>,
        direct: Vec<f64>,
        trie: Vec<f64>,
    }
    let mut cases = Vec::new();
    for v6 in [false, true] {
        for n in SIZES {
            let network = format!(
                "bench/{}-{}",
                if v6 { "v6" } else { "v4" },
                n.map_or(-1, |n| n as i64)
            );
            if let Some(n) = n {
                let acl = Acl::parse(&acl_json(n, v6)).expect("bench ACL");
                dp.set_network_acl(&network, Some(&acl)).expect("set ACL");
            }
            let probe = dp.probe(&owner(&network, "net1")).expect("probe");
            // A packet inside the middle prefix whose rule does not match (TCP 80):
            // the whole search, the span's rules, then the default.
            let (p, _) = prefix(n.unwrap_or(0) / 2, v6);
            let remote = match p {
                IpAddr::V4(a) => IpAddr::V4(Ipv4Addr::from(u32::from(a) | 7)),
                IpAddr::V6(a) => IpAddr::V6(Ipv6Addr::from(u128::from(a) | 7)),
            };
            let local: IpAddr = if v6 {
                "2001:db8::1".parse().unwrap()
            } else {
                "192.0.2.1".parse().unwrap()
            };
            let packet = frame(remote, local, TCP, 80, 100);
            let lpm = match n {
                Some(n) if n > 0 => {
                    let mut l = LpmBaseline::load().expect("LPM baseline");
                    for i in 0..n {
                        let (a, len) = prefix(i, v6);
                        l.insert(
                            a,
                            len,
                            AclRule {
                                proto: 17,
                                action: ACT_DENY,
                                port_lo: 53,
                                port_hi: 53,
                                id: i as u16,
                            },
                        )
                        .expect("LPM insert");
                    }
                    Some(l)
                }
                _ => None,
            };
            let label = format!(
                "{} {}",
                if v6 { "IPv6" } else { "IPv4" },
                match n {
                    None => "accounting only".to_string(),
                    Some(n) => format!("ACL {n} rules"),
                }
            );
            cases.push(Case {
                label,
                probe,
                lpm,
                packet,
                ours: vec![],
                direct: vec![],
                trie: vec![],
            });
        }
    }
    // A logical network of four subnets per family, the packet in the last (every
    // subnet compared), and a rate limit the packet is under.
    for v6 in [false, true] {
        let subnets: Vec<String> = (1..=4)
            .map(|i| {
                if v6 {
                    format!("fd00:{i}::/64")
                } else {
                    format!("10.{i}.0.0/16")
                }
            })
            .collect();
        let logical = trellis_agent::logical::Logical {
            physical: "master:bench".into(),
            subnets: subnets
                .iter()
                .map(|s| trellis_agent::logical::Subnet::parse(s).unwrap())
                .collect(),
        };
        let (remote, local): (IpAddr, IpAddr) = if v6 {
            ("fd00:4::7".parse().unwrap(), "fd00:4::1".parse().unwrap())
        } else {
            ("10.4.0.7".parse().unwrap(), "10.4.0.1".parse().unwrap())
        };
        let fam = if v6 { "IPv6" } else { "IPv4" };
        let network = format!("bench/logical-{fam}");
        let probe = dp
            .probe_with(
                &owner(&network, "net1"),
                &Default::default(),
                Some(logical.to_map()),
            )
            .expect("probe");
        cases.push(Case {
            label: format!("{fam} logical network"),
            probe,
            lpm: None,
            packet: frame(remote, local, TCP, 80, 100),
            ours: vec![],
            direct: vec![],
            trie: vec![],
        });
        let unlimited = trellis_agent::bandwidth::Rate {
            rate: 1 << 40,
            burst: 1 << 34,
        };
        let limits = trellis_agent::bandwidth::Limits {
            ingress: Some(unlimited),
            egress: Some(unlimited),
        };
        let network = format!("bench/policed-{fam}");
        let probe = dp
            .probe_policed(&owner(&network, "net1"), &limits)
            .expect("probe");
        cases.push(Case {
            label: format!("{fam} policed limit (under it)"),
            probe,
            lpm: None,
            packet: frame(remote, local, TCP, 80, 100),
            ours: vec![],
            direct: vec![],
            trie: vec![],
        });
    }
    let base = LpmBaseline::load().expect("baseline object");
    let (mut floor, mut counter) = (vec![], vec![]);
    for _ in 0..rounds {
        let pkt = &cases[0].packet;
        floor.push(
            base.run_program("floor", pkt, repeat)
                .expect("floor")
                .1
                .as_nanos() as f64,
        );
        counter.push(
            base.run_program("counter_only", pkt, repeat)
                .expect("counter")
                .1
                .as_nanos() as f64,
        );
        for c in &mut cases {
            let (v, d) = c
                .probe
                .run(DIR_INGRESS, &c.packet, repeat)
                .expect("test run");
            assert_eq!(v, TCX_NEXT, "{}: the bench packet passes", c.label);
            c.ours.push(d.as_nanos() as f64);
            let (_, d) = c.probe.run_probe_only(&c.packet, repeat).expect("test run");
            c.direct.push(d.as_nanos() as f64);
            if let Some(l) = &c.lpm {
                let (v, d) = l.run(&c.packet, repeat).expect("LPM test run");
                assert_eq!(v, TCX_NEXT);
                c.trie.push(d.as_nanos() as f64);
            }
        }
    }
    println!("\nper packet (BPF_PROG_TEST_RUN, {repeat} runs x {rounds} rounds, median ns):");
    println!("  (trellis: through the probe program, which sets the classid a filter would");
    println!("  and tail-calls the program; probe: the probe alone, its tail call finding no");
    println!("  program, the part of each figure a real filter does not pay)");
    println!(
        "  {:<32} {:>10} {:>10} {:>14} {:>8}",
        "", "trellis", "probe", "LPM trie", "ratio"
    );
    println!(
        "  {:<32} {:>10.1}",
        "empty program (the floor)",
        median(&floor)
    );
    println!("  {:<32} {:>10.1}", "one per-CPU counter", median(&counter));
    for c in &cases {
        let (ours, direct) = (median(&c.ours), median(&c.direct));
        if c.trie.is_empty() {
            println!(
                "  {:<32} {:>10.1} {:>10.1} {:>14} {:>8}",
                c.label, ours, direct, "-", "-"
            );
        } else {
            let trie = median(&c.trie);
            println!(
                "  {:<32} {:>10.1} {:>10.1} {:>14.1} {:>8.2}",
                c.label,
                ours,
                direct,
                trie,
                trie / ours
            );
        }
    }
    let (acct, big4, big6) = (
        median(&cases[0].ours),
        median(&cases[3].ours),
        median(&cases[7].ours),
    );
    let acct6 = median(&cases[4].ours);
    println!(
        "  ACL of 10,000 rules above accounting only: IPv4 {:.1} ns, IPv6 {:.1} ns",
        big4 - acct,
        big6 - acct6
    );
    for c in cases {
        dp.detach(c.probe.slot).expect("release probe");
    }
}

fn in_ns<T: Send + 'static>(
    ns: &Netns,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let path = ns.path();
    std::thread::spawn(move || {
        Netns::at(path).enter_this_thread();
        f()
    })
}

/// Bytes per second of one TCP stream pod -> peer for `secs`.
fn tcp_throughput(pod: &Netns, peer: &Netns, secs: f64) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel();
    let server = in_ns(peer, move || {
        let l = std::net::TcpListener::bind("10.99.0.2:5201").expect("bind 5201");
        tx.send(()).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = vec![0u8; 256 * 1024];
        let mut n = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(k) => n += k as u64,
            }
        }
        n
    });
    rx.recv().unwrap();
    let client = in_ns(pod, move || {
        let mut s = std::net::TcpStream::connect("10.99.0.2:5201").expect("connect");
        let buf = vec![0x5au8; 128 * 1024];
        let start = Instant::now();
        while start.elapsed().as_secs_f64() < secs {
            s.write_all(&buf).unwrap();
        }
        drop(s);
        start.elapsed()
    });
    let took = client.join().unwrap();
    let bytes = server.join().unwrap();
    bytes as f64 / took.as_secs_f64()
}

/// 64-byte frames (22-byte UDP payloads) per second received by peer, one sender.
fn udp_pps(pod: &Netns, peer: &Netns, secs: f64) -> f64 {
    let (tx, rx) = std::sync::mpsc::channel();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop_rx = stop.clone();
    let server = in_ns(peer, move || {
        let s = std::net::UdpSocket::bind("10.99.0.2:5202").expect("bind 5202");
        s.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        tx.send(()).unwrap();
        let mut buf = [0u8; 64];
        let mut n = 0u64;
        while !stop_rx.load(std::sync::atomic::Ordering::Relaxed) {
            if s.recv(&mut buf).is_ok() {
                n += 1;
            }
        }
        n
    });
    rx.recv().unwrap();
    let client = in_ns(pod, move || {
        let s = std::net::UdpSocket::bind("10.99.0.1:0").unwrap();
        s.connect("10.99.0.2:5202").unwrap();
        let payload = [0x5au8; 22];
        let start = Instant::now();
        let mut i = 0u32;
        loop {
            let _ = s.send(&payload);
            i = i.wrapping_add(1);
            if i.is_multiple_of(256) && start.elapsed().as_secs_f64() >= secs {
                break;
            }
        }
        start.elapsed()
    });
    let took = client.join().unwrap();
    std::thread::sleep(Duration::from_millis(200));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    server.join().unwrap() as f64 / took.as_secs_f64()
}

/// `n` rules that never match the bench flow: deny TCP port 5000 to/from
/// 172.16.0.0 + i (/32s).
fn rule_addr(i: u32) -> Ipv4Addr {
    Ipv4Addr::from(0xac10_0000u32 + i)
}

/// The rules as iptables rules in the pod's netns: the nftables backend (Debian's
/// default `iptables`) or the legacy x_tables one.
fn iptables_load(pod: &Netns, n: u32, legacy: bool) {
    let mut s = String::from("*filter\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n");
    for i in 0..n {
        s.push_str(&format!(
            "-A INPUT -s {}/32 -p tcp --dport 5000 -j DROP\n",
            rule_addr(i)
        ));
    }
    for i in 0..n {
        s.push_str(&format!(
            "-A OUTPUT -d {}/32 -p tcp --dport 5000 -j DROP\n",
            rule_addr(i)
        ));
    }
    s.push_str("COMMIT\n");
    let f = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(f.path(), s).unwrap();
    let cmd = if legacy {
        "iptables-legacy-restore"
    } else {
        "iptables-restore"
    };
    pod.sh(&format!("{cmd} < {}", f.path().display()));
}

fn veth(dp: &mut Dataplane, rounds: usize, secs: f64) {
    // Two pods of one network: "pod" (10.99.0.1, the sender) and "peer" (10.99.0.2);
    // programs and rules go on both.
    let (pod, peer) = veth_pair("tbp", ["eth1", "eth1"], "10.99.0", None);
    let mut acls = std::collections::BTreeMap::new();
    for n in [1000u32, 10_000] {
        let rules: Vec<String> = (0..n)
            .map(|i| {
                format!(
                    r#"{{"action":"deny","cidr":"{}/32","protocol":"tcp","ports":5000}}"#,
                    rule_addr(i)
                )
            })
            .collect();
        acls.insert(
            n,
            Acl::parse(&format!(
                r#"{{"default":"allow","rules":[{}]}}"#,
                rules.join(",")
            ))
            .unwrap(),
        );
    }
    #[derive(Clone, Copy)]
    enum Setup {
        Bare,
        Trellis(Option<u32>),
        Iptables(u32, bool),
    }
    let setups = [
        ("nothing attached", Setup::Bare),
        ("trellis, accounting only", Setup::Trellis(None)),
        ("trellis ACL, 1,000 rules", Setup::Trellis(Some(1000))),
        ("iptables (nft), 1,000 rules", Setup::Iptables(1000, false)),
        ("iptables-legacy, 1,000 rules", Setup::Iptables(1000, true)),
        ("trellis ACL, 10,000 rules", Setup::Trellis(Some(10_000))),
        (
            "iptables (nft), 10,000 rules",
            Setup::Iptables(10_000, false),
        ),
        (
            "iptables-legacy, 10,000 rules",
            Setup::Iptables(10_000, true),
        ),
    ];
    let mut tcp: Vec<Vec<f64>> = vec![vec![]; setups.len()];
    let mut udp: Vec<Vec<f64>> = vec![vec![]; setups.len()];
    for _ in 0..rounds {
        for (k, (_, setup)) in setups.iter().enumerate() {
            // Both ends are pods of the network: each gets the programs and rules.
            let mut slots = Vec::new();
            match *setup {
                Setup::Bare => {}
                Setup::Trellis(n) => {
                    let network = "bench/veth";
                    dp.set_network_acl(network, n.map(|n| &acls[&n]))
                        .expect("ACL");
                    for ns in [&pod, &peer] {
                        slots.push(
                            dp.attach(&ns.path(), &owner(network, "eth1"))
                                .expect("attach"),
                        );
                    }
                }
                Setup::Iptables(n, legacy) => {
                    for ns in [&pod, &peer] {
                        iptables_load(ns, n, legacy);
                    }
                }
            }
            tcp[k].push(tcp_throughput(&pod, &peer, secs));
            udp[k].push(udp_pps(&pod, &peer, secs));
            for s in slots {
                dp.detach(s).expect("detach");
            }
            if let Setup::Iptables(_, legacy) = setup {
                let cmd = if *legacy {
                    "iptables-legacy"
                } else {
                    "iptables"
                };
                for ns in [&pod, &peer] {
                    ns.sh(&format!("{cmd} -F INPUT && {cmd} -F OUTPUT"));
                }
            }
        }
    }
    let t: Vec<f64> = tcp.iter().map(|v| median(v)).collect();
    let u: Vec<f64> = udp.iter().map(|v| median(v)).collect();
    println!("\nveth between two namespaces ({rounds} rounds x {secs} s per figure, medians):");
    println!(
        "  {:<30} {:>12} {:>8} {:>14} {:>8}",
        "", "TCP Gbit/s", "x bare", "UDP-64 kpps", "x bare"
    );
    for (k, (label, _)) in setups.iter().enumerate() {
        println!(
            "  {:<30} {:>12.2} {:>8.3} {:>14.1} {:>8.3}",
            label,
            t[k] * 8.0 / 1e9,
            t[k] / t[0],
            u[k] / 1e3,
            u[k] / u[0]
        );
    }
    for (rules, ours, nft, legacy) in [("1,000", 2, 3, 4), ("10,000", 5, 6, 7)] {
        println!(
            "  trellis / iptables at {rules} rules: TCP {:.2}x (nft) {:.2}x (legacy), UDP {:.2}x (nft) {:.2}x (legacy)",
            t[ours] / t[nft],
            t[ours] / t[legacy],
            u[ours] / u[nft],
            u[ours] / u[legacy]
        );
    }
}

/// CPU time this process has used (user + system, all threads).
fn cpu_time() -> Duration {
    let u = nix::sys::resource::getrusage(nix::sys::resource::UsageWho::RUSAGE_SELF)
        .expect("getrusage");
    let tv = |t: nix::sys::time::TimeVal| {
        Duration::from_secs(t.tv_sec() as u64) + Duration::from_micros(t.tv_usec() as u64)
    };
    tv(u.user_time()) + tv(u.system_time())
}

/// Part 0: what one interface's attach and detach cost, and 1,000 attachments' kernel
/// memory.
fn attach_cost(dp: &mut Dataplane, rounds: usize, many: usize) {
    use std::os::fd::AsFd;
    let n = rounds * 10;
    // Fresh devices (veths, both ends in one netns) for every measurement (an attach
    // creates the device's hook state, as on a new pod interface), in two netns
    // taken in turn: every attach and detach is the first of its pod's netns, a
    // trip into it included (later interfaces of a pod reuse the socket).
    let make = |count: usize| {
        let ns = Netns::new("tba");
        let batch: String = (0..count)
            .map(|i| format!("link add d{i} type veth peer name e{i}\n"))
            .collect();
        let file = std::env::temp_dir().join(format!("trellis-bench-{}.batch", ns.name));
        std::fs::write(&file, batch).unwrap();
        ns.sh(&format!("ip -batch {}", file.display()));
        let _ = std::fs::remove_file(&file);
        ns
    };
    let (a, b, c) = (make(n), make(n), make(2 * n + many));
    let pass = trellis_rig::bpf::load_pass_program().expect("a pass program");
    let (mut att, mut det, mut both, mut cpu) = (vec![], vec![], vec![], vec![]);
    let (mut tcx, mut tcx_det, mut tcx_both, mut tcx_cpu) = (vec![], vec![], vec![], vec![]);
    for i in 0..n {
        let ifname = format!("d{i}");
        let ours = |dp: &mut Dataplane,
                    att: &mut Vec<f64>,
                    det: &mut Vec<f64>,
                    both: &mut Vec<f64>,
                    cpu: &mut Vec<f64>| {
            let c0 = cpu_time();
            let t0 = Instant::now();
            let sa = dp
                .attach(&a.path(), &owner("bench/attach", &ifname))
                .expect("attach");
            let ta = t0.elapsed();
            let t1 = Instant::now();
            let sb = dp
                .attach(&b.path(), &owner("bench/attach", &ifname))
                .expect("attach");
            let tb = t1.elapsed();
            let t2 = Instant::now();
            dp.detach(sa).expect("detach");
            let da = t2.elapsed();
            let t3 = Instant::now();
            dp.detach(sb).expect("detach");
            let db = t3.elapsed();
            att.extend([ms(ta), ms(tb)]);
            det.extend([ms(da), ms(db)]);
            both.extend([ms(ta + da), ms(tb + db)]);
            cpu.push(ms(cpu_time() - c0) / 2.0);
        };
        let theirs = |tcx: &mut Vec<f64>,
                      tcx_det: &mut Vec<f64>,
                      tcx_both: &mut Vec<f64>,
                      tcx_cpu: &mut Vec<f64>| {
            for k in [2 * i, 2 * i + 1] {
                let pass = pass.as_fd();
                let (x, y, z) = std::thread::scope(|s| {
                    s.spawn(|| {
                        c.enter_this_thread();
                        let index =
                            nix::net::if_::if_nametoindex(format!("d{k}").as_str()).expect("veth");
                        let (c0, t0) = (cpu_time(), Instant::now());
                        let l1 =
                            trellis_rig::bpf::tcx_link(pass, index, trellis_rig::bpf::TCX_INGRESS)
                                .expect("TCX ingress");
                        let l2 =
                            trellis_rig::bpf::tcx_link(pass, index, trellis_rig::bpf::TCX_EGRESS)
                                .expect("TCX egress");
                        let t1 = Instant::now();
                        drop((l1, l2));
                        (ms(t1 - t0), ms(t1.elapsed()), ms(cpu_time() - c0))
                    })
                    .join()
                    .unwrap()
                });
                tcx.push(x);
                tcx_det.push(y);
                tcx_both.push(x + y);
                tcx_cpu.push(z);
            }
        };
        if i % 2 == 0 {
            ours(dp, &mut att, &mut det, &mut both, &mut cpu);
            theirs(&mut tcx, &mut tcx_det, &mut tcx_both, &mut tcx_cpu);
        } else {
            theirs(&mut tcx, &mut tcx_det, &mut tcx_both, &mut tcx_cpu);
            ours(dp, &mut att, &mut det, &mut both, &mut cpu);
        }
    }
    println!(
        "\nattaching one interface ({} each, interleaved; ms, p50 / p99):",
        2 * n
    );
    println!(
        "  {:<40} {:>16} {:>16} {:>16} {:>8}",
        "", "attach", "detach", "attach+detach", "CPU p50"
    );
    for (label, a, d, b, c) in [
        (
            "trellis: a tc filter per direction",
            &att,
            &det,
            &both,
            &cpu,
        ),
        (
            "two TCX links of a loaded program",
            &tcx,
            &tcx_det,
            &tcx_both,
            &tcx_cpu,
        ),
    ] {
        let [a, d, b] = [a, d, b].map(|v| percentiles(v.clone(), [0.5, 0.99]));
        println!(
            "  {:<40} {:>7.3} / {:<7.3} {:>7.3} / {:<7.3} {:>7.3} / {:<7.3} {:>8.3}",
            label,
            a[0],
            a[1],
            d[0],
            d[1],
            b[0],
            b[1],
            median(c)
        );
    }

    // Kernel memory: `many` attachments at once.
    let marker = trellis_rig::bpf::last_prog_id();
    let t0 = Instant::now();
    let slots: Vec<u32> = (0..many)
        .map(|i| {
            dp.attach(
                &c.path(),
                &owner("bench/attach", &format!("d{}", 2 * n + i)),
            )
            .expect("attach")
        })
        .collect();
    let took = t0.elapsed();
    let new_programs: u64 = trellis_rig::bpf::prog_ids_after(marker)
        .into_iter()
        .filter_map(trellis_rig::bpf::prog_memlock)
        .sum();
    let shared: u64 = dp
        .program_memlock()
        .expect("programs' memlock")
        .iter()
        .sum();
    let maps = dp.map_memlock().expect("maps' memlock");
    let t1 = Instant::now();
    for s in &slots {
        dp.detach(*s).expect("detach");
    }
    let detach_took = t1.elapsed();
    let per_interface = dp.program_memlock().expect("programs' memlock");
    let old = per_interface[0] + per_interface[1];
    println!(
        "\n{} attachments: attached in {:.0} ms, detached in {:.0} ms",
        slots.len(),
        ms(took),
        ms(detach_took)
    );
    println!(
        "  BPF program memory (memlock): {:.2} MiB ({} bytes loaded by the attachments themselves), maps {:.1} MiB, both once per node",
        shared as f64 / 1048576.0,
        new_programs,
        maps as f64 / 1048576.0
    );
    println!(
        "  the previous design loaded the programs per interface: {:.1} MiB for {} ({} bytes each)",
        (old * slots.len() as u64) as f64 / 1048576.0,
        slots.len(),
        old
    );
}

fn main() {
    if !trellis_rig::is_root() {
        eprintln!("trellis-bench-dataplane needs root (bpffs, network namespaces)");
        std::process::exit(1);
    }
    let quick = std::env::args().any(|a| a == "--quick");
    let rounds: usize = arg("--rounds").unwrap_or(if quick { 1 } else { 5 });
    let secs: f64 = arg("--seconds").unwrap_or(if quick { 0.3 } else { 2.0 });
    let repeat = if quick { 10_000 } else { 500_000 };
    let dir = BpfDir::new("trellis-bench");
    let mut dp = Dataplane::open(&dir.0).expect("load the programs");
    println!(
        "trellis-bench-dataplane: {} CPUs",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    let only = |a: &str| std::env::args().any(|x| x == a);
    let (attach_only, packet_only) = (only("--attach"), only("--per-packet"));
    if !packet_only {
        attach_cost(&mut dp, rounds.max(3), if quick { 50 } else { 1000 });
    }
    if attach_only {
        return;
    }
    per_packet(&mut dp, rounds.max(3), repeat);
    if !packet_only {
        veth(&mut dp, rounds, secs);
    }
}
