//! Requests from `trellis attach`, `trellis detach` and `trellis networks` (root on the
//! node, through the
//! agent socket, which only root can open): hot-plug where no pod annotation says what
//! a pod's networks are (the files source). With the Kubernetes source the pod's
//! networks annotation is the desired state, and an edit of it is how networks change.

use super::Handler;
use crate::engine::hotplug::Outcome;
use crate::engine::invalid;
use crate::selection;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use trellis_cni::{CniError, ErrorCode};
use trellis_shim::wire::Request;

/// The request variable that marks a control request (no CNI_COMMAND).
pub const OP_VAR: &str = "TRELLIS_OP";

/// `trellis attach --pod NS/NAME NETWORK` or `trellis detach --pod NS/NAME NETWORK`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ControlRequest {
    /// `namespace/name`.
    pub pod: String,
    /// attach: a networks-annotation entry (`[ns/]name[@if]` or its JSON object);
    /// detach: `[ns/]name`, `@if` or `[ns/]name@if`.
    pub network: String,
}

impl Handler {
    /// Answers a control request; None if `req` is not one.
    pub(super) fn control(&self, req: &Request) -> Option<Result<Option<Value>, CniError>> {
        let op = req.env.get(OP_VAR)?;
        Some(self.control_op(op, &req.stdin).map(Some))
    }

    fn control_op(&self, op: &str, stdin: &str) -> Result<Value, CniError> {
        let engine = &self.engine;
        if op == "networks" {
            let kpis = engine.network_kpis(&engine.known_networks()?)?;
            return Ok(serde_json::to_value(kpis).expect("serialises"));
        }
        let r: ControlRequest = serde_json::from_str(stdin)
            .map_err(|e| CniError::new(ErrorCode::Decode, format!("{op} request: {e}")))?;
        if !engine.dynamic_enabled() {
            return Err(invalid(
                "networks of running pods cannot change on this node ([dynamic] enabled = false in the agent config)",
            ));
        }
        if engine.pods_from_api() {
            return Err(invalid(format!(
                "this agent takes each pod's networks from its {} annotation (Kubernetes source): edit the annotation instead (kubectl annotate --overwrite pod ...)",
                selection::NETWORKS_ANNOTATION
            )));
        }
        let (ns, name) = r
            .pod
            .split_once('/')
            .filter(|(ns, n)| !ns.is_empty() && !n.is_empty())
            .ok_or_else(|| invalid(format!("--pod {:?}: must be NAMESPACE/NAME", r.pod)))?;
        let pod = crate::source::PodRef {
            namespace: ns.into(),
            name: name.into(),
            uid: String::new(),
        };
        let record = engine.pod_record(&pod)?.ok_or_else(|| {
            CniError::new(
                ErrorCode::UnknownContainer,
                format!("pod {pod} has no finished ADD on this node"),
            )
        })?;
        if record.static_networks {
            return Err(invalid(format!(
                "pod {pod} opted out of networks that change while it runs ({}: \"false\")",
                crate::engine::DYNAMIC_ANNOTATION
            )));
        }
        let outcome = match op {
            "attach" => {
                // One entry of the annotation: its comma form, or one JSON object.
                let text = r.network.trim();
                let text = if text.starts_with('{') {
                    format!("[{text}]")
                } else {
                    text.to_string()
                };
                let mut list = selection::parse_networks_asked(&text, ns)
                    .map_err(|e| invalid(e.to_string()))?;
                if list.len() != 1 {
                    return Err(invalid(format!(
                        "attach takes one network, got {}",
                        list.len()
                    )));
                }
                engine.attach(&record.container_id, list.remove(0))?
            }
            "detach" => {
                let (network, ifname) = match r.network.split_once('@') {
                    Some((n, i)) => (n, Some(i).filter(|i| !i.is_empty())),
                    None => (r.network.as_str(), None),
                };
                let network = match network {
                    "" => None,
                    n if n.contains('/') => Some(n.to_string()),
                    n => Some(format!("{ns}/{n}")),
                };
                engine.detach(&record.container_id, network.as_deref(), ifname)?
            }
            other => return Err(invalid(format!("unknown request {other:?}"))),
        };
        let status = engine
            .records()
            .load(&record.container_id)
            .ok()
            .flatten()
            .and_then(|r| r.network_status);
        Ok(answer(&outcome, status))
    }
}

fn answer(o: &Outcome, status: Option<Value>) -> Value {
    json!({
        "added": o.added,
        "removed": o.removed,
        "networkStatus": status.unwrap_or(Value::Null),
    })
}
