//! What the agent costs: ADD/DEL latency through the real shim and agent for a pod
//! with the cluster network plus two NAD networks, against the same three delegates
//! exec'd directly (as a runtime with no meta-plugin would), interleaved pod by pod in
//! one run; and the agent's RSS idle, with the pods up, and across ADD/DEL cycles.
//!
//! `trellis-bench [--pods N] [--cycles M]` (root). Prints figures; asserts nothing.

use serde_json::{Map, Value};
use std::time::{Duration, Instant};
use trellis_cni::conf::NetConfList;
use trellis_cni::invoke::{Invoker, Target};
use trellis_rig::figures::{ms, percentiles};
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode, REFERENCE_PLUGINS};

struct Args {
    pods: usize,
    cycles: usize,
    /// The agent also attaches the eBPF dataplane (in the background, after ADD).
    dataplane: bool,
}

fn parse_args() -> Args {
    let mut a = Args {
        pods: 200,
        cycles: 1000,
        dataplane: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        if k == "--dataplane" {
            a.dataplane = true;
            continue;
        }
        let v = it.next().and_then(|v| v.parse().ok());
        match (k.as_str(), v) {
            ("--pods", Some(v)) => a.pods = v,
            ("--cycles", Some(v)) => a.cycles = v,
            _ => {
                eprintln!("usage: trellis-bench [--pods N] [--cycles M] [--dataplane]");
                std::process::exit(2);
            }
        }
    }
    a
}

/// The three networks a bench pod gets, as confs a runtime would exec directly.
struct Direct {
    invoker: Invoker,
    nets: Vec<(NetConfList, &'static str)>,
}

impl Direct {
    fn target<'a>(
        container: &'a str,
        netns: &'a str,
        ifname: &'a str,
        args: &'a str,
    ) -> Target<'a> {
        Target {
            container_id: container,
            netns,
            ifname,
            args,
        }
    }

    fn add(&self, container: &str, netns: &str, args: &str) -> Vec<Value> {
        let rc = Map::new();
        self.nets
            .iter()
            .map(|(list, ifname)| {
                self.invoker
                    .add_list(list, &Self::target(container, netns, ifname, args), &rc)
                    .unwrap_or_else(|(_, e)| panic!("direct ADD {}: {e}", list.name))
            })
            .collect()
    }

    fn del(&self, container: &str, netns: &str, args: &str, results: &[Value]) {
        let rc = Map::new();
        for ((list, ifname), result) in self.nets.iter().zip(results).rev() {
            let errs = self.invoker.del_list(
                list,
                &Self::target(container, netns, ifname, args),
                &rc,
                Some(result),
            );
            assert!(errs.is_empty(), "direct DEL {}: {errs:?}", list.name);
        }
    }
}

fn summary(v: Vec<f64>) -> (f64, f64) {
    let [p50, p99] = percentiles(v, [0.5, 0.99]);
    (p50, p99)
}

fn rss_mb(pid: u32) -> f64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() {
    if !trellis_rig::is_root() {
        eprintln!("trellis-bench needs root (network namespaces)");
        std::process::exit(1);
    }
    let args = parse_args();
    let mut node = TestNode::new();
    // /16s: every pod of both paths is up at once.
    let default = node.bridge_conf("cluster", &node.bridge, "10.80.0.0/16");
    node.write_default_network(&default);
    let macvlan = node.macvlan_conf("10.81.0.0/16");
    let br = trellis_rig::unique("trx");
    let bridge = node.bridge_conf("bench-br", &br, "10.82.0.0/16");
    node.add_nad("bench", "mv", &macvlan);
    node.add_nad("bench", "br", &bridge);
    node.dataplane = args.dataplane;
    node.start_agent();
    let agent_pid = node.agent.as_ref().unwrap().pid();
    // The agent runs in the node's namespace; direct delegates must run there too.
    node.host.enter_this_thread();

    let list = |v: &Value, name: &str| NetConfList::from_value(v.clone(), Some(name)).unwrap();
    let direct = Direct {
        invoker: Invoker {
            bin_dirs: vec![REFERENCE_PLUGINS.into()],
            timeout: Duration::from_secs(30),
            in_process: None,
            host_process: None,
        },
        nets: vec![
            (list(&default, "cluster"), "eth0"),
            (list(&macvlan, "mv"), "net1"),
            (list(&bridge, "br"), "net2"),
        ],
    };
    let ann = networks_annotation("mv, br");
    let conf = node.shim_conf(Some(&ann));
    let cni_args = |c: &str| {
        format!("IgnoreUnknown=1;K8S_POD_NAMESPACE=bench;K8S_POD_NAME={c};K8S_POD_INFRA_CONTAINER_ID={c};K8S_POD_UID=uid-{c}")
    };

    let rss_idle = rss_mb(agent_pid);
    // The floor any exec'd shim pays: VERSION never leaves the shim; STATUS is one
    // round trip to the agent.
    let (mut version, mut status) = (vec![], vec![]);
    for _ in 0..200 {
        for (cmd, v) in [("VERSION", &mut version), ("STATUS", &mut status)] {
            let t = Instant::now();
            node.shim(cmd, "x", "", ("bench", "x"), &conf)
                .expect_ok(cmd);
            v.push(ms(t.elapsed()));
        }
    }
    println!(
        "trellis bench: {} pods per path side by side, cluster bridge + 2 NAD networks (macvlan, bridge), host-local IPAM, {} cycles",
        args.pods, args.cycles
    );

    // Warm the page cache and both paths before measuring.
    for i in 0..5 {
        let ns = Netns::new("trw");
        let p = ns.path().to_string_lossy().into_owned();
        let c = format!("warm-a{i}");
        node.shim("ADD", &c, &p, ("bench", &c), &conf)
            .expect_ok("warm ADD");
        node.shim("DEL", &c, &p, ("bench", &c), &conf)
            .expect_ok("warm DEL");
        let c = format!("warm-d{i}");
        let r = direct.add(&c, &p, &cni_args(&c));
        direct.del(&c, &p, &cni_args(&c), &r);
    }

    // Both paths, alternating which goes first, every pod left up until all are made.
    let pods: Vec<(Netns, Netns)> = (0..args.pods)
        .map(|_| (Netns::new("tra"), Netns::new("trd")))
        .collect();
    let (mut add_a, mut add_d, mut del_a, mut del_d) = (vec![], vec![], vec![], vec![]);
    let mut direct_results = Vec::new();
    for (i, (pa, pd)) in pods.iter().enumerate() {
        let (ca, cd) = (format!("a{i}"), format!("d{i}"));
        let (na, nd) = (
            pa.path().to_string_lossy().into_owned(),
            pd.path().to_string_lossy().into_owned(),
        );
        for turn in 0..2 {
            if (i + turn) % 2 == 0 {
                let t = Instant::now();
                node.shim("ADD", &ca, &na, ("bench", &ca), &conf)
                    .expect_ok("ADD");
                add_a.push(ms(t.elapsed()));
            } else {
                let t = Instant::now();
                let r = direct.add(&cd, &nd, &cni_args(&cd));
                add_d.push(ms(t.elapsed()));
                direct_results.push(r);
            }
        }
    }
    let rss_up = rss_mb(agent_pid);
    for (i, (pa, pd)) in pods.iter().enumerate() {
        let (ca, cd) = (format!("a{i}"), format!("d{i}"));
        let (na, nd) = (
            pa.path().to_string_lossy().into_owned(),
            pd.path().to_string_lossy().into_owned(),
        );
        for turn in 0..2 {
            if (i + turn) % 2 == 0 {
                let t = Instant::now();
                node.shim("DEL", &ca, &na, ("bench", &ca), &conf)
                    .expect_ok("DEL");
                del_a.push(ms(t.elapsed()));
            } else {
                let t = Instant::now();
                direct.del(&cd, &nd, &cni_args(&cd), &direct_results[i]);
                del_d.push(ms(t.elapsed()));
            }
        }
    }
    drop(pods);
    let rss_after_pods = rss_mb(agent_pid);

    let (aa, ad, da, dd) = (
        summary(add_a.clone()),
        summary(add_d),
        summary(del_a.clone()),
        summary(del_d),
    );
    println!(
        "\n{:<22}{:>10}{:>10}{:>10}{:>10}",
        "latency (ms)", "ADD p50", "ADD p99", "DEL p50", "DEL p99"
    );
    println!(
        "{:<22}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        "delegates direct", ad.0, ad.1, dd.0, dd.1
    );
    println!(
        "{:<22}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        "trellis shim+agent", aa.0, aa.1, da.0, da.1
    );
    println!(
        "{:<22}{:>10.3}{:>10.3}{:>10.3}{:>10.3}",
        "ratio agent/direct",
        aa.0 / ad.0,
        aa.1 / ad.1,
        da.0 / dd.0,
        da.1 / dd.1
    );

    // Where the agent's share goes: its own handling time, from its request log.
    let log = node.agent_log();
    let inside = |cmd: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| {
                l.contains("cni request")
                    && l.contains(&format!("command=\"{cmd}\""))
                    && l.contains(" container=a")
            })
            .filter_map(|l| {
                l.split("micros=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .map(|us| us / 1000.0)
            .collect()
    };
    let (in_add, in_del) = (inside("ADD"), inside("DEL"));
    // The agent logs requests in the order the bench made them: pair them up.
    let outside = |outer: &[f64], inner: &[f64]| -> (f64, f64) {
        if outer.len() != inner.len() || inner.is_empty() {
            return (f64::NAN, f64::NAN);
        }
        summary(outer.iter().zip(inner).map(|(o, i)| o - i).collect())
    };
    let (oa, od) = (outside(&add_a, &in_add), outside(&del_a, &in_del));
    let (ia, id) = (summary(in_add), summary(in_del));
    println!(
        "{:<22}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        "  of which in agent", ia.0, ia.1, id.0, id.1
    );
    println!(
        "{:<22}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        "  shim + socket", oa.0, oa.1, od.0, od.1
    );
    println!(
        "shim alone (ms, p50): VERSION (exec only) {:.2}, STATUS (exec + agent round trip) {:.2}",
        summary(version).0,
        summary(status).0
    );

    // One pod added and deleted over and over: memory must stay flat.
    let ns = Netns::new("trc");
    let p = ns.path().to_string_lossy().into_owned();
    let mut samples = vec![(0, rss_mb(agent_pid))];
    let step = (args.cycles / 4).max(1);
    let t = Instant::now();
    for i in 1..=args.cycles {
        let c = format!("cyc{i}");
        node.shim("ADD", &c, &p, ("bench", &c), &conf)
            .expect_ok("cycle ADD");
        node.shim("DEL", &c, &p, ("bench", &c), &conf)
            .expect_ok("cycle DEL");
        if i % step == 0 || i == args.cycles {
            samples.push((i, rss_mb(agent_pid)));
        }
    }
    let cycle_secs = t.elapsed().as_secs_f64();
    println!("\nagent RSS (MB): idle {rss_idle:.1}, with {} pods up {rss_up:.1}, after they are gone {rss_after_pods:.1}", args.pods);
    let line: Vec<String> = samples
        .iter()
        .map(|(i, r)| format!("{i}: {r:.1}"))
        .collect();
    println!("agent RSS (MB) by ADD/DEL cycle: {}", line.join(", "));
    println!(
        "{} cycles in {cycle_secs:.1} s ({:.1} ms per ADD+DEL)",
        args.cycles,
        cycle_secs * 1000.0 / args.cycles.max(1) as f64
    );
    assert!(
        node.records().is_empty(),
        "records left: {:?}",
        node.records()
    );
    assert!(
        node.reservations().is_empty(),
        "IPs left: {:?}",
        node.reservations()
    );
}
