//! Undoing attachments: a failed ADD's rollback and a DEL's teardown.

use super::Engine;
use crate::records::{Attachment, Record};
use trellis_cni::CniError;

impl Engine {
    /// Undoes a partial ADD; the error says what failed and, if undoing failed too,
    /// what is left for the runtime's DEL.
    pub(crate) fn roll_back(&self, record: Record, err: CniError) -> CniError {
        self.roll_back_with(record, err, false)
    }

    /// `roll_back`; `lenient`: the last attachment's ADD failed in its first plugin
    /// with an answer, so its DEL is a best effort (see `tear_down`).
    pub(crate) fn roll_back_with(&self, record: Record, err: CniError, lenient: bool) -> CniError {
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
    pub(crate) fn tear_down(
        &self,
        mut record: Record,
        netns: &str,
        add_failed: bool,
    ) -> Vec<String> {
        let mut failures = Vec::new();
        let mut kept = Vec::new();
        let mut lenient = add_failed;
        // A socket the dataplane keeps in the last pod netns it worked in would keep
        // a deleted netns (and a VF in it) alive past the restore below.
        self.forget_pod_socket();
        while let Some(a) = record.attachments.pop() {
            let best_effort = std::mem::take(&mut lenient) && a.result.is_none();
            match self.undo(&record, a, netns, best_effort) {
                Ok(()) => {}
                Err(kept_back) => {
                    let (a, f) = *kept_back;
                    failures.extend(f);
                    kept.push(a);
                }
            }
        }
        kept.reverse();
        record.attachments = kept;
        self.forget_pod_socket();
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

    /// Undoes one attachment of `record` (which no longer lists it): its limits, its
    /// delegate chain's DEL in `netns` (empty: the netns is gone), its dataplane slot.
    /// On failure the attachment comes back with what failed, for the record to keep
    /// so a later DEL retries it (without its slot, except in a running pod, see
    /// `undo_live`). With `best_effort` (its ADD just
    /// failed in its first plugin with an answer), a failing DEL is only logged.
    pub(crate) fn undo(
        &self,
        record: &Record,
        a: Attachment,
        netns: &str,
        best_effort: bool,
    ) -> Result<(), Box<(Attachment, Vec<String>)>> {
        self.undo_with(record, a, netns, best_effort, false)
    }

    /// `undo` in a pod that keeps running (hot-unplug): if the delegate's DEL fails, the
    /// interface may still be there, so it keeps its dataplane slot (its ACL, logical
    /// network and accounting) for the pod's DEL to undo.
    pub(crate) fn undo_live(
        &self,
        record: &Record,
        a: Attachment,
        netns: &str,
    ) -> Result<(), Box<(Attachment, Vec<String>)>> {
        self.undo_with(record, a, netns, false, true)
    }

    pub(crate) fn undo_with(
        &self,
        record: &Record,
        mut a: Attachment,
        netns: &str,
        best_effort: bool,
        live: bool,
    ) -> Result<(), Box<(Attachment, Vec<String>)>> {
        let mut failures = Vec::new();
        if let (Some(dp), Some(slot)) = (&self.dataplane, a.slot) {
            // A qdisc shaping the interface goes before the delegate's DEL, which may
            // take the interface back to the host (host-device, VFs) with it.
            if !a.bandwidth.is_none() {
                let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
                dp.unshape(slot, &record.container_id, &a.ifname);
            }
        }
        match self.delegate_del(record, &a, netns) {
            Err(e) if live => {
                // The pod keeps running: its interface stays, kept (with its slot) for
                // the pod's DEL, which drops it.
                failures.push(format!(
                    "network {} ({}): recorded config cannot be run: {e}",
                    a.network, a.ifname
                ));
            }
            Err(e) => {
                // Nothing of it can be run (an older agent recorded a config this one
                // refuses, such as a plugin named by a path): a DEL that kept it would
                // fail for ever and hold the sandbox.
                tracing::warn!(container = %record.container_id, network = %a.network, ifname = %a.ifname,
                    conf = %a.conf, "recorded config cannot be run ({e}); its attachment is dropped without a delegate DEL");
            }
            Ok(errs) if errs.is_empty() => {}
            Ok(errs) if best_effort => {
                tracing::warn!(container = %record.container_id, network = %a.network, ifname = %a.ifname,
                    "DEL after its failed ADD failed too (left to the plugin): {}",
                    errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "));
            }
            Ok(errs) => failures.extend(
                errs.iter()
                    .map(|e| format!("network {} ({}): {e}", a.network, a.ifname)),
            ),
        }
        // The dataplane goes last: a delegate's DEL usually deletes the interface (or
        // moves a VF out of the pod), its filters with it, so what is left to undo is
        // the slot itself.
        let keep_slot = live && !failures.is_empty();
        if let (Some(dp), Some(slot), false) = (&self.dataplane, a.slot, keep_slot) {
            let mut dp = dp.lock().unwrap_or_else(|p| p.into_inner());
            // Only a slot this attachment still owns: after a reboot the number may be
            // another pod's.
            match dp.detach_owned(slot, &record.container_id, &a.ifname) {
                Ok(mine) => {
                    if !mine {
                        tracing::info!(container = %record.container_id, ifname = %a.ifname, slot,
                            "dataplane slot is no longer this attachment's; left alone");
                    }
                    a.slot = None;
                }
                Err(e) => failures.push(format!("network {} ({}): {e}", a.network, a.ifname)),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(Box::new((a, failures)))
        }
    }

    /// Closes the socket an attach kept in a pod's netns (it would keep a deleted
    /// netns alive).
    pub(crate) fn forget_pod_socket(&self) {
        if let Some(dp) = &self.dataplane {
            dp.lock()
                .unwrap_or_else(|p| p.into_inner())
                .forget_pod_socket();
        }
    }
}
