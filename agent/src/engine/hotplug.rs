//! Hot-plug: a running pod's networks changed one attachment at a time. The desired
//! state is the pod's networks annotation (or one `trellis attach` / `detach`); the
//! actual state is the pod's record. Removals go first, then additions; each addition
//! is planned (NAD, policies, devices, names) before anything changes, and one that
//! fails at making is undone alone, leaving the pod as it was.

use super::{from_record_err, invalid, Engine, PlannedAcl};
use crate::choice::spec::Choice;
use crate::records::Record;
use crate::selection::{self, NetworkSelection};
use crate::source::{PodEvent, PodRef};
use std::collections::HashSet;
use trellis_cni::{CniError, ErrorCode};

/// What changes in a pod: attachments to remove (by interface) and selections to add
/// (as asked, with the interface name they get).
#[derive(Debug, Default, PartialEq)]
pub struct Diff {
    pub remove: Vec<String>,
    pub add: Vec<(NetworkSelection, String)>,
    /// Choices to make (with their index in the pod's choice annotation).
    pub choose: Vec<(usize, Choice)>,
}

impl Diff {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.add.is_empty() && self.choose.is_empty()
    }
}

/// The difference between a pod's `record` and the selections it now asks for
/// (`asked`: as the pod wrote them, interface empty where it named none). An
/// attachment stays only if an entry asks for exactly what it was made from (NAD,
/// interface, IPs, MAC, every other field); entries without an interface name match
/// such attachments in order and keep their names; a new one gets the lowest `net<N>`
/// free in the pod. Attachments of agents before hot-plug (no selection recorded)
/// match an entry of the same NAD whose interface (given, or named by position as at
/// ADD) is theirs.
pub fn diff(
    record: &Record,
    asked: &[NetworkSelection],
    choices: &[Choice],
) -> Result<Diff, CniError> {
    let mut taken = vec![false; asked.len()];
    let mut chosen = vec![false; choices.len()];
    let mut kept: Vec<&str> = Vec::new();
    let mut remove = Vec::new();
    // A chosen attachment stays while the pod asks for the same choice.
    for a in record.attachments.iter() {
        let Some(c) = &a.chosen else { continue };
        if c.retiring {
            kept.push(&a.ifname);
            continue;
        }
        // Never finished (a failed addition whose undo is owed, or an agent that died
        // making it): made again if still asked for.
        if a.result.is_none() {
            remove.push(a.ifname.clone());
            continue;
        }
        match (0..choices.len()).find(|i| !chosen[*i] && choices[*i] == c.choice) {
            Some(i) => {
                chosen[i] = true;
                kept.push(&a.ifname);
            }
            None => remove.push(a.ifname.clone()),
        }
    }
    for a in record
        .attachments
        .iter()
        .filter(|a| !a.cluster_default && a.chosen.is_none())
    {
        let found = asked.iter().enumerate().position(|(i, d)| {
            a.result.is_some()
                && !taken[i]
                && match &a.selection {
                    Some(s) => s == d,
                    None => {
                        d.qualified_name() == a.network
                            && (d.interface == a.ifname
                                // The pod's default route is on it: never moved by an
                                // edit of other entries' positions.
                                || d.interface.is_empty() && !a.default_route.is_empty()
                                || d.interface.is_empty()
                                    && selection::default_ifname(i) == a.ifname)
                    }
                }
        });
        match found {
            Some(i) => {
                taken[i] = true;
                kept.push(&a.ifname);
            }
            None if !a.default_route.is_empty() && a.result.is_some() => {
                return Err(invalid(format!(
                    "network {} ({}) carries the pod's default route (default-route), which cannot change while the pod runs: it cannot be removed or changed",
                    a.network, a.ifname
                )))
            }
            None => remove.push(a.ifname.clone()),
        }
    }
    // Names the new entries may not take: the cluster network's, the kept ones', and
    // the ones other new entries name themselves.
    let mut used: HashSet<String> = kept.iter().map(|s| s.to_string()).collect();
    used.insert(record.ifname.clone());
    let mut add = Vec::new();
    let new_choices: Vec<(usize, Choice)> = choices
        .iter()
        .enumerate()
        .filter(|(i, _)| !chosen[*i])
        .map(|(i, c)| (i, c.clone()))
        .collect();
    let explicit = asked
        .iter()
        .zip(&taken)
        .filter(|(d, t)| !**t && !d.interface.is_empty())
        .map(|(d, _)| d.clone())
        .chain(
            new_choices
                .iter()
                .map(|(_, c)| c.candidates().swap_remove(0)),
        );
    for d in explicit {
        if d.interface == record.ifname {
            return Err(invalid(format!(
                "network {}: interface {} is the pod's cluster network, which cannot be added or removed while the pod runs",
                d.qualified_name(),
                d.interface
            )));
        }
        if !used.insert(d.interface.clone()) {
            let by = record
                .attachments
                .iter()
                .find(|a| a.ifname == d.interface)
                .map(|a| format!(" by network {}", a.network))
                .unwrap_or_default();
            return Err(invalid(format!(
                "network {}: interface name {} is in use in the pod{by}",
                d.qualified_name(),
                d.interface
            )));
        }
    }
    for (d, _) in asked.iter().zip(&taken).filter(|(_, t)| !**t) {
        let ifname = if d.interface.is_empty() {
            let name = (1..)
                .map(|n| format!("net{n}"))
                .find(|n| !used.contains(n))
                .expect("a free name");
            used.insert(name.clone());
            name
        } else {
            d.interface.clone()
        };
        add.push((d.clone(), ifname));
    }
    Ok(Diff {
        remove,
        add,
        choose: new_choices,
    })
}

/// The diff between `record` and the networks annotation `annotation` (None: none).
fn desired_diff(
    record: &Record,
    annotation: Option<&str>,
    choices: Option<&str>,
) -> Result<Diff, CniError> {
    let asked = match annotation {
        Some(a) => selection::parse_networks_asked(a, &record.pod_namespace)
            .map_err(|e| invalid(e.to_string()))?,
        None => Vec::new(),
    };
    for d in asked.iter().filter(|d| !d.interface.is_empty()) {
        trellis_cni::env::validate_ifname(&d.interface).map_err(|m| {
            invalid(format!(
                "network {}: interface name {:?} {m}",
                d.qualified_name(),
                d.interface
            ))
        })?;
    }
    let choices = match choices {
        Some(c) => crate::choice::spec::parse(c, &record.pod_namespace)
            .map_err(|e| invalid(e.to_string()))?,
        None => Vec::new(),
    };
    diff(record, &asked, &choices)
}

/// Whether `r` is a sandbox of `pod` whose ADD finished (a uid on either side must
/// match: a pod of the same name made again is another pod).
pub fn is_sandbox_of(r: &Record, pod: &PodRef) -> bool {
    r.pod_namespace == pod.namespace
        && r.pod_name == pod.name
        && (pod.uid.is_empty() || r.pod_uid.is_empty() || r.pod_uid == pod.uid)
        && r.added_at_ms.is_some()
}

fn pod_of(record: &Record) -> PodRef {
    PodRef {
        namespace: record.pod_namespace.clone(),
        name: record.pod_name.clone(),
        uid: record.pod_uid.clone(),
    }
}

/// What one reconcile did, for the caller's log.
#[derive(Debug, Default)]
pub struct Outcome {
    pub added: Vec<String>,
    pub removed: Vec<String>,
    pub failed: Vec<String>,
}

impl Engine {
    /// Whether hot-plug is on (`[dynamic] enabled`).
    pub fn dynamic_enabled(&self) -> bool {
        self.dynamic_enabled
    }

    /// Whether pods come from the Kubernetes API (their annotation is the desired
    /// state, followed by the reconciler).
    pub fn pods_from_api(&self) -> bool {
        self.pods_from_api
    }

    /// The record of the pod's sandbox, if its ADD finished on this node.
    pub fn pod_record(&self, pod: &PodRef) -> Result<Option<Record>, CniError> {
        let (records, _) = self.records.list().map_err(from_record_err)?;
        // The newest sandbox, if an older one's DEL has not come yet.
        Ok(records
            .into_iter()
            .filter(|r| is_sandbox_of(r, pod))
            .max_by_key(|r| r.added_at_ms))
    }

    /// Brings the pod's attachments to what `annotation` (its networks annotation
    /// now, None: none) and `choices` (its network-choice annotation) ask for. Nothing
    /// changes if both are the ones the record was last made from; a bad annotation,
    /// an unknown NAD, a refused policy or a device the pod does not hold fails before
    /// anything changes.
    pub fn reconcile_pod(
        &self,
        container_id: &str,
        annotation: Option<&str>,
        choices: Option<&str>,
    ) -> Result<Outcome, CniError> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let _lock = self.locks.lock(container_id);
        let Some(record) = self.records.load(container_id).map_err(from_record_err)? else {
            return Ok(Outcome::default());
        };
        let unfinished = record.attachments.iter().any(|a| a.result.is_none());
        if record.added_at_ms.is_none()
            || (!unfinished
                && record.networks.as_deref() == annotation
                && record.choices.as_deref() == choices)
        {
            return Ok(Outcome::default());
        }
        let diff = match desired_diff(&record, annotation, choices) {
            Ok(d) => d,
            Err(e) => {
                self.failed_event(&pod_of(&record), "FailedAddingInterface", &e);
                return Err(e);
            }
        };
        let applied = (annotation.map(str::to_string), choices.map(str::to_string));
        self.apply(record, diff, Some(applied))
    }

    /// `trellis attach`: adds `asked` to the pod's sandbox `container_id`.
    pub fn attach(&self, container_id: &str, asked: NetworkSelection) -> Result<Outcome, CniError> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let _lock = self.locks.lock(container_id);
        let record = self.loaded(container_id)?;
        let mut list: Vec<NetworkSelection> = record
            .attachments
            .iter()
            .filter(|a| !a.cluster_default && a.chosen.is_none() && a.result.is_some())
            .map(|a| {
                a.selection.clone().unwrap_or_else(|| NetworkSelection {
                    interface: a.ifname.clone(),
                    ..Default::default()
                })
            })
            .collect();
        // Old records' attachments match by their own interface names.
        for (s, a) in list.iter_mut().zip(
            record
                .attachments
                .iter()
                .filter(|a| !a.cluster_default && a.chosen.is_none() && a.result.is_some()),
        ) {
            if a.selection.is_none() {
                if let Some((ns, name)) = a.network.split_once('/') {
                    s.namespace = ns.into();
                    s.name = name.into();
                }
            }
        }
        let choices: Vec<Choice> = record
            .attachments
            .iter()
            .filter_map(|a| a.chosen.as_ref().filter(|c| !c.retiring))
            .map(|c| c.choice.clone())
            .collect();
        list.push(asked);
        let mut diff = diff(&record, &list, &choices)?;
        diff.remove.clear();
        diff.choose.clear();
        self.apply(record, diff, None)
    }

    /// `trellis detach`: removes the pod's attachment on interface `ifname`, or, with
    /// `network`, its only attachment of that NAD.
    pub fn detach(
        &self,
        container_id: &str,
        network: Option<&str>,
        ifname: Option<&str>,
    ) -> Result<Outcome, CniError> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let _lock = self.locks.lock(container_id);
        let record = self.loaded(container_id)?;
        let matching: Vec<&crate::records::Attachment> = record
            .attachments
            .iter()
            .filter(|a| ifname.is_none_or(|i| a.ifname == i))
            .filter(|a| network.is_none_or(|n| a.network == n))
            .collect();
        let what = match (network, ifname) {
            (_, Some(i)) => format!("interface {i}"),
            (Some(n), None) => format!("network {n}"),
            (None, None) => return Err(invalid("detach needs a network or an interface")),
        };
        let a = match matching.as_slice() {
            [] => {
                return Err(invalid(format!(
                    "pod {}/{} has no attachment on {what}",
                    record.pod_namespace, record.pod_name
                )))
            }
            [a] => *a,
            more => {
                return Err(invalid(format!(
                    "pod {}/{} has {} attachments of {what} ({}): name the interface (NETWORK@IF or @IF)",
                    record.pod_namespace,
                    record.pod_name,
                    more.len(),
                    more.iter().map(|a| a.ifname.as_str()).collect::<Vec<_>>().join(", ")
                )))
            }
        };
        if a.cluster_default {
            return Err(invalid(format!(
                "interface {} is the pod's cluster network, which cannot be removed while the pod runs",
                a.ifname
            )));
        }
        let diff = Diff {
            remove: vec![a.ifname.clone()],
            ..Default::default()
        };
        self.apply(record, diff, None)
    }

    pub(super) fn loaded(&self, container_id: &str) -> Result<Record, CniError> {
        match self.records.load(container_id).map_err(from_record_err)? {
            Some(r) if r.added_at_ms.is_some() => Ok(r),
            _ => Err(CniError::new(
                ErrorCode::UnknownContainer,
                format!("container {container_id} has no finished ADD on this node"),
            )),
        }
    }

    /// Applies `diff` to the pod's record under its lock: every addition planned
    /// first (a failure there changes nothing), then removals, then additions, each
    /// undone alone if it fails. `networks`: the annotation to record as applied once
    /// everything succeeded (None: leave it).
    fn apply(
        &self,
        mut record: Record,
        diff: Diff,
        applied: Option<(Option<String>, Option<String>)>,
    ) -> Result<Outcome, CniError> {
        let pod = pod_of(&record);
        let mut outcome = Outcome::default();
        if diff.is_empty() {
            if let Some((n, c)) = applied {
                record.networks = n;
                record.choices = c;
                self.records.save(&record).map_err(from_record_err)?;
            }
            return Ok(outcome);
        }
        // Everything an addition needs, before anything changes.
        let planned = match self.plan_additions(&record, &diff) {
            Ok(p) => p,
            Err(e) => {
                self.failed_event(&pod, "FailedAddingInterface", &e);
                return Err(e);
            }
        };
        let mut errors: Vec<CniError> = Vec::new();
        for ifname in &diff.remove {
            match self.unplug(&mut record, ifname) {
                Ok(network) => {
                    outcome.removed.push(ifname.clone());
                    self.source.pod_event(
                        &pod,
                        PodEvent {
                            warning: false,
                            reason: "RemovedInterface",
                            message: format!("Remove {ifname} from {network}"),
                        },
                    );
                }
                Err(e) => {
                    self.failed_event(&pod, "FailedRemovingInterface", &e);
                    outcome.failed.push(ifname.clone());
                    errors.push(e);
                }
            }
        }
        // What stays of a failed removal may hold the names, addresses or devices the
        // additions were planned with: none is made until it is gone.
        let planned = if errors.is_empty() || planned.is_empty() {
            planned
        } else {
            errors.push(invalid(format!(
                "not adding {}: a removal failed first",
                planned
                    .iter()
                    .map(|p| p.ifname.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
            outcome
                .failed
                .extend(planned.iter().map(|p| p.ifname.clone()));
            Vec::new()
        };
        for p in planned {
            let ifname = p.ifname.clone();
            match self.plug(&mut record, p) {
                Ok(()) => outcome.added.push(ifname),
                Err(e) => {
                    self.failed_event(&pod, "FailedAddingInterface", &e);
                    outcome.failed.push(ifname);
                    errors.push(e);
                }
            }
        }
        if let (Some((n, c)), true) = (applied, errors.is_empty()) {
            record.networks = n;
            record.choices = c;
        }
        let status = crate::network_status::build(&record.attachments);
        record.network_status = Some(status.clone());
        let saved = self.records.save(&record).map_err(from_record_err);
        if !pod.name.is_empty() {
            self.publish_status(&pod, &status);
            for a in record
                .attachments
                .iter()
                .filter(|a| outcome.added.contains(&a.ifname))
            {
                self.added_event(&pod, &status, a);
            }
        }
        saved?;
        match errors.into_iter().reduce(|mut a, b| {
            a.msg = format!("{}; {}", a.msg, b.msg);
            a
        }) {
            Some(e) => Err(e),
            None => Ok(outcome),
        }
    }

    /// Plans each addition of `diff` against `record` as it will be after the
    /// removals: NAD, namespace rules, policy, devices (only ones the pod holds and no
    /// other of its attachments uses), logical-network checks.
    fn plan_additions(
        &self,
        record: &Record,
        diff: &Diff,
    ) -> Result<Vec<super::Planned>, CniError> {
        let mut plan = Vec::new();
        for (asked, ifname) in &diff.add {
            let mut sel = asked.clone();
            sel.interface = ifname.clone();
            if !sel.default_route.is_empty() {
                return Err(invalid(format!(
                    "network {} ({}): default-route cannot be given to an interface added to a running pod (the pod's default route stays where ADD put it)",
                    sel.qualified_name(),
                    ifname
                )));
            }
            plan.push(self.plan_selection(sel, asked.clone(), &record.pod_namespace)?);
        }
        for (i, c) in &diff.choose {
            plan.push(self.plan_choice(c, *i, &record.pod_namespace)?);
        }
        if let Some(p) = plan.iter().find(|p| p.logical.is_some()) {
            return Err(invalid(format!(
                "network {} ({}) is a logical network, which cannot be added to a running pod: its delegate brings the interface up before the dataplane can isolate it (recreate the pod with it)",
                p.network, p.ifname
            )));
        }
        let pod = (!record.pod_name.is_empty()).then(|| PodRef {
            namespace: record.pod_namespace.clone(),
            name: record.pod_name.clone(),
            uid: record.pod_uid.clone(),
        });
        let in_use: HashSet<String> = record
            .attachments
            .iter()
            .filter(|a| !diff.remove.contains(&a.ifname))
            .filter_map(|a| a.device.clone())
            .collect();
        self.assign_devices_in_use(pod.as_ref(), &mut plan, Some(&in_use))?;
        self.check_logical_pods(pod.as_ref(), &plan)?;
        self.check_wires(&mut plan)?;
        Ok(plan)
    }

    /// Removes the attachment on `ifname` from the running pod; the network it was.
    /// On failure it stays in the record (with its slot) for DEL to retry.
    pub(super) fn unplug(&self, record: &mut Record, ifname: &str) -> Result<String, CniError> {
        let i = record
            .attachments
            .iter()
            .position(|a| a.ifname == ifname)
            .ok_or_else(|| invalid(format!("no attachment on interface {ifname}")))?;
        let a = record.attachments.remove(i);
        let network = a.network.clone();
        let netns = record.netns.clone();
        let undone = self.undo_live(record, a, &netns);
        self.forget_pod_socket();
        match undone {
            Ok(()) => {
                self.records.save(record).map_err(from_record_err)?;
                if let Some(dp) = &self.dataplane {
                    // The network's ACL goes with its last attachment.
                    let _ = dp
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .forget_unused_acl(&network);
                }
                Ok(network)
            }
            Err(kept_back) => {
                let (a, failures) = *kept_back;
                record.attachments.insert(i, a);
                let _ = self.records.save(record);
                Err(CniError::new(
                    ErrorCode::Io,
                    format!(
                        "removing network {network} ({ifname}): {}",
                        failures.join("; ")
                    ),
                ))
            }
        }
    }

    /// Adds one planned attachment to the running pod: recorded before its delegate
    /// runs, made, checked, put in the dataplane (with its ACL and limits before its
    /// first packet), or undone alone.
    pub(super) fn plug(&self, record: &mut Record, p: super::Planned) -> Result<(), CniError> {
        let mut a = p.to_attachment();
        a.attached_at = Some(k8s_openapi::jiff::Timestamp::now().to_string());
        record.attachments.push(a);
        let i = record.attachments.len() - 1;
        {
            let gate = p
                .logical
                .is_some()
                .then(|| self.logical_gate.lock().unwrap_or_else(|p| p.into_inner()));
            let checked = match gate {
                Some(_) => self
                    .check_carvings(std::slice::from_ref(&p))
                    .and_then(|()| self.check_logical_overlaps(record)),
                None => Ok(()),
            };
            if let Err(e) = checked {
                record.attachments.pop();
                return Err(e);
            }
            if let Err(e) = self.records.save(record) {
                record.attachments.pop();
                return Err(from_record_err(e));
            }
        }
        if let Err(f) = self.make(record, i) {
            return Err(self.undo_last(record, f.err, f.lenient));
        }
        if let Err(e) = super::check_logical_addresses(record) {
            return Err(self.undo_last(record, e, false));
        }
        let mut acls: Vec<Option<PlannedAcl>> = vec![None; record.attachments.len()];
        acls[i] = p.acl.clone();
        if let Err(e) = self.attach_with_acls(record, &acls, i) {
            return Err(self.undo_last(record, e, false));
        }
        if let Err(e) = self.attach_dataplane(record, false) {
            tracing::warn!(container = %record.container_id, "dataplane: {}", e.msg);
        }
        Ok(())
    }

    /// Undoes the record's last attachment (an addition that failed); `err` with what
    /// could not be undone (kept in the record for DEL).
    fn undo_last(&self, record: &mut Record, err: CniError, lenient: bool) -> CniError {
        let Some(a) = record.attachments.pop() else {
            return err;
        };
        let network = a.network.clone();
        let netns = record.netns.clone();
        let best_effort = lenient && a.result.is_none();
        let undone = self.undo_with(record, a, &netns, best_effort, true);
        self.forget_pod_socket();
        if let Some(dp) = &self.dataplane {
            let _ = dp
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget_unused_acl(&network);
        }
        let err = match undone {
            Ok(()) => err,
            Err(kept_back) => {
                let (a, failures) = *kept_back;
                record.attachments.push(a);
                let details = failures.join("; ");
                tracing::error!("hot-plug rollback incomplete: {details}");
                err.with_details(format!(
                    "rollback incomplete (the pod's DEL will retry): {details}"
                ))
            }
        };
        let _ = self.records.save(record);
        err
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::Attachment;
    use serde_json::json;

    fn sel(ns: &str, name: &str, ifname: &str) -> NetworkSelection {
        NetworkSelection {
            namespace: ns.into(),
            name: name.into(),
            interface: ifname.into(),
            ..Default::default()
        }
    }

    fn att(network: &str, ifname: &str, selection: Option<NetworkSelection>) -> Attachment {
        Attachment {
            network: network.into(),
            ifname: ifname.into(),
            cluster_default: false,
            conf: json!({}),
            runtime_config: Default::default(),
            result: Some(json!({})),
            default_route: vec![],
            device: None,
            slot: None,
            bandwidth: Default::default(),
            logical: None,
            physical: None,
            selection,
            attached_at: None,
            chosen: None,
        }
    }

    fn record(attachments: Vec<Attachment>) -> Record {
        let mut all = vec![Attachment {
            cluster_default: true,
            ..att("cluster", "eth0", None)
        }];
        all.extend(attachments);
        Record {
            container_id: "c".into(),
            netns: "/n".into(),
            ifname: "eth0".into(),
            pod_namespace: "ns".into(),
            pod_name: "p".into(),
            pod_uid: "u".into(),
            cni_args: String::new(),
            attachments: all,
            network_status: None,
            added_at_ms: Some(1),
            networks: None,
            choices: None,
            static_networks: false,
            netns_inode: None,
        }
    }

    #[test]
    fn unnamed_entries_keep_their_names_when_an_earlier_one_goes() {
        let r = record(vec![
            att("ns/a", "net1", Some(sel("ns", "a", ""))),
            att("ns/b", "net2", Some(sel("ns", "b", ""))),
        ]);
        // "a" removed: "b" keeps net2 (positional naming would have renamed it net1).
        let d = diff(&r, &[sel("ns", "b", "")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert!(d.add.is_empty());
        // A new unnamed entry takes the lowest free name.
        let d = diff(&r, &[sel("ns", "b", ""), sel("ns", "c", "")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert_eq!(d.add, vec![(sel("ns", "c", ""), "net1".to_string())]);
        let d = diff(
            &r,
            &[sel("ns", "a", ""), sel("ns", "b", ""), sel("ns", "c", "")],
            &[],
        )
        .unwrap();
        assert!(d.remove.is_empty());
        assert_eq!(d.add, vec![(sel("ns", "c", ""), "net3".to_string())]);
    }

    #[test]
    fn a_changed_entry_is_removed_and_added_again() {
        let r = record(vec![att("ns/a", "net1", Some(sel("ns", "a", "")))]);
        let mut changed = sel("ns", "a", "");
        changed.ips = vec!["10.0.0.5/24".into()];
        let d = diff(&r, std::slice::from_ref(&changed), &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert_eq!(d.add, vec![(changed, "net1".to_string())]);
        // Same NAD, now with an interface name: removed and added under it.
        let d = diff(&r, &[sel("ns", "a", "data0")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert_eq!(d.add, vec![(sel("ns", "a", "data0"), "data0".to_string())]);
    }

    #[test]
    fn names_in_use_and_the_cluster_interface_are_refused() {
        let r = record(vec![att("ns/a", "net1", Some(sel("ns", "a", "")))]);
        let e = diff(&r, &[sel("ns", "a", ""), sel("ns", "b", "net1")], &[]).unwrap_err();
        assert!(
            e.msg.contains("net1 is in use in the pod by network ns/a"),
            "{}",
            e.msg
        );
        let e = diff(&r, &[sel("ns", "a", ""), sel("ns", "b", "eth0")], &[]).unwrap_err();
        assert!(e.msg.contains("cluster network"), "{}", e.msg);
        // The name of an attachment being removed is free for its replacement.
        let d = diff(&r, &[sel("ns", "b", "net1")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert_eq!(d.add, vec![(sel("ns", "b", "net1"), "net1".to_string())]);
    }

    #[test]
    fn records_before_hot_plug_match_by_network_and_interface() {
        let r = record(vec![att("ns/a", "net1", None), att("ns/b", "fast", None)]);
        let d = diff(&r, &[sel("ns", "a", ""), sel("ns", "b", "fast")], &[]).unwrap();
        assert!(d.is_empty(), "{d:?}");
        let d = diff(&r, &[sel("ns", "b", "fast")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert!(d.add.is_empty());
    }

    fn choice(interface: &str, from: &[&str]) -> Choice {
        crate::choice::spec::parse(
            &json!([{"interface": interface, "from": from, "by": "least-utilized"}]).to_string(),
            "ns",
        )
        .unwrap()
        .remove(0)
    }

    #[test]
    fn chosen_attachments_follow_their_choice() {
        let c = choice("data0", &["a", "b"]);
        let mut chosen = att("ns/b", "data0", None);
        chosen.chosen = Some(crate::choice::spec::Chosen {
            choice: c.clone(),
            reason: String::new(),
            at: String::new(),
            retiring: false,
        });
        let r = record(vec![att("ns/a", "net1", Some(sel("ns", "a", ""))), chosen]);
        // The same choice: kept (not chosen again).
        let d = diff(&r, &[sel("ns", "a", "")], std::slice::from_ref(&c)).unwrap();
        assert!(d.is_empty(), "{d:?}");
        // A changed choice: removed, and the new one made.
        let c2 = choice("data0", &["a", "b", "c"]);
        let d = diff(&r, &[sel("ns", "a", "")], std::slice::from_ref(&c2)).unwrap();
        assert_eq!(d.remove, vec!["data0"]);
        assert_eq!(d.choose, vec![(0, c2)]);
        // A new choice on a name in use is refused.
        let e = diff(
            &r,
            &[sel("ns", "a", "")],
            &[c.clone(), choice("net1", &["b"])],
        )
        .unwrap_err();
        assert!(e.msg.contains("net1 is in use"), "{}", e.msg);
        // An unnamed new entry does not take a chosen interface's name.
        let d = diff(
            &r,
            &[sel("ns", "a", ""), sel("ns", "x", "")],
            &[c, choice("net2", &["b"])],
        )
        .unwrap();
        assert_eq!(d.add, vec![(sel("ns", "x", ""), "net3".to_string())]);
    }

    #[test]
    fn an_unfinished_attachment_is_made_again_and_the_default_route_stays() {
        let mut unfinished = att("ns/a", "net1", Some(sel("ns", "a", "")));
        unfinished.result = None;
        let r = record(vec![unfinished]);
        let d = diff(&r, &[sel("ns", "a", "")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert_eq!(d.add, vec![(sel("ns", "a", ""), "net1".to_string())]);
        let mut routed = att("ns/a", "net1", Some(sel("ns", "a", "")));
        routed.default_route = vec!["10.0.0.1".parse().unwrap()];
        let r = record(vec![routed]);
        let e = diff(&r, &[], &[]).unwrap_err();
        assert!(
            e.msg.contains("carries the pod's default route"),
            "{}",
            e.msg
        );
    }

    #[test]
    fn an_old_records_default_route_entry_is_kept_when_others_move() {
        // Made by an agent before hot-plug from "a, b" with b's default-route.
        let mut b = att("ns/b", "net2", None);
        b.default_route = vec!["10.0.0.1".parse().unwrap()];
        let r = record(vec![att("ns/a", "net1", None), b]);
        let mut asked_b = sel("ns", "b", "");
        asked_b.default_route = vec!["10.0.0.1".parse().unwrap()];
        // "a" removed: b is now first (positionally net1) but keeps net2.
        let d = diff(&r, std::slice::from_ref(&asked_b), &[]).unwrap();
        assert_eq!(d.remove, vec!["net1"]);
        assert!(d.add.is_empty(), "{d:?}");
    }

    #[test]
    fn the_same_network_twice_keeps_both() {
        let r = record(vec![
            att("ns/a", "net1", Some(sel("ns", "a", ""))),
            att("ns/a", "net2", Some(sel("ns", "a", ""))),
        ]);
        let d = diff(&r, &[sel("ns", "a", ""), sel("ns", "a", "")], &[]).unwrap();
        assert!(d.is_empty());
        let d = diff(&r, &[sel("ns", "a", "")], &[]).unwrap();
        assert_eq!(d.remove, vec!["net2"]);
    }
}
