//! The attachment kinds the agent runs itself rather than exec'ing a plugin binary:
//! SR-IOV VFs (`sriov`) and vhost-user sockets (`vhostuser`). Every other type is a
//! delegate plugin, exec'd by the `trellis_delegate::Invoker` these plug into.

pub mod sriov;
pub mod vhostuser;

use std::sync::Arc;
use trellis_cni::Command;
use trellis_delegate::{InProcessPlugins, InvokeError, Target};

#[derive(Debug)]
pub struct InProcess(pub Vec<Arc<dyn InProcessPlugins>>);

impl InProcessPlugins for InProcess {
    fn handles(&self, plugin: &str) -> bool {
        self.0.iter().any(|p| p.handles(plugin))
    }

    fn exec(
        &self,
        plugin: &str,
        command: Command,
        target: &Target,
        stdin: &[u8],
    ) -> Result<Vec<u8>, InvokeError> {
        let p = self
            .0
            .iter()
            .find(|p| p.handles(plugin))
            .expect("exec only after handles");
        p.exec(plugin, command, target, stdin)
    }
}

/// Keys any plugin conf may carry (CNI spec plus what runtimes and chaining add).
pub const CNI_CONF_KEYS: &[&str] = &[
    "cniVersion",
    "name",
    "type",
    "capabilities",
    "ipam",
    "dns",
    "args",
    "runtimeConfig",
    "prevResult",
];

/// Runs the conf's IPAM plugin (its `ipam.type`) as a plugin binary would: the whole
/// conf on stdin. ADD returns its result; other commands, and confs without IPAM, give
/// `None`.
pub fn ipam(
    invoker: &trellis_delegate::Invoker,
    conf: &serde_json::Map<String, serde_json::Value>,
    command: Command,
    target: &Target,
) -> Result<Option<trellis_cni::CniResult>, trellis_cni::CniError> {
    use trellis_cni::{CniError, CniResult, ErrorCode};
    let Some(ty) = conf
        .get("ipam")
        .and_then(|i| i.get("type"))
        .and_then(serde_json::Value::as_str)
    else {
        return Ok(None);
    };
    let stdin = serde_json::Value::Object(conf.clone()).to_string();
    let out = invoker
        .exec(ty, command, target, stdin.as_bytes())
        .map_err(|e| e.to_cni_error(&format!("IPAM {ty}")))?;
    if command != Command::Add {
        return Ok(None);
    }
    let bad = |e: String| CniError::new(ErrorCode::Io, format!("IPAM {ty} result: {e}"));
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| bad(e.to_string()))?;
    CniResult::from_value(&v)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// An IPAM ADD that failed, and whether the IPAM plugin may hold an address that a
/// DEL must release: one killed on its timeout, crashed or answering garbage may; one
/// that reported its error cleaned up after itself (CNI spec).
pub struct IpamFailure {
    pub error: trellis_cni::CniError,
    pub owes_del: bool,
}

/// IPAM ADD, as `ipam` runs it, telling whether a failure leaves a DEL owed.
pub fn ipam_add(
    invoker: &trellis_delegate::Invoker,
    conf: &serde_json::Map<String, serde_json::Value>,
    target: &Target,
) -> Result<Option<trellis_cni::CniResult>, IpamFailure> {
    use trellis_cni::{CniError, CniResult, ErrorCode};
    let Some(ty) = conf
        .get("ipam")
        .and_then(|i| i.get("type"))
        .and_then(serde_json::Value::as_str)
    else {
        return Ok(None);
    };
    let stdin = serde_json::Value::Object(conf.clone()).to_string();
    let out = invoker
        .exec(ty, Command::Add, target, stdin.as_bytes())
        .map_err(|e| IpamFailure {
            owes_del: e.needs_del(),
            error: e.to_cni_error(&format!("IPAM {ty}")),
        })?;
    // It said it succeeded: whatever is wrong with its answer, it holds an address.
    let bad = |e: String| IpamFailure {
        error: CniError::new(ErrorCode::Io, format!("IPAM {ty} result: {e}")),
        owes_del: true,
    };
    let v: serde_json::Value = serde_json::from_slice(&out).map_err(|e| bad(e.to_string()))?;
    CniResult::from_value(&v)
        .map(Some)
        .map_err(|e| bad(e.to_string()))
}

/// The error an in-process plugin hands back, as a failing binary's would read.
pub fn plugin_error(plugin: &str, command: Command, error: trellis_cni::CniError) -> InvokeError {
    InvokeError::Plugin {
        plugin: plugin.to_string(),
        command: command.as_str(),
        error: Box::new(error),
    }
}
