//! The checks that keep logical networks apart: pod privileges, the wires a node
//! shares out, carvings across the cluster and overlaps on this node.

use super::{from_record_err, from_source_err, invalid, Engine, Planned};
use crate::records::{Attachment, Record};
use crate::source::PodRef;
use trellis_cni::{CniError, ErrorCode, NetConfList};

impl Engine {
    /// A pod on a logical network whose packets nothing outside the pod checks
    /// (macvlan, ipvlan, a VF) may not be able to send raw frames or change its
    /// interfaces: its spec is checked, unless `logical_trust_pod_privileges`.
    pub(crate) fn check_logical_pods(
        &self,
        pod: Option<&PodRef>,
        plan: &[Planned],
    ) -> Result<(), CniError> {
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
    pub(crate) fn check_wires(&self, plan: &mut [Planned]) -> Result<(), CniError> {
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
    pub(crate) fn check_carvings(&self, plan: &[Planned]) -> Result<(), CniError> {
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
    pub(crate) fn check_logical_overlaps(&self, record: &Record) -> Result<(), CniError> {
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
}
/// Fails if an attachment on a logical network got an address outside its subnets
/// (from its delegate's result): the dataplane would drop all its traffic.
pub(crate) fn check_logical_addresses(record: &Record) -> Result<(), CniError> {
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
