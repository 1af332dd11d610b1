//! The endurance suite: pod lifecycles through real containerd (CRI), 4 at a time,
//! each pod on the cluster network and three NAD networks (a delegate network, one
//! with an ACL, one with a bandwidth limit), while faults are injected at random: a
//! delegate that fails or hangs past its timeout, the agent SIGKILLed (and started
//! again) in the middle of ADDs and DELs, containerd killed and restarted, the
//! kubelet (this driver) restarted, NADs edited or deleted mid-run, and now and then a
//! "reboot" (every process, pod netns and pin gone; the agent's state dir and the
//! IPAM store kept, as on disk).
//!
//! Every pod the runtime reports Ready must have exactly the interfaces its annotation
//! asks for. After each reboot and at the end, with no pod left, nothing of trellis's
//! may be left either: links, netns, IP reservations, VF state files, slots, ACL ids,
//! pins, records, processes. Prints the figures; exits 1 on any leak or violation.
//!
//! The last fifth of the lifecycles runs without faults, from a quiet node to a quiet
//! node: the agent's RSS and fd count over it say whether anything grows.
//!
//! `--lifecycles N` (default 1000; the test suite runs 100), `--seed S`.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_rig::containerd::Containerd;
use trellis_rig::cri::Cri;
use trellis_rig::figures::{arg, percentiles};
use trellis_rig::netns::Netns;
use trellis_rig::node::TestNode;
use trellis_rig::procfs::{self, fds};
use trellis_rig::rng::Rng;

const NAMESPACE: &str = "churn";
/// The interfaces every pod must have: the cluster network's and one per NAD.
const WANT_LINKS: [&str; 4] = ["eth0", "net1", "net2", "net3"];
/// What a hung delegate sleeps: far past its timeout.
const HANG: &str = "3599.5";
/// How long any CRI call may take before the driver calls it hung.
const CRI_LIMIT: Duration = Duration::from_secs(90);

/// What the workers (the kubelet's pod workers) share with the driver.
struct Shared {
    socket: PathBuf,
    log_dir: String,
    total: usize,
    next: AtomicUsize,
    done: AtomicUsize,
    adds_in_flight: AtomicUsize,
    dels_in_flight: AtomicUsize,
    add_ms: Mutex<Vec<f64>>,
    del_ms: Mutex<Vec<f64>>,
    add_errors: AtomicUsize,
    del_errors: AtomicUsize,
    /// Error messages of failed CRI calls, by their first words (what the faults did).
    /// Failed CRI calls by what caused them, with one message of each.
    error_kinds: Mutex<BTreeMap<String, (usize, String)>>,
    violations: Mutex<Vec<String>>,
}

impl Shared {
    fn error(&self, what: &str, e: &tonic::Status) {
        let mut kinds = self.error_kinds.lock().unwrap();
        let k = kinds
            .entry(format!("{what}: {}", error_kind(e.message())))
            .or_insert_with(|| (0, e.message().chars().take(400).collect()));
        k.0 += 1;
    }

    fn violation(&self, v: String) {
        eprintln!("VIOLATION: {v}");
        self.violations.lock().unwrap().push(v);
    }
}

/// What made a CRI call fail, in a few words: the fault behind it.
fn error_kind(msg: &str) -> &'static str {
    // The plugin's own words, after containerd's "... failed (add): ".
    let reason = msg
        .split_once("failed (add): ")
        .or_else(|| msg.split_once("failed (delete): "))
        .map_or(msg, |(_, r)| r);
    if reason.contains("agent not reachable") {
        "the agent was down"
    } else if reason.contains("injected delegate failure") {
        "a delegate failed (injected)"
    } else if reason.contains("did not finish within") {
        "a delegate hung and was killed on its timeout"
    } else if reason.contains("churn/plain not found")
        || reason.contains("NetworkAttachmentDefinition churn/plain")
    {
        "the NAD was deleted"
    } else if msg.contains("failed to reserve sandbox name") {
        "the name was still held by the pod's old sandbox"
    } else if msg.contains("transport error")
        || msg.contains("connection")
        || msg.contains("driver limit")
        || msg.contains("not initialized yet")
        || msg.starts_with("No such file or directory")
    {
        "containerd was down"
    } else if msg.contains("failed to forcibly stop sandbox") || msg.contains("not found") {
        "containerd lost the sandbox in a restart"
    } else {
        "other (see containerd's log)"
    }
}

fn annotations() -> HashMap<String, String> {
    HashMap::from([(
        "k8s.v1.cni.cncf.io/networks".to_string(),
        "plain, acl, bw".to_string(),
    )])
}

async fn connect(sh: &Shared, cri: &mut Option<Cri>) -> bool {
    if cri.is_none() {
        *cri = Cri::connect(sh.socket.clone()).await.ok();
    }
    cri.is_some()
}

/// A CRI call under the driver's limit: a call that never returns is a violation.
async fn limited<T>(
    sh: &Shared,
    what: &str,
    f: impl std::future::Future<Output = Result<T, tonic::Status>>,
) -> Result<T, tonic::Status> {
    match tokio::time::timeout(CRI_LIMIT, f).await {
        Ok(r) => r,
        Err(_) => {
            sh.violation(format!("{what} did not return in {CRI_LIMIT:?}"));
            Err(tonic::Status::deadline_exceeded("driver limit"))
        }
    }
}

/// The pod's interfaces as its netns has them, sorted.
fn links_of(netns: &str) -> Vec<String> {
    let mut l = Netns::at(netns).links();
    l.sort();
    l
}

/// Checks a Ready sandbox: exactly the interfaces the annotation asks for, each with
/// an address.
async fn verify(sh: &Shared, cri: &mut Cri, id: &str, name: &str) {
    let path = match limited(sh, "PodSandboxStatus", cri.netns_path(id)).await {
        Ok(Some(p)) => p,
        Ok(None) => return sh.violation(format!("{name}: Ready without a netns")),
        Err(e) => return sh.error("status", &e),
    };
    let links = links_of(&path);
    if links != WANT_LINKS {
        return sh.violation(format!("{name}: Ready with interfaces {links:?}"));
    }
    let ns = Netns::at(&path);
    for l in WANT_LINKS {
        if ns.addrs(l).is_empty() {
            sh.violation(format!("{name}: {l} has no address"));
        }
    }
}

/// Stops and removes sandbox `id` as the kubelet does, retrying until both succeed
/// (each retry a new CRI connection if the last one failed). The StopPodSandbox that
/// succeeded is timed.
async fn tear_down(sh: &Shared, cri: &mut Option<Cri>, id: &str) {
    let mut backoff = Duration::from_millis(50);
    let mut stopped = false;
    loop {
        if !connect(sh, cri).await {
            tokio::time::sleep(backoff).await;
            continue;
        }
        let c = cri.as_mut().unwrap();
        if !stopped {
            sh.dels_in_flight.fetch_add(1, SeqCst);
            let t = Instant::now();
            let r = limited(sh, "StopPodSandbox", c.stop_pod(id)).await;
            sh.dels_in_flight.fetch_sub(1, SeqCst);
            match r {
                // Gone already (containerd lost it in a restart): as the kubelet takes it.
                Err(e) if e.code() == tonic::Code::NotFound => return,
                Ok(()) => {
                    sh.del_ms
                        .lock()
                        .unwrap()
                        .push(t.elapsed().as_secs_f64() * 1e3);
                    stopped = true;
                }
                Err(e) => {
                    sh.del_errors.fetch_add(1, SeqCst);
                    sh.error("StopPodSandbox", &e);
                    *cri = None;
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(2));
                    continue;
                }
            }
        }
        match limited(sh, "RemovePodSandbox", c.remove_pod(id)).await {
            Ok(()) => return,
            Err(e) if e.code() == tonic::Code::NotFound => return,
            Err(e) => {
                sh.error("RemovePodSandbox", &e);
                *cri = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// Removes every sandbox named `name` (one a failed RunPodSandbox left NotReady), as
/// the kubelet kills a pod's old sandbox before it makes a new one.
async fn remove_named(sh: &Shared, cri: &mut Option<Cri>, name: &str) {
    if !connect(sh, cri).await {
        return;
    }
    let Ok(pods) = limited(
        sh,
        "ListPodSandbox",
        cri.as_mut().unwrap().list_pod_states(),
    )
    .await
    else {
        *cri = None;
        return;
    };
    for (id, n, _) in pods {
        if n == name {
            tear_down(sh, cri, &id).await;
        }
    }
}

/// One pod's life: RunPodSandbox until it is Ready (the kubelet retries), checked,
/// held a moment, then stopped and removed.
async fn lifecycle(sh: &Shared, cri: &mut Option<Cri>, i: usize, hold: Duration) {
    let name = format!("p{i}");
    let mut backoff = Duration::from_millis(50);
    let id = loop {
        if !connect(sh, cri).await {
            tokio::time::sleep(backoff).await;
            continue;
        }
        sh.adds_in_flight.fetch_add(1, SeqCst);
        let t = Instant::now();
        let r = limited(
            sh,
            "RunPodSandbox",
            cri.as_mut()
                .unwrap()
                .run_pod(NAMESPACE, &name, annotations(), &sh.log_dir),
        )
        .await;
        sh.adds_in_flight.fetch_sub(1, SeqCst);
        match r {
            Ok(id) => {
                sh.add_ms
                    .lock()
                    .unwrap()
                    .push(t.elapsed().as_secs_f64() * 1e3);
                break id;
            }
            Err(e) => {
                sh.add_errors.fetch_add(1, SeqCst);
                sh.error("RunPodSandbox", &e);
                *cri = None;
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                remove_named(sh, cri, &name).await;
            }
        }
    };
    if connect(sh, cri).await {
        verify(sh, cri.as_mut().unwrap(), &id, &name).await;
    }
    tokio::time::sleep(hold).await;
    tear_down(sh, cri, &id).await;
    sh.done.fetch_add(1, SeqCst);
}

async fn worker(sh: Arc<Shared>, seed: u64) {
    let mut rng = Rng::new(seed);
    let mut cri = None;
    while sh.done.load(SeqCst) < sh.total {
        let i = sh.next.fetch_add(1, SeqCst);
        lifecycle(&sh, &mut cri, i, rng.ms(0, 100)).await;
    }
}

/// The kubelet's start-up: every sandbox the runtime has is looked at; a Ready one
/// is checked (and, its pod being done here, stopped and removed: a lifecycle), any
/// other stopped and removed.
async fn kubelet_sync(sh: &Shared) {
    let mut cri = None;
    let pods = loop {
        if connect(sh, &mut cri).await {
            match limited(
                sh,
                "ListPodSandbox",
                cri.as_mut().unwrap().list_pod_states(),
            )
            .await
            {
                Ok(p) => break p,
                Err(_) => cri = None,
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for (id, name, ready) in pods {
        if ready && connect(sh, &mut cri).await {
            verify(sh, cri.as_mut().unwrap(), &id, &name).await;
        }
        tear_down(sh, &mut cri, &id).await;
        if ready {
            sh.done.fetch_add(1, SeqCst);
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    DelegateFails,
    DelegateHangs,
    AgentKilled,
    ContainerdRestarted,
    KubeletRestarted,
    NadEdited,
    NadDeleted,
    Reboot,
}

const FAULTS: [(Fault, u64); 7] = [
    (Fault::DelegateFails, 4),
    (Fault::DelegateHangs, 2),
    (Fault::AgentKilled, 4),
    (Fault::ContainerdRestarted, 2),
    (Fault::KubeletRestarted, 2),
    (Fault::NadEdited, 3),
    (Fault::NadDeleted, 2),
];

/// The node under test and what the faults reach into.
struct Rig {
    // Dropped first: its pods are removed while the agent still runs.
    ctrd: Containerd,
    node: TestNode,
    /// The NADs' bridges (made by the bridge plugin in the node's netns).
    bridges: Vec<String>,
    fault_file: PathBuf,
    pins: Vec<String>,
    nad_version: u64,
}

fn acl(version: u64) -> String {
    // Every other edit denies one more port: the ACL changes under live pods.
    let mut rules = vec![serde_json::json!(
        {"action": "deny", "cidr": "0.0.0.0/0", "direction": "ingress", "protocol": "tcp", "ports": "9"})];
    if version % 2 == 1 {
        rules.push(serde_json::json!(
            {"action": "deny", "cidr": "10.81.0.0/16", "direction": "egress", "protocol": "udp", "ports": "7"}));
    }
    serde_json::json!({"default": "allow", "rules": rules}).to_string()
}

fn bandwidth(version: u64) -> String {
    let rate = if version % 2 == 1 {
        50_000_000
    } else {
        100_000_000
    };
    serde_json::json!({"ingressRate": rate, "ingressBurst": 1_000_000,
                       "egressRate": rate, "egressBurst": 1_000_000})
    .to_string()
}

impl Rig {
    fn write_nads(&mut self) {
        let node = &self.node;
        let mut plain = node.bridge_conf("plain", &self.bridges[0], "10.80.0.0/16");
        plain["plugins"][0]["type"] = "churn-bridge".into();
        node.add_nad(NAMESPACE, "plain", &plain);
        self.write_edited_nads();
    }

    fn write_edited_nads(&self) {
        let node = &self.node;
        let v = self.nad_version;
        node.add_nad_annotated(
            NAMESPACE,
            "acl",
            &node.macvlan_conf("10.81.0.0/16"),
            &BTreeMap::from([("trellis.dev/acl".to_string(), acl(v))]),
        );
        node.add_nad_annotated(
            NAMESPACE,
            "bw",
            &node.bridge_conf("bw", &self.bridges[1], "10.82.0.0/16"),
            &BTreeMap::from([("trellis.dev/bandwidth".to_string(), bandwidth(v))]),
        );
    }

    fn agent_pid(&self) -> u32 {
        self.node.agent.as_ref().map_or(0, |a| a.pid())
    }

    /// What a node loses in a power cut: every process (the agent, containerd, its
    /// shims and containers), the pods' netns, the links the delegates made, bpffs.
    /// Kept, as on disk: the agent's state dir, the IPAM store, containerd's root.
    fn reboot(&mut self) {
        self.node.stop_agent();
        self.ctrd.power_off();
        for b in &self.bridges {
            let _ = self.node.host.try_sh(&format!("ip link del {b}"));
        }
        let _ = self
            .node
            .host
            .try_sh(&format!("ip link del {}", self.node.bridge));
        let _ = std::fs::remove_dir_all(&self.node.bpf_dir);
        self.node.start_agent();
        self.ctrd.restart(&self.node.host);
    }

    /// Everything of a pod that must be gone when no pod is left; empty when clean.
    fn leftovers(&self) -> Vec<String> {
        let node = &self.node;
        let mut left = Vec::new();
        let mut push = |what: &str, items: Vec<String>| {
            if !items.is_empty() {
                left.push(format!("{what}: {items:?}"));
            }
        };
        push("records", node.records());
        push("IP reservations", node.reservations());
        push(
            "host links",
            node.host_links()
                .into_iter()
                .filter(|l| !self.bridges.contains(l))
                .collect(),
        );
        push("netns mounts", self.ctrd.netns_mounts());
        push("VF state files", list(node.vf_claims().dir()));
        let dataplane = match trellis_agent::dataplane::occupancy(&node.bpf_dir) {
            Ok(o) if o == Default::default() => Vec::new(),
            Ok(o) => vec![format!("{o:?}")],
            Err(e) => vec![format!("pins unreadable: {e}")],
        };
        push("dataplane", dataplane);
        let pins = list(&node.bpf_dir);
        push(
            "pins changed",
            if pins == self.pins { Vec::new() } else { pins },
        );
        push("processes", leftover_processes(node));
        left
    }

    /// containerd's own leftovers: shims of sandboxes it lost track of when it was
    /// killed mid-RunPodSandbox (not trellis's; reported beside the leaks).
    fn runtime_leftovers(&self) -> Vec<String> {
        self.ctrd
            .shims()
            .iter()
            .map(|p| format!("containerd shim {p}"))
            .collect()
    }
}

fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

/// Delegates still running (processes with CNI env naming this node's plugin dirs:
/// the shim containerd runs, the plugins the agent runs, a hung plugin's sleeper).
fn leftover_processes(node: &TestNode) -> Vec<String> {
    // The agent's plugin dir and containerd's are both in the node's dir.
    let bin = node.dir.path().display().to_string();
    let mut out = Vec::new();
    for p in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = p.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let cmdline = std::fs::read(p.path().join("cmdline")).unwrap_or_default();
        let cmd = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let env =
            String::from_utf8_lossy(&std::fs::read(p.path().join("environ")).unwrap_or_default())
                .into_owned();
        let delegate = env.contains("CNI_COMMAND=") && env.contains(&bin);
        // A hung delegate's sleeper has the delegate's environment.
        if delegate {
            out.push(format!("{pid} {}", cmd.trim_end()));
        }
    }
    out
}

fn rss_kib(pid: u32) -> u64 {
    procfs::status(pid, "VmRSS:").unwrap_or(0)
}

/// Waits (up to 10 s) for the node to settle with no pod: shims exiting, the agent
/// finishing background work. What is left then is a leak.
fn settled_leftovers(rig: &Rig) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = rig.leftovers();
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn spawn_workers(sh: &Arc<Shared>, rng: &mut Rng) -> Vec<tokio::task::JoinHandle<()>> {
    (0..4)
        .map(|_| tokio::spawn(worker(sh.clone(), rng.next_u64())))
        .collect()
}

fn stats(v: &[f64]) -> String {
    let [p50, p99, max] = percentiles(v.to_vec(), [0.5, 0.99, 1.0]);
    format!(
        "p50 {p50:.0} ms, p99 {p99:.0} ms, max {max:.0} ms (n={})",
        v.len()
    )
}

#[tokio::main(flavor = "multi_thread", worker_threads = 4)]
async fn main() {
    if !trellis_rig::is_root() {
        eprintln!("trellis-churn: needs root (network namespaces, containerd)");
        std::process::exit(2);
    }
    let total: usize = arg("--lifecycles").unwrap_or(1000);
    let seed: u64 = arg("--seed").unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64
    });
    // A reboot every 250 lifecycles, and at least one (half way) in a short run.
    let reboot_every = (total / 2).clamp(1, 250);
    let mut rng = Rng::new(seed);

    let mut node = TestNode::new();
    node.dataplane = true;
    node.delegate_timeout_secs = 2;
    node.write_default_network(&node.bridge_conf("cluster", &node.bridge, "10.77.0.0/16"));
    let fault_file = node.path("fault");
    // The delegate network's plugin: the bridge plugin, unless a fault is waiting
    // (taken by one call only: the rename is atomic).
    node.add_plugin_script(
        "churn-bridge",
        &format!(
            "f={f}\nif mv \"$f\" \"$f.$$\" 2>/dev/null; then\n  case \"$(cat \"$f.$$\")\" in\n    fail) rm -f \"$f.$$\"; echo '{{\"cniVersion\":\"1.0.0\",\"code\":11,\"msg\":\"injected delegate failure\"}}'; exit 1;;\n    hang) rm -f \"$f.$$\"; exec sleep {HANG};;\n  esac\nfi\nexec /usr/lib/cni/bridge",
            f = fault_file.display()
        ),
    );
    node.start_agent();
    let ctrd = Containerd::start(&node.host, &node.path("containerd"), &node.socket());
    let bridges = vec![trellis_rig::unique("trcp"), trellis_rig::unique("trcb")];
    let mut rig = Rig {
        node,
        ctrd,
        bridges,
        fault_file,
        pins: Vec::new(),
        nad_version: 0,
    };
    rig.write_nads();
    rig.pins = list(&rig.node.bpf_dir);

    let sh = Arc::new(Shared {
        socket: rig.ctrd.socket.clone(),
        log_dir: rig.ctrd.log_dir(),
        total,
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        adds_in_flight: AtomicUsize::new(0),
        dels_in_flight: AtomicUsize::new(0),
        add_ms: Mutex::new(Vec::new()),
        del_ms: Mutex::new(Vec::new()),
        add_errors: AtomicUsize::new(0),
        del_errors: AtomicUsize::new(0),
        error_kinds: Mutex::new(BTreeMap::new()),
        violations: Mutex::new(Vec::new()),
    });
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let (mut kills_in_add, mut kills_in_del) = (0, 0);
    let mut leaks: Vec<String> = Vec::new();
    // (lifecycles done, agent pid, RSS KiB, fds), between faults.
    let mut samples: Vec<(usize, u32, u64, usize)> = Vec::new();
    let started = Instant::now();
    let mut next_reboot = reboot_every;
    let mut workers = spawn_workers(&sh, &mut rng);
    let weights: u64 = FAULTS.iter().map(|f| f.1).sum();

    // The last fifth runs without faults: the agent's RSS and fds over it, one
    // process from a quiet start to a quiet end, say whether anything grows.
    let calm = total / 5;
    while sh.done.load(SeqCst) < total - calm {
        tokio::time::sleep(rng.ms(200, 1200)).await;
        let done = sh.done.load(SeqCst);
        let pid = rig.agent_pid();
        samples.push((done, pid, rss_kib(pid), fds(pid)));
        if done >= total - calm {
            break;
        }
        let fault = if done >= next_reboot && next_reboot < total {
            next_reboot += reboot_every;
            Fault::Reboot
        } else {
            let mut pick = rng.below(weights);
            FAULTS
                .iter()
                .find(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap()
                .0
        };
        *faults.entry(fault).or_default() += 1;
        match fault {
            Fault::DelegateFails => std::fs::write(&rig.fault_file, "fail").unwrap(),
            Fault::DelegateHangs => std::fs::write(&rig.fault_file, "hang").unwrap(),
            Fault::AgentKilled => {
                kills_in_add += sh.adds_in_flight.load(SeqCst).min(1);
                kills_in_del += sh.dels_in_flight.load(SeqCst).min(1);
                rig.node.stop_agent();
                tokio::time::sleep(rng.ms(0, 500)).await;
                rig.node.start_agent();
            }
            Fault::ContainerdRestarted => rig.ctrd.restart(&rig.node.host),
            Fault::KubeletRestarted => {
                for w in workers.drain(..) {
                    w.abort();
                    let _ = w.await;
                }
                sh.adds_in_flight.store(0, SeqCst);
                sh.dels_in_flight.store(0, SeqCst);
                kubelet_sync(&sh).await;
                workers = spawn_workers(&sh, &mut rng);
            }
            Fault::NadEdited => {
                rig.nad_version += 1;
                rig.write_edited_nads();
            }
            Fault::NadDeleted => {
                let f = rig.node.path(&format!("nads/{NAMESPACE}-plain.json"));
                let saved = std::fs::read(&f).unwrap();
                std::fs::remove_file(&f).unwrap();
                tokio::time::sleep(rng.ms(300, 1000)).await;
                std::fs::write(&f, saved).unwrap();
            }
            Fault::Reboot => {
                for w in workers.drain(..) {
                    w.abort();
                    let _ = w.await;
                }
                sh.adds_in_flight.store(0, SeqCst);
                sh.dels_in_flight.store(0, SeqCst);
                rig.reboot();
                // The rename that marks a taken fault survives too: a fresh start.
                let _ = std::fs::remove_file(&rig.fault_file);
                kubelet_sync(&sh).await;
                rig.pins = list(&rig.node.bpf_dir);
                let left = settled_leftovers(&rig);
                eprintln!(
                    "reboot at {} lifecycles: {}",
                    sh.done.load(SeqCst),
                    if left.is_empty() {
                        "nothing left".to_string()
                    } else {
                        left.join("; ")
                    }
                );
                leaks.extend(left.into_iter().map(|l| format!("after a reboot: {l}")));
                workers = spawn_workers(&sh, &mut rng);
            }
        }
    }
    // The faults end: the kubelet's look, then a quiet node.
    for w in workers.drain(..) {
        w.abort();
        let _ = w.await;
    }
    let _ = std::fs::remove_file(&rig.fault_file);
    kubelet_sync(&sh).await;
    let left = settled_leftovers(&rig);
    leaks.extend(left.into_iter().map(|l| format!("after the faults: {l}")));
    let quiet = |rig: &Rig, sh: &Shared| {
        let pid = rig.agent_pid();
        (sh.done.load(SeqCst), pid, rss_kib(pid), fds(pid))
    };
    let calm_start = quiet(&rig, &sh);
    let anon = |rig: &Rig| procfs::status(rig.agent_pid(), "RssAnon:").unwrap_or(0);
    let mut calm_anon = vec![anon(&rig)];
    let calm_workers = spawn_workers(&sh, &mut rng);
    // The agent's own memory at each tenth of the calm run: growth that levels off
    // is warm-up, growth that does not is a leak.
    let mut next_look = calm_start.0 + calm.div_ceil(10).max(1);
    while sh.done.load(SeqCst) < total {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if sh.done.load(SeqCst) >= next_look {
            calm_anon.push(anon(&rig));
            next_look += calm.div_ceil(10).max(1);
        }
    }
    for w in calm_workers {
        let _ = w.await;
    }
    let elapsed = started.elapsed();
    // The kubelet's last look: nothing may be running or left half-made.
    kubelet_sync(&sh).await;
    let left = settled_leftovers(&rig);
    leaks.extend(left.into_iter().map(|l| format!("at the end: {l}")));
    let runtime_left = rig.runtime_leftovers();
    let calm_end = quiet(&rig, &sh);
    calm_anon.push(anon(&rig));
    // An fd per request, kept: the one growth judged here (memory settles slowly and
    // is printed for the reader).
    if calm_start.1 == calm_end.1 && calm_end.3 > calm_start.3 + 2 {
        leaks.push(format!(
            "agent fds {} -> {} over the calm run, from a quiet node to a quiet node",
            calm_start.3, calm_end.3
        ));
    }
    samples.push(calm_end);

    let done = sh.done.load(SeqCst);
    println!("trellis-churn: {done} pod lifecycles through containerd, 4 at a time, seed {seed}");
    println!(
        "  each pod: cluster network + 3 NAD networks (delegate, ACL, bandwidth limit); dataplane on"
    );
    println!(
        "  {:.1} s, {:.2} pods/s",
        elapsed.as_secs_f64(),
        done as f64 / elapsed.as_secs_f64()
    );
    let faults_line: Vec<String> = faults.iter().map(|(f, n)| format!("{f:?} {n}")).collect();
    println!("  faults: {}", faults_line.join(", "));
    println!(
        "  agent kills with an ADD in flight: {kills_in_add}, with a DEL in flight: {kills_in_del}"
    );
    println!(
        "  ADD (RunPodSandbox that succeeded): {}",
        stats(&sh.add_ms.lock().unwrap())
    );
    println!(
        "  DEL (StopPodSandbox that succeeded): {}",
        stats(&sh.del_ms.lock().unwrap())
    );
    println!(
        "  CRI calls failed by faults and retried: {} RunPodSandbox, {} StopPodSandbox",
        sh.add_errors.load(SeqCst),
        sh.del_errors.load(SeqCst)
    );
    for (k, (n, example)) in sh.error_kinds.lock().unwrap().iter() {
        println!("    {n:>4}  {k}");
        if k.contains("other") {
            println!("          e.g. {example}");
        }
    }
    println!(
        "  agent RSS under faults: max {:.1} MiB; the agent was started {} times",
        samples.iter().map(|s| s.2).max().unwrap_or(0) as f64 / 1024.0,
        faults.get(&Fault::AgentKilled).copied().unwrap_or(0)
            + faults.get(&Fault::Reboot).copied().unwrap_or(0)
            + 1
    );
    println!(
        "  agent over the last {} lifecycles, no faults (quiet node at both ends{}): RSS {:.1} -> {:.1} MiB, fds {} -> {}",
        calm_end.0 - calm_start.0,
        if calm_start.1 == calm_end.1 { ", one process" } else { ", NOT one process" },
        calm_start.2 as f64 / 1024.0,
        calm_end.2 as f64 / 1024.0,
        calm_start.3,
        calm_end.3
    );
    let anon_mib: Vec<String> = calm_anon
        .iter()
        .map(|k| format!("{:.1}", *k as f64 / 1024.0))
        .collect();
    println!(
        "    its own memory (RssAnon) at each tenth of it, MiB: {}",
        anon_mib.join(" ")
    );
    let violations = sh.violations.lock().unwrap().clone();
    println!("  pods Ready without every network: {}", violations.len());
    println!("  leaks: {}", leaks.len());
    println!(
        "  containerd's own leftovers (not trellis's): {}",
        if runtime_left.is_empty() {
            "none".to_string()
        } else {
            runtime_left.join(", ")
        }
    );
    for l in leaks.iter().chain(violations.iter()) {
        println!("    {l}");
    }
    if !leaks.is_empty() || !violations.is_empty() {
        // The logs kept for a look; the node itself is taken down.
        let kept = PathBuf::from(format!("/tmp/trellis-churn-{seed}"));
        let _ = std::fs::create_dir_all(&kept);
        let _ = std::fs::copy(rig.node.path("agent.log"), kept.join("agent.log"));
        let _ = std::fs::copy(
            rig.ctrd.dir.join("containerd.log"),
            kept.join("containerd.log"),
        );
        eprintln!("logs kept in {}", kept.display());
        drop(rig);
        std::process::exit(1);
    }
}
