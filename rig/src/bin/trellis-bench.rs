//! What the agent costs: ADD/DEL latency through the real shim and agent for a pod
//! with the cluster network plus two NAD networks (one of them with an ACL), with the
//! default config (the eBPF dataplane on: every interface attached, the ACL
//! enforced) beside a second agent with the dataplane off and beside the same three
//! delegates exec'd directly (as a runtime with no meta-plugin would), interleaved
//! pod by pod in one run; DEL right after ADD; each agent's CPU per pod; and the
//! default agent's RSS idle, with the pods up, and across ADD/DEL cycles.
//!
//! `trellis-bench [--pods N] [--cycles M]` (root). Prints figures; asserts nothing.

use serde_json::{Map, Value};
use std::time::{Duration, Instant};
use trellis_cni::conf::NetConfList;
use trellis_delegate::{Invoker, Target};
use trellis_rig::figures::{ms, percentiles};
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode, REFERENCE_PLUGINS};
use trellis_rig::procfs::{self, cpu_ms};

struct Args {
    pods: usize,
    cycles: usize,
}

fn parse_args() -> Args {
    let mut a = Args {
        pods: 200,
        cycles: 1000,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        let v = it.next().and_then(|v| v.parse().ok());
        match (k.as_str(), v) {
            ("--pods", Some(v)) => a.pods = v,
            ("--cycles", Some(v)) => a.cycles = v,
            _ => {
                eprintln!("usage: trellis-bench [--pods N] [--cycles M]");
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

/// A process's resident memory of its own (RssAnon: heap and stacks), in MB. VmRSS
/// also counts the pages of the BPF maps the agent maps to write ACL tables (kernel
/// memory, counted once per node, ~16 MB), which are not the agent's.
fn rss_mb(pid: u32) -> f64 {
    procfs::status(pid, "RssAnon:").map_or(f64::NAN, |kb| kb as f64 / 1024.0)
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
    // The macvlan network has an ACL (ten rules; what passes is allowed): its
    // interfaces are filtered from their first packet.
    let rules: Vec<Value> = (0..10)
        .map(|i| serde_json::json!({"action": "deny", "cidr": format!("192.0.2.{i}/32"), "protocol": "tcp", "ports": "22"}))
        .collect();
    let acl = serde_json::json!({"default": "allow", "rules": rules}).to_string();
    node.add_nad_annotated(
        "bench",
        "mv",
        &macvlan,
        &[("trellis.dev/acl".to_string(), acl)].into(),
    );
    node.add_nad("bench", "br", &bridge);
    // The default config: the dataplane on.
    node.dataplane = true;
    node.start_agent();
    let agent_pid = node.agent.as_ref().unwrap().pid();
    // Beside it, in the same node, an agent with the dataplane off (its own socket
    // and state; the same NADs without the ACL, which it would refuse; the same
    // delegates and node).
    let off_nads = node.path("off-nads");
    std::fs::create_dir_all(&off_nads).unwrap();
    for (name, conf) in [("mv", &macvlan), ("br", &bridge)] {
        let nad = serde_json::json!({
            "apiVersion": "k8s.cni.cncf.io/v1",
            "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": "bench"},
            "spec": {"config": conf.to_string()},
        });
        std::fs::write(off_nads.join(format!("bench-{name}.json")), nad.to_string()).unwrap();
    }
    let off_socket = node.path("off.sock");
    let off_conf_path = node.path("off.toml");
    let off_toml = node
        .config_toml()
        .replace(
            &format!("socket = {:?}", node.socket()),
            &format!("socket = {off_socket:?}"),
        )
        .replace(
            &format!("state_dir = {:?}", node.state_dir()),
            &format!("state_dir = {:?}", node.path("off-state")),
        )
        .replace(
            "[dataplane]\nenabled = true",
            "[dataplane]\nenabled = false",
        )
        .replace(
            &format!("dir = {:?}", node.path("nads")),
            &format!("dir = {off_nads:?}"),
        )
        + "\n[metrics]\nlisten = \"127.0.0.1:9106\"\n";
    std::fs::write(&off_conf_path, off_toml).unwrap();
    let off_agent = trellis_rig::agent::AgentProcess::start(
        &node.host,
        &off_conf_path,
        &off_socket,
        &node.path("off.log"),
    );
    let off_pid = off_agent.pid();
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
    let mut off_conf = conf.clone();
    off_conf["socket"] = serde_json::json!(off_socket);
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
        "trellis bench: {} pods per path side by side, cluster bridge + 2 NAD networks (macvlan with a 10-rule ACL, bridge), host-local IPAM, {} cycles",
        args.pods, args.cycles
    );

    // The three paths: 0 the default config (dataplane on), 1 the dataplane off,
    // 2 the delegates exec'd directly.
    let run_add = |path: usize, c: &str, ns: &str| -> Option<Vec<Value>> {
        match path {
            0 => {
                node.shim("ADD", c, ns, ("bench", c), &conf)
                    .expect_ok("ADD");
                None
            }
            1 => {
                node.shim("ADD", c, ns, ("bench", c), &off_conf)
                    .expect_ok("ADD (dataplane off)");
                None
            }
            _ => Some(direct.add(c, ns, &cni_args(c))),
        }
    };
    let run_del = |path: usize, c: &str, ns: &str, r: &Option<Vec<Value>>| match path {
        0 => {
            node.shim("DEL", c, ns, ("bench", c), &conf)
                .expect_ok("DEL");
        }
        1 => {
            node.shim("DEL", c, ns, ("bench", c), &off_conf)
                .expect_ok("DEL (dataplane off)");
        }
        _ => direct.del(c, ns, &cni_args(c), r.as_ref().expect("direct results")),
    };

    // Warm the page cache and every path before measuring.
    for i in 0..5 {
        let ns = Netns::new("trw");
        let p = ns.path().to_string_lossy().into_owned();
        for path in 0..3 {
            let c = format!("warm{path}-{i}");
            let r = run_add(path, &c, &p);
            run_del(path, &c, &p, &r);
        }
    }

    // Every path, rotating which goes first, every pod left up until all are made.
    let pods: Vec<[Netns; 3]> = (0..args.pods)
        .map(|_| [Netns::new("tra"), Netns::new("trf"), Netns::new("trd")])
        .collect();
    let name = |path: usize, i: usize| format!("{}{i}", ["a", "f", "d"][path]);
    let mut add: [Vec<f64>; 3] = Default::default();
    let mut del: [Vec<f64>; 3] = Default::default();
    let mut results: Vec<[Option<Vec<Value>>; 3]> = Vec::new();
    let cpu0 = [cpu_ms(agent_pid), cpu_ms(off_pid)];
    for (i, ns) in pods.iter().enumerate() {
        let mut r: [Option<Vec<Value>>; 3] = Default::default();
        for turn in 0..3 {
            let path = (i + turn) % 3;
            let p = ns[path].path().to_string_lossy().into_owned();
            let t = Instant::now();
            r[path] = run_add(path, &name(path, i), &p);
            add[path].push(ms(t.elapsed()));
        }
        results.push(r);
    }
    let rss_up = rss_mb(agent_pid);
    for (i, ns) in pods.iter().enumerate() {
        for turn in 0..3 {
            let path = (i + turn) % 3;
            let p = ns[path].path().to_string_lossy().into_owned();
            let t = Instant::now();
            run_del(path, &name(path, i), &p, &results[i][path]);
            del[path].push(ms(t.elapsed()));
        }
    }
    let cpu_per_pod = [
        (cpu_ms(agent_pid) - cpu0[0]) / args.pods as f64,
        (cpu_ms(off_pid) - cpu0[1]) / args.pods as f64,
    ];
    drop(pods);
    let rss_after_pods = rss_mb(agent_pid);

    // DEL right after ADD (a pod that fails to start), the paths in turn, beside one
    // pod of each path that stays up (a node with pods: the kernel's tc hooks are
    // enabled already, as they are on any node where trellis has attached a pod).
    let resident: Vec<(Netns, Option<Vec<Value>>)> = (0..3)
        .map(|path| {
            let ns = Netns::new("trr");
            let p = ns.path().to_string_lossy().into_owned();
            let r = run_add(path, &format!("r{path}"), &p);
            (ns, r)
        })
        .collect();
    let quick = (args.pods / 2).max(10);
    let mut quick_del: [Vec<f64>; 3] = Default::default();
    for i in 0..quick {
        for turn in 0..3 {
            let path = (i + turn) % 3;
            let ns = Netns::new("trq");
            let p = ns.path().to_string_lossy().into_owned();
            let c = format!("q{path}-{i}");
            let r = run_add(path, &c, &p);
            let t = Instant::now();
            run_del(path, &c, &p, &r);
            quick_del[path].push(ms(t.elapsed()));
        }
    }

    for (path, (ns, r)) in resident.iter().enumerate() {
        run_del(path, &format!("r{path}"), &ns.path().to_string_lossy(), r);
    }
    let [on_a, off_a, dir_a] = add.clone().map(summary);
    let [on_d, off_d, dir_d] = del.clone().map(summary);
    let [on_q, off_q, dir_q] = quick_del.map(summary);
    println!(
        "\n{:<34}{:>10}{:>10}{:>10}{:>10}{:>14}",
        "latency (ms)", "ADD p50", "ADD p99", "DEL p50", "DEL p99", "DEL at once"
    );
    for (label, a, d, q) in [
        ("delegates direct", dir_a, dir_d, dir_q),
        ("trellis, default (dataplane on)", on_a, on_d, on_q),
        ("trellis, dataplane off", off_a, off_d, off_q),
    ] {
        println!(
            "{:<34}{:>10.2}{:>10.2}{:>10.2}{:>10.2}{:>14.2}",
            label, a.0, a.1, d.0, d.1, q.0
        );
    }
    for (label, a, d, q) in [
        ("ratio default/direct", on_a, on_d, on_q),
        ("ratio dataplane off/direct", off_a, off_d, off_q),
    ] {
        println!(
            "{:<34}{:>10.3}{:>10.3}{:>10.3}{:>10.3}{:>14.3}",
            label,
            a.0 / dir_a.0,
            a.1 / dir_a.1,
            d.0 / dir_d.0,
            d.1 / dir_d.1,
            q.0 / dir_q.0
        );
    }
    println!(
        "agent CPU per pod (ADD + DEL, ms): default {:.2}, dataplane off {:.2} ({:.2}x)",
        cpu_per_pod[0],
        cpu_per_pod[1],
        cpu_per_pod[0] / cpu_per_pod[1]
    );
    let (add_a, del_a) = (add[0].clone(), del[0].clone());

    // Where the default agent's share goes: its own handling time, from its log.
    let log = node.agent_log();
    let inside_of = |cmd: &str, prefix: &str| -> Vec<f64> {
        log.lines()
            .filter(|l| {
                l.contains("cni request")
                    && l.contains(&format!("command=\"{cmd}\""))
                    && l.contains(&format!(" container={prefix}"))
            })
            .filter_map(trellis_rig::figures::logged_micros)
            .map(|us| us / 1000.0)
            .collect()
    };
    let inside = |cmd: &str| inside_of(cmd, "a");
    let (in_add, in_del) = (inside("ADD"), inside("DEL"));
    println!(
        "  default: DEL at once, in agent (ms, p50): {:.2}",
        summary(inside_of("DEL", "q0-")).0
    );
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
        "{:<34}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        "  default: of which in agent", ia.0, ia.1, id.0, id.1
    );
    println!(
        "{:<34}{:>10.2}{:>10.2}{:>10.2}{:>10.2}",
        "  default: shim + socket", oa.0, oa.1, od.0, od.1
    );
    println!(
        "shim alone (ms, p50): VERSION (exec only) {:.2}, STATUS (exec + agent round trip) {:.2}",
        summary(version).0,
        summary(status).0
    );
    drop(off_agent);
    if std::env::var_os("TRELLIS_BENCH_LOG").is_some() {
        println!("{log}");
    }

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
    println!("\nagent RssAnon (MB): idle {rss_idle:.1}, with {} pods up {rss_up:.1}, after they are gone {rss_after_pods:.1}", args.pods);
    let line: Vec<String> = samples
        .iter()
        .map(|(i, r)| format!("{i}: {r:.1}"))
        .collect();
    println!("agent RssAnon (MB) by ADD/DEL cycle: {}", line.join(", "));
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
