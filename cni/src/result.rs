//! CNI results: one in-memory shape (the 1.1.0 superset) read from any version from
//! 0.1.0 on and written in any supported version from 0.3.0 on.

use crate::version::Version;
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Interface {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// 1.1.0 on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<String>,
    /// 1.1.0 on: a vhost-user or other userspace socket.
    #[serde(
        rename = "socketPath",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub socket_path: Option<String>,
    /// 1.1.0 on: a PCI device handed to the pod (for example a vfio VF).
    #[serde(rename = "pciID", default, skip_serializing_if = "Option::is_none")]
    pub pci_id: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IpConfig {
    /// CIDR notation, e.g. "10.1.0.5/24".
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<String>,
    /// Index into `interfaces`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<usize>,
}

impl IpConfig {
    pub fn is_ipv6(&self) -> bool {
        self.address.contains(':')
    }
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Route {
    pub dst: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub advmss: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<u32>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dns {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nameservers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub domain: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
}

impl Dns {
    pub fn is_empty(&self) -> bool {
        *self == Dns::default()
    }
}

/// A plugin's result in the 1.1.0 shape; `cni_version` is the version it was read in.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CniResult {
    pub cni_version: String,
    pub interfaces: Vec<Interface>,
    pub ips: Vec<IpConfig>,
    pub routes: Vec<Route>,
    pub dns: Dns,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ResultError {
    #[error("result is not a JSON object")]
    NotAnObject,
    #[error("result has no cniVersion")]
    NoVersion,
    #[error("result field {field}: {reason}")]
    Field { field: String, reason: String },
    #[error("cannot write a result as cniVersion {0}: only 0.3.0 and later are produced")]
    UnsupportedOutput(String),
    #[error("result cniVersion: {0}")]
    Version(String),
}

fn field_err(field: &str, e: impl std::fmt::Display) -> ResultError {
    ResultError::Field {
        field: field.to_string(),
        reason: e.to_string(),
    }
}

impl CniResult {
    /// Reads a result in any version: 0.1.0/0.2.0 (`ip4`/`ip6`) or 0.3.0 and later.
    pub fn from_value(v: &Value) -> Result<CniResult, ResultError> {
        let obj = v.as_object().ok_or(ResultError::NotAnObject)?;
        let version = obj
            .get("cniVersion")
            .and_then(Value::as_str)
            .ok_or(ResultError::NoVersion)?
            .to_string();
        let parsed = Version::parse(&version).map_err(ResultError::Version)?;
        let dns: Dns = match obj.get("dns") {
            Some(d) if !d.is_null() => {
                serde_json::from_value(d.clone()).map_err(|e| field_err("dns", e))?
            }
            _ => Dns::default(),
        };
        if parsed < Version(0, 3, 0) {
            return Self::from_legacy(obj, version, dns);
        }
        let list = |name: &str| -> Vec<Value> {
            obj.get(name)
                .and_then(Value::as_array)
                .cloned()
                .unwrap_or_default()
        };
        let interfaces = list("interfaces")
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                serde_json::from_value(x).map_err(|e| field_err(&format!("interfaces[{i}]"), e))
            })
            .collect::<Result<Vec<Interface>, _>>()?;
        let ips = list("ips")
            .into_iter()
            .enumerate()
            .map(|(i, mut x)| {
                // 0.3.x/0.4.0 carry "version"; it is derived from the address instead.
                if let Some(o) = x.as_object_mut() {
                    o.remove("version");
                }
                serde_json::from_value(x).map_err(|e| field_err(&format!("ips[{i}]"), e))
            })
            .collect::<Result<Vec<IpConfig>, _>>()?;
        let routes = list("routes")
            .into_iter()
            .enumerate()
            .map(|(i, x)| {
                serde_json::from_value(x).map_err(|e| field_err(&format!("routes[{i}]"), e))
            })
            .collect::<Result<Vec<Route>, _>>()?;
        Ok(CniResult {
            cni_version: version,
            interfaces,
            ips,
            routes,
            dns,
        })
    }

    fn from_legacy(
        obj: &Map<String, Value>,
        version: String,
        dns: Dns,
    ) -> Result<CniResult, ResultError> {
        #[derive(Deserialize)]
        struct LegacyIp {
            ip: String,
            #[serde(default)]
            gateway: Option<String>,
            #[serde(default)]
            routes: Vec<Route>,
        }
        let mut r = CniResult {
            cni_version: version,
            dns,
            ..Default::default()
        };
        for key in ["ip4", "ip6"] {
            if let Some(v) = obj.get(key).filter(|v| !v.is_null()) {
                let l: LegacyIp =
                    serde_json::from_value(v.clone()).map_err(|e| field_err(key, e))?;
                r.ips.push(IpConfig {
                    address: l.ip,
                    gateway: l.gateway,
                    interface: None,
                });
                r.routes.extend(l.routes);
            }
        }
        Ok(r)
    }

    pub fn from_json(s: &str) -> Result<CniResult, ResultError> {
        let v: Value = serde_json::from_str(s).map_err(|e| field_err("(document)", e))?;
        Self::from_value(&v)
    }

    /// Writes the result as `version` prescribes: 1.1.0-only fields dropped for older
    /// versions, `ips[].version` added for 0.3.x/0.4.0.
    pub fn to_value(&self, version: &str) -> Result<Value, ResultError> {
        let v = Version::parse(version).map_err(ResultError::Version)?;
        if v < Version(0, 3, 0) {
            return Err(ResultError::UnsupportedOutput(version.to_string()));
        }
        let modern = v >= Version(1, 1, 0);
        let interfaces: Vec<Value> = self
            .interfaces
            .iter()
            .map(|i| {
                let mut i = i.clone();
                if !modern {
                    i.mtu = None;
                    i.socket_path = None;
                    i.pci_id = None;
                }
                serde_json::to_value(i).expect("interface serialises")
            })
            .collect();
        let ips: Vec<Value> = self
            .ips
            .iter()
            .map(|ip| {
                let mut val = serde_json::to_value(ip).expect("ip serialises");
                if v.has_ip_version_field() {
                    val["version"] = json!(if ip.is_ipv6() { "6" } else { "4" });
                }
                val
            })
            .collect();
        let routes: Vec<Value> = self
            .routes
            .iter()
            .map(|r| {
                let mut r = r.clone();
                if !modern {
                    r.mtu = None;
                    r.advmss = None;
                    r.priority = None;
                    r.table = None;
                    r.scope = None;
                }
                serde_json::to_value(r).expect("route serialises")
            })
            .collect();
        let mut out = Map::new();
        out.insert("cniVersion".into(), json!(version));
        if !interfaces.is_empty() {
            out.insert("interfaces".into(), Value::Array(interfaces));
        }
        if !ips.is_empty() {
            out.insert("ips".into(), Value::Array(ips));
        }
        if !routes.is_empty() {
            out.insert("routes".into(), Value::Array(routes));
        }
        if !self.dns.is_empty() {
            out.insert(
                "dns".into(),
                serde_json::to_value(&self.dns).expect("dns serialises"),
            );
        }
        Ok(Value::Object(out))
    }

    /// Appends another result's interfaces and addresses (not its routes or DNS), with
    /// its interface indexes shifted to point into the merged list.
    pub fn merge_attachment(&mut self, other: &CniResult) {
        let offset = self.interfaces.len();
        self.interfaces.extend(other.interfaces.iter().cloned());
        self.ips.extend(other.ips.iter().map(|ip| IpConfig {
            interface: ip.interface.map(|i| i + offset),
            ..ip.clone()
        }));
    }

    /// The interfaces that live in the given sandbox (the pod's), with their indexes.
    pub fn sandbox_interfaces<'a>(
        &'a self,
        sandbox: &'a str,
    ) -> impl Iterator<Item = (usize, &'a Interface)> + 'a {
        self.interfaces
            .iter()
            .enumerate()
            .filter(move |(_, i)| i.sandbox.as_deref() == Some(sandbox))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V110: &str = r#"{
      "cniVersion": "1.1.0",
      "interfaces": [
        {"name": "cni0", "mac": "aa:bb:cc:dd:ee:01"},
        {"name": "eth0", "mac": "aa:bb:cc:dd:ee:02", "mtu": 1400, "sandbox": "/run/netns/x", "pciID": "0000:01:10.0"}
      ],
      "ips": [
        {"address": "10.1.0.5/24", "gateway": "10.1.0.1", "interface": 1},
        {"address": "fd00::5/64", "interface": 1}
      ],
      "routes": [{"dst": "0.0.0.0/0", "gw": "10.1.0.1", "mtu": 1300, "table": 100}],
      "dns": {"nameservers": ["10.1.0.1"], "search": ["svc.local"]}
    }"#;

    #[test]
    fn round_trips_current() {
        let r = CniResult::from_json(V110).unwrap();
        let back = r.to_value("1.1.0").unwrap();
        let orig: Value = serde_json::from_str(V110).unwrap();
        assert_eq!(back, orig);
    }

    #[test]
    fn downgrades_to_040_and_100() {
        let r = CniResult::from_json(V110).unwrap();
        let v040 = r.to_value("0.4.0").unwrap();
        assert_eq!(v040["ips"][0]["version"], "4");
        assert_eq!(v040["ips"][1]["version"], "6");
        assert!(v040["interfaces"][1].get("mtu").is_none());
        assert!(v040["interfaces"][1].get("pciID").is_none());
        assert!(v040["routes"][0].get("table").is_none());
        let v100 = r.to_value("1.0.0").unwrap();
        assert!(v100["ips"][0].get("version").is_none());
        assert!(v100["routes"][0].get("mtu").is_none());
        assert_eq!(v100["interfaces"][1]["sandbox"], "/run/netns/x");
        for v in ["0.3.0", "0.3.1"] {
            assert_eq!(r.to_value(v).unwrap()["cniVersion"], v);
        }
        assert_eq!(
            r.to_value("0.2.0").unwrap_err(),
            ResultError::UnsupportedOutput("0.2.0".into())
        );
    }

    #[test]
    fn reads_031_with_version_fields() {
        let s = r#"{"cniVersion":"0.3.1","interfaces":[{"name":"eth0","sandbox":"/x"}],
                   "ips":[{"version":"4","address":"10.0.0.2/24","gateway":"10.0.0.1","interface":0}]}"#;
        let r = CniResult::from_json(s).unwrap();
        assert_eq!(r.ips[0].address, "10.0.0.2/24");
        assert_eq!(r.to_value("1.1.0").unwrap()["ips"][0].get("version"), None);
    }

    #[test]
    fn reads_legacy_020() {
        let s = r#"{"cniVersion":"0.2.0","ip4":{"ip":"10.0.0.2/24","gateway":"10.0.0.1",
                   "routes":[{"dst":"0.0.0.0/0"}]},"dns":{}}"#;
        let r = CniResult::from_json(s).unwrap();
        assert_eq!(r.ips.len(), 1);
        assert_eq!(r.routes[0].dst, "0.0.0.0/0");
    }

    #[test]
    fn rejects_bad_fields() {
        let e =
            CniResult::from_json(r#"{"cniVersion":"1.0.0","ips":[{"gateway":"x"}]}"#).unwrap_err();
        assert!(e.to_string().contains("ips[0]"), "{e}");
        assert_eq!(
            CniResult::from_json(r#"{"ips":[]}"#).unwrap_err(),
            ResultError::NoVersion
        );
    }

    #[test]
    fn merge_shifts_interface_indexes() {
        let mut a = CniResult::from_json(V110).unwrap();
        let b = CniResult::from_json(
            r#"{"cniVersion":"1.0.0","interfaces":[{"name":"net1","sandbox":"/run/netns/x"}],
               "ips":[{"address":"192.168.1.2/24","interface":0}],"routes":[{"dst":"1.2.3.0/24"}]}"#,
        )
        .unwrap();
        a.merge_attachment(&b);
        assert_eq!(a.interfaces.len(), 3);
        assert_eq!(a.ips[2].interface, Some(2));
        assert_eq!(a.routes.len(), 1, "attachment routes are not merged");
        assert_eq!(a.sandbox_interfaces("/run/netns/x").count(), 2);
    }
}
