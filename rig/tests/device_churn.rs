//! The device side under churn, on real parts: the agent with its device plugin
//! (`[devices]`) over a fixture sysfs whose VFs (veths standing in for VF netdevs)
//! appear and vanish, a test kubelet that restarts, a PodResources table kubelet's
//! allocations come from, and pods added and deleted through the real shim, some of
//! them vanishing without a DEL. Rounds of random events; after each one:
//!
//! - the capacity the device plugin reports in ListAndWatch matches the fixture (also
//!   on the new stream after a kubelet restart); how soon is a figure, printed, not
//!   asserted (the poll is 500 ms; a loaded machine adds to it);
//! - a VF held by one pod is refused to a second pod kubelet (wrongly) gave it to: the
//!   ADD fails naming the device and leaves nothing;
//! - a pod whose netns was deleted without DEL has its VF back in the host as it was,
//!   its VF state, record and IPs gone, once the periodic sweep has seen it twice;
//! - VF state no record holds (left by an ADD whose undo failed) is released by the
//!   periodic sweep, the VF put back;
//! - every other pod, VF, record, IP and dataplane hook is where it should be.
//!
//! 100 rounds by default; `TRELLIS_CHURN_ROUNDS=N` for the long form,
//! `TRELLIS_CHURN_SEED` to replay one. `--nocapture` shows the figures.

use serde_json::json;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_devices::fixture::{vf_address, FixtureSysfs};
use trellis_rig::fake_kubelet::{
    pod_with_devices, serve_pod_resources_table, FakeKubelet, PodResourcesTable,
};
use trellis_rig::netns::Netns;
use trellis_rig::node::TestNode;
use trellis_rig::require_root;
use trellis_rig::rng::Rng;

/// The stand-in VFs' PF, made by the fixture.
const PF: &str = "0000:3b:00.0";
const RESOURCE: &str = "intel.com/vf";
/// How long the capacity kubelet sees may take to follow the fixture before the test
/// calls it wrong (the lag itself is a figure: ~0.5 s, the poll).
const CAPACITY_DEADLINE: Duration = Duration::from_secs(10);

/// A stand-in VF: its PCI address, host netdev and that netdev's MAC.
#[derive(Clone, Debug)]
struct Vf {
    name: String,
    mac: String,
}

struct Pod {
    container: String,
    name: String,
    netns: Netns,
    vf: String,
}

/// What the test kubelet last got from ListAndWatch, and when.
#[derive(Default)]
struct Seen {
    list: BTreeMap<String, String>,
    at: Option<Instant>,
}

#[derive(Default, Debug)]
struct Figures {
    rounds: usize,
    events: BTreeMap<&'static str, usize>,
    max_capacity_lag: Duration,
    max_restart_lag: Duration,
    recovered: usize,
    max_recovery: Duration,
    netns_kept_alive: usize,
    orphans_released: usize,
}

fn mac_of(ns: &Netns, ifname: &str) -> String {
    let out = ns.sh(&format!("ip -o link show dev {ifname}"));
    let w: Vec<&str> = out.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "link/ether").expect("a MAC");
    w[i + 1].to_string()
}

fn mtu_of(ns: &Netns, ifname: &str) -> String {
    let out = ns.sh(&format!("ip -o link show dev {ifname}"));
    let w: Vec<&str> = out.split_whitespace().collect();
    let i = w.iter().position(|x| *x == "mtu").expect("an MTU");
    w[i + 1].to_string()
}

/// Keeps one ListAndWatch stream open on the pool's socket, as kubelet does after a
/// registration, recording every list it is sent.
async fn watch(socket: PathBuf, seen: Arc<Mutex<Seen>>) {
    loop {
        if let Ok(ch) = trellis_device_plugin::uds::channel(&socket).await {
            let mut client = dp::device_plugin_client::DevicePluginClient::new(ch);
            if let Ok(s) = client.list_and_watch(dp::Empty {}).await {
                let mut stream = s.into_inner();
                while let Ok(Some(m)) = stream.message().await {
                    let mut s = seen.lock().unwrap();
                    s.list = m.devices.into_iter().map(|d| (d.id, d.health)).collect();
                    s.at = Some(Instant::now());
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

struct Churn {
    node: TestNode,
    fx: FixtureSysfs,
    rt: tokio::runtime::Runtime,
    kubelet: FakeKubelet,
    table: PodResourcesTable,
    seen: Arc<Mutex<Seen>>,
    watcher: tokio::task::JoinHandle<()>,
    /// VFs in the fixture, by address.
    vfs: BTreeMap<String, Vf>,
    pods: Vec<Pod>,
    next: usize,
    /// Dataplane hooks one pod (cluster network + VF) has live.
    hooks_per_pod: Option<usize>,
    figures: Figures,
}

impl Churn {
    fn new() -> Churn {
        let rt = tokio::runtime::Runtime::new().unwrap();
        let mut node = TestNode::new();
        node.dataplane = true;
        let fx = FixtureSysfs::new();
        let pools = node.path("devices.json");
        std::fs::write(
            &pools,
            r#"{"resourceList":[{"resourceName":"vf","selectors":{"devices":["10ca"]}}]}"#,
        )
        .unwrap();
        let plugin_dir = node.path("device-plugins");
        node.top_toml = format!(
            "sysfs_root = {:?}\npod_resources_socket = {:?}\nstale_sweep_secs = 1\n",
            fx.root(),
            node.path("pod-resources.sock")
        );
        node.devices_toml = Some(format!(
            "[devices]\nconfig = {pools:?}\nplugin_dir = {plugin_dir:?}\n"
        ));
        let conf = json!({
            "cniVersion": "1.0.0", "type": "sriov", "name": "sriov-net",
            "mtu": 1400, "mac": "02:00:00:00:be:ef",
            "ipam": {"type": "host-local", "subnet": "10.79.0.0/24", "dataDir": node.path("ipam")},
        });
        let nad = json!({
            "apiVersion": "k8s.cni.cncf.io/v1", "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": "sriov-net", "namespace": "pods",
                         "annotations": {"k8s.v1.cni.cncf.io/resourceName": RESOURCE}},
            "spec": {"config": conf.to_string()},
        });
        std::fs::write(
            node.path("nads/pods-sriov-net.json"),
            serde_json::to_vec(&nad).unwrap(),
        )
        .unwrap();
        let table = PodResourcesTable::default();
        let (kubelet, _) = {
            let _g = rt.enter();
            let k = FakeKubelet::start(&plugin_dir);
            let pr =
                serve_pod_resources_table(&node.path("pod-resources.sock"), table.clone(), true);
            (k, pr)
        };
        let seen = Arc::new(Mutex::new(Seen::default()));
        let watcher = rt.spawn(async {});
        let mut c = Churn {
            node,
            fx,
            rt,
            kubelet,
            table,
            seen,
            watcher,
            vfs: BTreeMap::new(),
            pods: Vec::new(),
            next: 0,
            hooks_per_pod: None,
            figures: Figures::default(),
        };
        for _ in 0..4 {
            c.add_vf();
        }
        let t = Instant::now();
        c.node.start_agent();
        c.rewatch(t);
        let t = Instant::now();
        c.check_capacity(t, "start");
        c
    }

    fn log(&self) -> String {
        self.node.agent_log()
    }

    /// Waits for the pool's next registration with the test kubelet (after `since`),
    /// then opens a new ListAndWatch stream on the endpoint it named.
    fn rewatch(&mut self, since: Instant) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let endpoint = loop {
            let r = self
                .kubelet
                .registrations()
                .into_iter()
                .rev()
                .find(|r| r.at >= since && r.request.resource_name == RESOURCE);
            if let Some(r) = r {
                break r.request.endpoint;
            }
            assert!(
                Instant::now() < deadline,
                "the pool did not register again within 10 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        self.watcher.abort();
        *self.seen.lock().unwrap() = Seen::default();
        let socket = self.kubelet.dir.join(endpoint);
        self.watcher = self.rt.spawn(watch(socket, self.seen.clone()));
    }

    /// The capacity kubelet sees matches the fixture (every VF, healthy) within
    /// `CAPACITY_DEADLINE` of `since`; returns how long it took.
    fn check_capacity(&mut self, since: Instant, what: &str) -> Duration {
        let want: BTreeMap<String, String> = self
            .vfs
            .keys()
            .map(|a| (a.clone(), "Healthy".to_string()))
            .collect();
        let deadline = since + CAPACITY_DEADLINE;
        loop {
            {
                let s = self.seen.lock().unwrap();
                if s.list == want {
                    let lag = s.at.unwrap().saturating_duration_since(since);
                    self.figures.max_capacity_lag = self.figures.max_capacity_lag.max(lag);
                    return lag;
                }
                assert!(
                    Instant::now() < deadline,
                    "{what}: kubelet sees {:?}, the fixture has {want:?}\n{}",
                    s.list,
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn free_vfs(&self) -> Vec<String> {
        self.vfs
            .keys()
            .filter(|a| !self.pods.iter().any(|p| &p.vf == *a))
            .cloned()
            .collect()
    }

    fn add_vf(&mut self) -> Option<String> {
        let addr = (0..32)
            .map(|i| vf_address(PF, i))
            .find(|a| !self.vfs.contains_key(a))?;
        let name = trellis_rig::unique("trv");
        self.node.host.sh(&format!(
            "ip link add {name} type veth peer name {name}p && ip link set {name}p up"
        ));
        let mac = mac_of(&self.node.host, &name);
        self.fx.add_standin_vf(&addr, &name);
        self.vfs.insert(addr.clone(), Vf { name, mac });
        Some(addr)
    }

    fn remove_vf(&mut self, addr: &str) {
        let vf = self.vfs.remove(addr).unwrap();
        self.fx.remove_standin_vf(addr);
        self.node.host.sh(&format!("ip link del {}", vf.name));
    }

    fn shim(
        &self,
        cmd: &str,
        container: &str,
        pod: &str,
        netns: &Path,
    ) -> trellis_rig::node::ShimOutcome {
        let ann = trellis_rig::node::networks_annotation("sriov-net");
        self.node.shim(
            cmd,
            container,
            &netns.to_string_lossy(),
            ("pods", pod),
            &self.node.shim_conf(Some(&ann)),
        )
    }

    fn new_pod_name(&mut self) -> (String, String) {
        self.next += 1;
        (format!("c{}", self.next), format!("p{}", self.next))
    }

    fn add_pod(&mut self, vf: String) {
        let (container, name) = self.new_pod_name();
        self.table
            .put(pod_with_devices("pods", &name, RESOURCE, &[&vf]));
        let netns = Netns::new("trp");
        let hooks = self.node.live_hooks();
        self.shim("ADD", &container, &name, &netns.path())
            .expect_ok(&format!("ADD {container} with {vf}"));
        assert!(
            netns.links().contains(&"net1".to_string()),
            "{vf} is not in pod {name}: {:?}",
            netns.links()
        );
        let per_pod = self.node.live_hooks() - hooks;
        assert_eq!(
            *self.hooks_per_pod.get_or_insert(per_pod),
            per_pod,
            "dataplane hooks of one pod"
        );
        self.pods.push(Pod {
            container,
            name,
            netns,
            vf,
        });
    }

    fn del_pod(&mut self, i: usize) {
        let p = self.pods.remove(i);
        self.shim("DEL", &p.container, &p.name, &p.netns.path())
            .expect_ok(&format!("DEL {}", p.container));
        self.table.remove("pods", &p.name);
    }

    /// kubelet wrongly hands a VF pod `i` holds to a new pod as well: its ADD fails
    /// naming the device, and leaves nothing.
    fn double_handout(&mut self, i: usize) {
        let vf = self.pods[i].vf.clone();
        let holder = self.pods[i].container.clone();
        let (container, name) = self.new_pod_name();
        self.table
            .put(pod_with_devices("pods", &name, RESOURCE, &[&vf]));
        let netns = Netns::new("trp");
        let ips = self.node.reservations();
        let (code, msg) = self
            .shim("ADD", &container, &name, &netns.path())
            .expect_err("ADD of a VF another pod holds");
        assert!(
            msg.contains(&format!("{vf} is already in use by container {holder}")),
            "code {code}: {msg}"
        );
        assert!(netns.links().is_empty(), "{:?}", netns.links());
        assert_eq!(self.node.reservations(), ips, "IPs of the refused pod");
        assert!(
            !self.node.records().contains(&format!("{container}.json")),
            "a record for the refused pod"
        );
        assert!(
            self.pods[i].netns.links().contains(&"net1".to_string()),
            "the holder lost its VF"
        );
        self.table.remove("pods", &name);
    }

    /// Pod `i`'s netns is deleted without a DEL. A real VF goes back to the host
    /// (down, under its pod name) once the kernel destroys the netns; a veth stand-in
    /// would die with it, so it is moved out as the kernel would move a VF. A probe
    /// veth with one end in the pod tells when the netns is really destroyed.
    fn vanish(&mut self, i: usize) {
        let p = self.pods.remove(i);
        let probe = trellis_rig::unique("prb");
        self.node.host.sh(&format!(
            "ip link add {probe} type veth peer name {probe}q netns {}",
            p.netns.name
        ));
        p.netns.sh(&format!(
            "ip link set net1 down && ip link set net1 netns {}",
            self.node.host.name
        ));
        self.table.remove("pods", &p.name);
        let deleted = Instant::now();
        drop(p.netns);
        let record = format!("{}.json", p.container);
        let state = self.node.state_dir().join(format!("vfs/{}.json", p.vf));
        let deadline = deleted + Duration::from_secs(15);
        let mut destroyed = None;
        let mut looked = Instant::now();
        // The VF's state goes when the sweep restores it: a real VF is back in the
        // host only once the netns is destroyed, so by then nothing may hold it.
        while state.exists() {
            if destroyed.is_none() && looked.elapsed() > Duration::from_millis(100) {
                if !self.node.host.links().contains(&probe) {
                    destroyed = Some(deleted.elapsed());
                }
                looked = Instant::now();
            }
            assert!(
                Instant::now() < deadline,
                "pod {} vanished without DEL: its VF not released within 15 s\n{}",
                p.container,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(2));
        }
        assert!(
            !self.node.host.links().contains(&probe),
            "pod {}: its VF was released while its deleted netns was still alive (a real VF would still be in it)\n{}",
            p.container,
            self.log()
        );
        while self.node.records().contains(&record) {
            assert!(
                Instant::now() < deadline,
                "pod {} vanished without DEL: its record not removed within 15 s\n{}",
                p.container,
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        let took = deleted.elapsed();
        let destroyed = destroyed.unwrap_or(took);
        if destroyed > Duration::from_millis(300) {
            // Something held the deleted netns (the dataplane's socket in the last
            // pod it worked on) until the sweep's first sighting let it go.
            self.figures.netns_kept_alive += 1;
        }
        self.figures.recovered += 1;
        self.figures.max_recovery = self.figures.max_recovery.max(took);
        let named = format!("container={} ", p.container);
        assert!(
            self.log()
                .lines()
                .any(|l| l.contains("pod vanished without DEL") && l.contains(&named)),
            "no log line naming {}",
            p.container
        );
        let _ = self
            .node
            .host
            .try_sh(&format!("ip link del {probe} 2>/dev/null"));
    }

    /// VF state left behind by no record (an ADD whose undo failed, then its record
    /// went): the periodic sweep puts the VF back and releases it, as at start-up.
    fn orphan_state(&mut self, vf: &str) {
        let v = &self.vfs[vf];
        let state = self.node.state_dir().join(format!("vfs/{vf}.json"));
        // Left as a pod had it (MTU 9000): only a real restore brings back the
        // recorded 1500 that check_state asks of every free VF.
        self.node
            .host
            .sh(&format!("ip link set {} mtu 9000", v.name));
        // Whole, as the agent writes it (a sweep may read it at any moment).
        let tmp = state.with_file_name(format!(".{vf}.json.tmp"));
        std::fs::write(
            &tmp,
            json!({"device": vf, "container_id": "ghost", "netns": "", "ifname": "net1",
                   "host": {"index": 1, "name": v.name, "mac": null, "mtu": 1500, "up": false},
                   "pf": null, "ipam": false})
            .to_string(),
        )
        .unwrap();
        std::fs::rename(&tmp, &state).unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while state.exists() {
            assert!(
                Instant::now() < deadline,
                "VF state of {vf} that no record holds is still there after 10 s\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        self.figures.orphans_released += 1;
    }

    /// Everything is where the pods and the fixture say.
    fn check_state(&self, what: &str) {
        let records: BTreeSet<String> = self.node.records().into_iter().collect();
        let want: BTreeSet<String> = self
            .pods
            .iter()
            .map(|p| format!("{}.json", p.container))
            .collect();
        assert_eq!(records, want, "{what}: records");
        let states: BTreeSet<String> = std::fs::read_dir(self.node.vf_claims().dir())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .collect();
        let want: BTreeSet<String> = self.pods.iter().map(|p| format!("{}.json", p.vf)).collect();
        assert_eq!(states, want, "{what}: VF state files");
        let ips = self.node.reservations();
        assert_eq!(ips.len(), 2 * self.pods.len(), "{what}: IPs {ips:?}");
        let host = self.node.host.links();
        for a in self.free_vfs() {
            let vf = &self.vfs[&a];
            assert!(
                host.contains(&vf.name),
                "{what}: {a} ({}) not in the host: {host:?}",
                vf.name
            );
            assert_eq!(mac_of(&self.node.host, &vf.name), vf.mac, "{what}: {a} MAC");
            assert_eq!(mtu_of(&self.node.host, &vf.name), "1500", "{what}: {a} MTU");
        }
        for p in &self.pods {
            let vf = &self.vfs[&p.vf];
            assert!(
                !host.contains(&vf.name),
                "{what}: {} in the host and in {}",
                p.vf,
                p.name
            );
            assert!(
                p.netns.links().contains(&"net1".to_string()),
                "{what}: {} lost its VF",
                p.name
            );
        }
        assert!(
            !host
                .iter()
                .any(|l| l.starts_with("net1") || l.starts_with("tv")),
            "{what}: stray links {host:?}"
        );
        if let Some(per) = self.hooks_per_pod {
            assert_eq!(
                self.node.live_hooks(),
                per * self.pods.len(),
                "{what}: dataplane hooks"
            );
        }
    }

    fn count(&mut self, event: &'static str) {
        *self.figures.events.entry(event).or_default() += 1;
    }
}

#[test]
fn the_device_side_under_churn() {
    require_root!();
    let rounds: usize = std::env::var("TRELLIS_CHURN_ROUNDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(100);
    let seed: u64 = std::env::var("TRELLIS_CHURN_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
                | 1
        });
    eprintln!("device churn: {rounds} rounds, seed {seed} (TRELLIS_CHURN_SEED to replay)");
    let mut rng = Rng::new(seed);
    let mut c = Churn::new();
    let started = Instant::now();
    let mut round = 0;
    while round < rounds {
        let pods = c.pods.len();
        let free = c.free_vfs().len();
        // Events that cannot happen now are drawn again: the fixture keeps 2 to 16
        // VFs, a pod needs a free one, the rest need a pod.
        let what = match rng.below(9) {
            0 if c.vfs.len() < 16 => {
                let t = Instant::now();
                let a = c.add_vf().expect("a free address");
                c.check_capacity(t, &format!("round {round}: {a} appeared"));
                "VF appeared"
            }
            1 if c.vfs.len() > 2 && free > 0 => {
                // Only a VF no pod holds goes (a driver refuses to drop VFs in use).
                let a = rng.pick(&c.free_vfs()).cloned().unwrap();
                let t = Instant::now();
                c.remove_vf(&a);
                c.check_capacity(t, &format!("round {round}: {a} vanished"));
                "VF vanished"
            }
            2 => {
                let t = {
                    let _g = c.rt.enter();
                    c.kubelet.restart()
                };
                c.rewatch(t);
                let lag = c.check_capacity(t, &format!("round {round}: kubelet restarted"));
                c.figures.max_restart_lag = c.figures.max_restart_lag.max(lag);
                "kubelet restarted"
            }
            3 | 4 if free > 0 => {
                let a = rng.pick(&c.free_vfs()).cloned().unwrap();
                c.add_pod(a);
                "pod ADD"
            }
            5 if pods > 0 => {
                c.del_pod(rng.below(pods as u64) as usize);
                "pod DEL"
            }
            6 if pods > 0 => {
                c.double_handout(rng.below(pods as u64) as usize);
                "VF handed to a second pod"
            }
            7 if pods > 0 => {
                // Half the time the newest pod: the dataplane may still hold a socket
                // in its netns.
                let i = if rng.below(2) == 0 {
                    pods - 1
                } else {
                    rng.below(pods as u64) as usize
                };
                c.vanish(i);
                "pod vanished without DEL"
            }
            8 if free > 0 => {
                let a = rng.pick(&c.free_vfs()).cloned().unwrap();
                c.orphan_state(&a);
                "VF state no record holds"
            }
            _ => continue,
        };
        round += 1;
        c.count(what);
        c.figures.rounds += 1;
        let t = Instant::now();
        c.check_capacity(t, &format!("round {round} ({what})"));
        c.check_state(&format!("round {round} ({what})"));
    }
    // The rest leave by DEL.
    while !c.pods.is_empty() {
        c.del_pod(0);
    }
    c.check_state("at the end");
    let f = &c.figures;
    eprintln!(
        "device churn: {} rounds in {:.1} s (seed {seed}); events: {}",
        f.rounds,
        started.elapsed().as_secs_f64(),
        f.events
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    eprintln!(
        "device churn: capacity right in ListAndWatch within {:?} at most (after a kubelet restart {:?}); \
         pods vanished without DEL recovered by the sweep: {} (slowest {:?} after the netns was deleted); \
         deleted netns kept alive past 0.3 s (until the sweep let it go): {}; \
         VF state no record held, released by the sweep: {}",
        f.max_capacity_lag, f.max_restart_lag, f.recovered, f.max_recovery, f.netns_kept_alive,
        f.orphans_released
    );
}
