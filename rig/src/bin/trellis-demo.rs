//! The demo node: containerd with the CRI plugin and trellis-cni as its only CNI config,
//! the trellis agent, and pods asking for extra networks by annotation. It prints what
//! each pod got, pings across every network, shows the agent serving a vhost-user
//! device (made by DPDK testpmd) to a test kubelet, and tears everything down.

use serde_json::Value;
use std::collections::HashMap;
use std::time::Duration;
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_rig::containerd::Containerd;
use trellis_rig::dpdk::Testpmd;
use trellis_rig::fake_kubelet::{watch_until, FakeKubelet};
use trellis_rig::netns::Netns;
use trellis_rig::node::TestNode;

fn main() {
    if !trellis_rig::is_root() {
        eprintln!("trellis-demo needs root (network namespaces, containerd)");
        std::process::exit(1);
    }
    let rt = tokio::runtime::Runtime::new().expect("tokio");
    rt.block_on(demo());
}

async fn demo() {
    println!("== trellis demo node ==");
    let mut node = TestNode::new();
    println!(
        "node netns {} (the 'host'), state in {}",
        node.host.name,
        node.dir.path().display()
    );
    node.add_nad("demo", "data", &node.macvlan_conf("10.90.1.0/24"));
    let br = trellis_rig::unique("trs");
    // demo/storage carries an ACL: no SSH from the storage subnet into the pods.
    node.add_nad_annotated(
        "demo",
        "storage",
        &node.bridge_conf("storage", &br, "10.90.2.0/24"),
        &[(
            "trellis.dev/acl".to_string(),
            r#"{"default":"allow","rules":[{"action":"deny","direction":"ingress","cidr":"10.90.2.0/24","protocol":"tcp","ports":22}]}"#
                .to_string(),
        )]
        .into(),
    );
    node.add_nad(
        "demo",
        "fixed",
        &serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":node.master,"mode":"bridge",
                             "capabilities":{"ips":true,"mac":true},"ipam":{"type":"static"}}),
    );
    println!("networks: cluster (bridge, 10.77.0.0/24), demo/data (macvlan, 10.90.1.0/24), demo/storage (bridge, 10.90.2.0/24, ACL: deny tcp/22 in from 10.90.2.0/24), demo/fixed (macvlan, static IPs)");
    // Devices: a DPDK vhost-user switch (testpmd) makes a socket; the agent offers it
    // to kubelet as trellis.dev/vhost_user (SR-IOV VFs need real or emulated hardware:
    // see rig/tests/qemu_igb.rs).
    let vhost_dir = node.path("vhost");
    std::fs::create_dir_all(&vhost_dir).unwrap();
    let mut testpmd =
        Testpmd::vhost_server(&vhost_dir.join("vhu-demo.sock"), &node.path("testpmd.log"));
    let pools = node.path("pools.json");
    std::fs::write(
        &pools,
        format!(
            r#"{{"resourceList":[{{"resourceName":"vhost_user","resourcePrefix":"trellis.dev","deviceType":"vhostUser",
                "mountPath":"/var/run/vhost-user","selectors":{{"socketDirs":[{vhost_dir:?}],"namePattern":"vhu-*"}}}}]}}"#
        ),
    )
    .unwrap();
    let plugin_dir = node.path("device-plugins");
    node.devices_toml = Some(format!(
        "[devices]\nconfig = {pools:?}\nplugin_dir = {plugin_dir:?}\npoll_interval_ms = 300\n"
    ));
    let kubelet = FakeKubelet::start(&plugin_dir);
    node.dataplane = true;
    node.start_agent();
    let ctrd = Containerd::start(&node.host, &node.path("containerd"), &node.socket());
    let mut cri = ctrd.cri().await;
    let logs = ctrd.log_dir();

    let pods = [
        ("pod-a", "data, storage@st0"),
        (
            "pod-b",
            r#"[{"name":"data"},{"name":"storage","interface":"st0"},{"name":"fixed","ips":["10.90.3.20/24"],"mac":"02:00:5e:00:03:14"}]"#,
        ),
        (
            "pod-c",
            r#"[{"name":"data","namespace":"demo"},{"name":"fixed","ips":["10.90.3.30/24"]}]"#,
        ),
    ];
    let mut ids = Vec::new();
    for (name, networks) in pods {
        println!("\n-- RunPodSandbox demo/{name}  k8s.v1.cni.cncf.io/networks: {networks}");
        let ann = HashMap::from([(
            "k8s.v1.cni.cncf.io/networks".to_string(),
            networks.to_string(),
        )]);
        let id = match cri.run_pod("demo", name, ann, &logs).await {
            Ok(id) => id,
            Err(e) => {
                eprintln!(
                    "RunPodSandbox failed: {}\nagent log:\n{}",
                    e.message(),
                    node.agent_log()
                );
                std::process::exit(1);
            }
        };
        let rec = record(&node, &id);
        let ns = Netns::at(rec["netns"].as_str().unwrap_or_default());
        println!("network-status:");
        for s in rec["network_status"].as_array().into_iter().flatten() {
            println!(
                "  {:<14} {:<6} {:<16} {}{}",
                s["name"].as_str().unwrap_or(""),
                s["interface"].as_str().unwrap_or(""),
                s["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect::<Vec<_>>()
                    .join(","),
                s["mac"].as_str().unwrap_or(""),
                if s["default"] == true {
                    "  (default)"
                } else {
                    ""
                }
            );
        }
        println!("in the pod (ip -br addr):");
        for l in ns.sh("ip -br addr").lines() {
            println!("  {l}");
        }
        ids.push((name, id, ns));
    }

    println!("\n-- traffic: ping over every network two pods share");
    let mut failures = 0;
    for (from, from_id, from_ns) in &ids {
        let from_nets = networks_of(&record(&node, from_id));
        for (to, to_id, _) in &ids {
            if from == to {
                continue;
            }
            for (network, (ifname, dst)) in networks_of(&record(&node, to_id)) {
                if !from_nets.contains_key(&network) {
                    continue;
                }
                let ok = from_ns.ping(&dst);
                failures += usize::from(!ok);
                println!(
                    "  {from} -> {to}  {network:<13} {ifname:<5} {dst:<12} {}",
                    if ok { "ok" } else { "FAILED" }
                );
            }
        }
    }

    println!(
        "\n-- hot-plug: demo/storage added to the running pod-c (trellis attach), then removed"
    );
    if let (Some((_, a_id, _)), Some((_, _, c_ns))) = (ids.first(), ids.get(2)) {
        let trellis = |args: &[&str]| {
            std::process::Command::new(trellis_rig::bins::trellis())
                .args(args)
                .arg("--socket")
                .arg(node.socket())
                .output()
                .expect("trellis")
        };
        let out = trellis(&["attach", "--pod", "demo/pod-c", "storage@st9"]);
        if out.status.success() {
            println!("  trellis attach --pod demo/pod-c storage@st9: ok");
            for l in c_ns.sh("ip -br addr show st9").lines() {
                println!("  {l}");
            }
            if let Some((_, dst)) = networks_of(&record(&node, a_id)).get("demo/storage") {
                let ok = c_ns.ping(dst);
                failures += usize::from(!ok);
                println!(
                    "  pod-c -> pod-a  demo/storage st9 {dst:<12} {}",
                    if ok { "ok" } else { "FAILED" }
                );
            }
            let out = trellis(&["networks"]);
            println!("trellis networks:");
            print!("{}", String::from_utf8_lossy(&out.stdout));
            let out = trellis(&["detach", "--pod", "demo/pod-c", "@st9"]);
            let gone = out.status.success() && !c_ns.sh("ip -br link").contains("st9");
            failures += usize::from(!gone);
            println!(
                "  trellis detach --pod demo/pod-c @st9: {}",
                if gone { "ok, st9 gone" } else { "FAILED" }
            );
        } else {
            failures += 1;
            println!(
                "  trellis attach FAILED: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }

    println!("\n-- the demo/storage ACL: TCP to port 22 on pod-b's st0 from pod-a");
    if let (Some((_, _, a_ns)), Some((_, b_id, _))) = (ids.first(), ids.get(1)) {
        if let Some((_, dst)) = networks_of(&record(&node, b_id)).get("demo/storage") {
            // Dropped SYNs time out (124); a reachable closed port would be refused (1).
            let rc = a_ns
                .sh(&format!(
                    "timeout 2 bash -c 'echo > /dev/tcp/{dst}/22' 2>/dev/null; echo $?"
                ))
                .trim()
                .to_string();
            let dropped = rc == "124";
            failures += usize::from(!dropped);
            println!(
                "  pod-a -> pod-b  {dst}:22  {}",
                if dropped {
                    "dropped by the ACL (timed out)"
                } else {
                    "NOT dropped"
                }
            );
        }
    }
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["stats", "--acl", "--bpffs-dir"])
        .arg(&node.bpf_dir)
        .output()
        .expect("trellis stats --acl");
    println!("trellis stats --acl:");
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n-- trellis stats (eBPF counters on every pod interface, read from the pins)");
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["stats", "--namespace", "demo", "--bpffs-dir"])
        .arg(&node.bpf_dir)
        .output()
        .expect("trellis stats");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    if !out.status.success() {
        eprintln!(
            "trellis stats failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        failures += 1;
    }

    println!("\n-- trellis attachments");
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["attachments", "--state-dir"])
        .arg(node.state_dir())
        .output()
        .expect("trellis attachments");
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n-- devices: the agent as kubelet's device plugin (a test kubelet here)");
    let regs = kubelet.wait_registrations(1, Duration::from_secs(20)).await;
    for r in &regs {
        println!(
            "  registered {} on {}",
            r.request.resource_name, r.request.endpoint
        );
    }
    let mut plugin = kubelet.plugin(&regs[0].request.endpoint).await;
    let mut stream = plugin
        .list_and_watch(dp::Empty {})
        .await
        .expect("ListAndWatch")
        .into_inner();
    let (list, _) = watch_until(&mut stream, Duration::from_secs(20), |l| !l.is_empty()).await;
    for d in &list {
        println!("  ListAndWatch: {} {}", d.id, d.health);
    }
    let alloc = plugin
        .allocate(dp::AllocateRequest {
            container_requests: vec![dp::ContainerAllocateRequest {
                devices_ids: vec![list[0].id.clone()],
            }],
        })
        .await
        .expect("Allocate")
        .into_inner();
    let c = &alloc.container_responses[0];
    for (k, v) in &c.envs {
        println!("  Allocate -> env {k}={v}");
    }
    for m in &c.mounts {
        println!(
            "  Allocate -> mount {} at {}",
            m.host_path, m.container_path
        );
    }
    let out = std::process::Command::new(trellis_rig::bins::trellis())
        .args(["devices", "--device-config"])
        .arg(&pools)
        .output()
        .expect("trellis devices");
    println!("trellis devices --device-config {}:", pools.display());
    for l in String::from_utf8_lossy(&out.stdout).lines() {
        println!("  {l}");
    }
    testpmd.stop();
    let (list, _) = watch_until(&mut stream, Duration::from_secs(20), |l| {
        l.iter().all(|d| d.health == "Unhealthy")
    })
    .await;
    println!(
        "  testpmd stopped -> ListAndWatch: {} {}",
        list[0].id, list[0].health
    );

    println!("\n-- StopPodSandbox + RemovePodSandbox");
    for (name, id, _) in &ids {
        cri.stop_pod(id).await.expect("stop");
        cri.remove_pod(id).await.expect("remove");
        println!("  {name} removed");
    }
    println!(
        "left behind: {} records, {} IP reservations",
        node.records().len(),
        node.reservations().len()
    );
    drop(ctrd);
    if failures > 0 || !node.records().is_empty() || !node.reservations().is_empty() {
        eprintln!("demo FAILED");
        std::process::exit(1);
    }
    println!("demo ok");
}

/// network name -> (interface, first IP) from a record's network-status.
fn networks_of(rec: &Value) -> std::collections::BTreeMap<String, (String, String)> {
    rec["network_status"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| {
            Some((
                s["name"].as_str()?.to_string(),
                (
                    s["interface"].as_str()?.to_string(),
                    s["ips"][0].as_str()?.to_string(),
                ),
            ))
        })
        .collect()
}

fn record(node: &TestNode, id: &str) -> Value {
    node.record(id)
}
