//! Devices for attachments: the pool a device belongs to, and what kubelet allocated
//! to the pod.

use super::{invalid, Engine, Planned};
use crate::source::PodRef;
use serde_json::Value;
use std::collections::{BTreeMap, HashSet};
use trellis_cni::{CniError, ErrorCode};

/// The longest a PodResources call may take (kubelet answers in milliseconds).
const POD_RESOURCES_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

impl Engine {
    /// Networks backed by a resource pool get the devices kubelet allocated to the pod
    /// from that pool, one each, in annotation order. A `deviceID` written in the NAD
    /// config is untrusted: it is used only if it is a device of a pool of this node
    /// (the NAD's `resourceName` pool, if it names one) and, where kubelet's
    /// PodResources API is there, one kubelet allocated to this pod.
    pub(crate) fn assign_devices(
        &self,
        pod: Option<&PodRef>,
        plan: &mut [Planned],
    ) -> Result<(), CniError> {
        self.assign_devices_in_use(pod, plan, None)
    }

    /// `assign_devices` for networks added to a running pod: kubelet cannot allocate
    /// to it any more, so a network gets one of the devices the pod already holds
    /// that none of its attachments uses (`in_use`).
    pub(crate) fn assign_devices_in_use(
        &self,
        pod: Option<&PodRef>,
        plan: &mut [Planned],
        in_use: Option<&HashSet<String>>,
    ) -> Result<(), CniError> {
        let hot = in_use.is_some();
        let in_use = in_use.cloned().unwrap_or_default();
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
            // One device per network: the same deviceID may be given to each plugin of
            // a chain (as Multus injects it), never two different ones (only one would
            // be recorded, the other taken for a free VF by the sweep).
            if let Some((f0, d0)) = ids.first() {
                if let Some((f, d)) = ids.iter().find(|(_, d)| d != d0) {
                    return Err(invalid(format!(
                        "network {} ({}): {f0} is {d0:?} but {f} is {d:?}: a network attaches one device",
                        p.network, p.ifname
                    )));
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
        let mut taken: HashSet<String> = in_use.clone();
        for (i, field, id) in given {
            let p = &plan[i];
            let ctx = format!("network {} ({}): {field} {id:?}", p.network, p.ifname);
            if in_use.contains(&id) {
                return Err(invalid(format!(
                    "{ctx}: is in use by another attachment of the pod"
                )));
            }
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
                let pod = pod.map(ToString::to_string).unwrap_or_default();
                let held = allocated(&resource)?;
                let busy = held.iter().filter(|id| in_use.contains(*id)).count();
                if hot {
                    return Err(invalid(format!(
                        "network {} ({}): pod {pod} holds {} device(s) of {resource}, {busy} of them in use by its attachments, and kubelet cannot allocate another to a running pod (request one more of {resource} in the pod spec to hot-plug it)",
                        p.network,
                        p.ifname,
                        held.len(),
                    )));
                }
                return Err(invalid(format!(
                    "network {} ({}): pod {pod} was allocated {} device(s) of {resource} but asks for {} network(s) from it",
                    p.network,
                    p.ifname,
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
                        pl.get("type").and_then(Value::as_str) == Some(crate::kinds::sriov::TYPE)
                    })
                    .unwrap_or(0);
                p.conf.plugins[first].insert("deviceID".into(), Value::String(id.clone()));
                p.device = Some(id);
            }
        }
        Ok(())
    }

    /// Whether this agent serves device pools (`[devices]`).
    pub(crate) fn pools_configured(&self) -> bool {
        self.device_pools.is_some()
    }

    /// The pool that serves device `id`, or why there is none.
    pub(crate) fn pool_of(&self, id: &str) -> Result<String, String> {
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
    pub(crate) fn pod_devices(
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
}
