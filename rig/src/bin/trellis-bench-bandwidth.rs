//! Bandwidth limits, every figure side by side in one run (rounds interleaved,
//! medians), between a pod netns and a host netns joined by a veth, as a bridge or
//! ptp delegate leaves them (the bench runs in that host netns, as the agent does):
//! 1. accuracy of the default configuration (what the pod receives queued by an HTB
//!    on the host side of its veth, or through an ifb where there is no host side,
//!    as for macvlan and VFs; what it sends shaped by an HTB on the pod interface),
//!    with a macvlan pod for the ifb: the wire frame rate past the limiter over
//!    the limit at 10, 100 and 1,000 Mbit/s, both directions, TCP and UDP (offered at
//!    1.5x the limit); and TCP through `ingress_limit = "police"` (dropped above the
//!    rate) for comparison;
//! 2. CPU per Gbit/s: the machine's CPU time while TCP runs at a 1,000 Mbit/s limit
//!    each way, trellis (default, and police) against the reference `bandwidth`
//!    plugin (TBF on the host side of the veth; an ifb with a TBF for the pod's
//!    egress), and with no limit at all.
//!
//! Root. Prints figures; asserts nothing about speed.
//! `trellis-bench-bandwidth [--rounds N] [--seconds S]`

use serde_json::json;
use trellis_agent::bandwidth::{IngressLimit, Limits, Rate};
use trellis_agent::dataplane::{Dataplane, Owner};
use trellis_rig::figures::{arg, median};
use trellis_rig::netns::Netns;
use trellis_rig::traffic::{iperf3_window, Window};
use trellis_rig::BpfDir;

fn rate(mbit: u64) -> Rate {
    Rate {
        rate: mbit * 1_000_000,
        burst: (mbit * 10_000).max(64 * 1024 * 8),
    }
}

fn owner() -> Owner {
    Owner {
        namespace: "bench".into(),
        pod: "p".into(),
        network: "bench/bw".into(),
        ifname: "p0".into(),
        container: "bench".into(),
    }
}

/// How the pod's limits are kept in one setup.
#[derive(Clone, Copy, PartialEq)]
enum Setup {
    /// No limit.
    None,
    /// trellis, ingress queued (the default) or policed.
    Trellis(IngressLimit),
    /// The reference bandwidth plugin.
    Reference,
}

impl Setup {
    fn name(self) -> &'static str {
        match self {
            Setup::None => "no limit",
            Setup::Trellis(IngressLimit::Queue) => "trellis (default: host-htb in, htb out)",
            Setup::Trellis(IngressLimit::Police) => "trellis, ingress_limit = police",
            Setup::Reference => "reference bandwidth plugin (tbf, ifb+tbf)",
        }
    }
}

/// A pod (p0, 10.91.0.1) joined to `host` (h0, 10.91.0.2) by a veth, or with
/// `macvlan` a pod whose p0 is a macvlan of h0 (the host reaches it through its own
/// macvlan, hm, 10.91.0.2), with `setup` keeping `mbit` each way on the pod.
fn pair(
    dp: &mut Dataplane,
    host: &Netns,
    setup: Setup,
    mbit: u64,
    macvlan: bool,
) -> (Netns, Option<u32>) {
    let pod = Netns::new("trbp");
    let (peer, ip) = if macvlan {
        ("hm", "10.91.0.2/24")
    } else {
        ("h0", "10.91.0.2/24")
    };
    if macvlan {
        host.sh(&format!(
            "ip link add h0 type veth peer name h0p && ip link set h0 up && ip link set h0p up && \
             ip link add hm link h0 type macvlan mode bridge && \
             ip link add p0 link h0 type macvlan mode bridge && ip link set p0 netns {}",
            pod.name
        ));
    } else {
        host.sh(&format!(
            "ip link add h0 type veth peer name p0 netns {}",
            pod.name
        ));
    }
    host.sh(&format!(
        "ip addr add {ip} dev {peer} && ip link set {peer} up"
    ));
    pod.sh("ip addr add 10.91.0.1/24 dev p0 && ip link set p0 up && ip link set lo up");
    let r = rate(mbit);
    let slot = match setup {
        Setup::None => None,
        Setup::Trellis(how) => {
            dp.set_ingress_limit(how);
            let limits = Limits {
                ingress: Some(r),
                egress: Some(r),
            };
            Some(
                dp.attach_limited(&pod.path(), &owner(), &limits)
                    .expect("attach"),
            )
        }
        Setup::Reference => {
            let conf = json!({
                "cniVersion": "1.0.0", "name": "bench-bw", "type": "bandwidth",
                "runtimeConfig": {"bandwidth": {
                    "ingressRate": r.rate, "ingressBurst": r.burst,
                    "egressRate": r.rate, "egressBurst": r.burst}},
                "prevResult": {"cniVersion": "1.0.0", "interfaces": [
                    {"name": "h0"},
                    {"name": "p0", "sandbox": pod.path()}], "ips": []}
            });
            let mut child = host
                .command("/usr/lib/cni/bandwidth")
                .env("CNI_COMMAND", "ADD")
                .env("CNI_CONTAINERID", "bench")
                .env("CNI_NETNS", pod.path())
                .env("CNI_IFNAME", "p0")
                .env("CNI_PATH", "/usr/lib/cni")
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("bandwidth plugin");
            use std::io::Write;
            child
                .stdin
                .take()
                .unwrap()
                .write_all(conf.to_string().as_bytes())
                .unwrap();
            let out = child.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "bandwidth plugin: {}",
                String::from_utf8_lossy(&out.stdout)
            );
            None
        }
    };
    (pod, slot)
}

/// One iperf3 window through `setup` at `mbit`: `reverse`, the host sends (the
/// pod's ingress). Read where the limiter has let the frames go: the host's side
/// for what the pod sends; for what it receives, its ifb (macvlan with the trellis
/// queue), else p0. A TCP figure is scaled to whole wire frames: a device counts a
/// GSO packet's headers once, a limit once per segment (1,514-byte frames of
/// 1,448 payload bytes).
#[allow(clippy::too_many_arguments)]
fn run(
    dp: &mut Dataplane,
    host: &Netns,
    setup: Setup,
    mbit: u64,
    udp: bool,
    reverse: bool,
    secs: u32,
    macvlan: bool,
) -> Window {
    let (pod, slot) = pair(dp, host, setup, mbit, macvlan);
    let ifb = slot.map(trellis_agent::dataplane::ifb_name);
    let at = match (reverse, macvlan, &ifb) {
        (false, false, _) => (host, "h0", "rx"),
        (false, true, _) => (host, "hm", "rx"),
        (true, true, Some(ifb)) if setup == Setup::Trellis(IngressLimit::Queue) => {
            (&pod, ifb.as_str(), "tx")
        }
        (true, _, _) => (&pod, "p0", "rx"),
    };
    let offer = udp.then_some(mbit * 1_500_000);
    let mut w = iperf3_window(host, &pod, "10.91.0.2", offer, reverse, at, secs);
    if !udp {
        w.bps *= 1514.0 / 1448.0;
    }
    if let Some(slot) = slot {
        dp.detach(slot).expect("detach");
    }
    drop(pod);
    // The veth, and the reference plugin's ifb (in the host netns, named by the
    // container ID it was given).
    let _ = host.try_sh(
        "ip link del h0 2>/dev/null; for l in $(ip -o link show type ifb | cut -d: -f2 | cut -d@ -f1); do ip link del $l; done",
    );
    w
}

fn main() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("trellis-bench-bandwidth: needs root");
        std::process::exit(1);
    }
    let rounds: usize = arg("--rounds").unwrap_or(3);
    let secs: u32 = arg("--seconds").unwrap_or(3);
    let dir = BpfDir::new("trellis-bench-bw");
    // The bench lives in the host netns of its pods, as the agent does.
    let host = Netns::new("trbh");
    host.enter_this_thread();
    host.sh("ip link set lo up");
    let mut dp = Dataplane::open(&dir.0).expect("load");
    let queue = Setup::Trellis(IngressLimit::Queue);
    let police = Setup::Trellis(IngressLimit::Police);

    println!("## Accuracy: frame rate past the limiter / the limit (median of {rounds}, {secs} s windows)");
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9}",
        "pod, setup, limit", "TCP out", "TCP in", "UDP out", "UDP in"
    );
    let cases = [(false, false), (false, true), (true, false), (true, true)];
    for mbit in [10u64, 100, 1000] {
        for macvlan in [false, true] {
            let mut got = vec![Vec::new(); 4];
            let mut policed_in = Vec::new();
            let of = |w: Window| w.bps / (mbit as f64 * 1e6);
            for _ in 0..rounds {
                for (i, (udp, reverse)) in cases.into_iter().enumerate() {
                    got[i].push(of(run(
                        &mut dp, &host, queue, mbit, udp, reverse, secs, macvlan,
                    )));
                }
                policed_in.push(of(run(
                    &mut dp, &host, police, mbit, false, true, secs, macvlan,
                )));
            }
            let kind = if macvlan { "macvlan" } else { "veth" };
            let m: Vec<String> = got.iter().map(|v| format!("{:.3}", median(v))).collect();
            println!(
                "{:<40} {:>9} {:>9} {:>9} {:>9}",
                format!("{kind}, trellis default, {mbit} Mbit/s"),
                m[0],
                m[1],
                m[2],
                m[3]
            );
            println!(
                "{:<40} {:>9} {:>9.3} {:>9} {:>9}",
                format!("{kind}, trellis police, {mbit} Mbit/s"),
                "-",
                median(&policed_in),
                "-",
                "-"
            );
        }
    }

    println!();
    println!("## CPU per Gbit/s: TCP at a 1,000 Mbit/s limit, veth pod (machine CPU-seconds per Gbit moved; median of {rounds})");
    println!(
        "{:<44} {:>10} {:>10} {:>10} {:>10}",
        "setup", "out Gbit/s", "out CPU/Gb", "in Gbit/s", "in CPU/Gb"
    );
    let setups = [Setup::None, queue, police, Setup::Reference];
    let mut figures: Vec<[Vec<f64>; 4]> = vec![Default::default(); setups.len()];
    for _ in 0..rounds {
        for (i, s) in setups.into_iter().enumerate() {
            for (j, reverse) in [false, true].into_iter().enumerate() {
                let w = run(&mut dp, &host, s, 1000, false, reverse, secs, false);
                figures[i][2 * j].push(w.bps / 1e9);
                figures[i][2 * j + 1].push(w.cpu / (w.bps / 1e9));
            }
        }
    }
    for (i, s) in setups.into_iter().enumerate() {
        let f = &figures[i];
        println!(
            "{:<44} {:>10.3} {:>10.3} {:>10.3} {:>10.3}",
            s.name(),
            median(&f[0]),
            median(&f[1]),
            median(&f[2]),
            median(&f[3])
        );
    }
    let per_gbit = |i: usize, k: usize| median(&figures[i][k]);
    println!(
        "ratio trellis default / reference, CPU per Gbit: out {:.2}, in {:.2}",
        per_gbit(1, 1) / per_gbit(3, 1),
        per_gbit(1, 3) / per_gbit(3, 3)
    );
}
