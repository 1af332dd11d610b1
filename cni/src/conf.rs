//! Network configurations: a single plugin conf or a conflist, normalised to a list.

use crate::version::{Version, SUPPORTED};
use serde_json::{Map, Value};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfError {
    #[error("network config is not valid JSON: {0}")]
    Json(String),
    #[error("network config is not a JSON object")]
    NotAnObject,
    #[error("network config has no {0:?}")]
    Missing(&'static str),
    #[error("network config field {field:?}: {reason}")]
    Field { field: String, reason: String },
    #[error("{0}")]
    Version(String),
}

impl ConfError {
    /// The CNI error code this maps to at the protocol boundary.
    pub fn code(&self) -> crate::ErrorCode {
        match self {
            ConfError::Version(_) => crate::ErrorCode::IncompatibleVersion,
            ConfError::Json(_) => crate::ErrorCode::Decode,
            _ => crate::ErrorCode::InvalidNetworkConfig,
        }
    }
}

/// A network configuration list; a single-plugin conf becomes a list of one.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConfList {
    pub cni_version: String,
    pub name: String,
    pub disable_check: bool,
    pub disable_gc: bool,
    /// Each plugin's own configuration object, as written.
    pub plugins: Vec<Map<String, Value>>,
}

fn field(field: &str, reason: impl Into<String>) -> ConfError {
    ConfError::Field {
        field: field.to_string(),
        reason: reason.into(),
    }
}

impl NetConfList {
    /// Parses a conf or conflist. `default_name` is used when the document has no name
    /// (a NetworkAttachmentDefinition's config may leave it to the NAD's name).
    pub fn parse(bytes: &[u8], default_name: Option<&str>) -> Result<NetConfList, ConfError> {
        let v: Value = serde_json::from_slice(bytes).map_err(|e| ConfError::Json(e.to_string()))?;
        Self::from_value(v, default_name)
    }

    pub fn from_value(v: Value, default_name: Option<&str>) -> Result<NetConfList, ConfError> {
        let Value::Object(obj) = v else {
            return Err(ConfError::NotAnObject);
        };
        let cni_version = pick_version(&obj)?;
        let name = match obj.get("name") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(Value::String(_)) | None => default_name
                .map(str::to_string)
                .ok_or(ConfError::Missing("name"))?,
            Some(_) => return Err(field("name", "must be a string")),
        };
        let flag = |k: &str| -> Result<bool, ConfError> {
            match obj.get(k) {
                None => Ok(false),
                Some(Value::Bool(b)) => Ok(*b),
                // libcni also accepts the strings "true"/"false" here.
                Some(Value::String(s)) if s == "true" || s == "false" => Ok(s == "true"),
                Some(_) => Err(field(k, "must be a boolean")),
            }
        };
        let disable_check = flag("disableCheck")?;
        let disable_gc = flag("disableGC")?;
        let plugins = match obj.get("plugins") {
            Some(Value::Array(list)) => {
                if list.is_empty() {
                    return Err(field("plugins", "is empty"));
                }
                list.iter()
                    .enumerate()
                    .map(|(i, p)| match p {
                        Value::Object(m) => Ok(m.clone()),
                        _ => Err(field(&format!("plugins[{i}]"), "is not an object")),
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
            Some(_) => return Err(field("plugins", "must be a list")),
            None => vec![obj.clone()],
        };
        for (i, p) in plugins.iter().enumerate() {
            match p.get("type") {
                Some(Value::String(t)) => check_plugin_name(t)
                    .map_err(|reason| field(&format!("plugins[{i}].type"), reason))?,
                _ => return Err(ConfError::Missing("type")),
            }
            // The IPAM plugin is exec'd by name too (by the agent for its own types,
            // by the delegate for the rest): the same rule.
            match p.get("ipam") {
                None | Some(Value::Null) => {}
                Some(Value::Object(ipam)) => match ipam.get("type") {
                    None => {}
                    Some(Value::String(t)) => check_plugin_name(t)
                        .map_err(|reason| field(&format!("plugins[{i}].ipam.type"), reason))?,
                    Some(_) => {
                        return Err(field(
                            &format!("plugins[{i}].ipam.type"),
                            "must be a string",
                        ))
                    }
                },
                Some(_) => return Err(field(&format!("plugins[{i}].ipam"), "must be an object")),
            }
            if let Some(c) = p.get("capabilities") {
                if !c.is_object() {
                    return Err(field(
                        &format!("plugins[{i}].capabilities"),
                        "must be an object",
                    ));
                }
            }
        }
        Ok(NetConfList {
            cni_version,
            name,
            disable_check,
            disable_gc,
            plugins,
        })
    }

    pub fn version(&self) -> Version {
        Version::parse(&self.cni_version).expect("validated at parse")
    }

    pub fn plugin_type(&self, i: usize) -> &str {
        self.plugins[i]["type"]
            .as_str()
            .expect("validated at parse")
    }

    /// Capabilities plugin `i` declares as true.
    pub fn capabilities(&self, i: usize) -> impl Iterator<Item = &str> {
        self.plugins[i]
            .get("capabilities")
            .and_then(Value::as_object)
            .into_iter()
            .flat_map(|m| m.iter())
            .filter(|(_, v)| v.as_bool() == Some(true))
            .map(|(k, _)| k.as_str())
    }

    /// Whether any plugin in the list declares capability `cap`.
    pub fn has_capability(&self, cap: &str) -> bool {
        (0..self.plugins.len()).any(|i| self.capabilities(i).any(|c| c == cap))
    }

    /// The stdin for plugin `i`, as libcni builds it: the plugin's conf with the list's
    /// name and cniVersion, `runtimeConfig` holding only the capabilities the plugin
    /// declares, and `prevResult` when given.
    pub fn plugin_stdin(
        &self,
        i: usize,
        runtime_config: &Map<String, Value>,
        prev_result: Option<&Value>,
    ) -> Value {
        let mut conf = self.plugins[i].clone();
        conf.insert("name".into(), Value::String(self.name.clone()));
        conf.insert("cniVersion".into(), Value::String(self.cni_version.clone()));
        conf.remove("plugins");
        conf.remove("cniVersions");
        conf.remove("runtimeConfig");
        let rc: Map<String, Value> = self
            .capabilities(i)
            .filter_map(|c| runtime_config.get(c).map(|v| (c.to_string(), v.clone())))
            .collect();
        if !rc.is_empty() {
            conf.insert("runtimeConfig".into(), Value::Object(rc));
        }
        match prev_result {
            Some(p) => {
                conf.insert("prevResult".into(), p.clone());
            }
            None => {
                conf.remove("prevResult");
            }
        }
        Value::Object(conf)
    }

    /// The list back as one JSON document (for records and logs).
    pub fn to_value(&self) -> Value {
        serde_json::json!({
            "cniVersion": self.cni_version,
            "name": self.name,
            "disableCheck": self.disable_check,
            "disableGC": self.disable_gc,
            "plugins": self.plugins,
        })
    }
}

/// A network name as the spec has it: an alphanumeric, then alphanumerics, `_`, `.`,
/// `-`; at most 253 bytes (a Kubernetes object name's limit), refused whole if longer.
pub fn check_network_name(n: &str) -> Result<(), String> {
    let first_ok = n.chars().next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = n
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if !first_ok || !rest_ok {
        return Err(format!(
            "{n:?} must start with a letter or digit and hold only letters, digits, '_', '.', '-'"
        ));
    }
    if n.len() > 253 {
        return Err(format!("is {} bytes long; at most 253", n.len()));
    }
    Ok(())
}

/// A plugin name is a bare file name in the CNI bin dirs: never a path, so no
/// config can make the agent (root) exec a file outside them.
pub fn check_plugin_name(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("is empty; it must name a plugin binary".into());
    }
    if t.contains('/') || t.contains('\0') || t.contains("..") || t == "." {
        return Err(format!(
            "{t:?} is not a plugin binary name (no '/', '..' or NUL: a plugin is a file in the CNI bin dirs)"
        ));
    }
    Ok(())
}

/// The version of a document: the highest supported of `cniVersions` (1.1.0), else
/// `cniVersion`.
fn pick_version(obj: &Map<String, Value>) -> Result<String, ConfError> {
    if let Some(list) = obj.get("cniVersions") {
        let list = list
            .as_array()
            .ok_or_else(|| field("cniVersions", "must be a list of strings"))?;
        let mut best: Option<(Version, String)> = None;
        for s in list.iter().filter_map(Value::as_str) {
            if let (Ok(v), true) = (Version::parse(s), SUPPORTED.contains(&s)) {
                if best.as_ref().is_none_or(|(b, _)| v > *b) {
                    best = Some((v, s.to_string()));
                }
            }
        }
        if let Some((_, s)) = best {
            return Ok(s);
        }
        if obj.get("cniVersion").is_none() {
            return Err(ConfError::Version(format!(
                "none of cniVersions {list:?} is supported (supported: {})",
                SUPPORTED.join(", ")
            )));
        }
    }
    match obj.get("cniVersion") {
        Some(Value::String(s)) => {
            Version::parse_supported(s).map_err(ConfError::Version)?;
            Ok(s.clone())
        }
        Some(_) => Err(field("cniVersion", "must be a string")),
        None => Err(ConfError::Missing("cniVersion")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn single_plugin_becomes_list() {
        let c = NetConfList::parse(
            br#"{"cniVersion":"0.4.0","name":"n","type":"bridge","bridge":"br0"}"#,
            None,
        )
        .unwrap();
        assert_eq!(c.plugins.len(), 1);
        assert_eq!(c.plugin_type(0), "bridge");
        assert_eq!(c.version(), Version(0, 4, 0));
    }

    #[test]
    fn network_names_are_the_spec_form() {
        for bad in [
            "../../../opt/cni/bin",
            "a/b",
            ".hidden",
            "a b",
            "\u{17f}",
            "",
        ] {
            assert!(check_network_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_network_name(&"a".repeat(254)).is_err());
        assert!(check_network_name(&"a".repeat(253)).is_ok());
        assert!(check_network_name("macvlan-a.v2_x").is_ok());
    }

    #[test]
    fn name_falls_back_to_default() {
        let c = NetConfList::parse(br#"{"cniVersion":"1.0.0","type":"macvlan"}"#, Some("nad-a"))
            .unwrap();
        assert_eq!(c.name, "nad-a");
        let e =
            NetConfList::parse(br#"{"cniVersion":"1.0.0","type":"macvlan"}"#, None).unwrap_err();
        assert_eq!(e, ConfError::Missing("name"));
    }

    #[test]
    fn rejects_bad_documents() {
        let cases: &[(&[u8], &str)] = &[
            (b"{", "not valid JSON"),
            (b"[]", "not a JSON object"),
            (br#"{"name":"x","type":"b"}"#, "cniVersion"),
            (br#"{"cniVersion":"9.9.9","name":"x","type":"b"}"#, "9.9.9"),
            (br#"{"cniVersion":"1.0.0","name":"x"}"#, "type"),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":"../sh"}"#,
                "plugins[0].type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":""}"#,
                "plugins[0].type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":"a\u0000b"}"#,
                "plugins[0].type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":"sriov","ipam":{"type":"/tmp/x.sh"}}"#,
                "plugins[0].ipam.type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","plugins":[{"type":"a"},{"type":"b","ipam":{"type":"..x"}}]}"#,
                "plugins[1].ipam.type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":"b","ipam":{"type":7}}"#,
                "plugins[0].ipam.type",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":"b","ipam":"host-local"}"#,
                "plugins[0].ipam",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","plugins":[]}"#,
                "empty",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","plugins":[1]}"#,
                "plugins[0]",
            ),
            (
                br#"{"cniVersion":"1.0.0","name":"x","type":"b","capabilities":[]}"#,
                "capabilities",
            ),
        ];
        for (doc, want) in cases {
            let e = NetConfList::parse(doc, None).unwrap_err().to_string();
            assert!(e.contains(want), "{}: {e}", String::from_utf8_lossy(doc));
        }
    }

    #[test]
    fn picks_highest_of_cni_versions() {
        let c = NetConfList::parse(
            br#"{"cniVersions":["0.4.0","1.1.0","2.0.0"],"cniVersion":"1.0.0","name":"x","plugins":[{"type":"a"}]}"#,
            None,
        )
        .unwrap();
        assert_eq!(c.cni_version, "1.1.0");
    }

    #[test]
    fn plugin_stdin_filters_runtime_config() {
        let c = NetConfList::parse(
            br#"{"cniVersion":"1.0.0","name":"x","plugins":[
                {"type":"bridge","capabilities":{"mac":true,"ips":false}},
                {"type":"tuning"}]}"#,
            None,
        )
        .unwrap();
        let rc = json!({"mac":"aa:bb:cc:dd:ee:ff","ips":["10.0.0.1/24"]});
        let prev = json!({"cniVersion":"1.0.0"});
        let s = c.plugin_stdin(0, rc.as_object().unwrap(), Some(&prev));
        assert_eq!(s["name"], "x");
        assert_eq!(s["cniVersion"], "1.0.0");
        assert_eq!(s["runtimeConfig"], json!({"mac":"aa:bb:cc:dd:ee:ff"}));
        assert_eq!(s["prevResult"], prev);
        let s1 = c.plugin_stdin(1, rc.as_object().unwrap(), None);
        assert!(s1.get("runtimeConfig").is_none());
        assert!(c.has_capability("mac"));
        assert!(!c.has_capability("ips"));
    }
}
