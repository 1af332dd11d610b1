//! The `sriov` network config, as sriov-cni takes it: existing sriov-cni NADs work
//! unchanged. Every bad value is an error naming the field.

use serde_json::{Map, Value};
use trellis_devices::pci::PciAddress;

#[derive(Debug, Clone, PartialEq)]
pub struct SriovConf {
    pub name: String,
    pub cni_version: String,
    /// The VF: injected from the pool allocation, or given in the NAD.
    pub device_id: Option<PciAddress>,
    pub vlan: Option<u16>,
    pub vlan_qos: Option<u8>,
    /// 802.1ad instead of the default 802.1Q.
    pub vlan_proto_ad: bool,
    /// `runtimeConfig.mac` (the pod's annotation) wins over the NAD's `mac`.
    pub mac: Option<[u8; 6]>,
    pub mtu: Option<u32>,
    pub spoofchk: Option<bool>,
    pub trust: Option<bool>,
    /// 0 auto, 1 enable, 2 disable.
    pub link_state: Option<u32>,
    pub min_tx_rate: Option<u32>,
    pub max_tx_rate: Option<u32>,
    /// The whole conf, for the IPAM delegate (IPAM plugins read `ipam` from it).
    pub raw: Map<String, Value>,
}

impl SriovConf {
    pub fn has_ipam(&self) -> bool {
        self.raw
            .get("ipam")
            .is_some_and(|v| v.get("type").is_some())
    }

    pub fn ipam_type(&self) -> Option<&str> {
        self.raw.get("ipam")?.get("type")?.as_str()
    }
}

/// Keys sriov-cni reads, besides the CNI ones every conf may have.
const SRIOV_KEYS: &[&str] = &[
    "deviceID",
    "vlan",
    "vlanQoS",
    "vlanProto",
    "mac",
    "mtu",
    "spoofchk",
    "trust",
    "link_state",
    "min_tx_rate",
    "max_tx_rate",
    "logLevel",
    "logFile",
];

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return None;
    }
    let mut m = [0u8; 6];
    for (i, p) in parts.iter().enumerate() {
        if p.len() != 2 {
            return None;
        }
        m[i] = u8::from_str_radix(p, 16).ok()?;
    }
    Some(m)
}

fn err(field: &str, msg: impl std::fmt::Display) -> String {
    format!("{field}: {msg}")
}

fn int(v: &Value, field: &str, lo: i64, hi: i64) -> Result<i64, String> {
    let n = v
        .as_i64()
        .ok_or_else(|| err(field, format!("{v} is not an integer")))?;
    if n < lo || n > hi {
        return Err(err(field, format!("{n} is outside {lo}-{hi}")));
    }
    Ok(n)
}

fn on_off(v: &Value, field: &str) -> Result<bool, String> {
    match v.as_str() {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        _ => Err(err(field, format!("{v} is not \"on\" or \"off\""))),
    }
}

fn mac_of(v: &Value, field: &str) -> Result<[u8; 6], String> {
    let s = v
        .as_str()
        .ok_or_else(|| err(field, format!("{v} is not a string")))?;
    let m = parse_mac(s).ok_or_else(|| err(field, format!("{s:?} is not a MAC address")))?;
    if m[0] & 1 == 1 {
        return Err(err(field, format!("{s} is a multicast address")));
    }
    if m == [0; 6] {
        return Err(err(field, format!("{s} is all zeros")));
    }
    Ok(m)
}

/// Parses the plugin's stdin conf.
pub fn parse(conf: &Map<String, Value>) -> Result<SriovConf, String> {
    let known = |k: &str| crate::kinds::CNI_CONF_KEYS.contains(&k) || SRIOV_KEYS.contains(&k);
    if let Some(k) = conf.keys().find(|k| !known(k)) {
        return Err(err(k, "unknown field for type sriov"));
    }
    let mut c = SriovConf {
        name: conf
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        cni_version: conf
            .get("cniVersion")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string(),
        device_id: None,
        vlan: None,
        vlan_qos: None,
        vlan_proto_ad: false,
        mac: None,
        mtu: None,
        spoofchk: None,
        trust: None,
        link_state: None,
        min_tx_rate: None,
        max_tx_rate: None,
        raw: conf.clone(),
    };
    if let Some(v) = conf.get("deviceID") {
        let s = v
            .as_str()
            .ok_or_else(|| err("deviceID", format!("{v} is not a string")))?;
        c.device_id = Some(s.parse().map_err(|e| err("deviceID", e))?);
    }
    if let Some(v) = conf.get("vlan") {
        c.vlan = Some(int(v, "vlan", 0, 4094)? as u16);
    }
    if let Some(v) = conf.get("vlanQoS") {
        c.vlan_qos = Some(int(v, "vlanQoS", 0, 7)? as u8);
        if c.vlan_qos != Some(0) && c.vlan.unwrap_or(0) == 0 {
            return Err(err("vlanQoS", "needs a non-zero vlan"));
        }
    }
    if let Some(v) = conf.get("vlanProto") {
        c.vlan_proto_ad = match v.as_str().map(str::to_ascii_lowercase).as_deref() {
            Some("802.1q") => false,
            Some("802.1ad") => true,
            _ => {
                return Err(err(
                    "vlanProto",
                    format!("{v} is not \"802.1q\" or \"802.1ad\""),
                ))
            }
        };
        if c.vlan_proto_ad && c.vlan.unwrap_or(0) == 0 {
            return Err(err("vlanProto", "802.1ad needs a non-zero vlan"));
        }
    }
    if let Some(v) = conf.get("mac") {
        c.mac = Some(mac_of(v, "mac")?);
    }
    if let Some(v) = conf.get("runtimeConfig").and_then(|r| r.get("mac")) {
        c.mac = Some(mac_of(v, "runtimeConfig.mac")?);
    }
    if let Some(v) = conf.get("mtu") {
        c.mtu = Some(int(v, "mtu", 68, 65535)? as u32);
    }
    if let Some(v) = conf.get("spoofchk") {
        c.spoofchk = Some(on_off(v, "spoofchk")?);
    }
    if let Some(v) = conf.get("trust") {
        c.trust = Some(on_off(v, "trust")?);
    }
    if let Some(v) = conf.get("link_state") {
        c.link_state = Some(match v.as_str() {
            Some("auto") => 0,
            Some("enable") => 1,
            Some("disable") => 2,
            _ => {
                return Err(err(
                    "link_state",
                    format!("{v} is not auto, enable or disable"),
                ))
            }
        });
    }
    if let Some(v) = conf.get("min_tx_rate") {
        c.min_tx_rate = Some(int(v, "min_tx_rate", 0, u32::MAX as i64)? as u32);
    }
    if let Some(v) = conf.get("max_tx_rate") {
        c.max_tx_rate = Some(int(v, "max_tx_rate", 0, u32::MAX as i64)? as u32);
    }
    if let (Some(min), Some(max)) = (c.min_tx_rate, c.max_tx_rate) {
        if max != 0 && min > max {
            return Err(err(
                "min_tx_rate",
                format!("{min} is above max_tx_rate {max}"),
            ));
        }
    }
    if let Some(ipam) = conf.get("ipam") {
        let ok = ipam
            .as_object()
            .is_some_and(|o| o.is_empty() || o.get("type").is_some_and(Value::is_string));
        if !ok {
            return Err(err("ipam", "must be an object with a \"type\" (or empty)"));
        }
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn p(v: Value) -> Result<SriovConf, String> {
        parse(v.as_object().unwrap())
    }

    #[test]
    fn a_sriov_cni_nad_works_unchanged() {
        let c = p(json!({
            "cniVersion": "0.3.1", "name": "sriov-net", "type": "sriov",
            "vlan": 100, "vlanQoS": 3, "vlanProto": "802.1ad", "spoofchk": "off", "trust": "on",
            "link_state": "enable", "min_tx_rate": 100, "max_tx_rate": 1000, "mtu": 9000,
            "mac": "02:00:00:00:00:01", "logLevel": "info", "logFile": "/var/log/sriov.log",
            "deviceID": "0000:3b:10.2",
            "runtimeConfig": {"mac": "02:00:00:00:00:02"},
            "ipam": {"type": "host-local", "subnet": "10.56.217.0/24"}
        }))
        .unwrap();
        assert_eq!(c.vlan, Some(100));
        assert_eq!(c.vlan_qos, Some(3));
        assert!(c.vlan_proto_ad);
        assert_eq!(c.mac, Some([2, 0, 0, 0, 0, 2]), "runtimeConfig wins");
        assert_eq!(
            (c.spoofchk, c.trust, c.link_state),
            (Some(false), Some(true), Some(1))
        );
        assert_eq!(
            (c.min_tx_rate, c.max_tx_rate, c.mtu),
            (Some(100), Some(1000), Some(9000))
        );
        assert_eq!(c.device_id.unwrap().to_string(), "0000:3b:10.2");
        assert_eq!(c.ipam_type(), Some("host-local"));
    }

    #[test]
    fn bad_values_name_the_field() {
        let cases = [
            (json!({"vlan": 5000}), "vlan: 5000 is outside 0-4094"),
            (json!({"vlan": -1}), "vlan: -1 is outside"),
            (json!({"vlanQoS": 2}), "vlanQoS: needs a non-zero vlan"),
            (
                json!({"vlan": 10, "vlanQoS": 8}),
                "vlanQoS: 8 is outside 0-7",
            ),
            (
                json!({"vlanProto": "802.1ad"}),
                "vlanProto: 802.1ad needs a non-zero vlan",
            ),
            (json!({"vlan": 5, "vlanProto": "qinq"}), "vlanProto:"),
            (
                json!({"mac": "02:00:00:00:00"}),
                "mac: \"02:00:00:00:00\" is not a MAC address",
            ),
            (
                json!({"mac": "01:00:5e:00:00:01"}),
                "is a multicast address",
            ),
            (
                json!({"runtimeConfig": {"mac": "zz:00:00:00:00:01"}}),
                "runtimeConfig.mac",
            ),
            (
                json!({"min_tx_rate": 200, "max_tx_rate": 100}),
                "min_tx_rate: 200 is above max_tx_rate 100",
            ),
            (
                json!({"spoofchk": "yes"}),
                "spoofchk: \"yes\" is not \"on\" or \"off\"",
            ),
            (json!({"link_state": "up"}), "link_state:"),
            (json!({"mtu": 10}), "mtu: 10 is outside 68-65535"),
            (
                json!({"deviceID": "3b:10.2"}),
                "deviceID: \"3b:10.2\" is not a PCI address",
            ),
            (
                json!({"master": "ens1f0"}),
                "master: unknown field for type sriov",
            ),
            (
                json!({"ipam": {"subnet": "x"}}),
                "ipam: must be an object with a \"type\"",
            ),
        ];
        for (v, want) in cases {
            let e = p(v.clone()).unwrap_err();
            assert!(e.contains(want), "{v}: {e:?} should contain {want:?}");
        }
        // QoS 0 without a VLAN is what sriov-cni accepts too.
        assert!(p(json!({"vlanQoS": 0})).is_ok());
        assert!(
            p(json!({"min_tx_rate": 200, "max_tx_rate": 0})).is_ok(),
            "max 0 is no limit"
        );
    }
}
