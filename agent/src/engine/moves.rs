//! Moving a chosen attachment to another of its choice's candidates, make-before-break:
//! the new network's interface comes up first under the choice's other name
//! (`<interface>` and `<interface>m` take turns), the old one is marked retiring and
//! removed after a grace period. A move that fails leaves the old attachment as it was.

use super::{from_record_err, invalid, Engine};
use crate::choice::spec::Chosen;
use crate::records::Record;
use crate::selection::NetworkSelection;
use crate::source::{PodEvent, PodRef};
use std::collections::HashSet;
use trellis_cni::CniError;

/// The name a chosen attachment moves to from `current`.
pub fn other_name(interface: &str, current: &str) -> String {
    if current == interface {
        format!("{interface}m")
    } else {
        interface.to_string()
    }
}

impl Engine {
    /// Brings up `target` (`namespace/name`, one of the choice's candidates) for the
    /// chosen attachment on `ifname` of `container_id`, and marks that one retiring.
    /// The new interface's name.
    pub fn move_begin(
        &self,
        container_id: &str,
        ifname: &str,
        target: &str,
        reason: String,
    ) -> Result<String, CniError> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let _lock = self.locks.lock(container_id);
        let mut record = self.loaded(container_id)?;
        let i = record
            .attachments
            .iter()
            .position(|a| a.ifname == ifname && a.chosen.as_ref().is_some_and(|c| !c.retiring))
            .ok_or_else(|| invalid(format!("no chosen attachment on {ifname} to move")))?;
        let old = record.attachments[i].clone();
        let chosen = old.chosen.clone().expect("found chosen");
        if !chosen.choice.from.iter().any(|n| n == target) || old.network == target {
            return Err(invalid(format!(
                "{target} is not another candidate of the choice on {ifname}"
            )));
        }
        let new_name = other_name(&chosen.choice.interface, ifname);
        trellis_cni::env::validate_ifname(&new_name)
            .map_err(|m| invalid(format!("moving {ifname}: interface name {new_name:?} {m}")))?;
        if new_name == record.ifname || record.attachments.iter().any(|a| a.ifname == new_name) {
            return Err(invalid(format!(
                "moving {ifname}: interface name {new_name} is in use in the pod"
            )));
        }
        let (ns, name) = target
            .split_once('/')
            .ok_or_else(|| invalid(format!("{target} is not namespace/name")))?;
        let sel = NetworkSelection {
            namespace: ns.into(),
            name: name.into(),
            interface: new_name.clone(),
            ..Default::default()
        };
        let mut plan = vec![self.plan_selection(sel.clone(), sel, &record.pod_namespace)?];
        let pod = pod_ref(&record);
        // The old attachment keeps its device until it goes: the new one needs another.
        let in_use: HashSet<String> = record
            .attachments
            .iter()
            .filter_map(|a| a.device.clone())
            .collect();
        self.assign_devices_in_use(pod.as_ref(), &mut plan, Some(&in_use))?;
        self.check_logical_pods(pod.as_ref(), &plan)?;
        self.check_wires(&mut plan)?;
        let mut p = plan.pop().expect("one planned");
        p.chosen = Some(Chosen {
            choice: chosen.choice.clone(),
            reason: format!("moved from {} ({ifname}): {reason}", old.network),
            at: k8s_openapi::jiff::Timestamp::now().to_string(),
            retiring: false,
        });
        // The old one is marked retiring only once the new one is made: an agent that
        // dies before keeps the old one (a half-made new one, without a result, is
        // removed by the next reconcile of the pod, at the latest its resync, or by its
        // DEL).
        if let Err(e) = self.plug(&mut record, p) {
            if let Some(pod) = &pod {
                self.failed_event(pod, "FailedMovingInterface", &e);
            }
            return Err(e);
        }
        set_retiring(&mut record, ifname, true);
        let status = crate::network_status::build(&record.attachments);
        record.network_status = Some(status.clone());
        if let Err(e) = self.records.save(&record) {
            // Not on disk as moving: the new one goes again, the old one stays.
            set_retiring(&mut record, ifname, false);
            let _ = self.unplug(&mut record, &new_name);
            return Err(from_record_err(e));
        }
        if let Some(pod) = &pod {
            self.publish_status(pod, &status);
            if let Some(a) = record.attachments.last() {
                self.added_event(pod, &status, a);
            }
            self.source.pod_event(
                pod,
                PodEvent {
                    warning: false,
                    reason: "MovedInterface",
                    message: format!(
                        "Moving {ifname} from {} to {target} ({new_name}): {reason}",
                        old.network
                    ),
                },
            );
        }
        Ok(new_name)
    }

    /// Removes the retiring attachment on `ifname` (the end of a move).
    pub fn move_end(&self, container_id: &str, ifname: &str) -> Result<(), CniError> {
        let _gate = self.gc_gate.read().unwrap_or_else(|p| p.into_inner());
        let _lock = self.locks.lock(container_id);
        let Some(mut record) = self.records.load(container_id).map_err(from_record_err)? else {
            // The pod went in the grace period: its DEL took both.
            return Ok(());
        };
        let retiring = record
            .attachments
            .iter()
            .any(|a| a.ifname == ifname && a.chosen.as_ref().is_some_and(|c| c.retiring));
        if !retiring {
            return Ok(());
        }
        let network = self.unplug(&mut record, ifname)?;
        let status = crate::network_status::build(&record.attachments);
        record.network_status = Some(status.clone());
        self.records.save(&record).map_err(from_record_err)?;
        if let Some(pod) = pod_ref(&record) {
            self.publish_status(&pod, &status);
            self.source.pod_event(
                &pod,
                PodEvent {
                    warning: false,
                    reason: "RemovedInterface",
                    message: format!("Remove {ifname} from {network} (moved)"),
                },
            );
        }
        Ok(())
    }

    /// Attachments marked retiring (moves whose old side has not gone yet, also ones an
    /// earlier agent left mid-move): (container, interface).
    pub fn retiring(&self) -> Result<Vec<(String, String)>, CniError> {
        let (records, _) = self.records.list().map_err(from_record_err)?;
        Ok(records
            .iter()
            .flat_map(|r| {
                r.attachments
                    .iter()
                    .filter(|a| a.chosen.as_ref().is_some_and(|c| c.retiring))
                    .map(|a| (r.container_id.clone(), a.ifname.clone()))
            })
            .collect())
    }
}

fn set_retiring(record: &mut Record, ifname: &str, on: bool) {
    for a in record.attachments.iter_mut().filter(|a| a.ifname == ifname) {
        if let Some(c) = &mut a.chosen {
            c.retiring = on;
        }
    }
}

fn pod_ref(record: &Record) -> Option<PodRef> {
    (!record.pod_name.is_empty()).then(|| PodRef {
        namespace: record.pod_namespace.clone(),
        name: record.pod_name.clone(),
        uid: record.pod_uid.clone(),
    })
}
