//! The CNI verbs: the agent's side of every call the `trellis-cni` shim forwards. Each
//! verb changes a pod's networks through the attachment engine and answers in the
//! runtime's cniVersion.

mod add;
mod check;
pub mod control;
mod del;
mod gc;
mod health;
mod request;

use crate::engine::Engine;
use crate::records::RecordStore;
use crate::source::NetworkSource;
use request::{parse_shim_conf, pod_ref};
use serde_json::Value;
use std::sync::{Arc, Mutex};
use trellis_cni::{CniEnv, CniError, Command, ErrorCode};
use trellis_shim::wire::{Request, Response, MAX_STDIN};

pub use crate::engine::POD_ANNOTATIONS_CAPABILITY;
pub use gc::{VALID_ATTACHMENTS_ALIAS, VALID_ATTACHMENTS_KEY};

pub struct Handler {
    engine: Arc<Engine>,
    pub metrics: Arc<crate::metrics::Metrics>,
    /// The CNI socket is being served (set and cleared by `server::serve`).
    pub serving: std::sync::atomic::AtomicBool,
}

impl Handler {
    pub fn new(
        config: &crate::config::AgentConfig,
        source: Arc<dyn NetworkSource>,
    ) -> Result<Handler, crate::records::RecordError> {
        Ok(Handler {
            engine: Arc::new(Engine::new(config, source)?),
            metrics: Arc::new(crate::metrics::Metrics::default()),
            serving: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The engine, while it is this handler's alone (building it up).
    fn engine_mut(&mut self) -> &mut Engine {
        Arc::get_mut(&mut self.engine).expect("the engine is configured before it is shared")
    }

    /// The running device plugin's pools (`ManagerHandle::status`).
    pub fn with_device_pools(
        mut self,
        pools: Arc<Mutex<trellis_device_plugin::manager::Status>>,
    ) -> Handler {
        self.engine_mut().set_device_pools(pools);
        self
    }

    /// Runs without the dataplane it was configured with, saying why in every ADD it
    /// must refuse (networks with an ACL are not attached unfiltered).
    pub fn without_dataplane(mut self, why: String) -> Handler {
        self.engine_mut().set_no_dataplane(why);
        self
    }

    /// Turns on the eBPF dataplane (loaded and checked by the caller).
    pub fn with_dataplane(mut self, dp: crate::dataplane::Dataplane) -> Handler {
        self.engine_mut().set_dataplane(dp);
        self
    }

    /// The attachment engine the verbs share with hot-plug.
    pub fn engine(&self) -> &Arc<Engine> {
        &self.engine
    }

    pub fn records(&self) -> &RecordStore {
        self.engine.records()
    }

    /// See `Engine::reconcile_dataplane`.
    pub fn reconcile_dataplane(&self) {
        self.engine.reconcile_dataplane()
    }

    /// See `Engine::attach_unattached`.
    pub fn attach_unattached(&self) {
        self.engine.attach_unattached()
    }

    /// See `Engine::start_acl_sync`.
    pub fn start_acl_sync(&self, period: std::time::Duration) {
        self.engine.start_acl_sync(period)
    }

    /// One pass of the ACL sync.
    pub fn sync_acls(&self, reported: &mut std::collections::BTreeMap<String, String>) {
        self.engine.sync_acls(reported)
    }

    /// Answers one shim request. A panic anywhere in it is answered as an error, and
    /// an ADD that panicked is undone.
    pub fn handle(&self, req: &Request) -> Response {
        self.handle_received(req, crate::records::now_ms())
    }

    /// As `handle`, for a request that arrived at `received_ms` (ms since the Unix
    /// epoch; it may have waited for a worker since).
    pub fn handle_received(&self, req: &Request, received_ms: u64) -> Response {
        let requested = serde_json::from_str::<Value>(&req.stdin)
            .ok()
            .and_then(|v| {
                v.get("cniVersion")
                    .and_then(Value::as_str)
                    .map(str::to_string)
            })
            .unwrap_or_default();
        let answered = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            self.dispatch(req, received_ms)
        }))
        .unwrap_or_else(|panic| Err(self.after_panic(req, panic)));
        match answered {
            Ok(v) => Response {
                ok: true,
                stdout: v.map(|v| v.to_string()).unwrap_or_default(),
            },
            Err(e) => {
                let cmd = req
                    .env
                    .get("CNI_COMMAND")
                    .or_else(|| req.env.get(control::OP_VAR))
                    .map(String::as_str)
                    .unwrap_or("?");
                let id = req
                    .env
                    .get("CNI_CONTAINERID")
                    .map(String::as_str)
                    .unwrap_or("");
                tracing::warn!(command = cmd, container = id, code = e.code, "{e}");
                Response {
                    ok: false,
                    stdout: e.with_version(&requested).to_json(),
                }
            }
        }
    }

    /// The error for a request that panicked; an ADD's attachments are torn down as
    /// its rollback would have.
    fn after_panic(&self, req: &Request, panic: Box<dyn std::any::Any + Send>) -> CniError {
        let what = panic
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| panic.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        tracing::error!("request panicked: {what}");
        let err = CniError::new(
            ErrorCode::Io,
            format!("internal error in the trellis agent (a bug; please report it): {what}"),
        );
        let env = match CniEnv::from_vars(&req.env) {
            Ok(env) if env.command == Command::Add => env,
            _ => return err,
        };
        let _gate = self
            .engine
            .gc_gate
            .read()
            .unwrap_or_else(|p| p.into_inner());
        let _lock = self.engine.locks.lock(&env.container_id);
        match self.engine.records.load(&env.container_id) {
            Ok(Some(record)) => self.engine.roll_back(record, err),
            Ok(None) => err,
            Err(e) => err.with_details(format!("rollback: {e}")),
        }
    }

    fn dispatch(&self, req: &Request, received_ms: u64) -> Result<Option<Value>, CniError> {
        if req.stdin.len() > MAX_STDIN {
            return Err(CniError::new(
                ErrorCode::Decode,
                format!("network configuration is larger than {MAX_STDIN} bytes"),
            ));
        }
        if let Some(answer) = self.control(req) {
            return answer;
        }
        let env = CniEnv::from_vars(&req.env)?;
        if env.command == Command::Version {
            return Ok(Some(trellis_cni::version::version_info(None)));
        }
        let conf = parse_shim_conf(&req.stdin)?;
        let started = std::time::Instant::now();
        let out = match env.command {
            Command::Add => {
                let added = self.engine.shared(|| self.add(&env, &conf));
                if let (Err(e), Some(p)) = (&added, pod_ref(&env)) {
                    self.engine.failed_event(&p, "FailedAddingInterface", e);
                }
                added.map(Some)
            }
            Command::Del => self.engine.shared(|| self.del(&env, &conf)).map(|_| None),
            Command::Check => self.engine.shared(|| self.check(&env, &conf)).map(|_| None),
            Command::Gc => self.gc(&conf, received_ms).map(|_| None),
            Command::Status => self.status().map(|_| None),
            Command::Version => unreachable!("answered above"),
        };
        self.metrics
            .observe(env.command.as_str(), out.is_ok(), started.elapsed());
        tracing::info!(
            command = env.command.as_str(),
            container = %env.container_id,
            ok = out.is_ok(),
            micros = started.elapsed().as_micros() as u64,
            "cni request"
        );
        out
    }
}
