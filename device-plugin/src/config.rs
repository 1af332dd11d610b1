//! The device pool config, compatible with sriov-network-device-plugin's
//! `config.json` for `netDevice` resources, plus a `vhostUser` kind. Every error names
//! the entry and the field.

use serde_json::{Map, Value};
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use trellis_devices::pci::PciAddress;

/// sriov-network-device-plugin's default `--resource-prefix`.
pub const DEFAULT_PREFIX: &str = "intel.com";
pub const DEFAULT_VHOST_MOUNT: &str = "/var/run/vhost-user";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    #[error("device config {path}: {message}")]
    File { path: String, message: String },
    #[error("device config: {at}: {message}")]
    Field { at: String, message: String },
}

#[derive(Debug, Clone, PartialEq)]
pub struct DeviceConfig {
    pub resources: Vec<ResourceConfig>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ResourceConfig {
    pub name: String,
    pub prefix: String,
    /// Leave NUMA topology out of what kubelet is told.
    pub exclude_topology: bool,
    pub kind: ResourceKind,
    /// sriov-dp's `additionalInfo`, kept for device-info.
    pub additional_info: Option<Value>,
}

impl ResourceConfig {
    /// `prefix/name`, the extended resource pods ask for.
    pub fn full_name(&self) -> String {
        format!("{}/{}", self.prefix, self.name)
    }

    /// `PCIDEVICE_<PREFIX>_<NAME>`: upper case, `.` and `/` (and `-`) as `_`, as
    /// sriov-network-device-plugin names it.
    pub fn env_name(&self) -> String {
        let mut s = String::from("PCIDEVICE_");
        s.extend(self.full_name().chars().map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        }));
        s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum ResourceKind {
    /// Selectors are alternatives: a device joins if any selector matches it.
    NetDevice(Vec<NetSelector>),
    VhostUser {
        selectors: Vec<VhostSelector>,
        /// Where the socket's directory appears in the container.
        mount_path: PathBuf,
    },
}

/// Within one selector every given field must match.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct NetSelector {
    pub vendors: Vec<u16>,
    pub devices: Vec<u16>,
    pub drivers: Vec<String>,
    pub pf_names: Vec<PfNameSelector>,
    pub root_devices: Vec<PciAddress>,
    pub link_types: Vec<String>,
    pub pci_addresses: Vec<PciAddress>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PfNameSelector {
    pub pf: String,
    /// `None`: every VF of the PF.
    pub vfs: Option<Vec<RangeInclusive<u32>>>,
}

impl PfNameSelector {
    pub fn matches(&self, pf: &str, vf_index: u32) -> bool {
        self.pf == pf
            && self
                .vfs
                .as_ref()
                .is_none_or(|r| r.iter().any(|r| r.contains(&vf_index)))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct VhostSelector {
    pub socket_dirs: Vec<PathBuf>,
    pub name_pattern: String,
}

type Res<T> = Result<T, ConfigError>;

fn field_err(at: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        at: at.to_string(),
        message: message.into(),
    }
}

fn kind_of(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn strings(v: &Value, at: &str) -> Res<Vec<String>> {
    let list = v
        .as_array()
        .ok_or_else(|| field_err(at, format!("must be a list of strings, not {}", kind_of(v))))?;
    list.iter()
        .enumerate()
        .map(|(i, s)| match s.as_str() {
            Some(s) if !s.trim().is_empty() => Ok(s.trim().to_string()),
            Some(_) => Err(field_err(&format!("{at}[{i}]"), "is empty")),
            None => Err(field_err(
                &format!("{at}[{i}]"),
                format!("must be a string, not {}", kind_of(s)),
            )),
        })
        .collect()
}

fn hex_ids(v: &Value, at: &str) -> Res<Vec<u16>> {
    strings(v, at)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let h = s.trim_start_matches("0x");
            if h.len() != 4 || !h.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(field_err(
                    &format!("{at}[{i}]"),
                    format!("{s:?} is not a 4-digit hex PCI ID (e.g. \"8086\")"),
                ));
            }
            Ok(u16::from_str_radix(h, 16).expect("checked hex"))
        })
        .collect()
}

fn pci_addresses(v: &Value, at: &str) -> Res<Vec<PciAddress>> {
    strings(v, at)?
        .iter()
        .enumerate()
        .map(|(i, s)| {
            s.parse().map_err(|e: trellis_devices::pci::BadPciAddress| {
                field_err(&format!("{at}[{i}]"), e.to_string())
            })
        })
        .collect()
}

/// `ens1f0`, or `ens1f0#0-3,5`.
pub fn parse_pf_name(s: &str) -> Result<PfNameSelector, String> {
    let Some((pf, ranges)) = s.split_once('#') else {
        return Ok(PfNameSelector {
            pf: s.to_string(),
            vfs: None,
        });
    };
    if pf.is_empty() {
        return Err(format!("{s:?} has no PF name before '#'"));
    }
    let num = |n: &str| -> Result<u32, String> {
        n.trim()
            .parse::<u32>()
            .map_err(|_| format!("malformed VF range in {s:?}: {n:?} is not a VF index"))
    };
    let mut out = Vec::new();
    for part in ranges.split(',') {
        let r = match part.split_once('-') {
            Some((a, b)) => {
                let (a, b) = (num(a)?, num(b)?);
                if a > b {
                    return Err(format!(
                        "malformed VF range in {s:?}: {a}-{b} runs backwards"
                    ));
                }
                a..=b
            }
            None => {
                let a = num(part)?;
                a..=a
            }
        };
        out.push(r);
    }
    Ok(PfNameSelector {
        pf: pf.to_string(),
        vfs: Some(out),
    })
}

/// Selector fields sriov-network-device-plugin has that trellis does not implement.
const UNSUPPORTED_NET_KEYS: &[&str] = &[
    "ddpProfiles",
    "pKeys",
    "acpiIndexes",
    "vdpaType",
    "auxTypes",
];

fn net_selector(obj: &Map<String, Value>, at: &str) -> Res<NetSelector> {
    let mut s = NetSelector::default();
    for (k, v) in obj {
        let fat = format!("{at}.{k}");
        match k.as_str() {
            "vendors" => s.vendors = hex_ids(v, &fat)?,
            "devices" => s.devices = hex_ids(v, &fat)?,
            "drivers" => s.drivers = strings(v, &fat)?,
            "linkTypes" => s.link_types = strings(v, &fat)?,
            "rootDevices" => s.root_devices = pci_addresses(v, &fat)?,
            "pciAddresses" => s.pci_addresses = pci_addresses(v, &fat)?,
            "pfNames" => {
                s.pf_names = strings(v, &fat)?
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        parse_pf_name(p).map_err(|m| field_err(&format!("{fat}[{i}]"), m))
                    })
                    .collect::<Res<_>>()?
            }
            "isRdma" | "needVhostNet" => match v.as_bool() {
                Some(false) => {}
                Some(true) => return Err(field_err(
                    &fat,
                    "true is not supported by trellis (RDMA and vhost-net devices are not mounted)",
                )),
                None => {
                    return Err(field_err(
                        &fat,
                        format!("must be a boolean, not {}", kind_of(v)),
                    ))
                }
            },
            k if UNSUPPORTED_NET_KEYS.contains(&k) => {
                return Err(field_err(
                    &fat,
                    "is a sriov-network-device-plugin selector trellis does not support",
                ))
            }
            _ => return Err(field_err(&fat, "unknown selector")),
        }
    }
    let empty = s.vendors.is_empty()
        && s.devices.is_empty()
        && s.drivers.is_empty()
        && s.pf_names.is_empty()
        && s.root_devices.is_empty()
        && s.link_types.is_empty()
        && s.pci_addresses.is_empty();
    if empty {
        return Err(field_err(
            at,
            "selects nothing (an empty selector would take every network device of the node)",
        ));
    }
    Ok(s)
}

fn vhost_selector(obj: &Map<String, Value>, at: &str) -> Res<VhostSelector> {
    let mut dirs = None;
    let mut pattern = "*".to_string();
    for (k, v) in obj {
        let fat = format!("{at}.{k}");
        match k.as_str() {
            "socketDirs" => {
                let d = strings(v, &fat)?;
                if let Some((i, bad)) = d.iter().enumerate().find(|(_, d)| !d.starts_with('/')) {
                    return Err(field_err(
                        &format!("{fat}[{i}]"),
                        format!("{bad:?} is not an absolute path"),
                    ));
                }
                dirs = Some(d.into_iter().map(PathBuf::from).collect::<Vec<_>>());
            }
            "namePattern" => match v.as_str() {
                Some(p) if !p.is_empty() && !p.contains('/') => pattern = p.to_string(),
                _ => {
                    return Err(field_err(
                        &fat,
                        "must be a non-empty file name pattern (* and ? allowed)",
                    ))
                }
            },
            _ => {
                return Err(field_err(
                    &fat,
                    "unknown selector (vhostUser takes socketDirs and namePattern)",
                ))
            }
        }
    }
    match dirs {
        Some(d) if !d.is_empty() => Ok(VhostSelector {
            socket_dirs: d,
            name_pattern: pattern,
        }),
        _ => Err(field_err(at, "selects nothing: socketDirs is required")),
    }
}

fn selectors<'a>(v: Option<&'a Value>, at: &str) -> Res<Vec<&'a Map<String, Value>>> {
    match v {
        None => Err(field_err(
            at,
            "is missing (an empty selector would take every device of the node)",
        )),
        Some(Value::Object(o)) => Ok(vec![o]),
        Some(Value::Array(a)) if a.is_empty() => Err(field_err(at, "is an empty list")),
        Some(Value::Array(a)) => a
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.as_object().ok_or_else(|| {
                    field_err(
                        &format!("{at}[{i}]"),
                        format!("must be an object, not {}", kind_of(s)),
                    )
                })
            })
            .collect(),
        Some(other) => Err(field_err(
            at,
            format!(
                "must be an object or a list of objects, not {}",
                kind_of(other)
            ),
        )),
    }
}

/// A DNS-1123 subdomain, as Kubernetes wants resource prefixes.
fn valid_prefix(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= 253
        && p.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

/// The name part of a qualified name: alphanumerics, `-`, `_`, `.`, alphanumeric ends.
fn valid_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        && n.as_bytes()[0].is_ascii_alphanumeric()
        && n.as_bytes()[n.len() - 1].is_ascii_alphanumeric()
}

fn resource(v: &Value, index: usize, default_prefix: &str) -> Res<ResourceConfig> {
    let base = format!("resourceList[{index}]");
    let obj = v
        .as_object()
        .ok_or_else(|| field_err(&base, format!("must be an object, not {}", kind_of(v))))?;
    let name = match obj.get("resourceName") {
        Some(Value::String(n)) if valid_name(n) => n.clone(),
        Some(Value::String(n)) => {
            return Err(field_err(
                &format!("{base}.resourceName"),
                format!("{n:?} is not a valid resource name (letters, digits, '-', '_', '.', at most 63, alphanumeric at both ends)"),
            ))
        }
        Some(other) => return Err(field_err(&format!("{base}.resourceName"), format!("must be a string, not {}", kind_of(other)))),
        None => return Err(field_err(&base, "resourceName is missing")),
    };
    let at = format!("{base} ({name})");
    let mut prefix = default_prefix.to_string();
    let mut device_type = "netDevice".to_string();
    let mut exclude_topology = false;
    let mut mount_path = None;
    let mut additional_info = None;
    for (k, v) in obj {
        let fat = format!("{at}.{k}");
        match k.as_str() {
            "resourceName" | "selectors" => {}
            "resourcePrefix" => match v.as_str() {
                Some(p) if valid_prefix(p) => prefix = p.to_string(),
                _ => {
                    return Err(field_err(
                        &fat,
                        format!(
                            "{v} is not a valid prefix (a DNS subdomain such as \"intel.com\")"
                        ),
                    ))
                }
            },
            "deviceType" => match v.as_str() {
                Some(t @ ("netDevice" | "vhostUser")) => device_type = t.to_string(),
                Some(t @ ("accelerator" | "auxNetDevice")) => {
                    return Err(field_err(
                        &fat,
                        format!("{t:?} is not supported by trellis (netDevice and vhostUser are)"),
                    ))
                }
                _ => {
                    return Err(field_err(
                        &fat,
                        format!("{v} is not a device type (netDevice or vhostUser)"),
                    ))
                }
            },
            "excludeTopology" => {
                exclude_topology = v.as_bool().ok_or_else(|| {
                    field_err(&fat, format!("must be a boolean, not {}", kind_of(v)))
                })?
            }
            "additionalInfo" => {
                if !v.is_object() {
                    return Err(field_err(
                        &fat,
                        format!("must be an object, not {}", kind_of(v)),
                    ));
                }
                additional_info = Some(v.clone());
            }
            "mountPath" => match v.as_str() {
                Some(p) if p.starts_with('/') => mount_path = Some(PathBuf::from(p)),
                _ => return Err(field_err(&fat, format!("{v} is not an absolute path"))),
            },
            _ => return Err(field_err(&fat, "unknown field")),
        }
    }
    let sel_at = format!("{at}.selectors");
    let sels = selectors(obj.get("selectors"), &sel_at)?;
    let multi = matches!(obj.get("selectors"), Some(Value::Array(_)));
    let sel_path = |i: usize| {
        if multi {
            format!("{sel_at}[{i}]")
        } else {
            sel_at.clone()
        }
    };
    let kind = if device_type == "vhostUser" {
        ResourceKind::VhostUser {
            selectors: sels
                .iter()
                .enumerate()
                .map(|(i, s)| vhost_selector(s, &sel_path(i)))
                .collect::<Res<_>>()?,
            mount_path: mount_path.unwrap_or_else(|| PathBuf::from(DEFAULT_VHOST_MOUNT)),
        }
    } else {
        if mount_path.is_some() {
            return Err(field_err(
                &format!("{at}.mountPath"),
                "only applies to deviceType vhostUser",
            ));
        }
        ResourceKind::NetDevice(
            sels.iter()
                .enumerate()
                .map(|(i, s)| net_selector(s, &sel_path(i)))
                .collect::<Res<_>>()?,
        )
    };
    Ok(ResourceConfig {
        name,
        prefix,
        exclude_topology,
        kind,
        additional_info,
    })
}

impl DeviceConfig {
    pub fn load(path: &Path, default_prefix: &str) -> Result<DeviceConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        })?;
        Self::parse(&text, default_prefix).map_err(|e| match e {
            ConfigError::Field { at, message } => ConfigError::File {
                path: path.display().to_string(),
                message: format!("{at}: {message}"),
            },
            other => other,
        })
    }

    pub fn parse(text: &str, default_prefix: &str) -> Result<DeviceConfig, ConfigError> {
        let v: Value = serde_json::from_str(text)
            .map_err(|e| field_err("(document)", format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| {
            field_err(
                "(document)",
                format!("must be an object, not {}", kind_of(&v)),
            )
        })?;
        if let Some(k) = obj.keys().find(|k| *k != "resourceList") {
            return Err(field_err(
                k,
                "unknown field (the document has only resourceList)",
            ));
        }
        let list = match obj.get("resourceList") {
            Some(Value::Array(l)) => l,
            Some(other) => {
                return Err(field_err(
                    "resourceList",
                    format!("must be a list, not {}", kind_of(other)),
                ))
            }
            None => return Err(field_err("(document)", "resourceList is missing")),
        };
        let mut resources: Vec<ResourceConfig> = Vec::new();
        for (i, r) in list.iter().enumerate() {
            let r = resource(r, i, default_prefix)?;
            if let Some(j) = resources
                .iter()
                .position(|o| o.full_name() == r.full_name())
            {
                return Err(field_err(
                    &format!("resourceList[{i}] ({})", r.name),
                    format!(
                        "duplicate resource {} (also resourceList[{j}])",
                        r.full_name()
                    ),
                ));
            }
            resources.push(r);
        }
        Ok(DeviceConfig { resources })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SRIOV_DP_EXAMPLE: &str = r#"{
        "resourceList": [{
                "resourceName": "intel_sriov_netdevice",
                "selectors": {
                    "vendors": ["8086"],
                    "devices": ["154c", "10ed"],
                    "drivers": ["i40evf", "ixgbevf"]
                }
            },
            {
                "resourceName": "intel_sriov_dpdk",
                "resourcePrefix": "intel.com",
                "deviceType": "netDevice",
                "excludeTopology": true,
                "selectors": [{
                    "vendors": ["8086"],
                    "devices": ["154c", "10ed"],
                    "drivers": ["vfio-pci"],
                    "pfNames": ["enp0s0f0", "enp2s2f1#0-3,5"],
                    "isRdma": false
                }, {"rootDevices": ["0000:86:00.0"], "linkTypes": ["ether"], "pciAddresses": ["0000:86:02.0"]}],
                "additionalInfo": {"*": {"k": "v"}}
            }
        ]
    }"#;

    #[test]
    fn reads_a_sriov_dp_config_unchanged() {
        let c = DeviceConfig::parse(SRIOV_DP_EXAMPLE, DEFAULT_PREFIX).unwrap();
        assert_eq!(c.resources.len(), 2);
        let a = &c.resources[0];
        assert_eq!(a.full_name(), "intel.com/intel_sriov_netdevice");
        assert_eq!(a.env_name(), "PCIDEVICE_INTEL_COM_INTEL_SRIOV_NETDEVICE");
        let ResourceKind::NetDevice(s) = &a.kind else {
            panic!()
        };
        assert_eq!(s[0].devices, [0x154c, 0x10ed]);
        let b = &c.resources[1];
        assert!(b.exclude_topology);
        let ResourceKind::NetDevice(s) = &b.kind else {
            panic!()
        };
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].pf_names[1].vfs, Some(vec![0..=3, 5..=5]));
        assert!(
            s[0].pf_names[1].matches("enp2s2f1", 5) && !s[0].pf_names[1].matches("enp2s2f1", 4)
        );
        assert!(s[0].pf_names[0].matches("enp0s0f0", 63));
        assert_eq!(s[1].root_devices[0].to_string(), "0000:86:00.0");
    }

    #[test]
    fn vhost_user_pools() {
        let c = DeviceConfig::parse(
            r#"{"resourceList":[{"resourceName":"vhu","resourcePrefix":"trellis.dev","deviceType":"vhostUser",
                "mountPath":"/var/run/vpp","selectors":{"socketDirs":["/run/vpp"],"namePattern":"vhu*.sock"}}]}"#,
            DEFAULT_PREFIX,
        )
        .unwrap();
        let r = &c.resources[0];
        assert_eq!(r.full_name(), "trellis.dev/vhu");
        let ResourceKind::VhostUser {
            selectors,
            mount_path,
        } = &r.kind
        else {
            panic!()
        };
        assert_eq!(mount_path, Path::new("/var/run/vpp"));
        assert_eq!(selectors[0].name_pattern, "vhu*.sock");
    }

    fn err(text: &str) -> String {
        DeviceConfig::parse(text, DEFAULT_PREFIX)
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn bad_configs_name_the_entry_and_field() {
        let one = |r: &str| err(&format!(r#"{{"resourceList":[{r}]}}"#));
        let cases = [
            (one(r#"{"resourceName":"a","selectors":{"vendor":["8086"]}}"#), "resourceList[0] (a).selectors.vendor: unknown selector"),
            (one(r#"{"resourceName":"a","selectors":{}}"#), "resourceList[0] (a).selectors: selects nothing"),
            (one(r#"{"resourceName":"a"}"#), "resourceList[0] (a).selectors: is missing"),
            (one(r#"{"resourceName":"a","selectors":[]}"#), "resourceList[0] (a).selectors: is an empty list"),
            (one(r#"{"resourceName":"a","selectors":{"pfNames":["ens1f0#0-"]}}"#), "resourceList[0] (a).selectors.pfNames[0]: malformed VF range"),
            (one(r#"{"resourceName":"a","selectors":{"pfNames":["ens1f0#5-2"]}}"#), "runs backwards"),
            (one(r##"{"resourceName":"a","selectors":{"pfNames":["#1"]}}"##), "has no PF name"),
            (one(r#"{"resourceName":"a","selectors":[{"vendors":["8086"]},{"pciAddresses":["0000:86:02"]}]}"#), "resourceList[0] (a).selectors[1].pciAddresses[0]: \"0000:86:02\" is not a PCI address"),
            (one(r#"{"resourceName":"a","selectors":{"rootDevices":["86:00.0"]}}"#), "rootDevices[0]"),
            (one(r#"{"resourceName":"a","selectors":{"vendors":["8086x"]}}"#), "vendors[0]: \"8086x\" is not a 4-digit hex PCI ID"),
            (one(r#"{"resourceName":"a","deviceType":"accelerator","selectors":{"vendors":["8086"]}}"#), "deviceType: \"accelerator\" is not supported"),
            (one(r#"{"resourceName":"a","selectors":{"isRdma":true}}"#), "selectors.isRdma: true is not supported"),
            (one(r#"{"resourceName":"a","selectors":{"ddpProfiles":["x"]}}"#), "ddpProfiles: is a sriov-network-device-plugin selector trellis does not support"),
            (one(r#"{"resourceName":"a b","selectors":{"vendors":["8086"]}}"#), "resourceList[0].resourceName: \"a b\" is not a valid resource name"),
            (one(r#"{"resourceName":"a","resourcePrefix":"Intel_com","selectors":{"vendors":["8086"]}}"#), "resourcePrefix"),
            (one(r#"{"resourceName":"a","extra":1,"selectors":{"vendors":["8086"]}}"#), "resourceList[0] (a).extra: unknown field"),
            (one(r#"{"resourceName":"a","mountPath":"/x","selectors":{"vendors":["8086"]}}"#), "mountPath: only applies to deviceType vhostUser"),
            (one(r#"{"resourceName":"v","deviceType":"vhostUser","selectors":{"socketDirs":["run/x"]}}"#), "socketDirs[0]: \"run/x\" is not an absolute path"),
            (one(r#"{"resourceName":"v","deviceType":"vhostUser","selectors":{"namePattern":"*"}}"#), "socketDirs is required"),
            (one(r#"{"selectors":{"vendors":["8086"]}}"#), "resourceList[0]: resourceName is missing"),
            (err(r#"{"resourceList":[{"resourceName":"a","selectors":{"vendors":["8086"]}},{"resourceName":"a","selectors":{"drivers":["x"]}}]}"#), "resourceList[1] (a): duplicate resource intel.com/a (also resourceList[0])"),
            (err(r#"{"resourceList":[], "extra": true}"#), "extra: unknown field"),
            (err("{"), "not JSON"),
        ];
        for (got, want) in cases {
            assert!(got.contains(want), "{got:?} should contain {want:?}");
        }
    }
}
