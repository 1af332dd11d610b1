//! A node on real parts for one test: a "host" netns where the agent and its delegates
//! run, the agent's config and dirs in a temp dir, NAD files, and calls through the
//! real `trellis-cni` shim as a runtime makes them.

use crate::agent::AgentProcess;
use crate::netns::Netns;
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Debian's reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

pub struct TestNode {
    pub dir: tempfile::TempDir,
    pub host: Netns,
    pub agent: Option<AgentProcess>,
    /// A veth in the host netns that macvlan networks hang off.
    pub master: String,
    /// The default network's bridge.
    pub bridge: String,
    pub delegate_timeout_secs: u64,
    /// The agent's `[networks]` table; NAD files in the temp dir unless set.
    pub networks_toml: Option<String>,
    /// A `[devices]` table for the agent, if any.
    pub devices_toml: Option<String>,
    /// Top-level agent config lines (before the tables), e.g. `sysfs_root = "..."`.
    pub top_toml: String,
    /// `default_network = ...` as TOML; default: the node's conflist file.
    pub default_network_toml: Option<String>,
    /// This node's own bpffs dir for the dataplane's pins (removed on drop).
    pub bpf_dir: PathBuf,
    /// Whether the agent attaches the eBPF dataplane (off by default, as in the agent).
    pub dataplane: bool,
    /// The agent's `[nad_policy]` table. The rig's NADs use plugin scripts and keep
    /// host-local's store in the node's temp dir (`dataDir`): both allowed here; empty
    /// gives the agent's default policy.
    pub nad_policy_toml: String,
}

/// The rig's NAD policy: any plugin, and `dataDir` allowed.
pub const RIG_NAD_POLICY: &str = "[nad_policy]\nplugins = [\"*\"]\ndenied_keys = [\"daemonSocketPath\", \"device\", \"pciBusID\", \"kernelpath\", \"delegate\", \"delegates\"]\n";

impl Drop for TestNode {
    fn drop(&mut self) {
        self.agent = None;
        // Removing the pins detaches whatever the agent left attached.
        let _ = std::fs::remove_dir_all(&self.bpf_dir);
    }
}

/// What the shim printed and whether it exited 0.
#[derive(Debug)]
pub struct ShimOutcome {
    pub ok: bool,
    pub json: Value,
    pub stdout: String,
}

impl ShimOutcome {
    pub fn expect_ok(self, what: &str) -> Value {
        assert!(self.ok, "{what} failed: {}", self.stdout);
        self.json
    }

    pub fn expect_err(self, what: &str) -> (u64, String) {
        assert!(
            !self.ok,
            "{what} should have failed but returned {}",
            self.stdout
        );
        (
            self.json["code"].as_u64().unwrap_or(0),
            self.json["msg"].as_str().unwrap_or_default().to_string()
                + " "
                + self.json["details"].as_str().unwrap_or_default(),
        )
    }
}

impl TestNode {
    pub fn new() -> TestNode {
        let dir = tempfile::Builder::new()
            .prefix("trellis-rig")
            .tempdir()
            .expect("tempdir");
        for d in ["nads", "state", "bin", "ipam"] {
            std::fs::create_dir_all(dir.path().join(d)).expect("mkdir");
        }
        let host = Netns::new("trh");
        let master = crate::unique("trm");
        // No IPv6 of its own on the master pair: its router solicitations and MLD
        // reports would reach every macvlan on it, at random moments, into the counts
        // tests compare (the pods' own macvlans keep whatever their netns has).
        host.sh(&format!(
            "ip link add {master} type veth peer name {master}p && {{ sysctl -qw net.ipv6.conf.{master}.disable_ipv6=1 net.ipv6.conf.{master}p.disable_ipv6=1 2>/dev/null || true; }} && ip link set {master} up && ip link set {master}p up"
        ));
        let bridge = crate::unique("trb");
        let node = TestNode {
            dir,
            host,
            agent: None,
            master,
            bridge,
            delegate_timeout_secs: 10,
            networks_toml: None,
            devices_toml: None,
            top_toml: String::new(),
            default_network_toml: None,
            bpf_dir: PathBuf::from(format!("/sys/fs/bpf/{}", crate::unique("trellis-node"))),
            dataplane: false,
            nad_policy_toml: RIG_NAD_POLICY.into(),
        };
        node.write_default_network(&node.bridge_conf("cluster", &node.bridge, "10.77.0.0/24"));
        node
    }

    pub fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    pub fn socket(&self) -> PathBuf {
        self.path("cni.sock")
    }

    /// The agent's VF claims (`<state dir>/vfs`), as the device plugin sees them.
    pub fn vf_claims(&self) -> trellis_devices::VfClaims {
        trellis_devices::VfClaims::under(&self.state_dir())
    }

    pub fn state_dir(&self) -> PathBuf {
        self.path("state")
    }

    /// A conflist: bridge + host-local with its store inside the temp dir.
    pub fn bridge_conf(&self, name: &str, bridge: &str, subnet: &str) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "name": name,
            "plugins": [{
                "type": "bridge", "bridge": bridge, "isGateway": true,
                "ipam": {"type": "host-local", "subnet": subnet, "dataDir": self.path("ipam")}
            }]
        })
    }

    /// A single macvlan conf (bridge mode) on the node's master veth.
    pub fn macvlan_conf(&self, subnet: &str) -> Value {
        json!({
            "cniVersion": "1.0.0",
            "type": "macvlan", "master": self.master, "mode": "bridge",
            "ipam": {"type": "host-local", "subnet": subnet, "dataDir": self.path("ipam")}
        })
    }

    pub fn write_default_network(&self, conf: &Value) {
        std::fs::write(
            self.path("default.conflist"),
            serde_json::to_vec_pretty(conf).unwrap(),
        )
        .unwrap();
    }

    pub fn config_toml(&self) -> String {
        format!(
            "socket = {:?}\nstate_dir = {:?}\ncni_bin_dirs = [{:?}, {:?}]\ndefault_network = {}\ndelegate_timeout_secs = {}\n{}\n[dataplane]\nenabled = {}\nbpffs_dir = {:?}\n\n{}\n[networks]\n{}\n{}",
            self.socket(),
            self.state_dir(),
            self.path("bin"),
            REFERENCE_PLUGINS,
            self.default_network_toml
                .clone()
                .unwrap_or_else(|| format!("{:?}", self.path("default.conflist"))),
            self.delegate_timeout_secs,
            self.top_toml,
            self.dataplane,
            self.bpf_dir,
            self.nad_policy_toml,
            self.networks_toml.clone().unwrap_or_else(|| format!(
                "source = \"files\"\ndir = {:?}\n",
                self.path("nads")
            )),
            self.devices_toml.clone().unwrap_or_default(),
        )
    }

    pub fn start_agent(&mut self) {
        let cfg = self.path("agent.toml");
        std::fs::write(&cfg, self.config_toml()).unwrap();
        self.agent = Some(AgentProcess::start(
            &self.host,
            &cfg,
            &self.socket(),
            &self.path("agent.log"),
        ));
    }

    pub fn stop_agent(&mut self) {
        self.agent = None;
    }

    /// Hooks the agent's dataplane has live: two per attached interface, and one on
    /// the host side of a veth whose peer is in the node's netns.
    pub fn live_hooks(&self) -> usize {
        crate::bpf::live_hooks(&self.bpf_dir)
    }

    /// Writes a NetworkAttachmentDefinition file.
    pub fn add_nad(&self, namespace: &str, name: &str, config: &Value) {
        self.add_nad_annotated(namespace, name, config, &BTreeMap::new())
    }

    /// Writes a NetworkAttachmentDefinition file with metadata annotations (an ACL,
    /// a resourceName); writing it again is how a test edits the NAD.
    pub fn add_nad_annotated(
        &self,
        namespace: &str,
        name: &str,
        config: &Value,
        annotations: &BTreeMap<String, String>,
    ) {
        // As `kubectl get -o yaml` would give it: a creation time, later for each
        // NAD written (logical networks' first carving wins by it).
        static WRITTEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = WRITTEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let created = format!(
            "2026-01-01T{:02}:{:02}:{:02}Z",
            (n / 3600) % 24,
            (n / 60) % 60,
            n % 60
        );
        let nad = json!({
            "apiVersion": "k8s.cni.cncf.io/v1",
            "kind": "NetworkAttachmentDefinition",
            "metadata": {"name": name, "namespace": namespace, "annotations": annotations,
                         "creationTimestamp": created},
            "spec": {"config": config.to_string()},
        });
        std::fs::write(
            self.path(&format!("nads/{namespace}-{name}.json")),
            serde_json::to_vec_pretty(&nad).unwrap(),
        )
        .unwrap();
    }

    /// Puts an executable plugin script in the agent's first bin dir.
    pub fn add_plugin_script(&self, name: &str, body: &str) {
        use std::os::unix::fs::PermissionsExt;
        let p = self.path(&format!("bin/{name}"));
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    }

    /// The conf a runtime would hand the shim, with the pod's annotations passed as
    /// containerd does.
    pub fn shim_conf(&self, annotations: Option<&BTreeMap<String, String>>) -> Value {
        let mut c = json!({
            "cniVersion": "1.0.0",
            "name": "trellis",
            "type": "trellis-cni",
            "socket": self.socket(),
            "capabilities": {"io.kubernetes.cri.pod-annotations": true},
        });
        c["runtimeConfig"] = json!({"io.kubernetes.cri.pod-annotations": annotations});
        c
    }

    /// Runs the real shim with CNI env for a pod `ns/name`.
    pub fn shim(
        &self,
        command: &str,
        container: &str,
        netns: &str,
        pod: (&str, &str),
        stdin: &Value,
    ) -> ShimOutcome {
        let mut env: BTreeMap<&str, String> = BTreeMap::new();
        env.insert("CNI_COMMAND", command.into());
        env.insert("CNI_CONTAINERID", container.into());
        env.insert("CNI_NETNS", netns.into());
        env.insert("CNI_IFNAME", "eth0".into());
        env.insert("CNI_PATH", REFERENCE_PLUGINS.into());
        env.insert(
            "CNI_ARGS",
            format!(
                "IgnoreUnknown=1;K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_INFRA_CONTAINER_ID={container};K8S_POD_UID=uid-{container}",
                pod.0, pod.1
            ),
        );
        self.shim_raw(&env, stdin.to_string().as_bytes())
    }

    pub fn shim_raw(&self, env: &BTreeMap<&str, String>, stdin: &[u8]) -> ShimOutcome {
        let mut cmd = Command::new(crate::bins::shim());
        cmd.env_clear()
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn shim");
        let mut si = child.stdin.take().unwrap();
        let input = stdin.to_vec();
        let w = std::thread::spawn(move || {
            let _ = si.write_all(&input);
        });
        let out = child.wait_with_output().expect("shim output");
        let _ = w.join();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ShimOutcome {
            ok: out.status.success(),
            json: serde_json::from_str(&stdout).unwrap_or(Value::Null),
            stdout,
        }
    }

    /// host-local reservations (one file per reserved address) across all networks.
    pub fn reservations(&self) -> Vec<String> {
        let mut out = Vec::new();
        for net in std::fs::read_dir(self.path("ipam")).unwrap().flatten() {
            for f in std::fs::read_dir(net.path())
                .into_iter()
                .flatten()
                .flatten()
            {
                let n = f.file_name().to_string_lossy().into_owned();
                if !n.starts_with("last_reserved_ip") && n != "lock" {
                    out.push(format!("{}/{n}", net.file_name().to_string_lossy()));
                }
            }
        }
        out
    }

    /// A container's attachment record as the agent keeps it: the newest complete
    /// JSON snapshot line of its journal file.
    pub fn record(&self, container: &str) -> Value {
        read_record(
            &self
                .state_dir()
                .join(format!("containers/{container}.json")),
        )
    }

    /// Attachment records in the agent's state dir.
    pub fn records(&self) -> Vec<String> {
        list(&self.state_dir().join("containers"))
    }

    /// Host-side links other than the node's own (veth peers of pods, stray links).
    pub fn host_links(&self) -> Vec<String> {
        self.host
            .links()
            .into_iter()
            .filter(|l| !l.starts_with(&self.master) && l != &self.bridge)
            .collect()
    }

    pub fn agent_log(&self) -> String {
        std::fs::read_to_string(self.path("agent.log")).unwrap_or_default()
    }
}

impl Default for TestNode {
    fn default() -> Self {
        Self::new()
    }
}

pub fn read_record(path: &Path) -> Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|e| panic!("record {}: {e}", path.display()));
    text.lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or_else(|| panic!("record {} has no complete snapshot: {text}", path.display()))
}

fn list(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .map(|r| {
            r.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Annotations with the networks selection set.
pub fn networks_annotation(value: &str) -> BTreeMap<String, String> {
    BTreeMap::from([("k8s.v1.cni.cncf.io/networks".to_string(), value.to_string())])
}

/// A node whose agent reads networks from a fake API server in the node's
/// namespace, as node `node_name`.
pub fn kube_node(node_name: &str) -> (TestNode, crate::fake_apiserver::FakeApiServer) {
    let mut node = TestNode::new();
    let api = crate::fake_apiserver::FakeApiServer::start_in(&node.host);
    std::fs::write(node.path("kubeconfig"), api.kubeconfig()).unwrap();
    node.networks_toml = Some(kube_networks(&node, node_name));
    (node, api)
}

/// The agent's `[networks]` table for the fake API server of `kube_node`.
pub fn kube_networks(node: &TestNode, node_name: &str) -> String {
    format!(
        "source = \"kubernetes\"\nkubeconfig = {:?}\nnode_name = \"{node_name}\"\n",
        node.path("kubeconfig")
    )
}

/// Waits (up to 20 s) until the agent answers STATUS: its caches are synced.
pub fn wait_ready(node: &TestNode) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let out = node.shim("STATUS", "", "", ("", ""), &node.shim_conf(None));
        if out.ok {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent never became ready: {}\n{}",
            out.stdout,
            node.agent_log()
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
