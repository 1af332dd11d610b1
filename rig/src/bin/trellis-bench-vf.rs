//! VF placement cost: ADD and DEL of one VF-style attachment (a veth standing in for
//! the VF netdev) by the agent's in-process `sriov` type, against the same netlink
//! steps done by `ip` commands (down, rename, move, rename, MTU, MAC, up, address; and
//! back), interleaved in one run. Root. Prints figures; asserts nothing about speed.
//! `trellis-bench-vf [--rounds N]` (default 300).

use serde_json::json;
use std::process::Command;
use std::time::{Duration, Instant};
use trellis_agent::kinds::sriov::SriovPlugin;
use trellis_delegate::{InProcessPlugins, Invoker, Target};
use trellis_devices::fixture::FixtureSysfs;
use trellis_rig::figures::{ms, percentiles};
use trellis_rig::netns::Netns;

fn stats(v: Vec<f64>) -> (f64, f64) {
    let [p50, p99] = percentiles(v, [0.5, 0.99]);
    (p50, p99)
}

fn ip(args: &str) {
    let out = Command::new("ip")
        .args(args.split_whitespace())
        .output()
        .expect("ip");
    assert!(
        out.status.success(),
        "ip {args}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn main() {
    if !trellis_rig::is_root() {
        eprintln!("trellis-bench-vf needs root (network namespaces)");
        std::process::exit(1);
    }
    let rounds: usize = std::env::args()
        .skip_while(|a| a != "--rounds")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(300);
    let host = Netns::new("trh");
    let pod = Netns::new("trp");
    let (a, b) = (trellis_rig::unique("tva"), trellis_rig::unique("tvb"));
    for n in [&a, &b] {
        host.sh(&format!(
            "ip link add {n} type veth peer name {n}p && ip link set {n}p up"
        ));
    }
    let fx = FixtureSysfs::new();
    fx.add_standin_vf("0000:3b:10.0", &a);
    let state = tempfile::tempdir().unwrap();
    host.enter_this_thread();
    let plugin = SriovPlugin::new(
        fx.root(),
        state.path(),
        Invoker {
            bin_dirs: vec!["/usr/lib/cni".into()],
            timeout: Duration::from_secs(10),
            in_process: None,
            host_process: None,
        },
    )
    .unwrap();
    let netns = pod.path().to_string_lossy().into_owned();
    let conf = json!({"cniVersion": "1.0.0", "type": "sriov", "name": "bench",
                      "deviceID": "0000:3b:10.0", "mtu": 1400, "mac": "02:00:00:00:aa:01"})
    .to_string();
    let target = Target {
        container_id: "bench",
        netns: &netns,
        ifname: "net1",
        args: "",
    };
    let pod_name = pod.name.clone();
    let host_name = host.name.clone();
    let by_ip_add = |dev: &str| {
        ip(&format!("link set dev {dev} down"));
        ip(&format!("link set dev {dev} name tvtmp"));
        ip(&format!("link set dev tvtmp netns {pod_name}"));
        ip(&format!("-n {pod_name} link set dev tvtmp name net2"));
        ip(&format!(
            "-n {pod_name} link set dev net2 mtu 1400 address 02:00:00:00:aa:02"
        ));
        ip(&format!("-n {pod_name} link set dev net2 up"));
    };
    let by_ip_del = |dev: &str, mac: &str| {
        ip(&format!("-n {pod_name} link set dev net2 down"));
        ip(&format!("-n {pod_name} link set dev net2 name tvtmp"));
        ip(&format!(
            "-n {pod_name} link set dev tvtmp netns {host_name}"
        ));
        ip(&format!("link set dev tvtmp name {dev}"));
        ip(&format!("link set dev {dev} mtu 1500 address {mac}"));
    };
    let shown = host.sh(&format!("ip -o link show dev {b}"));
    let b_mac = shown
        .split_whitespace()
        .skip_while(|w| *w != "link/ether")
        .nth(1)
        .expect("MAC of the stand-in")
        .to_string();
    let (mut add_p, mut del_p, mut add_i, mut del_i) = (vec![], vec![], vec![], vec![]);
    for i in 0..rounds {
        for turn in 0..2 {
            if (i + turn) % 2 == 0 {
                let t = Instant::now();
                plugin
                    .exec("sriov", trellis_cni::Command::Add, &target, conf.as_bytes())
                    .expect("plugin ADD");
                add_p.push(ms(t.elapsed()));
                let t = Instant::now();
                plugin
                    .exec("sriov", trellis_cni::Command::Del, &target, conf.as_bytes())
                    .expect("plugin DEL");
                del_p.push(ms(t.elapsed()));
            } else {
                let t = Instant::now();
                by_ip_add(&b);
                add_i.push(ms(t.elapsed()));
                let t = Instant::now();
                by_ip_del(&b, &b_mac);
                del_i.push(ms(t.elapsed()));
            }
        }
    }
    let (ap, ai, dp, di) = (stats(add_p), stats(add_i), stats(del_p), stats(del_i));
    println!(
        "trellis VF placement bench: {rounds} ADD/DEL rounds each, veth stand-in, interleaved"
    );
    println!(
        "{:<26}{:>10}{:>10}{:>10}{:>10}",
        "latency (ms)", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    println!(
        "{:<26}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
        "ip commands", ai.0, ai.1, di.0, di.1
    );
    println!(
        "{:<26}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
        "trellis sriov (netlink)", ap.0, ap.1, dp.0, dp.1
    );
    println!(
        "{:<26}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
        "ratio trellis/ip",
        ap.0 / ai.0,
        ap.1 / ai.1,
        dp.0 / di.0,
        dp.1 / di.1
    );
}
