//! What a request carries: the shim's conf, the runtime's pod annotations, the pod.

use crate::engine::{invalid, POD_ANNOTATIONS_CAPABILITY};
use crate::source::PodRef;
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use trellis_cni::{CniEnv, CniError, ErrorCode, Version};

/// The parts of the shim's own conf the agent uses.
pub(super) struct ShimConf {
    pub cni_version: String,
    pub runtime_config: Map<String, Value>,
    pub raw: Map<String, Value>,
}

pub(super) fn parse_shim_conf(stdin: &str) -> Result<ShimConf, CniError> {
    let v: Value = serde_json::from_str(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Decode,
            format!("network configuration is not valid JSON: {e}"),
        )
    })?;
    let Value::Object(raw) = v else {
        return Err(CniError::new(
            ErrorCode::Decode,
            "network configuration is not a JSON object",
        ));
    };
    let cni_version = match raw.get("cniVersion") {
        Some(Value::String(s)) => {
            Version::parse_supported(s)
                .map_err(|e| CniError::new(ErrorCode::IncompatibleVersion, e))?;
            s.clone()
        }
        _ => return Err(invalid("network configuration has no cniVersion")),
    };
    let runtime_config = match raw.get("runtimeConfig") {
        None | Some(Value::Null) => Map::new(),
        Some(Value::Object(m)) => m.clone(),
        Some(_) => return Err(invalid("runtimeConfig must be an object")),
    };
    Ok(ShimConf {
        cni_version,
        runtime_config,
        raw,
    })
}

/// containerd passes `null` for a pod without annotations.
pub(super) fn runtime_annotations(
    rc: &Map<String, Value>,
) -> Result<Option<BTreeMap<String, String>>, CniError> {
    match rc.get(POD_ANNOTATIONS_CAPABILITY) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => serde_json::from_value(v.clone())
            .map(Some)
            .map_err(|e| invalid(format!("runtimeConfig {POD_ANNOTATIONS_CAPABILITY:?}: {e}"))),
    }
}

pub(super) fn pod_ref(env: &CniEnv) -> Option<PodRef> {
    let ns = env.args.get("K8S_POD_NAMESPACE")?;
    let name = env.args.get("K8S_POD_NAME")?;
    Some(PodRef {
        namespace: ns.to_string(),
        name: name.to_string(),
        uid: env.args.get("K8S_POD_UID").unwrap_or_default().to_string(),
    })
}
