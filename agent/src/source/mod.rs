//! Where networks and pod annotations come from: the Kubernetes API or, without
//! Kubernetes, NAD files plus the annotations the container runtime passes.

pub mod files;
pub mod kube;

use crate::nad::NetworkAttachmentDefinition;
use k8s_openapi::api::core::v1::PodSpec;
use std::collections::BTreeMap;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
    pub uid: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("NetworkAttachmentDefinition {name} not found{hint}")]
    NadNotFound { name: String, hint: String },
    #[error("pod {0} not found")]
    PodNotFound(String),
    #[error("{what}: {message}")]
    Unavailable { what: String, message: String },
}

pub trait NetworkSource: Send + Sync {
    fn get_nad(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<NetworkAttachmentDefinition, SourceError>;

    /// The pod's annotations. `from_runtime` is what the container runtime passed in
    /// `runtimeConfig["io.kubernetes.cri.pod-annotations"]`, if anything.
    fn pod_annotations(
        &self,
        pod: &PodRef,
        from_runtime: Option<&BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, SourceError>;

    /// Every NAD the source knows that is a logical network (carries
    /// `trellis.dev/logical-network`), for the checks that span the cluster. A NAD
    /// that cannot be read is left out: no pod can use it either.
    fn logical_nads(&self) -> Result<Vec<NetworkAttachmentDefinition>, SourceError>;

    /// The pod's spec, where the source has one (the Kubernetes API); None: the
    /// source cannot know it (the container runtime passes no spec to CNI).
    fn pod_spec(&self, _pod: &PodRef) -> Result<Option<PodSpec>, SourceError> {
        Ok(None)
    }

    /// Records `k8s.v1.cni.cncf.io/network-status` on the pod, where there is a pod
    /// object to record it on.
    fn publish_network_status(&self, pod: &PodRef, status: &str) -> Result<(), SourceError>;

    /// Whether the source can answer (for STATUS).
    fn ready(&self) -> Result<(), SourceError>;

    /// Posts an event on the pod (AddedInterface, FailedAddingInterface), where there
    /// is a pod object; never blocks the caller, and a failure is only logged.
    fn pod_event(&self, _pod: &PodRef, _event: PodEvent) {}

    /// A stream of this node's pods as they change (each one's every update, and the
    /// whole list at start and after a re-list), where the source watches pods; None
    /// where it does not (no pod objects).
    fn pod_changes(&self) -> Option<std::sync::mpsc::Receiver<PodChange>> {
        None
    }
}

/// A pod of this node changed (or is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodChange {
    pub pod: PodRef,
    pub gone: bool,
}

/// An event about a pod, as `kubectl describe pod` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodEvent {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}
