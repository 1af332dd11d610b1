//! A CRI client (the kubelet's side of the runtime API) over containerd's unix socket.

use hyper_util::rt::TokioIo;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use k8s_cri::v1::*;
use std::collections::HashMap;
use std::path::PathBuf;
use tonic::transport::{Channel, Endpoint};

pub struct Cri {
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    pub async fn connect(socket: PathBuf) -> Result<Cri, tonic::transport::Error> {
        let channel = Endpoint::try_from("http://[::1]:0")?
            .connect_with_connector(tower::service_fn(move |_| {
                let s = socket.clone();
                async move {
                    Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
                }
            }))
            .await?;
        Ok(Cri {
            client: RuntimeServiceClient::new(channel),
        })
    }

    /// RunPodSandbox for pod `namespace/name` with the given annotations.
    pub async fn run_pod(
        &mut self,
        namespace: &str,
        name: &str,
        annotations: HashMap<String, String>,
        log_dir: &str,
    ) -> Result<String, tonic::Status> {
        let config = PodSandboxConfig {
            metadata: Some(PodSandboxMetadata {
                name: name.into(),
                uid: format!("uid-{namespace}-{name}"),
                namespace: namespace.into(),
                attempt: 0,
            }),
            hostname: name.into(),
            log_directory: log_dir.into(),
            annotations,
            linux: Some(LinuxPodSandboxConfig {
                security_context: Some(LinuxSandboxSecurityContext {
                    namespace_options: Some(NamespaceOption {
                        network: NamespaceMode::Pod as i32,
                        pid: NamespaceMode::Container as i32,
                        ipc: NamespaceMode::Pod as i32,
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        };
        let r = self
            .client
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    /// RunPodSandbox with a config made by the caller (a DaemonSet's pod).
    pub async fn run_pod_config(
        &mut self,
        config: PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let r = self
            .client
            .run_pod_sandbox(RunPodSandboxRequest {
                config: Some(config),
                runtime_handler: String::new(),
            })
            .await?;
        Ok(r.into_inner().pod_sandbox_id)
    }

    /// CreateContainer in `pod` (made from `sandbox`).
    pub async fn create_container(
        &mut self,
        pod: &str,
        config: ContainerConfig,
        sandbox: PodSandboxConfig,
    ) -> Result<String, tonic::Status> {
        let r = self
            .client
            .create_container(CreateContainerRequest {
                pod_sandbox_id: pod.into(),
                config: Some(config),
                sandbox_config: Some(sandbox),
            })
            .await?;
        Ok(r.into_inner().container_id)
    }

    pub async fn start_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.client
            .start_container(StartContainerRequest {
                container_id: id.into(),
            })
            .await?;
        Ok(())
    }

    /// StopContainer: SIGTERM, then SIGKILL after `timeout` seconds (as kubelet).
    pub async fn stop_container(&mut self, id: &str, timeout: i64) -> Result<(), tonic::Status> {
        self.client
            .stop_container(StopContainerRequest {
                container_id: id.into(),
                timeout,
            })
            .await?;
        Ok(())
    }

    pub async fn remove_container(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.client
            .remove_container(RemoveContainerRequest {
                container_id: id.into(),
            })
            .await?;
        Ok(())
    }

    /// (state, exit code) of a container.
    pub async fn container_state(
        &mut self,
        id: &str,
    ) -> Result<(ContainerState, i32), tonic::Status> {
        let r = self
            .client
            .container_status(ContainerStatusRequest {
                container_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner();
        let s = r.status.unwrap_or_default();
        Ok((
            ContainerState::try_from(s.state).unwrap_or(ContainerState::ContainerUnknown),
            s.exit_code,
        ))
    }

    pub async fn pod_ip(&mut self, id: &str) -> Result<String, tonic::Status> {
        let r = self
            .client
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: false,
            })
            .await?
            .into_inner();
        Ok(r.status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default())
    }

    pub async fn stop_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.client
            .stop_pod_sandbox(StopPodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn remove_pod(&mut self, id: &str) -> Result<(), tonic::Status> {
        self.client
            .remove_pod_sandbox(RemovePodSandboxRequest {
                pod_sandbox_id: id.into(),
            })
            .await?;
        Ok(())
    }

    pub async fn list_pods(&mut self) -> Result<Vec<String>, tonic::Status> {
        let r = self
            .client
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?;
        Ok(r.into_inner().items.into_iter().map(|p| p.id).collect())
    }

    /// Every sandbox: (id, pod name, ready).
    pub async fn list_pod_states(&mut self) -> Result<Vec<(String, String, bool)>, tonic::Status> {
        let r = self
            .client
            .list_pod_sandbox(ListPodSandboxRequest { filter: None })
            .await?;
        Ok(r.into_inner()
            .items
            .into_iter()
            .map(|p| {
                let ready = p.state == PodSandboxState::SandboxReady as i32;
                (p.id, p.metadata.map(|m| m.name).unwrap_or_default(), ready)
            })
            .collect())
    }

    /// The network namespace path containerd gave sandbox `id` (from its verbose
    /// status: the runtime spec's network namespace), if it has one.
    pub async fn netns_path(&mut self, id: &str) -> Result<Option<String>, tonic::Status> {
        let r = self
            .client
            .pod_sandbox_status(PodSandboxStatusRequest {
                pod_sandbox_id: id.into(),
                verbose: true,
            })
            .await?
            .into_inner();
        let Some(info) = r.info.get("info") else {
            return Ok(None);
        };
        let info: serde_json::Value = serde_json::from_str(info).unwrap_or_default();
        Ok(info["runtimeSpec"]["linux"]["namespaces"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|n| n["type"] == "network")
            .and_then(|n| n["path"].as_str())
            .map(str::to_string))
    }
}
