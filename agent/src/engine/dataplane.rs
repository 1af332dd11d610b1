//! Attachments and the eBPF dataplane: slots, ACLs and limits put on each interface,
//! and the start-up reconcile of pins and records.

use super::{from_record_err, invalid, Engine, PlannedAcl};
use crate::records::{Record, RecordError};
use std::collections::HashSet;
use trellis_cni::{CniError, ErrorCode};

impl Engine {
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

    /// Attaches the attachments (from index `from` on) whose network has an ACL or a
    /// bandwidth limit or is a logical network, now:
    /// their rules are in the maps (and current for every live attachment of the
    /// network) and their limits kept before the pod gets its first packet. An
    /// interface without a kernel netdev (vfio, socket) cannot be: refused.
    pub(crate) fn attach_with_acls(
        &self,
        record: &mut Record,
        acls: &[Option<PlannedAcl>],
        from: usize,
    ) -> Result<(), CniError> {
        let Some(dp) = &self.dataplane else {
            return Ok(());
        };
        let limited = |i: usize| {
            !record.attachments[i].bandwidth.is_none() || record.attachments[i].logical.is_some()
        };
        if (from..acls.len()).all(|i| acls[i].is_none() && !limited(i)) {
            return Ok(());
        }
        let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
        for (i, planned) in acls.iter().enumerate().skip(from) {
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
    pub(crate) fn acl_from_nad(&self, dp: &mut crate::dataplane::Dataplane, network: &str) -> bool {
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
    pub(crate) fn set_acl_read_at(
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
    pub(crate) fn attach_one(
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
    pub(crate) fn attach_dataplane(
        &self,
        record: &mut Record,
        acls_from_nads: bool,
    ) -> Result<(), CniError> {
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
}
