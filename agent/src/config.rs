//! The agent's configuration file (TOML). Unknown keys are rejected: a typo must not
//! silently fall back to a default.

use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}: {message}")]
    Parse { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The unix socket the shim talks to. Default `/run/trellis/cni.sock`.
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    /// Attachment records live here, so DEL works after a restart. Default
    /// `/var/lib/trellis`.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// Where delegate plugin binaries are looked up, in order. Default
    /// `["/opt/cni/bin", "/usr/lib/cni"]`.
    #[serde(default = "default_bin_dirs")]
    pub cni_bin_dirs: Vec<PathBuf>,
    /// The cluster default network: `"auto"` (the node's primary CNI conf: the first
    /// conf in `cni_conf_dir` that is not trellis's own, followed when it changes, as
    /// Multus' `multusConfigFile: auto`), a CNI conf or conflist file (absolute path),
    /// or `{ nad = "namespace/name" }`. Required.
    pub default_network: DefaultNetwork,
    /// The node's CNI conf dir, where `trellis install` writes `cni_conf_file` and,
    /// with `default_network = "auto"`, the primary network is found. Default
    /// `/etc/cni/net.d`.
    #[serde(default = "default_conf_dir")]
    pub cni_conf_dir: PathBuf,
    /// trellis's own conflist in `cni_conf_dir`; it must sort first there, as the
    /// runtime takes the first. Default `00-trellis.conflist`.
    #[serde(default = "default_conf_file")]
    pub cni_conf_file: String,
    /// The conflist's cniVersion. Default: the primary conf's (`"auto"`, a file), or
    /// `1.0.0` (a NAD).
    #[serde(default)]
    pub cni_version: Option<String>,
    /// The agent runs in a container: a host process's /proc dir (`/proc/1`, with
    /// hostPID). Delegates then run in that process's mount namespace, so they see the
    /// host's files (their own configs, kubeconfigs, `cni_bin_dirs`), and pods' netns
    /// paths are opened through its root. Default: none (the agent runs on the host).
    #[serde(default)]
    pub host_process: Option<PathBuf>,
    /// How long one delegate plugin call may take. Default 60.
    #[serde(default = "default_timeout")]
    pub delegate_timeout_secs: u64,
    /// GC leaves alone pods whose ADD finished less than this many seconds before the
    /// GC request arrived: the runtime's list of valid attachments may predate them.
    /// Default 60.
    #[serde(default = "default_gc_grace")]
    pub gc_grace_secs: u64,
    /// Every this many seconds, pods that vanished without a DEL are looked for: a
    /// record whose pod netns has been gone at two sweeps in a row is torn down as its
    /// DEL would (VFs back to the host and their pool, IPs released), and VF state no
    /// record holds is released. 0 turns the sweep off (VF state is then swept only at
    /// start-up). Default 30.
    #[serde(default = "default_stale_sweep")]
    pub stale_sweep_secs: u64,
    /// Where NetworkAttachmentDefinitions and pod annotations come from.
    pub networks: NetworksConfig,
    /// Where sysfs is (devices and VFs are found there). Default `/sys`.
    #[serde(default = "default_sysfs")]
    pub sysfs_root: PathBuf,
    /// kubelet's PodResources socket: which devices a pod was allocated. Default
    /// `/var/lib/kubelet/pod-resources/kubelet.sock`.
    #[serde(default = "default_pod_resources")]
    pub pod_resources_socket: PathBuf,
    /// Prometheus metrics.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The eBPF dataplane on every pod interface an attachment makes.
    #[serde(default)]
    pub dataplane: DataplaneConfig,
    /// What a NetworkAttachmentDefinition may ask of this node (NAD authors are not
    /// trusted: see docs/security.md).
    #[serde(default)]
    pub nad_policy: NadPolicy,
    /// Multus' namespaceIsolation: a pod may use the NADs of its own namespace and of
    /// `global_namespaces` only, through either annotation (networks and
    /// default-network). Default false.
    #[serde(default)]
    pub namespace_isolation: bool,
    /// Namespaces whose NADs every pod may use under `namespace_isolation`. Default
    /// `["default"]`.
    #[serde(default = "default_global_namespaces")]
    pub global_namespaces: Vec<String>,
    /// Pods on logical networks over macvlan, ipvlan or SR-IOV VFs (nothing outside
    /// the pod checks what they send) are trusted not to hold privileged
    /// containers, NET_RAW, NET_ADMIN or SYS_ADMIN: their spec is not checked. Only
    /// where admission enforces that (Pod Security "restricted" drops ALL); needed
    /// for such networks without the Kubernetes API source, which has no pod spec.
    /// Default false.
    #[serde(default)]
    pub logical_trust_pod_privileges: bool,
    /// The physical networks of this node that logical networks may share out
    /// (`master:eth1`, `bridge:br-tenants`, `sriov:intel.com/pool`): a logical NAD on
    /// any other is refused, and no NAD that is not a logical network may attach to
    /// one of these. Names are compared as the node resolves them (altnames, and
    /// macvlan, ipvlan and VLAN devices down to the device they are on). Default
    /// empty: no logical networks.
    #[serde(default)]
    pub logical_physical_networks: Vec<String>,
    /// SR-IOV and vhost-user device pools served to kubelet; none without this table.
    #[serde(default)]
    pub devices: Option<DevicesConfig>,
    /// Networks that change while the pod runs (hot-plug).
    #[serde(default)]
    pub dynamic: DynamicConfig,
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DynamicConfig {
    /// Follow edits of a running pod's `k8s.v1.cni.cncf.io/networks` annotation
    /// (Kubernetes source) and take `trellis attach` / `trellis detach`. A pod opts out
    /// with the annotation `trellis.dev/dynamic: "false"`. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// How often the dataplane's counters are sampled for the networks' rates
    /// (`least-utilized`, `trellis networks`), in milliseconds. Default 1000.
    #[serde(default = "default_kpi_sample_ms")]
    pub kpi_sample_ms: u64,
    /// The window the rates are measured over, in seconds. Default 10.
    #[serde(default = "default_kpi_window_secs")]
    pub kpi_window_secs: u64,
    /// How long a moved attachment's old interface stays after the new one is up,
    /// in seconds. Default 5.
    #[serde(default = "default_move_grace_secs")]
    pub move_grace_secs: u64,
}

fn default_kpi_sample_ms() -> u64 {
    1000
}

fn default_kpi_window_secs() -> u64 {
    10
}

fn default_move_grace_secs() -> u64 {
    5
}

impl Default for DynamicConfig {
    fn default() -> Self {
        DynamicConfig {
            enabled: true,
            kpi_sample_ms: default_kpi_sample_ms(),
            kpi_window_secs: default_kpi_window_secs(),
            move_grace_secs: default_move_grace_secs(),
        }
    }
}

/// What a NAD's delegate config may use. The defaults keep a NAD author from naming
/// host devices, host paths or host ports; the node's admin widens them knowingly.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NadPolicy {
    /// Plugin types (every `type` and `ipam.type`) a NAD may use; `"*"` allows any
    /// binary in the CNI bin dirs. Default: the reference and SR-IOV types that only
    /// make pod interfaces (no `host-device`, which moves a host NIC into the pod,
    /// and no `portmap`, which opens host ports past PodSecurity).
    #[serde(default = "default_nad_plugins")]
    pub plugins: Vec<String>,
    /// Keys no NAD plugin conf (nor its `ipam`) may set, because they name host files,
    /// sockets or devices. Default: `dataDir` (host-local writes its store there),
    /// `daemonSocketPath` (dhcp), `device`, `pciBusID`, `kernelpath` (host-device),
    /// `delegate`, `delegates` (configs for plugins this policy would not see).
    #[serde(default = "default_denied_keys")]
    pub denied_keys: Vec<String>,
    /// Host interfaces a NAD may name as `master` (macvlan, ipvlan, vlan); empty:
    /// any. Default empty.
    #[serde(default)]
    pub masters: Vec<String>,
    /// Bridges a NAD may name as `bridge`; empty: any. Default empty.
    #[serde(default)]
    pub bridges: Vec<String>,
}

impl Default for NadPolicy {
    fn default() -> Self {
        NadPolicy {
            plugins: default_nad_plugins(),
            denied_keys: default_denied_keys(),
            masters: Vec::new(),
            bridges: Vec::new(),
        }
    }
}

fn default_nad_plugins() -> Vec<String> {
    [
        "bandwidth",
        "bridge",
        "dhcp",
        "firewall",
        "host-local",
        "ipvlan",
        "macvlan",
        "ptp",
        "sbr",
        "sriov",
        "static",
        "tuning",
        "vhostuser",
        "vlan",
        "whereabouts",
    ]
    .map(String::from)
    .to_vec()
}

fn default_denied_keys() -> Vec<String> {
    [
        // host-local, dhcp, sbr: host dirs and sockets
        "dataDir",
        "daemonSocketPath",
        "resolvConf",
        // host-device, sriov-cni: host devices
        "device",
        "pciBusID",
        "kernelpath",
        // whereabouts: a log file written as root, a config and a kubeconfig read
        "log_file",
        "configuration_path",
        "kubeconfig",
        // meta-plugins inside a NAD
        "delegate",
        "delegates",
    ]
    .map(String::from)
    .to_vec()
}

/// Keys the checks below read, in the one spelling they read. Go plugins match JSON
/// keys case-insensitively (folding `ſ` to `s` and the Kelvin sign to `k` too), so a
/// NAD could hide `IPAM` or `Master` from an exact-match check: any other spelling of
/// these is refused, and so is every non-ASCII key.
const CHECKED_KEYS: &[&str] = &[
    "type",
    "ipam",
    "master",
    "bridge",
    "name",
    "cniVersion",
    "deviceID",
    "runtimeConfig",
    "args",
    "prevResult",
    "plugins",
    "cniVersions",
];

/// Plugin types that fall back to a host interface when their key is left out
/// (macvlan/ipvlan/vlan: the default route's; bridge: `cni0`).
const DEFAULTED: &[(&str, &[&str])] = &[
    ("master", &["macvlan", "ipvlan", "vlan"]),
    ("bridge", &["bridge"]),
];

impl NadPolicy {
    /// `check_keys` on every object inside `v`, arrays of arrays included.
    fn check_nested(&self, at: &str, v: &serde_json::Value) -> Result<(), String> {
        match v {
            serde_json::Value::Object(m) => self.check_keys(at, m),
            serde_json::Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(n, x)| self.check_nested(&format!("{at}[{n}]"), x)),
            _ => Ok(()),
        }
    }

    /// Checks a NAD's delegate config; the error names the field.
    pub fn check(&self, conf: &trellis_cni::NetConfList) -> Result<(), String> {
        let any = self.plugins.iter().any(|p| p == "*");
        let allowed = |field: &str, ty: &str| -> Result<(), String> {
            if any || self.plugins.iter().any(|p| p == ty) {
                Ok(())
            } else {
                Err(format!(
                    "{field} {ty:?} is not a plugin NADs may use on this node ([nad_policy] plugins: {})",
                    self.plugins.join(", ")
                ))
            }
        };
        for (i, p) in conf.plugins.iter().enumerate() {
            let ty = conf.plugin_type(i);
            allowed(&format!("plugins[{i}].type"), ty)?;
            let ipam = p.get("ipam").and_then(serde_json::Value::as_object);
            if let Some(ty) = ipam.and_then(|m| m.get("type")).and_then(|t| t.as_str()) {
                allowed(&format!("plugins[{i}].ipam.type"), ty)?;
            }
            self.check_keys(&format!("plugins[{i}]"), p)?;
            // The previous plugin's result is the runtime's to pass: one written in a
            // NAD would tell chained plugins (firewall) of addresses the pod lacks.
            if p.keys().any(|k| k.eq_ignore_ascii_case("prevResult")) {
                return Err(format!(
                    "plugins[{i}].prevResult: NADs may not set it (the runtime passes each plugin its predecessor's result)"
                ));
            }
            for (key, list, table) in [
                ("master", &self.masters, "masters"),
                ("bridge", &self.bridges, "bridges"),
            ] {
                if list.is_empty() {
                    continue;
                }
                let defaulted = DEFAULTED
                    .iter()
                    .any(|(k, types)| *k == key && types.contains(&ty));
                let v = match p.get(key) {
                    Some(v) => v,
                    None if defaulted => {
                        return Err(format!(
                            "plugins[{i}].{key} is not set: {ty} would use a default host interface; name one of [nad_policy] {table}: {}",
                            list.join(", ")
                        ))
                    }
                    None => continue,
                };
                match v.as_str() {
                    Some(name) if list.iter().any(|m| m == name) => {}
                    _ => {
                        return Err(format!(
                            "plugins[{i}].{key}: {v} is not one NADs may use on this node ([nad_policy] {table}: {})",
                            list.join(", ")
                        ))
                    }
                }
            }
        }
        Ok(())
    }

    /// Every key at every depth of a plugin's config: ASCII, one spelling per key
    /// (no two differing only in case), the checked keys in their exact spelling,
    /// and none of `denied_keys` in any spelling.
    fn check_keys(
        &self,
        at: &str,
        obj: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<(), String> {
        let mut seen: Vec<&str> = Vec::with_capacity(obj.len());
        for (k, v) in obj {
            let field = format!("{at}.{k}");
            if !k.is_ascii() {
                return Err(format!(
                    "{field}: keys must be ASCII (plugins fold some letters when they read keys)"
                ));
            }
            if let Some(other) = seen.iter().find(|o| o.eq_ignore_ascii_case(k)) {
                return Err(format!(
                    "{field}: {k:?} and {other:?} differ only in case; plugins read them as one key"
                ));
            }
            seen.push(k);
            if let Some(c) = CHECKED_KEYS
                .iter()
                .find(|c| c.eq_ignore_ascii_case(k) && *c != k)
            {
                return Err(format!(
                    "{field}: spell it {c:?} (plugins read {k:?} as {c:?})"
                ));
            }
            if self.denied_keys.iter().any(|d| d.eq_ignore_ascii_case(k)) {
                return Err(format!(
                    "{field}: NADs may not set {k:?} on this node (it names a host file, socket or device; [nad_policy] denied_keys)"
                ));
            }
            self.check_nested(&field, v)?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address for `GET /metrics`. Default `127.0.0.1:9105` (the node only: the
    /// counters name every pod); `0.0.0.0:9105` or the node's IP exposes them to the
    /// network. Empty turns it off.
    #[serde(default = "default_metrics_listen")]
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig {
            listen: default_metrics_listen(),
        }
    }
}

fn default_metrics_listen() -> String {
    "127.0.0.1:9105".into()
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DataplaneConfig {
    /// Attach the tc programs (accounting, ACLs, limits) to pod interfaces. Default true.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Where the maps are pinned (must be on a bpffs). Default
    /// `/sys/fs/bpf/trellis`.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// How often the NADs of networks with live attachments are re-read for ACL
    /// changes (`trellis.dev/acl`), in milliseconds. Default 1000.
    #[serde(default = "default_acl_resync_ms")]
    pub acl_resync_ms: u64,
    /// How an ingress bandwidth limit is kept: `queue` (default: redirected to an
    /// ifb device in the pod's netns whose HTB queues it at the rate; TCP keeps
    /// its rate) or `police` (dropped above the rate by the programs; no device,
    /// less CPU, but TCP through a policer falls far below the rate).
    #[serde(default)]
    pub ingress_limit: crate::bandwidth::IngressLimit,
    /// The part (0 < share <= 1) of each table space every ACL shares (intervals,
    /// rules, index, hit counters) and of the 1,024 ACL ids that the ACL networks of
    /// one namespace may hold together, so that one tenant cannot fill them for the
    /// others. Default 0.25 (room for one ACL of the largest size, 10,000 rules).
    #[serde(default = "default_acl_share")]
    pub acl_share_per_namespace: f64,
}

fn default_acl_share() -> f64 {
    0.25
}

fn default_acl_resync_ms() -> u64 {
    1000
}

impl Default for DataplaneConfig {
    fn default() -> Self {
        DataplaneConfig {
            enabled: true,
            bpffs_dir: default_bpffs_dir(),
            acl_resync_ms: default_acl_resync_ms(),
            ingress_limit: Default::default(),
            acl_share_per_namespace: default_acl_share(),
        }
    }
}

fn yes() -> bool {
    true
}

pub fn default_bpffs_dir() -> PathBuf {
    PathBuf::from("/sys/fs/bpf/trellis")
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct DevicesConfig {
    /// The pool config, in sriov-network-device-plugin's config.json format.
    pub config: PathBuf,
    /// resourcePrefix for pools without one. Default `intel.com`, as sriov-dp.
    #[serde(default = "default_prefix")]
    pub resource_prefix: String,
    /// kubelet's device-plugins dir. Default `/var/lib/kubelet/device-plugins`.
    #[serde(default = "default_plugin_dir")]
    pub plugin_dir: PathBuf,
    /// How often devices are re-discovered (health, VFs coming and going). Default 500.
    #[serde(default = "default_poll")]
    pub poll_interval_ms: u64,
}

fn default_sysfs() -> PathBuf {
    PathBuf::from("/sys")
}
fn default_pod_resources() -> PathBuf {
    PathBuf::from(trellis_device_plugin::podresources::DEFAULT_SOCKET)
}
fn default_prefix() -> String {
    trellis_device_plugin::config::DEFAULT_PREFIX.to_string()
}
fn default_plugin_dir() -> PathBuf {
    PathBuf::from(trellis_device_plugin::manager::DEFAULT_PLUGIN_DIR)
}
fn default_poll() -> u64 {
    500
}

impl DevicesConfig {
    pub fn settings(&self, sysfs_root: &Path) -> trellis_device_plugin::manager::Settings {
        let mut s = trellis_device_plugin::manager::Settings::new(&self.config);
        s.sysfs_root = sysfs_root.to_path_buf();
        s.resource_prefix = self.resource_prefix.clone();
        s.plugin_dir = self.plugin_dir.clone();
        s.poll_interval = Duration::from_millis(self.poll_interval_ms);
        s
    }
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(tag = "source", rename_all = "lowercase", deny_unknown_fields)]
pub enum NetworksConfig {
    /// NAD files (YAML or JSON, the CRD's shape) in a directory; pod annotations from
    /// the container runtime (`io.kubernetes.cri.pod-annotations`).
    Files { dir: PathBuf },
    /// The Kubernetes API.
    Kubernetes {
        /// A kubeconfig file; without it the in-cluster service account is used.
        #[serde(default)]
        kubeconfig: Option<PathBuf>,
        /// This node's name (pods are watched for this node only). Default: the
        /// `NODE_NAME` environment variable.
        #[serde(default)]
        node_name: Option<String>,
        /// An `AddedInterface` event per interface at each pod ADD, as Multus posts
        /// them. Off by default: an ADD then costs the API one write (the
        /// network-status patch) instead of one more per interface. Failures, hot-plug
        /// and move events are posted either way.
        #[serde(default)]
        added_interface_events: bool,
    },
}

/// Where the cluster default network comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum DefaultNetwork {
    /// The node's primary CNI conf, found in `cni_conf_dir`.
    Auto,
    /// A CNI conf or conflist file.
    File(PathBuf),
    /// A NetworkAttachmentDefinition.
    Nad { namespace: String, name: String },
}

impl<'de> Deserialize<'de> for DefaultNetwork {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged, deny_unknown_fields)]
        enum Raw {
            Text(String),
            Table { nad: String },
        }
        match Raw::deserialize(d)? {
            Raw::Text(t) if t == "auto" => Ok(DefaultNetwork::Auto),
            Raw::Text(t) if t.starts_with('/') => Ok(DefaultNetwork::File(t.into())),
            Raw::Text(t) => Err(D::Error::custom(format!(
                "default_network {t:?}: \"auto\", an absolute path or {{ nad = \"namespace/name\" }}"
            ))),
            Raw::Table { nad } => {
                let sel = crate::selection::parse_default_network(&nad, "")
                    .map_err(|e| D::Error::custom(format!("default_network.nad: {e}")))?;
                Ok(DefaultNetwork::Nad {
                    namespace: sel.namespace,
                    name: sel.name,
                })
            }
        }
    }
}

fn default_conf_dir() -> PathBuf {
    PathBuf::from("/etc/cni/net.d")
}
fn default_conf_file() -> String {
    "00-trellis.conflist".into()
}

fn default_socket() -> PathBuf {
    PathBuf::from(trellis_shim::wire::DEFAULT_SOCKET)
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/trellis")
}
fn default_bin_dirs() -> Vec<PathBuf> {
    vec!["/opt/cni/bin".into(), "/usr/lib/cni".into()]
}
fn default_timeout() -> u64 {
    60
}
fn default_gc_grace() -> u64 {
    60
}
fn default_stale_sweep() -> u64 {
    30
}

fn default_global_namespaces() -> Vec<String> {
    vec!["default".into()]
}

impl AgentConfig {
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<AgentConfig, ConfigError> {
        let err = |message: String| ConfigError::Parse {
            path: path.to_path_buf(),
            message,
        };
        let c: AgentConfig = toml::from_str(text).map_err(|e| {
            // The device plugin's config is JSON; the agent's is TOML.
            if text.trim_start().starts_with('{') {
                err(format!("{e}\n(this looks like JSON: the agent's config is TOML; a device pool config goes in [devices] config)"))
            } else {
                err(e.to_string())
            }
        })?;
        if c.cni_bin_dirs.is_empty() {
            return Err(err("cni_bin_dirs is empty".into()));
        }
        if c.devices.as_ref().is_some_and(|d| d.poll_interval_ms == 0) {
            return Err(err("devices.poll_interval_ms must be at least 1".into()));
        }
        if let Some(bad) = c
            .global_namespaces
            .iter()
            .find(|n| !crate::tenancy::valid_namespace(n))
        {
            return Err(err(format!(
                "global_namespaces: {bad:?} is not a namespace name"
            )));
        }
        let share = c.dataplane.acl_share_per_namespace;
        if !(share > 0.0 && share <= 1.0) {
            return Err(err(format!(
                "dataplane.acl_share_per_namespace: {share} is not in (0, 1]"
            )));
        }
        for w in &c.logical_physical_networks {
            crate::logical::check_wire_name(w)
                .map_err(|m| err(format!("logical_physical_networks: {m}")))?;
        }
        if c.delegate_timeout_secs == 0 {
            return Err(err("delegate_timeout_secs must be at least 1".into()));
        }
        let f = &c.cni_conf_file;
        if f.contains('/') || f.starts_with('.') || !f.ends_with(".conflist") || f.len() <= 9 {
            return Err(err(format!(
                "cni_conf_file {f:?}: a plain file name ending in .conflist (such as 00-trellis.conflist)"
            )));
        }
        if !c.cni_conf_dir.is_absolute() {
            return Err(err("cni_conf_dir must be an absolute path".into()));
        }
        if let Some(v) = &c.cni_version {
            trellis_cni::version::Version::parse_supported(v)
                .map_err(|e| err(format!("cni_version {v:?}: {e}")))?;
        }
        if let Some(h) = &c.host_process {
            if !h.is_absolute() {
                return Err(err(format!(
                    "host_process {}: an absolute path (such as /proc/1)",
                    h.display()
                )));
            }
        }
        Ok(c)
    }

    pub fn delegate_timeout(&self) -> Duration {
        Duration::from_secs(self.delegate_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn minimal_config_gets_defaults() {
        let c = AgentConfig::parse(
            "default_network = \"/etc/trellis/default.conflist\"\n[networks]\nsource = \"files\"\ndir = \"/etc/trellis/networks\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.socket, PathBuf::from("/run/trellis/cni.sock"));
        assert_eq!(c.delegate_timeout_secs, 60);
        assert_eq!(c.stale_sweep_secs, 30);
        let off = AgentConfig::parse(
            "stale_sweep_secs = 0\ndefault_network = \"/d.conflist\"\n[networks]\nsource = \"files\"\ndir = \"/n\"\n",
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(off.stale_sweep_secs, 0);
        assert_eq!(
            c.networks,
            NetworksConfig::Files {
                dir: "/etc/trellis/networks".into()
            }
        );
    }

    #[test]
    fn node_conf_keys_are_checked() {
        let base = "default_network = \"auto\"\n[networks]\nsource = \"files\"\ndir = \"/d\"\n";
        for (key, want) in [
            ("cni_conf_file = \"../x.conflist\"", "cni_conf_file"),
            ("cni_conf_file = \"00-trellis.conf\"", "cni_conf_file"),
            ("cni_conf_file = \".conflist\"", "cni_conf_file"),
            ("cni_conf_dir = \"net.d\"", "cni_conf_dir"),
            ("cni_version = \"2.0.0\"", "cni_version \"2.0.0\""),
            ("host_process = \"proc/1\"", "host_process proc/1"),
            (
                "global_namespaces = [\"Team_A\"]",
                "global_namespaces: \"Team_A\"",
            ),
            (
                "logical_physical_networks = [\"eth1\"]",
                "logical_physical_networks: \"eth1\" is not master:DEVICE",
            ),
        ] {
            let e = AgentConfig::parse(&format!("{key}\n{base}"), Path::new("t.toml"))
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{key}: {e}");
        }
        let c = AgentConfig::parse(
            &format!("cni_conf_file = \"0-trellis.conflist\"\ncni_version = \"1.1.0\"\nhost_process = \"/proc/1\"\n{base}"),
            Path::new("t.toml"),
        )
        .unwrap();
        assert_eq!(c.cni_conf_file, "0-trellis.conflist");
    }

    #[test]
    fn nad_policy_reads_keys_as_go_plugins_do() {
        let policy = NadPolicy {
            masters: vec!["ens5f1".into()],
            ..Default::default()
        };
        let check = |conf: serde_json::Value| {
            let list =
                trellis_cni::NetConfList::parse(conf.to_string().as_bytes(), Some("n")).unwrap();
            policy.check(&list)
        };
        let ok = serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":"ens5f1","mode":"bridge"});
        assert_eq!(check(ok), Ok(()));
        for (conf, want) in [
            (
                serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":"ens5f1","mode":"bridge","Mode":"vepa"}),
                "plugins[0].mode: \"mode\" and \"Mode\" differ only in case",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":"ens5f1","ipam":{"type":"static","Type":"/tmp/x"}}),
                "plugins[0].ipam.Type: spell it \"type\"",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":"ens5f1","x":[{"DATADIR":"/etc"}]}),
                "plugins[0].x[0].DATADIR: NADs may not set",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","type":"ipvlan"}),
                "plugins[0].master is not set",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":"ens5f1","x":[[{"DataDir":"/etc"}]]}),
                "plugins[0].x[0][0].DataDir: NADs may not set",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","plugins":[{"type":"macvlan","master":"ens5f1"},{"type":"firewall","prevresult":{"ips":[]}}]}),
                "plugins[1].prevresult: spell it \"prevResult\"",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","plugins":[{"type":"macvlan","master":"ens5f1"},{"type":"firewall","prevResult":{"ips":[]}}]}),
                "plugins[1].prevResult: NADs may not set it",
            ),
            (
                serde_json::json!({"cniVersion":"1.0.0","type":"macvlan","master":"ens5f1","\u{212a}ubeconfig":"/x"}),
                "keys must be ASCII",
            ),
        ] {
            let e = check(conf).unwrap_err();
            assert!(e.contains(want), "wanted {want:?} in {e}");
        }
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let e = AgentConfig::parse(
            "default_network = \"/x\"\nstate_dri = \"/y\"\n[networks]\nsource = \"files\"\ndir = \"/d\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("state_dri"), "{e}");
        let e = AgentConfig::parse(
            "default_network = \"/x\"\n[networks]\nsource = \"files\"\ndirr = \"/d\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("dirr"), "{e}");
        let e = AgentConfig::parse(
            "default_network = \"/x\"\n[networks]\nsource = \"etcd\"\n",
            Path::new("t.toml"),
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("etcd"), "{e}");
    }
}
