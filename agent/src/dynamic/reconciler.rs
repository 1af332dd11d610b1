//! The annotation reconciler: follows this node's pods (the Kubernetes source's pod
//! watch) and, when a running pod's networks annotation differs from what its
//! attachments were made from, has the engine bring them in line. A pod annotated
//! `trellis.dev/dynamic: "false"` is left as its ADD made it. A change that fails is
//! tried again with a growing wait (a NAD created later, a device freed) until the
//! annotation changes again.

use crate::choice::spec::CHOICE_ANNOTATION;
use crate::engine::hotplug::is_sandbox_of;
use crate::engine::{Engine, DYNAMIC_ANNOTATION};
use crate::selection::NETWORKS_ANNOTATION;
use crate::source::{PodChange, PodRef};
use std::collections::{BTreeMap, HashMap};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The first wait before a failed change is tried again; doubled up to `MAX_RETRY`.
const FIRST_RETRY: Duration = Duration::from_secs(2);
const MAX_RETRY: Duration = Duration::from_secs(300);
/// The least time between two passes.
const MIN_WAIT: Duration = Duration::from_millis(50);

/// Starts the reconciler on its own thread, if the source watches pods.
pub fn start(engine: Arc<Engine>) {
    let Some(changes) = engine.source.pod_changes() else {
        return;
    };
    std::thread::Builder::new()
        .name("trellis-dynamic".into())
        .spawn(move || Reconciler::new(engine).run(changes))
        .expect("dynamic reconciler thread");
}

type Annotations = (Option<String>, Option<String>);

/// How often every pod seen is compared again with its record, whatever its events.
const RESYNC: Duration = Duration::from_secs(60);

struct Reconciler {
    engine: Arc<Engine>,
    /// Per pod uid, the annotations (networks, network-choice) last brought in line.
    done: HashMap<String, Annotations>,
    /// Pods whose last change failed: when to try again, and the wait after that.
    retry: BTreeMap<String, (Instant, Duration, PodRef)>,
    /// Every pod of the node seen (for the resync), and when the last resync was.
    known: HashMap<String, PodRef>,
    resynced: Instant,
}

impl Reconciler {
    fn new(engine: Arc<Engine>) -> Reconciler {
        Reconciler {
            engine,
            done: HashMap::new(),
            retry: BTreeMap::new(),
            known: HashMap::new(),
            resynced: Instant::now(),
        }
    }

    fn run(mut self, changes: Receiver<PodChange>) {
        loop {
            let wait = self
                .retry
                .values()
                .map(|(at, _, _)| at.saturating_duration_since(Instant::now()))
                .min()
                .unwrap_or(RESYNC)
                .min(RESYNC.saturating_sub(self.resynced.elapsed()))
                // Never a busy loop, whatever is due.
                .max(MIN_WAIT);
            let mut batch: BTreeMap<String, PodChange> = BTreeMap::new();
            match changes.recv_timeout(wait) {
                Ok(c) => {
                    batch.insert(c.pod.uid.clone(), c);
                    // Everything queued behind it, each pod once.
                    while let Ok(c) = changes.try_recv() {
                        batch.insert(c.pod.uid.clone(), c);
                    }
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = Instant::now();
            let due: Vec<String> = self
                .retry
                .iter()
                .filter(|(_, (at, _, _))| *at <= now)
                .map(|(uid, _)| uid.clone())
                .collect();
            for uid in due {
                if let Some((_, _, pod)) = self.retry.get(&uid) {
                    batch.entry(uid.clone()).or_insert_with(|| PodChange {
                        pod: pod.clone(),
                        gone: false,
                    });
                }
            }
            if self.resynced.elapsed() >= RESYNC {
                self.resynced = Instant::now();
                // Pods whose change keeps failing stay on their backoff.
                let retry = &self.retry;
                self.done.retain(|uid, _| retry.contains_key(uid));
                for (uid, pod) in &self.known {
                    batch.entry(uid.clone()).or_insert_with(|| PodChange {
                        pod: pod.clone(),
                        gone: false,
                    });
                }
            }
            self.pass(batch);
        }
    }

    /// One batch of changed pods. A pod not changed here for any reason leaves the
    /// retries (the next change of it comes with its next event).
    fn pass(&mut self, batch: BTreeMap<String, PodChange>) {
        let mut todo = Vec::new();
        for (uid, c) in batch {
            if c.gone {
                self.done.remove(&uid);
                self.retry.remove(&uid);
                self.known.remove(&uid);
                continue;
            }
            self.known.insert(uid.clone(), c.pod.clone());
            let annotations = match self.engine.source.pod_annotations(&c.pod, None) {
                Ok(a) => a,
                Err(_) => {
                    // Gone (a delete the watch missed while re-listing) or unreadable:
                    // its next event brings it back.
                    self.retry.remove(&uid);
                    self.known.remove(&uid);
                    continue;
                }
            };
            if annotations
                .get(DYNAMIC_ANNOTATION)
                .is_some_and(|v| v == "false")
            {
                self.retry.remove(&uid);
                continue;
            }
            let networks = (
                annotations.get(NETWORKS_ANNOTATION).cloned(),
                annotations.get(CHOICE_ANNOTATION).cloned(),
            );
            let retrying = self
                .retry
                .get(&uid)
                .is_some_and(|(at, _, _)| *at <= Instant::now());
            if !retrying && self.done.get(&uid) == Some(&networks) {
                continue;
            }
            todo.push((c.pod, networks));
        }
        if todo.is_empty() {
            return;
        }
        // One read of the records for the whole batch.
        let records = match self.engine.records.list() {
            Ok((r, _)) => r,
            Err(e) => {
                tracing::warn!("hot-plug: {e}");
                for (pod, _) in &todo {
                    self.retry.remove(&pod.uid);
                }
                return;
            }
        };
        for (pod, networks) in todo {
            let record = records
                .iter()
                .filter(|r| is_sandbox_of(r, &pod))
                .max_by_key(|r| r.added_at_ms);
            let Some(record) = record else {
                let adding = records.iter().any(|r| {
                    r.pod_namespace == pod.namespace
                        && r.pod_name == pod.name
                        && (r.pod_uid.is_empty() || r.pod_uid == pod.uid)
                        && r.added_at_ms.is_none()
                });
                if adding {
                    // Its ADD is under way and may have read the annotations before
                    // this edit: looked at again once it is done.
                    let next = match self.retry.get(&pod.uid) {
                        Some((_, wait, _)) => (*wait * 2).min(MAX_RETRY),
                        None => FIRST_RETRY,
                    };
                    self.retry
                        .insert(pod.uid.clone(), (Instant::now() + next, next, pod.clone()));
                    continue;
                }
                // Not added yet (its ADD will apply the annotations as they are then),
                // or not a pod trellis attaches (host network): not looked at again
                // until its annotations change or the next resync.
                self.retry.remove(&pod.uid);
                self.done.insert(pod.uid.clone(), networks);
                continue;
            };
            // (The opt-out is the pod's annotation now, read above.)
            let started = Instant::now();
            let container = record.container_id.clone();
            let engine = self.engine.clone();
            let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                engine.reconcile_pod(&container, networks.0.as_deref(), networks.1.as_deref())
            }))
            .unwrap_or_else(|_| {
                Err(trellis_cni::CniError::new(
                    trellis_cni::ErrorCode::Io,
                    "internal error in the hot-plug reconciler (a bug; please report it)",
                ))
            });
            match result {
                Ok(o) => {
                    if !o.added.is_empty() || !o.removed.is_empty() {
                        tracing::info!(pod = %pod, added = ?o.added, removed = ?o.removed,
                            micros = started.elapsed().as_micros() as u64, "hot-plug");
                    }
                    self.retry.remove(&pod.uid);
                    self.done.insert(pod.uid.clone(), networks);
                }
                Err(e) => {
                    let next = match self.retry.get(&pod.uid) {
                        Some((_, wait, _)) => (*wait * 2).min(MAX_RETRY),
                        None => FIRST_RETRY,
                    };
                    tracing::warn!(pod = %pod, retry_in_secs = next.as_secs(), "hot-plug: {e}");
                    self.retry
                        .insert(pod.uid.clone(), (Instant::now() + next, next, pod.clone()));
                    // Tried for this annotation; a new one is tried at once.
                    self.done.insert(pod.uid.clone(), networks);
                }
            }
        }
    }
}
