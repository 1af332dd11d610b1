//! The Kubernetes API as the network source: pods of this node and all
//! NetworkAttachmentDefinitions cached by watches (a miss falls back to a GET, for
//! objects newer than the cache), and network-status patched onto the pod.

use super::{NetworkSource, PodEvent, PodRef, SourceError};
use crate::logical::LOGICAL_ANNOTATION;
use crate::nad::NetworkAttachmentDefinition;
use crate::selection::NETWORK_STATUS_ANNOTATION;
use futures_util::StreamExt;
use k8s_openapi::api::core::v1::{Event, Pod, PodSpec};
use kube::api::{Api, DynamicObject, Patch, PatchParams, PostParams};
use kube::core::ApiResource;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Client, Resource, ResourceExt};
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// How long a cache miss may wait on the API server.
const API_TIMEOUT: Duration = Duration::from_secs(10);

pub fn nad_resource() -> ApiResource {
    ApiResource {
        group: "k8s.cni.cncf.io".into(),
        version: "v1".into(),
        api_version: "k8s.cni.cncf.io/v1".into(),
        kind: "NetworkAttachmentDefinition".into(),
        plural: "network-attachment-definitions".into(),
    }
}

pub struct KubeSource {
    rt: tokio::runtime::Runtime,
    client: Client,
    pods: Store<Pod>,
    nads: Store<DynamicObject>,
    nad_ar: ApiResource,
    synced: Arc<AtomicBool>,
    node_name: String,
    /// Where pod changes go (`pod_changes`).
    pod_subscribers: Subscribers,
}

type Subscribers = Arc<std::sync::Mutex<PodSubscribers>>;

#[derive(Default)]
struct PodSubscribers {
    senders: Vec<std::sync::mpsc::Sender<super::PodChange>>,
    /// A list has been cached and handed out: a later subscriber starts from the cache.
    listed: bool,
}

/// The change a watch event is, for subscribers.
fn pod_change(e: &watcher::Event<Pod>) -> Option<super::PodChange> {
    let (p, gone) = match e {
        watcher::Event::Apply(p) | watcher::Event::InitApply(p) => (p, false),
        watcher::Event::Delete(p) => (p, true),
        watcher::Event::Init | watcher::Event::InitDone => return None,
    };
    Some(super::PodChange {
        pod: pod_ref(p),
        gone,
    })
}

fn pod_ref(p: &Pod) -> PodRef {
    PodRef {
        namespace: p.namespace().unwrap_or_default(),
        name: p.name_any(),
        uid: p.uid().unwrap_or_default(),
    }
}

/// `namespace/name` of a NAD, for the log.
fn nad_key(n: &DynamicObject) -> String {
    format!("{}/{}", n.namespace().unwrap_or_default(), n.name_any())
}

fn unavailable(what: &str, e: impl std::fmt::Display) -> SourceError {
    SourceError::Unavailable {
        what: what.to_string(),
        message: e.to_string(),
    }
}

impl KubeSource {
    /// Connects (kubeconfig file, else in-cluster) and starts the watches.
    pub fn start(kubeconfig: Option<&Path>, node_name: &str) -> Result<KubeSource, SourceError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("trellis-kube")
            .enable_all()
            .build()
            .map_err(|e| unavailable("kubernetes client runtime", e))?;
        let client = rt.block_on(async {
            let config = match kubeconfig {
                Some(p) => {
                    let kc = kube::config::Kubeconfig::read_from(p)
                        .map_err(|e| unavailable(&format!("kubeconfig {}", p.display()), e))?;
                    kube::Config::from_custom_kubeconfig(kc, &Default::default())
                        .await
                        .map_err(|e| unavailable(&format!("kubeconfig {}", p.display()), e))?
                }
                None => kube::Config::infer()
                    .await
                    .map_err(|e| unavailable("kubernetes config", e))?,
            };
            Client::try_from(config).map_err(|e| unavailable("kubernetes client", e))
        })?;
        let nad_ar = nad_resource();
        let synced = Arc::new(AtomicBool::new(false));

        let _guard = rt.enter();
        let pod_writer = reflector::store::Writer::<Pod>::new(());
        let pods = pod_writer.as_reader();
        let pod_watch = watcher(
            Api::<Pod>::all(client.clone()),
            watcher::Config::default().fields(&format!("spec.nodeName={node_name}")),
        )
        .default_backoff()
        // Only metadata and the node matter here; managed fields are most of a pod.
        .modify(|p: &mut Pod| p.managed_fields_mut().clear());
        let pod_subscribers: Subscribers = Default::default();
        let subs = pod_subscribers.clone();
        // A (re)list's pods reach the cache only at its end (InitDone swaps them in):
        // subscribers hear of them then, or each would miss the cache and GET its pod.
        let mut listed: Vec<super::PodChange> = Vec::new();
        rt.spawn(
            reflector::reflector(pod_writer, pod_watch).for_each(move |e| {
                let done = matches!(e, Ok(watcher::Event::InitDone));
                let changes = match &e {
                    Ok(watcher::Event::Init) => {
                        listed.clear();
                        Vec::new()
                    }
                    Ok(ev @ watcher::Event::InitApply(_)) => {
                        listed.extend(pod_change(ev));
                        Vec::new()
                    }
                    Ok(watcher::Event::InitDone) => std::mem::take(&mut listed),
                    Ok(ev) => pod_change(ev).into_iter().collect(),
                    Err(e) => {
                        tracing::warn!("pod watch: {e}");
                        Vec::new()
                    }
                };
                if !changes.is_empty() || done {
                    let mut subs = subs.lock().unwrap_or_else(|p| p.into_inner());
                    subs.listed |= done;
                    for change in changes {
                        subs.senders.retain(|s| s.send(change.clone()).is_ok());
                    }
                }
                std::future::ready(())
            }),
        );
        let nad_writer = reflector::store::Writer::<DynamicObject>::new(nad_ar.clone());
        let nads = nad_writer.as_reader();
        let nad_watch = watcher(
            Api::<DynamicObject>::all_with(client.clone(), &nad_ar),
            watcher::Config::default(),
        )
        .default_backoff()
        .modify(|n: &mut DynamicObject| n.managed_fields_mut().clear());
        rt.spawn(
            reflector::reflector(nad_writer, nad_watch).for_each(|e| async move {
                // Logged once the cache holds the change (the reflector stores it
                // before passing the event on): an operator sees when an edit arrived.
                match e {
                    Ok(watcher::Event::Apply(n)) => {
                        tracing::info!(nad = %nad_key(&n), "NetworkAttachmentDefinition changed")
                    }
                    Ok(watcher::Event::Delete(n)) => {
                        tracing::info!(nad = %nad_key(&n), "NetworkAttachmentDefinition deleted")
                    }
                    Ok(_) => {}
                    Err(e) => tracing::warn!("NetworkAttachmentDefinition watch: {e}"),
                }
            }),
        );
        let (p, n, s) = (pods.clone(), nads.clone(), synced.clone());
        rt.spawn(async move {
            if p.wait_until_ready().await.is_ok() && n.wait_until_ready().await.is_ok() {
                s.store(true, Ordering::Release);
                tracing::info!("kubernetes caches synced");
            }
        });
        drop(_guard);
        Ok(KubeSource {
            rt,
            client,
            pods,
            nads,
            nad_ar,
            synced,
            node_name: node_name.to_string(),
            pod_subscribers,
        })
    }

    fn with_timeout<T>(
        &self,
        what: &str,
        f: impl std::future::Future<Output = Result<T, kube::Error>>,
    ) -> Result<T, SourceError> {
        self.rt.block_on(async {
            match tokio::time::timeout(API_TIMEOUT, f).await {
                Ok(r) => r.map_err(|e| unavailable(what, e)),
                Err(_) => Err(unavailable(
                    what,
                    format!("no answer within {} s", API_TIMEOUT.as_secs()),
                )),
            }
        })
    }

    /// The pod from the watch's cache, else from the API; one re-created under the
    /// same name (another uid) is not it.
    fn pod(&self, pod: &PodRef) -> Result<Pod, SourceError> {
        let key = ObjectRef::<Pod>::new(&pod.name).within(&pod.namespace);
        // A cached pod of another uid may be the one before a re-creation the
        // watch has not delivered yet: asked for again.
        let cached = self
            .pods
            .get(&key)
            .filter(|p| pod.uid.is_empty() || p.meta().uid.as_deref() == Some(pod.uid.as_str()));
        let found = match cached {
            Some(p) => Some((*p).clone()),
            None => {
                let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace);
                self.with_timeout("pod lookup", api.get_opt(&pod.name))?
            }
        };
        let p = found.ok_or_else(|| SourceError::PodNotFound(pod.to_string()))?;
        // A pod re-created under the same name is another pod.
        if !pod.uid.is_empty() && p.meta().uid.as_deref().is_some_and(|u| u != pod.uid) {
            return Err(SourceError::PodNotFound(format!(
                "{pod} with uid {}",
                pod.uid
            )));
        }
        Ok(p)
    }
}

fn to_nad(obj: &DynamicObject) -> Result<NetworkAttachmentDefinition, SourceError> {
    let v = serde_json::to_value(obj).map_err(|e| unavailable("NetworkAttachmentDefinition", e))?;
    serde_json::from_value(v).map_err(|e| {
        unavailable(
            &format!(
                "NetworkAttachmentDefinition {}/{}",
                obj.namespace().unwrap_or_default(),
                obj.name_any()
            ),
            e,
        )
    })
}

impl NetworkSource for KubeSource {
    fn get_nad(
        &self,
        namespace: &str,
        name: &str,
    ) -> Result<NetworkAttachmentDefinition, SourceError> {
        let key = ObjectRef::<DynamicObject>::new_with(name, self.nad_ar.clone()).within(namespace);
        if let Some(obj) = self.nads.get(&key) {
            return to_nad(&obj);
        }
        let api =
            Api::<DynamicObject>::namespaced_with(self.client.clone(), namespace, &self.nad_ar);
        match self.with_timeout("NetworkAttachmentDefinition lookup", api.get_opt(name))? {
            Some(obj) => to_nad(&obj),
            None => Err(SourceError::NadNotFound {
                name: format!("{namespace}/{name}"),
                hint: " in the Kubernetes API".into(),
            }),
        }
    }

    fn logical_nads(&self) -> Result<Vec<NetworkAttachmentDefinition>, SourceError> {
        // Before the first list, the cache would claim there are none.
        self.ready()?;
        Ok(self
            .nads
            .state()
            .iter()
            .filter(|o| o.annotations().contains_key(LOGICAL_ANNOTATION))
            .filter_map(|o| to_nad(o).ok())
            .collect())
    }

    fn pod_changes(&self) -> Option<std::sync::mpsc::Receiver<super::PodChange>> {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut subs = self
            .pod_subscribers
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        // A subscriber after the first list was handed out would never hear of the
        // pods it listed (edited while the agent was down): it starts with them all,
        // from the cache (which took the list before it was handed out). Under the
        // lock, so nothing handed out is missed; a pod may come twice, which is fine.
        if subs.listed {
            for p in self.pods.state() {
                let _ = tx.send(super::PodChange {
                    pod: pod_ref(&p),
                    gone: false,
                });
            }
        }
        subs.senders.push(tx);
        Some(rx)
    }

    fn pod_spec(&self, pod: &PodRef) -> Result<Option<PodSpec>, SourceError> {
        Ok(self.pod(pod)?.spec)
    }

    fn pod_annotations(
        &self,
        pod: &PodRef,
        _from_runtime: Option<&BTreeMap<String, String>>,
    ) -> Result<BTreeMap<String, String>, SourceError> {
        Ok(self.pod(pod)?.annotations().clone())
    }

    fn publish_network_status(&self, pod: &PodRef, status: &str) -> Result<(), SourceError> {
        let api = Api::<Pod>::namespaced(self.client.clone(), &pod.namespace);
        let mut patch =
            serde_json::json!({"metadata": {"annotations": {NETWORK_STATUS_ANNOTATION: status}}});
        // Only onto this pod, not one made again under its name (the API server refuses
        // a patch whose uid differs: it is immutable).
        if !pod.uid.is_empty() {
            patch["metadata"]["uid"] = serde_json::json!(pod.uid);
        }
        self.with_timeout(
            "network-status patch",
            api.patch_status(&pod.name, &PatchParams::default(), &Patch::Merge(&patch)),
        )
        .map(|_| ())
    }

    fn pod_event(&self, pod: &PodRef, event: PodEvent) {
        let api = Api::<Event>::namespaced(self.client.clone(), &pod.namespace);
        let now = k8s_openapi::jiff::Timestamp::now();
        let mut message = event.message;
        // The API server refuses longer messages.
        if message.len() > 1024 {
            let mut end = 1024;
            while !message.is_char_boundary(end) {
                end -= 1;
            }
            message.truncate(end);
        }
        let ev = Event {
            metadata: kube::api::ObjectMeta {
                // The server adds a suffix (and shortens a long pod name to fit).
                generate_name: Some(format!("{}.", pod.name)),
                namespace: Some(pod.namespace.clone()),
                ..Default::default()
            },
            involved_object: k8s_openapi::api::core::v1::ObjectReference {
                api_version: Some("v1".into()),
                kind: Some("Pod".into()),
                namespace: Some(pod.namespace.clone()),
                name: Some(pod.name.clone()),
                uid: (!pod.uid.is_empty()).then(|| pod.uid.clone()),
                ..Default::default()
            },
            reason: Some(event.reason.into()),
            message: Some(message),
            type_: Some(if event.warning { "Warning" } else { "Normal" }.into()),
            source: Some(k8s_openapi::api::core::v1::EventSource {
                component: Some("trellis".into()),
                host: Some(self.node_name.clone()),
            }),
            reporting_component: Some("trellis.dev/agent".into()),
            reporting_instance: Some(self.node_name.clone()),
            first_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            last_timestamp: Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(now)),
            count: Some(1),
            ..Default::default()
        };
        let pod = pod.clone();
        self.rt.spawn(async move {
            let posted =
                tokio::time::timeout(API_TIMEOUT, api.create(&PostParams::default(), &ev)).await;
            match posted {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => tracing::warn!(pod = %pod, "cannot post event: {e}"),
                Err(_) => tracing::warn!(pod = %pod, "cannot post event: no answer"),
            }
        });
    }

    fn ready(&self) -> Result<(), SourceError> {
        if self.synced.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(unavailable("kubernetes caches", "not synced yet"))
        }
    }
}
