//! Node scale (issue 14): one node with 250 pods (large nodes run 250; the kubelet's
//! default maximum is 110), each on 4 networks: the cluster network (the node's bridge
//! conflist) and three NAD networks, a plain bridge, a macvlan with a `trellis.dev/acl`
//! ACL, and a macvlan capped by `trellis.dev/bandwidth`. Default configuration
//! (dataplane on, /metrics on loopback). Every ADD and DEL goes through the real shim,
//! each pod in a netns of its own; all pods stay up until the last ADD, then are
//! deleted in the same order; then a second round of the same, for memory and fds.
//! A reference node beside it (its own agent, one pod resident) gets a pod ADDed and
//! DELed after each ADD and DEL here: the machine's drift, to take out of the growth.
//!
//! Prints: ADD latency of the first pods against the last (no growth with pod count
//! wanted), also over the reference's, and split into the delegates and the agent's own
//! work (its log); DEL likewise (the first DELs run on a full node); the agent's memory
//! and fds at ready, with all pods up and after all DELs (both rounds), its CPU with no
//! request; `trellis stats` wall time and output size with every pod attached, and the
//! /metrics scrape's time, size and sample count. Exits non-zero if anything is left
//! after the DELs (records, IP reservations, host links, live hooks). `--pods N`
//! (default 250), `--quick` (8); `TRELLIS_BENCH_LOG=FILE` keeps the agent's log.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};
use trellis_rig::figures::{arg, median, ms, percentiles};
use trellis_rig::netns::Netns;
use trellis_rig::node::{networks_annotation, TestNode};
use trellis_rig::procfs;

/// The pods' Kubernetes namespace, where their NADs are.
const NS: &str = "scale";
/// The agent's default metrics address, in the node's netns.
const METRICS: &str = "127.0.0.1:9105";
/// Runs per timed read (`trellis stats`, /metrics).
const READS: usize = 5;

/// The agent's footprint at one point.
struct Usage {
    vm_rss_mib: f64,
    rss_anon_mib: f64,
    fds: usize,
    threads: u64,
    cpu_ms: f64,
}

fn usage(pid: u32) -> Usage {
    let field = |k: &str| procfs::status(pid, k).map_or(f64::NAN, |v| v as f64);
    Usage {
        vm_rss_mib: field("VmRSS:") / 1024.0,
        rss_anon_mib: field("RssAnon:") / 1024.0,
        fds: procfs::fds(pid),
        threads: procfs::status(pid, "Threads:").unwrap_or(0),
        cpu_ms: procfs::cpu_ms(pid),
    }
}

/// Seconds the agent's idle CPU is read over (1 with `--quick`).
static IDLE_SECS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(5);

/// The CPU `pid` uses with no request (ms per second).
fn idle_cpu(pid: u32) -> f64 {
    let secs = IDLE_SECS.load(std::sync::atomic::Ordering::Relaxed);
    let c0 = usage(pid).cpu_ms;
    std::thread::sleep(Duration::from_secs(secs));
    (usage(pid).cpu_ms - c0) / secs as f64
}

/// "p50 X, p99 Y" of `v` (ms).
fn p50_p99(v: &[f64]) -> (f64, f64) {
    let [p50, p99] = percentiles(v.to_vec(), [0.5, 0.99]);
    (p50, p99)
}

/// `GET /metrics` from inside the node's netns, `READS` times on a thread of its own:
/// the wall time of each (connect to the last byte) and the last body.
fn scrape(host: &Netns, runs: usize) -> (Vec<f64>, String) {
    std::thread::scope(|s| {
        s.spawn(|| {
            host.enter_this_thread();
            let mut times = Vec::new();
            let mut body = String::new();
            for _ in 0..runs {
                let t = Instant::now();
                let mut c = std::net::TcpStream::connect(METRICS).expect("metrics port");
                c.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                    .unwrap();
                let mut raw = Vec::new();
                c.read_to_end(&mut raw).unwrap();
                times.push(ms(t.elapsed()));
                body = http_body(&raw);
            }
            (times, body)
        })
        .join()
        .unwrap()
    })
}

/// The body of a 200 answer (Content-Length or chunked).
fn http_body(raw: &[u8]) -> String {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body.to_string();
    }
    let (mut out, mut rest) = (String::new(), body);
    while let Some((size, after)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).expect("chunk size");
        if n == 0 {
            break;
        }
        out.push_str(&after[..n]);
        rest = &after[n + 2..];
    }
    out
}

/// `trellis stats <args> --bpffs-dir <dir>`, `READS` times: wall times and the output.
fn stats_runs(dir: &std::path::Path, args: &[&str]) -> (Vec<f64>, Vec<u8>) {
    let mut times = Vec::new();
    let mut out = Vec::new();
    for _ in 0..READS {
        let t = Instant::now();
        let o = std::process::Command::new(trellis_rig::bins::trellis())
            .arg("stats")
            .args(args)
            .arg("--bpffs-dir")
            .arg(dir)
            .output()
            .expect("trellis stats");
        times.push(ms(t.elapsed()));
        assert!(
            o.status.success(),
            "trellis stats: {}",
            String::from_utf8_lossy(&o.stderr)
        );
        out = o.stdout;
    }
    (times, out)
}

/// Sample lines of a metrics exposition.
fn samples(text: &str) -> usize {
    text.lines()
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .count()
}

/// Reads with every pod of round 1 attached.
struct Reads {
    entries: usize,
    hooks: usize,
    stats_ms: Vec<f64>,
    stats_out: Vec<u8>,
    json_ms: Vec<f64>,
    json_len: usize,
    scrape_ms: Vec<f64>,
    metrics: String,
}

/// One round: every pod ADDed in order and left up, then every pod DELed in the
/// same order.
struct Round {
    add: Vec<f64>,
    del: Vec<f64>,
    /// The shim's VERSION (its exec, no agent) before each ADD: the machine's noise.
    control: Vec<f64>,
    /// The reference node's ADD and DEL after each ADD here, and after each DEL.
    reference: (Vec<f64>, Vec<f64>),
    reference_del: (Vec<f64>, Vec<f64>),
    /// The agent's CPU while nothing is asked of it, all pods up (ms per second).
    idle_cpu: f64,
    cpu_per_add: f64,
    cpu_per_del: f64,
    up: Usage,
    down: Usage,
    reads: Option<Reads>,
}

/// A node as the bench wants it: default configuration with the dataplane on, the
/// cluster network and the three NADs, /16s (every pod up at once); and the NAD
/// bridge's name.
fn scale_node() -> (TestNode, String) {
    let mut node = TestNode::new();
    node.dataplane = true;
    node.write_default_network(&node.bridge_conf("cluster", &node.bridge, "10.77.0.0/16"));
    let br = trellis_rig::unique("trx");
    node.add_nad(NS, "br", &node.bridge_conf("br", &br, "10.78.0.0/16"));
    // Ten rules; what passes is allowed (the pods send nothing here).
    let rules: Vec<Value> = (0..10)
        .map(|i| json!({"action": "deny", "cidr": format!("192.0.2.{i}/32"), "protocol": "tcp", "ports": "22"}))
        .collect();
    let acl = json!({"default": "allow", "rules": rules}).to_string();
    node.add_nad_annotated(
        NS,
        "mv-acl",
        &node.macvlan_conf("10.79.0.0/16"),
        &BTreeMap::from([("trellis.dev/acl".to_string(), acl)]),
    );
    let cap = json!({"ingressRate": 100_000_000, "ingressBurst": 1_000_000,
        "egressRate": 100_000_000, "egressBurst": 1_000_000});
    node.add_nad_annotated(
        NS,
        "mv-bw",
        &node.macvlan_conf("10.80.0.0/16"),
        &BTreeMap::from([("trellis.dev/bandwidth".to_string(), cap.to_string())]),
    );
    (node, br)
}

/// The reference node (one pod resident, so its networks' ACL and bridges stay) and
/// the one netns its probe pod uses again and again.
struct Probe {
    node: TestNode,
    ns: Netns,
    resident: Netns,
    conf: Value,
}

impl Probe {
    fn new(node: TestNode) -> Probe {
        let conf = node.shim_conf(Some(&networks_annotation("br, mv-acl, mv-bw")));
        let resident = Netns::new("trr");
        node.shim(
            "ADD",
            "resident",
            &resident.path().to_string_lossy(),
            (NS, "resident"),
            &conf,
        )
        .expect_ok("reference ADD");
        Probe {
            node,
            ns: Netns::new("trr"),
            resident,
            conf,
        }
    }

    fn finish(self) {
        self.node
            .shim(
                "DEL",
                "resident",
                &self.resident.path().to_string_lossy(),
                (NS, "resident"),
                &self.conf,
            )
            .expect_ok("reference DEL");
    }

    /// ADD then DEL of the probe pod (ms each).
    fn run(&self, i: usize) -> (f64, f64) {
        let (c, p) = (
            format!("r{i}"),
            self.ns.path().to_string_lossy().into_owned(),
        );
        let t = Instant::now();
        self.node
            .shim("ADD", &c, &p, (NS, "probe"), &self.conf)
            .expect_ok("reference ADD");
        let add = ms(t.elapsed());
        let t = Instant::now();
        self.node
            .shim("DEL", &c, &p, (NS, "probe"), &self.conf)
            .expect_ok("reference DEL");
        (add, ms(t.elapsed()))
    }
}

/// A round of `pods` pods, containers `<prefix><i>`; with `probe`, the reference
/// node's pod after each ADD, and the reads with all pods up.
fn round(
    node: &TestNode,
    conf: &Value,
    pods: usize,
    prefix: &str,
    pid: u32,
    probe: Option<&Probe>,
) -> Round {
    let netns: Vec<Netns> = (0..pods).map(|_| Netns::new("trs")).collect();
    let id = |i: usize| format!("{prefix}{i}");
    let name = |i: usize| format!("p{i}");
    let cpu0 = usage(pid).cpu_ms;
    let (mut add, mut control) = (Vec::with_capacity(pods), Vec::with_capacity(pods));
    let mut reference = (Vec::new(), Vec::new());
    for (i, ns) in netns.iter().enumerate() {
        let p = ns.path().to_string_lossy().into_owned();
        let t = Instant::now();
        node.shim("VERSION", &id(i), "", (NS, &name(i)), conf)
            .expect_ok("VERSION");
        control.push(ms(t.elapsed()));
        let t = Instant::now();
        node.shim("ADD", &id(i), &p, (NS, &name(i)), conf)
            .expect_ok("ADD");
        add.push(ms(t.elapsed()));
        if let Some(probe) = probe {
            let (a, d) = probe.run(i);
            reference.0.push(a);
            reference.1.push(d);
        }
    }
    let up = usage(pid);
    let reads = probe.is_some().then(|| {
        let (stats_ms, stats_out) = stats_runs(&node.bpf_dir, &[]);
        let (json_ms, json) = stats_runs(&node.bpf_dir, &["--json"]);
        let (scrape_ms, metrics) = scrape(&node.host, READS);
        Reads {
            entries: serde_json::from_slice::<Value>(&json)
                .ok()
                .and_then(|v| v.as_array().map(|a| a.len()))
                .unwrap_or(0),
            hooks: node.live_hooks(),
            stats_ms,
            stats_out,
            json_ms,
            json_len: json.len(),
            scrape_ms,
            metrics,
        }
    });
    let idle_cpu = idle_cpu(pid);
    let cpu1 = usage(pid).cpu_ms;
    let mut del = Vec::with_capacity(pods);
    let mut reference_del = (Vec::new(), Vec::new());
    for (i, ns) in netns.iter().enumerate() {
        let p = ns.path().to_string_lossy().into_owned();
        let t = Instant::now();
        node.shim("DEL", &id(i), &p, (NS, &name(i)), conf)
            .expect_ok("DEL");
        del.push(ms(t.elapsed()));
        if let Some(probe) = probe {
            let (a, d) = probe.run(i);
            reference_del.0.push(a);
            reference_del.1.push(d);
        }
    }
    let down = usage(pid);
    Round {
        add,
        del,
        control,
        reference,
        reference_del,
        idle_cpu,
        cpu_per_add: (up.cpu_ms - cpu0) / pods as f64,
        cpu_per_del: (down.cpu_ms - cpu1) / pods as f64,
        up,
        down,
        reads,
    }
}

/// Per `command` for containers named `<prefix><n>`, in the order the agent logged
/// them: (its handling time, the time in its delegates), ms. The delegates' debug
/// lines come before their request's line (the bench sends one request at a time).
fn agent_split(log: &str, command: &str, prefix: &str) -> Vec<(f64, f64)> {
    let micros = trellis_rig::figures::logged_micros;
    let mut delegates = 0.0;
    let mut out = Vec::new();
    for l in log.lines() {
        if l.contains(&format!("delegate {command} ")) {
            delegates += micros(l).unwrap_or(0.0);
        } else if l.contains("cni request") {
            if l.contains(&format!("command=\"{command}\""))
                && l.contains(&format!(" container={prefix}"))
            {
                if let Some(total) = micros(l) {
                    out.push((total / 1000.0, delegates / 1000.0));
                }
            }
            delegates = 0.0;
        }
    }
    out
}

fn main() {
    if !trellis_rig::is_root() {
        eprintln!("trellis-bench-scale needs root (network namespaces)");
        std::process::exit(1);
    }
    let pods: usize = if std::env::args().any(|a| a == "--quick") {
        IDLE_SECS.store(1, std::sync::atomic::Ordering::Relaxed);
        8
    } else {
        arg("--pods").unwrap_or(250)
    };
    assert!(pods >= 2, "--pods: at least 2");
    // The first and last this many pods are compared.
    let block = (pods / 2).min(25);

    // The delegates' times are in the agent's debug lines (its own part is the rest).
    if std::env::var_os("TRELLIS_LOG").is_none() {
        std::env::set_var("TRELLIS_LOG", "info,trellis_agent::engine=debug");
    }
    let (mut node, br) = scale_node();
    node.start_agent();
    // Beside it, a second node (its own agent and netns) with one pod: a pod ADDed and
    // DELed there after each ADD here tracks what the machine and the kernel (shared
    // with whatever else runs) cost at the time, with no pods piling up.
    let (mut reference, _) = scale_node();
    reference.start_agent();
    let probe = Probe::new(reference);
    let pid = node.agent.as_ref().expect("agent").pid();
    let conf = node.shim_conf(Some(&networks_annotation("br, mv-acl, mv-bw")));
    let at_ready = usage(pid);
    let idle_at_ready = idle_cpu(pid);
    let (_, metrics_idle) = scrape(&node.host, 1);
    println!(
        "trellis node-scale bench: {pods} pods x 4 networks (cluster bridge; NADs: bridge, macvlan with a 10-rule ACL, macvlan capped at 100 Mbit/s each way), default configuration (dataplane on)"
    );

    // Warm the page cache, the programs and the delegates before measuring.
    for i in 0..3 {
        let ns = Netns::new("trw");
        let (c, p) = (format!("w{i}"), ns.path().to_string_lossy().into_owned());
        node.shim("ADD", &c, &p, (NS, &c), &conf)
            .expect_ok("warm-up ADD");
        node.shim("DEL", &c, &p, (NS, &c), &conf)
            .expect_ok("warm-up DEL");
    }

    // Round 1 is measured; round 2 (the same pods again) shows whether memory and
    // fds come back to where round 1 left them.
    let r1 = round(&node, &conf, pods, "a", pid, Some(&probe));
    let r2 = round(&node, &conf, pods, "b", pid, None);
    probe.finish();
    let (_, metrics_gone) = scrape(&node.host, 1);

    // Figures.
    let cmp = |what: &str, v: &[f64], full_last: bool| {
        let (first, last) = (&v[..block], &v[v.len() - block..]);
        let (f, l) = (p50_p99(first), p50_p99(last));
        // Full node over (nearly) empty node.
        let ratio = if full_last { l.0 / f.0 } else { f.0 / l.0 };
        println!(
            "{what:<4} first {block}: p50 {:.2} ms, p99 {:.2} ms | last {block}: p50 {:.2} ms, p99 {:.2} ms | {} {ratio:.3}",
            f.0,
            f.1,
            l.0,
            l.1,
            if full_last {
                "ratio of medians last/first"
            } else {
                "ratio of medians first/last (first DELs on the full node)"
            }
        );
    };
    println!("\nlatency through the shim (ms), ADD in pod order, then DEL in the same order:");
    cmp("ADD", &r1.add, true);
    cmp("DEL", &r1.del, false);
    let blocks = |v: &[f64]| -> String {
        v.chunks(block)
            .map(|c| format!("{:.1}", median(c)))
            .collect::<Vec<_>>()
            .join(" ")
    };
    println!("ADD p50 by block of {block} pods: {}", blocks(&r1.add));
    println!("DEL p50 by block of {block} pods: {}", blocks(&r1.del));
    println!(
        "control, the shim's exec alone (VERSION) before each ADD, p50 first/last {block}: {:.2} / {:.2} ms",
        median(&r1.control[..block]),
        median(&r1.control[pods - block..])
    );
    if r1.reference.0.len() == pods {
        let (ra, rd) = (&r1.reference.0, &r1.reference.1);
        let (f, l) = (0..block, pods - block..pods);
        println!(
            "reference node (one pod up; another ADDed and DELed there after each ADD here), p50 first/last {block}: ADD {:.2} / {:.2} ms, DEL {:.2} / {:.2} ms",
            median(&ra[f.clone()]),
            median(&ra[l.clone()]),
            median(&rd[f.clone()]),
            median(&rd[l.clone()])
        );
        let rel =
            |r: std::ops::Range<usize>| median(&r.map(|i| r1.add[i] / ra[i]).collect::<Vec<_>>());
        println!(
            "ADD here over the reference's ADD just after it, median first/last {block}: {:.3} / {:.3} (growth with pod count, the machine's drift taken out: {:.3})",
            rel(f.clone()),
            rel(l.clone()),
            rel(l.clone()) / rel(f.clone())
        );
        let (da, dd) = (&r1.reference_del.0, &r1.reference_del.1);
        let rel_del =
            |r: std::ops::Range<usize>| median(&r.map(|i| r1.del[i] / dd[i]).collect::<Vec<_>>());
        println!(
            "reference node during the DELs, p50 first/last {block}: ADD {:.2} / {:.2} ms, DEL {:.2} / {:.2} ms",
            median(&da[f.clone()]),
            median(&da[l.clone()]),
            median(&dd[f.clone()]),
            median(&dd[l.clone()])
        );
        println!(
            "DEL here over the reference's DEL just after it, median first/last {block}: {:.3} / {:.3} (full node over empty, the drift taken out: {:.3})",
            rel_del(f.clone()),
            rel_del(l.clone()),
            rel_del(f) / rel_del(l)
        );
    }
    let log = node.agent_log();
    for cmd in ["ADD", "DEL"] {
        let split = agent_split(&log, cmd, "a");
        if split.len() != pods {
            continue;
        }
        let part = |r: std::ops::Range<usize>, f: fn(&(f64, f64)) -> f64| {
            median(&split[r].iter().map(f).collect::<Vec<_>>())
        };
        let (first, last) = (0..block, pods - block..pods);
        println!(
            "{cmd} in the agent (its log), p50 first/last {block}: {:.2} / {:.2} ms, of which the 4 delegates {:.2} / {:.2} ms, the agent's own work {:.2} / {:.2} ms",
            part(first.clone(), |x| x.0),
            part(last.clone(), |x| x.0),
            part(first.clone(), |x| x.1),
            part(last.clone(), |x| x.1),
            part(first, |x| x.0 - x.1),
            part(last, |x| x.0 - x.1),
        );
    }
    println!(
        "the {pods} ADDs took {:.1} s in all, the DELs {:.1} s; agent CPU per ADD {:.2} ms, per DEL {:.2} ms",
        r1.add.iter().sum::<f64>() / 1000.0,
        r1.del.iter().sum::<f64>() / 1000.0, r1.cpu_per_add, r1.cpu_per_del
    );
    println!(
        "round 2 (the same {pods} pods again): ADD p50 first/last {block} {:.2} / {:.2} ms, DEL {:.2} / {:.2} ms",
        median(&r2.add[..block]),
        median(&r2.add[pods - block..]),
        median(&r2.del[..block]),
        median(&r2.del[pods - block..])
    );
    println!("\nagent                    VmRSS MiB  RssAnon MiB   fds  threads");
    let rows = [
        ("ready".to_string(), &at_ready),
        (format!("{pods} pods up"), &r1.up),
        ("after all DELs".to_string(), &r1.down),
        (format!("{pods} pods up, round 2"), &r2.up),
        ("after all DELs, round 2".to_string(), &r2.down),
    ];
    for (label, u) in rows {
        println!(
            "{label:<24}{:>10.1}{:>13.1}{:>6}{:>9}",
            u.vm_rss_mib, u.rss_anon_mib, u.fds, u.threads
        );
    }
    println!(
        "agent CPU with no requests: {idle_at_ready:.2} ms/s when ready, {:.2} ms/s with {pods} pods up",
        r1.idle_cpu
    );
    let reads = r1.reads.expect("round 1 reads");
    println!(
        "\nwith {pods} pods up ({} interfaces, {} live hooks), median of {READS}:",
        reads.entries, reads.hooks
    );
    println!(
        "trellis stats (table): {:.1} ms, {} bytes, {} lines; --json: {:.1} ms, {} bytes",
        median(&reads.stats_ms),
        reads.stats_out.len(),
        String::from_utf8_lossy(&reads.stats_out).lines().count(),
        median(&reads.json_ms),
        reads.json_len
    );
    println!(
        "GET /metrics: {:.1} ms, {} bytes, {} samples (at ready: {} bytes, {} samples; after all DELs: {} bytes, {} samples)",
        median(&reads.scrape_ms),
        reads.metrics.len(),
        samples(&reads.metrics),
        metrics_idle.len(),
        samples(&metrics_idle),
        metrics_gone.len(),
        samples(&metrics_gone)
    );

    // The agent's log, for a closer look (`TRELLIS_LOG=debug` times each delegate).
    if let Some(path) = std::env::var_os("TRELLIS_BENCH_LOG") {
        std::fs::write(&path, &log).expect("TRELLIS_BENCH_LOG");
    }

    // Nothing left behind.
    let links: Vec<String> = node.host_links().into_iter().filter(|l| l != &br).collect();
    let mut leaks = Vec::new();
    for (what, left) in [
        ("records", node.records()),
        ("IP reservations", node.reservations()),
        ("host links", links),
        (
            "live hooks",
            (0..node.live_hooks()).map(|_| String::new()).collect(),
        ),
    ] {
        println!("left after all DELs: {what} {}", left.len());
        if !left.is_empty() {
            let names: Vec<&String> = left.iter().filter(|n| !n.is_empty()).take(10).collect();
            leaks.push(format!("{} {what} {names:?}", left.len()));
        }
    }
    drop(node);
    if !leaks.is_empty() {
        eprintln!("trellis-bench-scale: left behind: {}", leaks.join("; "));
        std::process::exit(1);
    }
}
