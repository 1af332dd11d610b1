//! Traffic and counters for the dataplane tests and bench: a veth between two
//! namespaces, datagrams between them, the kernel's interface counters, and
//! `trellis stats` as JSON.

use crate::netns::Netns;
use serde_json::Value;
use std::net::SocketAddr;
use std::path::Path;

/// Two namespaces joined by a veth (`ifnames` on the two sides), with `<v4>.1/24` and
/// `<v4>.2/24` and static IPv4 neighbours, so only the packets a test sends cross. With
/// `v6` (a /64 prefix such as `fd00:88::`) also `<v6>1/64` and `<v6>2/64` without DAD,
/// their neighbours found by ND; without it IPv6 is off.
pub fn veth_pair(prefix: &str, ifnames: [&str; 2], v4: &str, v6: Option<&str>) -> (Netns, Netns) {
    let ns = [Netns::new(prefix), Netns::new(prefix)];
    let mac = |i: usize| format!("02:00:00:00:00:{:02x}", i + 1);
    ns[0].sh(&format!(
        "ip link add {} type veth peer name {} netns {}",
        ifnames[0], ifnames[1], ns[1].name
    ));
    for i in 0..2 {
        let (ifname, peer) = (ifnames[i], 1 - i);
        let ipv6 = match v6 {
            Some(p) => format!(
                "sysctl -qw net.ipv6.conf.all.accept_dad=0 net.ipv6.conf.default.accept_dad=0 && \
                 ip addr add {p}{}/64 dev {ifname} nodad",
                i + 1
            ),
            None => {
                "sysctl -qw net.ipv6.conf.all.disable_ipv6=1 net.ipv6.conf.default.disable_ipv6=1"
                    .to_string()
            }
        };
        ns[i].sh(&format!(
            "ip link set {ifname} address {} && {ipv6} && \
             ip addr add {v4}.{}/24 dev {ifname} && ip link set {ifname} up && ip link set lo up && \
             ip neigh replace {v4}.{} lladdr {} dev {ifname} nud permanent",
            mac(i),
            i + 1,
            peer + 1,
            mac(peer)
        ));
    }
    let [a, b] = ns;
    (a, b)
}

/// Sends `count` UDP datagrams from a socket in `from` to `to`, and counts what a
/// receiver bound to `to` in `to_ns` gets (waiting for a second of quiet once the
/// sender is done, however late it started).
pub fn udp(from: &Netns, to_ns: &Netns, to: SocketAddr, count: usize) -> usize {
    udp_sized(from, to_ns, to, count, 7)
}

/// As `udp`, with datagrams of `size` bytes (above the MTU they go as fragments).
pub fn udp_sized(from: &Netns, to_ns: &Netns, to: SocketAddr, count: usize, size: usize) -> usize {
    let from_path = from.path();
    received_while(to_ns, to, || {
        std::thread::spawn(move || {
            Netns::at(from_path).enter_this_thread();
            let any: SocketAddr = if to.is_ipv4() {
                "0.0.0.0:0".parse().unwrap()
            } else {
                "[::]:0".parse().unwrap()
            };
            let s = std::net::UdpSocket::bind(any).unwrap();
            let payload = vec![b't'; size];
            for _ in 0..count {
                // A denied datagram is dropped after the send returns.
                s.send_to(&payload, to).expect("send");
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
        })
        .join()
        .unwrap();
    })
}

/// Counts the datagrams a receiver bound to `addr` in `ns` gets while `send` runs,
/// and until a second of quiet after it (however late the sender starts; 60 s at
/// most).
pub fn received_while(ns: &Netns, addr: SocketAddr, send: impl FnOnce()) -> usize {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::{Duration, Instant};
    const TICK: Duration = Duration::from_millis(100);
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let sent = std::sync::Arc::new(AtomicBool::new(false));
    let done = sent.clone();
    let path = ns.path();
    let rx = std::thread::spawn(move || {
        Netns::at(path).enter_this_thread();
        let s = std::net::UdpSocket::bind(addr).expect("bind receiver");
        s.set_read_timeout(Some(TICK)).unwrap();
        ready_tx.send(()).unwrap();
        let mut buf = vec![0u8; 65536];
        let (mut n, mut quiet) = (0, Duration::ZERO);
        let started = Instant::now();
        while quiet < Duration::from_secs(1) && started.elapsed() < Duration::from_secs(60) {
            match s.recv(&mut buf) {
                Ok(_) => n += 1,
                Err(_) if done.load(Ordering::Acquire) => quiet += TICK,
                Err(_) => {}
            }
        }
        n
    });
    ready_rx.recv().unwrap();
    send();
    sent.store(true, Ordering::Release);
    rx.join().unwrap()
}

/// (rx packets, tx packets) as the kernel counts them on `ifname` in `ns`.
pub fn kernel_counts(ns: &Netns, ifname: &str) -> (u64, u64) {
    let v: Value =
        serde_json::from_str(&ns.sh(&format!("ip -j -s link show dev {ifname}"))).unwrap();
    let s = &v[0]["stats64"];
    (
        s["rx"]["packets"].as_u64().unwrap(),
        s["tx"]["packets"].as_u64().unwrap(),
    )
}

/// `trellis stats --json <filter> --bpffs-dir <dir>`: one entry per interface.
pub fn trellis_stats(dir: &Path, filter: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new(crate::bins::trellis())
        .arg("stats")
        .arg("--json")
        .args(filter)
        .arg("--bpffs-dir")
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// The entry of `ifname` (on `network`, if given) in `trellis_stats` output.
pub fn interface<'a>(stats: &'a [Value], network: Option<&str>, ifname: &str) -> &'a Value {
    stats
        .iter()
        .find(|s| {
            s["owner"]["ifname"] == ifname && network.is_none_or(|n| s["owner"]["network"] == n)
        })
        .unwrap_or_else(|| panic!("no {ifname} ({network:?}) in {stats:?}"))
}

/// A counter of a `trellis_stats` entry: `dir` ingress/egress, `what` packets/bytes/drops.
pub fn counter(entry: &Value, dir: &str, what: &str) -> u64 {
    entry[dir][what].as_u64().unwrap()
}

/// The counters of `slot`, read from the pins in `dir`.
pub fn slot_stats(dir: &Path, slot: u32) -> trellis_agent::dataplane::SlotStats {
    trellis_agent::dataplane::read_stats(dir)
        .unwrap()
        .into_iter()
        .find(|s| s.slot == slot)
        .unwrap_or_else(|| panic!("slot {slot} not in the pins"))
}

/// One iperf3 run's outcome, as the receiving side measured it.
#[derive(Debug, Clone, Copy)]
pub struct Iperf {
    /// Bits per second received.
    pub bps: f64,
    /// UDP: datagrams lost (sent but not received).
    pub lost: u64,
}

/// Runs iperf3 between `client` and a one-off server in `server` listening on
/// `addr` for `secs` seconds (the first second left out of the figure):
/// `reverse`, the server sends; `udp`, UDP datagrams of 1,400 bytes offered at
/// that many bits per second (else TCP).
pub fn iperf3(
    server: &Netns,
    client: &Netns,
    addr: &str,
    secs: u32,
    udp: Option<u64>,
    reverse: bool,
) -> Iperf {
    static PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(5201);
    let port = PORT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut srv = server
        .command("iperf3")
        .args(["-s", "-1", "-B", addr, "-p", &port.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("iperf3 server");
    let mut args = vec![
        "-c".to_string(),
        addr.into(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        (secs + 1).to_string(),
        "-O".into(),
        "1".into(),
        "-J".into(),
    ];
    if let Some(rate) = udp {
        args.extend(["-u", "-b", &rate.to_string(), "-l", "1400"].map(String::from));
    }
    if reverse {
        args.push("-R".into());
    }
    // Until the server listens.
    let listening = format!(":{port} ");
    for _ in 0..100 {
        if server.sh("ss -ltnH").contains(&listening) {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let out = client
        .command("iperf3")
        .args(&args)
        .output()
        .expect("iperf3");
    let _ = srv.kill();
    let _ = srv.wait();
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    if let Some(e) = v["error"].as_str() {
        panic!("iperf3 {args:?}: {e}");
    }
    let end = &v["end"];
    if udp.is_some() {
        // The receiver's view: what arrived over the test's duration.
        let s = &end["sum"];
        let sent = s["packets"].as_u64().unwrap_or(0);
        let lost = s["lost_packets"].as_u64().unwrap_or(0);
        let secs = s["seconds"].as_f64().unwrap_or(1.0);
        Iperf {
            bps: (sent - lost) as f64 * 1400.0 * 8.0 / secs,
            lost,
        }
    } else {
        Iperf {
            bps: end["sum_received"]["bits_per_second"]
                .as_f64()
                .unwrap_or(0.0),
            lost: 0,
        }
    }
}

/// Bytes `ifname` in `ns` has sent (`dir` "tx") or received ("rx"), as the kernel
/// counts them: whole frames, what a bandwidth limit counts.
pub fn link_bytes(ns: &Netns, ifname: &str, dir: &str) -> u64 {
    let v: Value =
        serde_json::from_str(&ns.sh(&format!("ip -j -s link show dev {ifname}"))).unwrap();
    v[0]["stats64"][dir]["bytes"].as_u64().unwrap()
}

/// CPU time the whole machine has spent busy (all CPUs, seconds), from /proc/stat.
pub fn machine_busy_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let f: Vec<u64> = stat
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal...: all but idle and iowait.
    let busy: u64 = f
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    busy as f64 / hz
}

/// One measured window of an iperf3 run.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Frame bits per second past the limiter.
    pub bps: f64,
    /// Machine CPU seconds per second of the window.
    pub cpu: f64,
}

/// Runs iperf3 from `client` to `server` (at `addr`; `reverse`: the server sends;
/// `udp`: offered at that many bits per second) and reads, over `secs` seconds once
/// it runs, the frame bytes `at` (a device in a namespace, "tx" or "rx") passes
/// and the machine's CPU time.
pub fn iperf3_window(
    server: &Netns,
    client: &Netns,
    addr: &str,
    udp: Option<u64>,
    reverse: bool,
    at: (&Netns, &str, &str),
    secs: u32,
) -> Window {
    std::thread::scope(|s| {
        let run = s.spawn(|| iperf3(server, client, addr, secs + 1, udp, reverse));
        std::thread::sleep(std::time::Duration::from_millis(1500));
        // Each read spawns `ip` in the namespace, which a loaded machine can take
        // 100 ms to do: the counter is stamped halfway through its read.
        let read = || {
            let before = std::time::Instant::now();
            let (b, c) = (link_bytes(at.0, at.1, at.2), machine_busy_secs());
            (b, c, before + before.elapsed() / 2)
        };
        let (b0, c0, t0) = read();
        std::thread::sleep(std::time::Duration::from_secs(secs as u64));
        let (b1, c1, t1) = read();
        run.join().unwrap();
        let dt = (t1 - t0).as_secs_f64();
        Window {
            bps: (b1 - b0) as f64 * 8.0 / dt,
            cpu: (c1 - c0) / dt,
        }
    })
}
