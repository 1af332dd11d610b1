//! The attachment engine: plan one attachment, make it, undo it, record it. Pod ADD and
//! DEL (the CNI verbs), hot-plug and moves all change a pod's networks through it.
//!
//! One `Engine` holds what every change needs: the delegate invoker, the records, the
//! dataplane, the network source, the node's policies, and the locks that keep changes
//! to one container (and GC) apart.

mod acl_sync;
mod choose;
mod dataplane;
mod devices;
pub mod hotplug;
mod locks;
mod logical_checks;
pub mod moves;
mod plan;
mod status;
pub mod sweep;
mod undo;

use crate::config::AgentConfig;
use crate::nad::NadError;
use crate::records::{Attachment, Record, RecordError, RecordStore};
use crate::source::{NetworkSource, SourceError};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use trellis_cni::{CniError, ErrorCode, NetConfList};
use trellis_delegate::{InvokeError, Invoker, Target};

pub(crate) use locks::ContainerLocks;
pub(crate) use logical_checks::check_logical_addresses;

/// A pod annotation: `"false"` keeps the pod's networks as its ADD made them.
pub const DYNAMIC_ANNOTATION: &str = "trellis.dev/dynamic";

/// The runtimeConfig key under which containerd passes the pod's annotations.
pub const POD_ANNOTATIONS_CAPABILITY: &str = "io.kubernetes.cri.pod-annotations";

pub struct Engine {
    pub(crate) dataplane: Option<Mutex<crate::dataplane::Dataplane>>,
    /// Why there is no dataplane: `[dataplane] enabled = false`, or what kept it from
    /// starting (pins of another layout).
    pub(crate) dataplane_off: String,
    pub(crate) default_network: crate::config::DefaultNetwork,
    /// The node's CNI conf dir and trellis's own file in it (auto mode).
    pub(crate) cni_conf_dir: std::path::PathBuf,
    pub(crate) cni_conf_file: String,
    pub(crate) pod_resources: std::path::PathBuf,
    pub(crate) invoker: Invoker,
    pub(crate) source: Arc<dyn NetworkSource>,
    pub(crate) records: RecordStore,
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
    pub(crate) locks: ContainerLocks,
    /// The in-process `sriov` type, for the periodic sweep of VF state (`sweep.rs`).
    pub(crate) sriov: Arc<crate::kinds::sriov::SriovPlugin>,
    /// ADD, DEL, CHECK and hot-plug hold it shared, GC exclusively: GC never sees a
    /// container whose change is under way, nor an ADD's delegates between its GC's
    /// list and calls.
    pub(crate) gc_gate: std::sync::RwLock<()>,
    /// GC leaves pods added this long before its request (`gc_grace_secs`).
    pub(crate) gc_grace: std::time::Duration,
    /// Per network, when the NAD read whose ACL is in the maps began: an ACL read
    /// earlier (an ADD planned before a NAD edit the sync applied) is not written over
    /// it. The NAD is the last writer.
    acl_read_at: Mutex<BTreeMap<String, std::time::Instant>>,
    /// Held from a change's logical-network overlap check to its plan's save.
    pub(crate) logical_gate: Mutex<()>,
    /// `[dynamic] enabled`: networks may change while a pod runs.
    dynamic_enabled: bool,
    /// The networks' measured rates (sampled by `choice::kpi::start_sampling`).
    pub kpi: Arc<crate::choice::kpi::Sampler>,
    /// `networks.added_interface_events`: AddedInterface events at pod ADD.
    pub(crate) added_events_at_add: bool,
    /// Pods and NADs come from the Kubernetes API (pods' annotations are the desired
    /// state of their networks).
    pods_from_api: bool,
}

/// One network to attach, fully resolved before anything is changed.
pub(crate) struct Planned {
    pub network: String,
    pub ifname: String,
    pub cluster_default: bool,
    pub conf: NetConfList,
    pub runtime_config: Map<String, Value>,
    pub default_route: Vec<std::net::IpAddr>,
    /// The NAD's resource pool (`k8s.v1.cni.cncf.io/resourceName`).
    pub resource: Option<String>,
    /// The device from that pool, put in the delegate's `deviceID`.
    pub device: Option<String>,
    /// The NAD's ACL (`trellis.dev/acl`).
    pub acl: Option<PlannedAcl>,
    /// Bandwidth limits the dataplane keeps.
    pub bandwidth: crate::bandwidth::Limits,
    /// The logical network (`trellis.dev/logical-network`) it is on.
    pub logical: Option<crate::logical::Logical>,
    /// The physical network it attaches to, if logical networks could share it.
    pub physical: Option<String>,
    /// Its NAD's creationTimestamp.
    pub created: Option<String>,
    /// The pod's selection it was planned from (None: the cluster network).
    pub selection: Option<crate::selection::NetworkSelection>,
    /// The choice it was chosen by, if the pod asked for a choice.
    pub chosen: Option<crate::choice::spec::Chosen>,
}

impl Planned {
    /// The attachment's record before its delegate runs.
    pub(crate) fn to_attachment(&self) -> Attachment {
        Attachment {
            network: self.network.clone(),
            ifname: self.ifname.clone(),
            cluster_default: self.cluster_default,
            conf: self.conf.to_value(),
            runtime_config: self.runtime_config.clone(),
            result: None,
            default_route: self.default_route.clone(),
            device: self.device.clone(),
            slot: None,
            bandwidth: self.bandwidth,
            logical: self.logical.clone(),
            physical: self.physical.clone(),
            selection: self.selection.clone(),
            attached_at: None,
            chosen: self.chosen.clone(),
        }
    }
}

/// A network's ACL as a plan read it, and when that read began.
#[derive(Clone)]
pub(crate) struct PlannedAcl {
    pub acl: crate::acl::Acl,
    pub read_at: std::time::Instant,
}

/// Why making an attachment failed, and how its undo should treat it.
pub(crate) struct MakeFailed {
    pub err: CniError,
    /// Its DEL is a best effort: nothing of the chain finished and the failure was an
    /// answer (not a timeout or crash).
    pub lenient: bool,
}

pub(crate) fn invalid(msg: impl Into<String>) -> CniError {
    CniError::new(ErrorCode::InvalidNetworkConfig, msg)
}

pub(crate) fn from_record_err(e: RecordError) -> CniError {
    CniError::new(ErrorCode::Io, e.to_string())
}

pub(crate) fn from_source_err(e: SourceError) -> CniError {
    match e {
        SourceError::Unavailable { .. } => CniError::new(ErrorCode::TryAgainLater, e.to_string()),
        _ => invalid(e.to_string()),
    }
}

pub(crate) fn from_nad_err(e: NadError) -> CniError {
    CniError::new(e.code(), e.to_string())
}

impl Engine {
    pub fn new(
        config: &AgentConfig,
        source: Arc<dyn NetworkSource>,
    ) -> Result<Engine, RecordError> {
        let mut invoker = Invoker {
            bin_dirs: config.cni_bin_dirs.clone(),
            timeout: config.delegate_timeout(),
            in_process: None,
            host_process: config.host_process.clone(),
        };
        let records = RecordStore::open(&config.state_dir)?;
        let sriov = crate::kinds::sriov::SriovPlugin::new(
            &config.sysfs_root,
            &config.state_dir,
            invoker.clone(),
        )
        .map_err(|source| RecordError::Io {
            path: trellis_devices::VfClaims::under(&config.state_dir)
                .dir()
                .to_path_buf(),
            source,
        })?;
        sriov.sweep(&records);
        let sriov = Arc::new(sriov);
        let vhost = crate::kinds::vhostuser::VhostUserPlugin::new(invoker.clone());
        invoker.in_process = Some(Arc::new(crate::kinds::InProcess(vec![
            sriov.clone(),
            Arc::new(vhost),
        ])));
        Ok(Engine {
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
            sriov,
            gc_gate: std::sync::RwLock::new(()),
            gc_grace: std::time::Duration::from_secs(config.gc_grace_secs),
            acl_read_at: Mutex::new(BTreeMap::new()),
            logical_gate: Mutex::new(()),
            dynamic_enabled: config.dynamic.enabled,
            kpi: Arc::new(crate::choice::kpi::Sampler::new(
                std::time::Duration::from_secs(config.dynamic.kpi_window_secs.clamp(1, 3600)),
            )),
            pods_from_api: matches!(
                config.networks,
                crate::config::NetworksConfig::Kubernetes { .. }
            ),
            added_events_at_add: matches!(
                config.networks,
                crate::config::NetworksConfig::Kubernetes {
                    added_interface_events: true,
                    ..
                }
            ),
        })
    }

    /// The running device plugin's pools (`ManagerHandle::status`).
    pub fn set_device_pools(&mut self, pools: Arc<Mutex<trellis_device_plugin::manager::Status>>) {
        self.device_pools = Some(pools);
    }

    /// Runs without the dataplane it was configured with, saying why in every change
    /// it must refuse (networks with an ACL are not attached unfiltered).
    pub fn set_no_dataplane(&mut self, why: String) {
        self.dataplane = None;
        self.dataplane_off = why;
    }

    /// Turns on the eBPF dataplane (loaded and checked by the caller).
    pub fn set_dataplane(&mut self, dp: crate::dataplane::Dataplane) {
        self.dataplane = Some(Mutex::new(dp));
    }

    pub fn records(&self) -> &RecordStore {
        &self.records
    }

    /// Whether the eBPF dataplane runs (configured and started).
    pub fn dataplane_running(&self) -> bool {
        self.dataplane.is_some()
    }

    /// Runs `f` while no GC runs.
    pub(crate) fn shared<T>(&self, f: impl FnOnce() -> T) -> T {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        f()
    }

    /// Makes attachment `i` of `record`: runs its delegate chain's ADD in the pod and
    /// records the result (the plan is on disk before this runs, so a crash is undone
    /// by DEL). On failure the record is cut to the attachments up to this one, all of
    /// which the caller's rollback undoes.
    pub(crate) fn make(&self, record: &mut Record, i: usize) -> Result<(), MakeFailed> {
        let a = &record.attachments[i];
        let conf = NetConfList::from_value(a.conf.clone(), None).map_err(|e| MakeFailed {
            err: invalid(format!("network {} ({}): {e}", a.network, a.ifname)),
            lenient: true,
        })?;
        let target = Target {
            container_id: &record.container_id,
            netns: &record.netns,
            ifname: &a.ifname,
            args: &record.cni_args,
        };
        let started = std::time::Instant::now();
        let added = self.invoker.add_list(&conf, &target, &a.runtime_config);
        tracing::debug!(
            network = %a.network,
            ifname = %a.ifname,
            micros = started.elapsed().as_micros() as u64,
            "delegate ADD"
        );
        match added {
            Ok(result) => {
                record.attachments[i].result = Some(result);
                let _ = self.records.save_unsynced(record);
                Ok(())
            }
            Err((done, e)) => {
                let err = e.to_cni_error(&format!("network {} ({})", a.network, a.ifname));
                // The ones after it were not run: nothing of them exists. This one is
                // DEL'd even if its first plugin failed: a plugin that fails part way
                // may leave what it made (the reference bridge plugin leaves the pod's
                // veth when the bridge refuses its gateway address).
                let lenient = done == 0 && !e.needs_del();
                record.attachments.truncate(i + 1);
                Err(MakeFailed { err, lenient })
            }
        }
    }

    /// Runs an attachment's delegate DEL in `netns` (empty: the pod's netns is gone);
    /// the errors that mean something of it may be left.
    pub(crate) fn delegate_del(
        &self,
        record: &Record,
        a: &Attachment,
        netns: &str,
    ) -> Result<Vec<InvokeError>, String> {
        let conf = NetConfList::from_value(a.conf.clone(), None).map_err(|e| e.to_string())?;
        let target = Target {
            container_id: &record.container_id,
            netns,
            ifname: &a.ifname,
            args: &record.cni_args,
        };
        let started = std::time::Instant::now();
        let mut errs = self
            .invoker
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
        Ok(errs)
    }
}
