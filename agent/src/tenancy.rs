//! Which pods may use which NetworkAttachmentDefinitions: the node's
//! `namespace_isolation` (Multus' namespaceIsolation: a pod uses NADs of its own
//! namespace and of `global_namespaces` only; unlike Multus, also through the
//! `v1.multus-cni.io/default-network` annotation) and a NAD's own
//! `trellis.dev/allowed-namespaces`.

use crate::nad::NetworkAttachmentDefinition;

/// A NAD annotation: the namespaces whose pods may use the NAD, besides its own; a
/// JSON list (`["team-a","team-b"]`) or a comma-separated one (`team-a, team-b`).
/// Absent or empty: every namespace.
pub const ALLOWED_NAMESPACES_ANNOTATION: &str = "trellis.dev/allowed-namespaces";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TenancyError {
    #[error("pods of namespace {pod_ns:?} may not use NetworkAttachmentDefinition {nad} (namespace_isolation: a pod uses its own namespace's NADs and those of global_namespaces {global:?})")]
    Isolated {
        pod_ns: String,
        nad: String,
        global: Vec<String>,
    },
    #[error("pods of namespace {pod_ns:?} may not use NetworkAttachmentDefinition {nad}: its {ALLOWED_NAMESPACES_ANNOTATION} is {allowed:?}")]
    NotAllowed {
        pod_ns: String,
        nad: String,
        allowed: Vec<String>,
    },
    #[error("NetworkAttachmentDefinition {nad}: {ALLOWED_NAMESPACES_ANNOTATION}: {message}")]
    Annotation { nad: String, message: String },
}

/// The node's rule (agent config `namespace_isolation`, `global_namespaces`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamespacePolicy {
    pub isolation: bool,
    pub global: Vec<String>,
}

/// A namespace name: a DNS-1123 label.
pub fn valid_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

/// The NAD's allowed namespaces (empty: all), each checked.
pub fn allowed_namespaces(nad: &NetworkAttachmentDefinition) -> Result<Vec<String>, TenancyError> {
    let Some(text) = nad.metadata.annotations.get(ALLOWED_NAMESPACES_ANNOTATION) else {
        return Ok(Vec::new());
    };
    let err = |message: String| TenancyError::Annotation {
        nad: nad.qualified_name(),
        message,
    };
    let text = text.trim();
    let list: Vec<String> = if text.starts_with('[') {
        serde_json::from_str(text)
            .map_err(|e| err(format!("not a JSON list of namespace names: {e}")))?
    } else {
        text.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(String::from)
            .collect()
    };
    if let Some(bad) = list.iter().find(|n| !valid_namespace(n)) {
        return Err(err(format!("{bad:?} is not a namespace name")));
    }
    Ok(list)
}

impl NamespacePolicy {
    /// Whether a pod of `pod_ns` may use `nad`, which its annotations name.
    pub fn check(
        &self,
        pod_ns: &str,
        nad: &NetworkAttachmentDefinition,
    ) -> Result<(), TenancyError> {
        let nad_ns = nad.namespace();
        if self.isolation && nad_ns != pod_ns && !self.global.iter().any(|g| g == nad_ns) {
            return Err(TenancyError::Isolated {
                pod_ns: pod_ns.into(),
                nad: nad.qualified_name(),
                global: self.global.clone(),
            });
        }
        let allowed = allowed_namespaces(nad)?;
        if !allowed.is_empty() && nad_ns != pod_ns && !allowed.iter().any(|a| a == pod_ns) {
            return Err(TenancyError::NotAllowed {
                pod_ns: pod_ns.into(),
                nad: nad.qualified_name(),
                allowed,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nad::ObjectMeta;

    fn nad(ns: &str, allowed: Option<&str>) -> NetworkAttachmentDefinition {
        let mut annotations = std::collections::BTreeMap::new();
        if let Some(a) = allowed {
            annotations.insert(ALLOWED_NAMESPACES_ANNOTATION.to_string(), a.to_string());
        }
        NetworkAttachmentDefinition {
            api_version: "k8s.cni.cncf.io/v1".into(),
            kind: "NetworkAttachmentDefinition".into(),
            metadata: ObjectMeta {
                name: "net".into(),
                namespace: Some(ns.into()),
                annotations,
                ..Default::default()
            },
            spec: Default::default(),
        }
    }

    #[test]
    fn isolation_allows_own_and_global_namespaces_only() {
        let p = NamespacePolicy {
            isolation: true,
            global: vec!["default".into(), "shared".into()],
        };
        assert!(p.check("team-a", &nad("team-a", None)).is_ok());
        assert!(p.check("team-a", &nad("shared", None)).is_ok());
        let e = p.check("team-a", &nad("team-b", None)).unwrap_err();
        assert!(matches!(e, TenancyError::Isolated { .. }));
        assert!(e.to_string().contains("namespace_isolation"), "{e}");
        // Off: any namespace.
        let off = NamespacePolicy {
            isolation: false,
            global: vec![],
        };
        assert!(off.check("team-a", &nad("team-b", None)).is_ok());
    }

    #[test]
    fn a_nads_allowed_namespaces_bind_other_namespaces() {
        let p = NamespacePolicy {
            isolation: false,
            global: vec![],
        };
        for form in [
            r#"["team-a", "team-c"]"#,
            "team-a, team-c",
            " team-a,team-c ",
        ] {
            let n = nad("infra", Some(form));
            assert!(p.check("team-a", &n).is_ok(), "{form}");
            assert!(p.check("infra", &n).is_ok(), "its own namespace: {form}");
            let e = p.check("team-b", &n).unwrap_err();
            assert!(e.to_string().contains(ALLOWED_NAMESPACES_ANNOTATION), "{e}");
        }
        // Empty: everyone.
        assert!(p.check("team-b", &nad("infra", Some("[]"))).is_ok());
        assert!(p.check("team-b", &nad("infra", Some(""))).is_ok());
        // A bad entry is an error naming the annotation, for every pod.
        for bad in [r#"["Team-A"]"#, "team_a", r#"["a", 3]"#, "[not json"] {
            let e = p.check("infra", &nad("infra", Some(bad))).unwrap_err();
            assert!(matches!(e, TenancyError::Annotation { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn namespace_names_are_dns_labels() {
        assert!(valid_namespace("kube-system"));
        for bad in ["", "-a", "a-", "A", "a.b", "a_b", &"a".repeat(64)] {
            assert!(!valid_namespace(bad), "{bad}");
        }
    }
}
