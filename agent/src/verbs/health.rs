//! Liveness, readiness and the CNI STATUS verb.

use super::Handler;
use serde_json::Value;
use trellis_cni::{CniError, ErrorCode};

impl Handler {
    /// `/healthz`: the CNI socket is served.
    pub fn liveness(&self) -> Result<(), String> {
        if self.serving.load(std::sync::atomic::Ordering::SeqCst) {
            Ok(())
        } else {
            Err("the CNI socket is not being served (starting or stopping)".into())
        }
    }

    /// `/readyz`: the socket is served, the network source's caches are synced, the
    /// default network is there to delegate to (its plugins found), and, when the agent
    /// follows the node's primary conf, trellis's conflist is there and first.
    pub fn readiness(&self) -> Result<(), String> {
        self.liveness()?;
        self.engine
            .source
            .ready()
            .map_err(|e| format!("network source not ready: {e}"))?;
        let conf = self.engine.load_default_network().map_err(|e| e.msg)?;
        for p in &conf.plugins {
            let t = p.get("type").and_then(Value::as_str).unwrap_or_default();
            if self
                .engine
                .invoker
                .in_process
                .as_ref()
                .is_some_and(|i| i.handles(t))
            {
                continue;
            }
            self.engine
                .invoker
                .find(t)
                .map_err(|e| format!("default network {}: {e}", conf.name))?;
        }
        if self.engine.default_network == crate::config::DefaultNetwork::Auto {
            crate::node_conf::check_installed(
                &self.engine.cni_conf_dir,
                &self.engine.cni_conf_file,
            )
            .map_err(|e| format!("node CNI config: {e}"))?;
        }
        Ok(())
    }

    pub(super) fn status(&self) -> Result<(), CniError> {
        let unavailable = |m: String| CniError::new(ErrorCode::PluginNotAvailable, m);
        self.engine
            .source
            .ready()
            .map_err(|e| unavailable(format!("network source not ready: {e}")))?;
        let conf = self
            .engine
            .load_default_network()
            .map_err(|e| unavailable(e.msg))?;
        self.engine
            .invoker
            .status_list(&conf)
            .map_err(|e| unavailable(format!("default network {}: {e}", conf.name)))
    }
}
