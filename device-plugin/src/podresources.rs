//! kubelet's PodResources API (v1) as a client: which devices of a resource a pod
//! was given, for the CNI path to find its VF.

use crate::api::podresources as pr;
use std::path::Path;

pub const DEFAULT_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";

#[derive(Debug, thiserror::Error)]
pub enum PodResourcesError {
    #[error("kubelet PodResources API at {socket}: {message}")]
    Unavailable { socket: String, message: String },
    #[error("kubelet PodResources API has no pod {0}")]
    NoPod(String),
}

/// Device IDs of `resource` allocated to any container of pod `namespace/name`,
/// in container order. Uses Get (kubelet 1.27+), or List where Get is missing.
pub async fn pod_devices(
    socket: &Path,
    namespace: &str,
    name: &str,
    resource: &str,
) -> Result<Vec<String>, PodResourcesError> {
    let unavailable = |message: String| PodResourcesError::Unavailable {
        socket: socket.display().to_string(),
        message,
    };
    let ch = crate::uds::channel(socket)
        .await
        .map_err(|e| unavailable(e.to_string()))?;
    let mut client = pr::pod_resources_lister_client::PodResourcesListerClient::new(ch);
    let pod = match client
        .get(pr::GetPodResourcesRequest {
            pod_name: name.into(),
            pod_namespace: namespace.into(),
        })
        .await
    {
        Ok(r) => r.into_inner().pod_resources,
        Err(s) if s.code() == tonic::Code::Unimplemented => client
            .list(pr::ListPodResourcesRequest {})
            .await
            .map_err(|s| unavailable(format!("List: {}", s.message())))?
            .into_inner()
            .pod_resources
            .into_iter()
            .find(|p| p.namespace == namespace && p.name == name),
        Err(s) if s.code() == tonic::Code::NotFound => None,
        Err(s) => return Err(unavailable(format!("Get: {}", s.message()))),
    };
    let pod = pod.ok_or_else(|| PodResourcesError::NoPod(format!("{namespace}/{name}")))?;
    Ok(pod
        .containers
        .iter()
        .flat_map(|c| &c.devices)
        .filter(|d| d.resource_name == resource)
        .flat_map(|d| d.device_ids.iter().cloned())
        .collect())
}
