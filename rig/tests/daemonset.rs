//! The shipped DaemonSet, proven as a container: the image scripts/image.sh builds,
//! imported into a containerd that runs in a node of its own (rig/src/containerd.rs
//! `start_node`), the init container and the agent container created through CRI from
//! exactly deploy/trellis.yaml's pod spec (rig/src/daemonset.rs). Pods with a delegate
//! network and an ACL network, traffic, a primary conf change followed, an upgrade of
//! the agent container that keeps every attachment, counter and ACL, DEL, uninstall.
//!
//! What differs from a real node, and why (the only two edits to the ConfigMap):
//! - `host_process` is containerd's pid, not 1: this sandbox's PID 1 (its VM init)
//!   refuses /proc/1/ns even to root. containerd's mount namespace is the node's.
//! - `[networks] kubeconfig` names the fake API server (plain HTTP on the node's
//!   loopback); no in-cluster HTTPS endpoint and service account token exist here.

use serde_json::{json, Value};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use trellis_rig::containerd::Containerd;
use trellis_rig::cri::Cri;
use trellis_rig::daemonset::{self, DaemonPod};
use trellis_rig::fake_apiserver::FakeApiServer;
use trellis_rig::netns::Netns;
use trellis_rig::require_root;
use trellis_rig::traffic::{counter, interface, trellis_stats};
use trellis_rig::wait_until;

const NODE: &str = "rig-node";

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// scripts/image.sh on the binaries under test.
fn build_image(out: &Path) {
    let st = std::process::Command::new("bash")
        .arg(repo().join("scripts/image.sh"))
        .arg("--bin-dir")
        .arg(trellis_rig::bins::bin_dir())
        .arg("--out")
        .arg(out)
        .status()
        .expect("scripts/image.sh");
    assert!(st.success(), "scripts/image.sh failed");
}

/// GET http://127.0.0.1:{port}{path} from inside `ns` (the node's loopback, where
/// kubelet's httpGet probe with host 127.0.0.1 goes).
fn http_get(ns: &Netns, port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let ns_path = ns.path();
    let path = path.to_string();
    std::thread::spawn(move || {
        Netns::at(ns_path).enter_this_thread();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let code = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|x| x.1.to_string())?;
        Some((code, body))
    })
    .join()
    .unwrap()
}

fn probe(ns: &Netns, probe: &Value) -> Option<(u16, String)> {
    let g = &probe["httpGet"];
    assert_eq!(g["host"], "127.0.0.1", "probe {probe}");
    http_get(ns, g["port"].as_u64()? as u16, g["path"].as_str()?)
}

async fn wait_exit(cri: &mut Cri, id: &str, within: Duration) -> Option<i32> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        let (state, code) = cri.container_state(id).await.unwrap();
        if state == k8s_cri::v1::ContainerState::ContainerExited {
            return Some(code);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

fn read_json(p: &Path) -> Option<Value> {
    serde_json::from_slice(&std::fs::read(p).ok()?).ok()
}

fn primary_conf(bridge: &str, version: &str, portmap: bool) -> Value {
    let mut plugins = vec![json!({
        "type": "bridge", "bridge": bridge, "isGateway": true,
        "ipam": {"type": "host-local", "subnet": "10.77.0.0/24"}
    })];
    if portmap {
        plugins.push(json!({"type": "portmap", "capabilities": {"portMappings": true}}));
    }
    json!({"cniVersion": version, "name": "cluster", "plugins": plugins})
}

struct Agent {
    id: String,
    attempt: u32,
}

async fn start_agent(
    cri: &mut Cri,
    pod: &DaemonPod,
    sandbox: &str,
    attempt: u32,
    node_ns: &Netns,
) -> (Agent, Duration) {
    let id = cri
        .create_container(
            sandbox,
            pod.container("agent", attempt, None),
            pod.sandbox(),
        )
        .await
        .unwrap_or_else(|e| panic!("CreateContainer agent: {e}"));
    let started = Instant::now();
    cri.start_container(&id).await.unwrap();
    let ready = &pod.container_spec("agent")["readinessProbe"];
    let deadline = started + Duration::from_secs(60);
    loop {
        if matches!(probe(node_ns, ready), Some((200, _))) {
            break;
        }
        let (state, code) = cri.container_state(&id).await.unwrap();
        assert!(
            state != k8s_cri::v1::ContainerState::ContainerExited,
            "agent container exited with {code}: {}",
            pod.log("agent", attempt)
        );
        assert!(
            Instant::now() < deadline,
            "agent not ready in 60 s ({:?}): {}",
            probe(node_ns, ready),
            pod.log("agent", attempt)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let to_ready = started.elapsed();
    let live = &pod.container_spec("agent")["livenessProbe"];
    assert_eq!(probe(node_ns, live).map(|r| r.0), Some(200));
    (Agent { id, attempt }, to_ready)
}

fn networks(value: &str) -> HashMap<String, String> {
    HashMap::from([("k8s.v1.cni.cncf.io/networks".to_string(), value.to_string())])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemonset_runs_as_a_container_and_serves_pods() {
    require_root!();
    let dir = tempfile::Builder::new()
        .prefix("trellis-ds")
        .tempdir()
        .unwrap();
    build_image(&dir.path().join("trellis-image.tar"));

    // The node: its netns with a NIC for macvlan, containerd in its own mount namespace.
    let node = Netns::new("trds");
    let master = trellis_rig::unique("trdm");
    node.sh(&format!(
        "ip link add {master} type veth peer name {master}p && ip link set {master} up && ip link set {master}p up"
    ));
    let bridge = trellis_rig::unique("trdb");
    let ctrd = Containerd::start_node(&node, &dir.path().join("containerd"));
    ctrd.import(&dir.path().join("trellis-image.tar"));
    let host = |p: &str| ctrd.node_path(p);
    // The reference plugins, as a node's package manager puts them in /opt/cni/bin.
    for p in ["bridge", "host-local", "macvlan", "portmap"] {
        std::fs::copy(
            Path::new("/usr/lib/cni").join(p),
            host(&format!("/opt/cni/bin/{p}")),
        )
        .unwrap();
    }

    // The API: NADs (one with an ACL that drops ICMP) and the pods, on this node.
    let api = FakeApiServer::start_in(&node);
    api.put_nad_annotated(
        "pods",
        "mv",
        &json!({"cniVersion": "1.0.0", "type": "macvlan", "master": master, "mode": "bridge",
                "ipam": {"type": "host-local", "subnet": "10.79.1.0/24"}}),
        &BTreeMap::from([(
            "trellis.dev/acl".to_string(),
            r#"{"default": "allow", "rules": [{"action": "deny", "cidr": "10.79.1.0/24", "protocol": "icmp"}]}"#
                .to_string(),
        )]),
    );
    let br = trellis_rig::unique("trdx");
    api.put_nad(
        "pods",
        "br",
        &json!({"cniVersion": "1.0.0", "type": "bridge", "bridge": br,
                "ipam": {"type": "host-local", "subnet": "10.79.2.0/24"}}),
    );
    for (name, nets) in [("pod-a", "mv, br"), ("pod-b", "mv, br"), ("pod-c", "nope")] {
        api.put_pod(
            "pods",
            name,
            &format!("uid-pods-{name}"),
            NODE,
            &BTreeMap::from([("k8s.v1.cni.cncf.io/networks".to_string(), nets.to_string())]),
        );
    }

    // The DaemonSet's pod from the shipped manifest, its ConfigMap as shipped but for
    // the two edits the header explains.
    let objects = daemonset::load(&repo().join("deploy/trellis.yaml"));
    let ds = daemonset::find(&objects, "DaemonSet");
    let cm = daemonset::find(&objects, "ConfigMap");
    let mut files: BTreeMap<String, String> = cm["data"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let mut toml: toml::Table = files["agent.toml"].parse().unwrap();
    assert_eq!(toml["host_process"].as_str(), Some("/proc/1"));
    toml.insert(
        "host_process".into(),
        format!("/proc/{}", ctrd.pid()).into(),
    );
    toml["networks"]
        .as_table_mut()
        .unwrap()
        .insert("kubeconfig".into(), "/etc/trellis/kubeconfig".into());
    files.insert("agent.toml".into(), toml.to_string());
    files.insert("kubeconfig".into(), api.kubeconfig());
    let cm_name = cm["metadata"]["name"].as_str().unwrap().to_string();
    let pod = DaemonPod::new(ds, &BTreeMap::from([(cm_name, files)]), NODE, dir.path());
    // kubelet makes DirectoryOrCreate hostPaths.
    for v in ds["spec"]["template"]["spec"]["volumes"]
        .as_array()
        .unwrap()
    {
        if v["hostPath"]["type"] == "DirectoryOrCreate" {
            std::fs::create_dir_all(host(v["hostPath"]["path"].as_str().unwrap())).unwrap();
        }
    }
    let mut cri = ctrd.cri().await;
    let logs = dir.path().join("pod-logs").display().to_string();

    // A pod the node ran before trellis came: the runtime gave it the primary network
    // alone. Its DEL, later, goes through trellis, which has no record of it.
    let primary = host("/etc/cni/net.d/10-cluster.conflist");
    std::fs::write(&primary, primary_conf(&bridge, "1.0.0", false).to_string()).unwrap();
    let mut before_install = None;
    for _ in 0..50 {
        // containerd loads a new conf dir in the background.
        match cri.run_pod("pods", "pre", HashMap::new(), &logs).await {
            Ok(id) => {
                before_install = Some(id);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let before_install = before_install.expect("a pod on the primary network alone");
    std::fs::remove_file(&primary).unwrap();

    let sandbox = cri
        .run_pod_config(pod.sandbox())
        .await
        .unwrap_or_else(|e| panic!("RunPodSandbox (DaemonSet pod): {e}\n{}", ctrd.log()));

    // The init container waits for the node's primary conf, then wraps it.
    let install = cri
        .create_container(&sandbox, pod.container("install", 0, None), pod.sandbox())
        .await
        .unwrap_or_else(|e| panic!("CreateContainer install: {e}\n{}", ctrd.log()));
    cri.start_container(&install).await.unwrap();
    assert_eq!(
        wait_exit(&mut cri, &install, Duration::from_millis(1500)).await,
        None,
        "install did not wait for a primary conf: {}",
        pod.log("install", 0)
    );
    std::fs::write(&primary, primary_conf(&bridge, "1.0.0", false).to_string()).unwrap();
    let code = wait_exit(&mut cri, &install, Duration::from_secs(20)).await;
    assert_eq!(code, Some(0), "install: {}", pod.log("install", 0));
    assert!(host("/opt/cni/bin/trellis-cni").is_file());
    let conflist = read_json(&host("/etc/cni/net.d/00-trellis.conflist")).unwrap();
    assert_eq!(conflist["cniVersion"], "1.0.0");
    assert_eq!(conflist["plugins"][0]["type"], "trellis-cni");
    assert_eq!(conflist["plugins"][0]["socket"], "/run/trellis/cni.sock");

    let (agent, to_ready) = start_agent(&mut cri, &pod, &sandbox, 0, &node).await;
    eprintln!(
        "FIGURE agent container start to ready: {:.0} ms",
        to_ready.as_secs_f64() * 1e3
    );

    // Pods through CRI: the runtime calls trellis-cni, which asks the agent in its
    // container, which runs the delegates in the node's mount namespace.
    let mut pods = Vec::new();
    for name in ["pod-a", "pod-b"] {
        let id = cri
            .run_pod("pods", name, networks("mv, br"), &logs)
            .await
            .unwrap_or_else(|e| {
                panic!("RunPodSandbox {name}: {e}\nagent: {}", pod.log("agent", 0))
            });
        pods.push(id);
    }
    let state = host("/var/lib/trellis");
    let attachments = || -> Vec<Value> {
        let out = std::process::Command::new(trellis_rig::bins::trellis())
            .args(["attachments", "--json", "--state-dir"])
            .arg(&state)
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
    };
    let recs = attachments();
    assert_eq!(recs.len(), 2, "{recs:?}");
    let netns_of = |pod: &str| -> Netns {
        let r = recs.iter().find(|r| r["pod"] == pod).unwrap();
        Netns::at(host(r["netns"].as_str().unwrap()))
    };
    let (a, b) = (netns_of("pod-a"), netns_of("pod-b"));
    let mut links = a.links();
    links.sort();
    assert_eq!(links, ["eth0", "net1", "net2"]);
    let addr =
        |ns: &Netns, ifname: &str| ns.addrs(ifname)[0].split('/').next().unwrap().to_string();
    let (b_eth0, b_mv, b_br) = (addr(&b, "eth0"), addr(&b, "net1"), addr(&b, "net2"));
    assert!(b_eth0.starts_with("10.77.0."), "{b_eth0}");
    assert!(a.ping(&b_eth0), "cluster network");
    assert!(a.ping(&b_br), "the bridge NAD network");
    assert!(!a.ping(&b_mv), "the macvlan network's ACL drops ICMP");
    let bpf = host("/sys/fs/bpf/trellis");
    let before = trellis_stats(&bpf, &["--namespace", "pods", "--pod", "pod-b"]);
    let br_rx = counter(
        interface(&before, Some("pods/br"), "net2"),
        "ingress",
        "packets",
    );
    // Dropped where they leave pod-a.
    let mv_drops = || {
        let a = trellis_stats(&bpf, &["--namespace", "pods", "--pod", "pod-a"]);
        counter(interface(&a, Some("pods/mv"), "net1"), "egress", "drops")
    };
    let drops_before = mv_drops();
    assert!(br_rx > 0 && drops_before > 0, "{before:?}");

    // One API write per ADD by default: the network-status patch, no AddedInterface
    // events (`added_interface_events`, off in the shipped ConfigMap).
    let writes: Vec<String> = api
        .requests()
        .iter()
        .filter(|r| {
            (r.method != "GET" && r.path.contains("/pods/pod-a"))
                || (r.path.ends_with("/events") && r.body.contains("\"pod-a\""))
        })
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(
        writes,
        ["PATCH /api/v1/namespaces/pods/pods/pod-a/status"],
        "{writes:?}"
    );

    // A pod whose network does not exist: it does not start, and says why.
    let e = cri
        .run_pod("pods", "pod-c", networks("nope"), &logs)
        .await
        .expect_err("a pod on a NAD that does not exist");
    assert!(e.message().contains("nope"), "{e}");
    let failed = || {
        api.requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/events"))
            .map(|r| serde_json::from_str::<Value>(&r.body).unwrap())
            .any(|e| {
                e["reason"] == "FailedAddingInterface"
                    && e["type"] == "Warning"
                    && e["involvedObject"]["name"] == "pod-c"
                    && e["message"].as_str().is_some_and(|m| m.contains("nope"))
            })
    };
    wait_until(
        "FailedAddingInterface on pod-c",
        Duration::from_secs(20),
        failed,
    );

    // A first conf the runtime cannot load: no primary, not ready, conflist kept.
    let ready = &pod.container_spec("agent")["readinessProbe"];
    let kept = std::fs::read(host("/etc/cni/net.d/00-trellis.conflist")).unwrap();
    std::fs::write(host("/etc/cni/net.d/05-broken.conf"), "{").unwrap();
    wait_until("/readyz 503", Duration::from_secs(10), || {
        probe(&node, ready)
            .is_some_and(|(code, body)| code == 503 && body.contains("05-broken.conf"))
    });
    assert_eq!(
        std::fs::read(host("/etc/cni/net.d/00-trellis.conflist")).unwrap(),
        kept
    );
    std::fs::remove_file(host("/etc/cni/net.d/05-broken.conf")).unwrap();
    wait_until("/readyz 200 again", Duration::from_secs(10), || {
        matches!(probe(&node, ready), Some((200, _)))
    });

    // The primary conf changes (cniVersion, a capability): trellis's conflist follows.
    std::fs::write(
        host("/etc/cni/net.d/10-cluster.conflist"),
        primary_conf(&bridge, "0.4.0", true).to_string(),
    )
    .unwrap();
    wait_until(
        "00-trellis.conflist follows the primary",
        Duration::from_secs(10),
        || {
            read_json(&host("/etc/cni/net.d/00-trellis.conflist")).is_some_and(|c| {
                c["cniVersion"] == "0.4.0"
                    && c["plugins"][0]["capabilities"]["portMappings"] == true
            })
        },
    );
    std::fs::write(
        host("/etc/cni/net.d/10-cluster.conflist"),
        primary_conf(&bridge, "1.0.0", false).to_string(),
    )
    .unwrap();
    wait_until("and back", Duration::from_secs(10), || {
        read_json(&host("/etc/cni/net.d/00-trellis.conflist"))
            .is_some_and(|c| c["cniVersion"] == "1.0.0")
    });

    // Upgrade: the new pod's init container installs again over what is there (no
    // change), the agent container is stopped as kubelet stops it, a new one started.
    let conflist_before = std::fs::read(host("/etc/cni/net.d/00-trellis.conflist")).unwrap();
    let again = cri
        .create_container(&sandbox, pod.container("install", 1, None), pod.sandbox())
        .await
        .unwrap();
    cri.start_container(&again).await.unwrap();
    assert_eq!(
        wait_exit(&mut cri, &again, Duration::from_secs(20)).await,
        Some(0),
        "install again: {}",
        pod.log("install", 1)
    );
    assert_eq!(
        std::fs::read(host("/etc/cni/net.d/00-trellis.conflist")).unwrap(),
        conflist_before
    );
    cri.stop_container(&agent.id, 30).await.unwrap();
    cri.remove_container(&agent.id).await.unwrap();
    assert!(
        pod.log("agent", agent.attempt)
            .contains("trellis agent stopped"),
        "{}",
        pod.log("agent", agent.attempt)
    );
    let (agent, to_ready) = start_agent(&mut cri, &pod, &sandbox, 1, &node).await;
    eprintln!(
        "FIGURE agent container restart to ready: {:.0} ms",
        to_ready.as_secs_f64() * 1e3
    );
    assert_eq!(attachments().len(), 2);
    assert!(a.ping(&b_br));
    assert!(!a.ping(&b_mv), "the ACL still holds after the upgrade");
    let after = trellis_stats(&bpf, &["--namespace", "pods", "--pod", "pod-b"]);
    assert!(
        counter(
            interface(&after, Some("pods/br"), "net2"),
            "ingress",
            "packets"
        ) > br_rx
    );
    assert!(mv_drops() > drops_before);

    // DEL through the new agent leaves nothing; the pod from before the install is
    // deleted on the primary network.
    pods.push(before_install);
    for id in &pods {
        cri.stop_pod(id).await.unwrap();
        cri.remove_pod(id).await.unwrap();
    }
    assert!(attachments().is_empty(), "{:?}", attachments());
    let leases: Vec<_> = std::fs::read_dir(host("/var/lib/cni/networks"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
        .map(|e| e.file_name())
        .filter(|n| n.to_string_lossy().starts_with("10."))
        .collect();
    assert!(leases.is_empty(), "IP leases left: {leases:?}");
    assert!(trellis_stats(&bpf, &["--namespace", "pods"]).is_empty());

    // Uninstall: the init container's image and mounts, the other subcommand. Refused
    // while the agent runs; done once it is stopped.
    let mut cmd = pod.container_spec("install")["command"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect::<Vec<_>>();
    cmd[1] = "uninstall".into();
    for (attempt, agent_running) in [(2, true), (3, false)] {
        if !agent_running {
            cri.stop_container(&agent.id, 30).await.unwrap();
        }
        let un = cri
            .create_container(
                &sandbox,
                pod.container("install", attempt, Some(cmd.clone())),
                pod.sandbox(),
            )
            .await
            .unwrap();
        cri.start_container(&un).await.unwrap();
        let code = wait_exit(&mut cri, &un, Duration::from_secs(20)).await;
        let log = pod.log("install", attempt);
        if agent_running {
            assert!(
                code.is_some_and(|c| c != 0),
                "uninstall beside a running agent: {log}"
            );
            assert!(log.contains("agent.lock is held"), "{log}");
            assert!(host("/etc/cni/net.d/00-trellis.conflist").exists());
        } else {
            assert_eq!(code, Some(0), "uninstall: {log}");
        }
    }
    assert!(!host("/etc/cni/net.d/00-trellis.conflist").exists());
    assert!(!host("/opt/cni/bin/trellis-cni").exists());
    assert!(host("/etc/cni/net.d/10-cluster.conflist").exists());
    cri.stop_pod(&sandbox).await.unwrap();
    cri.remove_pod(&sandbox).await.unwrap();
}
