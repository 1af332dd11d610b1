//! A cluster-sized API (issue 14): the fake API server holds a 5,000-node cluster's
//! objects (60,000 pods, 250 of them on this node, and 5,000 NADs); the agent (Kubernetes
//! source, default configuration) starts against it. Prints: start to ready, the agent's
//! RSS, the API requests per pod ADD by kind, and the agent's CPU per 1,000 updates of a
//! steady stream (pods of other nodes, pods of this node, NADs). Asserts nothing about
//! speed. `--pods N --nads N --node-pods N --updates N --adds N`; `--quick` is small.

use serde_json::json;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};
use trellis_rig::fake_apiserver::Kind;
use trellis_rig::figures::{arg, ms};
use trellis_rig::netns::Netns;
use trellis_rig::node::{kube_node, networks_annotation};
use trellis_rig::procfs;

const NODE: &str = "node-0";

/// (VmRSS in MiB, utime + stime in seconds) of `pid`.
fn usage(pid: u32) -> (f64, f64) {
    let rss_kb = procfs::status(pid, "VmRSS:").unwrap_or(0) as f64;
    (rss_kb / 1024.0, procfs::cpu_ms(pid) / 1000.0)
}

fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let pick = |name: &str, full: usize, small: usize| {
        arg(name).unwrap_or(if quick { small } else { full })
    };
    let pods = pick("--pods", 60_000, 2_000);
    let nads = pick("--nads", 5_000, 200);
    let node_pods = pick("--node-pods", 250, 20);
    let updates = pick("--updates", 3_000, 300);
    let adds = pick("--adds", 20, 4).min(node_pods);
    let nodes = 5_000;
    println!(
        "trellis API bench: {pods} pods on {nodes} nodes ({node_pods} on this node), {nads} NADs, default configuration"
    );

    let (mut node, api) = kube_node(NODE);
    node.dataplane = true;
    // NADs spread over 100 namespaces; the pods of this node use two of ns-0's.
    api.put_nad("ns-0", "data", &node.macvlan_conf("10.84.0.0/16"));
    let br = trellis_rig::unique("trq");
    api.put_nad(
        "ns-0",
        "store",
        &node.bridge_conf("store", &br, "10.85.0.0/16"),
    );
    for i in 2..nads {
        let conf = json!({"cniVersion": "1.0.0", "name": format!("net-{i}"), "type": "macvlan",
            "master": "eth9", "ipam": {"type": "host-local", "subnet": "10.200.0.0/16"}});
        api.put_nad(&format!("ns-{}", i % 100), &format!("net-{i}"), &conf);
    }
    let on_node = networks_annotation("data, store");
    let elsewhere: BTreeMap<String, String> = networks_annotation("ns-1/net-101");
    let t = Instant::now();
    for i in 0..pods {
        let (ns, name, uid) = ("ns-0".to_string(), format!("p-{i}"), format!("uid-p-{i}"));
        if i < node_pods {
            // The rig's shim passes K8S_POD_UID uid-<container>; container c<i>.
            api.put_pod(&ns, &name, &format!("uid-c{i}"), NODE, &on_node);
        } else {
            let n = format!("node-{}", 1 + i % (nodes - 1));
            api.put_pod(&format!("ns-{}", i % 100), &name, &uid, &n, &elsewhere);
        }
    }
    println!(
        "(objects written to the fake in {:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let started = Instant::now();
    node.start_agent();
    let pid = node.agent.as_ref().map(|a| a.pid()).unwrap_or(0);
    loop {
        let out = node.shim("STATUS", "", "", ("", ""), &node.shim_conf(None));
        if out.ok {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(300),
            "never ready: {}\n{}",
            out.stdout,
            node.agent_log()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let ready = started.elapsed();
    let (rss_ready, _) = usage(pid);
    println!(
        "start to ready (STATUS answers, caches synced): {:.0} ms",
        ms(ready)
    );
    println!("agent RSS when ready: {rss_ready:.1} MiB");

    // Pod ADDs: API requests each, by kind.
    let before = api.requests().len();
    let mut made = Vec::new();
    for i in 0..adds {
        let ns = Netns::new("tra");
        let id = format!("c{i}");
        let conf = node.shim_conf(None);
        node.shim(
            "ADD",
            &id,
            &ns.path().to_string_lossy(),
            ("ns-0", &format!("p-{i}")),
            &conf,
        )
        .expect_ok("ADD");
        made.push((id, ns, conf, i));
    }
    // Writes are sent off the ADD's path (events): let them land.
    std::thread::sleep(Duration::from_millis(500));
    let reqs = api.requests();
    let mut by: BTreeMap<String, usize> = BTreeMap::new();
    for q in &reqs[before..] {
        if q.is_watch() {
            continue;
        }
        let what = if q.path.ends_with("/events") {
            format!("{} event", q.method)
        } else if q.path.ends_with("/status") {
            format!("{} pod status", q.method)
        } else {
            format!(
                "{} {}",
                q.method,
                if q.path.contains("network-attachment") {
                    "NAD"
                } else {
                    "pod"
                }
            )
        };
        *by.entry(what).or_default() += 1;
    }
    println!("API requests per pod ADD (cluster network + 2 NAD networks), {adds} ADDs:");
    for (k, v) in &by {
        println!("  {k:<16} {:.2}", *v as f64 / adds as f64);
    }
    let writes: usize = by
        .iter()
        .filter(|(k, _)| !k.starts_with("GET"))
        .map(|(_, v)| v)
        .sum();
    println!("  writes per ADD: {:.2}", writes as f64 / adds as f64);

    // A steady stream: half pods of other nodes, a quarter pods of this node (a label
    // of their own changing, not their networks), a quarter NADs.
    let (_, cpu0) = usage(pid);
    let t = Instant::now();
    let mut last_pod = 0;
    let mut last_nad = 0;
    for u in 0..updates {
        match u % 4 {
            0 | 1 => {
                let i = node_pods + (u * 7919) % (pods - node_pods);
                let n = format!("node-{}", 1 + i % (nodes - 1));
                let mut a = elsewhere.clone();
                a.insert("bench/round".into(), u.to_string());
                api.put_pod(
                    &format!("ns-{}", i % 100),
                    &format!("p-{i}"),
                    &format!("uid-p-{i}"),
                    &n,
                    &a,
                );
            }
            2 => {
                let i = u % node_pods;
                let mut a = on_node.clone();
                a.insert("bench/round".into(), u.to_string());
                last_pod = api.put_pod("ns-0", &format!("p-{i}"), &format!("uid-c{i}"), NODE, &a);
            }
            _ => {
                let i = 2 + u % (nads - 2);
                let conf = json!({"cniVersion": "1.0.0", "name": format!("net-{i}"), "type": "macvlan",
                    "master": "eth9", "mtu": 1400 + u % 100,
                    "ipam": {"type": "host-local", "subnet": "10.200.0.0/16"}});
                last_nad = api.put_nad(&format!("ns-{}", i % 100), &format!("net-{i}"), &conf);
            }
        }
    }
    api.wait_delivered(Kind::Pod, last_pod, Duration::from_secs(120));
    api.wait_delivered(Kind::Nad, last_nad, Duration::from_secs(120));
    // The reconciler's pass behind the last event.
    std::thread::sleep(Duration::from_millis(500));
    let (rss_end, cpu1) = usage(pid);
    println!(
        "stream of {updates} updates in {:.1} s: agent CPU {:.1} ms per 1,000 updates",
        t.elapsed().as_secs_f64(),
        (cpu1 - cpu0) * 1000.0 * 1000.0 / updates as f64
    );
    println!("agent RSS after the stream: {rss_end:.1} MiB");
    for (id, ns, conf, i) in &made {
        node.shim(
            "DEL",
            id,
            &ns.path().to_string_lossy(),
            ("ns-0", &format!("p-{i}")),
            conf,
        )
        .expect_ok("DEL");
    }
}
