//! NetworkAttachmentDefinition (k8s.cni.cncf.io/v1), the NPWG CRD naming a network.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use trellis_cni::NetConfList;

pub const RESOURCE_NAME_ANNOTATION: &str = "k8s.v1.cni.cncf.io/resourceName";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ObjectMeta {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339, UTC, whole seconds, as the API server sets it (absent in NAD files
    /// unless written there).
    #[serde(
        rename = "creationTimestamp",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub creation_timestamp: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct NadSpec {
    #[serde(default)]
    pub config: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NetworkAttachmentDefinition {
    #[serde(rename = "apiVersion", default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: NadSpec,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NadError {
    #[error("NetworkAttachmentDefinition {0} has an empty spec.config")]
    EmptyConfig(String),
    #[error("NetworkAttachmentDefinition {nad}: invalid spec.config: {source}")]
    Config {
        nad: String,
        #[source]
        source: trellis_cni::conf::ConfError,
    },
}

impl NadError {
    pub fn code(&self) -> trellis_cni::ErrorCode {
        match self {
            NadError::Config { source, .. } => source.code(),
            NadError::EmptyConfig(_) => trellis_cni::ErrorCode::InvalidNetworkConfig,
        }
    }
}

impl NetworkAttachmentDefinition {
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }

    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace(), self.metadata.name)
    }

    pub fn resource_name(&self) -> Option<&str> {
        self.metadata
            .annotations
            .get(RESOURCE_NAME_ANNOTATION)
            .map(String::as_str)
    }

    /// The network's ACL (`trellis.dev/acl`), checked; None without the annotation.
    pub fn acl(&self) -> Result<Option<crate::acl::Acl>, crate::acl::AclError> {
        self.metadata
            .annotations
            .get(crate::acl::ACL_ANNOTATION)
            .map(|a| crate::acl::Acl::parse(a))
            .transpose()
    }

    /// The network's bandwidth cap (`trellis.dev/bandwidth`); none if not annotated.
    pub fn bandwidth(&self) -> Result<crate::bandwidth::Limits, crate::bandwidth::BandwidthError> {
        use crate::bandwidth::{BandwidthError, Limits, BANDWIDTH_ANNOTATION};
        let Some(a) = self.metadata.annotations.get(BANDWIDTH_ANNOTATION) else {
            return Ok(Limits::default());
        };
        let v: serde_json::Value = serde_json::from_str(a).map_err(|e| BandwidthError {
            at: BANDWIDTH_ANNOTATION.into(),
            message: format!("not JSON: {e}"),
        })?;
        Limits::parse(&v, BANDWIDTH_ANNOTATION)
    }

    /// The delegate configuration; a conf without a name takes the NAD's.
    pub fn conf_list(&self) -> Result<NetConfList, NadError> {
        if self.spec.config.trim().is_empty() {
            return Err(NadError::EmptyConfig(self.qualified_name()));
        }
        let err = |source| NadError::Config {
            nad: self.qualified_name(),
            source,
        };
        let conf = NetConfList::parse(self.spec.config.as_bytes(), Some(&self.metadata.name))
            .map_err(err)?;
        // Plugins use the name as a path component and a state key (host-local keeps
        // its leases in <dataDir>/<name>): the spec's form, nothing else.
        trellis_cni::conf::check_network_name(&conf.name).map_err(|reason| {
            err(trellis_cni::conf::ConfError::Field {
                field: "name".into(),
                reason,
            })
        })?;
        Ok(conf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_crd_shape_and_config() {
        let y = r#"
apiVersion: k8s.cni.cncf.io/v1
kind: NetworkAttachmentDefinition
metadata:
  name: macvlan-a
  namespace: pods
  annotations:
    k8s.v1.cni.cncf.io/resourceName: intel.com/sriov
spec:
  config: '{"cniVersion":"1.0.0","type":"macvlan","master":"eth0"}'
"#;
        let n: NetworkAttachmentDefinition = serde_saphyr::from_str(y).unwrap();
        assert_eq!(n.qualified_name(), "pods/macvlan-a");
        assert_eq!(n.resource_name(), Some("intel.com/sriov"));
        let c = n.conf_list().unwrap();
        assert_eq!(c.name, "macvlan-a");
    }

    #[test]
    fn a_network_name_that_is_a_path_is_refused() {
        let n = NetworkAttachmentDefinition {
            api_version: String::new(),
            kind: String::new(),
            metadata: ObjectMeta {
                name: "n".into(),
                namespace: Some("pods".into()),
                ..Default::default()
            },
            spec: NadSpec {
                config: r#"{"cniVersion":"1.0.0","name":"../../opt/cni/bin","type":"bridge"}"#
                    .into(),
            },
        };
        let e = n.conf_list().unwrap_err().to_string();
        assert!(e.contains("pods/n") && e.contains("name"), "{e}");
    }

    #[test]
    fn bad_config_names_the_nad() {
        let n = NetworkAttachmentDefinition {
            api_version: String::new(),
            kind: String::new(),
            metadata: ObjectMeta {
                name: "x".into(),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            spec: NadSpec {
                config: r#"{"cniVersion":"1.0.0"}"#.into(),
            },
        };
        let e = n.conf_list().unwrap_err().to_string();
        assert!(e.contains("ns/x") && e.contains("type"), "{e}");
    }
}
