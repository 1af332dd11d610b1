//! What the pod object is told: its network-status annotation and events.

use super::Engine;
use crate::records::Attachment;
use crate::selection::NETWORK_STATUS_ANNOTATION;
use crate::source::{PodEvent, PodRef};
use serde_json::Value;

impl Engine {
    /// Writes `status` as the pod's network-status. The pod already has its networks;
    /// a status that cannot be written is logged, not a reason to tear them down.
    pub(crate) fn publish_status(&self, pod: &PodRef, status: &Value) {
        if let Err(e) = self.source.publish_network_status(pod, &status.to_string()) {
            tracing::warn!(pod = %pod, "cannot write {NETWORK_STATUS_ANNOTATION}: {e}");
        }
    }

    /// AddedInterface for attachment `a`, with its addresses from `status`.
    pub(crate) fn added_event(&self, pod: &PodRef, status: &Value, a: &Attachment) {
        let ips: Vec<&str> = status
            .as_array()
            .into_iter()
            .flatten()
            .filter(|e| e["interface"] == a.ifname.as_str())
            .flat_map(|e| e["ips"].as_array().into_iter().flatten())
            .filter_map(Value::as_str)
            .collect();
        self.source.pod_event(
            pod,
            PodEvent {
                warning: false,
                reason: "AddedInterface",
                message: format!("Add {} [{}] from {}", a.ifname, ips.join(" "), a.network),
            },
        );
    }

    /// A warning event on the pod with `err` (and its details).
    pub(crate) fn failed_event(
        &self,
        pod: &PodRef,
        reason: &'static str,
        err: &trellis_cni::CniError,
    ) {
        let mut message = err.msg.clone();
        if !err.details.is_empty() {
            message = format!("{message} ({})", err.details);
        }
        self.source.pod_event(
            pod,
            PodEvent {
                warning: true,
                reason,
                message,
            },
        );
    }
}
