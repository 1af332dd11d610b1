//! The agent's side of every CNI call: resolve the pod's networks, run each attachment's
//! delegate, record what was done, undo it on failure, and answer in the runtime's
//! cniVersion.

use crate::config::AgentConfig;
use crate::nad::NadError;
use crate::network_status;
use crate::records::{Attachment, Record, RecordError, RecordStore};
use crate::selection::{
    self, NetworkSelection, DEFAULT_NETWORK_ANNOTATION, NETWORKS_ANNOTATION,
    NETWORK_STATUS_ANNOTATION,
};
use crate::source::{NetworkSource, PodRef, SourceError};
use serde_json::{Map, Value};
use std::collections::{BTreeMap, HashSet};
use std::sync::{Arc, Condvar, Mutex};
use trellis_cni::invoke::{InvokeError, Invoker, Target};
use trellis_cni::wire::{Request, Response, MAX_STDIN};
use trellis_cni::{CniEnv, CniError, CniResult, Command, ErrorCode, NetConfList, Version};

/// The runtimeConfig key under which containerd passes the pod's annotations.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";
pub const VALID_ATTACHMENTS_KEY: &str = "cni.dev/valid-attachments";
/// The spelling libcni also sends for the same list.
pub const VALID_ATTACHMENTS_ALIAS: &str = "cni.dev/attachments";
/// The longest a PodResources call may take (kubelet answers in milliseconds).
const POD_RESOURCES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

pub struct Handler {
    pub metrics: Arc<crate::metrics::Metrics>,
    dataplane: Option<Mutex<crate::dataplane::Dataplane>>,
    /// Why there is no dataplane: `[dataplane] enabled = false`, or what kept it from
    /// starting (pins of another layout).
    dataplane_off: String,
    /// Containers whose interfaces await the dataplane (done off the ADD's path).
    /// (container, whether its ADD finished in an earlier agent: its networks' ACLs are
    /// read from their NADs before it is attached, as the pins may have lost them).
    default_network: crate::config::DefaultNetwork,
    /// The node's CNI conf dir and trellis's own file in it (auto mode).
    cni_conf_dir: std::path::PathBuf,
    cni_conf_file: String,
    pod_resources: std::path::PathBuf,
    invoker: Invoker,
    source: Arc<dyn NetworkSource>,
    records: RecordStore,
    /// The device plugin's pools: a device reaches an attachment only if a pool
    /// serves it. None: no pools on this node, so no device is handed out.
    device_pools: Option<Arc<Mutex<trellis_device_plugin::manager::Status>>>,
    /// With the Kubernetes source, kubelet's PodResources must answer for devices.
    kubelet_required: bool,
    /// What a NAD's delegate config may use.
    nad_policy: crate::config::NadPolicy,
    /// Which pods may use which NADs (namespace_isolation, allowed-namespaces).
    namespaces: crate::tenancy::NamespacePolicy,
    /// `logical_trust_pod_privileges`: pods on logical networks without a host side
    /// are not checked for raw network access.
    logical_trust_pods: bool,
    /// `logical_physical_networks`: the wires logical networks may share out.
    logical_wires: Vec<String>,
    locks: ContainerLocks,
    /// ADD, DEL and CHECK hold it shared, GC exclusively: GC never sees a container
    /// whose ADD is under way, nor an ADD's delegates between its GC's list and calls.
    gc_gate: std::sync::RwLock<()>,
    /// GC leaves pods added this long before its request (`gc_grace_secs`).
    gc_grace: std::time::Duration,
    /// Per network, when the NAD read whose ACL is in the maps began: an ACL read
    /// earlier (an ADD planned before a NAD edit the sync applied) is not written over
    /// it. The NAD is the last writer.
    acl_read_at: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Held from an ADD's logical-network overlap check to its plan's save.
    logical_gate: Mutex<()>,
    /// The CNI socket is being served (set and cleared by `server::serve`).
    pub serving: std::sync::atomic::AtomicBool,
}

/// One network to attach, fully resolved before anything is changed.
struct Planned {
    network: String,
    ifname: String,
    cluster_default: bool,
    conf: NetConfList,
    runtime_config: Map<String, Value>,
    default_route: Vec<std::net::IpAddr>,
    /// The NAD's resource pool (`k8s.v1.cni.cncf.io/resourceName`).
    resource: Option<String>,
    /// The device from that pool, put in the delegate's `deviceID`.
    device: Option<String>,
    /// The NAD's ACL (`trellis.dev/acl`).
    acl: Option<PlannedAcl>,
    /// Bandwidth limits the dataplane keeps.
    bandwidth: crate::bandwidth::Limits,
    /// The logical network (`trellis.dev/logical-network`) it is on.
    logical: Option<crate::logical::Logical>,
    /// The physical network it attaches to, if logical networks could share it.
    physical: Option<String>,
    /// Its NAD's creationTimestamp.
    created: Option<String>,
}

/// A network's ACL as an ADD read it, and when that read began.
#[derive(Clone)]
struct PlannedAcl {
    acl: crate::acl::Acl,
    read_at: std::time::Instant,
}

/// The parts of the shim's own conf the agent uses.
struct ShimConf {
    cni_version: String,
    runtime_config: Map<String, Value>,
    raw: Map<String, Value>,
}

fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg)
}

fn from_record_err(e: RecordError) -> CniError {
    CniError::new(ErrorCode::Io, e.to_string())
}

fn from_source_err(e: SourceError) -> CniError {
    match e {
        SourceError::Unavailable { .. } => CniError::new(ErrorCode::TryAgainLater, e.to_string()),
        _ => invalid(e.to_string()),
    }
}

fn from_nad_err(e: NadError) -> CniError {
    CniError::new(e.code(), e.to_string())
}

impl Handler {
    pub fn new(
        config: &AgentConfig,
        source: Arc<dyn NetworkSource>,
    ) -> Result<Handler, RecordError> {
        let mut invoker = Invoker {
            bin_dirs: config.cni_bin_dirs.clone(),
            timeout: config.delegate_timeout(),
            in_process: None,
            host_process: config.host_process.clone(),
        };
        let records = RecordStore::open(&config.state_dir)?;
        let sriov =
            crate::sriov::SriovPlugin::new(&config.sysfs_root, &config.state_dir, invoker.clone())
                .map_err(|source| RecordError::Io {
                    path: config.state_dir.join("vfs"),
                    source,
                })?;
        sriov.sweep(&records);
        let vhost = crate::vhostuser::VhostUserPlugin::new(invoker.clone());
        invoker.in_process = Some(Arc::new(crate::builtins::Builtins(vec![
            Arc::new(sriov),
            Arc::new(vhost),
        ])));
        Ok(Handler {
            metrics: Arc::new(crate::metrics::Metrics::default()),
            dataplane: None,
            dataplane_off: "[dataplane] enabled = false".into(),
            default_network: config.default_network.clone(),
            cni_conf_dir: config.cni_conf_dir.clone(),
            cni_conf_file: config.cni_conf_file.clone(),
            pod_resources: config.pod_resources_socket.clone(),
            invoker,
            source,
            records,
            device_pools: None,
            nad_policy: config.nad_policy.clone(),
            namespaces: crate::tenancy::NamespacePolicy {
                isolation: config.namespace_isolation,
                global: config.global_namespaces.clone(),
            },
            logical_trust_pods: config.logical_trust_pod_privileges,
            logical_wires: config.logical_physical_networks.clone(),
            kubelet_required: matches!(
                config.networks,
                crate::config::NetworksConfig::Kubernetes { .. }
            ),
            locks: ContainerLocks::default(),
            gc_gate: std::sync::RwLock::new(()),
            gc_grace: std::time::Duration::from_secs(config.gc_grace_secs),
            acl_read_at: Mutex::new(BTreeMap::new()),
            logical_gate: Mutex::new(()),
            serving: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The running device plugin's pools (`ManagerHandle::status`).
    pub fn with_device_pools(
        mut self,
        pools: Arc<Mutex<trellis_device_plugin::manager::Status>>,
    ) -> Handler {
        self.device_pools = Some(pools);
        self
    }

    /// Runs without the dataplane it was configured with, saying why in every ADD it
    /// must refuse (networks with an ACL are not attached unfiltered).
    pub fn without_dataplane(mut self, why: String) -> Handler {
        self.dataplane = None;
        self.dataplane_off = why;
        self
    }

    /// Turns on the eBPF dataplane (loaded and checked by the caller).
    pub fn with_dataplane(mut self, dp: crate::dataplane::Dataplane) -> Handler {
        self.dataplane = Some(Mutex::new(dp));
        self
    }

    /// Attaches the interfaces of records left without slots (an agent stopped
    /// mid-way, or pins gone after a reboot), at start-up after the reconcile and
    /// before any request. Each failure is logged; the next start tries again.
    pub fn attach_unattached(&self) {
        if self.dataplane.is_none() {
            return;
        }
        let Ok((records, _)) = self.records.list() else {
            return;
        };
        for r in records {
            if !r.attachments.iter().any(|a| a.slot.is_none()) {
                continue;
            }
            let Some(_lock) = self.locks.try_lock(&r.container_id) else {
                continue;
            };
            let Ok(Some(mut record)) = self.records.load(&r.container_id) else {
                continue;
            };
            if let Err(e) = self.attach_dataplane(&mut record, true) {
                tracing::warn!(container = %r.container_id, "{}", e.msg);
            }
        }
    }

    /// Makes the pins and the records agree, at agent start-up before any request: a
    /// slot no record owns is detached, a record whose slot is gone or another's
    /// forgets it (`attach_unattached` attaches it again if its interface is there),
    /// pins of older layouts and ACLs without attachments go. Each is logged.
    pub fn reconcile_dataplane(&self) {
        let Some(dp) = &self.dataplane else { return };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        let (mut records, corrupt) = match self.records.list() {
            Ok(r) => r,
            Err(e) => {
                tracing::warn!("dataplane reconcile: {e}");
                return;
            }
        };
        // A record that cannot be read may still own its slots: they are left alone.
        let unreadable: HashSet<String> =
            corrupt.iter().filter_map(RecordError::container).collect();
        let slots = match dp.slots() {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("dataplane reconcile: {e}");
                return;
            }
        };
        let owns = |r: &Record, slot: u32, o: &crate::dataplane::Owner| {
            r.container_id == o.container
                && r.attachments
                    .iter()
                    .any(|a| a.slot == Some(slot) && a.ifname == o.ifname)
        };
        for (slot, o) in &slots {
            if !unreadable.contains(&o.container) && !records.iter().any(|r| owns(r, *slot, o)) {
                match dp.detach(*slot) {
                    Ok(()) => {
                        tracing::warn!(slot, container = %o.container, pod = %format!("{}/{}", o.namespace, o.pod), ifname = %o.ifname,
                        "dataplane slot with no attachment record: detached")
                    }
                    Err(e) => tracing::warn!(slot, "dataplane slot with no attachment record: {e}"),
                }
            }
        }
        for r in records.iter_mut() {
            let mut changed = false;
            for a in r.attachments.iter_mut() {
                let Some(slot) = a.slot else { continue };
                let held = slots.iter().any(|(s, o)| {
                    *s == slot && o.container == r.container_id && o.ifname == a.ifname
                });
                if !held {
                    tracing::warn!(container = %r.container_id, ifname = %a.ifname, slot,
                        "attachment record names a dataplane slot that is gone (reboot, or pins removed): forgotten");
                    a.slot = None;
                    changed = true;
                }
            }
            if changed {
                if let Err(e) = self.records.save(r) {
                    tracing::warn!("dataplane reconcile: {e}");
                }
            }
        }
        match dp.remove_orphan_pins() {
            Ok(p) if !p.is_empty() => {
                tracing::warn!(pins = ?p, "link pins of an older layout: removed")
            }
            Err(e) => tracing::warn!("dataplane reconcile: {e}"),
            _ => {}
        }
        match dp.repoint_slots() {
            Ok(n) if n > 0 => {
                tracing::warn!(slots = n, "slots left on an earlier ACL header (an update cut short): moved to their network's current one")
            }
            Err(e) => tracing::warn!("dataplane reconcile: {e}"),
            _ => {}
        }
        match dp.drop_unused_acls() {
            Ok(n) if !n.is_empty() => {
                tracing::warn!(networks = ?n, "ACLs with no attachment left: dropped")
            }
            Err(e) => tracing::warn!("dataplane reconcile: {e}"),
            _ => {}
        }
    }

    /// Attaches the attachments whose network has an ACL or a bandwidth limit, now:
    /// their rules are in the maps (and current for every live attachment of the
    /// network) and their limits kept before the pod gets its first packet. An
    /// interface without a kernel netdev (vfio, socket) cannot be: refused.
    fn attach_with_acls(
        &self,
        record: &mut Record,
        acls: &[Option<PlannedAcl>],
    ) -> Result<(), CniError> {
        let Some(dp) = &self.dataplane else {
            return Ok(());
        };
        let limited = |i: usize| {
            !record.attachments[i].bandwidth.is_none() || record.attachments[i].logical.is_some()
        };
        if (0..acls.len()).all(|i| acls[i].is_none() && !limited(i)) {
            return Ok(());
        }
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        for (i, planned) in acls.iter().enumerate() {
            let Some(planned) = planned else {
                let a = &record.attachments[i];
                if !a.bandwidth.is_none() || a.logical.is_some() {
                    self.attach_one(&mut dp, record, i, true)?;
                }
                continue;
            };
            let a = &record.attachments[i];
            let network = a.network.clone();
            let fail = |e: crate::dataplane::DataplaneError| {
                CniError::new(
                    ErrorCode::Io,
                    format!("network {} ({}): ACL: {e}", a.network, a.ifname),
                )
            };
            // Rules read from the NAD after this ADD read it are newer: kept.
            self.set_acl_read_at(&mut dp, &network, Some(&planned.acl), planned.read_at)
                .map_err(fail)?;
            let attached = self.attach_one(&mut dp, record, i, true);
            if attached.is_err() {
                // A network whose only attachment this was keeps no tables.
                let _ = dp.forget_unused_acl(&network);
            }
            attached?;
        }
        Ok(())
    }

    /// Puts `network`'s ACL from its NAD into the maps if they have none for it and
    /// no live slot of the network is in the pins (then the maps already say whether
    /// it has one); whether it did. Fails closed: a NAD that cannot be read now (API
    /// down, NAD gone) or whose ACL is invalid gives a deny-all ACL, which the ACL sync
    /// replaces with the NAD's (or removes) once it reads the NAD; for a NAD that is
    /// gone, that is when the pod goes.
    fn acl_from_nad(&self, dp: &mut crate::dataplane::Dataplane, network: &str) -> bool {
        let Some((ns, name)) = network.split_once('/') else {
            return false;
        };
        if !dp.acl_of(network).is_ok_and(|a| a.is_none()) {
            return false;
        }
        if !dp.slots_of(network).is_ok_and(|s| s.is_empty()) {
            return false;
        }
        let read_at = std::time::Instant::now();
        let deny_all = crate::acl::Acl {
            default_deny: true,
            rules: Vec::new(),
        };
        let acl = match self.source.get_nad(ns, name).map(|n| n.acl()) {
            Ok(Ok(Some(acl))) => acl,
            // The NAD says it has no ACL (any more): none.
            Ok(Ok(None)) => return false,
            Err(e) => {
                tracing::warn!(%network, "its NAD cannot be read ({e}): its interfaces deny all traffic until it can");
                deny_all.clone()
            }
            Ok(Err(e)) => {
                tracing::warn!(%network, "its NAD's ACL is invalid ({e}): its interfaces deny all traffic until it is fixed");
                deny_all.clone()
            }
        };
        match self.set_acl_read_at(dp, network, Some(&acl), read_at) {
            Ok(set) => set,
            Err(e) => {
                // Past the namespace's share or out of space: closed, not open.
                tracing::warn!(%network, "ACL from its NAD: {e}: its interfaces deny all traffic until it fits");
                dp.without_share(|dp| self.set_acl_read_at(dp, network, Some(&deny_all), read_at))
                    .unwrap_or_else(|e| {
                        tracing::warn!(%network, "deny-all ACL: {e}");
                        false
                    })
            }
        }
    }

    /// Writes `acl` as `network`'s rules, unless rules from a NAD read that began
    /// after `read_at` are in place already (the NAD is the last writer). The caller
    /// holds the dataplane.
    fn set_acl_read_at(
        &self,
        dp: &mut crate::dataplane::Dataplane,
        network: &str,
        acl: Option<&crate::acl::Acl>,
        read_at: std::time::Instant,
    ) -> Result<bool, crate::dataplane::DataplaneError> {
        let mut reads = self.acl_read_at.lock().unwrap_or_else(|p| p.into_inner());
        if reads.get(network).is_some_and(|t| *t > read_at) {
            return Ok(false);
        }
        dp.set_network_acl(network, acl)?;
        reads.insert(network.to_string(), read_at);
        Ok(true)
    }

    /// Attaches attachment `i` if its interface is a kernel netdev in the pod; with
    /// `required`, an attachment without one is an error.
    fn attach_one(
        &self,
        dp: &mut crate::dataplane::Dataplane,
        record: &mut Record,
        i: usize,
        required: bool,
    ) -> Result<(), CniError> {
        let netns = std::path::Path::new(&record.netns);
        let a = &record.attachments[i];
        if a.slot.is_some() || a.result.is_none() {
            return Ok(());
        }
        let has_link = crate::netns::run_in(netns, || {
            nix::net::if_::if_nametoindex(a.ifname.as_str()).is_ok()
        })
        .unwrap_or(false);
        if !has_link {
            if required {
                let what = if a.logical.is_some() {
                    "a logical network to isolate"
                } else if a.bandwidth.is_none() {
                    "an ACL"
                } else {
                    "a bandwidth limit"
                };
                return Err(invalid(format!(
                    "network {} ({}) has {what} but its attachment made no kernel interface in the pod to keep it on (a vfio device or a socket)",
                    a.network, a.ifname
                )));
            }
            return Ok(());
        }
        let owner = crate::dataplane::Owner {
            namespace: record.pod_namespace.clone(),
            pod: record.pod_name.clone(),
            network: a.network.clone(),
            ifname: a.ifname.clone(),
            container: record.container_id.clone(),
        };
        let slot = dp
            .attach_full(
                netns,
                &owner,
                &a.bandwidth,
                a.logical.as_ref().map(|l| l.to_map()).as_ref(),
            )
            .map_err(|e| {
                CniError::new(
                    ErrorCode::Io,
                    format!("network {} ({}): dataplane: {e}", a.network, a.ifname),
                )
            })?;
        record.attachments[i].slot = Some(slot);
        self.records.save_unsynced(record).map_err(from_record_err)
    }

    /// Attaches the programs to every kernel interface the attachments made in the pod
    /// (sockets and vfio devices have none) that has none yet, recording each slot.
    /// With `acls_from_nads` (a record from an earlier agent, whose pins may be gone),
    /// a network's ACL missing from the maps is read from its NAD first, so the
    /// interface is filtered from its first packet again.
    fn attach_dataplane(&self, record: &mut Record, acls_from_nads: bool) -> Result<(), CniError> {
        let Some(dp) = &self.dataplane else {
            return Ok(());
        };
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        // One interface that cannot be attached does not keep the others unaccounted.
        let mut failed = Vec::new();
        for i in 0..record.attachments.len() {
            let a = &record.attachments[i];
            let restored = acls_from_nads
                && a.slot.is_none()
                && a.result.is_some()
                && self.acl_from_nad(&mut dp, &a.network.clone());
            if let Err(e) = self.attach_one(&mut dp, record, i, false) {
                failed.push(e.msg);
            }
            if restored {
                // Kept only if an interface took it.
                let _ = dp.forget_unused_acl(&record.attachments[i].network);
            }
        }
        if failed.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(ErrorCode::Io, failed.join("; ")))
        }
    }

    /// Keeps the ACLs of live attachments equal to their NADs: every `period`, the
    /// NAD of each network with attachments is read again (the Kubernetes source
    /// answers from its watch cache) and a changed `trellis.dev/acl` replaces the
    /// network's tables in place. A NAD whose new ACL is invalid keeps the old rules
    /// (logged once per change).
    pub fn start_acl_sync(self: &Arc<Self>, period: std::time::Duration) {
        if self.dataplane.is_none() {
            return;
        }
        let h = Arc::clone(self);
        std::thread::Builder::new()
            .name("trellis-acl-sync".into())
            .spawn(move || {
                let mut reported: BTreeMap<String, String> = BTreeMap::new();
                loop {
                    std::thread::sleep(period);
                    h.sync_acls(&mut reported);
                }
            })
            .expect("ACL sync thread");
    }

    /// One pass of the ACL sync (see `start_acl_sync`).
    pub fn sync_acls(&self, reported: &mut BTreeMap<String, String>) {
        let Some(dp) = &self.dataplane else { return };
        let networks = {
            // Under the dataplane lock: an ADD records its read of a new network under
            // it too, so it is never dropped here before its network is listed.
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            let networks = match dp.networks() {
                Ok(n) => n,
                Err(e) => {
                    tracing::warn!("ACL sync: {e}");
                    return;
                }
            };
            self.acl_read_at
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|n, _| networks.contains(n));
            networks
        };
        for network in networks {
            // The cluster default network (from a conf file) has no NAD.
            let Some((ns, name)) = network.split_once('/') else {
                continue;
            };
            let read_at = std::time::Instant::now();
            let nad = match self.source.get_nad(ns, name) {
                Ok(n) => n,
                Err(e) => {
                    tracing::debug!(%network, "ACL sync: {e}");
                    continue;
                }
            };
            let acl = match nad.acl() {
                Ok(acl) => acl,
                Err(e) => {
                    let msg = e.to_string();
                    if reported.get(&network) != Some(&msg) {
                        tracing::warn!(%network, "keeping the current rules: NetworkAttachmentDefinition {}: {msg}", nad.qualified_name());
                        reported.insert(network.clone(), msg);
                    }
                    continue;
                }
            };
            reported.remove(&network);
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            // Its last attachment went while the NAD was read: an ACL set now would
            // hold an id that no DEL frees.
            if !dp.slots_of(&network).is_ok_and(|s| !s.is_empty()) {
                continue;
            }
            let current = dp.acl_of(&network).ok().flatten().map(|(_, d)| d);
            if current == acl.as_ref().map(|a| a.digest()) {
                continue;
            }
            match self.set_acl_read_at(&mut dp, &network, acl.as_ref(), read_at) {
                Ok(false) => {}
                Ok(true) => tracing::info!(
                    %network,
                    rules = acl.as_ref().map(|a| a.rules.len()).unwrap_or(0),
                    "ACL updated from its NetworkAttachmentDefinition"
                ),
                Err(e) => tracing::warn!(%network, "ACL update: {e}"),
            }
        }
    }

    pub fn records(&self) -> &RecordStore {
        &self.records
    }

    /// Answers one shim request. A panic anywhere in it is answered as an error, and
    /// an ADD that panicked is undone.
    pub fn handle(&self, req: &Request) -> Response {
        self.handle_received(req, crate::records::now_ms())
    }

    /// As `handle`, for a request that arrived at `received_ms` (ms since the Unix
    /// epoch; it may have waited for a worker since).
    pub fn handle_received(&self, req: &Request, received_ms: u64) -> Response {
        let requested = serde_json::from_str::<Value>(&req.stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.dispatch(req, received_ms)
        }))
        .unwrap_or_else(|panic| Err(self.after_panic(req, panic)));
        match answered {
            Ok(v) => Response {
                ok: true,
                stdout: v.map(|v| v.to_string()).unwrap_or_default(),
            },
            Err(e) => {
                let cmd = req
                    .env
                    .get("CNI_COMMAND")
                    .map(String::as_str)
                    .unwrap_or("?");
                let id = req
                    .env
                    .get("CNI_CONTAINERID")
                    .map(String::as_str)
                    .unwrap_or("");
                tracing::warn!(command = cmd, container = id, code = e.code, "{e}");
                Response {
                    ok: false,
                    stdout: e.with_version(&requested).to_json(),
                }
            }
        }
    }

    /// The error for a request that panicked; an ADD's attachments are torn down as
    /// its rollback would have.
    fn after_panic(&self, req: &Request, panic: Box<dyn std::any::Any + Send>) -> CniError {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        tracing::error!("request panicked: {what}");
        let err = CniError::new(
            ErrorCode::Io,
            format!("internal error in the trellis agent (a bug; please report it): {what}"),
        );
        let env = match CniEnv::from_vars(&req.env) {
            Ok(env) if env.command == Command::Add => env,
            _ => return err,
        };
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let _lock = self.locks.lock(&env.container_id);
        match self.records.load(&env.container_id) {
            Ok(Some(record)) => self.roll_back(record, err),
            Ok(None) => err,
            Err(e) => err.with_details(format!("rollback: {e}")),
        }
    }

    fn dispatch(&self, req: &Request, received_ms: u64) -> Result<Option<Value>, CniError> {
        if req.stdin.len() > MAX_STDIN {
            return Err(CniError::new(
                ErrorCode::Decode,
                format!("network configuration is larger than {MAX_STDIN} bytes"),
            ));
        }
        let env = CniEnv::from_vars(&req.env)?;
        if env.command == Command::Version {
            return Ok(Some(trellis_cni::version::version_info(None)));
        }
        let conf = parse_shim_conf(&req.stdin)?;
        let started = std::time::Instant::now();
        let out = match env.command {
            Command::Add => {
                let added = self.shared(|| self.add(&env, &conf));
                if let (Err(e), Some(p)) = (&added, pod_ref(&env)) {
                    let mut message = e.msg.clone();
                    if !e.details.is_empty() {
                        message = format!("{message} ({})", e.details);
                    }
                    self.source.pod_event(
                        &p,
                        crate::source::PodEvent {
                            warning: true,
                            reason: "FailedAddingInterface",
                            message,
                        },
                    );
                }
                added.map(Some)
            }
            Command::Del => self.shared(|| self.del(&env, &conf)).map(|_| None),
            Command::Check => self.shared(|| self.check(&env, &conf)).map(|_| None),
            Command::Gc => self.gc(&conf, received_ms).map(|_| None),
            Command::Status => self.status().map(|_| None),
            Command::Version => unreachable!("answered above"),
        };
        self.metrics
            .observe(env.command.as_str(), out.is_ok(), started.elapsed());
        tracing::info!(
            command = env.command.as_str(),
            container = %env.container_id,
            ok = out.is_ok(),
            micros = started.elapsed().as_micros() as u64,
            "cni request"
        );
        out
    }

    /// Runs `f` while no GC runs.
    fn shared<T>(&self, f: impl FnOnce() -> T) -> T {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// The default network's conf when no pod annotation overrides it (GC, STATUS).
    pub fn load_default_network(&self) -> Result<NetConfList, CniError> {
        use crate::config::DefaultNetwork;
        match &self.default_network {
            DefaultNetwork::File(path) => crate::node_conf::read_primary(path)
                .map(|p| p.conf)
                .map_err(|e| invalid(format!("default network: {e}"))),
            DefaultNetwork::Auto => {
                crate::node_conf::find_primary(&self.cni_conf_dir, &self.cni_conf_file)
                    .map(|p| p.conf)
                    .map_err(|e| {
                        // Node boot, or the cluster network being replaced: the runtime
                        // tries again.
                        let code = if e.is_not_yet() {
                            ErrorCode::TryAgainLater
                        } else {
                            ErrorCode::InvalidNetworkConfig
                        };
                        CniError::new(code, format!("default network: {e}"))
                    })
            }
            DefaultNetwork::Nad { namespace, name } => {
                let sel = selection::NetworkSelection {
                    namespace: namespace.clone(),
                    name: name.clone(),
                    ..Default::default()
                };
                Ok(self.default_from_nad(&sel, "eth0", None)?.conf)
            }
        }
    }

    /// The cluster network from a NAD: the node's config names it, or (`pod_ns`, the
    /// pod's namespace) the pod's default-network annotation, held to the namespace
    /// rules as any NAD a pod names. A logical network there is one as anywhere.
    fn default_from_nad(
        &self,
        sel: &selection::NetworkSelection,
        ifname: &str,
        pod_ns: Option<&str>,
    ) -> Result<Planned, CniError> {
        let read_at = std::time::Instant::now();
        let nad = self
            .source
            .get_nad(&sel.namespace, &sel.name)
            .map_err(from_source_err)?;
        let network = nad.qualified_name();
        if let Some(pod_ns) = pod_ns {
            self.namespaces.check(pod_ns, &nad).map_err(|e| {
                invalid(format!(
                    "default network {network} ({ifname}, {DEFAULT_NETWORK_ANNOTATION}): {e}"
                ))
            })?;
        }
        let acl = self
            .nad_acl(&nad, &network, ifname)?
            .map(|acl| PlannedAcl { acl, read_at });
        let conf = nad.conf_list().map_err(from_nad_err)?;
        self.check_policy(&conf, &network, ifname, &nad)?;
        let net = format!("default network {network} ({ifname})");
        let logical = self.nad_logical(&nad, &conf, &net)?;
        Ok(Planned {
            physical: logical
                .as_ref()
                .map(|l| l.physical.clone())
                .or_else(|| crate::logical::physical(&conf, nad.resource_name())),
            created: nad.metadata.creation_timestamp.clone(),
            network,
            ifname: ifname.to_string(),
            cluster_default: true,
            conf,
            runtime_config: Map::new(),
            default_route: Vec::new(),
            resource: None,
            device: None,
            acl,
            bandwidth: Default::default(),
            logical,
        })
    }

    /// The NAD's logical network, if it is one (and the dataplane, which isolates
    /// it, is on). `net` names the attachment in errors.
    fn nad_logical(
        &self,
        nad: &crate::nad::NetworkAttachmentDefinition,
        conf: &NetConfList,
        net: &str,
    ) -> Result<Option<crate::logical::Logical>, CniError> {
        let logical = crate::logical::of_nad(nad, conf).map_err(|e| {
            invalid(format!(
                "{net}: NetworkAttachmentDefinition {}: {e}",
                nad.qualified_name()
            ))
        })?;
        if logical.is_some() && self.dataplane.is_none() {
            return Err(invalid(format!(
                "{net} is a logical network ({}) but the agent's eBPF dataplane, which isolates it, is off ({})",
                crate::logical::LOGICAL_ANNOTATION,
                self.dataplane_off
            )));
        }
        Ok(logical)
    }

    /// Resolves every network of the pod; changes nothing.
    fn plan(
        &self,
        env: &CniEnv,
        pod: Option<&PodRef>,
        annotations: &BTreeMap<String, String>,
        runtime_config: &Map<String, Value>,
    ) -> Result<Vec<Planned>, CniError> {
        let pod_ns = pod.map(|p| p.namespace.as_str()).unwrap_or("default");
        let mut default_rc = runtime_config.clone();
        default_rc.remove(POD_ANNOTATIONS_CAPABILITY);
        // With the pod's namespace when the pod chose it.
        let from_nad = match annotations.get(DEFAULT_NETWORK_ANNOTATION) {
            Some(a) => Some((
                selection::parse_default_network(a, pod_ns).map_err(|e| invalid(e.to_string()))?,
                Some(pod_ns),
            )),
            None => match &self.default_network {
                crate::config::DefaultNetwork::Nad { namespace, name } => Some((
                    selection::NetworkSelection {
                        namespace: namespace.clone(),
                        name: name.clone(),
                        ..Default::default()
                    },
                    None,
                )),
                _ => None,
            },
        };
        let mut default = match from_nad {
            Some((sel, chosen_in)) => self.default_from_nad(&sel, &env.ifname, chosen_in)?,
            None => {
                let conf = self.load_default_network()?;
                Planned {
                    network: conf.name.clone(),
                    ifname: env.ifname.clone(),
                    cluster_default: true,
                    physical: crate::logical::physical(&conf, None),
                    created: None,
                    conf,
                    runtime_config: Map::new(),
                    default_route: Vec::new(),
                    resource: None,
                    device: None,
                    acl: None,
                    bandwidth: Default::default(),
                    logical: None,
                }
            }
        };
        default.runtime_config = default_rc;
        let mut plan = vec![default];
        let selections = match annotations.get(NETWORKS_ANNOTATION) {
            Some(a) => selection::parse_networks(a, pod_ns, &env.ifname)
                .map_err(|e| invalid(e.to_string()))?,
            None => Vec::new(),
        };
        for sel in selections {
            plan.push(self.plan_selection(sel, pod_ns)?);
        }
        self.assign_devices(pod, &mut plan)?;
        Ok(plan)
    }

    /// Networks backed by a resource pool get the devices kubelet allocated to the pod
    /// from that pool, one each, in annotation order. A `deviceID` written in the NAD
    /// config is untrusted: it is used only if it is a device of a pool of this node
    /// (the NAD's `resourceName` pool, if it names one) and, where kubelet's
    /// PodResources API is there, one kubelet allocated to this pod.
    fn assign_devices(&self, pod: Option<&PodRef>, plan: &mut [Planned]) -> Result<(), CniError> {
        let mut by_resource: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        let mut given: Vec<(usize, String, String)> = Vec::new();
        for (i, p) in plan.iter_mut().enumerate() {
            let mut ids = Vec::new();
            for (k, pl) in p.conf.plugins.iter().enumerate() {
                match pl.get("deviceID") {
                    None => {}
                    Some(Value::String(d)) => {
                        ids.push((format!("plugins[{k}].deviceID"), d.clone()))
                    }
                    Some(_) => {
                        return Err(invalid(format!(
                            "network {} ({}): plugins[{k}].deviceID must be a string",
                            p.network, p.ifname
                        )))
                    }
                }
            }
            if let Some((_, d)) = ids.first() {
                p.device = Some(d.clone());
            } else if let Some(r) = &p.resource {
                by_resource.entry(r.clone()).or_default().push(i);
            }
            given.extend(ids.into_iter().map(|(field, d)| (i, field, d)));
        }
        if by_resource.is_empty() && given.is_empty() {
            return Ok(());
        }
        // PodResources answers per resource; asked once each.
        let mut allocations: BTreeMap<String, Vec<String>> = BTreeMap::new();
        let kubelet = self.pod_resources.exists();
        // With Kubernetes, kubelet is always there to vouch for a device: a socket that
        // is missing (not mounted, kubelet restarting) is not a reason to skip the check.
        if !kubelet && self.kubelet_required {
            return Err(CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "networks with devices need kubelet's PodResources API, and {} is not there (kubelet restarting, or not mounted into the agent)",
                    self.pod_resources.display()
                ),
            ));
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| CniError::new(ErrorCode::Io, e.to_string()))?;
        let mut allocated = |resource: &str| -> Result<Vec<String>, CniError> {
            if let Some(ids) = allocations.get(resource) {
                return Ok(ids.clone());
            }
            let pod = pod.ok_or_else(|| {
                invalid("networks with devices need the pod's name (K8S_POD_NAMESPACE, K8S_POD_NAME in CNI_ARGS)")
            })?;
            let ids = self.pod_devices(&rt, pod, resource)?;
            allocations.insert(resource.to_string(), ids.clone());
            Ok(ids)
        };
        let mut taken: HashSet<String> = HashSet::new();
        for (i, field, id) in given {
            let p = &plan[i];
            let ctx = format!("network {} ({}): {field} {id:?}", p.network, p.ifname);
            let resource = match (self.pools_configured(), p.resource.as_deref()) {
                // The node's pools say which resource it is.
                (true, named) => {
                    let pool = self
                        .pool_of(&id)
                        .map_err(|why| invalid(format!("{ctx}: {why}")))?;
                    if let Some(r) = named.filter(|r| *r != pool) {
                        return Err(invalid(format!(
                            "{ctx}: is a device of pool {pool}, not of the NAD's resourceName {r}"
                        )));
                    }
                    pool
                }
                // No pools here (another device plugin serves them): only kubelet can
                // vouch for it, as a device of the NAD's resource given to this pod.
                (false, Some(r)) if kubelet => r.to_string(),
                (false, _) => {
                    return Err(invalid(format!(
                        "{ctx}: this node has no device pools ([devices] is not configured){}, so a device named in a NAD is never given to pods",
                        if kubelet { " and the NAD names no resourceName kubelet could vouch for" } else { " and no kubelet to vouch for it" }
                    )))
                }
            };
            if kubelet && !allocated(&resource)?.contains(&id) {
                return Err(invalid(format!(
                    "{ctx}: kubelet did not allocate this device of {resource} to the pod (it must be requested as a resource)"
                )));
            }
            taken.insert(id);
        }
        for (resource, idxs) in by_resource {
            // Devices the pod's NADs named are not handed out a second time.
            let ids: Vec<String> = allocated(&resource)?
                .into_iter()
                .filter(|id| !taken.contains(id))
                .collect();
            if ids.len() < idxs.len() {
                let p = &plan[idxs[ids.len()]];
                return Err(invalid(format!(
                    "network {} ({}): pod {} was allocated {} device(s) of {resource} but asks for {} network(s) from it",
                    p.network,
                    p.ifname,
                    pod.map(ToString::to_string).unwrap_or_default(),
                    ids.len(),
                    idxs.len()
                )));
            }
            for (i, id) in idxs.into_iter().zip(ids) {
                let p = &mut plan[i];
                // Kubelet hands out what the pools offered; a device no pool serves now
                // (the pool config changed since) is not used. Without pools here,
                // another device plugin serves the resource and kubelet vouches for it.
                match self.pool_of(&id) {
                    _ if !self.pools_configured() => {}
                    Ok(pool) if pool == resource => {}
                    Ok(pool) => {
                        return Err(invalid(format!(
                            "network {} ({}): device {id} allocated for {resource} is now in pool {pool}",
                            p.network, p.ifname
                        )))
                    }
                    Err(why) => {
                        return Err(invalid(format!(
                            "network {} ({}): device {id} allocated for {resource}: {why}",
                            p.network, p.ifname
                        )))
                    }
                }
                // Into the plugin that takes devices (the first, in a conflist).
                let first = p
                    .conf
                    .plugins
                    .iter()
                    .position(|pl| {
                        pl.get("type").and_then(Value::as_str) == Some(crate::sriov::TYPE)
                    })
                    .unwrap_or(0);
                p.conf.plugins[first].insert("deviceID".into(), Value::String(id.clone()));
                p.device = Some(id);
            }
        }
        Ok(())
    }

    /// Whether this agent serves device pools (`[devices]`).
    fn pools_configured(&self) -> bool {
        self.device_pools.is_some()
    }

    /// The pool that serves device `id`, or why there is none.
    fn pool_of(&self, id: &str) -> Result<String, String> {
        let Some(pools) = &self.device_pools else {
            return Err("this node has no device pools ([devices] is not configured), so no device is given to pods".into());
        };
        let pools = pools.lock().unwrap_or_else(|p| p.into_inner());
        pools
            .pool_of(id)
            .map(str::to_string)
            .ok_or_else(|| "is not a device of any pool of this node".into())
    }

    /// Device IDs of `resource` kubelet allocated to `pod`, asked with a deadline.
    fn pod_devices(
        &self,
        rt: &tokio::runtime::Runtime,
        pod: &PodRef,
        resource: &str,
    ) -> Result<Vec<String>, CniError> {
        rt.block_on(async {
            tokio::time::timeout(
                POD_RESOURCES_TIMEOUT,
                trellis_device_plugin::podresources::pod_devices(
                    &self.pod_resources,
                    &pod.namespace,
                    &pod.name,
                    resource,
                ),
            )
            .await
        })
        .map_err(|_| {
            CniError::new(
                ErrorCode::TryAgainLater,
                format!(
                    "kubelet PodResources API at {} did not answer within {} s",
                    self.pod_resources.display(),
                    POD_RESOURCES_TIMEOUT.as_secs()
                ),
            )
        })?
        .map_err(|e| CniError::new(ErrorCode::TryAgainLater, e.to_string()))
    }

    /// A NAD's delegate config against the node's `[nad_policy]`.
    fn check_policy(
        &self,
        conf: &NetConfList,
        network: &str,
        ifname: &str,
        nad: &crate::nad::NetworkAttachmentDefinition,
    ) -> Result<(), CniError> {
        self.nad_policy.check(conf).map_err(|e| {
            invalid(format!(
                "network {network} ({ifname}): NetworkAttachmentDefinition {}: spec.config {e}",
                nad.qualified_name()
            ))
        })
    }

    /// The NAD's ACL, checked; refused where the dataplane that would enforce it is off.
    fn nad_acl(
        &self,
        nad: &crate::nad::NetworkAttachmentDefinition,
        network: &str,
        ifname: &str,
    ) -> Result<Option<crate::acl::Acl>, CniError> {
        let acl = nad.acl().map_err(|e| {
            invalid(format!(
                "network {network} ({ifname}): NetworkAttachmentDefinition {}: {e}",
                nad.qualified_name()
            ))
        })?;
        if acl.is_some() && self.dataplane.is_none() {
            return Err(invalid(format!(
                "network {network} ({ifname}) has an ACL ({}) but the agent's eBPF dataplane is off ({}): refusing to attach it unfiltered",
                crate::acl::ACL_ANNOTATION,
                self.dataplane_off
            )));
        }
        Ok(acl)
    }

    /// The attachment's bandwidth limits: the selection's within the NAD's cap. A
    /// chain that declares the `bandwidth` capability gets them as its runtimeConfig
    /// (the reference plugin keeps them); otherwise trellis does: an SR-IOV VF's
    /// egress as its max_tx_rate, the rest in the dataplane (returned).
    fn plan_bandwidth(
        &self,
        sel: &NetworkSelection,
        nad: &crate::nad::NetworkAttachmentDefinition,
        conf: &mut NetConfList,
        runtime_config: &mut Map<String, Value>,
    ) -> Result<crate::bandwidth::Limits, CniError> {
        use crate::bandwidth::Limits;
        let net = format!("network {} ({})", sel.qualified_name(), sel.interface);
        let at = |e: crate::bandwidth::BandwidthError| invalid(format!("{net}: {e}"));
        let asked = sel
            .bandwidth
            .as_ref()
            .map(|b| Limits::parse(b, "bandwidth"))
            .transpose()
            .map_err(at)?
            .unwrap_or_default();
        let cap = nad.bandwidth().map_err(|e| {
            invalid(format!(
                "{net}: NetworkAttachmentDefinition {}: {e}",
                nad.qualified_name()
            ))
        })?;
        let mut limits = Limits::within(asked, cap).map_err(at)?;
        if limits.is_none() {
            return Ok(limits);
        }
        if conf.has_capability("bandwidth") {
            runtime_config.insert("bandwidth".into(), limits.to_runtime_config());
            return Ok(Limits::default());
        }
        let first = conf.plugins.first_mut();
        match first.as_ref().and_then(|p| p.get("type")).and_then(Value::as_str) {
            Some(crate::vhostuser::TYPE) => {
                return Err(invalid(format!(
                    "{net}: a bandwidth limit cannot be kept on a vhost-user socket: no kernel interface carries its traffic (limit it in the userspace switch, or leave bandwidth out)"
                )))
            }
            Some(crate::sriov::TYPE) => {
                if let (Some(egress), Some(p)) = (limits.egress.take(), first) {
                    let mbps = u64::from(crate::bandwidth::vf_max_tx_rate(egress).map_err(at)?);
                    let set = match p.get("max_tx_rate") {
                        None => None,
                        Some(v) => Some(v.as_u64().ok_or_else(|| {
                            invalid(format!("{net}: max_tx_rate {v} is not a whole number of Mbit/s"))
                        })?),
                    }
                    .filter(|v| *v != 0);
                    let max = set.map_or(mbps, |s| s.min(mbps));
                    if let Some(min) = p.get("min_tx_rate").and_then(Value::as_u64) {
                        if min > max {
                            return Err(invalid(format!(
                                "{net}: bandwidth.egressRate: {} Mbit/s is below the config's min_tx_rate, {min} Mbit/s",
                                max
                            )));
                        }
                    }
                    p.insert("max_tx_rate".into(), max.into());
                }
            }
            _ => {}
        }
        if !limits.is_none() && self.dataplane.is_none() {
            return Err(invalid(format!(
                "{net} has a bandwidth limit that no plugin of its chain keeps (none declares the \"bandwidth\" capability), and the agent's eBPF dataplane, which would keep it, is off ({})",
                self.dataplane_off
            )));
        }
        Ok(limits)
    }

    fn plan_selection(&self, sel: NetworkSelection, pod_ns: &str) -> Result<Planned, CniError> {
        let read_at = std::time::Instant::now();
        let nad = self
            .source
            .get_nad(&sel.namespace, &sel.name)
            .map_err(from_source_err)?;
        self.namespaces.check(pod_ns, &nad).map_err(|e| {
            invalid(format!(
                "network {} ({}): {e}",
                sel.qualified_name(),
                sel.interface
            ))
        })?;
        let mut conf = nad.conf_list().map_err(from_nad_err)?;
        self.check_policy(&conf, &sel.qualified_name(), &sel.interface, &nad)?;
        let mut runtime_config = sel.runtime_config();
        // Passed on below if a plugin of the chain keeps limits itself.
        runtime_config.remove("bandwidth");
        for cap in runtime_config.keys() {
            if !conf.has_capability(cap) {
                return Err(invalid(format!(
                    "network {} ({}): the selection sets {cap:?} but no plugin in the NetworkAttachmentDefinition's config declares the {cap:?} capability",
                    sel.qualified_name(),
                    sel.interface
                )));
            }
        }
        if let Some(args) = &sel.cni_args {
            // As Multus does: cni-args reach each plugin as args.cni.
            for p in &mut conf.plugins {
                let slot = p.entry("args").or_insert_with(|| Value::Object(Map::new()));
                if let Value::Object(m) = slot {
                    m.insert("cni".into(), Value::Object(args.clone()));
                }
            }
        }
        let acl = self
            .nad_acl(&nad, &sel.qualified_name(), &sel.interface)?
            .map(|acl| PlannedAcl { acl, read_at });
        let bandwidth = self.plan_bandwidth(&sel, &nad, &mut conf, &mut runtime_config)?;
        let net = format!("network {} ({})", sel.qualified_name(), sel.interface);
        let logical = self.nad_logical(&nad, &conf, &net)?;
        Ok(Planned {
            physical: logical
                .as_ref()
                .map(|l| l.physical.clone())
                .or_else(|| crate::logical::physical(&conf, nad.resource_name())),
            created: nad.metadata.creation_timestamp.clone(),
            acl,
            bandwidth,
            logical,
            network: sel.qualified_name(),
            ifname: sel.interface,
            cluster_default: false,
            conf,
            runtime_config,
            default_route: sel.default_route,
            resource: nad
                .metadata
                .annotations
                .get(crate::nad::RESOURCE_NAME_ANNOTATION)
                .cloned(),
            device: None,
        })
    }

    fn add(&self, env: &CniEnv, shim: &ShimConf) -> Result<Value, CniError> {
        let _lock = self.locks.lock(&env.container_id);
        if self
            .records
            .load(&env.container_id)
            .map_err(from_record_err)?
            .is_some()
        {
            return Err(invalid(format!(
                "container {} already has attachments; DEL it before another ADD",
                env.container_id
            )));
        }
        let pod = pod_ref(env);
        let runtime_annotations = runtime_annotations(&shim.runtime_config)?;
        let annotations = match &pod {
            Some(p) => self
                .source
                .pod_annotations(p, runtime_annotations.as_ref())
                .map_err(from_source_err)?,
            None => BTreeMap::new(),
        };
        let mut plan = self.plan(env, pod.as_ref(), &annotations, &shim.runtime_config)?;
        let mut record = Record {
            container_id: env.container_id.clone(),
            netns: env.netns.clone(),
            ifname: env.ifname.clone(),
            pod_namespace: pod
                .as_ref()
                .map(|p| p.namespace.clone())
                .unwrap_or_default(),
            pod_name: pod.as_ref().map(|p| p.name.clone()).unwrap_or_default(),
            pod_uid: pod.as_ref().map(|p| p.uid.clone()).unwrap_or_default(),
            cni_args: env.args.to_string(),
            attachments: Vec::new(),
            network_status: None,
            added_at_ms: None,
        };
        // Networks with an ACL are attached (and filtered) before ADD returns.
        let acls: Vec<Option<PlannedAcl>> = plan.iter().map(|p| p.acl.clone()).collect();
        for p in &plan {
            record.attachments.push(Attachment {
                network: p.network.clone(),
                ifname: p.ifname.clone(),
                cluster_default: p.cluster_default,
                conf: p.conf.to_value(),
                runtime_config: p.runtime_config.clone(),
                result: None,
                default_route: p.default_route.clone(),
                device: p.device.clone(),
                slot: None,
                bandwidth: p.bandwidth,
                logical: p.logical.clone(),
                physical: p.physical.clone(),
            });
        }
        self.check_logical_pods(pod.as_ref(), &plan)?;
        self.check_wires(&mut plan)?;
        for (a, p) in record.attachments.iter_mut().zip(&plan) {
            a.physical = p.physical.clone();
            a.logical = p.logical.clone();
        }
        // Logical networks: the checks against the cluster's logical NADs and this
        // node's live pods, and the plan's save, are one step against other ADDs.
        let gate = plan
            .iter()
            .any(|p| p.logical.is_some())
            .then(|| self.logical_gate.lock().unwrap_or_else(|p| p.into_inner()));
        if gate.is_some() {
            self.check_carvings(&plan)?;
            self.check_logical_overlaps(&record)?;
        }
        // The whole plan, on disk before the first delegate runs: a crash anywhere in
        // the ADD is undone by DEL. (One fdatasync per ADD; the saves after it describe
        // what already happened and need none.)
        if let Err(e) = self.records.save(&record) {
            record.attachments.clear();
            return Err(self.roll_back(record, from_record_err(e)));
        }
        drop(gate);
        for (i, p) in plan.into_iter().enumerate() {
            let target = Target {
                container_id: &env.container_id,
                netns: &env.netns,
                ifname: &p.ifname,
                args: &record.cni_args,
            };
            let started = std::time::Instant::now();
            let added = self.invoker.add_list(&p.conf, &target, &p.runtime_config);
            tracing::debug!(
                network = %p.network,
                ifname = %p.ifname,
                micros = started.elapsed().as_micros() as u64,
                "delegate ADD"
            );
            match added {
                Ok(result) => {
                    record.attachments[i].result = Some(result);
                    let _ = self.records.save_unsynced(&record);
                }
                Err((done, e)) => {
                    let err = e.to_cni_error(&format!("network {} ({})", p.network, p.ifname));
                    // Its DEL is a best effort only if nothing of the chain finished and
                    // the failure was an answer (not a timeout or crash).
                    let lenient = done == 0 && !e.needs_del();
                    // The ones not run yet: nothing of them exists. This one is DEL'd
                    // even if its first plugin failed: a plugin that fails part way may
                    // leave what it made (the reference bridge plugin leaves the pod's
                    // veth when the bridge refuses its gateway address).
                    record.attachments.truncate(i + 1);
                    return Err(self.roll_back_with(record, err, lenient));
                }
            }
        }
        if let Err(e) = check_logical_addresses(&record) {
            return Err(self.roll_back(record, e));
        }
        if let Err(e) = crate::routes::apply_default_routes(&env.netns, &record.attachments) {
            return Err(self.roll_back(record, invalid(e.to_string())));
        }
        if let Err(e) = self.attach_with_acls(&mut record, &acls) {
            return Err(self.roll_back(record, e));
        }
        // The other interfaces: counted from their first packet too. One that cannot
        // be attached does not fail the pod (it is retried at the next agent start).
        if let Err(e) = self.attach_dataplane(&mut record, false) {
            tracing::warn!(container = %record.container_id, "dataplane: {}", e.msg);
        }
        let merged = match merged_result(&record.attachments, &shim.cni_version) {
            Ok(m) => m,
            Err(e) => return Err(self.roll_back(record, e)),
        };
        let status = network_status::build(&record.attachments);
        record.network_status = Some(status.clone());
        record.added_at_ms = Some(crate::records::now_ms());
        if let Err(e) = self.records.save_unsynced(&record) {
            return Err(self.roll_back(record, from_record_err(e)));
        }
        if let Some(p) = &pod {
            // The pod already has its networks; a status that cannot be written is
            // logged, not a reason to tear them down.
            if let Err(e) = self.source.publish_network_status(p, &status.to_string()) {
                tracing::warn!(pod = %p, "cannot write {NETWORK_STATUS_ANNOTATION}: {e}");
            }
            for e in status.as_array().into_iter().flatten() {
                let ips: Vec<&str> = e["ips"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .collect();
                self.source.pod_event(
                    p,
                    crate::source::PodEvent {
                        warning: false,
                        reason: "AddedInterface",
                        message: format!(
                            "Add {} [{}] from {}",
                            e["interface"].as_str().unwrap_or(""),
                            ips.join(" "),
                            e["name"].as_str().unwrap_or("")
                        ),
                    },
                );
            }
        }
        Ok(merged)
    }

    /// A pod on a logical network whose packets nothing outside the pod checks
    /// (macvlan, ipvlan, a VF) may not be able to send raw frames or change its
    /// interfaces: its spec is checked, unless `logical_trust_pod_privileges`.
    fn check_logical_pods(&self, pod: Option<&PodRef>, plan: &[Planned]) -> Result<(), CniError> {
        for p in plan {
            let Some(l) = &p.logical else { continue };
            if self.logical_trust_pods {
                continue;
            }
            let spec = match pod {
                // Without its uid, a stale pod of the same name could be checked.
                Some(pod) if !pod.uid.is_empty() => {
                    self.source.pod_spec(pod).map_err(from_source_err)?
                }
                _ => None,
            };
            let reason = match spec {
                Some(spec) => match crate::logical::raw_access(&spec) {
                    Some(r) => r,
                    None => continue,
                },
                None => "the agent cannot see the pod's spec to check it (no Kubernetes API source, or no K8S_POD_UID from the runtime); set logical_trust_pod_privileges = true in the agent config only if admission keeps privileged containers, hostPID and every capability beyond the runtime defaults (NET_RAW included) out of these pods".into(),
            };
            let e = crate::logical::LogicalError::Privileged {
                network: p.network.clone(),
                kind: l.physical.clone(),
                reason,
            };
            return Err(invalid(format!(
                "network {} ({}): {e}",
                p.network, p.ifname
            )));
        }
        Ok(())
    }

    /// The physical networks of the plan as this node resolves them, held to
    /// `logical_physical_networks`: a logical network only on one of them, and no
    /// attachment that is not a logical network on any of them. Sets each planned
    /// attachment's `physical` (and its logical network's) to the resolved name.
    fn check_wires(&self, plan: &mut [Planned]) -> Result<(), CniError> {
        if self.logical_wires.is_empty() {
            return match plan.iter().find(|p| p.logical.is_some()) {
                Some(p) => Err(invalid(format!(
                    "network {} ({}) is a logical network, and this node shares no physical network out to logical networks (logical_physical_networks in the agent config)",
                    p.network, p.ifname
                ))),
                None => Ok(()),
            };
        }
        let resolve = |physical: &str| {
            crate::logical::canonical(physical, crate::dataplane::root_device).map_err(|e| {
                CniError::new(
                    ErrorCode::Io,
                    format!("cannot tell which device {physical} is on this node: {e}"),
                )
            })
        };
        let open: Vec<String> = self
            .logical_wires
            .iter()
            .map(|w| resolve(w))
            .collect::<Result<_, _>>()?;
        let wires = self.logical_wires.join(", ");
        for p in plan.iter_mut() {
            let net = format!("network {} ({})", p.network, p.ifname);
            if crate::logical::link_in_container(&p.conf) {
                return Err(invalid(format!(
                    "{net}: linkInContainer (a master inside the pod, which could be another network's interface) is refused on a node that shares physical networks out to logical networks ({wires})"
                )));
            }
            let Some(physical) = &p.physical else {
                if crate::logical::wired_unknown(&p.conf, p.resource.as_deref()) {
                    return Err(invalid(format!(
                        "{net}: its physical network cannot be told (a macvlan, ipvlan or vlan plugin without a master takes the default-route device; an sriov network needs the NAD's k8s.v1.cni.cncf.io/resourceName), and this node shares physical networks out to logical networks ({wires})"
                    )));
                }
                continue;
            };
            let resolved = resolve(physical)?;
            let is_open = open.contains(&resolved);
            match &mut p.logical {
                Some(_) if !is_open => {
                    return Err(invalid(format!(
                        "{net}: logical network on physical network {physical} ({resolved} on this node), which is not one this node shares out to logical networks (logical_physical_networks: [{wires}])"
                    )));
                }
                Some(l) => l.physical = resolved.clone(),
                None if is_open => {
                    let e = crate::logical::LogicalError::Reserved {
                        network: p.network.clone(),
                        physical: format!("{physical} ({resolved} on this node)"),
                        by: "this node's logical_physical_networks".into(),
                    };
                    return Err(invalid(format!("{net}: {e}")));
                }
                None => {}
            }
            p.physical = Some(resolved);
        }
        Ok(())
    }

    /// The plan's logical networks against the cluster's logical NADs on the same
    /// physical network (as this node resolves them): no overlap with one carved
    /// before.
    fn check_carvings(&self, plan: &[Planned]) -> Result<(), CniError> {
        use crate::logical::{canonical, check_cluster, of_nad, Carving};
        let mut cluster = Vec::new();
        for n in self.source.logical_nads().map_err(from_source_err)? {
            let Some(Ok(Some(mut l))) = n.conf_list().ok().map(|c| of_nad(&n, &c)) else {
                continue;
            };
            l.physical = canonical(&l.physical, crate::dataplane::root_device).map_err(|e| {
                CniError::new(
                    ErrorCode::Io,
                    format!(
                        "cannot tell which device {} is on this node: {e}",
                        l.physical
                    ),
                )
            })?;
            cluster.push(Carving {
                network: n.qualified_name(),
                created: n.metadata.creation_timestamp.clone(),
                logical: l,
            });
        }
        for p in plan {
            let Some(l) = &p.logical else { continue };
            let me = Carving {
                network: p.network.clone(),
                created: p.created.clone(),
                logical: l.clone(),
            };
            check_cluster(&me, &cluster)
                .map_err(|e| invalid(format!("network {} ({}): {e}", p.network, p.ifname)))?;
        }
        Ok(())
    }

    /// Fails if a logical network of `record` overlaps another on the same physical
    /// network (one of the live pods' on this node, or another of this pod's), or
    /// shares it with a live attachment that is no logical network.
    fn check_logical_overlaps(&self, record: &Record) -> Result<(), CniError> {
        let (live, unreadable) = self.records.list().map_err(from_record_err)?;
        // A record that cannot be read could be any tenant's: no check without it.
        if let Some(e) = unreadable.first() {
            return Err(CniError::new(
                ErrorCode::Io,
                format!("cannot check logical networks against this node's pods: {e}"),
            ));
        }
        // As this node resolves it now (records of earlier agents hold names as the
        // NAD gave them, or none: then from their conf).
        let physical_of = |b: &Attachment| -> Option<String> {
            let p = b.physical.clone().or_else(|| {
                let conf = NetConfList::parse(b.conf.to_string().as_bytes(), None).ok()?;
                crate::logical::physical(&conf, None)
            })?;
            Some(crate::logical::canonical(&p, crate::dataplane::root_device).unwrap_or(p))
        };
        for a in record.attachments.iter().filter(|a| a.logical.is_some()) {
            let physical = a.physical.as_deref();
            let plain = live
                .iter()
                .filter(|r| r.container_id != record.container_id)
                .chain(std::iter::once(record))
                .flat_map(|r| r.attachments.iter().map(move |b| (r, b)))
                .find(|(_, b)| b.logical.is_none() && physical_of(b).as_deref() == physical);
            if let Some((r, b)) = plain {
                let e = crate::logical::LogicalError::Reserved {
                    network: format!(
                        "network {} of pod {}/{} ({})",
                        b.network, r.pod_namespace, r.pod_name, b.ifname
                    ),
                    physical: physical.unwrap_or_default().to_string(),
                    by: format!("logical network {}", a.network),
                };
                return Err(invalid(format!(
                    "network {} ({}): {e}",
                    a.network, a.ifname
                )));
            }
        }
        let mut others: Vec<(String, crate::logical::Logical)> = live
            .iter()
            .filter(|r| r.container_id != record.container_id)
            .chain(std::iter::once(record))
            .flat_map(|r| r.attachments.iter())
            .filter_map(|a| a.logical.clone().map(|l| (a.network.clone(), l)))
            .map(|(n, mut l)| {
                if let Ok(p) = crate::logical::canonical(&l.physical, crate::dataplane::root_device)
                {
                    l.physical = p;
                }
                (n, l)
            })
            .collect();
        others.dedup();
        for a in &record.attachments {
            let Some(l) = &a.logical else { continue };
            crate::logical::check_overlap(
                &a.network,
                l,
                others.iter().map(|(n, o)| (n.as_str(), o)),
            )
            .map_err(|e| invalid(format!("network {} ({}): {e}", a.network, a.ifname)))?;
        }
        Ok(())
    }

    /// Undoes a partial ADD; the error says what failed and, if undoing failed too,
    /// what is left for the runtime's DEL.
    fn roll_back(&self, record: Record, err: CniError) -> CniError {
        self.roll_back_with(record, err, false)
    }

    /// `roll_back`; `lenient`: the last attachment's ADD failed in its first plugin
    /// with an answer, so its DEL is a best effort (see `tear_down`).
    fn roll_back_with(&self, record: Record, err: CniError, lenient: bool) -> CniError {
        let netns = record.netns.clone();
        let failures = self.tear_down(record, &netns, lenient);
        if failures.is_empty() {
            err
        } else {
            let details = failures.join("; ");
            tracing::error!("rollback incomplete: {details}");
            err.with_details(format!("rollback incomplete (DEL will retry): {details}"))
        }
    }

    /// DELs every attachment in reverse, whatever fails; keeps the record of what could
    /// not be removed so a later DEL retries exactly that.
    /// With `add_failed` (a rollback), the last attachment is the one whose ADD just
    /// failed: its DEL is a best effort (a plugin that failed on a bad config usually
    /// fails its DEL the same way, and a record kept for it would hold the sandbox).
    fn tear_down(&self, mut record: Record, netns: &str, add_failed: bool) -> Vec<String> {
        let mut failures = Vec::new();
        // The dataplane goes last: a delegate's DEL usually deletes the interface (or
        // moves a VF out of the pod), its filters with it, so what is left to undo is
        // the slot itself.
        let slots: Vec<(u32, String, String)> = record
            .attachments
            .iter()
            .filter_map(|a| a.slot.map(|s| (s, a.ifname.clone(), a.network.clone())))
            .collect();
        if let Some(dp) = &self.dataplane {
            // A qdisc shaping an interface goes before the delegate's DEL, which may
            // take the interface back to the host (host-device, VFs) with it.
            for a in record.attachments.iter().filter(|a| !a.bandwidth.is_none()) {
                if let Some(slot) = a.slot {
                    let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
                    dp.unshape(slot, &record.container_id, &a.ifname);
                }
            }
        }
        let mut kept = Vec::new();
        let mut lenient = add_failed;
        while let Some(a) = record.attachments.pop() {
            let best_effort = std::mem::take(&mut lenient) && a.result.is_none();
            let conf = match NetConfList::from_value(a.conf.clone(), None) {
                Ok(c) => c,
                Err(e) => {
                    // Nothing of it can be run (an older agent recorded a config this
                    // one refuses, such as a plugin named by a path): a DEL that kept
                    // it would fail for ever and hold the sandbox.
                    tracing::warn!(container = %record.container_id, network = %a.network, ifname = %a.ifname,
                        conf = %a.conf, "recorded config cannot be run ({e}); its attachment is dropped without a delegate DEL");
                    continue;
                }
            };
            let target = Target {
                container_id: &record.container_id,
                netns,
                ifname: &a.ifname,
                args: &record.cni_args,
            };
            let started = std::time::Instant::now();
            let mut errs: Vec<InvokeError> =
                self.invoker
                    .del_list(&conf, &target, &a.runtime_config, a.result.as_ref());
            tracing::debug!(
                network = %a.network,
                ifname = %a.ifname,
                micros = started.elapsed().as_micros() as u64,
                "delegate DEL"
            );
            if a.result.is_none() {
                // Its ADD never finished (or never started: the plan is recorded whole
                // before the first delegate): a plugin that cannot be found now cannot
                // hold anything of it.
                errs.retain(|e| {
                    e.needs_del()
                        || !matches!(
                            e,
                            InvokeError::NotFound { .. } | InvokeError::BadName { .. }
                        )
                });
            }
            if best_effort && !errs.is_empty() {
                tracing::warn!(container = %record.container_id, network = %a.network, ifname = %a.ifname,
                    "DEL after its failed ADD failed too (left to the plugin): {}",
                    errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
                errs.clear();
            }
            if !errs.is_empty() {
                failures.extend(
                    errs.iter()
                        .map(|e| format!("network {} ({}): {e}", a.network, a.ifname)),
                );
                kept.push(a);
            }
        }
        kept.reverse();
        record.attachments = kept;
        if let Some(dp) = self.dataplane.as_ref().filter(|_| !slots.is_empty()) {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            for (slot, ifname, network) in slots {
                // Only a slot this attachment still owns: after a reboot the number
                // may be another pod's.
                match dp.detach_owned(slot, &record.container_id, &ifname) {
                    Ok(mine) => {
                        if !mine {
                            tracing::info!(container = %record.container_id, %ifname, slot,
                                "dataplane slot is no longer this attachment's; left alone");
                        }
                        for a in record
                            .attachments
                            .iter_mut()
                            .filter(|a| a.slot == Some(slot))
                        {
                            a.slot = None;
                        }
                    }
                    Err(e) => failures.push(format!("network {network} ({ifname}): {e}")),
                }
            }
        }
        if let Some(dp) = &self.dataplane {
            // Also after a failed ADD whose attach kept a socket in the pod's netns.
            dp.lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget_pod_socket();
        }
        let saved = if record.attachments.is_empty() {
            self.records.remove(&record.container_id)
        } else {
            self.records.save(&record)
        };
        if let Err(e) = saved {
            failures.push(e.to_string());
        }
        failures
    }

    fn del(&self, env: &CniEnv, shim: &ShimConf) -> Result<(), CniError> {
        let _lock = self.locks.lock(&env.container_id);
        let Some(record) = self
            .records
            .load(&env.container_id)
            .map_err(from_record_err)?
        else {
            // A record file with no snapshot in it (the agent died creating it) goes.
            self.records
                .remove(&env.container_id)
                .map_err(from_record_err)?;
            return self.del_unrecorded(env, shim);
        };
        let failures = self.tear_down(record, &env.netns, false);
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Io,
                format!("DEL incomplete: {}", failures.join("; ")),
            ))
        }
    }

    /// DEL of a container trellis has no record of: already deleted, an ADD that
    /// failed and was undone, or a pod started before trellis was installed. The last
    /// was made by the node's primary conf, which gets the DEL (DEL is idempotent, so
    /// the other two lose nothing); secondary networks were never trellis's to undo.
    fn del_unrecorded(&self, env: &CniEnv, shim: &ShimConf) -> Result<(), CniError> {
        use crate::config::DefaultNetwork;
        let primary = match &self.default_network {
            DefaultNetwork::File(path) => crate::node_conf::read_primary(path),
            DefaultNetwork::Auto | DefaultNetwork::Nad { .. } => {
                crate::node_conf::find_primary(&self.cni_conf_dir, &self.cni_conf_file)
            }
        };
        let conf = match primary {
            Ok(p) => p.conf,
            Err(e) => {
                tracing::warn!(container = %env.container_id,
                    "DEL of a container with no attachments recorded: no primary conf to pass it to ({e})");
                return Ok(());
            }
        };
        let mut rc = shim.runtime_config.clone();
        rc.remove(POD_ANNOTATIONS_CAPABILITY);
        let args = env.args.to_string();
        let target = Target {
            container_id: &env.container_id,
            netns: &env.netns,
            ifname: &env.ifname,
            args: &args,
        };
        let errs = self.invoker.del_list(&conf, &target, &rc, None);
        if errs.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Io,
                format!(
                    "DEL on the primary network {} (no attachments recorded): {}",
                    conf.name,
                    errs.iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join("; ")
                ),
            ))
        }
    }

    fn check(&self, env: &CniEnv, shim: &ShimConf) -> Result<(), CniError> {
        let v = Version::parse(&shim.cni_version)
            .map_err(|e| CniError::new(ErrorCode::IncompatibleVersion, e))?;
        if !v.supports_check() {
            return Err(CniError::new(
                ErrorCode::IncompatibleVersion,
                format!(
                    "CHECK needs cniVersion 0.4.0 or later, got {}",
                    shim.cni_version
                ),
            ));
        }
        let _lock = self.locks.lock(&env.container_id);
        let record = self
            .records
            .load(&env.container_id)
            .map_err(from_record_err)?
            .ok_or_else(|| {
                CniError::new(
                    ErrorCode::UnknownContainer,
                    format!("container {} has no attachments", env.container_id),
                )
            })?;
        for a in &record.attachments {
            let ctx = format!("network {} ({})", a.network, a.ifname);
            let conf = NetConfList::from_value(a.conf.clone(), None)
                .map_err(|e| invalid(format!("{ctx}: recorded config unreadable: {e}")))?;
            let cached = a.result.as_ref().ok_or_else(|| {
                CniError::new(ErrorCode::Io, format!("{ctx}: ADD did not finish"))
            })?;
            let target = Target {
                container_id: &record.container_id,
                netns: &env.netns,
                ifname: &a.ifname,
                args: &record.cni_args,
            };
            self.invoker
                .check_list(&conf, &target, &a.runtime_config, cached)
                .map_err(|e| e.to_cni_error(&ctx))?;
        }
        Ok(())
    }

    fn gc(&self, shim: &ShimConf, received_ms: u64) -> Result<(), CniError> {
        let valid = valid_attachments(&shim.raw)?;
        // The runtime made its list before it sent it: a pod added within the grace
        // before the request arrived may be missing from it, and is kept.
        let requested_ms = received_ms.saturating_sub(self.gc_grace.as_millis() as u64);
        // No ADD, DEL or CHECK runs while GC does: what it reads stays true. An ADD
        // under way when the request came finishes first, and is newer than the list.
        let _gate = self.gc_gate.write().unwrap_or_else(|p| p.into_inner());
        let (records, corrupt) = self.records.list().map_err(from_record_err)?;
        let mut failures: Vec<String> = corrupt.iter().map(ToString::to_string).collect();
        let mut confs: BTreeMap<String, NetConfList> = BTreeMap::new();
        if let Ok(c) = self.load_default_network() {
            confs.insert(c.to_value().to_string(), c);
        }
        let mut live = Vec::new();
        for r in records {
            for a in &r.attachments {
                if let Ok(c) = NetConfList::from_value(a.conf.clone(), None) {
                    confs.insert(a.conf.to_string(), c);
                }
            }
            let newer = r.added_at_ms.is_some_and(|t| t >= requested_ms);
            if newer || valid.contains(&(r.container_id.clone(), r.ifname.clone())) {
                live.push(r);
                continue;
            }
            let _lock = self.locks.lock(&r.container_id);
            tracing::info!(container = %r.container_id, "GC: removing stale attachments");
            failures.extend(self.tear_down(r, "", false));
        }
        // Containers the runtime still runs that trellis has no record of (pods
        // started before trellis was installed): whatever holds them is kept.
        let recorded: std::collections::BTreeSet<&str> =
            live.iter().map(|r| r.container_id.as_str()).collect();
        let unrecorded: Vec<(String, String)> = valid
            .iter()
            .filter(|(id, _)| !recorded.contains(id.as_str()))
            .cloned()
            .collect();
        for conf in confs.values() {
            let keep: Vec<(String, String)> = unrecorded
                .iter()
                .cloned()
                .chain(live.iter().flat_map(|r| {
                    r.attachments
                        .iter()
                        .filter(|a| {
                            a.conf.get("name").and_then(Value::as_str) == Some(conf.name.as_str())
                        })
                        .map(|a| (r.container_id.clone(), a.ifname.clone()))
                }))
                .collect();
            failures.extend(
                self.invoker
                    .gc_list(conf, &keep)
                    .iter()
                    .map(|e| format!("network {}: {e}", conf.name)),
            );
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(CniError::new(
                ErrorCode::Io,
                format!("GC incomplete: {}", failures.join("; ")),
            ))
        }
    }

    /// `/healthz`: the CNI socket is served.
    pub fn liveness(&self) -> Result<(), String> {
        if self.serving.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the CNI socket is not being served (starting or stopping)".into())
        }
    }

    /// `/readyz`: the socket is served, the network source's caches are synced, the
    /// default network is there to delegate to (its plugins found), and, when the agent
    /// follows the node's primary conf, trellis's conflist is there and first.
    pub fn readiness(&self) -> Result<(), String> {
        self.liveness()?;
        self.source
            .ready()
            .map_err(|e| format!("network source not ready: {e}"))?;
        let conf = self.load_default_network().map_err(|e| e.msg)?;
        for p in &conf.plugins {
            let t = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if self
                .invoker
                .in_process
                .as_ref()
                .is_some_and(|i| i.handles(t))
            {
                continue;
            }
            self.invoker
                .find(t)
                .map_err(|e| format!("default network {}: {e}", conf.name))?;
        }
        if self.default_network == crate::config::DefaultNetwork::Auto {
            crate::node_conf::check_installed(&self.cni_conf_dir, &self.cni_conf_file)
                .map_err(|e| format!("node CNI config: {e}"))?;
        }
        Ok(())
    }

    fn status(&self) -> Result<(), CniError> {
        let unavailable = |m: String| CniError::new(ErrorCode::PluginNotAvailable, m);
        self.source
            .ready()
            .map_err(|e| unavailable(format!("network source not ready: {e}")))?;
        let conf = self
            .load_default_network()
            .map_err(|e| unavailable(e.msg))?;
        self.invoker
            .status_list(&conf)
            .map_err(|e| unavailable(format!("default network {}: {e}", conf.name)))
    }
}

fn parse_shim_conf(stdin: &str) -> Result<ShimConf, CniError> {
    let v: Value = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            format!("network configuration is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(raw) = v else {
        return Err(CniError::new(
            ErrorCode::Decode,
            "network configuration is not a JSON object",
        ));
    };
    let cni_version = match raw.get("cniVersion") {
        Some(Value::String(s)) => {
            Version::parse_supported(s)
                .map_err(|e| CniError::new(ErrorCode::IncompatibleVersion, e))?;
            s.clone()
        }
        _ => return Err(invalid("network configuration has no cniVersion")),
    };
    let runtime_config = match raw.get("runtimeConfig") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(invalid("runtimeConfig must be an object")),
    };
    Ok(ShimConf {
        cni_version,
        runtime_config,
        raw,
    })
}

/// containerd passes `null` for a pod without annotations.
fn runtime_annotations(
    rc: &Map<String, Value>,
) -> Result<Option<BTreeMap<String, String>>, CniError> {
    match rc.get(POD_ANNOTATIONS_CAPABILITY) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| invalid(format!("runtimeConfig {POD_ANNOTATIONS_CAPABILITY:?}: {e}"))),
    }
}

fn pod_ref(env: &CniEnv) -> Option<PodRef> {
    let ns = env.args.get("K8S_POD_NAMESPACE")?;
    let name = env.args.get("K8S_POD_NAME")?;
    Some(PodRef {
        namespace: ns.to_string(),
        name: name.to_string(),
        uid: env.args.get("K8S_POD_UID").unwrap_or_default().to_string(),
    })
}

/// The attachments GC must keep. Without the list GC cannot tell live from stale,
/// so it is an error, never an empty list (that would tear down every pod).
fn valid_attachments(raw: &Map<String, Value>) -> Result<Vec<(String, String)>, CniError> {
    let (key, list) = match [VALID_ATTACHMENTS_KEY, VALID_ATTACHMENTS_ALIAS]
        .into_iter()
        .find_map(|k| raw.get(k).map(|v| (k, v)))
    {
        Some((k, Value::Array(l))) => (k, l),
        Some((k, _)) => return Err(invalid(format!("{k} must be a list"))),
        None => {
            return Err(invalid(format!(
                "GC needs the list of attachments to keep ({VALID_ATTACHMENTS_KEY}); without it nothing is collected"
            )))
        }
    };
    list.iter()
        .enumerate()
        .map(|(i, a)| {
            let get = |k: &str| a.get(k).and_then(Value::as_str).map(str::to_string);
            match (get("containerID"), get("ifname")) {
                (Some(c), Some(i)) => Ok((c, i)),
                _ => Err(invalid(format!(
                    "{key}[{i}] needs string containerID and ifname"
                ))),
            }
        })
        .collect()
}

/// The cluster network's result with every attachment's interfaces and IPs added.
fn merged_result(attachments: &[Attachment], version: &str) -> Result<Value, CniError> {
    let mut merged: Option<CniResult> = None;
    for a in attachments {
        let Some(raw) = &a.result else { continue };
        let r = CniResult::from_value(raw)
            .map_err(|e| CniError::new(ErrorCode::Decode, format!("network {}: {e}", a.network)))?;
        match &mut merged {
            None => merged = Some(r),
            Some(m) => m.merge_attachment(&r),
        }
    }
    let merged = merged.unwrap_or_default();
    merged
        .to_value(version)
        .map_err(|e| CniError::new(ErrorCode::IncompatibleVersion, e.to_string()))
}

/// Serialises calls for one container (the runtime may retry DEL while ADD runs).
#[derive(Default)]
struct ContainerLocks {
    busy: Mutex<HashSet<String>>,
    freed: Condvar,
}

struct ContainerGuard<'a> {
    locks: &'a ContainerLocks,
    id: String,
}

impl ContainerLocks {
    /// The lock if no one holds it now.
    fn try_lock(&self, id: &str) -> Option<ContainerGuard<'_>> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        if !busy.insert(id.to_string()) {
            return None;
        }
        Some(ContainerGuard {
            locks: self,
            id: id.to_string(),
        })
    }

    fn lock(&self, id: &str) -> ContainerGuard<'_> {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        while busy.contains(id) {
            busy = self.freed.wait(busy).unwrap_or_else(|p| p.into_inner());
        }
        busy.insert(id.to_string());
        ContainerGuard {
            locks: self,
            id: id.to_string(),
        }
    }
}

impl Drop for ContainerGuard<'_> {
    fn drop(&mut self) {
        self.locks
            .busy
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        self.locks.freed.notify_all();
    }
}

/// Fails if an attachment on a logical network got an address outside its subnets
/// (from its delegate's result): the dataplane would drop all its traffic.
fn check_logical_addresses(record: &Record) -> Result<(), CniError> {
    for a in &record.attachments {
        let (Some(l), Some(result)) = (&a.logical, &a.result) else {
            continue;
        };
        let addrs: Vec<std::net::IpAddr> = result["ips"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|ip| ip["address"].as_str())
            .filter_map(|c| c.split('/').next()?.parse().ok())
            .collect();
        crate::logical::check_addresses(&a.network, l, &addrs)
            .map_err(|e| invalid(format!("network {} ({}): {e}", a.network, a.ifname)))?;
    }
    Ok(())
}
