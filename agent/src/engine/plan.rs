//! Planning: every network a pod asks for, resolved from its NAD and checked against the
//! node's policies, before anything is changed.

use super::POD_ANNOTATIONS_CAPABILITY;
use super::{from_nad_err, from_source_err, invalid, Engine, Planned, PlannedAcl};
use crate::selection::{self, NetworkSelection, DEFAULT_NETWORK_ANNOTATION, NETWORKS_ANNOTATION};
use crate::source::PodRef;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use trellis_cni::{CniEnv, CniError, ErrorCode, NetConfList};

impl Engine {
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
    pub(crate) fn default_from_nad(
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
            selection: None,
            chosen: None,
        })
    }

    /// The NAD's logical network, if it is one (and the dataplane, which isolates
    /// it, is on). `net` names the attachment in errors.
    pub(crate) fn nad_logical(
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
    pub(crate) fn plan(
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
                    selection: None,
                    chosen: None,
                }
            }
        };
        default.runtime_config = default_rc;
        let mut plan = vec![default];
        let asked = match annotations.get(NETWORKS_ANNOTATION) {
            Some(a) => {
                selection::parse_networks_asked(a, pod_ns).map_err(|e| invalid(e.to_string()))?
            }
            None => Vec::new(),
        };
        let mut named = asked.clone();
        for (i, sel) in named.iter_mut().enumerate() {
            if sel.interface.is_empty() {
                sel.interface = selection::default_ifname(i);
            }
        }
        let choices = match annotations.get(crate::choice::spec::CHOICE_ANNOTATION) {
            Some(a) => crate::choice::spec::parse(a, pod_ns).map_err(|e| invalid(e.to_string()))?,
            None => Vec::new(),
        };
        // Chosen interfaces are named like any other: once in the pod.
        let mut all = named.clone();
        all.extend(choices.iter().map(|c| c.candidates().swap_remove(0)));
        selection::check_ifnames(&all, &env.ifname).map_err(|e| invalid(e.to_string()))?;
        for (sel, asked) in named.into_iter().zip(asked) {
            plan.push(self.plan_selection(sel, asked, pod_ns)?);
        }
        for (i, c) in choices.iter().enumerate() {
            plan.push(self.plan_choice(c, i, pod_ns)?);
        }
        self.assign_devices(pod, &mut plan)?;
        Ok(plan)
    }

    /// One network of the pod's selection, `sel` with its interface name decided and
    /// `asked` as the pod wrote it.
    pub(crate) fn plan_selection(
        &self,
        sel: NetworkSelection,
        asked: NetworkSelection,
        pod_ns: &str,
    ) -> Result<Planned, CniError> {
        // Every path (ADD, hot-plug, attach, moves) names interfaces through here.
        trellis_cni::env::validate_ifname(&sel.interface).map_err(|m| {
            invalid(format!(
                "network {}: interface name {:?} {m}",
                sel.qualified_name(),
                sel.interface
            ))
        })?;
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
            selection: Some(asked),
            chosen: None,
        })
    }

    /// A NAD's delegate config against the node's `[nad_policy]`.
    pub(crate) fn check_policy(
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
    pub(crate) fn nad_acl(
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
    pub(crate) fn plan_bandwidth(
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
            Some(crate::kinds::vhostuser::TYPE) => {
                return Err(invalid(format!(
                    "{net}: a bandwidth limit cannot be kept on a vhost-user socket: no kernel interface carries its traffic (limit it in the userspace switch, or leave bandwidth out)"
                )))
            }
            Some(crate::kinds::sriov::TYPE) => {
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
}
