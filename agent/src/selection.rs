//! The pod's network selection: the `k8s.v1.cni.cncf.io/networks` annotation (NPWG
//! multi-net spec v1.3, section 4) in its comma form and its JSON form.

use serde_json::{Map, Value};
use std::net::IpAddr;
use trellis_cni::env::validate_ifname;

pub const NETWORKS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/networks";
pub const NETWORK_STATUS_ANNOTATION: &str = "k8s.v1.cni.cncf.io/network-status";
pub const DEFAULT_NETWORK_ANNOTATION: &str = "v1.multus-cni.io/default-network";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectionError {
    #[error("annotation {NETWORKS_ANNOTATION}: {0}")]
    Networks(String),
    #[error("annotation {DEFAULT_NETWORK_ANNOTATION}: {0}")]
    DefaultNetwork(String),
}

/// One requested attachment.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct NetworkSelection {
    pub name: String,
    pub namespace: String,
    /// The interface name in the pod; `net<N>` (1-based position) when not given.
    pub interface: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ips: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub default_route: Vec<IpAddr>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cni_args: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port_mappings: Option<Value>,
}

impl NetworkSelection {
    pub fn qualified_name(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// The runtimeConfig this selection asks the delegate for, by capability name.
    pub fn runtime_config(&self) -> Map<String, Value> {
        let mut rc = Map::new();
        if let Some(mac) = &self.mac {
            rc.insert("mac".into(), Value::String(mac.clone()));
        }
        if !self.ips.is_empty() {
            rc.insert("ips".into(), Value::from(self.ips.clone()));
        }
        if let Some(b) = &self.bandwidth {
            rc.insert("bandwidth".into(), b.clone());
        }
        if let Some(p) = &self.port_mappings {
            rc.insert("portMappings".into(), p.clone());
        }
        rc
    }
}

fn err(msg: impl Into<String>) -> SelectionError {
    SelectionError::Networks(msg.into())
}

/// Parses the annotation. `pod_namespace` is the default namespace; `pod_ifname` is
/// the interface the cluster network takes (no selection may reuse it).
pub fn parse_networks(
    annotation: &str,
    pod_namespace: &str,
    pod_ifname: &str,
) -> Result<Vec<NetworkSelection>, SelectionError> {
    let list = parse_networks_asked(annotation, pod_namespace)?;
    let named: Vec<NetworkSelection> = list
        .into_iter()
        .enumerate()
        .map(|(i, mut sel)| {
            if sel.interface.is_empty() {
                sel.interface = default_ifname(i);
            }
            sel
        })
        .collect();
    check_ifnames(&named, pod_ifname)?;
    Ok(named)
}

/// The name an entry without one gets at pod ADD: `net<N>`, N its 1-based position.
pub fn default_ifname(i: usize) -> String {
    format!("net{}", i + 1)
}

/// The annotation's entries as the pod wrote them: `interface` empty where the pod
/// named none (hot-plug names those itself, so that the names of attachments already
/// made never change).
pub fn parse_networks_asked(
    annotation: &str,
    pod_namespace: &str,
) -> Result<Vec<NetworkSelection>, SelectionError> {
    let text = annotation.trim();
    if text.is_empty() {
        return Ok(Vec::new());
    }
    if text.starts_with('[') || text.starts_with('{') {
        parse_json_form(text, pod_namespace)
    } else {
        parse_comma_form(text, pod_namespace)
    }
}

/// Every interface name valid and used once in the pod (with `pod_ifname`, the
/// cluster network's).
pub fn check_ifnames(list: &[NetworkSelection], pod_ifname: &str) -> Result<(), SelectionError> {
    let mut seen = vec![pod_ifname.to_string()];
    for sel in list.iter().filter(|s| !s.interface.is_empty()) {
        validate_ifname(&sel.interface).map_err(|m| {
            err(format!(
                "network {:?}: interface name {:?} {m}",
                sel.qualified_name(),
                sel.interface
            ))
        })?;
        if seen.contains(&sel.interface) {
            return Err(err(format!(
                "network {:?}: interface name {:?} is used twice in the pod",
                sel.qualified_name(),
                sel.interface
            )));
        }
        seen.push(sel.interface.clone());
    }
    Ok(())
}

/// `name`, `ns/name`, `name@if`, `ns/name@if`, separated by commas.
fn parse_comma_form(
    text: &str,
    pod_namespace: &str,
) -> Result<Vec<NetworkSelection>, SelectionError> {
    text.split(',')
        .map(str::trim)
        .enumerate()
        .map(|(i, item)| {
            if item.is_empty() {
                return Err(err(format!("entry {} is empty in {text:?}", i + 1)));
            }
            let (path, interface) = match item.split_once('@') {
                Some((_, "")) => {
                    return Err(err(format!(
                        "entry {item:?} has an empty interface name after '@'"
                    )))
                }
                Some((p, ifn)) => (p, ifn.to_string()),
                None => (item, String::new()),
            };
            let (namespace, name) = match path.split_once('/') {
                Some((ns, n)) => (ns.to_string(), n.to_string()),
                None => (pod_namespace.to_string(), path.to_string()),
            };
            let sel = NetworkSelection {
                name,
                namespace,
                interface,
                ..Default::default()
            };
            validate_names(&sel, item)?;
            Ok(sel)
        })
        .collect()
}

const JSON_KEYS: &[&str] = &[
    "name",
    "namespace",
    "interface",
    "mac",
    "ips",
    "default-route",
    "cni-args",
    "bandwidth",
    "portMappings",
];

fn parse_json_form(
    text: &str,
    pod_namespace: &str,
) -> Result<Vec<NetworkSelection>, SelectionError> {
    let v: Value = serde_json::from_str(text).map_err(|e| err(format!("invalid JSON: {e}")))?;
    let Value::Array(items) = v else {
        return Err(err("the JSON form must be a list of objects"));
    };
    items
        .into_iter()
        .enumerate()
        .map(|(i, item)| {
            let at = format!("element {i}");
            let Value::Object(obj) = item else {
                return Err(err(format!("{at} is not an object")));
            };
            if let Some(k) = obj.keys().find(|k| !JSON_KEYS.contains(&k.as_str())) {
                return Err(err(format!(
                    "{at}: unknown key {k:?} (known: {})",
                    JSON_KEYS.join(", ")
                )));
            }
            let string = |k: &str| -> Result<Option<String>, SelectionError> {
                match obj.get(k) {
                    None | Some(Value::Null) => Ok(None),
                    Some(Value::String(s)) => Ok(Some(s.clone())),
                    Some(_) => Err(err(format!("{at}: {k:?} must be a string"))),
                }
            };
            let strings = |k: &str| -> Result<Vec<String>, SelectionError> {
                match obj.get(k) {
                    None | Some(Value::Null) => Ok(Vec::new()),
                    Some(Value::Array(a)) => a
                        .iter()
                        .map(|x| {
                            x.as_str()
                                .map(str::to_string)
                                .ok_or_else(|| err(format!("{at}: {k:?} must be a list of strings")))
                        })
                        .collect(),
                    Some(_) => Err(err(format!("{at}: {k:?} must be a list of strings"))),
                }
            };
            let name = string("name")?.ok_or_else(|| err(format!("{at} has no \"name\"")))?;
            let mut sel = NetworkSelection {
                name,
                namespace: string("namespace")?.unwrap_or_else(|| pod_namespace.to_string()),
                interface: string("interface")?.unwrap_or_default(),
                mac: string("mac")?,
                ips: strings("ips")?,
                ..Default::default()
            };
            let at = format!("network {:?}", sel.qualified_name());
            validate_names(&sel, &sel.qualified_name())?;
            if let Some(mac) = &sel.mac {
                if !valid_mac(mac) {
                    return Err(err(format!("{at}: mac {mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")));
                }
            }
            for ip in &sel.ips {
                if !valid_cidr(ip) {
                    return Err(err(format!("{at}: ips entry {ip:?} is not an address with a prefix length (10.1.2.3/24)")));
                }
            }
            for gw in strings("default-route")? {
                let addr: IpAddr = gw
                    .parse()
                    .map_err(|_| err(format!("{at}: default-route entry {gw:?} is not an IP address")))?;
                sel.default_route.push(addr);
            }
            match obj.get("cni-args") {
                None | Some(Value::Null) => {}
                Some(Value::Object(m)) => sel.cni_args = Some(m.clone()),
                Some(_) => return Err(err(format!("{at}: \"cni-args\" must be an object"))),
            }
            match obj.get("bandwidth") {
                None | Some(Value::Null) => {}
                Some(b @ Value::Object(_)) => sel.bandwidth = Some(b.clone()),
                Some(_) => return Err(err(format!("{at}: \"bandwidth\" must be an object"))),
            }
            match obj.get("portMappings") {
                None | Some(Value::Null) => {}
                Some(p @ Value::Array(_)) => sel.port_mappings = Some(p.clone()),
                Some(_) => return Err(err(format!("{at}: \"portMappings\" must be a list"))),
            }
            Ok(sel)
        })
        .collect()
}

/// `ns/name` for the default-network override (namespace defaults to the pod's).
pub fn parse_default_network(
    annotation: &str,
    pod_namespace: &str,
) -> Result<NetworkSelection, SelectionError> {
    let text = annotation.trim();
    let bad = |m: String| SelectionError::DefaultNetwork(m);
    if text.is_empty() || text.contains(',') || text.contains('@') || text.starts_with('[') {
        return Err(bad(format!(
            "{text:?} must name exactly one network as name or namespace/name"
        )));
    }
    let (namespace, name) = match text.split_once('/') {
        Some((ns, n)) => (ns.to_string(), n.to_string()),
        None => (pod_namespace.to_string(), text.to_string()),
    };
    let sel = NetworkSelection {
        name,
        namespace,
        ..Default::default()
    };
    validate_names(&sel, text).map_err(|e| match e {
        SelectionError::Networks(m) => bad(m),
        other => other,
    })?;
    Ok(sel)
}

fn validate_names(sel: &NetworkSelection, item: &str) -> Result<(), SelectionError> {
    if !valid_object_name(&sel.name, 253) {
        return Err(err(format!(
            "{item:?}: network name {:?} is not a valid object name (lowercase letters, digits, '-', '.')",
            sel.name
        )));
    }
    if !valid_object_name(&sel.namespace, 63) || sel.namespace.contains('.') {
        return Err(err(format!(
            "{item:?}: namespace {:?} is not a valid namespace name",
            sel.namespace
        )));
    }
    Ok(())
}

/// DNS-1123 subdomain (or label, without dots and with a shorter limit).
fn valid_object_name(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.ends_with(|c: char| c.is_ascii_alphanumeric())
}

pub fn valid_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && u8::from_str_radix(p, 16).is_ok())
}

fn valid_cidr(s: &str) -> bool {
    let Some((addr, len)) = s.split_once('/') else {
        return false;
    };
    let Ok(addr) = addr.parse::<IpAddr>() else {
        return false;
    };
    let max = if addr.is_ipv4() { 32 } else { 128 };
    len.parse::<u8>().is_ok_and(|l| l <= max)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn comma_form() {
        let l = parse_networks("a, other/b@fast0 ,c@x", "pods", "eth0").unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(
            (
                l[0].namespace.as_str(),
                l[0].name.as_str(),
                l[0].interface.as_str()
            ),
            ("pods", "a", "net1")
        );
        assert_eq!(
            (
                l[1].namespace.as_str(),
                l[1].name.as_str(),
                l[1].interface.as_str()
            ),
            ("other", "b", "fast0")
        );
        assert_eq!(l[2].interface, "x");
    }

    #[test]
    fn json_form() {
        let l = parse_networks(
            r#"[{"name":"a","interface":"data0","mac":"02:00:00:00:00:01","ips":["10.0.0.5/24","fd00::5/64"],
                 "default-route":["10.0.0.1"],"cni-args":{"k":"v"},"bandwidth":{"ingressRate":1000},
                 "portMappings":[{"hostPort":80,"containerPort":8080}]},
                {"name":"b","namespace":"ns2"}]"#,
            "pods",
            "eth0",
        )
        .unwrap();
        assert_eq!(l[0].interface, "data0");
        assert_eq!(
            l[0].default_route,
            vec!["10.0.0.1".parse::<IpAddr>().unwrap()]
        );
        let rc = l[0].runtime_config();
        assert_eq!(rc["mac"], "02:00:00:00:00:01");
        assert_eq!(rc["ips"][1], "fd00::5/64");
        assert!(rc.contains_key("bandwidth") && rc.contains_key("portMappings"));
        assert_eq!(l[1].qualified_name(), "ns2/b");
        assert_eq!(l[1].interface, "net2");
    }

    #[test]
    fn empty_is_none() {
        assert!(parse_networks("  ", "p", "eth0").unwrap().is_empty());
        assert!(parse_networks("[]", "p", "eth0").unwrap().is_empty());
    }

    #[test]
    fn bad_inputs_name_the_problem() {
        let cases = [
            ("a,,b", "entry 2 is empty"),
            ("a@", "empty interface"),
            ("A_b", "not a valid object name"),
            ("bad ns/a", "not a valid namespace"),
            ("a@eth0", "used twice"),
            ("a@x,b@x", "used twice"),
            ("a@averyveryverylongname", "15"),
            ("[{\"name\":\"a\"", "invalid JSON"),
            ("{\"name\":\"a\"}", "list of objects"),
            ("[1]", "element 0 is not an object"),
            ("[{\"interface\":\"x\"}]", "has no \"name\""),
            (
                "[{\"name\":\"a\",\"defualt-route\":[]}]",
                "unknown key \"defualt-route\"",
            ),
            ("[{\"name\":\"a\",\"mac\":\"zz\"}]", "not a MAC"),
            ("[{\"name\":\"a\",\"ips\":[\"10.0.0.1\"]}]", "prefix length"),
            (
                "[{\"name\":\"a\",\"ips\":\"10.0.0.1/24\"}]",
                "list of strings",
            ),
            (
                "[{\"name\":\"a\",\"default-route\":[\"gw\"]}]",
                "not an IP address",
            ),
            ("[{\"name\":\"a\",\"cni-args\":[]}]", "must be an object"),
        ];
        for (input, want) in cases {
            let e = parse_networks(input, "pods", "eth0")
                .unwrap_err()
                .to_string();
            assert!(e.contains(want), "{input}: {e}");
            assert!(e.contains(NETWORKS_ANNOTATION), "{e}");
        }
    }

    #[test]
    fn default_network_override() {
        assert_eq!(
            parse_default_network("kube-system/calico", "p")
                .unwrap()
                .qualified_name(),
            "kube-system/calico"
        );
        assert_eq!(
            parse_default_network("calico", "p")
                .unwrap()
                .qualified_name(),
            "p/calico"
        );
        assert!(parse_default_network("a,b", "p").is_err());
    }
}
