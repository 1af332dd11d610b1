//! kubelet's side of the device-plugin and PodResources APIs, written from the
//! published definitions (no kubelet can run here): a Registration server on
//! `<dir>/kubelet.sock` that records what registers, a client for each plugin's
//! endpoint, and a PodResources server answering from a table. Restart behaves as
//! kubelet's device manager does: every socket in the dir is removed, then
//! `kubelet.sock` is created again.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status};
use trellis_device_plugin::api::deviceplugin as dp;
use trellis_device_plugin::api::podresources as pr;

#[derive(Debug, Clone)]
pub struct Registration {
    pub at: Instant,
    pub request: dp::RegisterRequest,
}

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Registration>>>);

#[tonic::async_trait]
impl dp::registration_server::Registration for Recorder {
    async fn register(
        &self,
        req: Request<dp::RegisterRequest>,
    ) -> Result<Response<dp::Empty>, Status> {
        let r = req.into_inner();
        if r.version != "v1beta1" {
            return Err(Status::invalid_argument(format!(
                "unsupported version {}",
                r.version
            )));
        }
        self.0.lock().unwrap().push(Registration {
            at: Instant::now(),
            request: r,
        });
        Ok(Response::new(dp::Empty {}))
    }
}

pub struct FakeKubelet {
    pub dir: PathBuf,
    recorder: Recorder,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl FakeKubelet {
    /// Serves Registration on `<dir>/kubelet.sock`. Call inside a tokio runtime.
    pub fn start(dir: &Path) -> FakeKubelet {
        std::fs::create_dir_all(dir).unwrap();
        let mut k = FakeKubelet {
            dir: dir.to_path_buf(),
            recorder: Recorder::default(),
            server: None,
        };
        k.serve();
        k
    }

    fn serve(&mut self) {
        let incoming = trellis_device_plugin::uds::bind(&self.dir.join("kubelet.sock"))
            .expect("bind kubelet.sock");
        let svc = dp::registration_server::RegistrationServer::new(self.recorder.clone());
        self.server = Some(tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(incoming)
                .await;
        }));
    }

    pub fn stop(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
        let _ = std::fs::remove_file(self.dir.join("kubelet.sock"));
    }

    /// kubelet restarting: its device manager empties the dir, then listens again.
    /// Returns when `kubelet.sock` is back.
    pub fn restart(&mut self) -> Instant {
        self.stop();
        for e in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let at = Instant::now();
        self.serve();
        at
    }

    /// kubelet restarting without emptying the dir (what a kubelet stand-in or a
    /// kubelet that keeps its checkpoint does): only `kubelet.sock` goes and comes
    /// back. Returns when it is back, and whether the new socket got the old inode
    /// number (ext4 reuses freed inodes).
    pub fn recreate_socket(&mut self) -> (Instant, bool) {
        use std::os::unix::fs::MetadataExt;
        let sock = self.dir.join("kubelet.sock");
        let old = std::fs::metadata(&sock).map(|m| m.ino()).ok();
        self.stop();
        let at = Instant::now();
        self.serve();
        let new = std::fs::metadata(&sock).map(|m| m.ino()).ok();
        (at, old.is_some() && old == new)
    }

    pub fn registrations(&self) -> Vec<Registration> {
        self.recorder.0.lock().unwrap().clone()
    }

    /// Waits until there are `n` registrations in all.
    pub async fn wait_registrations(&self, n: usize, timeout: Duration) -> Vec<Registration> {
        let deadline = Instant::now() + timeout;
        loop {
            let r = self.registrations();
            if r.len() >= n {
                return r;
            }
            assert!(
                Instant::now() < deadline,
                "only {} of {n} registrations within {timeout:?}: {r:#?}",
                r.len()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A client of a registered plugin, as kubelet makes one.
    pub async fn plugin(
        &self,
        endpoint: &str,
    ) -> dp::device_plugin_client::DevicePluginClient<tonic::transport::Channel> {
        let ch = trellis_device_plugin::uds::channel(&self.dir.join(endpoint))
            .await
            .expect("connect to plugin");
        dp::device_plugin_client::DevicePluginClient::new(ch)
    }
}

impl Drop for FakeKubelet {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Reads ListAndWatch until `pred` holds for a list; returns it and when it came.
pub async fn watch_until(
    stream: &mut tonic::Streaming<dp::ListAndWatchResponse>,
    timeout: Duration,
    pred: impl Fn(&[dp::Device]) -> bool,
) -> (Vec<dp::Device>, Instant) {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let next = tokio::time::timeout_at(deadline, stream.message())
            .await
            .unwrap_or_else(|_| panic!("no matching ListAndWatch update within {timeout:?}"));
        let list = next
            .expect("ListAndWatch stream")
            .expect("stream ended")
            .devices;
        if pred(&list) {
            return (list, Instant::now());
        }
    }
}

/// The pods a fake PodResources server answers with; tests change it as pods come
/// and go (kubelet's allocations are whatever the test says, also a device handed to
/// two pods).
#[derive(Clone, Default)]
pub struct PodResourcesTable(Arc<Mutex<Vec<pr::PodResources>>>);

impl PodResourcesTable {
    pub fn new(pods: Vec<pr::PodResources>) -> PodResourcesTable {
        PodResourcesTable(Arc::new(Mutex::new(pods)))
    }

    /// Adds `pod`, replacing one of the same namespace and name.
    pub fn put(&self, pod: pr::PodResources) {
        let mut pods = self.0.lock().unwrap();
        pods.retain(|p| !(p.namespace == pod.namespace && p.name == pod.name));
        pods.push(pod);
    }

    pub fn remove(&self, namespace: &str, name: &str) {
        self.0
            .lock()
            .unwrap()
            .retain(|p| !(p.namespace == namespace && p.name == name));
    }

    fn snapshot(&self) -> Vec<pr::PodResources> {
        self.0.lock().unwrap().clone()
    }
}

#[derive(Clone)]
struct PodTable {
    pods: PodResourcesTable,
    get_implemented: bool,
}

#[tonic::async_trait]
impl pr::pod_resources_lister_server::PodResourcesLister for PodTable {
    async fn list(
        &self,
        _: Request<pr::ListPodResourcesRequest>,
    ) -> Result<Response<pr::ListPodResourcesResponse>, Status> {
        Ok(Response::new(pr::ListPodResourcesResponse {
            pod_resources: self.pods.snapshot(),
        }))
    }

    async fn get_allocatable_resources(
        &self,
        _: Request<pr::AllocatableResourcesRequest>,
    ) -> Result<Response<pr::AllocatableResourcesResponse>, Status> {
        Err(Status::unimplemented("not in the fake"))
    }

    async fn get(
        &self,
        req: Request<pr::GetPodResourcesRequest>,
    ) -> Result<Response<pr::GetPodResourcesResponse>, Status> {
        if !self.get_implemented {
            return Err(Status::unimplemented("Get is not enabled (kubelet < 1.27)"));
        }
        let r = req.into_inner();
        self.pods
            .snapshot()
            .into_iter()
            .find(|p| p.name == r.pod_name && p.namespace == r.pod_namespace)
            .map(|p| {
                Response::new(pr::GetPodResourcesResponse {
                    pod_resources: Some(p),
                })
            })
            .ok_or_else(|| {
                Status::not_found(format!("pod {}/{} not found", r.pod_namespace, r.pod_name))
            })
    }
}

/// Serves PodResources List (and Get, unless `get_implemented` is false) on `socket`.
pub fn serve_pod_resources(
    socket: &Path,
    pods: Vec<pr::PodResources>,
    get_implemented: bool,
) -> tokio::task::JoinHandle<()> {
    serve_pod_resources_table(socket, PodResourcesTable::new(pods), get_implemented)
}

/// Serves PodResources from `table`, which the test may change while it serves.
pub fn serve_pod_resources_table(
    socket: &Path,
    table: PodResourcesTable,
    get_implemented: bool,
) -> tokio::task::JoinHandle<()> {
    let incoming = trellis_device_plugin::uds::bind(socket).expect("bind pod-resources socket");
    let svc = pr::pod_resources_lister_server::PodResourcesListerServer::new(PodTable {
        pods: table,
        get_implemented,
    });
    tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(svc)
            .serve_with_incoming(incoming)
            .await;
    })
}

/// A pod with one container holding `devices` of `resource`.
pub fn pod_with_devices(
    namespace: &str,
    name: &str,
    resource: &str,
    devices: &[&str],
) -> pr::PodResources {
    pr::PodResources {
        name: name.into(),
        namespace: namespace.into(),
        containers: vec![pr::ContainerResources {
            name: "c".into(),
            devices: vec![pr::ContainerDevices {
                resource_name: resource.into(),
                device_ids: devices.iter().map(|d| d.to_string()).collect(),
                topology: None,
            }],
            ..Default::default()
        }],
    }
}
